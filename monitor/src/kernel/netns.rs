//! Network namespaces and the socket walk in each of them.
//!
//! `iter/tcp` only visits the sockets of the namespace in which the iterator
//! was created, and every pod has its own, so the walk enters each namespace
//! in turn (setns(2) on this thread only) to create that namespace's iterator.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, Read as _},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use monitor_common::SocketRecord;

use super::create_iterator;

/// A network namespace and a file that names it (`/proc/PID/ns/net` or a
/// bind mount under `/run/netns`, which `ip netns add` makes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub inode: u64,
    pub path: PathBuf,
}

/// Every network namespace that a process or a bind mount keeps alive, once
/// each, and how many entries of `bind_mounts` were something else. A
/// namespace nobody holds has no sockets with an owner, and an ESTABLISHED
/// socket always has one.
///
/// Only files of the namespace filesystem (nsfs, the device of this
/// thread's own namespace file) count: `/run/netns` is writable by anyone
/// with root on the node, and a FIFO there would block the walk forever in
/// open(2), a socket or a plain file would fail setns(2) on every scan.
/// stat(2) does not block on any of them.
pub fn discover(proc_root: &Path, bind_mounts: &Path) -> (Vec<Namespace>, usize) {
    let nsfs = fs::metadata("/proc/thread-self/ns/net")
        .map(|own| own.dev())
        .ok();
    let mut found: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut consider = |path: PathBuf| -> bool {
        match fs::metadata(&path) {
            Ok(metadata) if is_namespace(&metadata, nsfs) => {
                found.entry(metadata.ino()).or_insert(path);
                true
            }
            // A process that exited meanwhile is no odd entry.
            Ok(_) => false,
            Err(_) => true,
        }
    };
    if let Ok(entries) = fs::read_dir(proc_root) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name
                .to_str()
                .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
            {
                consider(entry.path().join("ns/net"));
            }
        }
    }
    let mut skipped = 0;
    if let Ok(entries) = fs::read_dir(bind_mounts) {
        for entry in entries.flatten() {
            skipped += usize::from(!consider(entry.path()));
        }
    }
    let namespaces = found
        .into_iter()
        .map(|(inode, path)| Namespace { inode, path })
        .collect();
    (namespaces, skipped)
}

/// A network namespace file: an empty regular file on nsfs (`/proc/PID/ns/net`
/// and the bind mounts of `ip netns add` both stat so).
fn is_namespace(metadata: &fs::Metadata, nsfs: Option<u64>) -> bool {
    metadata.file_type().is_file() && nsfs.is_none_or(|nsfs| metadata.dev() == nsfs)
}

/// Walks namespaces from one thread, returning it to its own namespace after
/// each visit.
pub struct Walker {
    link: OwnedFd,
    home: File,
    home_inode: u64,
    /// One read's worth of records, reused: records are decoded as they
    /// arrive, never all held at once.
    buffer: std::cell::RefCell<Box<[u8]>>,
}

/// Records per read(2) of the iterator: large enough that the syscalls cost
/// little, small enough to stay in cache.
const RECORDS_PER_READ: usize = 256;

/// Why one namespace could not be walked.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("namespace {path} is gone")]
    Gone { path: PathBuf },
    #[error("cannot enter network namespace {path}: {source} (needs CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: io::Error },
    #[error("cannot walk sockets of {path}: {source}")]
    Walk { path: PathBuf, source: io::Error },
    /// The path no longer names a network namespace (replaced since
    /// discovery).
    #[error("{path} is not a network namespace")]
    NotANamespace { path: PathBuf },
    /// The thread could not return to its own namespace: every later walk
    /// would be wrong, so the caller must stop.
    #[error("cannot return to idlemon's own network namespace: {0}")]
    Stranded(io::Error),
}

impl Walker {
    /// `link` is the `iter/tcp` link. Must be called on the thread that walks.
    pub fn new(link: OwnedFd) -> io::Result<Self> {
        let home = File::open("/proc/thread-self/ns/net")?;
        let home_inode = home.metadata()?.ino();
        Ok(Self {
            link,
            home,
            home_inode,
            buffer: std::cell::RefCell::new(
                vec![0; RECORDS_PER_READ * size_of::<SocketRecord>()].into_boxed_slice(),
            ),
        })
    }

    /// Hands the record of every ESTABLISHED socket in `namespace` to `visit`,
    /// which may complete it (a decoded copy, the walker's own), and says
    /// whether the walk passed over the host's shared table.
    ///
    /// Walk only a namespace that `established` found sockets in:
    /// `iter/tcp` scans the host's whole connection table (shared by all
    /// namespaces) for each namespace, so a walk costs as much for an empty
    /// pod as for a busy one.
    pub fn walk(
        &self,
        namespace: &Namespace,
        visit: impl FnMut(&mut SocketRecord),
    ) -> Result<Walked, WalkError> {
        // Without a word from the kernel, only the host's own namespace has
        // a table of its own.
        let shared = namespace.inode != self.home_inode;
        let (iterator, table) = self.inside(namespace, || {
            (create_iterator(&self.link), table_of_this_namespace(shared))
        })?;
        iterator
            .and_then(|iterator| self.read_records(iterator, visit))
            .map_err(|source| WalkError::Walk {
                path: namespace.path.clone(),
                source,
            })?;
        Ok(table)
    }

