//! Reading kernel structs at offsets resolved in user space from BTF.
//!
//! rustc emits no CO-RE relocations (aya-rs/aya#349), so a field read through
//! a generated binding would bake in the build host's layout. Instead user
//! space writes the running kernel's offsets into `KERNEL_LAYOUT` before load,
//! and every read is a `bpf_probe_read_kernel` at `base + offset`.

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_jiffies64, bpf_probe_read_kernel, generated::bpf_skc_to_tcp_sock},
};
use monitor_common::{AF_INET, AF_INET6, INFO_KNOWN, INFO_UNKNOWN, KernelLayout, SocketRecord};

use crate::maps::SOCKETS;

/// Offsets of the running kernel, set by the loader (a read-only global, so
/// the verifier sees them as constants).
#[unsafe(no_mangle)]
pub(crate) static KERNEL_LAYOUT: KernelLayout = KernelLayout {
    skc_family: 0,
    skc_state: 0,
    inet_sport: 0,
    skc_dport: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    sk_flags: 0,
    keepalive_timer: 0,
    keepopen_bit: 0,
    lsndtime: 0,
    rcv_tstamp: 0,
    lrcvtime: 0,
    probes_out: 0,
    keepalive_time: 0,
    keepalive_intvl: 0,
    keepalive_probes: 0,
    net_inum: 0,
    net_keepalive_time: 0,
    net_keepalive_intvl: 0,
    net_keepalive_probes: 0,
    sk_err: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    timer_function: 0,
    skc_num: 0,
    sk_uid: 0,
    socket_sk: 0,
    sk_protocol: 0,
    sk_lock_owned: 0,
    icsk_retransmits: 0,
    total_retrans: 0,
    retrans_stamp: 0,
};

/// `--idle-threshold` in jiffies, the unit of the kernel's own stamps.
#[unsafe(no_mangle)]
static IDLE_THRESHOLD_JIFFIES: u32 = u32::MAX;

/// 1: remember the connections this node opens (`ACTIVE_OPENS`), for the
/// per-destination count of established active opens (NAT port pressure).
/// 0 unless user space exports that count: then no hook pays for it.
#[unsafe(no_mangle)]
static COUNT_OPENED: u32 = 0;

#[inline(always)]
pub fn count_opened() -> bool {
    // SAFETY: as in `offset!`.
    unsafe { core::ptr::read_volatile(&raw const COUNT_OPENED) != 0 }
}

/// One member offset of the running kernel.
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: a read of a static; volatile so that the compiler does not
        // fold the placeholder value written above.
        unsafe { core::ptr::read_volatile(&raw const crate::kernel::KERNEL_LAYOUT.$field) }
    };
}
pub(crate) use offset;

#[inline(always)]
pub fn idle_threshold() -> u32 {
    // SAFETY: as in `offset!`.
    unsafe { core::ptr::read_volatile(&raw const IDLE_THRESHOLD_JIFFIES) }
}

/// Reads a `T` at `base + offset` in kernel memory, from any program.
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Result<T, u32> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.map_err(|_| 1)
}

/// How a program reads the sockets it is handed.
///
/// Tracing programs (fentry, tp_btf, iter) get BTF-typed pointers: a plain
/// load through one is checked by the verifier against the kernel's own
/// struct layout and costs one instruction, where `bpf_probe_read_kernel`
/// is a helper call (about 20 ns). Every offset comes from the read-only
/// `KERNEL_LAYOUT`, which the verifier knows as constants. kprobe and raw
/// tracepoint programs get plain numbers and must use the helper.
pub trait Memory {
    /// The `struct tcp_sock` behind a socket pointer, to read through; None
    /// when it is no full TCP socket (a request or timewait socket).
    fn tcp_sock(sk: u64) -> Option<u64>;
    /// Reads a `T` of at most 8 bytes at `base + offset`, where `base` is
    /// what `tcp_sock` returned or a pointer read from it.
    fn read<T: Copy>(base: u64, offset: u32) -> Result<T, u32>;
    /// Reads a member of `struct tcp_sock` beyond its `struct sock`.
    #[inline(always)]
    fn read_tcp<T: Copy>(tp: u64, offset: u32) -> Result<T, u32> {
        Self::read(tp, offset)
    }
    /// Reads an IPv6 address at `base + offset`.
    fn read_addr6(base: u64, offset: u32) -> Result<[u8; 16], u32>;
}

/// BTF-typed pointers (fentry, tp_btf, iter): plain loads.
pub enum Typed {}

