//! Plain data shared by idlemon's kernel programs and its daemon.
//!
//! The kernel side is built by nightly for `bpfel-unknown-none` and user space
//! by stable for the host, so every type here is `#[repr(C)]`, holds only
//! fixed-width integers and arrays with explicit padding, and has its size
//! pinned by a compile-time assertion that both builds check.
#![no_std]

use core::mem::size_of;

/// Length of `task_struct.comm`, including the trailing NUL.
pub const COMM_LEN: usize = 16;

/// `AF_INET` and `AF_INET6` as the kernel stores them in `skc_family`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `TCP_CLOSE_WAIT`: the walk by file descriptor reports these too (for
/// their count only), since a namespace's `CurrEstab` counts them.
pub const TCP_CLOSE_WAIT: u8 = 8;

/// `TCP_ESTABLISHED` and `TCP_CLOSE` from `include/net/tcp_states.h`; these
/// values are part of the kernel ABI (`/proc/net/tcp` prints them).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_CLOSE: u8 = 7;
/// Highest TCP state number (`TCP_NEW_SYN_RECV`).
pub const TCP_MAX_STATE: u32 = 12;

/// Slots of the per-CPU `COUNTERS` array. Slots `0..=TCP_MAX_STATE` count
/// transitions into that TCP state; the rest are named here.
pub mod counter {
    /// A send on a socket that had been idle at least the idle threshold.
    pub const SEND_AFTER_IDLE: u32 = 16;
    /// A segment received on a socket idle at least the idle threshold.
    pub const RECEIVE_AFTER_IDLE: u32 = 17;
    /// The socket table was full, so a socket's owner or keepalive counts
    /// could not be recorded.
    pub const SOCKET_TABLE_FULL: u32 = 18;
    /// Keepalive probes the peer answered (seen as the first segment received
    /// while probes were outstanding).
    pub const KEEPALIVE_PROBES_ANSWERED: u32 = 19;
    /// `tcp_keepalive_timer` runs on established sockets with SO_KEEPALIVE
    /// (only where fentry or kprobe attach).
    pub const KEEPALIVE_TIMER_FIRES: u32 = 20;
    /// Events the ring buffer had no room for.
    pub const EVENTS_LOST: u32 = 21;
    /// RSTs received on synchronized (established or closing) sockets.
    pub const RESETS_RECEIVED: u32 = 22;
    /// RSTs the host sent.
    pub const RESETS_SENT: u32 = 23;
    /// Connections closed after unanswered keepalive probes.
    pub const KEEPALIVE_TIMEOUTS: u32 = 24;
    /// Of `EVENTS_LOST`, the received-reset events: those resets reach
    /// the metrics unclassified.
    pub const RESET_EVENTS_LOST: u32 = 25;
    /// Entries added to and removed from the socket table: their difference
    /// is its fill, without walking the map.
    pub const SOCKET_TABLE_INSERTS: u32 = 26;
    pub const SOCKET_TABLE_REMOVES: u32 = 27;
    /// Of `EVENTS_LOST`, events on sockets that were not idle past the
    /// threshold, dropped while the ring buffer was three-quarters full so
    /// that its last quarter stays free for the ones that were.
    pub const EVENTS_SHED: u32 = 28;
    /// Established connections the kernel closed after its retransmissions
    /// went unanswered (ETIMEDOUT from `tcp_retries2` or TCP_USER_TIMEOUT).
    pub const RETRANSMIT_TIMEOUTS: u32 = 29;
    /// Active opens that failed (SYN_SENT -> CLOSE with a socket error).
    pub const CONNECT_FAILURES: u32 = 30;
    /// SYNs retransmitted, counted when the connect ends either way.
    pub const SYN_RETRANSMITS: u32 = 31;
    /// Keepalive enforcement decisions: slot `ENFORCEMENTS + reason`, one
    /// of `enforce::reason` (the mode is fixed for the daemon's lifetime).
    pub const ENFORCEMENTS: u32 = 32;
    /// Applications that weakened the keepalive idlemon set on their
    /// socket: slot `WEAKENED + enforce::weakened::REPORTED` (let through)
    /// or `+ OVERRIDDEN` (`[enforce] override`: the enforced value kept).
    pub const WEAKENED: u32 = ENFORCEMENTS + super::enforce::reason::COUNT;
    /// Number of slots in the array.
    pub const SLOTS: u32 = WEAKENED + 2;
}

