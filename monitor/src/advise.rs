//! `idlemon advise`: the running daemon's at-risk sockets summed up per
//! workload, each with the one fix that covers all of its sockets. Reads
//! `/sockets?at_risk=true` like `idlemon sockets`; the summary itself is
//! pure logic, unit-tested.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use crate::{attribution::Attribution, cli::AdviseArgs, client, fix};

pub fn run(args: &AdviseArgs) -> anyhow::Result<()> {
    let url = format!("{}/sockets?at_risk=true", args.url.trim_end_matches('/'));
    let body = client::get(&url)?;
    let sockets: Vec<Value> = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not return a JSON array"))?;
    let advice = advise(&sockets);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&advice)?);
    } else {
        print!("{}", render(&advice));
    }
    Ok(())
}

/// One workload's at-risk sockets and their fix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advice {
    /// The Kubernetes namespace; null outside pods.
    pub namespace: Option<String>,
    /// The pod's owner (`deployment/checkout`), else the systemd unit, else
    /// the process name: the `workload` label of the metrics.
    pub workload: String,
    pub sockets: usize,
    /// Sockets per risk (`no_keepalive`, `keepalive_too_slow`).
    pub risks: BTreeMap<String, usize>,
    /// Where they go, the most frequent first (at most five).
    pub destinations: Vec<String>,
    /// What their paths do to a flow left idle too long, in the words of
    /// each path's `kind` (distinct, from the sockets' `why`).
    pub paths: Vec<String>,
    /// The one fix for all of them: the application's (or enforcement's)
    /// when any socket has keepalive off, since no sysctl helps those; else
    /// the sysctls at the lowest value any of its paths needs.
    pub fix: Value,
}

/// At most this many destinations per workload.
const DESTINATIONS: usize = 5;

/// Groups at-risk sockets (`/sockets` entries) by workload, the workload
/// with the most first.
pub fn advise(sockets: &[Value]) -> Vec<Advice> {
    let mut groups: BTreeMap<(Option<String>, String), Vec<&Value>> = BTreeMap::new();
    for socket in sockets.iter().filter(|socket| socket["fix"].is_object()) {
        let text = |key: &str| socket[key].as_str().map(str::to_owned);
        let workload = text("workload")
            .or_else(|| text("unit"))
            .or_else(|| text("comm"))
            .unwrap_or_else(|| "unknown".to_owned());
        groups
            .entry((text("namespace"), workload))
            .or_default()
            .push(socket);
    }
    let mut advice: Vec<Advice> = groups
        .into_iter()
        .map(|((namespace, workload), sockets)| {
            let mut risks = BTreeMap::new();
            let mut destinations: BTreeMap<String, usize> = BTreeMap::new();
            let mut paths: BTreeSet<String> = BTreeSet::new();
            for socket in &sockets {
                // "idle 400 s with keepalive off; the GWLB forgets ...": the path's part.
                if let Some((_, path)) = socket["why"].as_str().and_then(|why| why.split_once("; "))
                {
                    paths.insert(path.to_owned());
                }
                let risk = socket["risk"].as_str().unwrap_or("unknown").to_owned();
                *risks.entry(risk).or_insert(0) += 1;
                let remote = socket["remote"].as_str().unwrap_or("?").to_owned();
                *destinations.entry(remote).or_insert(0) += 1;
            }
            let mut destinations: Vec<(String, usize)> = destinations.into_iter().collect();
            destinations.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            Advice {
                namespace,
                workload,
                sockets: sockets.len(),
                risks,
                destinations: destinations
                    .into_iter()
                    .take(DESTINATIONS)
                    .map(|(remote, _)| remote)
                    .collect(),
                paths: paths.into_iter().collect(),
                fix: one_fix(&sockets),
            }
        })
        .collect();
    advice.sort_by_key(|item| std::cmp::Reverse(item.sockets));
    advice
}

