//! What one workload under one mode reports: a synthetic workload or trace
//! ([`RunResult`]) or a real program ([`ProgramResult`]).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::percentiles::Percentiles;

/// Results of one workload under one mode.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// Workload name.
    pub workload: String,
    /// Mode name.
    pub mode: String,
    /// Measured epochs.
    pub epochs: usize,
    /// Block size, bytes.
    pub block_size: usize,
    /// Protected memory, bytes.
    pub mem_bytes: u64,
    /// Encoder workers.
    pub workers: usize,
    /// What backs primary and replica memory: hugetlb, thp or 4k.
    pub backing: &'static str,
    /// Where dirty pages came from: kernel or generator.
    pub tracking: &'static str,
    /// Dirty pages over all measured epochs.
    pub dirty_pages: u64,
    /// Encoded bytes over all measured epochs.
    pub wire_bytes: u64,
    /// Encoded bytes of the initial sync (not in `wire_bytes`).
    pub sync_bytes: u64,
    /// Time spent encoding the measured epochs, seconds.
    pub encode_seconds: f64,
    /// Time spent validating and applying the measured epochs, seconds.
    pub apply_seconds: f64,
    /// Median encode time of one epoch, microseconds.
    pub encode_us_p50: f64,
    /// Median apply time of one epoch, microseconds.
    pub apply_us_p50: f64,
    /// Type II downtime: the pause per checkpoint (stop, harvest, copy dirty pages,
    /// resume), microseconds.
    pub pause_us: Percentiles,
    /// True only if the replica's digest equaled the primary's after every epoch.
    pub verified: bool,
    /// Bytes of block digests the encoder keeps.
    pub digest_bytes: usize,
    /// Bytes of page cache the encoder keeps.
    pub cache_bytes: usize,
    /// How often each encoding was chosen (measured epochs).
    pub encodings: BTreeMap<&'static str, u64>,
    /// The transport that carried the measured epochs: `local` (in-process), `std`
    /// or `io_uring`.
    pub transport: &'static str,
    /// Checkpoints whose replica was compared with the primary's.
    pub verified_checkpoints: u64,
    /// Type II downtime of the in-process pass (one workload step per epoch),
    /// microseconds; `pause_us` is the networked pass's when it ran.
    pub local_pause_us: Percentiles,
    /// Injected primary failures (0 without the networked pass).
    pub failovers: usize,
    /// Type I downtime, milliseconds: medians over the injected failures.
    pub failover_ms: Option<FailoverMs>,
    /// The workload's throughput lost to protection, percent (medians of the
    /// interleaved rounds).
    pub overhead_pct: Option<f64>,
    /// Workload steps per second, unprotected and protected (medians).
    pub throughput: Option<Throughput>,
    /// Measured checkpoints of the networked pass.
    pub net_epochs: Option<u64>,
    /// Dirty pages of the networked pass's measured checkpoints.
    pub net_dirty_pages: Option<u64>,
    /// Bytes sent for the networked pass's measured checkpoints.
    pub net_wire_bytes: Option<u64>,
    /// The largest steady-state epoch's copy of dirty pages, bytes.
    pub staging_bytes: usize,
    /// The backup's receive ring, bytes (0 in-process).
    pub receive_ring_bytes: usize,
    /// CPU time of the replication pipeline (everything but the workload) over the
    /// networked pass's measured checkpoints, seconds.
    pub pipeline_cpu_seconds: Option<f64>,
    /// The same per measured checkpoint, microseconds.
    pub pipeline_cpu_us_per_epoch: Option<f64>,
    /// The dirty rate the networked pass's workload was paced to, pages per
    /// second (`None`: unpaced).
    pub dirty_rate_target: Option<f64>,
    /// Dirty pages per second the networked pass's measured epochs harvested.
    pub net_dirty_pages_per_sec: Option<f64>,
    /// This machine's memcpy bandwidth, measured in the same run, GB/s.
    pub memcpy_gbps: f64,
    /// Encode throughput as a fraction of memcpy's.
    pub encode_vs_memcpy: f64,
    /// Apply throughput as a fraction of memcpy's.
    pub apply_vs_memcpy: f64,
    /// Type II downtime and overhead of every tracking variant that ran, by its
    /// name (`kernel`: the dirty pages copied in the pause; `cow`: copy-on-write);
    /// the entry of `tracking` holds the figures above.
    pub pause_by_tracking: BTreeMap<&'static str, TrackingFigures>,
}

