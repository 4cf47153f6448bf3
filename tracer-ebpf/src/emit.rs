//! The ring buffer, the run-time configuration, the in-kernel filters and the counters.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::bpf_probe_read_kernel,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use tracer_common::{
    Config, DEFAULT_RINGBUF_BYTES, INLINE_PIDS, NONE, RECORD_BYTES, SockEvent, counter,
};

/// Written by the loader (EbpfLoader::override_global) before the programs load.
#[unsafe(no_mangle)]
pub static CONFIG: Config = Config::zeroed();

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RINGBUF_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Traced processes (tgid), for `--pid`.
#[map]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// The inline traced pids (CONFIG.inline_pids, read-only once loaded) whose process has
/// exited, by slot: set by the daemon, so that a new process given the pid is not taken for
/// the traced one. (With more pids the daemon removes the exited one from PIDS.)
#[map]
static GONE_PIDS: Array<u8> = Array::with_max_entries(INLINE_PIDS as u32, 0);

/// Traced ports, for `--port`.
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// Reads one field of CONFIG. The volatile read keeps the compiler from folding the zeroed
/// initialiser into the code (the loader overrides the value), and reading field by field
/// keeps the whole struct off the 512-byte BPF stack.
#[macro_export]
macro_rules! setting {
    ($($field:tt)+) => {
        // SAFETY: CONFIG is a plain-data global written only by the loader.
        unsafe { core::ptr::read_volatile(&raw const $crate::emit::CONFIG.$($field)+) }
    };
}

/// The floor benchmark loads the programs with `noop` set: they return at once.
#[inline(always)]
pub fn noop() -> bool {
    setting!(noop) != 0
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot. A raw tracepoint program interrupting another program between
        // this load and store could lose one count; the bpfel target offers no atomic add to
        // core::sync, and such nesting is rare.
        unsafe { *slot += 1 };
    }
}

/// Whether a connection with these ports passes `--port`.
#[inline(always)]
pub fn ports_pass(lport: u16, rport: u16) -> bool {
    if setting!(filter_ports) == 0 {
        return true;
    }
    // SAFETY: the value is a plain u8 we only test for presence.
    unsafe { PORTS.get(lport).is_some() || PORTS.get(rport).is_some() }
}

/// Whether a socket owned by this process passes `--pid` (an unknown owner, 0, does not).
#[inline(always)]
pub fn pid_passes(pid: u32) -> bool {
    if setting!(filter_pids) == 0 {
        return true;
    }
    if pid == 0 {
        return false;
    }
    if setting!(inline_pids[0]) != 0 {
        return in_inline_pids(pid);
    }
    // SAFETY: as above.
    unsafe { PIDS.get(pid).is_some() }
}

/// A new process was given `pid`: a traced process that had it has exited (the kernel gives
/// no living process's pid to another), and the pid no longer names it. The daemon does the
/// same within 200 ms of the exit; this leaves no window in between.
#[inline(always)]
pub fn forget_reused_pid(pid: u32) {
    if setting!(filter_pids) == 0 {
        return;
    }
    if setting!(inline_pids[0]) != 0 {
        if let Some(slot) = inline_slot(pid) {
            crate::owners::mark(&GONE_PIDS, slot);
        }
    // SAFETY: as in `pid_passes`.
    } else if unsafe { PIDS.get(pid).is_some() } {
        let _ = PIDS.remove(&pid);
    }
}

#[inline(always)]
fn in_inline_pids(pid: u32) -> bool {
    // One lookup, and only for a traced pid (most events are not).
    inline_slot(pid).is_some_and(|slot| !crate::owners::is_marked(&GONE_PIDS, slot))
}

/// The inline slot that holds `pid`.
#[inline(always)]
fn inline_slot(pid: u32) -> Option<u32> {
    let mut found = INLINE_PIDS as u32;
    for slot in 0..INLINE_PIDS {
        // SAFETY: as in `setting!`; the index is below the array's length.
        let traced = unsafe {
            core::ptr::read_volatile((&raw const CONFIG.inline_pids as *const u32).add(slot))
        };
        if traced == pid {
            found = slot as u32;
        }
    }
    (found < INLINE_PIDS as u32).then_some(found)
}

/// Filters, then writes a socket's event into the ring buffer (a full ring buffer is counted,
/// never silent): past `--pid` when its owner is traced, or when a traced process
/// owned the socket before (`SockInfo::traced`); `--port` still applies.
#[inline(always)]
pub fn submit_socket(event: &SockEvent, traced: bool, slot: u32) {
    if admit(event, traced, slot) {
        write_event(event);
    }
}

