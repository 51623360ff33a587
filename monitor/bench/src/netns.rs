//! Network namespaces made for one measurement, so that no other traffic on
//! the host mixes in, and removed when dropped.

use std::{
    fs::{self, File},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, anyhow, bail};

const PREFIX: &str = "idlemon-bench-";
const BIND_MOUNTS: &str = "/run/netns";

pub struct Netns {
    pub name: String,
    path: PathBuf,
}

impl Netns {
    /// `ip netns add`, with loopback up. The name carries the bench's pid so
    /// that a later run can tell a leftover from a live one.
    pub fn create(tag: &str) -> anyhow::Result<Self> {
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        ip(&["netns", "add", &name])?;
        let netns = Self {
            path: Path::new(BIND_MOUNTS).join(&name),
            name,
        };
        netns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sysctl of this namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(argv);
        ip(&args)
    }

    /// A command that runs inside the namespace, to be spawned by the caller.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(argv);
        command
    }

    /// Runs `f` on a thread that joined the namespace. A socket belongs to
    /// the namespace it was created in for its whole life, so what `f`
    /// creates can be used from any thread afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let file = File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<T> {
                    // setns(2) with CLONE_NEWNET moves only this thread.
                    // SAFETY: a valid namespace fd, and the flag matches it.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error()).with_context(|| {
                            format!("cannot enter network namespace {}", self.name)
                        });
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow!("a thread in network namespace {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Sockets still open inside keep the namespace itself alive until
        // they close; only the name goes now.
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("bench: {error:#}");
        }
    }
}

/// Removes namespaces and daemon logs left by a bench that was killed
/// (SIGKILL runs no Drop).
pub fn remove_leftovers() {
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let dead = name
                .strip_prefix(PREFIX)
                .filter(|rest| rest.ends_with(".log"))
                .and_then(|rest| rest.split('-').next())
                .is_some_and(|pid| !Path::new("/proc").join(pid).exists());
            if dead {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    let Ok(entries) = fs::read_dir(BIND_MOUNTS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            println!("bench: removing network namespace {name} left by an earlier run");
            if let Err(error) = ip(&["netns", "del", &name]) {
                eprintln!("bench: {error:#}");
            }
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run ip {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
