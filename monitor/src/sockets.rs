//! The socket table: what the walk found, in the problem's terms, and which
//! sockets a middlebox's idle timeout will kill. Pure logic, unit-tested.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use monitor_common::{AF_INET, SocketRecord};
use serde::Serialize;

use crate::{
    attribution::Attribution,
    config::{IdleTimeout, OnIdle, PathBehaviour, PathConfig, PathKind},
    fix::{self, Fix},
};

/// The maps a walk updates once per socket: foldhash, randomly seeded per
/// process, hashes these small keys several times faster than the default
/// SipHash (about 4% of a 200,000-socket walk's CPU went to hashing).
pub(crate) type WalkMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Why a socket is at risk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    /// SO_KEEPALIVE is off: nothing will cross the path until the application speaks.
    NoKeepalive,
    /// Keepalive is on, but its first probe comes no earlier than the path's
    /// timeout (the default 7200 s is the usual case).
    KeepaliveTooSlow,
}

impl Risk {
    pub const ALL: [Risk; 2] = [Risk::NoKeepalive, Risk::KeepaliveTooSlow];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoKeepalive => "no_keepalive",
            Self::KeepaliveTooSlow => "keepalive_too_slow",
        }
    }

    /// The risk in words, for `TrackedSocket::why`.
    pub fn words(self) -> &'static str {
        match self {
            Self::NoKeepalive => "keepalive off",
            Self::KeepaliveTooSlow => "a keepalive slower than the path's timeout",
        }
    }
}

/// Where an effective keepalive setting comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT on the socket.
    Socket,
    /// net.ipv4.tcp_keepalive_* of the socket's network namespace.
    Namespace,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Keepalive {
    /// SO_KEEPALIVE.
    pub enabled: bool,
    /// Effective idle time before the first probe, interval and probe count.
    pub idle_seconds: f64,
    pub idle_from: Source,
    pub interval_seconds: f64,
    pub interval_from: Source,
    pub count: u8,
    pub count_from: Source,
    /// Probes the peer answered since idlemon started (receive hook).
    pub probes_answered: u32,
    /// Probes sent and not answered yet (kernel `icsk_probes_out`).
    pub probes_unanswered: u8,
    /// Keepalive timer runs; null where the kernel cannot show them
    /// (no fentry or kprobe on `tcp_keepalive_timer`).
    pub timer_runs: Option<u32>,
}

/// One tracked ESTABLISHED socket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackedSocket {
    #[serde(skip)]
    pub sock: u64,
    pub family: &'static str,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Inode of the socket's network namespace (`ls -l /proc/PID/ns/net`).
    pub netns: u32,
    pub uid: u32,
    /// Seconds since the kernel last sent data, received data, and received
    /// an ACK (ss -tnoi: lastsnd, lastrcv, lastack).
    pub last_send_seconds: f64,
    pub last_receive_seconds: f64,
    pub last_ack_seconds: f64,
    /// Seconds since the later of the last send and the last receive.
    pub idle_seconds: f64,
    /// The path's idle timeout; null when the config says the path has no middlebox.
    pub path_idle_timeout_seconds: Option<u32>,
    /// The config rule that set the timeout; null for the default.
    pub path_rule: Option<String>,
    /// What sits on the path (`kind` of the rule: `nat_gateway`, `nlb`,
    /// `gwlb`, `vpc_endpoint`, `firewall`, `none`); null where no kind is named.
    pub path_kind: Option<&'static str>,
    /// What the path does to the next packet of a flow it forgot: `reset`
    /// or `drop`; null on a path without an idle timeout.
    pub path_on_idle: Option<&'static str>,
    /// Seconds until the middlebox forgets the flow if nothing crosses it,
    /// counting ACKs of keepalive probes as traffic; negative once past.
    pub time_left_seconds: Option<f64>,
    pub keepalive: Keepalive,
    pub at_risk: bool,
    pub risk: Option<Risk>,
    /// At-risk sockets only: the one change that keeps the path alive
    /// (`fix::Fix`); null otherwise.
    pub fix: Option<Fix>,
    /// At-risk sockets only: what the path will do to it, in words ("the
    /// GWLB forgets a flow idle 350 s and drops its next packet: ...").
    pub why: Option<String>,
    /// Retransmission timeouts in a row without an ACK (kernel
    /// `icsk_retransmits`): 0 while the peer answers.
    pub retransmits: u8,
    /// Retransmitting, with no ACK since a send after idle: the path forgot
    /// the flow without a RST, and unless it recovers the connection dies
    /// of ETIMEDOUT (`retransmit_timeout`) when `tcp_retries2` or
    /// TCP_USER_TIMEOUT gives up. Known in `/sockets`; a periodic walk
    /// looks no further than the counters.
    pub retransmitting_since_send_after_idle: bool,
    /// The process that connected or last sent, where the hooks saw it.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup_id: Option<u64>,
    /// Its cgroup, container and pod.
    #[serde(flatten)]
    pub attribution: Arc<Attribution>,
}

/// Turns walk records into tracked sockets.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// Kernel ticks per second (CONFIG_HZ).
    pub hz: u32,
    pub idle_threshold: Duration,
    pub default_timeout: IdleTimeout,
    pub paths: PathConfig,
    /// Whether the keepalive hook attached, so timer counts mean something.
    pub keepalive_timer_seen: bool,
}

impl Classifier {
    /// Seconds in a jiffies age.
    pub fn seconds(&self, jiffies: u32) -> f64 {
        // A stamp taken on another CPU just after our clock read wraps to a
        // huge age; it is really zero.
        let jiffies = if jiffies > u32::MAX / 2 { 0 } else { jiffies };
        let millis = u64::from(jiffies) * 1000 / u64::from(self.hz.max(1));
        millis as f64 / 1000.0
    }

    /// Family name and both ends of a record.
    pub fn endpoints(&self, record: &SocketRecord) -> (&'static str, SocketAddr, SocketAddr) {
        let is_ipv6 = record.family != AF_INET;
        (
            if is_ipv6 { "ipv6" } else { "ipv4" },
            SocketAddr::new(address(is_ipv6, &record.local_addr), record.local_port),
            SocketAddr::new(address(is_ipv6, &record.remote_addr), record.remote_port),
        )
    }

