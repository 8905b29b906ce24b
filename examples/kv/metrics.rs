//! The service's own metrics: requests, connections, and the replies output commit
//! holds back. Served with the replication's ([`fgbi::metrics::Metrics`]) on
//! `--metrics ADDR`; docs/operations.md explains each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fgbi::metrics::write_metric;

/// Counters and gauges of the service, updated by its connection threads.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    requests: AtomicU64,
    connections: AtomicU64,
    connections_total: AtomicU64,
    held_total: AtomicU64,
    released_total: AtomicU64,
    /// Microseconds, summed over the released replies.
    hold_us: AtomicU64,
}

impl ServiceMetrics {
    /// `count` requests were executed.
    pub fn served(&self, count: u64) {
        self.requests.fetch_add(count, Ordering::Relaxed);
    }

    /// A connection opened.
    pub fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed.
    pub fn disconnected(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// `count` replies wait for their checkpoint's commit.
    pub fn held(&self, count: u64) {
        self.held_total.fetch_add(count, Ordering::Relaxed);
    }

    /// `count` held replies left (or were dropped with their connection) after
    /// waiting `waited` each.
    pub fn released(&self, count: u64, waited: Duration) {
        self.released_total.fetch_add(count, Ordering::Relaxed);
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.hold_us
            .fetch_add(us.saturating_mul(count), Ordering::Relaxed);
    }

    /// The metrics in the Prometheus text format, labelled `role`.
    pub fn render(&self, role: &str) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (held, released) = (get(&self.held_total), get(&self.released_total));
        let mut out = String::new();
        for (name, kind, help, value) in [
            (
                "kv_requests_total",
                "counter",
                "Requests the service executed.",
                get(&self.requests).to_string(),
            ),
            (
                "kv_connections",
                "gauge",
                "Client connections open.",
                get(&self.connections).to_string(),
            ),
            (
                "kv_connections_total",
                "counter",
                "Client connections accepted.",
                get(&self.connections_total).to_string(),
            ),
            (
                "kv_replies_held_total",
                "counter",
                "Replies held for output commit (until the backup committed their checkpoint).",
                held.to_string(),
            ),
            (
                "kv_replies_released_total",
                "counter",
                "Held replies released (or dropped with their connection).",
                released.to_string(),
            ),
            (
                "kv_replies_held",
                "gauge",
                "Replies held for output commit now.",
                held.saturating_sub(released).to_string(),
            ),
            (
                "kv_reply_hold_seconds_total",
                "counter",
                "Seconds the released replies waited for their commit, summed.",
                format!("{:.6}", get(&self.hold_us) as f64 / 1e6),
            ),
        ] {
            write_metric(&mut out, name, kind, help, role, value);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_replies_are_counted_until_released() {
        let m = ServiceMetrics::default();
        m.connected();
        m.served(5);
        m.held(5);
        m.released(3, Duration::from_millis(2));
        let text = m.render("primary");
        for sample in [
            "fgbi_kv_requests_total{role=\"primary\"} 5",
            "fgbi_kv_connections{role=\"primary\"} 1",
            "fgbi_kv_replies_held_total{role=\"primary\"} 5",
            "fgbi_kv_replies_released_total{role=\"primary\"} 3",
            "fgbi_kv_replies_held{role=\"primary\"} 2",
            "fgbi_kv_reply_hold_seconds_total{role=\"primary\"} 0.006000",
        ] {
            assert!(text.lines().any(|l| l == sample), "{sample} in {text}");
        }
        assert!(text.contains("# TYPE fgbi_kv_replies_held gauge"), "{text}");
    }
}
