//! Resets: the ones this host sends (tcp:tcp_send_reset, or the tcp_send_active_reset kprobe on
//! kernels whose tracepoint misses active resets) and the ones it receives.

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::{kprobe, raw_tracepoint, tracepoint},
    programs::{ProbeContext, RawTracePointContext, TracePointContext},
};
use tracer_common::{
    AF_INET, AF_INET6, EventKind, NONE, ResetLayout, SkbLayout, SockEvent, TupleLayout, counter,
    owner_source, rst_ack, tcp_state,
};

use crate::{
    calls::{Context, call_acting_on},
    capture_filter::is_watched,
    emit::{
        CLASSIC_SLOT, Record, count, empty_event, kernel_read, noop, scratch_event, submit_socket,
        submit_unowned,
    },
    held,
    owners::{
        SockInfo, current, destroyed_entry, fill_owner, is_destroyed_connection, keep_unowned,
        listener_owner, lookup_or_create, may_concern_traced, note_traced, sock_entry,
    },
    setting,
    state::{RecordFields, SockFields, TupleSource, family_and_port, never_accepted, read_tuple},
};

/// Reads a `struct sockaddr_in`/`sockaddr_in6` as stored by the tracepoint (28 bytes).
#[inline(always)]
fn read_sockaddr(rec: &Record, offset: u16) -> Option<(u16, u16, [u8; 16])> {
    if offset == NONE {
        return None;
    }
    let family: u16 = rec.get(offset)?;
    let port = u16::from_be(rec.get::<u16>(offset + 2)?);
    let mut addr = [0u8; 16];
    if family == AF_INET {
        let v4: [u8; 4] = rec.get(offset + 4)?;
        addr[..4].copy_from_slice(&v4);
    } else if family == AF_INET6 {
        addr = rec.get(offset + 8)?;
    } else {
        return None;
    }
    Some((family, port, addr))
}

/// Addresses of a sent reset, in whichever of the two layouts this kernel uses.
#[inline(always)]
fn read_reset_tuple(rec: &Record, layout: &ResetLayout, ev: &mut SockEvent) -> Option<()> {
    if layout.sockaddr_saddr == NONE {
        return read_tuple(rec, &layout.tuple, ev);
    }
    let (family, lport, laddr) = read_sockaddr(rec, layout.sockaddr_saddr)?;
    let (_, rport, raddr) = read_sockaddr(rec, layout.sockaddr_daddr)?;
    ev.family = family;
    ev.lport = lport;
    ev.rport = rport;
    ev.laddr = laddr;
    ev.raddr = raddr;
    Some(())
}

