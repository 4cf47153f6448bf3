//! The connections the daemon remembers after their events: who owned them, when their socket
//! went to its time-wait form, which FINs they saw. Late packets and ownerless kernel events
//! (a TIME_WAIT socket's RST, a FIN_WAIT2 timeout, the peer's FIN reaching the time-wait form)
//! are named from here.
//!
//! Laid out for churn, where every connection is inserted, looked up a few times and forgotten
//! within a fraction of a second, long after it left the CPU's cache: records sit in a slab
//! whose freed slots are reused last-freed first (still cached when the next connection takes
//! them), and both indexes map to a slot number, in 16-byte buckets. With the records in the
//! hash tables themselves (200-byte buckets by id, 72-byte ones by address pair), the
//! churn_throughput test missed a 512 KiB cache 68 times per connection; 57 now (cachegrind),
//! see docs/performance.md, "The daemon's tables".

use std::{collections::VecDeque, hash::BuildHasher, net::SocketAddr};

use rustc_hash::{FxBuildHasher, FxHashMap as HashMap, FxHashSet as HashSet};
use tracer_common::{EventKind, tcp_state};

use crate::{
    capture::{Dir, WirePacket, tcp_flags},
    kernel::{Family, KernelEvent, Owner},
};

/// Connections remembered after their last event, to name the owner of late packets (the
/// peer's FIN reaching a socket in TIME_WAIT or FIN_WAIT2, retransmissions). A peer that
/// closes later than this, or more connections than MAX_CONNS in that time, and its FIN is
/// reported as a `packet` line instead of a derived `fin_received`: memory stays bounded.
pub const CONN_MEMORY_NS: u64 = 10_000_000_000;
pub const MAX_CONNS: usize = 8_192;
/// A socket that left FIN_WAIT2 for the kernel's time-wait form waits for the peer's FIN (or
/// RST), which only the wire shows; the kernel keeps such a socket for `tcp_fin_timeout` (60 s
/// by default). Those connections are remembered apart, this long and up to MAX_AWAITING, so
/// that a busy host's churn does not push them out before a slow peer closes: "how long did
/// our socket sit in FIN_WAIT2" is the question for exactly those.
pub const AWAIT_MEMORY_NS: u64 = 65_000_000_000;
/// A host with many connections half-closed at once (a pool's peers shut down together) can
/// have tens of thousands waiting; each costs a record (~200 bytes). Beyond this the oldest
/// is forgotten, and said (`awaiting_forgotten`).
pub const MAX_AWAITING: usize = 32_768;

/// What the daemon remembers about a connection it has seen events for. In C layout, with
/// what `expire` and `forget` read first: those run when the record has long left the cache,
/// and then touch one cache line instead of three.
#[derive(Clone, Debug)]
#[repr(C)]
pub struct ConnInfo {
    id: u64,
    /// `fingerprint` of the address pair it is indexed under.
    addr_fp: u64,
    last_event_ns: u64,
    /// The full socket went from FIN_WAIT2 to CLOSE (into TIME_WAIT / FIN_WAIT2 mini socket)
    /// at this time: the peer's FIN, when it comes, is seen only on the wire.
    timewait_since: Option<u64>,
    pub fin_received: bool,
    pub rst_received: bool,
    /// The state its socket's last event moved it to.
    state: u8,
    fin_seen: u8,
    pub family: Family,
    /// Sequence numbers of the FINs seen on the wire, by `Dir` as this socket sees them (sent,
    /// received), valid where `fin_seen` has bit 1 << index. A FIN seen again later than the
    /// join window is a retransmission: the joiner forgets packets after the window.
    fin_seq: [u32; 2],
    pub fw2_since: Option<u64>,
    /// The connection on these addresses before this one, if it still awaited its peer's FIN
    /// when this one took the address index (a client reusing its port within milliseconds):
    /// a FIN from before this one's time-wait form is that one's.
    pub prev_on_addr: Option<u64>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub owner: Owner,
    /// The owner when the socket went to its time-wait form: what the peer's FIN or RST
    /// reaching that form (lines derived from the wire) names, not whichever thread closed
    /// the descriptor later (after a shutdown(), the socket goes first).
    pub timewait_owner: Owner,
    /// When it entered TIME_WAIT proper (the peer's FIN reached its time-wait form, or the
    /// full socket itself), if it did: what a RST that kills it then says it lasted.
    pub time_wait_since: Option<u64>,
}

