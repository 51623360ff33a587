//! What else the machine does meanwhile. On 2 CPUs, one busy process
//! elsewhere (someone's build, test or VM) moves a loopback benchmark far
//! more than idlemon does, so the bench measures it and says so.

use std::{fs, time::Duration};

/// CPU counters at one moment: the whole machine's, and the bench's own
/// (itself and its descendants: idlemon, iperf3).
#[derive(Debug, Default, Clone, Copy)]
pub struct Others {
    /// user + nice + system + steal ticks of every CPU, from /proc/stat.
    /// Counting the machine rather than other processes catches those that
    /// start and exit within a window (a qemu boot, a compiler job).
    /// irq and softirq are left out: on loopback they are mostly the
    /// bench's own packets.
    busy: u64,
    /// utime + stime of the bench's process tree.
    ours: u64,
}

impl Others {
    pub fn now() -> Self {
        Self {
            busy: machine_busy().unwrap_or(0),
            ours: our_ticks(),
        }
    }

    /// CPU the rest of the machine used since `earlier`, in cores (1.0 = one
    /// core busy for the whole of `wall`).
    pub fn since(&self, earlier: &Self, wall: Duration) -> f64 {
        let busy = self.busy.saturating_sub(earlier.busy);
        let ours = self.ours.saturating_sub(earlier.ours);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        busy.saturating_sub(ours) as f64 / hz / wall.as_secs_f64().max(1e-9)
    }
}

fn machine_busy() -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let get = |index: usize| fields.get(index).copied().unwrap_or(0);
    Some(get(0) + get(1) + get(2) + get(7))
}

/// utime + stime of this process (its threads, live and exited, included)
/// and of its live descendants.
fn our_ticks() -> u64 {
    let me = std::process::id();
    // (pid, ppid, ticks) of every process.
    let mut all: Vec<(u32, u32, u64)> = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state (3 in proc(5)), ppid (4), ..., utime (14),
        // stime (15).
        let get = |index: usize| fields.get(index).and_then(|f| f.parse::<u64>().ok());
        if let (Some(ppid), Some(utime), Some(stime)) = (get(1), get(11), get(12)) {
            all.push((pid, u32::try_from(ppid).unwrap_or(0), utime + stime));
        }
    }
    let parent = |pid: u32| all.iter().find(|(p, _, _)| *p == pid).map(|(_, pp, _)| *pp);
    let ours = |mut pid: u32| {
        // Bounded: no pid chain is longer than the process count.
        for _ in 0..=all.len() {
            if pid == me {
                return true;
            }
            match parent(pid) {
                Some(ppid) if ppid != 0 && ppid != pid => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    all.iter()
        .filter(|(pid, _, _)| ours(*pid))
        .map(|(_, _, ticks)| ticks)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_machine_and_the_bench() {
        let now = Others::now();
        assert!(now.busy > 0);
        assert!(now.ours <= now.busy);
        assert!(now.since(&now, Duration::from_secs(1)) == 0.0);
    }
}
