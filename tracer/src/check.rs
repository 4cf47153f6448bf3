//! `tracer check`: what this kernel and these privileges support, and which probes `tracer`
//! would attach. Exit 0 when tracing can work, 1 when it cannot.

use std::process::ExitCode;

use aya::{maps::MapType, sys::is_map_supported};
use serde::Serialize;

use crate::{
    capture, privileges,
    probes::{self, Hook, KernelSupport, ProbeMode, TRACEPOINT_HOOKS},
    tracefs,
};

#[derive(Serialize)]
struct Report {
    kernel: String,
    btf: bool,
    /// "mounted at PATH", "mounted now at PATH", or why not.
    tracefs: String,
    /// Whether tracefs could be read: without it no tracepoint can be seen, and the list of
    /// missing ones would blame the kernel.
    #[serde(skip)]
    tracefs_known: bool,
    kprobes: bool,
    ringbuf: Option<bool>,
    privileges: Privileges,
    tracepoints: Vec<TracepointReport>,
    rst_reasons: bool,
    /// How a close(2) or shutdown(2) is tied to its socket: "the closing task's registers"
    /// (no syscall tracepoints: the call is read when its socket moves in the task's own
    /// context), "descriptor" (the socket behind the fd, from the BTF) or "first socket moved"
    /// (without BTF).
    close_attribution: &'static str,
    /// Why calls are not named from the task's registers on this kernel (then the syscall
    /// tracepoints are attached), when they are not.
    registers_unusable: Option<String>,
    /// Whose addresses a RST sent by a listener shows: "the segment's addresses" (it answers
    /// a segment of a connection already gone), or the listener's own when the BTF has no
    /// `struct sk_buff` layout (with why).
    listener_resets: String,
    /// How a close that sends a RST gets it: one event from the kernel (the close held there
    /// until its RST is sent), or joined by the daemon with the RST's own event.
    abortive_closes: &'static str,
    /// Whether the end of a FIN_WAIT2 that times out (in its time-wait form) is seen, or why not.
    fin_wait2_timeouts: String,
    probe_mode: ProbeMode,
    /// The probes `tracer` would attach with this mode.
    would_attach: Option<Vec<String>>,
    /// Why it cannot trace, when it cannot.
    problem: Option<String>,
    capture_interfaces: Vec<String>,
    can_trace: bool,
}

#[derive(Serialize)]
struct Privileges {
    euid: u32,
    missing: Vec<&'static str>,
}

#[derive(Serialize)]
struct TracepointReport {
    name: String,
    present: bool,
    /// What the tracer loses without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    without: Option<&'static str>,
}

