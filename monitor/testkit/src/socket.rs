//! Client sockets as applications set them up, through `socket2`: keepalive
//! options before connect, resets by SO_LINGER 0, and one HTTP GET.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};

use crate::Netns;

/// Keepalive settings of a test client.
#[derive(Debug, Clone, Copy)]
pub enum Keepalive {
    Off,
    /// SO_KEEPALIVE with the namespace's timers.
    On,
    /// SO_KEEPALIVE with TCP_KEEPIDLE and TCP_KEEPINTVL of this many seconds.
    Every(u32),
}

/// Connects to `target` with `keepalive` set before connect, as
/// applications that configure their own keepalive do (a sock_ops program
/// sees the options at ESTABLISHED then).
pub fn connect(target: SocketAddr, keepalive: Keepalive) -> TcpStream {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None).unwrap();
    set_keepalive(&socket, keepalive);
    socket
        .connect_timeout(&target.into(), Duration::from_secs(5))
        .unwrap_or_else(|error| panic!("connect to {target}: {error}"));
    socket.into()
}

fn set_keepalive(socket: &Socket, keepalive: Keepalive) {
    match keepalive {
        Keepalive::Off => {}
        Keepalive::On => socket.set_keepalive(true).unwrap(),
        Keepalive::Every(seconds) => {
            let every = Duration::from_secs(seconds.into());
            socket
                .set_tcp_keepalive(&TcpKeepalive::new().with_time(every).with_interval(every))
                .unwrap();
        }
    }
}

/// Sets TCP_KEEPCNT: unanswered probes before the kernel gives up.
pub fn set_keepalive_probes(stream: &TcpStream, count: u32) {
    SockRef::from(stream)
        .set_tcp_keepalive(&TcpKeepalive::new().with_retries(count))
        .unwrap();
}

/// Turns SO_KEEPALIVE off, as an application that weakens the keepalive
/// idlemon enforced does.
pub fn turn_keepalive_off(stream: &TcpStream) {
    SockRef::from(stream).set_keepalive(false).unwrap();
}

/// SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL (seconds) and TCP_KEEPCNT of
/// a socket, as the kernel holds them.
pub fn keepalive_options(stream: &TcpStream) -> [u64; 4] {
    let socket = SockRef::from(stream);
    [
        u64::from(socket.keepalive().unwrap()),
        socket.tcp_keepalive_time().unwrap().as_secs(),
        socket.tcp_keepalive_interval().unwrap().as_secs(),
        u64::from(socket.tcp_keepalive_retries().unwrap()),
    ]
}

/// Makes the next close abort the connection with a RST (SO_LINGER 0), as
/// an application resetting a connection does.
pub fn reset_on_close(stream: &TcpStream) {
    SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// `count` connections inside `netns` to a listener on `address` (port 0:
/// any), a byte exchanged on each and then quiet, as an application's
/// connection between requests; both ends of each.
pub fn idle_connections(netns: &Netns, address: SocketAddr, count: usize) -> Vec<TcpStream> {
    netns.run(move || {
        let listener = TcpListener::bind(address).unwrap();
        let target = listener.local_addr().unwrap();
        let mut streams = Vec::new();
        for _ in 0..count {
            let mut client = TcpStream::connect(target).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            client.write_all(b"x").unwrap();
            server.read_exact(&mut [0u8; 1]).unwrap();
            streams.push(client);
            streams.push(server);
        }
        streams
    })
}

/// One request/response over an echo connection.
pub fn echo(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"ping")?;
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply)?;
    assert_eq!(&reply, b"ping");
    Ok(())
}

/// One GET over HTTP/1.0 from inside `netns` to `address`: the status and
/// the body, or None when nothing answers there within 2 s (the answer may
/// take `read_timeout`, long polls longer).
pub fn http_get(netns: &Netns, address: SocketAddr, path: &str) -> Option<(u16, String)> {
    netns.run(|| get(address, path, Duration::from_secs(10)).ok())
}

/// One GET over HTTP/1.0 from this thread's namespace: the daemon closes
/// the connection after the body, so reading to the end is the whole
/// protocol. Connecting may take 2 s, the answer `read_timeout`; an error
/// says which step failed.
pub fn get(
    address: SocketAddr,
    path: &str,
    read_timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let failed = |step: &str, error: std::io::Error| {
        std::io::Error::new(
            error.kind(),
            format!("GET {path} from {address}: {step}: {error}"),
        )
    };
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .map_err(|error| failed("connect", error))?;
    stream.set_read_timeout(Some(read_timeout))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: idlemon\r\n\r\n").as_bytes())
        .map_err(|error| failed("send", error))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|error| failed("read", error))?;
    let response = String::from_utf8_lossy(&response);
    let malformed = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("GET {path} from {address}: no HTTP status line in the answer"),
        )
    };
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}
