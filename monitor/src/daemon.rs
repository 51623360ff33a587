//! The daemon: validate everything, load and attach, serve, and on SIGINT or
//! SIGTERM shut down with every program detached.

use std::{
    num::NonZeroU32,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf, Ebpf, Endianness,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::links::FdLink,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    attribution::{
        Attributor,
        pods::{self, ApiConfig, PodCache, WatchMetrics},
    },
    cli::DaemonArgs,
    config::{EnforceMode, IdleTimeout, PathConfig},
    enforce,
    eventlog::EventLog,
    events::{Explainer, History},
    http::{self, Refusals},
    kernel::{self, btf::KernelBtf, layout},
    liveness::Liveness,
    logging::KernelLog,
    metrics::{KernelMaps, LabelLimits, Metrics},
    probes::{self, LoadSettings},
    scan::{self, ScannerConfig, Snapshot},
    sockets::Classifier,
    stream::{self, Sinks},
};

/// Runs the daemon until SIGINT, SIGTERM or a fatal error in a task.
pub async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let checked = validate(&args).await?;
    let loaded = load(&args, &checked)?;
    let (shutdown, stopping) = watch::channel(false);
    let mut running = spawn(&args, checked, loaded, stopping)?;
    let outcome = wait(&args, &mut running).await;
    shut_down(running, &shutdown).await;
    outcome
}

/// What `validate` checked and opened: everything a user can get wrong,
/// before anything loads.
struct Checked {
    paths: PathConfig,
    idle_timeout: NonZeroU32,
    event_log: EventLog,
    kube_api: Option<ApiConfig>,
    listener: tokio::net::TcpListener,
    api_listener: tokio::net::TcpListener,
}

async fn validate(args: &DaemonArgs) -> anyhow::Result<Checked> {
    let paths = match &args.config {
        Some(path) => PathConfig::from_file(path)?,
        None => PathConfig::default(),
    };
    let idle_timeout = whole_seconds(args.idle_timeout.as_secs_f64(), "--idle-timeout")?;
    let event_log = EventLog::open(
        &args.event_log,
        args.event_log_max_bytes,
        args.event_log_keep,
    )?;
    let kube_api = match &args.node_name {
        Some(node) => ApiConfig::discover(
            node,
            args.kube_api.as_deref(),
            args.kube_token_file.as_deref(),
            args.kube_watch_timeout,
        )
        .context("cannot set up the Kubernetes pod watch")?,
        None => None,
    };
    if !args.proc_root.join("self").exists() && !args.proc_root.join("1").exists() {
        bail!("--proc-root {} is not a procfs", args.proc_root.display());
    }
    if args.api_listen == args.listen {
        bail!(
            "--api-listen and --listen are both {}: the connection data must not be served where \
             metrics are scraped",
            args.listen
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let api_listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--api-listen)", args.api_listen))?;
    Ok(Checked {
        paths,
        idle_timeout,
        event_log,
        kube_api,
        listener,
        api_listener,
    })
}

/// The kernel side, loaded and attached.
struct Loaded {
    programs: probes::Loaded,
    /// Kernel ticks per second (CONFIG_HZ).
    hz: u32,
    /// Keepalive enforcement as the config asked for it (SIGHUP compares).
    enforce_plan: enforce::Plan,
    /// Keepalive enforcement's links, while it runs.
    enforcer: Option<enforce::Enforcer>,
    /// The pod watch's cache, shared by enforcement's selectors, the
    /// attribution and the scanner.
    pods: Arc<PodCache>,
}

/// Resolves the kernel's layout from its BTF, loads and attaches the
/// programs, and keepalive enforcement when asked for.
fn load(args: &DaemonArgs, checked: &Checked) -> anyhow::Result<Loaded> {
    raise_memlock_limit();
    raise_open_files_limit();
    map_large_buffers();
    let hz = kernel::jiffies_per_second().context("cannot determine the kernel tick rate")?;
    let enforce_plan = enforce::Plan::new(
        args.enforce_keepalive,
        &checked.paths,
        checked.idle_timeout,
        hz,
    )
    .context("invalid keepalive enforcement settings ([enforce] in --config)")?;
    let btf_path = args
        .kernel_btf
        .clone()
        .unwrap_or_else(|| PathBuf::from(KernelBtf::VMLINUX));
    let kernel_btf = match &args.kernel_btf {
        Some(path) => KernelBtf::from_file(path),
        None => KernelBtf::from_sys_fs(),
    }
    .with_context(|| {
        format!(
            "idlemon needs the kernel's BTF (CONFIG_DEBUG_INFO_BTF) at {}; on a kernel without it, \
             pass a BTF file for this exact kernel with --kernel-btf",
            btf_path.display()
        )
    })?;
    let layout = layout::resolve(&kernel_btf)?;
    tracing::debug!(
        ?layout,
        socks = ?kernel_btf.structs_named("sock"),
        "kernel layout resolved from BTF"
    );
    let btf = Btf::parse_file(&btf_path, Endianness::default())
        .with_context(|| format!("cannot read kernel BTF {} for aya", btf_path.display()))?;
    let threshold_jiffies =
        (args.idle_threshold.as_secs_f64() * f64::from(hz)).min(f64::from(u32::MAX / 2));
    let mut programs = probes::load(
        &LoadSettings {
            layout,
            idle_threshold_jiffies: threshold_jiffies as u32,
            max_sockets: args.max_sockets,
            count_opened: args.destination_labels > 0,
            disabled: args.disable_attach.clone(),
            enforce: enforce_plan.settings,
        },
        &btf,
        &kernel_btf,
    )?;
    info!(
        hz,
        listen = %args.listen,
        api_listen = %args.api_listen,
        path_rules = checked.paths.rules(),
        "programs loaded"
    );
    let pods = Arc::new(PodCache::default());
    let mut enforcer = None;
    if enforce_plan.mode != EnforceMode::Off {
        let (statuses, started) = enforce::Enforcer::start(
            &mut programs.ebpf,
            &enforce_plan,
            &args.disable_attach,
            &btf,
            &args.proc_root,
            checked.kube_api.is_some().then_some(&*pods),
        );
        programs.hooks.extend(statuses);
        enforcer = started;
    }
    drop((btf, kernel_btf));
    // Parsing the kernel's BTF and loading took tens of MB that are free now.
    // SAFETY: only asks malloc to return free memory to the system.
    unsafe { libc::malloc_trim(0) };
    Ok(Loaded {
        programs,
        hz,
        enforce_plan,
        enforcer,
        pods,
    })
}

/// What keeps the programs attached, in the order it is dropped: the
/// iterators' links, then the object with every other link.
struct Attached {
    #[expect(
        dead_code,
        reason = "never read: held until shutdown, where dropping it detaches the walk"
    )]
    walk_link: FdLink,
    #[expect(
        dead_code,
        reason = "never read: held until shutdown, where dropping it detaches the walk"
    )]
    files_link: Option<FdLink>,
    /// Every other program's links; keepalive enforcement attaches and
    /// detaches its cgroup links through it while running.
    ebpf: Ebpf,
}

