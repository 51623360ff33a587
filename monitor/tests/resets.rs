//! Resets explained: a NAT gateway forgetting idle flows (client and server
//! side, and a real pooled HTTP client), an application reset, a keepalive
//! death, and a burst of 100k resets.
//! Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use idlemon_testkit as kit;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use kit::{
    Daemon, Keepalive, NatPath, Netns, SERVER_IP, TempFile, echo, process::Guarded, rss_kib,
    wait_for,
};
use serde_json::Value;

const NAT_TIMEOUT: u32 = 5;
/// The test NAT's paths, seen from the client (the server) and from the
/// server (the NAT's address), have its timeout; nothing else has one.
fn nat_config() -> TempFile {
    NatPath::config(NAT_TIMEOUT, true)
}

const IDLE: Duration = Duration::from_secs(8);

/// Waits for an event of `kind` whose local end is `local`.
fn wait_event(daemon: &Daemon, kind: &str, local: &str) -> Value {
    daemon.wait_event(&format!("{kind} for {local}"), |event| {
        event["kind"] == kind && event["local"] == local
    })
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn reuse_after_the_nat_timeout_is_logged_then_the_reset_explained() {
    let config = nat_config();
    let log = TempFile::new("events.jsonl", "");
    let daemon = Daemon::with_config(&config, &["--event-log", log.path()]);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8101, 1);
    let mut stream = path.connect(8101, Keepalive::Off);
    echo(&mut stream).unwrap();
    let local = stream.local_addr().unwrap().to_string();
    thread::sleep(IDLE);
    let error = echo(&mut stream).expect_err("the NAT forgot the flow");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset);

    let reset = wait_event(&daemon, "reset_received", &local);
    assert_eq!(
        reset["classification"], "idle_timeout_suspected",
        "{reset:#}"
    );
    // Without the send hook (`cargo xtask vm-test`'s mode without fentry
    // and kprobes, on kernels that have no send tracepoint) idlemon cannot
    // see the send after idle: it judges the reset by the server's silence
    // before the send, and the reuse has no event to link.
    let send_hook =
        !kit::attach::Expected::from_env().is_some_and(|expected| expected.missing("send"));
    let kinds_logged: &[&str] = if send_hook {
        &["send_after_idle", "reset_received"]
    } else {
        &["reset_received"]
    };
    // The log's own thread writes it after /events has the event, and may be
    // mid-line (every host's connect failures and deaths are logged too):
    // whole lines only, until every event is there.
    let logged = || {
        let text = std::fs::read_to_string(&log.0).unwrap();
        let whole = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        whole
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .filter(|event: &Value| event["local"] == local.as_str())
            .collect::<Vec<Value>>()
    };
    let lines = wait_for(Duration::from_secs(5), || {
        let lines = logged();
        (lines.len() >= kinds_logged.len()).then_some(lines)
    })
    .unwrap_or_else(|| panic!("the event log lacks events of {local}: {:#?}", logged()));
    let kinds: Vec<&str> = lines
        .iter()
        .filter_map(|event| event["kind"].as_str())
        .collect();
    assert_eq!(kinds, kinds_logged, "{lines:#?}");
    assert_eq!(lines.last(), Some(&reset), "log and /events agree");

    assert_eq!(reset["remote"], format!("{SERVER_IP}:8101"));
    let idle = reset["idle_before_seconds"].as_f64().unwrap();
    assert!(
        (idle - IDLE.as_secs_f64()).abs() < 1.0,
        "idle {idle} s, slept {IDLE:?}"
    );
    assert_eq!(reset["reuse"]["idle_seconds"].as_f64(), Some(idle));
    assert!(reset["idle_since_receive_seconds"].as_f64().unwrap() >= 7.0);
    assert!(reset["idle_since_send_seconds"].as_f64().unwrap() < 1.0);
    assert_eq!(reset["socket"]["path_rule"], "test-nat");
    if send_hook {
        let send = &lines[0];
        assert_eq!(send["comm"], kit::own_comm().as_str());
        assert_eq!(reset["reuse"]["event_id"], send["id"]);
        // The send hook names the socket's owner; without it a RST, which
        // arrives in softirq, names no one for sure.
        assert_eq!(reset["pid"], std::process::id());
        assert!(daemon.counter("idlemon_sends_after_idle_total") >= 1.0);
    } else {
        assert!(reset["reuse"]["event_id"].is_null(), "{reset:#}");
    }

    assert_eq!(
        daemon.counter("idlemon_resets_received_total{classification=\"idle_timeout_suspected\"}"),
        1.0
    );
    assert!(daemon.counter("idlemon_idle_before_reset_seconds_bucket{le=\"10\"}") >= 1.0);
    assert_eq!(
        daemon.counter("idlemon_idle_before_reset_seconds_bucket{le=\"5\"}"),
        0.0
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_server_answering_after_the_nat_timeout_gets_the_reset() {
    let config = nat_config();
    let daemon = Daemon::with_config(&config, &[]);
    let path = NatPath::new(NAT_TIMEOUT);
    let listener = path
        .server
        .run(|| TcpListener::bind((SERVER_IP, 8102)).unwrap());
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4];
        stream.read_exact(&mut request).unwrap();
        thread::sleep(IDLE);
        // The reply reaches the NAT after it forgot the flow.
        let _ = stream.write_all(b"late");
        thread::sleep(Duration::from_millis(500));
        let mut more = [0u8; 1];
        stream.read(&mut more)
    });
    let mut stream = path.connect(8102, Keepalive::Off);
    stream.write_all(b"ping").unwrap();
    stream
        .set_read_timeout(Some(IDLE + Duration::from_secs(2)))
        .unwrap();
    let mut reply = [0u8; 4];
    let heard = stream.read(&mut reply);
    assert!(
        !matches!(heard, Ok(4)),
        "the client should never hear the reply: {heard:?}"
    );
    let server_saw = server.join().unwrap();
    assert_eq!(
        server_saw.map_err(|error| error.kind()).err(),
        Some(ErrorKind::ConnectionReset)
    );

    let reset = wait_event(&daemon, "reset_received", &format!("{SERVER_IP}:8102"));
    assert_eq!(reset["classification"], "idle_timeout_suspected");
    assert_eq!(reset["socket"]["netns"], path.server.inode());
    assert_eq!(reset["socket"]["path_rule"], "test-nat-server-side");
    let reuse = &reset["reuse"];
    assert!(reuse["idle_seconds"].as_f64().unwrap() >= 7.0, "{reset:#}");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn an_application_reset_on_a_busy_connection_is_other() {
    let config = nat_config();
    let daemon = Daemon::with_config(&config, &[]);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8103, 1);
    let mut stream = path.connect(8103, Keepalive::Off);
    for _ in 0..20 {
        echo(&mut stream).unwrap();
    }
    let local = stream.local_addr().unwrap().to_string();
    kit::reset_on_close(&stream);
    drop(stream);

    let received = wait_event(&daemon, "reset_received", &format!("{SERVER_IP}:8103"));
    assert_eq!(received["classification"], "other");
    assert!(received["idle_before_seconds"].as_f64().unwrap() < 1.0);
    let sent = wait_event(&daemon, "reset_sent", &local);
    assert_eq!(
        sent["pid"],
        std::process::id(),
        "the closing process: {sent:#}"
    );
    assert_eq!(
        daemon.counter("idlemon_resets_received_total{classification=\"idle_timeout_suspected\"}"),
        0.0
    );
}

