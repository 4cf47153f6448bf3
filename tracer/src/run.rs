//! One trace run: load and attach, seed owners, open the capture, print `ready`, then drain the
//! ring buffer and the capture into the pipeline until a signal, --duration, or the exit of
//! every traced process; then flush pending joins and print the summary.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracer_common::{RegsLayout, TimewaitLayout, counter};

use crate::{
    capture::{self, CaptureConfig, CaptureHandle, CaptureParts, WirePacket},
    cli::{BadInput, Settings},
    clock::{SharedClock, now_mono_ns, rfc3339_nanos},
    held::{self, HeldCloses},
    kernel::KernelEvent,
    lines::{Format, LostLine},
    metrics::{self, Metrics},
    output::Output,
    owners,
    pcapng::PcapngOut,
    pipeline::Pipeline,
    privileges,
    probes::{self, Hook, KernelSupport, LoadOptions, TableSizes},
    progstats::{self, SkippedRuns},
    stats::{KernelCounts, Lost, OwnCost, Percentiles},
    tracefs,
};

const TICK: Duration = Duration::from_millis(20);
const CLOCK_REFRESH: Duration = Duration::from_secs(1);
const PID_CHECK: Duration = Duration::from_millis(200);
/// How often the kernel's and the capture's loss counters are read and reported: each read
/// is a dozen bpf() calls, which an idle tracer made 300 times a second at every tick.
const REPORT_EVERY: Duration = Duration::from_millis(100);
/// How long the run goes on after the traced processes exited even with no connection of
/// theirs known to be closing: the kernel finishes some closes after a process is gone, in a
/// kernel worker (an io_uring ring's exit work releasing the socket it held, ~30 ms later; a
/// deferred fput), and those connections had no event yet.
const AFTER_EXIT: Duration = Duration::from_millis(500);
/// How often the followed children that exited are forgotten while the traced processes run
/// (a forking server may have thousands over a run).
const FOLLOWED_SWEEP: Duration = Duration::from_secs(2);
/// How often the closes held in the kernel are looked at (see `held`).
const HELD_CHECK: Duration = Duration::from_millis(250);

/// How long the end of the run waits for the output's consumer to take what is queued (up to
/// QUEUE_LINES lines): a consumer that is stopped, or slower than that, would otherwise keep
/// the tracer from stopping (`systemctl stop` ending in SIGKILL, the summary lost). What it
/// has not taken by then is dropped, counted as lost output.
const STOP_DRAIN: Duration = Duration::from_secs(5);
/// How long the summary (after that drop) may take to be written before the tracer gives up on
/// its consumer, puts the summary on stderr and exits.
const LAST_WRITE: Duration = Duration::from_secs(2);
/// What is left of each wait once a second stop signal came.
const HURRIED: Duration = Duration::from_millis(200);

/// SIGINT and SIGTERM stop the run; SIGHUP reopens the output file.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    /// A stop signal came while the run was ending: the remaining waits are cut short.
    hurried: bool,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
            hurried: false,
        })
    }

    /// Sleeps for `pause` while the run ends; a stop signal cuts it short and the remaining
    /// waits too (the user pressed Ctrl-C again).
    async fn pause_while_ending(&mut self, pause: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = self.interrupt.recv() => self.hurried = true,
            _ = self.terminate.recv() => self.hurried = true,
        }
    }

    /// Waits until the writer has written (or counted as dropped) everything handed over, for
    /// at most `within` (HURRIED once a second stop signal came); returns whether it has.
    async fn wait_written(&mut self, output: &Output, within: Duration) -> bool {
        let Some(written) = output.request_written() else {
            return true; // the writer ended: nothing is left to write
        };
        let until = Instant::now() + if self.hurried { HURRIED } else { within };
        loop {
            match written.try_recv() {
                Ok(()) | Err(std::sync::mpsc::TryRecvError::Disconnected) => return true,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let hurried = self.hurried;
            self.pause_while_ending(left.min(Duration::from_millis(10)))
                .await;
            if self.hurried && !hurried {
                return false;
            }
        }
    }
}

/// Why the run ended.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Signal,
    Duration,
    TracedProcessesExited,
    ConsumerGone,
}

pub fn trace(settings: Settings) -> anyhow::Result<()> {
    privileges::require_for_tracing(settings.capture_iface.is_some())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(trace_async(settings))
}

