//! A running idlemon, in a network namespace of its own (the tests) or in
//! the host's (the bench), with its HTTP endpoints, waited for by its
//! probes and `/events` long polls.
//!
//! The fallible methods (`launch_in`, `launch_on_host`, `check_alive`,
//! `wait_ok`, `fetch`, `stop_within`) serve the bench, whose parts report
//! an error and go on; the tests' methods panic with the daemon's log.

use std::{
    ffi::OsString,
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Netns, TempFile, attach::Expected, metrics, process::Guarded, socket, wait_for};

pub const DAEMON_PORT: u16 = 9781;
/// The connection data API (/sockets, /events): idlemon's default
/// `--api-listen`, on loopback.
pub const API_PORT: u16 = 9782;

/// How long idlemon may take to get ready: under qemu TCG the verifier
/// alone takes seconds.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long an awaited event may take to show in `/events`.
const EVENT_LIMIT: Duration = Duration::from_secs(20);
/// How long a GET may take to answer: a scrape of 200,000 sockets takes
/// its time (the bench's scale part).
const ANSWER_LIMIT: Duration = Duration::from_secs(30);
/// How long `stop` waits for a clean exit after SIGTERM before SIGKILL
/// (which the returned status then shows).
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// The daemon under test: `IDLEMON_BIN` when set (the vm's guest, where the
/// binary sits elsewhere), else the `idlemon` cargo built beside the test
/// binary, which is the path integration tests know as
/// `env!("CARGO_BIN_EXE_idlemon")` (cargo puts test executables in
/// `deps/` and binaries one level up).
pub fn idlemon() -> String {
    if let Ok(path) = std::env::var("IDLEMON_BIN") {
        return path;
    }
    let test = std::env::current_exe().unwrap();
    let path = test
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("idlemon"))
        .unwrap();
    assert!(
        path.is_file(),
        "{} is missing: run the tests through cargo (`cargo test -p monitor`), or set IDLEMON_BIN",
        path.display()
    );
    path.to_str().unwrap().to_owned()
}

/// The port that serves `path`: connection data on the API port, the rest
/// (metrics, probes) on the metrics port.
pub fn port_for(path: &str) -> u16 {
    if is_api(path) { API_PORT } else { DAEMON_PORT }
}

fn is_api(path: &str) -> bool {
    path.starts_with("/sockets") || path.starts_with("/events")
}

/// A running idlemon, stopped on drop. In a namespace of its own it listens
/// on 127.0.0.1:9781 (metrics, probes) and :9782 (API) there, so that tests
/// never collide on a port; in the host's namespace on two free loopback
/// ports.
pub struct Daemon {
    process: Guarded,
    netns: Option<Netns>,
    metrics_addr: SocketAddr,
    api_addr: SocketAddr,
    /// The child's stderr: the daemon's own log.
    log: PathBuf,
    started: Instant,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Self {
        Self::start_in(Netns::new("daemon"), args)
    }

    /// Starts idlemon with short thresholds and walks (idle at 2 s, a walk
    /// every 0.5 s) and `config`'s paths, plus `extra`.
    pub fn with_config(config: &TempFile, extra: &[&str]) -> Self {
        Self::start(&Self::quick_args(config, extra))
    }

