//! With `--pid`, the capture's kernel filter: a socket filter on the capture socket that passes
//! a FIN or RST only when its 4-tuple is a traced process's connection (WATCHED, filled by the
//! other programs). Without it every FIN and RST of the host is copied into the capture ring and
//! thrown away by the daemon: tracing one quiet service on a busy host should cost neither.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    helpers::generated::bpf_skb_load_bytes_relative,
    macros::{map, socket_filter},
    maps::{LruHashMap, PerCpuArray},
    programs::SkBuffContext,
};
use tracer_common::{AF_INET, AF_INET6, SockEvent, TupleKey};

use crate::{
    emit::{SLOTS, ports_pass},
    setting,
};

/// The 4-tuples of traced processes' connections, as their sockets see them (local first).
/// LRU: entries are never removed one by one (late FINs and RSTs of a closed connection must
/// still pass); the oldest go when the table is full.
#[map]
pub static WATCHED: LruHashMap<TupleKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// What a passing packet keeps: the capture's snap length (headers only).
const SNAPLEN: i64 = 96;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN_OR_RST: u8 = 0x01 | 0x04;
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

/// Whether `key`, as written or with its ends swapped, is in WATCHED (a packet sent by the
/// watched socket has its local end as source, one it receives as destination). Leaves `key`
/// swapped when the first lookup misses.
#[inline(always)]
fn watched_either_way(key: &mut TupleKey) -> bool {
    // SAFETY: presence checks only.
    if unsafe { WATCHED.get(&*key) }.is_some() {
        return true;
    }
    core::mem::swap(&mut key.laddr, &mut key.raddr);
    core::mem::swap(&mut key.lport, &mut key.rport);
    // SAFETY: as above.
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
    if passes(&ctx).unwrap_or(false) {
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

/// TCP with FIN or RST, on a watched 4-tuple in either direction (IPv6 without extension
/// headers, like the classic filter). The filter sees every packet of the interface: the flags
/// are checked first, so the common packet (SYN, ACK, data) costs two or three small loads and
/// only a FIN or RST has its addresses read.
#[inline(always)]
fn passes(ctx: &SkBuffContext) -> Option<bool> {
    let (family, tcp_offset) = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => {
            // Version/IHL at 0, protocol at 9: one 12-byte load gives both.
            let head: [u8; 12] = load(ctx, 0)?;
            if head[9] != IPPROTO_TCP {
                return Some(false);
            }
            (AF_INET, u32::from(head[0] & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            if load::<u8>(ctx, 6)? != IPPROTO_TCP {
                return Some(false);
            }
            (AF_INET6, 40)
        }
        _ => return Some(false),
    };
    // Ports (0..4) and flags (13) in one load.
    let tcp: [u8; 14] = load(ctx, tcp_offset)?;
    if tcp[13] & TCP_FIN_OR_RST == 0 {
        return Some(false);
    }
    let mut key = TupleKey {
        lport: u16::from_be_bytes([tcp[0], tcp[1]]),
        rport: u16::from_be_bytes([tcp[2], tcp[3]]),
        family,
        ..TupleKey::default()
    };
    if !ports_pass(key.lport, key.rport) {
        return Some(false);
    }
    if family == AF_INET {
        let addrs: [u8; 8] = load(ctx, 12)?;
        key.laddr[..4].copy_from_slice(&addrs[..4]);
        key.raddr[..4].copy_from_slice(&addrs[4..]);
    } else {
        key.laddr = load(ctx, 8)?;
        key.raddr = load(ctx, 24)?;
    }
    Some(watched_either_way(&mut key))
}
