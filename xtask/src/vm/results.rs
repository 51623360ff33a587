//! What the guest driver reported, what each kernel and mode should show, and
//! the matrix. Pure: no processes, no files, so that it is all unit tested.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::Value;

use super::protocol as tag;

/// The architecture a kernel runs on: qemu's system emulator, the kernel
/// packages and the binaries in the guest follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arch {
    Amd64,
    /// Graviton: the daemon cross-compiled as the arm64 image ships it.
    Arm64,
}

impl Arch {
    /// Debian's (and OCI's) name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// This host's: the native run's.
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Self::Arm64
        } else {
            Self::Amd64
        }
    }
}

/// Where the scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// Debian's 6.1 cloud kernel, like EKS AL2023's 6.1 nodes.
    V6_1,
    /// Debian's 6.12 cloud kernel, like EKS AL2023's 6.12 nodes.
    V6_12,
    /// This host's kernel, in a fresh network namespace.
    Native,
    /// Debian's arm64 6.1 cloud kernel, like EKS AL2023's Graviton 6.1 nodes.
    Arm64V6_1,
    /// Debian's arm64 6.12 cloud kernel, like EKS AL2023's Graviton 6.12 nodes.
    Arm64V6_12,
}

impl Target {
    /// Unique among targets: file names and progress lines.
    pub fn label(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
            Self::Native => "native",
            Self::Arm64V6_1 => "arm64-6.1",
            Self::Arm64V6_12 => "arm64-6.12",
        }
    }

    /// The kernel series, whatever the architecture.
    pub fn series(self) -> &'static str {
        match self {
            Self::V6_1 | Self::Arm64V6_1 => "6.1",
            Self::V6_12 | Self::Arm64V6_12 => "6.12",
            Self::Native => "native",
        }
    }

    pub fn arch(self) -> Arch {
        match self {
            Self::V6_1 | Self::V6_12 => Arch::Amd64,
            Self::Arm64V6_1 | Self::Arm64V6_12 => Arch::Arm64,
            Self::Native => Arch::host(),
        }
    }
}

/// The attach modes: each runs idlemon once with a `--disable-attach` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Default,
    NoFentry,
    NoFentryKprobe,
}

impl Mode {
    pub const ALL: [Self; 3] = [Self::Default, Self::NoFentry, Self::NoFentryKprobe];

    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::NoFentry => "no-fentry",
            Self::NoFentryKprobe => "no-fentry-kprobe",
        }
    }

    pub fn disable(self) -> &'static str {
        match self {
            Self::Default => "",
            Self::NoFentry => "fentry",
            Self::NoFentryKprobe => "fentry,kprobe",
        }
    }

    /// The driver's `--mode NAME:DISABLE` argument.
    pub fn guest_arg(self) -> String {
        format!("{}:{}", self.name(), self.disable())
    }
}

/// Every hook idlemon reports in `idlemon_probe_info`, in the matrix's order.
pub const HOOKS: [&str; 7] = [
    "send",
    "receive",
    "keepalive",
    "state",
    "destroy",
    "reset_received",
    "reset_sent",
];

const FENTRY: &[&str] = &["fentry"];
const KPROBE: &[&str] = &["kprobe"];
const BTF_OR_RAW_TP: &[&str] = &["tp_btf", "raw_tp"];
const ANY_TRACEPOINT: &[&str] = &["tp_btf", "raw_tp", "tracepoint"];
/// Degraded, and rightly so: nothing the kernel offers fits with the mode's kinds.
const NONE: &[&str] = &["none"];

/// What one kernel should show in one mode.
pub struct Expectation {
    pub target: Target,
    pub mode: Mode,
    /// The attach kinds that may show for send, receive and keepalive.
    pub send: &'static [&'static str],
    pub receive: &'static [&'static str],
    pub keepalive: &'static [&'static str],
    /// Whether `/readyz` answers 200. idlemon stays not ready, by design,
    /// while a hook it relies on (send) is missing; a missing keepalive hook
    /// does not count.
    pub ready: bool,
}

const fn expect(
    target: Target,
    mode: Mode,
    [send, receive, keepalive]: [&'static [&'static str]; 3],
    ready: bool,
) -> Expectation {
    Expectation {
        target,
        mode,
        send,
        receive,
        keepalive,
        ready,
    }
}

/// Every kernel and mode. `none` is a degraded hook that is expected:
/// - `tcp_keepalive_timer` has no tracepoint: without fentry or a kprobe the
///   keepalive hook uses `timer:timer_expire_entry` (tp_btf or raw_tp),
///   filtered on the keepalive callback;
/// - 6.1 and 6.12 have no `tcp:tcp_sendmsg_locked` tracepoint (a later
///   kernel added it; this host's 6.18 has it): seen on Debian's 6.12.117,
///   whose BTF lacks `btf_trace_tcp_sendmsg_locked` and where raw_tp gets
///   ENOENT. Send then needs fentry or a kprobe, and without them idlemon
///   is not ready;
/// - arm64 6.1 refuses fentry on kernel functions (`bpf_raw_tracepoint_open`
///   fails with 524, ENOTSUPP: arm64 has BPF trampolines since 6.0, but
///   attaching one to a kernel function needs ftrace direct calls, which
///   arm64 gained later, in 6.4), so idlemon falls back to kprobes there by
///   default: seen on Debian's 6.1.0-57-cloud-arm64. Graviton nodes on 6.1
///   run idlemon on kprobes;
/// - this host (6.18, built without kprobes, with fentry refused) refuses
///   fentry and kprobes whatever the mode.
pub const EXPECTATIONS: &[Expectation] = &[
    expect(Target::V6_1, Mode::Default, [FENTRY, FENTRY, FENTRY], true),
    expect(Target::V6_1, Mode::NoFentry, [KPROBE, KPROBE, KPROBE], true),
    expect(
        Target::V6_1,
        Mode::NoFentryKprobe,
        [NONE, BTF_OR_RAW_TP, BTF_OR_RAW_TP],
        false,
    ),
    expect(Target::V6_12, Mode::Default, [FENTRY, FENTRY, FENTRY], true),
    expect(
        Target::V6_12,
        Mode::NoFentry,
        [KPROBE, KPROBE, KPROBE],
        true,
    ),
    expect(
        Target::V6_12,
        Mode::NoFentryKprobe,
        [NONE, BTF_OR_RAW_TP, BTF_OR_RAW_TP],
        false,
    ),
    // fentry refused (524, ENOTSUPP): idlemon falls back to kprobes.
    expect(
        Target::Arm64V6_1,
        Mode::Default,
        [KPROBE, KPROBE, KPROBE],
        true,
    ),
    expect(
        Target::Arm64V6_1,
        Mode::NoFentry,
        [KPROBE, KPROBE, KPROBE],
        true,
    ),
    expect(
        Target::Arm64V6_1,
        Mode::NoFentryKprobe,
        [NONE, BTF_OR_RAW_TP, BTF_OR_RAW_TP],
        false,
    ),
    expect(
        Target::Arm64V6_12,
        Mode::Default,
        [FENTRY, FENTRY, FENTRY],
        true,
    ),
    expect(
        Target::Arm64V6_12,
        Mode::NoFentry,
        [KPROBE, KPROBE, KPROBE],
        true,
    ),
    expect(
        Target::Arm64V6_12,
        Mode::NoFentryKprobe,
        [NONE, BTF_OR_RAW_TP, BTF_OR_RAW_TP],
        false,
    ),
    expect(
        Target::Native,
        Mode::Default,
        [BTF_OR_RAW_TP, BTF_OR_RAW_TP, BTF_OR_RAW_TP],
        true,
    ),
    expect(
        Target::Native,
        Mode::NoFentry,
        [BTF_OR_RAW_TP, BTF_OR_RAW_TP, BTF_OR_RAW_TP],
        true,
    ),
    expect(
        Target::Native,
        Mode::NoFentryKprobe,
        [BTF_OR_RAW_TP, BTF_OR_RAW_TP, BTF_OR_RAW_TP],
        true,
    ),
];

