//! Per-destination idle timeouts, read from the file given with `--config`.
//!
//! `--idle-timeout` (350 s, the AWS NAT gateway's) is right for traffic leaving the VPC, but
//! destinations inside the VPC may pass no NAT at all, and an NLB's timeout can be set
//! anywhere from 60 to 6000 s. The config file overrides the timeout per destination:
//!
//! ```toml
//! # Each [[path]] overrides the idle timeout for destinations it matches.
//! # The most specific CIDR wins; among equally specific ones, the first in the file.
//! [[path]]
//! name = "in-vpc"               # optional label, shown in the JSON API
//! cidr = "10.0.0.0/8"           # required: an IPv4 or IPv6 CIDR (a bare address means /32 or /128)
//! ports = [5432, "8000-8100"]   # optional: ports or inclusive ranges; absent means every port
//! idle_timeout = "none"         # seconds (a positive integer) or "none" (no middlebox on this path);
//!                               # required unless `kind` implies it
//!
//! [[path]]
//! name = "internal-nlb"
//! cidr = "10.20.0.0/16"
//! ports = [443]
//! idle_timeout = 6000
//! ```
//!
//! A rule may say what sits on the path with `kind`, which sets the timeout and what the
//! middlebox does to the next packet of a flow it forgot (`on_idle`), from AWS's
//! documentation; the explanations of deaths and fixes then name it ("the GWLB forgot the
//! flow after 350 s idle and dropped the next packet"):
//!
//! | `kind`           | `idle_timeout`                  | `on_idle`                       |
//! |------------------|---------------------------------|---------------------------------|
//! | `"nat_gateway"`  | 350, fixed                      | `"reset"` only                  |
//! | `"vpc_endpoint"` | 350, fixed                      | `"reset"` only                  |
//! | `"nlb"`          | 350 by default, 60 to 6000      | `"reset"` only                  |
//! | `"gwlb"`         | 350 by default, 60 to 6000      | `"drop"` by default, or `"reset"` (`send_tcp_reset.on_idle_timeout`) |
//! | `"firewall"`     | required                        | `"drop"` by default, or `"reset"` |
//! | `"none"`         | `"none"` (may be left out)      | not allowed: nothing times out  |
//! | absent           | required                        | `"reset"` by default, or `"drop"` |
//!
//! A reset path predicts an ECONNRESET at the first send after idle (a `reset_received`
//! event); a drop path predicts retransmissions until `tcp_retries2` or TCP_USER_TIMEOUT
//! give up with ETIMEDOUT (a `retransmit_timeout` event). Anything outside the table, such
//! as `kind = "nlb"` with `on_idle = "drop"` or `idle_timeout = 30`, is an error at its line.
//!
//! Further rules:
//! - Only the top-level keys `path` and `enforce` are allowed, and only the keys above
//!   inside them; any other key is an error, so a misspelt key cannot silently leave a
//!   rule half-applied.
//! - A CIDR with host bits set is accepted as its network: `10.1.2.3/8` means `10.0.0.0/8`.
//! - Ports are 1 to 65535; a range `"first-last"` includes both ends and needs
//!   first ≤ last; a single port may also be written as a string (`"443"`). An empty
//!   `ports = []` is an error: leave the key out to match every port.
//! - `idle_timeout` is at most 2147483648 (2^31) seconds.
//! - IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`), which dual-stack sockets report, are
//!   IPv4 destinations: they match IPv4 rules, and a rule written as an IPv4-mapped CIDR
//!   (`::ffff:10.0.0.0/104`) is the IPv4 rule (`10.0.0.0/8`).
//! - A rule is labelled by its `name`, or else by its `cidr` as written.
//! - An empty file (or one with only comments) has no rules: `--idle-timeout` applies everywhere.
//! - Every error names the file and the 1-based line of the offending key or value, e.g.
//!   `idlemon.toml:7: idle_timeout must be a positive number of seconds or "none", got 0`.
//!
//! Keepalive enforcement (`--enforce-keepalive`) takes its settings from an `[enforce]` table:
//!
//! ```toml
//! [enforce]
//! mode = "dry-run"              # off, dry-run or on; --enforce-keepalive overrides it
//! cgroups = ["/system.slice/billing.service", "/kubepods.slice/kubepods-burstable.slice"]
//!                               # cgroup v2 directories whose processes' sockets are enforced
//!                               # (and everything below them); absent: every workload
//! units = ["billing.service"]   # systemd units on plain hosts: /system.slice/NAME
//!                               # (".service" added to a name without a unit type)
//! namespaces = ["payments"]     # Kubernetes namespaces (DNS-1123 labels: lowercase letters,
//!                               # digits and -, at most 63); absent: every namespace
//! pod_labels = { app = "billing" } # a pod label selector: every label must match (Kubernetes
//!                               # label names and values); absent: every pod
//! idle_percent = 50             # TCP_KEEPIDLE = this percentage of the path's idle timeout (1-80)
//! interval = 30                 # TCP_KEEPINTVL, seconds (1-32767)
//! count = 5                     # TCP_KEEPCNT (1-127)
//! accepted = false              # also accepted connections, not only outbound ones
//! override = false              # rewrite an application's own SO_KEEPALIVE off / slower
//!                               # TCP_KEEPIDLE on an enforced socket to idlemon's (else: reported)
//! cgroup_root = "/sys/fs/cgroup" # the cgroup v2 mount; absent: found in /proc/self/mounts
//! ```

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{AddrParseError, IpAddr};
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

/// Far above any real middlebox (NLBs stop at 6000 s); a bigger value is a typo, not a timeout.
const MAX_IDLE_TIMEOUT_SECS: u32 = 1 << 31;

/// What the path's middlebox does to idle flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleTimeout {
    /// The middlebox drops the flow after this many idle seconds.
    After(NonZeroU32),
    /// No middlebox tracks the flow, so it may idle forever.
    Never,
}

/// What sits on a path (`kind`): its defaults, and the words that explain what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// An AWS NAT gateway: 350 s, fixed; a packet of a forgotten flow gets a RST.
    NatGateway,
    /// A Network Load Balancer: 350 s by default, 60-6000 s; resets.
    Nlb,
    /// A Gateway Load Balancer: 350 s by default, 60-6000 s; drops silently unless
    /// `send_tcp_reset.on_idle_timeout` is on (`on_idle = "reset"`).
    Gwlb,
    /// An interface VPC endpoint (PrivateLink): 350 s, fixed; resets.
    VpcEndpoint,
    /// A firewall or security-group connection tracking: a timeout of its own
    /// (required); drops by default.
    Firewall,
    /// Nothing that tracks flows: never at risk from idle, never enforced.
    None,
}

impl PathKind {
    pub const ALL: [Self; 6] = [
        Self::NatGateway,
        Self::Nlb,
        Self::Gwlb,
        Self::VpcEndpoint,
        Self::Firewall,
        Self::None,
    ];

    /// The config value, the JSON value and the `path_kind` label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NatGateway => "nat_gateway",
            Self::Nlb => "nlb",
            Self::Gwlb => "gwlb",
            Self::VpcEndpoint => "vpc_endpoint",
            Self::Firewall => "firewall",
            Self::None => "none",
        }
    }

    /// The middlebox in a sentence: "the GWLB forgot the flow".
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::NatGateway => "the NAT gateway",
            Self::Nlb => "the NLB",
            Self::Gwlb => "the GWLB",
            Self::VpcEndpoint => "the VPC endpoint",
            Self::Firewall => "the firewall",
            Self::None => "nothing on the path",
        }
    }

    /// The timeout when `idle_timeout` is left out (AWS's documented defaults); None: required.
    fn default_timeout(self) -> Option<NonZeroU32> {
        match self {
            Self::NatGateway | Self::Nlb | Self::Gwlb | Self::VpcEndpoint => NonZeroU32::new(350),
            Self::Firewall | Self::None => None,
        }
    }

    /// The timeouts the middlebox can be configured with, in seconds.
    fn timeout_range(self) -> (u32, u32) {
        match self {
            Self::NatGateway | Self::VpcEndpoint => (350, 350),
            Self::Nlb | Self::Gwlb => (60, 6000),
            Self::Firewall | Self::None => (1, MAX_IDLE_TIMEOUT_SECS),
        }
    }

    fn default_on_idle(self) -> OnIdle {
        match self {
            Self::NatGateway | Self::Nlb | Self::VpcEndpoint | Self::None => OnIdle::Reset,
            Self::Gwlb | Self::Firewall => OnIdle::Drop,
        }
    }

    /// Whether the middlebox can forget a flow silently (NAT gateways, NLBs and VPC
    /// endpoints always answer with a RST).
    fn can_drop(self) -> bool {
        matches!(self, Self::Gwlb | Self::Firewall)
    }
}

/// What a middlebox does with the next packet of a flow it forgot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIdle {
    /// Answers with a RST: the application gets ECONNRESET at once.
    Reset,
    /// Drops it: the sender retransmits until `tcp_retries2` or TCP_USER_TIMEOUT gives
    /// up, then ETIMEDOUT, often 15 minutes later.
    Drop,
}

impl OnIdle {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reset => "reset",
            Self::Drop => "drop",
        }
    }
}

/// A path with an idle timeout as the explanations word it: what sits there, and what it
/// does to a flow it forgot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathBehaviour {
    /// None: the rule names no kind, or the default path (`--idle-timeout`).
    pub kind: Option<PathKind>,
    pub on_idle: OnIdle,
    pub timeout_seconds: u32,
}