#[tracepoint]
pub fn send_reset(ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let layout: ResetLayout = setting!(send_reset);
    let Some(rec) = Record::copy(&ctx, layout.record_len) else {
        return 0;
    };
    let sk = rec.get::<u64>(layout.skaddr).unwrap_or(0);
    let state = rec.get::<i32>(layout.state).unwrap_or(0) as u8;
    // A close's RST: the close waits for it (see `held`) and goes out with its reason.
    if state == tcp_state::CLOSE && sk != 0 && held::send_with_reset(sk, reason_of(&rec, &layout)) {
        return 0;
    }
    // With --pid, a reset from a time-wait socket (no owner in the kernel) or for no socket at
    // all may still answer a traced connection: its addresses decide, below.
    let unowned = sk == 0 || state == tcp_state::TIME_WAIT;
    // A socket just destroyed has no entry any more; its last one decides (`Destroyed`). Only
    // for a RST that answers a segment (TCP_ABORT_ON_DATA): an active reset (no segment) is
    // sent by a socket that is not destroyed yet.
    let skb = rec.get::<u64>(layout.skbaddr);
    let answers_a_segment = skb.is_some_and(|skb| skb != 0);
    let destroyed = if state == tcp_state::CLOSE && sk != 0 && answers_a_segment {
        destroyed_entry(sk)
    } else {
        None
    };
    if !unowned && destroyed.is_none() && !may_concern_traced_reset(sk, &rec, &layout) {
        count(counter::FILTERED);
        return 0;
    }
    // In this CPU's scratch slot, not on the stack (which the attribution's inlined lookups
    // fill).
    let Some(ev) = scratch_event(CLASSIC_SLOT) else {
        return 0;
    };
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.kind = EventKind::RstSent as u8;
    if read_reset_tuple(&rec, &layout, ev).is_none() {
        return 0;
    }
    // Another socket at the destroyed one's address (reused at once) is not it: decided as
    // any socket's reset.
    let taken_for_destroyed = destroyed.is_some();
    let destroyed = destroyed.filter(|&info| is_destroyed_connection(info, ev));
    if taken_for_destroyed
        && destroyed.is_none()
        && !unowned
        && !may_concern_traced_reset(sk, &rec, &layout)
    {
        count(counter::FILTERED);
        return 0;
    }
    ev.old_state = state;
    ev.new_state = state;
    if state == tcp_state::TIME_WAIT && sk != 0 {
        timewait_reset(sk, ev);
    }
    ev.reason = reason_of(&rec, &layout);
    ev.rst_ack = rst_ack_of(skb);
    if state == tcp_state::LISTEN && sk != 0 {
        attribute_listener_reset(sk, &rec, &layout, ev);
        submit_socket(ev, false, CLASSIC_SLOT); // with --pid, the listener's owner decides
        return 0;
    }
    let traced = attribute_reset(sk, state, destroyed, answers_a_segment, ev);
    if setting!(filter_pids) != 0 && unowned && ev.pid == 0 {
        if is_watched(ev, CLASSIC_SLOT) {
            // The daemon attributes it to the traced connection with these addresses.
            submit_unowned(ev);
        } else {
            count(counter::FILTERED);
        }
        return 0;
    }
    submit_socket(ev, traced, CLASSIC_SLOT);
    0
}

/// A time-wait socket's RST: the kernel kills the socket right after (TCP_TW_RST), so the
/// line moves to CLOSE, from the state the socket really was in: its substate, FIN_WAIT2 for an
/// orphan whose peer never closed (data from a peer sitting in CLOSE_WAIT: a stale pooled
/// connection reused), TIME_WAIT once the peer's FIN had come. (`sk_state` says TIME_WAIT for
/// both.) Its owner is the connection's, which only the daemon knows.
#[inline(always)]
fn timewait_reset(sk: u64, ev: &mut SockEvent) {
    ev.owner_source = owner_source::TIME_WAIT;
    if let Some(substate) = kernel_read::<u8>(sk, setting!(timewait.substate)) {
        ev.old_state = substate;
    }
    ev.new_state = tcp_state::CLOSE;
}

/// Whether the RST carries ACK, as tcp_v4/v6_send_reset() decide: an answer to a segment
/// carries ACK unless the segment did (it then takes the segment's ACK number for its
/// sequence number); an active reset, for no segment, always does.
/// `skb`: the record's segment address (None: this kernel's record has none).
#[inline(always)]
fn rst_ack_of(skb: Option<u64>) -> u8 {
    /// TCP flags byte (offset 13 of the header) and its ACK bit.
    const FLAGS_AT: u16 = 13;
    const ACK: u8 = 0x10;
    let Some(skb) = skb else {
        return rst_ack::UNKNOWN;
    };
    if skb == 0 {
        return rst_ack::WITH;
    }
    let answered = kernel_read::<u64>(skb, setting!(skb.data))
        .and_then(|tcp| kernel_read::<u8>(tcp, FLAGS_AT));
    match answered {
        Some(flags) if flags & ACK != 0 => rst_ack::WITHOUT,
        Some(_) => rst_ack::WITH,
        None => rst_ack::UNKNOWN,
    }
}

/// The kernel's reason for a sent reset (-1 before 6.10, which gives none).
#[inline(always)]
fn reason_of(rec: &Record, layout: &ResetLayout) -> i32 {
    rec.get::<u32>(layout.reason)
        .map(|r| r as i32)
        .unwrap_or(-1)
}