    /// The arguments of `with_config`.
    pub fn quick_args<'a>(config: &'a TempFile, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--idle-threshold",
            "2",
            "--scan-interval",
            "0.5",
            "--config",
            config.path(),
        ];
        args.extend_from_slice(extra);
        args
    }

    /// Starts idlemon in `netns`, where the test may already run servers
    /// for it (a fake Kubernetes API).
    pub fn start_in(netns: Netns, args: &[&str]) -> Self {
        Self::spawn(netns, args, Stdio::null())
    }

    /// Starts idlemon with its stdout (the event log, by default) on a pipe
    /// that nobody reads: once the pipe is full, every write blocks, as when
    /// a container runtime's log reader stalls.
    pub fn start_with_stalled_stdout(args: &[&str]) -> Self {
        Self::spawn(Netns::new("daemon"), args, Stdio::piped())
    }

    /// Starts idlemon that is expected to run but not become ready (degraded).
    pub fn start_unready(args: &[&str]) -> Self {
        let mut daemon = Self::launch_in(Netns::new("daemon"), args, Stdio::null()).unwrap();
        daemon.wait_degraded();
        daemon
    }

    /// Starts idlemon in `netns` with a debug log, listening on loopback
    /// unless `args` choose an address (the pod network's); does not wait.
    /// Call it from the thread that owns the daemon (see `Guarded::spawn`).
    pub fn launch_in(netns: Netns, args: &[&str], stdout: Stdio) -> anyhow::Result<Self> {
        let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut command = netns.command(&idlemon());
        if !args.contains(&"--listen") {
            command
                .arg("--listen")
                .arg(loopback(DAEMON_PORT).to_string());
        }
        command.args(["--log-level", "debug"]).args(args);
        let log = std::env::temp_dir().join(format!("{}.log", netns.name));
        Self::launch(
            command,
            Some(netns),
            [loopback(DAEMON_PORT), loopback(API_PORT)],
            log,
            stdout,
        )
    }

    /// Starts `binary` with `args` in the host's namespace, on two free
    /// loopback ports (metrics and API: it never meets another idlemon's);
    /// does not wait. Call it from the thread that owns the daemon (see
    /// `Guarded::spawn`).
    pub fn launch_on_host(binary: &Path, args: &[OsString]) -> anyhow::Result<Self> {
        let metrics_addr = free_port()?;
        let mut api_addr = free_port()?;
        while api_addr == metrics_addr {
            api_addr = free_port()?;
        }
        let mut command = Command::new(binary);
        command
            .arg("--listen")
            .arg(metrics_addr.to_string())
            .arg("--api-listen")
            .arg(api_addr.to_string())
            .args(args);
        let log = std::env::temp_dir().join(format!(
            "idlemon-{}-{}.log",
            std::process::id(),
            metrics_addr.port()
        ));
        Self::launch(command, None, [metrics_addr, api_addr], log, Stdio::null())
    }

    fn launch(
        mut command: Command,
        netns: Option<Netns>,
        [metrics_addr, api_addr]: [SocketAddr; 2],
        log: PathBuf,
        stdout: Stdio,
    ) -> anyhow::Result<Self> {
        let stderr =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let started = Instant::now();
        // Killed at once on drop: whoever drops a running daemon has no use
        // for a clean exit (a failed test, a bench part that gave up), and
        // its programs go with its file descriptors. `stop` is the clean way.
        let process = Guarded::spawn(&mut command, "idlemon", Duration::ZERO)?;
        Ok(Self {
            process,
            netns,
            metrics_addr,
            api_addr,
            log,
            started,
        })
    }

    /// Starts idlemon and waits until it is ready, or, where this run
    /// expects a required hook missing (`IDLEMON_EXPECT_ATTACH`), until it
    /// runs degraded; then checks its attach kinds against the expectation.
    /// A test that disables attach kinds itself is not checked.
    fn spawn(netns: Netns, args: &[&str], stdout: Stdio) -> Self {
        let mut daemon = Self::launch_in(netns, args, stdout).unwrap();
        let expected = Expected::from_env().filter(|_| !args.contains(&"--disable-attach"));
        match &expected {
            Some(expected) if !expected.ready() => daemon.wait_degraded(),
            _ => daemon.wait_until("/readyz"),
        }
        if let Some(expected) = expected {
            daemon.assert_attach(&expected);
        }
        daemon
    }

    /// The daemon's own namespace; panics for a daemon in the host's.
    pub fn netns(&self) -> &Netns {
        self.netns
            .as_ref()
            .expect("an idlemon in the host's namespace has no namespace of its own")
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Asserts `idlemon_probe_info` against `expected`.
    pub fn assert_attach(&self, expected: &Expected) {
        let (_, body) = self.get("/metrics");
        let info = metrics::probe_info(&body);
        // What attached, for `cargo xtask vm-test`'s table.
        let shown: Vec<String> = info
            .iter()
            .map(|(hook, kind)| format!("{hook}={kind}"))
            .collect();
        println!("ATTACHED: {}", shown.join(","));
        let mismatches = expected.mismatches(&info);
        assert!(
            mismatches.is_empty(),
            "attach kinds differ from {}: {}; log:\n{}",
            crate::attach::VARIABLE,
            mismatches.join("; "),
            self.log()
        );
    }

    /// Waits for health and the first walk, then asserts that idlemon
    /// stays unready: only its degradation keeps it so then.
    fn wait_degraded(&mut self) {
        self.wait_until("/healthz");
        let walked = wait_for(READY_LIMIT, || {
            self.metric("idlemon_scans_total")
                .filter(|scans| *scans >= 1.0)
        });
        assert!(walked.is_some(), "no walk; log:\n{}", self.log());
        let (status, body) = self.get("/readyz");
        assert_ne!(status, 200, "ready although degraded is expected: {body}");
    }

    fn wait_until(&mut self, path: &str) {
        let every = Duration::from_millis(100);
        if let Err(error) = self.wait_ok(path, READY_LIMIT, every, || Ok(())) {
            panic!("{error:#}");
        }
    }

    /// Waits until `path` answers 200, checking every `every` that the
    /// daemon still runs and that `go_on` has no objection (the bench's
    /// Ctrl-C); returns the time since the start.
    pub fn wait_ok(
        &mut self,
        path: &str,
        limit: Duration,
        every: Duration,
        mut go_on: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if let Ok((200, _)) = self.fetch(path) {
                return Ok(self.started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!(
                    "idlemon: no 200 on {path} after {} s; its log:\n{}",
                    limit.as_secs(),
                    self.log()
                );
            }
            go_on()?;
            std::thread::sleep(every);
        }
    }

    /// Fails with the daemon's log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.process.try_wait()? {
            bail!("idlemon exited ({status}); its log:\n{}", self.log());
        }
        Ok(())
    }

    /// The daemon's log: its stderr.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` from the server that serves it (connection data on the
    /// API address, the rest on the metrics address), from the daemon's
    /// namespace: the status and the body, or what failed.
    pub fn fetch(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let address = if is_api(path) {
            self.api_addr
        } else {
            self.metrics_addr
        };
        self.fetch_from(address, path, ANSWER_LIMIT)
    }

    fn fetch_from(
        &self,
        address: SocketAddr,
        path: &str,
        limit: Duration,
    ) -> anyhow::Result<(u16, String)> {
        Ok(match &self.netns {
            Some(netns) => netns.run(|| socket::get(address, path, limit))?,
            None => socket::get(address, path, limit)?,
        })
    }

    /// GET over HTTP/1.0 to the server that serves `path`; None when the
    /// daemon is not reachable.
    pub fn try_get(&self, path: &str) -> Option<(u16, String)> {
        self.fetch(path).ok()
    }

    /// GET over HTTP/1.0 on loopback port `port` of the daemon's
    /// namespace; None when nothing answers there.
    pub fn try_get_on(&self, port: u16, path: &str) -> Option<(u16, String)> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        self.fetch_from(address, path, ANSWER_LIMIT).ok()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.fetch(path)
            .unwrap_or_else(|error| panic!("{error:#}; log:\n{}", self.log()))
    }

    pub fn sockets(&self, query: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/sockets{query}"));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The sockets idlemon tracks in one network namespace: what a test
    /// asserts on, since other tests' sockets share the host.
    pub fn sockets_in(&self, netns: &Netns, query: &str) -> Vec<Value> {
        let inode = netns.inode();
        self.sockets(query)
            .into_iter()
            .filter(|socket| socket["netns"].as_u64() == Some(inode))
            .collect()
    }

    /// The events after `after` (an event id; 0: all of them), paging
    /// through answers cut short.
    pub fn events_after(&self, after: u64) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = after;
        // Bounded: 10,000 events per page, a history of at most 10^6.
        for _ in 0..100 {
            let page = self.event_page(&format!("/events?limit=10000&after={after}"));
            let Some(last) = page.last().and_then(|event| event["id"].as_u64()) else {
                break;
            };
            after = last;
            all.extend(page);
        }
        all
    }

    /// Every event in `/events`.
    pub fn events(&self) -> Vec<Value> {
        self.events_after(0)
    }

    fn event_page(&self, path: &str) -> Vec<Value> {
        // A long poll answers within its wait (at most 60 s).
        let (status, body) = self
            .fetch_from(self.api_addr, path, Duration::from_secs(70))
            .unwrap_or_else(|error| panic!("{error:#}; log:\n{}", self.log()));
        assert_eq!(status, 200, "{path}: {body}");
        // One answer stops at 4 MiB (and says so); the caller pages on.
        assert!(
            body.len() <= 4 << 20,
            "an /events answer of {} bytes",
            body.len()
        );
        serde_json::from_str(&body).unwrap()
    }

    /// Waits for the first event that `matches`, by `/events` long polls
    /// that return as soon as a newer event comes; panics naming `what`.
    pub fn wait_event(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + EVENT_LIMIT;
        let mut after = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no {what} event; events: {:#?}", self.events());
            }
            let wait = left.as_secs().clamp(1, 60);
            let page = self.event_page(&format!("/events?limit=10000&after={after}&wait={wait}"));
            for event in page {
                if matches(&event) {
                    return event;
                }
                after = after.max(event["id"].as_u64().unwrap_or(after));
            }
        }
    }

    /// The value of one metric line, e.g. `idlemon_tracked_sockets` or
    /// `idlemon_at_risk_sockets{reason="no_keepalive"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics");
        metrics::metric(&body, series)
    }

    /// The value of a series that must be exported (a counter the daemon
    /// registers at start); panics naming it otherwise.
    pub fn counter(&self, series: &str) -> f64 {
        self.metric(series)
            .unwrap_or_else(|| panic!("{series} not exported"))
    }

    /// The sum of every series of `name` whose labels contain `filter`
    /// (e.g. `reason="no_keepalive"`).
    pub fn metric_sum(&self, name: &str, filter: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        metrics::metric_sum(&body, name, filter)
    }

    /// SIGTERM, then up to `grace` for a clean exit (idlemon detaches its
    /// programs then), then SIGKILL; the status says which ended it.
    pub fn stop_within(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        self.process.stop(grace)
    }

    /// SIGTERM, then wait (SIGKILL after 30 s, which the status shows).
    pub fn stop(mut self) -> ExitStatus {
        self.stop_within(STOP_LIMIT).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The log outlives a failed test, for whoever looks into it.
        if !std::thread::panicking() {
            let _ = fs::remove_file(&self.log);
        }
    }
}

/// A loopback port nobody listens on now. Another process may take it
/// before the daemon binds it; the daemon then fails loudly, which
/// `check_alive` reports.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    listener.local_addr().context("cannot find a free port")
}
