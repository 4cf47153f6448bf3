//! Types shared by the kernel programs (`tracer-ebpf`) and the daemon (`tracer`).
//!
//! Everything here is `#[repr(C)]` and plain data: the kernel writes these bytes into the ring
//! buffer and the daemon reads them back, so both sides must agree on one definition.
#![no_std]

/// Kernel TCP states, numbered as in include/net/tcp_states.h.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// What a kernel event is. Classification by transition happens in the kernel program, because
/// the kernel program is the only place that knows whether the task was inside a close call.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The owner began the teardown (close/shutdown/exit) and the socket changed state.
    Close = 1,
    /// The peer's FIN moved the socket on (ESTABLISHED->CLOSE_WAIT, FIN_WAIT1->CLOSING).
    FinReceived = 2,
    /// tcp:tcp_send_reset fired for this socket (or for no socket at all).
    RstSent = 3,
    /// tcp:tcp_receive_reset fired.
    RstReceived = 4,
    /// Any other transition the filter lets through.
    State = 5,
    /// The time-wait form of an orphaned FIN_WAIT2 socket ended with no FIN from the peer:
    /// its FIN_WAIT2 timeout (tcp_fin_timeout, or the socket's TCP_LINGER2) passed. No socket
    /// and no owner: the daemon names the connection by its addresses.
    Fin2Timeout = 6,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Close,
            2 => Self::FinReceived,
            3 => Self::RstSent,
            4 => Self::RstReceived,
            5 => Self::State,
            6 => Self::Fin2Timeout,
            _ => return None,
        })
    }
}

/// Which call, if any, the owning task was inside when the event fired.
pub mod syscall {
    pub const NONE: u8 = 0;
    pub const CLOSE: u8 = 1;
    pub const SHUTDOWN: u8 = 2;
    pub const EXIT: u8 = 3;
}

/// How the owner in an event was found.
pub mod owner_source {
    /// No owner known: the socket was never seen in process context since the tracer started.
    pub const UNKNOWN: u8 = 0;
    /// Recorded from a task of the owning process acting on this socket (connect, listen,
    /// close, shutdown, send, recv); read back for events that run in softirq context.
    pub const CURRENT: u8 = 1;
    /// Seeded at start-up from /proc for connections opened before the tracer.
    pub const SEEDED: u8 = 3;
    /// Inherited from the listening socket that accepted the connection.
    pub const LISTENER: u8 = 4;
    /// A RST sent for a packet that matched no socket: no process owns it.
    pub const NO_SOCKET: u8 = 5;
    /// A time-wait socket's end: no process owns those.
    pub const TIME_WAIT: u8 = 6;
}

/// One kernel event, as written to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockEvent {
    /// bpf_ktime_get_ns(): CLOCK_MONOTONIC.
    pub ts_ns: u64,
    /// Opaque per-socket id drawn in the kernel; never a kernel address.
    pub conn_id: u64,
    /// When the socket entered `old_state` (0 when unknown).
    pub state_since_ns: u64,
    /// Ties a close to the RST it produced: the owner's call start time (0 when none).
    pub call_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    pub fd: i32,
    /// sk_rst_reason value, or -1 when the kernel gives none.
    pub reason: i32,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    pub family: u16,
    pub kind: u8,
    pub old_state: u8,
    pub new_state: u8,
    pub syscall: u8,
    pub owner_source: u8,
    /// For a close that moved its socket straight to CLOSE: whether the kernel sent its RST
    /// (`close_reset`; the reason is then in `reason`). Known where the programs hold such a
    /// close until tcp_close() has either sent the RST or destroyed the socket.
    pub close_reset: u8,
    /// For a sent RST: whether it carries ACK (`rst_ack`), which tells two RSTs of one
    /// connection apart on the wire (an active reset from one answering a segment).
    pub rst_ack: u8,
    /// For a move to CLOSE that is neither a close nor a received reset: the socket's error
    /// (`sk_err`, an errno: ETIMEDOUT when retransmissions or TCP_USER_TIMEOUT gave up), 0 when
    /// none or not known.
    pub sk_err: u8,
    pub _pad: [u8; 2],
}

