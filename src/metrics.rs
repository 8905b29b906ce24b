//! Metrics of the replication loops, served in the Prometheus text format.
//!
//! [`Metrics`] is a set of atomics both loops update as they go; [`serve`] answers
//! `GET /metrics` on a plain HTTP/1.0 listener from a thread of its own, so a scrape
//! never touches the loops; a program adds its own samples with [`write_metric`].
//! docs/operations.md names and explains every metric.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::primary::PrimaryEvent;

/// Upper bounds of the pause histogram's buckets, seconds.
const PAUSE_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// Counters and gauges of one side of a protected pair.
#[derive(Debug)]
pub struct Metrics {
    role: &'static str,
    started: Instant,
    epochs_committed: AtomicU64,
    committed_epoch: AtomicU64,
    sent_epoch: AtomicU64,
    bytes: AtomicU64,
    /// Since `started`, microseconds; 0: never.
    last_commit_us: AtomicU64,
    protected: AtomicU64,
    failovers: AtomicU64,
    scrubs: AtomicU64,
    scrub_mismatches: AtomicU64,
    pause_last_us: AtomicU64,
    pause_sum_us: AtomicU64,
    pause_buckets: [AtomicU64; PAUSE_BUCKETS.len()],
    pause_count: AtomicU64,
}

impl Metrics {
    /// Metrics of the `role` side ("primary" or "backup").
    pub fn new(role: &'static str) -> Self {
        Self {
            role,
            started: Instant::now(),
            epochs_committed: AtomicU64::new(0),
            committed_epoch: AtomicU64::new(0),
            sent_epoch: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_commit_us: AtomicU64::new(0),
            protected: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            scrubs: AtomicU64::new(0),
            scrub_mismatches: AtomicU64::new(0),
            pause_last_us: AtomicU64::new(0),
            pause_sum_us: AtomicU64::new(0),
            pause_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            pause_count: AtomicU64::new(0),
        }
    }