/// The fix that covers every one of a workload's at-risk sockets.
fn one_fix(sockets: &[&Value]) -> Value {
    let fixes: Vec<&Value> = sockets.iter().map(|socket| &socket["fix"]).collect();
    let applications: Vec<&Value> = fixes
        .iter()
        .copied()
        .filter(|fix| fix["kind"] == "application")
        .collect();
    if !applications.is_empty() {
        // The shortest path's values suit the others too; enforcement
        // selects every socket's workload: pods, units, else cgroups.
        let mut chosen = applications
            .iter()
            .copied()
            .min_by_key(|fix| fix["idle_seconds"].as_u64().unwrap_or(u64::MAX))
            .cloned()
            .unwrap_or(Value::Null);
        // Pods by namespace and, where `/sockets` has it, owner label.
        let selectors: Vec<fix::Selector> = sockets
            .iter()
            .filter_map(|socket| fix::selector(&attribution(socket)))
            .collect();
        chosen["enforce"] = Value::from(fix::enforce_config(&selectors));
        return chosen;
    }
    // Sysctls only: each at the lowest value any socket needs.
    let mut lowest: BTreeMap<String, u64> = BTreeMap::new();
    for sysctl in fixes
        .iter()
        .filter_map(|fix| fix["sysctls"].as_array())
        .flatten()
    {
        if let (Some(name), Some(value)) = (sysctl["name"].as_str(), sysctl["value"].as_u64()) {
            let entry = lowest.entry(name.to_owned()).or_insert(value);
            *entry = (*entry).min(value);
        }
    }
    // tcp_keepalive_time before tcp_keepalive_intvl, as the runbook has them.
    let mut sysctls: Vec<(String, u64)> = lowest.into_iter().collect();
    sysctls.sort_by_key(|(name, _)| !name.ends_with("_time"));
    let in_pod = sockets.iter().any(|socket| socket["pod_uid"].is_string());
    let pairs: Vec<(&str, u32)> = sysctls
        .iter()
        .map(|(name, value)| (name.as_str(), u32::try_from(*value).unwrap_or(u32::MAX)))
        .collect();
    serde_json::json!({
        "kind": "sysctl",
        "sysctls": sysctls
            .iter()
            .map(|(name, value)| serde_json::json!({ "name": name, "value": value }))
            .collect::<Vec<_>>(),
        "snippet": fix::sysctl_snippet(&pairs, in_pod),
        "runbook": fixes.first().map_or(Value::Null, |fix| fix["runbook"].clone()),
    })
}

/// The attribution fields of a `/sockets` entry that name its workload.
fn attribution(socket: &Value) -> Attribution {
    let text = |key: &str| socket[key].as_str().map(str::to_owned);
    Attribution {
        cgroup_path: text("cgroup_path"),
        container_id: text("container_id"),
        pod_uid: text("pod_uid"),
        namespace: text("namespace"),
        unit: text("unit"),
        pod_owner_label: serde_json::from_value(socket["pod_owner_label"].clone()).ok(),
        ..Attribution::default()
    }
}

/// The summary for people: one block per workload.
pub fn render(advice: &[Advice]) -> String {
    if advice.is_empty() {
        return "No socket is at risk.\n".to_owned();
    }
    let mut out = String::new();
    for item in advice {
        let name = match &item.namespace {
            Some(namespace) => format!("{namespace}/{}", item.workload),
            None => item.workload.clone(),
        };
        let risks: Vec<String> = item
            .risks
            .iter()
            .map(|(risk, count)| format!("{count} {risk}"))
            .collect();
        let _ = writeln!(
            out,
            "{name}: {} at-risk socket{} ({}) to {}",
            item.sockets,
            if item.sockets == 1 { "" } else { "s" },
            risks.join(", "),
            item.destinations.join(", ")
        );
        for path in &item.paths {
            let _ = writeln!(out, "  Path: {path}.");
        }
        let fix = &item.fix;
        let runbook = fix["runbook"].as_str().unwrap_or("deploy/runbook.md");
        if fix["kind"] == "sysctl" {
            let _ = writeln!(out, "  Fix: set the keepalive sysctls ({runbook}):");
            indent(&mut out, fix["snippet"].as_str().unwrap_or_default());
        } else {
            let _ = writeln!(
                out,
                "  Fix: in the application, {} ({runbook}).",
                fix["change"].as_str().unwrap_or("turn keepalive on")
            );
            let _ = writeln!(
                out,
                "  Or, without a code change, idlemon's keepalive enforcement, in its config file:"
            );
            indent(&mut out, fix["enforce"].as_str().unwrap_or_default());
        }
        out.push('\n');
    }
    out
}

