//! Keepalive enforcement: the settings the `sock_ops` program applies
//! (`monitor-ebpf/src/enforce.rs`), checked before anything loads, and its
//! attachment to the cgroup v2 hierarchy, kept in step with the selection
//! (`selection.rs`) as pods come and go and on SIGHUP.
//!
//! Safe to turn off: the programs only ever act when a connection becomes
//! established, when the walk fixes an existing one, and on an
//! application's setsockopt of an enforced socket. Stopping idlemon (or
//! restarting it with `off`, or a pod leaving the selection) detaches them
//! and applies nothing new; sockets already fixed keep their keepalive
//! settings, as if the application had set them, until they close.

pub mod selection;

use std::{
    collections::BTreeMap,
    fs::File,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    maps::Array,
    programs::{
        CgroupSockopt, SockOps, cgroup_sockopt::CgroupSockoptLinkId, links::CgroupAttachMode,
        sock_ops::SockOpsLinkId,
    },
};
use ipnet::IpNet;
use monitor_common::{AF_INET, AF_INET6, EnforcePath, EnforceSettings, ExistingSocket, enforce};
use tracing::{info, warn};

use crate::{
    attribution::pods::PodCache,
    config::{
        EnforceConfig, EnforceMode, IdleTimeout, MAX_IDLE_PERCENT, MAX_KEEPALIVE_SECONDS,
        PathConfig,
    },
    probes::{AttachKind, HookStatus},
};
pub use selection::Selection;

/// The program in the eBPF object.
const PROGRAM: &str = "enforce_keepalive";

/// What the kernel program gets, decided from the config before load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mode: EnforceMode,
    pub settings: EnforceSettings,
    pub paths: Vec<EnforcePath>,
    /// The workloads to enforce (cgroups, units, pods).
    pub selection: Selection,
    pub cgroup_root: Option<PathBuf>,
}

impl Plan {
    /// The mode is `flag`, else the config file's, else off. A config whose
    /// keepalive would not beat a path's timeout is refused, naming the path.
    ///
    /// # Errors
    ///
    /// When a path's timeout is too short for any keepalive below it, or
    /// the rules do not fit the kernel's table.
    pub fn new(
        flag: Option<EnforceMode>,
        paths: &PathConfig,
        default_timeout: NonZeroU32,
        hz: u32,
    ) -> anyhow::Result<Self> {
        let config = &paths.enforce;
        let mode = flag.or(config.mode).unwrap_or_default();
        // Off, nothing is checked: the settings only matter to the program.
        let idle_for = |config: &EnforceConfig, timeout: u32| {
            if mode == EnforceMode::Off {
                Ok(0)
            } else {
                idle_for(config, timeout)
            }
        };
        let default_idle = idle_for(config, default_timeout.get())
            .with_context(|| "--idle-timeout (the path where no [[path]] rule matches)")?;
        let mut kernel_paths = Vec::new();
        for rule in paths.rules_in_order() {
            let (timeout_seconds, idle_seconds) = match rule.timeout {
                IdleTimeout::Never => (0, 0),
                IdleTimeout::After(timeout) => (
                    timeout.get(),
                    idle_for(config, timeout.get())
                        .with_context(|| format!("[[path]] rule {:?}", rule.label))?,
                ),
            };
            let (family, addr, mask) = words(rule.net);
            let ranges = rule.ports.unwrap_or_default();
            // A rule with many port ranges takes several consecutive entries,
            // which keeps its place in the order.
            let chunks: Vec<&[(u16, u16)]> = if ranges.is_empty() {
                vec![&[]]
            } else {
                ranges.chunks(enforce::PORT_RANGES).collect()
            };
            for chunk in chunks {
                let mut ports = [[0u16; 2]; enforce::PORT_RANGES];
                for (slot, &(first, last)) in ports.iter_mut().zip(chunk) {
                    *slot = [first, last];
                }
                kernel_paths.push(EnforcePath {
                    addr,
                    mask,
                    ports,
                    timeout_seconds,
                    timeout_jiffies: jiffies(timeout_seconds, hz),
                    idle_seconds,
                    idle_jiffies: jiffies(idle_seconds, hz),
                    family,
                    port_ranges: chunk.len() as u16,
                });
            }
        }
        if mode != EnforceMode::Off && kernel_paths.len() > enforce::MAX_PATHS as usize {
            bail!(
                "keepalive enforcement holds at most {} path rules (a rule with more than {} port \
                 ranges counts once per {} ranges); the config has {}",
                enforce::MAX_PATHS,
                enforce::PORT_RANGES,
                enforce::PORT_RANGES,
                kernel_paths.len()
            );
        }
        Ok(Self {
            mode,
            settings: EnforceSettings {
                mode: match mode {
                    EnforceMode::Off => 0,
                    EnforceMode::DryRun => enforce::MODE_DRY_RUN,
                    EnforceMode::On => enforce::MODE_ON,
                },
                passive: u32::from(config.accepted),
                paths: kernel_paths.len() as u32,
                default_timeout_seconds: default_timeout.get(),
                default_timeout_jiffies: jiffies(default_timeout.get(), hz),
                default_idle_seconds: default_idle,
                default_idle_jiffies: jiffies(default_idle, hz),
                interval_seconds: config.interval_seconds,
                interval_jiffies: jiffies(config.interval_seconds, hz),
                count: config.count,
                override_weakening: u32::from(config.override_weakening),
            },
            paths: kernel_paths,
            selection: Selection::of(config),
            cgroup_root: config.cgroup_root.clone(),
        })
    }
}

