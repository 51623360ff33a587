//! Socket lifecycle: counts TCP state transitions, learns who connected,
//! explains deaths and failed connects (`death.rs`), and forgets sockets as
//! they close, so that the socket table holds only live sockets.
//!
//! `sock:inet_sock_set_state` fires on every state change of every TCP socket
//! in every network namespace, from `inet_sk_set_state()`:
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/af_inet.c#L1361
//! and `tcp:tcp_destroy_sock` from `tcp_v4_destroy_sock()`:
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_ipv4.c#L2524

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use monitor_common::{TCP_CLOSE, TCP_ESTABLISHED, TCP_MAX_STATE, TCP_SYN_SENT, counter};

use crate::{
    death::{
        count_syn_retransmits, on_close_from_established, on_close_from_syn_sent, on_connected,
    },
    keepalive::learn_keepalive_timer,
    kernel::count_opened,
    maps::{ACTIVE_OPENS, count, forget},
    send::record_owner,
};

/// tp_btf: typed arguments `(const struct sock *sk, int oldstate, int newstate)`
/// and no tracefs needed.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn state_tp_btf(ctx: BtfTracePointContext) -> u32 {
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    match try_state(ctx.arg::<u64>(0), old_state, new_state) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

/// raw_tp: the same arguments, for kernels that lack BTF for tp_btf.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn state_raw_tp(ctx: RawTracePointContext) -> u32 {
    let old_state: u64 = ctx.arg(1);
    let new_state: u64 = ctx.arg(2);
    match try_state(ctx.arg::<u64>(0), old_state as i32, new_state as i32) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

/// Classic tracepoint, the last resort; its format has been stable since
/// 4.16: `skaddr` at 8, `oldstate` at 16, `newstate` at 20 (tracefs
/// `events/sock/inet_sock_set_state/format`).
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn state_tracepoint(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the tracepoint's format.
    let fields = unsafe {
        (
            ctx.read_at::<u64>(8),
            ctx.read_at::<i32>(16),
            ctx.read_at::<i32>(20),
        )
    };
    match fields {
        (Ok(sk), Ok(old_state), Ok(new_state)) => match try_state(sk, old_state, new_state) {
            Ok(ret) => ret,
            Err(ret) => ret,
        },
        _ => 1,
    }
}

fn try_state(sk: u64, old_state: i32, new_state: i32) -> Result<u32, u32> {
    let new_state = new_state as u32;
    if new_state <= TCP_MAX_STATE {
        count(new_state, 1);
    }
    if new_state == TCP_SYN_SENT as u32 || new_state == TCP_ESTABLISHED as u32 {
        learn_keepalive_timer(sk);
    }
    if old_state == i32::from(TCP_SYN_SENT) {
        count_syn_retransmits(sk);
        if new_state == TCP_ESTABLISHED as u32 {
            let _ = on_connected(sk);
            if count_opened() && ACTIVE_OPENS.insert(sk, 1, 0).is_err() {
                count(counter::SOCKET_TABLE_FULL, 1);
            }
        }
    }
    if new_state == TCP_SYN_SENT as u32 {
        // connect() runs in the connecting process: the best moment to learn
        // the owner of a client socket.
        record_owner(sk)?;
    } else if new_state == TCP_CLOSE as u32 {
        // Before forgetting the socket: the events carry its owner.
        if old_state == i32::from(TCP_ESTABLISHED) {
            let _ = on_close_from_established(sk);
        } else if old_state == i32::from(TCP_SYN_SENT) {
            let _ = on_close_from_syn_sent(sk);
        }
        // A failed connect was never an active open that completed.
        if count_opened() && old_state != i32::from(TCP_SYN_SENT) {
            let _ = ACTIVE_OPENS.remove(sk);
        }
        forget(sk);
    }
    Ok(0)
}

/// tp_btf on `tcp_destroy_sock(struct sock *sk)`: the socket's memory is about
/// to be freed, and its address may be reused by the next socket.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn destroy_tp_btf(ctx: BtfTracePointContext) -> u32 {
    forget(ctx.arg::<u64>(0));
    0
}

#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn destroy_raw_tp(ctx: RawTracePointContext) -> u32 {
    forget(ctx.arg::<u64>(0));
    0
}
