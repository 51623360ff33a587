//! Attribution: which process, cgroup, container and pod a socket or an
//! event belongs to.
//!
//! The kernel programs record the pid, comm and cgroup (v2) id of the process
//! that connected or last sent. User space turns the pid into its cgroup path
//! through `/proc/PID/cgroup` (cgroup v1 and v2), or, once the process is
//! gone, the cgroup id into a path by walking the cgroup2 hierarchy; the path
//! gives container id, runtime and pod UID; the pod watch gives namespace,
//! pod name and workload.

pub mod cgroup;
pub mod pods;

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use self::{
    cgroup::Runtime,
    pods::{OwnerLabel, PodCache, PodMeta},
};

/// Who a socket belongs to, beyond pid and comm.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Attribution {
    pub cgroup_path: Option<String>,
    pub container_id: Option<String>,
    pub container_runtime: Option<Runtime>,
    pub pod_uid: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    pub workload: Option<String>,
    /// The systemd unit, on plain hosts.
    pub unit: Option<String>,
    /// The pod's label that names its application (`pods::OWNER_LABELS`),
    /// for the fix's `[enforce] pod_labels`: one pair, not all labels.
    pub pod_owner_label: Option<OwnerLabel>,
    /// The process name (`/proc/PID/comm`); reported as `comm` beside the pid.
    #[serde(skip)]
    pub comm: Option<String>,
}

impl Attribution {
    /// The bounded metric labels (namespace, pod, workload): Kubernetes names
    /// where known; on plain hosts the systemd unit or the process name.
    pub fn labels(&self, comm: Option<&str>) -> [String; 3] {
        let namespace = self.namespace.clone().unwrap_or_default();
        let pod = self
            .pod
            .clone()
            .or_else(|| self.pod_uid.clone())
            .unwrap_or_default();
        let workload = self
            .workload
            .clone()
            .or_else(|| self.unit.clone())
            .or_else(|| comm.map(str::to_owned))
            .unwrap_or_else(|| "unknown".to_owned());
        [namespace, pod, workload]
    }
}

/// How long a pid's cgroup path is trusted before it is read again (pids
/// are reused, and processes move between cgroups).
const PID_TTL: Duration = Duration::from_secs(10);
/// The cgroup2 tree is walked at most this often, on a miss.
const CGROUP_WALK_INTERVAL: Duration = Duration::from_secs(30);
/// Cached pids beyond which the cache starts afresh.
const PID_CACHE_MAX: usize = 16_384;

pub struct Attributor {
    proc_root: PathBuf,
    pods: Arc<PodCache>,
    by_pid: HashMap<u32, (Instant, Option<String>)>,
    /// Answers by (pid, cgroup id), shared by every socket of a process: a
    /// walk of 200k sockets then allocates per process, not per socket.
    resolved: HashMap<(u32, u64), (Instant, Arc<Attribution>)>,
    cgroups: CgroupIndex,
}

impl Attributor {
    pub fn new(proc_root: PathBuf, pods: Arc<PodCache>) -> Self {
        let cgroup2 = cgroup2_mount(&proc_root.join("self/mountinfo"))
            .or_else(|| cgroup2_mount(Path::new("/proc/self/mountinfo")));
        Self {
            proc_root,
            pods,
            by_pid: HashMap::new(),
            resolved: HashMap::new(),
            cgroups: CgroupIndex::new(cgroup2),
        }
    }

    pub fn attribute(&mut self, pid: Option<u32>, cgroup_id: Option<u64>) -> Arc<Attribution> {
        let key = (pid.unwrap_or(0), cgroup_id.unwrap_or(0));
        if let Some((at, attribution)) = self.resolved.get(&key)
            && at.elapsed() < PID_TTL
        {
            return Arc::clone(attribution);
        }
        if self.resolved.len() >= PID_CACHE_MAX {
            self.resolved.clear();
        }
        let attribution = Arc::new(self.resolve(pid, cgroup_id));
        self.resolved
            .insert(key, (Instant::now(), Arc::clone(&attribution)));
        attribution
    }

