//! Owners of connections that existed before the tracer started. Users attach to long-running
//! services, whose sockets were never seen in process context by the kernel programs: read
//! each process's socket inodes from /proc/PID/fd and the connections of its network namespace
//! from sock_diag (`sockets`), and seed the kernel's SEED (established) and LISTENERS (listening)
//! tables so that their teardown is attributed from the first event.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData},
};
use tracer_common::{AF_INET, AF_INET6, SeedOwner, TupleKey, forked_mark_slot, tcp_state};

use crate::sockets::{TcpSocket, netns_of, tcp_sockets};

/// What seeding found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedReport {
    pub connections: usize,
    /// Connections found that the seed table had no room for: their events before their owner
    /// acts on them (a peer's FIN or RST) name no owner, or with `--pid` are not traced.
    pub unseeded: usize,
    pub listeners: usize,
    /// With `--pid`: traced listeners left unrecorded, held by untraced processes too.
    pub shared_listeners: usize,
    /// With `--pid`: the traced processes' running descendants, followed for their calls.
    pub children: usize,
}

/// Seeds the kernel tables for `pids`, or for every process when `pids` is empty, `lineage`
/// being the traced processes' (see `lineage`).
/// `netns_known`: whether the programs read a socket's network namespace (LISTENERS' keys
/// carry it then).
pub fn seed(
    ebpf: &mut Ebpf,
    pids: &[u32],
    lineage: &Lineage,
    netns_known: bool,
) -> anyhow::Result<SeedReport> {
    let only_traced = !pids.is_empty();
    // Holders of a traced listener that change nothing (see `shared_with_others`): the traced
    // processes, their children, and their ancestors, which passed a listener on (systemd
    // socket activation, a supervisor, the parent of a traced pre-forked worker) and do not
    // accept from it themselves.
    let expected: HashSet<u32> = pids
        .iter()
        .chain(&lineage.children)
        .chain(&lineage.ancestors)
        .copied()
        .collect();
    // With --pid, the traced processes and their descendants already running: a pre-forked
    // server's workers hold the connections (a keep-alive client of nginx when the tracer
    // starts under `--pid <master>`), and they are traced from the start.
    let pids = if pids.is_empty() {
        all_pids()
    } else {
        pids.iter().chain(&lineage.children).copied().collect()
    };
    let mut by_netns: HashMap<Option<(u64, u64)>, HashMap<u64, TcpSocket>> = HashMap::new();
    let mut conns = Vec::new();
    let mut listeners = Vec::new();
    for pid in pids {
        let Some(owner) = process_owner(pid) else {
            continue; // exited meanwhile
        };
        let inodes = socket_inodes(pid);
        if inodes.is_empty() {
            continue;
        }
        let netns = netns_of(pid).ok();
        let table = by_netns
            .entry(netns)
            .or_insert_with(|| tcp_sockets(pid).into_iter().map(|s| (s.inode, s)).collect());
        for sock in inodes.iter().filter_map(|i| table.get(i)) {
            if sock.state == tcp_state::LISTEN {
                listeners.push((sock.clone(), owner));
            } else {
                conns.push((sock.clone(), owner));
            }
        }
    }
    let mut listeners = one_holder_per_listener(listeners);
    let mut shared_listeners = 0;
    if only_traced {
        let shared = shared_with_others(&listeners, &expected);
        let foreign = foreign_listen_ports(&by_netns, &listeners, netns_known);
        let traced = listeners.len();
        listeners.retain(|(sock, owner)| {
            !shared.contains(&sock.inode)
                && !foreign.contains(&(netns_key(owner.pid, netns_known), sock.local.1))
        });
        shared_listeners = traced - listeners.len();
        mark_foreign_listeners(ebpf, &foreign)?;
    }
    let unseeded = write_seed(ebpf, &conns, &listeners, netns_known)?;
    if only_traced {
        watch_seeded(ebpf, &conns)?;
    }
    Ok(SeedReport {
        connections: conns.len() - unseeded,
        unseeded,
        listeners: listeners.len(),
        shared_listeners,
        children: lineage.children.len(),
    })
}

