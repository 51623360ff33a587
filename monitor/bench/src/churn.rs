//! Part 3: connections opened and closed at a steady rate. The hooks' table
//! must follow: entries come with connect and go with close, and once the
//! churn stops none of its sockets may stay behind.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};

use idlemon_testkit::process;

use super::{
    Bench,
    daemon::{self, Daemon},
    interrupted,
    kernel::{self, MapInfo, RunTimeStats},
    netns,
    table::{Check, Summary, Table},
    traffic,
};

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let rate = bench.settings.churn_rate;
    let duration = bench.settings.churn_seconds;
    let threads = bench.settings.churn_threads;
    let netns = netns::create("churn");
    println!(
        "open+close {rate:.0} loopback connections/s for {} s from {threads} paced thread(s), in network namespace {}; idlemon with --destination-labels 10 (active opens remembered per connect)",
        duration.as_secs(),
        netns.name
    );
    let stats = RunTimeStats::enable()?;
    // With the per-destination count of active opens on, every connect and
    // close also updates ACTIVE_OPENS: the churn measures that cost too.
    let mut daemon = Daemon::start(
        &bench.binary,
        &["--destination-labels".to_owned(), "10".to_owned()],
    )?;
    daemon.wait_ready(Duration::from_secs(60))?;
    let objects = kernel::objects_of(daemon.pid())?;
    let socket_map = kernel::maps(&objects.maps)?
        .into_iter()
        .find(|map| map.name == "SOCKETS")
        .ok_or_else(|| anyhow!("idlemon holds no map named SOCKETS"))?;
    // Entries whose owner is this process are the churn's own client
    // sockets: unlike the map's total, that count is immune to whatever
    // else the host does meanwhile.
    let me = std::process::id();
    let before = kernel::count_entries(&socket_map, me)?;
    let metrics_before = daemon.metrics()?;
    let stats_before = kernel::prog_stats(&objects.progs)?;
    let cpu_before = process::cpu(daemon.pid())?;

    let (churn, samples) = traffic::churn(&netns, rate, duration, threads, |end| {
        sample_until(&socket_map, me, end)
    })?;
    let cpu = process::cpu(daemon.pid())? - cpu_before;
    let stats_after = kernel::prog_stats(&objects.progs)?;
    let samples = samples?;

    // Closing is asynchronous (FIN handshakes, accept queues): give the last
    // connections a moment, then the churn's entries must all be gone.
    let settle = Instant::now();
    let mut after = kernel::count_entries(&socket_map, me)?;
    while after.1 > 0 && settle.elapsed() < Duration::from_secs(10) && !interrupted() {
        thread::sleep(Duration::from_millis(200));
        after = kernel::count_entries(&socket_map, me)?;
    }
    let settled_in = settle.elapsed();
    let metrics = daemon.metrics()?;
    let lost = metrics.value("idlemon_events_lost_total").unwrap_or(0.0)
        - metrics_before
            .value("idlemon_events_lost_total")
            .unwrap_or(0.0);
    let full = metrics
        .value("idlemon_socket_table_full_total")
        .unwrap_or(0.0)
        - metrics_before
            .value("idlemon_socket_table_full_total")
            .unwrap_or(0.0);
    let closed = transitions(&metrics, "close") - transitions(&metrics_before, "close");
    // The daemon's own view of its table, where this version exports it.
    let gauge = metrics.value("idlemon_socket_table_entries");
    daemon.stop()?;

    let count = |v: f64| format!("{v:.0}");
    let mut table = Table::new(&["SOCKETS entries", "n", "min", "median", "max"]);
    table.summary_row("before, all", Summary::of(&[before.0 as f64]), count, &[]);
    table.summary_row(
        "before, the bench's",
        Summary::of(&[before.1 as f64]),
        count,
        &[],
    );
    table.summary_row(
        "during, all",
        Summary::of(&samples.iter().map(|s| s.0 as f64).collect::<Vec<_>>()),
        count,
        &[],
    );
    table.summary_row(
        "during, the bench's",
        Summary::of(&samples.iter().map(|s| s.1 as f64).collect::<Vec<_>>()),
        count,
        &[],
    );
    table.summary_row("after, all", Summary::of(&[after.0 as f64]), count, &[]);
    table.summary_row(
        "after, the bench's",
        Summary::of(&[after.1 as f64]),
        count,
        &[],
    );
    print!("{}", table.render());
    if let Some(gauge) = gauge {
        println!(
            "  idlemon_socket_table_entries after: {gauge:.0} (the daemon's count, inserts minus removes)"
        );
    }
    println!(
        "  {} connections opened and closed in {:.1} s: {:.0}/s ({} connects failed); daemon CPU {:.1}% of one core; {closed:.0} transitions to CLOSE seen; events lost {lost:.0}; table full {full:.0}; the bench's entries gone {:.1} s after the churn",
        churn.opened,
        churn.elapsed.as_secs_f64(),
        churn.rate(),
        churn.failed,
        100.0 * cpu.as_secs_f64() / churn.elapsed.as_secs_f64().max(1e-9),
        settled_in.as_secs_f64()
    );
    let (text, _) = super::self_cost(&stats_before, &stats_after);
    println!(
        "self-cost during the churn (BPF run-time stats: {}):",
        stats.how
    );
    print!("{text}");
    drop(stats);

    bench.check(Check::new(
        "churn rate achieved",
        format!("{:.0}/s", churn.rate()),
        &format!(">= {rate:.0}/s"),
        // 2% slack: pacing loses a little at the very end.
        Some(churn.rate() >= rate * 0.98),
    ));
    bench.check(Check::new(
        "stale SOCKETS entries after churn",
        format!("{} (all: {} before, {} after)", after.1, before.0, after.0),
        "0",
        Some(after.1 == 0),
    ));
    Ok(())
}

/// (all entries, the bench's entries), about once a second until `end`.
fn sample_until(map: &MapInfo, me: u32, end: Instant) -> anyhow::Result<Vec<(usize, usize)>> {
    let mut samples = Vec::new();
    loop {
        let next = Instant::now() + Duration::from_secs(1);
        if next > end || interrupted() {
            return Ok(samples);
        }
        thread::sleep(next - Instant::now());
        samples.push(kernel::count_entries(map, me).context("counting SOCKETS during the churn")?);
    }
}

fn transitions(metrics: &daemon::Metrics, state: &str) -> f64 {
    metrics
        .samples("idlemon_tcp_state_transitions_total")
        .into_iter()
        .filter(|(labels, _)| {
            labels
                .get("state")
                .is_some_and(|s| s.eq_ignore_ascii_case(state))
        })
        .map(|(_, value)| value)
        .sum()
}
