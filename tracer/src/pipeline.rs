//! The heart of a run: decoded kernel events and captured packets in, JSON lines out.
//!
//! Kernel events become lines; the ones that put a packet on the wire (or were caused by one)
//! wait in the joiner for it. A close that moved the socket straight to CLOSE is staged for a
//! moment, because the RST it sends (with the kernel's reason) is the next kernel event.

use std::sync::Arc;

// Keys are kernel-drawn random ids and addresses, not attacker-chosen: FxHash is safe and
// several times cheaper than SipHash on this per-event path.
use rustc_hash::FxHashMap as HashMap;

use tracer_common::{EventKind, tcp_state};

use crate::{
    capture::{Dir, WirePacket, tcp_flags},
    clock::Clock,
    conns::ConnTable,
    join::{Joined, Joiner, PendingEvent, Want, WantFlag, WireMatch},
    kernel::{ItsReset, KernelEvent, Owner, ResetReasons, errno_name, state_name},
    lines::{ConnId, Flags, Format, PacketLine, SocketLine, Time, Wire},
    metrics::Metrics,
    output::Output,
    owners::WatchedTuples,
    pcapng::PcapngOut,
    stats::Stats,
    timeline::Timeline,
};

/// How long an abortive close waits for its RST event before going out without one, counted
/// from when the daemon read the close (see `Pipeline::reading_at`). (On loopback the RST
/// event comes after the peer has processed the RST: in a slow VM that took more than 5 ms.)
const STAGE_NS: u64 = 20_000_000;
/// Bound on events plus packets waiting in the joiner.
pub const MAX_PENDING: usize = 262_144;

/// A line waiting for its wire packet.
pub struct PendingLine {
    event: &'static str,
    ev: KernelEvent,
    outcome: Option<&'static str>,
    reason: Option<Arc<str>>,
    wants_wire: bool,
    /// Synthesised from the wire rather than from a kernel event (peer FIN into TIME_WAIT).
    derived_from_wire: bool,
    /// The outcome is whatever RST the wire shows (the kernel's RST event is missing).
    outcome_from_wire: bool,
}

/// How much longer than the joiner may keep a line a pretty line is held for ordering (see
/// `timeline`).
const TIMELINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(100);

/// An abortive close waiting for the RST event of the same call.
struct Staged {
    line: PendingLine,
    staged_at: u64,
}

/// Kernel events and packets in, lines out.
pub struct Pipeline {
    joiner: Joiner<PendingLine>,
    staged: HashMap<u64, Staged>,
    conns: ConnTable,
    reasons: ResetReasons,
    filter_pids: bool,
    format: Format,
    metrics: Option<Arc<Metrics>>,
    pcapng: Option<PcapngOut>,
    /// Without packet capture nothing waits for a packet: lines go out at once with `wire: null`.
    capturing: bool,
    /// net.ipv4.tcp_rfc1337 (the daemon's namespace's): a TIME_WAIT socket ignores RSTs.
    rfc1337: bool,
    /// The daemon's clock when it last began reading the ring buffer.
    read_at_ns: u64,
    /// What the joiner released, reused every turn.
    ready: Vec<Joined<PendingLine>>,
    /// `--format pretty`: lines held to go out in time order, and for how long (see
    /// `timeline`; the pcapng file's packets are held as long).
    timeline: Option<Timeline<String>>,
    timeline_hold_ns: u64,
    /// With `--pid`: the traced connections' tuples (see `WatchedTuples`).
    watched: Option<WatchedTuples>,
    pub clock: Clock,
    pub stats: Stats,
}

impl Pipeline {
    pub fn new(
        join_window: std::time::Duration,
        reasons: ResetReasons,
        filter_pids: bool,
        format: Format,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let joiner = Joiner::new(join_window, MAX_PENDING);
        // The joiner releases a line at most this long after its event, plus a loop turn.
        let timeline_hold_ns = joiner.longest_stay_ns() + TIMELINE_MARGIN.as_nanos() as u64;
        Self {
            joiner,
            staged: HashMap::default(),
            conns: ConnTable::default(),
            reasons,
            filter_pids,
            format,
            metrics,
            pcapng: None,
            capturing: true,
            rfc1337: false,
            read_at_ns: 0,
            ready: Vec::new(),
            timeline: matches!(format, Format::Pretty { .. }).then(Timeline::default),
            timeline_hold_ns,
            watched: None,
            clock: Clock::sample(),
            stats: Stats::default(),
        }
    }

    /// With `--pid`: where to look up a traced connection the pipeline has seen no event of.
    pub fn know_watched(&mut self, watched: WatchedTuples) {
        self.watched = Some(watched);
    }

    /// A pre-forked server's worker that accepted a connection and has not read or written it
    /// yet is invisible (accept itself has no hook without the syscall tracepoints): the peer's
    /// FIN or RST meanwhile names the listener's owner (nginx's master). The worker's first act
    /// on the socket (usually its close, right after reading the EOF) names it: the lines of the
    /// connection still held get that owner too.
    fn name_the_accepting_process(&mut self, ev: &KernelEvent) {
        let Owner::Known {
            how: "task",
            pid,
            tid,
            comm,
        } = ev.owner
        else {
            return;
        };
        if ev.conn_id == 0 {
            return;
        }
        self.joiner.revise_held(ev.conn_id, |line| {
            if let Owner::Known {
                how: "listener", ..
            } = line.ev.owner
            {
                line.ev.owner = Owner::Known {
                    pid,
                    tid,
                    comm,
                    how: "task",
                };
            }
        });
    }

    /// Whether the packet is on a traced connection (with `--pid`), known here or not.
    fn on_a_traced_connection(&self, packet: &WirePacket, conn: Option<(u64, Dir)>) -> bool {
        conn.is_some()
            || self
                .watched
                .as_ref()
                .is_some_and(|w| w.contains(packet.src, packet.dst))
    }

    /// Says when the daemon begins reading a batch of kernel events or packets (its monotonic
    /// clock).
    pub fn reading_at(&mut self, now_ns: u64) {
        self.read_at_ns = now_ns;
        self.joiner.delivered_at(now_ns);
    }

    /// Takes one decoded kernel event.
    pub fn kernel_event(&mut self, mut ev: KernelEvent) {
        self.conns.complete(&mut ev);
        if self.filter_pids && is_the_peers_reset(&ev) {
            return;
        }
        self.conns.observe(&ev);
        self.name_the_accepting_process(&ev);
        match ev.kind {
            EventKind::Close => self.close(ev),
            EventKind::RstSent => self.rst_sent(ev),
            EventKind::FinReceived => self.push(line("fin_received", ev, true)),
            EventKind::RstReceived => self.push(line("rst_received", ev, true)),
            EventKind::State | EventKind::Fin2Timeout => self.push(line("state", ev, false)),
        }
    }

    fn close(&mut self, ev: KernelEvent) {
        let aborted = ev.new_state == tcp_state::CLOSE && ev.old_state != tcp_state::CLOSE;
        match (aborted, ev.its_reset) {
            (true, ItsReset::Sent) => {
                let reason = self.reason_name(&ev);
                self.push(close_with_its_rst(line("close", ev, false), reason));
            }
            (true, ItsReset::NotSent) => self.push(line("close", ev, false)),
            (true, ItsReset::Unknown) => self.stage_for_its_rst(ev),
            (false, _) => self.push(non_abortive_close(ev)),
        }
    }

    /// Holds an abortive close for the RST event of its call (see `rst_sent` and `poll`).
    fn stage_for_its_rst(&mut self, ev: KernelEvent) {
        // Counted from the read, not from the event: the ring is read every tick (20 ms)
        // or so, and a close read just before its RST was submitted would be overdue at
        // once (seen in a loaded VM: the close and a separate `rst_sent` line).
        let staged_at = ev.mono_ns.max(self.read_at_ns);
        let conn = ev.conn_id;
        let line = line("close", ev, false);
        if let Some(previous) = self.staged.insert(conn, Staged { line, staged_at }) {
            self.push(previous.line);
        }
    }

    fn rst_sent(&mut self, ev: KernelEvent) {
        let reason = self.reason_name(&ev);
        let same_call = self
            .staged
            .get(&ev.conn_id)
            .is_some_and(|s| ev.call_id != 0 && s.line.ev.call_id == ev.call_id);
        if same_call {
            let close = self.staged.remove(&ev.conn_id).expect("checked").line;
            self.push(close_with_its_rst(close, reason));
            return;
        }
        // A close that moved to FIN_WAIT1 and then, in the same call, gave up and reset
        // (tcp_check_oom: too many orphans, TCP_ABORT_ON_MEMORY): no FIN went out, its RST did.
        let call = ev.call_id;
        let fin_close_of_this_call = |l: &PendingLine| {
            l.event == "close" && l.outcome == Some("fin") && l.ev.call_id == call
        };
        if call != 0
            && let Some(close) = self.joiner.take_waiting(ev.conn_id, fin_close_of_this_call)
        {
            self.push(close_with_its_rst(close, reason));
            return;
        }
        if reason.as_deref() == Some("TCP_ABORT_ON_DATA") {
            self.kernel_not_peer_reset(ev.conn_id);
        }
        let mut pending = line("rst_sent", ev, true);
        pending.reason = reason;
        self.push(pending);
    }

    /// An orphan that gets data after its close is aborted by the kernel with tcp_reset(),
    /// the function that handles a received RST, and whose tracepoint says so: its move to
    /// CLOSE came as `rst_received`, waiting for a RST no peer sent (`wire: null`). Its own
    /// RST event, with the reason, follows at once: the move is a `state` line then.
    fn kernel_not_peer_reset(&mut self, conn: u64) {
        self.joiner.stop_waiting(conn, |line| {
            let aborted = line.event == "rst_received" && line.wants_wire;
            if aborted {
                line.event = "state";
                line.wants_wire = false;
            }
            aborted
        });
    }

    /// The kernel's name for the event's RST reason.
    fn reason_name(&self, ev: &KernelEvent) -> Option<Arc<str>> {
        ev.reason.map(|r| self.reasons.name(r))
    }

    fn push(&mut self, mut pending: PendingLine) {
        pending.wants_wire &= self.capturing;
        let want = pending.want();
        let (conn, mono) = (pending.ev.conn_id, pending.ev.mono_ns);
        self.joiner.push_event(conn, mono, want, pending);
    }

    pub fn packet(&mut self, pkt: WirePacket) {
        self.joiner.push_packet(pkt);
    }

