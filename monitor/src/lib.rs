//! idlemon's daemon as a library: the binary (`main.rs`) parses the command
//! line and runs it; the fuzz targets (`monitor/fuzz`) drive the parsers.

pub mod advise;
pub mod attribution;
pub mod build_info;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod enforce;
pub mod eventlog;
pub mod events;
pub mod fix;
pub mod fuzzing;
pub mod http;
pub mod kernel;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod probes;
pub mod scan;
pub mod sockets;
pub mod stream;
