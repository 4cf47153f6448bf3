//! Runs of the tracer's programs that the kernel skipped. A tracing program does not run while
//! another BPF program is running on the same CPU (a softirq that changes a socket's state
//! while a program was interrupted, say): the kernel counts each skipped run in the program's
//! `recursion_misses` (5.12+) and the event is gone. Summed here, reported as a loss.
//!
//! Also each program's runs and run time, which the kernel counts while
//! kernel.bpf_stats_enabled is 1: the benchmark's account of where the kernel-side time goes.

use std::{
    cell::Cell,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use aya::Ebpf;
use aya_obj::generated::bpf_prog_info;

/// How often the counts are asked of the kernel: one syscall per program each time, and the
/// daemon's loop turns every 20 ms.
const REFRESH: Duration = Duration::from_secs(1);

/// Duplicated descriptors of the loaded programs (they outlive the `Ebpf` handle's borrow).
pub struct SkippedRuns {
    programs: Vec<OwnedFd>,
    /// The last total, and when it was read.
    last: Cell<Option<(Instant, u64)>>,
}

impl SkippedRuns {
    pub fn new(ebpf: &Ebpf) -> Self {
        let programs = ebpf
            .programs()
            .filter_map(|(_, program)| program.fd().ok())
            .filter_map(|fd| fd.as_fd().try_clone_to_owned().ok())
            .collect();
        Self {
            programs,
            last: Cell::new(None),
        }
    }

    /// Skipped runs of all programs so far (0 where the kernel does not count them), read again
    /// at most once per `REFRESH` unless `fresh`.
    pub fn total(&self, fresh: bool) -> u64 {
        if let Some((at, total)) = self.last.get()
            && !fresh
            && at.elapsed() < REFRESH
        {
            return total;
        }
        let total = self
            .programs
            .iter()
            .filter_map(|fd| recursion_misses(fd.as_fd()))
            .sum();
        self.last.set(Some((Instant::now(), total)));
        total
    }
}

/// The `info` member of `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// Each loaded program's name, runs and total run time in ns so far (both 0 unless the kernel
/// was counting), as `[{"program", "runs", "run_ns"}]`.
pub fn program_costs(ebpf: &Ebpf) -> serde_json::Value {
    let programs: Vec<serde_json::Value> = ebpf
        .programs()
        .filter_map(|(name, program)| {
            let info = prog_info(program.fd().ok()?.as_fd())?;
            Some(serde_json::json!({
                "program": name,
                "runs": info.run_cnt,
                "run_ns": info.run_time_ns,
            }))
        })
        .collect();
    serde_json::Value::Array(programs)
}

fn recursion_misses(fd: BorrowedFd<'_>) -> Option<u64> {
    prog_info(fd).map(|info| info.recursion_misses)
}

fn prog_info(fd: BorrowedFd<'_>) -> Option<bpf_prog_info> {
    // SAFETY: bpf_prog_info is plain data; all-zero is valid.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<bpf_prog_info>() as u32,
        info: &raw mut info as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which lives until the
    // call returns; `attr` is the prefix of bpf_attr this command reads.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            size_of::<InfoByFd>(),
        )
    };
    (ret == 0).then_some(info)
}
