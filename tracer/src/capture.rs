//! Packet capture: FIN and RST segments from libpcap, headers only, on a thread of their own.
//!
//! The capture filter runs in the kernel and keeps only TCP segments with FIN or RST, so
//! ordinary traffic costs nothing here. The snapshot length holds the headers and not more
//! than the first 16 bytes of TCP (ports, sequence numbers, flags): payload is never parsed,
//! kept or written.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use pcap::{Active, Capture, Device, Linktype, Precision};
use tokio::sync::mpsc;

use crate::clock::SharedClock;

/// TCP flag bits as in the TCP header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// Which way the packet went, as the capture saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Sent by this host (PACKET_OUTGOING).
    Out,
    /// Received by this host.
    In,
}

impl Dir {
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Out => "out",
            Dir::In => "in",
        }
    }
}

/// One captured FIN or RST segment: only header fields, never payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WirePacket {
    /// CLOCK_MONOTONIC nanoseconds, converted from the capture's wall-clock stamp.
    pub mono_ns: u64,
    /// Wall clock (Unix epoch) nanoseconds as libpcap stamped it.
    pub wall_ns: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// TCP flags byte (see `tcp_flags`).
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// The sequence number after its data (`seq` plus the payload's length): a FIN's own.
    /// A FIN sent again with more or less of the data before it (a tail-loss probe resends
    /// only the last segment's worth) has another `seq` and the same `data_end`.
    pub data_end: u32,
    pub iface: Arc<str>,
    pub dir: Dir,
    /// The captured link, IP and TCP headers (never payload), for `-w FILE.pcapng`.
    pub headers: Arc<[u8]>,
    /// This capture shows the packet once: it listens on one interface, or the packet is
    /// loopback's (whose leaving copy is dropped, on `any` too). Otherwise another copy may
    /// follow (the same packet on a bridge and its port, on a veth pair's two ends).
    pub only_copy: bool,
    /// Captured on a loopback (this namespace's or another's): sent and received by this
    /// host, and `dir` only says which of the two copies the capture kept.
    pub on_loopback: bool,
}

/// Link-layer types this module parses.
const DLT_EN10MB: i32 = 1;
const DLT_LINUX_SLL: i32 = 113;
const DLT_LINUX_SLL2: i32 = 276;
const PACKET_OUTGOING: u8 = 4;
/// Link header (SLL2: 20) + IPv4 with options (60) + the first 16 bytes of TCP. IPv6 (40)
/// fits too. Nothing past the TCP flags is needed.
const SNAPLEN: i32 = 96;
/// Longest a captured packet waits in the kernel before the capture thread sees it.
const BLOCK_TIMEOUT_MS: i32 = 10;
/// Packets waiting for the main loop; beyond, they are counted and dropped, never blocking.
const QUEUE: usize = 16_384;

pub struct CaptureConfig {
    pub iface: String,
    pub ports: Vec<u16>,
    /// Keep each packet's headers (for `-w FILE.pcapng`); without it none are copied.
    pub keep_headers: bool,
    /// Deliver nothing until `start_delivering` (with `--pid`, whose own kernel filter replaces
    /// the plain one after the programs are loaded).
    pub held: bool,
    /// Other network namespaces whose loopback is captured too (a traced process's container:
    /// its loopback traffic never crosses an interface of this namespace).
    pub namespaces: Vec<Namespace>,
}

/// Another network namespace, reached through a process in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub pid: u32,
    /// As `/proc/PID/ns/net` names it, and `lsns` and `ip netns identify` show it:
    /// `net:[4026532845]`.
    pub id: String,
}

impl Namespace {
    /// The name its loopback's packets carry in `iface`: `lo` alone would read as this
    /// namespace's.
    pub fn loopback_name(&self) -> String {
        format!("lo@{}", self.id)
    }
}

/// Counters shared with the capture thread.
#[derive(Default, Debug)]
pub struct CaptureStats {
    /// Packets dropped because the main loop's queue was full.
    pub channel_dropped: AtomicU64,
    /// Packets libpcap or the interface dropped (pcap_stats: ps_drop + ps_ifdrop).
    pub pcap_dropped: AtomicU64,
    pub captured: AtomicU64,
    /// Packets stamped before this wall-clock time (ns; 0: none; u64::MAX: all, while held)
    /// are skipped, uncounted: they passed the filter the capture was opened with, before
    /// `--pid`'s own replaced it.
    pub skip_before_wall_ns: AtomicU64,
}

