//! Member offsets from the kernel's BTF (`/sys/kernel/btf/vmlinux`): `struct sock` (and
//! `inet_sock`) for the raw tracepoint programs, which get a `struct sock *` instead of a
//! tracepoint record, and the chain from a task to the socket behind a descriptor for the
//! close(2) and shutdown(2) programs, and where a task's saved user registers keep its
//! syscall number and first argument.
//!
//! aya can parse the whole BTF, but that costs tens of MB of memory for a handful of numbers
//! (the reason the loader runs with `.btf(None)`). This reads the file in two streaming passes
//! with a small buffer: the string section, to learn where the few names we need are, then the
//! type section, keeping only where each type starts. Members of anonymous unions and structs
//! (the ports and addresses of `struct sock_common` live in those) are followed from there.

use std::{
    fs::File,
    io::{BufReader, Read, Seek, SeekFrom},
    os::unix::fs::FileExt as _,
    path::Path,
};

use anyhow::{Context as _, bail};
use tracer_common::{FdLayout, RegsLayout, SkbLayout, SockLayout, TimewaitLayout};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// The structs looked up (an index here is the index in `Btf::structs` and in `Btf::names`).
const STRUCTS: &[&str] = &[
    "sock",
    "sock_common",
    "inet_sock",
    "task_struct",
    "files_struct",
    "fdtable",
    "file",
    "socket",
    "pt_regs",
    "sk_buff",
    "inet_timewait_sock",
    "timer_list",
    "net",
];
const SOCK: usize = 0;
const SOCK_COMMON: usize = 1;
const INET_SOCK: usize = 2;
const TASK_STRUCT: usize = 3;
const FILES_STRUCT: usize = 4;
const FDTABLE: usize = 5;
const FILE: usize = 6;
const SOCKET: usize = 7;
const PT_REGS: usize = 8;
const SK_BUFF: usize = 9;
const INET_TIMEWAIT_SOCK: usize = 10;
const TIMER_LIST: usize = 11;
const NET: usize = 12;

/// `struct pt_regs`' syscall number and first argument, by architecture (the first argument's
/// own register is overwritten by the return value; these keep it).
#[cfg(target_arch = "x86_64")]
const SYSCALL_REGS: Option<(&str, &str)> = Some(("orig_ax", "di"));
#[cfg(target_arch = "aarch64")]
const SYSCALL_REGS: Option<(&str, &str)> = Some(("syscallno", "orig_x0"));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SYSCALL_REGS: Option<(&str, &str)> = None;

/// `struct pt_regs`' register of a syscall's second argument: a member, and a byte offset
/// within it (arm64 keeps the registers in an array).
#[cfg(target_arch = "x86_64")]
const SECOND_ARG: (&str, u16) = ("si", 0);
#[cfg(target_arch = "aarch64")]
const SECOND_ARG: (&str, u16) = ("regs", 8);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SECOND_ARG: (&str, u16) = ("", 0);

/// Their members looked up (`file` is also a member: `socket.file`, found under STRUCTS).
const MEMBERS: &[&str] = &[
    "__sk_common",
    "sk",
    "inet_sport",
    "inet_saddr",
    "skc_family",
    "skc_dport",
    "skc_daddr",
    "skc_v6_rcv_saddr",
    "skc_v6_daddr",
    "sk_protocol",
    "sk_shutdown",
    "sk_err",
    "sk_socket",
    "sk_lock",
    "owned",
    "skc_net",
    "ns",
    "inum",
    "files",
    "fdt",
    "max_fds",
    "fd",
    "private_data",
    "orig_ax",
    "di",
    "si",
    "syscallno",
    "orig_x0",
    "regs",
    "flags",
    "head",
    "data",
    "network_header",
    "__tw_common",
    "tw_timer",
    "tw_substate",
    "tw_sport",
    "skc_rcv_saddr",
    "function",
];

/// How many names are looked up: the structs, then the members.
const NAMES: usize = STRUCTS.len() + MEMBERS.len();

fn names() -> impl Iterator<Item = &'static str> {
    STRUCTS.iter().chain(MEMBERS).copied()
}

