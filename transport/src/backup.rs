//! The backup's end: receives epochs into its region's slots, answers each.

use std::net::TcpStream;
use std::ops::Range;

use fgbi_engine::{AppliedEpoch, Applier, ApplyError, memory_digest};

use crate::config::{Implementation, Liveness, TransportConfig};
use crate::control::{
    CONTROL_BYTES, Control, Inbound, NackReason, SCRUB_CHUNK_BYTES, SCRUB_MAX_CHUNKS,
};
use crate::error::TransportError;
use crate::handshake::{self, Offer, PresharedKey, Role};
use crate::heartbeat::Outbound;
use crate::rdma::{Arrival, RdmaReceiver};
use crate::region::ReceiveRegion;
use crate::uring::UringReceiver;

/// One epoch received whole into its slot, awaiting [`Backup::ack`] or [`Backup::nack`].
#[derive(Debug)]
pub struct Received<'a> {
    /// The epoch number the primary declared (the epoch's header must agree; the
    /// applier checks it).
    pub epoch: u64,
    /// The epoch's bytes, in the receive region.
    pub bytes: &'a [u8],
}

/// What [`Backup::serve_one`] did with an epoch.
#[derive(Debug)]
pub enum Served {
    /// Applied, committed and acknowledged.
    Committed(AppliedEpoch),
    /// Refused by the applier (the replica is unchanged) and answered with a NACK.
    Refused {
        /// The epoch refused.
        epoch: u64,
        /// Why the applier refused it.
        error: ApplyError,
    },
    /// The primary asked to compare chunks of the replica (at its committed epoch)
    /// with its checkpoint's; the answer has been sent. The primary repairs.
    Scrubbed {
        /// The replica's committed epoch.
        epoch: u64,
        /// First chunk compared ([`crate::control::SCRUB_CHUNK_BYTES`] each).
        first: u64,
        /// Chunks compared.
        count: u64,
        /// Chunks that differ, as indices into memory's chunks.
        mismatched: Vec<u64>,
    },
}

/// What came next from the primary.
enum Next {
    Epoch(u64, Range<usize>),
    Scrub { first: u64, count: u64 },
}

enum Payload<'r> {
    Std(&'r mut ReceiveRegion),
    Uring(Box<UringReceiver<'r>>),
    Rdma(Box<RdmaReceiver<'r>>),
}

impl Payload<'_> {
    fn bytes(&self, range: Range<usize>) -> &[u8] {
        match self {
            Payload::Std(region) => &region.bytes()[range],
            Payload::Uring(receiver) => receiver.bytes(range),
            Payload::Rdma(receiver) => receiver.taken(range.end),
        }
    }
}

/// A connected, authenticated backup, receiving into a borrowed [`ReceiveRegion`].
///
/// Call [`Backup::recv_epoch`], apply the bytes, then [`Backup::ack`] or
/// [`Backup::nack`] (or let [`Backup::serve_one`] do all three). Any error breaks the
/// connection except calling these out of order; the replica stays at its last
/// committed epoch, and the next connection is accepted with that epoch.
pub struct Backup<'r> {
    inbound: Inbound,
    outbound: Outbound,
    stream: TcpStream,
    payload: Payload<'r>,
    slot_bytes: usize,
    pending: Option<u64>,
    liveness: Liveness,
    broken: bool,
}

impl std::fmt::Debug for Backup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup")
            .field(
                "implementation",
                &match self.payload {
                    Payload::Std(_) => "std",
                    Payload::Uring(_) => "io_uring",
                    Payload::Rdma(_) => "rdma",
                },
            )
            .field("slot_bytes", &self.slot_bytes)
            .field("pending", &self.pending)
            .field("broken", &self.broken)
            .finish()
    }
}

