//! What can go wrong, and what to do about it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use fgbi_hyp::memory::MemoryError;
use thiserror::Error;

use crate::handshake::{RefusalCode, Role};

/// The pre-shared key file cannot be used.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The file could not be opened or read.
    #[error(
        "cannot read the key file {path:?} ({source}): create it with `head -c 32 /dev/urandom > FILE && chmod 600 FILE` and copy it to both hosts"
    )]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path names a directory or a device.
    #[error("the key path {0:?} is not a regular file: point it at the key file")]
    NotAFile(PathBuf),
    /// Group or others may read or write the file.
    #[error(
        "the key file {path:?} is accessible to group or others (mode {mode:03o}): run `chmod 600` on it"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is empty.
    #[error(
        "the key file {0:?} is empty: write at least 16 random bytes into it (e.g. `head -c 32 /dev/urandom`)"
    )]
    Empty(PathBuf),
    /// The file holds fewer bytes than a key needs.
    #[error("the key file {path:?} holds only {len} bytes: use at least {min} random bytes")]
    TooShort {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
}

/// The handshake failed; the connection was closed before any epoch byte moved.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// Reading or writing the socket failed.
    #[error(
        "handshake I/O failed ({0}): check that the peer is an fgbi transport endpoint and reachable"
    )]
    Io(#[source] io::Error),
    /// The peer sent no complete handshake message in time.
    #[error(
        "the peer sent no complete handshake message within {0:?}: it is not an fgbi endpoint or it hung; connection refused"
    )]
    Timeout(Duration),
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during the handshake (it may have refused this side)")]
    Closed,
    /// The peer's first bytes are not the protocol's magic.
    #[error(
        "the peer does not speak the fgbi transport (its first bytes are {0:02x?}, not \"FGBT\"): connection refused"
    )]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error(
        "the peer speaks transport protocol version {theirs}, this side version {ours}: run the same fgbi release on both hosts"
    )]
    Version {
        /// This side's version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peer announced the wrong role.
    #[error(
        "the peer announced role code {theirs} but a {expected} was expected: connect a primary to a backup"
    )]
    Role {
        /// The role this side expected.
        expected: Role,
        /// The role code the peer sent.
        theirs: u8,
    },
    /// The two sides protect memories of different shapes.
    #[error(
        "geometry differs: this side has {mem_bytes} bytes of memory in {block_size}-byte blocks, the peer {peer_mem_bytes} bytes in {peer_block_size}-byte blocks: start both sides with the same memory and block size"
    )]
    Geometry {
        /// This side's memory size.
        mem_bytes: u64,
        /// This side's block size.
        block_size: u32,
        /// The peer's memory size.
        peer_mem_bytes: u64,
        /// The peer's block size.
        peer_block_size: u32,
    },
    /// A handshake message is inconsistent.
    #[error("malformed handshake message: {0}; connection refused")]
    Malformed(&'static str),
    /// The peer failed the challenge-response.
    #[error(
        "the peer failed to prove it holds the pre-shared key: check that both hosts use the same key file; connection refused"
    )]
    Authentication,
    /// The peer refused this side.
    #[error("the peer refused the connection: {0}")]
    Refused(RefusalCode),
    /// No random nonce could be drawn.
    #[error("cannot draw a random handshake nonce from the operating system: {0}")]
    Random(getrandom::Error),
}

