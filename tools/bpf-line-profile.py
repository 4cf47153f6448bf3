#!/usr/bin/env python3
"""Where the time inside running BPF programs goes, by source line.

perf samples a JIT-compiled BPF program only as `bpf_prog_<tag>_<name>+offset`, and this
machine's bpftool cannot disassemble JIT code (no libbfd) nor read /proc/kcore. The kernel
still keeps, per program, the JIT address of every BTF line-info record (jited_line_info) and
the translated instruction each record starts at (line_info), and `bpftool prog dump xlated`
prints the source line before each instruction. So: sample with perf while a load runs, map
each sample's address to its line-info record, and that to the source line.

Usage (as root, with the programs loaded, e.g. a running `tracer`):

    tools/bpf-line-profile.py [--seconds N] [--per COUNT] [--lines K] -- COMMAND...

It samples every CPU at 4 kHz while COMMAND runs (the load), then prints, for each sampled
BPF program, the nanoseconds spent on each source line, per connection when COMMAND's last
line of output is JSON with a `connections` count (as `loadgen` prints), else per `--per`
COUNT, else per second. Addresses after a helper call are charged to the line of the call: a
slow helper shows on its caller's line. Example, with a tracer running:

    tools/bpf-line-profile.py -- target/release/loadgen --mode rst --threads 2 --duration 5s
"""

import argparse
import bisect
import collections
import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

SYS_BPF = 321  # x86_64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
INFO_LEN = 232  # struct bpf_prog_info up to attach_btf_id (Linux 5.x-6.x)
HZ = 4000

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    ret = libc.syscall(SYS_BPF, cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def prog_info(fd, request):
    buf = ctypes.create_string_buffer(bytes(request), len(request))
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, len(request), ctypes.addressof(buf)))
    return buf.raw


def line_map(prog_id):
    """[(jit address, xlated instruction index)] of the program's line-info records."""
    fd = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("III", prog_id, 0, 0))
    try:
        first = prog_info(fd, bytearray(INFO_LEN))
        nr_lines, = struct.unpack_from("I", first, 148)
        nr_jited, = struct.unpack_from("I", first, 168)
        line_size, jited_size = struct.unpack_from("II", first, 172)
        lines = ctypes.create_string_buffer(nr_lines * line_size)
        jited = ctypes.create_string_buffer(nr_jited * jited_size)
        request = bytearray(INFO_LEN)
        struct.pack_into("I", request, 148, nr_lines)
        struct.pack_into("Q", request, 152, ctypes.addressof(lines))
        struct.pack_into("Q", request, 160, ctypes.addressof(jited))
        struct.pack_into("I", request, 168, nr_jited)
        struct.pack_into("II", request, 172, line_size, jited_size)
        prog_info(fd, request)
    finally:
        os.close(fd)
    insns = [struct.unpack_from("I", lines.raw, i * line_size)[0] for i in range(nr_lines)]
    addrs = [struct.unpack_from("Q", jited.raw, i * jited_size)[0] for i in range(nr_jited)]
    return sorted(zip(addrs, insns))


def xlated(prog_id):
    """bpftool's dump of the translated program: ({instruction index: the source line printed
    before it}, {instruction index: its line number in the dump}, the dump's lines)."""
    text = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog_id)],
                          check=True, capture_output=True, text=True).stdout
    lines = text.splitlines()
    source, position, last = {}, {}, "?"
    for n, line in enumerate(lines):
        if line.startswith("; "):
            last = line[2:].strip()
        m = re.match(r"\s*(\d+): ", line)
        if m:
            source[int(m.group(1))] = last
            position[int(m.group(1))] = n
    return source, position, lines


def loaded_programs():
    """{name: id} of the loaded programs (bpftool's names, at most 15 characters)."""
    out = subprocess.run(["bpftool", "prog", "show"], check=True, capture_output=True,
                         text=True).stdout
    progs = {}
    for m in re.finditer(r"^(\d+): \S+\s+name (\S+)", out, re.M):
        progs[m.group(2)] = int(m.group(1))
    return progs


def load_connections(output):
    """The `connections` count of the load's last output line, if it is such JSON."""
    lines = output.strip().splitlines()
    try:
        return float(json.loads(lines[-1])["connections"]) if lines else None
    except (ValueError, KeyError, TypeError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per", type=float, default=None,
                    help="divide by this count (e.g. connections); default: per second")
    ap.add_argument("--lines", type=int, default=12, help="lines shown per program")
    ap.add_argument("--insns", type=int, default=0,
                    help="also show the N hottest line-info records per program in the "
                         "translated code (map ids, helper names): inlined library lines "
                         "such as `fun(map, key)` say little by themselves")
    ap.add_argument("command", nargs="+", help="the load to run while sampling")
    args = ap.parse_args()
    missing = [tool for tool in ("perf", "bpftool") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"bpf-line-profile: {' and '.join(missing)} not found: "
                 "apt-get install linux-perf bpftool")
    if os.geteuid() != 0:
        sys.exit("bpf-line-profile: run as root (it reads BPF program info and samples all CPUs)")

    progs = loaded_programs()
    maps = {}
    for name, pid in progs.items():
        try:
            maps[name] = (line_map(pid), xlated(pid))
        except (OSError, subprocess.CalledProcessError):
            pass  # no line info (not built with BTF) or gone meanwhile
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        load = subprocess.run(["perf", "record", "-q", "-a", "-e", "cpu-clock", "-F", str(HZ),
                               "-o", data, "--"] + args.command, check=True,
                              stdout=subprocess.PIPE, text=True).stdout
        print(load, end="")
        script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym"],
                                check=True, capture_output=True, text=True).stdout
    samples = collections.defaultdict(list)
    total = 0
    for line in script.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        total += 1
        m = re.match(r"bpf_prog_[0-9a-f]+_(\w+)", parts[1])
        if m:
            samples[m.group(1)].append(int(parts[0], 16))
    ns_per_sample = 1e9 / HZ
    connections = load_connections(load)
    if args.per:
        divisor, unit = args.per, "per count"
    elif connections:
        divisor, unit = connections, "per connection"
    else:
        divisor, unit = total / HZ / max(os.cpu_count(), 1), "per second"
    for name, ips in sorted(samples.items(), key=lambda kv: -len(kv[1])):
        # perf shows the name up to the kernel's 15-character limit too.
        entry = maps.get(name) or maps.get(name[:15])
        print(f"== {name}: {len(ips) * ns_per_sample / divisor:.0f} ns {unit}")
        if not entry:
            print("   (no line info)")
            continue
        lmap, (src, position, dump) = entry
        addrs = [a for a, _ in lmap]
        by_line, by_insn = collections.Counter(), collections.Counter()
        for ip in ips:
            i = bisect.bisect_right(addrs, ip) - 1
            insn = lmap[i][1] if i >= 0 else None
            by_line[src.get(insn, "?")[:100]] += 1
            by_insn[insn] += 1
        for text, n in by_line.most_common(args.lines):
            print(f"   {n * ns_per_sample / divisor:7.0f} ns  {text}")
        for insn, n in by_insn.most_common(args.insns):
            print(f"   --- {n * ns_per_sample / divisor:.0f} ns from instruction {insn}:")
            at = position.get(insn)
            if at is not None:
                print("\n".join("      " + line for line in dump[max(0, at - 5):at + 3]))


if __name__ == "__main__":
    sys.exit(main())
