//! The RDMA implementation: one-sided writes into the backup's registered ring.
//!
//! The backup registers its [`ReceiveRegion`](crate::ReceiveRegion) (the slots and
//! their commit records) for remote writes, and nothing else; the primary registers
//! each epoch's parts (the encoder's output buffers) for the time of their write, and
//! one commit-record buffer: never the protected memory. After the TCP handshake has
//! authenticated both sides, they exchange queue-pair addresses, and the backup its
//! ring's rkey, address and length, as [`link`] messages on the TCP connection.
//!
//! The k-th epoch of a connection goes to slot `k mod slots`: the primary
//! RDMA-WRITEs the parts (a gather list, no concatenation) to the slot, then an
//! RDMA WRITE with immediate data puts the slot's commit record (an EPOCH control
//! message: number and length, checksummed) in place, its immediate data the epoch
//! number's low 32 bits. The receive request that immediate consumes completes on
//! the backup only after every byte before it was placed (RC ordering). The backup
//! checks the record, copies the slot out of the ring (a faulty or hostile primary
//! may keep writing into it; the applier must see bytes nobody changes under it),
//! and the usual validate-then-apply, ACK or NACK follow over TCP, with heartbeats.

mod gid;
mod link;
mod verbs;

use std::marker::PhantomData;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

pub use link::{LINK_BYTES, LINK_MAGIC};
use link::{Link, Ring, Sender};
use verbs::{Endpoint, Registration, Woken};

use crate::config::{Liveness, RdmaConfig};
use crate::control::{Control, Inbound};
use crate::error::TransportError;
use crate::handshake::Offer;
use crate::region::{RECORD_BYTES, ReceiveRegion};

/// Work requests the primary's send queue holds; longer epochs are posted in batches.
const SEND_WR: u32 = 64;

/// Gather entries per work request (every RDMA device offers at least this many).
const MAX_SGE: usize = 8;

/// Largest RDMA message, in bytes (the smallest `max_msg_sz` of common devices).
const MAX_MESSAGE: usize = 1 << 30;

/// Slowest write rate tolerated before a write counts as stalled: writing `n` bytes
/// may take the liveness timeout plus `n` at this rate (Soft-RoCE under emulation
/// moves about 40 MB/s).
const MIN_WRITE_BYTES_PER_SEC: u64 = 8 << 20;

/// Checks that libibverbs loads and the configured port is active; returns the
/// device's name.
pub(crate) fn probe(config: &RdmaConfig) -> Result<String, TransportError> {
    verbs::probe(config.device.as_deref(), config.port).map(|port| port.device)
}

fn random_psn() -> Result<u32, TransportError> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| TransportError::Io {
        what: "drawing a packet sequence number",
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(u32::from_le_bytes(b) & 0x00ff_ffff)
}

/// The primary's end of an RDMA link: writes epochs into the backup's ring.
///
/// [`crate::Primary`] uses it for [`crate::Implementation::Rdma`]; it is public so
/// that tools and tests can drive the ring directly (write without committing,
/// commit a record of their choosing).
pub struct RdmaWriter {
    // Dropped first: deregisters `record` before its memory is freed.
    endpoint: Endpoint,
    record: Box<[u8; RECORD_BYTES]>,
    record_key: Registration,
    psn: u32,
    ring: Option<Ring>,
    slots: u64,
    slot_bytes: u64,
    next: u64,
    batches: u64,
    timeout: Duration,
    broken: bool,
}

impl std::fmt::Debug for RdmaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaWriter")
            .field("device", &self.endpoint.port().device)
            .field("gid_index", &self.endpoint.gid_index())
            .field("next", &self.next)
            .field("broken", &self.broken)
            .finish()
    }
}

