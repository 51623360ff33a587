//! The socket walk: one record per ESTABLISHED TCP socket, including sockets
//! that existed before idlemon started and sockets that never send again.
//!
//! `iter/tcp` visits every TCP socket of the network namespace in which the
//! reader created the iterator (`bpf_iter_init_seq_net()`), so user space
//! creates one per namespace:
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_ipv4.c#L3245
//! The context is `struct bpf_iter__tcp { meta; sk_common; uid }`, three
//! 8-byte slots fixed by the kernel ABI.

use aya_ebpf::helpers::generated::bpf_sock_from_file;
use aya_ebpf::{
    cty::c_void,
    helpers::generated::bpf_seq_write,
    macros::map,
    maps::{Array, PerCpuArray},
};
use monitor_common::{
    AF_INET, AF_INET6, INFO_CARRIED_OVER, SocketRecord, TCP_CLOSE_WAIT, TCP_ESTABLISHED,
    walk_option,
};

use crate::kernel::{
    Depth, Memory, SockTyped, Typed, count_opened, forget_recorded, idle_threshold, jiffies32,
    offset, recorded, snapshot,
};
use crate::maps::ACTIVE_OPENS;

/// `IPPROTO_TCP`, as `sock.sk_protocol` holds it.
const IPPROTO_TCP: u16 = 6;

/// The record being built, per CPU: on the stack it would have to be zeroed
/// for every socket (a 120-byte `memset` loop), where `snapshot` writes
/// every field anyway.
#[map]
static WALK_RECORD: PerCpuArray<SocketRecord> = PerCpuArray::with_max_entries(1, 0);

/// Set by user space before each namespace's walk, slots `walk_option::*`.
/// A periodic walk reads what the metrics need: what the hooks recorded
/// (the owner) only for sockets idle at least the idle threshold (the only
/// ones that can be at risk), and of those only the ones whose owner user
/// space does not still have from the previous walk; per-socket keepalive
/// settings only where SO_KEEPALIVE is on. The lookup in `SOCKETS` is a
/// fifth of a walk's cost on a host with many idle sockets.
#[map]
static WALK_OPTIONS: Array<u32> = Array::with_max_entries(walk_option::SLOTS, 0);

