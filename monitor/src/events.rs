//! Events for incident forensics: resets, reuse after idle, deaths without
//! a RST (keepalive, retransmission timeout, other errors) and failed
//! connects, explained (how long the socket had been idle, what the path's
//! timeout is, who owned it) and kept in a bounded history, the event log and
//! the metrics.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use monitor_common::{Event, event_kind};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    attribution::Attribution,
    sockets::{Classifier, TrackedSocket, comm},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    ResetReceived,
    ResetSent,
    SendAfterIdle,
    KeepaliveTimeout,
    KeepaliveEnforced,
    RetransmitTimeout,
    ConnectionError,
    ConnectFailed,
    KeepaliveWeakened,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::ResetReceived,
        Kind::ResetSent,
        Kind::SendAfterIdle,
        Kind::KeepaliveTimeout,
        Kind::KeepaliveEnforced,
        Kind::RetransmitTimeout,
        Kind::ConnectionError,
        Kind::ConnectFailed,
        Kind::KeepaliveWeakened,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ResetReceived => "reset_received",
            Self::ResetSent => "reset_sent",
            Self::SendAfterIdle => "send_after_idle",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::KeepaliveEnforced => "keepalive_enforced",
            Self::RetransmitTimeout => "retransmit_timeout",
            Self::ConnectionError => "connection_error",
            Self::ConnectFailed => "connect_failed",
            Self::KeepaliveWeakened => "keepalive_weakened",
        }
    }
}

/// Why an active open failed, from the socket error it ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectFailure {
    /// ETIMEDOUT: the SYNs went unanswered (`tcp_syn_retries`): a
    /// firewall or NAT that drops them, a full conntrack table, a remote
    /// that discards them (`tcp_tw_recycle` behind a NAT).
    Timeout,
    /// ECONNREFUSED: a RST answered the SYN (nothing listens), or an ICMP
    /// port unreachable.
    Refused,
    /// Another ICMP error: no route, host or network unreachable,
    /// administratively prohibited.
    Unreachable,
    /// ECONNRESET.
    Reset,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 4] = [
        ConnectFailure::Timeout,
        ConnectFailure::Refused,
        ConnectFailure::Unreachable,
        ConnectFailure::Reset,
    ];

    pub fn of(errno: u32) -> Self {
        match errno as i32 {
            libc::ETIMEDOUT => Self::Timeout,
            libc::ECONNREFUSED => Self::Refused,
            libc::ECONNRESET => Self::Reset,
            _ => Self::Unreachable,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::Reset => "reset",
        }
    }
}

/// What a reset, or a retransmission timeout, most likely means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    /// The socket had been idle at least the path's idle timeout, or the RST
    /// answered the first packet after such an idle period: a middlebox
    /// forgot the flow.
    IdleTimeoutSuspected,
    Other,
}

impl Classification {
    /// `IdleTimeoutSuspected` when the idle period reached the path's
    /// timeout; `Other` when it did not, or either is unknown.
    fn of(idle_seconds: Option<f64>, path_timeout_seconds: Option<u32>) -> Self {
        match (idle_seconds, path_timeout_seconds) {
            (Some(idle), Some(timeout)) if idle >= f64::from(timeout) => Self::IdleTimeoutSuspected,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::IdleTimeoutSuspected => "idle_timeout_suspected",
            Self::Other => "other",
        }
    }
}

/// The send after idle that a reset followed, or that began the
/// retransmissions a connection died of.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reuse {
    /// The `send_after_idle` event, when idlemon still holds it; None also
    /// when the send hook is missing, and the send after idle is inferred
    /// from the peer's silence (`Explainer::send_hook_missing`).
    pub event_id: Option<u64>,
    /// How long the socket had been idle before that send.
    pub idle_seconds: f64,
    /// How long before the reset (the death) the send happened.
    pub seconds_before: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    /// Increasing within one run of the daemon; `GET /events?after=ID`
    /// continues from one.
    pub id: u64,
    /// Unique across nodes, reboots and restarts, and the same wherever the
    /// event is read (the event log, /events): what a log pipeline
    /// deduplicates on. `BOOT_ID-START_MS-ID`: the kernel's boot id, the
    /// daemon's start (unix milliseconds) and `id`.
    pub event_id: String,
    /// The node (`--node-name`, else the hostname).
    pub node: Arc<str>,
    /// RFC 3339, UTC.
    pub time: String,
    #[serde(skip)]
    pub unix_seconds: f64,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
    pub family: &'static str,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Seconds since the last data sent and received, at the event.
    pub idle_since_send_seconds: Option<f64>,
    pub idle_since_receive_seconds: Option<f64>,
    /// For resets, the idle period the reset ended (including the one before
    /// a send that provoked it); for sends after idle, the idle before the send.
    pub idle_before_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reuse: Option<Reuse>,
    /// Resets and retransmission timeouts classified `idle_timeout_suspected`:
    /// what the path did, in the words of its `kind` ("the GWLB forgot the
    /// flow after 352 s idle (its timeout: 350 s) and dropped the next packet; ...").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
    /// The socket error, for deaths and failed connects (e.g. ETIMEDOUT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Retransmission timeouts in a row before a `retransmit_timeout`; SYNs
    /// retransmitted before a `connect_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retransmissions: Option<u32>,
    /// `connect_failed` only: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<ConnectFailure>,
    /// `connect_failed` only: seconds from the first SYN to the failure;
    /// null when the kernel's stamp cannot be read as milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_seconds: Option<Option<f64>>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup_id: Option<u64>,
    /// The process's cgroup, container and pod.
    #[serde(flatten)]
    pub attribution: Arc<Attribution>,
    /// The socket at the event, as in /sockets; null when the RST answered a
    /// segment that matched no socket.
    pub socket: Option<TrackedSocket>,
    /// Whether the event is about a socket idle at least the idle threshold
    /// (see `is_evidence`): such events are kept ahead of the rest.
    #[serde(skip)]
    pub evidence: bool,
    /// For `keepalive_enforced`: the decision, with the settings before and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// For `keepalive_weakened`: what the application asked, and what
    /// idlemon had set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weakening: Option<Weakening>,
}

/// An application's setsockopt that turned off, or slowed, the keepalive
/// idlemon enforced on its socket (seen by the `cgroup/setsockopt` program).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Weakening {
    /// `report`: the application's value applies; `override` (`[enforce]
    /// override = true`): rewritten to idlemon's, the keepalive stays.
    pub mode: &'static str,
    /// `keepalive_off` (SO_KEEPALIVE 0) or `idle_raised` (TCP_KEEPIDLE
    /// above idlemon's).
    pub change: &'static str,
    pub path_idle_timeout_seconds: u32,
    /// The keepalive idlemon had set.
    pub old: KeepaliveSettings,
    /// What the application asked for.
    pub new: KeepaliveSettings,
}

