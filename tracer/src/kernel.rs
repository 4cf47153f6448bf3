//! Kernel events as the daemon sees them: the raw `SockEvent` bytes from the ring buffer turned
//! into typed values, with names for states, calls, owners and reset reasons.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tracer_common::{
    AF_INET, AF_INET6, EventKind, SockEvent, close_reset, owner_source, rst_ack, syscall, tcp_state,
};

/// A decoded kernel event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: EventKind,
    pub mono_ns: u64,
    pub conn_id: u64,
    pub state_since_ns: u64,
    pub call_id: u64,
    pub owner: Owner,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub old_state: u8,
    pub new_state: u8,
    pub syscall: u8,
    pub fd: Option<i32>,
    pub reason: Option<i32>,
    /// For a close that moved its socket straight to CLOSE, whether it sent its RST, where
    /// the kernel held the close until it knew (`Config::hold_aborts`).
    pub its_reset: ItsReset,
    /// For a sent RST, whether it carries ACK (None: not known).
    pub rst_ack: Option<bool>,
    /// The socket's error when the kernel gave up on it (`SockEvent::sk_err`).
    pub sk_err: Option<u8>,
}

/// What a close that moved its socket straight to CLOSE is known to have sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ItsReset {
    /// Not known with the close: a RST, if any, is an event of its own.
    #[default]
    Unknown,
    /// The RST went out; the event's `reason` is the kernel's reason for it.
    Sent,
    /// The socket was destroyed without one.
    NotSent,
}

impl ItsReset {
    fn from_raw(value: u8) -> Self {
        match value {
            close_reset::SENT => Self::Sent,
            close_reset::NOT_SENT => Self::NotSent,
            _ => Self::Unknown,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// The process that owns the socket, or why none is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Known {
        pid: u32,
        tid: u32,
        comm: Comm,
        /// How it was found: `task` (seen acting on the socket), `seeded`, `listener`, or
        /// `connection` (a TIME_WAIT socket's RST, owned by the connection it ended).
        how: &'static str,
    },
    Unknown(&'static str),
}

impl KernelEvent {
    /// Decodes ring-buffer bytes; None for a record of the wrong size or an unknown kind.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<SockEvent>() {
            return None;
        }
        // SAFETY: the buffer holds at least one SockEvent written by the kernel program; the
        // unaligned read copes with any alignment of the ring-buffer slice.
        let raw: SockEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Self::from_raw(&raw)
    }

    pub fn from_raw(raw: &SockEvent) -> Option<Self> {
        let kind = EventKind::from_u8(raw.kind)?;
        let family = match raw.family {
            AF_INET => Family::Ipv4,
            AF_INET6 => Family::Ipv6,
            // The kprobe path knows only the socket; the daemon fills addresses from its table.
            _ => Family::Ipv4,
        };
        Some(Self {
            kind,
            mono_ns: raw.ts_ns,
            conn_id: raw.conn_id,
            state_since_ns: raw.state_since_ns,
            call_id: raw.call_id,
            owner: owner_of(raw),
            family,
            local: SocketAddr::new(ip(family, &raw.laddr), raw.lport),
            remote: SocketAddr::new(ip(family, &raw.raddr), raw.rport),
            old_state: raw.old_state,
            new_state: raw.new_state,
            syscall: raw.syscall,
            fd: (raw.fd >= 0).then_some(raw.fd),
            reason: (raw.reason >= 0).then_some(raw.reason),
            its_reset: ItsReset::from_raw(raw.close_reset),
            rst_ack: match raw.rst_ack {
                rst_ack::WITH => Some(true),
                rst_ack::WITHOUT => Some(false),
                _ => None,
            },
            sk_err: (raw.sk_err != 0).then_some(raw.sk_err),
        })
    }

    /// Time spent in `old_state`, when the tracer saw the socket enter it.
    pub fn duration_in_old_state(&self) -> Option<u64> {
        (self.state_since_ns != 0 && self.mono_ns >= self.state_since_ns)
            .then(|| self.mono_ns - self.state_since_ns)
    }

