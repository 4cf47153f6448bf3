//! The VM's initramfs: busybox for the shell, the release tracer and the scenario driver with
//! the shared libraries they link, and an init script that runs the scenarios with each probe
//! set and prints the results to the serial console between markers.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::cpio::Cpio;

/// busybox-static's binary: no libraries of its own.
const BUSYBOX: &str = "/bin/busybox";

/// Tracepoint format files saved from the VM, to keep the fixtures true to the kernel.
pub const FORMATS: &[&str] = &[
    "sock/inet_sock_set_state",
    "tcp/tcp_send_reset",
    "tcp/tcp_receive_reset",
    "tcp/tcp_destroy_sock",
    "syscalls/sys_enter_close",
    "syscalls/sys_enter_shutdown",
];

/// The probe sets run in the VM, each a `tracer-scenarios run --probes MODE`.
pub const MODES: &[&str] = &["auto", "tracepoint"];

/// The `--pid` runs: the kernel filter's code paths are only verified where they can run
/// (the verifier prunes branches on the read-only settings), so each is loaded for real while
/// the scenarios churn connections that belong to none of the traced processes. `inline` traces
/// one pid (compared inline in the programs), `map` more than fit inline (the PIDS map decides).
/// The traced processes are quiet sleepers the script starts (`$quiet1`...): `--pid` covers
/// the children a process forks, and every process in the VM is init's.
pub const PID_RUNS: &[(&str, &str)] = &[
    ("inline", "--pid $quiet1"),
    (
        "map",
        "--pid $quiet1 --pid $quiet2 --pid $quiet3 --pid $quiet4 --pid $quiet5 --pid $quiet6 \
         --pid $quiet7 --pid $quiet8 --pid $quiet9",
    ),
];
const QUIET_PROCESSES: u32 = 9;

pub const BEGIN: &str = "=== tracer-vm begin ";
pub const END: &str = "=== tracer-vm end ";
pub const STAMP: &str = "tracer-vm at ";

/// Bounds inside the VM, so that one stuck step costs its own time and says so instead of
/// ending the whole run at the host's timeout (`super::VM_TIMEOUT`, above their sum). A
/// scenario pass takes ~10 s under TCG here; a shared CI machine may be several times slower.
const STEP_TIMEOUT_S: u32 = 240;
const READY_WAIT_S: u32 = 120;
const STOP_WAIT_S: u32 = 30;
/// Powers the VM off whatever still runs: the sections printed until then still count.
pub const WATCHDOG_S: u32 = 3 * STEP_TIMEOUT_S + READY_WAIT_S + STOP_WAIT_S + 60;

/// Writes the archive to `out`.
pub fn build(tracer: &Path, scenarios: &Path, out: &Path) -> anyhow::Result<()> {
    if !Path::new(BUSYBOX).is_file() {
        bail!("{BUSYBOX} is missing: apt-get install busybox-static");
    }
    let mut cpio = Cpio::new();
    let mut dirs = BTreeSet::new();
    for d in [
        "dev", "proc", "sys", "tmp", "bin", "sbin", "usr/bin", "usr/sbin",
    ] {
        add_dir(&mut cpio, &mut dirs, d);
    }
    cpio.char_dev("dev/console", 5, 1);
    add_file(&mut cpio, &mut dirs, "bin/busybox", Path::new(BUSYBOX))?;
    for applet in applets()? {
        if applet != "bin/busybox" {
            add_parents(&mut cpio, &mut dirs, &applet);
            cpio.symlink(&applet, "/bin/busybox");
        }
    }
    add_file(&mut cpio, &mut dirs, "bin/tracer", tracer)?;
    add_file(&mut cpio, &mut dirs, "bin/tracer-scenarios", scenarios)?;
    for lib in libraries(&[tracer, scenarios])? {
        let real =
            fs::canonicalize(&lib).with_context(|| format!("resolving {}", lib.display()))?;
        add_file(&mut cpio, &mut dirs, &lib.to_string_lossy(), &real)?;
    }
    cpio.file("init", init_script().as_bytes(), true);
    fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))
}

fn add_dir(cpio: &mut Cpio, dirs: &mut BTreeSet<String>, dir: &str) {
    add_parents(cpio, dirs, dir);
    if dirs.insert(dir.to_string()) {
        cpio.dir(dir);
    }
}

/// Every parent directory of `path`, once, parents first.
fn add_parents(cpio: &mut Cpio, dirs: &mut BTreeSet<String>, path: &str) {
    let path = path.trim_start_matches('/');
    let mut prefix = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        if dirs.insert(prefix.clone()) {
            cpio.dir(&prefix);
        }
    }
}

fn add_file(
    cpio: &mut Cpio,
    dirs: &mut BTreeSet<String>,
    at: &str,
    from: &Path,
) -> anyhow::Result<()> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    add_parents(cpio, dirs, at);
    cpio.file(at, &data, true);
    Ok(())
}

