//! The tracer's kernel programs.
//!
//! - `state`: sock:inet_sock_set_state, the backbone: every TCP state change, classified and
//!   attributed to the socket's owner.
//! - `resets`: tcp:tcp_send_reset, tcp:tcp_receive_reset, and the kprobe on
//!   tcp_send_active_reset for kernels whose tracepoint misses active resets.
//! - `calls`: close/shutdown calls (from the closing task's saved registers, or the syscall
//!   tracepoints where those cannot be read) and process exit, which tell a close by the owner
//!   from a transition that merely happened while its task was on the CPU; with `--pid`, the
//!   forks of traced processes, whose children's calls are recorded too.
//! - `owners`: the per-socket owner table, filled in process context and read everywhere else.
//! - `held`: an abortive close waits for the RST it sends, to go out as one event with it.
//! - `timewait`: the end of a time-wait socket whose FIN_WAIT2 timed out (a timer, no
//!   tracepoint of its own).
//! - `emit`: the ring buffer, the filters and the loss counters.
//! - `capture_filter`: with `--pid`, the capture socket's filter: only traced connections'
//!   FIN and RST segments are copied to the daemon.
#![no_std]
#![no_main]

mod calls;
mod capture_filter;
mod emit;
mod held;
mod owners;
mod resets;
mod state;
mod timewait;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