/// TCP_KEEPIDLE for a path of `timeout` seconds: `idle_percent` of it,
/// rounded down, at most the kernel's maximum. After a probe the next one
/// comes an interval later, so the interval must beat the timeout as well.
fn idle_for(config: &EnforceConfig, timeout: u32) -> anyhow::Result<u32> {
    let idle = (u64::from(timeout) * u64::from(config.idle_percent) / 100)
        .min(u64::from(MAX_KEEPALIVE_SECONDS)) as u32;
    if idle == 0 {
        return Err(anyhow!(
            "an idle timeout of {timeout} s leaves no whole second for a keepalive probe before \
             it at idle_percent = {} (the first probe must go out well before the timeout): raise \
             idle_percent or the timeout",
            config.idle_percent
        ));
    }
    if u64::from(config.interval_seconds) * 100 > u64::from(timeout) * u64::from(MAX_IDLE_PERCENT) {
        return Err(anyhow!(
            "an idle timeout of {timeout} s is shorter than the keepalive interval {} s allows \
             (after a probe, the next comes an interval later: it must be at most {MAX_IDLE_PERCENT}% \
             of the timeout): lower interval",
            config.interval_seconds
        ));
    }
    Ok(idle)
}

fn jiffies(seconds: u32, hz: u32) -> u32 {
    u64::from(seconds)
        .saturating_mul(u64::from(hz))
        .min(u64::from(u32::MAX / 2)) as u32
}

/// Family, address and mask of a network as the kernel compares them:
/// 32-bit words holding the address bytes in network order.
fn words(net: IpNet) -> (u16, [u32; 4], [u32; 4]) {
    let to_words = |bytes: &[u8]| {
        let mut words = [0u32; 4];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(4)) {
            *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        words
    };
    match net {
        IpNet::V4(v4) => (
            AF_INET,
            to_words(&v4.network().octets()),
            to_words(&v4.netmask().octets()),
        ),
        IpNet::V6(v6) => (
            AF_INET6,
            to_words(&v6.network().octets()),
            to_words(&v6.netmask().octets()),
        ),
    }
}

/// The cgroup v2 mount in `/proc/self/mounts` text: `/sys/fs/cgroup` on
/// unified hosts (EKS), `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(unescape(target)))
    })
}

