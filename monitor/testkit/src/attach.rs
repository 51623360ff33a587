//! The attach kinds a run expects, from `IDLEMON_EXPECT_ATTACH`.
//!
//! On this host's kernel no variable is set and the tests assert what the
//! host offers. `cargo xtask vm-test` runs the same tests inside VMs, once
//! per attach mode: it sets `IDLEMON_DISABLE_ATTACH` (which idlemon reads
//! itself) and `IDLEMON_EXPECT_ATTACH`, a comma-separated list of
//! `hook=kind|kind...`, e.g. `send=fentry,receive=fentry,state=tp_btf|raw_tp`.
//! Every daemon the kit starts is then checked against it: each listed hook
//! must show one of its kinds in `idlemon_probe_info`, and a daemon with
//! a required hook expected `none` must run degraded, not ready.

use std::collections::BTreeMap;

use crate::vm::{Arch, Series};

pub const VARIABLE: &str = "IDLEMON_EXPECT_ATTACH";

/// Where the tests run: a VM's kernel, or this host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// Debian's cloud kernel of a series, like EKS AL2023's nodes of it.
    Vm(Arch, Series),
    /// This host's kernel, in network namespaces of the tests'.
    Native,
}

impl Target {
    /// Unique among targets: file names and progress lines.
    pub fn label(self) -> String {
        match self {
            Self::Vm(arch, series) => crate::vm::label(arch, series),
            Self::Native => "native".to_owned(),
        }
    }

    /// The kernel series, whatever the architecture.
    pub fn series(self) -> &'static str {
        match self {
            Self::Vm(_, series) => series.name(),
            Self::Native => "native",
        }
    }

    pub fn arch(self) -> Arch {
        match self {
            Self::Vm(arch, _) => arch,
            Self::Native => Arch::host(),
        }
    }
}

/// The attach modes: each runs idlemon with a `--disable-attach` list
/// (`IDLEMON_DISABLE_ATTACH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Default,
    NoFentry,
    NoFentryKprobe,
}

impl Mode {
    pub const ALL: [Self; 3] = [Self::Default, Self::NoFentry, Self::NoFentryKprobe];

    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::NoFentry => "no-fentry",
            Self::NoFentryKprobe => "no-fentry-kprobe",
        }
    }

    pub fn disable(self) -> &'static str {
        match self {
            Self::Default => "",
            Self::NoFentry => "fentry",
            Self::NoFentryKprobe => "fentry,kprobe",
        }
    }
}

/// Every hook idlemon reports in `idlemon_probe_info`, in the matrix's order.
pub const HOOKS: [&str; 7] = [
    "send",
    "receive",
    "keepalive",
    "state",
    "destroy",
    "reset_received",
    "reset_sent",
];

const FENTRY: &[&str] = &["fentry"];
const KPROBE: &[&str] = &["kprobe"];
const BTF_OR_RAW_TP: &[&str] = &["tp_btf", "raw_tp"];
const ANY_TRACEPOINT: &[&str] = &["tp_btf", "raw_tp", "tracepoint"];
/// Degraded, and rightly so: nothing the kernel offers fits with the mode's kinds.
const NONE: &[&str] = &["none"];

