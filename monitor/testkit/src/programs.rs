//! Counts of idlemon's loaded BPF programs, to show that a daemon that
//! exits (cleanly, killed, or refusing bad input) leaves none behind, and
//! the programs and maps one process holds.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io, thread,
    time::Duration,
};

use serde_json::Value;

use crate::{sh, wait_for};

/// Loaded BPF programs: id and name (bpftool truncates to 15 characters).
pub fn loaded_programs() -> BTreeMap<u32, String> {
    let output = sh("bpftool", &["prog", "list", "--json"]);
    let programs: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    programs
        .iter()
        .filter_map(|program| {
            let id = u32::try_from(program["id"].as_u64()?).ok()?;
            Some((id, program["name"].as_str().unwrap_or_default().to_owned()))
        })
        .collect()
}

/// The BPF programs and maps a process holds open (program fds and the
/// links that hold programs), from /proc/PID/fdinfo: exact even when
/// another idlemon (someone's test) has loaded the same programs next to it.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub maps: BTreeSet<u32>,
    pub progs: BTreeSet<u32>,
}

pub fn objects_of(pid: u32) -> io::Result<Objects> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut objects = Objects::default();
    let entries = fs::read_dir(&dir)
        .map_err(|error| io::Error::new(error.kind(), format!("cannot list {dir}: {error}")))?;
    for entry in entries {
        let Ok(entry) = entry else { continue };
        // An fd may close between the listing and the read.
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in info.lines() {
            let id = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|rest| rest.trim().parse::<u32>().ok())
            };
            if let Some(id) = id("map_id:") {
                objects.maps.insert(id);
            } else if let Some(id) = id("prog_id:") {
                objects.progs.insert(id);
            }
        }
    }
    Ok(objects)
}

/// How many of idlemon's programs are loaded, by their distinctive names.
pub fn idlemon_programs() -> usize {
    loaded_programs()
        .values()
        .filter(|name| {
            [
                "walk_tcp",
                "state_tp_btf",
                "send_tp_btf",
                "receive_tp_btf",
                "destroy_tp_btf",
            ]
            .contains(&name.as_str())
        })
        .count()
}

/// The count of idlemon programs once programs of exited daemons are freed
/// (the kernel frees them shortly after their last file descriptor closes).
pub fn settled_idlemon_programs() -> usize {
    let mut last = idlemon_programs();
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(100));
        let now = idlemon_programs();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Asserts that the idlemon program count comes back to `baseline`.
pub fn assert_programs_back_to(baseline: usize, what: &str) {
    let back = wait_for(Duration::from_secs(5), || {
        (idlemon_programs() <= baseline).then_some(())
    });
    assert!(
        back.is_some(),
        "{what}: {} idlemon programs loaded, expected {baseline}",
        idlemon_programs()
    );
}