async fn trace_async(settings: Settings) -> anyhow::Result<()> {
    let tracefs = tracefs::ensure_mounted()?;
    let support = KernelSupport::detect(Some(&tracefs))?;
    let set = probes::choose(settings.probes, support.kprobes)?;
    let raw = settings.probes.allows_raw();
    let (hooks, missing) = support.plan(set, raw)?;
    let mut config = support.formats.config()?;
    match &support.sock {
        Ok(layout) => config.sock = *layout,
        Err(why) if raw => eprintln!(
            "tracer: the kernel's BTF gave no struct sock layout ({why}): using the classic \
             tracepoints, not raw ones (they cost more per event)"
        ),
        Err(_) => {}
    }
    match &support.fd {
        Ok(layout) => config.fd = *layout,
        Err(why) => eprintln!(
            "tracer: the kernel's BTF gave no path from a descriptor to its socket ({why}): a \
             close(2) or shutdown(2) is taken to act on the first socket that moves during it"
        ),
    }
    match &support.regs {
        Ok(regs) if raw => config.regs = *regs,
        Err(why) if raw => eprintln!(
            "tracer: close and shutdown cannot be named from the task's registers here ({why}): \
             attaching the syscall tracepoints, which slow every syscall on the host a little"
        ),
        _ => {}
    }
    match &support.skb {
        Ok(layout) => config.skb = *layout,
        Err(why) => eprintln!(
            "tracer: the kernel's BTF gave no struct sk_buff layout ({why}): a RST a listener \
             sends (a segment for a connection already gone) shows the listener's addresses"
        ),
    }
    match support.usable_timewait() {
        Ok(layout) => {
            let record_timer = config.timewait.record_timer;
            config.timewait = TimewaitLayout {
                record_timer,
                ..*layout
            };
        }
        Err(why) => eprintln!(
            "tracer: no time-wait socket layout ({why}): a FIN_WAIT2 that times out (the peer \
             never sent its FIN) shows no end"
        ),
    }
    config.filter_pids = u8::from(!settings.pids.is_empty());
    if settings.pids.len() <= config.inline_pids.len() {
        config.inline_pids[..settings.pids.len()].copy_from_slice(&settings.pids);
    }
    config.filter_ports = u8::from(!settings.ports.is_empty());
    config.all_states = u8::from(settings.all_states);
    config.noop = u8::from(settings.noop);
    config.loopback_ifindex = crate::capture::loopback_ifindex();
    // Wake the reader when a quarter of the ring is used; below that it drains every tick.
    config.wakeup_bytes = settings.ringbuf_bytes / 4;
    config.hold_aborts = u8::from(probes::holds_aborts(&hooks));
    for hook in &missing {
        eprintln!(
            "tracer: {} is not available on this kernel: {}",
            hook.name(),
            hook.without
        );
    }

    let output = Output::start(settings.destination.clone()).map_err(|e| {
        BadInput(format!(
            "cannot write the output ({e}): choose a writable path for -o"
        ))
    })?;
    // The traced processes' other network namespaces (containers), read once from /proc.
    let namespaces = other_namespaces(&settings.pids);
    let capture = open_capture(&settings, &namespaces)?;
    // Opened before the capabilities go, like every other file.
    let pcapng = match (&settings.pcapng, &capture) {
        (Some(path), Some(capture)) => Some(
            PcapngOut::create(path, capture.linktype, &capture.other_linktypes)
                .map_err(|e| BadInput(format!("{e:#}: choose a writable path for -w")))?,
        ),
        _ => None,
    };
    let host_tables = TableSizes::for_host(crate::sockets::tcp_sockets_allocated().unwrap_or(0));
    let mut options = LoadOptions {
        config,
        ringbuf_bytes: settings.ringbuf_bytes,
        pids: &settings.pids,
        ports: &settings.ports,
        tables: TableSizes {
            socks: settings.owner_table_entries.unwrap_or(host_tables.socks),
            ..host_tables
        },
    };
    let mut loaded = match probes::load(&options, &hooks) {
        // A kernel whose verifier refuses the programs that read the task's registers (a
        // backported BPF, an unusual configuration) still has the syscall tracepoints. Only a
        // refusal by the verifier: missing privileges or memory would fail the same way again.
        Err(e)
            if options.config.regs != RegsLayout::NONE
                && e.downcast_ref::<probes::VerifierRefused>().is_some() =>
        {
            eprintln!(
                "tracer: loading the programs that name calls from the task's registers failed \
                 ({e:#}): trying again with the syscall tracepoints"
            );
            options.config.regs = RegsLayout::NONE;
            let (hooks, _) = support.plan_with_syscall_hooks(set, raw)?;
            probes::load(&options, &hooks)?
        }
        loaded => loaded?,
    };
    let lineage = owners::lineage(&settings.pids);
    owners::follow_children(&mut loaded.ebpf, &lineage.children)
        .context("following the traced processes' running children")?;
    let sock = &options.config.sock;
    let netns_known = sock.net != tracer_common::NONE && sock.net_inum != tracer_common::NONE;
    let seeded = owners::seed(&mut loaded.ebpf, &settings.pids, &lineage, netns_known)
        .context("seeding owners of existing connections")?;
    warn_about_seeding(&seeded, options.tables.seed, !settings.pids.is_empty());
    warn_about_pids(&settings.pids);
    if let Some(capture) = &capture {
        warn_about_other_namespaces(&namespaces, capture);
    }
    if let Some(capture) = &capture
        && !settings.pids.is_empty()
    {
        for &fd in &capture.fds {
            // SAFETY: the capture sockets stay open as long as `capture`, which outlives
            // this call.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            probes::filter_capture_to_traced(&mut loaded.ebpf, fd);
        }
        capture.start_delivering();
    }
    let ring = RingBuf::try_from(
        loaded
            .ebpf
            .take_map("EVENTS")
            .context("EVENTS map missing")?,
    )?;
    let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
        loaded
            .ebpf
            .take_map("COUNTERS")
            .context("COUNTERS map missing")?,
    )?;
    let skipped = SkippedRuns::new(&loaded.ebpf);
    let followed = owners::Followed::new(&mut loaded.ebpf)?;
    let inline_pids = settings.pids.len() <= tracer_common::INLINE_PIDS;
    let traced = owners::TracedPids::new(&mut loaded.ebpf, &settings.pids, inline_pids)?;
    let held = HeldCloses::new(HashMap::try_from(
        loaded
            .ebpf
            .take_map("HELD_CLOSES")
            .context("HELD_CLOSES map missing")?,
    )?);
    privileges::drop_all().context("dropping capabilities after attaching")?;

    let metrics = match settings.metrics {
        Some(addr) => {
            let metrics = std::sync::Arc::new(Metrics::new());
            let bound = metrics::serve(addr, metrics.clone())
                .await
                .map_err(|e| BadInput(metrics_bind_error(&e, addr)))?;
            eprintln!("tracer: metrics on http://{bound}/metrics");
            Some(metrics)
        }
        None => None,
    };
    let mut pipeline = Pipeline::new(
        settings.join_window,
        support.formats.reset_reasons(),
        !settings.pids.is_empty(),
        settings.format,
        metrics.clone(),
    )
    .capturing(settings.capture_iface.is_some())
    .rfc1337(sysctl_on("net/ipv4/tcp_rfc1337"));
    if let Some(file) = pcapng {
        pipeline.write_pcapng(file);
    }
    if !settings.pids.is_empty() && capture.is_some() {
        pipeline.know_watched(
            owners::WatchedTuples::take(&mut loaded.ebpf).context("reading WATCHED")?,
        );
    }
    // Handlers before `ready`: whoever waits for `ready` may signal at once.
    let signals = Signals::install()?;
    output.line(ready_line(
        &pipeline,
        &loaded.attached,
        &missing,
        &capture,
        &settings,
        seeded,
    ));
    pipeline.stats.count_line("ready");
    let mut signals = signals;
    let stop = event_loop(
        &settings,
        &mut pipeline,
        &output,
        ring,
        Kernel {
            counters: &counters,
            skipped: &skipped,
            held,
            followed,
            traced,
            tables: options.tables,
        },
        capture,
        &mut signals,
    )
    .await?;
    if stop == Stop::TracedProcessesExited {
        // Also when they were gone before `ready` (exited during the start-up): say why the
        // run ended by itself.
        eprintln!("tracer: every traced process has exited (and its children): the run ends");
    }
    output.line(summary_line(&pipeline, settings.format));
    if !signals.wait_written(&output, LAST_WRITE).await {
        give_up_on_the_consumer(&mut pipeline, &output, settings.format);
    }
    output.finish().context("writing output")?;
    if let Some(path) = &settings.program_stats {
        std::fs::write(path, progstats::program_costs(&loaded.ebpf).to_string())
            .context("writing the program accounting")?;
    }
    drop(loaded);
    Ok(())
}

