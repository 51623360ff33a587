//! What the kernel says about idlemon's programs and maps: bpftool for the
//! descriptions, the bpf(2) syscall where bpftool would be too slow (counting
//! 200,000 map entries) or could leave the machine changed (run-time stats).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

/// The BPF programs and maps a process holds open, from /proc/PID/fdinfo:
/// exact even when another idlemon (someone's test) has loaded the same
/// programs next to it.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub maps: BTreeSet<u32>,
    pub progs: BTreeSet<u32>,
}

pub fn objects_of(pid: u32) -> anyhow::Result<Objects> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut objects = Objects::default();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let Ok(entry) = entry else { continue };
        // An fd may close between the listing and the read.
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in info.lines() {
            let id = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|rest| rest.trim().parse::<u32>().ok())
            };
            if let Some(id) = id("map_id:") {
                objects.maps.insert(id);
            } else if let Some(id) = id("prog_id:") {
                objects.progs.insert(id);
            }
        }
    }
    Ok(objects)
}

#[derive(Debug, Clone)]
pub struct MapInfo {
    pub id: u32,
    pub name: String,
    pub kind: String,
    pub max_entries: u64,
    pub bytes_memlock: u64,
    pub bytes_value: u64,
}

pub fn maps(ids: &BTreeSet<u32>) -> anyhow::Result<Vec<MapInfo>> {
    let all = bpftool(&["map", "show"])?;
    Ok(array(&all)?
        .iter()
        .filter_map(|map| {
            let id = u32::try_from(map.get("id")?.as_u64()?).ok()?;
            ids.contains(&id).then(|| MapInfo {
                id,
                name: text(map, "name"),
                kind: text(map, "type"),
                max_entries: number(map, "max_entries"),
                bytes_memlock: number(map, "bytes_memlock"),
                bytes_value: number(map, "bytes_value"),
            })
        })
        .collect())
}

#[derive(Debug, Clone)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    pub kind: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// Every loaded program (bpftool omits the run counters while stats are off:
/// they read 0 here then).
pub fn progs() -> anyhow::Result<Vec<ProgInfo>> {
    let all = bpftool(&["prog", "show"])?;
    Ok(array(&all)?
        .iter()
        .filter_map(|prog| {
            Some(ProgInfo {
                id: u32::try_from(prog.get("id")?.as_u64()?).ok()?,
                name: text(prog, "name"),
                kind: text(prog, "type"),
                run_cnt: number(prog, "run_cnt"),
                run_time_ns: number(prog, "run_time_ns"),
            })
        })
        .collect())
}

/// Program counters of one process, by program id.
pub fn prog_stats(ids: &BTreeSet<u32>) -> anyhow::Result<BTreeMap<u32, ProgInfo>> {
    Ok(progs()?
        .into_iter()
        .filter(|prog| ids.contains(&prog.id))
        .map(|prog| (prog.id, prog))
        .collect())
}

fn bpftool(args: &[&str]) -> anyhow::Result<Value> {
    let output = Command::new("bpftool")
        .args(args)
        .arg("--json")
        .output()
        .with_context(|| format!("cannot run bpftool {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "bpftool {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("bpftool {} printed no JSON", args.join(" ")))
}

fn array(value: &Value) -> anyhow::Result<&Vec<Value>> {
    value
        .as_array()
        .ok_or_else(|| anyhow!("bpftool printed something else than a JSON array"))
}

fn text(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn number(value: &Value, key: &str) -> u64 {
    value.get(key).and_then(Value::as_u64).unwrap_or(0)
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
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

/// The `*_GET_FD_BY_ID` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The `enable_stats` member of `union bpf_attr`.
#[repr(C)]
struct EnableStatsAttr {
    kind: u32,
}

/// bpf(2). The kernel reads `size_of::<T>()` bytes and treats the rest of
/// its union as zero.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, properly laid-out bpf_attr member of the
    // given size; the kernel writes only within it (and through the
    // pointers it carries, which the caller sized).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd_from(ret: libc::c_long) -> anyhow::Result<OwnedFd> {
    let fd = i32::try_from(ret).context("bpf(2) returned an impossible fd")?;
    // SAFETY: the kernel just handed us this fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Entries of a hash map, and how many of them hold `owner_tgid` as the u32
/// at byte offset 8 of the value (idlemon's `SocketInfo::owner_tgid`).
/// Batched lookups walk the map bucket by bucket, so entries that come and go
/// during the count (churn) cannot make it loop or restart.
pub fn count_entries(map: &MapInfo, owner_tgid: u32) -> anyhow::Result<(usize, usize)> {
    const CHUNK: usize = 8192;
    let mut by_id = GetFdByIdAttr {
        id: map.id,
        ..GetFdByIdAttr::default()
    };
    let fd = fd_from(
        bpf(BPF_MAP_GET_FD_BY_ID, &mut by_id)
            .with_context(|| format!("cannot open map {} (id {})", map.name, map.id))?,
    )?;
    let value_size = usize::try_from(map.bytes_value).context("value size")?;
    let mut keys = vec![0u64; CHUNK];
    let mut values = vec![0u8; CHUNK * value_size];
    // The batch cursor of a hash map is a bucket index (u32); u64 leaves room.
    let mut cursor_in = 0u64;
    let mut cursor_out = 0u64;
    let mut first = true;
    let (mut total, mut owned) = (0, 0);
    let raw_fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).context("fd")?;
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
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match result {
            Ok(_) => false,
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => true,
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot read map {} (id {})", map.name, map.id));
            }
        };
        let got = usize::try_from(attr.count).context("count")?;
        total += got;
        if value_size >= 12 {
            owned += values
                .chunks_exact(value_size)
                .take(got)
                .filter(|value| value[8..12] == owner_tgid.to_ne_bytes())
                .count();
        }
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
        let mut attr = EnableStatsAttr {
            kind: BPF_STATS_RUN_TIME,
        };
        match bpf(BPF_ENABLE_STATS, &mut attr) {
            Ok(fd) => Ok(Self {
                _fd: Some(fd_from(fd)?),
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
