//! The scanner: a dedicated thread (it enters other network namespaces, which
//! must never happen on a tokio worker) that walks every socket each scan
//! interval, or sooner when asked, and publishes the classified table.

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Array, MapData, MapError};
use monitor_common::{
    INFO_CARRIED_OVER, INFO_KNOWN, INFO_UNKNOWN, SocketInfo, SocketRecord, TCP_ESTABLISHED,
    walk_option,
};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::{
    attribution::{Attributor, pods::PodCache},
    kernel::netns::{self, WalkError, Walked, Walker},
    liveness::Liveness,
    metrics::{Metrics, WalkCost},
    sockets::{
        Classifier, OpenedBeforeStart, PreviousOwners, Risk, SnapshotBuilder, Summary, WalkMap,
    },
};

pub use crate::sockets::Snapshot;

pub struct ScannerConfig {
    pub classifier: Arc<Classifier>,
    pub liveness: Arc<Liveness>,
    pub pods: Arc<PodCache>,
    pub interval: Duration,
    /// Whether periodic scans may walk every open file (`--socket-walk auto`).
    pub by_files: bool,
    pub proc_root: PathBuf,
    pub bind_mounts: PathBuf,
    /// idlemon_destination_established_connections is exported
    /// (`--destination-labels`): the kernel marks active opens, and the first
    /// scan classifies the connections older than idlemon.
    pub count_opened: bool,
}

/// Starts the scanner thread. Send `()` on the returned channel to ask for a
/// walk now, one that looks up every socket's owner (periodic walks only
/// look up those of long-idle sockets); drop it to stop the thread. A fatal
/// error (the thread could not return to its own namespace) is sent on `fatal`.
pub fn spawn(
    link: OwnedFd,
    maps: WalkMaps,
    config: ScannerConfig,
    metrics: Arc<Metrics>,
    publish: watch::Sender<Arc<Snapshot>>,
    fatal: tokio::sync::mpsc::UnboundedSender<anyhow::Error>,
) -> anyhow::Result<(mpsc::Sender<()>, thread::JoinHandle<()>)> {
    let (requests, incoming) = mpsc::channel::<()>();
    let handle = thread::Builder::new()
        .name("idlemon-scan".into())
        .spawn(move || {
            if let Err(error) = run(link, maps, &config, &metrics, &publish, &incoming) {
                let _ = fatal.send(error);
            }
        })
        .context("cannot start the scanner thread")?;
    Ok((requests, handle))
}

/// The maps the scanner uses besides the iterator.
pub struct WalkMaps {
    /// `WALK_OPTIONS`, slots `walk_option::*`.
    pub options: Array<MapData, u32>,
    /// `SOCKETS`: the owner of a socket the walk left to user space when the
    /// previous walk did not list it after all.
    pub sockets: aya::maps::HashMap<MapData, u64, SocketInfo>,
    /// The walk by file descriptor (`iter/task_file`), if the kernel took it.
    pub files_link: Option<OwnedFd>,
}

/// What the scanner keeps from one walk to the next.
struct WalkState {
    attributor: Attributor,
    /// The start (jiffies, from the walk program) of the last successful walk
    /// of each network namespace (by inode): the previous snapshot holds the
    /// owner of every socket that was idle past the threshold then.
    owners_known_since: HashMap<u64, u32>,
    /// Sockets in the last walk.
    expected: usize,
    /// Whether the log has said that walks of namespaces sharing the host's
    /// table make most of a scan's cost (said once).
    told_shared_tables: bool,
    /// Connections older than idlemon that it takes for active opens (see
    /// `OpenedBeforeStart`); None until the first scan has classified them.
    opened_before_start: Option<OpenedBeforeStart>,
}

/// Namespaces with sockets from which a periodic scan walks every open file
/// once instead of each namespace by iter/tcp: with one, iter/tcp's single
/// pass over the table costs about what the walk of every file does (200,000
/// sockets: 250 ms either way); each more namespace adds a pass.
const FILE_WALK_NAMESPACES: usize = 2;

