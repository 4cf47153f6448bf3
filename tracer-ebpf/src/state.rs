//! sock:inet_sock_set_state: every TCP state change, classified in the kernel because only here
//! is it known whether the owner was inside a close call.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, generated::bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    AF_INET, AF_INET6, EventKind, IPPROTO_TCP, SeedOwner, SockEvent, TupleLayout, counter,
    owner_source, syscall, tcp_state::*,
};

use crate::{
    calls::call_acting_on,
    capture_filter::watch,
    emit::{Record, count, noop, pid_passes, ports_pass, scratch_event, submit},
    owners::{
        Current, LISTENERS, SOCKS, SockInfo, claim, current, fill_owner, keep_unowned,
        listener_key, lookup_or_create, may_concern_traced, note_ports, remember_listener,
    },
    setting,
};

#[tracepoint]
pub fn set_state(ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let _ = handle(&ctx);
    0
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

/// With `--pid`, a traced process's connection is marked for the capture filter as soon as it
/// is established: the first FIN or RST may be the peer's, seen on the wire before any event of
/// this socket. A traced connect() made the socket's entry; an accepted socket has none yet and
/// its listener names the owner. (Looked up, not created: a second inlined lookup_or_create
/// put set_state over the 512-byte stack on 6.1.)
#[inline(always)]
fn watch_if_traced(sk: u64, ev: &SockEvent) {
    // SAFETY: values copied out at once.
    let owner = unsafe {
        SOCKS.get(sk).map(|info| info.pid).or_else(|| {
            LISTENERS
                .get(listener_key(ev.family, ev.lport))
                .map(|o| o.pid)
        })
    };
    if owner.is_some_and(pid_passes) {
        watch(ev);
    }
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
fn handle(ctx: &TracePointContext) -> Option<()> {
    let layout: TupleLayout = setting!(set_state);
    let layout = &layout;
    let rec = &Record::copy(ctx, layout.record_len)?;
    if let Some(protocol) = rec.get::<u16>(layout.protocol) {
        if protocol != IPPROTO_TCP {
            return None;
        }
    }
    let sk: u64 = rec.get(layout.skaddr)?;
    let old = rec.get::<i32>(layout.oldstate)? as u8;
    let new = rec.get::<i32>(layout.newstate)? as u8;
    // Most transitions are the handshake; unless they are shown, or connect()/listen() must
    // record an owner (with --pid only a traced task's), they need nothing more: return before
    // reading the tuple.
    let cur = current();
    let records_owner = old == CLOSE && matches!(new, SYN_SENT | LISTEN) && keep_unowned(&cur);
    // With --pid, the capture filter learns a traced connection when it is established.
    let watches = new == ESTABLISHED && setting!(filter_pids) != 0;
    if is_handshake(new) && !records_owner && !watches && setting!(all_states) == 0 {
        return None;
    }
    if !may_concern_traced(sk, &cur, || family_and_port(rec, layout)) {
        if !is_handshake(new) {
            count(counter::FILTERED);
        }
        return None;
    }
    let ev = scratch_event()?;
    read_tuple(rec, layout, ev)?;
    if !ports_pass(ev.lport, ev.rport) {
        return None; // cheapest exit for unrelated ports: no table work at all
    }
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.old_state = old;
    ev.new_state = new;

    if is_handshake(new) {
        remember_process_context_owner(sk, old, new, ev, &cur);
        if watches {
            watch_if_traced(sk, ev);
        }
        if setting!(all_states) == 0 {
            return None;
        }
    }
    if old == LISTEN && new == CLOSE {
        let _ = LISTENERS.remove(listener_key(ev.family, ev.lport));
    }

    let Some(info_ptr) = lookup_or_create(sk, ev, keep_unowned(&cur)) else {
        if setting!(filter_pids) != 0 {
            count(counter::FILTERED);
        }
        return None;
    };
    // SAFETY: entry pointer from the map; only events of this socket write it.
    let info = unsafe { &mut *info_ptr };
    ev.state_since_ns = info.state_since_ns;
    info.state_since_ns = ev.ts_ns;
    note_ports(info, ev);

    let kind = classify(sk, old, new, info, &cur, ev)?;
    ev.kind = kind as u8;
    fill_owner(ev, info);
    submit(ev);
    Some(())
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
) -> Option<EventKind> {
    if new == CLOSE && info.rst_received != 0 {
        return Some(EventKind::RstReceived);
    }
    let local = is_local_close(old, new);
    if local || new == CLOSE || old == new {
        if let Some(call) = call_acting_on(sk) {
            let same_process = info.owner_source == owner_source::UNKNOWN || info.pid == cur.pid;
            let first_in_call = info.closed_by_call != call.started_ns;
            if first_in_call && (call.kind != syscall::EXIT || same_process) {
                info.closed_by_call = call.started_ns;
                ev.syscall = call.kind;
                ev.fd = call.fd;
                ev.call_id = call.started_ns;
                claim(info, cur);
                return Some(EventKind::Close);
            }
        }
        if local {
            // A close with no visible call (io_uring, close_range, a deferred fput).
            claim(info, cur);
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

/// connect() and listen() run in the owner's task: record it before any softirq transition.
#[inline(always)]
fn remember_process_context_owner(sk: u64, old: u8, new: u8, ev: &SockEvent, cur: &Current) {
    if old != CLOSE || !keep_unowned(cur) {
        return; // with --pid, connects and listens of other processes need no bookkeeping
    }
    if new == SYN_SENT {
        if let Some(info) = lookup_or_create(sk, ev, true) {
            // SAFETY: entry pointer from the map.
            unsafe { claim(&mut *info, cur) };
        }
    } else if new == LISTEN {
        let owner = SeedOwner {
            pid: cur.pid,
            tid: cur.tid,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        };
        remember_listener(ev.family, ev.lport, &owner);
    }
}
