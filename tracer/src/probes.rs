//! Which kernel hooks exist here, which ones to attach, and loading them with the run-time
//! configuration (tracepoint field offsets, filters) written into the programs' globals.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::Path,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::HashMap as BpfHashMap,
    programs::{KProbe, RawTracePoint, SocketFilter, TracePoint},
};
use tracer_common::{Config, FdLayout, RegsLayout, SkbLayout, SockLayout, TimewaitLayout};

use crate::{
    btf,
    kernel::ResetReasons,
    tracefs::{self, Format},
};

/// `--probes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    /// kprobes where the kernel has them; tracepoints, raw where the kernel's BTF allows; close
    /// and shutdown named from the closing task's registers (no syscall tracepoints) where the
    /// BTF and the kernel allow.
    Auto,
    /// Classic tracepoints only (records read at offsets from their format files), the
    /// syscall tracepoints included.
    Tracepoint,
    /// Tracepoints (raw where BTF allows) plus the tcp_close and tcp_send_active_reset kprobes.
    Kprobe,
}

impl ProbeMode {
    /// Whether raw tracepoints may stand in for classic ones, and the task's registers for the
    /// syscall tracepoints (where the kernel's BTF allows).
    pub fn allows_raw(self) -> bool {
        self != ProbeMode::Tracepoint
    }

    /// As written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ProbeMode::Auto => "auto",
            ProbeMode::Tracepoint => "tracepoint",
            ProbeMode::Kprobe => "kprobe",
        }
    }
}

/// The probe set actually used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeSet {
    Tracepoints,
    TracepointsAndKprobes,
}

/// Picks the probe set for a mode on a kernel with or without kprobes.
pub fn choose(mode: ProbeMode, kprobes_available: bool) -> anyhow::Result<ProbeSet> {
    match (mode, kprobes_available) {
        (ProbeMode::Tracepoint, _) | (ProbeMode::Auto, false) => Ok(ProbeSet::Tracepoints),
        (ProbeMode::Kprobe, true) | (ProbeMode::Auto, true) => Ok(ProbeSet::TracepointsAndKprobes),
        (ProbeMode::Kprobe, false) => bail!(
            "--probes kprobe: this kernel has no kprobes (no /sys/bus/event_source/devices/kprobe, \
             or tcp_close is not in /proc/kallsyms); use --probes tracepoint or auto"
        ),
    }
}

/// Where a program attaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attach {
    Tracepoint {
        group: &'static str,
        name: &'static str,
    },
    Kprobe {
        function: &'static str,
    },
    /// The same tracepoint without its record: the program gets the tracepoint's arguments.
    RawTracepoint {
        name: &'static str,
    },
}

/// One hook: a program of the eBPF object and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    pub program: &'static str,
    pub attach: Attach,
    /// Without a required hook the tracer cannot work at all.
    pub required: bool,
    /// What is lost without it, said when it is missing.
    pub without: &'static str,
}

impl Hook {
    pub fn name(&self) -> String {
        match &self.attach {
            Attach::Tracepoint { group, name } => format!("tracepoint:{group}:{name}"),
            Attach::Kprobe { function } => format!("kprobe:{function}"),
            Attach::RawTracepoint { name } => format!("raw_tracepoint:{name}"),
        }
    }
}

const fn tp(
    program: &'static str,
    group: &'static str,
    name: &'static str,
    required: bool,
    without: &'static str,
) -> Hook {
    hook(
        program,
        Attach::Tracepoint { group, name },
        required,
        without,
    )
}

const fn hook(
    program: &'static str,
    attach: Attach,
    required: bool,
    without: &'static str,
) -> Hook {
    Hook {
        program,
        attach,
        required,
        without,
    }
}

/// Every tracepoint hook, in attach order. The socket's destruction comes first: it removes
/// the entries the other hooks make in the owner table. Attached after them, a socket that got
/// an entry and was destroyed in between (tens of milliseconds on a busy host: each program is
/// verified as it is attached) left it to the next socket at its address, which the kernel
/// reuses at once: that connection then shared the dead one's `conn`, owner and received-reset
/// mark.
pub const TRACEPOINT_HOOKS: &[Hook] = &[
    tp(
        "destroy_sock",
        "tcp",
        "tcp_destroy_sock",
        false,
        "the owner table keeps every socket it saw until it is full",
    ),
    tp(
        "set_state",
        "sock",
        "inet_sock_set_state",
        true,
        "no TCP state changes",
    ),
    tp(
        "send_reset",
        "tcp",
        "tcp_send_reset",
        false,
        "no rst_sent events and no RST reasons",
    ),
    tp(
        "receive_reset",
        "tcp",
        "tcp_receive_reset",
        false,
        "a peer's RST shows as a plain state change",
    ),
    tp(
        "enter_close",
        "syscalls",
        "sys_enter_close",
        false,
        "`syscall` is null for close(2)",
    ),
    tp(
        "exit_call",
        "syscalls",
        "sys_exit_close",
        false,
        "`syscall` may be wrong after close(2)",
    ),
    tp(
        "enter_shutdown",
        "syscalls",
        "sys_enter_shutdown",
        false,
        "`syscall` is null for shutdown(2)",
    ),
    tp(
        "exit_call",
        "syscalls",
        "sys_exit_shutdown",
        false,
        "`syscall` may be wrong after shutdown(2)",
    ),
    tp(
        "process_exit",
        "sched",
        "sched_process_exit",
        false,
        "closes at process exit show `syscall: null`",
    ),
    tp(
        "process_fork",
        "task",
        "task_newtask",
        false,
        "with `--pid`, a forked child's close, shutdown or exit shows `syscall: null`",
    ),
    tp(
        "timer_expire",
        "timer",
        "timer_expire_entry",
        false,
        "a FIN_WAIT2 that times out (the peer never sent its FIN) shows no end",
    ),
    tp(
        "sock_io",
        "sock",
        "sock_send_length",
        false,
        "accepted sockets are attributed to the listener's owner until closed",
    ),
    tp(
        "sock_io",
        "sock",
        "sock_recv_length",
        false,
        "accepted sockets are attributed to the listener's owner until closed",
    ),
];