    /// Hands the record of every ESTABLISHED or CLOSE_WAIT socket that a
    /// process holds to `visit`, whatever its namespace, once per holding
    /// file descriptor: one walk of `iter/task_file` (the processes of this
    /// thread's pid namespace: the host's, with hostPID).
    pub fn walk_files(
        &self,
        files_link: &OwnedFd,
        visit: impl FnMut(&mut SocketRecord),
    ) -> io::Result<()> {
        self.read_records(create_iterator(files_link)?, visit)
    }

    /// The ports that TCP sockets of `namespace` listen on (IPv4 and IPv6),
    /// from its `/proc/net/tcp` and `tcp6`.
    pub fn listening_ports(
        &self,
        namespace: &Namespace,
    ) -> Result<std::collections::HashSet<u16>, WalkError> {
        self.inside(namespace, || {
            let mut ports = std::collections::HashSet::new();
            for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
                if let Ok(text) = fs::read_to_string(table) {
                    ports.extend(listening_ports(&text));
                }
            }
            ports
        })
    }

    /// The ESTABLISHED and CLOSE_WAIT sockets of `namespace`, as its
    /// `CurrEstab` counter has them; None when that cannot be read.
    pub fn established(&self, namespace: &Namespace) -> Result<Option<u64>, WalkError> {
        self.inside(namespace, established_here)
    }

    /// Runs `f` on this thread inside `namespace`, then back in its own.
    fn inside<T>(&self, namespace: &Namespace, f: impl FnOnce() -> T) -> Result<T, WalkError> {
        if namespace.inode == self.home_inode {
            return Ok(f());
        }
        // O_NONBLOCK: should the path have become a FIFO since discovery,
        // open(2) returns at once instead of waiting for a writer.
        let target = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&namespace.path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    WalkError::Gone {
                        path: namespace.path.clone(),
                    }
                } else {
                    WalkError::Enter {
                        path: namespace.path.clone(),
                        source,
                    }
                }
            })?;
        let nsfs = self.home.metadata().map(|home| home.dev()).ok();
        if !target
            .metadata()
            .is_ok_and(|metadata| is_namespace(&metadata, nsfs))
        {
            return Err(WalkError::NotANamespace {
                path: namespace.path.clone(),
            });
        }
        enter(&target).map_err(|source| WalkError::Enter {
            path: namespace.path.clone(),
            source,
        })?;
        let result = f();
        enter(&self.home).map_err(WalkError::Stranded)?;
        Ok(result)
    }

    /// Decodes an iterator's records as they come, into the reused buffer.
    fn read_records(
        &self,
        iterator: OwnedFd,
        mut visit: impl FnMut(&mut SocketRecord),
    ) -> io::Result<()> {
        let mut buffer = self.buffer.borrow_mut();
        let mut iterator = File::from(iterator);
        // A read may end inside a record: the rest comes with the next one.
        let mut filled = 0;
        loop {
            let read = match iterator.read(&mut buffer[filled..]) {
                Ok(0) => return Ok(()),
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            filled += read;
            let whole = filled - filled % size_of::<SocketRecord>();
            decode(&buffer[..whole]).for_each(|mut record| visit(&mut record));
            buffer.copy_within(whole..filled, 0);
            filled -= whole;
        }
    }
}

/// Which table the walk of one namespace passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walked {
    /// Walked, in a TCP connection table of its own (the host's, or a
    /// namespace's made while `net.ipv4.tcp_child_ehash_entries` was set).
    OwnTable,
    /// Walked, in the host's table, which it shares: the walk passed over
    /// every TCP socket of the host to find this namespace's. On a node of
    /// many pods, these walks are most of a scan's cost.
    SharedTable,
}

/// Whether this thread's network namespace has a TCP connection table of
/// its own: `net.ipv4.tcp_ehash_entries` is negative where it shares the
/// host's (Linux 6.1+). Where the kernel does not say, `shared` (older
/// kernels have one table for all namespaces).
fn table_of_this_namespace(shared: bool) -> Walked {
    let entries = fs::read_to_string("/proc/sys/net/ipv4/tcp_ehash_entries").ok();
    match entries.as_deref().and_then(shares_host_table) {
        Some(true) => Walked::SharedTable,
        Some(false) => Walked::OwnTable,
        None if shared => Walked::SharedTable,
        None => Walked::OwnTable,
    }
}

