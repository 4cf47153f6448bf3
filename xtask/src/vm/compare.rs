//! The reports' own checks, and the comparison of the VM's normalized lines with the host's:
//! every difference must be listed in `EXPECTED` (and in docs/kernels.md); any other fails.

use serde_json::Value;

/// A known difference between the host kernel (6.18, tracepoints only) and Debian's 6.1: on
/// the lines it selects, `field` is `host` on the host and `vm` in the VM.
pub struct Expected {
    /// The VM's probe set (`auto` attaches the kprobes there), or both.
    pub probes: Option<&'static str>,
    pub scenario: Option<&'static str>,
    pub event: Option<&'static str>,
    pub end: Option<&'static str>,
    pub field: &'static str,
    /// JSON values.
    pub host: &'static str,
    pub vm: &'static str,
    pub why: &'static str,
}

pub const EXPECTED: &[Expected] = &[
    no_reason_before_6_10("\"TCP_ABORT_ON_CLOSE\""),
    no_reason_before_6_10("\"TCP_STATE\""),
];

/// The host names an RST's `reason` (`host`, a JSON value); 6.1 cannot (null).
const fn no_reason_before_6_10(host: &'static str) -> Expected {
    Expected {
        probes: None,
        scenario: None,
        event: None,
        end: None,
        field: "reason",
        host,
        vm: "null",
        why: "tcp:tcp_send_reset has no `reason` field before 6.10",
    }
}

/// Lines the VM may show that the host has no counterpart for, with why.
pub struct VmOnly {
    pub event: &'static str,
    /// A flag the line's `flags` (a `packet` line) or its wire's flags must hold.
    pub flag: &'static str,
    /// Only a line derived from the wire (`"derived":"wire"`), not one from a kernel event.
    pub derived: bool,
    pub why: &'static str,
}

/// A FIN sent again: under TCG a starved VM (a busy host) can stall past the 200 ms
/// retransmission timeout before the ACK is processed. The copy arrives after the join window
/// of the first, as a `packet` line (`retransmit: true`). Seen once in graceful_close while the
/// host compiled (the tracer then also took the copy for the peer's FIN reaching TIME_WAIT, a
/// derived `fin_received`: no longer, it knows the FIN's sequence number).
const RETRANSMITTED_FIN: &str =
    "a FIN retransmitted while the emulated VM stalled (TCG on a busy host): a packet line";

/// A RST the VM's timing made, from a TIME_WAIT socket or for a segment that matched no
/// socket: 6.1 has no tcp:tcp_send_reset for it.
const TIMING_RST: &str = "RSTs from a TIME_WAIT socket or for a segment that matched no socket \
     fire tcp:tcp_send_reset only since 6.10: on 6.1 they are seen only on the wire (a `packet` \
     line, or the `rst_received` derived for a peer in TIME_WAIT). Seen under TCG, when the \
     VM's timing made such a RST (graceful_close, shutdown_write)";

pub const VM_ONLY: &[VmOnly] = &[
    VmOnly {
        event: "packet",
        flag: "RST",
        derived: false,
        why: TIMING_RST,
    },
    VmOnly {
        event: "rst_received",
        flag: "RST",
        derived: true,
        why: TIMING_RST,
    },
    VmOnly {
        event: "packet",
        flag: "FIN",
        derived: false,
        why: RETRANSMITTED_FIN,
    },
];

/// Lines the host shows that a VM probe set cannot, with why.
pub struct HostOnly {
    /// The VM's probe set it applies to.
    pub probes: &'static str,
    pub event: &'static str,
    pub old_state: &'static str,
    pub new_state: &'static str,
    pub why: &'static str,
}

pub const HOST_ONLY: &[HostOnly] = &[HostOnly {
    probes: "tracepoint",
    event: "close",
    old_state: "CLOSE",
    new_state: "CLOSE",
    why: "a close of a socket already in CLOSE moves no state; it is told from the socket's \
          destruction inside the call, which needs calls named from the task's registers \
          (the syscall tracepoints of --probes tracepoint cannot place the destruction)",
}];

