//! `cargo xtask`: the project's single entry point for bootstrapping, building, running and
//! testing. Every task bootstraps first, so a fresh machine needs nothing installed by hand.

mod bench;
mod bootstrap;
mod cmd;
mod run;
mod soak;
mod test;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Bootstrap, build, run and test tracer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, rust-src, bpf-linker).
    Bootstrap {
        /// Also the tools the tests use (tcpdump, bpftrace, libbpf-tools, iproute2, tshark,
        /// python3, nftables, ethtool): `test`, `bench` and `soak` install them; `build` and
        /// `run` need only the rest.
        #[arg(long)]
        test_tools: bool,
    },
    /// Bootstrap, then build the tracer.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Bootstrap, build in release and run the tracer as root: `cargo xtask run -- --pid 1234`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the tracer against no tracing, the floor and tcpstates+tcpdump (as root).
    Bench {
        /// Rounds per setup; medians are reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds of load per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Load: fin, rst or mix.
        #[arg(long, default_value = "rst")]
        mode: String,
        /// Load threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// One-byte requests answered on each connection before it closes: 0 is pure churn
        /// (the targets' load); a few hundred is a keep-alive service, where the per-I/O and
        /// per-packet hooks dominate.
        #[arg(long, default_value_t = 0)]
        requests: u32,
        /// One round of one second: proves the benchmark works (the test suite runs it).
        #[arg(long)]
        quick: bool,
    },
    /// Moderate churn under the tracer for a long time: RSS must stay flat, nothing lost.
    Soak {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Connections per second.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
    },
    /// The teardown scenarios on Debian 12's 6.1 kernel under qemu (with and without kprobes)
    /// and on the host, compared line by line (as root; downloads the kernel once).
    VmTest,
    /// Bootstrap, then the whole suite: fmt, clippy, unit and root-only integration tests,
    /// the quick benchmark and the short soak; ends with `N passed, M failed`.
    Test {
        /// Extra arguments for `cargo test` (a test name filter, for example); with any, the
        /// quick benchmark and the short soak are skipped.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    cmd::extend_path();
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Bootstrap { test_tools } => bootstrap::run(test_tools).map(|_| ExitCode::SUCCESS),
        Task::Build { release } => bootstrap::run(false)
            .and_then(|_| cmd::cargo_build(release))
            .map(|_| ExitCode::SUCCESS),
        Task::Run { args } => run::run(&args),
        Task::Test { args } => test::run(&args),
        Task::VmTest => vm::run_task(),
        Task::Soak { seconds, rate } => bootstrap::run(true)
            .and_then(|_| soak::run(&soak::Options { seconds, rate }))
            .and_then(|r| {
                println!("{r:?}");
                soak::check(&r).map_err(|e| anyhow::anyhow!("soak failed: {e}"))
            })
            .map(|_| ExitCode::SUCCESS),
        Task::Bench {
            rounds,
            seconds,
            mode,
            threads,
            requests,
            quick,
        } => bench::run(&bench::Options {
            rounds: if quick { 1 } else { rounds },
            seconds: if quick { 1 } else { seconds },
            mode,
            threads,
            requests,
            quick,
        })
        .map(|_| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("xtask: {e:#}");
        ExitCode::FAILURE
    })
}
