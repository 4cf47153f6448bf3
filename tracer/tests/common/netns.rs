//! Network namespaces joined by veth pairs, made by the test and removed on drop, and a way to
//! run code inside one. Real interfaces and real wire packets that never leave this machine.
//!
//! Addresses come from test-only ranges (10.213.X.0/24, fd00:213:X::/64) that exist only on
//! these veth pairs. Names carry the test process id and a counter, so that tests running in
//! parallel, and a run that crashed before cleaning up, do not collide.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use super::sh;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The names and addresses of one namespace setup: unique per process and call.
struct Names {
    /// Unique within this machine while the process runs: `{pid:x}x{counter}`.
    tag: String,
    /// The third octet of the IPv4 subnet (and the third group of the IPv6 one).
    subnet: u32,
}

impl Names {
    fn next() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        Names {
            // Interface names have at most 15 bytes: "trX" + 6 hex digits + "x" + counter.
            tag: format!("{pid:x}x{n}"),
            // Different for every setup alive at once in this process (tests run in parallel
            // threads); setups of other processes live in other namespaces or have ended.
            subnet: 1 + (pid.wrapping_mul(16).wrapping_add(n)) % 250,
        }
    }

    fn v4(&self, host: u8) -> String {
        format!("10.213.{}.{host}", self.subnet)
    }

    fn v6(&self, host: u8) -> String {
        format!("fd00:213:{:x}::{host}", self.subnet)
    }
}

/// Runs `ip ARGS`, inside namespace `ns` when given (`ip -n NS`).
fn ip(ns: Option<&str>, args: &[&str]) {
    let mut full: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        full.extend(["-n", ns]);
    }
    full.extend_from_slice(args);
    sh("ip", &full);
}

/// Gives `ifname` (in `ns`, or the root namespace) its IPv4 /24 and IPv6 /64 addresses and
/// brings it up. `nodad`: the IPv6 address is usable at once, without duplicate detection.
fn configure(ns: Option<&str>, ifname: &str, v4: &str, v6: &str) {
    ip(ns, &["addr", "add", &format!("{v4}/24"), "dev", ifname]);
    ip(
        ns,
        &[
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            ifname,
            "nodad",
        ],
    );
    ip(ns, &["link", "set", ifname, "up"]);
}

/// Makes namespace `ns` with its loopback up, replacing a leftover of the same name.
fn add_namespace(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
    sh("ip", &["netns", "add", ns]);
    ip(Some(ns), &["link", "set", "lo", "up"]);
}

/// Removes a namespace; the veth ends inside it go with it, and so do their peers.
fn del_namespace(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Runs `f` on a fresh thread that has entered namespace `ns` and returns its result.
///
/// Only that thread changes namespace. A socket keeps the namespace it was created in, so a
/// listener or a connection made in `f` can be returned and used from any thread afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns with a namespace fd we hold; it affects this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread")
}

/// A network namespace joined to the root namespace by a veth pair. The tracer runs in the
/// root namespace and can capture only there, on `root_if`; a socket made in the namespace
/// (see `in_ns`, or `Peer::spawn` with `Some(&ns)`) is the far end of the wire.
pub struct NetnsPeer {
    pub ns: String,
    pub root_if: String,
    pub ns_if: String,
    pub root_v4: String,
    pub ns_v4: String,
    pub root_v6: String,
    pub ns_v6: String,
}

impl NetnsPeer {
    pub fn new() -> Self {
        let names = Names::next();
        let peer = NetnsPeer {
            ns: format!("trc-{}", names.tag),
            root_if: format!("trr{}", names.tag),
            ns_if: format!("trn{}", names.tag),
            root_v4: names.v4(1),
            ns_v4: names.v4(2),
            root_v6: names.v6(1),
            ns_v6: names.v6(2),
        };
        add_namespace(&peer.ns);
        ip(
            None,
            &[
                "link",
                "add",
                &peer.root_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer.ns_if,
                "netns",
                &peer.ns,
            ],
        );
        configure(None, &peer.root_if, &peer.root_v4, &peer.root_v6);
        configure(Some(&peer.ns), &peer.ns_if, &peer.ns_v4, &peer.ns_v6);
        peer
    }

    /// Runs `f` inside the namespace (see `in_netns`).
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.ns, f)
    }
}

impl Drop for NetnsPeer {
    fn drop(&mut self) {
        del_namespace(&self.ns);
        // Normally gone with its peer; a half-made setup may have left it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_if])
            .output();
    }
}

/// Two network namespaces, `a` and `b`, joined by a veth pair, with nothing in the root
/// namespace: two hosts whose packets a tracer in the root namespace cannot capture, while
/// their sockets' kernel events still reach it (tracepoints see every namespace).
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub a_if: String,
    pub b_if: String,
    pub a_v4: String,
    pub b_v4: String,
    pub a_v6: String,
    pub b_v6: String,
}

impl NetnsPair {
    pub fn new() -> Self {
        let names = Names::next();
        let pair = NetnsPair {
            a: format!("trca-{}", names.tag),
            b: format!("trcb-{}", names.tag),
            a_if: format!("tra{}", names.tag),
            b_if: format!("trb{}", names.tag),
            a_v4: names.v4(1),
            b_v4: names.v4(2),
            a_v6: names.v6(1),
            b_v6: names.v6(2),
        };
        add_namespace(&pair.a);
        add_namespace(&pair.b);
        ip(
            Some(&pair.a),
            &[
                "link", "add", &pair.a_if, "type", "veth", "peer", "name", &pair.b_if, "netns",
                &pair.b,
            ],
        );
        configure(Some(&pair.a), &pair.a_if, &pair.a_v4, &pair.a_v6);
        configure(Some(&pair.b), &pair.b_if, &pair.b_v4, &pair.b_v6);
        pair
    }

    /// Runs `f` inside namespace `a`.
    pub fn in_a<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.a, f)
    }

    /// Runs `f` inside namespace `b`.
    pub fn in_b<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.b, f)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        del_namespace(&self.a);
        del_namespace(&self.b);
    }
}