/// The least time between two walks for /sockets. However many callers ask,
/// and however often, they share walks spaced by this or by as long as the
/// last such walk took, whichever is longer: a loop of requests costs at
/// most half a core, and only while it lasts.
pub const API_WALK_GAP: Duration = Duration::from_secs(1);

/// Walks of namespaces that share the host's TCP table per scan from which
/// the log suggests giving them their own: on a host of 262,144 buckets,
/// each costs about 2.5 ms of CPU even when it finds one socket.
const SHARED_TABLE_WALKS_TO_TELL: usize = 8;

fn run(
    link: OwnedFd,
    mut maps: WalkMaps,
    config: &ScannerConfig,
    metrics: &Metrics,
    publish: &watch::Sender<Arc<Snapshot>>,
    incoming: &mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let walker = Walker::new(link).context("cannot open this thread's network namespace")?;
    let mut state = WalkState {
        attributor: Attributor::new(config.proc_root.clone(), Arc::clone(&config.pods)),
        owners_known_since: HashMap::new(),
        expected: 0,
        told_shared_tables: false,
        opened_before_start: None,
    };
    let mut next = Instant::now();
    // When the next walk for /sockets may start, and whether one is asked for.
    let mut next_complete = Instant::now();
    let mut asked = false;
    loop {
        let wake = if asked { next.min(next_complete) } else { next };
        match incoming.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(()) => asked = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        // Requests that arrived meanwhile are served by the same walk.
        asked |= incoming.try_iter().count() > 0;
        let now = Instant::now();
        let complete = asked && now >= next_complete;
        if !complete && now < next {
            // Asked too soon after the last walk for /sockets: callers wait
            // for the next one, and more of them share it.
            continue;
        }
        let previous = Arc::clone(&publish.borrow());
        let snapshot = scan(
            &walker, &mut maps, &mut state, config, metrics, previous, complete,
        )?;
        state.expected = snapshot.sockets.len();
        // The previous table is freed here (or when its last reader is done).
        publish.send_replace(Arc::new(snapshot));
        config.liveness.walked();
        if complete {
            asked = false;
            metrics.api_walks.inc();
            next_complete = Instant::now() + now.elapsed().max(API_WALK_GAP);
        }
        next = Instant::now() + config.interval;
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

fn scan(
    walker: &Walker,
    maps: &mut WalkMaps,
    state: &mut WalkState,
    config: &ScannerConfig,
    metrics: &Metrics,
    previous: Arc<Snapshot>,
    complete: bool,
) -> anyhow::Result<Snapshot> {
    let started = Instant::now();
    let cpu_started = thread_cpu_time();
    let (namespaces, odd_entries) = netns::discover(&config.proc_root, &config.bind_mounts);
    if odd_entries > 0 {
        metrics
            .scan_errors
            .with_label_values(&["not_a_namespace"])
            .inc_by(odd_entries as u64);
    }
    // Room for growth, so that the table is rarely reallocated mid-walk.
    let capacity = state.expected + state.expected / 8 + 64;
    let new_builder = || SnapshotBuilder::new(Arc::clone(&config.classifier), capacity, complete);
    let mut builder = new_builder();
    let mut previous = PreviousOwners::new(previous);
    let (mut carried, mut looked_up) = (0usize, 0usize);
    let (mut namespace_walks, mut shared_tables) = (0usize, 0usize);

    // Which namespaces have sockets, and how many (`CurrEstab`).
    let mut with_sockets: Vec<(&netns::Namespace, Option<u64>)> = Vec::new();
    for namespace in &namespaces {
        match walker.established(namespace) {
            Ok(Some(0)) => {}
            Ok(count) => with_sockets.push((namespace, count)),
            Err(error) => report(error, metrics)?,
        }
    }
    // Where several namespaces have sockets, a periodic scan walks every
    // open file once for all of them, counting the sockets it finds in
    // each; a namespace whose own count differs (a socket no process holds,
    // or held twice) is walked by iter/tcp below. A walk for /sockets walks
    // every namespace by iter/tcp, which misses nothing.
    let files = match maps.files_link.as_ref() {
        Some(link)
            if config.by_files && !complete && with_sockets.len() >= FILE_WALK_NAMESPACES =>
        {
            let mut held: WalkMap<u32, u64> = WalkMap::default();
            let mut found: Vec<(u64, u32)> = Vec::with_capacity(capacity);
            let walked = walker.walk_files(link, |record| {
                found.push((record.sock, record.netns));
                *held.entry(record.netns).or_default() += 1;
                if record.state == TCP_ESTABLISHED {
                    builder.add(record, |pid, cgroup_id| {
                        state.attributor.attribute(pid, cgroup_id)
                    });
                }
            });
            match walked {
                Ok(()) => {
                    // A socket that several processes (or fds) hold came once
                    // per holder: its namespace is walked by iter/tcp instead.
                    found.sort_unstable();
                    for pair in found.windows(2) {
                        if pair[0].0 == pair[1].0 {
                            held.insert(pair[0].1, u64::MAX);
                        }
                    }
                    Some(held)
                }
                Err(error) => {
                    warn!(%error, "cannot walk open files; this scan walks every namespace by iter/tcp");
                    metrics.scan_errors.with_label_values(&["files"]).inc();
                    builder = new_builder();
                    None
                }
            }
        }
        _ => None,
    };

    // Only namespaces this walk finishes keep a stamp for the next one.
    let mut known_before = std::mem::take(&mut state.owners_known_since);
    for (namespace, count) in with_sockets {
        let inode = namespace.inode as u32;
        if let Some(held) = &files {
            if count.is_some() && held.get(&inode) == count.as_ref() {
                continue;
            }
            builder.drop_namespace(inode);
        }
        // The previous snapshot has the owner of every socket that was idle
        // past the threshold, whichever walk found it.
        let known_since = known_before.remove(&namespace.inode);
        set_options(&mut maps.options, complete, known_since)?;
        let walked = walker.walk(namespace, |record| {
            if record.info_known == INFO_CARRIED_OVER {
                carried += 1;
                match previous.owner_of(record.sock) {
                    Some((tgid, cgroup)) => {
                        record.info.owner_tgid = tgid;
                        record.info.owner_cgroup = cgroup;
                        record.info_known = INFO_KNOWN;
                    }
                    None => {
                        looked_up += 1;
                        look_up_owner(&maps.sockets, record);
                    }
                }
            }
            builder.add(record, |pid, cgroup_id| {
                state.attributor.attribute(pid, cgroup_id)
            });
        });
        match walked {
            Ok(walked) => {
                namespace_walks += 1;
                shared_tables += usize::from(walked == Walked::SharedTable);
                if maps.options.get(&walk_option::STARTED, 0).unwrap_or(0) != 0 {
                    let started_at = maps.options.get(&walk_option::STARTED_AT, 0)?;
                    state.owners_known_since.insert(namespace.inode, started_at);
                }
            }
            Err(error) => report(error, metrics)?,
        }
    }
    let snapshot = builder.finish(started);
    let mut summary = Summary::of(&snapshot);
    if config.count_opened {
        let opened = state.opened_before_start.get_or_insert_with(|| {
            // Once, at the first scan: a read of /proc/net/tcp and tcp6 in
            // each namespace with a socket the kernel did not mark (on a host
            // of 40,000 sockets about 100 ms of CPU per namespace).
            let unmarked: std::collections::HashSet<u32> = snapshot
                .sockets
                .iter()
                .filter(|socket| !socket.opened_here)
                .map(|socket| socket.netns())
                .collect();
            let listening = namespaces
                .iter()
                .filter(|namespace| unmarked.contains(&(namespace.inode as u32)))
                .filter_map(|namespace| {
                    let ports = walker.listening_ports(namespace).ok()?;
                    Some((namespace.inode as u32, ports))
                })
                .collect();
            OpenedBeforeStart::classify(&snapshot, &listening)
        });
        opened.count(&snapshot, &mut summary);
    }

    let (wall, cpu) = (
        started.elapsed().as_secs_f64(),
        (thread_cpu_time() - cpu_started).as_secs_f64(),
    );
    metrics.publish_walk(
        &summary,
        WalkCost {
            namespaces: namespaces.len(),
            namespace_walks,
            shared_table_walks: shared_tables,
            wall_seconds: wall,
            cpu_seconds: cpu,
            finished_at: unix_now(),
        },
    );
    if shared_tables >= SHARED_TABLE_WALKS_TO_TELL && !state.told_shared_tables {
        state.told_shared_tables = true;
        warn!(
            namespaces = shared_tables,
            "each scan walks the host's whole TCP connection table once for every network namespace with sockets that shares it, which is most of its CPU (idlemon_walk_cpu_seconds_total); setting net.ipv4.tcp_child_ehash_entries (Linux 6.1+, e.g. to 1024) before pods start gives each new namespace a table of its own"
        );
    }
    debug!(
        sockets = snapshot.sockets.len(),
        owners = snapshot.owners.len(),
        files_walked = files.is_some(),
        namespace_walks,
        owners_carried_over = carried,
        owners_looked_up_again = looked_up,
        shared_table_walks = shared_tables,
        no_keepalive = summary.at_risk_total(Risk::NoKeepalive),
        keepalive_too_slow = summary.at_risk_total(Risk::KeepaliveTooSlow),
        namespaces = namespaces.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "walk done"
    );
    Ok(snapshot)
}

/// Logs and counts why a namespace was not walked; only a thread stranded
/// outside its own namespace stops the scanner.
fn report(error: WalkError, metrics: &Metrics) -> anyhow::Result<()> {
    match error {
        WalkError::Stranded(error) => return Err(WalkError::Stranded(error).into()),
        error @ WalkError::Gone { .. } => {
            debug!(%error, "namespace vanished during the walk");
            metrics.scan_errors.with_label_values(&["gone"]).inc();
        }
        error @ WalkError::Enter { .. } => {
            warn!(%error, "sockets of this namespace are not tracked");
            metrics.scan_errors.with_label_values(&["enter"]).inc();
        }
        error @ WalkError::NotANamespace { .. } => {
            debug!(%error, "skipped");
            metrics
                .scan_errors
                .with_label_values(&["not_a_namespace"])
                .inc();
        }
        error @ WalkError::Walk { .. } => {
            warn!(%error, "sockets of this namespace are not tracked");
            metrics.scan_errors.with_label_values(&["walk"]).inc();
        }
    }
    Ok(())
}

/// The options of one namespace's walk (`walk_option::*`).
fn set_options(
    options: &mut Array<MapData, u32>,
    complete: bool,
    owners_known_since: Option<u32>,
) -> anyhow::Result<()> {
    for (slot, value) in [
        (walk_option::COMPLETE, u32::from(complete)),
        (
            walk_option::OWNERS_KNOWN,
            u32::from(owners_known_since.is_some()),
        ),
        (
            walk_option::OWNERS_KNOWN_SINCE,
            owners_known_since.unwrap_or(0),
        ),
        (walk_option::STARTED, 0),
    ] {
        options
            .set(slot, value, 0)
            .context("cannot set the walk's options")?;
    }
    Ok(())
}

/// The owner of a socket the walk left to user space that the previous walk
/// did not list after all (it is never so in steady state): read from
/// `SOCKETS` directly, one system call.
fn look_up_owner(
    sockets: &aya::maps::HashMap<MapData, u64, SocketInfo>,
    record: &mut SocketRecord,
) {
    match sockets.get(&record.sock, 0) {
        Ok(info) => {
            record.info = info;
            record.info_known = INFO_KNOWN;
        }
        Err(error) => {
            if !matches!(error, MapError::KeyNotFound) {
                debug!(%error, "cannot read a socket's owner");
            }
            record.info = SocketInfo::default();
            record.info_known = INFO_UNKNOWN;
        }
    }
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
