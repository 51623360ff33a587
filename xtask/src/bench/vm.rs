//! The bench's part 5 (`--only vm`, run by monitor/bench as `xtask
//! bench-vm`): what the fentry and kprobe hooks cost, which this host's
//! kernel refuses (it is built without kprobes and refuses fentry), on the
//! kernels EKS nodes run.
//! Debian's 6.1 and 6.12 cloud kernels boot once each under qemu TCG with
//! vm-test's harness (`crate::vm`), and its guest driver alternates windows
//! of one 1-byte ping-pong (`monitor/bench/src/ping_pong.rs`, the overhead
//! part's load) without idlemon (A), with idlemon attaching as it does by default, by
//! fentry (B1), and with `--disable-attach fentry`, by kprobe (B2); its
//! walks are an hour apart there (`vm/guest.rs` says why). A fourth side
//! (F) has no idlemon but a program that does nothing on each of the two
//! functions idlemon's per-packet hooks attach to by fentry (`noop.rs`):
//! F/A is the floor of any fentry program there, and B1/F what idlemon's
//! code costs over it. Only ratios within one round are printed: emulation
//! makes every absolute rate meaningless, but both sides of a ratio are
//! emulated alike.
//!
//! The guest's clock counts instructions (`-icount`), not the host's time:
//! with wall-clock TCG, a build on the host's other core moved one window's
//! rate by a factor of 3 (B/A from 0.40 to 1.95 in one run), while counted,
//! the windows of one side repeat to within 0.5% (on 6.12 most to within
//! 0.01%) and rounds' ratios to within 1%. The first A window of a run came
//! out 0.5% faster than the later ones on both kernels, which lowers round
//! 1's ratios by as much: the median is the figure to read. A ratio is the
//! instructions of an A transaction over those of a B transaction, the
//! hooks' and the daemon's included; what instructions cost on real
//! hardware (cache misses, the trap of a kprobe) is not in it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{
    Bench, interrupted,
    table::{Check, Summary, Table},
};
use idlemon_testkit::{
    attach::{HOOKS, Mode, Target, expected_kinds},
    vm::{self as harness, Arch, Series},
};

use super::protocol as tag;

/// The kernels, in the order they boot.
const TARGETS: [Series; 2] = [Series::V6_1, Series::V6_12];
/// The guest's clock advances 4 ns per instruction, about as fast as this
/// host emulates them, so that guest seconds stay close to wall seconds
/// (timeouts, run time); only idle time runs on the host's clock
/// (`sleep=on`), and the windows have none: the ping-pong keeps the one
/// vCPU busy.
const ICOUNT: [&str; 2] = ["-icount", "shift=2,sleep=on"];
/// How long idlemon may take to attach in one window; the verifier is slow
/// under emulation, and a daemon not ready by then is stuck.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// What one window costs besides its measured seconds, at most: the settle
/// (15 s at most, `vm/guest.rs`), and for a B window idlemon's start and
/// stop (about 5 s seen).
const WINDOW_OVERHEAD: Duration = Duration::from_secs(22);
/// Boot, the driver's setup and a margin.
const BOOT_BUDGET: Duration = Duration::from_secs(90);

/// One side of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    /// No idlemon.
    A,
    /// idlemon, default attach kinds: fentry.
    B1,
    /// idlemon, `--disable-attach fentry`: kprobe.
    B2,
    /// No idlemon; a no-op fentry program on each of `tag::FLOOR_FUNCTIONS`.
    F,
}

use Side::{A, B1, B2, F};

impl Side {
    const ALL: [Self; 4] = [A, B1, B2, F];

    fn mode(self) -> Option<Mode> {
        match self {
            A | F => None,
            B1 => Some(Mode::Default),
            B2 => Some(Mode::NoFentry),
        }
    }

