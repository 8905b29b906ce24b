//! The one place the bench calls the replication loops ([`crate::primary::run`] and
//! [`crate::backup::run`]): a change of their signatures is fixed here, and the rest
//! of the bench sees only [`LinkEvent`] and [`Takeover`].

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use fgbi_engine::EncoderConfig;
use fgbi_hyp::memory::{HUGE_PAGE, Region};
use fgbi_hyp::protected::{HypError, Protected};
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_hyp::workload::Workload;
use fgbi_transport::{Implementation, Liveness, PresharedKey, TransportConfig, TransportError};

use super::error::BenchError;
use crate::backup::{self, BackupOptions};
use crate::fence::Fence;
use crate::local::ReplicationError;
use crate::primary::{self, PrimaryEvent, PrimaryOptions};

/// Receive slots of the backup (epochs in flight), as `fgbi backup` uses.
const SLOTS: usize = 2;
/// Silence after which either end declares the other dead.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest state blob the backup accepts.
const MAX_STATE: usize = 64 << 10;

/// Builds a restored program's workload from the name in its state blob and the
/// memory size.
pub type WorkloadFactory =
    Box<dyn FnOnce(&str, usize) -> Result<Box<dyn Workload>, HypError> + Send>;

/// What the primary loop reports to the bench.
#[derive(Clone, Copy, Debug)]
pub enum LinkEvent {
    /// Checkpoint `epoch` was taken and sent.
    Sent {
        /// Epoch number (1 is the session's initial sync).
        epoch: u64,
        /// Type II downtime of this checkpoint.
        pause: Duration,
        /// Encoded bytes.
        bytes: u64,
    },
    /// The backup committed every epoch up to this one.
    Committed(u64),
}

/// What the backup did when the primary died.
pub struct Takeover {
    /// The epoch its replica held.
    pub epoch: u64,
    /// The replica's digest at that epoch.
    pub digest: Option<u128>,
    /// When it declared the primary dead.
    pub detected_at: SystemTime,
    /// Abandoning the connection (the replica only changes by whole epochs).
    pub finish: Duration,
    /// Rebuilding the program from the replica and the state blob.
    pub restore: Duration,
    /// The restored program's first step.
    pub first_run: Duration,
    /// The restored program, running on the backup.
    pub program: SyntheticMachine,
}

/// Settings shared by both ends of one mode's sessions, and the key they share.
pub struct Link {
    encoder: EncoderConfig,
    transport: TransportConfig,
    tracking: Tracking,
    dir: PathBuf,
    key: PathBuf,
}

