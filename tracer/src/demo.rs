//! `tracer demo`: runs the classic teardown scenarios on loopback against a tracer it starts
//! itself, and shows for each what the tracer saw and what it means. The first thing to run.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::lines::{human_ns, is_fin_wait2_timeout};

/// One scenario: what it does, and how to tell the tracer saw it right.
struct Scenario {
    name: &'static str,
    run: fn(&TcpListener) -> anyhow::Result<Ports>,
    check: fn(&[Value], Ports) -> Result<(), String>,
    meaning: &'static str,
}

/// The ports of the two sockets of a scenario's connection.
#[derive(Clone, Copy, Debug)]
struct Ports {
    /// The side that closes first.
    closer: u16,
    other: u16,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "graceful close",
        run: graceful,
        check: check_graceful,
        meaning: "close() sent a FIN; the peer read EOF and closed too: FIN both ways, and the \
                  closer's socket went FIN_WAIT1 → FIN_WAIT2 → TIME_WAIT.",
    },
    Scenario {
        name: "close with unread data",
        run: unread,
        check: check_unread,
        meaning: "close() with bytes still unread in the receive queue: the kernel answers with \
                  a RST (TCP_ABORT_ON_CLOSE) instead of a FIN, and the peer gets ECONNRESET.",
    },
    Scenario {
        name: "SO_LINGER 0",
        run: linger0,
        check: check_linger0,
        meaning: "SO_LINGER {on, 0} makes close() abort the connection: a RST at once, no \
                  FIN_WAIT, no TIME_WAIT (the kernel's reason is TCP_STATE).",
    },
    Scenario {
        name: "shutdown(SHUT_WR) half-close",
        run: half_close,
        check: check_half_close,
        meaning: "shutdown(SHUT_WR) sends a FIN but keeps the socket open for reading: the peer \
                  can still send, and close() comes later.",
    },
    Scenario {
        name: "peer never closes (CLOSE_WAIT / FIN_WAIT2)",
        run: lingering_peer,
        check: check_lingering_peer,
        meaning: "one side closed, the other did not call close() for a long time: its socket \
                  sat in CLOSE_WAIT (a leak, if it lasts), while the closer waited in FIN_WAIT2.",
    },
    Scenario {
        name: "the peer closes too late (FIN_WAIT2 timeout)",
        run: late_peer,
        check: check_late_peer,
        meaning: "the closer's FIN_WAIT2 ran out (TCP_LINGER2 of 1 s here; tcp_fin_timeout, 60 s, \
                  by default) while the peer sat in CLOSE_WAIT: the kernel dropped the closer's \
                  socket, and when the peer finally closed, its FIN found no socket: the host \
                  answered with a RST, the peer's \"connection reset by peer\".",
    },
];

/// How long the late peer waits: past the closer's FIN_WAIT2 timeout of 1 s (TCP_LINGER2).
const LATE: Duration = Duration::from_millis(1600);

/// How long each scenario leaves the peer in CLOSE_WAIT.
const LINGER: Duration = Duration::from_millis(600);
const WINDOW: &str = "300ms";

pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let (mut results, mut lines) = run_scenarios()?;
    let lost = lost_events(&lines);
    if lost > 0 && !all_explained(&results, &lines) {
        // A busy machine: the kernel skips a program run that would nest in another on the
        // same CPU (a softirq interrupting it), and the tracer reports the event lost. The
        // scenarios are not at fault: once more.
        eprintln!(
            "tracer demo: the tracer lost {lost} event(s) on this busy machine (reported in its \
             summary); running the scenarios again"
        );
        (results, lines) = run_scenarios()?;
    }
    let mut all_ok = true;
    for (scenario, ports) in results {
        let mine = lines_of(&lines, ports);
        let verdict = (scenario.check)(&mine, ports);
        all_ok &= verdict.is_ok();
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "scenario": scenario.name,
                    "ok": verdict.is_ok(),
                    "problem": verdict.as_ref().err(),
                    "meaning": scenario.meaning,
                    "lines": mine,
                })
            );
        } else {
            print_scenario(scenario, &mine, &verdict);
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Each scenario run, with its connection's ports.
type Runs = Vec<(&'static Scenario, Ports)>;

/// Runs every scenario under one tracer: each scenario with its connection's ports, and every
/// line the tracer printed.
fn run_scenarios() -> anyhow::Result<(Runs, Vec<Value>)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let port = listener.local_addr()?.port();
    let mut tracer = Tracer::start(port)?;
    let mut results = Vec::new();
    for scenario in SCENARIOS {
        let ports = (scenario.run)(&listener).with_context(|| scenario.name)?;
        thread::sleep(Duration::from_millis(700)); // the join window, and the last transitions
        results.push((scenario, ports));
    }
    Ok((results, tracer.stop()?))
}

/// Whether every scenario's check passes on these lines.
fn all_explained(results: &[(&Scenario, Ports)], lines: &[Value]) -> bool {
    results
        .iter()
        .all(|(scenario, ports)| (scenario.check)(&lines_of(lines, *ports), *ports).is_ok())
}

/// The lines of one scenario's connection, in time order.
fn lines_of(lines: &[Value], ports: Ports) -> Vec<Value> {
    let mut mine: Vec<Value> = lines
        .iter()
        .filter(|v| belongs(v, ports))
        .cloned()
        .collect();
    mine.sort_by_key(|v| v["mono_ns"].as_u64());
    mine
}

/// The events the tracer's summary reports lost, all sources together.
fn lost_events(lines: &[Value]) -> u64 {
    lines
        .iter()
        .rfind(|v| v["event"] == "summary")
        .and_then(|summary| summary["lost"].as_object())
        .map_or(0, |lost| lost.values().filter_map(Value::as_u64).sum())
}

fn belongs(v: &Value, ports: Ports) -> bool {
    let (l, r) = (v["lport"].as_u64(), v["rport"].as_u64());
    let (s, d) = (v["sport"].as_u64(), v["dport"].as_u64());
    let ends = [ports.closer as u64, ports.other as u64];
    let pair = |a: Option<u64>, b: Option<u64>| {
        a.zip(b)
            .is_some_and(|(a, b)| ends.contains(&a) && ends.contains(&b) && a != b)
    };
    pair(l, r) || pair(s, d)
}

fn print_scenario(scenario: &Scenario, lines: &[Value], verdict: &Result<(), String>) {
    println!("\n== {} ==", scenario.name);
    for v in lines {
        println!("  {}", describe(v));
    }
    match verdict {
        Ok(()) => println!("  → {}", scenario.meaning),
        Err(problem) => println!("  ✗ unexpected: {problem}"),
    }
}

/// One line of the timeline, from a JSON line.
fn describe(v: &Value) -> String {
    let time = v["time"]
        .as_str()
        .unwrap_or("")
        .split('T')
        .nth(1)
        .unwrap_or("");
    let event = v["event"].as_str().unwrap_or("?");
    let who = format!("{}[{}]", v["comm"].as_str().unwrap_or("?"), v["pid"]);
    let mut text = format!(
        "{time} {event:<12} {who} :{} {}→{}",
        v["lport"],
        v["old_state"].as_str().unwrap_or(""),
        v["new_state"].as_str().unwrap_or("")
    );
    if event == "packet" {
        return format!(
            "{time} packet       :{} > :{} {}",
            v["sport"], v["dport"], v["flags"]
        );
    }
    if let Some(call) = v["syscall"].as_str() {
        text.push_str(&format!(" by {call}()"));
    }
    if let Some(outcome) = v["outcome"].as_str() {
        text.push_str(&format!(" → {}", outcome.to_uppercase()));
    }
    if let Some(reason) = v["reason"].as_str() {
        text.push_str(&format!(" ({reason})"));
    }
    if let Some(ns) = v["duration_ns"].as_i64() {
        text.push_str(&format!(
            ", after {} in {}",
            human_ns(ns),
            v["old_state"].as_str().unwrap_or("")
        ));
    }
    if is_timeout(v) {
        text.push_str(" (timed out: no FIN from the peer)");
    }
    if let Some(wire) = v["wire"].as_object() {
        text.push_str(&format!(
            "; on the wire {} {} {}",
            wire["flags"],
            wire["dir"].as_str().unwrap_or(""),
            human_ns(wire["delay_ns"].as_i64().unwrap_or(0))
        ));
    } else if v.get("wire").is_some() && v["outcome"].is_string() {
        text.push_str("; no packet seen");
    }
    text
}

// --- the scenarios -----------------------------------------------------------------------

fn connect(l: &TcpListener) -> anyhow::Result<(TcpStream, TcpStream)> {
    let client = TcpStream::connect(l.local_addr()?)?;
    let (server, _) = l.accept()?;
    Ok((client, server))
}

fn port(s: &TcpStream) -> u16 {
    s.local_addr().map(|a| a.port()).unwrap_or(0)
}

fn graceful(l: &TcpListener) -> anyhow::Result<Ports> {
    let (mut client, mut server) = connect(l)?;
    let ports = Ports {
        closer: port(&client),
        other: port(&server),
    };
    client.write_all(b"hello")?;
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf)?;
    drop(client);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest)?; // EOF: the client's FIN
    drop(server);
    Ok(ports)
}

