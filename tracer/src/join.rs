//! The join: each kernel event that put a packet on the wire (or was caused by one) is matched
//! with that packet, by identity first and time second.
//!
//! A kernel event and a packet belong together when they are the same connection (4-tuple, from
//! the right direction), the same kind (FIN or RST) and nearest in time within the window. A
//! packet has two claim slots: its sender's event and its receiver's event, since on loopback or
//! between two namespaces of one host both ends are traced. Copies of one packet seen within a
//! few milliseconds (interface `any` shows loopback traffic twice) are one packet; the same
//! segment seen later is a retransmission. Events of one connection leave in the order they came.

use std::{
    collections::{VecDeque, hash_map::Entry},
    hash::{BuildHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use smallvec::SmallVec;

// Keys are kernel-drawn random ids and addresses, not attacker-chosen: FxHash is safe and
// several times cheaper than SipHash on this per-event path.
use rustc_hash::{FxBuildHasher, FxHashMap as HashMap};

use crate::capture::{Dir, WirePacket, tcp_flags};

/// The claim of a packet's end whose line did not come through the joiner (event ids start
/// at 1).
const NO_EVENT: u64 = 0;
/// Copies of a segment closer than this are one packet seen twice, not a retransmission.
const DUPLICATE_NS: u64 = 5_000_000;
/// A joined event waits this long (at most the window) for duplicate copies and immediate
/// retransmissions before it is released.
const SETTLE_NS: u64 = 20_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WantFlag {
    Fin,
    Rst,
}

impl WantFlag {
    fn matches(self, flags: u8) -> bool {
        match self {
            WantFlag::Fin => flags & tcp_flags::FIN != 0,
            WantFlag::Rst => flags & tcp_flags::RST != 0,
        }
    }
}

/// The packet an event waits for. `dir` is relative to the event's socket: Out = the socket
/// sent it (src == local); In = it received it (src == remote).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub flag: WantFlag,
    pub dir: Dir,
    /// Whether the packet carries ACK, where the event knows (None: either).
    pub ack: Option<bool>,
    /// For a received RST: the socket had taken the peer's FIN (its old state says so).
    /// A RST at or before that FIN's sequence number was out of its window then, and the
    /// kernel ignored it (RFC 5961): not the RST that reset it.
    pub peer_fin_taken: bool,
}

/// The packet that joined an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireMatch {
    pub packet: WirePacket,
    /// Relative to the event's socket.
    pub dir: Dir,
    /// packet.mono_ns - event mono_ns; may be slightly negative across CPUs.
    pub delay_ns: i64,
    /// Further copies of the segment seen later (retransmissions).
    pub retransmits: u32,
}

pub enum Joined<T> {
    /// The allocation the event waited in, handed over as it is: an event is a few hundred
    /// bytes, and moving it through the release path showed as memmove in the profile.
    Event(Box<PendingEvent<T>>),
    Packet {
        packet: WirePacket,
        retransmit: bool,
    },
    /// A FIN or RST its sender's event claimed and no event on the receiving end did: on
    /// loopback (or between namespaces of one host) the receiver may be a socket that already
    /// left for TIME_WAIT or an orphaned FIN_WAIT2, which no kernel event shows receiving it.
    Unreceived {
        packet: WirePacket,
        retransmit: bool,
    },
}

/// (source, destination) of a packet, IPv4-mapped IPv6 addresses written as IPv4, with its
/// hash computed once: a packet or an event looks its path up in several tables, and hashing
/// the two socket addresses field by field each time was ~7 % of the daemon's instructions
/// under churn. Equal paths have equal hashes; equality still compares the addresses.
#[derive(Clone, Copy, Debug)]
struct PathKey {
    hash: u64,
    src: SocketAddr,
    dst: SocketAddr,
}

impl PathKey {
    fn new(src: SocketAddr, dst: SocketAddr) -> Self {
        let (src, dst) = (normalise(src), normalise(dst));
        Self {
            hash: FxBuildHasher.hash_one((src, dst)),
            src,
            dst,
        }
    }

    fn of(pkt: &WirePacket) -> Self {
        Self::new(pkt.src, pkt.dst)
    }
}

impl PartialEq for PathKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.src == other.src && self.dst == other.dst
    }
}

impl Eq for PathKey {}

impl Hash for PathKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

pub(crate) fn normalise(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

impl Want {
    /// Whether a packet with `flags` is of the kind this want waits for.
    fn matches(&self, flags: u8) -> bool {
        self.flag.matches(flags)
            && self
                .ack
                .is_none_or(|ack| (flags & tcp_flags::ACK != 0) == ack)
    }

    /// The packet's (src, dst) this want matches.
    fn path(&self) -> PathKey {
        match self.dir {
            Dir::Out => PathKey::new(self.local, self.remote),
            Dir::In => PathKey::new(self.remote, self.local),
        }
    }
}

/// A packet both ends have claimed leaves once their events have settled (see `done_early`).
fn schedule_early_expiry(
    early_order: &mut VecDeque<(u64, PathKey, u64)>,
    entry: &PacketEntry,
    path: PathKey,
) {
    if entry.done_early() {
        // Kept to recognise later copies and retransmissions, where there may be any.
        let keep = settle_for(entry.flags, entry.only_copy, SETTLE_NS);
        early_order.push_back((entry.first_mono + keep, path, entry.id));
    }
}

/// How long what joined a packet (an event, or the packet's own entry) stays for later copies
/// of it (on `any`, the same packet on a bridge and its port) and retransmissions to be
/// counted: `settle_ns`, or nothing for a RST the capture shows once, which has neither (the
/// kernel never retransmits a RST; one sent again for a later segment is another event's).
/// Under RST churn the events then leave the joiner while still in the CPU's cache.
fn settle_for(flags: u8, only_copy: bool, settle_ns: u64) -> u64 {
    if only_copy && flags & tcp_flags::RST != 0 {
        0
    } else {
        settle_ns
    }
}

/// A received FIN or RST that came this shortly before its event may be the one that moved the
/// socket (the event can wait for the socket's owner to release it: ~140 µs seen on loopback).
const RECEIVED_BEFORE_EVENT_NS: u64 = 5_000_000;
/// The longest an event or a packet takes to reach the joiner after its time: the capture
/// hands packets over in blocks (every 10 ms at least), the ring buffer its events when the
/// daemon wakes. The window (`--join-window`) bounds how far apart an event and its packet may
/// be; this bounds how long either waits for the other to arrive, so a window shorter than the
/// delivery still joins (a 1 ms window lost 40 % of its joins under load).
const DELIVERY_LAG_NS: u64 = 100_000_000;
/// How long an event whose received packet came long before it waits for a nearer copy (a
/// retransmission) before it takes the old one: the capture's own delay, with room.
const OLDER_COPY_GRACE_NS: u64 = 100_000_000;
/// How far the capture's clock and the kernel's may disagree about one instant.
const CLOCK_SKEW_NS: u64 = 50_000;

/// How far a packet may seem to come before the event that sends it, or after the event it
/// caused: the clocks' disagreement (microseconds; more for a moment after an NTP step, until
/// the offset is measured again). A packet further on the wrong side is another connection's
/// on the same addresses, whose own event never came (one that closed while the hooks were
/// being attached): taken, it gave a close a RST from 158 ms before the call.
const CAUSAL_SLACK_NS: u64 = 5_000_000;

/// Whether `packet_mono` is on the right side of `event_mono` for the packet to be the event's:
/// sent after it (a close's FIN or RST, a reset sent) or received before it (a FIN or RST that
/// moved the socket).
fn in_causal_order(want: &Want, packet_mono: u64, event_mono: u64) -> bool {
    match want.dir {
        Dir::Out => packet_mono + CAUSAL_SLACK_NS >= event_mono,
        Dir::In => packet_mono <= event_mono + CAUSAL_SLACK_NS,
    }
}

/// Whether the stored packet `e` can join an event at `mono_ns` that wants `want`: not claimed
/// on that end yet, of the kind wanted, within the window, on the right side of the event.
fn joinable(e: &PacketEntry, want: &Want, mono_ns: u64, window_ns: u64) -> bool {
    e.claimed[slot(want.dir)].is_none()
        && want.matches(e.flags)
        && e.first_mono.abs_diff(mono_ns) <= window_ns
        && in_causal_order(want, e.first_mono, mono_ns)
}

/// For a packet the socket received: whether it came shortly before the event
/// (RECEIVED_BEFORE_EVENT_NS), as the one that moved the socket does (see
/// `Joiner::claim_waiting_packet`). A packet the socket sent always qualifies.
fn received_recently(want: &Want, e: &PacketEntry, mono_ns: u64) -> bool {
    want.dir == Dir::Out || e.first_mono + RECEIVED_BEFORE_EVENT_NS >= mono_ns
}

/// The sequence number of the peer's FIN among `entries` (the packets on the path a received
/// RST came by), when `want`'s socket had taken that FIN (see `Want::peer_fin_taken`).
fn taken_fin_seq(entries: &[PacketEntry], want: &Want) -> Option<u32> {
    if !(want.peer_fin_taken && want.flag == WantFlag::Rst && want.dir == Dir::In) {
        return None;
    }
    entries
        .iter()
        .rev()
        .find(|e| e.flags & tcp_flags::FIN != 0)
        .map(|e| e.data_end)
}

/// Whether a RST with `seq` is at or before the FIN its receiver had taken (`fin_seq`): once
/// the receiver has acknowledged that FIN, out of its window and ignored (the ABORT_ON_DATA
/// reset of a server's orphan answering a segment that acknowledged its data but not its FIN;
/// the listener's reset for the client's own FIN, one later, is the one that resets the
/// client).
fn before_taken_fin(seq: u32, fin_seq: Option<u32>) -> bool {
    fin_seq.is_some_and(|fin| fin.wrapping_sub(seq) as i32 >= 0)
}

/// The order in which an event prefers the stored packets it matches (lowest first): nearest
/// in time, except for a received RST. The first RST to arrive resets the socket; a second
/// one sent before the first was processed (a client's close, then the kernel's answer to the
/// server's next segment) finds no socket. So among the RSTs that arrived shortly before the
/// event, the earliest; nearest in time when none did.
fn preference(want: &Want, packet_mono: u64, event_mono: u64) -> (bool, u64) {
    let arrived_just_before = packet_mono <= event_mono + CLOCK_SKEW_NS
        && event_mono.saturating_sub(packet_mono) <= RECEIVED_BEFORE_EVENT_NS;
    if want.dir == Dir::In && want.flag == WantFlag::Rst && arrived_just_before {
        (false, packet_mono)
    } else {
        (true, packet_mono.abs_diff(event_mono))
    }
}

/// The stored packet `pkt` is a copy of (the same segment within DUPLICATE_NS), if any.
fn copy_of<'a>(
    packets: &'a mut HashMap<PathKey, SmallVec<[PacketEntry; 1]>>,
    path: &PathKey,
    pkt: &WirePacket,
) -> Option<&'a mut PacketEntry> {
    packets.get_mut(path)?.iter_mut().find(|e| e.is_copy(pkt))
}