/// The index in HOST_ONLY of the rule that allows a host-only line in `mode`, if any.
fn allowed_host_only(line: &Value, mode: &str) -> Option<usize> {
    HOST_ONLY.iter().position(|rule| {
        rule.probes == mode
            && line["event"] == rule.event
            && line["old_state"] == rule.old_state
            && line["new_state"] == rule.new_state
    })
}

/// The index in VM_ONLY of the rule that allows a VM-only line, if any.
fn allowed_vm_only(line: &Value) -> Option<usize> {
    VM_ONLY.iter().position(|rule| {
        let flags = if rule.derived {
            &line["wire"]["flags"]
        } else {
            &line["flags"]
        };
        line["event"] == rule.event
            && (line["derived"] == "wire") == rule.derived
            && flags
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == rule.flag))
    })
}

/// The report's own pass/fail: every scenario's checks held.
pub fn own_checks(report: &Value, label: &str) -> Result<String, String> {
    let failures: Vec<String> = report["scenarios"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| {
            let name = s["name"].as_str().unwrap_or("?").to_string();
            s["failures"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |f| format!("{name}: {}", f.as_str().unwrap_or("?")))
        })
        .collect();
    if report["pass"] != true || !failures.is_empty() {
        return Err(format!("{label}: {}", failures.join("; ")));
    }
    let scenarios = report["scenarios"].as_array().map_or(0, Vec::len);
    Ok(format!(
        " ({scenarios} scenarios on {}, probes {})",
        report["kernel"].as_str().unwrap_or("?"),
        attached_kind(report)
    ))
}

/// "tracepoints", "raw tracepoints", "... +kprobes", from the ready line.
fn attached_kind(report: &Value) -> &'static str {
    match (
        attached_any(report, "raw_tracepoint:"),
        kprobes_attached(report),
    ) {
        (true, true) => "raw tracepoints+kprobes",
        (true, false) => "raw tracepoints",
        (false, true) => "tracepoints+kprobes",
        (false, false) => "tracepoints",
    }
}

fn kprobes_attached(report: &Value) -> bool {
    attached_any(report, "kprobe:")
}

fn attached_any(report: &Value, prefix: &str) -> bool {
    report["ready"]["probes"].as_array().is_some_and(|p| {
        p.iter()
            .any(|n| n.as_str().is_some_and(|n| n.starts_with(prefix)))
    })
}

/// A VM report: its own checks, the probe set `mode` must pick there, and its lines against
/// the host's.
pub fn vm_checks(vm: &Value, host: Option<&Value>, mode: &str) -> Result<String, String> {
    let note = own_checks(vm, mode)?;
    let kprobes = kprobes_attached(vm);
    let would = vm["check"]["would_attach"].to_string();
    match mode {
        "auto" if !kprobes || !would.contains("kprobe:tcp_close") => {
            return Err(format!(
                "--probes auto attached no kprobes on a kernel that has them (check: {would})"
            ));
        }
        "tracepoint" if kprobes => return Err("--probes tracepoint attached kprobes".into()),
        _ => {}
    }
    // Debian's 6.1 has BTF: auto takes the raw tracepoints, --probes tracepoint the classic
    // ones, so both program sets run on 6.1.
    let raw = attached_any(vm, "raw_tracepoint:inet_sock_set_state");
    match mode {
        "auto" if !raw => {
            return Err(
                "--probes auto did not attach inet_sock_set_state as a raw tracepoint \
                        on a kernel with BTF"
                    .into(),
            );
        }
        "tracepoint" if attached_any(vm, "raw_tracepoint:") => {
            return Err("--probes tracepoint attached raw tracepoints".into());
        }
        _ => {}
    }
    let host = host.ok_or("no host report to compare with")?;
    let (diffs, applied) = differences(host, vm, mode);
    if diffs.is_empty() {
        let mut whys: Vec<&str> = applied
            .iter()
            .map(|&i| match i.checked_sub(EXPECTED.len()) {
                Some(j) => match j.checked_sub(VM_ONLY.len()) {
                    Some(k) => HOST_ONLY[k].why,
                    None => VM_ONLY[j].why,
                },
                None => EXPECTED[i].why,
            })
            .collect();
        whys.dedup(); // two EXPECTED entries (one per reason value) share one why
        Ok(format!("{note}; expected differences: {}", whys.join(", ")))
    } else {
        Err(format!(
            "unexpected differences from the host (add them to EXPECTED in xtask/src/vm/compare.rs \
             and to docs/kernels.md only if the kernel is right): {}",
            diffs.join("; ")
        ))
    }
}

