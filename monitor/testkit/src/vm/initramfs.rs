//! The guest's whole root file system, as a gzipped cpio (newc) archive:
//! busybox, the /init script, idlemon, the tools the integration tests call
//! (`ip` from iproute2, `nft` from nftables, `bpftool`, from Debian's
//! packages of the guest's architecture), the caller's programs, every library these
//! need, and each kernel's modules under its release. One archive per
//! architecture serves every kernel of it.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{Arch, Kernel, debian, kernels, run_checked};

/// Where busybox-static installs it (Debian merged /usr: both work).
const BUSYBOX: [&str; 2] = ["/usr/bin/busybox", "/bin/busybox"];

/// The Debian packages the guest's tools and programs take files from:
/// the C library and libgcc (the programs'), iproute2, nftables and
/// bpftool, and the libraries `ip`, `nft` and `bpftool` need.
const PACKAGES: &[&str] = &[
    "libc6",
    "libgcc-s1",
    "iproute2",
    "nftables",
    "bpftool",
    "libnftables1",
    "libnftnl11",
    "libmnl0",
    "libxtables12",
    "libjansson4",
    "libgmp10",
    "libedit2",
    "libtinfo6",
    "libbsd0",
    "libmd0",
    "libbpf1",
    "libelf1",
    "libcap2",
    "zlib1g",
];

/// The tools: (file in their package, where the guest has them). Ahead of
/// busybox's applets of the same name on the guest's PATH.
const TOOLS: &[(&str, &str)] = &[
    ("bin/ip", "/usr/local/sbin/ip"),
    ("usr/sbin/nft", "/usr/local/sbin/nft"),
    ("usr/sbin/bpftool", "/usr/local/sbin/bpftool"),
];

/// The daemon under test.
pub enum Daemon {
    /// A binary built for the guest's architecture: it goes in as `/idlemon`.
    Binary(PathBuf),
    /// The root file system of an image platform, as `cargo xtask image`
    /// lays it out: `/usr/bin/idlemon` with its loader and libraries,
    /// copied whole.
    Rootfs(PathBuf),
}

impl Daemon {
    /// Where the daemon is inside the guest.
    pub fn inside(&self) -> &'static str {
        match self {
            Self::Binary(_) => "/idlemon",
            Self::Rootfs(_) => "/usr/bin/idlemon",
        }
    }
}

/// What one architecture's guest runs.
pub struct Guest<'a> {
    pub arch: Arch,
    pub daemon: &'a Daemon,
    /// Further programs for the guest's architecture: (file on this host,
    /// path inside). They go in stripped, with their libraries.
    pub programs: Vec<(PathBuf, String)>,
    /// sh lines /init runs once the guest is set up; their standard output
    /// goes to the host's results file, their standard error to the console.
    pub script: String,
}

/// Where the guest's script writes: a port of its own.
pub fn results_tty(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "/dev/ttyS1",
        Arch::Arm64 => "/dev/hvc0",
    }
}

/// Builds `work/initramfs-ARCH.cpio.gz` and returns its path.
pub fn build(
    cache: &Path,
    work: &Path,
    guest: &Guest,
    kernels: &[Kernel],
) -> anyhow::Result<PathBuf> {
    let arch = guest.arch;
    let root = work.join(format!("initramfs-{}", arch.name()));
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("cannot clear {}", root.display()))?;
    }
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc", "var",
    ] {
        fs::create_dir_all(root.join(dir))
            .with_context(|| format!("cannot create {}", root.join(dir).display()))?;
    }
    // ip keeps its named network namespaces in /var/run/netns.
    std::os::unix::fs::symlink("/run", root.join("var/run"))?;
    let busybox = match arch {
        Arch::Amd64 => BUSYBOX
            .iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
            .context("no /bin/busybox: install busybox-static")?,
        Arch::Arm64 => kernels::arm64_busybox(cache)?,
    };
    debian::copy_file(&busybox, &root.join("bin/busybox"))?;
    let debian = tool_packages(cache, arch)?;
    let missing = format!("add the package that has it to PACKAGES in {}", file!());
    match guest.daemon {
        Daemon::Binary(idlemon) => {
            debian::check_machine(idlemon, arch)?;
            debian::install_program(
                &debian,
                &root,
                idlemon,
                Path::new("/idlemon"),
                arch,
                &missing,
            )?;
        }
        Daemon::Rootfs(rootfs) => {
            let mut source = rootfs.as_os_str().to_owned();
            source.push("/.");
            // -a: the loader's and libraries' links stay links.
            run_checked(Command::new("cp").arg("-a").arg(source).arg(&root))?;
        }
    }
    for (tool, inside) in TOOLS {
        debian::install_program(
            &debian,
            &root,
            &debian.join(tool),
            Path::new(inside),
            arch,
            &missing,
        )?;
    }
    for (program, inside) in &guest.programs {
        debian::check_machine(program, arch)?;
        debian::install_program(&debian, &root, program, Path::new(inside), arch, &missing)?;
        // Test binaries carry hundreds of megabytes of debug information,
        // which the guest would unpack for nothing.
        let copied = root.join(inside.trim_start_matches('/'));
        run_checked(Command::new(arch.strip()).arg("--strip-debug").arg(&copied))
            .with_context(|| format!("cannot strip {}", copied.display()))?;
    }
    for kernel in kernels {
        let dir = root.join("lib/modules").join(&kernel.release);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut order = String::new();
        for module in &kernel.modules {
            let name = module.file_name().context("module file name")?;
            debian::copy_file(module, &dir.join(name))?;
            order.push_str(&name.to_string_lossy());
            order.push('\n');
        }
        fs::write(dir.join("order"), order)
            .with_context(|| format!("cannot write {}/order", dir.display()))?;
    }
    let init = root.join("init");
    fs::write(&init, init_script(&guest.script, arch))
        .with_context(|| format!("cannot write {}", init.display()))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", init.display()))?;
    pack(&root, &work.join(format!("initramfs-{}.cpio", arch.name())))
}