/// What the programs need from the kernel's BTF; each part is missing with why.
pub struct Layouts {
    /// For the raw tracepoint programs.
    pub sock: Result<SockLayout, String>,
    /// For close(2) and shutdown(2) to know their socket.
    pub fd: Result<FdLayout, String>,
    /// For calls named from the task's registers (syscall numbers not filled in).
    pub regs: Result<RegsLayout, String>,
    /// For the segment a listener's reset answers.
    pub skb: Result<SkbLayout, String>,
    /// For a time-wait socket's end (`handler` not filled in).
    pub timewait: Result<TimewaitLayout, String>,
}

/// Reads the offsets of the fields the programs need.
pub fn layouts(path: &Path) -> Layouts {
    let btf = File::open(path)
        .with_context(|| format!("opening {}", path.display()))
        .and_then(|file| Btf::index(file).with_context(|| format!("reading {}", path.display())));
    match btf {
        Ok(btf) => Layouts {
            sock: btf.sock_layout().map_err(|e| format!("{e:#}")),
            fd: btf.fd_layout().map_err(|e| format!("{e:#}")),
            regs: btf.regs_layout().map_err(|e| format!("{e:#}")),
            skb: btf.skb_layout().map_err(|e| format!("{e:#}")),
            timewait: btf.timewait_layout().map_err(|e| format!("{e:#}")),
        },
        Err(e) => Layouts {
            sock: Err(format!("{e:#}")),
            fd: Err(format!("{e:#}")),
            regs: Err(format!("{e:#}")),
            skb: Err(format!("{e:#}")),
            timewait: Err(format!("{e:#}")),
        },
    }
}

/// Where each type starts in the file, and the string offsets of the names looked up.
struct Btf {
    file: File,
    /// Byte offset of type id `i` (index 0 is the void type and unused).
    type_at: Vec<u64>,
    names: [Option<u32>; NAMES],
    /// Type ids of `STRUCTS`.
    structs: [Option<u32>; STRUCTS.len()],
}

/// One member of a struct or union.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    /// Non-zero for a bit-field.
    bit_size: u32,
}

impl Btf {
    fn index(mut file: File) -> anyhow::Result<Self> {
        let mut header = [0u8; 24];
        file.read_exact(&mut header)?;
        let u32_at = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
        if u16::from_le_bytes([header[0], header[1]]) != MAGIC {
            bail!("not BTF (bad magic; big-endian BTF is not supported)");
        }
        let hdr_len = u64::from(u32_at(4));
        let (type_off, type_len) = (u64::from(u32_at(8)), u64::from(u32_at(12)));
        let (str_off, str_len) = (u64::from(u32_at(16)), u64::from(u32_at(20)));
        let names = find_names(&file, hdr_len + str_off, str_len)?;
        let mut btf = Self {
            file,
            type_at: vec![0],
            names,
            structs: [None; STRUCTS.len()],
        };
        btf.index_types(hdr_len + type_off, type_len)?;
        Ok(btf)
    }

