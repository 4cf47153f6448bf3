//! Who owns a socket. The owner is recorded while a task of the owning process is provably
//! acting on the socket (connect, listen, close, send, recv) and read back in softirq context,
//! where the current task is whoever happened to be on the CPU.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{SeedOwner, SockEvent, TupleKey, counter, owner_source};

use crate::{
    calls::is_traced_process,
    capture_filter::watch,
    emit::{
        CLASSIC_SLOT, Record, count, enter_raw, field, kernel_read, leave_raw, noop, scratch_event,
    },
    setting,
    state::{SockFields, TupleSource},
};

/// What the kernel side knows about one live socket, keyed by its address (which never leaves
/// the kernel: userspace only sees `conn_id`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockInfo {
    pub conn_id: u64,
    /// When the socket entered its current state (0 when unknown).
    pub state_since_ns: u64,
    /// The call (its start time) that already produced this socket's `close` event: later
    /// transitions inside the same call (the peer's ACK processed in the closer's task on
    /// loopback) are consequences, not closes.
    pub closed_by_call: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    pub owner_source: u8,
    /// tcp_receive_reset fired: the coming move to CLOSE is the peer's reset.
    pub rst_received: u8,
    /// Kept so that events which only know the socket (the kprobe path) still pass --port.
    pub lport: u16,
    pub rport: u16,
    /// Its last file reference is gone (RELEASED: a close, an exit, or a close no call showed:
    /// tcp_close runs once per socket, so no later call can be the one closing it), or may be
    /// (RELEASED_MAYBE: a move only a close or a shutdown makes, with no call to tell which:
    /// io_uring's; a later close call on it is its release).
    pub released: u8,
    /// A traced process owned it (with `--pid`): its teardown stays traced whoever acts on it,
    /// such as a forked child closing a connection its traced parent accepted.
    pub traced: u8,
    /// The family of a listener that was closed (0: none): its LISTENERS entry goes when the
    /// socket is destroyed, not at its move to CLOSE, because the close resets the connections
    /// still in its queue after that move, and they get their owner from that entry.
    pub closed_listener_family: u16,
}

/// `SockInfo::released` values.
pub const RELEASED: u8 = 1;
pub const RELEASED_MAYBE: u8 = 2;

#[map]
pub static SOCKS: HashMap<u64, SockInfo> = HashMap::with_max_entries(65536, 0);

/// Marks of the sockets ever put in SOCKS, by a hash of their address: 1 once one was, never
/// cleared (addresses are reused, and clearing could hide a live entry sharing the mark). A
/// socket whose mark is 0 has no entry. With `--pid` the table holds only the traced processes'
/// sockets, and the events of every other socket of the host (~7 lookups per connection) are
/// decided by one array slot (64 KiB, inlined by the verifier, stays in cache) instead of a
/// hash lookup that misses the cache on the table's 1 MiB of buckets.
#[map]
static SOCK_MARKS: Array<u8> = Array::with_max_entries(1 << SOCK_MARK_BITS, 0);
const SOCK_MARK_BITS: u32 = 16;

#[inline(always)]
fn sock_mark_slot(sk: u64) -> u32 {
    // Fibonacci hashing: sockets are slab objects whose low address bits are alike.
    ((sk >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SOCK_MARK_BITS)) as u32
}

/// The socket's entry in SOCKS, if it has one.
#[inline(always)]
pub fn sock_entry(sk: u64) -> Option<*mut SockInfo> {
    if !is_marked(&SOCK_MARKS, sock_mark_slot(sk)) {
        return None;
    }
    SOCKS.get_ptr_mut(sk)
}

/// Removes an entry left at the address of a socket that is just beginning its life (see
/// `state::is_new_socket`): the kernel reuses a freed socket's memory at once, and an entry a
/// destroyed socket kept (a destruction missed, or an entry made after it) would hand the new
/// socket its `conn`, its owner (a traced one, with `--pid`, to an untraced process's
/// connection), and its marks.
#[inline(always)]
pub fn drop_stale_entry(sk: u64) {
    if sock_entry(sk).is_some() {
        let _ = SOCKS.remove(sk);
    }
}

