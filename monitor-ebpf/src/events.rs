//! The event stream: moments user space must explain later (resets, reuse
//! after idle, keepalive deaths), each with the socket's state at that moment.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::RingBuf,
};
use monitor_common::{Event, counter, event_kind};

use crate::{
    kernel::{Depth, Untyped, idle_threshold, jiffies32, offset, read, recorded, snapshot},
    maps::count,
};

/// 1 MiB holds about five thousand events: a burst beyond what user space
/// drains in time is counted in `EVENTS_LOST`, never silently dropped.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
const EVENTS_BYTES: u32 = 1 << 20;

/// Past this fill, only evidence (`is_evidence`) enters the ring: a flood of
/// unrelated resets (a port scan, a crash loop) leaves the last quarter for
/// the reset that explains an incident.
const ORDINARY_FILL_MAX: u64 = EVENTS_BYTES as u64 / 4 * 3;

/// `BPF_RB_AVAIL_DATA`: bytes written and not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Sends an event about `sk`; `sk` must be a full socket.
///
/// The task the event fires in is named only where it holds the socket: a
/// send (always in the sender's context: the hook runs before tcp_sendmsg
/// takes the socket lock), or whatever runs under `lock_sock` (a close, an
/// abort, a RST processed from the socket's backlog by its owner). A RST
/// received in softirq, or a timer's death, lands on whichever task the CPU
/// was running: that task has nothing to do with the socket, so user space
/// names the socket's recorded owner instead, or nobody.
#[inline(always)]
pub fn emit(kind: u8, sk: u64) -> Result<(), u32> {
    emit_about(kind, sk, |_| {})
}

/// `emit`, with what only this kind of event carries added by `detail`.
#[inline(always)]
pub fn emit_about(kind: u8, sk: u64, detail: impl FnOnce(&mut Event)) -> Result<(), u32> {
    let holds_socket = kind == event_kind::SEND_AFTER_IDLE
        || read::<u32>(sk, offset!(sk_lock_owned)).is_ok_and(|owned| owned != 0);
    emit_with(kind, holds_socket, |event| {
        if snapshot::<Untyped>(sk, &mut event.socket, Depth::Event).is_ok() {
            recorded(sk, &mut event.socket);
            event.socket_known = 1;
        }
        event.error = read::<i32>(sk, offset!(sk_err)).unwrap_or(0) as u32;
        detail(event);
    })
}

/// Sends an event filled in by `fill`, counting it as lost when the ring
/// buffer is full, or shed when it is three-quarters full and the event is
/// not evidence. `holds_socket`: whether the current task is the one that
/// acted on the socket (see `emit`).
#[inline(always)]
pub fn emit_with(kind: u8, holds_socket: bool, fill: impl FnOnce(&mut Event)) -> Result<(), u32> {
    emit_flagged(kind, holds_socket, 0, fill)
}

/// `bpf_ringbuf_submit` flag: do not wake the reader.
const BPF_RB_NO_WAKEUP: u64 = 1;
/// Below this fill, `emit_unhurried` wakes nobody.
const UNHURRIED_FILL_MAX: u64 = EVENTS_BYTES as u64 / 8;

/// As `emit_with`, for events that may wait for the reader's next turn
/// (user space drains the ring at least every scan interval): waking the
/// reader is most of what an event costs the kernel (an interrupt to the
/// own CPU and a wakeup; 6 of the 7 µs an audited connection cost in
/// `cargo xtask bench --only enforce`), and keepalive enforcement emits one
/// per connection. The reader is woken anyway once the ring is an eighth full.
#[inline(always)]
pub fn emit_unhurried(kind: u8, fill: impl FnOnce(&mut Event)) -> Result<(), u32> {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) > UNHURRIED_FILL_MAX {
        0
    } else {
        BPF_RB_NO_WAKEUP
    };
    emit_flagged(kind, false, flags, fill)
}

#[inline(always)]
fn emit_flagged(
    kind: u8,
    holds_socket: bool,
    flags: u64,
    fill: impl FnOnce(&mut Event),
) -> Result<(), u32> {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        lost(kind);
        return Err(1);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the reservation is exactly one Event; write a zeroed one so no
    // stale bytes reach user space, then fill it in place.
    let event = unsafe {
        event.write(Event::default());
        &mut *event
    };
    // SAFETY: helpers without pointer arguments.
    event.time_ns = unsafe { bpf_ktime_get_ns() };
    event.jiffies = jiffies32();
    if holds_socket {
        event.current_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if event.current_tgid != 0 {
            event.current_comm = bpf_get_current_comm().unwrap_or_default();
        }
    }
    event.kind = kind;
    fill(event);
    if !is_evidence(event) && EVENTS.query(BPF_RB_AVAIL_DATA) > ORDINARY_FILL_MAX {
        entry.discard(0);
        lost(kind);
        count(counter::EVENTS_SHED, 1);
        return Err(1);
    }
    entry.submit(flags);
    Ok(())
}

#[inline(always)]
fn lost(kind: u8) {
    count(counter::EVENTS_LOST, 1);
    if kind == event_kind::RESET_RECEIVED {
        count(counter::RESET_EVENTS_LOST, 1);
    }
}

/// An event about a socket idle at least the threshold: a send after idle,
/// a keepalive death, or an event on a socket that has been idle that long,
/// or that resumed from such an idle period within that long (a RST that
/// answers a send after idle). User space keeps such events ahead of the
/// rest too (`EventRecord::is_evidence`).
#[inline(always)]
fn is_evidence(event: &Event) -> bool {
    // Deaths after unanswered retransmissions come minutes after the send
    // that started them, when neither idle time nor the reuse window says
    // so any more; they are rare, and each one needs explaining.
    if matches!(
        event.kind,
        event_kind::SEND_AFTER_IDLE
            | event_kind::KEEPALIVE_TIMEOUT
            | event_kind::RETRANSMIT_TIMEOUT
    ) {
        return true;
    }
    if event.socket_known == 0 {
        return false;
    }
    let socket = &event.socket;
    let threshold = idle_threshold();
    let idle = if socket.last_send_age < socket.last_recv_age {
        socket.last_send_age
    } else {
        socket.last_recv_age
    };
    let resumed =
        socket.info.reuse_at != 0 && event.jiffies.wrapping_sub(socket.info.reuse_at) <= threshold;
    idle >= threshold || resumed
}
