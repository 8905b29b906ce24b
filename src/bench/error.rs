//! Why a bench run failed.

use fgbi_engine::{EncodeError, GeometryError};
use fgbi_hyp::memory::MemoryError;
use fgbi_hyp::protected::HypError;
use fgbi_hyp::trace::TraceError;
use fgbi_hyp::workload::WorkloadError;
use thiserror::Error;

use crate::local::ReplicationError;

/// A bench run failed.
#[derive(Debug, Error)]
pub enum BenchError {
    /// Bad geometry.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    /// Bad workload.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The encoder refused.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Replication failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// Memory could not be mapped.
    #[error(transparent)]
    Region(#[from] MemoryError),
    /// The protected workload failed.
    #[error(transparent)]
    Hyp(#[from] HypError),
    /// A recorded trace could not be read.
    #[error("{path}: {source}")]
    Trace {
        /// The trace's path.
        path: String,
        /// Why.
        #[source]
        source: TraceError,
    },
    /// The transport failed or is not available here.
    #[error(transparent)]
    Transport(#[from] fgbi_transport::TransportError),
    /// A local resource (socket, key file) could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The networked pass's backup process failed, or said something unexpected.
    #[error("the backup process: {0}")]
    Backup(String),
    /// A setting is out of range.
    #[error("{0}")]
    Setting(String),
    /// Memory size does not fit this machine's address space.
    #[error("memory size {0} does not fit in this machine's address space")]
    Memory(u64),
}
