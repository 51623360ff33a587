//! Part 5 (`--only vm`): fentry and kprobe overhead on the kernels EKS
//! nodes run, under qemu. It boots them with vm-test's harness, which lives
//! in xtask (xtask/src/bench/vm.rs says how the part measures): this part
//! runs `xtask bench-vm`, which prints its section as it goes and leaves its
//! targets in a file, read back here into the bench's table.

use std::{fs, process::Command};

use anyhow::{Context as _, bail};

use super::{Bench, table::Check};

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let Some(xtask) = &bench.xtask else {
        bail!(
            "the vm part boots its kernels through xtask: run it as `cargo xtask bench --only vm`"
        );
    };
    let checks = std::env::temp_dir().join(format!(
        "idlemon-bench-{}-vm-checks.txt",
        std::process::id()
    ));
    let status = Command::new(xtask)
        .arg("bench-vm")
        .arg("--idlemon")
        .arg(&bench.binary)
        .args(["--rounds", &bench.settings.vm_rounds.to_string()])
        .args([
            "--window-ms",
            &bench.settings.vm_window.as_millis().to_string(),
        ])
        .arg("--checks")
        .arg(&checks)
        .status()
        .with_context(|| format!("cannot run {} bench-vm", xtask.display()));
    let text = fs::read_to_string(&checks).unwrap_or_default();
    let _ = fs::remove_file(&checks);
    // What it measured before it failed still belongs in the table.
    let mut failed = None;
    for line in text.lines() {
        if let Some(why) = line.strip_prefix("failed\t") {
            failed = Some(why.to_owned());
            continue;
        }
        bench.check(Check::from_line(line).with_context(|| format!("bad check line {line:?}"))?);
    }
    if let Some(why) = failed {
        bail!("{why}");
    }
    let status = status?;
    if !status.success() {
        bail!("xtask bench-vm failed ({status})");
    }
    Ok(())
}