    fn resolve(&mut self, pid: Option<u32>, cgroup_id: Option<u64>) -> Attribution {
        let comm = pid.and_then(|pid| {
            let comm = fs::read_to_string(self.proc_root.join(format!("{pid}/comm"))).ok()?;
            Some(comm.trim_end_matches('\n').to_owned())
        });
        Attribution {
            comm,
            ..self.resolve_cgroup(pid, cgroup_id)
        }
    }

    fn resolve_cgroup(&mut self, pid: Option<u32>, cgroup_id: Option<u64>) -> Attribution {
        let path = pid
            .and_then(|pid| self.path_of_pid(pid))
            .or_else(|| cgroup_id.and_then(|id| self.cgroups.path_of(id)));
        let Some(path) = path else {
            return Attribution::default();
        };
        let container = cgroup::parse(&path);
        let pod = container
            .pod_uid
            .as_deref()
            .and_then(|uid| self.pods.get(uid));
        Attribution {
            container: pod.as_ref().and_then(|pod| {
                container
                    .id
                    .as_ref()
                    .and_then(|id| pod.containers.get(id).cloned())
            }),
            namespace: pod.as_ref().map(|pod| pod.namespace.clone()),
            workload: pod.as_ref().map(|pod| pod.workload.clone()),
            pod_owner_label: pod.as_ref().and_then(PodMeta::owner_label),
            pod: pod.map(|pod| pod.name),
            unit: (container.is_empty())
                .then(|| cgroup::systemd_unit(&path))
                .flatten(),
            container_id: container.id,
            container_runtime: container.runtime,
            pod_uid: container.pod_uid,
            cgroup_path: Some(path),
            comm: None,
        }
    }

    fn path_of_pid(&mut self, pid: u32) -> Option<String> {
        if let Some((read_at, path)) = self.by_pid.get(&pid)
            && read_at.elapsed() < PID_TTL
        {
            return path.clone();
        }
        if self.by_pid.len() >= PID_CACHE_MAX {
            self.by_pid.clear();
        }
        let path = fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
            .ok()
            .and_then(|contents| cgroup::path_from_proc(&contents));
        self.by_pid.insert(pid, (Instant::now(), path.clone()));
        path
    }
}

