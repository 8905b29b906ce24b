//! `fgbi bench`: every mode over the same deterministic workload, side by side.
//!
//! For each workload and mode: populate memory and sync it (not counted), then run
//! `epochs` epochs of writes; each epoch is encoded, applied to a separate replica,
//! acknowledged, and the replica's digest compared with the primary's.
//!
//! A workload named `trace:PATH` replays the trace recorded at PATH (`fgbi record`)
//! over memory of the trace's size; `mem_bytes` applies to the synthetic workloads.

use std::collections::BTreeMap;
use std::sync::Arc;

use fgbi_engine::{EncodeError, EncoderConfig, Geometry, GeometryError, Mode};
use fgbi_hyp::memory::MemoryError;
use fgbi_hyp::protected::HypError;
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_hyp::trace::{Trace, TraceError, TraceReplay};
use fgbi_hyp::workload::{self, WorkloadError};
use serde::Serialize;

use crate::local::{LocalReplication, ReplicationError};
use thiserror::Error;

/// The prefix of a workload name that replays a recorded trace: `trace:PATH`.
pub const TRACE_PREFIX: &str = "trace:";

/// What a bench run covers.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Workload names: synthetic ones, or `trace:PATH` for a recorded trace.
    pub workloads: Vec<String>,
    /// Modes, run in this order on each workload.
    pub modes: Vec<Mode>,
    /// Measured epochs per run (after the initial sync).
    pub epochs: usize,
    /// Protected memory of the synthetic workloads, bytes (a trace brings its own).
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
    /// Where dirty pages come from.
    pub tracking: Tracking,
    /// Compare the kernel's dirty pages with the workload's record every epoch.
    pub check_tracking: bool,
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
    /// Replication failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// Memory could not be mapped.
    #[error(transparent)]
    Region(#[from] MemoryError),
    /// The protected workload failed.
    #[error(transparent)]
    Hyp(#[from] HypError),
    /// A recorded trace could not be read.
    #[error("{path}: {source}")]
    Trace {
        /// The trace's path.
        path: String,
        /// Why.
        #[source]
        source: TraceError,
    },
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

/// The median, 99th percentile and maximum of a set of samples.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of `values` (sorted in place); zeros when empty.
    pub fn of(values: &mut [f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let rank =
            |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1];
        Self {
            p50: rank(0.5),
            p99: rank(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// Where a run's writes come from.
enum Source {
    /// A synthetic workload, by name.
    Synthetic(String),
    /// A recorded trace.
    Trace(Arc<Trace>),
}

impl Source {
    /// The source `name` stands for, and the geometry it runs in; fails on a bad name
    /// or trace before any work.
    fn new(name: &str, config: &BenchConfig) -> Result<(Self, Geometry), BenchError> {
        if let Some(path) = name.strip_prefix(TRACE_PREFIX) {
            let trace = Trace::open(path).map_err(|source| BenchError::Trace {
                path: path.to_string(),
                source,
            })?;
            let geometry = Geometry::new(trace.mem_bytes(), config.block_size)?;
            return Ok((Self::Trace(Arc::new(trace)), geometry));
        }
        let geometry = Geometry::new(config.mem_bytes, config.block_size)?;
        workload::by_name(name, mem_usize(geometry)?, config.seed)?;
        Ok((Self::Synthetic(name.to_string()), geometry))
    }

    fn machine(&self, config: &BenchConfig, mem: usize) -> Result<SyntheticMachine, BenchError> {
        Ok(match self {
            Self::Synthetic(name) => SyntheticMachine::new(
                name,
                mem,
                config.seed,
                config.tracking,
                config.check_tracking,
            )?,
            Self::Trace(trace) => SyntheticMachine::with_workload(
                Box::new(TraceReplay::new(trace.clone())),
                mem,
                config.tracking,
                config.check_tracking,
            )?,
        })
    }
}

fn mem_usize(geometry: Geometry) -> Result<usize, BenchError> {
    usize::try_from(geometry.mem_bytes()).map_err(|_| BenchError::Memory(geometry.mem_bytes()))
}

/// Runs every workload under every mode; calls `report` as each run finishes.
pub fn run(
    config: &BenchConfig,
    mut report: impl FnMut(&RunResult),
) -> Result<Vec<RunResult>, BenchError> {
    let mut results = Vec::new();
    for name in &config.workloads {
        let (source, geometry) = Source::new(name, config)?;
        for &mode in &config.modes {
            let result = run_one(config, geometry, name, &source, mode)?;
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
    source: &Source,
    mode: Mode,
) -> Result<RunResult, BenchError> {
    let mut machine = source.machine(config, mem_usize(geometry)?)?;
    let mut encoder_config = EncoderConfig::new(geometry, mode);
    encoder_config.workers = config.workers;
    encoder_config.pin_workers = config.pin_workers;
    encoder_config.cache_bytes = config.cache_bytes;
    encoder_config.sharing = config.sharing;
    encoder_config.compression = config.compression;
    let mut replication = LocalReplication::new(encoder_config)?;

    let mut result = RunResult {
        workload: name.to_string(),
        mode: mode.to_string(),
        epochs: config.epochs,
        block_size: geometry.block_size(),
        mem_bytes: geometry.mem_bytes(),
        workers: config.workers,
        backing: machine.backing().as_str(),
        tracking: config.tracking.as_str(),
        dirty_pages: 0,
        wire_bytes: 0,
        sync_bytes: 0,
        encode_seconds: 0.0,
        apply_seconds: 0.0,
        encode_us_p50: 0.0,
        apply_us_p50: 0.0,
        pause_us: Percentiles::default(),
        verified: true,
        digest_bytes: 0,
        cache_bytes: 0,
        encodings: BTreeMap::new(),
    };
    let mut counts = fgbi_engine::EncodingCounts::default();
    let (mut encode_us, mut apply_us, mut pause_us) = (Vec::new(), Vec::new(), Vec::new());
    for epoch in 0..=config.epochs {
        // Epoch 0 syncs the populated memory; the others run the workload first.
        if epoch > 0 {
            machine.run()?;
        }
        let report = replication.checkpoint(&mut machine, true)?;
        result.verified &= report.verified == Some(true);
        if epoch == 0 {
            result.sync_bytes = report.wire_bytes;
            continue;
        }
        result.dirty_pages += report.dirty_pages;
        result.wire_bytes += report.wire_bytes;
        result.encode_seconds += report.encode.as_secs_f64();
        result.apply_seconds += report.apply.as_secs_f64();
        encode_us.push(report.encode.as_secs_f64() * 1e6);
        apply_us.push(report.apply.as_secs_f64() * 1e6);
        pause_us.push(report.pause.as_secs_f64() * 1e6);
        counts += report.counts;
    }
    result.encode_us_p50 = Percentiles::of(&mut encode_us).p50;
    result.apply_us_p50 = Percentiles::of(&mut apply_us).p50;
    result.pause_us = Percentiles::of(&mut pause_us);
    (result.digest_bytes, result.cache_bytes) = replication.encoder().overhead_bytes();
    result.encodings = counts.fields().into_iter().collect();
    Ok(result)
}
