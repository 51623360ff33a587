//! Programs that do nothing (`r0 = 0; exit`), which the bench loads beside
//! idlemon's: what the kernel charges for running any program at all on a
//! hook, or for walking its sockets, before one instruction of idlemon's
//! runs. A figure over its floor is what idlemon's own code costs; a target
//! below the floor is out of reach of every program on that hook.
//!
//! They live in an object of their own, not in monitor-ebpf, so that the
//! daemon's object holds only what the daemon attaches.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    macros::{btf_tracepoint, fentry},
    programs::{BtfTracePointContext, FEntryContext},
};

/// Beside idlemon's receive hook (tp_btf `tcp_probe`; the bench names the
/// tracepoint at load time), under the BPF run-time stats: its ns/run is
/// what the stats' own clock reads add to every run.
#[btf_tracepoint(function = "tcp_probe")]
pub fn noop_tp_btf(_ctx: BtfTracePointContext) -> u32 {
    0
}

/// The vm part's F side: on each kernel function where idlemon's
/// per-packet hooks attach by fentry (`tcp_sendmsg`, `tcp_rcv_established`;
/// the bench names the function at load time), the floor of any fentry
/// program there: the trampoline and the call. This host's kernel refuses
/// fentry; the VMs' kernels (6.1, 6.12) allow it.
#[fentry(function = "tcp_sendmsg")]
pub fn noop_fentry(_ctx: FEntryContext) -> u32 {
    0
}

/// A walk of every TCP socket of the reading thread's network namespace:
/// the kernel's part of every idlemon walk (`iter/tcp`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn noop_iter_tcp(_ctx: *mut c_void) -> i32 {
    0
}

/// A walk of every open file of every process (`iter/task_file`): what a
/// walk by file descriptor costs the kernel.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn noop_task_file(_ctx: *mut c_void) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Iterator and tp_btf programs may call GPL-only helpers; the kernel wants
/// a GPL-compatible licence from every tracing program's object.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
