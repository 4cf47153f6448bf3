//! Which call the current task is in: close(2), shutdown(2) or process exit.
//!
//! On loopback, a close() runs the peer's softirq processing in the closer's own task, and any
//! softirq may run inside any call of the task it interrupts, so "the current task is in
//! close()" does not mean "this socket is being closed". Where the kernel's BTF gives the way,
//! a call knows its socket from the start: the one behind its descriptor, read from the task's
//! file table (or none, for a pipe or a file). Without it, a call claims the first socket whose
//! state it changes (tcp_close and tcp_shutdown change the state before they send anything),
//! or exactly the socket that the tcp_close kprobe names when kprobes exist. Process exit
//! closes every file of the task, so an exit claims each socket the exiting process owns.
//!
//! Where the kernel's BTF gives `struct pt_regs` (and `bpf_task_pt_regs`, 5.15), no syscall
//! tracepoint is attached at all: attaching one puts every syscall of every task on the
//! kernel's slow path, the largest part of the hooks' cost to other processes (~4 µs per
//! connection of a churn load here). A teardown then names its call from the task's saved
//! user registers (syscall number and descriptor), and only when the program runs in the
//! task's own context: a softirq runs on the CPU's interrupt stack, so a program whose frame
//! is not on the task's stack is not the task's doing, whatever call it interrupted.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_current_task, bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_task_pt_regs,
    },
    macros::{kprobe, map, tracepoint},
    maps::{Array, LruHashMap},
    programs::{ProbeContext, TracePointContext},
};
use tracer_common::{
    FORKED_MARK_SLOTS, NONE, RegsLayout, SockEvent, TASK_STACK_SPAN, forked_mark_slot, syscall,
};