    /// One pass over the type section: where each type starts, and which ids are the structs.
    fn index_types(&mut self, start: u64, len: u64) -> anyhow::Result<()> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(start))?;
        let mut reader = BufReader::with_capacity(64 * 1024, file.take(len));
        let mut at = start;
        let mut head = [0u8; 12];
        while at < start + len {
            reader.read_exact(&mut head)?;
            let name_off = u32::from_le_bytes(head[0..4].try_into().unwrap());
            let info = u32::from_le_bytes(head[4..8].try_into().unwrap());
            let kind = (info >> 24) & 0x1f;
            let vlen = u64::from(info & 0xffff);
            let extra = extra_bytes(kind, vlen)
                .with_context(|| format!("unknown BTF kind {kind} at offset {at}"))?;
            let id = self.type_at.len() as u32;
            if kind == KIND_STRUCT
                && let Some(i) = (0..STRUCTS.len()).find(|&i| Some(name_off) == self.names[i])
            {
                self.structs[i].get_or_insert(id);
            }
            self.type_at.push(at);
            std::io::copy(&mut (&mut reader).take(extra), &mut std::io::sink())?;
            at += 12 + extra;
        }
        Ok(())
    }

    fn struct_id(&self, index: usize) -> anyhow::Result<u32> {
        self.structs[index].with_context(|| format!("no struct {}", STRUCTS[index]))
    }

    fn sock_layout(&self) -> anyhow::Result<SockLayout> {
        let sock = self.struct_id(SOCK)?;
        let common = self.struct_id(SOCK_COMMON)?;
        let inet = self.struct_id(INET_SOCK)?;
        // All three start at the socket's address: offsets in any of them are offsets from sk.
        for (outer, member, inner, what) in [
            (
                sock,
                "__sk_common",
                common,
                "struct sock does not start with its sock_common",
            ),
            (
                inet,
                "sk",
                sock,
                "struct inet_sock does not start with its sock",
            ),
        ] {
            let m = self.find(outer, self.name(member))?.context(what)?;
            if m.type_id != inner || m.bit_offset != 0 {
                bail!("{what}");
            }
        }
        let byte_offset = |within, name| self.byte_offset(within, name);
        let protocol = self
            .find(sock, self.name("sk_protocol"))?
            .context("struct sock has no sk_protocol")?;
        let protocol_size = match protocol.bit_size {
            0 => self.int_size(protocol.type_id)?,
            bits => bits / 8,
        };
        if protocol.bit_offset % 8 != 0 || !matches!(protocol_size, 1 | 2) {
            bail!("sk_protocol is neither a byte nor a u16");
        }
        let net = self.netns_offsets(common).ok();
        // The fields inet_sock_set_state's own record is filled from (skc_num and
        // skc_rcv_saddr would not do: a socket's port is released, num set to 0, just before
        // its move to CLOSE).
        Ok(SockLayout {
            family: byte_offset(common, "skc_family")?,
            sport: byte_offset(inet, "inet_sport")?,
            dport: byte_offset(common, "skc_dport")?,
            saddr: byte_offset(inet, "inet_saddr")?,
            daddr: byte_offset(common, "skc_daddr")?,
            v6_rcv_saddr: byte_offset(common, "skc_v6_rcv_saddr")?,
            v6_daddr: byte_offset(common, "skc_v6_daddr")?,
            protocol: (protocol.bit_offset / 8) as u16,
            protocol_size: protocol_size as u16,
            // Only for telling a close finished by another task (state.rs): optional.
            shutdown: byte_offset(sock, "sk_shutdown").unwrap_or(tracer_common::NONE),
            // Only to say why a socket the kernel gave up on ended: optional.
            err: byte_offset(sock, "sk_err").unwrap_or(tracer_common::NONE),
            // Only to tell a connection never accepted: optional.
            socket: byte_offset(sock, "sk_socket").unwrap_or(tracer_common::NONE),
            // Only to tell tcp_close() from a softirq in a task's context: optional.
            owned: self.lock_owned_offset(sock).unwrap_or(tracer_common::NONE),
            // Only to tell listeners on one port in different namespaces apart: optional.
            net: net.map_or(tracer_common::NONE, |(net, _)| net),
            net_inum: net.map_or(tracer_common::NONE, |(_, inum)| inum),
        })
    }

    /// Offsets of a socket's namespace pointer (`skc_net`, a `possible_net_t` holding a
    /// `struct net *`) and, in struct net, of its inode number (`ns.inum`, as
    /// /proc/PID/ns/net names the namespace).
    fn netns_offsets(&self, common: u32) -> anyhow::Result<(u16, u16)> {
        let skc_net = self
            .find(common, self.name("skc_net"))?
            .context("no member skc_net")?;
        let pointer = self.byte_offset(self.without_typedefs(skc_net.type_id)?, "net")?;
        let ns = self
            .find(self.struct_id(NET)?, self.name("ns"))?
            .context("struct net has no ns")?;
        let inum = self.byte_offset(self.without_typedefs(ns.type_id)?, "inum")?;
        let at = |m: &Member, within: u16| {
            u16::try_from(m.bit_offset / 8 + u32::from(within)).context("past 64 KiB")
        };
        Ok((at(&skc_net, pointer)?, at(&ns, inum)?))
    }

    /// Offset of `sk_lock.owned` in struct sock (`sk_lock` is a `socket_lock_t`, a typedef
    /// of an anonymous struct).
    fn lock_owned_offset(&self, sock: u32) -> anyhow::Result<u16> {
        let lock = self
            .find(sock, self.name("sk_lock"))?
            .context("no member sk_lock")?;
        let lock_type = self.without_typedefs(lock.type_id)?;
        let owned = self.byte_offset(lock_type, "owned")?;
        if lock.bit_offset % 8 != 0 || lock.bit_size != 0 {
            bail!("sk_lock is not byte-aligned");
        }
        u16::try_from(lock.bit_offset / 8 + u32::from(owned)).context("sk_lock is past 64 KiB")
    }

    /// The type behind typedefs and qualifiers.
    fn without_typedefs(&self, mut type_id: u32) -> anyhow::Result<u32> {
        for _ in 0..16 {
            let (kind, _, _, size_or_type) = self.head(type_id)?;
            match kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    type_id = size_or_type
                }
                _ => return Ok(type_id),
            }
        }
        bail!("type chain too long at {type_id}")
    }

    fn fd_layout(&self) -> anyhow::Result<FdLayout> {
        let task = self.struct_id(TASK_STRUCT)?;
        let files = self.struct_id(FILES_STRUCT)?;
        let fdtable = self.struct_id(FDTABLE)?;
        let file = self.struct_id(FILE)?;
        let socket = self.struct_id(SOCKET)?;
        Ok(FdLayout {
            task_files: self.byte_offset(task, "files")?,
            files_fdt: self.byte_offset(files, "fdt")?,
            fdt_max_fds: self.byte_offset(fdtable, "max_fds")?,
            fdt_fd: self.byte_offset(fdtable, "fd")?,
            file_private_data: self.byte_offset(file, "private_data")?,
            socket_sk: self.byte_offset(socket, "sk")?,
            socket_file: self.byte_offset(socket, "file")?,
            _pad: 0,
        })
    }

    fn skb_layout(&self) -> anyhow::Result<SkbLayout> {
        let skb = self.struct_id(SK_BUFF)?;
        Ok(SkbLayout {
            head: self.byte_offset(skb, "head")?,
            data: self.byte_offset(skb, "data")?,
            network_header: self.byte_offset(skb, "network_header")?,
            _pad: 0,
        })
    }

    fn timewait_layout(&self) -> anyhow::Result<TimewaitLayout> {
        let tw = self.struct_id(INET_TIMEWAIT_SOCK)?;
        let common = self.struct_id(SOCK_COMMON)?;
        let timer = self.struct_id(TIMER_LIST)?;
        // Its sock_common at offset 0: a full socket's offsets there are the time-wait one's.
        let what = "struct inet_timewait_sock does not start with its sock_common";
        let m = self.find(tw, self.name("__tw_common"))?.context(what)?;
        if m.type_id != common || m.bit_offset != 0 {
            bail!("{what}");
        }
        Ok(TimewaitLayout {
            timer_function: self.byte_offset(timer, "function")?,
            tw_timer: self.byte_offset(tw, "tw_timer")?,
            substate: self.byte_offset(tw, "tw_substate")?,
            sport: self.byte_offset(tw, "tw_sport")?,
            rcv_saddr: self.byte_offset(common, "skc_rcv_saddr")?,
            ..TimewaitLayout::NONE
        })
    }

    fn regs_layout(&self) -> anyhow::Result<RegsLayout> {
        let (nr, arg0) = SYSCALL_REGS.context("not known for this architecture")?;
        let regs = self.struct_id(PT_REGS)?;
        let task_flags = self
            .struct_id(TASK_STRUCT)
            .and_then(|task| self.byte_offset(task, "flags"))
            .unwrap_or(tracer_common::NONE);
        Ok(RegsLayout {
            syscall_nr: self.byte_offset(regs, nr)?,
            arg0: self.byte_offset(regs, arg0)?,
            // Only close_range's descriptor needs it: without it, that one is not named.
            arg1: self
                .byte_offset(regs, SECOND_ARG.0)
                .map_or(tracer_common::NONE, |at| at + SECOND_ARG.1),
            task_flags,
            ..RegsLayout::NONE
        })
    }

    /// A member's offset in bytes from the start of `within` (not a bit-field, below 64 KiB).
    fn byte_offset(&self, within: u32, name: &str) -> anyhow::Result<u16> {
        let m = self
            .find(within, self.name(name))?
            .with_context(|| format!("no member {name}"))?;
        if m.bit_offset % 8 != 0 || m.bit_size != 0 {
            bail!("{name} is not byte-aligned");
        }
        u16::try_from(m.bit_offset / 8).with_context(|| format!("{name} is past 64 KiB"))
    }

    fn name(&self, name: &str) -> Option<u32> {
        names().position(|n| n == name).and_then(|i| self.names[i])
    }

    /// The member called `name` of a struct or union, looking inside anonymous members, with
    /// its offset from the start of `type_id`.
    fn find(&self, type_id: u32, name: Option<u32>) -> anyhow::Result<Option<Member>> {
        let Some(name) = name else {
            return Ok(None);
        };
        for m in self.members(type_id)? {
            if m.name_off == name {
                return Ok(Some(m));
            }
            if m.name_off == 0
                && let Some(inner) = self.find(m.type_id, Some(name))?
            {
                return Ok(Some(Member {
                    bit_offset: m.bit_offset + inner.bit_offset,
                    ..inner
                }));
            }
        }
        Ok(None)
    }

    fn members(&self, type_id: u32) -> anyhow::Result<Vec<Member>> {
        let (kind, kind_flag, vlen, _) = self.head(type_id)?;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return Ok(Vec::new());
        }
        let mut raw = vec![0u8; vlen as usize * 12];
        self.file.read_exact_at(&mut raw, self.at(type_id)? + 12)?;
        Ok(raw
            .chunks_exact(12)
            .map(|c| {
                let word = |i: usize| u32::from_le_bytes(c[i..i + 4].try_into().unwrap());
                let offset = word(8);
                let (bit_offset, bit_size) = if kind_flag {
                    (offset & 0x00ff_ffff, offset >> 24)
                } else {
                    (offset, 0)
                };
                Member {
                    name_off: word(0),
                    type_id: word(4),
                    bit_offset,
                    bit_size,
                }
            })
            .collect())
    }

    /// Size in bytes of an integer type, through typedefs and qualifiers.
    fn int_size(&self, type_id: u32) -> anyhow::Result<u32> {
        let resolved = self.without_typedefs(type_id)?;
        match self.head(resolved)? {
            (KIND_INT, _, _, size) => Ok(size),
            _ => bail!("type {type_id} is not an integer"),
        }
    }

    /// Kind, kind flag, vlen and the size-or-type word of a type.
    fn head(&self, type_id: u32) -> anyhow::Result<(u32, bool, u32, u32)> {
        let mut head = [0u8; 12];
        self.file.read_exact_at(&mut head, self.at(type_id)?)?;
        let info = u32::from_le_bytes(head[4..8].try_into().unwrap());
        Ok((
            (info >> 24) & 0x1f,
            info >> 31 == 1,
            info & 0xffff,
            u32::from_le_bytes(head[8..12].try_into().unwrap()),
        ))
    }

    fn at(&self, type_id: u32) -> anyhow::Result<u64> {
        self.type_at
            .get(type_id as usize)
            .copied()
            .filter(|_| type_id != 0)
            .with_context(|| format!("no BTF type {type_id}"))
    }
}

