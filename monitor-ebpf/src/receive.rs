//! Receives: notices traffic arriving on a long-idle socket, and keepalive
//! probes being answered (the kernel has no tracepoint for keepalive).
//!
//! Preferred: `tcp_rcv_established(struct sock *sk, struct sk_buff *skb)`,
//! the established-state receive path:
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_input.c#L6085
//! Fallback: the `tcp_probe` tracepoint, which that function fires first
//! thing, before `tcp_ack()` clears `icsk_probes_out`.

use aya_ebpf::{
    macros::{btf_tracepoint, fentry, kprobe, raw_tracepoint},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext},
};
use monitor_common::{SocketInfo, counter};

use crate::{
    kernel::{Memory, Typed, Untyped, idle_for, idle_threshold, jiffies32, offset},
    maps::{SOCKETS, count},
    send::insert,
};

#[fentry(function = "tcp_rcv_established")]
pub fn receive_fentry(ctx: FEntryContext) -> u32 {
    match try_receive::<Typed>(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[kprobe(function = "tcp_rcv_established")]
pub fn receive_kprobe(ctx: ProbeContext) -> u32 {
    match ctx
        .arg::<u64>(0)
        .ok_or(1u32)
        .and_then(try_receive::<Untyped>)
    {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[btf_tracepoint(function = "tcp_probe")]
pub fn receive_tp_btf(ctx: BtfTracePointContext) -> u32 {
    match try_receive::<Typed>(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[raw_tracepoint(tracepoint = "tcp_probe")]
pub fn receive_raw_tp(ctx: RawTracePointContext) -> u32 {
    match try_receive::<Untyped>(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_receive<M: Memory>(sk: u64) -> Result<u32, u32> {
    let sk = M::tcp_sock(sk).ok_or(0u32)?;
    let probes_out: u8 = M::read(sk, offset!(probes_out))?;
    if probes_out > 0 {
        // Probes were outstanding and the peer spoke: it answered them. Zero
        // window probes also use this counter; they only run with unsent
        // data, never on an idle socket with SO_KEEPALIVE, so the two do not
        // mix in practice.
        count(counter::KEEPALIVE_PROBES_ANSWERED, probes_out as u64);
        update(sk, |info| {
            info.keepalive_probes_answered = info
                .keepalive_probes_answered
                .wrapping_add(probes_out as u32)
        })?;
        return Ok(0);
    }
    let now = jiffies32();
    let idle = idle_for::<M>(sk, now)?;
    if idle >= idle_threshold() {
        let mark = now.wrapping_sub(idle);
        let mut first = false;
        update(sk, |info| {
            if info.recv_idle_mark != mark {
                info.recv_idle_mark = mark;
                first = true;
            }
        })?;
        if first {
            count(counter::RECEIVE_AFTER_IDLE, 1);
        }
    }
    Ok(0)
}

/// Applies `change` to the socket's entry, creating it when the socket has
/// none yet (a server socket that never sent).
#[inline(always)]
fn update(sk: u64, change: impl FnOnce(&mut SocketInfo)) -> Result<(), u32> {
    if let Some(info) = SOCKETS.get_ptr_mut(sk) {
        // SAFETY: a valid map value.
        change(unsafe { &mut *info });
        return Ok(());
    }
    let mut info = SocketInfo::default();
    change(&mut info);
    insert(sk, &info)
}