    /// The side's name in the driver's arguments and result lines.
    fn guest_name(self) -> &'static str {
        match self {
            A => tag::BASELINE,
            F => tag::FLOOR,
            B1 | B2 => self.mode().map_or(tag::BASELINE, Mode::name),
        }
    }

    fn from_guest(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|side| side.guest_name() == name)
    }

    /// The attach kind a B side is named after.
    fn kind(self) -> &'static str {
        match self {
            A => "none",
            B1 => "fentry",
            B2 => "kprobe",
            F => "no-op fentry",
        }
    }

    fn label(self) -> &'static str {
        match self {
            A => "A",
            B1 => "B1",
            B2 => "B2",
            F => "F",
        }
    }

    fn flags(self) -> &'static str {
        match self {
            A => "no idlemon",
            B1 => "default attach kinds",
            B2 => "--disable-attach fentry",
            F => "no idlemon, a no-op fentry program on tcp_sendmsg and tcp_rcv_established",
        }
    }
}

/// The order of the sides in each round. Over four rounds every side takes
/// every position once, and each round is followed by its mirror image
/// (ABBA for four), so that neither a steady drift of the host nor the
/// start of a window after a daemon stop favours one side.
const ORDERS: [[Side; 4]; 4] = [
    [A, B1, F, B2],
    [B2, F, B1, A],
    [B1, A, B2, F],
    [F, B2, A, B1],
];

fn schedule(rounds: usize) -> Vec<[Side; 4]> {
    (0..rounds)
        .map(|index| ORDERS[index % ORDERS.len()])
        .collect()
}

/// The driver's arguments: both modes, then the windows.
fn guest_args(rounds: usize, window: Duration) -> Vec<String> {
    let mut args = vec![
        "--ready-timeout".to_owned(),
        READY_TIMEOUT.as_secs().to_string(),
    ];
    for mode in [B1, B2].into_iter().filter_map(Side::mode) {
        args.extend([
            "--mode".to_owned(),
            format!("{}:{}", mode.name(), mode.disable()),
        ]);
    }
    args.extend([
        "--bench-window".to_owned(),
        format!("{}", window.as_secs_f64()),
    ]);
    for round in schedule(rounds) {
        let sides: Vec<&str> = round.iter().map(|side| side.guest_name()).collect();
        args.extend(["--bench-round".to_owned(), sides.join(",")]);
    }
    args
}

/// One window as the driver measured it, in the guest's time.
#[derive(Debug, Clone, PartialEq)]
struct Window {
    side: Side,
    round: usize,
    seconds: f64,
    transactions: u64,
    /// How long the driver waited for the load to run steadily first.
    settled: f64,
    /// Whether it did within the driver's limit.
    steady: bool,
}

impl Window {
    /// `round=R seconds=S transactions=T settled=S steady=0|1`, as
    /// `vm/guest.rs` writes it.
    fn parse(side: Side, rest: &str) -> Option<Self> {
        let mut fields = BTreeMap::new();
        for pair in rest.split_whitespace() {
            let (key, value) = pair.split_once('=')?;
            fields.insert(key, value);
        }
        let window = Self {
            side,
            round: fields.get("round")?.parse().ok()?,
            seconds: fields.get("seconds")?.parse().ok()?,
            transactions: fields.get("transactions")?.parse().ok()?,
            settled: fields.get("settled")?.parse().ok()?,
            steady: match *fields.get("steady")? {
                "1" => true,
                "0" => false,
                _ => return None,
            },
        };
        (window.seconds.is_finite() && window.seconds > 0.0).then_some(window)
    }

    /// Transactions per second of the guest's clock: never printed, only
    /// divided by another window's.
    fn rate(&self) -> f64 {
        self.transactions as f64 / self.seconds
    }
}

/// What the driver reported in one boot.
#[derive(Debug, Default)]
struct Report {
    kernel_release: Option<String>,
    windows: Vec<Window>,
    /// Per B side, hook -> the attach kinds it showed over its windows.
    hooks: BTreeMap<Side, BTreeMap<String, BTreeSet<String>>>,
    /// Exit statuses other than 0 (`side: status`).
    bad_exits: Vec<String>,
    failures: Vec<String>,
    log: Vec<String>,
    done: bool,
    /// Lines this parser does not know: a driver and a host out of step.
    garbled: Vec<String>,
}

