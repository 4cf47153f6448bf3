//! What each scenario must produce, checked field by field as tracer/tests/teardown.rs does,
//! and the normalized lines: the fields that are comparable across kernels and runs.

use serde_json::{Map, Value, json};

use crate::scenarios::{Conn, Kind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Server,
    Client,
}

impl End {
    pub fn name(self) -> &'static str {
        match self {
            End::Server => "server",
            End::Client => "client",
        }
    }
}

/// A field's expected value.
#[derive(Clone, Debug)]
enum Want {
    Is(&'static str),
    Null,
    /// The pid of the process owning this end.
    OwnPid,
    /// This process's fd of the closed socket.
    Fd,
    /// The kernel's RST reason, on kernels whose tcp_send_reset has one (6.10+); else null.
    Reason(&'static str),
    /// The wire packet: these flags among its flags, this direction, a delay.
    Wire(&'static str, &'static str),
}

/// One line that must exist, and what its fields must be.
struct Expect {
    event: &'static str,
    end: End,
    /// Narrows to one of several lines of the same kind (by new_state or old_state).
    state: Option<(&'static str, &'static str)>,
    want: Vec<(&'static str, Want)>,
}

fn expect(event: &'static str, end: End, want: Vec<(&'static str, Want)>) -> Expect {
    Expect {
        event,
        end,
        state: None,
        want,
    }
}

/// What the kernel and the tracer were asked for, as far as the checks depend on it.
#[derive(Clone, Copy)]
pub struct Context {
    /// tcp_send_reset has a `reason` field (Linux 6.10+).
    pub reasons: bool,
    /// Packets are captured, so events carry `wire`.
    pub capture: bool,
}

fn expectations(kind: Kind) -> (Vec<Expect>, Vec<(&'static str, End)>) {
    use End::{Client, Server};
    use Want::*;
    let fin_out = || ("wire", Wire("FIN", "out"));
    match kind {
        Kind::GracefulClose => (
            vec![
                expect(
                    "close",
                    Server,
                    vec![
                        ("pid", OwnPid),
                        ("syscall", Is("close")),
                        ("fd", Fd),
                        ("outcome", Is("fin")),
                        ("reason", Null),
                        ("old_state", Is("ESTABLISHED")),
                        ("new_state", Is("FIN_WAIT1")),
                        fin_out(),
                    ],
                ),
                expect(
                    "fin_received",
                    Client,
                    vec![
                        ("pid", OwnPid),
                        ("old_state", Is("ESTABLISHED")),
                        ("new_state", Is("CLOSE_WAIT")),
                        ("wire", Wire("FIN", "in")),
                    ],
                ),
                Expect {
                    state: Some(("new_state", "FIN_WAIT2")),
                    ..expect("state", Server, vec![("pid", OwnPid)])
                },
                expect(
                    "close",
                    Client,
                    vec![
                        ("pid", OwnPid),
                        ("syscall", Is("close")),
                        ("old_state", Is("CLOSE_WAIT")),
                        ("new_state", Is("LAST_ACK")),
                        ("outcome", Is("fin")),
                        fin_out(),
                    ],
                ),
                Expect {
                    state: Some(("old_state", "FIN_WAIT2")),
                    ..expect("state", Server, vec![("pid", OwnPid)])
                },
            ],
            vec![],
        ),
        Kind::UnreadClose => (
            vec![
                expect(
                    "close",
                    Server,
                    vec![
                        ("pid", OwnPid),
                        ("syscall", Is("close")),
                        ("fd", Fd),
                        ("outcome", Is("rst")),
                        ("reason", Reason("TCP_ABORT_ON_CLOSE")),
                        ("old_state", Is("ESTABLISHED")),
                        ("new_state", Is("CLOSE")),
                        ("wire", Wire("RST", "out")),
                    ],
                ),
                expect(
                    "rst_received",
                    Client,
                    vec![("pid", OwnPid), ("wire", Wire("RST", "in"))],
                ),
            ],
            // The RST is reported once, folded into the close.
            vec![("rst_sent", Server)],
        ),
        Kind::LingerZero => (
            vec![
                expect(
                    "close",
                    Client,
                    vec![
                        ("pid", OwnPid),
                        ("syscall", Is("close")),
                        ("outcome", Is("rst")),
                        ("reason", Reason("TCP_STATE")),
                        ("new_state", Is("CLOSE")),
                        ("wire", Wire("RST", "out")),
                    ],
                ),
                expect(
                    "rst_received",
                    Server,
                    vec![
                        ("pid", OwnPid),
                        ("old_state", Is("ESTABLISHED")),
                        ("wire", Wire("RST", "in")),
                    ],
                ),
            ],
            vec![("rst_sent", Client)],
        ),
        Kind::ShutdownWrite => (
            vec![expect(
                "close",
                Server,
                vec![
                    ("pid", OwnPid),
                    ("syscall", Is("shutdown")),
                    ("fd", Fd),
                    ("outcome", Is("fin")),
                    ("new_state", Is("FIN_WAIT1")),
                    fin_out(),
                ],
            )],
            vec![],
        ),
        Kind::PeerReset => (
            vec![
                expect(
                    "rst_received",
                    Client,
                    vec![
                        ("pid", OwnPid),
                        ("owner", Is("task")),
                        ("wire", Wire("RST", "in")),
                    ],
                ),
                expect(
                    "close",
                    Server,
                    vec![("pid", OwnPid), ("outcome", Is("rst"))],
                ),
            ],
            vec![],
        ),
        Kind::ProcessExit => (
            vec![
                expect(
                    "close",
                    Client,
                    vec![
                        ("pid", OwnPid),
                        ("syscall", Is("exit")),
                        ("fd", Null),
                        ("outcome", Is("fin")),
                        fin_out(),
                    ],
                ),
                expect("fin_received", Server, vec![("pid", OwnPid)]),
            ],
            vec![],
        ),
        Kind::Seeded => (
            vec![
                expect(
                    "fin_received",
                    Client,
                    vec![
                        ("pid", OwnPid),
                        ("owner", Is("seeded")),
                        ("wire", Wire("FIN", "in")),
                    ],
                ),
                expect(
                    "close",
                    Client,
                    vec![("pid", OwnPid), ("syscall", Is("close"))],
                ),
            ],
            vec![],
        ),
    }
}

/// Every way the lines of one scenario differ from what it must produce.
pub fn check(kind: Kind, conn: &Conn, lines: &[&Value], ctx: Context) -> Vec<String> {
    let (expects, absent) = expectations(kind);
    let mut failures = Vec::new();
    for e in &expects {
        let found = lines.iter().find(|v| {
            v["event"] == e.event
                && conn.end_of(v) == Some(e.end)
                && e.state.is_none_or(|(field, state)| v[field] == state)
        });
        let Some(v) = found else {
            failures.push(format!("no {} line on the {} end", e.event, e.end.name()));
            continue;
        };
        for (field, want) in &e.want {
            if let Err(why) = matches(&v[*field], want, conn, e.end, ctx) {
                failures.push(format!(
                    "{} on the {} end: {field} {why}: {v}",
                    e.event,
                    e.end.name()
                ));
            }
        }
    }
    failures.extend(closed_twice(conn, lines));
    for (event, end) in absent {
        if lines
            .iter()
            .any(|v| v["event"] == event && conn.end_of(v) == Some(end))
        {
            failures.push(format!(
                "an unexpected {event} line on the {} end",
                end.name()
            ));
        }
    }
    failures
}

/// A socket's file is released once (close, exit, close_range...): a second `close` line on
/// one end, other than a shutdown, is a transition taken for a close it was not (a softirq
/// move that ran inside some other call of the task it interrupted).
fn closed_twice(conn: &Conn, lines: &[&Value]) -> Vec<String> {
    [End::Client, End::Server]
        .into_iter()
        .filter_map(|end| {
            let closes: Vec<&&Value> = lines
                .iter()
                .filter(|v| {
                    v["event"] == "close"
                        && v["syscall"] != "shutdown"
                        && conn.end_of(v) == Some(end)
                })
                .collect();
            (closes.len() > 1).then(|| {
                format!(
                    "{} close lines on the {} end, which is released once: {}",
                    closes.len(),
                    end.name(),
                    closes
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            })
        })
        .collect()
}

fn matches(got: &Value, want: &Want, conn: &Conn, end: End, ctx: Context) -> Result<(), String> {
    let expected = match want {
        Want::Is(s) => json!(s),
        Want::Null => Value::Null,
        Want::OwnPid => json!(conn.pid_of(end)),
        Want::Fd => json!(conn.fd),
        Want::Reason(r) if ctx.reasons => json!(r),
        Want::Reason(_) => Value::Null,
        Want::Wire(flag, dir) => return wire_matches(got, flag, dir, ctx),
    };
    if *got == expected {
        Ok(())
    } else {
        Err(format!("is {got}, expected {expected}"))
    }
}

fn wire_matches(wire: &Value, flag: &str, dir: &str, ctx: Context) -> Result<(), String> {
    if !ctx.capture {
        return Ok(());
    }
    let flags = wire["flags"].as_array().cloned().unwrap_or_default();
    if !flags.iter().any(|f| f == flag) || wire["dir"] != dir || !wire["delay_ns"].is_i64() {
        return Err(format!(
            "is {wire}, expected a {flag} packet {dir} with a delay"
        ));
    }
    Ok(())
}

/// The fields of a line that are comparable across kernels and runs: no times, addresses,
/// ports or ids; pids as roles (`own`: the process owning this end, `peer`: the other end's).
pub fn normalize(v: &Value, conn: &Conn) -> Value {
    let end = conn.end_of(v).expect("a line of this connection");
    let mut out = Map::new();
    out.insert("event".into(), v["event"].clone());
    out.insert("end".into(), json!(end.name()));
    if let Some(pid) = v.get("pid") {
        let other = match end {
            End::Server => End::Client,
            End::Client => End::Server,
        };
        let role = match pid.as_u64() {
            None => Value::Null,
            Some(p) if p == conn.pid_of(end) as u64 => json!("own"),
            Some(p) if p == conn.pid_of(other) as u64 => json!("peer"),
            Some(_) => json!("other"),
        };
        out.insert("pid".into(), role);
    }
    for field in [
        "syscall",
        "old_state",
        "new_state",
        "outcome",
        "reason",
        "owner",
        "derived",
        "dir",
    ] {
        if let Some(x) = v.get(field) {
            out.insert(field.into(), x.clone());
        }
    }
    if let Some(fd) = v.get("fd") {
        out.insert("fd".into(), json!(!fd.is_null()));
    }
    if let Some(flags) = v.get("flags") {
        out.insert("flags".into(), flags.clone());
    }
    if let Some(wire) = v.get("wire") {
        let w = if wire.is_null() {
            Value::Null
        } else {
            json!({"flags": wire["flags"], "dir": wire["dir"]})
        };
        out.insert("wire".into(), w);
    }
    Value::Object(out)
}
