use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the no-op programs (monitor/bench/ebpf) with the kernel programs'
/// pinned nightly into OUT_DIR, as monitor/build.rs builds monitor-ebpf.
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    println!(
        "cargo:rerun-if-changed={}",
        metadata.workspace_root.join("Cargo.toml")
    );
    let nightly = metadata.workspace_metadata["idlemon"]["nightly"]
        .as_str()
        .ok_or_else(|| anyhow!("[workspace.metadata.idlemon] nightly is missing from Cargo.toml"))?
        .to_owned();
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "idlemon-bench-ebpf")
        .ok_or_else(|| anyhow!("idlemon-bench-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("idlemon-bench-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&nightly),
    )
}
