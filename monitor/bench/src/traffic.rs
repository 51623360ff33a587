//! Connections in numbers: a pool of idle ones, and paced churn. Everything
//! runs inside a namespace the bench made, and every loop is bounded in
//! count and time.

use std::{
    io::{self, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use super::{interrupted, netns::Netns};

/// Raises the open-file limit as far as allowed: the hard limit too where
/// the bench may (CAP_SYS_RESOURCE), else the soft one up to the hard one.
/// Returns the soft limit now in force.
pub fn raise_nofile(wanted: u64) -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid resource and out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1 << 20);
    let target = wanted.min(nr_open);
    for raised in [
        libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max.max(target),
        },
        libc::rlimit {
            rlim_cur: target.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        },
    ] {
        // SAFETY: valid resource and pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur);
        }
    }
    Err(io::Error::last_os_error()).context("cannot raise RLIMIT_NOFILE")
}

/// Established, idle loopback connections, both ends held by the bench.
///
/// The hard RLIMIT_NOFILE may be below 2 fds per connection, and raising it
/// needs CAP_SYS_RESOURCE, which a container may lack. The limit bounds each
/// fd table, though, not the process: each holder thread unshares its own
/// table (close_range with CLOSE_RANGE_UNSHARE) and keeps its share of the
/// connections there. Its sockets must never leave it: an fd number means
/// nothing in another thread's table.
pub struct Pool {
    holders: Vec<Holder>,
    pub connections: usize,
}

struct Holder {
    touch: Option<mpsc::Sender<()>>,
    replies: mpsc::Receiver<anyhow::Result<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Pool {
    /// One byte each way, so that the kernel hooks see (and put in their
    /// table) every socket, as they would on a real host where idle pooled
    /// connections were used once.
    pub fn touch(&mut self, timeout: Duration) -> anyhow::Result<()> {
        for holder in &self.holders {
            if let Some(touch) = &holder.touch {
                touch
                    .send(())
                    .context("a connection holder thread is gone")?;
            }
        }
        let deadline = Instant::now() + timeout;
        for holder in &self.holders {
            holder
                .replies
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .context("a connection holder did not finish sending")??;
        }
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the channel ends each holder, whose fd table (and every
        // socket in it) goes with it.
        for holder in &mut self.holders {
            holder.touch = None;
        }
        for holder in &mut self.holders {
            if let Some(thread) = holder.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Listening sockets on several ports, with a backlog that a burst of
/// connects cannot overflow (an overflow costs a 1 s SYN retry).
fn listeners(netns: &Netns, count: usize, bind: Ipv4Addr) -> anyhow::Result<Vec<TcpListener>> {
    netns.sysctl("net.core.somaxconn", "65535");
    netns
        .run(|| -> anyhow::Result<Vec<TcpListener>> {
            (0..count)
                .map(|_| {
                    let listener = TcpListener::bind((bind, 0)).context("cannot listen")?;
                    // Listening again only changes the backlog.
                    // SAFETY: a valid socket fd.
                    if unsafe { libc::listen(listener.as_raw_fd(), 65535) } != 0 {
                        return Err(io::Error::last_os_error()).context("listen(65535)");
                    }
                    set_accept_timeout(&listener, Duration::from_millis(100))?;
                    Ok(listener)
                })
                .collect()
        })
        .context("cannot create listeners")
}

/// accept(2) honours SO_RCVTIMEO: acceptor threads wake up to notice that
/// they should stop.
fn set_accept_timeout(listener: &TcpListener, timeout: Duration) -> anyhow::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).context("timeout")?,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: a valid fd and option of the right size.
    let ret = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).context("size")?,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error()).context("setsockopt(SO_RCVTIMEO)");
    }
    Ok(())
}

fn local_port(listener: &TcpListener) -> anyhow::Result<u16> {
    Ok(listener.local_addr()?.port())
}

