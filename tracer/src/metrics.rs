//! `--metrics ADDR`: a Prometheus endpoint beside the JSON lines. Counters move exactly when a
//! line is written (same place, same condition), so a scrape and the lines of one run agree.
//! The exception is the loss counter: it moves when the loss is seen, while the `lost` line
//! may still wait for a stalled or failing output (when an alert on it matters most); the
//! summary and the metric agree again at the end.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
};

use anyhow::Context as _;
use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::stats::KernelCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
    comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResetLabels {
    reason: String,
    comm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KernelLabels {
    counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JoinLabels {
    result: &'static str,
}

/// The tracer's metrics.
pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    resets: Family<ResetLabels, Counter>,
    lost: Family<LostLabels, Counter>,
    /// Lines that waited for their packet, joined or not (the summary's `joined`, `unjoined`).
    joins: Family<JoinLabels, Counter>,
    /// The summary's `kernel` object as it grows.
    kernel: Family<KernelLabels, Counter>,
    close_to_wire: Histogram,
    /// The tracer's own cost, read at each scrape (as the summary line gives it at the end).
    own_cpu: Gauge<f64, AtomicU64>,
    own_peak_rss: Gauge<f64, AtomicU64>,
    own_rss: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tracer");
        let events = Family::<EventLabels, Counter>::default();
        let resets = Family::<ResetLabels, Counter>::default();
        let lost = Family::<LostLabels, Counter>::default();
        let kernel = Family::<KernelLabels, Counter>::default();
        let joins = Family::<JoinLabels, Counter>::default();
        // Where events can be lost (the summary's `lost` object): each shows from the start,
        // at 0, so that a dashboard's rate and alert have a series before the first loss.
        for source in crate::stats::Lost::SOURCES {
            // Created at 0 (the guard it returns is of no use here).
            let _ = lost.get_or_create(&LostLabels {
                source: source.to_string(),
            });
        }
        for result in ["joined", "unjoined"] {
            let _ = joins.get_or_create(&JoinLabels { result });
        }
        // 1 µs to ~4 s in factors of 4: a loopback RST is tens of µs, a FIN stuck behind
        // unsent data is seconds.
        let close_to_wire = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1e-6, 4.0, 12),
        );
        registry.register(
            "events",
            "Lines written, by event kind and process name",
            events.clone(),
        );
        registry.register(
            "resets",
            "RSTs sent (close with outcome rst, or rst_sent), by kernel reason and process name",
            resets.clone(),
        );
        registry.register(
            "lost_events",
            "Events lost, by where they were lost",
            lost.clone(),
        );
        registry.register(
            "joins",
            "Lines that waited for their FIN or RST on the wire, by whether it came within the \
             join window",
            joins.clone(),
        );
        registry.register(
            "kernel_counts",
            "What the summary's kernel object counts: events the programs emitted and filtered, \
             sockets the owner table turned away (their events dropped), FIN/RST packets the \
             capture filter passed, held closes the daemon rescued",
            kernel.clone(),
        );
        registry.register(
            "close_to_wire_seconds",
            "Delay from a close() to its FIN or RST on the wire",
            close_to_wire.clone(),
        );
        let own_cpu = Gauge::<f64, AtomicU64>::default();
        let own_peak_rss = Gauge::<f64, AtomicU64>::default();
        let own_rss = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "own_cpu_seconds",
            "CPU time the tracer itself has used (user and system, every thread)",
            own_cpu.clone(),
        );
        registry.register(
            "own_peak_rss_bytes",
            "The tracer's own peak resident memory",
            own_peak_rss.clone(),
        );
        registry.register(
            "own_rss_bytes",
            "The tracer's own resident memory now (its peak is usually set at start-up)",
            own_rss.clone(),
        );
        Self {
            registry,
            events,
            resets,
            lost,
            joins,
            kernel,
            close_to_wire,
            own_cpu,
            own_peak_rss,
            own_rss,
        }
    }

    pub fn line(&self, event: &str, comm: Option<&str>) {
        self.events
            .get_or_create(&EventLabels {
                event: event.to_string(),
                comm: comm.unwrap_or("").to_string(),
            })
            .inc();
    }

    pub fn reset(&self, reason: Option<&str>, comm: Option<&str>) {
        self.resets
            .get_or_create(&ResetLabels {
                reason: reason.unwrap_or("unknown").to_string(),
                comm: comm.unwrap_or("").to_string(),
            })
            .inc();
    }

    pub fn lost(&self, source: &str, count: u64) {
        self.lost
            .get_or_create(&LostLabels {
                source: source.to_string(),
            })
            .inc_by(count);
    }

    /// A line that waited for its packet went out, with it (`joined`) or without.
    pub fn join(&self, joined: bool) {
        let result = if joined { "joined" } else { "unjoined" };
        self.joins.get_or_create(&JoinLabels { result }).inc();
    }

    /// The kernel counts grew from `before` to `now` (both read from the same counters).
    pub fn kernel_counts(&self, before: &KernelCounts, now: &KernelCounts) {
        for (counter, then, total) in [
            ("emitted", before.emitted, now.emitted),
            ("filtered", before.filtered, now.filtered),
            (
                "owner_table_full",
                before.owner_table_full,
                now.owner_table_full,
            ),
            ("captured", before.captured, now.captured),
            (
                "held_closes_rescued",
                before.held_closes_rescued,
                now.held_closes_rescued,
            ),
        ] {
            let counter = self.kernel.get_or_create(&KernelLabels { counter });
            if total > then {
                counter.inc_by(total - then);
            }
        }
    }

    pub fn close_to_wire(&self, delay_ns: i64) {
        self.close_to_wire.observe(delay_ns.max(0) as f64 / 1e9);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let own = crate::stats::OwnUsage::now();
        self.own_cpu.set(own.cpu_s);
        self.own_peak_rss.set(own.peak_rss_bytes as f64);
        self.own_rss.set(own.rss_bytes as f64);
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

/// Binds ADDR now (so a bad address fails before `ready`) and serves /metrics in the
/// background.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, metrics.clone()));
        }
    });
    Ok(bound)
}