impl PathBehaviour {
    /// "the GWLB", or "the path's middlebox" where no kind is named.
    #[must_use]
    pub fn who(&self) -> &'static str {
        self.kind.map_or("the path's middlebox", PathKind::describe)
    }

    /// What happens to a flow left idle too long, in the present tense:
    /// "the GWLB forgets a flow idle 350 s and drops its next packet: ...".
    #[must_use]
    pub fn forgets(&self) -> String {
        let timeout = self.timeout_seconds;
        match self.on_idle {
            OnIdle::Reset => format!(
                "{} forgets a flow idle {timeout} s and answers its next packet with a reset (ECONNRESET at once)",
                self.who()
            ),
            OnIdle::Drop => format!(
                "{} forgets a flow idle {timeout} s and drops its next packet: the request hangs while the kernel retransmits, until tcp_retries2 or TCP_USER_TIMEOUT gives up with ETIMEDOUT (about 15 minutes by default)",
                self.who()
            ),
        }
    }

    /// What the path did to a flow that idled `idle_seconds`, for the event that followed
    /// (`reset`: a RST arrived; else the kernel gave up after `retransmissions`).
    #[must_use]
    pub fn forgot(&self, idle_seconds: f64, reset: bool, retransmissions: u32) -> String {
        let (who, timeout) = (self.who(), self.timeout_seconds);
        let forgot = format!(
            "{who} forgot the flow after {idle_seconds:.0} s idle (its timeout: {timeout} s)"
        );
        match (self.on_idle, reset) {
            (OnIdle::Reset, true) => format!("{forgot} and answered the next packet with a reset"),
            (OnIdle::Drop, false) => format!(
                "{forgot} and dropped the next packet; the kernel retransmitted it {retransmissions} times, then gave up with ETIMEDOUT"
            ),
            (OnIdle::Drop, true) => format!(
                "idle {idle_seconds:.0} s, past the {timeout} s timeout of {who}, which drops forgotten flows without a reset: this reset came from elsewhere (the server's own idle timeout, or another middlebox)"
            ),
            (OnIdle::Reset, false) => format!(
                "{forgot}; it answers with a reset, but none arrived (lost, or something on the path drops): the kernel retransmitted {retransmissions} times, then gave up with ETIMEDOUT"
            ),
        }
    }
}

/// The timeout that applies to one destination, and which rule chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathMatch<'a> {
    pub timeout: IdleTimeout,
    /// The rule's name, or its cidr text when unnamed; `None` when the default applied.
    pub rule: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The io error is deliberately not `#[source]`: it is already in the message, and error
    // reporters that walk the source chain (anyhow's `{:#}`) would print it twice.
    #[error("cannot read config file {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{origin}:{line}: {message}")]
    Invalid {
        origin: String,
        /// 1-based line of the offending key or value.
        line: usize,
        message: String,
    },
}

/// The `[[path]]` rules of a config file, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct PathConfig {
    /// Sorted by prefix length, longest first, and otherwise in file order (the sort is
    /// stable), so the first rule that matches is the one the precedence rules choose.
    rules: Vec<Rule>,
    /// The `[enforce]` table.
    pub enforce: EnforceConfig,
}

/// `--enforce-keepalive`: what the keepalive enforcement program does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EnforceMode {
    /// Not loaded.
    #[default]
    Off,
    /// Decides, counts and reports; changes nothing.
    DryRun,
    /// Decides, counts, reports and sets the keepalive.
    On,
}

impl EnforceMode {
    /// The `mode` label and event field.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::DryRun => "dry_run",
            Self::On => "on",
        }
    }
}

/// The `[enforce]` table (see the module docs); defaults where a key is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnforceConfig {
    /// None: not in the file (`--enforce-keepalive`, else off).
    pub mode: Option<EnforceMode>,
    /// cgroup v2 directories, relative to the cgroup root, each starting with `/`; empty: all.
    pub cgroups: Vec<String>,
    /// Kubernetes namespaces whose pods' sockets are enforced; empty: every namespace.
    pub namespaces: Vec<String>,
    /// A pod label selector: every label must match; empty: every pod.
    pub pod_labels: BTreeMap<String, String>,
    pub cgroup_root: Option<PathBuf>,
    pub idle_percent: u32,
    pub interval_seconds: u32,
    pub count: u32,
    pub accepted: bool,
    /// `override`: rewrite an application's weakening of an enforced socket's keepalive.
    pub override_weakening: bool,
}

impl EnforceConfig {
    /// Whether pods are selected by namespace or label (which needs the pod watch).
    #[must_use]
    pub fn selects_pods(&self) -> bool {
        !self.namespaces.is_empty() || !self.pod_labels.is_empty()
    }
}

impl Default for EnforceConfig {
    fn default() -> Self {
        Self {
            mode: None,
            cgroups: Vec::new(),
            namespaces: Vec::new(),
            pod_labels: BTreeMap::new(),
            cgroup_root: None,
            idle_percent: 50,
            interval_seconds: 30,
            count: 5,
            accepted: false,
            override_weakening: false,
        }
    }
}

/// The keepalive idle time is at most this percentage of the path's timeout, so that the
/// first probe goes out well before the middlebox forgets the flow.
pub const MAX_IDLE_PERCENT: u32 = 80;
/// The kernel's `MAX_TCP_KEEPIDLE` and `MAX_TCP_KEEPINTVL` (seconds) and `MAX_TCP_KEEPCNT`.
pub const MAX_KEEPALIVE_SECONDS: u32 = 32_767;
pub const MAX_KEEPALIVE_COUNT: u32 = 127;

/// One rule as the kernel's enforcement program matches it.
#[derive(Debug, Clone)]
pub struct RuleView<'a> {
    pub net: IpNet,
    /// Inclusive port ranges; None: every port.
    pub ports: Option<Vec<(u16, u16)>>,
    pub timeout: IdleTimeout,
    pub label: &'a str,
}

#[derive(Debug, Clone)]
struct Rule {
    net: IpNet,
    /// `None` matches every port.
    ports: Option<Box<[PortRange]>>,
    timeout: IdleTimeout,
    /// None: no `kind`, a timeout given by itself.
    kind: Option<PathKind>,
    /// None when the timeout is `Never`.
    on_idle: Option<OnIdle>,
    label: Box<str>,
}

#[derive(Debug, Clone, Copy)]
struct PortRange {
    first: u16,
    last: u16,
}

