//! The primary's end: sends epochs into the backup's slots and collects replies.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use fgbi_engine::EncodedEpoch;

use crate::config::{Implementation, Liveness, TransportConfig};
use crate::control::{CONTROL_BYTES, Control, Inbound, NackReason};
use crate::error::TransportError;
use crate::handshake::{self, Offer, PresharedKey, Role};
use crate::heartbeat::Outbound;
use crate::rdma::RdmaWriter;
use crate::uring::UringSender;

/// The backup's answer to one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The backup validated, applied and committed the epoch.
    Committed(u64),
    /// The backup refused the epoch; its replica did not change.
    Refused {
        /// The epoch refused.
        epoch: u64,
        /// Why.
        reason: NackReason,
    },
}

enum Sender {
    Std,
    Uring(Box<UringSender>),
    Rdma(Box<RdmaWriter>),
}

/// A connected, authenticated primary.
///
/// Epochs may be sent before earlier ones are answered, up to one per receive slot;
/// the backup answers them in order. Any error other than a reply timeout or a
/// refused call breaks the connection: reconnect, lose the epochs in flight
/// ([`fgbi_engine::Encoder::lose`]) and re-send.
pub struct Primary {
    inbound: Inbound,
    outbound: Outbound,
    sender: Sender,
    backup: Offer,
    in_flight: VecDeque<u64>,
    liveness: Liveness,
    broken: bool,
}

impl Primary {
    /// Runs the handshake on `stream` (connected to a backup) and starts heartbeats.
    pub fn connect(
        mut stream: TcpStream,
        config: &TransportConfig,
        key: &PresharedKey,
    ) -> Result<Self, TransportError> {
        config.validate()?;
        let mut sender = match config.implementation {
            Implementation::Std => Sender::Std,
            Implementation::Uring => Sender::Uring(Box::new(UringSender::new()?)),
            Implementation::Rdma => {
                Sender::Rdma(Box::new(RdmaWriter::open(&config.rdma, config.liveness)?))
            }
        };
        let io = |what| move |source| TransportError::Io { what, source };
        stream
            .set_nodelay(true)
            .map_err(io("disabling Nagle's algorithm"))?;
        let offer = Offer::ours(Role::Primary, &config.geometry, 0, 0, 0);
        let backup = handshake::connect(&mut stream, &offer, key, config.handshake_timeout)?;
        if let Sender::Rdma(writer) = &mut sender {
            writer.link(&mut stream, &backup)?;
        }
        let writer = stream.try_clone().map_err(io("cloning the socket"))?;
        Ok(Self {
            inbound: Inbound::new(stream, config.liveness),
            outbound: Outbound::start(writer, config.liveness)?,
            sender,
            backup,
            in_flight: VecDeque::new(),
            liveness: config.liveness,
            broken: false,
        })
    }

    /// The epoch the backup's replica had committed when it accepted this connection:
    /// acknowledge up to it, and lose every later epoch in flight, before sending.
    pub fn backup_committed(&self) -> u64 {
        self.backup.committed
    }

    /// The largest epoch the backup accepts, in bytes.
    pub fn slot_bytes(&self) -> u64 {
        self.backup.slot_bytes
    }

    /// How many epochs may await a reply at once.
    pub fn slots(&self) -> usize {
        self.backup.slots as usize
    }

    /// Sends `epoch` into its slot, its parts straight from the encoder (no
    /// concatenation), followed by its COMMIT. An epoch larger than a slot is refused
    /// before any byte is sent. With RDMA, this returns once the backup's device has
    /// placed the epoch and its commit in the ring.
    pub fn send_epoch(&mut self, epoch: &EncodedEpoch<'_>) -> Result<(), TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        let number = epoch.stats.epoch;
        let len = epoch.len() as u64;
        if len > self.backup.slot_bytes {
            return Err(TransportError::EpochTooLarge {
                epoch: number,
                len,
                slot_bytes: self.backup.slot_bytes,
            });
        }
        if self.in_flight.len() >= self.slots() {
            return Err(TransportError::WindowFull(self.slots()));
        }
        if let Sender::Rdma(writer) = &mut self.sender {
            let parts: Vec<&[u8]> = epoch.parts().collect();
            writer
                .send_epoch(number, &parts)
                .inspect_err(|_| self.broken = true)?;
            self.in_flight.push_back(number);
            return Ok(());
        }
        let head = Control::Epoch { epoch: number, len }.encode();
        let tail = Control::Commit { epoch: number }.encode();
        let mut slices: Vec<IoSlice<'_>> = std::iter::once(&head[..])
            .chain(epoch.parts())
            .chain(std::iter::once(&tail[..]))
            .map(IoSlice::new)
            .collect();
        let timeout = self.liveness.timeout;
        let writer = self.outbound.lock();
        let sent = match &mut self.sender {
            Sender::Std => write_all_vectored(&writer, &mut slices, timeout),
            Sender::Uring(uring) => uring.send_all(&writer, &mut slices, timeout),
            Sender::Rdma(_) => Err(TransportError::Broken),
        };
        drop(writer);
        if let Err(e) = sent {
            self.broken = true;
            return Err(e);
        }
        self.in_flight.push_back(number);
        Ok(())
    }

