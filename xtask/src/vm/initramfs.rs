//! The guest's whole root file system: busybox, an /init script, idlemon,
//! the driver and their shared libraries, as a gzipped cpio (newc) archive.
//! One archive per architecture serves every kernel of it: the few modules
//! an arm64 guest loads are there for each kernel, under its release.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{kernels, results::Arch, run_checked};

/// Where busybox-static installs it (Debian merged /usr: both work).
const BUSYBOX: [&str; 2] = ["/usr/bin/busybox", "/bin/busybox"];

/// The host's busybox, for amd64 guests.
pub fn host_busybox() -> anyhow::Result<PathBuf> {
    BUSYBOX
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .context("no /bin/busybox: install busybox-static")
}

/// The daemon under test.
pub enum Daemon {
    /// A binary built for this host: it goes in with its shared libraries (ldd).
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

/// What goes into one architecture's archive.
pub struct Contents<'a> {
    pub arch: Arch,
    pub busybox: &'a Path,
    pub daemon: &'a Daemon,
    /// The driver: for amd64 built for this host, for arm64 static.
    pub guest: &'a Path,
    /// Per kernel release, the modules `kernels::modules` names, in order.
    pub modules: Vec<(String, Vec<PathBuf>)>,
}

/// Where the guest writes its result lines: a serial port of their own.
pub fn results_tty(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "/dev/ttyS1",
        Arch::Arm64 => "/dev/hvc0",
    }
}

/// Builds `cache/initramfs-ARCH.cpio.gz` and returns its path.
pub fn build(cache: &Path, contents: &Contents, guest_args: &[String]) -> anyhow::Result<PathBuf> {
    let root = cache.join(format!("initramfs-{}", contents.arch.name()));
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("cannot clear {}", root.display()))?;
    }
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc",
    ] {
        fs::create_dir_all(root.join(dir))
            .with_context(|| format!("cannot create {}", root.join(dir).display()))?;
    }
    let mut binaries = vec![
        (contents.busybox, "bin/busybox"),
        (contents.guest, "vm-guest"),
    ];
    match contents.daemon {
        Daemon::Binary(idlemon) => binaries.push((idlemon, "idlemon")),
        Daemon::Rootfs(rootfs) => {
            let mut source = rootfs.as_os_str().to_owned();
            source.push("/.");
            // -a: the loader's and libraries' links stay links.
            run_checked(Command::new("cp").arg("-a").arg(source).arg(&root))?;
        }
    }
    let mut libraries = Vec::new();
    for (source, inside) in binaries {
        copy(source, &root.join(inside))?;
        // ldd runs the host's loader: it only knows the host's binaries.
        if contents.arch != Arch::host() {
            continue;
        }
        for library in shared_libraries(source)? {
            if !libraries.contains(&library) {
                libraries.push(library);
            }
        }
    }
    for (release, modules) in &contents.modules {
        let dir = root.join("lib/modules").join(release);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut order = String::new();
        for module in modules {
            let name = module.file_name().context("module file name")?;
            copy(module, &dir.join(name))?;
            order.push_str(&name.to_string_lossy());
            order.push('\n');
        }
        fs::write(dir.join("order"), order)
            .with_context(|| format!("cannot write {}/order", dir.display()))?;
    }
    for library in &libraries {
        // Same path inside: that is where the dynamic loader and the
        // binaries' DT_NEEDED lookups expect them.
        let relative = library.strip_prefix("/").unwrap_or(library);
        copy(library, &root.join(relative))?;
    }
    let init = root.join("init");
    fs::write(
        &init,
        init_script(guest_args, contents.arch, contents.daemon.inside()),
    )
    .with_context(|| format!("cannot write {}", init.display()))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", init.display()))?;
    pack(
        &root,
        &cache.join(format!("initramfs-{}.cpio", contents.arch.name())),
    )
}

fn copy(source: &Path, destination: &Path) -> anyhow::Result<()> {
    if let Some(parent) = destination.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // fs::copy follows symlinks (ld-linux is one): the guest gets the file itself.
    fs::copy(source, destination).with_context(|| {
        format!(
            "cannot copy {} into the initramfs ({})",
            source.display(),
            destination.display()
        )
    })?;
    Ok(())
}

