//! The command line (see CONTRACT.md), parsed into low-level arguments and then checked and
//! turned into one `Settings` that the rest of the program reads.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, Subcommand};

use crate::{
    lines::{Format, FormatArg},
    output::Destination,
    probes::ProbeMode,
};

#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    about = "Explains how TCP connections end: every close(), shutdown(), FIN and RST, joined \
             with the packet that went on the wire. JSON lines on stdout.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report what this kernel and these privileges support, and which probes `tracer` would
    /// attach; exit 0 when tracing can work, 1 when it cannot.
    Check {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Report for this probe choice.
        #[arg(long, value_enum, default_value = "auto")]
        probes: ProbeMode,
    },
    /// Run the classic teardown scenarios (graceful close, unread data, SO_LINGER 0,
    /// half-close, a peer that never closes, one that closes after the FIN_WAIT2 timeout) on
    /// loopback and show what the tracer saw.
    Demo {
        /// One JSON object per scenario instead of the timeline.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// Only sockets owned by these processes (all their threads) and by the children they
    /// fork (a pre-forked server's workers, a forking proxy's children: what a child was
    /// handed and what it opens itself; running children are found at start-up); repeatable.
    /// The run ends when all of them have exited and their connections finished closing.
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only connections whose local or remote port is PORT; repeatable.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Capture interface for wire packets (`any`: every interface of this network namespace,
    /// and with --pid the loopback of each traced process in another one, a container's).
    #[arg(
        short,
        long,
        value_name = "NAME",
        default_value = "any",
        conflicts_with = "no_capture"
    )]
    pub interface: String,
    /// Kernel events only, no packet capture.
    #[arg(long)]
    pub no_capture: bool,
    /// How long a kernel event waits for its wire packet (500ms, 2s): how far apart in time
    /// the two may be (each also waits at least 100 ms for the other to be delivered).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "500ms",
        value_parser = parse_duration,
        allow_hyphen_values = true
    )]
    pub join_window: Duration,
    /// Stop after this long, flush, print the summary.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Option<Duration>,
    /// Append JSON lines to PATH instead of stdout (created 0600; reopened on SIGHUP).
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Which kernel hooks to use.
    #[arg(long, value_enum, default_value = "auto")]
    pub probes: ProbeMode,
    /// Also emit handshake transitions (SYN_SENT, SYN_RECV, ESTABLISHED).
    #[arg(long)]
    pub all_states: bool,
    /// Serve Prometheus metrics on ADDR (for example 127.0.0.1:9464) at /metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Also write the captured FIN/RST packets (headers only) to FILE.pcapng, each with a
    /// comment naming the process and the event it joined.
    #[arg(short = 'w', long = "write", value_name = "FILE.pcapng")]
    pub pcapng: Option<PathBuf>,
    /// Output encoding: JSON lines (the contract), or a human timeline (coloured on a terminal;
    /// NO_COLOR turns colour off).
    #[arg(long, value_enum, default_value = "json")]
    pub format: FormatArg,
    /// Benchmark floor: attach every hook with programs that return at once.
    #[arg(long, hide = true)]
    pub bench_noop: bool,
    /// Benchmark accounting: at the end, write each program's runs and run time (counted by
    /// the kernel while kernel.bpf_stats_enabled is 1) to this file as JSON.
    #[arg(long, hide = true, value_name = "FILE")]
    pub bench_program_stats: Option<PathBuf>,
    /// Tests: the owner table's entries (a power of two) instead of the host's fit, so that a
    /// test fills it with a few hundred connections.
    #[arg(long, hide = true, value_name = "N")]
    pub test_owner_table_entries: Option<u32>,
    /// Ring buffer size in KiB (a power of two, at least 4). Bigger absorbs longer bursts.
    #[arg(long, value_name = "KIB", default_value_t = 4096, value_parser = parse_ringbuf_kib)]
    pub ringbuf_kib: u32,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.starts_with('-') {
        return Err(format!(
            "duration {text:?} is negative; write a positive one like 500ms, 2s or 1m"
        ));
    }
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("malformed duration {text:?} ({e}); write it like 500ms, 2s or 1m"))?;
    if duration.is_zero() {
        return Err(format!("duration {text:?} must be longer than zero"));
    }
    Ok(duration)
}

fn parse_ringbuf_kib(text: &str) -> Result<u32, String> {
    let kib: u32 = text
        .parse()
        .map_err(|_| format!("--ringbuf-kib {text:?} is not a number of KiB"))?;
    if kib < 4 || !kib.is_power_of_two() || kib > 1 << 20 {
        return Err(format!(
            "--ringbuf-kib {kib}: use a power of two between 4 and 1048576"
        ));
    }
    Ok(kib)
}

