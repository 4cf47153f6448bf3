//! The `--pid` setup several tests share: a server in its own process (`peer.py server-keep`),
//! listening before the tracer starts (so its listener is seeded) and still listening after, the
//! tracer started with `--pid` of it, and this (untraced) process connected to it.

use std::{net::TcpStream, time::Duration};

use super::{Peer, Tracer};

pub struct TracedServer {
    pub server: Peer,
    pub server_port: u16,
    pub tracer: Tracer,
    pub client: TcpStream,
    pub client_port: u16,
}

impl TracedServer {
    /// `behaviour` is what the server does with the connection (see tests/peer.py); `args` are
    /// the tracer's other arguments (`--no-capture`, `-i lo`, ...).
    pub fn start(behaviour: &str, args: &[&str], wait: Duration) -> Self {
        let mut server = Peer::spawn(None, "server-keep", "127.0.0.1", 0, behaviour);
        let server_port = server.line()["listening"].as_u64().unwrap() as u16;
        let pid = server.pid.to_string();
        let mut tracer = Tracer::start(&[args, &["--pid", &pid]].concat());
        tracer.wait_ready(wait);
        let client = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
        let client_port = client.local_addr().unwrap().port();
        server.line(); // accepted
        Self {
            server,
            server_port,
            tracer,
            client,
            client_port,
        }
    }
}
