//! `cargo xtask test`: bootstrap (with the test tools), then fmt, clippy, and every test, unit
//! and root-only integration. Prints one closing line `N passed, M failed`.

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitCode, Stdio},
    thread,
};

use anyhow::Context as _;

use crate::{bootstrap, cmd};

pub fn run(extra: &[String]) -> anyhow::Result<ExitCode> {
    bootstrap::run(true)?;
    if !cmd::is_root() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        eprintln!(
            "xtask: not root: the integration tests load BPF programs, capture packets and make \
             network namespaces (CAP_BPF, CAP_PERFMON, CAP_NET_RAW, CAP_NET_ADMIN, CAP_SYS_ADMIN); \
             they {} — run `sudo -E env PATH=$PATH cargo xtask test` to run them",
            if ci {
                "will fail under CI"
            } else {
                "will be skipped"
            }
        );
    }
    cmd::status(cmd::cargo().args(["fmt", "--all", "--", "--check"]))
        .context("formatting: run `cargo fmt --all`")?;
    cmd::status(cmd::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    let mut test = cmd::cargo();
    // The release build is the one users run, and the tests drive real load through it.
    // --no-fail-fast: one failing test binary must not hide the results of the others.
    test.args(["test", "--release", "--no-fail-fast"])
        .args(extra);
    test.args(["--", "--test-threads", "2"]);
    // The tests run ip, tcpstates and friends, which live in sbin: a user's PATH may lack it.
    let path = std::env::var("PATH").unwrap_or_default();
    test.env("PATH", format!("{path}:/usr/local/sbin:/usr/sbin:/sbin"));
    let mut counts = run_counting(&mut test)?;
    quick_bench(&mut counts);
    short_soak(&mut counts);
    println!("{} passed, {} failed", counts.passed, counts.failed);
    Ok(if counts.failed == 0 && counts.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The soak in a CI-friendly form: 30 s of moderate churn, RSS flat, nothing lost.
fn short_soak(counts: &mut Counts) {
    if !cmd::is_root() {
        eprintln!("xtask: SKIPPED short soak: needs root");
        return;
    }
    let opts = crate::soak::Options {
        seconds: 30,
        rate: 1000,
    };
    let result = crate::soak::run(&opts)
        .map_err(|e| format!("{e:#}"))
        .and_then(|r| crate::soak::check(&r).map(|_| r));
    match result {
        Ok(r) => {
            println!(
                "test soak::short ... ok ({} connections, RSS {:?} KiB)",
                r.connections, r.rss_kib
            );
            counts.passed += 1;
        }
        Err(e) => {
            println!("test soak::short ... FAILED: {e}");
            counts.failed += 1;
        }
    }
}

/// The benchmark in its quick form, as one more test: it must run and give sane numbers.
fn quick_bench(counts: &mut Counts) {
    if !cmd::is_root() {
        eprintln!("xtask: SKIPPED quick benchmark: needs root");
        return;
    }
    let opts = crate::bench::Options {
        rounds: 1,
        seconds: 1,
        mode: "rst".into(),
        threads: 2,
        quick: true,
    };
    match crate::bench::run(&opts)
        .map_err(|e| format!("{e:#}"))
        .and_then(|r| crate::bench::check_sane(&r))
    {
        Ok(()) => {
            println!("test bench::quick ... ok");
            counts.passed += 1;
        }
        Err(e) => {
            println!("test bench::quick ... FAILED: {e}");
            counts.failed += 1;
        }
    }
}

#[derive(Default, Debug, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ok: bool,
}

/// Runs cargo test, streaming its output, and adds up its `test result:` lines.
fn run_counting(cmd: &mut Command) -> anyhow::Result<Counts> {
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    let reader = thread::spawn(move || {
        let mut counts = Counts::default();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some((p, f)) = parse_result(&line) {
                counts.passed += p;
                counts.failed += f;
            }
        }
        counts
    });
    let status = child.wait()?;
    let mut counts = reader.join().expect("reader thread");
    counts.ok = status.success();
    if !status.success() && counts.failed == 0 {
        // A build failure or a crashed test binary: count it, never report a clean run.
        counts.failed += 1;
    }
    Ok(counts)
}

/// `test result: ok. 12 passed; 0 failed; 1 ignored; ...`
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let number = |label: &str| {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(label)?
                .trim()
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    Some((number("passed")?, number("failed")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_test_result_lines() {
        assert_eq!(
            parse_result(
                "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some((12, 0))
        );
        assert_eq!(
            parse_result(
                "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((3, 2))
        );
        assert_eq!(parse_result("running 3 tests"), None);
    }
}
