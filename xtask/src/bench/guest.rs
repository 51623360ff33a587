//! The test driver that `cargo xtask vm-test` runs inside each VM, and on the
//! host in a fresh network namespace: it starts idlemon once per attach mode,
//! plays the loopback scenario against it, and reports what it saw as result
//! lines (`TAG MODE REST`). It judges nothing: the host parses and checks the
//! lines (`results.rs`), so that every expectation lives in one place, on the
//! host, under unit tests.
//!
//! With `--bench-round`, it runs the vm part of `cargo xtask bench` instead:
//! one 1-byte ping-pong for the whole run, measured in windows without
//! idlemon and with it in each mode, in the order the host gives
//! (`bench/vm.rs` owns the schedule and computes the ratios).
//!
//! It is built by plain `rustc` from this one file (std only), not as a cargo
//! binary: a second binary in the xtask package would make `cargo xtask`
//! (`cargo run -p xtask`) ambiguous. The xtask crate also compiles this file
//! as a module of its tests, so clippy and the unit tests cover it; `main` is
//! then unused, hence the allowance.
#![cfg_attr(test, allow(dead_code))]

use std::{
    ffi::{c_int, c_void},
    fmt::Display,
    fs::{self, File},
    io::{self, Read as _, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Where idlemon listens in the guest (or the fresh network namespace), so
/// nothing else can hold the port.
pub const LISTEN: &str = "127.0.0.1:9781";
/// Where idlemon serves the connection data (/sockets, /events): its default
/// `--api-listen`.
pub const API_LISTEN: &str = "127.0.0.1:9782";

/// The daemon's settings: a threshold and a timeout of seconds instead of
/// minutes, so that the whole scenario fits in a few seconds per mode.
pub const IDLE_THRESHOLD: &str = "1";
pub const IDLE_TIMEOUT: &str = "3";
pub const SCAN_INTERVAL: &str = "0.5";

/// idlemon treats loopback as having no middlebox unless the config says so.
pub const CONFIG: &str =
    "[[path]]\nname = \"vm-test-loopback\"\ncidr = \"127.0.0.0/8\"\nidle_timeout = 3\n";

/// How long the connections stay quiet before the sockets are read: past the
/// 1 s threshold plus a scan interval.
const QUIET_BEFORE_SCAN: Duration = Duration::from_millis(2000);
/// How long the reset connection stays quiet before its RST: past the 3 s
/// path timeout, so that idlemon must classify it `idle_timeout_suspected`.
const QUIET_BEFORE_RESET: Duration = Duration::from_millis(3800);
/// How long to wait for idlemon's walk or event stream to show what the
/// scenario did, before reporting whatever it shows.
const SETTLE: Duration = Duration::from_secs(12);
/// How long idlemon gets to exit after SIGTERM (detaching under emulation is slow).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TAIL_LINES: usize = 40;

// Built alone by rustc, the driver has the protocol file as its own module;
// as a module of xtask's tests, it shares xtask's.
#[cfg(not(test))]
#[path = "protocol.rs"]
mod protocol;
#[cfg(test)]
use super::protocol;

// The ping-pong of the bench's overhead part (in the bench crate, which
// xtask does not build), included by path in both builds.
#[path = "../../../monitor/bench/src/ping_pong.rs"]
mod ping_pong;

// The bench's no-op programs (the F side's floor), shared the same way.
#[cfg(not(test))]
#[path = "../bench/noop.rs"]
#[allow(dead_code)]
mod noop;
#[cfg(test)]
use crate::bench::noop;

use protocol as tag;
use protocol::NO_MODE;

type Result<T> = std::result::Result<T, String>;

pub fn main() {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("vm-guest: {error}");
            std::process::exit(2);
        }
    };
    let mut out = match Out::open(&args.out) {
        Ok(out) => out,
        Err(error) => {
            eprintln!("vm-guest: {error}");
            std::process::exit(2);
        }
    };
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    out.emit(tag::KERNEL, NO_MODE, release.trim());
    match (setup(&args), &args.bench) {
        (Ok(()), Some(plan)) => {
            if let Err(error) = run_bench(&args, plan, &mut out) {
                out.emit(tag::FAIL, NO_MODE, &format!("bench {error}"));
            }
        }
        (Ok(()), None) => {
            for mode in &args.modes {
                run_mode(&args, mode, &mut out);
            }
        }
        (Err(error), _) => out.emit(tag::FAIL, NO_MODE, &format!("setup {error}")),
    }
    out.emit(tag::DONE, NO_MODE, "");
    out.drain();
}

#[derive(Debug, PartialEq)]
pub struct Mode {
    pub name: String,
    /// The `--disable-attach` list, empty for none.
    pub disable: String,
}