impl PathConfig {
    /// Reads and parses the config file; errors name the file as `path` is given.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Io`] if the file cannot be read (or is not UTF-8), otherwise as [`Self::parse`].
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses config text; `origin` names it in error messages.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`], with the line of the first offending key or value, if the
    /// text is not TOML or breaks any rule in the module docs.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let invalid = |offset: usize, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            line: line_of(text, offset),
            message,
        };
        let file: RawFile = toml::from_str(text).map_err(|e| {
            // TOML has keys where serde has fields.
            let message = match e.message().strip_prefix("unknown field `") {
                Some(rest) => format!("unknown key `{rest}"),
                None => e.message().to_owned(),
            };
            invalid(e.span().map_or(0, |s| s.start), message)
        })?;
        let mut rules = file
            .path
            .iter()
            .map(|raw| Rule::from_raw(raw, text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(e.span.start, e.message))?;
        rules.sort_by_key(|rule| Reverse(rule.net.prefix_len()));
        let enforce = match &file.enforce {
            Some(raw) => {
                EnforceConfig::from_raw(raw, text).map_err(|e| invalid(e.span.start, e.message))?
            }
            None => EnforceConfig::default(),
        };
        Ok(Self { rules, enforce })
    }

    /// Every rule in precedence order: the first that matches a destination applies.
    pub fn rules_in_order(&self) -> impl Iterator<Item = RuleView<'_>> {
        self.rules.iter().map(|rule| RuleView {
            net: rule.net,
            ports: rule
                .ports
                .as_deref()
                .map(|ports| ports.iter().map(|r| (r.first, r.last)).collect()),
            timeout: rule.timeout,
            label: &rule.label,
        })
    }

    /// How many rules.
    #[must_use]
    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    /// Longest-prefix match on the remote address among rules whose ports include `port`.
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`), which dual-stack sockets report, match IPv4 rules.
    #[must_use]
    pub fn timeout_for(&self, remote: IpAddr, port: u16, default: IdleTimeout) -> PathMatch<'_> {
        match self.find(remote, port) {
            Some(index) => PathMatch {
                timeout: self.timeout(index),
                rule: Some(self.label(index)),
            },
            None => PathMatch {
                timeout: default,
                rule: None,
            },
        }
    }

    /// The index of the rule `timeout_for` picks, for `timeout` and `label`.
    #[must_use]
    pub fn find(&self, remote: IpAddr, port: u16) -> Option<usize> {
        let remote = remote.to_canonical();
        self.rules
            .iter()
            .position(|rule| rule.matches(remote, port))
    }

    /// The timeout of rule `index` (from `find`).
    #[must_use]
    pub fn timeout(&self, index: usize) -> IdleTimeout {
        self.rules[index].timeout
    }

    /// What sits on the path of rule `index` (from `find`); None: the rule names no kind.
    #[must_use]
    pub fn kind(&self, index: usize) -> Option<PathKind> {
        self.rules[index].kind
    }

    /// What the middlebox of rule `index` does to a forgotten flow; None: no timeout.
    #[must_use]
    pub fn on_idle(&self, index: usize) -> Option<OnIdle> {
        self.rules[index].on_idle
    }

    /// The name (or cidr text) of rule `index` (from `find`).
    #[must_use]
    pub fn label(&self, index: usize) -> &str {
        &self.rules[index].label
    }
}

impl Rule {
    fn matches(&self, remote: IpAddr, port: u16) -> bool {
        self.net.contains(&remote)
            && self
                .ports
                .as_deref()
                .is_none_or(|ports| ports.iter().any(|r| r.first <= port && port <= r.last))
    }

    fn from_raw(raw: &Spanned<RawRule>, text: &str) -> Result<Self, Invalid> {
        let rule = raw.get_ref();
        let kind = match &rule.kind {
            Some(kind) => Some((parse_kind(kind, text)?, kind)),
            None => None,
        };
        // A kind that implies its timeout makes `idle_timeout` optional.
        let timeout_implied = kind.is_some_and(|(kind, _)| kind.default_timeout().is_some());
        let Some(cidr) = &rule.cidr else {
            let missing = if rule.idle_timeout.is_none() && !timeout_implied {
                "keys `cidr` and `idle_timeout`"
            } else {
                "key `cidr`"
            };
            return Err(Invalid::new(
                raw.span(),
                format!("[[path]] table is missing required {missing}"),
            ));
        };

        let name = match &rule.name {
            Some(name) => {
                let text = expect_str(name, text, "name must be a string")?;
                if text.is_empty() {
                    // The label identifies the rule in the JSON API; an empty one identifies nothing.
                    return Err(Invalid::new(name.span(), "name must not be empty".into()));
                }
                Some(text)
            }
            None => None,
        };

        let cidr_text = expect_str(cidr, text, "cidr must be a string such as \"10.0.0.0/8\"")?;
        let net = parse_cidr(cidr_text).map_err(|why| {
            Invalid::new(cidr.span(), format!("invalid CIDR {cidr_text:?}: {why}"))
        })?;

        let ports = match &rule.ports {
            Some(ports) => Some(parse_ports(ports, text)?),
            None => None,
        };

        let timeout = match &rule.idle_timeout {
            Some(value) => Some((parse_timeout(value, text)?, value)),
            None => None,
        };
        let on_idle = match &rule.on_idle {
            Some(value) => Some((parse_on_idle(value, text)?, value)),
            None => None,
        };
        let (timeout, on_idle) = path_behaviour(raw.span(), kind, timeout, on_idle, text)?;

        Ok(Self {
            net,
            ports,
            timeout,
            kind: kind.map(|(kind, _)| kind),
            on_idle,
            label: name.unwrap_or(cidr_text).into(),
        })
    }
}

/// The timeout and idle behaviour of a rule from its `kind`, `idle_timeout` and `on_idle`,
/// refusing the combinations the kind rules out.
fn path_behaviour(
    rule: Range<usize>,
    kind: Option<(PathKind, &Spanned<Raw>)>,
    timeout: Option<(IdleTimeout, &Spanned<Raw>)>,
    on_idle: Option<(OnIdle, &Spanned<Raw>)>,
    text: &str,
) -> Result<(IdleTimeout, Option<OnIdle>), Invalid> {
    let timeout = match (kind, timeout) {
        (None, None) => {
            return Err(Invalid::new(
                rule,
                "[[path]] table is missing required key `idle_timeout`".into(),
            ));
        }
        (None, Some((timeout, _))) => timeout,
        (Some((kind, _)), None) => match kind {
            PathKind::None => IdleTimeout::Never,
            _ => match kind.default_timeout() {
                Some(secs) => IdleTimeout::After(secs),
                None => {
                    return Err(Invalid::new(
                        rule,
                        format!(
                            "[[path]] table with kind = \"{}\" is missing required key `idle_timeout` ({} timeouts differ)",
                            kind.as_str(),
                            kind.describe()
                        ),
                    ));
                }
            },
        },
        (Some((PathKind::None, _)), Some((IdleTimeout::Never, _))) => IdleTimeout::Never,
        (Some((PathKind::None, _)), Some((IdleTimeout::After(_), value))) => {
            return Err(Invalid::new(
                value.span(),
                format!(
                    "idle_timeout = {} contradicts kind = \"none\" (no middlebox, so no idle timeout); leave it out",
                    written(value, text)
                ),
            ));
        }
        (Some((kind, _)), Some((IdleTimeout::Never, value))) => {
            return Err(Invalid::new(
                value.span(),
                format!(
                    "idle_timeout = \"none\" contradicts kind = \"{}\": {} forgets idle flows (use kind = \"none\" for a path without a middlebox)",
                    kind.as_str(),
                    kind.describe()
                ),
            ));
        }
        (Some((kind, _)), Some((IdleTimeout::After(secs), value))) => {
            let (low, high) = kind.timeout_range();
            if secs.get() < low || secs.get() > high {
                let allowed = if low == high {
                    format!("is fixed at {low} seconds")
                } else {
                    format!("must be from {low} to {high} seconds")
                };
                return Err(Invalid::new(
                    value.span(),
                    format!(
                        "idle_timeout of {} {allowed}, got {}",
                        kind.describe(),
                        written(value, text)
                    ),
                ));
            }
            IdleTimeout::After(secs)
        }
    };
    if timeout == IdleTimeout::Never {
        if let Some((_, value)) = on_idle {
            return Err(Invalid::new(
                value.span(),
                "on_idle has no meaning on a path without an idle timeout".into(),
            ));
        }
        return Ok((timeout, None));
    }
    let on_idle = match (kind, on_idle) {
        (Some((kind, _)), Some((OnIdle::Drop, value))) if !kind.can_drop() => {
            return Err(Invalid::new(
                value.span(),
                format!(
                    "on_idle = \"drop\" contradicts kind = \"{}\": {} answers a forgotten flow with a reset",
                    kind.as_str(),
                    kind.describe()
                ),
            ));
        }
        (_, Some((on_idle, _))) => on_idle,
        (Some((kind, _)), None) => kind.default_on_idle(),
        // Without a kind, the NAT gateway's behaviour, which idlemon assumed before kinds.
        (None, None) => OnIdle::Reset,
    };
    Ok((timeout, Some(on_idle)))
}

fn parse_kind(value: &Spanned<Raw>, text: &str) -> Result<PathKind, Invalid> {
    const EXPECTED: &str = "kind must be \"nat_gateway\", \"nlb\", \"gwlb\", \"vpc_endpoint\", \"firewall\" or \"none\"";
    let name = expect_str(value, text, EXPECTED)?;
    PathKind::ALL
        .into_iter()
        .find(|kind| kind.as_str() == name)
        .ok_or_else(|| {
            Invalid::new(
                value.span(),
                format!("{EXPECTED}, got {}", written(value, text)),
            )
        })
}

fn parse_on_idle(value: &Spanned<Raw>, text: &str) -> Result<OnIdle, Invalid> {
    const EXPECTED: &str = "on_idle must be \"reset\" or \"drop\"";
    match expect_str(value, text, EXPECTED)? {
        "reset" => Ok(OnIdle::Reset),
        "drop" => Ok(OnIdle::Drop),
        _ => Err(Invalid::new(
            value.span(),
            format!("{EXPECTED}, got {}", written(value, text)),
        )),
    }
}

impl EnforceConfig {
    fn from_raw(raw: &Spanned<RawEnforce>, text: &str) -> Result<Self, Invalid> {
        let table = raw.get_ref();
        let mut config = Self::default();
        if let Some(mode) = &table.mode {
            let name = expect_str(mode, text, "mode must be \"off\", \"dry-run\" or \"on\"")?;
            config.mode = Some(match name {
                "off" => EnforceMode::Off,
                "dry-run" => EnforceMode::DryRun,
                "on" => EnforceMode::On,
                _ => {
                    return Err(Invalid::new(
                        mode.span(),
                        format!(
                            "mode must be \"off\", \"dry-run\" or \"on\", got {}",
                            written(mode, text)
                        ),
                    ));
                }
            });
        }
        if let Some(cgroups) = &table.cgroups {
            for entry in expect_array(
                cgroups,
                text,
                "cgroups must be an array of cgroup paths such as \"/system.slice/app.service\"",
            )? {
                let path = expect_str(entry, text, "cgroups entries must be strings")?;
                if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
                    return Err(Invalid::new(
                        entry.span(),
                        format!(
                            "cgroups entry {} must be a path from the cgroup root, starting with / and without ..",
                            written(entry, text)
                        ),
                    ));
                }
                config.cgroups.push(path.to_owned());
            }
        }
        if let Some(units) = &table.units {
            for entry in expect_array(
                units,
                text,
                "units must be an array of systemd unit names such as \"billing.service\"",
            )? {
                let name = expect_str(entry, text, "units entries must be strings")?;
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    return Err(Invalid::new(
                        entry.span(),
                        format!(
                            "units entry {} must be a systemd unit name such as \"billing.service\"",
                            written(entry, text)
                        ),
                    ));
                }
                // A system unit's cgroup (systemd's default Slice=system.slice).
                let unit = if name.contains('.') {
                    name.to_owned()
                } else {
                    format!("{name}.service")
                };
                config.cgroups.push(format!("/system.slice/{unit}"));
            }
        }
        if let Some(namespaces) = &table.namespaces {
            for entry in expect_array(
                namespaces,
                text,
                "namespaces must be an array of Kubernetes namespace names such as \"payments\"",
            )? {
                let name = expect_str(entry, text, "namespaces entries must be strings")?;
                if !is_dns_label(name) {
                    return Err(Invalid::new(
                        entry.span(),
                        format!(
                            "namespaces entry {} must be a Kubernetes namespace name (lowercase letters, digits and -, starting and ending with a letter or digit, at most 63 characters)",
                            written(entry, text)
                        ),
                    ));
                }
                config.namespaces.push(name.to_owned());
            }
        }
        if let Some(labels) = &table.pod_labels {
            if labels.get_ref().is_empty() {
                // An empty selector selects every pod, which an absent key already says.
                return Err(Invalid::new(
                    labels.span(),
                    "pod_labels must not be empty; leave it out to select every pod".into(),
                ));
            }
            for (key, value) in labels.get_ref() {
                if !is_label_key(key.get_ref()) {
                    return Err(Invalid::new(
                        key.span(),
                        format!(
                            "pod_labels key {:?} is not a Kubernetes label name (an optional DNS subdomain and /, then at most 63 letters, digits, -, _ or ., starting and ending with a letter or digit)",
                            key.get_ref()
                        ),
                    ));
                }
                let shown = key.get_ref();
                let label = expect_str(
                    value,
                    text,
                    &format!("pod_labels value of {shown} must be a string"),
                )?;
                if !is_label_value(label) {
                    return Err(Invalid::new(
                        value.span(),
                        format!(
                            "pod_labels value {} of {shown} is not a Kubernetes label value (at most 63 letters, digits, -, _ or ., starting and ending with a letter or digit)",
                            written(value, text)
                        ),
                    ));
                }
                config
                    .pod_labels
                    .insert(key.get_ref().clone(), label.to_owned());
            }
        }
        if let Some(root) = &table.cgroup_root {
            let path = expect_str(root, text, "cgroup_root must be a path")?;
            config.cgroup_root = Some(PathBuf::from(path));
        }
        let number = |value: &Option<Spanned<Raw>>,
                      name: &str,
                      range: std::ops::RangeInclusive<u32>,
                      default: u32| {
            let Some(value) = value else {
                return Ok(default);
            };
            match value.get_ref() {
                Raw::Int(n) if u32::try_from(*n).is_ok_and(|n| range.contains(&n)) => Ok(*n as u32),
                _ => Err(Invalid::new(
                    value.span(),
                    format!(
                        "{name} must be a whole number from {} to {}, got {}",
                        range.start(),
                        range.end(),
                        written(value, text)
                    ),
                )),
            }
        };
        config.idle_percent = number(
            &table.idle_percent,
            "idle_percent",
            1..=MAX_IDLE_PERCENT,
            config.idle_percent,
        )?;
        config.interval_seconds = number(
            &table.interval,
            "interval",
            1..=MAX_KEEPALIVE_SECONDS,
            config.interval_seconds,
        )?;
        config.count = number(&table.count, "count", 1..=MAX_KEEPALIVE_COUNT, config.count)?;
        if let Some(accepted) = &table.accepted {
            config.accepted = match accepted.get_ref() {
                Raw::Bool(value) => *value,
                _ => {
                    return Err(Invalid::new(
                        accepted.span(),
                        format!(
                            "accepted must be true or false, got {}",
                            written(accepted, text)
                        ),
                    ));
                }
            };
        }
        if let Some(value) = &table.override_ {
            config.override_weakening = match value.get_ref() {
                Raw::Bool(value) => *value,
                _ => {
                    return Err(Invalid::new(
                        value.span(),
                        format!(
                            "override must be true or false, got {}",
                            written(value, text)
                        ),
                    ));
                }
            };
        }
        Ok(config)
    }
}

/// A DNS-1123 label, as Kubernetes namespace names are: at most 63 lowercase letters,
/// digits and `-`, starting and ending with a letter or digit.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A label name: an optional prefix (a DNS-1123 subdomain, at most 253 characters) and `/`,
/// then a name of at most 63 characters that `is_label_value` accepts and is not empty.
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok =
        prefix.is_none_or(|prefix| prefix.len() <= 253 && prefix.split('.').all(is_dns_label));
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// A label value: empty, or at most 63 letters, digits, `-`, `_` and `.`, starting and
/// ending with a letter or digit.
fn is_label_value(value: &str) -> bool {
    let edge = |b: Option<u8>| b.is_none_or(|b| b.is_ascii_alphanumeric());
    value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && edge(value.bytes().next())
        && edge(value.bytes().next_back())
}

fn expect_array<'r>(
    value: &'r Spanned<Raw>,
    text: &str,
    what: &str,
) -> Result<&'r [Spanned<Raw>], Invalid> {
    match value.get_ref() {
        Raw::Array(entries) => Ok(entries),
        _ => Err(Invalid::new(
            value.span(),
            format!("{what}, got {}", written(value, text)),
        )),
    }
}

/// A semantic error, before its byte offset is turned into a line.
struct Invalid {
    span: Range<usize>,
    message: String,
}

impl Invalid {
    fn new(span: Range<usize>, message: String) -> Self {
        Self { span, message }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.bytes().take(offset).filter(|&b| b == b'\n').count() + 1
}

/// The value as the user wrote it, so the error shows exactly what to fix.
fn written(value: &Spanned<Raw>, text: &str) -> String {
    let source = text.get(value.span()).unwrap_or_default();
    let kind = match value.get_ref() {
        Raw::Array(_) => "an array",
        Raw::Str(_) => "a multi-line string",
        Raw::Map => "a table",
        Raw::Int(_) | Raw::Bool(_) | Raw::Other => "a value",
    };
    // A table's span may be its `[header]` or a dotted key's name, which would read as some
    // other value. Inline tables start with `{`; datetimes arrive as maps but start with a digit.
    let readable = !matches!(value.get_ref(), Raw::Map)
        || source.starts_with(|c: char| c == '{' || c.is_ascii_digit());
    if readable && !source.contains('\n') {
        source.to_owned()
    } else {
        kind.to_owned()
    }
}

fn expect_str<'r>(value: &'r Spanned<Raw>, text: &str, what: &str) -> Result<&'r str, Invalid> {
    match value.get_ref() {
        Raw::Str(s) => Ok(s),
        _ => Err(Invalid::new(
            value.span(),
            format!("{what}, got {}", written(value, text)),
        )),
    }
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|e: AddrParseError| e.to_string())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(prefix) => prefix
            .parse::<u8>()
            .ok()
            .filter(|&len| len <= max)
            .ok_or_else(|| format!("prefix length must be a number from 0 to {max}"))?,
        None => max,
    };
    let net = IpNet::new(addr, prefix).map_err(|e| e.to_string())?.trunc();
    Ok(match net {
        // Lookups see IPv4-mapped remotes as IPv4, so a rule written in mapped form must be
        // IPv4 too, or it could never match anything.
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    })
}

fn parse_timeout(value: &Spanned<Raw>, text: &str) -> Result<IdleTimeout, Invalid> {
    match value.get_ref() {
        Raw::Str(s) if s == "none" => return Ok(IdleTimeout::Never),
        Raw::Int(secs) if *secs > i64::from(MAX_IDLE_TIMEOUT_SECS) => {
            return Err(Invalid::new(
                value.span(),
                format!(
                    "idle_timeout must be at most {MAX_IDLE_TIMEOUT_SECS} seconds, got {}",
                    written(value, text)
                ),
            ));
        }
        Raw::Int(secs) => {
            if let Some(secs) = u32::try_from(*secs).ok().and_then(NonZeroU32::new) {
                return Ok(IdleTimeout::After(secs));
            }
        }
        _ => {}
    }
    Err(Invalid::new(
        value.span(),
        format!(
            "idle_timeout must be a positive number of seconds or \"none\", got {}",
            written(value, text)
        ),
    ))
}

fn parse_ports(value: &Spanned<Raw>, text: &str) -> Result<Box<[PortRange]>, Invalid> {
    let Raw::Array(entries) = value.get_ref() else {
        return Err(Invalid::new(
            value.span(),
            format!(
                "ports must be an array of ports and \"first-last\" ranges, got {}",
                written(value, text)
            ),
        ));
    };
    if entries.is_empty() {
        // An empty list would match no port at all, which is never what was meant.
        return Err(Invalid::new(
            value.span(),
            "ports must not be empty; leave it out to match every port".into(),
        ));
    }
    entries
        .iter()
        .map(|entry| parse_port_entry(entry, text))
        .collect()
}

fn parse_port_entry(entry: &Spanned<Raw>, text: &str) -> Result<PortRange, Invalid> {
    let shown = written(entry, text);
    let error = |message: String| Invalid::new(entry.span(), message);
    let outside = || error(format!("ports entry {shown} is outside 1-65535"));
    let port = |n: i64| u16::try_from(n).ok().filter(|&p| p != 0);
    match entry.get_ref() {
        Raw::Int(n) => port(*n)
            .map(|p| PortRange { first: p, last: p })
            .ok_or_else(outside),
        Raw::Str(s) => {
            let (first, last) = s.split_once('-').unwrap_or((s, s));
            let number = |n: &str| n.trim().parse::<i64>().ok();
            let (Some(first), Some(last)) = (number(first), number(last)) else {
                return Err(error(format!(
                    "ports entry must be a port or a \"first-last\" range, got {shown}"
                )));
            };
            let (Some(first), Some(last)) = (port(first), port(last)) else {
                return Err(outside());
            };
            if first > last {
                return Err(error(format!(
                    "ports entry {shown} is backwards: {first} is greater than {last}"
                )));
            }
            Ok(PortRange { first, last })
        }
        _ => Err(error(format!(
            "ports entry must be a port or a \"first-last\" range, got {shown}"
        ))),
    }
}

// Deserialization keeps every value loosely typed (`Raw`) and spanned, so type and range
// errors can be reported afterwards with our own wording and the value's line. The tables
// are serde derives that refuse unknown keys: the toml deserializer attaches the key's own
// span to that error, and `parse` words it as TOML does ("key", not serde's "field").

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default, deserialize_with = "rule_list")]
    path: Vec<Spanned<RawRule>>,
    enforce: Option<Spanned<RawEnforce>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [enforce] table")]
struct RawEnforce {
    mode: Option<Spanned<Raw>>,
    cgroups: Option<Spanned<Raw>>,
    units: Option<Spanned<Raw>>,
    namespaces: Option<Spanned<Raw>>,
    /// Any keys (label names, checked afterwards); serde words a value that is no table.
    pod_labels: Option<Spanned<BTreeMap<Spanned<String>, Spanned<Raw>>>>,
    cgroup_root: Option<Spanned<Raw>>,
    idle_percent: Option<Spanned<Raw>>,
    interval: Option<Spanned<Raw>>,
    count: Option<Spanned<Raw>>,
    accepted: Option<Spanned<Raw>>,
    #[serde(rename = "override")]
    override_: Option<Spanned<Raw>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[path]] table")]
struct RawRule {
    name: Option<Spanned<Raw>>,
    cidr: Option<Spanned<Raw>>,
    ports: Option<Spanned<Raw>>,
    kind: Option<Spanned<Raw>>,
    idle_timeout: Option<Spanned<Raw>>,
    on_idle: Option<Spanned<Raw>>,
}

/// The value of `path`. Serde's own expectation for a `Vec` reads "a sequence", which
/// says nothing to someone who wrote `[path]` for `[[path]]`; this visitor only words it.
fn rule_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Spanned<RawRule>>, D::Error> {
    struct ListVisitor;

    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<Spanned<RawRule>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of [[path]] tables")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut rules = Vec::new();
            while let Some(rule) = seq.next_element()? {
                rules.push(rule);
            }
            Ok(rules)
        }
    }

    deserializer.deserialize_seq(ListVisitor)
}

/// A TOML value with only the distinctions the checks need.
enum Raw {
    Int(i64),
    Str(String),
    Bool(bool),
    Array(Vec<Spanned<Raw>>),
    /// Tables, and datetimes, which the toml deserializer also hands over as maps.
    Map,
    /// Floats: never valid here.
    Other,
}

// `Raw` is the one hand-written impl: serde derives no "any value, spanned all the way
// down" type (an untagged enum buffers its input, which loses the spans of array entries).
impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor;

        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }

            fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }

            // Integers beyond i64 are out of range for every key; saturating keeps them
            // integers, so they get the out-of-range message rather than a type error.
            fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
                Ok(Raw::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }

            fn visit_i128<E>(self, v: i128) -> Result<Raw, E> {
                Ok(Raw::Int(i64::try_from(v).unwrap_or(if v < 0 {
                    i64::MIN
                } else {
                    i64::MAX
                })))
            }

            fn visit_u128<E>(self, v: u128) -> Result<Raw, E> {
                Ok(Raw::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }

            fn visit_f64<E>(self, _: f64) -> Result<Raw, E> {
                Ok(Raw::Other)
            }

            fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }

            fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_owned()))
            }

            fn visit_string<E>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Str(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Raw::Array(items))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
                // Tables and datetimes arrive as maps; drain them so the deserializer stays consistent.
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Raw::Map)
            }
        }

        deserializer.deserialize_any(RawVisitor)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const NAT: IdleTimeout = IdleTimeout::After(NonZeroU32::new(350).unwrap());

    fn secs(n: u32) -> IdleTimeout {
        IdleTimeout::After(NonZeroU32::new(n).unwrap())
    }

    fn config(text: &str) -> PathConfig {
        match PathConfig::parse(text, "idlemon.toml") {
            Ok(config) => config,
            Err(e) => panic!("config should parse, got: {e}"),
        }
    }

    /// The line and message of a config that must be rejected.
    fn error(text: &str) -> (usize, String) {
        match PathConfig::parse(text, "idlemon.toml") {
            Ok(_) => panic!("config should be rejected:\n{text}"),
            Err(ConfigError::Invalid {
                origin,
                line,
                message,
            }) => {
                assert_eq!(origin, "idlemon.toml");
                (line, message)
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }

    fn lookup<'a>(config: &'a PathConfig, remote: &str, port: u16) -> PathMatch<'a> {
        config.timeout_for(remote.parse().unwrap(), port, NAT)
    }

    fn hit(timeout: IdleTimeout, rule: &str) -> PathMatch<'_> {
        PathMatch {
            timeout,
            rule: Some(rule),
        }
    }

    const DEFAULT: PathMatch<'static> = PathMatch {
        timeout: NAT,
        rule: None,
    };

    /// The example from the module docs; it is also what the README shows.
    const DOC_EXAMPLE: &str = r#"# Each [[path]] overrides the idle timeout for destinations it matches.
# The most specific CIDR wins; among equally specific ones, the first in the file.
[[path]]
name = "in-vpc"               # optional label, shown in the JSON API
cidr = "10.0.0.0/8"           # required: an IPv4 or IPv6 CIDR (a bare address means /32 or /128)
ports = [5432, "8000-8100"]   # optional: ports or inclusive ranges; absent means every port
idle_timeout = "none"         # required: seconds (a positive integer) or "none" (no middlebox on this path)

[[path]]
name = "internal-nlb"
cidr = "10.20.0.0/16"
ports = [443]
idle_timeout = 6000
"#;

    #[test]
    fn doc_example() {
        let c = config(DOC_EXAMPLE);
        assert_eq!(c.rules(), 2);
        assert_eq!(
            lookup(&c, "10.1.2.3", 5432),
            hit(IdleTimeout::Never, "in-vpc")
        );
        assert_eq!(
            lookup(&c, "10.20.0.9", 443),
            hit(secs(6000), "internal-nlb")
        );
        // The /16 covers only 443; other ports fall back to the /8, then to the default.
        assert_eq!(
            lookup(&c, "10.20.0.9", 8080),
            hit(IdleTimeout::Never, "in-vpc")
        );
        assert_eq!(lookup(&c, "10.20.0.9", 22), DEFAULT);
        assert_eq!(lookup(&c, "52.1.2.3", 5432), DEFAULT);
    }

    #[test]
    fn realistic_file() {
        let c = config(
            r#"
# Everything in the VPC is reached directly, without the NAT gateway.
[[path]]
name = "vpc"
cidr = "10.0.0.0/16"
idle_timeout = "none"

# Kafka behind an internal NLB with a raised timeout.
[[path]]
name = "kafka-nlb"
cidr = "10.0.32.0/20"
ports = [9092, 9094, "9096-9098"]
idle_timeout = 3600

# An unnamed rule for a partner's IPv6 range behind a PrivateLink NLB.
[[path]]
cidr = "2600:1f18:abcd::/48"
idle_timeout = 350

[[path]]
name = "legacy-db"
cidr = "192.0.2.10"
ports = [5432]
idle_timeout = 60
"#,
        );
        assert_eq!(c.rules(), 4);
        assert_eq!(lookup(&c, "10.0.1.5", 22), hit(IdleTimeout::Never, "vpc"));
        assert_eq!(lookup(&c, "10.0.40.1", 9094), hit(secs(3600), "kafka-nlb"));
        assert_eq!(lookup(&c, "10.0.40.1", 9097), hit(secs(3600), "kafka-nlb"));
        assert_eq!(
            lookup(&c, "10.0.40.1", 9095),
            hit(IdleTimeout::Never, "vpc")
        );
        assert_eq!(
            lookup(&c, "2600:1f18:abcd:1::7", 443),
            hit(secs(350), "2600:1f18:abcd::/48")
        );
        assert_eq!(lookup(&c, "192.0.2.10", 5432), hit(secs(60), "legacy-db"));
        assert_eq!(lookup(&c, "192.0.2.11", 5432), DEFAULT);
        assert_eq!(lookup(&c, "8.8.8.8", 53), DEFAULT);
    }

    #[test]
    fn longest_prefix_wins_over_file_order() {
        let c = config(
            r#"
[[path]]
name = "wide"
cidr = "10.0.0.0/8"
idle_timeout = 100

[[path]]
name = "narrow"
cidr = "10.1.0.0/16"
idle_timeout = 200

[[path]]
name = "host"
cidr = "10.1.2.3/32"
idle_timeout = 300
"#,
        );
        assert_eq!(lookup(&c, "10.1.2.3", 80), hit(secs(300), "host"));
        assert_eq!(lookup(&c, "10.1.2.4", 80), hit(secs(200), "narrow"));
        assert_eq!(lookup(&c, "10.2.0.1", 80), hit(secs(100), "wide"));
    }

    #[test]
    fn equal_prefix_first_in_file_wins() {
        let c = config(
            r#"
[[path]]
name = "first"
cidr = "10.0.0.0/8"
idle_timeout = 100

[[path]]
name = "second"
cidr = "10.0.0.0/8"
idle_timeout = 200

[[path]]
name = "shorter"
cidr = "10.0.0.0/7"
idle_timeout = 300
"#,
        );
        assert_eq!(lookup(&c, "10.9.9.9", 80), hit(secs(100), "first"));
    }

    #[test]
    fn equal_prefix_with_ports_falls_through_to_next() {
        let c = config(
            r#"
[[path]]
name = "https"
cidr = "10.0.0.0/8"
ports = [443]
idle_timeout = 100

[[path]]
name = "rest"
cidr = "10.0.0.0/8"
idle_timeout = 200
"#,
        );
        assert_eq!(lookup(&c, "10.9.9.9", 443), hit(secs(100), "https"));
        assert_eq!(lookup(&c, "10.9.9.9", 444), hit(secs(200), "rest"));
    }

    #[test]
    fn port_lists_and_ranges() {
        let c = config(
            r#"
[[path]]
name = "db"
cidr = "0.0.0.0/0"
ports = [5432, "8000-8100", "9000", " 1 - 2 ", "65535-65535"]
idle_timeout = 100
"#,
        );
        for port in [5432, 8000, 8050, 8100, 9000, 1, 2, 65535] {
            assert_eq!(
                lookup(&c, "1.2.3.4", port),
                hit(secs(100), "db"),
                "port {port}"
            );
        }
        for port in [5431, 5433, 7999, 8101, 8999, 9001, 3, 65534] {
            assert_eq!(lookup(&c, "1.2.3.4", port), DEFAULT, "port {port}");
        }
    }

    #[test]
    fn absent_ports_match_every_port() {
        let c = config("[[path]]\ncidr = \"0.0.0.0/0\"\nidle_timeout = 7\n");
        for port in [0, 1, 80, 65535] {
            assert_eq!(lookup(&c, "1.2.3.4", port), hit(secs(7), "0.0.0.0/0"));
        }
    }

    #[test]
    fn ipv6_rules() {
        let c = config(
            r#"
[[path]]
name = "v6-net"
cidr = "2001:db8::/32"
idle_timeout = 120

[[path]]
name = "v6-host"
cidr = "2001:db8::1"
idle_timeout = 60
"#,
        );
        assert_eq!(lookup(&c, "2001:db8::1", 443), hit(secs(60), "v6-host"));
        assert_eq!(
            lookup(&c, "2001:db8:ffff::2", 443),
            hit(secs(120), "v6-net")
        );
        assert_eq!(lookup(&c, "2001:db9::1", 443), DEFAULT);
        // 32.1.13.184 has the same leading 32 bits as 2001:db8::, but families never mix.
        assert_eq!(lookup(&c, "32.1.13.184", 443), DEFAULT);
    }

    #[test]
    fn ipv4_mapped_remote_matches_ipv4_rule() {
        let c =
            config("[[path]]\nname = \"vpc\"\ncidr = \"10.0.0.0/8\"\nidle_timeout = \"none\"\n");
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        assert_eq!(
            c.timeout_for(mapped, 80, NAT),
            hit(IdleTimeout::Never, "vpc")
        );
        assert_eq!(
            lookup(&c, "::ffff:10.1.2.3", 80),
            hit(IdleTimeout::Never, "vpc")
        );
        assert_eq!(lookup(&c, "::ffff:11.1.2.3", 80), DEFAULT);
        // Only mapped addresses are IPv4; the deprecated IPv4-compatible form is plain IPv6.
        assert_eq!(lookup(&c, "::10.1.2.3", 80), DEFAULT);
    }

    #[test]
    fn ipv4_mapped_rule_matches_ipv4_remote() {
        let c = config("[[path]]\ncidr = \"::ffff:10.0.0.0/104\"\nidle_timeout = 9\n");
        assert_eq!(
            lookup(&c, "10.1.2.3", 80),
            hit(secs(9), "::ffff:10.0.0.0/104")
        );
        assert_eq!(
            lookup(&c, "::ffff:10.1.2.3", 80),
            hit(secs(9), "::ffff:10.0.0.0/104")
        );
        assert_eq!(lookup(&c, "11.1.2.3", 80), DEFAULT);
    }

    #[test]
    fn none_means_never() {
        let c = config("[[path]]\ncidr = \"172.16.0.0/12\"\nidle_timeout = \"none\"\n");
        let m = c.timeout_for(IpAddr::V4(Ipv4Addr::new(172, 20, 0, 1)), 80, NAT);
        assert_eq!(m, hit(IdleTimeout::Never, "172.16.0.0/12"));
    }

    #[test]
    fn default_when_nothing_matches() {
        let c = config("[[path]]\ncidr = \"10.0.0.0/8\"\nports = [443]\nidle_timeout = 5\n");
        assert_eq!(lookup(&c, "11.0.0.1", 443), DEFAULT);
        assert_eq!(lookup(&c, "10.0.0.1", 80), DEFAULT);
        let never = c.timeout_for(IpAddr::V6(Ipv6Addr::LOCALHOST), 443, IdleTimeout::Never);
        assert_eq!(
            never,
            PathMatch {
                timeout: IdleTimeout::Never,
                rule: None
            }
        );
    }

    #[test]
    fn host_bits_are_normalized() {
        let c = config("[[path]]\ncidr = \"10.1.2.3/8\"\nidle_timeout = 5\n");
        // Labelled as written, but matched as 10.0.0.0/8.
        assert_eq!(lookup(&c, "10.200.0.1", 80), hit(secs(5), "10.1.2.3/8"));
        assert_eq!(lookup(&c, "11.0.0.1", 80), DEFAULT);
    }

    #[test]
    fn timeout_bounds() {
        let c = config("[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 2147483648\n");
        assert_eq!(lookup(&c, "10.0.0.1", 1).timeout, secs(1 << 31));
        let c = config("[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 1\n");
        assert_eq!(lookup(&c, "10.0.0.1", 1).timeout, secs(1));
    }

    #[test]
    fn empty_file_has_no_rules() {
        for text in ["", "\n\n", "# only a comment\n"] {
            let c = config(text);
            assert_eq!(c.rules(), 0);
            assert_eq!(lookup(&c, "10.0.0.1", 80), DEFAULT);
        }
        assert_eq!(PathConfig::default().rules(), 0);
    }

    #[test]
    fn inline_tables_work_too() {
        let c = config(r#"path = [{ cidr = "10.0.0.0/8", idle_timeout = 10 }]"#);
        assert_eq!(lookup(&c, "10.0.0.1", 80), hit(secs(10), "10.0.0.0/8"));
    }

    // Errors: each names the line of the offending key or value, and the key or value itself.

    #[test]
    fn zero_timeout() {
        let text = r#"# comment
[[path]]
name = "ok"
cidr = "10.0.0.0/8"
idle_timeout = 60

[[path]]
cidr = "10.1.0.0/16"
idle_timeout = 0
"#;
        let e = PathConfig::parse(text, "idlemon.toml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "idlemon.toml:9: idle_timeout must be a positive number of seconds or \"none\", got 0"
        );
    }

    #[test]
    fn bad_timeouts() {
        for (value, shown) in [
            ("0", "got 0"),
            ("-5", "got -5"),
            ("1.5", "got 1.5"),
            ("300.0", "got 300.0"),
            ("\"forever\"", "got \"forever\""),
            ("\"None\"", "got \"None\""),
            ("\"350\"", "got \"350\""),
            ("true", "got true"),
            ("[350]", "got [350]"),
            ("1979-05-27", "got 1979-05-27"),
            ("{ secs = 5 }", "got { secs = 5 }"),
            ("[\n  350,\n]", "got an array"),
            ("-99999999999999999999", "got -99999999999999999999"),
        ] {
            let text = format!("[[path]]\ncidr = \"10.0.0.0/8\"\n\nidle_timeout = {value}\n");
            let (line, message) = error(&text);
            assert_eq!(line, 4, "{value}");
            assert_eq!(
                message,
                format!("idle_timeout must be a positive number of seconds or \"none\", {shown}")
            );
        }
        for value in ["2147483649", "99999999999999999999"] {
            let text = format!("[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = {value}\n");
            let (line, message) = error(&text);
            assert_eq!(line, 3);
            assert_eq!(
                message,
                format!("idle_timeout must be at most 2147483648 seconds, got {value}")
            );
        }
    }

    #[test]
    fn unknown_key_in_path() {
        let text = "[[path]]\ncidr = \"10.0.0.0/8\"\ncidrs = \"10.0.0.0/8\"\nidle_timeout = 5\n";
        let e = PathConfig::parse(text, "idlemon.toml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "idlemon.toml:3: unknown key `cidrs`, expected one of `name`, `cidr`, `ports`, `kind`, `idle_timeout`, `on_idle`"
        );
    }

    #[test]
    fn unknown_subtable_in_path() {
        let text = "[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 5\n\n[path.extra]\nx = 1\n";
        let (line, message) = error(text);
        assert_eq!(line, 5);
        assert!(message.starts_with("unknown key `extra`"), "{message}");
    }

    #[test]
    fn unknown_top_level_key() {
        let (line, message) = error("\n\nidle_timeout = 5\n");
        assert_eq!(line, 3);
        assert_eq!(
            message,
            "unknown key `idle_timeout`, expected `path` or `enforce`"
        );

        let (line, message) =
            error("[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 5\n[[paths]]\n");
        assert_eq!(line, 4);
        assert_eq!(message, "unknown key `paths`, expected `path` or `enforce`");
    }

    #[test]
    fn invalid_cidrs() {
        for (cidr, why) in [
            ("10.0.0.0/33", "prefix length must be a number from 0 to 32"),
            (
                "2001:db8::/129",
                "prefix length must be a number from 0 to 128",
            ),
            ("10.0.0.0/", "prefix length must be a number from 0 to 32"),
            ("10.0.0.0/-1", "prefix length must be a number from 0 to 32"),
            ("10.0.0/8", "invalid IP address syntax"),
            ("10.0.0.256", "invalid IP address syntax"),
            ("", "invalid IP address syntax"),
            (" 10.0.0.0/8", "invalid IP address syntax"),
            ("vpc", "invalid IP address syntax"),
        ] {
            let text = format!("[[path]]\nname = \"x\"\nidle_timeout = 5\ncidr = \"{cidr}\"\n");
            let e = PathConfig::parse(&text, "idlemon.toml").unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("idlemon.toml:4: invalid CIDR \"{cidr}\": {why}")
            );
        }
    }

    #[test]
    fn cidr_of_wrong_type() {
        let (line, message) = error("[[path]]\nidle_timeout = 5\ncidr = 10\n");
        assert_eq!(line, 3);
        assert_eq!(
            message,
            "cidr must be a string such as \"10.0.0.0/8\", got 10"
        );
    }

    #[test]
    fn bad_names() {
        let (line, message) =
            error("[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 5\nname = 42\n");
        assert_eq!(line, 4);
        assert_eq!(message, "name must be a string, got 42");

        let (line, message) =
            error("[[path]]\ncidr = \"10.0.0.0/8\"\nname = \"\"\nidle_timeout = 5\n");
        assert_eq!(line, 3);
        assert_eq!(message, "name must not be empty");
    }

    #[test]
    fn bad_ports() {
        for (ports, line, message) in [
            ("[0]", 3, "ports entry 0 is outside 1-65535"),
            ("[80, 65536]", 3, "ports entry 65536 is outside 1-65535"),
            ("[-1]", 3, "ports entry -1 is outside 1-65535"),
            ("[\"0-80\"]", 3, "ports entry \"0-80\" is outside 1-65535"),
            (
                "[\"80-70000\"]",
                3,
                "ports entry \"80-70000\" is outside 1-65535",
            ),
            (
                "[\"8100-8000\"]",
                3,
                "ports entry \"8100-8000\" is backwards: 8100 is greater than 8000",
            ),
            (
                "[\"80-\"]",
                3,
                "ports entry must be a port or a \"first-last\" range, got \"80-\"",
            ),
            (
                "[\"http\"]",
                3,
                "ports entry must be a port or a \"first-last\" range, got \"http\"",
            ),
            (
                "[\"1-2-3\"]",
                3,
                "ports entry must be a port or a \"first-last\" range, got \"1-2-3\"",
            ),
            (
                "[80.5]",
                3,
                "ports entry must be a port or a \"first-last\" range, got 80.5",
            ),
            (
                "[[80, 81]]",
                3,
                "ports entry must be a port or a \"first-last\" range, got [80, 81]",
            ),
            (
                "443",
                3,
                "ports must be an array of ports and \"first-last\" ranges, got 443",
            ),
            (
                "\"8000-8100\"",
                3,
                "ports must be an array of ports and \"first-last\" ranges, got \"8000-8100\"",
            ),
            (
                "[]",
                3,
                "ports must not be empty; leave it out to match every port",
            ),
            // In a multi-line array the entry's own line is reported.
            (
                "[\n  80,\n  443,\n  0,\n]",
                6,
                "ports entry 0 is outside 1-65535",
            ),
        ] {
            let text =
                format!("[[path]]\ncidr = \"10.0.0.0/8\"\nports = {ports}\nidle_timeout = 5\n");
            assert_eq!(error(&text), (line, message.to_owned()), "ports = {ports}");
        }
    }

    #[test]
    fn missing_keys_name_the_path_header() {
        let head = "[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 5\n\n";
        let (line, message) = error(&format!("{head}[[path]]\nname = \"a\"\nidle_timeout = 5\n"));
        assert_eq!(line, 5);
        assert_eq!(message, "[[path]] table is missing required key `cidr`");

        let (line, message) = error(&format!("{head}\n[[path]]\ncidr = \"10.0.0.0/8\"\n"));
        assert_eq!(line, 6);
        assert_eq!(
            message,
            "[[path]] table is missing required key `idle_timeout`"
        );

        let (line, message) = error(&format!("{head}[[path]]\n"));
        assert_eq!(line, 5);
        assert_eq!(
            message,
            "[[path]] table is missing required keys `cidr` and `idle_timeout`"
        );
    }

    #[test]
    fn path_of_wrong_type() {
        let (line, message) = error("\npath = 5\n");
        assert_eq!(line, 2);
        assert!(
            message.contains("expected an array of [[path]] tables"),
            "{message}"
        );

        let (line, message) = error("\n[path]\ncidr = \"10.0.0.0/8\"\n");
        assert_eq!(line, 2);
        assert!(
            message.contains("expected an array of [[path]] tables"),
            "{message}"
        );

        let (line, message) =
            error("path = [\n  { cidr = \"10.0.0.0/8\", idle_timeout = 5 },\n  7,\n]\n");
        assert_eq!(line, 3);
        assert!(message.contains("expected a [[path]] table"), "{message}");
    }

    #[test]
    fn toml_syntax_errors() {
        let text = "[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = \n";
        let e = PathConfig::parse(text, "idlemon.toml").unwrap_err();
        let shown = e.to_string();
        assert!(shown.starts_with("idlemon.toml:3: "), "{shown}");
        assert!(!shown.contains('\n'), "{shown}");

        let (line, _) = error("[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 5\n\n[[path]\n");
        assert_eq!(line, 5);

        let (line, message) = error("[[path]]\ncidr = \"10.0.0.0/8\"\ncidr = \"10.0.0.0/9\"\n");
        assert_eq!(line, 3);
        assert!(message.contains("duplicate key"), "{message}");

        let (line, _) = error("[[path]]\r\ncidr = \"10.0.0.0/8\r\nidle_timeout = 5\r\n");
        assert_eq!(line, 2);
    }

    #[test]
    fn from_file_reads_and_names_the_file() {
        let dir = std::env::temp_dir().join(format!("idlemon-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let good = dir.join("good.toml");
        std::fs::write(&good, DOC_EXAMPLE).unwrap();
        assert_eq!(PathConfig::from_file(&good).unwrap().rules(), 2);

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 0\n").unwrap();
        let shown = PathConfig::from_file(&bad).unwrap_err().to_string();
        assert_eq!(
            shown,
            format!(
                "{}:3: idle_timeout must be a positive number of seconds or \"none\", got 0",
                bad.display()
            )
        );

        let missing = dir.join("missing.toml");
        let e = PathConfig::from_file(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Io { .. }), "{e:?}");
        let prefix = format!("cannot read config file {}: ", missing.display());
        assert!(e.to_string().starts_with(&prefix), "{e}");
        assert!(std::error::Error::source(&e).is_none());

        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn enforce_table_defaults_and_values() {
        assert_eq!(config("").enforce, EnforceConfig::default());
        let parsed = config(
            "[enforce]\nmode = \"dry-run\"\ncgroups = [\"/system.slice/app.service\"]\nidle_percent = 40\ninterval = 2\ncount = 3\naccepted = true\n",
        )
        .enforce;
        assert_eq!(parsed.mode, Some(EnforceMode::DryRun));
        assert_eq!(parsed.cgroups, ["/system.slice/app.service"]);
        assert_eq!(
            (parsed.idle_percent, parsed.interval_seconds, parsed.count),
            (40, 2, 3)
        );
        assert!(parsed.accepted);
    }

    #[test]
    fn systemd_units_select_their_system_slice_cgroups() {
        let parsed = PathConfig::parse(
            "[enforce]\ncgroups = [\"/kubepods.slice\"]\nunits = [\"billing.service\", \"nginx\", \"batch.scope\"]\n",
            "test.toml",
        )
        .expect("valid")
        .enforce;
        assert_eq!(
            parsed.cgroups,
            [
                "/kubepods.slice",
                "/system.slice/billing.service",
                "/system.slice/nginx.service",
                "/system.slice/batch.scope"
            ]
        );
    }

    #[test]
    fn enforce_table_errors_name_the_line() {
        for (text, line, wanted) in [
            (
                "[enforce]\nmode = \"yes\"\n",
                2,
                "mode must be \"off\", \"dry-run\" or \"on\", got \"yes\"",
            ),
            (
                "[enforce]\n\nidle_percent = 95\n",
                3,
                "idle_percent must be a whole number from 1 to 80, got 95",
            ),
            (
                "[enforce]\ncount = 0\n",
                2,
                "count must be a whole number from 1 to 127, got 0",
            ),
            (
                "[enforce]\ninterval = 1.5\n",
                2,
                "interval must be a whole number from 1 to 32767, got 1.5",
            ),
            (
                "[enforce]\naccepted = 1\n",
                2,
                "accepted must be true or false, got 1",
            ),
            (
                "[enforce]\nunits = [\"../x.service\"]\n",
                2,
                "units entry \"../x.service\" must be a systemd unit name",
            ),
            (
                "[enforce]\nunits = \"billing.service\"\n",
                2,
                "units must be an array of systemd unit names",
            ),
            (
                "[enforce]\ncgroups = [\"system.slice\"]\n",
                2,
                "must be a path from the cgroup root",
            ),
            (
                "[enforce]\ncgroups = [\"/a/../b\"]\n",
                2,
                "must be a path from the cgroup root",
            ),
            ("[enforce]\nidle = 5\n", 2, "unknown key `idle`"),
        ] {
            let (at, message) = error(text);
            assert_eq!(at, line, "{text}: {message}");
            assert!(message.contains(wanted), "{text}: {message}");
        }
    }

    fn path(index_text: &str) -> (IdleTimeout, Option<PathKind>, Option<OnIdle>) {
        let c = config(&format!("[[path]]\ncidr = \"10.0.0.0/8\"\n{index_text}"));
        let index = c.find("10.0.0.1".parse().unwrap(), 80).unwrap();
        (c.timeout(index), c.kind(index), c.on_idle(index))
    }

    #[test]
    fn path_kinds_and_their_aws_defaults() {
        use OnIdle::{Drop, Reset};
        for (lines, wanted) in [
            (
                "kind = \"nat_gateway\"\n",
                (secs(350), Some(PathKind::NatGateway), Some(Reset)),
            ),
            (
                "kind = \"nat_gateway\"\nidle_timeout = 350\non_idle = \"reset\"\n",
                (secs(350), Some(PathKind::NatGateway), Some(Reset)),
            ),
            (
                "kind = \"vpc_endpoint\"\n",
                (secs(350), Some(PathKind::VpcEndpoint), Some(Reset)),
            ),
            (
                "kind = \"nlb\"\n",
                (secs(350), Some(PathKind::Nlb), Some(Reset)),
            ),
            (
                "kind = \"nlb\"\nidle_timeout = 6000\n",
                (secs(6000), Some(PathKind::Nlb), Some(Reset)),
            ),
            (
                "kind = \"gwlb\"\n",
                (secs(350), Some(PathKind::Gwlb), Some(Drop)),
            ),
            (
                "kind = \"gwlb\"\nidle_timeout = 60\non_idle = \"reset\"\n",
                (secs(60), Some(PathKind::Gwlb), Some(Reset)),
            ),
            (
                "kind = \"firewall\"\nidle_timeout = 3600\n",
                (secs(3600), Some(PathKind::Firewall), Some(Drop)),
            ),
            (
                "kind = \"firewall\"\nidle_timeout = 3600\non_idle = \"reset\"\n",
                (secs(3600), Some(PathKind::Firewall), Some(Reset)),
            ),
            (
                "kind = \"none\"\n",
                (IdleTimeout::Never, Some(PathKind::None), None),
            ),
            (
                "kind = \"none\"\nidle_timeout = \"none\"\n",
                (IdleTimeout::Never, Some(PathKind::None), None),
            ),
            // Without a kind: the timeout given, and a reset as before kinds existed.
            ("idle_timeout = 90\n", (secs(90), None, Some(Reset))),
            (
                "idle_timeout = 90\non_idle = \"drop\"\n",
                (secs(90), None, Some(Drop)),
            ),
            (
                "idle_timeout = \"none\"\n",
                (IdleTimeout::Never, None, None),
            ),
        ] {
            assert_eq!(path(lines), wanted, "{lines}");
        }
    }

    #[test]
    fn contradictory_path_kinds_are_refused_at_their_line() {
        let head = "[[path]]\ncidr = \"10.0.0.0/8\"\n";
        for (lines, line, wanted) in [
            (
                "kind = \"alb\"\n",
                3,
                "kind must be \"nat_gateway\", \"nlb\", \"gwlb\", \"vpc_endpoint\", \"firewall\" or \"none\", got \"alb\"",
            ),
            (
                "kind = 5\n",
                3,
                "kind must be \"nat_gateway\", \"nlb\", \"gwlb\", \"vpc_endpoint\", \"firewall\" or \"none\", got 5",
            ),
            (
                "kind = \"nat_gateway\"\nidle_timeout = 600\n",
                4,
                "idle_timeout of the NAT gateway is fixed at 350 seconds, got 600",
            ),
            (
                "kind = \"vpc_endpoint\"\nidle_timeout = 60\n",
                4,
                "idle_timeout of the VPC endpoint is fixed at 350 seconds, got 60",
            ),
            (
                "kind = \"nlb\"\nidle_timeout = 30\n",
                4,
                "idle_timeout of the NLB must be from 60 to 6000 seconds, got 30",
            ),
            (
                "kind = \"gwlb\"\n\nidle_timeout = 6001\n",
                5,
                "idle_timeout of the GWLB must be from 60 to 6000 seconds, got 6001",
            ),
            (
                "kind = \"nlb\"\non_idle = \"drop\"\n",
                4,
                "on_idle = \"drop\" contradicts kind = \"nlb\": the NLB answers a forgotten flow with a reset",
            ),
            (
                "kind = \"nat_gateway\"\non_idle = \"drop\"\n",
                4,
                "on_idle = \"drop\" contradicts kind = \"nat_gateway\"",
            ),
            (
                "kind = \"gwlb\"\non_idle = \"silently\"\n",
                4,
                "on_idle must be \"reset\" or \"drop\", got \"silently\"",
            ),
            (
                "kind = \"gwlb\"\nidle_timeout = \"none\"\n",
                4,
                "idle_timeout = \"none\" contradicts kind = \"gwlb\"",
            ),
            (
                "kind = \"none\"\nidle_timeout = 350\n",
                4,
                "idle_timeout = 350 contradicts kind = \"none\"",
            ),
            (
                "kind = \"none\"\non_idle = \"reset\"\n",
                4,
                "on_idle has no meaning on a path without an idle timeout",
            ),
            (
                "idle_timeout = \"none\"\non_idle = \"drop\"\n",
                4,
                "on_idle has no meaning on a path without an idle timeout",
            ),
            (
                "\nkind = \"firewall\"\n",
                1,
                "[[path]] table with kind = \"firewall\" is missing required key `idle_timeout`",
            ),
            (
                "on_idle = \"drop\"\n",
                1,
                "[[path]] table is missing required key `idle_timeout`",
            ),
        ] {
            let (at, message) = error(&format!("{head}{lines}"));
            assert_eq!(at, line, "{lines}: {message}");
            assert!(message.starts_with(wanted), "{lines}: {message}");
        }
        // A kind that implies its timeout needs only the cidr.
        let (at, message) = error("[[path]]\nkind = \"nlb\"\n");
        assert_eq!(
            (at, message.as_str()),
            (1, "[[path]] table is missing required key `cidr`")
        );
    }

    #[test]
    fn enforce_namespaces_and_pod_labels() {
        let parsed = config(
            "[enforce]\nnamespaces = [\"payments\", \"kube-system\", \"a1\"]\npod_labels = { app = \"billing\", \"app.kubernetes.io/part-of\" = \"shop\", tier = \"\" }\n",
        )
        .enforce;
        assert_eq!(parsed.namespaces, ["payments", "kube-system", "a1"]);
        assert_eq!(
            parsed.pod_labels,
            BTreeMap::from([
                ("app".to_owned(), "billing".to_owned()),
                ("app.kubernetes.io/part-of".to_owned(), "shop".to_owned()),
                ("tier".to_owned(), String::new()),
            ])
        );
        let table = config("[enforce.pod_labels]\napp = \"billing\"\n").enforce;
        assert_eq!(table.pod_labels.len(), 1);
        assert!(config("[enforce]\n").enforce.namespaces.is_empty());
        assert!(config("[enforce]\n").enforce.pod_labels.is_empty());
    }

    #[test]
    fn bad_namespaces_and_pod_labels_name_the_line() {
        let long = "a".repeat(64);
        for (text, line, wanted) in [
            (
                "[enforce]\nnamespaces = \"payments\"\n".to_owned(),
                2,
                "namespaces must be an array of Kubernetes namespace names such as \"payments\", got \"payments\"",
            ),
            (
                "[enforce]\nnamespaces = [\n  \"ok\",\n  \"Payments\",\n]\n".to_owned(),
                4,
                "namespaces entry \"Payments\" must be a Kubernetes namespace name",
            ),
            (
                "[enforce]\nnamespaces = [\"-x\"]\n".to_owned(),
                2,
                "namespaces entry \"-x\" must be",
            ),
            (
                "[enforce]\nnamespaces = [\"a.b\"]\n".to_owned(),
                2,
                "namespaces entry \"a.b\" must be",
            ),
            (
                format!("[enforce]\nnamespaces = [\"{long}\"]\n"),
                2,
                "namespaces entry",
            ),
            (
                "[enforce]\nnamespaces = [\"\"]\n".to_owned(),
                2,
                "namespaces entry \"\" must be",
            ),
            (
                "[enforce]\nnamespaces = [5]\n".to_owned(),
                2,
                "namespaces entries must be strings, got 5",
            ),
            (
                "[enforce]\npod_labels = { }\n".to_owned(),
                2,
                "pod_labels must not be empty",
            ),
            (
                "[enforce]\npod_labels = \"app=billing\"\n".to_owned(),
                2,
                "invalid type: string \"app=billing\", expected a map",
            ),
            (
                "[enforce.pod_labels]\napp = \"billing\"\n\"bad key\" = \"x\"\n".to_owned(),
                3,
                "pod_labels key \"bad key\" is not a Kubernetes label name",
            ),
            (
                "[enforce]\npod_labels = { \"-app\" = \"x\" }\n".to_owned(),
                2,
                "pod_labels key \"-app\"",
            ),
            (
                "[enforce]\npod_labels = { \"Example.com/app\" = \"x\" }\n".to_owned(),
                2,
                "pod_labels key \"Example.com/app\"",
            ),
            (
                "[enforce]\npod_labels = { \"example.com/\" = \"x\" }\n".to_owned(),
                2,
                "pod_labels key \"example.com/\"",
            ),
            (
                "[enforce.pod_labels]\napp = 5\n".to_owned(),
                2,
                "pod_labels value of app must be a string, got 5",
            ),
            (
                "[enforce.pod_labels]\n\napp = \"bill ing\"\n".to_owned(),
                3,
                "pod_labels value \"bill ing\" of app is not a Kubernetes label value",
            ),
            (
                format!("[enforce.pod_labels]\napp = \"{long}\"\n"),
                2,
                "pod_labels value",
            ),
            (
                "[enforce]\npod_label = { app = \"x\" }\n".to_owned(),
                2,
                "unknown key `pod_label`",
            ),
        ] {
            let (at, message) = error(&text);
            assert_eq!(at, line, "{text}: {message}");
            assert!(message.starts_with(wanted), "{text}: {message}");
        }
    }

    #[test]
    fn enforce_override_is_a_boolean() {
        assert!(
            config("[enforce]\noverride = true\n")
                .enforce
                .override_weakening
        );
        assert!(!config("").enforce.override_weakening);
        assert!(
            config("[enforce]\nnamespaces = [\"payments\"]\n")
                .enforce
                .selects_pods()
        );
        assert!(
            !config("[enforce]\ncgroups = [\"/a\"]\n")
                .enforce
                .selects_pods()
        );
        let (line, message) = error("[enforce]\n\noverride = \"yes\"\n");
        assert_eq!(line, 3);
        assert!(
            message.contains("override must be true or false"),
            "{message}"
        );
    }
}
