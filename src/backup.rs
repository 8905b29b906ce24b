//! The backup's loop over the network, and failover.
//!
//! The backup accepts the primary, receives each epoch into its receive region,
//! validates and applies it to a warm replica (mapped, populated; an anonymous
//! [`fgbi_hyp::memory::Region`] on huge pages, or a memory file that can be handed to
//! a restarted program, [`crate::restart::SharedMemory`]), and acknowledges it. When
//! the primary falls silent or the connection drops, it fails over: the replica at
//! the last committed epoch and that epoch's state blob become the protected
//! program, which starts running at once. Type I downtime is reported in parts.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::DerefMut;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fgbi_engine::{Applier, EncoderConfig, memory_digest};
use fgbi_transport::{
    Backup, PresharedKey, ReceiveRegion, Served, TransportConfig, TransportError,
};

use crate::fence::Fence;
use crate::local::ReplicationError;
use crate::metrics::Metrics;

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
    /// How to fence the primary before failing over (none by default: a warning).
    pub fence: Fence,
    /// Where to count what the backup does, for `--metrics`.
    pub metrics: Option<Arc<Metrics>>,
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
    /// Running the fence command that succeeded (zero without one).
    pub fence: Duration,
    /// Rebuilding the protected program from the replica and state blob.
    pub restore: Duration,
    /// From the end of the restore until the program's first step completed.
    pub first_run: Duration,
}

/// Serves one primary until it dies, then fences it with `options.fence` and fails
/// over, if its replica holds a checkpoint: a primary that dies before (during
/// initial sync, whose pre-copy epochs leave no checkpoint) is reported as
/// [`ReplicationError::NeverProtected`] and nothing is started. If the fence fails the backup does not fail over: it says so on stderr,
/// waits for the primary to reconnect (and serves it on with the replica it holds),
/// and fences again after each `options.fence.retry` without one. `restore` turns the replica
/// (all-zero `replica` memory of the geometry's size, updated epoch by epoch) and the
/// last committed state blob into the protected program, `first_run` runs its first
/// step; `committed` is told of every checkpoint epoch committed (not of initial
/// sync's pre-copy epochs). A connection whose peer fails the handshake is refused
/// (with a line on stderr) and the backup goes on waiting, replica untouched.
/// Returns the report and the program.
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
    // A primary that fell silent while the fence failed, and when to fence again:
    // refused connections meanwhile do not put that off.
    let mut unfenced: Option<(Silence, Instant)> = None;
    let (silence, fence_time) = loop {
        let accepted = match &unfenced {
            None => Some(listener.accept()),
            // Due: fence again before taking another caller, however many wait.
            Some((_, again)) => match again.saturating_duration_since(Instant::now()) {
                left if left.is_zero() => None,
                left => accept_within(listener, left),
            },
        };
        let silence = match (accepted, unfenced.take()) {
            (Some(accepted), waiting) => {
                let (stream, peer) = accepted.map_err(|source| TransportError::Io {
                    what: "accepting the primary",
                    source,
                })?;
                let backup = match Backup::accept(
                    stream,
                    &mut region,
                    &options.transport,
                    key,
                    applier.committed(),
                ) {
                    Ok(backup) => backup,
                    // A peer that fails the handshake (another key, memory size or
                    // protocol, a port scanner, a hang-up) wrote nothing into the
                    // replica: refuse it and go on waiting for the primary. Other
                    // errors are this host's (setting up io_uring or RDMA) and end
                    // the backup, saying why.
                    Err(e @ TransportError::Handshake(_)) => {
                        eprintln!("fgbi: refused a connection from {peer}: {e}");
                        unfenced = waiting;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let metrics = options.metrics.as_deref();
                serve(
                    backup,
                    peer,
                    &mut applier,
                    &mut replica,
                    &mut committed,
                    metrics,
                )
            }
            (None, Some((silence, _))) => silence,
            (None, None) => continue,
        };
        if !applier.holds_checkpoint() {
            let progress = match applier.committed() {
                0 => "it had received no epoch".to_string(),
                n => format!("initial sync had reached pre-copy epoch {n}"),
            };
            return Err(ReplicationError::NeverProtected {
                peer: silence.peer,
                cause: silence.failure.to_string(),
                progress,
            });
        }
        let started = Instant::now();
        let peer = silence.peer;
        match options.fence.run(Some(peer), applier.committed()) {
            Ok(true) => {
                eprintln!("fgbi: fenced the primary {peer}: failing over");
                break (silence, started.elapsed());
            }
            Ok(false) => {
                if !options.fence.primary_known_dead {
                    eprintln!("fgbi: {}", crate::fence::UNFENCED_WARNING);
                }
                break (silence, started.elapsed());
            }
            Err(e) => {
                eprintln!(
                    "fgbi: ERROR: the primary {peer} fell silent ({}) but {e}; NOT failing over: waiting for the primary to come back, fencing again in {:?}",
                    silence.failure, options.fence.retry
                );
                unfenced = Some((silence, Instant::now() + options.fence.retry));
            }
        }
    };
    if let Some(m) = &options.metrics {
        m.failed_over();
    }
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
            cause: silence.failure.to_string(),
            epoch,
            digest,
            detected_at: silence.detected_at,
            silence: silence.detected - silence.last_heard,
            finish: silence.finish,
            fence: fence_time,
            restore: restore_time,
            first_run: first_run_time,
        },
        program,
    ))
}

/// How a primary's connection ended.
struct Silence {
    failure: TransportError,
    peer: SocketAddr,
    last_heard: Instant,
    detected: Instant,
    detected_at: SystemTime,
    finish: Duration,
}

/// Serves the connection of the primary at `peer` until it fails.
fn serve(
    mut backup: Backup<'_>,
    peer: SocketAddr,
    applier: &mut Applier,
    replica: &mut [u8],
    committed: &mut impl FnMut(u64),
    metrics: Option<&Metrics>,
) -> Silence {
    let mut last_heard = Instant::now();
    if let Some(m) = metrics {
        m.set_protected(applier.holds_checkpoint());
    }
    let failure = loop {
        match backup.serve_one(applier, replica) {
            Ok(Served::Committed(applied)) => {
                last_heard = Instant::now();
                if let Some(m) = metrics {
                    m.committed(applied.epoch, applied.bytes);
                    // Initial sync: no checkpoint to fail over to yet.
                    m.set_protected(applier.holds_checkpoint());
                }
                if applier.holds_checkpoint() {
                    committed(applied.epoch);
                }
            }
            Ok(Served::Refused { .. }) => last_heard = Instant::now(),
            Ok(Served::Scrubbed {
                epoch, mismatched, ..
            }) => {
                last_heard = Instant::now();
                if let Some(m) = metrics {
                    m.scrubbed(mismatched.len() as u64);
                }
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
    drop(backup);
    if let Some(m) = metrics {
        m.set_protected(false);
    }
    Silence {
        failure,
        peer,
        last_heard,
        detected,
        detected_at,
        finish: detected.elapsed(),
    }
}

/// Waits up to `timeout` for a primary to connect.
fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
    let deadline = Instant::now() + timeout;
    if let Err(e) = listener.set_nonblocking(true) {
        return Some(Err(e));
    }
    let accepted = loop {
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            accepted => break Some(accepted),
        }
    };
    let restored = listener.set_nonblocking(false);
    match (accepted, restored) {
        (Some(Ok((stream, peer))), Ok(())) => {
            Some(stream.set_nonblocking(false).map(|()| (stream, peer)))
        }
        (Some(Err(e)), _) | (_, Err(e)) => Some(Err(e)),
        (None, Ok(())) => None,
    }
}