impl RdmaWriter {
    /// Opens the device and creates the queue pair (before the handshake, so that a
    /// missing device is reported before any peer is contacted).
    pub(crate) fn open(config: &RdmaConfig, liveness: Liveness) -> Result<Self, TransportError> {
        let mut endpoint = Endpoint::open(
            config.device.as_deref(),
            config.port,
            config.gid_index,
            SEND_WR,
            1,
            MAX_SGE as u32,
        )?;
        let mut record = Box::new([0u8; RECORD_BYTES]);
        // SAFETY: the record buffer is heap memory owned by the writer, which drops
        // the endpoint (and with it the registration) first. The device only reads it,
        // during writes that complete before `transfer` returns.
        let record_key = unsafe { endpoint.register(record.as_mut_ptr(), RECORD_BYTES, 0)? };
        Ok(Self {
            endpoint,
            record,
            record_key,
            psn: random_psn()?,
            ring: None,
            slots: 0,
            slot_bytes: 0,
            next: 0,
            batches: 0,
            timeout: liveness.timeout,
            broken: false,
        })
    }

    /// After the handshake on `stream` accepted `backup`: sends this side's queue
    /// pair, takes the backup's and its ring, and connects.
    pub(crate) fn link(
        &mut self,
        stream: &mut TcpStream,
        backup: &Offer,
    ) -> Result<(), TransportError> {
        Link {
            sender: Sender::Primary,
            address: self.endpoint.address(self.psn),
            ring: None,
        }
        .send(stream)?;
        let theirs = Link::receive(stream, Sender::Backup)?;
        let ring = theirs
            .ring
            .ok_or(TransportError::Protocol("the backup sent no ring".into()))?;
        let needed = u64::from(backup.slots)
            .checked_mul(backup.slot_bytes + RECORD_BYTES as u64)
            .ok_or_else(|| TransportError::Protocol("the backup's ring size overflows".into()))?;
        if ring.len < needed {
            return Err(TransportError::Protocol(format!(
                "the backup's ring is {} bytes, but {} slots of {} bytes and their records need {needed}",
                ring.len, backup.slots, backup.slot_bytes
            )));
        }
        if theirs.address.link_layer != self.endpoint.port().link_layer {
            return Err(TransportError::Protocol(
                "the backup's RDMA port has another link layer (InfiniBand against Ethernet)"
                    .into(),
            ));
        }
        self.endpoint
            .connect(self.psn, &theirs.address, false, true)?;
        self.ring = Some(ring);
        self.slots = u64::from(backup.slots);
        self.slot_bytes = backup.slot_bytes;
        Ok(())
    }

    /// Runs the handshake's RDMA step for a caller that ran [`crate::handshake::connect`]
    /// itself on `stream`: opens the device `config` selects and connects to the
    /// backup that sent `backup`.
    pub fn establish(
        stream: &mut TcpStream,
        config: &crate::TransportConfig,
        backup: &Offer,
    ) -> Result<Self, TransportError> {
        let mut writer = Self::open(&config.rdma, config.liveness)?;
        writer.link(stream, backup)?;
        Ok(writer)
    }

    /// The slot the next commit goes to.
    pub fn next_slot(&self) -> usize {
        (self.next % self.slots.max(1)) as usize
    }

    /// Writes `parts` into the next slot without committing it.
    pub fn write(&mut self, parts: &[&[u8]]) -> Result<(), TransportError> {
        self.transfer(parts, None)
    }

    /// Commits the next slot: writes `record` into its commit record with immediate
    /// data `imm`. The backup takes the record's epoch and length from it.
    pub fn commit(&mut self, record: &[u8; RECORD_BYTES], imm: u32) -> Result<(), TransportError> {
        self.transfer(&[], Some((*record, imm)))
    }

