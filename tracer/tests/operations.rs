//! Running it for real: bad input, privileges, signals, a closed or stalled consumer, output
//! files and log rotation.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Tracer, metric, scrape, wait_readable};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
const TRACER: &str = env!("CARGO_BIN_EXE_tracer");

/// Runs the tracer to completion with `args`; returns (exit code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(TRACER)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_exits_2_with_a_one_line_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--pid", "999999999"], "no process with PID 999999999"),
        (&["--duration", "5 parsecs"], "malformed duration"),
        (&["--join-window", "soon"], "malformed duration"),
        (&["--port", "0"], "--port 0"),
        (&["--ringbuf-kib", "3"], "power of two"),
        (&["--frobnicate"], "unexpected argument"),
    ];
    for (args, message) in cases {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn root_only_bad_input_exits_2() {
    if !common::require_root() {
        return;
    }
    let (code, stderr) = run(&["-i", "nosuchif0", "--duration", "1s"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("unknown interface \"nosuchif0\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("lo"),
        "lists the interfaces that exist: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    let (code, stderr) = run(&[
        "-o",
        "/proc/nope/out.jsonl",
        "--duration",
        "1s",
        "--no-capture",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot write the output"), "{stderr}");
}

#[test]
fn without_privileges_the_missing_capabilities_are_named() {
    if !common::require_root() {
        return;
    }
    // Run as nobody: no capability at all.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([TRACER, "--duration", "1s"])
        .output()
        .expect("setpriv (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("CAP_PERFMON"),
        "{stderr}"
    );
    assert!(stderr.contains("CAP_NET_RAW"), "{stderr}");
}

/// `tracer check` where tracefs is not mounted and cannot be (no CAP_SYS_ADMIN, in a mount
/// namespace of its own): it says so, and that the tracepoints are not known, rather than
/// listing each as missing from the kernel.
#[test]
fn check_without_tracefs_blames_the_mount_not_the_kernel() {
    if !common::require_root() {
        return;
    }
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; \
         setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin {TRACER} check"
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("tracefs is not mounted"), "{text}");
    assert!(text.contains("tracepoints   not known"), "{text}");
    assert!(!text.contains("MISSING"), "{text}");
}

#[test]
fn check_reports_what_auto_would_attach() {
    if !common::require_root() {
        return;
    }
    let out = Command::new(TRACER)
        .args(["check", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["can_trace"], true);
    let attach = report["would_attach"].as_array().unwrap();
    // As a raw tracepoint where the kernel's BTF describes struct sock (it does here when
    // /sys/kernel/btf/vmlinux exists), else the classic one.
    let set_state = if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        "raw_tracepoint:inet_sock_set_state"
    } else {
        "tracepoint:sock:inet_sock_set_state"
    };
    assert!(attach.iter().any(|p| p == set_state), "{attach:?}");
    // With BTF, a listener's RST is read with the addresses of the segment it answers.
    let listener_resets = report["listener_resets"].as_str().unwrap();
    if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        assert_eq!(listener_resets, "the segment's addresses");
    } else {
        assert!(
            listener_resets.starts_with("the listener's own"),
            "{listener_resets}"
        );
    }
    let out = Command::new(TRACER)
        .args(["check", "--json", "--probes", "tracepoint"])
        .output()
        .unwrap();
    let classic: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        classic["would_attach"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "tracepoint:sock:inet_sock_set_state"),
        "--probes tracepoint keeps the classic tracepoint: {classic}"
    );
    if report["kprobes"] == false {
        assert!(
            !attach
                .iter()
                .any(|p| p.as_str().unwrap().starts_with("kprobe:"))
        );
        let out = Command::new(TRACER)
            .args(["check", "--json", "--probes", "kprobe"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "kprobes asked for, none here");
    }
}

#[test]
fn capabilities_are_dropped_once_ready() {
    if !common::require_root() {
        return;
    }
    let mut tracer = Tracer::start(&["--port", "9", "--duration", "20s"]);
    tracer.wait_ready(WAIT);
    let pid = tracer.pid();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_string()
        };
        assert_eq!(
            field("CapEff:"),
            "0000000000000000",
            "every thread: {status}"
        );
        assert_eq!(field("CapPrm:"), "0000000000000000");
        assert_eq!(field("NoNewPrivs:"), "1");
    }
    let out = tracer.stop();
    assert!(out.status.success(), "still stops cleanly: {}", out.stderr);
}