/// Bad input from the user: exit status 2, with a message that says what to do.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Everything a trace run needs, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    /// None with --no-capture.
    pub capture_iface: Option<String>,
    pub join_window: Duration,
    pub duration: Option<Duration>,
    pub destination: Destination,
    pub probes: ProbeMode,
    pub all_states: bool,
    pub ringbuf_bytes: u32,
    pub owner_table_entries: Option<u32>,
    pub format: Format,
    pub metrics: Option<std::net::SocketAddr>,
    pub noop: bool,
    pub program_stats: Option<PathBuf>,
    pub pcapng: Option<PathBuf>,
}

impl TraceArgs {
    /// Checks what can be checked before touching the kernel.
    pub fn into_settings(self) -> Result<Settings, BadInput> {
        let mut pids = self.pids;
        pids.sort_unstable();
        pids.dedup();
        if let Some(pid) = pids.iter().find(|&&pid| !process_exists(pid)) {
            let why = if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                format!("process {pid} has exited (a zombie its parent has not reaped)")
            } else {
                format!("no process with PID {pid}")
            };
            return Err(BadInput(format!(
                "{why}: give the PID of a running process (ps -p {pid} -o pid,stat,comm)"
            )));
        }
        if let Some((tid, process)) = pids
            .iter()
            .find_map(|&pid| process_of_thread(pid).map(|process| (pid, process)))
        {
            // Its sockets are its process's: traced by that PID, never by the thread's.
            return Err(BadInput(format!(
                "--pid {tid} is a thread of process {process}, not a process: give --pid \
                 {process} (it traces every thread of the process)"
            )));
        }
        if let Some(pid) = pids.iter().find(|&&pid| is_kernel_thread(pid)) {
            // A run that could never print a line, and would never end by itself.
            return Err(BadInput(format!(
                "--pid {pid} is a kernel thread: it owns no sockets, nor do the kernel threads it \
                 starts; give the PID of the process whose connections you want"
            )));
        }
        if self.pcapng.is_some() && self.no_capture {
            return Err(BadInput(
                "-w writes captured packets: it cannot be used with --no-capture".into(),
            ));
        }
        let format = match self.format {
            FormatArg::Json => Format::Json,
            FormatArg::Pretty => Format::Pretty {
                color: self.output.is_none() && stdout_is_terminal(),
            },
        };
        let mut ports = self.ports;
        ports.sort_unstable();
        ports.dedup();
        if ports.contains(&0) {
            return Err(BadInput(
                "--port 0 matches nothing: give a port between 1 and 65535".into(),
            ));
        }
        Ok(Settings {
            pids,
            ports,
            capture_iface: (!self.no_capture).then_some(self.interface),
            join_window: self.join_window,
            duration: self.duration,
            destination: self.output.map_or(Destination::Stdout, Destination::File),
            probes: self.probes,
            all_states: self.all_states,
            ringbuf_bytes: self.ringbuf_kib * 1024,
            owner_table_entries: self
                .test_owner_table_entries
                .map(|n| n.max(1).next_power_of_two()),
            format,
            metrics: self.metrics,
            noop: self.bench_noop,
            program_stats: self.bench_program_stats,
            pcapng: self.pcapng,
        })
    }
}

fn stdout_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

/// The process (thread group) that `tid` belongs to, when `tid` is one of its threads and not
/// the process itself: /proc/TID exists for every thread (unlisted), as `top -H` and `ps -L`
/// show their ids.
fn process_of_thread(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let tgid = status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse::<u32>()
        .ok()?;
    (tgid != tid).then_some(tgid)
}