/// Raw tracepoint versions of classic hooks, used instead of them where the kernel's BTF gives
/// `struct sock`'s offsets (not with `--probes tracepoint`): each replaces the classic hook on
/// the tracepoint of the same name. No record is built for them and the socket arrives as an
/// argument; the syscall and exit hooks stay classic (their records are what they read).
pub const RAW_HOOKS: &[Hook] = &[
    raw(
        "set_state_raw",
        "inet_sock_set_state",
        true,
        "no TCP state changes",
    ),
    raw(
        "receive_reset_raw",
        "tcp_receive_reset",
        false,
        "a peer's RST shows as a plain state change",
    ),
    raw(
        "destroy_sock_raw",
        "tcp_destroy_sock",
        false,
        "the owner table keeps every socket it saw until it is full",
    ),
    raw(
        "timer_expire_raw",
        "timer_expire_entry",
        false,
        "a FIN_WAIT2 that times out (the peer never sent its FIN) shows no end",
    ),
    raw(
        "sock_io_raw",
        "sock_send_length",
        false,
        "accepted sockets are attributed to the listener's owner until closed",
    ),
    raw(
        "sock_io_raw",
        "sock_recv_length",
        false,
        "accepted sockets are attributed to the listener's owner until closed",
    ),
];

const fn raw(
    program: &'static str,
    name: &'static str,
    required: bool,
    without: &'static str,
) -> Hook {
    hook(program, Attach::RawTracepoint { name }, required, without)
}

/// The raw version of a classic tracepoint hook, if there is one.
fn raw_version(hook: &Hook) -> Option<&'static Hook> {
    let Attach::Tracepoint { name, .. } = hook.attach else {
        return None;
    };
    RAW_HOOKS
        .iter()
        .find(|raw| raw.attach == Attach::RawTracepoint { name })
}

/// The kprobes, used on kernels that have them.
pub const KPROBE_HOOKS: &[Hook] = &[
    Hook {
        program: "tcp_close",
        attach: Attach::Kprobe {
            function: "tcp_close",
        },
        required: false,
        without: "the closed socket is inferred from the first state change in the call",
    },
    Hook {
        program: "tcp_send_active_reset",
        attach: Attach::Kprobe {
            function: "tcp_send_active_reset",
        },
        required: false,
        without: "without the tcp_send_reset tracepoint, RSTs sent by close() are not seen",
    },
];

/// What this kernel offers.
#[derive(Clone, Debug)]
pub struct KernelSupport {
    pub release: String,
    pub btf: bool,
    /// `struct sock` offsets from the kernel's BTF, or why there are none.
    pub sock: Result<SockLayout, String>,
    /// The chain from a task to the socket behind its descriptor, or why there is none.
    pub fd: Result<FdLayout, String>,
    /// Where a task's saved registers keep its syscall, or why calls cannot be named from
    /// them (then the syscall tracepoints are attached).
    pub regs: Result<RegsLayout, String>,
    /// Where a segment's headers are, or why that is not known (then a reset a listener sends
    /// shows the listener's own addresses).
    pub skb: Result<SkbLayout, String>,
    /// Where a time-wait socket's timer and fields are and the kernel's time-wait timer
    /// function, or why that is not known (then a FIN_WAIT2 that times out shows no end).
    pub timewait: Result<TimewaitLayout, String>,
    pub kprobes: bool,
    pub formats: Formats,
}

/// The format files of the tracepoints the programs read.
#[derive(Clone, Debug, Default)]
pub struct Formats {
    pub set_state: Option<Format>,
    pub send_reset: Option<Format>,
    pub receive_reset: Option<Format>,
    pub destroy_sock: Option<Format>,
    pub enter_close: Option<Format>,
    pub enter_shutdown: Option<Format>,
    pub send_length: Option<Format>,
    pub recv_length: Option<Format>,
    pub new_task: Option<Format>,
    pub timer_expire: Option<Format>,
    /// Tracepoints that exist, by "group:name", for the hooks whose fields are not read.
    pub present: Vec<String>,
}

