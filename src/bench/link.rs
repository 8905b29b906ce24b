//! What both ends of the networked pass agree on ([`LinkSpec`]), and the primary's
//! end: the one place the bench calls [`crate::primary::run`]. The backup's end runs
//! in a process of its own ([`super::backup_process`]), built from the same spec.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fgbi_engine::{EncoderConfig, Geometry, Mode};
use fgbi_hyp::memory::HUGE_PAGE;
use fgbi_hyp::protected::{HypError, Protected};
use fgbi_hyp::synthetic::Tracking;
use fgbi_transport::{
    Implementation, Liveness, PresharedKey, RdmaConfig, TransportConfig, TransportError,
};
use serde::{Deserialize, Serialize};

use super::backup_process::BackupProcess;
use super::config::NetworkSetting;
use super::error::BenchError;
use crate::local::ReplicationError;
use crate::primary::{self, PrimaryEvent, PrimaryOptions};

/// Receive slots of the backup (epochs in flight), as `fgbi backup` uses.
pub const SLOTS: usize = 2;
/// Silence after which either end declares the other dead.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);
/// Heartbeat interval of both ends.
const HEARTBEAT: Duration = Duration::from_millis(25);
/// How long the backup may take to answer the handshake: it maps and populates its
/// replica and receive ring (three times the protected memory) first.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest state blob the backup accepts.
pub const MAX_STATE: usize = 64 << 10;

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

/// Everything both ends of one mode's sessions must agree on. The bench builds its
/// primary from it and hands it, as JSON, to the backup process it starts: the two
/// ends cannot drift apart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkSpec {
    /// The workload's name (`trace:PATH` for a recorded trace): what the backup
    /// rebuilds the program with.
    pub workload: String,
    /// Protected memory, bytes.
    pub mem_bytes: u64,
    /// Block size, bytes.
    pub block_size: usize,
    /// Encoding mode's name.
    pub mode: String,
    /// Encoder workers.
    pub workers: usize,
    /// Pin encoder workers.
    pub pin_workers: bool,
    /// Page cache budget, bytes.
    pub cache_bytes: usize,
    /// Upper bound of a pages frame's body, bytes.
    pub chunk_bytes: usize,
    /// fgbi: share identical blocks.
    pub sharing: bool,
    /// fgbi: consider lz4.
    pub compression: bool,
    /// Transport implementation's name (`std`, `io_uring`, `rdma`).
    pub implementation: String,
    /// RDMA device, port and GID index.
    pub rdma_device: Option<String>,
    /// RDMA port.
    pub rdma_port: u8,
    /// RDMA GID index.
    pub rdma_gid_index: Option<u8>,
    /// Where the restored program's dirty pages come from (`kernel`, `cow`,
    /// `generator`).
    pub tracking: String,
    /// The pre-shared key file.
    pub key: PathBuf,
}

impl LinkSpec {
    fn new(
        workload: &str,
        encoder: &EncoderConfig,
        network: &NetworkSetting,
        tracking: Tracking,
        key: PathBuf,
    ) -> Self {
        Self {
            workload: workload.to_string(),
            mem_bytes: encoder.geometry.mem_bytes(),
            block_size: encoder.geometry.block_size(),
            mode: encoder.mode.to_string(),
            workers: encoder.workers,
            pin_workers: encoder.pin_workers,
            cache_bytes: encoder.cache_bytes,
            chunk_bytes: encoder.chunk_bytes,
            sharing: encoder.sharing,
            compression: encoder.compression,
            implementation: network.implementation.as_str().to_string(),
            rdma_device: network.rdma.device.clone(),
            rdma_port: network.rdma.port,
            rdma_gid_index: network.rdma.gid_index,
            tracking: tracking.as_str().to_string(),
            key,
        }
    }

