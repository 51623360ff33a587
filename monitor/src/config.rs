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
//! idle_timeout = "none"         # required: seconds (a positive integer) or "none" (no middlebox on this path)
//!
//! [[path]]
//! name = "internal-nlb"
//! cidr = "10.20.0.0/16"
//! ports = [443]
//! idle_timeout = 6000
//! ```
//!
//! Further rules:
//! - Only the top-level key `path` is allowed, and only the four keys above inside it;
//!   any other key is an error, so a misspelt key cannot silently leave a rule half-applied.
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
//! namespaces = ["payments"]     # Kubernetes: pods of any of these namespaces...
//! pod_labels = { app = "billing" } # ...and with all of these labels (either alone also works);
//!                               # needs the pod watch (--node-name, in-cluster API access)
//! override = false              # rewrite an application's own SO_KEEPALIVE off / slower
//!                               # TCP_KEEPIDLE on an enforced socket to idlemon's (else: reported)
//! idle_percent = 50             # TCP_KEEPIDLE = this percentage of the path's idle timeout (1-80)
//! interval = 30                 # TCP_KEEPINTVL, seconds (1-32767)
//! count = 5                     # TCP_KEEPCNT (1-127)
//! accepted = false              # also accepted connections, not only outbound ones
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
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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
    pub cgroup_root: Option<PathBuf>,
    pub idle_percent: u32,
    pub interval_seconds: u32,
    pub count: u32,
    pub accepted: bool,
    /// Kubernetes namespaces whose pods are selected (any of them); empty: any namespace.
    pub namespaces: Vec<String>,
    /// Labels a selected pod has (all of them); empty: any labels.
    pub pod_labels: BTreeMap<String, String>,
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
            cgroup_root: None,
            idle_percent: 50,
            interval_seconds: 30,
            count: 5,
            accepted: false,
            namespaces: Vec::new(),
            pod_labels: BTreeMap::new(),
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
        let file: RawFile = toml::from_str(text)
            .map_err(|e| invalid(e.span().map_or(0, |s| s.start), e.message().to_owned()))?;
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
        let (Some(cidr), Some(timeout)) = (&rule.cidr, &rule.idle_timeout) else {
            let missing = match (&rule.cidr, &rule.idle_timeout) {
                (None, None) => "keys `cidr` and `idle_timeout`",
                (None, Some(_)) => "key `cidr`",
                (Some(_), _) => "key `idle_timeout`",
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

        Ok(Self {
            net,
            ports,
            timeout: parse_timeout(timeout, text)?,
            label: name.unwrap_or(cidr_text).into(),
        })
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
            let Raw::Array(entries) = cgroups.get_ref() else {
                return Err(Invalid::new(
                    cgroups.span(),
                    format!(
                        "cgroups must be an array of cgroup paths such as \"/system.slice/app.service\", got {}",
                        written(cgroups, text)
                    ),
                ));
            };
            for entry in entries {
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
            let Raw::Array(entries) = units.get_ref() else {
                return Err(Invalid::new(
                    units.span(),
                    format!(
                        "units must be an array of systemd unit names such as \"billing.service\", got {}",
                        written(units, text)
                    ),
                ));
            };
            for entry in entries {
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
        if let Some(namespaces) = &table.namespaces {
            let Raw::Array(entries) = namespaces.get_ref() else {
                return Err(Invalid::new(
                    namespaces.span(),
                    format!(
                        "namespaces must be an array of Kubernetes namespaces such as \"payments\", got {}",
                        written(namespaces, text)
                    ),
                ));
            };
            for entry in entries {
                let name = expect_str(entry, text, "namespaces entries must be strings")?;
                if !is_dns_label(name) {
                    return Err(Invalid::new(
                        entry.span(),
                        format!(
                            "namespaces entry {} is not a Kubernetes namespace name (lowercase letters, digits and -, at most 63)",
                            written(entry, text)
                        ),
                    ));
                }
                config.namespaces.push(name.to_owned());
            }
        }
        if let Some(labels) = &table.pod_labels {
            for (key, value) in &labels.get_ref().0 {
                let Raw::Str(value_text) = value.get_ref() else {
                    return Err(Invalid::new(
                        value.span(),
                        format!(
                            "pod_labels value of {key} must be a string, got {}",
                            written(value, text)
                        ),
                    ));
                };
                if !is_label_key(key) {
                    return Err(Invalid::new(
                        value.span(),
                        format!("pod_labels key {key:?} is not a Kubernetes label key"),
                    ));
                }
                if !is_label_value(value_text) {
                    return Err(Invalid::new(
                        value.span(),
                        format!(
                            "pod_labels value {} is not a Kubernetes label value (at most 63 letters, digits, -, _ and ., starting and ending with a letter or digit)",
                            written(value, text)
                        ),
                    ));
                }
                config.pod_labels.insert(key.clone(), value_text.clone());
            }
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
        Ok(config)
    }
}

/// An RFC 1123 label, as Kubernetes namespace names are.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A label value: empty, or at most 63 alphanumerics, `-`, `_` and `.`,
/// alphanumeric at both ends.
fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// A label key: a name as a value but not empty, after an optional DNS
/// subdomain prefix and `/`.
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
    let prefix_ok = prefix.is_empty() && !key.contains('/')
        || (prefix.len() <= 253 && prefix.split('.').all(is_dns_label));
    prefix_ok && !name.is_empty() && is_label_value(name)
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
// errors can be reported afterwards with our own wording and the value's line. Table keys
// are checked while deserializing: the toml deserializer attaches the key's own span to an
// error raised there. Both tables are deserialized by hand instead of with
// `#[serde(deny_unknown_fields)]` because serde's unknown-field message has a fixed wording.

struct RawFile {
    path: Vec<Spanned<RawRule>>,
    enforce: Option<Spanned<RawEnforce>>,
}

struct RawEnforce {
    mode: Option<Spanned<Raw>>,
    cgroups: Option<Spanned<Raw>>,
    units: Option<Spanned<Raw>>,
    cgroup_root: Option<Spanned<Raw>>,
    idle_percent: Option<Spanned<Raw>>,
    interval: Option<Spanned<Raw>>,
    count: Option<Spanned<Raw>>,
    accepted: Option<Spanned<Raw>>,
    namespaces: Option<Spanned<Raw>>,
    pod_labels: Option<Spanned<RawLabels>>,
    override_: Option<Spanned<Raw>>,
}

/// `pod_labels`: an inline table of label names to values, in file order.
struct RawLabels(Vec<(String, Spanned<Raw>)>);

impl<'de> Deserialize<'de> for RawLabels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;

        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = RawLabels;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "pod_labels as a table of label names to values, such as { app = \"billing\" }",
                )
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawLabels, A::Error> {
                let mut labels = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Spanned<Raw>>()? {
                    labels.push((key, value));
                }
                Ok(RawLabels(labels))
            }
        }

        deserializer.deserialize_map(LabelsVisitor)
    }
}