use crate::{
    emit::{Span, field, forget_reused_pid, kernel_read, noop, pid_passes},
    owners::{RELEASED, SockInfo, current, is_marked, mark},
    setting,
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingCall {
    pub started_ns: u64,
    /// The socket this call acts on, once known (0 until then; `NOT_A_SOCKET` when its
    /// descriptor is not a socket's).
    pub claimed_sk: u64,
    /// When the syscall returned (0 while inside it). Kernels before 6.x defer the final fput
    /// of close(2) to task_work, which runs right after sys_exit_close: the call still counts
    /// for AFTER_EXIT_NS after it returned. (Always 0 where calls are named from the
    /// registers: the registers say whether the task is still in the call.)
    pub exited_ns: u64,
    pub fd: i32,
    pub kind: u8,
    pub _pad: [u8; 3],
}

impl PendingCall {
    /// A call starting now.
    #[inline(always)]
    fn starting_now(kind: u8, fd: i32, claimed_sk: u64) -> Self {
        Self {
            // SAFETY: plain helper call.
            started_ns: unsafe { bpf_ktime_get_ns() },
            claimed_sk,
            exited_ns: 0,
            fd,
            kind,
            _pad: [0; 3],
        }
    }

    /// Names this call on an event it caused: its id, which syscall, which descriptor.
    #[inline(always)]
    pub fn stamp(&self, ev: &mut SockEvent) {
        ev.call_id = self.started_ns;
        ev.syscall = self.kind;
        ev.fd = self.fd;
    }
}

#[map]
static CALLS: LruHashMap<u32, PendingCall> = LruHashMap::with_max_entries(16384, 0);

/// With `--pid`, the processes a traced process forked (and those they forked): their close,
/// shutdown and exit calls are recorded too, never their sockets. A forking server's child
/// closes what its traced parent accepted (the socket stays traced, `SockInfo::traced`), and
/// without the child's call its line said `syscall: null`. The daemon adds the children already
/// running when it starts (a pre-forked server's workers); `process_fork`, later ones. LRU,
/// never cleaned: a dead child's entry ages out, and a pid reused by an unrelated process only
/// gets its calls recorded, which name nothing unless it acts on a traced socket (and then
/// rightly name its call).
#[map]
static FORKED: LruHashMap<u32, u8> = LruHashMap::with_max_entries(8192, 0);

/// A mark per pid slot, set before a FORKED entry goes in: every other process's close and
/// shutdown is decided by an array slot instead of a hash lookup.
#[map]
static FORKED_MARKS: Array<u8> = Array::with_max_entries(FORKED_MARK_SLOTS, 0);

/// Slot 0 is set once any child is followed. Most traced services fork nothing (new threads
/// do not count): then every other process's close and I/O is decided by this one slot, which
/// stays in the cache, instead of a slot of FORKED_MARKS (64 KiB: a random pid's slot missed
/// the cache, +40-60 ns on each close of the host).
#[map]
static FOLLOWING: Array<u8> = Array::with_max_entries(1, 0);

/// Whether process `pid` is a traced process's forked child (see FORKED).
#[inline(always)]
pub fn is_followed(pid: u32) -> bool {
    is_marked(&FOLLOWING, 0)
        && is_marked(&FORKED_MARKS, forked_mark_slot(pid))
        && FORKED.get_ptr(pid).is_some()
}

/// Whether process `pid` is traced: every process without `--pid`; with it, the traced ones
/// and the children they fork (followed from their fork, or from start-up for the ones that
/// were running): a pre-forked server's workers and the connections they open themselves.
#[inline(always)]
pub fn is_traced_process(pid: u32) -> bool {
    pid_passes(pid) || is_followed(pid)
}

/// `clone_flags` bit of a new thread (as opposed to a new process).
const CLONE_THREAD: u64 = 0x0001_0000;

/// task:task_newtask, in the forking task: with `--pid`, a process that a traced (or followed)
/// process forks is followed for its calls (see FORKED). New threads are already covered by
/// their process. A new process with the pid of a traced process or of a followed child is
/// not that process, which has exited: the pid stops naming it at once (the daemon forgets
/// exited children only every 2 s, and kept one whose pid a new process had taken meanwhile).
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    if noop() || setting!(filter_pids) == 0 {
        return 0;
    }
    let flags = field::<u64>(&ctx, setting!(newtask_flags)).unwrap_or(CLONE_THREAD);
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let Some(child) = field::<i32>(&ctx, setting!(newtask_pid)).filter(|&pid| pid > 0) else {
        return 0;
    };
    let child = child as u32;
    forget_reused_pid(child);
    if !is_traced_process(current().pid) {
        if is_followed(child) {
            let _ = FORKED.remove(&child);
        }
        return 0;
    }
    // Marked first: a lookup that sees the marks finds the entry once it is in.
    mark(&FOLLOWING, 0);
    mark(&FORKED_MARKS, forked_mark_slot(child));
    let _ = FORKED.insert(child, 1, 0); // LRU: evicts the oldest when full
    0
}

/// `claimed_sk` of a call whose descriptor is not a socket's: matches no socket.
const NOT_A_SOCKET: u64 = u64::MAX;

#[inline(always)]
fn begin(kind: u8, fd: i32) {
    let cur = current();
    if !is_traced_process(cur.pid) {
        return; // with --pid, other processes' calls are never looked at
    }
    let claimed_sk = socket_behind(fd).map_or(0, |sk| if sk == 0 { NOT_A_SOCKET } else { sk });
    let call = PendingCall::starting_now(kind, fd, claimed_sk);
    record(cur.tid, CALLS.get_ptr_mut(cur.tid), &call);
}

/// Replaces a task's previous call in place: an LRU insert allocates a new element and frees
/// the old one (a large share of a close's hook time when tracing everything), and a task's
/// entry stays from one call to the next. A softirq interrupting the task between the stores
/// must not take a half-written call for a whole one: `started_ns` is 0 (no call) while the
/// others are written.
///
/// # Safety
/// `entry` is the current task's entry in CALLS.
#[inline(always)]
unsafe fn overwrite(entry: *mut PendingCall, call: &PendingCall) {
    use core::ptr::{addr_of_mut, write_volatile};
    unsafe {
        write_volatile(addr_of_mut!((*entry).started_ns), 0);
        write_volatile(addr_of_mut!((*entry).claimed_sk), call.claimed_sk);
        write_volatile(addr_of_mut!((*entry).exited_ns), call.exited_ns);
        write_volatile(addr_of_mut!((*entry).fd), call.fd);
        write_volatile(addr_of_mut!((*entry).kind), call.kind);
        write_volatile(addr_of_mut!((*entry).started_ns), call.started_ns);
    }
}