/// The stored packet `pkt` is a further copy of: the same segment within DUPLICATE_NS, seen
/// at another point of the capture (another interface, or the other direction). The same
/// segment again where it was seen already is the sender's retransmission, however soon (a
/// tail-loss probe follows its FIN by a few milliseconds): merged as a copy, it was counted
/// nowhere and became no line.
fn copy_at_another_point<'a>(
    packets: &'a mut HashMap<PathKey, SmallVec<[PacketEntry; 1]>>,
    path: &PathKey,
    pkt: &WirePacket,
) -> Option<&'a mut PacketEntry> {
    packets
        .get_mut(path)?
        .iter_mut()
        .find(|e| e.is_copy(pkt) && !e.seen_at(pkt))
}

/// What tells a segment from another: its flags, acknowledgement and sequence number; for a
/// FIN, the FIN's own (`data_end`): one sent again with more or less of the data before it (a
/// tail-loss probe resends only the last segment's worth) is the same FIN.
fn segment_of(p: &WirePacket) -> (u32, u32, u8) {
    segment_id(p.seq, p.data_end, p.ack, p.flags)
}

fn segment_id(seq: u32, data_end: u32, ack: u32, flags: u8) -> (u32, u32, u8) {
    let seq = if flags & tcp_flags::FIN != 0 {
        data_end
    } else {
        seq
    };
    (seq, ack, flags)
}

fn slot(dir: Dir) -> usize {
    match dir {
        Dir::Out => 0,
        Dir::In => 1,
    }
}

/// An event in the joiner; released as `Joined::Event` with the packet that joined it.
pub struct PendingEvent<T> {
    conn: u64,
    mono_ns: u64,
    want: Option<Want>,
    pub item: T,
    pub wire: Option<WireMatch>,
    /// The packet entry that joined it.
    packet_id: Option<u64>,
    /// When it leaves (its window's end, or sooner once joined); a timer for another time is
    /// stale.
    release_at: u64,
    ready: bool,
}

/// One packet (all its near-simultaneous copies) waiting to be claimed.
///
/// Once both ends have claimed it, the copies are dropped (the events hold their own): what
/// stays for the rest of the window, to recognise retransmissions, is the segment's identity.
/// Under churn this is most packets, and it keeps the joiner's memory small.
struct PacketEntry {
    id: u64,
    /// The first copy seen and the last (None while there is one): on `any` a packet is seen
    /// at each hop in the order it went (a loopback packet leaving, then arriving; between
    /// two namespaces on a bridge, on the sender's veth, then on the receiver's), so the
    /// sender's end takes the first (slot 0, as `Dir::Out`) and the receiver's the last
    /// (slot 1, `Dir::In`). Empty once both ends claimed it. Boxed: an entry without them is a
    /// few dozen bytes.
    copies: [Option<Box<WirePacket>>; 2],
    /// When the last copy was seen.
    last_mono: u64,
    flags: u8,
    seq: u32,
    /// Where its data ends: a FIN's own sequence number (see `WirePacket::data_end`).
    data_end: u32,
    ack: u32,
    first_mono: u64,
    /// Event ids that claimed it, as sender (0) and receiver (1).
    claimed: [Option<u64>; 2],
    retransmit: bool,
    /// The capture shows the packet once (`WirePacket::only_copy`).
    only_copy: bool,
    /// Where its copies were seen: (interface, direction).
    points: SmallVec<[(Arc<str>, Dir); 2]>,
}

impl PacketEntry {
    fn new(id: u64, pkt: &WirePacket, retransmit: bool) -> Self {
        Self {
            id,
            copies: [Some(Box::new(pkt.clone())), None],
            last_mono: pkt.mono_ns,
            flags: pkt.flags,
            seq: pkt.seq,
            data_end: pkt.data_end,
            ack: pkt.ack,
            first_mono: pkt.mono_ns,
            claimed: [None, None],
            retransmit,
            only_copy: pkt.only_copy,
            points: smallvec::smallvec![(pkt.iface.clone(), pkt.dir)],
        }
    }

    /// Whether `pkt` is the same segment, within DUPLICATE_NS of its first copy.
    fn is_copy(&self, pkt: &WirePacket) -> bool {
        self.same_segment(pkt) && self.first_mono.abs_diff(pkt.mono_ns) <= DUPLICATE_NS
    }

    /// Whether a copy of the entry was seen where `pkt` was.
    fn seen_at(&self, pkt: &WirePacket) -> bool {
        self.points
            .iter()
            .any(|(iface, dir)| *dir == pkt.dir && **iface == *pkt.iface)
    }

    /// A copy; only called while the entry is not fully claimed (its copies are kept).
    fn any_copy(&self) -> &WirePacket {
        self.copies[0]
            .as_deref()
            .or(self.copies[1].as_deref())
            .expect("a packet entry keeps a copy until both ends claimed it")
    }

    fn copy_for(&self, role: Dir) -> &WirePacket {
        self.copies[slot(role)]
            .as_deref()
            .unwrap_or_else(|| self.any_copy())
    }

    /// Once both ends have it, the entry is needed only while their events wait to settle
    /// (the second copy an `any` capture brings, a retransmission counted on the events).
    /// A RST is never retransmitted; a FIN sent again later is known for one by the pipeline,
    /// which remembers each connection's FIN sequence numbers. Keeping every fully claimed
    /// FIN for the whole window held ~6 MB under loopback FIN churn.
    fn done_early(&self) -> bool {
        self.fully_claimed()
    }

    fn same_segment(&self, p: &WirePacket) -> bool {
        self.segment() == segment_of(p)
    }

    /// What tells the segment from another (see `segment_of`).
    fn segment(&self) -> (u32, u32, u8) {
        segment_id(self.seq, self.data_end, self.ack, self.flags)
    }

    fn fully_claimed(&self) -> bool {
        self.claimed.iter().all(Option::is_some)
    }

    fn claim(&mut self, role: Dir, event: u64) {
        self.claimed[slot(role)] = Some(event);
        if self.fully_claimed() {
            self.copies = [None, None];
        }
    }
}

/// The kinds of release deadline an event can have.
#[derive(Clone, Copy)]
enum Deadline {
    /// It waits for no packet: its own time.
    Now,
    /// It waits for a packet: the end of its join window.
    WindowEnd,
    /// It joined a packet: the settle time after it.
    Settled,
    /// It joined a packet that needs no settling (`settle_for`): the packet's time. A queue
    /// of its own, not to wait behind joins that settle.
    Joined,
}

/// Release deadlines, one FIFO queue per kind. Within a kind, deadlines are queued almost in
/// time order (events arrive in time order up to a little disorder across CPUs, and an abortive
/// close the pipeline held up to 20 ms for its RST event; joins in the order packets are read),
/// so a queue's front is its earliest deadline up to that disorder: a deadline queued behind a
/// later one leaves when that one does, late by at most the disorder, never early. Pushing and popping cost O(1): an ordered
/// set or a heap over every waiting event cost 4-10 % of the daemon's CPU under churn.
/// A re-timed event (joined before its window ended) leaves its old deadline behind, skipped
/// as stale when it reaches the front.
#[derive(Default)]
struct Timers {
    queues: [VecDeque<(u64, u64)>; 4],
}

impl Timers {
    fn push(&mut self, kind: Deadline, at: u64, event: u64) {
        self.queues[kind as usize].push_back((at, event));
    }

    /// The earliest live deadline at a queue's front: (queue, time, event id). Stale ones
    /// (events gone, or re-timed) are dropped on the way.
    fn earliest<T>(
        &mut self,
        events: &HashMap<u64, Box<PendingEvent<T>>>,
    ) -> Option<(usize, u64, u64)> {
        let mut best: Option<(usize, u64, u64)> = None;
        for (q, queue) in self.queues.iter_mut().enumerate() {
            while let Some(&(at, id)) = queue.front() {
                if events.get(&id).is_some_and(|e| e.release_at == at) {
                    if best.is_none_or(|(_, t, _)| at < t) {
                        best = Some((q, at, id));
                    }
                    break;
                }
                queue.pop_front();
            }
        }
        best
    }