/// Whether an attached keepalive hook must have counted the keepalive
/// socket's timer runs, or a zero only earns a warning. Required in the VMs,
/// whose kernels keep the keepalive timer in `icsk_keepalive_timer` rather
/// than `sk_timer`: a zero there means idlemon took the wrong timer, with
/// every attach kind. On the host, whose kernel is whatever the machine runs,
/// a zero stays a warning.
pub fn timer_runs_required(target: Target) -> bool {
    target != Target::Native
}

pub fn expectation(target: Target, mode: Mode) -> Option<&'static Expectation> {
    EXPECTATIONS
        .iter()
        .find(|expected| expected.target == target && expected.mode == mode)
}

/// The kinds `hook` may show on `target` in `mode`.
pub fn expected_kinds(target: Target, mode: Mode, hook: &str) -> &'static [&'static str] {
    match hook {
        // Tracepoint-only hooks: no mode disables their kinds, and every kernel
        // here has their tracepoints.
        "state" | "reset_received" => ANY_TRACEPOINT,
        "destroy" | "reset_sent" => BTF_OR_RAW_TP,
        "send" | "receive" | "keepalive" => {
            expectation(target, mode).map_or(&[], |expected| match hook {
                "send" => expected.send,
                "receive" => expected.receive,
                _ => expected.keepalive,
            })
        }
        _ => &[],
    }
}

/// `idlemon_probe_info{hook="send",kind="fentry"} 1` -> ("send", "fentry"),
/// by the test kit's parser.
pub fn parse_probe_info(line: &str) -> Option<(String, String)> {
    idlemon_testkit::metrics::probe_info(line)
        .into_iter()
        .next()
}

/// The client ports of the scenario's three connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub idle: u16,
    pub keepalive: u16,
    pub reset: u16,
    /// A closed port the driver connects to (a driver before this step
    /// reports none).
    pub refused: Option<u16>,
}

impl Ports {
    fn parse(text: &str) -> Option<Self> {
        let mut ports = BTreeMap::new();
        for pair in text.split_whitespace() {
            let (key, value) = pair.split_once('=')?;
            ports.insert(key, value.parse::<u16>().ok()?);
        }
        Some(Self {
            idle: *ports.get("idle")?,
            keepalive: *ports.get("keepalive")?,
            reset: *ports.get("reset")?,
            refused: ports.get("refused").copied(),
        })
    }
}

/// What the driver saw in one mode.
#[derive(Debug, Default)]
pub struct ModeObservation {
    pub mode: String,
    /// Seconds until idlemon was ready, or degraded with its first walk done.
    pub ready_seconds: Option<f64>,
    /// `/readyz`'s complaint when idlemon runs degraded (never ready).
    pub degraded: Option<String>,
    /// hook -> attach kind, from `idlemon_probe_info`.
    pub hooks: BTreeMap<String, String>,
    /// Unlabelled metrics the driver reported after the scenario (keepalive counters).
    pub counters: BTreeMap<String, f64>,
    pub ports: Option<Ports>,
    pub at_risk: Vec<Value>,
    pub sockets: Vec<Value>,
    /// What the client's read returned after the server's RST.
    pub reset_read: Option<String>,
    pub events: Vec<Value>,
    pub exit: Option<String>,
    /// The steps whose lines are all out (`sockets`, `events`).
    pub steps: Vec<String>,
    /// `STEP MESSAGE` of the steps that failed.
    pub failures: Vec<String>,
    /// The tail of idlemon's log.
    pub log: Vec<String>,
}

/// Everything the driver reported in one run.
#[derive(Debug, Default)]
pub struct GuestReport {
    pub kernel_release: Option<String>,
    pub modes: Vec<ModeObservation>,
    /// Failures outside any mode (setting up the guest).
    pub failures: Vec<String>,
    /// The driver got to its end.
    pub done: bool,
    /// Lines that do not follow the protocol: a driver and a host out of step.
    pub garbled: Vec<String>,
}

impl GuestReport {
    pub fn mode(&self, name: &str) -> Option<&ModeObservation> {
        self.modes.iter().find(|mode| mode.mode == name)
    }

    fn mode_mut(&mut self, name: &str) -> &mut ModeObservation {
        let index = match self.modes.iter().position(|mode| mode.mode == name) {
            Some(index) => index,
            None => {
                self.modes.push(ModeObservation {
                    mode: name.to_owned(),
                    ..ModeObservation::default()
                });
                self.modes.len() - 1
            }
        };
        &mut self.modes[index]
    }
}

