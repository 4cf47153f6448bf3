//! tracer: explains how TCP connections end. Parse, build the settings, run, map errors to the
//! contract's exit codes (0 normal stop, 1 runtime failure, 2 bad usage or input).

mod btf;
mod capture;
mod check;
mod cli;
mod clock;
mod conns;
mod demo;
mod held;
mod join;
mod jsonw;
mod kernel;
mod lines;
mod metrics;
mod output;
mod owners;
mod pcapng;
mod pipeline;
mod privileges;
mod probes;
mod progstats;
mod run;
mod sockets;
mod stats;
mod timeline;
mod tracefs;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{BadInput, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse(); // clap exits 2 on bad usage, with its own message
    let result = match cli.command {
        Some(Command::Check { json, probes }) => check::run(json, probes),
        Some(Command::Demo { json }) => demo::run(json),
        None => cli
            .trace
            .into_settings()
            .map_err(anyhow::Error::from)
            .and_then(run::trace)
            .map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|err| {
        eprintln!("tracer: {}", one_line(&err));
        if err.downcast_ref::<BadInput>().is_some() {
            ExitCode::from(2)
        } else {
            ExitCode::from(1)
        }
    })
}

/// An error and its causes on one line, outermost first.
fn one_line(err: &anyhow::Error) -> String {
    err.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
