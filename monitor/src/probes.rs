//! Loading and attaching: one declarative table of hooks, each with the attach
//! kinds to try in order of preference and what is lost if none fits.
//!
//! Feature probes mislead (aya's `is_program_supported(KProbe)` says yes on
//! kernels without kprobes; its Tracing probe says no where tp_btf works), so
//! each candidate is simply loaded and attached, and the error decides.

use std::fmt;

use anyhow::{Context as _, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{BtfTracePoint, FEntry, Iter, KProbe, RawTracePoint, TracePoint, links::FdLink},
};
use clap::ValueEnum;
use monitor_common::{KernelLayout, SocketInfo};
use serde::Serialize;

use crate::kernel::btf::KernelBtf;
use tracing::{info, warn};

/// How a program is attached, from most to least preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachKind {
    Fentry,
    Kprobe,
    #[value(name = "tp_btf")]
    TpBtf,
    #[value(name = "raw_tp")]
    RawTp,
    Tracepoint,
    /// A cgroup `sock_ops` program (keepalive enforcement).
    #[value(name = "sock_ops")]
    SockOps,
    /// A `cgroup/setsockopt` program (an application's weakening of an
    /// enforced socket's keepalive).
    #[value(name = "cgroup_sockopt")]
    CgroupSockopt,
    /// An iterator (keepalive enforcement of existing connections).
    Iter,
}

impl AttachKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::TpBtf => "tp_btf",
            Self::RawTp => "raw_tp",
            Self::Tracepoint => "tracepoint",
            Self::SockOps => "sock_ops",
            Self::CgroupSockopt => "cgroup_sockopt",
            Self::Iter => "iter",
        }
    }
}

impl fmt::Display for AttachKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One way to attach a hook: the program in the eBPF object, and the kernel
/// function or tracepoint (`category/name` for classic tracepoints).
pub struct Candidate {
    pub kind: AttachKind,
    pub program: &'static str,
    pub target: &'static str,
}