fn parse_report(text: &str) -> Report {
    let mut report = Report::default();
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, ' ');
        let (Some(tag), Some(who)) = (parts.next(), parts.next()) else {
            report.garbled.push(line.to_owned());
            continue;
        };
        let rest = parts.next().unwrap_or("");
        let side = Side::from_guest(who);
        match (tag, side) {
            (tag::KERNEL, _) => report.kernel_release = Some(rest.to_owned()),
            (tag::DONE, _) => report.done = true,
            (tag::WINDOW, Some(side)) => match Window::parse(side, rest) {
                Some(window) => report.windows.push(window),
                None => report.garbled.push(line.to_owned()),
            },
            (tag::METRIC, Some(side)) => {
                if let Some((hook, kind)) = idlemon_testkit::metrics::probe_info(rest)
                    .into_iter()
                    .next()
                {
                    report
                        .hooks
                        .entry(side)
                        .or_default()
                        .entry(hook)
                        .or_default()
                        .insert(kind);
                }
            }
            (tag::EXIT, Some(side)) if rest != "0" => {
                report.bad_exits.push(format!("{}: {rest}", side.label()));
            }
            (tag::FAIL, _) => report.failures.push(format!("{who}: {rest}")),
            (tag::LOG, _) => report.log.push(format!("{who}: {rest}")),
            (tag::READY | tag::EXIT, Some(_)) => {}
            _ => report.garbled.push(line.to_owned()),
        }
    }
    report
}

/// The ratios of one round: each B window's rate over the A window's.
#[derive(Debug, Clone, PartialEq)]
struct Round {
    number: usize,
    /// The sides in the order their windows ran.
    order: Vec<Side>,
    fentry: Option<f64>,
    kprobe: Option<f64>,
    floor: Option<f64>,
}

impl Round {
    fn ratio(&self, side: Side) -> Option<f64> {
        match side {
            A => Some(1.0),
            B1 => self.fentry,
            B2 => self.kprobe,
            F => self.floor,
        }
    }

    /// B1 over F: idlemon's fentry programs over programs that do nothing.
    fn over_floor(&self) -> Option<f64> {
        Some(self.fentry? / self.floor.filter(|floor| *floor > 0.0)?)
    }
}