#[test]
fn sigint_under_load_prints_a_summary_that_matches_the_lines() {
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut tracer = Tracer::start(&["--port", &port.to_string(), "-i", "lo"]);
    tracer.wait_ready(WAIT);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let (s, _) = l.accept().unwrap();
                c.write_all(b"x").unwrap();
                drop(s);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    let (cpu_before, hwm_before) = cpu_and_peak_memory(tracer.pid());
    tracer.signal(libc::SIGINT); // while the churn goes on
    let out = tracer.finish(Duration::from_secs(20));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let summary = out.lines.last().unwrap();
    assert_eq!(summary["event"], "summary");
    // Its own cost, against what /proc said of it just before the signal (clock ticks of
    // 10 ms: the summary's CPU, taken later, can only be as much or more).
    let own = &summary["tracer"];
    let cpu_s = own["cpu_s"].as_f64().unwrap();
    let peak_mib = own["peak_rss_mib"].as_f64().unwrap();
    assert!(
        cpu_s > 0.0 && cpu_s + 0.011 >= cpu_before,
        "{own} vs {cpu_before} s"
    );
    // The kernel's high-water mark is kept from per-CPU approximate counters (a few hundred
    // KiB of slack on this many CPUs), so a later reading may sit a little below an earlier one.
    assert!(peak_mib + 1.0 >= hwm_before, "{own} vs {hwm_before} MiB");
    assert!(peak_mib < 1024.0, "{own}");
    let counts = summary["counts"].as_object().unwrap();
    let mut total = 0;
    for (kind, n) in counts {
        let lines = out
            .lines
            .iter()
            .filter(|v| v["event"] == kind.as_str())
            .count();
        assert_eq!(n.as_u64().unwrap(), lines as u64, "{kind}");
        total += lines;
    }
    assert_eq!(
        total + 1,
        out.lines.len(),
        "every line but the summary is counted"
    );
    assert!(
        counts["close"].as_u64().unwrap() > 10,
        "the churn was traced"
    );
}

/// A process's CPU seconds (user + system, from /proc/PID/stat) and peak resident memory in
/// MiB (VmHWM, from /proc/PID/status).
fn cpu_and_peak_memory(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which may hold spaces: utime and stime are the 14th and
    // 15th of the whole line, the 12th and 13th after the closing parenthesis.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: a plain query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (ticks / hz, hwm_kib / 1024.0)
}