/// With `--pid`, whether a reset sent by a full socket may concern a traced process, decided
/// before its addresses are read (unowned resets are decided by their addresses instead).
#[inline(always)]
fn may_concern_traced_reset(sk: u64, rec: &Record, layout: &ResetLayout) -> bool {
    if setting!(filter_pids) == 0 {
        return true;
    }
    // Read at once (the record is already copied: a few loads): a lazy closure here was made
    // a subprogram by LLVM once send_reset grew, and its uninitialised return register failed
    // the verifier.
    let family_port = if layout.sockaddr_saddr == NONE {
        family_and_port(rec, &layout.tuple)
    } else {
        read_sockaddr(rec, layout.sockaddr_saddr).map(|(family, port, _)| (family, port))
    };
    may_concern_traced(sk, &current(), || family_port)
}

/// A listener answers with a RST a segment of a connection it no longer has (gone from its
/// time-wait form, after a restart): the classic reset of a pooled connection the server closed
/// long ago. The segment's addresses, reversed, name that connection (the record has the
/// listener's, with no remote end); the listener's owner is the owner, and the daemon finds
/// the connection by its addresses if it still remembers it.
#[inline(always)]
fn attribute_listener_reset(sk: u64, rec: &Record, layout: &ResetLayout, ev: &mut SockEvent) {
    let (family, port) = (ev.family, ev.lport);
    if let Some(skb) = rec.get::<u64>(layout.skbaddr) {
        // Without the segment's headers the listener's own addresses stay.
        let _ = read_answered_tuple(skb, ev);
    }
    if let Some(owner) = listener_owner(sk, family, port) {
        ev.pid = owner.pid;
        ev.tid = owner.tid;
        ev.comm = owner.comm;
        ev.owner_source = owner_source::LISTENER;
    }
}

/// The addresses of the segment `skb` (at TCP, its data at the TCP header), reversed: this
/// host's end first. An IPv4 segment to an IPv6 listener shows as IPv4-mapped, as that
/// listener's connections do.
#[inline(always)]
fn read_answered_tuple(skb: u64, ev: &mut SockEvent) -> Option<()> {
    let layout: SkbLayout = setting!(skb);
    let head: u64 = kernel_read(skb, layout.head)?;
    let tcp: u64 = kernel_read(skb, layout.data)?;
    let network: u16 = kernel_read(skb, layout.network_header)?;
    let ports: [u8; 4] = kernel_read(tcp, 0)?;
    let ip = head + u64::from(network);
    let version: u8 = kernel_read::<u8>(ip, 0)? >> 4;
    let (mut laddr, mut raddr) = ([0u8; 16], [0u8; 16]);
    if version == 4 {
        let addrs: [u8; 8] = kernel_read(ip, 12)?;
        let at = if ev.family == AF_INET6 {
            laddr[10..12].copy_from_slice(&[0xff, 0xff]);
            raddr[10..12].copy_from_slice(&[0xff, 0xff]);
            12
        } else {
            0
        };
        raddr[at..at + 4].copy_from_slice(&addrs[..4]);
        laddr[at..at + 4].copy_from_slice(&addrs[4..]);
    } else if version == 6 {
        raddr = kernel_read(ip, 8)?;
        laddr = kernel_read(ip, 24)?;
    } else {
        return None;
    }
    ev.laddr = laddr;
    ev.raddr = raddr;
    ev.rport = u16::from_be_bytes([ports[0], ports[1]]);
    ev.lport = u16::from_be_bytes([ports[2], ports[3]]);
    Some(())
}

