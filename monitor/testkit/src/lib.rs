//! idlemon's test kit, used by the integration tests (`monitor/tests`), the
//! bench and `cargo xtask vm-test`, which runs those same tests inside VMs.
//! Each helper exists once here:
//!
//! - network namespaces and a NAT gateway that forgets idle flows
//!   ([`Netns`], [`NatPath`]);
//! - a running idlemon that is waited for by its readiness probe and whose
//!   events are waited for by `/events` long polls, in a namespace of its
//!   own (the tests) or the host's (the bench) ([`Daemon`]);
//! - cgroup v2 directories removed on drop ([`cgroup`]);
//! - child processes stopped when their owner drops them or dies, and
//!   their CPU time and memory ([`process`]);
//! - the Prometheus text parser ([`metrics`]);
//! - socket helpers on `socket2` (keepalive set before connect, resets by
//!   SO_LINGER 0, idle connections) ([`socket`]);
//! - the attach kinds a run expects ([`attach`], `IDLEMON_EXPECT_ATTACH`);
//! - a fake Kubernetes API ([`fake_api`]), counts of loaded programs and
//!   the programs a process holds ([`programs`]).
//!
//! Traffic stays on loopback and on TEST-NET addresses inside namespaces
//! these helpers create.

#![expect(
    clippy::unwrap_used,
    reason = "a test kit: a failed step fails the test loudly"
)]

pub mod attach;
pub mod cgroup;
mod daemon;
pub mod fake_api;
pub mod metrics;
mod netns;
pub mod process;
pub mod programs;
pub mod socket;
pub mod vm;

use std::{
    path::PathBuf,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

pub use daemon::{API_PORT, DAEMON_PORT, Daemon, idlemon, port_for};
pub use metrics::metric;
pub use netns::{
    CLIENT_IP, CLIENT_THREAD_COMM, NAT_CLIENT_SIDE_IP, NAT_SERVER_SIDE_IP, NatPath, Netns,
    SERVER_IP,
};
pub use programs::{
    assert_programs_back_to, idlemon_programs, loaded_programs, settled_idlemon_programs,
};
pub use socket::{
    Keepalive, connect, echo, http_get, idle_connections, reset_on_close, set_keepalive_probes,
};

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

/// Polls `check` every 100 ms until it returns Some, for at most `limit`.
/// For state that has no long poll (metrics, /sockets after a walk).
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
    process::memory(pid).unwrap().rss / 1024
}

/// The tracked socket of a client connection, found by namespace and local port.
pub fn find_socket(
    sockets: &[serde_json::Value],
    netns: u64,
    local: std::net::SocketAddr,
) -> Option<&serde_json::Value> {
    sockets.iter().find(|socket| {
        socket["netns"].as_u64() == Some(netns)
            && socket["local"].as_str() == Some(&local.to_string())
    })
}

/// A file in the temp dir (a config); removed on drop.
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

/// A test that cannot run here says why on stderr (libtest shows it with
/// the test's output) and returns: only for what the machine truly lacks
/// (a command, a kernel feature), never to hide a failure.
#[macro_export]
macro_rules! skip_unless {
    ($condition:expr, $($reason:tt)+) => {
        if !$condition {
            eprintln!("SKIPPED: {}", format_args!($($reason)+));
            return;
        }
    };
}

/// Whether `program` can be run (found on PATH).
pub fn has_command(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
