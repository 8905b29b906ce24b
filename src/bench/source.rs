//! Where a run's writes come from: a synthetic workload or a recorded trace.

use std::sync::Arc;

use fgbi_engine::Geometry;
use fgbi_hyp::synthetic::SyntheticMachine;
use fgbi_hyp::trace::{Trace, TraceReplay};
use fgbi_hyp::workload::{self, Workload};

use super::link::WorkloadFactory;

use super::config::{BenchConfig, TRACE_PREFIX};
use super::error::BenchError;

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

    /// A fresh machine running this source over `mem` bytes, populated.
    pub fn machine(
        &self,
        config: &BenchConfig,
        mem: usize,
    ) -> Result<SyntheticMachine, BenchError> {
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
