//! Test hosts for the kernel tests: network namespaces, a NAT gateway with a
//! short idle timeout (conntrack that forgets idle flows, `NatPath`), an echo server, and a running
//! idlemon with an HTTP client. Traffic stays on loopback and on TEST-NET
//! addresses inside namespaces these helpers create.

#![allow(
    dead_code,
    clippy::unwrap_used,
    reason = "shared by several test binaries; tests fail loudly"
)]

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub const IDLEMON: &str = env!("CARGO_BIN_EXE_idlemon");
pub const CLIENT_IP: &str = "192.0.2.2";
pub const NAT_CLIENT_SIDE_IP: &str = "192.0.2.1";
pub const NAT_SERVER_SIDE_IP: &str = "198.51.100.1";
pub const SERVER_IP: &str = "198.51.100.2";
pub const DAEMON_PORT: u16 = 9781;
/// The connection data API (/sockets, /events): idlemon's default
/// `--api-listen`, on loopback.
pub const API_PORT: u16 = 9782;

/// The port that serves `path`: connection data on the API port, the rest
/// (metrics, probes) on the metrics port.
pub fn port_for(path: &str) -> u16 {
    if path.starts_with("/sockets") || path.starts_with("/events") {
        API_PORT
    } else {
        DAEMON_PORT
    }
}
/// The connecting thread of `NatPath::connect` has its own task name; what
/// idlemon reports is the process's (`/proc/PID/comm`, as `ps` shows it).
pub const CLIENT_THREAD_COMM: &str = "idle-client";

/// This test process's name, which idlemon reports for its sockets.
pub fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_owned()
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A network namespace of this test, deleted on drop.
pub struct Netns {
    pub name: String,
    file: File,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "idlemon-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        let file = File::open(format!("/run/netns/{name}")).unwrap();
        Self { name, file }
    }

    /// The namespace's inode, as idlemon reports it in `netns`.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        self.file.metadata().unwrap().ino()
    }

    /// Runs `f` on a thread inside this namespace: sockets it creates belong here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.file.as_raw_fd();
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(fd);
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// Starts `f` on a detached thread inside this namespace.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let file = self.file.try_clone().unwrap();
        thread::spawn(move || {
            enter(file.as_raw_fd());
            f();
        });
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all);
    }

    /// Runs a command inside this namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
    }

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open in the child.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }
}

