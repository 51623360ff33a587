//! Debian's cloud kernels: found with apt-cache, fetched with `apt-get
//! download`, unpacked with `dpkg-deb -x`, and cached under
//! `cache/kernels/PACKAGE/`: the kernel, and the modules the guest loads
//! (with the modules they depend on), unpacked and in load order.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{Arch, Series, debian, run_checked};

fn suffix(arch: Arch) -> String {
    format!("-cloud-{}-unsigned", arch.name())
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub arch: Arch,
    pub series: Series,
    pub package: String,
    pub vmlinuz: PathBuf,
    /// `uname -r`: where its modules go in the guest.
    pub release: String,
    /// The modules of `modules()` this kernel does not build in, and what
    /// they depend on, in load order.
    pub modules: Vec<PathBuf>,
}

impl Kernel {
    /// Unique among kernels: file names and progress lines (`6.1`, `arm64-6.12`).
    pub fn label(&self) -> String {
        label(self.arch, self.series)
    }
}

pub fn label(arch: Arch, series: Series) -> String {
    match arch {
        Arch::Amd64 => series.name().to_owned(),
        Arch::Arm64 => format!("arm64-{}", series.name()),
    }
}

/// The modules the guest loads (their dependencies come along):
/// - what the integration tests' network namespaces use: veth pairs, and the
///   NAT gateway's nftables rules (masquerade, conntrack state, reject with
///   a reset), which Debian's cloud kernels build as modules;
/// - on arm64, the virtio console the results go over (`/dev/hvc0`): qemu's
///   arm64 `virt` machine has one UART, the console. 6.1 builds it as
///   modules, 6.12 mostly in.
pub fn modules(arch: Arch) -> Vec<&'static str> {
    let mut modules = vec![
        "veth",
        "nf_tables",
        "nft_chain_nat",
        "nft_masq",
        "nft_ct",
        "nft_reject_inet",
    ];
    if arch == Arch::Arm64 {
        modules.extend(["virtio_mmio", "virtio_console"]);
    }
    modules
}

/// Names the modules a cached kernel's guest loads, in order, one a line.
/// (A cache of an older layout has none, and is fetched again.)
const MODULE_ORDER: &str = "load-order";

/// What a Debian cloud kernel package name says about its version, when it
/// belongs to the series: `linux-image-6.1.0-56-cloud-amd64-unsigned` ->
/// [56]; `linux-image-6.12.117+deb12-cloud-amd64-unsigned` -> [117, 12].
pub fn version_key(arch: Arch, series: Series, package: &str) -> Option<Vec<u64>> {
    let middle = package
        .strip_prefix("linux-image-")?
        .strip_suffix(&suffix(arch))?;
    let numbers = |text: &str| -> Option<u64> {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse().ok())
            .flatten()
    };
    match series {
        Series::V6_1 => Some(vec![numbers(middle.strip_prefix("6.1.0-")?)?]),
        Series::V6_12 => {
            let (patch, debian) = middle.strip_prefix("6.12.")?.split_once("+deb")?;
            Some(vec![numbers(patch)?, numbers(debian)?])
        }
    }
}

/// The newest package of the series among apt-cache search output lines.
pub fn newest(arch: Arch, series: Series, search_output: &str) -> Option<String> {
    search_output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|package| Some((version_key(arch, series, package)?, package)))
        .max()
        .map(|(_, package)| package.to_owned())
}

