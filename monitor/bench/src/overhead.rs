//! Part 1: what the hooks cost the traffic they watch. Windows of A (no
//! idlemon) and B (idlemon running) alternate in ABBA order over one
//! continuous load, in a namespace of its own, so that drift of the machine
//! (other tests, builds, thermal) hits both sides alike.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    Bench,
    daemon::Daemon,
    host::Others,
    kernel::{self, ProgInfo, RunTimeStats},
    load::{self, Load},
    netns, noop, pause,
    table::{Check, Summary, Table},
};

const PING_PONG_TARGET: f64 = 0.99;
const STREAM_TARGET: f64 = 0.995;
/// Between a daemon start or stop and the next window: loading the
/// programs costs CPU that belongs to neither side.
const SETTLE: Duration = Duration::from_secs(1);
/// The rest of the machine using more than this share of a core during a window
/// make its pair suspect.
const BUSY: f64 = 0.2;
/// A and B windows whose threads shared a CPU for shares of the time further
/// apart than this ran in different regimes.
const PLACEMENT: f64 = 0.25;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

#[derive(Debug)]
struct Pair {
    order: [Side; 2],
    /// Rates of A and B.
    rate: [f64; 2],
    /// CPU used by the rest of the machine during A and B, in cores.
    others: [f64; 2],
    /// Share of samples in which the load's two threads were on one CPU.
    together: [f64; 2],
    /// Why this pair's figures are suspect, if they are.
    disturbed: Vec<String>,
}

impl Pair {
    fn ratio(&self) -> f64 {
        self.rate[1] / self.rate[0]
    }
}

/// How a series counts: its name, its unit, and what one unit of the load's
/// counter is worth in that unit.
struct Series {
    name: &'static str,
    unit: &'static str,
    scale: f64,
}

