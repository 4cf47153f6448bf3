//! sock:inet_sock_set_state: every TCP state change, classified in the kernel because only here
//! is it known whether the owner was inside a close call.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_comm, generated::bpf_ktime_get_ns},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{
    AF_INET, AF_INET6, EventKind, IPPROTO_TCP, NONE, SeedOwner, SockEvent, SockLayout, TupleLayout,
    counter, owner_source, syscall, tcp_state::*,
};

use crate::{
    calls::{
        Context, PendingCall, call_acting_on, in_a_teardown_call, is_traced_process, runs_in_task,
    },
    capture_filter::watch,
    emit::{
        CLASSIC_SLOT, Record, Span, admit, count, enter_raw, kernel_read, leave_raw, noop,
        ports_pass, scratch_event, write_event,
    },
    held::{hold, waits_for_its_reset},
    owners::{
        Current, RELEASED, RELEASED_MAYBE, SockInfo, claim, current, drop_stale_entry, fill_owner,
        forget_listener, forget_listener_shared_with, keep_unowned, listener_owner,
        lookup_or_create, may_concern_traced, note_listener_close, note_ports, note_traced,
        purged_with_its_listener, remember_listener, sock_entry,
    },
    setting,
};

#[tracepoint]
pub fn set_state(ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let _ = from_record(&ctx);
    0
}

/// The same tracepoint as a raw tracepoint, where the kernel's BTF gave `struct sock`'s
/// offsets: no record is built for the program, and the socket and both states arrive as
/// arguments, so most transitions (the handshake) cost no memory read at all.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn set_state_raw(ctx: RawTracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let Some(slot) = enter_raw() else {
        return 0;
    };
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: u64 = ctx.arg(0);
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    let fields = SockFields {
        sk,
        // The arguments array lies on the kernel stack this program runs on.
        stack: ctx.as_ptr() as u64,
    };
    let _ = handle(&fields, sk, old as u8, new as u8, slot);
    leave_raw(slot);
    0
}

#[inline(always)]
fn from_record(ctx: &TracePointContext) -> Option<()> {
    let layout: TupleLayout = setting!(set_state);
    let rec = Record::copy(ctx, layout.record_len)?;
    let sk: u64 = rec.get(layout.skaddr)?;
    let old = rec.get::<i32>(layout.oldstate)? as u8;
    let new = rec.get::<i32>(layout.newstate)? as u8;
    let fields = RecordFields {
        rec: &rec,
        layout: &layout,
    };
    handle(&fields, sk, old, new, CLASSIC_SLOT)
}

/// Where a transition's protocol, family, ports and addresses are read from.
pub trait TupleSource {
    /// None when this kernel does not say (the old tracepoint had no protocol field).
    fn protocol(&self) -> Option<u16>;
    fn family_and_port(&self) -> Option<(u16, u16)>;
    fn read_tuple(&self, ev: &mut SockEvent) -> Option<()>;
    /// Where the program runs, as far as its arguments show.
    fn context(&self) -> Context;
}

/// A classic tracepoint's record, with the layout from its format file.
pub struct RecordFields<'a> {
    pub rec: &'a Record<'a>,
    pub layout: &'a TupleLayout,
}

impl TupleSource for RecordFields<'_> {
    #[inline(always)]
    fn protocol(&self) -> Option<u16> {
        self.rec.get(self.layout.protocol)
    }

    #[inline(always)]
    fn family_and_port(&self) -> Option<(u16, u16)> {
        family_and_port(self.rec, self.layout)
    }

    #[inline(always)]
    fn read_tuple(&self, ev: &mut SockEvent) -> Option<()> {
        read_tuple(self.rec, self.layout, ev)
    }

    /// A classic tracepoint's record is in a per-CPU buffer, not on the stack.
    #[inline(always)]
    fn context(&self) -> Context {
        Context::Unknown
    }
}

/// The socket itself, at the offsets the kernel's BTF gave (`Config::sock`).
pub struct SockFields {
    pub sk: u64,
    /// An address on the kernel stack the program runs on (0: not known).
    pub stack: u64,
}

