//! The built tracer as a child process: its stdout read line by line on a thread, every wait
//! bounded by a deadline, and failures that show what the tracer said.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long to wait for the tracer's pipes to close once it has exited.
const DRAIN: Duration = Duration::from_secs(5);

/// A line of stdout: JSON, or the text of a line that is not (a contract violation, reported
/// from the test thread rather than lost in the reader thread's panic).
type Line = Result<Value, String>;

/// A running tracer. Dropping it kills the process if it is still running.
pub struct Tracer {
    child: Child,
    lines: Receiver<Line>,
    /// Every line read so far, in order.
    seen: Vec<Value>,
    stderr: Receiver<String>,
}

/// What a stopped tracer left.
pub struct Stopped {
    pub lines: Vec<Value>,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Stopped {
    /// The `event` lines of the socket (lport, rport), in order.
    pub fn lines_of(&self, event: &str, lport: u16, rport: u16) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|v| super::is(v, event, lport, rport))
            .collect()
    }
}

impl Tracer {
    /// Starts `tracer ARGS` with stdin closed and stdout and stderr piped.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tracer"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the tracer binary runs");
        let lines = read_lines(child.stdout.take().unwrap());
        let stderr = read_all(child.stderr.take().unwrap());
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

    /// Every line read so far.
    pub fn seen(&self) -> &[Value] {
        &self.seen
    }

    /// Waits for the first line, which must be `ready`, and returns it.
    pub fn wait_ready(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        match self.next_line(deadline) {
            Some(v) if v["event"] == "ready" => v,
            Some(v) => self.fail(&format!("the first line is not `ready`: {v}")),
            None => self.fail(&format!("no `ready` line (waited up to {timeout:?})")),
        }
    }

    /// Waits for a line matching `pred` (also among the lines already read) and returns it.
    pub fn wait_for(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let mut lines = self.lines_until(pred, timeout);
        lines.pop().expect("lines_until ends with the match")
    }

    /// Waits for a line matching `pred` (also among the lines already read) and returns every
    /// line from the first one up to and including that match.
    pub fn lines_until(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Vec<Value> {
        if let Some(i) = self.seen.iter().position(&pred) {
            return self.seen[..=i].to_vec();
        }
        let deadline = Instant::now() + timeout;
        while let Some(v) = self.next_line(deadline) {
            if pred(&v) {
                return self.seen.clone();
            }
        }
        self.fail(&format!("no matching line within {timeout:?}"))
    }

    /// Sends SIGINT, waits (up to 20 s) for the exit, and returns every line, stderr and the
    /// exit status.
    pub fn stop(self) -> Stopped {
        self.signal(libc::SIGINT);
        self.finish(Duration::from_secs(20))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child, which has not been reaped while `self` lives.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to end by itself (or after a signal sent earlier); past the
    /// deadline it is killed and the test fails.
    pub fn finish(mut self, timeout: Duration) -> Stopped {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the tracer") {
                break status;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("the tracer did not exit within {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        };
        // The process is gone: its stdout ends once the reader has taken the last lines.
        while self.next_line(Instant::now() + DRAIN).is_some() {}
        Stopped {
            lines: std::mem::take(&mut self.seen),
            stderr: self.stderr.recv_timeout(DRAIN).unwrap_or_default(),
            status,
        }
    }

    /// The next line, recorded in `seen`; None at the deadline or when stdout has ended.
    fn next_line(&mut self, deadline: Instant) -> Option<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(Ok(v)) => {
                self.seen.push(v.clone());
                Some(v)
            }
            Ok(Err(text)) => self.fail(&format!("stdout carries JSON lines only; got {text:?}")),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Fails the test with `what`, the lines read so far, how the tracer ended and its stderr
    /// (killing it first if it still runs: its stderr is complete only once it has exited).
    fn fail(&mut self, what: &str) -> ! {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("it exited: {status}"),
            _ => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                "it was still running; killed".to_string()
            }
        };
        let stderr = self.stderr.recv_timeout(DRAIN).unwrap_or_default();
        let lines: Vec<String> = self.seen.iter().map(Value::to_string).collect();
        panic!(
            "{what} ({status})\n--- lines so far ---\n{}\n--- tracer stderr ---\n{stderr}",
            lines.join("\n")
        );
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

/// Reads stdout line by line on a thread, parsing each line as JSON.
fn read_lines(stdout: ChildStdout) -> Receiver<Line> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let parsed = serde_json::from_str::<Value>(&line).map_err(|_| line);
            if tx.send(parsed).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads all of stderr on a thread; the text arrives once the tracer closes it.
fn read_all(mut stderr: ChildStderr) -> Receiver<String> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    rx
}
