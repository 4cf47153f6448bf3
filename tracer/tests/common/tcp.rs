//! TCP connections in the shapes the teardown scenarios need: a connected pair, unread data
//! (close then sends a RST, TCP_ABORT_ON_CLOSE), SO_LINGER {1, 0} (a RST, TCP_STATE), a
//! half-close, and a burst of resets. Every wait has a deadline.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

/// How long a helper waits for the other end before failing the test.
const PATIENCE: Duration = Duration::from_secs(5);

/// A listener on `addr` (port 0 picks a free one) and its port.
pub fn listener(addr: &str) -> (TcpListener, u16) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A connected pair through a fresh listener on `listen` (port 0 picks a free one):
/// `(client, server)`. The listener is closed before returning.
pub fn tcp_pair(listen: SocketAddr) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
    tcp_pair_on(&l)
}

/// A connected pair through an existing listener: `(client, server)`.
pub fn tcp_pair_on(l: &TcpListener) -> (TcpStream, TcpStream) {
    let addr = l.local_addr().unwrap();
    let client = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let (server, _) = l.accept().expect("accept");
    (client, server)
}

/// Waits (up to 5 s) until the socket has something to read: data, a FIN or a RST.
pub fn wait_readable(s: &TcpStream) {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, PATIENCE.as_millis() as i32) };
    assert_eq!(n, 1, "the socket became readable within {PATIENCE:?}");
}

/// Leaves one byte unread in `reader`, sent by `writer`: closing `reader` then sends a RST
/// (reason TCP_ABORT_ON_CLOSE) instead of a FIN.
pub fn leave_unread(writer: &mut TcpStream, reader: &TcpStream) {
    writer.write_all(b"u").expect("write");
    wait_readable(reader);
}

/// SO_LINGER {1, 0}: close() then aborts with a RST (reason TCP_STATE) instead of a FIN.
pub fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// shutdown(SHUT_WR): a FIN goes out while the socket stays open for reading.
pub fn shutdown_write(s: &TcpStream) {
    s.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
}

/// Reads until the peer's FIN (end of stream) and returns what was read; fails after 5 s.
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut data = Vec::new();
    s.read_to_end(&mut data)
        .unwrap_or_else(|e| panic!("the peer's FIN within {PATIENCE:?}: {e}"));
    data
}

/// A loopback port nothing listens on (one the kernel just gave out and took back).
pub fn free_port() -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// A loopback port held by a socket bound to it but not listening: taken here until the
/// socket is dropped, and no listener for a tracer to see (a listen() by this untraced
/// process would mark the port as shared under `--pid`).
pub fn reserved_port() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns; the address structures
    // are initialised and sized as the calls expect.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let sa = (&raw mut addr).cast::<libc::sockaddr>();
        assert_eq!(
            libc::bind(raw, sa, len),
            0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        let mut got = len;
        assert_eq!(libc::getsockname(raw, sa, &mut got), 0);
        (fd, u16::from_be(addr.sin_port))
    }
}

/// Opens `n` loopback connections to `l` with a byte unread on each server end, then closes
/// every server end at once: a burst of n resets (2n kernel events) in a few milliseconds.
pub fn reset_burst(l: &TcpListener, port: u16, n: usize) -> usize {
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        c.write_all(b"x").unwrap();
        pairs.push((c, s));
    }
    for (_, s) in &pairs {
        wait_readable(s);
    }
    let (clients, servers): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    drop(servers);
    thread::sleep(Duration::from_millis(200)); // the resets reach the clients first
    drop(clients);
    n
}