impl Link {
    /// Both ends for `encoder`'s geometry over `implementation`, with a fresh random
    /// key in a private temporary directory.
    pub fn new(
        encoder: EncoderConfig,
        implementation: Implementation,
        tracking: Tracking,
    ) -> Result<Self, BenchError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fgbi-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |what: String| move |source| BenchError::Io { what, source };
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        let key = dir.join("link.key");
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .map_err(io("cannot read /dev/urandom".into()))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .and_then(|mut f| f.write_all(&bytes))
            .map_err(io(format!("cannot write {}", key.display())))?;
        let mut transport = TransportConfig::new(encoder.geometry, implementation);
        // Two cores shared by the workload, both loops and the transport can leave a
        // thread unscheduled for longer than the default 100 ms: a generous timeout
        // keeps a loaded machine from ending a session early. The injected failure
        // closes the primary's connection, which the backup sees at once whatever
        // the timeout.
        transport.liveness = Liveness {
            interval: Duration::from_millis(25),
            timeout: LIVENESS_TIMEOUT,
        };
        // The backup maps and populates its replica and receive ring (three times
        // the protected memory) before it answers the primary's handshake.
        transport.handshake_timeout = Duration::from_secs(30);
        Ok(Self {
            encoder,
            transport,
            tracking,
            dir,
            key,
        })
    }

    /// The implementation's name, for reports.
    pub fn implementation(&self) -> &'static str {
        self.transport.implementation.as_str()
    }

    /// Bytes of the backup's receive ring.
    pub fn receive_ring_bytes(&self) -> usize {
        let pages = usize::try_from(self.encoder.geometry.pages()).unwrap_or(usize::MAX);
        let slot = self
            .encoder
            .max_epoch_bytes(pages, MAX_STATE)
            .next_multiple_of(fgbi_engine::PAGE_SIZE);
        (SLOTS * slot).next_multiple_of(HUGE_PAGE)
    }

    fn key(&self) -> Result<PresharedKey, BenchError> {
        PresharedKey::from_file(&self.key).map_err(|e| BenchError::Setting(e.to_string()))
    }

    /// Starts a backup loop on its own thread, serving one primary on `listener`
    /// until it dies, then restoring the program with `workload`.
    pub fn spawn_backup(
        &self,
        listener: TcpListener,
        workload: WorkloadFactory,
    ) -> Result<JoinHandle<Result<Takeover, BenchError>>, BenchError> {
        let options = BackupOptions {
            encoder: self.encoder.clone(),
            transport: self.transport.clone(),
            slots: SLOTS,
            max_state: MAX_STATE,
            digest: true,
            // The bench crashes its own primary: it is known dead, nothing to fence.
            fence: Fence {
                in_process_primary: true,
                ..Fence::default()
            },
            metrics: None,
        };
        let key = self.key()?;
        let tracking = self.tracking;
        let mem = usize::try_from(self.encoder.geometry.mem_bytes())
            .map_err(|_| BenchError::Setting("the memory size exceeds the address space".into()))?;
        std::thread::Builder::new()
            .name("fgbi-bench-backup".into())
            .spawn(move || {
                let replica = Region::new(mem).map_err(HypError::from)?;
                let (report, program) = backup::run(
                    &listener,
                    &options,
                    &key,
                    replica,
                    |replica, state, _| {
                        SyntheticMachine::restore_with(replica, state, tracking, workload)
                    },
                    |program: &mut SyntheticMachine| program.run(),
                    |_| {},
                )?;
                Ok(Takeover {
                    epoch: report.epoch,
                    digest: report.digest,
                    detected_at: report.detected_at,
                    finish: report.finish,
                    restore: report.restore,
                    first_run: report.first_run,
                    program,
                })
            })
            .map_err(|source| BenchError::Io {
                what: "cannot start the backup thread".into(),
                source,
            })
    }

    /// Runs the primary loop over `program` until the backup has committed `epochs`
    /// epochs, then returns: the primary's link closes as a crashed primary's would.
    /// `step` runs the program between checkpoints (the loop itself does not wait).
    pub fn primary<P: Protected + ?Sized>(
        &self,
        program: &mut P,
        step: impl FnMut(&mut P) -> Result<(), HypError>,
        backup: SocketAddr,
        epochs: u64,
        mut event: impl FnMut(LinkEvent),
    ) -> Result<u64, BenchError> {
        let options = PrimaryOptions {
            encoder: self.encoder.clone(),
            transport: self.transport.clone(),
            backup,
            // The step closure paces the program; the loop never sleeps.
            epoch: Duration::from_nanos(1),
            epochs: Some(epochs),
            connect_timeout: Duration::from_secs(10),
            // The last checkpoint is compared after the loop returns, outside any
            // measured time.
            digests: false,
            // Every failover compares the whole replica; pauses stay comparable.
            scrub_every: 0,
            // The session's sync is its first checkpoint (epoch 1), not measured.
            pre_copy: false,
        };
        let mut step = step;
        let key = self.key()?;
        // The bench's backup never goes away before the primary does: a lost link
        // ends the session with an error instead of waiting to reconnect.
        let lost = std::cell::Cell::new(false);
        Ok(primary::run(
            program,
            |p| {
                if lost.get() {
                    return Err(TransportError::PeerClosed(" (the bench's backup)").into());
                }
                step(p).map_err(ReplicationError::from)
            },
            &options,
            &key,
            |e| match e {
                PrimaryEvent::Sent {
                    epoch,
                    pause,
                    bytes,
                    ..
                } => event(LinkEvent::Sent {
                    epoch,
                    pause,
                    bytes,
                }),
                PrimaryEvent::Committed { epoch, .. } => event(LinkEvent::Committed(epoch)),
                PrimaryEvent::Unprotected { .. } => lost.set(true),
                PrimaryEvent::Connected(_)
                | PrimaryEvent::Synced { .. }
                | PrimaryEvent::Scrubbed { .. } => {}
            },
        )?)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
