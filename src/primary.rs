//! The primary's side of replication over the network.
//!
//! [`Link`] takes a checkpoint, encodes it and sends it into the backup's receive
//! region without waiting for its acknowledgement: epochs pipeline, the next one
//! running while earlier ones are in flight, at most one per receive slot of the
//! backup. A full window makes the next checkpoint wait for the oldest answer, so a
//! backup or link that falls behind stretches the epoch instead of growing memory.
//! Answers are read as they arrive while the loop waits for the next epoch
//! ([`Link::settle`]). When the backup refuses an epoch or the link breaks, the epoch
//! (and every later one in flight) is lost and its pages are carried into the next;
//! the program never stops for the backup. While no backup is reachable each
//! checkpoint's pages are carried and the link tries to reconnect once per epoch,
//! on a thread of its own, so that a backup that does not answer (a host that drops
//! the connection request, a frozen backup whose kernel accepts it) never holds up
//! checkpoints or the outputs they release. A backup that connects empty (the
//! first, one that restarted, or a new one) is synced by iterative pre-copy
//! ([`crate::precopy`]) while the program keeps running, and the program is
//! reported unprotected until the checkpoint that ends it commits. [`run`] is the
//! loop of `fgbi primary` over a program that runs in steps (a synthetic workload);
//! [`crate::replicator`] drives the same [`Link`] from its epoch thread for an
//! application's own memory.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

use fgbi_engine::{Encoder, EncoderConfig};
use fgbi_hyp::protected::Protected;
use fgbi_transport::{
    PresharedKey, Primary, Reply, SCRUB_CHUNK_BYTES, TransportConfig, TransportError,
};

use crate::checkpoint::Checkpointer;
use crate::fault::{self, Point};
use crate::local::ReplicationError;
use crate::precopy::{PreCopy, Step};

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
    /// Scrub every this many epochs (0: never); see [`Link::scrub_every`].
    pub scrub_every: u64,
    /// How an empty backup is synced; see [`Link::pre_copy`].
    pub pre_copy: bool,
}

/// Epochs between scrubs unless told otherwise.
pub const DEFAULT_SCRUB_EVERY: u64 = 40;

/// Chunks of [`SCRUB_CHUNK_BYTES`] one scrub compares: 1 MiB of memory.
pub const SCRUB_CHUNKS: u64 = 16;

/// One event of the primary's side, for logs and demos.
#[derive(Clone, Debug)]
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
    /// The backup committed every epoch up to `epoch`: the first `checkpoints`
    /// checkpoints this link took are on the backup, so the outputs they closed may
    /// leave.
    Committed {
        /// The highest committed epoch.
        epoch: u64,
        /// How many of the link's checkpoints, counted from 1 in the order taken, the
        /// backup now holds (pages of checkpoints never sent travel in later ones).
        checkpoints: u64,
    },
    /// A pre-copy epoch of initial sync committed: part of memory, read while the
    /// program ran, is on the backup, which holds no checkpoint yet.
    Synced {
        /// Epoch number.
        epoch: u64,
        /// The pre-copy round, from 0 (all memory; then what the last round saw
        /// written).
        round: u32,
        /// Pages sent.
        pages: u64,
        /// Encoded bytes.
        bytes: u64,
        /// The stop to harvest the dirty pages (no page is copied in it).
        pause: Duration,
        /// Pages of this round still to send.
        left: u64,
    },
    /// No backup holds the program's state: it runs unprotected until one is
    /// reached again. Reported when protection is lost (or never gained), and again
    /// whenever an attempt to reconnect fails for another reason.
    Unprotected {
        /// Why: the error of the link or of the last attempt to connect.
        reason: String,
    },
    /// Connected (or reconnected) to a backup at this committed epoch. Protection
    /// resumes with the next [`PrimaryEvent::Committed`] (after initial sync, for
    /// an empty backup).
    Connected(u64),
    /// The backup compared a slice of its replica with the checkpoint of `epoch`.
    Scrubbed {
        /// The epoch compared.
        epoch: u64,
        /// Memory compared, bytes from the start.
        range: std::ops::Range<u64>,
        /// The pages of the chunks that differed: the replica had diverged. They are
        /// sent whole with the next epoch (an error message is also written to
        /// stderr).
        diverged: Vec<u64>,
    },
}