fn open_capture(
    settings: &Settings,
    namespaces: &[capture::Namespace],
) -> anyhow::Result<Option<CaptureHandle>> {
    let Some(iface) = &settings.capture_iface else {
        return Ok(None);
    };
    let names = capture::interface_names();
    if iface != "any" && !names.iter().any(|n| n == iface) {
        return Err(BadInput(format!(
            "unknown interface {iface:?}: use one of {} (or --no-capture)",
            names.join(", ")
        ))
        .into());
    }
    let cfg = CaptureConfig {
        iface: iface.clone(),
        ports: settings.ports.clone(),
        keep_headers: settings.pcapng.is_some(),
        held: !settings.pids.is_empty(),
        // On `any` only: a capture of one interface is what the user asked for.
        namespaces: if iface == "any" {
            namespaces.to_vec()
        } else {
            Vec::new()
        },
    };
    capture::open(&cfg, SharedClock::new())
        .with_context(|| format!("opening the packet capture on {iface}"))
        .map(Some)
}

/// Drains kernel events and packets until a stop condition, then flushes.
async fn event_loop(
    settings: &Settings,
    pipeline: &mut Pipeline,
    output: &Output,
    ring: RingBuf<MapData>,
    mut kernel: Kernel<'_>,
    capture: Option<CaptureHandle>,
    signals: &mut Signals,
) -> anyhow::Result<Stop> {
    // SAFETY: the RingBuf owns its fd and keeps it open and unchanged until it is dropped,
    // which happens only with the AsyncFd that owns it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let (mut packets, capture_stats, shared_clock, _capture_guard) = match capture {
        Some(handle) => {
            let CaptureParts {
                rx,
                stats,
                clock,
                guard,
            } = handle.into_parts();
            (Some(rx), Some(stats), Some(clock), Some(guard))
        }
        None => (None, None, None, None),
    };
    let mut tick = tokio::time::interval(TICK);
    let deadline = settings.duration.map(|d| Instant::now() + d);
    let mut last_clock = Instant::now();
    let mut last_pid_check = Instant::now();
    let mut last_held_check = Instant::now();
    let mut last_sweep = Instant::now();
    // Once every traced process has exited: when that was seen, and until when their
    // connections' teardown is followed.
    let mut after_exit: Option<(Instant, Instant)> = None;
    let mut reporter = LossReporter {
        reported: Lost::default(),
        published: Lost::default(),
        kernel_reported: KernelCounts::default(),
        format: settings.format,
        metrics: pipeline_metrics(pipeline),
        awaiting_forgotten_said: false,
    };

    let mut last_report = Instant::now();
    let stop = loop {
        // What the last turn produced goes to the writer in one batch.
        output.hand_over();
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain_ring(guard.get_inner_mut(), pipeline);
                guard.clear_ready();
            }
            Some(pkt) = recv_packet(&mut packets) => {
                pipeline.reading_at(now_mono_ns());
                pipeline.packet(pkt);
                drain_packets(&mut packets, pipeline);
            }
            _ = tick.tick() => {
                drain_ring(ring.get_mut(), pipeline);
                drain_packets(&mut packets, pipeline);
                pipeline.poll(now_mono_ns(), output);
                if last_report.elapsed() >= REPORT_EVERY {
                    last_report = Instant::now();
                    reporter.report(pipeline, output, &kernel, capture_stats.as_deref(), false);
                }
                if last_clock.elapsed() >= CLOCK_REFRESH {
                    last_clock = Instant::now();
                    pipeline.clock = crate::clock::Clock::sample();
                    if let Some(clock) = &shared_clock {
                        clock.refresh();
                    }
                }
                if output.state.consumer_gone.load(Ordering::Relaxed) {
                    break Stop::ConsumerGone;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break Stop::Duration;
                }
                if last_held_check.elapsed() >= HELD_CHECK {
                    last_held_check = Instant::now();
                    let older_than = now_mono_ns().saturating_sub(held::RESCUE_AFTER.as_nanos() as u64);
                    take_held_closes(&mut kernel.held, older_than, pipeline);
                }
                if last_pid_check.elapsed() >= PID_CHECK {
                    last_pid_check = Instant::now();
                    let traced_gone = kernel.traced.forget_exited();
                    // One pass over the followed children serves both: forgetting the ones
                    // that exited, and (once the traced processes are gone) whether any runs.
                    let children_run = (traced_gone || last_sweep.elapsed() >= FOLLOWED_SWEEP)
                        .then(|| {
                            last_sweep = Instant::now();
                            kernel.followed.forget_exited()
                        });
                    if traced_gone && children_run == Some(false) {
                        let closing = pipeline.closing_connections();
                        let (exited, until) = *after_exit.get_or_insert_with(|| {
                            (Instant::now(), announce_teardown_wait(closing, settings))
                        });
                        let now = Instant::now();
                        if (closing == 0 && now >= exited + AFTER_EXIT) || now >= until {
                            break Stop::TracedProcessesExited;
                        }
                    }
                }
            }
            _ = signals.interrupt.recv() => break Stop::Signal,
            _ = signals.terminate.recv() => break Stop::Signal,
            _ = signals.hangup.recv() => output.state.reopen.store(true, Ordering::Relaxed),
        }
    };
    if stop != Stop::ConsumerGone {
        finish_joins(
            settings,
            pipeline,
            output,
            ring.get_mut(),
            &mut packets,
            signals,
        )
        .await;
    }
    take_held_closes(&mut kernel.held, u64::MAX, pipeline);
    if pipeline.stats.kernel.held_closes_rescued > 0 {
        eprintln!(
            "tracer: {} close(s) held in the kernel for their RST were never released there and \
             went out without it (please report: a teardown path the programs do not know)",
            pipeline.stats.kernel.held_closes_rescued
        );
    }
    pipeline.flush(output);
    // Lines the writer fails to write are counted only once it has tried them. A consumer
    // that takes nothing (stopped) or too little gets STOP_DRAIN, or until another stop
    // signal: what it has not taken then is dropped, counted, and the summary says so.
    if !signals.wait_written(output, STOP_DRAIN).await {
        output.discard_unwritten();
        let _ = signals.wait_written(output, LAST_WRITE).await;
    }
    reporter.report(pipeline, output, &kernel, capture_stats.as_deref(), true);
    pipeline.stats.own_cost_at_stop = Some(OwnCost::now());
    Ok(stop)
}