/// The socket behind the current task's descriptor `fd`: Some(0) when the descriptor is not
/// a socket's (or not open), None when that cannot be told (no layout from the BTF, a read
/// that failed). Walks task->files->fdt->fd[fd]->private_data, and checks the socket's own
/// `file` points back: private_data of other files is something else.
#[inline(always)]
fn socket_behind(fd: i32) -> Option<u64> {
    let files_at = setting!(fd.task_files);
    if files_at == NONE || fd < 0 {
        return None;
    }
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kernel_read(task, files_at)?;
    let fdt: u64 = kernel_read(files, setting!(fd.files_fdt))?;
    // fdtable's max_fds and fd, and socket's file and sk, are neighbours: one read each.
    let (max_fds_at, fd_array_at) = (setting!(fd.fdt_max_fds), setting!(fd.fdt_fd));
    let table = Span::<16>::read(fdt, &[max_fds_at, fd_array_at]);
    let max_fds: u32 = table.get(max_fds_at)?;
    if fd as u32 >= max_fds {
        return Some(0);
    }
    let fds: u64 = table.get(fd_array_at)?;
    let file: u64 = kernel_read(fds + fd as u64 * 8, 0)?;
    if file == 0 {
        return Some(0);
    }
    let socket: u64 = kernel_read(file, setting!(fd.file_private_data))?;
    if socket == 0 {
        return Some(0);
    }
    let (file_at, sk_at) = (setting!(fd.socket_file), setting!(fd.socket_sk));
    let fields = Span::<16>::read(socket, &[file_at, sk_at]);
    if fields.get::<u64>(file_at) != Some(file) {
        return Some(0);
    }
    fields.get(sk_at)
}

/// How long after close(2) returned its deferred fput may still act on the socket. It runs
/// before the task is back in user space, but the task can be preempted in between: 1 ms was
/// too short in a VM (Debian's 6.1 under qemu, where `syscall` came out null).
const AFTER_EXIT_NS: u64 = 20_000_000;

#[inline(always)]
fn end() {
    let cur = current();
    if !is_traced_process(cur.pid) {
        return; // with --pid, other processes' calls never made an entry
    }
    if let Some(call) = CALLS.get_ptr_mut(cur.tid) {
        // SAFETY: this task's own entry; only this task writes it.
        unsafe {
            if (*call).kind != syscall::EXIT {
                (*call).exited_ns = bpf_ktime_get_ns();
            }
        }
    }
}

/// Whether a task's entry is a call still going on: not one being overwritten by the task's
/// next call (see `overwrite`), nor one long returned (a later transition is not its). A
/// returned call's entry stays until the task's next call overwrites it: removing it here,
/// in a softirq, could free it under the task's own `begin`.
#[inline(always)]
fn is_current(call: &PendingCall) -> bool {
    // SAFETY: plain helper call.
    call.started_ns != 0
        && (call.exited_ns == 0 || unsafe { bpf_ktime_get_ns() } - call.exited_ns <= AFTER_EXIT_NS)
}