fn unread(l: &TcpListener) -> anyhow::Result<Ports> {
    let (mut client, server) = connect(l)?;
    let ports = Ports {
        closer: port(&server),
        other: port(&client),
    };
    client.write_all(b"request the server never reads")?;
    wait_readable(&server);
    drop(server);
    thread::sleep(Duration::from_millis(50));
    drop(client);
    Ok(ports)
}

fn linger0(l: &TcpListener) -> anyhow::Result<Ports> {
    let (client, server) = connect(l)?;
    let ports = Ports {
        closer: port(&client),
        other: port(&server),
    };
    set_linger_zero(&client)?;
    drop(client);
    thread::sleep(Duration::from_millis(50));
    drop(server);
    Ok(ports)
}

fn half_close(l: &TcpListener) -> anyhow::Result<Ports> {
    let (mut client, mut server) = connect(l)?;
    let ports = Ports {
        closer: port(&client),
        other: port(&server),
    };
    client.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    server.read_to_end(&mut rest)?; // EOF
    server.write_all(b"the answer still flows back")?;
    let mut buf = [0u8; 27];
    client.read_exact(&mut buf)?;
    drop(server);
    thread::sleep(Duration::from_millis(50));
    drop(client);
    Ok(ports)
}

fn lingering_peer(l: &TcpListener) -> anyhow::Result<Ports> {
    let (client, server) = connect(l)?;
    let ports = Ports {
        closer: port(&client),
        other: port(&server),
    };
    drop(client);
    thread::sleep(LINGER); // the server "forgets" to close: CLOSE_WAIT
    drop(server);
    Ok(ports)
}

fn late_peer(l: &TcpListener) -> anyhow::Result<Ports> {
    let (client, server) = connect(l)?;
    let ports = Ports {
        closer: port(&client),
        other: port(&server),
    };
    set_option(
        &client,
        libc::IPPROTO_TCP,
        libc::TCP_LINGER2,
        1i32,
        "TCP_LINGER2",
    )?;
    drop(client);
    thread::sleep(LATE);
    drop(server);
    Ok(ports)
}

fn wait_readable(s: &TcpStream) {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 2000) };
}

fn set_linger_zero(s: &TcpStream) -> anyhow::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(s, libc::SOL_SOCKET, libc::SO_LINGER, linger, "SO_LINGER")
}

/// setsockopt with a plain value (an int, a linger struct); `what` names it in the error.
fn set_option<T: Copy>(
    s: &TcpStream,
    level: i32,
    name: i32,
    value: T,
    what: &str,
) -> anyhow::Result<()> {
    // SAFETY: a valid socket, and the option's value passed with its own size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("setsockopt({what}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

// --- the checks ----------------------------------------------------------------------------

fn find<'a>(lines: &'a [Value], event: &str, lport: u16) -> Result<&'a Value, String> {
    lines
        .iter()
        .find(|v| v["event"] == event && v["lport"] == lport)
        .ok_or_else(|| format!("no {event} line for the socket on port {lport}"))
}

