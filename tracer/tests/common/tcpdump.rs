//! tcpdump beside the tracer, as an independent witness of the FIN and RST segments that were
//! on the wire. Text mode with absolute sequence numbers (`-S`), parsed into `Segment`s.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

/// A FIN or RST segment as tcpdump printed it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Segment {
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    /// tcpdump's flag letters, e.g. `F.` (FIN, ACK) or `R` (RST).
    pub flags: String,
    pub seq: u64,
    /// None on a RST without ACK.
    pub ack: Option<u64>,
    /// The interface and direction (`In`/`Out`), printed only when capturing on `any`.
    pub iface: Option<String>,
    pub dir: Option<String>,
}

impl Segment {
    pub fn is_fin(&self) -> bool {
        self.flags.contains('F')
    }

    pub fn is_rst(&self) -> bool {
        self.flags.contains('R')
    }
}

/// Parses one line of `tcpdump -nn -S -tt` into a segment when it is a TCP FIN or RST:
/// `1764000000.123456 [lo Out ]IP 10.0.0.1.40000 > 10.0.0.2.80: Flags [R.], seq 1, ack 2, ...`
/// (`IP6` and `fd00::1.40000` for IPv6).
pub fn parse_segment(line: &str) -> Option<Segment> {
    let mut words = line.split_whitespace();
    words.next()?; // the timestamp
    let mut prefix = Vec::new();
    for word in words.by_ref() {
        if word == "IP" || word == "IP6" {
            break;
        }
        prefix.push(word);
    }
    let (src, sport) = endpoint(words.next()?)?;
    if words.next()? != ">" {
        return None;
    }
    let (dst, dport) = endpoint(words.next()?.strip_suffix(':')?)?;
    let rest: Vec<&str> = words.collect();
    let rest = rest.join(" ");
    let flags = rest.strip_prefix("Flags [")?.split(']').next()?.to_string();
    if !flags.contains(['F', 'R']) {
        return None;
    }
    let field = |name: &str| {
        rest.split(", ")
            .find_map(|part| part.strip_prefix(name))
            .and_then(|v| v.split(':').next()?.parse().ok())
    };
    Some(Segment {
        src,
        sport,
        dst,
        dport,
        flags,
        seq: field("seq ")?,
        ack: field("ack "),
        iface: prefix.first().map(|s| s.to_string()),
        dir: prefix.get(1).map(|s| s.to_string()),
    })
}

/// `10.0.0.1.40000` or `fd00::1.40000`: the address, then the port after the last dot.
fn endpoint(text: &str) -> Option<(String, u16)> {
    let (addr, port) = text.rsplit_once('.')?;
    Some((addr.to_string(), port.parse().ok()?))
}

/// A running tcpdump.
pub struct Tcpdump {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Tcpdump {
    /// Starts `tcpdump -i IFACE -nn -S -tt -l -U FILTER` and waits until it listens.
    pub fn start(iface: &str, filter: &str) -> Self {
        Self::start_in(None, iface, filter)
    }

    /// The same inside network namespace `ns` (`ip netns exec NS tcpdump ...`).
    pub fn start_in(ns: Option<&str>, iface: &str, filter: &str) -> Self {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tcpdump"]);
                c
            }
            None => Command::new("tcpdump"),
        };
        let mut child = cmd
            .args(["-i", iface, "-nn", "-S", "-tt", "-l", "-U", filter])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump runs (cargo xtask bootstrap --test-tools installs it)");
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = channel();
        thread::spawn(move || {
            let mut said = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = ready_tx.send(Ok(()));
                }
                said.push(line);
            }
            // Reached only if it never listened (then the receiver still waits) or has ended.
            let _ = ready_tx.send(Err(said.join("\n")));
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let failure = match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => None,
            Ok(Err(stderr)) => Some(format!("tcpdump -i {iface} {filter:?} ended: {stderr}")),
            Err(_) => Some(format!("tcpdump -i {iface} did not listen within 10 s")),
        };
        if let Some(failure) = failure {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{failure}");
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a FIN/RST segment matching `pred` (also among those already printed).
    pub fn wait_for(&mut self, pred: impl Fn(&Segment) -> bool, timeout: Duration) -> Segment {
        let matching = |line: &String| parse_segment(line).filter(|s| pred(s));
        if let Some(s) = self.seen.iter().find_map(matching) {
            return s;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = matching(&line);
                    self.seen.push(line);
                    if let Some(s) = found {
                        return s;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "tcpdump printed no matching segment within {timeout:?}:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Stops tcpdump and returns every line it printed.
    pub fn stop(mut self) -> Vec<String> {
        // tcpdump says nothing when it has printed what the kernel holds: give the last
        // packets a moment. A test that needs one packet for sure waits for it (`wait_for`).
        thread::sleep(Duration::from_millis(200));
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        // Its stdout is closed now: this ends once the reader has passed on the last line.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        std::mem::take(&mut self.seen)
    }

    /// Stops tcpdump and returns the FIN and RST segments it saw, in order.
    pub fn stop_segments(self) -> Vec<Segment> {
        self.stop()
            .iter()
            .filter_map(|l| parse_segment(l))
            .collect()
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
