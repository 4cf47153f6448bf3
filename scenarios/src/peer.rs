//! `tracer-scenarios peer ROLE HOST PORT BEHAVIOUR`: the other end of a connection in its own
//! process, so that each end is attributed to its own PID (the Rust twin of
//! tracer/tests/peer.py, for machines without python, such as the test VM).
//!
//! It prints one JSON line `{"pid", "lport", "rport"}` once connected (a server first prints
//! `{"listening": port}`; PORT 0 picks one), then follows BEHAVIOUR:
//!
//! - `wait-eof-close`: read until the other end's FIN, then close (graceful)
//! - `linger0-close`: set SO_LINGER {1, 0} and close (RST)
//! - `read-linger0-close`: read one byte, then as `linger0-close`: the other end is known to be
//!   connected (its connect() has returned) before the RST
//! - `send-wait`: send one byte, wait for stdin to close, then close
//! - `hold`: keep the socket open until stdin closes, then close
//! - `exit`: send one byte and exit without closing (the kernel closes at exit)

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
};

use serde_json::json;

pub fn main(args: &[String]) -> Result<(), String> {
    let [role, host, port, behaviour] = args else {
        return Err("usage: tracer-scenarios peer client|server HOST PORT BEHAVIOUR".into());
    };
    let port: u16 = port.parse().map_err(|_| format!("bad port {port}"))?;
    let sock = match role.as_str() {
        "server" => {
            let listener = TcpListener::bind((host.as_str(), port)).map_err(|e| e.to_string())?;
            say(&json!({"listening": listener.local_addr().unwrap().port()}));
            listener.accept().map_err(|e| e.to_string())?.0
        }
        "client" => TcpStream::connect((host.as_str(), port)).map_err(|e| e.to_string())?,
        _ => return Err(format!("unknown role {role}: client or server")),
    };
    say(&json!({
        "pid": std::process::id(),
        "lport": sock.local_addr().unwrap().port(),
        "rport": sock.peer_addr().unwrap().port(),
    }));
    behave(sock, behaviour)
}

fn say(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // The driver reads line by line: a line must leave now, not at exit.
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn behave(mut sock: TcpStream, behaviour: &str) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    match behaviour {
        "wait-eof-close" => while sock.read(&mut buf).map_err(|e| e.to_string())? > 0 {},
        "linger0-close" => set_linger_zero(&sock),
        "read-linger0-close" => {
            sock.read_exact(&mut buf[..1]).map_err(|e| e.to_string())?;
            set_linger_zero(&sock);
        }
        "send-wait" => {
            sock.write_all(b"x").map_err(|e| e.to_string())?;
            wait_stdin_closed();
        }
        "hold" => wait_stdin_closed(),
        "exit" => {
            sock.write_all(b"x").map_err(|e| e.to_string())?;
            // SAFETY: _exit skips destructors on purpose: the kernel closes the socket.
            unsafe { libc::_exit(0) };
        }
        _ => return Err(format!("unknown behaviour {behaviour}")),
    }
    drop(sock);
    Ok(())
}

fn wait_stdin_closed() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

/// SO_LINGER {on, 0}: close() then resets the connection (tcp_disconnect, reason TCP_STATE).
pub fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}
