//! Debian's cloud kernels, the closest packaged match to EKS AL2023 nodes'
//! 6.1 and 6.12, for amd64 and arm64 (Graviton): found with apt-cache,
//! fetched with `apt-get download`, unpacked with `dpkg -x`, and cached
//! under `target/vm-cache/kernels/`. The arm64 packages need dpkg's arm64
//! architecture, which `cargo xtask image` adds (vm.rs builds the arm64
//! daemon through it before fetching arm64 kernels).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{
    results::{Arch, Target},
    run_checked,
};

fn suffix(arch: Arch) -> String {
    format!("-cloud-{}-unsigned", arch.name())
}

/// A kernel ready to boot.
#[derive(Debug)]
pub struct Kernel {
    pub package: String,
    pub vmlinuz: PathBuf,
    /// `uname -r`: where its modules go in the guest.
    pub release: String,
    /// The modules of `modules()` this kernel does not build in, in that order.
    pub modules: Vec<PathBuf>,
}

/// Packages qemu runs with: (package, why).
const AMD64_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "boots the EKS-like kernels (TCG)"),
    ("busybox-static", "the guest's shell, mount and ip"),
    ("cpio", "packs the guest's initramfs"),
];
const ARM64_PACKAGES: &[(&str, &str)] = &[
    (
        "qemu-system-arm",
        "boots the arm64 (Graviton-like) kernels (qemu-system-aarch64, TCG)",
    ),
    ("cpio", "packs the guest's initramfs"),
    (
        "xz-utils",
        "unpacks the 6.12 arm64 kernel's compressed modules",
    ),
];

/// Installs qemu and cpio (and for amd64 busybox) when missing, saying what and why.
pub fn ensure_packages(arch: Arch) -> anyhow::Result<()> {
    let packages = match arch {
        Arch::Amd64 => AMD64_PACKAGES,
        Arch::Arm64 => ARM64_PACKAGES,
    };
    crate::setup::install_packages("xtask vm-test", packages).map(|_| ())
}

/// The modules the guest loads, in dependency order, under the package's
/// `lib/modules/RELEASE/kernel/`. qemu's arm64 `virt` machine has one UART,
/// the console; the results go over a virtio console (`/dev/hvc0`), which
/// Debian's arm64 cloud kernels build partly as modules: 6.1 all four
/// (plain `.ko`), 6.12 only virtio_mmio (`.ko.xz`; the others are in its
/// `modules.builtin`). The amd64 guests use a second UART and load nothing.
pub fn modules(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Amd64 => &[],
        Arch::Arm64 => &[
            "drivers/virtio/virtio_ring.ko",
            "drivers/virtio/virtio.ko",
            "drivers/virtio/virtio_mmio.ko",
            "drivers/char/virtio_console.ko",
        ],
    }
}

/// Lists the modules a cached kernel's guest loads, in order (file names
/// under `modules/`), one a line.
const MODULE_ORDER: &str = "order";

/// What a Debian cloud kernel package name says about its version, when it
/// belongs to `target`'s series: `linux-image-6.1.0-56-cloud-amd64-unsigned`
/// -> [56]; `linux-image-6.12.117+deb12-cloud-amd64-unsigned` -> [117, 12].
pub fn version_key(target: Target, package: &str) -> Option<Vec<u64>> {
    let middle = package
        .strip_prefix("linux-image-")?
        .strip_suffix(&suffix(target.arch()))?;
    let numbers = |text: &str| -> Option<u64> {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse().ok())
            .flatten()
    };
    match target {
        Target::V6_1 | Target::Arm64V6_1 => Some(vec![numbers(middle.strip_prefix("6.1.0-")?)?]),
        Target::V6_12 | Target::Arm64V6_12 => {
            let (patch, debian) = middle.strip_prefix("6.12.")?.split_once("+deb")?;
            Some(vec![numbers(patch)?, numbers(debian)?])
        }
        Target::Native => None,
    }
}

/// The newest package of `target`'s series among apt-cache search output lines.
pub fn newest(target: Target, search_output: &str) -> Option<String> {
    search_output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|package| Some((version_key(target, package)?, package)))
        .max()
        .map(|(_, package)| package.to_owned())
}