/// Puts an entry in SOCKS, marked first so that no lookup can miss it.
#[inline(always)]
fn insert_sock(sk: u64, info: &SockInfo, flags: u64) -> Result<(), i32> {
    mark(&SOCK_MARKS, sock_mark_slot(sk));
    SOCKS.insert(sk, info, flags)
}

/// Whether slot `index` of a never-cleared mark array is set.
#[inline(always)]
pub fn is_marked(marks: &Array<u8>, index: u32) -> bool {
    marks.get(index).is_some_and(|m| *m != 0)
}

#[inline(always)]
pub fn mark(marks: &Array<u8>, index: u32) {
    if let Some(slot) = marks.get_ptr_mut(index) {
        // SAFETY: an array slot; concurrent writers all store 1.
        unsafe { *slot = 1 };
    }
}

/// Owner of each listening socket by its network namespace, family and port (`listener_key`):
/// accepted children inherit it until the accepting process touches them. A port is a
/// namespace's own: every pod of a node may listen on 8080.
#[map]
pub static LISTENERS: HashMap<u64, SeedOwner> = HashMap::with_max_entries(4096, 0);

/// Ports that have (or had) a listener in LISTENERS, by port: 1 once one was recorded, never
/// cleared (another listener may share the port). With `--pid`, an event of a socket on any
/// other port cannot inherit a traced owner, and an array slot (inlined by the verifier) costs
/// far less than a hash lookup that misses.
#[map]
pub static LISTEN_PORTS: Array<u8> = Array::with_max_entries(65536, 0);

/// With `--pid`, the ports where a process not traced listens too (its own listener:
/// SO_REUSEPORT, or another address), each in its network namespace: keyed by `listener_key`
/// with family 0 (a dual-stack listener takes both families' connections). Set by the
/// daemon's seeding or the programs, never cleared. A traced listener on such a port of its
/// namespace is not recorded: the kernel spreads the port's connections over every listener,
/// so what was accepted does not tell whose it is (each is traced once a traced process acts
/// on it). Another pod's listener on the same port does not count: its namespace differs.
/// Full (16384 ports marked in a run), a further untraced listener leaves its port unmarked.
#[map]
pub static FOREIGN_LISTENERS: HashMap<u64, u8> = HashMap::with_max_entries(16384, 0);

/// Records the owner of listener `sk`, unless a process not traced listens on its port too.
#[inline(always)]
pub fn remember_listener(sk: u64, family: u16, port: u16, owner: &SeedOwner) {
    let netns = netns_of(sk);
    // SAFETY: only whether an entry exists is read.
    if setting!(filter_pids) != 0
        && unsafe { FOREIGN_LISTENERS.get(&tracer_common::foreign_listener_key(netns, port)) }
            .is_some()
    {
        return;
    }
    // Marked first: a lookup that sees the mark finds the entry once it is in.
    mark(&LISTEN_PORTS, u32::from(port));
    let _ = LISTENERS.insert(listener_key(netns, family, port), owner, 0);
}

/// With `--pid`, a process not traced listens on (family, port) with socket `sk`: the port's
/// connections in that namespace no longer tell their owner by their listener (see
/// FOREIGN_LISTENERS). A traced listener recorded in another network namespace keeps its
/// entry.
#[inline(always)]
pub fn forget_listener_shared_with(sk: u64, family: u16, port: u16) {
    let key = tracer_common::foreign_listener_key(netns_of(sk), port);
    // SAFETY: only whether an entry exists is read. (An insert takes the bucket's lock even
    // when the port is marked already.)
    if unsafe { FOREIGN_LISTENERS.get(&key) }.is_none() {
        let _ = FOREIGN_LISTENERS.insert(key, 1, 0);
    }
    if listener_owner(sk, family, port).is_some() {
        forget_listener(sk, family, port);
    }
}

