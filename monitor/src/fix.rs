//! The one fix for an at-risk socket, in a form an SRE can paste: the pod's
//! `securityContext.sysctls` when keepalive is on but its namespace timing
//! is too slow, else a change in the application (per-language snippets, as
//! in deploy/runbook.md) or idlemon's enforcement for the workload, with the
//! `[enforce]` lines to add. Pure logic, unit-tested.

use std::{collections::BTreeSet, fmt::Write as _};

use serde::Serialize;

use crate::{
    attribution::Attribution,
    sockets::{Keepalive, Risk, Source},
};

/// How to keep an at-risk socket's path alive.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fix {
    /// Keepalive is on, timed by its network namespace, and too slow: the
    /// namespace's sysctls (per pod since Linux 4.5; a safe sysctl since
    /// Kubernetes 1.29) fix every such socket of the pod without code.
    Sysctl {
        sysctls: Vec<Sysctl>,
        /// The pod template's `securityContext` entry, or for a process
        /// outside pods the `sysctl -w` commands for its namespace.
        snippet: String,
        runbook: &'static str,
    },
    /// Keepalive is off (or the application set its own TCP_KEEPIDLE too
    /// slow): no sysctl helps; the application must set it, or idlemon's
    /// enforcement does it for the workload.
    Application {
        /// What the application must change, in words.
        change: String,
        idle_seconds: u32,
        interval_seconds: u32,
        count: u32,
        /// Snippets for the usual languages (deploy/runbook.md has more).
        snippets: Snippets,
        runbook: &'static str,
        /// The alternative without a code change: the config lines that
        /// select this workload for `--enforce-keepalive on`.
        enforce: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sysctl {
    pub name: &'static str,
    pub value: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snippets {
    pub python: String,
    pub go: String,
    pub java: String,
    pub node: String,
}

const KEEPALIVE_TIME: &str = "net.ipv4.tcp_keepalive_time";
const KEEPALIVE_INTVL: &str = "net.ipv4.tcp_keepalive_intvl";
const SYSCTL_RUNBOOK: &str = "deploy/runbook.md#a-per-pod-sysctl-netipv4tcp_keepalive_time";
const APPLICATION_RUNBOOK: &str = "deploy/runbook.md#b-keepalive-in-the-application";
/// The runbook's values, for paths long enough to take them.
const RUNBOOK_IDLE: u32 = 60;
const RUNBOOK_INTERVAL: u32 = 30;
const RUNBOOK_COUNT: u32 = 5;
/// An interval above this share of the timeout loses the flow after a
/// probe (the next comes an interval later): enforcement's rule too.
const MAX_INTERVAL_PERCENT: u32 = 80;

/// The settings that keep a path of `timeout` seconds alive: the runbook's
/// 60 s idle, 30 s interval and 5 probes, or half and a quarter of shorter
/// timeouts (at least 1 s).
pub fn target(timeout: u32) -> (u32, u32, u32) {
    let idle = RUNBOOK_IDLE.min(timeout / 2).max(1);
    let interval = RUNBOOK_INTERVAL.min(timeout / 4).max(1);
    (idle, interval, RUNBOOK_COUNT)
}

/// The fix for a socket at `risk` on a path of `timeout` seconds.
pub fn for_socket(
    risk: Risk,
    timeout: u32,
    keepalive: &Keepalive,
    attribution: &Attribution,
) -> Fix {
    let (idle, interval, count) = target(timeout);
    let own_idle = keepalive.idle_from == Source::Socket;
    if risk == Risk::KeepaliveTooSlow && !own_idle {
        let mut sysctls = vec![Sysctl {
            name: KEEPALIVE_TIME,
            value: idle,
        }];
        let slow_interval =
            keepalive.interval_seconds * 100.0 > f64::from(timeout * MAX_INTERVAL_PERCENT);
        if slow_interval && keepalive.interval_from == Source::Namespace {
            sysctls.push(Sysctl {
                name: KEEPALIVE_INTVL,
                value: interval,
            });
        }
        let pairs: Vec<(&str, u32)> = sysctls.iter().map(|s| (s.name, s.value)).collect();
        let snippet = sysctl_snippet(&pairs, attribution.pod_uid.is_some());
        return Fix::Sysctl {
            sysctls,
            snippet,
            runbook: SYSCTL_RUNBOOK,
        };
    }
    let change = if risk == Risk::NoKeepalive {
        format!(
            "turn SO_KEEPALIVE on, with TCP_KEEPIDLE {idle} s, TCP_KEEPINTVL {interval} s and TCP_KEEPCNT {count} (a sysctl alone does not help a socket without SO_KEEPALIVE)"
        )
    } else {
        format!(
            "lower the socket's own TCP_KEEPIDLE to {idle} s and TCP_KEEPINTVL to {interval} s (set by the application, so the namespace's sysctls do not apply)"
        )
    };
    Fix::Application {
        change,
        idle_seconds: idle,
        interval_seconds: interval,
        count,
        snippets: snippets(idle, interval, count),
        runbook: APPLICATION_RUNBOOK,
        enforce: enforce_lines(attribution),
    }
}

/// The pod template's `securityContext.sysctls` entry (`in_pod`), else the
/// commands for a network namespace outside pods (the host's: also a file
/// in /etc/sysctl.d/).
pub fn sysctl_snippet(sysctls: &[(&str, u32)], in_pod: bool) -> String {
    let mut text = String::new();
    if in_pod {
        text.push_str("securityContext:\n  sysctls:\n");
    }
    for (name, value) in sysctls {
        let _ = if in_pod {
            writeln!(text, "    - name: {name}\n      value: \"{value}\"")
        } else {
            writeln!(text, "sysctl -w {name}={value}")
        };
    }
    text
}

fn snippets(idle: u32, interval: u32, count: u32) -> Snippets {
    Snippets {
        python: format!(
            "sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)\n\
             sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, {idle})\n\
             sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, {interval})\n\
             sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, {count})\n"
        ),
        go: format!(
            "net.Dialer{{KeepAliveConfig: net.KeepAliveConfig{{Enable: true, Idle: {idle} * time.Second, Interval: {interval} * time.Second, Count: {count}}}}}\n"
        ),
        java: format!(
            "socket.setKeepAlive(true);\n\
             socket.setOption(ExtendedSocketOptions.TCP_KEEPIDLE, {idle});\n\
             socket.setOption(ExtendedSocketOptions.TCP_KEEPINTERVAL, {interval});\n\
             socket.setOption(ExtendedSocketOptions.TCP_KEEPCOUNT, {count});\n"
        ),
        node: format!("socket.setKeepAlive(true, {});\n", u64::from(idle) * 1000),
    }
}

/// The cgroup that holds the whole workload: the pod's (the parent of its
/// container's), the systemd unit's, else the process's own.
pub fn workload_cgroup(attribution: &Attribution) -> Option<String> {
    let path = attribution.cgroup_path.as_deref()?;
    if attribution.pod_uid.is_some()
        && attribution.container_id.is_some()
        && let Some((pod, _container)) = path.rsplit_once('/')
        && !pod.is_empty()
    {
        return Some(pod.to_owned());
    }
    if let Some(unit) = &attribution.unit {
        let mut prefix = String::new();
        for part in path.split('/').filter(|part| !part.is_empty()) {
            prefix.push('/');
            prefix.push_str(part);
            if part == unit {
                return Some(prefix);
            }
        }
    }
    Some(path.to_owned())
}

/// How `[enforce]` selects one workload: a pod by its namespace and owner
/// label (what every pod of its Deployment shares, and survives restarts
/// that change the pod's cgroup), a host service by its systemd unit, else
/// the process's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Pod {
        namespace: String,
        /// An owner-identifying label of the pod (`pods::OWNER_LABELS`), if any.
        label: Option<(String, String)>,
    },
    Unit(String),
    Cgroup(String),
}