    /// How many of the connections seen are still closing (see `ConnInfo::is_closing`).
    pub fn closing_connections(&self) -> usize {
        self.conns.closing()
    }

    /// Releases what is ready: staged closes whose RST never came, joined or expired events,
    /// unclaimed packets.
    pub fn poll(&mut self, now_ns: u64, out: &Output) {
        // Usually empty (a close's RST event follows it at once); iterating a map that once
        // grew walks its whole capacity, so look only when there is something.
        if !self.staged.is_empty() {
            let overdue: Vec<u64> = self
                .staged
                .iter()
                .filter(|(_, s)| now_ns.saturating_sub(s.staged_at) >= STAGE_NS)
                .map(|(&conn, _)| conn)
                .collect();
            for conn in overdue {
                if let Some(staged) = self.staged.remove(&conn) {
                    self.release_unmatched_abort(staged.line);
                }
            }
        }
        let mut ready = std::mem::take(&mut self.ready);
        self.joiner.poll_into(now_ns, &mut ready);
        self.emit_all(&mut ready, out);
        self.ready = ready; // emptied, capacity kept for the next turn
        let settled = now_ns.saturating_sub(self.timeline_hold_ns);
        if let Some(timeline) = &mut self.timeline {
            // A line the output has no room for is counted there as lost.
            timeline
                .release(settled)
                .for_each(|line| _ = out.try_line(line));
        }
        if let Some(file) = &mut self.pcapng
            && let Err(e) = file.release(settled)
        {
            eprintln!("tracer: writing the pcapng file failed ({e:#}); no more packets go there");
            self.pcapng = None;
        }
        self.conns.expire(now_ns);
    }

    /// An abortive close whose RST event never came (a kernel whose tracepoint misses active
    /// resets, or an event lost in the ring buffer): from a synchronized state the kernel sends
    /// a RST, and the wire can still show it and so give the outcome.
    fn release_unmatched_abort(&mut self, mut line: PendingLine) {
        let resets = matches!(
            line.ev.old_state,
            tcp_state::ESTABLISHED
                | tcp_state::CLOSE_WAIT
                | tcp_state::FIN_WAIT1
                | tcp_state::FIN_WAIT2
                | tcp_state::SYN_RECV
        );
        if resets {
            line.wants_wire = true;
            line.outcome_from_wire = true;
        }
        self.push(line);
    }

    /// Releases everything (at exit).
    pub fn flush(&mut self, out: &Output) {
        let staged: Vec<Staged> = self.staged.drain().map(|(_, s)| s).collect();
        for s in staged {
            self.release_unmatched_abort(s.line);
        }
        let mut rest = self.joiner.flush();
        self.emit_all(&mut rest, out);
        if let Some(timeline) = &mut self.timeline {
            timeline
                .release(u64::MAX)
                .for_each(|line| _ = out.try_line(line));
        }
        if let Some(file) = &mut self.pcapng
            && let Err(e) = file.flush()
        {
            eprintln!("tracer: writing the pcapng file failed: {e:#}");
        }
    }

    /// With net.ipv4.tcp_rfc1337 set, a TIME_WAIT socket ignores RSTs (RFC 1337's defence
    /// against their assassination): a RST reaching one is no end of it.
    pub fn rfc1337(mut self, on: bool) -> Self {
        self.rfc1337 = on;
        self
    }

    /// With `--no-capture`: no line waits for a packet.
    pub fn capturing(mut self, on: bool) -> Self {
        self.capturing = on;
        self
    }

    /// Writes joined and unclaimed packets to a pcapng file too.
    pub fn write_pcapng(&mut self, out: PcapngOut) {
        self.pcapng = Some(out);
    }

