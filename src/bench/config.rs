//! What a bench run covers.

use std::str::FromStr;
use std::time::Duration;

use fgbi_engine::Mode;
use fgbi_hyp::synthetic::Tracking;
use fgbi_transport::Implementation;

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
    /// Where dirty pages come from.
    pub tracking: Tracking,
    /// Compare the kernel's dirty pages with the workload's record every epoch.
    pub check_tracking: bool,
    /// The transport of the networked pass; `None` runs the in-process pass only.
    pub transport: Option<TransportChoice>,
    /// Injected primary failures per mode in the networked pass (at least 1: every
    /// protected round ends with one).
    pub failovers: usize,
    /// Measured epochs per protected round of the networked pass (after its sync);
    /// an unprotected round lasts as long as this many epochs.
    pub net_epochs: usize,
    /// How long the workload runs between two checkpoints in the networked pass.
    pub epoch: Duration,
}

impl BenchConfig {
    /// The name reported for the tracking setting.
    pub fn tracking_name(&self) -> &'static str {
        self.tracking.as_str()
    }
}

/// Which transport implementation the networked pass asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportChoice {
    /// Plain TCP sockets (blocking `writev` and `read`): the std implementation.
    Tcp,
    /// io_uring over TCP.
    Uring,
    /// The std implementation (the same as `tcp`).
    Std,
    /// io_uring when this kernel allows it, std otherwise.
    Auto,
}

impl FromStr for TransportChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "uring" => Ok(Self::Uring),
            "std" => Ok(Self::Std),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown transport {other:?}: use tcp, uring, std or auto (or --local for the in-process pass only)"
            )),
        }
    }
}

impl TransportChoice {
    /// The implementation this choice runs on this host; fails if the host cannot
    /// run it.
    pub fn implementation(self) -> Result<Implementation, BenchError> {
        let chosen = match self {
            Self::Tcp | Self::Std => Implementation::Std,
            Self::Uring => Implementation::Uring,
            Self::Auto => {
                if Implementation::Uring.available().is_ok() {
                    Implementation::Uring
                } else {
                    Implementation::Std
                }
            }
        };
        chosen.available()?;
        Ok(chosen)
    }
}