impl Weakening {
    fn of(decision: &monitor_common::KeepaliveDecision) -> Self {
        use monitor_common::enforce::weakened;
        let old = KeepaliveSettings {
            enabled: true,
            idle_seconds: f64::from(decision.idle_seconds),
            interval_seconds: f64::from(decision.interval_seconds),
            count: decision.count.min(u32::from(u8::MAX)) as u8,
        };
        let keepalive_off = decision.reason == weakened::KEEPALIVE_OFF;
        let new = KeepaliveSettings {
            enabled: !keepalive_off,
            idle_seconds: if keepalive_off {
                old.idle_seconds
            } else {
                f64::from(decision.passive)
            },
            ..old.clone()
        };
        Self {
            mode: if decision.error == weakened::OVERRIDDEN as i32 {
                "override"
            } else {
                "report"
            },
            change: if keepalive_off {
                "keepalive_off"
            } else {
                "idle_raised"
            },
            path_idle_timeout_seconds: decision.path_timeout_seconds,
            old,
            new,
        }
    }
}

/// A keepalive enforcement decision about one new connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Enforcement {
    /// `dry_run` or `on`.
    pub mode: &'static str,
    /// `no_keepalive`, `keepalive_too_slow`, `keepalive_sufficient`,
    /// `failed` or `unreadable` (the label of
    /// `idlemon_keepalive_enforcements_total`).
    pub reason: &'static str,
    /// `outbound` (connect), `accepted`, or `existing` (a connection older
    /// than idlemon, fixed by the walk at start).
    pub direction: &'static str,
    /// Whether the socket was changed (never in dry-run).
    pub applied: bool,
    pub path_idle_timeout_seconds: u32,
    /// The effective keepalive before (null when it could not be read) and
    /// after the decision (in dry-run: what `on` would have set).
    pub old: Option<KeepaliveSettings>,
    pub new: Option<KeepaliveSettings>,
    /// The `bpf_setsockopt` error, for `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeepaliveSettings {
    pub enabled: bool,
    pub idle_seconds: f64,
    pub interval_seconds: f64,
    pub count: u8,
}

/// The `reason` label of an `enforce::reason` value.
pub fn enforcement_reason(reason: u32) -> &'static str {
    use monitor_common::enforce::reason;
    match reason {
        reason::NO_KEEPALIVE => "no_keepalive",
        reason::KEEPALIVE_TOO_SLOW => "keepalive_too_slow",
        reason::KEEPALIVE_SUFFICIENT => "keepalive_sufficient",
        reason::LOOPBACK => "loopback",
        reason::NO_TIMEOUT => "no_timeout",
        reason::FAILED => "failed",
        _ => "unreadable",
    }
}

fn enforcement(event: &Event, socket: Option<&TrackedSocket>) -> Enforcement {
    use monitor_common::enforce::{MODE_ON, reason};
    let decision = &event.enforcement;
    let old = socket.map(|socket| KeepaliveSettings {
        enabled: socket.keepalive.enabled,
        idle_seconds: socket.keepalive.idle_seconds,
        interval_seconds: socket.keepalive.interval_seconds,
        count: socket.keepalive.count,
    });
    let new = old.as_ref().map(|old| {
        let changes = decision.reason == reason::NO_KEEPALIVE
            || decision.reason == reason::KEEPALIVE_TOO_SLOW;
        if !changes {
            return old.clone();
        }
        let or_old = |value: u32, old: f64| if value == 0 { old } else { f64::from(value) };
        KeepaliveSettings {
            enabled: true,
            idle_seconds: or_old(decision.idle_seconds, old.idle_seconds),
            interval_seconds: or_old(decision.interval_seconds, old.interval_seconds),
            count: if decision.count == 0 {
                old.count
            } else {
                decision.count.min(u32::from(u8::MAX)) as u8
            },
        }
    });
    let applied = decision.mode == MODE_ON
        && (decision.reason == reason::NO_KEEPALIVE
            || decision.reason == reason::KEEPALIVE_TOO_SLOW);
    Enforcement {
        mode: if decision.mode == MODE_ON {
            "on"
        } else {
            "dry_run"
        },
        reason: enforcement_reason(decision.reason),
        direction: match decision.passive {
            0 => "outbound",
            monitor_common::enforce::EXISTING => "existing",
            _ => "accepted",
        },
        applied,
        path_idle_timeout_seconds: decision.path_timeout_seconds,
        // A failed change leaves the socket as it was.
        new: if decision.reason == reason::FAILED {
            old.clone()
        } else {
            new
        },
        old,
        error: (decision.reason == reason::FAILED)
            .then(|| errno_name((-decision.error).max(0) as u32)),
    }
}

impl EventRecord {
    /// The events idlemon exists for: a send after an idle period, or a
    /// death of a socket that had been idle at least `threshold` (before the
    /// event, or before the send it answered).
    fn is_evidence(&self, threshold: Duration) -> bool {
        let threshold = threshold.as_secs_f64();
        let idle = |seconds: Option<f64>| seconds.is_some_and(|seconds| seconds >= threshold);
        self.kind == Kind::SendAfterIdle
            || self.kind == Kind::RetransmitTimeout
            || self.classification == Some(Classification::IdleTimeoutSuspected)
            || self.reuse.is_some()
            || idle(self.idle_before_seconds)
            || idle(self.socket.as_ref().map(|socket| socket.idle_seconds))
    }
}

/// A RST this long after a send after idle answers that send.
pub const REUSE_WINDOW: Duration = Duration::from_secs(10);
/// Sends after idle remembered for linking; beyond this the oldest half goes.
const REUSE_MEMORY: usize = 65_536;

/// Turns kernel events into explained records.
pub struct Explainer {
    classifier: Arc<Classifier>,
    node: Arc<str>,
    /// The prefix of every `event_id` of this run.
    run: String,
    next_id: u64,
    /// Socket -> (jiffies of its last send after idle, that event's id).
    reuses: HashMap<u64, (u32, u64)>,
    /// Whether the send hook attached, so that every send after idle is
    /// recorded (`send_hook_missing`).
    send_hook: bool,
}

