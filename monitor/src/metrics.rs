//! Prometheus metrics. Labels stay bounded: hooks, kinds, reasons and states,
//! never addresses or ports.

mod scrape;

use std::sync::Arc;

use anyhow::Context as _;
use monitor_common::TCP_MAX_STATE;
use prometheus::{
    Encoder as _, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use self::scrape::{KernelCounters, KernelMaps, WalkCost};
use self::scrape::{ScrapeCollector, Scraped, WalkSeries};
use crate::{
    events::{Classification, ConnectFailure, EventRecord, Kind},
    probes::HookStatus,
    sockets::Summary,
};

/// TCP state names, indexed by the kernel's state number (include/net/tcp_states.h).
const TCP_STATES: [&str; TCP_MAX_STATE as usize + 1] = [
    "UNKNOWN",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// An owner label of the per-workload series (`--owner-labels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OwnerLabel {
    Namespace,
    Workload,
    Pod,
}

/// The owner labels the per-workload series carry. Without `pod` (the
/// default), a rollout does not start new series: per-pod detail is in
/// /sockets and the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerLabels {
    pub namespace: bool,
    pub pod: bool,
    pub workload: bool,
}

impl OwnerLabels {
    pub const DEFAULT: Self = Self {
        namespace: true,
        pod: false,
        workload: true,
    };

    pub fn of(labels: &[OwnerLabel]) -> Self {
        Self {
            namespace: labels.contains(&OwnerLabel::Namespace),
            pod: labels.contains(&OwnerLabel::Pod),
            workload: labels.contains(&OwnerLabel::Workload),
        }
    }

    /// The label names, in the order of `Attribution::labels`.
    fn names(self) -> Vec<&'static str> {
        [
            (self.namespace, "namespace"),
            (self.pod, "pod"),
            (self.workload, "workload"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }

    /// The chosen values of (namespace, pod, workload).
    fn pick(self, [namespace, pod, workload]: &[String; 3]) -> Vec<String> {
        [
            (self.namespace, namespace),
            (self.pod, pod),
            (self.workload, workload),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, value)| value.clone())
        .collect()
    }

    /// The label values of the series past the cap: `workload="_other"`
    /// (or the last chosen label, without workload), the rest empty.
    fn other(self) -> Vec<String> {
        let mut values = vec![String::new(); self.names().len()];
        if let Some(last) = values.last_mut() {
            "_other".clone_into(last);
        }
        values
    }
}

/// Caps on label cardinality.
#[derive(Debug, Clone, Copy)]
pub struct LabelLimits {
    /// The kernel socket table's capacity, exported for its fill ratio.
    pub table_capacity: u32,
    /// Distinct (namespace, pod, workload) sets per reason.
    pub owners: usize,
    /// Destinations with their own series; 0 disables the metric.
    pub destinations: usize,
    /// Owner labels of idlemon_at_risk_sockets and idlemon_idle_timeout_resets_total.
    pub owner_labels: OwnerLabels,
}

pub struct Metrics {
    registry: Registry,
    limits: LabelLimits,
    /// The series rendered at scrape time: the latest walk's and the
    /// kernel's counters.
    scraped: Arc<Scraped>,
    attribution_dropped: IntCounter,
    pub kubernetes_pods: IntGauge,
    pub kubernetes_watch_errors: IntCounter,
    pub scans: IntCounter,
    pub scan_errors: IntCounterVec,
    /// Wall time of each walk (a histogram: a 30 s scrape sees every walk
    /// of a 5 s interval, not one in six).
    walk_seconds: Histogram,
    /// CPU time of the walks, summed.
    walk_cpu_seconds: prometheus::Counter,
    node_info: IntGaugeVec,
    idle_timeout_resets: IntCounterVec,
    /// Owner label sets of idlemon_idle_timeout_resets_total so far, capped
    /// at `LabelLimits::owners`.
    reset_owners: std::sync::Mutex<std::collections::HashSet<Vec<String>>>,
    pub file_walk_available: IntGauge,
    pub ready: IntGauge,
    retransmit_timeouts: IntCounterVec,
    connect_failures: IntCounterVec,
    destination_connect_failures: IntCounterVec,
    events: IntCounterVec,
    idle_before_reset: Histogram,
    pub malformed_events: IntCounter,
    pub event_log_errors: IntCounter,
    event_log_dropped: IntCounterVec,
    pub http_refusals: IntCounterVec,
    pub api_walks: IntCounter,
    /// cgroup directories keepalive enforcement is attached to.
    pub enforced_cgroups: IntGauge,
    /// SIGHUP rereads of the config file, by result (ok, invalid).
    pub config_reloads: IntCounterVec,
}

/// The running kernel's release (`uname -r`), for idlemon_node_info.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Buckets of `idlemon_walk_duration_seconds`: 1 ms (a few sockets) to 10 s
/// (hundreds of thousands on a busy node, or a stall).
const WALK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of `idlemon_idle_before_reset_seconds`: 1 s to 2 h, with the
/// common middlebox timeouts (60, 350, 900, 3600) as edges.
const IDLE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 350.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
];

