//! What a bench run covers.

use std::path::PathBuf;
use std::time::Duration;

use fgbi_engine::Mode;
use fgbi_hyp::synthetic::Tracking;
use fgbi_transport::{Implementation, RdmaConfig};

use super::error::BenchError;

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
    /// Where dirty pages come from, one variant or more: the first measures
    /// everything; each other measures its own type II downtime and overhead too,
    /// so that copying the dirty pages in the pause (`kernel`) and copy-on-write
    /// (`cow`) compare in one run.
    pub tracking: Vec<Tracking>,
    /// Compare the kernel's dirty pages with the workload's record every epoch.
    pub check_tracking: bool,
    /// The networked pass's transport and backup; `None` runs the in-process pass
    /// only.
    pub network: Option<NetworkSetting>,
    /// Injected primary failures per mode in the networked pass (at least 1: every
    /// protected round ends with one).
    pub failovers: usize,
    /// Measured epochs per protected round of the networked pass (after its sync);
    /// an unprotected round lasts as long as this many epochs.
    pub net_epochs: usize,
    /// How long the workload runs between two checkpoints in the networked pass.
    pub epoch: Duration,
    /// Pace the networked pass's workload to at most this many dirty pages per
    /// second (`None`: as fast as it runs). A step's pages are those one step
    /// dirtied in the in-process pass; the steps of one epoch may share pages, so
    /// the rate reached (`net_dirty_pages_per_sec`) can be lower.
    pub dirty_rate: Option<f64>,
}

impl BenchConfig {
    /// The variant that measures everything (the first of [`Self::tracking`]).
    pub fn main_tracking(&self) -> Tracking {
        self.tracking.first().copied().unwrap_or(Tracking::Kernel)
    }
}

/// How the networked pass replicates: the transport, and the `fgbi` executable
/// whose hidden `bench-backup` subcommand is the backup process.
#[derive(Clone, Debug)]
pub struct NetworkSetting {
    /// The transport implementation.
    pub implementation: Implementation,
    /// The RDMA device, port and GID (with [`Implementation::Rdma`]).
    pub rdma: RdmaConfig,
    /// The `fgbi` executable (`std::env::current_exe()` in `fgbi bench`).
    pub program: PathBuf,
}

impl NetworkSetting {
    /// Fails, saying what to do, if this host cannot run the transport.
    pub fn check(&self) -> Result<(), BenchError> {
        match self.implementation {
            Implementation::Rdma => self.rdma.available()?,
            other => other.available()?,
        }
        Ok(())
    }
}