/// Values of `SockEvent::rst_ack`.
pub mod rst_ack {
    pub const UNKNOWN: u8 = 0;
    pub const WITHOUT: u8 = 1;
    pub const WITH: u8 = 2;
}

/// Values of `SockEvent::close_reset`.
pub mod close_reset {
    /// Not known: the RST, if any, comes as its own `RstSent` event.
    pub const UNKNOWN: u8 = 0;
    /// The close sent a RST; `SockEvent::reason` is the kernel's reason for it.
    pub const SENT: u8 = 1;
    /// tcp_close() destroyed the socket without sending one.
    pub const NOT_SENT: u8 = 2;
}

/// Where the fields of one tracepoint's record are, read from its tracefs format file by the
/// daemon and handed to the kernel program. `NONE` marks a field this kernel does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TupleLayout {
    pub skaddr: u16,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub protocol: u16,
    /// Where the record's last field ends: the programs copy this much of the record at once
    /// (one probe read instead of one per field).
    pub record_len: u16,
}

/// Layout of tcp:tcp_send_reset. Since 6.10 its addresses are `struct sockaddr_in6`-sized
/// blobs (`sockaddr_saddr`/`sockaddr_daddr`); before, it had the same port and address fields as
/// the other TCP tracepoints (`tuple`). Exactly one of the two is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetLayout {
    pub skaddr: u16,
    pub state: u16,
    /// NONE on kernels before 6.10, which have no `reason` field.
    pub reason: u16,
    pub sockaddr_saddr: u16,
    pub sockaddr_daddr: u16,
    /// As in `TupleLayout`.
    pub record_len: u16,
    /// `skbaddr`: the segment a reset answers (its addresses name the connection when the
    /// socket that answers is a listener).
    pub skbaddr: u16,
    pub _pad: u16,
    pub tuple: TupleLayout,
}

/// Where the fields the programs read sit in `struct sock`, from the kernel's BTF: what the
/// raw tracepoint programs read instead of a tracepoint record. `NONE` where not found (then
/// the classic tracepoints are used).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockLayout {
    pub family: u16,
    /// `inet_sport`: the local port, network order (what the tracepoint's record shows).
    pub sport: u16,
    /// `skc_dport`: the remote port, network order.
    pub dport: u16,
    /// `inet_saddr`: the local IPv4 address.
    pub saddr: u16,
    pub daddr: u16,
    pub v6_rcv_saddr: u16,
    pub v6_daddr: u16,
    pub protocol: u16,
    /// 1 or 2 bytes (a u8 bit-field before Linux 5.6, a u16 since).
    pub protocol_size: u16,
    /// `sk_shutdown` (a byte; NONE where it is a bit-field): tcp_close() sets it to
    /// SHUTDOWN_MASK first thing.
    pub shutdown: u16,
    /// `sk_err` (an int): the error a socket the kernel gave up on ends with.
    pub err: u16,
    /// `sk_socket` (a pointer): NULL for a connection never accepted (still in a listener's
    /// queue), which no call on a descriptor can be closing.
    pub socket: u16,
    /// `sk_lock.owned` (an int): set while a task holds the socket's lock (lock_sock(), as
    /// tcp_close() does); never while a softirq moves it, wherever that softirq runs.
    pub owned: u16,
    /// `skc_net` (a pointer to the socket's struct net).
    pub net: u16,
    /// `ns.inum` in struct net: the namespace's inode number, as /proc/PID/ns/net names it.
    pub net_inum: u16,
}

impl SockLayout {
    pub const NONE: Self = Self {
        family: NONE,
        sport: NONE,
        dport: NONE,
        saddr: NONE,
        daddr: NONE,
        v6_rcv_saddr: NONE,
        v6_daddr: NONE,
        protocol: NONE,
        protocol_size: 0,
        shutdown: NONE,
        err: NONE,
        socket: NONE,
        owned: NONE,
        net: NONE,
        net_inum: NONE,
    };
}

