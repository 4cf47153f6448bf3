//! What users expect around the tracer: the demo, pcapng with process comments read back by
//! tshark, the Prometheus endpoint agreeing with the JSON lines, and the deployment files.

mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use common::{Tracer, metric, scrape, wait_readable};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
const TRACER: &str = env!("CARGO_BIN_EXE_tracer");

/// One reset and one graceful close from this process on a fresh loopback port.
fn reset_and_graceful(l: &TcpListener, port: u16) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (s, _) = l.accept().unwrap();
    c.write_all(b"unread").unwrap();
    wait_readable(&s);
    drop(s);
    drop(c);
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut s, _) = l.accept().unwrap();
    drop(c);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    drop(s);
}

#[test]
fn the_demo_explains_every_scenario_correctly() {
    if !common::require_root() {
        return;
    }
    let out = Command::new(TRACER)
        .args(["demo", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scenarios: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "graceful close",
            "close with unread data",
            "SO_LINGER 0",
            "shutdown(SHUT_WR) half-close",
            "peer never closes (CLOSE_WAIT / FIN_WAIT2)",
            "the peer closes too late (FIN_WAIT2 timeout)"
        ]
    );
    for s in &scenarios {
        assert_eq!(s["ok"], true, "{s}");
        assert!(!s["lines"].as_array().unwrap().is_empty());
        assert!(s["meaning"].as_str().unwrap().len() > 20);
    }
    // The unread-data close carries its RST on the wire (the demo captures on lo).
    let unread = &scenarios[1]["lines"];
    let close = unread
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["event"] == "close" && v["outcome"] == "rst")
        .unwrap();
    assert!(
        close["wire"]["flags"]
            .as_array()
            .unwrap()
            .contains(&"RST".into())
    );
}

#[test]
fn pcapng_has_one_comment_per_packet_naming_the_pid() {
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let path = std::env::temp_dir().join(format!("tracer-{}.pcapng", std::process::id()));
    let path_s = path.to_str().unwrap();
    let mut tracer = Tracer::start(&["-i", "lo", "--port", &port.to_string(), "-w", path_s]);
    tracer.wait_ready(WAIT);
    reset_and_graceful(&l, port);
    std::thread::sleep(Duration::from_millis(700));
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let tshark = Command::new("tshark")
        .args([
            "-r",
            path_s,
            "-T",
            "fields",
            "-e",
            "tcp.flags.str",
            "-e",
            "frame.interface_name",
            "-e",
            "frame.comment",
        ])
        .output()
        .expect("tshark runs (cargo xtask bootstrap installs it)");
    let text = String::from_utf8_lossy(&tshark.stdout);
    let rows: Vec<&str> = text.lines().collect();
    // RST (reset), FIN out and FIN back (graceful): each once, each with a comment.
    assert!(rows.len() >= 3, "{text}");
    let me = format!("pid={}", std::process::id());
    for row in &rows {
        let mut fields = row.splitn(3, '\t').skip(1);
        let (iface, comment) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        assert_eq!(iface, "lo", "the interface is named: {row}");
        assert!(
            comment.starts_with("tracer: "),
            "a comment on every packet: {row}"
        );
        assert!(!comment.contains(','), "one comment per packet: {row}");
        assert!(comment.contains(&me), "names this process: {row}");
    }
    // The RST packet carries the comment of the first of its two events to leave the joiner:
    // the close that sent it (with the kernel's reason) or, on loopback, the rst_received of
    // the end it reached; which one comes first varies from run to run.
    let rst = rows.iter().find(|r| r.contains("·R··")).expect("the RST");
    assert!(
        rst.contains("event=close") && rst.contains("reason=TCP_ABORT_ON_CLOSE")
            || rst.contains("event=rst_received"),
        "{rst}"
    );
    assert!(
        out.lines
            .iter()
            .any(|v| v["event"] == "close" && v["reason"] == "TCP_ABORT_ON_CLOSE"),
        "{:?}",
        out.lines
    );
    let wired = out.lines.iter().filter(|v| v["wire"].is_object()).count();
    assert!(
        wired >= rows.len(),
        "every written packet joined an event: {text}"
    );
    std::fs::remove_file(&path).unwrap();
}

