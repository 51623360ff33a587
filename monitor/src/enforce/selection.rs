//! Which cgroup v2 directories keepalive enforcement attaches to: the
//! `[enforce]` table's cgroups and units, and the pods its namespaces and
//! pod labels select, each pod by its cgroup directory under kubepods.
//! Pure: the directories and pods are handed in.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use crate::{
    attribution::{cgroup::pod_uid, pods::PodMeta},
    config::EnforceConfig,
};

/// `[enforce] namespaces` and `pod_labels`: a pod is selected when its
/// namespace is one of `namespaces` (any, when empty) and it has every
/// label of `labels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSelector {
    pub namespaces: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

impl PodSelector {
    #[must_use]
    pub fn selects(&self, pod: &PodMeta) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&pod.namespace))
            && self
                .labels
                .iter()
                .all(|(key, value)| pod.labels.get(key) == Some(value))
    }
}

/// Every selector of the `[enforce]` table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selection {
    /// cgroup directories from the root (`cgroups` and `units`), outermost only.
    pub cgroups: Vec<String>,
    /// None: no Kubernetes selector.
    pub pods: Option<PodSelector>,
}

impl Selection {
    #[must_use]
    pub fn of(config: &EnforceConfig) -> Self {
        Self {
            cgroups: outermost(&config.cgroups),
            pods: config.selects_pods().then(|| PodSelector {
                namespaces: config.namespaces.clone(),
                labels: config.pod_labels.clone(),
            }),
        }
    }

    /// No selector at all: every workload (the root cgroup).
    #[must_use]
    pub fn everything(&self) -> bool {
        self.cgroups.is_empty() && self.pods.is_none()
    }

    /// The directories to attach to, from the root ("" for the root
    /// itself): the selected cgroups that `exists`, and the directories of
    /// the pods (`pod_dirs`: directory and pod UID) whose pod `lookup`
    /// finds and the pod selector selects. None inside another: a program
    /// attached to a directory runs for everything below it.
    pub fn wanted(
        &self,
        exists: impl Fn(&str) -> bool,
        pod_dirs: &[(String, String)],
        lookup: impl Fn(&str) -> Option<PodMeta>,
    ) -> BTreeSet<String> {
        if self.everything() {
            return BTreeSet::from([String::new()]);
        }
        let mut wanted: Vec<String> = self
            .cgroups
            .iter()
            .filter(|cgroup| exists(cgroup))
            .cloned()
            .collect();
        if let Some(selector) = &self.pods {
            for (directory, uid) in pod_dirs {
                if lookup(uid).is_some_and(|pod| selector.selects(&pod)) {
                    wanted.push(directory.clone());
                }
            }
        }
        outermost(&wanted).into_iter().collect()
    }
}

/// The selectors without those inside another: a program attached to both
/// a directory and its ancestor would run twice for the same socket.
pub fn outermost(cgroups: &[String]) -> Vec<String> {
    let normal = |path: &str| path.trim_end_matches('/').to_owned();
    let all: Vec<String> = cgroups.iter().map(|path| normal(path)).collect();
    let mut kept: Vec<String> = Vec::new();
    for path in &all {
        let inside = all.iter().any(|other| {
            other != path && (other.is_empty() || path.starts_with(&format!("{other}/")))
        });
        if !inside && !kept.contains(path) {
            kept.push(path.clone());
        }
    }
    kept
}

/// How deep below the root a pod's directory may be: kubelet puts it at
/// `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`
/// (systemd) or `/kubepods/<qos>/pod<uid>` (cgroupfs), one level more
/// under a container runtime's own parent.
const POD_DEPTH: usize = 5;