impl Explainer {
    pub fn new(classifier: Arc<Classifier>) -> Self {
        Self {
            classifier,
            node: node_name(None).into(),
            run: format!(
                "{}-{}",
                boot_id(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |elapsed| elapsed.as_millis())
            ),
            next_id: 1,
            reuses: HashMap::new(),
            send_hook: true,
        }
    }

    /// idlemon runs degraded without the send hook (on 6.1 and 6.12 without
    /// fentry and kprobes: no `tcp:tcp_sendmsg_locked` tracepoint there), so
    /// no send after idle is recorded, and the send that a reset answered
    /// has just reset the socket's idle time. Resets are then judged by the
    /// peer's silence instead (`inferred_reuse`).
    #[must_use]
    pub fn send_hook_missing(mut self) -> Self {
        self.send_hook = false;
        self
    }

    /// Names the node in every event (the hostname otherwise).
    #[must_use]
    pub fn on_node(mut self, node: &str) -> Self {
        self.node = node.into();
        self
    }

    /// `unix_seconds` is the event's wall-clock time.
    /// The socket's last send after idle, as of `event`: its event id while
    /// that `send_after_idle` is still remembered, the idle period before it
    /// and the time from it to `event`.
    fn reuse(&self, event: &Event) -> Reuse {
        let info = &event.socket.info;
        Reuse {
            event_id: self
                .reuses
                .get(&event.socket.sock)
                .filter(|(at, _)| *at == info.reuse_at)
                .map(|(_, id)| *id),
            idle_seconds: self.classifier.seconds(info.reuse_idle),
            seconds_before: self
                .classifier
                .seconds(event.jiffies.wrapping_sub(info.reuse_at)),
        }
    }

    /// The send after idle a reset answered, where the send hook is missing:
    /// the socket sent within `REUSE_WINDOW` of the reset, after the peer
    /// had been silent (no data, no ACK) for at least the idle threshold.
    /// The kernel handles a RST (`tcp_validate_incoming` -> `tcp_reset`)
    /// before `tcp_ack` could stamp an ACK it carries, so at the reset that
    /// silence is the idle period before the send. A socket retransmitting
    /// has been sending, not idle, while its peer was silent: nothing is
    /// inferred then. With the send hook, a reset without a recorded send
    /// after idle followed no idle period, and nothing is inferred either.
    fn inferred_reuse(&self, socket: &TrackedSocket) -> Option<Reuse> {
        let silence = socket.last_receive_seconds.min(socket.last_ack_seconds);
        (!self.send_hook
            && socket.retransmits == 0
            && socket.last_send_seconds <= REUSE_WINDOW.as_secs_f64()
            && silence >= self.classifier.idle_threshold.as_secs_f64())
        .then_some(Reuse {
            event_id: None,
            idle_seconds: silence,
            seconds_before: socket.last_send_seconds,
        })
    }

    /// `EventRecord::explanation` of a death classified `idle_timeout_suspected`.
    fn explanation(&self, event: &Event, record: &EventRecord, reset: bool) -> Option<String> {
        if record.classification != Some(Classification::IdleTimeoutSuspected) {
            return None;
        }
        let idle = record.idle_before_seconds?;
        let path = self.classifier.path_behaviour_of(&event.socket)?;
        Some(path.forgot(idle, reset, event.retransmissions))
    }

    pub fn explain(&mut self, event: &Event, unix_seconds: f64) -> Option<EventRecord> {
        let kind = match event.kind {
            event_kind::RESET_RECEIVED => Kind::ResetReceived,
            event_kind::RESET_SENT => Kind::ResetSent,
            event_kind::SEND_AFTER_IDLE => Kind::SendAfterIdle,
            event_kind::KEEPALIVE_TIMEOUT => Kind::KeepaliveTimeout,
            event_kind::KEEPALIVE_ENFORCED => Kind::KeepaliveEnforced,
            event_kind::RETRANSMIT_TIMEOUT => Kind::RetransmitTimeout,
            event_kind::CONNECTION_ERROR => Kind::ConnectionError,
            event_kind::CONNECT_FAILED => Kind::ConnectFailed,
            event_kind::KEEPALIVE_WEAKENED => Kind::KeepaliveWeakened,
            _ => return None,
        };
        let id = self.next_id;
        self.next_id += 1;
        let socket = (event.socket_known != 0).then(|| self.classifier.classify(&event.socket));
        let (family, local, remote) = self.classifier.endpoints(&event.socket);
        let seconds = |jiffies: u32| self.classifier.seconds(jiffies);

        let mut record = EventRecord {
            id,
            event_id: format!("{}-{id}", self.run),
            node: Arc::clone(&self.node),
            time: humantime::format_rfc3339_millis(
                UNIX_EPOCH + Duration::from_secs_f64(unix_seconds.max(0.0)),
            )
            .to_string(),
            unix_seconds,
            kind,
            classification: None,
            family,
            local,
            remote,
            idle_since_send_seconds: socket.as_ref().map(|s| s.last_send_seconds),
            idle_since_receive_seconds: socket.as_ref().map(|s| s.last_receive_seconds),
            idle_before_seconds: None,
            reuse: None,
            explanation: None,
            error: None,
            retransmissions: None,
            reason: None,
            connect_seconds: None,
            // The socket's owner; else the process the event fired in (an
            // active reset from close(), a send).
            pid: socket
                .as_ref()
                .and_then(|s| s.pid)
                .or((event.current_tgid != 0).then_some(event.current_tgid)),
            // The task the event fired in names itself; a socket owner that
            // is another process is named from /proc with its attribution.
            comm: match socket.as_ref().and_then(|s| s.pid) {
                Some(owner) if owner != event.current_tgid => None,
                _ => (event.current_tgid != 0).then(|| comm(&event.current_comm)),
            },
            cgroup_id: socket.as_ref().and_then(|s| s.cgroup_id),
            attribution: Arc::default(),
            socket: None,
            evidence: false,
            enforcement: None,
            weakening: None,
        };
        let info = &event.socket.info;
        match kind {
            Kind::SendAfterIdle => {
                record.idle_before_seconds = Some(seconds(info.reuse_idle));
                if self.reuses.len() >= REUSE_MEMORY {
                    self.reuses.clear();
                }
                self.reuses.insert(event.socket.sock, (info.reuse_at, id));
            }
            Kind::ResetReceived | Kind::ResetSent => {
                let reuse_age = event.jiffies.wrapping_sub(info.reuse_at);
                let reuse = (event.socket_known != 0
                    && info.reuse_at != 0
                    && seconds(reuse_age) <= REUSE_WINDOW.as_secs_f64())
                .then(|| self.reuse(event))
                .or_else(|| {
                    socket
                        .as_ref()
                        .and_then(|socket| self.inferred_reuse(socket))
                });
                let idle_now = socket.as_ref().map(|s| s.idle_seconds);
                let idle_before = match (idle_now, &reuse) {
                    (Some(now), Some(reuse)) => Some(now.max(reuse.idle_seconds)),
                    (now, _) => now,
                };
                let timeout = socket.as_ref().and_then(|s| s.path_idle_timeout_seconds);
                record.classification = Some(Classification::of(idle_before, timeout));
                record.idle_before_seconds = idle_before;
                if kind == Kind::ResetReceived {
                    record.explanation = self.explanation(event, &record, true);
                }
                record.reuse = reuse;
            }
            Kind::KeepaliveTimeout | Kind::ConnectionError => {
                record.error = Some(errno_name(event.error));
            }
            Kind::KeepaliveEnforced => {
                record.enforcement = Some(enforcement(event, socket.as_ref()));
            }
            Kind::KeepaliveWeakened => {
                let weakening = Weakening::of(&event.enforcement);
                self.classifier.weakened.record(
                    event.socket.sock,
                    event.socket.local_port,
                    event.socket.remote_port,
                    weakening.clone(),
                );
                record.weakening = Some(weakening);
            }
            Kind::RetransmitTimeout => {
                record.error = Some(errno_name(event.error));
                record.retransmissions = Some(event.retransmissions);
                // The stall began with the send after idle (no ACK since,
                // as the kernel saw at the death): link it, however long
                // the retransmissions took.
                let reuse = (event.socket_known != 0
                    && event.socket.retransmitting_since_reuse != 0)
                    .then(|| self.reuse(event));
                let idle_before = reuse.as_ref().map(|reuse| reuse.idle_seconds);
                let timeout = socket.as_ref().and_then(|s| s.path_idle_timeout_seconds);
                record.classification = Some(Classification::of(idle_before, timeout));
                record.idle_before_seconds = idle_before;
                record.explanation = self.explanation(event, &record, false);
                record.reuse = reuse;
            }
            Kind::ConnectFailed => {
                record.error = Some(errno_name(event.error));
                record.reason = Some(ConnectFailure::of(event.error));
                record.retransmissions = Some(event.retransmissions);
                record.connect_seconds = Some(connect_seconds(event.connect_ms));
                // A socket that never connected has no idle times to show.
                record.idle_since_send_seconds = None;
                record.idle_since_receive_seconds = None;
                record.socket = None;
                record.evidence = false;
                return Some(record);
            }
        }
        record.socket = socket;
        record.evidence = record.is_evidence(self.classifier.idle_threshold);
        Some(record)
    }
}