    /// The name of the call that began the teardown, as the contract spells it.
    pub fn syscall_name(&self) -> Option<&'static str> {
        match self.syscall {
            syscall::CLOSE => Some("close"),
            syscall::SHUTDOWN => Some("shutdown"),
            syscall::EXIT => Some("exit"),
            _ => None,
        }
    }
}

fn ip(family: Family, bytes: &[u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(*bytes)),
    }
}

fn owner_of(raw: &SockEvent) -> Owner {
    let how = match raw.owner_source {
        owner_source::CURRENT => "task",
        owner_source::SEEDED => "seeded",
        owner_source::LISTENER => "listener",
        owner_source::NO_SOCKET => {
            return Owner::Unknown("no socket: a reset for a segment that matched no socket");
        }
        owner_source::TIME_WAIT => {
            return Owner::Unknown("time-wait socket: no process owns it");
        }
        _ => {
            return Owner::Unknown(
                "unknown: the socket was not seen in its owner's context since the tracer started",
            );
        }
    };
    Owner::Known {
        pid: raw.pid,
        tid: raw.tid,
        comm: comm(&raw.comm),
        how,
    }
}

/// A task's command name, held inline: an event per connection should not cost an allocation
/// for it, and the owner is copied into every line and connection record.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm {
    len: u8,
    /// TASK_COMM_LEN is 16 bytes; decoded lossily, each may become a 3-byte U+FFFD.
    text: [u8; 48],
}

