//! Attribution end to end: a process in a cgroup laid out as containerd and
//! the kubelet's systemd driver lay out a container, and a fake Kubernetes
//! API that knows its pod. The at-risk socket it makes must carry its comm,
//! cgroup path, container, pod and workload, in /sockets and in the metrics.
//! Then the pod watch against a fake API server that misbehaves as real ones
//! do over months: a rotated token, a watch that stalls after its headers,
//! 410 Gone, failures in a row, and responses that must not reach the log.
//! Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use idlemon_testkit as kit;

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use kit::fake_api::{self, FakeApi, Reply};
use kit::{Daemon, Netns, TempFile, cgroup::Cgroup, process::Guarded, wait_for};

const POD_UID: &str = "6f1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e";

/// A fake API server for one node: lists one pod, labelled as Helm charts
/// label theirs, and holds watches open.
fn fake_kubernetes_api(netns: &Netns, container_id: String) -> FakeApi {
    let pod = fake_api::pod(POD_UID, "checkout-7d4b9c-x2x4z", "5", &container_id).replace(
        r#""labels":{"#,
        r#""labels":{"app.kubernetes.io/name":"checkout","app":"shop","#,
    );
    FakeApi::start(netns, move |request, _| {
        if request.watch {
            Reply::Watch(Vec::new(), Duration::from_secs(60))
        } else {
            fake_api::list("5", std::slice::from_ref(&pod))
        }
    })
}

