//! The ring buffer, the run-time configuration, the in-kernel filters and the counters.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use tracer_common::{Config, DEFAULT_RINGBUF_BYTES, NONE, SockEvent, counter};

/// Written by the loader (EbpfLoader::override_global) before the programs load.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::zeroed();

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RINGBUF_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Traced processes (tgid), for `--pid`.
#[map]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Traced ports, for `--port`.
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

#[inline(always)]
pub fn config() -> Config {
    // SAFETY: CONFIG is a read-only global; the volatile read keeps the compiler from folding
    // the zeroed initialiser into the code before the loader overrides it.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

/// Whether an event with this owner and these ports passes `--pid` / `--port`.
#[inline(always)]
pub fn passes_filters(cfg: &Config, pid: u32, lport: u16, rport: u16) -> bool {
    if cfg.filter_ports != 0 {
        // SAFETY: the value is a plain u8 we only test for presence.
        let hit = unsafe { PORTS.get(lport).is_some() || PORTS.get(rport).is_some() };
        if !hit {
            return false;
        }
    }
    if cfg.filter_pids != 0 {
        // SAFETY: as above.
        if pid == 0 || unsafe { PIDS.get(pid).is_none() } {
            return false;
        }
    }
    true
}

/// Filters, then writes the event into the ring buffer; a full ring buffer is counted, never
/// silent.
#[inline(always)]
pub fn submit(cfg: &Config, event: &SockEvent) {
    if !passes_filters(cfg, event.pid, event.lport, event.rport) {
        count(counter::FILTERED);
        return;
    }
    match EVENTS.reserve::<SockEvent>(0) {
        Some(mut slot) => {
            slot.write(*event);
            slot.submit(0);
            count(counter::EMITTED);
        }
        None => count(counter::RINGBUF_LOST),
    }
}

/// Reads a tracepoint field at an offset found at run time; `NONE` or a failed read gives None.
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
    if offset == NONE {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the access; the offset comes from the format file.
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

pub fn empty_event() -> SockEvent {
    SockEvent {
        ts_ns: 0,
        conn_id: 0,
        state_since_ns: 0,
        call_id: 0,
        pid: 0,
        tid: 0,
        comm: [0; 16],
        fd: -1,
        reason: -1,
        laddr: [0; 16],
        raddr: [0; 16],
        lport: 0,
        rport: 0,
        family: 0,
        kind: 0,
        old_state: 0,
        new_state: 0,
        syscall: 0,
        owner_source: 0,
        _pad: [0; 5],
    }
}