struct RawRule {
    name: Option<Spanned<Raw>>,
    cidr: Option<Spanned<Raw>>,
    ports: Option<Spanned<Raw>>,
    idle_timeout: Option<Spanned<Raw>>,
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

#[derive(Clone, Copy)]
enum FileKey {
    Path,
    Enforce,
}

const FILE_KEYS: &[(&str, FileKey)] = &[("path", FileKey::Path), ("enforce", FileKey::Enforce)];

#[derive(Clone, Copy)]
enum EnforceKey {
    Mode,
    Cgroups,
    Units,
    CgroupRoot,
    IdlePercent,
    Interval,
    Count,
    Accepted,
    Namespaces,
    PodLabels,
    Override,
}

const ENFORCE_KEYS: &[(&str, EnforceKey)] = &[
    ("mode", EnforceKey::Mode),
    ("cgroups", EnforceKey::Cgroups),
    ("units", EnforceKey::Units),
    ("cgroup_root", EnforceKey::CgroupRoot),
    ("idle_percent", EnforceKey::IdlePercent),
    ("interval", EnforceKey::Interval),
    ("count", EnforceKey::Count),
    ("accepted", EnforceKey::Accepted),
    ("namespaces", EnforceKey::Namespaces),
    ("pod_labels", EnforceKey::PodLabels),
    ("override", EnforceKey::Override),
];

#[derive(Clone, Copy)]
enum RuleKey {
    Name,
    Cidr,
    Ports,
    IdleTimeout,
}

const RULE_KEYS: &[(&str, RuleKey)] = &[
    ("name", RuleKey::Name),
    ("cidr", RuleKey::Cidr),
    ("ports", RuleKey::Ports),
    ("idle_timeout", RuleKey::IdleTimeout),
];

/// Deserializes a table key into one of `keys`, or fails naming the allowed ones.
struct KeySeed<K: 'static>(&'static [(&'static str, K)]);

impl<'de, K: Copy> DeserializeSeed<'de> for KeySeed<K> {
    type Value = K;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<K, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<K: Copy> Visitor<'_> for KeySeed<K> {
    type Value = K;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<K, E> {
        if let Some(&(_, known)) = self.0.iter().find(|(name, _)| *name == key) {
            return Ok(known);
        }
        let names: Vec<&str> = self.0.iter().map(|&(name, _)| name).collect();
        let expected = match names.as_slice() {
            [only] => (*only).to_owned(),
            _ => format!("one of {}", names.join(", ")),
        };
        Err(E::custom(format_args!(
            "unknown key `{key}` (expected {expected})"
        )))
    }
}

impl<'de> Deserialize<'de> for RawFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FileVisitor;

        impl<'de> Visitor<'de> for FileVisitor {
            type Value = RawFile;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawFile, A::Error> {
                let mut path = Vec::new();
                let mut enforce = None;
                while let Some(key) = map.next_key_seed(KeySeed(FILE_KEYS))? {
                    match key {
                        FileKey::Path => path = map.next_value::<RuleList>()?.0,
                        FileKey::Enforce => enforce = Some(map.next_value()?),
                    }
                }
                Ok(RawFile { path, enforce })
            }
        }

        deserializer.deserialize_map(FileVisitor)
    }
}

/// The value of `path`; a type of its own only so a wrong type gets a helpful message.
struct RuleList(Vec<Spanned<RawRule>>);

impl<'de> Deserialize<'de> for RuleList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;