/// The output's consumer took nothing, not even the summary, for LAST_WRITE after the stop
/// (and the lines before it for STOP_DRAIN): the writer is stuck in a write it cannot finish.
/// Says so on stderr with the summary (counting what was not written as lost) and exits 1:
/// waiting on would end in SIGKILL with nothing said.
fn give_up_on_the_consumer(pipeline: &mut Pipeline, output: &Output, format: Format) -> ! {
    let unwritten = output.abandon();
    pipeline.stats.lost.output = output.state.dropped.load(Ordering::Relaxed);
    eprintln!(
        "tracer: stopped, but the output's reader is not reading: {unwritten} line(s) were \
         not written (counted as lost; the last of them may sit in the pipe), the summary among \
         them (it follows here); the reader must keep reading until the tracer exits (or use \
         -o FILE)"
    );
    eprintln!("{}", summary_line(pipeline, format));
    std::process::exit(1);
}

/// Whether the sysctl at /proc/sys/`name` is set (not 0), in the daemon's network namespace
/// (the host's, usually; a namespace of its own may differ: not read there).
fn sysctl_on(name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/{name}"))
        .is_ok_and(|v| v.trim().parse::<u64>().is_ok_and(|v| v != 0))
}

/// A process's exit closes its sockets, and their teardown goes on without it: a FIN queued
/// behind data leaves when the data has, an orphan in FIN_WAIT2 waits for the peer's FIN (or
/// for tcp_fin_timeout), the peers answer. The run follows that for as long as the kernel
/// keeps such a socket (tcp_fin_timeout, plus the join window for its last packet) and ends
/// as soon as none of the connections seen is still closing. Says so when it waits; returns
/// the latest end.
fn announce_teardown_wait(closing: usize, settings: &Settings) -> Instant {
    let fin_timeout = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(60);
    let most = Duration::from_secs(fin_timeout) + settings.join_window + Duration::from_secs(1);
    if closing > 0 {
        eprintln!(
            "tracer: every traced process has exited; following the teardown of {closing} \
             connection(s) still closing, for at most {} s (SIGINT stops now)",
            most.as_secs()
        );
    }
    Instant::now() + most
}

