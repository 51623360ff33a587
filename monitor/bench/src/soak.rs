//! Part 5 (not in the default run: `--only soak`): a long soak of mixed
//! churn, idle connections and resets. Memory must stay flat, and idlemon's
//! counters must agree with what the load generator itself did.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use idlemon_testkit::process;

use super::{
    Bench,
    daemon::{self, Daemon},
    interrupted, netns,
    table::{Check, Summary, Table},
};

/// Connections opened, used and closed normally per second.
const CHURN_PER_SECOND: u64 = 200;
/// Connections reset by the client (SO_LINGER 0) per second: the server end
/// receives the RST on an established socket.
const RESETS_PER_SECOND: u64 = 20;
/// Connections held idle for the whole soak.
const IDLE_CONNECTIONS: usize = 1000;
/// Memory is sampled this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// RSS may grow this much from the first quarter of the soak to the last.
const FLAT_GROWTH: f64 = 0.10;

/// What the generator did, counted by itself.
#[derive(Debug, Default)]
struct Truth {
    churned: u64,
    reset: u64,
}

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let length = bench.settings.soak;
    let netns = netns::create("soak");
    println!(
        "{} s of load in network namespace {}: {CHURN_PER_SECOND} connections/s opened and closed, \
         {RESETS_PER_SECOND}/s reset (SO_LINGER 0), {IDLE_CONNECTIONS} held idle; idlemon with default \
         flags; RSS sampled every {} s",
        length.as_secs(),
        netns.name,
        SAMPLE_EVERY.as_secs()
    );
    let mut daemon = Daemon::start(&bench.binary, &[])?;
    daemon.wait_ready(Duration::from_secs(60))?;
    let before = daemon.metrics()?;
    let counter = |metrics: &daemon::Metrics, name: &str| -> f64 {
        metrics.samples(name).iter().map(|(_, value)| value).sum()
    };
    let established = |metrics: &daemon::Metrics| -> f64 {
        metrics
            .samples("idlemon_tcp_state_transitions_total")
            .iter()
            .filter(|(labels, _)| labels.get("state").map(String::as_str) == Some("ESTABLISHED"))
            .map(|(_, value)| value)
            .sum()
    };

    let pid = daemon.pid();
    let generated = netns.run(|| -> anyhow::Result<(Truth, Vec<(f64, u64)>)> {
        let listener = TcpListener::bind("127.0.0.1:9000").context("soak listener")?;
        let mut idle = Vec::with_capacity(2 * IDLE_CONNECTIONS);
        for _ in 0..IDLE_CONNECTIONS {
            let client = TcpStream::connect("127.0.0.1:9000")?;
            let (server, _) = listener.accept()?;
            idle.push(client);
            idle.push(server);
        }
        let mut truth = Truth::default();
        let mut memory = Vec::new();
        let started = Instant::now();
        let mut next_sample = started;
        let per_tick = Duration::from_millis(10);
        let mut tick = 0u64;
        while started.elapsed() < length && !interrupted() {
            let due = started + per_tick * u32::try_from(tick).unwrap_or(u32::MAX);
            thread::sleep(due.saturating_duration_since(Instant::now()));
            tick += 1;
            // Each tick is 10 ms: 2 churned, and every 5th tick 1 reset, at the rates above.
            for _ in 0..CHURN_PER_SECOND / 100 {
                exchange(&listener, false)?;
                truth.churned += 1;
            }
            if tick.is_multiple_of(100 / RESETS_PER_SECOND) {
                exchange(&listener, true)?;
                truth.reset += 1;
            }
            if Instant::now() >= next_sample {
                let rss = process::memory(pid)?.rss;
                memory.push((started.elapsed().as_secs_f64(), rss));
                next_sample += SAMPLE_EVERY;
            }
        }
        drop(idle);
        Ok((truth, memory))
    })?;
    let (truth, memory) = generated;
    // Two walks and a scrape after the load, so that the counters settle.
    thread::sleep(Duration::from_secs(11));
    let after = daemon.metrics()?;
    daemon.check_alive()?;

    let connections = truth.churned + truth.reset + IDLE_CONNECTIONS as u64;
    let seen_established = established(&after) - established(&before);
    let seen_resets = counter(&after, "idlemon_resets_received_total")
        - counter(&before, "idlemon_resets_received_total");
    let classified_other = after
        .samples("idlemon_resets_received_total")
        .iter()
        .filter(|(labels, _)| labels.get("classification").map(String::as_str) == Some("other"))
        .map(|(_, value)| value)
        .sum::<f64>();
    let lost = counter(&after, "idlemon_events_lost_total")
        - counter(&before, "idlemon_events_lost_total");

    let mut table = Table::new(&["counter", "load generator", "idlemon", "difference"]);
    let mut row = |what: &str, truth: f64, seen: f64| {
        table.row([
            what.to_owned(),
            format!("{truth:.0}"),
            format!("{seen:.0}"),
            format!("{:+.0}", seen - truth),
        ]);
    };
    row(
        "ESTABLISHED transitions (2 per connection)",
        2.0 * connections as f64,
        seen_established,
    );
    row(
        "resets received on established sockets",
        truth.reset as f64,
        seen_resets,
    );
    row("events lost", 0.0, lost);
    println!("{}", table.render());
    println!("  of the resets, classified other (busy connections): {classified_other:.0}");

    let rss_mib: Vec<f64> = memory
        .iter()
        .map(|(_, rss)| *rss as f64 / (1024.0 * 1024.0))
        .collect();
    let quarter = (rss_mib.len() / 4).max(1);
    let first = Summary::of(&rss_mib[..quarter.min(rss_mib.len())]);
    let last = Summary::of(&rss_mib[rss_mib.len().saturating_sub(quarter)..]);
    let all = Summary::of(&rss_mib);
    let mut memory_table = Table::new(&["daemon VmRSS, MiB", "n", "min", "median", "max"]);
    for (what, summary) in [
        ("whole soak", all),
        ("first quarter", first),
        ("last quarter", last),
    ] {
        memory_table.summary_row(what, summary, |value| format!("{value:.1}"), &[]);
    }
    println!("{}", memory_table.render());

    let growth = match (&first, &last) {
        (Some(first), Some(last)) if first.median > 0.0 => last.median / first.median - 1.0,
        _ => 0.0,
    };
    bench.checks.push(Check::new(
        "soak: RSS growth, first to last quarter (median)",
        format!("{:+.1}%", growth * 100.0),
        &format!("< {:.0}%", FLAT_GROWTH * 100.0),
        Some(growth < FLAT_GROWTH),
    ));
    bench.checks.push(Check::new(
        "soak: resets idlemon counted vs the generator",
        format!("{seen_resets:.0} of {}", truth.reset),
        "equal",
        Some(seen_resets as u64 == truth.reset),
    ));
    bench.checks.push(Check::new(
        "soak: ESTABLISHED transitions vs 2 x connections",
        format!("{seen_established:.0} of {}", 2 * connections),
        ">= (host traffic may add)",
        Some(seen_established as u64 >= 2 * connections),
    ));
    daemon.stop()?;
    Ok(())
}

/// One connection through its life: connect, one byte each way, close; with
/// `reset`, the client closes with SO_LINGER 0 and the server end gets a RST.
fn exchange(listener: &TcpListener, reset: bool) -> anyhow::Result<()> {
    let mut client = TcpStream::connect("127.0.0.1:9000").context("soak connect")?;
    let (mut server, _) = listener.accept().context("soak accept")?;
    client.write_all(b"x")?;
    let mut byte = [0u8; 1];
    server.read_exact(&mut byte)?;
    server.write_all(b"y")?;
    client.read_exact(&mut byte)?;
    if reset {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and option value.
        let rc = unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as u32,
            )
        };
        anyhow::ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
        drop(client);
        // Reading shows the RST arrived before the server end closes.
        server.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = server.read(&mut byte);
    }
    Ok(())
}