    fn pop(&mut self, queue: usize) {
        self.queues[queue].pop_front();
    }

    fn clear(&mut self) {
        self.queues.iter_mut().for_each(VecDeque::clear);
    }
}

pub struct Joiner<T> {
    window_ns: u64,
    /// How long an event waits for its packet, and a packet for its event, in the daemon: the
    /// window, but at least DELIVERY_LAG_NS (see there).
    hold_ns: u64,
    settle_ns: u64,
    max_pending: usize,
    next_id: u64,
    /// Boxed: an event is ~480 bytes and the table keeps the capacity of its busiest moment;
    /// boxed, the table costs 16 bytes a slot and only live events take the rest.
    events: HashMap<u64, Box<PendingEvent<T>>>,
    /// Event ids per connection, in push order. The per-connection and per-path lists hold one
    /// or two items almost always: inline, they cost no allocation per connection (malloc and
    /// free were ~12 % of the daemon's CPU under churn).
    by_conn: HashMap<u64, SmallVec<[u64; 4]>>,
    timers: Timers,
    /// Unjoined events waiting for a packet, by the packet path they expect.
    waiting: HashMap<PathKey, SmallVec<[u64; 2]>>,
    packets: HashMap<PathKey, SmallVec<[PacketEntry; 1]>>,
    /// (expiry time, path, packet id): every packet, at the end of its window.
    packet_order: VecDeque<(u64, PathKey, u64)>,
    /// The same for packets both ends claimed, which expire after SETTLE_NS (see done_early).
    /// A packet leaves at whichever expiry comes first; the other record then finds nothing.
    early_order: VecDeque<(u64, PathKey, u64)>,
    /// Packet entries stored (packet_order may also hold records of packets gone early).
    stored_packets: usize,
    /// Allocations of released events, handed back by the consumer (`recycle`) for the next
    /// events: a malloc and a free of ~480 bytes per event were a tenth of the daemon's CPU.
    spare: Vec<Box<PendingEvent<T>>>,
    /// Outputs produced outside poll (overflow, retransmissions of released joins).
    out: Vec<Joined<T>>,
    dropped: u64,
    /// When the daemon last read events or packets (`delivered_at`): what it pushes now waits
    /// at least DELIVERY_LAG_NS from then, whatever its own time (see `deadline`).
    delivered_ns: u64,
}

impl<T> Joiner<T> {
    pub fn new(window: Duration, max_pending: usize) -> Self {
        let window_ns = window.as_nanos() as u64;
        Self {
            window_ns,
            hold_ns: window_ns.max(DELIVERY_LAG_NS),
            settle_ns: SETTLE_NS.min(window_ns),
            max_pending,
            next_id: 0,
            events: HashMap::default(),
            by_conn: HashMap::default(),
            timers: Timers::default(),
            waiting: HashMap::default(),
            packets: HashMap::default(),
            packet_order: VecDeque::new(),
            early_order: VecDeque::new(),
            stored_packets: 0,
            spare: Vec::new(),
            out: Vec::new(),
            dropped: 0,
            delivered_ns: 0,
        }
    }

    /// The daemon reads what the kernel and the capture delivered at `now_ns`.
    pub fn delivered_at(&mut self, now_ns: u64) {
        self.delivered_ns = self.delivered_ns.max(now_ns);
    }

    /// When something of time `mono_ns` that waits `wait_ns` for its counterpart stops
    /// waiting: `wait_ns` after its time, but never sooner than DELIVERY_LAG_NS after it was
    /// delivered. A daemon stalled for longer than the window (stopped, starved of CPU) reads
    /// a close and, a moment later, its RST from the capture: both are past their window by
    /// then, and timed from their own instants they left unjoined, microseconds apart.
    fn deadline(&self, mono_ns: u64, wait_ns: u64) -> u64 {
        (mono_ns + wait_ns).max(self.delivered_ns + DELIVERY_LAG_NS)
    }

    /// The longest an event stays after its time: its wait for the packet, then the settle.
    pub fn longest_stay_ns(&self) -> u64 {
        self.hold_ns + self.settle_ns
    }

    /// Items dropped (packets) or released without waiting for their packet (events) because
    /// more than `max_pending` waited.
    pub fn overflow_dropped(&self) -> u64 {
        self.dropped
    }

    pub fn pending(&self) -> usize {
        self.events.len()
    }

