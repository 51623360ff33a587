//! The result lines between the guest driver and the host: `TAG MODE REST`.
//! Shared by both sides (`guest.rs` includes this file by path), so that
//! they cannot drift apart.

pub const KERNEL: &str = "KERNEL";
pub const START: &str = "START";
pub const READY: &str = "READY";
pub const METRIC: &str = "METRIC";
pub const PORTS: &str = "PORTS";
pub const AT_RISK: &str = "AT_RISK";
pub const SOCKET: &str = "SOCKET";
pub const RESET: &str = "RESET";
pub const EVENT: &str = "EVENT";
pub const EXIT: &str = "EXIT";
/// A step's lines are all out (`sockets`, `events`): without it the host
/// cannot tell a step that found nothing from one that never ran.
pub const STEP: &str = "STEP";
pub const LOG: &str = "LOG";
/// One measuring window of the bench (`cargo xtask bench --only vm`):
/// `WINDOW SIDE round=R seconds=S transactions=T`.
pub const WINDOW: &str = "WINDOW";
pub const FAIL: &str = "FAIL";
pub const DONE: &str = "DONE";

/// The MODE of lines that belong to no mode (`KERNEL`, `DONE`, setup failures).
pub const NO_MODE: &str = "-";

/// The bench's side without idlemon (A): a window's SIDE is this or a mode's name.
pub const BASELINE: &str = "baseline";
/// The bench's side without idlemon but with a no-op fentry program on each
/// of its per-packet hooks' functions (F): the floor under idlemon's cost.
pub const FLOOR: &str = "noop-fentry";
/// The functions of idlemon's per-packet hooks (send, receive) where it
/// attaches by fentry, and the F side its no-op programs.
pub const FLOOR_FUNCTIONS: [&str; 2] = ["tcp_sendmsg", "tcp_rcv_established"];