/// Writes the seed tables; returns how many connections found no room (counted, not each
/// reported: the caller says it once).
fn write_seed(
    ebpf: &mut Ebpf,
    conns: &[(TcpSocket, SeedOwner)],
    listeners: &[(TcpSocket, SeedOwner)],
    netns_known: bool,
) -> anyhow::Result<usize> {
    let mut seed: BpfHashMap<_, TupleKey, SeedOwner> =
        BpfHashMap::try_from(ebpf.map_mut("SEED").context("SEED map missing")?)?;
    let unseeded = conns
        .iter()
        .filter(|(sock, owner)| seed.insert(tuple_key(sock), *owner, 0).is_err())
        .count();
    // The programs look in SEED only for sockets on these ports (with --pid, other sockets of
    // the host are not looked up by address at all).
    mark_ports(ebpf, "SEED_PORTS", conns)?;
    let mut table: BpfHashMap<_, u64, SeedOwner> =
        BpfHashMap::try_from(ebpf.map_mut("LISTENERS").context("LISTENERS map missing")?)?;
    for (sock, owner) in listeners {
        let family = if sock.local.0.is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        };
        let netns = netns_key(owner.pid, netns_known);
        let key = tracer_common::listener_key(netns, family, sock.local.1);
        let _ = table.insert(key, *owner, 0);
    }
    // The programs look a listener up only on ports marked here.
    mark_ports(ebpf, "LISTEN_PORTS", listeners)?;
    Ok(unseeded)
}

/// Marks the sockets' local ports in one of the programs' port arrays (a byte per port, 1 once
/// marked): the programs look in the matching table only on a marked port.
fn mark_ports(
    ebpf: &mut Ebpf,
    array: &str,
    socks: &[(TcpSocket, SeedOwner)],
) -> anyhow::Result<()> {
    let mut ports = byte_array(ebpf, array)?;
    for (sock, _) in socks {
        ports.set(u32::from(sock.local.1), 1, 0)?;
    }
    Ok(())
}

/// One of the programs' byte arrays (marks and flags), by map name.
fn byte_array<'e>(ebpf: &'e mut Ebpf, name: &str) -> anyhow::Result<Array<&'e mut MapData, u8>> {
    let map = ebpf
        .map_mut(name)
        .with_context(|| format!("{name} map missing"))?;
    Ok(Array::try_from(map)?)
}

/// With `--pid`, the capture filter must pass the seeded connections' packets too: their
/// 4-tuples go into WATCHED as the filter reads them from packets (IPv4-mapped as IPv4), their
/// local ports into WATCHED_PORTS, which the filter checks first.
fn watch_seeded(ebpf: &mut Ebpf, conns: &[(TcpSocket, SeedOwner)]) -> anyhow::Result<()> {
    mark_ports(ebpf, "WATCHED_PORTS", conns)?;
    let mut watched: BpfHashMap<_, TupleKey, u8> =
        BpfHashMap::try_from(ebpf.map_mut("WATCHED").context("WATCHED map missing")?)?;
    for (sock, _) in conns {
        let _ = watched.insert(wire_key(sock), 1, 0);
    }
    Ok(())
}

/// With `--pid`, the traced connections' 4-tuples as the capture filter knows them (WATCHED:
/// seeded at start-up, then filled by the programs as each is established). The daemon knows a
/// connection from its events; a packet on one that has had none (a RST a firewall rule or a
/// middlebox forged: no socket sent it) is still the traced process's when its tuple is here.
/// One lookup per packet that no event claimed.
pub struct WatchedTuples(BpfHashMap<MapData, TupleKey, u8>);

impl WatchedTuples {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let map = ebpf.take_map("WATCHED").context("WATCHED map missing")?;
        Ok(Self(BpfHashMap::try_from(map)?))
    }

    /// Whether the packet's 4-tuple, either way round, is a traced connection's.
    pub fn contains(&self, src: SocketAddr, dst: SocketAddr) -> bool {
        let key = |local: SocketAddr, remote: SocketAddr| {
            wire_key(&TcpSocket {
                local: (local.ip(), local.port()),
                remote: (remote.ip(), remote.port()),
                state: 0,
                inode: 0,
            })
        };
        [key(src, dst), key(dst, src)]
            .iter()
            .any(|k| self.0.get(k, 0).is_ok())
    }
}

/// With `--pid`, the traced processes' place in the process tree, read once from /proc.
#[derive(Default)]
pub struct Lineage {
    /// Their descendants already running (a pre-forked server's workers: nginx, Apache,
    /// PostgreSQL, gunicorn), followed for their calls.
    pub children: Vec<u32>,
    /// Their parents, theirs, and so on up to init.
    pub ancestors: HashSet<u32>,
}