    /// Takes back a released event's allocation for a later event (a bounded number of them:
    /// a burst's worth is freed).
    pub fn recycle(&mut self, event: Box<PendingEvent<T>>) {
        const MAX_SPARE: usize = 1024;
        if self.spare.len() < MAX_SPARE {
            self.spare.push(event);
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn push_event(&mut self, conn: u64, mono_ns: u64, want: Option<Want>, item: T) {
        // An event that wants no packet and has no earlier one of its connection still here
        // to follow is ready now: it goes out at the next poll without entering the tables
        // (under RST churn, the client's close of its reset socket: a third of all events).
        if want.is_none() && !self.by_conn.contains_key(&conn) {
            let event = self.boxed(PendingEvent {
                conn,
                mono_ns,
                want: None,
                item,
                wire: None,
                packet_id: None,
                release_at: mono_ns,
                ready: true,
            });
            self.out.push(Joined::Event(event));
            return;
        }
        self.make_room();
        let id = self.id();
        let (deadline, release_at) = if want.is_some() {
            (Deadline::WindowEnd, self.deadline(mono_ns, self.hold_ns))
        } else {
            (Deadline::Now, mono_ns)
        };
        let event = PendingEvent {
            conn,
            mono_ns,
            want: want.clone(),
            item,
            wire: None,
            packet_id: None,
            release_at,
            ready: false,
        };
        let boxed = self.boxed(event);
        self.events.insert(id, boxed);
        self.by_conn.entry(conn).or_default().push(id);
        self.timers.push(deadline, release_at, id);
        if let Some(want) = want {
            let path = want.path();
            if !self.claim_waiting_packet(id, &want, path, mono_ns, true) {
                self.waiting.entry(path).or_default().push(id);
                if self.has_older_copy(&want, &path, mono_ns) {
                    // The copy it waits for is a retransmission (or the RST after the FIN) the
                    // capture brings a little later; failing that, the one stored
                    // (`claim_at_window_end`).
                    let at = self.deadline(mono_ns, OLDER_COPY_GRACE_NS.min(self.window_ns));
                    if let Some(ev) = self.events.get_mut(&id) {
                        ev.release_at = at;
                    }
                    self.timers.push(Deadline::WindowEnd, at, id);
                }
            }
        }
    }

    /// Whether a packet the socket received long before its event (see `claim_waiting_packet`),
    /// or a RST before the FIN it had taken (see `before_taken_fin`), is stored for `want`:
    /// the one it would take if nothing better comes.
    fn has_older_copy(&self, want: &Want, path: &PathKey, mono_ns: u64) -> bool {
        self.packets.get(path).is_some_and(|entries| {
            let fin_seq = taken_fin_seq(entries, want);
            entries.iter().any(|e| {
                joinable(e, want, mono_ns, self.window_ns)
                    && (!received_recently(want, e, mono_ns) || before_taken_fin(e.seq, fin_seq))
            })
        })
    }

    /// `event` in a recycled allocation where there is one.
    fn boxed(&mut self, event: PendingEvent<T>) -> Box<PendingEvent<T>> {
        match self.spare.pop() {
            Some(mut spare) => {
                *spare = event;
                spare
            }
            None => Box::new(event),
        }
    }

    /// Lets `revise` change every event of connection `conn` still held here, joined or not.
    pub fn revise_held(&mut self, conn: u64, mut revise: impl FnMut(&mut T)) {
        let Some(ids) = self.by_conn.get(&conn) else {
            return;
        };
        for id in ids {
            if let Some(ev) = self.events.get_mut(id) {
                revise(&mut ev.item);
            }
        }
    }

    /// Takes out the first event of connection `conn` that waits for a packet it has not got
    /// and that `pick` chooses: the caller pushes it again changed (see
    /// `Pipeline::rst_sent`). Its old deadlines are left behind as stale.
    pub fn take_waiting(&mut self, conn: u64, mut pick: impl FnMut(&T) -> bool) -> Option<T> {
        let ids = self.by_conn.get(&conn)?;
        let id = *ids.iter().find(|id| {
            self.events
                .get(id)
                .is_some_and(|ev| ev.wire.is_none() && ev.want.is_some() && pick(&ev.item))
        })?;
        let ev = self.events.remove(&id).expect("found above");
        if let Some(want) = &ev.want {
            self.unwait(&want.path(), id);
        }
        if let Some(ids) = self.by_conn.get_mut(&conn) {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
        // The events behind it in the connection's order may be ready by now.
        let mut out = std::mem::take(&mut self.out);
        self.release_ready_front(conn, &mut out);
        self.out = out;
        let PendingEvent { item, .. } = *ev;
        Some(item)
    }

    /// Lets `revise` change the unjoined events of connection `conn` that still wait for a
    /// packet; those it says no longer want one leave as soon as their turn comes.
    pub fn stop_waiting(&mut self, conn: u64, mut revise: impl FnMut(&mut T) -> bool) {
        let Some(ids) = self.by_conn.get(&conn) else {
            return;
        };
        let ids = ids.clone();
        for id in ids {
            let Some(ev) = self.events.get_mut(&id) else {
                continue;
            };
            if ev.wire.is_some() || ev.want.is_none() || !revise(&mut ev.item) {
                continue;
            }
            let want = ev.want.take().expect("checked");
            ev.release_at = ev.mono_ns;
            let at = ev.mono_ns;
            self.unwait(&want.path(), id);
            self.timers.push(Deadline::Now, at, id);
        }
    }

    /// Joins the event with the nearest unclaimed matching packet already seen, if any. With
    /// `recent_only`, a packet the socket received must have come shortly before the event
    /// (`RECEIVED_BEFORE_EVENT_NS`): one long before is a copy lost on the way, whose
    /// retransmission may still be on its way to the joiner; the event waits for it, and takes
    /// the old copy only when OLDER_COPY_GRACE_NS have passed with nothing nearer. So does a
    /// received RST before the FIN its socket took (`before_taken_fin`): the kernel takes one
    /// there only while that FIN is unacknowledged (RCV.NXT - 1), and otherwise the RST that
    /// reset the socket comes after it.
    fn claim_waiting_packet(
        &mut self,
        id: u64,
        want: &Want,
        path: PathKey,
        mono_ns: u64,
        recent_only: bool,
    ) -> bool {
        let window = self.window_ns;
        let Some(entries) = self.packets.get_mut(&path) else {
            return false;
        };
        let fin_seq = taken_fin_seq(entries, want);
        let best = entries
            .iter_mut()
            .filter(|e| joinable(e, want, mono_ns, window))
            .filter(|e| {
                !recent_only
                    || (received_recently(want, e, mono_ns) && !before_taken_fin(e.seq, fin_seq))
            })
            .min_by_key(|e| {
                let ignored = before_taken_fin(e.seq, fin_seq);
                (ignored, preference(want, e.first_mono, mono_ns))
            });
        let Some(entry) = best else {
            return false;
        };
        let packet = entry.copy_for(want.dir).clone();
        entry.claim(want.dir, id);
        let packet_id = entry.id;
        let retransmission = entry.retransmit;
        let (segment, taken_at) = (entry.segment(), entry.first_mono);
        schedule_early_expiry(&mut self.early_order, entry, path);
        // Retransmissions of that segment the capture handed over before this event came
        // (a tail-loss probe milliseconds after the FIN): this event's to count, as when they
        // come after it, and no `packet` lines of their own. So are the copies before the one
        // it took (lost after the capture saw them: the receiver took a retransmission).
        let (mut later_copies, mut earlier_copies) = (0, 0);
        for e in entries
            .iter_mut()
            .filter(|e| e.id != packet_id && e.segment() == segment)
        {
            let later = e.first_mono > taken_at;
            if later && !e.retransmit {
                continue;
            }
            if later {
                later_copies += 1;
            } else {
                earlier_copies += 1;
            }
            if e.claimed[slot(want.dir)].is_none() {
                e.claim(want.dir, id);
                schedule_early_expiry(&mut self.early_order, e, path);
            }
        }
        self.attach(id, packet, packet_id, want.dir);
        if retransmission && earlier_copies == 0 {
            earlier_copies = 1; // one went before, its entry gone already
        }
        if let Some(w) = self.events.get_mut(&id).and_then(|e| e.wire.as_mut()) {
            w.retransmits += later_copies + earlier_copies;
        }
        true
    }

    fn attach(&mut self, id: u64, packet: WirePacket, packet_id: u64, role: Dir) {
        let Some(ev) = self.events.get_mut(&id) else {
            return;
        };
        let settle = settle_for(packet.flags, packet.only_copy, self.settle_ns);
        let release = ev.mono_ns.max(packet.mono_ns) + settle;
        ev.wire = Some(WireMatch {
            delay_ns: packet.mono_ns as i64 - ev.mono_ns as i64,
            packet,
            dir: role,
            retransmits: 0,
        });
        ev.packet_id = Some(packet_id);
        if release < ev.release_at {
            ev.release_at = release;
            let kind = if settle == 0 {
                Deadline::Joined
            } else {
                Deadline::Settled
            };
            self.timers.push(kind, release, id);
        }
    }

    pub fn push_packet(&mut self, pkt: WirePacket) {
        let path = PathKey::of(&pkt);
        // A capture that shows each packet once has no copies to merge: the same segment
        // again is another packet.
        if !pkt.only_copy && self.merge_copy(&path, &pkt) {
            return;
        }
        self.make_room();
        let id = self.id();
        // The kernel never retransmits a RST: the same RST again is another event's (an
        // orphan's TCP_ABORT_ON_DATA reset, then the listener's for the client's next segment:
        // same sequence number, both RST alone).
        let retransmit = pkt.flags & tcp_flags::RST == 0 && self.has_segment(&path, &pkt);
        let mut entry = PacketEntry::new(id, &pkt, retransmit);
        if retransmit {
            self.account_retransmission(&path, &pkt, &mut entry);
        }
        // A retransmission is for the receiving end only: the sender's event has the first
        // copy.
        let roles: &[Dir] = if retransmit {
            &[Dir::In]
        } else {
            &[Dir::Out, Dir::In]
        };
        for &role in roles {
            if entry.claimed[slot(role)].is_some() {
                continue;
            }
            if let Some(ev_id) = self.nearest_waiting(&path, &pkt, role) {
                self.unwait(&path, ev_id);
                let copy = entry.copy_for(role).clone();
                entry.claim(role, ev_id);
                self.attach(ev_id, copy, id, role);
                if retransmit {
                    self.count_earlier_copy(ev_id);
                }
            }
        }
        let expiry = self.deadline(pkt.mono_ns, self.hold_ns);
        self.packet_order.push_back((expiry, path, id));
        schedule_early_expiry(&mut self.early_order, &entry, path);
        self.packets.entry(path).or_default().push(entry);
        self.stored_packets += 1;
    }

    /// The packet's receiving end got a line of its own outside the joiner (the pipeline
    /// derived it from the wire): the entry then needs no more than one both ends claimed,
    /// and leaves as soon (under loopback FIN churn these held ~5 MB for the whole window).
    pub fn mark_received(&mut self, pkt: &WirePacket) {
        let path = PathKey::of(pkt);
        let Some(entry) = copy_of(&mut self.packets, &path, pkt) else {
            return;
        };
        if entry.claimed[slot(Dir::In)].is_none() {
            entry.claim(Dir::In, NO_EVENT);
            schedule_early_expiry(&mut self.early_order, entry, path);
        }
    }

    /// The last copy seen of `pkt` (where it reached its receiver: see `PacketEntry::copies`),
    /// if a later one than `pkt` is stored.
    pub fn last_copy(&mut self, pkt: &WirePacket) -> Option<WirePacket> {
        let entry = copy_of(&mut self.packets, &PathKey::of(pkt), pkt)?;
        entry.copies[1].as_deref().cloned()
    }

    /// A further copy of a packet already seen (interface `any`): the first copy is the
    /// sender's end's, the last the receiver's (see `PacketEntry::copies`). Returns whether
    /// `pkt` was such a copy.
    fn merge_copy(&mut self, path: &PathKey, pkt: &WirePacket) -> bool {
        let Some(entry) = copy_at_another_point(&mut self.packets, path, pkt) else {
            return false;
        };
        entry.points.push((pkt.iface.clone(), pkt.dir));
        let role = if pkt.mono_ns > entry.last_mono {
            entry.last_mono = pkt.mono_ns;
            Dir::In
        } else if pkt.mono_ns < entry.first_mono {
            entry.first_mono = pkt.mono_ns; // the capture handed it over late
            Dir::Out
        } else {
            return true; // between the two: a hop neither end is at
        };
        let s = slot(role);
        if !entry.fully_claimed() {
            entry.copies[s] = Some(Box::new(pkt.clone()));
        }
        // An event on that end joined another copy already: it takes this one (the receiver's
        // only if the copy came before its event: what reached the socket).
        if let Some(ev_id) = entry.claimed[s]
            && let Some(ev) = self.events.get_mut(&ev_id)
            && (role == Dir::Out || pkt.mono_ns <= ev.mono_ns + CAUSAL_SLACK_NS)
            && let Some(w) = ev.wire.as_mut()
        {
            w.delay_ns = pkt.mono_ns as i64 - ev.mono_ns as i64;
            w.packet = pkt.clone();
        }
        true
    }

    fn count_earlier_copy(&mut self, ev_id: u64) {
        if let Some(w) = self.events.get_mut(&ev_id).and_then(|e| e.wire.as_mut()) {
            w.retransmits += 1;
        }
    }

    /// Whether the same segment was seen before (beyond the duplicate threshold: a copy within
    /// it was merged already): this is a retransmission.
    fn has_segment(&self, path: &PathKey, pkt: &WirePacket) -> bool {
        self.packets
            .get(path)
            .is_some_and(|entries| entries.iter().any(|e| e.same_segment(pkt)))
    }

    /// A retransmitted copy `entry` (of `pkt`) is counted on the events that joined the first
    /// copy while they still wait to settle. The receiver's event takes this copy instead when
    /// it came before the event too: the copy that moved the socket is the last one before its
    /// event (the earlier one was lost on the way, after the capture saw it). A copy an event
    /// accounted for is claimed by it, so it is no `packet` line of its own; one no event saw
    /// is reported as a retransmission when its window ends.
    fn account_retransmission(
        &mut self,
        path: &PathKey,
        pkt: &WirePacket,
        entry: &mut PacketEntry,
    ) {
        let Some(original) = self
            .packets
            .get(path)
            .and_then(|entries| entries.iter().find(|e| e.same_segment(pkt)))
        else {
            return;
        };
        let claimers = original.claimed;
        for role in [Dir::Out, Dir::In] {
            let Some(ev_id) = claimers[slot(role)].filter(|&id| id != NO_EVENT) else {
                continue;
            };
            let Some(ev) = self.events.get_mut(&ev_id) else {
                continue; // released already
            };
            let mono_ns = ev.mono_ns;
            let Some(w) = ev.wire.as_mut() else {
                continue;
            };
            w.retransmits += 1;
            let moved_the_socket = role == Dir::In
                && pkt.mono_ns <= mono_ns + CAUSAL_SLACK_NS
                && pkt.mono_ns.abs_diff(mono_ns) < w.packet.mono_ns.abs_diff(mono_ns);
            if moved_the_socket {
                w.delay_ns = pkt.mono_ns as i64 - mono_ns as i64;
                w.packet = entry.copy_for(Dir::In).clone();
                ev.packet_id = Some(entry.id);
            }
            entry.claim(role, ev_id);
        }
    }

    fn nearest_waiting(&self, path: &PathKey, pkt: &WirePacket, role: Dir) -> Option<u64> {
        let stored = self
            .packets
            .get(path)
            .map_or(&[][..], |entries| &entries[..]);
        self.waiting
            .get(path)?
            .iter()
            .filter_map(|id| Some((*id, self.events.get(id)?)))
            .filter(|(_, e)| {
                e.wire.is_none()
                    && e.want.as_ref().is_some_and(|w| {
                        w.dir == role
                            && w.matches(pkt.flags)
                            && in_causal_order(w, pkt.mono_ns, e.mono_ns)
                            && !before_taken_fin(pkt.seq, taken_fin_seq(stored, w))
                    })
                    && e.mono_ns.abs_diff(pkt.mono_ns) <= self.window_ns
            })
            .min_by_key(|(_, e)| e.mono_ns.abs_diff(pkt.mono_ns))
            .map(|(id, _)| id)
    }

    fn unwait(&mut self, path: &PathKey, id: u64) {
        // One lookup for both the change and the removal of an emptied list.
        if let Entry::Occupied(mut ids) = self.waiting.entry(*path) {
            ids.get_mut().retain(|x| *x != id);
            if ids.get().is_empty() {
                ids.remove();
            }
        }
    }

    /// Everything ready at `now`: joined events past their settle time, events whose window
    /// expired, events that never wanted a packet; packets nobody claimed in their window.
    #[cfg(test)]
    pub fn poll(&mut self, now_mono_ns: u64) -> Vec<Joined<T>> {
        let mut out = Vec::new();
        self.poll_into(now_mono_ns, &mut out);
        out
    }

    /// `poll`, appending to `out`: the daemon keeps one vector for every turn instead of
    /// growing a new one (the reallocations showed in its profile).
    pub fn poll_into(&mut self, now_mono_ns: u64, out: &mut Vec<Joined<T>>) {
        out.append(&mut self.out);
        while let Some((queue, at, id)) = self.timers.earliest(&self.events) {
            if at > now_mono_ns {
                break;
            }
            self.timers.pop(queue);
            if queue == Deadline::WindowEnd as usize {
                self.claim_at_window_end(id);
            }
            if let Some(ev) = self.events.get_mut(&id) {
                ev.ready = true;
                let conn = ev.conn;
                self.release_ready_front(conn, out);
            }
        }
        self.expire_packets(now_mono_ns, out);
    }

    /// An event still without its packet when its wait ends (its window, or the grace for a
    /// nearer copy: see `push_event`) takes one that came long before it, if that is all there
    /// is (see `claim_waiting_packet`).
    fn claim_at_window_end(&mut self, id: u64) {
        let Some(ev) = self.events.get(&id) else {
            return;
        };
        let Some(want) = ev.want.clone().filter(|_| ev.wire.is_none()) else {
            return;
        };
        let (path, mono_ns) = (want.path(), ev.mono_ns);
        if self.claim_waiting_packet(id, &want, path, mono_ns, false) {
            self.unwait(&path, id);
        }
    }

    /// Releases the ready events at the front of a connection's queue, in order.
    fn release_ready_front(&mut self, conn: u64, out: &mut Vec<Joined<T>>) {
        loop {
            let Some(queue) = self.by_conn.get_mut(&conn) else {
                return;
            };
            let Some(&front) = queue.first() else {
                self.by_conn.remove(&conn);
                return;
            };
            if !self.events.get(&front).is_some_and(|e| e.ready) {
                return;
            }
            queue.remove(0);
            self.release(front, out);
        }
    }

    fn release(&mut self, id: u64, out: &mut Vec<Joined<T>>) {
        let Some(ev) = self.events.remove(&id) else {
            return;
        };
        if let Some(want) = &ev.want
            && ev.wire.is_none()
        {
            self.unwait(&want.path(), id);
        }
        out.push(Joined::Event(ev));
    }

    fn expire_packets(&mut self, now: u64, out: &mut Vec<Joined<T>>) {
        for early in [true, false] {
            loop {
                let queue = if early {
                    &mut self.early_order
                } else {
                    &mut self.packet_order
                };
                let Some(&(expiry, path, id)) = queue.front() else {
                    break;
                };
                if expiry > now {
                    break;
                }
                queue.pop_front();
                let Some(entry) = self.remove_packet(&path, id) else {
                    continue; // gone already, through the other queue
                };
                match entry.claimed {
                    [None, None] => out.push(Joined::Packet {
                        packet: entry.any_copy().clone(),
                        retransmit: entry.retransmit,
                    }),
                    // For the receiving end the pipeline may derive: the last copy.
                    [Some(_), None] => out.push(Joined::Unreceived {
                        packet: entry.copy_for(Dir::In).clone(),
                        retransmit: entry.retransmit,
                    }),
                    _ => {}
                }
            }
        }
    }

    fn remove_packet(&mut self, path: &PathKey, id: u64) -> Option<PacketEntry> {
        let Entry::Occupied(mut entries) = self.packets.entry(*path) else {
            return None;
        };
        let pos = entries.get().iter().position(|e| e.id == id)?;
        let entry = entries.get_mut().swap_remove(pos);
        if entries.get().is_empty() {
            entries.remove();
        }
        self.stored_packets -= 1;
        Some(entry)
    }

    /// Everything, at exit: events with what they have, unclaimed packets as packets.
    pub fn flush(&mut self) -> Vec<Joined<T>> {
        let mut out = std::mem::take(&mut self.out);
        let mut ids: Vec<(u64, u64)> = self.events.iter().map(|(id, e)| (e.mono_ns, *id)).collect();
        ids.sort_unstable();
        for ev in self.events.values_mut() {
            ev.ready = true;
        }
        let conns: Vec<u64> = ids
            .iter()
            .filter_map(|(_, id)| self.events.get(id).map(|e| e.conn))
            .collect();
        for conn in conns {
            self.release_ready_front(conn, &mut out);
        }
        self.timers.clear();
        self.expire_packets(u64::MAX, &mut out);
        out
    }

    /// Keeps events plus packets under the bound: the oldest packet is dropped, or the oldest
    /// event goes out now without waiting for its packet. Both are counted.
    fn make_room(&mut self) {
        let stored = self.events.len() + self.stored_packets;
        if stored < self.max_pending {
            return;
        }
        self.dropped += 1;
        while let Some((_, path, id)) = self.packet_order.pop_front() {
            if self.remove_packet(&path, id).is_some() {
                return;
            }
        }
        if let Some((queue, _, id)) = self.timers.earliest(&self.events) {
            let conn = self.events.get(&id).map(|e| e.conn);
            if let Some(ev) = self.events.get_mut(&id) {
                ev.ready = true;
            }
            self.timers.pop(queue);
            if let Some(conn) = conn {
                let mut out = std::mem::take(&mut self.out);
                // Release this connection's events up to and including this one (into `out`,
                // which the next poll hands over).
                if let Some(queue) = self.by_conn.get(&conn).cloned() {
                    for e in queue {
                        if let Some(ev) = self.events.get_mut(&e) {
                            ev.ready = true;
                        }
                        if e == id {
                            break;
                        }
                    }
                }
                self.release_ready_front(conn, &mut out);
                self.out = out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const W: Duration = Duration::from_millis(500);
    const MS: u64 = 1_000_000;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pkt(src: &str, dst: &str, flags: u8, seq: u32, mono: u64, dir: Dir) -> WirePacket {
        WirePacket {
            mono_ns: mono,
            wall_ns: mono + 1_000_000_000_000,
            src: a(src),
            dst: a(dst),
            flags,
            seq,
            data_end: seq,
            ack: 7,
            iface: Arc::from("lo"),
            on_loopback: true,
            dir,
            headers: Arc::from(&[][..]),
            only_copy: false,
        }
    }

    fn want(local: &str, remote: &str, flag: WantFlag, dir: Dir) -> Option<Want> {
        Some(Want {
            local: a(local),
            remote: a(remote),
            flag,
            dir,
            ack: None,
            peer_fin_taken: false,
        })
    }

    const C: &str = "10.0.0.1:40000";
    const S: &str = "10.0.0.2:80";
    const FIN: u8 = tcp_flags::FIN | tcp_flags::ACK;
    const RST: u8 = tcp_flags::RST;

    fn events(out: Vec<Joined<&'static str>>) -> Vec<(&'static str, Option<WireMatch>)> {
        out.into_iter()
            .filter_map(|j| match j {
                Joined::Event(ev) => Some((ev.item, ev.wire)),
                Joined::Packet { .. } | Joined::Unreceived { .. } => None,
            })
            .collect()
    }

    fn packets(out: &[Joined<&'static str>]) -> Vec<(WirePacket, bool)> {
        out.iter()
            .filter_map(|j| match j {
                Joined::Packet { packet, retransmit } => Some((packet.clone(), *retransmit)),
                Joined::Event(_) | Joined::Unreceived { .. } => None,
            })
            .collect()
    }

    /// A keep-alive race: the server closes (FIN, seq 100), the pool has read the FIN and
    /// writes; the server's orphan resets (TCP_ABORT_ON_DATA, seq 100: out of the pool's
    /// window, ignored), the pool closes, and the listener answers its FIN with a RST at 101,
    /// which resets the pool (LAST_ACK -> CLOSE). The pool's `rst_received` joins the RST at
    /// 101, whether its event comes before the packets or after them.
    #[test]
    fn a_received_rst_is_not_one_before_the_fin_its_socket_took() {
        let rst_received = || {
            want(C, S, WantFlag::Rst, Dir::In).map(|w| Want {
                peer_fin_taken: true,
                ..w
            })
        };
        for event_first in [false, true] {
            let mut j = Joiner::new(W, 1000);
            j.push_packet(pkt(S, C, FIN, 100, 100 * MS, Dir::In));
            if event_first {
                j.push_event(1, 100 * MS + 130_000, rst_received(), "rst_received");
            }
            j.push_packet(pkt(S, C, RST, 100, 100 * MS + 80_000, Dir::In));
            j.push_packet(pkt(S, C, RST, 101, 100 * MS + 110_000, Dir::In));
            if !event_first {
                j.push_event(1, 100 * MS + 130_000, rst_received(), "rst_received");
            }
            let out = events(j.poll(2_000 * MS));
            let wire = out[0].1.as_ref().expect("joined");
            assert_eq!(wire.packet.seq, 101, "event first: {event_first}");
        }
        // The FIN not yet acknowledged, the kernel takes a RST at its sequence number: when
        // no other comes, that one.
        let mut j = Joiner::new(W, 1000);
        j.push_packet(pkt(S, C, FIN, 100, 100 * MS, Dir::In));
        j.push_packet(pkt(S, C, RST, 100, 100 * MS + 10_000, Dir::In));
        j.push_event(1, 100 * MS + 30_000, rst_received(), "rst_received");
        let out = events(j.poll(2_000 * MS));
        assert_eq!(out[0].1.as_ref().expect("joined").packet.seq, 100);
    }

    #[test]
    fn event_then_packet_joins_and_waits_to_settle() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_packet(pkt(C, S, FIN, 5, 100 * MS + 14_000, Dir::Out));
        assert!(j.poll(101 * MS).is_empty(), "settling");
        let out = events(j.poll(130 * MS));
        assert_eq!(out.len(), 1);
        let w = out[0].1.as_ref().unwrap();
        assert_eq!(w.delay_ns, 14_000);
        assert_eq!(w.dir, Dir::Out);
        assert_eq!(w.packet.seq, 5);
        assert_eq!(j.pending(), 0);
    }

    /// The peer's FIN was captured, lost on its way to our socket (a firewall after the
    /// capture point), and retransmitted, with no sender's event on this host (a remote peer,
    /// unlike `a_receiver_in_after_the_retransmission_counts_the_lost_copy`): the socket's
    /// event takes the retransmission, the copy that moved it, and counts the first; that first
    /// copy is no `packet` line of its own (it was one, `retransmit: true`, so the capture's
    /// two copies read as three).
    #[test]
    fn a_receiver_that_took_a_retransmission_claims_the_lost_copy_too() {
        let mut j = Joiner::new(W, 1000);
        j.push_packet(pkt(S, C, FIN, 5, 100 * MS, Dir::In));
        j.push_packet(pkt(S, C, FIN, 5, 300 * MS, Dir::In));
        j.push_event(
            1,
            300 * MS + 10_000,
            want(C, S, WantFlag::Fin, Dir::In),
            "fin_received",
        );
        let out = j.poll(5_000 * MS);
        assert!(packets(&out).is_empty(), "{:?}", packets(&out));
        let out = events(out);
        assert_eq!(out.len(), 1);
        let wire = out[0].1.as_ref().unwrap();
        assert_eq!(wire.delay_ns, -10_000, "took the retransmission");
        assert_eq!(wire.retransmits, 1);
    }

    /// A daemon stalled for longer than the window (SIGSTOP, starved of CPU) reads a close and
    /// then, in a later turn, its RST from the capture: both are past their window by then,
    /// and each still waits DELIVERY_LAG_NS from its delivery for the other. Before, the close
    /// left at the first poll unjoined and the RST became a `packet` line, 30 µs apart.
    #[test]
    fn after_a_stall_an_event_and_its_packet_still_join() {
        let mut j = Joiner::new(W, 1000);
        let resumed = 2_000 * MS;
        j.delivered_at(resumed);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Rst, Dir::Out), "close");
        assert!(
            j.poll(resumed + MS).is_empty(),
            "waits for the capture's turn"
        );
        j.delivered_at(resumed + 2 * MS);
        let mut rst = pkt(C, S, RST, 9, 100 * MS + 30_000, Dir::Out);
        rst.only_copy = true;
        j.push_packet(rst);
        let out = j.poll(resumed + 3 * MS);
        assert!(
            out.iter().all(|o| !matches!(o, Joined::Packet { .. })),
            "no packet line"
        );
        let out = events(out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1.as_ref().unwrap().delay_ns, 30_000);
        // What waits in vain still leaves: DELIVERY_LAG_NS after its delivery.
        j.push_event(2, 200 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        assert!(j.poll(resumed + 50 * MS).is_empty());
        let out = events(j.poll(resumed + 2 * MS + DELIVERY_LAG_NS));
        assert_eq!(out.len(), 1);
        assert!(out[0].1.is_none());
    }

    /// A RST the capture shows once has nothing to settle for: the event leaves at the
    /// packet's time, not behind a FIN join that settles (its own deadline queue).
    #[test]
    fn a_rst_seen_once_leaves_at_once_and_a_fin_still_settles() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        let mut fin = pkt(C, S, FIN, 5, 100 * MS + 10_000, Dir::Out);
        fin.only_copy = true;
        j.push_packet(fin);
        let (c2, s2) = ("10.0.0.1:40001", "10.0.0.2:80");
        let close = want(c2, s2, WantFlag::Rst, Dir::Out);
        j.push_event(2, 100 * MS + 20_000, close, "close");
        let received = want(s2, c2, WantFlag::Rst, Dir::In);
        j.push_event(3, 100 * MS + 25_000, received, "rst_received");
        let mut rst = pkt(c2, s2, RST, 9, 100 * MS + 30_000, Dir::Out);
        rst.only_copy = true;
        j.push_packet(rst);
        let out = events(j.poll(100 * MS + 30_000));
        assert_eq!(out.len(), 2, "the RST's two ends, at once");
        assert!(out.iter().all(|(_, w)| w.as_ref().unwrap().packet.seq == 9));
        assert_eq!(
            j.stored_packets, 1,
            "only the FIN is kept (for its retransmissions)"
        );
        assert!(j.poll(101 * MS).is_empty(), "the FIN's close settles");
        assert_eq!(events(j.poll(130 * MS)).len(), 1);
    }

    /// Where another copy may follow (`any`), a RST join settles as before, for the copies to
    /// be merged.
    #[test]
    fn a_rst_that_may_have_copies_settles() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Rst, Dir::Out), "close");
        j.push_packet(pkt(C, S, RST, 9, 100 * MS + 10_000, Dir::In));
        assert!(j.poll(101 * MS).is_empty(), "settling");
        j.push_packet(pkt(C, S, RST, 9, 100 * MS + 12_000, Dir::Out));
        let out = events(j.poll(130 * MS));
        // The second copy came in while it settled (and was merged: no packet line); the
        // sender keeps the first sighting, where the packet left its side.
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1.as_ref().unwrap().delay_ns, 10_000);
    }

