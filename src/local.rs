//! Replication to a replica in the same process: the whole primary-to-backup path
//! (stop, harvest, copy, resume, encode, validate, apply, acknowledge) without a
//! network. The bench and the example programs use it; tests use it to prove the
//! replica equals the checkpoint after every epoch.

use std::time::{Duration, Instant};

use fgbi_engine::{
    Applier, ApplyError, EncodeError, Encoder, EncoderConfig, EncodingCounts, memory_digest,
};
use fgbi_hyp::memory::{MemoryError, Region};
use fgbi_hyp::protected::{HypError, Protected};
use thiserror::Error;

use crate::checkpoint::Checkpointer;

/// An epoch could not be replicated.
#[derive(Debug, Error)]
pub enum ReplicationError {
    /// The protected program failed to stop, harvest or resume.
    #[error(transparent)]
    Hyp(#[from] HypError),
    /// The encoder refused.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The replica refused an epoch the primary produced.
    #[error("the replica refused an epoch: {0}")]
    Apply(#[from] ApplyError),
    /// The geometry is invalid.
    #[error(transparent)]
    Geometry(#[from] fgbi_engine::GeometryError),
    /// The epoch thread panicked: a bug; the replica is at its last committed epoch.
    #[error(
        "the epoch thread panicked (a bug: please report it); the replica stays at its last committed epoch"
    )]
    EpochThreadPanicked,
    /// A thread could not be started.
    #[error("cannot start the epoch thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] fgbi_transport::TransportError),
    /// The replica's memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The replica could not be kept for, or handed to, a restarted program.
    #[error(transparent)]
    Restart(#[from] crate::restart::RestartError),
    /// The primary died before the backup held a checkpoint: the backup does not
    /// fail over.
    #[error(
        "the primary {peer} fell silent ({cause}) before this backup held a checkpoint of it ({progress}): the replica is not a state the program was ever in, so this backup was never protected and does NOT fail over; start the program and its backup again"
    )]
    NeverProtected {
        /// The primary's address.
        peer: std::net::SocketAddr,
        /// Why the backup decided the primary was dead.
        cause: String,
        /// How far initial sync had come.
        progress: String,
    },
    /// The protected memory is not the size the encoder was configured for.
    #[error("protected memory is {got} bytes but the encoder expects {expected}")]
    Size {
        /// Bytes configured.
        expected: u64,
        /// Bytes protected.
        got: u64,
    },
}

/// What one epoch cost and carried.
#[derive(Clone, Copy, Debug, Default)]
pub struct EpochReport {
    /// Epoch number.
    pub epoch: u64,
    /// Dirty pages encoded.
    pub dirty_pages: u64,
    /// Encoded bytes.
    pub wire_bytes: u64,
    /// Type II downtime: from stop to resume (verification digests excluded).
    pub pause: Duration,
    /// Time to encode.
    pub encode: Duration,
    /// Time to validate and apply.
    pub apply: Duration,
    /// Whether the replica equalled the checkpoint (when verification was asked for).
    pub verified: Option<bool>,
    /// What the encoder chose.
    pub counts: EncodingCounts,
}

/// A primary's encoder and an in-process backup's replica.
pub struct LocalReplication {
    encoder: Encoder,
    applier: Applier,
    replica: Region,
    checkpointer: Checkpointer,
    wire: Vec<u8>,
}

impl LocalReplication {
    /// A replica of all-zero memory at epoch 0, for the geometry in `config`.
    pub fn new(config: EncoderConfig) -> Result<Self, ReplicationError> {
        let geometry = config.geometry;
        let mem = usize::try_from(geometry.mem_bytes()).map_err(|_| ReplicationError::Size {
            expected: geometry.mem_bytes(),
            got: 0,
        })?;
        Ok(Self {
            encoder: Encoder::new(config)?,
            applier: Applier::new(geometry),
            replica: Region::new(mem)?,
            checkpointer: Checkpointer::new(),
            wire: Vec::new(),
        })
    }

    /// The encoder (for its overhead and configuration).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The replica's memory, at the last committed epoch.
    pub fn replica(&self) -> &[u8] {
        &self.replica
    }

    /// The replica's committed state blob.
    pub fn state(&self) -> &[u8] {
        self.applier.state()
    }

    /// What backs the replica's memory.
    pub fn backing(&self) -> fgbi_hyp::memory::Backing {
        self.replica.backing()
    }

    /// Takes one checkpoint of `program` and replicates it. With `verify`, the
    /// checkpoint's digest is taken while the program is stopped (not counted in
    /// the pause) and compared with the replica's after the apply.
    pub fn checkpoint<P: Protected + ?Sized>(
        &mut self,
        program: &mut P,
        verify: bool,
    ) -> Result<EpochReport, ReplicationError> {
        let expected = self.encoder.config().geometry.mem_bytes();
        if program.mem_bytes() != expected {
            return Err(ReplicationError::Size {
                expected,
                got: program.mem_bytes(),
            });
        }
        let checkpoint = self
            .checkpointer
            .take(program, self.encoder.carried_pages(), verify)?;
        let (pause, digest) = (checkpoint.pause, checkpoint.digest);
        let started = Instant::now();
        let encoded = self
            .encoder
            .encode(checkpoint.dirty, checkpoint.pages, checkpoint.state)?;
        let encode = started.elapsed();
        let stats = encoded.stats;
        self.wire.clear();
        for part in encoded.parts() {
            self.wire.extend_from_slice(part);
        }
        let started = Instant::now();
        let applied = self.applier.apply(&mut self.replica, &self.wire);
        let apply = started.elapsed();
        if let Err(e) = applied {
            self.encoder.lose(stats.epoch)?;
            return Err(e.into());
        }
        self.encoder.acknowledge(stats.epoch)?;
        let verified = digest.map(|d| d == memory_digest(&self.replica));
        Ok(EpochReport {
            epoch: stats.epoch,
            dirty_pages: stats.dirty_pages,
            wire_bytes: stats.bytes,
            pause,
            encode,
            apply,
            verified,
            counts: stats.counts,
        })
    }
}
