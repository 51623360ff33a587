//! The series rendered when Prometheus scrapes: the latest walk's, from the
//! `WalkSeries` the scanner swaps in after each walk, and the kernel's
//! counters, summed over CPUs at that moment. Nothing is pushed into the
//! registry ahead of a scrape, so no series goes stale: one that the last
//! walk did not find is not rendered.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, OnceLock, RwLock},
};

use aya::maps::{MapData, PerCpuArray};
use monitor_common::{Destination, counter};
use prometheus::{
    IntCounterVec,
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

use super::{LabelLimits, TCP_STATES};
use crate::sockets::{Coverage, Risk, Summary};

/// The kernel's counters, read at each scrape.
pub trait KernelCounters: Send + Sync {
    /// Each `counter::*` slot, summed over CPUs (0 where unreadable).
    fn totals(&self) -> Vec<u64>;
    /// Connects to `destination` that succeeded (the `CONNECTS` map), if known.
    fn connects_succeeded(&self, destination: SocketAddr) -> Option<u64>;
}

/// The daemon's `COUNTERS` (per-CPU) and `CONNECTS` maps.
pub struct KernelMaps {
    pub counters: Mutex<PerCpuArray<MapData, u64>>,
    /// None where the eBPF object has no `CONNECTS` map.
    pub connects: Mutex<Option<aya::maps::HashMap<MapData, Destination, u64>>>,
}

impl KernelCounters for KernelMaps {
    fn totals(&self) -> Vec<u64> {
        let Ok(counters) = self.counters.lock() else {
            return Vec::new();
        };
        (0..counter::SLOTS)
            .map(|slot| {
                counters
                    .get(&slot, 0)
                    .map(|values| values.iter().sum::<u64>())
                    .unwrap_or(0)
            })
            .collect()
    }

    fn connects_succeeded(&self, address: SocketAddr) -> Option<u64> {
        let connects = self.connects.lock().ok()?;
        connects.as_ref()?.get(&destination(address), 0).ok()
    }
}

/// The `CONNECTS` key of an address, as the kernel writes it.
fn destination(address: SocketAddr) -> Destination {
    let mut destination = Destination {
        port: address.port(),
        ..Destination::default()
    };
    match address.ip() {
        IpAddr::V4(ip) => {
            destination.family = monitor_common::AF_INET;
            destination.addr[..4].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            destination.family = monitor_common::AF_INET6;
            destination.addr = ip.octets();
        }
    }
    destination
}

/// Kernel counters exported as Prometheus counters: (slot, name, help).
const KERNEL_COUNTERS: &[(u32, &str, &str)] = &[
    (
        counter::SEND_AFTER_IDLE,
        "idlemon_sends_after_idle_total",
        "Sends on sockets idle at least the idle threshold (reuse after idle).",
    ),
    (
        counter::RECEIVE_AFTER_IDLE,
        "idlemon_receives_after_idle_total",
        "Segments received on sockets idle at least the idle threshold.",
    ),
    (
        counter::SOCKET_TABLE_FULL,
        "idlemon_socket_table_full_total",
        "Times the kernel socket table was full and a socket went unattributed (raise --max-sockets).",
    ),
    (
        counter::KEEPALIVE_PROBES_ANSWERED,
        "idlemon_keepalive_probes_answered_total",
        "Keepalive probes the peer answered.",
    ),
    (
        counter::RESETS_SENT,
        "idlemon_resets_sent_total",
        "RSTs the host sent.",
    ),
    (
        counter::KEEPALIVE_TIMEOUTS,
        "idlemon_keepalive_timeouts_total",
        "Connections the kernel closed after unanswered keepalive probes.",
    ),
    (
        counter::EVENTS_LOST,
        "idlemon_events_lost_total",
        "Events the kernel ring buffer had no room for (bursts faster than idlemon reads).",
    ),
    (
        counter::EVENTS_SHED,
        "idlemon_events_shed_total",
        "Of idlemon_events_lost_total, events on sockets not idle past the threshold that the \
         kernel dropped while its ring buffer was three-quarters full, keeping the rest for \
         idle-timeout evidence.",
    ),
    (
        counter::SYN_RETRANSMITS,
        "idlemon_syn_retransmits_total",
        "SYNs the host retransmitted on its connects (counted as each connect succeeds or fails).",
    ),
    (
        counter::KEEPALIVE_TIMER_FIRES,
        "idlemon_keepalive_timer_runs_total",
        "Keepalive timer runs on established sockets (0 where the keepalive hook cannot attach).",
    ),
];

const TRACKED: &str = "idlemon_tracked_sockets";
const TRACKED_HELP: &str = "ESTABLISHED TCP sockets tracked, in every network namespace.";
const AT_RISK: &str = "idlemon_at_risk_sockets";
const AT_RISK_HELP: &str = "Sockets idle at least the threshold whose keepalive cannot keep the path alive, \
                 by reason and owner (--owner-labels: namespace, workload and optionally pod; \
                 workload=\"_other\" past the series cap).";
const AT_RISK_DESTINATIONS: &str = "idlemon_at_risk_destination_sockets";
const AT_RISK_DESTINATIONS_HELP: &str = "At-risk sockets by remote address, for the top --destination-labels destinations \
                 (the rest under destination=\"_other\"); absent unless enabled.";
const LONG_IDLE: &str = "idlemon_long_idle_sockets";
const LONG_IDLE_HELP: &str = "Sockets idle at least the threshold on a path with an idle timeout, by keepalive \
                 coverage (effective, too_slow, off).";
const NAMESPACE_KEEPALIVE: &str = "idlemon_namespace_keepalive_time_seconds";
const NAMESPACE_KEEPALIVE_HELP: &str = "Effective net.ipv4.tcp_keepalive_time of each network namespace with ESTABLISHED \
                 sockets, by namespace inode and pod (empty outside pods): sockets with SO_KEEPALIVE \
                 and no TCP_KEEPIDLE of their own send their first probe after it. At most \
                 --max-attribution-series namespaces, pods first.";
const NAMESPACES: &str = "idlemon_network_namespaces";
const NAMESPACES_HELP: &str = "Network namespaces walked in the last scan.";
const SCAN_SECONDS: &str = "idlemon_scan_duration_seconds";
const SCAN_SECONDS_HELP: &str = "Wall time of the last socket walk and classification (a 30 s scrape sees one \
             walk in six: idlemon_walk_duration_seconds has them all).";
const SCAN_CPU_SECONDS: &str = "idlemon_scan_cpu_seconds";
const SCAN_CPU_SECONDS_HELP: &str = "CPU time of the last socket walk and classification (idlemon_walk_cpu_seconds_total \
             sums them all).";
const SHARED_TABLE_WALKS: &str = "idlemon_scan_shared_table_walks";
const SHARED_TABLE_WALKS_HELP: &str = "Network namespaces the last scan walked that share the host's TCP connection table: each of those walks passes over every TCP socket of the host (net.ipv4.tcp_child_ehash_entries gives new namespaces their own).";
const NAMESPACE_WALKS: &str = "idlemon_scan_namespace_walks";
const NAMESPACE_WALKS_HELP: &str = "Network namespaces the last scan walked one by one (iter/tcp): those whose sockets the walk of idlemon's socket table did not all find (new ones, sockets from before idlemon started), or every namespace with sockets where that walk cannot run.";
const LAST_SCAN: &str = "idlemon_last_scan_timestamp_seconds";
const LAST_SCAN_HELP: &str = "Unix time at which the last socket walk completed.";
const STATE_TRANSITIONS: &str = "idlemon_tcp_state_transitions_total";
const STATE_TRANSITIONS_HELP: &str = "TCP state transitions seen by the kernel, by new state.";
const TABLE_ENTRIES: &str = "idlemon_socket_table_entries";
const TABLE_ENTRIES_HELP: &str =
    "Entries in the kernel socket table (owner, keepalive and reuse state).";
const RESETS_RECEIVED: &str = "idlemon_resets_received_total";
const RESETS_RECEIVED_HELP: &str = "RSTs received on established sockets, by classification \
                 (unclassified: their events were lost).";
const ESTABLISHED: &str = "idlemon_destination_established_connections";
const ESTABLISHED_HELP: &str = "ESTABLISHED connections this node opened (not accepted ones), by destination \
                 (address:port), for the top --destination-labels destinations (the rest under \
                 destination=\"_other\"): what a NAT gateway's 55,000 connections per \
                 destination and NAT address count; absent unless enabled.";
const DESTINATION_CONNECTS: &str = "idlemon_destination_connects_succeeded_total";
const DESTINATION_CONNECTS_HELP: &str = "Connects that succeeded, for the destinations of \
                 idlemon_destination_connect_failures_total (beside failures, whether other \
                 connects to the same destination get through); absent unless enabled.";
const ENFORCEMENTS: &str = "idlemon_keepalive_enforcements_total";
const ENFORCEMENTS_HELP: &str = "Keepalive enforcement decisions on new connections, by mode (dry_run, on) and \
                 reason (no_keepalive, keepalive_too_slow: set or would set; keepalive_sufficient, \
                 loopback, no_timeout: left alone; failed; unreadable).";
const WEAKENED: &str = "idlemon_keepalive_weakened_total";
const WEAKENED_HELP: &str = "Applications that turned off, or slowed past the target, the keepalive idlemon \
                 enforced on their socket (setsockopt SO_KEEPALIVE 0 or a longer TCP_KEEPIDLE), by \
                 mode: report (let through) or override ([enforce] override: idlemon's value kept).";

/// The `mode` label of `idlemon_keepalive_weakened_total`, in the order of
/// the kernel's slots (`enforce::weakened::REPORTED`, `OVERRIDDEN`).
const WEAKENED_MODES: [&str; 2] = ["report", "override"];

/// The classifications of received resets that events count; the kernel
/// counts `unclassified` ones (their events were lost).
const RESET_CLASSIFICATIONS: [&str; 2] = ["idle_timeout_suspected", "other"];

/// What one walk measured, besides the sockets' summary.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WalkCost {
    pub namespaces: usize,
    pub namespace_walks: usize,
    pub shared_table_walks: usize,
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    /// Unix time at which the walk completed.
    pub finished_at: f64,
}