/// A slot of `WALK_OPTIONS`; 0 if absent (never: the array is that large).
#[inline(always)]
fn option(slot: u32) -> u32 {
    WALK_OPTIONS.get(slot).copied().unwrap_or(0)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn walk_tcp(ctx: *mut c_void) -> i32 {
    match try_walk_tcp(ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_walk_tcp(ctx: *mut c_void) -> Result<i32, i32> {
    let ctx = ctx as *const u64;
    // SAFETY: the kernel hands iterator programs a valid `bpf_iter__tcp`;
    // direct loads from it and from `meta` are checked against BTF by the verifier.
    let (meta, sk, uid) = unsafe {
        (
            *(ctx as *const *const *mut c_void),
            *(ctx.add(1) as *const *const u8),
            *(ctx.add(2) as *const u32),
        )
    };
    if sk.is_null() {
        // The final call after the last socket.
        return Ok(0);
    }
    // SAFETY: `meta` is non-null for every call that carries a socket.
    let seq = unsafe { *meta };
    // Request and timewait sockets are never ESTABLISHED.
    let Some(sk) = Typed::tcp_sock(sk as u64) else {
        return Ok(0);
    };
    let state: u8 = Typed::read(sk, offset!(skc_state)).map_err(|_| 0)?;
    if state != TCP_ESTABLISHED {
        return Ok(0);
    }
    let record = WALK_RECORD.get_ptr_mut(0).ok_or(0)?;
    // SAFETY: this CPU's slot; iterator programs do not nest on one CPU.
    let record = unsafe { &mut *record };
    record.uid = uid;
    let now = jiffies32();
    if option(walk_option::STARTED) == 0
        && let Some(started_at) = WALK_OPTIONS.get_ptr_mut(walk_option::STARTED_AT)
        && let Some(started) = WALK_OPTIONS.get_ptr_mut(walk_option::STARTED)
    {
        // SAFETY: map values; one walk runs at a time.
        unsafe {
            *started_at = now;
            *started = 1;
        }
    }
    let complete = WALK_OPTIONS
        .get(walk_option::COMPLETE)
        .is_none_or(|&all| all != 0);
    snapshot::<Typed>(
        sk,
        record,
        Depth::Walk {
            every_field: complete,
        },
    )
    .map_err(|_| 0)?;
    let idle = record.last_send_age.min(record.last_recv_age);
    if complete {
        recorded(sk, record);
    } else if idle >= idle_threshold() {
        // Idle since before the previous walk began minus the threshold: that
        // walk found it idle past the threshold and read its owner, and no
        // send has changed the owner since.
        let since_previous = now.wrapping_sub(option(walk_option::OWNERS_KNOWN_SINCE));
        if option(walk_option::OWNERS_KNOWN) != 0
            && idle >= since_previous.saturating_add(idle_threshold())
        {
            forget_recorded(record);
            record.info_known = INFO_CARRIED_OVER;
        } else {
            recorded(sk, record);
        }
    } else {
        forget_recorded(record);
    }
    record.opened_here = opened_here(record.sock);
    write(seq, record);
    Ok(0)
}

/// `SocketRecord::opened_here`: a lookup per socket, only when counted.
#[inline(always)]
fn opened_here(sk: u64) -> u8 {
    // SAFETY: a lookup; the value is not read.
    u8::from(count_opened() && unsafe { ACTIVE_OPENS.get(sk) }.is_some())
}

/// Hands one record to the reader of the iterator whose meta gave `seq`.
#[inline(always)]
fn write(seq: *mut c_void, record: &SocketRecord) {
    // SAFETY: `seq` comes from the iterator meta and `record` is a map value.
    unsafe {
        bpf_seq_write(
            seq.cast(),
            (&raw const *record) as *const c_void,
            size_of::<SocketRecord>() as u32,
        );
    }
}

/// The walk by file descriptor (`iter/task_file`): every open file of every
/// process, of which the TCP sockets of every network namespace at once,
/// where `iter/tcp` passes over the host's whole connection table once per
/// namespace (for a node of 30 pods, 30 passes). It cannot see a socket that
/// no process holds (one in an accept queue, a kernel service's), so user
/// space checks each namespace's count (`CurrEstab`: ESTABLISHED and
/// CLOSE_WAIT, hence the records of the latter, counted and dropped) and
/// walks a namespace by `iter/tcp` where they differ; and a socket that
/// several processes hold comes once per holder, which user space drops.
/// The context is `struct
/// bpf_iter__task_file { meta; task; fd; file }`, four 8-byte slots.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn walk_files(ctx: *mut c_void) -> i32 {
    match try_walk_files(ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_walk_files(ctx: *mut c_void) -> Result<i32, i32> {
    let ctx = ctx as *const u64;
    // SAFETY: the kernel hands task_file iterators a valid context; the
    // verifier checks these loads against its BTF.
    let (meta, task, file) = unsafe {
        (
            *(ctx as *const *const *mut c_void),
            *(ctx.add(1) as *const *const u8),
            *(ctx.add(3) as *const *mut c_void),
        )
    };
    if task.is_null() || file.is_null() {
        // The final call after the last file.
        return Ok(0);
    }
    // SAFETY: the helper checks that the file is a socket; NULL if not.
    let socket = unsafe { bpf_sock_from_file(file.cast()) };
    if socket.is_null() {
        return Ok(0);
    }
    // `socket->sk` is a pointer the verifier does not trust (`SockTyped`).
    let sk: u64 = Typed::read(socket as u64, offset!(socket_sk)).map_err(|_| 0)?;
    if sk == 0 {
        return Ok(0);
    }
    let family: u16 = Typed::read(sk, offset!(skc_family)).map_err(|_| 0)?;
    let protocol: u16 = Typed::read(sk, offset!(sk_protocol)).map_err(|_| 0)?;
    if (family != AF_INET && family != AF_INET6) || protocol != IPPROTO_TCP {
        return Ok(0);
    }
    let state: u8 = Typed::read(sk, offset!(skc_state)).map_err(|_| 0)?;
    if state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT {
        return Ok(0);
    }
    let record = WALK_RECORD.get_ptr_mut(0).ok_or(0)?;
    // SAFETY: this CPU's slot; iterator programs do not nest on one CPU.
    let record = unsafe { &mut *record };
    snapshot::<SockTyped>(sk, record, Depth::Walk { every_field: false }).map_err(|_| 0)?;
    record.uid = Typed::read(sk, offset!(sk_uid)).map_err(|_| 0)?;
    let idle = record.last_send_age.min(record.last_recv_age);
    // Owners as in a periodic iter/tcp walk: what the hooks recorded, of the
    // sockets that can be at risk. (Not the holding process: a walk for
    // /sockets, by iter/tcp, could not name it, and the two would differ.)
    if state == TCP_ESTABLISHED && idle >= idle_threshold() {
        recorded(sk, record);
    } else {
        forget_recorded(record);
    }
    record.opened_here = opened_here(record.sock);
    // SAFETY: `meta` is non-null with every file.
    write(unsafe { *meta }, record);
    Ok(0)
}
