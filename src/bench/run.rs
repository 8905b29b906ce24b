//! The driver: every workload under every mode, each under every tracking variant,
//! one result per workload and mode.

use std::collections::BTreeMap;
use std::time::Duration;

use fgbi_engine::{Geometry, Mode, PAGE_SIZE};
use fgbi_hyp::synthetic::Tracking;

use super::config::BenchConfig;
use super::error::BenchError;
use super::link::Link;
use super::local_pass::{self, CodecPass};
use super::memcpy;
use super::network::{self, FailoverSample, NetworkPass};
use super::result::{FailoverMs, RunResult, Throughput, TrackingFigures};
use super::source::{Source, mem_usize};
use crate::percentiles::{Percentiles, median};

/// Samples of the memcpy bandwidth taken before the runs.
const MEMCPY_SAMPLES: usize = 7;

/// Runs every workload under every mode; calls `report` as each run finishes.
pub fn run(
    config: &BenchConfig,
    mut report: impl FnMut(&RunResult),
) -> Result<Vec<RunResult>, BenchError> {
    if config.epochs == 0 || config.net_epochs == 0 {
        return Err(BenchError::Setting(
            "the bench needs at least 1 measured epoch per pass (--epochs, --net-epochs)".into(),
        ));
    }
    if config.tracking.is_empty() {
        return Err(BenchError::Setting(
            "the bench needs at least one tracking variant (--tracking)".into(),
        ));
    }
    for (i, tracking) in config.tracking.iter().enumerate() {
        if config.tracking[..i].contains(tracking) {
            return Err(BenchError::Setting(format!(
                "--tracking names {} twice",
                tracking.as_str()
            )));
        }
    }
    if let Some(network) = &config.network {
        network.check()?;
    }
    if config
        .dirty_rate
        .is_some_and(|r| !(r.is_finite() && r > 0.0))
    {
        return Err(BenchError::Setting(
            "the dirty rate must be a positive number of pages per second (--dirty-rate)".into(),
        ));
    }
    let mut sources = Vec::new();
    for name in &config.workloads {
        sources.push((name, Source::new(name, config)?));
    }
    let memcpy_gbps = memcpy::bandwidth_gbps(MEMCPY_SAMPLES);
    let mut results = Vec::new();
    for (name, (source, geometry)) in &sources {
        for &mode in &config.modes {
            let mem = mem_usize(*geometry)?;
            let encoder = local_pass::encoder_config(config, *geometry, mode);
            let Some((&first, rest)) = config.tracking.split_first() else {
                return Err(BenchError::Setting(
                    "the bench needs at least one tracking variant (--tracking)".into(),
                ));
            };
            let mut machine = source.machine(config, mem, first)?;
            let backing = machine.backing().as_str();
            let codec = local_pass::run(config, encoder.clone(), &mut machine)?;
            let pace = pace(config, &codec);
            let mut others = Vec::with_capacity(rest.len());
            let net = match &config.network {
                // The networked pass continues the same program, and each other
                // variant's networked pass the program the previous one left.
                Some(network) => {
                    let link = Link::new(name, &encoder, network, first)?;
                    let (net, mut program) =
                        network::run(config, source, &link, machine, first, pace)?;
                    for &tracking in rest {
                        let link = Link::new(name, &encoder, network, tracking)?;
                        let (pass, next) =
                            network::run(config, source, &link, program, tracking, pace)?;
                        program = next;
                        others.push(OtherPass::Networked(tracking, pass));
                    }
                    Some(net)
                }
                // Without it, each other variant runs its own in-process pass.
                None => {
                    drop(machine);
                    for &tracking in rest {
                        let mut machine = source.machine(config, mem, tracking)?;
                        let pass = local_pass::run(config, encoder.clone(), &mut machine)?;
                        others.push(OtherPass::Local(tracking, pass));
                    }
                    None
                }
            };
            let result = assemble(
                config,
                *geometry,
                name,
                mode,
                MainPasses {
                    tracking: first,
                    backing,
                    codec,
                    net,
                },
                others,
                memcpy_gbps,
            );
            report(&result);
            results.push(result);
        }
    }
    Ok(results)
}

/// The time between two workload steps that holds the networked pass to
/// `config.dirty_rate`, from the pages one step dirtied in the in-process pass.
/// (A step per hour is the slowest pace: no round lasts that long.)
fn pace(config: &BenchConfig, codec: &CodecPass) -> Option<Duration> {
    const SLOWEST: Duration = Duration::from_secs(3600);
    let rate = config.dirty_rate?;
    let pages_per_step = codec.dirty_pages as f64 / config.epochs.max(1) as f64;
    (pages_per_step > 0.0).then(|| {
        Duration::try_from_secs_f64(pages_per_step / rate)
            .unwrap_or(SLOWEST)
            .min(SLOWEST)
    })
}

/// What the first tracking variant's passes measured: every field of a run.
struct MainPasses {
    tracking: Tracking,
    backing: &'static str,
    codec: CodecPass,
    net: Option<NetworkPass>,
}

/// What another tracking variant measured: its type II downtime and overhead.
enum OtherPass {
    /// Its networked pass.
    Networked(Tracking, NetworkPass),
    /// Its in-process pass (no networked pass ran).
    Local(Tracking, CodecPass),
}

/// Type II downtime and overhead measured by a networked pass.
fn net_figures(net: &mut NetworkPass) -> TrackingFigures {
    TrackingFigures {
        pause_us: Percentiles::of(&mut net.pause_us),
        overhead_pct: throughput(net).1,
        pause_samples_us: net.pause_us.clone(),
    }
}

/// Type II downtime measured by an in-process pass.
fn local_figures(codec: &mut CodecPass) -> TrackingFigures {
    TrackingFigures {
        pause_us: Percentiles::of(&mut codec.pause_us),
        overhead_pct: None,
        pause_samples_us: codec.pause_us.clone(),
    }
}

