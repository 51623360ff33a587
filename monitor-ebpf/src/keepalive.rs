//! Keepalive timer runs, where the kernel lets us see them.
//!
//! `tcp_keepalive_timer(struct timer_list *t)` runs when a socket's keepalive
//! (or FIN_WAIT2 / SYN-ACK) timer expires:
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_timer.c#L764
//! There is no tracepoint for it. fentry and kprobe attach to it directly;
//! elsewhere `timer:timer_expire_entry`, which fires before every timer
//! callback, stands in, filtered on the callback's address (learned from the
//! keepalive timer's `function` of a TCP socket by the state hook):
//! https://elixir.bootlin.com/linux/v6.12/source/kernel/time/timer.c#L1771
//! The timer is `icsk->icsk_keepalive_timer` where the kernel has it (stable
//! 6.1 and 6.12 took it too), `sk->sk_timer` before; `KERNEL_LAYOUT.keepalive_timer`
//! holds the offset of whichever it is, so the socket is `t - keepalive_timer`.

use aya_ebpf::{
    macros::{btf_tracepoint, fentry, kprobe, map, raw_tracepoint},
    maps::Array,
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext},
};
use monitor_common::{TCP_ESTABLISHED, counter};

use crate::{
    kernel::{offset, read},
    maps::{SOCKETS, count},
};

#[fentry(function = "tcp_keepalive_timer")]
pub fn keepalive_fentry(ctx: FEntryContext) -> u32 {
    match try_keepalive(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[kprobe(function = "tcp_keepalive_timer")]
pub fn keepalive_kprobe(ctx: ProbeContext) -> u32 {
    match ctx.arg::<u64>(0).ok_or(1u32).and_then(try_keepalive) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

/// Address of `tcp_keepalive_timer`, as TCP sockets' keepalive timer's
/// `function` holds it; 0 until the state hook has seen a TCP socket.
#[map]
static KEEPALIVE_TIMER_FUNCTION: Array<u64> = Array::with_max_entries(1, 0);

/// Called by the state hook: remembers the keepalive timer's callback.
#[inline(always)]
pub fn learn_keepalive_timer(sk: u64) {
    let Some(known) = KEEPALIVE_TIMER_FUNCTION.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a valid map value.
    if unsafe { *known } != 0 {
        return;
    }
    if let Ok(function) = read::<u64>(
        sk + offset!(keepalive_timer) as u64,
        offset!(timer_function),
    ) {
        // SAFETY: as above.
        unsafe { *known = function };
    }
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn keepalive_tp_btf(ctx: BtfTracePointContext) -> u32 {
    match try_timer(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn keepalive_raw_tp(ctx: RawTracePointContext) -> u32 {
    match try_timer(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

/// Every timer of the system passes here: one map read and one field read
/// before the filter rejects the others.
fn try_timer(timer: u64) -> Result<u32, u32> {
    let Some(&expected) = KEEPALIVE_TIMER_FUNCTION.get(0) else {
        return Ok(0);
    };
    if expected == 0 {
        return Ok(0);
    }
    let function: u64 = read(timer, offset!(timer_function))?;
    if function != expected {
        return Ok(0);
    }
    try_keepalive(timer)
}

fn try_keepalive(timer: u64) -> Result<u32, u32> {
    let sk = timer.wrapping_sub(offset!(keepalive_timer) as u64);
    let state: u8 = read(sk, offset!(skc_state))?;
    if state != TCP_ESTABLISHED {
        return Ok(0);
    }
    count(counter::KEEPALIVE_TIMER_FIRES, 1);
    if let Some(info) = SOCKETS.get_ptr_mut(sk) {
        // SAFETY: a valid map value.
        let info = unsafe { &mut *info };
        info.keepalive_timer_fires = info.keepalive_timer_fires.wrapping_add(1);
    }
    Ok(0)
}