/// Fills owner, conn and the close call (if this reset is part of one) for a sent reset;
/// says whether a traced process owned the socket (see `SockInfo::traced`).
#[inline(always)]
fn attribute_reset(
    sk: u64,
    state: u8,
    destroyed: Option<*mut SockInfo>,
    answers_a_segment: bool,
    ev: &mut SockEvent,
) -> bool {
    if sk == 0 {
        // A reply to a segment that matched no socket: nobody owns it.
        ev.owner_source = owner_source::NO_SOCKET;
        return false;
    }
    // Time-wait and request sockets never reach tcp_destroy_sock: do not make entries for them.
    let full_socket = state != tcp_state::TIME_WAIT && state != tcp_state::NEW_SYN_RECV;
    // A socket in CLOSE that answers a segment was destroyed already (an orphan's
    // TCP_ABORT_ON_DATA: `Destroyed` has its entry if it had one) or still has its entry (its
    // owner holds it): a new entry would never be removed, and the next socket the kernel puts
    // at that address would inherit it. With `--pid`, an untraced client's orphan answering a
    // traced server's last write (in the server's task on loopback) left such an entry, and
    // the server's next accepted connection at that address got its unknown owner: it was
    // never watched, and the peer's FIN never passed the capture filter.
    let destroyed_already = state == tcp_state::CLOSE && answers_a_segment;
    let info = if destroyed.is_some() {
        destroyed
    } else if full_socket && !destroyed_already {
        lookup_or_create(sk, ev, keep_unowned(&current()), false)
    } else {
        sock_entry(sk)
    };
    // SAFETY: entry pointer from the map.
    let mut info = info.map(|i| unsafe { &mut *i });
    let traced = match info.as_deref_mut() {
        Some(info) => {
            note_traced(info);
            fill_owner(ev, info);
            info.traced != 0
        }
        None => false,
    };
    // No file refers to a time-wait or request socket, nor to a connection never accepted
    // (reset because its listener was closed): no call acts on it.
    let by_a_call = full_socket && !info.as_deref().is_some_and(|i| never_accepted(sk, i));
    if by_a_call && let Some(call) = call_acting_on(sk, info.as_deref(), Context::Unknown) {
        call.stamp(ev);
    }
    traced
}

#[tracepoint]
pub fn receive_reset(ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let layout: TupleLayout = setting!(receive_reset);
    let Some(rec) = Record::copy(&ctx, layout.record_len) else {
        return 0;
    };
    let Some(sk) = rec.get::<u64>(layout.skaddr) else {
        return 0;
    };
    let fields = RecordFields {
        rec: &rec,
        layout: &layout,
    };
    reset_received(&fields, sk);
    0
}

/// tcp_receive_reset as a raw tracepoint: TP_PROTO(struct sock *sk).
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn receive_reset_raw(ctx: RawTracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    reset_received(&SockFields::new(sk), sk);
    0
}

/// Marks the socket: the move to CLOSE that tcp_reset() makes next emits the event (it also
/// knows the state the reset hit).
#[inline(always)]
fn reset_received(src: &impl TupleSource, sk: u64) {
    if !may_concern_traced(sk, &current(), || src.family_and_port()) {
        return; // counted by the move to CLOSE that follows
    }
    let mut ev = empty_event();
    if src.read_tuple(&mut ev).is_none() {
        return;
    }
    if let Some(info) = lookup_or_create(sk, &ev, keep_unowned(&current()), false) {
        // SAFETY: entry pointer from the map.
        unsafe { (*info).rst_received = 1 };
    }
}

/// kprobe tcp_send_active_reset(struct sock *sk, gfp_t priority, ...): only for kernels
/// without the tcp_send_reset tracepoint (which fires for active resets too where it exists;
/// the daemon does not attach this then). The daemon fills the addresses from the socket's
/// earlier events (same conn_id).
#[kprobe]
pub fn tcp_send_active_reset(ctx: ProbeContext) -> u32 {
    if noop() {
        return 0;
    }
    let Some(sk) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let mut ev = empty_event();
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.kind = EventKind::RstSent as u8;
    ev.rst_ack = rst_ack::WITH; // tcp_send_active_reset: RST and ACK
    let Some(info) = sock_entry(sk) else {
        return 0; // without the socket's earlier events its addresses are unknown here
    };
    // SAFETY: entry pointer from the map.
    let info = unsafe { &mut *info };
    note_traced(info);
    fill_owner(&mut ev, info);
    ev.lport = info.lport;
    ev.rport = info.rport;
    if let Some(call) = call_acting_on(sk, Some(info), Context::Unknown) {
        call.stamp(&mut ev);
    }
    submit_socket(&ev, info.traced != 0, CLASSIC_SLOT);
    0
}