/// The workload's throughput with and without protection (medians over the
/// rounds), and the share protection costs it, percent.
fn throughput(net: &mut NetworkPass) -> (Throughput, Option<f64>) {
    let unprotected = median(&mut net.unprotected_rates).unwrap_or(0.0);
    let protected = median(&mut net.protected_rates).unwrap_or(0.0);
    let overhead = (unprotected > 0.0).then(|| (1.0 - protected / unprotected) * 100.0);
    (
        Throughput {
            unprotected,
            protected,
        },
        overhead,
    )
}

/// One run's result from the passes of its variants: everything from the `main`
/// one, the type II downtime and overhead of each, the verifications of all.
fn assemble(
    config: &BenchConfig,
    geometry: Geometry,
    name: &str,
    mode: Mode,
    main: MainPasses,
    others: Vec<OtherPass>,
    memcpy_gbps: f64,
) -> RunResult {
    let MainPasses {
        tracking,
        backing,
        mut codec,
        mut net,
    } = main;
    let local_pause_us = Percentiles::of(&mut codec.pause_us);
    let main = match net.as_mut() {
        Some(net) => net_figures(net),
        None => local_figures(&mut codec),
    };
    let mut by_tracking = BTreeMap::new();
    let (mut verified, mut verified_checkpoints) = (true, 0);
    for other in others {
        let (tracking, figures) = match other {
            OtherPass::Networked(tracking, mut pass) => {
                verified &= pass.verified;
                verified_checkpoints += pass.failovers.len() as u64;
                (tracking, net_figures(&mut pass))
            }
            OtherPass::Local(tracking, mut pass) => {
                verified &= pass.verified;
                verified_checkpoints += pass.verified_checkpoints;
                (tracking, local_figures(&mut pass))
            }
        };
        by_tracking.insert(tracking.as_str(), figures);
    }
    let mut result = RunResult {
        workload: name.to_string(),
        mode: mode.to_string(),
        epochs: config.epochs,
        block_size: geometry.block_size(),
        mem_bytes: geometry.mem_bytes(),
        workers: config.workers,
        backing,
        tracking: tracking.as_str(),
        dirty_pages: codec.dirty_pages,
        wire_bytes: codec.wire_bytes,
        sync_bytes: codec.sync_bytes,
        encode_seconds: codec.encode_seconds,
        apply_seconds: codec.apply_seconds,
        encode_us_p50: codec.encode_us_p50,
        apply_us_p50: codec.apply_us_p50,
        pause_us: main.pause_us,
        verified: codec.verified && verified,
        digest_bytes: codec.overhead_bytes.0,
        cache_bytes: codec.overhead_bytes.1,
        encodings: codec.encodings,
        transport: "local",
        verified_checkpoints: codec.verified_checkpoints + verified_checkpoints,
        local_pause_us,
        failovers: 0,
        failover_ms: None,
        overhead_pct: main.overhead_pct,
        throughput: None,
        net_epochs: None,
        net_dirty_pages: None,
        net_wire_bytes: None,
        staging_bytes: codec.max_epoch_pages as usize * PAGE_SIZE,
        receive_ring_bytes: 0,
        pipeline_cpu_seconds: None,
        pipeline_cpu_us_per_epoch: None,
        dirty_rate_target: config.dirty_rate,
        net_dirty_pages_per_sec: None,
        memcpy_gbps,
        encode_vs_memcpy: 0.0,
        apply_vs_memcpy: 0.0,
        pause_by_tracking: BTreeMap::new(),
    };
    if memcpy_gbps > 0.0 {
        result.encode_vs_memcpy = result.encode_gbps() / memcpy_gbps;
        result.apply_vs_memcpy = result.apply_gbps() / memcpy_gbps;
    }
    result.pause_by_tracking.insert(tracking.as_str(), main);
    result.pause_by_tracking.append(&mut by_tracking);
    if let Some(mut net) = net {
        result.transport = net.transport;
        result.verified &= net.verified;
        result.verified_checkpoints += net.failovers.len() as u64;
        result.failovers = net.failovers.len();
        result.failover_ms = Some(failover_ms(&net.failovers));
        result.throughput = Some(throughput(&mut net).0);
        result.net_epochs = Some(net.epochs);
        result.net_dirty_pages = Some(net.dirty_pages);
        result.net_wire_bytes = Some(net.wire_bytes);
        result.net_dirty_pages_per_sec =
            (net.protected_seconds > 0.0).then(|| net.dirty_pages as f64 / net.protected_seconds);
        result.staging_bytes = result
            .staging_bytes
            .max(net.max_epoch_pages as usize * PAGE_SIZE);
        result.receive_ring_bytes = net.receive_ring_bytes;
        result.pipeline_cpu_seconds = Some(net.pipeline_cpu_seconds);
        result.pipeline_cpu_us_per_epoch =
            Some(net.pipeline_cpu_seconds * 1e6 / net.epochs.max(1) as f64);
    }
    result
}

/// Medians of each part of type I downtime, and of the totals, in milliseconds.
fn failover_ms(samples: &[FailoverSample]) -> FailoverMs {
    let ms = |part: fn(&FailoverSample) -> Duration| {
        let mut values: Vec<f64> = samples
            .iter()
            .map(|s| part(s).as_secs_f64() * 1e3)
            .collect();
        median(&mut values).unwrap_or(0.0)
    };
    FailoverMs {
        detect: ms(|s| s.detect),
        apply: ms(|s| s.apply),
        restore: ms(|s| s.restore),
        first_run: ms(|s| s.first_run),
        total: ms(|s| s.detect + s.apply + s.restore + s.first_run),
    }
}