/// The lineage of `pids` (empty without `--pid`).
pub fn lineage(pids: &[u32]) -> Lineage {
    if pids.is_empty() {
        return Lineage::default();
    }
    let parent_of = parents();
    Lineage {
        children: descendants(pids, &parent_of),
        ancestors: ancestors(pids, &parent_of),
    }
}

/// Follows `children` (from `lineage`) for their calls from the start, as the kernel programs
/// follow a child forked later (FORKED; marks first, as the programs set them). Called after
/// the programs are attached, so that no fork falls in between.
pub fn follow_children(ebpf: &mut Ebpf, children: &[u32]) -> anyhow::Result<()> {
    if children.is_empty() {
        return Ok(());
    }
    byte_array(ebpf, "FOLLOWING")?.set(0, 1, 0)?;
    let mut marks = byte_array(ebpf, "FORKED_MARKS")?;
    for &child in children {
        marks.set(forked_mark_slot(child), 1, 0)?;
    }
    let mut forked: BpfHashMap<_, u32, u8> =
        BpfHashMap::try_from(ebpf.map_mut("FORKED").context("FORKED map missing")?)?;
    for &child in children {
        let _ = forked.insert(child, 1, 0); // an LRU map: full only evicts
    }
    Ok(())
}

/// The `--pid` processes, each known by its start time too: once one has exited, the
/// programs stop taking its pid for it (a process the kernel gives the pid to later is
/// another), and the run knows when all have exited even if their pids live on.
pub struct TracedPids {
    processes: Vec<TracedPid>,
    /// Where the programs look the pids up: CONFIG's inline slots (their exit marked in
    /// GONE_PIDS, by slot) or the PIDS map (an exited pid removed).
    exits: ExitedPids,
}

struct TracedPid {
    pid: u32,
    started: Option<u64>,
    gone: bool,
}

enum ExitedPids {
    Inline(Array<MapData, u8>),
    Map(BpfHashMap<MapData, u32, u8>),
}

impl TracedPids {
    /// `inline`: whether the pids were given to the programs in CONFIG's inline slots, in
    /// this order.
    pub fn new(ebpf: &mut Ebpf, pids: &[u32], inline: bool) -> anyhow::Result<Self> {
        let exits = if inline {
            let map = ebpf
                .take_map("GONE_PIDS")
                .context("GONE_PIDS map missing")?;
            ExitedPids::Inline(Array::try_from(map)?)
        } else {
            let map = ebpf.take_map("PIDS").context("PIDS map missing")?;
            ExitedPids::Map(BpfHashMap::try_from(map)?)
        };
        let processes = pids
            .iter()
            .map(|&pid| TracedPid {
                pid,
                started: crate::cli::process_start_time(pid),
                gone: false,
            })
            .collect();
        Ok(Self { processes, exits })
    }

    /// Tells the programs about the traced processes that exited since the last call; says
    /// whether all have (false without `--pid`).
    pub fn forget_exited(&mut self) -> bool {
        for (slot, process) in self.processes.iter_mut().enumerate() {
            if process.gone || is_running(process.pid, process.started) {
                continue;
            }
            process.gone = true;
            let _ = match &mut self.exits {
                ExitedPids::Inline(gone) => gone.set(slot as u32, 1, 0),
                ExitedPids::Map(pids) => pids.remove(&process.pid),
            };
        }
        !self.processes.is_empty() && self.processes.iter().all(|p| p.gone)
    }
}

/// Whether process `pid`, started at `started` (when that was read), still runs: not a zombie,
/// and not another process given the pid since.
fn is_running(pid: u32, started: Option<u64>) -> bool {
    crate::cli::process_exists(pid)
        && started.is_none_or(|at| crate::cli::process_start_time(pid) == Some(at))
}

/// The children the kernel programs follow for the traced processes (FORKED), read while the
/// run goes on: the traced processes' exit does not end it while a child they forked still
/// runs (a daemon's workers, once their parent has gone).
pub struct Followed {
    map: BpfHashMap<MapData, u32, u8>,
}

impl Followed {
    pub fn new(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let map = ebpf.take_map("FORKED").context("FORKED map missing")?;
        Ok(Self {
            map: BpfHashMap::try_from(map)?,
        })
    }

    /// Forgets the followed children that exited (the kernel gives their pids to new
    /// processes, which are not the traced processes' children); says whether any still runs.
    pub fn forget_exited(&mut self) -> bool {
        let pids: Vec<u32> = self.map.keys().filter_map(Result::ok).collect();
        let mut running = false;
        for pid in pids {
            if crate::cli::process_exists(pid) {
                running = true;
            } else {
                let _ = self.map.remove(&pid);
            }
        }
        running
    }
}