/// Slots of the `WALK_OPTIONS` array, which user space sets before it walks
/// a network namespace and the walk program reads (and partly writes).
pub mod walk_option {
    /// 1: a walk for /sockets, which reads everything about every socket;
    /// 0: a periodic walk, which reads what the metrics need.
    pub const COMPLETE: u32 = 0;
    /// 1 when `OWNERS_KNOWN_SINCE` holds a stamp: user space still has the
    /// owner that the previous walk of this namespace read (or carried over)
    /// for every socket idle at least the idle threshold at that walk, which
    /// started at that stamp (jiffies). A periodic walk then leaves the
    /// owner of a socket idle since before `stamp - threshold` to user
    /// space (`SocketRecord::info_known` = `INFO_CARRIED_OVER`): nothing
    /// has sent on it since it was read.
    pub const OWNERS_KNOWN: u32 = 1;
    pub const OWNERS_KNOWN_SINCE: u32 = 2;
    /// Written by the walk program at the first ESTABLISHED socket of a walk
    /// (user space zeroes `STARTED` before): the walk's start, in jiffies.
    pub const STARTED: u32 = 3;
    pub const STARTED_AT: u32 = 4;
    /// Number of slots.
    pub const SLOTS: u32 = 5;
}

/// `SocketRecord::info_known`: nothing recorded, or not looked up.
pub const INFO_UNKNOWN: u8 = 0;
/// `SocketRecord::info_known`: `info` holds what the hooks recorded.
pub const INFO_KNOWN: u8 = 1;
/// `SocketRecord::info_known`: not looked up, because user space has the
/// owner from the previous walk (see `walk_option::OWNERS_KNOWN`).
pub const INFO_CARRIED_OVER: u8 = 2;

/// Kernel struct member offsets (bytes), resolved from the running kernel's
/// BTF at load time and handed to the programs as a read-only global, since
/// rustc emits no CO-RE relocations. Offsets into `struct sock` also apply to
/// `struct tcp_sock`, which begins with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    pub skc_family: u32,
    pub skc_state: u32,
    /// `inet_sock.inet_sport` (network order).
    pub inet_sport: u32,
    pub skc_dport: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    pub sk_flags: u32,
    /// The timer `tcp_keepalive_timer` runs on, from the socket:
    /// `icsk_keepalive_timer` where the kernel has it, else `sk_timer`.
    pub keepalive_timer: u32,
    /// Bit of `sk_flags` that SO_KEEPALIVE sets (`SOCK_KEEPOPEN`).
    pub keepopen_bit: u32,
    pub lsndtime: u32,
    pub rcv_tstamp: u32,
    pub lrcvtime: u32,
    pub probes_out: u32,
    pub keepalive_time: u32,
    pub keepalive_intvl: u32,
    pub keepalive_probes: u32,
    pub net_inum: u32,
    pub net_keepalive_time: u32,
    pub net_keepalive_intvl: u32,
    pub net_keepalive_probes: u32,
    pub sk_err: u32,
    /// `struct sk_buff` members, to read the addresses of a segment that
    /// provoked a RST when no socket matched it.
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    /// `struct timer_list.function`: the keepalive hook on tracepoint-only
    /// kernels recognises the keepalive timer by its callback.
    pub timer_function: u32,
    /// `sock_common.skc_num`, the local port in host order: on the socket's
    /// first cache line, where `inet_sport` is twelve lines further.
    pub skc_num: u32,
    /// `sock.sk_uid.val`: the owner uid that `iter/tcp` hands its program,
    /// for the walk by file descriptor, which gets none.
    pub sk_uid: u32,
    /// `socket.sk` and `sock.sk_protocol`, for the walk by file descriptor.
    pub socket_sk: u32,
    pub sk_protocol: u32,
    /// `sock.sk_lock.owned`: non-zero while a process holds the socket
    /// (lock_sock), so that an event in that process's context may name it;
    /// zero in softirq and timers, where the current task is whichever one
    /// the interrupt happened to land on.
    pub sk_lock_owned: u32,
    /// `inet_connection_sock.icsk_retransmits`: retransmission timeouts in a
    /// row without an ACK of new data (the count `tcp_retries2` bounds).
    pub icsk_retransmits: u32,
    /// `tcp_sock.total_retrans`: segments retransmitted over the socket's
    /// life; in SYN_SENT, the SYNs retransmitted.
    pub total_retrans: u32,
    /// `tcp_sock.retrans_stamp`: in SYN_SENT, when the first SYN left, in
    /// the TCP timestamp clock (CLOCK_MONOTONIC milliseconds).
    pub retrans_stamp: u32,
}
const _: () = assert!(size_of::<KernelLayout>() == 144);

