//! The verdict: from what the walk read of a socket and the path config,
//! whether a middlebox's idle timeout will kill it, and why. Pure: no
//! walk, no attribution, no I/O.

use std::{net::IpAddr, num::NonZeroU32, sync::Arc, time::Duration};

use serde::Serialize;

use super::Weakenings;
use crate::config::{IdleTimeout, OnIdle, PathBehaviour, PathConfig, PathKind};

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

/// Which rule set a socket's path timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRule {
    Default,
    Loopback,
    /// The index of a `[[path]]` rule in the config.
    Config(u32),
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
    /// Weakened enforced keepalives, from the events: no part of the
    /// verdict, carried here for the API view (`view`) to show.
    pub weakened: Arc<Weakenings>,
}

#[cfg(test)]
impl Classifier {
    /// A classifier for unit tests: `hz` ticks per second, a 300 s idle
    /// threshold, a 350 s default timeout and the `[[path]]` rules of
    /// `paths` (a config file's text).
    pub(crate) fn for_tests(hz: u32, paths: &str) -> Self {
        Self {
            hz,
            idle_threshold: Duration::from_secs(300),
            default_timeout: IdleTimeout::After(NonZeroU32::new(350).expect("non-zero")),
            paths: PathConfig::parse(paths, "test.toml").expect("valid config"),
            keepalive_timer_seen: false,
            weakened: Default::default(),
        }
    }
}

/// What the verdict needs to know of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Jiffies since the later of the last send and the last receive.
    pub idle: u32,
    /// The path's idle timeout; None when it has no middlebox.
    pub path_timeout: Option<NonZeroU32>,
    /// SO_KEEPALIVE.
    pub keepalive_enabled: bool,
    /// Effective idle time before the first keepalive probe, in jiffies.
    pub keepalive_idle: u32,
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

    /// The rule that sets the idle timeout of the path to a remote end, and
    /// that timeout (None: no middlebox).
    pub fn path(&self, remote: IpAddr, port: u16) -> (PathRule, Option<NonZeroU32>) {
        let rule = match self.paths.find(remote, port) {
            Some(index) => PathRule::Config(index as u32),
            // Loopback never crosses a middlebox (sidecar proxies live there);
            // a config rule for 127.0.0.0/8 or ::1 overrides this.
            None if is_loopback(remote) => PathRule::Loopback,
            None => PathRule::Default,
        };
        let timeout = match rule {
            PathRule::Config(index) => self.paths.timeout(index as usize),
            PathRule::Loopback => IdleTimeout::Never,
            PathRule::Default => self.default_timeout,
        };
        let timeout = match timeout {
            IdleTimeout::After(seconds) => Some(seconds),
            IdleTimeout::Never => None,
        };
        (rule, timeout)
    }

    /// What sits on the path a rule chose.
    pub fn path_kind(&self, rule: PathRule) -> Option<PathKind> {
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

    /// Keepalive coverage of a socket idle at least the threshold on a path
    /// with a timeout; None for the others. Off and too slow are the risks.
    pub fn coverage(&self, facts: &Facts) -> Option<Coverage> {
        let timeout = facts.path_timeout?;
        if self.seconds(facts.idle) < self.idle_threshold.as_secs_f64() {
            return None;
        }
        Some(if !facts.keepalive_enabled {
            Coverage::Off
        } else if self.seconds(facts.keepalive_idle) >= f64::from(timeout.get()) {
            Coverage::TooSlow
        } else {
            Coverage::Effective
        })
    }

    /// Why the path's middlebox will kill the socket; None if it will not.
    pub fn risk(&self, facts: &Facts) -> Option<Risk> {
        match self.coverage(facts) {
            Some(Coverage::Off) => Some(Risk::NoKeepalive),
            Some(Coverage::TooSlow) => Some(Risk::KeepaliveTooSlow),
            Some(Coverage::Effective) | None => None,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const HZ: u32 = 100;

    fn classifier(paths: &str) -> Classifier {
        Classifier::for_tests(HZ, paths)
    }

    /// Idle `idle` seconds on a 350 s path, keepalive after `keepalive` seconds.
    fn facts(idle: u32, keepalive: Option<u32>) -> Facts {
        Facts {
            idle: idle * HZ,
            path_timeout: NonZeroU32::new(350),
            keepalive_enabled: keepalive.is_some(),
            keepalive_idle: keepalive.unwrap_or(7200) * HZ,
        }
    }

    #[test]
    fn the_verdict_needs_idle_past_the_threshold_and_keepalive_no_faster_than_the_path() {
        let classifier = classifier("");
        assert_eq!(classifier.risk(&facts(299, None)), None);
        assert_eq!(classifier.risk(&facts(300, None)), Some(Risk::NoKeepalive));
        assert_eq!(
            classifier.risk(&facts(300, Some(350))),
            Some(Risk::KeepaliveTooSlow)
        );
        assert_eq!(classifier.risk(&facts(300, Some(349))), None);
        assert_eq!(
            classifier.coverage(&facts(300, Some(349))),
            Some(Coverage::Effective)
        );
        let no_middlebox = Facts {
            path_timeout: None,
            ..facts(5000, None)
        };
        assert_eq!(classifier.coverage(&no_middlebox), None);
    }

    #[test]
    fn paths_come_from_the_config_then_loopback_then_the_default() {
        let classifier =
            classifier("[[path]]\nname = \"db\"\ncidr = \"10.1.0.0/16\"\nidle_timeout = 900\n");
        let ip = |text: &str| text.parse::<IpAddr>().expect("ip");
        assert_eq!(
            classifier.path(ip("10.1.2.3"), 5432),
            (PathRule::Config(0), NonZeroU32::new(900))
        );
        assert_eq!(
            classifier.path(ip("::ffff:127.0.0.1"), 80),
            (PathRule::Loopback, None)
        );
        assert_eq!(
            classifier.path(ip("52.1.2.3"), 443),
            (PathRule::Default, NonZeroU32::new(350))
        );
    }
}