/// With `--pid`, the traced listeners that other processes also hold (one worker of a
/// pre-forked server traced, its siblings not): any such holder may accept from the listener,
/// so what it accepts cannot inherit a traced owner from it. Without this, `--pid` of one
/// nginx worker reported every worker's connections. Such a listener is not recorded: its
/// connections are traced once a traced process acts on them. `expected` are the holders that
/// change nothing: the traced processes, their children and their ancestors.
fn shared_with_others(
    listeners: &[(TcpSocket, SeedOwner)],
    expected: &HashSet<u32>,
) -> HashSet<u64> {
    if listeners.is_empty() {
        return HashSet::new();
    }
    let inodes: HashSet<u64> = listeners.iter().map(|(sock, _)| sock.inode).collect();
    all_pids()
        .into_iter()
        .filter(|pid| !expected.contains(pid))
        .flat_map(|pid| socket_inodes(pid).into_iter())
        .filter(|inode| inodes.contains(inode))
        .collect()
}

/// The ports on which a listener that no traced process holds listens, each in its namespace
/// (`netns_key`), in the traced processes' network namespaces (`tables`): another service's
/// own listener on a traced listener's port (SO_REUSEPORT, or another address) takes some of
/// the port's connections there, so what is accepted does not tell its owner (see the
/// programs' FOREIGN_LISTENERS). Another namespace's listener on the port takes none.
fn foreign_listen_ports(
    tables: &HashMap<Option<(u64, u64)>, HashMap<u64, TcpSocket>>,
    traced: &[(TcpSocket, SeedOwner)],
    netns_known: bool,
) -> HashSet<(u32, u16)> {
    let traced: HashSet<u64> = traced.iter().map(|(sock, _)| sock.inode).collect();
    let mut foreign = HashSet::new();
    for (netns, table) in tables {
        let netns = netns
            .filter(|_| netns_known)
            .map_or(0, |(_, inode)| inode as u32);
        foreign.extend(
            table
                .values()
                .filter(|sock| sock.state == tcp_state::LISTEN && !traced.contains(&sock.inode))
                .map(|sock| (netns, sock.local.1)),
        );
    }
    foreign
}

/// Writes the ports of `foreign_listen_ports` into the programs' FOREIGN_LISTENERS.
fn mark_foreign_listeners(ebpf: &mut Ebpf, foreign: &HashSet<(u32, u16)>) -> anyhow::Result<()> {
    let mut table: BpfHashMap<_, u64, u8> = BpfHashMap::try_from(
        ebpf.map_mut("FOREIGN_LISTENERS")
            .context("FOREIGN_LISTENERS map missing")?,
    )?;
    for &(netns, port) in foreign {
        // A full table leaves the port unmarked, as in the programs: not worth failing for.
        let _ = table.insert(tracer_common::foreign_listener_key(netns, port), 1, 0);
    }
    Ok(())
}

/// The network namespace of process `pid` as the programs key their listener tables: the
/// namespace file's inode number, which is the namespace's `ns.inum` as the programs read it
/// from a socket; 0 where they cannot read it (`netns_known` false) or the process is gone.
fn netns_key(pid: u32, netns_known: bool) -> u32 {
    netns_known
        .then(|| netns_of(pid).ok())
        .flatten()
        .map_or(0, |(_, inode)| inode as u32)
}

/// A listener several processes hold (a pre-forked server's master and workers) is recorded
/// once, under the holder the others descend from: the process that opened it and passed it
/// on, as `owner: "listener"` promises. Keyed by port in the kernel, the last holder written
/// used to win: the highest pid, one worker among several.
fn one_holder_per_listener(listeners: Vec<(TcpSocket, SeedOwner)>) -> Vec<(TcpSocket, SeedOwner)> {
    let mut by_inode: HashMap<u64, Vec<(TcpSocket, SeedOwner)>> = HashMap::new();
    for (sock, owner) in listeners {
        by_inode.entry(sock.inode).or_default().push((sock, owner));
    }
    let shared = by_inode.values().any(|holders| holders.len() > 1);
    let parent_of = if shared { parents() } else { HashMap::new() };
    let mut chosen: Vec<_> = by_inode
        .into_values()
        .filter_map(|holders| topmost_holder(holders, &parent_of))
        .collect();
    chosen.sort_by_key(|(sock, _)| sock.inode);
    chosen
}

