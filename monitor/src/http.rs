//! The HTTP API: /metrics for Prometheus, /healthz and /readyz for
//! Kubernetes probes, /sockets for people and scripts. No endpoint changes
//! state.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Query, State, rejection::QueryRejection},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use aya::maps::{MapData, PerCpuArray};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use monitor_common::counter;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tower_http::{limit::RequestBodyLimitLayer, timeout::TimeoutLayer};
use tracing::warn;

use crate::{
    events::{History, parse_since},
    metrics::Metrics,
    scan::Snapshot,
    sockets::Filter,
};

/// A snapshot younger than this answers /sockets directly; an older one is
/// refreshed first, so that idle times agree with `ss` to within a second.
const FRESH_ENOUGH: Duration = Duration::from_millis(500);
/// How long /sockets waits for a fresh walk before serving the last one.
const REFRESH_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub rescan: mpsc::Sender<()>,
    pub counters: Arc<Mutex<PerCpuArray<MapData, u64>>>,
    pub ready: Arc<AtomicBool>,
    /// What is missing while degraded, for /readyz.
    pub degraded: Vec<String>,
    pub history: Arc<History>,
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

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 1024;
/// A client must send its request head within this (slowloris).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a request head; hyper answers 431 beyond (its minimum is 8 KiB).
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// No endpoint takes a body.
const MAX_BODY: usize = 1024;
/// Longest a handler may take: the /events long poll (60 s) plus margin.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(65);

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/sockets", get(sockets))
        .route("/events", get(events))
        .with_state(state)
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            HANDLER_TIMEOUT,
        ))
}

/// Serves `router` until `shutdown`, with bounded connections, request heads
/// and header read time, then lets in-flight requests finish (5 s at most).
pub async fn serve(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            () = stopped(&mut shutdown) => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    warn!(%error, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stopped(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// Resolves once shutdown is signalled. The watch guard must not live across
/// an await of the caller (it is not Send), so it is dropped here.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn metrics(State(state): State<AppState>) -> Response {
    let totals = match state.counters.lock() {
        Ok(counters) => (0..counter::SLOTS)
            .map(|slot| {
                counters
                    .get(&slot, 0)
                    .map(|values| values.iter().sum::<u64>())
                    .unwrap_or(0)
            })
            .collect::<Vec<_>>(),
        Err(_) => Vec::new(),
    };
    state.metrics.sync_kernel_counters(&totals);
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

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        "ready\n".into_response()
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
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
        while found.is_empty() {
            match tokio::time::timeout_at(deadline, newest.changed()).await {
                Ok(Ok(())) => found = state.history.query(since, query.after, limit),
                _ => break,
            }
        }
    }
    let found: Vec<&crate::events::EventRecord> = found.iter().map(AsRef::as_ref).collect();
    Json(found).into_response()
}