    /// The compact form of a walk record, with its verdict.
    pub fn compact(&self, record: &SocketRecord, owner: u32) -> Socket {
        let is_ipv6 = record.family != AF_INET;
        let remote_ip = address(is_ipv6, &record.remote_addr);
        let path_rule = match self.paths.find(remote_ip, record.remote_port) {
            Some(index) => PathRule::Config(index as u32),
            // Loopback never crosses a middlebox (sidecar proxies live there);
            // a config rule for 127.0.0.0/8 or ::1 overrides this.
            None if is_loopback(remote_ip) => PathRule::Loopback,
            None => PathRule::Default,
        };
        let timeout = match path_rule {
            PathRule::Config(index) => self.paths.timeout(index as usize),
            PathRule::Loopback => IdleTimeout::Never,
            PathRule::Default => self.default_timeout,
        };
        let path_timeout = match timeout {
            IdleTimeout::After(seconds) => Some(seconds),
            IdleTimeout::Never => None,
        };
        let pick = |own: u32, namespace: u32| {
            if own != 0 {
                (own, true)
            } else {
                (namespace, false)
            }
        };
        let (keepalive_idle, idle_own) = pick(record.keepalive_time, record.ns_keepalive_time);
        let (keepalive_interval, interval_own) =
            pick(record.keepalive_intvl, record.ns_keepalive_intvl);
        let (keepalive_count, count_own) = if record.keepalive_probes != 0 {
            (record.keepalive_probes, true)
        } else {
            (record.ns_keepalive_probes, false)
        };
        let mut socket = Socket {
            sock: record.sock,
            local_addr: record.local_addr,
            remote_addr: record.remote_addr,
            local_port: record.local_port,
            remote_port: record.remote_port,
            netns: record.netns,
            uid: record.uid,
            last_send: age(record.last_send_age),
            last_receive: age(record.last_recv_age),
            last_ack: age(record.last_ack_age),
            keepalive_idle,
            keepalive_interval,
            probes_answered: record.info.keepalive_probes_answered,
            timer_runs: record.info.keepalive_timer_fires,
            path_timeout,
            path_rule,
            owner,
            is_ipv6,
            keepalive_enabled: record.keepalive_enabled != 0,
            keepalive_count,
            keepalive_own: u8::from(idle_own)
                | (u8::from(interval_own) << 1)
                | (u8::from(count_own) << 2),
            probes_unanswered: record.probes_out,
            retransmits: record.retransmits,
            retransmitting_since_reuse: record.retransmitting_since_reuse != 0,
            opened_here: record.opened_here != 0,
            risk: None,
        };
        socket.risk = match self.coverage(&socket) {
            Some(Coverage::Off) => Some(Risk::NoKeepalive),
            Some(Coverage::TooSlow) => Some(Risk::KeepaliveTooSlow),
            Some(Coverage::Effective) | None => None,
        };
        socket
    }

    /// Keepalive coverage of a socket idle at least the threshold on a path
    /// with a timeout; None for the others. Off and too slow are the risks.
    fn coverage(&self, socket: &Socket) -> Option<Coverage> {
        let timeout = socket.path_timeout?;
        if self.seconds(socket.idle()) < self.idle_threshold.as_secs_f64() {
            return None;
        }
        Some(if !socket.keepalive_enabled {
            Coverage::Off
        } else if self.seconds(socket.keepalive_idle) >= f64::from(timeout.get()) {
            Coverage::TooSlow
        } else {
            Coverage::Effective
        })
    }

    /// The API's form of a compact socket.
    pub fn view(&self, socket: &Socket, owner: Option<&Owner>) -> TrackedSocket {
        let last_send_seconds = self.seconds(socket.last_send);
        let last_receive_seconds = self.seconds(socket.last_receive);
        let last_ack_seconds = self.seconds(socket.last_ack);
        let idle_seconds = last_send_seconds.min(last_receive_seconds);
        // The middlebox sees every packet, keepalive ACKs included.
        let path_idle = idle_seconds.min(last_ack_seconds);
        let path_timeout = socket.path_timeout.map(NonZeroU32::get);
        let source = |bit: u8| {
            if socket.keepalive_own & bit != 0 {
                Source::Socket
            } else {
                Source::Namespace
            }
        };
        let keepalive = Keepalive {
            enabled: socket.keepalive_enabled,
            idle_seconds: self.seconds(socket.keepalive_idle),
            idle_from: source(1),
            interval_seconds: self.seconds(socket.keepalive_interval),
            interval_from: source(2),
            count: socket.keepalive_count,
            count_from: source(4),
            probes_answered: socket.probes_answered,
            probes_unanswered: socket.probes_unanswered,
            timer_runs: self.keepalive_timer_seen.then_some(socket.timer_runs),
        };
        let attribution = owner.map_or_else(Arc::default, |owner| Arc::clone(&owner.attribution));
        let behaviour = self.path_behaviour(socket.path_rule);
        let fix = socket
            .risk
            .zip(path_timeout)
            .map(|(risk, timeout)| fix::for_socket(risk, timeout, &keepalive, &attribution));
        TrackedSocket {
            sock: socket.sock,
            family: if socket.is_ipv6 { "ipv6" } else { "ipv4" },
            local: SocketAddr::new(socket.local_ip(), socket.local_port),
            remote: SocketAddr::new(socket.remote_ip(), socket.remote_port),
            netns: socket.netns,
            uid: socket.uid,
            last_send_seconds,
            last_receive_seconds,
            last_ack_seconds,
            idle_seconds,
            path_idle_timeout_seconds: path_timeout,
            path_rule: match socket.path_rule {
                PathRule::Config(index) => Some(self.paths.label(index as usize).to_owned()),
                PathRule::Loopback => Some("loopback".to_owned()),
                PathRule::Default => None,
            },
            path_kind: self.path_kind(socket.path_rule).map(PathKind::as_str),
            path_on_idle: behaviour.map(|path| path.on_idle.as_str()),
            why: socket.risk.and(behaviour).map(|path| {
                format!(
                    "idle {idle_seconds:.0} s with {}; {}",
                    socket.risk.map_or("", Risk::words),
                    path.forgets()
                )
            }),
            time_left_seconds: path_timeout.map(|timeout| f64::from(timeout) - path_idle),
            keepalive,
            at_risk: socket.risk.is_some(),
            risk: socket.risk,
            fix,
            retransmits: socket.retransmits,
            retransmitting_since_send_after_idle: socket.retransmitting_since_reuse,
            pid: owner.map(|owner| owner.pid),
            comm: owner.and_then(|owner| owner.comm.clone()),
            cgroup_id: owner.and_then(|owner| owner.cgroup_id),
            attribution,
        }
    }