/// The series of one walk, folded to their bounds: what /metrics shows until
/// the next walk replaces them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WalkSeries {
    tracked: usize,
    long_idle: [usize; Coverage::ALL.len()],
    /// By (reason, the chosen owner labels in `OwnerLabels::names` order).
    at_risk: BTreeMap<Vec<String>, usize>,
    /// At-risk sockets by destination address; empty when the metric is off.
    destinations: BTreeMap<String, usize>,
    /// Connections this node opened by destination address and port;
    /// empty when the metric is off.
    established: BTreeMap<String, usize>,
    /// (netns, namespace, pod) and the keepalive time in seconds.
    namespace_keepalive: Vec<([String; 3], u64)>,
    cost: WalkCost,
}

impl WalkSeries {
    /// Folds a walk's summary into series within `limits`. Also returns the
    /// label sets folded into `_other` or left out, for
    /// idlemon_attribution_series_dropped_total (counted per walk).
    pub fn fold(summary: &Summary, cost: WalkCost, limits: &LabelLimits) -> (Self, u64) {
        let chosen = limits.owner_labels;
        let with_reason = |risk: Risk, owner: Vec<String>| {
            let mut labels = vec![risk.as_str().to_owned()];
            labels.extend(owner);
            labels
        };
        let mut at_risk: BTreeMap<Vec<String>, usize> = Risk::ALL
            .iter()
            .map(|risk| {
                (
                    with_reason(*risk, vec![String::new(); chosen.names().len()]),
                    0,
                )
            })
            .collect();
        // The busiest owners keep their own series; the rest are folded.
        let mut owners: Vec<(&(Risk, [String; 3]), &usize)> = summary.at_risk.iter().collect();
        owners.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        let mut dropped = 0;
        // Owners that differ only in a label left out (pods of one workload)
        // share a series; the cap counts series, not owners.
        let mut kept = HashSet::new();
        for ((risk, owner), count) in owners {
            let picked = chosen.pick(owner);
            let labels = if kept.contains(&picked) || kept.len() < limits.owners {
                kept.insert(picked.clone());
                with_reason(*risk, picked)
            } else {
                dropped += 1;
                with_reason(*risk, chosen.other())
            };
            *at_risk.entry(labels).or_default() += *count;
        }

        // One series per network namespace with sockets, pods first (as
        // `Summary::of` orders them), up to the series cap.
        let mut namespace_keepalive = Vec::new();
        for (rank, row) in summary.namespace_keepalive.iter().enumerate() {
            if rank >= limits.owners {
                dropped += 1;
                continue;
            }
            namespace_keepalive.push((
                [
                    row.netns.to_string(),
                    row.namespace.clone(),
                    row.pod.clone(),
                ],
                row.keepalive_time_seconds,
            ));
        }

        let series = Self {
            tracked: summary.tracked,
            long_idle: summary.long_idle,
            at_risk,
            destinations: top(&summary.at_risk_destinations, limits.destinations),
            established: top(&summary.opened_destinations, limits.destinations),
            namespace_keepalive,
            cost,
        };
        (series, dropped)
    }
}

