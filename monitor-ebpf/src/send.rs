//! Sends: learns which process uses a socket, and notices reuse after idle,
//! the moment a pooled client meets a NAT gateway's reset.
//!
//! Preferred: `tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`,
//! once per send() in the sending process:
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp.c#L1355
//! Fallback: the `tcp_sendmsg_locked` tracepoint (6.5+), which fires in the
//! same place for each buffer the send fills:
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp.c#L1149

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::{btf_tracepoint, fentry, kprobe, raw_tracepoint},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext},
};
use aya_log_ebpf::warn;
use monitor_common::{SocketInfo, counter, event_kind};

use crate::{
    events::emit,
    kernel::{Memory, Typed, Untyped, idle_for, idle_threshold, jiffies32},
    maps::{SOCKETS, SeenSlot, count},
};

#[fentry(function = "tcp_sendmsg")]
pub fn send_fentry(ctx: FEntryContext) -> u32 {
    match try_send::<Typed>(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[kprobe(function = "tcp_sendmsg")]
pub fn send_kprobe(ctx: ProbeContext) -> u32 {
    match ctx.arg::<u64>(0).ok_or(1u32).and_then(try_send::<Untyped>) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn send_tp_btf(ctx: BtfTracePointContext) -> u32 {
    match try_send::<Typed>(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn send_raw_tp(ctx: RawTracePointContext) -> u32 {
    match try_send::<Untyped>(ctx.arg::<u64>(0)) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_send<M: Memory>(sk: u64) -> Result<u32, u32> {
    let sk = M::tcp_sock(sk).ok_or(0u32)?;
    record_owner(sk)?;
    let now = jiffies32();
    let idle = idle_for::<M>(sk, now)?;
    if idle < idle_threshold() {
        return Ok(0);
    }
    let Some(info) = SOCKETS.get_ptr_mut(sk) else {
        // No room in the table: counted there; no event without dedup.
        return Ok(0);
    };
    // SAFETY: a valid map value; a racing writer can at worst make us report
    // one reuse twice.
    let info = unsafe { &mut *info };
    let last_activity = now.wrapping_sub(idle);
    if info.reuse_at.wrapping_sub(info.reuse_idle) == last_activity && info.reuse_at != 0 {
        // Another buffer of the same send.
        return Ok(0);
    }
    info.reuse_at = now;
    info.reuse_idle = idle;
    count(counter::SEND_AFTER_IDLE, 1);
    let _ = emit(event_kind::SEND_AFTER_IDLE, sk);
    Ok(0)
}

/// Remembers the current process as the socket's user. Writes only when the
/// user changed, and a busy socket's sends by the same process cost one
/// inlined array read (`OWNERS_SEEN`) instead of a hash lookup.
#[inline(always)]
pub fn record_owner(sk: u64) -> Result<(), u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == 0 {
        return Ok(());
    }
    let seen = SeenSlot::of(sk);
    if seen.as_ref().is_some_and(|seen| seen.holds(sk, tgid)) {
        return Ok(());
    }
    if let Some(info) = SOCKETS.get_ptr_mut(sk) {
        // SAFETY: a valid map value.
        let info = unsafe { &mut *info };
        if info.owner_tgid != tgid {
            info.owner_tgid = tgid;
            // SAFETY: helper without pointer arguments.
            info.owner_cgroup = unsafe { bpf_get_current_cgroup_id() };
        }
        if let Some(seen) = &seen {
            seen.note(sk, tgid);
        }
        return Ok(());
    }
    let info = SocketInfo {
        owner_tgid: tgid,
        // SAFETY: helper without pointer arguments.
        owner_cgroup: unsafe { bpf_get_current_cgroup_id() },
        ..SocketInfo::default()
    };
    insert(sk, &info)?;
    if let Some(seen) = &seen {
        seen.note(sk, tgid);
    }
    Ok(())
}

/// Adds a socket to the table, counting (never hiding) a full table.
#[inline(always)]
pub fn insert(sk: u64, info: &SocketInfo) -> Result<(), u32> {
    if SOCKETS.insert(sk, info, 0).is_err() {
        if count(counter::SOCKET_TABLE_FULL, 1) == 1 {
            // Once per CPU: user space exports the full count as a metric.
            warn!(
                (),
                "socket table full: new sockets go untracked; raise --max-sockets"
            );
        }
        return Err(1);
    }
    count(counter::SOCKET_TABLE_INSERTS, 1);
    Ok(())
}
