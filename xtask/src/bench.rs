//! `cargo xtask bench`: the tracer against the alternatives, under loopback connection churn,
//! as ratios to the rate without tracing measured in the same run.
//!
//! Each round runs, in turn (every other round in reverse order): no tracer; the floor (the same hooks, programs that do nothing);
//! the tracer tracing everything, with capture; the tracer with `--pid` of an unrelated quiet
//! service (`loadgen --quiet-service`: a listener and an idle connection, which the tracer seeds
//! from /proc; the production case); and the alternative, libbpf-tools `tcpstates` plus `tcpdump`
//! with a FIN/RST filter. Each ratio is against the same round's no-tracer rate; the table shows
//! medians over the rounds, and the load's CPU time per connection beside them (the load is
//! CPU-bound, so that shows the hooks' cost with less noise than the rate). Results as a markdown table, JSON and a PNG
//! chart under `bench-results/`.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{
    bootstrap,
    cmd::{self, which},
};

pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub mode: String,
    pub threads: usize,
    pub requests: u32,
    pub quick: bool,
}

/// One configuration measured.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Setup {
    NoTracer,
    Floor,
    TracerAll,
    TracerOtherPid,
    Alternative,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::NoTracer => "no tracer",
            Setup::Floor => "floor (empty programs)",
            Setup::TracerAll => "tracer, everything, capture",
            Setup::TracerOtherPid => "tracer --pid <other process>",
            Setup::Alternative => "tcpstates + tcpdump",
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
struct Sample {
    rate: f64,
    /// This rate over the no-tracer rate of the same round.
    ratio: f64,
    /// The load's own CPU time per connection (user + system, softirqs it ran included): the
    /// load is CPU-bound here, so this shows what the hooks cost it more steadily than the rate.
    load_cpu_us_per_conn: f64,
    connections: u64,
    close_lines: u64,
    lines: u64,
    joined: u64,
    unjoined: u64,
    lost: u64,
    cpu_secs: f64,
    peak_rss_kib: u64,
    /// Each program's (name, runs, run time in ns), as the kernel counted them: zeros unless
    /// kernel.bpf_stats_enabled was 1 (the accounting pass).
    programs: Vec<(String, u64, u64)>,
}

pub fn run(opts: &Options) -> anyhow::Result<Value> {
    bootstrap::run(true)?;
    if !cmd::is_root() {
        bail!("the benchmark loads BPF programs: run it as root (sudo -E cargo xtask bench)");
    }
    cmd::status(cmd::cargo().args(["build", "--release", "-p", "tracer", "-p", "loadgen"]))?;
    let bin = cmd::root().join("target/release");
    let alternative = which("tcpstates").is_some() && which("tcpdump").is_some();
    let mut setups = vec![
        Setup::NoTracer,
        Setup::Floor,
        Setup::TracerAll,
        Setup::TracerOtherPid,
    ];
    if alternative {
        setups.push(Setup::Alternative);
    }
    // One unmeasured run first: the first round's no-tracer run was otherwise the slowest of
    // the whole bench (caches, page tables, the listener's first accepts), raising every other
    // setup's first ratio.
    eprintln!("xtask bench: warm-up (not measured)");
    measure(&bin, Setup::NoTracer, opts).context("warming up")?;
    let mut samples: BTreeMap<Setup, Vec<Sample>> = BTreeMap::new();
    for round in 0..opts.rounds {
        // Every other round in reverse order: a drift of the shared machine's speed during a
        // round then favours no setup. Each ratio is taken against its own round's no-tracer
        // run, and the table reports the medians.
        let order: Vec<Setup> = if round % 2 == 0 {
            setups.clone()
        } else {
            setups.iter().rev().copied().collect()
        };
        let mut round_samples = Vec::new();
        for setup in order {
            eprintln!(
                "xtask bench: round {} of {}: {}",
                round + 1,
                opts.rounds,
                setup.name()
            );
            let sample = measure(&bin, setup, opts)
                .with_context(|| format!("measuring {}", setup.name()))?;
            round_samples.push((setup, sample));
        }
        let base = round_samples
            .iter()
            .find(|(setup, _)| *setup == Setup::NoTracer)
            .map_or(0.0, |(_, s)| s.rate);
        for (setup, mut sample) in round_samples {
            sample.ratio = if base > 0.0 { sample.rate / base } else { 0.0 };
            samples.entry(setup).or_default().push(sample);
        }
    }
    let mut report = summarise(&samples, opts);
    report["program_costs"] = account_programs(&bin, opts)?;
    write_results(&report, opts.quick)?;
    Ok(report)
}