fn pattern(target: Target) -> String {
    let series = match target.series() {
        "6.1" => "6.1.0-*",
        "6.12" => "6.12.*",
        _ => return String::new(),
    };
    format!("linux-image-{series}{}", suffix(target.arch()))
}

fn search(arch: Arch) -> anyhow::Result<String> {
    let output = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            &format!("^linux-image-6\\..*{}$", suffix(arch)),
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run apt-cache (vm-test needs Debian's apt to find kernels)")?;
    if !output.status.success() {
        bail!("apt-cache search failed ({})", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The cached kernel of a package: its `boot/vmlinuz-*` and the modules
/// the guest loads.
fn cached(target: Target, package: &str, dir: &Path) -> Option<Kernel> {
    let vmlinuz = fs::read_dir(dir.join("boot"))
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("vmlinuz-"))
        })?;
    let release = vmlinuz
        .file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")?
        .to_owned();
    let modules: Vec<PathBuf> = if modules(target.arch()).is_empty() {
        Vec::new()
    } else {
        fs::read_to_string(dir.join("modules").join(MODULE_ORDER))
            .ok()?
            .lines()
            .map(|name| dir.join("modules").join(name))
            .collect()
    };
    if !modules.iter().all(|module| module.exists()) {
        return None;
    }
    Some(Kernel {
        package: package.to_owned(),
        vmlinuz,
        release,
        modules,
    })
}

/// The newest cached kernel of the series, for when apt knows none.
fn newest_cached(target: Target, kernels: &Path) -> Option<Kernel> {
    let names: Vec<String> = fs::read_dir(kernels)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    let package = newest(target, &names.join("\n"))?;
    cached(target, &package, &kernels.join(&package))
}

/// The newest kernel of the series, from the cache when it is there.
/// `apt_updated` makes the whole run refresh apt's lists at most once.
pub fn fetch(target: Target, cache: &Path, apt_updated: &mut bool) -> anyhow::Result<Kernel> {
    let kernels = cache.join("kernels");
    let mut package = newest(target, &search(target.arch())?);
    if package.is_none() && !*apt_updated {
        println!(
            "xtask vm-test: apt knows no {}: running apt-get update",
            pattern(target)
        );
        run_checked(Command::new("apt-get").args(["update", "-q"]))?;
        *apt_updated = true;
        package = newest(target, &search(target.arch())?);
    }
    let Some(package) = package else {
        if let Some(kernel) = newest_cached(target, &kernels) {
            println!(
                "xtask vm-test: apt knows no {}; using the cached {}",
                pattern(target),
                kernel.package
            );
            return Ok(kernel);
        }
        bail!(
            "no package {} in apt's sources: vm-test needs Debian bookworm's security suite \
             (bookworm-security carries both the 6.1 and the 6.12 cloud kernels)",
            pattern(target)
        );
    };
    let dir = kernels.join(&package);
    if let Some(kernel) = cached(target, &package, &dir) {
        println!(
            "xtask vm-test: {} kernel {package} (cached)",
            target.label()
        );
        return Ok(kernel);
    }
    println!(
        "xtask vm-test: {} kernel {package}: downloading",
        target.label()
    );
    let arch = target.arch();
    if let Err(error) = download(&package, arch, cache, &dir) {
        if *apt_updated {
            return Err(error.context(format!("cannot fetch {package}")));
        }
        // The lists may name a version the mirror no longer has.
        println!("xtask vm-test: {error:#}; running apt-get update and trying again");
        run_checked(Command::new("apt-get").args(["update", "-q"]))?;
        *apt_updated = true;
        download(&package, arch, cache, &dir).with_context(|| format!("cannot fetch {package}"))?;
    }
    cached(target, &package, &dir).with_context(|| {
        format!("{package} unpacked without a boot/vmlinuz-*: is it a kernel image package?")
    })
}

/// Downloads `package` of `arch` and unpacks it into `dir`: what `cached` finds.
fn download(package: &str, arch: Arch, cache: &Path, dir: &Path) -> anyhow::Result<()> {
    let staging = cache.join("download");
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot clear {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    run_checked(
        Command::new("apt-get")
            // As root, apt would otherwise drop to _apt, which cannot write here.
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{package}:{}", arch.name()))
            .current_dir(&staging),
    )?;
    let deb = fs::read_dir(&staging)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|extension| extension == "deb"))
        .with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                staging.display()
            )
        })?;
    let unpacked = staging.join("root");
    run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    // Only the kernel boots, with the few modules of `modules`: the others
    // (netfilter and such) are not needed on loopback, and they are most of
    // the package's size.
    let keep = staging.join("keep");
    fs::create_dir_all(keep.join("modules"))?;
    fs::rename(unpacked.join("boot"), keep.join("boot"))
        .with_context(|| format!("{} has no boot/ directory", deb.display()))?;
    if !modules(arch).is_empty() {
        let release = fs::read_dir(unpacked.join("lib/modules"))
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.is_dir())
            .with_context(|| format!("{} has no lib/modules/RELEASE/", deb.display()))?;
        let order = keep_modules(arch, &release, &keep.join("modules"))
            .with_context(|| format!("in {}", deb.display()))?;
        fs::write(keep.join("modules").join(MODULE_ORDER), order)?;
    }
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    // Renamed into place last, so that an interrupted download is never taken for a cached one.
    fs::rename(&keep, dir)
        .with_context(|| format!("cannot move the kernel to {}", dir.display()))?;
    fs::remove_dir_all(&staging).with_context(|| format!("cannot clear {}", staging.display()))?;
    Ok(())
}

