//! `cargo xtask vm-test`: the integration tests themselves on the kernels
//! EKS nodes run, in each attach mode.
//!
//! This host's kernel refuses kprobes and fentry, so those attach kinds can
//! only be exercised in a VM: Debian's 6.1 and 6.12 cloud kernels (the
//! kernels of EKS AL2023 nodes; arm64 ones for Graviton) boot under qemu
//! TCG with the test kit's harness (`idlemon_testkit::vm`), one boot per
//! kernel. Inside, the compiled integration tests (`cargo test --no-run`)
//! run once per attach mode, told what that mode should attach
//! (`vm/integration.rs`); on this host's kernel (`native`) they run the
//! same way without a VM. One table shows every kernel, mode and test.
//!
//! `--arch arm64` runs the daemon the arm64 image ships (`cargo xtask
//! image`'s own build and root file system for linux/arm64) and the tests
//! cross-compiled for it.

mod integration;

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use idlemon_testkit::{
    attach::{Mode, Target},
    vm::{self as harness, Arch, Daemon, Guest, Series},
};

#[derive(Debug, Args)]
pub struct VmArgs {
    /// Kernels to test: Debian's 6.1 or 6.12 cloud kernel under qemu, this
    /// host's own (`native`, needs root, amd64 only), or all of them.
    #[arg(long, value_enum, default_value_t = KernelChoice::All)]
    kernel: KernelChoice,

    /// Architectures: amd64, arm64 (Graviton: the arm64 image's daemon and
    /// the tests cross-compiled, on Debian's arm64 kernels under
    /// qemu-system-aarch64), or all.
    #[arg(long, value_enum, default_value_t = ArchChoice::Amd64)]
    arch: ArchChoice,

    /// Seconds one VM (or one native mode) may take before it is killed and fails.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
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

impl VmArgs {
    /// What `cargo xtask test` runs: every kernel of both architectures,
    /// and native (README: "Kernels like EKS nodes'").
    pub fn ci() -> Self {
        Self {
            kernel: KernelChoice::All,
            arch: ArchChoice::All,
            timeout: 900,
        }
    }

    /// Whether any target runs this host's release build (amd64).
    pub fn tests_amd64(&self) -> bool {
        self.targets().map_or(true, |targets| {
            targets.iter().any(|target| target.arch() == Arch::Amd64)
        })
    }