#[derive(Debug)]
pub struct Args {
    /// A file (the VM's second serial port) or `-` for stdout.
    pub out: String,
    pub idlemon: PathBuf,
    pub workdir: PathBuf,
    pub ready_timeout: Duration,
    pub modes: Vec<Mode>,
    /// The bench's windows, instead of the scenario.
    pub bench: Option<BenchPlan>,
}

/// The bench's windows: rounds of sides, each `protocol::BASELINE` or a mode's name.
#[derive(Debug, PartialEq)]
pub struct BenchPlan {
    pub window: Duration,
    pub rounds: Vec<Vec<String>>,
}

impl Args {
    pub fn parse(mut args: impl Iterator<Item = String>) -> Result<Self> {
        let mut out = "-".to_owned();
        let mut idlemon = None;
        let mut workdir = PathBuf::from("/tmp");
        let mut ready_timeout = Duration::from_secs(120);
        let mut modes = Vec::new();
        let mut window = None;
        let mut rounds = Vec::new();
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--out" => out = value()?,
                "--idlemon" => idlemon = Some(PathBuf::from(value()?)),
                "--workdir" => workdir = PathBuf::from(value()?),
                "--ready-timeout" => {
                    let text = value()?;
                    let seconds: u64 = text
                        .parse()
                        .map_err(|_| format!("--ready-timeout takes whole seconds, got {text}"))?;
                    ready_timeout = Duration::from_secs(seconds);
                }
                // NAME:DISABLE, e.g. `no-fentry:fentry`; the host owns the list.
                "--mode" => {
                    let text = value()?;
                    let (name, disable) = text.split_once(':').unwrap_or((&text, ""));
                    if name.is_empty() || name.contains(char::is_whitespace) {
                        return Err(format!("--mode takes NAME:DISABLE-LIST, got {text:?}"));
                    }
                    modes.push(Mode {
                        name: name.to_owned(),
                        disable: disable.to_owned(),
                    });
                }
                "--bench-window" => {
                    let text = value()?;
                    let seconds: f64 = text
                        .parse()
                        .ok()
                        .filter(|seconds: &f64| seconds.is_finite() && *seconds > 0.0)
                        .ok_or_else(|| format!("--bench-window takes seconds, got {text}"))?;
                    window = Some(Duration::from_secs_f64(seconds));
                }
                // SIDE,SIDE,...: one round, in the order its windows run.
                "--bench-round" => {
                    rounds.push(value()?.split(',').map(str::to_owned).collect());
                }
                _ => return Err(format!("unknown argument {flag}")),
            }
        }
        let bench = match (window, rounds.is_empty()) {
            (None, true) => None,
            (Some(window), false) => Some(BenchPlan { window, rounds }),
            _ => return Err("--bench-window and --bench-round go together".to_owned()),
        };
        for side in bench.iter().flat_map(|plan| plan.rounds.iter().flatten()) {
            if side != tag::BASELINE
                && side != tag::FLOOR
                && !modes.iter().any(|mode: &Mode| mode.name == *side)
            {
                return Err(format!(
                    "--bench-round names {side:?}, which is neither {}, {} nor a --mode",
                    tag::BASELINE,
                    tag::FLOOR
                ));
            }
        }
        Ok(Self {
            out,
            idlemon: idlemon.ok_or("--idlemon PATH is required")?,
            workdir,
            ready_timeout,
            modes,
            bench,
        })
    }
}

/// The result channel. In the VM it is a serial port of its own, so that
/// kernel messages on the console cannot cut into a line.
struct Out {
    sink: Box<dyn Write>,
    fd: Option<c_int>,
}

impl Out {
    fn open(target: &str) -> Result<Self> {
        if target == "-" {
            return Ok(Self {
                sink: Box::new(io::stdout()),
                fd: None,
            });
        }
        let file = fs::OpenOptions::new()
            .write(true)
            .open(target)
            .map_err(|error| format!("cannot open the result channel {target}: {error}"))?;
        let fd = file.as_raw_fd();
        Ok(Self {
            sink: Box::new(file),
            fd: Some(fd),
        })
    }

    fn emit(&mut self, tag: &str, mode: &str, rest: &str) {
        let line = result_line(tag, mode, rest);
        // Nobody could hear a failure to report: the host notices the missing lines.
        let _ = self.sink.write_all(line.as_bytes());
        let _ = self.sink.flush();
    }

    fn fail(&mut self, mode: &str, step: &str, message: impl Display) {
        eprintln!("vm-guest: {mode}: {step} failed: {message}");
        self.emit(tag::FAIL, mode, &format!("{step} {message}"));
    }

