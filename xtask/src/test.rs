//! `cargo xtask test`: bootstrap (with the test tools), then the whole suite: fmt, clippy,
//! `cargo test` (unit and root-only integration tests), the quick benchmark and the short soak.
//! Output streams live; the last line is `N passed, M failed` (`, K skipped` when some were).

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitCode, Stdio},
    thread,
};

use anyhow::Context as _;

use crate::{bootstrap, cmd};

/// Integration tests make network namespaces and load BPF programs: two at a time at most.
const TEST_THREADS: &str = "2";

pub fn run(extra: &[String]) -> anyhow::Result<ExitCode> {
    bootstrap::run(true)?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let root = cmd::is_root();
    if !root {
        eprintln!("{}", not_root_message(ci));
    }
    let mut counts = Counts::default();
    counts.check(
        "fmt",
        check(cmd::cargo().args(["fmt", "--all", "--", "--check"])),
    );
    // Not --workspace: that would also lint tracer-ebpf for the host, where a `no_std`
    // `no_main` BPF crate does not build. The default members are every userspace crate.
    counts.check(
        "clippy",
        check(cmd::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"])),
    );
    counts.add(run_counting(&mut cargo_test(extra))?);
    let filtered = !extra.is_empty();
    for (name, task) in [
        (
            "bench::quick",
            quick_bench as fn() -> Result<String, String>,
        ),
        ("soak::short", short_soak),
    ] {
        if filtered {
            eprintln!("xtask: SKIPPED {name}: a test filter was given");
            counts.skipped += 1;
        } else if !root {
            counts.root_only(name, ci);
        } else {
            counts.check(name, task());
        }
    }
    if filtered {
        eprintln!("xtask: SKIPPED vm: a test filter was given");
        counts.skipped += 1;
    } else if !root {
        counts.root_only("vm", ci);
    } else {
        vm_checks(&mut counts, ci);
    }
    if !root && !ci {
        eprintln!(
            "xtask: not root: the root-only tests returned early, and cargo counts them as passed"
        );
    }
    println!("{}", counts.closing_line());
    Ok(if counts.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn not_root_message(ci: bool) -> String {
    format!(
        "xtask: not root: the integration tests, the benchmark and the soak load BPF programs \
         (CAP_BPF, CAP_PERFMON), capture packets (CAP_NET_RAW) and make network namespaces \
         (CAP_NET_ADMIN, CAP_SYS_ADMIN); {}. Run `sudo -E env PATH=$PATH cargo xtask test`.",
        if ci {
            "under CI=true they fail"
        } else {
            "they are skipped"
        }
    )
}

/// `cargo test` over the userspace crates: release, the build users run and the one the
/// integration tests drive load through; every test binary even when one fails.
fn cargo_test(extra: &[String]) -> Command {
    let mut test = cmd::cargo();
    test.args(["test", "--release", "--no-fail-fast"])
        .args(extra);
    // Arguments after a `--` in `extra` already go to the test binaries.
    if !extra.iter().any(|a| a == "--") {
        test.arg("--");
    }
    test.args(["--test-threads", TEST_THREADS]);
    test
}

/// Runs a command whose success is one check; the error says which command failed.
fn check(cmd: &mut Command) -> Result<String, String> {
    cmd::status(cmd)
        .map(|()| String::new())
        .map_err(|e| format!("{e:#}"))
}

/// The benchmark in its quick form, as one more test: it must run and give sane numbers.
fn quick_bench() -> Result<String, String> {
    let opts = crate::bench::Options {
        rounds: 1,
        seconds: 1,
        mode: "rst".into(),
        threads: 2,
        // A few requests per connection: the load's keep-alive path runs too, and every
        // connection still ends in one close line.
        requests: 3,
        quick: true,
    };
    crate::bench::run(&opts)
        .map_err(|e| format!("{e:#}"))
        .and_then(|r| crate::bench::check_sane(&r))
        .map(|()| String::new())
}

/// The soak in a CI-friendly form: 30 s of moderate churn, RSS flat, nothing lost.
fn short_soak() -> Result<String, String> {
    let opts = crate::soak::Options {
        seconds: 30,
        rate: 1000,
    };
    let r = crate::soak::run(&opts).map_err(|e| format!("{e:#}"))?;
    crate::soak::check(&r)?;
    Ok(format!(
        " ({} connections, RSS {:?} KiB)",
        r.connections, r.rss_kib
    ))
}

/// `cargo xtask vm-test`: one check per kernel and probe set. Without qemu (it cannot be
/// installed here) it is skipped, except under CI, which must run it.
fn vm_checks(counts: &mut Counts, ci: bool) {
    if let Err(e) = bootstrap::install_packages(crate::vm::PACKAGES) {
        let why = format!("qemu and busybox cannot be installed: {e:#}");
        if ci {
            counts.check("vm", Err(why));
        } else {
            eprintln!("xtask: SKIPPED vm: {why}");
            counts.skipped += 1;
        }
        return;
    }
    match crate::vm::run() {
        Ok(results) => {
            for (name, result) in results {
                counts.check(&name, result);
            }
        }
        Err(e) => counts.check("vm", Err(format!("{e:#}"))),
    }
}

/// Tests counted over the whole run.
#[derive(Default, Debug, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    skipped: u64,
}

impl Counts {
    /// Counts one check, printed like a cargo test line.
    fn check(&mut self, name: &str, result: Result<String, String>) {
        match result {
            Ok(note) => {
                println!("test {name} ... ok{note}");
                self.passed += 1;
            }
            Err(e) => {
                println!("test {name} ... FAILED: {e}");
                self.failed += 1;
            }
        }
    }

    /// A root-only check without root: skipped, or failed under CI, which must run it.
    fn root_only(&mut self, name: &str, ci: bool) {
        if ci {
            self.check(name, Err("needs root, and CI must run it".into()));
        } else {
            eprintln!("xtask: SKIPPED {name}: needs root");
            self.skipped += 1;
        }
    }

    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.skipped += other.skipped;
    }

    /// `N passed, M failed`, with `, K skipped` only when some were.
    fn closing_line(&self) -> String {
        let mut line = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 {
            line.push_str(&format!(", {} skipped", self.skipped));
        }
        line
    }
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
            if let Some(result) = parse_result(&line) {
                counts.add(result);
            }
        }
        counts
    });
    let status = child.wait()?;
    let mut counts = reader.join().expect("reader thread");
    if !status.success() && counts.failed == 0 {
        // A build failure or a crashed test binary: count it, never report a clean run.
        println!("test cargo-test ... FAILED: {status}");
        counts.failed += 1;
    }
    Ok(counts)
}