/// Bytes that follow a type's 12-byte header, by kind (linux/btf.h).
fn extra_bytes(kind: u32, vlen: u64) -> Option<u64> {
    Some(match kind {
        1 => 4,               // INT
        2 | 7 | 16 | 18 => 0, // PTR, FWD, FLOAT, TYPE_TAG
        3 => 12,              // ARRAY
        4 | 5 => 12 * vlen,   // STRUCT, UNION: members
        6 => 8 * vlen,        // ENUM
        8..=12 => 0,          // TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC
        13 => 8 * vlen,       // FUNC_PROTO: params
        14 => 4,              // VAR
        15 => 12 * vlen,      // DATASEC
        17 => 4,              // DECL_TAG
        19 => 12 * vlen,      // ENUM64
        _ => return None,
    })
}

/// The string-section offsets of the names looked up, found in one pass over the section.
fn find_names(file: &File, start: u64, len: u64) -> anyhow::Result<[Option<u32>; NAMES]> {
    let mut file = file;
    file.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file.take(len));
    let mut found = [None; NAMES];
    let mut current = Vec::with_capacity(128);
    let mut current_start = 0u32;
    let mut offset = 0u32;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for &byte in &buf[..n] {
            if byte == 0 {
                if let Some(i) = names().position(|name| name.as_bytes() == current) {
                    found[i].get_or_insert(current_start);
                }
                current.clear();
                current_start = offset + 1;
            } else if current.len() < 64 {
                current.push(byte);
            }
            offset += 1;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's layouts; None (skipped, said on stderr) where it has no BTF,
    /// except under CI, whose machines have it: there the test fails.
    fn this_kernels_layouts() -> Option<Layouts> {
        let path = Path::new(VMLINUX);
        if path.exists() {
            return Some(layouts(path));
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "{VMLINUX} does not exist on this CI machine"
        );
        eprintln!("skipped: {VMLINUX} does not exist here");
        None
    }

    /// On this machine's kernel (skipped where there is no BTF): the offsets of
    /// `struct sock_common` have been the same on x86_64 for years.
    #[test]
    fn reads_sock_offsets_from_this_kernels_btf() {
        let Some(found) = this_kernels_layouts() else {
            return;
        };
        let layout = found.sock.unwrap();
        assert_eq!(layout.daddr, 0);
        assert_eq!(layout.dport, 12);
        assert_eq!(layout.family, 16);
        // inet_sock's own fields come after struct sock.
        assert!(layout.sport > layout.protocol && layout.saddr > layout.protocol);
        assert!(layout.v6_daddr > layout.family && layout.v6_rcv_saddr == layout.v6_daddr + 16);
        assert!(layout.protocol > layout.v6_rcv_saddr);
        assert!(matches!(layout.protocol_size, 1 | 2));
        // socket_lock_t { spinlock_t slock; int owned; ... }, within struct sock proper.
        assert!(
            layout.owned > layout.family && layout.owned < layout.sport,
            "{}",
            layout.owned
        );
        // skc_net lies in sock_common, past the addresses and ports; ns.inum in struct net.
        assert!(
            layout.net > layout.family && layout.net < layout.v6_daddr,
            "{}",
            layout.net
        );
        assert!(layout.net_inum != tracer_common::NONE && layout.net_inum < 256);
    }

    #[test]
    fn a_file_that_is_not_btf_is_refused() {
        let path = std::env::temp_dir().join(format!("not-btf-{}", std::process::id()));
        std::fs::write(&path, [0u8; 64]).unwrap();
        let found = layouts(&path);
        std::fs::remove_file(&path).unwrap();
        let regs = found.regs.unwrap_err();
        let skb = found.skb.unwrap_err();
        for err in [found.sock.unwrap_err(), found.fd.unwrap_err(), regs, skb] {
            assert!(err.contains("not BTF"), "{err}");
        }
    }

    /// The chain from a task to the socket behind its descriptor, on this machine's kernel.
    #[test]
    fn reads_the_descriptor_chain_from_this_kernels_btf() {
        let Some(found) = this_kernels_layouts() else {
            return;
        };
        let fd = found.fd.unwrap();
        // struct fdtable { unsigned int max_fds; struct file __rcu **fd; ... } and struct
        // socket's file and sk pointers have kept these places for years.
        assert_eq!((fd.fdt_max_fds, fd.fdt_fd), (0, 8));
        assert_eq!(fd.socket_sk, fd.socket_file + 8);
        assert!(
            fd.task_files > 1000,
            "task_struct.files at {}",
            fd.task_files
        );
        assert!(fd.file_private_data > 0 && fd.files_fdt > 0);
    }

    /// `struct sk_buff` keeps `head` and `data` side by side after its headers group, with
    /// `network_header` among the u16 offsets before them.
    #[test]
    fn reads_the_segment_headers_from_this_kernels_btf() {
        let Some(found) = this_kernels_layouts() else {
            return;
        };
        let skb = found.skb.unwrap();
        assert_eq!(skb.data, skb.head + 8, "{skb:?}");
        assert!(
            skb.network_header > 100 && skb.network_header < skb.head,
            "{skb:?}"
        );
    }

    /// x86-64's `struct pt_regs` is user-visible ABI (asm/ptrace.h): si is the 14th word, di
    /// the 15th, orig_ax the 16th.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reads_the_syscall_registers_from_this_kernels_btf() {
        let Some(found) = this_kernels_layouts() else {
            return;
        };
        let regs = found.regs.unwrap();
        assert_eq!((regs.arg0, regs.syscall_nr), (14 * 8, 15 * 8));
        assert_eq!(regs.arg1, 13 * 8);
        // task_struct.flags follows __state, stack and usage (and thread_info where it is
        // embedded): well inside the first cache lines.
        assert!(
            regs.task_flags > 0 && regs.task_flags < 256,
            "{}",
            regs.task_flags
        );
    }
}
