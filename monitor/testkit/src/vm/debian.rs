//! Files from Debian's packages, for any architecture dpkg knows: the
//! kernels and tools of the VMs, and the libraries of the container image
//! (`cargo xtask image`). Packages are fetched with `apt-get download` and
//! unpacked with `dpkg-deb -x`; programs are installed with the libraries
//! they need (`DT_NEEDED`, read with readelf), found in the unpacked
//! packages, so that a root file system of another architecture can be
//! laid out on this host.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};

use super::{Arch, capture, run_checked};

/// Installs the Debian packages among `packages` (package, why) that are
/// missing, saying which and why under the `who` prefix; returns how many.
/// Stale package lists are the usual reason an install fails, so a failed
/// install is retried once after `apt-get update`.
pub fn install_packages(who: &str, packages: &[(&str, &str)]) -> anyhow::Result<usize> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(package, _)| !installed(package))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    for (package, why) in packages
        .iter()
        .filter(|(package, _)| missing.contains(package))
    {
        println!("{who}: installing {package}: {why}");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing packages {}: run as root so that apt-get can install them",
            missing.join(" ")
        );
    }
    let install = || {
        run_checked(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_err() {
        run_checked(Command::new("apt-get").args(["update", "-q"]))?;
        install()?;
    }
    Ok(missing.len())
}

/// Whether a Debian package is installed.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|output| {
            String::from_utf8_lossy(&output.stdout).contains("install ok installed")
        })
}

/// Adds dpkg's foreign architecture `arch` when it is missing (and
/// refreshes apt's lists then), so that its packages can be downloaded.
pub fn ensure_architecture(arch: Arch) -> anyhow::Result<()> {
    let native = capture(Command::new("dpkg").arg("--print-architecture"))?;
    if native.trim() == arch.name() {
        return Ok(());
    }
    let foreign = capture(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if !foreign.lines().any(|line| line.trim() == arch.name()) {
        println!(
            "dpkg --add-architecture {} (to download its packages)",
            arch.name()
        );
        run_checked(Command::new("dpkg").args(["--add-architecture", arch.name()]))?;
        run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    }
    Ok(())
}

/// Downloads `packages` (names as apt takes them: `libc6:arm64`) into
/// `dir/debs` and unpacks them all into `dir/root`, which it returns with
/// each package's `name version`. Stale package lists name versions the
/// mirror no longer has: apt's lists are refreshed once then.
pub fn unpack(dir: &Path, packages: &[String]) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let debs = dir.join("debs");
    let root = dir.join("root");
    for stale in [&debs, &root] {
        if stale.exists() {
            fs::remove_dir_all(stale)
                .with_context(|| format!("cannot clear {}", stale.display()))?;
        }
    }
    fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;
    let download = || {
        run_checked(
            Command::new("apt-get")
                // As root into a directory apt's sandbox user cannot write:
                // say so instead of warning about it.
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .args(packages)
                .current_dir(&debs),
        )
    };
    if download().is_err() {
        run_checked(Command::new("apt-get").args(["update", "-q"]))?;
        download().with_context(|| format!("cannot download {}", packages.join(", ")))?;
    }
    let mut files: Vec<PathBuf> = fs::read_dir(&debs)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|extension| extension == "deb"))
        .collect();
    files.sort();
    let mut versions = Vec::new();
    for deb in files {
        run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        let fields = capture(
            Command::new("dpkg-deb")
                .arg("-f")
                .arg(&deb)
                .args(["Package", "Version"]),
        )?;
        versions.push(
            fields
                .lines()
                .filter_map(|line| line.split_once(": ").map(|(_, value)| value.to_owned()))
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    Ok((root, versions))
}

/// Copies `program` (a file on this host) to `inside` under `rootfs`, then
/// its loader and every library it needs, and theirs, from `debian` (an
/// unpacked set of packages of the program's architecture); returns the
/// libraries' names. `missing` says what to do when one is not there.
pub fn install_program(
    debian: &Path,
    rootfs: &Path,
    program: &Path,
    inside: &Path,
    arch: Arch,
    missing: &str,
) -> anyhow::Result<BTreeSet<String>> {
    copy_file(
        program,
        &rootfs.join(inside.strip_prefix("/").unwrap_or(inside)),
    )?;
    let mut installed = BTreeSet::new();
    if let Some(interpreter) = elf_interpreter(program)? {
        install_from(debian, rootfs, Path::new(&interpreter))?;
    }
    let mut pending = elf_needed(program)?;
    while let Some(library) = pending.pop() {
        if !installed.insert(library.clone()) {
            continue;
        }
        // Debian keeps libraries in /lib/TRIPLE or /usr/lib/TRIPLE.
        let candidates =
            ["/lib", "/usr/lib"].map(|dir| Path::new(dir).join(arch.multiarch()).join(&library));
        let path = candidates
            .iter()
            .find(|path| {
                fs::symlink_metadata(debian.join(path.strip_prefix("/").unwrap_or(path))).is_ok()
            })
            .ok_or_else(|| {
                anyhow!(
                    "{} needs {library}, which no unpacked package has: {missing}",
                    program.display()
                )
            })?;
        let file = install_from(debian, rootfs, path)?;
        pending.extend(elf_needed(&file)?);
    }
    Ok(installed)
}

/// Copies `path` (absolute, as in the root file system) from the unpacked
/// packages into `rootfs`, keeping symbolic links as links and copying what
/// they point to; returns the regular file it ends at.
pub fn install_from(debian: &Path, rootfs: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    let source = debian.join(relative);
    let destination = rootfs.join(relative);
    let metadata = fs::symlink_metadata(&source)
        .with_context(|| format!("{} is not in the Debian packages", path.display()))?;
    if let Some(parent) = destination.parent() {
        fs::create_dir_all(parent)?;
    }
    if metadata.file_type().is_symlink() {
        let target = fs::read_link(&source)?;
        if fs::symlink_metadata(&destination).is_err() {
            std::os::unix::fs::symlink(&target, &destination)
                .with_context(|| format!("cannot link {}", destination.display()))?;
        }
        let resolved = if target.is_absolute() {
            target
        } else {
            path.parent().unwrap_or(Path::new("/")).join(target)
        };
        return install_from(debian, rootfs, &resolved);
    }
    copy_file(&source, &destination)?;
    Ok(destination)
}

/// Copies a file, readable by all, executable where the source is.
pub fn copy_file(source: &Path, destination: &Path) -> anyhow::Result<()> {
    if let Some(parent) = destination.parent() {
        fs::create_dir_all(parent)?;
    }
    // A read-only copy from an earlier layout cannot be overwritten in place.
    let _ = fs::remove_file(destination);
    // fs::copy follows symlinks: the file itself is copied.
    fs::copy(source, destination).with_context(|| {
        format!(
            "cannot copy {} to {}",
            source.display(),
            destination.display()
        )
    })?;
    let mode = fs::metadata(source)?.permissions().mode() & 0o755;
    fs::set_permissions(destination, fs::Permissions::from_mode(mode | 0o444))?;
    Ok(())
}

/// The dynamic loader a program names, if it is not static.
pub fn elf_interpreter(binary: &Path) -> anyhow::Result<Option<String>> {
    let program_headers = capture(Command::new("readelf").arg("-lW").arg(binary))?;
    Ok(program_headers.lines().find_map(|line| {
        let (_, rest) = line.split_once("program interpreter: ")?;
        Some(rest.trim_end_matches(']').to_owned())
    }))
}

/// The libraries a program or library needs (`DT_NEEDED`).
pub fn elf_needed(file: &Path) -> anyhow::Result<Vec<String>> {
    let dynamic = capture(Command::new("readelf").arg("-dW").arg(file))?;
    Ok(dynamic
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| {
            let (_, rest) = line.split_once("Shared library: [")?;
            Some(rest.trim_end_matches(']').to_owned())
        })
        .collect())
}