/// Pairs the windows of each round: a ratio only within a round, so that
/// whatever drifts over the run cancels. A round whose A window is missing
/// has no ratios; a missing B window leaves its own ratio out.
fn rounds(windows: &[Window]) -> Vec<Round> {
    let mut by_round: BTreeMap<usize, Vec<&Window>> = BTreeMap::new();
    for window in windows {
        by_round.entry(window.round).or_default().push(window);
    }
    by_round
        .into_iter()
        .map(|(number, windows)| {
            let rate = |side: Side| {
                windows
                    .iter()
                    .find(|window| window.side == side)
                    .map(|window| window.rate())
            };
            let baseline = rate(A).filter(|rate| *rate > 0.0);
            let ratio = |side: Side| Some(rate(side)? / baseline?);
            Round {
                number,
                order: windows.iter().map(|window| window.side).collect(),
                fentry: ratio(B1),
                kprobe: ratio(B2),
                floor: ratio(F),
            }
        })
        .collect()
}

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let rounds = bench.settings.vm_rounds;
    let window = bench.settings.vm_window;
    let root = crate::workspace_root();
    let cache = root.join("target/vm-cache");
    // Apart from vm-test's files, so that the two never overwrite each other.
    let work = cache.join("bench");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let guest = build_guest(&root, &work)?;
    crate::setup::install_packages("xtask bench", Arch::Amd64.packages())?;
    let args: Vec<String> = guest_args(rounds, window)
        .iter()
        .map(|arg| harness::shell_quote(arg))
        .collect();
    let (kernels, initrd) = harness::prepare(
        &cache,
        &work,
        &TARGETS,
        &harness::Guest {
            arch: Arch::Amd64,
            daemon: &harness::Daemon::Binary(bench.binary.clone()),
            programs: vec![(guest, "/vm-guest".to_owned())],
            script: format!(
                "/vm-guest --out - --idlemon /idlemon --workdir /tmp {}",
                args.join(" ")
            ),
        },
    )?;
    let timeout =
        BOOT_BUDGET + (window + WINDOW_OVERHEAD) * (Side::ALL.len() as u32 * rounds as u32);
    println!(
        "{rounds} rounds of {} s windows per kernel, A = no idlemon, B1 = idlemon (fentry, its default), B2 = idlemon --disable-attach fentry (kprobe), both with --scan-interval 3600, F = no idlemon but a no-op fentry program on {} (the floor under B1's per-packet hooks), over one 1-byte ping-pong on the guest's loopback; qemu TCG, 1 vCPU, {} {} (the guest's clock counts instructions); ratios only",
        window.as_secs_f64(),
        tag::FLOOR_FUNCTIONS.join(" and "),
        ICOUNT[0],
        ICOUNT[1]
    );
    let mut failed = Vec::new();
    for kernel in &kernels {
        let target = Target::Vm(kernel.arch, kernel.series);
        let label = kernel.label();
        println!("\n-- {label}: {} --", kernel.package);
        match measure(kernel, &initrd, &work, timeout) {
            Ok(measured) => {
                report(bench, target, &measured);
                if !measured.problems.is_empty() {
                    println!(
                        "{label} FAILED (console: {}):\n  {}",
                        measured.console_log.display(),
                        measured.problems.join("\n  ")
                    );
                    failed.push(label.clone());
                }
            }
            Err(error) => {
                println!("{label} FAILED: {error:#}");
                for side in [B1, B2, F] {
                    bench.check(Check::new(
                        &check_name(&label, side),
                        "-".to_owned(),
                        "-",
                        None,
                    ));
                }
                failed.push(label.clone());
            }
        }
        if interrupted() {
            bail!("interrupted");
        }
    }
    if !failed.is_empty() {
        bail!(
            "the vm part failed on {} (consoles and results in {})",
            failed.join(", "),
            work.display()
        );
    }
    Ok(())
}

/// Builds the guest driver with plain rustc: a second cargo binary in
/// this package would make `cargo xtask` ambiguous (see `guest.rs`).
fn build_guest(root: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let source = root.join("xtask/src/bench/guest.rs");
    let output = work.join("vm-guest");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    println!(
        "xtask bench: building the guest driver from {}",
        source.display()
    );
    crate::setup::run_command(
        std::process::Command::new(&rustc)
            .args([
                "--edition",
                "2024",
                "--crate-name",
                "vm_guest",
                "--crate-type",
                "bin",
            ])
            .args(["-C", "opt-level=2", "-C", "strip=symbols", "-o"])
            .arg(&output)
            .arg(&source)
            .current_dir(root)
            .env("PATH", crate::setup::path_with_cargo_bin()),
    )
    .with_context(|| format!("cannot build the guest driver with {rustc}"))?;
    Ok(output)
}

/// One kernel's run, parsed and paired.
struct Measured {
    report: Report,
    rounds: Vec<Round>,
    /// What went wrong; the rounds that made it are still worth reporting.
    problems: Vec<String>,
    console_log: PathBuf,
}

/// Boots one kernel, and pairs what came back.
fn measure(
    kernel: &harness::Kernel,
    initrd: &Path,
    work: &Path,
    timeout: Duration,
) -> anyhow::Result<Measured> {
    let booted = harness::launch(kernel, initrd, work, timeout, &ICOUNT, "bench", "vm-guest:")?;
    let report = parse_report(&booted.results);
    let mut problems: Vec<String> = booted.problem.iter().cloned().collect();
    if !report.done {
        problems.push("the driver did not get to its end".to_owned());
    }
    problems.extend(
        report
            .failures
            .iter()
            .map(|failure| format!("driver: {failure}")),
    );
    problems.extend(
        report
            .bad_exits
            .iter()
            .map(|exit| format!("idlemon exited with {exit}")),
    );
    if !report.garbled.is_empty() {
        problems.push(format!(
            "{} result lines not understood, first: {}",
            report.garbled.len(),
            report.garbled[0]
        ));
    }
    if !problems.is_empty() {
        problems.extend(
            report
                .log
                .iter()
                .rev()
                .take(20)
                .rev()
                .map(|line| format!("log {line}")),
        );
    }
    Ok(Measured {
        rounds: rounds(&report.windows),
        report,
        problems,
        console_log: booted.console_log,
    })
}