/// Removes the owner recorded for the listener on (family, port) in the network namespace of
/// socket `sk`. (Callers look it up first: a delete takes the bucket lock even when there is
/// nothing to delete.)
#[inline(always)]
pub fn forget_listener(sk: u64, family: u16, port: u16) {
    let _ = LISTENERS.remove(listener_key(netns_of(sk), family, port));
}

/// The network namespace of socket `sk`: its inode number, as /proc/PID/ns/net names it (0
/// where the kernel's BTF did not say where to read it).
#[inline(always)]
fn netns_of(sk: u64) -> u32 {
    kernel_read::<u64>(sk, setting!(sock.net))
        .and_then(|net| kernel_read::<u32>(net, setting!(sock.net_inum)))
        .unwrap_or(0)
}

/// A listener's close in progress, by the closing task: inside it (inet_csk_listen_stop) the
/// kernel destroys the connections still in its accept queue, and one the peer already reset
/// is destroyed there with no move, inside a close(2) or an exit that is the listener's, not
/// its own (no process ever had a descriptor for it). The syscall (number, first argument)
/// tells the listener's close from a later one of the same task; the entry goes with the
/// listener's destruction at the end of its close.
#[map]
static LISTENER_CLOSES: LruHashMap<u32, ListenerClose> = LruHashMap::with_max_entries(1024, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct ListenerClose {
    listener: u64,
    syscall: (u64, u64),
}

/// The current task is closing listener `sk` (its move LISTEN -> CLOSE).
#[inline(always)]
pub fn note_listener_close(sk: u64) {
    if let Some(syscall) = crate::calls::current_syscall() {
        let close = ListenerClose {
            listener: sk,
            syscall,
        };
        let _ = LISTENER_CLOSES.insert(current().tid, close, 0);
    }
}

/// Whether socket `sk` is being destroyed by its listener's close in the current task (see
/// LISTENER_CLOSES): a connection never accepted, whose destruction is no close of its own.
#[inline(always)]
pub fn purged_with_its_listener(sk: u64) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(close) = (unsafe { LISTENER_CLOSES.get(&current().tid) }).copied() else {
        return false;
    };
    close.listener != sk && crate::calls::current_syscall() == Some(close.syscall)
}

/// The listener `sk` is destroyed: its close in the current task is over.
#[inline(always)]
fn listener_closed(sk: u64) {
    let tid = current().tid;
    // SAFETY: the value is copied out at once.
    if unsafe { LISTENER_CLOSES.get(&tid) }.is_some_and(|close| close.listener == sk) {
        let _ = LISTENER_CLOSES.remove(&tid);
    }
}

/// Owners of connections that existed before the tracer started, seeded from /proc.
#[map]
pub static SEED: HashMap<TupleKey, SeedOwner> = HashMap::with_max_entries(16384, 0);

/// The local ports of SEED's connections, by port (set by userspace with SEED): with `--pid`,
/// only a socket on one of them is looked for in SEED by its addresses.
#[map]
pub static SEED_PORTS: Array<u8> = Array::with_max_entries(65536, 0);

pub struct Current {
    pub pid: u32,
    pub tid: u32,
}

#[inline(always)]
pub fn current() -> Current {
    let pid_tgid = bpf_get_current_pid_tgid();
    Current {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
    }
}

#[inline(always)]
pub fn new_conn_id() -> u64 {
    // SAFETY: plain helper calls.
    unsafe { ((bpf_get_prandom_u32() as u64) << 32) | bpf_get_prandom_u32() as u64 }
}