    /// Between two namespaces on a bridge, `any` sees a packet on the sender's veth, then on
    /// the receiver's: the sender's line names the first, the receiver's the last (each took
    /// the copy seen "its way" by the capture's direction, which from the root namespace is
    /// the other end's veth).
    #[test]
    fn on_a_bridge_each_end_takes_the_copy_at_its_own_veth() {
        let mut j = Joiner::new(W, 1000);
        let at = |iface: &str, mono, dir| WirePacket {
            iface: Arc::from(iface),
            ..pkt(C, S, FIN, 5, mono, dir)
        };
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_packet(at("veth-a", 100 * MS + 10_000, Dir::In));
        j.push_packet(at("veth-b", 100 * MS + 14_000, Dir::Out));
        j.push_event(
            2,
            100 * MS + 30_000,
            want(S, C, WantFlag::Fin, Dir::In),
            "fin_received",
        );
        let ev = events(j.poll(900 * MS));
        let iface = |name: &str| {
            let w = ev.iter().find(|e| e.0 == name).unwrap().1.clone().unwrap();
            (w.packet.iface.to_string(), w.delay_ns)
        };
        assert_eq!(iface("close"), ("veth-a".into(), 10_000));
        assert_eq!(iface("fin_received"), ("veth-b".into(), -16_000));
    }

