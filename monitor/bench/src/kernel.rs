//! What the kernel says about idlemon's programs and maps, through aya:
//! their descriptions, their run-time stats, and the entries of a map.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
    sync::OnceLock,
};

use anyhow::{Context as _, anyhow};
use aya::{
    maps::{MapData, MapType},
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use monitor_common::SocketInfo;

pub use idlemon_testkit::programs::objects_of;

#[derive(Debug, Clone)]
pub struct MapInfo {
    pub id: u32,
    pub name: String,
    /// As bpftool names it: `hash`, `percpu_array`, ...
    pub kind: String,
    pub max_entries: u64,
    pub bytes_memlock: u64,
    pub bytes_value: u64,
}

/// The maps of `ids` that still exist.
pub fn maps(ids: &BTreeSet<u32>) -> anyhow::Result<Vec<MapInfo>> {
    let mut maps = Vec::new();
    for &id in ids {
        let Ok(info) = aya::maps::MapInfo::from_id(id) else {
            continue;
        };
        let fd = info.fd().with_context(|| format!("cannot open map {id}"))?;
        // aya 0.14's MapInfo lacks the memory the kernel charges for the
        // map; the fd's fdinfo has it, as bpftool reads it.
        let fdinfo = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
        let bytes_memlock = fs::read_to_string(&fdinfo)
            .with_context(|| format!("cannot read {fdinfo}"))?
            .lines()
            .find_map(|line| line.strip_prefix("memlock:"))
            .and_then(|value| value.trim().parse().ok())
            .ok_or_else(|| anyhow!("no memlock in {fdinfo}"))?;
        maps.push(MapInfo {
            id,
            name: info.name_as_str().unwrap_or_default().to_owned(),
            kind: info
                .map_type()
                .map_or_else(|_| "unknown".to_owned(), map_kind),
            max_entries: u64::from(info.max_entries()),
            bytes_memlock,
            bytes_value: u64::from(info.value_size()),
        });
    }
    Ok(maps)
}

/// bpftool's name of a map type (`bpf_map_type_name` in its sources).
fn map_kind(kind: MapType) -> String {
    match kind {
        MapType::Hash => "hash",
        MapType::Array => "array",
        MapType::PerCpuArray => "percpu_array",
        MapType::PerCpuHash => "percpu_hash",
        MapType::LruHash => "lru_hash",
        MapType::LruPerCpuHash => "lru_percpu_hash",
        MapType::RingBuf => "ringbuf",
        MapType::PerfEventArray => "perf_event_array",
        MapType::ProgramArray => "prog_array",
        MapType::SkStorage => "sk_storage",
        other => return format!("{other:?}").to_lowercase(),
    }
    .to_owned()
}

#[derive(Debug, Clone)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    /// As bpftool names it: `tracing`, `tracepoint`, `sock_ops`, ...
    pub kind: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// Every loaded program. The run counters only move while run-time stats
/// are on (`RunTimeStats`): only their differences mean anything.
pub fn progs() -> anyhow::Result<Vec<ProgInfo>> {
    let mut progs = Vec::new();
    for info in loaded_programs() {
        // A program unloaded between the listing and the read is gone.
        let Ok(info) = info else { continue };
        let kind = format!("{:?}", info.program_type());
        progs.push(ProgInfo {
            id: info.id(),
            name: whole_name(info.name_as_str().unwrap_or_default()),
            kind: kind
                .strip_prefix("BPF_PROG_TYPE_")
                .unwrap_or(&kind)
                .to_lowercase(),
            run_cnt: info.run_count(),
            run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        });
    }
    Ok(progs)
}

/// The kernel keeps the first 15 bytes of a program's name
/// (`BPF_OBJ_NAME_LEN`); bpftool finds the rest in the program's BTF, which
/// aya 0.14 does not expose. The bench reads the whole names from the
/// kernel object embedded in the daemon's binary instead, once.
static WHOLE_NAMES: OnceLock<Vec<String>> = OnceLock::new();

/// Learns the names of the daemon's programs from its binary.
pub fn learn_program_names(binary: &Path) -> anyhow::Result<()> {
    let bytes = fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let _ = WHOLE_NAMES.set(program_names_in(&bytes));
    Ok(())
}

/// The names of the programs of every BPF object in `bytes` (an ELF file
/// of machine EM_BPF anywhere inside).
fn program_names_in(bytes: &[u8]) -> Vec<String> {
    const EM_BPF: u16 = 247;
    // 64-bit, little-endian ELF.
    const MAGIC: &[u8] = b"\x7fELF\x02\x01";
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(found) = bytes[from..].windows(MAGIC.len()).position(|w| w == MAGIC) {
        let object = &bytes[from + found..];
        from += found + 1;
        if object.get(18..20) != Some(&EM_BPF.to_le_bytes()[..]) {
            continue;
        }
        if let Ok(parsed) = aya_obj::Object::parse(object) {
            names.extend(parsed.programs.into_keys());
        }
    }
    names
}

/// The whole name of a program whose kernel name is `name`, where exactly
/// one of `names` begins with it; `name` otherwise.
fn whole_name_in(name: &str, names: &[String]) -> String {
    const KEPT: usize = 15;
    let mut whole = names
        .iter()
        .filter(|whole| name.len() == KEPT && whole.starts_with(name));
    match (whole.next(), whole.next()) {
        (Some(whole), None) => whole.clone(),
        _ => name.to_owned(),
    }
}

fn whole_name(name: &str) -> String {
    whole_name_in(name, WHOLE_NAMES.get().map_or(&[], Vec::as_slice))
}

/// Program counters of one process, by program id.
pub fn prog_stats(ids: &BTreeSet<u32>) -> anyhow::Result<BTreeMap<u32, ProgInfo>> {
    Ok(progs()?
        .into_iter()
        .filter(|prog| ids.contains(&prog.id))
        .map(|prog| (prog.id, prog))
        .collect())
}

/// `BPF_MAP_LOOKUP_BATCH`, the one command of bpf(2) the bench needs that
/// aya 0.14 does not wrap (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries of `SOCKETS` (key u64, value `SocketInfo`), and how many of them
/// hold `owner_tgid` as `SocketInfo::owner_tgid`. Batched lookups walk the
/// map bucket by bucket, so entries that come and go during the count
/// (churn) cannot make it loop or restart, as a walk by next key would.
pub fn count_entries(map: &MapInfo, owner_tgid: u32) -> anyhow::Result<(usize, usize)> {
    const CHUNK: usize = 8192;
    let value_size = size_of::<SocketInfo>();
    if map.bytes_value != value_size as u64 {
        anyhow::bail!(
            "map {} holds {}-byte values, not SocketInfo ({value_size} bytes): is this idlemon's build?",
            map.name,
            map.bytes_value
        );
    }
    let owner_at = std::mem::offset_of!(SocketInfo, owner_tgid);
    let data = MapData::from_id(map.id)
        .with_context(|| format!("cannot open map {} (id {})", map.name, map.id))?;
    let fd = data.fd().as_fd();
    let mut keys = vec![0u64; CHUNK];
    let mut values = vec![0u8; CHUNK * value_size];
    // The batch cursor of a hash map is a bucket index (u32); u64 leaves room.
    let mut cursor_in = 0u64;
    let mut cursor_out = 0u64;
    let mut first = true;
    let (mut total, mut owned) = (0, 0);
    let raw_fd = u32::try_from(fd.as_raw_fd()).context("fd")?;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut cursor_in) as u64
            },
            out_batch: std::ptr::from_mut(&mut cursor_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(CHUNK).context("chunk")?,
            map_fd: raw_fd,
            ..BatchAttr::default()
        };
        // SAFETY: attr is a live `batch` member of bpf_attr of the size
        // passed; the kernel writes at most `count` keys and values into
        // the buffers it points to, which hold CHUNK of each.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                size_of::<BatchAttr>(),
            )
        };
        let done = if result < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ENOENT) {
                return Err(error)
                    .with_context(|| format!("cannot read map {} (id {})", map.name, map.id));
            }
            true
        } else {
            false
        };
        let got = usize::try_from(attr.count).context("count")?;
        total += got;
        owned += values
            .chunks_exact(value_size)
            .take(got)
            .filter(|value| value[owner_at..owner_at + 4] == owner_tgid.to_ne_bytes())
            .count();
        if done {
            return Ok((total, owned));
        }
        first = false;
        cursor_in = cursor_out;
    }
}

