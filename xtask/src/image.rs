//! `cargo xtask image`: idlemon's image for linux/amd64 and linux/arm64, built
//! without a Docker engine, into one OCI archive holding an image index.
//!
//! Each platform's image is `FROM scratch` plus:
//! - `/usr/bin/idlemon` (on the image's PATH), built by cargo for that platform (arm64 cross-compiled and
//!   linked by Debian's `aarch64-linux-gnu-gcc`), with the kernel programs
//!   that monitor/build.rs built for the same architecture embedded;
//! - the shared libraries it links and their own (glibc, libgcc_s) and the
//!   loader, from the current Debian 12 packages of that architecture
//!   (`apt-get download libc6:arm64 ...`), with their copyright files;
//! - the CA certificates of Debian's `ca-certificates`, as one bundle at
//!   /etc/ssl/certs/ca-certificates.crt.
//!
//! buildah assembles and commits each image with the commit's time as every
//! timestamp, `buildah manifest` joins them in an index, and `buildah
//! manifest push --all` writes the archive. skopeo copies it to a registry
//! (`cargo xtask release` prints the command).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};

use idlemon_testkit::vm;

use crate::{
    setup::{self, capture, run_command},
    workspace::Workspace,
    workspace_root,
};

/// Where idlemon listens by default (monitor's DEFAULT_PORT); the image
/// declares it.
const PORT: u16 = 9781;

/// The licence of the kernel programs as they declare it to the kernel
/// (monitor-ebpf/src/main.rs: "Dual MIT/GPL", which the kernel reads as MIT
/// or GPL v2); GPL-compatible, as the GPL-only BPF helpers require.
const KERNEL_PROGRAMS_LICENSE: &str = "MIT OR GPL-2.0-only";

/// Debian packages whose files the image carries: (package, per
/// architecture). The loader and libraries come from the first two.
const DEBIAN_PACKAGES: &[(&str, bool)] = &[
    ("libc6", true),
    ("libgcc-s1", true),
    // libgcc-s1's copyright file (its doc directory links here).
    ("gcc-12-base", true),
    ("ca-certificates", false),
];

/// An image platform: the test kit's architecture, whose names, Rust
/// targets and Debian multiarch directories the image and the VMs share.
pub use idlemon_testkit::vm::Arch as Platform;

fn platform(name: &str) -> Result<Platform, String> {
    Platform::ALL
        .into_iter()
        .find(|platform| platform.name() == name)
        .ok_or_else(|| format!("unknown platform {name:?}: amd64 or arm64"))
}

#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// The image's version: its tag and org.opencontainers.image.version
    /// label. Default: the workspace version (Cargo.toml).
    #[arg(long)]
    pub version: Option<String>,
    /// Build only these platforms (comma-separated); the archive is then
    /// named after them. Default: amd64 and arm64.
    #[arg(long = "platform", value_parser = platform, value_delimiter = ',')]
    pub platforms: Vec<Platform>,
}

/// An archive written by `build`.
pub struct Archive {
    pub path: PathBuf,
    pub platforms: Vec<PlatformImage>,
}

/// One platform's image in an archive, as read back from it.
pub struct PlatformImage {
    pub arch: String,
    pub manifest_digest: String,
    pub compressed_bytes: u64,
}

pub fn run(args: &ImageArgs) -> anyhow::Result<()> {
    setup::run()?;
    let started = Instant::now();
    let archive = build(args)?;
    println!(
        "xtask image: wrote {} in {:.0} s",
        archive.path.display(),
        started.elapsed().as_secs_f64()
    );
    for image in &archive.platforms {
        println!(
            "xtask image:   linux/{}: {} compressed ({}), manifest {}",
            image.arch,
            megabytes(image.compressed_bytes),
            image.compressed_bytes,
            image.manifest_digest
        );
    }
    Ok(())
}

pub fn megabytes(bytes: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a size to print")]
    let megabytes = bytes as f64 / 1e6;
    format!("{megabytes:.1} MB")
}

