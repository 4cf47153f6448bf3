//! With `--pid`, the capture's kernel filter: a socket filter on the capture socket that passes
//! a FIN or RST only when its 4-tuple is a traced process's connection (WATCHED, filled by the
//! other programs), or when it arrives at a traced listener's port (its connection may not
//! exist yet: `arrives_at_a_traced_listener`). Without it every FIN and RST of the host is
//! copied into the capture ring and thrown away by the daemon: tracing one quiet service on a
//! busy host should cost neither.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    helpers::generated::bpf_skb_load_bytes_relative,
    macros::{map, socket_filter},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::SkBuffContext,
};
use tracer_common::{AF_INET, AF_INET6, SockEvent, TupleKey};

use crate::{
    emit::{SLOTS, ports_pass},
    owners::{LISTEN_PORTS, is_marked, mark},
    setting,
};

/// The 4-tuples of traced processes' connections, as their sockets see them (local first).
/// LRU: entries are never removed one by one (late FINs and RSTs of a closed connection must
/// still pass); the oldest go when the table is full.
#[map]
pub static WATCHED: LruHashMap<TupleKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// The local ports of WATCHED's 4-tuples, by port: 1 once one was watched, never cleared (the
/// LRU drops tuples without telling, and another tuple may share the port). A packet neither of
/// whose ports is marked cannot be a watched connection's: two array slots (inlined by the
/// verifier, 64 KiB that stay in cache) instead of two hash lookups that each miss the cache
/// on the bucket array, for every FIN and RST of every other process.
#[map]
pub static WATCHED_PORTS: Array<u8> = Array::with_max_entries(65536, 0);

/// What a passing packet keeps: the capture's snap length (headers only).
const SNAPLEN: i64 = 96;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN_OR_RST: u8 = 0x01 | 0x04;
/// An IPv4 header without options, an IPv6 header, and the part of the TCP header the filter
/// reads (ports at 0..4, flags at 13).
const IPV4_MIN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_NEEDED: usize = 14;
/// `__sk_buff.pkt_type` of a packet this host sends.
const PACKET_OUTGOING: u32 = 4;
/// bpf_skb_load_bytes_relative: offsets from the network header, whatever the link layer.
const BPF_HDR_START_NET: u32 = 1;

/// Where `watch` builds its key: a per-CPU slot per nesting level (see `emit::CLASSIC_SLOT`),
/// not the stack, which every program that emits already fills well past half.
#[map]
static KEY_SCRATCH: PerCpuArray<TupleKey> = PerCpuArray::with_max_entries(SLOTS, 0);

/// Marks a traced connection's packets for the capture (with `--pid` only). An IPv4-mapped IPv6
/// address (a dual-stack socket talking IPv4) is written as IPv4: that is what its packets carry.
#[inline(always)]
pub fn watch(ev: &SockEvent, slot: u32) {
    if setting!(filter_pids) == 0 || ev.family == 0 || ev.lport == 0 {
        return;
    }
    if let Some(key) = wire_key(ev, slot) {
        mark(&WATCHED_PORTS, u32::from(key.lport));
        let _ = WATCHED.insert(&*key, &1, 0);
    }
}

/// Whether the event's 4-tuple, either way round, is a traced connection's (with `--pid`): a
/// reset sent by a time-wait socket or for no socket has no owner in the kernel, yet it may
/// answer a traced connection.
#[inline(always)]
pub fn is_watched(ev: &SockEvent, slot: u32) -> bool {
    wire_key(ev, slot).is_some_and(|key| watched_either_way(key))
}

/// Whether the event's 4-tuple, as written (its socket's local end first), is a traced
/// connection's: the socket is the traced end, not the peer of one (both ends are this host's
/// on loopback, and the peer's time-wait socket has the same addresses the other way round).
#[inline(always)]
pub fn is_watched_end(ev: &SockEvent, slot: u32) -> bool {
    wire_key(ev, slot).is_some_and(|key| watched_as_written(key))
}

/// Whether `key`, as written, is in WATCHED (its local port marked first: see WATCHED_PORTS).
#[inline(always)]
fn watched_as_written(key: &TupleKey) -> bool {
    // SAFETY: a presence check only.
    is_marked(&WATCHED_PORTS, u32::from(key.lport)) && unsafe { WATCHED.get(key) }.is_some()
}

/// Whether `key`, as written or with its ends swapped, is in WATCHED (a packet sent by the
/// watched socket has its local end as source, one it receives as destination). May leave
/// `key` swapped.
#[inline(always)]
fn watched_either_way(key: &mut TupleKey) -> bool {
    if watched_as_written(key) {
        return true;
    }
    if !is_marked(&WATCHED_PORTS, u32::from(key.rport)) {
        return false;
    }
    core::mem::swap(&mut key.laddr, &mut key.raddr);
    core::mem::swap(&mut key.lport, &mut key.rport);
    // SAFETY: a presence check only.
    unsafe { WATCHED.get(&*key) }.is_some()
}

/// The event's 4-tuple as its packets carry it, in this CPU's key slot.
#[inline(always)]
fn wire_key(ev: &SockEvent, slot: u32) -> Option<&'static mut TupleKey> {
    let key = KEY_SCRATCH.get_ptr_mut(slot)?;
    // SAFETY: this CPU's slot for this nesting level, used only until the program returns.
    let key = unsafe { &mut *key };
    key.lport = ev.lport;
    key.rport = ev.rport;
    key._pad = 0;
    if ev.family == AF_INET6 && is_v4_mapped(&ev.laddr) && is_v4_mapped(&ev.raddr) {
        key.family = AF_INET;
        key.laddr = [0; 16];
        key.raddr = [0; 16];
        key.laddr[..4].copy_from_slice(&ev.laddr[12..]);
        key.raddr[..4].copy_from_slice(&ev.raddr[12..]);
    } else {
        key.family = ev.family;
        key.laddr = ev.laddr;
        key.raddr = ev.raddr;
    }
    Some(key)
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff
}