/// Whether a socket's event passes `--pid` and `--port` (see `submit_socket`; a drop is
/// counted), marking a traced connection for the capture filter when it does.
#[inline(always)]
pub fn admit(event: &SockEvent, traced: bool, slot: u32) -> bool {
    if !ports_pass(event.lport, event.rport) || !(traced || pid_passes(event.pid)) {
        count(counter::FILTERED);
        return false;
    }
    crate::capture_filter::watch(event, slot);
    true
}

/// Writes an event that has no owner past `--pid` (the caller checked that it answers a traced
/// connection); `--port` still applies.
#[inline(always)]
pub fn submit_unowned(event: &SockEvent) {
    if !ports_pass(event.lport, event.rport) {
        count(counter::FILTERED);
        return;
    }
    write_event(event);
}

/// Writes an event into the ring buffer (a full ring buffer is counted).
#[inline(always)]
pub fn write_event(event: &SockEvent) {
    match EVENTS.reserve::<SockEvent>(0) {
        Some(mut slot) => {
            slot.write(*event);
            let waiting = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
            let flags = if waiting >= setting!(wakeup_bytes) as u64 {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            slot.submit(flags as u64);
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

/// Reads a kernel value at `base + offset`, an offset found at run time (the BTF); `NONE` or a
/// failed read gives None.
#[inline(always)]
pub fn kernel_read<T>(base: u64, offset: u16) -> Option<T> {
    if offset == NONE {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the access.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// Neighbouring fields of one kernel struct read with one helper call: the `N` bytes from the
/// lowest of their offsets. A probe read costs ~40 ns here whatever its size, and a socket's
/// tuple took five of them, a descriptor's socket eight. A field outside the span (another
/// kernel's layout), or a span that could not be read, is read on its own: the span only ever
/// saves calls.
pub struct Span<const N: usize> {
    base: u64,
    start: u16,
    /// Whether `bytes` holds the span (zeroed, never uninitialised: the BPF backend may copy
    /// an uninitialised value from any register, which the verifier refuses).
    read: bool,
    bytes: [u8; N],
}

impl<const N: usize> Span<N> {
    /// Reads the span starting at the lowest of `offsets` (`NONE` ones are ignored).
    #[inline(always)]
    pub fn read(base: u64, offsets: &[u16]) -> Self {
        let start = offsets.iter().copied().fold(NONE, |a, b| a.min(b));
        let mut bytes = [0u8; N];
        // SAFETY: bpf_probe_read_kernel checks the source; the destination is N bytes long.
        let read = start != NONE
            && unsafe {
                bpf_probe_read_kernel(
                    bytes.as_mut_ptr() as *mut c_void,
                    N as u32,
                    (base + start as u64) as *const c_void,
                )
            } == 0;
        Self {
            base,
            start,
            read,
            bytes,
        }
    }

    /// The field at `offset`, from the span when it lies inside, else read on its own.
    #[inline(always)]
    pub fn get<T: Copy>(&self, offset: u16) -> Option<T> {
        if self.read
            && offset != NONE
            && offset >= self.start
            && (offset - self.start) as usize + size_of::<T>() <= N
        {
            let at = (offset - self.start) as usize;
            // SAFETY: `at + size_of::<T>() <= N` was checked; the bytes are plain data.
            return Some(unsafe {
                core::ptr::read_unaligned(self.bytes.as_ptr().add(at).cast::<T>())
            });
        }
        kernel_read(self.base, offset)
    }
}

/// Per-CPU room for one tracepoint record, copied at once (see `Record`).
#[map]
static RECORD: PerCpuArray<[u8; RECORD_BYTES]> = PerCpuArray::with_max_entries(1, 0);

/// A tracepoint record copied with one probe read: a program that reads several fields pays
/// one helper call instead of one per field. Fields past the copy (a record longer than
/// `RECORD_BYTES`) are read from the record itself.
pub struct Record<'a> {
    ctx: &'a TracePointContext,
    copy: &'static [u8; RECORD_BYTES],
    len: usize,
}

impl<'a> Record<'a> {
    /// Copies the first `len` bytes (the end of the last field, from the format file).
    #[inline(always)]
    pub fn copy(ctx: &'a TracePointContext, len: u16) -> Option<Self> {
        let buf = RECORD.get_ptr_mut(0)?;
        let len = (len as usize).min(RECORD_BYTES);
        // SAFETY: this CPU's slot, used only by classic tracepoint programs, which the kernel
        // never runs two at a time on one CPU (see CLASSIC_SLOT; the raw programs read the
        // socket instead); the helper writes at most `len` <= RECORD_BYTES bytes into it.
        let ret = unsafe {
            bpf_probe_read_kernel(
                buf as *mut c_void,
                len as u32,
                ctx.as_ptr() as *const c_void,
            )
        };
        if ret != 0 {
            return None;
        }
        // SAFETY: as above; bytes past `len` are stale and never read (see `get`).
        let copy = unsafe { &*buf };
        Some(Self { ctx, copy, len })
    }

    /// The field at `offset`; `NONE` gives None.
    #[inline(always)]
    pub fn get<T>(&self, offset: u16) -> Option<T> {
        if offset == NONE {
            return None;
        }
        let end = offset as usize + size_of::<T>();
        // Both bounds: `len` for the value, the constant for the verifier.
        if end <= self.len && end <= RECORD_BYTES {
            // SAFETY: in bounds of the copy (checked above); plain data, possibly unaligned.
            return Some(unsafe {
                core::ptr::read_unaligned(self.copy.as_ptr().add(offset as usize) as *const T)
            });
        }
        field(self.ctx, offset)
    }
}

/// Which of a CPU's scratch slots a running program uses. The kernel never runs two classic
/// tracepoint (or kprobe) programs at once on one CPU (bpf_prog_active), so they share slot 0.
/// Raw tracepoint programs are outside that rule: one can interrupt a classic program, or
/// another raw one (a softirq on top of a task), so each takes the slot of its nesting depth.
pub const CLASSIC_SLOT: u32 = 0;
pub const SLOTS: u32 = 4;

/// How deep raw tracepoint programs are nested on this CPU right now.
#[map]
static RAW_DEPTH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Enters a raw tracepoint program: its scratch slot, or None (counted) when nested too deep.
#[inline(always)]
pub fn enter_raw() -> Option<u32> {
    let depth = RAW_DEPTH.get_ptr_mut(0)?;
    // SAFETY: this CPU's counter; a program that interrupts us restores it before we resume.
    let slot = unsafe { *depth } + 1;
    if slot >= SLOTS {
        count(counter::NESTED_TOO_DEEP);
        return None;
    }
    // SAFETY: as above.
    unsafe { *depth = slot };
    Some(slot)
}

/// Leaves a raw tracepoint program entered with `enter_raw`.
#[inline(always)]
pub fn leave_raw(slot: u32) {
    if let Some(depth) = RAW_DEPTH.get_ptr_mut(0) {
        // SAFETY: as in `enter_raw`.
        unsafe { *depth = slot - 1 };
    }
}

/// Per-CPU room for the event set_state builds, off its 512-byte stack (on 6.1 the verifier
/// counts a program's stack plus that of any subprogram it calls), one per slot.
#[map]
static EVENT_SCRATCH: PerCpuArray<SockEvent> = PerCpuArray::with_max_entries(SLOTS, 0);

/// This CPU's scratch event for `slot`, reset in place (`reset_event`).
#[inline(always)]
pub fn scratch_event(slot: u32) -> Option<&'static mut SockEvent> {
    let ptr = EVENT_SCRATCH.get_ptr_mut(slot)?;
    // SAFETY: this CPU's slot for this nesting level (see CLASSIC_SLOT).
    let ev = unsafe { &mut *ptr };
    reset_event(ev);
    Some(ev)
}

/// An event with nothing known yet (see `reset_event`).
pub fn empty_event() -> SockEvent {
    // SAFETY: SockEvent is plain data; all-zero is a valid value.
    let mut ev: SockEvent = unsafe { core::mem::zeroed() };
    reset_event(&mut ev);
    ev
}

/// Resets an event in place to nothing known: all zero, but fd and reason -1 (0 is a real
/// value of both). In place, so a scratch slot is not built on the stack and copied.
#[inline(always)]
pub fn reset_event(ev: &mut SockEvent) {
    // SAFETY: SockEvent is plain data; all-zero is a valid value.
    unsafe { core::ptr::write_bytes(ev as *mut SockEvent, 0, 1) };
    ev.fd = -1;
    ev.reason = -1;
}