/// The selector of the socket's workload. None: nothing names the workload.
pub fn selector(attribution: &Attribution) -> Option<Selector> {
    if let Some(namespace) = &attribution.namespace {
        return Some(Selector::Pod {
            namespace: namespace.clone(),
            label: attribution
                .pod_owner_label
                .as_ref()
                .map(|label| (label.key.clone(), label.value.clone())),
        });
    }
    let cgroup = workload_cgroup(attribution)?;
    // `units` means `/system.slice/NAME`: any other unit keeps its cgroup.
    if let Some(unit) = &attribution.unit
        && cgroup == format!("/system.slice/{unit}")
    {
        return Some(Selector::Unit(unit.clone()));
    }
    Some(Selector::Cgroup(cgroup))
}

/// The `[enforce]` lines that select the socket's workload: a pod by its
/// namespace and, when the pod watch knows it, its owner label.
fn enforce_lines(attribution: &Attribution) -> String {
    let selectors: Vec<Selector> = selector(attribution).into_iter().collect();
    enforce_config(&selectors)
}

/// The `[enforce]` lines that select every one of `selectors` (none: every
/// workload). Selectors add up, but `namespaces` and `pod_labels` must both
/// match: pods are narrowed by a label only when all of them share it.
pub fn enforce_config(selectors: &[Selector]) -> String {
    if selectors.is_empty() {
        return "[enforce]\nmode = \"on\" # no selector: every workload on the node\n".to_owned();
    }
    let mut namespaces = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let mut units = BTreeSet::new();
    let mut cgroups = BTreeSet::new();
    for selector in selectors {
        match selector {
            Selector::Pod { namespace, label } => {
                namespaces.insert(namespace.as_str());
                labels.insert(label.as_ref());
            }
            Selector::Unit(unit) => {
                units.insert(unit.as_str());
            }
            Selector::Cgroup(cgroup) => {
                cgroups.insert(cgroup.as_str());
            }
        }
    }
    let mut text = "[enforce]\nmode = \"on\"\n".to_owned();
    if !namespaces.is_empty() {
        // Namespaces and labels narrow each other: pasted beside another
        // workload's, the two would select only pods matching both.
        text.push_str(
            "# pods, through the pod watch; if [enforce] already has namespaces or pod_labels, a pod must match both\n",
        );
        let _ = write!(text, "namespaces = [{}]", quoted(&namespaces));
        let shared = match labels.iter().collect::<Vec<_>>().as_slice() {
            [Some(label)] => Some(*label),
            _ => None,
        };
        let _ = match shared {
            Some((key, value)) => writeln!(
                text,
                "\npod_labels = {{ {} = {} }}",
                toml_key(key),
                toml_string(value)
            ),
            None => writeln!(text, " # the whole namespace: every pod in it"),
        };
    }
    if !units.is_empty() {
        let _ = writeln!(
            text,
            "units = [{}] # add to the list if [enforce] exists",
            quoted(&units)
        );
    }
    if !cgroups.is_empty() {
        let _ = writeln!(
            text,
            "cgroups = [{}] # add to the list if [enforce] exists",
            quoted(&cgroups)
        );
    }
    text
}

