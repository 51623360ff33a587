//! `cargo xtask setup`: installs what building and testing idlemon needs, and
//! skips what is already there. Safe to run any number of times.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// bpf-linker links the kernel programs; 0.13.0 is the release that builds
/// against LLVM 22, the LLVM of both Debian's packages and rustc nightly here.
const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_MAJOR: &str = "22.";
/// cargo-deny checks licences, bans and sources offline in `cargo xtask
/// test`; 0.20 is the newest that builds with rustc 1.95 here.
const CARGO_DENY_VERSION: &str = "0.20.2";

/// Debian packages: (package, why).
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker links against LLVM 22"),
    (
        "libpolly-22-dev",
        "LLVM 22's static libraries reference Polly",
    ),
    ("libzstd-dev", "bpf-linker's LLVM link needs zstd"),
    ("zlib1g-dev", "bpf-linker's LLVM link needs zlib"),
    (
        "iproute2",
        "tests create network namespaces and veth pairs (ip, ss)",
    ),
    ("nftables", "tests reproduce a NAT gateway's idle timeout"),
    ("procps", "tests set per-namespace sysctls"),
    ("bpftool", "tests check that no program stays loaded"),
    (
        "libcap2-bin",
        "tests run idlemon without privileges (capsh)",
    ),
    (
        "prometheus",
        "a test scrapes idlemon with a real Prometheus server",
    ),
    (
        "buildah",
        "cargo xtask image assembles the image without a Docker engine",
    ),
    (
        "skopeo",
        "the container test loads the image archive into podman's storage",
    ),
    ("podman", "the container test runs the image"),
    (
        "runc",
        "podman's runtime here (crun fails on hybrid cgroups)",
    ),
    (
        "gcc-aarch64-linux-gnu",
        "links the arm64 (Graviton) daemon cross-compiled by cargo xtask image",
    ),
    (
        "libc6-dev-arm64-cross",
        "the arm64 glibc the cross-compiled daemon links against",
    ),
];

/// The target of the arm64 image's daemon (cargo xtask image).
const ARM64_TARGET: &str = "aarch64-unknown-linux-gnu";

pub fn run() -> anyhow::Result<()> {
    packages()?;
    nightly()?;
    cross_target()?;
    bpf_linker()?;
    tracefs()?;
    println!("xtask setup: done");
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// PATH with ~/.cargo/bin in front, where `cargo install` puts bpf-linker.
pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_bin()];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn packages() -> anyhow::Result<()> {
    if install_packages("xtask setup", PACKAGES)? == 0 {
        println!("xtask setup: apt packages already installed");
    }
    Ok(())
}

/// The nightly that builds the kernel programs, at the date pinned in the
/// workspace's Cargo.toml (monitor/build.rs reads the same key), with
/// rust-src for `-Z build-std=core`.
fn nightly() -> anyhow::Result<()> {
    let nightly = crate::workspace::Workspace::read(&crate::workspace_root())?.nightly;
    let toolchains = capture(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the kernel programs with nightly")?;
    let installed = toolchains
        .lines()
        .any(|line| line.starts_with(&format!("{nightly}-")) || line.trim() == nightly);
    if installed {
        let components = capture(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            &nightly,
            "--installed",
        ]))?;
        if components.lines().any(|line| line.starts_with("rust-src")) {
            println!("xtask setup: {nightly} with rust-src already installed");
            return nightly_llvm(&nightly);
        }
    }
    println!(
        "xtask setup: installing {nightly} with rust-src (the kernel programs need -Z build-std)"
    );
    run_command(Command::new("rustup").args([
        "toolchain",
        "install",
        &nightly,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    nightly_llvm(&nightly)
}

/// bpf-linker reads the bitcode nightly emits: their LLVM must match. Say so
/// here rather than as an unreadable link error.
fn nightly_llvm(nightly: &str) -> anyhow::Result<()> {
    let version = capture(Command::new("rustup").args(["run", nightly, "rustc", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if !llvm.starts_with(LLVM_MAJOR) {
        bail!(
            "{nightly} has LLVM {llvm}, but bpf-linker {BPF_LINKER_VERSION} is built against LLVM {LLVM_MAJOR}: pin a nightly with LLVM {LLVM_MAJOR} in Cargo.toml ([workspace.metadata.idlemon] nightly)"
        );
    }
    Ok(())
}

/// The standard library for the arm64 daemon, for the toolchain building the
/// workspace (the one cargo runs xtask with).
fn cross_target() -> anyhow::Result<()> {
    let installed = capture(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("rustup is needed to add the arm64 target")?;
    if installed.lines().any(|line| line.trim() == ARM64_TARGET) {
        println!("xtask setup: rust target {ARM64_TARGET} already installed");
        return Ok(());
    }
    println!("xtask setup: adding rust target {ARM64_TARGET} (the arm64 image's daemon)");
    run_command(Command::new("rustup").args(["target", "add", ARM64_TARGET]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let linker = cargo_bin().join("bpf-linker");
    let version = capture(Command::new(&linker).arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        println!("xtask setup: bpf-linker {BPF_LINKER_VERSION} already installed");
        return Ok(());
    }
    println!(
        "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    );
    let mut path = vec![Path::new(LLVM_PREFIX).join("bin")];
    if let Some(current) = std::env::var_os("PATH") {
        path.extend(std::env::split_paths(&current));
    }
    run_command(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                // Its own Cargo.lock: the same dependencies next month.
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", std::env::join_paths(path)?),
    )
}

/// cargo-deny, for the supply-chain check of `cargo xtask test` (not needed
/// to build or run idlemon). Built from crates.io with its lock file.
pub fn cargo_deny() -> anyhow::Result<()> {
    let deny = cargo_bin().join("cargo-deny");
    let version = capture(Command::new(&deny).arg("--version")).unwrap_or_default();
    if version.contains(CARGO_DENY_VERSION) {
        println!("xtask setup: cargo-deny {CARGO_DENY_VERSION} already installed");
        return Ok(());
    }
    println!("xtask setup: building cargo-deny {CARGO_DENY_VERSION} (a few minutes, once)");
    run_command(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())).args([
            "install",
            "--locked",
            &format!("cargo-deny@{CARGO_DENY_VERSION}"),
        ]),
    )
}

/// aya attaches classic tracepoints through tracefs, which a fresh machine
/// does not mount.
fn tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists() {
        println!("xtask setup: tracefs already mounted");
        return Ok(());
    }
    if !is_root() {
        println!("xtask setup: tracefs not mounted and not root: skipped");
        return Ok(());
    }
    println!("xtask setup: mounting tracefs at /sys/kernel/tracing");
    run_command(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
}

/// The test kit's: apt-get installs, a command run that fails with its
/// status, a command's output that fails with its status and stderr.
pub use idlemon_testkit::vm::{capture, install_packages, run_checked as run_command};
