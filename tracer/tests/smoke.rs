//! The first end-to-end check: the built tracer, run as root with its defaults (every process,
//! capture on `any`), reports a plain loopback close on both ends with the right owner, states
//! and wire packets, and stops cleanly on SIGINT with a summary as its last line.

mod common;

use common::is;

use std::{
    io::{Read, Write},
    time::Duration,
};

use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
/// Loading and attaching the programs and opening the capture; generous for a busy CI machine.
const READY: Duration = Duration::from_secs(30);

#[test]
fn a_graceful_loopback_close_is_reported_on_both_ends() {
    if !common::require_root() {
        return;
    }
    let mut tracer = common::Tracer::start(&[]);
    check_ready(&tracer.wait_ready(READY));

    // Both ends live in this process: the client closes first, the server after the FIN.
    // The listener stays open, as a server's does.
    let (listener, _) = common::listener("127.0.0.1:0");
    let (mut client, mut server) = common::tcp_pair_on(&listener);
    let cport = client.local_addr().unwrap().port();
    let sport = server.local_addr().unwrap().port();
    client.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    server.read_exact(&mut byte).unwrap(); // nothing left unread: the close sends a FIN
    drop(client);
    assert!(common::read_to_eof(&mut server).is_empty()); // the client's FIN has arrived
    drop(server);
    drop(listener);

    let close = tracer.wait_for(|v| is(v, "close", cport, sport), WAIT);
    check_socket_event(&close, "ESTABLISHED", "FIN_WAIT1");
    assert_eq!(close["syscall"], "close", "{close}");
    assert!(close["fd"].is_u64(), "{close}");
    assert_eq!(close["outcome"], "fin", "{close}");
    assert_eq!(close["reason"], Value::Null, "{close}");
    check_wire(&close, "FIN", "out");

    let fin = tracer.wait_for(|v| is(v, "fin_received", sport, cport), WAIT);
    check_socket_event(&fin, "ESTABLISHED", "CLOSE_WAIT");
    check_wire(&fin, "FIN", "in");
    assert_ne!(
        fin["conn"], close["conn"],
        "each end is its own connection id"
    );

    let server_close = tracer.wait_for(|v| is(v, "close", sport, cport), WAIT);
    check_socket_event(&server_close, "CLOSE_WAIT", "LAST_ACK");
    assert_eq!(
        server_close["conn"], fin["conn"],
        "one id for every event of a socket"
    );
    assert_eq!(server_close["outcome"], "fin", "{server_close}");

    let out = tracer.stop();
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", out.stderr);
    // Every program this kernel's plan chose was accepted: a verifier refusal (a program
    // grown past what this kernel's verifier takes) would otherwise fall back quietly.
    assert!(
        !out.stderr.contains("could not be attached"),
        "stderr:\n{}",
        out.stderr
    );
    for line in &out.lines {
        check_common_fields(line);
    }
    let summary = out.lines.last().unwrap();
    assert_eq!(summary["event"], "summary", "the last line: {summary}");
    assert!(summary["counts"]["close"].as_u64() >= Some(2), "{summary}");
    assert!(
        summary["counts"]["fin_received"].as_u64() >= Some(1),
        "{summary}"
    );
}

/// `ready`: the probes attached, the capture interface (the default, `any`), no PID filter.
fn check_ready(ready: &Value) {
    let probes = ready["probes"].as_array().expect("probes is a list");
    assert!(
        !probes.is_empty() && probes.iter().all(Value::is_string),
        "{ready}"
    );
    assert_eq!(ready["capture"], "any", "{ready}");
    assert_eq!(ready["pids"], Value::Null, "{ready}");
    assert!(ready["version"].is_string(), "{ready}");
}

/// The fields every socket event has, for a loopback IPv4 socket of this process.
fn check_socket_event(v: &Value, old_state: &str, new_state: &str) {
    assert_eq!(
        v["pid"],
        std::process::id(),
        "owned by this test process: {v}"
    );
    assert!(v["tid"].is_u64(), "{v}");
    assert!(!v["comm"].as_str().unwrap_or("").is_empty(), "{v}");
    assert!(v["conn"].is_string(), "{v}");
    assert_eq!(v["family"], "ipv4", "{v}");
    assert_eq!(v["laddr"], "127.0.0.1", "{v}");
    assert_eq!(v["raddr"], "127.0.0.1", "{v}");
    assert_eq!(v["old_state"], old_state, "{v}");
    assert_eq!(v["new_state"], new_state, "{v}");
}