/// The tasks and threads that run until shutdown, each selecting on the
/// one shutdown signal (the scanner, a thread, stops when its last request
/// sender is gone).
struct Running {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    /// Dropped last.
    attached: Attached,
    scanner: std::thread::JoinHandle<()>,
    rescan: std::sync::mpsc::Sender<()>,
    ready: Arc<AtomicBool>,
    /// Errors that end the daemon (the scanner stranded outside its namespace).
    fatal: tokio::sync::mpsc::UnboundedReceiver<anyhow::Error>,
    metrics: Arc<Metrics>,
    /// What SIGHUP needs to read the config again.
    hz: u32,
    idle_timeout: NonZeroU32,
    enforce_plan: enforce::Plan,
    /// Keepalive enforcement, kept in step with the pod watch, the cgroups
    /// that appear and SIGHUP by `wait`.
    enforcer: Option<enforce::Enforcer>,
    pods: Arc<PodCache>,
    pod_changes: watch::Receiver<u64>,
}

/// Starts the pod watch, the event reader, the scanner, the HTTP servers,
/// the kernel log and the readiness watch.
fn spawn(
    args: &DaemonArgs,
    checked: Checked,
    loaded: Loaded,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<Running> {
    let probes::Loaded {
        mut ebpf,
        hooks,
        walk_link,
        walk_options,
        sockets,
        files_link,
    } = loaded.programs;
    let metrics = Arc::new(Metrics::new(
        args.idle_threshold.as_secs_f64(),
        f64::from(checked.idle_timeout.get()),
        &hooks,
        LabelLimits {
            table_capacity: args.max_sockets,
            owners: args.max_attribution_series,
            destinations: args.destination_labels as usize,
            owner_labels: crate::metrics::OwnerLabels::of(&args.owner_labels),
        },
    )?);
    if loaded.enforce_plan.mode != EnforceMode::Off {
        metrics.enable_enforcement(loaded.enforce_plan.mode.as_str());
    }
    if let Some(enforcer) = &loaded.enforcer {
        metrics
            .enforced_cgroups
            .set(enforcer.attached().count() as i64);
    }
    let node = crate::events::node_name(args.node_name.as_deref());
    metrics.node_info(&node, &crate::metrics::kernel_release());
    let pods = loaded.pods;
    let pod_changes = pods.changes();
    if let Some(api) = checked.kube_api {
        pods::spawn_watch(
            api,
            Arc::clone(&pods),
            WatchMetrics {
                pods: metrics.kubernetes_pods.clone(),
                errors: metrics.kubernetes_watch_errors.clone(),
            },
        )?;
    }
    let counters: PerCpuArray<MapData, u64> = ebpf
        .take_map("COUNTERS")
        .ok_or_else(|| anyhow!("map COUNTERS missing from the eBPF object"))?
        .try_into()
        .context("map COUNTERS is not a per-CPU array")?;
    let connects = ebpf
        .take_map("CONNECTS")
        .and_then(|map| aya::maps::HashMap::try_from(map).ok());
    metrics.read_kernel(KernelMaps {
        counters: Mutex::new(counters),
        connects: Mutex::new(connects),
    });
    let kernel_log = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLog) {
        Ok(logger) => Some(logger),
        Err(error) => {
            warn!(%error, "kernel-side log messages are not forwarded");
            None
        }
    };

    let (fatal_tx, fatal) = tokio::sync::mpsc::unbounded_channel();
    let walk_link_fd = own_link_fd(&walk_link, "the socket walk")?;
    metrics
        .file_walk_available
        .set(i64::from(files_link.is_some()));
    let files_link_fd = files_link
        .as_ref()
        .map(|link| own_link_fd(link, "the walk by file descriptor"))
        .transpose()?;
    let attached = |name: &str| {
        hooks
            .iter()
            .any(|hook| hook.hook == name && hook.kind.is_some())
    };
    let keepalive_timer_seen = attached("keepalive");
    let classifier = Arc::new(Classifier {
        hz: loaded.hz,
        idle_threshold: args.idle_threshold,
        default_timeout: IdleTimeout::After(checked.idle_timeout),
        paths: checked.paths,
        keepalive_timer_seen,
        weakened: Default::default(),
    });
    let (snapshots_tx, snapshots) =
        watch::channel(Arc::new(Snapshot::empty(Arc::clone(&classifier))));
    let history = Arc::new(History::new(args.event_history as usize));
    let liveness = Arc::new(Liveness::new(args.scan_interval, args.stall_intervals));
    let ring: RingBuf<MapData> = ebpf
        .take_map("EVENTS")
        .ok_or_else(|| anyhow!("map EVENTS missing from the eBPF object"))?
        .try_into()
        .context("map EVENTS is not a ring buffer")?;
    let mut explainer = Explainer::new(Arc::clone(&classifier)).on_node(&node);
    if !attached("send") {
        explainer = explainer.send_hook_missing();
    }
    let mut tasks = vec![(
        "event reader",
        stream::spawn(
            ring,
            explainer,
            Sinks {
                attributor: Attributor::new(args.proc_root.clone(), Arc::clone(&pods)),
                history: Arc::clone(&history),
                log: checked.event_log,
                metrics: Arc::clone(&metrics),
                liveness: Arc::clone(&liveness),
            },
            stopping.clone(),
        )?,
    )];
    let (rescan, scanner) = scan::spawn(
        walk_link_fd,
        scan::WalkMaps {
            options: walk_options,
            sockets,
            files_link: files_link_fd,
        },
        ScannerConfig {
            classifier,
            liveness: Arc::clone(&liveness),
            pods: Arc::clone(&pods),
            interval: args.scan_interval,
            by_files: args.socket_walk == crate::cli::SocketWalk::Auto,
            proc_root: args.proc_root.clone(),
            bind_mounts: PathBuf::from("/run/netns"),
            count_opened: args.destination_labels > 0,
        },
        Arc::clone(&metrics),
        snapshots_tx,
        fatal_tx,
    )?;

    let ready = Arc::new(AtomicBool::new(false));
    let degraded: Vec<String> = hooks
        .iter()
        .filter(|hook| hook.degraded)
        .map(|hook| format!("{} hook missing: {}", hook.hook, hook.lost.unwrap_or("")))
        .collect();
    let state = http::AppState {
        metrics: Arc::clone(&metrics),
        snapshots: snapshots.clone(),
        rescan: rescan.clone(),
        ready: Arc::clone(&ready),
        degraded: degraded.clone(),
        enforcement_without: hooks
            .iter()
            .filter(|hook| {
                hook.hook.starts_with("enforce") && hook.kind.is_none() && !hook.degraded
            })
            .map(|hook| format!("{} ({})", hook.hook, hook.lost.unwrap_or("")))
            .collect(),
        history,
        liveness,
        long_polls: Arc::new(Semaphore::new(http::LONG_POLLS_MAX)),
    };
    for (listener, name, router) in [
        (
            checked.listener,
            "metrics",
            http::metrics_router as fn(_, _) -> _,
        ),
        (checked.api_listener, "api", http::api_router),
    ] {
        let refusals = Refusals::new(name, metrics.http_refusals.clone());
        let router = router(state.clone(), refusals.clone());
        tasks.push((
            "HTTP server",
            tokio::spawn(http::serve(listener, router, refusals, stopping.clone())),
        ));
    }
    // The routers hold the state now; its rescan sender must go with them,
    // or the scanner would wait for requests forever at shutdown.
    drop(state);
    if let Some(logger) = kernel_log {
        tasks.push(("kernel log", forward_kernel_log(logger, stopping.clone())));
    }
    tasks.push((
        "readiness",
        watch_first_walk(
            snapshots,
            degraded,
            Arc::clone(&ready),
            Arc::clone(&metrics),
            stopping,
        ),
    ));
    Ok(Running {
        tasks,
        attached: Attached {
            walk_link,
            files_link,
            ebpf,
        },
        scanner,
        rescan,
        ready,
        fatal,
        metrics: Arc::clone(&metrics),
        hz: loaded.hz,
        idle_timeout: checked.idle_timeout,
        enforce_plan: loaded.enforce_plan,
        enforcer: loaded.enforcer,
        pods,
        pod_changes,
    })
}

