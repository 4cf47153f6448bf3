//! The lines the tracer writes, as data, and their two encodings: JSON (the contract, the
//! default) and `--format pretty`, a human timeline (coloured on a terminal).

use std::net::IpAddr;

use serde::{Serialize, Serializer, ser::SerializeSeq};

pub use crate::clock::Rfc3339 as Time;
use crate::{capture::tcp_flags, jsonw::Object};

/// A connection id, printed as 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digit by digit rather than `{:016x}`: it is on every line.
        let mut hex = [b'0'; 16];
        for (i, slot) in hex.iter_mut().enumerate() {
            *slot = b"0123456789abcdef"[(self.0 >> (60 - 4 * i) & 0xf) as usize];
        }
        f.write_str(std::str::from_utf8(&hex).expect("hex digits"))
    }
}

impl Serialize for ConnId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// TCP flags, serialised as a list of names: `["RST","ACK"]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags(pub u8);

const FLAG_NAMES: [(u8, &str); 8] = [
    (tcp_flags::FIN, "FIN"),
    (tcp_flags::SYN, "SYN"),
    (tcp_flags::RST, "RST"),
    (tcp_flags::PSH, "PSH"),
    (tcp_flags::ACK, "ACK"),
    (tcp_flags::URG, "URG"),
    (tcp_flags::ECE, "ECE"),
    (tcp_flags::CWR, "CWR"),
];

impl Flags {
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        FLAG_NAMES
            .into_iter()
            .filter(move |(bit, _)| self.0 & bit != 0)
            .map(|(_, name)| name)
    }
}

impl std::fmt::Display for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names().collect::<Vec<_>>().join(","))
    }
}

impl Serialize for Flags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        for name in self.names() {
            seq.serialize_element(name)?;
        }
        seq.end()
    }
}

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    Json,
    Pretty,
}

/// How lines are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Pretty { color: bool },
}

/// A socket event (`close`, `fin_received`, `rst_sent`, `rst_received`, `state`).
///
/// Serialisation note: an outer `None` leaves the field out (it does not belong to this event
/// kind); `Some(None)` writes `null` (it belongs, but is unknown).
#[derive(Serialize)]
pub struct SocketLine<'a> {
    pub event: &'static str,
    pub time: Time,
    pub mono_ns: u64,
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub comm: Option<&'a str>,
    pub owner: &'static str,
    pub conn: Option<ConnId>,
    pub family: &'static str,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub old_state: &'static str,
    pub new_state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscall: Option<Option<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Option<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ns: Option<Option<u64>>,
    /// A `state` line's move to CLOSE when the kernel gave up on the connection: the socket's
    /// error (`ETIMEDOUT`: retransmissions or TCP_USER_TIMEOUT ran out). Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire: Option<Option<Wire<'a>>>,
    /// `"wire"` when the event was seen only on the wire (the peer's FIN into TIME_WAIT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub derived: Option<&'static str>,
}

/// The packet that carried an event.
#[derive(Serialize)]
pub struct Wire<'a> {
    pub time: Time,
    pub mono_ns: u64,
    pub delay_ns: i64,
    pub flags: Flags,
    pub dir: &'static str,
    pub iface: &'a str,
    pub seq: u32,
    pub ack: u32,
    /// Further copies of the same segment seen within the join window.
    pub retransmits: u32,
}

/// A FIN or RST on the wire that no kernel event claimed.
#[derive(Serialize)]
pub struct PacketLine<'a> {
    pub event: &'static str,
    pub time: Time,
    pub mono_ns: u64,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub flags: Flags,
    pub iface: &'a str,
    pub dir: &'static str,
    pub seq: u32,
    pub ack: u32,
    pub conn: Option<ConnId>,
    pub retransmit: bool,
}

#[derive(Serialize)]
pub struct LostLine {
    pub event: &'static str,
    pub time: String,
    pub mono_ns: u64,
    pub source: &'static str,
    pub count: u64,
}

