//! Connections of one HTTP server: bounded in number, with the oldest idle
//! one closed at the bound so that a new client (the kubelet's next probe)
//! always gets in, and with a deadline on every write.

use std::{
    collections::BTreeMap,
    future::Future as _,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{Router, body::Body, extract::Request};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    task::JoinSet,
    time::Sleep,
};
use tower_service::Service as _;
use tracing::{debug, warn};

use super::{Refusal, Refusals};

/// Connections open at once. At the bound, the oldest connection that is
/// between requests is closed for the new one; when every one is inside a
/// request, the new one gets a 503 at once.
const MAX_CONNECTIONS: usize = 1024;
/// A client must send a request head within this, the first and every
/// later one on a kept-alive connection (hyper restarts the clock for each):
/// slowloris, and idle connections, end after it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a request head; hyper answers 431 beyond (its minimum is 8 KiB).
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// A write that makes no progress for this long ends the connection: a
/// client that stopped reading cannot pin an answer (a snapshot of every
/// socket) in memory.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to answer "busy" to a connection refused at the bound.
const BUSY_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves `router` until `shutdown`, then lets in-flight requests finish
/// (5 s at most).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    refusals: Refusals,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(Open::default());
    let mut connections = JoinSet::new();
    loop {
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
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let Some(connection) = open.admit(&refusals) else {
            refusals.count(Refusal::Busy);
            connections.spawn(answer_busy(stream));
            continue;
        };
        let router = router.clone();
        let refusals = refusals.clone();
        let open = Arc::clone(&open);
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            let timed_out = Arc::new(AtomicBool::new(false));
            let io = TokioIo::new(Deadline::new(stream, Arc::clone(&timed_out)));
            let busy = Arc::clone(&connection.busy);
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let _in_request = InRequest::enter(&busy);
                    let response = router.clone().call(request.map(Body::new));
                    async move {
                        let response = response.await;
                        drop(_in_request);
                        response
                    }
                });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(io, service);
            tokio::pin!(served);
            let outcome = tokio::select! {
                outcome = served.as_mut() => outcome,
                () = connection.evict.notified() => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
                () = stopped(&mut stop) => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            open.leave(connection.id);
            if let Err(error) = outcome {
                let refusal = if timed_out.load(Ordering::Relaxed) {
                    Some(Refusal::WriteTimeout)
                } else if error.is_timeout() {
                    Some(Refusal::HeadTimeout)
                } else if error.is_parse_too_large() {
                    Some(Refusal::HeadTooLarge)
                } else if error.is_parse() {
                    Some(Refusal::Malformed)
                } else {
                    None
                };
                debug!(%error, ?refusal, "HTTP connection ended with an error");
                if let Some(refusal) = refusal {
                    refusals.count(refusal);
                }
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// The 503 for a connection over the bound, written with a deadline.
async fn answer_busy(mut stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
        content-type: text/plain\r\ncontent-length: 46\r\n\r\n\
        busy: every connection is inside a request\n\n";
    let _ = tokio::time::timeout(BUSY_ANSWER_TIMEOUT, async {
        let _ = stream.write_all(BUSY).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Resolves once shutdown is signalled. The watch guard must not live across
/// an await of the caller (it is not Send), so it is dropped here.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The open connections, oldest first.
#[derive(Default)]
struct Open {
    connections: Mutex<(u64, BTreeMap<u64, Arc<Connection>>)>,
}

struct Connection {
    id: u64,
    /// Requests in progress (a kept-alive connection has 0 between them).
    busy: Arc<AtomicUsize>,
    /// Asks the connection to close once its request, if any, is answered.
    evict: Notify,
}

impl Open {
    /// A place for a new connection; at the bound, made by closing the
    /// oldest idle one. None when every connection is inside a request.
    fn admit(&self, refusals: &Refusals) -> Option<Arc<Connection>> {
        let mut guard = self.connections.lock().ok()?;
        let (next_id, open) = &mut *guard;
        if open.len() >= MAX_CONNECTIONS {
            let idle = open
                .iter()
                .find(|(_, connection)| connection.busy.load(Ordering::Relaxed) == 0)
                .map(|(&id, _)| id)?;
            if let Some(oldest) = open.remove(&idle) {
                // notify_one keeps the wake-up if the task is not waiting yet.
                oldest.evict.notify_one();
                refusals.count(Refusal::Evicted);
            }
        }
        let connection = Arc::new(Connection {
            id: *next_id,
            busy: Arc::new(AtomicUsize::new(0)),
            evict: Notify::new(),
        });
        *next_id += 1;
        open.insert(connection.id, Arc::clone(&connection));
        Some(connection)
    }

    fn leave(&self, id: u64) {
        if let Ok(mut guard) = self.connections.lock() {
            guard.1.remove(&id);
        }
    }
}

/// Marks a connection busy for the life of one request's handler.
struct InRequest(Arc<AtomicUsize>);

impl InRequest {
    fn enter(busy: &Arc<AtomicUsize>) -> Self {
        busy.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(busy))
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream whose writes fail with `TimedOut` after `WRITE_TIMEOUT` without
/// progress (reads are hyper's business: its header timeout).
struct Deadline {
    stream: TcpStream,
    stalled_since: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl Deadline {
    fn new(stream: TcpStream, timed_out: Arc<AtomicBool>) -> Self {
        Self {
            stream,
            stalled_since: None,
            timed_out,
        }
    }

    /// Passes a write's outcome on, arming the deadline while it is pending.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(outcome) => {
                self.stalled_since = None;
                Poll::Ready(outcome)
            }
            Poll::Pending => {
                let deadline = self
                    .stalled_since
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
                ready!(deadline.as_mut().poll(cx));
                self.timed_out.store(true, Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client read nothing for 10 s",
                )))
            }
        }
    }
}

impl AsyncRead for Deadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}