impl<'r> Backup<'r> {
    /// Runs the handshake on `stream` (accepted from a primary), announcing the
    /// replica's `committed` epoch, then starts heartbeats. No byte reaches `region`
    /// before the primary has been authenticated; with RDMA, the ring's key is sent
    /// to the primary only after that.
    pub fn accept(
        mut stream: TcpStream,
        region: &'r mut ReceiveRegion,
        config: &TransportConfig,
        key: &PresharedKey,
        committed: u64,
    ) -> Result<Self, TransportError> {
        config.validate()?;
        let (slots, slot_bytes) = (region.slots(), region.slot_bytes());
        let mut payload = match config.implementation {
            Implementation::Std => Payload::Std(region),
            Implementation::Uring => {
                Payload::Uring(Box::new(UringReceiver::new(region, committed)?))
            }
            Implementation::Rdma => {
                Payload::Rdma(Box::new(RdmaReceiver::new(region, &config.rdma)?))
            }
        };
        let io = |what| move |source| TransportError::Io { what, source };
        stream
            .set_nodelay(true)
            .map_err(io("disabling Nagle's algorithm"))?;
        let offer = Offer::ours(
            Role::Backup,
            &config.geometry,
            slots as u32,
            slot_bytes as u64,
            committed,
        );
        handshake::accept(&mut stream, &offer, key, config.handshake_timeout)?;
        if let Payload::Rdma(receiver) = &mut payload {
            receiver.link(&mut stream)?;
        }
        let reader = stream.try_clone().map_err(io("cloning the socket"))?;
        let writer = stream.try_clone().map_err(io("cloning the socket"))?;
        Ok(Self {
            inbound: Inbound::new(reader, config.liveness),
            outbound: Outbound::start(writer, config.liveness)?,
            stream,
            payload,
            slot_bytes,
            pending: None,
            liveness: config.liveness,
            broken: false,
        })
    }

    /// Waits for the next epoch and receives it whole into its slot.
    ///
    /// Heartbeats are consumed while waiting. A declared length larger than a slot is
    /// answered with a NACK and breaks the connection before any payload is read.
    pub fn recv_epoch(&mut self) -> Result<Received<'_>, TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        if let Some(epoch) = self.pending {
            return Err(TransportError::Unanswered(epoch));
        }
        match self.receive() {
            Ok(Next::Scrub { .. }) => {
                self.broken = true;
                Err(TransportError::Protocol(
                    "the primary sent a scrub request: serve it with Backup::serve_one".into(),
                ))
            }
            Ok(Next::Epoch(epoch, range)) => {
                self.pending = Some(epoch);
                Ok(Received {
                    epoch,
                    bytes: self.payload.bytes(range),
                })
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    fn receive(&mut self) -> Result<Next, TransportError> {
        let message = match &mut self.payload {
            Payload::Rdma(receiver) => {
                match receiver.wait_commit(&mut self.inbound, &self.stream, self.liveness)? {
                    Arrival::Commit { slot, epoch, len } => {
                        check_declared(&self.outbound, epoch, len, self.slot_bytes)?;
                        receiver.take(slot, len as usize);
                        return Ok(Next::Epoch(epoch, 0..len as usize));
                    }
                    Arrival::Message(message) => message,
                }
            }
            _ => self.next_control()?,
        };
        let (epoch, len) = match message {
            Control::Epoch { epoch, len } => (epoch, len),
            Control::Scrub { first, count } => return Ok(Next::Scrub { first, count }),
            other => {
                return Err(TransportError::Protocol(format!(
                    "expected an epoch, got {other:?}"
                )));
            }
        };
        check_declared(&self.outbound, epoch, len, self.slot_bytes)?;
        let timeout = self.liveness.timeout;
        // The primary sends EPOCH, payload and COMMIT under one lock: the message
        // right after the payload must be that COMMIT.
        let (commit, range) = match &mut self.payload {
            Payload::Std(region) => {
                let range = region.range(epoch, len as usize);
                self.inbound
                    .read_exact(&mut region.bytes_mut()[range.clone()])?;
                let mut message = [0; CONTROL_BYTES];
                self.inbound.read_exact(&mut message)?;
                (message, range)
            }
            Payload::Uring(receiver) => receiver.read_payload_and_message(
                &self.stream,
                epoch,
                len as usize,
                &mut self.inbound,
                timeout,
            )?,
            Payload::Rdma(_) => {
                return Err(TransportError::Protocol(
                    "an RDMA backup takes no payload from the TCP connection".into(),
                ));
            }
        };
        match Control::decode(&commit)? {
            Control::Commit { epoch: c } if c == epoch => Ok(Next::Epoch(epoch, range)),
            other => Err(TransportError::Protocol(format!(
                "expected the commit of epoch {epoch}, got {other:?}"
            ))),
        }
    }

    /// The next control message other than a heartbeat, through the io_uring
    /// receiver when there is one (it may hold bytes already received).
    fn next_control(&mut self) -> Result<Control, TransportError> {
        match &mut self.payload {
            Payload::Uring(receiver) => loop {
                let m = receiver.next_message(
                    &self.stream,
                    &mut self.inbound,
                    self.liveness.timeout,
                )?;
                if let Some(message) = self.inbound.accept(&m)? {
                    return Ok(message);
                }
            },
            _ => self.inbound.next_message(None),
        }
    }

    fn answer(&mut self, epoch: u64, message: Control) -> Result<(), TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        match self.pending {
            Some(pending) if pending == epoch => {}
            pending => {
                return Err(TransportError::NotPending { epoch, pending });
            }
        }
        self.pending = None;
        self.outbound
            .send(&message)
            .inspect_err(|_| self.broken = true)
    }

    /// Tells the primary that `epoch` (the one received) is committed.
    pub fn ack(&mut self, epoch: u64) -> Result<(), TransportError> {
        self.answer(epoch, Control::Ack { epoch })
    }

    /// Tells the primary that `epoch` (the one received) was refused.
    pub fn nack(&mut self, epoch: u64, reason: NackReason) -> Result<(), TransportError> {
        self.answer(epoch, Control::Nack { epoch, reason })
    }

    /// Receives one epoch, applies it to `replica` with `applier`, and answers it:
    /// ACK if it committed, NACK if the applier refused it.
    ///
    /// A scrub request that comes instead of an epoch is served too: each chunk's
    /// digest is compared with the replica's as it arrives, and the chunks that
    /// differ are named in the answer.
    pub fn serve_one(
        &mut self,
        applier: &mut Applier,
        replica: &mut [u8],
    ) -> Result<Served, TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        if let Some(epoch) = self.pending {
            return Err(TransportError::Unanswered(epoch));
        }
        let next = self.receive().inspect_err(|_| self.broken = true)?;
        let (epoch, range) = match next {
            Next::Scrub { first, count } => {
                return self
                    .scrub(first, count, applier.committed(), replica)
                    .inspect_err(|_| self.broken = true);
            }
            Next::Epoch(epoch, range) => {
                self.pending = Some(epoch);
                (epoch, range)
            }
        };
        let received = Received {
            epoch,
            bytes: self.payload.bytes(range),
        };
        match applier.apply(replica, received.bytes) {
            Ok(applied) => {
                self.ack(epoch)?;
                Ok(Served::Committed(applied))
            }
            Err(error) => {
                let reason = match error {
                    ApplyError::Sequence { .. } => NackReason::OutOfSequence,
                    _ => NackReason::Invalid,
                };
                self.nack(epoch, reason)?;
                Ok(Served::Refused { epoch, error })
            }
        }
    }
}

