//! The daemon under test, the helper processes, and what /proc and /metrics
//! say about them.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use idlemon_testkit::metrics;

use super::interrupted;

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, so
/// that no error path leaves a daemon or a traffic generator behind.
pub struct Guarded {
    child: Child,
    what: String,
}

impl Guarded {
    /// Spawns `command`. Call it from the main thread: the child is told to
    /// stop when the thread that started it ends, so that even a bench
    /// killed with SIGKILL leaves no daemon with programs attached.
    pub fn spawn(command: &mut Command, what: &str) -> anyhow::Result<Self> {
        // Its own process group: Ctrl-C reaches the bench only, which stops
        // its children in order through these guards.
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
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("cannot check on {}", self.what))
    }

    /// SIGTERM, up to `grace` for a clean exit (idlemon detaches its
    /// programs then), then SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
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
        if let Err(error) = self.stop(Duration::from_secs(10)) {
            eprintln!("bench: could not stop {}: {error:#}", self.what);
        }
    }
}

/// idlemon, started by the bench with `--event-log ''` and a free port.
pub struct Daemon {
    process: Guarded,
    pub addr: SocketAddr,
    pub started: Instant,
    log: PathBuf,
}

impl Daemon {
    pub fn start(binary: &Path, extra: &[String]) -> anyhow::Result<Self> {
        let addr = free_port()?;
        // Its own API port too, so that it never meets another idlemon's.
        let mut api_addr = free_port()?;
        while api_addr == addr {
            api_addr = free_port()?;
        }
        let log = std::env::temp_dir().join(format!(
            "idlemon-bench-{}-{}.log",
            std::process::id(),
            addr.port()
        ));
        let stderr =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .args([
                "--listen",
                &addr.to_string(),
                "--api-listen",
                &api_addr.to_string(),
                "--event-log",
                "",
                "--log-level",
                "warn",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let started = Instant::now();
        let process = Guarded::spawn(&mut command, "idlemon")?;
        Ok(Self {
            process,
            addr,
            started,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Fails with the daemon's own last words if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.process.try_wait()? {
            bail!(
                "idlemon exited ({status}); its stderr:\n{}",
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Waits for `GET /readyz` to answer 200: programs attached, first walk
    /// published.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Ok((200, _)) = http_get(self.addr, "/readyz") {
                return Ok(self.started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!(
                    "idlemon not ready after {timeout:?}; its stderr:\n{}",
                    tail(&self.log, 20)
                );
            }
            if interrupted() {
                bail!("interrupted");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn metrics(&mut self) -> anyhow::Result<Metrics> {
        self.check_alive()?;
        match http_get(self.addr, "/metrics")? {
            (200, body) => Ok(Metrics(body)),
            (status, body) => bail!("GET /metrics answered {status}: {body}"),
        }
    }

    /// Polls /metrics until `done` holds, and returns the metrics that did.
    pub fn poll_metrics(
        &mut self,
        timeout: Duration,
        every: Duration,
        mut done: impl FnMut(&Metrics) -> bool,
    ) -> anyhow::Result<Metrics> {
        let deadline = Instant::now() + timeout;
        loop {
            // /metrics refuses connections until the programs are loaded.
            match self.metrics() {
                Ok(metrics) if done(&metrics) => return Ok(metrics),
                Ok(_) => {}
                Err(error) => self.check_alive().map_err(|_| error)?,
            }
            if Instant::now() >= deadline {
                bail!("condition on idlemon's /metrics not reached within {timeout:?}");
            }
            if interrupted() {
                bail!("interrupted");
            }
            thread::sleep(every);
        }
    }

    /// Waits for `count` more completed walks, and returns the scan CPU and
    /// wall seconds of each.
    pub fn sample_scans(&mut self, count: usize, interval: Duration) -> anyhow::Result<Vec<Scan>> {
        let mut samples = Vec::with_capacity(count);
        let mut last = self.metrics()?.value("idlemon_scans_total").unwrap_or(0.0);
        let deadline = Instant::now() + interval * (count as u32 + 2) + Duration::from_secs(30);
        while samples.len() < count {
            let metrics = self.poll_metrics(
                deadline.saturating_duration_since(Instant::now()),
                Duration::from_millis(100),
                |m| m.value("idlemon_scans_total").unwrap_or(0.0) > last,
            )?;
            last = metrics.value("idlemon_scans_total").unwrap_or(last);
            samples.push(Scan {
                cpu_seconds: metrics
                    .value("idlemon_scan_cpu_seconds")
                    .ok_or_else(|| anyhow!("no idlemon_scan_cpu_seconds in /metrics"))?,
                wall_seconds: metrics
                    .value("idlemon_scan_duration_seconds")
                    .ok_or_else(|| anyhow!("no idlemon_scan_duration_seconds in /metrics"))?,
                tracked: metrics.value("idlemon_tracked_sockets").unwrap_or(0.0),
                at_risk: metrics
                    .samples("idlemon_at_risk_sockets")
                    .iter()
                    .map(|(_, value)| value)
                    .sum(),
            });
        }
        Ok(samples)
    }

    pub fn stop(mut self) -> anyhow::Result<()> {
        let status = self.process.stop(Duration::from_secs(15))?;
        if !status.success() {
            bail!(
                "idlemon stopped with {status}; its stderr:\n{}",
                tail(&self.log, 20)
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The process guard stops the daemon; the log only matters while it runs.
        let _ = self.process.stop(Duration::from_secs(15));
        let _ = fs::remove_file(&self.log);
    }
}

/// One walk, as the daemon reported it.
#[derive(Debug, Clone, Copy)]
pub struct Scan {
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    pub tracked: f64,
    /// Sockets the walk flagged at risk, over every owner.
    pub at_risk: f64,
}

/// The Prometheus text of one scrape, read with the test kit's parser.
#[derive(Debug, Clone)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of an unlabelled sample.
    pub fn value(&self, name: &str) -> Option<f64> {
        metrics::samples(&self.0)
            .find(|sample| sample.name == name && sample.labels.is_empty())
            .map(|sample| sample.value)
    }

    /// Every sample of `name`, with its labels.
    pub fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        metrics::samples(&self.0)
            .filter(|sample| sample.name == name)
            .map(|sample| {
                let labels = sample
                    .labels
                    .iter()
                    .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                    .collect();
                (labels, sample.value)
            })
            .collect()
    }
}

/// GET `path` from the daemon, by the test kit's HTTP/1.0 client (long
/// scrapes of 200,000 sockets may take their time).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(idlemon_testkit::socket::get(
        addr,
        path,
        Duration::from_secs(30),
    )?)
}

/// A port nobody listens on now. Another process may take it before the
/// daemon binds it; the daemon then fails loudly, which is acceptable here.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    listener.local_addr().context("cannot find a free port")
}

/// CPU time (user + system) of a whole process, threads included.
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: count fields
    // after its closing one (field 3, the state, comes first).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .and_then(|field| field.parse().ok())
            .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))
    };
    // utime is field 14 and stime field 15 of proc(5), 1-based.
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|hz| *hz > 0).unwrap_or(100);
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