/// What became of one checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct Shipped {
    /// Epoch number the checkpoint was encoded as (0: not encoded, no backup).
    pub epoch: u64,
    /// Dirty pages in the checkpoint (carried ones included).
    pub dirty_pages: u64,
    /// Encoded bytes sent (0 when nothing was sent).
    pub bytes: u64,
    /// Type II downtime.
    pub pause: Duration,
}

/// An epoch sent and not yet answered.
struct Sent {
    epoch: u64,
    /// The checkpoint it carries: the link's stops of the program so far (see
    /// [`PrimaryEvent::Committed`]).
    checkpoint: u64,
    /// When it was sent: an answer overdue by four liveness timeouts loses it.
    at: Instant,
}

/// The primary's end of replication: encoder, connection, and what to re-send.
pub struct Link<'k> {
    config: EncoderConfig,
    transport: TransportConfig,
    backup: SocketAddr,
    key: &'k PresharedKey,
    encoder: Encoder,
    checkpointer: Checkpointer,
    connection: Option<Primary>,
    /// The attempt to reconnect running on a thread of its own, if any.
    attempt: Option<Receiver<Result<Primary, TransportError>>>,
    /// The encoder has been reconciled with the connected backup.
    synced: bool,
    /// Why the program was last reported unprotected, if it was since the backup
    /// last committed a checkpoint.
    reported: Option<String>,
    /// Sync an empty backup by pre-copy (else in the next checkpoint's pause).
    pre_copy: bool,
    /// Initial sync of an empty backup, while it lasts.
    precopy: Option<PreCopy>,
    /// The next checkpoint ends initial sync: its pages go whole.
    ending_sync: bool,
    /// Epochs between scrubs (0: none).
    scrub_every: u64,
    /// The next chunk to scrub.
    scrub_next: u64,
    /// Epochs sent and not yet answered, oldest first.
    sent: VecDeque<Sent>,
    /// Checkpoints taken.
    taken: u64,
}

impl<'k> Link<'k> {
    /// A link to the backup at `backup`, not yet connected. `transport`'s geometry
    /// must equal `encoder`'s.
    pub fn new(
        encoder: EncoderConfig,
        transport: TransportConfig,
        backup: SocketAddr,
        key: &'k PresharedKey,
    ) -> Result<Self, ReplicationError> {
        Ok(Self {
            encoder: Encoder::new(encoder.clone())?,
            config: encoder,
            transport,
            backup,
            key,
            checkpointer: Checkpointer::new(),
            connection: None,
            attempt: None,
            synced: false,
            reported: None,
            pre_copy: true,
            precopy: None,
            ending_sync: false,
            scrub_every: DEFAULT_SCRUB_EVERY,
            scrub_next: 0,
            sent: VecDeque::new(),
            taken: 0,
        })
    }

    /// Every `epochs` epochs (0: never), once the backup committed the epoch, asks
    /// it to compare the next slice of its replica ([`SCRUB_CHUNKS`] chunks, going
    /// round memory) with digests of that epoch's checkpoint taken in its pause;
    /// chunks that differ are reported and their pages sent whole again.
    pub fn scrub_every(&mut self, epochs: u64) {
        self.scrub_every = epochs;
    }

    /// How a backup that connects empty is synced: by iterative pre-copy while the
    /// program runs (`true`, the default: [`crate::precopy`]), or in the pause of the
    /// next checkpoint, which then copies every page that may differ from an empty
    /// replica (`false`: what a bench measuring from a known sync epoch wants).
    pub fn pre_copy(&mut self, on: bool) {
        self.pre_copy = on;
    }