impl SocketLine<'_> {
    /// The JSON line, written directly (see `jsonw`); the same bytes serde would write.
    #[cfg(test)]
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    /// Appends the JSON line to `out`.
    pub fn write_json(&self, out: &mut String) {
        let mut o = Object::begin(out);
        o.name("event", self.event);
        o.time("time", self.time);
        o.uint("mono_ns", self.mono_ns);
        opt(&mut o, "pid", self.pid, |o, k, v| o.uint(k, v.into()));
        opt(&mut o, "tid", self.tid, |o, k, v| o.uint(k, v.into()));
        opt(&mut o, "comm", self.comm, Object::text);
        o.name("owner", self.owner);
        opt(&mut o, "conn", self.conn, |o, k, v| o.display(k, v));
        o.name("family", self.family);
        o.ip("laddr", self.laddr);
        o.uint("lport", self.lport.into());
        o.ip("raddr", self.raddr);
        o.uint("rport", self.rport.into());
        o.name("old_state", self.old_state);
        o.name("new_state", self.new_state);
        if let Some(v) = self.syscall {
            opt(&mut o, "syscall", v, Object::name);
        }
        if let Some(v) = self.fd {
            opt(&mut o, "fd", v, |o, k, v| o.int(k, v.into()));
        }
        if let Some(v) = self.outcome {
            opt(&mut o, "outcome", v, Object::name);
        }
        if let Some(v) = self.reason {
            opt(&mut o, "reason", v, Object::text);
        }
        if let Some(v) = self.duration_ns {
            opt(&mut o, "duration_ns", v, Object::uint);
        }
        if let Some(v) = self.error {
            o.text("error", v);
        }
        if let Some(v) = &self.wire {
            opt(&mut o, "wire", v.as_ref(), |o, k, w| w.write(o.object(k)));
        }
        if let Some(v) = self.derived {
            o.name("derived", v);
        }
        o.end();
    }
}

impl Wire<'_> {
    fn write(&self, mut o: Object<'_>) {
        o.time("time", self.time);
        o.uint("mono_ns", self.mono_ns);
        o.int("delay_ns", self.delay_ns);
        o.names("flags", self.flags.names());
        o.name("dir", self.dir);
        o.text("iface", self.iface);
        o.uint("seq", self.seq.into());
        o.uint("ack", self.ack.into());
        o.uint("retransmits", self.retransmits.into());
        o.end();
    }
}

/// A value or `null`.
fn opt<'o, T>(
    o: &mut Object<'o>,
    key: &str,
    value: Option<T>,
    write: impl FnOnce(&mut Object<'o>, &str, T),
) {
    match value {
        Some(v) => write(o, key, v),
        None => o.null(key),
    }
}

impl Format {
    #[cfg(test)]
    pub fn socket(self, line: &SocketLine<'_>) -> String {
        let mut out = String::new();
        self.write_socket(line, &mut out);
        out
    }

    /// Appends a socket line to `out`.
    pub fn write_socket(self, line: &SocketLine<'_>, out: &mut String) {
        match self {
            Format::Json => line.write_json(out),
            Format::Pretty { color } => out.push_str(&pretty_socket(line, color)),
        }
    }

    pub fn packet(self, line: &PacketLine<'_>) -> String {
        match self {
            Format::Json => json(line),
            Format::Pretty { color } => paint(color, BLUE, &pretty_packet(line)),
        }
    }

    pub fn lost(self, line: &LostLine) -> String {
        match self {
            Format::Json => json(line),
            Format::Pretty { color } => paint(
                color,
                RED,
                &format!(
                    "{}  LOST          {} events lost in {}",
                    clock_part(&line.time.to_string()),
                    line.count,
                    line.source
                ),
            ),
        }
    }

    /// `ready` and `summary` are structured; pretty shows each as one line of the timeline:
    /// its clock time, its name, then `key=value` pairs (nested objects in parentheses, lists
    /// comma-separated, nulls as `-`).
    pub fn document<T: Serialize>(self, value: &T) -> String {
        match self {
            Format::Json => json(value),
            Format::Pretty { .. } => {
                pretty_document(&serde_json::to_value(value).expect("plain data"))
            }
        }
    }
}

