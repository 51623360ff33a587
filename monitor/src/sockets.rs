//! The socket table: what the walk found, in the problem's terms, and which
//! sockets a middlebox's idle timeout will kill. Pure logic, unit-tested,
//! in three parts: the verdict (`verdict`: a socket's facts and the path
//! config in, at risk and why out), the snapshot (`snapshot`: one walk's
//! compact sockets, owners and counts) and the API view (`view`: the JSON
//! of `GET /sockets` and of the events).

mod snapshot;
mod verdict;
mod view;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub use self::{
    snapshot::{
        NO_OWNER, NamespaceKeepalive, OpenedBeforeStart, Owner, PreviousOwners, Snapshot,
        SnapshotBuilder, Socket, Summary,
    },
    verdict::{Classifier, Coverage, Facts, PathRule, Risk},
    view::{Filter, Keepalive, Source, TrackedSocket, Weakenings},
};

/// The maps a walk updates once per socket: foldhash, randomly seeded per
/// process, hashes these small keys several times faster than the default
/// SipHash (about 4% of a 200,000-socket walk's CPU went to hashing).
pub(crate) type WalkMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

fn address(is_ipv6: bool, bytes: &[u8; 16]) -> IpAddr {
    if is_ipv6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// A task name from its NUL-padded kernel buffer.
pub fn comm(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Instant};

    use monitor_common::{AF_INET, AF_INET6, SocketRecord};

    use super::*;
    use crate::{attribution::Attribution, fix::Fix};

    const HZ: u32 = 250;

    fn classifier(paths: &str) -> Classifier {
        Classifier::for_tests(HZ, paths)
    }

    /// An IPv4 socket idle `idle` seconds, with the usual 7200 s namespace keepalive.
    fn record(idle: u32, keepalive: bool) -> SocketRecord {
        let mut record = SocketRecord {
            family: AF_INET,
            local_port: 40000,
            remote_port: 443,
            keepalive_enabled: u8::from(keepalive),
            last_send_age: idle * HZ,
            last_recv_age: idle * HZ + 5 * HZ,
            last_ack_age: idle * HZ,
            ns_keepalive_time: 7200 * HZ,
            ns_keepalive_intvl: 75 * HZ,
            ns_keepalive_probes: 9,
            ..SocketRecord::default()
        };
        record.local_addr[..4].copy_from_slice(&[10, 0, 0, 5]);
        record.remote_addr[..4].copy_from_slice(&[52, 1, 2, 3]);
        record
    }

    /// A walk of sockets 1..=n (their addresses), owned by process 100 + address
    /// in cgroup 7, except the multiples of 5, which have no owner.
    fn walked(socks: &[u64]) -> Arc<Snapshot> {
        let mut builder = SnapshotBuilder::new(Arc::new(classifier("")), socks.len(), false);
        for &sock in socks {
            let mut record = record(400, false);
            record.sock = sock;
            if sock % 5 != 0 {
                record.info_known = monitor_common::INFO_KNOWN;
                record.info.owner_tgid = 100 + sock as u32;
                record.info.owner_cgroup = 7;
            }
            builder.add(&record, |_, _| Arc::default());
        }
        Arc::new(builder.finish(Instant::now()))
    }

    #[test]
    fn previous_owners_are_found_in_walk_order_and_out_of_it() {
        let socks: Vec<u64> = (1..=300).collect();
        let mut previous = PreviousOwners::new(walked(&socks));
        // The same order, some closed since: the cursor finds each.
        for sock in (1..=150).filter(|sock| sock % 7 != 0) {
            let expected = if sock % 5 == 0 {
                (0, 0)
            } else {
                (100 + sock as u32, 7)
            };
            assert_eq!(previous.owner_of(sock), Some(expected), "socket {sock}");
        }
        assert!(previous.index.is_none(), "walk order needs no index");
        // Far out of order (beyond the cursor's reach, and behind it).
        assert_eq!(previous.owner_of(291), Some((391, 7)));
        assert_eq!(previous.owner_of(3), Some((103, 7)));
        // ...after which the cursor follows on from there.
        assert_eq!(previous.owner_of(4), Some((104, 7)));
        // Never walked before: for the caller to look up.
        assert_eq!(previous.owner_of(9999), None);
        assert_eq!(PreviousOwners::new(walked(&[])).owner_of(1), None);
    }

    #[test]
    fn idle_without_keepalive_is_at_risk() {
        let socket = classifier("").classify(&record(301, false));
        assert_eq!(socket.risk, Some(Risk::NoKeepalive));
        assert!(socket.at_risk);
        assert_eq!(socket.idle_seconds, 301.0);
        assert_eq!(socket.last_receive_seconds, 306.0);
        assert_eq!(socket.time_left_seconds, Some(49.0));
        assert_eq!(socket.remote.to_string(), "52.1.2.3:443");
    }

    #[test]
    fn below_the_threshold_nothing_is_flagged() {
        let socket = classifier("").classify(&record(299, false));
        assert_eq!(socket.risk, None);
    }

    #[test]
    fn default_keepalive_is_too_slow_for_a_nat_gateway() {
        let socket = classifier("").classify(&record(400, true));
        assert_eq!(socket.risk, Some(Risk::KeepaliveTooSlow));
        assert_eq!(socket.keepalive.idle_seconds, 7200.0);
        assert_eq!(socket.keepalive.idle_from, Source::Namespace);
    }

    #[test]
    fn socket_keepidle_below_the_timeout_protects() {
        let mut record = record(400, true);
        record.keepalive_time = 60 * HZ;
        let socket = classifier("").classify(&record);
        assert_eq!(socket.risk, None);
        assert_eq!(socket.keepalive.idle_seconds, 60.0);
        assert_eq!(socket.keepalive.idle_from, Source::Socket);
        assert_eq!(socket.keepalive.interval_from, Source::Namespace);
    }

    #[test]
    fn namespace_sysctl_below_the_timeout_protects() {
        let mut record = record(400, true);
        record.ns_keepalive_time = 120 * HZ;
        assert_eq!(classifier("").classify(&record).risk, None);
    }

    #[test]
    fn keepalive_equal_to_the_timeout_is_too_slow() {
        let mut record = record(400, true);
        record.keepalive_time = 350 * HZ;
        assert_eq!(
            classifier("").classify(&record).risk,
            Some(Risk::KeepaliveTooSlow)
        );
    }

    #[test]
    fn at_risk_sockets_say_what_their_path_kind_will_do() {
        let gwlb = classifier("[[path]]\nname = \"fw\"\ncidr = \"52.1.0.0/16\"\nkind = \"gwlb\"\n");
        let socket = gwlb.classify(&record(400, false));
        assert_eq!(socket.risk, Some(Risk::NoKeepalive));
        assert_eq!(
            (socket.path_kind, socket.path_on_idle),
            (Some("gwlb"), Some("drop"))
        );
        assert_eq!(socket.path_idle_timeout_seconds, Some(350));
        assert_eq!(
            socket.why.as_deref(),
            Some(
                "idle 400 s with keepalive off; the GWLB forgets a flow idle 350 s and drops its next packet: the request hangs while the kernel retransmits, until tcp_retries2 or TCP_USER_TIMEOUT gives up with ETIMEDOUT (about 15 minutes by default)"
            )
        );
        // The default path resets, as a NAT gateway does; no kind is named.
        let socket = classifier("").classify(&record(400, true));
        assert_eq!(
            (socket.path_kind, socket.path_on_idle),
            (None, Some("reset"))
        );
        assert!(
            socket.why.as_deref().is_some_and(|why| why.starts_with(
                "idle 400 s with a keepalive slower than the path's timeout; the path's middlebox forgets a flow idle 350 s and answers its next packet with a reset"
            )),
            "{:?}",
            socket.why
        );
        // Safe sockets carry no why; kind none is never at risk.
        assert_eq!(classifier("").classify(&record(10, false)).why, None);
        let none = classifier("[[path]]\ncidr = \"52.1.0.0/16\"\nkind = \"none\"\n");
        let socket = none.classify(&record(5000, false));
        assert_eq!(
            (socket.risk, socket.why, socket.path_kind),
            (None, None, Some("none"))
        );
    }

    #[test]
    fn a_path_without_middlebox_is_never_at_risk() {
        let classifier = classifier(
            "[[path]]\nname = \"vpc\"\ncidr = \"52.1.0.0/16\"\nidle_timeout = \"none\"\n",
        );
        let socket = classifier.classify(&record(5000, false));
        assert_eq!(socket.risk, None);
        assert_eq!(socket.path_idle_timeout_seconds, None);
        assert_eq!(socket.path_rule.as_deref(), Some("vpc"));
        assert_eq!(socket.time_left_seconds, None);
    }

    #[test]
    fn a_longer_path_timeout_changes_the_verdict_on_keepalive() {
        let classifier =
            classifier("[[path]]\ncidr = \"52.1.2.3\"\nports = [443]\nidle_timeout = 8000\n");
        let socket = classifier.classify(&record(400, true));
        assert_eq!(socket.path_idle_timeout_seconds, Some(8000));
        assert_eq!(socket.risk, None);
        assert_eq!(
            classifier.classify(&record(400, false)).risk,
            Some(Risk::NoKeepalive)
        );
    }

    #[test]
    fn keepalive_acks_count_as_path_traffic() {
        let mut record = record(400, true);
        record.keepalive_time = 60 * HZ;
        record.last_ack_age = 10 * HZ;
        let socket = classifier("").classify(&record);
        assert_eq!(socket.time_left_seconds, Some(340.0));
    }

    #[test]
    fn loopback_has_no_middlebox_unless_configured() {
        let mut record = record(400, false);
        record.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let socket = classifier("").classify(&record);
        assert_eq!(socket.risk, None);
        assert_eq!(socket.path_rule.as_deref(), Some("loopback"));
        let configured = classifier("[[path]]\ncidr = \"127.0.0.0/8\"\nidle_timeout = 5\n");
        assert_eq!(configured.classify(&record).risk, Some(Risk::NoKeepalive));
    }

    #[test]
    fn ipv6_addresses_and_owner() {
        let mut record = record(1, false);
        record.family = AF_INET6;
        record.remote_addr = "2001:db8::7".parse::<Ipv6Addr>().expect("ip").octets();
        record.info_known = 1;
        record.info.owner_tgid = 4242;
        record.info.owner_cgroup = 99;
        let socket = classifier("").classify(&record);
        assert_eq!(socket.family, "ipv6");
        assert_eq!(socket.remote.to_string(), "[2001:db8::7]:443");
        assert_eq!(socket.pid, Some(4242));
        // The name comes from /proc with the rest of the attribution.
        assert_eq!(socket.comm, None);
        assert_eq!(socket.cgroup_id, Some(99));
    }

    #[test]
    fn stamps_from_just_after_the_walk_read_as_zero() {
        let mut record = record(0, false);
        record.last_send_age = u32::MAX;
        assert_eq!(classifier("").classify(&record).last_send_seconds, 0.0);
    }

    fn snapshot(classifier: Classifier, records: &[SocketRecord]) -> Snapshot {
        let mut builder = SnapshotBuilder::new(Arc::new(classifier), 0, true);
        for record in records {
            builder.add(record, |pid, _| {
                Arc::new(Attribution {
                    unit: pid.map(|pid| format!("unit-of-{pid}.service")),
                    comm: Some("java".to_owned()),
                    ..Attribution::default()
                })
            });
        }
        builder.finish(Instant::now())
    }

    fn owned(mut record: SocketRecord, pid: u32) -> SocketRecord {
        record.info_known = 1;
        record.info.owner_tgid = pid;
        record
    }

    #[test]
    fn summary_counts_risks_and_coverage() {
        let mut effective = record(400, true);
        effective.keepalive_time = 60 * HZ;
        let snapshot = snapshot(
            classifier(""),
            &[
                record(400, false),
                record(400, true),
                effective,
                record(10, false),
            ],
        );
        let summary = Summary::of(&snapshot);
        assert_eq!(summary.tracked, 4);
        assert_eq!(summary.at_risk_total(Risk::NoKeepalive), 1);
        assert_eq!(summary.at_risk_total(Risk::KeepaliveTooSlow), 1);
        assert_eq!(summary.long_idle, [1, 1, 1]);
        let unknown = [String::new(), String::new(), "unknown".to_owned()];
        assert_eq!(summary.at_risk.get(&(Risk::NoKeepalive, unknown)), Some(&1));
        assert_eq!(
            summary
                .at_risk_destinations
                .get(&"52.1.2.3".parse::<IpAddr>().expect("ip")),
            Some(&2)
        );
    }

    #[test]
    fn each_namespace_reports_its_keepalive_time_and_its_pod() {
        let in_netns = |netns: u32, keepalive_time: u32, owner: Option<u32>| {
            let mut record = record(400, false);
            record.netns = netns;
            record.ns_keepalive_time = keepalive_time * HZ;
            match owner {
                Some(pid) => owned(record, pid),
                None => record,
            }
        };
        // The pod's namespace: its first socket unattributed, the next one
        // the pod's. The host's: nobody's pod. A third: no owner at all.
        let records = [
            in_netns(7, 60, None),
            in_netns(7, 60, Some(10)),
            in_netns(7, 60, None),
            in_netns(1, 7200, Some(11)),
            in_netns(9, 7200, None),
        ];
        let mut builder = SnapshotBuilder::new(Arc::new(classifier("")), 0, true);
        for record in &records {
            builder.add(record, |pid, _| {
                Arc::new(Attribution {
                    namespace: (pid == Some(10)).then(|| "shop".to_owned()),
                    pod: (pid == Some(10)).then(|| "cart-1".to_owned()),
                    ..Attribution::default()
                })
            });
        }
        let summary = Summary::of(&builder.finish(Instant::now()));
        let rows: Vec<(&str, &str, u32, u64)> = summary
            .namespace_keepalive
            .iter()
            .map(|row| {
                (
                    row.namespace.as_str(),
                    row.pod.as_str(),
                    row.netns,
                    row.keepalive_time_seconds,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("shop", "cart-1", 7, 60),
                ("", "", 1, 7200),
                ("", "", 9, 7200)
            ]
        );
    }

    #[test]
    fn owners_are_attributed_once_and_label_their_sockets() {
        let records = [
            owned(record(400, false), 10),
            owned(record(500, false), 10),
            owned(record(400, true), 11),
            record(400, false),
        ];
        let mut attributed = Vec::new();
        let mut builder = SnapshotBuilder::new(Arc::new(classifier("")), 0, true);
        for record in &records {
            builder.add(record, |pid, _| {
                attributed.push(pid);
                Arc::default()
            });
        }
        assert_eq!(attributed, vec![Some(10), Some(11)]);

        let snapshot = snapshot(classifier(""), &records);
        assert_eq!(snapshot.owners.len(), 2);
        let first = snapshot.view(&snapshot.sockets[1]);
        assert_eq!(first.pid, Some(10));
        assert_eq!(first.comm.as_deref(), Some("java"));
        assert_eq!(
            first.attribution.unit.as_deref(),
            Some("unit-of-10.service")
        );
        assert_eq!(snapshot.view(&snapshot.sockets[3]).pid, None);

        let summary = Summary::of(&snapshot);
        let labels = |unit: &str| [String::new(), String::new(), unit.to_owned()];
        assert_eq!(
            summary
                .at_risk
                .get(&(Risk::NoKeepalive, labels("unit-of-10.service"))),
            Some(&2)
        );
        assert_eq!(
            summary
                .at_risk
                .get(&(Risk::KeepaliveTooSlow, labels("unit-of-11.service"))),
            Some(&1)
        );
        assert_eq!(
            summary.at_risk.get(&(Risk::NoKeepalive, labels("unknown"))),
            Some(&1)
        );
    }

    #[test]
    fn compact_sockets_render_what_classify_renders() {
        let classifier =
            classifier("[[path]]\nname = \"api\"\ncidr = \"52.1.0.0/16\"\nidle_timeout = 600\n");
        let mut record = owned(record(700, true), 7);
        record.keepalive_intvl = 10 * HZ;
        record.keepalive_probes = 3;
        record.probes_out = 2;
        record.info.keepalive_probes_answered = 5;
        let view = classifier.view(&classifier.compact(&record, NO_OWNER), None);
        let whole = classifier.classify(&record);
        assert_eq!(view.path_rule.as_deref(), Some("api"));
        assert_eq!(view.keepalive.interval_from, Source::Socket);
        assert_eq!(view.keepalive.idle_from, Source::Namespace);
        assert_eq!(view.keepalive.count, 3);
        assert_eq!(view.keepalive.probes_unanswered, 2);
        assert_eq!(view.keepalive.probes_answered, 5);
        assert_eq!(view.risk, Some(Risk::KeepaliveTooSlow));
        // Keepalive on, its idle time from the namespace: the sysctl fixes it.
        assert!(
            matches!(&view.fix, Some(Fix::Sysctl { sysctls, .. }) if sysctls[0].name == "net.ipv4.tcp_keepalive_time"),
            "{:?}",
            view.fix
        );
        assert_eq!(view.pid, None);
        assert_eq!(whole.pid, Some(7));
        assert_eq!(
            TrackedSocket {
                pid: None,
                comm: None,
                ..whole
            },
            view
        );
    }

    #[test]
    fn filters_select_longest_idle_first() {
        let snapshot = snapshot(
            classifier(""),
            &[
                record(3, false),
                record(400, false),
                record(900, true),
                record(150, false),
            ],
        );
        let at_risk = Filter {
            at_risk: Some(true),
            min_idle: None,
        };
        assert_eq!(snapshot.select(&at_risk), vec![2, 1]);
        let min_idle = Filter {
            at_risk: None,
            min_idle: Some(100.0),
        };
        assert_eq!(snapshot.select(&min_idle), vec![2, 1, 3]);
        assert_eq!(snapshot.select(&Filter::default()), vec![2, 1, 3, 0]);
        let not_at_risk = Filter {
            at_risk: Some(false),
            min_idle: None,
        };
        assert_eq!(snapshot.select(&not_at_risk), vec![3, 0]);
    }

    #[test]
    fn connections_older_than_idlemon_are_active_opens_unless_on_a_listening_port() {
        let listening = HashMap::from([(0, HashSet::from([8080]))]);
        let mut outbound = record(10, false);
        outbound.sock = 1;
        outbound.local_port = 40001;
        let mut accepted = record(10, false);
        accepted.sock = 2;
        accepted.local_port = 8080;
        let mut marked = record(10, false);
        marked.sock = 3;
        marked.opened_here = 1;
        let first = snapshot(classifier(""), &[outbound, accepted, marked]);
        let mut older = OpenedBeforeStart::classify(&first, &listening);
        let mut summary = Summary::of(&first);
        let destination: SocketAddr = "52.1.2.3:443".parse().expect("address");
        // The marked one counts by its mark, the outbound one by the heuristic.
        assert_eq!(summary.opened_destinations.get(&destination), Some(&1));
        older.count(&first, &mut summary);
        assert_eq!(summary.opened_destinations.get(&destination), Some(&2));

        // The old connection closed; a new accepted socket at its address is
        // not taken for it (another local port), nor counted once it is gone.
        let mut reused = accepted;
        reused.sock = 1;
        let next = snapshot(classifier(""), &[reused, marked]);
        let mut summary = Summary::of(&next);
        older.count(&next, &mut summary);
        assert_eq!(summary.opened_destinations.get(&destination), Some(&1));
        let again = snapshot(classifier(""), &[outbound, marked]);
        let mut summary = Summary::of(&again);
        older.count(&again, &mut summary);
        assert_eq!(summary.opened_destinations.get(&destination), Some(&1));
    }
}
