//! `cargo xtask bench`: idlemon's overhead and scale, measured side by side.
//!
//! xtask builds the daemon (release) and this binary, then runs it with the
//! same arguments. The vm part boots qemu with the test kit's VM harness and
//! runs this binary inside each VM too, as `idlemon-bench vm-guest` (`vm.rs`).
//!
//! ## How to read the bench output
//!
//! `cargo xtask bench` (as root, about 20 minutes; `--quick` for a 3-minute
//! smoke run, `--only overhead|scale|churn|idle|pods|enforce|vm` for one part) prints
//! seven parts, then a table of targets, each `met`, `MISSED`,
//! `inconclusive` or `reported`. Each part makes its own network namespace
//! (the test kit's, `idlemon-PID-N-bench-PART`; the vm part, its own VMs), so that no other
//! traffic mixes in, and starts
//! its own idlemon (`--event-log ''`, a free `--listen` port, otherwise
//! default flags unless it says so). Repeated figures show n, min, median and
//! max; targets use the median. **Overhead** keeps one load running, a
//! 1-byte ping-pong on one loopback connection (transactions/s), then one
//! iperf3 stream (Gbit/s, read from the namespace's `lo` byte counter), and
//! alternates windows without idlemon (A) and with it (B) in ABBA order, so
//! that only idlemon changes from one window to the next. B/A is taken per
//! pair: 0.99 means the hooks took 1% of that traffic's speed. Each pair line
//! also says how often the load's two threads shared a CPU and how much CPU
//! the rest of the machine used; a pair is marked DISTURBED when A and B ran
//! with different thread placement (same-CPU and cross-CPU wake-ups differ
//! by a factor of 4 in a VM), when something else used more than 20% of a
//! core, or when another idlemon had programs loaded. A B/A target is
//! `inconclusive` when it lies between the quartiles of the pairs' ratios:
//! the windows' noise, not idlemon, would decide it. The self-cost lines
//! resolve what the ratios cannot: one more B window per load with the
//! kernel's BPF run-time stats on (they add two clock reads per program run,
//! so the pairs run without them) gives each program's runs and ns per run,
//! the BPF time per ping-pong transaction (all of it on the transaction's
//! critical path, so its share of the transaction is the slowdown to
//! expect), and the BPF share of the CPU both iperf3 ends used (the
//! throughput a CPU-bound stream loses). A program that does nothing,
//! attached by the bench beside the receive hook on `tcp:tcp_probe` for
//! the same window, measures the stats' own cost (their clock reads
//! around each run, about 60 ns in this VM): the `net of the stats' own
//! cost` lines subtract it from every run. The targets use the gross
//! figures, an upper bound of the hooks' cost; the net ones are a lower
//! bound (the kernel's dispatch of each run happens outside the stats).
//! `hooks attached` says how each hook attached (`tp_btf`, `kprobe`,
//! ...): every figure depends on it.
//! **Scale** opens 100,000 idle connections (200,000 sockets) before idlemon
//! starts (with `--scan-interval 2 --idle-threshold 30` and a config file
//! that puts loopback behind a 350 s timeout) and reports the time until
//! `idlemon_tracked_sockets` covers them; then it sends one byte on each
//! socket, so that the hooks' table holds them as on a host whose pooled
//! connections were used once, and samples walks (CPU and wall time of one
//! walk and classification of every socket, from `idlemon_scan_cpu_seconds`
//! and `idlemon_scan_duration_seconds`) twice: right after the sends, when
//! no socket has been idle long enough to be at risk and the walks look up no
//! owners, and once every socket has been idle past the threshold, when each
//! walk flags, attributes and counts all 200,000 (the target uses these).
//! The walks are timed with the BPF run-time stats off; one more send per
//! socket and two walks with the stats on give the self-cost table, where
//! `walk_tcp`'s ns/run is the BPF side of reading one socket (the kernel
//! iterator's own work, finding and locking each socket, is not in it).
//! The baselines put the walk beside the kernel's own readers of the same
//! sockets, run in the namespace with their output discarded, 3 times each:
//! `ss -tnoi state established` (what an SRE would run to see the same
//! stamps and timers) and `cat /proc/net/tcp /proc/net/tcp6`; `walk / it`
//! is idlemon's walk CPU over the tool's (below 1: idlemon reads the table
//! for less). Two more baselines are walks by a program that does nothing,
//! loaded by the bench itself (`monitor/bench/ebpf`, `noop.rs`): `iter/tcp` over the same
//! namespace (the kernel's own part of every idlemon walk: a floor no
//! `iter/tcp` program can go below) and `iter/task_file` over every open
//! file of the host (what a walk by file descriptor would cost instead).
//! Last come the daemon's resident memory (RssAnon is its heap) and the BPF
//! maps' memory (`bytes_memlock`, per tracked socket and per slot of
//! SOCKETS). **Churn** opens and
//! closes loopback connections at 10,000/s for 30 s and counts the entries
//! of SOCKETS before, during and after: all of them, and those of the
//! bench's own sockets, which must fall back to 0 (anything left is a leak);
//! when the machine cannot reach the rate, the achieved one is printed.
//! **Idle** holds 10,000 idle sockets and reads the daemon's CPU
//! (utime+stime) over 30 s at the default 5 s scan interval, in percent of
//! one core; the kernel counts in 10 ms ticks, so the figure is ±0.03%.
//! **Pods** spreads the same 10,000 sockets over 30 network namespaces and
//! measures the daemon's CPU the same way, in ABBA order: A with
//! `--socket-walk namespaces`, B with the default (every open file once).
//! **Vm** measures what this host's kernel refuses, the fentry and kprobe
//! hooks, on Debian's 6.1 and 6.12 cloud kernels, booted once each under qemu
//! TCG (one vCPU) with the test kit's VM harness: in the guest, one ping-pong like
//! the overhead part's runs through 4 rounds of 3 s windows in rotating order,
//! A (no idlemon), B1 (idlemon, which attaches by fentry by default), B2
//! (`--disable-attach fentry`: kprobes) and F (no idlemon, a no-op fentry
//! program on `tcp_sendmsg` and `tcp_rcv_established`), each window starting
//! once the load runs steadily again after idlemon's start or stop. Only
//! ratios within a round are printed, with the hook kinds each mode
//! attached: F/A is the floor of any fentry program there, B1/F idlemon's
//! cost over it. qemu's
//! `-icount` makes the guest's clock count instructions, so that the host's
//! load cannot move the ratios (rounds agree to within 1%), and a ratio
//! compares the instructions of a transaction with and without idlemon, not
//! what they cost on real hardware (cache misses, a kprobe's trap). idlemon's
//! walks are an hour apart there: on one vCPU each walk's pause left the
//! connection about 10% slower for seconds, which is no cost of the hooks.
//!
//! **Enforce** runs one idlemon with `--enforce-keepalive on` for a
//! cgroup of the bench's own and connects to an address of a veth interface
//! in the part's namespace (not loopback, which enforcement skips at once, so
//! every connection takes the whole decision: path lookup, four
//! `bpf_setsockopt` calls and an audit event) and closes with a RST, as fast
//! as one thread can, in ABBA windows: A with the bench process outside that
//! cgroup (the program does not run), B inside it. It prints connections/s
//! of both, B/A per pair (which includes the daemon's user-space handling of
//! one `keepalive_enforced` event per connection, on the same CPUs), the
//! decisions counted, and from one more B window with the BPF run-time stats
//! on, `enforce_keepalive`'s ns per connection.

