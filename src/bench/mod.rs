//! `fgbi bench`: every mode over the same deterministic workload, side by side.
//!
//! For each workload and mode: populate memory and sync it (not counted), then run
//! `epochs` epochs of writes; each epoch is encoded, applied to a separate replica,
//! acknowledged, and the replica's digest compared with the primary's.
//!
//! A workload named `trace:PATH` replays the trace recorded at PATH (`fgbi record`)
//! over memory of the trace's size; `mem_bytes` applies to the synthetic workloads.
//!
//! [`config`] holds what a run covers, [`source`] where its writes come from,
//! [`local_pass`] the in-process codec pass, [`result`] what a run reports and
//! [`run`] the driver over every workload and mode.

pub mod config;
pub mod error;
pub mod local_pass;
pub mod result;
pub mod run;
pub mod source;

pub use config::{BenchConfig, TRACE_PREFIX};
pub use error::BenchError;
pub use result::RunResult;
pub use run::run;

/// Kept here for code that named it `fgbi::bench::Percentiles` before it moved.
pub use crate::percentiles::Percentiles;
