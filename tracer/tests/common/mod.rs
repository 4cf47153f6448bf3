//! Shared helpers for the root-only integration tests: run the built tracer and read its JSON
//! lines with deadlines, make network namespaces joined by veth pairs, open TCP connections in
//! the classic teardown shapes, and run tcpdump or a scripted peer beside them.
// Each test binary includes this module and uses its own subset of it.
#![allow(dead_code, unused_imports)]

mod metrics;
mod netns;
mod peer;
mod script;
mod tcp;
mod tcpdump;
mod traced_server;
mod tracer;

use std::process::Command;

use serde_json::Value;

pub use metrics::{metric, scrape};
pub use netns::{NetnsPair, NetnsPeer, in_netns};
pub use peer::Peer;
pub use script::Script;
pub use tcp::{
    free_port, leave_unread, listener, read_to_eof, reserved_port, reset_burst, set_linger_zero,
    shutdown_write, tcp_pair, tcp_pair_on, wait_readable,
};
pub use tcpdump::{Segment, Tcpdump, parse_segment};
pub use traced_server::TracedServer;
pub use tracer::{Stopped, Tracer};

/// Whether `v` is an `event` line of the socket (lport, rport).
pub fn is(v: &Value, event: &str, lport: u16, rport: u16) -> bool {
    v["event"] == event && v["lport"] == lport && v["rport"] == rport
}

/// Whether this test may run: as root, yes; otherwise it skips with a message, except under
/// CI (CI=true), where a skipped kernel test would hide a broken setup.
pub fn require_root() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "this test needs root (CAP_BPF, CAP_PERFMON, CAP_NET_RAW, CAP_NET_ADMIN, \
             CAP_SYS_ADMIN: BPF programs, packet capture, network namespaces) and CI must run it"
        );
    }
    eprintln!("SKIPPED: needs root (run `sudo -E env PATH=$PATH cargo xtask test`)");
    false
}

/// Runs a command, panicking with its output when it fails; returns its stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} runs: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the running kernel is Linux `major.minor` or later.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    version >= vec![major, minor]
}

/// Raises this process's open-file limit to `needed`: a test holding thousands of connections
/// (two descriptors each when both ends are here) needs more than the default soft limit of
/// 1024. As root the hard limit is raised too when it is lower. Returns the limit now.
pub fn raise_fd_limit(needed: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let needed = needed as libc::rlim_t;
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < needed {
            lim.rlim_max = lim.rlim_max.max(needed);
            lim.rlim_cur = needed;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                // Not root: as far as the hard limit allows.
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                lim.rlim_cur = needed.min(lim.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur as usize
}