/// `net.ipv4.tcp_ehash_entries`: the namespace's table size, negated where
/// it is the host's, shared.
fn shares_host_table(entries: &str) -> Option<bool> {
    entries
        .trim()
        .parse::<i64>()
        .ok()
        .map(|entries| entries < 0)
}

/// The local ports of LISTEN (`st` 0A) sockets in a `/proc/net/tcp` or
/// `tcp6` table: `  0: 0100007F:1F90 00000000:0000 0A ...`.
pub fn listening_ports(table: &str) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        if state != "0A" {
            return None;
        }
        let (_, port) = local.rsplit_once(':')?;
        u16::from_str_radix(port, 16).ok()
    })
}

/// `CurrEstab` of this thread's network namespace.
fn established_here() -> Option<u64> {
    fs::read_to_string("/proc/thread-self/net/snmp")
        .ok()
        .and_then(|snmp| current_established(&snmp))
}

/// `Tcp: ... CurrEstab ...` from /proc/net/snmp: a header line, then values.
fn current_established(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let column = names
        .split_whitespace()
        .position(|name| name == "CurrEstab")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

fn enter(namespace: &File) -> io::Result<()> {
    // SAFETY: a valid namespace file descriptor; affects this thread only.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Records from the walk's byte stream; a trailing partial record (which the
/// kernel never writes) is ignored.
pub fn decode(bytes: &[u8]) -> impl Iterator<Item = SocketRecord> + '_ {
    bytes
        .chunks_exact(size_of::<SocketRecord>())
        // SAFETY: SocketRecord is plain integers, valid for any bytes, and
        // each chunk is exactly its size.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<SocketRecord>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_round_trips_records_and_drops_partial_tails() {
        let mut first = SocketRecord {
            sock: 0xffff_8880_1234_5678,
            local_port: 443,
            ..SocketRecord::default()
        };
        first.info.owner_tgid = 4242;
        let mut second = first;
        second.remote_port = 5432;
        let mut bytes = Vec::new();
        for record in [first, second] {
            // SAFETY: viewing a plain struct as bytes.
            bytes.extend_from_slice(unsafe {
                std::slice::from_raw_parts(
                    (&raw const record).cast::<u8>(),
                    size_of::<SocketRecord>(),
                )
            });
        }
        bytes.extend_from_slice(&[1, 2, 3]);
        let decoded: Vec<_> = decode(&bytes).collect();
        assert_eq!(decoded, vec![first, second]);
    }

    #[test]
    fn reads_the_established_count_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs\n\
            Tcp: 1 200 120000 -1 4053 3766 206 28 17 153553\n\
            Udp: InDatagrams\nUdp: 5\n";
        assert_eq!(current_established(snmp), Some(17));
        assert_eq!(current_established("Tcp: RtoAlgorithm\nTcp: 1\n"), None);
        assert_eq!(current_established(""), None);
        // This thread's own namespace can always be read.
        let own = fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        assert!(current_established(&own).is_some());
    }

    #[test]
    fn a_negative_table_size_is_the_hosts_shared_table() {
        // The host's own namespace, and one made with tcp_child_ehash_entries.
        assert_eq!(shares_host_table("262144\n"), Some(false));
        assert_eq!(shares_host_table("1024"), Some(false));
        // A namespace that shares the host's table of 262144 buckets.
        assert_eq!(shares_host_table("-262144\n"), Some(true));
        assert_eq!(shares_host_table(""), None);
        assert_eq!(shares_host_table("many"), None);
    }

    #[test]
    fn discover_finds_our_own_namespace_once() {
        let (namespaces, skipped) = discover(Path::new("/proc"), Path::new("/nonexistent"));
        let own = fs::metadata("/proc/self/ns/net").expect("own netns").ino();
        assert_eq!(namespaces.iter().filter(|ns| ns.inode == own).count(), 1);
        assert_eq!(skipped, 0);
    }

    #[test]
    fn discover_skips_what_is_not_a_namespace_without_blocking() {
        let dir = std::env::temp_dir().join(format!("idlemon-netns-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let fifo = dir.join("fifo");
        let fifo_c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0);
        fs::write(dir.join("plain"), b"").expect("plain file");
        fs::create_dir_all(dir.join("subdir")).expect("subdir");
        std::os::unix::fs::symlink("/proc/self/ns/net", dir.join("link")).expect("symlink");
        let (namespaces, skipped) = discover(Path::new("/nonexistent"), &dir);
        fs::remove_dir_all(&dir).expect("cleanup");
        // The symlink to our own namespace is one; the FIFO, the plain
        // file and the directory are counted and left alone.
        assert_eq!(namespaces.len(), 1);
        assert_eq!(skipped, 3);
    }

    #[test]
    fn listening_ports_of_a_proc_net_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:9C41 0200007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        assert_eq!(listening_ports(table).collect::<Vec<_>>(), [8080, 443]);
    }
}
