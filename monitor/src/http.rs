//! The HTTP servers. Two surfaces, because they have different readers:
//!
//! - `--listen` (the pod IP in the DaemonSet): /metrics for Prometheus,
//!   /healthz and /readyz for the kubelet. Nothing on it names a connection.
//! - `--api-listen` (loopback by default): /sockets and /events, the
//!   connection data (addresses, processes, pods) for people and scripts.
//!
//! No endpoint changes state. A server never lets its clients starve it:
//! connections are bounded, and at the bound the oldest idle one is closed
//! to make room (so that a probe always gets in); request heads have a
//! deadline, as do writes to a client that stopped reading; every refusal is
//! a status code and a count in `idlemon_http_refusals_total`.

mod conn;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, Request, State, rejection::QueryRejection},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::IntCounterVec;
use tokio::sync::{Semaphore, watch};
use tower_http::{limit::RequestBodyLimitLayer, timeout::TimeoutLayer};

pub use self::conn::serve;
use crate::{
    events::{EventRecord, History, parse_since},
    liveness::Liveness,
    metrics::Metrics,
    scan::Snapshot,
    sockets::Filter,
};

/// A snapshot younger than this answers /sockets directly; an older one is
/// refreshed first, so that idle times agree with `ss` to within a second.
/// The scanner spaces the walks it runs for /sockets on its own (see
/// `scan::API_WALK_GAP`): many callers share one walk.
const FRESH_ENOUGH: Duration = Duration::from_millis(500);
/// How long /sockets waits for a fresh walk before serving the last one.
const REFRESH_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub rescan: mpsc::Sender<()>,
    pub ready: Arc<AtomicBool>,
    /// What is missing while degraded, for /readyz.
    pub degraded: Vec<String>,
    /// What keepalive enforcement runs without while ready (an optional
    /// program the kernel refused), for /readyz.
    pub enforcement_without: Vec<String>,
    pub history: Arc<History>,
    pub liveness: Arc<Liveness>,
    /// Places for `/events?wait=` long polls; none left: 429.
    pub long_polls: Arc<Semaphore>,
}

/// Query of `GET /events`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Unix seconds or RFC 3339.
    since: Option<String>,
    /// Only events with a larger id (for following).
    after: Option<u64>,
    limit: Option<usize>,
    /// Seconds to wait for a first event when none matches yet (long poll).
    wait: Option<f64>,
}

const EVENT_LIMIT_DEFAULT: usize = 100;
const EVENT_LIMIT_MAX: usize = 10_000;
const EVENT_WAIT_MAX: f64 = 60.0;
/// Long polls waiting at once; each holds a connection for up to a minute.
pub const LONG_POLLS_MAX: usize = 64;
/// Bytes of one /events answer. A larger one stops early and says so in
/// `X-Idlemon-More: true`; the caller continues with `after=` the last id.
pub const EVENT_BYTES_MAX: usize = 4 << 20;
/// Header of an /events answer cut short by `EVENT_BYTES_MAX`.
pub const MORE_HEADER: &str = "x-idlemon-more";

/// No endpoint takes a body.
const MAX_BODY: usize = 1024;
/// Longest a handler may take: the /events long poll (60 s) plus margin.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(65);

/// The refusals of one server, counted by reason.
#[derive(Clone)]
pub struct Refusals {
    listener: &'static str,
    counter: IntCounterVec,
}

impl Refusals {
    /// Every reason starts at 0, so that a rate over it is defined.
    pub fn new(listener: &'static str, counter: IntCounterVec) -> Self {
        for reason in Refusal::ALL {
            counter.with_label_values(&[listener, reason.as_str()]);
        }
        Self { listener, counter }
    }

    pub fn count(&self, reason: Refusal) {
        self.counter
            .with_label_values(&[self.listener, reason.as_str()])
            .inc();
    }
}

/// Why a request or a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: a malformed request or query.
    BadRequest,
    /// 404: no such path on this server (the connection data lives on the
    /// other one).
    NotFound,
    /// 405: only GET is served.
    MethodNotAllowed,
    /// 413: a request body.
    BodyTooLarge,
    /// 429: too many /events long polls at once.
    TooManyLongPolls,
    /// 503: a handler took longer than it may.
    HandlerTimeout,
    /// 431 or 408 from hyper: a request head too large, or not sent in time.
    HeadTooLarge,
    HeadTimeout,
    /// 400 from hyper: not HTTP.
    Malformed,
    /// The client stopped reading its answer.
    WriteTimeout,
    /// An idle connection closed to make room at the connection bound.
    Evicted,
    /// 503 at once: at the bound, and every connection is in a request.
    Busy,
}