/// What the kernel programs remember about a socket between packets: who
/// uses it and what keepalive did. Keyed by the socket's kernel address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketInfo {
    /// cgroup (v2) id of the process that connected or last sent; 0 when unknown.
    pub owner_cgroup: u64,
    /// The process (thread group) id; its name and cgroup path are read
    /// from /proc by user space.
    pub owner_tgid: u32,
    pub keepalive_probes_answered: u32,
    pub keepalive_timer_fires: u32,
    /// When (jiffies) the last send after an idle period happened, and how
    /// long (jiffies) the socket had been idle before it. A RST soon after
    /// such a send is the signature of a middlebox that forgot the flow.
    /// `reuse_at - reuse_idle` also tells one idle period from the next, so
    /// that a send made of several buffers counts once.
    pub reuse_at: u32,
    pub reuse_idle: u32,
    /// Stamp (jiffies) of the last activity before the idle period that the
    /// receive hook last counted.
    pub recv_idle_mark: u32,
}
const _: () = assert!(size_of::<SocketInfo>() == 32);

/// One established socket as the `iter/tcp` program reports it. Times are
/// ages in jiffies at the moment of the walk (`now - stamp`), which is what
/// `ss -tnoi` prints as lastsnd/lastrcv/lastack after conversion to ms.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRecord {
    /// Kernel address of the socket: an identity, never dereferenced by user space.
    pub sock: u64,
    /// Inode number of the socket's network namespace (as in /proc/PID/ns/net).
    pub netns: u32,
    pub uid: u32,
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub state: u8,
    /// SO_KEEPALIVE: 1 on, 0 off.
    pub keepalive_enabled: u8,
    /// IPv4 addresses occupy the first 4 bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub last_send_age: u32,
    pub last_recv_age: u32,
    pub last_ack_age: u32,
    /// Per-socket TCP_KEEPIDLE and TCP_KEEPINTVL in jiffies; 0 means unset.
    pub keepalive_time: u32,
    pub keepalive_intvl: u32,
    /// The socket's network namespace sysctls, in jiffies.
    pub ns_keepalive_time: u32,
    pub ns_keepalive_intvl: u32,
    /// Per-socket TCP_KEEPCNT; 0 means unset.
    pub keepalive_probes: u8,
    pub ns_keepalive_probes: u8,
    /// Keepalive (or zero-window) probes sent and not yet answered.
    pub probes_out: u8,
    /// `INFO_KNOWN` when `info` holds what the hooks recorded for this
    /// socket; `INFO_UNKNOWN`; or `INFO_CARRIED_OVER`.
    pub info_known: u8,
    /// Retransmission timeouts in a row without an ACK (`icsk_retransmits`):
    /// non-zero while the peer, or the path, answers nothing.
    pub retransmits: u8,
    /// 1 when `retransmits` is non-zero and no ACK has arrived since the
    /// send after idle in `info` (`reuse_at`): the path forgot the flow
    /// without a RST, and the socket will die of ETIMEDOUT unless it
    /// recovers. Only where `info` was looked up (`INFO_KNOWN`).
    pub retransmitting_since_reuse: u8,
    /// 1 when the hooks saw this node open the connection (SYN_SENT ->
    /// ESTABLISHED since idlemon loaded: `ACTIVE_OPENS`), 0 otherwise: an
    /// accepted one, one older than idlemon, or not counted at all (only
    /// with `--destination-labels`, for NAT port pressure).
    pub opened_here: u8,
    pub _pad: u8,
    pub info: SocketInfo,
}
const _: () = assert!(size_of::<SocketRecord>() == 128);

/// What an `Event` reports.
pub mod event_kind {
    /// A RST arrived on an established (or closing) socket.
    pub const RESET_RECEIVED: u8 = 1;
    /// The host sent a RST.
    pub const RESET_SENT: u8 = 2;
    /// A send on a socket idle at least the idle threshold.
    pub const SEND_AFTER_IDLE: u8 = 3;
    /// The kernel closed a connection after unanswered keepalive probes.
    pub const KEEPALIVE_TIMEOUT: u8 = 4;
    /// The enforcement program decided about a new connection's keepalive
    /// (`Event::enforcement` says what).
    pub const KEEPALIVE_ENFORCED: u8 = 5;
    /// An established connection died with ETIMEDOUT (or the soft error
    /// that ICMP left) after its retransmissions went unanswered.
    pub const RETRANSMIT_TIMEOUT: u8 = 6;
    /// An established connection died of another error (`Event::error`).
    pub const CONNECTION_ERROR: u8 = 7;
    /// An active open failed: `Event::error` says how (ETIMEDOUT: SYNs
    /// unanswered; ECONNREFUSED; EHOSTUNREACH or ENETUNREACH; ECONNRESET).
    pub const CONNECT_FAILED: u8 = 8;
    /// An application turned off, or slowed, the keepalive idlemon set on
    /// its socket (`Event::enforcement` says how; see `enforce::weakened`).
    pub const KEEPALIVE_WEAKENED: u8 = 9;
}

