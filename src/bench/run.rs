//! The driver: every workload under every mode, one result per pair.

use fgbi_engine::{Geometry, Mode};

use super::config::BenchConfig;
use super::error::BenchError;
use super::local_pass;
use super::result::RunResult;
use super::source::{Source, mem_usize};
use crate::percentiles::Percentiles;

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
    let encoder = local_pass::encoder_config(config, geometry, mode);
    let mut codec = local_pass::run(config, encoder, &mut machine)?;
    Ok(RunResult {
        workload: name.to_string(),
        mode: mode.to_string(),
        epochs: config.epochs,
        block_size: geometry.block_size(),
        mem_bytes: geometry.mem_bytes(),
        workers: config.workers,
        backing: machine.backing().as_str(),
        tracking: config.tracking_name(),
        dirty_pages: codec.dirty_pages,
        wire_bytes: codec.wire_bytes,
        sync_bytes: codec.sync_bytes,
        encode_seconds: codec.encode_seconds,
        apply_seconds: codec.apply_seconds,
        encode_us_p50: codec.encode_us_p50,
        apply_us_p50: codec.apply_us_p50,
        pause_us: Percentiles::of(&mut codec.pause_us),
        verified: codec.verified,
        digest_bytes: codec.overhead_bytes.0,
        cache_bytes: codec.overhead_bytes.1,
        encodings: codec.encodings,
    })
}