    /// Epoch `epoch` of `bytes` bytes was committed (sent and acknowledged on the
    /// primary: pass 0 bytes there, [`Metrics::primary_event`] counts them on send).
    pub fn committed(&self, epoch: u64, bytes: u64) {
        self.epochs_committed.fetch_add(1, Ordering::Relaxed);
        self.committed_epoch.store(epoch, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let now = self.started.elapsed().as_micros() as u64;
        self.last_commit_us.store(now.max(1), Ordering::Relaxed);
        self.protected.store(1, Ordering::Relaxed);
    }

    /// Whether a backup holds the program's state (primary), or this backup serves a
    /// primary (backup).
    pub fn set_protected(&self, protected: bool) {
        self.protected
            .store(u64::from(protected), Ordering::Relaxed);
    }

    /// A scrub compared the replica; `mismatches` chunks (backup) or pages (primary)
    /// differed.
    pub fn scrubbed(&self, mismatches: u64) {
        self.scrubs.fetch_add(1, Ordering::Relaxed);
        self.scrub_mismatches
            .fetch_add(mismatches, Ordering::Relaxed);
    }

    /// The backup failed over.
    pub fn failed_over(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
        self.protected.store(0, Ordering::Relaxed);
    }

    /// A checkpoint paused the program for `pause`.
    pub fn paused(&self, pause: Duration) {
        let us = pause.as_micros() as u64;
        self.pause_last_us.store(us, Ordering::Relaxed);
        self.pause_sum_us.fetch_add(us, Ordering::Relaxed);
        self.pause_count.fetch_add(1, Ordering::Relaxed);
        let seconds = pause.as_secs_f64();
        if let Some(i) = PAUSE_BUCKETS.iter().position(|&b| seconds <= b) {
            self.pause_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Updates the primary's metrics from one of its loop's events.
    pub fn primary_event(&self, event: &PrimaryEvent) {
        match event {
            PrimaryEvent::Sent {
                epoch,
                pause,
                bytes,
                ..
            } => {
                self.sent_epoch.store(*epoch, Ordering::Relaxed);
                self.bytes.fetch_add(*bytes, Ordering::Relaxed);
                self.paused(*pause);
            }
            PrimaryEvent::Committed { epoch, .. } => self.committed(*epoch, 0),
            // Part of memory reached the backup (an acknowledged epoch, counted as
            // such): no checkpoint yet, so neither protected nor a commit's age.
            PrimaryEvent::Synced {
                epoch,
                bytes,
                pause,
                ..
            } => {
                self.sent_epoch.store(*epoch, Ordering::Relaxed);
                self.committed_epoch.store(*epoch, Ordering::Relaxed);
                self.epochs_committed.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(*bytes, Ordering::Relaxed);
                self.paused(*pause);
            }
            PrimaryEvent::Unprotected { .. } => self.set_protected(false),
            // Protected again once a checkpoint commits.
            PrimaryEvent::Connected(n) => {
                self.committed_epoch.store(*n, Ordering::Relaxed);
                self.sent_epoch.store(*n, Ordering::Relaxed);
            }
            PrimaryEvent::Scrubbed { diverged, .. } => self.scrubbed(diverged.len() as u64),
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            write_metric(&mut out, name, kind, help, self.role, value);
        };
        let bytes = if self.role == "primary" {
            "sent"
        } else {
            "received"
        };
        metric(
            "epochs_committed_total",
            "counter",
            "Epochs the backup committed.",
            get(&self.epochs_committed).to_string(),
        );
        metric(
            "committed_epoch",
            "gauge",
            "Number of the last committed epoch.",
            get(&self.committed_epoch).to_string(),
        );
        metric(
            &format!("bytes_{bytes}_total"),
            "counter",
            "Encoded epoch bytes on the link.",
            get(&self.bytes).to_string(),
        );
        let lag = get(&self.sent_epoch).saturating_sub(get(&self.committed_epoch));
        metric(
            "epochs_in_flight",
            "gauge",
            "Epochs sent but not yet committed (primary).",
            lag.to_string(),
        );
        let last = get(&self.last_commit_us);
        let age = if last == 0 {
            "NaN".to_string()
        } else {
            let now = self.started.elapsed().as_micros() as u64;
            format!("{:.6}", now.saturating_sub(last) as f64 / 1e6)
        };
        metric(
            "last_commit_age_seconds",
            "gauge",
            "Seconds since the last commit (NaN: none yet).",
            age,
        );
        metric(
            "protected",
            "gauge",
            "1 while a backup holds the state (primary) or a primary is served (backup).",
            get(&self.protected).to_string(),
        );
        metric(
            "failovers_total",
            "counter",
            "Failovers this backup made.",
            get(&self.failovers).to_string(),
        );
        metric(
            "scrubs_total",
            "counter",
            "Scrubs completed.",
            get(&self.scrubs).to_string(),
        );
        metric(
            "scrub_mismatches_total",
            "counter",
            "Diverged pages (primary) or chunks (backup) scrubs found.",
            get(&self.scrub_mismatches).to_string(),
        );
        metric(
            "pause_last_seconds",
            "gauge",
            "Type II downtime of the last checkpoint (primary).",
            format!("{:.6}", get(&self.pause_last_us) as f64 / 1e6),
        );
        let role = self.role;
        let _ = writeln!(
            out,
            "# HELP fgbi_pause_seconds Type II downtime per checkpoint (primary)."
        );
        let _ = writeln!(out, "# TYPE fgbi_pause_seconds histogram");
        let mut cumulative = 0;
        for (bound, bucket) in PAUSE_BUCKETS.iter().zip(&self.pause_buckets) {
            cumulative += get(bucket);
            let _ = writeln!(
                out,
                "fgbi_pause_seconds_bucket{{role=\"{role}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = get(&self.pause_count);
        let _ = writeln!(
            out,
            "fgbi_pause_seconds_bucket{{role=\"{role}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "fgbi_pause_seconds_sum{{role=\"{role}\"}} {:.6}",
            get(&self.pause_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "fgbi_pause_seconds_count{{role=\"{role}\"}} {count}");
        out
    }
}

/// Appends the metric `fgbi_NAME` of `kind` (counter, gauge) to `out` in the text
/// format: its `HELP` and `TYPE` lines and one sample labelled `role`.
pub fn write_metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    role: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(out, "# HELP fgbi_{name} {help}");
    let _ = writeln!(out, "# TYPE fgbi_{name} {kind}");
    let _ = writeln!(out, "fgbi_{name}{{role=\"{role}\"}} {value}");
}

/// Serves `metrics` on `address` from a thread of its own: `GET /metrics` gets the
/// text format, anything else 404. Returns the address bound.
pub fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    serve_text(address, move || metrics.render())
}

/// Serves what `render` returns (the text format) on `address` from a thread of its
/// own, as [`serve`] does. Returns the address bound.
pub fn serve_text(
    address: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("fgbi-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // A broken scrape concerns only its scraper.
                let _ = answer(stream, &render);
            }
        })?;
    Ok(bound)
}

/// Reads one request's head and answers it.
fn answer(mut stream: TcpStream, render: &impl Fn() -> String) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
        ("200 OK", render())
    } else {
        ("404 Not Found", "only GET /metrics is served\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