    /// Writes one packet to the pcapng file; a failing file is reported once and closed.
    fn record_packet(&mut self, pkt: &WirePacket, comment: impl FnOnce() -> String) {
        if let Some(file) = &mut self.pcapng
            && let Err(e) = file.write(pkt, comment())
        {
            eprintln!("tracer: writing the pcapng file failed ({e:#}); no more packets go there");
            self.pcapng = None;
        }
    }

    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.clone()
    }

    /// Events still waiting for a packet (the stop sequence waits for them, up to the window).
    pub fn pending(&self) -> usize {
        self.joiner.pending() + self.staged.len()
    }

    /// Connections forgotten while awaiting their peer's FIN (see `ConnTable`).
    pub fn awaiting_forgotten(&self) -> u64 {
        self.conns.awaiting_forgotten
    }

    pub fn joiner_dropped(&self) -> u64 {
        self.joiner.overflow_dropped()
    }

    fn emit_all(&mut self, ready: &mut Vec<Joined<PendingLine>>, out: &Output) {
        for item in ready.drain(..) {
            match item {
                Joined::Event(mut ev) => {
                    let PendingEvent { item, wire, .. } = &mut *ev;
                    self.emit_event(item, wire.as_ref(), out);
                    self.joiner.recycle(ev);
                }
                Joined::Packet { packet, retransmit } => self.emit_packet(packet, retransmit, out),
                Joined::Unreceived { packet, retransmit } => {
                    self.emit_unreceived(packet, retransmit, out)
                }
            }
        }
    }

    fn emit_event(&mut self, pending: &mut PendingLine, wire: Option<&WireMatch>, out: &Output) {
        if pending.outcome_from_wire && wire.is_some() {
            pending.outcome = Some("rst");
        }
        if pending.wants_wire {
            if wire.is_some() {
                self.stats.joined += 1;
            } else {
                self.stats.unjoined += 1;
            }
            if let Some(m) = &self.metrics {
                m.join(wire.is_some());
            }
        }
        if let Some(w) = wire {
            self.conns.note_fin(&w.packet);
            let comment = || packet_comment(pending);
            self.record_packet(&w.packet, comment);
        }
        if self.timeline.is_some() {
            let mut text = String::new();
            self.write_socket_line(pending, wire, &mut text);
            if let Some(timeline) = &mut self.timeline {
                timeline.hold(pending.ev.mono_ns, text);
            }
        } else {
            // A line the queue has no room for is counted as lost output, and still as a line
            // produced: the summary's counts are what was produced, whatever the output did
            // with it (a full disk's lines are counted the same way).
            let _ = out.try_write(|text| self.write_socket_line(pending, wire, text));
        }
        self.stats.count_line(pending.event);
        if let Some(w) = wire.filter(|w| w.dir == Dir::Out) {
            self.derive_local_receiver(&w.packet, out);
        }
        let close_delay = wire
            .filter(|_| pending.event == "close")
            .map(|w| w.delay_ns);
        if let Some(delay) = close_delay {
            self.stats.close_to_wire.record(delay.max(0) as u64);
        }
        if let Some(m) = &self.metrics {
            let comm = match &pending.ev.owner {
                Owner::Known { comm, .. } => Some(comm.as_str()),
                Owner::Unknown(_) => None,
            };
            m.line(pending.event, comm);
            if pending.event == "rst_sent" || pending.outcome == Some("rst") {
                m.reset(pending.reason.as_deref(), comm);
            }
            if let Some(delay) = close_delay {
                m.close_to_wire(delay);
            }
        }
    }

    fn emit_packet(&mut self, packet: WirePacket, retransmit: bool, out: &Output) {
        let conn = self.conns.for_packet(&packet);
        // A FIN sent again after the join window: a retransmission (on loopback the first copy
        // went to the sender's close line). It is the peer's FIN reaching our time-wait form
        // only if none did before (`timewait_arrival` derives once): the first copy was lost
        // after the capture saw it (a firewall, a full backlog), and this one ended the wait.
        let retransmit = retransmit || self.conns.fin_seen_before(&packet);
        self.conns.note_fin(&packet);
        let derived = self.timewait_arrival(&packet, conn);
        if let Some(line) = derived {
            self.emit_derived(line, packet, out);
            return;
        }
        if self.filter_pids && !self.on_a_traced_connection(&packet, conn) {
            return; // --pid: only packets of the traced processes' connections
        }
        self.record_packet(&packet, || {
            let what = if retransmit {
                "a retransmission"
            } else {
                "a packet"
            };
            format!("tracer: {what} no kernel event claimed within the join window")
        });
        // On loopback the capture keeps one copy, whatever its direction; elsewhere the line
        // names the end its direction is from (the other when only that one is ours).
        let named = if packet.on_loopback {
            conn
        } else {
            self.conns.for_packet_from(&packet, packet.dir)
        };
        let json = self.format.packet(&packet_line(&packet, retransmit, named));
        match &mut self.timeline {
            Some(timeline) => timeline.hold(packet.mono_ns, json),
            // Produced either way (see `emit_event`).
            None => _ = out.try_line(json),
        }
        self.stats.count_line("packet");
        if let Some(m) = &self.metrics {
            m.line("packet", None);
        }
    }

    /// Both ends on this host: the FIN or RST a line just sent may have reached our socket
    /// that is already in TIME_WAIT (or an orphaned FIN_WAIT2). Decided as the sender's line
    /// leaves (tens of milliseconds after the packet), while the receiver is surely still in
    /// the connection table even under churn; `emit_unreceived` is the later second chance.
    fn derive_local_receiver(&mut self, packet: &WirePacket, out: &Output) {
        if packet.flags & (tcp_flags::FIN | tcp_flags::RST) == 0 {
            return;
        }
        if let Some(mut line) = self.receiver_line(packet) {
            // The sender's line has the first copy; the receiver's is the last (`any`), and it
            // arrived then. Taken before the entry is marked received, which drops its copies.
            let arrived = self
                .joiner
                .last_copy(packet)
                .unwrap_or_else(|| packet.clone());
            line.ev.mono_ns = line.ev.mono_ns.max(arrived.mono_ns);
            self.joiner.mark_received(packet);
            self.emit_derived(line, arrived, out);
        }
    }

    /// A FIN or RST that joined its sender's line and no receiver's event (both ends on this
    /// host): the receiver may be our socket in TIME_WAIT, which the wire alone shows
    /// receiving it. Anything else it reached already has its line (or is not traced), and its
    /// sender's line carries it: no `packet` line. A copy sent again is not a second arrival.
    fn emit_unreceived(&mut self, packet: WirePacket, retransmit: bool, out: &Output) {
        if retransmit {
            return;
        }
        if let Some(line) = self.receiver_line(&packet) {
            self.emit_derived(line, packet, out);
        }
    }

    /// The line of the connection a packet reached, derived from the wire, if it reached one
    /// of ours that no kernel event shows receiving it.
    fn receiver_line(&mut self, packet: &WirePacket) -> Option<PendingLine> {
        if !self.conns.any_in_timewait() {
            return None; // no socket of ours is in its time-wait form: nothing to derive
        }
        let conn = self.conns.for_packet(packet);
        self.timewait_arrival(packet, conn)
    }

    /// A line derived from the packet the socket received.
    fn emit_derived(&mut self, mut line: PendingLine, packet: WirePacket, out: &Output) {
        let wire = WireMatch {
            dir: Dir::In,
            delay_ns: packet.mono_ns as i64 - line.ev.mono_ns as i64,
            retransmits: 0,
            packet,
        };
        self.emit_event(&mut line, Some(&wire), out);
    }

    /// Which connection on the addresses of connection `latest` was in its time-wait form at
    /// `at_ns`: a FIN from before a connection's time-wait form began is an earlier
    /// connection's on the same addresses (a client reusing its port within the window, where
    /// the latest connection took the address index). The full socket itself may take the FIN
    /// that ends FIN_WAIT2 microseconds before its move, hence the slack (small: ports are
    /// reused within milliseconds).
    fn timewait_at(&self, latest: u64, at_ns: u64) -> Option<u64> {
        const SLACK_NS: u64 = 1_000_000;
        // A segment captured this long before the move cannot have reached the time-wait form:
        // the full socket, still there, took it (or a firewall dropped it on its way in).
        const EARLIEST_SLACK_NS: u64 = 50_000_000;
        const MAX_EARLIER: usize = 16;
        let mut id = latest;
        for _ in 0..MAX_EARLIER {
            let info = self.conns.get(id)?;
            if info
                .timewait_since()
                .is_some_and(|since| at_ns + SLACK_NS >= since)
            {
                return Some(id);
            }
            match info.prev_on_addr {
                Some(earlier) => id = earlier,
                // The earliest one there is: its own (a slow machine may take milliseconds
                // from the capture to the socket's move).
                None => {
                    return info
                        .timewait_since()
                        .filter(|since| at_ns + EARLIEST_SLACK_NS >= *since)
                        .map(|_| id);
                }
            }
        }
        None
    }

    /// The peer's FIN or RST reaching a socket that already left for TIME_WAIT (or an orphaned
    /// FIN_WAIT2): no kernel event shows it (the mini socket has no tracepoint), so the wire is
    /// the witness. Each arrives once: a copy sent again derives nothing.
    fn timewait_arrival(
        &mut self,
        pkt: &WirePacket,
        conn: Option<(u64, Dir)>,
    ) -> Option<PendingLine> {
        let (latest, Dir::In) = conn? else {
            return None;
        };
        let rst = pkt.flags & tcp_flags::RST != 0;
        if !rst && pkt.flags & tcp_flags::FIN == 0 {
            return None;
        }
        let id = self.timewait_at(latest, pkt.mono_ns)?;
        let info = self.conns.get_mut(id)?;
        let since = info.timewait_since()?;
        let awaited = info.awaits_peer();
        // (line, kind, the states it moved between, since when it was in the old one)
        let (event, kind, old_state, new_state, state_since_ns) = if rst {
            // The peer aborted while we waited for its FIN (or reset our TIME_WAIT): the mini
            // socket dies with it. In TIME_WAIT only a RST at exactly the sequence number after
            // the peer's FIN kills it, and none where RFC 1337 protection is on
            // (tcp_timewait_state_process): another is dropped, a `packet` line.
            let ignored = info.fin_received
                && (self.rfc1337 || info.after_peer_fin().is_some_and(|next| pkt.seq != next));
            if ignored || std::mem::replace(&mut info.rst_received, true) {
                return None;
            }
            let old = if info.fin_received {
                tcp_state::TIME_WAIT
            } else {
                tcp_state::FIN_WAIT2
            };
            let kind = EventKind::RstReceived;
            let since = if info.fin_received {
                info.time_wait_since
            } else {
                info.fw2_since
            };
            let since = since.unwrap_or(0);
            ("rst_received", kind, old, tcp_state::CLOSE, since)
        } else {
            if std::mem::replace(&mut info.fin_received, true) {
                return None;
            }
            info.time_wait_since = Some(pkt.mono_ns.max(since));
            // Unknown (0: `duration_ns` null) for a socket already in FIN_WAIT2 at start-up.
            let fw2_since = info.fw2_since.unwrap_or(0);
            let (old, new) = (tcp_state::FIN_WAIT2, tcp_state::TIME_WAIT);
            ("fin_received", EventKind::FinReceived, old, new, fw2_since)
        };
        let ev = KernelEvent {
            kind,
            // A FIN that came with the ACK of ours was processed by the full socket itself
            // (FIN_WAIT1 -> FIN_WAIT2 -> TIME_WAIT in one segment): it reached TIME_WAIT at the
            // kernel's FIN_WAIT2 -> CLOSE, microseconds after the capture saw the packet. What
            // reaches the mini socket that took over an orphaned FIN_WAIT2 comes after that.
            mono_ns: pkt.mono_ns.max(since),
            conn_id: id,
            state_since_ns,
            call_id: 0,
            owner: info.timewait_owner,
            family: info.family,
            local: info.local,
            remote: info.remote,
            old_state,
            new_state,
            syscall: 0,
            fd: None,
            reason: None,
            its_reset: ItsReset::Unknown,
            rst_ack: None,
            sk_err: None,
        };
        if awaited {
            self.conns.answered(id, pkt.mono_ns);
        }
        let mut line = line(event, ev, false);
        line.derived_from_wire = true;
        Some(line)
    }

    fn write_socket_line(&self, p: &PendingLine, wire: Option<&WireMatch>, text: &mut String) {
        let ev = &p.ev;
        let (pid, tid, comm, owner) = match &ev.owner {
            Owner::Known {
                pid,
                tid,
                comm,
                how,
            } => (Some(*pid), Some(*tid), Some(comm.as_str()), *how),
            Owner::Unknown(why) => (None, None, None, *why),
        };
        let is = |names: &[&str]| names.contains(&p.event);
        let error = ev
            .sk_err
            .filter(|_| p.event == "state" && ev.new_state == tcp_state::CLOSE)
            .map(errno_name);
        let line = SocketLine {
            event: p.event,
            time: Time(self.clock.mono_to_wall_ns(ev.mono_ns)),
            mono_ns: ev.mono_ns,
            pid,
            tid,
            comm,
            owner,
            conn: (ev.conn_id != 0).then_some(ConnId(ev.conn_id)),
            family: ev.family.as_str(),
            laddr: ev.local.ip(),
            lport: ev.local.port(),
            raddr: ev.remote.ip(),
            rport: ev.remote.port(),
            old_state: state_name(ev.old_state),
            new_state: state_name(ev.new_state),
            syscall: is(&["close"]).then(|| ev.syscall_name()),
            fd: is(&["close"]).then_some(ev.fd),
            outcome: is(&["close"]).then_some(p.outcome),
            reason: is(&["close", "rst_sent"]).then_some(p.reason.as_deref()),
            // On every socket line: how long the socket sat in `old_state` (a pool's CLOSE_WAIT
            // ended by the peer's RST, a FIN_WAIT2 ended by a time-wait form's RST).
            duration_ns: Some(ev.duration_in_old_state()),
            error: error.as_deref(),
            wire: (p.event != "state").then(|| wire.map(|w| self.wire(w))),
            derived: p.derived_from_wire.then_some("wire"),
        };
        self.format.write_socket(&line, text);
    }

    fn wire<'a>(&self, w: &'a WireMatch) -> Wire<'a> {
        Wire {
            time: Time(w.packet.wall_ns),
            mono_ns: w.packet.mono_ns,
            delay_ns: w.delay_ns,
            flags: Flags(w.packet.flags),
            dir: w.dir.as_str(),
            iface: &w.packet.iface,
            seq: w.packet.seq,
            ack: w.packet.ack,
            retransmits: w.retransmits,
        }
    }
}

impl PendingLine {
    /// The packet this line waits for, decided from the event itself.
    fn want(&self) -> Option<Want> {
        if !self.wants_wire {
            return None;
        }
        // Whether the packet carries ACK, where that is known: a close's RST is an active
        // reset (tcp_send_active_reset: always RST+ACK); a RST the kernel sent in answer to a
        // segment carries ACK unless the segment did, which the kernel program read. Two RSTs
        // of one connection within microseconds (a client's close, then the kernel's answer to
        // the server's next segment for that closed socket) were otherwise joined crosswise.
        let (flag, dir, ack) = match (self.event, self.outcome) {
            ("close", Some("fin")) => (WantFlag::Fin, Dir::Out, None),
            ("close", Some("rst")) => (WantFlag::Rst, Dir::Out, Some(true)),
            ("rst_sent", _) => (WantFlag::Rst, Dir::Out, self.ev.rst_ack),
            ("close", None) if self.outcome_from_wire => (WantFlag::Rst, Dir::Out, None),
            ("fin_received", _) => (WantFlag::Fin, Dir::In, None),
            ("rst_received", _) => (WantFlag::Rst, Dir::In, None),
            _ => return None,
        };
        // A socket reset in CLOSE_WAIT, LAST_ACK or CLOSING had taken the peer's FIN.
        let peer_fin_taken = self.event == "rst_received"
            && matches!(
                self.ev.old_state,
                tcp_state::CLOSE_WAIT | tcp_state::LAST_ACK | tcp_state::CLOSING
            );
        want_for(&self.ev, flag, dir).map(|want| Want {
            ack,
            peer_fin_taken,
            ..want
        })
    }
}

fn line(event: &'static str, ev: KernelEvent, wants_wire: bool) -> PendingLine {
    PendingLine {
        event,
        ev,
        outcome: None,
        reason: None,
        wants_wire,
        derived_from_wire: false,
        outcome_from_wire: false,
    }
}

/// A close that did not move its socket straight to CLOSE. Only a move into FIN_WAIT1 or
/// LAST_ACK sends the FIN: a close(2) after a shutdown(2) finds the socket already there
/// (FIN_WAIT1 -> FIN_WAIT1) and sends nothing; waiting for a FIN would count it unjoined and
/// call its outcome `fin`.
fn non_abortive_close(ev: KernelEvent) -> PendingLine {
    let sends_fin = ev.old_state != ev.new_state
        && matches!(ev.new_state, tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK);
    let mut pending = line("close", ev, sends_fin);
    pending.outcome = sends_fin.then_some("fin");
    pending
}

