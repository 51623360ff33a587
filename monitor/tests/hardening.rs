//! An agent on every node must never be the incident: a full socket table,
//! kill -9 and restart, missing kernel features, and hostile HTTP clients.
//! Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use idlemon_testkit as kit;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    thread,
    time::Duration,
};

use kit::{
    DAEMON_PORT, Daemon, Netns, TempFile, assert_programs_back_to, idle_connections, port_for,
    raise_fd_limit, settled_idlemon_programs, wait_for,
};

/// Loopback connections to port 8400 have a 5 s idle timeout here.
fn loopback_config() -> TempFile {
    TempFile::new(
        "hardening.toml",
        "[[path]]\nname = \"test\"\ncidr = \"127.0.0.0/8\"\nports = [8400]\nidle_timeout = 5\n",
    )
}

/// Where the idle connections are: a path with a 5 s idle timeout.
const IDLE_SERVER: &str = "127.0.0.1:8400";

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_full_socket_table_is_counted_and_tracking_stays_correct() {
    let config = loopback_config();
    let daemon = Daemon::start(&[
        "--max-sockets",
        "64",
        "--idle-threshold",
        "1",
        "--scan-interval",
        "0.5",
        "--config",
        config.path(),
    ]);
    let netns = Netns::new("full");
    let _streams = idle_connections(&netns, IDLE_SERVER.parse().unwrap(), 100);

    // Every socket is still found and classified by the walk; only the
    // per-socket kernel state (owner, reuse) is missing for the overflow.
    // Counted in this namespace: the gauge is host-wide, and other runs'
    // loopback sockets to port 8400 count there too.
    let flagged = wait_for(Duration::from_secs(10), || {
        let at_risk = daemon
            .sockets_in(&netns, "?at_risk=true")
            .iter()
            .filter(|socket| socket["risk"] == "no_keepalive")
            .count();
        (at_risk >= 100).then_some(at_risk)
    });
    assert_eq!(
        flagged,
        Some(100),
        "every idle client flagged despite the full table"
    );
    assert!(daemon.metric_sum("idlemon_at_risk_sockets", "reason=\"no_keepalive\"") >= 100.0);
    assert_eq!(daemon.sockets_in(&netns, "").len(), 200);
    assert!(daemon.metric("idlemon_socket_table_full_total").unwrap() >= 36.0);
    assert_eq!(daemon.metric("idlemon_socket_table_capacity"), Some(64.0));
    let entries = daemon.metric("idlemon_socket_table_entries").unwrap();
    assert!(entries <= 64.0, "{entries} entries in a table of 64");
    let attributed = daemon
        .sockets_in(&netns, "")
        .iter()
        .filter(|socket| socket["pid"].is_u64())
        .count();
    assert!(
        attributed > 0 && attributed <= 64,
        "{attributed} attributed"
    );
    assert!(
        daemon.log().contains("socket table full"),
        "the kernel-side warning reaches the log"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn kill_9_leaks_nothing_and_a_restart_rediscovers_every_socket() {
    let baseline = settled_idlemon_programs();
    let netns = Netns::new("restart");
    let _streams = idle_connections(&netns, IDLE_SERVER.parse().unwrap(), 10);
    let first = Daemon::start(&["--scan-interval", "60"]);
    assert_eq!(first.sockets_in(&netns, "").len(), 20);
    // SAFETY: killing our own child.
    unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
    drop(first);
    assert_programs_back_to(baseline, "after kill -9");

    // A long scan interval: the sockets must come from the first walk.
    let second = Daemon::start(&["--scan-interval", "60"]);
    assert_eq!(
        second.sockets_in(&netns, "").len(),
        20,
        "rediscovered in one walk"
    );
    let scans = second.metric("idlemon_scans_total").unwrap();
    assert!(scans <= 2.0, "{scans} walks");
}

/// Runs idlemon expecting failure, returning its one-line error (the last
/// line of stderr; log lines may come before it).
fn fails(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("idlemon: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "{stderr}");
    errors[0].to_owned()
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn missing_kernel_features_exit_clearly_or_degrade_visibly() {
    let baseline = settled_idlemon_programs();
    let message = fails(Command::new(kit::idlemon()).args([
        "--listen",
        "127.0.0.1:0",
        "--kernel-btf",
        "/nonexistent/vmlinux",
    ]));
    assert!(
        message.contains("--kernel-btf") && message.contains("/nonexistent/vmlinux"),
        "{message}"
    );

    let message = fails(Command::new(kit::idlemon()).args([
        "--listen",
        "127.0.0.1:0",
        "--disable-attach",
        "tp_btf,raw_tp,tracepoint",
    ]));
    assert!(message.contains("state hook"), "{message}");

    // Without tracefs (a private mount namespace), the classic tracepoint
    // fallback is impossible too: the message says why.
    let message = fails(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &format!(
            "umount /sys/kernel/tracing 2>/dev/null; exec {} --listen 127.0.0.1:0 --disable-attach tp_btf,raw_tp",
            kit::idlemon()
        ),
    ]));
    assert!(
        message.contains("state hook") && message.contains("tracefs"),
        "{message}"
    );
    assert_programs_back_to(baseline, "after failed starts");

    // With the classic tracepoint for the lifecycle but nothing for sends,
    // receives and resets, idlemon runs, degraded and not ready, and says so.
    let daemon = Daemon::start_unready(&["--disable-attach", "tp_btf,raw_tp"]);
    let (status, body) = daemon.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("degraded") && body.contains("send hook missing"),
        "{body}"
    );
    assert_eq!(daemon.get("/healthz").0, 200);
    assert_eq!(daemon.metric("idlemon_degraded{hook=\"send\"}"), Some(1.0));
    assert_eq!(
        daemon.metric("idlemon_degraded{hook=\"keepalive\"}"),
        Some(0.0)
    );
    assert_eq!(
        daemon.metric("idlemon_probe_info{hook=\"state\",kind=\"tracepoint\"}"),
        Some(1.0)
    );
    assert_eq!(daemon.metric("idlemon_ready"), Some(0.0));
    assert_eq!(daemon.get("/sockets").0, 200, "still serving what it can");
}

/// Sends raw bytes to the daemon's server on `port` and returns the status
/// code it answers.
fn raw_status(daemon: &Daemon, port: u16, request: Vec<u8>) -> Option<u16> {
    daemon.netns().run(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .ok()?;
        let _ = stream.write_all(&request);
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        String::from_utf8_lossy(&response)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    })
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn the_http_api_is_bounded_read_only_and_survives_hostile_clients() {
    let daemon = Daemon::start(&[]);

    // 1,000 concurrent /metrics requests, all answered.
    let answered = daemon.netns().run(|| {
        raise_fd_limit();
        let mut streams: Vec<TcpStream> = (0..1000)
            .map(|_| {
                let mut stream = TcpStream::connect(("127.0.0.1", DAEMON_PORT)).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
                stream
            })
            .collect();
        streams
            .iter_mut()
            .map(|stream| {
                let mut response = String::new();
                stream.read_to_string(&mut response).is_ok() && response.starts_with("HTTP/1.0 200")
            })
            .filter(|answered| *answered)
            .count()
    });
    assert_eq!(answered, 1000);

    // A slow client holding a half-sent request does not block others.
    let slow = daemon.netns().run(|| {
        let mut stream = TcpStream::connect(("127.0.0.1", DAEMON_PORT)).unwrap();
        stream.write_all(b"GET /metr").unwrap();
        stream
    });
    assert_eq!(daemon.get("/healthz").0, 200);
    drop(slow);

    assert_eq!(
        raw_status(&daemon, DAEMON_PORT, b"GARBAGE\r\n\r\n".to_vec()),
        Some(400)
    );
    let mut huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw_status(&daemon, DAEMON_PORT, huge), Some(431));
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/metrics", "/sockets", "/events", "/readyz"] {
            let request = format!("{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
            assert_eq!(
                raw_status(&daemon, port_for(path), request.into_bytes()),
                Some(405),
                "{method} {path}"
            );
        }
    }
    assert_eq!(daemon.get("/sockets?at_risk=maybe").0, 400);
    assert_eq!(daemon.get("/events?limit=0").0, 400);
    assert_eq!(daemon.get("/events?since=yesterday").0, 400);
    // Each refusal is counted, by server and reason.
    let refused = |listener: &str, reason: &str| {
        daemon
            .metric(&format!(
                "idlemon_http_refusals_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
            ))
            .unwrap()
    };
    assert_eq!(refused("metrics", "malformed"), 1.0);
    assert_eq!(refused("metrics", "head_too_large"), 1.0);
    assert_eq!(refused("metrics", "method_not_allowed"), 8.0);
    assert_eq!(refused("api", "method_not_allowed"), 8.0);
    assert_eq!(refused("api", "bad_request"), 3.0);

    // It listens only where configured.
    daemon
        .netns()
        .ip(&["addr", "add", "192.0.2.9/32", "dev", "lo"]);
    let elsewhere = daemon.netns().run(|| {
        TcpStream::connect_timeout(
            &format!("192.0.2.9:{DAEMON_PORT}").parse().unwrap(),
            Duration::from_secs(2),
        )
    });
    assert!(
        elsewhere.is_err(),
        "reachable on an address it was not told to listen on"
    );
    assert_eq!(daemon.get("/healthz").0, 200);
    thread::sleep(Duration::from_millis(100));
}