/// Until SIGINT, SIGTERM (Ok) or a fatal error in a task (Err). Meanwhile
/// SIGHUP reads the config again, and keepalive enforcement's links follow
/// its selection as pods change and selected cgroups appear.
async fn wait(args: &DaemonArgs, running: &mut Running) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    // Pod cgroups appear after the pod does, and units start later:
    // the selection is looked at again now and then, not only on changes.
    let mut resync = tokio::time::interval(ENFORCE_RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let enforcing = running.enforcer.is_some();
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: shutting down"); return Ok(()) }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); return Ok(()) }
            Some(error) = running.fatal.recv() => return Err(error),
            _ = sighup.recv() => reload(
                args,
                running.idle_timeout,
                running.hz,
                &running.enforce_plan,
                running.enforcer.as_mut(),
                &running.metrics,
            ),
            Ok(()) = running.pod_changes.changed(), if enforcing => {}
            _ = resync.tick(), if enforcing => {}
        }
        // Every wakeup but the shutdown ones brings the links in step.
        if let Some(enforcer) = running.enforcer.as_mut() {
            enforcer.sync(&mut running.attached.ebpf, &running.pods);
            running
                .metrics
                .enforced_cgroups
                .set(enforcer.attached().count() as i64);
        }
    }
}

/// Stops every task and the scanner, then detaches the programs: the
/// `Ebpf` object goes last, once nothing uses its maps.
async fn shut_down(running: Running, shutdown: &watch::Sender<bool>) {
    running.ready.store(false, Ordering::Relaxed);
    let _ = shutdown.send(true);
    drop(running.rescan);
    for (what, task) in running.tasks {
        if let Err(error) = task.await {
            warn!(%error, task = what, "task failed");
        }
    }
    // The scanner exits once every rescan sender is gone (the router held one).
    let scanner = running.scanner;
    let _ = tokio::task::spawn_blocking(move || scanner.join()).await;
    // The walk's options map went with the scanner; the links and the
    // object detach every program.
    drop(running.attached);
    info!("all programs detached");
}