    /// Waits until the serial port has sent everything: the VM powers off
    /// right after the driver exits.
    fn drain(&mut self) {
        if let Some(fd) = self.fd {
            // SAFETY: fd is the open file owned by self.sink.
            unsafe { tcdrain(fd) };
        }
    }
}

/// One result line; the rest of the line is kept on one line whatever it holds.
pub fn result_line(tag: &str, mode: &str, rest: &str) -> String {
    let rest: String = rest
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if rest.is_empty() {
        format!("{tag} {mode}\n")
    } else {
        format!("{tag} {mode} {rest}\n")
    }
}

fn setup(args: &Args) -> Result<()> {
    // The VM's /init brings loopback up too; a fresh network namespace has it down.
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|error| format!("cannot run `ip link set lo up`: {error}"))?;
    if !status.success() {
        return Err(format!("`ip link set lo up` failed ({status})"));
    }
    fs::create_dir_all(&args.workdir)
        .map_err(|error| format!("cannot create {}: {error}", args.workdir.display()))?;
    let config = args.workdir.join("idlemon-vm-test.toml");
    fs::write(&config, CONFIG)
        .map_err(|error| format!("cannot write {}: {error}", config.display()))
}

struct Failure {
    step: &'static str,
    message: String,
}

fn failed(step: &'static str) -> impl Fn(String) -> Failure {
    move |message| Failure { step, message }
}

fn run_mode(args: &Args, mode: &Mode, out: &mut Out) {
    eprintln!(
        "vm-guest: {}: starting idlemon (--disable-attach {:?})",
        mode.name, mode.disable
    );
    let log = args.workdir.join(format!("idlemon-{}.log", mode.name));
    let mut daemon = match Daemon::start(&args.idlemon, scenario_args(args, mode), &log) {
        Ok(daemon) => daemon,
        Err(error) => {
            out.fail(&mode.name, "start", error);
            return;
        }
    };
    out.emit(tag::START, &mode.name, &daemon.args.join(" "));
    if let Err(failure) = scenario(args, mode, &mut daemon, out) {
        out.fail(&mode.name, failure.step, failure.message);
    }
    let status = daemon.stop();
    eprintln!("vm-guest: {}: idlemon stopped: {status}", mode.name);
    out.emit(tag::EXIT, &mode.name, &status);
    emit_log_tail(out, &mode.name, &log);
}

fn emit_log_tail(out: &mut Out, mode: &str, log: &Path) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
        out.emit(tag::LOG, mode, line);
    }
}

