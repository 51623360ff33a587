//! `cargo xtask bench`: builds the daemon and the bench (monitor/bench,
//! which holds every part, the vm part's VMs included, and explains how to
//! read the output), then runs the bench with the same arguments.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::Context as _;
use clap::Args;

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// The bench's own arguments (`cargo xtask bench --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

impl BenchArgs {
    /// Only the bench's help is asked for: nothing to set up or measure.
    pub fn help_only(&self) -> bool {
        self.args.iter().any(|arg| arg == "--help" || arg == "-h")
    }
}

/// Runs the bench binary in place of xtask, so that Ctrl-C and SIGTERM
/// reach it alone and it stops its daemons, namespaces and VMs on the way out.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    crate::cargo(&["build", "--package", "idlemon-bench"])?;
    let root = crate::workspace_root();
    let bench = root.join("target/debug/idlemon-bench");
    let error = Command::new(&bench)
        .arg("--idlemon")
        .arg(root.join("target/release/idlemon"))
        .args(&args.args)
        .current_dir(&root)
        .exec();
    Err(error).with_context(|| format!("cannot start {}", bench.display()))
}