    fn targets(&self) -> anyhow::Result<Vec<Target>> {
        let series = match self.kernel {
            KernelChoice::V6_1 => vec![Series::V6_1],
            KernelChoice::V6_12 => vec![Series::V6_12],
            KernelChoice::Native => Vec::new(),
            KernelChoice::All => vec![Series::V6_1, Series::V6_12],
        };
        let native = matches!(self.kernel, KernelChoice::Native | KernelChoice::All);
        let arches = match self.arch {
            ArchChoice::Amd64 => vec![Arch::Amd64],
            ArchChoice::Arm64 if self.kernel == KernelChoice::Native => bail!(
                "--kernel native is this host's kernel, which is not arm64: pass --kernel 6.1, 6.12 or all with --arch arm64"
            ),
            ArchChoice::Arm64 => vec![Arch::Arm64],
            ArchChoice::All => Arch::ALL.to_vec(),
        };
        let mut targets = Vec::new();
        for arch in arches {
            targets.extend(series.iter().map(|series| Target::Vm(arch, *series)));
            if native && arch == Arch::host() {
                targets.push(Target::Native);
            }
        }
        Ok(targets)
    }
}

pub fn run(args: &VmArgs) -> anyhow::Result<()> {
    let targets = args.targets()?;
    if !crate::setup::is_root() && targets.contains(&Target::Native) {
        bail!(
            "the native run loads BPF programs and creates network namespaces: run as root, \
             or pass --kernel 6.1 or --kernel 6.12"
        );
    }
    let root = crate::workspace_root();
    let cache = root.join("target/vm-cache");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let timeout = Duration::from_secs(args.timeout);

    let mut runs = Vec::new();
    // Wall time per part, printed under the table: under TCG the arm64
    // build and VMs are what a CI budget has to know.
    let mut parts: Vec<String> = Vec::new();
    for arch in Arch::ALL {
        let of_arch: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|target| target.arch() == arch)
            .collect();
        if of_arch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let daemon = match arch {
            Arch::Amd64 => {
                let idlemon = root.join("target/release/idlemon");
                if !idlemon.exists() {
                    bail!(
                        "{} is missing: `cargo xtask vm-test` builds it first; did the build fail?",
                        idlemon.display()
                    );
                }
                Daemon::Binary(idlemon)
            }
            // The arm64 image's own build and files. First: it also adds
            // dpkg's arm64 architecture, which the kernels need.
            Arch::Arm64 => {
                let source = crate::image::Source::read(&root)?;
                Daemon::Rootfs(crate::image::rootfs(
                    &root,
                    &cache.join("image"),
                    crate::image::Platform::Arm64,
                    &source,
                )?)
            }
        };
        let binaries = integration::build(&root, arch)?;
        parts.push(format!(
            "{} daemon and tests {:.0} s",
            arch.name(),
            started.elapsed().as_secs_f64()
        ));
        let started = Instant::now();
        let kernels: Vec<Series> = of_arch
            .iter()
            .filter_map(|target| match target {
                Target::Vm(_, series) => Some(*series),
                Target::Native => None,
            })
            .collect();
        if !kernels.is_empty() {
            let guest = Guest {
                arch,
                daemon: &daemon,
                programs: binaries
                    .iter()
                    .map(|binary| (binary.path.clone(), inside(&binary.name)))
                    .collect(),
                script: integration::script(&kernels, arch, &binaries, daemon.inside(), timeout),
            };
            let (kernels, initrd) = harness::prepare(&cache, &cache, &kernels, &guest)?;
            // The kernels of one architecture boot side by side, one vCPU
            // each: the tests mostly wait on the NAT's timeouts, and the
            // guests' clocks are their own.
            let booted = thread::scope(|scope| {
                let boots: Vec<_> = kernels
                    .iter()
                    .map(|kernel| {
                        let initrd = &initrd;
                        let cache = &cache;
                        scope.spawn(move || {
                            harness::launch(
                                kernel,
                                initrd,
                                cache,
                                timeout,
                                &[],
                                "xtask vm-test",
                                "vm-guest:",
                            )
                        })
                    })
                    .collect();
                boots
                    .into_iter()
                    .map(|boot| {
                        boot.join()
                            .unwrap_or_else(|_| bail!("a VM's supervisor panicked"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            for (kernel, booted) in kernels.iter().zip(&booted) {
                runs.extend(integration::judge_vm(kernel, booted, &binaries));
            }
        }
        if of_arch.contains(&Target::Native) {
            let Daemon::Binary(idlemon) = &daemon else {
                bail!("the native run needs this host's build of idlemon");
            };
            for mode in Mode::ALL {
                runs.push(integration::run_native(&binaries, idlemon, mode, timeout)?);
            }
        }
        parts.push(format!(
            "{} kernels, initramfs and runs {:.0} s",
            arch.name(),
            started.elapsed().as_secs_f64()
        ));
    }
    let (text, passed) = integration::render(&runs);
    println!("\nthe integration tests in each attach mode:\n{text}");
    println!("wall time per part: {}", parts.join("; "));
    if !passed {
        bail!(
            "vm-test failed (table above; consoles and results in {})",
            cache.display()
        );
    }
    Ok(())
}

/// Where a test binary goes in the guest.
pub fn inside(name: &str) -> String {
    format!("/tests/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_means_both_vms_and_native() {
        let targets = |kernel, arch| {
            VmArgs {
                kernel,
                arch,
                timeout: 1,
            }
            .targets()
            .ok()
        };
        let v6_1 = Target::Vm(Arch::Amd64, Series::V6_1);
        let v6_12 = Target::Vm(Arch::Amd64, Series::V6_12);
        let arm64_v6_1 = Target::Vm(Arch::Arm64, Series::V6_1);
        let arm64_v6_12 = Target::Vm(Arch::Arm64, Series::V6_12);
        assert_eq!(
            targets(KernelChoice::All, ArchChoice::Amd64),
            Some(vec![v6_1, v6_12, Target::Native])
        );
        assert_eq!(
            targets(KernelChoice::V6_12, ArchChoice::Amd64),
            Some(vec![v6_12])
        );
        assert_eq!(
            targets(KernelChoice::All, ArchChoice::Arm64),
            Some(vec![arm64_v6_1, arm64_v6_12])
        );
        assert_eq!(
            targets(KernelChoice::V6_1, ArchChoice::All),
            Some(vec![v6_1, arm64_v6_1])
        );
        assert_eq!(
            targets(KernelChoice::All, ArchChoice::All).map(|all| all.len()),
            Some(5)
        );
        // This host is not arm64.
        assert!(
            VmArgs {
                kernel: KernelChoice::Native,
                arch: ArchChoice::Arm64,
                timeout: 1
            }
            .targets()
            .is_err_and(|error| error.to_string().contains("not arm64"))
        );
        // CI: every kernel of both architectures, and native.
        assert_eq!(VmArgs::ci().targets().ok().map(|all| all.len()), Some(5));
    }
}