    /// Writes epoch `epoch`'s `parts` into the next slot and commits them, in one
    /// chain of work requests. The caller checked the length against the slot.
    pub(crate) fn send_epoch(&mut self, epoch: u64, parts: &[&[u8]]) -> Result<(), TransportError> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let record = Control::Epoch { epoch, len }.encode();
        self.transfer(parts, Some((record, epoch as u32)))
    }

    fn transfer(
        &mut self,
        parts: &[&[u8]],
        commit: Option<([u8; RECORD_BYTES], u32)>,
    ) -> Result<(), TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        let Some(ring) = self.ring else {
            return Err(TransportError::Broken);
        };
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if len > self.slot_bytes {
            return Err(TransportError::EpochTooLarge {
                epoch: commit.map_or(0, |(r, _)| {
                    u64::from_le_bytes(r[8..16].try_into().unwrap_or_default())
                }),
                len,
                slot_bytes: self.slot_bytes,
            });
        }
        let slot = self.next % self.slots;
        let mut keys = Vec::with_capacity(parts.len());
        let result = self.post_and_wait(parts, commit, slot, ring, len, &mut keys);
        // After deregistering, the device no longer reads the parts (if the wait
        // failed, the queue pair is in the error state already).
        for key in keys {
            self.endpoint.deregister(key);
        }
        match result {
            Ok(()) => {
                if commit.is_some() {
                    self.next += 1;
                }
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                self.endpoint.fail();
                Err(e)
            }
        }
    }

    fn post_and_wait(
        &mut self,
        parts: &[&[u8]],
        commit: Option<([u8; RECORD_BYTES], u32)>,
        slot: u64,
        ring: Ring,
        len: u64,
        keys: &mut Vec<Registration>,
    ) -> Result<(), TransportError> {
        let mut writes: Vec<(Vec<verbs::Sge>, u64)> = Vec::new();
        let mut remote = ring.addr + slot * self.slot_bytes;
        let mut message = 0usize;
        for part in parts.iter().filter(|p| !p.is_empty()) {
            // SAFETY: `part` is borrowed for this call, and its registration ends
            // (in `transfer`) before the call returns; the device only reads it.
            let key = unsafe {
                self.endpoint
                    .register(part.as_ptr().cast_mut(), part.len(), 0)?
            };
            keys.push(key);
            for piece in part.chunks(MAX_MESSAGE) {
                let start_new = match writes.last() {
                    None => true,
                    Some((sges, _)) => sges.len() == MAX_SGE || message + piece.len() > MAX_MESSAGE,
                };
                if start_new {
                    writes.push((Vec::with_capacity(MAX_SGE), remote));
                    message = 0;
                }
                if let Some((sges, _)) = writes.last_mut() {
                    sges.push(verbs::sge(piece, key.lkey));
                }
                message += piece.len();
                remote += piece.len() as u64;
            }
        }
        let imm = commit.map(|(record, imm)| {
            *self.record = record;
            writes.push((
                vec![verbs::sge(&self.record[..], self.record_key.lkey)],
                ring.addr + self.slots * self.slot_bytes + slot * RECORD_BYTES as u64,
            ));
            imm
        });
        let budget =
            self.timeout + Duration::from_secs_f64(len as f64 / MIN_WRITE_BYTES_PER_SEC as f64);
        let deadline = Instant::now() + budget;
        let batches = writes.len().div_ceil(SEND_WR as usize);
        for (i, batch) in writes.chunks_mut(SEND_WR as usize).enumerate() {
            self.batches += 1;
            let wr_id = self.batches;
            let last = i + 1 == batches;
            // SAFETY: every gather entry lies in a part registered above or in the
            // record buffer; both stay registered and unchanged until this batch's
            // signalled completion is polled below, or until `transfer` fails the
            // queue pair and deregisters them.
            unsafe {
                self.endpoint
                    .post_writes(batch, ring.rkey, imm.filter(|_| last), wr_id)?
            };
            self.wait(wr_id, deadline)?;
        }
        Ok(())
    }

    /// Waits for the completion of the signalled request `wr_id`.
    fn wait(&mut self, wr_id: u64, deadline: Instant) -> Result<(), TransportError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::PeerTimeout(self.timeout));
            }
            if let Woken::Completion(wc) = self.endpoint.next(None, left)? {
                if wc.status != 0 {
                    return Err(TransportError::RdmaCompletion {
                        what: "an RDMA write into the backup's ring",
                        status: self.endpoint.status_text(wc.status),
                    });
                }
                if wc.wr_id == wr_id {
                    return Ok(());
                }
            }
        }
    }
}

/// What [`RdmaReceiver::wait_commit`] saw first.
pub(crate) enum Arrival {
    /// An epoch committed into `slot`, declaring `epoch` and `len`.
    Commit { slot: usize, epoch: u64, len: u64 },
    /// A control message on the TCP side channel.
    Message(Control),
}

