//! Tracking and classification against the real kernel, through a NAT
//! gateway whose idle timeout is a few seconds (`kit::NatPath`).
//! Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use idlemon_testkit as kit;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use kit::{Daemon, Keepalive, NatPath, Netns, TempFile, echo, find_socket, wait_for};
use serde_json::Value;

/// The NAT forgets flows idle this long.
const NAT_TIMEOUT: u32 = 5;
/// Long enough past NAT_TIMEOUT that the flow is surely forgotten.
const IDLE_PAST_TIMEOUT: Duration = Duration::from_secs(8);

/// Short walks, and the NAT's path alone with an idle timeout
/// (`NatPath::config`).
fn start_daemon(config: &TempFile) -> Daemon {
    Daemon::with_config(config, &[])
}

/// This test process's at-risk sockets by `reason` in
/// `idlemon_at_risk_sockets`: its workload label is the process's name,
/// which other test runs sharing the host (other binaries) do not carry.
fn own_at_risk(daemon: &Daemon, reason: &str) -> f64 {
    daemon.metric_sum(
        "idlemon_at_risk_sockets",
        &format!("reason=\"{reason}\",workload=\"{}\"", kit::own_comm()),
    )
}

/// The client's socket as idlemon reports it.
fn client_socket(daemon: &Daemon, path: &NatPath, local: SocketAddr) -> Option<Value> {
    find_socket(&daemon.sockets(""), path.client.inode(), local).cloned()
}

/// Waits until the client socket is flagged, checking that it happens before
/// the NAT forgets the flow. Returns the socket's record.
fn flagged_before_timeout(
    daemon: &Daemon,
    path: &NatPath,
    local: SocketAddr,
    since: Instant,
) -> Value {
    let flagged = wait_for(Duration::from_secs(u64::from(NAT_TIMEOUT)), || {
        find_socket(&daemon.sockets("?at_risk=true"), path.client.inode(), local).cloned()
    })
    .unwrap_or_else(|| panic!("not flagged within {NAT_TIMEOUT} s; log:\n{}", daemon.log()));
    assert!(
        since.elapsed() < Duration::from_secs(u64::from(NAT_TIMEOUT)),
        "flagged only after the NAT timeout"
    );
    assert_eq!(flagged["at_risk"], true);
    assert_eq!(flagged["path_rule"], "test-nat");
    assert_eq!(flagged["path_idle_timeout_seconds"], NAT_TIMEOUT);
    flagged
}

