//! Control messages after the handshake, and the reading side of a connection.
//!
//! Every control message is [`CONTROL_BYTES`] long: kind (1 byte), code (1), six
//! zero bytes, two little-endian u64 fields, and an xxh3-64 checksum of the first
//! 24 bytes. An EPOCH message is followed by its payload; nothing else carries a
//! body, so the stream can never be made to buffer more than one slot. A scrub is a
//! SCRUB message followed by at most [`SCRUB_MAX_CHUNKS`] SCRUB-DIGEST messages,
//! each compared as it arrives, answered by one SCRUB-RESULT.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::config::Liveness;
use crate::error::TransportError;

/// Bytes in every control message.
pub const CONTROL_BYTES: usize = 32;

/// Bytes of memory one scrub digest covers (the last chunk of memory may be shorter).
pub const SCRUB_CHUNK_BYTES: usize = 64 << 10;

/// Most chunks one scrub compares: the result names the mismatches in a 64-bit mask.
pub const SCRUB_MAX_CHUNKS: u64 = 64;

/// Seeds the control checksum so that it differs from the wire format's frame checksums.
const CHECKSUM_SEED: u64 = u64::from_le_bytes(*b"FGBTctl1");

/// Heartbeats a peer may send beyond one per interval before it counts as flooding.
const HEARTBEAT_BURST: u64 = 64;

/// Why the backup refused an epoch, as sent in a NACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NackReason {
    /// The epoch failed validation (checksums, structure, geometry).
    Invalid,
    /// The epoch's base is not the replica's committed epoch.
    OutOfSequence,
    /// A code this version does not know.
    Unknown(u8),
}

impl NackReason {
    fn code(self) -> u8 {
        match self {
            NackReason::Invalid => 1,
            NackReason::OutOfSequence => 2,
            NackReason::Unknown(code) => code,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            1 => NackReason::Invalid,
            2 => NackReason::OutOfSequence,
            code => NackReason::Unknown(code),
        }
    }
}

/// One control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    /// An epoch of `len` payload bytes follows.
    Epoch { epoch: u64, len: u64 },
    /// The payload of `epoch` is complete.
    Commit { epoch: u64 },
    /// The backup committed `epoch`.
    Ack { epoch: u64 },
    /// The backup refused `epoch`.
    Nack { epoch: u64, reason: NackReason },
    /// The sender is alive; `time` is its clock (ns since the Unix epoch), for logs.
    Heartbeat { time: u64 },
    /// Compare the replica's chunks `first..first + count` at its committed epoch;
    /// `count` SCRUB-DIGEST messages follow, one per chunk in order.
    Scrub { first: u64, count: u64 },
    /// The xxh3-128 digest (low, high halves) of the next chunk of a scrub.
    ScrubDigest { low: u64, high: u64 },
    /// The replica at `epoch` differs in the chunks of the scrub whose bits are set
    /// in `mismatched` (bit i: chunk `first + i`).
    ScrubResult { epoch: u64, mismatched: u64 },
}

impl Control {
    pub(crate) fn encode(&self) -> [u8; CONTROL_BYTES] {
        let (kind, code, a, b) = match *self {
            Control::Epoch { epoch, len } => (1, 0, epoch, len),
            Control::Commit { epoch } => (2, 0, epoch, 0),
            Control::Ack { epoch } => (3, 0, epoch, 0),
            Control::Nack { epoch, reason } => (4, reason.code(), epoch, 0),
            Control::Heartbeat { time } => (5, 0, time, 0),
            Control::Scrub { first, count } => (6, 0, first, count),
            Control::ScrubDigest { low, high } => (7, 0, low, high),
            Control::ScrubResult { epoch, mismatched } => (8, 0, epoch, mismatched),
        };
        let mut m = [0; CONTROL_BYTES];
        m[0] = kind;
        m[1] = code;
        m[8..16].copy_from_slice(&a.to_le_bytes());
        m[16..24].copy_from_slice(&b.to_le_bytes());
        let sum = xxh3_64_with_seed(&m[..24], CHECKSUM_SEED);
        m[24..].copy_from_slice(&sum.to_le_bytes());
        m
    }