/// Type II downtime and overhead of one tracking variant.
#[derive(Clone, Debug, Serialize)]
pub struct TrackingFigures {
    /// Pause per checkpoint, microseconds: the networked pass's when it ran, else
    /// the in-process pass's.
    pub pause_us: Percentiles,
    /// The workload's throughput lost to protection, percent (networked pass).
    pub overhead_pct: Option<f64>,
    /// Every pause behind `pause_us`, microseconds (for plots; not serialized).
    #[serde(skip)]
    pub pause_samples_us: Vec<f64>,
}

/// Type I downtime in parts, milliseconds: the median of each part over the
/// injected failures, and the median of their sums.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct FailoverMs {
    /// From the primary's stop to the backup's verdict.
    pub detect: f64,
    /// Finishing the last epoch (the replica only changes by whole epochs).
    pub apply: f64,
    /// Rebuilding the program from the replica and its state blob.
    pub restore: f64,
    /// The restored program's first step.
    pub first_run: f64,
    /// Detection to the program running again: the sum of the parts.
    pub total: f64,
}

/// The workload's own progress: steps (fixed batches of writes) per second.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Throughput {
    /// Median over the unprotected rounds.
    pub unprotected: f64,
    /// Median over the protected rounds.
    pub protected: f64,
}

/// Results of a real program (the key-value service, the heat solver) under one
/// mode: protected through a backup process, its own throughput against unprotected
/// runs of it interleaved with the protected ones, and killed to fail over.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramResult {
    /// The program: `kv` or `heat`.
    pub workload: String,
    /// Encoding mode.
    pub mode: String,
    /// Transport between the program and its backup process.
    pub transport: String,
    /// Protected memory, bytes.
    pub mem_bytes: u64,
    /// Epoch length, milliseconds.
    pub epoch_ms: u64,
    /// Checkpoints taken, every protected round.
    pub checkpoints: u64,
    /// Bytes sent for them.
    pub wire_bytes: u64,
    /// Bytes per checkpoint.
    pub bytes_per_epoch: f64,
    /// Pause per checkpoint (type II downtime), microseconds.
    pub pause_us: Percentiles,
    /// Every pause behind `pause_us`, microseconds (for plots; not serialized).
    #[serde(skip)]
    pub pause_samples_us: Vec<f64>,
    /// Failures injected (SIGKILL of the protected program).
    pub failovers: usize,
    /// Type I downtime in parts; `first_run` is from the restored program serving to
    /// its first answer (a reply, an iteration), `total` from the kill to it.
    pub failover_ms: FailoverMs,
    /// The program's own rate, unprotected and protected ([`Self::throughput_unit`]).
    pub throughput: Throughput,
    /// What the rate counts: `requests/s`, `iterations/s`.
    pub throughput_unit: &'static str,
    /// The throughput protection costs, percent.
    pub overhead_pct: Option<f64>,
    /// Whether every failover kept the program's state: no acknowledged write lost,
    /// the resumed result equal to the unprotected one.
    pub verified: bool,
    /// What was checked, in words.
    pub check: String,
}

impl RunResult {
    /// Dirty page data encoded per second, GB/s.
    pub fn encode_gbps(&self) -> f64 {
        rate(self.dirty_pages, self.encode_seconds)
    }

    /// Dirty page data applied per second, GB/s.
    pub fn apply_gbps(&self) -> f64 {
        rate(self.dirty_pages, self.apply_seconds)
    }
}

fn rate(pages: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        pages as f64 * fgbi_engine::PAGE_SIZE as f64 / seconds / 1e9
    } else {
        0.0
    }
}