    /// What sits on the path a rule chose.
    fn path_kind(&self, rule: PathRule) -> Option<PathKind> {
        match rule {
            PathRule::Config(index) => self.paths.kind(index as usize),
            PathRule::Loopback => Some(PathKind::None),
            PathRule::Default => None,
        }
    }

    /// The behaviour of the path a rule chose; None without an idle timeout.
    pub fn path_behaviour(&self, rule: PathRule) -> Option<PathBehaviour> {
        let (timeout, on_idle) = match rule {
            PathRule::Config(index) => (
                self.paths.timeout(index as usize),
                self.paths.on_idle(index as usize)?,
            ),
            PathRule::Loopback => return None,
            // `--idle-timeout`, the NAT gateway's by default: a reset.
            PathRule::Default => (self.default_timeout, OnIdle::Reset),
        };
        match timeout {
            IdleTimeout::After(seconds) => Some(PathBehaviour {
                kind: self.path_kind(rule),
                on_idle,
                timeout_seconds: seconds.get(),
            }),
            IdleTimeout::Never => None,
        }
    }

    /// The behaviour of a record's path; None without an idle timeout.
    pub fn path_behaviour_of(&self, record: &SocketRecord) -> Option<PathBehaviour> {
        self.path_behaviour(self.compact(record, NO_OWNER).path_rule)
    }

    /// A record classified on its own (events), attributed to the owner the
    /// hooks saw but not further.
    pub fn classify(&self, record: &SocketRecord) -> TrackedSocket {
        let owner = Owner::of(record, |_, _| Arc::default());
        self.view(&self.compact(record, NO_OWNER), owner.as_ref())
    }
}

/// A jiffies age, with a stamp taken on another CPU just after the walk's
/// clock read (which wraps to a huge age) read as zero.
fn age(jiffies: u32) -> u32 {
    if jiffies > u32::MAX / 2 { 0 } else { jiffies }
}

/// Which rule set a socket's path timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRule {
    Default,
    Loopback,
    /// The index of a `[[path]]` rule in the config.
    Config(u32),
}

/// `Socket::owner` when the hooks never saw the socket's process.
pub const NO_OWNER: u32 = u32::MAX;

/// One tracked ESTABLISHED socket as a walk keeps it: about 100 bytes and
/// no heap, so that a host's 200,000 sockets cost 20 MB between walks.
/// `Classifier::view` renders the API's `TrackedSocket`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Socket {
    pub sock: u64,
    local_addr: [u8; 16],
    remote_addr: [u8; 16],
    local_port: u16,
    remote_port: u16,
    netns: u32,
    uid: u32,
    /// Ages in jiffies at the walk.
    last_send: u32,
    last_receive: u32,
    last_ack: u32,
    /// Effective keepalive idle time and interval, in jiffies.
    keepalive_idle: u32,
    keepalive_interval: u32,
    probes_answered: u32,
    timer_runs: u32,
    path_timeout: Option<NonZeroU32>,
    pub path_rule: PathRule,
    /// Index into `Snapshot::owners`, or `NO_OWNER`.
    pub owner: u32,
    is_ipv6: bool,
    keepalive_enabled: bool,
    keepalive_count: u8,
    /// Bits 0, 1, 2: idle time, interval and count set on the socket (else
    /// by the namespace sysctls).
    keepalive_own: u8,
    probes_unanswered: u8,
    retransmits: u8,
    retransmitting_since_reuse: bool,
    /// This node opened it (`SocketRecord::opened_here`).
    pub opened_here: bool,
    pub risk: Option<Risk>,
}

impl Socket {
    /// Jiffies since the later of the last send and the last receive.
    pub fn idle(&self) -> u32 {
        self.last_send.min(self.last_receive)
    }

    pub fn local_ip(&self) -> IpAddr {
        address(self.is_ipv6, &self.local_addr)
    }

    pub fn remote_ip(&self) -> IpAddr {
        address(self.is_ipv6, &self.remote_addr)
    }

    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// Inode of the socket's network namespace.
    pub fn netns(&self) -> u32 {
        self.netns
    }

    /// The destination as a NAT gateway counts it: address and port.
    pub fn remote(&self) -> SocketAddr {
        // A dual-stack socket's IPv4-mapped peer is the IPv4 destination.
        SocketAddr::new(self.remote_ip().to_canonical(), self.remote_port)
    }
}

/// A process that owns sockets of a walk, shared by all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Option<String>,
    pub cgroup_id: Option<u64>,
    pub attribution: Arc<Attribution>,
}

impl Owner {
    /// The process the hooks recorded for a walk record, if any.
    pub fn of(
        record: &SocketRecord,
        attribute: impl FnOnce(Option<u32>, Option<u64>) -> Arc<Attribution>,
    ) -> Option<Self> {
        let info = &record.info;
        if record.info_known == monitor_common::INFO_UNKNOWN || info.owner_tgid == 0 {
            return None;
        }
        let cgroup_id = Some(info.owner_cgroup).filter(|id| *id != 0);
        let attribution = attribute(Some(info.owner_tgid), cgroup_id);
        Some(Self {
            pid: info.owner_tgid,
            comm: attribution.comm.clone(),
            cgroup_id,
            attribution,
        })
    }
}

/// One walk's result: every socket, compact, and their owners.
#[derive(Debug)]
pub struct Snapshot {
    /// When the walk ran; None before the first one.
    pub taken: Option<Instant>,
    pub classifier: Arc<Classifier>,
    pub sockets: Vec<Socket>,
    pub owners: Vec<Owner>,
    /// Whether the walk read everything about every socket. Periodic walks
    /// read what the metrics need: owners only of sockets idle at least the
    /// threshold (carried over from the previous walk where unchanged),
    /// per-socket keepalive settings only where SO_KEEPALIVE is on.
    pub complete: bool,
    /// Each network namespace the walk found sockets in (by inode): its
    /// `net.ipv4.tcp_keepalive_time`, in jiffies, and the owner of one of
    /// its sockets, which names its pod (NO_OWNER when none was attributed).
    pub namespaces: WalkMap<u32, (u32, u32)>,
}