mod churn;
mod daemon;
mod enforce;
mod host;
mod idle;
mod kernel;
mod load;
mod netns;
mod noop;
mod overhead;
mod ping_pong;
mod pods;
mod scale;
mod soak;
mod table;
mod traffic;
mod vm;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::{Parser, ValueEnum};

use self::{
    kernel::ProgInfo,
    table::{Check, Table},
};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask bench",
    bin_name = "cargo xtask bench",
    about = "Measure idlemon's overhead and scale (see README: Benchmarks)"
)]
pub struct BenchArgs {
    /// Smoke run: 2 pairs of 2 s, 20,000 connections, 5 s of churn, 10 s idle.
    #[arg(long)]
    quick: bool,
    /// Run one part only.
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// A/B pairs in the overhead part (default 7, quick 2).
    #[arg(long)]
    pairs: Option<usize>,
    /// Idle connections in the scale part (default 100000, quick 20000).
    #[arg(long)]
    connections: Option<usize>,
    /// Connections opened and closed per second in the churn part.
    #[arg(long, default_value_t = 10_000.0)]
    churn_rate: f64,
    /// Client threads of the churn part.
    #[arg(long, default_value_t = 2)]
    churn_threads: usize,
    /// Length of the soak (`--only soak`), in minutes.
    #[arg(long, default_value_t = 30)]
    soak_minutes: u64,
    /// Rounds of A, B1, B2 and F windows per kernel in the vm part (default 4, quick 2).
    #[arg(long)]
    vm_rounds: Option<usize>,
    /// Bench this idlemon binary instead of the one just built (a build
    /// from before a change, for a before/after comparison).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// The daemon to measure (cargo xtask bench builds it).
    #[arg(long, hide = true, default_value = "target/release/idlemon")]
    idlemon: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    Overhead,
    Scale,
    Churn,
    Idle,
    /// The idle part's sockets spread over 30 pod namespaces.
    Pods,
    /// A long soak (`--soak-minutes`); only with `--only soak`.
    Soak,
    /// fentry and kprobe overhead on 6.1 and 6.12 under qemu, as ratios.
    Vm,
    /// Connections per second with and without keepalive enforcement.
    Enforce,
}