/// Idles a connection past the NAT timeout, checking that idlemon never flags
/// it meanwhile, then checks that it still works. Returns the last record
/// seen, and the most long-idle sockets with effective keepalive reported.
fn survives_unflagged(daemon: &Daemon, path: &NatPath, stream: &mut TcpStream) -> (Value, f64) {
    let local = stream.local_addr().unwrap();
    let started = Instant::now();
    // A walk runs at most every half second: wait for the first that saw it.
    wait_for(Duration::from_secs(3), || {
        client_socket(daemon, path, local)
    })
    .expect("client socket tracked");
    let mut last = None;
    let mut covered: f64 = 0.0;
    // At least once, however long the first walk took on a loaded machine.
    while last.is_none() || started.elapsed() < IDLE_PAST_TIMEOUT {
        let socket = client_socket(daemon, path, local).expect("client socket still tracked");
        assert_eq!(socket["at_risk"], false, "flagged: {socket:#}");
        assert_eq!(
            socket["fix"],
            Value::Null,
            "a fix for a safe socket: {socket:#}"
        );
        last = Some(socket);
        let effective = daemon.metric("idlemon_long_idle_sockets{keepalive=\"effective\"}");
        covered = covered.max(effective.expect("coverage gauge exported"));
        thread::sleep(Duration::from_millis(500));
    }
    echo(stream).expect("connection survived the NAT timeout");
    (last.expect("observed at least once"), covered)
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn idle_client_without_keepalive_is_flagged_then_reset() {
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8001, 1);
    let mut stream = path.connect(8001, Keepalive::Off);
    echo(&mut stream).unwrap();
    let quiet_since = Instant::now();
    let local = stream.local_addr().unwrap();

    let flagged = flagged_before_timeout(&daemon, &path, local, quiet_since);
    assert_eq!(flagged["risk"], "no_keepalive");
    assert_eq!(flagged["keepalive"]["enabled"], false);
    assert_eq!(flagged["remote"], format!("{}:8001", kit::SERVER_IP));
    assert_eq!(
        flagged["comm"],
        kit::own_comm().as_str(),
        "attributed to the test client: {flagged:#}"
    );
    assert_ne!(
        flagged["comm"],
        kit::CLIENT_THREAD_COMM,
        "the process, not the thread"
    );
    assert_eq!(flagged["pid"], std::process::id());
    // Attribution end to end: the cgroup this test runs in.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let expected = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .or_else(|| {
            own.lines()
                .find_map(|line| line.split_once(":name=systemd:").map(|(_, path)| path))
        })
        .expect("a cgroup v2 or name=systemd line");
    assert_eq!(flagged["cgroup_path"], expected, "{flagged:#}");
    assert!(flagged["cgroup_id"].as_u64().is_some(), "{flagged:#}");
    // No keepalive: the application's to set (2 s idle, 1 s apart, for the
    // 5 s NAT), or enforcement of the cgroup this test runs in.
    let fix = &flagged["fix"];
    assert_eq!(fix["kind"], "application", "{flagged:#}");
    assert_eq!(
        (
            &fix["idle_seconds"],
            &fix["interval_seconds"],
            &fix["count"]
        ),
        (&Value::from(2), &Value::from(1), &Value::from(5))
    );
    assert!(
        fix["snippets"]["python"]
            .as_str()
            .unwrap()
            .contains("socket.TCP_KEEPIDLE, 2)"),
        "{fix:#}"
    );
    // A systemd system service (CI may run there) is named by its unit,
    // any other cgroup by its path.
    let selector = match expected.strip_prefix("/system.slice/") {
        Some(unit) if unit.ends_with(".service") && !unit.contains('/') => {
            format!("units = [\"{unit}\"]")
        }
        _ => format!("cgroups = [\"{expected}\"]"),
    };
    assert!(
        fix["enforce"].as_str().unwrap().contains(&selector),
        "{fix:#}"
    );
    // idlemon advise: this test process's workload, its one socket, that fix.
    let advice = daemon.netns().exec(&kit::idlemon(), &["advise", "--json"]);
    assert!(advice.status.success(), "{advice:?}");
    let advice: Value = serde_json::from_slice(&advice.stdout).unwrap();
    let ours = advice
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["workload"] == kit::own_comm().as_str())
        .unwrap_or_else(|| panic!("no advice for this test: {advice:#}"));
    assert_eq!(ours["sockets"], 1, "{advice:#}");
    assert_eq!(ours["risks"]["no_keepalive"], 1);
    assert_eq!(ours["destinations"][0], format!("{}:8001", kit::SERVER_IP));
    assert_eq!(ours["fix"]["kind"], "application");
    assert_eq!(ours["fix"]["enforce"], fix["enforce"]);
    let text = daemon.netns().exec(&kit::idlemon(), &["advise"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Fix: in the application, turn SO_KEEPALIVE on")
            && text.contains("[enforce]"),
        "{text}"
    );
    assert_eq!(Some(own_at_risk(&daemon, "no_keepalive")), Some(1.0));

    thread::sleep(IDLE_PAST_TIMEOUT.saturating_sub(quiet_since.elapsed()));
    let error = echo(&mut stream).expect_err("the NAT should have forgotten the flow");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn default_keepalive_is_flagged_too_slow() {
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8002, 1);
    let mut stream = path.connect(8002, Keepalive::On);
    echo(&mut stream).unwrap();
    let local = stream.local_addr().unwrap();

    let flagged = flagged_before_timeout(&daemon, &path, local, Instant::now());
    assert_eq!(flagged["risk"], "keepalive_too_slow");
    assert_eq!(flagged["keepalive"]["enabled"], true);
    assert_eq!(flagged["keepalive"]["idle_seconds"], 7200.0);
    assert_eq!(flagged["keepalive"]["idle_from"], "namespace");
    // Keepalive on at the namespace's 7200 s: its sysctl, below the 5 s NAT;
    // outside pods as sysctl -w (the 75 s interval needs lowering too).
    let fix = &flagged["fix"];
    assert_eq!(fix["kind"], "sysctl", "{flagged:#}");
    assert_eq!(fix["sysctls"][0]["name"], "net.ipv4.tcp_keepalive_time");
    assert_eq!(fix["sysctls"][0]["value"], 2);
    assert_eq!(fix["sysctls"][1]["name"], "net.ipv4.tcp_keepalive_intvl");
    assert_eq!(fix["sysctls"][1]["value"], 1);
    assert_eq!(
        fix["snippet"],
        "sysctl -w net.ipv4.tcp_keepalive_time=2\nsysctl -w net.ipv4.tcp_keepalive_intvl=1\n"
    );
    let text = daemon.netns().exec(&kit::idlemon(), &["advise"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "{}: 1 at-risk socket (1 keepalive_too_slow) to {}:8002\n  Path: ",
            kit::own_comm(),
            kit::SERVER_IP
        )) && text.contains("\n  Fix: set the keepalive sysctls")
            && text.contains("    sysctl -w net.ipv4.tcp_keepalive_time=2\n"),
        "{text}"
    );
    assert_eq!(Some(own_at_risk(&daemon, "keepalive_too_slow")), Some(1.0));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn socket_keepidle_below_the_timeout_is_not_flagged_and_survives() {
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8003, 1);
    let mut stream = path.connect(8003, Keepalive::Every(1));
    echo(&mut stream).unwrap();

    let (socket, covered) = survives_unflagged(&daemon, &path, &mut stream);
    assert_eq!(socket["keepalive"]["idle_seconds"], 1.0);
    assert_eq!(socket["keepalive"]["idle_from"], "socket");
    assert!(
        socket["keepalive"]["probes_answered"].as_u64().unwrap() >= 1,
        "keepalive probes were answered: {socket:#}"
    );
    // The keepalive hook attaches on this kernel too (timer_expire_entry,
    // filtered on the keepalive callback), so the timer runs are counted.
    assert!(
        socket["keepalive"]["timer_runs"].as_u64().unwrap() >= 1,
        "keepalive timer runs counted: {socket:#}"
    );
    // Past the threshold in data terms, yet protected by keepalive.
    assert!(socket["idle_seconds"].as_f64().unwrap() >= 2.0);
    // At least this socket: the gauge has no owner label, and other test
    // runs on this host may hold long-idle sockets to the same test address.
    assert!(
        covered >= 1.0,
        "long-idle socket with effective keepalive not counted"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn namespace_keepalive_sysctl_below_the_timeout_is_not_flagged() {
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let path = NatPath::new(NAT_TIMEOUT);
    path.client.sysctl("net.ipv4.tcp_keepalive_time", "1");
    path.client.sysctl("net.ipv4.tcp_keepalive_intvl", "1");
    path.echo_server(8004, 1);
    let mut stream = path.connect(8004, Keepalive::On);
    echo(&mut stream).unwrap();

    let (socket, covered) = survives_unflagged(&daemon, &path, &mut stream);
    assert!(
        covered >= 1.0,
        "long-idle socket with effective keepalive not counted"
    );
    assert_eq!(socket["keepalive"]["idle_seconds"], 1.0);
    assert_eq!(socket["keepalive"]["idle_from"], "namespace");
    assert_eq!(socket["keepalive"]["interval_seconds"], 1.0);
    // The gauge of each namespace's tcp_keepalive_time: the client's 1 s,
    // the server's (its accepted socket) at the kernel's 7200 s; no pods.
    let gauge = |inode: u64| {
        daemon.metric(&format!(
            "idlemon_namespace_keepalive_time_seconds{{namespace=\"\",netns=\"{inode}\",pod=\"\"}}"
        ))
    };
    assert_eq!(gauge(path.client.inode()), Some(1.0));
    assert_eq!(gauge(path.server.inode()), Some(7200.0));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn connection_from_before_idlemon_started_is_flagged() {
    let config = NatPath::config(NAT_TIMEOUT, false);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8005, 1);
    let mut stream = path.connect(8005, Keepalive::Off);
    echo(&mut stream).unwrap();
    let quiet_since = Instant::now();
    let local = stream.local_addr().unwrap();

    let daemon = start_daemon(&config);
    let flagged = flagged_before_timeout(&daemon, &path, local, quiet_since);
    assert_eq!(flagged["risk"], "no_keepalive");
    // idlemon was not running at connect or send time: no attribution, yet tracked.
    assert_eq!(flagged["pid"], Value::Null);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn closed_sockets_leave_the_table_and_the_gauges() {
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8006, 1);
    let mut stream = path.connect(8006, Keepalive::Off);
    echo(&mut stream).unwrap();
    let local = stream.local_addr().unwrap();
    flagged_before_timeout(&daemon, &path, local, Instant::now());
    let at_risk = || own_at_risk(&daemon, "no_keepalive");
    assert_eq!(at_risk(), 1.0);

    drop(stream);
    let gone = wait_for(Duration::from_secs(5), || {
        client_socket(&daemon, &path, local).is_none().then_some(())
    });
    assert!(gone.is_some(), "closed socket still listed");
    assert_eq!(at_risk(), 0.0);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_busy_socket_is_attributed_in_the_socket_list() {
    // Periodic walks look up owners only for sockets idle past the
    // threshold; /sockets must still name the owner of a busy one.
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8008, 1);
    let mut stream = path.connect(8008, Keepalive::Off);
    let local = stream.local_addr().unwrap();
    // Let periodic walks see the socket first, then use it again.
    thread::sleep(Duration::from_millis(1200));
    echo(&mut stream).unwrap();
    let socket = client_socket(&daemon, &path, local).expect("client socket tracked");
    assert!(
        socket["idle_seconds"].as_f64().unwrap() < 2.0,
        "busy: {socket:#}"
    );
    assert_eq!(socket["pid"], std::process::id(), "{socket:#}");
    assert_eq!(socket["comm"], kit::own_comm().as_str());
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn owners_follow_address_reuse_and_changes_of_user() {
    // The send hook skips its table lookup for a process sending again on
    // a socket it was already recorded for; that memo must neither outlive
    // a socket (the next one gets its memory, and must get its own entry)
    // nor hide a new user.
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let netns = Netns::new("owners");
    let me = std::process::id();
    let kept = netns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let pair = || {
            let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let (server, _) = listener.accept().unwrap();
            client.write_all(b"x").unwrap();
            (client, server)
        };
        // Opened, used and closed one after another: each new socket gets
        // the memory, so the address, of one just freed.
        for _ in 0..200 {
            drop(pair());
        }
        (0..20).map(|_| pair()).collect::<Vec<_>>()
    });
    let owner = |client: &TcpStream| {
        let local = client.local_addr().unwrap();
        find_socket(&daemon.sockets(""), netns.inode(), local).map(|socket| socket["pid"].clone())
    };
    for (client, _) in &kept {
        let pid = wait_for(Duration::from_secs(5), || owner(client));
        assert_eq!(pid, Some(Value::from(me)), "{client:?}");
    }

    // Another process sends on the first socket, then this one again.
    let client = &kept[0].0;
    let fd = std::os::fd::AsRawFd::as_raw_fd(client);
    let mut other = std::process::Command::new("sh");
    other.args(["-c", "printf y >&3"]);
    // SAFETY: dup2 is async-signal-safe; fd 3 of the child is the socket.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut other, move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut other = other.spawn().unwrap();
    let other_pid = Value::from(other.id());
    assert!(other.wait().unwrap().success());
    // /sockets serves a walk up to 0.5 s old: wait for one after the send.
    let becomes = |pid: &Value| {
        wait_for(Duration::from_secs(5), || {
            owner(client).filter(|owner| owner == pid)
        })
    };
    assert_eq!(becomes(&other_pid), Some(other_pid));
    let mut writer: &TcpStream = client;
    writer.write_all(b"z").unwrap();
    assert_eq!(becomes(&Value::from(me)), Some(Value::from(me)));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn owners_of_idle_sockets_carry_over_between_periodic_walks() {
    // A periodic walk leaves the owner of a socket idle since before the
    // previous walk to user space, which takes it from the previous
    // snapshot: the metric keeps naming the process, walk after walk.
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = Daemon::with_config(&config, &["--log-format", "json"]);
    let path = NatPath::new(NAT_TIMEOUT);
    // A connection that nobody has accepted, beside the client: the walk by
    // file descriptor cannot see its server end, so every periodic scan
    // walks the client's namespace by iter/tcp, the walk that carries over.
    let _pending = pending_connection(&path.client);
    path.echo_server(8010, 1);
    let mut stream = path.connect(8010, Keepalive::Off);
    echo(&mut stream).unwrap();
    let local = stream.local_addr().unwrap();
    let flagged = flagged_before_timeout(&daemon, &path, local, Instant::now());
    assert_eq!(flagged["pid"], std::process::id());
    let at_risk_series = || {
        let (_, body) = daemon.get("/metrics");
        body.lines()
            .filter(|line| {
                line.starts_with("idlemon_at_risk_sockets{")
                    && line.contains(&format!("workload=\"{}\"", kit::own_comm()))
                    && !line.ends_with(" 0")
            })
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // /sockets walks read every owner; from here on only periodic walks run.
    let looked_up = at_risk_series();
    assert_eq!(looked_up.len(), 1, "{looked_up:?}");
    // Walks that carried at least one owner over (this socket's, or another
    // long-idle one's on this host), from the JSON log.
    let carries = || {
        daemon
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["owners_carried_over"].as_u64() >= Some(1))
            .count()
    };
    let before = carries();
    thread::sleep(Duration::from_millis(2500));
    assert!(
        carries() >= before + 2,
        "no periodic walk carried the owner over; log:\n{}",
        daemon.log()
    );
    assert_eq!(at_risk_series(), looked_up);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn idle_times_agree_with_ss() {
    let config = NatPath::config(NAT_TIMEOUT, false);
    let daemon = start_daemon(&config);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(8007, 1);
    let mut stream = path.connect(8007, Keepalive::Off);
    echo(&mut stream).unwrap();
    let local = stream.local_addr().unwrap();
    thread::sleep(Duration::from_secs(3));

    let socket = client_socket(&daemon, &path, local).expect("tracked");
    let ss = path.client.exec(
        "ss",
        &["-tnoiH", "state", "established", "dport", "= :8007"],
    );
    let ss = String::from_utf8_lossy(&ss.stdout);
    let field = |name: &str| -> f64 {
        let value = ss
            .split_whitespace()
            .find_map(|word| word.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in ss output: {ss}"));
        value.parse::<f64>().unwrap() / 1000.0
    };
    for (ours, theirs) in [
        ("last_send_seconds", "lastsnd"),
        ("last_receive_seconds", "lastrcv"),
        ("last_ack_seconds", "lastack"),
    ] {
        let ours = socket[ours].as_f64().unwrap();
        let theirs = field(theirs);
        assert!((ours - theirs).abs() < 1.0, "{ours} vs ss {theirs}");
        assert!(ours >= 2.5, "idle time {ours} too small");
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn ipv6_loopback_with_a_configured_timeout_is_flagged() {
    let config = TempFile::new(
        "v6.toml",
        "[[path]]\ncidr = \"0.0.0.0/0\"\nidle_timeout = \"none\"\n\
         [[path]]\nname = \"v6-test\"\ncidr = \"::1\"\nports = [8008]\nidle_timeout = 5\n",
    );
    let daemon = start_daemon(&config);
    let host = Netns::new("v6");
    let (client, _server) = host.run(|| {
        let listener = TcpListener::bind("[::1]:8008").unwrap();
        let mut client = TcpStream::connect("[::1]:8008").unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        server.read_exact(&mut [0u8; 1]).unwrap();
        (client, server)
    });
    let local = client.local_addr().unwrap();
    let flagged = wait_for(Duration::from_secs(5), || {
        find_socket(
            &daemon.sockets("?at_risk=true&min_idle=1.5"),
            host.inode(),
            local,
        )
        .cloned()
    })
    .unwrap_or_else(|| panic!("IPv6 socket not flagged; log:\n{}", daemon.log()));
    assert_eq!(flagged["family"], "ipv6");
    assert_eq!(flagged["remote"], "[::1]:8008");
    assert_eq!(flagged["path_rule"], "v6-test");
    // The server side's remote port is not 8008, so the default (none) applies.
    assert_eq!(Some(own_at_risk(&daemon, "no_keepalive")), Some(1.0));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn bad_configs_are_rejected_before_anything_loads() {
    let baseline = kit::settled_idlemon_programs();
    for (name, contents, line, words) in [
        (
            "cidr.toml",
            "[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 60\n\n[[path]]\ncidr = \"10.0.0.300/8\"\nidle_timeout = 60\n",
            6,
            "CIDR",
        ),
        (
            "zero.toml",
            "[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timeout = 0\n",
            3,
            "idle_timeout",
        ),
        (
            "negative.toml",
            "[[path]]\ncidr = \"10.0.0.0/8\"\n\nidle_timeout = -350\n",
            4,
            "idle_timeout",
        ),
        (
            "key.toml",
            "[[path]]\ncidr = \"10.0.0.0/8\"\nidle_timout = 60\n",
            3,
            "idle_timout",
        ),
    ] {
        let file = TempFile::new(name, contents);
        let output = std::process::Command::new(kit::idlemon())
            .args(["--listen", "127.0.0.1:0", "--config", file.path()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        assert!(!output.status.success(), "{name} accepted");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("{}:{line}:", file.path())),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(words), "{name}: {stderr}");
        kit::assert_programs_back_to(baseline, name);
    }
}

/// A connection on loopback inside `netns` that its listener has not
/// accepted: the server's end waits in the accept queue, ESTABLISHED and held
/// by no process. Accept it from the listener returned.
fn pending_connection(netns: &Netns) -> (TcpListener, TcpStream) {
    netns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (listener, client)
    })
}

/// A namespace made while `net.ipv4.tcp_child_ehash_entries` is `entries`
/// (0: it shares the host's table); the sysctl is put back at once.
fn namespace_with_table(tag: &str, entries: u32) -> Netns {
    const CHILD_TABLE: &str = "/proc/sys/net/ipv4/tcp_child_ehash_entries";
    let before = std::fs::read_to_string(CHILD_TABLE).unwrap();
    std::fs::write(CHILD_TABLE, entries.to_string()).unwrap();
    let netns = Netns::new(tag);
    std::fs::write(CHILD_TABLE, before.trim()).unwrap();
    netns
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn namespaces_are_walked_one_by_one_only_for_sockets_no_process_holds() {
    // A periodic scan walks every open file once, for all namespaces; it
    // walks a namespace by iter/tcp (a pass over its whole table, the host's
    // if shared) only where a socket is held by no process: here, the
    // server end of a connection not yet accepted.
    let shared = namespace_with_table("shared-table", 0);
    let own = namespace_with_table("own-table", 1024);
    // What the kernel says of each: negative where the table is the host's.
    let entries = |netns: &Netns| -> i64 {
        let output = netns.exec("cat", &["/proc/sys/net/ipv4/tcp_ehash_entries"]);
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap()
    };
    assert!(entries(&shared) < 0, "{}", entries(&shared));
    assert_eq!(entries(&own), 1024);
    let (shared_listener, _shared_client) = pending_connection(&shared);
    let (own_listener, _own_client) = pending_connection(&own);

    // The daemon's own namespace (where the test's requests to it make
    // connections) has a table of its own too. Only /metrics is read: a
    // /sockets request walks every namespace by iter/tcp.
    let daemon = Daemon::start_in(
        namespace_with_table("daemon-own-table", 1024),
        &["--scan-interval", "0.3"],
    );
    let gauges = || {
        (
            daemon.metric("idlemon_scan_namespace_walks").unwrap(),
            daemon.metric("idlemon_scan_shared_table_walks").unwrap(),
        )
    };
    // The least of a few scans: a request to the daemon caught in its accept
    // queue adds a walk of the daemon's namespace to one scan now and then.
    let settled = || {
        let mut least = gauges();
        for _ in 0..6 {
            thread::sleep(Duration::from_millis(350));
            let now = gauges();
            least = (least.0.min(now.0), least.1.min(now.1));
        }
        least
    };
    let (walks, shared_walks) = settled();
    assert!(
        walks >= 2.0 && shared_walks >= 1.0,
        "{walks} {shared_walks}"
    );

    // Accepted, the shared namespace's sockets are all held: no walk of its own.
    let _shared_server = shared_listener.accept().unwrap();
    assert_eq!(settled(), (walks - 1.0, shared_walks - 1.0));
    // Nor the other's, which never passed over the host's table.
    let _own_server = own_listener.accept().unwrap();
    assert_eq!(settled(), (walks - 2.0, shared_walks - 1.0));
}
