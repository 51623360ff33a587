//! A real Prometheus server (Debian's) scrapes a running idlemon, and a query
//! of idlemon_at_risk_sockets finds the socket this test put at risk; then
//! two daemons stand in for two nodes of a cluster, and Prometheus, with the
//! rules of deploy/prometheus/idlemon-rules.yml, sums them per workload and
//! pages once. Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use idlemon_testkit as kit;
mod schema;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::Stdio,
    time::Duration,
};

use kit::{DAEMON_PORT, Daemon, Netns, TempFile, process::Guarded, sh, wait_for};
use serde_json::Value;

const APP: &str = r#"
import socket, sys, time
server = socket.socket(); server.bind(("127.0.0.1", 8500)); server.listen()
client = socket.create_connection(("127.0.0.1", 8500))
peer, _ = server.accept()
client.send(b"x"); peer.recv(1)
print("ready", flush=True)
time.sleep(60)
"#;

/// Debian's Prometheus in `netns` on 127.0.0.1:9090, with the scrape
/// config `scrape` and its storage in `storage`; killed when dropped.
fn start_prometheus(netns: &Netns, scrape: &TempFile, storage: &Path) -> Guarded {
    let mut command = netns.command("prometheus");
    command
        .args([
            &format!("--config.file={}", scrape.path()),
            &format!("--storage.tsdb.path={}", storage.display()),
            "--web.listen-address=127.0.0.1:9090",
            "--log.level=warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Guarded::spawn(
        &mut command,
        "prometheus (installed by cargo xtask setup)",
        Duration::ZERO,
    )
    .unwrap()
}

/// GET on the Prometheus HTTP API inside the daemon's namespace.
fn query(netns: &Netns, promql: &str) -> Option<Value> {
    let encoded: String = promql
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    let request = format!("GET /api/v1/query?query={encoded} HTTP/1.0\r\n\r\n");
    netns.run(move || {
        let mut stream = TcpStream::connect("127.0.0.1:9090").ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()
    })
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn prometheus_scrapes_idlemon_and_finds_the_at_risk_socket() {
    let config = TempFile::new(
        "prometheus-idlemon.toml",
        "[[path]]\ncidr = \"127.0.0.0/8\"\nports = [8500]\nidle_timeout = 5\n",
    );
    let daemon = Daemon::start(&[
        "--idle-threshold",
        "1",
        "--scan-interval",
        "0.5",
        "--config",
        config.path(),
    ]);
    let storage = std::env::temp_dir().join(format!("idlemon-prometheus-{}", std::process::id()));
    let scrape = TempFile::new(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: idlemon\n    \
             static_configs:\n      - targets: ['127.0.0.1:{DAEMON_PORT}']\n"
        ),
    );
    let _prometheus = start_prometheus(daemon.netns(), &scrape, &storage);

    let app_netns = Netns::new("app");
    let mut command = app_netns.command("python3");
    command.args(["-c", APP]).stdout(Stdio::piped());
    let mut app = Guarded::spawn(&mut command, "the app", Duration::ZERO).unwrap();
    let mut line = String::new();
    BufReader::new(app.child().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();

    let found = wait_for(Duration::from_secs(30), || {
        let answer = query(
            daemon.netns(),
            "idlemon_at_risk_sockets{reason=\"no_keepalive\"} > 0",
        )?;
        let result = answer["data"]["result"].as_array()?.clone();
        result
            .into_iter()
            .find(|series| series["metric"]["workload"] == "python3")
    });
    let _ = std::fs::remove_dir_all(&storage);
    let series = found.expect("Prometheus has the at-risk socket");
    assert_eq!(series["metric"]["job"], "idlemon");
    assert_eq!(series["value"][1], "1", "{series:#}");
}

/// One "node"'s application: `count` idle connections to 127.0.0.1:8500 (a
/// path with a 5 s idle timeout in the test's config), and a connect to a
/// closed port, which the kernel answers with a RST (an event). Prints the
/// refused socket's port.
const FLEET_APP: &str = r#"
import socket, sys, time
count = int(sys.argv[1])
server = socket.socket(); server.bind(("127.0.0.1", 8500)); server.listen()
pairs = []
for _ in range(count):
    client = socket.create_connection(("127.0.0.1", 8500))
    peer, _ = server.accept()
    client.send(b"x"); peer.recv(1)
    pairs.append((client, peer))
probe = socket.socket(); probe.bind(("127.0.0.1", 0))
port = probe.getsockname()[1]
try:
    probe.connect(("127.0.0.1", 9))
except OSError:
    pass
print(port, flush=True)
time.sleep(120)
"#;

/// The process name of the fleet's applications, the same on both nodes:
/// their workload label (host processes are named by `comm`).
const FLEET_WORKLOAD: &str = "fleetapp";

/// A /proc of its own for one daemon: links to the host's /proc entries of
/// its node's processes only. A daemon finds network namespaces through
/// `--proc-root` (and /run/netns), so with `--socket-walk namespaces` each
/// daemon watches its own applications' namespaces, as on separate hosts.
struct ProcRoot(std::path::PathBuf);

impl ProcRoot {
    fn new(node: &str) -> Self {
        let root = std::env::temp_dir().join(format!("idlemon-{}-proc-{node}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        // What the daemon checks to accept a procfs, and reads its mounts from.
        std::os::unix::fs::symlink("/proc/self", root.join("self")).unwrap();
        Self(root)
    }

    fn add(&self, pid: u32) {
        std::os::unix::fs::symlink(format!("/proc/{pid}"), self.0.join(pid.to_string())).unwrap();
    }
}

impl Drop for ProcRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Node {
    name: &'static str,
    daemon: Daemon,
    _app: Guarded,
    _proc: ProcRoot,
    /// The local port of the app's refused connect, whose RST is an event.
    refused_port: String,
}

/// Starts `name`'s daemon in a namespace of its own, reachable from
/// `prometheus` at `address` (a /30 with `address - 1` on Prometheus's side),
/// and its application, in a network namespace no other daemon knows, with
/// `connections` at-risk sockets.
fn start_node(
    name: &'static str,
    address: [u8; 4],
    connections: usize,
    app_binary: &str,
    config: &TempFile,
    prometheus: &Netns,
) -> Node {
    let proc_root = ProcRoot::new(name);
    // The daemon first: its hooks see the app's connects, which name the
    // sockets' owner.
    let daemon = Daemon::start_in(
        Netns::new(name),
        &[
            "--node-name",
            name,
            "--listen",
            &format!("0.0.0.0:{DAEMON_PORT}"),
            "--proc-root",
            proc_root.0.to_str().unwrap(),
            "--socket-walk",
            "namespaces",
            "--idle-threshold",
            "1",
            "--scan-interval",
            "0.5",
            "--config",
            config.path(),
            "--event-log",
            "",
        ],
    );
    // `unshare --net` makes a namespace that only the app's /proc entry
    // leads to (`ip netns add` would list it in /run/netns, which every
    // daemon walks). unshare and sh exec: the app keeps the child's pid.
    let mut command = std::process::Command::new("unshare");
    command
        .args([
            "--net",
            "--",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" -c \"$1\" \"$2\"",
            app_binary,
            FLEET_APP,
            &connections.to_string(),
        ])
        .stdout(Stdio::piped());
    let mut app = Guarded::spawn(&mut command, &format!("{name}'s app"), Duration::ZERO).unwrap();
    proc_root.add(app.pid());
    let mut refused_port = String::new();
    BufReader::new(app.child().stdout.take().unwrap())
        .read_line(&mut refused_port)
        .unwrap();
    assert!(
        !refused_port.trim().is_empty(),
        "{name}'s app did not start"
    );

    let [a, b, c, d] = address;
    let peer = format!("{a}.{b}.{c}.{}/30", d - 1);
    let own = format!("{a}.{b}.{c}.{d}/30");
    let link = format!("to-{name}");
    prometheus.veth(&link, &peer, daemon.netns(), "eth0", &own);
    Node {
        name,
        daemon,
        _app: app,
        _proc: proc_root,
        refused_port: refused_port.trim().to_owned(),
    }
}

/// The result vector of an instant query.
fn vector(netns: &Netns, promql: &str) -> Option<Vec<Value>> {
    let answer = query(netns, promql)?;
    (answer["status"] == "success").then_some(())?;
    answer["data"]["result"].as_array().cloned()
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn two_nodes_sum_per_workload_in_prometheus_and_page_once() {
    let config = TempFile::new(
        "fleet-idlemon.toml",
        "[[path]]\ncidr = \"127.0.0.0/8\"\nports = [8500]\nidle_timeout = 5\n",
    );
    // The applications' process name is their workload label.
    let bin = std::env::temp_dir().join(format!("idlemon-{}-fleet-bin", std::process::id()));
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    // The interpreter itself, not a wrapper that dispatches by its name.
    let python = sh(
        "python3",
        &[
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ],
    );
    let python = String::from_utf8(python.stdout).unwrap();
    let app_binary = bin.join(FLEET_WORKLOAD);
    std::os::unix::fs::symlink(python.trim(), &app_binary).unwrap();
    let app_binary = app_binary.to_str().unwrap();

    let prometheus_netns = Netns::new("prometheus");
    let nodes = [
        start_node(
            "node-a",
            [192, 0, 2, 2],
            1,
            app_binary,
            &config,
            &prometheus_netns,
        ),
        start_node(
            "node-b",
            [192, 0, 2, 6],
            2,
            app_binary,
            &config,
            &prometheus_netns,
        ),
    ];

    // The rules as shipped, with every `for:` at 0 s so that an alert fires
    // at its first evaluation instead of after 15 minutes.
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/idlemon-rules.yml"
    ))
    .unwrap();
    let rules: String = shipped
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 0s\n", &line[..line.len() - line.trim_start().len()]),
            None => format!("{line}\n"),
        })
        .collect();
    assert!(rules.contains("for: 0s"), "the rules have no `for:`");
    let rules = TempFile::new("fleet-rules.yml", &rules);
    // As a PodMonitor would: honor_labels (the owner labels are idlemon's),
    // and node and cluster labels on each target.
    let scrape = TempFile::new(
        "fleet-prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: idlemon\n    honor_labels: true\n    static_configs:\n\
             \x20     - targets: ['192.0.2.2:{DAEMON_PORT}']\n        labels: {{node: node-a, cluster: test}}\n\
             \x20     - targets: ['192.0.2.6:{DAEMON_PORT}']\n        labels: {{node: node-b, cluster: test}}\n",
            rules = rules.path()
        ),
    );
    let storage =
        std::env::temp_dir().join(format!("idlemon-fleet-prometheus-{}", std::process::id()));
    let _prometheus = start_prometheus(&prometheus_netns, &scrape, &storage);

    // Each node reports its own sockets: 1 on node-a, 2 on node-b.
    let workload = format!("workload=\"{FLEET_WORKLOAD}\"");
    let per_node = wait_for(Duration::from_secs(60), || {
        let result = vector(
            &prometheus_netns,
            &format!("sum by (node) (idlemon_at_risk_sockets{{{workload}}})"),
        )?;
        let mut values: Vec<(String, String)> = result
            .iter()
            .map(|series| {
                (
                    series["metric"]["node"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    series["value"][1].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        values.sort();
        (values
            == [
                ("node-a".to_owned(), "1".to_owned()),
                ("node-b".to_owned(), "2".to_owned()),
            ])
        .then_some(values)
    });
    let logs = || {
        nodes
            .iter()
            .map(|node| format!("{}:\n{}", node.name, node.daemon.log()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        per_node.is_some(),
        "each node's at-risk sockets: {:?}\n{}",
        vector(&prometheus_netns, "idlemon_at_risk_sockets"),
        logs()
    );

    // The fleet series, recorded by the rules: the sum across both nodes,
    // one series for the workload.
    let fleet = wait_for(Duration::from_secs(30), || {
        let result = vector(
            &prometheus_netns,
            &format!("cluster_namespace_workload:idlemon_at_risk_sockets:sum{{{workload}}}"),
        )?;
        (result.len() == 1 && result[0]["value"][1] == "3").then(|| result[0].clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "no fleet sum of 3: {:?}",
            vector(
                &prometheus_netns,
                "cluster_namespace_workload:idlemon_at_risk_sockets:sum"
            )
        )
    });
    assert_eq!(fleet["metric"]["cluster"], "test", "{fleet:#}");
    assert!(fleet["metric"].get("node").is_none(), "{fleet:#}");
    let nodes_at_risk = vector(
        &prometheus_netns,
        &format!("cluster_namespace_workload:idlemon_at_risk_nodes:count{{{workload}}}"),
    )
    .unwrap();
    assert_eq!(nodes_at_risk.len(), 1);
    assert_eq!(nodes_at_risk[0]["value"][1], "2", "{nodes_at_risk:?}");

    // The alert on the recorded series fires once for the workload on both
    // nodes, without a node label.
    let alerts = wait_for(Duration::from_secs(30), || {
        let result = vector(
            &prometheus_netns,
            &format!(
                "ALERTS{{alertname=\"IdlemonAtRiskSockets\", alertstate=\"firing\", {workload}}}"
            ),
        )?;
        (!result.is_empty()).then_some(result)
    })
    .expect("IdlemonAtRiskSockets fires");
    // A few more evaluations: still one.
    std::thread::sleep(Duration::from_secs(3));
    let alerts_later = vector(
        &prometheus_netns,
        &format!("ALERTS{{alertname=\"IdlemonAtRiskSockets\", alertstate=\"firing\", {workload}}}"),
    )
    .unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts_later.len(), 1, "{alerts_later:#?}");
    assert!(alerts[0]["metric"].get("node").is_none(), "{alerts:#?}");
    assert_eq!(alerts[0]["metric"]["cluster"], "test");

    // Nodes and kernels apart in one query.
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let info = vector(&prometheus_netns, "idlemon_node_info").unwrap();
    let mut named: Vec<&str> = info
        .iter()
        .map(|series| {
            assert_eq!(
                series["metric"]["kernel_release"],
                kernel.trim(),
                "{series:#}"
            );
            series["metric"]["node"].as_str().unwrap()
        })
        .collect();
    named.sort_unstable();
    assert_eq!(named, ["node-a", "node-b"]);
    // The standard process metrics, and the walk histogram, from both.
    for series in [
        "process_resident_memory_bytes{job=\"idlemon\"}",
        "idlemon_walk_duration_seconds_count{job=\"idlemon\"} > 0",
    ] {
        let result = vector(&prometheus_netns, series).unwrap();
        assert_eq!(result.len(), 2, "{series}: {result:?}");
    }

    // Events name their node, carry an event_id, and match the schema.
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/event.schema.json"))
            .unwrap(),
    )
    .unwrap();
    for node in &nodes {
        let remote = format!("127.0.0.1:{}", node.refused_port);
        let events = wait_for(Duration::from_secs(10), || {
            let (_, body) = node.daemon.get("/events?limit=10000");
            let events: Vec<Value> = serde_json::from_str(&body).ok()?;
            events
                .iter()
                .any(|event| event["kind"] == "reset_sent" && event["remote"] == remote.as_str())
                .then_some(events)
        })
        .unwrap_or_else(|| panic!("{}: no reset_sent event to {remote}", node.name));
        let mut ids = std::collections::BTreeSet::new();
        for event in &events {
            let violations = schema::violations(&schema, event);
            assert!(violations.is_empty(), "{violations:?} in {event:#}");
            assert_eq!(event["node"], node.name, "{event:#}");
            let event_id = event["event_id"].as_str().unwrap();
            assert!(
                event_id.ends_with(&format!("-{}", event["id"])),
                "{event_id}"
            );
            assert!(ids.insert(event_id.to_owned()), "{event_id} twice");
        }
    }
    let _ = std::fs::remove_dir_all(&storage);
    let _ = std::fs::remove_dir_all(&bin);
}