/// The packet joined to an event: the flag, the direction, and `delay_ns` as the contract
/// defines it.
fn check_wire(v: &Value, flag: &str, dir: &str) {
    let wire = &v["wire"];
    assert!(
        wire.is_object(),
        "a wire packet joined within the window: {v}"
    );
    let flags = wire["flags"].as_array().expect("flags is a list");
    assert!(flags.iter().any(|f| f == flag), "{flag} in the flags: {v}");
    assert_eq!(wire["dir"], dir, "{v}");
    assert!(wire["iface"].is_string(), "{v}");
    assert!(wire["seq"].is_u64() && wire["ack"].is_u64(), "{v}");
    let delay = wire["delay_ns"].as_i64().expect("delay_ns");
    let mono = |x: &Value| x["mono_ns"].as_i64().expect("mono_ns");
    assert_eq!(delay, mono(wire) - mono(v), "{v}");
}

/// `event`, `time` (RFC 3339, UTC, nanoseconds) and `mono_ns` on every line.
fn check_common_fields(v: &Value) {
    assert!(v["event"].is_string(), "{v}");
    assert!(v["mono_ns"].is_u64(), "{v}");
    let time = v["time"].as_str().expect("time is a string");
    // 2026-11-24T13:51:42.123456789Z
    let shape = time.len() == 30 && time.as_bytes()[10] == b'T' && time.ends_with('Z');
    assert!(shape, "time {time:?} in {v}");
}

/// The harness's tcpdump parser on lines this machine's tcpdump printed (no root needed).
#[test]
fn harness_parses_tcpdump_lines() {
    let any = "1795558666.584910 lo    In  IP 127.0.0.1.38706 > 127.0.0.1.45678: Flags [F.], \
               seq 656117329, ack 3392204859, win 64, options [nop,nop,TS val 1 ecr 2], length 0";
    let s = common::parse_segment(any).unwrap();
    assert_eq!((s.src.as_str(), s.sport), ("127.0.0.1", 38706));
    assert_eq!((s.dst.as_str(), s.dport), ("127.0.0.1", 45678));
    assert!(s.is_fin() && !s.is_rst());
    assert_eq!((s.seq, s.ack), (656117329, Some(3392204859)));
    assert_eq!(
        (s.iface.as_deref(), s.dir.as_deref()),
        (Some("lo"), Some("In"))
    );

    let v6 = "1795558675.303407 IP6 ::1.60456 > ::1.45679: Flags [R], seq 4094459273, win 0, \
              length 0";
    let s = common::parse_segment(v6).unwrap();
    assert_eq!((s.src.as_str(), s.sport, s.dport), ("::1", 60456, 45679));
    assert!(s.is_rst());
    assert_eq!((s.seq, s.ack, s.iface), (4094459273, None, None));

    let data = "1795558675.303390 IP6 ::1.60456 > ::1.45679: Flags [P.], seq 1:4, ack 9, \
                win 64, length 3";
    assert_eq!(common::parse_segment(data), None, "neither FIN nor RST");
}

/// The harness's two-namespace setup carries a connection over IPv4 and IPv6, and removes
/// both namespaces on drop.
#[test]
fn harness_netns_pair_carries_a_connection() {
    if !common::require_root() {
        return;
    }
    let net = common::NetnsPair::new();
    for (b_addr, listen) in [
        (net.b_v4.clone(), "0.0.0.0:0"),
        (format!("[{}]", net.b_v6), "[::]:0"),
    ] {
        // Each socket is made in its own namespace and used from this thread afterwards.
        let (l, port) = net.in_b(move || common::listener(listen));
        let target = format!("{b_addr}:{port}");
        let mut client = net.in_a(move || std::net::TcpStream::connect(target).unwrap());
        let (mut server, _) = l.accept().unwrap();
        client.write_all(b"x").unwrap();
        drop(client);
        assert_eq!(common::read_to_eof(&mut server), b"x");
    }
    let names = [net.a.clone(), net.b.clone()];
    drop(net);
    let left = common::sh("ip", &["netns", "list"]);
    assert!(names.iter().all(|n| !left.contains(n.as_str())), "{left}");
}
