//! Connection churn over loopback for the benchmark: each worker thread connects to a local
//! listener, the acceptor reads nothing, the client writes one byte, and the connection is
//! closed the way the mode says. With `--requests N`, each connection first carries N one-byte
//! requests and answers (a keep-alive service: what the tracer's per-I/O hook costs). Prints
//! one JSON object with the counts when done.

use std::{
    io::Write,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// Graceful: the client closes after the server has read its byte; FINs both ways.
    Fin,
    /// The server closes with the client's byte unread: RST with TCP_ABORT_ON_CLOSE.
    Rst,
    /// Alternate fin and rst.
    Mix,
}

#[derive(Debug, Parser)]
#[command(about = "Loopback connection churn for benchmarking the tracer")]
struct Args {
    #[arg(long, value_enum, default_value = "rst")]
    mode: Mode,
    /// Client threads (each with its own acceptor thread).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Connections per second in all (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// One-byte requests answered on each connection before it closes (0: none, pure churn).
    #[arg(long, default_value_t = 0)]
    requests: u32,
    /// Listen address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// No churn: be a quiet service until killed, with a listener and one idle established
    /// connection (the benchmark's "other process" for `--pid`: the tracer finds both in /proc
    /// when it starts, as it would a real service's).
    #[arg(long)]
    quiet_service: bool,
}

#[derive(Serialize)]
struct Report {
    mode: Mode,
    threads: usize,
    requests_per_connection: u32,
    secs: f64,
    connections: u64,
    rst_closes: u64,
    fin_closes: u64,
    errors: u64,
    rate: f64,
    /// The load's own CPU time (user + system, which on loopback includes the softirq work
    /// done in its threads) per connection, in microseconds: what hooks add to each
    /// connection, less sensitive than the rate to other tenants of a shared machine.
    cpu_us_per_conn: f64,
    pid: u32,
    port: u16,
}

fn be_a_quiet_service(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).context("binding the listener")?;
    let _client = TcpStream::connect(listener.local_addr()?).context("connecting to itself")?;
    let _accepted = listener.accept().context("accepting")?;
    println!("{{\"quiet_service\":{}}}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    loop {
        thread::park();
    }
}

/// User plus system CPU seconds of this process so far.
fn own_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    rst: AtomicU64,
    fin: AtomicU64,
    errors: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.quiet_service {
        return be_a_quiet_service(args.listen);
    }
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let mut port = 0;
    for index in 0..args.threads {
        let listener = TcpListener::bind(args.listen).context("binding the listener")?;
        let addr = listener.local_addr()?;
        port = addr.port();
        let (counts, stop) = (counts.clone(), stop.clone());
        let plan = Plan {
            mode: args.mode,
            requests: args.requests,
            rate: args.rate.div_ceil(args.threads as u64),
        };
        workers.push(thread::spawn(move || {
            churn(index, plan, listener, addr, &counts, &stop)
        }));
    }
    let started = Instant::now();
    thread::sleep(args.duration);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let secs = started.elapsed().as_secs_f64();
    let connections = counts.connections.load(Ordering::Relaxed);
    let report = Report {
        mode: args.mode,
        threads: args.threads,
        requests_per_connection: args.requests,
        secs,
        connections,
        rst_closes: counts.rst.load(Ordering::Relaxed),
        fin_closes: counts.fin.load(Ordering::Relaxed),
        errors: counts.errors.load(Ordering::Relaxed),
        rate: connections as f64 / secs,
        cpu_us_per_conn: own_cpu_secs() * 1e6 / connections.max(1) as f64,
        pid: std::process::id(),
        port,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// What each worker's connections do.
#[derive(Clone, Copy)]
struct Plan {
    mode: Mode,
    /// Requests answered on each connection before it closes.
    requests: u32,
    /// This worker's connections per second (0: as fast as possible).
    rate: u64,
}

/// One worker: connect, accept, (exchange requests,) write a byte, close; until told to stop.
fn churn(
    index: usize,
    plan: Plan,
    listener: TcpListener,
    addr: SocketAddr,
    counts: &Counts,
    stop: &AtomicBool,
) {
    let mut n: u64 = index as u64;
    let started = Instant::now();
    let mut made: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        if plan.rate > 0 {
            // Pace to `rate` per second: sleep until this connection's slot.
            let due = Duration::from_secs_f64(made as f64 / plan.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                thread::sleep(wait);
            }
            made += 1;
        }
        let rst = match plan.mode {
            Mode::Fin => false,
            Mode::Rst => true,
            Mode::Mix => n.is_multiple_of(2),
        };
        n += 1;
        match one_connection(&listener, addr, plan.requests, rst) {
            Ok(()) => {
                counts.connections.fetch_add(1, Ordering::Relaxed);
                if rst {
                    counts.rst.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.fin.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn one_connection(
    listener: &TcpListener,
    addr: SocketAddr,
    requests: u32,
    rst: bool,
) -> std::io::Result<()> {
    let mut client = TcpStream::connect(addr)?;
    let (server, _) = listener.accept()?;
    for _ in 0..requests {
        exchange(&client, &server)?;
    }
    client.write_all(b"x")?;
    if rst {
        // The byte is unread: close() answers with a RST (TCP_ABORT_ON_CLOSE), and no
        // TIME_WAIT is left behind, so the rate is not bounded by ephemeral ports.
        wait_readable(&server);
        drop(server);
        drop(client);
    } else {
        let mut byte = [0u8; 1];
        std::io::Read::read_exact(&mut &server, &mut byte)?;
        client.shutdown(Shutdown::Write)?;
        drop(client);
        drop(server);
    }
    Ok(())
}

/// One request and its answer, a byte each way (two sends and two receives).
fn exchange(client: &TcpStream, server: &TcpStream) -> std::io::Result<()> {
    use std::io::Read;
    let mut byte = [0u8; 1];
    (&*client).write_all(b"q")?;
    (&*server).read_exact(&mut byte)?;
    (&*server).write_all(b"a")?;
    (&*client).read_exact(&mut byte)
}

/// Waits until the byte has arrived, so that the close really has unread data.
fn wait_readable(stream: &TcpStream) {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 1000) };
}