    /// Tries to connect until `deadline` (at least once); on failure reports the
    /// program unprotected and returns the last error.
    pub fn connect(
        &mut self,
        deadline: Instant,
        event: &mut dyn FnMut(PrimaryEvent),
    ) -> Result<(), ReplicationError> {
        loop {
            match attempt(self.backup, &self.transport, self.key) {
                Ok(primary) => {
                    self.connection = Some(primary);
                    self.synced = false;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    self.unprotected(&e, event);
                    return Err(e.into());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Takes the connection the attempt in flight made, or starts an attempt if none
    /// is in flight (or the last one failed). Never waits for the backup.
    /// A failed attempt is reported when it fails for a reason not yet reported.
    fn reconnect(&mut self, event: &mut dyn FnMut(PrimaryEvent)) {
        if let Some(attempt) = &self.attempt {
            match attempt.try_recv() {
                Err(TryRecvError::Empty) => return,
                Ok(Ok(primary)) => {
                    self.attempt = None;
                    self.connection = Some(primary);
                    self.synced = false;
                    return;
                }
                Ok(Err(e)) => {
                    self.attempt = None;
                    self.unprotected(&e, event);
                }
                Err(TryRecvError::Disconnected) => self.attempt = None,
            }
        }
        let (done, result) = mpsc::channel();
        let (backup, transport, key) = (self.backup, self.transport.clone(), self.key.clone());
        let started = std::thread::Builder::new()
            .name("fgbi-reconnect".into())
            .spawn(move || {
                // Nobody waits for an attempt the link gave up with itself.
                let _ = done.send(attempt(backup, &transport, &key));
            });
        // Without a thread this time, the next checkpoint tries again.
        self.attempt = started.is_ok().then_some(result);
    }

    /// Whether a backup is connected.
    pub fn connected(&self) -> bool {
        self.connection.is_some()
    }

    /// The highest epoch the backup committed.
    pub fn committed(&self) -> u64 {
        self.encoder.committed()
    }

    /// Whether a backup holds a checkpoint of the program: connected, and a
    /// checkpoint committed since protection was last lost (never during initial
    /// sync).
    pub fn protected(&self) -> bool {
        self.connection.is_some() && self.synced && self.reported.is_none()
    }

    /// Takes one checkpoint of `program` (with its digest if `digest`), encodes it and
    /// sends it, without waiting for its answer unless every receive slot of the
    /// backup already holds an epoch in flight: then the oldest answer is awaited
    /// first, and the epoch stretches. Without a backup the checkpoint's pages are
    /// carried, and one attempt is made to reconnect for the next. During initial
    /// sync, sends the next pre-copy epoch instead (the program is stopped only to
    /// harvest, and nothing is committed) until the checkpoint that ends it.
    pub fn checkpoint<P: Protected + ?Sized>(
        &mut self,
        program: &mut P,
        digest: bool,
        event: &mut dyn FnMut(PrimaryEvent),
    ) -> Result<Shipped, ReplicationError> {
        if self.connection.is_none() {
            self.reconnect(event);
        }
        while self
            .connection
            .as_ref()
            .is_some_and(|primary| self.sent.len() >= primary.slots())
        {
            self.answer(None, event)?;
        }
        self.reconcile(event)?;
        if let (Some(precopy), Some(primary)) = (&mut self.precopy, &mut self.connection) {
            let timeout = self.transport.liveness.timeout * 4;
            match precopy.step(program, &mut self.encoder, primary, timeout, event)? {
                // Each pre-copy step stopped the program once, to harvest: it counts
                // among the stops whose outputs a later checkpoint's commit releases.
                Step::Sent(shipped) => {
                    self.taken += 1;
                    return Ok(shipped);
                }
                Step::Broken(shipped, e) => {
                    self.taken += 1;
                    self.fail(&e, event);
                    return Ok(shipped);
                }
                Step::Final => {
                    self.precopy = None;
                    self.ending_sync = true;
                }
            }
        }
        // Without a backup the carried pages stay carried: no need to copy them.
        let carried = match self.connection {
            Some(_) => self.encoder.carried_pages(),
            None => &[],
        };
        let scrub = self.connection.is_some()
            && self.scrub_every > 0
            && self.encoder.next_epoch() % self.scrub_every == 0;
        let chunks = self
            .config
            .geometry
            .mem_bytes()
            .div_ceil(SCRUB_CHUNK_BYTES as u64);
        let slice = self.scrub_next..(self.scrub_next + SCRUB_CHUNKS).min(chunks);
        if scrub {
            self.checkpointer.scrub(slice.clone());
        }
        let checkpoint = self.checkpointer.take(program, carried, digest)?;
        self.taken += 1;
        if self.ending_sync && self.connection.is_some() {
            // Written while initial sync read memory: what the backup holds of them
            // is unknown. (Should this epoch be lost, its replacement does the same.)
            self.encoder.resend(checkpoint.dirty)?;
            self.ending_sync = false;
        }
        let mut shipped = Shipped {
            epoch: 0,
            dirty_pages: checkpoint.dirty.len() as u64,
            bytes: 0,
            pause: checkpoint.pause,
        };
        let Some(primary) = self.connection.as_mut() else {
            // Nobody to send to: keep the pages for the backup that comes next.
            self.encoder.carry(checkpoint.dirty)?;
            return Ok(shipped);
        };
        let scrub_digests = checkpoint.scrub.to_vec();
        let encoded = self
            .encoder
            .encode(checkpoint.dirty, checkpoint.pages, checkpoint.state)?;
        (shipped.epoch, shipped.bytes) = (encoded.stats.epoch, encoded.stats.bytes);
        let sent = if fault::hit(Point::Transfer) {
            // Half the epoch reaches the backup, then the primary dies.
            let _ = primary.send_epoch_prefix(&encoded, encoded.len() / 2);
            fault::kill(Point::Transfer);
            Err(TransportError::Broken)
        } else {
            primary.send_epoch(&encoded)
        };
        event(PrimaryEvent::Sent {
            epoch: shipped.epoch,
            pause: shipped.pause,
            bytes: shipped.bytes,
            digest: checkpoint.digest,
        });
        if let Err(e) = sent {
            self.fail(&e, event);
            return Ok(shipped);
        }
        fault::reached(Point::Sent);
        self.sent.push_back(Sent {
            epoch: shipped.epoch,
            checkpoint: self.taken,
            at: Instant::now(),
        });
        if !scrub_digests.is_empty() {
            // A scrub compares the replica at this epoch: only with nothing in flight.
            self.drain(event)?;
            if self.connected() && self.encoder.committed() >= shipped.epoch {
                self.scrub(slice, &scrub_digests, event)?;
            }
        }
        Ok(shipped)
    }

    /// Reads the backup's answers as they arrive until every epoch in flight is
    /// answered or `until` passes: call it while waiting for the next epoch.
    pub fn settle(
        &mut self,
        until: Instant,
        event: &mut dyn FnMut(PrimaryEvent),
    ) -> Result<(), ReplicationError> {
        while !self.sent.is_empty() && Instant::now() < until {
            self.answer(Some(until), event)?;
        }
        Ok(())
    }

    /// Waits until every epoch in flight is answered (committed, refused, or lost
    /// with the connection).
    pub fn drain(&mut self, event: &mut dyn FnMut(PrimaryEvent)) -> Result<(), ReplicationError> {
        while !self.sent.is_empty() {
            self.answer(None, event)?;
        }
        Ok(())
    }

    /// Waits for the answer to the oldest epoch in flight, until `until` at most;
    /// an answer overdue by four liveness timeouts loses the connection and every
    /// epoch in flight.
    fn answer(
        &mut self,
        until: Option<Instant>,
        event: &mut dyn FnMut(PrimaryEvent),
    ) -> Result<(), ReplicationError> {
        let (Some(primary), Some(oldest)) = (self.connection.as_mut(), self.sent.front()) else {
            self.sent.clear();
            return Ok(());
        };
        let overdue = oldest.at + self.transport.liveness.timeout * 4;
        let until = until.map_or(overdue, |until| until.min(overdue));
        let reply = primary.wait_reply(until.saturating_duration_since(Instant::now()));
        match reply {
            Ok(Reply::Committed(n)) => {
                fault::reached(Point::Acknowledged);
                self.encoder.acknowledge(n)?;
                let mut checkpoints = 0;
                while let Some(sent) = self.sent.front().filter(|s| s.epoch <= n) {
                    checkpoints = sent.checkpoint;
                    self.sent.pop_front();
                }
                self.reported = None;
                event(PrimaryEvent::Committed {
                    epoch: n,
                    checkpoints,
                });
            }
            Ok(Reply::Refused { epoch, .. }) => {
                // Every later epoch was encoded against the refused one and will be
                // refused too: lose them all, and take their answers before sending
                // the next.
                self.encoder.lose(epoch)?;
                let later = self.sent.len() - 1;
                self.sent.clear();
                for _ in 0..later {
                    match primary.wait_reply(self.transport.liveness.timeout * 4) {
                        Ok(Reply::Refused { .. }) => {}
                        Ok(Reply::Committed(n)) => {
                            let e = TransportError::Protocol(format!(
                                "the backup committed epoch {n} after refusing epoch {epoch}"
                            ));
                            self.fail(&e, event);
                            break;
                        }
                        Err(e) => {
                            self.fail(&e, event);
                            break;
                        }
                    }
                }
            }
            Err(TransportError::ReplyTimeout(_)) if Instant::now() < overdue => {}
            Err(e) => self.fail(&e, event),
        }
        Ok(())
    }

    /// The connection failed with `error`: the program runs unprotected, and an
    /// attempt to reconnect starts. The encoder keeps its epochs in flight until
    /// [`Link::reconcile`] learns which of them the backup committed (it may have
    /// committed some whose acknowledgement was lost with the connection).
    fn fail(&mut self, error: &TransportError, event: &mut dyn FnMut(PrimaryEvent)) {
        self.sent.clear();
        self.connection = None;
        self.unprotected(error, event);
        self.reconnect(event);
    }

    /// Asks the backup, holding the epoch whose pause took `digests`, to compare its
    /// chunks `slice` with them; chunks that differ are reported and sent whole again.
    fn scrub(
        &mut self,
        slice: std::ops::Range<u64>,
        digests: &[u128],
        event: &mut dyn FnMut(PrimaryEvent),
    ) -> Result<(), ReplicationError> {
        let Some(primary) = self.connection.as_mut() else {
            return Ok(());
        };
        let mem_bytes = self.config.geometry.mem_bytes();
        let chunks = mem_bytes.div_ceil(SCRUB_CHUNK_BYTES as u64);
        match primary.scrub(slice.start, digests, self.transport.liveness.timeout * 4) {
            Ok((epoch, mismatched)) => {
                self.scrub_next = if slice.end >= chunks { 0 } else { slice.end };
                let diverged = diverged_pages(&slice, mismatched, mem_bytes);
                if !diverged.is_empty() {
                    eprintln!(
                        "fgbi: ERROR: the backup's replica diverged from checkpoint {epoch} in {} pages of bytes {}..{}; sending them whole again",
                        diverged.len(),
                        slice.start * SCRUB_CHUNK_BYTES as u64,
                        slice.end * SCRUB_CHUNK_BYTES as u64,
                    );
                    self.encoder.resend(&diverged)?;
                }
                let chunk = SCRUB_CHUNK_BYTES as u64;
                event(PrimaryEvent::Scrubbed {
                    epoch,
                    range: slice.start * chunk..(slice.end * chunk).min(mem_bytes),
                    diverged,
                });
                Ok(())
            }
            Err(e) => {
                self.fail(&e, event);
                Ok(())
            }
        }
    }

    /// After a (re)connection, reconciles the encoder with what the backup holds.
    fn reconcile(&mut self, event: &mut dyn FnMut(PrimaryEvent)) -> Result<(), ReplicationError> {
        let Some(primary) = self.connection.as_ref().filter(|_| !self.synced) else {
            return Ok(());
        };
        let held = primary.backup_committed();
        let committed = self.encoder.committed();
        // A backup holds what this encoder committed, or an epoch it sent since; any
        // other replica (another program's, an earlier run's) cannot be built on.
        let ours = held == 0
            || held == committed
            || (held > committed && self.encoder.acknowledge(held).is_ok());
        if !ours {
            self.connection = None;
            self.unprotected(
                &format!(
                    "the backup holds epoch {held}, which this primary never sent (it committed {committed}): it replicates another program or an earlier run; restart the backup empty"
                ),
                event,
            );
            return Ok(());
        }
        self.encoder.lose_all();
        self.synced = true;
        event(PrimaryEvent::Connected(held));
        if held == 0 {
            self.sync_empty_backup(event)?;
        }
        Ok(())
    }

    /// The connected backup is empty: syncs it from a fresh encoder, by pre-copy or
    /// in the next pause. Every page may differ from its replica, unless nothing was
    /// ever sent: then the pages of the checkpoints taken meanwhile (carried) and the
    /// first harvest cover them all (the `Protected::harvest` contract).
    fn sync_empty_backup(
        &mut self,
        event: &mut dyn FnMut(PrimaryEvent),
    ) -> Result<(), ReplicationError> {
        let pages = self.config.geometry.pages();
        let sent = self.encoder.committed() > 0 || self.precopy.is_some() || self.ending_sync;
        let first: Vec<u64> = match sent {
            true => (0..pages).collect(),
            false => self.encoder.carried_pages().to_vec(),
        };
        self.ending_sync = false;
        if !self.pre_copy {
            // Unless something was sent, the encoder is as new, the pages carried.
            if sent {
                self.encoder = Encoder::new(self.config.clone())?;
                self.encoder.carry(&first)?;
            }
            return Ok(());
        }
        self.encoder = Encoder::new(self.config.clone())?;
        self.precopy = Some(PreCopy::new(pages, first));
        self.unprotected(
            &"initial sync: the backup is receiving the whole memory while the program runs",
            event,
        );
        Ok(())
    }

    /// Reports the program unprotected for `reason`, unless that is the reason last
    /// reported since the backup last committed: a backup that stays unreachable is
    /// reported once, and one that comes back refusing this side (a wrong key or
    /// memory size) is reported again, saying why.
    fn unprotected(&mut self, reason: &dyn std::fmt::Display, event: &mut dyn FnMut(PrimaryEvent)) {
        let reason = reason.to_string();
        if self.reported.as_ref() != Some(&reason) {
            self.reported = Some(reason.clone());
            event(PrimaryEvent::Unprotected { reason });
        }
    }
}

/// One attempt to reach the backup at `backup` and run the handshake.
fn attempt(
    backup: SocketAddr,
    transport: &TransportConfig,
    key: &PresharedKey,
) -> Result<Primary, TransportError> {
    let stream =
        TcpStream::connect_timeout(&backup, Duration::from_millis(200)).map_err(|source| {
            TransportError::Io {
                what: "connecting to the backup",
                source,
            }
        })?;
    Primary::connect(stream, transport, key)
}

/// The pages of the chunks of `slice` whose bits are set in `mismatched`, within
/// `mem_bytes` of memory.
fn diverged_pages(slice: &std::ops::Range<u64>, mismatched: u64, mem_bytes: u64) -> Vec<u64> {
    let chunk = SCRUB_CHUNK_BYTES as u64;
    let page = fgbi_engine::PAGE_SIZE as u64;
    (0..slice.end - slice.start)
        .filter(|i| *i < 64 && mismatched & (1 << i) != 0)
        .flat_map(|i| {
            let start = (slice.start + i) * chunk;
            let end = (start + chunk).min(mem_bytes);
            start / page..end.div_ceil(page)
        })
        .collect()
}

/// Runs the primary loop over `program`, one `step` per epoch, until
/// `options.epochs` epochs are committed or an unrecoverable error occurs; `event`
/// sees every step.
pub fn run<P: Protected + ?Sized>(
    program: &mut P,
    mut step: impl FnMut(&mut P) -> Result<(), ReplicationError>,
    options: &PrimaryOptions,
    key: &PresharedKey,
    mut event: impl FnMut(PrimaryEvent),
) -> Result<u64, ReplicationError> {
    let mut link = Link::new(
        options.encoder.clone(),
        options.transport.clone(),
        options.backup,
        key,
    )?;
    link.scrub_every(options.scrub_every);
    link.pre_copy(options.pre_copy);
    link.connect(Instant::now() + options.connect_timeout, &mut event)?;
    let mut next = Instant::now();
    loop {
        next += options.epoch;
        link.settle(next, &mut event)?;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        step(program)?;
        let shipped = link.checkpoint(program, options.digests, &mut event)?;
        if let Some(limit) = options.epochs.filter(|&limit| shipped.epoch >= limit) {
            link.drain(&mut event)?;
            if link.committed() >= limit {
                return Ok(link.committed());
            }
        }
    }
}
