//! Continuous protection of an application's own memory.
//!
//! [`Replicator::start`] protects the regions an application asks for and starts an
//! epoch thread that, every epoch, stops the application's threads at their
//! safepoints, harvests and copies the dirty pages, resumes them, and replicates the
//! copy to its [`Target`]: an in-process replica ([`crate::local`]) or a backup over
//! the network ([`crate::primary::Link`], the same code `fgbi primary` runs).
//!
//! Output commit: each checkpoint closes an output epoch
//! ([`ProcessHandle::output_epoch`]); once the target has committed the checkpoint,
//! the epoch thread releases its outputs ([`ProcessHandle::wait_committed`]). While
//! no backup holds a checkpoint (none reachable, or initial sync) the application
//! runs unprotected and nothing is held back.
//! [`Replicator::finish`] takes a last checkpoint and, for a local target, hands back
//! the replica: its regions and restart record, as a backup would hand them to the
//! application's restart code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fgbi_engine::{EncodeError, EncoderConfig, Geometry, Mode};
use fgbi_hyp::process::{ProcessHandle, ProcessMemory, RegionLayout, parse_state, protect};
use fgbi_hyp::protected::Protected;
use fgbi_transport::{Implementation, Liveness, PresharedKey, RdmaConfig, TransportConfig};

use crate::bench::Percentiles;
use crate::fault::{self, Point};
use crate::local::{LocalReplication, ReplicationError};
use crate::primary::{Link, PrimaryEvent};

/// Where the checkpoints go.
#[derive(Clone, Debug, Default)]
pub enum Target {
    /// An in-process replica, compared with the checkpoints and handed back by
    /// [`Replicator::finish`].
    #[default]
    Local,
    /// A backup over the network (`fgbi backup`).
    Remote(Remote),
}

/// A backup over the network.
#[derive(Clone, Debug)]
pub struct Remote {
    /// The backup's address.
    pub backup: SocketAddr,
    /// The key both sides share.
    pub key: Arc<PresharedKey>,
    /// Which transport implementation moves the bytes.
    pub implementation: Implementation,
    /// The RDMA device, port and GID (with [`Implementation::Rdma`] only).
    pub rdma: RdmaConfig,
    /// Heartbeats and the death timeout.
    pub liveness: Liveness,
    /// How long the epoch thread tries to reach the backup at start before it
    /// reports the application unprotected and starts checkpointing anyway (outputs
    /// are held meanwhile).
    pub connect_timeout: Duration,
}

/// Sees every event of the epoch thread: checkpoints sent, committed, protection
/// lost or regained. Called on the epoch thread: it must not block for long.
#[derive(Clone)]
pub struct Observer(pub Arc<dyn Fn(PrimaryEvent) + Send + Sync>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

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
    /// the final checkpoint is always verified). Local target only.
    pub verify_every: u64,
    /// Where the checkpoints go.
    pub target: Target,
    /// Told of every checkpoint, if given.
    pub observer: Option<Observer>,
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
            target: Target::Local,
            observer: None,
        }
    }
}

/// What protection did, and the replica it leaves.
pub struct Summary {
    /// Checkpoints taken, the final one included.
    pub epochs: u64,
    /// Checkpoints the target committed.
    pub committed: u64,
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
    /// The replica at the final checkpoint, for a local target.
    pub replica: Option<ReplicaView>,
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