    /// Sends `epoch`'s announcement and only its first `keep` bytes (never its
    /// COMMIT), and returns once those bytes reached the backup (TCP: the kernel
    /// holds none of them unacknowledged; RDMA: the write completed): what a primary
    /// that dies in the middle of a transfer leaves its backup. For failure tests
    /// (`FGBI_FAULT=transfer@N`); the connection is unusable afterwards.
    pub fn send_epoch_prefix(
        &mut self,
        epoch: &EncodedEpoch<'_>,
        keep: usize,
    ) -> Result<(), TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        self.broken = true;
        let mut left = keep.min(epoch.len());
        let prefix: Vec<&[u8]> = epoch
            .parts()
            .map(|part| {
                let take = part.len().min(left);
                left -= take;
                &part[..take]
            })
            .filter(|part| !part.is_empty())
            .collect();
        if let Sender::Rdma(writer) = &mut self.sender {
            return writer.write(&prefix);
        }
        let len = epoch.len() as u64;
        let head = Control::Epoch {
            epoch: epoch.stats.epoch,
            len,
        }
        .encode();
        let mut slices: Vec<IoSlice<'_>> = std::iter::once(&head[..])
            .chain(prefix)
            .map(IoSlice::new)
            .collect();
        let timeout = self.liveness.timeout;
        let writer = self.outbound.lock();
        write_all_vectored(&writer, &mut slices, timeout)?;
        let deadline = Instant::now() + timeout;
        while unacknowledged_bytes(&writer)? > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the backup's answer to the oldest epoch in flight.
    pub fn wait_reply(&mut self, timeout: Duration) -> Result<Reply, TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        let Some(&expected) = self.in_flight.front() else {
            return Err(TransportError::NothingInFlight);
        };
        let deadline = Some((Instant::now() + timeout, timeout));
        let reply = match self.inbound.next_message(deadline) {
            Ok(Control::Ack { epoch }) if epoch == expected => Reply::Committed(epoch),
            Ok(Control::Nack { epoch, reason }) if epoch == expected => {
                Reply::Refused { epoch, reason }
            }
            Ok(other) => {
                self.broken = true;
                return Err(TransportError::Protocol(format!(
                    "expected the reply to epoch {expected}, got {other:?}"
                )));
            }
            Err(e) => {
                self.broken |= e.breaks_connection();
                return Err(e);
            }
        };
        self.in_flight.pop_front();
        Ok(reply)
    }
}

impl Primary {
    /// Asks the backup to compare its replica, at its committed epoch, with
    /// `digests`: the xxh3-128 digests of chunks `first..` ([`crate::SCRUB_CHUNK_BYTES`]
    /// each, at most [`crate::SCRUB_MAX_CHUNKS`]) of the checkpoint it should equal. Only
    /// with no epoch in flight. Returns the backup's committed epoch and the mask of
    /// chunks that differ (bit i: chunk `first + i`).
    pub fn scrub(
        &mut self,
        first: u64,
        digests: &[u128],
        timeout: Duration,
    ) -> Result<(u64, u64), TransportError> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        if !self.in_flight.is_empty() {
            return Err(TransportError::Protocol(
                "a scrub needs every epoch answered first".into(),
            ));
        }
        let count = digests.len() as u64;
        // Decoding our own request refuses a count the backup would refuse.
        Control::decode(&Control::Scrub { first, count }.encode())?;
        let mut messages = Vec::with_capacity((digests.len() + 1) * CONTROL_BYTES);
        messages.extend_from_slice(&Control::Scrub { first, count }.encode());
        for &d in digests {
            let (low, high) = (d as u64, (d >> 64) as u64);
            messages.extend_from_slice(&Control::ScrubDigest { low, high }.encode());
        }
        let writer = self.outbound.lock();
        let sent = write_all_vectored(
            &writer,
            &mut [IoSlice::new(&messages)],
            self.liveness.timeout,
        );
        drop(writer);
        sent.inspect_err(|_| self.broken = true)?;
        let deadline = Some((Instant::now() + timeout, timeout));
        match self.inbound.next_message(deadline) {
            Ok(Control::ScrubResult { epoch, mismatched }) => Ok((epoch, mismatched)),
            Ok(other) => {
                self.broken = true;
                Err(TransportError::Protocol(format!(
                    "expected a scrub result, got {other:?}"
                )))
            }
            Err(e) => {
                // A late result would be taken for an epoch's reply.
                self.broken = true;
                Err(e)
            }
        }
    }
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field(
                "implementation",
                &match self.sender {
                    Sender::Std => "std",
                    Sender::Uring(_) => "io_uring",
                    Sender::Rdma(_) => "rdma",
                },
            )
            .field("backup", &self.backup)
            .field("in_flight", &self.in_flight)
            .field("broken", &self.broken)
            .finish()
    }
}

/// Bytes written to `stream` that the peer has not yet acknowledged.
fn unacknowledged_bytes(stream: &TcpStream) -> Result<usize, TransportError> {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points to a live
    // c_int; the descriptor is the open socket `stream` owns.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc < 0 {
        return Err(TransportError::Io {
            what: "reading the socket's send queue",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(usize::try_from(queued).unwrap_or(0))
}

/// Writes every byte of `slices` with `writev`, resuming after short writes.
fn write_all_vectored(
    mut stream: &TcpStream,
    mut slices: &mut [IoSlice<'_>],
    timeout: Duration,
) -> Result<(), TransportError> {
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(TransportError::PeerClosed("")),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransportError::from_io("sending an epoch", e, timeout)),
        }
    }
    Ok(())
}