/// The kinds `hook` may show on `target` in `mode`. `none` is a degraded
/// hook that is expected:
/// - `tcp_keepalive_timer` has no tracepoint: without fentry or a kprobe the
///   keepalive hook uses `timer:timer_expire_entry` (tp_btf or raw_tp),
///   filtered on the keepalive callback;
/// - 6.1 and 6.12 have no `tcp:tcp_sendmsg_locked` tracepoint (a later
///   kernel added it; this host's 6.18 has it): seen on Debian's 6.12.117,
///   whose BTF lacks `btf_trace_tcp_sendmsg_locked` and where raw_tp gets
///   ENOENT. Send then needs fentry or a kprobe, and without them idlemon
///   is not ready;
/// - arm64 6.1 refuses fentry on kernel functions (`bpf_raw_tracepoint_open`
///   fails with 524, ENOTSUPP: arm64 has BPF trampolines since 6.0, but
///   attaching one to a kernel function needs ftrace direct calls, which
///   arm64 gained later, in 6.4), so idlemon falls back to kprobes there by
///   default: seen on Debian's 6.1.0-57-cloud-arm64. Graviton nodes on 6.1
///   run idlemon on kprobes;
/// - this host (6.18, built without kprobes, with fentry refused) refuses
///   fentry and kprobes whatever the mode.
pub fn expected_kinds(target: Target, mode: Mode, hook: &str) -> &'static [&'static str] {
    match hook {
        // Tracepoint-only hooks: no mode disables their kinds, and every
        // kernel here has their tracepoints.
        "state" | "reset_received" => ANY_TRACEPOINT,
        "destroy" | "reset_sent" => BTF_OR_RAW_TP,
        "send" | "receive" | "keepalive" => match (target, mode) {
            (Target::Native, _) => BTF_OR_RAW_TP,
            (_, Mode::NoFentryKprobe) if hook == "send" => NONE,
            (_, Mode::NoFentryKprobe) => BTF_OR_RAW_TP,
            (_, Mode::NoFentry) | (Target::Vm(Arch::Arm64, Series::V6_1), _) => KPROBE,
            (_, Mode::Default) => FENTRY,
        },
        _ => &[],
    }
}

/// `IDLEMON_EXPECT_ATTACH` for `target` in `mode`: every hook and the kinds
/// it may show.
pub fn expectation(target: Target, mode: Mode) -> String {
    let hooks: Vec<(&str, &[&str])> = HOOKS
        .iter()
        .map(|hook| (*hook, expected_kinds(target, mode, hook)))
        .collect();
    Expected::render(&hooks)
}

/// Hooks whose absence leaves idlemon running but not ready; keepalive only
/// adds detail (`IfNoneFits::Optional` in the daemon's hook table).
const OPTIONAL: &[&str] = &["keepalive"];

/// The kinds each hook may show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected(BTreeMap<String, Vec<String>>);

