//! `idlemon-bench vm-guest`: the vm part inside each VM, as root. One 1-byte
//! ping-pong (`ping_pong.rs`, the overhead part's load) runs for the whole
//! boot, and is measured in windows of each side in the order the host
//! gives (`vm.rs` owns the schedule and computes the ratios): A without
//! idlemon, B1 and B2 with idlemon started and stopped around the window,
//! F with the no-op fentry programs (`noop.rs`) held for it. It judges
//! nothing: it writes result lines (`protocol.rs`) and the host reads them.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use idlemon_testkit::metrics;

use super::protocol::{self as tag, GuestArgs, Side, Window};
use crate::{daemon::Daemon, noop, ping_pong::PingPong};

/// idlemon's `--scan-interval` in a B window: no walk during the run. On
/// the guest's one vCPU a walk pauses the ping-pong for milliseconds, and
/// the connection then ran about 10% slower for one to three seconds (seen
/// on 6.12; not once with walks a minute apart): a cost of having one CPU,
/// not of the hooks' attach kind, which is what the part compares. The
/// walks' own cost is the idle and scale parts' business.
const SCAN_INTERVAL: &str = "3600";
/// Before each window, at least this long: attaching and detaching cost CPU
/// that belongs to neither side.
const SETTLE_MIN: Duration = Duration::from_secs(1);
/// And then until `SETTLE_SLICES` consecutive slices of the load agree
/// within `SETTLE_AGREE`. After the load is paused (idlemon's start loads
/// its programs on the only vCPU, its stop frees them) the connection ran up
/// to 10% slower for several seconds before it was back at its steady rate,
/// which windows then repeat to within 0.5% (on 6.12, 0.01%).
const SETTLE_SLICE: Duration = Duration::from_millis(500);
const SETTLE_SLICES: usize = 3;
const SETTLE_AGREE: f64 = 0.002;
/// A load that never steadies is measured anyway; its window says so.
const SETTLE_MAX: Duration = Duration::from_secs(15);
/// Before the load starts, the guest must be idle but for this share of its
/// CPU over two slices: the kernel's own start-up work (crypto self-tests on
/// 6.12) goes on after /init runs, steadily enough to pass for the load's
/// rate, and took 45% of the first window.
const QUIET_BUSY: f64 = 0.05;
const QUIET_MAX: Duration = Duration::from_secs(60);
/// Lines of a failed daemon's log sent back.
const LOG_TAIL_LINES: usize = 40;

/// The result channel. In the VM it is a serial port of its own, so that
/// kernel messages on the console cannot cut into a line.
struct Out(Box<dyn Write>, Option<std::fs::File>);

impl Out {
    fn open(args: &GuestArgs) -> anyhow::Result<Self> {
        if args.out.as_os_str() == "-" {
            return Ok(Self(Box::new(io::stdout()), None));
        }
        let file = OpenOptions::new()
            .write(true)
            .open(&args.out)
            .map_err(|error| {
                anyhow::anyhow!(
                    "cannot open the result channel {}: {error}",
                    args.out.display()
                )
            })?;
        Ok(Self(Box::new(file.try_clone()?), Some(file)))
    }

    fn emit(&mut self, tag: &str, side: Option<Side>, rest: &str) {
        // Nobody could hear a failure to report: the host notices the missing lines.
        let _ = self.0.write_all(tag::line(tag, side, rest).as_bytes());
        let _ = self.0.flush();
    }

    /// A failed step; a message of several lines (a daemon's last words)
    /// goes on as LOG lines.
    fn fail(&mut self, side: Option<Side>, step: &str, error: &anyhow::Error) {
        let text = format!("{error:#}");
        let mut lines = text.lines();
        eprintln!(
            "vm-guest: {}: {step} failed: {text}",
            side.map_or("-", Side::label)
        );
        self.emit(
            tag::FAIL,
            side,
            &format!("{step} {}", lines.next().unwrap_or("")),
        );
        let rest: Vec<&str> = lines.collect();
        for line in &rest[rest.len().saturating_sub(LOG_TAIL_LINES)..] {
            self.emit(tag::LOG, side, line);
        }
    }