    pub(crate) fn decode(m: &[u8; CONTROL_BYTES]) -> Result<Self, TransportError> {
        let field = |at: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&m[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if field(24) != xxh3_64_with_seed(&m[..24], CHECKSUM_SEED) {
            if m[..4] == crate::rdma::LINK_MAGIC {
                return Err(TransportError::Protocol(
                    "the peer uses the RDMA transport and this side TCP: start both sides with the same --transport".into(),
                ));
            }
            return Err(TransportError::Protocol(
                "a control message failed its checksum".into(),
            ));
        }
        if m[2..8] != [0; 6] || (m[0] != 4 && m[1] != 0) {
            return Err(TransportError::Protocol(
                "a control message has non-zero reserved bytes".into(),
            ));
        }
        let (a, b) = (field(8), field(16));
        if !matches!(m[0], 1 | 6 | 7 | 8) && b != 0 {
            return Err(TransportError::Protocol(
                "a control message has a non-zero unused field".into(),
            ));
        }
        Ok(match m[0] {
            1 => Control::Epoch { epoch: a, len: b },
            2 => Control::Commit { epoch: a },
            3 => Control::Ack { epoch: a },
            4 => Control::Nack {
                epoch: a,
                reason: NackReason::from_code(m[1]),
            },
            5 => Control::Heartbeat { time: a },
            6 if (1..=SCRUB_MAX_CHUNKS).contains(&b) => Control::Scrub { first: a, count: b },
            6 => {
                return Err(TransportError::Protocol(format!(
                    "a scrub of {b} chunks: 1 to {SCRUB_MAX_CHUNKS} are allowed"
                )));
            }
            7 => Control::ScrubDigest { low: a, high: b },
            8 => Control::ScrubResult {
                epoch: a,
                mismatched: b,
            },
            kind => {
                return Err(TransportError::Protocol(format!(
                    "unknown control message kind {kind}"
                )));
            }
        })
    }

    /// A heartbeat stamped with the current time.
    pub(crate) fn heartbeat() -> Self {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Control::Heartbeat { time }
    }
}

/// The reading side of a connection: liveness accounting, control messages and
/// payload bytes.
///
/// The socket's receive timeout is the heartbeat interval (shorter near a deadline),
/// so a blocked read wakes at least once per interval; deadlines are then exact.
pub(crate) struct Inbound {
    stream: TcpStream,
    liveness: Liveness,
    started: Instant,
    last_heard: Instant,
    socket_timeout: Option<Duration>,
    buf: [u8; CONTROL_BYTES],
    filled: usize,
    heartbeats: u64,
}

impl Inbound {
    /// Reads from `stream` (a handle of its own) under `liveness`.
    pub(crate) fn new(stream: TcpStream, liveness: Liveness) -> Self {
        let now = Instant::now();
        Self {
            stream,
            liveness,
            started: now,
            last_heard: now,
            socket_timeout: None,
            buf: [0; CONTROL_BYTES],
            filled: 0,
            heartbeats: 0,
        }
    }

    /// Records that the peer was just heard from by another path (io_uring reads).
    pub(crate) fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// How long the peer may still stay silent.
    pub(crate) fn silence_left(&self) -> Duration {
        (self.last_heard + self.liveness.timeout).saturating_duration_since(Instant::now())
    }

    /// How long a wait for the peer may last before liveness is checked again: the
    /// silence left, at most one heartbeat interval, and at least 1 ms (past the
    /// limit, one last short wait still takes bytes that queued meanwhile).
    pub(crate) fn wait_slice(&self) -> Duration {
        self.silence_left()
            .min(self.liveness.interval)
            .max(Duration::from_millis(1))
    }

    /// Reads at least one byte into `buf`, waiting no later than `deadline` (the
    /// caller's, with its timeout for the error) or the peer's silence limit.
    fn read_some(
        &mut self,
        buf: &mut [u8],
        deadline: Option<(Instant, Duration)>,
    ) -> Result<usize, TransportError> {
        loop {
            let now = Instant::now();
            let silent_until = self.last_heard + self.liveness.timeout;
            let (until, caller) = match deadline {
                Some((d, timeout)) if d < silent_until => (d, Some(timeout)),
                _ => (silent_until, None),
            };
            let left = until.saturating_duration_since(now);
            // Past the deadline, one last short read still takes bytes that queued
            // while this side was busy elsewhere.
            let expired = left < Duration::from_micros(100);
            let wait = Some(if expired {
                Duration::from_millis(1)
            } else {
                left.min(self.liveness.interval)
            });
            if wait != self.socket_timeout {
                self.stream
                    .set_read_timeout(wait)
                    .map_err(|source| TransportError::Io {
                        what: "setting the socket's receive timeout",
                        source,
                    })?;
                self.socket_timeout = wait;
            }
            match self.stream.read(buf) {
                Ok(0) => return Err(TransportError::PeerClosed("")),
                Ok(n) => {
                    self.last_heard = Instant::now();
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if expired {
                        return Err(match caller {
                            Some(timeout) => TransportError::ReplyTimeout(timeout),
                            None => TransportError::PeerTimeout(self.liveness.timeout),
                        });
                    }
                }
                Err(e) => {
                    return Err(TransportError::from_io(
                        "reading from the peer",
                        e,
                        self.liveness.timeout,
                    ));
                }
            }
        }
    }