impl SockFields {
    #[inline(always)]
    pub fn new(sk: u64) -> Self {
        Self { sk, stack: 0 }
    }

    #[inline(always)]
    fn read<T>(&self, offset: u16) -> Option<T> {
        kernel_read(self.sk, offset)
    }
}

impl TupleSource for SockFields {
    #[inline(always)]
    fn protocol(&self) -> Option<u16> {
        let layout: SockLayout = setting!(sock);
        if layout.protocol_size == 1 {
            self.read::<u8>(layout.protocol).map(u16::from)
        } else {
            self.read::<u16>(layout.protocol)
        }
    }

    #[inline(always)]
    fn family_and_port(&self) -> Option<(u16, u16)> {
        let port: u16 = self.read(setting!(sock.sport))?;
        Some((self.read(setting!(sock.family))?, u16::from_be(port)))
    }

    #[inline(always)]
    fn read_tuple(&self, ev: &mut SockEvent) -> Option<()> {
        let layout: SockLayout = setting!(sock);
        read_sock_tuple(self.sk, layout.sport, layout.saddr, ev)
    }

    #[inline(always)]
    fn context(&self) -> Context {
        match self.stack {
            0 => Context::Unknown,
            at => Context::Stack(at),
        }
    }
}

/// A socket's family, ports and addresses at `base`, at the offsets the kernel's BTF gave: the
/// local port and IPv4 address at `sport` and `saddr` (inet_sock's for a full socket, its own
/// for a time-wait socket), the rest in sock_common, which both kinds begin with.
#[inline(always)]
pub fn read_sock_tuple(base: u64, sport: u16, saddr: u16, ev: &mut SockEvent) -> Option<()> {
    let layout: SockLayout = setting!(sock);
    // Two reads instead of five: sock_common's daddr, dport and family lie within 24 bytes,
    // inet_sock's inet_saddr and inet_sport within 8 (on every kernel we know; a field outside
    // its span is read on its own).
    let common = Span::<24>::read(base, &[layout.family, layout.dport, layout.daddr]);
    let local = Span::<8>::read(base, &[sport, saddr]);
    ev.family = common.get(layout.family)?;
    ev.lport = u16::from_be(local.get(sport)?);
    ev.rport = u16::from_be(common.get(layout.dport)?);
    if ev.family == AF_INET {
        let l: [u8; 4] = local.get(saddr)?;
        let r: [u8; 4] = common.get(layout.daddr)?;
        ev.laddr[..4].copy_from_slice(&l);
        ev.raddr[..4].copy_from_slice(&r);
    } else if ev.family == AF_INET6 {
        ev.laddr = kernel_read(base, layout.v6_rcv_saddr)?;
        ev.raddr = kernel_read(base, layout.v6_daddr)?;
    } else {
        return None;
    }
    Some(())
}

/// Reads family, ports and addresses with the layout found in the format file.
#[inline(always)]
pub fn read_tuple(rec: &Record, layout: &TupleLayout, ev: &mut SockEvent) -> Option<()> {
    ev.family = rec.get::<u16>(layout.family)?;
    ev.lport = rec.get::<u16>(layout.sport)?;
    ev.rport = rec.get::<u16>(layout.dport)?;
    if ev.family == AF_INET {
        let l: [u8; 4] = rec.get(layout.saddr)?;
        let r: [u8; 4] = rec.get(layout.daddr)?;
        ev.laddr[..4].copy_from_slice(&l);
        ev.raddr[..4].copy_from_slice(&r);
    } else if ev.family == AF_INET6 {
        ev.laddr = rec.get(layout.saddr_v6)?;
        ev.raddr = rec.get(layout.daddr_v6)?;
    } else {
        return None;
    }
    Some(())
}

/// Family and local port only: what finding a listener needs.
#[inline(always)]
pub fn family_and_port(rec: &Record, layout: &TupleLayout) -> Option<(u16, u16)> {
    Some((rec.get(layout.family)?, rec.get(layout.sport)?))
}

