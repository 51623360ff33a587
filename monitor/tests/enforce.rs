//! Keepalive enforcement through a NAT gateway that forgets idle flows: a
//! client without keepalive, idle three times the NAT's timeout, is reset
//! unless idlemon enforces keepalive on its cgroup; an application's own
//! faster keepalive and loopback connections are left alone; dry-run
//! changes nothing; the audit events and counters match the decisions.
//!
//! Each client is a process of its own (this test binary, run again as
//! `zz_client_process`), put into a test cgroup under the cgroup v2 mount
//! before it enters the client namespace and connects: the `sock_ops`
//! program runs for sockets of the cgroups it is attached to, and a
//! socket belongs to the cgroup of the process that created it.
//! Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use idlemon_testkit as kit;

use std::{
    ffi::CString,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    process::Stdio,
    sync::mpsc,
    thread,
    time::Duration,
};

use kit::fake_api::{self, FakeApi, Reply};
use kit::{
    Daemon, Keepalive, NAT_SERVER_SIDE_IP, NatPath, Netns, SERVER_IP, TempFile, cgroup::Cgroup,
    echo, wait_for,
};
use serde_json::Value;

const NAT_TIMEOUT: u32 = 4;
/// A NAT timeout for tests where idlemon fixes a connection some time after
/// it connected (a walk): long enough that the fix surely comes first.
const LONG_TIMEOUT: u32 = 8;
/// Three times the NAT's timeout.
const IDLE_SECONDS: u64 = 12;
const CLIENT_ENV: &str = "IDLEMON_ENFORCE_CLIENT";

/// `/idlemon-test-<pid>-<tag>`: a cgroup of this test, removed on drop
/// (its processes have exited by then), as are the others below.
fn test_cgroup(tag: &str) -> Cgroup {
    Cgroup::create(&format!("/idlemon-test-{}-{tag}", std::process::id())).unwrap()
}

/// A systemd system unit's cgroup, `/system.slice/UNIT.service`, as
/// systemd makes it (the slice is made when the host has none).
fn unit_cgroup(tag: &str) -> (Cgroup, String) {
    let unit = format!("idlemon-test-{}-{tag}.service", std::process::id());
    let cgroup = Cgroup::create(&format!("/system.slice/{unit}")).unwrap();
    (cgroup, unit)
}

/// A pod's cgroup as kubelet's systemd driver makes it
/// (`kubepods-besteffort-pod<uid with _>.slice`), inside a slice of this
/// test.
fn pod_cgroup(uid: &str) -> Cgroup {
    Cgroup::create(&format!(
        "/idlemon-test-{}-pods.slice/kubepods-besteffort-pod{}.slice",
        std::process::id(),
        uid.replace('-', "_")
    ))
    .unwrap()
}

/// Paths: the test NAT's server port has a 4 s timeout; everything else has
/// none. The port in the rule also checks the kernel's port decoding: on a
/// mismatch the catch-all rule would apply and nothing be enforced.
fn config(cgroup: &Cgroup, port: u16, mode: &str) -> TempFile {
    TempFile::new(
        "enforce.toml",
        &format!(
            "[[path]]\ncidr = \"0.0.0.0/0\"\nidle_timeout = \"none\"\n\
             [[path]]\nname = \"test-nat\"\ncidr = \"{SERVER_IP}/32\"\nports = [{port}]\nidle_timeout = {NAT_TIMEOUT}\n\
             [enforce]\nmode = \"{mode}\"\ncgroups = [\"{}\"]\nidle_percent = 50\ninterval = 1\ncount = 3\n",
            cgroup.name
        ),
    )
}

/// What a client process reported.
#[derive(Debug)]
struct Client {
    pid: u32,
    local: String,
    /// SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT once connected.
    keepalive: [i32; 4],
    /// The same at the end, after the idle period.
    keepalive_at_end: [i32; 4],
    /// `ok`, or the error of the request after the idle period.
    result: String,
}

