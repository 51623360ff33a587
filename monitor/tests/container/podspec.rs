//! The DaemonSet's pod as `podman run` arguments: what of
//! deploy/base/daemonset.yaml the container test reproduces (capabilities,
//! read-only root, host PID, host mounts, environment, probes, grace
//! period), so that a change there changes what is tested. A field this
//! does not know fails the translation, so that a new field in the
//! DaemonSet is either reproduced here or consciously left out.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

/// Values for the DaemonSet's `fieldRef` environment variables.
const FIELD_VALUES: &[(&str, &str)] = &[
    ("spec.nodeName", "idlemon-container-test-node"),
    ("metadata.name", "idlemon-container-test"),
    ("metadata.namespace", "idlemon"),
    ("spec.serviceAccountName", "idlemon"),
    ("status.podIP", "127.0.0.1"),
    ("status.hostIP", "127.0.0.1"),
];

/// deploy/base/daemonset.yaml, as JSON values.
pub fn daemonset() -> anyhow::Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
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

impl Effective {
    /// What a process runs with, read from /proc.
    pub fn of_process(pid: u32) -> anyhow::Result<Self> {
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
        Ok(Self {
            capabilities,
            no_new_privs: field("NoNewPrivs:") == "1",
            read_only_root: root_options.split(',').any(|option| option == "ro"),
        })
    }
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
        // The test gives the pod a network namespace of its own, which is
        // what deploy/checks.py requires of the DaemonSet.
        if flag("hostNetwork") {
            bail!(
                "hostNetwork is not reproduced: the test runs the pod in a network namespace of its own"
            );
        }
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
                    .ok_or_else(|| anyhow!("env {name}: fieldRef {path} has no test value (FIELD_VALUES in monitor/tests/container/podspec.rs)"))?
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
                "securityContext.{other} is not translated to podman (monitor/tests/container/podspec.rs)"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn daemonset() -> Value {
        super::daemonset().expect("daemonset.yaml")
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

        let mut daemonset = self::daemonset();
        daemonset["spec"]["template"]["spec"]["hostNetwork"] = Value::from(true);
        let error = PodSpec::from_daemonset(&daemonset).expect_err("hostNetwork");
        assert!(error.to_string().contains("hostNetwork"), "{error}");
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(memory_bytes("256Mi").ok(), Some(256 << 20));
        assert_eq!(memory_bytes("1G").ok(), Some(1_000_000_000));
        assert_eq!(memory_bytes("4096").ok(), Some(4096));
        assert!(memory_bytes("lots").is_err());
    }
}