/// The call of the current task that acts on `sk`, claiming `sk` for the call when the call has
/// not acted on any socket yet. `context` is what the program knows of where it runs (used
/// where calls are named from the registers). `info` is what is known of `sk` (None: nothing): a socket
/// whose file is already released can only be acted on by the call that released it; its later
/// moves run in softirqs of whatever task they interrupt, inside calls on other files.
#[inline(always)]
pub fn call_acting_on(sk: u64, info: Option<&SockInfo>, context: Context) -> Option<PendingCall> {
    if calls_from_registers() {
        return call_from_registers(sk, info, context);
    }
    let tid = current().tid;
    let entry = CALLS.get_ptr_mut(tid)?;
    // SAFETY: this task's own entry; only this task writes it.
    let call = unsafe { &mut *entry };
    if !is_current(call) {
        return None;
    }
    if info.is_some_and(|i| i.released == RELEASED && i.closed_by_call != call.started_ns) {
        return None;
    }
    if call.kind == syscall::EXIT || call.claimed_sk == sk {
        return Some(*call);
    }
    if call.claimed_sk == 0 {
        call.claimed_sk = sk;
        return Some(*call);
    }
    None
}

/// Whether calls are named from the task's registers (no syscall tracepoints attached).
#[inline(always)]
fn calls_from_registers() -> bool {
    setting!(regs.syscall_nr) != NONE
}

/// The syscall the current task is in, as (number, first argument) from its saved registers:
/// tells one syscall from another of the same task. None where calls are not named from the
/// registers.
#[inline(always)]
pub fn current_syscall() -> Option<(u64, u64)> {
    if !calls_from_registers() {
        return None;
    }
    let saved = syscall_of_current_task(Context::Task)?;
    Some((saved.nr, saved.arg0))
}

/// What a program knows of the context it runs in.
#[derive(Clone, Copy)]
pub enum Context {
    /// An address on the kernel stack the program runs on (a raw tracepoint's arguments).
    Stack(u64),
    /// The event itself shows it is the current task's doing (a move only tcp_close() and
    /// tcp_shutdown() make).
    Task,
    Unknown,
}

/// The syscall a task is in, from its saved user registers.
struct SavedCall {
    nr: u64,
    arg0: u64,
    /// Where the registers are (`saved_registers`), for an argument read only when needed.
    regs: u64,
    /// Whether the program runs in the task's own context (None: not known).
    own_context: Option<bool>,
}

impl SavedCall {
    /// The kind of teardown call and its descriptor, if the syscall is one: close(2) and
    /// shutdown(2) name theirs; close_range(2) names one when it closes one (its first and
    /// last equal: what libraries call for a single descriptor), else -1.
    #[inline(always)]
    fn teardown(&self) -> Option<(u8, i32)> {
        let layout: RegsLayout = setting!(regs);
        if self.nr == u64::from(layout.nr_close) {
            Some((syscall::CLOSE, self.arg0 as i32))
        } else if self.nr == u64::from(layout.nr_shutdown) {
            Some((syscall::SHUTDOWN, self.arg0 as i32))
        } else if self.nr == u64::from(layout.nr_close_range) {
            let last = kernel_read::<u64>(self.regs, layout.arg1);
            let single = last.is_some_and(|last| last as u32 == self.arg0 as u32);
            Some((syscall::CLOSE, if single { self.arg0 as i32 } else { -1 }))
        } else {
            None
        }
    }

    /// Whether the syscall is close(2), shutdown(2) or close_range(2).
    #[inline(always)]
    fn is_teardown(&self) -> bool {
        let layout: RegsLayout = setting!(regs);
        [layout.nr_close, layout.nr_shutdown, layout.nr_close_range]
            .iter()
            .any(|&nr| self.nr == u64::from(nr))
    }
}

/// The syscall the current task is in, from its saved user registers, and whether the
/// program runs in the task's own context. An address on the task's own stack lies just below
/// those registers; in a softirq the program runs on the CPU's interrupt stack.
#[inline(always)]
fn syscall_of_current_task(context: Context) -> Option<SavedCall> {
    let layout: RegsLayout = setting!(regs);
    let regs = saved_registers();
    let own_context = own_context(context, regs);
    let saved = Span::<16>::read(regs, &[layout.syscall_nr, layout.arg0]);
    Some(SavedCall {
        nr: saved.get(layout.syscall_nr)?,
        arg0: saved.get(layout.arg0)?,
        regs,
        own_context,
    })
}