fn pipeline_metrics(pipeline: &Pipeline) -> Option<std::sync::Arc<Metrics>> {
    pipeline.metrics()
}

async fn recv_packet(rx: &mut Option<mpsc::Receiver<WirePacket>>) -> Option<WirePacket> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn drain_packets(rx: &mut Option<mpsc::Receiver<WirePacket>>, pipeline: &mut Pipeline) {
    if let Some(rx) = rx {
        while let Ok(pkt) = rx.try_recv() {
            pipeline.packet(pkt);
        }
    }
}

/// `--pid 1`, said once: init's children are every process (they are followed), so it traces
/// the whole host, which is rarely what was meant. (A kernel thread is refused as bad input.)
fn warn_about_pids(pids: &[u32]) {
    if pids.contains(&1) {
        eprintln!(
            "tracer: --pid 1 is init: every process descends from it and children are followed, \
             so this traces every connection of the host; give the service's own PID to narrow it"
        );
    }
}

/// What to say when the metrics endpoint cannot be bound: a port below 1024 needs a privilege
/// the daemon gave up once started (even as root), anything else wants another address.
fn metrics_bind_error(e: &anyhow::Error, addr: std::net::SocketAddr) -> String {
    let denied = e
        .downcast_ref::<std::io::Error>()
        .or_else(|| e.root_cause().downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied);
    if denied && addr.port() < 1024 {
        format!(
            "--metrics {addr}: ports below 1024 need CAP_NET_BIND_SERVICE, which the tracer \
             gives up once started; choose a port of 1024 or above (9464 is usual)"
        )
    } else {
        format!("{e:#}: choose a free address for --metrics")
    }
}

/// The network namespaces of the traced processes other than this one (a container's), each
/// with the first traced process in it. The programs trace their sockets (they see every
/// namespace), but that namespace's loopback traffic never crosses an interface here.
fn other_namespaces(pids: &[u32]) -> Vec<capture::Namespace> {
    let netns = |pid: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .map(|link| link.to_string_lossy().into_owned())
    };
    let Some(ours) = netns("self") else {
        return Vec::new();
    };
    let mut found: Vec<capture::Namespace> = Vec::new();
    for &pid in pids {
        // Gone, or not ours to read: nothing to capture there.
        let Some(id) = netns(&pid.to_string()) else {
            continue;
        };
        if id != ours && !found.iter().any(|ns| ns.id == id) {
            found.push(capture::Namespace { pid, id });
        }
    }
    found
}

