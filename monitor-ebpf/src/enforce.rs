//! Keepalive enforcement: turns on (or speeds up) keepalive on new
//! connections whose path has a middlebox idle timeout, so that the
//! middlebox never forgets an idle flow, without a change to the application.
//!
//! A `sock_ops` program, attached by user space to the cgroup v2 directories
//! of the selected workloads (or the root), runs for the sockets of the
//! processes below them. The kernel calls it when a connection becomes
//! established, from `tcp_finish_connect()` (outbound,
//! `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`) and `tcp_init_transfer()` (accepted,
//! `BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`):
//! https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_input.c#L6307
//! At that moment `bpf_setsockopt` may set SO_KEEPALIVE, TCP_KEEPIDLE,
//! TCP_KEEPINTVL and TCP_KEEPCNT (Linux 5.9+), exactly as the application's
//! own setsockopt would; the kernel then keeps the settings with the socket.
//! Nothing is pinned: when idlemon stops, the program goes, and sockets it
//! already fixed keep their settings.

use aya_ebpf::{
    bindings::{bpf_sock_ops, bpf_sockopt},
    cty::c_void,
    helpers::bpf_setsockopt,
    macros::{cgroup_sockopt, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockOpsContext, SockoptContext},
};
use monitor_common::{
    AF_INET, AF_INET6, EnforcePath, EnforceSettings, EnforcedSocket, ExistingSocket,
    KeepaliveDecision, SocketRecord, TCP_ESTABLISHED, counter,
    enforce::{self, reason, weakened},
    event_kind,
};

use crate::{
    events::emit_unhurried,
    kernel::{Depth, Memory as _, Typed, Untyped, recorded, snapshot},
    maps::{count, pointer_as_number},
};

/// The mode, the target settings and the default path, set at load time.
#[unsafe(no_mangle)]
static ENFORCE_SETTINGS: EnforceSettings = EnforceSettings {
    mode: 0,
    passive: 0,
    paths: 0,
    default_timeout_seconds: 0,
    default_timeout_jiffies: 0,
    default_idle_seconds: 0,
    default_idle_jiffies: 0,
    interval_seconds: 0,
    interval_jiffies: 0,
    count: 0,
    override_weakening: 0,
};

/// The config file's path rules in precedence order (most specific CIDR
/// first, then file order), as user space's `PathConfig` matches them.
#[map]
static ENFORCE_PATHS: Array<EnforcePath> = Array::with_max_entries(enforce::MAX_PATHS, 0);

const ACTIVE_ESTABLISHED: u32 = 4;
const PASSIVE_ESTABLISHED: u32 = 5;
const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;

macro_rules! setting {
    ($field:ident) => {
        // SAFETY: a read of a static; volatile so that the compiler does not
        // fold the placeholder value written above.
        unsafe { core::ptr::read_volatile(&raw const ENFORCE_SETTINGS.$field) }
    };
}

/// A context field, loaded with its own width (the verifier refuses wider
/// or merged loads of `struct bpf_sock_ops`).
macro_rules! field {
    ($ops:expr, $($field:tt)+) => {
        // SAFETY: `ops` is the program's context.
        unsafe { core::ptr::read_volatile(&raw const (*$ops).$($field)+) }
    };
}

