//! Part 6: a node of many pods. The idle part's 10,000 idle sockets, spread
//! over 30 network namespaces as pods spread them, and idlemon's CPU at its
//! default scan interval, side by side in ABBA order: A walks each namespace
//! by iter/tcp (`--socket-walk namespaces`), which passes over the host's
//! whole TCP table once per namespace; B is the default, which walks every
//! open file once for all of them.

use std::time::Duration;

use super::{
    Bench,
    daemon::Daemon,
    idle, netns,
    table::{Check, Summary, Table},
    traffic,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn flag(self) -> &'static str {
        match self {
            Side::A => "namespaces",
            Side::B => "auto",
        }
    }
}

/// One side's window.
struct Window {
    side: Side,
    cpu_percent: f64,
    scans: f64,
    last_scan_ms: f64,
    namespace_walks: f64,
}

pub fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let pods = bench.settings.pods;
    let connections = bench.settings.idle_connections;
    let per_pod = connections.div_ceil(pods);
    let sockets = 2 * per_pod * pods;
    let window = bench.settings.idle_seconds;
    println!(
        "{sockets} idle loopback sockets over {pods} network namespaces ({per_pod} connections each); idlemon at its default 5 s scan interval, A = --socket-walk namespaces (iter/tcp per namespace), B = default (every open file once); daemon CPU over {} s per window, ABBA",
        window.as_secs()
    );
    let mut namespaces = Vec::with_capacity(pods);
    for pod in 0..pods {
        let netns = netns::create(&format!("pod{pod}"));
        let pool = traffic::open_pool(&netns, per_pod, Duration::from_secs(60))?;
        namespaces.push((netns, pool));
    }
    let mut windows = Vec::new();
    for side in [Side::A, Side::B, Side::B, Side::A] {
        windows.push(measure(bench, side, sockets, window)?);
    }
    drop(namespaces);

    let mut table = Table::new(&[
        "side",
        "daemon CPU, % of a core",
        "walks",
        "last walk CPU",
        "iter/tcp walks per scan",
    ]);
    for w in &windows {
        table.row([
            format!("{:?} (--socket-walk {})", w.side, w.side.flag()),
            format!("{:.3}%", w.cpu_percent),
            format!("{:.0}", w.scans),
            format!("{:.2} ms", w.last_scan_ms),
            format!("{:.0}", w.namespace_walks),
        ]);
    }
    print!("{}", table.render());
    let cpu = |side: Side| {
        Summary::of(
            &windows
                .iter()
                .filter(|w| w.side == side)
                .map(|w| w.cpu_percent)
                .collect::<Vec<_>>(),
        )
    };
    let (a, b) = (cpu(Side::A), cpu(Side::B));
    if let (Some(a), Some(b)) = (a, b) {
        println!(
            "  B/A daemon CPU: {:.2} (medians {:.3}% and {:.3}%)",
            b.median / a.median,
            b.median,
            a.median
        );
        bench.check(Check::new(
            &format!("idle daemon CPU ({sockets} sockets over {pods} pod namespaces)"),
            format!("{:.3}% of a core", b.median),
            &format!("< {}%", idle::CPU_TARGET_PERCENT),
            Some(b.median < idle::CPU_TARGET_PERCENT),
        ));
        bench.check(Check::info(
            &format!("the same with --socket-walk namespaces ({pods} pod namespaces)"),
            format!(
                "{:.3}% of a core (B/A {:.2})",
                a.median,
                b.median / a.median
            ),
        ));
    }
    Ok(())
}

/// One window: a daemon started for it, its CPU over `window` once every
/// socket is tracked.
fn measure(bench: &Bench, side: Side, sockets: usize, window: Duration) -> anyhow::Result<Window> {
    let mut daemon = Daemon::start(
        &bench.binary,
        &["--socket-walk".to_owned(), side.flag().to_owned()],
    )?;
    let idle::Window {
        cpu,
        elapsed,
        scans,
        metrics,
    } = idle::measure(&mut daemon, sockets, window)?;
    daemon.stop()?;
    Ok(Window {
        side,
        cpu_percent: 100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64(),
        scans,
        last_scan_ms: metrics
            .value("idlemon_scan_cpu_seconds")
            .unwrap_or(f64::NAN)
            * 1e3,
        namespace_walks: metrics
            .value("idlemon_scan_namespace_walks")
            .unwrap_or(f64::NAN),
    })
}