/// The backup's end of an RDMA link: its ring registered for the primary's writes.
///
/// [`crate::Backup`] uses it for [`crate::Implementation::Rdma`]; it is public so
/// that tools and tests can hold a ring open without serving it.
pub struct RdmaReceiver<'r> {
    // Dropped first: deregisters the ring while it is still borrowed.
    endpoint: Endpoint,
    base: NonNull<u8>,
    ring_len: usize,
    ring_key: Registration,
    records_at: usize,
    slots: u64,
    slot_bytes: usize,
    psn: u32,
    next: u64,
    snapshot: Vec<u8>,
    _region: PhantomData<&'r mut ReceiveRegion>,
}

impl std::fmt::Debug for RdmaReceiver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaReceiver")
            .field("device", &self.endpoint.port().device)
            .field("gid_index", &self.endpoint.gid_index())
            .field("slots", &self.slots)
            .field("next", &self.next)
            .finish()
    }
}

impl<'r> RdmaReceiver<'r> {
    /// Opens the device and registers `region` (slots and commit records) for remote
    /// writes; nothing is connected yet.
    pub(crate) fn new(
        region: &'r mut ReceiveRegion,
        config: &RdmaConfig,
    ) -> Result<Self, TransportError> {
        let slots = region.slots();
        let slot_bytes = region.slot_bytes();
        let records_at = region.records_at();
        let mut endpoint = Endpoint::open(
            config.device.as_deref(),
            config.port,
            config.gid_index,
            1,
            slots as u32,
            1,
        )?;
        let ring = region.ring_mut();
        let ring_len = ring.len();
        let base = NonNull::from(ring).cast::<u8>();
        // SAFETY: the region is exclusively borrowed for 'r and the endpoint (which
        // owns the registration) is dropped within 'r. No Rust reference to the ring
        // is made while it is registered: it is read only by raw copies into memory
        // the receiver owns (`take`, `record`).
        let ring_key = unsafe {
            endpoint.register(
                base.as_ptr(),
                ring_len,
                verbs::ACCESS_LOCAL_WRITE | verbs::ACCESS_REMOTE_WRITE,
            )?
        };
        Ok(Self {
            endpoint,
            base,
            ring_len,
            ring_key,
            records_at,
            slots: slots as u64,
            slot_bytes,
            psn: random_psn()?,
            next: 0,
            snapshot: vec![0; slot_bytes],
            _region: PhantomData,
        })
    }

    /// After the handshake on `stream` authenticated the primary: takes its queue
    /// pair, connects, posts one receive per slot, and only then sends this side's
    /// queue pair and the ring's key.
    pub(crate) fn link(&mut self, stream: &mut TcpStream) -> Result<(), TransportError> {
        let theirs = Link::receive(stream, Sender::Primary)?;
        if theirs.address.link_layer != self.endpoint.port().link_layer {
            return Err(TransportError::Protocol(
                "the primary's RDMA port has another link layer (InfiniBand against Ethernet)"
                    .into(),
            ));
        }
        self.endpoint
            .connect(self.psn, &theirs.address, true, false)?;
        self.endpoint.post_recvs(0..self.slots)?;
        Link {
            sender: Sender::Backup,
            address: self.endpoint.address(self.psn),
            ring: Some(Ring {
                rkey: self.ring_key.rkey,
                addr: self.base.as_ptr() as u64,
                len: self.ring_len as u64,
            }),
        }
        .send(stream)
    }

    /// Runs the handshake's RDMA step for a caller that ran [`crate::handshake::accept`]
    /// itself on `stream`: registers `region` on the device `config` selects and
    /// connects to the primary.
    pub fn establish(
        stream: &mut TcpStream,
        region: &'r mut ReceiveRegion,
        config: &crate::TransportConfig,
    ) -> Result<Self, TransportError> {
        let mut receiver = Self::new(region, &config.rdma)?;
        receiver.link(stream)?;
        Ok(receiver)
    }

