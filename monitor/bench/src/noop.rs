//! The no-op programs of `monitor/bench/ebpf`, loaded with aya: what the
//! kernel charges for running any program at all on a hook, or for walking
//! its sockets, before one instruction of idlemon's runs. The vm part's F
//! side holds one on each function of idlemon's per-packet fentry hooks.

use std::{
    io::{ErrorKind, Read as _},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FEntry, Iter},
};

pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/noop"));

/// Reads of one no-op walk, at most: a read that visited a million objects
/// without output returns EAGAIN and the next one goes on.
const MAX_WALK_READS: usize = 1000;

/// A no-op tp_btf or fentry program, attached for as long as this lives.
pub struct Floor {
    pub id: u32,
    _ebpf: Ebpf,
}

impl Floor {
    /// On a tracepoint by its BTF name, e.g. `tcp_probe` (idlemon's receive hook).
    pub fn attach(tracepoint: &str) -> anyhow::Result<Self> {
        Self::load("tp_btf", tracepoint, |ebpf, btf| {
            let program: &mut BtfTracePoint = program(ebpf, "noop_tp_btf")?;
            program.load(tracepoint, btf)?;
            program.attach()?;
            Ok(program.info()?.id())
        })
    }

    /// On a kernel function by fentry, e.g. `tcp_sendmsg` (idlemon's send
    /// hook where the kernel allows fentry; this host's refuses it). Each
    /// program loads its own copy of the object: one program loads once.
    pub fn fentry(function: &str) -> anyhow::Result<Self> {
        Self::load("fentry", function, |ebpf, btf| {
            let program: &mut FEntry = program(ebpf, "noop_fentry")?;
            program.load(function, btf)?;
            program.attach()?;
            Ok(program.info()?.id())
        })
    }

    /// Loads the object and has `attach` load, attach and identify one of
    /// its programs on `kind/target`.
    fn load(
        kind: &str,
        target: &str,
        attach: impl FnOnce(&mut Ebpf, &Btf) -> anyhow::Result<u32>,
    ) -> anyhow::Result<Self> {
        let btf = Btf::from_sys_fs().context("cannot read the kernel's BTF")?;
        let mut ebpf = Ebpf::load(OBJECT).context("cannot load the no-op programs' object")?;
        let id = attach(&mut ebpf, &btf).with_context(|| {
            format!("cannot load and attach a no-op program to {kind}/{target}")
        })?;
        Ok(Self { id, _ebpf: ebpf })
    }
}

/// Passes of a no-op `iter/{target}` program (`tcp`: every TCP socket of
/// the calling thread's network namespace; `task_file`: every open file of
/// every process), `runs` times, and the thread CPU time each took, all of
/// it the kernel's own work of visiting the objects.
pub fn walks(target: &str, runs: usize) -> anyhow::Result<Vec<Duration>> {
    let what = format!("iter/{target}");
    let name = match target {
        "tcp" => "noop_iter_tcp",
        "task_file" => "noop_task_file",
        _ => bail!("no no-op program for {what}"),
    };
    let btf = Btf::from_sys_fs().context("cannot read the kernel's BTF")?;
    let mut ebpf = Ebpf::load(OBJECT).context("cannot load the no-op programs' object")?;
    let program: &mut Iter = program(&mut ebpf, name)?;
    program
        .load(target, &btf)
        .with_context(|| format!("cannot load a no-op program for {what}"))?;
    let mut cpu = Vec::with_capacity(runs);
    for _ in 0..runs {
        let link = program
            .attach()
            .and_then(|id| program.take_link(id))
            .with_context(|| format!("cannot link {what}"))?;
        // The iterator walks the namespace of the thread that creates it.
        let mut iterator = link
            .into_file()
            .with_context(|| format!("cannot create an {what} iterator"))?;
        let started = thread_cpu_time();
        let mut buffer = [0u8; 4096];
        let mut ended = false;
        for _ in 0..MAX_WALK_READS {
            match iterator.read(&mut buffer) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(_) => {}
                Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                Err(error) => return Err(error).with_context(|| format!("reading {what}")),
            }
        }
        if !ended {
            bail!("{what} did not end after {MAX_WALK_READS} reads");
        }
        cpu.push(thread_cpu_time().saturating_sub(started));
    }
    Ok(cpu)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("the no-op object has no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not of the expected program type"))
}

fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel;

    /// Needs root and a kernel with BTF, tp_btf and iterators (5.8+).
    #[test]
    #[ignore = "loads BPF programs: run as root with --include-ignored"]
    fn the_floor_runs_and_the_walks_end() {
        let _stats = kernel::RunTimeStats::enable().expect("run-time stats");
        let floor = Floor::attach("tcp_probe").expect("a no-op tp_btf program");
        let ours = kernel::progs()
            .expect("loaded programs")
            .into_iter()
            .find(|prog| prog.id == floor.id)
            .expect("the floor among the loaded programs");
        let mine = kernel::objects_of(std::process::id()).expect("own fdinfo");
        assert!(mine.progs.contains(&floor.id));
        // What the self-cost table prints for it.
        assert_eq!(
            (ours.name.as_str(), ours.kind.as_str()),
            ("noop_tp_btf", "tracing")
        );
        for target in ["tcp", "task_file"] {
            assert_eq!(walks(target, 2).expect(target).len(), 2);
        }
        assert!(walks("udp", 1).is_err());
    }
}