impl Expected {
    /// The expectation of this run, if any; panics on a malformed variable.
    pub fn from_env() -> Option<Self> {
        let text = std::env::var(VARIABLE).ok()?;
        Some(Self::parse(&text).unwrap_or_else(|error| panic!("{VARIABLE}={text:?}: {error}")))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut hooks = BTreeMap::new();
        for entry in text.split(',').filter(|entry| !entry.trim().is_empty()) {
            let (hook, kinds) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} is not hook=kind|kind"))?;
            let kinds: Vec<String> = kinds
                .split('|')
                .map(|kind| kind.trim().to_owned())
                .collect();
            if kinds.iter().any(String::is_empty) {
                return Err(format!("{entry:?} names an empty kind"));
            }
            hooks.insert(hook.trim().to_owned(), kinds);
        }
        Ok(Self(hooks))
    }

    /// The variable's text for these expectations.
    pub fn render(hooks: &[(&str, &[&str])]) -> String {
        hooks
            .iter()
            .map(|(hook, kinds)| format!("{hook}={}", kinds.join("|")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether idlemon should become ready: no required hook expected missing.
    pub fn ready(&self) -> bool {
        !self.0.iter().any(|(hook, kinds)| {
            !OPTIONAL.contains(&hook.as_str()) && kinds.iter().all(|kind| kind == "none")
        })
    }

    /// Whether `hook` is expected missing (`none` its only kind).
    pub fn missing(&self, hook: &str) -> bool {
        self.0
            .get(hook)
            .is_some_and(|kinds| kinds.iter().all(|kind| kind == "none"))
    }

    /// What differs between `probe_info` (hook -> kind) and the expectation.
    pub fn mismatches(&self, probe_info: &BTreeMap<String, String>) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|(hook, kinds)| {
                let shown = probe_info
                    .get(hook)
                    .map_or("(not exported)", String::as_str);
                (!kinds.iter().any(|kind| kind == shown))
                    .then(|| format!("{hook}: {shown}, expected {}", kinds.join(" or ")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_follow_the_kernels() {
        use Mode::*;
        let v6_1 = Target::Vm(Arch::Amd64, Series::V6_1);
        let v6_12 = Target::Vm(Arch::Amd64, Series::V6_12);
        let arm64_v6_1 = Target::Vm(Arch::Arm64, Series::V6_1);
        let arm64_v6_12 = Target::Vm(Arch::Arm64, Series::V6_12);
        assert_eq!(expected_kinds(v6_12, Default, "send"), ["fentry"]);
        assert_eq!(expected_kinds(v6_1, Default, "send"), ["fentry"]);
        assert_eq!(expected_kinds(arm64_v6_12, Default, "send"), ["fentry"]);
        assert_eq!(expected_kinds(arm64_v6_1, Default, "send"), ["kprobe"]);
        assert_eq!(expected_kinds(arm64_v6_1, Default, "keepalive"), ["kprobe"]);
        assert_eq!(expected_kinds(arm64_v6_1, NoFentryKprobe, "send"), ["none"]);
        assert_eq!(expected_kinds(v6_1, NoFentry, "keepalive"), ["kprobe"]);
        assert_eq!(expected_kinds(v6_1, NoFentryKprobe, "send"), ["none"]);
        assert_eq!(
            expected_kinds(v6_12, NoFentryKprobe, "receive"),
            ["tp_btf", "raw_tp"]
        );
        assert_eq!(
            expected_kinds(v6_12, NoFentryKprobe, "keepalive"),
            ["tp_btf", "raw_tp"]
        );
        for mode in Mode::ALL {
            for hook in ["send", "receive", "keepalive"] {
                assert_eq!(
                    expected_kinds(Target::Native, mode, hook),
                    ["tp_btf", "raw_tp"]
                );
            }
        }
        assert!(expected_kinds(v6_1, Default, "state").contains(&"tracepoint"));
        assert!(expected_kinds(v6_1, Default, "unknown").is_empty());
        // Every hook is named; only a mode without fentry and kprobe is unready.
        let text = expectation(v6_1, NoFentryKprobe);
        assert!(
            text.starts_with("send=none,receive=tp_btf|raw_tp,"),
            "{text}"
        );
        assert!(HOOKS.iter().all(|hook| text.contains(&format!("{hook}="))));
        assert!(!Expected::parse(&text).expect("parses").ready());
        assert!(
            Expected::parse(&expectation(v6_1, NoFentry))
                .expect("parses")
                .ready()
        );
        assert!(
            Expected::parse(&expectation(Target::Native, Default))
                .expect("parses")
                .ready()
        );
    }

    #[test]
    fn the_variable_round_trips_and_judges() {
        let text = Expected::render(&[("send", &["none"]), ("receive", &["tp_btf", "raw_tp"])]);
        assert_eq!(text, "send=none,receive=tp_btf|raw_tp");
        let expected = Expected::parse(&text).expect("parses");
        assert!(!expected.ready());
        let info: BTreeMap<String, String> = [("send", "none"), ("receive", "kprobe")]
            .into_iter()
            .map(|(hook, kind)| (hook.to_owned(), kind.to_owned()))
            .collect();
        assert_eq!(
            expected.mismatches(&info),
            ["receive: kprobe, expected tp_btf or raw_tp"]
        );
        assert!(Expected::parse("keepalive=none").expect("parses").ready());
        assert!(expected.missing("send") && !expected.missing("receive"));
        assert!(!expected.missing("state"));
        assert!(Expected::parse("send").is_err());
        assert!(Expected::parse("send=fentry|").is_err());
    }
}