#[derive(Debug, Clone)]
struct Settings {
    pairs: usize,
    /// Length of one A or B window of the overhead part.
    window: Duration,
    connections: usize,
    scan_samples: usize,
    churn_rate: f64,
    churn_seconds: Duration,
    churn_threads: usize,
    idle_connections: usize,
    /// Network namespaces of the pods part (default 30, quick 10).
    pods: usize,
    idle_seconds: Duration,
    soak: Duration,
    vm_rounds: usize,
    /// Length of one window of the vm part, in the guest's time.
    vm_window: Duration,
}

impl Settings {
    fn from(args: &BenchArgs) -> Self {
        let quick = args.quick;
        Self {
            pairs: args.pairs.unwrap_or(if quick { 2 } else { 7 }).max(1),
            window: Duration::from_secs(if quick { 2 } else { 5 }),
            connections: args
                .connections
                .unwrap_or(if quick { 20_000 } else { 100_000 })
                .max(1),
            scan_samples: if quick { 3 } else { 5 },
            churn_rate: args.churn_rate.max(1.0),
            churn_seconds: Duration::from_secs(if quick { 5 } else { 30 }),
            churn_threads: args.churn_threads.max(1),
            idle_connections: 5_000,
            pods: if quick { 10 } else { 30 },
            idle_seconds: Duration::from_secs(if quick { 10 } else { 30 }),
            soak: Duration::from_secs(60 * args.soak_minutes.max(1)),
            vm_rounds: args.vm_rounds.unwrap_or(if quick { 2 } else { 4 }).max(1),
            vm_window: Duration::from_secs(if quick { 1 } else { 3 }),
        }
    }
}

/// What every part needs, and what they report.
struct Bench {
    binary: PathBuf,
    settings: Settings,
    checks: Vec<Check>,
}