    /// The restart record committed with the last epoch (empty before the first).
    pub fn state(&self) -> &[u8] {
        parse_state(self.replication.state()).map_or(&[], |(_, record)| record)
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
    /// threads' safepoints, set its restart record and hold its outputs.
    ///
    /// An in-process replica and its encoder are built before this returns, so that
    /// checkpoints start at once and a lack of memory for them shows here.
    pub fn start(
        sizes: &[usize],
        options: ReplicatorOptions,
    ) -> Result<(ProcessHandle, Replicator), ReplicationError> {
        Self::launch(sizes, options, |_| {}, false)
    }

    /// As [`Replicator::start`], with `fill` writing the regions' first contents (and
    /// restart record) before the first checkpoint can be taken: how a program
    /// restarted from a replica is protected again, so that no checkpoint of it lacks
    /// what it took over.
    ///
    /// The program is to run again at once (its type I downtime lasts until it
    /// does), so an in-process replica and its encoder, whose tables are allocated
    /// and touched (tens of milliseconds when the kernel compacts memory for their
    /// huge pages), are built on the epoch thread: the first checkpoint waits for
    /// them, the program does not, and a lack of memory for them ends the epoch
    /// thread with an error [`Replicator::finish`] returns.
    pub fn start_from(
        sizes: &[usize],
        options: ReplicatorOptions,
        fill: impl FnOnce(&ProcessHandle),
    ) -> Result<(ProcessHandle, Replicator), ReplicationError> {
        Self::launch(sizes, options, fill, true)
    }

    /// [`Replicator::start`] and [`Replicator::start_from`]: with `defer`, the
    /// in-process replica is built on the epoch thread.
    fn launch(
        sizes: &[usize],
        options: ReplicatorOptions,
        fill: impl FnOnce(&ProcessHandle),
        defer: bool,
    ) -> Result<(ProcessHandle, Replicator), ReplicationError> {
        let (handle, memory) = protect(sizes, options.stop_timeout)?;
        fill(&handle);
        let geometry = Geometry::new(memory.mem_bytes(), options.block_size)?;
        let mut config = EncoderConfig::new(geometry, options.mode);
        config.cache_bytes = options.cache_bytes;
        // A bad setting shows here, at once, whatever is deferred.
        config.validate().map_err(EncodeError::Config)?;
        let plan = match &options.target {
            Target::Local if defer => Plan::Deferred(Box::new(config)),
            Target::Local => Plan::Local(Box::new(LocalReplication::new(config)?)),
            Target::Remote(remote) => {
                let mut transport = TransportConfig::new(geometry, remote.implementation);
                transport.liveness = remote.liveness;
                transport.rdma = remote.rdma.clone();
                Plan::Remote(Box::new((config, transport, remote.clone())))
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("fgbi-epoch".into())
            .spawn(move || match plan {
                Plan::Local(replication) => run(memory, Sink::Local(replication), &options, &flag),
                Plan::Deferred(config) => {
                    let replication = LocalReplication::new(*config)?;
                    run(memory, Sink::Local(Box::new(replication)), &options, &flag)
                }
                Plan::Remote(plan) => {
                    let (config, transport, remote) = *plan;
                    let mut link = Link::new(config, transport, remote.backup, &remote.key)?;
                    let mut observe = observer(&options);
                    // Unreachable: reported through the observer; checkpoints start
                    // regardless.
                    let _ = link.connect(Instant::now() + remote.connect_timeout, &mut observe);
                    run(memory, Sink::Remote(Box::new(link)), &options, &flag)
                }
            })
            .map_err(ReplicationError::Thread)?;
        Ok((handle, Replicator { stop, thread }))
    }

    /// Stops checkpointing after a final checkpoint (verified, for a local target)
    /// and returns the summary, with the replica for a local target. Every output
    /// still held is released.
    pub fn finish(self) -> Result<Summary, ReplicationError> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| ReplicationError::EpochThreadPanicked)?
    }
}

/// The target, made ready before the epoch thread starts, or for it to build.
enum Plan {
    /// An in-process replica.
    Local(Box<LocalReplication>),
    /// An in-process replica the epoch thread builds.
    Deferred(Box<EncoderConfig>),
    Remote(Box<(EncoderConfig, TransportConfig, Remote)>),
}

/// The observer of `options` as a callback (doing nothing without one).
fn observer(options: &ReplicatorOptions) -> impl FnMut(PrimaryEvent) + '_ {
    |event| {
        if let Some(Observer(observer)) = &options.observer {
            observer(event);
        }
    }
}

/// Where the epoch thread sends its checkpoints.
enum Sink<'k> {
    Local(Box<LocalReplication>),
    Remote(Box<Link<'k>>),
}

/// What became of one checkpoint, whatever the target.
struct Outcome {
    dirty_pages: u64,
    wire_bytes: u64,
    pause: Duration,
    verified: Option<bool>,
}