/// Mount points escape space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\'
            && let Some(digits) = field.get(index + 1..index + 4)
            && let Ok(value) = u8::from_str_radix(digits, 8)
        {
            out.push(value);
            index += 4;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `cgroup/setsockopt` program (`monitor-ebpf/src/enforce.rs`).
const SETSOCKOPT_PROGRAM: &str = "enforce_setsockopt";

/// The links of one selected cgroup directory.
struct Attachment {
    sock_ops: SockOpsLinkId,
    setsockopt: Option<CgroupSockoptLinkId>,
}

/// Keepalive enforcement once it runs: the programs attached to the
/// selected cgroup directories, kept in step with the selection. A program
/// attached to a directory runs for the sockets of every process below it,
/// so the set of links is the kernel's selection.
pub struct Enforcer {
    root: PathBuf,
    selection: Selection,
    /// Whether pods are known (a pod watch runs): without it the pod
    /// selectors select nothing.
    pod_source: bool,
    /// Directory from the root ("": the root) -> its links.
    attached: BTreeMap<String, Attachment>,
    setsockopt: bool,
    walk: bool,
    proc_root: PathBuf,
}

impl Enforcer {
    /// Fills the path table, loads the programs and attaches them to each
    /// selected cgroup that exists (or the root), then fixes the existing
    /// connections there. Never fails: a kernel or host that cannot
    /// enforce makes the returned `enforce` hook degraded, with the reason
    /// (logs, metrics, /readyz), and idlemon runs on without enforcement.
    /// Pod selectors without `pods` (no pod watch) are degraded too: then
    /// only the cgroups and units selectors apply, never every workload.
    pub fn start(
        ebpf: &mut Ebpf,
        plan: &Plan,
        disabled: &[AttachKind],
        btf: &aya::Btf,
        proc_root: &Path,
        pods: Option<&PodCache>,
    ) -> (Vec<HookStatus>, Option<Self>) {
        let mut hooks = Vec::new();
        let prepared = if disabled.contains(&AttachKind::SockOps) {
            Err(anyhow!("disabled by --disable-attach"))
        } else {
            prepare(ebpf, plan)
        };
        let root = match prepared {
            Ok(root) => root,
            Err(error) => {
                let reason = format!("{error:#}");
                warn!(
                    mode = plan.mode.as_str(),
                    %reason,
                    "keepalive enforcement cannot attach: running degraded, enforcing nothing"
                );
                hooks.push(HookStatus {
                    hook: "enforce",
                    kind: None,
                    refused: vec![(AttachKind::SockOps, reason)],
                    lost: crate::probes::enforce_hook_lost("enforce"),
                    degraded: true,
                });
                return (hooks, None);
            }
        };
        hooks.push(HookStatus {
            hook: "enforce",
            kind: Some(AttachKind::SockOps),
            refused: Vec::new(),
            lost: None,
            degraded: false,
        });
        let setsockopt = if disabled.contains(&AttachKind::CgroupSockopt) {
            Err(anyhow!("disabled by --disable-attach"))
        } else {
            load_setsockopt(ebpf)
        };
        hooks.push(optional_hook(
            "enforce_setsockopt",
            AttachKind::CgroupSockopt,
            &setsockopt,
            "an application that turns off or slows the keepalive idlemon set is not seen \
             (needs cgroup/setsockopt programs, Linux 5.3+); enforcement goes on",
        ));
        let walk = load_walk(ebpf, btf);
        hooks.push(optional_hook(
            "enforce_existing",
            AttachKind::Iter,
            &walk,
            "connections older than idlemon (or than their selection) are not enforced \
             (the walk needs bpf_setsockopt in iter/tcp, Linux 5.15+); new ones are",
        ));
        if plan.selection.pods.is_some() && pods.is_none() {
            warn!(
                "[enforce] selects pods by namespace or label, but there is no pod watch \
                 (--node-name, and in-cluster API access or --kube-api): running degraded, \
                 enforcing only the cgroups and units selectors"
            );
            hooks.push(HookStatus {
                hook: "enforce_pods",
                kind: None,
                refused: Vec::new(),
                lost: Some(
                    "[enforce] namespaces and pod_labels select nothing without the pod watch (--node-name and API access)",
                ),
                degraded: true,
            });
        }
        let mut enforcer = Self {
            root,
            selection: plan.selection.clone(),
            pod_source: pods.is_some(),
            attached: BTreeMap::new(),
            setsockopt: setsockopt.is_ok(),
            walk: walk.is_ok(),
            proc_root: proc_root.to_owned(),
        };
        let empty = PodCache::default();
        enforcer.sync(ebpf, pods.unwrap_or(&empty));
        for cgroup in &enforcer.selection.cgroups {
            if !enforcer.path_of(cgroup).is_dir() {
                // A unit or pod that is not running yet: the others still count.
                warn!(
                    cgroup = %enforcer.path_of(cgroup).display(),
                    "selected cgroup not found: enforced once it appears"
                );
            }
        }
        (hooks, Some(enforcer))
    }

    /// The cgroup directories attached, from the root.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// A new selection (SIGHUP): applied by the next `sync`. Whether it
    /// differs from the current one.
    pub fn reselect(&mut self, selection: Selection) -> bool {
        if selection.pods.is_some() && !self.pod_source {
            warn!(
                "[enforce] selects pods by namespace or label, but there is no pod watch: \
                 the pod selectors select nothing"
            );
        }
        let changed = selection != self.selection;
        self.selection = selection;
        changed
    }

    /// Attaches to the directories the selection wants now (pods that came
    /// or were relabelled into it, cgroups that appeared), detaches from
    /// those it no longer wants, and fixes the existing connections of the
    /// newly selected ones. Returns the newly attached directories.
    pub fn sync(&mut self, ebpf: &mut Ebpf, pods: &PodCache) -> Vec<String> {
        let pod_dirs = if self.selection.pods.is_some() && self.pod_source {
            selection::pod_cgroups(&self.root)
        } else {
            Vec::new()
        };
        let root = self.root.clone();
        let wanted = self.selection.wanted(
            |cgroup| root.join(cgroup.trim_start_matches('/')).is_dir(),
            &pod_dirs,
            |uid| pods.get(uid),
        );
        let gone: Vec<String> = self
            .attached
            .keys()
            .filter(|directory| !wanted.contains(*directory))
            .cloned()
            .collect();
        for directory in gone {
            if let Some(attachment) = self.attached.remove(&directory) {
                self.detach(ebpf, &directory, attachment);
            }
        }
        let mut added = Vec::new();
        for directory in wanted {
            if self.attached.contains_key(&directory) {
                continue;
            }
            match self.attach(ebpf, &directory) {
                Ok(attachment) => {
                    info!(cgroup = %self.path_of(&directory).display(), "keepalive enforcement attached");
                    self.attached.insert(directory.clone(), attachment);
                    added.push(directory);
                }
                Err(error) => {
                    warn!(cgroup = %self.path_of(&directory).display(), error = %format!("{error:#}"), "cannot attach keepalive enforcement: not enforced there");
                }
            }
        }
        if !added.is_empty() && self.walk {
            let directories: Vec<PathBuf> = added.iter().map(|d| self.path_of(d)).collect();
            match walk_existing(ebpf, &directories, &self.proc_root) {
                Ok(sockets) => info!(
                    sockets,
                    cgroups = ?directories,
                    "existing connections of newly selected cgroups checked for keepalive enforcement"
                ),
                Err(error) => warn!(
                    error = %format!("{error:#}"),
                    "existing connections of newly selected cgroups are not enforced"
                ),
            }
        }
        added
    }

    fn path_of(&self, directory: &str) -> PathBuf {
        self.root.join(directory.trim_start_matches('/'))
    }

    fn attach(&self, ebpf: &mut Ebpf, directory: &str) -> anyhow::Result<Attachment> {
        let path = self.path_of(directory);
        let cgroup = File::open(&path)
            .with_context(|| format!("cannot open the cgroup {}", path.display()))?;
        // aya attaches through a bpf_link wherever the kernel has cgroup
        // links (5.7+, so every kernel with keepalive in bpf_setsockopt):
        // links always coexist with other programs, and the kernel refuses
        // attach flags on them (EINVAL), so the mode must be the default.
        let program: &mut SockOps = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow!("program {PROGRAM} missing from the eBPF object"))?
            .try_into()?;
        let sock_ops = program
            .attach(&cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("cannot attach sock_ops to {}", path.display()))?;
        let setsockopt = if self.setsockopt {
            let attached = ebpf
                .program_mut(SETSOCKOPT_PROGRAM)
                .ok_or_else(|| anyhow!("program {SETSOCKOPT_PROGRAM} missing"))
                .and_then(|program| Ok(<&mut CgroupSockopt>::try_from(program)?))
                .and_then(|program| Ok(program.attach(&cgroup, CgroupAttachMode::Single)?));
            match attached {
                Ok(link) => Some(link),
                Err(error) => {
                    warn!(cgroup = %path.display(), error = %format!("{error:#}"), "cannot attach cgroup/setsockopt: weakening is not seen there");
                    None
                }
            }
        } else {
            None
        };
        Ok(Attachment {
            sock_ops,
            setsockopt,
        })
    }

    fn detach(&self, ebpf: &mut Ebpf, directory: &str, attachment: Attachment) {
        let path = self.path_of(directory);
        let sock_ops = ebpf
            .program_mut(PROGRAM)
            .and_then(|program| <&mut SockOps>::try_from(program).ok())
            .map(|program| program.detach(attachment.sock_ops));
        if let Some(link) = attachment.setsockopt
            && let Some(program) = ebpf
                .program_mut(SETSOCKOPT_PROGRAM)
                .and_then(|program| <&mut CgroupSockopt>::try_from(program).ok())
        {
            let _ = program.detach(link);
        }
        match sock_ops {
            Some(Ok(())) => info!(
                cgroup = %path.display(),
                "keepalive enforcement detached (left the selection); its fixed sockets keep their settings"
            ),
            // The directory went with its pod: the kernel dropped the link.
            _ => {
                info!(cgroup = %path.display(), "keepalive enforcement's link gone with its cgroup")
            }
        }
    }
}

