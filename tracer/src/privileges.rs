//! Privileges: say plainly which capability is missing before trying, and give every one of
//! them up (with no_new_privs) once the programs are attached and the capture is open.
//! Capabilities are per thread on Linux, so each of the tracer's threads drops its own.

use anyhow::bail;

use crate::probes::PRIVILEGE_HINT;

/// Capability numbers from linux/capability.h.
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set of this thread, from /proc/thread-self/status.
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    parse_cap_eff(&status)
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Names of the capabilities tracing needs and this process lacks.
pub fn missing_for_tracing(effective: u64, capture: bool) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON on kernels before 5.8.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if capture && !has(CAP_NET_RAW) {
        missing.push("CAP_NET_RAW");
    }
    missing
}

/// Fails with a one-line message naming the missing capabilities.
pub fn require_for_tracing(capture: bool) -> anyhow::Result<()> {
    let Some(eff) = effective() else {
        return Ok(()); // cannot tell; let the kernel answer
    };
    let missing = missing_for_tracing(eff, capture);
    if !missing.is_empty() {
        bail!(
            "missing privilege: {} (tracing loads BPF programs{}); {PRIVILEGE_HINT}",
            missing.join(", "),
            if capture { " and captures packets" } else { "" }
        );
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Gives up every capability of the calling thread, and sets no_new_privs so that nothing it
/// runs can regain any. Safe to call more than once.
pub fn drop_all() -> std::io::Result<()> {
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a v3 header and two zeroed data words, as the ABI requires.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\ttracer\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn names_what_is_missing() {
        assert_eq!(
            missing_for_tracing(0, true),
            ["CAP_BPF", "CAP_PERFMON", "CAP_NET_RAW"]
        );
        assert_eq!(missing_for_tracing(0, false), ["CAP_BPF", "CAP_PERFMON"]);
        let root = u64::MAX;
        assert!(missing_for_tracing(root, true).is_empty());
        let bpf_only = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert_eq!(missing_for_tracing(bpf_only, true), ["CAP_NET_RAW"]);
    }

    #[test]
    fn dropping_in_a_thread_empties_its_effective_set() {
        let eff = std::thread::spawn(|| {
            drop_all().unwrap();
            effective()
        })
        .join()
        .unwrap();
        assert_eq!(eff, Some(0));
    }
}