impl KernelSupport {
    /// Looks at the running kernel; `tracefs` is where tracefs is mounted, if it is.
    pub fn detect(tracefs: Option<&Path>) -> anyhow::Result<Self> {
        let formats = match tracefs {
            Some(root) => Formats::read(root)?,
            None => Formats::default(),
        };
        let layouts = btf::layouts(Path::new(btf::VMLINUX));
        let release = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let realtime = fs::read_to_string("/sys/kernel/realtime").is_ok_and(|s| s.trim() == "1");
        Ok(Self {
            regs: syscall_registers(layouts.regs, &release, realtime),
            release,
            btf: Path::new(btf::VMLINUX).exists(),
            sock: layouts.sock,
            fd: layouts.fd,
            skb: layouts.skb,
            timewait: timewait_layout(layouts.timewait),
            kprobes: kprobes_available(),
            formats,
        })
    }

    /// Whether a hook can be attached on this kernel.
    pub fn has(&self, hook: &Hook) -> bool {
        match &hook.attach {
            Attach::Tracepoint { group, name } => self
                .formats
                .present
                .iter()
                .any(|p| *p == format!("{group}:{name}")),
            Attach::Kprobe { function } => self.kprobes && kernel_has_symbol(function),
            // The timer hook is useful only with the time-wait socket's layout.
            _ if hook.program.starts_with("timer_expire") && self.usable_timewait().is_err() => {
                false
            }
            // A raw tracepoint exists wherever the classic one does; its programs need the
            // socket's layout.
            Attach::RawTracepoint { name } => {
                self.sock.is_ok()
                    && (self.formats.present.iter()).any(|p| p.rsplit(':').next() == Some(name))
            }
        }
    }

    /// The time-wait layout the timer programs need, or why there is none: they read a
    /// time-wait socket's own fields and, for its addresses, the full socket's (`sock`).
    pub fn usable_timewait(&self) -> Result<&TimewaitLayout, &str> {
        self.sock.as_ref().map_err(String::as_str)?;
        self.timewait.as_ref().map_err(String::as_str)
    }

    /// Whether close, shutdown and close_range are named from the task's registers instead of
    /// syscall tracepoints: with the BTF-based hooks (`raw`), where the kernel allows it.
    pub fn calls_from_registers(&self, raw: bool) -> bool {
        raw && self.regs.is_ok()
    }

    /// The hooks to attach for a probe set, and the ones this kernel lacks. With `raw`, the
    /// raw tracepoint versions replace their classic hooks where this kernel allows them, and
    /// no syscall tracepoint is attached where calls are named from the registers.
    pub fn plan(&self, set: ProbeSet, raw: bool) -> anyhow::Result<(Vec<Hook>, Vec<Hook>)> {
        self.plan_hooks(set, raw, self.calls_from_registers(raw))
    }

    /// `plan` with the syscall tracepoints, for programs that cannot read the registers.
    pub fn plan_with_syscall_hooks(
        &self,
        set: ProbeSet,
        raw: bool,
    ) -> anyhow::Result<(Vec<Hook>, Vec<Hook>)> {
        self.plan_hooks(set, raw, false)
    }

    fn plan_hooks(
        &self,
        set: ProbeSet,
        raw: bool,
        from_registers: bool,
    ) -> anyhow::Result<(Vec<Hook>, Vec<Hook>)> {
        let mut wanted: Vec<Hook> = TRACEPOINT_HOOKS
            .iter()
            .filter(|hook| !(from_registers && is_syscall_hook(hook)))
            .map(|hook| match raw_version(hook) {
                Some(raw_hook) if raw && self.has(raw_hook) => raw_hook.clone(),
                _ => hook.clone(),
            })
            .collect();
        if set == ProbeSet::TracepointsAndKprobes {
            // tcp_send_active_reset() has called trace_tcp_send_reset(sk, NULL) since long
            // before 6.10 (seen on Debian's 6.1 in the VM suite): where the tracepoint exists,
            // the kprobe would report every active RST a second time.
            let covered = self.formats.send_reset.is_some();
            wanted.extend(
                KPROBE_HOOKS
                    .iter()
                    .filter(|h| !(covered && h.program == "tcp_send_active_reset"))
                    .cloned(),
            );
        }
        let (present, missing): (Vec<Hook>, Vec<Hook>) =
            wanted.into_iter().partition(|h| self.has(h));
        if let Some(required) = missing.iter().find(|h| h.required) {
            bail!(
                "this kernel has no {}: the tracer cannot work here (it needs Linux 4.16 or later \
                 with CONFIG_TRACEPOINTS)",
                required.name()
            );
        }
        Ok((present, missing))
    }
}