/// Where the kernel-side time goes: one more run of each tracer setup with the kernel counting
/// every program's runs and run time (kernel.bpf_stats_enabled), apart from the rounds: the
/// counting itself costs ~50 ns a run, which would bias the ratios.
fn account_programs(bin: &Path, opts: &Options) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for setup in [Setup::TracerAll, Setup::TracerOtherPid] {
        eprintln!("xtask bench: accounting: {}", setup.name());
        let sample = {
            let _counting = BpfStats::enable()?;
            measure(bin, setup, opts).with_context(|| format!("accounting {}", setup.name()))?
        };
        let conns = sample.connections.max(1) as f64;
        let mut programs: Vec<&(String, u64, u64)> = sample
            .programs
            .iter()
            .filter(|(_, runs, _)| *runs > 0)
            .collect();
        programs.sort_by_key(|(_, _, ns)| std::cmp::Reverse(*ns));
        rows.push(json!({
            "setup": setup.name(),
            "connections": sample.connections,
            "ns_per_connection": programs.iter().map(|(_, _, ns)| *ns as f64).sum::<f64>() / conns,
            "programs": programs.iter().map(|(name, runs, ns)| json!({
                "program": name,
                "runs_per_connection": *runs as f64 / conns,
                "ns_per_run": *ns as f64 / (*runs).max(1) as f64,
                "ns_per_connection": *ns as f64 / conns,
            })).collect::<Vec<_>>(),
        }));
    }
    Ok(Value::Array(rows))
}

/// kernel.bpf_stats_enabled set to 1 while it lives, then back to what it was.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let before =
            fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.before.trim());
    }
}

/// The sanity check the test suite makes on a quick run: numbers exist and make sense. Never a
/// speed: these machines are shared and noisy.
pub fn check_sane(report: &Value) -> Result<(), String> {
    let rows = report["rows"].as_array().ok_or("no rows")?;
    if report["no_tracer_rate"].as_f64().unwrap_or(0.0) <= 0.0 {
        return Err("no connections without the tracer".into());
    }
    for row in rows {
        let name = row["setup"].as_str().unwrap_or("?");
        let ratio = row["ratio"].as_f64().unwrap_or(-1.0);
        if !(ratio > 0.0 && ratio < 3.0) {
            return Err(format!("{name}: ratio {ratio}"));
        }
        let load_cpu = row["load_cpu_us_per_connection"].as_f64().unwrap_or(0.0);
        if !(load_cpu > 0.0 && load_cpu < 100_000.0) {
            return Err(format!("{name}: load CPU {load_cpu} µs per connection"));
        }
        if name.starts_with("tracer, everything") {
            let per_conn = row["close_lines_per_connection"].as_f64().unwrap_or(0.0);
            if per_conn < 0.5 {
                return Err(format!("{name}: {per_conn} close lines per connection"));
            }
            if row["peak_rss_mib"].as_f64().unwrap_or(0.0) <= 0.0 {
                return Err(format!("{name}: no RSS measured"));
            }
        }
    }
    // The accounting pass: tracing everything, the state-change program runs several times per
    // connection and takes time.
    let everything = report["program_costs"]
        .as_array()
        .and_then(|setups| setups.first())
        .ok_or("no program accounting")?;
    let set_state = everything["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p["program"]
                .as_str()
                .is_some_and(|n| n.starts_with("set_state"))
        })
        .ok_or_else(|| format!("no set_state program in the accounting: {everything}"))?;
    let runs = set_state["runs_per_connection"].as_f64().unwrap_or(0.0);
    let ns = set_state["ns_per_run"].as_f64().unwrap_or(0.0);
    if !((1.0..100.0).contains(&runs) && ns > 0.0 && ns < 1_000_000.0) {
        return Err(format!("set_state accounting: {set_state}"));
    }
    Ok(())
}

