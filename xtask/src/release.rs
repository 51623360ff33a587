//! `cargo xtask release V`: checks that V is the workspace version and has a
//! CHANGELOG.md section, tags the commit `vV`, builds the image archive and
//! the chart package, and prints the commands that publish them. It pushes
//! nothing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    image::{self, ImageArgs, Source},
    setup::{self, capture, run_command},
    workspace::Workspace,
    workspace_root,
};

/// Where the Helm chart lives.
const CHART: &str = "deploy/helm/idlemon";

#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// The version to release: must be the workspace version (Cargo.toml).
    pub version: String,
    /// Build and print, but do not create the git tag.
    #[arg(long)]
    pub no_tag: bool,
}

pub fn run(args: &ReleaseArgs) -> anyhow::Result<()> {
    let root = workspace_root();
    let workspace = Workspace::read(&root)?;
    let version = &args.version;
    if *version != workspace.version {
        bail!(
            "release {version}, but the workspace version is {}: set [workspace.package] version in Cargo.toml (and the chart's version) first",
            workspace.version
        );
    }
    check_changelog(&root, version)?;
    let git = |args: &[&str]| capture(Command::new("git").arg("-C").arg(&root).args(args));
    if !git(&["status", "--porcelain"])?.trim().is_empty() {
        bail!("the working tree has changes: commit them first, a release is built from a commit");
    }
    let chart = check_chart(&root, version)?;

    let tag = format!("v{version}");
    let head = git(&["rev-parse", "HEAD"])?.trim().to_owned();
    // Fails (status 1, nothing printed) when there is no such tag.
    let tagged = git(&[
        "rev-parse",
        "--verify",
        "--quiet",
        &format!("refs/tags/{tag}^{{commit}}"),
    ])
    .unwrap_or_default();
    match tagged.trim() {
        "" if args.no_tag => println!("xtask release: not tagging (--no-tag)"),
        "" => {
            run_command(Command::new("git").arg("-C").arg(&root).args([
                "tag",
                "--annotate",
                &tag,
                "--message",
                &format!("idlemon {version}"),
            ]))?;
            println!("xtask release: tagged {head} as {tag}");
        }
        commit if commit == head => println!("xtask release: {tag} already tags {head}"),
        commit => bail!("{tag} already exists and tags {commit}, not HEAD ({head})"),
    }

    setup::run()?;
    let archive = image::build(&ImageArgs {
        version: Some(version.clone()),
        platforms: Vec::new(),
    })?;
    let package = package_chart(&root, &chart, version)?;

    let repository = &workspace.image;
    let charts = repository.rsplit_once('/').map_or_else(
        || repository.clone(),
        |(owner, _)| format!("{owner}/charts"),
    );
    println!("xtask release: idlemon {version} built:");
    println!("  {}", archive.path.display());
    for platform in &archive.platforms {
        println!(
            "    linux/{}: {} compressed, {}",
            platform.arch,
            image::megabytes(platform.compressed_bytes),
            platform.manifest_digest
        );
    }
    println!("  {}", package.display());
    println!("To publish (after `skopeo login` / `helm registry login`):");
    println!(
        "  skopeo copy --all oci-archive:{} docker://{repository}:{version}",
        archive.path.display()
    );
    println!("  helm push {} oci://{charts}", package.display());
    println!("  git push origin {tag}");
    Ok(())
}

/// CHANGELOG.md has a `## [V]` section.
fn check_changelog(root: &Path, version: &str) -> anyhow::Result<()> {
    let path = root.join("CHANGELOG.md");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let heading = format!("## [{version}]");
    if !text.lines().any(|line| line.starts_with(&heading)) {
        bail!("CHANGELOG.md has no `{heading}` section: say what changed in {version}");
    }
    Ok(())
}

/// The chart's directory, once its version and appVersion are V.
fn check_chart(root: &Path, version: &str) -> anyhow::Result<PathBuf> {
    let chart = root.join(CHART);
    let manifest = chart.join("Chart.yaml");
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "cannot read {}: the release packages the Helm chart",
            manifest.display()
        )
    })?;
    let fields: serde_json::Value = serde_norway::from_str(&text)
        .with_context(|| format!("{} is not valid YAML", manifest.display()))?;
    for key in ["version", "appVersion"] {
        let value = fields[key].as_str().unwrap_or_default();
        if value != version {
            bail!("{CHART}/Chart.yaml has {key} {value:?}, not {version:?}");
        }
    }
    Ok(chart)
}

/// `helm package` where there is a helm binary; otherwise the same layout
/// (a gzipped tar of the chart directory under its name), made
/// reproducibly: sorted, owned by root, dated at the commit.
fn package_chart(root: &Path, chart: &Path, version: &str) -> anyhow::Result<PathBuf> {
    let out = root.join("target/image");
    std::fs::create_dir_all(&out)?;
    let package = out.join(format!("idlemon-{version}.tgz"));
    if which("helm") {
        run_command(
            Command::new("helm")
                .arg("package")
                .arg(chart)
                .arg("--destination")
                .arg(&out),
        )?;
        return Ok(package);
    }
    let source = Source::read(root)?;
    let parent = chart.parent().context("chart directory has no parent")?;
    let name = chart
        .file_name()
        .and_then(|name| name.to_str())
        .context("chart directory name")?;
    run_command(Command::new("sh").arg("-c").arg(
        r#"set -e; tar --create --directory "$1" --sort=name --mtime="@$2" --owner=0 --group=0 --numeric-owner --exclude-vcs "$3" | gzip -n -9 > "$4""#,
    ).args(["sh"]).arg(parent).arg(source.epoch.to_string()).arg(name).arg(&package))?;
    Ok(package)
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|output| output.status.success())
}
