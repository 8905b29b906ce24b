//! One CSV line per run: the JSON fields, nested ones flattened, without
//! `encodings`; `pause_by_tracking` as [`TRACKING_COLUMNS`] for every tracking
//! variant, empty for a variant that did not run. Then one line per program run,
//! in the columns it shares with the runs (its checkpoints and their bytes in
//! `net_epochs` and `net_wire_bytes`), the others empty.

use fgbi_hyp::synthetic::Tracking;

use crate::bench::result::{ProgramResult, RunResult};

/// The columns before the tracking variants'.
pub const COLUMNS: &str = "workload,mode,epochs,block_size,mem_bytes,workers,backing,tracking,transport,dirty_pages,wire_bytes,sync_bytes,encode_seconds,apply_seconds,encode_us_p50,apply_us_p50,pause_us_p50,pause_us_p99,pause_us_max,local_pause_us_p50,local_pause_us_p99,local_pause_us_max,verified,verified_checkpoints,digest_bytes,cache_bytes,staging_bytes,receive_ring_bytes,failovers,failover_ms_detect,failover_ms_apply,failover_ms_restore,failover_ms_first_run,failover_ms_total,overhead_pct,throughput_unprotected,throughput_protected,net_epochs,net_dirty_pages,net_wire_bytes,pipeline_cpu_seconds,pipeline_cpu_us_per_epoch,dirty_rate_target,net_dirty_pages_per_sec,memcpy_gbps,encode_vs_memcpy,apply_vs_memcpy";

/// The columns of each tracking variant, after its name and an underscore
/// (`cow_pause_us_p50`).
pub const TRACKING_COLUMNS: [&str; 4] = [
    "pause_us_p50",
    "pause_us_p99",
    "pause_us_max",
    "overhead_pct",
];

/// The header line: [`COLUMNS`], then [`TRACKING_COLUMNS`] of every variant.
pub fn header() -> String {
    let mut header = COLUMNS.to_string();
    for tracking in Tracking::ALL {
        for column in TRACKING_COLUMNS {
            header.push_str(&format!(",{}_{column}", tracking.as_str()));
        }
    }
    header
}

/// The results as CSV: the [`header`] line, then one line per run and one per
/// program run; a value the run did not measure is empty.
pub fn document(results: &[RunResult], programs: &[ProgramResult]) -> String {
    let mut out = header();
    out.push('\n');
    for r in results {
        let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        let failover =
            |part: fn(&crate::bench::FailoverMs) -> f64| opt(r.failover_ms.map(|f| part(&f)));
        let fields = [
            field(&r.workload),
            field(&r.mode),
            r.epochs.to_string(),
            r.block_size.to_string(),
            r.mem_bytes.to_string(),
            r.workers.to_string(),
            r.backing.to_string(),
            r.tracking.to_string(),
            r.transport.to_string(),
            r.dirty_pages.to_string(),
            r.wire_bytes.to_string(),
            r.sync_bytes.to_string(),
            r.encode_seconds.to_string(),
            r.apply_seconds.to_string(),
            r.encode_us_p50.to_string(),
            r.apply_us_p50.to_string(),
            r.pause_us.p50.to_string(),
            r.pause_us.p99.to_string(),
            r.pause_us.max.to_string(),
            r.local_pause_us.p50.to_string(),
            r.local_pause_us.p99.to_string(),
            r.local_pause_us.max.to_string(),
            r.verified.to_string(),
            r.verified_checkpoints.to_string(),
            r.digest_bytes.to_string(),
            r.cache_bytes.to_string(),
            r.staging_bytes.to_string(),
            r.receive_ring_bytes.to_string(),
            r.failovers.to_string(),
            failover(|f| f.detect),
            failover(|f| f.apply),
            failover(|f| f.restore),
            failover(|f| f.first_run),
            failover(|f| f.total),
            opt(r.overhead_pct),
            opt(r.throughput.map(|t| t.unprotected)),
            opt(r.throughput.map(|t| t.protected)),
            opt(r.net_epochs.map(|v| v as f64)),
            opt(r.net_dirty_pages.map(|v| v as f64)),
            opt(r.net_wire_bytes.map(|v| v as f64)),
            opt(r.pipeline_cpu_seconds),
            opt(r.pipeline_cpu_us_per_epoch),
            opt(r.dirty_rate_target),
            opt(r.net_dirty_pages_per_sec),
            r.memcpy_gbps.to_string(),
            r.encode_vs_memcpy.to_string(),
            r.apply_vs_memcpy.to_string(),
        ];
        out.push_str(&fields.join(","));
        for tracking in Tracking::ALL {
            let figures = r.pause_by_tracking.get(tracking.as_str());
            let values = match figures {
                Some(f) => [
                    f.pause_us.p50.to_string(),
                    f.pause_us.p99.to_string(),
                    f.pause_us.max.to_string(),
                    opt(f.overhead_pct),
                ],
                None => Default::default(),
            };
            out.push(',');
            out.push_str(&values.join(","));
        }
        out.push('\n');
    }
    for program in programs {
        out.push_str(&program_line(program));
        out.push('\n');
    }
    out
}

/// A program run's line: the columns of [`header`] it has, the others empty.
fn program_line(p: &ProgramResult) -> String {
    let f = p.failover_ms;
    let values = [
        ("workload", field(&p.workload)),
        ("mode", field(&p.mode)),
        ("mem_bytes", p.mem_bytes.to_string()),
        ("transport", field(&p.transport)),
        ("pause_us_p50", p.pause_us.p50.to_string()),
        ("pause_us_p99", p.pause_us.p99.to_string()),
        ("pause_us_max", p.pause_us.max.to_string()),
        ("verified", p.verified.to_string()),
        ("failovers", p.failovers.to_string()),
        ("failover_ms_detect", f.detect.to_string()),
        ("failover_ms_apply", f.apply.to_string()),
        ("failover_ms_restore", f.restore.to_string()),
        ("failover_ms_first_run", f.first_run.to_string()),
        ("failover_ms_total", f.total.to_string()),
        (
            "overhead_pct",
            p.overhead_pct.map(|v| v.to_string()).unwrap_or_default(),
        ),
        (
            "throughput_unprotected",
            p.throughput.unprotected.to_string(),
        ),
        ("throughput_protected", p.throughput.protected.to_string()),
        ("net_epochs", p.checkpoints.to_string()),
        ("net_wire_bytes", p.wire_bytes.to_string()),
    ];
    header()
        .split(',')
        .map(|column| {
            values
                .iter()
                .find(|(name, _)| *name == column)
                .map(|(_, value)| value.clone())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A CSV field, quoted if it holds a comma, quote or line break (RFC 4180).
pub fn field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_with_separators_are_quoted() {
        assert_eq!(field("trace:a.fgbt"), "trace:a.fgbt");
        assert_eq!(field("trace:a,b"), "\"trace:a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