fn pattern(arch: Arch, series: Series) -> String {
    let series = match series {
        Series::V6_1 => "6.1.0-*",
        Series::V6_12 => "6.12.*",
    };
    format!("linux-image-{series}{}", suffix(arch))
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
        .context("cannot run apt-cache (the VMs need Debian's apt to find kernels)")?;
    if !output.status.success() {
        bail!("apt-cache search failed ({})", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The cached kernel of a package: its `boot/vmlinuz-*` and the modules
/// the guest loads.
fn cached(arch: Arch, series: Series, package: &str, dir: &Path) -> Option<Kernel> {
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
    let modules: Vec<PathBuf> = fs::read_to_string(dir.join("modules").join(MODULE_ORDER))
        .ok()?
        .lines()
        .map(|name| dir.join("modules").join(name))
        .collect();
    if !modules.iter().all(|module| module.exists()) {
        return None;
    }
    Some(Kernel {
        arch,
        series,
        package: package.to_owned(),
        vmlinuz,
        release,
        modules,
    })
}

/// The newest cached kernel of the series, for when apt knows none.
fn newest_cached(arch: Arch, series: Series, kernels: &Path) -> Option<Kernel> {
    let names: Vec<String> = fs::read_dir(kernels)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    let package = newest(arch, series, &names.join("\n"))?;
    cached(arch, series, &package, &kernels.join(&package))
}

/// The newest kernel of the series, from the cache when it is there.
/// `apt_updated` makes the whole run refresh apt's lists at most once.
pub fn fetch(
    arch: Arch,
    series: Series,
    cache: &Path,
    apt_updated: &mut bool,
) -> anyhow::Result<Kernel> {
    let kernels = cache.join("kernels");
    let label = label(arch, series);
    let mut package = newest(arch, series, &search(arch)?);
    if package.is_none() && !*apt_updated {
        println!(
            "vm: apt knows no {}: running apt-get update",
            pattern(arch, series)
        );
        run_checked(Command::new("apt-get").args(["update", "-q"]))?;
        *apt_updated = true;
        package = newest(arch, series, &search(arch)?);
    }
    let Some(package) = package else {
        if let Some(kernel) = newest_cached(arch, series, &kernels) {
            println!(
                "vm: apt knows no {}; using the cached {}",
                pattern(arch, series),
                kernel.package
            );
            return Ok(kernel);
        }
        bail!(
            "no package {} in apt's sources: the VMs need Debian bookworm's security suite \
             (bookworm-security carries both the 6.1 and the 6.12 cloud kernels)",
            pattern(arch, series)
        );
    };
    let dir = kernels.join(&package);
    if let Some(kernel) = cached(arch, series, &package, &dir) {
        println!("vm: {label} kernel {package} (cached)");
        return Ok(kernel);
    }
    println!("vm: {label} kernel {package}: downloading");
    download(&package, arch, cache, &dir)?;
    *apt_updated = true;
    cached(arch, series, &package, &dir).with_context(|| {
        format!("{package} unpacked without a boot/vmlinuz-*: is it a kernel image package?")
    })
}

/// Downloads `package` of `arch` and unpacks it into `dir`: what `cached` finds.
fn download(package: &str, arch: Arch, cache: &Path, dir: &Path) -> anyhow::Result<()> {
    let staging = cache.join("download");
    let (unpacked, _) = debian::unpack(&staging, &[format!("{package}:{}", arch.name())])?;
    // Only the kernel boots, with the modules of `modules` and theirs: the
    // others are most of the package's size.
    let keep = staging.join("keep");
    fs::create_dir_all(keep.join("modules"))?;
    fs::rename(unpacked.join("boot"), keep.join("boot"))
        .with_context(|| format!("{package} has no boot/ directory"))?;
    let release = fs::read_dir(unpacked.join("lib/modules"))
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.is_dir())
        .with_context(|| format!("{package} has no lib/modules/RELEASE/"))?;
    let order = keep_modules(arch, &release, &keep.join("modules"))
        .with_context(|| format!("in {package}"))?;
    fs::write(keep.join("modules").join(MODULE_ORDER), order)?;
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

/// A module's name from its file: `nf_conntrack.ko.xz` -> `nf_conntrack`
/// (the kernel treats `-` and `_` in names alike).
fn module_name(file: &Path) -> Option<String> {
    let name = file.file_name()?.to_str()?;
    let stem = name
        .strip_suffix(".ko.xz")
        .or_else(|| name.strip_suffix(".ko"))?;
    Some(stem.replace('-', "_"))
}

/// Every module file under `dir`, by name.
fn index(dir: &Path, found: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index(&path, found)?;
        } else if let Some(name) = module_name(&path) {
            found.insert(name, path);
        }
    }
    Ok(())
}

/// Copies the modules of `modules(arch)` that `release` (an unpacked
/// `lib/modules/RELEASE/`) does not build in, and those they depend on
/// (their `depends=`), into `into`, unpacking `.ko.xz` (busybox's insmod
/// takes plain modules only); returns their file names in load order, one
/// a line.
fn keep_modules(arch: Arch, release: &Path, into: &Path) -> anyhow::Result<String> {
    let builtin: Vec<String> = fs::read_to_string(release.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| module_name(Path::new(line.trim())))
        .collect();
    let mut files = BTreeMap::new();
    index(&release.join("kernel"), &mut files)?;
    let mut order = Vec::new();
    for module in modules(arch) {
        visit(module, &builtin, &files, into, &mut order, 0)?;
    }
    Ok(order.iter().map(|name| format!("{name}.ko\n")).collect())
}

/// Depth-first: a module's dependencies before it.
fn visit(
    name: &str,
    builtin: &[String],
    files: &BTreeMap<String, PathBuf>,
    into: &Path,
    order: &mut Vec<String>,
    depth: usize,
) -> anyhow::Result<()> {
    let name = name.replace('-', "_");
    if order.contains(&name) || builtin.contains(&name) {
        return Ok(());
    }
    if depth > 32 {
        bail!("module dependencies deeper than 32 at {name}: a cycle?");
    }
    let Some(source) = files.get(&name) else {
        bail!("no module {name} (.ko or .ko.xz), and modules.builtin does not list it");
    };
    let kept = into.join(format!("{name}.ko"));
    if source
        .extension()
        .is_some_and(|extension| extension == "xz")
    {
        let output = fs::File::create(&kept)?;
        run_checked(
            Command::new("xz")
                .args(["-d", "-c"])
                .arg(source)
                .stdout(output),
        )?;
    } else {
        fs::copy(source, &kept).with_context(|| format!("cannot keep {}", source.display()))?;
    }
    for dependency in debian::module_depends(&kept)? {
        visit(&dependency, builtin, files, into, order, depth + 1)?;
    }
    order.push(name);
    Ok(())
}

/// busybox for arm64 guests: Debian's `busybox-static:arm64`, downloaded
/// and unpacked once into `cache/busybox-arm64/`. (amd64 guests get the
/// host's own.)
pub fn arm64_busybox(cache: &Path) -> anyhow::Result<PathBuf> {
    let busybox = cache.join("busybox-arm64/bin/busybox");
    if busybox.exists() {
        return Ok(busybox);
    }
    println!("vm: downloading busybox-static:arm64 (the arm64 guest's shell)");
    let staging = cache.join("download-busybox");
    let (unpacked, _) = debian::unpack(&staging, &["busybox-static:arm64".to_owned()])?;
    let found = ["usr/bin/busybox", "bin/busybox"]
        .iter()
        .map(|path| unpacked.join(path))
        .find(|path| path.exists())
        .context("busybox-static:arm64 has no bin/busybox")?;
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
        use {Arch::*, Series::*};
        assert_eq!(
            newest(Amd64, V6_1, SEARCH).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        assert_eq!(
            newest(Amd64, V6_12, SEARCH).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64-unsigned")
        );
        assert_eq!(newest(Amd64, V6_12, "nothing here"), None);
        // amd64 packages are not arm64 kernels, and the other way round.
        assert_eq!(newest(Arm64, V6_1, SEARCH), None);
        let arm64 = "linux-image-6.1.0-57-cloud-arm64-unsigned - Linux 6.1 for arm64 cloud\n\
                     linux-image-6.12.118+deb12-cloud-arm64-unsigned - Linux 6.12 for arm64 cloud\n";
        assert_eq!(
            newest(Arm64, V6_1, arm64).as_deref(),
            Some("linux-image-6.1.0-57-cloud-arm64-unsigned")
        );
        assert_eq!(
            newest(Arm64, V6_12, arm64).as_deref(),
            Some("linux-image-6.12.118+deb12-cloud-arm64-unsigned")
        );
        assert_eq!(newest(Amd64, V6_12, arm64), None);
        assert_eq!(
            pattern(Arm64, V6_12),
            "linux-image-6.12.*-cloud-arm64-unsigned"
        );
    }

    #[test]
    fn reads_versions_numerically() {
        use {Arch::*, Series::*};
        assert_eq!(
            version_key(Amd64, V6_1, "linux-image-6.1.0-9-cloud-amd64-unsigned"),
            Some(vec![9])
        );
        assert_eq!(
            version_key(
                Amd64,
                V6_12,
                "linux-image-6.12.117+deb13-cloud-amd64-unsigned"
            ),
            Some(vec![117, 13])
        );
        assert_eq!(
            version_key(Amd64, V6_1, "linux-image-6.12.1+deb12-cloud-amd64-unsigned"),
            None
        );
        assert_eq!(
            version_key(Amd64, V6_1, "linux-image-6.1.0-x-cloud-amd64-unsigned"),
            None
        );
    }

    #[test]
    fn module_names_drop_the_extension_and_dashes() {
        assert_eq!(
            module_name(Path::new("kernel/net/netfilter/nf_conntrack.ko.xz")).as_deref(),
            Some("nf_conntrack")
        );
        assert_eq!(
            module_name(Path::new("kernel/drivers/char/virtio-console.ko")).as_deref(),
            Some("virtio_console")
        );
        assert_eq!(module_name(Path::new("modules.builtin")), None);
    }

    /// A module neither shipped nor built in is named; a built-in one is skipped.
    #[test]
    fn a_missing_module_is_named_and_built_in_ones_are_skipped() {
        let dir = std::env::temp_dir().join(format!("idlemon-modules-{}", std::process::id()));
        let into = dir.join("kept");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&into).expect("mkdir");
        let builtin = vec!["veth".to_owned()];
        let mut order = Vec::new();
        visit("veth", &builtin, &BTreeMap::new(), &into, &mut order, 0).expect("built in");
        assert!(order.is_empty());
        let missing = visit("nft_ct", &builtin, &BTreeMap::new(), &into, &mut order, 0);
        assert!(missing.is_err_and(|error| error.to_string().contains("nft_ct")));
        let _ = fs::remove_dir_all(&dir);
    }
}