/// The packages of `PACKAGES` for `arch`, unpacked once into
/// `cache/guest-ARCH/root` (again when the list changes).
fn tool_packages(cache: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let dir = cache.join(format!("guest-{}", arch.name()));
    let names: Vec<String> = PACKAGES
        .iter()
        .map(|package| format!("{package}:{}", arch.name()))
        .collect();
    let stamp = dir.join("packages");
    let root = dir.join("root");
    if fs::read_to_string(&stamp).is_ok_and(|listed| listed == names.join("\n")) && root.exists() {
        return Ok(root);
    }
    let (root, versions) = debian::unpack(&dir, &names)?;
    println!(
        "vm: {} guest tools from Debian {}",
        arch.name(),
        versions.join(", ")
    );
    fs::write(&stamp, names.join("\n"))?;
    Ok(root)
}

/// The guest's /init: mounts what idlemon and the tests need, loads each
/// kernel's modules, runs `script` with its output on the results port,
/// powers off.
pub fn init_script(script: &str, arch: Arch) -> String {
    let tty = results_tty(arch);
    format!(
        r#"#!/bin/busybox sh
# Written by the VM harness (idlemon-testkit's vm/initramfs.rs).
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# aya attaches classic tracepoints through tracefs.
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf || true
mount -t cgroup2 cgroup2 /sys/fs/cgroup || true
# The modules this kernel does not build in, dependencies first
# (vm/kernels.rs): veth and netfilter; on arm64 the results' virtio console.
for module in $(cat /lib/modules/$(uname -r)/order); do
    insmod /lib/modules/$(uname -r)/$module || echo "vm-guest: insmod $module failed"
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e {tty} ] && break; sleep 1; done
# {tty} carries the results to the host: raw, so that they arrive byte for byte.
stty -F {tty} raw -echo
ip link set lo up
echo "vm-guest: init reached, kernel $(uname -r)"
cd /tmp
(
{script}
) > {tty}
echo "vm-guest: script exited with status $?"
sync
# Power off: qemu runs with -no-reboot and exits.
echo o > /proc/sysrq-trigger
sleep 60
"#
    )
}

/// cpio newc with every file owned by root, then gzip: what the kernel unpacks.
fn pack(root: &Path, archive: &Path) -> anyhow::Result<PathBuf> {
    let mut entries = Vec::new();
    list(root, root, &mut entries)?;
    entries.sort();
    let list_file = root.with_extension("list");
    fs::write(&list_file, entries.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", list_file.display()))?;
    let output = fs::File::create(archive)
        .with_context(|| format!("cannot create {}", archive.display()))?;
    let input = fs::File::open(&list_file)
        .with_context(|| format!("cannot read {}", list_file.display()))?;
    run_checked(
        Command::new("cpio")
            .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
            .current_dir(root)
            .stdin(input)
            .stdout(output),
    )?;
    run_checked(Command::new("gzip").args(["-1", "-f"]).arg(archive))?;
    let gzipped = archive.with_extension("cpio.gz");
    if !gzipped.exists() {
        bail!("gzip left no {}", gzipped.display());
    }
    Ok(gzipped)
}

fn list(root: &Path, dir: &Path, entries: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let relative = path.strip_prefix(root).unwrap_or(&path);
        entries.push(relative.display().to_string());
        if path.is_dir() && !path.is_symlink() {
            list(root, &path, entries)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_loads_modules_before_the_results_port_and_runs_the_script_into_it() {
        let script = init_script("/tests/tracking --exact a", Arch::Arm64);
        assert!(script.starts_with("#!/bin/busybox sh\n"));
        let load = script.find("insmod /lib/modules/$(uname -r)/$module");
        let used = script.find("stty -F /dev/hvc0 raw -echo");
        assert!(load.is_some() && load < used, "{script}");
        assert!(
            script.contains("(\n/tests/tracking --exact a\n) > /dev/hvc0\n"),
            "{script}"
        );
        assert!(script.contains("echo o > /proc/sysrq-trigger"));
        // The real ip and nft before busybox's applets.
        assert!(script.contains("export PATH=/usr/local/sbin:"));
        assert!(init_script("", Arch::Amd64).contains("stty -F /dev/ttyS1 raw -echo"));
    }
}