fn is_handshake(new: u8) -> bool {
    matches!(
        new,
        SYN_SENT | SYN_RECV | ESTABLISHED | LISTEN | NEW_SYN_RECV
    )
}

/// The first move of a connection's socket: a connect() (CLOSE -> SYN_SENT; a socket whose
/// connect failed may connect again: a new connection), or a child cloned from its listener
/// when the handshake completes (LISTEN -> SYN_RECV, the state the clone copied). Whatever
/// entry exists at its address then is not this connection's.
fn is_new_socket(old: u8, new: u8) -> bool {
    matches!((old, new), (CLOSE, SYN_SENT) | (LISTEN, SYN_RECV))
}

/// Transitions that only tcp_close()/tcp_shutdown() make, always in the owner's task.
fn is_local_close(old: u8, new: u8) -> bool {
    matches!(
        (old, new),
        (ESTABLISHED, FIN_WAIT1) | (SYN_RECV, FIN_WAIT1) | (CLOSE_WAIT, LAST_ACK)
    )
}

/// Transitions caused by the peer's FIN arriving.
fn is_fin_received(old: u8, new: u8) -> bool {
    matches!((old, new), (ESTABLISHED, CLOSE_WAIT) | (FIN_WAIT1, CLOSING))
}

#[inline(always)]
fn handle(src: &impl TupleSource, sk: u64, old: u8, new: u8, slot: u32) -> Option<()> {
    // Most transitions are the handshake; unless they are shown, or connect()/listen() must
    // record an owner (with --pid only a traced task's), they need nothing more: return before
    // reading the tuple.
    if is_new_socket(old, new) {
        drop_stale_entry(sk);
    }
    let cur = current();
    let records_owner = old == CLOSE && matches!(new, SYN_SENT | LISTEN) && keep_unowned(&cur);
    if old == CLOSE && new == LISTEN && !records_owner && setting!(filter_pids) != 0 {
        // Another process's listener on a traced listener's port (SO_REUSEPORT).
        let (family, port) = src.family_and_port()?;
        forget_listener_shared_with(sk, family, port);
        return None;
    }
    // With --pid, the capture filter learns a traced connection when it is established.
    let watches = new == ESTABLISHED && setting!(filter_pids) != 0;
    // An accepted socket is established: it takes its listener's owner now (see
    // `remember_handshake_owner`).
    let accepted = old == SYN_RECV && new == ESTABLISHED;
    if is_handshake(new) && !records_owner && !watches && !accepted && setting!(all_states) == 0 {
        if old == SYN_SENT && new == ESTABLISHED {
            note_connected(sk);
        }
        return None;
    }
    if !may_concern_traced(sk, &cur, || src.family_and_port()) {
        if !is_handshake(new) {
            count(counter::FILTERED);
        }
        return None;
    }
    // inet_sock_set_state also fires for SCTP and MPTCP sockets. (Checked after the --pid
    // decision: for a raw tracepoint it is one more read of the socket.)
    if src.protocol().is_some_and(|p| p != IPPROTO_TCP) {
        return None;
    }
    let ev = scratch_event(slot)?;
    src.read_tuple(ev)?;
    if !ports_pass(ev.lport, ev.rport) {
        return None; // cheapest exit for unrelated ports: no table work at all
    }
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.old_state = old;
    ev.new_state = new;

    if is_handshake(new) {
        remember_handshake_owner(sk, old, new, ev, &cur, watches, slot);
        if setting!(all_states) == 0 {
            return None;
        }
    }
    // Looked up first: a delete takes the bucket lock even when there is nothing to delete.
    let closing_listener =
        old == LISTEN && new == CLOSE && listener_owner(sk, ev.family, ev.lport).is_some();
    let Some(info_ptr) = lookup_or_create(sk, ev, keep_unowned(&cur), true) else {
        if closing_listener {
            forget_listener(sk, ev.family, ev.lport);
        }
        if setting!(filter_pids) != 0 {
            count(counter::FILTERED);
        }
        return None;
    };
    // SAFETY: entry pointer from the map; only events of this socket write it.
    let info = unsafe { &mut *info_ptr };
    if closing_listener {
        // Its owner stays in LISTENERS for the connections its close resets (see
        // `never_accepted`) until the socket is destroyed, at the end of that close.
        info.closed_listener_family = ev.family;
        note_listener_close(sk);
    }
    ev.state_since_ns = info.state_since_ns;
    if old != new {
        // A close() in FIN_WAIT2 (after shutdown) stores the same state again: the socket has
        // been in it since it got there, not since the close.
        info.state_since_ns = ev.ts_ns;
    }
    note_ports(info, ev);

    // The owner before this event: a close by a forked, untraced child claims it below.
    note_traced(info);
    let context = src.context();
    let kind = classify(sk, old, new, info, &cur, ev, context)?;
    ev.kind = kind as u8;
    if kind == EventKind::State && new == CLOSE {
        ev.sk_err = socket_error(sk);
    }
    fill_owner(ev, info);
    note_traced(info);
    if admit(ev, info.traced != 0, slot) && !(waits_for_its_reset(ev, context) && hold(sk, ev)) {
        write_event(ev);
    }
    Some(())
}

