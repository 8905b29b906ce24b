//! What one workload under one mode reports.

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
