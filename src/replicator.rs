//! Continuous protection of an application's own memory, replicated in-process.
//!
//! [`Replicator::start`] protects the regions an application asks for and starts an
//! epoch thread that, every epoch, stops the application's threads at their
//! safepoints, harvests and copies the dirty pages, resumes them, and replicates the
//! copy to an in-process replica. [`Replicator::finish`] takes a last checkpoint and
//! hands back the replica: its regions and restart record, as a backup would hand
//! them to the application's restart code.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fgbi_engine::{EncoderConfig, Geometry, Mode};
use fgbi_hyp::process::{ProcessHandle, ProcessMemory, RegionLayout, protect};
use fgbi_hyp::protected::Protected;

use crate::bench::Percentiles;
use crate::local::{LocalReplication, ReplicationError};

/// How to protect.
#[derive(Clone, Debug)]
pub struct ReplicatorOptions {
    /// Time between checkpoints.
    pub epoch: Duration,
    /// Encoding mode.
    pub mode: Mode,
    /// Block size.
    pub block_size: usize,
    /// Page cache budget.
    pub cache_bytes: usize,
    /// How long the application's threads may take to reach a safepoint.
    pub stop_timeout: Duration,
    /// Compare the replica with the checkpoint every this many epochs (0: never;
    /// the final checkpoint is always verified).
    pub verify_every: u64,
}

impl Default for ReplicatorOptions {
    fn default() -> Self {
        Self {
            epoch: Duration::from_millis(25),
            mode: Mode::Fgbi,
            block_size: fgbi_engine::DEFAULT_BLOCK_SIZE,
            cache_bytes: fgbi_engine::page_cache::DEFAULT_CACHE_BYTES,
            stop_timeout: Duration::from_secs(1),
            verify_every: 1,
        }
    }
}

/// What protection did, and the replica it leaves.
pub struct Summary {
    /// Checkpoints taken, the final one included.
    pub epochs: u64,
    /// Checkpoints compared with the replica.
    pub verified: u64,
    /// Checkpoints whose replica differed (always 0 unless something is broken).
    pub mismatches: u64,
    /// Dirty pages replicated.
    pub dirty_pages: u64,
    /// Bytes encoded.
    pub wire_bytes: u64,
    /// Type II downtime per checkpoint, microseconds.
    pub pause_us: Percentiles,
    /// The replica, at the final checkpoint.
    pub replica: ReplicaView,
}

/// The backup's view of a protected application: its regions and restart record at
/// the last committed epoch.
pub struct ReplicaView {
    replication: LocalReplication,
    layout: Vec<RegionLayout>,
}

impl ReplicaView {
    /// Number of regions.
    pub fn regions(&self) -> usize {
        self.layout.len()
    }

    /// The replica of region `index`.
    pub fn region(&self, index: usize) -> Option<&[u8]> {
        let r = self.layout.get(index)?;
        self.replication.replica().get(r.offset..r.offset + r.len)
    }

    /// The restart record committed with the last epoch.
    pub fn state(&self) -> &[u8] {
        self.replication.state()
    }
}

/// A running epoch thread protecting an application's regions.
pub struct Replicator {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Summary, ReplicationError>>,
}

impl Replicator {
    /// Protects regions of `sizes` bytes and starts checkpointing them. The
    /// application uses the returned handle to find its regions, register its
    /// threads' safepoints and set its restart record.
    pub fn start(
        sizes: &[usize],
        options: ReplicatorOptions,
    ) -> Result<(ProcessHandle, Replicator), ReplicationError> {
        let (handle, memory) = protect(sizes, options.stop_timeout)?;
        let geometry = Geometry::new(memory.mem_bytes(), options.block_size)?;
        let mut config = EncoderConfig::new(geometry, options.mode);
        config.cache_bytes = options.cache_bytes;
        let replication = LocalReplication::new(config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("fgbi-epoch".into())
            .spawn(move || run(memory, replication, &options, &flag))
            .map_err(ReplicationError::Thread)?;
        Ok((handle, Replicator { stop, thread }))
    }

    /// Stops checkpointing after a final, verified checkpoint and returns the summary
    /// with the replica.
    pub fn finish(self) -> Result<Summary, ReplicationError> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| ReplicationError::EpochThreadPanicked)?
    }
}

fn run(
    mut memory: ProcessMemory,
    mut replication: LocalReplication,
    options: &ReplicatorOptions,
    stop: &AtomicBool,
) -> Result<Summary, ReplicationError> {
    let mut pauses = Vec::new();
    let (mut epochs, mut verified, mut mismatches, mut dirty_pages, mut wire_bytes) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut next = Instant::now() + options.epoch;
    loop {
        let last = stop.load(Ordering::Acquire);
        if !last {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += options.epoch;
        }
        let verify = last || (options.verify_every > 0 && (epochs + 1) % options.verify_every == 0);
        let report = replication.checkpoint(&mut memory, verify)?;
        epochs += 1;
        dirty_pages += report.dirty_pages;
        wire_bytes += report.wire_bytes;
        pauses.push(report.pause.as_secs_f64() * 1e6);
        match report.verified {
            Some(true) => verified += 1,
            Some(false) => mismatches += 1,
            None => {}
        }
        if last {
            break;
        }
    }
    Ok(Summary {
        epochs,
        verified,
        mismatches,
        dirty_pages,
        wire_bytes,
        pause_us: Percentiles::of(&mut pauses),
        replica: ReplicaView {
            layout: memory.layout().to_vec(),
            replication,
        },
    })
}