impl Formats {
    fn read(root: &Path) -> anyhow::Result<Self> {
        let read = |group: &str, name: &str| tracefs::read_format(root, group, name);
        let mut formats = Self {
            set_state: read("sock", "inet_sock_set_state")?,
            send_reset: read("tcp", "tcp_send_reset")?,
            receive_reset: read("tcp", "tcp_receive_reset")?,
            destroy_sock: read("tcp", "tcp_destroy_sock")?,
            enter_close: read("syscalls", "sys_enter_close")?,
            enter_shutdown: read("syscalls", "sys_enter_shutdown")?,
            send_length: read("sock", "sock_send_length")?,
            recv_length: read("sock", "sock_recv_length")?,
            new_task: read("task", "task_newtask")?,
            timer_expire: read("timer", "timer_expire_entry")?,
            present: Vec::new(),
        };
        for hook in TRACEPOINT_HOOKS {
            if let Attach::Tracepoint { group, name } = hook.attach
                && root
                    .join("events")
                    .join(group)
                    .join(name)
                    .join("format")
                    .exists()
            {
                formats.present.push(format!("{group}:{name}"));
            }
        }
        Ok(formats)
    }

    /// The kernel programs' configuration: every offset comes from these format files.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::zeroed();
        let set_state = self
            .set_state
            .as_ref()
            .context("this kernel has no sock:inet_sock_set_state tracepoint")?;
        tracefs::require_fields(
            set_state,
            "sock:inet_sock_set_state",
            &[
                "skaddr", "oldstate", "newstate", "sport", "dport", "family", "saddr", "daddr",
            ],
        )?;
        cfg.set_state = tracefs::tuple_layout(set_state);
        if let Some(f) = &self.receive_reset {
            cfg.receive_reset = tracefs::tuple_layout(f);
        }
        if let Some(f) = &self.destroy_sock {
            cfg.destroy_sock = tracefs::tuple_layout(f);
        }
        if let Some(f) = &self.send_reset {
            cfg.send_reset = tracefs::reset_layout(f);
        }
        if let Some(f) = &self.enter_close {
            cfg.close_fd = f.offset("fd");
        }
        if let Some(f) = &self.enter_shutdown {
            cfg.shutdown_fd = f.offset("fd");
            cfg.shutdown_how = f.offset("how");
        }
        if let Some(f) = &self.new_task {
            cfg.newtask_pid = f.offset("pid");
            cfg.newtask_flags = f.offset("clone_flags");
        }
        if let Some(f) = &self.timer_expire {
            cfg.timewait.record_timer = f.offset("timer");
        }
        if let (Some(send), Some(recv)) = (&self.send_length, &self.recv_length) {
            let same = send.offset("sk") == recv.offset("sk")
                && send.offset("protocol") == recv.offset("protocol");
            if same {
                cfg.io_skaddr = send.offset("sk");
                cfg.io_protocol = send.offset("protocol");
                cfg.io_record_len = send.record_len().max(recv.record_len());
            }
        }
        Ok(cfg)
    }

    /// Names of the kernel's RST reasons (empty before 6.10).
    pub fn reset_reasons(&self) -> ResetReasons {
        ResetReasons::new(
            self.send_reset
                .as_ref()
                .map(|f| f.symbolic_names("reason"))
                .unwrap_or_default(),
        )
    }
}

/// Whether an abortive close can wait in the kernel for its RST (tracer-ebpf `held`): the
/// RST's tracepoint and the socket's destruction release it, so both must be attached.
pub fn holds_aborts(hooks: &[Hook]) -> bool {
    hooks.iter().any(|h| h.program == "send_reset")
        && hooks.iter().any(|h| h.program.starts_with("destroy_sock"))
}

fn is_syscall_hook(hook: &Hook) -> bool {
    matches!(
        hook.attach,
        Attach::Tracepoint {
            group: "syscalls",
            ..
        }
    )
}

/// The registers' layout with this architecture's teardown syscall numbers, where calls can be
/// named from them: `bpf_task_pt_regs` came in 5.15, and with PREEMPT_RT softirqs run on the
/// task's own stack (a peer's packet processed there would look like the task's doing).
fn syscall_registers(
    layout: Result<RegsLayout, String>,
    release: &str,
    realtime: bool,
) -> Result<RegsLayout, String> {
    let mut layout = layout?;
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    if version.as_slice() < [5, 15].as_slice() {
        return Err(format!("Linux {release} has no bpf_task_pt_regs (5.15)"));
    }
    if realtime {
        return Err("a PREEMPT_RT kernel runs softirqs on the task's stack".into());
    }
    let nr = |n: libc::c_long| u16::try_from(n).map_err(|_| format!("syscall number {n}"));
    layout.nr_close = nr(libc::SYS_close)?;
    layout.nr_shutdown = nr(libc::SYS_shutdown)?;
    layout.nr_close_range = nr(libc::SYS_close_range)?;
    Ok(layout)
}

/// The time-wait layout with the address of the kernel's time-wait timer function.
fn timewait_layout(layout: Result<TimewaitLayout, String>) -> Result<TimewaitLayout, String> {
    let mut layout = layout?;
    layout.handler = kallsyms_address("tw_timer_handler")
        .filter(|&address| address != 0)
        .ok_or("/proc/kallsyms shows no address for tw_timer_handler")?;
    Ok(layout)
}