/// The socket's error (`sk_err`, where the BTF gave its offset): why the kernel gave up on a
/// connection that moved to CLOSE with no close and no reset (ETIMEDOUT: its retransmissions
/// or TCP_USER_TIMEOUT ran out). 0 when none or not known.
#[inline(always)]
fn socket_error(sk: u64) -> u8 {
    kernel_read::<i32>(sk, setting!(sock.err)).map_or(0, |err| err.clamp(0, 255) as u8)
}

/// Decides what the transition means, claiming the socket for the current task when the task
/// is provably the one closing it.
#[inline(always)]
fn classify(
    sk: u64,
    old: u8,
    new: u8,
    info: &mut SockInfo,
    cur: &Current,
    ev: &mut SockEvent,
    context: Context,
) -> Option<EventKind> {
    if new == CLOSE && info.rst_received != 0 {
        return Some(EventKind::RstReceived);
    }
    let local = is_local_close(old, new);
    if local || new == CLOSE || old == new {
        let context = if local { Context::Task } else { context };
        let unaccepted = !local && never_accepted(sk, info);
        if unaccepted {
            // No file will ever release it: its destruction is no close either.
            info.released = RELEASED;
        }
        let call = if unaccepted {
            None
        } else {
            call_acting_on(sk, Some(info), context)
        };
        if let Some(call) = call {
            // An exit's call takes only what the exiting task itself closes: a softirq running
            // in its context may move anyone's socket. Its own close shows as the owner being
            // this process, as a move only a close makes, or as tcp_close()'s move to CLOSE in
            // the task's own context (a child that inherited the socket and never used it: a
            // listener a forking server's children keep after the parent is gone).
            // So is tcp_close()'s store of the same state (a shut-down socket's last
            // reference dropped: a forked child exiting after its parent closed its copy).
            let exit_closes_it = exit_may_close(&call, info, cur)
                || local
                || ((new == CLOSE || old == new) && tcp_close_in_task(sk, context));
            let first_in_call = info.closed_by_call != call.started_ns;
            if first_in_call && exit_closes_it {
                closed_by(&call, info, cur, ev);
                return Some(EventKind::Close);
            }
        }
        if local {
            // A close with no visible call (io_uring, close_range, a deferred fput), or a
            // shutdown (io_uring's): a later close call on the socket is its release.
            info.closed_by_call = 0;
            info.released = RELEASED_MAYBE;
            claim(info, cur);
            return Some(EventKind::Close);
        }
        // tcp_close() in no call: its move to CLOSE, or its store of the state again after a
        // shutdown (a dup2() over the descriptor: the JDK's Socket.close() while another
        // thread reads; that thread's syscall ending with the last reference).
        if (new == CLOSE && closed_outside_calls(sk, info, cur, context))
            || (old == new && closed_again_outside_calls(sk, info, context))
        {
            // No call is known. A task of another process only finished the owner's close:
            // the owner stays.
            if info.pid == cur.pid {
                claim(info, cur);
            }
            info.closed_by_call = 0;
            info.released = RELEASED;
            return Some(EventKind::Close);
        }
        if old == new {
            return None; // a redundant store of the same state outside any close
        }
    }
    if is_fin_received(old, new) {
        return Some(EventKind::FinReceived);
    }
    Some(EventKind::State)
}

