//! Programs that do nothing (`r0 = 0; exit`), loaded by the bench itself
//! with bpf(2): what the kernel charges for running any program at all on a
//! hook, or for walking its sockets, before one instruction of idlemon's
//! runs. A figure over its floor is what idlemon's own code costs; a target
//! below the floor is out of reach of every program on that hook.
//!
//! std only: the vm part's guest driver, which plain rustc builds, includes
//! this file by path (as it does `ping_pong.rs`).

use std::{
    ffi::{c_int, c_long},
    fs::{self, File},
    io::{self, ErrorKind, Read as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

const BPF_PROG_LOAD: c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: c_long = 17;
const BPF_LINK_CREATE: c_long = 28;
const BPF_ITER_CREATE: c_long = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;
const BPF_TRACE_FENTRY: u32 = 24;
const BPF_TRACE_ITER: u32 = 28;
#[cfg(target_arch = "x86_64")]
const SYS_BPF: c_long = 321;
#[cfg(target_arch = "aarch64")]
const SYS_BPF: c_long = 280;
/// `CLOCK_THREAD_CPUTIME_ID`.
const THREAD_CPU_CLOCK: c_int = 3;

/// BTF kinds (`BTF_KIND_*`) that the no-op programs attach by.
const BTF_KIND_TYPEDEF: u32 = 8;
const BTF_KIND_FUNC: u32 = 12;

/// Reads of one no-op walk, at most: a read that visited a million objects
/// without output returns EAGAIN and the next one goes on.
const MAX_WALK_READS: usize = 1000;

// std only: the two libc calls std lacks.
unsafe extern "C" {
    fn syscall(number: c_long, ...) -> c_long;
    fn clock_gettime(clock: c_int, now: *mut [i64; 2]) -> c_int;
}

/// Where a no-op program goes.
#[derive(Clone, Copy, Debug)]
pub enum Hook<'a> {
    /// tp_btf on a tracepoint, e.g. `tcp_probe`.
    TpBtf(&'a str),
    /// fentry on a kernel function, e.g. `tcp_sendmsg`.
    Fentry(&'a str),
}

impl std::fmt::Display for Hook<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TpBtf(tracepoint) => write!(f, "tp_btf/{tracepoint}"),
            Self::Fentry(function) => write!(f, "fentry/{function}"),
        }
    }
}

/// The running kernel's BTF (`/sys/kernel/btf/vmlinux`), read once for all
/// the programs of a part.
pub struct KernelBtf(Vec<u8>);

impl KernelBtf {
    pub fn load() -> io::Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        fs::read(path)
            .map(Self)
            .map_err(|error| io::Error::new(error.kind(), format!("cannot read {path}: {error}")))
    }

    /// The id of the type of this kind and name.
    fn id(&self, name: &str, kind: u32) -> io::Result<u32> {
        btf_id(&self.0, name, kind).ok_or_else(|| {
            io::Error::new(
                ErrorKind::NotFound,
                format!("the kernel's BTF has no type {name} of kind {kind}"),
            )
        })
    }
}

/// Finds a type by kind and name in raw BTF: the header, then the types
/// one after the other (ids from 1), each 12 bytes and what its kind adds.
fn btf_id(btf: &[u8], name: &str, kind: u32) -> Option<u32> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(btf.get(at..at + 4)?.try_into().ok()?))
    };
    if btf.get(0..2)? != [0x9f, 0xeb] {
        return None;
    }
    let header = u32_at(4)? as usize;
    let types = header + u32_at(8)? as usize;
    let types_end = types + u32_at(12)? as usize;
    let strings = header + u32_at(16)? as usize;
    let (mut at, mut id) = (types, 1u32);
    while at + 12 <= types_end {
        let (name_off, info) = (u32_at(at)? as usize, u32_at(at + 4)?);
        let (this_kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        if this_kind == kind {
            let start = strings + name_off;
            let text = btf.get(start..start + name.len() + 1)?;
            if &text[..name.len()] == name.as_bytes() && text[name.len()] == 0 {
                return Some(id);
            }
        }
        at += 12
            + match this_kind {
                // INT, VAR, DECL_TAG
                1 | 14 | 17 => 4,
                // ARRAY
                3 => 12,
                // STRUCT, UNION, DATASEC, ENUM64
                4 | 5 | 15 | 19 => 12 * vlen,
                // ENUM, FUNC_PROTO
                6 | 13 => 8 * vlen,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                2 | 7..=12 | 16 | 18 => 0,
                _ => return None,
            };
        id += 1;
    }
    None
}