impl Metrics {
    pub fn new(
        idle_threshold_seconds: f64,
        idle_timeout_seconds: f64,
        hooks: &[HookStatus],
        limits: LabelLimits,
    ) -> anyhow::Result<Self> {
        let registry = Registry::new();
        let register = |collector: Box<dyn prometheus::core::Collector>| {
            registry.register(collector).context("registering a metric")
        };

        let build_info = IntGaugeVec::new(
            Opts::new(
                "idlemon_build_info",
                "idlemon's version, git revision and architecture; always 1.",
            ),
            &["version", "revision", "arch"],
        )?;
        build_info
            .with_label_values(&[
                crate::build_info::VERSION,
                crate::build_info::REVISION,
                crate::build_info::arch(),
            ])
            .set(1);
        register(Box::new(build_info))?;

        let threshold = Gauge::new(
            "idlemon_idle_threshold_seconds",
            "Idle time after which a socket without effective keepalive is at risk.",
        )?;
        threshold.set(idle_threshold_seconds);
        register(Box::new(threshold))?;
        let node_info = IntGaugeVec::new(
            Opts::new(
                "idlemon_node_info",
                "The node idlemon runs on (--node-name, else the hostname) and its kernel \
                 release; always 1. Join on it to tell kernels apart.",
            ),
            &["node", "kernel_release"],
        )?;
        register(Box::new(node_info.clone()))?;
        // process_cpu_seconds_total, process_resident_memory_bytes, ...: the
        // daemon's own cost, as every Prometheus exporter reports it.
        register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let timeout = Gauge::new(
            "idlemon_idle_timeout_seconds",
            "Default idle timeout of the path's middlebox (the config file may override it per destination).",
        )?;
        timeout.set(idle_timeout_seconds);
        register(Box::new(timeout))?;

        let probe_info = IntGaugeVec::new(
            Opts::new(
                "idlemon_probe_info",
                "How each hook attached (kind=\"none\": not attached, running degraded); always 1.",
            ),
            &["hook", "kind"],
        )?;
        let degraded = IntGaugeVec::new(
            Opts::new(
                "idlemon_degraded",
                "1 for each hook whose absence makes idlemon degraded (not ready): the log and \
                 /readyz say what is missing.",
            ),
            &["hook"],
        )?;
        for status in hooks {
            let kind = status.kind.map_or("none", |kind| kind.as_str());
            probe_info.with_label_values(&[status.hook, kind]).set(1);
            degraded
                .with_label_values(&[status.hook])
                .set(i64::from(status.degraded));
        }
        register(Box::new(probe_info))?;
        register(Box::new(degraded))?;

        let owner_names = limits.owner_labels.names();
        let idle_timeout_resets = IntCounterVec::new(
            Opts::new(
                "idlemon_idle_timeout_resets_total",
                "RSTs received on connections idle at least the path's idle timeout \
                 (classification idle_timeout_suspected), by owner (--owner-labels; \
                 workload=\"_other\" past the series cap).",
            ),
            &owner_names,
        )?;
        register(Box::new(idle_timeout_resets.clone()))?;
        let attribution_dropped = IntCounter::new(
            "idlemon_attribution_series_dropped_total",
            "Owner label sets folded into workload=\"_other\" by --max-attribution-series: \
             per scan for idlemon_at_risk_sockets, per reset for idlemon_idle_timeout_resets_total.",
        )?;
        register(Box::new(attribution_dropped.clone()))?;
        let table_capacity = IntGauge::new(
            "idlemon_socket_table_capacity",
            "Capacity of the kernel socket table (--max-sockets).",
        )?;
        table_capacity.set(limits.table_capacity as i64);
        register(Box::new(table_capacity))?;
        let kubernetes_pods = IntGauge::new(
            "idlemon_kubernetes_pods",
            "Pods of this node known from the Kubernetes API watch.",
        )?;
        register(Box::new(kubernetes_pods.clone()))?;
        let kubernetes_watch_errors = IntCounter::new(
            "idlemon_kubernetes_watch_errors_total",
            "Failed lists or watches of this node's pods (names fall back to pod UIDs).",
        )?;
        register(Box::new(kubernetes_watch_errors.clone()))?;
        let scans = IntCounter::new("idlemon_scans_total", "Socket walks completed.")?;
        register(Box::new(scans.clone()))?;
        let scan_errors = IntCounterVec::new(
            Opts::new(
                "idlemon_scan_errors_total",
                "Network namespaces that could not be walked, by reason.",
            ),
            &["reason"],
        )?;
        register(Box::new(scan_errors.clone()))?;
        let walk_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "idlemon_walk_duration_seconds",
                "Wall time of each socket walk and classification.",
            )
            .buckets(WALK_BUCKETS.to_vec()),
        )?;
        register(Box::new(walk_seconds.clone()))?;
        let walk_cpu_seconds = prometheus::Counter::new(
            "idlemon_walk_cpu_seconds_total",
            "CPU time spent in socket walks and classification.",
        )?;
        register(Box::new(walk_cpu_seconds.clone()))?;
        let file_walk_available = IntGauge::new(
            "idlemon_scan_file_walk_available",
            "1 when periodic scans can walk every open file once (iter/task_file) for all network namespaces; 0: the kernel refused it (the log says why), and each namespace is walked by iter/tcp.",
        )?;
        register(Box::new(file_walk_available.clone()))?;
        let ready = IntGauge::new(
            "idlemon_ready",
            "1 when every required program is attached and a walk has completed.",
        )?;
        register(Box::new(ready.clone()))?;

        let retransmit_timeouts = IntCounterVec::new(
            Opts::new(
                "idlemon_retransmit_timeouts_total",
                "Established connections the kernel closed after unanswered retransmissions \
                 (ETIMEDOUT), by classification: idle_timeout_suspected when they began with a \
                 send after an idle period of at least the path's idle timeout (a middlebox \
                 forgot the flow and dropped, instead of resetting, what followed).",
            ),
            &["classification"],
        )?;
        register(Box::new(retransmit_timeouts.clone()))?;
        for classification in ["idle_timeout_suspected", "other"] {
            retransmit_timeouts.with_label_values(&[classification]);
        }
        let connect_failures = IntCounterVec::new(
            Opts::new(
                "idlemon_connect_failures_total",
                "Connects (active opens) that failed, by reason: timeout (SYNs unanswered), \
                 refused, unreachable (ICMP), reset.",
            ),
            &["reason"],
        )?;
        register(Box::new(connect_failures.clone()))?;
        for reason in ConnectFailure::ALL {
            connect_failures.with_label_values(&[reason.as_str()]);
        }
        let destination_connect_failures = IntCounterVec::new(
            Opts::new(
                "idlemon_destination_connect_failures_total",
                "Failed connects by destination (address:port) and reason, for the first \
                 --destination-labels destinations that failed (the rest under \
                 destination=\"_other\"); absent unless enabled.",
            ),
            &["destination", "reason"],
        )?;
        if limits.destinations > 0 {
            register(Box::new(destination_connect_failures.clone()))?;
        }
        let events = IntCounterVec::new(
            Opts::new(
                "idlemon_events_total",
                "Events explained and logged, by kind.",
            ),
            &["kind"],
        )?;
        register(Box::new(events.clone()))?;
        for kind in Kind::ALL {
            events.with_label_values(&[kind.as_str()]);
        }
        let idle_before_reset = Histogram::with_opts(
            HistogramOpts::new(
                "idlemon_idle_before_reset_seconds",
                "How long sockets had been idle before a RST ended them (including the idle \
                 period before a send that the RST answered).",
            )
            .buckets(IDLE_BUCKETS.to_vec()),
        )?;
        register(Box::new(idle_before_reset.clone()))?;
        let malformed_events = IntCounter::new(
            "idlemon_malformed_events_total",
            "Kernel events user space could not decode (a version mismatch).",
        )?;
        register(Box::new(malformed_events.clone()))?;
        let event_log_errors = IntCounter::new(
            "idlemon_event_log_errors_total",
            "Event log writes that failed (the in-memory history still has the events).",
        )?;
        register(Box::new(event_log_errors.clone()))?;
        let event_log_dropped = IntCounterVec::new(
            Opts::new(
                "idlemon_event_log_dropped_total",
                "Events the event log could not take in time (stdout or the file blocked and its \
                 queue was full), by kind; ordinary events go first, and /events still has them \
                 while its history does.",
            ),
            &["kind"],
        )?;
        register(Box::new(event_log_dropped.clone()))?;
        for kind in Kind::ALL {
            event_log_dropped.with_label_values(&[kind.as_str()]);
        }
        let http_refusals = IntCounterVec::new(
            Opts::new(
                "idlemon_http_refusals_total",
                "HTTP requests and connections refused, by server (metrics: --listen, api: \
                 --api-listen) and reason.",
            ),
            &["listener", "reason"],
        )?;
        register(Box::new(http_refusals.clone()))?;
        let api_walks = IntCounter::new(
            "idlemon_api_walks_total",
            "Complete walks run for /sockets requests (concurrent requests share one).",
        )?;
        register(Box::new(api_walks.clone()))?;

        for reason in ["gone", "enter", "walk", "not_a_namespace"] {
            scan_errors.with_label_values(&[reason]);
        }

        let scraped = Arc::new(Scraped::new(limits)?);
        register(Box::new(ScrapeCollector(Arc::clone(&scraped))))?;
        let enforced_cgroups = IntGauge::new(
            "idlemon_keepalive_enforced_cgroups",
            "cgroup directories keepalive enforcement is attached to (selected cgroups, units and \
             pods; 1 for the root when nothing is selected).",
        )?;
        register(Box::new(enforced_cgroups.clone()))?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "idlemon_config_reloads_total",
                "Rereads of --config on SIGHUP, by result: ok, or invalid (the running config stays).",
            ),
            &["result"],
        )?;
        for result in ["ok", "invalid"] {
            config_reloads.with_label_values(&[result]);
        }
        register(Box::new(config_reloads.clone()))?;

        Ok(Self {
            registry,
            limits,
            scraped,
            attribution_dropped,
            kubernetes_pods,
            kubernetes_watch_errors,
            scans,
            scan_errors,
            walk_seconds,
            walk_cpu_seconds,
            node_info,
            idle_timeout_resets,
            reset_owners: std::sync::Mutex::default(),
            file_walk_available,
            ready,
            retransmit_timeouts,
            connect_failures,
            destination_connect_failures,
            events,
            idle_before_reset,
            malformed_events,
            event_log_errors,
            event_log_dropped,
            http_refusals,
            api_walks,
            enforced_cgroups,
            config_reloads,
        })
    }

    /// Exports `idlemon_keepalive_enforcements_total` for `mode` (`dry_run`
    /// or `on`), every reason from zero.
    pub fn enable_enforcement(&self, mode: &'static str) {
        let _ = self.scraped.enforce_mode.set(mode);
    }

    /// Reads the kernel's counters at each scrape from now on.
    pub fn read_kernel(&self, kernel: impl KernelCounters + 'static) {
        self.scraped.read_kernel(Box::new(kernel));
    }

    /// Publishes one walk: its gauges are what scrapes see until the next
    /// one; its cost goes to the walk histogram and counters.
    pub fn publish_walk(&self, summary: &Summary, cost: WalkCost) {
        let (series, dropped) = WalkSeries::fold(summary, cost, &self.limits);
        self.attribution_dropped.inc_by(dropped);
        self.scraped.publish(series);
        self.walk_seconds.observe(cost.wall_seconds);
        self.walk_cpu_seconds.inc_by(cost.cpu_seconds);
        // Last: a scraper that sees the count move sees this walk's gauges.
        self.scans.inc();
    }

    /// Sets idlemon_node_info.
    pub fn node_info(&self, node: &str, kernel_release: &str) {
        self.node_info
            .with_label_values(&[node, kernel_release])
            .set(1);
    }

    pub fn observe_event(&self, record: &EventRecord) {
        self.events.with_label_values(&[record.kind.as_str()]).inc();
        match record.kind {
            Kind::ResetReceived => {}
            Kind::RetransmitTimeout => {
                let classification = record.classification.unwrap_or(Classification::Other);
                self.retransmit_timeouts
                    .with_label_values(&[classification.as_str()])
                    .inc();
                return;
            }
            Kind::ConnectFailed => {
                self.observe_connect_failure(record);
                return;
            }
            _ => return,
        }
        let classification = record.classification.unwrap_or(Classification::Other);
        self.scraped
            .resets_received
            .with_label_values(&[classification.as_str()])
            .inc();
        if classification == Classification::IdleTimeoutSuspected {
            let chosen = self.limits.owner_labels;
            let owner = chosen.pick(&record.attribution.labels(record.comm.as_deref()));
            let labels = match self.reset_owners.lock() {
                Ok(mut seen) if seen.contains(&owner) || seen.len() < self.limits.owners => {
                    seen.insert(owner.clone());
                    owner
                }
                _ => {
                    self.attribution_dropped.inc();
                    chosen.other()
                }
            };
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            self.idle_timeout_resets.with_label_values(&labels).inc();
        }
        if let Some(idle) = record.idle_before_seconds {
            self.idle_before_reset.observe(idle);
        }
    }

    fn observe_connect_failure(&self, record: &EventRecord) {
        let Some(reason) = record.reason else {
            return;
        };
        self.connect_failures
            .with_label_values(&[reason.as_str()])
            .inc();
        if self.limits.destinations == 0 {
            return;
        }
        let destination = record.remote.to_string();
        let label = match self.scraped.failed_destinations.lock() {
            Ok(mut seen)
                if seen.contains(&destination) || seen.len() < self.limits.destinations =>
            {
                seen.insert(destination.clone());
                destination
            }
            _ => "_other".to_owned(),
        };
        self.destination_connect_failures
            .with_label_values(&[&label, reason.as_str()])
            .inc();
    }

    pub fn event_log_dropped(&self, kind: Kind) {
        self.event_log_dropped
            .with_label_values(&[kind.as_str()])
            .inc();
    }

    pub fn render(&self) -> anyhow::Result<String> {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .context("encoding metrics")?;
        String::from_utf8(text).context("metrics are not UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use monitor_common::counter;

    use super::*;
    use crate::sockets::Risk;

    #[test]
    fn build_info_names_version_revision_and_arch() {
        let metrics = Metrics::new(300.0, 350.0, &[], LIMITS).expect("metrics");
        let text = metrics.render().expect("render");
        let series = format!(
            "idlemon_build_info{{arch=\"{}\",revision=\"{}\",version=\"{}\"}} 1",
            crate::build_info::arch(),
            crate::build_info::REVISION,
            env!("CARGO_PKG_VERSION"),
        );
        assert!(
            text.lines().any(|line| line == series),
            "{series} not in\n{text}"
        );
    }

    #[test]
    fn kernel_counters_are_summed_at_scrape_and_never_go_back() {
        let metrics = Metrics::new(300.0, 350.0, &[], LIMITS).expect("metrics");
        metrics.enable_enforcement("dry_run");
        let kernel = FakeKernel::default();
        metrics.read_kernel(kernel.clone());
        let mut totals = vec![0u64; counter::SLOTS as usize];
        totals[1] = 5;
        totals[counter::SEND_AFTER_IDLE as usize] = 2;
        totals[counter::SOCKET_TABLE_INSERTS as usize] = 10;
        totals[counter::SOCKET_TABLE_REMOVES as usize] = 4;
        totals[counter::RESET_EVENTS_LOST as usize] = 3;
        totals[counter::ENFORCEMENTS as usize] = 6;
        kernel.set(&totals);
        let text = metrics.render().expect("render");
        for series in [
            "idlemon_tcp_state_transitions_total{state=\"ESTABLISHED\"} 5",
            "idlemon_tcp_state_transitions_total{state=\"NEW_SYN_RECV\"} 0",
            "idlemon_sends_after_idle_total 2",
            "idlemon_socket_table_entries 6",
            "idlemon_resets_received_total{classification=\"unclassified\"} 3",
            "idlemon_resets_received_total{classification=\"other\"} 0",
            "idlemon_keepalive_enforcements_total{mode=\"dry_run\",reason=\"no_keepalive\"} 6",
            "# TYPE idlemon_sends_after_idle_total counter",
            "# TYPE idlemon_socket_table_entries gauge",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        // Every reason from zero, each once.
        let enforcements = text
            .lines()
            .filter(|line| line.starts_with("idlemon_keepalive_enforcements_total{"))
            .count();
        assert_eq!(enforcements, 7, "{text}");
        assert!(text.contains(
            "idlemon_keepalive_enforcements_total{mode=\"dry_run\",reason=\"unreadable\"} 0"
        ));
        // A read that fails (0) or goes back does not take a counter back.
        totals[1] = 3;
        totals[counter::SEND_AFTER_IDLE as usize] = 7;
        kernel.set(&totals);
        let text = metrics.render().expect("render");
        assert!(text.contains("idlemon_tcp_state_transitions_total{state=\"ESTABLISHED\"} 5"));
        assert!(text.contains("idlemon_sends_after_idle_total 7"));
        kernel.set(&[]);
        assert!(
            metrics
                .render()
                .expect("render")
                .contains("idlemon_sends_after_idle_total 7")
        );
    }

    #[test]
    fn without_the_kernel_counters_start_at_zero() {
        let text = Metrics::new(300.0, 350.0, &[], LIMITS)
            .expect("metrics")
            .render()
            .expect("render");
        assert!(text.contains("idlemon_tcp_state_transitions_total{state=\"ESTABLISHED\"} 0"));
        assert!(text.contains("idlemon_sends_after_idle_total 0"));
        assert!(text.contains("idlemon_idle_timeout_seconds 350"));
        assert!(text.contains(
            "idlemon_at_risk_sockets{namespace=\"\",reason=\"keepalive_too_slow\",workload=\"\"} 0"
        ));
        assert!(text.contains("idlemon_tracked_sockets 0"));
        assert!(text.contains("idlemon_long_idle_sockets{keepalive=\"off\"} 0"));
        // Off unless enabled.
        assert!(!text.contains("idlemon_keepalive_enforcements_total"));
        // The daemon's own cost, from the process collector.
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(text.contains("process_resident_memory_bytes "));
    }

    /// Kernel counters a test sets.
    #[derive(Clone, Default)]
    struct FakeKernel {
        totals: Arc<std::sync::Mutex<Vec<u64>>>,
        connects: Arc<std::sync::Mutex<Vec<(std::net::SocketAddr, u64)>>>,
    }

    impl FakeKernel {
        fn set(&self, totals: &[u64]) {
            *self.totals.lock().expect("lock") = totals.to_vec();
        }
    }

    impl KernelCounters for FakeKernel {
        fn totals(&self) -> Vec<u64> {
            self.totals.lock().expect("lock").clone()
        }

        fn connects_succeeded(&self, destination: std::net::SocketAddr) -> Option<u64> {
            self.connects
                .lock()
                .expect("lock")
                .iter()
                .find(|(address, _)| *address == destination)
                .map(|(_, count)| *count)
        }
    }

    /// Every `idlemon_*` and `process_*` name a dashboard query or alert rule
    /// uses must be one this registry exports, and every recorded series
    /// (`level:metric:operations`) one the rules record, so that no panel or
    /// alert is silently empty. `up` is Prometheus's own.
    #[test]
    fn dashboard_and_alerts_use_only_exported_metrics() {
        let hooks = [crate::probes::HookStatus {
            hook: "send",
            kind: Some(crate::probes::AttachKind::TpBtf),
            refused: Vec::new(),
            lost: None,
            degraded: false,
        }];
        let metrics = Metrics::new(300.0, 350.0, &hooks, LIMITS).expect("metrics");
        // Families that have series only once set.
        metrics.node_info("node-a", "6.18.0");
        metrics
            .idle_timeout_resets
            .with_label_values(&["shop", "cart"])
            .inc();
        metrics
            .destination_connect_failures
            .with_label_values(&["198.51.100.2:5432", "timeout"])
            .inc();
        metrics
            .scraped
            .failed_destinations
            .lock()
            .expect("lock")
            .insert("198.51.100.2:5432".to_owned());
        let mut summary = Summary::default();
        summary
            .at_risk_destinations
            .insert("198.51.100.2".parse().expect("ip"), 1);
        summary
            .namespace_keepalive
            .push(crate::sockets::NamespaceKeepalive {
                pod: "cart-1".to_owned(),
                namespace: "shop".to_owned(),
                netns: 7,
                keepalive_time_seconds: 60,
            });
        summary
            .opened_destinations
            .insert("198.51.100.2:443".parse().expect("address"), 1);
        metrics.publish_walk(&summary, WalkCost::default());
        let mut exported = std::collections::BTreeSet::new();
        for family in metrics.registry.gather() {
            let name = family.name().to_owned();
            if family.get_field_type() == prometheus::proto::MetricType::HISTOGRAM {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
            exported.insert(name);
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let rules = std::fs::read_to_string(root.join("deploy/prometheus/idlemon-rules.yml"))
            .expect("rules");
        let recorded: std::collections::BTreeSet<String> = rules
            .lines()
            .filter_map(|line| line.trim().strip_prefix("- record: "))
            .map(|name| name.trim().to_owned())
            .collect();
        assert!(recorded.len() >= 2, "fleet recording rules: {recorded:?}");
        for file in [
            "deploy/grafana/idlemon-dashboard.json",
            "deploy/prometheus/idlemon-rules.yml",
            "deploy/prometheus/idlemon-rules.test.yml",
        ] {
            let text = std::fs::read_to_string(root.join(file)).expect(file);
            let used = metric_names(&text, "idlemon_");
            assert!(!used.is_empty(), "{file} uses no idlemon metric");
            for name in recorded_names(&text) {
                assert!(
                    recorded.contains(&name),
                    "{file} uses {name}, which no recording rule records"
                );
            }
            for name in used.into_iter().chain(metric_names(&text, "process_")) {
                assert!(
                    exported.contains(&name),
                    "{file} uses {name}, which idlemon does not export"
                );
            }
        }
        // The dashboard really parses, and every query is in a panel target.
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("deploy/grafana/idlemon-dashboard.json"))
                .expect("dashboard"),
        )
        .expect("dashboard JSON");
        let panels = dashboard["panels"].as_array().expect("panels");
        let queries: Vec<&str> = panels
            .iter()
            .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
            .filter_map(|target| target["expr"].as_str())
            .collect();
        assert!(queries.len() >= 5, "{} queries", queries.len());
        for query in queries {
            assert!(
                !metric_names(query, "idlemon_").is_empty()
                    || !metric_names(query, "process_").is_empty()
                    || !recorded_names(query).is_empty()
                    || query.starts_with("up{")
                    || query.contains("(up{"),
                "query without an idlemon or process metric, recorded series or `up`: {query}"
            );
        }
    }

    /// Recorded series (`level:metric:operations`) named in a text.
    fn recorded_names(text: &str) -> std::collections::BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|word| {
                word.split(':').count() == 3
                    && word.split(':').all(|part| !part.is_empty())
                    && word.contains("idlemon_")
            })
            .map(str::to_owned)
            .collect()
    }

    /// Identifiers starting with `prefix` in a text, skipping ones that are
    /// only a part of a longer word (file names, alert names use CamelCase)
    /// or of a recorded series' name.
    fn metric_names(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
        let bytes = text.as_bytes();
        let mut names = std::collections::BTreeSet::new();
        let mut start = 0;
        while let Some(found) = text[start..].find(prefix) {
            let begin = start + found;
            let preceded = begin > 0
                && (bytes[begin - 1].is_ascii_alphanumeric()
                    || bytes[begin - 1] == b'_'
                    || bytes[begin - 1] == b':');
            let mut end = begin;
            while end < bytes.len()
                && (bytes[end].is_ascii_lowercase()
                    || bytes[end].is_ascii_digit()
                    || bytes[end] == b'_')
            {
                end += 1;
            }
            if !preceded {
                names.insert(text[begin..end].to_owned());
            }
            start = end;
        }
        names
    }

    const LIMITS: LabelLimits = LabelLimits {
        table_capacity: 1024,
        owners: 2,
        destinations: 1,
        owner_labels: OwnerLabels::DEFAULT,
    };

    const LIMITS_WITH_POD: LabelLimits = LabelLimits {
        owner_labels: OwnerLabels {
            namespace: true,
            pod: true,
            workload: true,
        },
        ..LIMITS
    };

    fn owner(risk: Risk, workload: &str) -> (Risk, [String; 3]) {
        (
            risk,
            [
                "shop".to_owned(),
                format!("{workload}-0"),
                workload.to_owned(),
            ],
        )
    }

    #[test]
    fn namespace_keepalive_times_are_capped_pods_first_and_stale_series_removed() {
        use crate::sockets::NamespaceKeepalive;
        let row = |netns: u32, namespace: &str, pod: &str, seconds: u64| NamespaceKeepalive {
            pod: pod.to_owned(),
            namespace: namespace.to_owned(),
            netns,
            keepalive_time_seconds: seconds,
        };
        let metrics = Metrics::new(300.0, 350.0, &[], LIMITS).expect("metrics");
        let series = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|line| line.starts_with("idlemon_namespace_keepalive_time_seconds{"))
                .map(str::to_owned)
                .collect()
        };
        // As Summary::of orders them: pods first. The cap (2) drops the third.
        let mut summary = Summary {
            namespace_keepalive: vec![
                row(7, "shop", "cart-1", 60),
                row(8, "shop", "api-1", 7200),
                row(1, "", "", 7200),
            ],
            ..Summary::default()
        };
        metrics.publish_walk(&summary, WalkCost::default());
        let text = metrics.render().expect("render");
        assert_eq!(
            series(&text),
            [
                "idlemon_namespace_keepalive_time_seconds{namespace=\"shop\",netns=\"7\",pod=\"cart-1\"} 60",
                "idlemon_namespace_keepalive_time_seconds{namespace=\"shop\",netns=\"8\",pod=\"api-1\"} 7200",
            ]
        );
        assert!(
            text.contains("idlemon_attribution_series_dropped_total 1"),
            "{text}"
        );
        // The api pod went away.
        summary.namespace_keepalive = vec![row(7, "shop", "cart-1", 30)];
        metrics.publish_walk(&summary, WalkCost::default());
        assert_eq!(
            series(&metrics.render().expect("render")),
            [
                "idlemon_namespace_keepalive_time_seconds{namespace=\"shop\",netns=\"7\",pod=\"cart-1\"} 30"
            ]
        );
    }

    #[test]
    fn owner_labels_are_capped_and_stale_series_removed() {
        let metrics = Metrics::new(300.0, 350.0, &[], LIMITS_WITH_POD).expect("metrics");
        let mut summary = Summary::default();
        summary.at_risk.insert(owner(Risk::NoKeepalive, "a"), 5);
        summary.at_risk.insert(owner(Risk::NoKeepalive, "b"), 3);
        summary.at_risk.insert(owner(Risk::NoKeepalive, "c"), 2);
        summary
            .at_risk
            .insert(owner(Risk::KeepaliveTooSlow, "d"), 1);
        summary
            .at_risk_destinations
            .insert("10.0.0.1".parse().expect("ip"), 7);
        summary
            .at_risk_destinations
            .insert("10.0.0.2".parse().expect("ip"), 4);
        metrics.publish_walk(&summary, WalkCost::default());
        let text = metrics.render().expect("render");
        let line = |labels: &str| {
            text.lines()
                .find(|line| line.starts_with(&format!("idlemon_at_risk_sockets{{{labels}}}")))
                .map(|line| line.rsplit(' ').next().unwrap_or_default().to_owned())
        };
        assert_eq!(
            line("namespace=\"shop\",pod=\"a-0\",reason=\"no_keepalive\",workload=\"a\"")
                .as_deref(),
            Some("5")
        );
        assert_eq!(
            line("namespace=\"shop\",pod=\"b-0\",reason=\"no_keepalive\",workload=\"b\"")
                .as_deref(),
            Some("3")
        );
        // c (2) and d (1) are past the cap of two owner sets.
        assert_eq!(
            line("namespace=\"\",pod=\"\",reason=\"no_keepalive\",workload=\"_other\"").as_deref(),
            Some("2")
        );
        assert_eq!(
            line("namespace=\"\",pod=\"\",reason=\"keepalive_too_slow\",workload=\"_other\"")
                .as_deref(),
            Some("1")
        );
        assert!(text.contains("idlemon_attribution_series_dropped_total 2"));
        assert!(text.contains("idlemon_at_risk_destination_sockets{destination=\"10.0.0.1\"} 7"));
        assert!(text.contains("idlemon_at_risk_destination_sockets{destination=\"_other\"} 4"));

        metrics.publish_walk(&Summary::default(), WalkCost::default());
        let text = metrics.render().expect("render");
        assert!(!text.contains("workload=\"a\""), "stale series removed");
        assert!(!text.contains("destination=\"10.0.0.1\""));
        assert!(text.contains("idlemon_at_risk_sockets{namespace=\"\",pod=\"\",reason=\"no_keepalive\",workload=\"\"} 0"));
    }

    #[test]
    fn by_default_pods_of_a_workload_share_one_series() {
        let metrics = Metrics::new(300.0, 350.0, &[], LIMITS).expect("metrics");
        let mut summary = Summary::default();
        let pod = |name: &str| {
            (
                Risk::NoKeepalive,
                ["shop".to_owned(), name.to_owned(), "cart".to_owned()],
            )
        };
        summary.at_risk.insert(pod("cart-7d9f-abcde"), 2);
        summary.at_risk.insert(pod("cart-7d9f-fghij"), 3);
        summary.at_risk.insert(owner(Risk::NoKeepalive, "b"), 1);
        metrics.publish_walk(&summary, WalkCost::default());
        let text = metrics.render().expect("render");
        assert!(
            text.contains(
                "idlemon_at_risk_sockets{namespace=\"shop\",reason=\"no_keepalive\",workload=\"cart\"} 5"
            ),
            "{text}"
        );
        assert!(text.contains(
            "idlemon_at_risk_sockets{namespace=\"shop\",reason=\"no_keepalive\",workload=\"b\"} 1"
        ));
        assert!(!text.contains("pod="), "no pod label by default");
        assert!(text.contains("idlemon_attribution_series_dropped_total 0"));
    }

    #[test]
    fn owner_labels_parse_in_any_order() {
        assert_eq!(
            OwnerLabels::of(&[OwnerLabel::Workload, OwnerLabel::Namespace]),
            OwnerLabels::DEFAULT
        );
        let only_workload = OwnerLabels::of(&[OwnerLabel::Workload]);
        assert_eq!(only_workload.names(), ["workload"]);
        assert_eq!(only_workload.other(), ["_other"]);
    }

    #[test]
    fn walks_are_a_histogram_a_cpu_counter_and_the_last_walks_gauges() {
        let metrics = Metrics::new(300.0, 350.0, &[], LIMITS).expect("metrics");
        let cost = |wall_seconds: f64, cpu_seconds: f64| WalkCost {
            namespaces: 3,
            namespace_walks: 2,
            shared_table_walks: 1,
            wall_seconds,
            cpu_seconds,
            finished_at: 1_700_000_000.0,
        };
        metrics.publish_walk(&Summary::default(), cost(0.003, 0.25));
        metrics.publish_walk(&Summary::default(), cost(0.2, 0.5));
        metrics.node_info("node-a", "6.18.0");
        let text = metrics.render().expect("render");
        for series in [
            "idlemon_walk_duration_seconds_bucket{le=\"0.005\"} 1",
            "idlemon_walk_duration_seconds_bucket{le=\"0.25\"} 2",
            "idlemon_walk_duration_seconds_count 2",
            "idlemon_walk_cpu_seconds_total 0.75",
            "idlemon_scans_total 2",
            // The last walk's.
            "idlemon_scan_duration_seconds 0.2",
            "idlemon_scan_cpu_seconds 0.5",
            "idlemon_network_namespaces 3",
            "idlemon_scan_namespace_walks 2",
            "idlemon_scan_shared_table_walks 1",
            "idlemon_last_scan_timestamp_seconds 1700000000",
            "idlemon_node_info{kernel_release=\"6.18.0\",node=\"node-a\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn the_gauges_render_the_last_walk_of_a_built_snapshot_and_nothing_older() {
        use std::{num::NonZeroU32, time::Duration};

        use monitor_common::{AF_INET, SocketRecord};

        use crate::{
            config::{IdleTimeout, PathConfig},
            sockets::{Classifier, SnapshotBuilder},
        };

        const HZ: u32 = 100;
        let classifier = std::sync::Arc::new(Classifier {
            hz: HZ,
            idle_threshold: Duration::from_secs(300),
            default_timeout: IdleTimeout::After(NonZeroU32::new(350).expect("non-zero")),
            paths: PathConfig::default(),
            keepalive_timer_seen: false,
            weakened: Default::default(),
        });
        // Sockets of process `pid` (in its own network namespace) to
        // `remote`, idle `idle` seconds, with keepalive on or off.
        let record = |pid: u32, remote: [u8; 4], idle: u32, keepalive: bool| {
            let mut record = SocketRecord {
                family: AF_INET,
                local_port: 40000,
                remote_port: 5432,
                netns: 4026531000 + pid,
                keepalive_enabled: u8::from(keepalive),
                last_send_age: idle * HZ,
                last_recv_age: idle * HZ,
                last_ack_age: idle * HZ,
                ns_keepalive_time: 7200 * HZ,
                ns_keepalive_intvl: 75 * HZ,
                ns_keepalive_probes: 9,
                info_known: monitor_common::INFO_KNOWN,
                ..SocketRecord::default()
            };
            record.info.owner_tgid = pid;
            record.remote_addr[..4].copy_from_slice(&remote);
            record
        };
        let walk = |records: &[SocketRecord]| {
            let mut builder = SnapshotBuilder::new(std::sync::Arc::clone(&classifier), 0, false);
            for record in records {
                builder.add(record, |pid, _| {
                    std::sync::Arc::new(crate::attribution::Attribution {
                        namespace: Some("shop".to_owned()),
                        pod: pid.map(|pid| format!("pod-{pid}")),
                        workload: pid.map(|pid| format!("app-{pid}")),
                        ..Default::default()
                    })
                });
            }
            Summary::of(&builder.finish(std::time::Instant::now()))
        };
        let metrics = Metrics::new(300.0, 350.0, &[], LIMITS).expect("metrics");
        let db = [10, 0, 0, 9];
        let cache = [10, 0, 0, 7];
        metrics.publish_walk(
            &walk(&[
                record(1, db, 400, false),
                record(1, db, 500, false),
                record(2, cache, 400, true),
                record(2, cache, 450, true),
                record(3, db, 400, false),
                record(3, cache, 10, false),
            ]),
            WalkCost::default(),
        );
        let text = metrics.render().expect("render");
        let family = |name: &str| -> Vec<&str> {
            text.lines()
                .filter(|line| {
                    line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
                })
                .collect()
        };
        assert_eq!(
            family("idlemon_tracked_sockets"),
            ["idlemon_tracked_sockets 6"]
        );
        // Two owner series (LIMITS); the third busiest is folded.
        assert_eq!(
            family("idlemon_at_risk_sockets"),
            [
                "idlemon_at_risk_sockets{namespace=\"\",reason=\"keepalive_too_slow\",workload=\"\"} 0",
                "idlemon_at_risk_sockets{namespace=\"\",reason=\"no_keepalive\",workload=\"\"} 0",
                "idlemon_at_risk_sockets{namespace=\"\",reason=\"no_keepalive\",workload=\"_other\"} 1",
                "idlemon_at_risk_sockets{namespace=\"shop\",reason=\"keepalive_too_slow\",workload=\"app-2\"} 2",
                "idlemon_at_risk_sockets{namespace=\"shop\",reason=\"no_keepalive\",workload=\"app-1\"} 2",
            ]
        );
        assert_eq!(
            family("idlemon_long_idle_sockets"),
            [
                "idlemon_long_idle_sockets{keepalive=\"effective\"} 0",
                "idlemon_long_idle_sockets{keepalive=\"off\"} 3",
                "idlemon_long_idle_sockets{keepalive=\"too_slow\"} 2",
            ]
        );
        // One destination series (LIMITS): the busiest.
        assert_eq!(
            family("idlemon_at_risk_destination_sockets"),
            [
                "idlemon_at_risk_destination_sockets{destination=\"10.0.0.9\"} 3",
                "idlemon_at_risk_destination_sockets{destination=\"_other\"} 2",
            ]
        );
        assert_eq!(family("idlemon_namespace_keepalive_time_seconds").len(), 2);
        // Per walk: one owner set and one namespace past the caps.
        assert!(
            text.contains("idlemon_attribution_series_dropped_total 2"),
            "{text}"
        );

        // The next walk finds only the cache's socket: nothing of the first
        // walk is left behind.
        metrics.publish_walk(&walk(&[record(2, cache, 400, true)]), WalkCost::default());
        let text = metrics.render().expect("render");
        assert!(!text.contains("app-1"), "{text}");
        assert!(!text.contains("workload=\"_other\"}"), "{text}");
        assert!(!text.contains("destination=\"_other\"}"), "{text}");
        assert!(!text.contains("10.0.0.9"), "{text}");
        assert!(text.contains(
            "idlemon_namespace_keepalive_time_seconds{namespace=\"shop\",netns=\"4026531002\",pod=\"pod-2\"} 7200"
        ), "{text}");
        assert!(text.contains("idlemon_tracked_sockets 1"));
        assert!(text.contains("idlemon_attribution_series_dropped_total 2"));
        assert!(text.contains(
            "# HELP idlemon_at_risk_sockets Sockets idle at least the threshold whose keepalive cannot keep the path alive, by reason and owner"
        ));
    }

    fn reset(classification: Classification, workload: &str) -> EventRecord {
        let address: std::net::SocketAddr = "192.0.2.2:40000".parse().expect("address");
        EventRecord {
            id: 1,
            event_id: "boot-1-1".to_owned(),
            node: "node-a".into(),
            time: String::new(),
            unix_seconds: 0.0,
            kind: Kind::ResetReceived,
            classification: Some(classification),
            family: "ipv4",
            local: address,
            remote: address,
            idle_since_send_seconds: None,
            idle_since_receive_seconds: None,
            idle_before_seconds: Some(400.0),
            reuse: None,
            explanation: None,
            error: None,
            retransmissions: None,
            reason: None,
            connect_seconds: None,
            pid: Some(7),
            comm: Some("python3".to_owned()),
            cgroup_id: None,
            attribution: std::sync::Arc::new(crate::attribution::Attribution {
                namespace: Some("shop".to_owned()),
                pod: Some(format!("{workload}-7d9f-abcde")),
                workload: Some(workload.to_owned()),
                ..Default::default()
            }),
            socket: None,
            evidence: true,
            enforcement: None,
            weakening: None,
        }
    }

    #[test]
    fn deaths_and_failed_connects_are_counted_by_classification_reason_and_destination() {
        let metrics = Metrics::new(300.0, 350.0, &[], LIMITS).expect("metrics");
        let mut death = reset(Classification::IdleTimeoutSuspected, "cart");
        death.kind = Kind::RetransmitTimeout;
        metrics.observe_event(&death);
        for (remote, reason) in [
            ("198.51.100.2:5432", ConnectFailure::Timeout),
            ("198.51.100.2:5432", ConnectFailure::Timeout),
            ("198.51.100.3:443", ConnectFailure::Refused),
        ] {
            let mut failed = reset(Classification::Other, "cart");
            failed.kind = Kind::ConnectFailed;
            failed.classification = None;
            failed.reason = Some(reason);
            failed.remote = remote.parse().expect("address");
            metrics.observe_event(&failed);
        }
        let text = metrics.render().expect("render");
        for series in [
            "idlemon_retransmit_timeouts_total{classification=\"idle_timeout_suspected\"} 1",
            "idlemon_retransmit_timeouts_total{classification=\"other\"} 0",
            "idlemon_connect_failures_total{reason=\"timeout\"} 2",
            "idlemon_connect_failures_total{reason=\"refused\"} 1",
            "idlemon_connect_failures_total{reason=\"unreachable\"} 0",
            "idlemon_destination_connect_failures_total{destination=\"198.51.100.2:5432\",reason=\"timeout\"} 2",
            // One destination series (LIMITS): the second destination folds.
            "idlemon_destination_connect_failures_total{destination=\"_other\",reason=\"refused\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        let kernel = FakeKernel::default();
        kernel
            .connects
            .lock()
            .expect("lock")
            .push(("198.51.100.2:5432".parse().expect("address"), 3));
        metrics.read_kernel(kernel);
        let text = metrics.render().expect("render");
        assert!(
            text.contains(
                "idlemon_destination_connects_succeeded_total{destination=\"198.51.100.2:5432\"} 3"
            ),
            "{text}"
        );
        // A death is no reset.
        assert!(text.contains(
            "idlemon_resets_received_total{classification=\"idle_timeout_suspected\"} 0"
        ));
    }

    #[test]
    fn idle_timeout_resets_are_counted_by_workload_and_capped() {
        let metrics = Metrics::new(300.0, 350.0, &[], LIMITS).expect("metrics");
        for workload in ["cart", "cart", "api", "batch"] {
            metrics.observe_event(&reset(Classification::IdleTimeoutSuspected, workload));
        }
        metrics.observe_event(&reset(Classification::Other, "cart"));
        let text = metrics.render().expect("render");
        let count = |labels: &str| {
            text.lines()
                .find(|line| {
                    line.starts_with(&format!("idlemon_idle_timeout_resets_total{{{labels}}}"))
                })
                .map(|line| line.rsplit(' ').next().unwrap_or_default().to_owned())
        };
        assert_eq!(
            count("namespace=\"shop\",workload=\"cart\"").as_deref(),
            Some("2"),
            "{text}"
        );
        assert_eq!(
            count("namespace=\"shop\",workload=\"api\"").as_deref(),
            Some("1")
        );
        // Past the cap of two owner sets.
        assert_eq!(
            count("namespace=\"\",workload=\"_other\"").as_deref(),
            Some("1")
        );
        assert!(text.contains("idlemon_attribution_series_dropped_total 1"));
        assert!(text.contains(
            "idlemon_resets_received_total{classification=\"idle_timeout_suspected\"} 4"
        ));
        assert!(!text.contains("pod="));
    }
}
