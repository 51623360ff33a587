//! What this binary is: version, git revision and architecture, as
//! `idlemon --version` prints them and `idlemon_build_info` exports them.

use std::sync::LazyLock;

/// The workspace version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from; build.rs falls back to the
/// IDLEMON_REVISION it was given, then to "unknown", where there is no .git.
pub const REVISION: &str = env!("IDLEMON_REVISION");

/// The architecture in the words Kubernetes and image indexes use for it
/// (the `kubernetes.io/arch` node label, `linux/arm64`), so that a series
/// can be matched to the node pool and image platform it came from.
pub fn arch() -> &'static str {
    platform_arch(std::env::consts::ARCH)
}

/// Rust's name for an architecture to the OCI platform's (GOARCH) name;
/// those without a different name pass through.
fn platform_arch(rust_arch: &'static str) -> &'static str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        other => other,
    }
}

/// `idlemon --version`: `idlemon 0.1.0 (revision 1a2b…, arm64)`.
pub fn version_line() -> &'static str {
    static LINE: LazyLock<String> =
        LazyLock::new(|| format!("{VERSION} (revision {REVISION}, {})", arch()));
    &LINE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_are_named_as_image_platforms() {
        assert_eq!(platform_arch("x86_64"), "amd64");
        assert_eq!(platform_arch("aarch64"), "arm64");
        assert_eq!(platform_arch("s390x"), "s390x");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(arch(), "amd64");
        #[cfg(target_arch = "aarch64")]
        assert_eq!(arch(), "arm64");
    }

    #[test]
    fn revision_is_a_commit_or_says_it_is_unknown() {
        assert!(
            REVISION == "unknown"
                || (!REVISION.is_empty() && !REVISION.contains(char::is_whitespace)),
            "revision {REVISION:?}"
        );
        // Built from a git checkout (as these tests are): the commit itself.
        if std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.git")).exists()
            && std::env::var_os("IDLEMON_REVISION").is_none()
        {
            assert!(
                REVISION.len() >= 40 && REVISION.bytes().all(|byte| byte.is_ascii_hexdigit()),
                "revision {REVISION:?} is not a commit id"
            );
        }
    }

    #[test]
    fn version_line_names_version_revision_and_arch() {
        assert_eq!(
            version_line(),
            format!("{VERSION} (revision {REVISION}, {})", arch())
        );
        assert!(version_line().contains(REVISION));
    }

    #[test]
    fn version_flag_prints_revision_and_arch() {
        use clap::Parser as _;
        let error = crate::cli::Cli::try_parse_from(["idlemon", "--version"])
            .expect_err("--version stops parsing");
        assert_eq!(error.kind(), clap::error::ErrorKind::DisplayVersion);
        let printed = error.render().to_string();
        assert_eq!(
            printed.trim_end(),
            format!("idlemon {VERSION} (revision {REVISION}, {})", arch())
        );
    }
}
