//! The daemon under test, driven through the test kit's handle, and what
//! its /metrics say.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail};
use idlemon_testkit::metrics;

use super::interrupted;

/// How long the bench's children get for a clean exit when dropped.
pub const DROP_GRACE: Duration = Duration::from_secs(10);

/// idlemon, started by the bench in the host's namespace on free ports, with
/// `--event-log ''`: the kit's handle, stopped cleanly when dropped (its
/// exit detaches its programs before the next part loads its own).
pub struct Daemon(idlemon_testkit::Daemon);

impl Daemon {
    pub fn start(binary: &Path, extra: &[String]) -> anyhow::Result<Self> {
        let mut args: Vec<OsString> = ["--event-log", "", "--log-level", "warn"]
            .into_iter()
            .map(OsString::from)
            .collect();
        args.extend(extra.iter().map(OsString::from));
        idlemon_testkit::Daemon::launch_on_host(binary, &args).map(Self)
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.0.started()
    }

    /// Fails with the daemon's log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.0.check_alive()
    }

    /// Waits for `GET /readyz` to answer 200 (programs attached, first walk
    /// published); returns the time since the start.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        self.0
            .wait_ok("/readyz", timeout, Duration::from_millis(20), go_on)
    }

    pub fn metrics(&mut self) -> anyhow::Result<Metrics> {
        self.check_alive()?;
        match self.0.fetch("/metrics")? {
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
            go_on()?;
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

    /// Stops it, and fails unless it exited cleanly.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let status = self.0.stop_within(Duration::from_secs(15))?;
        if !status.success() {
            bail!("idlemon stopped with {status}; its log:\n{}", self.0.log());
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A part that failed still leaves a daemon that detached its programs.
        let _ = self.0.stop_within(Duration::from_secs(15));
    }
}

/// Fails once the bench was interrupted (Ctrl-C).
fn go_on() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
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
}
