//! Attribution end to end: a process in a cgroup laid out as containerd and
//! the kubelet's systemd driver lay out a container, and a fake Kubernetes
//! API that knows its pod. The at-risk socket it makes must carry its comm,
//! cgroup path, container, pod and workload, in /sockets and in the metrics.
//! Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    path::PathBuf,
    process::Stdio,
    thread,
    time::Duration,
};

use common::{Daemon, Netns, TempFile, wait_for};

const POD_UID: &str = "6f1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e";

fn cgroup2_root() -> Option<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split_whitespace().next()? == "cgroup2")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
}

/// A fake API server for one node: lists one pod, and holds watches open.
fn fake_kubernetes_api(netns: &Netns, container_id: String) {
    let listener = netns.run(|| TcpListener::bind("127.0.0.1:8443").unwrap());
    let pod = format!(
        r#"{{"metadata":{{"uid":"{POD_UID}","name":"checkout-7d4b9c-x2x4z","namespace":"shop","resourceVersion":"5",
            "labels":{{"pod-template-hash":"7d4b9c"}},
            "ownerReferences":[{{"kind":"ReplicaSet","name":"checkout-7d4b9c","controller":true}}]}},
          "status":{{"containerStatuses":[{{"name":"app","containerID":"containerd://{container_id}"}}]}}}}"#
    )
    .replace('\n', "");
    thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(mut stream) = stream else { return };
            let pod = pod.clone();
            thread::spawn(move || {
                let mut request = [0u8; 4096];
                let read = stream.read(&mut request).unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..read]).into_owned();
                assert!(
                    request.contains("fieldSelector=spec.nodeName%3Dnode-a"),
                    "{request}"
                );
                if request.contains("watch=1") {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                    );
                    thread::sleep(Duration::from_secs(60));
                } else {
                    let body =
                        format!(r#"{{"metadata":{{"resourceVersion":"5"}},"items":[{pod}]}}"#);
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
    });
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
    let root = cgroup2_root().expect("cgroup2 is mounted (PLATFORM.md: /sys/fs/cgroup/unified)");
    let container_id = format!("{:064x}", 0xfeed_0000_u64 + u64::from(std::process::id()));
    let slice = format!("idlemon-test-{}.slice", std::process::id());
    let relative = format!(
        "/{slice}/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
        POD_UID.replace('-', "_")
    );
    let cgroup = root.join(relative.trim_start_matches('/'));
    fs::create_dir_all(&cgroup).unwrap();

    let daemon_netns = Netns::new("daemon");
    fake_kubernetes_api(&daemon_netns, container_id.clone());
    let config = TempFile::new(
        "attribution.toml",
        "[[path]]\nname = \"loopback-test\"\ncidr = \"127.0.0.0/8\"\nports = [8300]\nidle_timeout = 5\n",
    );
    let daemon = Daemon::start_in(
        daemon_netns,
        &[
            "--node-name",
            "node-a",
            "--kube-api",
            "http://127.0.0.1:8443",
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
    let mut app = app_netns
        .command("python3")
        .args(["-c", APP])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    fs::write(cgroup.join("cgroup.procs"), app.id().to_string()).unwrap();
    app.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut port = String::new();
    BufReader::new(app.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let local = format!("127.0.0.1:{}", port.trim());

    let socket = wait_for(Duration::from_secs(10), || {
        daemon.sockets("?at_risk=true").into_iter().find(|socket| {
            socket["local"] == local.as_str() && socket["netns"] == app_netns.inode()
        })
    });
    let _ = app.kill();
    let _ = app.wait();
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
    assert_eq!(daemon.metric("idlemon_kubernetes_pods"), Some(1.0));
    assert_eq!(
        daemon.metric_sum(
            "idlemon_at_risk_sockets",
            "namespace=\"shop\",pod=\"checkout-7d4b9c-x2x4z\",reason=\"no_keepalive\",workload=\"deployment/checkout\""
        ),
        1.0
    );

    // The cgroups are empty once the app is gone.
    let mut directory = cgroup.as_path();
    while directory != root {
        let _ = fs::remove_dir(directory);
        directory = directory.parent().unwrap();
    }
}
