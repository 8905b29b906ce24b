//! The primary's replication loop over the network.
//!
//! Per epoch: the protected program runs for one epoch interval, then a checkpoint is
//! taken (the pause), encoded, sent into the backup's receive region, and
//! acknowledged. When the backup refuses an epoch or the link breaks, the epoch (and
//! any later one in flight) is lost and its pages are carried into the next; the
//! program never stops for the backup. A backup that reconnects empty is re-synced
//! from scratch while the program keeps running.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fgbi_engine::{Encoder, EncoderConfig};
use fgbi_hyp::protected::Protected;
use fgbi_transport::{PresharedKey, Primary, Reply, TransportConfig, TransportError};

use crate::checkpoint::Checkpointer;
use crate::local::ReplicationError;

/// What the primary loop does, and where to.
#[derive(Clone, Debug)]
pub struct PrimaryOptions {
    /// Encoder settings (geometry, mode, workers, cache).
    pub encoder: EncoderConfig,
    /// Transport settings; the geometry must equal the encoder's.
    pub transport: TransportConfig,
    /// The backup's address.
    pub backup: SocketAddr,
    /// Time between checkpoints.
    pub epoch: Duration,
    /// Stop after this many committed epochs (`None`: run until failure).
    pub epochs: Option<u64>,
    /// How long to keep trying to reach the backup at start.
    pub connect_timeout: Duration,
    /// Take each checkpoint's digest (for demos and tests; costs a memory pass).
    pub digests: bool,
}

/// One event of the primary loop, for logs and demos.
#[derive(Clone, Copy, Debug)]
pub enum PrimaryEvent {
    /// A checkpoint was taken and sent.
    Sent {
        /// Epoch number.
        epoch: u64,
        /// Type II downtime of this checkpoint.
        pause: Duration,
        /// Encoded bytes.
        bytes: u64,
        /// Digest of the checkpoint, when asked for.
        digest: Option<u128>,
    },
    /// The backup committed every epoch up to this one.
    Committed(u64),
    /// The link to the backup broke: the program runs unprotected until it is back.
    Unprotected,
    /// Connected (or reconnected) to a backup at this committed epoch.
    Connected(u64),
}

fn connect(
    options: &PrimaryOptions,
    key: &PresharedKey,
    deadline: Instant,
) -> Result<Primary, ReplicationError> {
    loop {
        let attempt = TcpStream::connect_timeout(&options.backup, Duration::from_millis(200))
            .map_err(|source| TransportError::Io {
                what: "connecting to the backup",
                source,
            })
            .and_then(|stream| Primary::connect(stream, &options.transport, key));
        match attempt {
            Ok(primary) => return Ok(primary),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Runs the primary loop over `program` until `options.epochs` epochs are committed
/// or an unrecoverable error occurs; `event` sees every step.
pub fn run<P: Protected + ?Sized>(
    program: &mut P,
    mut step: impl FnMut(&mut P) -> Result<(), ReplicationError>,
    options: &PrimaryOptions,
    key: &PresharedKey,
    mut event: impl FnMut(PrimaryEvent),
) -> Result<u64, ReplicationError> {
    let mut encoder = Encoder::new(options.encoder.clone())?;
    let mut checkpointer = Checkpointer::new();
    let mut link = Some(connect(
        options,
        key,
        Instant::now() + options.connect_timeout,
    )?);
    let mut synced = false;
    let mut next = Instant::now();
    loop {
        // (Re)join: reconcile with what the backup holds.
        if let Some(primary) = link.as_ref().filter(|_| !synced) {
            let held = primary.backup_committed();
            if held == 0 && encoder.committed() > 0 {
                // An empty backup: start over with a full copy.
                encoder = Encoder::new(options.encoder.clone())?;
            } else if held > encoder.committed() {
                encoder.acknowledge(held)?;
            }
            encoder.lose_all();
            if encoder.committed() == 0 {
                let all: Vec<u64> = (0..options.encoder.geometry.pages()).collect();
                // Carry every page into the first epoch: the backup holds zeros.
                encoder.carry(&all)?;
            }
            synced = true;
            event(PrimaryEvent::Connected(held));
        }
        next += options.epoch;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        step(program)?;
        let checkpoint = checkpointer.take(program, encoder.carried_pages(), options.digests)?;
        let (pause, digest) = (checkpoint.pause, checkpoint.digest);
        let encoded = encoder.encode(checkpoint.dirty, checkpoint.pages, checkpoint.state)?;
        let (epoch, bytes) = (encoded.stats.epoch, encoded.stats.bytes);
        let Some(primary) = link.as_mut() else {
            encoder.lose(epoch)?;
            link = try_reconnect(options, key);
            synced = false;
            continue;
        };
        let sent = primary.send_epoch(&encoded);
        event(PrimaryEvent::Sent {
            epoch,
            pause,
            bytes,
            digest,
        });
        let reply = sent.and_then(|()| primary.wait_reply(options.transport.liveness.timeout * 4));
        match reply {
            Ok(Reply::Committed(n)) => {
                encoder.acknowledge(n)?;
                event(PrimaryEvent::Committed(n));
                if options.epochs.is_some_and(|limit| n >= limit) {
                    return Ok(n);
                }
            }
            Ok(Reply::Refused { epoch, .. }) => encoder.lose(epoch)?,
            Err(_) => {
                encoder.lose(epoch)?;
                event(PrimaryEvent::Unprotected);
                link = try_reconnect(options, key);
                synced = false;
            }
        }
    }
}

fn try_reconnect(options: &PrimaryOptions, key: &PresharedKey) -> Option<Primary> {
    connect(options, key, Instant::now()).ok()
}