fn scenario(
    args: &Args,
    mode: &Mode,
    daemon: &mut Daemon,
    out: &mut Out,
) -> std::result::Result<(), Failure> {
    let name = mode.name.as_str();
    let started = Instant::now();
    let readiness = daemon
        .wait_ready(args.ready_timeout)
        .map_err(failed("ready"))?;
    let ready = started.elapsed().as_secs_f64();
    eprintln!("vm-guest: {name}: idlemon {readiness} after {ready:.1} s");
    out.emit(tag::READY, name, &ready_report(ready, &readiness));

    let (status, metrics) = get("/metrics").map_err(failed("metrics"))?;
    if status != 200 {
        return Err(failed("metrics")(format!("GET /metrics answered {status}")));
    }
    for line in metrics.lines() {
        if line.starts_with("idlemon_probe_info{")
            || line.starts_with("idlemon_degraded{")
            || line.starts_with("idlemon_scan_file_walk_available ")
        {
            out.emit(tag::METRIC, name, line);
        }
    }

    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|error| failed("connect")(format!("cannot listen on loopback: {error}")))?;
    let idle = Pair::connect(&listener, false).map_err(failed("connect"))?;
    let keepalive = Pair::connect(&listener, true).map_err(failed("connect"))?;
    let reset = Pair::connect(&listener, false).map_err(failed("connect"))?;
    let refused_port = closed_port().map_err(failed("connect"))?;
    let quiet_since = Instant::now();
    let ports = [idle.port, keepalive.port, reset.port];
    out.emit(
        tag::PORTS,
        name,
        &format!(
            "idle={} keepalive={} reset={} refused={refused_port}",
            ports[0], ports[1], ports[2]
        ),
    );

    thread::sleep(QUIET_BEFORE_SCAN);
    let idle_local = local_field(idle.port);
    let keepalive_local = local_field(keepalive.port);
    let deadline = Instant::now() + SETTLE;
    let (at_risk, all) = loop {
        let at_risk = get_ok("/sockets?at_risk=true").map_err(failed("sockets"))?;
        let all = get_ok("/sockets").map_err(failed("sockets"))?;
        // Both sockets must have been walked; whether they are judged right
        // is the host's business.
        if (at_risk.contains(&idle_local) && all.contains(&keepalive_local))
            || Instant::now() > deadline
        {
            break (at_risk, all);
        }
        thread::sleep(Duration::from_millis(500));
    };
    for element in json_elements_mentioning(&at_risk, &ports) {
        out.emit(tag::AT_RISK, name, element);
    }
    for element in json_elements_mentioning(&all, &ports) {
        out.emit(tag::SOCKET, name, element);
    }
    out.emit(tag::STEP, name, "sockets");

    if let Some(rest) = QUIET_BEFORE_RESET.checked_sub(quiet_since.elapsed()) {
        thread::sleep(rest);
    }
    let reset_port = reset.port;
    let outcome = reset.reset().map_err(failed("reset"))?;
    eprintln!("vm-guest: {name}: client read after the RST: {outcome}");
    out.emit(tag::RESET, name, &outcome);

    let needle = local_field(reset_port);
    let deadline = Instant::now() + SETTLE;
    let events = loop {
        let events = get_ok("/events?limit=10000").map_err(failed("events"))?;
        let seen = json_elements_mentioning(&events, &[reset_port])
            .iter()
            .any(|event| event.contains(&needle) && event.contains("\"reset_received\""));
        if seen || Instant::now() > deadline {
            break events;
        }
        thread::sleep(Duration::from_millis(300));
    };
    for element in json_elements_mentioning(&events, &[reset_port]) {
        out.emit(tag::EVENT, name, element);
    }
    out.emit(tag::STEP, name, "events");

    // A connect to a closed port: the state hook sees SYN_SENT -> CLOSE with
    // ECONNREFUSED and reads tcp_sock members resolved from this kernel's BTF.
    match TcpStream::connect(("127.0.0.1", refused_port)) {
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => {
            return Err(failed("connect_refused")(format!(
                "connect to closed port {refused_port} gave {other:?}, expected ECONNREFUSED"
            )));
        }
    }
    let deadline = Instant::now() + SETTLE;
    let events = loop {
        let events = get_ok("/events?limit=10000").map_err(failed("events"))?;
        let seen = json_elements_mentioning(&events, &[refused_port])
            .iter()
            .any(|event| event.contains("\"connect_failed\""));
        if seen || Instant::now() > deadline {
            break events;
        }
        thread::sleep(Duration::from_millis(300));
    };
    for element in json_elements_mentioning(&events, &[refused_port]) {
        out.emit(tag::EVENT, name, element);
    }
    out.emit(tag::STEP, name, "connect_refused");
    // The keepalive counters, after the scenario: they tell a hook that never
    // fires from one whose counts miss the socket.
    let metrics = get_ok("/metrics").map_err(failed("metrics"))?;
    for line in metrics.lines() {
        if line.starts_with("idlemon_keepalive_") {
            out.emit(tag::METRIC, name, line);
        }
    }
    drop((idle, keepalive));
    Ok(())
}

/// A loopback port where nothing listens (bound, then closed).
fn closed_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|error| format!("cannot bind a loopback port: {error}"))?;
    let port = listener
        .local_addr()
        .map_err(|error| format!("cannot read the bound port: {error}"))?
        .port();
    drop(listener);
    Ok(port)
}

/// The bench daemon's `--scan-interval`: no walk during the run (`bench_args`).
const BENCH_SCAN_INTERVAL: &str = "3600";
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

/// The bench: one ping-pong load for the whole run, so that between one
/// window and the next only idlemon changes (not the connection), and a
/// daemon started and stopped around each of its windows. A daemon's
/// programs stay attached for as long as it runs, paused or not, so an A
/// window needs it gone, and the two modes cannot share one; a start costs
/// 1 to 5 s of the guest's time (the verifier, emulated), which the settle
/// before each window keeps out of the measurement.
fn run_bench(args: &Args, plan: &BenchPlan, out: &mut Out) -> Result<()> {
    let waited = wait_quiet();
    eprintln!(
        "vm-guest: bench: the guest was idle after {:.1} s",
        waited.as_secs_f64()
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|error| format!("cannot listen on loopback: {error}"))?;
    let address = listener
        .local_addr()
        .map_err(|error| format!("listener address: {error}"))?;
    let client =
        TcpStream::connect(address).map_err(|error| format!("connect {address}: {error}"))?;
    let (server, _) = listener
        .accept()
        .map_err(|error| format!("accept: {error}"))?;
    drop(listener);
    let mut load = ping_pong::PingPong::start(client, server)?;
    let rounds = plan.rounds.len();
    for (index, round) in plan.rounds.iter().enumerate() {
        eprintln!(
            "vm-guest: bench round {}/{rounds}: {}",
            index + 1,
            round.join(" ")
        );
        for side in round {
            match bench_window(args, plan.window, index + 1, side, &mut load, out) {
                Ok(()) => {}
                // Without the load there is nothing left to measure.
                Err(failure) if failure.step == "load" => return Err(failure.message),
                // A daemon that failed costs its window only.
                Err(failure) => out.fail(side, failure.step, failure.message),
            }
        }
    }
    load.stop()
}