/// LISTENERS' key: the namespace's inode number (0 where unknown: `netns_of`), the family
/// and the port. The daemon's seeding writes the same (`tracer_common::listener_key`).
#[inline(always)]
fn listener_key(netns: u32, family: u16, lport: u16) -> u64 {
    tracer_common::listener_key(netns, family, lport)
}

/// Whether a socket nobody is known to own is worth a table entry: always without `--pid`;
/// with it, only when the current task belongs to a traced process (it may claim the socket).
/// This keeps tracing one quiet service on a busy host nearly free.
#[inline(always)]
pub fn keep_unowned(cur: &Current) -> bool {
    is_traced_process(cur.pid)
}

/// With `--pid`, whether an event of `sk` may concern a traced process, decided before the
/// event's addresses are read (under churn of other processes, reading them was most of the
/// cost of an event that concerns nobody). It may when the socket has an entry (with `--pid`
/// only traced processes' sockets get one), when the current task is traced, when seeded
/// connections exist (they are found by address), or when the socket may inherit its owner
/// from a traced listener: `family_port` reads just the family and local port for that.
#[inline(always)]
pub fn may_concern_traced(
    sk: u64,
    cur: &Current,
    family_port: impl FnOnce() -> Option<(u16, u16)>,
) -> bool {
    if is_traced_process(cur.pid) {
        return true; // also without --pid
    }
    if sock_entry(sk).is_some() {
        return true;
    }
    let Some((family, port)) = family_port() else {
        return false;
    };
    if is_marked(&SEED_PORTS, u32::from(port)) {
        return true; // it may be a seeded connection: lookup_or_create looks in SEED
    }
    has_traced_listener(sk, family, port)
}

/// Whether the listener on (family, port) was recorded for a traced process: what it accepts
/// inherits a traced owner.
#[inline(always)]
fn has_traced_listener(sk: u64, family: u16, port: u16) -> bool {
    listener_pid(sk, family, port).is_some_and(is_traced_process)
}

/// The owner recorded for the listener on (family, port) in the network namespace of socket
/// `sk`, if any. Looked up only on a port that ever had one (LISTEN_PORTS): most sockets'
/// ports never did.
#[inline(always)]
pub fn listener_owner(sk: u64, family: u16, port: u16) -> Option<SeedOwner> {
    if !is_marked(&LISTEN_PORTS, u32::from(port)) {
        return None;
    }
    let key = listener_key(netns_of(sk), family, port);
    // SAFETY: the value is copied out at once.
    unsafe { LISTENERS.get(&key) }.copied()
}

/// The pid of the listener's owner (see `listener_owner`).
#[inline(always)]
pub fn listener_pid(sk: u64, family: u16, port: u16) -> Option<u32> {
    listener_owner(sk, family, port).map(|o| o.pid)
}