/// A running capture.
pub struct CaptureHandle {
    pub rx: mpsc::Receiver<WirePacket>,
    pub stats: Arc<CaptureStats>,
    pub iface: String,
    pub clock: SharedClock,
    /// The link-layer type of `WirePacket::headers`, `iface`'s.
    pub linktype: i32,
    /// The link types of the other interfaces captured (another namespace's loopback has no
    /// cooked headers to offer: plain Ethernet).
    pub other_linktypes: Vec<(Arc<str>, i32)>,
    /// The capture sockets, `iface`'s first (owned by the capture threads; valid while this
    /// handle lives).
    pub fds: Vec<std::os::fd::RawFd>,
    /// The namespaces whose loopback is captured too, and those that could not be (why).
    pub namespaces: Vec<Namespace>,
    pub unreachable: Vec<(Namespace, String)>,
    guard: CaptureGuard,
}

impl CaptureHandle {
    /// Ends a `held` capture's start-up, once `--pid`'s kernel filter is attached (or refused):
    /// what was captured until now passed the plain FIN/RST filter the capture was opened with
    /// (every other process's teardowns during start-up) and is skipped. Packets are stamped
    /// after the filter ran, so those stamped from now on passed the new one.
    pub fn start_delivering(&self) {
        self.stats
            .skip_before_wall_ns
            .store(crate::clock::now_wall_ns(), Ordering::Relaxed);
    }
}

/// What the main loop keeps of a capture.
pub struct CaptureParts {
    pub rx: mpsc::Receiver<WirePacket>,
    pub stats: Arc<CaptureStats>,
    pub clock: SharedClock,
    pub guard: CaptureGuard,
}

