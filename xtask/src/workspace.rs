//! Release facts set once in the workspace's Cargo.toml: version, source
//! repository, image repository and the pinned nightly.

use std::path::Path;

use anyhow::{Context as _, anyhow};

pub struct Workspace {
    /// `[workspace.package] version`.
    pub version: String,
    /// `[workspace.package] repository`: the image's source label.
    pub repository: String,
    /// `[workspace.package] license`: the daemon's licence.
    pub license: String,
    /// `[workspace.metadata.idlemon] image`: where the image is published.
    pub image: String,
    /// `[workspace.metadata.idlemon] nightly`: the toolchain that builds the
    /// kernel programs (monitor/build.rs uses it too).
    pub nightly: String,
}

impl Workspace {
    pub fn read(root: &Path) -> anyhow::Result<Self> {
        let path = root.join("Cargo.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        let manifest: toml::Table = toml::from_str(text).context("not valid TOML")?;
        let field = |keys: &[&str]| -> anyhow::Result<String> {
            let mut value = manifest
                .get(keys[0])
                .ok_or_else(|| anyhow!("[{}] is missing", keys[0]))?;
            for key in &keys[1..] {
                value = value
                    .get(key)
                    .ok_or_else(|| anyhow!("{} is missing", keys.join(".")))?;
            }
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("{} is not a string", keys.join(".")))
        };
        Ok(Self {
            version: field(&["workspace", "package", "version"])?,
            repository: field(&["workspace", "package", "repository"])?,
            license: field(&["workspace", "package", "license"])?,
            image: field(&["workspace", "metadata", "idlemon", "image"])?,
            nightly: field(&["workspace", "metadata", "idlemon", "nightly"])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_manifest_has_every_release_fact() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let workspace = Workspace::read(&root).expect("workspace facts");
        assert!(
            workspace.nightly.starts_with("nightly-20"),
            "{}",
            workspace.nightly
        );
        assert!(!workspace.image.contains("://"), "{}", workspace.image);
        assert!(workspace.repository.starts_with("https://"));
    }

    #[test]
    fn a_missing_fact_is_named() {
        let error = Workspace::parse("[workspace.package]\nversion = \"1.0.0\"\n")
            .err()
            .expect("incomplete manifest");
        assert!(
            format!("{error:#}").contains("workspace.package.repository"),
            "{error:#}"
        );
    }
}