#[sock_ops]
pub fn enforce_keepalive(ctx: SockOpsContext) -> u32 {
    match try_enforce(ctx.ops) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

/// The path a destination takes, as the config decided it.
struct Path {
    timeout_seconds: u32,
    timeout_jiffies: u32,
    idle_seconds: u32,
    idle_jiffies: u32,
}

fn try_enforce(ops: *mut bpf_sock_ops) -> Result<u32, u32> {
    let op = field!(ops, op);
    let passive = op == PASSIVE_ESTABLISHED;
    if op != ACTIVE_ESTABLISHED && !(passive && setting!(passive) != 0) {
        return Ok(1);
    }
    let family = field!(ops, family);
    let address = if family == u32::from(AF_INET) {
        [field!(ops, remote_ip4), 0, 0, 0]
    } else if family == u32::from(AF_INET6) {
        [
            field!(ops, remote_ip6[0]),
            field!(ops, remote_ip6[1]),
            field!(ops, remote_ip6[2]),
            field!(ops, remote_ip6[3]),
        ]
    } else {
        return Ok(1);
    };
    // `remote_port` holds the port in network order in its upper half on
    // little-endian kernels (`sock_ops_convert_ctx_access`).
    let port = u16::from_be((field!(ops, remote_port) >> 16) as u16);
    let Some(path) = destination(address, family == u32::from(AF_INET6), port) else {
        return Ok(1);
    };

    // The socket as it was, for the decision and for the audit event.
    let sk = field!(ops, __bindgen_anon_2.sk);
    let mut before = SocketRecord::default();
    let address = if sk.is_null() {
        None
    } else {
        pointer_as_number(sk)
    };
    let readable = address.is_some_and(|sk| {
        let read = snapshot::<Untyped>(sk, &mut before, Depth::Event).is_ok();
        recorded(sk, &mut before);
        read
    });
    let decision = decide_and_apply(
        ops.cast::<c_void>(),
        address.unwrap_or(0),
        &before,
        readable,
        &path,
        u32::from(passive),
    );
    report(before, readable, decision);
    Ok(1)
}

/// Decides from the socket as it was (`before`) and, with `on`, sets the
/// options through `target` (the sock_ops context, or the iterator's socket)
/// and remembers what it set on socket `sk` (its address) in `ENFORCED`.
#[inline(always)]
fn decide_and_apply(
    target: *mut c_void,
    sk: u64,
    before: &SocketRecord,
    readable: bool,
    path: &Path,
    direction: u32,
) -> KeepaliveDecision {
    let mut decision = KeepaliveDecision {
        mode: setting!(mode),
        path_timeout_seconds: path.timeout_seconds,
        passive: direction,
        ..KeepaliveDecision::default()
    };
    // What the kernel's keepalive timer uses: the socket's own setting,
    // else its namespace's (`keepalive_time_when`, `keepalive_intvl_when`).
    let effective_idle = if before.keepalive_time != 0 {
        before.keepalive_time
    } else {
        before.ns_keepalive_time
    };
    let effective_interval = if before.keepalive_intvl != 0 {
        before.keepalive_intvl
    } else {
        before.ns_keepalive_intvl
    };
    decision.reason = if !readable {
        reason::UNREADABLE
    } else if before.keepalive_enabled == 0 {
        decision.idle_seconds = path.idle_seconds;
        decision.interval_seconds = setting!(interval_seconds);
        decision.count = setting!(count);
        reason::NO_KEEPALIVE
    } else if effective_idle >= path.timeout_jiffies || effective_interval >= path.timeout_jiffies {
        // Only what is slower than the target is lowered; the count, and
        // whatever already beats the target, stay as the application (or
        // the namespace) set them.
        if effective_idle > path.idle_jiffies {
            decision.idle_seconds = path.idle_seconds;
        }
        if effective_interval > setting!(interval_jiffies) {
            decision.interval_seconds = setting!(interval_seconds);
        }
        reason::KEEPALIVE_TOO_SLOW
    } else {
        reason::KEEPALIVE_SUFFICIENT
    };
    let changes =
        decision.reason == reason::NO_KEEPALIVE || decision.reason == reason::KEEPALIVE_TOO_SLOW;
    if decision.mode == enforce::MODE_ON && changes {
        // Timers first, then SO_KEEPALIVE, which arms the timer with them.
        let mut error = 0;
        if decision.idle_seconds != 0 {
            error = set(target, SOL_TCP, TCP_KEEPIDLE, decision.idle_seconds);
        }
        if error == 0 && decision.interval_seconds != 0 {
            error = set(target, SOL_TCP, TCP_KEEPINTVL, decision.interval_seconds);
        }
        if error == 0 && decision.count != 0 {
            error = set(target, SOL_TCP, TCP_KEEPCNT, decision.count);
        }
        if error == 0 && decision.reason == reason::NO_KEEPALIVE {
            error = set(target, SOL_SOCKET, SO_KEEPALIVE, 1);
        }
        if error != 0 {
            decision.reason = reason::FAILED;
            decision.error = error;
        } else if sk != 0 {
            let enforced = EnforcedSocket {
                idle_seconds: path.idle_seconds,
                interval_seconds: setting!(interval_seconds),
                count: setting!(count),
                path_timeout_seconds: path.timeout_seconds,
                local_port: before.local_port,
                remote_port: before.remote_port,
            };
            // An LRU map: a full one forgets the longest-unused socket,
            // whose weakening then goes unseen.
            let _ = ENFORCED.insert(&sk, &enforced, 0);
        }
    }
    decision
}

/// What idlemon set on each socket it enforced, by the socket's address
/// (see `EnforcedSocket`).
#[map]
static ENFORCED: LruHashMap<u64, EnforcedSocket> = LruHashMap::with_max_entries(65_536, 0);

/// An application's own setsockopt on a socket of the selected cgroups,
/// before the kernel applies it (`BPF_CGROUP_SETSOCKOPT`, Linux 5.3+, run
/// by `__sys_setsockopt()` for the socket's cgroup):
/// https://elixir.bootlin.com/linux/v6.1/source/kernel/bpf/cgroup.c#L1759
/// SO_KEEPALIVE off, or TCP_KEEPIDLE above the target, on a socket idlemon
/// enforced (`ENFORCED`) is reported; with `[enforce] override` the value
/// is rewritten to idlemon's, which the kernel then applies instead of the
/// application's. Every other call costs two compares.
#[cgroup_sockopt(setsockopt)]
pub fn enforce_setsockopt(ctx: SockoptContext) -> i32 {
    match try_setsockopt(ctx.sockopt) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_setsockopt(opt: *mut bpf_sockopt) -> Result<i32, i32> {
    let level = field!(opt, level);
    let name = field!(opt, optname);
    let keepalive = level == SOL_SOCKET && name == SO_KEEPALIVE;
    if !keepalive && !(level == SOL_TCP && name == TCP_KEEPIDLE) {
        return Ok(1);
    }
    let start = field!(opt, __bindgen_anon_2.optval);
    let end = field!(opt, __bindgen_anon_3.optval_end);
    if start as usize + size_of::<i32>() > end as usize {
        return Ok(1);
    }
    // SAFETY: checked against `optval_end` just above.
    let asked = unsafe { core::ptr::read_volatile(start.cast::<i32>()) };
    if keepalive && asked != 0 {
        return Ok(1);
    }
    let sk = field!(opt, __bindgen_anon_1.sk);
    let Some(sk) = pointer_as_number(sk) else {
        return Ok(1);
    };
    // SAFETY: a lookup; the value is copied.
    let Some(enforced) = (unsafe { ENFORCED.get(&sk) }).copied() else {
        return Ok(1);
    };
    if !keepalive && asked >= 0 && asked as u32 <= enforced.idle_seconds {
        return Ok(1);
    }
    let mut before = SocketRecord::default();
    if snapshot::<Untyped>(sk, &mut before, Depth::Event).is_err()
        || before.local_port != enforced.local_port
        || before.remote_port != enforced.remote_port
    {
        // Another socket at the address of one that closed.
        let _ = ENFORCED.remove(&sk);
        return Ok(1);
    }
    recorded(sk, &mut before);
    let overridden = setting!(override_weakening) != 0;
    if overridden {
        let kept = if keepalive {
            1
        } else {
            enforced.idle_seconds as i32
        };
        // SAFETY: as the read above.
        unsafe { core::ptr::write_volatile(start.cast::<i32>(), kept) };
    }
    let outcome = if overridden {
        weakened::OVERRIDDEN
    } else {
        weakened::REPORTED
    };
    count(counter::WEAKENED + outcome, 1);
    let _ = emit_unhurried(event_kind::KEEPALIVE_WEAKENED, |event| {
        event.socket = before;
        event.socket_known = 1;
        event.enforcement = KeepaliveDecision {
            reason: if keepalive {
                weakened::KEEPALIVE_OFF
            } else {
                weakened::IDLE_RAISED
            },
            mode: setting!(mode),
            idle_seconds: enforced.idle_seconds,
            interval_seconds: enforced.interval_seconds,
            count: enforced.count,
            path_timeout_seconds: enforced.path_timeout_seconds,
            passive: asked.max(0) as u32,
            error: outcome as i32,
        };
    });
    Ok(1)
}

/// Counts the decision and reports it as an audit event.
#[inline(always)]
fn report(before: SocketRecord, readable: bool, decision: KeepaliveDecision) {
    count(counter::ENFORCEMENTS + decision.reason, 1);
    let _ = emit_unhurried(event_kind::KEEPALIVE_ENFORCED, |event| {
        if readable {
            event.socket = before;
            event.socket_known = 1;
        }
        event.enforcement = decision;
    });
}

#[inline(always)]
fn set(target: *mut c_void, level: i32, name: i32, value: u32) -> i32 {
    let mut value = value as i32;
    // SAFETY: a sock_ops context or a socket, and a 4-byte option value on the stack.
    unsafe {
        bpf_setsockopt(
            target,
            level,
            name,
            (&raw mut value).cast::<c_void>(),
            size_of::<i32>() as i32,
        ) as i32
    }
}

/// The path to `address` (network-order words; IPv4 in the first), or None
/// for loopback and paths without a timeout, which are counted and left.
#[inline(always)]
fn destination(mut address: [u32; 4], ipv6: bool, port: u16) -> Option<Path> {
    let mut ipv4 = !ipv6;
    // A dual-stack socket's IPv4 peer (`::ffff:a.b.c.d`) takes IPv4 rules.
    if ipv6 && address[0] == 0 && address[1] == 0 && address[2] == u32::to_be(0xffff) {
        address = [address[3], 0, 0, 0];
        ipv4 = true;
    }
    let loopback = if ipv4 {
        u32::from_be(address[0]) >> 24 == 127
    } else {
        address[0] == 0 && address[1] == 0 && address[2] == 0 && address[3] == u32::to_be(1)
    };
    if loopback {
        count(counter::ENFORCEMENTS + reason::LOOPBACK, 1);
        return None;
    }
    let path = path_of(&address, ipv4, port);
    if path.timeout_seconds == 0 {
        count(counter::ENFORCEMENTS + reason::NO_TIMEOUT, 1);
        return None;
    }
    Some(path)
}

/// Sockets user space selected for the walk of one network namespace
/// (`enforce_existing`): those of the selected workloads' processes.
#[map]
static EXISTING: HashMap<ExistingSocket, u32> = HashMap::with_max_entries(EXISTING_MAX, 0);
const EXISTING_MAX: u32 = 65_536;

/// Connections that existed before idlemon started: an `iter/tcp` walk of
/// one network namespace (Linux 5.15+ lets such programs call
/// `bpf_setsockopt`; the iterator holds each socket's lock), which decides
/// and sets as `enforce_keepalive` does for the sockets in `EXISTING`:
/// https://elixir.bootlin.com/linux/v6.12/source/net/ipv4/tcp_ipv4.c#L3400
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn enforce_existing(ctx: *mut c_void) -> i32 {
    match try_enforce_existing(ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_enforce_existing(ctx: *mut c_void) -> Result<i32, i32> {
    // SAFETY: `struct bpf_iter__tcp { meta; sk_common; uid }` (iterator.rs).
    let sk = unsafe { *((ctx as *const u64).add(1) as *const *const u8) };
    if sk.is_null() {
        return Ok(0);
    }
    let Some(tp) = Typed::tcp_sock(sk as u64) else {
        return Ok(0);
    };
    let mut before = SocketRecord::default();
    if snapshot::<Typed>(tp, &mut before, Depth::Event).is_err() || before.state != TCP_ESTABLISHED
    {
        return Ok(0);
    }
    let key = ExistingSocket {
        remote_addr: before.remote_addr,
        local_port: before.local_port,
        remote_port: before.remote_port,
        family: before.family,
        _pad: 0,
    };
    // SAFETY: a lookup; the value is not used.
    if unsafe { EXISTING.get(key) }.is_none() {
        return Ok(0);
    }
    recorded(tp, &mut before);
    let word = |index: usize| {
        u32::from_ne_bytes([
            before.remote_addr[index * 4],
            before.remote_addr[index * 4 + 1],
            before.remote_addr[index * 4 + 2],
            before.remote_addr[index * 4 + 3],
        ])
    };
    let address = [word(0), word(1), word(2), word(3)];
    let Some(path) = destination(address, before.family == AF_INET6, before.remote_port) else {
        return Ok(0);
    };
    let decision = decide_and_apply(
        tp as *mut c_void,
        tp,
        &before,
        true,
        &path,
        enforce::EXISTING,
    );
    report(before, true, decision);
    Ok(0)
}

/// The first rule (in precedence order) whose network and ports hold the
/// destination, else the default path.
#[inline(always)]
fn path_of(address: &[u32; 4], ipv4: bool, port: u16) -> Path {
    let family = if ipv4 { AF_INET } else { AF_INET6 };
    let paths = setting!(paths);
    for index in 0..enforce::MAX_PATHS {
        if index >= paths {
            break;
        }
        let Some(rule) = ENFORCE_PATHS.get(index) else {
            break;
        };
        if rule.family != family
            || (address[0] & rule.mask[0]) != rule.addr[0]
            || (address[1] & rule.mask[1]) != rule.addr[1]
            || (address[2] & rule.mask[2]) != rule.addr[2]
            || (address[3] & rule.mask[3]) != rule.addr[3]
        {
            continue;
        }
        let mut port_matches = rule.port_ranges == 0;
        for range in 0..enforce::PORT_RANGES {
            if range as u16 >= rule.port_ranges {
                break;
            }
            let [first, last] = rule.ports[range];
            if first <= port && port <= last {
                port_matches = true;
                break;
            }
        }
        if port_matches {
            return Path {
                timeout_seconds: rule.timeout_seconds,
                timeout_jiffies: rule.timeout_jiffies,
                idle_seconds: rule.idle_seconds,
                idle_jiffies: rule.idle_jiffies,
            };
        }
    }
    Path {
        timeout_seconds: setting!(default_timeout_seconds),
        timeout_jiffies: setting!(default_timeout_jiffies),
        idle_seconds: setting!(default_idle_seconds),
        idle_jiffies: setting!(default_idle_jiffies),
    }
}