/// One HTTP/1.x exchange: GET /metrics gets the exposition text, anything else a 404.
async fn answer(mut stream: tokio::net::TcpStream, metrics: Arc<Metrics>) {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let first_line = String::from_utf8_lossy(&request);
    let path = first_line.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = if path == "/metrics" {
        ("200 OK", prometheus_text::CONTENT_TYPE, metrics.render())
    } else {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counters_and_histogram() {
        let m = Metrics::new();
        m.line("close", Some("nginx"));
        m.line("close", Some("nginx"));
        m.reset(Some("TCP_ABORT_ON_CLOSE"), Some("nginx"));
        m.lost("ringbuf", 3);
        m.close_to_wire(14_000);
        let first = KernelCounts {
            emitted: 10,
            filtered: 4,
            ..KernelCounts::default()
        };
        m.kernel_counts(&KernelCounts::default(), &first);
        m.kernel_counts(
            &first,
            &KernelCounts {
                emitted: 25,
                ..first
            },
        );
        m.join(true);
        let text = m.render();
        assert!(
            text.contains("tracer_joins_total{result=\"joined\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tracer_joins_total{result=\"unjoined\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tracer_lost_events_total{source=\"capture\"} 0"),
            "every source shows, 0 too: {text}"
        );
        assert!(
            text.contains("tracer_kernel_counts_total{counter=\"emitted\"} 25"),
            "{text}"
        );
        assert!(
            text.contains("tracer_kernel_counts_total{counter=\"filtered\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("tracer_kernel_counts_total{counter=\"owner_table_full\"} 0"),
            "every counter shows, 0 too: {text}"
        );
        assert!(
            text.contains("tracer_events_total{event=\"close\",comm=\"nginx\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tracer_resets_total{reason=\"TCP_ABORT_ON_CLOSE\",comm=\"nginx\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tracer_lost_events_total{source=\"ringbuf\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("tracer_close_to_wire_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tracer_close_to_wire_seconds histogram"),
            "{text}"
        );
        // This test process's own cost, read at the scrape.
        let value = |name: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(name)).expect(name);
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        assert!(value("tracer_own_cpu_seconds ") > 0.0, "{text}");
        assert!(value("tracer_own_peak_rss_bytes ") > 1e6, "{text}");
        assert!(value("tracer_own_rss_bytes ") > 1e6, "{text}");
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let metrics = Arc::new(Metrics::new());
        metrics.line("state", Some("x"));
        let addr = serve("127.0.0.1:0".parse().unwrap(), metrics)
            .await
            .unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains("tracer_events_total{event=\"state\",comm=\"x\"} 1"),
            "{response}"
        );
    }
}
