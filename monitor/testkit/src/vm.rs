//! The VM harness: Debian's cloud kernels (the closest packaged match to
//! EKS AL2023 nodes' 6.1 and 6.12, amd64 and arm64 for Graviton) booted
//! under qemu TCG with an initramfs that holds busybox, idlemon, the tools
//! the integration tests call (iproute2, nftables) and the netfilter and
//! veth modules of each kernel, plus the programs a caller adds (the test
//! binaries for `cargo xtask vm-test`, the bench's guest for its vm part).
//! /init sets the guest up and runs the caller's script, whose standard
//! output reaches the host on a port of its own; the console (kernel
//! messages, standard error) is kept beside it.
//!
//! This host's kernel refuses kprobes and fentry, so those attach kinds can
//! only be exercised here. /dev/kvm exists on CI's machines, but KVM guests
//! fail there: the guests are emulated.

mod debian;
mod initramfs;
mod kernels;

use std::{
    fs,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub use debian::{
    check_machine, copy_file, ensure_architecture, install_packages, install_program, unpack,
};
pub use initramfs::{Daemon, Guest};
pub use kernels::{Kernel, label};

/// The architecture a kernel runs on: qemu's system emulator, the kernel
/// packages and the binaries in the guest follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Arch {
    Amd64,
    /// Graviton.
    Arm64,
}

impl Arch {
    pub const ALL: [Self; 2] = [Self::Amd64, Self::Arm64];

    /// Debian's (and OCI's) name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// This host's.
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Self::Arm64
        } else {
            Self::Amd64
        }
    }

    /// Rust's target triple.
    pub fn rust_target(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64-unknown-linux-gnu",
            Self::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// Debian's multiarch directory, where its libraries live.
    pub fn multiarch(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64-linux-gnu",
            Self::Arm64 => "aarch64-linux-gnu",
        }
    }

    /// `Machine:` as readelf prints it.
    pub fn elf_machine(self) -> &'static str {
        match self {
            Self::Amd64 => "Advanced Micro Devices X86-64",
            Self::Arm64 => "AArch64",
        }
    }

    /// binutils' strip for its binaries.
    fn strip(self) -> &'static str {
        if self == Self::host() {
            "strip"
        } else {
            match self {
                Self::Amd64 => "x86_64-linux-gnu-strip",
                Self::Arm64 => "aarch64-linux-gnu-strip",
            }
        }
    }

    /// Debian packages the harness runs with: (package, why).
    pub fn packages(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Amd64 => &[
                ("qemu-system-x86", "boots the EKS-like kernels (TCG)"),
                ("busybox-static", "the guest's shell and mount"),
                ("cpio", "packs the guest's initramfs"),
                (
                    "binutils",
                    "reads libraries and modules' dependencies (readelf), strips",
                ),
            ],
            Self::Arm64 => &[
                (
                    "qemu-system-arm",
                    "boots the arm64 (Graviton-like) kernels (qemu-system-aarch64, TCG)",
                ),
                ("cpio", "packs the guest's initramfs"),
                (
                    "xz-utils",
                    "unpacks the 6.12 arm64 kernel's compressed modules",
                ),
                ("binutils-aarch64-linux-gnu", "strips arm64 programs"),
            ],
        }
    }
}

/// A kernel series of EKS AL2023 nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Series {
    V6_1,
    V6_12,
}

impl Series {
    pub fn name(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// A sh `case` pattern that matches the releases (`uname -r`) of the
    /// series' Debian kernels: 6.1.0-57-cloud-amd64, 6.12.118+deb12-cloud-arm64.
    pub fn release_pattern(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1.0-*",
            Self::V6_12 => "6.12.*",
        }
    }
}

/// What the guest prints once /init runs: the end of the boot.
pub const INIT_REACHED: &str = "vm-guest: init reached";

/// Installs what the VMs of `guest.arch` need (qemu, busybox, ...) when
/// missing, fetches the kernels of `series` for it into `cache/kernels`
/// (every download before the first boot: a missing kernel fails in
/// seconds, not after minutes of emulation) and packs into `work` the
/// initramfs of `guest`.
pub fn prepare(
    cache: &Path,
    work: &Path,
    series: &[Series],
    guest: &Guest,
) -> anyhow::Result<(Vec<Kernel>, PathBuf)> {
    let arch = guest.arch;
    install_packages("idlemon vm", arch.packages())?;
    ensure_architecture(arch)?;
    let mut apt_updated = false;
    let mut kernels = Vec::new();
    for series in series {
        kernels.push(kernels::fetch(arch, *series, cache, &mut apt_updated)?);
    }
    let initrd = initramfs::build(cache, work, guest, &kernels)?;
    Ok((kernels, initrd))
}

/// What one boot left.
pub struct Booted {
    /// What the guest's script printed, from the results port.
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
/// console and the results in `work`. `who` prefixes what it prints;
/// console lines starting with `echo` are shown as they come.
pub fn launch(
    kernel: &Kernel,
    initrd: &Path,
    work: &Path,
    timeout: Duration,
    qemu_args: &[&str],
    who: &str,
    echo: &str,
) -> anyhow::Result<Booted> {
    let label = kernel.label();
    let results_file = work.join(format!("results-{label}.txt"));
    if results_file.exists() {
        fs::remove_file(&results_file)
            .with_context(|| format!("cannot remove {}", results_file.display()))?;
    }
    // -nographic would put qemu's monitor on stdio too; the console alone
    // goes there, and the results get a serial port of their own (ttyS1;
    // arm64: a virtio console, hvc0), where kernel messages cannot
    // interleave with them.
    let mut command = match kernel.arch {
        Arch::Amd64 => {
            let mut command = Command::new("qemu-system-x86_64");
            command
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
    let captured = supervise(command, timeout, &label, echo)?;
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

/// Single quotes for sh, whatever the text holds.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The last `count` lines.
pub fn tail(lines: &[String], count: usize) -> Vec<String> {
    lines[lines.len().saturating_sub(count)..].to_vec()
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
/// guest must fail the run, not block CI.
fn supervise(
    mut command: Command,
    timeout: Duration,
    label: &str,
    echo: &str,
) -> anyhow::Result<Captured> {
    let program = command.get_program().to_string_lossy().into_owned();
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let stdout = child
        .stdout
        .take()
        .map(|pipe| reader(pipe, started, label, echo));
    let stderr = child
        .stderr
        .take()
        .map(|pipe| reader(pipe, started, label, echo));
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
            // Only this child, by its id: everything else runs inside it.
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
    echo: &str,
) -> thread::JoinHandle<Vec<(Duration, String)>> {
    let label = label.to_owned();
    let echo = echo.to_owned();
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
            if line.starts_with(&echo) {
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

/// Runs a command to success, or fails with its status.
pub fn run_checked(command: &mut Command) -> anyhow::Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} failed ({status})");
    }
    Ok(())
}

/// A command's standard output, or an error with its standard error.
pub fn capture(command: &mut Command) -> anyhow::Result<String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
