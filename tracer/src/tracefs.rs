//! tracefs: mounting it when missing, and reading tracepoint record layouts from format files,
//! so one build works on kernels whose tracepoint fields moved, appeared or disappeared.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use tracer_common::{NONE, RECORD_BYTES, ResetLayout, TupleLayout};

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Finds tracefs, mounting it at /sys/kernel/tracing when it is not mounted (aya needs it to
/// attach tracepoints, and a fresh machine does not mount it).
pub fn ensure_mounted() -> anyhow::Result<PathBuf> {
    if let Some(root) = find() {
        return Ok(root);
    }
    if let Some(mounted) = mounted_but_unreadable() {
        // Mode 0700, root's: a user with the BPF capabilities alone cannot read it.
        // SAFETY: plain syscall.
        let uid = unsafe { libc::geteuid() };
        bail!(
            "tracefs at {} is not readable by uid {uid} (it is root's): the tracepoints' \
             formats are read there; {}",
            mounted.display(),
            crate::probes::PRIVILEGE_HINT
        );
    }
    mount_tracefs().with_context(|| {
        format!(
            "tracefs is not mounted and mounting it failed; run as root: \
             mount -t tracefs tracefs {TRACEFS}"
        )
    })?;
    find().context("tracefs was mounted but /sys/kernel/tracing/events is missing")
}

/// Where tracefs is mounted, if it is.
pub fn find() -> Option<PathBuf> {
    [TRACEFS, DEBUGFS_TRACING]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// Where tracefs is mounted (by /proc/self/mounts) when `find` could not look into it.
fn mounted_but_unreadable() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, at, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "tracefs" && [TRACEFS, DEBUGFS_TRACING].contains(&at)).then(|| PathBuf::from(at))
    })
}

fn mount_tracefs() -> anyhow::Result<()> {
    let source = CString::new("tracefs")?;
    let target = CString::new(TRACEFS)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!("mount: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub decl: String,
    pub offset: u16,
    pub size: u16,
}

/// A parsed tracepoint format file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Format {
    pub fields: Vec<Field>,
    pub print_fmt: String,
}

impl Format {
    /// Where the last field ends, at most `RECORD_BYTES`: how much of the record the
    /// programs copy at once.
    pub fn record_len(&self) -> u16 {
        let end = self.fields.iter().map(|f| f.offset + f.size).max();
        end.unwrap_or(0).min(RECORD_BYTES as u16)
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of a field, or `NONE` when this kernel lacks it.
    pub fn offset(&self, name: &str) -> u16 {
        self.field(name).map_or(NONE, |f| f.offset)
    }

    /// The value names of a `__print_symbolic(REC->FIELD, { 0, "NAME" }, ...)` in print fmt:
    /// how the kernel itself names enum values such as `sk_rst_reason`.
    pub fn symbolic_names(&self, field: &str) -> BTreeMap<i64, String> {
        parse_symbolic(&self.print_fmt, field)
    }
}

/// Parses the text of a format file.
pub fn parse_format(text: &str) -> anyhow::Result<Format> {
    let mut format = Format::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("print fmt:") {
            format.print_fmt = rest.trim().to_string();
        } else if line.starts_with("field:") {
            format.fields.push(parse_field(line)?);
        }
    }
    if format.fields.is_empty() {
        bail!("no fields in format file");
    }
    Ok(format)
}

/// `field:__u8 saddr[4]; offset:32; size:4; signed:0;` (tab-separated)
fn parse_field(line: &str) -> anyhow::Result<Field> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once(':')
            .with_context(|| format!("malformed format line: {line}"))?;
        match key {
            "field" => decl = Some(value.trim().to_string()),
            "offset" => offset = Some(value.trim().parse::<u16>()?),
            "size" => size = Some(value.trim().parse::<u16>()?),
            _ => {}
        }
    }
    let decl = decl.with_context(|| format!("no field declaration in: {line}"))?;
    let name = field_name(&decl).with_context(|| format!("no field name in: {line}"))?;
    Ok(Field {
        name,
        decl,
        offset: offset.with_context(|| format!("no offset in: {line}"))?,
        size: size.with_context(|| format!("no size in: {line}"))?,
    })
}

