//! The TCP sockets of a process's network namespace, for seeding the owners of connections
//! that existed before the tracer started.
//!
//! From the kernel's sock_diag netlink interface (what `ss` uses): the kernel leaves out the
//! states no process can own before answering, where /proc/net/tcp lists a busy host's tens of
//! thousands of TIME_WAIT sockets as text (~0.5 s to read and parse at start-up with 130k).
//! A netlink socket answers for the namespace it was made in, so for a process in another
//! namespace (a container) a short-lived thread enters it (setns: CAP_SYS_ADMIN) and dumps
//! from there. Where that fails (no CAP_SYS_ADMIN, no sock_diag in the kernel), the
//! namespace's /proc/PID/net/tcp{,6} stands in: the same sockets, only slower.

use std::{
    fs,
    io::{self, BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// One TCP socket a process can own (it has a socket file, `inode`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    pub state: u8,
    pub inode: u64,
}

/// How many TCP sockets the host has allocated (full sockets of every namespace, listeners
/// included; not time-wait or request sockets), from /proc/net/sockstat's `alloc`: what the
/// kernel tables that hold one entry per socket must have room for.
pub fn tcp_sockets_allocated() -> Option<u64> {
    parse_sockstat_alloc(&fs::read_to_string("/proc/net/sockstat").ok()?)
}

fn parse_sockstat_alloc(text: &str) -> Option<u64> {
    // TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 1
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|&w| w == "alloc")?;
    words.next()?.parse().ok()
}

/// The states of sockets with a socket file: not TIME_WAIT (a time-wait mini socket), not
/// SYN_RECV (a request socket), not CLOSE (never connected, or already closed: nothing to
/// attribute, and asking for CLOSE also dumps every merely bound socket).
fn ownable_states() -> StateFlags {
    StateFlags::all() - StateFlags::TIME_WAIT - StateFlags::SYN_RECV - StateFlags::CLOSE
}

/// The TCP sockets (IPv4 and IPv6) a process can own in the network namespace of `pid`.
pub fn tcp_sockets(pid: u32) -> Vec<TcpSocket> {
    sock_diag_dump(pid).unwrap_or_else(|_| proc_net_tcp(pid))
}

fn sock_diag_dump(pid: u32) -> io::Result<Vec<TcpSocket>> {
    if same_netns_as_ours(pid)? {
        dump_both_families()
    } else {
        dump_in_netns_of(pid)
    }
}

fn same_netns_as_ours(pid: u32) -> io::Result<bool> {
    Ok(netns_of(pid)? == netns_at("/proc/self/ns/net")?)
}

/// The network namespace `pid` lives in, as (device, inode) of its namespace file: equal for
/// two processes exactly when they share it.
pub fn netns_of(pid: u32) -> io::Result<(u64, u64)> {
    netns_at(&format!("/proc/{pid}/ns/net"))
}

fn netns_at(path: &str) -> io::Result<(u64, u64)> {
    let file = fs::metadata(path)?;
    Ok((file.dev(), file.ino()))
}

/// Dumps from a thread that entered the namespace of `pid` and ends with the dump (a thread's
/// network namespace is its own; the rest of the daemon never leaves the one it started in).
fn dump_in_netns_of(pid: u32) -> io::Result<Vec<TcpSocket>> {
    let netns = fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns() on an open namespace file affects only this thread.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                dump_both_families()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the sock_diag thread panicked")))
    })
}

fn dump_both_families() -> io::Result<Vec<TcpSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        request_dump(&socket, family)?;
        receive_dump(&socket, &mut sockets)?;
    }
    Ok(sockets)
}

fn request_dump(socket: &Socket, family: u8) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: ownable_states(),
        socket_id: if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        },
    });
    let mut packet = NetlinkMessage::new(header, request.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// Reads the dump's datagrams until its Done message.
fn receive_dump(socket: &Socket, into: &mut Vec<TcpSocket>) -> io::Result<()> {
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = datagram.as_slice();
        while !rest.is_empty() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    into.extend(owned_socket(&response));
                }
                _ => {}
            }
            if length == 0 || length > rest.len() {
                break;
            }
            rest = &rest[nlmsg_align(length).min(rest.len())..];
        }
    }
}

fn nlmsg_align(length: usize) -> usize {
    (length + 3) & !3
}

fn owned_socket(response: &InetResponse) -> Option<TcpSocket> {
    let header = &response.header;
    let id = &header.socket_id;
    (header.inode != 0).then(|| TcpSocket {
        local: (id.source_address, id.source_port),
        remote: (id.destination_address, id.destination_port),
        state: header.state,
        inode: u64::from(header.inode),
    })
}

/// The same from /proc/PID/net/tcp{,6}: the rows with a socket file's inode (time-wait and
/// orphaned sockets have none).
fn proc_net_tcp(pid: u32) -> Vec<TcpSocket> {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| {
            fs::File::open(Path::new("/proc").join(pid.to_string()).join("net").join(f)).ok()
        })
        .flat_map(|file| read_proc_net_tcp(BufReader::new(file)))
        .collect()
}

/// The owned rows of /proc/net/tcp or /proc/net/tcp6, read a line at a time: on a host with
/// tens of thousands of sockets in TIME_WAIT the table is megabytes, and reading it whole
/// (growing a String by doubling) made ~34 MB of the daemon's peak memory at start-up.
fn read_proc_net_tcp(reader: impl BufRead) -> impl Iterator<Item = TcpSocket> {
    reader
        .lines()
        .skip(1)
        .map_while(Result::ok)
        .filter_map(|line| parse_proc_net_line(&line))
        .filter(|sock| sock.inode != 0)
}

