//! The tracer under test as a child process: its JSON lines collected as they come, waits with
//! deadlines, and a stop by SIGINT that returns everything it printed.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long the tracer may take to load and attach; generous for a VM without KVM.
const READY_WAIT: Duration = Duration::from_secs(120);
const STOP_WAIT: Duration = Duration::from_secs(30);

pub struct Tracer {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    stdout: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
}

/// What a stopped tracer printed.
pub struct Output {
    pub lines: Vec<Value>,
    pub stderr: String,
    pub status: String,
}

impl Tracer {
    pub fn start(path: &str, args: &[String]) -> Result<Self, String> {
        let mut child = Command::new(path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {path}: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped");
        let sink = Arc::clone(&lines);
        let stdout = thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // stdout carries JSON lines only (CONTRACT.md); anything else is kept visible.
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(v);
            }
        });
        let mut err = child.stderr.take().expect("piped");
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        Ok(Self {
            child,
            lines,
            stdout: Some(stdout),
            stderr: Some(stderr),
        })
    }

    /// The `ready` line, or why it never came (with the tracer's stderr when it exited).
    pub fn wait_ready(&mut self) -> Result<Value, String> {
        let deadline = Instant::now() + READY_WAIT;
        while Instant::now() < deadline {
            if let Some(v) = self.find(|v| v["event"] == "ready") {
                return Ok(v);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
                return Err(format!(
                    "the tracer exited ({status}) before ready: {}",
                    stderr.unwrap_or_default().trim()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(format!("no ready line within {READY_WAIT:?}"))
    }

    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.lines.lock().unwrap().iter().find(|v| pred(v)).cloned()
    }

    /// The first line matching `pred`, waiting up to `timeout`.
    pub fn wait_for(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.find(&pred) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, then every line (the summary last), stderr and the exit status; killed when it
    /// does not stop in time.
    pub fn stop(mut self) -> Output {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + STOP_WAIT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status.to_string(),
                _ if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break format!("killed: no exit within {STOP_WAIT:?} of SIGINT");
                }
                _ => thread::sleep(Duration::from_millis(20)),
            }
        };
        if let Some(h) = self.stdout.take() {
            let _ = h.join();
        }
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        Output {
            lines,
            stderr,
            status,
        }
    }
}

impl Drop for Tracer {
    /// Never leave a tracer behind (a failed scenario returns early).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
