//! The event stream: moments user space must explain later (resets, reuse
//! after idle, keepalive deaths), each with the socket's state at that moment.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::RingBuf,
};
use monitor_common::{Event, counter, event_kind};

use crate::{
    kernel::{Depth, Untyped, jiffies32, offset, read, recorded, snapshot},
    maps::count,
};

/// 1 MiB holds about six thousand events: a burst beyond what user space
/// drains in time is counted in `EVENTS_LOST`, never silently dropped.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Sends an event about `sk`; `sk` must be a full socket.
#[inline(always)]
pub fn emit(kind: u8, sk: u64) -> Result<(), u32> {
    emit_with(kind, |event| {
        if snapshot::<Untyped>(sk, &mut event.socket, Depth::Event).is_ok() {
            recorded(sk, &mut event.socket);
            event.socket_known = 1;
        }
        event.error = read::<i32>(sk, offset!(sk_err)).unwrap_or(0) as u32;
    })
}

/// Sends an event filled in by `fill`, counting it as lost when the ring
/// buffer is full.
#[inline(always)]
pub fn emit_with(kind: u8, fill: impl FnOnce(&mut Event)) -> Result<(), u32> {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(counter::EVENTS_LOST, 1);
        if kind == event_kind::RESET_RECEIVED {
            count(counter::RESET_EVENTS_LOST, 1);
        }
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
    event.current_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if event.current_tgid != 0 {
        event.current_comm = bpf_get_current_comm().unwrap_or_default();
    }
    event.kind = kind;
    fill(event);
    entry.submit(0);
    Ok(())
}
