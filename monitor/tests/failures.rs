//! Deaths that no RST explains, through the NAT recipe: a path that forgets
//! idle flows and then drops their packets (the client retransmits until
//! the kernel gives up), SYNs dropped to one destination, and a closed
//! port. Each test lowers the client namespace's retry sysctls so that the
//! kernel gives up in seconds instead of minutes.
//! Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use idlemon_testkit as kit;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::Duration,
};

use kit::{Daemon, Keepalive, NatPath, SERVER_IP, TempFile, echo, find_socket, wait_for};
use serde_json::Value;

const NAT_TIMEOUT: u32 = 5;
const IDLE: Duration = Duration::from_secs(8);

/// The test NAT's path (`NatPath::config`), named a firewall (which drops
/// forgotten flows).
fn firewall_config() -> TempFile {
    TempFile::new(
        "failures-firewall.toml",
        &format!(
            "[[path]]\ncidr = \"0.0.0.0/0\"\nkind = \"none\"\n\
             [[path]]\ncidr = \"::/0\"\nkind = \"none\"\n\
             [[path]]\nname = \"test-nat\"\ncidr = \"{SERVER_IP}/32\"\nkind = \"firewall\"\nidle_timeout = {NAT_TIMEOUT}\n"
        ),
    )
}

/// Short walks and the test NAT's path; destinations labelled for the
/// connect-failure counters.
fn start_daemon(config: &TempFile) -> Daemon {
    Daemon::with_config(config, &["--destination-labels", "10"])
}

/// Waits for an event of `kind` whose `end` ("local" or "remote") is `address`.
fn wait_event(daemon: &Daemon, kind: &str, end: &str, address: &str) -> Value {
    daemon.wait_event(&format!("{kind} with {end} {address}"), |event| {
        event["kind"] == kind && event[end] == address
    })
}

/// A GWLB-like path: after 8 s idle (the path forgets flows after 5 s) the
/// client's send is dropped, retransmitted (tcp_retries2 = 4 in the
/// client's namespace) and the connection dies of ETIMEDOUT. Meanwhile
/// /sockets shows it retransmitting since its send after idle; then a
/// `retransmit_timeout` event explains the death.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_path_that_drops_forgotten_flows_ends_in_an_explained_retransmit_timeout() {
    let config = firewall_config();
    let daemon = start_daemon(&config);
    let path = NatPath::dropping(NAT_TIMEOUT);
    path.client.sysctl("net.ipv4.tcp_retries2", "4");
    path.echo_server(8111, 1);
    let mut stream = path.connect(8111, Keepalive::Off);
    echo(&mut stream).unwrap();
    let local = stream.local_addr().unwrap();
    thread::sleep(IDLE);
    stream.write_all(b"ping").unwrap();

    // tcp_retries2 = 4 gives up about 6 s after the send (RTOs of 0.2,
    // 0.4, ... 3.2 s): the retransmitting socket is in /sockets until then.
    let stalled = wait_for(Duration::from_secs(5), || {
        let sockets = daemon.sockets("");
        find_socket(&sockets, path.client.inode(), local)
            .filter(|socket| socket["retransmitting_since_send_after_idle"] == true)
            .cloned()
    })
    .unwrap_or_else(|| panic!("{local} never shown retransmitting since its send after idle"));
    assert!(stalled["retransmits"].as_u64().unwrap() >= 1, "{stalled:#}");

    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let error = stream
        .read(&mut [0; 4])
        .expect_err("the path dropped the flow");
    assert_eq!(error.raw_os_error(), Some(libc::ETIMEDOUT), "{error}");

    let local = local.to_string();
    let send = wait_event(&daemon, "send_after_idle", "local", &local);
    let death = wait_event(&daemon, "retransmit_timeout", "local", &local);
    assert_eq!(
        death["classification"], "idle_timeout_suspected",
        "{death:#}"
    );
    assert_eq!(death["error"], "ETIMEDOUT");
    assert_eq!(death["remote"], format!("{SERVER_IP}:8111"));
    assert_eq!(death["reuse"]["event_id"], send["id"]);
    let idle = death["idle_before_seconds"].as_f64().unwrap();
    assert!(
        (idle - IDLE.as_secs_f64()).abs() < 1.0,
        "idle {idle} s, slept {IDLE:?}"
    );
    let dying = death["reuse"]["seconds_before"].as_f64().unwrap();
    assert!(
        (3.0..30.0).contains(&dying),
        "died {dying} s after the send"
    );
    assert!(death["retransmissions"].as_u64().unwrap() >= 4, "{death:#}");
    assert_eq!(death["pid"], std::process::id());
    assert_eq!(death["comm"], kit::own_comm().as_str());
    assert_eq!(death["socket"]["path_rule"], "test-nat");
    // In the words of the path's kind.
    assert_eq!(death["socket"]["path_kind"], "firewall");
    assert_eq!(death["socket"]["path_on_idle"], "drop");
    let explanation = death["explanation"].as_str().unwrap();
    assert!(
        explanation.starts_with("the firewall forgot the flow after ")
            && explanation.contains(&format!("idle (its timeout: {NAT_TIMEOUT} s) and dropped the next packet; the kernel retransmitted it ")),
        "{explanation}"
    );

    assert_eq!(
        daemon.counter(
            "idlemon_retransmit_timeouts_total{classification=\"idle_timeout_suspected\"}"
        ),
        1.0
    );
    // The same death is no reset.
    assert!(
        daemon
            .events()
            .iter()
            .all(|event| event["kind"] != "reset_received" || event["local"] != local.as_str()),
        "a reset for {local}"
    );
}