impl Refusal {
    pub const ALL: [Self; 12] = [
        Self::BadRequest,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::BodyTooLarge,
        Self::TooManyLongPolls,
        Self::HandlerTimeout,
        Self::HeadTooLarge,
        Self::HeadTimeout,
        Self::Malformed,
        Self::WriteTimeout,
        Self::Evicted,
        Self::Busy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BodyTooLarge => "body_too_large",
            Self::TooManyLongPolls => "too_many_long_polls",
            Self::HandlerTimeout => "handler_timeout",
            Self::HeadTooLarge => "head_too_large",
            Self::HeadTimeout => "head_timeout",
            Self::Malformed => "malformed",
            Self::WriteTimeout => "write_timeout",
            Self::Evicted => "evicted",
            Self::Busy => "busy",
        }
    }

    /// The refusal a handler's status code stands for; None for answers
    /// that are no refusal.
    fn of_status(status: StatusCode) -> Option<Self> {
        Some(match status {
            StatusCode::BAD_REQUEST => Self::BadRequest,
            StatusCode::NOT_FOUND => Self::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => Self::BodyTooLarge,
            StatusCode::TOO_MANY_REQUESTS => Self::TooManyLongPolls,
            StatusCode::SERVICE_UNAVAILABLE => Self::HandlerTimeout,
            _ => return None,
        })
    }
}

/// `--listen`: what Prometheus and the kubelet read.
pub fn metrics_router(state: AppState, refusals: Refusals) -> Router {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not here: this address serves /metrics, /healthz and /readyz; /sockets and \
                 /events are on --api-listen (127.0.0.1:9782 by default)\n",
            )
        })
        .with_state(state);
    bounded(router, refusals)
}

/// `--api-listen`: the connection data.
pub fn api_router(state: AppState, refusals: Refusals) -> Router {
    let router = Router::new()
        .route("/sockets", get(sockets))
        .route("/events", get(events))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not here: this address serves /sockets and /events\n",
            )
        })
        .with_state(state);
    bounded(router, refusals)
}

fn bounded(router: Router, refusals: Refusals) -> Router {
    router
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            HANDLER_TIMEOUT,
        ))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let refusals = refusals.clone();
            async move {
                // A probe's 503 reports on idlemon; it refuses nothing.
                let probe = matches!(request.uri().path(), "/healthz" | "/readyz");
                let response = next.run(request).await;
                let status = response.status();
                if !(probe && status == StatusCode::SERVICE_UNAVAILABLE)
                    && let Some(refusal) = Refusal::of_status(status)
                {
                    refusals.count(refusal);
                }
                response
            }
        }))
}

async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error:#}\n")).into_response(),
    }
}

/// 200 while the socket walk and the event reader make progress; 503 naming
/// the one that stalled, so that the kubelet restarts a stuck agent.
async fn healthz(State(state): State<AppState>) -> Response {
    match state.liveness.check() {
        Ok(()) => "ok\n".into_response(),
        Err(stalled) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {stalled}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        if state.enforcement_without.is_empty() {
            "ready\n".into_response()
        } else {
            format!(
                "ready; keepalive enforcement runs without: {}\n",
                state.enforcement_without.join("; ")
            )
            .into_response()
        }
    } else if !state.degraded.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready, degraded: {}\n", state.degraded.join("; ")),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: first walk pending\n",
        )
            .into_response()
    }
}

async fn sockets(
    State(state): State<AppState>,
    filter: Result<Query<Filter>, QueryRejection>,
) -> Response {
    let Query(filter) = match filter {
        Ok(filter) => filter,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "{}; filters: at_risk=true|false, min_idle=SECONDS\n",
                    rejection.body_text()
                ),
            )
                .into_response();
        }
    };
    // A walk that started this recently and looked up every owner will do.
    let oldest = Instant::now().checked_sub(FRESH_ENOUGH);
    let usable = |snapshot: &Arc<Snapshot>| {
        snapshot.complete && snapshot.taken.is_some_and(|taken| Some(taken) >= oldest)
    };
    let mut snapshots = state.snapshots.clone();
    if !usable(&snapshots.borrow_and_update()) && state.rescan.send(()).is_ok() {
        let _ = tokio::time::timeout(REFRESH_WAIT, snapshots.wait_for(usable)).await;
    }
    let snapshot = snapshots.borrow().clone();
    socket_list(snapshot, &filter)
}