/// Says once per namespace what the capture sees of a traced process in another network
/// namespace: without it, its loopback connections' lines would have `wire: null` with nothing
/// saying why.
fn warn_about_other_namespaces(namespaces: &[capture::Namespace], capture: &CaptureHandle) {
    for ns in namespaces {
        let (pid, id) = (ns.pid, &ns.id);
        let nsenter = format!(
            "run the tracer there: nsenter --net=/proc/{pid}/ns/net tracer --pid {pid} ..."
        );
        if capture.namespaces.contains(ns) {
            eprintln!(
                "tracer: --pid {pid} is in another network namespace ({id}): its loopback is \
                 captured too, as {}; its other traffic where it crosses an interface of this \
                 namespace (its veth)",
                ns.loopback_name()
            );
        } else if let Some((_, why)) = capture.unreachable.iter().find(|(n, _)| n == ns) {
            eprintln!(
                "tracer: --pid {pid} is in another network namespace ({id}): its loopback could \
                 not be captured ({why}), and its loopback connections have wire null; to \
                 capture inside it, {nsenter}"
            );
        } else {
            eprintln!(
                "tracer: --pid {pid} is in another network namespace ({id}): the capture on {} \
                 sees its traffic only where it crosses that interface, and its loopback \
                 connections have wire null; capture on any (the default) to include its \
                 loopback, or {nsenter}",
                capture.iface
            );
        }
    }
}

/// What the seeding could not do, said once on stderr: connections the seed table had no room
/// for, and (with `--pid`) traced listeners that untraced processes share.
fn warn_about_seeding(seeded: &owners::SeedReport, seed_table: u32, with_pids: bool) {
    if seeded.unseeded > 0 {
        eprintln!(
            "tracer: {} connection(s) that existed before the start found no room in the seed \
             table (it holds {seed_table}): until their owner acts on them, their events name \
             no owner{}",
            seeded.unseeded,
            if with_pids { " and are not traced" } else { "" }
        );
    }
    if seeded.shared_listeners > 0 {
        eprintln!(
            "tracer: --pid: {} listening socket(s) of the traced processes are shared with \
             processes not traced (other workers of one server?), or their ports have other \
             processes' listeners too (SO_REUSEPORT): their connections are reported once a \
             traced process acts on them (a peer's FIN or RST on a connection accepted but not \
             yet read or written is not reported, nor its packet); trace the parent to get \
             them all",
            seeded.shared_listeners
        );
    }
}

/// Closes held in the kernel since before `older_than_ns` go to the pipeline (see `held`).
fn take_held_closes(held: &mut HeldCloses, older_than_ns: u64, pipeline: &mut Pipeline) {
    for ev in held.take_stale(older_than_ns) {
        pipeline.stats.kernel.held_closes_rescued += 1;
        pipeline.kernel_event(ev);
    }
}

fn drain_ring(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline) {
    pipeline.reading_at(now_mono_ns());
    while let Some(item) = ring.next() {
        if let Some(ev) = KernelEvent::decode(&item) {
            pipeline.kernel_event(ev);
        }
    }
}

/// After the stop: read what the kernel already produced, and give events that still wait for
/// their packet up to one join window to get it.
async fn finish_joins(
    settings: &Settings,
    pipeline: &mut Pipeline,
    output: &Output,
    ring: &mut RingBuf<MapData>,
    packets: &mut Option<mpsc::Receiver<WirePacket>>,
    signals: &mut Signals,
) {
    drain_ring(ring, pipeline);
    let until = Instant::now() + settings.join_window;
    while pipeline.pending() > 0 && Instant::now() < until && !signals.hurried {
        signals.pause_while_ending(TICK).await;
        drain_ring(ring, pipeline);
        drain_packets(packets, pipeline);
        pipeline.poll(now_mono_ns(), output);
        output.hand_over();
    }
}

/// What the daemon reads of the kernel side's own accounting.
struct Kernel<'a> {
    counters: &'a PerCpuArray<MapData, u64>,
    skipped: &'a SkippedRuns,
    held: HeldCloses,
    /// With `--pid`: the traced processes' children the programs follow.
    followed: owners::Followed,
    /// With `--pid`: the traced processes themselves.
    traced: owners::TracedPids,
    /// What the per-socket tables were sized to at start-up.
    tables: TableSizes,
}

/// Turns counter increases into `lost` lines, and into the metrics at once.
struct LossReporter {
    /// What the `lost` lines have said so far.
    reported: Lost,
    /// What the metrics have said so far: ahead of the lines while these wait for the output
    /// (a stalled consumer, a full disk), which is when an alert on the metric matters.
    published: Lost,
    /// The kernel counts as the metrics last had them (the held closes' count grows in the
    /// pipeline's stats between reports).
    kernel_reported: KernelCounts,
    format: Format,
    metrics: Option<std::sync::Arc<Metrics>>,
    /// Whether stderr was told that connections awaiting their peer's FIN were forgotten.
    awaiting_forgotten_said: bool,
}

