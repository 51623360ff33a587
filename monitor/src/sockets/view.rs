//! The API's view: a snapshot's socket as `GET /sockets` and the events
//! write it (JSON), and the filters of `GET /sockets`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
};

use monitor_common::{AF_INET, SocketRecord};
use serde::Serialize;

use super::{Classifier, NO_OWNER, Owner, PathRule, Risk, Socket, address};
use crate::{
    attribution::Attribution,
    config::{PathBehaviour, PathKind},
    events::Weakening,
    fix::{self, Fix},
};

/// Sockets whose application weakened the keepalive idlemon enforced, by
/// the socket's address with its ports (an address is reused once a socket
/// closes): the `keepalive_weakened` events record them, /sockets shows
/// them. Bounded: when full, it starts over (the events stay).
#[derive(Debug, Default)]
pub struct Weakenings(Mutex<HashMap<u64, (u16, u16, Weakening)>>);

/// Entries `Weakenings` holds at most.
const WEAKENINGS_MAX: usize = 65_536;

impl Weakenings {
    pub fn record(&self, sock: u64, local_port: u16, remote_port: u16, weakening: Weakening) {
        if let Ok(mut weakenings) = self.0.lock() {
            if weakenings.len() >= WEAKENINGS_MAX {
                weakenings.clear();
            }
            weakenings.insert(sock, (local_port, remote_port, weakening));
        }
    }

    fn of(&self, sock: u64, local_port: u16, remote_port: u16) -> Option<Weakening> {
        let weakenings = self.0.lock().ok()?;
        let (local, remote, weakening) = weakenings.get(&sock)?;
        (*local == local_port && *remote == remote_port).then(|| weakening.clone())
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
    /// The application turned off, or slowed, the keepalive idlemon
    /// enforced on this socket (the last such setsockopt); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_weakened: Option<Weakening>,
    /// The process that connected or last sent, where the hooks saw it.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup_id: Option<u64>,
    /// Its cgroup, container and pod.
    #[serde(flatten)]
    pub attribution: Arc<Attribution>,
}

impl Classifier {
    /// Family name and both ends of a record.
    pub fn endpoints(&self, record: &SocketRecord) -> (&'static str, SocketAddr, SocketAddr) {
        let is_ipv6 = record.family != AF_INET;
        (
            if is_ipv6 { "ipv6" } else { "ipv4" },
            SocketAddr::new(address(is_ipv6, &record.local_addr), record.local_port),
            SocketAddr::new(address(is_ipv6, &record.remote_addr), record.remote_port),
        )
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
            keepalive_weakened: self.weakened.of(
                socket.sock,
                socket.local_port,
                socket.remote_port,
            ),
            pid: owner.map(|owner| owner.pid),
            comm: owner.and_then(|owner| owner.comm.clone()),
            cgroup_id: owner.and_then(|owner| owner.cgroup_id),
            attribution,
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
