//! `cargo xtask vm-test`: the kprobe and fentry paths on EKS-like kernels.
//!
//! This host's kernel refuses kprobes and fentry, so those attach kinds can
//! only be exercised in a VM: Debian's 6.1 and 6.12 cloud kernels (the
//! kernels of EKS AL2023 nodes) boot under qemu TCG, one boot per kernel,
//! and a driver inside (`vm/guest.rs`) runs idlemon in three attach modes
//! against loopback connections. The host judges what the driver reports
//! (`vm/results.rs`) and prints one matrix. On this host's kernel the modes
//! run the integration tests themselves (`vm/integration.rs`), with the
//! attach kinds each mode expects in `IDLEMON_EXPECT_ATTACH`.
//!
//! `--arch arm64` does the same on Debian's arm64 cloud kernels (Graviton
//! nodes) under qemu-system-aarch64, with the daemon the arm64 image ships:
//! `cargo xtask image`'s own build and root file system for linux/arm64,
//! and the driver cross-compiled, static.

#[cfg(test)]
pub(crate) mod guest;
mod initramfs;
mod integration;
mod kernels;
pub(crate) mod protocol;
mod results;

use std::{
    fs,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use results::{Arch, RunSummary};
// What the bench's vm part (`bench/vm.rs`) boots with.
pub use initramfs::Daemon;
pub use kernels::Kernel;
pub use results::{HOOKS, Mode, Target, expected_kinds, parse_probe_info};

#[derive(Debug, Args)]
pub struct VmArgs {
    /// Kernels to test: Debian's 6.1 or 6.12 cloud kernel under qemu, this
    /// host's own, running the integration tests (`native`, needs root, amd64
    /// only), or all of them.
    #[arg(long, value_enum, default_value_t = KernelChoice::All)]
    kernel: KernelChoice,

    /// Architectures: amd64, arm64 (Graviton: the arm64 image's daemon on
    /// Debian's arm64 kernels under qemu-system-aarch64), or all.
    #[arg(long, value_enum, default_value_t = ArchChoice::Amd64)]
    arch: ArchChoice,

    /// Seconds one VM (or the native run) may take before it is killed and fails.
    #[arg(long, default_value_t = 240)]
    timeout: u64,

    /// Exactly these targets, whatever --kernel and --arch say (`ci`).
    #[arg(skip)]
    only: Option<Vec<Target>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ArchChoice {
    Amd64,
    Arm64,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    Native,
    All,
}

impl KernelChoice {
    fn targets(self, arch: ArchChoice) -> anyhow::Result<Vec<Target>> {
        let amd64 = match self {
            Self::V6_1 => vec![Target::V6_1],
            Self::V6_12 => vec![Target::V6_12],
            Self::Native => vec![Target::Native],
            Self::All => vec![Target::V6_1, Target::V6_12, Target::Native],
        };
        let arm64 = match self {
            Self::V6_1 => vec![Target::Arm64V6_1],
            Self::V6_12 => vec![Target::Arm64V6_12],
            Self::Native => Vec::new(),
            Self::All => vec![Target::Arm64V6_1, Target::Arm64V6_12],
        };
        Ok(match arch {
            ArchChoice::Amd64 => amd64,
            ArchChoice::Arm64 if arm64.is_empty() => bail!(
                "--kernel native is this host's kernel, which is not arm64: pass --kernel 6.1, 6.12 or all with --arch arm64"
            ),
            ArchChoice::Arm64 => arm64,
            ArchChoice::All => amd64.into_iter().chain(arm64).collect(),
        })
    }
}

/// How long idlemon may take to get ready in one mode. Under TCG the
/// verifier is slow; a daemon that is not ready by then is stuck, and the
/// other modes still deserve their turn within the VM's budget.
const VM_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Console lines shown when a run fails.
const CONSOLE_TAIL: usize = 40;
/// What the guest prints once /init runs: the end of the boot.
const INIT_REACHED: &str = "vm-guest: init reached";

/// What `cargo xtask test` runs: every amd64 kernel and native, and the
/// arm64 kernels of CI_ARM64 (README: "Kernels like EKS nodes'").
pub const CI_ARM64: &[Target] = &[Target::Arm64V6_1, Target::Arm64V6_12];

impl VmArgs {
    /// What `cargo xtask test` runs, default timeout.
    pub fn ci() -> Self {
        let mut only = vec![Target::V6_1, Target::V6_12, Target::Native];
        only.extend(CI_ARM64);
        Self {
            kernel: KernelChoice::All,
            arch: ArchChoice::All,
            timeout: 240,
            only: Some(only),
        }
    }

    /// Whether any target runs this host's release build (amd64).
    pub fn tests_amd64(&self) -> bool {
        self.targets().map_or(true, |targets| {
            targets.iter().any(|target| target.arch() == Arch::Amd64)
        })
    }

    fn targets(&self) -> anyhow::Result<Vec<Target>> {
        match &self.only {
            Some(only) => Ok(only.clone()),
            None => self.kernel.targets(self.arch),
        }
    }
}

pub fn run(args: &VmArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let targets = args.targets()?;
    let native = targets.contains(&Target::Native);
    if native && !crate::setup::is_root() {
        bail!(
            "the native run loads BPF programs and creates a network namespace: run as root, \
             or pass --kernel 6.1 or --kernel 6.12"
        );
    }
    let root = crate::workspace_root();
    let cache = root.join("target/vm-cache");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let timeout = Duration::from_secs(args.timeout);

    let mut runs = Vec::new();
    // The integration tests' own runs (`vm/integration.rs`).
    let mut test_runs = Vec::new();
    // Wall time per part, printed under the matrix: under TCG the arm64
    // build and VMs are what a CI budget has to know.
    let mut parts: Vec<String> = Vec::new();
    for arch in [Arch::Amd64, Arch::Arm64] {
        let of_arch: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|target| target.arch() == arch)
            .collect();
        if of_arch.is_empty() {
            continue;
        }
        let part_started = Instant::now();
        let (daemon, guest) = match arch {
            Arch::Amd64 => {
                let idlemon = root.join("target/release/idlemon");
                if !idlemon.exists() {
                    bail!(
                        "{} is missing: `cargo xtask vm-test` builds it first; did the build fail?",
                        idlemon.display()
                    );
                }
                (Daemon::Binary(idlemon), build_guest(&root, &cache, arch)?)
            }
            // The arm64 image's own build and files. First: it also adds
            // dpkg's arm64 architecture, which the kernels need.
            Arch::Arm64 => {
                let source = crate::image::Source::read(&root)?;
                let rootfs = crate::image::rootfs(
                    &root,
                    &cache.join("image"),
                    crate::image::Platform::Arm64,
                    &source,
                )?;
                (Daemon::Rootfs(rootfs), build_guest(&root, &cache, arch)?)
            }
        };
        parts.push(format!(
            "{} daemon and driver {:.0} s",
            arch.name(),
            part_started.elapsed().as_secs_f64()
        ));
        let part_started = Instant::now();
        let vms: Vec<Target> = of_arch
            .iter()
            .copied()
            .filter(|target| *target != Target::Native)
            .collect();
        if !vms.is_empty() {
            let (kernels, initrd) = prepare_vms(
                &cache,
                &cache,
                &vms,
                &daemon,
                &guest,
                &guest_args(VM_READY_TIMEOUT),
            )?;
            for (target, kernel) in &kernels {
                runs.push(boot(*target, kernel, &initrd, &cache, timeout)?);
            }
        }
        if let (true, Daemon::Binary(idlemon)) = (of_arch.contains(&Target::Native), &daemon) {
            let mut names: Vec<&str> = integration::SCENARIOS
                .iter()
                .map(|(file, _, _)| *file)
                .collect();
            names.dedup();
            let binaries = integration::build(&root, &names)?;
            for mode in Mode::ALL {
                test_runs.push(integration::run_native(&binaries, idlemon, mode, timeout)?);
            }
        }
        parts.push(format!(
            "{} kernels, initramfs and runs {:.0} s",
            arch.name(),
            part_started.elapsed().as_secs_f64()
        ));
    }

    let mut passed = true;
    if !runs.is_empty() {
        let (text, runs_passed) = results::render(&runs, started.elapsed().as_secs_f64());
        println!("\n{text}");
        passed = runs_passed;
    }
    if !test_runs.is_empty() {
        let (text, tests_passed) = integration::render(&test_runs);
        println!("the integration tests in each attach mode:\n{text}");
        passed &= tests_passed;
    }
    println!("wall time per part: {}", parts.join("; "));
    if !passed {
        bail!(
            "vm-test failed (matrix above; consoles and results in {})",
            cache.display()
        );
    }
    Ok(())
}

/// The driver's arguments, the same in every VM.
fn guest_args(ready_timeout: Duration) -> Vec<String> {
    let mut args = vec![
        "--ready-timeout".to_owned(),
        ready_timeout.as_secs().to_string(),
    ];
    for mode in Mode::ALL {
        args.extend(["--mode".to_owned(), mode.guest_arg()]);
    }
    args
}

/// Installs qemu and the rest, fetches the kernels of `targets` (of one
/// architecture) into `cache/kernels`, and packs into `work` an initramfs
/// whose /init runs the driver with `guest_args`.
pub fn prepare_vms(
    cache: &Path,
    work: &Path,
    targets: &[Target],
    daemon: &Daemon,
    guest: &Path,
    guest_args: &[String],
) -> anyhow::Result<(Vec<(Target, Kernel)>, PathBuf)> {
    let arch = targets.first().map_or(Arch::Amd64, |target| target.arch());
    if targets.iter().any(|target| target.arch() != arch) {
        bail!("one initramfs per architecture: {targets:?} mixes them");
    }
    kernels::ensure_packages(arch)?;
    // Every download before the first boot: a missing kernel fails in
    // seconds, not after minutes of emulation.
    let mut apt_updated = false;
    let mut kernels = Vec::new();
    for target in targets {
        kernels.push((*target, kernels::fetch(*target, cache, &mut apt_updated)?));
    }
    let busybox = match arch {
        Arch::Amd64 => initramfs::host_busybox()?,
        Arch::Arm64 => kernels::arm64_busybox(cache)?,
    };
    let contents = initramfs::Contents {
        arch,
        busybox: &busybox,
        daemon,
        guest,
        modules: kernels
            .iter()
            .map(|(_, kernel)| (kernel.release.clone(), kernel.modules.clone()))
            .collect(),
    };
    let initrd = initramfs::build(work, &contents, guest_args)?;
    Ok((kernels, initrd))
}

/// Builds the driver with plain rustc: a second cargo binary in this package
/// would make `cargo xtask` ambiguous (see `vm/guest.rs`). The arm64 driver
/// is cross-compiled (the target and linker `cargo xtask setup` installs)
/// and static: the arm64 guest has only the libraries the daemon needs.
pub fn build_guest(root: &Path, work: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let source = root.join("xtask/src/vm/guest.rs");
    let output = work.join(match arch {
        Arch::Amd64 => "vm-guest".to_owned(),
        Arch::Arm64 => "vm-guest-arm64".to_owned(),
    });
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    println!(
        "xtask vm-test: building the {} guest driver from {}",
        arch.name(),
        source.display()
    );
    let mut command = Command::new(&rustc);
    if arch != Arch::host() {
        command
            .args(["--target", crate::setup::ARM64_TARGET])
            .args(["-C", "linker=aarch64-linux-gnu-gcc"])
            .args(["-C", "target-feature=+crt-static"]);
    }
    run_checked(
        command
            .args([
                "--edition",
                "2024",
                "--crate-name",
                "vm_guest",
                "--crate-type",
                "bin",
            ])
            .args(["-C", "opt-level=2", "-C", "strip=symbols", "-o"])
            .arg(&output)
            .arg(&source)
            .current_dir(root)
            .env("PATH", crate::setup::path_with_cargo_bin()),
    )
    .with_context(|| format!("cannot build the guest driver with {rustc}"))?;
    Ok(output)
}

/// One boot of one kernel: all three modes run in it, to pay for the boot once.
fn boot(
    target: Target,
    kernel: &Kernel,
    initrd: &Path,
    cache: &Path,
    timeout: Duration,
) -> anyhow::Result<RunSummary> {
    let booted = launch(target, kernel, initrd, cache, timeout, &[], "xtask vm-test")?;
    Ok(RunSummary {
        target,
        source: kernel.package.clone(),
        release: None,
        boot_seconds: booted.boot_seconds,
        total_seconds: booted.elapsed.as_secs_f64(),
        problem: booted.problem,
        report: results::parse_guest_output(&booted.results),
        console_tail: tail(&booted.console, CONSOLE_TAIL),
    })
}

/// What one boot left.
pub struct Booted {
    /// The driver's result lines, from the second serial port.
    pub results: String,
    /// The console: qemu's stdout and stderr.
    pub console: Vec<String>,
    pub console_log: PathBuf,
    /// Seconds until the guest's /init ran.
    pub boot_seconds: Option<f64>,
    pub elapsed: Duration,
    /// Why the boot went wrong: a timeout, no /init, qemu failing.
    pub problem: Option<String>,
}

/// Boots `kernel` with `initrd` under qemu TCG (one vCPU, `qemu_args`
/// added) until the guest powers off or `timeout` passes, and keeps the
/// console and the results in `work`. `who` prefixes what it prints.
pub fn launch(
    target: Target,
    kernel: &Kernel,
    initrd: &Path,
    work: &Path,
    timeout: Duration,
    qemu_args: &[&str],
    who: &str,
) -> anyhow::Result<Booted> {
    let label = target.label();
    let results_file = work.join(format!("results-{label}.txt"));
    if results_file.exists() {
        fs::remove_file(&results_file)
            .with_context(|| format!("cannot remove {}", results_file.display()))?;
    }
    // -nographic would put qemu's monitor on stdio too; the console alone
    // goes there, and the results get a serial port of their own (ttyS1;
    // arm64: a virtio console, hvc0), where kernel messages cannot
    // interleave with them.
    let mut command = match target.arch() {
        Arch::Amd64 => {
            let mut command = Command::new("qemu-system-x86_64");
            command
                // /dev/kvm exists on CI's machines, but KVM guests fail there (an
                // MSR assertion with -cpu host, an emulation failure with kvm64):
                // emulate.
                .args(["-accel", "tcg", "-cpu", "max", "-m", "1024"])
                .args(["-display", "none", "-monitor", "none", "-no-reboot"])
                .args(["-serial", "stdio", "-serial"])
                .arg(format!("file:{}", results_file.display()))
                .args(["-append", "console=ttyS0 panic=-1 quiet"]);
            command
        }
        Arch::Arm64 => {
            let mut command = Command::new("qemu-system-aarch64");
            command
                // pauth-impdef: pointer authentication with qemu's cheap
                // algorithm instead of emulating QARMA, which costs TCG
                // much time; the guest cannot tell.
                .args(["-M", "virt", "-accel", "tcg", "-cpu", "max,pauth-impdef=on"])
                .args(["-m", "1024"])
                .args(["-display", "none", "-monitor", "none", "-no-reboot"])
                .args(["-serial", "stdio"])
                .args(["-device", "virtio-serial-device", "-chardev"])
                .arg(format!("file,id=results,path={}", results_file.display()))
                .args(["-device", "virtconsole,chardev=results"])
                .args(["-append", "console=ttyAMA0 panic=-1 quiet"]);
            command
        }
    };
    command
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(qemu_args);
    println!(
        "{who}: booting {label} ({}) under qemu TCG, at most {} s",
        kernel.package,
        timeout.as_secs()
    );
    let captured = supervise(command, timeout, label)?;
    let console = captured.merged();
    let console_log = work.join(format!("console-{label}.log"));
    fs::write(&console_log, console.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", console_log.display()))?;
    let boot_seconds = captured
        .stdout
        .iter()
        .find(|(_, line)| line.contains(INIT_REACHED))
        .map(|(at, _)| at.as_secs_f64());
    let problem = if captured.timed_out {
        Some(format!(
            "timed out after {} s: qemu killed (raise --timeout if the guest was only slow)",
            timeout.as_secs()
        ))
    } else if boot_seconds.is_none() {
        Some("the guest never reached /init (see the console)".to_owned())
    } else {
        match captured.status {
            Some(status) if !status.success() => Some(format!("qemu exited with {status}")),
            _ => None,
        }
    };
    println!(
        "{who}: {label}: {}VM ran {:.1} s (console: {})",
        boot_seconds.map_or_else(String::new, |s| format!("/init after {s:.1} s, ")),
        captured.elapsed.as_secs_f64(),
        console_log.display()
    );
    Ok(Booted {
        results: fs::read_to_string(&results_file).unwrap_or_default(),
        console,
        console_log,
        boot_seconds,
        elapsed: captured.elapsed,
        problem,
    })
}

/// A child's output, each line with when it came.
struct Captured {
    stdout: Vec<(Duration, String)>,
    stderr: Vec<(Duration, String)>,
    status: Option<ExitStatus>,
    timed_out: bool,
    elapsed: Duration,
}

impl Captured {
    /// Both streams in the order they came.
    fn merged(&self) -> Vec<String> {
        let mut lines: Vec<&(Duration, String)> = self.stdout.iter().chain(&self.stderr).collect();
        lines.sort_by_key(|(at, _)| *at);
        lines.into_iter().map(|(_, line)| line.clone()).collect()
    }
}

/// Runs a child to its end or to the deadline, when it is killed: a hung
/// guest must fail the run, not block CI. The driver's progress lines are
/// echoed as they come.
fn supervise(mut command: Command, timeout: Duration, label: &str) -> anyhow::Result<Captured> {
    let program = command.get_program().to_string_lossy().into_owned();
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let stdout = child.stdout.take().map(|pipe| reader(pipe, started, label));
    let stderr = child.stderr.take().map(|pipe| reader(pipe, started, label));
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("cannot wait for {program}"))?
        {
            break Some(status);
        }
        if started.elapsed() > timeout {
            timed_out = true;
            // Only this child, by its id. The driver's idlemon dies with the
            // driver (PR_SET_PDEATHSIG).
            let _ = child.kill();
            break child.wait().ok();
        }
        thread::sleep(Duration::from_millis(200));
    };
    let collect = |handle: Option<thread::JoinHandle<Vec<(Duration, String)>>>| {
        handle
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default()
    };
    Ok(Captured {
        stdout: collect(stdout),
        stderr: collect(stderr),
        status,
        timed_out,
        elapsed: started.elapsed(),
    })
}