/// Sockets rendered per this many: the JSON of 200,000 sockets is never
/// held at once.
const SOCKETS_PER_CHUNK: usize = 512;

/// The JSON array of the sockets a filter keeps, longest idle first,
/// streamed in chunks.
fn socket_list(snapshot: Arc<Snapshot>, filter: &Filter) -> Response {
    let selected = snapshot.select(filter);
    let chunks = selected.len().div_ceil(SOCKETS_PER_CHUNK).max(1);
    let body = futures_util::stream::iter((0..chunks).map(move |chunk| {
        let start = chunk * SOCKETS_PER_CHUNK;
        let end = (start + SOCKETS_PER_CHUNK).min(selected.len());
        let mut json = Vec::with_capacity((end - start) * 900 + 2);
        json.push(if chunk == 0 { b'[' } else { b',' });
        for (n, &index) in selected[start..end].iter().enumerate() {
            if n > 0 {
                json.push(b',');
            }
            let view = snapshot.view(&snapshot.sockets[index as usize]);
            serde_json::to_writer(&mut json, &view).map_err(std::io::Error::other)?;
        }
        if chunk + 1 == chunks {
            json.push(b']');
        }
        Ok::<_, std::io::Error>(Bytes::from(json))
    }));
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

async fn events(
    State(state): State<AppState>,
    query: Result<Query<EventQuery>, QueryRejection>,
) -> Response {
    const USAGE: &str =
        "filters: since=UNIX_SECONDS|RFC3339, after=ID, limit=1..10000, wait=SECONDS";
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("{}; {USAGE}\n", rejection.body_text()),
            )
                .into_response();
        }
    };
    let since = match query.since.as_deref().map(parse_since).transpose() {
        Ok(since) => since,
        Err(error) => {
            return (StatusCode::BAD_REQUEST, format!("{error}; {USAGE}\n")).into_response();
        }
    };
    let limit = query.limit.unwrap_or(EVENT_LIMIT_DEFAULT);
    if limit == 0 || limit > EVENT_LIMIT_MAX {
        return (
            StatusCode::BAD_REQUEST,
            format!("limit must be 1..={EVENT_LIMIT_MAX}; {USAGE}\n"),
        )
            .into_response();
    }
    let wait = query.wait.unwrap_or(0.0);
    if !(0.0..=EVENT_WAIT_MAX).contains(&wait) {
        return (
            StatusCode::BAD_REQUEST,
            format!("wait must be 0..={EVENT_WAIT_MAX} seconds; {USAGE}\n"),
        )
            .into_response();
    }
    let mut newest = state.history.subscribe();
    let mut found = state.history.query(since, query.after, limit);
    if found.is_empty() && wait > 0.0 {
        // Each waiter holds a connection for up to a minute: a bounded few.
        let Ok(_place) = state.long_polls.try_acquire() else {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{LONG_POLLS_MAX} /events requests are already waiting; retry later, or \
                     ask without wait=\n"
                ),
            )
                .into_response();
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
        while found.is_empty() {
            match tokio::time::timeout_at(deadline, newest.changed()).await {
                Ok(Ok(())) => found = state.history.query(since, query.after, limit),
                _ => break,
            }
        }
    }
    event_list(&found)
}

/// The JSON array of `found`, oldest first, cut at `EVENT_BYTES_MAX` (with
/// `X-Idlemon-More: true`), but never before the first event.
fn event_list(found: &[Arc<EventRecord>]) -> Response {
    let mut json = Vec::with_capacity(4096);
    json.push(b'[');
    let mut more = false;
    for (n, record) in found.iter().enumerate() {
        let before = json.len();
        if n > 0 {
            json.push(b',');
        }
        if let Err(error) = serde_json::to_writer(&mut json, record.as_ref()) {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response();
        }
        if n > 0 && json.len() + 1 > EVENT_BYTES_MAX {
            json.truncate(before);
            more = true;
            break;
        }
    }
    json.push(b']');
    let mut response = ([(header::CONTENT_TYPE, "application/json")], json).into_response();
    if more {
        response
            .headers_mut()
            .insert(MORE_HEADER, HeaderValue::from_static("true"));
    }
    response
}