/// Where the current task's user registers are saved, at the top of its kernel stack.
#[inline(always)]
fn saved_registers() -> u64 {
    // SAFETY: plain helper calls on the current task, valid while the program runs.
    unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 }
}

/// Whether the program runs in the task's own context (None: not known). An address on the
/// task's own stack lies just below its saved registers.
#[inline(always)]
fn own_context(context: Context, regs: u64) -> Option<bool> {
    match context {
        Context::Stack(at) => Some(at < regs && regs - at <= TASK_STACK_SPAN),
        Context::Task => Some(true),
        Context::Unknown => None,
    }
}

/// Whether the program is known to run in the current task's own context, not in a softirq
/// that interrupted it. Told only where calls are named from the registers (5.15+); false
/// where it cannot be told.
#[inline(always)]
pub fn runs_in_task(context: Context) -> bool {
    calls_from_registers() && own_context(context, saved_registers()) == Some(true)
}

/// Whether the current task is exiting (PF_EXITING); true where the BTF did not say, so that
/// a process exit's entry is trusted as before.
#[inline(always)]
fn exiting() -> bool {
    const PF_EXITING: u32 = 0x0000_0004;
    setting!(regs.task_flags) == NONE || task_flags().is_some_and(|f| f & PF_EXITING != 0)
}

/// Whether the current task is a kernel thread (PF_KTHREAD); false where the BTF did not say.
#[inline(always)]
pub fn in_kernel_thread() -> bool {
    const PF_KTHREAD: u32 = 0x0020_0000;
    task_flags().is_some_and(|f| f & PF_KTHREAD != 0)
}

/// The current task's `flags` (PF_*), where the BTF gave their offset.
#[inline(always)]
fn task_flags() -> Option<u32> {
    let offset = setting!(regs.task_flags);
    if offset == NONE {
        return None;
    }
    // SAFETY: plain helper call.
    kernel_read::<u32>(unsafe { bpf_get_current_task() }, offset)
}

/// `call_acting_on` without syscall tracepoints. In a close, shutdown or close_range, in the
/// task's own context, the socket moving is the one the call acts on (the peer's side of a
/// loopback connection moves in a softirq): its first move there starts the call, kept in the
/// task's entry in CALLS for the call's later events on that socket (those may come from a
/// softirq, or from a program that cannot tell its context). Outside those calls, the entry
/// that process exit or the tcp_close kprobe made still names its sockets.
#[inline(always)]
fn call_from_registers(sk: u64, info: Option<&SockInfo>, context: Context) -> Option<PendingCall> {
    let saved = syscall_of_current_task(context)?;
    let own_context = saved.own_context;
    let tid = current().tid;
    let entry = CALLS.get_ptr_mut(tid);
    // SAFETY: this task's own entry, copied out.
    let recorded = entry
        .map(|e| unsafe { *e })
        .filter(|call| call.started_ns != 0);
    let released_by_other = |call: &PendingCall| {
        info.is_some_and(|i| i.released == RELEASED && i.closed_by_call != call.started_ns)
    };
    // An exiting task closes its files whatever syscall it was in when it was killed; an exit
    // entry that an earlier thread of the same tid left (the LRU keeps it) names nothing.
    if let Some(call) = recorded.filter(|call| call.kind == syscall::EXIT)
        && exiting()
    {
        return (own_context != Some(false) && !released_by_other(&call)).then_some(call);
    }
    let Some((kind, fd)) = saved.teardown() else {
        // A close the tcp_close kprobe saw outside any of these calls.
        let call = recorded.filter(|call| call.kind == syscall::NONE && call.claimed_sk == sk)?;
        return (own_context != Some(false) && !released_by_other(&call)).then_some(call);
    };
    if let Some(call) = recorded {
        let same_call = call.kind == kind && call.fd == fd && call.claimed_sk == sk;
        if same_call {
            return (!released_by_other(&call)).then_some(call);
        }
    }
    if own_context != Some(true) {
        return None;
    }
    let call = PendingCall::starting_now(kind, fd, sk);
    if released_by_other(&call) {
        return None;
    }
    record(tid, entry, &call);
    Some(call)
}