/// The perf kprobe PMU is what aya attaches kprobes through.
fn kprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
        && kernel_has_symbol("tcp_close")
}

fn kernel_has_symbol(name: &str) -> bool {
    kallsyms_address(name).is_some()
}

/// A kernel symbol's address in /proc/kallsyms, read up to its line: None when the kernel
/// has no such symbol, Some(0) when its address is hidden from this user (kptr_restrict).
fn kallsyms_address(name: &str) -> Option<u64> {
    let file = fs::File::open("/proc/kallsyms").ok()?;
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.next()?;
            (fields.nth(1)? == name).then(|| u64::from_str_radix(address, 16).unwrap_or(0))
        })
}

/// Runtime knobs for loading.
pub struct LoadOptions<'a> {
    pub config: Config,
    pub ringbuf_bytes: u32,
    pub pids: &'a [u32],
    pub ports: &'a [u16],
    pub tables: TableSizes,
}

/// Entries of the kernel tables that hold one entry per socket, fitted to the host at start-up:
/// all are preallocated hash maps (~110 bytes an entry), so one fixed size would either waste
/// kernel memory on a small host or, on a host with more sockets than entries, leave sockets
/// without an owner (a big proxy: `kernel.owner_table_full` in the summary, and the
/// connections that could not be seeded in the `ready` line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSizes {
    /// SOCKS: the sockets the programs have seen, while they live.
    pub socks: u32,
    /// SEED: the owners of the connections found at start-up.
    pub seed: u32,
    /// WATCHED (with `--pid`): the traced connections' 4-tuples the capture filter passes, an
    /// LRU map: one too small drops the oldest, a long-lived connection's, whose FIN then
    /// never reaches the daemon.
    pub watched: u32,
}

impl TableSizes {
    const SOCKS_MIN: u64 = 65536;
    const SEED_MIN: u64 = 16384;
    /// 2^18 entries, ~30 MB of kernel memory for SOCKS (~112 bytes an entry, 16 a bucket):
    /// proportionate only on a host that already has over 100k TCP sockets.
    const MAX: u64 = 1 << 18;

    /// For a host with `sockets` TCP sockets allocated (`sockets::tcp_sockets_allocated`): room
    /// for twice as many live sockets, and for a quarter more connections than there are to
    /// seed (more open while the tracer starts).
    pub fn for_host(sockets: u64) -> Self {
        let fit = |want: u64, min: u64| want.clamp(min, Self::MAX).next_power_of_two() as u32;
        Self {
            socks: fit(sockets.saturating_mul(2), Self::SOCKS_MIN),
            seed: fit(sockets.saturating_add(sockets / 4), Self::SEED_MIN),
            watched: fit(sockets.saturating_mul(2), Self::SOCKS_MIN),
        }
    }
}

/// The loaded object and what was attached.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub attached: Vec<String>,
}

/// The eBPF object built by build.rs, embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Loads the programs with their configuration, fills the filter maps, attaches the hooks.
pub fn load(opts: &LoadOptions<'_>, hooks: &[Hook]) -> anyhow::Result<Loaded> {
    let mut ebpf = EbpfLoader::new()
        // The programs read fields at offsets from tracefs format files and from our own BTF
        // reader (btf.rs), never through CO-RE relocations: no relocation against the kernel's
        // BTF. (aya 0.14's constructor has parsed it already, a transient few MB at start-up.)
        .btf(None)
        .override_global("CONFIG", &opts.config, true)
        .map_max_entries("EVENTS", opts.ringbuf_bytes)
        .map_max_entries("SOCKS", opts.tables.socks)
        .map_max_entries("SEED", opts.tables.seed)
        .map_max_entries("WATCHED", opts.tables.watched)
        .load(EBPF_OBJECT)
        .map_err(explain_load_error)?;
    fill_filter::<u32>(&mut ebpf, "PIDS", opts.pids)?;
    fill_filter::<u16>(&mut ebpf, "PORTS", opts.ports)?;
    let mut attached = Vec::new();
    for hook in hooks {
        let hook = match attach(&mut ebpf, hook) {
            Ok(()) => hook,
            // A kernel whose verifier or raw tracepoints refuse the raw program still has the
            // classic tracepoint: slower, same lines.
            Err(e) if classic_version(hook).is_some() => {
                let classic = classic_version(hook).expect("checked");
                eprintln!(
                    "tracer: {} could not be attached ({e:#}): using {} instead",
                    hook.name(),
                    classic.name()
                );
                attach(&mut ebpf, classic)
                    .with_context(|| format!("attaching {}", classic.name()))?;
                classic
            }
            Err(e) => return Err(e.context(format!("attaching {}", hook.name()))),
        };
        attached.push(hook.name());
    }
    Ok(Loaded { ebpf, attached })
}

