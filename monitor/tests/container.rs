//! The image as the DaemonSet runs it: the amd64 image built by `cargo xtask
//! image` runs under podman with the pod spec of deploy/base/daemonset.yaml
//! (translated in `container/podspec.rs`). It must run with exactly what
//! the DaemonSet grants, become ready, flag an idle connection made in
//! another network namespace, serve /metrics, answer `idlemon sockets`
//! inside the container, and exit 0 on SIGTERM with none of its BPF
//! programs left loaded.
//!
//! Like a pod without hostNetwork, the container gets a network namespace
//! of its own; the test reaches its port from inside that namespace.
//!
//! Needs root, podman, skopeo and runc (podman's runtime here: crun fails on
//! hybrid cgroups), and the image archive named by IDLEMON_IMAGE_ARCHIVE:
//! `cargo xtask test` builds it and runs this, as does `cargo xtask
//! container-test` alone.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

#[path = "container/podspec.rs"]
mod podspec;

use idlemon_testkit as kit;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use kit::{
    Netns, http_get, idle_connections, loaded_programs,
    metrics::{metric, metric_sum},
    programs::objects_of,
    sh, skip_unless, wait_for,
};
use podspec::{Effective, PodSpec};

/// The variable that names the OCI archive of the image under test.
const ARCHIVE_VARIABLE: &str = "IDLEMON_IMAGE_ARCHIVE";

/// What the test sets on top of the DaemonSet's environment: a threshold
/// and timeout short enough to see a connection become at risk in seconds,
/// and per-destination series to find the test's own connection among
/// whatever else this host runs.
const OVERRIDES: &[(&str, &str)] = &[
    ("IDLEMON_IDLE_THRESHOLD", "2"),
    ("IDLEMON_IDLE_TIMEOUT", "4"),
    ("IDLEMON_DESTINATION_LABELS", "1000"),
];

/// How long idlemon may take to flag the idle connection (threshold 2 s, a
/// walk every 5 s by default).
const AT_RISK_WITHIN: Duration = Duration::from_secs(40);
/// How long the kernel may take to free the programs of a stopped process.
const UNLOADED_WITHIN: Duration = Duration::from_secs(10);
/// Podman commands of the cleanup that hang are given up on.
const CLEANUP_TIMEOUT: &str = "60";

