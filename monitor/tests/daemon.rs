//! The daemon as an operator meets it: it starts, serves, counts, refuses bad
//! input in one line, and leaves nothing loaded when it stops.
//! Needs root and a BPF-capable kernel: run with `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

use idlemon_testkit as kit;

use std::{
    net::{TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use kit::{
    Daemon, Netns, assert_programs_back_to, idlemon_programs, metric, settled_idlemon_programs,
    wait_for,
};

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn connections_move_the_kernel_fed_counter() {
    let daemon = Daemon::start(&["--scan-interval", "0.5"]);
    let series = "idlemon_tcp_state_transitions_total{state=\"ESTABLISHED\"}";
    let before = daemon.metric(series).expect("counter exported");

    let traffic = Netns::new("traffic");
    traffic.run(|| {
        let listener = TcpListener::bind("127.0.0.1:7100").unwrap();
        let clients: Vec<TcpStream> = (0..5)
            .map(|_| TcpStream::connect("127.0.0.1:7100").unwrap())
            .collect();
        let servers: Vec<TcpStream> = (0..5).map(|_| listener.accept().unwrap().0).collect();
        drop((clients, servers));
    });

    // Five connections: each side of each one becomes ESTABLISHED.
    let after = wait_for(Duration::from_secs(10), || {
        daemon.metric(series).filter(|now| *now >= before + 10.0)
    });
    assert!(after.is_some(), "counter stayed near {before}");
    let (_, body) = daemon.get("/metrics");
    assert_eq!(
        metric(
            &body,
            &format!(
                "idlemon_build_info{{arch=\"{}\",revision=\"{}\",version=\"0.1.0\"}}",
                monitor::build_info::arch(),
                monitor::build_info::REVISION,
            )
        ),
        Some(1.0)
    );
    assert_eq!(daemon.get("/healthz").0, 200);
    assert_eq!(daemon.get("/readyz").0, 200);
    assert_eq!(daemon.get("/nope").0, 404);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn sigterm_and_sigint_detach_everything() {
    let baseline = settled_idlemon_programs();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let daemon = Daemon::start(&[]);
        assert!(idlemon_programs() > baseline, "no idlemon program loaded");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(daemon.pid() as i32, signal) };
        let status = daemon.stop();
        assert!(
            status.success(),
            "exit status {status} after signal {signal}"
        );
        assert_programs_back_to(baseline, &format!("after signal {signal}"));
    }
}

/// Runs idlemon expecting failure; returns its stderr.
fn fails(command: &mut Command) -> String {
    let output = command.output().expect("idlemon runs");
    assert!(
        !output.status.success(),
        "expected failure, got {}",
        output.status
    );
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("idlemon: error: "), "{stderr}");
    stderr
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run `cargo xtask test`"]
fn bad_input_is_one_line_and_leaves_nothing_attached() {
    let baseline = settled_idlemon_programs();

    let message = fails(Command::new(kit::idlemon()).arg("--no-such-flag"));
    assert!(message.contains("--no-such-flag"), "{message}");

    let message = fails(Command::new(kit::idlemon()).args(["--listen", "localhost:notaport"]));
    assert!(message.contains("--listen"), "{message}");

    let taken = Netns::new("taken");
    let _occupant = taken.run(|| TcpListener::bind("127.0.0.1:9781").unwrap());
    let message = fails(&mut taken.command(&kit::idlemon()));
    assert!(
        message.contains("cannot listen on 127.0.0.1:9781"),
        "{message}"
    );

    let message = fails(Command::new("capsh").args([
        "--drop=cap_bpf,cap_perfmon,cap_sys_admin",
        "--",
        "-c",
        &format!("exec {} --listen 127.0.0.1:0", kit::idlemon()),
    ]));
    assert!(message.contains("CAP_BPF"), "{message}");

    let message = fails(Command::new(kit::idlemon()).arg("--idle-threshold=-5"));
    assert!(message.contains("--idle-threshold"), "{message}");

    assert_programs_back_to(baseline, "after failed starts");
}