/// Parses the driver's result lines (`TAG MODE REST`).
pub fn parse_guest_output(text: &str) -> GuestReport {
    let mut report = GuestReport::default();
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, ' ');
        let (Some(tag), Some(mode)) = (parts.next(), parts.next()) else {
            report.garbled.push(line.to_owned());
            continue;
        };
        let rest = parts.next().unwrap_or("");
        let json = |text: &str| serde_json::from_str::<Value>(text).ok();
        match tag {
            tag::KERNEL => report.kernel_release = Some(rest.to_owned()),
            tag::DONE => report.done = true,
            tag::FAIL if mode == tag::NO_MODE => {
                report.failures.push(rest.to_owned());
            }
            tag::FAIL => report.mode_mut(mode).failures.push(rest.to_owned()),
            tag::START => {
                report.mode_mut(mode);
            }
            tag::READY => {
                let mut words = rest.splitn(3, ' ');
                match (words.next().map(str::parse::<f64>), words.next()) {
                    (Some(Ok(seconds)), Some(state @ ("ready" | "degraded"))) => {
                        let observation = report.mode_mut(mode);
                        observation.ready_seconds = Some(seconds);
                        if state == "degraded" {
                            observation.degraded = Some(words.next().unwrap_or("").to_owned());
                        }
                    }
                    _ => report.garbled.push(line.to_owned()),
                }
            }
            tag::METRIC => {
                if let Some((hook, kind)) = parse_probe_info(rest) {
                    report.mode_mut(mode).hooks.insert(hook, kind);
                } else if let Some(sample) = idlemon_testkit::metrics::Sample::parse(rest)
                    && sample.labels.is_empty()
                {
                    report
                        .mode_mut(mode)
                        .counters
                        .insert(sample.name.to_owned(), sample.value);
                }
            }
            tag::PORTS => match Ports::parse(rest) {
                Some(ports) => report.mode_mut(mode).ports = Some(ports),
                None => report.garbled.push(line.to_owned()),
            },
            tag::AT_RISK | tag::SOCKET | tag::EVENT => match json(rest) {
                Some(value) => {
                    let observation = report.mode_mut(mode);
                    match tag {
                        tag::AT_RISK => observation.at_risk.push(value),
                        tag::SOCKET => observation.sockets.push(value),
                        _ => observation.events.push(value),
                    }
                }
                None => report.garbled.push(line.to_owned()),
            },
            tag::RESET => report.mode_mut(mode).reset_read = Some(rest.to_owned()),
            tag::EXIT => report.mode_mut(mode).exit = Some(rest.to_owned()),
            tag::STEP => report.mode_mut(mode).steps.push(rest.to_owned()),
            tag::LOG => report.mode_mut(mode).log.push(rest.to_owned()),
            _ => report.garbled.push(line.to_owned()),
        }
    }
    report
}

/// One cell of the matrix and, when it fails, why.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub cell: String,
    pub failure: Option<String>,
    /// Worth saying, not failing for (timer_runs where it is optional).
    pub warning: Option<String>,
}

impl Check {
    fn pass(cell: impl Into<String>) -> Self {
        Self {
            cell: cell.into(),
            failure: None,
            warning: None,
        }
    }

    fn fail(why: impl Into<String>) -> Self {
        Self {
            cell: "FAIL".to_owned(),
            failure: Some(why.into()),
            warning: None,
        }
    }

    fn warn(cell: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            cell: cell.into(),
            failure: None,
            warning: Some(why.into()),
        }
    }

    /// A step that never ran because an earlier one failed: that one carries the reason.
    fn not_reached() -> Self {
        Self {
            cell: "-".to_owned(),
            failure: Some("not reached".to_owned()),
            warning: None,
        }
    }
}

/// The matrix row of one kernel and mode.
#[derive(Debug)]
pub struct Row {
    pub mode: Mode,
    /// One per entry of HOOKS.
    pub hooks: Vec<Check>,
    pub ready: Check,
    pub idle: Check,
    pub keepalive: Check,
    pub reset: Check,
    pub connect_refused: Check,
    pub timer_runs: Check,
    pub exit: Check,
    /// The driver's own failures in this mode.
    pub driver_failures: Vec<String>,
}

impl Row {
    fn checks(&self) -> impl Iterator<Item = (&'static str, &Check)> {
        HOOKS.iter().copied().zip(self.hooks.iter()).chain([
            ("ready", &self.ready),
            ("idle socket at risk", &self.idle),
            ("keepalive socket not at risk", &self.keepalive),
            ("reset classified", &self.reset),
            ("refused connect explained", &self.connect_refused),
            ("keepalive timer_runs", &self.timer_runs),
            ("exit after SIGTERM", &self.exit),
        ])
    }

    /// Why this row fails, one line each; empty when it passes.
    pub fn failures(&self) -> Vec<String> {
        let mut failures: Vec<String> = self.driver_failures.clone();
        for (what, check) in self.checks() {
            match &check.failure {
                Some(why) if why == "not reached" => {}
                Some(why) => failures.push(format!("{what}: {why}")),
                None => {}
            }
        }
        if failures.is_empty() && self.checks().any(|(_, check)| check.failure.is_some()) {
            failures.push("steps not reached".to_owned());
        }
        failures
    }

    pub fn warnings(&self) -> Vec<String> {
        self.checks()
            .filter_map(|(what, check)| check.warning.as_ref().map(|why| format!("{what}: {why}")))
            .collect()
    }
}

