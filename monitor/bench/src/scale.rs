//! Part 2: 100,000 established idle loopback connections (200,000 sockets)
//! opened before idlemon starts: how long until it tracks them all, what a
//! walk costs, and what the daemon and its maps hold.

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use idlemon_testkit::process;

use super::{
    Bench, MIB,
    daemon::{Daemon, Scan},
    kernel::{self, RunTimeStats},
    netns::{self, Netns},
    noop,
    table::{Check, Summary, Table},
    traffic,
};

const SCAN_CPU_TARGET: f64 = 0.100;
/// Short, so that the walks are sampled quickly.
const SCAN_INTERVAL: Duration = Duration::from_secs(2);
/// Short, so that every socket is flagged soon after its last send, and long
/// enough that the walks right after it find none idle that long.
const IDLE_THRESHOLD: Duration = Duration::from_secs(30);
const RSS_TARGET: u64 = 64 * MIB;
const BYTES_PER_SOCKET_TARGET: f64 = 128.0;
/// Commands that read every socket of the namespace, as baselines for a walk.
const BASELINES: [&[&str]; 2] = [
    &["ss", "-tnoi", "state", "established"],
    &["cat", "/proc/net/tcp", "/proc/net/tcp6"],
];
const BASELINE_RUNS: usize = 3;
/// `iter/` targets walked with a no-op program, as baselines of the kernel's
/// own part of a walk.
const NOOP_WALKS: [(&str, &str); 2] = [
    ("tcp", "no-op iter/tcp program (the kernel's walk)"),
    (
        "task_file",
        "no-op iter/task_file program (every open file)",
    ),
];

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let connections = bench.settings.connections;
    let sockets = 2 * connections;
    let netns = netns::create("scale");
    // Room for every socket of the test plus the host's own, so that the
    // table's cost per socket is measured with the table in use, not empty.
    let max_sockets = sockets + 8192;
    println!(
        "{connections} idle loopback connections ({sockets} sockets) in network namespace {}, opened before idlemon starts; idlemon --max-sockets {max_sockets}",
        netns.name
    );
    let opening = Instant::now();
    let timeout = Duration::from_secs(60 + connections as u64 / 1000);
    let mut pool = traffic::open_pool(&netns, connections, timeout)?;
    println!(
        "  opened {} connections in {:.1} s",
        pool.connections,
        opening.elapsed().as_secs_f64()
    );

    // Loopback has no middlebox unless the config file says so.
    let config =
        std::env::temp_dir().join(format!("idlemon-bench-{}-scale.toml", std::process::id()));
    std::fs::write(
        &config,
        "[[path]]\nname = \"bench-nat\"\ncidr = \"127.0.0.0/8\"\nidle_timeout = 350\n",
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let daemon = Daemon::start(
        &bench.binary,
        &[
            "--config".to_owned(),
            config.display().to_string(),
            "--max-sockets".to_owned(),
            max_sockets.to_string(),
            "--scan-interval".to_owned(),
            SCAN_INTERVAL.as_secs().to_string(),
            "--idle-threshold".to_owned(),
            IDLE_THRESHOLD.as_secs().to_string(),
            // The walks then look every socket up in ACTIVE_OPENS
            // (idlemon_destination_established_connections): measured too.
            "--destination-labels".to_owned(),
            "10".to_owned(),
        ],
    );
    let first = daemon.and_then(|mut daemon| {
        let first = daemon
            .poll_metrics(Duration::from_secs(120), Duration::from_millis(25), |m| {
                m.value("idlemon_tracked_sockets").unwrap_or(0.0) >= sockets as f64
            })
            .context("waiting for idlemon to track every pre-existing socket")?;
        Ok((daemon, first))
    });
    // The daemon has read the file once it serves metrics.
    let _ = std::fs::remove_file(&config);
    let (mut daemon, first) = first?;
    let time_to_track = daemon.started().elapsed();
    let first_scan = (
        first.value("idlemon_scan_cpu_seconds").unwrap_or(f64::NAN),
        first
            .value("idlemon_scan_duration_seconds")
            .unwrap_or(f64::NAN),
    );
    println!(
        "  every pre-existing socket tracked {:.2} s after idlemon started (first walk: {:.1} ms CPU, {:.1} ms wall)",
        time_to_track.as_secs_f64(),
        first_scan.0 * 1e3,
        first_scan.1 * 1e3
    );

    let objects = kernel::objects_of(daemon.pid())?;
    // One send per socket puts each in the hooks' table, as on a host whose
    // pooled connections were each used once before going idle.
    let touching = Instant::now();
    pool.touch(Duration::from_secs(60))?;
    println!(
        "  sent 1 byte on each of the {sockets} sockets in {:.1} s, so that the hooks' table holds them",
        touching.elapsed().as_secs_f64()
    );
    // The walks are timed with the BPF run-time stats off: they add two clock
    // reads to every program run, 200,000 per walk. These walks find every
    // socket recently used, so they look up the owners of none.
    let recent = daemon.sample_scans(bench.settings.scan_samples, SCAN_INTERVAL)?;

    // The self-cost: the same sends and two more walks, with the stats on.
    let stats = RunTimeStats::enable()?;
    let stats_before = kernel::prog_stats(&objects.progs)?;
    pool.touch(Duration::from_secs(60))?;
    let touched = Instant::now();
    daemon.sample_scans(2, SCAN_INTERVAL)?;
    let stats_after = kernel::prog_stats(&objects.progs)?;
    let stats_how = stats.how.clone();
    drop(stats);
    let (text, _) = super::self_cost(&stats_before, &stats_after);
    println!(
        "self-cost of one more send per socket and two more walks (BPF run-time stats: {stats_how}):"
    );
    print!("{text}");

    // The case the daemon is for: every socket idle past --idle-threshold
    // without keepalive, so every walk flags, attributes and counts them all.
    let flagged_from = touched + IDLE_THRESHOLD + SCAN_INTERVAL;
    println!(
        "  waiting {:.0} s until every socket has been idle longer than --idle-threshold {}",
        flagged_from
            .saturating_duration_since(Instant::now())
            .as_secs_f64(),
        IDLE_THRESHOLD.as_secs()
    );
    std::thread::sleep(flagged_from.saturating_duration_since(Instant::now()));
    let flagged = daemon.sample_scans(bench.settings.scan_samples, SCAN_INTERVAL)?;
    let memory_use = process::memory(daemon.pid())?;
    let rss = memory_use.rss;
    let (scrapes, scrape_bytes) = time_scrapes(&mut daemon)?;
    let metrics = daemon.metrics()?;
    let tracked = metrics.value("idlemon_tracked_sockets").unwrap_or(0.0);
    let table_full = metrics
        .value("idlemon_socket_table_full_total")
        .unwrap_or(0.0);
    // The same sockets read by the tools an SRE would reach for: what any
    // full reading of 200,000 sockets costs this kernel, side by side.
    let mut baselines = BASELINES
        .iter()
        .map(|argv| Ok((argv.join(" "), baseline_cpu(&netns, argv)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // And the kernel's walks alone: a program that does nothing, over the
    // same namespace's sockets (what every iter/tcp walk costs before its
    // program does anything), and over every open file of the host (what a
    // walk by file descriptor would cost instead).
    for (target, what) in NOOP_WALKS {
        baselines.push((what.to_owned(), noop_walk_cpu(&netns, target)?));
    }
    let maps = kernel::maps(&objects.maps)?;
    let socket_map = maps
        .iter()
        .find(|map| map.name == "SOCKETS")
        .ok_or_else(|| anyhow!("idlemon holds no map named SOCKETS"))?;
    let (entries, owned) = kernel::count_entries(socket_map, std::process::id())?;

    let summary = |scans: &[Scan], of: fn(&Scan) -> f64| {
        Summary::of(&scans.iter().map(of).collect::<Vec<_>>())
    };
    let cpu = summary(&flagged, |s| s.cpu_seconds);
    let recent_cpu = summary(&recent, |s| s.cpu_seconds);
    let mut table = Table::new(&["scale", "n", "min", "median", "max"]);
    let ms = |v: f64| format!("{:.1} ms", v * 1e3);
    let count = |v: f64| format!("{v:.0}");
    for (what, scans) in [
        ("sockets recently used", &recent),
        ("every socket idle past the threshold", &flagged),
    ] {
        table.row([
            format!("walks, {what}:"),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        table.summary_row(
            "  walk + classify, thread CPU",
            summary(scans, |s| s.cpu_seconds),
            ms,
            &[],
        );
        table.summary_row(
            "  walk + classify, wall",
            summary(scans, |s| s.wall_seconds),
            ms,
            &[],
        );
        table.summary_row(
            "  tracked sockets per walk",
            summary(scans, |s| s.tracked),
            count,
            &[],
        );
        table.summary_row(
            "  flagged at risk per walk",
            summary(scans, |s| s.at_risk),
            count,
            &[],
        );
    }
    table.summary_row(
        "GET /metrics, wall (every socket flagged)",
        scrapes,
        |v| format!("{:.2} ms", v * 1e3),
        &[],
    );
    table.row([
        "  its Prometheus text".to_owned(),
        "1".to_owned(),
        String::new(),
        format!("{scrape_bytes} bytes"),
        String::new(),
    ]);
    table.row([
        "time to track every pre-existing socket".to_owned(),
        "1".to_owned(),
        String::new(),
        format!("{:.2} s", time_to_track.as_secs_f64()),
        String::new(),
    ]);
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / MIB as f64);
    table.row([
        "daemon VmRSS".to_owned(),
        "1".to_owned(),
        String::new(),
        mib(rss),
        String::new(),
    ]);
    table.row([
        "  of which RssAnon (heap), RssFile+Shmem".to_owned(),
        "1".to_owned(),
        String::new(),
        format!("{}, {}", mib(memory_use.anon), mib(memory_use.file)),
        String::new(),
    ]);
    table.row([
        "  VmHWM (peak)".to_owned(),
        "1".to_owned(),
        String::new(),
        mib(memory_use.peak),
        String::new(),
    ]);
    print!("{}", table.render());
    let per_socket =
        |cpu: Option<Summary>| cpu.map_or(f64::NAN, |s| s.median / sockets as f64 * 1e9);
    println!(
        "  walk + classify CPU per socket (medians): {:.0} ns recently used, {:.0} ns idle past the threshold",
        per_socket(recent_cpu),
        per_socket(cpu)
    );

    println!(
        "baselines: the same {sockets} sockets read by the kernel's own tools, CPU (user+system) of the whole command, output to /dev/null; and walked by a program that does nothing (thread CPU of the read, all of it the kernel's); {BASELINE_RUNS} runs each:"
    );
    let mut baseline_table = Table::new(&["baseline", "n", "min", "median", "max", "walk / it"]);
    for (what, runs) in &baselines {
        let ratio = match (cpu, runs) {
            (Some(walk), Some(runs)) => format!("{:.2}", walk.median / runs.median),
            _ => "-".to_owned(),
        };
        match runs {
            Some(runs) => baseline_table.row([
                what.clone(),
                runs.n.to_string(),
                ms(runs.min),
                ms(runs.median),
                ms(runs.max),
                ratio,
            ]),
            None => baseline_table.row([
                what.clone(),
                "0".to_owned(),
                "-".into(),
                "-".into(),
                "-".into(),
                ratio,
            ]),
        }
    }
    print!("{}", baseline_table.render());
    println!(
        "  walk / it: idlemon's walk + classify CPU (every socket idle past the threshold, median) over the tool's; below 1, idlemon reads the table for less"
    );

    let mut memory = Table::new(&[
        "BPF map",
        "type",
        "max_entries",
        "bytes_memlock",
        "per slot",
    ]);
    let mut total = 0;
    for map in &maps {
        total += map.bytes_memlock;
        memory.row([
            map.name.clone(),
            map.kind.clone(),
            map.max_entries.to_string(),
            map.bytes_memlock.to_string(),
            if map.max_entries > 1 {
                format!("{:.1}", map.bytes_memlock as f64 / map.max_entries as f64)
            } else {
                String::new()
            },
        ]);
    }
    memory.row([
        "all idlemon maps".to_owned(),
        String::new(),
        String::new(),
        total.to_string(),
        String::new(),
    ]);
    print!("{}", memory.render());
    let per_tracked = total as f64 / tracked.max(1.0);
    println!(
        "  SOCKETS holds {entries} entries ({owned} of this bench's sockets; table-full count {table_full:.0}); {tracked:.0} sockets tracked: {per_tracked:.1} bytes of BPF map memory per tracked socket (all maps), {:.1} per SOCKETS slot",
        socket_map.bytes_memlock as f64 / socket_map.max_entries.max(1) as f64
    );
    daemon.stop()?;
    let closing = Instant::now();
    drop(pool);
    println!(
        "  closed the pool in {:.1} s",
        closing.elapsed().as_secs_f64()
    );

    let label = |what: &str| format!("{what} ({sockets} sockets)");
    bench.check(Check::new(
        &label("scan CPU, median of walks flagging every socket"),
        cpu.map_or_else(|| "-".to_owned(), |s| format!("{:.1} ms", s.median * 1e3)),
        &format!("< {:.0} ms", SCAN_CPU_TARGET * 1e3),
        cpu.map(|s| s.median < SCAN_CPU_TARGET),
    ));
    bench.check(Check::new(
        &label("daemon RSS"),
        format!("{:.1} MiB", rss as f64 / MIB as f64),
        &format!("< {} MiB", RSS_TARGET / MIB),
        Some(rss < RSS_TARGET),
    ));
    bench.check(Check::new(
        &label("BPF map bytes per tracked socket"),
        format!("{per_tracked:.1} B"),
        &format!("<= {BYTES_PER_SOCKET_TARGET:.0} B"),
        Some(per_tracked <= BYTES_PER_SOCKET_TARGET),
    ));
    bench.check(Check::info(
        &label("scan CPU, median of walks of recently used sockets"),
        recent_cpu.map_or_else(|| "-".to_owned(), |s| format!("{:.1} ms", s.median * 1e3)),
    ));
    for (what, runs) in &baselines {
        if let (Some(walk), Some(runs)) = (cpu, runs) {
            let over = if what.starts_with("no-op") {
                format!("scan CPU over a {what}")
            } else {
                format!("scan CPU over `{what}` CPU, same sockets")
            };
            bench.check(Check::info(
                &label(&over),
                format!(
                    "{:.2} ({:.1} ms)",
                    walk.median / runs.median,
                    runs.median * 1e3
                ),
            ));
        }
    }
    bench.check(Check::info(
        &label("GET /metrics wall, median"),
        scrapes.map_or_else(|| "-".to_owned(), |s| format!("{:.2} ms", s.median * 1e3)),
    ));
    bench.check(Check::info(
        &label("time to track pre-existing sockets"),
        format!("{:.2} s", time_to_track.as_secs_f64()),
    ));
    Ok(())
}

/// Scrapes timed back to back once every socket is flagged.
const SCRAPES: usize = 20;

/// The wall time of `SCRAPES` scrapes of /metrics (connect, render, read;
/// what Prometheus waits for), and the size of the last one's text.
fn time_scrapes(daemon: &mut Daemon) -> anyhow::Result<(Option<Summary>, usize)> {
    let mut walls = Vec::with_capacity(SCRAPES);
    let mut bytes = 0;
    for _ in 0..SCRAPES {
        let started = Instant::now();
        bytes = daemon.metrics()?.0.len();
        walls.push(started.elapsed().as_secs_f64());
    }
    Ok((Summary::of(&walls), bytes))
}

/// Thread CPU time of a walk of `iter/{target}` by a no-op program, from a
/// thread inside `netns`, once per `BASELINE_RUNS`; None when this kernel
/// cannot load one (said so).
fn noop_walk_cpu(netns: &Netns, target: &str) -> anyhow::Result<Option<Summary>> {
    match netns.run(|| noop::walks(target, BASELINE_RUNS)) {
        Ok(runs) => Ok(Summary::of(
            &runs.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        )),
        Err(error) => {
            println!("  baseline iter/{target}: not measured: {error:#}");
            Ok(None)
        }
    }
}

/// CPU time (user + system, from wait4) of `argv` run inside `netns`, once
/// per `BASELINE_RUNS`, its output discarded; None when the tool is missing.
fn baseline_cpu(netns: &Netns, argv: &[&str]) -> anyhow::Result<Option<Summary>> {
    let mut runs = Vec::new();
    for _ in 0..BASELINE_RUNS {
        // A child forked by a thread inside the namespace starts there: no
        // `ip netns exec` of its own to count.
        let child = netns.run(|| {
            std::process::Command::new(argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
        });
        let child = match child {
            Ok(child) => child,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                println!("  baseline {}: not installed, skipped", argv[0]);
                return Ok(None);
            }
            Err(error) => return Err(error).with_context(|| format!("cannot run {}", argv[0])),
        };
        let mut status = 0;
        // SAFETY: plain out-parameters; rusage is valid when zeroed.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child, which `Child` never reaps itself.
        let waited = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
        if waited < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("waiting for {}", argv[0]));
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            bail!("{} failed (wait status {status})", argv.join(" "));
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        runs.push(seconds(usage.ru_utime) + seconds(usage.ru_stime));
    }
    Ok(Summary::of(&runs))
}
