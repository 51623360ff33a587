//! The container test: the amd64 image from `cargo xtask image` runs under
//! podman with the DaemonSet's security context, read from
//! deploy/base/daemonset.yaml (capabilities, read-only root, host PID, host
//! mounts, environment, probes, grace period), so that a change there
//! changes what is tested. It must become ready, flag an idle connection
//! made in another network namespace, serve /metrics, and leave no BPF
//! program loaded once stopped.
//!
//! Like a pod without hostNetwork, the container gets a network namespace of
//! its own (made here with `ip netns add`); the test reaches its port from a
//! thread inside that namespace.
//!
//! podman here: runc (crun fails on hybrid cgroups) and explicit rlimits
//! (the default ones are refused).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use idlemon_testkit::metrics::{metric, metric_sum};
use serde_json::Value;

use crate::{
    image::{self, ImageArgs, Platform},
    setup::{capture, run_command},
};

/// What the test sets on top of the DaemonSet's environment: a threshold
/// and timeout short enough to see a connection become at risk in seconds,
/// and per-destination series to find the test's own connection among
/// whatever else this host runs.
const OVERRIDES: &[(&str, &str)] = &[
    ("IDLEMON_IDLE_THRESHOLD", "2"),
    ("IDLEMON_IDLE_TIMEOUT", "4"),
    ("IDLEMON_DESTINATION_LABELS", "1000"),
];

/// Values for the DaemonSet's `fieldRef` environment variables.
const FIELD_VALUES: &[(&str, &str)] = &[
    ("spec.nodeName", "idlemon-container-test-node"),
    ("metadata.name", "idlemon-container-test"),
    ("metadata.namespace", "idlemon"),
    ("spec.serviceAccountName", "idlemon"),
    ("status.podIP", "127.0.0.1"),
    ("status.hostIP", "127.0.0.1"),
];

/// Limits here: how long idlemon may take to flag the idle connection
/// (threshold 2 s, a walk every 5 s by default).
const AT_RISK_WITHIN: Duration = Duration::from_secs(40);
/// Cleanup commands that hang are given up on.
const CLEANUP_TIMEOUT: &str = "60";

pub fn run(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let daemonset = read_yaml(&root.join("deploy/base/daemonset.yaml"))?;
    let spec = PodSpec::from_daemonset(&daemonset)?;

    let archive = image::build(&ImageArgs {
        version: None,
        platforms: vec![Platform::Amd64],
    })?;
    let built = started.elapsed();
    let mut test = Test::new();
    let result = test.run(&spec, &archive.path);
    test.cleanup();
    result?;
    println!(
        "xtask container test: passed in {:.0} s ({:.0} s building the amd64 image)",
        started.elapsed().as_secs_f64(),
        built.as_secs_f64()
    );
    Ok(())
}

fn read_yaml(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_norway::from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))
}