#[cfg(test)]
fn parse_proc_net_tcp(text: &str) -> Vec<TcpSocket> {
    read_proc_net_tcp(text.as_bytes()).collect()
}

fn parse_proc_net_line(line: &str) -> Option<TcpSocket> {
    let mut cols = line.split_whitespace();
    let (local, remote, state) = (cols.nth(1)?, cols.next()?, cols.next()?);
    let inode = cols.nth(5)?;
    Some(TcpSocket {
        local: parse_endpoint(local)?,
        remote: parse_endpoint(remote)?,
        state: u8::from_str_radix(state, 16).ok()?,
        inode: inode.parse().ok()?,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host byte order.
fn parse_endpoint(text: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<u32>> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok())
        .collect();
    let words = words?;
    let ip = match words.as_slice() {
        [w] => IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_alloc_is_read_from_the_tcp_line() {
        let text = "sockets: used 312\nTCP: inuse 5 orphan 1 tw 2 alloc 70321 mem 14\n\
                    UDP: inuse 3 mem 2\n";
        assert_eq!(parse_sockstat_alloc(text), Some(70321));
        assert_eq!(parse_sockstat_alloc("UDP: inuse 3 mem 2\n"), None);
        assert!(
            tcp_sockets_allocated().is_some(),
            "this kernel has /proc/net/sockstat"
        );
    }
    use std::net::{TcpListener, TcpStream};
    use tracer_common::tcp_state;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 34567 1 0000000000000000 20 4 0 10 -1
";

    fn socket_inode(fd: i32) -> u64 {
        let link = fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        crate::owners::parse_socket_link(link.to_str().unwrap()).unwrap()
    }

    #[test]
    fn finds_this_process_own_listener_and_connection_in_both_families() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let v6 = TcpListener::bind("[::1]:0").ok(); // a host without IPv6 still tests IPv4
        let sockets = sock_diag_dump(std::process::id()).unwrap();
        let find = |fd| sockets.iter().find(|s| s.inode == socket_inode(fd));
        let listener = find(v4.as_raw_fd()).expect("the IPv4 listener");
        assert_eq!(
            listener.local,
            (
                v4.local_addr().unwrap().ip(),
                v4.local_addr().unwrap().port()
            )
        );
        assert_eq!(listener.state, tcp_state::LISTEN);
        let conn = find(client.as_raw_fd()).expect("the connection");
        assert_eq!(conn.remote.1, v4.local_addr().unwrap().port());
        assert_eq!(conn.local.1, client.local_addr().unwrap().port());
        assert_eq!(conn.state, tcp_state::ESTABLISHED);
        if let Some(v6) = v6 {
            let listener = find(v6.as_raw_fd()).expect("the IPv6 listener");
            assert_eq!(listener.local.0, "::1".parse::<IpAddr>().unwrap());
        }
    }

    /// A listener in a network namespace of its own (a container's) is found by a dump made
    /// from inside that namespace, and /proc/PID/net/tcp of the process agrees.
    #[test]
    fn finds_a_listener_in_another_network_namespace() {
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI runs as root: this test must run"
            );
            eprintln!("skipped: making a network namespace needs root");
            return;
        }
        let ns = format!("trsd{}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip").args(args).status();
            assert!(ok.is_ok_and(|s| s.success()), "ip {args:?}");
        };
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let script = "import socket,sys\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\nprint(s.getsockname()[1],flush=True)\nsys.stdin.read()";
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut port = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        let port: u16 = port.trim().parse().expect("the listener's port");
        let dumped = sock_diag_dump(child.id());
        let from_proc = proc_net_tcp(child.id());
        drop(child.stdin.take());
        let _ = child.wait();
        ip(&["netns", "del", &ns]);
        let dumped = dumped.unwrap();
        let listener = dumped
            .iter()
            .find(|s| s.local.1 == port)
            .expect("found by sock_diag");
        assert_eq!(listener.state, tcp_state::LISTEN);
        assert_eq!(Some(listener), from_proc.iter().find(|s| s.local.1 == port));
        // Only the namespace's own sockets: a fresh namespace holds just this one.
        assert_eq!(dumped.len(), 1, "{dumped:?}");
    }

    #[test]
    fn leaves_out_what_no_process_owns() {
        let states = ownable_states();
        assert!(states.contains(StateFlags::ESTABLISHED | StateFlags::LISTEN));
        assert!(states.contains(StateFlags::FIN_WAIT2 | StateFlags::CLOSE_WAIT));
        assert!(!states.intersects(StateFlags::TIME_WAIT | StateFlags::SYN_RECV));
    }

    #[test]
    fn parses_ipv4_rows() {
        let socks = parse_proc_net_tcp(TCP);
        assert_eq!(socks.len(), 2);
        assert_eq!(socks[0].local, ("127.0.0.1".parse().unwrap(), 8080));
        assert_eq!(socks[0].state, tcp_state::LISTEN);
        assert_eq!(socks[1].remote, ("127.0.0.1".parse().unwrap(), 50000));
        assert_eq!(socks[1].state, tcp_state::ESTABLISHED);
        assert_eq!(socks[1].inode, 23456);
    }

    #[test]
    fn skips_rows_no_process_can_own() {
        let time_wait = "   2: 0100007F:C351 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000\n";
        assert_eq!(parse_proc_net_tcp(&format!("{TCP}{time_wait}")).len(), 2);
    }

    #[test]
    fn parses_ipv6_rows() {
        let socks = parse_proc_net_tcp(TCP6);
        assert_eq!(socks[0].local, ("::1".parse().unwrap(), 8080));
        assert_eq!(socks[0].remote.1, 0xD431);
        assert_eq!(socks[0].inode, 34567);
    }
}
