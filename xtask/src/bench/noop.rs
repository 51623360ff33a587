//! A program that does nothing (`r0 = 0; exit`) on a kernel function or
//! tracepoint, loaded with bpf(2): the vm part's F side, the floor of any
//! fentry program on the guest's kernel.
//!
//! The bench on this host loads its no-op programs with aya
//! (monitor/bench/src/noop.rs). This copy stays raw because the vm part's
//! guest driver (vm/guest.rs) is built by plain rustc, std only, without
//! aya, and includes this file by path; it holds only what the driver uses.

use std::{
    ffi::{c_int, c_long},
    fs,
    io::{self, ErrorKind},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: c_long = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;
const BPF_TRACE_FENTRY: u32 = 24;
#[cfg(target_arch = "x86_64")]
const SYS_BPF: c_long = 321;
#[cfg(target_arch = "aarch64")]
const SYS_BPF: c_long = 280;

/// BTF kinds (`BTF_KIND_*`) that the no-op programs attach by.
const BTF_KIND_TYPEDEF: u32 = 8;
const BTF_KIND_FUNC: u32 = 12;

// std only: the libc call std lacks.
unsafe extern "C" {
    fn syscall(number: c_long, ...) -> c_long;
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
