//! Kernel events (issue: every TCP teardown, attributed to the process that owns the socket),
//! checked field by field against real sockets on the live kernel. Each end of a connection
//! lives in its own process: this test process on one side, `peer.py` on the other.

mod common;

use common::{Peer, is, reset_burst, wait_readable};

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn tracer_for(port: u16) -> common::Tracer {
    let mut tracer = common::Tracer::start(&["--no-capture", "--port", &port.to_string()]);
    tracer.wait_ready(WAIT);
    tracer
}

/// A port number in a JSON line (a test helper's or the tracer's).
fn port_of(v: &Value) -> u16 {
    v.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("not a port: {v}"))
}

/// Stops the tracer and requires a normal exit.
fn stops_cleanly(tracer: common::Tracer) {
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
}

/// A listener of this process, traced by port, with one peer client connected in `mode` and
/// accepted: the tracer, the peer, the server end and both ports. Bind `_listener` (not `..`,
/// which drops it at once): while open, the listener lends the accepted socket its owner.
struct Served {
    _listener: TcpListener,
    tracer: common::Tracer,
    peer: Peer,
    server: TcpStream,
    port: u16,
    peer_port: u16,
}

fn served_client(mode: &str) -> Served {
    let (listener, port) = listener();
    let tracer = tracer_for(port);
    let mut peer = Peer::spawn(None, "client", "127.0.0.1", port, mode);
    let (server, _) = listener.accept().unwrap();
    let peer_port = port_of(&peer.line()["lport"]);
    Served {
        _listener: listener,
        tracer,
        peer,
        server,
        port,
        peer_port,
    }
}

/// A tracer with `--pid` of `pid` (kernel events only), started and ready; and its ready line.
fn tracer_for_pid(pid: impl std::fmt::Display) -> (common::Tracer, Value) {
    let mut tracer = common::Tracer::start(&["--no-capture", "--pid", &pid.to_string()]);
    let ready = tracer.wait_ready(WAIT);
    (tracer, ready)
}

fn me() -> u32 {
    std::process::id()
}

#[test]
fn graceful_close_is_attributed_on_both_ends() {
    if !common::require_root() {
        return;
    }
    let Served {
        mut tracer,
        peer,
        server,
        port,
        peer_port,
        _listener,
    } = served_client("wait-eof-close");
    let fd = server.as_raw_fd();
    drop(server); // this process closes first: FIN out

    let close = tracer.wait_for(|v| is(v, "close", port, peer_port), WAIT);
    assert_eq!(close["pid"], me());
    assert!(!close["comm"].as_str().unwrap().is_empty());
    assert_eq!(close["syscall"], "close");
    assert_eq!(close["fd"], fd);
    assert_eq!(close["outcome"], "fin");
    assert_eq!(close["reason"], Value::Null);
    assert_eq!(close["old_state"], "ESTABLISHED");
    assert_eq!(close["new_state"], "FIN_WAIT1");
    assert_eq!(close["family"], "ipv4");
    assert_eq!(close["laddr"], "127.0.0.1");
    let conn = close["conn"].as_str().unwrap().to_string();

    let peer_fin = tracer.wait_for(|v| is(v, "fin_received", peer_port, port), WAIT);
    assert_eq!(
        peer_fin["pid"], peer.pid,
        "the peer's FIN_RECEIVED belongs to the peer"
    );
    assert_eq!(peer_fin["old_state"], "ESTABLISHED");
    assert_eq!(peer_fin["new_state"], "CLOSE_WAIT");

    // Softirq transitions of our socket keep our pid and conn.
    let fw2 = tracer.wait_for(
        |v| is(v, "state", port, peer_port) && v["new_state"] == "FIN_WAIT2",
        WAIT,
    );
    assert_eq!(fw2["pid"], me());
    assert_eq!(fw2["conn"], conn.as_str());
    assert!(fw2["duration_ns"].as_u64().is_some());

    let peer_close = tracer.wait_for(|v| is(v, "close", peer_port, port), WAIT);
    assert_eq!(peer_close["pid"], peer.pid);
    assert_eq!(peer_close["old_state"], "CLOSE_WAIT");
    assert_eq!(peer_close["new_state"], "LAST_ACK");
    assert_eq!(peer_close["outcome"], "fin");
    let last = tracer.wait_for(
        |v| is(v, "state", port, peer_port) && v["old_state"] == "FIN_WAIT2",
        WAIT,
    );
    assert_eq!(last["pid"], me());
    assert_eq!(last["conn"], conn.as_str());
    peer.wait();
    stops_cleanly(tracer);
}

#[test]
fn close_with_unread_data_is_a_reset_with_the_kernel_reason() {
    if !common::require_root() {
        return;
    }
    let Served {
        mut tracer,
        peer,
        server,
        port,
        peer_port,
        _listener,
    } = served_client("send-wait");
    wait_readable(&server);
    drop(server); // one byte unread: RST

    let close = tracer.wait_for(|v| is(v, "close", port, peer_port), WAIT);
    assert_eq!(close["pid"], me());
    assert_eq!(close["syscall"], "close");
    assert_eq!(close["outcome"], "rst");
    assert_eq!(close["reason"], "TCP_ABORT_ON_CLOSE");
    assert_eq!(close["old_state"], "ESTABLISHED");
    assert_eq!(close["new_state"], "CLOSE");
    let reset = tracer.wait_for(|v| is(v, "rst_received", peer_port, port), WAIT);
    assert_eq!(reset["pid"], peer.pid);
    peer.wait();
    let out = tracer.stop();
    assert!(
        !out.lines.iter().any(|v| is(v, "rst_sent", port, peer_port)),
        "the RST is reported once, folded into the close"
    );
    // Where calls are named from the task's registers (5.15+), the close waits in the kernel
    // for its RST and leaves as one event with it: each event the kernel emitted is one line,
    // none a RST the daemon merged into its close.
    if common::kernel_at_least(5, 15) {
        let socket_lines = out
            .lines
            .iter()
            .filter(|v| !matches!(v["event"].as_str(), Some("ready" | "summary" | "lost")))
            .count();
        let summary = out.lines.last().expect("a summary");
        assert_eq!(
            summary["kernel"]["emitted"], socket_lines,
            "one kernel event per line: {:?}",
            out.lines
        );
    }
}

/// A task that lists /proc/PID/fd (ls, lsof, a monitoring agent) holds each file for a
/// moment; when the owner closes its descriptor meanwhile, the kernel finishes the close in
/// that task, at the end of whatever syscall it was in. Here the test process borrows the
/// peer's socket (pidfd_getfd), the peer closes its descriptor with a byte unread, and the
/// borrowed one goes in a dup2(): still the peer's close with its RST, not a state change and a
/// separate `rst_sent` of this process.
#[test]
fn a_close_finished_in_a_task_that_borrowed_the_file_is_the_owners() {
    let drop_borrowed = |borrowed: i32| {
        let devnull = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: both descriptors are open; dup2 drops the socket's last reference, then the
        // descriptor (now /dev/null's) is closed.
        unsafe {
            assert!(libc::dup2(devnull.as_raw_fd(), borrowed) >= 0);
            libc::close(borrowed);
        }
    };
    abortive_close_by_no_call("hold", borrow_descriptor, drop_borrowed);
}

/// A dup2() over the socket's last descriptor closes it too, and the kernel finishes that close
/// at the end of the dup2: the peer's close with its RST, by no known call.
#[test]
fn a_dup2_over_the_last_descriptor_is_a_close() {
    abortive_close_by_no_call("hold-dup2", |_, _| (), |()| ());
}

/// A socket shut down for writing, its last reference then dropped by a dup2() over the
/// descriptor (as the JDK's Socket.close() does while another thread reads): tcp_close() in
/// FIN_WAIT2 stores the same state again, in no call. That is the close: a line of its own,
/// by the owner, `syscall` null, nothing sent (the FIN went at the shutdown).
#[test]
fn a_close_by_no_call_after_a_shutdown_is_a_close() {
    if !common::require_root() {
        return;
    }
    let Served {
        mut tracer,
        mut peer,
        server,
        port,
        peer_port,
        _listener,
    } = served_client("shutdown-dup2");
    let shutdown = tracer.wait_for(|v| is(v, "close", peer_port, port), WAIT);
    assert_eq!(shutdown["syscall"], "shutdown", "{shutdown}");
    tracer.wait_for(
        |v| v["event"] == "state" && v["lport"] == peer_port && v["new_state"] == "FIN_WAIT2",
        WAIT,
    );
    peer.release(); // the dup2
    let close = tracer.wait_for(
        |v| is(v, "close", peer_port, port) && v["syscall"] != "shutdown",
        WAIT,
    );
    assert_eq!(close["pid"], peer.pid, "{close}");
    assert_eq!(close["syscall"], Value::Null, "{close}");
    assert_eq!(close["fd"], Value::Null, "{close}");
    assert_eq!(close["old_state"], "FIN_WAIT2", "{close}");
    assert_eq!(close["new_state"], "FIN_WAIT2", "{close}");
    assert_eq!(close["outcome"], Value::Null, "{close}");
    drop(server);
    peer.wait();
    tracer.stop();
}

/// A peer (`behaviour`: `hold` or a variant) lets its socket go once released, with the byte
/// this test sent unread; `borrow` runs before that (given the peer's pid and descriptor),
/// `finish` once the peer has exited. The peer's line must be one abortive `close` of its own
/// by no known call, and the only line of that end. Skips where the kernel cannot tell
/// (calls are named from the registers on 5.15+).
fn abortive_close_by_no_call<T>(
    behaviour: &str,
    borrow: impl FnOnce(u32, i32) -> T,
    finish: impl FnOnce(T),
) {
    if !common::require_root() {
        return;
    }
    if !common::kernel_at_least(5, 15) {
        eprintln!("skipped: told only where calls are named from the registers (Linux 5.15+)");
        return;
    }
    let (listener, port) = listener();
    let mut tracer = tracer_for(port);
    let mut peer = Peer::spawn(None, "client", "127.0.0.1", port, behaviour);
    let (mut server, _) = listener.accept().unwrap();
    let reported = peer.line();
    let peer_port = port_of(&reported["lport"]);
    let borrowed = borrow(peer.pid, reported["fd"].as_i64().unwrap() as i32);
    server.write_all(b"x").unwrap(); // left unread by the peer: its close resets
    let owner = peer.pid;
    peer.wait();
    finish(borrowed);
    let close = tracer.wait_for(|v| is(v, "close", peer_port, port), WAIT);
    assert_eq!(close["pid"], owner, "{close}");
    assert_eq!(close["syscall"], Value::Null, "{close}");
    assert_eq!(close["old_state"], "ESTABLISHED", "{close}");
    assert_eq!(close["outcome"], "rst", "{close}");
    assert_eq!(close["reason"], "TCP_ABORT_ON_CLOSE", "{close}");
    let out = tracer.stop();
    let peer_end: Vec<&Value> = out
        .lines
        .iter()
        .filter(|v| v["lport"] == peer_port && v["rport"] == port)
        .collect();
    assert_eq!(peer_end.len(), 1, "{peer_end:?}");
}