impl Comm {
    pub fn new(name: &str) -> Self {
        let mut text = [0u8; 48];
        let mut len = 0;
        for ch in name.chars() {
            if len + ch.len_utf8() > text.len() {
                break;
            }
            len += ch.encode_utf8(&mut text[len..]).len();
        }
        Self {
            len: len as u8,
            text,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text[..usize::from(self.len)]).expect("built from a str")
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Comm {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

fn comm(bytes: &[u8; 16]) -> Comm {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    match std::str::from_utf8(&bytes[..end]) {
        Ok(name) => Comm::new(name),
        Err(_) => Comm::new(&String::from_utf8_lossy(&bytes[..end])),
    }
}

/// The name of an errno a socket ends with (`sk_err`), as C spells it; the number for others.
pub fn errno_name(errno: u8) -> std::borrow::Cow<'static, str> {
    let name = match i32::from(errno) {
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPIPE => "EPIPE",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::ENETDOWN => "ENETDOWN",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        other => return format!("errno {other}").into(),
    };
    name.into()
}

/// Kernel TCP state names without the `TCP_` prefix.
pub fn state_name(state: u8) -> &'static str {
    match state {
        tcp_state::ESTABLISHED => "ESTABLISHED",
        tcp_state::SYN_SENT => "SYN_SENT",
        tcp_state::SYN_RECV => "SYN_RECV",
        tcp_state::FIN_WAIT1 => "FIN_WAIT1",
        tcp_state::FIN_WAIT2 => "FIN_WAIT2",
        tcp_state::TIME_WAIT => "TIME_WAIT",
        tcp_state::CLOSE => "CLOSE",
        tcp_state::CLOSE_WAIT => "CLOSE_WAIT",
        tcp_state::LAST_ACK => "LAST_ACK",
        tcp_state::LISTEN => "LISTEN",
        tcp_state::CLOSING => "CLOSING",
        tcp_state::NEW_SYN_RECV => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// Names of `enum sk_rst_reason` values, read from this kernel's tcp_send_reset format file.
/// Shared strings: every RST line carries one, and a clone is a reference count, not a copy.
#[derive(Clone, Debug, Default)]
pub struct ResetReasons(BTreeMap<i64, Arc<str>>);

impl ResetReasons {
    pub fn new(names: BTreeMap<i64, String>) -> Self {
        Self(names.into_iter().map(|(k, v)| (k, v.into())).collect())
    }

    pub fn name(&self, value: i32) -> Arc<str> {
        self.0
            .get(&(value as i64))
            .cloned()
            .unwrap_or_else(|| format!("UNKNOWN_{value}").into())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// For unit tests: a close of a socket of "srv" (pid 7), 10.0.0.1:80 -> 10.0.0.2:4000,
/// ESTABLISHED -> CLOSE by close(3) at `mono_ns`; tests change what they are about.
#[cfg(test)]
impl KernelEvent {
    pub fn sample(mono_ns: u64) -> Self {
        KernelEvent {
            kind: EventKind::Close,
            mono_ns,
            conn_id: 0xabc,
            state_since_ns: 0,
            call_id: 0,
            owner: Owner::Known {
                pid: 7,
                tid: 7,
                comm: "srv".into(),
                how: "task",
            },
            family: Family::Ipv4,
            local: "10.0.0.1:80".parse().unwrap(),
            remote: "10.0.0.2:4000".parse().unwrap(),
            old_state: tcp_state::ESTABLISHED,
            new_state: tcp_state::CLOSE,
            syscall: tracer_common::syscall::CLOSE,
            fd: Some(3),
            reason: None,
            its_reset: ItsReset::Unknown,
            rst_ack: None,
            sk_err: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> SockEvent {
        SockEvent {
            ts_ns: 2_000,
            conn_id: 0xabcdef,
            state_since_ns: 500,
            call_id: 1_900,
            pid: 42,
            tid: 43,
            comm: *b"server\0\0\0\0\0\0\0\0\0\0",
            fd: 7,
            reason: 11,
            laddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            raddr: [127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            lport: 8080,
            rport: 40000,
            family: AF_INET,
            kind: EventKind::Close as u8,
            old_state: tcp_state::ESTABLISHED,
            new_state: tcp_state::CLOSE,
            syscall: syscall::CLOSE,
            owner_source: owner_source::CURRENT,
            close_reset: 0,
            rst_ack: 0,
            sk_err: 0,
            _pad: [0; 2],
        }
    }

    #[test]
    fn decodes_a_close() {
        let raw = raw();
        // SAFETY: viewing a plain repr(C) value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw as *const SockEvent).cast::<u8>(),
                size_of::<SockEvent>(),
            )
        };
        let ev = KernelEvent::decode(bytes).unwrap();
        assert_eq!(ev.kind, EventKind::Close);
        assert_eq!(ev.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(ev.remote, "127.0.0.2:40000".parse().unwrap());
        assert_eq!(ev.fd, Some(7));
        assert_eq!(ev.reason, Some(11));
        assert_eq!(ev.syscall_name(), Some("close"));
        assert_eq!(ev.duration_in_old_state(), Some(1_500));
        assert_eq!(
            ev.owner,
            Owner::Known {
                pid: 42,
                tid: 43,
                comm: "server".into(),
                how: "task"
            }
        );
        assert!(KernelEvent::decode(&bytes[..10]).is_none());
    }

    #[test]
    fn ipv6_and_unknown_owner() {
        let mut raw = raw();
        raw.family = AF_INET6;
        raw.laddr = Ipv6Addr::LOCALHOST.octets();
        raw.owner_source = owner_source::UNKNOWN;
        raw.fd = -1;
        raw.reason = -1;
        raw.state_since_ns = 0;
        let ev = KernelEvent::from_raw(&raw).unwrap();
        assert_eq!(ev.local.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert!(matches!(ev.owner, Owner::Unknown(_)));
        assert_eq!(ev.fd, None);
        assert_eq!(ev.reason, None);
        assert_eq!(ev.duration_in_old_state(), None);
    }

    #[test]
    fn state_and_reason_names() {
        assert_eq!(state_name(tcp_state::FIN_WAIT2), "FIN_WAIT2");
        assert_eq!(state_name(99), "UNKNOWN");
        let reasons = ResetReasons::new([(11, "TCP_ABORT_ON_CLOSE".to_string())].into());
        assert_eq!(&*reasons.name(11), "TCP_ABORT_ON_CLOSE");
        assert_eq!(&*reasons.name(3), "UNKNOWN_3");
    }
}