/// What a client does.
#[derive(Clone, Copy)]
enum Plan {
    /// Connects to the echo server (setting its own keepalive before
    /// connect, when given: SO_KEEPALIVE with TCP_KEEPIDLE and
    /// TCP_KEEPINTVL of this many seconds, or with -1 SO_KEEPALIVE alone,
    /// which leaves the namespace's 7200 s), idles, then sends again.
    Idle {
        port: u16,
        own_keepalive: Option<i32>,
        /// Connect through an IPv4-mapped IPv6 address (a dual-stack socket).
        mapped: bool,
    },
    /// Connects to a listener of its own on this loopback address and port 0.
    Loopback(&'static str),
    /// Listens on SERVER_IP:port and reports the one connection it accepts.
    Serve { port: u16 },
    /// As `Idle` without keepalive, idle this many seconds.
    IdleFor { port: u16, seconds: u64 },
    /// As `IdleFor`, turning SO_KEEPALIVE off right after connect (after
    /// idlemon turned it on), as an application that manages its own
    /// keepalive may.
    Weaken { port: u16, seconds: u64 },
}

/// Runs a client process in `netns`, moved into `cgroup` first (when given).
fn run_client(netns: &Netns, cgroup: Option<&Cgroup>, plan: Plan) -> mpsc::Receiver<Client> {
    let spec = match plan {
        Plan::Idle {
            port,
            own_keepalive,
            mapped,
        } => {
            let server = if mapped {
                format!("[::ffff:{SERVER_IP}]")
            } else {
                SERVER_IP.to_owned()
            };
            format!(
                "{server}:{port} {} {IDLE_SECONDS}",
                own_keepalive.unwrap_or(0)
            )
        }
        Plan::Loopback(address) => format!("loopback:{address}"),
        Plan::Serve { port } => format!("serve {SERVER_IP}:{port}"),
        Plan::IdleFor { port, seconds } => format!("{SERVER_IP}:{port} 0 {seconds}"),
        Plan::Weaken { port, seconds } => format!("{SERVER_IP}:{port} 0 {seconds} weaken"),
    };
    let mut command = netns.command(std::env::current_exe().unwrap().to_str().unwrap());
    command
        .args([
            "--exact",
            "zz_client_process",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CLIENT_ENV, spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(cgroup) = cgroup {
        let procs = CString::new(cgroup.path.join("cgroup.procs").to_str().unwrap()).unwrap();
        // SAFETY: open, write and close are async-signal-safe; "0" moves the
        // writing process, the child, before it connects.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }
    let child = command.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find_map(|line| line.strip_prefix("CLIENT "))
            .unwrap_or_else(|| panic!("client said nothing: {stdout}"));
        let fields: Vec<&str> = line.split(' ').collect();
        let numbers = |field: &str| -> [i32; 4] {
            let numbers: Vec<i32> = field.split(',').map(|n| n.parse().unwrap()).collect();
            numbers.try_into().unwrap()
        };
        let _ = tx.send(Client {
            pid,
            local: fields[0].to_owned(),
            keepalive: numbers(fields[1]),
            keepalive_at_end: numbers(fields[2]),
            result: fields[3].to_owned(),
        });
    });
    rx
}

fn finished(client: &mpsc::Receiver<Client>) -> Client {
    client
        .recv_timeout(Duration::from_secs(3 * u64::from(LONG_TIMEOUT) + 30))
        .expect("the client process finished")
}

/// The client process: not a test of its own (without the environment
/// variable it returns at once), but the body of the processes above.
#[test]
#[ignore = "the client process of the enforcement tests; does nothing alone"]
fn zz_client_process() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let fields: Vec<&str> = spec.split(' ').collect();
    let (stream, target_idle) = if fields[0] == "serve" {
        let listener = TcpListener::bind(fields[1]).unwrap();
        let (stream, _) = listener.accept().unwrap();
        (stream, None)
    } else if let Some(address) = fields[0].strip_prefix("loopback:") {
        let listener = TcpListener::bind(address).unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // Keep the accepted end open while the options are read.
        std::mem::forget(listener.accept().unwrap());
        (stream, None)
    } else {
        let target: SocketAddr = fields[0].parse().unwrap();
        let own: i32 = fields[1].parse().unwrap();
        let keepalive = match u32::try_from(own) {
            Ok(0) => Keepalive::Off,
            Ok(seconds) => Keepalive::Every(seconds),
            Err(_) => Keepalive::On,
        };
        (
            kit::connect(target, keepalive),
            Some(fields[2].parse::<u64>().unwrap()),
        )
    };
    let keepalive = kit::socket::keepalive_options;
    let at_connect = keepalive(&stream);
    if fields.get(3) == Some(&"weaken") {
        kit::socket::turn_keepalive_off(&stream);
    }
    let mut stream = stream;
    let result = match target_idle {
        None => "ok".to_owned(),
        Some(idle) => {
            echo(&mut stream).unwrap();
            thread::sleep(Duration::from_secs(idle));
            match echo(&mut stream) {
                Ok(()) => "ok".to_owned(),
                Err(error) => format!("{:?}", error.kind()),
            }
        }
    };
    let [a, b, c, d] = at_connect;
    let [e, f, g, h] = keepalive(&stream);
    println!(
        "CLIENT {} {a},{b},{c},{d} {e},{f},{g},{h} {result}",
        stream.local_addr().unwrap()
    );
}

fn enforcement_events(daemon: &Daemon, wanted: usize) -> Vec<Value> {
    events_of(daemon, "keepalive_enforced", wanted)
}

fn event_for<'a>(events: &'a [Value], client: &Client) -> &'a Value {
    events
        .iter()
        .find(|event| {
            // Ports are unique in the client's namespace; the address may be
            // written IPv4 or IPv4-mapped.
            let port = client.local.rsplit(':').next().unwrap();
            event["local"]
                .as_str()
                .is_some_and(|local| local.ends_with(&format!(":{port}")))
        })
        .unwrap_or_else(|| panic!("no event for {client:?}: {events:#?}"))
}

