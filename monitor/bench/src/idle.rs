//! Part 4: what idlemon costs a quiet host, where it only walks the sockets
//! every scan interval.

use std::{
    thread,
    time::{Duration, Instant},
};

use idlemon_testkit::process;

use super::{
    Bench,
    daemon::{self, Daemon},
    interrupted, netns,
    table::{Check, Summary, Table},
    traffic,
};

/// The idle target, for the pods part too.
pub(super) const CPU_TARGET_PERCENT: f64 = 1.0;

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let connections = bench.settings.idle_connections;
    let sockets = 2 * connections;
    let window = bench.settings.idle_seconds;
    let netns = netns::create("idle");
    println!(
        "{connections} idle loopback connections ({sockets} sockets) in network namespace {}; idlemon with default flags (scan every 5 s); daemon CPU over {} s",
        netns.name,
        window.as_secs()
    );
    let pool = traffic::open_pool(&netns, connections, Duration::from_secs(60))?;
    let mut daemon = Daemon::start(&bench.binary, &[])?;
    let Window {
        cpu,
        elapsed,
        scans,
        metrics,
    } = measure(&mut daemon, sockets, window)?;
    let rss = process::memory(daemon.pid())?.rss;
    let last_scan_cpu = metrics
        .value("idlemon_scan_cpu_seconds")
        .unwrap_or(f64::NAN);
    let tracked = metrics.value("idlemon_tracked_sockets").unwrap_or(0.0);
    daemon.stop()?;
    drop(pool);

    let percent = 100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64();

    let mut table = Table::new(&["idle", "n", "min", "median", "max"]);
    table.summary_row(
        "daemon CPU, % of one core",
        Summary::of(&[percent]),
        |v| format!("{v:.3}%"),
        &[],
    );
    table.row([
        "walks in the window, last walk's CPU".to_owned(),
        format!("{scans:.0}"),
        String::new(),
        format!("{:.2} ms", last_scan_cpu * 1e3),
    ]);
    table.row([
        "tracked sockets, VmRSS".to_owned(),
        "1".to_owned(),
        String::new(),
        format!("{tracked:.0}, {:.1} MiB", rss as f64 / super::MIB as f64),
    ]);
    print!("{}", table.render());
    println!(
        "  utime+stime {:.2} s over {:.1} s (tick resolution {:.0} ms)",
        cpu.as_secs_f64(),
        elapsed.as_secs_f64(),
        // SAFETY: sysconf has no preconditions.
        1000.0 / (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64)
    );
    bench.check(Check::new(
        &format!("idle daemon CPU ({sockets} sockets)"),
        format!("{percent:.3}% of a core"),
        &format!("< {CPU_TARGET_PERCENT}%"),
        Some(percent < CPU_TARGET_PERCENT),
    ));
    Ok(())
}

/// What a daemon cost over one idle window.
pub(super) struct Window {
    pub cpu: Duration,
    pub elapsed: Duration,
    /// Walks that ended in the window.
    pub scans: f64,
    /// A scrape right after it.
    pub metrics: daemon::Metrics,
}

/// Waits until `daemon` is ready and tracks `sockets`, then measures its CPU
/// (utime+stime) over `window`, without a scrape inside it (serving
/// /metrics would be counted too).
pub(super) fn measure(
    daemon: &mut Daemon,
    sockets: usize,
    window: Duration,
) -> anyhow::Result<Window> {
    daemon.wait_ready(Duration::from_secs(60))?;
    daemon.poll_metrics(Duration::from_secs(30), Duration::from_millis(100), |m| {
        m.value("idlemon_tracked_sockets").unwrap_or(0.0) >= sockets as f64
    })?;
    // Start-up (loading, the first walk) is not idle cost.
    thread::sleep(Duration::from_secs(1));
    let scans_before = daemon
        .metrics()?
        .value("idlemon_scans_total")
        .unwrap_or(0.0);
    let cpu_before = process::cpu(daemon.pid())?;
    let started = Instant::now();
    let end = started + window;
    while Instant::now() < end {
        if interrupted() {
            anyhow::bail!("interrupted");
        }
        thread::sleep(
            Duration::from_millis(100).min(end.saturating_duration_since(Instant::now())),
        );
        daemon.check_alive()?;
    }
    let cpu = process::cpu(daemon.pid())? - cpu_before;
    let elapsed = started.elapsed();
    let metrics = daemon.metrics()?;
    let scans = metrics.value("idlemon_scans_total").unwrap_or(0.0) - scans_before;
    Ok(Window {
        cpu,
        elapsed,
        scans,
        metrics,
    })
}