/// Copies the modules of `modules(arch)` that `release` (an unpacked
/// `lib/modules/RELEASE/`) does not build in into `into`, unpacking `.ko.xz`;
/// returns their file names in order, one a line.
fn keep_modules(arch: Arch, release: &Path, into: &Path) -> anyhow::Result<String> {
    let builtin = fs::read_to_string(release.join("modules.builtin")).unwrap_or_default();
    let mut order = String::new();
    for module in modules(arch) {
        let path = release.join("kernel").join(module);
        let name = module.rsplit('/').next().unwrap_or(module);
        let compressed = path.with_extension("ko.xz");
        if path.exists() {
            fs::rename(&path, into.join(name))
                .with_context(|| format!("cannot keep {}", path.display()))?;
        } else if compressed.exists() {
            // busybox's insmod takes plain modules only.
            let output = fs::File::create(into.join(name))?;
            run_checked(
                Command::new("xz")
                    .args(["-d", "-c"])
                    .arg(&compressed)
                    .stdout(output),
            )?;
        } else if builtin
            .lines()
            .any(|line| line.trim() == format!("kernel/{module}"))
        {
            continue;
        } else {
            bail!("no module {module} (.ko or .ko.xz), and modules.builtin does not list it");
        }
        order.push_str(name);
        order.push('\n');
    }
    Ok(order)
}