    /// Waits for the next commit, reading the side channel's heartbeats meanwhile.
    /// Returns the slot and its record's epoch number and declared length (which the
    /// caller checks against the slot before [`RdmaReceiver::take`]), or a control
    /// message other than a heartbeat that came on the side channel first.
    pub(crate) fn wait_commit(
        &mut self,
        inbound: &mut Inbound,
        stream: &TcpStream,
        liveness: Liveness,
    ) -> Result<Arrival, TransportError> {
        loop {
            let left = inbound.silence_left();
            // Past the limit, one last short look still takes what queued meanwhile.
            let expired = left < Duration::from_micros(100);
            let wait = if expired {
                Duration::from_millis(1)
            } else {
                left.min(liveness.interval)
            };
            match self.endpoint.next(Some(stream.as_raw_fd()), wait)? {
                Woken::Completion(wc) => {
                    inbound.heard();
                    let (slot, epoch, len) = self.commit_of(wc)?;
                    return Ok(Arrival::Commit { slot, epoch, len });
                }
                Woken::Readable => {
                    if let Some(message) = inbound.read_ready()? {
                        return Ok(Arrival::Message(message));
                    }
                }
                Woken::Idle if expired => {
                    return Err(TransportError::PeerTimeout(liveness.timeout));
                }
                Woken::Idle => {}
            }
        }
    }

    fn commit_of(&mut self, wc: verbs::Wc) -> Result<(usize, u64, u64), TransportError> {
        if wc.status != 0 {
            return Err(TransportError::RdmaCompletion {
                what: "receiving the primary's RDMA commit",
                status: self.endpoint.status_text(wc.status),
            });
        }
        if wc.opcode != verbs::WC_RECV_RDMA_WITH_IMM || wc.wc_flags & verbs::WC_WITH_IMM == 0 {
            return Err(TransportError::Protocol(format!(
                "expected an RDMA write with immediate data, got completion opcode {}",
                wc.opcode
            )));
        }
        let slot = (self.next % self.slots) as usize;
        self.next += 1;
        self.endpoint.post_recvs(std::iter::once(self.next))?;
        let record = self.record(slot);
        let (epoch, len) = match Control::decode(&record) {
            Ok(Control::Epoch { epoch, len }) => (epoch, len),
            Ok(other) => {
                return Err(TransportError::Protocol(format!(
                    "the commit record of slot {slot} holds {other:?}, not an epoch"
                )));
            }
            Err(e) => {
                return Err(TransportError::Protocol(format!(
                    "the commit record of slot {slot} is invalid ({e})"
                )));
            }
        };
        let imm = u32::from_be(wc.imm_data);
        if imm != epoch as u32 {
            return Err(TransportError::Protocol(format!(
                "the commit of slot {slot} carries immediate data {imm}, but its record names epoch {epoch}"
            )));
        }
        Ok((slot, epoch, len))
    }

    fn record(&self, slot: usize) -> [u8; RECORD_BYTES] {
        let mut record = [0u8; RECORD_BYTES];
        let at = self.records_at + slot * RECORD_BYTES;
        debug_assert!(at + RECORD_BYTES <= self.ring_len);
        // SAFETY: `at..at + RECORD_BYTES` lies in the ring (slot < slots), which is
        // mapped for 'r. The bytes are copied raw into a private array; if the primary's
        // device writes them meanwhile, the copy may mix old and new bytes, which the
        // record's checksum rejects.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(at),
                record.as_mut_ptr(),
                RECORD_BYTES,
            )
        };
        record
    }

    /// Copies the first `len` bytes of `slot` (checked: at most a slot) out of the
    /// ring, and returns them: the applier validates and applies this copy, which
    /// nothing but this receiver can change.
    pub(crate) fn take(&mut self, slot: usize, len: usize) -> &[u8] {
        let len = len.min(self.slot_bytes);
        let at = (slot % self.slots as usize) * self.slot_bytes;
        // SAFETY: `at..at + len` lies in the slots part of the ring (slot < slots,
        // len <= slot_bytes), mapped for 'r; `snapshot` holds slot_bytes bytes and is
        // not the ring. A concurrent write by the primary's device (only a faulty or
        // hostile primary writes a slot before its answer) can make the copy mix old
        // and new bytes, which validation refuses.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(at),
                self.snapshot.as_mut_ptr(),
                len,
            )
        };
        &self.snapshot[..len]
    }

    /// The bytes last taken.
    pub(crate) fn taken(&self, len: usize) -> &[u8] {
        &self.snapshot[..len.min(self.slot_bytes)]
    }
}