/// Finds the cgroup v2 root, fills the path table and loads the program.
fn prepare(ebpf: &mut Ebpf, plan: &Plan) -> anyhow::Result<PathBuf> {
    let root = match &plan.cgroup_root {
        Some(root) => root.clone(),
        None => {
            let mounts = std::fs::read_to_string("/proc/self/mounts")
                .context("cannot read /proc/self/mounts to find the cgroup v2 mount")?;
            cgroup2_mount(&mounts).ok_or_else(|| {
                anyhow!("no cgroup v2 hierarchy is mounted (no cgroup2 in /proc/self/mounts)")
            })?
        }
    };
    File::open(&root)
        .with_context(|| format!("cannot open the cgroup v2 root {}", root.display()))?;
    let mut table: Array<_, EnforcePath> = ebpf
        .map_mut("ENFORCE_PATHS")
        .ok_or_else(|| anyhow!("map ENFORCE_PATHS missing from the eBPF object"))?
        .try_into()
        .context("map ENFORCE_PATHS is not an array")?;
    for (index, path) in plan.paths.iter().enumerate() {
        table
            .set(index as u32, path, 0)
            .context("cannot fill ENFORCE_PATHS")?;
    }
    let program: &mut SockOps = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| anyhow!("program {PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    program
        .load()
        .context("the kernel refused the sock_ops program")?;
    Ok(root)
}

fn load_setsockopt(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let program: &mut CgroupSockopt = ebpf
        .program_mut(SETSOCKOPT_PROGRAM)
        .ok_or_else(|| anyhow!("program {SETSOCKOPT_PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    program
        .load()
        .context("the kernel refused the cgroup/setsockopt program")
}

fn load_walk(ebpf: &mut Ebpf, btf: &aya::Btf) -> anyhow::Result<()> {
    let program: &mut aya::programs::Iter = ebpf
        .program_mut(EXISTING_PROGRAM)
        .ok_or_else(|| anyhow!("program {EXISTING_PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    program
        .load("tcp", btf)
        .context("the kernel refused the walk that fixes existing connections")
}

/// Fixes the connections of the processes in the `directories` cgroups
/// (and below) that existed before they were selected: an `iter/tcp` walk
/// per network namespace that decides and sets as the `sock_ops` program
/// does (`bpf_setsockopt` from `iter/tcp`: Linux 5.15+). The sockets are
/// picked in user space (the processes' socket inodes, found in their
/// namespace's `/proc/PID/net/tcp` and `tcp6`) and handed to the walk in
/// `EXISTING`. Returns how many were handed over.
fn walk_existing(
    ebpf: &mut Ebpf,
    directories: &[PathBuf],
    proc_root: &std::path::Path,
) -> anyhow::Result<usize> {
    use std::{
        collections::{HashMap as Map, HashSet},
        io::Read as _,
        os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    };

    // Processes of the selected cgroups, by network namespace, with their
    // socket inodes.
    let mut pids = Vec::new();
    for directory in directories {
        cgroup_pids(directory, &mut pids, 0);
    }
    let mut namespaces: Map<u64, (u32, HashSet<u64>)> = Map::new();
    for pid in pids {
        let process = proc_root.join(pid.to_string());
        let Ok(netns) = std::fs::metadata(process.join("ns/net")) else {
            continue;
        };
        let entry = namespaces
            .entry(netns.ino())
            .or_insert_with(|| (pid, HashSet::new()));
        let Ok(fds) = std::fs::read_dir(process.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(inode) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse().ok())
            {
                entry.1.insert(inode);
            }
        }
    }
    if namespaces.values().all(|(_, inodes)| inodes.is_empty()) {
        return Ok(0);
    }

    let program: &mut aya::programs::Iter = ebpf
        .program_mut(EXISTING_PROGRAM)
        .ok_or_else(|| anyhow!("program {EXISTING_PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    let link = program.attach().context("cannot attach the walk")?;
    let link = program.take_link(link)?;
    let link = aya::programs::links::FdLink::try_from(link).context("the walk's link has no fd")?;
    let link_id = link.info().context("cannot inspect the walk's link")?.id();
    let link_fd = crate::kernel::link_fd_by_id(link_id).context("cannot open the walk's link")?;
    let mut existing: aya::maps::HashMap<_, ExistingSocket, u32> = ebpf
        .map_mut("EXISTING")
        .ok_or_else(|| anyhow!("map EXISTING missing from the eBPF object"))?
        .try_into()
        .context("map EXISTING is not a hash map")?;

    let mut selected = 0;
    for (pid, inodes) in namespaces.values() {
        if inodes.is_empty() {
            continue;
        }
        let process = proc_root.join(pid.to_string());
        let mut keys = Vec::new();
        for (table, family) in [("net/tcp", AF_INET), ("net/tcp6", AF_INET6)] {
            if let Ok(text) = std::fs::read_to_string(process.join(table)) {
                keys.extend(established_sockets(&text, family, inodes));
            }
        }
        if keys.is_empty() {
            continue;
        }
        for key in &keys {
            existing.insert(key, 1, 0).context("cannot fill EXISTING")?;
        }
        let namespace = File::open(process.join("ns/net"))
            .with_context(|| format!("cannot open the network namespace of process {pid}"))?;
        let walked = std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<()> {
                    // SAFETY: a namespace fd; setns moves only this thread.
                    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error())
                            .context("cannot enter the network namespace");
                    }
                    let iterator = crate::kernel::create_iterator(&link_fd)
                        .context("cannot start the walk")?;
                    let mut output = Vec::new();
                    File::from(iterator).read_to_end(&mut output)?;
                    Ok(())
                })
                .join()
                .map_err(|_| anyhow!("the walk's thread panicked"))?
        });
        for key in &keys {
            let _ = existing.remove(key);
        }
        walked?;
        selected += keys.len();
    }
    drop(link);
    Ok(selected)
}

/// The program of the walk (`monitor-ebpf/src/enforce.rs`).
const EXISTING_PROGRAM: &str = "enforce_existing";

/// Every process in cgroup `directory` and below (bounded depth).
fn cgroup_pids(directory: &std::path::Path, pids: &mut Vec<u32>, depth: usize) {
    if depth > 32 {
        return;
    }
    if let Ok(text) = std::fs::read_to_string(directory.join("cgroup.procs")) {
        pids.extend(
            text.lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
    }
    if let Ok(entries) = std::fs::read_dir(directory) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                cgroup_pids(&entry.path(), pids, depth + 1);
            }
        }
    }
}