/// The shared libraries and dynamic loader of a binary, from `ldd`.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .stderr(Stdio::null())
        .output()
        .context("cannot run ldd (package libc-bin)")?;
    // ldd fails on static binaries ("not a dynamic executable"): nothing to copy.
    if !output.status.success() {
        return Ok(Vec::new());
    }
    parse_ldd(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("ldd {}", binary.display()))
}

pub fn parse_ldd(output: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in output
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
    {
        if line.contains("not found") {
            bail!("a shared library is missing on this host: {line}");
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
        let file = line
            .split_once("=>")
            .map_or(line, |(_, target)| target.trim());
        let file = file.split_whitespace().next().unwrap_or("");
        if file.starts_with('/') {
            paths.push(PathBuf::from(file));
        }
    }
    Ok(paths)
}

/// Single quotes for sh, whatever the text holds.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The guest's /init: mounts what idlemon needs, loads the modules of
/// `kernels::modules`, runs the driver, powers off.
pub fn init_script(guest_args: &[String], arch: Arch, idlemon: &str) -> String {
    let args: Vec<String> = guest_args.iter().map(|arg| shell_quote(arg)).collect();
    let tty = results_tty(arch);
    let modules = if kernels::modules(arch).is_empty() {
        String::new()
    } else {
        format!(
            r#"# The results' virtio console: the modules this kernel does not build in,
# in order (xtask/src/vm/kernels.rs).
for module in $(cat /lib/modules/$(uname -r)/order); do
    insmod /lib/modules/$(uname -r)/$module
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e {tty} ] && break; sleep 1; done
"#
        )
    };
    format!(
        r#"#!/bin/busybox sh
# Written by `cargo xtask vm-test` (xtask/src/vm/initramfs.rs).
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# aya attaches classic tracepoints through tracefs.
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf || true
mount -t cgroup2 cgroup2 /sys/fs/cgroup || true
{modules}# {tty} carries the result lines to the host: raw, so that they arrive byte for byte.
stty -F {tty} raw -echo
ip link set lo up
echo "vm-guest: init reached, kernel $(uname -r)"
/vm-guest --out {tty} --idlemon {idlemon} --workdir /tmp {args}
echo "vm-guest: driver exited with status $?"
sync
# Power off: qemu runs with -no-reboot and exits.
echo o > /proc/sysrq-trigger
sleep 60
"#,
        args = args.join(" ")
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
    fn collects_libraries_and_the_loader_from_ldd() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd0c9f0000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f3a3ea36000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3a3e01e000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f3a3ea69000)
";
        assert_eq!(
            parse_ldd(output).expect("parsed"),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(
            parse_ldd("\tstatically linked\n")
                .expect("parsed")
                .is_empty()
        );
        assert!(parse_ldd("\tlibssl.so.3 => not found\n").is_err());
    }

    #[test]
    fn quotes_arguments_for_the_init_script() {
        assert_eq!(
            shell_quote("no-fentry:fentry,kprobe"),
            "'no-fentry:fentry,kprobe'"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let script = init_script(
            &["--mode".to_owned(), "default:".to_owned()],
            Arch::Amd64,
            "/idlemon",
        );
        assert!(script.starts_with("#!/bin/busybox sh\n"));
        assert!(
            script.contains(
                "--out /dev/ttyS1 --idlemon /idlemon --workdir /tmp '--mode' 'default:'\n"
            ),
            "{script}"
        );
        assert!(script.contains("echo o > /proc/sysrq-trigger"));
        assert!(!script.contains("insmod"), "{script}");
        // arm64: the virtio console's modules, in dependency order, before its first use.
        let script = init_script(&[], Arch::Arm64, "/usr/bin/idlemon");
        let load = script.find("insmod /lib/modules/$(uname -r)/$module\n");
        let used = script.find("stty -F /dev/hvc0 raw -echo");
        assert!(load.is_some() && load < used, "{script}");
        assert!(
            script.contains("--out /dev/hvc0 --idlemon /usr/bin/idlemon "),
            "{script}"
        );
    }
}