fn measure(bin: &Path, setup: Setup, opts: &Options) -> anyhow::Result<Sample> {
    let scratch = std::env::temp_dir().join(format!("tracer-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    let out_file = scratch.join("events.jsonl");
    let _ = fs::remove_file(&out_file);
    // The "other process" for --pid: a quiet service with a listener and an idle connection.
    let mut quiet = Command::new(bin.join("loadgen"))
        .args(["--quiet-service"])
        .stdout(Stdio::piped())
        .spawn()?;
    // Its line says both sockets exist: the tracer's /proc seeding must find them.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(quiet.stdout.take().context("quiet service stdout")?),
        &mut line,
    )?;
    let mut observers: Vec<Child> = Vec::new();
    let tracer = match setup {
        Setup::NoTracer => None,
        Setup::Alternative => {
            let tool = |name: &str| which(name).unwrap_or_else(|| PathBuf::from(name));
            observers.push(spawn_quiet(Command::new(tool("tcpstates")).arg("-T"))?);
            observers.push(spawn_quiet(Command::new(tool("tcpdump")).args([
                "-i",
                "lo",
                "-nn",
                "-w",
                "/dev/null",
                "tcp[tcpflags] & (tcp-fin|tcp-rst) != 0",
            ]))?);
            thread::sleep(Duration::from_secs(2)); // both attach; no ready line to wait for
            None
        }
        _ => Some(start_tracer(bin, setup, &out_file, quiet.id())?),
    };
    // The tracer's CPU is counted from here: its start-up (loading and verifying the programs,
    // ~0.2 s) is not a cost per connection, and was most of what `--pid` showed per connection.
    let cpu_before_load = tracer.as_ref().map_or(0.0, |t| cpu_and_peak_rss(t.id()).0);
    let load = Command::new(bin.join("loadgen"))
        .args([
            "--mode",
            &opts.mode,
            "--threads",
            &opts.threads.to_string(),
            "--duration",
            &format!("{}s", opts.seconds),
            "--requests",
            &opts.requests.to_string(),
        ])
        .output()
        .context("running loadgen")?;
    if !load.status.success() {
        bail!("loadgen failed: {}", String::from_utf8_lossy(&load.stderr));
    }
    let report: Value = serde_json::from_slice(&load.stdout)?;
    let mut sample = Sample {
        rate: report["rate"].as_f64().unwrap_or(0.0),
        load_cpu_us_per_conn: report["cpu_us_per_conn"].as_f64().unwrap_or(0.0),
        connections: report["connections"].as_u64().unwrap_or(0),
        ..Sample::default()
    };
    if let Some(child) = tracer {
        finish_tracer(child, &out_file, &mut sample)?;
        sample.cpu_secs -= cpu_before_load;
    }
    for mut o in observers {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(o.id() as i32, libc::SIGINT) };
        let _ = o.wait();
    }
    kill(quiet);
    Ok(sample)
}