/// Builds the image for the platforms asked (all by default) and writes the
/// archive; returns what the archive holds, read back from it.
pub fn build(args: &ImageArgs) -> anyhow::Result<Archive> {
    let root = workspace_root();
    let workspace = Workspace::read(&root)?;
    let version = args.version.clone().unwrap_or(workspace.version.clone());
    check_tag(&version)?;
    if version != workspace.version {
        println!(
            "xtask image: warning: the image is tagged {version}, but its daemon reports {} (Cargo.toml)",
            workspace.version
        );
    }
    let mut platforms: Vec<Platform> = if args.platforms.is_empty() {
        Platform::ALL.to_vec()
    } else {
        args.platforms.clone()
    };
    platforms.sort();
    platforms.dedup();

    let source = Source::read(&root)?;
    let work = root.join("target/image");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let file_name = if platforms == Platform::ALL {
        format!("idlemon-{version}.oci.tar")
    } else {
        let names: Vec<&str> = platforms.iter().map(|platform| platform.name()).collect();
        format!("idlemon-{version}.{}.oci.tar", names.join("+"))
    };
    let archive = work.join(file_name);

    let labels = [
        ("org.opencontainers.image.title", "idlemon".to_owned()),
        (
            "org.opencontainers.image.description",
            "Finds TCP connections a middlebox's idle timeout is about to kill, and explains the ones it did".to_owned(),
        ),
        ("org.opencontainers.image.version", version.clone()),
        ("org.opencontainers.image.revision", source.revision.clone()),
        ("org.opencontainers.image.source", workspace.repository.clone()),
        ("org.opencontainers.image.url", workspace.repository.clone()),
        ("org.opencontainers.image.created", source.created.clone()),
        (
            "org.opencontainers.image.licenses",
            format!("({}) AND ({KERNEL_PROGRAMS_LICENSE})", workspace.license),
        ),
        ("org.opencontainers.image.ref.name", version.clone()),
    ];

    // Names in the local containers storage, removed again at the end.
    let list = format!("localhost/idlemon-xtask-image:{version}");
    let mut images = Vec::new();
    let result = (|| {
        for &platform in &platforms {
            let rootfs = rootfs(&root, &work, platform, &source)?;
            let image = format!("{list}-{}", platform.name());
            commit(&rootfs, platform, &labels, source.epoch, &image)?;
            images.push(image);
        }
        buildah_quiet(&["manifest", "rm", &list]);
        buildah(&["manifest", "create", &list])?;
        for image in &images {
            buildah(&[
                "manifest",
                "add",
                &list,
                &format!("containers-storage:{image}"),
            ])?;
        }
        let _ = fs::remove_file(&archive);
        buildah(&[
            "manifest",
            "push",
            "--all",
            "--format",
            "oci",
            &list,
            &format!("oci-archive:{}:{version}", archive.display()),
        ])
    })();
    buildah_quiet(&["manifest", "rm", &list]);
    for image in &images {
        buildah_quiet(&["rmi", image]);
    }
    result?;

    let contents = read_archive(&archive)?;
    let found: Vec<&str> = contents.iter().map(|image| image.arch.as_str()).collect();
    let wanted: Vec<&str> = platforms.iter().map(|platform| platform.name()).collect();
    if found != wanted {
        bail!("{} holds {found:?}, not {wanted:?}", archive.display());
    }
    Ok(Archive {
        path: archive,
        platforms: contents,
    })
}

/// An image tag: what registries accept (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`).
pub fn check_tag(version: &str) -> anyhow::Result<()> {
    let valid = !version.is_empty()
        && version.len() <= 128
        && !version.starts_with(['.', '-'])
        && version
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"_.-".contains(&byte));
    if !valid {
        bail!(
            "version {version:?} cannot be an image tag (letters, digits, '_', '.', '-'; 128 at most)"
        );
    }
    Ok(())
}

/// The commit the image is built from and its time, which is every
/// timestamp in the image, so that the same commit gives the same image.
pub struct Source {
    pub revision: String,
    pub epoch: u64,
    created: String,
}