const PING_PONG: Series = Series {
    name: "ping-pong",
    unit: "trans/s",
    scale: 1.0,
};
const STREAM: Series = Series {
    name: "iperf3",
    unit: "Gbit/s",
    // Bytes on lo to Gbit.
    scale: 8.0 / 1e9,
};

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    idlemon_testkit::vm::install_packages(
        "bench",
        &[("iperf3", "bulk-stream throughput over loopback")],
    )?;
    let netns = netns::create("overhead");
    let window = bench.settings.window;
    let pairs = bench.settings.pairs;
    println!(
        "{pairs} ABBA pairs of {} s windows, A = no idlemon, B = idlemon (default flags), over one continuous load each: 1-byte ping-pong on one connection, then one iperf3 stream (its rate read from lo's byte counter); network namespace {}; load average {}",
        window.as_secs(),
        netns.name,
        loadavg()
    );

    // A first start to learn how the hooks attached and what the programs
    // are called (to notice another idlemon during an A window).
    let mut daemon = Daemon::start(&bench.binary, &[])?;
    let ready = daemon.wait_ready(Duration::from_secs(60))?;
    let metrics = daemon.metrics()?;
    let objects = kernel::objects_of(daemon.pid())?;
    let names: BTreeSet<String> = kernel::progs()?
        .into_iter()
        .filter(|prog| objects.progs.contains(&prog.id))
        .map(|prog| prog.name)
        .collect();
    daemon.stop()?;
    let mut hooks: Vec<String> = metrics
        .samples("idlemon_probe_info")
        .into_iter()
        .filter(|(_, value)| *value > 0.0)
        .map(|(labels, _)| {
            format!(
                "{}={}",
                labels.get("hook").map_or("?", String::as_str),
                labels.get("kind").map_or("?", String::as_str)
            )
        })
        .collect();
    hooks.sort();
    let degraded: Vec<String> = metrics
        .samples("idlemon_degraded")
        .into_iter()
        .filter(|(_, value)| *value > 0.0)
        .filter_map(|(labels, _)| labels.get("hook").cloned())
        .collect();
    println!(
        "hooks attached (idlemon_probe_info): {}; degraded: {}; ready {:.2} s after start",
        hooks.join(" "),
        if degraded.is_empty() {
            "none".to_owned()
        } else {
            degraded.join(" ")
        },
        ready.as_secs_f64(),
    );

    let mut ping_pong = load::PingPong::start(&netns)?;
    pause(SETTLE)?;
    let pp_pairs = alternate(bench, &names, &mut ping_pong, &PING_PONG)?;
    let pp_cost = self_cost_window(bench, &mut ping_pong, &PING_PONG)?;
    drop(ping_pong);

    // Long enough for every window and start; stopped as soon as done.
    let budget = (window + SETTLE * 2 + Duration::from_secs(3)) * (2 * pairs as u32 + 2)
        + Duration::from_secs(60);
    let mut stream = load::Stream::start(&netns, budget)?;
    // Past slow start, as iperf3's own --omit would be.
    pause(SETTLE * 2)?;
    let stream_pairs = alternate(bench, &names, &mut stream, &STREAM)?;
    let stream_cost = self_cost_window(bench, &mut stream, &STREAM)?;
    drop(stream);

    let mut table = Table::new(&["overhead", "n", "min", "median", "max"]);
    let mut ratios = Vec::new();
    for (series, pairs, format) in [
        (
            &PING_PONG,
            &pp_pairs,
            (|v: f64| format!("{v:.0}")) as fn(f64) -> String,
        ),
        (&STREAM, &stream_pairs, |v: f64| format!("{v:.2}")),
    ] {
        let column =
            |f: &dyn Fn(&Pair) -> f64| Summary::of(&pairs.iter().map(f).collect::<Vec<_>>());
        let ratio = column(&|p| p.ratio());
        table.summary_row(
            &format!("{} A, {}", series.name, series.unit),
            column(&|p| p.rate[0]),
            format,
            &[],
        );
        table.summary_row(
            &format!("{} B, {}", series.name, series.unit),
            column(&|p| p.rate[1]),
            format,
            &[],
        );
        table.summary_row(
            &format!("{} B/A (per pair)", series.name),
            ratio,
            |v| format!("{v:.4}"),
            &[],
        );
        let clean: Vec<f64> = pairs
            .iter()
            .filter(|p| p.disturbed.is_empty())
            .map(Pair::ratio)
            .collect();
        if clean.len() < pairs.len() {
            table.summary_row(
                &format!("{} B/A, undisturbed pairs only", series.name),
                Summary::of(&clean),
                |v| format!("{v:.4}"),
                &[],
            );
        }
        let disturbed = pairs.len() - clean.len();
        ratios.push((ratio, disturbed, pairs.len()));
    }
    print!("{}", table.render());
    println!("load average after: {}", loadavg());

    for (what, (ratio, disturbed, all), target) in [
        (
            "ping-pong B/A, median of pairs",
            ratios[0],
            PING_PONG_TARGET,
        ),
        ("iperf3 B/A, median of pairs", ratios[1], STREAM_TARGET),
    ] {
        let mut measured = ratio.map_or_else(
            || "-".to_owned(),
            |s| format!("{:.4} (IQR {:.3}-{:.3})", s.median, s.q1, s.q3),
        );
        if disturbed > 0 {
            measured.push_str(&format!(", {disturbed}/{all} pairs disturbed"));
        }
        let mut check = Check::new(
            what,
            measured,
            &format!(">= {target}"),
            ratio.map(|s| s.median >= target),
        );
        // Half the pairs landed on each side of the target: the windows'
        // noise, not idlemon, decides the verdict.
        check.inconclusive = ratio.is_some_and(|s| s.straddles(target));
        bench.check(check);
    }

    println!(
        "self-cost: one more B window of each load with BPF run-time stats on ({}; they cost two clock reads per run, so the pairs above ran without)",
        pp_cost.how
    );
    let per_transaction = pp_cost.ns as f64 / pp_cost.units.max(1) as f64;
    let rate = pp_cost.units as f64 / pp_cost.wall.as_secs_f64();
    // A ping-pong is serial: every hook run is on its critical path, so
    // the BPF time per transaction is what B adds to A's transaction time.
    let pp_share = per_transaction * rate / 1e9;
    println!(
        "during ping-pong ({rate:.0} trans/s): {per_transaction:.0} ns of BPF per transaction, {:.2}% of a transaction's {:.1} us",
        pp_share * 100.0,
        1e6 / rate
    );
    print!("{}", pp_cost.text);
    let pp_net_share = pp_cost.net_ns.map(|net| {
        let per_transaction = net as f64 / pp_cost.units.max(1) as f64;
        (per_transaction, per_transaction * rate / 1e9)
    });
    if let (Some(floor), Some((per_transaction, share))) = (pp_cost.floor, pp_net_share) {
        println!(
            "  net of the stats' own cost (a no-op program on tcp:{FLOOR_TRACEPOINT} in the same window: {floor:.0} ns/run): {per_transaction:.0} ns per transaction, {:.2}% of a transaction; the kernel's dispatch of each run (outside the stats) is in neither figure",
            share * 100.0
        );
    }
    let bytes = stream_cost.units as f64;
    // A stream is bound by the CPU of its two ends: the BPF share of that
    // CPU is the throughput it takes.
    let stream_share = stream_cost.ns as f64 / stream_cost.load_cpu.as_nanos().max(1) as f64;
    println!(
        "during iperf3 ({:.2} Gbit/s): {:.1} ms of BPF in {:.1} s, {:.0} ns per MiB, {:.2}% of the {:.2} s of CPU both iperf3 ends used",
        bytes * 8.0 / 1e9 / stream_cost.wall.as_secs_f64(),
        stream_cost.ns as f64 / 1e6,
        stream_cost.wall.as_secs_f64(),
        stream_cost.ns as f64 / (bytes / 1_048_576.0).max(1e-9),
        stream_share * 100.0,
        stream_cost.load_cpu.as_secs_f64()
    );
    print!("{}", stream_cost.text);
    let stream_net_share = stream_cost
        .net_ns
        .map(|net| net as f64 / stream_cost.load_cpu.as_nanos().max(1) as f64);
    if let (Some(floor), Some(share)) = (stream_cost.floor, stream_net_share) {
        println!(
            "  net of the stats' own cost (no-op: {floor:.0} ns/run): {:.1} ms of BPF, {:.2}% of the stream's CPU",
            stream_cost.net_ns.unwrap_or(0) as f64 / 1e6,
            share * 100.0
        );
    }
    bench.check(Check::new(
        "ping-pong: BPF time per transaction (self-cost)",
        format!("{:.2}% ({per_transaction:.0} ns)", pp_share * 100.0),
        &format!("<= {:.1}%", (1.0 - PING_PONG_TARGET) * 100.0),
        Some(pp_share <= 1.0 - PING_PONG_TARGET),
    ));
    bench.check(Check::new(
        "iperf3: BPF share of the stream's CPU (self-cost)",
        format!("{:.2}%", stream_share * 100.0),
        &format!("<= {:.1}%", (1.0 - STREAM_TARGET) * 100.0),
        Some(stream_share <= 1.0 - STREAM_TARGET),
    ));
    // The targets above count the stats' own clock reads as idlemon's cost
    // (an upper bound); these leave them out (and the kernel's dispatch,
    // which the stats never saw: a lower bound).
    if let Some((per_transaction, share)) = pp_net_share {
        bench.check(Check::info(
            "ping-pong: BPF time per transaction, net of the stats' floor",
            format!("{:.2}% ({per_transaction:.0} ns)", share * 100.0),
        ));
    }
    if let Some(share) = stream_net_share {
        bench.check(Check::info(
            "iperf3: BPF share of the stream's CPU, net of the stats' floor",
            format!("{:.2}%", share * 100.0),
        ));
    }
    Ok(())
}