/// The node's name: `flag` (`--node-name`), else the hostname.
pub fn node_name(flag: Option<&str>) -> String {
    if let Some(name) = flag.filter(|name| !name.is_empty()) {
        return name.to_owned();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The kernel's random id of this boot, without dashes (32 hex digits).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().replace('-', ""))
        .ok()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| "noboot".to_owned())
}

fn errno_name(errno: u32) -> String {
    match errno as i32 {
        libc::ETIMEDOUT => "ETIMEDOUT".to_owned(),
        libc::EHOSTUNREACH => "EHOSTUNREACH".to_owned(),
        libc::ENETUNREACH => "ENETUNREACH".to_owned(),
        libc::ECONNRESET => "ECONNRESET".to_owned(),
        libc::ECONNREFUSED => "ECONNREFUSED".to_owned(),
        libc::ECONNABORTED => "ECONNABORTED".to_owned(),
        libc::EHOSTDOWN => "EHOSTDOWN".to_owned(),
        libc::ENONET => "ENONET".to_owned(),
        libc::ENOPROTOOPT => "ENOPROTOOPT".to_owned(),
        libc::EPIPE => "EPIPE".to_owned(),
        other => format!("errno {other}"),
    }
}

/// Seconds from the first SYN to a failed connect. The kernel's stamp is
/// in milliseconds unless the route has the `tcp_usec_ts` feature (then in
/// microseconds, and the difference is meaningless): a connect gives up
/// within minutes even at the largest `tcp_syn_retries`, so a longer one is
/// unknown.
fn connect_seconds(connect_ms: u32) -> Option<f64> {
    const LONGEST_MS: u32 = 3_600_000;
    (connect_ms <= LONGEST_MS).then(|| f64::from(connect_ms) / 1000.0)
}

/// A bounded queue of events in id order that, when full, gives up the
/// oldest ordinary event first: evidence (`EventRecord::evidence`) goes only
/// to make room for newer evidence. A flood of unrelated resets (a port
/// scan, a crash loop) cannot push out the reset that explains an incident.
#[derive(Default)]
pub struct Ranked {
    evidence: VecDeque<Arc<EventRecord>>,
    ordinary: VecDeque<Arc<EventRecord>>,
}

impl Ranked {
    pub fn len(&self) -> usize {
        self.evidence.len() + self.ordinary.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `record` (whose id is above every held one) within `capacity`;
    /// returns the event that made way, or `record` itself when everything
    /// held outranks it.
    pub fn push(&mut self, record: Arc<EventRecord>, capacity: usize) -> Option<Arc<EventRecord>> {
        let mut dropped = None;
        if self.len() >= capacity.max(1) {
            dropped = match self.ordinary.pop_front() {
                Some(oldest) => Some(oldest),
                None if record.evidence => self.evidence.pop_front(),
                None => return Some(record),
            };
        }
        if record.evidence {
            self.evidence.push_back(record);
        } else {
            self.ordinary.push_back(record);
        }
        dropped
    }

    /// The oldest event.
    pub fn pop(&mut self) -> Option<Arc<EventRecord>> {
        match (self.evidence.front(), self.ordinary.front()) {
            (Some(evidence), Some(ordinary)) if ordinary.id < evidence.id => {
                self.ordinary.pop_front()
            }
            (Some(_), _) => self.evidence.pop_front(),
            (None, _) => self.ordinary.pop_front(),
        }
    }

    /// Every event, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<EventRecord>> {
        let (mut evidence, mut ordinary) = (
            self.evidence.iter().peekable(),
            self.ordinary.iter().peekable(),
        );
        std::iter::from_fn(move || match (evidence.peek(), ordinary.peek()) {
            (Some(e), Some(o)) if o.id < e.id => ordinary.next(),
            (Some(_), _) => evidence.next(),
            (None, _) => ordinary.next(),
        })
    }
}