/// Run-time statistics of every BPF program (what `kernel.bpf_stats_enabled`
/// turns on), for as long as this value lives. BPF_ENABLE_STATS ties them to
/// an fd, so a bench killed by SIGKILL cannot leave the sysctl at 1; where
/// the kernel lacks it, the sysctl is set and restored on drop instead.
pub struct RunTimeStats {
    _fd: Option<OwnedFd>,
    restore_sysctl: Option<String>,
    pub how: String,
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl RunTimeStats {
    pub fn enable() -> anyhow::Result<Self> {
        let before = fs::read_to_string(STATS_SYSCTL)
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|_| "?".to_owned());
        match enable_stats(Stats::RunTime) {
            Ok(fd) => Ok(Self {
                _fd: Some(fd),
                restore_sysctl: None,
                how: format!("BPF_ENABLE_STATS; kernel.bpf_stats_enabled stays {before}"),
            }),
            Err(error) => {
                fs::write(STATS_SYSCTL, "1").with_context(|| {
                    format!("BPF_ENABLE_STATS failed ({error}) and cannot set {STATS_SYSCTL}")
                })?;
                Ok(Self {
                    _fd: None,
                    how: format!(
                        "sysctl kernel.bpf_stats_enabled=1 (was {before}, restored after)"
                    ),
                    restore_sysctl: Some(before),
                })
            }
        }
    }
}

impl Drop for RunTimeStats {
    fn drop(&mut self) {
        if let Some(before) = &self.restore_sysctl
            && let Err(error) = fs::write(STATS_SYSCTL, before)
        {
            eprintln!("bench: cannot restore {STATS_SYSCTL} to {before}: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_kinds_read_as_bpftool_prints_them() {
        assert_eq!(map_kind(MapType::PerCpuArray), "percpu_array");
        assert_eq!(map_kind(MapType::LruHash), "lru_hash");
        assert_eq!(map_kind(MapType::RingBuf), "ringbuf");
    }

    #[test]
    fn names_come_whole_from_an_embedded_object() {
        let mut binary = b"\x7fELF\x02\x01 not a BPF object".to_vec();
        binary.extend_from_slice(crate::noop::OBJECT);
        binary.extend_from_slice(b"trailing bytes");
        let names = program_names_in(&binary);
        assert!(
            names.iter().any(|name| name == "noop_task_file"),
            "{names:?}"
        );
        let names = ["keepalive_tp_btf", "reset_sent_tp_btf", "reset_sent_tp_bis"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(whole_name_in("keepalive_tp_bt", &names), "keepalive_tp_btf");
        // Two programs begin alike: the kernel's name stays.
        assert_eq!(whole_name_in("reset_sent_tp_b", &names), "reset_sent_tp_b");
        assert_eq!(whole_name_in("reset_sent_tp_", &names), "reset_sent_tp_");
        assert_eq!(whole_name_in("walk_tcp", &names), "walk_tcp");
    }
}