/// The classic tracepoint hook a raw one stands for.
fn classic_version(hook: &Hook) -> Option<&'static Hook> {
    let Attach::RawTracepoint { name } = hook.attach else {
        return None;
    };
    TRACEPOINT_HOOKS
        .iter()
        .find(|classic| matches!(classic.attach, Attach::Tracepoint { name: n, .. } if n == name))
}

/// With `--pid`: the capture socket gets the kernel filter that passes only traced processes'
/// connections (tracer-ebpf/src/capture_filter.rs), instead of every FIN and RST of the host.
/// Where the kernel refuses it, the capture keeps its classic filter and the daemon sorts the
/// packets itself: slower, never wrong (and said on stderr).
pub fn filter_capture_to_traced(ebpf: &mut Ebpf, capture: std::os::fd::BorrowedFd<'_>) {
    let mut attach = || -> anyhow::Result<()> {
        let program: &mut SocketFilter = ebpf
            .program_mut("watched_packets")
            .context("program watched_packets missing from the eBPF object")?
            .try_into()?;
        // Loaded once, attached to each capture socket (another namespace's loopback too).
        if program.fd().is_err() {
            program.load().map_err(explain_verifier)?;
        }
        program.attach(capture)?;
        Ok(())
    };
    if let Err(e) = attach() {
        eprintln!(
            "tracer: --pid: the capture keeps its plain filter ({e:#}): every FIN and RST of \
             the host is copied to the daemon and sorted there"
        );
    }
}

fn fill_filter<K: aya::Pod>(ebpf: &mut Ebpf, map: &str, keys: &[K]) -> anyhow::Result<()> {
    let mut table: BpfHashMap<_, K, u8> = BpfHashMap::try_from(
        ebpf.map_mut(map)
            .with_context(|| format!("map {map} missing from the eBPF object"))?,
    )?;
    for key in keys {
        table.insert(key, 1, 0)?;
    }
    Ok(())
}

fn attach(ebpf: &mut Ebpf, hook: &Hook) -> anyhow::Result<()> {
    let program = ebpf
        .program_mut(hook.program)
        .with_context(|| format!("program {} missing from the eBPF object", hook.program))?;
    match hook.attach {
        Attach::Tracepoint { group, name } => {
            let tp: &mut TracePoint = program.try_into()?;
            if tp.fd().is_err() {
                tp.load().map_err(explain_verifier)?;
            }
            tp.attach(group, name)?;
        }
        Attach::Kprobe { function } => {
            let kp: &mut KProbe = program.try_into()?;
            if kp.fd().is_err() {
                kp.load().map_err(explain_verifier)?;
            }
            kp.attach(function, 0)?;
        }
        Attach::RawTracepoint { name } => {
            let tp: &mut RawTracePoint = program.try_into()?;
            if tp.fd().is_err() {
                tp.load().map_err(explain_verifier)?;
            }
            tp.attach(name)?;
        }
    }
    Ok(())
}

fn explain_verifier(e: aya::programs::ProgramError) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("EPERM") || text.contains("Operation not permitted") {
        return anyhow::anyhow!(
            "{text}: the kernel refused to load BPF programs; {PRIVILEGE_HINT}"
        );
    }
    match e {
        aya::programs::ProgramError::LoadError { .. } => VerifierRefused(text).into(),
        _ => anyhow::anyhow!(text),
    }
}

/// The kernel's verifier refused a program (as opposed to missing privileges, memory or a
/// hook): another build of the programs may pass where this one did not.
#[derive(Debug)]
pub struct VerifierRefused(String);

impl std::fmt::Display for VerifierRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VerifierRefused {}

fn explain_load_error(e: aya::EbpfError) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("EPERM") || text.contains("Operation not permitted") {
        anyhow::anyhow!("loading the eBPF object failed ({text}); {PRIVILEGE_HINT}")
    } else {
        anyhow::anyhow!("loading the eBPF object failed: {text}")
    }
}

