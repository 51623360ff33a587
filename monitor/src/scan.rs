//! The scanner: a dedicated thread (it enters other network namespaces, which
//! must never happen on a tokio worker) that walks every socket each scan
//! interval, or sooner when asked, and publishes the classified table.

use std::{
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Array, MapData};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::{
    attribution::{Attributor, pods::PodCache},
    kernel::netns::{self, WalkError, Walker},
    metrics::Metrics,
    sockets::{Classifier, Risk, SnapshotBuilder, Summary},
};

pub use crate::sockets::Snapshot;

pub struct ScannerConfig {
    pub classifier: Arc<Classifier>,
    pub pods: Arc<PodCache>,
    pub interval: Duration,
    pub proc_root: PathBuf,
    pub bind_mounts: PathBuf,
}

/// Starts the scanner thread. Send `()` on the returned channel to ask for a
/// walk now, one that looks up every socket's owner (periodic walks only
/// look up those of long-idle sockets); drop it to stop the thread. A fatal
/// error (the thread could not return to its own namespace) is sent on `fatal`.
pub fn spawn(
    link: OwnedFd,
    options: Array<MapData, u32>,
    config: ScannerConfig,
    metrics: Arc<Metrics>,
    publish: watch::Sender<Arc<Snapshot>>,
    fatal: tokio::sync::mpsc::UnboundedSender<anyhow::Error>,
) -> anyhow::Result<(mpsc::Sender<()>, thread::JoinHandle<()>)> {
    let (requests, incoming) = mpsc::channel::<()>();
    let handle = thread::Builder::new()
        .name("idlemon-scan".into())
        .spawn(move || {
            if let Err(error) = run(link, options, &config, &metrics, &publish, &incoming) {
                let _ = fatal.send(error);
            }
        })
        .context("cannot start the scanner thread")?;
    Ok((requests, handle))
}

fn run(
    link: OwnedFd,
    mut options: Array<MapData, u32>,
    config: &ScannerConfig,
    metrics: &Metrics,
    publish: &watch::Sender<Arc<Snapshot>>,
    incoming: &mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let walker = Walker::new(link).context("cannot open this thread's network namespace")?;
    let mut attributor = Attributor::new(config.proc_root.clone(), Arc::clone(&config.pods));
    let mut next = Instant::now();
    let mut expected = 0;
    loop {
        let complete = match incoming.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(()) => true,
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        // Requests that arrived during the wait are served by this one walk.
        let complete = complete | (incoming.try_iter().count() > 0);
        options
            .set(0, u32::from(complete), 0)
            .context("cannot set the walk's options")?;
        let snapshot = scan(
            &walker,
            &mut attributor,
            config,
            metrics,
            expected,
            complete,
        )?;
        expected = snapshot.sockets.len();
        // The previous table is freed here (or when its last reader is done).
        publish.send_replace(Arc::new(snapshot));
        next = Instant::now() + config.interval;
    }
}

fn scan(
    walker: &Walker,
    attributor: &mut Attributor,
    config: &ScannerConfig,
    metrics: &Metrics,
    expected: usize,
    complete: bool,
) -> anyhow::Result<Snapshot> {
    let started = Instant::now();
    let cpu_started = thread_cpu_time();
    let namespaces = netns::discover(&config.proc_root, &config.bind_mounts);
    // Room for growth, so that the table is rarely reallocated mid-walk.
    let mut builder = SnapshotBuilder::new(
        Arc::clone(&config.classifier),
        expected + expected / 8 + 64,
        complete,
    );
    for namespace in &namespaces {
        let walked = walker.walk(namespace, |record| {
            builder.add(record, |pid, cgroup_id| {
                attributor.attribute(pid, cgroup_id)
            });
        });
        match walked {
            Ok(()) => {}
            Err(WalkError::Stranded(error)) => {
                return Err(WalkError::Stranded(error).into());
            }
            Err(error @ WalkError::Gone { .. }) => {
                debug!(%error, "namespace vanished during the walk");
                metrics.scan_errors.with_label_values(&["gone"]).inc();
            }
            Err(error @ WalkError::Enter { .. }) => {
                warn!(%error, "sockets of this namespace are not tracked");
                metrics.scan_errors.with_label_values(&["enter"]).inc();
            }
            Err(error @ WalkError::Walk { .. }) => {
                warn!(%error, "sockets of this namespace are not tracked");
                metrics.scan_errors.with_label_values(&["walk"]).inc();
            }
        }
    }
    let snapshot = builder.finish(started);
    let summary = Summary::of(&snapshot);

    metrics.observe(&summary);
    metrics.namespaces.set(namespaces.len() as i64);
    metrics.scans.inc();
    metrics.scan_seconds.set(started.elapsed().as_secs_f64());
    metrics
        .scan_cpu_seconds
        .set((thread_cpu_time() - cpu_started).as_secs_f64());
    debug!(
        sockets = snapshot.sockets.len(),
        owners = snapshot.owners.len(),
        no_keepalive = summary.at_risk_total(Risk::NoKeepalive),
        keepalive_too_slow = summary.at_risk_total(Risk::KeepaliveTooSlow),
        namespaces = namespaces.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "walk done"
    );
    Ok(snapshot)
}

/// CPU time this thread has used, to report what a walk costs.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}