impl LossReporter {
    /// Writes a `lost` line for each source whose count grew. While running, a line that does
    /// not fit in the output queue is offered again next time (a stalled consumer must not stop
    /// the loop), and none is offered while writing fails (it would be lost itself); at the end
    /// (`last`), it waits for room.
    fn report(
        &mut self,
        pipeline: &mut Pipeline,
        output: &Output,
        kernel_side: &Kernel<'_>,
        capture: Option<&capture::CaptureStats>,
        last: bool,
    ) {
        let counters = kernel_side.counters;
        let kernel = KernelCounts {
            held_closes_rescued: pipeline.stats.kernel.held_closes_rescued,
            ..read_counters(counters, capture)
        };
        if let Some(warning) = owner_table_full_warning(
            pipeline.stats.kernel.owner_table_full,
            kernel.owner_table_full,
            kernel_side.tables.socks,
        ) {
            eprintln!("{warning}");
        }
        if !self.awaiting_forgotten_said && pipeline.awaiting_forgotten() > 0 {
            self.awaiting_forgotten_said = true;
            eprintln!("{}", awaiting_forgotten_warning());
        }
        if let Some(m) = &self.metrics {
            m.kernel_counts(&self.kernel_reported, &kernel);
        }
        self.kernel_reported = kernel;
        pipeline.stats.kernel = kernel;
        let capture_lost = capture.map_or(0, |c| {
            c.channel_dropped.load(Ordering::Relaxed) + c.pcap_dropped.load(Ordering::Relaxed)
        }) + pipeline.joiner_dropped();
        let now = Lost {
            ringbuf: kernel_lost(counters),
            capture: capture_lost,
            output: output.state.dropped.load(Ordering::Relaxed),
            hooks: kernel_side.skipped.total(last)
                + sum_counter(counters, counter::NESTED_TOO_DEEP),
            owner_table: sum_counter(counters, counter::LOST_NO_ENTRY),
        };
        self.publish(&now);
        // A line offered while writing fails would be lost itself: it waits.
        if last || !output.is_failing() {
            self.write_lines(pipeline, output, &now, last);
        }
        pipeline.stats.lost = self.reported;
    }

    /// A `lost` line for each source whose count grew since the last written one.
    fn write_lines(&mut self, pipeline: &mut Pipeline, output: &Output, now: &Lost, last: bool) {
        for (index, (source, total, seen)) in per_source(now, &mut self.reported).enumerate() {
            // Counts whose line the writer could not write are said again.
            *seen -= output.take_returned(index);
            if total <= *seen {
                continue;
            }
            let count = total - *seen;
            let line = lost_line(pipeline, self.format, source, count);
            let written = if last {
                output.line_lost(line, index, count);
                true
            } else {
                output.offer_lost(line, index, count)
            };
            if written {
                pipeline.stats.count_line("lost");
                *seen = total;
            }
        }
    }

    /// Moves the metrics' loss counters to `now`, whether or not the lines could say it yet.
    fn publish(&mut self, now: &Lost) {
        let Some(m) = &self.metrics else {
            return;
        };
        for (source, total, seen) in per_source(now, &mut self.published) {
            if total > *seen {
                m.lost(source, total - *seen);
                *seen = total;
            }
        }
    }
}

/// Each source's count in `now`, beside the same source's count in `seen`; a source's place
/// here is its number for the output's `lost` lines.
fn per_source<'a>(
    now: &Lost,
    seen: &'a mut Lost,
) -> impl Iterator<Item = (&'static str, u64, &'a mut u64)> {
    Lost::SOURCES
        .into_iter()
        .zip(now.by_source())
        .zip(seen.by_source_mut())
        .map(|((source, total), seen)| (source, total, seen))
}

/// Said once, when the owner table first turns a socket away: the events of such a socket
/// are dropped in the kernel (a program cannot keep its state anywhere else), and the
/// summary's count comes only at the end.
fn owner_table_full_warning(before: u64, now: u64, entries: u32) -> Option<String> {
    (before == 0 && now > 0).then(|| {
        format!(
            "tracer: the owner table is full ({entries} entries, sized at start-up for this \
             host's TCP sockets then): the events of sockets beyond it are dropped in the \
             kernel, counted as lost (source owner_table); restart the tracer to size the table \
             to the host as it is now"
        )
    })
}

/// Said once, when more sockets wait in FIN_WAIT2 for their peer's FIN than the daemon
/// remembers: a FIN reaching one of the oldest later has no connection to name.
fn awaiting_forgotten_warning() -> String {
    format!(
        "tracer: more than {} connections wait in FIN_WAIT2 for their peer's FIN; the oldest \
         are forgotten, and a FIN reaching one of them later is a `packet` line (conn null) \
         instead of a `fin_received`",
        crate::conns::MAX_AWAITING
    )
}

fn sum_counter(counters: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    counters
        .get(&index, 0)
        .map(|values| values.iter().sum())
        .unwrap_or(0)
}