/// Whether the socket is a connection no process ever accepted (no `struct socket`, and no
/// close released it): one still in a listener's queue, reset by the kernel when the listener
/// is closed (inet_csk_listen_stop, inside the listener's close(2) or exit). That close is the
/// listener's, not this connection's: no call on a descriptor closes a socket that never had
/// one. (A closed socket loses its `struct socket` too, but only after its last move in the
/// close: `released` is set by then.) False where the BTF gave no offset.
#[inline(always)]
pub fn never_accepted(sk: u64, info: &SockInfo) -> bool {
    info.released == 0 && kernel_read::<u64>(sk, setting!(sock.socket)) == Some(0)
}

/// Whether this move to CLOSE is tcp_close()'s, in the current task's own context: tcp_close()
/// sets `sk_shutdown` to SHUTDOWN_MASK first thing (as `closed_outside_calls` reads it), and
/// holds the socket's lock.
#[inline(always)]
fn tcp_close_in_task(sk: u64, context: Context) -> bool {
    const SHUTDOWN_MASK: u8 = 3;
    runs_in_task(context)
        && kernel_read::<u8>(sk, setting!(sock.shutdown)) == Some(SHUTDOWN_MASK)
        && locked_by_a_task(sk)
}

/// Whether a task holds the socket's lock (`sk_lock.owned`), as tcp_close() does: a softirq
/// moves a socket only while no task holds it, also when it runs on a task's stack (in
/// ksoftirqd, or where a task re-enabled bottom halves), and there a shutdown(SHUT_WR) and
/// the peer's FIN leave `sk_shutdown` at SHUTDOWN_MASK too. True where the kernel's BTF did
/// not say where the field is.
#[inline(always)]
fn locked_by_a_task(sk: u64) -> bool {
    let owned = setting!(sock.owned);
    owned == NONE || kernel_read::<u32>(sk, owned).is_some_and(|held| held != 0)
}

/// Whether `call`, if it is an exit, is the socket's own process exiting (or the socket has no
/// known owner): a softirq running in an exiting task's context may move anyone's socket.
#[inline(always)]
fn exit_may_close(call: &PendingCall, info: &SockInfo, cur: &Current) -> bool {
    call.kind != syscall::EXIT || info.owner_source == owner_source::UNKNOWN || info.pid == cur.pid
}

/// Records that `call` closed (or shut down) the socket: the event names the call, and the
/// socket is the closing task's.
#[inline(always)]
fn closed_by(call: &PendingCall, info: &mut SockInfo, cur: &Current, ev: &mut SockEvent) {
    info.closed_by_call = call.started_ns;
    if call.kind != syscall::SHUTDOWN {
        info.released = RELEASED;
    }
    call.stamp(ev);
    claim(info, cur);
}

/// Whether tcp_close() runs outside any teardown call the programs see: the last reference to
/// the socket's file went otherwise than by close(2), close_range(2) or an exit, and the
/// kernel finishes the close at the end of that syscall:
/// - in a task that only borrowed the file, of another process: one that lists /proc/PID/fd
///   (ls, lsof, a monitoring agent, another tracer's start-up) holds each file for a moment,
///   and when the owner closes its descriptor meanwhile, the last reference is that task's;
/// - in the owner itself: a dup2()/dup3() over the descriptor, an exec closing it
///   (close-on-exec), only for a socket no call claimed before (one shut down earlier may yet
///   time out in a later syscall).
/// Seen here as a move to CLOSE in process context, in no teardown call, with `sk_shutdown`
/// at SHUTDOWN_MASK: tcp_close() sets that first, tcp_done() (a timeout run when a send()
/// releases the socket) only after its move. Told only where calls are named from the
/// registers.
#[inline(always)]
fn closed_outside_calls(sk: u64, info: &SockInfo, cur: &Current, context: Context) -> bool {
    info.released == 0
        && info.owner_source != owner_source::UNKNOWN
        && (info.pid != cur.pid || info.closed_by_call == 0)
        && tcp_close_in_task(sk, context)
}

