//! Part `enforce`: what keepalive enforcement costs a new connection.
//!
//! One idlemon runs with `--enforce-keepalive on` for a cgroup of the
//! bench's own. Windows alternate (ABBA) between the bench process in a
//! sibling cgroup (A: the `sock_ops` program does not run) and inside it (B:
//! it runs for every connection and sets four socket options), while one
//! thread connects to an address of a veth interface in the part's
//! network namespace (not loopback, which the program skips at once: each
//! connection takes the full decision) and closes at once with a RST (no
//! TIME_WAIT to run out of ports), as fast as it can. Connections per
//! second in A and B, B/A per pair, and, from one more B window with the
//! BPF run-time stats on, the program's ns per connection.
//!
//! Then the `cgroup/setsockopt` program (an application's weakening of an
//! enforced keepalive): the same ABBA windows of setsockopt(TCP_KEEPIDLE,
//! 1 s) calls on one connection, which in B is enforced (the program looks
//! it up in its map of enforced sockets, the most it does for a call that
//! weakens nothing), setsockopt calls per second and the program's ns per
//! call. (Every connection above also sets SO_LINGER: in B that runs the
//! program too, which returns after two compares.)

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use idlemon_testkit::cgroup::{self, Cgroup};

use super::{
    Bench,
    daemon::Daemon,
    interrupted,
    kernel::{self, RunTimeStats},
    netns::{self, Netns},
    table::{Check, Summary, Table},
};