impl ConnInfo {
    fn new(ev: &KernelEvent) -> Self {
        ConnInfo {
            id: ev.conn_id,
            addr_fp: fingerprint(&addr_key(ev.local, ev.remote)),
            local: ev.local,
            remote: ev.remote,
            family: ev.family,
            owner: ev.owner,
            timewait_owner: ev.owner,
            last_event_ns: ev.mono_ns,
            timewait_since: None,
            fw2_since: None,
            prev_on_addr: None,
            fin_received: false,
            rst_received: false,
            state: ev.new_state,
            fin_seq: [0; 2],
            fin_seen: 0,
            time_wait_since: None,
        }
    }

    /// The sequence number just past the peer's FIN (its socket's RCV.NXT after it), where
    /// that FIN was seen on the wire.
    pub fn after_peer_fin(&self) -> Option<u32> {
        let received = Dir::In as usize;
        (self.fin_seen & (1 << received) != 0).then(|| self.fin_seq[received].wrapping_add(1))
    }

    /// When the full socket went to its time-wait form (FIN_WAIT2 -> CLOSE), if it did and
    /// that form has not timed out or been answered for by a listener since.
    pub fn timewait_since(&self) -> Option<u64> {
        self.timewait_since
    }

    /// Still on its way out: its socket sent its FIN and waits for the end (FIN_WAIT1,
    /// FIN_WAIT2, CLOSING, LAST_ACK), or its time-wait form awaits the peer's FIN.
    pub fn is_closing(&self) -> bool {
        matches!(
            self.state,
            tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2 | tcp_state::CLOSING | tcp_state::LAST_ACK
        ) || self.awaits_peer()
    }

    /// Our socket is in its time-wait form and the peer has neither closed nor reset yet.
    pub fn awaits_peer(&self) -> bool {
        self.timewait_since.is_some() && !self.fin_received && !self.rst_received
    }

    fn addr_key(&self) -> AddrKey {
        addr_key(self.local, self.remote)
    }
}

/// A socket's (local, remote) as the address index keys it.
type AddrKey = (SocketAddr, SocketAddr);

/// IPv4-mapped IPv6 addresses (a dual-stack socket's IPv4 peers) written as IPv4, as its
/// packets show them on the wire.
fn addr_key(local: SocketAddr, remote: SocketAddr) -> AddrKey {
    (
        crate::join::normalise(local),
        crate::join::normalise(remote),
    )
}

/// The index key of an address pair: its 64-bit hash. Two pairs with one hash would share a
/// bucket, the later replacing the earlier; a lookup checks the record's own addresses, so it
/// never answers with the wrong connection (it may, that rarely, not find the earlier one).
fn fingerprint(key: &AddrKey) -> u64 {
    FxBuildHasher.hash_one(key)
}

/// Removes the address index's entry `fp` if it is still the record in `slot`'s (a later pair
/// with the same hash may have taken the bucket since).
fn unindex_addr(by_addr: &mut HashMap<u64, u32>, fp: u64, slot: u32) {
    if by_addr.get(&fp) == Some(&slot) {
        by_addr.remove(&fp);
    }
}

/// The connections a packet can belong to, by their (local, remote) key, each with the way
/// it went for that socket: the one it reached, then the one that sent it (on loopback both
/// are here).
fn ends(pkt: &WirePacket) -> [(AddrKey, Dir); 2] {
    [
        ((pkt.dst, pkt.src), Dir::In),
        ((pkt.src, pkt.dst), Dir::Out),
    ]
}

/// Whether a RST sent in this state answered for a connection the host no longer has a socket
/// of: a listener's, or one for a segment that matched no socket (state 0, unknown).
pub fn answered_without_its_socket(state: u8) -> bool {
    matches!(state, 0 | tcp_state::LISTEN)
}