/// SYNs to one destination vanish (as when the remote runs tcp_tw_recycle
/// behind a NAT, or a firewall blackholes them) after a connect to it
/// succeeded: a `connect_failed` with reason timeout, naming the process,
/// its SYN retransmissions (tcp_syn_retries = 2, and on 6.5+ the linear
/// ones of tcp_syn_linear_timeouts) and the time it took; the destination's
/// failure and success counters.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn dropped_syns_are_a_connect_timeout_naming_the_process() {
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let path = NatPath::new(NAT_TIMEOUT);
    path.client.sysctl("net.ipv4.tcp_syn_retries", "2");
    // A connect to the destination succeeds; then its new flows' SYNs
    // vanish, while the established connection carries on.
    path.echo_server(8121, 1);
    let mut working = path.connect(8121, Keepalive::Off);
    echo(&mut working).unwrap();
    let output = path.nat.exec(
        "nft",
        &[
            "insert", "rule", "inet", "filter", "forward", "tcp", "dport", "8121", "ct", "state",
            "new", "drop",
        ],
    );
    assert!(output.status.success(), "{output:?}");

    let target: SocketAddr = format!("{SERVER_IP}:8121").parse().unwrap();
    // A blocking connect: the kernel's SYN retries decide, not a poll timeout.
    let error = path
        .client
        .run(move || TcpStream::connect(target))
        .expect_err("the SYNs were dropped");
    assert_eq!(error.raw_os_error(), Some(libc::ETIMEDOUT), "{error}");

    let remote = target.to_string();
    let failed = wait_event(&daemon, "connect_failed", "remote", &remote);
    assert_eq!(failed["reason"], "timeout", "{failed:#}");
    assert_eq!(failed["error"], "ETIMEDOUT");
    // What the client namespace's own counter says it retransmitted.
    let syns = syn_retransmits(&path);
    assert!(syns >= 2, "{syns} SYNs retransmitted");
    assert_eq!(failed["retransmissions"], syns, "{failed:#}");
    let took = failed["connect_seconds"].as_f64().unwrap();
    assert!((2.0..30.0).contains(&took), "connect took {took} s");
    assert_eq!(failed["pid"], std::process::id());
    assert_eq!(failed["comm"], kit::own_comm().as_str());
    assert_eq!(failed["socket"], Value::Null);

    // Host-wide: other processes of this machine may fail connects too.
    assert!(daemon.counter("idlemon_connect_failures_total{reason=\"timeout\"}") >= 1.0);
    assert_eq!(
        daemon.counter(&format!(
                "idlemon_destination_connect_failures_total{{destination=\"{remote}\",reason=\"timeout\"}}"
            )
        ),
        1.0
    );
    // The signature of a remote that drops some SYNs: other connects to
    // the same destination succeeded.
    assert_eq!(
        daemon.counter(&format!(
            "idlemon_destination_connects_succeeded_total{{destination=\"{remote}\"}}"
        )),
        1.0
    );
    assert!(daemon.counter("idlemon_syn_retransmits_total") >= 2.0);
    let failed_connects = daemon
        .events()
        .into_iter()
        .filter(|event| event["kind"] == "connect_failed" && event["pid"] == std::process::id())
        .count();
    assert_eq!(failed_connects, 1, "the working connect is no failure");
    drop(working);
}

/// `TcpExt: TCPSynRetrans` of the client namespace: SYNs it retransmitted.
fn syn_retransmits(path: &NatPath) -> u64 {
    let output = path.client.exec("cat", &["/proc/net/netstat"]);
    let text = String::from_utf8(output.stdout).unwrap();
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let index = names
        .split_whitespace()
        .position(|name| name == "TCPSynRetrans")
        .unwrap();
    values
        .split_whitespace()
        .nth(index)
        .unwrap()
        .parse()
        .unwrap()
}

