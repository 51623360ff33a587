//! The hostile neighbour: on a shared cluster, anything on the pod network
//! can reach idlemon's metrics port, and anything with root on the node can
//! write under /run/netns. None of it may read connection data, starve the
//! probes, pin memory, or stall the walk.
//! Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use idlemon_testkit as kit;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use kit::{API_PORT, DAEMON_PORT, Daemon, Netns, http_get, raise_fd_limit, rss_kib, wait_for};

/// The daemon's address on the test's pod network, and the neighbour's.
const POD_IP: &str = "192.0.2.20";
const NEIGHBOUR_IP: &str = "192.0.2.21";

fn refused(daemon: &Daemon, listener: &str, reason: &str) -> f64 {
    let series =
        format!("idlemon_http_refusals_total{{listener=\"{listener}\",reason=\"{reason}\"}}");
    daemon
        .metric(&series)
        .unwrap_or_else(|| panic!("{series} not exported"))
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_neighbour_on_the_pod_network_gets_metrics_but_no_connection_data() {
    // As in the DaemonSet: metrics on every address of the pod, the API on
    // its default, loopback.
    let daemon = Daemon::start(&["--listen", &format!("0.0.0.0:{DAEMON_PORT}")]);
    let neighbour = Netns::new("neighbour");
    let (ours, theirs) = ("idlemon-pod0", "idlemon-nb0");
    daemon.netns().veth(
        ours,
        &format!("{POD_IP}/24"),
        &neighbour,
        theirs,
        &format!("{NEIGHBOUR_IP}/24"),
    );

    let metrics_port: SocketAddr = format!("{POD_IP}:{DAEMON_PORT}").parse().unwrap();
    let (status, body) = http_get(&neighbour, metrics_port, "/metrics").expect("metrics answer");
    assert_eq!(status, 200);
    assert!(body.contains("idlemon_tracked_sockets"));
    assert_eq!(
        http_get(&neighbour, metrics_port, "/healthz").unwrap().0,
        200
    );
    for path in [
        "/sockets",
        "/sockets?at_risk=true",
        "/events",
        "/events?wait=1",
    ] {
        let (status, body) = http_get(&neighbour, metrics_port, path).expect("an answer");
        assert_eq!(status, 404, "{path} on the metrics port: {body}");
        assert!(body.contains("--api-listen"), "{body}");
    }
    let api_port: SocketAddr = format!("{POD_IP}:{API_PORT}").parse().unwrap();
    assert!(
        http_get(&neighbour, api_port, "/sockets").is_none(),
        "the connection data API is reachable from the pod network"
    );
    assert_eq!(refused(&daemon, "metrics", "not_found"), 4.0);

    // Inside the pod (kubectl exec), the data and the CLI work as before.
    assert_eq!(daemon.get("/sockets").0, 200);
    assert_eq!(daemon.get("/events").0, 200);
    let table = daemon.netns().exec(&kit::idlemon(), &["sockets"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().next().unwrap_or("").contains("Idle"),
        "{table}"
    );
    daemon
        .netns()
        .exec(&kit::idlemon(), &["events", "--limit", "5"]);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn probes_answer_while_over_a_thousand_idle_connections_are_held() {
    const HELD: usize = 1100;
    let daemon = Daemon::start(&[]);
    let answered = daemon.netns().run(|| {
        raise_fd_limit();
        let held: Vec<TcpStream> = (0..HELD)
            .map(|_| TcpStream::connect(("127.0.0.1", DAEMON_PORT)).unwrap())
            .collect();
        // The probe comes last, as the kubelet's next one would.
        let started = Instant::now();
        let mut probe = TcpStream::connect(("127.0.0.1", DAEMON_PORT)).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        probe.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        let read = probe.read_to_string(&mut response);
        let elapsed = started.elapsed();
        drop(held);
        (
            read.is_ok() && response.starts_with("HTTP/1.0 200"),
            elapsed,
            response,
        )
    });
    let (ok, elapsed, response) = answered;
    eprintln!("/healthz with {HELD} idle connections held: {elapsed:?}");
    assert!(ok, "no 200 within 2 s: {response:?} after {elapsed:?}");
    // The idle connections made room for the ones after them.
    assert!(refused(&daemon, "metrics", "evicted") >= (HELD + 1 - 1024) as f64);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_client_that_stops_reading_is_cut_off() {
    let daemon = Daemon::start(&[]);
    // Small socket buffers in the daemon's namespace, so that an unread
    // answer of a few hundred KiB fills them; many sockets make /sockets
    // that long.
    daemon
        .netns()
        .sysctl("net.ipv4.tcp_wmem", "4096 8192 16384");
    daemon
        .netns()
        .sysctl("net.ipv4.tcp_rmem", "4096 8192 16384");
    let _sockets: Vec<TcpStream> = daemon.netns().run(|| {
        raise_fd_limit();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        (0..500)
            .flat_map(|_| {
                let client = TcpStream::connect(address).unwrap();
                let (server, _) = listener.accept().unwrap();
                [client, server]
            })
            .collect()
    });
    let rss_before = rss_kib(daemon.pid());
    let stalled = daemon.netns().run(|| {
        let mut stream = TcpStream::connect(("127.0.0.1", API_PORT)).unwrap();
        stream.write_all(b"GET /sockets HTTP/1.0\r\n\r\n").unwrap();
        stream
    });
    let cut = wait_for(Duration::from_secs(30), || {
        (refused(&daemon, "api", "write_timeout") >= 1.0).then_some(())
    });
    assert!(
        cut.is_some(),
        "a client that reads nothing still holds its answer"
    );
    // The server closed its end: what is left to read ends early.
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = (&stalled).read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).trim_end().ends_with(']'),
        "the whole answer was delivered after all"
    );
    let rss_after = rss_kib(daemon.pid());
    eprintln!("slow reader: RSS {rss_before} KiB before, {rss_after} KiB after the cut");
    assert_eq!(daemon.get("/healthz").0, 200);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn concurrent_socket_requests_share_walks() {
    const CALLERS: usize = 8;
    const FOR: Duration = Duration::from_secs(6);
    let daemon = Daemon::start(&["--scan-interval", "60"]);
    let walks_before = daemon.metric("idlemon_api_walks_total").unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    thread::scope(|scope| {
        for _ in 0..CALLERS {
            let answered = Arc::clone(&answered);
            let daemon = &daemon;
            scope.spawn(move || {
                let started = Instant::now();
                while started.elapsed() < FOR {
                    if daemon.get("/sockets").0 == 200 {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let walks = daemon.metric("idlemon_api_walks_total").unwrap() - walks_before;
    let answered = answered.load(Ordering::Relaxed);
    eprintln!(
        "{CALLERS} callers for {FOR:?}: {answered} /sockets answers from {walks} walks ({:.2} walks/s)",
        walks / FOR.as_secs_f64()
    );
    // Walks for /sockets are at least 1 s apart: at most one per second of
    // the loop, one at its start, and one for a request made at its end.
    assert!(walks >= 1.0, "no walk served the requests");
    assert!(walks <= FOR.as_secs_f64() + 2.0, "{walks} walks in {FOR:?}");
    assert!(
        answered as f64 > walks * 2.0,
        "{answered} answers from {walks} walks"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn long_polls_are_bounded_in_number() {
    const PLACES: usize = 64;
    let daemon = Daemon::start(&[]);
    let polls: Vec<TcpStream> = daemon.netns().run(|| {
        (0..PLACES)
            .map(|_| {
                let mut stream = TcpStream::connect(("127.0.0.1", API_PORT)).unwrap();
                stream
                    .write_all(b"GET /events?after=999999999&wait=30 HTTP/1.0\r\n\r\n")
                    .unwrap();
                stream
            })
            .collect()
    });
    // Let every one of them reach its handler and take its place.
    thread::sleep(Duration::from_secs(1));
    let (status, body) = daemon
        .try_get("/events?after=999999999&wait=30")
        .expect("a long poll past the bound was accepted, and waits");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("already waiting"), "{body}");
    assert!(refused(&daemon, "api", "too_many_long_polls") >= 1.0);
    // A plain query still answers at once.
    assert_eq!(daemon.get("/events?limit=1").0, 200);
    drop(polls);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn odd_entries_in_run_netns_are_skipped_and_walks_go_on() {
    /// Removed on drop, whatever the test's outcome: other programs read
    /// /run/netns too.
    struct Fifo(std::path::PathBuf);
    impl Drop for Fifo {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    std::fs::create_dir_all("/run/netns").unwrap();
    let fifo = Fifo(format!("/run/netns/idlemon-test-fifo-{}", std::process::id()).into());
    let path = std::ffi::CString::new(fifo.0.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // A namespace with a socket, so that each walk enters namespaces.
    let busy = Netns::new("busy");
    let _pair = busy.run(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    });

    let daemon = Daemon::start(&["--scan-interval", "0.2"]);
    let scans = daemon.metric("idlemon_scans_total").unwrap();
    let later = wait_for(Duration::from_secs(10), || {
        daemon
            .metric("idlemon_scans_total")
            .filter(|now| *now >= scans + 5.0)
    });
    assert!(later.is_some(), "walks stopped with a FIFO in /run/netns");
    assert!(
        daemon
            .metric("idlemon_scan_errors_total{reason=\"not_a_namespace\"}")
            .unwrap()
            >= 1.0
    );
    assert_eq!(daemon.get("/healthz").0, 200);
    let stamp = daemon
        .metric("idlemon_last_scan_timestamp_seconds")
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - stamp).abs() < 5.0, "last walk at {stamp}, now {now}");
    drop(fifo);
}
