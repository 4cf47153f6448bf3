//! `tracer-scenarios`: the core teardown scenarios, run against a tracer binary on whatever
//! kernel this is (the host, or a VM booted by `cargo xtask vm-test`), checked, and written as
//! a JSON report whose normalized lines xtask compares across kernels.
//!
//! ```text
//! tracer-scenarios run --tracer PATH --probes MODE --out FILE
//! tracer-scenarios peer client|server HOST PORT BEHAVIOUR    (the other end; see peer.rs)
//! ```
//!
//! `run` exits 0 when every scenario passed, 1 when one failed, 2 on bad usage.

mod checks;
mod peer;
mod scenarios;
mod tracer;

use std::process::{Command, ExitCode};

use serde_json::{Value, json};

use crate::{
    checks::Context,
    scenarios::{ALL, Scenario},
    tracer::Tracer,
};

const USAGE: &str = "usage: tracer-scenarios run --tracer PATH --probes auto|tracepoint|kprobe \
                     --out FILE | tracer-scenarios peer client|server HOST PORT BEHAVIOUR";

/// Long enough that a slow VM's packets still join their events.
const JOIN_WINDOW: &str = "2s";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("peer") => peer::main(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("run") => Options::parse(&args[1..]).and_then(|o| run(&o)),
        _ => Err(USAGE.to_string()),
    };
    result.unwrap_or_else(|e| {
        eprintln!("tracer-scenarios: {e}");
        ExitCode::from(2)
    })
}

struct Options {
    tracer: String,
    probes: String,
    out: String,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut opts = Options {
            tracer: String::new(),
            probes: String::new(),
            out: String::new(),
        };
        for pair in args.chunks(2) {
            let [flag, value] = pair else {
                return Err(USAGE.into());
            };
            match flag.as_str() {
                "--tracer" => opts.tracer = value.clone(),
                "--probes" => opts.probes = value.clone(),
                "--out" => opts.out = value.clone(),
                _ => return Err(format!("unknown option {flag}; {USAGE}")),
            }
        }
        if opts.tracer.is_empty() || opts.probes.is_empty() || opts.out.is_empty() {
            return Err(USAGE.into());
        }
        Ok(opts)
    }
}

fn run(opts: &Options) -> Result<ExitCode, String> {
    let check = tracer_check(opts)?;
    let ctx = Context {
        reasons: check["rst_reasons"] == true,
        capture: true,
    };
    let mut prepared = ALL
        .iter()
        .map(|&kind| Scenario::prepare(kind))
        .collect::<Result<Vec<_>, _>>()?;
    let mut args: Vec<String> = ["--probes", &opts.probes, "--interface", "lo"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--join-window".into(), JOIN_WINDOW.into()]);
    for s in &prepared {
        args.extend(["--port".into(), s.conn.server_port.to_string()]);
    }
    let mut tracer = Tracer::start(&opts.tracer, &args)?;
    let ready = tracer.wait_ready()?;
    for s in &mut prepared {
        if let Err(e) = s.act(&tracer) {
            s.failures.push(e);
        }
    }
    let out = tracer.stop();
    let results: Vec<Value> = prepared
        .into_iter()
        .map(|s| scenario_result(s, &out.lines, ctx))
        .collect();
    let pass = results.iter().all(|r| r["pass"] == true);
    let report = json!({
        "kernel": ready["kernel"],
        "probes": opts.probes,
        "check": check,
        "ready": ready,
        "tracer_status": out.status,
        "tracer_stderr": out.stderr,
        "summary": out.lines.last(),
        "scenarios": results,
        "pass": pass,
    });
    std::fs::write(&opts.out, format!("{report}\n"))
        .map_err(|e| format!("writing {}: {e}", opts.out))?;
    for r in &results {
        eprintln!(
            "tracer-scenarios: {} {}",
            r["name"].as_str().unwrap_or_default(),
            if r["pass"] == true { "ok" } else { "FAILED" }
        );
        for f in r["failures"].as_array().into_iter().flatten() {
            eprintln!("  {}", f.as_str().unwrap_or_default());
        }
    }
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `tracer check --json`: what the tracer thinks of this kernel, for the report.
fn tracer_check(opts: &Options) -> Result<Value, String> {
    let out = Command::new(&opts.tracer)
        .args(["check", "--json", "--probes", &opts.probes])
        .output()
        .map_err(|e| format!("running {} check: {e}", opts.tracer))?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{} check --json printed no JSON ({e}): {}",
            opts.tracer,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

fn scenario_result(mut s: Scenario, all: &[Value], ctx: Context) -> Value {
    let lines: Vec<&Value> = all.iter().filter(|v| s.conn.end_of(v).is_some()).collect();
    s.failures
        .extend(checks::check(s.kind, &s.conn, &lines, ctx));
    let mut normalized: Vec<Value> = lines
        .iter()
        .map(|v| checks::normalize(v, &s.conn))
        .collect();
    // Events of the two ends interleave differently from run to run: compare as sets.
    normalized.sort_by_key(|v| (v["end"].to_string(), v.to_string()));
    json!({
        "name": s.kind.name(),
        "pass": s.failures.is_empty(),
        "failures": s.failures,
        "lines": normalized,
    })
}