/// A no-op program, attached for as long as this lives.
pub struct NoopProgram {
    pub id: u32,
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl NoopProgram {
    pub fn attach(btf: &KernelBtf, hook: Hook<'_>) -> io::Result<Self> {
        let (attach_type, btf_id) = match hook {
            Hook::TpBtf(tracepoint) => (
                BPF_TRACE_RAW_TP,
                btf.id(&format!("btf_trace_{tracepoint}"), BTF_KIND_TYPEDEF)?,
            ),
            Hook::Fentry(function) => (BPF_TRACE_FENTRY, btf.id(function, BTF_KIND_FUNC)?),
        };
        let prog = load(attach_type, btf_id, &hook.to_string())?;
        // Without a name, RAW_TRACEPOINT_OPEN attaches a tracing program
        // where it was loaded for: the tracepoint, or the function's
        // trampoline.
        let mut open = RawTracepointAttr {
            prog_fd: prog.as_raw_fd() as u32,
            ..RawTracepointAttr::default()
        };
        let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open)
            .map_err(|error| context(error, &format!("cannot attach a no-op program to {hook}")))?;
        // struct bpf_prog_info begins with type and id.
        let mut info = [0u32; 2];
        let mut get = InfoAttr {
            bpf_fd: prog.as_raw_fd() as u32,
            info_len: size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        bpf_call(BPF_OBJ_GET_INFO_BY_FD, &mut get)
            .map_err(|error| context(error, "cannot read the no-op program's id"))?;
        Ok(Self {
            id: info[1],
            _link: link,
            _prog: prog,
        })
    }
}

/// One pass of a no-op `iter/{target}` program (`tcp`: every TCP socket of
/// the calling thread's network namespace; `task_file`: every open file of
/// every process) and the thread CPU time it took, all of it the kernel's
/// own work of visiting the objects.
pub fn walk(btf: &KernelBtf, target: &str) -> io::Result<Duration> {
    let what = format!("iter/{target}");
    let prog = load(
        BPF_TRACE_ITER,
        btf.id(&format!("bpf_iter_{target}"), BTF_KIND_FUNC)?,
        &what,
    )?;
    let mut create = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_TRACE_ITER,
        ..LinkCreateAttr::default()
    };
    let link = bpf(BPF_LINK_CREATE, &mut create)
        .map_err(|error| context(error, &format!("cannot link {what}")))?;
    let mut open = IterCreateAttr {
        link_fd: link.as_raw_fd() as u32,
        flags: 0,
    };
    let mut iterator = File::from(
        bpf(BPF_ITER_CREATE, &mut open)
            .map_err(|error| context(error, &format!("cannot create an {what} iterator")))?,
    );
    let started = thread_cpu_time();
    let mut buffer = [0u8; 4096];
    for _ in 0..MAX_WALK_READS {
        match iterator.read(&mut buffer) {
            Ok(0) => return Ok(thread_cpu_time().saturating_sub(started)),
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::WouldBlock => {}
            Err(error) => return Err(context(error, &format!("reading {what}"))),
        }
    }
    Err(io::Error::other(format!(
        "{what} did not end after {MAX_WALK_READS} reads"
    )))
}

fn load(attach_type: u32, btf_id: u32, what: &str) -> io::Result<OwnedFd> {
    // mov64 r0, 0; exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"bench_noop");
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: attach_type,
        attach_btf_id: btf_id,
        ..ProgLoadAttr::default()
    };
    bpf(BPF_PROG_LOAD, &mut load)
        .map_err(|error| context(error, &format!("cannot load a no-op program for {what}")))
}

/// bpf(2) with one member of `union bpf_attr`.
fn bpf_call<T>(cmd: c_long, attr: &mut T) -> io::Result<c_long> {
    // SAFETY: attr is a live, properly laid-out bpf_attr member of the
    // given size; the kernel writes only within it (and through the
    // pointers it carries, which the caller sized).
    let ret = unsafe { syscall(SYS_BPF, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// bpf(2) for a command that returns a new fd.
fn bpf<T>(cmd: c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = c_int::try_from(bpf_call(cmd, attr)?)
        .map_err(|_| io::Error::other("bpf(2) returned an impossible fd"))?;
    // SAFETY: the kernel just handed us this fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn context(error: io::Error, what: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

fn thread_cpu_time() -> Duration {
    let mut now = [0i64; 2];
    // SAFETY: a valid clock id and out-pointer to a `struct timespec`.
    unsafe { clock_gettime(THREAD_CPU_CLOCK, &mut now) };
    Duration::new(now[0] as u64, now[1] as u32)
}

/// The `BPF_PROG_LOAD` member of `union bpf_attr`, up to `attach_btf_id`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_prog_fd: u32,
    _pad: u32,
}

/// The `raw_tracepoint` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
    cookie: u64,
}

/// The `link_create` member of `union bpf_attr`, with its `iter_info`.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// The `iter_create` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

/// The `info` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the kernel this runs on: BTF is world-readable, no root needed.
    #[test]
    fn finds_kernel_functions_and_tracepoints_in_btf() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("no /sys/kernel/btf/vmlinux here; skipped");
            return;
        };
        let send = btf.id("tcp_sendmsg", BTF_KIND_FUNC).expect("tcp_sendmsg");
        let probe = btf
            .id("btf_trace_tcp_probe", BTF_KIND_TYPEDEF)
            .expect("btf_trace_tcp_probe");
        assert_ne!(send, probe);
        // A prefix of a name is not the name; a name of another kind is not one.
        assert!(btf.id("tcp_sendms", BTF_KIND_FUNC).is_err());
        assert!(btf.id("tcp_sendmsg", BTF_KIND_TYPEDEF).is_err());
    }

    #[test]
    fn walks_a_hand_made_btf() {
        // Header (24 bytes), then: [1] INT "int" (12 + 4), [2] FUNC "f" (12).
        let mut btf = vec![0x9f, 0xeb, 1, 0];
        let strings = b"\0int\0f\0";
        for word in [24u32, 0, 28, 28, strings.len() as u32] {
            btf.extend(word.to_le_bytes());
        }
        for word in [1u32, 1 << 24, 4, 32, 5, 12 << 24, 0] {
            btf.extend(word.to_le_bytes());
        }
        btf.extend(strings);
        assert_eq!(btf_id(&btf, "f", BTF_KIND_FUNC), Some(2));
        assert_eq!(btf_id(&btf, "int", BTF_KIND_FUNC), None);
        assert_eq!(btf_id(&btf[..20], "f", BTF_KIND_FUNC), None);
    }
}
