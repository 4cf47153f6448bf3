//! `cargo xtask vm-test`: the teardown scenarios on Debian 12's own 6.1 kernel (which has
//! kprobes) under qemu without KVM, and on the host kernel; their normalized lines compared,
//! where every difference must be one of the expected ones in `compare::EXPECTED`.
//!
//! The kernel package is fetched with `apt-get download` and unpacked under target/vm/ (never
//! installed on the host), and cached there. The VM boots from an initramfs built here
//! (`initramfs`) and reports on the serial console.

mod compare;
mod cpio;
mod initramfs;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{bootstrap, cmd};

/// The Debian packages the VM needs, each with why.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "qemu-system-x86",
        "`cargo xtask vm-test` boots Debian's 6.1 kernel under qemu",
    ),
    (
        "busybox-static",
        "the VM's shell and tools, in its initramfs",
    ),
];

/// The metapackage whose dependency is the current Debian 12 kernel image.
const KERNEL_META: &str = "linux-image-amd64";
const KERNEL_SERIES: &str = "linux-image-6.1.";
/// A TCG boot takes ~5 s and the whole run ~30 s here. The init script bounds each step and
/// powers off by its watchdog; this is for a VM that hangs beyond that (a kernel stuck).
const VM_TIMEOUT: Duration = Duration::from_secs(initramfs::WATCHDOG_S as u64 + 60);
/// The kernel reaches init in ~4 s here under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of the console quoted when the VM fails: where it was.
const CONSOLE_TAIL: usize = 30;

/// One named result per kernel and probe set, in the order they ran.
pub type Results = Vec<(String, Result<String, String>)>;

