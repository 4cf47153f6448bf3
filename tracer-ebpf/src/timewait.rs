//! The end of a time-wait socket whose FIN_WAIT2 timed out.
//!
//! An orphaned socket in FIN_WAIT2 (closed by its owner, the peer's FIN not come) hands over to
//! a time-wait socket at once: the full socket moves FIN_WAIT2 -> CLOSE, and the time-wait one
//! stays in substate FIN_WAIT2 until the peer's FIN (then TIME_WAIT) or its timeout
//! (tcp_fin_timeout, 60 s by default, or the socket's TCP_LINGER2). No tracepoint marks that
//! timeout: the kernel kills the socket from its timer, `tw_timer_handler`. So this program
//! watches the timers that expire (`timer:timer_expire_entry`, a few hundred a second on a
//! busy host: each costs one read of the timer's function) and reports those of time-wait
//! sockets still in FIN_WAIT2: the peer never sent its FIN (it sits in CLOSE_WAIT, or is gone).

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{EventKind, TimewaitLayout, counter, owner_source, tcp_state};

use crate::{
    capture_filter::is_watched_end,
    emit::{
        CLASSIC_SLOT, count, empty_event, enter_raw, field, kernel_read, leave_raw, noop,
        submit_unowned,
    },
    setting,
    state::read_sock_tuple,
};

#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn timer_expire_raw(ctx: RawTracePointContext) -> u32 {
    if noop() || setting!(timewait.handler) == 0 {
        return 0;
    }
    let Some(slot) = enter_raw() else {
        return 0;
    };
    // TP_PROTO(struct timer_list *timer, unsigned long baseclk)
    timer_expired(ctx.arg(0), slot);
    leave_raw(slot);
    0
}

#[tracepoint]
pub fn timer_expire(ctx: TracePointContext) -> u32 {
    if noop() || setting!(timewait.handler) == 0 {
        return 0;
    }
    if let Some(timer) = field::<u64>(&ctx, setting!(timewait.record_timer)) {
        timer_expired(timer, CLASSIC_SLOT);
    }
    0
}

#[inline(always)]
fn timer_expired(timer: u64, slot: u32) {
    let layout: TimewaitLayout = setting!(timewait);
    if kernel_read::<u64>(timer, layout.timer_function) != Some(layout.handler) {
        return;
    }
    let tw = timer - u64::from(layout.tw_timer);
    if kernel_read::<u8>(tw, layout.substate) != Some(tcp_state::FIN_WAIT2) {
        return; // a TIME_WAIT that ran its course: the peer did close
    }
    let mut ev = empty_event();
    // Its sock_common as a full socket's, its own local port.
    if read_sock_tuple(tw, layout.sport, layout.rcv_saddr, &mut ev).is_none() {
        return;
    }
    // SAFETY: plain helper call.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.kind = EventKind::Fin2Timeout as u8;
    ev.old_state = tcp_state::FIN_WAIT2;
    ev.new_state = tcp_state::CLOSE;
    ev.owner_source = owner_source::TIME_WAIT;
    // With --pid, only a traced socket's (its addresses were marked while it lived, local end
    // first): on loopback the traced socket's untraced peer has the same addresses reversed.
    if setting!(filter_pids) != 0 && !is_watched_end(&ev, slot) {
        count(counter::FILTERED);
        return;
    }
    submit_unowned(&ev);
}