/// What of the DaemonSet's pod the test reproduces, as podman arguments.
#[derive(Debug)]
pub struct PodSpec {
    /// `podman run` arguments: namespaces, security, mounts, resources.
    pub podman: Vec<String>,
    /// The container's environment, literal values and fieldRefs resolved.
    pub env: BTreeMap<String, String>,
    /// The container's arguments after the image's entrypoint.
    pub args: Vec<String>,
    /// Host directories the mounts need (DirectoryOrCreate).
    pub create: Vec<PathBuf>,
    /// Whether the pod shares the host's network namespace.
    pub host_network: bool,
    /// The readiness probe's path and port.
    pub readiness: (String, u16),
    /// How long the startup probe waits for the container at most.
    pub startup_limit: Duration,
    /// The pod's terminationGracePeriodSeconds.
    pub grace_seconds: u64,
    /// What the container's process must run with: effective capabilities
    /// (as /proc/PID/status CapEff), no_new_privs, a read-only root.
    pub effective: Effective,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effective {
    pub capabilities: u64,
    pub no_new_privs: bool,
    pub read_only_root: bool,
}

/// Capability numbers (linux/capability.h), by their Kubernetes names.
const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

impl PodSpec {
    pub fn from_daemonset(daemonset: &Value) -> anyhow::Result<Self> {
        if daemonset["kind"] != "DaemonSet" {
            bail!("not a DaemonSet: kind {}", daemonset["kind"]);
        }
        let pod = &daemonset["spec"]["template"]["spec"];
        let containers = pod["containers"].as_array().context("no containers")?;
        let [container] = containers.as_slice() else {
            bail!(
                "the DaemonSet has {} containers; the test runs one",
                containers.len()
            );
        };
        let mut podman = Vec::new();
        let flag = |key: &str| pod[key].as_bool().unwrap_or(false);
        if flag("hostPID") {
            podman.push("--pid=host".to_owned());
        }
        if flag("hostIPC") {
            podman.push("--ipc=host".to_owned());
        }
        let host_network = flag("hostNetwork");
        if let Some(init) = pod["initContainers"]
            .as_array()
            .filter(|list| !list.is_empty())
        {
            bail!(
                "the DaemonSet has {} init containers, which the test does not run",
                init.len()
            );
        }

        // The pod's security context, then the container's over it.
        let mut security = serde_json::Map::new();
        for context in [&pod["securityContext"], &container["securityContext"]] {
            if let Some(fields) = context.as_object() {
                security.extend(fields.clone());
            }
        }
        podman.extend(security_args(&security)?);
        let effective = effective(&security)?;

        let (mounts, create) = mount_args(pod, container)?;
        podman.extend(mounts);
        podman.extend(resource_args(&container["resources"])?);

        let mut env = BTreeMap::new();
        for variable in container["env"].as_array().into_iter().flatten() {
            let name = variable["name"]
                .as_str()
                .context("env entry without a name")?;
            let value = if let Some(value) = variable.get("value") {
                value
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| value.to_string())
            } else if let Some(path) = variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                FIELD_VALUES
                    .iter()
                    .find(|(field, _)| *field == path)
                    .map(|(_, value)| (*value).to_owned())
                    .ok_or_else(|| anyhow!("env {name}: fieldRef {path} has no test value (FIELD_VALUES in xtask/src/container.rs)"))?
            } else {
                bail!(
                    "env {name}: {} is not translated to podman",
                    variable["valueFrom"]
                );
            };
            env.insert(name.to_owned(), value);
        }
        if container.get("envFrom").is_some() {
            bail!("envFrom is not translated to podman");
        }
        let strings = |value: &Value| -> Vec<String> {
            value
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        };
        if container.get("command").is_some() {
            bail!(
                "the DaemonSet overrides the image's entrypoint (command), which the test does not"
            );
        }
        let args = strings(&container["args"]);

        let port = |port: &Value| -> anyhow::Result<u16> {
            if let Some(number) = port.as_u64() {
                return u16::try_from(number).context("port out of range");
            }
            let name = port
                .as_str()
                .context("probe port is neither number nor name")?;
            container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|entry| entry["name"] == name)
                .and_then(|entry| entry["containerPort"].as_u64())
                .and_then(|number| u16::try_from(number).ok())
                .ok_or_else(|| anyhow!("no container port named {name}"))
        };
        let readiness = &container["readinessProbe"]["httpGet"];
        let readiness = (
            readiness["path"]
                .as_str()
                .context("readinessProbe has no httpGet path")?
                .to_owned(),
            port(&readiness["port"])?,
        );
        let startup = &container["startupProbe"];
        let startup_limit = Duration::from_secs(
            startup["periodSeconds"].as_u64().unwrap_or(10)
                * startup["failureThreshold"].as_u64().unwrap_or(3)
                + startup["initialDelaySeconds"].as_u64().unwrap_or(0),
        );
        Ok(Self {
            podman,
            env,
            args,
            create,
            host_network,
            readiness,
            startup_limit,
            grace_seconds: pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30),
            effective,
        })
    }
}