/// An abortive close with what its RST event said: it waits for that RST on the wire.
fn close_with_its_rst(mut close: PendingLine, reason: Option<Arc<str>>) -> PendingLine {
    close.outcome = Some("rst");
    close.reason = reason;
    close.wants_wire = true;
    close
}

/// With `--pid`, the kernel passes a RST no socket owns (a time-wait socket's, or one for no
/// socket) when its 4-tuple is a traced connection's either way round: sent from our end, it
/// is ours (`ConnTable::complete` names the connection); sent from the peer's end (the untraced
/// client's time-wait socket answering the traced server's late reply), it is the peer's, and
/// our end's `rst_received` reports it.
fn is_the_peers_reset(ev: &KernelEvent) -> bool {
    ev.kind == EventKind::RstSent && ev.conn_id == 0 && matches!(ev.owner, Owner::Unknown(_))
}

/// What the pcapng comment says about the event a packet joined.
fn packet_comment(p: &PendingLine) -> String {
    let ev = &p.ev;
    let owner = match &ev.owner {
        Owner::Known { pid, tid, comm, .. } => format!("pid={pid} tid={tid} comm={comm}"),
        Owner::Unknown(why) => format!("pid=? ({why})"),
    };
    let mut text = format!(
        "tracer: {owner} event={} {}->{} conn={:016x}",
        p.event,
        state_name(ev.old_state),
        state_name(ev.new_state),
        ev.conn_id
    );
    if let Some(call) = ev.syscall_name() {
        text.push_str(&format!(" syscall={call}"));
        if let Some(fd) = ev.fd {
            text.push_str(&format!(" fd={fd}"));
        }
    }
    if let Some(outcome) = p.outcome {
        text.push_str(&format!(" outcome={outcome}"));
    }
    if let Some(reason) = &p.reason {
        text.push_str(&format!(" reason={reason}"));
    }
    text
}

fn want_for(ev: &KernelEvent, flag: WantFlag, dir: Dir) -> Option<Want> {
    Some(Want {
        local: ev.local,
        remote: ev.remote,
        flag,
        dir,
        ack: None,
        peer_fin_taken: false,
    })
}