/// Stops and joins the capture threads when dropped.
pub struct CaptureGuard {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl CaptureHandle {
    pub fn into_parts(self) -> CaptureParts {
        CaptureParts {
            rx: self.rx,
            stats: self.stats,
            clock: self.clock,
            guard: self.guard,
        }
    }
}

/// Names of the interfaces libpcap can capture on.
/// The network interfaces a capture can open here: libpcap's devices that are network
/// interfaces of this namespace (libpcap also lists D-Bus, netfilter queues and USB or
/// Bluetooth monitors, which carry no TCP), `any` first.
pub fn interface_names() -> Vec<String> {
    let devices: Vec<String> = Device::list()
        .map(|devices| devices.into_iter().map(|d| d.name).collect())
        .unwrap_or_default();
    let is_network_interface =
        |name: &str| std::path::Path::new("/sys/class/net").join(name).exists();
    devices
        .into_iter()
        .filter(|name| name == "any" || is_network_interface(name))
        .collect()
}

/// The kernel filter: TCP with FIN or RST, IPv4 and IPv6 (IPv6 without extension headers:
/// the TCP flags byte is then at offset 40 + 13), narrowed to the ports when given.
pub fn filter_expression(ports: &[u16]) -> String {
    let base =
        "((tcp[tcpflags] & (tcp-fin|tcp-rst) != 0) or (ip6 and tcp and (ip6[53] & 0x05 != 0)))";
    if ports.is_empty() {
        return base.to_string();
    }
    let ports: Vec<String> = ports.iter().map(|p| format!("port {p}")).collect();
    format!("{base} and ({})", ports.join(" or "))
}

/// Opens the capture now (so a bad interface or a missing privilege fails before `ready`) and
/// reads it on a thread; with `namespaces`, their loopbacks too, each on a thread of its own.
pub fn open(cfg: &CaptureConfig, clock: SharedClock) -> anyhow::Result<CaptureHandle> {
    let cap = open_device(&cfg.iface, &cfg.ports)?;
    let linktype = cap.get_datalink().0;
    let (tx, rx) = mpsc::channel(QUEUE);
    let stats = Arc::new(CaptureStats::default());
    if cfg.held {
        stats.skip_before_wall_ns.store(u64::MAX, Ordering::Relaxed);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = |cap: Capture<Active>, iface: &str, loopback: bool| {
        let linktype = cap.get_datalink().0;
        Reader {
            linktype,
            default_iface: Arc::from(iface),
            names: HashMap::new(),
            single_interface: iface != "any",
            // An Ethernet frame does not say which way it went: the interface's own address
            // does (a loopback's frames carry no address).
            own_mac: (linktype == DLT_EN10MB && !loopback)
                .then(|| interface_mac(iface))
                .flatten(),
            loopback,
            loopback_ifindex: loopback_ifindex(),
            keep_headers: cfg.keep_headers,
            no_headers: Arc::from(&[][..]),
            clock: clock.clone(),
            tx: tx.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
            cap,
        }
    };
    let mut readers = vec![reader(cap, &cfg.iface, is_loopback(&cfg.iface))];
    let (mut namespaces, mut unreachable) = (Vec::new(), Vec::new());
    for ns in &cfg.namespaces {
        match open_loopback_in(ns, &cfg.ports) {
            Ok(cap) => {
                readers.push(reader(cap, &ns.loopback_name(), true));
                namespaces.push(ns.clone());
            }
            Err(e) => unreachable.push((ns.clone(), format!("{e:#}"))),
        }
    }
    let other_linktypes = readers[1..]
        .iter()
        .map(|r| (r.default_iface.clone(), r.linktype))
        .collect();
    let fds = readers
        .iter()
        .map(|r| std::os::fd::AsRawFd::as_raw_fd(&r.cap))
        .collect();
    let threads = readers
        .into_iter()
        .map(|r| {
            std::thread::Builder::new()
                .name("tracer-capture".into())
                .spawn(move || r.run())
        })
        .collect::<Result<_, _>>()?;
    Ok(CaptureHandle {
        rx,
        stats,
        iface: cfg.iface.clone(),
        clock,
        linktype,
        other_linktypes,
        fds,
        namespaces,
        unreachable,
        guard: CaptureGuard { stop, threads },
    })
}

/// A non-blocking capture of `iface` with the plain FIN/RST filter.
fn open_device(iface: &str, ports: &[u16]) -> anyhow::Result<Capture<Active>> {
    let mut cap = Capture::from_device(iface)
        .context("finding the capture device")?
        // Not immediate: packets come in blocks retired at least every BLOCK_TIMEOUT_MS, one
        // wakeup per block instead of one per packet. The join waits far longer than that.
        .immediate_mode(false)
        // A bridge's own capture sees what passes between its ports only in promiscuous
        // mode: traced containers behind it would show no packet at all. Elsewhere the
        // host's own traffic is all there is to see.
        .promisc(is_bridge(iface))
        .snaplen(SNAPLEN)
        .precision(Precision::Nano)
        // 2 MiB hold ~15k headers-only packets: at 70k FIN/RST per second, 200 ms of the
        // capture thread not running. Every byte of it is resident.
        .buffer_size(2 << 20)
        .timeout(BLOCK_TIMEOUT_MS)
        .open()
        .map_err(|e| {
            let hint = if e.to_string().contains("not up") {
                "the interface is down: bring it up (ip link set IFACE up) or choose another"
            } else {
                "needs CAP_NET_RAW"
            };
            anyhow::Error::new(e).context(format!("opening the capture ({hint})"))
        })?;
    choose_cooked_linktype(&mut cap);
    if is_loopback(iface) {
        ignore_outgoing_copies(&cap);
    }
    cap.filter(&filter_expression(ports), true)
        .context("compiling the capture filter")?;
    // Non-blocking, waited on with poll(2): the thread must notice when it is told to stop.
    cap.setnonblock().context("making the capture non-blocking")
}

/// A capture of another namespace's loopback. A packet socket belongs to the namespace it was
/// created in, so a short-lived thread enters the namespace (setns: CAP_SYS_ADMIN) and opens
/// it there; the socket stays bound to that namespace's `lo` wherever it is read.
fn open_loopback_in(ns: &Namespace, ports: &[u16]) -> anyhow::Result<Capture<Active>> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/{}/ns/net", ns.pid);
    let netns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let open_there = || -> anyhow::Result<Capture<Active>> {
        // SAFETY: a namespace file this thread holds open; only this thread moves.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            anyhow::bail!("entering its namespace ({e}; needs CAP_SYS_ADMIN)");
        }
        open_device("lo", ports)
    };
    std::thread::scope(|s| s.spawn(open_there).join())
        .map_err(|_| anyhow::anyhow!("the thread opening its capture panicked"))?
}