/// Reads the exposition text from the tracer's endpoint.
#[test]
fn metrics_agree_with_the_json_lines() {
    if !common::require_root() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap().to_string();
    drop(probe);
    let mut tracer = Tracer::start(&["-i", "lo", "--port", &port.to_string(), "--metrics", &addr]);
    tracer.wait_ready(WAIT);
    for _ in 0..5 {
        reset_and_graceful(&l, port);
    }
    tracer.wait_for(|v| v["event"] == "close", WAIT);
    std::thread::sleep(Duration::from_millis(1500)); // joins settle; lines are written
    let text = scrape(&addr);
    let out = tracer.stop();
    assert!(
        text.contains("# TYPE tracer_events_total counter"),
        "{text}"
    );
    // On a failure, the lines too: the metrics alone do not say which event went astray.
    let lines: Vec<String> = out.lines.iter().map(Value::to_string).collect();
    let lines = lines.join("\n");
    // Every (event, comm) the lines show has exactly that count in the metrics. (comm is the
    // thread's name, so one process can show several.)
    let mut counted = std::collections::BTreeMap::new();
    for v in out.lines.iter().filter(|v| v["comm"].is_string()) {
        let key = (v["event"].as_str().unwrap(), v["comm"].as_str().unwrap());
        *counted.entry(key).or_insert(0u64) += 1;
    }
    assert!(counted.len() >= 3, "{counted:?}");
    for ((event, comm), n) in &counted {
        let labels = format!("event=\"{event}\",comm=\"{comm}\"");
        assert_eq!(
            metric(&text, "tracer_events_total", &labels),
            *n,
            "{event} {comm}: {text}\n{lines}"
        );
    }
    let closer = out
        .lines
        .iter()
        .find(|v| v["event"] == "close" && v["outcome"] == "rst")
        .unwrap();
    let comm = closer["comm"].as_str().unwrap();
    let resets = format!("reason=\"TCP_ABORT_ON_CLOSE\",comm=\"{comm}\"");
    assert_eq!(
        metric(&text, "tracer_resets_total", &resets),
        5,
        "{text}\n{lines}"
    );
    let joined_closes = out
        .lines
        .iter()
        .filter(|v| v["event"] == "close" && v["wire"].is_object())
        .count() as u64;
    assert_eq!(
        metric(&text, "tracer_close_to_wire_seconds_count", ""),
        joined_closes,
        "{text}"
    );
    // The summary's kernel object, which nothing changed after the scrape (only this port is
    // traced and captured, and its connections were done).
    let summary = out.lines.last().unwrap();
    for counter in ["emitted", "filtered", "captured", "owner_table_full"] {
        assert_eq!(
            metric(
                &text,
                "tracer_kernel_counts_total",
                &format!("counter=\"{counter}\"")
            ),
            summary["kernel"][counter].as_u64().unwrap(),
            "{counter}: {text}\n{summary}"
        );
    }
    assert!(summary["kernel"]["emitted"].as_u64() > Some(0), "{summary}");
    // Joins and losses as the summary counts them; every loss source shows, at 0 too.
    for result in ["joined", "unjoined"] {
        assert_eq!(
            metric(&text, "tracer_joins_total", &format!("result=\"{result}\"")),
            summary[result].as_u64().unwrap(),
            "{result}: {text}\n{summary}"
        );
    }
    for source in ["ringbuf", "capture", "output", "hooks", "owner_table"] {
        let labels = format!("source=\"{source}\"");
        assert!(
            text.contains(&format!("tracer_lost_events_total{{{labels}}} ")),
            "{text}"
        );
        assert_eq!(
            metric(&text, "tracer_lost_events_total", &labels),
            summary["lost"][source].as_u64().unwrap(),
            "{source}: {text}"
        );
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/tracer.service"
    ))
    .unwrap()
    .replace("/usr/local/bin/tracer", TRACER);
    let dir = std::env::temp_dir().join(format!("tracer-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tracer.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("tracer.service"),
        "no warning about the unit: {stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_daemonset_grants_only_what_the_tracer_needs() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/daemonset.yaml"
    ))
    .unwrap();
    let ds: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(ds["kind"].as_str(), Some("DaemonSet"));
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        spec["hostPID"].as_bool(),
        Some(true),
        "attribution needs the host's PIDs"
    );
    let selector = &ds["spec"]["selector"]["matchLabels"];
    assert_eq!(selector, &ds["spec"]["template"]["metadata"]["labels"]);
    let container = &spec["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"].as_bool(), Some(false));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    let caps = &security["capabilities"];
    assert_eq!(caps["drop"][0].as_str(), Some("ALL"));
    let added: Vec<&str> = caps["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        added,
        ["BPF", "PERFMON", "NET_RAW", "NET_ADMIN", "SYS_ADMIN"]
    );
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // The arguments are the tracer's own: it must accept them.
    let out = Command::new(TRACER)
        .args(&args)
        .args(["--pid", "999999999"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no process with PID"),
        "arguments parse: {stderr}"
    );
}

#[test]
fn the_vector_pipeline_config_is_consistent() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/vector.toml"
    ))
    .unwrap();
    let config: toml::Table = text.parse().unwrap();
    let sources = config["sources"].as_table().unwrap();
    let transforms = config["transforms"].as_table().unwrap();
    let sinks = config["sinks"].as_table().unwrap();
    let defined: Vec<&String> = sources.keys().chain(transforms.keys()).collect();
    for (name, component) in transforms.iter().chain(sinks.iter()) {
        for input in component["inputs"].as_array().unwrap() {
            let input = input.as_str().unwrap();
            assert!(
                defined.iter().any(|d| *d == input),
                "{name} reads unknown {input}"
            );
        }
    }
    let file = &sources["tracer"];
    assert_eq!(file["type"].as_str(), Some("file"));
    // The file the systemd unit writes.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/tracer.service"
    ))
    .unwrap();
    let include = file["include"][0].as_str().unwrap();
    assert!(
        unit.contains(include),
        "vector reads what the unit writes: {include}"
    );
    // The remap parses JSON and the event time, which every tracer line has.
    let remap = transforms["tracer_json"]["source"].as_str().unwrap();
    assert!(remap.contains("parse_json!") && remap.contains(".time"));
}
