use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the kernel programs (monitor-ebpf) with the pinned nightly and
/// bpf-linker into OUT_DIR, where `include_bytes_aligned!` embeds them in the
/// daemon, and hands the git revision to the daemon (`idlemon --version`,
/// `idlemon_build_info`).
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let workspace_root = metadata.workspace_root.as_std_path();
    // The nightly's date lives once, in the workspace's Cargo.toml.
    println!(
        "cargo:rerun-if-changed={}",
        workspace_root.join("Cargo.toml").display()
    );
    let nightly = metadata.workspace_metadata["idlemon"]["nightly"]
        .as_str()
        .ok_or_else(|| {
            anyhow!("[workspace.metadata.idlemon] nightly (the kernel programs' toolchain) is missing from Cargo.toml")
        })?
        .to_owned();
    revision(workspace_root);

    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "monitor-ebpf")
        .ok_or_else(|| anyhow!("monitor-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("monitor-ebpf manifest has no parent directory"))?;
    // aya-build builds for the BPF target with `--cfg bpf_target_arch` set
    // from this build's CARGO_CFG_TARGET_ARCH, so a daemon cross-built for
    // aarch64 embeds programs that read aarch64's pt_regs in kprobes.
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&nightly),
    )
}

/// Sets IDLEMON_REVISION for the daemon: the commit checked out, else the
/// IDLEMON_REVISION this build was given (a source tarball has no .git),
/// else "unknown".
fn revision(workspace_root: &Path) {
    println!("cargo:rerun-if-env-changed=IDLEMON_REVISION");
    let revision = git_revision(workspace_root)
        .or_else(|| {
            std::env::var("IDLEMON_REVISION")
                .ok()
                .filter(|revision| !revision.trim().is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=IDLEMON_REVISION={revision}");
}

/// The commit of the repository whose top level is the workspace (not of a
/// repository the sources happen to be unpacked inside), with the files that
/// change when it moves registered for a rebuild.
fn git_revision(workspace_root: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        let output = Command::new("git")
            .arg("-C")
            .arg(workspace_root)
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())?;
        Some(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let top_level = git(&["rev-parse", "--show-toplevel"])?;
    if Path::new(&top_level).canonicalize().ok()? != workspace_root.canonicalize().ok()? {
        return None;
    }
    // HEAD moves on checkout; the branch's ref on commit. A packed ref has
    // no file until the next commit writes one: then its directory is
    // watched (cargo would rerun the script on every build while a watched
    // path is missing).
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])?];
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"])?);
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let reference = workspace_root.join(git(&["rev-parse", "--git-path", &branch])?);
        if reference.exists() {
            watched.push(reference.display().to_string());
        } else {
            watched.extend(reference.parent().map(|dir| dir.display().to_string()));
        }
    }
    for path in watched {
        let path = workspace_root.join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let revision = git(&["rev-parse", "HEAD"])?;
    (!revision.is_empty() && revision.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .then_some(revision)
}
