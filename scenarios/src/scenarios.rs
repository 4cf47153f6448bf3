//! The teardown scenarios of tracer/tests/teardown.rs, each end of a connection in its own
//! process: this driver on one end, `tracer-scenarios peer` on the other.
//!
//! Every scenario is prepared before the tracer starts (listeners; the `seeded` connection,
//! which must exist before it), then acted on one after the other under one tracer, waiting
//! for the lines that say each step happened before taking the next one.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{checks::End, tracer::Tracer};

/// How long one expected line may take to come (the join window included), in a VM without KVM.
const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// This process closes first; the peer reads to EOF and closes: FIN both ways.
    GracefulClose,
    /// This process closes with one byte unread: RST, TCP_ABORT_ON_CLOSE.
    UnreadClose,
    /// The peer sets SO_LINGER {1, 0} and closes: RST, TCP_STATE.
    LingerZero,
    /// This process calls shutdown(SHUT_WR): a FIN reported with `syscall: "shutdown"`.
    ShutdownWrite,
    /// The peer is the server and resets; this process is the client that receives the RST.
    PeerReset,
    /// The peer exits without closing: `syscall: "exit"`.
    ProcessExit,
    /// Connected before the tracer started: attributed from /proc (`owner: "seeded"`).
    Seeded,
}

pub const ALL: &[Kind] = &[
    Kind::GracefulClose,
    Kind::UnreadClose,
    Kind::LingerZero,
    Kind::ShutdownWrite,
    Kind::PeerReset,
    Kind::ProcessExit,
    Kind::Seeded,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::GracefulClose => "graceful_close",
            Kind::UnreadClose => "unread_close",
            Kind::LingerZero => "linger_zero",
            Kind::ShutdownWrite => "shutdown_write",
            Kind::PeerReset => "peer_reset",
            Kind::ProcessExit => "process_exit",
            Kind::Seeded => "seeded",
        }
    }
}

/// The connection a scenario made: its ports and which process owns each end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Conn {
    pub server_port: u16,
    pub client_port: u16,
    pub server_pid: u32,
    pub client_pid: u32,
    /// This process's fd for its end, when the scenario closes it with a call that has one.
    pub fd: Option<i32>,
}

impl Conn {
    /// Which end a line is on (by its local port), if it is on this connection at all.
    pub fn end_of(&self, v: &Value) -> Option<End> {
        let (l, r) = match v["event"].as_str() {
            Some("packet") => (&v["sport"], &v["dport"]),
            _ => (&v["lport"], &v["rport"]),
        };
        let (l, r) = (l.as_u64()? as u16, r.as_u64()? as u16);
        match (l, r) {
            _ if (l, r) == (self.server_port, self.client_port) => Some(End::Server),
            _ if (l, r) == (self.client_port, self.server_port) => Some(End::Client),
            _ => None,
        }
    }

    pub fn pid_of(&self, end: End) -> u32 {
        match end {
            End::Server => self.server_pid,
            End::Client => self.client_pid,
        }
    }
}

/// A scenario in progress: what it holds between the phases.
pub struct Scenario {
    pub kind: Kind,
    listener: Option<TcpListener>,
    peer: Option<Peer>,
    /// This process's end, kept open until the scenario closes it.
    mine: Option<TcpStream>,
    pub conn: Conn,
    pub failures: Vec<String>,
}

impl Scenario {
    /// Before the tracer starts: the listening socket (or the peer's), and for `Seeded` the
    /// whole connection. Returns the server port, for the tracer's `--port`.
    pub fn prepare(kind: Kind) -> Result<Self, String> {
        let mut s = Self {
            kind,
            listener: None,
            peer: None,
            mine: None,
            conn: Conn::default(),
            failures: Vec::new(),
        };
        if kind == Kind::PeerReset {
            // The peer resets only after this end has written: a reset right after accept()
            // can reach the client before its connect() returns (ECONNRESET; seen in the VM).
            let mut peer = Peer::spawn("server", 0, "read-linger0-close")?;
            s.conn.server_port = peer.line()?["listening"].as_u64().ok_or("no port")? as u16;
            s.conn.server_pid = peer.pid;
            s.peer = Some(peer);
        } else {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            s.conn.server_port = l.local_addr().unwrap().port();
            s.conn.server_pid = std::process::id();
            s.listener = Some(l);
        }
        if kind == Kind::Seeded {
            s.connect_peer("hold")?;
        }
        Ok(s)
    }

    /// A peer client connects to our listener; we accept.
    fn connect_peer(&mut self, behaviour: &str) -> Result<(), String> {
        let mut peer = Peer::spawn("client", self.conn.server_port, behaviour)?;
        let (server, _) = self
            .listener
            .as_ref()
            .unwrap()
            .accept()
            .map_err(|e| e.to_string())?;
        let info = peer.line()?;
        self.conn.client_port = info["lport"].as_u64().ok_or("peer: no lport")? as u16;
        self.conn.client_pid = peer.pid;
        self.conn.fd = Some(server.as_raw_fd());
        self.mine = Some(server);
        self.peer = Some(peer);
        Ok(())
    }

