//! The snapshot: one walk's result, every socket in a compact form with its
//! verdict, their owners, and the counts the gauges are made of.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::Arc,
    time::Instant,
};

use monitor_common::{AF_INET, SocketRecord};

use super::{Classifier, Coverage, Facts, Filter, PathRule, Risk, TrackedSocket, WalkMap, address};
use crate::attribution::Attribution;

impl Classifier {
    /// The compact form of a walk record, with its verdict.
    pub fn compact(&self, record: &SocketRecord, owner: u32) -> Socket {
        let is_ipv6 = record.family != AF_INET;
        let remote_ip = address(is_ipv6, &record.remote_addr);
        let (path_rule, path_timeout) = self.path(remote_ip, record.remote_port);
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
        socket.risk = self.risk(&socket.facts());
        socket
    }
}

/// A jiffies age, with a stamp taken on another CPU just after the walk's
/// clock read (which wraps to a huge age) read as zero.
fn age(jiffies: u32) -> u32 {
    if jiffies > u32::MAX / 2 { 0 } else { jiffies }
}

/// `Socket::owner` when the hooks never saw the socket's process.
pub const NO_OWNER: u32 = u32::MAX;

/// One tracked ESTABLISHED socket as a walk keeps it: about 100 bytes and
/// no heap, so that a host's 200,000 sockets cost 20 MB between walks.
/// `Classifier::view` renders the API's `TrackedSocket`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Socket {
    pub sock: u64,
    pub(super) local_addr: [u8; 16],
    pub(super) remote_addr: [u8; 16],
    pub(super) local_port: u16,
    pub(super) remote_port: u16,
    pub(super) netns: u32,
    pub(super) uid: u32,
    /// Ages in jiffies at the walk.
    pub(super) last_send: u32,
    pub(super) last_receive: u32,
    pub(super) last_ack: u32,
    /// Effective keepalive idle time and interval, in jiffies.
    pub(super) keepalive_idle: u32,
    pub(super) keepalive_interval: u32,
    pub(super) probes_answered: u32,
    pub(super) timer_runs: u32,
    pub(super) path_timeout: Option<NonZeroU32>,
    pub path_rule: PathRule,
    /// Index into `Snapshot::owners`, or `NO_OWNER`.
    pub owner: u32,
    pub(super) is_ipv6: bool,
    pub(super) keepalive_enabled: bool,
    pub(super) keepalive_count: u8,
    /// Bits 0, 1, 2: idle time, interval and count set on the socket (else
    /// by the namespace sysctls).
    pub(super) keepalive_own: u8,
    pub(super) probes_unanswered: u8,
    pub(super) retransmits: u8,
    pub(super) retransmitting_since_reuse: bool,
    /// This node opened it (`SocketRecord::opened_here`).
    pub opened_here: bool,
    pub risk: Option<Risk>,
}

impl Socket {
    /// What the verdict is given.
    pub fn facts(&self) -> Facts {
        Facts {
            idle: self.idle(),
            path_timeout: self.path_timeout,
            keepalive_enabled: self.keepalive_enabled,
            keepalive_idle: self.keepalive_idle,
        }
    }

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
    pub(super) index: Option<WalkMap<u64, usize>>,
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
            if let Some(coverage) = snapshot.classifier.coverage(&socket.facts()) {
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