/// Per scenario: the host's lines with the expected differences applied, against the VM's.
/// Returns the unexpected differences and the indices of the `EXPECTED` entries that applied.
fn differences(host: &Value, vm: &Value, mode: &str) -> (Vec<String>, Vec<usize>) {
    let mut out = Vec::new();
    let mut applied = Vec::new();
    for h in host["scenarios"].as_array().into_iter().flatten() {
        let name = h["name"].as_str().unwrap_or("?");
        let Some(v) = vm["scenarios"]
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == name))
        else {
            out.push(format!("{name}: missing in the VM"));
            continue;
        };
        let mut want: Vec<Value> = lines(h)
            .iter()
            .map(|l| expected_in_vm(l, name, mode, &mut applied))
            .collect();
        let mut got = lines(v);
        // Lines common to both leave; what remains on either side is a difference.
        want.retain(|w| match got.iter().position(|g| g == w) {
            Some(i) => {
                got.remove(i);
                false
            }
            None => true,
        });
        for w in want {
            match allowed_host_only(&w, mode) {
                // Indices past EXPECTED's and VM_ONLY's name HOST_ONLY rules.
                Some(k) => applied.push(EXPECTED.len() + VM_ONLY.len() + k),
                None => out.push(format!("{name}: only on the host: {w}")),
            }
        }
        for g in got {
            match allowed_vm_only(&g) {
                // Indices past EXPECTED's name VM_ONLY rules.
                Some(j) => applied.push(EXPECTED.len() + j),
                None => out.push(format!("{name}: only in the VM: {g}")),
            }
        }
    }
    applied.sort_unstable();
    applied.dedup();
    (out, applied)
}

fn lines(scenario: &Value) -> Vec<Value> {
    scenario["lines"].as_array().cloned().unwrap_or_default()
}

/// A host line as the VM should print it.
fn expected_in_vm(line: &Value, scenario: &str, mode: &str, applied: &mut Vec<usize>) -> Value {
    let mut line = line.clone();
    for (i, e) in EXPECTED.iter().enumerate() {
        let selects = e.probes.is_none_or(|p| p == mode)
            && e.scenario.is_none_or(|s| s == scenario)
            && e.event.is_none_or(|ev| line["event"] == ev)
            && e.end.is_none_or(|end| line["end"] == end);
        let host: Value = serde_json::from_str(e.host).expect("EXPECTED holds JSON");
        if selects && line.get(e.field) == Some(&host) {
            line[e.field] = serde_json::from_str(e.vm).expect("EXPECTED holds JSON");
            applied.push(i);
        }
    }
    line
}