/// `tracer --no-capture --port PORT | head -N`, and the tracer's exit status after it.
fn tracer_into_head(port: u16, lines: usize) -> std::process::Child {
    Command::new("bash")
        .args([
            "-c",
            &format!(
                "{TRACER} --no-capture --port {port} | head -{lines}; \
                 echo \"status=${{PIPESTATUS[0]}}\""
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `meanwhile` until the pipeline has ended (30 s at most); its stdout and stderr.
fn pipeline_output(
    mut child: std::process::Child,
    mut meanwhile: impl FnMut(),
) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the tracer did not end after head exited"
        );
        meanwhile();
    }
    let out = child.wait_with_output().unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (text(&out.stdout), text(&out.stderr))
}

#[test]
fn a_closed_stdout_ends_quietly() {
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // Make lines until head has its three and the tracer notices.
    let (stdout, stderr) = pipeline_output(tracer_into_head(port, 3), || {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = l.accept();
            let _ = c.write_all(b"x");
        }
        std::thread::sleep(Duration::from_millis(20));
    });
    assert!(stderr.is_empty(), "nothing on stderr: {stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with('{')).count(), 3);
    assert!(stdout.contains("status=0"), "the tracer exits 0: {stdout}");
}

/// `tracer | head -1` on a quiet host: head exits after the ready line, and the tracer ends
/// then too, with no further event to write (it waited for the next one, forever on a quiet
/// port).
#[test]
fn a_closed_stdout_ends_the_run_with_nothing_to_write() {
    if !common::require_root() {
        return;
    }
    let child = tracer_into_head(common::free_port(), 1);
    let (stdout, _) = pipeline_output(child, || std::thread::sleep(Duration::from_millis(50)));
    assert!(stdout.contains("\"event\":\"ready\""), "{stdout}");
    assert!(stdout.contains("status=0"), "the tracer exits 0: {stdout}");
}

#[test]
fn output_file_is_0600_appended_and_reopened_on_sighup() {
    if !common::require_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("tracer-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("events.jsonl");
    std::fs::write(&path, "previous line\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path_s = path.to_str().unwrap().to_string();
    let tracer = Tracer::start(&["--no-capture", "--port", "9", "-o", &path_s]);
    // The ready line goes to the file, not stdout: wait for it there.
    wait_file_contains(&path, "\"ready\"");
    let rotated = dir.join("events.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    tracer.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.lines.is_empty(), "nothing on stdout with -o");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        old.starts_with("previous line\n"),
        "appended, not truncated"
    );
    assert!(old.contains("\"ready\""));
    let new = std::fs::read_to_string(&path).expect("reopened after SIGHUP");
    assert!(new.contains("\"summary\""), "{new}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn wait_file_contains(path: &std::path::Path, needle: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle} never appeared in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a tracer whose stdout the test reads (SIGINT), reads the rest of its lines and
/// checks that it ended well, with its summary last.
/// The tracer for `port` (kernel events only, and `extra`), its stdout piped and its ready
/// line read: the test decides when, or whether, it reads on. Its stderr is dropped (a
/// stalled consumer makes it say so, at length).
fn tracer_with_stdout_piped(
    port: u16,
    extra: &[&str],
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    tracer_with_stdout_piped_and(port, extra, Stdio::null())
}

/// `tracer_with_stdout_piped`, its stderr going to `stderr`.
fn tracer_with_stdout_piped_and(
    port: u16,
    extra: &[&str],
    stderr: Stdio,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(TRACER)
        .args(["--no-capture", "--port", &port.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("\"ready\""), "{first}");
    (child, stdout)
}

fn interrupt_and_read_the_rest(
    mut child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
) -> Vec<Value> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.last().unwrap()["event"], "summary");
    lines
}

#[test]
fn a_stalled_consumer_loses_lines_counted_exactly() {
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (child, stdout) = tracer_with_stdout_piped(port, &[]);
    // Nobody reads stdout now: the pipe (64 KiB) and the output queue fill up.
    let made = reset_churn(&l, port, Duration::from_secs(6));
    let rss = rss_kib(child.id());
    assert!(
        rss < 200 * 1024,
        "memory stays bounded while stalled: {rss} KiB"
    );
    let lines = interrupt_and_read_the_rest(child, stdout);
    let summary = lines.last().unwrap();
    let lost: u64 = lines
        .iter()
        .filter(|v| v["event"] == "lost" && v["source"] == "output")
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    assert!(
        lost > 0,
        "{made} connections behind a stalled consumer must overflow the queue"
    );
    assert_eq!(summary["lost"]["output"], lost);
    // The summary counts the lines produced, the lost ones too: the printed ones and the lost
    // ones add up to them (before, the queue's drops were left out of the counts, while a full
    // disk's were in).
    let counted: u64 = summary["counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    // The ready line, read before, is counted; the summary counts not itself.
    let printed = lines.len() as u64;
    assert_eq!(counted, printed + lost, "{summary}");
    // Every connection made at least two lines (the server's close, our rst_received):
    // each was written or counted as lost. (Under load a connection can make a third, so
    // this is a lower bound.)
    let socket_lines = lines.iter().filter(|v| v["conn"].is_string()).count() as u64;
    assert!(
        socket_lines + lost >= 2 * made,
        "nothing lost silently: {socket_lines} written + {lost} lost < {}",
        2 * made
    );
}

/// A consumer that takes nothing (stopped: `tracer | cat` with cat suspended) does not keep
/// the tracer from stopping: after a stop signal it waits a few seconds for the consumer, then
/// says so on stderr with the summary (the unwritten lines counted as lost) and exits 1.
/// Before, SIGTERM and SIGINT were ignored until the consumer read again (`systemctl stop`
/// ending in SIGKILL, the summary lost). A second signal cuts the wait short.
#[test]
fn a_stop_signal_ends_the_run_even_when_nobody_reads_the_output() {
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    for second_signal in [false, true] {
        let (mut child, stdout) = tracer_with_stdout_piped_and(port, &[], Stdio::piped());
        // Nobody reads stdout now: the pipe (64 KiB) and the output queue fill up.
        reset_churn(&l, port, Duration::from_secs(2));
        let stopped_at = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        if second_signal {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: as above.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        }
        // Generous bounds (it takes ~9 s, ~2 s hurried): before, it never stopped.
        let most = Duration::from_secs(if second_signal { 10 } else { 30 });
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if stopped_at.elapsed() > most {
                let _ = child.kill();
                panic!("still running {most:?} after the stop signal (second: {second_signal})");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("output's reader is not reading"),
            "{stderr}"
        );
        let summary: Value = stderr
            .lines()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("the summary on stderr: {stderr}"));
        assert_eq!(summary["event"], "summary");
        assert!(summary["lost"]["output"].as_u64() > Some(0), "{summary}");
        drop(stdout);
    }
}

/// A reader that is only slow (a line every 10 ms) when the stop comes: what it has not taken
/// after the stop's wait is dropped, and counted: the printed lines and `lost.output` add up to
/// the summary's counts (or, when even the summary cannot get through, the stderr summary
/// counts them). Before, the dropped lines were counted after the summary was made: ~80 % of
/// the lines vanished with `lost.output: 0`.
#[test]
fn a_slow_reader_at_the_stop_loses_nothing_silently() {
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (mut child, stdout) = tracer_with_stdout_piped_and(port, &[], Stdio::piped());
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in stdout.lines() {
            lines.push(line.unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
        lines
    });
    reset_churn(&l, port, Duration::from_secs(2));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let mut lines = reader.join().unwrap();
    if !status.success()
        && lines
            .last()
            .is_some_and(|l| serde_json::from_str::<Value>(l).is_err())
    {
        // Given up on: the write it was stuck in may have left part of a line in the pipe.
        lines.pop();
    }
    let lines: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let sum = |summary: &Value| -> u64 {
        summary["counts"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum()
    };
    if status.success() {
        let summary = lines.last().unwrap();
        assert_eq!(summary["event"], "summary", "{stderr}");
        let lost = summary["lost"]["output"].as_u64().unwrap();
        // The ready line, read before, is counted; the summary counts not itself.
        assert_eq!(sum(summary), lines.len() as u64 + lost, "{summary}");
    } else {
        // Even the summary did not get through in time: it is on stderr, and counts as lost
        // every line the reader did not get (the last of them may have reached the pipe).
        let summary: Value = stderr
            .lines()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("{status}: {stderr}"));
        let lost = summary["lost"]["output"].as_u64().unwrap();
        let printed = lines.len() as u64 + 1;
        let counted = sum(&summary);
        // Each line once: only the batch it was stuck writing may be both in the pipe and
        // counted (a batch is at most 256 KiB, ~600 lines).
        assert!(
            printed + lost >= counted && printed + lost - counted < 1000,
            "{summary} after {printed} lines"
        );
    }
}

/// Resets on loopback connections to `l`, one after another, for `how_long`; returns how many.
/// Each makes exactly two lines: the server's close and the client's rst_received.
fn reset_churn(l: &TcpListener, port: u16, how_long: Duration) -> u64 {
    let mut made = 0u64;
    let started = Instant::now();
    while started.elapsed() < how_long {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        c.write_all(b"x").unwrap();
        wait_readable(&s);
        drop(s);
        // Wait for the RST before closing our end, so that every connection makes exactly
        // two lines (the server's close, our rst_received) whatever the softirq timing.
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut c, &mut buf);
        made += 1;
    }
    made
}

#[test]
fn metrics_count_output_loss_while_the_consumer_is_stalled() {
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let addr = free_local_addr();
    let (child, stdout) = tracer_with_stdout_piped(port, &["--metrics", &addr]);
    // Nobody reads stdout: lines are dropped, and no `lost` line can be written yet.
    reset_churn(&l, port, Duration::from_secs(6));
    let output_lost = |text: &str| metric(text, "tracer_lost_events_total", "source=\"output\"");
    let deadline = Instant::now() + WAIT;
    let mut text = scrape(&addr);
    while output_lost(&text) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        text = scrape(&addr);
    }
    let during_stall = output_lost(&text);
    let lines = interrupt_and_read_the_rest(child, stdout);
    let summary = lines.last().unwrap();
    let lost = summary["lost"]["output"].as_u64().unwrap();
    assert!(
        during_stall > 0,
        "the metric counts output loss while the consumer is stalled (the summary says {lost})"
    );
    assert!(during_stall <= lost, "{during_stall} > {lost}");
}

/// A loopback address nothing listens on, for --metrics.
fn free_local_addr() -> String {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().to_string()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_run_ends_when_every_traced_process_has_exited() {
    if !common::require_root() {
        return;
    }
    let mut a = Command::new("sleep").arg("30").spawn().unwrap();
    let mut b = Command::new("sleep").arg("30").spawn().unwrap();
    let mut tracer = Tracer::start(&[
        "--no-capture",
        "--pid",
        &a.id().to_string(),
        "--pid",
        &b.id().to_string(),
    ]);
    tracer.wait_ready(WAIT);
    a.kill().unwrap();
    a.wait().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        tracer.is_running(),
        "one traced process is still alive: the tracer goes on"
    );
    b.kill().unwrap();
    b.wait().unwrap();
    let out = tracer.finish(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_eq!(out.lines.last().unwrap()["event"], "summary");
}

/// A close the kernel programs hold for its RST and never release (a teardown path they do not
/// foresee) is not lost: the daemon takes it out of the kernel's map once it has waited there
/// far longer than tcp_close() takes, writes it, counts it in the summary and names it on
/// stderr. No real socket is known to take that path (that is the point), so the entry is put
/// into the running tracer's map the way its programs write one.
#[test]
fn a_close_left_in_the_kernels_hold_is_taken_out_and_counted() {
    use tracer_common::{EventKind, SockEvent, close_reset, owner_source, syscall, tcp_state};
    if !common::require_root() {
        return;
    }
    let (lport, rport) = (4321u16, 54321u16);
    let mut tracer = Tracer::start(&["--no-capture", "--port", &lport.to_string()]);
    tracer.wait_ready(WAIT);
    let mut held = held_closes_of(tracer.pid());
    let me = std::process::id();
    let mut comm = [0u8; 16];
    comm[..9].copy_from_slice(b"held-test");
    let (mut laddr, mut raddr) = ([0u8; 16], [0u8; 16]);
    laddr[..4].copy_from_slice(&[192, 0, 2, 1]);
    raddr[..4].copy_from_slice(&[192, 0, 2, 2]);
    let held_since = mono_now_ns() - 2_000_000_000;
    let ev = SockEvent {
        ts_ns: held_since,
        conn_id: 0x5eed_0000_0000_0001,
        state_since_ns: held_since - 5_000_000,
        call_id: held_since - 10_000,
        pid: me,
        tid: me,
        comm,
        fd: 9,
        reason: -1,
        laddr,
        raddr,
        lport,
        rport,
        family: tracer_common::AF_INET,
        kind: EventKind::Close as u8,
        old_state: tcp_state::ESTABLISHED,
        new_state: tcp_state::CLOSE,
        syscall: syscall::CLOSE,
        owner_source: owner_source::CURRENT,
        close_reset: close_reset::UNKNOWN,
        rst_ack: 0,
        sk_err: 0,
        _pad: [0; 2],
    };
    let fake_sk = 0xffff_8880_dead_b000u64;
    held.insert(fake_sk, ev, 0)
        .expect("a held close put into HELD_CLOSES");

    let close = tracer.wait_for(|v| common::is(v, "close", lport, rport), WAIT);
    assert_eq!(close["pid"], me);
    assert_eq!(close["comm"], "held-test");
    assert_eq!(close["syscall"], "close");
    assert_eq!(close["fd"], 9);
    assert_eq!(close["laddr"], "192.0.2.1");
    assert_eq!(close["raddr"], "192.0.2.2");
    assert_eq!(close["new_state"], "CLOSE");
    assert_eq!(
        close["outcome"],
        Value::Null,
        "no RST was seen for it and nothing was captured: not known"
    );
    assert!(
        held.get(&fake_sk, 0).is_err(),
        "the daemon took the close out of the map"
    );
    let stopped = tracer.stop();
    let summary = stopped
        .lines
        .iter()
        .find(|v| v["event"] == "summary")
        .expect("a summary line");
    assert_eq!(summary["kernel"]["held_closes_rescued"], 1, "{summary}");
    assert_eq!(
        stopped.lines_of("close", lport, rport).len(),
        1,
        "written once"
    );
    assert!(
        stopped.stderr.contains("1 close(s) held in the kernel"),
        "stderr names it: {}",
        stopped.stderr
    );
}

/// The HELD_CLOSES map of the tracer `pid`, found among the BPF maps its descriptors hold.
fn held_closes_of(
    pid: u32,
) -> aya::maps::HashMap<aya::maps::MapData, u64, tracer_common::SockEvent> {
    let fdinfo = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("the tracer's fdinfo");
    let id = fdinfo
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            let line = info.lines().find(|l| l.starts_with("map_id:"))?;
            line["map_id:".len()..].trim().parse::<u32>().ok()
        })
        .find(|&id| {
            aya::maps::MapInfo::from_id(id).is_ok_and(|m| m.name_as_str() == Some("HELD_CLOSES"))
        })
        .expect("the tracer holds a map named HELD_CLOSES");
    let map = aya::maps::MapData::from_id(id).expect("opening HELD_CLOSES by id");
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).expect("HELD_CLOSES is a hash map")
}

