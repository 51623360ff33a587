//! idlemon's kernel programs. Each file holds one hook family; user space
//! picks, per hook, the first attach kind this kernel accepts (see
//! `monitor/src/probes.rs`), so every family offers several entry points that
//! share one body.
#![no_std]
#![no_main]

mod death;
mod enforce;
mod events;
mod iterator;
mod keepalive;
mod kernel;
mod maps;
mod receive;
mod reset;
mod send;
mod state;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The helpers these programs call (`bpf_probe_read_kernel` above all) are
/// GPL-only: the kernel refuses the object without a GPL-compatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