/// A pooled HTTP client (urllib3 where installed, else http.client, which
/// urllib3 uses underneath) reuses a keep-alive connection after idling
/// past the NAT timeout.
const HTTP_CLIENT: &str = r#"
import sys, time
url = "http://%s:8104/" % sys.argv[1]
try:
    import urllib3
    pool = urllib3.PoolManager(retries=False, timeout=10)
    fetch = lambda: pool.request("GET", url).data
except ImportError:
    import http.client
    connection = http.client.HTTPConnection(sys.argv[1], 8104, timeout=10)
    def fetch():
        connection.request("GET", "/")
        return connection.getresponse().read()
assert fetch() == b"ok"
time.sleep(float(sys.argv[2]))
try:
    fetch()
    print("survived")
except Exception as error:
    print("%s: %s" % (type(error).__name__, error))
"#;

const HTTP_SERVER: &str = r#"
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer((sys.argv[1], 8104), Handler).serve_forever()
"#;

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_pooled_http_client_hits_connection_reset_by_peer() {
    let config = nat_config();
    let daemon = Daemon::with_config(&config, &[]);
    let path = NatPath::new(NAT_TIMEOUT);
    let mut command = path.server.command("python3");
    command.args(["-c", HTTP_SERVER, SERVER_IP]);
    let server = Guarded::spawn(&mut command, "the HTTP server", Duration::ZERO).unwrap();
    let listening = wait_for(Duration::from_secs(5), || {
        path.client
            .run(|| TcpStream::connect((SERVER_IP, 8104)).ok())
    });
    assert!(listening.is_some(), "HTTP server did not start");
    drop(listening);

    let client = path
        .client
        .command("python3")
        .args(["-c", HTTP_CLIENT, SERVER_IP, &IDLE.as_secs().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client_pid = client.id();
    let output = client.wait_with_output().unwrap();
    drop(server);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.contains("Connection reset by peer"),
        "client said: {said}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let reset = wait_for(Duration::from_secs(5), || {
        daemon.events().into_iter().find(|event| {
            event["kind"] == "reset_received" && event["remote"] == format!("{SERVER_IP}:8104")
        })
    })
    .expect("reset event");
    assert_eq!(reset["classification"], "idle_timeout_suspected");
    assert_eq!(reset["comm"], "python3");
    assert_eq!(reset["pid"], client_pid);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn unanswered_keepalive_probes_are_a_keepalive_timeout_event() {
    let config = nat_config();
    let daemon = Daemon::with_config(&config, &[]);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8105, 1);
    let mut stream = path.connect(8105, Keepalive::Every(1));
    kit::set_keepalive_probes(&stream, 2);
    echo(&mut stream).unwrap();
    let local = stream.local_addr().unwrap().to_string();
    // The path goes dark: probes go unanswered.
    path.nat.exec(
        "nft",
        &["insert", "rule", "inet", "filter", "forward", "drop"],
    );

    let started = Instant::now();
    let death = wait_for(Duration::from_secs(10), || {
        daemon
            .events()
            .into_iter()
            .find(|event| event["kind"] == "keepalive_timeout" && event["local"] == local.as_str())
    })
    .unwrap_or_else(|| panic!("no keepalive_timeout event after {:?}", started.elapsed()));
    assert_eq!(death["error"], "ETIMEDOUT");
    assert_eq!(death["comm"], kit::own_comm().as_str());
    assert!(daemon.counter("idlemon_keepalive_timeouts_total") >= 1.0);
    let mut buffer = [0u8; 1];
    let error = stream
        .read(&mut buffer)
        .expect_err("the kernel closed the connection");
    assert_eq!(error.kind(), ErrorKind::TimedOut);
}

