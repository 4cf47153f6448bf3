//! A small JSON object writer for the per-event lines.
//!
//! Under connection churn the daemon writes a line per event, and serde_json's generic path
//! (every value escaped character by character, numbers and addresses through `fmt`) was a
//! quarter of its CPU. This writes the same bytes directly: keys and the tracer's own names
//! are known to need no escaping, numbers go through `itoa`, and only text that comes from
//! outside (a process name, an interface name) is checked for escaping. The unit tests in
//! `lines` compare its output with serde_json's for the same line.

use std::fmt::{Display, Write as _};

pub struct Object<'o> {
    out: &'o mut String,
    first: bool,
}

impl<'o> Object<'o> {
    pub fn begin(out: &'o mut String) -> Self {
        out.push('{');
        Self { out, first: true }
    }

    pub fn end(self) {
        self.out.push('}');
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push('"');
        self.out.push_str(key);
        self.out.push_str("\":");
    }

    /// A string the tracer itself chose (an event or state name): never needs escaping.
    pub fn name(&mut self, key: &str, value: &'static str) {
        self.key(key);
        push_plain_str(self.out, value);
    }

    /// A string from outside the tracer: escaped as JSON requires.
    pub fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        push_escaped_str(self.out, value);
    }

    /// A value whose `Display` form needs no escaping (a time, an address, a hex id).
    pub fn display(&mut self, key: &str, value: impl Display) {
        self.key(key);
        self.out.push('"');
        write!(self.out, "{value}").expect("writing to a String");
        self.out.push('"');
    }

    /// A wall-clock time, RFC 3339 (on every line, once or twice: written without `fmt`).
    pub fn time(&mut self, key: &str, value: crate::clock::Rfc3339) {
        self.key(key);
        self.out.push('"');
        self.out.push_str(value.as_text(&mut [0; 30]));
        self.out.push('"');
    }

    /// An IP address. IPv4 is written octet by octet: through `fmt` it was the largest single
    /// cost of writing a line. IPv6 (rarer, and with its compression rules) uses `Display`.
    pub fn ip(&mut self, key: &str, value: std::net::IpAddr) {
        match value {
            std::net::IpAddr::V4(v4) => {
                self.key(key);
                self.out.push('"');
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.out.push('.');
                    }
                    self.out.push_str(itoa::Buffer::new().format(octet));
                }
                self.out.push('"');
            }
            v6 => self.display(key, v6),
        }
    }

    pub fn uint(&mut self, key: &str, value: u64) {
        self.key(key);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    pub fn int(&mut self, key: &str, value: i64) {
        self.key(key);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    pub fn null(&mut self, key: &str) {
        self.key(key);
        self.out.push_str("null");
    }

    /// A list of the tracer's own names: `["RST","ACK"]`.
    pub fn names(&mut self, key: &str, values: impl Iterator<Item = &'static str>) {
        self.key(key);
        self.out.push('[');
        for (i, v) in values.enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            push_plain_str(self.out, v);
        }
        self.out.push(']');
    }

    /// A nested object.
    pub fn object(&mut self, key: &str) -> Object<'_> {
        self.key(key);
        Object::begin(self.out)
    }
}

fn push_plain_str(out: &mut String, value: &str) {
    debug_assert!(!needs_escape(value), "{value:?} needs escaping");
    out.push('"');
    out.push_str(value);
    out.push('"');
}

fn push_escaped_str(out: &mut String, value: &str) {
    if needs_escape(value) {
        out.push_str(&serde_json::to_string(value).expect("a string serialises"));
    } else {
        push_plain_str(out, value);
    }
}

fn needs_escape(value: &str) -> bool {
    value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.3.255",
            "::1",
            "::ffff:10.0.0.1",
            "fe80::1",
        ] {
            let addr: std::net::IpAddr = text.parse().unwrap();
            let mut s = String::new();
            let mut o = Object::begin(&mut s);
            o.ip("a", addr);
            o.end();
            assert_eq!(s, format!("{{\"a\":\"{addr}\"}}"));
        }
    }

    #[test]
    fn matches_serde_for_every_kind_of_value() {
        let mut s = String::new();
        let mut o = Object::begin(&mut s);
        o.name("a", "close");
        o.text("b", "we\"ird\\\n\u{1}name");
        o.uint("c", u64::MAX);
        o.int("d", -42);
        o.null("e");
        o.names("f", ["RST", "ACK"].into_iter());
        o.display("g", std::net::Ipv6Addr::LOCALHOST);
        let mut inner = o.object("h");
        inner.uint("x", 0);
        inner.end();
        o.end();
        let expected = serde_json::json!({
            "a": "close", "b": "we\"ird\\\n\u{1}name", "c": u64::MAX, "d": -42, "e": null,
            "f": ["RST", "ACK"], "g": "::1", "h": {"x": 0}
        });
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&s).unwrap(),
            expected
        );
        assert!(
            s.starts_with("{\"a\":\"close\",\"b\":\"we\\\"ird\\\\\\n\\u0001name\""),
            "{s}"
        );
    }
}
