//! An abortive close and the RST it sends, as one event.
//!
//! tcp_close() moves a socket with unread data (or with SO_LINGER 0) to CLOSE, sends the RST
//! with the kernel's reason, then destroys the socket: all in the closing task, before the
//! call returns. Sent as two events, the close waited in the daemon for its RST's event, and
//! under a churn of such closes a third of all events was that RST. Where both later hooks are
//! attached (`Config::hold_aborts`), the close waits here instead, for microseconds: the RST's
//! program sends it with the reason, or the socket's destruction sends it as closed without a
//! RST. The daemon itself takes out any close held longer than that (a path not foreseen
//! here), so none is lost.

use aya_ebpf::{macros::map, maps::HashMap};
use tracer_common::{EventKind, SockEvent, close_reset, syscall, tcp_state};

use crate::{
    calls::{Context, runs_in_task},
    emit::write_event,
    setting,
};

/// Held closes, by socket. The daemon reads it too (see above).
#[map]
pub static HELD_CLOSES: HashMap<u64, SockEvent> = HashMap::with_max_entries(4096, 0);

/// Whether `ev`, a close, is to wait for its RST: it moved its socket to CLOSE in process
/// context, in a close(2), close_range(2) or exit, or in the task that held the file's last
/// reference (state.rs), where tcp_close() either sends a RST or destroys the socket before
/// returning. (A shutdown(2) of a connecting socket also moves it to CLOSE, and does neither;
/// a move in a softirq belongs to no call of the task it interrupted.)
#[inline(always)]
pub fn waits_for_its_reset(ev: &SockEvent, context: Context) -> bool {
    setting!(hold_aborts) != 0
        && ev.kind == EventKind::Close as u8
        && ev.new_state == tcp_state::CLOSE
        && ev.old_state != tcp_state::CLOSE
        && ev.syscall != syscall::SHUTDOWN
        && runs_in_task(context)
}

/// Holds the close of `sk`; false when it cannot be held (the map is full): it goes out alone.
#[inline(always)]
pub fn hold(sk: u64, ev: &SockEvent) -> bool {
    HELD_CLOSES.insert(&sk, ev, 0).is_ok()
}

/// Sends the close held for `sk` with its RST's reason (-1: none given); false when none is
/// held (the RST is then an event of its own).
#[inline(always)]
pub fn send_with_reset(sk: u64, reason: i32) -> bool {
    release(sk, close_reset::SENT, reason)
}

/// Sends the close held for `sk`, if any: the socket is being destroyed, and no RST was sent.
#[inline(always)]
pub fn send_without_reset(sk: u64) {
    let _ = release(sk, close_reset::NOT_SENT, -1);
}

/// No lookup where nothing is ever held.
#[inline(always)]
fn release(sk: u64, outcome: u8, reason: i32) -> bool {
    if setting!(hold_aborts) == 0 {
        return false;
    }
    let Some(held) = HELD_CLOSES.get_ptr_mut(&sk) else {
        return false;
    };
    // SAFETY: the entry of a socket whose close is under way: only its closing task, running
    // this program, touches it (the daemon only takes entries held far longer).
    unsafe {
        (*held).close_reset = outcome;
        (*held).reason = reason;
        write_event(&*held);
    }
    let _ = HELD_CLOSES.remove(&sk);
    true
}