        impl<'de> Visitor<'de> for ListVisitor {
            type Value = RuleList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of [[path]] tables")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RuleList, A::Error> {
                let mut rules = Vec::new();
                while let Some(rule) = seq.next_element()? {
                    rules.push(rule);
                }
                Ok(RuleList(rules))
            }
        }

        deserializer.deserialize_seq(ListVisitor)
    }
}

impl<'de> Deserialize<'de> for RawRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RuleVisitor;

        impl<'de> Visitor<'de> for RuleVisitor {
            type Value = RawRule;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a [[path]] table")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawRule, A::Error> {
                let mut rule = RawRule {
                    name: None,
                    cidr: None,
                    ports: None,
                    idle_timeout: None,
                };
                // TOML itself rejects duplicate keys, so each slot is filled at most once.
                while let Some(key) = map.next_key_seed(KeySeed(RULE_KEYS))? {
                    let slot = match key {
                        RuleKey::Name => &mut rule.name,
                        RuleKey::Cidr => &mut rule.cidr,
                        RuleKey::Ports => &mut rule.ports,
                        RuleKey::IdleTimeout => &mut rule.idle_timeout,
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(rule)
            }
        }

        deserializer.deserialize_map(RuleVisitor)
    }
}

impl<'de> Deserialize<'de> for RawEnforce {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnforceVisitor;

