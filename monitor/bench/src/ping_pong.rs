//! The 1-byte ping-pong over one loopback connection, as sockperf's
//! ping-pong: a client thread sends a byte and waits for it to come back
//! from an echo thread. It is the load of both the overhead part
//! (`load.rs`, on this host) and the vm part (`vm/guest.rs`, inside qemu),
//! so that both measure the same traffic.

use std::{
    io::{self, ErrorKind, Read as _, Write as _},
    net::{Shutdown, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

/// Both ends of a running ping-pong; stopped and joined when dropped.
pub struct PingPong {
    /// Thread ids of the client and the echo thread, for /proc/PID/task/TID.
    pub tids: [u32; 2],
    stop: Arc<AtomicBool>,
    transactions: Arc<AtomicU64>,
    client: Option<JoinHandle<io::Result<()>>>,
    echo: Option<JoinHandle<io::Result<()>>>,
}

impl PingPong {
    /// Starts the two threads on an established connection.
    pub fn start(mut client: TcpStream, mut server: TcpStream) -> Result<Self, String> {
        for stream in [&client, &server] {
            stream
                .set_nodelay(true)
                .map_err(|error| format!("ping-pong: TCP_NODELAY: {error}"))?;
            // A lost byte must end the load, not hang it.
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|error| format!("ping-pong: read timeout: {error}"))?;
        }
        let (tid_tx, tid_rx) = mpsc::channel();
        let echo_tid = tid_tx.clone();
        let echo = thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || -> io::Result<()> {
                let _ = echo_tid.send((1, this_tid()));
                let mut byte = [0u8; 1];
                loop {
                    match server.read(&mut byte) {
                        Ok(0) => return Ok(()),
                        Ok(_) => server.write_all(&byte)?,
                        // A socket with a timeout is not restarted after a
                        // stop/continue or a cgroup freeze: EINTR it is.
                        Err(error) if error.kind() == ErrorKind::Interrupted => {}
                        Err(error) => return Err(error),
                    }
                }
            })
            .map_err(|error| format!("cannot start the ping-pong echo thread: {error}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let transactions = Arc::new(AtomicU64::new(0));
        let (client_stop, client_count) = (Arc::clone(&stop), Arc::clone(&transactions));
        let client = thread::Builder::new()
            .name("bench-ping".into())
            .spawn(move || -> io::Result<()> {
                let _ = tid_tx.send((0, this_tid()));
                let mut byte = [1u8; 1];
                let result = (|| -> io::Result<()> {
                    while !client_stop.load(Ordering::Relaxed) {
                        client.write_all(&byte)?;
                        client.read_exact(&mut byte)?;
                        client_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })();
                // EOF ends the echo thread whatever happened.
                let _ = client.shutdown(Shutdown::Both);
                result
            })
            .map_err(|error| format!("cannot start the ping-pong client thread: {error}"))?;
        let mut ping_pong = Self {
            tids: [0; 2],
            stop,
            transactions,
            client: Some(client),
            echo: Some(echo),
        };
        for _ in 0..2 {
            let (index, tid) = tid_rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| "ping-pong threads did not start".to_owned())?;
            ping_pong.tids[index] = tid;
        }
        Ok(ping_pong)
    }

    /// Transactions so far; fails, with both ends' errors, once the load
    /// has stopped.
    pub fn transactions(&mut self) -> Result<u64, String> {
        if self.client.as_ref().is_none_or(JoinHandle::is_finished) {
            self.stop()?;
            return Err("the ping-pong load stopped".to_owned());
        }
        Ok(self.transactions.load(Ordering::Relaxed))
    }

    /// Stops both threads and says how they ended.
    pub fn stop(&mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        // Both ends' errors: the first to fail explains the other's.
        let errors: Vec<String> = [
            ("ping-pong client", self.client.take()),
            ("ping-pong echo", self.echo.take()),
        ]
        .into_iter()
        .filter_map(|(what, thread)| match thread?.join() {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(format!("{what}: {error}")),
            Err(_) => Some(format!("{what}: the thread panicked")),
        })
        .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn this_tid() -> u32 {
    // SAFETY: gettid has no preconditions.
    u32::try_from(unsafe { libc::gettid() }).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};

    use super::*;

    #[test]
    fn counts_transactions_and_stops_cleanly() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
        let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let mut ping_pong = PingPong::start(client, server).expect("started");
        assert!(ping_pong.tids.iter().all(|tid| *tid > 0));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ping_pong.transactions().expect("running") < 10 {
            assert!(std::time::Instant::now() < deadline, "no transactions");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(ping_pong.stop(), Ok(()));
        assert!(ping_pong.transactions().is_err());
    }
}