/// The bounded in-memory history behind `GET /events`.
pub struct History {
    events: Mutex<Ranked>,
    capacity: usize,
    latest: watch::Sender<u64>,
}

impl History {
    pub fn new(capacity: usize) -> Self {
        Self {
            events: Mutex::new(Ranked::default()),
            capacity: capacity.max(1),
            latest: watch::channel(0).0,
        }
    }

    pub fn push(&self, record: Arc<EventRecord>) {
        let id = record.id;
        if let Ok(mut events) = self.events.lock() {
            events.push(record, self.capacity);
        }
        self.latest.send_replace(id);
    }

    /// Events newer than `since` (unix seconds) and with id above `after`,
    /// oldest first, at most `limit`.
    pub fn query(
        &self,
        since: Option<f64>,
        after: Option<u64>,
        limit: usize,
    ) -> Vec<Arc<EventRecord>> {
        let Ok(events) = self.events.lock() else {
            return Vec::new();
        };
        events
            .iter()
            .filter(|event| since.is_none_or(|since| event.unix_seconds > since))
            .filter(|event| after.is_none_or(|after| event.id > after))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Changes whenever an event arrives; its value is the newest id.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

/// Wall-clock time of a CLOCK_MONOTONIC stamp from `bpf_ktime_get_ns()`.
pub fn wall_clock(monotonic_ns: u64) -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let monotonic_now = now.tv_sec as f64 + now.tv_nsec as f64 / 1e9;
    let wall_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64());
    wall_now - (monotonic_now - monotonic_ns as f64 / 1e9)
}

