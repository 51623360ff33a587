//! Child processes that never outlive their owner (daemons, servers, load
//! generators), and what /proc says about a process's CPU and memory.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};

/// A child process that is stopped when dropped (SIGTERM, `drop_grace` for
/// a clean exit, then SIGKILL), so that no error path or failed assertion
/// leaves a daemon or a server behind.
pub struct Guarded {
    child: Child,
    what: String,
    drop_grace: Duration,
}

impl Guarded {
    /// Spawns `command`, which is then told to stop (SIGTERM) when the
    /// *thread* that spawned it ends (`PR_SET_PDEATHSIG`), so that even an
    /// owner killed with SIGKILL leaves no daemon with programs attached.
    /// Spawn from the thread that owns the guard (a test's, the bench's
    /// main thread), never from a short-lived helper thread (such as
    /// `Netns::run`'s), or the child is stopped when that thread ends.
    ///
    /// The child gets a process group of its own: Ctrl-C reaches the owner
    /// only, which stops its children in order through their guards.
    pub fn spawn(command: &mut Command, what: &str, drop_grace: Duration) -> anyhow::Result<Self> {
        command.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {what} ({command:?})"))?;
        Ok(Self {
            child,
            what: what.to_owned(),
            drop_grace,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's exit status, if it has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("cannot check on {}", self.what))
    }

    /// The child itself: its pipes, for callers that read its output.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `signal` to the child, unless it has been reaped.
    fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: signals our own child, which has not been reaped yet.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot signal {}", self.what));
        }
        Ok(())
    }

    /// SIGTERM, up to `grace` for a clean exit (idlemon detaches its
    /// programs then), then SIGKILL. The status says which ended it.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if !grace.is_zero() {
            self.signal(libc::SIGTERM)?;
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Some(status) = self.try_wait()? {
                    return Ok(status);
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        self.child
            .kill()
            .with_context(|| format!("cannot kill {}", self.what))?;
        self.child
            .wait()
            .with_context(|| format!("cannot reap {}", self.what))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Err(error) = self.stop(self.drop_grace) {
            eprintln!("could not stop {}: {error:#}", self.what);
        }
    }
}

/// CPU time (user + system) of a whole process, threads included.
pub fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let ticks = stat_ticks(&stat).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|hz| *hz > 0).unwrap_or(100);
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// utime + stime, in clock ticks, from the text of /proc/PID/stat.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may hold spaces and
    // parentheses: count fields after its last closing one (field 3, the
    // state, comes first).
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime is field 14 and stime field 15 of proc(5), 1-based.
    let ticks = |index: usize| fields.get(index)?.parse::<u64>().ok();
    Some(ticks(11)? + ticks(12)?)
}

/// Resident memory of a process, in bytes, from /proc/PID/status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// VmRSS.
    pub rss: u64,
    /// VmHWM: the peak of VmRSS.
    pub peak: u64,
    /// RssAnon: heap and stacks, what the daemon's own data costs.
    pub anon: u64,
    /// RssFile + RssShmem: mapped files (the binary) and mapped BPF maps.
    pub file: u64,
}

pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    parse_memory(&status).with_context(|| format!("in /proc/{pid}/status"))
}

fn parse_memory(status: &str) -> anyhow::Result<Memory> {
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| anyhow!("no {name} in kB"))
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")? + field("RssShmem:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (idle mon) (x)) S 1 4242 4242 0 -1 4194560 700 0 0 0 \
                    25 17 0 0 20 0 5 0 100 1000 200";
        assert_eq!(stat_ticks(stat), Some(42));
        assert_eq!(stat_ticks("4242 (cut"), None);
        assert_eq!(stat_ticks("4242 (short) S 1 2"), None);
    }

    #[test]
    fn memory_is_read_in_bytes() {
        let status = "Name:\tidlemon\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n\
                      RssAnon:\t   512 kB\nRssFile:\t   256 kB\nRssShmem:\t   256 kB\n";
        assert_eq!(
            parse_memory(status).unwrap(),
            Memory {
                rss: 1 << 20,
                peak: 2 << 20,
                anon: 512 << 10,
                file: 512 << 10,
            }
        );
        let error = parse_memory("VmRSS:\t1 kB\n").unwrap_err();
        assert!(error.to_string().contains("VmHWM"), "{error}");
    }

    #[test]
    fn reads_own_cpu_and_memory() {
        let pid = std::process::id();
        assert!(cpu(pid).is_ok());
        let memory = memory(pid).unwrap();
        assert!(memory.rss > 0 && memory.peak >= memory.rss);
    }

    #[test]
    fn a_guarded_child_is_stopped_on_drop_and_its_status_says_how() {
        let mut sleeper = Command::new("sleep");
        sleeper.arg("60");
        let guarded = Guarded::spawn(&mut sleeper, "sleep", Duration::ZERO).unwrap();
        let pid = guarded.pid();
        drop(guarded);
        // Reaped: the pid is gone (or already reused by an unrelated process
        // that is not our sleep).
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep");

        let mut sleeper = Command::new("sleep");
        sleeper.arg("60");
        let mut guarded = Guarded::spawn(&mut sleeper, "sleep", Duration::ZERO).unwrap();
        let status = guarded.stop(Duration::from_secs(5)).unwrap();
        // sleep dies of the SIGTERM within the grace period.
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn a_command_that_does_not_exist_is_an_error_naming_it() {
        let error = Guarded::spawn(
            &mut Command::new("/nonexistent/idlemon"),
            "idlemon",
            Duration::ZERO,
        )
        .err()
        .unwrap();
        assert!(
            format!("{error:#}").contains("cannot start idlemon"),
            "{error:#}"
        );
    }
}