/// A packet line in the timeline's columns. On a connection the tracer knows, its socket's end
/// comes first, as on that connection's socket lines (`<` for what it received), and its
/// `conn`; otherwise source > destination.
fn pretty_packet(line: &PacketLine<'_>) -> String {
    let (src, dst) = (
        format!("{}:{}", line.saddr, line.sport),
        format!("{}:{}", line.daddr, line.dport),
    );
    let ends = match (line.conn, line.dir) {
        (Some(_), "in") => format!("{dst} < {src}"),
        _ => format!("{src} > {dst}"),
    };
    let mut text = format!(
        "{}  packet        {:<18}  {ends}  {} {} on {}",
        clock_part(&line.time.to_string()),
        "",
        line.flags,
        line.dir,
        line.iface,
    );
    if line.retransmit {
        text.push_str(" (retransmission)");
    }
    if let Some(conn) = line.conn {
        text.push_str(&conn_suffix(conn));
    }
    text
}

/// How the timeline names a connection, after a line: the first 8 hex digits of its id.
fn conn_suffix(conn: ConnId) -> String {
    format!("  conn {}", &conn.to_string()[..8])
}

fn pretty_document(doc: &serde_json::Value) -> String {
    let field = |name: &str| doc.get(name).and_then(|v| v.as_str()).unwrap_or("");
    let mut text = format!("{}  {:<12}", clock_part(field("time")), field("event"));
    if let Some(fields) = doc.as_object() {
        for (key, value) in fields {
            if !matches!(key.as_str(), "event" | "time" | "mono_ns") {
                text.push_str(&format!("  {key}={}", compact(value)));
            }
        }
    }
    text
}

/// A JSON value on one line, for people (see `Format::document`).
fn compact(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".to_string(),
        Value::Array(items) => items.iter().map(compact).collect::<Vec<_>>().join(","),
        Value::Object(fields) => {
            let inner: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{k}={}", compact(v)))
                .collect();
            format!("({})", inner.join(" "))
        }
        other => other.to_string(),
    }
}

pub fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serialises")
}

const RED: &str = "31";
const YELLOW: &str = "33";
const BLUE: &str = "34";
const MAGENTA: &str = "35";
const CYAN: &str = "36";
const DIM: &str = "2";

fn paint(color: bool, code: &str, text: &str) -> String {
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// `13:51:42.123456789` out of an RFC 3339 time.
fn clock_part(time: &str) -> String {
    time.split_once('T')
        .map_or(time, |(_, t)| t.trim_end_matches('Z'))
        .to_string()
}

/// Whether a line with these fields is the end of a time-wait socket whose FIN_WAIT2 timed
/// out: a `state` FIN_WAIT2 -> CLOSE named after its connection (the full socket's own move
/// to its time-wait form is its owner's).
pub fn is_fin_wait2_timeout(event: &str, owner: &str, old_state: &str, new_state: &str) -> bool {
    (event, owner, old_state, new_state) == ("state", "connection", "FIN_WAIT2", "CLOSE")
}

fn pretty_socket(l: &SocketLine<'_>, color: bool) -> String {
    let who = match (l.comm, l.pid) {
        (Some(comm), Some(pid)) => format!("{comm}[{pid}]"),
        _ => "?".to_string(),
    };
    let arrow = match l.event {
        "fin_received" | "rst_received" => "<",
        _ => ">",
    };
    let mut text = format!(
        "{}  {:<12}  {:<18}  {}:{} {} {}:{}  {}→{}",
        clock_part(&l.time.to_string()),
        l.event,
        who,
        l.laddr,
        l.lport,
        arrow,
        l.raddr,
        l.rport,
        l.old_state,
        l.new_state
    );
    if let Some(Some(call)) = l.syscall {
        match l.fd {
            Some(Some(fd)) => text.push_str(&format!("  {call}(fd {fd})")),
            _ => text.push_str(&format!("  {call}")),
        }
    }
    if let Some(Some(outcome)) = l.outcome {
        text.push_str(&format!(" → {}", outcome.to_uppercase()));
    }
    if let Some(Some(reason)) = &l.reason {
        text.push_str(&format!(" ({reason})"));
    }
    if let Some(Some(ns)) = l.duration_ns {
        text.push_str(&format!(
            "  after {} in {}",
            human_ns(ns as i64),
            l.old_state
        ));
    }
    match &l.wire {
        Some(Some(w)) => text.push_str(&format!(
            "  wire: {} {} {:+} on {}",
            w.flags,
            w.dir,
            HumanDelay(w.delay_ns),
            w.iface
        )),
        Some(None) => text.push_str("  wire: none seen"),
        None => {}
    }
    if let Some(error) = l.error {
        text.push_str(&format!("  the kernel gave up: {error}"));
    }
    if l.derived.is_some() {
        text.push_str("  (seen on the wire)");
    }
    if is_fin_wait2_timeout(l.event, l.owner, l.old_state, l.new_state) {
        text.push_str("  (FIN_WAIT2 timed out: the peer never closed)");
    }
    if l.pid.is_none() {
        text.push_str(&format!("  owner {}", l.owner));
    }
    if let Some(conn) = &l.conn {
        text.push_str(&conn_suffix(*conn));
    }
    let code = match (l.event, l.outcome) {
        ("close", Some(Some("rst"))) | ("rst_sent", _) | ("rst_received", _) => RED,
        ("close", _) => YELLOW,
        ("fin_received", _) => CYAN,
        ("state", _) => DIM,
        _ => MAGENTA,
    };
    paint(color, code, &text)
}

struct HumanDelay(i64);

impl std::fmt::Display for HumanDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "+" };
        write!(f, "{sign}{}", human_ns(self.0.abs()))
    }
}

