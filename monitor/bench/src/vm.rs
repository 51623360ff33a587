//! Part 5 (`--only vm`): what the fentry and kprobe hooks cost, which this
//! host's kernel refuses (it is built without kprobes and refuses fentry),
//! on the kernels EKS nodes run.
//! Debian's 6.1 and 6.12 cloud kernels boot once each under qemu TCG with
//! the test kit's VM harness (`idlemon_testkit::vm`), and this binary's
//! `vm-guest` mode inside (`vm/guest.rs`) alternates windows of one 1-byte
//! ping-pong (`ping_pong.rs`, the overhead part's load) without idlemon
//! (A), with idlemon attaching as it does by default, by fentry (B1), and
//! with `--disable-attach fentry`, by kprobe (B2); its walks are an hour
//! apart there (`vm/guest.rs` says why). A fourth side (F) has no idlemon
//! but a program that does nothing on each of the two functions idlemon's
//! per-packet hooks attach to by fentry (`noop.rs`): F/A is the floor of
//! any fentry program there, and B1/F what idlemon's code costs over it.
//! Only ratios within one round are printed: emulation makes every absolute
//! rate meaningless, but both sides of a ratio are emulated alike.
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

pub mod guest;
pub mod protocol;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use idlemon_testkit::{
    attach::{HOOKS, Target, expected_kinds},
    vm::{self as harness, Arch, Series},
};

use self::protocol::{self as tag, GuestArgs, Round as Plan, Side, Window};
use super::{
    Bench, interrupted,
    table::{Check, Summary, Table},
};
use Side::{A, B1, B2, F};

/// The kernels, in the order they boot.
const KERNELS: [Series; 2] = [Series::V6_1, Series::V6_12];
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
/// Boot, the guest's setup and a margin.
const BOOT_BUDGET: Duration = Duration::from_secs(90);
/// Where the guest binary and the daemon sit in the VM.
const GUEST_BINARY: &str = "/idlemon-bench";

/// The attach kind a side is named after.
fn kind(side: Side) -> &'static str {
    match side {
        A => "none",
        B1 => "fentry",
        B2 => "kprobe",
        F => "no-op fentry",
    }
}

fn flags(side: Side) -> &'static str {
    match side {
        A => "no idlemon",
        B1 => "default attach kinds",
        B2 => "--disable-attach fentry",
        F => "no idlemon, a no-op fentry program on tcp_sendmsg and tcp_rcv_established",
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

/// The guest's arguments: the daemon where the harness puts it, the windows.
fn guest_args(idlemon: &str, rounds: usize, window: Duration) -> GuestArgs {
    GuestArgs {
        out: "-".into(),
        idlemon: idlemon.into(),
        ready_timeout: READY_TIMEOUT.as_secs(),
        bench_window: window.as_secs_f64(),
        rounds: schedule(rounds)
            .into_iter()
            .map(|round| Plan(round.to_vec()))
            .collect(),
    }
}

/// What the guest reported in one boot.
#[derive(Debug, Default)]
struct Report {
    kernel_release: Option<String>,
    windows: Vec<Window>,
    /// Per B side, hook -> the attach kinds it showed over its windows.
    hooks: BTreeMap<Side, BTreeMap<String, BTreeSet<String>>>,
    failures: Vec<String>,
    log: Vec<String>,
    done: bool,
    /// Lines this parser does not know: a guest and a host out of step.
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
        let side = who.parse::<Side>().ok();
        match (tag, side) {
            (tag::KERNEL, None) => report.kernel_release = Some(rest.to_owned()),
            (tag::DONE, None) => report.done = true,
            (tag::WINDOW, Some(side)) => match Window::parse(side, rest) {
                Some(window) => report.windows.push(window),
                None => report.garbled.push(line.to_owned()),
            },
            (tag::HOOKS, Some(side)) => {
                for (hook, kind) in rest
                    .split_whitespace()
                    .filter_map(|pair| pair.split_once('='))
                {
                    report
                        .hooks
                        .entry(side)
                        .or_default()
                        .entry(hook.to_owned())
                        .or_default()
                        .insert(kind.to_owned());
                }
            }
            (tag::FAIL, _) => report.failures.push(format!("{who}: {rest}")),
            (tag::LOG, _) => report.log.push(format!("{who}: {rest}")),
            _ => report.garbled.push(line.to_owned()),
        }
    }
    report
}