/// A moment worth explaining later, sent through the `EVENTS` ring buffer
/// with the socket's state at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub time_ns: u64,
    /// The kernel's jiffies at the event, to age `socket.info.reuse_at`.
    pub jiffies: u32,
    /// Process in whose context the event fired, where that process holds
    /// the socket (process context: a send, a close, a reset processed from
    /// the socket's backlog); 0 in softirq or timer context, where the
    /// interrupted task has nothing to do with the socket.
    pub current_tgid: u32,
    /// One of `event_kind`.
    pub kind: u8,
    /// 1 when `socket` was read from a full socket; 0 when only addresses
    /// are known (a RST sent for a segment that matched no socket).
    pub socket_known: u8,
    pub _pad: [u8; 2],
    /// `sk_err` at the event (ETIMEDOUT for keepalive deaths).
    pub error: u32,
    /// Task name in whose context the event fired (see `current_tgid`).
    pub current_comm: [u8; COMM_LEN],
    pub socket: SocketRecord,
    /// Deaths: segments retransmitted, RTOs in a row for an established
    /// socket (`icsk_retransmits`), SYNs for a connect (`total_retrans`).
    pub retransmissions: u32,
    /// Failed connects: milliseconds since the first SYN; `u32::MAX` when
    /// unknown.
    pub connect_ms: u32,
    /// For `KEEPALIVE_ENFORCED` events: the decision. `socket` holds the
    /// settings before it.
    pub enforcement: KeepaliveDecision,
}
const _: () = assert!(size_of::<Event>() == 208);

/// Keepalive enforcement (a `sock_ops` program on the cgroup v2 hierarchy).
pub mod enforce {
    /// `EnforceSettings::mode`: decide and count, change nothing.
    pub const MODE_DRY_RUN: u32 = 1;
    /// `EnforceSettings::mode`: decide, count and set.
    pub const MODE_ON: u32 = 2;

    /// Why the program did what it did with a new connection.
    pub mod reason {
        /// SO_KEEPALIVE was off: keepalive turned on with the target settings.
        pub const NO_KEEPALIVE: u32 = 0;
        /// SO_KEEPALIVE was on with an idle time or an interval not below
        /// the path's timeout: whichever is slower than the target lowered
        /// to it (after a probe, the next comes an interval later: an
        /// interval at the timeout lets the middlebox forget the flow).
        pub const KEEPALIVE_TOO_SLOW: u32 = 1;
        /// The application's own keepalive already beats the path's
        /// timeout: left as it is.
        pub const KEEPALIVE_SUFFICIENT: u32 = 2;
        /// A loopback connection: never touched.
        pub const LOOPBACK: u32 = 3;
        /// The path has no middlebox timeout (`idle_timeout = "none"`).
        pub const NO_TIMEOUT: u32 = 4;
        /// `bpf_setsockopt` refused one of the options.
        pub const FAILED: u32 = 5;
        /// The socket's keepalive state could not be read: left as it is.
        pub const UNREADABLE: u32 = 6;
        pub const COUNT: u32 = 8;
    }

    /// An application's setsockopt on a socket idlemon enforced, seen by the
    /// `cgroup/setsockopt` program. In a `KEEPALIVE_WEAKENED` event,
    /// `KeepaliveDecision` holds: `reason` one of `KEEPALIVE_OFF` or
    /// `IDLE_RAISED`; `idle_seconds`, `interval_seconds`, `count` and
    /// `path_timeout_seconds` as idlemon set them; `passive` the value the
    /// application asked for (0 for SO_KEEPALIVE off, else TCP_KEEPIDLE
    /// seconds); `error` `REPORTED` or `OVERRIDDEN`.
    pub mod weakened {
        /// setsockopt(SOL_SOCKET, SO_KEEPALIVE, 0).
        pub const KEEPALIVE_OFF: u32 = 1;
        /// setsockopt(IPPROTO_TCP, TCP_KEEPIDLE, x) with x above what idlemon set.
        pub const IDLE_RAISED: u32 = 2;
        /// Let through: the application's value applies.
        pub const REPORTED: u32 = 0;
        /// `[enforce] override`: the value was rewritten to idlemon's.
        pub const OVERRIDDEN: u32 = 1;
    }