/// ABBA pairs of windows over one load.
fn alternate(
    bench: &Bench,
    names: &BTreeSet<String>,
    load: &mut dyn Load,
    series: &Series,
) -> anyhow::Result<Vec<Pair>> {
    let pairs = bench.settings.pairs;
    let mut done = Vec::with_capacity(pairs);
    for index in 0..pairs {
        // ABBA: a trend over the series favours neither side.
        let order = if index % 2 == 0 {
            [Side::A, Side::B]
        } else {
            [Side::B, Side::A]
        };
        let mut pair = Pair {
            order,
            rate: [0.0; 2],
            others: [0.0; 2],
            together: [0.0; 2],
            disturbed: Vec::new(),
        };
        for side in order {
            let daemon = match side {
                Side::A => None,
                Side::B => {
                    let mut daemon = Daemon::start(&bench.binary, &[])?;
                    daemon.wait_ready(Duration::from_secs(60))?;
                    Some(daemon)
                }
            };
            pause(SETTLE)?;
            let ours = match &daemon {
                Some(daemon) => kernel::objects_of(daemon.pid())?.progs,
                None => BTreeSet::new(),
            };
            foreign(names, &ours, &mut pair.disturbed)?;
            let Window {
                units,
                wall,
                others,
                together,
            } = measure(load, bench.settings.window)
                .with_context(|| format!("{} pair {}, side {side:?}", series.name, index + 1))?;
            foreign(names, &ours, &mut pair.disturbed)?;
            if let Some(daemon) = daemon {
                daemon.stop()?;
            }
            let slot = usize::from(side == Side::B);
            pair.rate[slot] = units as f64 * series.scale / wall.as_secs_f64();
            pair.others[slot] = others;
            pair.together[slot] = together;
        }
        if (pair.together[0] - pair.together[1]).abs() > PLACEMENT {
            pair.disturbed.push(format!(
                "the load's threads shared a CPU {:.0}% / {:.0}% of the time",
                pair.together[0] * 100.0,
                pair.together[1] * 100.0
            ));
        }
        if pair.others.iter().any(|others| *others > BUSY) {
            pair.disturbed.push(format!(
                "the rest of the machine used {:.0}% / {:.0}% of a core",
                pair.others[0] * 100.0,
                pair.others[1] * 100.0
            ));
        }
        println!(
            "  {} pair {}/{pairs} ({:?}{:?}): A {:.2} B {:.2} {}, B/A {:.4}; on one CPU {:.0}%/{:.0}%, rest of machine {:.0}%/{:.0}% of a core{}",
            series.name,
            index + 1,
            pair.order[0],
            pair.order[1],
            pair.rate[0],
            pair.rate[1],
            series.unit,
            pair.ratio(),
            pair.together[0] * 100.0,
            pair.together[1] * 100.0,
            pair.others[0] * 100.0,
            pair.others[1] * 100.0,
            if pair.disturbed.is_empty() {
                String::new()
            } else {
                format!("  DISTURBED: {}", pair.disturbed.join("; "))
            }
        );
        done.push(pair);
    }
    Ok(done)
}