/// Stores a task's call, in place when the task has an entry (`entry`, looked up by the
/// caller; see `overwrite`).
#[inline(always)]
fn record(tid: u32, entry: Option<*mut PendingCall>, call: &PendingCall) {
    match entry {
        // SAFETY: this task's own entry: only this task (and softirqs interrupting it, on this
        // CPU) touch it.
        Some(entry) => unsafe { overwrite(entry, call) },
        None => {
            let _ = CALLS.insert(tid, *call, 0); // LRU: insertion evicts, never fails for space.
        }
    }
}

#[tracepoint]
pub fn enter_close(ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let fd = field::<u64>(&ctx, setting!(close_fd)).unwrap_or(u64::MAX) as i32;
    begin(syscall::CLOSE, fd);
    0
}

#[tracepoint]
pub fn enter_shutdown(ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    let fd = field::<u64>(&ctx, setting!(shutdown_fd)).unwrap_or(u64::MAX) as i32;
    begin(syscall::SHUTDOWN, fd);
    0
}

/// sys_exit_close and sys_exit_shutdown.
#[tracepoint]
pub fn exit_call(_ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    end();
    0
}

/// sched:sched_process_exit fires in the exiting thread before its files are closed.
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    if noop() {
        return 0;
    }
    begin(syscall::EXIT, -1);
    0
}

/// kprobe tcp_close(struct sock *sk, long timeout): names the socket exactly.
#[kprobe]
pub fn tcp_close(ctx: ProbeContext) -> u32 {
    if noop() {
        return 0;
    }
    let Some(sk) = ctx.arg::<u64>(0) else {
        return 0;
    };
    if calls_from_registers() {
        close_outside_calls(sk);
        return 0;
    }
    let cur = current();
    let entry = CALLS.get_ptr_mut(cur.tid);
    // SAFETY: this task's own entry.
    match entry.filter(|call| is_current(unsafe { &**call })) {
        // SAFETY: as above.
        Some(call) => unsafe { (*call).claimed_sk = sk },
        // close_range(), io_uring, or a dup'd fd's last close: a close with no known call.
        None if is_traced_process(cur.pid) => {
            record(
                cur.tid,
                entry,
                &PendingCall::starting_now(syscall::NONE, -1, sk),
            );
        }
        None => {}
    }
    0
}

/// Whether the current task is in close(2), shutdown(2) or close_range(2), or exiting (as
/// far as its registers tell: false where calls are not named from them).
#[inline(always)]
pub fn in_a_teardown_call(context: Context) -> bool {
    calls_from_registers()
        && (exiting_with_its_call()
            || syscall_of_current_task(context).is_some_and(|call| call.is_teardown()))
}

/// Whether the current task is exiting with an exit recorded in CALLS.
#[inline(always)]
fn exiting_with_its_call() -> bool {
    records_an_exit(CALLS.get_ptr_mut(current().tid)) && exiting()
}

/// Whether a task's entry in CALLS (`entry`) is an exit.
#[inline(always)]
fn records_an_exit(entry: Option<*mut PendingCall>) -> bool {
    // SAFETY: the task's own entry, read at once.
    entry.is_some_and(|call| unsafe { (*call).kind == syscall::EXIT && (*call).started_ns != 0 })
}

/// Without syscall tracepoints: a tcp_close() outside close, shutdown and close_range (io_uring,
/// dup2() over the descriptor, exec closing close-on-exec files) or process exit gets a call
/// of no known kind for this socket, as with them.
#[inline(always)]
fn close_outside_calls(sk: u64) {
    // tcp_close() runs in the closing task (or a kernel worker, whose registers name no call).
    if syscall_of_current_task(Context::Task).is_some_and(|call| call.is_teardown()) {
        return;
    }
    let tid = current().tid;
    let entry = CALLS.get_ptr_mut(tid);
    if !records_an_exit(entry) {
        let call = PendingCall::starting_now(syscall::NONE, -1, sk);
        record(tid, entry, &call);
    }
}