/// One window of `side`: idlemon started in that mode first, unless it is
/// the baseline.
fn bench_window(
    args: &Args,
    window: Duration,
    round: usize,
    side: &str,
    load: &mut ping_pong::PingPong,
    out: &mut Out,
) -> std::result::Result<(), Failure> {
    let mut daemon = None;
    // The floor: programs that do nothing, where idlemon's per-packet hooks
    // attach by fentry, held for the window.
    let mut floor = Vec::new();
    if side == tag::FLOOR {
        let btf = noop::KernelBtf::load().map_err(|error| failed("start")(error.to_string()))?;
        for function in tag::FLOOR_FUNCTIONS {
            let program = noop::NoopProgram::attach(&btf, noop::Hook::Fentry(function))
                .map_err(|error| failed("start")(error.to_string()))?;
            floor.push(program);
        }
    } else if side != tag::BASELINE {
        let mode = args
            .modes
            .iter()
            .find(|mode| mode.name == side)
            .ok_or_else(|| failed("start")(format!("no --mode {side}")))?;
        let log = args.workdir.join(format!("idlemon-bench-{side}.log"));
        let started = Instant::now();
        let mut running =
            Daemon::start(&args.idlemon, bench_args(mode), &log).map_err(failed("start"))?;
        let ready = running
            .wait_ready(args.ready_timeout)
            .and_then(|readiness| Ok((readiness, get_ok("/metrics")?)));
        let (readiness, metrics) = match ready {
            Ok(ready) => ready,
            Err(error) => {
                let status = running.stop();
                out.emit(tag::EXIT, side, &status);
                emit_log_tail(out, side, &log);
                return Err(failed("ready")(error));
            }
        };
        out.emit(
            tag::READY,
            side,
            &ready_report(started.elapsed().as_secs_f64(), &readiness),
        );
        for line in metrics.lines() {
            if line.starts_with("idlemon_probe_info{") || line.starts_with("idlemon_degraded{") {
                out.emit(tag::METRIC, side, line);
            }
        }
        daemon = Some((running, log));
    }
    let (settled, steady) = settle(load).map_err(failed("load"))?;
    let (first, started) = (load.transactions().map_err(failed("load"))?, Instant::now());
    thread::sleep(window);
    let (last, ended) = (load.transactions().map_err(failed("load"))?, Instant::now());
    if let Some((mut running, log)) = daemon {
        // A daemon that died during the window leaves it half measured.
        let died = !matches!(running.child.try_wait(), Ok(None));
        let status = running.stop();
        out.emit(tag::EXIT, side, &status);
        if died || status != "0" {
            emit_log_tail(out, side, &log);
        }
        if died {
            return Err(failed("window")(format!(
                "idlemon exited during the window: {status}"
            )));
        }
    }
    out.emit(
        tag::WINDOW,
        side,
        &window_report(
            round,
            ended.duration_since(started),
            last.saturating_sub(first),
            settled,
            steady,
        ),
    );
    Ok(())
}

/// Waits until the load runs steadily (`SETTLE_MIN`, `SETTLE_AGREE`), at
/// most `SETTLE_MAX`, and says how long that took and whether it did.
fn settle(load: &mut ping_pong::PingPong) -> Result<(Duration, bool)> {
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
    let stat = fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_ticks(&stat)
}

/// (busy, all) from /proc/stat's `cpu` line: idle and iowait are not busy.
pub fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    let all: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((all.saturating_sub(idle), all))
}

/// The busy share of the ticks between two readings.
pub fn busy_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    let all = after.1.saturating_sub(before.1);
    if all == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 / all as f64
}

/// Whether the slices' rates all lie within `SETTLE_AGREE` of the slowest.
pub fn steady(rates: &[f64]) -> bool {
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let fastest = rates.iter().copied().fold(0.0, f64::max);
    slowest > 0.0 && slowest.is_finite() && fastest / slowest - 1.0 <= SETTLE_AGREE
}

/// The rest of a WINDOW line; the host parses it back (`bench/vm.rs`).
pub fn window_report(
    round: usize,
    length: Duration,
    transactions: u64,
    settled: Duration,
    steady: bool,
) -> String {
    format!(
        "round={round} seconds={:.6} transactions={transactions} settled={:.2} steady={}",
        length.as_secs_f64(),
        settled.as_secs_f64(),
        u8::from(steady)
    )
}