/// Listens, connects to itself, exchanges a byte, then stays idle: a client
/// without keepalive, started once its cgroup is set.
const APP: &str = r#"
import socket, sys, time
sys.stdin.readline()
server = socket.socket(); server.bind(("127.0.0.1", 8300)); server.listen()
client = socket.create_connection(("127.0.0.1", 8300))
peer, _ = server.accept()
client.send(b"x"); peer.recv(1)
print(client.getsockname()[1], flush=True)
time.sleep(60)
"#;

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn an_at_risk_socket_names_its_process_cgroup_container_pod_and_workload() {
    let container_id = format!("{:064x}", 0xfeed_0000_u64 + u64::from(std::process::id()));
    let slice = format!("idlemon-test-{}.slice", std::process::id());
    let relative = format!(
        "/{slice}/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
        POD_UID.replace('-', "_")
    );
    let cgroup = Cgroup::create(&relative).unwrap();

    let daemon_netns = Netns::new("daemon");
    let _api = fake_kubernetes_api(&daemon_netns, container_id.clone());
    let config = TempFile::new(
        "attribution.toml",
        "[[path]]\nname = \"loopback-test\"\ncidr = \"127.0.0.0/8\"\nports = [8300]\nidle_timeout = 5\n",
    );
    let daemon = Daemon::start_in(
        daemon_netns,
        &[
            "--node-name",
            fake_api::NODE,
            "--kube-api",
            fake_api::URL,
            // The pod label is opt-in (a rollout would start new series).
            "--owner-labels",
            "namespace,workload,pod",
            "--idle-threshold",
            "1",
            "--scan-interval",
            "0.5",
            "--config",
            config.path(),
        ],
    );

    let app_netns = Netns::new("app");
    let mut command = app_netns.command("python3");
    command
        .args(["-c", APP])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut app = Guarded::spawn(&mut command, "the app", Duration::ZERO).unwrap();
    cgroup.add(app.pid()).unwrap();
    app.child()
        .stdin
        .take()
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    let mut port = String::new();
    BufReader::new(app.child().stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let local = format!("127.0.0.1:{}", port.trim());

    let socket = wait_for(Duration::from_secs(10), || {
        daemon.sockets("?at_risk=true").into_iter().find(|socket| {
            socket["local"] == local.as_str() && socket["netns"] == app_netns.inode()
        })
    });
    drop(app);
    let socket = socket.unwrap_or_else(|| panic!("app socket not flagged; log:\n{}", daemon.log()));

    assert_eq!(socket["comm"], "python3");
    assert_eq!(socket["cgroup_path"], relative.as_str(), "{socket:#}");
    assert_eq!(socket["container_id"], container_id.as_str());
    assert_eq!(socket["container_runtime"], "containerd");
    assert_eq!(socket["pod_uid"], POD_UID);
    assert_eq!(socket["namespace"], "shop");
    assert_eq!(socket["pod"], "checkout-7d4b9c-x2x4z");
    assert_eq!(socket["workload"], "deployment/checkout");
    assert_eq!(socket["container"], "app");
    // The fix selects the pod by its namespace and its owner label, the
    // recommended one of the two it has.
    assert_eq!(
        socket["pod_owner_label"],
        serde_json::json!({"key": "app.kubernetes.io/name", "value": "checkout"})
    );
    let enforce = socket["fix"]["enforce"].as_str().unwrap_or_default();
    assert!(
        enforce.contains(
            "namespaces = [\"shop\"]\npod_labels = { \"app.kubernetes.io/name\" = \"checkout\" }\n"
        ),
        "{socket:#}"
    );
    assert_eq!(daemon.metric("idlemon_kubernetes_pods"), Some(1.0));
    assert_eq!(
        daemon.metric_sum(
            "idlemon_at_risk_sockets",
            "namespace=\"shop\",pod=\"checkout-7d4b9c-x2x4z\",reason=\"no_keepalive\",workload=\"deployment/checkout\""
        ),
        1.0
    );
}

const POD_A: &str = "0a1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e";
const POD_B: &str = "0b1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e";
const POD_C: &str = "0c1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e";

fn pod_a() -> String {
    fake_api::pod(POD_A, "checkout-7d4b9c-aaaaa", "10", "a1")
}

fn pod_b() -> String {
    fake_api::pod(POD_B, "checkout-7d4b9c-bbbbb", "11", "b1")
}

fn pod_c() -> String {
    fake_api::pod(POD_C, "checkout-7d4b9c-ccccc", "12", "c1")
}

/// idlemon watching the fake API in `netns`.
fn daemon_with_api(netns: Netns, extra: &[&str]) -> Daemon {
    let mut args = vec!["--node-name", fake_api::NODE, "--kube-api", fake_api::URL];
    args.extend_from_slice(extra);
    Daemon::start_in(netns, &args)
}

/// Waits until idlemon knows `pods` pods; false after `limit`.
fn knows_pods(daemon: &Daemon, pods: f64, limit: Duration) -> bool {
    wait_for(limit, || {
        (daemon.metric("idlemon_kubernetes_pods") == Some(pods)).then_some(())
    })
    .is_some()
}

fn watch_errors(daemon: &Daemon) -> f64 {
    daemon
        .metric("idlemon_kubernetes_watch_errors_total")
        .unwrap_or(0.0)
}

/// The kubelet rewrites a bound token's file well before it expires; once the
/// old token is refused, idlemon reads the file again and the watch goes on.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_rotated_token_is_read_again_and_the_watch_recovers() {
    let first = format!("first-token-{}", std::process::id());
    let second = format!("second-token-{}", std::process::id());
    let token_file = TempFile::new("kube-token", &format!("{first}\n"));
    let accepted = Arc::new(Mutex::new(first.clone()));
    let netns = Netns::new("daemon");
    let api = {
        let (accepted, second) = (Arc::clone(&accepted), second.clone());
        FakeApi::start(&netns, move |request, _| {
            let accepted = accepted.lock().unwrap().clone();
            if request.token.as_deref() != Some(accepted.as_str()) {
                return Reply::Json(401, fake_api::status(401, "Unauthorized", "Unauthorized"));
            }
            match (request.watch, accepted == second) {
                (false, _) => fake_api::list("10", &[pod_a()]),
                // Watches end every second, as if the server timed them out.
                (true, false) => Reply::Watch(Vec::new(), Duration::from_secs(1)),
                (true, true) => Reply::Watch(
                    vec![fake_api::event("ADDED", &pod_b())],
                    Duration::from_secs(60),
                ),
            }
        })
    };
    let daemon = daemon_with_api(netns, &["--kube-token-file", token_file.path()]);
    assert!(
        knows_pods(&daemon, 1.0, Duration::from_secs(10)),
        "first list; log:\n{}",
        daemon.log()
    );

    fs::write(&token_file.0, format!("{second}\n")).unwrap();
    *accepted.lock().unwrap() = second.clone();
    // Well within the minute after which the file would be read anyway.
    assert!(
        knows_pods(&daemon, 2.0, Duration::from_secs(20)),
        "no watch with the new token; requests: {:?}\nlog:\n{}",
        api.requests(),
        daemon.log()
    );
    assert!(watch_errors(&daemon) >= 1.0, "the refusal is counted");
    assert!(
        api.watches()
            .iter()
            .any(|watch| watch.token.as_deref() == Some(second.as_str()))
    );
    let log = daemon.log();
    assert!(
        !log.contains(&first) && !log.contains(&second),
        "a token in the log:\n{log}"
    );
}

