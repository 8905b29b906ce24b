//! `fgbi bench`: every mode over the same deterministic workload, side by side.
//!
//! For each workload and mode, two passes. The in-process pass ([`local_pass`]):
//! populate memory and sync it (not counted), then run `epochs` epochs of writes;
//! each epoch is encoded, applied to a separate replica, acknowledged, and the
//! replica's digest compared with the primary's. The networked pass ([`network`],
//! unless the config asks for the in-process pass only): the same workload under
//! the primary loop ([`link`]), replicated over a real transport to a backup in a
//! process of its own ([`backup_process`]), failed over several times, its
//! throughput compared with and without protection.
//!
//! A workload named `trace:PATH` replays the trace recorded at PATH (`fgbi record`)
//! over memory of the trace's size; `mem_bytes` applies to the synthetic workloads.
//! The real programs (the key-value service, the heat solver) are run by the `fgbi`
//! command, which builds them in; they report a [`ProgramResult`].
//!
//! [`config`] holds what a run covers, [`source`] where its writes come from,
//! [`result`] what a run reports, [`run`] the driver over every workload and mode,
//! [`memcpy`] the machine's copy bandwidth, [`cpu`] CPU time, and [`report`] the
//! files written from the results.

pub mod backup_process;
pub mod config;
pub mod cpu;
pub mod error;
pub mod link;
pub mod local_pass;
pub mod memcpy;
pub mod network;
pub mod report;
pub mod result;
pub mod run;
pub mod source;

pub use config::{BenchConfig, NetworkSetting, TRACE_PREFIX};
pub use error::BenchError;
pub use result::{FailoverMs, ProgramResult, RunResult, Throughput, TrackingFigures};
pub use run::run;

/// Kept here for code that named it `fgbi::bench::Percentiles` before it moved.
pub use crate::percentiles::Percentiles;