/// Where a received segment's headers are, from the kernel's BTF (`struct sk_buff`): a RST a
/// listener sends names no connection of its own, and the segment it answers does. All NONE
/// where the BTF does not say.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkbLayout {
    pub head: u16,
    /// `data`: at the TCP header once TCP receives the segment.
    pub data: u16,
    /// `network_header`: the IP header's offset from `head`.
    pub network_header: u16,
    pub _pad: u16,
}

impl SkbLayout {
    pub const NONE: Self = Self {
        head: NONE,
        data: NONE,
        network_header: NONE,
        _pad: 0,
    };
}

/// Where a time-wait socket's timer, substate and addresses are, from the kernel's BTF, and the
/// address of the kernel's time-wait timer function (from /proc/kallsyms): a timer that expires
/// with that function is a time-wait socket's end. All NONE (and `handler` 0) where either does
/// not say.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitLayout {
    /// `tw_timer_handler`'s address.
    pub handler: u64,
    /// `timer_list.function`.
    pub timer_function: u16,
    /// `inet_timewait_sock.tw_timer`: the timer's offset in its socket.
    pub tw_timer: u16,
    /// `inet_timewait_sock.tw_substate`: FIN_WAIT2 until the peer's FIN, then TIME_WAIT.
    pub substate: u16,
    /// `inet_timewait_sock.tw_sport`: the local port, network order.
    pub sport: u16,
    /// `sock_common.skc_rcv_saddr`: the local IPv4 address.
    pub rcv_saddr: u16,
    /// `timer` in timer:timer_expire_entry's record (from its format file), for the classic
    /// tracepoint program.
    pub record_timer: u16,
    pub _pad: [u16; 2],
}

impl TimewaitLayout {
    pub const NONE: Self = Self {
        handler: 0,
        timer_function: NONE,
        tw_timer: NONE,
        substate: NONE,
        sport: NONE,
        rcv_saddr: NONE,
        record_timer: NONE,
        _pad: [0; 2],
    };
}

/// Offsets (from the kernel's BTF) of the pointers from the current task to the socket behind
/// one of its file descriptors: task_struct.files -> files_struct.fdt -> fdtable.fd[fd] ->
/// file.private_data -> socket.sk, with fdtable.max_fds to bound the index and socket.file to
/// check the file is a socket's. With them a close(2) or shutdown(2) knows the one socket it
/// acts on; all NONE where the BTF does not say.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLayout {
    pub task_files: u16,
    pub files_fdt: u16,
    pub fdt_max_fds: u16,
    pub fdt_fd: u16,
    pub file_private_data: u16,
    pub socket_sk: u16,
    pub socket_file: u16,
    pub _pad: u16,
}

impl FdLayout {
    pub const NONE: Self = Self {
        task_files: NONE,
        files_fdt: NONE,
        fdt_max_fds: NONE,
        fdt_fd: NONE,
        file_private_data: NONE,
        socket_sk: NONE,
        socket_file: NONE,
        _pad: 0,
    };
}

/// Where a task's syscall number and first argument lie in its saved user registers
/// (`struct pt_regs`, offsets from the kernel's BTF), and this architecture's numbers of the
/// calls that tear a socket down. With them a teardown seen in the closing task's own context
/// names its call from the registers, and no syscall tracepoint is attached (those put every
/// syscall of every task on the kernel's slow path). `syscall_nr` is NONE where they are not
/// used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegsLayout {
    pub syscall_nr: u16,
    pub arg0: u16,
    /// The second argument's register (close_range's last descriptor); NONE: not known.
    pub arg1: u16,
    pub nr_close: u16,
    pub nr_shutdown: u16,
    pub nr_close_range: u16,
    /// Offset of `task_struct.flags` (PF_EXITING tells a process exit's entry in CALLS from
    /// one an earlier thread of the same tid left behind); NONE: such entries are trusted.
    pub task_flags: u16,
}

impl RegsLayout {
    pub const NONE: Self = Self {
        syscall_nr: NONE,
        arg0: NONE,
        arg1: NONE,
        nr_close: NONE,
        nr_shutdown: NONE,
        nr_close_range: NONE,
        task_flags: NONE,
    };
}