fn check_name(label: &str, side: Side) -> String {
    format!(
        "vm {label}: ping-pong {}/A, {} (median of rounds)",
        side.label(),
        side.kind()
    )
}

/// The attach kinds a side showed, in vm-test's hook order, and the hooks
/// whose kind vm-test would not expect there.
fn hooks_line(target: Target, side: Side, report: &Report) -> (String, Vec<String>) {
    let Some(mode) = side.mode() else {
        return (String::new(), Vec::new());
    };
    let seen = report.hooks.get(&side);
    let mut parts = Vec::new();
    let mut unexpected = Vec::new();
    for hook in HOOKS {
        let kinds: Vec<&str> = seen
            .and_then(|seen| seen.get(hook))
            .map(|kinds| kinds.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let shown = if kinds.is_empty() {
            "?".to_owned()
        } else {
            kinds.join("/")
        };
        let expected = expected_kinds(target, mode, hook);
        if kinds.len() != 1 || !expected.contains(&kinds[0]) {
            unexpected.push(format!("{hook}={shown}"));
        }
        parts.push(format!("{hook}={shown}"));
    }
    (parts.join(" "), unexpected)
}

fn report(bench: &mut Bench, target: Target, measured: &Measured) {
    let Measured { report, rounds, .. } = measured;
    let label = target.label();
    println!(
        "guest kernel {}",
        report.kernel_release.as_deref().unwrap_or("?")
    );
    let ratio = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
    for round in rounds {
        let order: Vec<&str> = round.order.iter().map(|side| side.label()).collect();
        println!(
            "  round {}/{} ({}): B1/A {}, B2/A {}, F/A {}, B1/F {}",
            round.number,
            rounds.len(),
            order.join(" "),
            ratio(round.fentry),
            ratio(round.kprobe),
            ratio(round.floor),
            ratio(round.over_floor()),
        );
    }
    let settled: Vec<f64> = report.windows.iter().map(|window| window.settled).collect();
    let unsteady = report
        .windows
        .iter()
        .filter(|window| !window.steady)
        .count();
    if let Some(settled) = Summary::of(&settled) {
        println!(
            "each window began once the load ran steadily: after {:.1} s (median), {:.1} s at most{}",
            settled.median,
            settled.max,
            if unsteady > 0 {
                format!("; {unsteady} windows began unsteady, at the limit")
            } else {
                String::new()
            }
        );
    }
    let mut table = Table::new(&[
        &format!("vm {label}, per round"),
        "n",
        "min",
        "median",
        "max",
    ]);
    let mut checks = Vec::new();
    for side in [B1, B2, F] {
        let (hooks, unexpected) = hooks_line(target, side, report);
        if side.mode().is_some() {
            println!(
                "hooks attached, {} ({}): {hooks}",
                side.label(),
                side.flags()
            );
        }
        let ratios: Vec<f64> = rounds
            .iter()
            .filter_map(|round| round.ratio(side))
            .collect();
        let summary = Summary::of(&ratios);
        table.summary_row(
            &format!("ping-pong {}/A ({})", side.label(), side.kind()),
            summary,
            |v| format!("{v:.4}"),
            &[],
        );
        let mut measured = summary.map_or_else(
            || "-".to_owned(),
            |s| format!("{:.4} (IQR {:.3}-{:.3})", s.median, s.q1, s.q3),
        );
        if !unexpected.is_empty() {
            let _ = write!(measured, ", attached {}", unexpected.join(" "));
        }
        if unsteady > 0 {
            let _ = write!(measured, ", {unsteady} windows unsteady");
        }
        checks.push(match summary {
            Some(_) => Check::info(&check_name(&label, side), measured),
            None => Check::new(&check_name(&label, side), measured, "-", None),
        });
    }
    let over_floor: Vec<f64> = rounds.iter().filter_map(Round::over_floor).collect();
    let over_floor = Summary::of(&over_floor);
    table.summary_row(
        "ping-pong B1/F (over the floor)",
        over_floor,
        |v| format!("{v:.4}"),
        &[],
    );
    print!("{}", table.render());
    println!(
        "  F/A: what any fentry program on those two functions costs the ping-pong (trampoline and call); B1/F: what idlemon's programs and daemon cost over that"
    );
    for check in checks {
        bench.check(check);
    }
    bench.check(Check::info(
        &format!("vm {label}: ping-pong B1/F, idlemon over the no-op floor (median of rounds)"),
        over_floor.map_or_else(
            || "-".to_owned(),
            |s| format!("{:.4} (IQR {:.3}-{:.3})", s.median, s.q1, s.q3),
        ),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::guest;

    #[test]
    fn every_side_takes_every_position_equally_often() {
        let rounds = schedule(4);
        for position in 0..Side::ALL.len() {
            for side in Side::ALL {
                let count = rounds
                    .iter()
                    .filter(|round| round[position] == side)
                    .count();
                assert_eq!(count, 1, "{side:?} at position {position}");
            }
        }
        // Each odd round mirrors the one before it.
        for pair in rounds.chunks(2) {
            let mut mirrored = pair[0];
            mirrored.reverse();
            assert_eq!(pair[1], mirrored);
        }
        // More rounds start the cycle again.
        assert_eq!(schedule(6)[4], ORDERS[0]);
    }

    #[test]
    fn the_driver_reads_the_plan_back() {
        let mut args = vec!["--idlemon".to_owned(), "/idlemon".to_owned()];
        args.extend(guest_args(2, Duration::from_millis(2500)));
        let parsed = guest::Args::parse(args.into_iter()).expect("driver arguments");
        let plan = parsed.bench.expect("a bench plan");
        assert_eq!(plan.window, Duration::from_millis(2500));
        assert_eq!(
            plan.rounds,
            vec![
                vec!["baseline", "default", "noop-fentry", "no-fentry"],
                vec!["no-fentry", "noop-fentry", "default", "baseline"]
            ]
        );
        let modes: Vec<(&str, &str)> = parsed
            .modes
            .iter()
            .map(|mode| (mode.name.as_str(), mode.disable.as_str()))
            .collect();
        assert_eq!(modes, [("default", ""), ("no-fentry", "fentry")]);
        assert_eq!(
            guest::bench_args(&parsed.modes[1]),
            [
                "--listen",
                guest::LISTEN,
                "--event-log",
                "",
                "--log-level",
                "warn",
                "--scan-interval",
                "3600",
                "--disable-attach",
                "fentry"
            ]
        );
    }

    /// What a driver that measured `rates` (A, B1, B2, F per round) would write.
    fn driver_output(rates: &[[u64; 4]]) -> String {
        let mut text = guest::result_line(tag::KERNEL, tag::NO_MODE, "6.1.0-56-cloud-amd64");
        for (index, (order, rates)) in schedule(rates.len()).iter().zip(rates).enumerate() {
            for side in order {
                if side.mode().is_some() {
                    text.push_str(&guest::result_line(
                        tag::METRIC,
                        side.guest_name(),
                        &format!(
                            "idlemon_probe_info{{hook=\"send\",kind=\"{}\"}} 1",
                            side.kind()
                        ),
                    ));
                    text.push_str(&guest::result_line(tag::EXIT, side.guest_name(), "0"));
                }
                text.push_str(&guest::result_line(
                    tag::WINDOW,
                    side.guest_name(),
                    &guest::window_report(
                        index + 1,
                        Duration::from_secs(2),
                        rates[Side::ALL.iter().position(|s| s == side).unwrap_or(0)] * 2,
                        Duration::from_millis(1500),
                        index == 0,
                    ),
                ));
            }
        }
        text.push_str(&guest::result_line(tag::DONE, tag::NO_MODE, ""));
        text
    }

    #[test]
    fn pairs_windows_within_each_round() {
        let report = parse_report(&driver_output(&[
            [1000, 990, 950, 995],
            [2000, 1960, 1800, 1990],
        ]));
        assert!(report.done && report.garbled.is_empty(), "{report:?}");
        assert!(report.bad_exits.is_empty() && report.failures.is_empty());
        assert_eq!(
            report.kernel_release.as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(report.windows.len(), 8);
        assert_eq!(
            report.windows[1],
            Window {
                side: B1,
                round: 1,
                seconds: 2.0,
                transactions: 1980,
                settled: 1.5,
                steady: true,
            }
        );
        // The driver says which windows began before the load was steady.
        assert!(report.windows[..4].iter().all(|window| window.steady));
        assert!(report.windows[4..].iter().all(|window| !window.steady));
        let rounds = rounds(&report.windows);
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[0].order, [A, B1, F, B2]);
        assert_eq!(rounds[1].order, [B2, F, B1, A]);
        // Each ratio against its own round's A, not a run-wide one.
        assert_eq!(rounds[0].fentry, Some(0.99));
        assert_eq!(rounds[0].kprobe, Some(0.95));
        assert_eq!(rounds[0].floor, Some(0.995));
        assert_eq!(rounds[1].fentry, Some(0.98));
        assert_eq!(rounds[1].kprobe, Some(0.9));
        assert_eq!(rounds[1].floor, Some(0.995));
        // Over the floor: B1 over F of the same round.
        let over = rounds[1].over_floor().expect("both windows");
        assert!((over - 1960.0 / 1990.0).abs() < 1e-12, "{over}");
        let kinds = |side: Side| {
            report.hooks[&side]["send"]
                .iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(B1), ["fentry"]);
        assert_eq!(kinds(B2), ["kprobe"]);
    }

    #[test]
    fn a_missing_window_drops_only_its_ratios() {
        let window = |side, round, seconds, transactions| Window {
            side,
            round,
            seconds,
            transactions,
            settled: 1.0,
            steady: true,
        };
        let windows = vec![
            window(A, 1, 2.0, 100),
            window(B2, 1, 1.0, 45),
            window(B1, 2, 2.0, 90),
            window(A, 3, 2.0, 0),
            window(B1, 3, 2.0, 50),
        ];
        let rounds = rounds(&windows);
        assert_eq!((rounds[0].fentry, rounds[0].kprobe), (None, Some(0.9)));
        assert_eq!((rounds[0].floor, rounds[0].over_floor()), (None, None));
        // No A window, or one that counted nothing: no ratio at all.
        assert_eq!((rounds[1].fentry, rounds[1].kprobe), (None, None));
        assert_eq!((rounds[2].fentry, rounds[2].kprobe), (None, None));
    }

    #[test]
    fn reports_what_went_wrong_and_rejects_bad_lines() {
        let text = "\
KERNEL - 6.12.117+deb12-cloud-amd64
FAIL default ready GET /readyz not 200 after 60 s
EXIT default code=1
LOG default error: cannot attach
WINDOW baseline round=1 seconds=2.0 settled=1.00 steady=1
WINDOW baseline round=x seconds=2.0 transactions=5 settled=1.00 steady=1
WINDOW baseline round=1 seconds=0 transactions=5 settled=1.00 steady=1
WINDOW baseline round=1 seconds=2.0 transactions=5 settled=1.00 steady=yes
WINDOW somebody round=1 seconds=2.0 transactions=5 settled=1.00 steady=1
EXIT no-fentry 0
READY no-fentry 1.20 ready
";
        let report = parse_report(text);
        assert!(!report.done);
        assert!(report.windows.is_empty());
        assert_eq!(
            report.failures,
            ["default: ready GET /readyz not 200 after 60 s"]
        );
        assert_eq!(report.bad_exits, ["B1: code=1"]);
        assert_eq!(report.log, ["default: error: cannot attach"]);
        assert_eq!(report.garbled.len(), 5, "{:?}", report.garbled);
    }
}