/// 950ns, 14.2µs, 43.0ms, 1.20s.
pub fn human_ns(ns: i64) -> String {
    let v = ns as f64;
    match ns.abs() {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}µs", v / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}ms", v / 1e6),
        _ => format!("{:.2}s", v / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet line on a known connection reads like that connection's socket lines: its
    /// socket's end first (`<` for what it received) and its conn; otherwise source first.
    #[test]
    fn a_pretty_packet_line_puts_its_connections_end_first() {
        let packet = |conn: Option<u64>, dir: &'static str| PacketLine {
            event: "packet",
            time: Time(1_795_528_302_123_456_789),
            mono_ns: 1,
            saddr: "127.0.0.1".parse().unwrap(),
            sport: 7601,
            daddr: "127.0.0.1".parse().unwrap(),
            dport: 36792,
            flags: Flags(0x11),
            iface: "lo",
            dir,
            seq: 1,
            ack: 1,
            conn: conn.map(ConnId),
            retransmit: true,
        };
        let pretty = Format::Pretty { color: false };
        let known = pretty.packet(&packet(Some(0xabcdef0123456789), "in"));
        assert!(
            known.contains("127.0.0.1:36792 < 127.0.0.1:7601"),
            "{known}"
        );
        assert!(
            known.ends_with("(retransmission)  conn abcdef01"),
            "{known}"
        );
        let unknown = pretty.packet(&packet(None, "in"));
        assert!(
            unknown.contains("127.0.0.1:7601 > 127.0.0.1:36792"),
            "{unknown}"
        );
    }

    fn close_line() -> SocketLine<'static> {
        SocketLine {
            event: "close",
            time: Time(1_795_528_302_123_456_789),
            mono_ns: 1,
            pid: Some(1234),
            tid: Some(1234),
            comm: Some("server"),
            owner: "task",
            conn: Some(ConnId(0x0011_2233_4455_66aa)),
            family: "ipv4",
            laddr: "10.0.0.1".parse().unwrap(),
            lport: 8080,
            raddr: "10.0.0.2".parse().unwrap(),
            rport: 40000,
            old_state: "ESTABLISHED",
            new_state: "CLOSE",
            syscall: Some(Some("close")),
            fd: Some(Some(7)),
            outcome: Some(Some("rst")),
            reason: Some(Some("TCP_ABORT_ON_CLOSE")),
            duration_ns: Some(None),
            error: None,
            wire: Some(Some(Wire {
                time: Time(1_795_528_302_123_470_789),
                mono_ns: 14_001,
                delay_ns: 14_000,
                flags: Flags(0x14),
                dir: "out",
                iface: "lo",
                seq: 1,
                ack: 2,
                retransmits: 0,
            })),
            derived: None,
        }
    }

    /// The hand-written encoder against serde's, for lines with every field shape.
    #[test]
    fn direct_json_is_what_serde_writes() {
        let full = close_line();
        let mut nulls = close_line();
        nulls.pid = None;
        nulls.tid = None;
        nulls.comm = Some("we\"ird\\name\u{7}");
        nulls.conn = None;
        nulls.laddr = "::ffff:10.0.0.1".parse().unwrap();
        nulls.syscall = Some(None);
        nulls.fd = Some(None);
        nulls.outcome = Some(None);
        nulls.reason = Some(None);
        nulls.duration_ns = Some(Some(u64::MAX));
        nulls.wire = Some(None);
        nulls.derived = Some("wire");
        nulls.error = Some("ETIMEDOUT");
        let mut absent = close_line();
        absent.comm = None;
        absent.syscall = None;
        absent.fd = None;
        absent.outcome = None;
        absent.reason = None;
        absent.duration_ns = None;
        absent.wire = None;
        let mut negative = close_line();
        if let Some(Some(w)) = negative.wire.as_mut() {
            w.delay_ns = -3;
            w.flags = Flags(0xff);
            w.iface = "veth\"0";
        }
        for line in [full, nulls, absent, negative] {
            assert_eq!(line.to_json(), json(&line));
        }
    }

    #[test]
    fn json_keeps_contract_fields_and_nulls() {
        let v: serde_json::Value =
            serde_json::from_str(&Format::Json.socket(&close_line())).unwrap();
        assert_eq!(v["event"], "close");
        assert_eq!(v["outcome"], "rst");
        assert_eq!(v["duration_ns"], serde_json::Value::Null);
        assert_eq!(v["wire"]["flags"], serde_json::json!(["RST", "ACK"]));
        assert!(v.get("derived").is_none());
    }

    #[test]
    fn pretty_reads_as_a_sentence() {
        let doc = serde_json::json!({
            "event": "summary", "time": "2026-11-24T13:51:42.123456789Z", "mono_ns": 1,
            "counts": {"close": 2}, "pids": [7, 8], "capture": null,
        });
        assert_eq!(
            Format::Pretty { color: false }.document(&doc),
            "13:51:42.123456789  summary       capture=-  counts=(close=2)  pids=7,8"
        );
        let text = Format::Pretty { color: false }.socket(&close_line());
        assert_eq!(
            text,
            "13:51:42.123456789  close         server[1234]        10.0.0.1:8080 > 10.0.0.2:40000  \
             ESTABLISHED→CLOSE  close(fd 7) → RST (TCP_ABORT_ON_CLOSE)  wire: RST,ACK out +14.0µs on lo  \
             conn 00112233"
        );
        let colored = Format::Pretty { color: true }.socket(&close_line());
        assert!(colored.starts_with("\x1b[31m") && colored.ends_with("\x1b[0m"));
    }

    #[test]
    fn pretty_says_when_a_fin_wait2_timed_out() {
        let mut end = close_line();
        (end.event, end.owner) = ("state", "connection");
        (end.old_state, end.new_state) = ("FIN_WAIT2", "CLOSE");
        (end.syscall, end.fd, end.outcome, end.reason) = (None, None, None, None);
        (end.duration_ns, end.wire) = (Some(Some(60_000_000_000)), None);
        let text = Format::Pretty { color: false }.socket(&end);
        assert!(
            text.contains(
                "after 60.00s in FIN_WAIT2  (FIN_WAIT2 timed out: the peer never closed)"
            ),
            "{text}"
        );
    }

    #[test]
    fn conn_ids_are_16_hex_digits() {
        for id in [0, 1, 0xdead_beef, u64::MAX, 0x0011_2233_4455_66aa] {
            assert_eq!(ConnId(id).to_string(), format!("{id:016x}"));
        }
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_ns(950), "950ns");
        assert_eq!(human_ns(14_200), "14.2µs");
        assert_eq!(human_ns(43_000_000), "43.0ms");
        assert_eq!(human_ns(1_200_000_000), "1.20s");
        assert_eq!(format!("{}", HumanDelay(-2_000)), "-2.0µs");
    }
}