/// The `limit` busiest destinations by name, the rest folded into
/// `_other`; none when the limit is 0 (the metric is off).
fn top<K: Ord + ToString>(
    counts: &std::collections::HashMap<K, usize, impl std::hash::BuildHasher>,
    limit: usize,
) -> BTreeMap<String, usize> {
    let mut series = BTreeMap::new();
    if limit == 0 {
        return series;
    }
    let mut ranked: Vec<(&K, &usize)> = counts.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    for (rank, (destination, count)) in ranked.into_iter().enumerate() {
        let label = if rank < limit {
            destination.to_string()
        } else {
            "_other".to_owned()
        };
        *series.entry(label).or_default() += *count;
    }
    series
}

/// What the collector reads: the latest walk's series, the kernel's
/// counters, and the event-fed state that names kernel-fed series.
pub struct Scraped {
    limits: LabelLimits,
    walk: RwLock<Arc<WalkSeries>>,
    kernel: OnceLock<Box<dyn KernelCounters>>,
    /// The highest total read per counter slot, so that a failed read
    /// (0) never takes a counter back.
    high_water: Mutex<Vec<u64>>,
    connects_high_water: Mutex<HashMap<String, u64>>,
    /// Destinations of idlemon_destination_connect_failures_total so far,
    /// capped at `LabelLimits::destinations` (the first ones to fail keep
    /// their series: a counter's series must not come and go).
    pub(super) failed_destinations: Mutex<HashSet<String>>,
    /// Received resets by classification, as events explained them.
    pub(super) resets_received: IntCounterVec,
    /// The enforcement mode, once enforcement is on.
    pub(super) enforce_mode: OnceLock<&'static str>,
    descs: Vec<Desc>,
}

