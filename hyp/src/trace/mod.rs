//! Recorded workloads: the memory of a real running program, epoch by epoch.
//!
//! [`record::Recorder`] stops a process once per epoch and keeps the pages of its
//! writable memory that changed; [`format`] writes and reads them as a trace file
//! (docs/trace-format.md); [`replay::TraceReplay`] replays a trace as a
//! [`Workload`](crate::workload::Workload), so every mode can be measured on it.

pub mod format;
pub mod record;
pub mod replay;
mod sys;

pub use format::{Epoch, Header, Trace, TraceError, TraceWriter};
pub use record::{Capture, RecordError, Recorder};
pub use replay::TraceReplay;