/// What happens when no candidate of a hook attaches.
pub enum IfNoneFits {
    /// idlemon cannot do its job: exit with the reasons.
    Fail,
    /// Run on, not ready: say in logs, metrics and /readyz what is lost.
    Degrade(&'static str),
    /// Run on and stay ready: the hook only adds detail that many kernels
    /// cannot give (logged, and visible as kind="none" in idlemon_probe_info).
    Optional(&'static str),
}

pub struct Hook {
    pub name: &'static str,
    pub candidates: &'static [Candidate],
    pub if_none: IfNoneFits,
}

const fn candidate(kind: AttachKind, program: &'static str, target: &'static str) -> Candidate {
    Candidate {
        kind,
        program,
        target,
    }
}

use AttachKind::{Fentry, Kprobe, RawTp, TpBtf, Tracepoint};

/// Keepalive enforcement's programs, attached by `monitor/src/enforce` to
/// the selected cgroups (and the walk, per network namespace) only when
/// `--enforce-keepalive` is not off. The target is the attach point's kind.
pub const ENFORCE_HOOKS: &[Hook] = &[
    Hook {
        name: "enforce",
        candidates: &[candidate(
            AttachKind::SockOps,
            "enforce_keepalive",
            "cgroup",
        )],
        if_none: IfNoneFits::Degrade(
            "keepalive enforcement is off: it needs cgroup v2 and sock_ops with bpf_setsockopt (Linux 5.9+)",
        ),
    },
    Hook {
        name: "enforce_setsockopt",
        candidates: &[candidate(
            AttachKind::CgroupSockopt,
            "enforce_setsockopt",
            "cgroup",
        )],
        if_none: IfNoneFits::Optional(
            "an application's weakening of an enforced socket's keepalive is not seen",
        ),
    },
    Hook {
        name: "enforce_existing",
        candidates: &[candidate(AttachKind::Iter, "enforce_existing", "tcp")],
        if_none: IfNoneFits::Optional("connections older than idlemon are not enforced"),
    },
];

/// What is lost without enforcement hook `name` (`ENFORCE_HOOKS`).
#[must_use]
pub fn enforce_hook_lost(name: &str) -> Option<&'static str> {
    ENFORCE_HOOKS
        .iter()
        .find(|hook| hook.name == name)
        .and_then(|hook| match hook.if_none {
            IfNoneFits::Fail => None,
            IfNoneFits::Degrade(lost) | IfNoneFits::Optional(lost) => Some(lost),
        })
}

/// Every hook idlemon uses. The socket walk (`iter/tcp`) is not here: it has
/// a single form and idlemon cannot run without it.
pub const HOOKS: &[Hook] = &[
    Hook {
        name: "state",
        candidates: &[
            candidate(TpBtf, "state_tp_btf", "inet_sock_set_state"),
            candidate(RawTp, "state_raw_tp", "inet_sock_set_state"),
            candidate(Tracepoint, "state_tracepoint", "sock/inet_sock_set_state"),
        ],
        if_none: IfNoneFits::Fail,
    },
    Hook {
        name: "destroy",
        candidates: &[
            candidate(TpBtf, "destroy_tp_btf", "tcp_destroy_sock"),
            candidate(RawTp, "destroy_raw_tp", "tcp_destroy_sock"),
        ],
        if_none: IfNoneFits::Degrade(
            "socket table entries are removed only when the state hook sees the socket close",
        ),
    },
    Hook {
        name: "send",
        candidates: &[
            candidate(Fentry, "send_fentry", "tcp_sendmsg"),
            candidate(Kprobe, "send_kprobe", "tcp_sendmsg"),
            candidate(TpBtf, "send_tp_btf", "tcp_sendmsg_locked"),
            candidate(RawTp, "send_raw_tp", "tcp_sendmsg_locked"),
        ],
        if_none: IfNoneFits::Degrade(
            "server sockets are not attributed to a process, and reuse after idle is not counted \
             (a reset after idle is judged by the peer's silence before it)",
        ),
    },
    Hook {
        name: "receive",
        candidates: &[
            candidate(Fentry, "receive_fentry", "tcp_rcv_established"),
            candidate(Kprobe, "receive_kprobe", "tcp_rcv_established"),
            candidate(TpBtf, "receive_tp_btf", "tcp_probe"),
            candidate(RawTp, "receive_raw_tp", "tcp_probe"),
        ],
        if_none: IfNoneFits::Degrade(
            "answered keepalive probes and traffic after idle are not counted",
        ),
    },
    Hook {
        name: "reset_received",
        candidates: &[
            candidate(TpBtf, "reset_received_tp_btf", "tcp_receive_reset"),
            candidate(RawTp, "reset_received_raw_tp", "tcp_receive_reset"),
            candidate(
                Tracepoint,
                "reset_received_tracepoint",
                "tcp/tcp_receive_reset",
            ),
        ],
        if_none: IfNoneFits::Degrade("resets received are not seen"),
    },
    Hook {
        name: "reset_sent",
        candidates: &[
            candidate(TpBtf, "reset_sent_tp_btf", "tcp_send_reset"),
            candidate(RawTp, "reset_sent_raw_tp", "tcp_send_reset"),
        ],
        if_none: IfNoneFits::Degrade("resets the host sends are not seen"),
    },
    Hook {
        name: "keepalive",
        candidates: &[
            candidate(Fentry, "keepalive_fentry", "tcp_keepalive_timer"),
            candidate(Kprobe, "keepalive_kprobe", "tcp_keepalive_timer"),
            // Every timer expiry, filtered on the keepalive callback.
            candidate(TpBtf, "keepalive_tp_btf", "timer_expire_entry"),
            candidate(RawTp, "keepalive_raw_tp", "timer_expire_entry"),
        ],
        if_none: IfNoneFits::Optional(
            "keepalive timer runs are not counted; probes sent are derived from the receive hook",
        ),
    },
];

/// How one hook ended up.
#[derive(Debug, Clone, Serialize)]
pub struct HookStatus {
    pub hook: &'static str,
    /// The kind that attached, or None when the hook runs degraded.
    pub kind: Option<AttachKind>,
    /// Why each earlier candidate was refused.
    pub refused: Vec<(AttachKind, String)>,
    /// What is lost while no candidate fits.
    pub lost: Option<&'static str>,
    /// Whether idlemon is degraded (not ready) while this hook is missing.
    pub degraded: bool,
}

/// The loaded eBPF object and what attached. Drop it last: dropping detaches
/// every program.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub hooks: Vec<HookStatus>,
    /// The socket walk's link; iterators are created from it per network namespace.
    pub walk_link: FdLink,
    /// The walk's options (`walk_option::*`).
    pub walk_options: Array<MapData, u32>,
    /// The hooks' per-socket table, for owners the walk left to user space
    /// and user space could not carry over.
    pub sockets: aya::maps::HashMap<MapData, u64, SocketInfo>,
    /// The walk by file descriptor (`iter/task_file`), one for all
    /// namespaces; None where the kernel refused it (then every namespace
    /// is walked by `iter/tcp`, as the log says).
    pub files_link: Option<FdLink>,
}

/// Globals and map sizes handed to the kernel programs at load time.
pub struct LoadSettings {
    pub layout: KernelLayout,
    pub idle_threshold_jiffies: u32,
    pub max_sockets: u32,
    /// Remember the connections this node opens, for
    /// idlemon_destination_established_connections (`--destination-labels`).
    pub count_opened: bool,
    pub disabled: Vec<AttachKind>,
    /// Keepalive enforcement's mode and targets (mode 0: not attached).
    pub enforce: monitor_common::EnforceSettings,
}