/// A security context (pod's and container's merged) as podman flags. A
/// field this does not know fails the test, so that a new field in the
/// DaemonSet is either reproduced here or consciously left out.
fn security_args(security: &serde_json::Map<String, Value>) -> anyhow::Result<Vec<String>> {
    let mut args = Vec::new();
    for (key, value) in security {
        match key.as_str() {
            "privileged" => {
                if value == true {
                    args.push("--privileged".to_owned());
                }
            }
            "allowPrivilegeEscalation" => {
                if value == false {
                    args.push("--security-opt=no-new-privileges".to_owned());
                }
            }
            "readOnlyRootFilesystem" => {
                if value == true {
                    // Kubernetes mounts no tmpfs on /tmp or /run; podman
                    // would.
                    args.push("--read-only".to_owned());
                    args.push("--read-only-tmpfs=false".to_owned());
                }
            }
            "runAsUser" | "runAsGroup" | "runAsNonRoot" => {}
            "capabilities" => {
                for (list, flag) in [("drop", "--cap-drop"), ("add", "--cap-add")] {
                    for capability in value[list].as_array().into_iter().flatten() {
                        let capability = capability.as_str().context("capability name")?;
                        args.push(format!("{flag}={capability}"));
                    }
                }
            }
            "seccompProfile" => match value["type"].as_str() {
                Some("Unconfined") => args.push("--security-opt=seccomp=unconfined".to_owned()),
                Some("RuntimeDefault") => {}
                other => bail!("seccompProfile type {other:?} is not translated to podman"),
            },
            "appArmorProfile" => match value["type"].as_str() {
                Some("Unconfined") => args.push("--security-opt=apparmor=unconfined".to_owned()),
                Some("RuntimeDefault") => {}
                other => bail!("appArmorProfile type {other:?} is not translated to podman"),
            },
            "seLinuxOptions" => {
                for field in ["user", "role", "type", "level"] {
                    if let Some(label) = value[field].as_str() {
                        args.push(format!("--security-opt=label={field}:{label}"));
                    }
                }
            }
            other => bail!(
                "securityContext.{other} is not translated to podman (xtask/src/container.rs)"
            ),
        }
    }
    let user = security.get("runAsUser").and_then(Value::as_u64);
    let group = security.get("runAsGroup").and_then(Value::as_u64);
    if security.get("runAsNonRoot") == Some(&Value::Bool(true)) && user.unwrap_or(0) == 0 {
        bail!("runAsNonRoot with user 0: the kubelet would refuse to start the pod");
    }
    match (user, group) {
        (Some(user), Some(group)) => args.push(format!("--user={user}:{group}")),
        (Some(user), None) => args.push(format!("--user={user}")),
        (None, Some(_)) => bail!("runAsGroup without runAsUser is not translated to podman"),
        (None, None) => {}
    }
    Ok(args)
}

/// What the security context grants the process. Only a context that drops
/// ALL can be reproduced exactly: runtimes' default sets differ (containerd's
/// is not podman's).
fn effective(security: &serde_json::Map<String, Value>) -> anyhow::Result<Effective> {
    let capabilities = security.get("capabilities").unwrap_or(&Value::Null);
    let names = |list: &str| -> Vec<String> {
        capabilities[list]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|name| name.as_str())
            .map(|name| name.trim_start_matches("CAP_").to_ascii_uppercase())
            .collect()
    };
    if security.get("privileged") == Some(&Value::Bool(true)) {
        bail!("a privileged container is not what the test reproduces");
    }
    if !names("drop").iter().any(|name| name == "ALL") {
        bail!(
            "capabilities.drop has no ALL: the runtime's default set would remain, which podman's does not reproduce"
        );
    }
    let mut mask = 0u64;
    for name in names("add") {
        let bit = CAPABILITIES
            .iter()
            .position(|known| *known == name)
            .ok_or_else(|| anyhow!("capability {name} is unknown"))?;
        mask |= 1 << bit;
    }
    Ok(Effective {
        capabilities: mask,
        no_new_privs: security.get("allowPrivilegeEscalation") == Some(&Value::Bool(false)),
        read_only_root: security.get("readOnlyRootFilesystem") == Some(&Value::Bool(true)),
    })
}