/// Whether a store of the same state is tcp_close()'s, outside any call: only tcp_close()
/// stores a state again (FIN_WAIT1, FIN_WAIT2, CLOSING, LAST_ACK: a shut-down socket's close
/// has no move to make), after setting `sk_shutdown` to SHUTDOWN_MASK, always in process
/// context. Unlike a move to CLOSE (`closed_outside_calls`), no timeout makes such a store,
/// so a shutdown call before it does not matter; a close already seen does.
#[inline(always)]
fn closed_again_outside_calls(sk: u64, info: &SockInfo, context: Context) -> bool {
    info.released != RELEASED
        && info.owner_source != owner_source::UNKNOWN
        && tcp_close_in_task(sk, context)
}

/// tcp_close() of a socket already in CLOSE (reset by the peer, refused, or past a completed
/// half-close whose full socket handed over to its time-wait form) moves no state: it destroys
/// the socket at once, in the closing task. That destruction inside a close call (or an exit)
/// is the only trace of the close: it gives the close line, `CLOSE -> CLOSE`, which sent
/// nothing. Told only where calls are named from the registers (the task's context must be
/// known: a softirq destroys orphans in whatever task it interrupts).
#[inline(always)]
pub fn close_of_a_closed_socket(
    sk: u64,
    info_ptr: *mut SockInfo,
    stack: u64,
    slot: u32,
) -> Option<()> {
    let context = Context::Stack(stack);
    // SAFETY: entry pointer from the map; only events of this socket write it.
    let info = unsafe { &mut *info_ptr };
    if info.released == RELEASED || !runs_in_task(context) || purged_with_its_listener(sk) {
        // Its close was seen (and gave its line), this is no task's doing, or it is a
        // connection never accepted going with its listener.
        return None;
    }
    let call = call_acting_on(sk, Some(info), context)?;
    let cur = current();
    // In the task's own context (above) an exit destroys only what the exiting task held the
    // last reference to: also another process's socket it inherited (a forked child exiting
    // after its parent closed its copy), which names the child.
    if call.kind == syscall::SHUTDOWN {
        return None;
    }
    emit_close_of_a_closed_socket(sk, info, slot, |info, ev| closed_by(&call, info, &cur, ev))
}

/// The same destruction in no call at all: a close io_uring made (or a dup2 over the
/// descriptor), in a task of the owner's own process (one of another process only borrowed
/// the file: see `closed_outside_calls`). After a move no call showed (`RELEASED_MAYBE`) this
/// may be that close's end: no line. Run after `close_of_a_closed_socket`, which releases the
/// socket when a call closed it.
#[inline(always)]
pub fn close_of_a_closed_socket_by_no_call(
    sk: u64,
    info_ptr: *mut SockInfo,
    stack: u64,
    slot: u32,
) -> Option<()> {
    let context = Context::Stack(stack);
    // SAFETY: entry pointer from the map; only events of this socket write it.
    let info = unsafe { &mut *info_ptr };
    let cur = current();
    if info.released != 0
        || info.owner_source == owner_source::UNKNOWN
        || info.pid != cur.pid
        || !runs_in_task(context)
        || in_a_teardown_call(context)
        || purged_with_its_listener(sk)
    {
        return None;
    }
    emit_close_of_a_closed_socket(sk, info, slot, |info, _| {
        info.closed_by_call = 0;
        info.released = RELEASED;
        claim(info, &cur);
    })
}