/// Looks the socket up, creating its entry (with an owner from the listener or the seed table
/// when one is known) on first sight. With `--pid`, a socket that no traced process owns gets
/// no entry unless `keep` says so. `drops_event`: the caller drops its event when no entry can
/// be made (counted as lost when the table is full).
#[inline(always)]
pub fn lookup_or_create(
    skaddr: u64,
    ev: &SockEvent,
    keep: bool,
    drops_event: bool,
) -> Option<*mut SockInfo> {
    if let Some(info) = sock_entry(skaddr) {
        return Some(info);
    }
    let mut info = SockInfo {
        conn_id: 0, // drawn below, once the entry is known to be kept
        state_since_ns: 0,
        closed_by_call: 0,
        released: 0,
        pid: 0,
        tid: 0,
        comm: [0; 16],
        owner_source: owner_source::UNKNOWN,
        rst_received: 0,
        lport: ev.lport,
        rport: ev.rport,
        traced: 0,
        closed_listener_family: 0,
    };
    let key = TupleKey {
        laddr: ev.laddr,
        raddr: ev.raddr,
        lport: ev.lport,
        rport: ev.rport,
        family: ev.family,
        _pad: 0,
    };
    // Each table is looked in only on a port it has entries on (a new socket of the host
    // otherwise pays two hash lookups that miss, one of them hashing a 40-byte key).
    let seeded = is_marked(&SEED_PORTS, u32::from(ev.lport));
    // SAFETY: a value copied out immediately.
    let inherited = unsafe { seeded.then(|| SEED.get(&key)).flatten() }
        .map(|o| (*o, owner_source::SEEDED))
        .or_else(|| {
            listener_owner(skaddr, ev.family, ev.lport).map(|o| (o, owner_source::LISTENER))
        });
    let traced_owner = inherited.is_some_and(|(owner, _)| is_traced_owner(&owner));
    if !keep && !traced_owner {
        return None; // the caller counts the event as filtered
    }
    info.conn_id = new_conn_id();
    if let Some((owner, source)) = inherited {
        info.pid = owner.pid;
        info.tid = owner.tid;
        info.comm = owner.comm;
        info.owner_source = source;
        info.traced = traced_owner as u8;
    }
    if insert_sock(skaddr, &info, 0).is_err() {
        count(counter::OWNER_TABLE_FULL);
        if drops_event {
            count(counter::LOST_NO_ENTRY);
        }
        return None;
    }
    SOCKS.get_ptr_mut(skaddr)
}

/// Whether an inherited owner makes the socket traced: a traced process, such as a pre-forked
/// server's worker holding a keep-alive connection (seeded from /proc) when the tracer started
/// under `--pid` of its master.
#[inline(always)]
fn is_traced_owner(owner: &SeedOwner) -> bool {
    is_traced_process(owner.pid)
}

/// Records the current task as the socket's owner. A kernel thread finishing a process's
/// socket does not own it (a kworker dropping an io_uring's last file reference after the
/// process exited, MPTCP's worker closing its subflows): the owner stays.
#[inline(always)]
pub fn claim(info: &mut SockInfo, cur: &Current) {
    if info.pid != cur.pid || info.tid != cur.tid || info.owner_source != owner_source::CURRENT {
        if info.owner_source != owner_source::UNKNOWN && crate::calls::in_kernel_thread() {
            return;
        }
        info.pid = cur.pid;
        info.tid = cur.tid;
        info.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        info.owner_source = owner_source::CURRENT;
    }
}

/// Remembers that a traced process owns the socket now (a later claim by an untraced task
/// does not make it untraced). Without `--pid` every socket passes.
#[inline(always)]
pub fn note_traced(info: &mut SockInfo) {
    if info.traced == 0 && is_traced_process(info.pid) {
        info.traced = 1;
    }
}

/// Copies the owner into an event.
#[inline(always)]
pub fn fill_owner(ev: &mut SockEvent, info: &SockInfo) {
    ev.conn_id = info.conn_id;
    ev.pid = info.pid;
    ev.tid = info.tid;
    ev.comm = info.comm;
    ev.owner_source = info.owner_source;
}

/// Keeps the ports current (a connecting socket has no local port until connect() binds it).
#[inline(always)]
pub fn note_ports(info: &mut SockInfo, ev: &SockEvent) {
    info.lport = ev.lport;
    info.rport = ev.rport;
}

/// sock:sock_send_length / sock:sock_recv_length run in the calling task: the cheapest
/// process-context sighting of an accepted socket. Only sockets already in the table are
/// updated, so unrelated traffic costs one lookup.
#[tracepoint]
pub fn sock_io(ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let Some(cur) = io_task() else {
        return 0;
    };
    let Some(rec) = Record::copy(&ctx, setting!(io_record_len)) else {
        return 0;
    };
    let Some(sk) = rec.get::<u64>(setting!(io_skaddr)) else {
        return 0;
    };
    io_seen(
        sk,
        &cur,
        || rec.get::<u16>(setting!(io_protocol)),
        || Some(CLASSIC_SLOT),
    );
    0
}