    /// Waits until the serial port has sent everything: the VM powers off
    /// right after the guest exits.
    fn drain(&mut self) {
        let _ = self.0.flush();
        let fd = self
            .1
            .as_ref()
            .map_or(io::stdout().as_raw_fd(), |file| file.as_raw_fd());
        // SAFETY: fd is open for as long as self lives; tcdrain only fails
        // (ENOTTY) on a channel that is not a terminal.
        unsafe { libc::tcdrain(fd) };
    }
}

/// The guest's whole run; what fails is reported, not returned.
pub fn run(args: &GuestArgs) -> anyhow::Result<()> {
    let mut out = Out::open(args)?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    out.emit(tag::KERNEL, None, release.trim());
    if let Err(error) = run_bench(args, &mut out) {
        out.fail(None, "bench", &error);
    }
    out.emit(tag::DONE, None, "");
    out.drain();
    Ok(())
}

/// One ping-pong load for the whole run, so that between one window and
/// the next only idlemon changes (not the connection), and a daemon started
/// and stopped around each of its windows. A daemon's programs stay
/// attached for as long as it runs, so an A window needs it gone, and the
/// two modes cannot share one; a start costs 1 to 5 s of the guest's time
/// (the verifier, emulated), which the settle before each window keeps out
/// of the measurement.
fn run_bench(args: &GuestArgs, out: &mut Out) -> anyhow::Result<()> {
    let waited = wait_quiet();
    eprintln!(
        "vm-guest: the guest was idle after {:.1} s",
        waited.as_secs_f64()
    );
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    drop(listener);
    let mut load = PingPong::start(client, server).map_err(anyhow::Error::msg)?;
    let rounds = args.rounds.len();
    for (index, round) in args.rounds.iter().enumerate() {
        eprintln!("vm-guest: round {}/{rounds}: {round}", index + 1);
        for side in &round.0 {
            match window(args, index + 1, *side, &mut load, out) {
                Ok(window) => out.emit(tag::WINDOW, Some(*side), &window.rest()),
                // Without the load there is nothing left to measure.
                Err(Failure::Load(error)) => return Err(error),
                // A side that failed costs its window only.
                Err(Failure::Side(step, error)) => out.fail(Some(*side), step, &error),
            }
        }
    }
    load.stop().map_err(anyhow::Error::msg)
}

