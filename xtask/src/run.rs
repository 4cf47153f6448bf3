//! `cargo xtask run -- ARGS`: bootstrap, build in release, run the tracer with root privileges.

use std::process::{Command, ExitCode};

use anyhow::Context as _;

use crate::{bootstrap, cmd};

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
    let status = command
        .status()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}
