//! Where a run's writes come from: a synthetic workload or a recorded trace.

use std::sync::Arc;

use fgbi_engine::Geometry;
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_hyp::trace::{Trace, TraceReplay};
use fgbi_hyp::workload::{self, Workload};

use fgbi_hyp::protected::HypError;

use super::config::{BenchConfig, TRACE_PREFIX};
use super::error::BenchError;

/// Builds a restored program's workload from the name in its state blob and the
/// memory size.
pub type WorkloadFactory =
    Box<dyn FnOnce(&str, usize) -> Result<Box<dyn Workload>, HypError> + Send>;

/// Where a run's writes come from.
pub enum Source {
    /// A synthetic workload, by name.
    Synthetic(String),
    /// A recorded trace.
    Trace(Arc<Trace>),
}

impl Source {
    /// The source `name` stands for, and the geometry it runs in; fails on a bad name
    /// or trace before any work.
    pub fn new(name: &str, config: &BenchConfig) -> Result<(Self, Geometry), BenchError> {
        let source = Self::open(name)?;
        let geometry = match &source {
            Self::Trace(trace) => Geometry::new(trace.mem_bytes(), config.block_size)?,
            Self::Synthetic(_) => {
                let geometry = Geometry::new(config.mem_bytes, config.block_size)?;
                workload::by_name(name, mem_usize(geometry)?, config.seed)?;
                geometry
            }
        };
        Ok((source, geometry))
    }

    /// The source `name` stands for; reads the trace of `trace:PATH`, and leaves a
    /// synthetic name to be checked when its workload is built.
    pub fn open(name: &str) -> Result<Self, BenchError> {
        let Some(path) = name.strip_prefix(TRACE_PREFIX) else {
            return Ok(Self::Synthetic(name.to_string()));
        };
        let trace = Trace::open(path).map_err(|source| BenchError::Trace {
            path: path.to_string(),
            source,
        })?;
        Ok(Self::Trace(Arc::new(trace)))
    }

    /// A fresh machine running this source over `mem` bytes, populated, its dirty
    /// pages from `tracking`.
    pub fn machine(
        &self,
        config: &BenchConfig,
        mem: usize,
        tracking: Tracking,
    ) -> Result<SyntheticMachine, BenchError> {
        Ok(match self {
            Self::Synthetic(name) => {
                SyntheticMachine::new(name, mem, config.seed, tracking, config.check_tracking)?
            }
            Self::Trace(trace) => SyntheticMachine::with_workload(
                Box::new(TraceReplay::new(trace.clone())),
                mem,
                tracking,
                config.check_tracking,
            )?,
        })
    }
}

impl Source {
    /// Builds this source's workload when the backup restores the program from the
    /// name in its state blob.
    pub fn workload_factory(&self) -> WorkloadFactory {
        match self {
            Self::Synthetic(_) => Box::new(|name: &str, mem: usize| {
                // The seed is irrelevant: the saved generator state replaces it.
                Ok(workload::by_name(name, mem, 0)?)
            }),
            Self::Trace(trace) => {
                let trace = trace.clone();
                Box::new(move |_: &str, _: usize| {
                    Ok(Box::new(TraceReplay::new(trace)) as Box<dyn Workload>)
                })
            }
        }
    }
}

/// The memory size of `geometry` as a `usize`.
pub fn mem_usize(geometry: Geometry) -> Result<usize, BenchError> {
    usize::try_from(geometry.mem_bytes()).map_err(|_| BenchError::Memory(geometry.mem_bytes()))
}