/// `test result: ok. 12 passed; 0 failed; 1 ignored; ...` (ignored tests count as skipped).
fn parse_result(line: &str) -> Option<Counts> {
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
    Some(Counts {
        passed: number("passed")?,
        failed: number("failed")?,
        skipped: number("ignored").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_test_result_lines() {
        let ok = "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; \
                  finished in 0.01s";
        assert_eq!(
            parse_result(ok),
            Some(Counts {
                passed: 12,
                failed: 0,
                skipped: 1
            })
        );
        let failed =
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(
            parse_result(failed),
            Some(Counts {
                passed: 3,
                failed: 2,
                skipped: 0
            })
        );
        assert_eq!(parse_result("running 3 tests"), None);
    }

    #[test]
    fn the_closing_line_names_skips_only_when_there_are_some() {
        let mut counts = Counts {
            passed: 5,
            failed: 1,
            skipped: 0,
        };
        assert_eq!(counts.closing_line(), "5 passed, 1 failed");
        counts.skipped = 2;
        assert_eq!(counts.closing_line(), "5 passed, 1 failed, 2 skipped");
    }

    #[test]
    fn test_binary_arguments_follow_one_separator() {
        let args = |extra: &[&str]| {
            let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            let cmd = cargo_test(&extra);
            cmd.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(args(&[]).ends_with("--no-fail-fast -- --test-threads 2"));
        assert!(
            args(&["smoke", "--", "--nocapture"])
                .ends_with("smoke -- --nocapture --test-threads 2")
        );
    }
}