/// The BPF stack lies in the calling task's kernel stack, at most this far below its saved
/// user registers, when a program runs in that task's own context; a softirq runs on the CPU's
/// interrupt stack instead. The smallest task stack of the architectures we build for (16 KiB)
/// less a generous `struct pt_regs`.
pub const TASK_STACK_SPAN: u64 = 16 * 1024 - 512;

/// The most of a tracepoint record the programs copy at once; fields past it are read one by
/// one.
pub const RECORD_BYTES: usize = 128;

/// Offset meaning "this kernel has no such field".
pub const NONE: u16 = u16::MAX;

/// The daemon's settings for the kernel programs, written into a read-only global at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub set_state: TupleLayout,
    pub receive_reset: TupleLayout,
    pub destroy_sock: TupleLayout,
    pub send_reset: ResetLayout,
    /// Offsets of `fd` in syscalls:sys_enter_close and sys_enter_shutdown, `how` in the latter.
    pub close_fd: u16,
    pub shutdown_fd: u16,
    pub shutdown_how: u16,
    /// Offsets of `sk` and `protocol` in sock:sock_send_length and sock:sock_recv_length (the
    /// two share one layout; the daemon checks that before attaching).
    pub io_skaddr: u16,
    pub io_protocol: u16,
    /// 1 when `--pid` was given: only sockets whose owner is in the PIDS map pass.
    pub filter_pids: u8,
    /// 1 when `--port` was given: only tuples with a port in the PORTS map pass.
    pub filter_ports: u8,
    /// 1 with `--all-states`: handshake transitions are emitted too.
    pub all_states: u8,
    /// 1 for the floor benchmark: the programs return at once, doing nothing.
    pub noop: u8,
    /// As `TupleLayout::record_len`, for sock_send_length / sock_recv_length.
    pub io_record_len: u16,
    /// Offsets of `pid` and `clone_flags` in task:task_newtask (a forked child is followed
    /// for its calls with `--pid`).
    pub newtask_pid: u16,
    pub newtask_flags: u16,
    /// Wake the reader only once this many bytes wait in the ring buffer; below that the
    /// daemon drains on its own timer. One wakeup per event costs more than the event.
    pub wakeup_bytes: u32,
    /// With `--pid` of at most `INLINE_PIDS` processes, the traced pids themselves (unused
    /// slots 0, which never passes): the check runs on every close and shutdown of the host
    /// and several times per connection, and comparing a few constants costs less than a hash
    /// lookup. All 0 with more processes: the PIDS map decides.
    pub inline_pids: [u32; INLINE_PIDS],
    /// For the raw tracepoint programs (all NONE when they are not used).
    pub sock: SockLayout,
    /// For close(2) and shutdown(2): the socket behind the descriptor.
    pub fd: FdLayout,
    /// For calls named from the closing task's registers instead of syscall tracepoints.
    pub regs: RegsLayout,
    /// For resets sent by a listener.
    pub skb: SkbLayout,
    /// The loopback interface's index in the daemon's network namespace (0: none). A capture on
    /// `any` sees every loopback packet twice, leaving and arriving; the `--pid` capture filter
    /// drops the leaving copy before reading a byte of it.
    pub loopback_ifindex: u32,
    /// 1 when tcp_send_reset and tcp_destroy_sock are both attached: an abortive close is held
    /// in the kernel until its RST (or the socket's end) and goes out as one event with it.
    pub hold_aborts: u8,
    pub _pad_end: [u8; 3],
    /// For the end of a time-wait socket whose FIN_WAIT2 timed out.
    pub timewait: TimewaitLayout,
}

/// How many traced pids `Config::inline_pids` holds.
pub const INLINE_PIDS: usize = 8;

/// Slots of FORKED_MARKS, the per-pid marks in front of the FORKED map (with `--pid`, the
/// traced processes' forked children, followed for their calls).
pub const FORKED_MARK_SLOTS: u32 = 1 << 16;

/// A pid's slot in FORKED_MARKS: the kernel programs and the daemon (which follows the children
/// already running at start) must agree on it.
pub const fn forked_mark_slot(pid: u32) -> u32 {
    pid % FORKED_MARK_SLOTS
}

