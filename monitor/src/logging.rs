//! Structured logs through tracing, on stderr (stdout carries the event log).
//! Kernel-side aya-log messages are forwarded at debug level.

use anyhow::Context as _;
use tracing_subscriber::{EnvFilter, fmt};

use crate::cli::{LogArgs, LogFormat};

pub fn init(args: &LogArgs) -> anyhow::Result<()> {
    let filter = match &args.log_level {
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("invalid --log-level `{level}`"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = fmt()
        .with_env_filter(quiet_kube(filter, args.log_level.as_deref())?)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|error| anyhow::anyhow!("cannot set up logging: {error}"))
}

/// kube's client quotes whole API responses (pods, with their environment
/// and annotations) in its debug and trace lines: they stay at info unless
/// the filter names kube itself, so that `--log-level debug` never puts pod
/// JSON in the logs.
fn quiet_kube(filter: EnvFilter, asked: Option<&str>) -> anyhow::Result<EnvFilter> {
    let asked = asked
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_default();
    if asked.contains("kube") {
        return Ok(filter);
    }
    Ok(filter
        .add_directive("kube_client=info".parse()?)
        .add_directive("kube_runtime=info".parse()?))
}

/// Receives aya-log records from the kernel programs.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        tracing::enabled!(target: "idlemon::ebpf", tracing::Level::DEBUG)
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(
            target: "idlemon::ebpf",
            level = %record.level(),
            "{}",
            record.args()
        );
    }

    fn flush(&self) {}
}
