//! The backup's loop over the network, and failover.
//!
//! The backup accepts the primary, receives each epoch into its receive region,
//! validates and applies it to a warm replica (mapped, populated; an anonymous
//! [`fgbi_hyp::memory::Region`] on huge pages, or a memory file that can be handed to
//! a restarted program, [`crate::restart::SharedMemory`]), and acknowledges it. When
//! the primary falls silent or the connection drops, it fails over: the replica at
//! the last committed epoch and that epoch's state blob become the protected
//! program, which starts running at once. Type I downtime is reported in parts.

use std::net::TcpListener;
use std::ops::DerefMut;
use std::time::{Duration, Instant, SystemTime};

use fgbi_engine::{Applier, EncoderConfig, memory_digest};
use fgbi_transport::{
    Backup, PresharedKey, ReceiveRegion, Served, TransportConfig, TransportError,
};

use crate::local::ReplicationError;

/// What the backup does.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// The primary's encoder settings, to size the receive slots.
    pub encoder: EncoderConfig,
    /// Transport settings; the geometry must equal the encoder's.
    pub transport: TransportConfig,
    /// Receive slots (epochs that may be in flight).
    pub slots: usize,
    /// Largest state blob accepted, bytes.
    pub max_state: usize,
    /// Take the replica's digest at failover, for comparison with the primary's
    /// checkpoint (a pass over memory, between finishing and restoring, counted in
    /// no part of type I downtime).
    pub digest: bool,
}

/// What happened when the primary died.
#[derive(Clone, Debug)]
pub struct FailoverReport {
    /// Why the backup decided the primary was dead.
    pub cause: String,
    /// The epoch the replica was at.
    pub epoch: u64,
    /// Digest of the replica at that epoch, when asked for.
    pub digest: Option<u128>,
    /// Wall-clock time of detection (for comparing with the failure's).
    pub detected_at: SystemTime,
    /// From the last sign of life of the primary to detection.
    pub silence: Duration,
    /// Finishing the last epoch: the replica is only ever changed by whole epochs, so
    /// this is the time to abandon the connection.
    pub finish: Duration,
    /// Rebuilding the protected program from the replica and state blob.
    pub restore: Duration,
    /// From the end of the restore until the program's first step completed.
    pub first_run: Duration,
}

/// Serves one primary until it dies, then fails over: `restore` turns the replica
/// (all-zero `replica` memory of the geometry's size, updated epoch by epoch) and the
/// last committed state blob into the protected program, `first_run` runs its first
/// step. Returns the report and the program.
pub fn run<M, T, E, F>(
    listener: &TcpListener,
    options: &BackupOptions,
    key: &PresharedKey,
    mut replica: M,
    restore: impl FnOnce(M, &[u8], u64) -> Result<T, E>,
    first_run: impl FnOnce(&mut T) -> Result<(), F>,
    mut committed: impl FnMut(u64),
) -> Result<(FailoverReport, T), ReplicationError>
where
    M: DerefMut<Target = [u8]>,
    E: Into<ReplicationError>,
    F: Into<ReplicationError>,
{
    let geometry = options.encoder.geometry;
    if replica.len() as u64 != geometry.mem_bytes() {
        return Err(ReplicationError::Size {
            expected: geometry.mem_bytes(),
            got: replica.len() as u64,
        });
    }
    let mut applier = Applier::new(geometry);
    let pages = usize::try_from(geometry.pages()).unwrap_or(usize::MAX);
    let mut region =
        ReceiveRegion::for_epochs(&options.encoder, pages, options.max_state, options.slots)?;
    let (stream, _) = listener.accept().map_err(|source| TransportError::Io {
        what: "accepting the primary",
        source,
    })?;
    let mut backup = Backup::accept(
        stream,
        &mut region,
        &options.transport,
        key,
        applier.committed(),
    )?;
    let mut last_heard = Instant::now();
    let failure = loop {
        match backup.serve_one(&mut applier, &mut replica) {
            Ok(Served::Committed(applied)) => {
                last_heard = Instant::now();
                committed(applied.epoch);
            }
            Ok(Served::Refused { .. }) => last_heard = Instant::now(),
            Ok(Served::Scrubbed {
                epoch, mismatched, ..
            }) => {
                last_heard = Instant::now();
                if !mismatched.is_empty() {
                    eprintln!(
                        "fgbi: ERROR: the replica at epoch {epoch} differs from the primary's checkpoint in {} chunks of {} bytes (first at byte {}); the primary sends them again",
                        mismatched.len(),
                        fgbi_transport::SCRUB_CHUNK_BYTES,
                        mismatched[0] * fgbi_transport::SCRUB_CHUNK_BYTES as u64,
                    );
                }
            }
            Err(e) => break e,
        }
    };
    let detected = Instant::now();
    let detected_at = SystemTime::now();
    let silence = detected - last_heard;
    drop(backup);
    let finish = detected.elapsed();
    let epoch = applier.committed();
    let digest = options.digest.then(|| memory_digest(&replica));
    let started = Instant::now();
    let mut program = restore(replica, applier.state(), epoch).map_err(Into::into)?;
    let restore_time = started.elapsed();
    let started = Instant::now();
    first_run(&mut program).map_err(Into::into)?;
    let first_run_time = started.elapsed();
    Ok((
        FailoverReport {
            cause: failure.to_string(),
            epoch,
            digest,
            detected_at,
            silence,
            finish,
            restore: restore_time,
            first_run: first_run_time,
        },
        program,
    ))
}