impl Config {
    pub const fn zeroed() -> Self {
        const T: TupleLayout = TupleLayout::NONE;
        Self {
            set_state: T,
            receive_reset: T,
            destroy_sock: T,
            send_reset: ResetLayout {
                skaddr: NONE,
                state: NONE,
                reason: NONE,
                sockaddr_saddr: NONE,
                sockaddr_daddr: NONE,
                record_len: 0,
                skbaddr: NONE,
                _pad: 0,
                tuple: T,
            },
            close_fd: NONE,
            shutdown_fd: NONE,
            shutdown_how: NONE,
            io_skaddr: NONE,
            io_protocol: NONE,
            filter_pids: 0,
            filter_ports: 0,
            all_states: 0,
            noop: 0,
            io_record_len: 0,
            newtask_pid: NONE,
            newtask_flags: NONE,
            wakeup_bytes: 0,
            inline_pids: [0; INLINE_PIDS],
            sock: SockLayout::NONE,
            fd: FdLayout::NONE,
            regs: RegsLayout::NONE,
            skb: SkbLayout::NONE,
            loopback_ifindex: 0,
            hold_aborts: 0,
            _pad_end: [0; 3],
            timewait: TimewaitLayout::NONE,
        }
    }
}

impl TupleLayout {
    /// Every field absent.
    pub const NONE: Self = Self {
        skaddr: NONE,
        family: NONE,
        sport: NONE,
        dport: NONE,
        saddr: NONE,
        daddr: NONE,
        saddr_v6: NONE,
        daddr_v6: NONE,
        oldstate: NONE,
        newstate: NONE,
        protocol: NONE,
        record_len: 0,
    };
}

/// A socket's owner as seeded by the daemon for connections that existed before it started:
/// key of the SEED map (family, addresses and ports as the socket sees them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    pub family: u16,
    pub _pad: u16,
}

/// Value of the SEED map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SeedOwner {
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
}

/// The key of a listener's owner (LISTENERS): its network namespace's inode number (as
/// /proc/PID/ns/net names it; 0 where the programs cannot read it), family and port.
pub const fn listener_key(netns: u32, family: u16, port: u16) -> u64 {
    ((netns as u64) << 32) | ((family as u64) << 16) | port as u64
}

/// The key of a port where a process not traced listens (FOREIGN_LISTENERS): the port in its
/// network namespace, whatever the family (a dual-stack listener takes both).
pub const fn foreign_listener_key(netns: u32, port: u16) -> u64 {
    listener_key(netns, 0, port)
}

/// Indexes of the per-CPU COUNTERS array.
pub mod counter {
    /// A ring-buffer reservation failed: an event was lost.
    pub const RINGBUF_LOST: u32 = 0;
    /// The per-socket owner table was full: attribution for that socket may be missing.
    pub const OWNER_TABLE_FULL: u32 = 1;
    /// Events dropped by the --pid/--port filter in the kernel (never reached userspace).
    pub const FILTERED: u32 = 2;
    /// Events written to the ring buffer.
    pub const EMITTED: u32 = 3;
    /// Runs of a raw tracepoint program given up because programs were nested too deep on
    /// one CPU (never expected; reported as lost with the kernel's own skipped runs).
    pub const NESTED_TOO_DEEP: u32 = 4;
    /// Socket events dropped because the owner table had no room for their socket's entry
    /// (reported as lost, source `owner_table`; OWNER_TABLE_FULL counts every refused entry,
    /// also where no line was lost).
    pub const LOST_NO_ENTRY: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Ring buffer size used unless the daemon overrides it (bytes, power of two).
pub const DEFAULT_RINGBUF_BYTES: u32 = 4 << 20;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C) plain data with no padding that could hold uninitialised
    // bytes in a way aya cares about; any bit pattern is valid.
    unsafe impl aya::Pod for SockEvent {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for SeedOwner {}
}

// The loader writes CONFIG as bytes: no padding the compiler would insert (and leave
// uninitialised) before the time-wait layout's u64.
const _: () = assert!(core::mem::offset_of!(Config, timewait) % 8 == 0);
