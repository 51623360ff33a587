//! The event JSON (event log lines and `GET /events` entries) against its
//! schema, monitor/event.schema.json, which the README documents: events of
//! every kind as the daemon explains them, and the README's example of each
//! kind. The two-node test in prometheus.rs checks events of running daemons
//! against the same schema.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod schema;

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use monitor::{
    config::{IdleTimeout, PathConfig},
    events::{Explainer, Kind},
    sockets::Classifier,
};
use monitor_common::{
    AF_INET, AF_INET6, Event, KeepaliveDecision, SocketRecord, enforce, event_kind,
};
use serde_json::Value;

const HZ: u32 = 100;

fn schema() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/event.schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn explainer() -> Explainer {
    Explainer::new(Arc::new(Classifier {
        hz: HZ,
        idle_threshold: Duration::from_secs(2),
        default_timeout: IdleTimeout::After(NonZeroU32::new(5).unwrap()),
        paths: PathConfig::default(),
        keepalive_timer_seen: true,
        weakened: Default::default(),
    }))
    .on_node("node-a")
}

/// A kernel event on a socket idle `idle` seconds.
fn event(kind: u8, idle: u32, family: u16) -> Event {
    let mut socket = SocketRecord {
        sock: 0xffff_0000_0000_1000,
        family,
        local_port: 40000,
        remote_port: 443,
        state: 1,
        last_send_age: idle * HZ,
        last_recv_age: idle * HZ,
        last_ack_age: idle * HZ,
        ns_keepalive_time: 7200 * HZ,
        info_known: 1,
        ..SocketRecord::default()
    };
    if family == AF_INET {
        socket.remote_addr[..4].copy_from_slice(&[198, 51, 100, 2]);
        socket.local_addr[..4].copy_from_slice(&[192, 0, 2, 2]);
    } else {
        socket.remote_addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        socket.local_addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    }
    socket.info.owner_tgid = 77;
    socket.info.reuse_at = 100_000;
    socket.info.reuse_idle = idle * HZ;
    Event {
        time_ns: 0,
        jiffies: 100_003,
        current_tgid: 77,
        kind,
        socket_known: 1,
        _pad: [0; 2],
        error: 0,
        current_comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        socket,
        enforcement: KeepaliveDecision::default(),
        retransmissions: 0,
        connect_ms: 0,
    }
}

fn assert_valid(schema: &Value, event: &Value) {
    let violations = schema::violations(schema, event);
    assert!(
        violations.is_empty(),
        "{violations:#?}\nin {}",
        serde_json::to_string_pretty(event).unwrap()
    );
}

