//! Every developer and CI action, so that nobody needs to remember a command.
//!
//! `cargo xtask run` and `cargo xtask test` call `setup` themselves: on a
//! fresh machine they are the only two commands anyone needs.

mod bench;
mod image;
mod release;
mod setup;
mod vm;
mod workspace;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "idlemon's developer and CI actions")]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Install what the build and the tests need (idempotent), mount tracefs.
    Setup,
    /// Build the daemon (and, through its build script, the kernel programs).
    Build {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run the daemon on this host with default settings.
    Run {
        /// Extra arguments for idlemon, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Measure idlemon's overhead and scale (see README: Benchmarks).
    Bench(bench::BenchArgs),
    /// Boot EKS-like Debian kernels under qemu and run the integration tests
    /// in each attach mode.
    VmTest(vm::VmArgs),
    /// Build the image for linux/amd64 and linux/arm64 into
    /// target/image/idlemon-VERSION.oci.tar (buildah, no Docker engine).
    Image(image::ImageArgs),
    /// Build the amd64 image and run it under podman with the DaemonSet's
    /// security context (part of `test`).
    ContainerTest,
    /// Tag a release, build its image and chart package, and print the
    /// commands that publish them (nothing is pushed).
    Release(release::ReleaseArgs),
    /// Set up, then run the unit tests and the root integration tests.
    Test {
        /// Only the unit tests (no root, no kernel).
        #[arg(long)]
        unit: bool,
        /// Skip the container test (it builds the amd64 image and runs it
        /// under podman).
        #[arg(long)]
        no_container: bool,
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Action::Setup => setup::run(),
        Action::Build { release } => build(release),
        Action::Run { args } => {
            setup::run()?;
            build(true)?;
            let binary = workspace_root().join("target/release/idlemon");
            println!("xtask: starting {} (Ctrl-C stops it)", binary.display());
            // In place of this process (cargo run execs xtask too), so that a
            // SIGTERM meant for `cargo xtask run` (timeout, a service manager)
            // reaches idlemon, which detaches everything and exits.
            let error = std::os::unix::process::CommandExt::exec(Command::new(&binary).args(&args));
            Err(error).with_context(|| format!("cannot start {}", binary.display()))
        }
        Action::Image(args) => image::run(&args),
        Action::Release(args) => release::run(&args),
        Action::ContainerTest => {
            setup::run()?;
            container_test()
        }
        Action::Test {
            unit,
            no_container,
            filter,
        } => test(unit, no_container, filter.as_deref()),
        Action::Bench(args) => {
            if !args.help_only() {
                setup::run()?;
                build(true)?;
            }
            bench::run(&args)
        }
        Action::VmTest(args) => {
            setup::run()?;
            // The arm64 daemon is the image's own build (vm.rs).
            if args.tests_amd64() {
                build(true)?;
            }
            vm::run(&args)
        }
    }
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--package", "monitor"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

fn test(unit_only: bool, no_container: bool, filter: Option<&str>) -> anyhow::Result<()> {
    if !unit_only {
        setup::run()?;
    }
    // The default members: monitor-ebpf only builds for the BPF target.
    let mut args = vec!["test"];
    args.extend(["--", "--test-threads=1"]);
    if !unit_only {
        if !setup::is_root() {
            bail!(
                "the integration tests load BPF programs and create network namespaces: run as root (or pass --unit)"
            );
        }
        // The kernel tests are #[ignore]d so that a plain `cargo test` does
        // not pretend to have run them; here they run for real.
        args.push("--include-ignored");
    }
    if let Some(filter) = filter {
        args.push(filter);
    }
    if !unit_only && filter.is_none() {
        supply_chain_check()?;
    }
    cargo(&args)?;
    // The bench's pure parts (no root: its kernel tests are #[ignore]d); it
    // is not a default member, so the run above leaves it out.
    cargo(&["test", "--package", "idlemon-bench"])?;
    if !unit_only && filter.is_none() {
        // The integration tests that tell attach kinds apart, in each attach
        // mode, on the kernels EKS nodes run (qemu; amd64, and arm64 with
        // the arm64 image's cross-built daemon and the tests cross-built),
        // and on this kernel. It runs the release build of the daemon,
        // which `cargo test` did not make.
        build(true)?;
        vm::run(&vm::VmArgs::ci())?;
        // The image as the DaemonSet runs it (podman), after the release
        // build above, which the amd64 image reuses.
        if no_container {
            println!("xtask: container test skipped (--no-container)");
        } else {
            container_test()?;
        }
        deploy_checks()?;
    }
    Ok(())
}

/// Licences, bans and sources of every dependency against `deny.toml`,
/// offline (advisories need a database from the network).
fn supply_chain_check() -> anyhow::Result<()> {
    setup::cargo_deny()?;
    // cargo-deny reads `cargo metadata` for every platform, so the sources of
    // Windows-only crates must be on disk too; a build fetches only this
    // host's. Without this, a fresh machine fails with "failed to download
    // `windows-sys`... --offline was specified".
    cargo(&["fetch", "--locked"])?;
    cargo(&["deny", "--offline", "check", "licenses", "bans", "sources"])
}

/// Manifests against Kubernetes schemas, alert rules with promtool (syntax
/// and unit tests), the dashboard's conventions: `deploy/check.sh`.
fn deploy_checks() -> anyhow::Result<()> {
    println!("xtask: bash deploy/check.sh");
    let status = Command::new("bash")
        .arg(workspace_root().join("deploy/check.sh"))
        .status()
        .context("cannot run deploy/check.sh")?;
    if !status.success() {
        bail!("deploy/check.sh failed ({status})");
    }
    Ok(())
}

/// The container test (monitor/tests/container.rs), which skips without
/// the image: it runs the amd64 image, built here, under podman.
fn container_test() -> anyhow::Result<()> {
    let archive = image::build(&image::ImageArgs {
        version: None,
        platforms: vec![image::Platform::Amd64],
    })?;
    let variable = ("IDLEMON_IMAGE_ARCHIVE", archive.path.as_os_str());
    println!("xtask: {}={}", variable.0, archive.path.display());
    cargo_with(
        &[
            // The default members, as the `cargo test` before it: their
            // dependencies' features, and so their builds, are the same.
            "test",
            "--test",
            "container",
            "--",
            "--include-ignored",
            "--test-threads=1",
            "--nocapture",
        ],
        &[variable],
    )
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_with(args, &[])
}

/// `cargo` with these environment variables set.
fn cargo_with(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin())
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