/// The ratios of one round: each other window's rate over the A window's.
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

/// The guest: this binary, built optimized as the ping-pong on the host is
/// not, so that the load's own instructions weigh what they did in the
/// driver it replaces (opt-level 2), not a debug build's.
fn build_guest() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("bench: cargo build --release --package idlemon-bench (the vm guest)");
    let status = Command::new(&cargo)
        .args(["build", "--release", "--package", "idlemon-bench"])
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("building the vm guest failed ({status})");
    }
    let guest = Path::new("target/release/idlemon-bench");
    fs::canonicalize(guest).with_context(|| format!("no {} after the build", guest.display()))
}

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let rounds = bench.settings.vm_rounds;
    let window = bench.settings.vm_window;
    // The bench runs in the workspace (`cargo xtask bench`).
    let cache = std::env::current_dir()
        .context("cannot read the current directory")?
        .join("target/vm-cache");
    // Apart from vm-test's files, so that the two never overwrite each other.
    let work = cache.join("bench");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let daemon = harness::Daemon::Binary(
        fs::canonicalize(&bench.binary)
            .with_context(|| format!("cannot find {}", bench.binary.display()))?,
    );
    let args = guest_args(daemon.inside(), rounds, window);
    let guest = harness::Guest {
        arch: Arch::Amd64,
        daemon: &daemon,
        programs: vec![(build_guest()?, GUEST_BINARY.to_owned())],
        script: format!(
            "ip link set lo up\n{GUEST_BINARY} {} {}\n",
            tag::GUEST_COMMAND,
            args.to_args().join(" ")
        ),
    };
    let (kernels, initrd) = harness::prepare(&cache, &work, &KERNELS, &guest)?;
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
        let label = kernel.label();
        println!("\n-- {label}: {} --", kernel.package);
        match measure(kernel, &initrd, &work, timeout) {
            Ok(measured) => {
                report(bench, Target::Vm(kernel.arch, kernel.series), &measured);
                if !measured.problems.is_empty() {
                    println!(
                        "{label} FAILED (console: {}):\n  {}",
                        measured.console_log.display(),
                        measured.problems.join("\n  ")
                    );
                    failed.push(label);
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
                failed.push(label);
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
    Ok(Measured {
        rounds: rounds(&report.windows),
        problems: problems(booted.problem, &report),
        report,
        console_log: booted.console_log,
    })
}

/// What went wrong in one boot: the harness's word, then the guest's.
fn problems(boot: Option<String>, report: &Report) -> Vec<String> {
    let mut problems: Vec<String> = boot.into_iter().collect();
    if !report.done {
        problems.push("the guest did not get to its end".to_owned());
    }
    problems.extend(
        report
            .failures
            .iter()
            .map(|failure| format!("guest: {failure}")),
    );
    if !report.garbled.is_empty() {
        problems.push(format!(
            "{} result lines not understood, first: {}",
            report.garbled.len(),
            report.garbled[0]
        ));
    }
    if !problems.is_empty() {
        let tail = report.log.len().saturating_sub(20);
        problems.extend(report.log[tail..].iter().map(|line| format!("log {line}")));
    }
    problems
}

fn check_name(label: &str, side: Side) -> String {
    format!(
        "vm {label}: ping-pong {side}/A, {} (median of rounds)",
        kind(side)
    )
}

/// The attach kinds a B side showed, in vm-test's hook order, and the hooks
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
        if kinds.len() != 1 || !expected_kinds(target, mode, hook).contains(&kinds[0]) {
            unexpected.push(format!("{hook}={shown}"));
        }
        parts.push(format!("{hook}={shown}"));
    }
    (parts.join(" "), unexpected)
}