/// Whether `pid` is a kernel thread (PF_KTHREAD in /proc/PID/stat's flags).
pub fn is_kernel_thread(pid: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    // After the comm: state (field 3), ppid, pgrp, session, tty_nr, tpgid, flags (9).
    stat_after_comm(pid)
        .and_then(|rest| rest.split_whitespace().nth(6)?.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// /proc/PID/stat from its state on (field 3): what follows the parenthesised comm, which may
/// itself contain ") ".
fn stat_after_comm(pid: u32) -> Option<String> {
    stat_after_comm_at(Path::new(&format!("/proc/{pid}/stat")))
}

fn stat_after_comm_at(path: &Path) -> Option<String> {
    let stat = std::fs::read_to_string(path).ok()?;
    stat.rsplit_once(") ").map(|(_, rest)| rest.to_string())
}

/// When process `pid` started (/proc/PID/stat's 22nd field, clock ticks since boot): with
/// the pid, what names one process (the kernel gives an exited process's pid to another).
pub fn process_start_time(pid: u32) -> Option<u64> {
    // The fields after the command name begin with the 3rd; the start time is the 22nd.
    stat_after_comm(pid)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether process `pid` still runs: one of its threads is neither a zombie nor dead. Its
/// main thread may be a zombie while others run: it called pthread_exit, or it finished an
/// exit_group first while the last thread still closes the process's files.
pub fn process_exists(pid: u32) -> bool {
    if task_runs(Path::new(&format!("/proc/{pid}/stat"))) {
        return true; // the main thread: the usual answer, from one file
    }
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks
            .flatten()
            .any(|task| task_runs(&task.path().join("stat")))
    })
}

/// Whether the task whose stat file is at `path` is neither a zombie nor dead.
fn task_runs(path: &Path) -> bool {
    stat_after_comm_at(path)
        .and_then(|rest| rest.chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tracer").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_the_contract() {
        let cli = parse(&[]).unwrap();
        let settings = cli.trace.into_settings().unwrap();
        assert_eq!(settings.capture_iface.as_deref(), Some("any"));
        assert_eq!(settings.join_window, Duration::from_millis(500));
        assert!(settings.duration.is_none());
        assert_eq!(settings.probes, ProbeMode::Auto);
        assert!(!settings.all_states);
        assert!(matches!(settings.destination, Destination::Stdout));
    }

    /// Inputs that clap would misread or that make no sense together get one line that says
    /// what to write instead.
    #[test]
    fn a_negative_duration_and_an_interface_without_capture_are_refused() {
        let negative = parse(&["--join-window", "-1s"]).unwrap_err().to_string();
        assert!(negative.contains("is negative"), "{negative}");
        let without_capture = parse(&["--no-capture", "-i", "lo"])
            .unwrap_err()
            .to_string();
        assert!(
            without_capture.contains("cannot be used with"),
            "{without_capture}"
        );
        assert!(
            parse(&["--no-capture"]).is_ok(),
            "the default interface does not conflict"
        );
    }

    #[test]
    fn repeatable_filters_and_durations() {
        let me = std::process::id().to_string();
        let cli = parse(&[
            "-p",
            &me,
            "--pid",
            &me,
            "--port",
            "80",
            "--port",
            "443",
            "--join-window",
            "2s",
            "--duration",
            "1m",
            "--no-capture",
            "--probes",
            "tracepoint",
        ])
        .unwrap();
        let settings = cli.trace.into_settings().unwrap();
        assert_eq!(settings.pids, vec![std::process::id()]);
        assert_eq!(settings.ports, vec![80, 443]);
        assert_eq!(settings.join_window, Duration::from_secs(2));
        assert_eq!(settings.duration, Some(Duration::from_secs(60)));
        assert!(settings.capture_iface.is_none());
        assert_eq!(settings.probes, ProbeMode::Tracepoint);
    }

    #[test]
    fn malformed_duration_is_a_usage_error() {
        let err = parse(&["--duration", "5 parsecs"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("malformed duration"), "{err}");
    }

    #[test]
    fn unknown_pid_is_bad_input() {
        let err = parse(&["--pid", "999999999"])
            .unwrap()
            .trace
            .into_settings()
            .unwrap_err();
        assert!(err.0.contains("no process with PID 999999999"), "{err}");
    }

    #[test]
    fn a_thread_is_bad_input_naming_its_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: plain syscall.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let err = parse(&["--pid", &tid.to_string()])
            .unwrap()
            .trace
            .into_settings()
            .unwrap_err();
        drop(done_tx);
        thread.join().unwrap();
        let me = std::process::id();
        assert!(
            err.0
                .contains(&format!("--pid {tid} is a thread of process {me}")),
            "{err}"
        );
        assert!(err.0.contains(&format!("give --pid {me}")), "{err}");
    }

    #[test]
    fn a_kernel_thread_is_bad_input() {
        if !std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            return; // not the host's pids (a container)
        }
        let err = parse(&["--pid", "2"])
            .unwrap()
            .trace
            .into_settings()
            .unwrap_err();
        assert!(err.0.contains("--pid 2 is a kernel thread"), "{err}");
    }

    #[test]
    fn kernel_threads_are_told_from_processes() {
        // kthreadd is pid 2 where the tests see the host's pids (not inside a container).
        if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            assert!(is_kernel_thread(2), "kthreadd");
        }
        assert!(!is_kernel_thread(std::process::id()));
        assert!(!is_kernel_thread(999_999_999));
    }

    #[test]
    fn check_subcommand() {
        let cli = parse(&["check", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Check { json: true, .. })
        ));
    }

    #[test]
    fn ringbuf_size_must_be_a_power_of_two() {
        assert!(parse(&["--ringbuf-kib", "100"]).is_err());
        assert_eq!(
            parse(&["--ringbuf-kib", "64"]).unwrap().trace.ringbuf_kib,
            64
        );
    }
}