fn spawn_quiet(cmd: &mut Command) -> anyhow::Result<Child> {
    Ok(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn start_tracer(bin: &Path, setup: Setup, out: &Path, quiet_pid: u32) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin.join("tracer"));
    cmd.args(["-o", out.to_str().unwrap()]);
    cmd.arg("--bench-program-stats").arg(programs_file(out));
    match setup {
        Setup::Floor => cmd.args(["--bench-noop", "--no-capture"]),
        Setup::TracerAll => cmd.args(["-i", "lo"]),
        Setup::TracerOtherPid => cmd.args(["-i", "lo", "--pid", &quiet_pid.to_string()]),
        _ => unreachable!("no tracer for {setup:?}"),
    };
    let child = cmd.stderr(Stdio::inherit()).spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(out).is_ok_and(|t| t.contains("\"ready\"")) {
        if Instant::now() > deadline {
            bail!("the tracer printed no ready line");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn finish_tracer(mut child: Child, out: &Path, sample: &mut Sample) -> anyhow::Result<()> {
    let (cpu, rss) = cpu_and_peak_rss(child.id());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait()?;
    sample.cpu_secs = cpu;
    sample.peak_rss_kib = rss;
    // A line at a time: a run tracing everything writes ~100 MB of lines, which parsed all
    // at once took the bench itself over 1 GB.
    let mut summary = None;
    sample.lines = 0;
    for line in std::io::BufRead::lines(std::io::BufReader::new(fs::File::open(out)?)) {
        let line = line?;
        sample.lines += 1;
        if line.contains("\"event\":\"summary\"") {
            summary = serde_json::from_str::<Value>(&line).ok();
        }
    }
    let summary = summary.context("no summary line")?;
    sample.programs = read_program_stats(&programs_file(out))?;
    sample.close_lines = summary["counts"]["close"].as_u64().unwrap_or(0);
    sample.joined = summary["joined"].as_u64().unwrap_or(0);
    sample.unjoined = summary["unjoined"].as_u64().unwrap_or(0);
    sample.lost = ["ringbuf", "capture", "output", "hooks", "owner_table"]
        .iter()
        .map(|s| summary["lost"][s].as_u64().unwrap_or(0))
        .sum();
    Ok(())
}

/// Where the tracer writes its programs' accounting (`--bench-program-stats`).
fn programs_file(out: &Path) -> PathBuf {
    out.with_file_name("programs.json")
}

fn read_program_stats(path: &Path) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let text = fs::read_to_string(path).context("the tracer wrote no program accounting")?;
    let programs: Value = serde_json::from_str(&text)?;
    Ok(programs
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["program"].as_str().unwrap_or("?").to_string(),
                p["runs"].as_u64().unwrap_or(0),
                p["run_ns"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// CPU seconds (user + system) and peak RSS of a running process.
fn cpu_and_peak_rss(pid: u32) -> (f64, u64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum::<f64>() / ticks)
        .unwrap_or(0.0);
    let rss = cmd::status_kib(pid, "VmHWM");
    (cpu, rss)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return 0.0;
    }
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn summarise(samples: &BTreeMap<Setup, Vec<Sample>>, opts: &Options) -> Value {
    let base = median(samples[&Setup::NoTracer].iter().map(|s| s.rate).collect());
    let rows: Vec<Value> = samples
        .iter()
        .map(|(setup, runs)| {
            let m = |f: fn(&Sample) -> f64| median(runs.iter().map(f).collect());
            let rate = m(|s| s.rate);
            let traced = matches!(setup, Setup::TracerAll | Setup::TracerOtherPid | Setup::Floor);
            let events = m(|s| s.lines as f64);
            json!({
                "setup": setup.name(),
                "rate": rate,
                "ratio": m(|s| s.ratio),
                "load_cpu_us_per_connection": m(|s| s.load_cpu_us_per_conn),
                "connections": m(|s| s.connections as f64),
                "close_lines": traced.then(|| m(|s| s.close_lines as f64)),
                "close_lines_per_connection": traced.then(|| m(|s| s.close_lines as f64 / s.connections.max(1) as f64)),
                "joined_fraction": traced.then(|| m(|s| s.joined as f64 / (s.joined + s.unjoined).max(1) as f64)),
                "lost": traced.then(|| m(|s| s.lost as f64)),
                // Per million lines only where lines flowed; per million connections always
                // (with --pid of another process almost nothing is emitted, by design).
                "cpu_secs_per_million_lines": (traced && events > 10_000.0).then(|| m(|s| s.cpu_secs) / events * 1e6),
                "cpu_secs_per_million_connections": traced.then(|| m(|s| s.cpu_secs) / m(|s| s.connections as f64).max(1.0) * 1e6),
                "peak_rss_mib": traced.then(|| m(|s| s.peak_rss_kib as f64) / 1024.0),
                // Every round's ratio, in round order: how far apart they are says how much
                // the median can be trusted on a shared machine.
                "round_ratios": runs.iter().map(|s| (s.ratio * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "mode": opts.mode,
        "threads": opts.threads,
        "requests_per_connection": opts.requests,
        "rounds": opts.rounds,
        "seconds": opts.seconds,
        "no_tracer_rate": base,
        "rows": rows,
    })
}

fn table(report: &Value) -> String {
    let mut t = format!(
        "Mode {}, {} load threads, {} requests per connection, {} rounds of {} s; no-tracer rate \
         {:.0} connections/s.\n\n\
         | setup | conn/s | ratio | load CPU µs/conn | close lines/conn | joined | lost | CPU s / M lines | CPU s / M conns | peak RSS MiB | ratio by round |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        report["mode"].as_str().unwrap_or(""),
        report["threads"],
        report["requests_per_connection"],
        report["rounds"],
        report["seconds"],
        report["no_tracer_rate"].as_f64().unwrap_or(0.0)
    );
    let num = |v: &Value, digits: usize| match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "".to_string(),
    };
    for row in report["rows"].as_array().into_iter().flatten() {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row["setup"].as_str().unwrap_or(""),
            num(&row["rate"], 0),
            num(&row["ratio"], 3),
            num(&row["load_cpu_us_per_connection"], 1),
            num(&row["close_lines_per_connection"], 3),
            row["joined_fraction"]
                .as_f64()
                .map(|f| format!("{:.2} %", f * 100.0))
                .unwrap_or_default(),
            num(&row["lost"], 0),
            num(&row["cpu_secs_per_million_lines"], 2),
            num(&row["cpu_secs_per_million_connections"], 2),
            num(&row["peak_rss_mib"], 1),
            row["round_ratios"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| num(r, 2))
                .collect::<Vec<_>>()
                .join(" "),
        ));
    }
    t.push_str(&program_table(report));
    t
}

/// The accounting pass as a table: what each kernel program costs per connection.
fn program_table(report: &Value) -> String {
    let Some(setups) = report["program_costs"].as_array() else {
        return String::new();
    };
    let mut t = String::from(
        "\nKernel programs, from a separate run of each tracer setup with the kernel counting \
         (kernel.bpf_stats_enabled; the counting adds ~50 ns to each run):\n\n\
         | setup | program | runs/conn | ns/run | ns/conn |\n|---|---|---:|---:|---:|\n",
    );
    for setup in setups {
        let name = setup["setup"].as_str().unwrap_or("");
        for p in setup["programs"].as_array().into_iter().flatten() {
            t.push_str(&format!(
                "| {name} | {} | {:.2} | {:.0} | {:.0} |\n",
                p["program"].as_str().unwrap_or(""),
                p["runs_per_connection"].as_f64().unwrap_or(0.0),
                p["ns_per_run"].as_f64().unwrap_or(0.0),
                p["ns_per_connection"].as_f64().unwrap_or(0.0),
            ));
        }
        t.push_str(&format!(
            "| {name} | **all** | | | **{:.0}** |\n",
            setup["ns_per_connection"].as_f64().unwrap_or(0.0)
        ));
    }
    t
}

fn write_results(report: &Value, quick: bool) -> anyhow::Result<()> {
    let dir = cmd::root().join("bench-results");
    fs::create_dir_all(&dir)?;
    let stem = if quick { "quick" } else { "latest" };
    let md = table(report);
    println!("{md}");
    fs::write(dir.join(format!("{stem}.md")), &md)?;
    fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(report)?,
    )?;
    let png = dir.join(format!("{stem}.png"));
    match chart(&png) {
        Ok(()) => eprintln!("xtask bench: chart in {}", png.display()),
        Err(e) => eprintln!("xtask bench: no chart ({e:#})"),
    }
    Ok(())
}

/// A bar chart of the ratios, drawn by matplotlib (installed from PyPI when missing).
fn chart(png: &Path) -> anyhow::Result<()> {
    let has_matplotlib = Command::new("python3")
        .args(["-c", "import matplotlib"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_matplotlib {
        eprintln!("xtask bench: installing matplotlib (PyPI) to draw the chart");
        cmd::status(Command::new("python3").args(["-m", "pip", "install", "-q", "matplotlib"]))?;
    }
    let script = r##"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
report = json.load(open(sys.argv[1]))
rows = report["rows"]
names = [r["setup"] for r in rows]
ratios = [r["ratio"] for r in rows]
fig, ax = plt.subplots(figsize=(9, 4))
bars = ax.barh(names, ratios, color=["#888", "#aaa", "#2a7", "#2a7", "#c44"][: len(rows)])
ax.axvline(0.85, ls="--", c="#2a7", lw=1)
ax.axvline(0.97, ls=":", c="#2a7", lw=1)
for b, r in zip(bars, ratios):
    ax.text(b.get_width() + 0.01, b.get_y() + b.get_height() / 2, f"{r:.2f}", va="center")
ax.set_xlim(0, 1.15)
ax.invert_yaxis()
ax.set_xlabel("connection rate / rate without tracing (higher is better)")
requests = report.get("requests_per_connection") or 0
shape = f", {requests} requests per connection" if requests else ""
ax.set_title(f"tracer overhead, {report['mode']} churn{shape}, {report['threads']} threads")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"##;
    let json_path = png.with_extension("json");
    cmd::status(
        Command::new("python3")
            .args(["-c", script])
            .arg(&json_path)
            .arg(png),
    )
}