impl Scraped {
    pub fn new(limits: LabelLimits) -> anyhow::Result<Self> {
        let owner_names = limits.owner_labels.names();
        let mut families: Vec<(&str, &str, Vec<&str>)> = vec![
            (TRACKED, TRACKED_HELP, vec![]),
            (
                AT_RISK,
                AT_RISK_HELP,
                [&["reason"][..], &owner_names].concat(),
            ),
            (LONG_IDLE, LONG_IDLE_HELP, vec!["keepalive"]),
            (
                NAMESPACE_KEEPALIVE,
                NAMESPACE_KEEPALIVE_HELP,
                vec!["netns", "namespace", "pod"],
            ),
            (NAMESPACES, NAMESPACES_HELP, vec![]),
            (SCAN_SECONDS, SCAN_SECONDS_HELP, vec![]),
            (SCAN_CPU_SECONDS, SCAN_CPU_SECONDS_HELP, vec![]),
            (SHARED_TABLE_WALKS, SHARED_TABLE_WALKS_HELP, vec![]),
            (NAMESPACE_WALKS, NAMESPACE_WALKS_HELP, vec![]),
            (LAST_SCAN, LAST_SCAN_HELP, vec![]),
            (STATE_TRANSITIONS, STATE_TRANSITIONS_HELP, vec!["state"]),
            (TABLE_ENTRIES, TABLE_ENTRIES_HELP, vec![]),
            (
                RESETS_RECEIVED,
                RESETS_RECEIVED_HELP,
                vec!["classification"],
            ),
            (ENFORCEMENTS, ENFORCEMENTS_HELP, vec!["mode", "reason"]),
            (WEAKENED, WEAKENED_HELP, vec!["mode"]),
        ];
        for &(_, name, help) in KERNEL_COUNTERS {
            families.push((name, help, vec![]));
        }
        if limits.destinations > 0 {
            families.push((
                AT_RISK_DESTINATIONS,
                AT_RISK_DESTINATIONS_HELP,
                vec!["destination"],
            ));
            families.push((
                DESTINATION_CONNECTS,
                DESTINATION_CONNECTS_HELP,
                vec!["destination"],
            ));
            families.push((ESTABLISHED, ESTABLISHED_HELP, vec!["destination"]));
        }
        let descs = families
            .into_iter()
            .map(|(name, help, labels)| {
                Desc::new(
                    name.to_owned(),
                    help.to_owned(),
                    labels.into_iter().map(str::to_owned).collect(),
                    HashMap::new(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let resets_received = IntCounterVec::new(
            prometheus::Opts::new(RESETS_RECEIVED, RESETS_RECEIVED_HELP),
            &["classification"],
        )?;
        let (empty, _) = WalkSeries::fold(&Summary::default(), WalkCost::default(), &limits);
        Ok(Self {
            limits,
            walk: RwLock::new(Arc::new(empty)),
            kernel: OnceLock::new(),
            high_water: Mutex::new(vec![0; counter::SLOTS as usize]),
            connects_high_water: Mutex::default(),
            failed_destinations: Mutex::default(),
            resets_received,
            enforce_mode: OnceLock::new(),
            descs,
        })
    }

    /// Replaces the latest walk's series.
    pub fn publish(&self, series: WalkSeries) {
        let series = Arc::new(series);
        match self.walk.write() {
            Ok(mut walk) => *walk = series,
            Err(poisoned) => *poisoned.into_inner() = series,
        }
    }

    /// Reads the kernel's counters at each scrape from now on.
    pub fn read_kernel(&self, kernel: Box<dyn KernelCounters>) {
        let _ = self.kernel.set(kernel);
    }

    fn latest_walk(&self) -> Arc<WalkSeries> {
        match self.walk.read() {
            Ok(walk) => Arc::clone(&walk),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The kernel's totals per slot, never below what an earlier scrape saw.
    fn kernel_totals(&self) -> Vec<u64> {
        let read = self.kernel.get().map(|kernel| kernel.totals());
        let mut high_water = match self.high_water.lock() {
            Ok(high_water) => high_water,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (seen, total) in high_water.iter_mut().zip(read.iter().flatten()) {
            *seen = (*seen).max(*total);
        }
        high_water.clone()
    }

    fn render(&self) -> Vec<MetricFamily> {
        let walk = self.latest_walk();
        let owner_names = self.limits.owner_labels.names();
        let mut families = vec![
            gauge(TRACKED, TRACKED_HELP, [single(walk.tracked as f64)]),
            gauge(
                AT_RISK,
                AT_RISK_HELP,
                walk.at_risk.iter().map(|(values, count)| {
                    let names = std::iter::once("reason").chain(owner_names.iter().copied());
                    (labelled(names.zip(values.iter())), *count as f64)
                }),
            ),
            gauge(
                LONG_IDLE,
                LONG_IDLE_HELP,
                Coverage::ALL.iter().map(|coverage| {
                    (
                        labelled([("keepalive", coverage.as_str())]),
                        walk.long_idle[*coverage as usize] as f64,
                    )
                }),
            ),
            gauge(
                NAMESPACE_KEEPALIVE,
                NAMESPACE_KEEPALIVE_HELP,
                walk.namespace_keepalive.iter().map(|(values, seconds)| {
                    (
                        labelled(["netns", "namespace", "pod"].into_iter().zip(values)),
                        *seconds as f64,
                    )
                }),
            ),
        ];
        let cost = &walk.cost;
        for (name, help, value) in [
            (NAMESPACES, NAMESPACES_HELP, cost.namespaces as f64),
            (SCAN_SECONDS, SCAN_SECONDS_HELP, cost.wall_seconds),
            (SCAN_CPU_SECONDS, SCAN_CPU_SECONDS_HELP, cost.cpu_seconds),
            (
                SHARED_TABLE_WALKS,
                SHARED_TABLE_WALKS_HELP,
                cost.shared_table_walks as f64,
            ),
            (
                NAMESPACE_WALKS,
                NAMESPACE_WALKS_HELP,
                cost.namespace_walks as f64,
            ),
            (LAST_SCAN, LAST_SCAN_HELP, cost.finished_at),
        ] {
            families.push(gauge(name, help, [single(value)]));
        }
        if self.limits.destinations > 0 {
            families.push(gauge(
                AT_RISK_DESTINATIONS,
                AT_RISK_DESTINATIONS_HELP,
                walk.destinations.iter().map(|(destination, count)| {
                    (labelled([("destination", destination)]), *count as f64)
                }),
            ));
            families.push(gauge(
                ESTABLISHED,
                ESTABLISHED_HELP,
                walk.established.iter().map(|(destination, count)| {
                    (labelled([("destination", destination)]), *count as f64)
                }),
            ));
        }
        self.render_kernel(&mut families);
        families
    }

    fn render_kernel(&self, families: &mut Vec<MetricFamily>) {
        let totals = self.kernel_totals();
        let slot = |slot: u32| totals.get(slot as usize).copied().unwrap_or(0) as f64;
        families.push(counter(
            STATE_TRANSITIONS,
            STATE_TRANSITIONS_HELP,
            TCP_STATES
                .iter()
                .enumerate()
                .skip(1)
                .map(|(state, name)| (labelled([("state", *name)]), slot(state as u32))),
        ));
        for &(index, name, help) in KERNEL_COUNTERS {
            families.push(counter(name, help, [single(slot(index))]));
        }
        let entries = totals
            .get(counter::SOCKET_TABLE_INSERTS as usize)
            .copied()
            .unwrap_or(0)
            .saturating_sub(
                totals
                    .get(counter::SOCKET_TABLE_REMOVES as usize)
                    .copied()
                    .unwrap_or(0),
            );
        families.push(gauge(
            TABLE_ENTRIES,
            TABLE_ENTRIES_HELP,
            [single(entries as f64)],
        ));
        let explained = RESET_CLASSIFICATIONS.iter().map(|classification| {
            let count = self
                .resets_received
                .with_label_values(&[classification])
                .get();
            (
                labelled([("classification", *classification)]),
                count as f64,
            )
        });
        let lost = (
            labelled([("classification", "unclassified")]),
            slot(counter::RESET_EVENTS_LOST),
        );
        families.push(counter(
            RESETS_RECEIVED,
            RESETS_RECEIVED_HELP,
            explained.chain([lost]),
        ));
        if let Some(mode) = self.enforce_mode.get() {
            use monitor_common::enforce::reason;
            // Every reason from zero; the last slot only once it counted.
            // Slots that share a name add up, so no series comes twice.
            let mut by_reason: BTreeMap<&str, f64> = BTreeMap::new();
            for reason in 0..reason::COUNT {
                let total = slot(counter::ENFORCEMENTS + reason);
                if reason < reason::COUNT - 1 || total > 0.0 {
                    *by_reason
                        .entry(crate::events::enforcement_reason(reason))
                        .or_default() += total;
                }
            }
            families.push(counter(
                ENFORCEMENTS,
                ENFORCEMENTS_HELP,
                by_reason.into_iter().map(|(reason, total)| {
                    (labelled([("mode", *mode), ("reason", reason)]), total)
                }),
            ));
            families.push(counter(
                WEAKENED,
                WEAKENED_HELP,
                WEAKENED_MODES.iter().enumerate().map(|(outcome, mode)| {
                    (
                        labelled([("mode", *mode)]),
                        slot(counter::WEAKENED + outcome as u32),
                    )
                }),
            ));
        }
        if self.limits.destinations > 0 {
            families.push(counter(
                DESTINATION_CONNECTS,
                DESTINATION_CONNECTS_HELP,
                self.destination_connects(),
            ));
        }
    }

    /// Connects that succeeded, for each destination with a failure series.
    fn destination_connects(&self) -> Vec<(Vec<proto::LabelPair>, f64)> {
        let destinations: Vec<String> = match self.failed_destinations.lock() {
            Ok(seen) => seen.iter().cloned().collect(),
            Err(_) => return Vec::new(),
        };
        let mut high_water = match self.connects_high_water.lock() {
            Ok(high_water) => high_water,
            Err(poisoned) => poisoned.into_inner(),
        };
        destinations
            .into_iter()
            .map(|destination| {
                let read = destination.parse().ok().and_then(|address| {
                    self.kernel
                        .get()
                        .and_then(|kernel| kernel.connects_succeeded(address))
                });
                let seen = high_water.entry(destination.clone()).or_default();
                *seen = (*seen).max(read.unwrap_or(0));
                (labelled([("destination", &destination)]), *seen as f64)
            })
            .collect()
    }
}

/// The registered collector: renders `Scraped` at each gather.
pub struct ScrapeCollector(pub Arc<Scraped>);

impl Collector for ScrapeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.render()
    }
}

/// Label pairs sorted by name, as the registry's own vectors write them.
fn labelled<'a>(
    pairs: impl IntoIterator<Item = (&'a str, impl AsRef<str>)>,
) -> Vec<proto::LabelPair> {
    let mut labels: Vec<proto::LabelPair> = pairs
        .into_iter()
        .map(|(name, value)| {
            let mut pair = proto::LabelPair::default();
            pair.set_name(name.to_owned());
            pair.set_value(value.as_ref().to_owned());
            pair
        })
        .collect();
    labels.sort_by(|a, b| a.name().cmp(b.name()));
    labels
}

fn single(value: f64) -> (Vec<proto::LabelPair>, f64) {
    (Vec::new(), value)
}

fn gauge(
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<proto::LabelPair>, f64)>,
) -> MetricFamily {
    family(name, help, MetricType::GAUGE, samples)
}

fn counter(
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<proto::LabelPair>, f64)>,
) -> MetricFamily {
    family(name, help, MetricType::COUNTER, samples)
}

fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<proto::LabelPair>, f64)>,
) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    for (labels, value) in samples {
        let mut metric = proto::Metric::default();
        metric.set_label(labels);
        if kind == MetricType::COUNTER {
            let mut counter = proto::Counter::default();
            counter.set_value(value);
            metric.set_counter(counter);
        } else {
            let mut gauge = proto::Gauge::default();
            gauge.set_value(value);
            metric.set_gauge(gauge);
        }
        family.mut_metric().push(metric);
    }
    family
}
