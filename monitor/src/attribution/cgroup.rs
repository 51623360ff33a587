//! Container id, runtime and pod UID from a cgroup path, for both kubelet
//! cgroup drivers (systemd: `kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`;
//! cgroupfs: `/kubepods/burstable/pod<uid>/<id>`), containerd, CRI-O and
//! Docker, cgroup v1 and v2. Pure string work, so it is unit-tested with
//! paths seen on real nodes.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

/// What a cgroup path says about its container.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Container {
    /// 64 hex digits; None for a pod-level cgroup (or a pause process's).
    pub id: Option<String>,
    /// None where the path does not tell (a bare id under the cgroupfs
    /// driver is containerd's or Docker's).
    pub runtime: Option<Runtime>,
    /// The pod's UID with dashes (the systemd driver writes underscores).
    pub pod_uid: Option<String>,
}

impl Container {
    pub fn is_empty(&self) -> bool {
        self.id.is_none() && self.pod_uid.is_none()
    }
}

/// Parses one cgroup path. Works on paths relative to another cgroup
/// namespace (`/../../kubepods.slice/...`), as a containerised idlemon reads them.
pub fn parse(path: &str) -> Container {
    let mut container = Container::default();
    for segment in path.split('/') {
        if let Some(uid) = pod_uid(segment) {
            container.pod_uid = Some(uid);
        }
        if let Some((runtime, id)) = container_id(segment) {
            container.runtime = runtime;
            container.id = Some(id.to_owned());
        }
    }
    if container.runtime.is_none() && container.id.is_some() && path.contains("/docker/") {
        container.runtime = Some(Runtime::Docker);
    }
    container
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid with _>.slice` (systemd).
pub fn pod_uid(segment: &str) -> Option<String> {
    let rest = segment.strip_suffix(".slice").unwrap_or(segment);
    let position = rest.rfind("pod")?;
    let before = &rest[..position];
    if !(before.is_empty() || before.starts_with("kubepods") && before.ends_with('-')) {
        return None;
    }
    let uid = rest[position + 3..].replace('_', "-");
    is_uid(&uid).then_some(uid)
}

fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `crio-<id>`,
/// `docker-<id>.scope`, or a bare `<id>`.
fn container_id(segment: &str) -> Option<(Option<Runtime>, &str)> {
    let rest = segment.strip_suffix(".scope").unwrap_or(segment);
    let (runtime, id) = if let Some(id) = rest.strip_prefix("cri-containerd-") {
        (Some(Runtime::Containerd), id)
    } else if let Some(id) = rest.strip_prefix("crio-") {
        // crio-conmon-<id> is the monitor process, not the container.
        if id.starts_with("conmon-") {
            return None;
        }
        (Some(Runtime::CriO), id)
    } else if let Some(id) = rest.strip_prefix("docker-") {
        (Some(Runtime::Docker), id)
    } else {
        (None, rest)
    };
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some((runtime, id))
}

/// The cgroup path of a process from `/proc/PID/cgroup`: the v2 line
/// (`0::/path`) where there is one, else the v1 `name=systemd` line, else the
/// first v1 line that names a container.
pub fn path_from_proc(contents: &str) -> Option<String> {
    let mut v1_systemd = None;
    let mut v1_container = None;
    for line in contents.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            return Some(path.to_owned());
        }
        if controllers == "name=systemd" {
            v1_systemd.get_or_insert_with(|| path.to_owned());
        } else if !parse(path).is_empty() {
            v1_container.get_or_insert_with(|| path.to_owned());
        }
    }
    v1_container.or(v1_systemd)
}

/// The systemd unit a cgroup path belongs to (`/system.slice/nginx.service`
/// -> `nginx.service`), for plain hosts.
pub fn systemd_unit(path: &str) -> Option<String> {
    path.split('/')
        .rev()
        .find(|segment| segment.ends_with(".service") || segment.ends_with(".scope"))
        .filter(|unit| !unit.starts_with("session-"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3b1f5c0d8e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
    const UID: &str = "6f1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e";
    const UID_SYSTEMD: &str = "6f1e8d8a_2b0c_4a51_9d7f_3c4e5b6a7d8e";

    fn expect(path: &str, runtime: Option<Runtime>, id: Option<&str>, pod: Option<&str>) {
        let parsed = parse(path);
        assert_eq!(parsed.runtime, runtime, "{path}");
        assert_eq!(parsed.id.as_deref(), id, "{path}");
        assert_eq!(parsed.pod_uid.as_deref(), pod, "{path}");
    }

    #[test]
    fn containerd_with_the_systemd_driver_on_cgroup_v2() {
        // EKS AL2023 nodes.
        expect(
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            ),
            Some(Runtime::Containerd),
            Some(ID),
            Some(UID),
        );
        expect(
            &format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"),
            Some(Runtime::Containerd),
            Some(ID),
            Some(UID),
        );
    }

    #[test]
    fn containerd_with_the_cgroupfs_driver_on_cgroup_v1() {
        // EKS AL2 nodes: the id alone does not name the runtime.
        expect(
            &format!("/kubepods/besteffort/pod{UID}/{ID}"),
            None,
            Some(ID),
            Some(UID),
        );
        expect(
            &format!("/kubepods/pod{UID}/{ID}"),
            None,
            Some(ID),
            Some(UID),
        );
    }

    #[test]
    fn cri_o_with_both_drivers_and_its_conmon() {
        expect(
            &format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-{ID}.scope"
            ),
            Some(Runtime::CriO),
            Some(ID),
            Some(UID),
        );
        expect(
            &format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
            Some(Runtime::CriO),
            Some(ID),
            Some(UID),
        );
        expect(
            &format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-conmon-{ID}.scope"),
            None,
            None,
            Some(UID),
        );
    }

    #[test]
    fn docker_under_kubernetes_and_alone() {
        expect(
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/docker-{ID}.scope"
            ),
            Some(Runtime::Docker),
            Some(ID),
            Some(UID),
        );
        expect(
            &format!("/system.slice/docker-{ID}.scope"),
            Some(Runtime::Docker),
            Some(ID),
            None,
        );
        expect(
            &format!("/docker/{ID}"),
            Some(Runtime::Docker),
            Some(ID),
            None,
        );
    }

    #[test]
    fn pod_level_cgroups_and_paths_from_another_cgroup_namespace() {
        expect(
            &format!("/kubepods/burstable/pod{UID}"),
            None,
            None,
            Some(UID),
        );
        expect(
            &format!("/../../kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"),
            Some(Runtime::Containerd),
            Some(ID),
            Some(UID),
        );
    }

    #[test]
    fn host_paths_name_no_container() {
        for path in [
            "/",
            "/system.slice/sshd.service",
            "/user.slice/user-0.slice/session-3.scope",
            "/init.scope",
        ] {
            assert!(parse(path).is_empty(), "{path}");
        }
        // Not quite a UID or an id.
        expect("/kubepods/burstable/podnot-a-uid/abc", None, None, None);
        expect(
            &format!("/kubepods/burstable/pod{UID}/{}", &ID[1..]),
            None,
            None,
            Some(UID),
        );
    }

    #[test]
    fn proc_cgroup_prefers_v2_then_a_container_then_systemd() {
        let v2 = format!(
            "0::/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(
            path_from_proc(&v2).as_deref(),
            Some(v2.trim().trim_start_matches("0::"))
        );

        let v1 = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{ID}\n\
             11:memory:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n"
        );
        assert_eq!(
            path_from_proc(&v1),
            Some(format!("/kubepods/burstable/pod{UID}/{ID}"))
        );

        let hybrid = "12:cpu,cpuacct:/\n1:name=systemd:/system.slice/nginx.service\n0::/system.slice/nginx.service\n";
        assert_eq!(
            path_from_proc(hybrid).as_deref(),
            Some("/system.slice/nginx.service")
        );

        let v1_host = "4:memory:/\n1:name=systemd:/system.slice/cron.service\n";
        assert_eq!(
            path_from_proc(v1_host).as_deref(),
            Some("/system.slice/cron.service")
        );
        assert_eq!(path_from_proc(""), None);
    }

    #[test]
    fn systemd_units_for_plain_hosts() {
        assert_eq!(
            systemd_unit("/system.slice/nginx.service").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            systemd_unit("/system.slice/postgresql@15-main.service").as_deref(),
            Some("postgresql@15-main.service")
        );
        assert_eq!(
            systemd_unit("/user.slice/user-1000.slice/session-4.scope"),
            None
        );
        assert_eq!(systemd_unit("/"), None);
    }
}
