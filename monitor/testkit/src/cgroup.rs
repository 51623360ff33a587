//! cgroup v2 directories of a test or the bench, laid out as the caller
//! needs them (containerd's, systemd's, kubelet's), removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};

/// Where cgroup v2 is mounted: /sys/fs/cgroup on a unified host,
/// /sys/fs/cgroup/unified in hybrid mode.
pub fn root() -> anyhow::Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    root_in(&mountinfo).ok_or_else(|| anyhow!("no cgroup v2 mount in /proc/self/mountinfo"))
}

/// The mount point (field 5) of the first mount whose type (the first
/// field after " - ") is cgroup2.
fn root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// A cgroup v2 directory, with the parents it had to make; each removed on
/// drop, deepest first (a directory that still holds a process or another
/// cgroup stays).
pub struct Cgroup {
    /// From the cgroup root, as idlemon reports and configures it
    /// (`/system.slice/x.service`).
    pub name: String,
    pub path: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroup {
    /// Makes the cgroup `name` (from the root, e.g. `/idlemon-test-1-on`)
    /// and whatever parents it lacks.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let root = root()?;
        let path = root.join(name.trim_start_matches('/'));
        let made: Vec<PathBuf> = path
            .ancestors()
            .take_while(|directory| *directory != root && !directory.exists())
            .map(Path::to_path_buf)
            .collect();
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self {
            name: name.to_owned(),
            path,
            made,
        })
    }

    /// Moves process `pid` (every thread of it) into this cgroup.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        move_into(&self.path, pid)
    }
}

/// Moves process `pid` (every thread of it) into the cgroup at `path`.
pub fn move_into(path: &Path, pid: u32) -> anyhow::Result<()> {
    let procs = path.join("cgroup.procs");
    fs::write(&procs, pid.to_string())
        .with_context(|| format!("cannot move {pid} into {}", procs.display()))
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // `made` runs from the deepest directory up.
        for directory in &self.made {
            let _ = fs::remove_dir(directory);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_the_cgroup2_mount_in_unified_and_hybrid_layouts() {
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(root_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "35 24 0:30 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                      36 35 0:31 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n\
                      37 35 0:32 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            root_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v1 = "37 35 0:32 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
        assert_eq!(root_in(v1), None);
    }
}