/// A `--pid` run in the VM while processes it does not trace churned connections: it loaded
/// (the 6.1 verifier accepted the filter's paths), its programs ran and filtered in the kernel,
/// and nothing of the untraced processes came out: no event, no captured packet.
pub fn pid_filter_checks(text: &str, args: &str) -> Result<String, String> {
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let event = |name: &str| lines.iter().find(|l| l["event"] == name);
    let fail = |why: &str| Err(format!("tracer {args}: {why}; output: {}", text.trim()));
    let Some(ready) = event("ready") else {
        return fail("no ready line (did the programs load?)");
    };
    // With --pid, the program following forked children must load on every kernel.
    let follows_forks = ready["probes"]
        .as_array()
        .is_some_and(|p| p.iter().any(|n| n == "tracepoint:task:task_newtask"));
    if !follows_forks {
        return fail("task:task_newtask is not attached (forked children's calls unknown)");
    }
    let Some(summary) = event("summary") else {
        return fail("no summary line");
    };
    let kernel = &summary["kernel"];
    let (filtered, emitted, captured) = (
        kernel["filtered"].as_u64().unwrap_or(0),
        kernel["emitted"].as_u64().unwrap_or(u64::MAX),
        kernel["captured"].as_u64().unwrap_or(u64::MAX),
    );
    if filtered == 0 {
        return fail("the kernel filtered nothing while other processes churned");
    }
    if emitted != 0 || captured != 0 {
        return fail(&format!(
            "untraced processes' events ({emitted}) or packets ({captured}) passed the filter"
        ));
    }
    Ok(format!(
        " ({filtered} events of untraced processes filtered in the kernel)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(lines: Vec<Value>) -> Value {
        json!({"scenarios": [{"name": "unread_close", "lines": lines}]})
    }

    #[test]
    fn an_expected_difference_passes_and_another_fails() {
        let host = report(vec![
            json!({"event": "close", "end": "server", "reason": "TCP_ABORT_ON_CLOSE"}),
        ]);
        let vm = report(vec![
            json!({"event": "close", "end": "server", "reason": null}),
        ]);
        let (diffs, applied) = differences(&host, &vm, "auto");
        assert!(diffs.is_empty(), "{diffs:?}");
        assert_eq!(applied, [0]);
        let odd = report(vec![
            json!({"event": "close", "end": "server", "reason": "TCP_STATE"}),
        ]);
        let (diffs, _) = differences(&host, &odd, "auto");
        assert_eq!(diffs.len(), 2, "{diffs:?}");
    }

    #[test]
    fn a_vm_only_rst_packet_is_expected_and_other_vm_only_lines_are_not() {
        let host = report(vec![json!({"event": "close", "end": "server"})]);
        let vm = report(vec![
            json!({"event": "close", "end": "server"}),
            json!({"event": "packet", "end": "client", "dir": "in", "flags": ["RST"]}),
        ]);
        let (diffs, applied) = differences(&host, &vm, "auto");
        assert!(diffs.is_empty(), "{diffs:?}");
        assert_eq!(applied, [EXPECTED.len()]);
        let vm = report(vec![
            json!({"event": "close", "end": "server"}),
            json!({"event": "rst_received", "end": "server", "derived": "wire",
                   "wire": {"dir": "in", "flags": ["RST"]}}),
        ]);
        let (diffs, applied) = differences(&host, &vm, "auto");
        assert!(diffs.is_empty(), "{diffs:?}");
        assert_eq!(applied, [EXPECTED.len() + 1]);
        let vm = report(vec![
            json!({"event": "close", "end": "server"}),
            json!({"event": "packet", "end": "client", "dir": "in", "flags": ["SYN"]}),
            json!({"event": "fin_received", "end": "server", "derived": "wire",
                   "wire": {"flags": ["FIN"]}}),
            json!({"event": "rst_received", "end": "server", "wire": {"flags": ["RST"]}}),
        ]);
        assert_eq!(differences(&host, &vm, "auto").0.len(), 3);
    }

    #[test]
    fn a_retransmitted_fin_may_show_only_in_the_vm() {
        let host = report(vec![json!({"event": "close", "end": "server"})]);
        let vm = report(vec![
            json!({"event": "close", "end": "server"}),
            json!({"event": "packet", "end": "client", "dir": "in", "flags": ["FIN", "ACK"]}),
        ]);
        let (diffs, applied) = differences(&host, &vm, "auto");
        assert!(diffs.is_empty(), "{diffs:?}");
        assert_eq!(applied, [EXPECTED.len() + 2]);
    }

    #[test]
    fn every_expected_difference_is_json() {
        for e in EXPECTED {
            serde_json::from_str::<Value>(e.host).unwrap();
            serde_json::from_str::<Value>(e.vm).unwrap();
        }
    }
}