/// busybox's applets with their install paths (`bin/sh`, `sbin/ip`, ...).
fn applets() -> anyhow::Result<Vec<String>> {
    let out = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {BUSYBOX} --list-full"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// The shared libraries the binaries load and the dynamic loader, as `ldd` names them: they
/// go into the archive at those same paths.
fn libraries(binaries: &[&Path]) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for bin in binaries {
        let out = Command::new("ldd")
            .arg(bin)
            .output()
            .context("running ldd (Debian package libc-bin)")?;
        if !out.status.success() {
            bail!("ldd {} failed: is it a dynamic executable?", bin.display());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libpcap.so.0.8 => /lib/x86_64-linux-gnu/libpcap.so.0.8 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            }
        }
    }
    Ok(libs)
}

/// Both `--pid` tracers run through one more scenario pass (its report is not compared). The
/// pass starts once both have said `ready` (a slow VM may take seconds to load them) and the
/// tracers are stopped by SIGINT after it, so that each writes its summary.
fn pid_filter_run() -> String {
    let mut s =
        format!("for i in $(seq 1 {QUIET_PROCESSES}); do sleep 100000 & eval quiet$i=$!; done\n");
    let mut pids = Vec::new();
    let mut files = Vec::new();
    for (i, (name, args)) in PID_RUNS.iter().enumerate() {
        s += &format!(
            "tracer {args} --interface lo -o /tmp/pid-{name}.json 2>/tmp/pid-{name}.err &\n\
             pid{i}=$!\n"
        );
        pids.push(format!("$pid{i}"));
        files.push(format!("/tmp/pid-{name}.json"));
    }
    let pids = pids.join(" ");
    s += &stamp("pid runs: waiting for ready");
    s += &format!(
        "n=0; while [ $n -lt {READY_WAIT_S} ] && [ \"$(cat {} 2>/dev/null | grep -c '\"ready\"')\" -lt {} ]; \
         do sleep 1; n=$((n+1)); done\n",
        files.join(" "),
        files.len()
    );
    s += &stamp("pid runs: churn");
    s += &format!(
        "timeout {STEP_TIMEOUT_S} tracer-scenarios run --tracer /bin/tracer --probes tracepoint \
         --out /tmp/pid-churn.json 2>/dev/null\n\
         kill -INT {pids}\n\
         (sleep {STOP_WAIT_S}; kill -KILL {pids}) 2>/dev/null &\n\
         wait {pids}\n"
    );
    s += &stamp("pid runs: stopped");
    for (name, _) in PID_RUNS {
        s += &section(
            &format!("pid {name}"),
            &format!("cat /tmp/pid-{name}.json; cat /tmp/pid-{name}.err"),
        );
    }
    s
}

/// A line with the VM's uptime before a step: where a slow or stuck run spent its time.
fn stamp(step: &str) -> String {
    format!("echo \"{STAMP}$(cut -d' ' -f1 /proc/uptime) s: {step}\"\n")
}

fn section(name: &str, command: &str) -> String {
    format!("echo '{BEGIN}{name} ==='\n{command}\necho '{END}{name} ==='\n")
}

/// Mounts what the tracer needs, brings lo up, saves the format files, runs the scenarios with
/// each probe set, then powers off. Every result goes to the console between markers.
fn init_script() -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tracefs tracefs /sys/kernel/tracing\n\
         mount -t debugfs debugfs /sys/kernel/debug\n\
         ip link set lo up\n",
    );
    s += &format!(
        "(sleep {WATCHDOG_S}; echo '{STAMP}watchdog: still running after {WATCHDOG_S} s, powering off'; \
         poweroff -f) &\n"
    );
    s += &stamp("init"); // the host's sign that the kernel booted
    s += &section("uname", "uname -r");
    s += &section("modules", "cat /proc/modules");
    for f in FORMATS {
        s += &section(
            &format!("format {f}"),
            &format!("cat /sys/kernel/tracing/events/{f}/format"),
        );
    }
    for mode in MODES {
        s += &stamp(&format!("scenarios, probes {mode}"));
        // After a timeout, the tracer the driver started may still run: stop it.
        let run = format!(
            "timeout {STEP_TIMEOUT_S} tracer-scenarios run --tracer /bin/tracer --probes {mode} \
             --out /tmp/{mode}.json 2>/tmp/{mode}.err; echo \"exit $?\" >>/tmp/{mode}.err; \
             killall -q tracer"
        );
        s += &run;
        s.push('\n');
        s += &section(&format!("stderr {mode}"), &format!("cat /tmp/{mode}.err"));
        s += &section(&format!("report {mode}"), &format!("cat /tmp/{mode}.json"));
    }
    s += &pid_filter_run();
    s += &stamp("done");
    s += "poweroff -f\n";
    s
}