pub const PRIVILEGE_HINT: &str = "run as root (sudo): besides CAP_BPF, CAP_PERFMON and \
                                  CAP_NET_RAW it reads root's tracefs and other processes' \
                                  /proc/PID/fd, and enters network namespaces";

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::NONE;

    /// run.rs retries without the register-reading programs only after a verifier refusal:
    /// missing privileges or memory would fail the same way twice, under a misleading message.
    #[test]
    fn only_a_verifier_refusal_is_marked_for_a_retry() {
        use aya::programs::ProgramError;
        let refused = explain_verifier(ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(libc::EACCES),
            verifier_log: aya_obj::VerifierLog::new("R1 invalid mem access 'scalar'".into()),
        })
        .context("attaching set_state_raw");
        assert!(refused.downcast_ref::<VerifierRefused>().is_some());
        assert!(format!("{refused:#}").contains("invalid mem access"));
        let not_permitted = explain_verifier(ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(libc::EPERM),
            verifier_log: aya_obj::VerifierLog::new(String::new()),
        });
        assert!(not_permitted.downcast_ref::<VerifierRefused>().is_none());
        assert!(format!("{not_permitted:#}").contains("CAP_BPF"));
        let no_memory = explain_verifier(ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_prog_load",
            io_error: std::io::Error::from_raw_os_error(libc::ENOMEM),
        }));
        assert!(no_memory.downcast_ref::<VerifierRefused>().is_none());
    }

    #[test]
    fn tables_fit_the_host_within_bounds() {
        let small = TableSizes::for_host(300);
        assert_eq!((small.socks, small.seed), (65536, 16384), "the minimums");
        assert_eq!(small.watched, 65536);
        let proxy = TableSizes::for_host(70_000);
        assert_eq!((proxy.socks, proxy.seed), (1 << 18, 1 << 17));
        assert_eq!(proxy.watched, 1 << 18);
        assert!(proxy.seed as u64 >= 70_000 + 70_000 / 4);
        let huge = TableSizes::for_host(10_000_000);
        assert_eq!((huge.socks, huge.seed), (1 << 18, 1 << 18), "the maximum");
    }

    #[test]
    fn auto_picks_tracepoints_without_kprobes() {
        assert_eq!(
            choose(ProbeMode::Auto, false).unwrap(),
            ProbeSet::Tracepoints
        );
    }

    #[test]
    fn auto_picks_kprobes_when_the_kernel_has_them() {
        assert_eq!(
            choose(ProbeMode::Auto, true).unwrap(),
            ProbeSet::TracepointsAndKprobes
        );
    }

    #[test]
    fn explicit_modes() {
        assert_eq!(
            choose(ProbeMode::Tracepoint, true).unwrap(),
            ProbeSet::Tracepoints
        );
        assert_eq!(
            choose(ProbeMode::Kprobe, true).unwrap(),
            ProbeSet::TracepointsAndKprobes
        );
        let err = choose(ProbeMode::Kprobe, false).unwrap_err().to_string();
        assert!(err.contains("no kprobes"), "{err}");
    }

    fn support_with(present: &[&str]) -> KernelSupport {
        KernelSupport {
            release: "test".into(),
            btf: true,
            sock: Err("not read in tests".into()),
            fd: Err("not read in tests".into()),
            regs: Err("not read in tests".into()),
            skb: Err("not read in tests".into()),
            timewait: Err("not read in tests".into()),
            kprobes: false,
            formats: Formats {
                present: present.iter().map(|s| s.to_string()).collect(),
                ..Formats::default()
            },
        }
    }

    #[test]
    fn plan_reports_missing_optional_hooks_and_refuses_without_set_state() {
        let support = support_with(&["sock:inet_sock_set_state", "tcp:tcp_send_reset"]);
        let (present, missing) = support.plan(ProbeSet::Tracepoints, false).unwrap();
        let names: Vec<String> = present.iter().map(Hook::name).collect();
        assert_eq!(
            names,
            [
                "tracepoint:sock:inet_sock_set_state",
                "tracepoint:tcp:tcp_send_reset"
            ]
        );
        assert!(
            missing
                .iter()
                .any(|h| h.name() == "tracepoint:tcp:tcp_receive_reset")
        );
        assert!(
            support_with(&["tcp:tcp_send_reset"])
                .plan(ProbeSet::Tracepoints, false)
                .is_err()
        );
    }

    #[test]
    fn config_offsets_come_from_format_files() {
        let read = |p: &str| Some(tracefs::parse_format(p).unwrap());
        let formats = Formats {
            set_state: read(include_str!(
                "../tests/fixtures/6.18/inet_sock_set_state.format"
            )),
            send_reset: read(include_str!("../tests/fixtures/6.1/tcp_send_reset.format")),
            enter_close: read(include_str!(
                "../tests/fixtures/6.18/sys_enter_close.format"
            )),
            new_task: read(include_str!("../tests/fixtures/6.18/task_newtask.format")),
            ..Formats::default()
        };
        let cfg = formats.config().unwrap();
        assert_eq!((cfg.newtask_pid, cfg.newtask_flags), (8, 32));
        assert_eq!(cfg.set_state.newstate, 20);
        // The programs copy each record up to the end of its last field in one read.
        assert_eq!(cfg.set_state.record_len, 72);
        assert_eq!(cfg.send_reset.record_len, 74);
        assert_eq!(cfg.close_fd, 16);
        assert_eq!(cfg.send_reset.reason, NONE);
        assert_eq!(cfg.io_skaddr, NONE);
        assert!(formats.reset_reasons().is_empty());
    }

    /// With the registers' layout, close and shutdown are named without the syscall
    /// tracepoints (which slow every syscall of the host); `--probes tracepoint`, or a kernel
    /// without the layout, keeps them.
    #[test]
    fn syscall_tracepoints_are_planned_only_without_the_registers() {
        let all = [
            "sock:inet_sock_set_state",
            "syscalls:sys_enter_close",
            "syscalls:sys_exit_close",
            "syscalls:sys_enter_shutdown",
            "syscalls:sys_exit_shutdown",
            "sched:sched_process_exit",
        ];
        let mut support = support_with(&all);
        let syscall_hooks = |s: &KernelSupport, raw: bool| {
            let (hooks, _) = s.plan(ProbeSet::Tracepoints, raw).unwrap();
            hooks.iter().filter(|h| is_syscall_hook(h)).count()
        };
        assert_eq!(syscall_hooks(&support, true), 4);
        support.regs = Ok(RegsLayout::NONE);
        assert_eq!(syscall_hooks(&support, true), 0);
        assert_eq!(syscall_hooks(&support, false), 4);
        let (with, _) = support
            .plan_with_syscall_hooks(ProbeSet::Tracepoints, true)
            .unwrap();
        assert_eq!(with.iter().filter(|h| is_syscall_hook(h)).count(), 4);
        // Process exit is no syscall tracepoint: it stays.
        assert!(
            with.iter()
                .any(|h| h.name() == "tracepoint:sched:sched_process_exit")
        );
    }

    #[test]
    fn registers_name_calls_from_5_15_and_not_on_realtime_kernels() {
        let layout = || Ok(RegsLayout::NONE);
        let regs = syscall_registers(layout(), "6.1.0-21-amd64", false).unwrap();
        assert_eq!(regs.nr_close, libc::SYS_close as u16);
        assert_eq!(regs.nr_shutdown, libc::SYS_shutdown as u16);
        assert!(syscall_registers(layout(), "5.15.0", false).is_ok());
        let old = syscall_registers(layout(), "5.10.209", false).unwrap_err();
        assert!(old.contains("5.15"), "{old}");
        assert!(syscall_registers(layout(), "6.18.44", true).is_err());
        assert!(syscall_registers(Err("no pt_regs".into()), "6.18", false).is_err());
    }

    /// The raw tracepoint replaces the classic set_state hook only when asked for and when the
    /// kernel's BTF gave the socket's layout; `--probes tracepoint` keeps the classic one.
    #[test]
    fn the_raw_set_state_hook_needs_the_sock_layout_and_is_not_forced() {
        let mut support = support_with(&["sock:inet_sock_set_state"]);
        let first =
            |s: &KernelSupport, raw: bool| s.plan(ProbeSet::Tracepoints, raw).unwrap().0[0].name();
        assert_eq!(first(&support, true), "tracepoint:sock:inet_sock_set_state");
        support.sock = Ok(SockLayout::NONE);
        assert_eq!(first(&support, true), "raw_tracepoint:inet_sock_set_state");
        assert_eq!(
            first(&support, false),
            "tracepoint:sock:inet_sock_set_state"
        );
    }

    /// The hook that removes owner-table entries goes in before any hook that makes them (see
    /// `TRACEPOINT_HOOKS`), whichever versions are planned.
    #[test]
    fn the_destruction_hook_is_attached_first() {
        let mut support = support_with(&[
            "sock:inet_sock_set_state",
            "tcp:tcp_send_reset",
            "tcp:tcp_receive_reset",
            "tcp:tcp_destroy_sock",
            "sock:sock_send_length",
        ]);
        support.sock = Ok(SockLayout::NONE);
        for set in [ProbeSet::Tracepoints, ProbeSet::TracepointsAndKprobes] {
            for raw in [false, true] {
                let (hooks, _) = support.plan(set, raw).unwrap();
                assert!(hooks.len() > 3);
                assert!(
                    hooks[0].name().ends_with("tcp_destroy_sock"),
                    "{set:?} raw={raw}: {}",
                    hooks[0].name()
                );
            }
        }
    }

    /// A raw hook that a kernel refuses falls back to its classic hook, so each must have one
    /// (and a raw hook stands in for exactly that classic hook when planned).
    #[test]
    fn every_raw_hook_stands_for_a_classic_one() {
        for raw_hook in RAW_HOOKS {
            let classic = classic_version(raw_hook)
                .unwrap_or_else(|| panic!("{} has no classic hook", raw_hook.name()));
            assert_eq!(raw_version(classic), Some(raw_hook), "{}", raw_hook.name());
            assert_eq!(classic.required, raw_hook.required);
        }
    }

    /// 6.1's tcp_send_reset tracepoint fires for active resets too (seen in the VM suite): where
    /// it exists, the tcp_send_active_reset kprobe would report each of them a second time.
    #[test]
    fn the_active_reset_kprobe_is_planned_only_without_the_tracepoint() {
        let planned = |send_reset: bool| {
            let mut support = support_with(&["sock:inet_sock_set_state", "tcp:tcp_send_reset"]);
            support.kprobes = true;
            if send_reset {
                support.formats.send_reset = Some(
                    tracefs::parse_format(include_str!(
                        "../tests/fixtures/6.1/tcp_send_reset.format"
                    ))
                    .unwrap(),
                );
            }
            let (present, missing) = support.plan(ProbeSet::TracepointsAndKprobes, true).unwrap();
            present
                .iter()
                .chain(&missing)
                .any(|h| h.program == "tcp_send_active_reset")
        };
        assert!(!planned(true));
        assert!(planned(false));
    }
}