impl Source {
    pub fn read(root: &Path) -> anyhow::Result<Self> {
        let git = |args: &[&str]| {
            capture(Command::new("git").arg("-C").arg(root).args(args))
                .ok()
                .map(|out| out.trim().to_owned())
                .filter(|out| !out.is_empty())
        };
        let (revision, epoch) = match (
            git(&["rev-parse", "HEAD"]),
            git(&["show", "-s", "--format=%ct", "HEAD"]),
        ) {
            (Some(revision), Some(epoch)) => {
                if git(&["status", "--porcelain", "--untracked-files=no"]).is_some() {
                    println!(
                        "xtask image: warning: uncommitted changes: the image is labelled {revision} but holds what is in the working tree"
                    );
                }
                (revision, epoch)
            }
            // A source tarball: what monitor/build.rs falls back to.
            _ => (
                std::env::var("IDLEMON_REVISION").unwrap_or_else(|_| "unknown".to_owned()),
                std::env::var("SOURCE_DATE_EPOCH").unwrap_or_else(|_| "0".to_owned()),
            ),
        };
        let epoch: u64 = epoch
            .parse()
            .with_context(|| format!("commit time {epoch:?} is not a number of seconds"))?;
        let created = capture(
            Command::new("date")
                .args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"])
                .env("LC_ALL", "C"),
        )?
        .trim()
        .to_owned();
        Ok(Self {
            revision,
            epoch,
            created,
        })
    }
}

/// What cargo built for one platform.
struct Build {
    binary: PathBuf,
    /// monitor's build script output: the kernel programs' object.
    out_dir: PathBuf,
}

/// `cargo build --release --locked` for the platform. The host's platform
/// builds into target/release, which `cargo xtask build --release` and the
/// tests share; others into target/TRIPLE/release.
fn cargo_build(root: &Path, platform: Platform) -> anyhow::Result<Build> {
    let host = capture(Command::new("rustc").arg("-vV"))?
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_owned))
        .unwrap_or_default();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    command
        .args([
            "build",
            "--release",
            "--locked",
            "--package",
            "monitor",
            "--bin",
            "idlemon",
        ])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .env("PATH", setup::path_with_cargo_bin())
        .stdout(Stdio::piped());
    if platform.rust_target() != host {
        command.args(["--target", platform.rust_target()]);
        if platform == Platform::Arm64 {
            command.env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            );
        }
    }
    println!(
        "xtask image: cargo build --release --locked --package monitor ({})",
        platform.rust_target()
    );
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {cargo}"))?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut binary = None;
    let mut out_dir = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let package = message["package_id"].as_str().unwrap_or_default();
        match message["reason"].as_str() {
            Some("compiler-artifact") if message["target"]["name"] == "idlemon" => {
                binary = message["executable"].as_str().map(PathBuf::from);
            }
            Some("build-script-executed") if package.contains("/monitor#") => {
                out_dir = message["out_dir"].as_str().map(PathBuf::from);
            }
            _ => {}
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!(
            "cargo build for {} failed ({status})",
            platform.rust_target()
        );
    }
    Ok(Build {
        binary: binary.context("cargo built no idlemon executable")?,
        out_dir: out_dir
            .context("cargo reported no output directory for monitor's build script")?,
    })
}

/// Builds the daemon for `platform` and lays out the image's files under
/// target/image/PLATFORM/rootfs.
pub fn rootfs(
    root: &Path,
    work: &Path,
    platform: Platform,
    source: &Source,
) -> anyhow::Result<PathBuf> {
    let build = cargo_build(root, platform)?;
    check_binary(&build, platform, source)?;

    let dir = work.join(platform.name());
    let debian = debian_packages(&dir, platform)?;
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs)
            .with_context(|| format!("cannot remove {}", rootfs.display()))?;
    }
    fs::create_dir_all(&rootfs)?;

    // On PATH, so that `kubectl exec ds/idlemon -- idlemon sockets` finds
    // it; with its loader, then every library it needs, and theirs.
    let libraries = vm::install_program(
        &debian,
        &rootfs,
        &build.binary,
        Path::new("/usr/bin/idlemon"),
        platform,
        &format!(
            "add the package that has it to DEBIAN_PACKAGES in xtask/src/image.rs ({})",
            DEBIAN_PACKAGES
                .iter()
                .map(|(package, _)| *package)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )?;
    println!(
        "xtask image: linux/{}: /usr/bin/idlemon, {}",
        platform.name(),
        libraries.into_iter().collect::<Vec<_>>().join(", ")
    );

    // One bundle, as update-ca-certificates makes it from Debian's default
    // selection (every certificate the package ships).
    let certificates = debian.join("usr/share/ca-certificates/mozilla");
    let mut files: Vec<PathBuf> = fs::read_dir(&certificates)
        .with_context(|| format!("cannot read {}", certificates.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|extension| extension == "crt"))
        .collect();
    files.sort();
    let mut bundle = Vec::new();
    for file in &files {
        bundle.extend(fs::read(file)?);
    }
    if files.is_empty() {
        bail!("no certificates in {}", certificates.display());
    }
    let bundle_path = rootfs.join("etc/ssl/certs/ca-certificates.crt");
    fs::create_dir_all(bundle_path.parent().context("bundle directory")?)?;
    fs::write(&bundle_path, bundle)?;

    // The libraries' licences travel with them. A package whose doc
    // directory is a link to another's (libgcc-s1 to gcc-12-base) has that
    // one's copyright, copied once.
    for (package, _) in DEBIAN_PACKAGES {
        let doc = format!("usr/share/doc/{package}");
        if fs::symlink_metadata(debian.join(&doc))?
            .file_type()
            .is_symlink()
        {
            continue;
        }
        let copyright = format!("{doc}/copyright");
        vm::copy_file(&debian.join(&copyright), &rootfs.join(&copyright))?;
    }
    Ok(rootfs)
}