/// busybox for arm64 guests: Debian's `busybox-static:arm64`, downloaded
/// and unpacked once into `cache/busybox-arm64/`. (amd64 guests get the
/// host's own, which `ensure_packages` installs.)
pub fn arm64_busybox(cache: &Path) -> anyhow::Result<PathBuf> {
    let dir = cache.join("busybox-arm64");
    let busybox = dir.join("bin/busybox");
    if busybox.exists() {
        return Ok(busybox);
    }
    let staging = cache.join("download-busybox");
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot clear {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    println!("xtask vm-test: downloading busybox-static:arm64 (the arm64 guest's shell)");
    let download = || {
        run_checked(
            Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .arg("busybox-static:arm64")
                .current_dir(&staging),
        )
    };
    if download().is_err() {
        run_checked(Command::new("apt-get").args(["update", "-q"]))?;
        download()?;
    }
    let deb = fs::read_dir(&staging)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|extension| extension == "deb"))
        .context("apt-get download busybox-static:arm64 left no .deb")?;
    let unpacked = staging.join("root");
    run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    let found = ["usr/bin/busybox", "bin/busybox"]
        .iter()
        .map(|path| unpacked.join(path))
        .find(|path| path.exists())
        .with_context(|| format!("{} has no bin/busybox", deb.display()))?;
    fs::create_dir_all(busybox.parent().context("busybox directory")?)?;
    fs::rename(&found, &busybox)
        .with_context(|| format!("cannot move busybox to {}", busybox.display()))?;
    fs::remove_dir_all(&staging).with_context(|| format!("cannot clear {}", staging.display()))?;
    Ok(busybox)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEARCH: &str = "\
linux-image-6.1.0-9-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-56-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-55-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-56-cloud-amd64-dbg - debug symbols
linux-image-6.12.9+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.117+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.115+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.10.1+deb12-cloud-amd64-unsigned - not ours
";

    #[test]
    fn picks_the_newest_of_each_series() {
        assert_eq!(
            newest(Target::V6_1, SEARCH).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        assert_eq!(
            newest(Target::V6_12, SEARCH).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64-unsigned")
        );
        assert_eq!(newest(Target::V6_12, "nothing here"), None);
        // amd64 packages are not arm64 kernels, and the other way round.
        assert_eq!(newest(Target::Arm64V6_1, SEARCH), None);
        let arm64 = "linux-image-6.1.0-57-cloud-arm64-unsigned - Linux 6.1 for arm64 cloud\n\
                     linux-image-6.12.118+deb12-cloud-arm64-unsigned - Linux 6.12 for arm64 cloud\n";
        assert_eq!(
            newest(Target::Arm64V6_1, arm64).as_deref(),
            Some("linux-image-6.1.0-57-cloud-arm64-unsigned")
        );
        assert_eq!(
            newest(Target::Arm64V6_12, arm64).as_deref(),
            Some("linux-image-6.12.118+deb12-cloud-arm64-unsigned")
        );
        assert_eq!(newest(Target::V6_12, arm64), None);
        assert_eq!(
            pattern(Target::Arm64V6_12),
            "linux-image-6.12.*-cloud-arm64-unsigned"
        );
    }

    /// 6.1 ships all four as plain modules, 6.12 builds three in.
    #[test]
    fn keeps_the_modules_a_kernel_does_not_build_in() {
        let dir = std::env::temp_dir().join(format!("idlemon-modules-{}", std::process::id()));
        let release = dir.join("6.12.1-cloud-arm64");
        let into = dir.join("kept");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(release.join("kernel/drivers/virtio")).expect("mkdir");
        fs::create_dir_all(&into).expect("mkdir");
        fs::write(release.join("kernel/drivers/virtio/virtio_mmio.ko"), "mmio").expect("write");
        fs::write(
            release.join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n",
        )
        .expect("write");
        // virtio_console is neither shipped nor built in.
        let missing = keep_modules(Arch::Arm64, &release, &into);
        assert!(
            missing.is_err_and(|error| error.to_string().contains("virtio_console")),
            "a missing module must be named"
        );
        fs::write(
            release.join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/char/virtio_console.ko\n",
        )
        .expect("write");
        fs::write(release.join("kernel/drivers/virtio/virtio_mmio.ko"), "mmio").expect("write");
        let order = keep_modules(Arch::Arm64, &release, &into).expect("kept");
        assert_eq!(order, "virtio_mmio.ko\n");
        assert_eq!(
            fs::read_to_string(into.join("virtio_mmio.ko"))
                .ok()
                .as_deref(),
            Some("mmio")
        );
        assert_eq!(
            keep_modules(Arch::Amd64, &release, &into).ok().as_deref(),
            Some("")
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_versions_numerically() {
        assert_eq!(
            version_key(Target::V6_1, "linux-image-6.1.0-9-cloud-amd64-unsigned"),
            Some(vec![9])
        );
        assert_eq!(
            version_key(
                Target::V6_12,
                "linux-image-6.12.117+deb13-cloud-amd64-unsigned"
            ),
            Some(vec![117, 13])
        );
        assert_eq!(
            version_key(
                Target::V6_1,
                "linux-image-6.12.1+deb12-cloud-amd64-unsigned"
            ),
            None
        );
        assert_eq!(
            version_key(Target::V6_1, "linux-image-6.1.0-x-cloud-amd64-unsigned"),
            None
        );
        assert_eq!(
            version_key(Target::Native, "linux-image-6.1.0-9-cloud-amd64-unsigned"),
            None
        );
    }
}