/// 100,000 connection attempts to a closed port: the host answers each with
/// a RST, faster than any log can keep up.
const RST_BURST: &str = r#"
import socket, sys
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", 9))
    except ConnectionRefusedError:
        pass
    s.close()
"#;

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_burst_of_100k_resets_is_counted_and_memory_stays_bounded() {
    const BURST: u32 = 100_000;
    let config = nat_config();
    let daemon = Daemon::with_config(&config, &["--event-log", ""]);
    let sent_before = daemon.counter("idlemon_resets_sent_total");
    let logged_before = daemon.counter("idlemon_events_total{kind=\"reset_sent\"}");
    let lost_before = daemon.counter("idlemon_events_lost_total");
    let rss_before = rss_kib(daemon.pid());

    // A stalled reader (here: stopped) is the worst case: the ring buffer
    // fills and the kernel must count what it drops.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGSTOP) };
    let host = Netns::new("burst");
    let status = host
        .command("python3")
        .args(["-c", RST_BURST, &BURST.to_string()])
        .status();
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGCONT) };
    assert!(status.unwrap().success());

    let sent = wait_for(Duration::from_secs(10), || {
        let sent = daemon.counter("idlemon_resets_sent_total") - sent_before;
        (sent >= f64::from(BURST)).then_some(sent)
    })
    .expect("every RST counted");
    let accounted = wait_for(Duration::from_secs(10), || {
        let logged = daemon.counter("idlemon_events_total{kind=\"reset_sent\"}") - logged_before;
        let lost = daemon.counter("idlemon_events_lost_total") - lost_before;
        (logged + lost >= f64::from(BURST)).then_some((logged, lost))
    });
    let (logged, lost) = accounted.expect("every RST event either explained or counted lost");
    eprintln!("burst: {sent} RSTs, {logged} events explained, {lost} lost");
    assert!(lost > 0.0, "a stopped reader cannot have kept up");
    assert_eq!(daemon.get("/readyz").0, 200);
    let history = daemon.events().len();
    assert!(history <= 10_000, "history holds {history} events");
    let rss_after = rss_kib(daemon.pid());
    eprintln!("burst: RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(rss_after < 200 * 1024, "RSS {rss_after} KiB");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_flood_of_resets_with_a_stalled_log_reader_keeps_the_evidence() {
    const FLOOD: u32 = 100_000;
    let config = nat_config();
    // The event log on stdout, into a pipe that nobody reads.
    let daemon = Daemon::start_with_stalled_stdout(&Daemon::quick_args(&config, &[]));
    let rss_before = rss_kib(daemon.pid());
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8105, 1);
    let mut stream = path.connect(8105, Keepalive::Off);
    echo(&mut stream).unwrap();
    let local = stream.local_addr().unwrap().to_string();
    thread::sleep(IDLE);

    // A port scan's worth of unrelated resets, and during it the reset that
    // explains an incident.
    let host = Netns::new("flood");
    let mut flood = host
        .command("python3")
        .args(["-c", RST_BURST, &FLOOD.to_string()])
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    let error = echo(&mut stream).expect_err("the NAT forgot the flow");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset);
    assert!(flood.wait().unwrap().success());

    assert_eq!(daemon.get("/healthz").0, 200);
    let sent = wait_for(Duration::from_secs(10), || {
        daemon
            .counter("idlemon_resets_sent_total")
            .ge(&f64::from(FLOOD))
            .then_some(())
    });
    assert!(sent.is_some(), "the flood's RSTs were not all counted");
    // The reader may still be draining the ring; page through the history
    // only once every reset_sent event is either explained or counted lost
    // and the counts stand still between two polls, or pages taken while
    // events arrive would add up past the bound.
    let previous = std::cell::Cell::new((0.0, 0.0));
    let drained = wait_for(Duration::from_secs(10), || {
        let logged = daemon.counter("idlemon_events_total{kind=\"reset_sent\"}");
        let lost = daemon.counter("idlemon_events_lost_total");
        let still = previous.replace((logged, lost)) == (logged, lost);
        (still && logged + lost >= f64::from(FLOOD)).then_some(())
    });
    assert!(
        drained.is_some(),
        "every reset_sent event either explained or counted lost"
    );
    let dropped = daemon.counter("idlemon_event_log_dropped_total{kind=\"reset_sent\"}");
    let lost = daemon.counter("idlemon_events_lost_total");
    eprintln!(
        "flood: {dropped} reset_sent events dropped by the stalled log, {lost} lost in the kernel"
    );
    assert!(dropped > 0.0, "a log nobody reads took every event");

    // The daemon sees the whole host: events that other traffic causes
    // while the pages are taken add to what the paging returns, though the
    // history never held more than its bound at once.
    let logged_before = daemon.metric_sum("idlemon_events_total", "");
    let events = daemon.events();
    let arrived = daemon.metric_sum("idlemon_events_total", "") - logged_before;
    let reset = events
        .iter()
        .find(|event| event["kind"] == "reset_received" && event["local"] == local.as_str())
        .unwrap_or_else(|| {
            panic!(
                "the idle-timeout reset was evicted; {} events kept",
                events.len()
            )
        });
    assert_eq!(reset["classification"], "idle_timeout_suspected");
    assert!(
        events.len() as f64 <= 10_000.0 + arrived,
        "history holds {} events ({arrived} arrived while paging)",
        events.len()
    );
    let rss_after = rss_kib(daemon.pid());
    eprintln!("flood: RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(rss_after < 200 * 1024, "RSS {rss_after} KiB");
}