impl Memory for Typed {
    #[inline(always)]
    fn tcp_sock(sk: u64) -> Option<u64> {
        // SAFETY: the helper checks that `sk` is a socket of any kind and
        // returns NULL unless it is a full TCP one.
        let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) };
        (!tp.is_null()).then_some(tp as u64)
    }

    #[inline(always)]
    fn read<T: Copy>(base: u64, offset: u32) -> Result<T, u32> {
        // SAFETY: `base` is a BTF pointer: the verifier checks the access
        // against the struct's layout and turns it into a load that cannot
        // fault (zero on a bad address).
        Ok(unsafe { core::ptr::read_volatile((base + offset as u64) as *const T) })
    }

    #[inline(always)]
    fn read_addr6(base: u64, offset: u32) -> Result<[u8; 16], u32> {
        let high: u64 = Self::read(base, offset)?;
        let low: u64 = Self::read(base, offset + 8)?;
        let mut address = [0; 16];
        address[..8].copy_from_slice(&high.to_ne_bytes());
        address[8..].copy_from_slice(&low.to_ne_bytes());
        Ok(address)
    }
}

/// A `struct sock` pointer the verifier types but does not trust (the walk
/// by file descriptor's `socket->sk`), which `bpf_skc_to_tcp_sock` refuses:
/// plain loads within `struct sock`, `bpf_probe_read_kernel` beyond. Plain
/// loads let the CPU wait for several cache misses at once, where each
/// helper call waits for its own: a walk of 200,000 sockets read entirely
/// through the helper cost twice an `iter/tcp` walk.
pub enum SockTyped {}

impl Memory for SockTyped {
    #[inline(always)]
    fn tcp_sock(sk: u64) -> Option<u64> {
        Some(sk)
    }

    #[inline(always)]
    fn read<T: Copy>(base: u64, offset: u32) -> Result<T, u32> {
        Typed::read(base, offset)
    }

    #[inline(always)]
    fn read_tcp<T: Copy>(tp: u64, offset: u32) -> Result<T, u32> {
        read(tp, offset)
    }

    #[inline(always)]
    fn read_addr6(base: u64, offset: u32) -> Result<[u8; 16], u32> {
        Typed::read_addr6(base, offset)
    }
}

/// Untyped addresses (kprobe, raw_tp, classic tracepoints): `bpf_probe_read_kernel`.
pub enum Untyped {}

impl Memory for Untyped {
    #[inline(always)]
    fn tcp_sock(sk: u64) -> Option<u64> {
        // The hooks that use this only ever see full sockets.
        Some(sk)
    }

    #[inline(always)]
    fn read<T: Copy>(base: u64, offset: u32) -> Result<T, u32> {
        read(base, offset)
    }

    #[inline(always)]
    fn read_addr6(base: u64, offset: u32) -> Result<[u8; 16], u32> {
        read(base, offset)
    }
}

/// The kernel's 32-bit jiffies clock (`tcp_jiffies32`), in which TCP keeps
/// its stamps.
#[inline(always)]
pub fn jiffies32() -> u32 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() as u32 }
}

/// Jiffies from the later of the socket's last send and last receive until
/// `now`, the same clock `ss -tnoi` reads for lastsnd and lastrcv.
#[inline(always)]
pub fn idle_for<M: Memory>(tp: u64, now: u32) -> Result<u32, u32> {
    let last_send: u32 = M::read_tcp(tp, offset!(lsndtime))?;
    let last_recv: u32 = M::read_tcp(tp, offset!(lrcvtime))?;
    let since_send = now.wrapping_sub(last_send);
    let since_recv = now.wrapping_sub(last_recv);
    Ok(if since_send < since_recv {
        since_send
    } else {
        since_recv
    })
}

/// How much of a socket `snapshot` reads. Each field is a cache line of a
/// socket the walk would not touch otherwise: a walk reads what it needs.
#[derive(Clone, Copy)]
pub enum Depth {
    /// An event: everything.
    Event,
    /// A walk of ESTABLISHED sockets. The per-socket keepalive settings
    /// (two cache lines) decide nothing while SO_KEEPALIVE is off, so they
    /// are read then only when `every_field` (a walk for /sockets).
    Walk { every_field: bool },
}