    /// The teardown itself, under the tracer; a step that never shows is a failure.
    pub fn act(&mut self, tracer: &Tracer) -> Result<(), String> {
        match self.kind {
            Kind::GracefulClose => {
                self.connect_peer("wait-eof-close")?;
                self.mine.take(); // we close first: FIN out
                self.wait(tracer, "close", End::Client, None);
                self.finish_peer()
            }
            Kind::UnreadClose => {
                self.connect_peer("send-wait")?;
                wait_readable(self.mine.as_ref().unwrap());
                self.mine.take(); // one byte unread: RST
                self.wait(tracer, "rst_received", End::Client, None);
                self.finish_peer()
            }
            Kind::LingerZero => {
                self.connect_peer("linger0-close")?;
                self.wait(tracer, "rst_received", End::Server, None);
                let mut buf = [0u8; 1];
                if self.mine.as_mut().unwrap().read(&mut buf).is_ok() {
                    self.failures.push("our end was not reset".into());
                }
                self.finish_peer()?;
                self.mine.take();
                Ok(())
            }
            Kind::ShutdownWrite => {
                self.connect_peer("wait-eof-close")?;
                let mine = self.mine.as_ref().unwrap();
                mine.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
                self.wait(tracer, "close", End::Client, None);
                self.finish_peer()?;
                // The peer's FIN ends our FIN_WAIT2 (the kernel moves it to TIME_WAIT).
                self.wait(
                    tracer,
                    "state",
                    End::Server,
                    Some(("old_state", "FIN_WAIT2")),
                );
                self.mine.take();
                Ok(())
            }
            Kind::PeerReset => {
                let mut client = TcpStream::connect(("127.0.0.1", self.conn.server_port))
                    .map_err(|e| e.to_string())?;
                self.conn.client_port = client.local_addr().unwrap().port();
                client.write_all(b"x").map_err(|e| e.to_string())?;
                self.conn.client_pid = std::process::id();
                self.peer.as_mut().unwrap().line()?;
                self.wait(tracer, "rst_received", End::Client, None);
                self.finish_peer()?;
                drop(client);
                Ok(())
            }
            Kind::ProcessExit => {
                self.connect_peer("exit")?;
                self.wait(tracer, "fin_received", End::Server, None);
                // This end still holds the peer's unread byte, so closing it sends a RST. Wait
                // until the peer's FIN is acknowledged first: whether the (possibly delayed)
                // ACK or the RST reaches the orphaned peer socket first is a race otherwise,
                // and the lines would differ from run to run, not from kernel to kernel.
                self.wait(
                    tracer,
                    "state",
                    End::Client,
                    Some(("new_state", "FIN_WAIT2")),
                );
                self.finish_peer()?;
                self.mine.take();
                Ok(())
            }
            Kind::Seeded => {
                self.mine.take();
                self.wait(tracer, "fin_received", End::Client, None);
                self.finish_peer()?;
                self.wait(tracer, "close", End::Client, None);
                Ok(())
            }
        }
    }

    /// Waits for a line of this connection; records a failure when it does not come.
    /// `field` narrows to one of several lines of the same kind (`("old_state", "FIN_WAIT2")`).
    fn wait(&mut self, tracer: &Tracer, event: &str, end: End, field: Option<(&str, &str)>) {
        let conn = self.conn;
        let found = tracer.wait_for(
            |v| {
                v["event"] == event
                    && conn.end_of(v) == Some(end)
                    && field.is_none_or(|(f, value)| v[f] == value)
            },
            WAIT,
        );
        if found.is_none() {
            self.failures.push(format!(
                "no {event} line on the {} end within {WAIT:?}",
                end.name()
            ));
        }
    }

    /// Releases the peer (stdin closed) and waits for it to exit.
    fn finish_peer(&mut self) -> Result<(), String> {
        match self.peer.take() {
            Some(peer) => peer.wait(),
            None => Ok(()),
        }
    }
}

/// This same binary as `tracer-scenarios peer ...` in its own process.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

impl Peer {
    fn spawn(role: &str, port: u16, behaviour: &str) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(["peer", role, "127.0.0.1", &port.to_string(), behaviour])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the peer: {e}"))?;
        Ok(Self {
            pid: child.id(),
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            child,
        })
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut text = String::new();
        self.stdout
            .read_line(&mut text)
            .map_err(|e| format!("peer output: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("peer said {text:?}: {e}"))
    }

    fn wait(mut self) -> Result<(), String> {
        self.stdin.take();
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("peer failed: {status}"))
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_readable(s: &TcpStream) {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, WAIT.as_millis() as i32) };
}