    /// The encoder settings of both ends.
    pub fn encoder(&self) -> Result<EncoderConfig, BenchError> {
        let mode = Mode::from_str(&self.mode).map_err(BenchError::Setting)?;
        let mut encoder = EncoderConfig::new(Geometry::new(self.mem_bytes, self.block_size)?, mode);
        encoder.workers = self.workers;
        encoder.pin_workers = self.pin_workers;
        encoder.cache_bytes = self.cache_bytes;
        encoder.chunk_bytes = self.chunk_bytes;
        encoder.sharing = self.sharing;
        encoder.compression = self.compression;
        Ok(encoder)
    }

    /// The transport settings of both ends.
    pub fn transport(&self) -> Result<TransportConfig, BenchError> {
        let implementation = Implementation::ALL
            .into_iter()
            .find(|i| i.as_str() == self.implementation)
            .ok_or_else(|| {
                BenchError::Setting(format!("unknown transport {:?}", self.implementation))
            })?;
        let mut transport = TransportConfig::new(
            Geometry::new(self.mem_bytes, self.block_size)?,
            implementation,
        );
        transport.rdma = RdmaConfig {
            device: self.rdma_device.clone(),
            port: self.rdma_port,
            gid_index: self.rdma_gid_index,
        };
        // Two cores shared by the workload, both loops and the transport can leave a
        // thread unscheduled for longer than the default 100 ms: a generous timeout
        // keeps a loaded machine from ending a session early. The injected failure
        // closes the primary's connection, which the backup sees at once whatever
        // the timeout.
        transport.liveness = Liveness {
            interval: HEARTBEAT,
            timeout: LIVENESS_TIMEOUT,
        };
        transport.handshake_timeout = HANDSHAKE_TIMEOUT;
        Ok(transport)
    }

    /// Where the restored program's dirty pages come from.
    pub fn tracking(&self) -> Result<Tracking, BenchError> {
        Tracking::from_str(&self.tracking).map_err(BenchError::Setting)
    }

    /// The shared key.
    pub fn key(&self) -> Result<PresharedKey, BenchError> {
        PresharedKey::from_file(&self.key).map_err(|e| BenchError::Setting(e.to_string()))
    }

    /// Bytes of the backup's receive ring.
    pub fn receive_ring_bytes(&self) -> Result<usize, BenchError> {
        let encoder = self.encoder()?;
        let pages = usize::try_from(encoder.geometry.pages()).unwrap_or(usize::MAX);
        let slot = encoder
            .max_epoch_bytes(pages, MAX_STATE)
            .next_multiple_of(fgbi_engine::PAGE_SIZE);
        Ok((SLOTS * slot).next_multiple_of(HUGE_PAGE))
    }
}

/// The primary's end of one mode's sessions, the spec its backups get, and the
/// private directory holding their key.
pub struct Link {
    spec: LinkSpec,
    encoder: EncoderConfig,
    transport: TransportConfig,
    program: PathBuf,
    dir: PathBuf,
}

impl Link {
    /// Both ends for `encoder`'s geometry over `network`, restoring `workload` with
    /// `tracking` on failover, with a fresh random key in a private temporary
    /// directory.
    pub fn new(
        workload: &str,
        encoder: &EncoderConfig,
        network: &NetworkSetting,
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
        let spec = LinkSpec::new(workload, encoder, network, tracking, key);
        Ok(Self {
            encoder: spec.encoder()?,
            transport: spec.transport()?,
            spec,
            program: network.program.clone(),
            dir,
        })
    }

    /// The implementation's name, for reports.
    pub fn implementation(&self) -> &'static str {
        self.transport.implementation.as_str()
    }

    /// Bytes of the backup's receive ring.
    pub fn receive_ring_bytes(&self) -> Result<usize, BenchError> {
        self.spec.receive_ring_bytes()
    }

    /// Starts a backup process serving one primary until it dies, then restoring
    /// the program.
    pub fn spawn_backup(&self) -> Result<BackupProcess, BenchError> {
        BackupProcess::spawn(&self.program, &self.spec)
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
        let key = self.spec.key()?;
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