/// What the container's process runs with, read from /proc.
fn running_with(pid: u32) -> anyhow::Result<Effective> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let capabilities = u64::from_str_radix(&field("CapEff:"), 16).context("CapEff")?;
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ...`: the last mount on /.
    let root_options = mountinfo
        .lines()
        .rev()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(4) == Some(&"/")).then(|| fields.get(5).copied().unwrap_or_default())
        })
        .unwrap_or_default()
        .to_owned();
    Ok(Effective {
        capabilities,
        no_new_privs: field("NoNewPrivs:") == "1",
        read_only_root: root_options.split(',').any(|option| option == "ro"),
    })
}

/// The container's volume mounts as podman `--volume`/`--tmpfs` flags, and
/// the host directories to create first (hostPath DirectoryOrCreate).
fn mount_args(pod: &Value, container: &Value) -> anyhow::Result<(Vec<String>, Vec<PathBuf>)> {
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|volume| Some((volume["name"].as_str()?, volume)))
        .collect();
    let mut args = Vec::new();
    let mut create = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = mount["name"]
            .as_str()
            .context("volumeMount without a name")?;
        let target = mount["mountPath"]
            .as_str()
            .context("volumeMount without a mountPath")?;
        for key in mount.as_object().into_iter().flatten().map(|(key, _)| key) {
            if !["name", "mountPath", "readOnly", "mountPropagation"].contains(&key.as_str()) {
                bail!("volumeMount {name}: {key} is not translated to podman");
            }
        }
        let volume = volumes
            .get(name)
            .ok_or_else(|| anyhow!("volumeMount {name} has no volume"))?;
        let mut options = Vec::new();
        if mount["readOnly"] == true {
            options.push("ro");
        }
        match mount["mountPropagation"].as_str() {
            None | Some("None") => options.push("rprivate"),
            Some("HostToContainer") => options.push("rslave"),
            Some("Bidirectional") => options.push("rshared"),
            Some(other) => bail!("volumeMount {name}: mountPropagation {other} is unknown"),
        }
        if let Some(host_path) = volume.get("hostPath") {
            let path = host_path["path"]
                .as_str()
                .context("hostPath without a path")?;
            match host_path["type"].as_str().unwrap_or("") {
                "DirectoryOrCreate" => create.push(PathBuf::from(path)),
                "" | "Directory" | "File" | "Socket" | "CharDevice" | "BlockDevice" => {}
                other => bail!("volume {name}: hostPath type {other} is not translated to podman"),
            }
            args.push(format!("--volume={path}:{target}:{}", options.join(",")));
        } else if volume.get("emptyDir").is_some() {
            args.push(format!("--tmpfs={target}"));
        } else {
            bail!("volume {name}: only hostPath and emptyDir volumes are translated to podman");
        }
    }
    Ok((args, create))
}

/// Limits (not requests, which only schedule) as podman flags.
fn resource_args(resources: &Value) -> anyhow::Result<Vec<String>> {
    let mut args = Vec::new();
    for (key, value) in resources["limits"].as_object().into_iter().flatten() {
        let value = value
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| value.to_string());
        match key.as_str() {
            "memory" => args.push(format!("--memory={}", memory_bytes(&value)?)),
            "cpu" => {
                let cpus = match value.strip_suffix('m') {
                    Some(millis) => millis.parse::<f64>().map(|millis| millis / 1000.0),
                    None => value.parse::<f64>(),
                }
                .with_context(|| format!("cpu limit {value}"))?;
                args.push(format!("--cpus={cpus}"));
            }
            other => bail!("resource limit {other} is not translated to podman"),
        }
    }
    Ok(args)
}

/// A Kubernetes memory quantity (`256Mi`, `1G`, `1000000`) in bytes.
fn memory_bytes(quantity: &str) -> anyhow::Result<u64> {
    const SUFFIXES: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (number, unit) = SUFFIXES
        .iter()
        .find_map(|(suffix, unit)| Some((quantity.strip_suffix(suffix)?, *unit)))
        .unwrap_or((quantity, 1));
    number
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(unit))
        .ok_or_else(|| anyhow!("memory quantity {quantity} is not understood"))
}

/// What the test made, removed by `cleanup` whatever happened.
struct Test {
    id: u32,
    image: Option<String>,
    container: Option<String>,
    namespaces: Vec<String>,
    /// The idle connection's two ends.
    connection: Vec<TcpStream>,
}

impl Test {
    fn new() -> Self {
        Self {
            id: std::process::id(),
            image: None,
            container: None,
            namespaces: Vec::new(),
            connection: Vec::new(),
        }
    }

    fn run(&mut self, spec: &PodSpec, archive: &Path) -> anyhow::Result<()> {
        let image = format!("localhost/idlemon-container-test:{}", self.id);
        self.image = Some(image.clone());
        println!(
            "xtask container test: loading {} into podman",
            archive.display()
        );
        run_command(
            Command::new("skopeo")
                .arg("copy")
                .arg("--quiet")
                .arg(format!("oci-archive:{}", archive.display()))
                .arg(format!("containers-storage:{image}")),
        )?;

        // The pod's network namespace, and the workload's.
        let pod_netns = self.netns("pod")?;
        let app_netns = self.netns("app")?;
        for path in &spec.create {
            std::fs::create_dir_all(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
        }

        let name = format!("idlemon-container-test-{}", self.id);
        let mut env = spec.env.clone();
        for (key, value) in OVERRIDES {
            env.insert((*key).to_owned(), (*value).to_owned());
        }
        let mut command = Command::new("podman");
        command
            .args(["run", "--detach", "--pull=never", "--name", &name])
            .args(["--runtime", "runc"])
            .args([
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(&spec.podman);
        if spec.host_network {
            command.arg("--network=host");
        } else {
            command.arg(format!("--network=ns:/run/netns/{pod_netns}"));
        }
        for (key, value) in &env {
            command.arg(format!("--env={key}={value}"));
        }
        command.arg(&image).args(&spec.args);
        println!(
            "xtask container test: podman {}",
            command
                .get_args()
                .map(|arg| arg.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        self.container = Some(name.clone());
        run_command(command.stdout(Stdio::null()))?;

        // Ready within the startup probe's limit.
        let (path, port) = &spec.readiness;
        let endpoint = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
        let http_netns = (!spec.host_network).then_some(pod_netns.as_str());
        let deadline = Instant::now() + spec.startup_limit;
        loop {
            let status = in_netns(http_netns, || get(endpoint, path))?;
            if status.as_ref().is_ok_and(|(status, _)| *status == 200) {
                break;
            }
            if !self.is_running(&name)? {
                bail!(
                    "the container stopped before it was ready:\n{}",
                    logs(&name)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{path} did not answer 200 within {} s (last: {status:?}):\n{}",
                    spec.startup_limit.as_secs(),
                    logs(&name)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        println!("xtask container test: {path} answers 200");

        // It runs with exactly what the DaemonSet grants.
        let pid =
            capture(Command::new("podman").args(["inspect", "--format", "{{.State.Pid}}", &name]))?;
        let pid: u32 = pid
            .trim()
            .parse()
            .with_context(|| format!("container pid {pid:?}"))?;
        let running = running_with(pid)?;
        if running != spec.effective {
            bail!(
                "the container runs with {running:x?}, the DaemonSet grants {:x?}",
                spec.effective
            );
        }
        println!(
            "xtask container test: it runs with CapEff {:016x}, no_new_privs {}, read-only root {}",
            running.capabilities, running.no_new_privs, running.read_only_root
        );

        // The programs the container's process holds.
        let programs = held_programs(pid)?;
        if programs.is_empty() {
            bail!("the container's process {pid} holds no BPF program although it is ready");
        }
        let loaded = loaded_programs()?;
        if !programs.iter().all(|id| loaded.contains_key(id)) {
            bail!("programs {programs:?} held by {pid} are not all listed by bpftool");
        }
        println!(
            "xtask container test: it holds {} programs ({})",
            programs.len(),
            programs
                .iter()
                .filter_map(|id| loaded.get(id).cloned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        );

        // A connection in the workload's namespace, idle from now on.
        let address = Ipv4Addr::new(198, 18, (self.id % 250) as u8 + 1, 1);
        run_command(Command::new("ip").args([
            "-n",
            &app_netns,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "lo",
        ]))?;
        let connection = in_netns(Some(&app_netns), || idle_connection(address))??;
        self.connection = connection;
        let series = format!("idlemon_at_risk_destination_sockets{{destination=\"{address}\"}}");
        let deadline = Instant::now() + AT_RISK_WITHIN;
        let metrics = loop {
            let (status, body) = in_netns(http_netns, || get(endpoint, "/metrics"))??;
            if status != 200 {
                bail!("/metrics answered {status}");
            }
            if metric(&body, &series) == Some(2.0) {
                break body;
            }
            if Instant::now() > deadline {
                bail!(
                    "{series} did not reach 2 (both ends of the idle connection) within {} s; /metrics:\n{}\nlogs:\n{}",
                    AT_RISK_WITHIN.as_secs(),
                    body.lines()
                        .filter(|line| line.starts_with("idlemon_at_risk"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    logs(&name)
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        let at_risk = metric_sum(&metrics, "idlemon_at_risk_sockets", "");
        if at_risk < 2.0 {
            bail!(
                "idlemon_at_risk_sockets sums to {at_risk}, fewer than the idle connection's 2 ends"
            );
        }
        println!(
            "xtask container test: /metrics has {series} 2 (idlemon_at_risk_sockets: {at_risk})"
        );

        // What an SRE runs: `kubectl exec ds/idlemon -- idlemon sockets`,
        // which finds the binary on the image's PATH and reads the API on
        // the pod's loopback.
        let output = Command::new("podman")
            .args(["exec", &name, "idlemon", "sockets", "--at-risk"])
            .output()
            .context("cannot run podman exec")?;
        let table = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !table.contains(&address.to_string()) {
            bail!(
                "`podman exec {name} idlemon sockets --at-risk` did not list {address} ({}):\n{table}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        println!(
            "xtask container test: `idlemon sockets --at-risk` inside the container lists {address}"
        );

        // SIGTERM, within the pod's grace period; then nothing stays loaded.
        let grace = spec.grace_seconds.to_string();
        run_command(
            Command::new("podman")
                .args(["stop", "--time", &grace, &name])
                .stdout(Stdio::null()),
        )?;
        let exit = capture(Command::new("podman").args([
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            &name,
        ]))?;
        if exit.trim() != "0" {
            bail!(
                "idlemon exited with {} on SIGTERM (137: killed after the {grace} s grace period):\n{}",
                exit.trim(),
                logs(&name)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let loaded = loaded_programs()?;
            let left: Vec<String> = programs
                .iter()
                .filter_map(|id| loaded.get(id).map(|name| format!("{id} {name}")))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "programs still loaded after the container stopped: {}",
                    left.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("xtask container test: stopped cleanly (exit 0), none of its programs loaded");
        Ok(())
    }

    fn netns(&mut self, role: &str) -> anyhow::Result<String> {
        let name = format!("idlemon-ct-{role}-{}", self.id);
        run_command(Command::new("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name.clone());
        run_command(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        Ok(name)
    }

    fn is_running(&self, name: &str) -> anyhow::Result<bool> {
        let state = capture(Command::new("podman").args([
            "inspect",
            "--format",
            "{{.State.Running}}",
            name,
        ]))?;
        Ok(state.trim() == "true")
    }

    /// Removes what `run` made, each step bounded in time; failures are
    /// reported, not fatal, so that every step is tried.
    fn cleanup(&mut self) {
        self.connection.clear();
        let bounded = |args: &[&str]| {
            let status = Command::new("timeout")
                .arg(CLEANUP_TIMEOUT)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !status.is_ok_and(|status| status.success()) {
                println!("xtask container test: cleanup: `{}` failed", args.join(" "));
            }
        };
        if let Some(container) = self.container.take() {
            bounded(&["podman", "rm", "--force", "--time", "10", &container]);
        }
        if let Some(image) = self.image.take() {
            bounded(&["podman", "rmi", "--force", &image]);
        }
        for namespace in self.namespaces.drain(..) {
            bounded(&["ip", "netns", "del", &namespace]);
        }
    }
}

/// Runs `work` on a thread inside the named network namespace (or this
/// one).
fn in_netns<T: Send>(netns: Option<&str>, work: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let Some(netns) = netns else {
        return Ok(work());
    };
    let path = format!("/run/netns/{netns}");
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a namespace file we hold open; it changes
                // this thread's network namespace only, and the thread ends
                // with the scope.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(anyhow!(
                        "setns({path}): {}",
                        std::io::Error::last_os_error()
                    ));
                }
                Ok(work())
            })
            .join()
            .map_err(|_| anyhow!("thread in {path} panicked"))?
    })
}

/// A client and server on `address`, with a few bytes exchanged; both ends.
fn idle_connection(address: Ipv4Addr) -> anyhow::Result<Vec<TcpStream>> {
    let listener = TcpListener::bind((address, 0)).context("bind the test server")?;
    let mut client =
        TcpStream::connect(listener.local_addr()?).context("connect to the test server")?;
    let (mut server, _) = listener.accept().context("accept")?;
    client.write_all(b"hello")?;
    let mut greeting = [0u8; 5];
    server.read_exact(&mut greeting)?;
    Ok(vec![client, server])
}

/// GET over HTTP/1.0: status and body.
fn get(endpoint: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&endpoint, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {endpoint}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP response: {response:.200}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The container's diagnostic log (stderr), without the event log that
/// the DaemonSet sends to stdout: the last 40 lines.
fn logs(container: &str) -> String {
    Command::new("timeout")
        .args([CLEANUP_TIMEOUT, "podman", "logs", container])
        .stdout(Stdio::null())
        .output()
        .map(|output| {
            let text = String::from_utf8_lossy(&output.stderr);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        })
        .unwrap_or_default()
}

/// Ids of the BPF programs a process holds, from its file descriptors
/// (program fds and the links that hold programs).
fn held_programs(pid: u32) -> anyhow::Result<BTreeSet<u64>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        ids.extend(
            text.lines()
                .filter_map(|line| line.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse::<u64>().ok()),
        );
    }
    Ok(ids)
}

/// Every BPF program loaded on the host, by id, with its name.
fn loaded_programs() -> anyhow::Result<BTreeMap<u64, String>> {
    let listing = capture(Command::new("bpftool").args(["prog", "show", "--json"]))?;
    let programs: Value =
        serde_json::from_str(&listing).context("bpftool prog show --json is not JSON")?;
    Ok(programs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|program| {
            Some((
                program["id"].as_u64()?,
                program["name"].as_str().unwrap_or("").to_owned(),
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemonset() -> Value {
        read_yaml(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml"))
            .expect("daemonset.yaml")
    }

    #[test]
    fn the_daemonsets_security_context_becomes_podman_flags() {
        let spec = PodSpec::from_daemonset(&daemonset()).expect("translated");
        for flag in [
            "--pid=host",
            "--cap-drop=ALL",
            "--cap-add=BPF",
            "--cap-add=PERFMON",
            "--cap-add=SYS_ADMIN",
            "--cap-add=SYS_PTRACE",
            "--read-only",
            "--security-opt=no-new-privileges",
            "--user=0:0",
            "--volume=/proc:/host/proc:ro,rprivate",
            "--volume=/run/netns:/run/netns:ro,rslave",
        ] {
            assert!(
                spec.podman.iter().any(|arg| arg == flag),
                "{flag} missing from {:?}",
                spec.podman
            );
        }
        assert!(!spec.podman.iter().any(|arg| arg == "--privileged"));
        assert_eq!(spec.env["IDLEMON_NODE_NAME"], "idlemon-container-test-node");
        assert_eq!(spec.env["IDLEMON_PROC_ROOT"], "/host/proc");
        assert_eq!(spec.readiness, ("/readyz".to_owned(), 9781));
        // BPF, PERFMON, SYS_ADMIN, SYS_PTRACE: what podman was seen to
        // give a container with these flags.
        assert_eq!(
            spec.effective,
            Effective {
                capabilities: 0x0000_00c0_0028_0000,
                no_new_privs: true,
                read_only_root: true,
            }
        );
        assert!(!spec.host_network);
    }

    #[test]
    fn a_field_the_test_does_not_reproduce_fails_it() {
        let mut daemonset = daemonset();
        daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["procMount"] =
            Value::from("Unmasked");
        let error = PodSpec::from_daemonset(&daemonset).expect_err("procMount");
        assert!(error.to_string().contains("procMount"), "{error}");

        let mut daemonset = self::daemonset();
        daemonset["spec"]["template"]["spec"]["containers"][0]["env"][0] = serde_json::json!({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}});
        assert!(PodSpec::from_daemonset(&daemonset).is_err());
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(memory_bytes("256Mi").ok(), Some(256 << 20));
        assert_eq!(memory_bytes("1G").ok(), Some(1_000_000_000));
        assert_eq!(memory_bytes("4096").ok(), Some(4096));
        assert!(memory_bytes("lots").is_err());
    }
}
