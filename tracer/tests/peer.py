#!/usr/bin/env python3
"""A scripted TCP peer in its own process, so that tests can check that each end of a
connection is attributed to its own PID.

    peer.py server HOST PORT BEHAVIOUR   listen, accept one connection, then BEHAVIOUR
    peer.py client HOST PORT BEHAVIOUR   connect, then BEHAVIOUR
    peer.py server-keep HOST PORT BEHAVIOUR   as server, but the listener stays open
    peer.py forked-ROLE ...              ROLE played by a forked child (a pre-forked worker);
                                         the process started waits for it

It prints one line of JSON {"pid", "laddr", "lport", "raddr", "rport"} once connected (PORT 0
lets a server pick a port; it then prints {"listening": port} first), then follows BEHAVIOUR:

    wait-eof-close   read until the other end's FIN, then close (graceful)
    read-close       read one byte, then close
    unread-close     wait until one byte has arrived, close without reading it (RST)
    linger0-close    set SO_LINGER {1, 0} and close (RST)
    send-wait        send one byte, then wait for stdin to close, then close
    hold             keep the socket open until stdin closes, then close
    hold-upload-close    once stdin closes, send 100 kB and close at once (the FIN queues
                     behind the data)
    hold-dup2        as hold, but the descriptor is replaced with dup2() instead of closed
    shutdown-dup2    shut down for writing at once; once stdin closes, replace the descriptor
                     with dup2() (the JDK's Socket.close() while another thread reads)
    close-hold       close at once, then stay alive until stdin closes
    close-linger2-hold   as close-hold, with TCP_LINGER2 of 1 s: the socket's FIN_WAIT2 (its
                     time-wait form) ends after 1 s instead of tcp_fin_timeout's 60
    exit             send one byte and exit without closing (the kernel closes at exit)
"""
import json
import select
import socket
import struct
import sys
import os


def report(sock):
    l = sock.getsockname()
    r = sock.getpeername()
    print(json.dumps({"pid": os.getpid(), "fd": sock.fileno(), "laddr": l[0], "lport": l[1], "raddr": r[0], "rport": r[1]}), flush=True)


def wait_stdin_closed():
    while sys.stdin.read(1):
        pass


def behave(sock, behaviour):
    if behaviour == "wait-eof-close":
        while sock.recv(4096):
            pass
        sock.close()
    elif behaviour == "read-close":
        sock.recv(1)
        sock.close()
    elif behaviour == "unread-close":
        select.select([sock], [], [], 5)
        sock.close()
    elif behaviour == "linger0-close":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    elif behaviour == "send-wait":
        sock.send(b"x")
        wait_stdin_closed()
        sock.close()
    elif behaviour == "hold-linger0":
        wait_stdin_closed()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    elif behaviour == "hold":
        wait_stdin_closed()
        sock.close()
    elif behaviour == "hold-upload-close":
        wait_stdin_closed()
        sock.sendall(b"u" * 100_000)
        sock.close()
    elif behaviour == "hold-dup2":
        wait_stdin_closed()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, sock.fileno())  # the socket's last reference goes in dup2
        sock.detach()
    elif behaviour == "shutdown-dup2":
        sock.shutdown(socket.SHUT_WR)
        wait_stdin_closed()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, sock.fileno())  # tcp_close() in FIN_WAIT2: no move, no call
        sock.detach()
    elif behaviour == "close-hold":
        sock.close()
        wait_stdin_closed()
    elif behaviour == "close-linger2-hold":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2, 1)
        sock.close()
        wait_stdin_closed()
    elif behaviour == "exit":
        sock.send(b"x")
        os._exit(0)
    else:
        sys.exit(f"unknown behaviour {behaviour}")


def main():
    role, host, port, behaviour = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if role.startswith("forked-"):
        # The role is played by a child (a pre-forked worker); this process only waits for it.
        role = role[len("forked-"):]
        child = os.fork()
        if child != 0:
            _, status = os.waitpid(child, 0)
            sys.exit(os.waitstatus_to_exitcode(status))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if role in ("server", "server-keep"):
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1)
        print(json.dumps({"listening": listener.getsockname()[1]}), flush=True)
        sock, _ = listener.accept()
        if role == "server":
            listener.close()
    else:
        sock = socket.create_connection((host, port))
    report(sock)
    behave(sock, behaviour)


if __name__ == "__main__":
    main()