/// A kernel module's `depends=` (its `.modinfo` section, read with readelf).
pub fn module_depends(module: &Path) -> anyhow::Result<Vec<String>> {
    let modinfo = capture(Command::new("readelf").args(["-p", ".modinfo"]).arg(module))?;
    Ok(parse_depends(&modinfo))
}

/// `depends=` out of `readelf -p .modinfo`'s dump.
pub fn parse_depends(modinfo: &str) -> Vec<String> {
    modinfo
        .lines()
        .find_map(|line| line.split_once("]  depends=").map(|(_, list)| list.trim()))
        .map(|list| {
            list.split(',')
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Fails unless `file` is an ELF file for `arch`.
pub fn check_machine(file: &Path, arch: Arch) -> anyhow::Result<()> {
    let header = capture(Command::new("readelf").arg("-h").arg(file))?;
    let machine = header
        .lines()
        .find_map(|line| line.trim().strip_prefix("Machine:").map(str::trim))
        .unwrap_or("(none)");
    if machine != arch.elf_machine() {
        bail!(
            "{} is built for {machine}, not {}",
            file.display(),
            arch.name()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modules_dependencies_come_from_its_modinfo() {
        let dump = "\nString dump of section '.modinfo':\n\
            [     0]  description=Netfilter nftables masquerade expression support\n\
            [    84]  license=GPL\n\
            [    90]  depends=nf_tables,nf_nat,nf_conntrack\n\
            [    cb]  name=nft_masq\n";
        assert_eq!(parse_depends(dump), ["nf_tables", "nf_nat", "nf_conntrack"]);
        assert!(parse_depends("[    90]  depends=\n[    cb]  name=veth\n").is_empty());
        assert!(parse_depends("[    cb]  name=veth\n").is_empty());
    }
}