        impl<'de> Visitor<'de> for EnforceVisitor {
            type Value = RawEnforce;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an [enforce] table")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEnforce, A::Error> {
                let mut table = RawEnforce {
                    mode: None,
                    cgroups: None,
                    units: None,
                    cgroup_root: None,
                    idle_percent: None,
                    interval: None,
                    count: None,
                    accepted: None,
                    namespaces: None,
                    pod_labels: None,
                    override_: None,
                };
                while let Some(key) = map.next_key_seed(KeySeed(ENFORCE_KEYS))? {
                    if let EnforceKey::PodLabels = key {
                        table.pod_labels = Some(map.next_value()?);
                        continue;
                    }
                    let slot = match key {
                        EnforceKey::Mode => &mut table.mode,
                        EnforceKey::Cgroups => &mut table.cgroups,
                        EnforceKey::Units => &mut table.units,
                        EnforceKey::CgroupRoot => &mut table.cgroup_root,
                        EnforceKey::IdlePercent => &mut table.idle_percent,
                        EnforceKey::Interval => &mut table.interval,
                        EnforceKey::Count => &mut table.count,
                        EnforceKey::Accepted => &mut table.accepted,
                        EnforceKey::Namespaces => &mut table.namespaces,
                        EnforceKey::Override => &mut table.override_,
                        EnforceKey::PodLabels => continue,
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(table)
            }
        }

        deserializer.deserialize_map(EnforceVisitor)
    }
}

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
            "idlemon.toml:3: unknown key `cidrs` (expected one of name, cidr, ports, idle_timeout)"
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
            "unknown key `idle_timeout` (expected one of path, enforce)"
        );

        let (line, message) =
            error("[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 5\n[[paths]]\n");
        assert_eq!(line, 4);
        assert_eq!(
            message,
            "unknown key `paths` (expected one of path, enforce)"
        );
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
            (
                "[enforce]\nnamespaces = [\"Payments\"]\n",
                2,
                "is not a Kubernetes namespace name",
            ),
            (
                "[enforce]\nnamespaces = \"payments\"\n",
                2,
                "namespaces must be an array",
            ),
            (
                "[enforce]\n\npod_labels = { app = 5 }\n",
                3,
                "pod_labels value of app must be a string",
            ),
            (
                "[enforce]\npod_labels = { app = \"-x\" }\n",
                2,
                "is not a Kubernetes label value",
            ),
            (
                "[enforce]\npod_labels = { \"a/b/c\" = \"x\" }\n",
                2,
                "is not a Kubernetes label key",
            ),
            (
                "[enforce]\npod_labels = [\"app\"]\n",
                2,
                "pod_labels as a table",
            ),
            (
                "[enforce]\noverride = \"yes\"\n",
                2,
                "override must be true or false",
            ),
        ] {
            let (at, message) = error(text);
            assert_eq!(at, line, "{text}: {message}");
            assert!(message.contains(wanted), "{text}: {message}");
        }
    }

    #[test]
    fn enforce_table_selects_pods_by_namespace_and_label() {
        let none = config("[enforce]\ncgroups = [\"/a\"]\n").enforce;
        assert!(!none.selects_pods());
        let parsed = config(
            "[enforce]\nnamespaces = [\"payments\", \"shop\"]\n\
             pod_labels = { app = \"billing\", \"app.kubernetes.io/part-of\" = \"pay\", tier = \"\" }\n\
             override = true\n",
        )
        .enforce;
        assert!(parsed.selects_pods());
        assert_eq!(parsed.namespaces, ["payments", "shop"]);
        assert_eq!(
            parsed.pod_labels,
            BTreeMap::from(
                [
                    ("app", "billing"),
                    ("app.kubernetes.io/part-of", "pay"),
                    ("tier", "")
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
            )
        );
        assert!(parsed.override_weakening);
        assert!(!config("").enforce.override_weakening);
        assert!(
            config("[enforce]\npod_labels = { app = \"x\" }\n")
                .enforce
                .selects_pods()
        );
    }
}
