//! `cargo xtask soak`: moderate connection churn under the tracer for a long time, with the
//! tracer's RSS sampled: memory must stay flat and nothing may be lost. `cargo xtask test` runs
//! a short form.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cmd;

pub struct Options {
    pub seconds: u64,
    pub rate: u64,
}

/// What a soak measured.
#[derive(Debug)]
pub struct Report {
    pub rss_kib: Vec<u64>,
    pub connections: u64,
    pub close_lines: u64,
    pub lost: u64,
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    if !cmd::is_root() {
        bail!("the soak loads BPF programs: run it as root");
    }
    cmd::status(cmd::cargo().args(["build", "--release", "-p", "tracer", "-p", "loadgen"]))?;
    let bin = cmd::root().join("target/release");
    let mut tracer = Command::new(bin.join("tracer"))
        .args(["-i", "lo"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the tracer")?;
    let stdout = BufReader::new(tracer.stdout.take().context("stdout")?);
    let (tx, rx) = std::sync::mpsc::channel();
    // Read every line (a slow reader would be a different test); keep what the check needs.
    let reader = thread::spawn(move || {
        let mut close_lines = 0u64;
        let mut last = Value::Null;
        for line in stdout.lines().map_while(Result::ok) {
            if line.starts_with("{\"event\":\"ready\"") {
                let _ = tx.send(());
            }
            if line.starts_with("{\"event\":\"close\"") {
                close_lines += 1;
            } else if line.starts_with("{\"event\":\"summary\"") {
                last = serde_json::from_str(&line).unwrap_or(Value::Null);
            }
        }
        (close_lines, last)
    });
    rx.recv_timeout(Duration::from_secs(60))
        .context("the tracer printed no ready line")?;
    let mut load = Command::new(bin.join("loadgen"))
        .args(["--mode", "mix", "--threads", "2"])
        .args(["--rate", &opts.rate.to_string()])
        .args(["--duration", &format!("{}s", opts.seconds)])
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = tracer.id();
    let every = Duration::from_secs((opts.seconds / 20).max(1));
    let started = Instant::now();
    let mut rss_kib = Vec::new();
    while load.try_wait()?.is_none() {
        thread::sleep(every);
        rss_kib.push(cmd::status_kib(pid, "VmRSS"));
        eprintln!(
            "xtask soak: {:>5.0} s  tracer RSS {} KiB",
            started.elapsed().as_secs_f64(),
            rss_kib.last().unwrap()
        );
    }
    let out = load.wait_with_output()?;
    let report: Value = serde_json::from_slice(&out.stdout)?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    tracer.wait()?;
    let (close_lines, summary) = reader.join().expect("reader");
    let lost = ["ringbuf", "capture", "output", "hooks", "owner_table"]
        .iter()
        .map(|s| summary["lost"][s].as_u64().unwrap_or(u64::MAX))
        .sum();
    Ok(Report {
        rss_kib,
        connections: report["connections"].as_u64().unwrap_or(0),
        close_lines,
        lost,
    })
}

/// Flat memory, no loss, every connection traced.
pub fn check(r: &Report) -> Result<(), String> {
    if r.lost != 0 {
        return Err(format!("{} events lost", r.lost));
    }
    if r.connections == 0 || r.close_lines < r.connections {
        return Err(format!(
            "{} close lines for {} connections",
            r.close_lines, r.connections
        ));
    }
    if r.rss_kib.len() < 4 {
        return Err("too few RSS samples".into());
    }
    // The first 40 % is warm-up (tables fill up to their bounds: connections are remembered
    // 10 s); after that, the last third may not grow past the middle by more than 10 % + 4 MiB.
    let n = r.rss_kib.len();
    let early = *r.rss_kib[n * 2 / 5..n * 2 / 3].iter().max().unwrap();
    let late = *r.rss_kib[n * 2 / 3..].iter().max().unwrap();
    if late > early + early / 10 + 4096 {
        return Err(format!("RSS grew from {early} KiB to {late} KiB"));
    }
    Ok(())
}