#[socket_filter]
pub fn watched_packets(ctx: SkBuffContext) -> i64 {
    if !is_loopback_leaving_copy(&ctx) && passes(&ctx).unwrap_or(false) {
        SNAPLEN
    } else {
        0
    }
}

#[inline(always)]
fn load<T>(ctx: &SkBuffContext, offset: u32) -> Option<T> {
    let mut value = MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes exactly size_of::<T>() bytes into `value` or fails.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const c_void,
            offset,
            value.as_mut_ptr() as *mut c_void,
            size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    // SAFETY: initialised by the successful helper call.
    (ret == 0).then(|| unsafe { value.assume_init() })
}

/// On `any`, a loopback packet passes the filter twice: leaving, then arriving. The arriving
/// copy is kept (on `lo` itself the kernel skips the leaving one, PACKET_IGNORE_OUTGOING). Two
/// context fields decide, before any helper call: this halves the filter's cost under loopback
/// traffic with the default interface.
#[inline(always)]
fn is_loopback_leaving_copy(ctx: &SkBuffContext) -> bool {
    // SAFETY: reads of the program's context, which the verifier rewrites to the skb's fields.
    let (pkt_type, ifindex) = unsafe { ((*ctx.skb.skb).pkt_type, (*ctx.skb.skb).ifindex) };
    pkt_type == PACKET_OUTGOING && ifindex == setting!(loopback_ifindex) && ifindex != 0
}

/// TCP with FIN or RST, on a watched 4-tuple in either direction (IPv6 without extension
/// headers, like the classic filter). The filter sees every packet of the interface: one load
/// takes the network header and the TCP ports and flags together (for IPv4 with options, a
/// second load the TCP part), so the common packet (SYN, ACK, data) costs a single helper call
/// and a FIN or RST has its addresses already.
#[inline(always)]
fn passes(ctx: &SkBuffContext) -> Option<bool> {
    let (family, ports_and_flags, mut key) = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => {
            // Version/IHL at 0, protocol at 9, addresses at 12 and 16, TCP at 4 * IHL.
            let head: [u8; IPV4_MIN + TCP_NEEDED] = load(ctx, 0)?;
            if head[9] != IPPROTO_TCP {
                return Some(false);
            }
            let ihl = u32::from(head[0] & 0x0f) * 4;
            let tcp: [u8; TCP_NEEDED] = if ihl as usize == IPV4_MIN {
                head[IPV4_MIN..].try_into().ok()?
            } else {
                load(ctx, ihl)?
            };
            let mut key = TupleKey::default();
            key.laddr[..4].copy_from_slice(&head[12..16]);
            key.raddr[..4].copy_from_slice(&head[16..20]);
            (AF_INET, tcp, key)
        }
        ETH_P_IPV6 => {
            // Next header at 6, addresses at 8 and 24, TCP at 40.
            let head: [u8; IPV6_LEN + TCP_NEEDED] = load(ctx, 0)?;
            if head[6] != IPPROTO_TCP {
                return Some(false);
            }
            let mut key = TupleKey::default();
            key.laddr.copy_from_slice(&head[8..24]);
            key.raddr.copy_from_slice(&head[24..40]);
            (AF_INET6, head[IPV6_LEN..].try_into().ok()?, key)
        }
        _ => return Some(false),
    };
    if ports_and_flags[13] & TCP_FIN_OR_RST == 0 {
        return Some(false);
    }
    key.family = family;
    key.lport = u16::from_be_bytes([ports_and_flags[0], ports_and_flags[1]]);
    key.rport = u16::from_be_bytes([ports_and_flags[2], ports_and_flags[3]]);
    if !ports_pass(key.lport, key.rport) {
        return Some(false);
    }
    Some(
        answers_a_syn(&ports_and_flags)
            || arrives_at_a_traced_listener(ctx, key.rport)
            || watched_either_way(&mut key),
    )
}

/// A FIN or RST arriving at a port where a traced process's listener was recorded (with
/// `--pid` only traced listeners are; the port may be another namespace's, or shared with an
/// untraced listener since: a packet has no namespace here). Its connection may not
/// be watched yet: with TCP_DEFER_ACCEPT (Apache's default) the server's socket is created by
/// the client's first data, or by its FIN when it sends none (a health check, a port probe),
/// microseconds after this filter saw that FIN. What passes for another connection on the port
/// is left to the daemon, which keeps only the traced connections' packets.
#[inline(always)]
fn arrives_at_a_traced_listener(ctx: &SkBuffContext, dport: u16) -> bool {
    // SAFETY: a read of the program's context, which the verifier rewrites to the skb's field.
    let pkt_type = unsafe { (*ctx.skb.skb).pkt_type };
    pkt_type != PACKET_OUTGOING && is_marked(&LISTEN_PORTS, u32::from(dport))
}

/// A RST with ACK and sequence number 0: the answer to a SYN (a connect() refused). The
/// connecting socket is watched only once it is established (its local port is chosen after
/// its move to SYN_SENT), so this RST would never pass; refused connects are rare, and the
/// daemon keeps only those of a traced process's connection.
#[inline(always)]
fn answers_a_syn(tcp: &[u8; TCP_NEEDED]) -> bool {
    const RST_ACK: u8 = 0x04 | 0x10;
    tcp[13] & RST_ACK == RST_ACK && tcp[4..8] == [0; 4]
}