/// A connect to a port where nothing listens: the server's RST refuses it.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_closed_port_is_a_refused_connect() {
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let path = NatPath::new(NAT_TIMEOUT);
    let target: SocketAddr = format!("{SERVER_IP}:8123").parse().unwrap();
    let error = path
        .client
        .run(move || TcpStream::connect(target))
        .expect_err("nothing listens");
    assert_eq!(error.raw_os_error(), Some(libc::ECONNREFUSED), "{error}");

    let failed = wait_event(&daemon, "connect_failed", "remote", &target.to_string());
    assert_eq!(failed["reason"], "refused", "{failed:#}");
    assert_eq!(failed["error"], "ECONNREFUSED");
    assert_eq!(failed["retransmissions"], 0);
    assert!(failed["connect_seconds"].as_f64().unwrap() < 1.0);
    assert_eq!(failed["pid"], std::process::id());
    // Host-wide: other processes of this machine may fail connects too.
    assert!(daemon.counter("idlemon_connect_failures_total{reason=\"refused\"}") >= 1.0);
    assert_eq!(
        daemon.counter(&format!(
                "idlemon_destination_connect_failures_total{{destination=\"{target}\",reason=\"refused\"}}"
            )
        ),
        1.0
    );
}

/// NAT port pressure: the connections the client namespace holds through
/// the NAT to one destination are counted in
/// idlemon_destination_established_connections for that destination, and
/// exactly those: the server namespace's accepted ends of the same
/// connections (whose remote is the NAT's address) are not, and closed
/// connections leave the count. Connections older than the daemon count too
/// (their local port is no listener's), their accepted ends not (theirs is).
#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn held_connections_to_one_destination_are_counted_and_accepted_ones_are_not() {
    const OLDER: usize = 2;
    const HELD: usize = 7;
    const CLOSED: usize = 3;
    let config = NatPath::config(NAT_TIMEOUT, false);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8131, OLDER + HELD);
    let open = |count: usize| -> Vec<TcpStream> {
        (0..count)
            .map(|_| {
                let mut stream = path.connect(8131, Keepalive::Off);
                echo(&mut stream).unwrap();
                stream
            })
            .collect()
    };
    let older = open(OLDER);
    let daemon = start_daemon(&config);
    let mut held = open(HELD);

    let destination = format!("{SERVER_IP}:8131");
    let series =
        format!("idlemon_destination_established_connections{{destination=\"{destination}\"}}");
    let counted = |wanted: usize| {
        wait_for(Duration::from_secs(5), || {
            daemon
                .metric(&series)
                .filter(|&count| count == wanted as f64)
        })
        .unwrap_or_else(|| panic!("{series} is {:?}, want {wanted}", daemon.metric(&series)))
    };
    counted(OLDER + HELD);
    // Both ends are ESTABLISHED sockets the daemon tracks.
    let sockets = daemon.sockets("");
    for stream in &held {
        let local = stream.local_addr().unwrap();
        assert!(
            find_socket(&sockets, path.client.inode(), local).is_some(),
            "{local} not tracked"
        );
    }
    // The server's ends are accepted connections from the NAT's address:
    // none is a destination. (Only this test's: the host's other namespaces
    // may hold other tests' connections.)
    let accepted: Vec<String> = sockets
        .iter()
        .filter(|socket| socket["netns"] == path.server.inode() && socket["local"] == destination)
        .map(|socket| socket["remote"].as_str().unwrap().to_owned())
        .collect();
    let (_, text) = daemon.get("/metrics");
    for remote in &accepted {
        assert!(remote.starts_with(kit::NAT_SERVER_SIDE_IP), "{remote}");
        assert_eq!(
            daemon.metric(&format!(
                "idlemon_destination_established_connections{{destination=\"{remote}\"}}"
            )),
            None,
            "accepted connection from {remote} counted:\n{text}"
        );
    }
    let accepted_tracked = accepted.len();
    assert_eq!(accepted_tracked, OLDER + HELD, "the server's accepted ends");

    held.truncate(HELD - CLOSED);
    counted(OLDER + HELD - CLOSED);
    drop(older);
    counted(HELD - CLOSED);
    held.clear();
    wait_for(Duration::from_secs(5), || {
        daemon.metric(&series).is_none().then_some(())
    })
    .unwrap_or_else(|| panic!("{series} stays after every connection closed"));
}