/// Every kind, with and without a socket, IPv4 and IPv6, as the daemon
/// serializes them.
#[test]
fn explained_events_of_every_kind_match_the_schema() {
    let schema = schema();
    let mut explainer = explainer();
    let mut kinds = std::collections::BTreeSet::new();
    let mut event_ids = std::collections::BTreeSet::new();
    for kind in [
        event_kind::SEND_AFTER_IDLE,
        event_kind::RESET_RECEIVED,
        event_kind::RESET_SENT,
        event_kind::KEEPALIVE_TIMEOUT,
        event_kind::KEEPALIVE_ENFORCED,
        event_kind::RETRANSMIT_TIMEOUT,
        event_kind::CONNECTION_ERROR,
        event_kind::CONNECT_FAILED,
        event_kind::KEEPALIVE_WEAKENED,
    ] {
        for (known, family) in [(1, AF_INET), (0, AF_INET), (1, AF_INET6)] {
            let mut kernel = event(kind, 8, family);
            kernel.socket_known = known;
            kernel.error = libc::ETIMEDOUT as u32;
            if kind == event_kind::KEEPALIVE_ENFORCED {
                // Set when known, unreadable in dry-run otherwise, failed over IPv6.
                kernel.enforcement = KeepaliveDecision {
                    mode: if known == 1 {
                        enforce::MODE_ON
                    } else {
                        enforce::MODE_DRY_RUN
                    },
                    reason: match (known, family) {
                        (0, _) => enforce::reason::UNREADABLE,
                        (_, AF_INET6) => enforce::reason::FAILED,
                        _ => enforce::reason::NO_KEEPALIVE,
                    },
                    idle_seconds: 2,
                    interval_seconds: 1,
                    count: 3,
                    path_timeout_seconds: 5,
                    passive: 0,
                    error: -libc::EINVAL,
                };
            }
            if kind == event_kind::KEEPALIVE_WEAKENED {
                // Turned off and let through; slowed and overridden (IPv6).
                let off = family == AF_INET;
                kernel.enforcement = KeepaliveDecision {
                    mode: enforce::MODE_ON,
                    reason: if off {
                        enforce::weakened::KEEPALIVE_OFF
                    } else {
                        enforce::weakened::IDLE_RAISED
                    },
                    idle_seconds: 2,
                    interval_seconds: 1,
                    count: 3,
                    path_timeout_seconds: 5,
                    passive: if off { 0 } else { 7200 },
                    error: if off {
                        enforce::weakened::REPORTED as i32
                    } else {
                        enforce::weakened::OVERRIDDEN as i32
                    },
                };
            }
            kernel.retransmissions = 5;
            kernel.socket.retransmits = 5;
            kernel.socket.retransmitting_since_reuse = 1;
            kernel.connect_ms = if family == AF_INET { 7_003 } else { u32::MAX };
            let record = explainer.explain(&kernel, 1_764_750_000.25).unwrap();
            let json = serde_json::to_value(&record).unwrap();
            if std::env::var_os("IDLEMON_PRINT_EVENTS").is_some() {
                println!("{json}");
            }
            assert_valid(&schema, &json);
            assert_eq!(json["node"], "node-a");
            if kind == event_kind::KEEPALIVE_WEAKENED {
                let weakening = &json["weakening"];
                if family == AF_INET {
                    assert_eq!(weakening["mode"], "report");
                    assert_eq!(weakening["change"], "keepalive_off");
                    assert_eq!(weakening["new"]["enabled"], false);
                } else {
                    assert_eq!(weakening["mode"], "override");
                    assert_eq!(weakening["change"], "idle_raised");
                    assert_eq!(weakening["new"]["idle_seconds"], 7200.0);
                }
                assert_eq!(weakening["old"]["idle_seconds"], 2.0);
            }
            assert!(event_ids.insert(json["event_id"].as_str().unwrap().to_owned()));
            kinds.insert(json["kind"].as_str().unwrap().to_owned());
        }
    }
    let all: std::collections::BTreeSet<String> = Kind::ALL
        .iter()
        .map(|kind| kind.as_str().to_owned())
        .collect();
    assert_eq!(kinds, all, "a kind this test does not produce");
}

/// The schema rejects what it should: it is not `{}`.
#[test]
fn the_schema_rejects_events_that_break_it() {
    let schema = schema();
    let record = explainer()
        .explain(&event(event_kind::RESET_RECEIVED, 8, AF_INET), 0.0)
        .unwrap();
    let good = serde_json::to_value(&record).unwrap();
    assert_valid(&schema, &good);
    for (field, bad) in [
        ("node", Value::Null),
        ("event_id", Value::from(7)),
        ("kind", Value::from("reset")),
        ("id", Value::from(-1)),
        ("idle_before_seconds", Value::from("8")),
    ] {
        let mut broken = good.clone();
        broken[field] = bad;
        assert!(
            !schema::violations(&schema, &broken).is_empty(),
            "{field} accepted"
        );
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("node");
    assert!(!schema::violations(&schema, &missing).is_empty());
    let mut extra = good;
    extra["surprise"] = Value::from(1);
    assert!(!schema::violations(&schema, &extra).is_empty());
}

/// The README's example of each kind (the ```json blocks of its "Event
/// schema" section) matches the schema, and every kind has one.
#[test]
fn the_readme_has_a_valid_example_of_every_kind() {
    let schema = schema();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split_once("### Event schema")
        .expect("README has an Event schema section")
        .1;
    let section = section.split("\n## ").next().unwrap();
    let section = section.split("\n### ").next().unwrap();
    let mut kinds = std::collections::BTreeSet::new();
    for block in section.split("```json\n").skip(1) {
        let text = block.split("```").next().unwrap();
        let example: Value = serde_json::from_str(text)
            .unwrap_or_else(|error| panic!("README example is not JSON ({error}):\n{text}"));
        assert_valid(&schema, &example);
        kinds.insert(example["kind"].as_str().unwrap().to_owned());
    }
    let all: std::collections::BTreeSet<String> = Kind::ALL
        .iter()
        .map(|kind| kind.as_str().to_owned())
        .collect();
    assert_eq!(kinds, all, "the README lacks an example of some kind");
}