fn mono_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sockets come and go while the tracer attaches its hooks one by one, and their memory is
/// reused at once for new sockets. One whose entry in the kernel's owner table was made by an
/// early hook and that was destroyed before the destruction hook was attached left its entry
/// to the next socket at its address: same `conn` for other connections, and an abortive close
/// on a socket whose predecessor had received a reset came out as a received reset with no
/// owner, its RST as a separate owner-less rst_sent (seen in CI, from other tests' traffic
/// during start-up). A connection seen in part while the hooks attach is fine; one taken for
/// another is not.
#[test]
fn sockets_destroyed_while_the_hooks_attach_leave_nothing_behind() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    // Abortive closes on the server end (a byte left unread), so each connection takes the
    // paths that made entries: the received reset, the held close. Every other connection
    // closes its client end first: its socket is freed last, and a new connection's client and
    // server ends take each other's memory.
    let churn = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let (s, _) = l.accept().unwrap();
                c.write_all(b"x").unwrap();
                wait_readable(&s);
                if n.is_multiple_of(2) {
                    drop(s);
                    drop(c);
                } else {
                    drop(c);
                    drop(s);
                }
                n += 1;
            }
            n
        })
    };
    let mut tracer = Tracer::start(&["-i", "lo", "--port", &port.to_string()]);
    let ready = tracer.wait_ready(WAIT);
    // The connections after start-up reuse the freed sockets' memory.
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let connections = churn.join().unwrap();
    std::thread::sleep(Duration::from_millis(500)); // the last lines are written
    let out = tracer.stop();
    // Every line of the churn's connections, from start-up on: one seen in part (some of its
    // moves came before the hooks) is fine, one taken for another is not.
    let lines: Vec<&Value> = out
        .lines
        .iter()
        .filter(|v| v["lport"] == port || v["rport"] == port)
        .collect();
    let dump = || {
        lines
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut tuples = std::collections::HashMap::new();
    for v in &lines {
        let tuple = (v["lport"].clone(), v["rport"].clone());
        let first = tuples.entry(v["conn"].to_string()).or_insert(tuple.clone());
        assert_eq!(*first, tuple, "one conn, one connection: {v}\n{}", dump());
        let server_end = v["lport"] == port;
        assert!(
            v["event"] != "rst_sent" && !(server_end && v["event"] == "rst_received"),
            "the server end only closes with a reset, and its reset goes with its close: {v}\n{}",
            dump()
        );
    }
    // Connections that began well after start-up are seen whole.
    let after = ready["mono_ns"].as_u64().unwrap() + 100_000_000;
    let server_closes: Vec<&&Value> = lines
        .iter()
        .filter(|v| v["mono_ns"].as_u64().is_some_and(|t| t > after))
        .filter(|v| v["event"] == "close" && v["lport"] == port && v["old_state"] != "LISTEN")
        .collect();
    assert!(
        server_closes.len() > 100,
        "{} server closes of {connections} connections: {}",
        server_closes.len(),
        dump()
    );
    for v in server_closes {
        assert_eq!(v["outcome"], "rst", "{v}\n{}", dump());
        assert_eq!(v["reason"], "TCP_ABORT_ON_CLOSE", "{v}");
        assert_eq!(v["pid"], std::process::id(), "{v}");
    }
}