/// The veth interface's address: a documentation network (RFC 5737),
/// inside the part's own namespace.
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let netns = netns::create("enforce");
    // A veth pair (the kernel may lack the dummy driver): only the address
    // matters, which the namespace reaches through its local table.
    netns.ip(&[
        "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
    ]);
    netns.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "bench0"]);
    netns.ip(&["link", "set", "bench0", "up"]);
    netns.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    let cgroup = BenchCgroup::create()?;
    let config =
        std::env::temp_dir().join(format!("idlemon-bench-{}-enforce.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[enforce]\nmode = \"on\"\ncgroups = [\"{}\"]\n",
            cgroup.enforced.name
        ),
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    println!(
        "connect+close (RST) to {SERVER} (a veth address, path timeout 350 s) as fast as one thread can, in network namespace {}; idlemon --enforce-keepalive on for cgroup {}; A: the bench in a sibling cgroup, B: inside it",
        netns.name, cgroup.enforced.name
    );
    let mut daemon = Daemon::start(
        &bench.binary,
        &["--config".to_owned(), config.display().to_string()],
    )?;
    daemon.wait_ready(Duration::from_secs(60))?;
    let listener = netns
        .run(|| TcpListener::bind((SERVER, 0)))
        .context("cannot listen on the veth address")?;
    // SAFETY: a valid listening socket; listening again only sets the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listen(4096)");
    }
    let target = listener.local_addr()?;
    let running = AtomicBool::new(true);
    let mut calls = Vec::new();
    let window = bench.settings.window;
    let pairs = bench.settings.pairs;
    let result = thread::scope(|scope| -> anyhow::Result<_> {
        let calls = &mut calls;
        let running = &running;
        let listener = &listener;
        scope.spawn(move || {
            // Blocking accepts, so that the backlog never fills (a SYN
            // dropped there costs the client a 1 s retransmission); the
            // last connection below wakes the final one.
            while running.load(Ordering::Relaxed) {
                let _ = listener.accept();
            }
        });
        let outcome = (|| -> anyhow::Result<_> {
            let mut a = Vec::new();
            let mut b = Vec::new();
            let before = daemon.metrics()?;
            for pair in 0..pairs {
                // ABBA: A B, then B A.
                let order = if pair % 2 == 0 {
                    [false, true]
                } else {
                    [true, false]
                };
                for inside in order {
                    let rate = measure(&netns, &cgroup, inside, target, window)?;
                    if inside { b.push(rate) } else { a.push(rate) }
                }
                if interrupted() {
                    break;
                }
            }
            let after = daemon.metrics()?;
            let objects = kernel::objects_of(daemon.pid())?;
            let stats = RunTimeStats::enable()?;
            let stats_before = kernel::prog_stats(&objects.progs)?;
            let stats_rate = measure(&netns, &cgroup, true, target, window)?;
            let stats_after = kernel::prog_stats(&objects.progs)?;
            drop(stats);
            let stats_metrics = daemon.metrics()?;
            let mut calls_a = Vec::new();
            let mut calls_b = Vec::new();
            for pair in 0..pairs {
                let order = if pair % 2 == 0 {
                    [false, true]
                } else {
                    [true, false]
                };
                for inside in order {
                    let rate = measure_setsockopt(&netns, &cgroup, inside, target, window)?;
                    if inside {
                        calls_b.push(rate);
                    } else {
                        calls_a.push(rate);
                    }
                }
                if interrupted() {
                    break;
                }
            }
            let stats = RunTimeStats::enable()?;
            let calls_stats_before = kernel::prog_stats(&objects.progs)?;
            let calls_stats_rate = measure_setsockopt(&netns, &cgroup, true, target, window)?;
            let calls_stats_after = kernel::prog_stats(&objects.progs)?;
            drop(stats);
            calls.push((
                calls_a,
                calls_b,
                calls_stats_before,
                calls_stats_after,
                calls_stats_rate,
            ));
            Ok((
                a,
                b,
                before,
                after,
                stats_before,
                stats_after,
                stats_rate,
                stats_metrics,
            ))
        })();
        running.store(false, Ordering::Relaxed);
        let _ = netns.run(|| TcpStream::connect(target));
        outcome
    });
    cgroup.leave()?;
    daemon.stop()?;
    let _ = std::fs::remove_file(&config);
    let (a, b, before, after, stats_before, stats_after, stats_rate, stats_metrics) = result?;

    let decided = |metrics: &super::daemon::Metrics| {
        metrics
            .samples("idlemon_keepalive_enforcements_total")
            .into_iter()
            .filter(|(labels, _)| labels.get("reason").map(String::as_str) == Some("no_keepalive"))
            .map(|(_, value)| value)
            .sum::<f64>()
    };
    let enforced = decided(&after) - decided(&before);
    let enforced_with_stats = decided(&stats_metrics) - decided(&after);
    let ratios = print_pairs("connections/s", "B: enforced", &a, &b);
    let program = super::run_deltas(&stats_before, &stats_after)
        .into_iter()
        .find(|(_, _, prog)| prog.name.starts_with("enforce_keepa"));
    // The kernel runs a sock_ops program at several moments of each
    // connection (initial timeouts, connect, established, on both ends
    // here); only the established one decides: the cost of a connection is
    // all of its runs.
    let per_connection = program
        .as_ref()
        .filter(|(runs, _, _)| *runs > 0 && enforced_with_stats > 0.0)
        .map(|(_, time, _)| *time as f64 / enforced_with_stats);
    println!(
        "  {enforced:.0} connections enforced (idlemon_keepalive_enforcements_total{{reason=\"no_keepalive\"}}) in the B windows; with the BPF run-time stats on ({stats_rate:.0} connections/s, {enforced_with_stats:.0} enforced): enforce_keepalive {} runs ({:.0} ns each), {}",
        program.as_ref().map_or(0, |(runs, _, _)| *runs),
        program
            .as_ref()
            .filter(|(runs, _, _)| *runs > 0)
            .map_or(0.0, |(runs, time, _)| *time as f64 / *runs as f64),
        per_connection.map_or("did not run".to_owned(), |ns| format!(
            "{ns:.0} ns of BPF per enforced connection"
        ))
    );
    let median = |values: &[f64]| Summary::of(values).map_or(f64::NAN, |s| s.median);
    bench.check(Check::info(
        "connections/s without / with enforcement",
        format!(
            "{:.0} / {:.0} (B/A {:.3})",
            median(&a),
            median(&b),
            median(&ratios)
        ),
    ));
    bench.check(Check::new(
        "enforce_keepalive ran for every B connection",
        format!("{enforced:.0} decisions"),
        "> 0",
        Some(enforced > 0.0),
    ));
    if let Some(ns) = per_connection {
        bench.check(Check::info(
            "enforce_keepalive BPF time per connection",
            format!("{ns:.0} ns"),
        ));
    }
    if let Some((calls_a, calls_b, stats_before, stats_after, stats_rate)) = calls.pop() {
        let ratios = print_pairs("setsockopt/s", "B: enforced socket", &calls_a, &calls_b);
        let program = super::run_deltas(&stats_before, &stats_after)
            .into_iter()
            .find(|(_, _, prog)| prog.name.starts_with("enforce_setso"));
        let per_call = program
            .as_ref()
            .filter(|(runs, _, _)| *runs > 0)
            .map(|(runs, time, _)| *time as f64 / *runs as f64);
        println!(
            "  with the BPF run-time stats on ({stats_rate:.0} setsockopt/s): enforce_setsockopt {} runs, {}",
            program.as_ref().map_or(0, |(runs, _, _)| *runs),
            per_call.map_or("did not run".to_owned(), |ns| format!("{ns:.0} ns each"))
        );
        bench.check(Check::info(
            "setsockopt/s without / with enforcement (enforced socket)",
            format!(
                "{:.0} / {:.0} (B/A {:.3})",
                median(&calls_a),
                median(&calls_b),
                median(&ratios)
            ),
        ));
        bench.check(Check::new(
            "enforce_setsockopt ran for the B setsockopt calls",
            per_call.map_or("did not run".to_owned(), |ns| {
                format!("{ns:.0} ns per call")
            }),
            "ran",
            Some(per_call.is_some()),
        ));
    }
    Ok(())
}