/// sock_io as a raw tracepoint (on both sock_send_length and sock_recv_length):
/// TP_PROTO(struct sock *sk, int ret, int flags).
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_io_raw(ctx: RawTracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let Some(cur) = io_task() else {
        return 0;
    };
    let sk: u64 = ctx.arg(0);
    let mut entered = None;
    io_seen(
        sk,
        &cur,
        || SockFields::new(sk).protocol(),
        || {
            entered = enter_raw();
            entered
        },
    );
    if let Some(slot) = entered {
        leave_raw(slot);
    }
    0
}

/// The task doing I/O, unless its I/O is of no interest. This runs on every send and receive
/// of every socket on the host; with --pid, an untraced task's I/O changes nothing worth
/// knowing (it would only hand a traced socket to a process whose events are filtered out),
/// so the programs return before reading anything. A traced process's forked child (a
/// pre-forked server's worker) is traced itself (`is_traced_process`).
#[inline(always)]
fn io_task() -> Option<Current> {
    let cur = current();
    keep_unowned(&cur).then_some(cur)
}

/// The task (from `io_task`) did I/O on `sk`. Only TCP sockets are in the table, so the
/// protocol is read only before making a new entry.
#[inline(always)]
///
/// `slot` gives the scratch slot for the capture filter's key (see `watch_socket`), taken only
/// when a socket is first seen.
fn io_seen(
    sk: u64,
    cur: &Current,
    protocol: impl FnOnce() -> Option<u16>,
    slot: impl FnOnce() -> Option<u32>,
) {
    if let Some(info) = sock_entry(sk) {
        // SAFETY: entry pointer from the map; races only with the same socket's events.
        unsafe { claim(&mut *info, cur) };
    } else if protocol() == Some(tracer_common::IPPROTO_TCP) {
        // First sight of this socket (an accepted one whose listener may already be gone):
        // record the task doing I/O on it as its owner, a traced process. Ports come with its
        // next transition.
        remember_io_owner(sk, cur);
        if let Some(slot) = slot() {
            watch_socket(sk, slot);
        }
    }
}

/// With `--pid`, a socket a traced process took over by its I/O is handed to the capture
/// filter at once: no listener of a traced process accepted it (one nginx worker traced, its
/// listener shared with the untraced siblings), so nothing watched it when it was established,
/// and the peer's FIN or RST, the next thing on the wire, would not pass the filter.
#[inline(always)]
fn watch_socket(sk: u64, slot: u32) {
    if setting!(filter_pids) == 0 {
        return;
    }
    if let Some(ev) = scratch_event(slot)
        && SockFields::new(sk).read_tuple(ev).is_some()
    {
        watch(ev, slot);
    }
}

#[inline(always)]
fn remember_io_owner(sk: u64, cur: &Current) {
    let info = SockInfo {
        conn_id: new_conn_id(),
        state_since_ns: 0,
        closed_by_call: 0,
        released: 0,
        pid: cur.pid,
        tid: cur.tid,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        owner_source: owner_source::CURRENT,
        rst_received: 0,
        lport: 0,
        rport: 0,
        traced: 1,
        closed_listener_family: 0,
    };
    // EEXIST: another event of the socket created the entry meanwhile; anything else: full.
    const EEXIST: i32 = -17;
    if let Err(e) = insert_sock(sk, &info, BPF_NOEXIST as u64) {
        if e != EEXIST {
            count(counter::OWNER_TABLE_FULL);
        }
    }
}

/// A socket destroyed after its owner released it (an orphan), with its entry: the last one on
/// this CPU. An orphan that gets data after its close (TCP_ABORT_ON_DATA) is destroyed by
/// tcp_reset() first and sends its RST right after, in the same softirq: the RST is named from
/// here (its connection and owner), where it made a new entry (a new `conn`, the listener's
/// owner) that nothing would ever remove. TCP sockets are freed for immediate reuse: a later
/// socket at the same address is told apart by the time (the RST follows within
/// microseconds) and its ports, and the record serves one RST.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Destroyed {
    sk: u64,
    at_ns: u64,
    info: SockInfo,
}