fn enter(fd: i32) {
    // SAFETY: a valid namespace fd; affects this thread only.
    assert_eq!(
        unsafe { libc::setns(fd, libc::CLONE_NEWNET) },
        0,
        "setns failed"
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// client --veth-- nat --veth-- server, where the nat namespace masquerades
/// and forgets idle flows after `timeout` seconds, then answers their next
/// packet with a RST, as an AWS NAT gateway does after 350 s.
pub struct NatPath {
    pub client: Netns,
    pub nat: Netns,
    pub server: Netns,
}

impl NatPath {
    pub fn new(timeout_seconds: u32) -> Self {
        Self::forgetting(timeout_seconds, "reject with tcp reset")
    }

    /// A path that forgets idle flows and then silently drops their packets,
    /// as a Gateway Load Balancer does unless configured to reset (and
    /// security-group connection tracking, and many firewalls): the client's
    /// next send is retransmitted until the kernel gives up with ETIMEDOUT.
    pub fn dropping(timeout_seconds: u32) -> Self {
        Self::forgetting(timeout_seconds, "drop")
    }

    /// `verdict`: what the nat namespace does with a packet of a flow it
    /// forgot (conntrack state invalid).
    fn forgetting(timeout_seconds: u32, verdict: &str) -> Self {
        let client = Netns::new("client");
        let nat = Netns::new("nat");
        let server = Netns::new("server");
        sh(
            "ip",
            &[
                "link",
                "add",
                "name",
                "eth0",
                "netns",
                &client.name,
                "type",
                "veth",
                "peer",
                "name",
                "inside",
                "netns",
                &nat.name,
            ],
        );
        sh(
            "ip",
            &[
                "link",
                "add",
                "name",
                "outside",
                "netns",
                &nat.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &server.name,
            ],
        );
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["route", "add", "default", "via", NAT_CLIENT_SIDE_IP]);
        nat.ip(&[
            "addr",
            "add",
            &format!("{NAT_CLIENT_SIDE_IP}/24"),
            "dev",
            "inside",
        ]);
        nat.ip(&[
            "addr",
            "add",
            &format!("{NAT_SERVER_SIDE_IP}/24"),
            "dev",
            "outside",
        ]);
        nat.ip(&["link", "set", "inside", "up"]);
        nat.ip(&["link", "set", "outside", "up"]);
        server.ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", "eth0"]);
        server.ip(&["link", "set", "eth0", "up"]);

        let rules = format!(
            "table ip nat {{\n\
             chain postrouting {{ type nat hook postrouting priority srcnat; oifname \"outside\" masquerade; }}\n\
             }}\n\
             table inet filter {{\n\
             chain forward {{ type filter hook forward priority filter; ct state invalid {verdict}; }}\n\
             }}\n"
        );
        let mut nft = nat
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        nft.stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft rules failed");
        nat.sysctl("net.ipv4.ip_forward", "1");
        // A packet of a forgotten flow is then invalid instead of picked up.
        nat.sysctl("net.netfilter.nf_conntrack_tcp_loose", "0");
        nat.sysctl(
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            &timeout_seconds.to_string(),
        );
        Self {
            client,
            nat,
            server,
        }
    }

    /// An echo server on SERVER_IP:port that serves up to `connections`.
    pub fn echo_server(&self, port: u16, connections: usize) {
        let listener = self
            .server
            .run(move || TcpListener::bind((SERVER_IP, port)).unwrap());
        thread::spawn(move || {
            for stream in listener.incoming().take(connections) {
                let Ok(mut stream) = stream else { return };
                thread::spawn(move || {
                    let mut buffer = [0u8; 1024];
                    while let Ok(read) = stream.read(&mut buffer) {
                        if read == 0 || stream.write_all(&buffer[..read]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// A client connection to the echo server, configured by `keepalive`
    /// before connect, as applications do.
    /// The connecting thread is named CLIENT_THREAD_COMM, so that a report
    /// of the thread's name instead of the process's shows.
    pub fn connect(&self, port: u16, keepalive: Keepalive) -> TcpStream {
        let target: SocketAddr = format!("{SERVER_IP}:{port}").parse().unwrap();
        self.client.run(move || {
            // SAFETY: PR_SET_NAME with a NUL-terminated name of at most 16 bytes.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"idle-client".as_ptr()) };
            connect(target, keepalive)
        })
    }
}

/// Keepalive settings of a test client.
#[derive(Debug, Clone, Copy)]
pub enum Keepalive {
    Off,
    /// SO_KEEPALIVE with the namespace's timers.
    On,
    /// SO_KEEPALIVE with TCP_KEEPIDLE and TCP_KEEPINTVL of this many seconds.
    Every(i32),
}

pub fn connect(target: SocketAddr, keepalive: Keepalive) -> TcpStream {
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
    let set = |level, name, value: i32| {
        // SAFETY: a valid socket and option value.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                size_of::<i32>() as u32,
            )
        };
        assert_eq!(rc, 0, "setsockopt failed");
    };
    match keepalive {
        Keepalive::Off => {}
        Keepalive::On => set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        Keepalive::Every(seconds) => {
            set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
            set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, seconds);
            set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, seconds);
        }
    }
    stream
}

/// One request/response over an echo connection.
pub fn echo(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"ping")?;
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply)?;
    assert_eq!(&reply, b"ping");
    Ok(())
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

    /// Starts idlemon in `netns`, where the test may already run servers
    /// for it (a fake Kubernetes API).
    pub fn start_in(netns: Netns, args: &[&str]) -> Self {
        Self::spawn(netns, args, "/readyz", Stdio::null())
    }

    /// Starts idlemon with its stdout (the event log, by default) on a pipe
    /// that nobody reads: once the pipe is full, every write blocks, as when
    /// a container runtime's log reader stalls.
    pub fn start_with_stalled_stdout(args: &[&str]) -> Self {
        Self::spawn(Netns::new("daemon"), args, "/readyz", Stdio::piped())
    }

    /// Starts idlemon that is expected to run but not become ready (degraded).
    pub fn start_unready(args: &[&str]) -> Self {
        let daemon = Self::spawn(Netns::new("daemon"), args, "/healthz", Stdio::null());
        // Let the first walk finish, so that only degradation keeps it unready.
        wait_for(Duration::from_secs(10), || {
            daemon
                .metric("idlemon_scans_total")
                .filter(|scans| *scans >= 1.0)
        });
        daemon
    }

    fn spawn(netns: Netns, args: &[&str], ready_path: &str, stdout: Stdio) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", netns.name));
        let mut command = netns.command(IDLEMON);
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
        let mut daemon = Self {
            netns,
            child: Some(child),
            log,
        };
        daemon.wait_until(ready_path);
        daemon
    }

    fn wait_until(&mut self, ready_path: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
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
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "idlemon: no 200 on {ready_path} after 20 s:\n{}",
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
        http_get(&self.netns, address, path)
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

    /// The value of one metric line, e.g. `idlemon_tracked_sockets` or
    /// `idlemon_at_risk_sockets{reason="no_keepalive"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics");
        metric(&body, series)
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
        body.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') && rest.contains(filter))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
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

/// One GET over HTTP/1.0 from inside `netns` to `address`: the status and
/// the body, or None when nothing answers there within 2 s (10 s to read).
pub fn http_get(netns: &Netns, address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: idlemon\r\n\r\n");
    netns.run(move || {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    })
}

/// Raises this thread's soft limit of open files to the hard one, for
/// tests that hold a thousand connections.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid resource and pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Polls `check` every 100 ms until it returns Some, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The tracked socket of a client connection, found by namespace and local port.
pub fn find_socket(sockets: &[Value], netns: u64, local: SocketAddr) -> Option<&Value> {
    sockets.iter().find(|socket| {
        socket["netns"].as_u64() == Some(netns)
            && socket["local"].as_str() == Some(&local.to_string())
    })
}

/// Names of loaded BPF programs (bpftool truncates to 15 characters).
pub fn loaded_programs() -> Vec<String> {
    let output = sh("bpftool", &["prog", "list", "--json"]);
    let programs: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    programs
        .iter()
        .filter_map(|program| program["name"].as_str().map(str::to_owned))
        .collect()
}

/// How many of idlemon's programs are loaded, by their distinctive names.
pub fn idlemon_programs() -> usize {
    loaded_programs()
        .iter()
        .filter(|name| {
            [
                "walk_tcp",
                "state_tp_btf",
                "send_tp_btf",
                "receive_tp_btf",
                "destroy_tp_btf",
            ]
            .contains(&name.as_str())
        })
        .count()
}

/// The count of idlemon programs once programs of exited daemons are freed
/// (the kernel frees them shortly after their last file descriptor closes).
pub fn settled_idlemon_programs() -> usize {
    let mut last = idlemon_programs();
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(100));
        let now = idlemon_programs();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Asserts that the idlemon program count comes back to `baseline`.
pub fn assert_programs_back_to(baseline: usize, what: &str) {
    let back = wait_for(Duration::from_secs(5), || {
        (idlemon_programs() <= baseline).then_some(())
    });
    assert!(
        back.is_some(),
        "{what}: {} idlemon programs loaded, expected {baseline}",
        idlemon_programs()
    );
}

/// A config file in the temp dir; removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!("idlemon-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