enum Failure {
    Load(anyhow::Error),
    Side(&'static str, anyhow::Error),
}

fn load_failed(error: String) -> Failure {
    Failure::Load(anyhow::Error::msg(error))
}

/// One window of `side`, with its idlemon or its no-op programs set up first.
fn window(
    args: &GuestArgs,
    round: usize,
    side: Side,
    load: &mut PingPong,
    out: &mut Out,
) -> Result<Window, Failure> {
    let mut daemon = None;
    // The floor: programs that do nothing where idlemon's per-packet hooks
    // attach by fentry, held for the window.
    let mut _floor = Vec::new();
    match side.mode() {
        None if side == Side::F => {
            for function in tag::FLOOR_FUNCTIONS {
                _floor.push(
                    noop::Floor::fentry(function).map_err(|error| Failure::Side("start", error))?,
                );
            }
        }
        None => {}
        Some(mode) => {
            let mut flags = vec!["--scan-interval".to_owned(), SCAN_INTERVAL.to_owned()];
            if !mode.disable().is_empty() {
                flags.extend(["--disable-attach".to_owned(), mode.disable().to_owned()]);
            }
            let mut running = Daemon::start(&args.idlemon, &flags)
                .map_err(|error| Failure::Side("start", error))?;
            let hooks = running
                .wait_ready(args.ready_timeout())
                .and_then(|_| running.metrics())
                .map_err(|error| Failure::Side("ready", error))?;
            let hooks: Vec<String> = metrics::probe_info(&hooks.0)
                .into_iter()
                .map(|(hook, kind)| format!("{hook}={kind}"))
                .collect();
            out.emit(tag::HOOKS, Some(side), &hooks.join(" "));
            daemon = Some(running);
        }
    }
    let (settled, steady) = settle(load).map_err(load_failed)?;
    let (first, started) = (load.transactions().map_err(load_failed)?, Instant::now());
    thread::sleep(args.window());
    let (last, ended) = (load.transactions().map_err(load_failed)?, Instant::now());
    if let Some(mut daemon) = daemon {
        // A daemon that died during the window leaves it half measured.
        daemon
            .check_alive()
            .map_err(|error| Failure::Side("window", error))?;
        daemon
            .stop()
            .map_err(|error| Failure::Side("stop", error))?;
    }
    Ok(Window {
        side,
        round,
        seconds: ended.duration_since(started).as_secs_f64(),
        transactions: last.saturating_sub(first),
        settled: settled.as_secs_f64(),
        steady,
    })
}

/// Waits until the load runs steadily (`SETTLE_MIN`, `SETTLE_AGREE`), at
/// most `SETTLE_MAX`, and says how long that took and whether it did.
fn settle(load: &mut PingPong) -> Result<(Duration, bool), String> {
    let started = Instant::now();
    let (mut count, mut at) = (load.transactions()?, Instant::now());
    let mut rates = Vec::new();
    loop {
        thread::sleep(SETTLE_SLICE);
        let (now, now_at) = (load.transactions()?, Instant::now());
        rates.push(now.saturating_sub(count) as f64 / now_at.duration_since(at).as_secs_f64());
        (count, at) = (now, now_at);
        let elapsed = started.elapsed();
        let last = &rates[rates.len().saturating_sub(SETTLE_SLICES)..];
        if elapsed >= SETTLE_MIN && last.len() == SETTLE_SLICES && steady(last) {
            return Ok((elapsed, true));
        }
        if elapsed >= SETTLE_MAX {
            return Ok((elapsed, false));
        }
    }
}

/// Waits until the CPU is idle (`QUIET_BUSY`, `QUIET_MAX`), and says how long that took.
fn wait_quiet() -> Duration {
    let started = Instant::now();
    let mut last = cpu_ticks();
    let mut quiet_slices = 0;
    while quiet_slices < 2 && started.elapsed() < QUIET_MAX {
        thread::sleep(SETTLE_SLICE);
        let now = cpu_ticks();
        let busy = match (last, now) {
            (Some(last), Some(now)) => busy_share(last, now),
            // Without /proc/stat there is nothing to wait for.
            _ => 0.0,
        };
        quiet_slices = if busy <= QUIET_BUSY {
            quiet_slices + 1
        } else {
            0
        };
        last = now;
    }
    started.elapsed()
}

/// (busy, all) ticks of every CPU together, from /proc/stat.
fn cpu_ticks() -> Option<(u64, u64)> {
    parse_cpu_ticks(&fs::read_to_string("/proc/stat").ok()?)
}

/// (busy, all) from /proc/stat's `cpu` line: idle and iowait are not busy.
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let all: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((all.saturating_sub(idle), all))
}

/// The busy share of the ticks between two readings.
fn busy_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    let all = after.1.saturating_sub(before.1);
    if all == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 / all as f64
}

/// Whether the slices' rates all lie within `SETTLE_AGREE` of the slowest.
fn steady(rates: &[f64]) -> bool {
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let fastest = rates.iter().copied().fold(0.0, f64::max);
    slowest > 0.0 && slowest.is_finite() && fastest / slowest - 1.0 <= SETTLE_AGREE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_is_steady_when_its_slices_agree() {
        assert!(steady(&[1000.0, 1001.0, 999.5]));
        assert!(!steady(&[1000.0, 1001.0, 1003.0]));
        // A slow recovery: each slice within 0.2% of the one before, but not
        // the first of the third.
        assert!(!steady(&[997.0, 998.5, 1000.0]));
        // A load that did nothing is not steady, it is stuck.
        assert!(!steady(&[0.0, 0.0, 0.0]));
        assert!(!steady(&[]));
    }

    #[test]
    fn reads_how_busy_the_guest_is() {
        let before = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\nintr 1\n";
        let after = "cpu  110 0 55 880 55 0 0 0 0 0\n";
        let (before, after) = (
            parse_cpu_ticks(before).expect("parsed"),
            parse_cpu_ticks(after).expect("parsed"),
        );
        assert_eq!(before, (150, 1000));
        assert_eq!(after, (165, 1100));
        assert!((busy_share(before, after) - 0.15).abs() < 1e-9);
        assert_eq!(busy_share(after, after), 0.0);
        assert_eq!(parse_cpu_ticks("cpu0 1 2 3 4\n"), None);
    }
}