/// Parses `since`: unix seconds or an RFC 3339 time.
pub fn parse_since(text: &str) -> Result<f64, String> {
    if let Ok(seconds) = text.parse::<f64>()
        && seconds.is_finite()
    {
        return Ok(seconds);
    }
    humantime::parse_rfc3339_weak(text)
        .map_err(|_| format!("`{text}` is neither unix seconds nor an RFC 3339 time"))?
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .map_err(|_| format!("`{text}` is before 1970"))
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, time::Duration};

    use monitor_common::{AF_INET, SocketRecord};

    use super::*;
    use crate::config::{IdleTimeout, PathConfig};

    const HZ: u32 = 100;

    fn explainer() -> Explainer {
        Explainer::new(Arc::new(Classifier {
            hz: HZ,
            idle_threshold: Duration::from_secs(2),
            default_timeout: IdleTimeout::After(NonZeroU32::new(5).expect("non-zero")),
            paths: PathConfig::default(),
            keepalive_timer_seen: false,
            weakened: Default::default(),
        }))
    }

    fn event(kind: u8, send_age: u32, recv_age: u32) -> Event {
        let mut socket = SocketRecord {
            sock: 0xffff_0000_0000_1000,
            family: AF_INET,
            local_port: 40000,
            remote_port: 80,
            state: 1,
            last_send_age: send_age * HZ,
            last_recv_age: recv_age * HZ,
            last_ack_age: recv_age * HZ,
            ns_keepalive_time: 7200 * HZ,
            info_known: 1,
            ..SocketRecord::default()
        };
        socket.remote_addr[..4].copy_from_slice(&[198, 51, 100, 2]);
        socket.local_addr[..4].copy_from_slice(&[192, 0, 2, 2]);
        socket.info.owner_tgid = 77;
        Event {
            time_ns: 0,
            jiffies: 100_000,
            current_tgid: 0,
            kind,
            socket_known: 1,
            _pad: [0; 2],
            error: 0,
            current_comm: [0; 16],
            socket,
            enforcement: monitor_common::KeepaliveDecision::default(),
            retransmissions: 0,
            connect_ms: 0,
        }
    }

    #[test]
    fn an_enforcement_reports_the_settings_before_and_after() {
        use monitor_common::{KeepaliveDecision, enforce};
        let mut explainer = explainer();
        let mut decided = event(event_kind::KEEPALIVE_ENFORCED, 0, 0);
        decided.enforcement = KeepaliveDecision {
            reason: enforce::reason::NO_KEEPALIVE,
            mode: enforce::MODE_ON,
            idle_seconds: 175,
            interval_seconds: 30,
            count: 5,
            path_timeout_seconds: 350,
            ..KeepaliveDecision::default()
        };
        let record = explainer.explain(&decided, 1_000.0).expect("known kind");
        assert_eq!(record.kind, Kind::KeepaliveEnforced);
        let enforcement = record.enforcement.expect("an enforcement");
        assert_eq!(
            (enforcement.mode, enforcement.reason),
            ("on", "no_keepalive")
        );
        assert!(enforcement.applied);
        assert_eq!(enforcement.direction, "outbound");
        let (old, new) = (enforcement.old.unwrap(), enforcement.new.unwrap());
        assert!(!old.enabled);
        assert_eq!(old.idle_seconds, 7200.0);
        assert!(new.enabled);
        assert_eq!(
            (new.idle_seconds, new.interval_seconds, new.count),
            (175.0, 30.0, 5)
        );

        // A dry run decides the same and applies nothing; a sufficient
        // keepalive stays as it was.
        decided.enforcement.mode = enforce::MODE_DRY_RUN;
        let dry = explainer
            .explain(&decided, 1_000.0)
            .unwrap()
            .enforcement
            .unwrap();
        assert_eq!((dry.mode, dry.applied), ("dry_run", false));
        assert_eq!(dry.new.unwrap().idle_seconds, 175.0);
        decided.enforcement.reason = enforce::reason::KEEPALIVE_SUFFICIENT;
        let kept = explainer
            .explain(&decided, 1_000.0)
            .unwrap()
            .enforcement
            .unwrap();
        assert_eq!(kept.old, kept.new);
    }

    #[test]
    fn reset_after_reuse_of_an_idle_socket_is_an_idle_timeout() {
        let mut explainer = explainer();
        let mut send = event(event_kind::SEND_AFTER_IDLE, 8, 8);
        send.socket.info.reuse_at = 100_000;
        send.socket.info.reuse_idle = 8 * HZ;
        let send = explainer.explain(&send, 1_000.0).expect("known kind");
        assert_eq!(send.kind, Kind::SendAfterIdle);
        assert_eq!(send.idle_before_seconds, Some(8.0));

        // The RST comes 30 ms later: the send reset lastsnd, lastrcv is 8 s old.
        let mut reset = event(event_kind::RESET_RECEIVED, 0, 8);
        reset.jiffies = 100_003;
        reset.socket.info.reuse_at = 100_000;
        reset.socket.info.reuse_idle = 8 * HZ;
        let reset = explainer.explain(&reset, 1_000.03).expect("known kind");
        assert_eq!(
            reset.classification,
            Some(Classification::IdleTimeoutSuspected)
        );
        assert_eq!(reset.idle_since_send_seconds, Some(0.0));
        assert_eq!(reset.idle_since_receive_seconds, Some(8.0));
        assert_eq!(reset.idle_before_seconds, Some(8.0));
        let reuse = reset.reuse.expect("linked to the send");
        assert_eq!(reuse.event_id, Some(send.id));
        assert_eq!(reuse.seconds_before, 0.03);
        // A RST arrives in softirq: the owner's name comes from /proc later.
        assert_eq!(reset.pid, Some(77));
        assert_eq!(reset.comm, None);
        assert_eq!(reset.remote.to_string(), "198.51.100.2:80");
    }

    #[test]
    fn reset_on_a_busy_socket_is_other() {
        let reset = explainer()
            .explain(&event(event_kind::RESET_RECEIVED, 0, 0), 0.0)
            .expect("known kind");
        assert_eq!(reset.classification, Some(Classification::Other));
        assert_eq!(reset.reuse, None);
    }

    #[test]
    fn reset_on_a_long_idle_socket_is_an_idle_timeout_without_reuse() {
        let reset = explainer()
            .explain(&event(event_kind::RESET_RECEIVED, 6, 7), 0.0)
            .expect("known kind");
        assert_eq!(
            reset.classification,
            Some(Classification::IdleTimeoutSuspected)
        );
        assert_eq!(reset.idle_before_seconds, Some(6.0));
    }

    /// A client idle 6 s sends; the NAT, whose timeout is 5 s, answers with
    /// a RST at once: the send made the socket's idle time 0, and only the
    /// send hook records the send after idle.
    fn reset_answering_a_send_after_a_silent_peer(peer_silent: u32) -> Event {
        let mut reset = event(event_kind::RESET_RECEIVED, 0, peer_silent);
        reset.socket.last_send_age = 3;
        reset
    }

    #[test]
    fn without_the_send_hook_a_reset_after_a_silent_peer_is_an_idle_timeout() {
        let reset = explainer()
            .send_hook_missing()
            .explain(&reset_answering_a_send_after_a_silent_peer(6), 0.0)
            .expect("known kind");
        assert_eq!(
            reset.classification,
            Some(Classification::IdleTimeoutSuspected)
        );
        assert_eq!(reset.idle_before_seconds, Some(6.0));
        assert_eq!(reset.idle_since_send_seconds, Some(0.03));
        assert_eq!(
            reset.reuse,
            Some(Reuse {
                event_id: None,
                idle_seconds: 6.0,
                seconds_before: 0.03
            })
        );
        assert!(reset.evidence);
    }

    #[test]
    fn with_the_send_hook_a_reset_without_a_send_after_idle_stays_other() {
        let reset = explainer()
            .explain(&reset_answering_a_send_after_a_silent_peer(6), 0.0)
            .expect("known kind");
        assert_eq!(reset.classification, Some(Classification::Other));
        assert_eq!(reset.idle_before_seconds, Some(0.03));
        assert_eq!(reset.reuse, None);
    }

    #[test]
    fn a_reset_after_the_peer_spoke_is_other_with_or_without_the_send_hook() {
        for mut explainer in [explainer(), explainer().send_hook_missing()] {
            let reset = explainer
                .explain(&reset_answering_a_send_after_a_silent_peer(1), 0.0)
                .expect("known kind");
            assert_eq!(reset.classification, Some(Classification::Other));
            assert_eq!(reset.reuse, None);
        }
        // An ACK is the peer speaking too, though it sent no data.
        let mut acked = reset_answering_a_send_after_a_silent_peer(6);
        acked.socket.last_ack_age = HZ;
        let reset = explainer()
            .send_hook_missing()
            .explain(&acked, 0.0)
            .expect("known kind");
        assert_eq!(reset.classification, Some(Classification::Other));
    }

    #[test]
    fn without_the_send_hook_a_retransmitting_socket_was_not_idle() {
        let mut stalled = reset_answering_a_send_after_a_silent_peer(6);
        stalled.socket.retransmits = 4;
        let reset = explainer()
            .send_hook_missing()
            .explain(&stalled, 0.0)
            .expect("known kind");
        assert_eq!(reset.classification, Some(Classification::Other));
        assert_eq!(reset.reuse, None);
    }

    #[test]
    fn an_old_reuse_is_not_linked() {
        let mut reset = event(event_kind::RESET_RECEIVED, 0, 0);
        reset.socket.info.reuse_at = 100_000 - 60 * HZ;
        reset.socket.info.reuse_idle = 8 * HZ;
        let reset = explainer().explain(&reset, 0.0).expect("known kind");
        assert_eq!(reset.reuse, None);
        assert_eq!(reset.classification, Some(Classification::Other));
    }

    #[test]
    fn reset_without_a_socket_has_addresses_only() {
        let mut sent = event(event_kind::RESET_SENT, 0, 0);
        sent.socket_known = 0;
        let sent = explainer().explain(&sent, 0.0).expect("known kind");
        assert_eq!(sent.socket, None);
        assert_eq!(sent.classification, Some(Classification::Other));
        assert_eq!(sent.local.to_string(), "192.0.2.2:40000");
        assert_eq!(sent.idle_since_send_seconds, None);
    }

    #[test]
    fn an_active_reset_names_the_closing_process() {
        let mut sent = event(event_kind::RESET_SENT, 0, 0);
        sent.socket.info_known = 0;
        sent.current_tgid = 4321;
        sent.current_comm = *b"nginx\0\0\0\0\0\0\0\0\0\0\0";
        let sent = explainer().explain(&sent, 0.0).expect("known kind");
        assert_eq!(sent.pid, Some(4321));
        assert_eq!(sent.comm.as_deref(), Some("nginx"));
    }

    #[test]
    fn keepalive_deaths_name_the_error() {
        let mut death = event(event_kind::KEEPALIVE_TIMEOUT, 3, 3);
        death.error = libc::ETIMEDOUT as u32;
        let death = explainer().explain(&death, 0.0).expect("known kind");
        assert_eq!(death.error.as_deref(), Some("ETIMEDOUT"));
    }

    fn explainer_with(config: &str) -> Explainer {
        Explainer::new(Arc::new(Classifier {
            hz: HZ,
            idle_threshold: Duration::from_secs(2),
            default_timeout: IdleTimeout::After(NonZeroU32::new(5).expect("non-zero")),
            paths: PathConfig::parse(config, "test.toml").expect("valid config"),
            keepalive_timer_seen: false,
            weakened: Default::default(),
        }))
    }

    /// A death after 400 s idle (a send after idle, then no ACK) on a path
    /// of `kind`, explained in that kind's words.
    fn explained_death(config: &str, kind: u8) -> EventRecord {
        let mut explainer = explainer_with(config);
        let mut death = event(kind, 0, 400);
        death.jiffies = 100_000 + 20 * HZ;
        death.error = libc::ETIMEDOUT as u32;
        death.retransmissions = 6;
        death.socket.retransmitting_since_reuse = 1;
        death.socket.info.reuse_at = 100_000 + 19 * HZ;
        death.socket.info.reuse_idle = 400 * HZ;
        explainer.explain(&death, 1_000.0).expect("known kind")
    }

    #[test]
    fn deaths_are_explained_in_the_words_of_the_path_kind() {
        const GWLB: &str = "[[path]]\ncidr = \"198.51.100.0/24\"\nkind = \"gwlb\"\n";
        let death = explained_death(GWLB, event_kind::RETRANSMIT_TIMEOUT);
        assert_eq!(
            death.explanation.as_deref(),
            Some(
                "the GWLB forgot the flow after 400 s idle (its timeout: 350 s) and dropped the next packet; the kernel retransmitted it 6 times, then gave up with ETIMEDOUT"
            )
        );
        let socket = death.socket.expect("socket");
        assert_eq!(socket.path_kind, Some("gwlb"));
        assert_eq!(socket.path_on_idle, Some("drop"));
        // A reset is not what a dropping GWLB sends: the explanation says so.
        let reset = explained_death(GWLB, event_kind::RESET_RECEIVED);
        assert!(
            reset.explanation.as_deref().is_some_and(|text| text
                .contains("drops forgotten flows without a reset: this reset came from elsewhere")),
            "{:?}",
            reset.explanation
        );

        let nat = "[[path]]\ncidr = \"198.51.100.0/24\"\nkind = \"nat_gateway\"\n";
        let reset = explained_death(nat, event_kind::RESET_RECEIVED);
        assert_eq!(
            reset.explanation.as_deref(),
            Some(
                "the NAT gateway forgot the flow after 400 s idle (its timeout: 350 s) and answered the next packet with a reset"
            )
        );
        // A reset GWLB whose RST never came.
        let reset_gwlb =
            "[[path]]\ncidr = \"198.51.100.0/24\"\nkind = \"gwlb\"\non_idle = \"reset\"\n";
        let death = explained_death(reset_gwlb, event_kind::RETRANSMIT_TIMEOUT);
        assert!(
            death
                .explanation
                .as_deref()
                .is_some_and(|text| text.starts_with("the GWLB forgot the flow")
                    && text.contains("none arrived")),
            "{:?}",
            death.explanation
        );
        // Without a kind: the path's middlebox, resetting (the default path too).
        let death = explained_death("", event_kind::RESET_RECEIVED);
        assert!(
            death
                .explanation
                .as_deref()
                .is_some_and(|text| text.starts_with(
                    "the path's middlebox forgot the flow after 400 s idle (its timeout: 5 s)"
                )),
            "{:?}",
            death.explanation
        );
        // A path without a timeout explains nothing, and is classified other.
        let none = "[[path]]\ncidr = \"198.51.100.0/24\"\nkind = \"none\"\n";
        let death = explained_death(none, event_kind::RETRANSMIT_TIMEOUT);
        assert_eq!(death.classification, Some(Classification::Other));
        assert_eq!(death.explanation, None);
        let socket = death.socket.expect("socket");
        assert_eq!(
            (socket.path_kind, socket.path_on_idle),
            (Some("none"), None)
        );
    }

    /// The path forgot the flow and dropped what followed: the send after
    /// 8 s idle (the path's timeout is 5 s) was retransmitted until the
    /// kernel gave up 12 s later.
    #[test]
    fn a_retransmit_timeout_after_a_send_after_idle_is_linked_and_classified() {
        let mut explainer = explainer();
        let mut send = event(event_kind::SEND_AFTER_IDLE, 8, 8);
        send.socket.info.reuse_at = 100_000;
        send.socket.info.reuse_idle = 8 * HZ;
        let send = explainer.explain(&send, 1_000.0).expect("known kind");

        let mut death = event(event_kind::RETRANSMIT_TIMEOUT, 0, 20);
        death.jiffies = 100_000 + 12 * HZ;
        death.error = libc::ETIMEDOUT as u32;
        death.retransmissions = 6;
        death.socket.retransmits = 6;
        death.socket.retransmitting_since_reuse = 1;
        death.socket.info.reuse_at = 100_000;
        death.socket.info.reuse_idle = 8 * HZ;
        let death = explainer.explain(&death, 1_012.0).expect("known kind");
        assert_eq!(death.kind, Kind::RetransmitTimeout);
        assert_eq!(
            death.classification,
            Some(Classification::IdleTimeoutSuspected)
        );
        assert_eq!(death.error.as_deref(), Some("ETIMEDOUT"));
        assert_eq!(death.retransmissions, Some(6));
        assert_eq!(death.idle_before_seconds, Some(8.0));
        let reuse = death.reuse.as_ref().expect("linked to the send");
        assert_eq!(reuse.event_id, Some(send.id));
        assert_eq!(reuse.seconds_before, 12.0);
        assert!(death.evidence);
        let socket = death.socket.expect("socket");
        assert!(socket.retransmitting_since_send_after_idle);
        assert_eq!(socket.retransmits, 6);
    }

    #[test]
    fn a_retransmit_timeout_without_a_send_after_idle_is_other() {
        let mut death = event(event_kind::RETRANSMIT_TIMEOUT, 0, 20);
        death.error = libc::ETIMEDOUT as u32;
        death.retransmissions = 6;
        // Acked since its last send after idle: the stall began later.
        death.socket.info.reuse_at = 100_000 - 60 * HZ;
        death.socket.info.reuse_idle = 8 * HZ;
        let death = explainer().explain(&death, 0.0).expect("known kind");
        assert_eq!(death.classification, Some(Classification::Other));
        assert_eq!(death.reuse, None);
        assert_eq!(death.idle_before_seconds, None);
        // Never shed: each one needs explaining.
        assert!(death.evidence);
    }

    #[test]
    fn a_retransmit_timeout_after_a_short_idle_is_other() {
        let mut death = event(event_kind::RETRANSMIT_TIMEOUT, 0, 20);
        death.socket.retransmits = 4;
        death.socket.retransmitting_since_reuse = 1;
        death.socket.info.reuse_at = 100_000 - 10 * HZ;
        // 3 s idle, below the path's 5 s.
        death.socket.info.reuse_idle = 3 * HZ;
        let death = explainer().explain(&death, 0.0).expect("known kind");
        assert_eq!(death.classification, Some(Classification::Other));
        assert_eq!(death.reuse.map(|reuse| reuse.idle_seconds), Some(3.0));
    }

    #[test]
    fn other_deaths_carry_their_error() {
        let mut death = event(event_kind::CONNECTION_ERROR, 0, 0);
        death.error = libc::EHOSTUNREACH as u32;
        let death = explainer().explain(&death, 0.0).expect("known kind");
        assert_eq!(death.kind, Kind::ConnectionError);
        assert_eq!(death.error.as_deref(), Some("EHOSTUNREACH"));
        assert_eq!(death.classification, None);
    }

    #[test]
    fn failed_connects_say_why_how_long_and_who() {
        for (errno, reason) in [
            (libc::ETIMEDOUT, ConnectFailure::Timeout),
            (libc::ECONNREFUSED, ConnectFailure::Refused),
            (libc::EHOSTUNREACH, ConnectFailure::Unreachable),
            (libc::ENETUNREACH, ConnectFailure::Unreachable),
            (libc::ECONNRESET, ConnectFailure::Reset),
        ] {
            let mut failed = event(event_kind::CONNECT_FAILED, 0, 0);
            failed.socket.state = 2;
            failed.error = errno as u32;
            failed.retransmissions = 2;
            failed.connect_ms = 7_012;
            let failed = explainer().explain(&failed, 0.0).expect("known kind");
            assert_eq!(failed.reason, Some(reason));
            assert_eq!(failed.retransmissions, Some(2));
            assert_eq!(failed.connect_seconds, Some(Some(7.012)));
            assert_eq!(failed.remote.to_string(), "198.51.100.2:80");
            // The connecting process, recorded at connect().
            assert_eq!(failed.pid, Some(77));
            // A socket that never connected has no idle times.
            assert_eq!(failed.socket, None);
            assert_eq!(failed.idle_since_send_seconds, None);
            assert_eq!(failed.classification, None);
        }
        // A stamp in microseconds (tcp_usec_ts routes) is no duration.
        let mut failed = event(event_kind::CONNECT_FAILED, 0, 0);
        failed.error = libc::ETIMEDOUT as u32;
        failed.connect_ms = 4_000_000_000;
        let failed = explainer().explain(&failed, 0.0).expect("known kind");
        assert_eq!(failed.connect_seconds, Some(None));
    }

    #[test]
    fn unknown_kinds_are_skipped() {
        assert_eq!(explainer().explain(&event(99, 0, 0), 0.0), None);
    }

    #[test]
    fn history_is_bounded_and_filters() {
        let history = History::new(3);
        let mut explainer = explainer();
        for second in 0..5 {
            let record = explainer
                .explain(&event(event_kind::RESET_SENT, 0, 0), f64::from(second))
                .expect("known kind");
            history.push(Arc::new(record));
        }
        let all = history.query(None, None, 100);
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(history.query(Some(3.0), None, 100).len(), 1);
        assert_eq!(history.query(None, Some(3), 100).len(), 2);
        assert_eq!(history.query(None, None, 1)[0].id, 3);
        assert_eq!(*history.subscribe().borrow(), 5);
    }

    #[test]
    fn a_flood_of_ordinary_events_does_not_push_out_evidence() {
        let history = History::new(4);
        let mut explainer = explainer();
        // An idle-timeout reset (idle 6 s, threshold 2 s), then a flood of
        // resets on busy sockets.
        let evidence = explainer
            .explain(&event(event_kind::RESET_RECEIVED, 6, 7), 0.0)
            .expect("known kind");
        assert!(evidence.evidence);
        history.push(Arc::new(evidence));
        for _ in 0..100 {
            let ordinary = explainer
                .explain(&event(event_kind::RESET_SENT, 0, 0), 0.0)
                .expect("known kind");
            assert!(!ordinary.evidence);
            history.push(Arc::new(ordinary));
        }
        let kept = history.query(None, None, 100);
        assert_eq!(
            kept.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![1, 99, 100, 101]
        );
        // Evidence makes way only for newer evidence.
        for _ in 0..4 {
            let newer = explainer
                .explain(&event(event_kind::SEND_AFTER_IDLE, 8, 8), 0.0)
                .expect("known kind");
            history.push(Arc::new(newer));
        }
        let kept = history.query(None, None, 100);
        assert_eq!(
            kept.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![102, 103, 104, 105]
        );
    }

    #[test]
    fn a_full_queue_refuses_ordinary_events_and_pops_in_id_order() {
        let mut queue = Ranked::default();
        let mut explainer = explainer();
        let mut explain = |kind, idle| {
            Arc::new(
                explainer
                    .explain(&event(kind, idle, idle), 0.0)
                    .expect("known kind"),
            )
        };
        assert!(queue.push(explain(event_kind::RESET_SENT, 0), 2).is_none());
        assert!(
            queue
                .push(explain(event_kind::RESET_RECEIVED, 6), 2)
                .is_none()
        );
        // Full: the ordinary id 1 makes way for evidence id 3.
        let dropped = queue
            .push(explain(event_kind::RESET_RECEIVED, 6), 2)
            .expect("full");
        assert_eq!(dropped.id, 1);
        // Full of evidence: an ordinary event is itself refused.
        let refused = queue
            .push(explain(event_kind::RESET_SENT, 0), 2)
            .expect("full");
        assert_eq!(refused.id, 4);
        assert_eq!(queue.pop().map(|e| e.id), Some(2));
        assert_eq!(queue.pop().map(|e| e.id), Some(3));
        assert!(queue.pop().is_none() && queue.is_empty());
    }

    #[test]
    fn since_accepts_unix_seconds_and_rfc3339() {
        assert_eq!(parse_since("1700000000.5"), Ok(1_700_000_000.5));
        assert_eq!(parse_since("2023-11-14T22:13:20Z"), Ok(1_700_000_000.0));
        assert!(parse_since("yesterday").is_err());
    }
}