impl Backup<'_> {
    /// Compares chunks `first..first + count` of `replica` (at `epoch`) with the
    /// digests that follow, and answers with the mask of those that differ.
    fn scrub(
        &mut self,
        first: u64,
        count: u64,
        epoch: u64,
        replica: &[u8],
    ) -> Result<Served, TransportError> {
        let chunks = replica.len().div_ceil(SCRUB_CHUNK_BYTES) as u64;
        if count > SCRUB_MAX_CHUNKS || first.checked_add(count).is_none_or(|end| end > chunks) {
            return Err(TransportError::Protocol(format!(
                "a scrub of chunks {first}+{count}; the replica has {chunks}"
            )));
        }
        let mut mask = 0u64;
        for i in 0..count {
            let theirs = match self.next_control()? {
                Control::ScrubDigest { low, high } => u128::from(low) | (u128::from(high) << 64),
                other => {
                    return Err(TransportError::Protocol(format!(
                        "expected a scrub digest, got {other:?}"
                    )));
                }
            };
            let start = (first + i) as usize * SCRUB_CHUNK_BYTES;
            let end = (start + SCRUB_CHUNK_BYTES).min(replica.len());
            if memory_digest(&replica[start..end]) != theirs {
                mask |= 1 << i;
            }
        }
        self.outbound.send(&Control::ScrubResult {
            epoch,
            mismatched: mask,
        })?;
        Ok(Served::Scrubbed {
            epoch,
            first,
            count,
            mismatched: (0..count)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| first + i)
                .collect(),
        })
    }
}

/// Refuses epoch 0, and a declared length of 0 or more than a slot (with a NACK,
/// before any payload byte is looked at); either breaks the connection.
fn check_declared(
    outbound: &Outbound,
    epoch: u64,
    len: u64,
    slot_bytes: usize,
) -> Result<(), TransportError> {
    if epoch == 0 {
        return Err(TransportError::Protocol("epoch 0 declared".into()));
    }
    if len == 0 || len > slot_bytes as u64 {
        // Best effort: the connection is being closed either way.
        let _ = outbound.send(&Control::Nack {
            epoch,
            reason: NackReason::Invalid,
        });
        return Err(TransportError::Protocol(format!(
            "epoch {epoch} declared {len} bytes, a slot holds 1 to {slot_bytes}"
        )));
    }
    Ok(())
}