/// A watch (or list) whose connection goes silent after the headers is given
/// up within `--kube-watch-timeout` plus 5 s, and started again.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_list_and_a_watch_that_stall_after_their_headers_are_restarted() {
    let netns = Netns::new("daemon");
    let api = FakeApi::start(&netns, |request, earlier| match (request.watch, earlier) {
        (false, 0) | (true, 0) => Reply::Stall,
        (false, _) => fake_api::list("10", &[pod_a()]),
        (true, _) => Reply::Watch(
            vec![fake_api::event("ADDED", &pod_b())],
            Duration::from_secs(60),
        ),
    });
    let daemon = daemon_with_api(netns, &["--kube-watch-timeout", "2"]);
    // Each stall ends after 2 + 5 s; the rest is quick.
    assert!(
        knows_pods(&daemon, 2.0, Duration::from_secs(40)),
        "requests: {:?}\nlog:\n{}",
        api.requests(),
        daemon.log()
    );
    assert_eq!(api.lists().len(), 2, "{:?}", api.requests());
    assert_eq!(api.watches().len(), 2, "{:?}", api.requests());
    assert!(watch_errors(&daemon) >= 1.0, "the stalled list is counted");
}

/// 410 Gone: the version the watch resumes from is too old. Whether the
/// server says so by refusing the watch or in an ERROR event, idlemon lists
/// again and picks up the pods it missed.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn gone_410_makes_the_watch_list_again() {
    let netns = Netns::new("daemon");
    let api = FakeApi::start(&netns, |request, earlier| {
        if !request.watch {
            return match earlier {
                0 => fake_api::list("10", &[pod_a()]),
                1 => fake_api::list("20", &[pod_a(), pod_b()]),
                _ => fake_api::list("30", &[pod_a(), pod_b(), pod_c()]),
            };
        }
        let expired = |version: &str| {
            fake_api::status(
                410,
                "Expired",
                &format!("too old resource version: {version} (25)"),
            )
        };
        match request.resource_version.as_deref() {
            Some("10") => Reply::Json(410, expired("10")),
            Some("20") => Reply::Watch(
                vec![fake_api::event("ERROR", &expired("20"))],
                Duration::from_secs(60),
            ),
            _ => Reply::Watch(Vec::new(), Duration::from_secs(60)),
        }
    });
    let daemon = daemon_with_api(netns, &[]);
    assert!(
        knows_pods(&daemon, 3.0, Duration::from_secs(30)),
        "requests: {:?}\nlog:\n{}",
        api.requests(),
        daemon.log()
    );
    // The watch from the last list follows it.
    let versions = wait_for(Duration::from_secs(5), || {
        let versions: Vec<_> = api
            .watches()
            .iter()
            .map(|watch| watch.resource_version.clone().unwrap_or_default())
            .collect();
        (versions.len() == 3).then_some(versions)
    });
    assert_eq!(
        versions.as_deref(),
        Some(&["10", "20", "30"].map(String::from)[..]),
        "{:?}",
        api.requests()
    );
    assert_eq!(watch_errors(&daemon), 2.0);
}