/// Reads what the kernel knows about a full TCP socket (`tp`, as
/// `M::tcp_sock` returned it): every field but `uid` and `info` (see
/// `recorded`), so that a reused buffer carries nothing over from the
/// previous socket.
#[inline(always)]
pub fn snapshot<M: Memory>(tp: u64, record: &mut SocketRecord, depth: Depth) -> Result<(), u32> {
    record.sock = tp;
    record.state = M::read(tp, offset!(skc_state))?;
    record.family = M::read(tp, offset!(skc_family))?;
    record.local_port = match depth {
        // Closing a socket zeroes skc_num before an active reset is sent,
        // and the event must still name the port.
        Depth::Event => u16::from_be(M::read(tp, offset!(inet_sport))?),
        Depth::Walk { .. } => M::read(tp, offset!(skc_num))?,
    };
    record.remote_port = u16::from_be(M::read(tp, offset!(skc_dport))?);
    if record.family == AF_INET {
        let local: u32 = M::read(tp, offset!(skc_rcv_saddr))?;
        let remote: u32 = M::read(tp, offset!(skc_daddr))?;
        zero(&mut record.local_addr);
        zero(&mut record.remote_addr);
        record.local_addr[..4].copy_from_slice(&local.to_ne_bytes());
        record.remote_addr[..4].copy_from_slice(&remote.to_ne_bytes());
    } else if record.family == AF_INET6 {
        record.local_addr = M::read_addr6(tp, offset!(skc_v6_rcv_saddr))?;
        record.remote_addr = M::read_addr6(tp, offset!(skc_v6_daddr))?;
    } else {
        zero(&mut record.local_addr);
        zero(&mut record.remote_addr);
    }

    let now = jiffies32();
    record.last_send_age = now.wrapping_sub(M::read_tcp(tp, offset!(lsndtime))?);
    record.last_recv_age = now.wrapping_sub(M::read_tcp(tp, offset!(lrcvtime))?);
    record.last_ack_age = now.wrapping_sub(M::read_tcp(tp, offset!(rcv_tstamp))?);

    let flags: u64 = M::read(tp, offset!(sk_flags))?;
    record.keepalive_enabled = ((flags >> offset!(keepopen_bit)) & 1) as u8;
    if record.keepalive_enabled != 0 || !matches!(depth, Depth::Walk { every_field: false }) {
        record.keepalive_time = M::read_tcp(tp, offset!(keepalive_time))?;
        record.keepalive_intvl = M::read_tcp(tp, offset!(keepalive_intvl))?;
        record.keepalive_probes = M::read_tcp(tp, offset!(keepalive_probes))?;
    } else {
        record.keepalive_time = 0;
        record.keepalive_intvl = 0;
        record.keepalive_probes = 0;
    }
    record.probes_out = M::read_tcp(tp, offset!(probes_out))?;
    // Beside probes_out: the same cache line.
    record.retransmits = M::read_tcp(tp, offset!(icsk_retransmits))?;

    let net: u64 = M::read(tp, offset!(skc_net))?;
    record.netns = M::read(net, offset!(net_inum))?;
    record.ns_keepalive_time = M::read(net, offset!(net_keepalive_time))?;
    record.ns_keepalive_intvl = M::read(net, offset!(net_keepalive_intvl))?;
    record.ns_keepalive_probes = M::read(net, offset!(net_keepalive_probes))?;
    Ok(())
}

/// Adds what the hooks recorded for the socket (`info`), when anything.
#[inline(always)]
pub fn recorded(tp: u64, record: &mut SocketRecord) {
    match SOCKETS.get_ptr(tp) {
        Some(info) => {
            // SAFETY: a valid map value, copied out at once; the two never
            // overlap, which spares the copy a call to `memmove`.
            unsafe { core::ptr::copy_nonoverlapping(info, &mut record.info, 1) };
            record.info_known = INFO_KNOWN;
            record.retransmitting_since_reuse = 0;
            // A stall that began with the send after idle: no ACK since it.
            // `icsk_retransmits` counts RTOs since the last ACK of new data.
            if record.retransmits != 0 && record.info.reuse_at != 0 {
                let acked_at = jiffies32().wrapping_sub(record.last_ack_age);
                if record.info.reuse_at.wrapping_sub(acked_at) as i32 >= 0 {
                    record.retransmitting_since_reuse = 1;
                }
            }
        }
        None => forget_recorded(record),
    }
}

/// Clears `info`: nothing recorded, or not looked up.
#[inline(always)]
pub fn forget_recorded(record: &mut SocketRecord) {
    zero(&mut record.info);
    record.info_known = INFO_UNKNOWN;
    record.retransmitting_since_reuse = 0;
}

/// Zeroes a value of a multiple of 4 bytes with plain stores: LLVM turns
/// ordinary zeroing into a call to `memset`, which in BPF is a byte loop.
#[inline(always)]
fn zero<T>(value: &mut T) {
    const { assert!(size_of::<T>().is_multiple_of(4)) };
    let words = (value as *mut T).cast::<u32>();
    for word in 0..size_of::<T>() / 4 {
        // SAFETY: within `value`, whose size is a whole number of words;
        // BPF allows unaligned stores to stack and map memory on x86 and arm64.
        unsafe { core::ptr::write_volatile(words.add(word), 0) };
    }
}