fn decisions(daemon: &Daemon, mode: &str, reason: &str) -> f64 {
    daemon
        .metric(&format!(
            "idlemon_keepalive_enforcements_total{{mode=\"{mode}\",reason=\"{reason}\"}}"
        ))
        .unwrap_or_else(|| panic!("no {mode}/{reason} counter"))
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn enforcement_on_keeps_an_idle_client_alive_through_the_nat() {
    const PORT: u16 = 8301;
    let cgroup = test_cgroup("on");
    let config = config(&cgroup, PORT, "on");
    let daemon = Daemon::with_config(&config, &[]);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(PORT, 5);

    let bare = run_client(
        &path.client,
        Some(&cgroup),
        Plan::Idle {
            port: PORT,
            own_keepalive: None,
            mapped: false,
        },
    );
    let own = run_client(
        &path.client,
        Some(&cgroup),
        Plan::Idle {
            port: PORT,
            own_keepalive: Some(1),
            mapped: false,
        },
    );
    let slow = run_client(
        &path.client,
        Some(&cgroup),
        Plan::Idle {
            port: PORT,
            own_keepalive: Some(-1),
            mapped: false,
        },
    );
    // The same client outside the selected cgroup: what enforcement off means.
    let outside = run_client(
        &path.client,
        None,
        Plan::Idle {
            port: PORT,
            own_keepalive: None,
            mapped: false,
        },
    );
    // A dual-stack socket to the same server, through its IPv4-mapped address.
    let mapped = run_client(
        &path.client,
        Some(&cgroup),
        Plan::Idle {
            port: PORT,
            own_keepalive: None,
            mapped: true,
        },
    );
    let loopback = finished(&run_client(
        &path.client,
        Some(&cgroup),
        Plan::Loopback("127.0.0.1:0"),
    ));
    let loopback6 = finished(&run_client(
        &path.client,
        Some(&cgroup),
        Plan::Loopback("[::1]:0"),
    ));
    let mapped = finished(&mapped);
    assert_eq!(
        mapped.keepalive,
        [1, 2, 1, 3],
        "IPv4-mapped: the IPv4 rule applies"
    );
    assert_eq!(mapped.result, "ok");
    assert_eq!(loopback6.keepalive[0], 0, "IPv6 loopback untouched");
    let (bare, own, slow, outside) = (
        finished(&bare),
        finished(&own),
        finished(&slow),
        finished(&outside),
    );

    assert_eq!(
        bare.keepalive,
        [1, 2, 1, 3],
        "enforced: on, half the 4 s timeout"
    );
    assert_eq!(
        bare.result, "ok",
        "the enforced client survived {IDLE_SECONDS} s idle"
    );
    assert_eq!(
        own.keepalive,
        [1, 1, 1, 9],
        "the application's own keepalive, unchanged"
    );
    assert_eq!(own.result, "ok");
    assert_eq!(
        slow.keepalive,
        [1, 2, 1, 9],
        "keepalive on but 7200 s idle and 75 s apart: both lowered, the count kept"
    );
    assert_eq!(slow.result, "ok");
    assert_eq!(outside.keepalive[0], 0);
    assert_eq!(
        outside.result, "ConnectionReset",
        "the NAT forgot the unenforced flow"
    );
    assert_eq!(loopback.keepalive[0], 0, "loopback untouched");

    let events = enforcement_events(&daemon, 4);
    assert_eq!(
        events.len(),
        4,
        "one event per decision on the NAT path: {events:#?}"
    );
    let fixed = event_for(&events, &bare);
    let enforcement = &fixed["enforcement"];
    assert_eq!(enforcement["mode"], "on");
    assert_eq!(enforcement["reason"], "no_keepalive");
    assert_eq!(enforcement["applied"], true);
    assert_eq!(enforcement["direction"], "outbound");
    assert_eq!(enforcement["path_idle_timeout_seconds"], NAT_TIMEOUT);
    assert_eq!(enforcement["old"]["enabled"], false);
    assert_eq!(enforcement["new"]["enabled"], true);
    assert_eq!(enforcement["new"]["idle_seconds"], 2.0);
    assert_eq!(enforcement["new"]["interval_seconds"], 1.0);
    assert_eq!(enforcement["new"]["count"], 3);
    assert_eq!(fixed["remote"], format!("{SERVER_IP}:{PORT}"));
    assert_eq!(
        fixed["pid"], bare.pid,
        "the workload: the connecting process"
    );
    assert_eq!(fixed["cgroup_path"], cgroup.name.as_str());
    let kept = &event_for(&events, &own)["enforcement"];
    assert_eq!(kept["reason"], "keepalive_sufficient");
    assert_eq!(kept["applied"], false);
    assert_eq!(kept["old"]["idle_seconds"], 1.0);
    assert_eq!(kept["old"], kept["new"]);
    let lowered = &event_for(&events, &slow)["enforcement"];
    assert_eq!(lowered["reason"], "keepalive_too_slow");
    assert_eq!(lowered["old"]["idle_seconds"], 7200.0);
    assert_eq!(lowered["new"]["idle_seconds"], 2.0);
    assert_eq!(lowered["old"]["interval_seconds"], 75.0);
    assert_eq!(lowered["new"]["interval_seconds"], 1.0);
    assert_eq!(lowered["new"]["count"], 9);

    assert_eq!(
        event_for(&events, &mapped)["enforcement"]["reason"],
        "no_keepalive"
    );
    assert_eq!(decisions(&daemon, "on", "no_keepalive"), 2.0);
    assert_eq!(decisions(&daemon, "on", "keepalive_sufficient"), 1.0);
    assert_eq!(decisions(&daemon, "on", "loopback"), 2.0);
    assert_eq!(decisions(&daemon, "on", "keepalive_too_slow"), 1.0);
    for reason in ["no_timeout", "failed", "unreadable"] {
        assert_eq!(decisions(&daemon, "on", reason), 0.0, "{reason}");
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn dry_run_decides_and_reports_but_changes_nothing() {
    const PORT: u16 = 8302;
    let cgroup = test_cgroup("dry-run");
    let config = config(&cgroup, PORT, "dry-run");
    let daemon = Daemon::with_config(&config, &[]);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(PORT, 1);

    let client = finished(&run_client(
        &path.client,
        Some(&cgroup),
        Plan::Idle {
            port: PORT,
            own_keepalive: None,
            mapped: false,
        },
    ));
    assert_eq!(client.keepalive[0], 0, "dry-run set nothing");
    assert_eq!(client.result, "ConnectionReset");

    let events = enforcement_events(&daemon, 1);
    let enforcement = &event_for(&events, &client)["enforcement"];
    assert_eq!(enforcement["mode"], "dry_run");
    assert_eq!(enforcement["reason"], "no_keepalive");
    assert_eq!(enforcement["applied"], false);
    assert_eq!(
        enforcement["new"]["idle_seconds"], 2.0,
        "what `on` would set"
    );
    assert_eq!(decisions(&daemon, "dry_run", "no_keepalive"), 1.0);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn enforcement_that_cannot_attach_is_degraded_not_fatal() {
    let cgroup = test_cgroup("degraded");
    let config = config(&cgroup, 8303, "on");
    let daemon =
        Daemon::start_unready(&["--config", config.path(), "--disable-attach", "sock_ops"]);
    let (status, body) = daemon.get("/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("enforce hook missing"), "{body}");
    assert_eq!(
        daemon.metric("idlemon_degraded{hook=\"enforce\"}"),
        Some(1.0)
    );
    assert_eq!(
        daemon.metric("idlemon_probe_info{hook=\"enforce\",kind=\"none\"}"),
        Some(1.0)
    );
    assert!(daemon.log().contains("keepalive enforcement cannot attach"));
    let (status, _) = daemon.get("/healthz");
    assert_eq!(status, 200, "running on");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_config_whose_first_probe_would_miss_the_timeout_is_refused() {
    let config = TempFile::new(
        "enforce-refused.toml",
        "[[path]]\nname = \"tiny\"\ncidr = \"10.0.0.0/8\"\nidle_timeout = 1\n[enforce]\nmode = \"on\"\ninterval = 1\n",
    );
    let netns = Netns::new("refused");
    let output = netns
        .command(&kit::idlemon())
        .args(["--config", config.path()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"tiny\"") && stderr.contains("well before the timeout"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn accepted_connections_are_enforced_when_configured() {
    const PORT: u16 = 8304;
    let cgroup = test_cgroup("accepted");
    // The server sees its clients at the NAT's server-side address.
    let config = TempFile::new(
        "enforce-accepted.toml",
        &format!(
            "[[path]]\ncidr = \"0.0.0.0/0\"\nidle_timeout = \"none\"\n\
             [[path]]\ncidr = \"{NAT_SERVER_SIDE_IP}/32\"\nidle_timeout = {NAT_TIMEOUT}\n\
             [enforce]\nmode = \"on\"\ncgroups = [\"{}\"]\nidle_percent = 50\ninterval = 1\ncount = 3\naccepted = true\n",
            cgroup.name
        ),
    );
    let daemon = Daemon::with_config(&config, &[]);
    let path = NatPath::new(NAT_TIMEOUT);
    let server = run_client(&path.server, Some(&cgroup), Plan::Serve { port: PORT });
    // Refused until the server process listens: bounded retries.
    let target: SocketAddr = format!("{SERVER_IP}:{PORT}").parse().unwrap();
    let client = wait_for(Duration::from_secs(10), || {
        path.client
            .run(|| TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok())
    })
    .expect("the server process listens");
    let server = finished(&server);
    drop(client);
    assert_eq!(
        server.keepalive,
        [1, 2, 1, 3],
        "the accepted socket enforced"
    );
    let events = enforcement_events(&daemon, 1);
    let enforcement = &event_for(&events, &server)["enforcement"];
    assert_eq!(enforcement["direction"], "accepted");
    assert_eq!(enforcement["reason"], "no_keepalive");
    assert_eq!(decisions(&daemon, "on", "no_keepalive"), 1.0);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn stopping_idlemon_leaves_fixed_sockets_as_they_are() {
    const PORT: u16 = 8305;
    let cgroup = test_cgroup("stop");
    let config = config(&cgroup, PORT, "on");
    let daemon = Daemon::with_config(&config, &[]);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(PORT, 1);
    let client = run_client(
        &path.client,
        Some(&cgroup),
        Plan::Idle {
            port: PORT,
            own_keepalive: None,
            mapped: false,
        },
    );
    // Enforced, then idlemon stops while the client idles.
    enforcement_events(&daemon, 1);
    assert!(daemon.stop().success());
    let client = finished(&client);
    assert_eq!(client.keepalive, [1, 2, 1, 3]);
    assert_eq!(
        client.keepalive_at_end,
        [1, 2, 1, 3],
        "the settings outlive idlemon"
    );
    assert_eq!(client.result, "ok", "kept alive after idlemon stopped");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_connection_opened_before_idlemon_started_is_enforced_at_start() {
    const PORT: u16 = 8306;
    // A longer timeout, so that idlemon surely starts before the NAT forgets.
    const TIMEOUT: u32 = 8;
    let cgroup = test_cgroup("existing");
    let config = TempFile::new(
        "enforce-existing.toml",
        &format!(
            "[[path]]\ncidr = \"0.0.0.0/0\"\nidle_timeout = \"none\"\n\
             [[path]]\ncidr = \"{SERVER_IP}/32\"\nidle_timeout = {TIMEOUT}\n\
             [enforce]\nmode = \"on\"\ncgroups = [\"{}\"]\nidle_percent = 50\ninterval = 1\ncount = 3\n",
            cgroup.name
        ),
    );
    let path = NatPath::new(TIMEOUT);
    path.echo_server(PORT, 1);
    let client = run_client(
        &path.client,
        Some(&cgroup),
        Plan::IdleFor {
            port: PORT,
            seconds: u64::from(3 * TIMEOUT),
        },
    );
    // The client connects at once; idlemon starts afterwards.
    let connected = wait_for(Duration::from_secs(5), || {
        let output = path.client.exec("ss", &["-tnH", "state", "established"]);
        String::from_utf8_lossy(&output.stdout)
            .contains(&format!("{SERVER_IP}:{PORT}"))
            .then_some(())
    });
    assert!(connected.is_some(), "the client connected");
    let daemon = Daemon::with_config(&config, &[]);
    let client = finished(&client);
    assert_eq!(client.keepalive[0], 0, "no keepalive when it connected");
    assert_eq!(
        client.keepalive_at_end,
        [1, 4, 1, 3],
        "enforced by the walk at start"
    );
    assert_eq!(client.result, "ok", "survived {} s idle", 3 * TIMEOUT);
    let events = enforcement_events(&daemon, 1);
    let enforcement = &event_for(&events, &client)["enforcement"];
    assert_eq!(enforcement["direction"], "existing");
    assert_eq!(enforcement["reason"], "no_keepalive");
    assert_eq!(enforcement["applied"], true);
    assert_eq!(
        daemon.metric("idlemon_probe_info{hook=\"enforce_existing\",kind=\"iter\"}"),
        Some(1.0)
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn a_systemd_unit_is_selected_by_its_name() {
    const PORT: u16 = 8307;
    let (cgroup, unit) = unit_cgroup("unit");
    // Selected by `units` alone (its name without .service): no cgroups.
    let config = TempFile::new(
        "enforce-unit.toml",
        &format!(
            "[[path]]\ncidr = \"0.0.0.0/0\"\nidle_timeout = \"none\"\n\
             [[path]]\ncidr = \"{SERVER_IP}/32\"\nidle_timeout = {NAT_TIMEOUT}\n\
             [enforce]\nmode = \"on\"\nunits = [\"{}\"]\nidle_percent = 50\ninterval = 1\ncount = 3\n",
            unit.trim_end_matches(".service")
        ),
    );
    let daemon = Daemon::with_config(&config, &[]);
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(PORT, 2);
    let inside = run_client(
        &path.client,
        Some(&cgroup),
        Plan::Idle {
            port: PORT,
            own_keepalive: None,
            mapped: false,
        },
    );
    let outside = run_client(
        &path.client,
        None,
        Plan::Idle {
            port: PORT,
            own_keepalive: None,
            mapped: false,
        },
    );
    let (inside, outside) = (finished(&inside), finished(&outside));
    assert_eq!(
        inside.keepalive_at_end,
        [1, 2, 1, 3],
        "the unit's client enforced"
    );
    assert_eq!(inside.result, "ok", "the unit's client survived");
    assert_eq!(outside.keepalive_at_end[0], 0, "outside the unit untouched");
    assert_ne!(outside.result, "ok", "outside the unit reset");
    drop(daemon);
}

/// `[[path]]` rules with a `timeout` s NAT on the test server, and an
/// `[enforce]` table turned on with `selectors` (and any other keys).
fn selecting(name: &str, timeout: u32, selectors: &str) -> TempFile {
    TempFile::new(name, &selecting_text(timeout, selectors))
}

fn selecting_text(timeout: u32, selectors: &str) -> String {
    format!(
        "[[path]]\ncidr = \"0.0.0.0/0\"\nidle_timeout = \"none\"\n\
         [[path]]\ncidr = \"{SERVER_IP}/32\"\nidle_timeout = {timeout}\n\
         [enforce]\nmode = \"on\"\nidle_percent = 50\ninterval = 1\ncount = 3\n{selectors}\n"
    )
}

/// The events of `kind`, once there are `wanted` of them. Pages through
/// /events (an answer stops at 4 MiB): the daemon sees the whole host's
/// connections, and other tests on it may add thousands of events.
fn events_of(daemon: &Daemon, kind: &str, wanted: usize) -> Vec<Value> {
    let found = wait_for(Duration::from_secs(30), || {
        let of_kind: Vec<Value> = daemon
            .events()
            .into_iter()
            .filter(|event| event["kind"] == kind)
            .collect();
        (of_kind.len() >= wanted).then_some(of_kind)
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {wanted} {kind} events (events_total {:?}, lost {:?}, shed {:?}); log:\n{}",
            daemon.metric(&format!("idlemon_events_total{{kind=\"{kind}\"}}")),
            daemon.metric("idlemon_events_lost_total"),
            daemon.metric("idlemon_events_shed_total"),
            daemon.log()
        )
    })
}

/// Waits until enforcement is attached to `count` cgroup directories.
fn wait_for_enforced_cgroups(daemon: &Daemon, count: f64) {
    let attached = wait_for(Duration::from_secs(20), || {
        (daemon.metric("idlemon_keepalive_enforced_cgroups") == Some(count)).then_some(())
    });
    assert!(
        attached.is_some(),
        "not attached to {count} cgroups: {:?}; log:\n{}",
        daemon.metric("idlemon_keepalive_enforced_cgroups"),
        daemon.log()
    );
}

/// Waits until the client namespace has `count` connections to the port.
fn wait_for_connections(path: &NatPath, port: u16, count: usize) {
    let connected = wait_for(Duration::from_secs(10), || {
        let output = path.client.exec("ss", &["-tnH", "state", "established"]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        (text.matches(&format!("{SERVER_IP}:{port}")).count() >= count).then_some(())
    });
    assert!(connected.is_some(), "{count} clients connected");
}

/// A pod UID unique to this test process.
fn pod_uid(n: u32) -> String {
    format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn pods_are_selected_by_namespace_and_label_and_relabelling_fixes_their_connections() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    const PORT: u16 = 8308;
    let (selected, relabelled, elsewhere) = (pod_uid(1), pod_uid(2), pod_uid(3));
    let cgroups = [&selected, &relabelled, &elsewhere].map(|uid| pod_cgroup(uid));
    let config = selecting(
        "enforce-pods.toml",
        LONG_TIMEOUT,
        "namespaces = [\"payments\"]\npod_labels = { app = \"billing\" }",
    );
    // The API server: billing in payments (selected), ledger in payments
    // (relabelled app=billing once `relabel` is set), billing in shop.
    let relabel = Arc::new(AtomicBool::new(false));
    let pods = {
        let relabel = Arc::clone(&relabel);
        let uids = [selected.clone(), relabelled.clone(), elsewhere.clone()];
        move || {
            let app = if relabel.load(Ordering::Relaxed) {
                "billing"
            } else {
                "ledger"
            };
            vec![
                fake_api::labelled_pod(
                    &uids[0],
                    "billing-a",
                    "payments",
                    &[("app", "billing")],
                    "5",
                ),
                fake_api::labelled_pod(&uids[1], "ledger-b", "payments", &[("app", app)], "6"),
                fake_api::labelled_pod(&uids[2], "billing-c", "shop", &[("app", "billing")], "5"),
            ]
        }
    };
    let netns = Netns::new("enforce-pods");
    let relabelled_flag = Arc::clone(&relabel);
    let _api = FakeApi::start(&netns, move |request, _| {
        let pods = pods();
        if request.watch {
            let events = if relabelled_flag.load(Ordering::Relaxed) {
                vec![fake_api::event("MODIFIED", &pods[1])]
            } else {
                Vec::new()
            };
            Reply::Watch(events, Duration::from_secs(1))
        } else {
            fake_api::list("5", &pods)
        }
    });
    let daemon = Daemon::start_in(
        netns,
        &Daemon::quick_args(
            &config,
            &["--node-name", fake_api::NODE, "--kube-api", fake_api::URL],
        ),
    );
    // The selected pod's cgroup only.
    wait_for_enforced_cgroups(&daemon, 1.0);
    assert!(
        daemon.log().contains(&selected.replace('-', "_")),
        "attached to the selected pod: {}",
        daemon.log()
    );

    let path = NatPath::new(LONG_TIMEOUT);
    path.echo_server(PORT, 3);
    let idle = Plan::IdleFor {
        port: PORT,
        seconds: u64::from(3 * LONG_TIMEOUT),
    };
    let [selected_cgroup, relabelled_cgroup, elsewhere_cgroup] = &cgroups;
    let selected_client = run_client(&path.client, Some(selected_cgroup), idle);
    let relabelled_client = run_client(&path.client, Some(relabelled_cgroup), idle);
    let elsewhere_client = run_client(&path.client, Some(elsewhere_cgroup), idle);
    wait_for_connections(&path, PORT, 3);
    // Relabelled while its connection idles: the walk fixes it.
    relabel.store(true, Ordering::Relaxed);
    wait_for_enforced_cgroups(&daemon, 2.0);
    // Read now: other tests on this host may flood the event history later.
    let events = wait_for(Duration::from_secs(30), || {
        let events = events_of(&daemon, "keepalive_enforced", 1);
        events
            .iter()
            .any(|event| event["enforcement"]["direction"] == "existing")
            .then_some(events)
    })
    .expect("the walk's event for the relabelled pod's connection");

    let selected_client = finished(&selected_client);
    let relabelled_client = finished(&relabelled_client);
    let elsewhere_client = finished(&elsewhere_client);
    assert_eq!(
        selected_client.keepalive,
        [1, 4, 1, 3],
        "enforced at connect"
    );
    assert_eq!(selected_client.result, "ok");
    assert_eq!(relabelled_client.keepalive[0], 0, "not selected at connect");
    assert_eq!(
        relabelled_client.keepalive_at_end,
        [1, 4, 1, 3],
        "fixed by the walk once relabelled"
    );
    assert_eq!(relabelled_client.result, "ok", "survived the NAT timeout");
    assert_eq!(elsewhere_client.keepalive_at_end[0], 0, "another namespace");
    assert_ne!(elsewhere_client.result, "ok", "reset by the NAT");

    assert_eq!(
        event_for(&events, &selected_client)["enforcement"]["direction"],
        "outbound"
    );
    let fixed = event_for(&events, &relabelled_client);
    assert_eq!(fixed["enforcement"]["direction"], "existing");
    assert_eq!(fixed["namespace"], "payments");
    assert!(
        !events
            .iter()
            .any(|event| event["local"].as_str().is_some_and(
                |local| local.ends_with(elsewhere_client.local.rsplit(':').next().unwrap())
            )),
        "nothing decided for the unselected pod: {events:#?}"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn pod_selectors_without_a_pod_watch_are_degraded_and_select_nothing() {
    let config = selecting(
        "enforce-nowatch.toml",
        NAT_TIMEOUT,
        "pod_labels = { app = \"billing\" }",
    );
    let daemon = Daemon::start_unready(&["--config", config.path()]);
    let (status, body) = daemon.get("/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("enforce_pods hook missing"), "{body}");
    assert_eq!(
        daemon.metric("idlemon_degraded{hook=\"enforce_pods\"}"),
        Some(1.0)
    );
    assert_eq!(
        daemon.metric("idlemon_keepalive_enforced_cgroups"),
        Some(0.0),
        "never every workload"
    );
    assert!(daemon.log().contains("no pod watch"), "{}", daemon.log());
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn sighup_rereads_the_selection_and_fixes_newly_selected_connections() {
    const PORT: u16 = 8309;
    let first = test_cgroup("hup-first");
    let later = test_cgroup("hup-later");
    let config = selecting(
        "enforce-hup.toml",
        LONG_TIMEOUT,
        &format!("cgroups = [\"{}\"]", first.name),
    );
    let daemon = Daemon::with_config(&config, &[]);
    wait_for_enforced_cgroups(&daemon, 1.0);
    let path = NatPath::new(LONG_TIMEOUT);
    path.echo_server(PORT, 1);
    let client = run_client(
        &path.client,
        Some(&later),
        Plan::IdleFor {
            port: PORT,
            seconds: u64::from(3 * LONG_TIMEOUT),
        },
    );
    wait_for_connections(&path, PORT, 1);
    let hangup = || {
        // SAFETY: a signal to the daemon this test started.
        assert_eq!(unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) }, 0);
    };
    // An invalid file changes nothing, and says so.
    std::fs::write(&config.0, "[enforce]\nmode = \"maybe\"\n").unwrap();
    hangup();
    let refused = wait_for(Duration::from_secs(10), || {
        (daemon.metric("idlemon_config_reloads_total{result=\"invalid\"}") == Some(1.0))
            .then_some(())
    });
    assert!(refused.is_some(), "{}", daemon.log());
    assert!(daemon.log().contains("the running config stays"));
    assert_eq!(
        daemon.metric("idlemon_keepalive_enforced_cgroups"),
        Some(1.0)
    );
    // Then both cgroups: the client's existing connection is fixed.
    std::fs::write(
        &config.0,
        selecting_text(
            LONG_TIMEOUT,
            &format!("cgroups = [\"{}\", \"{}\"]", first.name, later.name),
        ),
    )
    .unwrap();
    hangup();
    wait_for_enforced_cgroups(&daemon, 2.0);
    assert_eq!(
        daemon.metric("idlemon_config_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    // Read now: other tests on this host may flood the event history later.
    let events = events_of(&daemon, "keepalive_enforced", 1);
    let client = finished(&client);
    assert_eq!(client.keepalive[0], 0, "not selected when it connected");
    assert_eq!(client.keepalive_at_end, [1, 4, 1, 3], "fixed after SIGHUP");
    assert_eq!(client.result, "ok", "survived the NAT timeout");
    assert_eq!(
        event_for(&events, &client)["enforcement"]["direction"],
        "existing"
    );
}

/// A client whose keepalive idlemon set turns it off: reported (event,
/// counter, /sockets), and with `override` kept on.
fn weakened(override_weakening: bool, port: u16) -> (Client, Value, Daemon) {
    let cgroup = test_cgroup(if override_weakening {
        "override"
    } else {
        "weakened"
    });
    let config = selecting(
        "enforce-weakened.toml",
        NAT_TIMEOUT,
        &format!(
            "cgroups = [\"{}\"]\noverride = {override_weakening}",
            cgroup.name
        ),
    );
    let daemon = Daemon::with_config(&config, &[]);
    assert_eq!(
        daemon.metric("idlemon_probe_info{hook=\"enforce_setsockopt\",kind=\"cgroup_sockopt\"}"),
        Some(1.0),
        "{}",
        daemon.log()
    );
    let path = NatPath::new(NAT_TIMEOUT);
    path.echo_server(port, 1);
    let client = run_client(
        &path.client,
        Some(&cgroup),
        Plan::Weaken {
            port,
            seconds: IDLE_SECONDS,
        },
    );
    let event = events_of(&daemon, "keepalive_weakened", 1).remove(0);
    // Shown on the socket while it idles.
    let local = event["local"].as_str().unwrap().to_owned();
    let shown = wait_for(Duration::from_secs(10), || {
        daemon
            .sockets("")
            .into_iter()
            .find(|socket| socket["local"] == local.as_str())
            .filter(|socket| !socket["keepalive_weakened"].is_null())
    });
    let shown = shown.unwrap_or_else(|| panic!("{local} not shown weakened in /sockets"));
    assert_eq!(shown["keepalive_weakened"], event["weakening"]);
    let client = finished(&client);
    (client, event, daemon)
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn an_application_turning_enforced_keepalive_off_is_reported() {
    let (client, event, daemon) = weakened(false, 8310);
    assert_eq!(client.keepalive, [1, 2, 1, 3], "enforced at connect");
    assert_eq!(
        client.keepalive_at_end[0], 0,
        "the application's choice applies"
    );
    assert_ne!(client.result, "ok", "reset by the NAT without keepalive");
    let weakening = &event["weakening"];
    assert_eq!(weakening["mode"], "report");
    assert_eq!(weakening["change"], "keepalive_off");
    assert_eq!(weakening["old"]["enabled"], true);
    assert_eq!(weakening["old"]["idle_seconds"], 2.0);
    assert_eq!(weakening["new"]["enabled"], false);
    assert_eq!(event["pid"], client.pid);
    assert_eq!(
        daemon.metric("idlemon_keepalive_weakened_total{mode=\"report\"}"),
        Some(1.0)
    );
    assert_eq!(
        daemon.metric("idlemon_keepalive_weakened_total{mode=\"override\"}"),
        Some(0.0)
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn with_override_enforced_keepalive_stays_on_and_survives_the_nat() {
    let (client, event, daemon) = weakened(true, 8311);
    assert_eq!(client.keepalive, [1, 2, 1, 3]);
    assert_eq!(
        client.keepalive_at_end,
        [1, 2, 1, 3],
        "SO_KEEPALIVE 0 rewritten to 1"
    );
    assert_eq!(client.result, "ok", "survived {IDLE_SECONDS} s idle");
    assert_eq!(event["weakening"]["mode"], "override");
    assert_eq!(
        daemon.metric("idlemon_keepalive_weakened_total{mode=\"override\"}"),
        Some(1.0)
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn enforcement_without_cgroup_setsockopt_runs_on_and_says_so() {
    let cgroup = test_cgroup("nosockopt");
    let config = config(&cgroup, 8312, "on");
    let daemon = Daemon::start(&[
        "--config",
        config.path(),
        "--disable-attach",
        "cgroup_sockopt",
    ]);
    assert_eq!(
        daemon.metric("idlemon_probe_info{hook=\"enforce_setsockopt\",kind=\"none\"}"),
        Some(1.0)
    );
    assert_eq!(
        daemon.metric("idlemon_probe_info{hook=\"enforce\",kind=\"sock_ops\"}"),
        Some(1.0)
    );
    let (status, body) = daemon.get("/readyz");
    assert_eq!(status, 200, "ready: enforcement itself runs");
    assert!(body.contains("enforce_setsockopt"), "{body}");
    assert!(daemon.log().contains("is not seen"), "{}", daemon.log());
}
