//! `cargo xtask bench`: builds the daemon and the bench (monitor/bench,
//! which holds every part and explains how to read the output), then runs
//! the bench with the same arguments. `xtask bench-vm` is the bench's vm
//! part, which the bench calls back here because it boots its kernels with
//! vm-test's harness (`crate::vm`).

// Shared with the vm part's guest driver, which uses only part of it.
#[allow(dead_code)]
pub(crate) mod noop;
// The vm part's guest driver, built alone by rustc (`vm.rs`); here for its tests.
#[cfg(test)]
pub(crate) mod guest;
#[allow(dead_code, reason = "the scenario half goes with the driver")]
pub(crate) mod protocol;
// One copy of the tables and targets, the bench's.
#[expect(dead_code, reason = "the bench crate uses the rest")]
#[path = "../../monitor/bench/src/table.rs"]
mod table;
mod vm;

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use clap::Args;

use self::table::Check;

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
/// reach it alone and it stops its daemons and namespaces on the way out.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    crate::cargo(&["build", "--package", "idlemon-bench"])?;
    let root = crate::workspace_root();
    let bench = root.join("target/debug/idlemon-bench");
    let xtask = std::env::current_exe().context("cannot find xtask's own binary")?;
    let error = Command::new(&bench)
        .arg("--idlemon")
        .arg(root.join("target/release/idlemon"))
        .arg("--xtask")
        .arg(xtask)
        .args(&args.args)
        .current_dir(&root)
        .exec();
    Err(error).with_context(|| format!("cannot start {}", bench.display()))
}

/// `xtask bench-vm`, run by the bench for its vm part.
#[derive(Debug, Args)]
pub struct VmBenchArgs {
    /// The daemon to measure.
    #[arg(long)]
    idlemon: PathBuf,
    /// Rounds of A, B1, B2 and F windows per kernel.
    #[arg(long)]
    rounds: usize,
    /// Length of one window, in the guest's time.
    #[arg(long)]
    window_ms: u64,
    /// Where to leave the part's targets, one per line, for the bench's table.
    #[arg(long)]
    checks: PathBuf,
}

/// What the vm part needs from the bench, and what it reports.
struct Bench {
    binary: PathBuf,
    settings: Settings,
    checks: Vec<Check>,
}

struct Settings {
    vm_rounds: usize,
    vm_window: Duration,
}

impl Bench {
    fn check(&mut self, check: Check) {
        self.checks.push(check);
    }
}

pub fn run_vm(args: &VmBenchArgs) -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    let mut bench = Bench {
        binary: args.idlemon.clone(),
        settings: Settings {
            vm_rounds: args.rounds.max(1),
            vm_window: Duration::from_millis(args.window_ms),
        },
        checks: Vec::new(),
    };
    let result = vm::run(&mut bench);
    let mut lines: String = bench
        .checks
        .iter()
        .map(|check| check.to_line() + "\n")
        .collect();
    // The bench prints why the part failed, as it does for its own parts.
    if let Err(error) = &result {
        lines.push_str(&format!(
            "{FAILED}\t{}\n",
            format!("{error:#}").replace('\n', " ")
        ));
    }
    fs::write(&args.checks, lines)
        .with_context(|| format!("cannot write {}", args.checks.display()))
}

/// The line of the checks file that says why the part failed.
const FAILED: &str = "failed";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Set by Ctrl-C or SIGTERM, which reach the bench and this part alike;
/// the vm part stops between kernels and fails as interrupted.
fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}