/// On `lo` every packet passes the capture twice, leaving and arriving, and libpcap throws the
/// leaving copy away after the kernel has cloned it and copied it into the ring. The kernel can
/// skip it instead (PACKET_IGNORE_OUTGOING, Linux 4.20): half the capture's cost under loopback
/// churn. Where the option is missing, libpcap still drops the copy, as before.
fn ignore_outgoing_copies(cap: &Capture<Active>) {
    use std::os::fd::AsRawFd;
    const SOL_PACKET: libc::c_int = 263;
    const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
    let on: libc::c_int = 1;
    // SAFETY: an int option on the capture's own socket.
    unsafe {
        libc::setsockopt(
            cap.as_raw_fd(),
            SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Whether `iface` is this namespace's loopback.
fn is_loopback(iface: &str) -> bool {
    let index = loopback_ifindex();
    // SAFETY: a NUL-terminated name; the call only reads it.
    index != 0
        && std::ffi::CString::new(iface)
            .is_ok_and(|name| unsafe { libc::if_nametoindex(name.as_ptr()) } == index)
}

/// Whether `iface` is a Linux bridge.
fn is_bridge(iface: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("bridge")
        .exists()
}

/// The loopback interface's index here (0 when there is none): on `any`, the kernel filter
/// drops loopback's leaving copies by it (`Config::loopback_ifindex`).
pub fn loopback_ifindex() -> u32 {
    // SAFETY: a NUL-terminated name; the call only reads it.
    unsafe { libc::if_nametoindex(c"lo".as_ptr()) }
}

/// Prefers the Linux "cooked" headers, which carry the direction (and, for SLL2, the
/// interface) on every interface, including `any` and `lo`.
fn choose_cooked_linktype(cap: &mut Capture<Active>) {
    let available = cap.list_datalinks().unwrap_or_default();
    for wanted in [DLT_LINUX_SLL2, DLT_LINUX_SLL] {
        if cap.get_datalink().0 == wanted {
            return;
        }
        if available.iter().any(|l| l.0 == wanted) && cap.set_datalink(Linktype(wanted)).is_ok() {
            return;
        }
    }
}

struct Reader {
    cap: Capture<Active>,
    linktype: i32,
    /// The interface's name (another namespace's loopback: `lo@net:[...]`).
    default_iface: Arc<str>,
    names: HashMap<u32, Arc<str>>,
    /// Not `any`: every packet is seen once, and is `default_iface`'s.
    single_interface: bool,
    /// A loopback (this namespace's or another's): every packet is this host's both ways.
    loopback: bool,
    /// The capture interface's MAC address where its frames are plain Ethernet (a single
    /// interface such as a veth or a NIC: libpcap offers no cooked headers there).
    own_mac: Option<[u8; 6]>,
    loopback_ifindex: u32,
    keep_headers: bool,
    /// Shared by every packet when headers are not kept: no allocation per packet.
    no_headers: Arc<[u8]>,
    clock: SharedClock,
    tx: mpsc::Sender<WirePacket>,
    stats: Arc<CaptureStats>,
    stop: Arc<AtomicBool>,
}

impl Reader {
    fn run(mut self) {
        // Reading needs no privilege: the socket is open. Give this thread's capabilities up.
        let _ = crate::privileges::drop_all();
        let mut last_stats = Instant::now();
        while !self.stop.load(Ordering::Relaxed) && !self.tx.is_closed() {
            if self.wait_readable(100) && !self.drain() {
                break; // the capture failed (interface gone): the main loop sees the channel close
            }
            if last_stats.elapsed() >= Duration::from_millis(200) {
                last_stats = Instant::now();
                self.read_pcap_stats();
            }
        }
        self.read_pcap_stats();
    }

    fn wait_readable(&self, timeout_ms: i32) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.cap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
    }

    /// Reads every packet available now; false when the capture failed.
    fn drain(&mut self) -> bool {
        loop {
            match self.cap.next_packet() {
                Ok(packet) => {
                    let ts = packet.header.ts;
                    // With Precision::Nano, tv_usec carries nanoseconds.
                    let wall_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_usec as u64;
                    if wall_ns < self.stats.skip_before_wall_ns.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Some(mut p) = parse_packet(self.linktype, packet.data) {
                        if self.own_mac.is_some_and(|mac| sent_from(packet.data, &mac)) {
                            p.dir = Dir::Out;
                        }
                        let headers = if self.keep_headers {
                            Arc::from(&packet.data[..p.headers_len])
                        } else {
                            self.no_headers.clone()
                        };
                        self.deliver(p, wall_ns, headers);
                    }
                }
                Err(pcap::Error::TimeoutExpired) => return true,
                Err(_) => return false,
            }
        }
    }

    fn deliver(&mut self, p: Parsed, wall_ns: u64, headers: Arc<[u8]>) {
        self.stats.captured.fetch_add(1, Ordering::Relaxed);
        // An index names an interface of the namespace the capture is in, which need not be
        // this one: a single interface's capture names its packets by the interface itself.
        let iface = match p.ifindex {
            Some(index) if !self.single_interface => self.iface_name(index),
            _ => self.default_iface.clone(),
        };
        let on_loopback = self.loopback
            || p.ifindex
                .is_some_and(|i| i != 0 && i == self.loopback_ifindex);
        let packet = WirePacket {
            mono_ns: self.clock.get().wall_to_mono_ns(wall_ns),
            wall_ns,
            src: p.src,
            dst: p.dst,
            flags: p.flags,
            seq: p.seq,
            ack: p.ack,
            data_end: p.seq.wrapping_add(p.payload_len),
            iface,
            dir: p.dir,
            headers,
            only_copy: self.single_interface || on_loopback,
            on_loopback,
        };
        if self.tx.try_send(packet).is_err() {
            self.stats.channel_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn iface_name(&mut self, index: u32) -> Arc<str> {
        self.names
            .entry(index)
            .or_insert_with(|| Arc::from(if_name(index).as_str()))
            .clone()
    }

    fn read_pcap_stats(&mut self) {
        if let Ok(s) = self.cap.stats() {
            self.stats
                .pcap_dropped
                .store(s.dropped as u64 + s.if_dropped as u64, Ordering::Relaxed);
        }
    }
}

fn if_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE long, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("if{index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The header fields of one captured segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub dir: Dir,
    pub ifindex: Option<u32>,
    /// Length of the link, IP and TCP headers within the captured bytes (payload excluded).
    pub headers_len: usize,
    /// The TCP payload's length, from the IP header's lengths (the payload is not captured).
    pub payload_len: u32,
}

/// Parses link, IP and TCP headers; None for anything else or a truncated header.
pub fn parse_packet(linktype: i32, data: &[u8]) -> Option<Parsed> {
    let (ethertype, dir, ifindex, ip) = match linktype {
        DLT_LINUX_SLL2 => {
            let ethertype = be16(data, 0)?;
            let ifindex = be32(data, 4)?;
            let pkttype = *data.get(10)?;
            (
                ethertype,
                direction(pkttype),
                Some(ifindex),
                data.get(20..)?,
            )
        }
        DLT_LINUX_SLL => {
            let pkttype = be16(data, 0)? as u8;
            let ethertype = be16(data, 14)?;
            (ethertype, direction(pkttype), None, data.get(16..)?)
        }
        // Ethernet has no direction: incoming unless the reader knows the frame came from
        // the interface's own address (`sent_from`).
        DLT_EN10MB => (be16(data, 12)?, Dir::In, None, data.get(14..)?),
        _ => return None,
    };
    let (src_ip, dst_ip, tcp, tcp_len) = match ethertype {
        0x0800 => parse_ipv4(ip)?,
        0x86DD => parse_ipv6(ip)?,
        _ => return None,
    };
    let tcp_header_len = (*tcp.get(12)? >> 4) as usize * 4;
    let headers_len = (data.len() - tcp.len() + tcp_header_len).min(data.len());
    Some(Parsed {
        headers_len,
        payload_len: tcp_len.saturating_sub(tcp_header_len) as u32,
        src: SocketAddr::new(src_ip, be16(tcp, 0)?),
        dst: SocketAddr::new(dst_ip, be16(tcp, 2)?),
        seq: be32(tcp, 4)?,
        ack: be32(tcp, 8)?,
        flags: *tcp.get(13)?,
        dir,
        ifindex,
    })
}

/// Whether an Ethernet frame's source is `mac`: the host sent it on that interface (what the
/// kernel marks PACKET_OUTGOING, which only cooked headers carry).
fn sent_from(frame: &[u8], mac: &[u8; 6]) -> bool {
    frame.get(6..12) == Some(&mac[..])
}

/// The interface's MAC address, from sysfs (None where it has none or cannot be read).
fn interface_mac(iface: &str) -> Option<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).ok()?;
    parse_mac(text.trim())
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn direction(pkttype: u8) -> Dir {
    if pkttype == PACKET_OUTGOING {
        Dir::Out
    } else {
        Dir::In
    }
}

/// Source, destination, the TCP header onwards (as captured) and the TCP segment's length
/// (as the IP header gives it).
type IpParts<'a> = (IpAddr, IpAddr, &'a [u8], usize);

fn parse_ipv4(ip: &[u8]) -> Option<IpParts<'_>> {
    let ihl = (*ip.first()? & 0x0f) as usize * 4;
    if ip.first()? >> 4 != 4 || *ip.get(9)? != 6 || ihl < 20 {
        return None;
    }
    let total_len = usize::from(be16(ip, 2)?);
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], *ip.get(15)?);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], *ip.get(19)?);
    let tcp_len = total_len.saturating_sub(ihl);
    Some((src.into(), dst.into(), ip.get(ihl..)?, tcp_len))
}