/// `--format pretty` is a timeline a person reads: its lines are in time order. The joiner
/// releases a line when its packet has come, so a line that waits for nothing (a listener's
/// close) went out before the earlier lines of connections whose FINs were still settling.
#[test]
fn the_pretty_timeline_is_in_time_order() {
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut tracer = Command::new(TRACER)
        .args([
            "--format",
            "pretty",
            "-i",
            "lo",
            "--port",
            &port.to_string(),
        ])
        .args(["--duration", "3s"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(tracer.stdout.take().unwrap());
    // The ready line comes first, one line like every other.
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(
        line.contains("ready") && line.contains("capture=lo"),
        "{line}"
    );
    for _ in 0..3 {
        let (mut c, mut s) = common::tcp_pair_on(&l);
        c.write_all(b"x").unwrap();
        drop(c);
        common::read_to_eof(&mut s);
    }
    drop(l); // its close waits for no packet
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
    assert!(tracer.wait().unwrap().success());
    // Each line of the timeline begins with the time of day (HH:MM:SS.nnnnnnnnn).
    let times: Vec<&str> = text
        .lines()
        .filter(|l| l.as_bytes().get(2) == Some(&b':') && l.as_bytes().get(5) == Some(&b':'))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert!(times.len() >= 12, "{text}");
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in time order:\n{text}"
    );
    assert!(text.contains("LISTEN→CLOSE"), "{text}");
    assert!(
        text.lines().last().is_some_and(|l| l.contains("summary")),
        "the summary ends the timeline, on one line: {text}"
    );
}

/// A small tmpfs mounted on a fresh directory: a disk that fills up. Unmounted (and the
/// directory removed) when dropped, a failed test included.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(name: &str, kib: u32) -> Self {
        let dir = std::env::temp_dir().join(format!("tracer-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = Self { dir };
        let size = format!("size={kib}k");
        common::sh(
            "mount",
            &["-t", "tmpfs", "-o", &size, "tracer-test", disk.path()],
        );
        disk
    }

    fn path(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// Frees space without touching the files on it: a larger size.
    fn grow(&self, kib: u32) {
        let size = format!("remount,size={kib}k");
        common::sh("mount", &["-o", &size, self.path()]);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The tracer on a new listener's port, writing its lines to `out` (`-o`) and its stderr to
/// a file of its own (read while it runs), once ready.
struct WritingToFile {
    listener: TcpListener,
    port: u16,
    child: std::process::Child,
    stderr: std::path::PathBuf,
}

impl WritingToFile {
    fn start(out: &std::path::Path, name: &str) -> Self {
        let stderr = std::env::temp_dir().join(format!("tracer-{name}-{}.err", std::process::id()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let child = Command::new(TRACER)
            .args(["--no-capture", "--port", &port.to_string(), "-o"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        wait_file_contains(out, "\"ready\"");
        Self {
            listener,
            port,
            child,
            stderr,
        }
    }
}

fn stderr_lines_with(stderr: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(stderr)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Stops the tracer with SIGINT and returns its exit status (killed past 30 s).
fn interrupt(mut child: std::process::Child) -> std::process::ExitStatus {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("the tracer did not stop within 30 s of SIGINT");
}

#[test]
fn a_full_disk_drops_lines_counted_says_so_and_writing_resumes_when_space_is_freed() {
    if !common::require_root() {
        return;
    }
    let disk = SmallDisk::mount("diskfull", 256);
    let out = disk.dir.join("out.jsonl");
    let WritingToFile {
        listener: l,
        port,
        child,
        stderr,
    } = WritingToFile::start(&out, "diskfull");
    // Fill the disk: about 650 lines fit in 256 KiB.
    let full = "No space left on device";
    let deadline = Instant::now() + Duration::from_secs(120);
    while stderr_lines_with(&stderr, full) == 0 {
        assert!(Instant::now() < deadline, "the disk never filled up");
        reset_churn(&l, port, Duration::from_millis(200));
    }
    // More lines while it is full: dropped, not one message each.
    reset_churn(&l, port, Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500));
    let said = std::fs::read_to_string(&stderr).unwrap();
    let first = said.lines().find(|l| l.contains(full)).unwrap();
    assert!(
        first.contains(out.to_str().unwrap()) && first.contains("counted as lost"),
        "what happened and what follows, on one line: {said}"
    );
    // Free space (a larger file system: truncating the file would also take the lines written
    // in a moment of room before, a `lost` line among them, from the count below).
    disk.grow(16 * 1024);
    common::reset_burst(&l, port, 20);
    wait_file_contains(&stderr, "works again");
    wait_file_contains(&out, "\"lost\"");
    let status = interrupt(child);
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert!(status.success(), "{status}: {said}");
    let failures = stderr_lines_with(&stderr, full);
    let recoveries = stderr_lines_with(&stderr, "works again");
    // Once per failure episode (a nearly full disk may take a small batch between two).
    assert!(
        failures >= 1 && failures <= recoveries && failures < 20,
        "{said}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.ends_with('\n'), "the last line is whole");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("a whole line: {l:?}")))
        .collect();
    let summary = lines.last().unwrap();
    assert_eq!(summary["event"], "summary", "{text}");
    let lost: u64 = lines
        .iter()
        .filter(|v| v["event"] == "lost" && v["source"] == "output")
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    assert!(lost > 0, "{said}");
    assert_eq!(summary["lost"]["output"], lost, "{said}");
    assert!(
        lines.iter().any(|v| v["event"] == "rst_received"),
        "lines flow again once there is space"
    );
    let _ = std::fs::remove_file(&stderr);
}

#[test]
fn a_failed_reopen_on_sighup_keeps_writing_to_the_open_file() {
    if !common::require_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("tracer-rotperm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Root without capabilities (the tracer once ready) cannot create files here.
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("events.jsonl");
    let WritingToFile {
        listener: l,
        port,
        child,
        stderr,
    } = WritingToFile::start(&path, "rotperm");
    let rotated = dir.join("events.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    // The reopen happens before the next write: make lines.
    common::reset_burst(&l, port, 3);
    wait_file_contains(&stderr, "reopening");
    wait_file_contains(&rotated, "\"rst_received\"");
    let status = interrupt(child);
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert!(status.success(), "{status}: {said}");
    let line = said.lines().find(|l| l.contains("reopening")).unwrap();
    assert!(
        line.contains("Permission denied") && line.contains("SIGHUP again"),
        "{said}"
    );
    assert!(!path.exists(), "nothing could be created there");
    let text = std::fs::read_to_string(&rotated).unwrap();
    assert!(text.contains("\"summary\""), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(&stderr);
}
