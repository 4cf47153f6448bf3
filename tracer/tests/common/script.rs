//! A short python program given inline, in a process of its own: a traced parent that forks,
//! a client refused, a second server on one port. It prints its pid first, and may wait for a
//! byte on stdin (`go`) before it acts.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdout, Command, Stdio},
};

pub struct Script {
    child: Child,
    out: BufReader<ChildStdout>,
    pub pid: u32,
}

impl Script {
    /// Runs `source` with `args` (sys.argv[1:]); returns once it has printed its pid.
    pub fn spawn(source: &str, args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(source)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut script = Self { child, out, pid: 0 };
        script.pid = script
            .line()
            .parse()
            .expect("the script prints its pid first");
        script
    }

    /// The next line it prints, trimmed.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("the script's output");
        line.trim().to_string()
    }

    /// Lets a script that waits on stdin go on.
    pub fn go(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            stdin.write_all(b"x").unwrap();
        }
    }

    /// Waits for it to exit, successfully.
    pub fn wait(&mut self) {
        assert!(self.child.wait().unwrap().success(), "the script failed");
    }

    /// Stops it (a server that runs until killed) and returns the lines it printed since.
    pub fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut lines = Vec::new();
        let mut line = String::new();
        while self.out.read_line(&mut line).unwrap_or(0) > 0 {
            lines.push(line.trim().to_string());
            line.clear();
        }
        lines
    }
}

impl Drop for Script {
    /// A test that failed half-way must not leave its program running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
