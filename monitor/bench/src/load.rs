//! Continuous loads for the overhead part. Each runs across every A and B
//! window of its series, so that between one window and the next only
//! idlemon changes: not the connection, not where the scheduler put its two
//! ends (on 2 CPUs, same-CPU or cross-CPU wake-ups alone move a ping-pong
//! rate by 20%, which restarting the traffic per run re-rolls every time).

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use idlemon_testkit::process::Guarded;

use super::{daemon::DROP_GRACE, netns::Netns, ping_pong};

/// A load whose progress is a counter: transactions, or bytes.
pub trait Load {
    /// The counter now; fails if the load has stopped.
    fn total(&mut self) -> anyhow::Result<u64>;
    /// The two threads that do the work (both ends), as (pid, tid).
    fn threads(&self) -> [(u32, u32); 2];
}

/// Whether the load's two threads last ran on the same CPU. Same-CPU and
/// cross-CPU wake-ups differ by a factor of 4 in a VM, so a window is only
/// comparable with one of the same placement.
pub fn share_cpu(load: &dyn Load) -> Option<bool> {
    let [a, b] = load.threads();
    Some(thread_stat(a, 39)? == thread_stat(b, 39)?)
}

/// CPU time (user + system) of the load's two threads.
pub fn cpu(load: &dyn Load) -> Duration {
    let ticks: u64 = load
        .threads()
        .into_iter()
        .filter_map(|thread| Some(thread_stat(thread, 14)? + thread_stat(thread, 15)?))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// Field `field` (1-based, as in proc(5)) of one thread's stat: 14 utime,
/// 15 stime, 39 the CPU it last ran on. The task path gives the thread's own
/// figures; /proc/TID/stat would sum its whole process.
fn thread_stat((pid, tid): (u32, u32), field: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Fields after the name start at field 3.
    rest.split_whitespace().nth(field - 3)?.parse().ok()
}

/// One connection exchanging 1-byte messages, as sockperf ping-pong does
/// (`ping_pong.rs`, shared with the vm part's guest driver).
pub struct PingPong(ping_pong::PingPong);

impl PingPong {
    pub fn start(netns: &Netns) -> anyhow::Result<Self> {
        let listener = netns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let client = netns
            .run(|| TcpStream::connect(addr))
            .context("ping-pong: cannot connect")?;
        let (server, _) = listener.accept().context("ping-pong: cannot accept")?;
        ping_pong::PingPong::start(client, server)
            .map(Self)
            .map_err(anyhow::Error::msg)
    }
}

impl Load for PingPong {
    fn total(&mut self) -> anyhow::Result<u64> {
        self.0.transactions().map_err(anyhow::Error::msg)
    }

    fn threads(&self) -> [(u32, u32); 2] {
        let me = std::process::id();
        [(me, self.0.tids[0]), (me, self.0.tids[1])]
    }
}

/// One iperf3 stream over the namespace's loopback. Its progress is read
/// from the namespace's own `lo` byte counter, so that a window of any
/// length can be cut out of one long stream.
pub struct Stream {
    // Dropped in this order: the client first, then the server.
    client: Guarded,
    server: Guarded,
}

impl Stream {
    /// Starts a stream that would end by itself after `at_most`.
    pub fn start(netns: &Netns, at_most: Duration) -> anyhow::Result<Self> {
        const PORT: u16 = 5201;
        let port = PORT.to_string();
        let mut server = Guarded::spawn(
            netns
                .command("iperf3")
                .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "iperf3 server",
            DROP_GRACE,
        )?;
        wait_listening(&mut server, PORT)?;
        let seconds = at_most.as_secs().max(1).to_string();
        let client = Guarded::spawn(
            netns
                .command("iperf3")
                .args(["-c", "127.0.0.1", "-p", &port, "-t", &seconds])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "iperf3 client",
            DROP_GRACE,
        )?;
        Ok(Self { client, server })
    }
}

impl Load for Stream {
    fn total(&mut self) -> anyhow::Result<u64> {
        if let Some(status) = self.client.try_wait()? {
            bail!("the iperf3 stream ended early ({status})");
        }
        let path = format!("/proc/{}/net/dev", self.client.pid());
        let table =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        table
            .lines()
            .find_map(|line| line.trim_start().strip_prefix("lo:"))
            .and_then(|counters| counters.split_whitespace().next())
            .and_then(|rx_bytes| rx_bytes.parse().ok())
            .ok_or_else(|| anyhow!("no lo byte counter in {path}"))
    }

    /// iperf3 3.12 (Debian 12) runs each end on one thread.
    fn threads(&self) -> [(u32, u32); 2] {
        let (client, server) = (self.client.pid(), self.server.pid());
        [(client, client), (server, server)]
    }
}

/// Waits until a process listens on `port`: /proc/PID/net/tcp shows the
/// sockets of that process's namespace. Connecting to check would count as
/// an iperf3 test and end the one-off server.
fn wait_listening(process: &mut Guarded, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let local = format!(":{port:04X}");
    loop {
        if let Some(status) = process.try_wait()? {
            bail!("iperf3 server exited ({status}) before listening");
        }
        let table =
            std::fs::read_to_string(format!("/proc/{}/net/tcp", process.pid())).unwrap_or_default();
        // "sl local_address rem_address st ...": state 0A is LISTEN.
        if table.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "0A"
        }) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("iperf3 server not listening on port {port} after 5 s");
        }
        thread::sleep(Duration::from_millis(10));
    }
}
