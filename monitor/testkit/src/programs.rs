//! Counts of idlemon's loaded BPF programs, to show that a daemon that
//! exits (cleanly, killed, or refusing bad input) leaves none behind.

use std::{thread, time::Duration};

use serde_json::Value;

use crate::{sh, wait_for};

/// Names of loaded BPF programs (bpftool truncates to 15 characters).
pub fn loaded_programs() -> Vec<String> {
    let output = sh("bpftool", &["prog", "list", "--json"]);
    let programs: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    programs
        .iter()
        .filter_map(|program| program["name"].as_str().map(str::to_owned))
        .collect()
}

/// How many of idlemon's programs are loaded, by their distinctive names.
pub fn idlemon_programs() -> usize {
    loaded_programs()
        .iter()
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