/// Opens `connections` loopback connections in the namespace, spread over
/// holder threads (each under the fd limit) and over two server ports per
/// holder (so that ephemeral ports suffice), and keeps them.
pub fn open_pool(netns: &Netns, connections: usize, timeout: Duration) -> anyhow::Result<Pool> {
    netns.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    let limit = raise_nofile(2 * connections as u64 + 1000)?;
    // Two fds per connection, two listeners, and room for what the thread
    // itself opens (none now, but std may).
    let per_holder = usize::try_from(limit.saturating_sub(64) / 2)
        .unwrap_or(usize::MAX)
        .clamp(1, 50_000);
    let deadline = Instant::now() + timeout;
    let mut pool = Pool {
        holders: Vec::new(),
        connections,
    };
    let mut left = connections;
    while left > 0 {
        let share = left.min(per_holder);
        left -= share;
        let (touch_tx, touch_rx) = mpsc::channel::<()>();
        let (reply_tx, reply_rx) = mpsc::channel();
        let path = super::netns::path(netns);
        let thread = thread::Builder::new()
            .name("bench-holder".into())
            .spawn(move || hold(&path, share, deadline, &touch_rx, &reply_tx))
            .context("cannot start a connection holder thread")?;
        pool.holders.push(Holder {
            touch: Some(touch_tx),
            replies: reply_rx,
            thread: Some(thread),
        });
    }
    for holder in &pool.holders {
        holder
            .replies
            .recv_timeout(
                deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5),
            )
            .context("a connection holder did not finish in time")??;
    }
    Ok(pool)
}

/// The body of a holder thread: open `share` connections in its own fd
/// table, report, then send a byte on each when asked, until the pool drops.
fn hold(
    netns: &Path,
    share: usize,
    deadline: Instant,
    touch: &mpsc::Receiver<()>,
    replies: &mpsc::Sender<anyhow::Result<()>>,
) {
    let mut streams = match open_share(netns, share, deadline) {
        Ok(streams) => streams,
        Err(error) => {
            let _ = replies.send(Err(error));
            return;
        }
    };
    if replies.send(Ok(())).is_err() {
        return;
    }
    while touch.recv().is_ok() {
        let result = (|| -> anyhow::Result<()> {
            for stream in &mut streams {
                stream
                    .write_all(b"x")
                    .context("cannot send on a pooled connection")?;
            }
            Ok(())
        })();
        if replies.send(result).is_err() {
            return;
        }
    }
}

fn open_share(netns: &Path, share: usize, deadline: Instant) -> anyhow::Result<Vec<TcpStream>> {
    const CLOSE_RANGE_UNSHARE: libc::c_int = 1 << 1;
    const PORTS: usize = 2;
    let file =
        std::fs::File::open(netns).with_context(|| format!("cannot open {}", netns.display()))?;
    // SAFETY: a valid namespace fd, and the flag matches it.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error())
            .context("cannot enter the pool's network namespace");
    }
    drop(file);
    // A private copy of the fd table, emptied of the copies of the other
    // threads' fds (a pipe copied here would never see EOF elsewhere).
    // SAFETY: closes only fds of this thread's new, private table.
    if unsafe { libc::close_range(3, libc::c_uint::MAX, CLOSE_RANGE_UNSHARE) } != 0 {
        return Err(io::Error::last_os_error()).context("close_range(CLOSE_RANGE_UNSHARE)");
    }
    let listeners: Vec<TcpListener> = (0..PORTS)
        .map(|_| -> anyhow::Result<TcpListener> {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot listen")?;
            // Never wait long for a connection that connect() said is there.
            set_accept_timeout(&listener, Duration::from_secs(5))?;
            Ok(listener)
        })
        .collect::<anyhow::Result<_>>()?;
    let ports: Vec<u16> = listeners.iter().map(local_port).collect::<Result<_, _>>()?;
    let mut streams = Vec::with_capacity(2 * share);
    for k in 0..share {
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports[k % PORTS]));
        // The handshake completes in the kernel: accept() then finds the
        // connection queued, so one thread does both ends.
        let client = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connection {k} of {share} to {addr}"))?;
        let (server, _) = loop {
            match listeners[k % PORTS].accept() {
                Ok(accepted) => break accepted,
                // Not restarted after a stop/continue, with SO_RCVTIMEO set.
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    return Err(error)
                        .with_context(|| format!("accepting connection {k} of {share}"));
                }
            }
        };
        streams.push(client);
        streams.push(server);
        if k % 1024 == 0 && (interrupted() || Instant::now() >= deadline) {
            bail!("opened only {k} of {share} connections in time");
        }
    }
    Ok(streams)
}