/// The rest of a READY line: seconds, then `ready` or `degraded BODY`.
pub fn ready_report(seconds: f64, readiness: &str) -> String {
    format!("{seconds:.2} {readiness}")
}

/// How idlemon's JSON spells a socket's local address (serde_json, compact).
pub fn local_field(port: u16) -> String {
    format!("\"local\":\"127.0.0.1:{port}\"")
}

/// idlemon's arguments for the scenario: short thresholds, the loopback path.
fn scenario_args(args: &Args, mode: &Mode) -> Vec<String> {
    let config = args.workdir.join("idlemon-vm-test.toml");
    let mut daemon_args: Vec<String> = [
        "--listen",
        LISTEN,
        "--idle-threshold",
        IDLE_THRESHOLD,
        "--idle-timeout",
        IDLE_TIMEOUT,
        "--scan-interval",
        SCAN_INTERVAL,
        "--event-log",
        "",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    daemon_args.extend(["--config".to_owned(), config.display().to_string()]);
    daemon_args.extend(disable_attach(mode));
    daemon_args
}

/// idlemon's arguments for the bench: default flags as the overhead part on
/// the host runs them (no event log, warnings only), except that the walks
/// are an hour apart. On the guest's one vCPU a walk pauses the ping-pong
/// for milliseconds, and the connection then ran about 10% slower for one to
/// three seconds (seen on 6.12; not once with walks a minute apart): a cost
/// of having one CPU, not of the hooks' attach kind, which is what the bench
/// compares. The walks' own cost is the idle and scale parts' business.
pub fn bench_args(mode: &Mode) -> Vec<String> {
    let mut daemon_args: Vec<String> = [
        "--listen",
        LISTEN,
        "--event-log",
        "",
        "--log-level",
        "warn",
        "--scan-interval",
        BENCH_SCAN_INTERVAL,
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    daemon_args.extend(disable_attach(mode));
    daemon_args
}

fn disable_attach(mode: &Mode) -> Vec<String> {
    if mode.disable.is_empty() {
        Vec::new()
    } else {
        vec!["--disable-attach".to_owned(), mode.disable.clone()]
    }
}

struct Daemon {
    child: Child,
    args: Vec<String>,
}

impl Daemon {
    fn start(idlemon: &Path, daemon_args: Vec<String>, log: &Path) -> Result<Self> {
        let log_file = File::create(log)
            .map_err(|error| format!("cannot create {}: {error}", log.display()))?;
        let stderr = log_file
            .try_clone()
            .map_err(|error| format!("cannot share {}: {error}", log.display()))?;
        let mut command = Command::new(idlemon);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                // When the host kills a hung driver, idlemon must not live
                // on with its programs attached.
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                Ok(())
            });
        }
        let child = command
            .args(&daemon_args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            // The log tail lands in a report: escape codes would garble it.
            .env("NO_COLOR", "1")
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", idlemon.display()))?;
        Ok(Self {
            child,
            args: daemon_args,
        })
    }

    /// `ready`, or `degraded BODY`: idlemon never gets ready while a hook it
    /// relies on is missing (6.1 without fentry and kprobes), but it runs,
    /// and the scenario still has to pass once its first walk is done.
    fn wait_ready(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "idlemon exited before it was ready ({})",
                    describe(status)
                ));
            }
            match get("/readyz") {
                Ok((200, _)) => return Ok("ready".to_owned()),
                Ok((503, body)) if body.contains("degraded") && first_walk_done() => {
                    return Ok(format!("degraded {}", body.trim()));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(format!("GET /readyz not 200 after {} s", timeout.as_secs()));
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGTERM, as a DaemonSet's pod gets it, and the exit status.
    fn stop(&mut self) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("{} before SIGTERM", describe(status));
        }
        let Ok(pid) = c_int::try_from(self.child.id()) else {
            return "pid out of range".to_owned();
        };
        // SAFETY: kill has no memory preconditions; pid is our own child, not yet reaped.
        unsafe { kill(pid, SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return describe(status);
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!(
            "killed: still running {} s after SIGTERM",
            STOP_TIMEOUT.as_secs()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A daemon left behind would keep its programs attached.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `0`, `code=N` or `signal=N`: the host checks for `0`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(0), _) => "0".to_owned(),
        (Some(code), _) => format!("code={code}"),
        (None, Some(signal)) => format!("signal={signal}"),
        (None, None) => format!("{status}"),
    }
}

/// A loopback connection, both ends, after one byte each way.
struct Pair {
    client: TcpStream,
    server: TcpStream,
    /// The client's local port: what the scenario looks for in idlemon's answers.
    port: u16,
}

impl Pair {
    fn connect(listener: &TcpListener, keepalive: bool) -> Result<Self> {
        let address = listener
            .local_addr()
            .map_err(|error| format!("listener address: {error}"))?;
        let mut client =
            TcpStream::connect(address).map_err(|error| format!("connect {address}: {error}"))?;
        if keepalive {
            // Fast enough for any middlebox timeout of 3 s: the socket must not be at risk.
            let fd = client.as_raw_fd();
            set_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE")?;
            set_int(fd, IPPROTO_TCP, TCP_KEEPIDLE, 1, "TCP_KEEPIDLE")?;
            set_int(fd, IPPROTO_TCP, TCP_KEEPINTVL, 1, "TCP_KEEPINTVL")?;
        }
        let (mut server, _) = listener
            .accept()
            .map_err(|error| format!("accept: {error}"))?;
        let timeout = Some(Duration::from_secs(10));
        for stream in [&client, &server] {
            stream
                .set_read_timeout(timeout)
                .map_err(|error| format!("read timeout: {error}"))?;
        }
        let mut byte = [0u8; 1];
        client
            .write_all(b"q")
            .and_then(|()| server.read_exact(&mut byte))
            .and_then(|()| server.write_all(b"a"))
            .and_then(|()| client.read_exact(&mut byte))
            .map_err(|error| format!("exchanging a byte on loopback: {error}"))?;
        let port = client
            .local_addr()
            .map_err(|error| format!("client address: {error}"))?
            .port();
        Ok(Self {
            client,
            server,
            port,
        })
    }

    /// Aborts the server end (SO_LINGER {1, 0}: close sends a RST) and
    /// returns what the client's next read says.
    fn reset(self) -> Result<String> {
        let Self {
            mut client, server, ..
        } = self;
        let linger = Linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let size = u32::try_from(std::mem::size_of::<Linger>()).unwrap_or(8);
        // SAFETY: linger outlives the call and size is its size.
        let result = unsafe {
            setsockopt(
                server.as_raw_fd(),
                SOL_SOCKET,
                SO_LINGER,
                std::ptr::from_ref(&linger).cast::<c_void>(),
                size,
            )
        };
        if result != 0 {
            return Err(format!("SO_LINGER: {}", io::Error::last_os_error()));
        }
        drop(server);
        let mut byte = [0u8; 1];
        Ok(match client.read(&mut byte) {
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => "econnreset".to_owned(),
            Err(error) => format!("error {error}"),
            Ok(0) => "eof".to_owned(),
            Ok(_) => "data".to_owned(),
        })
    }
}

fn set_int(fd: c_int, level: c_int, name: c_int, value: c_int, what: &str) -> Result<()> {
    let size = u32::try_from(std::mem::size_of::<c_int>()).unwrap_or(4);
    // SAFETY: value outlives the call and size is its size.
    let result = unsafe {
        setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast::<c_void>(),
            size,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    }
}

fn first_walk_done() -> bool {
    get_ok("/metrics").is_ok_and(|metrics| {
        metrics.lines().any(|line| {
            line.strip_prefix("idlemon_scans_total ")
                .and_then(|value| value.trim().parse::<f64>().ok())
                .is_some_and(|scans| scans >= 1.0)
        })
    })
}

fn get_ok(path: &str) -> Result<String> {
    match get(path)? {
        (200, body) => Ok(body),
        (status, body) => Err(format!("GET {path} answered {status}: {body}")),
    }
}

/// A GET to idlemon, on the server that serves `path`. HTTP/1.0 so that
/// the answer ends at EOF, never chunked.
fn get(path: &str) -> Result<(u16, String)> {
    let listen = if path.starts_with("/sockets") || path.starts_with("/events") {
        API_LISTEN
    } else {
        LISTEN
    };
    let address: SocketAddr = listen
        .parse()
        .map_err(|error| format!("bad listen address {listen}: {error}"))?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .map_err(|error| format!("connect {listen}: {error}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|error| format!("read timeout: {error}"))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {LISTEN}\r\n\r\n")
        .map_err(|error| format!("GET {path}: {error}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|error| format!("GET {path}: reading the answer: {error}"))?;
    parse_response(&String::from_utf8_lossy(&response))
        .map_err(|error| format!("GET {path}: {error}"))
}

pub fn parse_response(response: &str) -> Result<(u16, String)> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("answer without an end of headers")?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The top-level elements of a JSON array that mention one of the ports as a
/// loopback address, as raw text: enough to keep the report to the
/// scenario's sockets without a JSON parser in the guest.
pub fn json_elements_mentioning<'a>(array: &'a str, ports: &[u16]) -> Vec<&'a str> {
    let needles: Vec<String> = ports
        .iter()
        .map(|port| format!("\"127.0.0.1:{port}\""))
        .collect();
    json_array_elements(array)
        .into_iter()
        .filter(|element| needles.iter().any(|needle| element.contains(needle)))
        .collect()
}

/// Splits a JSON array into its top-level elements, minding strings.
pub fn json_array_elements(array: &str) -> Vec<&str> {
    let text = array.trim();
    let Some(inner) = text
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    else {
        return Vec::new();
    };
    let mut elements = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 0usize);
    for (index, c) in inner.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                elements.push(inner[start..index].trim());
                start = index + 1;
            }
            _ => {}
        }
    }
    let last = inner[start..].trim();
    if !last.is_empty() {
        elements.push(last);
    }
    elements
}