/// The holder whose parent holds nothing of the group (the lowest pid among such, or among
/// all when a cycle of reused pids leaves none).
fn topmost_holder(
    holders: Vec<(TcpSocket, SeedOwner)>,
    parent_of: &HashMap<u32, u32>,
) -> Option<(TcpSocket, SeedOwner)> {
    let pids: HashSet<u32> = holders.iter().map(|(_, owner)| owner.pid).collect();
    let is_top = |pid: u32| {
        parent_of
            .get(&pid)
            .is_none_or(|parent| !pids.contains(parent))
    };
    let top = holders
        .iter()
        .filter(|(_, owner)| is_top(owner.pid))
        .min_by_key(|(_, owner)| owner.pid)
        .or_else(|| holders.iter().min_by_key(|(_, owner)| owner.pid))?;
    Some(top.clone())
}

/// Each running process's parent, from /proc/PID/stat.
fn parents() -> HashMap<u32, u32> {
    all_pids()
        .into_iter()
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parent_in_stat(&stat)?))
        })
        .collect()
}

/// The parent pid in a /proc/PID/stat line: the field after the state, which follows the
/// command name in parentheses (which may itself hold spaces and parentheses).
fn parent_in_stat(stat: &str) -> Option<u32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// The parents of `pids`, theirs, and so on up to init (not the pids themselves), given each
/// process's parent.
fn ancestors(pids: &[u32], parent_of: &HashMap<u32, u32>) -> HashSet<u32> {
    let mut found = HashSet::new();
    for &pid in pids {
        let mut at = pid;
        while let Some(&parent) = parent_of.get(&at).filter(|&&p| p != 0 && found.insert(p)) {
            at = parent;
        }
    }
    found
}

/// Every descendant of `roots` (not the roots themselves), given each process's parent.
fn descendants(roots: &[u32], parent_of: &HashMap<u32, u32>) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &parent) in parent_of {
        children.entry(parent).or_default().push(pid);
    }
    let mut found = Vec::new();
    let mut seen: HashSet<u32> = roots.iter().copied().collect();
    let mut next: Vec<u32> = roots.to_vec();
    while let Some(pid) = next.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if seen.insert(child) {
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

/// A connection's 4-tuple as its packets carry it: a dual-stack socket's IPv4-mapped
/// addresses are IPv4 on the wire.
pub fn wire_key(sock: &TcpSocket) -> TupleKey {
    let unmap = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    tuple_key(&TcpSocket {
        local: (unmap(sock.local.0), sock.local.1),
        remote: (unmap(sock.remote.0), sock.remote.1),
        ..sock.clone()
    })
}

/// The key the kernel program builds for a socket from its tracepoint fields.
pub fn tuple_key(sock: &TcpSocket) -> TupleKey {
    let (family, laddr, raddr) = match (sock.local.0, sock.remote.0) {
        (IpAddr::V4(l), IpAddr::V4(r)) => (AF_INET, pad4(l), pad4(r)),
        (l, r) => (AF_INET6, v6(l).octets(), v6(r).octets()),
    };
    TupleKey {
        laddr,
        raddr,
        lport: sock.local.1,
        rport: sock.remote.1,
        family,
        _pad: 0,
    }
}

fn pad4(ip: Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&ip.octets());
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn process_owner(pid: u32) -> Option<SeedOwner> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let mut bytes = [0u8; 16];
    let name = comm.trim_end().as_bytes();
    let len = name.len().min(15);
    bytes[..len].copy_from_slice(&name[..len]);
    Some(SeedOwner {
        pid,
        tid: pid,
        comm: bytes,
    })
}

/// Inodes of the sockets in a process's fd table (`socket:[12345]`).
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| parse_socket_link(target.to_str()?))
        .collect()
}