fn local_of(value: &Value) -> Option<&str> {
    value.get("local").and_then(Value::as_str)
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Checks one mode's observation against the expectations.
pub fn judge(target: Target, mode: Mode, observation: Option<&ModeObservation>) -> Row {
    let Some(observed) = observation else {
        let missing = || Check::fail("the driver reported nothing for this mode");
        return Row {
            mode,
            hooks: HOOKS.iter().map(|_| Check::not_reached()).collect(),
            ready: missing(),
            idle: Check::not_reached(),
            keepalive: Check::not_reached(),
            reset: Check::not_reached(),
            connect_refused: Check::not_reached(),
            timer_runs: Check::not_reached(),
            exit: Check::not_reached(),
            driver_failures: Vec::new(),
        };
    };
    let expect_ready = expectation(target, mode).is_none_or(|expected| expected.ready);
    let ready = match (observed.ready_seconds, &observed.degraded, expect_ready) {
        (None, _, _) => Check::fail("idlemon never answered GET /readyz with 200"),
        (Some(seconds), None, true) => Check::pass(format!("{seconds:.1}s")),
        (Some(seconds), Some(_), false) => Check::pass(format!("degraded {seconds:.1}s")),
        (Some(_), Some(why), true) => Check::fail(format!("idlemon is not ready: {why}")),
        (Some(_), None, false) => {
            Check::fail("idlemon says ready although a hook it relies on is expected to be missing")
        }
    };
    // Every kernel of the matrix has iter/task_file (5.9+) and
    // bpf_sock_from_file (5.11+): the walk by open file must load there.
    let ready = match observed.counters.get("idlemon_scan_file_walk_available") {
        Some(available) if *available == 0.0 && ready.failure.is_none() => {
            Check::fail("the walk by open file (iter/task_file) did not load")
        }
        _ => ready,
    };
    let hooks = HOOKS
        .iter()
        .map(|hook| {
            if observed.ready_seconds.is_none() {
                return Check::not_reached();
            }
            let expected = expected_kinds(target, mode, hook);
            match observed.hooks.get(*hook) {
                None => Check::fail("no idlemon_probe_info line"),
                Some(kind) if expected.contains(&kind.as_str()) => Check::pass(kind.clone()),
                Some(kind) => Check {
                    cell: format!("{kind}!"),
                    failure: Some(format!(
                        "attached as {kind}, expected {}",
                        expected.join(" or ")
                    )),
                    warning: None,
                },
            }
        })
        .collect();
    let (idle, keepalive, reset, timer_runs) = match observed.ports {
        None => (
            Check::not_reached(),
            Check::not_reached(),
            Check::not_reached(),
            Check::not_reached(),
        ),
        Some(_) if !observed.steps.iter().any(|step| step == "sockets") => (
            Check::not_reached(),
            Check::not_reached(),
            Check::not_reached(),
            Check::not_reached(),
        ),
        Some(ports) => {
            let keepalive_hook = observed.hooks.get("keepalive").map(String::as_str);
            (
                judge_idle(observed, ports),
                judge_keepalive(observed, ports),
                judge_reset(observed, ports),
                judge_timer_runs(observed, ports, keepalive_hook, timer_runs_required(target)),
            )
        }
    };
    let connect_refused = judge_connect_refused(observed);
    let exit = match observed.exit.as_deref() {
        Some("0") => Check::pass("0"),
        Some(status) => Check::fail(format!("idlemon exited with {status} after SIGTERM")),
        // Cut short (the run's own failure says how): the driver always
        // reports an exit once a mode started.
        None => Check::not_reached(),
    };
    Row {
        mode,
        hooks,
        ready,
        idle,
        keepalive,
        reset,
        connect_refused,
        timer_runs,
        exit,
        driver_failures: observed.failures.clone(),
    }
}

fn find_socket(list: &[Value], port: u16) -> Option<&Value> {
    let local = loopback(port);
    list.iter()
        .find(|socket| local_of(socket) == Some(local.as_str()))
}

fn judge_idle(observed: &ModeObservation, ports: Ports) -> Check {
    match find_socket(&observed.at_risk, ports.idle) {
        Some(socket) => match socket.get("risk").and_then(Value::as_str) {
            Some("no_keepalive") => Check::pass("ok"),
            other => Check::fail(format!(
                "127.0.0.1:{} is at risk with risk {other:?}, expected \"no_keepalive\"",
                ports.idle
            )),
        },
        None => Check::fail(match find_socket(&observed.sockets, ports.idle) {
            Some(socket) => format!(
                "127.0.0.1:{} not in /sockets?at_risk=true; /sockets has it with at_risk={} idle_seconds={}",
                ports.idle,
                socket.get("at_risk").unwrap_or(&Value::Null),
                socket.get("idle_seconds").unwrap_or(&Value::Null)
            ),
            None => format!(
                "127.0.0.1:{} is in neither /sockets?at_risk=true nor /sockets",
                ports.idle
            ),
        }),
    }
}

fn judge_keepalive(observed: &ModeObservation, ports: Ports) -> Check {
    let Some(socket) = find_socket(&observed.sockets, ports.keepalive) else {
        return Check::fail(format!("127.0.0.1:{} is not in /sockets", ports.keepalive));
    };
    let enabled = socket
        .pointer("/keepalive/enabled")
        .and_then(Value::as_bool);
    match (socket.get("at_risk").and_then(Value::as_bool), enabled) {
        (Some(false), Some(true)) => Check::pass("ok"),
        (Some(false), _) => Check::fail(format!(
            "127.0.0.1:{} not at risk, but keepalive.enabled is {enabled:?}",
            ports.keepalive
        )),
        (at_risk, _) => Check::fail(format!(
            "127.0.0.1:{} has at_risk={at_risk:?} risk={}, expected at_risk=false (SO_KEEPALIVE, TCP_KEEPIDLE=1)",
            ports.keepalive,
            socket.get("risk").unwrap_or(&Value::Null)
        )),
    }
}

fn judge_reset(observed: &ModeObservation, ports: Ports) -> Check {
    let read = observed.reset_read.as_deref();
    if read != Some("econnreset") {
        return match read {
            None => Check::not_reached(),
            Some(read) => Check::fail(format!(
                "the client's read after the RST gave {read}, expected ECONNRESET"
            )),
        };
    }
    if !observed.steps.iter().any(|step| step == "events") {
        return Check::not_reached();
    }
    let local = loopback(ports.reset);
    let event = observed.events.iter().find(|event| {
        event.get("kind").and_then(Value::as_str) == Some("reset_received")
            && local_of(event) == Some(local.as_str())
    });
    let Some(event) = event else {
        return Check::fail(format!(
            "no reset_received event for {local} in /events (events seen for the port: {})",
            observed.events.len()
        ));
    };
    match event.get("classification").and_then(Value::as_str) {
        Some("idle_timeout_suspected") => Check::pass("ok"),
        other => Check::fail(format!(
            "reset_received on {local} classified {other:?} (idle_before_seconds {}), expected \"idle_timeout_suspected\"",
            event.get("idle_before_seconds").unwrap_or(&Value::Null)
        )),
    }
}

/// A connect to a closed loopback port must come back as a `connect_failed`
/// event with reason `refused`: the state hook's SYN_SENT -> CLOSE path and
/// the `tcp_sock` members it reads, on this kernel.
fn judge_connect_refused(observed: &ModeObservation) -> Check {
    let Some(port) = observed.ports.and_then(|ports| ports.refused) else {
        return Check::not_reached();
    };
    if !observed.steps.iter().any(|step| step == "connect_refused") {
        return Check::not_reached();
    }
    let remote = loopback(port);
    let event = observed.events.iter().find(|event| {
        event.get("kind").and_then(Value::as_str) == Some("connect_failed")
            && event.get("remote").and_then(Value::as_str) == Some(remote.as_str())
    });
    let Some(event) = event else {
        return Check::fail(format!("no connect_failed event for {remote} in /events"));
    };
    match event.get("reason").and_then(Value::as_str) {
        Some("refused") => Check::pass("ok"),
        other => Check::fail(format!(
            "connect_failed to {remote} has reason {other:?}, expected \"refused\""
        )),
    }
}

/// The keepalive hook counts timer runs only where it attached. With
/// TCP_KEEPIDLE=1 the timer has run by the time the walk is read (an answered
/// probe proves it: only that timer sends keepalive probes), so a count of 0
/// is a failure where `required`, else a warning.
fn judge_timer_runs(
    observed: &ModeObservation,
    ports: Ports,
    hook: Option<&str>,
    required: bool,
) -> Check {
    let Some(socket) = find_socket(&observed.sockets, ports.keepalive) else {
        return Check::pass("-");
    };
    let runs = socket
        .pointer("/keepalive/timer_runs")
        .and_then(Value::as_u64);
    let answered = socket
        .pointer("/keepalive/probes_answered")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let total = observed
        .counters
        .get("idlemon_keepalive_timer_runs_total")
        .map_or_else(|| "not reported".to_owned(), ToString::to_string);
    let uncounted = |cell: &str, why: String| {
        if required {
            Check::fail(why)
        } else {
            Check::warn(cell, why)
        }
    };
    match (hook, runs) {
        (None | Some("none"), None) => Check::pass("-"),
        (None | Some("none"), Some(runs)) => Check::pass(runs.to_string()),
        (Some(_), Some(runs)) if runs > 0 => Check::pass(runs.to_string()),
        (Some(kind), Some(_)) => uncounted(
            "0",
            format!(
                "keepalive hook attached as {kind}, but the socket's timer_runs is 0 although \
                 its keepalive timer ran (probes_answered {answered}); \
                 idlemon_keepalive_timer_runs_total {total}"
            ),
        ),
        (Some(kind), None) => uncounted(
            "null",
            format!("keepalive hook attached as {kind}, but timer_runs is null"),
        ),
    }
}

/// What one kernel's run produced, for the matrix and the report.
#[derive(Debug)]
pub struct RunSummary {
    pub target: Target,
    /// The package or "host kernel".
    pub source: String,
    pub release: Option<String>,
    /// Seconds from starting qemu to the guest's /init (VMs only).
    pub boot_seconds: Option<f64>,
    pub total_seconds: f64,
    /// Why the run as a whole failed: timed out, crashed, could not start.
    pub problem: Option<String>,
    pub report: GuestReport,
    /// The last console lines, shown when something failed.
    pub console_tail: Vec<String>,
}

impl RunSummary {
    pub fn rows(&self) -> Vec<Row> {
        Mode::ALL
            .iter()
            .map(|mode| judge(self.target, *mode, self.report.mode(mode.name())))
            .collect()
    }

    /// Failures of the run itself, outside the rows.
    pub fn run_failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        failures.extend(self.problem.clone());
        failures.extend(
            self.report
                .failures
                .iter()
                .map(|failure| format!("guest setup: {failure}")),
        );
        if !self.report.done && self.problem.is_none() {
            failures.push("the driver did not report DONE".to_owned());
        }
        failures.extend(
            self.report
                .garbled
                .iter()
                .map(|line| format!("unreadable result line: {line}")),
        );
        failures
    }
}

