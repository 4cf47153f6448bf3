//! Checks each prerequisite cheaply and installs what is missing, saying what and why. When
//! everything is present this costs well under two seconds; when it cannot install (not root,
//! no sudo, no apt-get) it stops with the exact commands to run.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::cmd::{self, is_root, which};

/// Debian packages, each with why it is needed.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links the eBPF object with LLVM 22, the LLVM of rustc 1.95",
    ),
    (
        "libpcap-dev",
        "the pcap crate captures FIN/RST packets through libpcap",
    ),
];
const TEST_PACKAGES: &[(&str, &str)] = &[
    (
        "tcpdump",
        "tests cross-check the packets the tracer reports",
    ),
    (
        "bpftrace",
        "tests cross-check kernel events with an independent tracer",
    ),
    (
        "libbpf-tools",
        "tcpstates, an independent witness of TCP state changes",
    ),
    (
        "iproute2",
        "tests build network namespaces joined by veth pairs",
    ),
    (
        "tshark",
        "tests read the pcapng the tracer writes back, with its packet comments",
    ),
    (
        "python3",
        "tests' peers (tests/peer.py) and their forking and inheriting servers are python scripts",
    ),
    (
        "nftables",
        "tests drop a FIN after the capture has seen it, so that the kernel retransmits it",
    ),
    (
        "ethtool",
        "tests receive a veth's packets in a kernel thread (threaded NAPI needs GRO on)",
    ),
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run(test_tools: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut packages: Vec<(&str, &str)> = BUILD_PACKAGES.to_vec();
    if test_tools {
        packages.extend_from_slice(TEST_PACKAGES);
    }
    install_packages(&packages)?;
    install_rust_src()?;
    install_bpf_linker()?;
    eprintln!(
        "xtask: bootstrap ok ({:.2} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Missing packages, from one dpkg-query call.
fn missing_packages<'a>(packages: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let names: Vec<&str> = packages.iter().map(|(n, _)| *n).collect();
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(&names)
        .output();
    let installed: Vec<String> = match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.ends_with("install ok installed"))
            .filter_map(|l| {
                l.split_whitespace()
                    .next()
                    .map(|n| n.split(':').next().unwrap_or(n).to_string())
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    packages
        .iter()
        .filter(|(n, _)| !installed.iter().any(|i| i == n))
        .copied()
        .collect()
}

/// Installs the Debian packages of `packages` that are missing (name, why it is needed).
pub fn install_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing = missing_packages(packages);
    if missing.is_empty() {
        return Ok(());
    }
    for (name, why) in &missing {
        eprintln!("xtask: missing {name}: {why}");
    }
    let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
    let by_hand = format!(
        "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
        names.join(" ")
    );
    if which("apt-get").is_none() {
        bail!(
            "apt-get is not available: install the Debian packages {} (or your system's \
             equivalents) by hand, then run this again",
            names.join(" ")
        );
    }
    let use_sudo = match privilege() {
        Ok(use_sudo) => use_sudo,
        Err(why) => bail!("{why}; install the missing packages yourself:\n  {by_hand}"),
    };
    if use_sudo {
        eprintln!("xtask: not root: running apt-get through sudo");
    }
    // One update, only now that something is missing: the lists may be absent or stale.
    cmd::status(&mut apt(use_sudo, &["update", "-qq"]))?;
    let mut install = apt(
        use_sudo,
        &["install", "-y", "-qq", "--no-install-recommends"],
    );
    install.args(&names);
    cmd::status(&mut install)
}

/// `apt-get ARGS`, non-interactive, through `sudo -n` when asked. The variable goes on the
/// command line under sudo, which would drop it from the environment.
fn apt(use_sudo: bool, args: &[&str]) -> Command {
    let mut c = if use_sudo {
        let mut c = Command::new("sudo");
        c.args(["-n", "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        c
    } else {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    c.args(args).stdin(std::process::Stdio::null());
    c
}

/// Whether apt-get needs sudo: false as root, true when sudo works without a password (it
/// cannot ask: CI has no terminal), an error otherwise.
fn privilege() -> Result<bool, String> {
    if is_root() {
        return Ok(false);
    }
    let sudo_ok = Command::new("sudo")
        .args(["-n", "true"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if sudo_ok {
        Ok(true)
    } else {
        Err(
            "installing needs root (apt-get), and this user is not root and has no \
             passwordless sudo"
                .into(),
        )
    }
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly (the nightly toolchain is needed for the eBPF crate)")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: the eBPF crate is built with nightly and -Z build-std; \
             this machine's preinstalled nightly is expected (rustup toolchain list)"
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn install_rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing rust-src for nightly: the eBPF crate builds core with -Z build-std"
    );
    cmd::status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    // PATH includes ~/.cargo/bin (see `cmd::extend_path`), where `cargo install` puts it.
    if let Some(path) = which("bpf-linker") {
        if linker_version_ok(&path) {
            return Ok(());
        }
        eprintln!(
            "xtask: {} is not bpf-linker {BPF_LINKER_VERSION}: reinstalling",
            path.display()
        );
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} with the llvm-22 feature: it links \
         the eBPF object (LLVM_PREFIX={LLVM_PREFIX}, the Debian llvm-22-dev install)"
    );
    if !Path::new(LLVM_PREFIX).join("lib").is_dir() {
        bail!(
            "{LLVM_PREFIX} is missing: install llvm-22-dev first (apt-get install -y llvm-22-dev)"
        );
    }
    let install = |locked: bool| {
        let mut c = Command::new("cargo");
        c.args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX);
        if locked {
            c.arg("--locked");
        }
        cmd::status(&mut c)
    };
    install(true).or_else(|e| {
        eprintln!("xtask: `cargo install --locked` failed ({e:#}); retrying without --locked");
        install(false)
    })
}

fn linker_version_ok(path: &Path) -> bool {
    Command::new(path)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}
