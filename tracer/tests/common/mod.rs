//! Shared helpers for the root-only integration tests: run the built tracer, read its JSON
//! lines with deadlines, and make network namespaces joined by veth pairs.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc::{Receiver, RecvTimeoutError, channel},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Whether this test may run: as root, yes; otherwise it skips with a message, except under
/// CI (CI=true), where a skipped kernel test would hide a broken setup.
pub fn require_root() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs root (BPF, packet capture, network namespaces) and CI must run it");
    }
    eprintln!("SKIPPED: needs root (run `sudo -E cargo xtask test`)");
    false
}

/// A running tracer.
pub struct Tracer {
    child: Child,
    lines: Receiver<Value>,
    seen: Vec<Value>,
    stderr: Receiver<String>,
}

/// What a stopped tracer left.
pub struct Stopped {
    pub lines: Vec<Value>,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Tracer {
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tracer"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the tracer binary runs");
        let stdout = child.stdout.take().unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v = serde_json::from_str::<Value>(&line).unwrap_or_else(|e| {
                    panic!("stdout carries JSON lines only; got {line:?}: {e}")
                });
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr) = channel();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            let _ = etx.send(text);
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the tracer is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the first line, which must be `ready`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Value {
        match self.lines.recv_timeout(timeout) {
            Ok(v) => {
                assert_eq!(v["event"], "ready", "first line: {v}");
                self.seen.push(v.clone());
                v
            }
            Err(_) => {
                let _ = self.child.kill();
                let status = self.child.wait().ok();
                let stderr = self
                    .stderr
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_default();
                panic!("no `ready` within {timeout:?} (exit {status:?}); stderr:\n{stderr}");
            }
        }
    }

    /// Waits for a line matching `pred` (also among lines already read), with a deadline.
    pub fn wait_for(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "no matching line within {timeout:?}; lines so far:\n{}",
                        self.seen
                            .iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                }
            }
        }
    }

    /// Sends SIGINT, waits for the exit, and returns every line, stderr and the status.
    pub fn stop(self) -> Stopped {
        self.signal(libc::SIGINT);
        self.finish(Duration::from_secs(20))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to end by itself (or after a signal sent earlier).
    pub fn finish(mut self, timeout: Duration) -> Stopped {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("the tracer did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut lines = std::mem::take(&mut self.seen);
        while let Ok(v) = self.lines.recv_timeout(Duration::from_secs(5)) {
            lines.push(v);
        }
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        Stopped {
            lines,
            stderr,
            status,
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} runs: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace joined to the root namespace by a veth pair: the tracer (in the root
/// namespace) captures on `root_if`; a socket made in the namespace (see `in_ns`) is the far
/// end. Removed on drop.
pub struct NetnsPeer {
    pub ns: String,
    pub root_if: String,
    pub ns_if: String,
    pub root_v4: String,
    pub ns_v4: String,
    pub root_v6: String,
    pub ns_v6: String,
}

impl NetnsPeer {
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 200) * 10 + n % 10;
        let ns = format!("trc{}-{n}", std::process::id());
        let root_if = format!("trr{id}");
        let ns_if = format!("trn{id}");
        // Test-only addresses, used only on this veth pair inside this machine.
        let octet = 1 + id % 250;
        let peer = NetnsPeer {
            root_v4: format!("10.213.{octet}.1"),
            ns_v4: format!("10.213.{octet}.2"),
            root_v6: format!("fd00:213:{octet:x}::1"),
            ns_v6: format!("fd00:213:{octet:x}::2"),
            ns,
            root_if,
            ns_if,
        };
        peer.create();
        peer
    }

    fn create(&self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        sh("ip", &["netns", "add", &self.ns]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &self.root_if,
                "type",
                "veth",
                "peer",
                "name",
                &self.ns_if,
            ],
        );
        sh("ip", &["link", "set", &self.ns_if, "netns", &self.ns]);
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.root_v4),
                "dev",
                &self.root_if,
            ],
        );
        sh(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{}/64", self.root_v6),
                "dev",
                &self.root_if,
                "nodad",
            ],
        );
        sh("ip", &["link", "set", &self.root_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &self.ns, "ip"];
            full.extend_from_slice(args);
            sh("ip", &full);
        };
        in_ns(&[
            "addr",
            "add",
            &format!("{}/24", self.ns_v4),
            "dev",
            &self.ns_if,
        ]);
        in_ns(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.ns_v6),
            "dev",
            &self.ns_if,
            "nodad",
        ]);
        in_ns(&["link", "set", &self.ns_if, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
    }

    /// Runs `f` on a thread that has entered the namespace; sockets made there stay in it.
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.ns);
        thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on this thread only, with a namespace fd we hold.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for NetnsPeer {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// tcpdump beside the tracer, as an independent witness of what was on the wire.
pub struct Tcpdump {
    child: Child,
    stdout: Receiver<String>,
}

impl Tcpdump {
    /// Starts `tcpdump -i IFACE -nn -S -tt -l FILTER` and waits until it listens.
    pub fn start(iface: &str, filter: &str) -> Self {
        let mut child = Command::new("tcpdump")
            .args(["-i", iface, "-nn", "-S", "-tt", "-l", "-U", filter])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump runs (cargo xtask bootstrap installs it)");
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("tcpdump listening");
        Self { child, stdout: rx }
    }

    /// Stops tcpdump and returns its lines.
    pub fn stop(mut self) -> Vec<String> {
        thread::sleep(Duration::from_millis(200)); // let the last packets through
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let mut lines = Vec::new();
        while let Ok(line) = self.stdout.recv_timeout(Duration::from_secs(2)) {
            lines.push(line);
        }
        lines
    }
}

/// A `peer.py` process holding one end of a connection, so that each end is attributed to
/// its own PID; optionally inside a network namespace.
pub struct Peer {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
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

/// Waits (up to 5 s) until the socket has something to read.
pub fn wait_readable(s: &std::net::TcpStream) {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(s),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 5000) };
}

/// SO_LINGER {1, 0}: close() then aborts with a RST.
pub fn set_linger_zero(s: &std::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
}

/// Opens `n` loopback connections to `l` with a byte unread on each server end, then closes
/// every server end at once: a burst of n resets (2n kernel events) in a few milliseconds.
pub fn reset_burst(l: &std::net::TcpListener, port: u16, n: usize) -> usize {
    use std::io::Write;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
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