fn expect(v: &Value, field: &str, want: &str) -> Result<(), String> {
    if v[field] == want {
        Ok(())
    } else {
        Err(format!(
            "{} has {field} {} (expected {want})",
            v["event"], v[field]
        ))
    }
}

fn check_graceful(lines: &[Value], p: Ports) -> Result<(), String> {
    let close = find(lines, "close", p.closer)?;
    expect(close, "outcome", "fin")?;
    expect(close, "new_state", "FIN_WAIT1")?;
    expect(
        find(lines, "fin_received", p.other)?,
        "new_state",
        "CLOSE_WAIT",
    )?;
    expect(find(lines, "close", p.other)?, "new_state", "LAST_ACK")
}

fn check_unread(lines: &[Value], p: Ports) -> Result<(), String> {
    let close = find(lines, "close", p.closer)?;
    expect(close, "outcome", "rst")?;
    expect(close, "reason", "TCP_ABORT_ON_CLOSE")?;
    find(lines, "rst_received", p.other).map(|_| ())
}

fn check_linger0(lines: &[Value], p: Ports) -> Result<(), String> {
    let close = find(lines, "close", p.closer)?;
    expect(close, "outcome", "rst")?;
    expect(close, "new_state", "CLOSE")?;
    find(lines, "rst_received", p.other).map(|_| ())
}

fn check_half_close(lines: &[Value], p: Ports) -> Result<(), String> {
    let close = find(lines, "close", p.closer)?;
    expect(close, "syscall", "shutdown")?;
    expect(close, "outcome", "fin")?;
    find(lines, "fin_received", p.other).map(|_| ())
}

fn check_lingering_peer(lines: &[Value], p: Ports) -> Result<(), String> {
    let close = find(lines, "close", p.other)?;
    expect(close, "old_state", "CLOSE_WAIT")?;
    let waited = close["duration_ns"].as_u64().unwrap_or(0);
    if waited < LINGER.as_nanos() as u64 / 2 {
        return Err(format!(
            "CLOSE_WAIT lasted {waited} ns, expected about {LINGER:?}"
        ));
    }
    Ok(())
}

/// Whether a JSON line is the end of a FIN_WAIT2 that timed out (see `lines`).
fn is_timeout(v: &Value) -> bool {
    let text = |field: &str| v[field].as_str().unwrap_or("");
    is_fin_wait2_timeout(
        text("event"),
        text("owner"),
        text("old_state"),
        text("new_state"),
    )
}

fn check_late_peer(lines: &[Value], p: Ports) -> Result<(), String> {
    let end = lines
        .iter()
        .find(|v| is_timeout(v) && v["lport"] == p.closer)
        .ok_or("no line for the end of the closer's FIN_WAIT2")?;
    let waited = end["duration_ns"].as_u64().unwrap_or(0);
    if waited < 700_000_000 {
        return Err(format!("FIN_WAIT2 lasted {waited} ns, expected about 1 s"));
    }
    find(lines, "rst_received", p.other).map(|_| ())
}

// --- the tracer under demonstration ---------------------------------------------------------

struct Tracer {
    child: Child,
    lines: Receiver<Value>,
}

impl Tracer {
    fn start(port: u16) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the tracer binary")?;
        let mut child = Command::new(exe)
            .args([
                "--port",
                &port.to_string(),
                "-i",
                "lo",
                "--join-window",
                WINDOW,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the tracer")?;
        let stdout = child.stdout.take().context("tracer stdout")?;
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let tracer = Self { child, lines };
        tracer.wait_ready()?;
        Ok(tracer)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        match self.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(v) if v["event"] == "ready" => Ok(()),
            Ok(v) => bail!("the tracer's first line was not `ready`: {v}"),
            Err(_) => bail!("the tracer did not start (see its message above)"),
        }
    }

    /// Stops the tracer with SIGINT and returns every line it printed.
    fn stop(&mut self) -> anyhow::Result<Vec<Value>> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(v) => lines.push(v),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    bail!("the tracer did not stop within 10 s");
                }
            }
        }
        self.child.wait()?;
        Ok(lines)
    }
}