pub fn parse_socket_link(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_parent_in_a_stat_line_whatever_the_command_name() {
        let stat = "4242 (nginx: worker (x) 1) S 4200 4200 4200 0 -1 4194624 87 0";
        assert_eq!(parent_in_stat(stat), Some(4200));
        assert_eq!(parent_in_stat("garbage"), None);
    }

    #[test]
    fn a_listener_held_by_a_master_and_its_workers_is_the_masters() {
        let sock = TcpSocket {
            local: ("127.0.0.1".parse().unwrap(), 80),
            remote: ("0.0.0.0".parse().unwrap(), 0),
            state: tcp_state::LISTEN,
            inode: 77,
        };
        let owner = |pid| SeedOwner {
            pid,
            tid: pid,
            comm: [0; 16],
        };
        // Master 100 (parent 1) forked workers 101 and 102; 300 holds it apart (passed over a
        // unix socket), with no parent among the holders and a higher pid.
        let parent_of: HashMap<u32, u32> = [(100, 1), (101, 100), (102, 100), (300, 1)].into();
        let holders = [102, 101, 300, 100].map(|pid| (sock.clone(), owner(pid)));
        let top = topmost_holder(holders.to_vec(), &parent_of).unwrap();
        assert_eq!(top.1.pid, 100);
        // Workers only (the master not scanned, or gone): the lowest of them.
        let top = topmost_holder(holders[..2].to_vec(), &parent_of).unwrap();
        assert_eq!(top.1.pid, 101);
    }

    #[test]
    fn an_untraced_listener_shares_its_port_only_in_its_own_namespace() {
        let listener = |port, inode| TcpSocket {
            local: ("0.0.0.0".parse().unwrap(), port),
            remote: ("0.0.0.0".parse().unwrap(), 0),
            state: tcp_state::LISTEN,
            inode,
        };
        let owner = SeedOwner {
            pid: 7,
            tid: 7,
            comm: [0; 16],
        };
        // Namespace 11 holds the traced listener on 8080 (inode 1); namespace 12 (another
        // traced process's) an untraced one on 8080 and one on 9090.
        let table = |socks: &[TcpSocket]| socks.iter().map(|s| (s.inode, s.clone())).collect();
        let tables = HashMap::from([
            (Some((3, 11)), table(&[listener(8080, 1)])),
            (
                Some((3, 12)),
                table(&[listener(8080, 2), listener(9090, 3)]),
            ),
        ]);
        let traced = [(listener(8080, 1), owner)];
        let foreign = foreign_listen_ports(&tables, &traced, true);
        assert_eq!(foreign, HashSet::from([(12, 8080), (12, 9090)]));
        // Where the programs cannot read a socket's namespace, all are one.
        let foreign = foreign_listen_ports(&tables, &traced, false);
        assert_eq!(foreign, HashSet::from([(0, 8080), (0, 9090)]));
    }

    #[test]
    fn descendants_are_children_and_theirs_never_the_roots_or_strangers() {
        // 10 forked 11 and 12; 12 forked 13; 20 is unrelated; 10's parent is 1.
        let parent_of: HashMap<u32, u32> = [(10, 1), (11, 10), (12, 10), (13, 12), (20, 1)].into();
        let mut found = descendants(&[10], &parent_of);
        found.sort();
        assert_eq!(found, [11, 12, 13]);
        // A traced child of a traced parent is a root, not followed twice.
        let mut found = descendants(&[10, 12], &parent_of);
        found.sort();
        assert_eq!(found, [11, 13]);
    }

    #[test]
    fn finds_its_ancestors_up_to_init() {
        let found = ancestors(&[std::process::id()], &parents());
        assert!(found.contains(&1), "{found:?}");
        assert!(!found.contains(&std::process::id()));
    }

    #[test]
    fn finds_its_own_running_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let found = descendants(&[std::process::id()], &parents());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&child.id()), "{found:?}");
    }

    #[test]
    fn keys_match_what_the_kernel_program_builds() {
        let sock = TcpSocket {
            local: ("127.0.0.1".parse().unwrap(), 8080),
            remote: ("127.0.0.1".parse().unwrap(), 50000),
            state: tcp_state::ESTABLISHED,
            inode: 23456,
        };
        let key = tuple_key(&sock);
        assert_eq!(key.family, AF_INET);
        assert_eq!(&key.laddr[..4], &[127, 0, 0, 1]);
        assert_eq!(&key.laddr[4..], &[0; 12]);
        assert_eq!((key.lport, key.rport), (8080, 50000));
    }

    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link("socket:[4242]"), Some(4242));
        assert_eq!(parse_socket_link("pipe:[4242]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
    }

    #[test]
    fn finds_this_process_own_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let pid = std::process::id();
        let inodes = socket_inodes(pid);
        let table = tcp_sockets(pid);
        let mine = table
            .iter()
            .find(|s| s.local.1 == port && s.state == tcp_state::LISTEN)
            .expect("listener in this process's sockets");
        assert!(inodes.contains(&mine.inode));
    }
}