/// The matrix and the findings below it; returns the text and whether everything passed.
pub fn render(runs: &[RunSummary], wall_seconds: f64) -> (String, bool) {
    let mut table: Vec<Vec<String>> = vec![
        ["arch", "kernel", "mode"]
            .iter()
            .chain(HOOKS.iter())
            .chain(
                [
                    "ready",
                    "idle_at_risk",
                    "keepalive_safe",
                    "reset_classified",
                    "connect_refused",
                    "timer_runs",
                    "exit",
                ]
                .iter(),
            )
            .map(|header| (*header).to_owned())
            .collect(),
    ];
    let mut findings = String::new();
    let mut passed = true;
    for run in runs {
        let rows = run.rows();
        for row in &rows {
            let mut cells = vec![
                run.target.arch().name().to_owned(),
                run.target.series().to_owned(),
                row.mode.name().to_owned(),
            ];
            cells.extend(row.hooks.iter().map(|check| check.cell.clone()));
            cells.extend(
                [
                    &row.ready,
                    &row.idle,
                    &row.keepalive,
                    &row.reset,
                    &row.connect_refused,
                    &row.timer_runs,
                    &row.exit,
                ]
                .iter()
                .map(|check| check.cell.clone()),
            );
            table.push(cells);
        }
        let mut failures = run.run_failures();
        for row in &rows {
            failures.extend(
                row.failures()
                    .into_iter()
                    .map(|failure| format!("{}: {failure}", row.mode.name())),
            );
        }
        let warnings: Vec<String> = rows
            .iter()
            .flat_map(|row| {
                row.warnings()
                    .into_iter()
                    .map(|warning| format!("{}: {warning}", row.mode.name()))
            })
            .collect();
        let _ = write!(
            findings,
            "\n{} {} ({}, {}): ",
            run.target.arch().name(),
            run.target.series(),
            run.report
                .kernel_release
                .as_deref()
                .or(run.release.as_deref())
                .unwrap_or("?"),
            run.source
        );
        if let Some(boot) = run.boot_seconds {
            let _ = write!(findings, "boot to /init {boot:.1} s, ");
        }
        let _ = writeln!(
            findings,
            "run {:.1} s: {}",
            run.total_seconds,
            if failures.is_empty() { "PASS" } else { "FAIL" }
        );
        for degraded in expected_degradations(run) {
            let _ = writeln!(findings, "  expected: {degraded}");
        }
        for warning in &warnings {
            let _ = writeln!(findings, "  warning: {warning}");
        }
        for failure in &failures {
            let _ = writeln!(findings, "  FAIL: {failure}");
        }
        if !failures.is_empty() {
            passed = false;
            for row in &rows {
                let Some(observation) = run.report.mode(row.mode.name()) else {
                    continue;
                };
                if row.failures().is_empty() || observation.log.is_empty() {
                    continue;
                }
                let _ = writeln!(findings, "  idlemon log, {} (tail):", row.mode.name());
                for line in &observation.log {
                    let _ = writeln!(findings, "    | {line}");
                }
            }
            if !run.console_tail.is_empty() {
                let _ = writeln!(findings, "  console (tail):");
                for line in &run.console_tail {
                    let _ = writeln!(findings, "    | {line}");
                }
            }
        }
    }
    let mut text = format_table(&table);
    text.push_str("\nA kind marked ! is not the expected one; none is a hook running degraded.\n");
    text.push_str(&findings);
    let _ = writeln!(
        text,
        "\nmatrix wall time: {wall_seconds:.1} s; vm-test {}",
        if passed { "PASSED" } else { "FAILED" }
    );
    (text, passed)
}