/// The `CLOSE -> CLOSE` close line of `close_of_a_closed_socket`; `closing` records the close
/// on the socket's entry (and names the call on the event, if one is known).
#[inline(always)]
fn emit_close_of_a_closed_socket(
    sk: u64,
    info: &mut SockInfo,
    slot: u32,
    closing: impl FnOnce(&mut SockInfo, &mut SockEvent),
) -> Option<()> {
    let ev = scratch_event(slot)?;
    SockFields::new(sk).read_tuple(ev)?;
    // A connect() that failed was disconnected (tcp_disconnect() zeroes the remote end and
    // the source address): its ports are the ones its earlier events saw, and the daemon
    // fills the addresses in from the connection (an unspecified remote address says so).
    if ev.rport == 0 {
        ev.lport = info.lport;
        ev.rport = info.rport;
        ev.laddr = [0; 16];
        ev.raddr = [0; 16];
    }
    if !ports_pass(ev.lport, ev.rport) {
        return None;
    }
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.old_state = CLOSE;
    ev.new_state = CLOSE;
    ev.kind = EventKind::Close as u8;
    ev.state_since_ns = info.state_since_ns;
    note_traced(info); // the owner before the close (see `handle`)
    closing(info, ev);
    fill_owner(ev, info);
    note_traced(info);
    if admit(ev, info.traced != 0, slot) {
        write_event(ev);
    }
    Some(())
}

/// What the handshake must record: the owner of a traced task's connect() or listen() (with
/// `--pid`, other processes' need no bookkeeping); an accepted socket's entry, with its
/// listener's owner, once established: until the accepting process touches it, the listener is
/// all that names its owner, and a listener may close first (a one-shot server, a graceful
/// restart's old listeners), after which the connection's FIN or RST would be no one's (with
/// `--pid`, only a traced listener's connections get one); and, with `--pid`, a traced
/// connection is marked for the capture filter once established (the first FIN or RST may be
/// the peer's, on the wire before any other event of the socket). (One call of
/// `lookup_or_create` for all: a second inlined copy put set_state over the 512-byte stack on
/// 6.1.)
#[inline(always)]
fn remember_handshake_owner(
    sk: u64,
    old: u8,
    new: u8,
    ev: &SockEvent,
    cur: &Current,
    watches: bool,
    slot: u32,
) {
    let by_a_traced_task = old == CLOSE && keep_unowned(cur);
    if by_a_traced_task && new == LISTEN {
        let owner = SeedOwner {
            pid: cur.pid,
            tid: cur.tid,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        };
        remember_listener(sk, ev.family, ev.lport, &owner);
        return;
    }
    let connects = by_a_traced_task && new == SYN_SENT;
    let established = new == ESTABLISHED && (watches || old == SYN_RECV);
    if !connects && !established {
        return;
    }
    // A connect() claims the socket. With `--pid`, an accepted socket gets an entry only when
    // its listener's (or the seed table's) owner is traced.
    let keep = connects || (established && setting!(filter_pids) == 0);
    let Some(info) = lookup_or_create(sk, ev, keep, false) else {
        return;
    };
    // SAFETY: entry pointer from the map; only events of this socket write it.
    let info = unsafe { &mut *info };
    if connects {
        claim(info, cur);
    }
    if setting!(all_states) == 0 {
        // Since when it is in SYN_SENT or ESTABLISHED: a connect abandoned or refused, and a
        // connection's end, say how long (its line's `duration_ns`). With --all-states the
        // move's own line takes that time first, and `handle` stores it after.
        info.state_since_ns = ev.ts_ns;
    }
    if watches && (info.traced != 0 || is_traced_process(info.pid)) {
        watch(ev, slot);
    }
}

/// A connect() done (SYN_SENT -> ESTABLISHED) of a socket that has an entry (made at its
/// connect): since when it is established, for its end's `duration_ns` (with --pid such a
/// move takes `remember_handshake_owner`'s way, which stores it).
#[inline(always)]
fn note_connected(sk: u64) {
    if let Some(info) = sock_entry(sk) {
        // SAFETY: entry pointer from the map; only events of this socket write it.
        unsafe { (*info).state_since_ns = bpf_ktime_get_ns() };
    }
}