impl Snapshot {
    pub fn empty(classifier: Arc<Classifier>) -> Self {
        Self {
            taken: None,
            classifier,
            sockets: Vec::new(),
            owners: Vec::new(),
            complete: false,
            namespaces: WalkMap::default(),
        }
    }

    pub fn owner(&self, socket: &Socket) -> Option<&Owner> {
        self.owners.get(socket.owner as usize)
    }

    pub fn view(&self, socket: &Socket) -> TrackedSocket {
        self.classifier.view(socket, self.owner(socket))
    }

    /// Indices of the sockets a filter keeps, longest idle first.
    pub fn select(&self, filter: &Filter) -> Vec<u32> {
        let mut selected: Vec<u32> = (0..self.sockets.len() as u32)
            .filter(|&index| filter.keeps(&self.classifier, &self.sockets[index as usize]))
            .collect();
        selected.sort_by_key(|&index| std::cmp::Reverse(self.sockets[index as usize].idle()));
        selected
    }
}

/// Builds a snapshot from walk records, attributing each owner once.
pub struct SnapshotBuilder {
    snapshot: Snapshot,
    owner_index: WalkMap<(u32, u64), u32>,
    /// The namespace of the last record, while it has an owner: records
    /// come namespace by namespace, so the map is touched once per
    /// namespace rather than once per socket.
    namespace_done: Option<u32>,
}

impl SnapshotBuilder {
    /// `capacity`: the sockets expected (the last walk's count), so that the
    /// table is allocated once.
    pub fn new(classifier: Arc<Classifier>, capacity: usize, complete: bool) -> Self {
        let mut snapshot = Snapshot::empty(classifier);
        snapshot.sockets.reserve_exact(capacity);
        snapshot.complete = complete;
        Self {
            snapshot,
            owner_index: WalkMap::default(),
            namespace_done: None,
        }
    }

    pub fn add(
        &mut self,
        record: &SocketRecord,
        attribute: impl FnOnce(Option<u32>, Option<u64>) -> Arc<Attribution>,
    ) {
        let info = &record.info;
        let key = (info.owner_tgid, info.owner_cgroup);
        let owner = match self.owner_index.get(&key) {
            Some(&index) => index,
            None => match Owner::of(record, attribute) {
                Some(owner) => {
                    let index = self.snapshot.owners.len() as u32;
                    self.snapshot.owners.push(owner);
                    self.owner_index.insert(key, index);
                    index
                }
                None => NO_OWNER,
            },
        };
        if self.namespace_done != Some(record.netns) {
            let entry = self
                .snapshot
                .namespaces
                .entry(record.netns)
                .or_insert((record.ns_keepalive_time, NO_OWNER));
            if entry.1 == NO_OWNER {
                entry.1 = owner;
            }
            self.namespace_done = (entry.1 != NO_OWNER).then_some(record.netns);
        }
        let socket = self.snapshot.classifier.compact(record, owner);
        self.snapshot.sockets.push(socket);
    }

    /// Drops the sockets of one network namespace (by inode), to take them
    /// from another walk instead. Their owners stay listed, unreferenced.
    pub fn drop_namespace(&mut self, netns: u32) {
        self.snapshot.sockets.retain(|socket| socket.netns != netns);
    }

    pub fn finish(mut self, taken: Instant) -> Snapshot {
        self.snapshot.taken = Some(taken);
        self.snapshot
    }
}

/// The owners of the previous walk's sockets, for the records whose owner
/// the walk program left to user space (`INFO_CARRIED_OVER`). Records come in
/// the order of the previous walk, less closed sockets and plus new ones
/// (which are never carried over), so a cursor finds nearly every socket
/// within a few steps; an index of the previous walk is built only when it
/// does not (a namespace gone, sockets reordered).
pub struct PreviousOwners {
    snapshot: Arc<Snapshot>,
    cursor: usize,
    index: Option<WalkMap<u64, usize>>,
}

/// How far ahead of the cursor a socket is looked for before the index.
const CURSOR_REACH: usize = 64;

impl PreviousOwners {
    pub fn new(snapshot: Arc<Snapshot>) -> Self {
        Self {
            snapshot,
            cursor: 0,
            index: None,
        }
    }