/// `cargo xtask vm-test`: prints each result like a cargo test line.
pub fn run_task() -> anyhow::Result<ExitCode> {
    bootstrap::run(false)?;
    let results = run()?;
    let mut failed = 0;
    for (name, result) in &results {
        match result {
            Ok(note) => println!("test {name} ... ok{note}"),
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    println!("{} passed, {failed} failed", results.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Installs qemu and busybox, builds, boots, runs the host's scenarios, compares.
pub fn run() -> anyhow::Result<Results> {
    if !cmd::is_root() {
        bail!(
            "the VM test runs the tracer on the host too, which loads BPF programs: run it as root"
        );
    }
    bootstrap::install_packages(PACKAGES)?;
    cmd::status(cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "tracer",
        "-p",
        "tracer-scenarios",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::root().join("target"));
    let bin = target.join("release");
    let dir = target.join("vm");
    fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let kernel = fetch_kernel(&dir)?;
    let initrd = dir.join("initramfs.cpio");
    initramfs::build(&bin.join("tracer"), &bin.join("tracer-scenarios"), &initrd)?;
    let host = run_host(&bin, &dir, "auto");
    // The host's auto set is the raw tracepoints: the classic programs run here too.
    let host_classic = run_host(&bin, &dir, "tracepoint");
    let log = dir.join("serial-6.1.log");
    let serial = match boot(&kernel, &initrd, &log)? {
        Boot::Done(serial) => serial,
        Boot::Hung => {
            // Seen once on CI: an emulated kernel that never reached init says nothing about
            // the tracer. A second hang fails.
            eprintln!(
                "xtask: the VM's kernel did not reach init within {BOOT_TIMEOUT:?}, booting \
                 once more; its console:\n{}",
                console_tail(&log)
            );
            match boot(&kernel, &initrd, &log)? {
                Boot::Done(serial) => serial,
                Boot::Hung => bail!(
                    "the VM's kernel did not reach init within {BOOT_TIMEOUT:?}, twice: see {}; \
                     its console ended with:\n{}",
                    log.display(),
                    console_tail(&log)
                ),
            }
        }
    };
    // The VM's timeline (each step's start in its uptime), for a slow or stopped run.
    serial
        .lines()
        .filter_map(step_of)
        .for_each(|l| eprintln!("xtask: {}", l.trim_end_matches('\r')));
    let vm = Sections::parse(&serial);
    let formats = save_formats(&vm, &dir.join("formats-6.1"));
    let mut results = vec![
        (
            "vm::host".to_string(),
            host.as_ref()
                .map_err(|e| e.clone())
                .and_then(|r| compare::own_checks(r, "host")),
        ),
        (
            "vm::host-tracepoint".to_string(),
            host_classic.and_then(|r| compare::own_checks(&r, "host, --probes tracepoint")),
        ),
    ];
    for mode in initramfs::MODES {
        let name = format!("vm::debian-6.1-{mode}");
        let result = vm
            .report(mode)
            .and_then(|r| compare::vm_checks(&r, host.as_ref().ok(), mode));
        results.push((name, result));
    }
    results.push(("vm::debian-6.1-formats".to_string(), formats));
    for (name, args) in initramfs::PID_RUNS {
        let result = vm
            .get(&format!("pid {name}"))
            .ok_or_else(|| format!("the VM printed no `pid {name}` section"))
            .and_then(|text| compare::pid_filter_checks(text, args));
        results.push((format!("vm::debian-6.1-pid-{name}"), result));
    }
    eprintln!(
        "xtask: vm-test took {:.0} s (host and VM)",
        started.elapsed().as_secs_f64()
    );
    Ok(results)
}

/// The scenarios on this machine's kernel, with the probes `mode` picks here.
fn run_host(bin: &Path, dir: &Path, mode: &str) -> Result<Value, String> {
    let out = dir.join(format!("report-host-{mode}.json"));
    let status = Command::new(bin.join("tracer-scenarios"))
        .args(["run", "--tracer"])
        .arg(bin.join("tracer"))
        .args(["--probes", mode, "--out"])
        .arg(&out)
        .status()
        .map_err(|e| format!("starting tracer-scenarios: {e}"))?;
    let text = fs::read_to_string(&out).map_err(|e| format!("no host report ({status}): {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("host report: {e}"))
}

/// The current Debian 12 kernel image package's vmlinuz, downloaded and unpacked once.
fn fetch_kernel(dir: &Path) -> anyhow::Result<PathBuf> {
    let package = kernel_package()?;
    let kdir = dir.join("kernel").join(&package);
    let vmlinuz = kdir.join("vmlinuz");
    if vmlinuz.is_file() {
        return Ok(vmlinuz);
    }
    fs::create_dir_all(&kdir)?;
    eprintln!(
        "xtask: downloading {package} (~70 MB) with apt-get download, into {}",
        kdir.display()
    );
    cmd::status(
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&kdir),
    )?;
    let deb = fs::read_dir(&kdir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    unpack_boot(&deb, &kdir)?;
    let boot = kdir.join("boot");
    for entry in fs::read_dir(&boot)?.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(kind) = ["vmlinuz", "config"].iter().find(|k| name.starts_with(*k)) {
            fs::rename(entry.path(), kdir.join(kind))?;
        }
    }
    // Only the kernel and its config are kept: the .deb is 70 MB.
    fs::remove_dir_all(&boot)?;
    fs::remove_file(&deb)?;
    if !vmlinuz.is_file() {
        bail!("{} has no /boot/vmlinuz-*", deb.display());
    }
    Ok(vmlinuz)
}

/// `linux-image-6.1.0-N-amd64`, from the metapackage's dependency in the apt sources.
fn kernel_package() -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", KERNEL_META])
        .output()
        .context("running apt-cache (the VM test takes Debian's kernel from apt)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let package = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::to_string);
    match package {
        Some(p) if p.starts_with(KERNEL_SERIES) => Ok(p),
        Some(p) => bail!(
            "{KERNEL_META} here is {p}, not Debian 12's 6.1: the VM test needs the bookworm apt \
             sources (deb.debian.org/debian bookworm)"
        ),
        None => bail!(
            "{KERNEL_META} is not in the apt sources: add Debian 12 (bookworm) and run \
             apt-get update"
        ),
    }
}

/// `dpkg-deb --fsys-tarfile DEB | tar -x ./boot`: the image's /boot only, nothing installed.
fn unpack_boot(deb: &Path, into: &Path) -> anyhow::Result<()> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("running dpkg-deb")?;
    let tar = Command::new("tar")
        .args(["-x", "-C"])
        .arg(into)
        .args(["--wildcards", "./boot/*"])
        .stdin(dpkg.stdout.take().expect("piped"))
        .status()
        .context("running tar")?;
    let dpkg = dpkg.wait()?;
    if !tar.success() || !dpkg.success() {
        bail!(
            "unpacking {} failed (dpkg-deb {dpkg}, tar {tar})",
            deb.display()
        );
    }
    Ok(())
}

/// How a boot ended: powered off (the console text), or stuck before init's first step.
enum Boot {
    Done(String),
    Hung,
}

/// Boots the kernel under qemu (TCG: no KVM needed), serial console to `log`. Killed when init
/// has not begun its first step within `BOOT_TIMEOUT`, or has not powered off within
/// `VM_TIMEOUT`.
fn boot(kernel: &Path, initrd: &Path, log: &Path) -> anyhow::Result<Boot> {
    let qemu = cmd::which("qemu-system-x86_64")
        .context("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")?;
    let _ = fs::remove_file(log);
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
    ])
    .args([
        "-nodefaults",
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
    ])
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    // panic=-1: a panic reboots, which -no-reboot turns into an exit.
    .args([
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
    ])
    .stdin(Stdio::null());
    // TCG runs several times slower on a busy host: say how busy it is.
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "xtask: booting {} under qemu (TCG); host load average {}",
        kernel.display(),
        load.split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu")?;
    let mut began = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > BOOT_TIMEOUT && !began {
            // Looked at once the boot is due, until init is seen: not the whole run long.
            began = init_began(log);
            if !began {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(Boot::Hung);
            }
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM did not power off within {VM_TIMEOUT:?}: see {}; its console ended \
                 with:\n{}",
                log.display(),
                console_tail(log)
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "xtask: VM ran {:.0} s ({status})",
        started.elapsed().as_secs_f64()
    );
    let serial = fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    Ok(Boot::Done(serial))
}

/// Whether init printed its first step (`initramfs::STAMP`) on the console.
fn init_began(log: &Path) -> bool {
    fs::read_to_string(log).is_ok_and(|text| text.contains(initramfs::STAMP))
}

/// A console line's step stamp (`initramfs::STAMP` onwards; the first line follows the
/// console's reset sequences), if it has one.
fn step_of(line: &str) -> Option<&str> {
    line.find(initramfs::STAMP).map(|at| &line[at..])
}

/// The last lines of the console and the last step it began (`initramfs::STAMP` lines).
fn console_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let last_step = lines
        .iter()
        .rev()
        .find_map(|l| step_of(l))
        .unwrap_or("(no step began)");
    let tail = &lines[lines.len().saturating_sub(CONSOLE_TAIL)..];
    format!("last step: {last_step}\n{}", tail.join("\n"))
}

/// The console's marked sections, by name.
struct Sections(Vec<(String, String)>);

impl Sections {
    fn parse(serial: &str) -> Self {
        let mut sections = Vec::new();
        let mut current: Option<(String, String)> = None;
        for line in serial.lines().map(|l| l.trim_end_matches('\r')) {
            if let Some(name) = line.strip_prefix(initramfs::BEGIN) {
                current = Some((name.trim_end_matches(" ===").to_string(), String::new()));
            } else if line.starts_with(initramfs::END) {
                sections.extend(current.take());
            } else if let Some((_, text)) = current.as_mut() {
                text.push_str(line);
                text.push('\n');
            }
        }
        Self(sections)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }

    /// A probe set's report, or why there is none (with the driver's stderr).
    fn report(&self, mode: &str) -> Result<Value, String> {
        let stderr = self.get(&format!("stderr {mode}")).unwrap_or("(none)");
        let text = self
            .get(&format!("report {mode}"))
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| format!("the VM printed no {mode} report; driver stderr: {stderr}"))?;
        serde_json::from_str(text).map_err(|e| format!("{mode} report: {e}; stderr: {stderr}"))
    }
}

/// The VM's tracepoint format files, as the kernel printed them, saved under `dir`; they must
/// equal the fixtures the unit tests parse (tracer/tests/fixtures/6.1/).
fn save_formats(vm: &Sections, dir: &Path) -> Result<String, String> {
    let fixtures = cmd::root().join("tracer/tests/fixtures/6.1");
    let mut stale = Vec::new();
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for f in initramfs::FORMATS {
        let text = vm
            .get(&format!("format {f}"))
            .ok_or_else(|| format!("the VM printed no format for {f}"))?;
        let name = format!("{}.format", f.rsplit('/').next().unwrap_or(f));
        fs::write(dir.join(&name), text).map_err(|e| e.to_string())?;
        if fs::read_to_string(fixtures.join(&name)).ok().as_deref() != Some(text) {
            stale.push(name);
        }
    }
    if stale.is_empty() {
        Ok(format!(
            " ({} format files equal the fixtures)",
            initramfs::FORMATS.len()
        ))
    } else {
        Err(format!(
            "{} differ from tracer/tests/fixtures/6.1/: copy them from {}",
            stale.join(", "),
            dir.display()
        ))
    }
}