fn parse_ipv6(ip: &[u8]) -> Option<IpParts<'_>> {
    if ip.first()? >> 4 != 6 || *ip.get(6)? != 6 {
        return None; // not TCP right after the fixed header (extension headers unsupported)
    }
    let payload_len = usize::from(be16(ip, 4)?);
    let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
    Some((
        Ipv6Addr::from(src).into(),
        Ipv6Addr::from(dst).into(),
        ip.get(40..)?,
        payload_len,
    ))
}

fn be16(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn be32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&ack.to_be_bytes());
        t.extend_from_slice(&[0x50, flags, 0xff, 0xff]);
        t
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(payload);
        ip
    }

    fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(payload);
        ip
    }

    fn sll2(ethertype: u16, ifindex: u32, pkttype: u8, ip: &[u8]) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&ethertype.to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&ifindex.to_be_bytes());
        h.extend_from_slice(&[0, 1, pkttype, 6]);
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(ip);
        h
    }

    fn sll(ethertype: u16, pkttype: u16, ip: &[u8]) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&pkttype.to_be_bytes());
        h.extend_from_slice(&[0, 1, 0, 6]);
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&ethertype.to_be_bytes());
        h.extend_from_slice(ip);
        h
    }

    /// Only the headers are captured: the payload's length comes from the IP header's.
    #[test]
    fn the_payload_length_comes_from_the_ip_header() {
        let seg = tcp(8080, 40000, 1000, 2000, tcp_flags::FIN | tcp_flags::ACK);
        let mut v4 = ipv4([10, 0, 0, 1], [10, 0, 0, 2], &seg);
        v4[2..4].copy_from_slice(&(40u16 + 632).to_be_bytes());
        let p = parse_packet(DLT_LINUX_SLL2, &sll2(0x0800, 7, 0, &v4)).unwrap();
        assert_eq!(p.payload_len, 632);
        let mut v6 = ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, &seg);
        v6[4..6].copy_from_slice(&(20u16 + 5).to_be_bytes());
        let p = parse_packet(DLT_LINUX_SLL2, &sll2(0x86DD, 7, 0, &v6)).unwrap();
        assert_eq!(p.payload_len, 5);
    }

    #[test]
    fn ipv4_over_sll2() {
        let seg = tcp(8080, 40000, 1000, 2000, tcp_flags::RST | tcp_flags::ACK);
        let frame = sll2(
            0x0800,
            7,
            PACKET_OUTGOING,
            &ipv4([10, 0, 0, 1], [10, 0, 0, 2], &seg),
        );
        let p = parse_packet(DLT_LINUX_SLL2, &frame).unwrap();
        assert_eq!(p.src, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(p.dst, "10.0.0.2:40000".parse().unwrap());
        assert_eq!((p.seq, p.ack), (1000, 2000));
        assert_eq!(p.flags, tcp_flags::RST | tcp_flags::ACK);
        assert_eq!(p.dir, Dir::Out);
        assert_eq!(p.ifindex, Some(7));
    }

    #[test]
    fn ipv6_over_sll() {
        let seg = tcp(443, 50000, 1, 2, tcp_flags::FIN | tcp_flags::ACK);
        let frame = sll(
            0x86DD,
            0,
            &ipv6(Ipv6Addr::LOCALHOST, "fd00::2".parse().unwrap(), &seg),
        );
        let p = parse_packet(DLT_LINUX_SLL, &frame).unwrap();
        assert_eq!(p.src, "[::1]:443".parse().unwrap());
        assert_eq!(p.dst, "[fd00::2]:50000".parse().unwrap());
        assert_eq!(p.dir, Dir::In);
        assert_eq!(p.ifindex, None);
        assert_eq!(p.flags & tcp_flags::FIN, tcp_flags::FIN);
    }

    /// On a single Ethernet interface (a veth, a NIC) the frame's source address tells a
    /// packet this host sent from one it received; a FIN it sent was reported as `in`.
    #[test]
    fn an_ethernet_frame_from_the_interfaces_own_address_was_sent() {
        let mac = parse_mac("02:42:ac:11:00:02").unwrap();
        assert_eq!(mac, [0x02, 0x42, 0xac, 0x11, 0x00, 0x02]);
        assert!(parse_mac("02:42:ac:11:00").is_none());
        assert!(parse_mac("02:42:ac:11:00:02:07").is_none());
        let seg = tcp(40000, 80, 1, 2, tcp_flags::FIN | tcp_flags::ACK);
        let mut frame = vec![0xee; 6]; // destination
        frame.extend_from_slice(&mac); // source
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ipv4([10, 0, 0, 1], [10, 0, 0, 2], &seg));
        assert_eq!(parse_packet(DLT_EN10MB, &frame).unwrap().src.port(), 40000);
        assert!(sent_from(&frame, &mac));
        assert!(!sent_from(&frame, &[0xee; 6]));
        assert!(!sent_from(&frame[..8], &mac));
    }

    #[test]
    fn rejects_truncated_and_non_tcp() {
        let seg = tcp(1, 2, 3, 4, tcp_flags::FIN);
        let frame = sll2(0x0800, 1, 0, &ipv4([1, 1, 1, 1], [2, 2, 2, 2], &seg));
        assert!(parse_packet(DLT_LINUX_SLL2, &frame[..frame.len() - 8]).is_none());
        let mut udp = ipv4([1, 1, 1, 1], [2, 2, 2, 2], &seg);
        udp[9] = 17;
        assert!(parse_packet(DLT_LINUX_SLL2, &sll2(0x0800, 1, 0, &udp)).is_none());
        assert!(parse_packet(DLT_LINUX_SLL2, &sll2(0x0806, 1, 0, &[0; 28])).is_none());
        assert!(parse_packet(999, &frame).is_none());
    }

    #[test]
    fn filter_narrows_to_ports() {
        assert!(!filter_expression(&[]).contains("port"));
        assert!(filter_expression(&[80, 443]).ends_with(") and (port 80 or port 443)"));
    }

    #[test]
    fn captures_a_fin_on_loopback_and_filters_data() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI runs as root"
            );
            eprintln!("SKIPPED: capturing needs root");
            return;
        }
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut handle = open(
            &CaptureConfig {
                iface: "lo".into(),
                ports: vec![port],
                keep_headers: true,
                held: false,
                namespaces: Vec::new(),
            },
            SharedClock::new(),
        )
        .unwrap();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"data, no FIN").unwrap();
        let client_port = client.local_addr().unwrap().port();
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(5);
        let fin = loop {
            match handle.rx.try_recv() {
                Ok(p) => break p,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("no FIN captured: {e}"),
            }
        };
        assert_eq!(fin.src.port(), client_port);
        assert_ne!(
            fin.flags & tcp_flags::FIN,
            0,
            "only FIN/RST pass the filter: {fin:?}"
        );
        assert_eq!(&*fin.iface, "lo");
        assert!(fin.on_loopback && fin.only_copy, "{fin:?}");
        drop(server);
    }
}