/// Where cgroup2 is mounted, from a mountinfo file.
fn cgroup2_mount(mountinfo: &Path) -> Option<PathBuf> {
    let contents = fs::read_to_string(mountinfo).ok()?;
    contents.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// cgroup id -> path, for sockets whose process has exited. A cgroup's id is
/// its directory's inode number in the cgroup2 filesystem.
struct CgroupIndex {
    root: Option<PathBuf>,
    paths: HashMap<u64, String>,
    walked_at: Option<Instant>,
}

impl CgroupIndex {
    fn new(root: Option<PathBuf>) -> Self {
        Self {
            root,
            paths: HashMap::new(),
            walked_at: None,
        }
    }

    fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(path) = self.paths.get(&id) {
            return Some(path.clone());
        }
        let root = self.root.clone()?;
        if self
            .walked_at
            .is_some_and(|at| at.elapsed() < CGROUP_WALK_INTERVAL)
        {
            return None;
        }
        self.walked_at = Some(Instant::now());
        self.paths.clear();
        let mut pending = vec![root.clone()];
        while let Some(directory) = pending.pop() {
            if let Ok(metadata) = fs::metadata(&directory) {
                let relative = directory.strip_prefix(&root).map_or_else(
                    |_| "/".to_owned(),
                    |relative| format!("/{}", relative.display()),
                );
                self.paths.insert(metadata.ino(), relative);
            }
            if let Ok(entries) = fs::read_dir(&directory) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                        pending.push(entry.path());
                    }
                }
            }
        }
        self.paths.get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let dir = std::env::temp_dir().join(format!("idlemon-mountinfo-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let mountinfo = dir.join("mountinfo");
        fs::write(
            &mountinfo,
            "24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n\
             35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n",
        )
        .expect("write");
        assert_eq!(
            cgroup2_mount(&mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        fs::write(&mountinfo, "24 30 0:22 / /sys rw - sysfs sysfs rw\n").expect("write");
        assert_eq!(cgroup2_mount(&mountinfo), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn our_own_process_is_attributed_to_its_cgroup() {
        let mut attributor = Attributor::new(PathBuf::from("/proc"), Arc::default());
        let attribution = attributor.attribute(Some(std::process::id()), None);
        let expected =
            cgroup::path_from_proc(&fs::read_to_string("/proc/self/cgroup").expect("cgroup"));
        assert_eq!(attribution.cgroup_path, expected);
        let comm = fs::read_to_string("/proc/self/comm").expect("comm");
        assert_eq!(attribution.comm.as_deref(), Some(comm.trim_end()));
    }

    #[test]
    fn cgroup_ids_resolve_by_walking_the_hierarchy() {
        let Some(root) = cgroup2_mount(Path::new("/proc/self/mountinfo")) else {
            eprintln!("skipped: no cgroup2 mount on this machine");
            return;
        };
        let id = fs::metadata(&root).expect("root").ino();
        let mut index = CgroupIndex::new(Some(root));
        assert_eq!(index.path_of(id).as_deref(), Some("/"));
    }

    #[test]
    fn a_pod_from_the_watch_brings_its_owner_label_only() {
        let dir = std::env::temp_dir().join(format!("idlemon-owner-{}", std::process::id()));
        fs::create_dir_all(dir.join("42")).expect("dir");
        fs::write(
            dir.join("42/cgroup"),
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1e8d8a_2b0c_4a51_9d7f_3c4e5b6a7d8e.slice/\
             cri-containerd-3b1f5c0d8e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c.scope\n",
        )
        .expect("write");
        let pods = Arc::new(PodCache::default());
        let labels = [
            ("app", "checkout"),
            ("app.kubernetes.io/name", "checkout-api"),
            ("pod-template-hash", "7d4b9c"),
        ];
        pods.insert_for_test(
            "6f1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e",
            PodMeta {
                namespace: "shop".to_owned(),
                name: "checkout-7d4b9c-x2x4z".to_owned(),
                workload: "deployment/checkout".to_owned(),
                containers: HashMap::new(),
                labels: labels
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect(),
            },
        );
        let attribution = Attributor::new(dir.clone(), pods).attribute(Some(42), None);
        fs::remove_dir_all(&dir).ok();
        assert_eq!(attribution.namespace.as_deref(), Some("shop"));
        let owner = OwnerLabel {
            key: "app.kubernetes.io/name".to_owned(),
            value: "checkout-api".to_owned(),
        };
        assert_eq!(attribution.pod_owner_label, Some(owner));
        assert_eq!(
            serde_json::to_value(&*attribution).expect("json")["pod_owner_label"],
            serde_json::json!({"key": "app.kubernetes.io/name", "value": "checkout-api"})
        );
    }

    #[test]
    fn labels_prefer_kubernetes_then_unit_then_comm() {
        let pod = Attribution {
            namespace: Some("shop".into()),
            pod: Some("checkout-1".into()),
            workload: Some("deployment/checkout".into()),
            ..Attribution::default()
        };
        assert_eq!(
            pod.labels(Some("java")),
            ["shop", "checkout-1", "deployment/checkout"]
        );
        let unnamed = Attribution {
            pod_uid: Some("6f1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e".into()),
            ..Attribution::default()
        };
        assert_eq!(
            unnamed.labels(Some("java"))[1],
            "6f1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e"
        );
        let unit = Attribution {
            unit: Some("nginx.service".into()),
            ..Attribution::default()
        };
        assert_eq!(unit.labels(Some("nginx")), ["", "", "nginx.service"]);
        assert_eq!(Attribution::default().labels(Some("curl"))[2], "curl");
        assert_eq!(Attribution::default().labels(None)[2], "unknown");
    }
}