/// Forwards the kernel programs' log messages (aya-log) until shutdown.
fn forward_kernel_log(
    logger: aya_log::EbpfLogger<KernelLog>,
    mut stopping: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd, which stays open
        // and unchanged until the logger is dropped with the AsyncFd.
        let Ok(mut logger) =
            (unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) })
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => return,
                guard = logger.readable_mut() => match guard {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(_) => return,
                },
            }
        }
    })
}

/// Ready once the first walk is published, unless a hook whose data the
/// product relies on is missing (then /readyz says which).
fn watch_first_walk(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    degraded: Vec<String>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    mut stopping: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => {}
            _ = snapshots.wait_for(|snapshot| snapshot.taken.is_some()) => {
                if degraded.is_empty() {
                    ready.store(true, Ordering::Relaxed);
                    metrics.ready.set(1);
                    info!("ready: first walk done");
                } else {
                    warn!(hooks = ?degraded, "first walk done, but degraded: not ready");
                }
            }
        }
    })
}

/// How often keepalive enforcement looks for selected cgroups that
/// appeared (or went) without a pod change: a pod's cgroup is made after
/// the API server has the pod.
const ENFORCE_RESYNC: std::time::Duration = std::time::Duration::from_secs(5);

/// SIGHUP: reads `--config` again. A valid file's enforcement selection
/// (cgroups, units, namespaces, pod labels) applies at once, and the
/// existing connections of what it newly selects are fixed by the next
/// sync; the rest of the file takes a restart (said in the log). An invalid
/// file changes nothing: the error is logged and counted.
fn reload(
    args: &DaemonArgs,
    idle_timeout: NonZeroU32,
    hz: u32,
    running: &enforce::Plan,
    enforcer: Option<&mut enforce::Enforcer>,
    metrics: &Metrics,
) {
    let Some(path) = &args.config else {
        info!("SIGHUP: no --config file to read again");
        return;
    };
    let plan = PathConfig::from_file(path)
        .map_err(anyhow::Error::from)
        .and_then(|paths| {
            enforce::Plan::new(args.enforce_keepalive, &paths, idle_timeout, hz)
                .context("invalid keepalive enforcement settings ([enforce])")
        });
    let plan = match plan {
        Ok(plan) => plan,
        Err(error) => {
            metrics.config_reloads.with_label_values(&["invalid"]).inc();
            warn!(
                config = %path.display(),
                error = %format!("{error:#}"),
                "SIGHUP: the config file is invalid; the running config stays"
            );
            return;
        }
    };
    metrics.config_reloads.with_label_values(&["ok"]).inc();
    let unchanged_otherwise = plan.mode == running.mode
        && plan.settings == running.settings
        && plan.paths == running.paths
        && plan.cgroup_root == running.cgroup_root;
    if !unchanged_otherwise {
        warn!(
            config = %path.display(),
            "SIGHUP: only the [enforce] selection (cgroups, units, namespaces, pod_labels) \
             applies without a restart; the other changes take one"
        );
    }
    match enforcer {
        Some(enforcer) => {
            let changed = enforcer.reselect(plan.selection);
            info!(config = %path.display(), selection_changed = changed, "SIGHUP: config read again");
        }
        None => info!(
            config = %path.display(),
            "SIGHUP: config read again; keepalive enforcement is not running"
        ),
    }
}