/// One window of a load.
struct Window {
    /// The load's progress.
    units: u64,
    /// The window's exact length.
    wall: Duration,
    /// CPU the rest of the machine used meanwhile, in cores.
    others: f64,
    /// Share of samples in which the load's two threads were on one CPU.
    together: f64,
}

fn measure(load: &mut dyn Load, window: Duration) -> anyhow::Result<Window> {
    const SAMPLE: Duration = Duration::from_millis(50);
    let others = Others::now();
    let (first, started) = (load.total()?, Instant::now());
    let (mut samples, mut together) = (0u32, 0u32);
    while started.elapsed() + SAMPLE <= window {
        pause(SAMPLE)?;
        if let Some(shared) = load::share_cpu(load) {
            samples += 1;
            together += u32::from(shared);
        }
    }
    pause(window.saturating_sub(started.elapsed()))?;
    let (last, ended) = (load.total()?, Instant::now());
    let wall = ended - started;
    Ok(Window {
        units: last.saturating_sub(first),
        wall,
        others: Others::now().since(&others, wall),
        together: f64::from(together) / f64::from(samples.max(1)),
    })
}

struct SelfCost {
    how: String,
    units: u64,
    wall: Duration,
    /// CPU the load's two ends used during the window.
    load_cpu: Duration,
    text: String,
    ns: u64,
    /// ns/run of a program that does nothing, under the same stats.
    floor: Option<f64>,
    /// `ns` less `floor` for every run: what idlemon's programs themselves took.
    net_ns: Option<u64>,
}

/// One B window with run-time stats on: what each program cost.
fn self_cost_window(
    bench: &Bench,
    load: &mut dyn Load,
    series: &Series,
) -> anyhow::Result<SelfCost> {
    let stats = RunTimeStats::enable()?;
    let mut daemon = Daemon::start(&bench.binary, &[])?;
    daemon.wait_ready(Duration::from_secs(60))?;
    pause(SETTLE)?;
    let ours = kernel::objects_of(daemon.pid())?.progs;
    // Beside the receive hook: a program that does nothing, whose ns/run is
    // what the stats themselves add to every run.
    let noop = match noop::Floor::attach(FLOOR_TRACEPOINT) {
        Ok(noop) => Some(noop),
        Err(error) => {
            println!("  the stats' floor is not measured: {error:#}");
            None
        }
    };
    let mut ids = ours.clone();
    ids.extend(noop.as_ref().map(|noop| noop.id));
    let mut before: BTreeMap<u32, ProgInfo> = kernel::prog_stats(&ids)?;
    let cpu_before = load::cpu(load);
    let Window { units, wall, .. } = measure(load, bench.settings.window)
        .with_context(|| format!("{}: self-cost window", series.name))?;
    let load_cpu = load::cpu(load).saturating_sub(cpu_before);
    let mut after = kernel::prog_stats(&ids)?;
    daemon.stop()?;
    let floor = noop.and_then(|noop| {
        let (start, end) = (before.remove(&noop.id)?, after.remove(&noop.id)?);
        let runs = end.run_cnt.saturating_sub(start.run_cnt);
        (runs > 0).then(|| end.run_time_ns.saturating_sub(start.run_time_ns) as f64 / runs as f64)
    });
    let net_ns = floor.map(|floor| {
        super::run_deltas(&before, &after)
            .map(|(runs, time, _)| (time as f64 - runs as f64 * floor).max(0.0))
            .sum::<f64>() as u64
    });
    let (text, ns) = super::self_cost(&before, &after);
    Ok(SelfCost {
        how: stats.how.clone(),
        units,
        wall,
        load_cpu,
        text,
        ns,
        floor,
        net_ns,
    })
}

/// Where the no-op program that measures the stats' floor runs: the receive
/// hook's tracepoint, which fires on every segment of both loads.
const FLOOR_TRACEPOINT: &str = "tcp_probe";

/// Notes programs of another idlemon (someone's test) loaded next to ours.
fn foreign(
    names: &BTreeSet<String>,
    ours: &BTreeSet<u32>,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let others = kernel::progs()?
        .into_iter()
        .filter(|prog| names.contains(&prog.name) && !ours.contains(&prog.id))
        .count();
    if others > 0 {
        let note = format!("{others} programs of another idlemon were loaded");
        if !notes.contains(&note) {
            notes.push(note);
        }
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".to_owned())
}
