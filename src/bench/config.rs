//! What a bench run covers.

use fgbi_engine::Mode;
use fgbi_hyp::synthetic::Tracking;

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

impl BenchConfig {
    /// The name reported for the tracking setting.
    pub fn tracking_name(&self) -> &'static str {
        match self.tracking {
            Tracking::Kernel => "kernel",
            Tracking::Generator => "generator",
        }
    }
}