/// Failures in a row back off more and more; a success starts the backoff
/// over, so that one failure after months of watching is retried at once.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn backoff_grows_with_failures_and_starts_over_after_a_success() {
    let netns = Netns::new("daemon");
    let failure = || Reply::Json(500, fake_api::status(500, "InternalError", "etcd is down"));
    let api = FakeApi::start(&netns, move |request, earlier| {
        match (request.watch, earlier) {
            (false, 0..=2) | (true, 0) => failure(),
            (false, _) => fake_api::list("10", &[pod_a()]),
            (true, _) => Reply::Watch(
                vec![fake_api::event("ADDED", &pod_b())],
                Duration::from_secs(60),
            ),
        }
    });
    let daemon = daemon_with_api(netns, &[]);
    assert!(
        knows_pods(&daemon, 2.0, Duration::from_secs(40)),
        "requests: {:?}\nlog:\n{}",
        api.requests(),
        daemon.log()
    );
    assert_eq!(watch_errors(&daemon), 4.0);
    let lists = api.lists();
    let watches = api.watches();
    let gap = |later: &fake_api::ApiRequest, earlier: &fake_api::ApiRequest| {
        later.at.duration_since(earlier.at)
    };
    let (first, third) = (gap(&lists[1], &lists[0]), gap(&lists[3], &lists[2]));
    let after_success = gap(&watches[1], &watches[0]);
    // Backoff doubles: the third delay is four times the first (0.8 s, 3.2 s).
    assert!(third > first * 2, "delays {first:?} then {third:?}");
    // Without the reset, the delay after the failed watch would be the
    // fourth (6.4 s), not the first again.
    assert!(
        after_success < third,
        "after a success: {after_success:?}; before: {first:?}, {third:?}"
    );
}

/// Error responses and pods that do not decode are logged as what failed,
/// never with the response: pod specs carry names, images and environment.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn pod_data_never_reaches_the_log() {
    const MARKER: &str = "SECRET-VALUE";
    // A pod whose container status does not decode (`ready` is no boolean),
    // with the marker in the offending value and in its environment.
    let broken = pod_c()
        .replace(r#""ready":true"#, &format!(r#""ready":"{MARKER}-ready""#))
        .replace(
            r#""image":"shop/app:1"}]}"#,
            &format!(
                r#""image":"shop/app:1","env":[{{"name":"PASSWORD","value":"{MARKER}-env"}}]}}]}}"#
            ),
        );
    let netns = Netns::new("daemon");
    let api = {
        let broken = broken.clone();
        FakeApi::start(&netns, move |request, earlier| {
            match (request.watch, earlier) {
                // A proxy's error page that quotes what it was sent back.
                (false, 0) => Reply::Text(502, format!("upstream sent garbage: {broken}")),
                (false, _) => fake_api::list("10", &[pod_a(), broken.clone()]),
                (true, _) => Reply::Watch(
                    vec![
                        fake_api::event("MODIFIED", &broken),
                        fake_api::event("ADDED", &pod_b()),
                    ],
                    Duration::from_secs(60),
                ),
            }
        })
    };
    assert!(broken.contains(MARKER) && broken.contains("-env"));
    let daemon = daemon_with_api(netns, &["--log-format", "json"]);
    // The pod that does not decode is kept, by name, without container names.
    assert!(
        knows_pods(&daemon, 3.0, Duration::from_secs(30)),
        "requests: {:?}\nlog:\n{}",
        api.requests(),
        daemon.log()
    );
    assert_eq!(watch_errors(&daemon), 3.0, "{:?}", api.requests());
    assert_eq!(api.lists().len(), 2, "{:?}", api.requests());

    let log = daemon.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let failures = lines
        .iter()
        .filter(|line| line["level"] == "WARN" && line["target"] == "monitor::attribution::pods")
        .count();
    assert_eq!(failures, 3, "each failure is logged:\n{log}");
    // Every line, at the daemon's --log-level debug: kube's own debug lines
    // (which quote responses) are held at info unless the filter names kube.
    for line in &lines {
        assert!(
            !line.to_string().contains(MARKER),
            "pod data in the log: {line}"
        );
    }
}