fn reader(
    pipe: impl Read + Send + 'static,
    started: Instant,
    label: &str,
) -> thread::JoinHandle<Vec<(Duration, String)>> {
    let label = label.to_owned();
    thread::spawn(move || {
        let mut lines = Vec::new();
        let mut pipe = BufReader::new(pipe);
        let mut buffer = Vec::new();
        while let Ok(read) = pipe.read_until(b'\n', &mut buffer) {
            if read == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buffer)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if line.starts_with("vm-guest:") {
                println!(
                    "  [{label} {:>5.1}s] {line}",
                    started.elapsed().as_secs_f64()
                );
            }
            lines.push((started.elapsed(), line));
            buffer.clear();
        }
        lines
    })
}

fn tail(lines: &[String], count: usize) -> Vec<String> {
    lines[lines.len().saturating_sub(count)..].to_vec()
}

use crate::setup::run_command as run_checked;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_gets_every_mode() {
        let args = guest_args(Duration::from_secs(70));
        assert_eq!(
            args,
            [
                "--ready-timeout",
                "70",
                "--mode",
                "default:",
                "--mode",
                "no-fentry:fentry",
                "--mode",
                "no-fentry-kprobe:fentry,kprobe"
            ]
        );
        // The driver reads them back as the host meant them.
        let mut full = vec!["--idlemon".to_owned(), "/idlemon".to_owned()];
        full.extend(args);
        let parsed = guest::Args::parse(full.into_iter()).expect("driver arguments");
        let modes: Vec<(&str, &str)> = parsed
            .modes
            .iter()
            .map(|mode| (mode.name.as_str(), mode.disable.as_str()))
            .collect();
        let expected: Vec<(&str, &str)> =
            Mode::ALL.iter().map(|m| (m.name(), m.disable())).collect();
        assert_eq!(modes, expected);
    }

    #[test]
    fn driver_lines_reach_the_host_parser() {
        let mut text = String::new();
        text.push_str(&guest::result_line(
            protocol::KERNEL,
            protocol::NO_MODE,
            "6.1.0-56-cloud-amd64",
        ));
        text.push_str(&guest::result_line(
            protocol::READY,
            "default",
            &guest::ready_report(12.3, "ready"),
        ));
        text.push_str(&guest::result_line(
            protocol::READY,
            "no-fentry",
            &guest::ready_report(2.0, "degraded not ready, degraded: send hook missing"),
        ));
        text.push_str(&guest::result_line(
            protocol::METRIC,
            "default",
            "idlemon_probe_info{hook=\"send\",kind=\"kprobe\"} 1",
        ));
        text.push_str(&guest::result_line(protocol::LOG, "default", "multi\nline"));
        text.push_str(&guest::result_line(protocol::DONE, protocol::NO_MODE, ""));
        let report = results::parse_guest_output(&text);
        assert!(report.done && report.garbled.is_empty(), "{report:?}");
        let mode = report.mode("default").expect("mode");
        assert_eq!(mode.ready_seconds, Some(12.3));
        assert_eq!(mode.hooks.get("send").map(String::as_str), Some("kprobe"));
        assert_eq!(mode.log, ["multi line"]);
        let degraded = report.mode("no-fentry").expect("mode");
        assert_eq!(
            degraded.degraded.as_deref(),
            Some("not ready, degraded: send hook missing")
        );
    }

    #[test]
    fn all_means_both_vms_and_native() {
        let targets = |kernel: KernelChoice, arch| kernel.targets(arch).ok();
        assert_eq!(
            targets(KernelChoice::All, ArchChoice::Amd64),
            Some(vec![Target::V6_1, Target::V6_12, Target::Native])
        );
        assert_eq!(
            KernelChoice::from_str("6.12", false)
                .ok()
                .and_then(|kernel| targets(kernel, ArchChoice::Amd64)),
            Some(vec![Target::V6_12])
        );
        assert_eq!(
            targets(KernelChoice::All, ArchChoice::Arm64),
            Some(vec![Target::Arm64V6_1, Target::Arm64V6_12])
        );
        assert_eq!(
            targets(KernelChoice::V6_1, ArchChoice::All),
            Some(vec![Target::V6_1, Target::Arm64V6_1])
        );
        assert_eq!(
            targets(KernelChoice::All, ArchChoice::All).map(|all| all.len()),
            Some(5)
        );
        // This host is not arm64.
        assert!(
            KernelChoice::Native
                .targets(ArchChoice::Arm64)
                .is_err_and(|error| error.to_string().contains("not arm64"))
        );
        // CI: every amd64 target and at least one arm64 kernel.
        let ci = VmArgs::ci().targets().expect("targets");
        assert!(ci.starts_with(&[Target::V6_1, Target::V6_12, Target::Native]));
        assert!(ci.iter().any(|target| target.arch() == Arch::Arm64));
    }
}