/// Pod-level cgroup directories under `root`: (directory from the root,
/// pod UID). Not below a pod's directory (its containers are inside it).
pub fn pod_cgroups(root: &Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut pending = vec![(String::new(), 0)];
    while let Some((relative, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(relative.trim_start_matches('/'))) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = format!("{relative}/{name}");
            match pod_uid(&name) {
                Some(uid) => found.push((path, uid)),
                None if depth + 1 < POD_DEPTH => pending.push((path, depth + 1)),
                None => {}
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID_A: &str = "6f1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e";
    const UID_B: &str = "0a1b2c3d-4e5f-4a51-9d7f-000000000001";

    fn pod(namespace: &str, labels: &[(&str, &str)]) -> PodMeta {
        PodMeta {
            namespace: namespace.to_owned(),
            name: "p".to_owned(),
            workload: "pod/p".to_owned(),
            containers: std::collections::HashMap::new(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn selector(namespaces: &[&str], labels: &[(&str, &str)]) -> PodSelector {
        PodSelector {
            namespaces: namespaces.iter().map(|n| (*n).to_owned()).collect(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn namespaces_are_any_of_and_labels_all_of() {
        let billing = pod("payments", &[("app", "billing"), ("tier", "web")]);
        let other = pod("payments", &[("app", "ledger")]);
        let elsewhere = pod("shop", &[("app", "billing")]);
        let namespaces = selector(&["payments", "audit"], &[]);
        assert!(namespaces.selects(&billing) && namespaces.selects(&other));
        assert!(!namespaces.selects(&elsewhere));
        let labels = selector(&[], &[("app", "billing"), ("tier", "web")]);
        assert!(labels.selects(&billing));
        assert!(!labels.selects(&elsewhere), "tier missing");
        assert!(!labels.selects(&other));
        let both = selector(&["payments"], &[("app", "billing")]);
        assert!(both.selects(&billing));
        assert!(!both.selects(&other) && !both.selects(&elsewhere));
    }

    #[test]
    fn wanted_directories_follow_the_pods_and_the_cgroups() {
        let mut config = EnforceConfig::default();
        assert_eq!(
            Selection::of(&config).wanted(|_| true, &[], |_| None),
            BTreeSet::from([String::new()]),
            "no selector: the root"
        );
        config.namespaces = vec!["payments".to_owned()];
        config.cgroups = vec!["/system.slice/a.service".to_owned(), "/gone".to_owned()];
        let selection = Selection::of(&config);
        let pod_dirs = [
            (format!("/kubepods/besteffort/pod{UID_A}"), UID_A.to_owned()),
            (format!("/kubepods/besteffort/pod{UID_B}"), UID_B.to_owned()),
        ];
        let lookup = |uid: &str| match uid {
            UID_A => Some(pod("payments", &[])),
            UID_B => Some(pod("shop", &[])),
            _ => None,
        };
        let wanted = selection.wanted(|cgroup| cgroup != "/gone", &pod_dirs, lookup);
        assert_eq!(
            wanted,
            BTreeSet::from([
                "/system.slice/a.service".to_owned(),
                format!("/kubepods/besteffort/pod{UID_A}"),
            ])
        );
        // A pod inside a selected cgroup is attached through it.
        config.cgroups = vec!["/kubepods".to_owned()];
        let wanted = Selection::of(&config).wanted(|_| true, &pod_dirs, lookup);
        assert_eq!(wanted, BTreeSet::from(["/kubepods".to_owned()]));
        // Pods the cache does not know are not selected.
        config.cgroups.clear();
        let wanted = Selection::of(&config).wanted(|_| true, &pod_dirs, |_| None);
        assert!(wanted.is_empty());
    }

    #[test]
    fn pod_directories_are_found_under_both_drivers() {
        let root = std::env::temp_dir().join(format!("idlemon-pods-{}", std::process::id()));
        let systemd = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            UID_A.replace('-', "_")
        );
        let cgroupfs = format!("kubepods/besteffort/pod{UID_B}");
        for directory in [
            format!("{systemd}/cri-containerd-abc.scope"),
            cgroupfs.clone(),
            "system.slice/a.service".to_owned(),
        ] {
            std::fs::create_dir_all(root.join(directory)).unwrap();
        }
        let found = pod_cgroups(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            found,
            vec![
                (format!("/{systemd}"), UID_A.to_owned()),
                (format!("/{cgroupfs}"), UID_B.to_owned()),
            ]
        );
    }

    #[test]
    fn nested_selectors_attach_once() {
        let cgroups = ["/a/b", "/a/", "/c", "/ab", "/c"].map(String::from);
        assert_eq!(outermost(&cgroups), ["/a", "/c", "/ab"]);
    }
}
