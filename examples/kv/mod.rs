//! A key-value service whose store lives in protected memory and which speaks enough
//! of the Redis protocol (RESP2) for `redis-cli` and `redis-benchmark`: the `kv`
//! example, also built into the `fgbi` binary as the hidden `fgbi kv` (what
//! `fgbi demo` runs, so the demo needs nothing but `fgbi`). docs/operating.md
//! describes it; [`service`] holds its command line.

pub mod commands;
pub mod memory;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;

pub use service::{Args, run};