/// Resident memory of a process, in bytes, from /proc/PID/status.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// VmRSS.
    pub rss: u64,
    /// VmHWM: the peak of VmRSS.
    pub peak: u64,
    /// RssAnon: heap and stacks, what the daemon's own data costs.
    pub anon: u64,
    /// RssFile: mapped files (the binary) and, here, mapped BPF maps.
    pub file: u64,
}

pub fn process_memory(pid: u32) -> anyhow::Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")? + field("RssShmem:")?,
    })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP idlemon_tracked_sockets x\n\
        # TYPE idlemon_tracked_sockets gauge\n\
        idlemon_tracked_sockets 200004\n\
        idlemon_probe_info{hook=\"send\",kind=\"tp_btf\"} 1\n\
        idlemon_probe_info{hook=\"keepalive\",kind=\"none\"} 1\n\
        idlemon_scan_cpu_seconds 0.0725\n\
        idlemon_tracked_sockets_other 3\n";

    #[test]
    fn reads_unlabelled_values() {
        let metrics = Metrics(TEXT.to_owned());
        assert_eq!(metrics.value("idlemon_tracked_sockets"), Some(200_004.0));
        assert_eq!(metrics.value("idlemon_scan_cpu_seconds"), Some(0.0725));
        assert_eq!(metrics.value("idlemon_missing"), None);
    }

    #[test]
    fn reads_labels() {
        let metrics = Metrics(TEXT.to_owned());
        let samples = metrics.samples("idlemon_probe_info");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].0["hook"], "send");
        assert_eq!(samples[0].0["kind"], "tp_btf");
        assert_eq!(samples[1].0["kind"], "none");
    }

    #[test]
    fn reads_own_cpu_and_memory() {
        let pid = std::process::id();
        assert!(process_cpu(pid).is_ok());
        let memory = process_memory(pid).unwrap();
        assert!(memory.rss > 0 && memory.peak >= memory.rss);
    }
}