/// A transport operation failed.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The settings are inconsistent.
    #[error("invalid transport settings: {0}")]
    Config(&'static str),
    /// The receive region could not be mapped.
    #[error("cannot map the receive region: {0}")]
    Region(#[from] MemoryError),
    /// The receive region's shape is out of range.
    #[error(
        "a receive region of {slots} slots of {slot_bytes} bytes is out of range: use 1 to 1024 slots of at most 16 GiB each"
    )]
    RegionSize {
        /// Slots asked for.
        slots: usize,
        /// Bytes per slot asked for.
        slot_bytes: usize,
    },
    /// io_uring cannot be used on this host.
    #[error("io_uring is unavailable ({what}: {source}): use the std TCP implementation")]
    Uring {
        /// What failed.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// RDMA cannot be used on this host.
    #[error(
        "RDMA unavailable: {0}; install rdma-core and ibverbs-providers (or the vendor's OFED), or use --transport tcp"
    )]
    RdmaUnavailable(String),
    /// A verbs call failed.
    #[error("{what} failed: {source}")]
    Verbs {
        /// What failed.
        what: &'static str,
        /// The error libibverbs reported.
        #[source]
        source: io::Error,
    },
    /// An RDMA work request completed with an error.
    #[error(
        "{what} failed: {status}: the peer died or its queue pair broke; the connection is closed"
    )]
    RdmaCompletion {
        /// What completed.
        what: &'static str,
        /// libibverbs' text for the completion status.
        status: String,
    },
    /// A socket operation failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Nothing arrived from the peer (or it took nothing) for the liveness timeout.
    #[error(
        "nothing heard from the peer for {0:?}: it is dead, hung or cut off; the backup fails over, the primary reconnects"
    )]
    PeerTimeout(Duration),
    /// The peer closed the connection.
    #[error("the peer closed the connection{0}")]
    PeerClosed(&'static str),
    /// The caller's wait for a reply ended; the peer is alive.
    #[error(
        "no reply within {0:?} although the peer is alive: wait again, or treat the epoch as lost"
    )]
    ReplyTimeout(Duration),
    /// The peer broke the protocol.
    #[error("the peer violated the protocol ({0}): connection closed")]
    Protocol(String),
    /// The peer sent heartbeats far faster than its interval.
    #[error(
        "the peer sent {count} heartbeats in {elapsed:?}, far more than one per interval: flooding; connection closed"
    )]
    Flood {
        /// Heartbeats received.
        count: u64,
        /// Since the connection started.
        elapsed: Duration,
    },
    /// The epoch does not fit a receive slot; nothing was sent.
    #[error(
        "epoch {epoch} is {len} bytes but a receive slot holds {slot_bytes}: raise the backup's per-epoch page limit or checkpoint more often"
    )]
    EpochTooLarge {
        /// Epoch number.
        epoch: u64,
        /// Its length.
        len: u64,
        /// Bytes per slot.
        slot_bytes: u64,
    },
    /// Every receive slot already holds an epoch awaiting its reply.
    #[error("{0} epochs already await a reply, one per receive slot: call wait_reply first")]
    WindowFull(usize),
    /// `wait_reply` was called with no epoch in flight.
    #[error("no epoch awaits a reply: send one first")]
    NothingInFlight,
    /// `ack` or `nack` named an epoch other than the one received.
    #[error("ack or nack of epoch {epoch}, but the epoch awaiting an answer is {pending:?}")]
    NotPending {
        /// The epoch named.
        epoch: u64,
        /// The epoch received and not yet answered.
        pending: Option<u64>,
    },
    /// `recv_epoch` was called before the previous epoch was answered.
    #[error("epoch {0} was received but not answered: call ack or nack before receiving the next")]
    Unanswered(u64),
    /// An earlier failure broke the connection.
    #[error("the connection failed earlier: reconnect, and lose the epochs that were in flight")]
    Broken,
}

impl TransportError {
    /// Whether the connection is unusable after this error.
    pub fn breaks_connection(&self) -> bool {
        !matches!(
            self,
            TransportError::ReplyTimeout(_)
                | TransportError::EpochTooLarge { .. }
                | TransportError::WindowFull(_)
                | TransportError::NothingInFlight
                | TransportError::NotPending { .. }
                | TransportError::Unanswered(_)
        )
    }

    /// Maps a socket error of `what` to the error a caller can act on.
    pub(crate) fn from_io(what: &'static str, source: io::Error, timeout: Duration) -> Self {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                TransportError::PeerTimeout(timeout)
            }
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => TransportError::PeerClosed(""),
            _ => TransportError::Io { what, source },
        }
    }
}