    /// The owner (thread group id, cgroup id; 0 for unknown) that the
    /// previous walk gave `sock`, or None when that walk did not list it.
    pub fn owner_of(&mut self, sock: u64) -> Option<(u32, u64)> {
        let sockets = &self.snapshot.sockets;
        let ahead = sockets
            .get(self.cursor..)
            .unwrap_or_default()
            .iter()
            .take(CURSOR_REACH)
            .position(|socket| socket.sock == sock);
        let at = match ahead {
            Some(offset) => self.cursor + offset,
            None => *self
                .index
                .get_or_insert_with(|| {
                    sockets
                        .iter()
                        .enumerate()
                        .map(|(at, socket)| (socket.sock, at))
                        .collect()
                })
                .get(&sock)?,
        };
        self.cursor = at + 1;
        Some(match self.snapshot.owner(&sockets[at]) {
            Some(owner) => (owner.pid, owner.cgroup_id.unwrap_or(0)),
            None => (0, 0),
        })
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn address(is_ipv6: bool, bytes: &[u8; 16]) -> IpAddr {
    if is_ipv6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// A task name from its NUL-padded kernel buffer.
pub fn comm(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Keepalive status of a long-idle socket, for the coverage metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    Effective,
    TooSlow,
    Off,
}

impl Coverage {
    pub const ALL: [Coverage; 3] = [Coverage::Effective, Coverage::TooSlow, Coverage::Off];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Effective => "effective",
            Self::TooSlow => "too_slow",
            Self::Off => "off",
        }
    }
}

/// Counts for the gauges, from one walk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub tracked: usize,
    /// At-risk sockets by reason and attribution labels (namespace, pod, workload).
    pub at_risk: HashMap<(Risk, [String; 3]), usize>,
    /// At-risk sockets by remote address.
    pub at_risk_destinations: WalkMap<IpAddr, usize>,
    /// ESTABLISHED connections this node opened, by destination (address
    /// and port): what a NAT gateway's 55,000 per destination counts.
    pub opened_destinations: WalkMap<SocketAddr, usize>,
    /// Sockets idle at least the threshold on a path with a timeout, by
    /// keepalive coverage (indexed like `Coverage::ALL`).
    pub long_idle: [usize; Coverage::ALL.len()],
    /// Each network namespace with ESTABLISHED sockets: its inode, its
    /// pod's namespace and name (empty when none of its sockets was
    /// attributed to a pod: the host's, or not yet), and its effective
    /// `net.ipv4.tcp_keepalive_time` in seconds; pods first.
    pub namespace_keepalive: Vec<NamespaceKeepalive>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamespaceKeepalive {
    /// Empty outside pods; first, so that pods sort ahead.
    pub pod: String,
    pub namespace: String,
    pub netns: u32,
    pub keepalive_time_seconds: u64,
}

impl Summary {
    pub fn of(snapshot: &Snapshot) -> Self {
        let mut summary = Self {
            tracked: snapshot.sockets.len(),
            ..Self::default()
        };
        // Counted per owner first: the labels are built once per owner, not
        // once per socket.
        let mut per_owner: WalkMap<(Risk, u32), usize> = WalkMap::default();
        for socket in &snapshot.sockets {
            if let Some(coverage) = snapshot.classifier.coverage(socket) {
                summary.long_idle[coverage as usize] += 1;
            }
            if socket.opened_here {
                *summary
                    .opened_destinations
                    .entry(socket.remote())
                    .or_default() += 1;
            }
            if let Some(risk) = socket.risk {
                *per_owner.entry((risk, socket.owner)).or_default() += 1;
                *summary
                    .at_risk_destinations
                    .entry(socket.remote_ip())
                    .or_default() += 1;
            }
        }
        for ((risk, owner), count) in per_owner {
            let labels = match snapshot.owners.get(owner as usize) {
                Some(owner) => owner.attribution.labels(owner.comm.as_deref()),
                None => Attribution::default().labels(None),
            };
            *summary.at_risk.entry((risk, labels)).or_default() += count;
        }
        let classifier = &snapshot.classifier;
        summary.namespace_keepalive = snapshot
            .namespaces
            .iter()
            .map(|(&netns, &(keepalive_time, owner))| {
                let owner = snapshot.owners.get(owner as usize);
                let attribution = owner.map(|owner| &*owner.attribution);
                let text = |value: Option<&String>| value.cloned().unwrap_or_default();
                NamespaceKeepalive {
                    pod: text(attribution.and_then(|a| a.pod.as_ref().or(a.pod_uid.as_ref()))),
                    namespace: text(attribution.and_then(|a| a.namespace.as_ref())),
                    netns,
                    keepalive_time_seconds: classifier.seconds(keepalive_time).round() as u64,
                }
            })
            .collect();
        summary
            .namespace_keepalive
            .sort_by(|a, b| (a.pod.is_empty(), a).cmp(&(b.pod.is_empty(), b)));
        summary
    }

    /// At-risk sockets of one reason, over all labels.
    pub fn at_risk_total(&self, risk: Risk) -> usize {
        self.at_risk
            .iter()
            .filter(|((reason, _), _)| *reason == risk)
            .map(|(_, count)| count)
            .sum()
    }
}

/// Query filters of `GET /sockets`.
#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub at_risk: Option<bool>,
    pub min_idle: Option<f64>,
}

impl Filter {
    pub fn keeps(&self, classifier: &Classifier, socket: &Socket) -> bool {
        self.at_risk
            .is_none_or(|at_risk| socket.risk.is_some() == at_risk)
            && self
                .min_idle
                .is_none_or(|min_idle| classifier.seconds(socket.idle()) >= min_idle)
    }
}

/// The ESTABLISHED connections that existed before idlemon loaded and that
/// this node opened, as far as can be told: the kernel marks only the active
/// opens it sees complete, so at the first scan a connection it did not mark
/// is taken for an active open when its local port is none of its network
/// namespace's listening ports (an accepted connection has its listener's
/// port, and the kernel never picks a listener's port for a connect). An
/// accepted connection whose listener has closed since is counted wrongly;
/// an application that binds a listener's port before connecting (with
/// SO_REUSEPORT) is missed. Kept by socket and 4-tuple until they close, so
/// that a socket allocated at a closed one's address is not taken for it.
#[derive(Debug, Default)]
pub struct OpenedBeforeStart(HashSet<(u64, u16, SocketAddr)>);

impl OpenedBeforeStart {
    /// Classifies the unmarked sockets of the first scan; `listening` holds
    /// each namespace's (by inode) listening ports.
    pub fn classify(snapshot: &Snapshot, listening: &HashMap<u32, HashSet<u16>>) -> Self {
        Self(
            snapshot
                .sockets
                .iter()
                .filter(|socket| {
                    !socket.opened_here
                        && listening
                            .get(&socket.netns())
                            .is_some_and(|ports| !ports.contains(&socket.local_port()))
                })
                .map(|socket| (socket.sock, socket.local_port(), socket.remote()))
                .collect(),
        )
    }

