//! Maps shared by the hook families.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use monitor_common::{SocketInfo, counter};

/// What the hooks remember per socket, keyed by its kernel address. User
/// space sizes it from `--max-sockets` before load.
#[map]
pub static SOCKETS: HashMap<u64, SocketInfo> = HashMap::with_max_entries(131_072, 0);

/// The ESTABLISHED connections this node opened (active opens), keyed by
/// socket address: added when a connect succeeds, removed when the socket
/// becomes CLOSE (the kernel destroys no socket it opened before that:
/// `inet_csk_destroy_sock()` warns unless the state is TCP_CLOSE, which
/// `tcp_set_state()` sets, firing the state hook), read by the walks.
/// Not removed at `tcp_destroy_sock`: a second delete per socket, a miss for
/// every socket but these, cost 70 ns per run of the destroy hook. Only while `COUNT_OPENED` is set. User
/// space sizes it like `SOCKETS`; a full map is counted in
/// `SOCKET_TABLE_FULL` (the connection then goes uncounted).
#[map]
pub static ACTIVE_OPENS: HashMap<u64, u8> = HashMap::with_max_entries(131_072, 0);

/// Event counters, per CPU so that the hot path never contends; user space
/// sums them when scraped.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// Which process the send hook last recorded as a socket's user, in a slot
/// chosen by the socket's address. A send by that same process on that same
/// socket then skips the `SOCKETS` lookup, which was half of the send hook's
/// cost (130 of 280 ns per run, sockperf ping-pong, tp_btf). A slot only
/// ever names a socket whose `SOCKETS` entry has that owner: `forget` clears
/// it before the socket's memory can be reused, and a colliding socket
/// simply takes the slot over (its sends then take the lookup again).
#[map]
static OWNERS_SEEN: Array<OwnerSeen> = Array::with_max_entries(OWNERS_SEEN_SLOTS, 0);

/// A power of two: 128 KiB, room for the busy sockets of a large node.
const OWNERS_SEEN_SLOTS: u32 = 1 << OWNERS_SEEN_BITS;
const OWNERS_SEEN_BITS: u32 = 13;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct OwnerSeen {
    sock: u64,
    tgid: u32,
    _pad: u32,
}
const _: () = assert!(size_of::<OwnerSeen>() == 16);

/// One word per CPU, through which `SeenSlot::of` reads a pointer as a number.
#[map]
static POINTER_SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A pointer the verifier types (a `sock_ops` context's `sk`), as a plain
/// number for `bpf_probe_read_kernel` reads at offsets: the verifier allows
/// no arithmetic on socket pointers, but a word read back from map memory
/// is a number (storing a pointer in a map needs CAP_PERFMON).
#[inline(always)]
pub fn pointer_as_number<T>(pointer: *mut T) -> Option<u64> {
    let word = POINTER_SCRATCH.get_ptr_mut(0)?;
    // A program in an interrupt on this CPU may write the word between our
    // store and load (as in `SeenSlot::of`): the second load catches that.
    for _ in 0..2 {
        // SAFETY: this CPU's word; volatile, so that the loads stay loads.
        let number = unsafe {
            core::ptr::write_volatile(word.cast::<*mut T>(), pointer);
            core::ptr::read_volatile(word)
        };
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(word.cast::<*mut T>()) } == pointer {
            return Some(number);
        }
    }
    None
}

/// A socket's slot of `OWNERS_SEEN`.
pub struct SeenSlot(*mut OwnerSeen);

impl SeenSlot {
    /// The slot of `sk` (a plain array: the lookup is inlined).
    ///
    /// Tracing programs get socket pointers that the verifier types from BTF
    /// and allows no arithmetic on (a hash of one is refused); a word read
    /// back from map memory is a plain number, the same one kprobes get.
    /// Storing a pointer in a map needs CAP_PERFMON, which idlemon has.
    #[inline(always)]
    pub fn of(sk: u64) -> Option<Self> {
        let word = POINTER_SCRATCH.get_ptr_mut(0)?;
        // A program in an interrupt on this CPU may write the word between
        // our store and load: reading it once more after hashing catches
        // that (the compiler cannot turn `number` back into the pointer, as
        // it would after comparing the two), and a second try all but surely
        // runs undisturbed.
        for _ in 0..2 {
            // SAFETY: this CPU's word. Volatile, so that the compiler neither
            // forwards the store to the loads nor merges the loads.
            let number = unsafe {
                core::ptr::write_volatile(word, sk);
                core::ptr::read_volatile(word)
            };
            // Sockets are cache-line aligned slab objects: the bits above the
            // line offset, spread by a multiplicative (Fibonacci) hash.
            let index = ((number >> 6) as u32).wrapping_mul(0x9E37_79B1) >> (32 - OWNERS_SEEN_BITS);
            // SAFETY: as above.
            if unsafe { core::ptr::read_volatile(word) } == sk {
                return OWNERS_SEEN.get_ptr_mut(index).map(Self);
            }
        }
        None
    }

    /// Whether the send hook already recorded `tgid` as the user of `sk`.
    #[inline(always)]
    pub fn holds(&self, sk: u64, tgid: u32) -> bool {
        // SAFETY: a valid map value. Two CPUs writing one slot at once can
        // leave one's socket with the other's process: that socket's owner
        // then stays the previous one until its next change of user, the
        // same precision as the unsynchronised owner fields themselves.
        unsafe { (*self.0).sock == sk && (*self.0).tgid == tgid }
    }

    /// Notes that `SOCKETS` holds `tgid` as the user of `sk`.
    #[inline(always)]
    pub fn note(&self, sk: u64, tgid: u32) {
        // SAFETY: a valid map value.
        unsafe {
            *self.0 = OwnerSeen {
                sock: sk,
                tgid,
                _pad: 0,
            }
        };
    }
}

/// Removes a socket from the table, counting the removal, and from
/// `OWNERS_SEEN`, so that a socket allocated at the same address later is
/// recorded afresh.
#[inline(always)]
pub fn forget(sk: u64) {
    if let Some(seen) = SeenSlot::of(sk) {
        // SAFETY: a valid map value. No send runs on a socket being
        // destroyed, so nothing refills the slot with it afterwards.
        unsafe {
            if (*seen.0).sock == sk {
                (*seen.0).sock = 0;
            }
        }
    }
    if SOCKETS.remove(sk).is_ok() {
        count(counter::SOCKET_TABLE_REMOVES, 1);
    }
}

/// Adds to a counter slot of this CPU and returns the slot's new value.
#[inline(always)]
pub fn count(slot: u32, by: u64) -> u64 {
    match COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, and these programs run with preemption off.
        Some(value) => unsafe {
            *value += by;
            *value
        },
        None => 0,
    }
}