    /// `KeepaliveDecision::passive` of a connection that existed before
    /// idlemon started, fixed by the walk.
    pub const EXISTING: u32 = 2;
    /// Path rules the kernel can hold; the config file's rules beyond it
    /// are refused when enforcement is on.
    pub const MAX_PATHS: u32 = 128;
    /// Port ranges per kernel path entry; a rule with more takes several
    /// consecutive entries.
    pub const PORT_RANGES: usize = 8;
}

/// What the enforcement program decided for one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepaliveDecision {
    /// One of `enforce::reason`.
    pub reason: u32,
    /// One of `enforce::MODE_*`.
    pub mode: u32,
    /// Settings after the decision (dry run: what would have been set), in
    /// seconds and probes: TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT. 0: left
    /// as it was.
    pub idle_seconds: u32,
    pub interval_seconds: u32,
    pub count: u32,
    /// The path's idle timeout, in seconds.
    pub path_timeout_seconds: u32,
    /// 1: an accepted connection (PASSIVE_ESTABLISHED); 0: an outbound one;
    /// `enforce::EXISTING`: one older than idlemon, fixed by the walk.
    pub passive: u32,
    /// The `bpf_setsockopt` error, for `reason::FAILED`.
    pub error: i32,
}
const _: () = assert!(size_of::<KeepaliveDecision>() == 32);

/// Enforcement settings handed to the program as a read-only global.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnforceSettings {
    /// `enforce::MODE_*`; 0 (off): the program is not attached at all.
    pub mode: u32,
    /// 1: accepted connections too.
    pub passive: u32,
    /// Entries of `ENFORCE_PATHS` in use, in precedence order.
    pub paths: u32,
    /// The path where no entry matches (`--idle-timeout`).
    pub default_timeout_seconds: u32,
    pub default_timeout_jiffies: u32,
    pub default_idle_seconds: u32,
    pub default_idle_jiffies: u32,
    /// TCP_KEEPINTVL and TCP_KEEPCNT set on sockets without keepalive;
    /// TCP_KEEPINTVL also where the socket's is slower.
    pub interval_seconds: u32,
    pub interval_jiffies: u32,
    pub count: u32,
    /// 1: the `cgroup/setsockopt` program rewrites an application's
    /// weakening of an enforced socket's keepalive (`[enforce] override`).
    pub override_weakening: u32,
}
const _: () = assert!(size_of::<EnforceSettings>() == 44);

/// What idlemon set on a socket, kept by the enforcement programs (keyed by
/// the socket's address) so that the `cgroup/setsockopt` program can tell
/// an application's later weakening of it. Ports, host order, tell a reused
/// address apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnforcedSocket {
    pub idle_seconds: u32,
    pub interval_seconds: u32,
    pub count: u32,
    pub path_timeout_seconds: u32,
    pub local_port: u16,
    pub remote_port: u16,
}
const _: () = assert!(size_of::<EnforcedSocket>() == 20);

/// One path rule for the kernel: destinations `addr/mask` (IPv4 in the
/// first word, network order), on the listed port ranges (none: every port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnforcePath {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
    /// Inclusive port ranges, host order.
    pub ports: [[u16; 2]; enforce::PORT_RANGES],
    /// The rule's timeout, in seconds and jiffies; 0: "none".
    pub timeout_seconds: u32,
    pub timeout_jiffies: u32,
    /// TCP_KEEPIDLE to set on this path.
    pub idle_seconds: u32,
    pub idle_jiffies: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Entries of `ports` in use; 0: every port.
    pub port_ranges: u16,
}
const _: () = assert!(size_of::<EnforcePath>() == 84);

/// A socket user space selected for `enforce_existing`, as the walk reads
/// it (ports in host order, addresses as in `SocketRecord`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExistingSocket {
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<ExistingSocket>() == 24);

/// Where a connect went: the key of the `CONNECTS` map, which counts the
/// connects to each destination that succeeded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Destination {
    /// IPv4 addresses occupy the first 4 bytes.
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Destination>() == 24);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers and arrays with explicit padding,
    // valid for every bit pattern.
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::SocketInfo {}
    unsafe impl aya::Pod for super::SocketRecord {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::EnforceSettings {}
    unsafe impl aya::Pod for super::EnforcePath {}
    unsafe impl aya::Pod for super::ExistingSocket {}
    unsafe impl aya::Pod for super::EnforcedSocket {}
    unsafe impl aya::Pod for super::Destination {}
}