/// The kernel programs, built by `build.rs` from monitor-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

pub fn load(settings: &LoadSettings, btf: &Btf, kernel_btf: &KernelBtf) -> anyhow::Result<Loaded> {
    let mut ebpf = EbpfLoader::new()
        .btf(Some(btf))
        .override_global("KERNEL_LAYOUT", &settings.layout, true)
        .override_global(
            "IDLE_THRESHOLD_JIFFIES",
            &settings.idle_threshold_jiffies,
            true,
        )
        .override_global("ENFORCE_SETTINGS", &settings.enforce, true)
        .override_global("COUNT_OPENED", &u32::from(settings.count_opened), true)
        .map_max_entries("SOCKETS", settings.max_sockets)
        // Never used unless counted: one entry then (a map cannot have none).
        .map_max_entries(
            "ACTIVE_OPENS",
            if settings.count_opened {
                settings.max_sockets
            } else {
                1
            },
        )
        .load(EBPF_OBJECT)
        .map_err(|error| explain_permission(anyhow::Error::new(error)))
        .context("cannot create idlemon's eBPF maps")?;

    let mut hooks = Vec::with_capacity(HOOKS.len());
    for hook in HOOKS {
        let status = attach_hook(&mut ebpf, hook, btf, kernel_btf, &settings.disabled)?;
        hooks.push(status);
    }
    let walk_link = attach_walk(&mut ebpf, btf)?;
    let files_link = match attach_file_walk(&mut ebpf, btf) {
        Ok(link) => Some(link),
        Err(error) => {
            warn!(
                error = format!("{error:#}"),
                "no walk by file descriptor: every scan walks each network namespace by iter/tcp (idlemon_scan_namespace_walks), which costs more on a node of many pods"
            );
            None
        }
    };
    let walk_options = ebpf
        .take_map("WALK_OPTIONS")
        .ok_or_else(|| anyhow!("map WALK_OPTIONS missing from the eBPF object"))?
        .try_into()
        .context("map WALK_OPTIONS is not an array")?;
    let sockets = ebpf
        .take_map("SOCKETS")
        .ok_or_else(|| anyhow!("map SOCKETS missing from the eBPF object"))?
        .try_into()
        .context("map SOCKETS is not a hash map")?;
    Ok(Loaded {
        ebpf,
        hooks,
        walk_link,
        walk_options,
        sockets,
        files_link,
    })
}