/// What a churn run did.
#[derive(Debug, Clone, Copy)]
pub struct Churn {
    pub opened: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

impl Churn {
    pub fn rate(&self) -> f64 {
        self.opened as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Sets a flag when dropped, so that threads of a scope stop on every path
/// out of it, errors included.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Opens and closes connections at `rate` per second for `duration`, from
/// `threads` paced client threads, while `during` runs on the calling thread
/// (it is handed the end of the churn, and samples until then).
pub fn churn<T: Send>(
    netns: &Netns,
    rate: f64,
    duration: Duration,
    threads: usize,
    during: impl FnOnce(Instant) -> T + Send,
) -> anyhow::Result<(Churn, T)> {
    // 8 ports on 4 addresses: 32 destinations, so that TIME_WAIT on
    // 300,000 closed connections never exhausts a destination's ports.
    const PORTS: usize = 8;
    const ADDRESSES: u8 = 4;
    netns.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    netns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    let listeners = listeners(netns, PORTS, Ipv4Addr::UNSPECIFIED)?;
    let ports: Vec<u16> = listeners.iter().map(local_port).collect::<Result<_, _>>()?;
    let destinations: Vec<SocketAddr> = ports
        .iter()
        .flat_map(|port| {
            (1..=ADDRESSES).map(|host| {
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, host), *port))
            })
        })
        .collect();
    let threads = threads.max(1);
    let running = AtomicBool::new(true);
    let opened = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let started = Instant::now();
    let end = started + duration;
    let per_thread = rate / threads as f64;
    thread::scope(|scope| -> anyhow::Result<(Churn, T)> {
        let _stop = StopOnDrop(&running);
        for listener in &listeners {
            let running = &running;
            scope.spawn(move || {
                // Bounded even if nobody clears the flag.
                while running.load(Ordering::Relaxed)
                    && Instant::now() < end + Duration::from_secs(30)
                {
                    // Accept and close at once: the server end closes too.
                    let _ = listener.accept();
                }
            });
        }
        let clients: Vec<_> = (0..threads)
            .map(|t| {
                let (opened, failed, destinations) = (&opened, &failed, &destinations);
                scope.spawn(move || {
                    netns.run(|| {
                        let mut k = 0u64;
                        loop {
                            let now = Instant::now();
                            if now >= end || interrupted() {
                                return now;
                            }
                            // Paced against the start, so that a slow moment
                            // is caught up and the average rate holds.
                            let due = started + Duration::from_secs_f64(k as f64 / per_thread);
                            if due > now + Duration::from_micros(200) {
                                thread::sleep(due - now);
                                continue;
                            }
                            let index = (k as usize * threads + t) % destinations.len();
                            match TcpStream::connect_timeout(
                                &destinations[index],
                                Duration::from_secs(1),
                            ) {
                                Ok(stream) => {
                                    drop(stream);
                                    opened.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            k += 1;
                        }
                    })
                })
            })
            .collect();
        let sampled = during(end);
        let mut finished = started;
        for client in clients {
            let at = client
                .join()
                .map_err(|_| anyhow!("churn client thread panicked"))?;
            finished = finished.max(at);
        }
        if interrupted() {
            bail!("interrupted");
        }
        Ok((
            Churn {
                opened: opened.load(Ordering::Relaxed),
                failed: failed.load(Ordering::Relaxed),
                elapsed: finished - started,
            },
            sampled,
        ))
    })
}