    /// Adds those still open to `summary`'s count, and forgets the closed.
    pub fn count(&mut self, snapshot: &Snapshot, summary: &mut Summary) {
        let mut open = HashSet::with_capacity(self.0.len());
        for socket in &snapshot.sockets {
            let key = (socket.sock, socket.local_port(), socket.remote());
            if !socket.opened_here && self.0.contains(&key) {
                *summary.opened_destinations.entry(key.2).or_default() += 1;
                open.insert(key);
            }
        }
        self.0 = open;
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use monitor_common::AF_INET6;

    use super::*;

    const HZ: u32 = 250;

    fn classifier(paths: &str) -> Classifier {
        Classifier {
            hz: HZ,
            idle_threshold: Duration::from_secs(300),
            default_timeout: IdleTimeout::After(NonZeroU32::new(350).expect("non-zero")),
            paths: PathConfig::parse(paths, "test.toml").expect("valid config"),
            keepalive_timer_seen: false,
        }
    }

    /// An IPv4 socket idle `idle` seconds, with the usual 7200 s namespace keepalive.
    fn record(idle: u32, keepalive: bool) -> SocketRecord {
        let mut record = SocketRecord {
            family: AF_INET,
            local_port: 40000,
            remote_port: 443,
            keepalive_enabled: u8::from(keepalive),
            last_send_age: idle * HZ,
            last_recv_age: idle * HZ + 5 * HZ,
            last_ack_age: idle * HZ,
            ns_keepalive_time: 7200 * HZ,
            ns_keepalive_intvl: 75 * HZ,
            ns_keepalive_probes: 9,
            ..SocketRecord::default()
        };
        record.local_addr[..4].copy_from_slice(&[10, 0, 0, 5]);
        record.remote_addr[..4].copy_from_slice(&[52, 1, 2, 3]);
        record
    }

    /// A walk of sockets 1..=n (their addresses), owned by process 100 + address
    /// in cgroup 7, except the multiples of 5, which have no owner.
    fn walked(socks: &[u64]) -> Arc<Snapshot> {
        let mut builder = SnapshotBuilder::new(Arc::new(classifier("")), socks.len(), false);
        for &sock in socks {
            let mut record = record(400, false);
            record.sock = sock;
            if sock % 5 != 0 {
                record.info_known = monitor_common::INFO_KNOWN;
                record.info.owner_tgid = 100 + sock as u32;
                record.info.owner_cgroup = 7;
            }
            builder.add(&record, |_, _| Arc::default());
        }
        Arc::new(builder.finish(Instant::now()))
    }

    #[test]
    fn previous_owners_are_found_in_walk_order_and_out_of_it() {
        let socks: Vec<u64> = (1..=300).collect();
        let mut previous = PreviousOwners::new(walked(&socks));
        // The same order, some closed since: the cursor finds each.
        for sock in (1..=150).filter(|sock| sock % 7 != 0) {
            let expected = if sock % 5 == 0 {
                (0, 0)
            } else {
                (100 + sock as u32, 7)
            };
            assert_eq!(previous.owner_of(sock), Some(expected), "socket {sock}");
        }
        assert!(previous.index.is_none(), "walk order needs no index");
        // Far out of order (beyond the cursor's reach, and behind it).
        assert_eq!(previous.owner_of(291), Some((391, 7)));
        assert_eq!(previous.owner_of(3), Some((103, 7)));
        // ...after which the cursor follows on from there.
        assert_eq!(previous.owner_of(4), Some((104, 7)));
        // Never walked before: for the caller to look up.
        assert_eq!(previous.owner_of(9999), None);
        assert_eq!(PreviousOwners::new(walked(&[])).owner_of(1), None);
    }

    #[test]
    fn idle_without_keepalive_is_at_risk() {
        let socket = classifier("").classify(&record(301, false));
        assert_eq!(socket.risk, Some(Risk::NoKeepalive));
        assert!(socket.at_risk);
        assert_eq!(socket.idle_seconds, 301.0);
        assert_eq!(socket.last_receive_seconds, 306.0);
        assert_eq!(socket.time_left_seconds, Some(49.0));
        assert_eq!(socket.remote.to_string(), "52.1.2.3:443");
    }

    #[test]
    fn below_the_threshold_nothing_is_flagged() {
        let socket = classifier("").classify(&record(299, false));
        assert_eq!(socket.risk, None);
    }

    #[test]
    fn default_keepalive_is_too_slow_for_a_nat_gateway() {
        let socket = classifier("").classify(&record(400, true));
        assert_eq!(socket.risk, Some(Risk::KeepaliveTooSlow));
        assert_eq!(socket.keepalive.idle_seconds, 7200.0);
        assert_eq!(socket.keepalive.idle_from, Source::Namespace);
    }

    #[test]
    fn socket_keepidle_below_the_timeout_protects() {
        let mut record = record(400, true);
        record.keepalive_time = 60 * HZ;
        let socket = classifier("").classify(&record);
        assert_eq!(socket.risk, None);
        assert_eq!(socket.keepalive.idle_seconds, 60.0);
        assert_eq!(socket.keepalive.idle_from, Source::Socket);
        assert_eq!(socket.keepalive.interval_from, Source::Namespace);
    }

    #[test]
    fn namespace_sysctl_below_the_timeout_protects() {
        let mut record = record(400, true);
        record.ns_keepalive_time = 120 * HZ;
        assert_eq!(classifier("").classify(&record).risk, None);
    }

    #[test]
    fn keepalive_equal_to_the_timeout_is_too_slow() {
        let mut record = record(400, true);
        record.keepalive_time = 350 * HZ;
        assert_eq!(
            classifier("").classify(&record).risk,
            Some(Risk::KeepaliveTooSlow)
        );
    }

    #[test]
    fn at_risk_sockets_say_what_their_path_kind_will_do() {
        let gwlb = classifier("[[path]]\nname = \"fw\"\ncidr = \"52.1.0.0/16\"\nkind = \"gwlb\"\n");
        let socket = gwlb.classify(&record(400, false));
        assert_eq!(socket.risk, Some(Risk::NoKeepalive));
        assert_eq!(
            (socket.path_kind, socket.path_on_idle),
            (Some("gwlb"), Some("drop"))
        );
        assert_eq!(socket.path_idle_timeout_seconds, Some(350));
        assert_eq!(
            socket.why.as_deref(),
            Some(
                "idle 400 s with keepalive off; the GWLB forgets a flow idle 350 s and drops its next packet: the request hangs while the kernel retransmits, until tcp_retries2 or TCP_USER_TIMEOUT gives up with ETIMEDOUT (about 15 minutes by default)"
            )
        );
        // The default path resets, as a NAT gateway does; no kind is named.
        let socket = classifier("").classify(&record(400, true));
        assert_eq!(
            (socket.path_kind, socket.path_on_idle),
            (None, Some("reset"))
        );
        assert!(
            socket.why.as_deref().is_some_and(|why| why.starts_with(
                "idle 400 s with a keepalive slower than the path's timeout; the path's middlebox forgets a flow idle 350 s and answers its next packet with a reset"
            )),
            "{:?}",
            socket.why
        );
        // Safe sockets carry no why; kind none is never at risk.
        assert_eq!(classifier("").classify(&record(10, false)).why, None);
        let none = classifier("[[path]]\ncidr = \"52.1.0.0/16\"\nkind = \"none\"\n");
        let socket = none.classify(&record(5000, false));
        assert_eq!(
            (socket.risk, socket.why, socket.path_kind),
            (None, None, Some("none"))
        );
    }

    #[test]
    fn a_path_without_middlebox_is_never_at_risk() {
        let classifier = classifier(
            "[[path]]\nname = \"vpc\"\ncidr = \"52.1.0.0/16\"\nidle_timeout = \"none\"\n",
        );
        let socket = classifier.classify(&record(5000, false));
        assert_eq!(socket.risk, None);
        assert_eq!(socket.path_idle_timeout_seconds, None);
        assert_eq!(socket.path_rule.as_deref(), Some("vpc"));
        assert_eq!(socket.time_left_seconds, None);
    }

    #[test]
    fn a_longer_path_timeout_changes_the_verdict_on_keepalive() {
        let classifier =
            classifier("[[path]]\ncidr = \"52.1.2.3\"\nports = [443]\nidle_timeout = 8000\n");
        let socket = classifier.classify(&record(400, true));
        assert_eq!(socket.path_idle_timeout_seconds, Some(8000));
        assert_eq!(socket.risk, None);
        assert_eq!(
            classifier.classify(&record(400, false)).risk,
            Some(Risk::NoKeepalive)
        );
    }

    #[test]
    fn keepalive_acks_count_as_path_traffic() {
        let mut record = record(400, true);
        record.keepalive_time = 60 * HZ;
        record.last_ack_age = 10 * HZ;
        let socket = classifier("").classify(&record);
        assert_eq!(socket.time_left_seconds, Some(340.0));
    }

    #[test]
    fn loopback_has_no_middlebox_unless_configured() {
        let mut record = record(400, false);
        record.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let socket = classifier("").classify(&record);
        assert_eq!(socket.risk, None);
        assert_eq!(socket.path_rule.as_deref(), Some("loopback"));
        let configured = classifier("[[path]]\ncidr = \"127.0.0.0/8\"\nidle_timeout = 5\n");
        assert_eq!(configured.classify(&record).risk, Some(Risk::NoKeepalive));
    }

    #[test]
    fn ipv6_addresses_and_owner() {
        let mut record = record(1, false);
        record.family = AF_INET6;
        record.remote_addr = "2001:db8::7".parse::<Ipv6Addr>().expect("ip").octets();
        record.info_known = 1;
        record.info.owner_tgid = 4242;
        record.info.owner_cgroup = 99;
        let socket = classifier("").classify(&record);
        assert_eq!(socket.family, "ipv6");
        assert_eq!(socket.remote.to_string(), "[2001:db8::7]:443");
        assert_eq!(socket.pid, Some(4242));
        // The name comes from /proc with the rest of the attribution.
        assert_eq!(socket.comm, None);
        assert_eq!(socket.cgroup_id, Some(99));
    }

    #[test]
    fn stamps_from_just_after_the_walk_read_as_zero() {
        let mut record = record(0, false);
        record.last_send_age = u32::MAX;
        assert_eq!(classifier("").classify(&record).last_send_seconds, 0.0);
    }

    fn snapshot(classifier: Classifier, records: &[SocketRecord]) -> Snapshot {
        let mut builder = SnapshotBuilder::new(Arc::new(classifier), 0, true);
        for record in records {
            builder.add(record, |pid, _| {
                Arc::new(Attribution {
                    unit: pid.map(|pid| format!("unit-of-{pid}.service")),
                    comm: Some("java".to_owned()),
                    ..Attribution::default()
                })
            });
        }
        builder.finish(Instant::now())
    }

    fn owned(mut record: SocketRecord, pid: u32) -> SocketRecord {
        record.info_known = 1;
        record.info.owner_tgid = pid;
        record
    }

    #[test]
    fn summary_counts_risks_and_coverage() {
        let mut effective = record(400, true);
        effective.keepalive_time = 60 * HZ;
        let snapshot = snapshot(
            classifier(""),
            &[
                record(400, false),
                record(400, true),
                effective,
                record(10, false),
            ],
        );
        let summary = Summary::of(&snapshot);
        assert_eq!(summary.tracked, 4);
        assert_eq!(summary.at_risk_total(Risk::NoKeepalive), 1);
        assert_eq!(summary.at_risk_total(Risk::KeepaliveTooSlow), 1);
        assert_eq!(summary.long_idle, [1, 1, 1]);
        let unknown = [String::new(), String::new(), "unknown".to_owned()];
        assert_eq!(summary.at_risk.get(&(Risk::NoKeepalive, unknown)), Some(&1));
        assert_eq!(
            summary
                .at_risk_destinations
                .get(&"52.1.2.3".parse::<IpAddr>().expect("ip")),
            Some(&2)
        );
    }

    #[test]
    fn each_namespace_reports_its_keepalive_time_and_its_pod() {
        let in_netns = |netns: u32, keepalive_time: u32, owner: Option<u32>| {
            let mut record = record(400, false);
            record.netns = netns;
            record.ns_keepalive_time = keepalive_time * HZ;
            match owner {
                Some(pid) => owned(record, pid),
                None => record,
            }
        };
        // The pod's namespace: its first socket unattributed, the next one
        // the pod's. The host's: nobody's pod. A third: no owner at all.
        let records = [
            in_netns(7, 60, None),
            in_netns(7, 60, Some(10)),
            in_netns(7, 60, None),
            in_netns(1, 7200, Some(11)),
            in_netns(9, 7200, None),
        ];
        let mut builder = SnapshotBuilder::new(Arc::new(classifier("")), 0, true);
        for record in &records {
            builder.add(record, |pid, _| {
                Arc::new(Attribution {
                    namespace: (pid == Some(10)).then(|| "shop".to_owned()),
                    pod: (pid == Some(10)).then(|| "cart-1".to_owned()),
                    ..Attribution::default()
                })
            });
        }
        let summary = Summary::of(&builder.finish(Instant::now()));
        let rows: Vec<(&str, &str, u32, u64)> = summary
            .namespace_keepalive
            .iter()
            .map(|row| {
                (
                    row.namespace.as_str(),
                    row.pod.as_str(),
                    row.netns,
                    row.keepalive_time_seconds,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("shop", "cart-1", 7, 60),
                ("", "", 1, 7200),
                ("", "", 9, 7200)
            ]
        );
    }

    #[test]
    fn owners_are_attributed_once_and_label_their_sockets() {
        let records = [
            owned(record(400, false), 10),
            owned(record(500, false), 10),
            owned(record(400, true), 11),
            record(400, false),
        ];
        let mut attributed = Vec::new();
        let mut builder = SnapshotBuilder::new(Arc::new(classifier("")), 0, true);
        for record in &records {
            builder.add(record, |pid, _| {
                attributed.push(pid);
                Arc::default()
            });
        }
        assert_eq!(attributed, vec![Some(10), Some(11)]);

        let snapshot = snapshot(classifier(""), &records);
        assert_eq!(snapshot.owners.len(), 2);
        let first = snapshot.view(&snapshot.sockets[1]);
        assert_eq!(first.pid, Some(10));
        assert_eq!(first.comm.as_deref(), Some("java"));
        assert_eq!(
            first.attribution.unit.as_deref(),
            Some("unit-of-10.service")
        );
        assert_eq!(snapshot.view(&snapshot.sockets[3]).pid, None);

        let summary = Summary::of(&snapshot);
        let labels = |unit: &str| [String::new(), String::new(), unit.to_owned()];
        assert_eq!(
            summary
                .at_risk
                .get(&(Risk::NoKeepalive, labels("unit-of-10.service"))),
            Some(&2)
        );
        assert_eq!(
            summary
                .at_risk
                .get(&(Risk::KeepaliveTooSlow, labels("unit-of-11.service"))),
            Some(&1)
        );
        assert_eq!(
            summary.at_risk.get(&(Risk::NoKeepalive, labels("unknown"))),
            Some(&1)
        );
    }

    #[test]
    fn compact_sockets_render_what_classify_renders() {
        let classifier =
            classifier("[[path]]\nname = \"api\"\ncidr = \"52.1.0.0/16\"\nidle_timeout = 600\n");
        let mut record = owned(record(700, true), 7);
        record.keepalive_intvl = 10 * HZ;
        record.keepalive_probes = 3;
        record.probes_out = 2;
        record.info.keepalive_probes_answered = 5;
        let view = classifier.view(&classifier.compact(&record, NO_OWNER), None);
        let whole = classifier.classify(&record);
        assert_eq!(view.path_rule.as_deref(), Some("api"));
        assert_eq!(view.keepalive.interval_from, Source::Socket);
        assert_eq!(view.keepalive.idle_from, Source::Namespace);
        assert_eq!(view.keepalive.count, 3);
        assert_eq!(view.keepalive.probes_unanswered, 2);
        assert_eq!(view.keepalive.probes_answered, 5);
        assert_eq!(view.risk, Some(Risk::KeepaliveTooSlow));
        // Keepalive on, its idle time from the namespace: the sysctl fixes it.
        assert!(
            matches!(&view.fix, Some(Fix::Sysctl { sysctls, .. }) if sysctls[0].name == "net.ipv4.tcp_keepalive_time"),
            "{:?}",
            view.fix
        );
        assert_eq!(view.pid, None);
        assert_eq!(whole.pid, Some(7));
        assert_eq!(
            TrackedSocket {
                pid: None,
                comm: None,
                ..whole
            },
            view
        );
    }

    #[test]
    fn filters_select_longest_idle_first() {
        let snapshot = snapshot(
            classifier(""),
            &[
                record(3, false),
                record(400, false),
                record(900, true),
                record(150, false),
            ],
        );
        let at_risk = Filter {
            at_risk: Some(true),
            min_idle: None,
        };
        assert_eq!(snapshot.select(&at_risk), vec![2, 1]);
        let min_idle = Filter {
            at_risk: None,
            min_idle: Some(100.0),
        };
        assert_eq!(snapshot.select(&min_idle), vec![2, 1, 3]);
        assert_eq!(snapshot.select(&Filter::default()), vec![2, 1, 3, 0]);
        let not_at_risk = Filter {
            at_risk: Some(false),
            min_idle: None,
        };
        assert_eq!(snapshot.select(&not_at_risk), vec![3, 0]);
    }

    #[test]
    fn connections_older_than_idlemon_are_active_opens_unless_on_a_listening_port() {
        let listening = HashMap::from([(0, HashSet::from([8080]))]);
        let mut outbound = record(10, false);
        outbound.sock = 1;
        outbound.local_port = 40001;
        let mut accepted = record(10, false);
        accepted.sock = 2;
        accepted.local_port = 8080;
        let mut marked = record(10, false);
        marked.sock = 3;
        marked.opened_here = 1;
        let first = snapshot(classifier(""), &[outbound, accepted, marked]);
        let mut older = OpenedBeforeStart::classify(&first, &listening);
        let mut summary = Summary::of(&first);
        let destination: SocketAddr = "52.1.2.3:443".parse().expect("address");
        // The marked one counts by its mark, the outbound one by the heuristic.
        assert_eq!(summary.opened_destinations.get(&destination), Some(&1));
        older.count(&first, &mut summary);
        assert_eq!(summary.opened_destinations.get(&destination), Some(&2));

        // The old connection closed; a new accepted socket at its address is
        // not taken for it (another local port), nor counted once it is gone.
        let mut reused = accepted;
        reused.sock = 1;
        let next = snapshot(classifier(""), &[reused, marked]);
        let mut summary = Summary::of(&next);
        older.count(&next, &mut summary);
        assert_eq!(summary.opened_destinations.get(&destination), Some(&1));
        let again = snapshot(classifier(""), &[outbound, marked]);
        let mut summary = Summary::of(&again);
        older.count(&again, &mut summary);
        assert_eq!(summary.opened_destinations.get(&destination), Some(&1));
    }
}