    /// On `any`, a FIN sent again within milliseconds (a tail-loss probe) is seen where the
    /// first copy was: a retransmission, counted on the close that joined the first, not a
    /// copy merged into it (which counted it nowhere and gave it no line). A copy at another
    /// interface within the same time is still the same packet.
    #[test]
    fn a_fin_sent_again_within_milliseconds_at_the_same_point_is_a_retransmission() {
        let at = |iface: &str, mono| WirePacket {
            iface: Arc::from(iface),
            on_loopback: false,
            ..pkt(C, S, FIN, 5, mono, Dir::In)
        };
        // The close's event comes before the packets, or after both (the ring buffer and the
        // capture deliver on their own schedules).
        for event_first in [true, false] {
            let mut j = Joiner::new(W, 1000);
            let close = || want(C, S, WantFlag::Fin, Dir::Out);
            if event_first {
                j.push_event(1, 100 * MS, close(), "close");
            }
            j.push_packet(at("veth-a", 100 * MS + 10_000));
            j.push_packet(at("br0", 100 * MS + 12_000));
            j.push_packet(at("veth-a", 104 * MS + 600_000));
            j.push_packet(at("br0", 104 * MS + 602_000));
            if !event_first {
                j.push_event(1, 100 * MS, close(), "close");
            }
            let out = j.poll(900 * MS);
            assert!(packets(&out).is_empty(), "claimed by the close");
            let ev = events(out);
            assert_eq!(ev.len(), 1);
            let w = ev[0].1.as_ref().expect("joined");
            let joined = (&*w.packet.iface, w.retransmits);
            assert_eq!(joined, ("veth-a", 1), "event first: {event_first}");
        }
    }

