//! `fgbi bench`: every mode over the same deterministic workload, side by side.
//!
//! For each workload and mode: populate memory and sync it (not counted), then run
//! `epochs` epochs of writes; each epoch is encoded, applied to a separate replica,
//! acknowledged, and the replica's digest compared with the primary's.

use std::collections::BTreeMap;
use std::time::Instant;

use fgbi_engine::{
    Applier, ApplyError, EncodeError, Encoder, EncoderConfig, Geometry, GeometryError, Mode,
    memory_digest,
};
use fgbi_hyp::memory::{MemoryError, Region};
use fgbi_hyp::protected::{HypError, Protected};
use fgbi_hyp::synthetic::SyntheticMachine;
use fgbi_hyp::workload::{self, WorkloadError};
use serde::Serialize;
use thiserror::Error;

/// What a bench run covers.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Workload names.
    pub workloads: Vec<String>,
    /// Modes, run in this order on each workload.
    pub modes: Vec<Mode>,
    /// Measured epochs per run (after the initial sync).
    pub epochs: usize,
    /// Protected memory, bytes.
    pub mem_bytes: u64,
    /// Block size, bytes.
    pub block_size: usize,
    /// Encoder worker threads.
    pub workers: usize,
    /// Pin workers to cores.
    pub pin_workers: bool,
    /// Page cache budget (xbzrle and fgbi), bytes.
    pub cache_bytes: usize,
    /// Workload seed.
    pub seed: u64,
    /// fgbi: share identical blocks.
    pub sharing: bool,
    /// fgbi: consider lz4 encodings.
    pub compression: bool,
}

/// A bench run failed.
#[derive(Debug, Error)]
pub enum BenchError {
    /// Bad geometry.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    /// Bad workload.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The encoder refused.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The applier refused an epoch the encoder produced: a bug.
    #[error("the backup refused an epoch the primary produced: {0}")]
    Apply(#[from] ApplyError),
    /// Memory could not be mapped.
    #[error(transparent)]
    Region(#[from] MemoryError),
    /// The protected workload failed.
    #[error(transparent)]
    Hyp(#[from] HypError),
    /// Memory size does not fit this machine's address space.
    #[error("memory size {0} does not fit in this machine's address space")]
    Memory(u64),
}

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

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs every workload under every mode; calls `report` as each run finishes.
pub fn run(
    config: &BenchConfig,
    mut report: impl FnMut(&RunResult),
) -> Result<Vec<RunResult>, BenchError> {
    let geometry = Geometry::new(config.mem_bytes, config.block_size)?;
    let mut results = Vec::new();
    for name in &config.workloads {
        // Fail on a bad name before any work.
        workload::by_name(name, geometry.mem_bytes() as usize, config.seed)?;
        for &mode in &config.modes {
            let result = run_one(config, geometry, name, mode)?;
            report(&result);
            results.push(result);
        }
    }
    Ok(results)
}

fn run_one(
    config: &BenchConfig,
    geometry: Geometry,
    name: &str,
    mode: Mode,
) -> Result<RunResult, BenchError> {
    let mem = usize::try_from(geometry.mem_bytes())
        .map_err(|_| BenchError::Memory(geometry.mem_bytes()))?;
    let mut machine = SyntheticMachine::new(name, mem, config.seed)?;
    let mut encoder_config = EncoderConfig::new(geometry, mode);
    encoder_config.workers = config.workers;
    encoder_config.pin_workers = config.pin_workers;
    encoder_config.cache_bytes = config.cache_bytes;
    encoder_config.sharing = config.sharing;
    encoder_config.compression = config.compression;
    let mut encoder = Encoder::new(encoder_config)?;
    let mut applier = Applier::new(geometry);
    let mut replica = Region::new(mem)?;
    let mut written = Vec::new();
    let mut state = Vec::new();
    let mut wire = Vec::new();

    let mut verified = true;
    let mut result = RunResult {
        workload: name.to_string(),
        mode: mode.to_string(),
        epochs: config.epochs,
        block_size: geometry.block_size(),
        mem_bytes: geometry.mem_bytes(),
        workers: config.workers,
        backing: machine.backing().as_str(),
        dirty_pages: 0,
        wire_bytes: 0,
        sync_bytes: 0,
        encode_seconds: 0.0,
        apply_seconds: 0.0,
        encode_us_p50: 0.0,
        apply_us_p50: 0.0,
        verified: false,
        digest_bytes: 0,
        cache_bytes: 0,
        encodings: BTreeMap::new(),
    };
    let mut counts = fgbi_engine::EncodingCounts::default();
    let (mut encode_us, mut apply_us) = (Vec::new(), Vec::new());
    for epoch in 0..=config.epochs {
        // Epoch 0 syncs the populated memory; the others run the workload first.
        if epoch > 0 {
            machine.run()?;
        }
        machine.stop()?;
        written.clear();
        machine.harvest(&mut written)?;
        state.clear();
        machine.capture_state(&mut state)?;
        let started = Instant::now();
        let encoded = encoder.encode(&written, machine.memory(), &state)?;
        let encode_time = started.elapsed().as_secs_f64();
        let stats = encoded.stats;
        wire.clear();
        for part in encoded.parts() {
            wire.extend_from_slice(part);
        }
        let started = Instant::now();
        applier.apply(&mut replica, &wire)?;
        let apply_time = started.elapsed().as_secs_f64();
        encoder.acknowledge(stats.epoch)?;
        verified &= memory_digest(machine.memory()) == memory_digest(&replica)
            && applier.state() == state.as_slice();
        machine.resume()?;
        if epoch == 0 {
            result.sync_bytes = stats.bytes;
            continue;
        }
        result.dirty_pages += stats.dirty_pages;
        result.wire_bytes += stats.bytes;
        result.encode_seconds += encode_time;
        result.apply_seconds += apply_time;
        encode_us.push(encode_time * 1e6);
        apply_us.push(apply_time * 1e6);
        counts += stats.counts;
    }
    result.encode_us_p50 = median(&mut encode_us);
    result.apply_us_p50 = median(&mut apply_us);
    result.verified = verified;
    (result.digest_bytes, result.cache_bytes) = encoder.overhead_bytes();
    result.encodings = counts.fields().into_iter().collect();
    Ok(result)
}