impl Sink<'_> {
    /// Takes one checkpoint and hands it to the target; `observe` hears of it, and
    /// of every commit as it happens.
    fn checkpoint(
        &mut self,
        memory: &mut ProcessMemory,
        verify: bool,
        observe: &mut dyn FnMut(PrimaryEvent),
    ) -> Result<Outcome, ReplicationError> {
        match self {
            Sink::Local(replication) => {
                let report = replication.checkpoint(memory, verify)?;
                observe(PrimaryEvent::Sent {
                    epoch: report.epoch,
                    pause: report.pause,
                    bytes: report.wire_bytes,
                    digest: None,
                });
                observe(PrimaryEvent::Committed {
                    epoch: report.epoch,
                    checkpoints: memory.closed_output_epoch(),
                });
                Ok(Outcome {
                    dirty_pages: report.dirty_pages,
                    wire_bytes: report.wire_bytes,
                    pause: report.pause,
                    verified: report.verified,
                })
            }
            Sink::Remote(link) => {
                let shipped = link.checkpoint(memory, false, observe)?;
                Ok(Outcome {
                    dirty_pages: shipped.dirty_pages,
                    wire_bytes: shipped.bytes,
                    pause: shipped.pause,
                    verified: None,
                })
            }
        }
    }

    /// Waits until `until`, taking the target's answers as they arrive; with
    /// `until` `None`, until every checkpoint sent is answered.
    fn settle(
        &mut self,
        until: Option<Instant>,
        observe: &mut dyn FnMut(PrimaryEvent),
    ) -> Result<(), ReplicationError> {
        if let (Sink::Remote(link), Some(until)) = (&mut *self, until) {
            link.settle(until, observe)?;
        } else if let Sink::Remote(link) = self {
            link.drain(observe)?;
        }
        if let Some(until) = until {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        Ok(())
    }

    /// Whether the target holds the program's state: outputs wait for its commits.
    fn protects(&self) -> bool {
        match self {
            Sink::Local(_) => true,
            Sink::Remote(link) => link.protected(),
        }
    }
}

fn run(
    mut memory: ProcessMemory,
    mut sink: Sink<'_>,
    options: &ReplicatorOptions,
    stop: &AtomicBool,
) -> Result<Summary, ReplicationError> {
    let mut user = observer(options);
    let outputs = memory.output_release();
    let mut committed = 0;
    // Outputs leave as soon as the checkpoint that closed them is committed (the
    // n-th checkpoint closes output epoch n).
    let mut observe = |event: PrimaryEvent| {
        if let PrimaryEvent::Committed { checkpoints, .. } = event {
            outputs.commit(checkpoints);
            committed = checkpoints;
            fault::reached(Point::Released);
        }
        user(event);
    };
    let mut pauses = Vec::new();
    let mut summary = Summary {
        epochs: 0,
        committed: 0,
        verified: 0,
        mismatches: 0,
        dirty_pages: 0,
        wire_bytes: 0,
        pause_us: Percentiles::default(),
        replica: None,
    };
    let mut next = Instant::now() + options.epoch;
    loop {
        let last = stop.load(Ordering::Acquire);
        if !last {
            sink.settle(Some(next), &mut observe)?;
            next += options.epoch;
        }
        let verify =
            last || (options.verify_every > 0 && (summary.epochs + 1) % options.verify_every == 0);
        let outcome = sink.checkpoint(&mut memory, verify, &mut observe)?;
        if last {
            sink.settle(None, &mut observe)?;
        }
        if !sink.protects() {
            // Nothing holds the state: the application runs unprotected.
            memory.commit_outputs(memory.closed_output_epoch());
        }
        summary.epochs += 1;
        summary.dirty_pages += outcome.dirty_pages;
        summary.wire_bytes += outcome.wire_bytes;
        pauses.push(outcome.pause.as_secs_f64() * 1e6);
        match outcome.verified {
            Some(true) => summary.verified += 1,
            Some(false) => summary.mismatches += 1,
            None => {}
        }
        if last {
            break;
        }
    }
    summary.committed = committed;
    summary.pause_us = Percentiles::of(&mut pauses);
    if let Sink::Local(replication) = sink {
        summary.replica = Some(ReplicaView {
            layout: memory.layout().to_vec(),
            replication: *replication,
        });
    }
    Ok(summary)
}