/// A descriptor of this process for process `pid`'s descriptor `fd` (pidfd_getfd, 5.6+).
fn borrow_descriptor(pid: u32, fd: i32) -> i32 {
    // SAFETY: plain syscalls; the results are checked.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let borrowed = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        assert!(
            borrowed >= 0,
            "pidfd_getfd: {}",
            std::io::Error::last_os_error()
        );
        libc::close(pidfd);
        borrowed
    }
}

#[test]
fn linger_zero_close_is_a_reset() {
    if !common::require_root() {
        return;
    }
    let Served {
        mut tracer,
        peer,
        mut server,
        port,
        peer_port,
        _listener,
    } = served_client("linger0-close");
    let close = tracer.wait_for(|v| is(v, "close", peer_port, port), WAIT);
    assert_eq!(close["pid"], peer.pid);
    assert_eq!(close["outcome"], "rst");
    assert_eq!(
        close["reason"], "TCP_STATE",
        "SO_LINGER {{1,0}} resets through tcp_disconnect"
    );
    assert_eq!(close["new_state"], "CLOSE");
    let reset = tracer.wait_for(|v| is(v, "rst_received", port, peer_port), WAIT);
    assert_eq!(
        reset["pid"],
        me(),
        "the peer's RST is attributed to this process, not a softirq"
    );
    assert_eq!(reset["old_state"], "ESTABLISHED");
    let mut buf = [0u8; 1];
    assert!(server.read(&mut buf).is_err(), "the socket was reset");
    peer.wait();
    tracer.stop();
}

#[test]
fn shutdown_write_is_reported_as_shutdown() {
    if !common::require_root() {
        return;
    }
    let Served {
        mut tracer,
        peer,
        server,
        port,
        peer_port,
        _listener,
    } = served_client("wait-eof-close");
    server.shutdown(Shutdown::Write).unwrap();
    let close = tracer.wait_for(|v| is(v, "close", port, peer_port), WAIT);
    assert_eq!(close["syscall"], "shutdown");
    assert_eq!(close["fd"], server.as_raw_fd());
    assert_eq!(close["outcome"], "fin");
    assert_eq!(close["new_state"], "FIN_WAIT1");
    assert_eq!(close["pid"], me());
    peer.wait();
    drop(server);
    tracer.stop();
}

/// close_range(2) closes descriptors without close(2): named `close`, with its descriptor when
/// it closes one (first == last: how libraries close a single descriptor with it) and none for
/// a range (Python's os.closerange, in a process of its own: a range closed here could take
/// descriptors other tests' threads hold). (Before calls were read from the task's registers
/// it had no call: `null`; before the second argument was read, no descriptor either.)
#[test]
fn close_range_is_reported_as_a_close() {
    if !common::require_root() {
        return;
    }
    let Served {
        mut tracer,
        peer,
        server,
        port,
        peer_port,
        _listener,
    } = served_client("wait-eof-close");
    let fd = std::os::fd::IntoRawFd::into_raw_fd(server);
    // SAFETY: closes only the descriptor just taken out of `server`.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, fd, fd, 0) };
    assert_eq!(ret, 0, "close_range: {}", std::io::Error::last_os_error());
    let close = tracer.wait_for(|v| is(v, "close", port, peer_port), WAIT);
    assert_eq!(close["syscall"], "close", "{close}");
    assert_eq!(close["fd"], fd, "{close}");
    assert_eq!(close["outcome"], "fin");
    assert_eq!(close["new_state"], "FIN_WAIT1");
    assert_eq!(close["pid"], me());
    peer.wait();
    tracer.stop();

    let (l, port) = listener();
    let mut tracer = tracer_for(port);
    let mut ranged = common::Script::spawn(
        r#"
import os, socket, sys
print(os.getpid(), flush=True)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
os.dup2(s.fileno(), 100)
s.close()
sys.stdin.read(1)
os.closerange(100, 103)  # close_range(100, 102, 0)
print("closed", flush=True)
"#,
        &[&port.to_string()],
    );
    let client_port: u16 = ranged.line().parse().expect("the client's port");
    let (_server, _) = l.accept().unwrap();
    ranged.go();
    assert_eq!(ranged.line(), "closed");
    let close = tracer.wait_for(|v| is(v, "close", client_port, port), WAIT);
    assert_eq!(close["syscall"], "close", "{close}");
    assert_eq!(close["fd"], Value::Null, "{close}");
    assert_eq!(close["pid"], ranged.pid, "{close}");
    ranged.stop();
    tracer.stop();
}

/// Both ends in this process: after a half-close, closing the server end sends its FIN, and
/// the client end (in FIN_WAIT2) moves to its time-wait form in the softirq that runs inside
/// that same close(2). That move is not the close's: only the server end's line names it.
#[test]
fn a_move_of_another_socket_inside_a_close_is_not_that_close() {
    if !common::require_root() {
        return;
    }
    let (l, port) = listener();
    let mut tracer = tracer_for(port);
    let (mut client, mut server) = common::tcp_pair_on(&l);
    let client_port = client.local_addr().unwrap().port();
    common::shutdown_write(&client);
    common::read_to_eof(&mut server);
    // The client end reaches FIN_WAIT2 once the server's ACK is processed.
    tracer.wait_for(
        |v| is(v, "state", client_port, port) && v["new_state"] == "FIN_WAIT2",
        WAIT,
    );
    let server_fd = server.as_raw_fd();
    drop(server);
    let close = tracer.wait_for(|v| is(v, "close", port, client_port), WAIT);
    assert_eq!(close["syscall"], "close");
    assert_eq!(close["fd"], server_fd);
    assert_eq!(close["new_state"], "LAST_ACK");
    common::read_to_eof(&mut client);
    let client_fd = client.as_raw_fd();
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    let out = tracer.stop();
    // The client end's own calls: its shutdown, and its close of the socket (by then in
    // CLOSE, its time-wait form holding the connection), which sent nothing.
    let client_closes = out.lines_of("close", client_port, port);
    assert_eq!(client_closes.len(), 2, "{client_closes:?}");
    assert_eq!(client_closes[0]["syscall"], "shutdown");
    assert_eq!(client_closes[1]["syscall"], "close");
    assert_eq!(client_closes[1]["fd"], client_fd, "{client_closes:?}");
    assert_eq!(client_closes[1]["old_state"], "CLOSE", "{client_closes:?}");
    assert_eq!(
        client_closes[1]["outcome"],
        Value::Null,
        "{client_closes:?}"
    );
    assert!(
        out.lines
            .iter()
            .any(|v| is(v, "state", client_port, port) && v["new_state"] == "CLOSE"),
        "the client end's FIN_WAIT2 -> CLOSE is a state line"
    );
}

/// A server peer that resets (SO_LINGER 0) the connection this process makes to it, a
/// tracer of its port, and our end: (peer, its port, tracer, our stream, our port).
fn reset_by_a_linger0_server() -> (Peer, u16, common::Tracer, TcpStream, u16) {
    let mut peer = Peer::spawn(None, "server", "127.0.0.1", 0, "linger0-close");
    let port = port_of(&peer.line()["listening"]);
    let tracer = tracer_for(port);
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let my_port = client.local_addr().unwrap().port();
    peer.line();
    (peer, port, tracer, client, my_port)
}

#[test]
fn a_peer_reset_is_rst_received_on_the_right_pid() {
    if !common::require_root() {
        return;
    }
    let (peer, port, mut tracer, client, my_port) = reset_by_a_linger0_server();
    let reset = tracer.wait_for(|v| is(v, "rst_received", my_port, port), WAIT);
    assert_eq!(reset["pid"], me());
    assert_eq!(reset["owner"], "task");
    let sent = tracer.wait_for(|v| is(v, "close", port, my_port), WAIT);
    assert_eq!(sent["pid"], peer.pid);
    peer.wait();
    drop(client);
    tracer.stop();
}

/// close() of a socket the peer already reset: tcp_close() finds it in CLOSE and destroys it
/// with no state move. The close still has its line: the call, its descriptor, CLOSE -> CLOSE,
/// outcome null (the kernel sent nothing), and how long the reset socket waited for its owner
/// (it had no line at all: nginx and Go close every reset connection so). The same for a
/// connect() the peer refused: the client's close of its socket.
#[test]
fn closing_a_socket_the_peer_reset_is_a_close_that_sent_nothing() {
    if !common::require_root() {
        return;
    }
    let (peer, port, mut tracer, client, my_port) = reset_by_a_linger0_server();
    tracer.wait_for(|v| is(v, "rst_received", my_port, port), WAIT);
    std::thread::sleep(Duration::from_millis(100));
    let fd = client.as_raw_fd();
    drop(client);
    let close = tracer.wait_for(|v| is(v, "close", my_port, port), WAIT);
    assert_eq!(close["pid"], me(), "{close}");
    assert_eq!(close["owner"], "task", "{close}");
    assert_eq!(close["syscall"], "close", "{close}");
    assert_eq!(close["fd"], fd, "{close}");
    assert_eq!(close["old_state"], "CLOSE", "{close}");
    assert_eq!(close["new_state"], "CLOSE", "{close}");
    assert_eq!(close["outcome"], Value::Null, "{close}");
    let waited = close["duration_ns"].as_u64().expect("time since the reset");
    assert!(
        (90_000_000..5_000_000_000).contains(&waited),
        "closed {waited} ns after the reset, ~100 ms: {close}"
    );
    peer.wait();
    // Refused: nothing listens on the port any more.
    let refused = TcpStream::connect(("127.0.0.1", port));
    assert!(refused.is_err(), "{refused:?}");
    let out = tracer.stop();
    let closes: Vec<_> = out
        .lines
        .iter()
        .filter(|v| v["event"] == "close" && v["rport"] == port && v["old_state"] == "CLOSE")
        .collect();
    let (reset, refused): (Vec<&Value>, Vec<&Value>) =
        closes.iter().copied().partition(|v| v["lport"] == my_port);
    assert_eq!(reset.len(), 1, "one close of the reset socket: {closes:?}");
    assert_eq!(refused.len(), 1, "and one of the refused one: {closes:?}");
    assert_eq!(refused[0]["pid"], me(), "{closes:?}");
    assert_eq!(refused[0]["outcome"], Value::Null, "{closes:?}");
    assert_eq!(
        refused[0]["raddr"], "127.0.0.1",
        "addresses from its earlier events"
    );
    assert_eq!(refused[0]["old_state"], "CLOSE", "{closes:?}");
}