    /// After the socket polled readable: takes what one read returns and the control
    /// message it completes, if any (heartbeats are consumed, `None` returned).
    pub(crate) fn read_ready(&mut self) -> Result<Option<Control>, TransportError> {
        let mut buf = self.buf;
        let read = self.stream.read(&mut buf[self.filled..]);
        self.buf = buf;
        match read {
            Ok(0) => return Err(TransportError::PeerClosed("")),
            Ok(n) => {
                self.last_heard = Instant::now();
                self.filled += n;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(None);
            }
            Err(e) => {
                return Err(TransportError::from_io(
                    "reading from the peer",
                    e,
                    self.liveness.timeout,
                ));
            }
        }
        if self.filled < CONTROL_BYTES {
            return Ok(None);
        }
        self.filled = 0;
        let buf = self.buf;
        self.accept(&buf)
    }

    /// Decodes a control message received by any path: a heartbeat is counted (a
    /// peer sending far more than one per interval is refused) and yields `None`.
    pub(crate) fn accept(
        &mut self,
        message: &[u8; CONTROL_BYTES],
    ) -> Result<Option<Control>, TransportError> {
        match Control::decode(message)? {
            Control::Heartbeat { .. } => self.count_heartbeat().map(|()| None),
            message => Ok(Some(message)),
        }
    }

    /// Fills `buf` with payload bytes.
    pub(crate) fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), TransportError> {
        while !buf.is_empty() {
            let n = self.read_some(buf, None).map_err(mid_epoch)?;
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// The next control message other than a heartbeat (heartbeats are consumed and
    /// counted by [`Inbound::accept`]).
    pub(crate) fn next_message(
        &mut self,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<Control, TransportError> {
        loop {
            while self.filled < CONTROL_BYTES {
                let mut buf = self.buf;
                let n = self.read_some(&mut buf[self.filled..], deadline);
                self.buf = buf;
                self.filled += n?;
            }
            self.filled = 0;
            let buf = self.buf;
            if let Some(message) = self.accept(&buf)? {
                return Ok(message);
            }
        }
    }

    fn count_heartbeat(&mut self) -> Result<(), TransportError> {
        self.heartbeats += 1;
        let elapsed = self.started.elapsed();
        let expected = (elapsed.as_nanos() / self.liveness.interval.as_nanos().max(1)) as u64;
        if self.heartbeats > HEARTBEAT_BURST + 2 * expected {
            return Err(TransportError::Flood {
                count: self.heartbeats,
                elapsed,
            });
        }
        Ok(())
    }
}

/// A peer that closes in the middle of a payload says so.
pub(crate) fn mid_epoch(e: TransportError) -> TransportError {
    match e {
        TransportError::PeerClosed(_) => TransportError::PeerClosed(" in the middle of an epoch"),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_any_flipped_bit_is_refused() {
        let messages = [
            Control::Epoch {
                epoch: 7,
                len: 1 << 20,
            },
            Control::Commit { epoch: 7 },
            Control::Ack { epoch: 7 },
            Control::Nack {
                epoch: 7,
                reason: NackReason::OutOfSequence,
            },
            Control::Heartbeat { time: 123 },
            Control::Scrub {
                first: 5,
                count: 16,
            },
            Control::ScrubDigest {
                low: 0x0123,
                high: u64::MAX,
            },
            Control::ScrubResult {
                epoch: 9,
                mismatched: 0b101,
            },
        ];
        for message in messages {
            let bytes = message.encode();
            assert_eq!(Control::decode(&bytes).unwrap(), message);
            for bit in 0..CONTROL_BYTES * 8 {
                let mut bad = bytes;
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(Control::decode(&bad).is_err(), "{message:?} bit {bit}");
            }
        }
    }

    #[test]
    fn unknown_kinds_and_reasons_do_not_panic() {
        let mut m = [0u8; CONTROL_BYTES];
        m[0] = 9;
        let sum = xxh3_64_with_seed(&m[..24], CHECKSUM_SEED);
        m[24..].copy_from_slice(&sum.to_le_bytes());
        assert!(matches!(
            Control::decode(&m),
            Err(TransportError::Protocol(_))
        ));
        let empty_scrub = Control::Scrub { first: 0, count: 0 }.encode();
        assert!(matches!(
            Control::decode(&empty_scrub),
            Err(TransportError::Protocol(_))
        ));
        let nack = Control::Nack {
            epoch: 1,
            reason: NackReason::Unknown(77),
        };
        assert_eq!(Control::decode(&nack.encode()).unwrap(), nack);
    }
}