/// Whether `ev` is a RST sent by a connection's time-wait form, which the kernel kills with it:
/// `old_state` its substate (FIN_WAIT2 until the peer's FIN came, then TIME_WAIT), `new_state`
/// CLOSE (older builds of the programs said TIME_WAIT for both).
pub fn is_timewait_reset(ev: &KernelEvent) -> bool {
    ev.kind == EventKind::RstSent
        && matches!(
            (ev.old_state, ev.new_state),
            (tcp_state::TIME_WAIT, _) | (tcp_state::FIN_WAIT2, tcp_state::CLOSE)
        )
}

/// Connections by conn id and by address pair.
#[derive(Default)]
pub struct ConnTable {
    slots: Vec<ConnInfo>,
    /// Free slots, the last freed at the end.
    free: Vec<u32>,
    by_id: HashMap<u64, u32>,
    by_addr: HashMap<u64, u32>,
    /// How many records have `timewait_since`: only those can receive a FIN or RST that only
    /// the wire shows. None under RST churn, where a packet's receiver then needs no lookup.
    in_timewait: usize,
    /// (conn id, last seen): every connection, oldest first; a connection that awaits its
    /// peer leaves it for `awaiting` (its record here is then passed over).
    order: VecDeque<(u64, u64)>,
    /// (conn id, since): connections whose socket awaits the peer's FIN in its time-wait form.
    awaiting: VecDeque<(u64, u64)>,
    /// FINs of connections the table did not know when they were seen (no teardown event yet:
    /// the peer's FIN lost on its way in, its copies sent again): (source, destination,
    /// sequence number), the oldest first, at most STRAY_FINS.
    stray_fins: VecDeque<StrayFin>,
    /// The same, to look up.
    stray_set: HashSet<StrayFin>,
    /// Connections forgotten while they still awaited their peer's FIN because more than
    /// MAX_AWAITING did: such a FIN is then a `packet` line, not a `fin_received`.
    pub awaiting_forgotten: u64,
}

/// A FIN by (source, destination, sequence number).
type StrayFin = (SocketAddr, SocketAddr, u32);

/// How many FINs of unknown connections are remembered (see `ConnTable::stray_fins`).
const STRAY_FINS: usize = 1024;