/// The binary is for the platform's architecture, and so are the kernel
/// programs embedded in it: aya-build builds them with
/// `--cfg bpf_target_arch` from the daemon's target, which decides how the
/// kprobes read function arguments from `pt_regs` (x86-64: %rdi at offset
/// 112; arm64: x0 at offset 0).
fn check_binary(build: &Build, platform: Platform, source: &Source) -> anyhow::Result<()> {
    vm::check_machine(&build.binary, platform)?;
    let contents = fs::read(&build.binary)?;
    if source.revision != "unknown"
        && !contents
            .windows(source.revision.len())
            .any(|window| window == source.revision.as_bytes())
    {
        bail!(
            "{} does not carry revision {}: was it built from another checkout?",
            build.binary.display(),
            source.revision
        );
    }
    let object = build.out_dir.join("monitor");
    let first_read = kprobe_first_argument_offset(&object)?;
    let expected = match platform {
        Platform::Amd64 => 112,
        Platform::Arm64 => 0,
    };
    if first_read != expected {
        bail!(
            "the kernel programs in {} read the first kprobe argument at pt_regs offset {first_read}, not {expected} as on {}: built for the wrong architecture",
            object.display(),
            platform.name()
        );
    }
    Ok(())
}

/// The pt_regs offset the `tcp_sendmsg` kprobe reads its first argument
/// (the socket) from: the first load relative to r1 (the context) in its
/// disassembly.
fn kprobe_first_argument_offset(object: &Path) -> anyhow::Result<i64> {
    let objdump = Path::new(setup::LLVM_PREFIX).join("bin/llvm-objdump");
    let listing = capture(
        Command::new(&objdump)
            .args(["-d", "--no-show-raw-insn", "--section=kprobe/tcp_sendmsg"])
            .arg(object),
    )
    .with_context(|| {
        format!(
            "cannot disassemble {} with {}",
            object.display(),
            objdump.display()
        )
    })?;
    // e.g. `r2 = *(u64 *)(r1 + 0x70)`: r1 is the context, pt_regs.
    listing
        .lines()
        .find_map(|line| {
            let (_, operand) = line.split_once("(r1 + ")?;
            let offset = operand.split(')').next()?;
            match offset.strip_prefix("0x") {
                Some(hex) => i64::from_str_radix(hex, 16).ok(),
                None => offset.parse().ok(),
            }
        })
        .ok_or_else(|| {
            anyhow!(
                "no read of the kprobe context in kprobe/tcp_sendmsg of {}:\n{listing}",
                object.display()
            )
        })
}

/// Downloads and unpacks the Debian packages the image
/// takes files from, for the platform's architecture; returns where.
fn debian_packages(dir: &Path, platform: Platform) -> anyhow::Result<PathBuf> {
    vm::ensure_architecture(platform)?;
    let names: Vec<String> = DEBIAN_PACKAGES
        .iter()
        .map(|(package, per_arch)| {
            if *per_arch {
                format!("{package}:{}", platform.name())
            } else {
                (*package).to_owned()
            }
        })
        .collect();
    let (unpacked, versions) = vm::unpack(dir, &names)?;
    println!(
        "xtask image: linux/{}: Debian {}",
        platform.name(),
        versions.join(", ")
    );
    Ok(unpacked)
}