fn report(bench: &mut Bench, target: Target, measured: &Measured) {
    let Measured { report, rounds, .. } = measured;
    let label = &target.label();
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
        let unexpected = if side.mode().is_some() {
            let (hooks, unexpected) = hooks_line(target, side, report);
            println!("hooks attached, {side} ({}): {hooks}", flags(side));
            unexpected
        } else {
            Vec::new()
        };
        let ratios: Vec<f64> = rounds
            .iter()
            .filter_map(|round| round.ratio(side))
            .collect();
        let summary = Summary::of(&ratios);
        table.summary_row(
            &format!("ping-pong {side}/A ({})", kind(side)),
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
            Some(_) => Check::info(&check_name(label, side), measured),
            None => Check::new(&check_name(label, side), measured, "-", None),
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
    fn the_guest_gets_the_schedule() {
        let args = guest_args("/idlemon", 2, Duration::from_millis(2500));
        assert_eq!(args.window(), Duration::from_millis(2500));
        assert_eq!(
            args.rounds,
            [Plan(vec![A, B1, F, B2]), Plan(vec![B2, F, B1, A])]
        );
    }

    /// What a guest that measured `rates` (A, B1, B2, F per round) would write.
    fn guest_output(rates: &[[u64; 4]]) -> String {
        let mut text = tag::line(tag::KERNEL, None, "6.1.0-56-cloud-amd64");
        for (index, (order, rates)) in schedule(rates.len()).iter().zip(rates).enumerate() {
            for side in order {
                if side.mode().is_some() {
                    text.push_str(&tag::line(
                        tag::HOOKS,
                        Some(*side),
                        &format!("send={} state=tp_btf", kind(*side)),
                    ));
                }
                let window = Window {
                    side: *side,
                    round: index + 1,
                    seconds: 2.0,
                    transactions: rates[Side::ALL.iter().position(|s| s == side).unwrap_or(0)] * 2,
                    settled: 1.5,
                    steady: index == 0,
                };
                text.push_str(&tag::line(tag::WINDOW, Some(*side), &window.rest()));
            }
        }
        text.push_str(&tag::line(tag::DONE, None, ""));
        text
    }

    #[test]
    fn pairs_windows_within_each_round() {
        let report = parse_report(&guest_output(&[
            [1000, 990, 950, 995],
            [2000, 1960, 1800, 1990],
        ]));
        assert!(report.done && report.garbled.is_empty(), "{report:?}");
        assert!(report.failures.is_empty());
        assert!(problems(None, &report).is_empty());
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
        // The guest says which windows began before the load was steady.
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
        // Only send and state were reported: the rest is unexpected.
        let (line, unexpected) = hooks_line(Target::Vm(Arch::Amd64, Series::V6_1), B1, &report);
        assert!(line.starts_with("send=fentry receive=? "), "{line}");
        assert_eq!(unexpected.len(), 5, "{unexpected:?}");
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
FAIL B1 ready idlemon not ready after 60s; its stderr:
LOG B1 error: cannot attach
WINDOW A round=1 seconds=2.0 settled=1.00 steady=1
WINDOW A round=1 seconds=0 transactions=5 settled=1.00 steady=1
WINDOW somebody round=1 seconds=2.0 transactions=5 settled=1.00 steady=1
HOOKS - send=fentry
";
        let report = parse_report(text);
        assert!(!report.done);
        assert!(report.windows.is_empty());
        assert_eq!(
            report.failures,
            ["B1: ready idlemon not ready after 60s; its stderr:"]
        );
        assert_eq!(report.log, ["B1: error: cannot attach"]);
        assert_eq!(report.garbled.len(), 4, "{:?}", report.garbled);
        let problems = problems(Some("timed out".to_owned()), &report);
        assert_eq!(problems[0], "timed out");
        assert_eq!(problems[1], "the guest did not get to its end");
        assert_eq!(
            problems.last().map(String::as_str),
            Some("log B1: error: cannot attach")
        );
    }
}