const SOL_SOCKET: c_int = 1;
const SO_KEEPALIVE: c_int = 9;
const SO_LINGER: c_int = 13;
const IPPROTO_TCP: c_int = 6;
const TCP_KEEPIDLE: c_int = 4;
const TCP_KEEPINTVL: c_int = 5;
const SIGTERM: c_int = 15;
const SIGKILL: c_int = 9;
const PR_SET_PDEATHSIG: c_int = 1;

#[repr(C)]
struct Linger {
    l_onoff: c_int,
    l_linger: c_int,
}

// std only, so that plain rustc builds this file: the few libc calls std lacks.
unsafe extern "C" {
    fn setsockopt(fd: c_int, level: c_int, name: c_int, value: *const c_void, size: u32) -> c_int;
    fn kill(pid: c_int, signal: c_int) -> c_int;
    fn tcdrain(fd: c_int) -> c_int;
    fn prctl(option: c_int, ...) -> c_int;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_arrays_minding_strings_and_nesting() {
        let array = r#"[{"a":"x,}]","b":[1,2]}, {"c":{"d":"\"]"}} ,3]"#;
        assert_eq!(
            json_array_elements(array),
            vec![r#"{"a":"x,}]","b":[1,2]}"#, r#"{"c":{"d":"\"]"}}"#, "3"]
        );
        assert!(json_array_elements("[]").is_empty());
        assert!(json_array_elements("not json").is_empty());
    }

    #[test]
    fn keeps_the_elements_of_the_scenario_ports() {
        let array = r#"[{"local":"127.0.0.1:4000","remote":"127.0.0.1:9"},{"local":"127.0.0.1:40001"},{"local":"10.0.0.1:5","remote":"127.0.0.1:4000"}]"#;
        assert_eq!(
            json_elements_mentioning(array, &[4000]),
            vec![
                r#"{"local":"127.0.0.1:4000","remote":"127.0.0.1:9"}"#,
                r#"{"local":"10.0.0.1:5","remote":"127.0.0.1:4000"}"#
            ]
        );
    }

    #[test]
    fn parses_http_answers() {
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nready\n";
        assert_eq!(parse_response(answer), Ok((200, "ready\n".to_owned())));
        assert!(parse_response("HTTP/1.1 503").is_err());
    }

    #[test]
    fn result_lines_stay_on_one_line() {
        assert_eq!(
            result_line("LOG", "default", "a\nb\r"),
            "LOG default a b \n"
        );
        assert_eq!(result_line("DONE", NO_MODE, ""), "DONE -\n");
    }

    #[test]
    fn parses_modes() {
        let args = Args::parse(
            [
                "--idlemon",
                "/idlemon",
                "--mode",
                "default:",
                "--mode",
                "no-fentry:fentry",
            ]
            .iter()
            .map(|arg| (*arg).to_owned()),
        )
        .expect("args");
        assert_eq!(
            args.modes,
            vec![
                Mode {
                    name: "default".into(),
                    disable: String::new()
                },
                Mode {
                    name: "no-fentry".into(),
                    disable: "fentry".into()
                }
            ]
        );
        assert!(Args::parse(["--mode".to_owned()].into_iter()).is_err());
        assert_eq!(args.bench, None);
    }

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

    #[test]
    fn bench_rounds_name_known_sides_only() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["--idlemon", "/idlemon", "--mode", "default:"];
            args.extend(extra);
            Args::parse(args.iter().map(|arg| (*arg).to_owned()))
        };
        let plan = parse(&["--bench-window", "2.5", "--bench-round", "default,baseline"])
            .expect("args")
            .bench
            .expect("a plan");
        assert_eq!(plan.window, Duration::from_millis(2500));
        assert_eq!(plan.rounds, [["default", "baseline"]]);
        // A side that no --mode defines, a round without a window, a bad window.
        assert!(parse(&["--bench-window", "2", "--bench-round", "default,kprobe"]).is_err());
        assert!(parse(&["--bench-round", "default"]).is_err());
        assert!(parse(&["--bench-window", "0", "--bench-round", "default"]).is_err());
    }
}