/// setsockopt(TCP_KEEPIDLE, 1 s) calls per second over `window` on one
/// connection opened from inside the enforced cgroup (B: enforced) or the
/// plain one.
fn measure_setsockopt(
    netns: &Netns,
    cgroup: &BenchCgroup,
    inside: bool,
    target: SocketAddr,
    window: Duration,
) -> anyhow::Result<f64> {
    cgroup.enter(inside)?;
    let (calls, elapsed) = netns.run(|| -> anyhow::Result<_> {
        let stream =
            TcpStream::connect(target).context("cannot connect for the setsockopt windows")?;
        let idle: i32 = 1;
        let start = Instant::now();
        let mut calls = 0u64;
        while start.elapsed() < window && !interrupted() {
            for _ in 0..1000 {
                // SAFETY: a valid socket and option value.
                let rc = unsafe {
                    libc::setsockopt(
                        stream.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_KEEPIDLE,
                        (&raw const idle).cast(),
                        size_of::<i32>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("setsockopt(TCP_KEEPIDLE)");
                }
            }
            calls += 1000;
        }
        Ok((calls, start.elapsed()))
    })?;
    Ok(calls as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// Connections per second over `window`, from the bench process inside the
/// enforced cgroup or the plain one.
fn measure(
    netns: &Netns,
    cgroup: &BenchCgroup,
    inside: bool,
    target: SocketAddr,
    window: Duration,
) -> anyhow::Result<f64> {
    cgroup.enter(inside)?;
    let (opened, elapsed) = netns.run(|| {
        let start = Instant::now();
        let mut opened = 0u64;
        while start.elapsed() < window && !interrupted() {
            let Ok(stream) = TcpStream::connect(target) else {
                continue;
            };
            // SO_LINGER 0: close with a RST, leaving no TIME_WAIT.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and option value.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            opened += 1;
        }
        (opened, start.elapsed())
    });
    Ok(opened as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// Two sibling cgroup v2 directories of the bench, the enforced one and a
/// plain one: the bench process moves between them, so that A and B differ
/// only in the program (a cgroup's depth and accounting change the cost of
/// a connection too: the root cgroup measured 20% slower than a child here).
struct BenchCgroup {
    enforced: Cgroup,
    plain: Cgroup,
    /// The bench's own cgroup, to go back to.
    home: PathBuf,
}

impl BenchCgroup {
    fn create() -> anyhow::Result<Self> {
        let root = cgroup::root().context("keepalive enforcement needs cgroup v2")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let home = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or_else(|| anyhow!("/proc/self/cgroup has no cgroup v2 entry"))?;
        let named = |side: &str| format!("/idlemon-bench-{}-{side}", std::process::id());
        Ok(Self {
            enforced: Cgroup::create(&named("enforce"))?,
            plain: Cgroup::create(&named("plain"))?,
            home: root.join(home.trim_start_matches('/')),
        })
    }

    /// Moves the whole bench process (every thread) into the enforced
    /// cgroup or the plain one.
    fn enter(&self, enforced: bool) -> anyhow::Result<()> {
        let cgroup = if enforced {
            &self.enforced
        } else {
            &self.plain
        };
        cgroup.add(std::process::id())
    }

    fn leave(&self) -> anyhow::Result<()> {
        cgroup::move_into(&self.home, std::process::id())
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // Out of both, so that they can be removed.
        let _ = self.leave();
    }
}

/// Prints the A (not enforced) and B rates of the pairs and their B/A
/// ratios as one table; returns the ratios.
fn print_pairs(unit: &str, b_label: &str, a: &[f64], b: &[f64]) -> Vec<f64> {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| b / a).collect();
    let rate = |v: f64| format!("{v:.0}");
    let mut table = Table::new(&[unit, "n", "min", "median", "max"]);
    table.summary_row("A: not enforced", Summary::of(a), rate, &[]);
    table.summary_row(b_label, Summary::of(b), rate, &[]);
    table.summary_row(
        "B/A per pair",
        Summary::of(&ratios),
        |v| format!("{v:.3}"),
        &[],
    );
    print!("{}", table.render());
    ratios
}
