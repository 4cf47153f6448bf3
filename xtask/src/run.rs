//! `cargo xtask run -- ARGS`: bootstrap, build in release, run the tracer with root privileges
//! (directly as root, through sudo otherwise) and exit with its exit code.

use std::{
    process::{Command, ExitCode},
    sync::atomic::{AtomicI32, Ordering},
};

use anyhow::Context as _;

use crate::{bootstrap, cmd};

/// The running tracer (or sudo), for the signal handler; 0 while there is none.
static CHILD: AtomicI32 = AtomicI32::new(0);

pub fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    bootstrap::run(false)?;
    cmd::cargo_build(true)?;
    let binary = cmd::root().join("target/release/tracer");
    let mut command = if cmd::is_root() {
        Command::new(&binary)
    } else {
        eprintln!(
            "xtask: the tracer loads BPF programs and captures packets, which needs root \
             (CAP_BPF, CAP_PERFMON, CAP_NET_RAW): running it through sudo"
        );
        let mut c = Command::new("sudo");
        c.arg(&binary);
        c
    };
    command.args(args);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    forward_signals();
    // The tracer prints its summary after SIGINT: wait for it, whatever arrives meanwhile.
    let status = child.wait()?;
    CHILD.store(0, Ordering::SeqCst);
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

/// While the tracer runs, SIGINT, SIGTERM and SIGHUP sent to xtask go to the tracer instead of
/// ending xtask before it: Ctrl-C reaches the tracer from the terminal anyway (a second SIGINT
/// is harmless to it), a `kill` aimed at xtask does not, and SIGHUP reopens its `-o` file.
fn forward_signals() {
    extern "C" fn forward(sig: libc::c_int) {
        let pid = CHILD.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill is async-signal-safe. pid is our child's; only in the instant
            // between its reaping and the reset of CHILD could it name another process.
            unsafe { libc::kill(pid, sig) };
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls async-signal-safe functions. A handler
        // (unlike SIG_IGN) is reset at exec, so later children get the default disposition.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
}