fn indent(out: &mut String, text: &str) {
    for line in text.lines() {
        let _ = writeln!(out, "    {line}");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn socket(workload: &str, pod: &str, remote: &str, fix: Value) -> Value {
        json!({
            "remote": remote,
            "risk": if fix["kind"] == "sysctl" { "keepalive_too_slow" } else { "no_keepalive" },
            "namespace": "shop",
            "workload": workload,
            "pod_uid": pod,
            "container_id": "c",
            "cgroup_path": format!("/kubepods.slice/kubepods-pod{pod}.slice/cri-containerd-c.scope"),
            "comm": "java",
            "unit": null,
            "fix": fix,
        })
    }

    fn sysctl(time: u32, interval: Option<u32>) -> Value {
        let mut sysctls = vec![json!({"name": "net.ipv4.tcp_keepalive_time", "value": time})];
        if let Some(interval) = interval {
            sysctls.push(json!({"name": "net.ipv4.tcp_keepalive_intvl", "value": interval}));
        }
        json!({"kind": "sysctl", "sysctls": sysctls, "snippet": "", "runbook": "deploy/runbook.md#a"})
    }

    fn application(idle: u32) -> Value {
        json!({"kind": "application", "idle_seconds": idle, "change": format!("turn SO_KEEPALIVE on, with TCP_KEEPIDLE {idle} s"),
               "runbook": "deploy/runbook.md#b", "enforce": "one pod's"})
    }

    #[test]
    fn sysctl_only_workloads_get_the_lowest_value_of_their_paths() {
        let advice = advise(&[
            socket("deployment/cart", "p1", "10.0.0.9:5432", sysctl(60, None)),
            socket(
                "deployment/cart",
                "p2",
                "10.0.0.7:443",
                sysctl(30, Some(15)),
            ),
            socket("deployment/cart", "p1", "10.0.0.9:5432", sysctl(60, None)),
        ]);
        assert_eq!(advice.len(), 1);
        let cart = &advice[0];
        assert_eq!(
            (cart.namespace.as_deref(), cart.workload.as_str()),
            (Some("shop"), "deployment/cart")
        );
        assert_eq!(cart.sockets, 3);
        assert_eq!(cart.risks["keepalive_too_slow"], 3);
        assert_eq!(cart.destinations, ["10.0.0.9:5432", "10.0.0.7:443"]);
        assert_eq!(cart.fix["kind"], "sysctl");
        assert_eq!(
            cart.fix["snippet"],
            "securityContext:\n  sysctls:\n    - name: net.ipv4.tcp_keepalive_time\n      value: \"30\"\n    - name: net.ipv4.tcp_keepalive_intvl\n      value: \"15\"\n"
        );
        let text = render(&advice);
        assert!(text.starts_with("shop/deployment/cart: 3 at-risk sockets (3 keepalive_too_slow) to 10.0.0.9:5432, 10.0.0.7:443\n"), "{text}");
        assert!(
            text.contains(
                "  Fix: set the keepalive sysctls (deploy/runbook.md#a):\n    securityContext:\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn one_socket_without_keepalive_makes_it_the_application_s_fix_for_every_pod() {
        let advice = advise(&[
            socket("deployment/api", "p1", "10.0.0.9:5432", sysctl(60, None)),
            socket("deployment/api", "p2", "10.0.0.9:5432", application(60)),
            socket("deployment/api", "p3", "10.0.0.8:80", application(2)),
            socket("deployment/cart", "p4", "10.0.0.9:5432", sysctl(60, None)),
        ]);
        assert_eq!(advice.len(), 2);
        let api = &advice[0];
        assert_eq!(api.workload, "deployment/api");
        assert_eq!(
            (api.risks["no_keepalive"], api.risks["keepalive_too_slow"]),
            (2, 1)
        );
        // The shortest path's values; enforcement of all three pods, by
        // their namespace (once, not per pod).
        assert_eq!(api.fix["kind"], "application");
        assert_eq!(api.fix["idle_seconds"], 2);
        let enforce = api.fix["enforce"].as_str().unwrap();
        assert_eq!(
            enforce,
            "[enforce]\nmode = \"on\"\n# pods, through the pod watch; if [enforce] already has namespaces or pod_labels, a pod must match both\nnamespaces = [\"shop\"] # the whole namespace: every pod in it\n"
        );
        let config = crate::config::PathConfig::parse(enforce, "advise").expect(enforce);
        assert_eq!(config.enforce.namespaces, ["shop"]);
        let text = render(&advice);
        assert!(text.contains("  Fix: in the application, turn SO_KEEPALIVE on, with TCP_KEEPIDLE 2 s (deploy/runbook.md#b).\n  Or, without a code change, idlemon's keepalive enforcement, in its config file:\n    [enforce]\n"), "{text}");
        assert!(
            text.contains("shop/deployment/cart: 1 at-risk socket (1 keepalive_too_slow)"),
            "{text}"
        );
    }

    #[test]
    fn pods_sharing_an_owner_label_are_enforced_by_it() {
        let mut sockets: Vec<Value> = ["p1", "p2"]
            .iter()
            .map(|pod| socket("deployment/api", pod, "10.0.0.9:5432", application(60)))
            .collect();
        for socket in &mut sockets {
            socket["pod_owner_label"] = json!({"key": "app.kubernetes.io/name", "value": "api"});
        }
        let advice = advise(&sockets);
        let enforce = advice[0].fix["enforce"].as_str().unwrap();
        let config = crate::config::PathConfig::parse(enforce, "advise").expect(enforce);
        assert_eq!(config.enforce.namespaces, ["shop"]);
        assert_eq!(
            config.enforce.pod_labels,
            [("app.kubernetes.io/name".to_owned(), "api".to_owned())].into(),
            "{enforce}"
        );
    }

    #[test]
    fn host_services_are_enforced_by_unit_and_other_processes_by_cgroup() {
        let mut unit = socket("", "", "192.0.2.1:443", application(60));
        unit["namespace"] = Value::Null;
        unit["workload"] = Value::Null;
        unit["pod_uid"] = Value::Null;
        unit["container_id"] = Value::Null;
        unit["unit"] = json!("billing.service");
        unit["cgroup_path"] = json!("/system.slice/billing.service");
        let mut process = unit.clone();
        process["unit"] = Value::Null;
        process["comm"] = json!("curl");
        process["cgroup_path"] = json!("/user.slice/session-3.scope");
        let advice = advise(&[unit, process]);
        let enforce: Vec<&str> = advice
            .iter()
            .map(|item| item.fix["enforce"].as_str().unwrap())
            .collect();
        assert_eq!(
            enforce,
            [
                "[enforce]\nmode = \"on\"\nunits = [\"billing.service\"] # add to the list if [enforce] exists\n",
                "[enforce]\nmode = \"on\"\ncgroups = [\"/user.slice/session-3.scope\"] # add to the list if [enforce] exists\n",
            ]
        );
        for lines in enforce {
            crate::config::PathConfig::parse(lines, "advise").expect(lines);
        }
        assert!(render(&advice).contains(
            "config file:\n    [enforce]\n    mode = \"on\"\n    units = [\"billing.service\"]"
        ));
    }

    #[test]
    fn each_path_kind_says_what_it_does_once() {
        let gwlb = "the GWLB forgets a flow idle 350 s and drops its next packet";
        let nat =
            "the NAT gateway forgets a flow idle 350 s and answers its next packet with a reset";
        let mut sockets = Vec::new();
        for (idle, path) in [(400, gwlb), (500, gwlb), (400, nat)] {
            let mut socket = socket("deployment/api", "p1", "10.0.0.9:5432", application(60));
            socket["why"] = json!(format!("idle {idle} s with keepalive off; {path}"));
            sockets.push(socket);
        }
        let advice = advise(&sockets);
        assert_eq!(advice[0].paths, [gwlb, nat]);
        let text = render(&advice);
        assert!(
            text.contains(&format!("\n  Path: {gwlb}.\n  Path: {nat}.\n  Fix: ")),
            "{text}"
        );
    }

    #[test]
    fn hosts_group_by_unit_then_process_and_safe_sockets_are_left_out() {
        let mut unit = socket("", "", "192.0.2.1:443", sysctl(60, None));
        unit["namespace"] = Value::Null;
        unit["workload"] = Value::Null;
        unit["pod_uid"] = Value::Null;
        unit["unit"] = json!("billing.service");
        unit["cgroup_path"] = json!("/system.slice/billing.service");
        let mut process = unit.clone();
        process["unit"] = Value::Null;
        let mut safe = unit.clone();
        safe["fix"] = Value::Null;
        let advice = advise(&[unit, process, safe]);
        let names: Vec<&str> = advice.iter().map(|item| item.workload.as_str()).collect();
        assert_eq!(names, ["billing.service", "java"]);
        assert_eq!(advice[0].sockets, 1);
        assert_eq!(
            advice[0].fix["snippet"],
            "sysctl -w net.ipv4.tcp_keepalive_time=60\n"
        );
        assert_eq!(render(&[]), "No socket is at risk.\n");
    }
}