fn kernel_lost(counters: &PerCpuArray<MapData, u64>) -> u64 {
    sum_counter(counters, counter::RINGBUF_LOST)
}

fn read_counters(
    counters: &PerCpuArray<MapData, u64>,
    capture: Option<&capture::CaptureStats>,
) -> KernelCounts {
    KernelCounts {
        emitted: sum_counter(counters, counter::EMITTED),
        filtered: sum_counter(counters, counter::FILTERED),
        owner_table_full: sum_counter(counters, counter::OWNER_TABLE_FULL),
        // What the capture socket's kernel filter passed.
        captured: capture.map_or(0, |c| c.captured.load(Ordering::Relaxed)),
        held_closes_rescued: 0, // the daemon's own count, kept by `report`
    }
}

fn now_fields(pipeline: &Pipeline) -> (String, u64) {
    let mono = now_mono_ns();
    (rfc3339_nanos(pipeline.clock.mono_to_wall_ns(mono)), mono)
}

fn lost_line(pipeline: &Pipeline, format: Format, source: &'static str, count: u64) -> String {
    let (time, mono_ns) = now_fields(pipeline);
    format.lost(&LostLine {
        event: "lost",
        time,
        mono_ns,
        source,
        count,
    })
}

#[derive(Serialize)]
struct ReadyLine<'a> {
    event: &'static str,
    time: String,
    mono_ns: u64,
    probes: &'a [String],
    capture: Option<&'a str>,
    /// Other network namespaces' loopbacks captured besides `capture` (`lo@net:[...]`: a
    /// traced process's container).
    capture_also: Vec<String>,
    pids: Option<&'a [u32]>,
    version: &'static str,
    kernel: String,
    /// Hooks this kernel lacks, and what that costs.
    degraded: Vec<Degraded>,
    /// Connections and listeners that existed before the start, attributed from /proc (and
    /// with `--pid`, the traced processes' running children).
    seeded: SeededCounts,
}

#[derive(Serialize)]
struct Degraded {
    probe: String,
    effect: &'static str,
}

#[derive(Serialize)]
struct SeededCounts {
    connections: usize,
    /// Connections found that the seed table had no room for (0 unless the host has more
    /// than the table was sized for at start-up).
    unseeded: usize,
    listeners: usize,
    /// With `--pid`: the traced processes' running descendants, followed for their calls.
    children: usize,
}

fn ready_line(
    pipeline: &Pipeline,
    attached: &[String],
    missing: &[Hook],
    capture: &Option<CaptureHandle>,
    settings: &Settings,
    seeded: owners::SeedReport,
) -> String {
    let (time, mono_ns) = now_fields(pipeline);
    settings.format.document(&ReadyLine {
        event: "ready",
        time,
        mono_ns,
        probes: attached,
        capture: capture.as_ref().map(|c| c.iface.as_str()),
        capture_also: capture
            .iter()
            .flat_map(|c| &c.namespaces)
            .map(|ns| ns.loopback_name())
            .collect(),
        pids: (!settings.pids.is_empty()).then_some(settings.pids.as_slice()),
        version: env!("CARGO_PKG_VERSION"),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        degraded: missing
            .iter()
            .map(|h| Degraded {
                probe: h.name(),
                effect: h.without,
            })
            .collect(),
        seeded: SeededCounts {
            connections: seeded.connections,
            unseeded: seeded.unseeded,
            listeners: seeded.listeners,
            children: seeded.children,
        },
    })
}

#[derive(Serialize)]
struct SummaryLine<'a> {
    event: &'static str,
    time: String,
    mono_ns: u64,
    counts: &'a std::collections::BTreeMap<&'static str, u64>,
    joined: u64,
    unjoined: u64,
    lost: Lost,
    close_to_wire_ns: Percentiles,
    kernel: KernelCounts,
    /// The tracer's own CPU time and peak memory over the run.
    tracer: OwnCost,
}

fn summary_line(pipeline: &Pipeline, format: Format) -> String {
    let (time, mono_ns) = now_fields(pipeline);
    let stats = &pipeline.stats;
    let lost = stats.lost;
    format.document(&SummaryLine {
        event: "summary",
        time,
        mono_ns,
        counts: &stats.lines,
        joined: stats.joined,
        unjoined: stats.unjoined,
        lost,
        close_to_wire_ns: stats.percentiles(),
        kernel: stats.kernel,
        tracer: stats.own_cost_at_stop.unwrap_or_else(OwnCost::now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_owner_table_is_said_once_and_what_it_costs() {
        assert_eq!(owner_table_full_warning(0, 0, 65536), None);
        let first = owner_table_full_warning(0, 3, 65536).expect("said when it first fills");
        assert!(
            first.contains("65536 entries") && first.contains("dropped"),
            "{first}"
        );
        assert_eq!(owner_table_full_warning(3, 9, 65536), None, "not again");
    }
}
