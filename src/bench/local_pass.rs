//! The in-process codec pass: the workload's epochs through [`LocalReplication`],
//! one workload step per epoch, the replica compared with the checkpoint after
//! every epoch.

use std::collections::BTreeMap;

use fgbi_engine::{EncoderConfig, EncodingCounts, Mode};
use fgbi_hyp::synthetic::SyntheticMachine;

use super::config::BenchConfig;
use super::error::BenchError;
use crate::local::LocalReplication;
use crate::percentiles::Percentiles;

/// What the codec pass measured.
pub struct CodecPass {
    /// Dirty pages over the measured epochs.
    pub dirty_pages: u64,
    /// Encoded bytes over the measured epochs.
    pub wire_bytes: u64,
    /// Encoded bytes of the initial sync.
    pub sync_bytes: u64,
    /// Encode time over the measured epochs, seconds.
    pub encode_seconds: f64,
    /// Apply time over the measured epochs, seconds.
    pub apply_seconds: f64,
    /// Median encode time of one epoch, microseconds.
    pub encode_us_p50: f64,
    /// Median apply time of one epoch, microseconds.
    pub apply_us_p50: f64,
    /// The pause of every measured epoch, microseconds.
    pub pause_us: Vec<f64>,
    /// Whether the replica equalled the checkpoint after every epoch.
    pub verified: bool,
    /// Checkpoints compared with the replica (the sync included).
    pub verified_checkpoints: u64,
    /// The encoder's block digests and page cache, bytes.
    pub overhead_bytes: (usize, usize),
    /// The most dirty pages one measured epoch staged.
    pub max_epoch_pages: u64,
    /// How often each encoding was chosen.
    pub encodings: BTreeMap<&'static str, u64>,
}

/// The encoder settings of `mode` under `config`.
pub fn encoder_config(
    config: &BenchConfig,
    geometry: fgbi_engine::Geometry,
    mode: Mode,
) -> EncoderConfig {
    let mut encoder = EncoderConfig::new(geometry, mode);
    encoder.workers = config.workers;
    encoder.pin_workers = config.pin_workers;
    encoder.cache_bytes = config.cache_bytes;
    encoder.sharing = config.sharing;
    encoder.compression = config.compression;
    encoder
}

/// Syncs `machine` to a fresh in-process replica, then runs `config.epochs` epochs.
pub fn run(
    config: &BenchConfig,
    encoder: EncoderConfig,
    machine: &mut SyntheticMachine,
) -> Result<CodecPass, BenchError> {
    let mut replication = LocalReplication::new(encoder)?;
    let mut pass = CodecPass {
        dirty_pages: 0,
        wire_bytes: 0,
        sync_bytes: 0,
        encode_seconds: 0.0,
        apply_seconds: 0.0,
        encode_us_p50: 0.0,
        apply_us_p50: 0.0,
        pause_us: Vec::with_capacity(config.epochs),
        verified: true,
        verified_checkpoints: 0,
        overhead_bytes: (0, 0),
        max_epoch_pages: 0,
        encodings: BTreeMap::new(),
    };
    let mut counts = EncodingCounts::default();
    let (mut encode_us, mut apply_us) = (Vec::new(), Vec::new());
    for epoch in 0..=config.epochs {
        // Epoch 0 syncs the populated memory; the others run the workload first.
        if epoch > 0 {
            machine.run()?;
        }
        let report = replication.checkpoint(machine, true)?;
        pass.verified &= report.verified == Some(true);
        pass.verified_checkpoints += 1;
        if epoch == 0 {
            pass.sync_bytes = report.wire_bytes;
            continue;
        }
        pass.dirty_pages += report.dirty_pages;
        pass.max_epoch_pages = pass.max_epoch_pages.max(report.dirty_pages);
        pass.wire_bytes += report.wire_bytes;
        pass.encode_seconds += report.encode.as_secs_f64();
        pass.apply_seconds += report.apply.as_secs_f64();
        encode_us.push(report.encode.as_secs_f64() * 1e6);
        apply_us.push(report.apply.as_secs_f64() * 1e6);
        pass.pause_us.push(report.pause.as_secs_f64() * 1e6);
        counts += report.counts;
    }
    pass.encode_us_p50 = Percentiles::of(&mut encode_us).p50;
    pass.apply_us_p50 = Percentiles::of(&mut apply_us).p50;
    pass.overhead_bytes = replication.encoder().overhead_bytes();
    pass.encodings = counts.fields().into_iter().collect();
    Ok(pass)
}
