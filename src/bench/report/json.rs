//! The JSON document: `{"schema": 3, "memcpy_gbps": ..., "runs": [...],
//! "programs": [...]}`, one run per workload and mode with every field of
//! [`RunResult`], one per program and mode with every field of [`ProgramResult`]
//! (docs/bench.md).

use serde_json::{Value, json};

use crate::bench::result::{ProgramResult, RunResult};

/// The version of the document's layout; raised when a field changes meaning or
/// goes away (schema 1 had no networked pass).
pub const SCHEMA: u64 = 3;

/// The document for `results` and `programs`.
pub fn document(results: &[RunResult], programs: &[ProgramResult]) -> Value {
    json!({
        "schema": SCHEMA,
        "memcpy_gbps": results.first().map(|r| r.memcpy_gbps),
        "runs": results,
        "programs": programs,
    })
}