#[test]
fn process_exit_closes_are_attributed_to_the_exiting_process() {
    if !common::require_root() {
        return;
    }
    let Served {
        mut tracer,
        peer,
        server,
        port,
        peer_port,
        _listener,
    } = served_client("exit");
    let close = tracer.wait_for(|v| is(v, "close", peer_port, port), WAIT);
    assert_eq!(close["pid"], peer.pid);
    assert_eq!(close["syscall"], "exit");
    assert_eq!(close["fd"], Value::Null);
    let fin = tracer.wait_for(|v| is(v, "fin_received", port, peer_port), WAIT);
    assert_eq!(fin["pid"], me());
    peer.wait();
    drop(server);
    tracer.stop();
}

/// A python script run with piped stdin and stdout: it prints JSON lines and waits for a line
/// on stdin where the test says when to go on.
struct Script {
    child: std::process::Child,
    stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Script {
    fn start(code: &str, args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .args(["-c", code])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, stdout }
    }

    /// Its next JSON line.
    fn line(&mut self) -> Value {
        serde_json::from_str(&self.stdout.next().unwrap().unwrap()).unwrap()
    }

    fn go(&mut self) {
        writeln!(self.child.stdin.as_mut().unwrap(), "go").unwrap();
    }

    fn succeeds(mut self) {
        assert!(self.child.wait().unwrap().success());
    }
}

/// A child that inherited a socket and never used it (a helper started with the descriptor
/// open) closes the connection when it exits, after its parent closed its own copy. The line
/// names the child and the call: `syscall` was null, since the socket's recorded owner is the
/// parent and an exit claimed only its own process's sockets; but ESTABLISHED -> FIN_WAIT1 in
/// the exiting task is a move only a close makes, so it is the exit's own.
/// A listening socket a child inherited, closed by the child's exit after the parent closed its
/// copy and exited (a forking server's children keep the port open: `ncat -k --sh-exec`): the
/// LISTEN -> CLOSE line named the parent (the listener's recorded owner, `syscall` null), gone by
/// then. The same for a connection with unread data the child inherited (its RST close). The
/// exit's own tcp_close() is the exiting child's.
#[test]
fn a_listener_and_a_connection_a_child_inherited_are_closed_by_its_exit() {
    if !common::require_root() {
        return;
    }
    let (l, port) = listener();
    let listen = common::free_port();
    // Started first: the parent's listen() and connect() make it the sockets' recorded owner.
    let mut tracer = common::Tracer::start(&[
        "--no-capture",
        "--port",
        &port.to_string(),
        "--port",
        &listen.to_string(),
    ]);
    tracer.wait_ready(WAIT);
    let script = r#"
import json, os, socket, subprocess, sys, time
srv = socket.socket()
srv.bind(("127.0.0.1", int(sys.argv[2])))
srv.listen(4)
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
lport = c.getsockname()[1]
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         pass_fds=[srv.fileno(), c.fileno()], stdin=subprocess.PIPE)
print(json.dumps({"child": child.pid, "lport": lport}), flush=True)
sys.stdin.readline()
srv.close()  # the parent's copies: nothing happens to either socket
c.close()
print("{}", flush=True)
sys.stdin.readline()
child.stdin.close()  # the child exits, closing the last copies
child.wait()
"#;
    let mut parent = Script::start(script, &[&port.to_string(), &listen.to_string()]);
    let (mut server, _) = l.accept().unwrap();
    let info = parent.line();
    let (child, lport) = (info["child"].as_u64().unwrap(), port_of(&info["lport"]));
    server.write_all(b"unread").unwrap();
    parent.go();
    parent.line();
    std::thread::sleep(Duration::from_millis(200));
    parent.go();
    let closed_listener = tracer.wait_for(|v| is(v, "close", listen, 0), WAIT);
    assert_eq!(closed_listener["old_state"], "LISTEN", "{closed_listener}");
    assert_eq!(closed_listener["pid"], child, "{closed_listener}");
    assert_eq!(closed_listener["syscall"], "exit", "{closed_listener}");
    let close = tracer.wait_for(|v| is(v, "close", lport, port), WAIT);
    assert_eq!(close["pid"], child, "{close}");
    assert_eq!(close["syscall"], "exit", "{close}");
    assert_eq!(close["outcome"], "rst", "{close}");
    parent.succeeds();
    drop(server);
    stops_cleanly(tracer);
}

#[test]
fn an_inherited_socket_closed_by_its_exit_names_the_exiting_child() {
    if !common::require_root() {
        return;
    }
    let (l, port) = listener();
    let mut tracer = tracer_for(port);
    let script = r#"
import json, socket, subprocess, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
lport = c.getsockname()[1]
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         pass_fds=[c.fileno()], stdin=subprocess.PIPE)
c.close()  # the parent's copy: nothing happens to the connection
print(json.dumps({"child": child.pid, "lport": lport}), flush=True)
sys.stdin.readline()
child.stdin.close()  # the child exits, closing the last copy
child.wait()
"#;
    let mut parent = Script::start(script, &[&port.to_string()]);
    let (server, _) = l.accept().unwrap();
    let info = parent.line();
    let (child, lport) = (info["child"].as_u64().unwrap(), port_of(&info["lport"]));
    parent.go();
    let close = tracer.wait_for(|v| is(v, "close", lport, port), WAIT);
    assert_eq!(close["pid"], child, "{close}");
    assert_eq!(close["syscall"], "exit", "{close}");
    assert_eq!(close["outcome"], "fin", "{close}");
    parent.succeeds();
    drop(server);
    tracer.stop();
}

/// A close(2) of a pipe is not the close of a socket the same task resets right after it:
/// the call's descriptor says which socket it acts on (before, a call claimed the first
/// socket that moved during it or within 20 ms after it returned, so this disconnect came out
/// as a `close` of the pipe's fd). connect(AF_UNSPEC) disconnects in the task's own context,
/// which makes the sequence deterministic; a softirq that moves a socket inside an unrelated
/// call is the same case, by chance.
#[test]
fn a_reset_right_after_closing_a_pipe_is_not_that_close() {
    if !common::require_root() {
        return;
    }
    let (l, port) = listener();
    let mut tracer = tracer_for(port);
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let my_port = client.local_addr().unwrap().port();
    let (server, _) = l.accept().unwrap();
    let mut pipe = [0i32; 2];
    // SAFETY: pipe(2) into a two-int array, then closing the descriptors it made; connect(2)
    // with a zeroed sockaddr of family AF_UNSPEC, the documented way to disconnect.
    let pipe_fd = unsafe {
        assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
        assert_eq!(libc::close(pipe[0]), 0);
        let mut unspec: libc::sockaddr = std::mem::zeroed();
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        let len = std::mem::size_of::<libc::sockaddr>() as libc::socklen_t;
        assert_eq!(libc::connect(client.as_raw_fd(), &unspec, len), 0);
        libc::close(pipe[1]);
        pipe[0]
    };
    let moved = tracer.wait_for(
        |v| v["lport"] == my_port && v["rport"] == port && v["new_state"] == "CLOSE",
        WAIT,
    );
    assert_eq!(moved["old_state"], "ESTABLISHED");
    assert_ne!(moved["event"], "close", "not the pipe's close: {moved}");
    assert_eq!(moved["syscall"], Value::Null, "{moved}");
    let reset = tracer.wait_for(|v| is(v, "rst_received", port, my_port), WAIT);
    assert_eq!(reset["pid"], me());
    drop((client, server));
    let out = tracer.stop();
    let pipe_close = out.lines.iter().find(|v| v["fd"] == pipe_fd);
    assert!(
        pipe_close.is_none(),
        "a line names the pipe: {pipe_close:?}"
    );
}

#[test]
fn a_connection_opened_before_the_tracer_is_attributed() {
    if !common::require_root() {
        return;
    }
    let (l, port) = listener();
    let mut peer = Peer::spawn(None, "client", "127.0.0.1", port, "hold");
    let (server, _) = l.accept().unwrap();
    let peer_port = port_of(&peer.line()["lport"]);
    // Started after the connection exists: only the /proc seed can know the peer owns it.
    let mut tracer = tracer_for(port);
    drop(server);
    let fin = tracer.wait_for(|v| is(v, "fin_received", peer_port, port), WAIT);
    assert_eq!(fin["pid"], peer.pid, "seeded from /proc/{}/fd", peer.pid);
    assert_eq!(fin["owner"], "seeded");
    peer.release();
    let close = tracer.wait_for(|v| is(v, "close", peer_port, port), WAIT);
    assert_eq!(close["pid"], peer.pid);
    peer.wait();
    tracer.stop();
}

/// The peer side of `a_host_with_more_connections_than_the_smallest_seed_table`: opens N
/// connections to the port, says so, and on a line on stdin resets them all (SO_LINGER 0).
const MANY_CONNECTIONS_PEER: &str = r#"
import socket, struct, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
print("connected", flush=True)
sys.stdin.readline()
for i, s in enumerate(socks):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    if i % 500 == 499:
        # Paced: two lines per reset, read by a test thread that shares two cores with the
        # other tests; an unpaced burst of 34000 overflowed the output queue (counted as
        # lost output) on a loaded run.
        time.sleep(0.05)
print("reset", flush=True)
"#;