pub fn run(json: bool, mode: ProbeMode) -> anyhow::Result<ExitCode> {
    // A report piped into `head` ends quietly, as other tools' do, not with a panic on EPIPE.
    // (Only here: while tracing, a consumer gone is noticed and reported by the writer.)
    // SAFETY: setting a signal's disposition to its default has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let report = build(mode);
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_human(&report);
    }
    Ok(if report.can_trace {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn build(mode: ProbeMode) -> Report {
    let (tracefs_root, tracefs_text) = match tracefs::find() {
        Some(root) => (Some(root.clone()), format!("mounted at {}", root.display())),
        None => match tracefs::ensure_mounted() {
            Ok(root) => (
                Some(root.clone()),
                format!("mounted now at {}", root.display()),
            ),
            Err(e) => (None, format!("{e:#}")),
        },
    };
    let support = KernelSupport::detect(tracefs_root.as_deref()).unwrap_or_else(|_| {
        KernelSupport::detect(None).expect("detection without tracefs reads no files")
    });
    let missing_caps = privileges::effective()
        .map(|eff| privileges::missing_for_tracing(eff, true))
        .unwrap_or_default();
    let plan = plan(&support, mode);
    let ringbuf = is_map_supported(MapType::RingBuf).ok();
    let config = support
        .formats
        .config()
        .map(|_| ())
        .map_err(|e| e.to_string());
    // Without tracefs no tracepoint can be seen: the plan's "this kernel has no tracepoint"
    // would blame the kernel for what the mount explains.
    let tracefs_known = tracefs_root.is_some();
    let problem = [
        plan.as_ref().err().cloned().filter(|_| tracefs_known),
        config.err().filter(|_| tracefs_known),
        tracefs_root
            .is_none()
            .then(|| "tracefs is not available".to_string()),
        (!missing_caps.is_empty()).then(|| format!("missing {}", missing_caps.join(", "))),
        (ringbuf == Some(false)).then(|| "no BPF ring buffer (needs Linux 5.8)".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>();
    let can_trace = problem.is_empty();
    Report {
        kernel: support.release.clone(),
        btf: support.btf,
        tracefs: tracefs_text,
        tracefs_known,
        kprobes: support.kprobes,
        ringbuf,
        privileges: Privileges {
            // SAFETY: geteuid cannot fail.
            euid: unsafe { libc::geteuid() },
            missing: missing_caps,
        },
        tracepoints: TRACEPOINT_HOOKS
            .iter()
            .map(|h| TracepointReport {
                name: h.name(),
                present: support.has(h),
                without: (!support.has(h)).then_some(h.without),
            })
            .collect(),
        rst_reasons: !support.formats.reset_reasons().is_empty(),
        close_attribution: if support.calls_from_registers(mode.allows_raw()) {
            "the closing task's registers"
        } else if support.fd.is_ok() {
            "descriptor"
        } else {
            "first socket moved"
        },
        registers_unusable: support.regs.as_ref().err().cloned(),
        listener_resets: match &support.skb {
            Ok(_) => "the segment's addresses".to_string(),
            Err(why) => format!("the listener's own addresses (no struct sk_buff layout: {why})"),
        },
        abortive_closes: abortive_closes(&support, mode, plan.as_deref().unwrap_or_default()),
        fin_wait2_timeouts: match support.usable_timewait() {
            Ok(_) => "seen (the time-wait socket's timer)".to_string(),
            Err(why) => format!("not seen ({why})"),
        },
        probe_mode: mode,
        would_attach: plan
            .ok()
            .map(|hooks| hooks.iter().map(Hook::name).collect()),
        problem: (!problem.is_empty()).then(|| problem.join("; ")),
        capture_interfaces: capture::interface_names(),
        can_trace,
    }
}

fn plan(support: &KernelSupport, mode: ProbeMode) -> Result<Vec<Hook>, String> {
    let set = probes::choose(mode, support.kprobes).map_err(|e| e.to_string())?;
    let (hooks, _) = support
        .plan(set, mode.allows_raw())
        .map_err(|e| e.to_string())?;
    Ok(hooks)
}

/// See `Report::abortive_closes`: the kernel holds such a close where it names calls from the
/// task's registers and both hooks that release it are attached.
fn abortive_closes(support: &KernelSupport, mode: ProbeMode, hooks: &[Hook]) -> &'static str {
    if support.calls_from_registers(mode.allows_raw()) && probes::holds_aborts(hooks) {
        "one event with their RST (held in the kernel until it is sent)"
    } else {
        "joined with their RST's own event by the daemon (which waits up to 20 ms for it)"
    }
}

fn print_tracepoints(r: &Report) {
    println!("tracepoints");
    for tp in &r.tracepoints {
        match tp.without {
            None => println!("  ok       {}", tp.name),
            Some(why) => println!("  MISSING  {} ({why})", tp.name),
        }
    }
}

fn print_human(r: &Report) {
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("kernel        {}", r.kernel);
    println!("BTF           {}", yes(r.btf));
    println!("tracefs       {}", r.tracefs);
    println!("kprobes       {}", yes(r.kprobes));
    println!(
        "ring buffer   {}",
        r.ringbuf.map_or("unknown (needs privileges to probe)", yes)
    );
    println!("RST reasons   {}", yes(r.rst_reasons));
    println!(
        "close calls   tied to their socket by {}{}",
        r.close_attribution,
        r.registers_unusable
            .as_ref()
            .map_or(String::new(), |why| format!(" (not the registers: {why})"))
    );
    println!("listener RSTs show {}", r.listener_resets);
    println!("abortive closes {}", r.abortive_closes);
    println!("FIN_WAIT2 timeouts {}", r.fin_wait2_timeouts);
    println!(
        "privileges    euid {}{}",
        r.privileges.euid,
        if r.privileges.missing.is_empty() {
            String::new()
        } else {
            format!(", missing {}", r.privileges.missing.join(", "))
        }
    );
    if r.tracefs_known {
        print_tracepoints(r);
    } else {
        println!("tracepoints   not known: tracefs is not available (above)");
    }
    if let Some(names) = &r.would_attach {
        println!(
            "with --probes {}, tracer would attach: {}",
            r.probe_mode.name(),
            names.join(", ")
        );
    }
    if let Some(problem) = &r.problem {
        println!("problem: {problem}");
    }
    println!("capture interfaces: {}", r.capture_interfaces.join(", "));
    println!(
        "{}",
        if r.can_trace {
            "tracing can work here"
        } else {
            "tracing cannot work here"
        }
    );
}
