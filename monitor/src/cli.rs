//! Command line: every daemon flag can also come from an `IDLEMON_*`
//! environment variable, which is how the DaemonSet configures it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The port idlemon listens on by default. It is not in the Prometheus
/// project's list of default exporter ports, so it does not collide with
/// node_exporter (9100) and friends on the same host.
pub const DEFAULT_PORT: u16 = 9781;
/// The port of the connection data (/sockets, /events), on loopback by
/// default: only processes of the same network namespace (`kubectl exec`
/// into the pod) can read addresses, process names and pods.
pub const DEFAULT_API_PORT: u16 = 9782;

#[derive(Debug, Parser)]
#[command(
    name = "idlemon",
    version = crate::build_info::version_line(),
    about = "Finds TCP connections a middlebox's idle timeout is about to kill, and explains the ones it did",
    long_about = None,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub daemon: DaemonArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the sockets a running daemon tracks, as a table (like `ss`).
    Sockets(SocketsArgs),
    /// Print a running daemon's recent events as JSON lines.
    Events(EventsArgs),
    /// Summarize a running daemon's at-risk sockets per workload, with the
    /// one fix for each.
    Advise(AdviseArgs),
}

/// `--socket-walk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketWalk {
    Auto,
    Namespaces,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Address of the HTTP server for /metrics, /healthz and /readyz: what
    /// Prometheus and the kubelet reach (the pod IP in the DaemonSet). It
    /// serves no connection data.
    #[arg(long, env = "IDLEMON_LISTEN", default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))]
    pub listen: SocketAddr,

    /// Address of the connection data API (/sockets, /events): addresses,
    /// process names and pods of every connection on the node. Keep it on
    /// loopback unless something authenticates callers in front of it.
    #[arg(long, env = "IDLEMON_API_LISTEN", default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT)))]
    pub api_listen: SocketAddr,

    /// /healthz fails (and the kubelet restarts idlemon) when the socket walk
    /// or the event reader has made no progress for this many scan
    /// intervals (and at least 10 s).
    #[arg(long, env = "IDLEMON_STALL_INTERVALS", default_value_t = 6, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub stall_intervals: u32,

    /// Flag sockets idle at least this long (seconds) without an effective keepalive.
    #[arg(long, env = "IDLEMON_IDLE_THRESHOLD", default_value = "300", value_parser = parse_seconds)]
    pub idle_threshold: Duration,

    /// Idle timeout of the path's middlebox (seconds), where the config file
    /// sets none. 350 is the AWS NAT gateway's, NLB's and VPC endpoints'.
    #[arg(long, env = "IDLEMON_IDLE_TIMEOUT", default_value = "350", value_parser = parse_seconds)]
    pub idle_timeout: Duration,

    /// TOML file overriding the idle timeout per destination CIDR and port.
    #[arg(long, env = "IDLEMON_CONFIG")]
    pub config: Option<PathBuf>,

    /// How often to walk every socket (seconds; fractions allowed).
    #[arg(long, env = "IDLEMON_SCAN_INTERVAL", default_value = "5", value_parser = parse_seconds)]
    pub scan_interval: Duration,

    /// How periodic scans find sockets: `auto` walks every open file once
    /// where several network namespaces have sockets (and by namespace only
    /// those where processes do not hold them all); `namespaces` walks each
    /// namespace by iter/tcp, a pass over the host's TCP table each.
    #[arg(long, env = "IDLEMON_SOCKET_WALK", value_enum, default_value_t = SocketWalk::Auto)]
    pub socket_walk: SocketWalk,

    /// Capacity of the kernel's per-socket table. Sockets beyond it are still
    /// found by the walk but lose attribution; `idlemon_socket_table_full_total` counts them.
    #[arg(long, env = "IDLEMON_MAX_SOCKETS", default_value_t = 131_072, value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    pub max_sockets: u32,

    /// Where the event log goes: `-` for stdout, a file path (rotated by
    /// size), or an empty string for none.
    #[arg(long, env = "IDLEMON_EVENT_LOG", default_value = "-")]
    pub event_log: String,

    /// Size (bytes) at which the event log file is rotated.
    #[arg(long, env = "IDLEMON_EVENT_LOG_MAX_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(4096..))]
    pub event_log_max_bytes: u64,

    /// Rotated event log files kept (PATH.1 ... PATH.N).
    #[arg(long, env = "IDLEMON_EVENT_LOG_KEEP", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub event_log_keep: u32,

    /// Events kept in memory for `GET /events`.
    #[arg(long, env = "IDLEMON_EVENT_HISTORY", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub event_history: u64,

    /// Where the host's /proc is (e.g. /host/proc in a DaemonSet): network
    /// namespaces and cgroups of every process are read there.
    #[arg(long, env = "IDLEMON_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// This node's name (the DaemonSet sets it from the Downward API). With
    /// it, inside a cluster, pod names and workloads come from a watch of
    /// this node's pods.
    #[arg(long, env = "IDLEMON_NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubernetes API address, instead of the in-cluster one.
    #[arg(long, env = "IDLEMON_KUBE_API", requires = "node_name")]
    pub kube_api: Option<String>,

    /// Kubernetes API bearer token file, instead of the service account's.
    /// Read again every minute and after the API server refuses a token.
    #[arg(long, env = "IDLEMON_KUBE_TOKEN_FILE", requires = "node_name")]
    pub kube_token_file: Option<PathBuf>,

    /// The API server ends each pod watch after this many seconds; a watch
    /// or list silent 5 s longer is taken for a dead connection and restarted.
    #[arg(long, env = "IDLEMON_KUBE_WATCH_TIMEOUT", default_value = "290", value_parser = parse_seconds)]
    pub kube_watch_timeout: Duration,

    /// Owner label sets (see --owner-labels) of idlemon_at_risk_sockets per
    /// scan, and of idlemon_idle_timeout_resets_total since start; the rest
    /// are folded into workload="_other" and counted in
    /// idlemon_attribution_series_dropped_total.
    #[arg(long, env = "IDLEMON_MAX_ATTRIBUTION_SERIES", default_value_t = 500)]
    pub max_attribution_series: usize,

    /// Owner labels of the per-workload series (idlemon_at_risk_sockets,
    /// idlemon_idle_timeout_resets_total), comma-separated: namespace,
    /// workload, pod. Without pod (the default), rollouts start no new
    /// series; /sockets and the events still name the pod.
    #[arg(
        long,
        env = "IDLEMON_OWNER_LABELS",
        value_delimiter = ',',
        default_value = "namespace,workload",
        required = false
    )]
    pub owner_labels: Vec<crate::metrics::OwnerLabel>,

    /// Export idlemon_at_risk_destination_sockets{destination} for the N
    /// destinations with the most at-risk sockets, and
    /// idlemon_destination_connect_failures_total{destination,reason} for the
    /// first N destinations whose connects failed, and
    /// idlemon_destination_established_connections{destination} for the N
    /// destinations with the most connections this node opened (0: off).
    #[arg(long, env = "IDLEMON_DESTINATION_LABELS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub destination_labels: u64,

    /// BTF of the running kernel, where /sys/kernel/btf/vmlinux is missing
    /// (a kernel built without CONFIG_DEBUG_INFO_BTF; BTFHub has files).
    #[arg(long, env = "IDLEMON_KERNEL_BTF")]
    pub kernel_btf: Option<PathBuf>,

    /// Attach kinds never to try, comma-separated (fentry, kprobe, tp_btf,
    /// raw_tp, tracepoint; sock_ops: keepalive enforcement): to work around a
    /// kernel bug, or to test fallbacks.
    #[arg(long, env = "IDLEMON_DISABLE_ATTACH", value_delimiter = ',')]
    pub disable_attach: Vec<crate::probes::AttachKind>,

    /// Keepalive enforcement: `off`; `dry-run` decides and reports what it
    /// would set on each new connection through a middlebox; `on` sets it
    /// (SO_KEEPALIVE, TCP_KEEPIDLE below the path's timeout). Overrides the
    /// config file's `[enforce] mode`, which also selects the workloads.
    #[arg(long, env = "IDLEMON_ENFORCE_KEEPALIVE", value_enum)]
    pub enforce_keepalive: Option<crate::config::EnforceMode>,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "IDLEMON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log level or tracing filter (e.g. `info`, `idlemon=debug`). RUST_LOG
    /// is used when this is not given.
    #[arg(long, env = "IDLEMON_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct SocketsArgs {
    /// Base URL of the daemon's connection data API (its --api-listen address).
    #[arg(long, env = "IDLEMON_URL", default_value_t = format!("http://127.0.0.1:{DEFAULT_API_PORT}"))]
    pub url: String,

    /// Only sockets at risk.
    #[arg(long)]
    pub at_risk: bool,

    /// Only sockets idle at least this many seconds.
    #[arg(long, value_parser = parse_seconds)]
    pub min_idle: Option<Duration>,

    /// Print the daemon's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AdviseArgs {
    /// Base URL of the daemon's connection data API (its --api-listen address).
    #[arg(long, env = "IDLEMON_URL", default_value_t = format!("http://127.0.0.1:{DEFAULT_API_PORT}"))]
    pub url: String,

    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Base URL of the daemon's connection data API (its --api-listen address).
    #[arg(long, env = "IDLEMON_URL", default_value_t = format!("http://127.0.0.1:{DEFAULT_API_PORT}"))]
    pub url: String,

    /// Only events after this time: unix seconds or RFC 3339.
    #[arg(long)]
    pub since: Option<String>,

    /// At most this many events (before following).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,

    /// Keep printing new events as they come, until interrupted.
    #[arg(long, short)]
    pub follow: bool,
}