/// More connections opened before the tracer than the seed table's smallest size (16384), as a
/// busy proxy has: the table is sized to the host's sockets at start-up, so each is seeded, and
/// the peer's reset of each, which the kernel handles in a softirq before the owner acts, still
/// names this process (with `--pid`, is traced at all: a connection that found no room was
/// silently left out).
#[test]
fn a_host_with_more_connections_than_the_smallest_seed_table() {
    if !common::require_root() {
        return;
    }
    const N: usize = 17_000;
    // The peer inherits the limit; each process holds one end of every connection.
    let limit = common::raise_fd_limit(2 * N + 1024);
    assert!(
        limit >= N + 512,
        "this test needs {} open files per process and the limit is {limit}: raise the hard \
         limit (ulimit -Hn) or run it with CAP_SYS_RESOURCE",
        N + 512
    );
    let (l, port) = listener();
    let mut peer = Command::new("python3")
        .args([
            "-c",
            MANY_CONNECTIONS_PEER,
            &N.to_string(),
            &port.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let accepted: Vec<TcpStream> = (0..N).map(|_| l.accept().unwrap().0).collect();
    let mut peer_out = BufReader::new(peer.stdout.take().unwrap());
    let mut line = String::new();
    peer_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");

    let me = me();
    let mut tracer = common::Tracer::start(&[
        "--no-capture",
        "--pid",
        &me.to_string(),
        "--port",
        &port.to_string(),
    ]);
    let ready = tracer.wait_ready(Duration::from_secs(60));
    assert!(
        ready["seeded"]["connections"].as_u64() >= Some(N as u64),
        "{}",
        ready["seeded"]
    );
    assert_eq!(ready["seeded"]["unseeded"], 0, "{}", ready["seeded"]);
    writeln!(peer.stdin.as_mut().unwrap()).unwrap();
    line.clear();
    peer_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "reset");
    assert!(peer.wait().unwrap().success());

    // Each line is offered to the predicate once, in order: it counts them up to the N-th.
    let resets = std::cell::Cell::new(0);
    tracer.wait_for(
        |v| {
            if v["event"] == "rst_received" && v["lport"] == port {
                resets.set(resets.get() + 1);
            }
            resets.get() >= N
        },
        Duration::from_secs(60),
    );
    let out = tracer.stop();
    drop(accepted);
    let owned: Vec<&Value> = out
        .lines
        .iter()
        .filter(|v| v["event"] == "rst_received" && v["lport"] == port)
        .collect();
    assert_eq!(owned.len(), N, "every reset is traced");
    assert!(
        owned
            .iter()
            .all(|v| v["pid"] == me && v["owner"] == "seeded"),
        "each names this process, from the seed: {:?}",
        owned
            .iter()
            .find(|v| v["pid"] != me || v["owner"] != "seeded")
    );
    let summary = out.lines.last().unwrap();
    assert_eq!(summary["lost"]["ringbuf"], 0, "{summary}");
}

#[test]
fn pid_filter_runs_in_the_kernel() {
    if !common::require_root() {
        return;
    }
    // B: a process that churns connections; A (the traced one) does one graceful close.
    let (l, port) = listener();
    let mut a = Peer::spawn(None, "client", "127.0.0.1", port, "hold");
    let (a_server, _) = l.accept().unwrap();
    let a_port = port_of(&a.line()["lport"]);
    let (mut tracer, _) = tracer_for_pid(a.pid);
    let churned = churn(&l, port, 200);
    a.release();
    let close = tracer.wait_for(|v| is(v, "close", a_port, port), WAIT);
    let a_pid = a.pid;
    assert_eq!(close["pid"], a_pid);
    a.wait();
    drop(a_server);
    let out = tracer.stop();
    let foreign: Vec<&Value> = out
        .lines
        .iter()
        .filter(|v| v["pid"].as_u64().is_some_and(|p| p != a_pid as u64))
        .collect();
    assert!(foreign.is_empty(), "events of other processes: {foreign:?}");
    let summary = out.lines.last().unwrap();
    assert_eq!(summary["event"], "summary");
    let emitted = summary["kernel"]["emitted"].as_u64().unwrap();
    let filtered = summary["kernel"]["filtered"].as_u64().unwrap();
    assert!(
        emitted < 10,
        "{churned} churned connections must not reach the ring buffer (emitted {emitted})"
    );
    assert!(
        filtered >= churned as u64,
        "filtered {filtered} < {churned}"
    );
}

/// A forking server (inetd, Apache prefork, many Python servers): it accepts, forks a child for
/// the connection and closes its own copy of the socket, which does nothing to the connection.
/// Prints its pid, waits for a line on stdin, then prints the child's pid and the ports. With
/// the argument `exit`, the child ends without closing the socket: its exit closes it.
const FORKING_SERVER: &str = r#"
import json, os, socket, sys, time
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(1)
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.readline()
c = socket.create_connection(l.getsockname())
s, _ = l.accept()
fd = s.fileno()
child = os.fork()
if child == 0:
    time.sleep(0.2)
    if sys.argv[1:] != ["exit"]:
        s.close()
    os._exit(0)
s.close()
print(json.dumps({"child": child, "fd": fd, "sport": l.getsockname()[1],
                  "cport": c.getsockname()[1]}), flush=True)
os.waitpid(child, 0)
c.recv(1)
c.close()
"#;

/// With `--pid` of the forking server, the connection it accepted stays traced after the
/// hand-over: the child's close is reported, naming the child and its call, and so are the
/// socket's later moves. (They were filtered out: the close made the untraced child its owner;
/// then the child's call was unknown: its calls were not recorded.)
#[test]
fn a_forked_child_closing_what_a_traced_parent_accepted_is_reported() {
    if !common::require_root() {
        return;
    }
    let mut server = Script::start(FORKING_SERVER, &[]);
    let parent = server.line()["pid"].as_u64().unwrap();
    let (mut tracer, _) = tracer_for_pid(parent);
    server.go();
    let info = server.line();
    let (child, sport, cport) = (
        info["child"].as_u64().unwrap(),
        port_of(&info["sport"]),
        port_of(&info["cport"]),
    );
    let close = tracer.wait_for(|v| is(v, "close", sport, cport), WAIT);
    assert_eq!(close["pid"], child, "the child closed it: {close}");
    // A traced process's forked children have their calls recorded (never their own sockets).
    assert_eq!(close["syscall"], "close", "{close}");
    assert_eq!(close["fd"], info["fd"], "{close}");
    assert_eq!(close["outcome"], "fin", "{close}");
    assert_eq!(close["new_state"], "FIN_WAIT1", "{close}");
    let later = tracer.wait_for(
        |v| is(v, "state", sport, cport) && v["new_state"] == "FIN_WAIT2",
        WAIT,
    );
    assert_eq!(later["conn"], close["conn"], "{later}");
    // The parent's own end of the connection, for comparison.
    tracer.wait_for(
        |v| is(v, "fin_received", cport, sport) && v["pid"] == parent,
        WAIT,
    );
    server.succeeds();
    stops_cleanly(tracer);
}

/// The same hand-over, but the child never closes the socket: its exit does, and the line says
/// so (the child's exit is recorded like its calls).
#[test]
fn a_forked_childs_exit_closing_what_a_traced_parent_accepted_names_the_exit() {
    if !common::require_root() {
        return;
    }
    let mut server = Script::start(FORKING_SERVER, &["exit"]);
    let parent = server.line()["pid"].as_u64().unwrap();
    let (mut tracer, _) = tracer_for_pid(parent);
    server.go();
    let info = server.line();
    let (sport, cport) = (port_of(&info["sport"]), port_of(&info["cport"]));
    let close = tracer.wait_for(|v| is(v, "close", sport, cport), WAIT);
    assert_eq!(
        close["pid"], info["child"],
        "the child's exit closed it: {close}"
    );
    assert_eq!(close["syscall"], "exit", "{close}");
    assert_eq!(close["new_state"], "FIN_WAIT1", "{close}");
    server.succeeds();
    stops_cleanly(tracer);
}

/// A pre-forked server (nginx, Apache, PostgreSQL, gunicorn): it listens and forks a worker
/// before the tracer starts; the worker accepts, reads the request, answers, and closes once
/// the client has closed. Prints the parent's pid, its worker's and the port, waits for a line
/// on stdin, connects; the worker prints the descriptor and the client's port when it answers.
const PREFORKED_SERVER: &str = r#"
import json, os, socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(8)
worker = os.fork()
if worker == 0:
    s, peer = l.accept()
    s.recv(1)
    s.send(b"y")
    print(json.dumps({"fd": s.fileno(), "cport": peer[1]}), flush=True)
    s.recv(1)
    s.close()
    os._exit(0)
print(json.dumps({"pid": os.getpid(), "worker": worker, "port": l.getsockname()[1]}), flush=True)
sys.stdin.readline()
c = socket.create_connection(l.getsockname())
c.send(b"x")
c.recv(1)
c.close()
os.waitpid(worker, 0)
"#;

/// With `--pid` of a pre-forked server's parent, its running workers are followed: the
/// client's FIN reaching the worker's socket names the worker that served it (its reads and
/// writes claimed the socket), and the worker's close names its syscall and descriptor.
#[test]
fn a_preforked_worker_is_named_with_its_call_under_the_parents_pid() {
    if !common::require_root() {
        return;
    }
    let mut server = Script::start(PREFORKED_SERVER, &[]);
    let info = server.line();
    let (parent, worker) = (info["pid"].as_u64().unwrap(), &info["worker"]);
    let port = port_of(&info["port"]);
    let (mut tracer, ready) = tracer_for_pid(parent);
    assert!(
        ready["seeded"]["children"].as_u64() >= Some(1),
        "the running worker is followed: {ready}"
    );
    server.go();
    let served = server.line();
    let cport = port_of(&served["cport"]);
    let fin = tracer.wait_for(|v| is(v, "fin_received", port, cport), WAIT);
    assert_eq!(&fin["pid"], worker, "the worker serves it: {fin}");
    assert_eq!(fin["owner"], "task", "{fin}");
    let close = tracer.wait_for(|v| is(v, "close", port, cport), WAIT);
    assert_eq!(&close["pid"], worker, "the worker closed it: {close}");
    assert_eq!(close["syscall"], "close", "{close}");
    assert_eq!(close["fd"], served["fd"], "{close}");
    server.succeeds();
    stops_cleanly(tracer);
}

/// Two pre-forked workers share their parent's listener. Worker B serves the first connection;
/// then worker A serves the second. Prints the workers' pids and the port, waits for a line on
/// stdin, then prints each connection's client port once it is over.
const TWO_WORKERS: &str = r#"
import json, os, socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(8)
go_r, go_w = os.pipe()
def serve_one():
    s, _ = l.accept()
    s.recv(1)
    s.close()
    os._exit(0)
a = os.fork()
if a == 0:
    os.read(go_r, 1)
    serve_one()
b = os.fork()
if b == 0:
    serve_one()
print(json.dumps({"a": a, "b": b, "port": l.getsockname()[1]}), flush=True)
sys.stdin.readline()
for worker, name in ((b, "b"), (a, "a")):
    if worker == a:
        os.write(go_w, b"g")
    c = socket.create_connection(l.getsockname())
    c.send(b"x")
    os.waitpid(worker, 0)
    c.recv(1)
    print(json.dumps({name: c.getsockname()[1]}), flush=True)
    c.close()
"#;

/// A pre-forked server script (`TWO_WORKERS` and the like) started: it, its port and worker
/// A's pid.
fn workers_started(code: &str) -> (Script, u16, u64) {
    let mut server = Script::start(code, &[]);
    let info = server.line();
    (server, port_of(&info["port"]), info["a"].as_u64().unwrap())
}

/// `--pid` of one worker of a pre-forked server: the listener it shares with its parent and a
/// sibling says nothing about who accepts, so its sibling's connection is not reported (it
/// was, named after the traced worker, then after the sibling at its close); its own is.
#[test]
fn pid_of_one_worker_does_not_report_its_siblings_connections() {
    if !common::require_root() {
        return;
    }
    let (mut server, port, a) = workers_started(TWO_WORKERS);
    let (mut tracer, _) = tracer_for_pid(a);
    server.go();
    let b_port = port_of(&server.line()["b"]);
    let a_port = port_of(&server.line()["a"]);
    let close = tracer.wait_for(|v| is(v, "close", port, a_port), WAIT);
    assert_eq!(close["pid"], a, "{close}");
    server.succeeds();
    let out = tracer.stop();
    let siblings: Vec<_> = out
        .lines
        .iter()
        .filter(|v| v["lport"] == port && v["rport"] == b_port)
        .collect();
    assert!(
        siblings.is_empty(),
        "the sibling's connection: {siblings:?}"
    );
    assert!(out.stderr.contains("shared with"), "{}", out.stderr);
}

/// Worker A of two serves one connection until the client's FIN, then closes. Prints the
/// workers' pids and the port, waits for a line on stdin, then connects (from the parent, whose
/// connection is not traced), exchanges a byte with A, prints its port and closes.
const WORKER_SERVES_UNTIL_FIN: &str = r#"
import json, os, signal, socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(8)
go_r, go_w = os.pipe()
a = os.fork()
if a == 0:
    os.read(go_r, 1)
    s, _ = l.accept()
    s.recv(1)
    s.send(b"y")
    s.recv(1)
    s.close()
    os._exit(0)
b = os.fork()
if b == 0:
    signal.pause()
print(json.dumps({"a": a, "b": b, "port": l.getsockname()[1]}), flush=True)
sys.stdin.readline()
os.write(go_w, b"g")
c = socket.create_connection(l.getsockname())
c.send(b"x")
c.recv(1)
print(json.dumps({"cport": c.getsockname()[1]}), flush=True)
c.close()
os.waitpid(a, 0)
os.kill(b, signal.SIGKILL)
os.waitpid(b, 0)
"#;

/// `--pid` of one worker whose listener its sibling shares: the worker's socket is known from
/// its first read, and is handed to the capture filter then, so the client's FIN, the next
/// packet of the connection, is joined (it passed no filter: `wire: null`, as nginx showed).
#[test]
fn pid_of_one_worker_joins_the_peers_fin_on_what_it_serves() {
    if !common::require_root() {
        return;
    }
    let (mut server, port, a) = workers_started(WORKER_SERVES_UNTIL_FIN);
    let mut tracer = common::Tracer::start(&["-i", "lo", "--pid", &a.to_string()]);
    tracer.wait_ready(WAIT);
    server.go();
    let cport = port_of(&server.line()["cport"]);
    for (event, dir) in [("fin_received", "in"), ("close", "out")] {
        let line = tracer.wait_for(|v| is(v, event, port, cport), WAIT);
        assert_eq!(line["pid"], a, "{line}");
        let wire = &line["wire"];
        assert_eq!(wire["dir"], dir, "the FIN is joined: {line}");
        assert!(
            wire["flags"]
                .as_array()
                .is_some_and(|f| f.contains(&"FIN".into())),
            "{line}"
        );
    }
    server.succeeds();
    tracer.stop();
}

/// A listener handed down, as systemd socket activation or a supervisor does: the parent
/// makes it and keeps its copy, the child serves. Prints the child's pid and the port, waits
/// for a line on stdin, connects and closes at once; then lets the child accept and close.
const HANDED_DOWN_LISTENER: &str = r#"
import json, os, socket, sys
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(8)
go_r, go_w = os.pipe()
child = os.fork()
if child == 0:
    os.read(go_r, 1)
    s, _ = l.accept()
    s.close()
    os._exit(0)
print(json.dumps({"child": child, "port": l.getsockname()[1]}), flush=True)
sys.stdin.readline()
c = socket.create_connection(l.getsockname())
print(json.dumps({"cport": c.getsockname()[1]}), flush=True)
c.close()
sys.stdin.readline()
os.write(go_w, b"g")
os.waitpid(child, 0)
"#;

/// `--pid` of the process a listener was handed down to: the parent that still holds it does
/// not accept, so the listener still names the owner of what it accepts, and the peer's FIN
/// reaching a connection not yet accepted is reported under the child.
#[test]
fn a_listener_held_by_the_traced_processs_parent_still_names_the_owner() {
    if !common::require_root() {
        return;
    }
    let mut server = Script::start(HANDED_DOWN_LISTENER, &[]);
    let info = server.line();
    let (child, port) = (&info["child"], port_of(&info["port"]));
    let (mut tracer, _) = tracer_for_pid(child);
    server.go();
    let cport = port_of(&server.line()["cport"]);
    let fin = tracer.wait_for(|v| is(v, "fin_received", port, cport), WAIT);
    assert_eq!(&fin["pid"], child, "{fin}");
    assert_eq!(fin["owner"], "listener", "{fin}");
    server.go();
    let close = tracer.wait_for(|v| is(v, "close", port, cport), WAIT);
    assert_eq!(&close["pid"], child, "{close}");
    server.succeeds();
    let out = tracer.stop();
    assert!(!out.stderr.contains("shared with"), "{}", out.stderr);
}

/// With `--pid`, events of sockets no traced process owns are dropped before their addresses
/// are read, unless the socket may inherit a traced listener's owner. Here the traced server
/// listens before the tracer starts and keeps listening; this (untraced) process connects
/// after and closes first, so the server's move to CLOSE_WAIT runs in this process's context
/// before the server has done anything with the socket: only its listener names the owner.
#[test]
fn pid_filter_keeps_what_a_traced_listener_accepts() {
    if !common::require_root() {
        return;
    }
    let common::TracedServer {
        server,
        server_port: port,
        mut tracer,
        client,
        client_port: my_port,
    } = common::TracedServer::start("wait-eof-close", &["--no-capture"], WAIT);
    drop(client);
    let fin = tracer.wait_for(|v| is(v, "fin_received", port, my_port), WAIT);
    assert_eq!(fin["pid"], server.pid);
    assert_eq!(fin["owner"], "listener");
    let close = tracer.wait_for(|v| is(v, "close", port, my_port), WAIT);
    assert_eq!(close["pid"], server.pid);
    assert_eq!(close["owner"], "task");
    server.wait();
    let out = tracer.stop();
    assert!(
        !out.lines.iter().any(|v| v["lport"] == my_port),
        "the untraced client's end is not reported"
    );
}

#[test]
fn an_overfilled_ring_buffer_reports_lost_events() {
    if !common::require_root() {
        return;
    }
    let (l, port) = listener();
    // 4 KiB holds about 30 events. The tracer is stopped (SIGSTOP, as a stalled host would
    // stall it) while a burst of resets happens, so the ring buffer must overflow.
    let mut tracer = common::Tracer::start(&[
        "--no-capture",
        "--port",
        &port.to_string(),
        "--ringbuf-kib",
        "4",
    ]);
    tracer.wait_ready(WAIT);
    tracer.signal(libc::SIGSTOP);
    let burst = reset_burst(&l, port, 400);
    tracer.signal(libc::SIGCONT);
    let out = tracer.stop();
    let lost: u64 = out
        .lines
        .iter()
        .filter(|v| v["event"] == "lost" && v["source"] == "ringbuf")
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    let summary = out.lines.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert!(
        lost > 0,
        "a 4 KiB ring buffer under a burst of {burst} resets must overflow"
    );
    assert_eq!(
        summary["lost"]["ringbuf"], lost,
        "lost lines add up to the summary"
    );
    // Every connection makes at least two kernel events (the close and the peer's reset):
    // what was not written was counted.
    let emitted = summary["kernel"]["emitted"].as_u64().unwrap();
    assert!(
        emitted + lost >= 2 * burst as u64,
        "emitted {emitted} + lost {lost}"
    );
    for (kind, count) in summary["counts"].as_object().unwrap() {
        let lines = out
            .lines
            .iter()
            .filter(|v| v["event"] == kind.as_str())
            .count();
        assert_eq!(
            count.as_u64().unwrap(),
            lines as u64,
            "summary count of {kind}"
        );
    }
}

/// Opens and resets `n` connections from this process as fast as it can; returns `n`.
fn churn(l: &TcpListener, port: u16, n: usize) -> usize {
    for _ in 0..n {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        c.write_all(b"x").unwrap();
        wait_readable(&s);
        drop(s);
        drop(c);
    }
    n
}

/// The kernel's transitions, as libbpf-tools `tcpstates` (an independent tracer) saw them:
/// (lport, rport, old, new, ms in old state).
fn tcpstates_lines(text: &str) -> Vec<(u16, u16, String, String, f64)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // SKADDR PID COMM LADDR LPORT RADDR RPORT OLD -> NEW MS
            if f.len() < 11 || f[8] != "->" {
                return None;
            }
            Some((
                f[4].parse().ok()?,
                f[6].parse().ok()?,
                f[7].to_string(),
                f[9].to_string(),
                f[10].parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn transitions_agree_with_tcpstates() {
    if !common::require_root() {
        return;
    }
    let (l, port) = listener();
    let mut ts = Command::new("stdbuf")
        .args(["-oL", "tcpstates", "-L", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpstates (libbpf-tools) runs");
    let mut ts_out = BufReader::new(ts.stdout.take().unwrap());
    let mut header = String::new();
    ts_out.read_line(&mut header).unwrap();
    assert!(header.contains("OLDSTATE"), "tcpstates started: {header}");
    let mut tracer =
        common::Tracer::start(&["--no-capture", "--all-states", "--port", &port.to_string()]);
    tracer.wait_ready(WAIT);
    // A graceful close with a pause in CLOSE_WAIT, then a reset.
    let mut peer = Peer::spawn(None, "client", "127.0.0.1", port, "wait-eof-close");
    let (server, _) = l.accept().unwrap();
    peer.line();
    let mut peer2 = Peer::spawn(None, "client", "127.0.0.1", port, "send-wait");
    let (server2, _) = l.accept().unwrap();
    peer2.line();
    drop(server);
    peer.wait();
    wait_readable(&server2);
    drop(server2);
    peer2.wait();
    std::thread::sleep(Duration::from_millis(300));
    let out = tracer.stop();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(ts.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    ts_out.read_to_string(&mut rest).unwrap();
    ts.wait().unwrap();
    let theirs = tcpstates_lines(&rest);
    assert!(theirs.len() >= 8, "tcpstates saw the connections: {rest}");
    let ours: Vec<(u16, u16, String, String, Option<u64>)> = out
        .lines
        .iter()
        .filter(|v| v["lport"] == port && v["old_state"].is_string() && v["event"] != "rst_sent")
        .map(|v| {
            (
                port_of(&v["lport"]),
                port_of(&v["rport"]),
                v["old_state"].as_str().unwrap().to_string(),
                v["new_state"].as_str().unwrap().to_string(),
                v["duration_ns"].as_u64(),
            )
        })
        .collect();
    let key = |t: &(u16, u16, String, String)| t.clone();
    let mut a: Vec<_> = theirs
        .iter()
        .filter(|t| t.2 != t.3)
        .map(|t| key(&(t.0, t.1, t.2.clone(), t.3.clone())))
        .collect();
    let mut b: Vec<_> = ours
        .iter()
        .map(|t| key(&(t.0, t.1, t.2.clone(), t.3.clone())))
        .collect();
    a.sort();
    b.sort();
    assert_eq!(b, a, "the tracer saw the same transitions as tcpstates");
    // Time in the old state agrees within a millisecond where both know it.
    for o in &ours {
        let Some(ns) = o.4 else { continue };
        let t = theirs
            .iter()
            .find(|t| (t.0, t.1, &t.2, &t.3) == (o.0, o.1, &o.2, &o.3))
            .unwrap();
        let ms = ns as f64 / 1e6;
        assert!(
            (ms - t.4).abs() < 1.0,
            "{o:?}: {ms} ms vs tcpstates {} ms",
            t.4
        );
    }
}

#[test]
fn an_accepted_socket_keeps_its_owner_after_the_listener_closes() {
    if !common::require_root() {
        return;
    }
    let (l, port) = listener();
    let mut tracer = tracer_for(port);
    let mut peer = Peer::spawn(None, "client", "127.0.0.1", port, "read-close");
    let (mut server, _) = l.accept().unwrap();
    let peer_port = port_of(&peer.line()["lport"]);
    drop(l); // the listener that would lend its owner is gone
    server.write_all(b"y").unwrap(); // our first I/O on the socket; the peer reads it and closes
    peer.wait(); // its FIN reaches our socket in softirq
    let fin = tracer.wait_for(|v| is(v, "fin_received", port, peer_port), WAIT);
    assert_eq!(
        fin["pid"],
        me(),
        "owner recorded from our read/write: {fin}"
    );
    assert_eq!(fin["owner"], "task");
    drop(server);
    tracer.stop();
}

/// Closing a listener resets the connections still in its accept queue (the kernel's
/// inet_csk_listen_stop, inside the listener's close(2)). Those connections were never
/// accepted and had no descriptor: the close was the listener's, not theirs. Each is an
/// `rst_sent` owned through the listener (it was once a `close` naming the listener's fd, with
/// the SO_LINGER 0 explanation). The clients' ECONNRESET and the RSTs on the wire are the
/// independent witnesses.
#[test]
fn closing_a_listener_resets_its_queue_without_closing_those_connections() {
    if !common::require_root() {
        return;
    }
    let (l, port) = listener();
    let mut tracer = common::Tracer::start(&["-i", "lo", "--pid", &me().to_string()]);
    tracer.wait_ready(WAIT);
    let mut clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let client_ports: Vec<u16> = clients
        .iter()
        .map(|c| c.local_addr().unwrap().port())
        .collect();
    std::thread::sleep(Duration::from_millis(100)); // the handshakes are done: all queued
    drop(l);
    for c in &mut clients {
        c.set_read_timeout(Some(WAIT)).unwrap();
        let err = c
            .read(&mut [0; 1])
            .expect_err("reset by the listener's close");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    }
    std::thread::sleep(Duration::from_millis(700));
    let out = tracer.stop();
    for &client in &client_ports {
        let server_side = |event: &str| {
            out.lines
                .iter()
                .find(|v| is(v, event, port, client))
                .cloned()
        };
        assert!(
            server_side("close").is_none(),
            "no close of a connection never accepted: {:?}",
            out.lines
        );
        let rst = server_side("rst_sent")
            .unwrap_or_else(|| panic!("the reset of {client}: {:?}", out.lines));
        assert_eq!(rst["pid"], me(), "{rst}");
        assert_eq!(rst["owner"], "listener", "{rst}");
        assert!(rst["syscall"].is_null() && rst["fd"].is_null(), "{rst}");
        assert!(
            rst["reason"].is_null() || rst["reason"] == "TCP_STATE",
            "{rst}"
        );
        assert!(rst["wire"].is_object(), "its RST on the wire: {rst}");
    }
}

/// Runs one io_uring operation and waits for its completion; returns its result.
fn io_uring_run(ring: &mut io_uring::IoUring, op: io_uring::squeue::Entry) -> i32 {
    // SAFETY: the operation's buffers (none here) outlive its completion, waited for below.
    unsafe { ring.submission().push(&op).expect("room in the ring") };
    ring.submit_and_wait(1).expect("io_uring_enter");
    ring.completion().next().expect("a completion").result()
}

/// io_uring's shutdown (run by an io-wq worker, no syscall of its own) then close(2) after the
/// peer's FIN: the shutdown is the `close` line with no call; the close(2), of a socket already
/// in CLOSE, had no line (the move no call showed was taken for the socket's release).
#[test]
fn an_io_uring_shutdown_leaves_the_later_close_its_line() {
    if !common::require_root() {
        return;
    }
    let Served {
        mut tracer,
        peer,
        server,
        port,
        peer_port,
        _listener,
    } = served_client("wait-eof-close");
    let mut ring = io_uring::IoUring::new(4).unwrap();
    let fd = io_uring::types::Fd(server.as_raw_fd());
    let done = io_uring_run(
        &mut ring,
        io_uring::opcode::Shutdown::new(fd, libc::SHUT_WR).build(),
    );
    assert_eq!(done, 0, "IORING_OP_SHUTDOWN");
    let shutdown = tracer.wait_for(|v| is(v, "close", port, peer_port), WAIT);
    assert_eq!(shutdown["syscall"], Value::Null, "{shutdown}");
    assert_eq!(shutdown["outcome"], "fin", "{shutdown}");
    assert_eq!(shutdown["pid"], me(), "{shutdown}");
    peer.wait(); // it read our FIN and closed: our socket handed over to its time-wait form
    tracer.wait_for(
        |v| is(v, "state", port, peer_port) && v["new_state"] == "CLOSE",
        WAIT,
    );
    let server_fd = server.as_raw_fd();
    drop(server);
    let close = tracer.wait_for(
        |v| is(v, "close", port, peer_port) && v["old_state"] == "CLOSE",
        WAIT,
    );
    assert_eq!(close["syscall"], "close", "{close}");
    assert_eq!(close["fd"], server_fd, "{close}");
    assert_eq!(close["new_state"], "CLOSE", "{close}");
    stops_cleanly(tracer);
}

/// io_uring's close of a socket the peer reset: no state moves, and no syscall names it; the
/// socket's destruction in the owner's own task is its close (it had no line).
#[test]
fn an_io_uring_close_of_a_reset_socket_is_a_close() {
    if !common::require_root() {
        return;
    }
    let (peer, port, mut tracer, client, my_port) = reset_by_a_linger0_server();
    tracer.wait_for(|v| is(v, "rst_received", my_port, port), WAIT);
    let mut ring = io_uring::IoUring::new(4).unwrap();
    let fd = std::os::fd::IntoRawFd::into_raw_fd(client);
    let done = io_uring_run(
        &mut ring,
        io_uring::opcode::Close::new(io_uring::types::Fd(fd)).build(),
    );
    assert_eq!(done, 0, "IORING_OP_CLOSE");
    let close = tracer.wait_for(|v| is(v, "close", my_port, port), WAIT);
    assert_eq!(close["pid"], me(), "{close}");
    assert_eq!(close["syscall"], Value::Null, "{close}");
    assert_eq!(
        (&close["old_state"], &close["new_state"]),
        (&"CLOSE".into(), &"CLOSE".into())
    );
    assert_eq!(close["outcome"], Value::Null, "{close}");
    peer.wait();
    stops_cleanly(tracer);
}

/// A socket whose last reference an io_uring ring held (a registered file): close(2) leaves it
/// open, and when the ring goes, a kernel worker (kworker) releases the ring's files and
/// finishes the close (so too at the exit of a process whose ring held a socket). The socket
/// is still this process's: its `close` named the kworker (`owner: task`, its pid and comm),
/// which owns nothing.
#[test]
fn a_close_a_kernel_worker_finishes_names_the_sockets_process() {
    if !common::require_root() {
        return;
    }
    let (mut peer, port) = Peer::server(None, "127.0.0.1", 0, "wait-eof-close");
    let mut tracer = tracer_for(port);
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let my_port = client.local_addr().unwrap().port();
    peer.line();
    let ring = io_uring::IoUring::new(4).unwrap();
    ring.submitter()
        .register_files(&[client.as_raw_fd()])
        .expect("IORING_REGISTER_FILES");
    drop(client); // the ring's reference keeps the socket open
    std::thread::sleep(Duration::from_millis(100));
    drop(ring);
    let close = tracer.wait_for(|v| is(v, "close", my_port, port), WAIT);
    assert_eq!(close["pid"], me(), "{close}");
    assert!(
        !close["comm"].as_str().unwrap_or("").starts_with("kworker"),
        "{close}"
    );
    assert_eq!(close["syscall"], Value::Null, "{close}");
    assert_eq!(close["outcome"], "fin", "{close}");
    peer.wait();
    stops_cleanly(tracer);
}

/// A traced process exits and the kernel gives its pid to an unrelated process at once
/// (before the daemon's look every 200 ms): that one is not the traced process, and its
/// connections are not reported (they were, for the rest of the run). Another traced process keeps the run going, and its connection is reported. With
/// a few pids (the programs' inline list) and with many (the PIDS map).
#[test]
fn a_pid_the_kernel_gives_to_a_new_process_is_not_the_traced_one() {
    if !common::require_root() {
        return;
    }
    for extra_pids in [0, tracer_common::INLINE_PIDS] {
        pid_reused_after_exit(extra_pids);
    }
}

fn pid_reused_after_exit(extra_pids: usize) {
    const WAIT_THEN_CONNECT: &str = r#"
import os, socket, sys
print(os.getpid(), flush=True)
sys.stdin.read(1)
if len(sys.argv) > 1:
    socket.create_connection(("127.0.0.1", int(sys.argv[1]))).close()
    print("closed", flush=True)
    sys.stdin.read(1)
"#;
    let (listener, port) = listener();
    let port_arg = port.to_string();
    let mut exiting = common::Script::spawn(WAIT_THEN_CONNECT, &[]);
    let mut staying = common::Script::spawn(WAIT_THEN_CONNECT, &[&port_arg]);
    let others: Vec<common::Script> = (0..extra_pids)
        .map(|_| common::Script::spawn(WAIT_THEN_CONNECT, &[]))
        .collect();
    let mut args = vec![
        "--no-capture".to_string(),
        "--port".into(),
        port_arg.clone(),
    ];
    for pid in [exiting.pid, staying.pid]
        .into_iter()
        .chain(others.iter().map(|s| s.pid))
    {
        args.extend(["--pid".to_string(), pid.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut tracer = common::Tracer::start(&args);
    tracer.wait_ready(WAIT);
    exiting.go();
    exiting.wait();
    take_pid_and_connect(exiting.pid, port);
    let case = format!("with {extra_pids} more pids");
    let staying_pid = staying.pid;
    let close_the_traced = || {
        staying.go();
        assert_eq!(staying.line(), "closed");
    };
    let reused = exiting.pid;
    only_the_traced_close_is_reported(
        tracer,
        &listener,
        staying_pid,
        close_the_traced,
        reused,
        &case,
    );
}

/// After a process given the pid `reused` connected to `listener` and closed: the traced
/// process `traced` connects to it and closes (`close_the_traced`); its close is reported,
/// under its pid, and nothing under the reused pid.
fn only_the_traced_close_is_reported(
    mut tracer: common::Tracer,
    listener: &TcpListener,
    traced: u32,
    close_the_traced: impl FnOnce(),
    reused: u32,
    case: &str,
) {
    let port = listener.local_addr().unwrap().port();
    let (mut reused_conn, _) = listener.accept().unwrap();
    common::read_to_eof(&mut reused_conn);
    close_the_traced();
    let (mut traced_conn, _) = listener.accept().unwrap();
    common::read_to_eof(&mut traced_conn);
    let close = tracer.wait_for(|v| v["event"] == "close" && v["rport"] == port, WAIT);
    assert_eq!(close["pid"], traced, "{case}: {close}");
    drop((reused_conn, traced_conn));
    let out = tracer.stop();
    let of_the_reused_pid: Vec<&Value> = out.lines.iter().filter(|v| v["pid"] == reused).collect();
    assert!(
        of_the_reused_pid.is_empty(),
        "{case}: {of_the_reused_pid:?}"
    );
}

/// Receives namespace `ns`'s packets on interface `ifname` in a kernel thread of its own
/// (threaded NAPI: `napi/IFNAME-N`, on its own task stack, as ksoftirqd is). A veth polls
/// with NAPI only with GRO on, and only for segments its peer did not build with TSO.
fn receive_in_a_napi_thread(ns: &str, ifname: &str, peer_ns: &str, peer_if: &str) {
    common::sh(
        "ip",
        &["netns", "exec", ns, "ethtool", "-K", ifname, "gro", "on"],
    );
    for (n, i) in [(ns, ifname), (peer_ns, peer_if)] {
        common::sh(
            "ip",
            &["netns", "exec", n, "ethtool", "-K", i, "tso", "off"],
        );
    }
    let threaded = format!("/sys/class/net/{ifname}/threaded");
    let set = format!("echo 1 > {threaded} && cat {threaded}");
    let now = common::sh("ip", &["netns", "exec", ns, "sh", "-c", &set]);
    assert_eq!(now.trim(), "1", "threaded NAPI on {ifname}");
}

/// A shut-down socket (shutdown(SHUT_WR), FIN_WAIT2) whose end comes with the peer's FIN
/// processed in a kernel thread (threaded NAPI here; ksoftirqd under load): its move to CLOSE
/// is a `state` line, and the application's close() later is its `close` (CLOSE -> CLOSE,
/// the call and the descriptor). That move, on a task's stack with `sk_shutdown` at
/// SHUTDOWN_MASK (ours, then the peer's FIN), was taken for tcp_close() in no call: a `close`
/// line with `syscall` null at the peer's FIN, and none for the close.
#[test]
fn a_shut_down_sockets_end_in_a_kernel_thread_is_not_its_close() {
    if !common::require_root() {
        return;
    }
    let net = common::NetnsPair::new();
    receive_in_a_napi_thread(&net.a, &net.a_if, &net.b, &net.b_if);
    let (l, port) = net.in_b(|| common::listener("0.0.0.0:0"));
    let mut tracer = tracer_for(port);
    let target = format!("{}:{port}", net.b_v4);
    let client = net.in_a(move || TcpStream::connect(target).unwrap());
    let (server, _) = l.accept().unwrap();
    let client_port = client.local_addr().unwrap().port();
    client.shutdown(Shutdown::Write).unwrap();
    tracer.wait_for(
        |v| is(v, "state", client_port, port) && v["new_state"] == "FIN_WAIT2",
        WAIT,
    );
    drop(server); // its FIN ends the client's FIN_WAIT2, received in the NAPI thread
    tracer.wait_for(
        |v| is(v, "state", client_port, port) && v["new_state"] == "CLOSE",
        WAIT,
    );
    let fd = client.as_raw_fd();
    drop(client);
    tracer.wait_for(
        |v| is(v, "close", client_port, port) && v["old_state"] == "CLOSE",
        WAIT,
    );
    let out = tracer.stop();
    let closes: Vec<(&Value, &Value, &Value)> = out
        .lines_of("close", client_port, port)
        .iter()
        .map(|v| (&v["old_state"], &v["syscall"], &v["fd"]))
        .collect();
    assert_eq!(
        closes,
        [
            (&"ESTABLISHED".into(), &"shutdown".into(), &fd.into()),
            (&"CLOSE".into(), &"close".into(), &fd.into()),
        ],
        "{:?}",
        out.lines_of("close", client_port, port)
    );
}

/// `--pid` of servers listening on one port in different network namespaces (every pod of a
/// node listening on 8080): each namespace's connections are its own listener's, whether that
/// one is traced too (a second `--pid`) or not, and whether both listened before the tracer
/// started (seeded) or after (recorded by the programs), and whichever listened first. Before,
/// another namespace's connections were reported as the traced server's (`owner: "listener"`,
/// found by port alone), the other's listen left the traced listener's connections
/// unattributed, of two traced listeners one was recorded (the other's connections not yet
/// accepted went unreported), and an untraced listener's port was marked shared in every
/// namespace: a traced listener on it later was not recorded, its connections not yet
/// accepted unreported.
#[test]
fn listeners_on_one_port_in_different_namespaces_keep_their_own_connections() {
    if !common::require_root() {
        return;
    }
    const LISTEN_ON_GO: &str = r#"
import ctypes, os, socket, sys, time
print(os.getpid(), flush=True)
sys.stdin.read(1)
if len(sys.argv) > 2:
    fd = os.open(sys.argv[2], os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        sys.exit("setns: errno %d" % ctypes.get_errno())
port = sys.argv[1]
if port.startswith("@"):
    port = open(port[1:]).read()
l = socket.socket()
l.bind(("127.0.0.1", int(port)))
l.listen(8)
print(l.getsockname()[1], flush=True)
time.sleep(60)
"#;
    for (seeded, other_traced, other_first) in [
        (true, false, false),
        (false, false, false),
        (false, false, true),
        (true, true, false),
        (false, true, false),
    ] {
        let case = format!(
            "seeded {seeded}, the other traced {other_traced}, the other first {other_first}"
        );
        let other_ns = common::NetnsPeer::new();
        let ns_path = format!("/var/run/netns/{}", other_ns.ns);
        // The traced listener takes a free port here; the other's namespace is new, where
        // any port is free: it reads the port from this file.
        let port_file = std::env::temp_dir().join(format!("tracer-port-{}", other_ns.ns));
        let from_file = format!("@{}", port_file.display());
        let traced_port = if other_first { from_file.as_str() } else { "0" };
        let mut traced = common::Script::spawn(LISTEN_ON_GO, &[traced_port]);
        let mut other =
            other_traced.then(|| common::Script::spawn(LISTEN_ON_GO, &[&from_file, &ns_path]));
        let mut pids = vec![traced.pid];
        pids.extend(other.as_ref().map(|s| s.pid));
        let mut other_listener = None;
        let mut listen_in_both = || -> u16 {
            if other_first {
                // A port free here, held until the other listens on it in its namespace (not
                // by a listener: this process's would mark the port shared here).
                let (probe, port) = common::reserved_port();
                let listener = other_ns.in_ns(move || TcpListener::bind(("127.0.0.1", port)));
                other_listener = Some(listener.unwrap());
                std::fs::write(&port_file, port.to_string()).unwrap();
                drop(probe);
                traced.go();
                assert_eq!(
                    traced.line(),
                    port.to_string(),
                    "the traced listener's port"
                );
                return port;
            }
            traced.go();
            let port: u16 = traced.line().parse().expect("the traced listener's port");
            std::fs::write(&port_file, port.to_string()).unwrap();
            if let Some(other) = other.as_mut() {
                other.go();
                assert_eq!(other.line(), port.to_string(), "the other listener's port");
            } else {
                let listener = other_ns.in_ns(move || TcpListener::bind(("127.0.0.1", port)));
                other_listener = Some(listener.unwrap());
            }
            port
        };
        let mut port = if seeded { listen_in_both() } else { 0 };
        let mut args = vec!["--no-capture".to_string()];
        for pid in &pids {
            args.extend(["--pid".to_string(), pid.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut tracer = common::Tracer::start(&args);
        tracer.wait_ready(WAIT);
        if !seeded {
            port = listen_in_both();
        }
        let _ = std::fs::remove_file(&port_file);
        let to_the_other = other_ns.in_ns(move || TcpStream::connect(("127.0.0.1", port)).unwrap());
        let other_client = to_the_other.local_addr().unwrap().port();
        drop(to_the_other);
        let to_the_traced = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let traced_client = to_the_traced.local_addr().unwrap().port();
        drop(to_the_traced);
        let fin = tracer.wait_for(|v| is(v, "fin_received", port, traced_client), WAIT);
        assert_eq!(fin["pid"], pids[0], "{case}: {fin}");
        if other_traced {
            let fin = tracer.wait_for(|v| is(v, "fin_received", port, other_client), WAIT);
            assert_eq!(fin["pid"], pids[1], "{case}: {fin}");
        }
        let out = tracer.stop();
        let others: Vec<&Value> = out
            .lines
            .iter()
            .filter(|v| v["lport"] == port && v["rport"] == other_client)
            .collect();
        let expected = usize::from(other_traced);
        assert_eq!(others.len(), expected, "{case}: {others:?}");
        traced.stop();
        if let Some(other) = other {
            other.stop();
        }
    }
}

/// A connection its client reset while it waited in the accept queue is destroyed, with no
/// move, by its listener's close (inet_csk_listen_stop), inside that close(2) or the server's
/// exit: no process ever had a descriptor for it, so it gets no `close` line (its
/// `rst_received` told its end). Before, each got one naming the server's close of the
/// listener's descriptor (or its exit), `CLOSE -> CLOSE`: a dead socket kept open for nothing,
/// by the listener's fd.
#[test]
fn a_connection_reset_before_accept_is_not_closed_by_its_listeners_close() {
    if !common::require_root() {
        return;
    }
    for how in ["close", "exit"] {
        let mut server = common::Script::spawn(
            r#"
import os, socket, sys
print(os.getpid(), flush=True)
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(8)
print(l.getsockname()[1], flush=True)
sys.stdin.read(1)
if sys.argv[1] == "close":
    l.close()
    print("closed", flush=True)
os._exit(0)
"#,
            &[how],
        );
        let port: u16 = server.line().parse().expect("the listener's port");
        let mut tracer = tracer_for(port);
        let reset = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let client_port = reset.local_addr().unwrap().port();
        common::set_linger_zero(&reset);
        drop(reset); // a RST: the queued connection moves to CLOSE, still in the queue
        tracer.wait_for(|v| is(v, "rst_received", port, client_port), WAIT);
        server.go();
        if how == "close" {
            assert_eq!(server.line(), "closed");
        }
        tracer.wait_for(
            |v| v["event"] == "close" && v["lport"] == port && v["old_state"] == "LISTEN",
            WAIT,
        );
        let out = tracer.stop();
        let closes = out.lines_of("close", port, client_port);
        assert!(closes.is_empty(), "{how}: {closes:?}");
        drop(server);
    }
}

/// A forked child holds the last reference to a socket whose close moves no state (reset by
/// the peer already, or shut down: FIN_WAIT2 stored again), and exits after its parent
/// closed its copy: the exit's close names the child (`syscall: "exit"`). Before, a reset
/// socket got no close line at all, and a shut-down one named the parent, long gone, with no
/// call.
#[test]
fn a_forked_childs_exit_that_drops_the_last_reference_names_the_child() {
    if !common::require_root() {
        return;
    }
    for kind in ["reset", "shut"] {
        let (l, port) = listener();
        let mut parent = common::Script::spawn(
            r#"
import os, socket, sys, time
print(os.getpid(), flush=True)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
sys.stdin.read(1)
if sys.argv[2] == "shut":
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
child = os.fork()
if child == 0:
    time.sleep(0.3)
    os._exit(0)
print(child, flush=True)
s.close()
os.waitpid(child, 0)
print("done", flush=True)
"#,
            &[&port.to_string(), kind],
        );
        let client_port: u16 = parent.line().parse().expect("the client's port");
        let (server, _) = l.accept().unwrap();
        let mut tracer = tracer_for_pid(parent.pid).0;
        // "shut": kept open, so that the client stays in FIN_WAIT2 until the child's exit.
        let mut kept = Some(server);
        if kind == "reset" {
            let server = kept.take().unwrap();
            common::set_linger_zero(&server);
            drop(server);
            tracer.wait_for(|v| is(v, "rst_received", client_port, port), WAIT);
        }
        parent.go();
        let child: u32 = parent.line().parse().expect("the child's pid");
        assert_eq!(parent.line(), "done");
        let close = tracer.wait_for(
            |v| is(v, "close", client_port, port) && v["syscall"] == "exit",
            WAIT,
        );
        assert_eq!(close["pid"], child, "{kind}: {close}");
        let expected_state = if kind == "reset" {
            "CLOSE"
        } else {
            "FIN_WAIT2"
        };
        assert_eq!(close["old_state"], expected_state, "{kind}: {close}");
        tracer.stop();
        drop(kept);
    }
}

/// A connection the tracer saw begin says at its end how long it was established (the close,
/// the peer's FIN), and a connect() given up says how long it waited in SYN_SENT: each line's
/// `duration_ns`, null before for both (the moves into those states give no line), with and
/// without `--pid`. The test's own sleeps bound them from below.
#[test]
fn an_end_says_how_long_the_connection_lived_and_a_connect_given_up_how_long_it_waited() {
    if !common::require_root() {
        return;
    }
    const LIVED: Duration = Duration::from_millis(300);
    const WAITED: Duration = Duration::from_millis(200);
    let within = |line: &Value, at_least: Duration| {
        let took = line["duration_ns"]
            .as_u64()
            .unwrap_or_else(|| panic!("{line}"));
        let at_least = at_least.as_nanos() as u64;
        assert!(
            took >= at_least && took < at_least + 5_000_000_000,
            "{line}"
        );
    };
    // An address on a veth's subnet that nobody has: its SYN waits for an ARP answer.
    let net = common::NetnsPeer::new();
    let nobody = format!("{}.77", net.root_v4.rsplit_once('.').unwrap().0);
    for with_pid in [false, true] {
        let (listener, port) = listener();
        let mut tracer = if with_pid {
            tracer_for_pid(me()).0
        } else {
            tracer_for(port)
        };
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        let client_port = client.local_addr().unwrap().port();
        std::thread::sleep(LIVED);
        drop(client);
        within(
            &tracer.wait_for(|v| is(v, "close", client_port, port), WAIT),
            LIVED,
        );
        within(
            &tracer.wait_for(|v| is(v, "fin_received", port, client_port), WAIT),
            LIVED,
        );
        drop(server);
        let target = format!("{nobody}:{port}").parse().unwrap();
        let given_up = TcpStream::connect_timeout(&target, WAITED).unwrap_err();
        assert_eq!(given_up.kind(), std::io::ErrorKind::TimedOut);
        let close = tracer.wait_for(|v| v["event"] == "close" && v["raddr"] == *nobody, WAIT);
        assert_eq!(close["old_state"], "SYN_SENT", "{close}");
        within(&close, WAITED);
        stops_cleanly(tracer);
    }
}

/// Makes the kernel give `pid` (of a process that exited) to a new process, an untraced one,
/// which connects to `port` and closes.
fn take_pid_and_connect(pid: u32, port: u16) {
    let mut reuse = common::Script::spawn(
        r#"
import os, socket, sys
print(os.getpid(), flush=True)
want, port = int(sys.argv[1]), int(sys.argv[2])
for attempt in range(1000):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(want - 1))
    child = os.fork()
    if child == 0:
        if os.getpid() == want:
            socket.create_connection(("127.0.0.1", port)).close()
        os._exit(0)
    os.waitpid(child, 0)
    if child == want:
        print("reused", flush=True)
        sys.exit(0)
print("not reused", flush=True)
"#,
        &[&pid.to_string(), &port.to_string()],
    );
    assert_eq!(reuse.line(), "reused", "pid {pid} given again");
    reuse.wait();
}

/// A traced process forks a child (followed for its calls and sockets), the child exits, and
/// the kernel gives its pid to an unrelated process at once: that one is not the child, and
/// its connection is not reported. The daemon forgot exited children only every 2 s, and kept
/// one whose pid a new process had taken by then, for the rest of the run.
#[test]
fn a_followed_childs_pid_given_to_a_new_process_is_not_followed() {
    if !common::require_root() {
        return;
    }
    let (listener, port) = listener();
    let port_arg = port.to_string();
    // The script is told to go on twice: stdin once, then this file.
    let go_on = std::env::temp_dir()
        .join(format!("tracer-go-on-{}-{port}", std::process::id()))
        .to_string_lossy()
        .into_owned();
    let mut parent = common::Script::spawn(
        r#"
import os, socket, sys, time
print(os.getpid(), flush=True)
sys.stdin.read(1)
child = os.fork()
if child == 0:
    os._exit(0)
os.waitpid(child, 0)
print(child, flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
socket.create_connection(("127.0.0.1", int(sys.argv[1]))).close()
print("closed", flush=True)
time.sleep(60)
"#,
        &[&port_arg, &go_on],
    );
    let parent_pid = parent.pid.to_string();
    let mut tracer =
        common::Tracer::start(&["--no-capture", "--port", &port_arg, "--pid", &parent_pid]);
    tracer.wait_ready(WAIT);
    parent.go();
    let child: u32 = parent.line().parse().expect("the child's pid");
    take_pid_and_connect(child, port);
    let parent_pid = parent.pid;
    let close_the_traced = || {
        std::fs::write(&go_on, "").unwrap();
        assert_eq!(parent.line(), "closed");
    };
    let case = "a forked child's pid";
    only_the_traced_close_is_reported(tracer, &listener, parent_pid, close_the_traced, child, case);
    let _ = std::fs::remove_file(&go_on);
    parent.stop();
}

/// More sockets than the owner table has entries (made small here; sized to the host at
/// start-up otherwise): the events of sockets that find no room are dropped in the kernel, and
/// each is counted as lost, source `owner_table`, in `lost` lines and the summary. A socket's
/// close is either a line or counted there.
#[test]
fn events_dropped_for_a_full_owner_table_are_counted_as_lost() {
    if !common::require_root() {
        return;
    }
    const ENTRIES: usize = 1024;
    const CONNECTIONS: usize = 700; // two sockets each, both ends here
    common::raise_fd_limit(2 * CONNECTIONS + 256);
    let (l, port) = listener();
    let entries = ENTRIES.to_string();
    let port_arg = port.to_string();
    let mut tracer = common::Tracer::start(&[
        "--no-capture",
        "--port",
        &port_arg,
        "--test-owner-table-entries",
        &entries,
    ]);
    tracer.wait_ready(WAIT);
    let pairs: Vec<(TcpStream, TcpStream)> = (0..CONNECTIONS)
        .map(|_| {
            let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            (c, l.accept().unwrap().0)
        })
        .collect();
    // The newest first: the oldest hold the table's entries meanwhile.
    for (client, server) in pairs.into_iter().rev() {
        drop(client);
        drop(server);
    }
    std::thread::sleep(Duration::from_secs(1));
    let out = tracer.stop();
    let summary = out.lines.last().unwrap();
    let lost = summary["lost"]["owner_table"].as_u64().unwrap();
    assert!(lost > 0, "{summary}");
    let said: u64 = out
        .lines
        .iter()
        .filter(|v| v["event"] == "lost" && v["source"] == "owner_table")
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    assert_eq!(said, lost, "the lost lines say what the summary counts");
    let closes = out.lines.iter().filter(|v| v["event"] == "close").count() as u64;
    assert!(
        closes + lost >= 2 * CONNECTIONS as u64,
        "each socket's close is a line or counted: {closes} lines, {lost} lost"
    );
    assert!(out.stderr.contains("owner table is full"), "{}", out.stderr);
}

/// A traced process whose main thread has exited (pthread_exit) while a worker thread goes on
/// and closes the connections a second later: the process still runs (its main thread is a
/// zombie, the worker is not), so the run goes on and every close is reported, by the worker.
#[test]
fn a_process_whose_main_thread_exited_is_still_traced() {
    if !common::require_root() {
        return;
    }
    const N: usize = 10;
    let (listener, port) = listener();
    let mut server = common::Script::spawn(
        r#"
import ctypes, os, socket, sys, threading, time
print(os.getpid(), flush=True)
conns = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(int(sys.argv[2]))]
print("connected", flush=True)
sys.stdin.read(1)
def worker():
    time.sleep(1)
    for c in conns:
        c.close()
    time.sleep(0.2)
    os._exit(0)
threading.Thread(target=worker).start()
time.sleep(0.1)
ctypes.CDLL(None).pthread_exit(None)
"#,
        &[&port.to_string(), &N.to_string()],
    );
    let accepted: Vec<TcpStream> = (0..N).map(|_| listener.accept().unwrap().0).collect();
    assert_eq!(server.line(), "connected");
    // With the capture: the orphans' end (the peer's FIN) is seen, and the run can end.
    let mut tracer = common::Tracer::start(&["-i", "lo", "--pid", &server.pid.to_string()]);
    tracer.wait_ready(WAIT);
    server.go();
    server.wait(); // its worker closed every connection
    drop(accepted); // the peers close too: nothing is left closing
    let out = tracer.finish(Duration::from_secs(20));
    let closes: Vec<&Value> = out
        .lines
        .iter()
        .filter(|v| v["event"] == "close" && v["rport"] == port)
        .collect();
    assert_eq!(closes.len(), N, "{}", out.stderr);
    assert!(
        closes
            .iter()
            .all(|v| v["pid"] == server.pid && v["tid"] != server.pid),
        "the worker's closes: {closes:?}"
    );
}
