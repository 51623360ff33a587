//! Resets, received and sent: the moment a connection dies, with how long
//! it had been idle and whether a send after idle provoked it.
//!
//! `tcp:tcp_receive_reset` fires in `tcp_reset()` when a valid RST arrives:
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_input.c#L4499
//! `tcp:tcp_send_reset` fires in `tcp_v4_send_reset()`, `tcp_v6_send_reset()`
//! (a reply to a segment, the socket may be NULL, timewait or a request) and
//! `tcp_send_active_reset()` (the socket, no segment):
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_ipv4.c#L727

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use monitor_common::{AF_INET, AF_INET6, Event, TCP_CLOSE, TCP_SYN_SENT, counter, event_kind};

use crate::{
    events::{emit, emit_with},
    kernel::{offset, read},
    maps::count,
};

// include/net/tcp_states.h
const TCP_SYN_RECV: u8 = 3;
const TCP_TIME_WAIT: u8 = 6;
const TCP_LISTEN: u8 = 10;
const TCP_NEW_SYN_RECV: u8 = 12;

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn reset_received_tp_btf(ctx: BtfTracePointContext) -> u32 {
    match try_reset_received(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn reset_received_raw_tp(ctx: RawTracePointContext) -> u32 {
    match try_reset_received(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

/// Classic tracepoint: `skaddr` at offset 8 since 4.15
/// (tracefs `events/tcp/tcp_receive_reset/format`).
#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn reset_received_tracepoint(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the tracepoint's format.
    match unsafe { ctx.read_at::<u64>(8) }
        .map_err(|_| 1u32)
        .and_then(try_reset_received)
    {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_reset_received(sk: u64) -> Result<u32, u32> {
    let state: u8 = read(sk, offset!(skc_state))?;
    // A RST that refuses a connect() or aborts a handshake says nothing about
    // idle connections.
    if matches!(
        state,
        TCP_SYN_SENT | TCP_SYN_RECV | TCP_NEW_SYN_RECV | TCP_LISTEN | TCP_CLOSE
    ) {
        return Ok(0);
    }
    count(counter::RESETS_RECEIVED, 1);
    emit(event_kind::RESET_RECEIVED, sk)?;
    Ok(0)
}

/// `(const struct sock *sk, const struct sk_buff *skb, ...)`; the reason
/// argument came in 6.10 and is not needed.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn reset_sent_tp_btf(ctx: BtfTracePointContext) -> u32 {
    match try_reset_sent(ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn reset_sent_raw_tp(ctx: RawTracePointContext) -> u32 {
    match try_reset_sent(ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_reset_sent(sk: u64, skb: u64) -> Result<u32, u32> {
    count(counter::RESETS_SENT, 1);
    if sk != 0 {
        let state: u8 = read(sk, offset!(skc_state))?;
        // Timewait and request sockets are not full sockets: their tcp_sock
        // members do not exist.
        if state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV {
            emit(event_kind::RESET_SENT, sk)?;
            return Ok(0);
        }
    }
    if skb == 0 {
        return Ok(0);
    }
    // A reply to a segment that matched no full socket: always in softirq.
    emit_with(event_kind::RESET_SENT, false, |event| {
        let _ = addresses_from_segment(skb, event);
    })?;
    Ok(0)
}

/// Addresses and ports of the segment that provoked the RST: its source is
/// the remote end.
#[inline(always)]
fn addresses_from_segment(skb: u64, event: &mut Event) -> Result<(), u32> {
    let head: u64 = read(skb, offset!(skb_head))?;
    let network: u16 = read(skb, offset!(skb_network_header))?;
    let transport: u16 = read(skb, offset!(skb_transport_header))?;
    let ip = head + network as u64;
    let tcp = head + transport as u64;
    let version: u8 = read(ip, 0)?;
    let socket = &mut event.socket;
    match version >> 4 {
        4 => {
            socket.family = AF_INET;
            let remote: [u8; 4] = read(ip, 12)?;
            let local: [u8; 4] = read(ip, 16)?;
            socket.remote_addr[..4].copy_from_slice(&remote);
            socket.local_addr[..4].copy_from_slice(&local);
        }
        6 => {
            socket.family = AF_INET6;
            socket.remote_addr = read(ip, 8)?;
            socket.local_addr = read(ip, 24)?;
        }
        _ => return Err(1),
    }
    socket.remote_port = u16::from_be(read(tcp, 0)?);
    socket.local_port = u16::from_be(read(tcp, 2)?);
    Ok(())
}