    /// A tail-loss probe sends the last segment's worth of data again with the FIN: another
    /// sequence number, the same FIN (where the data ends). A retransmission, counted on the
    /// close that joined the first, not a `packet` line of a FIN never seen.
    #[test]
    fn a_fin_sent_again_with_less_data_before_it_is_the_same_fin() {
        let mut j = Joiner::new(W, 1000);
        let with_data = |seq, len, mono| WirePacket {
            data_end: seq + len,
            only_copy: true,
            ..pkt(C, S, FIN, seq, mono, Dir::Out)
        };
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_packet(with_data(1000, 13_664, 100 * MS + 10_000));
        j.push_packet(with_data(14_032, 632, 120 * MS));
        let out = j.poll(900 * MS);
        assert!(packets(&out).is_empty(), "{:?}", packets(&out));
        let ev = events(out);
        let w = ev[0].1.as_ref().expect("joined");
        assert_eq!((w.packet.seq, w.retransmits), (1000, 1));
    }

    /// A client's close sends its RST (an active reset: RST+ACK), and the kernel answers the
    /// server's next segment for the closed socket with a second RST of the same sequence
    /// number (RST alone: the segment carried ACK). The answer's event is nearer in time to
    /// the first packet; each still joins its own, by the ACK flag (they were crosswise).
    #[test]
    fn two_resets_of_one_connection_join_by_their_ack_flag() {
        let mut j = Joiner::new(W, 1000);
        let (active, answer) = (RST | tcp_flags::ACK, RST);
        j.push_packet(pkt(C, S, active, 9, 100 * MS + 10_000, Dir::Out));
        j.push_packet(pkt(C, S, answer, 9, 100 * MS + 21_000, Dir::Out));
        let wants = |ack| want(C, S, WantFlag::Rst, Dir::Out).map(|w| Want { ack, ..w });
        j.push_event(2, 100 * MS + 10_300, wants(Some(false)), "rst_sent");
        j.push_event(1, 100 * MS, wants(Some(true)), "close");
        let out = events(j.poll(200 * MS));
        let flags_of = |name| {
            let (_, wire) = out.iter().find(|(n, _)| *n == name).unwrap();
            wire.as_ref().expect("joined").packet.flags
        };
        assert_eq!(flags_of("close"), active, "{out:?}");
        assert_eq!(flags_of("rst_sent"), answer, "{out:?}");
    }

    /// The server's socket is reset by the first of two RSTs the client end sent microseconds
    /// apart (its close's, then the kernel's answer to the server's next segment); the event
    /// came after both: it joins the first, not the one nearer in time.
    #[test]
    fn a_received_reset_joins_the_first_of_two_that_came_before_it() {
        let mut j = Joiner::new(W, 1000);
        j.push_packet(pkt(C, S, RST | tcp_flags::ACK, 9, 100 * MS, Dir::In));
        j.push_packet(pkt(C, S, RST, 9, 100 * MS + 7_000, Dir::In));
        let received = want(S, C, WantFlag::Rst, Dir::In);
        j.push_event(1, 100 * MS + 20_000, received, "rst_received");
        let out = events(j.poll(200 * MS));
        let wire = out[0].1.as_ref().expect("joined");
        assert_eq!(wire.packet.flags, RST | tcp_flags::ACK, "{out:?}");
    }