/// The identifier in a C declaration such as `const void * skaddr` or `__u8 saddr[4]`.
fn field_name(decl: &str) -> Option<String> {
    let before_array = decl.split('[').next()?;
    let name = before_array
        .rsplit(|c: char| c.is_whitespace() || c == '*')
        .next()?;
    (!name.is_empty()).then(|| name.to_string())
}

fn parse_symbolic(print_fmt: &str, field: &str) -> BTreeMap<i64, String> {
    let needle = format!("__print_symbolic(REC->{field},");
    let Some(start) = print_fmt.find(&needle) else {
        return BTreeMap::new();
    };
    let mut names = BTreeMap::new();
    let mut rest = &print_fmt[start + needle.len()..];
    // Entries look like `{ 11, "TCP_ABORT_ON_CLOSE" }`; the list ends at the closing paren.
    while let Some(open) = rest.find('{') {
        if rest[..open].contains(')') {
            break;
        }
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let entry = &rest[open + 1..open + close];
        if let Some((value, name)) = entry.split_once(',')
            && let Ok(value) = value.trim().parse::<i64>()
        {
            names.insert(value, name.trim().trim_matches('"').to_string());
        }
        rest = &rest[open + close + 1..];
    }
    names
}

/// Reads `events/GROUP/NAME/format`; `Ok(None)` when this kernel has no such tracepoint.
pub fn read_format(root: &Path, group: &str, name: &str) -> anyhow::Result<Option<Format>> {
    let path = root.join("events").join(group).join(name).join("format");
    match fs::read_to_string(&path) {
        Ok(text) => parse_format(&text)
            .map(Some)
            .with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Layout of the tracepoints that describe a socket with separate port/address fields.
pub fn tuple_layout(format: &Format) -> TupleLayout {
    let skaddr = match format.offset("skaddr") {
        NONE => format.offset("sk"),
        found => found,
    };
    TupleLayout {
        skaddr,
        family: format.offset("family"),
        sport: format.offset("sport"),
        dport: format.offset("dport"),
        saddr: format.offset("saddr"),
        daddr: format.offset("daddr"),
        saddr_v6: format.offset("saddr_v6"),
        daddr_v6: format.offset("daddr_v6"),
        oldstate: format.offset("oldstate"),
        newstate: format.offset("newstate"),
        protocol: format.offset("protocol"),
        record_len: format.record_len(),
    }
}

/// Size of `struct sockaddr_in6`: since 6.10 tcp_send_reset stores addresses as such blobs.
const SOCKADDR_IN6_SIZE: u16 = 28;

/// Layout of tcp:tcp_send_reset in either of its two historical forms.
pub fn reset_layout(format: &Format) -> ResetLayout {
    let sockaddr_style = format
        .field("saddr")
        .is_some_and(|f| f.size == SOCKADDR_IN6_SIZE);
    let (sockaddr_saddr, sockaddr_daddr, tuple) = if sockaddr_style {
        (
            format.offset("saddr"),
            format.offset("daddr"),
            TupleLayout::NONE,
        )
    } else {
        (NONE, NONE, tuple_layout(format))
    };
    ResetLayout {
        skaddr: format.offset("skaddr"),
        state: format.offset("state"),
        reason: format.offset("reason"),
        sockaddr_saddr,
        sockaddr_daddr,
        record_len: format.record_len(),
        skbaddr: format.offset("skbaddr"),
        _pad: 0,
        tuple,
    }
}

/// Checks that the fields a program cannot work without are present.
pub fn require_fields(format: &Format, what: &str, names: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| format.field(n).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "tracepoint {what} on this kernel lacks the field(s) {}: this kernel is not supported \
             by the tracepoint probes; try --probes kprobe",
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = include_str!("../tests/fixtures/6.18/inet_sock_set_state.format");
    const SEND_RESET: &str = include_str!("../tests/fixtures/6.18/tcp_send_reset.format");
    const SEND_RESET_6_1: &str = include_str!("../tests/fixtures/6.1/tcp_send_reset.format");
    const RECEIVE_RESET: &str = include_str!("../tests/fixtures/6.18/tcp_receive_reset.format");
    const ENTER_CLOSE: &str = include_str!("../tests/fixtures/6.18/sys_enter_close.format");

    #[test]
    fn set_state_layout_matches_the_format_file() {
        let layout = tuple_layout(&parse_format(SET_STATE).unwrap());
        assert_eq!(layout.skaddr, 8);
        assert_eq!(layout.oldstate, 16);
        assert_eq!(layout.newstate, 20);
        assert_eq!(layout.sport, 24);
        assert_eq!(layout.dport, 26);
        assert_eq!(layout.family, 28);
        assert_eq!(layout.protocol, 30);
        assert_eq!(layout.saddr, 32);
        assert_eq!(layout.daddr, 36);
        assert_eq!(layout.saddr_v6, 40);
        assert_eq!(layout.daddr_v6, 56);
    }

    #[test]
    fn send_reset_on_6_18_uses_sockaddr_blobs_and_has_a_reason() {
        let format = parse_format(SEND_RESET).unwrap();
        let layout = reset_layout(&format);
        assert_eq!(layout.skaddr, 16);
        assert_eq!(layout.state, 24);
        assert_eq!(layout.reason, 28);
        assert_eq!(layout.sockaddr_saddr, 32);
        assert_eq!(layout.sockaddr_daddr, 60);
        assert_eq!(layout.tuple, TupleLayout::NONE);
        let reasons = format.symbolic_names("reason");
        assert_eq!(
            reasons.get(&11).map(String::as_str),
            Some("TCP_ABORT_ON_CLOSE")
        );
        assert_eq!(reasons.get(&14).map(String::as_str), Some("TCP_STATE"));
        assert_eq!(reasons.get(&0).map(String::as_str), Some("NOT_SPECIFIED"));
    }

    #[test]
    fn send_reset_on_6_1_has_no_reason_and_separate_fields() {
        let format = parse_format(SEND_RESET_6_1).unwrap();
        let layout = reset_layout(&format);
        assert_eq!(layout.reason, NONE);
        assert_eq!(layout.sockaddr_saddr, NONE);
        assert_eq!(layout.skaddr, 16);
        assert_eq!(layout.state, 24);
        assert_eq!(layout.tuple.sport, 28);
        assert_eq!(layout.tuple.family, 32);
        assert_eq!(layout.tuple.saddr_v6, 42);
        assert!(format.symbolic_names("reason").is_empty());
    }

    #[test]
    fn receive_reset_layout_and_state_names() {
        let layout = tuple_layout(&parse_format(RECEIVE_RESET).unwrap());
        assert_eq!(layout.skaddr, 8);
        assert_eq!(layout.family, 20);
        assert_eq!(layout.oldstate, NONE);
        let names = parse_format(SET_STATE).unwrap().symbolic_names("newstate");
        assert_eq!(names.get(&4).map(String::as_str), Some("TCP_FIN_WAIT1"));
    }

    #[test]
    fn syscall_fd_field() {
        let format = parse_format(ENTER_CLOSE).unwrap();
        assert_eq!(format.offset("fd"), 16);
        assert_eq!(format.offset("nope"), NONE);
    }

    #[test]
    fn field_names_from_declarations() {
        assert_eq!(field_name("const void * skaddr").as_deref(), Some("skaddr"));
        assert_eq!(field_name("__u8 saddr_v6[16]").as_deref(), Some("saddr_v6"));
        assert_eq!(
            field_name("enum sk_rst_reason reason").as_deref(),
            Some("reason")
        );
        assert_eq!(field_name("void *sk").as_deref(), Some("sk"));
    }

    #[test]
    fn missing_fields_are_named() {
        let format = parse_format(SEND_RESET_6_1).unwrap();
        let err = require_fields(&format, "tcp:tcp_send_reset", &["skaddr", "reason"]).unwrap_err();
        assert!(err.to_string().contains("reason"), "{err}");
        require_fields(&format, "tcp:tcp_send_reset", &["skaddr", "state"]).unwrap();
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_format("name: x\nformat:\n").is_err());
    }
}