/// A server that accepts one connection, waits for a line on stdin, then
/// resets it (SO_LINGER 0). Prints its port first.
const RESETTING_SERVER: &str = r#"
import socket, struct, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
print(listener.getsockname()[1], flush=True)
connection, _ = listener.accept()
sys.stdin.readline()
connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
connection.close()
print("reset", flush=True)
"#;

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_reset_in_softirq_is_not_pinned_on_the_interrupted_process() {
    use std::io::BufRead as _;
    // Both ends exist before idlemon starts: no owner is recorded for them.
    let netns = Netns::new("softirq");
    let mut server = netns
        .command("python3")
        .args(["-c", RESETTING_SERVER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let client = netns.run(|| TcpStream::connect(("127.0.0.1", port)).unwrap());
    let local = client.local_addr().unwrap().to_string();
    let daemon = Daemon::with_config(&nat_config(), &[]);

    // The server's close sends the RST; on loopback the client's side of it
    // is processed in softirq on the server's CPU, over the server process.
    server.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "reset");
    let received = wait_event(&daemon, "reset_received", &local);
    assert_ne!(
        received["pid"],
        server.id(),
        "the reset was pinned on the process it interrupted: {received:#}"
    );
    assert!(
        received["pid"].is_null() || received["pid"] == std::process::id(),
        "{received:#}"
    );
    assert_ne!(received["comm"], "python3", "{received:#}");
    // The reset the server sent was its own doing, in its own context.
    let sent = wait_for(Duration::from_secs(5), || {
        daemon
            .events()
            .into_iter()
            .find(|event| event["kind"] == "reset_sent" && event["remote"] == local.as_str())
    })
    .expect("the server's reset is logged");
    assert_eq!(sent["pid"], server.id(), "{sent:#}");
    let _ = server.wait();
    drop(client);
}