/// A `packet` line. Its `dir` is the named connection's, as on the lines it would have joined
/// (`out` when that socket sent it). On loopback every packet is both sent and received by
/// this host, and the capture's direction only says which copy it kept (the arriving one with
/// `--pid`); elsewhere the two differ only when both ends are this host's and the end on the
/// capture's side is not known (namespaces joined by a veth).
fn packet_line(p: &WirePacket, retransmit: bool, conn: Option<(u64, Dir)>) -> PacketLine<'_> {
    let dir = conn.map_or(p.dir, |(_, dir)| dir);
    PacketLine {
        event: "packet",
        time: Time(p.wall_ns),
        mono_ns: p.mono_ns,
        saddr: p.src.ip(),
        sport: p.src.port(),
        daddr: p.dst.ip(),
        dport: p.dst.port(),
        flags: Flags(p.flags),
        iface: &p.iface,
        dir: dir.as_str(),
        seq: p.seq,
        ack: p.ack,
        conn: conn.map(|(id, _)| ConnId(id)),
        retransmit,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc as StdArc;

    use super::*;
    use crate::conns::{AWAIT_MEMORY_NS, MAX_CONNS};
    use crate::output::Destination;

    const MS: u64 = 1_000_000;

    fn event(
        kind: EventKind,
        old: u8,
        new: u8,
        mono: u64,
        call_id: u64,
        reason: Option<i32>,
    ) -> KernelEvent {
        KernelEvent {
            kind,
            old_state: old,
            new_state: new,
            call_id,
            reason,
            ..KernelEvent::sample(mono)
        }
    }

    /// An abortive close (call 99) at 100 ms, and the RST event of the same call 5 µs later
    /// (reason 11: TCP_ABORT_ON_CLOSE).
    fn abortive_close() -> KernelEvent {
        event(
            EventKind::Close,
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE,
            100 * MS,
            99,
            None,
        )
    }

    fn its_rst() -> KernelEvent {
        event(
            EventKind::RstSent,
            tcp_state::CLOSE,
            tcp_state::CLOSE,
            100 * MS + 5_000,
            99,
            Some(11),
        )
    }

    /// The close and its RST came out as one line.
    fn assert_one_close_with_its_rst(out: &[serde_json::Value]) {
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["event"], "close");
        assert_eq!(out[0]["outcome"], "rst");
        assert_eq!(out[0]["reason"], "TCP_ABORT_ON_CLOSE");
    }

    fn rst_packet(mono: u64) -> WirePacket {
        WirePacket {
            mono_ns: mono,
            wall_ns: mono,
            src: "10.0.0.1:80".parse().unwrap(),
            dst: "10.0.0.2:4000".parse().unwrap(),
            flags: tcp_flags::RST | tcp_flags::ACK,
            seq: 42,
            data_end: 42,
            ack: 1,
            iface: StdArc::from("veth0"),
            on_loopback: false,
            dir: Dir::Out,
            headers: StdArc::from(&[][..]),
            only_copy: false,
        }
    }

    /// Runs events and packets through a pipeline; returns the lines written.
    fn lines(feed: impl FnOnce(&mut Pipeline, &Output)) -> Vec<serde_json::Value> {
        lines_with(false, feed)
    }

    /// `lines` with `--pid` (`filter_pids`) or without.
    fn lines_with(
        filter_pids: bool,
        feed: impl FnOnce(&mut Pipeline, &Output),
    ) -> Vec<serde_json::Value> {
        let path = std::env::temp_dir().join(format!(
            "tracer-pipeline-{}-{:?}.jsonl",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        let out = Output::start(Destination::File(path.clone())).unwrap();
        let reasons = ResetReasons::new(
            [
                (11, "TCP_ABORT_ON_CLOSE".to_string()),
                (12, "TCP_ABORT_ON_DATA".to_string()),
                (13, "TCP_ABORT_ON_MEMORY".to_string()),
            ]
            .into(),
        );
        let mut p = Pipeline::new(
            std::time::Duration::from_millis(500),
            reasons,
            filter_pids,
            Format::Json,
            None,
        );
        feed(&mut p, &out);
        p.poll(10_000 * MS, &out);
        p.flush(&out);
        out.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn an_abortive_close_and_its_rst_event_make_one_line() {
        let out = lines(|p, _| {
            p.kernel_event(abortive_close());
            p.kernel_event(its_rst());
            p.packet(rst_packet(100 * MS + 9_000));
        });
        assert_one_close_with_its_rst(&out);
        assert_eq!(out[0]["wire"]["delay_ns"], 9_000);
        assert_eq!(out[0]["wire"]["seq"], 42);
    }

    /// A close that moved to FIN_WAIT1 and then, in the same call, reset for want of memory
    /// (too many orphans: tcp_check_oom): no FIN went out, its RST did. One close line with
    /// the RST, not a close claiming a FIN (`wire: null`) and a separate `rst_sent`.
    #[test]
    fn a_close_that_gave_up_on_its_fin_and_reset_is_one_rst_close() {
        let out = lines(|p, _| {
            p.kernel_event(event(
                EventKind::Close,
                tcp_state::ESTABLISHED,
                tcp_state::FIN_WAIT1,
                100 * MS,
                99,
                None,
            ));
            p.kernel_event(event(
                EventKind::RstSent,
                tcp_state::CLOSE,
                tcp_state::CLOSE,
                100 * MS + 5_000,
                99,
                Some(13),
            ));
            p.packet(rst_packet(100 * MS + 9_000));
        });
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["event"], "close");
        assert_eq!(out[0]["outcome"], "rst");
        assert_eq!(out[0]["reason"], "TCP_ABORT_ON_MEMORY");
        assert_eq!(out[0]["wire"]["delay_ns"], 9_000);
    }

    /// Held in the kernel until its RST (`ItsReset::Sent`): the close comes with the reason
    /// and waits only for the packet, not for a RST event.
    #[test]
    fn a_close_that_came_with_its_rst_waits_for_no_rst_event() {
        let out = lines(|p, _| {
            let mut close = abortive_close();
            close.its_reset = ItsReset::Sent;
            close.reason = Some(11);
            p.kernel_event(close);
            assert!(p.staged.is_empty(), "not staged for a RST event");
            p.packet(rst_packet(100 * MS + 9_000));
        });
        assert_one_close_with_its_rst(&out);
        assert_eq!(out[0]["wire"]["delay_ns"], 9_000);
    }

    /// A listener's close, which the kernel saw end without a RST (`ItsReset::NotSent`): out at
    /// once, with no outcome and no packet to wait for.
    #[test]
    fn a_close_the_kernel_saw_end_without_a_rst_waits_for_nothing() {
        let out = lines(|p, out| {
            let mut close = event(
                EventKind::Close,
                tcp_state::LISTEN,
                tcp_state::CLOSE,
                100 * MS,
                99,
                None,
            );
            close.its_reset = ItsReset::NotSent;
            p.kernel_event(close);
            p.poll(100 * MS + 1_000, out);
            assert_eq!(p.pending(), 0, "released at the first poll");
        });
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["event"], "close");
        assert_eq!(out[0]["outcome"], serde_json::Value::Null);
        assert_eq!(out[0]["wire"], serde_json::Value::Null);
    }

    /// The ring is read a tick after the events: a close read just before its RST event was
    /// submitted must still wait for it, counted from the read.
    #[test]
    fn an_abortive_close_read_late_still_waits_for_its_rst_event() {
        let out = lines(|p, out| {
            p.reading_at(130 * MS);
            p.kernel_event(abortive_close());
            p.poll(131 * MS, out);
            p.reading_at(140 * MS);
            p.kernel_event(its_rst());
            p.packet(rst_packet(100 * MS + 9_000));
        });
        assert_one_close_with_its_rst(&out);
    }

    /// python's http.server: shutdown(SHUT_WR), then close(2) before the peer's ACK.
    #[test]
    fn a_close_after_a_shutdown_sends_nothing_and_waits_for_nothing() {
        let fin = WirePacket {
            flags: tcp_flags::FIN | tcp_flags::ACK,
            ..rst_packet(100 * MS + 9_000)
        };
        let mut shutdown = event(
            EventKind::Close,
            tcp_state::ESTABLISHED,
            tcp_state::FIN_WAIT1,
            100 * MS,
            98,
            None,
        );
        shutdown.syscall = tracer_common::syscall::SHUTDOWN;
        let out = lines(|p, _| {
            p.kernel_event(shutdown);
            p.packet(fin);
            p.kernel_event(event(
                EventKind::Close,
                tcp_state::FIN_WAIT1,
                tcp_state::FIN_WAIT1,
                100 * MS + 20_000,
                99,
                None,
            ));
        });
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(
            (&out[0]["syscall"], &out[0]["outcome"]),
            (&"shutdown".into(), &"fin".into())
        );
        assert!(out[0]["wire"].is_object(), "{out:?}");
        assert_eq!(out[1]["syscall"], "close");
        assert_eq!(out[1]["outcome"], serde_json::Value::Null);
        assert_eq!(out[1]["wire"], serde_json::Value::Null);
    }

    /// A connection the daemon first hears of at its move out of FIN_WAIT2 (forgotten among
    /// thousands since its shutdown, or in FIN_WAIT2 at start-up): the derived line's time in
    /// FIN_WAIT2 is the kernel's (since its entry there), or unknown (null) when the kernel
    /// did not see it enter: never the 0 of the move itself.
    #[test]
    fn a_derived_fin_takes_the_kernels_fin_wait2_entry_or_says_it_is_unknown() {
        for (entered, expected) in [
            (10 * MS, serde_json::json!(90 * MS + 20_000)),
            (0, serde_json::Value::Null),
        ] {
            let out = lines(|p, out| {
                let mut into_time_wait =
                    ours(tcp_state::FIN_WAIT2, tcp_state::CLOSE, 100 * MS + 14_000);
                into_time_wait.state_since_ns = entered;
                p.kernel_event(into_time_wait);
                p.packet(peer_fin_out(100 * MS + 20_000));
                p.poll(200 * MS, out);
            });
            let fin = out
                .iter()
                .find(|v| v["event"] == "fin_received")
                .unwrap_or_else(|| panic!("{out:?}"));
            assert_eq!(fin["duration_ns"], expected, "{fin}");
        }
    }

    /// Our orphan in FIN_WAIT2 gets the peer's data with its FIN (a blackholed link that came
    /// back): the kernel resets it (FIN_WAIT2 -> CLOSE by tcp_reset(), then a RST in CLOSE,
    /// TCP_ABORT_ON_DATA), with no time-wait form. The peer's FIN derives no `fin_received`
    /// (it said FIN_WAIT2 -> TIME_WAIT beside the abort), and a copy of it captured long
    /// before any move of the socket (dropped on its way in) derives nothing either.
    #[test]
    fn an_orphan_reset_for_the_peers_data_derives_no_fin() {
        let data_and_fin = peer_fin_in; // its headers: the FIN's, whatever data came before
        let abort = |p: &mut Pipeline, at: u64| {
            p.kernel_event(gone_to_time_wait(at));
            let mut rst = event(
                EventKind::RstSent,
                tcp_state::CLOSE,
                tcp_state::CLOSE,
                at + 5_000,
                0,
                Some(12), // TCP_ABORT_ON_DATA
            );
            rst.conn_id = 0xabc;
            p.kernel_event(rst);
        };
        let out = lines(|p, out| {
            p.kernel_event(event(
                EventKind::State,
                tcp_state::FIN_WAIT1,
                tcp_state::FIN_WAIT2,
                50 * MS,
                0,
                None,
            ));
            p.packet(data_and_fin(100 * MS));
            abort(p, 100 * MS + 20_000);
            p.poll(2_000 * MS, out);
        });
        assert!(!names(&out).contains(&"fin_received"), "{out:?}");
        let out = lines(|p, out| {
            p.packet(data_and_fin(100 * MS));
            p.kernel_event(gone_to_time_wait(520 * MS));
            p.poll(2_000 * MS, out);
        });
        assert!(!names(&out).contains(&"fin_received"), "{out:?}");
    }

    /// The peer's FIN was captured, then lost before our socket (a firewall on the way in)
    /// while the socket was still a full one in FIN_WAIT2; the retransmission, after our
    /// socket left for its time-wait form, is the one that reached it: the derived
    /// `fin_received` FIN_WAIT2 -> TIME_WAIT comes from it (before, none: the output read as a
    /// peer that never closed).
    #[test]
    fn a_retransmitted_fin_that_ended_the_wait_derives_the_time_wait() {
        let out = lines(|p, out| {
            p.kernel_event(event(
                EventKind::State,
                tcp_state::FIN_WAIT1,
                tcp_state::FIN_WAIT2,
                10 * MS,
                0,
                None,
            ));
            p.packet(peer_fin_in(20 * MS));
            p.poll(30 * MS, out);
            p.kernel_event(gone_to_time_wait(100 * MS));
            p.packet(peer_fin_in(300 * MS));
            p.poll(2_000 * MS, out);
        });
        let fin = out
            .iter()
            .find(|v| v["event"] == "fin_received")
            .unwrap_or_else(|| panic!("{out:?}"));
        assert_eq!(fin["new_state"], "TIME_WAIT", "{fin}");
        assert_eq!(fin["mono_ns"], 300 * MS, "{fin}");
    }

    /// A RST reaching our socket in TIME_WAIT kills it only at exactly the sequence number
    /// after the peer's FIN, and not at all with net.ipv4.tcp_rfc1337 set
    /// (tcp_timewait_state_process): another RST (blind, forged, late) was dropped by the
    /// kernel, and is a `packet` line here, not a derived `rst_received TIME_WAIT -> CLOSE`.
    /// The one that kills it says how long it was in TIME_WAIT.
    #[test]
    fn only_a_reset_the_kernel_takes_ends_time_wait() {
        let peer_rst = |seq, mono| WirePacket {
            src: "10.0.0.2:4000".parse().unwrap(),
            dst: "10.0.0.1:80".parse().unwrap(),
            flags: tcp_flags::RST,
            seq,
            data_end: seq,
            dir: Dir::In,
            ..rst_packet(mono)
        };
        for (seq, rfc1337, kills) in [(8, false, true), (1008, false, false), (8, true, false)] {
            let out = lines(|p, out| {
                p.rfc1337 = rfc1337;
                p.kernel_event(gone_to_time_wait(100 * MS));
                p.packet(peer_fin_in(120 * MS));
                p.poll(200 * MS, out);
                p.packet(peer_rst(seq, 300 * MS));
                p.poll(2_000 * MS, out);
            });
            let case = format!("seq {seq}, rfc1337 {rfc1337}");
            let reset = out.iter().find(|v| v["event"] == "rst_received");
            assert_eq!(reset.is_some(), kills, "{case}: {out:?}");
            if let Some(reset) = reset {
                assert_eq!(reset["old_state"], "TIME_WAIT", "{case}");
                assert_eq!(reset["duration_ns"], 180 * MS, "{case}: {reset}");
            } else {
                assert!(names(&out).contains(&"packet"), "{case}: {out:?}");
            }
        }
    }

    /// Both ends of a connection are this host's, in two namespaces joined by a veth: a FIN
    /// captured leaving (`out`) that no event claimed names the end that sent it, not the
    /// receiver (whose socket never sent an `out` packet).
    #[test]
    fn a_packet_line_names_the_end_its_direction_is_from() {
        let out = lines(|p, out| {
            p.kernel_event(ours(tcp_state::FIN_WAIT1, tcp_state::FIN_WAIT2, 10 * MS));
            let mut sender = ours(tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK, 20 * MS);
            sender.conn_id = 2;
            (sender.local, sender.remote) = (sender.remote, sender.local);
            p.kernel_event(sender);
            p.packet(peer_fin_out(600 * MS));
            p.poll(2_000 * MS, out);
        });
        let conn_of = |event: &str| {
            let line = out.iter().find(|v| v["event"] == event);
            line.unwrap_or_else(|| panic!("{out:?}"))["conn"].clone()
        };
        let sender = out
            .iter()
            .find(|v| v["lport"] == 4000)
            .expect("sender's line");
        let packet = out
            .iter()
            .find(|v| v["event"] == "packet")
            .expect("packet line");
        assert_eq!(packet["dir"], "out", "{packet}");
        assert_eq!(conn_of("packet"), sender["conn"], "{out:?}");
    }

    /// A keep-alive pool writes on a connection the server closed (idle timeout): the
    /// server's time-wait form answers with a RST, which ends its FIN_WAIT2, and the pool's
    /// CLOSE_WAIT ends with that RST. Both reset lines say how long the socket sat there.
    #[test]
    fn reset_lines_say_how_long_the_socket_sat_in_its_old_state() {
        let out = lines(|p, out| {
            p.kernel_event(ours(tcp_state::FIN_WAIT1, tcp_state::FIN_WAIT2, 10 * MS));
            p.kernel_event(ours(
                tcp_state::FIN_WAIT2,
                tcp_state::CLOSE,
                10 * MS + 10_000,
            ));
            let mut answered = event(
                EventKind::RstSent,
                tcp_state::FIN_WAIT2,
                tcp_state::CLOSE,
                210 * MS,
                0,
                Some(9), // TCP_TIMEWAIT_SOCKET
            );
            answered.conn_id = 0; // a time-wait form has no entry of its own
            p.kernel_event(answered);
            let mut pool = peer_close(5 * MS);
            (pool.kind, pool.old_state, pool.new_state) = (
                EventKind::RstReceived,
                tcp_state::CLOSE_WAIT,
                tcp_state::CLOSE,
            );
            (pool.mono_ns, pool.state_since_ns) = (210 * MS + 5_000, 10 * MS + 2_000);
            p.kernel_event(pool);
            p.poll(1_000 * MS, out);
        });
        let line = |event: &str| {
            out.iter()
                .find(|v| v["event"] == event)
                .unwrap_or_else(|| panic!("{event}: {out:?}"))
        };
        assert_eq!(
            line("rst_sent")["duration_ns"],
            200 * MS,
            "the whole FIN_WAIT2"
        );
        assert_eq!(
            line("rst_received")["duration_ns"],
            200 * MS + 3_000,
            "CLOSE_WAIT"
        );
    }

    fn fin_packet(src: &str, dst: &str, seq: u32, mono: u64) -> WirePacket {
        WirePacket {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            flags: tcp_flags::FIN | tcp_flags::ACK,
            seq,
            data_end: seq,
            ..rst_packet(mono)
        }
    }

    /// The peer's FIN came with the ACK of ours (seen by node's http server closing at once):
    /// our socket went FIN_WAIT1 -> FIN_WAIT2 -> CLOSE microseconds after the capture saw the
    /// packet. The derived line is at that move, with the time really spent in FIN_WAIT2 (it
    /// was null: the packet predates the FIN_WAIT2 transition).
    #[test]
    fn a_fin_that_acked_ours_reaches_time_wait_at_the_kernels_move() {
        let out = lines(|p, out| {
            p.kernel_event(peer_close(100 * MS - 2_000));
            p.packet(peer_fin_out(100 * MS));
            p.kernel_event(ours(
                tcp_state::FIN_WAIT1,
                tcp_state::FIN_WAIT2,
                100 * MS + 5_000,
            ));
            p.kernel_event(ours(
                tcp_state::FIN_WAIT2,
                tcp_state::CLOSE,
                100 * MS + 14_000,
            ));
            p.poll(130 * MS, out); // the peer's close leaves (settled), ours is derived with it
        });
        let fin = out
            .iter()
            .find(|v| v["event"] == "fin_received")
            .unwrap_or_else(|| panic!("{out:?}"));
        assert_eq!(fin["mono_ns"], 100 * MS + 14_000, "{fin}");
        assert_eq!(fin["duration_ns"], 9_000, "{fin}");
        assert_eq!(fin["wire"]["delay_ns"], -14_000, "{fin}");
    }

    /// After shutdown(SHUT_WR) in one thread, the peer's FIN moved the socket to its time-wait
    /// form; another thread closed the descriptor later. The line derived from that FIN names
    /// the owner at the move (it named the later closer, read by the time it was derived).
    #[test]
    fn a_line_derived_from_the_wire_names_the_owner_at_the_time_wait_move() {
        let by = |tid: u32, mut e: KernelEvent| {
            e.owner = Owner::Known {
                pid: 7,
                tid,
                comm: "srv".into(),
                how: "task",
            };
            e
        };
        let out = lines(|p, out| {
            p.kernel_event(by(
                8,
                ours(tcp_state::FIN_WAIT1, tcp_state::FIN_WAIT2, 90 * MS),
            ));
            p.kernel_event(peer_close(100 * MS));
            p.packet(peer_fin_out(100 * MS + 10_000));
            p.kernel_event(by(
                8,
                ours(tcp_state::FIN_WAIT2, tcp_state::CLOSE, 100 * MS + 20_000),
            ));
            let mut close = by(9, ours(tcp_state::CLOSE, tcp_state::CLOSE, 300 * MS));
            close.kind = EventKind::Close;
            p.kernel_event(close);
            p.poll(2_000 * MS, out);
        });
        let fin = out
            .iter()
            .find(|v| v["event"] == "fin_received")
            .unwrap_or_else(|| panic!("{out:?}"));
        assert_eq!(fin["tid"], 8, "{fin}");
    }

    /// Our move to TIME_WAIT is read only after the peer's close left: the packet, which
    /// nobody received, derives the line when its window ends.
    #[test]
    fn a_receiver_seen_after_the_senders_line_left_is_derived_at_the_windows_end() {
        let out = lines(|p, out| {
            p.kernel_event(ours(tcp_state::FIN_WAIT1, tcp_state::FIN_WAIT2, 90 * MS));
            p.kernel_event(peer_close(100 * MS));
            p.packet(peer_fin_out(100 * MS + 10_000));
            p.poll(130 * MS, out);
            p.kernel_event(ours(
                tcp_state::FIN_WAIT2,
                tcp_state::CLOSE,
                100 * MS + 20_000,
            ));
            p.poll(2_000 * MS, out);
        });
        assert_eq!(
            names(&out),
            ["state", "close", "state", "fin_received"],
            "{out:?}"
        );
        assert_eq!(out[3]["derived"], "wire", "{out:?}");
        assert_eq!(out[3]["duration_ns"], 10 * MS + 20_000, "{out:?}");
    }

    /// A remote peer's FIN, then its RST (TIME_WAIT assassination: at the sequence number
    /// after the FIN), reach our socket in TIME_WAIT: both derived from the wire, the RST
    /// once; a full socket reset in FIN_WAIT2 has the kernel's own line and derives nothing.
    #[test]
    fn a_reset_into_time_wait_is_derived_once_and_only_for_a_mini_socket() {
        let rst_in = |mono| WirePacket {
            dir: Dir::In,
            flags: tcp_flags::RST,
            ..fin_packet("10.0.0.2:4000", "10.0.0.1:80", 8, mono)
        };
        let out = lines(|p, out| {
            p.kernel_event(gone_to_time_wait(100 * MS));
            p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, 150 * MS));
            p.packet(rst_in(200 * MS));
            p.packet(rst_in(210 * MS));
            p.poll(2_000 * MS, out);
        });
        assert_eq!(
            names(&out),
            ["state", "fin_received", "rst_received", "packet"],
            "{out:?}"
        );
        assert_eq!(out[2]["old_state"], "TIME_WAIT", "{out:?}");
        assert_eq!(out[2]["derived"], "wire", "{out:?}");

        let mut reset = event(
            EventKind::RstReceived,
            tcp_state::FIN_WAIT2,
            tcp_state::CLOSE,
            100 * MS,
            0,
            None,
        );
        reset.conn_id = 5;
        let out = lines(|p, out| {
            p.kernel_event(reset);
            p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, 150 * MS));
            p.poll(2_000 * MS, out);
        });
        assert_eq!(names(&out), ["rst_received", "packet"], "{out:?}");
    }

    /// A transition of our socket (conn 1, 10.0.0.1:80 <-> 10.0.0.2:4000).
    fn ours(old: u8, new: u8, mono: u64) -> KernelEvent {
        let mut e = event(EventKind::State, old, new, mono, 0, None);
        e.conn_id = 1;
        e
    }

    /// The peer's close (conn 2, on this host too: CLOSE_WAIT -> LAST_ACK, a FIN out).
    fn peer_close(mono: u64) -> KernelEvent {
        let mut e = event(
            EventKind::Close,
            tcp_state::CLOSE_WAIT,
            tcp_state::LAST_ACK,
            mono,
            5,
            None,
        );
        e.conn_id = 2;
        (e.local, e.remote) = (e.remote, e.local);
        e
    }

    /// The peer's FIN, as the capture saw it leave the peer.
    fn peer_fin_out(mono: u64) -> WirePacket {
        WirePacket {
            dir: Dir::Out,
            ..fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, mono)
        }
    }

    /// The peer's FIN, as the capture saw it reach our end.
    fn peer_fin_in(mono: u64) -> WirePacket {
        WirePacket {
            dir: Dir::In,
            ..peer_fin_out(mono)
        }
    }

    /// Our socket (conn 0xabc) leaving FIN_WAIT2 for its time-wait form.
    fn gone_to_time_wait(mono: u64) -> KernelEvent {
        event(
            EventKind::State,
            tcp_state::FIN_WAIT2,
            tcp_state::CLOSE,
            mono,
            0,
            None,
        )
    }

    fn names(out: &[serde_json::Value]) -> Vec<&str> {
        out.iter().map(|v| v["event"].as_str().unwrap()).collect()
    }

    /// Closes (seen by the connection table only) of `count` other connections at `mono`
    /// (their ids clear of the tests' own, such as `event`'s 0xabc).
    fn churn(p: &mut Pipeline, count: u64, mono: u64) {
        for i in 0..count {
            let mut e = ours(tcp_state::LAST_ACK, tcp_state::CLOSE, mono);
            e.conn_id = 1_000_000 + i;
            e.remote = format!("10.0.0.3:{}", 1_000 + i).parse().unwrap();
            p.conns.observe(&e);
        }
    }

    /// A slow peer: it closes seconds after our socket went to its time-wait form, while more
    /// connections than MAX_CONNS closed on the host. Its FIN still derives our line (it was a
    /// bare `packet` line: the churn had pushed the connection out of the table).
    #[test]
    fn a_slow_peers_fin_is_derived_after_a_busy_hosts_churn() {
        let out = lines(|p, out| {
            p.kernel_event(gone_to_time_wait(100 * MS));
            churn(p, MAX_CONNS as u64 + 100, 200 * MS);
            p.poll(5_000 * MS, out);
            p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, 5_000 * MS));
        });
        assert_eq!(names(&out), ["state", "fin_received"], "{out:?}");
        assert_eq!(out[1]["derived"], "wire");
        assert_eq!(out[1]["old_state"], "FIN_WAIT2");
    }

    /// With `--pid` of a server, the untraced client's time-wait socket resets the server's
    /// late reply: the kernel passes that RST (its 4-tuple is the traced connection's, reversed),
    /// but it is the peer's, not a `rst_sent` of ours with no owner; the server's
    /// `rst_received` reports it. A RST our own time-wait socket sends is ours.
    #[test]
    fn with_pid_the_peers_reset_is_not_ours() {
        let unowned_reset = |local: &str, remote: &str| KernelEvent {
            conn_id: 0,
            owner: Owner::Unknown("time-wait socket: no process owns it"),
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            ..event(
                EventKind::RstSent,
                tcp_state::TIME_WAIT,
                tcp_state::TIME_WAIT,
                101 * MS,
                0,
                None,
            )
        };
        let out = lines_with(true, |p, out| {
            p.kernel_event(gone_to_time_wait(100 * MS)); // ours: 10.0.0.1:80 <-> 10.0.0.2:4000
            p.kernel_event(unowned_reset("10.0.0.2:4000", "10.0.0.1:80")); // the peer's
            p.kernel_event(unowned_reset("10.0.0.1:80", "10.0.0.2:4000")); // ours
            p.poll(5_000 * MS, out);
        });
        let resets: Vec<&serde_json::Value> =
            out.iter().filter(|v| v["event"] == "rst_sent").collect();
        assert_eq!(resets.len(), 1, "{out:?}");
        assert_eq!(resets[0]["lport"], 80);
        assert_eq!(resets[0]["owner"], "connection", "{out:?}");
    }

    /// A client that reuses its port within milliseconds: each connection on the same
    /// addresses waits in its time-wait form for the peer's FIN, which is derived from the
    /// wire when its window ends, by then under the address index of the last connection.
    /// Each FIN is its own connection's (the last connection took the first FIN, 18 ms before
    /// its own close; the others were packet lines).
    #[test]
    fn fins_on_reused_addresses_reach_their_own_connections() {
        let out = lines(|p, out| {
            for (i, at) in [(0u64, 100 * MS), (1, 106 * MS), (2, 112 * MS)] {
                let mut tw = gone_to_time_wait(at);
                tw.conn_id = 0xabc + i;
                p.kernel_event(tw);
            }
            for (seq, at) in [(7, 101 * MS), (8, 107 * MS), (9, 113 * MS)] {
                p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", seq, at));
            }
            p.poll(5_000 * MS, out);
        });
        let fins: Vec<(&str, u64)> = out
            .iter()
            .filter(|v| v["event"] == "fin_received")
            .map(|v| {
                (
                    v["conn"].as_str().unwrap(),
                    v["wire"]["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            fins,
            [
                ("0000000000000abc", 7),
                ("0000000000000abd", 8),
                ("0000000000000abe", 9)
            ],
            "{out:?}"
        );
        assert!(!names(&out).contains(&"packet"), "{out:?}");
    }

    /// On a slow machine (the VM suite under emulation) the full socket moves to its
    /// time-wait form milliseconds after the capture saw the FIN that moved it: with no earlier
    /// connection on those addresses, that FIN is still this one's.
    #[test]
    fn a_fin_seen_well_before_the_move_is_the_only_connections() {
        let out = lines(|p, out| {
            p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, 97 * MS));
            p.kernel_event(gone_to_time_wait(100 * MS));
            p.poll(5_000 * MS, out);
        });
        assert_eq!(names(&out), ["state", "fin_received"], "{out:?}");
        assert_eq!(out[1]["wire"]["seq"], 7);
    }

    /// Data reaching our closed socket (an orphan in FIN_WAIT1) makes the kernel abort it with
    /// tcp_reset(), whose tracepoint says "reset received": that move to CLOSE is a `state`
    /// line once the kernel's own RST event (TCP_ABORT_ON_DATA) follows, not an
    /// `rst_received` waiting for a RST nobody sent (`wire: null`, counted unjoined).
    #[test]
    fn a_kernel_abort_on_data_is_not_a_received_reset() {
        use tcp_state::{CLOSE, FIN_WAIT1};
        let out = lines(|p, out| {
            p.kernel_event(event(
                EventKind::RstReceived,
                FIN_WAIT1,
                CLOSE,
                100 * MS,
                0,
                None,
            ));
            let rst = event(
                EventKind::RstSent,
                CLOSE,
                CLOSE,
                100 * MS + 5_000,
                0,
                Some(12),
            );
            p.kernel_event(rst);
            p.packet(WirePacket {
                only_copy: true,
                ..rst_packet(100 * MS + 9_000)
            });
            p.poll(2_000 * MS, out);
        });
        assert_eq!(names(&out), ["state", "rst_sent"], "{out:?}");
        assert_eq!(out[0]["old_state"], "FIN_WAIT1", "{out:?}");
        assert_eq!(out[1]["reason"], "TCP_ABORT_ON_DATA", "{out:?}");
        assert!(out[1]["wire"].is_object(), "{out:?}");
    }

    /// A close() after shutdown(), made while the socket waits in FIN_WAIT2, does not restart
    /// the wait: the peer's FIN, derived from the wire, says how long the socket sat in
    /// FIN_WAIT2 since it got there (it said: since the close).
    #[test]
    fn a_close_in_fin_wait2_does_not_restart_its_wait() {
        use tcp_state::{FIN_WAIT1, FIN_WAIT2};
        let out = lines(|p, out| {
            p.kernel_event(event(
                EventKind::State,
                FIN_WAIT1,
                FIN_WAIT2,
                100 * MS,
                0,
                None,
            ));
            p.kernel_event(event(
                EventKind::Close,
                FIN_WAIT2,
                FIN_WAIT2,
                200 * MS,
                5,
                None,
            ));
            p.kernel_event(gone_to_time_wait(200 * MS + 10_000));
            p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, 300 * MS));
            p.poll(2_000 * MS, out);
        });
        assert_eq!(
            names(&out),
            ["state", "close", "state", "fin_received"],
            "{out:?}"
        );
        assert_eq!(out[3]["duration_ns"], 200 * MS, "{out:?}");
    }

    /// ... but not forever: past the kernel's own FIN_WAIT2 timeout the connection is forgotten
    /// (the peer's FIN can no longer reach that socket).
    #[test]
    fn a_peer_fin_past_the_fin_timeout_is_a_bare_packet() {
        let out = lines(|p, out| {
            p.kernel_event(gone_to_time_wait(100 * MS));
            p.poll(AWAIT_MEMORY_NS + 200 * MS, out);
            let late = AWAIT_MEMORY_NS + 300 * MS;
            p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, late));
            p.poll(late + 1_000 * MS, out);
        });
        assert_eq!(names(&out), ["state", "packet"], "{out:?}");
    }

    /// A FIN of a connection the tracer has no event of yet (no teardown event so far: the
    /// peer's FIN lost on its way in, its copies sent again with backoff): each copy after
    /// the first is a retransmission, as for a known connection.
    #[test]
    fn copies_of_a_fin_on_an_unknown_connection_are_retransmissions() {
        let out = lines(|p, out| {
            for at in [100, 1_500, 4_000, 9_000] {
                p.packet(fin_packet("10.9.9.2:4000", "10.9.9.1:80", 7, at * MS));
                p.poll((at + 1_200) * MS, out);
            }
        });
        let flags: Vec<Option<bool>> = out.iter().map(|l| l["retransmit"].as_bool()).collect();
        assert_eq!(
            flags,
            [Some(false), Some(true), Some(true), Some(true)],
            "{out:?}"
        );
    }

    /// A worker that accepted a connection and has not touched it yet is invisible: the peer's
    /// FIN names the listener's owner (the master, pid 7 here). The worker's close that follows
    /// (after reading the EOF), while the FIN's line still waits, names the worker on both.
    #[test]
    fn the_accepting_workers_close_names_it_on_the_peers_fin() {
        let out = lines(|p, out| {
            let mut fin = event(
                EventKind::FinReceived,
                tcp_state::ESTABLISHED,
                tcp_state::CLOSE_WAIT,
                100 * MS,
                0,
                None,
            );
            fin.owner = Owner::Known {
                pid: 7,
                tid: 7,
                comm: "master".into(),
                how: "listener",
            };
            p.kernel_event(fin);
            let mut close = event(
                EventKind::Close,
                tcp_state::CLOSE_WAIT,
                tcp_state::LAST_ACK,
                100 * MS + 300_000,
                5,
                None,
            );
            close.owner = Owner::Known {
                pid: 9,
                tid: 9,
                comm: "worker".into(),
                how: "task",
            };
            p.kernel_event(close);
            p.poll(2_000 * MS, out);
        });
        assert_eq!(names(&out), ["fin_received", "close"], "{out:?}");
        for line in &out {
            assert_eq!(
                (&line["pid"], &line["owner"]),
                (&9.into(), &"task".into()),
                "{out:?}"
            );
        }
    }

    /// On loopback the capture keeps one copy of each packet (the arriving one with `--pid`),
    /// whose direction says nothing about who sent it: a `packet` line there takes its `dir`
    /// from the connection it names. Our own late FIN is `out`, though captured arriving. So
    /// is one captured arriving on a veth from the namespace our socket is in: the line names
    /// our connection, which sent it (it said `in`, with our connection).
    #[test]
    fn a_loopback_packet_line_has_its_connections_direction() {
        let out = lines(|p, out| {
            p.kernel_event(ours(tcp_state::FIN_WAIT1, tcp_state::FIN_WAIT2, 100 * MS));
            let ours_late = WirePacket {
                iface: StdArc::from("lo"),
                on_loopback: true,
                dir: Dir::In,
                ..fin_packet("10.0.0.1:80", "10.0.0.2:4000", 7, 101 * MS)
            };
            let theirs_on_a_veth = WirePacket {
                dir: Dir::In,
                ..fin_packet("10.0.0.1:80", "10.0.0.2:4000", 9, 102 * MS)
            };
            p.packet(ours_late);
            p.packet(theirs_on_a_veth);
            p.poll(2_000 * MS, out);
        });
        assert_eq!(names(&out), ["state", "packet", "packet"], "{out:?}");
        assert_eq!(out[1]["dir"], "out", "{out:?}");
        assert_eq!(out[2]["dir"], "out", "{out:?}");
    }

    /// Our FIN_WAIT2 socket went to TIME_WAIT; the peer's FIN is derived from the wire once,
    /// and the same FIN seen again seconds later (past the join window) is a retransmission.
    #[test]
    fn a_fin_seen_again_past_the_window_is_a_retransmission() {
        let out = lines(|p, out| {
            p.kernel_event(gone_to_time_wait(100 * MS));
            p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, 101 * MS));
            p.poll(2_000 * MS, out);
            p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, 3_000 * MS));
        });
        assert_eq!(names(&out), ["state", "fin_received", "packet"], "{out:?}");
        assert_eq!(out[1]["derived"], "wire");
        assert_eq!(out[2]["retransmit"], true, "{out:?}");
    }

    /// On loopback the peer's FIN joins the peer's own close line (`out`) and also reaches our
    /// socket, gone to TIME_WAIT, which no kernel event shows: the same packet derives our
    /// `fin_received` (`in`), once; a copy sent again is a retransmission, not a second arrival.
    #[test]
    fn a_fin_joined_to_the_peers_close_also_reaches_our_time_wait_socket_once() {
        let out = lines(|p, out| {
            p.kernel_event(ours(tcp_state::FIN_WAIT2, tcp_state::CLOSE, 100 * MS));
            p.kernel_event(peer_close(101 * MS));
            p.packet(peer_fin_out(101 * MS + 10_000));
            p.poll(2_000 * MS, out);
            p.packet(fin_packet("10.0.0.2:4000", "10.0.0.1:80", 7, 3_000 * MS));
        });
        assert_eq!(
            names(&out),
            ["state", "close", "fin_received", "packet"],
            "{out:?}"
        );
        assert_eq!(out[1]["wire"]["dir"], "out", "{out:?}");
        let fin = &out[2];
        assert_eq!(
            (fin["conn"].as_str(), &fin["derived"]),
            (Some("0000000000000001"), &"wire".into())
        );
        assert_eq!(
            (&fin["old_state"], &fin["new_state"]),
            (&"FIN_WAIT2".into(), &"TIME_WAIT".into())
        );
        assert_eq!(fin["wire"]["dir"], "in", "{out:?}");
        assert_eq!(fin["wire"]["seq"], out[1]["wire"]["seq"], "{out:?}");
        assert_eq!(out[3]["retransmit"], true, "{out:?}");
    }

    /// The same, but our socket never went to TIME_WAIT (it received the FIN in ESTABLISHED,
    /// and its kernel event was lost or is not traced): the sender's line carries the packet
    /// and nothing is derived.
    #[test]
    fn a_fin_joined_to_the_senders_close_derives_nothing_for_an_open_socket() {
        let out = lines(|p, out| {
            p.kernel_event(ours(tcp_state::FIN_WAIT1, tcp_state::FIN_WAIT2, 100 * MS));
            p.kernel_event(peer_close(101 * MS));
            p.packet(peer_fin_out(101 * MS + 10_000));
            p.poll(2_000 * MS, out);
        });
        assert_eq!(names(&out), ["state", "close"], "{out:?}");
    }

    #[test]
    fn without_its_rst_event_the_wire_gives_the_outcome() {
        let out = lines(|p, _| {
            p.kernel_event(abortive_close());
            p.packet(rst_packet(100 * MS + 9_000));
        });
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["outcome"], "rst");
        assert_eq!(out[0]["reason"], serde_json::Value::Null);
        assert!(out[0]["wire"].is_object());
    }

    #[test]
    fn without_capture_nothing_waits_for_a_packet() {
        let path = std::env::temp_dir().join(format!("tracer-nocap-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let out = Output::start(Destination::File(path.clone())).unwrap();
        let mut p = Pipeline::new(
            std::time::Duration::from_millis(500),
            ResetReasons::default(),
            false,
            Format::Json,
            None,
        )
        .capturing(false);
        p.kernel_event(event(
            EventKind::FinReceived,
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE_WAIT,
            100 * MS,
            0,
            None,
        ));
        p.poll(100 * MS + 1, &out);
        assert_eq!(p.pending(), 0, "released at once, not after the window");
        assert_eq!((p.stats.joined, p.stats.unjoined), (0, 0));
        out.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(text.contains("\"wire\":null"), "{text}");
    }

    #[test]
    fn a_time_wait_rst_is_attributed_to_its_connection() {
        let out = lines(|p, _| {
            p.kernel_event(gone_to_time_wait(100 * MS));
            let mut rst = event(
                EventKind::RstSent,
                tcp_state::TIME_WAIT,
                tcp_state::TIME_WAIT,
                200 * MS,
                0,
                Some(9),
            );
            rst.conn_id = 0;
            rst.owner = Owner::Unknown("unknown");
            p.kernel_event(rst);
        });
        let rst = out.iter().find(|v| v["event"] == "rst_sent").unwrap();
        assert_eq!(rst["pid"], 7);
        assert_eq!(rst["owner"], "connection");
        assert_eq!(rst["conn"], "0000000000000abc");
    }

    /// Once our time-wait socket has expired (the FIN_WAIT2 timeout), the peer's segments
    /// reach the listener, or no socket: that RST is the connection's, and the peer's FIN that
    /// drew it reached no socket of ours (no fin_received derived from the wire).
    #[test]
    fn a_rst_for_a_connection_past_its_time_wait_form_is_its_and_ends_it() {
        for (state, owner) in [
            (tcp_state::LISTEN, Owner::Unknown("listener")),
            (0, Owner::Unknown("no socket")),
        ] {
            let out = lines(|p, out| {
                p.kernel_event(gone_to_time_wait(100 * MS));
                p.packet(WirePacket {
                    dir: Dir::In,
                    ..fin_packet("10.0.0.2:4000", "10.0.0.1:80", 9, 3_000 * MS)
                });
                let mut rst = event(
                    EventKind::RstSent,
                    state,
                    state,
                    3_000 * MS + 20_000,
                    0,
                    None,
                );
                rst.conn_id = 0;
                rst.owner = owner;
                p.kernel_event(rst);
                p.poll(5_000 * MS, out);
            });
            assert_eq!(names(&out), ["state", "rst_sent", "packet"], "{out:?}");
            assert_eq!(out[1]["owner"], "connection", "{out:?}");
            assert_eq!(out[1]["conn"], "0000000000000abc", "{out:?}");
        }
    }

    /// The time-wait form's FIN_WAIT2 timed out (an event with no socket and no owner): a
    /// `state` line of the connection, with the whole time in FIN_WAIT2; the peer's FIN that
    /// comes later reached no socket of ours, so no `fin_received` is derived from it.
    #[test]
    fn a_fin_wait2_timeout_is_its_connections_and_ends_its_wait() {
        let out = lines(|p, out| {
            p.kernel_event(ours(tcp_state::FIN_WAIT1, tcp_state::FIN_WAIT2, 100 * MS));
            let mut handed_over = gone_to_time_wait(100 * MS + 20_000);
            handed_over.conn_id = 1;
            p.kernel_event(handed_over);
            let mut timeout = event(
                EventKind::Fin2Timeout,
                tcp_state::FIN_WAIT2,
                tcp_state::CLOSE,
                1_100 * MS,
                0,
                None,
            );
            timeout.conn_id = 0;
            timeout.owner = Owner::Unknown("time-wait socket");
            p.kernel_event(timeout);
            p.packet(WirePacket {
                dir: Dir::In,
                ..fin_packet("10.0.0.2:4000", "10.0.0.1:80", 9, 3_000 * MS)
            });
            p.poll(5_000 * MS, out);
        });
        assert_eq!(
            names(&out),
            ["state", "state", "state", "packet"],
            "{out:?}"
        );
        let end = &out[2];
        assert_eq!(end["owner"], "connection", "{out:?}");
        assert_eq!(end["conn"], "0000000000000001", "{out:?}");
        assert_eq!(end["old_state"], "FIN_WAIT2", "{out:?}");
        assert_eq!(end["duration_ns"], 1_000 * MS, "{out:?}");
    }

    #[test]
    fn a_rst_of_another_call_is_its_own_line() {
        let out = lines(|p, _| {
            p.kernel_event(abortive_close());
            p.kernel_event(event(
                EventKind::RstSent,
                tcp_state::CLOSE,
                tcp_state::CLOSE,
                100 * MS + 5_000,
                0,
                Some(11),
            ));
        });
        let kinds = names(&out);
        assert_eq!(kinds.len(), 2, "{out:?}");
        assert!(kinds.contains(&"rst_sent") && kinds.contains(&"close"));
    }
}

/// The daemon's share of the RST-churn benchmark without the kernel or the machine's noise:
/// `TRACER_CHURN_CONNS=400000 cargo test --release -p tracer --bins churn_throughput --
/// --nocapture` prints the pipeline's time per connection (a profile of this test is a
/// profile of the join). In the suite it runs 20k connections and checks only that every
/// line came out joined: a measurement, never a timed assertion.
#[cfg(test)]
mod throughput {
    use std::{sync::Arc, time::Instant};

    use super::*;
    use crate::{
        kernel::Family,
        output::{Destination, Output},
    };

    /// Connections fed through (TRACER_CHURN_CONNS overrides: 400000 to measure).
    fn conns() -> u64 {
        std::env::var("TRACER_CHURN_CONNS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(20_000)
    }
    /// 40k connections/s, the bench's rate without the tracer.
    const APART_NS: u64 = 25_000;
    /// Events and packets handed over per loop turn, as the daemon drains its rings.
    const PER_TURN: u64 = 64;

    fn addr(port: u64) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 1024 + (port % 60_000) as u16))
    }

    /// Connection ids as the kernel draws them: random.
    fn splitmix64(i: u64) -> u64 {
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// What the capture shares between its packets (interface name, no headers without -w)
    /// and the owner, made once as the daemon makes them once.
    struct Shared {
        iface: Arc<str>,
        no_headers: Arc<[u8]>,
        owner: Owner,
    }

    /// One RST-churn connection as the daemon sees it: the server's abortive close (held in the
    /// kernel with its RST), the client's received reset, the RST on the wire.
    fn connection(i: u64, shared: &Shared, pipeline: &mut Pipeline) {
        let t = 1_000_000_000 + i * APART_NS;
        let (server, client) = (addr(8080 + i), addr(40_000 + i * 7));
        let base = KernelEvent {
            kind: EventKind::Close,
            mono_ns: t,
            conn_id: splitmix64(i),
            state_since_ns: t - 20_000,
            call_id: i + 1,
            owner: shared.owner,
            family: Family::Ipv4,
            local: server,
            remote: client,
            old_state: tcp_state::ESTABLISHED,
            new_state: tcp_state::CLOSE,
            syscall: tracer_common::syscall::CLOSE,
            fd: Some(5),
            reason: Some(11),
            its_reset: ItsReset::Sent,
            rst_ack: None,
            sk_err: None,
        };
        let received = KernelEvent {
            kind: EventKind::RstReceived,
            mono_ns: t + 5_000,
            conn_id: splitmix64(i + (1 << 40)),
            local: client,
            remote: server,
            syscall: 0,
            fd: None,
            reason: None,
            its_reset: ItsReset::Unknown,
            call_id: 0,
            ..base.clone()
        };
        pipeline.kernel_event(base);
        pipeline.kernel_event(received);
        pipeline.packet(WirePacket {
            mono_ns: t + 4_000,
            wall_ns: t + 4_000,
            src: server,
            dst: client,
            flags: tcp_flags::RST | tcp_flags::ACK,
            seq: i as u32,
            data_end: i as u32,
            ack: 1,
            iface: shared.iface.clone(),
            dir: Dir::Out,
            headers: shared.no_headers.clone(),
            only_copy: true, // on `lo`, as in the bench
            on_loopback: true,
        });
    }

    #[test]
    fn churn_throughput() {
        let out = Output::start(Destination::File("/dev/null".into())).unwrap();
        let reasons = ResetReasons::new([(11, "TCP_ABORT_ON_CLOSE".to_string())].into());
        let mut pipeline = Pipeline::new(
            std::time::Duration::from_millis(500),
            reasons,
            false,
            Format::Json,
            None,
        );
        let shared = Shared {
            iface: Arc::from("lo"),
            no_headers: Arc::from(&[][..]),
            owner: Owner::Known {
                pid: 4242,
                tid: 4243,
                comm: "loadgen".into(),
                how: "task",
            },
        };
        let conns = conns();
        let started = Instant::now();
        for i in 0..conns {
            connection(i, &shared, &mut pipeline);
            if i % PER_TURN == PER_TURN - 1 {
                pipeline.poll(1_000_000_000 + i * APART_NS, &out);
            }
        }
        pipeline.flush(&out);
        let elapsed = started.elapsed();
        out.finish().unwrap();
        println!(
            "pipeline: {:.2} µs per RST-churn connection ({conns} connections, {:?})",
            elapsed.as_secs_f64() * 1e6 / conns as f64,
            elapsed
        );
        let stats = &pipeline.stats;
        assert_eq!((stats.joined, stats.unjoined), (2 * conns, 0));
    }
}