fn attach_hook(
    ebpf: &mut Ebpf,
    hook: &Hook,
    btf: &Btf,
    kernel_btf: &KernelBtf,
    disabled: &[AttachKind],
) -> anyhow::Result<HookStatus> {
    let mut refused = Vec::new();
    for candidate in hook.candidates {
        if disabled.contains(&candidate.kind) {
            refused.push((candidate.kind, "disabled by --disable-attach".to_owned()));
            continue;
        }
        let traces_a_function = matches!(candidate.kind, AttachKind::Fentry | AttachKind::Kprobe);
        if traces_a_function && !kernel_btf.has_function(candidate.target) {
            // Inlined or renamed on this kernel: nothing to attach to.
            refused.push((
                candidate.kind,
                format!("kernel has no function {}", candidate.target),
            ));
            continue;
        }
        match attach(ebpf, candidate, btf) {
            Ok(()) => {
                info!(
                    hook = hook.name,
                    kind = %candidate.kind,
                    target = candidate.target,
                    "hook attached"
                );
                return Ok(HookStatus {
                    hook: hook.name,
                    kind: Some(candidate.kind),
                    refused,
                    lost: None,
                    degraded: false,
                });
            }
            Err(error) => {
                let reason = format!("{error:#}");
                info!(
                    hook = hook.name,
                    kind = %candidate.kind,
                    target = candidate.target,
                    %reason,
                    "attach kind refused, trying the next"
                );
                refused.push((candidate.kind, reason));
            }
        }
    }
    let reasons = refused
        .iter()
        .map(|(kind, reason)| format!("{kind}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ");
    match hook.if_none {
        IfNoneFits::Fail => Err(explain_permission(anyhow!(
            "no way to attach the {} hook on this kernel ({reasons})",
            hook.name
        ))),
        IfNoneFits::Degrade(lost) => {
            warn!(hook = hook.name, %reasons, lost, "hook not attached: running degraded, not ready");
            Ok(HookStatus {
                hook: hook.name,
                kind: None,
                refused,
                lost: Some(lost),
                degraded: true,
            })
        }
        IfNoneFits::Optional(lost) => {
            info!(hook = hook.name, %reasons, lost, "optional hook not available on this kernel");
            Ok(HookStatus {
                hook: hook.name,
                kind: None,
                refused,
                lost: Some(lost),
                degraded: false,
            })
        }
    }
}

fn attach(ebpf: &mut Ebpf, candidate: &Candidate, btf: &Btf) -> anyhow::Result<()> {
    let program = ebpf
        .program_mut(candidate.program)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", candidate.program))?;
    let target = candidate.target;
    match candidate.kind {
        AttachKind::Fentry => {
            let program: &mut FEntry = program.try_into()?;
            program.load(target, btf)?;
            program.attach()?;
        }
        AttachKind::Kprobe => {
            let program: &mut KProbe = program.try_into()?;
            program.load()?;
            program.attach(target, 0)?;
        }
        AttachKind::TpBtf => {
            let program: &mut BtfTracePoint = program.try_into()?;
            program.load(target, btf)?;
            program.attach()?;
        }
        AttachKind::RawTp => {
            let program: &mut RawTracePoint = program.try_into()?;
            program.load()?;
            program.attach(target)?;
        }
        AttachKind::Tracepoint => {
            let (category, name) = target
                .split_once('/')
                .ok_or_else(|| anyhow!("tracepoint {target} is not category/name"))?;
            let program: &mut TracePoint = program.try_into()?;
            program.load()?;
            program.attach(category, name)?;
        }
        AttachKind::SockOps | AttachKind::CgroupSockopt | AttachKind::Iter => {
            return Err(anyhow!(
                "{} programs are attached by monitor/src/enforce.rs",
                candidate.kind
            ));
        }
    }
    Ok(())
}

/// The socket walk (`iter/tcp`, Linux 5.9+), which idlemon cannot run without.
fn attach_walk(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<FdLink> {
    attach_iterator(ebpf, btf, "walk_tcp", "tcp", "the socket walk")
}

/// The walk by file descriptor (`iter/task_file`, Linux 5.9+).
fn attach_file_walk(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<FdLink> {
    attach_iterator(
        ebpf,
        btf,
        "walk_files",
        "task_file",
        "the walk by file descriptor",
    )
}

/// Loads iterator program `name` for `iter/{target}` and attaches it.
fn attach_iterator(
    ebpf: &mut Ebpf,
    btf: &Btf,
    name: &str,
    target: &str,
    what: &str,
) -> anyhow::Result<FdLink> {
    let program: &mut Iter = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()?;
    program
        .load(target, btf)
        .map_err(|error| explain_permission(anyhow::Error::new(error)))
        .with_context(|| format!("cannot load {what} (iter/{target}, Linux 5.9+)"))?;
    let link = program
        .attach()
        .with_context(|| format!("cannot attach {what} (iter/{target})"))?;
    let link = program.take_link(link)?;
    FdLink::try_from(link).with_context(|| format!("{what}'s link has no file descriptor"))
}

/// Turns EPERM into what to do about it: it is the usual failure when idlemon
/// runs without privileges.
fn explain_permission(error: anyhow::Error) -> anyhow::Error {
    let denied = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
            || cause.to_string().contains("Operation not permitted")
    });
    if denied {
        error.context(
            "permission denied: idlemon needs root or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN",
        )
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_prefers_fentry_before_kprobe_before_tracepoints() {
        for hook in HOOKS {
            let ranks: Vec<usize> = hook
                .candidates
                .iter()
                .map(|candidate| candidate.kind as usize)
                .collect();
            assert!(
                ranks.is_sorted(),
                "hook {} candidates out of order",
                hook.name
            );
            assert!(
                !hook.candidates.is_empty(),
                "hook {} has no candidate",
                hook.name
            );
        }
    }

    #[test]
    fn the_brief_hooks_are_all_in_the_table() {
        let targets: Vec<&str> = HOOKS
            .iter()
            .flat_map(|hook| hook.candidates.iter().map(|candidate| candidate.target))
            .collect();
        for wanted in [
            "tcp_sendmsg",
            "tcp_rcv_established",
            "tcp_keepalive_timer",
            "tcp_sendmsg_locked",
            "tcp_probe",
            "inet_sock_set_state",
            "tcp_destroy_sock",
            "tcp_receive_reset",
            "tcp_send_reset",
        ] {
            assert!(targets.contains(&wanted), "{wanted} missing");
        }
    }

    #[test]
    fn permission_errors_say_what_is_needed() {
        let error = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EPERM));
        assert!(format!("{:#}", explain_permission(error)).contains("CAP_BPF"));
        let error = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert!(!format!("{:#}", explain_permission(error)).contains("CAP_BPF"));
    }
}