impl Bench {
    fn check(&mut self, check: Check) {
        self.checks.push(check);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Set by Ctrl-C or SIGTERM: every loop of the bench checks it, so that the
/// Drop guards (daemons, namespaces, the stats switch) run on the way out.
fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Sleeps, but returns early with an error on Ctrl-C.
fn pause(duration: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + duration;
    loop {
        if interrupted() {
            bail!("interrupted");
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

fn main() -> anyhow::Result<()> {
    // Inside the vm part's VMs: `idlemon-bench vm-guest ...` (`vm/guest.rs`).
    if std::env::args().nth(1).as_deref() == Some(vm::protocol::GUEST_COMMAND) {
        return vm::guest::run(&vm::protocol::GuestArgs::parse_from(
            std::env::args().skip(1),
        ));
    }
    run(&BenchArgs::parse())
}

fn run(args: &BenchArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads BPF programs and creates network namespaces: run it as root");
    }
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    netns::remove_leftovers();
    let binary = args.binary.clone().unwrap_or_else(|| args.idlemon.clone());
    if !binary.exists() {
        bail!(
            "{} is missing: cargo xtask bench builds it first",
            binary.display()
        );
    }
    kernel::learn_program_names(&binary)?;
    let settings = Settings::from(args);
    let parts: Vec<Part> = match args.only {
        Some(part) => vec![part],
        // The soak takes half an hour: only on request.
        None => vec![
            Part::Overhead,
            Part::Scale,
            Part::Churn,
            Part::Idle,
            Part::Pods,
            Part::Enforce,
            Part::Vm,
        ],
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!(
        "\nidlemon bench ({}): kernel {}, {cpus} CPUs, {}",
        if args.quick { "quick" } else { "full" },
        kernel.trim(),
        binary.display()
    );
    let mut bench = Bench {
        binary,
        settings,
        checks: Vec::new(),
    };
    let started = Instant::now();
    let mut failed = Vec::new();
    for part in parts {
        println!("\n== {part:?} ==");
        // The test kit's helpers (network namespaces) panic where the bench
        // would fail a part: the part fails, its guards unwind, the rest runs.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match part {
            Part::Overhead => overhead::run(&mut bench),
            Part::Scale => scale::run(&mut bench),
            Part::Churn => churn::run(&mut bench),
            Part::Idle => idle::run(&mut bench),
            Part::Pods => pods::run(&mut bench),
            Part::Soak => soak::run(&mut bench),
            Part::Vm => vm::run(&mut bench),
            Part::Enforce => enforce::run(&mut bench),
        }))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked (its message is above)")));
        if let Err(error) = result {
            println!("{part:?} FAILED: {error:#}");
            failed.push(part);
        }
        if interrupted() {
            break;
        }
    }
    println!(
        "\n== targets ({:.0} s) ==\n{}",
        started.elapsed().as_secs_f64(),
        table::checks_table(&bench.checks)
    );
    if interrupted() {
        bail!("interrupted");
    }
    if !failed.is_empty() {
        bail!("bench parts failed: {failed:?}");
    }
    Ok(())
}

/// Each program of `after` with its runs and run time (ns) since `before`.
fn run_deltas<'a>(
    before: &BTreeMap<u32, ProgInfo>,
    after: &'a BTreeMap<u32, ProgInfo>,
) -> impl Iterator<Item = (u64, u64, &'a ProgInfo)> {
    after.values().map(|prog| {
        let (runs0, time0) = before
            .get(&prog.id)
            .map_or((0, 0), |b| (b.run_cnt, b.run_time_ns));
        (
            prog.run_cnt.saturating_sub(runs0),
            prog.run_time_ns.saturating_sub(time0),
            prog,
        )
    })
}

/// Runs and time per program between two snapshots of run-time stats:
/// the rendered table (programs that did not run are named on one line
/// below it) and the time of all programs together, in ns.
fn self_cost(before: &BTreeMap<u32, ProgInfo>, after: &BTreeMap<u32, ProgInfo>) -> (String, u64) {
    let mut ran: Vec<(u64, u64, &ProgInfo)> = Vec::new();
    let mut idle = Vec::new();
    for (runs, time, prog) in run_deltas(before, after) {
        if runs == 0 {
            idle.push(prog.name.as_str());
        } else {
            ran.push((time, runs, prog));
        }
    }
    ran.sort_by_key(|(time, _, _)| std::cmp::Reverse(*time));
    let mut table = Table::new(&["program", "type", "runs", "total ms", "ns/run"]);
    for (time, runs, prog) in &ran {
        table.row([
            prog.name.clone(),
            prog.kind.clone(),
            runs.to_string(),
            format!("{:.1}", *time as f64 / 1e6),
            format!("{:.0}", *time as f64 / *runs as f64),
        ]);
    }
    let mut text = table.render();
    if !idle.is_empty() {
        text.push_str(&format!("(loaded, did not run: {})\n", idle.join(" ")));
    }
    (text, ran.iter().map(|(time, _, _)| time).sum())
}