    /// On one interface the capture shows each packet once: the same RST twice (an orphan's
    /// TCP_ABORT_ON_DATA reset, then the listener's answer to the client's next segment, both
    /// RST alone with one sequence number) is two packets, one for each event. It was taken
    /// for a copy of the first, and the listener's line had `wire: null`.
    #[test]
    fn the_same_reset_twice_on_one_interface_is_two_packets() {
        let mut j = Joiner::new(W, 1000);
        let once = |mono| WirePacket {
            only_copy: true,
            on_loopback: false,
            ..pkt(C, S, RST, 9, mono, Dir::Out)
        };
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Rst, Dir::Out), "orphan");
        j.push_packet(once(100 * MS + 2_000));
        j.push_event(
            2,
            100 * MS + 18_000,
            want(C, S, WantFlag::Rst, Dir::Out),
            "listener",
        );
        j.push_packet(once(100 * MS + 20_000));
        let out = events(j.poll(200 * MS));
        let delays: Vec<_> = out
            .iter()
            .map(|(n, w)| (*n, w.as_ref().map(|w| w.delay_ns)))
            .collect();
        assert_eq!(
            delays,
            [("orphan", Some(2_000)), ("listener", Some(2_000))],
            "{out:?}"
        );
    }

    #[test]
    fn packet_before_event_joins() {
        let mut j = Joiner::new(W, 1000);
        j.push_packet(pkt(S, C, RST, 9, 100 * MS, Dir::In));
        j.push_event(
            1,
            100 * MS + 3_000,
            want(C, S, WantFlag::Rst, Dir::In),
            "rst_received",
        );
        let out = events(j.poll(200 * MS));
        assert_eq!(out[0].1.as_ref().unwrap().delay_ns, -3_000);
        assert!(
            packets(&j.poll(2000 * MS)).is_empty(),
            "a claimed packet is not a packet line"
        );
    }

    #[test]
    fn window_expiry_releases_events_and_packets() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_packet(pkt("10.9.9.9:1", "10.9.9.8:2", FIN, 1, 100 * MS, Dir::In));
        assert!(j.poll(599 * MS).is_empty());
        let out = j.poll(600 * MS);
        assert_eq!(packets(&out).len(), 1);
        let ev = events(out);
        assert_eq!(ev.len(), 1);
        assert!(ev[0].1.is_none());
    }

    #[test]
    fn kind_and_direction_must_match() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_packet(pkt(C, S, RST, 1, 100 * MS, Dir::Out)); // wrong kind
        j.push_packet(pkt(S, C, FIN, 2, 100 * MS, Dir::In)); // wrong direction
        let out = j.poll(700 * MS);
        assert_eq!(packets(&out).len(), 2);
        assert!(events(out)[0].1.is_none());
    }

    /// Under churn a 4-tuple comes back within the window: a packet of an earlier connection
    /// whose event never came (it closed while the hooks were being attached) is not the
    /// close's, which sends its own after the call; nor is a later packet what moved a socket.
    #[test]
    fn a_packet_on_the_wrong_side_of_its_event_is_another_connections() {
        let mut j = Joiner::new(W, 1000);
        j.push_packet(pkt(C, S, RST, 1, 100 * MS, Dir::Out));
        j.push_event(1, 258 * MS, want(C, S, WantFlag::Rst, Dir::Out), "close");
        j.push_packet(pkt(C, S, RST, 2, 258 * MS + 3_000, Dir::Out));
        j.push_event(
            2,
            260 * MS,
            want(S, C, WantFlag::Fin, Dir::In),
            "fin_received",
        );
        j.push_packet(pkt(C, S, FIN, 3, 400 * MS, Dir::Out));
        let out = j.poll(2000 * MS);
        let seqs: Vec<u32> = packets(&out).iter().map(|(p, _)| p.seq).collect();
        let ev = events(out);
        assert_eq!(ev[0].1.as_ref().unwrap().packet.seq, 2, "its own RST");
        assert!(
            ev[1].1.is_none(),
            "a FIN 140 ms after the move is not its cause"
        );
        assert_eq!(seqs, [1, 3], "both others are packets of their own");
    }

    /// `--join-window 1ms`: the packet, captured 10 µs after the close, comes through the
    /// capture milliseconds later; the event waits for it that long (the window bounds the
    /// two times' distance, not the delivery). It was released unjoined at 1 ms.
    #[test]
    fn a_short_window_still_waits_for_the_delivery() {
        let mut j = Joiner::new(Duration::from_millis(1), 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        assert!(events(j.poll(112 * MS)).is_empty());
        j.push_packet(pkt(C, S, FIN, 5, 100 * MS + 10_000, Dir::Out));
        j.push_packet(pkt(C, S, FIN, 6, 103 * MS, Dir::Out)); // 3 ms off: not its packet
        let out = j.poll(400 * MS);
        assert_eq!(
            packets(&out).len(),
            1,
            "the other one is a packet of its own"
        );
        let ev = events(out);
        assert_eq!(ev[0].1.as_ref().unwrap().delay_ns, 10_000);
    }

    #[test]
    fn nearest_in_time_wins() {
        let mut j = Joiner::new(W, 1000);
        j.push_packet(pkt(C, S, FIN, 1, 100 * MS, Dir::Out));
        j.push_packet(pkt(C, S, FIN, 2, 300 * MS, Dir::Out));
        j.push_event(1, 290 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        let out = j.poll(900 * MS);
        assert_eq!(events(out)[0].1.as_ref().unwrap().packet.seq, 2);
    }

    #[test]
    fn both_local_ends_share_one_packet_and_duplicates_collapse() {
        let mut j = Joiner::new(W, 1000);
        // The sender's close and the receiver's fin_received, both on this host.
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_event(
            2,
            100 * MS + 2_000,
            want(S, C, WantFlag::Fin, Dir::In),
            "fin_received",
        );
        // Interface `any` shows the loopback packet twice: out, then in.
        j.push_packet(pkt(C, S, FIN, 5, 100 * MS + 1_000, Dir::Out));
        j.push_packet(pkt(C, S, FIN, 5, 100 * MS + 1_500, Dir::In));
        let out = j.poll(900 * MS);
        assert!(packets(&out).is_empty(), "a duplicate is not a packet line");
        let ev = events(out);
        assert_eq!(ev.len(), 2);
        let close = ev
            .iter()
            .find(|e| e.0 == "close")
            .unwrap()
            .1
            .clone()
            .unwrap();
        let fin = ev
            .iter()
            .find(|e| e.0 == "fin_received")
            .unwrap()
            .1
            .clone()
            .unwrap();
        assert_eq!((close.dir, close.packet.dir), (Dir::Out, Dir::Out));
        assert_eq!((fin.dir, fin.packet.dir), (Dir::In, Dir::In));
        assert_eq!(fin.delay_ns, -500);
        assert_eq!(close.retransmits + fin.retransmits, 0);
    }

    #[test]
    fn retransmissions_are_counted_or_reported() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_packet(pkt(C, S, FIN, 5, 100 * MS, Dir::Out));
        j.push_packet(pkt(C, S, FIN, 5, 110 * MS, Dir::Out)); // before release: counted
        let out = events(j.poll(200 * MS));
        assert_eq!(out[0].1.as_ref().unwrap().retransmits, 1);
        j.push_packet(pkt(C, S, FIN, 5, 300 * MS, Dir::Out)); // after release: reported
        let out = j.poll(2000 * MS);
        let p = packets(&out);
        assert_eq!(p.len(), 1, "once, and the counted copy not at all");
        assert!(p[0].1, "marked as a retransmission");
        assert_eq!(p[0].0.mono_ns, 300 * MS);
    }

    /// The same, with the receiver's event in after the retransmission came through the
    /// capture: it joins it, and counts the copy that went before.
    #[test]
    fn a_receiver_in_after_the_retransmission_counts_the_lost_copy() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(S, C, WantFlag::Fin, Dir::Out), "close");
        j.push_packet(pkt(S, C, FIN, 5, 100 * MS + 8_000, Dir::In));
        j.push_packet(pkt(S, C, FIN, 5, 305 * MS, Dir::In));
        j.push_event(
            2,
            305 * MS + 20_000,
            want(C, S, WantFlag::Fin, Dir::In),
            "fin_received",
        );
        let out = j.poll(2000 * MS);
        assert!(packets(&out).is_empty(), "{:?}", packets(&out));
        let ev = events(out);
        let w = ev[1].1.as_ref().unwrap();
        assert_eq!((w.delay_ns, w.retransmits), (-20_000, 1));
    }

    /// A received FIN long before its event (the socket's owner held it that long) is still
    /// its packet when nothing nearer comes: taken after a grace for a retransmission.
    #[test]
    fn a_received_fin_long_before_its_event_joins_when_nothing_nearer_came() {
        let mut j = Joiner::new(W, 1000);
        j.push_packet(pkt(S, C, FIN, 5, 100 * MS, Dir::In));
        j.push_event(
            1,
            130 * MS,
            want(C, S, WantFlag::Fin, Dir::In),
            "fin_received",
        );
        assert!(
            events(j.poll(229 * MS)).is_empty(),
            "waits for a nearer copy"
        );
        let ev = events(j.poll(231 * MS));
        assert_eq!(ev[0].1.as_ref().unwrap().delay_ns, -30 * MS as i64);
    }

    /// A FIN lost after the capture saw it (a drop on the receiving host) is sent again after
    /// the retransmission timeout: the copy that reached the socket is the one just before the
    /// receiver's event, even when the event is in before that copy is. Both ends' events
    /// account for it: no `packet` line.
    #[test]
    fn the_receiver_joins_the_retransmitted_copy_that_reached_it() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(S, C, WantFlag::Fin, Dir::Out), "close");
        j.push_packet(pkt(S, C, FIN, 5, 100 * MS + 8_000, Dir::In)); // lost after the tap
        let out = events(j.poll(150 * MS));
        assert_eq!(
            out[0].1.as_ref().unwrap().retransmits,
            0,
            "the sender's line left"
        );
        // The receiver's event comes before its copy does (the capture is slower).
        j.push_event(
            2,
            305 * MS + 20_000,
            want(C, S, WantFlag::Fin, Dir::In),
            "fin_received",
        );
        j.push_packet(pkt(S, C, FIN, 5, 305 * MS, Dir::In));
        let out = j.poll(2000 * MS);
        assert!(packets(&out).is_empty(), "{:?}", packets(&out));
        let ev = events(out);
        let w = ev[0].1.as_ref().unwrap();
        assert_eq!(w.delay_ns, -20_000, "the copy that reached it");
        assert_eq!(w.retransmits, 1, "an earlier copy went before");
    }

    #[test]
    fn events_of_one_connection_keep_their_order() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_event(1, 101 * MS, None, "state");
        j.push_event(2, 101 * MS, None, "other-conn");
        let out = events(j.poll(102 * MS));
        assert_eq!(out.iter().map(|e| e.0).collect::<Vec<_>>(), ["other-conn"]);
        j.push_packet(pkt(C, S, FIN, 5, 103 * MS, Dir::Out));
        let out = events(j.poll(200 * MS));
        assert_eq!(
            out.iter().map(|e| e.0).collect::<Vec<_>>(),
            ["close", "state"]
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_matches_ipv4() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(
            1,
            100 * MS,
            want(
                "[::ffff:10.0.0.1]:40000",
                "[::ffff:10.0.0.2]:80",
                WantFlag::Fin,
                Dir::Out,
            ),
            "close",
        );
        j.push_packet(pkt(C, S, FIN, 5, 100 * MS, Dir::Out));
        assert!(events(j.poll(200 * MS))[0].1.is_some());
    }

    #[test]
    fn ipv6_joins() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(
            1,
            100 * MS,
            want("[fd00::1]:5000", "[fd00::2]:80", WantFlag::Rst, Dir::Out),
            "close",
        );
        j.push_packet(pkt(
            "[fd00::1]:5000",
            "[fd00::2]:80",
            RST,
            5,
            100 * MS,
            Dir::Out,
        ));
        assert!(events(j.poll(200 * MS))[0].1.is_some());
    }

    #[test]
    fn clock_offset_change_within_the_window_still_joins() {
        // The capture converted the packet's wall time with an offset re-measured after an NTP
        // step of 50 ms: its mono time is off by 50 ms, still inside the window.
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_packet(pkt(C, S, FIN, 5, 150 * MS, Dir::Out));
        let out = events(j.poll(700 * MS));
        assert_eq!(out[0].1.as_ref().unwrap().delay_ns, 50 * MS as i64);
    }

    #[test]
    fn overflow_is_counted_and_loses_no_event() {
        let mut j = Joiner::new(W, 10);
        for i in 0..20u64 {
            j.push_event(i, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        }
        assert_eq!(j.overflow_dropped(), 10);
        let mut released = events(j.poll(100 * MS)).len();
        released += events(j.flush()).len();
        assert_eq!(released, 20, "events are released early, never lost");
        assert_eq!(j.pending(), 0);
    }

    #[test]
    fn burst_of_thousands_all_join_quickly() {
        let mut j = Joiner::new(W, 100_000);
        let started = std::time::Instant::now();
        for i in 0..5000u16 {
            let local = format!("10.0.0.1:{}", 10000 + i);
            j.push_event(
                i as u64,
                100 * MS,
                want(&local, S, WantFlag::Rst, Dir::Out),
                "close",
            );
        }
        for i in 0..5000u16 {
            let local = format!("10.0.0.1:{}", 10000 + i);
            j.push_packet(pkt(&local, S, RST, i as u32, 100 * MS + 10_000, Dir::Out));
        }
        let out = j.poll(200 * MS);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "linear, not quadratic"
        );
        let ev = events(out);
        assert_eq!(ev.len(), 5000);
        assert!(ev.iter().all(|e| e.1.is_some()));
        assert!(packets(&j.flush()).is_empty());
    }

    #[test]
    fn flush_releases_everything() {
        let mut j = Joiner::new(W, 1000);
        j.push_event(1, 100 * MS, want(C, S, WantFlag::Fin, Dir::Out), "close");
        j.push_event(1, 100 * MS, None, "state");
        j.push_packet(pkt("10.9.9.9:1", "10.9.9.8:2", FIN, 1, 100 * MS, Dir::In));
        let out = j.flush();
        assert_eq!(packets(&out).len(), 1);
        assert_eq!(
            events(out).iter().map(|e| e.0).collect::<Vec<_>>(),
            ["close", "state"]
        );
    }
}
