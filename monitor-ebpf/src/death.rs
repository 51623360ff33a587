//! Deaths that no RST explains: the kernel gives up on an established
//! connection (unanswered retransmissions or keepalive probes, an ICMP
//! error) or on a connect (SYNs unanswered, refused, unreachable).
//!
//! Called from the state hook (`sock:inet_sock_set_state`) on
//! ESTABLISHED -> CLOSE and SYN_SENT -> CLOSE. Every path by which the
//! kernel kills a socket stores `sk_err` before it closes the socket, so the
//! transition carries the error on every kernel, and no hook of its own is
//! needed (`sock:inet_sk_error_report`, 5.14+, would fire for the same
//! deaths with nothing more to say; it comes before the close up to 6.9 and
//! after it from 6.10, the store to `sk_err` comes first in both):
//! - `tcp_write_err()`: retransmissions past `tcp_retries2` (or
//!   `tcp_syn_retries` in SYN_SENT), TCP_USER_TIMEOUT, keepalive probes;
//!   the error is `sk_err_soft` (an ICMP error seen meanwhile) or ETIMEDOUT:
//!   https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_timer.c#L73
//! - `tcp_reset()`: ECONNREFUSED in SYN_SENT, ECONNRESET (EPIPE in
//!   CLOSE_WAIT) otherwise, which `reset_received` explains:
//!   https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_input.c#L4499
//! - `tcp_v4_err()` / `tcp_v6_err()`: an ICMP error ends a connect at once;
//!   on an established socket it only becomes `sk_err_soft`:
//!   https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_ipv4.c#L481

use aya_ebpf::{macros::map, maps::LruHashMap};
use monitor_common::{AF_INET, AF_INET6, Destination, Event, counter, event_kind};

use crate::{
    events::{emit, emit_about},
    kernel::{offset, read},
    maps::count,
};

/// Connects that succeeded, per destination: beside the failed connects to
/// a destination (events), whether others to it succeed, which tells a
/// remote that drops some SYNs (`tcp_tw_recycle` behind a NAT) from one
/// that is down. User space reads the destinations that failed. LRU: the
/// least recently connected destinations make way.
#[map]
pub static CONNECTS: LruHashMap<Destination, u64> = LruHashMap::with_max_entries(4096, 0);

const EPIPE: i32 = 32;
const ECONNRESET: i32 = 104;
const ETIMEDOUT: i32 = 110;

/// An established socket closes. A death after unanswered keepalive probes
/// is a `KEEPALIVE_TIMEOUT`; after unanswered retransmissions (ETIMEDOUT,
/// or the ICMP error that came meanwhile) a `RETRANSMIT_TIMEOUT`; any other
/// error a `CONNECTION_ERROR`. Orderly closes and RSTs (`reset_received`)
/// are not deaths here.
#[inline(always)]
pub fn on_close_from_established(sk: u64) -> Result<(), u32> {
    let error: i32 = read(sk, offset!(sk_err))?;
    if error == 0 || error == ECONNRESET || error == EPIPE {
        return Ok(());
    }
    let probes_out: u8 = read(sk, offset!(probes_out))?;
    let flags: u64 = read(sk, offset!(sk_flags))?;
    if probes_out != 0 && (flags >> offset!(keepopen_bit)) & 1 != 0 {
        count(counter::KEEPALIVE_TIMEOUTS, 1);
        return emit(event_kind::KEEPALIVE_TIMEOUT, sk);
    }
    let retransmits: u8 = read(sk, offset!(icsk_retransmits))?;
    let kind = if error == ETIMEDOUT || retransmits != 0 {
        count(counter::RETRANSMIT_TIMEOUTS, 1);
        event_kind::RETRANSMIT_TIMEOUT
    } else {
        event_kind::CONNECTION_ERROR
    };
    emit_about(kind, sk, |event: &mut Event| {
        event.retransmissions = u32::from(retransmits);
    })
}

/// A connecting socket closes. With an error, the connect failed; without
/// one, the application gave up on it (closed it while connecting).
#[inline(always)]
pub fn on_close_from_syn_sent(sk: u64) -> Result<(), u32> {
    let error: i32 = read(sk, offset!(sk_err))?;
    if error == 0 {
        return Ok(());
    }
    count(counter::CONNECT_FAILURES, 1);
    let syns: u32 = read(sk, offset!(total_retrans))?;
    // `tcp_connect()` stamps the first SYN in `retrans_stamp`, and a
    // retransmission keeps the stamp: TCP's clock, CLOCK_MONOTONIC in ms
    // (in µs only on routes with the tcp_usec_ts feature, which user space
    // recognises by an impossible duration).
    let first_syn: u32 = read(sk, offset!(retrans_stamp))?;
    emit_about(event_kind::CONNECT_FAILED, sk, |event: &mut Event| {
        event.retransmissions = syns;
        event.connect_ms = if first_syn == 0 {
            u32::MAX
        } else {
            ((event.time_ns / 1_000_000) as u32).wrapping_sub(first_syn)
        };
    })
}

/// SYNs retransmitted by a socket that leaves SYN_SENT, either way:
/// `total_retrans` counts them until then (`tcp_ack` zeroes
/// `icsk_retransmits` before the socket becomes ESTABLISHED).
#[inline(always)]
pub fn count_syn_retransmits(sk: u64) {
    if let Ok(syns) = read::<u32>(sk, offset!(total_retrans))
        && syns != 0
    {
        count(counter::SYN_RETRANSMITS, u64::from(syns));
    }
}

/// A connect succeeded (SYN_SENT -> ESTABLISHED): counts it for its
/// destination. Once per connect, in softirq; the increment is not atomic,
/// so two CPUs finishing connects to one destination at once may count one.
#[inline(always)]
pub fn on_connected(sk: u64) -> Result<(), u32> {
    let family: u16 = read(sk, offset!(skc_family))?;
    let mut destination = Destination {
        family,
        port: u16::from_be(read(sk, offset!(skc_dport))?),
        ..Destination::default()
    };
    if family == AF_INET {
        let address: [u8; 4] = read(sk, offset!(skc_daddr))?;
        destination.addr[..4].copy_from_slice(&address);
    } else if family == AF_INET6 {
        destination.addr = read(sk, offset!(skc_v6_daddr))?;
    } else {
        return Ok(());
    }
    match CONNECTS.get_ptr_mut(destination) {
        // SAFETY: a valid map value.
        Some(succeeded) => unsafe { *succeeded += 1 },
        None => {
            let _ = CONNECTS.insert(destination, 1, 0);
        }
    }
    Ok(())
}
