//! Part 2: 100,000 established idle loopback connections (200,000 sockets)
//! opened before idlemon starts: how long until it tracks them all, what a
//! walk costs, and what the daemon and its maps hold.

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};

use super::{
    Bench, MIB,
    bpf::{self, RunTimeStats},
    daemon::{self, Daemon},
    netns::Netns,
    table::{Check, Summary, Table},
    traffic,
};

const SCAN_CPU_TARGET: f64 = 0.100;
const RSS_TARGET: u64 = 64 * MIB;
const BYTES_PER_SOCKET_TARGET: f64 = 128.0;

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let connections = bench.settings.connections;
    let sockets = 2 * connections;
    let netns = Netns::create("scale")?;
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

    let mut daemon = Daemon::start(
        &bench.binary,
        &["--max-sockets".to_owned(), max_sockets.to_string()],
    )?;
    let first = daemon
        .poll_metrics(Duration::from_secs(120), Duration::from_millis(25), |m| {
            m.value("idlemon_tracked_sockets").unwrap_or(0.0) >= sockets as f64
        })
        .context("waiting for idlemon to track every pre-existing socket")?;
    let time_to_track = daemon.started.elapsed();
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

    let objects = bpf::objects_of(daemon.pid())?;
    // One send per socket puts each in the hooks' table, as on a host whose
    // pooled connections were each used once before going idle.
    let touching = Instant::now();
    pool.touch(Duration::from_secs(60))?;
    println!(
        "  sent 1 byte on each of the {sockets} sockets in {:.1} s, so that the hooks' table holds them",
        touching.elapsed().as_secs_f64()
    );
    // The walks are timed with the BPF run-time stats off: they add two clock
    // reads to every program run, 200,000 per walk.
    let scans = daemon.sample_scans(bench.settings.scan_samples, bench.settings.scan_interval)?;
    let memory_use = daemon::process_memory(daemon.pid())?;
    let rss = memory_use.rss;
    let metrics = daemon.metrics()?;
    let tracked = metrics.value("idlemon_tracked_sockets").unwrap_or(0.0);
    let table_full = metrics
        .value("idlemon_socket_table_full_total")
        .unwrap_or(0.0);
    let maps = bpf::maps(&objects.maps)?;
    let socket_map = maps
        .iter()
        .find(|map| map.name == "SOCKETS")
        .ok_or_else(|| anyhow!("idlemon holds no map named SOCKETS"))?;
    let (entries, owned) = bpf::count_entries(socket_map, std::process::id())?;

    let cpu = Summary::of(&scans.iter().map(|s| s.cpu_seconds).collect::<Vec<_>>());
    let wall = Summary::of(&scans.iter().map(|s| s.wall_seconds).collect::<Vec<_>>());
    let seen = Summary::of(&scans.iter().map(|s| s.tracked).collect::<Vec<_>>());
    let mut table = Table::new(&["scale", "n", "min", "median", "max"]);
    let ms = |v: f64| format!("{:.1} ms", v * 1e3);
    table.summary_row("walk + classify, thread CPU", cpu, ms, &[]);
    table.summary_row("walk + classify, wall", wall, ms, &[]);
    table.summary_row("tracked sockets per walk", seen, |v| format!("{v:.0}"), &[]);
    table.row([
        "time to track every pre-existing socket".to_owned(),
        "1".to_owned(),
        String::new(),
        format!("{:.2} s", time_to_track.as_secs_f64()),
    ]);
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / MIB as f64);
    table.row([
        "daemon VmRSS".to_owned(),
        "1".to_owned(),
        String::new(),
        mib(rss),
    ]);
    table.row([
        "  of which RssAnon (heap), RssFile+Shmem".to_owned(),
        "1".to_owned(),
        String::new(),
        format!("{}, {}", mib(memory_use.anon), mib(memory_use.file)),
    ]);
    table.row([
        "  VmHWM (peak)".to_owned(),
        "1".to_owned(),
        String::new(),
        mib(memory_use.peak),
    ]);
    print!("{}", table.render());

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
    // The self-cost: the same sends and two more walks, with the stats on.
    let stats = RunTimeStats::enable()?;
    let stats_before = bpf::prog_stats(&objects.progs)?;
    pool.touch(Duration::from_secs(60))?;
    daemon.sample_scans(2, bench.settings.scan_interval)?;
    let stats_after = bpf::prog_stats(&objects.progs)?;
    let stats_how = stats.how.clone();
    drop(stats);
    let (text, _) = super::self_cost(&stats_before, &stats_after);
    println!(
        "self-cost of one more send per socket and two more walks (BPF run-time stats: {stats_how}):"
    );
    print!("{text}");
    daemon.stop()?;
    let closing = Instant::now();
    drop(pool);
    println!(
        "  closed the pool in {:.1} s",
        closing.elapsed().as_secs_f64()
    );

    let label = |what: &str| format!("{what} ({sockets} sockets)");
    bench.check(Check::new(
        &label("scan CPU, median of walks"),
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
        &label("time to track pre-existing sockets"),
        format!("{:.2} s", time_to_track.as_secs_f64()),
    ));
    Ok(())
}