/// How soon after the destruction its RST must come (in the same softirq: microseconds).
const DESTROYED_RST_WITHIN_NS: u64 = 1_000_000;

#[map]
static LAST_DESTROYED: PerCpuArray<Destroyed> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn remember_destroyed(sk: u64, info: *mut SockInfo) {
    // SAFETY: this CPU's slot; the entry pointer is valid until the entry is removed, after.
    unsafe {
        if (*info).released == 0 {
            return; // its owner still holds it: no segment of its connection reaches it now
        }
        if let Some(slot) = LAST_DESTROYED.get_ptr_mut(0) {
            (*slot).sk = sk;
            (*slot).at_ns = bpf_ktime_get_ns();
            (*slot).info = *info;
        }
    }
}

/// The entry of `sk` if it is the socket destroyed on this CPU just now (see `Destroyed`).
/// The caller checks the ports with `is_destroyed_connection` once it has read them.
#[inline(always)]
pub fn destroyed_entry(sk: u64) -> Option<*mut SockInfo> {
    let slot = LAST_DESTROYED.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, read and written only by programs running on it.
    unsafe {
        if (*slot).sk != sk || bpf_ktime_get_ns() - (*slot).at_ns > DESTROYED_RST_WITHIN_NS {
            return None;
        }
        (*slot).sk = 0; // one RST
        Some(&raw mut (*slot).info)
    }
}

/// Whether the RST's ports are the destroyed socket's (see `Destroyed`).
#[inline(always)]
pub fn is_destroyed_connection(info: *mut SockInfo, ev: &SockEvent) -> bool {
    // SAFETY: this CPU's slot (see `destroyed_entry`).
    unsafe { (*info).lport == ev.lport && (*info).rport == ev.rport }
}

/// tcp:tcp_destroy_sock: the socket is gone; its address may be reused.
#[tracepoint]
pub fn destroy_sock(ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    if let Some(sk) = field::<u64>(&ctx, setting!(destroy_sock.skaddr))
        && let Some(info) = sock_entry(sk)
    {
        remember_destroyed(sk, info);
        forget(sk, info);
    }
    0
}

/// tcp_destroy_sock as a raw tracepoint: TP_PROTO(struct sock *sk).
#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn destroy_sock_raw(ctx: RawTracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    // A lookup first: most sockets were never in the table (always so for other processes
    // with --pid), and a delete takes the bucket lock even when there is nothing to delete.
    let Some(info) = sock_entry(sk) else {
        return 0;
    };
    if let Some(slot) = enter_raw() {
        // The arguments array lies on the kernel stack this program runs on.
        let stack = ctx.as_ptr() as u64;
        let _ = crate::state::close_of_a_closed_socket(sk, info, stack, slot);
        let _ = crate::state::close_of_a_closed_socket_by_no_call(sk, info, stack, slot);
        leave_raw(slot);
    }
    remember_destroyed(sk, info);
    forget(sk, info);
    0
}

/// Removes the entry of a socket that has one (`info`), and a closed listener's owner.
#[inline(always)]
fn forget(sk: u64, info: *mut SockInfo) {
    // A close held for its RST (only a socket with an entry has one): no RST came.
    crate::held::send_without_reset(sk);
    // SAFETY: the entry pointer is valid until the entry is removed, below.
    let (family, port, pid) =
        unsafe { ((*info).closed_listener_family, (*info).lport, (*info).pid) };
    // Unless another process listens on the port by now.
    if family != 0 {
        listener_closed(sk);
        if listener_pid(sk, family, port) == Some(pid) {
            forget_listener(sk, family, port);
        }
    }
    let _ = SOCKS.remove(sk);
}
