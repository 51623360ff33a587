//! A running idlemon in a network namespace of its own, with its HTTP
//! endpoints, waited for by its probes and `/events` long polls.

use std::{
    fs::File,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Netns, TempFile, attach::Expected, metrics, socket::http_get_within, wait_for};

pub const DAEMON_PORT: u16 = 9781;
/// The connection data API (/sockets, /events): idlemon's default
/// `--api-listen`, on loopback.
pub const API_PORT: u16 = 9782;

/// How long idlemon may take to get ready: under qemu TCG the verifier
/// alone takes seconds.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long an awaited event may take to show in `/events`.
const EVENT_LIMIT: Duration = Duration::from_secs(20);

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
    if path.starts_with("/sockets") || path.starts_with("/events") {
        API_PORT
    } else {
        DAEMON_PORT
    }
}

/// A running idlemon, listening on 127.0.0.1:9781 inside its own namespace
/// so that tests never collide on a port. Killed on drop.
pub struct Daemon {
    pub netns: Netns,
    child: Option<Child>,
    log: PathBuf,
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
        let mut daemon = Self::launch(Netns::new("daemon"), args, Stdio::null());
        daemon.wait_degraded();
        daemon
    }

    fn launch(netns: Netns, args: &[&str], stdout: Stdio) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", netns.name));
        let mut command = netns.command(&idlemon());
        // Loopback unless the test chose an address (the pod network's).
        if !args.contains(&"--listen") {
            command.args(["--listen", &format!("127.0.0.1:{DAEMON_PORT}")]);
        }
        let child = command
            .args(["--log-level", "debug"])
            .args(args)
            .stdout(stdout)
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self {
            netns,
            child: Some(child),
            log,
        }
    }

    /// Starts idlemon and waits until it is ready, or, where this run
    /// expects a required hook missing (`IDLEMON_EXPECT_ATTACH`), until it
    /// runs degraded; then checks its attach kinds against the expectation.
    /// A test that disables attach kinds itself is not checked.
    fn spawn(netns: Netns, args: &[&str], stdout: Stdio) -> Self {
        let mut daemon = Self::launch(netns, args, stdout);
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

    fn wait_until(&mut self, ready_path: &str) {
        let deadline = Instant::now() + READY_LIMIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("idlemon exited with {status}:\n{}", self.log());
            }
            if self
                .try_get(ready_path)
                .is_some_and(|(status, _)| status == 200)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "idlemon: no 200 on {ready_path} after {} s:\n{}",
            READY_LIMIT.as_secs(),
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// GET over HTTP/1.0 to the server that serves `path`; None when the
    /// daemon is not reachable.
    pub fn try_get(&self, path: &str) -> Option<(u16, String)> {
        self.try_get_on(port_for(path), path)
    }

    /// GET over HTTP/1.0 on `port`; None when nothing answers there.
    pub fn try_get_on(&self, port: u16, path: &str) -> Option<(u16, String)> {
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        http_get_within(&self.netns, address, path, Duration::from_secs(10))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path)
            .unwrap_or_else(|| panic!("GET {path} failed; log:\n{}", self.log()))
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
        let address = SocketAddr::from(([127, 0, 0, 1], API_PORT));
        // A long poll answers within its wait (at most 60 s).
        let (status, body) = http_get_within(&self.netns, address, path, Duration::from_secs(70))
            .unwrap_or_else(|| panic!("GET {path} failed; log:\n{}", self.log()));
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

    /// SIGTERM, then wait.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
