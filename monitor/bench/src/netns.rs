//! Network namespaces made for one measurement, so that no other traffic on
//! the host mixes in: the test kit's (`idlemon_testkit::Netns`, removed when
//! dropped), named `idlemon-PID-N-bench-PART`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

pub use idlemon_testkit::Netns;

const BIND_MOUNTS: &str = "/run/netns";
/// What the bench adds to the kit's names, `idlemon-PID-N-TAG`.
const TAG: &str = "bench-";
/// The bench's daemon logs, `idlemon-bench-PID-PORT.log` (daemon.rs).
const LOG_PREFIX: &str = "idlemon-bench-";

/// A namespace for one part, with loopback up. The kit panics if `ip`
/// fails; the bench turns that into the part's failure.
pub fn create(part: &str) -> Netns {
    Netns::new(&format!("{TAG}{part}"))
}

/// Where the namespace is bind-mounted, for threads that enter it themselves.
pub fn path(netns: &Netns) -> PathBuf {
    Path::new(BIND_MOUNTS).join(&netns.name)
}

/// Removes namespaces and daemon logs left by a bench that was killed
/// (SIGKILL runs no Drop): those whose process is gone.
pub fn remove_leftovers() {
    let dead = |pid: &str| !Path::new("/proc").join(pid).exists();
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let left = name
                .strip_prefix(LOG_PREFIX)
                .filter(|rest| rest.ends_with(".log"))
                .and_then(|rest| rest.split('-').next())
                .is_some_and(dead);
            if left {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let Ok(entries) = fs::read_dir(BIND_MOUNTS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // idlemon-PID-N-bench-PART
        let mut fields = name.splitn(4, '-');
        let (Some("idlemon"), Some(pid), Some(_), Some(tag)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if tag.starts_with(TAG) && dead(pid) {
            println!("bench: removing network namespace {name} left by an earlier run");
            let status = Command::new("ip")
                .args(["netns", "del", &name])
                .stdin(Stdio::null())
                .status();
            if !status.is_ok_and(|status| status.success()) {
                eprintln!("bench: cannot remove network namespace {name}");
            }
        }
    }
}