#[test]
#[ignore = "needs root, podman and the image archive: run `cargo xtask test`"]
fn the_image_runs_as_the_daemonset_runs_it() {
    let archive = std::env::var_os(ARCHIVE_VARIABLE).map(PathBuf::from);
    skip_unless!(
        archive.is_some(),
        "{ARCHIVE_VARIABLE} does not name the image archive: `cargo xtask test` builds the amd64 image and runs this test with it"
    );
    let archive = archive.unwrap();
    assert!(archive.is_file(), "{} is missing", archive.display());
    let spec = PodSpec::from_daemonset(&podspec::daemonset().unwrap()).unwrap();

    // The namespaces first, so that they outlive the container on drop.
    let pod_netns = Netns::new("pod");
    let app_netns = Netns::new("app");
    let id = std::process::id();
    let pod = Pod::load(&archive, id);
    pod.run(&spec, &pod_netns);

    // Ready within the startup probe's limit.
    let (path, port) = &spec.readiness;
    let endpoint = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
    let mut last = None;
    let ready = wait_for(spec.startup_limit, || {
        last = http_get(&pod_netns, endpoint, path);
        if last.as_ref().is_some_and(|(status, _)| *status == 200) {
            return Some(());
        }
        assert!(
            pod.inspect("{{.State.Running}}") == "true",
            "the container stopped before it was ready:\n{}",
            pod.logs()
        );
        None
    });
    assert!(
        ready.is_some(),
        "{path} did not answer 200 within {} s (last: {last:?}):\n{}",
        spec.startup_limit.as_secs(),
        pod.logs()
    );
    println!("{path} answers 200");

    // It runs with exactly what the DaemonSet grants.
    let pid: u32 = pod.inspect("{{.State.Pid}}").parse().unwrap();
    let running = Effective::of_process(pid).unwrap();
    assert!(
        running == spec.effective,
        "the container runs with {running:x?}, the DaemonSet grants {:x?}",
        spec.effective
    );
    println!(
        "it runs with CapEff {:016x}, no_new_privs {}, read-only root {}",
        running.capabilities, running.no_new_privs, running.read_only_root
    );

    // The programs the container's process holds.
    let programs = objects_of(pid).unwrap().progs;
    assert!(
        !programs.is_empty(),
        "the container's process {pid} holds no BPF program although it is ready"
    );
    let loaded = loaded_programs();
    assert!(
        programs.iter().all(|id| loaded.contains_key(id)),
        "programs {programs:?} held by {pid} are not all listed by bpftool"
    );
    let names: BTreeSet<&str> = programs
        .iter()
        .filter_map(|id| loaded.get(id).map(String::as_str))
        .collect();
    println!("it holds {} programs ({names:?})", programs.len());

    // A connection in the workload's namespace, idle from now on.
    let address = Ipv4Addr::new(198, 18, u8::try_from(id % 250).unwrap() + 1, 1);
    app_netns.ip(&["addr", "add", &format!("{address}/32"), "dev", "lo"]);
    let _connection = idle_connections(&app_netns, SocketAddr::from((address, 0)), 1);
    let series = format!("idlemon_at_risk_destination_sockets{{destination=\"{address}\"}}");
    let mut last = String::new();
    let metrics = wait_for(AT_RISK_WITHIN, || {
        let (status, body) = http_get(&pod_netns, endpoint, "/metrics")
            .expect("/metrics answers while the container runs");
        assert_eq!(status, 200, "/metrics answered {status}");
        last = body;
        (metric(&last, &series) == Some(2.0)).then(|| last.clone())
    });
    let Some(metrics) = metrics else {
        let at_risk: Vec<&str> = last
            .lines()
            .filter(|line| line.starts_with("idlemon_at_risk"))
            .collect();
        panic!(
            "{series} did not reach 2 (both ends of the idle connection) within {} s; /metrics:\n{}\nlogs:\n{}",
            AT_RISK_WITHIN.as_secs(),
            at_risk.join("\n"),
            pod.logs()
        );
    };
    let at_risk = metric_sum(&metrics, "idlemon_at_risk_sockets", "");
    assert!(
        at_risk >= 2.0,
        "idlemon_at_risk_sockets sums to {at_risk}, fewer than the idle connection's 2 ends"
    );
    println!("/metrics has {series} 2 (idlemon_at_risk_sockets: {at_risk})");

    // What an SRE runs: `kubectl exec ds/idlemon -- idlemon sockets`, which
    // finds the binary on the image's PATH and reads the API on the pod's
    // loopback.
    let output = Command::new("podman")
        .args(["exec", &pod.name, "idlemon", "sockets", "--at-risk"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && table.contains(&address.to_string()),
        "`podman exec {} idlemon sockets --at-risk` did not list {address} ({}):\n{table}{}",
        pod.name,
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    println!("`idlemon sockets --at-risk` inside the container lists {address}");

    // SIGTERM, within the pod's grace period; then nothing stays loaded.
    let grace = spec.grace_seconds.to_string();
    sh("podman", &["stop", "--time", &grace, &pod.name]);
    let exit = pod.inspect("{{.State.ExitCode}}");
    assert_eq!(
        exit,
        "0",
        "idlemon exited with {exit} on SIGTERM (137: killed after the {grace} s grace period):\n{}",
        pod.logs()
    );
    let still_loaded = || -> Vec<String> {
        let loaded = loaded_programs();
        programs
            .iter()
            .filter_map(|id| loaded.get(id).map(|name| format!("{id} {name}")))
            .collect()
    };
    assert!(
        wait_for(UNLOADED_WITHIN, || still_loaded().is_empty().then_some(())).is_some(),
        "programs still loaded after the container stopped: {}",
        still_loaded().join(", ")
    );
    println!("stopped cleanly (exit 0), none of its programs loaded");
}

/// The image loaded into podman's storage and the container made of it,
/// both removed on drop whatever happened.
struct Pod {
    image: String,
    name: String,
}

impl Pod {
    /// Copies the archive into podman's storage under a tag of this run.
    fn load(archive: &Path, id: u32) -> Self {
        let pod = Self {
            image: format!("localhost/idlemon-container-test:{id}"),
            name: format!("idlemon-container-test-{id}"),
        };
        println!("loading {} into podman", archive.display());
        sh(
            "skopeo",
            &[
                "copy",
                "--quiet",
                &format!("oci-archive:{}", archive.display()),
                &format!("containers-storage:{}", pod.image),
            ],
        );
        pod
    }

    /// Starts the container as the DaemonSet's pod, in `netns`.
    fn run(&self, spec: &PodSpec, netns: &Netns) {
        for path in &spec.create {
            std::fs::create_dir_all(path).unwrap();
        }
        let mut env = spec.env.clone();
        for (key, value) in OVERRIDES {
            env.insert((*key).to_owned(), (*value).to_owned());
        }
        let mut args: Vec<String> = [
            "run",
            "--detach",
            "--pull=never",
            "--name",
            &self.name,
            "--runtime",
            "runc",
            // Explicit rlimits: podman's default ones are refused here.
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=1024:1024",
        ]
        .map(str::to_owned)
        .into();
        args.extend(spec.podman.iter().cloned());
        args.push(format!("--network=ns:/run/netns/{}", netns.name));
        args.extend(
            env.iter()
                .map(|(key, value)| format!("--env={key}={value}")),
        );
        args.push(self.image.clone());
        args.extend(spec.args.iter().cloned());
        println!("podman {}", args.join(" "));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sh("podman", &args);
    }

    /// One field of `podman inspect`, e.g. `{{.State.Pid}}`.
    fn inspect(&self, format: &str) -> String {
        let output = sh("podman", &["inspect", "--format", format, &self.name]);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The container's diagnostic log (stderr), without the event log that
    /// the DaemonSet sends to stdout: the last 40 lines.
    fn logs(&self) -> String {
        Command::new("timeout")
            .args([CLEANUP_TIMEOUT, "podman", "logs", &self.name])
            .stdout(Stdio::null())
            .output()
            .map(|output| {
                let text = String::from_utf8_lossy(&output.stderr);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            })
            .unwrap_or_default()
    }
}

impl Drop for Pod {
    /// Each step bounded in time; a failure is reported, not fatal, so
    /// that every step is tried.
    fn drop(&mut self) {
        for args in [
            &["podman", "rm", "--force", "--time", "10", &self.name][..],
            &["podman", "rmi", "--force", &self.image],
        ] {
            let status = Command::new("timeout")
                .arg(CLEANUP_TIMEOUT)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !status.is_ok_and(|status| status.success()) {
                eprintln!("cleanup: `{}` failed", args.join(" "));
            }
        }
    }
}
