//! `tests/peer.py`: the other end of a connection in its own process, so that each end is
//! attributed to its own PID; optionally inside a network namespace.

use std::{
    io::{BufRead, BufReader},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use serde_json::Value;

/// A running `peer.py` (see its docstring for the roles and behaviours).
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
}

impl Peer {
    /// `role` is `client` or `server`; see tests/peer.py for the behaviours.
    pub fn spawn(ns: Option<&str>, role: &str, host: &str, port: u16, behaviour: &str) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peer.py");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "python3"]);
                c
            }
            None => Command::new("python3"),
        };
        let mut child = cmd
            .args([script, role, host, &port.to_string(), behaviour])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs tests/peer.py");
        let pid = child.id();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            stdout,
            pid,
        }
    }

    /// A server; returns it with the port it listens on.
    pub fn server(ns: Option<&str>, host: &str, port: u16, behaviour: &str) -> (Self, u16) {
        let mut peer = Self::spawn(ns, "server", host, port, behaviour);
        let port = peer.line()["listening"].as_u64().unwrap() as u16;
        (peer, port)
    }

    /// The next JSON line the peer prints.
    pub fn line(&mut self) -> Value {
        let mut text = String::new();
        self.stdout.read_line(&mut text).expect("peer output");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("peer said {text:?}: {e}"))
    }

    /// Lets a `hold`/`send-wait` peer go on to close.
    pub fn release(&mut self) {
        self.stdin.take();
    }

    /// Releases the peer and waits for it to succeed.
    pub fn wait(mut self) {
        self.release();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "peer failed: {status}");
    }
}

impl Drop for Peer {
    /// A test that failed half-way must not leave its peer running: it would hold the test's
    /// output pipe open and the whole run would wait for it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