/// Commits the platform's image to the local containers storage as `name`.
fn commit(
    rootfs: &Path,
    platform: Platform,
    labels: &[(&str, String)],
    epoch: u64,
    name: &str,
) -> anyhow::Result<()> {
    let container = format!(
        "idlemon-xtask-image-{}-{}",
        platform.name(),
        std::process::id()
    );
    buildah_quiet(&["rm", &container]);
    buildah(&["from", "--name", &container, "scratch"])?;
    let result = (|| {
        let source = format!("{}/", rootfs.display());
        buildah(&["copy", "--chown", "0:0", &container, &source, "/"])?;
        let mut config = vec![
            "config".to_owned(),
            "--os=linux".to_owned(),
            format!("--arch={}", platform.name()),
            "--entrypoint=[\"/usr/bin/idlemon\"]".to_owned(),
            "--env=PATH=/usr/bin".to_owned(),
            "--cmd=[]".to_owned(),
            // Root: the DaemonSet grants capabilities, which are effective
            // only for uid 0 when the binary has no file capabilities.
            "--user=0:0".to_owned(),
            format!("--port={PORT}/tcp"),
            "--workingdir=/".to_owned(),
        ];
        if platform == Platform::Arm64 {
            config.push("--variant=v8".to_owned());
        }
        for (key, value) in labels {
            config.push(format!("--label={key}={value}"));
        }
        config.push(container.clone());
        let config: Vec<&str> = config.iter().map(String::as_str).collect();
        buildah(&config)?;
        buildah_quiet(&["rmi", name]);
        buildah(&[
            "commit",
            "--format",
            "oci",
            "--timestamp",
            &epoch.to_string(),
            "--quiet",
            &container,
            name,
        ])
    })();
    buildah_quiet(&["rm", &container]);
    result
}

fn buildah(args: &[&str]) -> anyhow::Result<()> {
    run_command(Command::new("buildah").args(args).stdout(Stdio::null()))
}

/// For cleanup: what is being removed may not exist.
fn buildah_quiet(args: &[&str]) {
    let _ = Command::new("buildah")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// What an archive holds: one image per platform of its index, with the
/// compressed size of its layers. Fails unless every image's configuration
/// names the platform the index gives it.
pub fn read_archive(archive: &Path) -> anyhow::Result<Vec<PlatformImage>> {
    let blob = |digest: &str| -> anyhow::Result<serde_json::Value> {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| anyhow!("digest {digest} is not sha256"))?;
        let output = Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg(format!("blobs/sha256/{hex}"))
            .output()
            .context("cannot run tar")?;
        if !output.status.success() {
            bail!("{} has no blob {digest}", archive.display());
        }
        serde_json::from_slice(&output.stdout).with_context(|| format!("blob {digest} is not JSON"))
    };
    let output = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("index.json")
        .output()
        .context("cannot run tar")?;
    if !output.status.success() {
        bail!("{} has no index.json", archive.display());
    }
    let layout: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let top = &layout["manifests"][0];
    if top["mediaType"] != "application/vnd.oci.image.index.v1+json" {
        bail!("{} does not hold an image index: {top}", archive.display());
    }
    let index = blob(top["digest"].as_str().unwrap_or_default())?;
    let mut images = Vec::new();
    for entry in index["manifests"].as_array().into_iter().flatten() {
        let arch = entry["platform"]["architecture"]
            .as_str()
            .unwrap_or_default();
        let digest = entry["digest"].as_str().unwrap_or_default();
        let manifest = blob(digest)?;
        let config = blob(manifest["config"]["digest"].as_str().unwrap_or_default())?;
        if config["architecture"] != arch || config["os"] != "linux" {
            bail!(
                "image {digest} is listed for linux/{arch} but its configuration says {}/{}",
                config["os"],
                config["architecture"]
            );
        }
        let compressed_bytes = manifest["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|layer| layer["size"].as_u64())
            .sum();
        images.push(PlatformImage {
            arch: arch.to_owned(),
            manifest_digest: digest.to_owned(),
            compressed_bytes,
        });
    }
    images.sort_by(|a, b| a.arch.cmp(&b.arch));
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_be_image_tags() {
        assert!(check_tag("0.1.0").is_ok());
        assert!(check_tag("0.2.0-rc.1").is_ok());
        for bad in ["", "v1/2", "-1", "1.0 ", &"9".repeat(129)] {
            assert!(check_tag(bad).is_err(), "{bad:?} accepted");
        }
    }
}