/// Each HTTP connection and each network namespace walked costs a file
/// descriptor; the soft limit (often 1024) is raised to the hard one.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid resource and pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn whole_seconds(seconds: f64, flag: &str) -> anyhow::Result<NonZeroU32> {
    if seconds.fract() != 0.0 {
        bail!("{flag} must be a whole number of seconds, got {seconds}");
    }
    NonZeroU32::new(seconds as u32).ok_or_else(|| anyhow!("{flag} must be positive"))
}

/// A walk's socket table (20 MB for 200,000 sockets) is replaced every scan.
/// Left to itself, malloc keeps such freed blocks in its heap once it has
/// seen one; a fixed threshold maps every block over 1 MiB on its own and
/// unmaps it when freed, so resident memory follows the live table.
fn map_large_buffers() {
    // SAFETY: only sets an allocator parameter.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) } != 1 {
        tracing::debug!("malloc refused M_MMAP_THRESHOLD; memory may stay high after a peak");
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the
/// memory cgroup. Raising it may be refused (no CAP_SYS_RESOURCE), which only
/// matters on old kernels, so a refusal is not fatal.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid resource and pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK; fine on kernels 5.11+"
        );
    }
}

/// A file descriptor of the scanner thread's own for an iterator's link
/// (aya keeps the link object).
fn own_link_fd(link: &aya::programs::links::FdLink, what: &str) -> anyhow::Result<OwnedFd> {
    let id = link
        .info()
        .with_context(|| format!("cannot inspect {what}'s link"))?
        .id();
    kernel::link_fd_by_id(id).with_context(|| format!("cannot open {what}'s link"))
}
