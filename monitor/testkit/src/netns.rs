//! Network namespaces of one test and the NAT path between three of them.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
};

use crate::{
    TempFile, sh,
    socket::{Keepalive, connect},
};

pub const CLIENT_IP: &str = "192.0.2.2";
pub const NAT_CLIENT_SIDE_IP: &str = "192.0.2.1";
pub const NAT_SERVER_SIDE_IP: &str = "198.51.100.1";
pub const SERVER_IP: &str = "198.51.100.2";

/// The connecting thread of `NatPath::connect` has its own task name; what
/// idlemon reports is the process's (`/proc/PID/comm`, as `ps` shows it).
pub const CLIENT_THREAD_COMM: &str = "idle-client";

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

    /// A veth pair from this namespace (`name`, `address` as CIDR) to
    /// `peer` (`peer_name`, `peer_address`), both ends up.
    pub fn veth(
        &self,
        name: &str,
        address: &str,
        peer: &Netns,
        peer_name: &str,
        peer_address: &str,
    ) {
        sh(
            "ip",
            &[
                "link", "add", "name", name, "netns", &self.name, "type", "veth", "peer", "name",
                peer_name, "netns", &peer.name,
            ],
        );
        for (netns, link, address) in [(self, name, address), (peer, peer_name, peer_address)] {
            netns.ip(&["addr", "add", address, "dev", link]);
            netns.ip(&["link", "set", link, "up"]);
        }
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
        client.veth(
            "eth0",
            &format!("{CLIENT_IP}/24"),
            &nat,
            "inside",
            &format!("{NAT_CLIENT_SIDE_IP}/24"),
        );
        nat.veth(
            "outside",
            &format!("{NAT_SERVER_SIDE_IP}/24"),
            &server,
            "eth0",
            &format!("{SERVER_IP}/24"),
        );
        client.ip(&["route", "add", "default", "via", NAT_CLIENT_SIDE_IP]);

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

    /// The paths of a daemon watching this NAT: the server's address has
    /// the NAT's idle timeout (and, with `server_side`, the NAT's address
    /// as the server sees it); every other destination (other tests'
    /// sockets, the host's own) has none, so that at-risk gauges and events
    /// are this test's alone.
    pub fn config(timeout_seconds: u32, server_side: bool) -> TempFile {
        let mut paths = format!(
            "[[path]]\nname = \"everything-else\"\ncidr = \"0.0.0.0/0\"\nidle_timeout = \"none\"\n\
             [[path]]\nname = \"everything-else-v6\"\ncidr = \"::/0\"\nidle_timeout = \"none\"\n\
             [[path]]\nname = \"test-nat\"\ncidr = \"{SERVER_IP}/32\"\nidle_timeout = {timeout_seconds}\n"
        );
        if server_side {
            paths.push_str(&format!(
                "[[path]]\nname = \"test-nat-server-side\"\ncidr = \"{NAT_SERVER_SIDE_IP}/32\"\nidle_timeout = {timeout_seconds}\n"
            ));
        }
        TempFile::new("nat.toml", &paths)
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