fn quoted(items: &BTreeSet<&str>) -> String {
    items
        .iter()
        .map(|item| toml_string(item))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A label key as a TOML key: bare when it can be, else quoted
/// (`app.kubernetes.io/name` would be nested tables bare).
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        key.to_owned()
    } else {
        toml_string(key)
    }
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::attribution::pods::PodMeta;

    fn keepalive(enabled: bool, idle_from: Source, interval_seconds: f64) -> Keepalive {
        Keepalive {
            enabled,
            idle_seconds: 7200.0,
            idle_from,
            interval_seconds,
            interval_from: Source::Namespace,
            count: 9,
            count_from: Source::Namespace,
            probes_answered: 0,
            probes_unanswered: 0,
            timer_runs: None,
        }
    }

    fn pod() -> Attribution {
        Attribution {
            cgroup_path: Some(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f6a.slice/cri-containerd-5d8e.scope"
                    .to_owned(),
            ),
            container_id: Some("5d8e".to_owned()),
            pod_uid: Some("3f6a".to_owned()),
            namespace: Some("shop".to_owned()),
            pod: Some("checkout-7d4b9c-x2x4z".to_owned()),
            ..Attribution::default()
        }
    }

    /// The lines as the daemon's config parser reads them, in mode on.
    fn parsed(lines: &str) -> crate::config::EnforceConfig {
        let config = crate::config::PathConfig::parse(lines, "fix")
            .unwrap_or_else(|error| panic!("{lines}: {error}"));
        assert_eq!(config.enforce.mode, Some(crate::config::EnforceMode::On));
        config.enforce
    }

    /// `pod()` as attributed from a pod watch that knows these labels.
    fn labelled(labels: &BTreeMap<String, String>) -> Attribution {
        let meta = PodMeta {
            namespace: "shop".to_owned(),
            name: "checkout-7d4b9c-x2x4z".to_owned(),
            workload: "deployment/checkout".to_owned(),
            containers: HashMap::new(),
            labels: labels.clone(),
        };
        Attribution {
            pod_owner_label: meta.owner_label(),
            ..pod()
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn a_pod_with_an_owner_label_is_selected_by_namespace_and_label() {
        let pod_labels = labels(&[
            ("app", "checkout"),
            ("app.kubernetes.io/name", "checkout-api"),
            ("pod-template-hash", "7d4b9c"),
        ]);
        let lines = enforce_config(&[selector(&labelled(&pod_labels)).unwrap()]);
        // The recommended label first; quoted, or TOML would nest its dots.
        assert_eq!(
            lines,
            "[enforce]\nmode = \"on\"\n# pods, through the pod watch; if [enforce] already has namespaces or pod_labels, a pod must match both\nnamespaces = [\"shop\"]\npod_labels = { \"app.kubernetes.io/name\" = \"checkout-api\" }\n"
        );
        let config = parsed(&lines);
        assert_eq!(config.namespaces, ["shop"]);
        assert_eq!(
            config.pod_labels,
            labels(&[("app.kubernetes.io/name", "checkout-api")])
        );
        assert!(config.cgroups.is_empty());

        let k8s_app = labels(&[("k8s-app", "kube-dns"), ("pod-template-hash", "5d9c")]);
        let app = labels(&[("app", "checkout"), ("k8s-app", "kube-dns")]);
        for (pod_labels, expected) in [
            (k8s_app, ("k8s-app", "kube-dns")),
            (app, ("app", "checkout")),
        ] {
            let lines = enforce_config(&[selector(&labelled(&pod_labels)).unwrap()]);
            assert_eq!(parsed(&lines).pod_labels, labels(&[expected]), "{lines}");
        }
    }

    #[test]
    fn a_pod_without_an_owner_label_is_selected_by_its_whole_namespace() {
        let lines = enforce_config(&[selector(&labelled(&labels(&[
            ("pod-template-hash", "7d4b9c"),
            ("tier", "web"),
        ])))
        .unwrap()]);
        assert_eq!(
            lines,
            "[enforce]\nmode = \"on\"\n# pods, through the pod watch; if [enforce] already has namespaces or pod_labels, a pod must match both\nnamespaces = [\"shop\"] # the whole namespace: every pod in it\n"
        );
        let config = parsed(&lines);
        assert_eq!(config.namespaces, ["shop"]);
        assert!(config.pod_labels.is_empty());
        // Pods that do not share one label: only their namespace selects all.
        let checkout = selector(&labelled(&labels(&[("app", "checkout")])));
        let cart = selector(&labelled(&labels(&[("app", "cart")])));
        let lines = enforce_config(&[checkout.unwrap(), cart.unwrap()]);
        assert!(parsed(&lines).pod_labels.is_empty(), "{lines}");
    }

    #[test]
    fn a_system_service_is_selected_by_its_unit() {
        let service = Attribution {
            cgroup_path: Some("/system.slice/billing.service".to_owned()),
            unit: Some("billing.service".to_owned()),
            ..Attribution::default()
        };
        let fix = for_socket(
            Risk::NoKeepalive,
            350,
            &keepalive(false, Source::Namespace, 75.0),
            &service,
        );
        let Fix::Application { enforce, .. } = &fix else {
            panic!("{fix:?}");
        };
        assert_eq!(
            enforce,
            "[enforce]\nmode = \"on\"\nunits = [\"billing.service\"] # add to the list if [enforce] exists\n"
        );
        let config = parsed(enforce);
        assert_eq!(config.cgroups, ["/system.slice/billing.service"]);
        assert!(!config.selects_pods());
    }

    #[test]
    fn other_workloads_are_selected_by_their_cgroup() {
        // A bare process, a unit outside system.slice (`units` cannot name
        // it), and a pod whose namespace is unknown (no pod watch).
        let bare = Attribution {
            cgroup_path: Some("/user.slice/session-3.scope".to_owned()),
            ..Attribution::default()
        };
        let user_unit = Attribution {
            cgroup_path: Some(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service".to_owned(),
            ),
            unit: Some("sync.service".to_owned()),
            ..Attribution::default()
        };
        let unnamed_pod = Attribution {
            namespace: None,
            pod: None,
            ..pod()
        };
        for (attribution, cgroup) in [
            (bare, "/user.slice/session-3.scope"),
            (
                user_unit,
                "/user.slice/user-1000.slice/user@1000.service/app.slice/sync.service",
            ),
            (
                unnamed_pod,
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f6a.slice",
            ),
        ] {
            let fix = for_socket(
                Risk::NoKeepalive,
                350,
                &keepalive(false, Source::Namespace, 75.0),
                &attribution,
            );
            let Fix::Application { enforce, .. } = &fix else {
                panic!("{fix:?}");
            };
            assert_eq!(
                enforce,
                &format!(
                    "[enforce]\nmode = \"on\"\ncgroups = [\"{cgroup}\"] # add to the list if [enforce] exists\n"
                )
            );
            assert_eq!(parsed(enforce).cgroups, [cgroup]);
        }
    }

    #[test]
    fn targets_follow_the_runbook_and_fit_short_timeouts() {
        assert_eq!(target(350), (60, 30, 5));
        assert_eq!(target(60), (30, 15, 5));
        assert_eq!(target(5), (2, 1, 5));
        assert_eq!(target(1), (1, 1, 5));
    }

    #[test]
    fn keepalive_too_slow_from_the_namespace_gets_the_pod_sysctl() {
        let fix = for_socket(
            Risk::KeepaliveTooSlow,
            350,
            &keepalive(true, Source::Namespace, 75.0),
            &pod(),
        );
        let Fix::Sysctl {
            sysctls, snippet, ..
        } = &fix
        else {
            panic!("{fix:?}");
        };
        // 75 s is below 80% of 350 s: the interval stays.
        assert_eq!(
            sysctls,
            &[Sysctl {
                name: KEEPALIVE_TIME,
                value: 60
            }]
        );
        assert_eq!(
            snippet,
            "securityContext:\n  sysctls:\n    - name: net.ipv4.tcp_keepalive_time\n      value: \"60\"\n"
        );
        let json = serde_json::to_value(&fix).unwrap();
        assert_eq!(json["kind"], "sysctl");
        assert_eq!(json["sysctls"][0]["value"], 60);
    }

    #[test]
    fn a_slow_namespace_interval_is_lowered_too_and_hosts_get_sysctl_commands() {
        // Behind a 60 s load balancer the default 75 s interval loses the flow.
        let fix = for_socket(
            Risk::KeepaliveTooSlow,
            60,
            &keepalive(true, Source::Namespace, 75.0),
            &Attribution {
                cgroup_path: Some("/system.slice/billing.service".to_owned()),
                unit: Some("billing.service".to_owned()),
                ..Attribution::default()
            },
        );
        let Fix::Sysctl { snippet, .. } = &fix else {
            panic!("{fix:?}");
        };
        assert_eq!(
            snippet,
            "sysctl -w net.ipv4.tcp_keepalive_time=30\nsysctl -w net.ipv4.tcp_keepalive_intvl=15\n"
        );
    }

    #[test]
    fn no_keepalive_needs_the_application_or_enforcement_of_the_pod() {
        let fix = for_socket(
            Risk::NoKeepalive,
            350,
            &keepalive(false, Source::Namespace, 75.0),
            &pod(),
        );
        let Fix::Application {
            change,
            idle_seconds,
            snippets,
            enforce,
            runbook,
            ..
        } = &fix
        else {
            panic!("{fix:?}");
        };
        assert!(change.starts_with("turn SO_KEEPALIVE on"), "{change}");
        assert_eq!(*idle_seconds, 60);
        assert!(snippets.python.contains("socket.TCP_KEEPIDLE, 60)"));
        assert!(snippets.go.contains("Idle: 60 * time.Second"));
        assert!(snippets.java.contains("TCP_KEEPIDLE, 60)"));
        assert_eq!(snippets.node, "socket.setKeepAlive(true, 60000);\n");
        assert_eq!(*runbook, APPLICATION_RUNBOOK);
        // A pod without an owner label is selected by its namespace...
        assert_eq!(
            enforce,
            "[enforce]\nmode = \"on\"\n# pods, through the pod watch; if [enforce] already has namespaces or pod_labels, a pod must match both\nnamespaces = [\"shop\"] # the whole namespace: every pod in it\n"
        );
        let config = parsed(enforce);
        assert_eq!(config.namespaces, ["shop"]);
        assert!(config.pod_labels.is_empty() && config.cgroups.is_empty());
        assert_eq!(serde_json::to_value(&fix).unwrap()["kind"], "application");
        // ...and one the pod watch labelled by it too.
        let fix = for_socket(
            Risk::NoKeepalive,
            350,
            &keepalive(false, Source::Namespace, 75.0),
            &labelled(&labels(&[("app", "checkout"), ("tier", "web")])),
        );
        let Fix::Application { enforce, .. } = &fix else {
            panic!("{fix:?}");
        };
        assert_eq!(
            parsed(enforce).pod_labels,
            labels(&[("app", "checkout")]),
            "{enforce}"
        );
    }

    #[test]
    fn an_application_set_slow_keepidle_is_the_application_s_to_lower() {
        let fix = for_socket(
            Risk::KeepaliveTooSlow,
            350,
            &keepalive(true, Source::Socket, 75.0),
            &Attribution::default(),
        );
        let Fix::Application {
            change, enforce, ..
        } = &fix
        else {
            panic!("{fix:?}");
        };
        assert!(change.contains("own TCP_KEEPIDLE to 60 s"), "{change}");
        assert!(enforce.contains("every workload"), "{enforce}");
        assert!(!parsed(enforce).selects_pods());
    }

    #[test]
    fn workload_cgroups_of_units_and_plain_processes() {
        let unit = Attribution {
            cgroup_path: Some("/system.slice/billing.service/worker".to_owned()),
            unit: Some("billing.service".to_owned()),
            ..Attribution::default()
        };
        assert_eq!(
            workload_cgroup(&unit).as_deref(),
            Some("/system.slice/billing.service")
        );
        let plain = Attribution {
            cgroup_path: Some("/user.slice/session-3.scope".to_owned()),
            ..Attribution::default()
        };
        assert_eq!(
            workload_cgroup(&plain).as_deref(),
            Some("/user.slice/session-3.scope")
        );
        assert_eq!(workload_cgroup(&Attribution::default()), None);
    }
}