/// Parses a positive number of seconds, fractions allowed ("0.5", "300").
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("`{text}` must be a positive number of seconds"));
    }
    if seconds > f64::from(u32::MAX) {
        return Err(format!("`{text}` seconds is too long"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_accept_integers_and_fractions() {
        assert_eq!(parse_seconds("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn seconds_reject_zero_negative_and_garbage() {
        for bad in ["0", "-1", "abc", "", "inf", "NaN", "1e20"] {
            assert!(parse_seconds(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn defaults_match_the_documentation() {
        let cli = Cli::try_parse_from(["idlemon"]).expect("no flags parse");
        assert_eq!(cli.daemon.listen.to_string(), "127.0.0.1:9781");
        assert_eq!(cli.daemon.api_listen.to_string(), "127.0.0.1:9782");
        assert_eq!(cli.daemon.stall_intervals, 6);
        assert_eq!(cli.daemon.idle_threshold, Duration::from_secs(300));
        assert_eq!(cli.daemon.idle_timeout, Duration::from_secs(350));
        assert_eq!(
            crate::metrics::OwnerLabels::of(&cli.daemon.owner_labels),
            crate::metrics::OwnerLabels::DEFAULT
        );
        assert!(cli.command.is_none());
    }

    #[test]
    fn the_clients_read_the_api_port() {
        let cli = Cli::try_parse_from(["idlemon", "sockets"]).expect("sockets parses");
        let Some(Command::Sockets(args)) = cli.command else {
            panic!("not the sockets command");
        };
        assert_eq!(args.url, "http://127.0.0.1:9782");
        let cli = Cli::try_parse_from(["idlemon", "events"]).expect("events parses");
        let Some(Command::Events(args)) = cli.command else {
            panic!("not the events command");
        };
        assert_eq!(args.url, "http://127.0.0.1:9782");
    }

    #[test]
    fn socket_walks_are_named() {
        let cli = Cli::try_parse_from(["idlemon"]).expect("no flags parse");
        assert_eq!(cli.daemon.socket_walk, SocketWalk::Auto);
        let cli = Cli::try_parse_from(["idlemon", "--socket-walk", "namespaces"])
            .expect("namespaces is a walk");
        assert_eq!(cli.daemon.socket_walk, SocketWalk::Namespaces);
        assert!(Cli::try_parse_from(["idlemon", "--socket-walk", "files"]).is_err());
    }

    #[test]
    fn unknown_flags_and_bad_addresses_are_errors() {
        assert!(Cli::try_parse_from(["idlemon", "--bogus"]).is_err());
        assert!(Cli::try_parse_from(["idlemon", "--listen", "nowhere"]).is_err());
        assert!(Cli::try_parse_from(["idlemon", "--disable-attach", "magic"]).is_err());
        assert!(Cli::try_parse_from(["idlemon", "--owner-labels", "node"]).is_err());
        let cli = Cli::try_parse_from(["idlemon", "--owner-labels", "namespace,workload,pod"])
            .expect("owner labels");
        assert!(crate::metrics::OwnerLabels::of(&cli.daemon.owner_labels).pod);
        let cli = Cli::try_parse_from(["idlemon", "--disable-attach", "fentry,tp_btf,raw_tp"])
            .expect("attach kinds are named as in idlemon_probe_info");
        assert_eq!(cli.daemon.disable_attach.len(), 3);
    }
}