/// The degraded hooks the table of expectations asks for, said out loud.
fn expected_degradations(run: &RunSummary) -> Vec<String> {
    let mut lines = Vec::new();
    for mode in Mode::ALL {
        let Some(observation) = run.report.mode(mode.name()) else {
            continue;
        };
        if let Some(why) = &observation.degraded {
            lines.push(format!(
                "{}: idlemon not ready (/readyz: {why})",
                mode.name()
            ));
        }
        for hook in HOOKS {
            let expected = expected_kinds(run.target, mode, hook);
            if expected == NONE && observation.hooks.get(hook).map(String::as_str) == Some("none") {
                let why = match hook {
                    "keepalive" => "tcp_keepalive_timer has no tracepoint",
                    "send" => "this kernel has no tcp:tcp_sendmsg_locked tracepoint",
                    _ => "no attach kind fits",
                };
                lines.push(format!("{}: {hook} degraded ({why})", mode.name()));
            }
        }
    }
    lines
}

fn format_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBES_612_DEFAULT: &str = "\
METRIC default idlemon_probe_info{hook=\"send\",kind=\"fentry\"} 1
METRIC default idlemon_probe_info{hook=\"receive\",kind=\"fentry\"} 1
METRIC default idlemon_probe_info{hook=\"keepalive\",kind=\"fentry\"} 1
METRIC default idlemon_probe_info{hook=\"state\",kind=\"tp_btf\"} 1
METRIC default idlemon_probe_info{hook=\"destroy\",kind=\"tp_btf\"} 1
METRIC default idlemon_probe_info{hook=\"reset_received\",kind=\"tp_btf\"} 1
METRIC default idlemon_probe_info{hook=\"reset_sent\",kind=\"tp_btf\"} 1
METRIC default idlemon_degraded{hook=\"keepalive\"} 0
";

    fn passing_default() -> String {
        format!(
            "KERNEL - 6.12.117+deb12-cloud-amd64\r
START default --listen 127.0.0.1:9781
READY default 12.5 ready
{PROBES_612_DEFAULT}PORTS default idle=40000 keepalive=40001 reset=40002 refused=40003
AT_RISK default {{\"local\":\"127.0.0.1:40000\",\"remote\":\"127.0.0.1:5000\",\"at_risk\":true,\"risk\":\"no_keepalive\"}}
AT_RISK default {{\"local\":\"127.0.0.1:5000\",\"remote\":\"127.0.0.1:40001\",\"at_risk\":true,\"risk\":\"no_keepalive\"}}
SOCKET default {{\"local\":\"127.0.0.1:40000\",\"at_risk\":true,\"risk\":\"no_keepalive\",\"keepalive\":{{\"enabled\":false,\"timer_runs\":null}}}}
SOCKET default {{\"local\":\"127.0.0.1:40001\",\"at_risk\":false,\"risk\":null,\"keepalive\":{{\"enabled\":true,\"timer_runs\":2}}}}
STEP default sockets
RESET default econnreset
EVENT default {{\"kind\":\"reset_sent\",\"local\":\"127.0.0.1:5000\",\"remote\":\"127.0.0.1:40002\"}}
EVENT default {{\"kind\":\"reset_received\",\"local\":\"127.0.0.1:40002\",\"classification\":\"idle_timeout_suspected\"}}
STEP default events
EVENT default {{\"kind\":\"connect_failed\",\"local\":\"127.0.0.1:51000\",\"remote\":\"127.0.0.1:40003\",\"reason\":\"refused\"}}
STEP default connect_refused
EXIT default 0
LOG default INFO hook attached
"
        )
    }

    #[test]
    fn parses_probe_info_lines() {
        assert_eq!(
            parse_probe_info("idlemon_probe_info{hook=\"send\",kind=\"tp_btf\"} 1"),
            Some(("send".to_owned(), "tp_btf".to_owned()))
        );
        // Label order is Prometheus's business, not ours.
        assert_eq!(
            parse_probe_info("idlemon_probe_info{kind=\"none\", hook=\"keepalive\"} 1"),
            Some(("keepalive".to_owned(), "none".to_owned()))
        );
        assert_eq!(
            parse_probe_info("idlemon_probe_info{hook=\"send\",kind=\"kprobe\"} 0"),
            None
        );
        assert_eq!(parse_probe_info("idlemon_degraded{hook=\"send\"} 1"), None);
        assert_eq!(parse_probe_info("# HELP idlemon_probe_info how"), None);
        assert_eq!(parse_probe_info("idlemon_probe_info{hook=\"send\" 1"), None);
    }

    #[test]
    fn every_kernel_and_mode_has_one_expectation() {
        for target in [
            Target::V6_1,
            Target::V6_12,
            Target::Native,
            Target::Arm64V6_1,
            Target::Arm64V6_12,
        ] {
            for mode in Mode::ALL {
                let rows = EXPECTATIONS
                    .iter()
                    .filter(|e| e.target == target && e.mode == mode)
                    .count();
                assert_eq!(rows, 1, "{target:?} {mode:?}");
                for hook in HOOKS {
                    assert!(!expected_kinds(target, mode, hook).is_empty(), "{hook}");
                }
            }
        }
    }

    #[test]
    fn expectations_follow_the_kernels() {
        use Mode::*;
        use Target::*;
        assert_eq!(expected_kinds(V6_12, Default, "send"), ["fentry"]);
        assert_eq!(expected_kinds(V6_1, Default, "send"), ["fentry"]);
        assert_eq!(expected_kinds(Arm64V6_1, Default, "send"), ["kprobe"]);
        assert_eq!(expected_kinds(Arm64V6_1, Default, "keepalive"), ["kprobe"]);
        assert_eq!(expected_kinds(Arm64V6_1, NoFentryKprobe, "send"), ["none"]);
        assert_eq!(expected_kinds(V6_1, NoFentry, "keepalive"), ["kprobe"]);
        assert_eq!(expected_kinds(V6_1, NoFentryKprobe, "send"), ["none"]);
        assert_eq!(expected_kinds(V6_12, NoFentryKprobe, "send"), ["none"]);
        assert_eq!(
            expected_kinds(V6_12, NoFentryKprobe, "receive"),
            ["tp_btf", "raw_tp"]
        );
        assert_eq!(
            expected_kinds(Native, NoFentryKprobe, "send"),
            ["tp_btf", "raw_tp"]
        );
        assert_eq!(
            expected_kinds(V6_12, NoFentryKprobe, "keepalive"),
            ["tp_btf", "raw_tp"]
        );
        assert_eq!(
            expected_kinds(Native, Default, "receive"),
            ["tp_btf", "raw_tp"]
        );
        assert_eq!(
            expected_kinds(Native, Default, "keepalive"),
            ["tp_btf", "raw_tp"]
        );
        assert!(expected_kinds(V6_1, Default, "state").contains(&"tracepoint"));
        assert!(expected_kinds(V6_1, Default, "unknown").is_empty());
    }

    #[test]
    fn parses_and_passes_a_good_run() {
        let report = parse_guest_output(&(passing_default() + "DONE -\n"));
        assert!(report.done);
        assert!(report.garbled.is_empty(), "{:?}", report.garbled);
        assert_eq!(
            report.kernel_release.as_deref(),
            Some("6.12.117+deb12-cloud-amd64")
        );
        let observed = report.mode("default").expect("mode");
        assert_eq!(
            observed.hooks.get("send").map(String::as_str),
            Some("fentry")
        );
        assert_eq!(observed.hooks.len(), 7);
        assert_eq!(
            observed.ports,
            Some(Ports {
                idle: 40000,
                keepalive: 40001,
                reset: 40002,
                refused: Some(40003),
            })
        );
        let row = judge(Target::V6_12, Mode::Default, Some(observed));
        assert!(row.failures().is_empty(), "{:?}", row.failures());
        assert_eq!(row.timer_runs.cell, "2");
        assert_eq!(row.ready.cell, "12.5s");
        assert_eq!(row.connect_refused.cell, "ok");
    }

    #[test]
    fn a_refused_connect_without_its_event_fails() {
        let text = passing_default().replace(
            "\"remote\":\"127.0.0.1:40003\",\"reason\":\"refused\"",
            "\"remote\":\"127.0.0.1:40003\",\"reason\":\"timeout\"",
        );
        let report = parse_guest_output(&text);
        let row = judge(Target::V6_12, Mode::Default, report.mode("default"));
        assert!(
            row.failures()
                .iter()
                .any(|failure| failure.starts_with("refused connect explained: ")),
            "{:?}",
            row.failures()
        );
        let text = passing_default().replace(
            "EVENT default {\"kind\":\"connect_failed\"",
            "LOG default {\"kind\":\"connect_failed\"",
        );
        let report = parse_guest_output(&text);
        let row = judge(Target::V6_12, Mode::Default, report.mode("default"));
        assert_eq!(
            row.connect_refused.failure.as_deref(),
            Some("no connect_failed event for 127.0.0.1:40003 in /events")
        );
    }

    #[test]
    fn flags_an_unexpected_kind() {
        let report = parse_guest_output(&passing_default());
        // The same observation on 6.12 with fentry disabled should have been kprobes.
        let row = judge(Target::V6_12, Mode::NoFentry, report.mode("default"));
        assert_eq!(row.hooks[0].cell, "fentry!");
        assert!(row.failures().iter().any(|f| f.contains("expected kprobe")));
    }

    #[test]
    fn fails_each_broken_step() {
        let broken = passing_default()
            .replace(
                "\"risk\":\"no_keepalive\"}",
                "\"risk\":\"keepalive_too_slow\"}",
            )
            .replace(
                "\"at_risk\":false,\"risk\":null",
                "\"at_risk\":true,\"risk\":\"keepalive_too_slow\"",
            )
            .replace(
                "\"classification\":\"idle_timeout_suspected\"",
                "\"classification\":\"other\"",
            )
            .replace("EXIT default 0", "EXIT default code=1")
            .replace("\"timer_runs\":2", "\"timer_runs\":null");
        let report = parse_guest_output(&broken);
        let row = judge(Target::V6_12, Mode::Default, report.mode("default"));
        for check in [
            &row.idle,
            &row.keepalive,
            &row.reset,
            &row.timer_runs,
            &row.exit,
        ] {
            assert_eq!(check.cell, "FAIL", "{check:?}");
        }
        let failures = row.failures();
        assert_eq!(failures.len(), 5, "{failures:?}");
        assert!(
            failures.iter().any(|f| f.contains("timer_runs is null")),
            "{failures:?}"
        );
        assert!(row.warnings().is_empty());
    }

    /// The VM kernels must count keepalive timer runs; the host only warns.
    #[test]
    fn an_uncounted_keepalive_timer_fails_in_vms_and_warns_natively() {
        let output = passing_default()
            .replace("\"timer_runs\":2", "\"probes_answered\":1,\"timer_runs\":0")
            + "METRIC default idlemon_keepalive_timer_runs_total 0\n";
        let report = parse_guest_output(&output);
        let observed = report.mode("default");
        assert_eq!(
            observed.and_then(|o| o.counters.get("idlemon_keepalive_timer_runs_total")),
            Some(&0.0)
        );
        let mentions_the_evidence = |why: &str| {
            why.contains("probes_answered 1")
                && why.contains("idlemon_keepalive_timer_runs_total 0")
        };
        // The fixture attached fentry, which arm64 6.1 refuses.
        for target in [Target::V6_1, Target::V6_12, Target::Arm64V6_12] {
            let row = judge(target, Mode::Default, observed);
            assert_eq!(row.timer_runs.cell, "FAIL");
            let failures = row.failures();
            assert_eq!(failures.len(), 1, "{failures:?}");
            assert!(
                failures[0].starts_with("keepalive timer_runs: ")
                    && mentions_the_evidence(&failures[0]),
                "{failures:?}"
            );
        }

        // The host attaches tracepoints where the VMs attach fentry.
        let native = output.replace("kind=\"fentry\"", "kind=\"tp_btf\"");
        let report = parse_guest_output(&native);
        let row = judge(Target::Native, Mode::Default, report.mode("default"));
        assert_eq!(row.timer_runs.cell, "0");
        assert!(row.failures().is_empty(), "{:?}", row.failures());
        let warnings = row.warnings();
        assert!(mentions_the_evidence(&warnings[0]), "{warnings:?}");
    }

    #[test]
    fn a_walk_by_open_file_that_did_not_load_fails_readiness() {
        let with = |value: &str| {
            parse_guest_output(&passing_default().replace(
                "READY default 12.5 ready\n",
                &format!(
                    "READY default 12.5 ready\nMETRIC default idlemon_scan_file_walk_available {value}\n"
                ),
            ))
        };
        let loaded = with("1");
        let row = judge(Target::V6_12, Mode::Default, loaded.mode("default"));
        assert!(row.ready.failure.is_none(), "{:?}", row.ready);
        let refused = with("0");
        let row = judge(Target::V6_12, Mode::Default, refused.mode("default"));
        assert!(
            row.ready
                .failure
                .as_deref()
                .is_some_and(|why| why.contains("iter/task_file")),
            "{:?}",
            row.ready
        );
    }

    #[test]
    fn readiness_follows_the_expectations() {
        let degraded = parse_guest_output(&passing_default().replace(
            "READY default 12.5 ready",
            "READY default 3.0 degraded not ready, degraded: send hook missing: x",
        ));
        let observed = degraded.mode("default");
        assert_eq!(
            observed.and_then(|o| o.degraded.as_deref()),
            Some("not ready, degraded: send hook missing: x")
        );
        // On 6.1 without fentry and kprobes, not ready is right...
        let row = judge(Target::V6_1, Mode::NoFentryKprobe, observed);
        assert_eq!(row.ready.cell, "degraded 3.0s");
        assert!(row.ready.failure.is_none());
        // ...on this host, which has every tracepoint, it is a failure...
        let row = judge(Target::Native, Mode::NoFentryKprobe, observed);
        assert!(
            row.ready
                .failure
                .as_deref()
                .is_some_and(|f| f.contains("send hook missing"))
        );
        // ...and so is ready where send cannot attach.
        let ready = parse_guest_output(&passing_default());
        let row = judge(Target::V6_1, Mode::NoFentryKprobe, ready.mode("default"));
        assert_eq!(row.ready.cell, "FAIL");
        assert!(
            parse_guest_output("READY default soon ready\n")
                .garbled
                .len()
                == 1
        );
    }

    #[test]
    fn a_daemon_that_never_got_ready_fails_once() {
        let report = parse_guest_output(
            "START default --listen x\nFAIL default ready idlemon exited before it was ready (code=1)\nEXIT default code=1 before SIGTERM\nDONE -\n",
        );
        let row = judge(Target::V6_1, Mode::Default, report.mode("default"));
        assert_eq!(row.ready.cell, "FAIL");
        assert_eq!(row.idle.cell, "-");
        let failures = row.failures();
        assert!(
            failures[0].starts_with("ready idlemon exited"),
            "{failures:?}"
        );
        let missing = judge(Target::V6_1, Mode::NoFentry, report.mode("no-fentry"));
        assert!(missing.failures()[0].contains("reported nothing"));
    }

    #[test]
    fn a_mode_cut_short_is_not_reached_rather_than_wrong() {
        let full = passing_default();
        let cut = &full[..full.find("AT_RISK").expect("fixture has AT_RISK")];
        let report = parse_guest_output(cut);
        let row = judge(Target::V6_1, Mode::Default, report.mode("default"));
        for check in [&row.idle, &row.keepalive, &row.reset, &row.exit] {
            assert_eq!(check.cell, "-", "{check:?}");
        }
        assert_eq!(row.failures(), ["steps not reached"]);
    }

    #[test]
    fn a_run_without_done_or_with_garbage_fails() {
        let run = RunSummary {
            target: Target::V6_1,
            source: "pkg".to_owned(),
            release: None,
            boot_seconds: Some(3.0),
            total_seconds: 10.0,
            problem: None,
            report: parse_guest_output(&(passing_default() + "what is this\n")),
            console_tail: vec!["Kernel panic".to_owned()],
        };
        let failures = run.run_failures();
        assert_eq!(failures.len(), 2, "{failures:?}");
        let (text, passed) = render(&[run], 42.0);
        assert!(!passed);
        assert!(text.contains("Kernel panic"), "{text}");
        assert!(text.contains("matrix wall time: 42.0 s"), "{text}");
    }

    #[test]
    fn renders_a_passing_matrix() {
        let mut output = String::new();
        for mode in Mode::ALL {
            output.push_str(&passing_default().replace(" default ", &format!(" {} ", mode.name())));
        }
        output.push_str("DONE -\n");
        // Native expects tracepoints for send, receive and keepalive.
        let output = output
            .replace(
                "hook=\"send\",kind=\"fentry\"",
                "hook=\"send\",kind=\"tp_btf\"",
            )
            .replace(
                "hook=\"receive\",kind=\"fentry\"",
                "hook=\"receive\",kind=\"raw_tp\"",
            )
            .replace(
                "hook=\"keepalive\",kind=\"fentry\"",
                "hook=\"keepalive\",kind=\"tp_btf\"",
            );
        let run = RunSummary {
            target: Target::Native,
            source: "host kernel".to_owned(),
            release: Some("6.18".to_owned()),
            boot_seconds: None,
            total_seconds: 30.0,
            problem: None,
            report: parse_guest_output(&output),
            console_tail: Vec::new(),
        };
        let (text, passed) = render(&[run], 31.0);
        assert!(passed, "{text}");
        assert!(!text.contains("keepalive degraded"), "{text}");
        let header = text.lines().next().expect("header");
        assert!(header.starts_with("arch   kernel  mode"), "{header}");
        assert_eq!(
            text.lines()
                .filter(|line| line.starts_with("amd64  native  "))
                .count(),
            3
        );
        assert!(
            text.contains("\namd64 native (6.12.117+deb12-cloud-amd64, host kernel): "),
            "{text}"
        );
    }
}