impl ConnTable {
    pub fn get(&self, id: u64) -> Option<&ConnInfo> {
        let slot = *self.by_id.get(&id)?;
        Some(&self.slots[slot as usize])
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut ConnInfo> {
        let slot = *self.by_id.get(&id)?;
        Some(&mut self.slots[slot as usize])
    }

    /// The connection remembered for an address pair.
    fn by_addr(&self, key: &AddrKey) -> Option<&ConnInfo> {
        self.slot_by_addr(key).map(|slot| &self.slots[slot])
    }

    fn by_addr_mut(&mut self, key: &AddrKey) -> Option<&mut ConnInfo> {
        self.slot_by_addr(key).map(|slot| &mut self.slots[slot])
    }

    /// The slot the address index gives for `key`, if its record has those addresses (the
    /// index is keyed by their hash).
    fn slot_by_addr(&self, key: &AddrKey) -> Option<usize> {
        let slot = *self.by_addr.get(&fingerprint(key))? as usize;
        (self.slots[slot].addr_key() == *key).then_some(slot)
    }

    /// The slot of connection `ev.conn_id`, made for it if new (and whether it was).
    fn slot_for(&mut self, ev: &KernelEvent) -> (u32, bool) {
        if let Some(&slot) = self.by_id.get(&ev.conn_id) {
            return (slot, false);
        }
        let info = ConnInfo::new(ev);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = info;
                slot
            }
            None => {
                self.slots.push(info);
                (self.slots.len() - 1) as u32
            }
        };
        self.by_id.insert(ev.conn_id, slot);
        (slot, true)
    }

    pub fn observe(&mut self, ev: &KernelEvent) {
        if ev.conn_id == 0 {
            return;
        }
        let (slot, fresh) = self.slot_for(ev);
        let info = &mut self.slots[slot as usize];
        let moved = ev.local.port() != 0 && (info.local != ev.local || info.remote != ev.remote);
        if moved {
            // Indexed anew below; the old addresses' entry goes now, or it would stay until
            // some other pair with that hash replaced it.
            unindex_addr(&mut self.by_addr, info.addr_fp, slot);
            info.local = ev.local;
            info.remote = ev.remote;
            info.family = ev.family;
            info.addr_fp = fingerprint(&info.addr_key());
        }
        if matches!(ev.owner, Owner::Known { .. }) {
            info.owner = ev.owner;
        }
        info.last_event_ns = ev.mono_ns;
        info.state = ev.new_state;
        // Entered, not re-entered: a close() after shutdown() "moves" FIN_WAIT2 to itself,
        // and the wait the peer's FIN ends began when the socket got there.
        if ev.new_state == tcp_state::FIN_WAIT2 && ev.old_state != tcp_state::FIN_WAIT2 {
            info.fw2_since = Some(ev.mono_ns);
        }
        // A record made afresh at the move out of FIN_WAIT2 (the connection was forgotten
        // meanwhile, among many): the kernel's entry still says since when it was there.
        if ev.old_state == tcp_state::FIN_WAIT2
            && info.fw2_since.is_none()
            && ev.state_since_ns != 0
        {
            info.fw2_since = Some(ev.state_since_ns);
        }
        let was_in_timewait = info.timewait_since.is_some();
        match ev.kind {
            EventKind::FinReceived => {
                info.fin_received = true;
                if ev.new_state == tcp_state::TIME_WAIT {
                    info.time_wait_since = Some(ev.mono_ns);
                }
            }
            EventKind::RstReceived => info.rst_received = true,
            // The listener (or no socket) answered for it: our time-wait form is gone (its
            // FIN_WAIT2 timeout passed), and a FIN the peer sends now reaches no socket of ours.
            EventKind::RstSent if answered_without_its_socket(ev.old_state) => {
                info.timewait_since = None
            }
            // The socket itself reset in CLOSE: its FIN_WAIT2 -> CLOSE was tcp_reset()'s, for
            // the peer's data after ours (TCP_ABORT_ON_DATA), not the hand-over to a time-wait
            // form. The peer's FIN that came with that data reached no socket of ours.
            EventKind::RstSent if ev.old_state == tcp_state::CLOSE => info.timewait_since = None,
            // Its time-wait form timed out in FIN_WAIT2, or sent a RST and was killed with it:
            // nothing of it is left to await.
            EventKind::Fin2Timeout => info.timewait_since = None,
            _ if is_timewait_reset(ev) => info.timewait_since = None,
            _ if ev.old_state == tcp_state::FIN_WAIT2 && ev.new_state == tcp_state::CLOSE => {
                info.timewait_since = Some(ev.mono_ns);
                info.timewait_owner = info.owner;
                if info.awaits_peer() {
                    self.awaiting.push_back((ev.conn_id, ev.mono_ns));
                }
            }
            _ => {}
        }
        match (was_in_timewait, info.timewait_since.is_some()) {
            (false, true) => self.in_timewait += 1,
            (true, false) => self.in_timewait -= 1,
            _ => {}
        }
        // The address index changes only with the addresses (hashing two of them for every
        // event showed in the profile).
        if fresh || moved {
            let (fp, key) = (info.addr_fp, info.addr_key());
            let replaced = self.by_addr.insert(fp, slot);
            if replaced != Some(slot) {
                self.order.push_back((ev.conn_id, ev.mono_ns));
            }
            if let Some(old) = replaced.filter(|&old| old != slot) {
                let old = &self.slots[old as usize];
                let prev = (old.addr_key() == key && old.awaits_peer()).then_some(old.id);
                self.slots[slot as usize].prev_on_addr = prev;
            }
        }
    }

    /// Fills addresses the kernel side could not: kprobe events know only the socket (no
    /// local port), and a failed connect() is disconnected before its close (no remote
    /// address).
    pub fn complete(&self, ev: &mut KernelEvent) {
        if (ev.local.port() == 0 || ev.remote.ip().is_unspecified())
            && let Some(info) = self.get(ev.conn_id)
        {
            ev.local = info.local;
            ev.remote = info.remote;
            ev.family = info.family;
        }
        // A RST sent by a TIME_WAIT mini socket, by a listener or by no socket at all for a
        // connection gone from it: the kernel has no owner for it, but the connection it
        // belonged to may have been seen, with its owner.
        let unowned_reset = ev.old_state == tcp_state::TIME_WAIT
            || is_timewait_reset(ev)
            || (ev.kind == EventKind::RstSent && answered_without_its_socket(ev.old_state));
        let timed_out = ev.kind == EventKind::Fin2Timeout;
        if ev.conn_id == 0
            && (unowned_reset || timed_out)
            && let Some(info) = self.by_addr(&addr_key(ev.local, ev.remote))
        {
            ev.conn_id = info.id;
            let ends_fin_wait2 = timed_out || ev.old_state == tcp_state::FIN_WAIT2;
            if ends_fin_wait2 && let Some(since) = info.fw2_since {
                // The whole FIN_WAIT2, full socket and time-wait form: what timed out, or what
                // the time-wait form's RST (the peer wrote to it: a pool reusing the
                // connection) ended.
                ev.state_since_ns = since;
            }
            if let Owner::Known { pid, tid, comm, .. } = &info.owner {
                ev.owner = Owner::Known {
                    pid: *pid,
                    tid: *tid,
                    comm: *comm,
                    how: "connection",
                };
            }
        }
    }

    /// The connection a packet belongs to, and whether this host's socket received it (the
    /// receiving end first).
    pub fn for_packet(&self, pkt: &WirePacket) -> Option<(u64, Dir)> {
        self.for_packet_from(pkt, Dir::In)
    }

    /// The connection a packet belongs to, the end on `dir`'s side first: when both ends are
    /// this host's (namespaces joined by a veth), the one that sent it for a packet captured
    /// leaving, the one that received it for one captured arriving.
    pub fn for_packet_from(&self, pkt: &WirePacket, dir: Dir) -> Option<(u64, Dir)> {
        let mut ends = ends(pkt);
        if ends[0].1 != dir {
            ends.swap(0, 1);
        }
        ends.into_iter()
            .find_map(|(key, end)| self.by_addr(&key).map(|info| (info.id, end)))
    }

    /// Records a FIN on the connection it reached and the one that sent it, where known.
    pub fn note_fin(&mut self, pkt: &WirePacket) {
        if pkt.flags & tcp_flags::FIN == 0 {
            return;
        }
        let mut known = false;
        for (key, dir) in ends(pkt) {
            if let Some(info) = self.by_addr_mut(&key) {
                info.fin_seq[dir as usize] = pkt.data_end;
                info.fin_seen |= 1 << dir as usize;
                known = true;
            }
        }
        let stray = (pkt.src, pkt.dst, pkt.data_end);
        if !known && self.stray_set.insert(stray) {
            self.stray_fins.push_back(stray);
            if self.stray_fins.len() > STRAY_FINS
                && let Some(oldest) = self.stray_fins.pop_front()
            {
                self.stray_set.remove(&oldest);
            }
        }
    }

    /// Whether this FIN was seen before (on either end's connection, or before the
    /// connection was known).
    pub fn fin_seen_before(&self, pkt: &WirePacket) -> bool {
        pkt.flags & tcp_flags::FIN != 0
            && (ends(pkt).into_iter().any(|(key, dir)| {
                let i = dir as usize;
                self.by_addr(&key)
                    .is_some_and(|c| c.fin_seen & (1 << i) != 0 && c.fin_seq[i] == pkt.data_end)
            }) || self.stray_set.contains(&(pkt.src, pkt.dst, pkt.data_end)))
    }

    pub fn expire(&mut self, now_ns: u64) {
        while let Some(&(id, seen)) = self.order.front() {
            let stale = now_ns.saturating_sub(seen) > CONN_MEMORY_NS;
            if !stale && self.order.len() <= MAX_CONNS {
                break;
            }
            self.order.pop_front();
            let Some(info) = self.get(id) else {
                continue;
            };
            if info.awaits_peer() {
                continue; // remembered by `awaiting`
            }
            if !stale || now_ns.saturating_sub(info.last_event_ns) > CONN_MEMORY_NS {
                self.forget(id);
            } else {
                self.order.push_back((id, info.last_event_ns));
            }
        }
        while let Some(&(id, since)) = self.awaiting.front() {
            let stale = now_ns.saturating_sub(since) > AWAIT_MEMORY_NS;
            if !stale && self.awaiting.len() <= MAX_AWAITING {
                break;
            }
            self.awaiting.pop_front();
            match self.get(id) {
                // The peer did not close in time (or too many wait).
                Some(info) if info.awaits_peer() => {
                    if !stale {
                        self.awaiting_forgotten += 1;
                    }
                    self.forget(id)
                }
                // Answered without the wire (a kernel event): remembered as any other now.
                Some(info) => self.order.push_back((id, info.last_event_ns)),
                None => {}
            }
        }
    }

    /// The peer's FIN or RST reached a connection that awaited it: from now on it is
    /// remembered as any other (for retransmissions of that FIN), not as an awaiting one.
    pub fn answered(&mut self, id: u64, now_ns: u64) {
        self.order.push_back((id, now_ns));
    }

    /// Whether any remembered socket is in its time-wait form (see `in_timewait`).
    pub fn any_in_timewait(&self) -> bool {
        self.in_timewait > 0
    }

    /// How many remembered connections are still closing (`ConnInfo::is_closing`).
    pub fn closing(&self) -> usize {
        self.by_id
            .values()
            .filter(|&&slot| self.slots[slot as usize].is_closing())
            .count()
    }

    fn forget(&mut self, id: u64) {
        let Some(slot) = self.by_id.remove(&id) else {
            return;
        };
        let info = &self.slots[slot as usize];
        if info.timewait_since.is_some() {
            self.in_timewait -= 1;
        }
        unindex_addr(&mut self.by_addr, info.addr_fp, slot);
        self.free.push(slot);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(conn_id: u64, local: &str, remote: &str, mono_ns: u64) -> KernelEvent {
        KernelEvent {
            conn_id,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            ..KernelEvent::sample(mono_ns)
        }
    }

    fn rst(src: &str, dst: &str) -> WirePacket {
        WirePacket {
            mono_ns: 0,
            wall_ns: 0,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            flags: tcp_flags::RST,
            seq: 1,
            data_end: 1,
            ack: 0,
            iface: std::sync::Arc::from("lo"),
            on_loopback: true,
            dir: Dir::Out,
            headers: std::sync::Arc::from(&[][..]),
            only_copy: false,
        }
    }

    #[test]
    fn a_packet_finds_its_connection_by_either_end_and_a_slot_is_reused() {
        let mut table = ConnTable::default();
        table.observe(&event(1, "10.0.0.1:80", "10.0.0.2:4000", 0));
        let pkt = rst("10.0.0.2:4000", "10.0.0.1:80");
        assert_eq!(table.for_packet(&pkt), Some((1, Dir::In)));
        let back = rst("10.0.0.1:80", "10.0.0.2:4000");
        assert_eq!(table.for_packet(&back), Some((1, Dir::Out)));
        table.forget(1);
        assert_eq!(table.for_packet(&pkt), None);
        assert!(table.get(1).is_none());
        // The next connection takes the freed slot; the old one's addresses find nothing.
        table.observe(&event(2, "10.0.0.1:81", "10.0.0.3:5000", 1));
        assert_eq!(table.slots.len(), 1);
        assert_eq!(table.for_packet(&pkt), None);
        assert_eq!(
            table.for_packet(&rst("10.0.0.3:5000", "10.0.0.1:81")),
            Some((2, Dir::In))
        );
    }

    /// A socket whose addresses changed (a kprobe event knew none at first) is found by the
    /// new ones only.
    #[test]
    fn moved_addresses_are_reindexed() {
        let mut table = ConnTable::default();
        table.observe(&event(1, "0.0.0.0:0", "0.0.0.0:0", 0));
        table.observe(&event(1, "10.0.0.1:80", "10.0.0.2:4000", 1));
        assert_eq!(
            table.for_packet(&rst("10.0.0.2:4000", "10.0.0.1:80")),
            Some((1, Dir::In))
        );
        assert_eq!(table.len(), 1);
        assert_eq!(table.by_addr.len(), 1, "the old addresses' entry is gone");
    }

    /// After the traced processes exit, the run follows the connections still closing: sent
    /// their FIN and not yet done, or in the time-wait form awaiting the peer's FIN.
    #[test]
    fn a_connection_is_closing_from_its_fin_to_its_end() {
        let mut table = ConnTable::default();
        let moved = |kind, old_state, new_state, mono| KernelEvent {
            kind,
            old_state,
            new_state,
            ..event(1, "10.0.0.1:80", "10.0.0.2:4000", mono)
        };
        table.observe(&moved(
            EventKind::Close,
            tcp_state::ESTABLISHED,
            tcp_state::FIN_WAIT1,
            1,
        ));
        assert_eq!(table.closing(), 1);
        table.observe(&moved(
            EventKind::State,
            tcp_state::FIN_WAIT1,
            tcp_state::FIN_WAIT2,
            2,
        ));
        table.observe(&moved(
            EventKind::State,
            tcp_state::FIN_WAIT2,
            tcp_state::CLOSE,
            3,
        ));
        assert_eq!(
            table.closing(),
            1,
            "its time-wait form awaits the peer's FIN"
        );
        table.get_mut(1).unwrap().fin_received = true;
        assert_eq!(table.closing(), 0);
        table.observe(&KernelEvent {
            new_state: tcp_state::CLOSE,
            ..event(2, "10.0.0.1:80", "10.0.0.2:4001", 4)
        });
        assert_eq!(table.closing(), 0, "a reset connection is done");
    }

    /// The count of sockets in their time-wait form follows the events and the forgetting.
    #[test]
    fn counts_the_sockets_in_their_time_wait_form() {
        let mut table = ConnTable::default();
        let to_time_wait = |id, mono| KernelEvent {
            kind: EventKind::State,
            old_state: tcp_state::FIN_WAIT2,
            new_state: tcp_state::CLOSE,
            ..event(id, "10.0.0.1:80", &format!("10.0.0.2:{id}"), mono)
        };
        table.observe(&event(1, "10.0.0.1:80", "10.0.0.2:1", 0));
        assert!(!table.any_in_timewait());
        table.observe(&to_time_wait(1, 1));
        table.observe(&to_time_wait(2, 1));
        assert_eq!(table.in_timewait, 2);
        let timed_out = KernelEvent {
            kind: EventKind::Fin2Timeout,
            ..to_time_wait(1, 2)
        };
        table.observe(&timed_out);
        assert_eq!(table.in_timewait, 1);
        table.forget(2);
        assert!(!table.any_in_timewait());
    }

    /// Under churn the table keeps MAX_CONNS connections and forgets the oldest first.
    #[test]
    fn churn_keeps_the_newest_connections() {
        let mut table = ConnTable::default();
        let total = MAX_CONNS as u64 + 500;
        for i in 0..total {
            let local = format!("10.0.{}.{}:80", i / 250, i % 250);
            table.observe(&event(i + 1, &local, "10.9.9.9:4000", i));
            table.expire(i);
        }
        assert_eq!(table.len(), MAX_CONNS);
        assert!(table.get(1).is_none() && table.get(500).is_none());
        assert!(table.get(501).is_some() && table.get(total).is_some());
        assert!(table.slots.len() <= MAX_CONNS + 1, "slots are reused");
    }

    /// More connections awaiting their peer's FIN than MAX_AWAITING: the oldest are forgotten,
    /// and counted (the run says so); ones forgotten for their age are not counted.
    #[test]
    fn awaiting_connections_beyond_the_bound_are_counted_when_forgotten() {
        let mut table = ConnTable::default();
        let total = MAX_AWAITING as u64 + 10;
        for i in 0..total {
            let local = format!("10.{}.{}.{}:80", i / 62500, i / 250 % 250, i % 250);
            let id = i + 1;
            table.observe(&event(id, &local, "10.9.9.9:4000", i));
            table.observe(&KernelEvent {
                kind: EventKind::State,
                old_state: tcp_state::FIN_WAIT2,
                new_state: tcp_state::CLOSE,
                ..event(id, &local, "10.9.9.9:4000", i)
            });
            table.expire(i);
        }
        assert_eq!(table.awaiting_forgotten, 10);
        assert!(table.get(1).is_none() && table.get(total).is_some());
        table.expire(total + AWAIT_MEMORY_NS + 1);
        assert_eq!(
            table.awaiting_forgotten, 10,
            "forgotten for their age: not counted"
        );
    }
}