/// The ESTABLISHED sockets of `/proc/PID/net/tcp` or `tcp6` text whose
/// inode is in `inodes`, as the walk reads them.
fn established_sockets(
    text: &str,
    family: u16,
    inodes: &std::collections::HashSet<u64>,
) -> Vec<ExistingSocket> {
    let endpoint = |field: &str| -> Option<([u8; 16], u16)> {
        let (address, port) = field.split_once(':')?;
        let mut bytes = [0u8; 16];
        // Each group of 8 hex digits is one 32-bit word as the kernel
        // holds it (network-order bytes, printed as a native integer).
        for (index, chunk) in address.as_bytes().chunks(8).enumerate().take(4) {
            let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
            bytes[index * 4..index * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        Some((bytes, u16::from_str_radix(port, 16).ok()?))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = fields.get(9)?.parse().ok()?;
            if *fields.get(3)? != "01" || !inodes.contains(&inode) {
                return None;
            }
            let (_, local_port) = endpoint(fields.get(1)?)?;
            let (remote_addr, remote_port) = endpoint(fields.get(2)?)?;
            Some(ExistingSocket {
                remote_addr,
                local_port,
                remote_port,
                family,
                _pad: 0,
            })
        })
        .collect()
}

/// The status of an enforcement program that enforcement can do without:
/// attached, or refused with its reason and a warning saying what is lost
/// (never degraded: enforcement goes on).
fn optional_hook(
    hook: &'static str,
    kind: AttachKind,
    loaded: &anyhow::Result<()>,
    without: &str,
) -> HookStatus {
    match loaded {
        Ok(()) => HookStatus {
            hook,
            kind: Some(kind),
            refused: Vec::new(),
            lost: None,
            degraded: false,
        },
        Err(error) => {
            let reason = format!("{error:#}");
            warn!(%reason, "{without}");
            HookStatus {
                hook,
                kind: None,
                refused: vec![(kind, reason)],
                lost: crate::probes::enforce_hook_lost(hook),
                degraded: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str, timeout: u32) -> anyhow::Result<Plan> {
        let paths = PathConfig::parse(text, "idlemon.toml").unwrap();
        Plan::new(
            Some(EnforceMode::DryRun),
            &paths,
            NonZeroU32::new(timeout).unwrap(),
            100,
        )
    }

    #[test]
    fn mode_comes_from_the_flag_then_the_file() {
        let paths = PathConfig::parse("[enforce]\nmode = \"dry-run\"\n", "f").unwrap();
        let timeout = NonZeroU32::new(350).unwrap();
        assert_eq!(
            Plan::new(None, &paths, timeout, 100).unwrap().mode,
            EnforceMode::DryRun
        );
        let on = Plan::new(Some(EnforceMode::On), &paths, timeout, 100).unwrap();
        assert_eq!(
            (on.mode, on.settings.mode),
            (EnforceMode::On, enforce::MODE_ON)
        );
        let none = PathConfig::default();
        assert_eq!(
            Plan::new(None, &none, timeout, 100).unwrap().mode,
            EnforceMode::Off
        );
    }

    #[test]
    fn idle_is_a_share_of_each_paths_timeout() {
        let plan = plan(
            "[[path]]\ncidr = \"10.0.0.0/8\"\nports = [443, \"8000-8100\"]\nidle_timeout = 6000\n\
             [[path]]\ncidr = \"10.1.0.0/16\"\nidle_timeout = \"none\"\n\
             [enforce]\nidle_percent = 40\ninterval = 7\ncount = 4\n",
            350,
        )
        .unwrap();
        assert_eq!(plan.settings.default_idle_seconds, 140);
        assert_eq!(plan.settings.default_timeout_jiffies, 35_000);
        assert_eq!(
            (plan.settings.interval_seconds, plan.settings.count),
            (7, 4)
        );
        // Most specific first, as PathConfig matches.
        let [inner, outer] = plan.paths.as_slice() else {
            panic!("{:?}", plan.paths)
        };
        assert_eq!((inner.timeout_seconds, inner.idle_seconds), (0, 0));
        assert_eq!(inner.addr[0], u32::from_ne_bytes([10, 1, 0, 0]));
        assert_eq!(inner.mask[0], u32::from_ne_bytes([255, 255, 0, 0]));
        assert_eq!((outer.timeout_seconds, outer.idle_seconds), (6000, 2400));
        assert_eq!(outer.port_ranges, 2);
        assert_eq!(outer.ports[..2], [[443, 443], [8000, 8100]]);
        assert_eq!(outer.family, AF_INET);
    }

    #[test]
    fn a_timeout_too_short_for_a_probe_before_it_is_refused() {
        let error = plan(
            "[[path]]\nname = \"tiny\"\ncidr = \"10.0.0.0/8\"\nidle_timeout = 1\n[enforce]\ninterval = 1\n",
            350,
        )
        .unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("\"tiny\""), "{message}");
        assert!(message.contains("well before the timeout"), "{message}");
        assert!(plan("", 1).is_err());
        assert!(plan("[enforce]\nidle_percent = 80\ninterval = 1\n", 2).is_ok());
        // The default 30 s interval cannot keep a 30 s path alive after a probe.
        let error = plan("", 30).unwrap_err();
        assert!(format!("{error:#}").contains("lower interval"), "{error:#}");
        assert!(plan("", 38).is_ok());
    }

    #[test]
    fn nothing_is_checked_while_enforcement_is_off() {
        let paths =
            PathConfig::parse("[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 5\n", "f").unwrap();
        let timeout = NonZeroU32::new(1).unwrap();
        assert!(Plan::new(None, &paths, timeout, 100).is_ok());
        assert!(Plan::new(Some(EnforceMode::On), &paths, timeout, 100).is_err());
    }

    #[test]
    fn many_port_ranges_take_consecutive_entries() {
        let ports: Vec<String> = (1..=10).map(|port| port.to_string()).collect();
        let text = format!(
            "[[path]]\ncidr = \"10.0.0.0/8\"\nports = [{}]\nidle_timeout = 60\n",
            ports.join(", ")
        );
        let plan = plan(&text, 350).unwrap();
        assert_eq!(plan.paths.len(), 2);
        assert_eq!(
            (plan.paths[0].port_ranges, plan.paths[1].port_ranges),
            (8, 2)
        );
        assert_eq!(plan.settings.paths, 2);
    }

    #[test]
    fn established_sockets_are_read_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                    0: 020200C0:A1B2 026433C6:206D 01 00000000:00000000 00:00000000 00000000     0        0 4242 1\n\
                    1: 020200C0:A1B3 026433C6:206D 01 00000000:00000000 00:00000000 00000000     0        0 4343 1\n\
                    2: 020200C0:A1B4 026433C6:206D 06 00000000:00000000 00:00000000 00000000     0        0 4242 1\n";
        let inodes = [4242].into_iter().collect();
        let sockets = established_sockets(text, AF_INET, &inodes);
        assert_eq!(sockets.len(), 1, "{sockets:?}");
        assert_eq!(sockets[0].local_port, 0xA1B2);
        assert_eq!(sockets[0].remote_port, 8301);
        assert_eq!(sockets[0].remote_addr[..4], [198, 51, 100, 2]);
        assert_eq!(sockets[0].remote_addr[4..], [0; 12]);
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "sysfs /sys sysfs rw 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        let escaped = "cgroup2 /host/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(escaped).unwrap(),
            PathBuf::from("/host/my cgroups")
        );
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }
}
