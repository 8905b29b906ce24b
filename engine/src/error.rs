//! Typed errors of the engine. Every message says what failed and what to do.

use thiserror::Error;

/// An invalid memory or block size.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GeometryError {
    /// The block size is not a power of two between 32 and 4096 bytes.
    #[error(
        "block size {0} is not supported: use a power of two from 32 to 4096 bytes (default 64)"
    )]
    BlockSize(usize),
    /// The memory size is zero, not page-aligned, or too large.
    #[error(
        "memory size {0} bytes is not supported: use a non-zero multiple of 4096 bytes, at most 16 TiB"
    )]
    MemSize(u64),
}

/// A misuse of the encoder: bad input from the layer that drives it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// A dirty page number lies outside protected memory.
    #[error(
        "dirty page {page} is outside protected memory ({pages} pages): the dirty log and the geometry disagree"
    )]
    PageOutOfRange {
        /// The offending page number.
        page: u64,
        /// Pages in protected memory.
        pages: u64,
    },
    /// The memory handed to the encoder is not the size the geometry says.
    #[error(
        "memory image is {got} bytes but the geometry says {expected}: pass the whole protected region"
    )]
    MemoryLength {
        /// Bytes expected.
        expected: u64,
        /// Bytes given.
        got: u64,
    },
    /// The page source does not hold a page the epoch must carry.
    #[error(
        "page {0} must be encoded but the checkpoint does not hold it: copy the dirty pages together with Encoder::carried_pages"
    )]
    PageNotCaptured(u64),
    /// The machine-state blob does not fit in one frame.
    #[error("machine-state blob of {0} bytes exceeds the 4 GiB frame limit")]
    StateTooLarge(usize),
    /// An acknowledgement or loss names an epoch that is not in flight.
    #[error(
        "epoch {epoch} is not in flight (in flight: {first}..={last}); acknowledge or fail only epochs the encoder produced"
    )]
    NotInFlight {
        /// The epoch named.
        epoch: u64,
        /// Oldest epoch in flight (0 when none).
        first: u64,
        /// Newest epoch in flight (0 when none).
        last: u64,
    },
    /// The configuration is inconsistent.
    #[error("invalid encoder configuration: {0}")]
    Config(String),
    /// A worker thread died.
    #[error("encoder worker {0} panicked; the epoch was not produced and no state moved forward")]
    WorkerPanicked(usize),
}

/// Why the backup refused an epoch. The replica is untouched whenever this is returned.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// The stream ended inside a frame or before the commit frame.
    #[error(
        "epoch stream truncated at byte {0}: the sender stopped mid-epoch; the replica stays at its last committed epoch"
    )]
    Truncated(usize),
    /// A frame does not start with the frame magic.
    #[error("bad frame magic at byte {0}: the stream is not an fgbi epoch or is misaligned")]
    BadMagic(usize),
    /// The frame was written by an unsupported format version.
    #[error(
        "wire format version {got} is not supported (this build speaks {supported}): run the same fgbi version on both hosts"
    )]
    Version {
        /// Version found.
        got: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// A frame's checksum does not match its contents.
    #[error("checksum mismatch in frame at byte {0}: the epoch was corrupted in transit")]
    Checksum(usize),
    /// A frame kind is unknown or out of order.
    #[error(
        "unexpected frame kind {kind} at byte {offset}: frames must be header, pages..., state, commit"
    )]
    FrameOrder {
        /// The kind byte found.
        kind: u8,
        /// Byte offset of the frame.
        offset: usize,
    },
    /// The frames do not all carry the same epoch number.
    #[error(
        "frame at byte {offset} belongs to epoch {got}, not {expected}: frames of different epochs were mixed"
    )]
    MixedEpochs {
        /// Epoch of the header frame.
        expected: u64,
        /// Epoch found.
        got: u64,
        /// Byte offset of the frame.
        offset: usize,
    },
    /// The epoch's geometry differs from the replica's.
    #[error(
        "epoch geometry ({got_mem} bytes, {got_block}-byte blocks) differs from the replica's ({mem} bytes, {block}-byte blocks): start both ends with the same --mem and --block"
    )]
    Geometry {
        /// Memory size in the stream.
        got_mem: u64,
        /// Block size in the stream.
        got_block: u32,
        /// Replica memory size.
        mem: u64,
        /// Replica block size.
        block: u32,
    },
    /// The epoch does not follow the replica's committed epoch.
    #[error(
        "epoch {epoch} is based on epoch {base} but the replica is at epoch {committed}: the epoch is replayed, reordered or from another primary"
    )]
    Sequence {
        /// Epoch number in the stream.
        epoch: u64,
        /// Base epoch in the stream.
        base: u64,
        /// Replica's committed epoch.
        committed: u64,
    },
    /// A page record is malformed.
    #[error("malformed page record at byte {offset}: {what}")]
    Record {
        /// Byte offset of the record in the stream.
        offset: usize,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A page record names a page outside the replica.
    #[error("page {page} at byte {offset} is outside the replica ({pages} pages)")]
    PageOutOfRange {
        /// The page named.
        page: u64,
        /// Pages in the replica.
        pages: u64,
        /// Byte offset of the record.
        offset: usize,
    },
    /// The same page appears twice in one epoch.
    #[error("page {page} appears twice in the epoch (second time at byte {offset})")]
    DuplicatePage {
        /// The page named.
        page: u64,
        /// Byte offset of the second record.
        offset: usize,
    },
    /// The commit frame does not describe the frames before it.
    #[error(
        "commit frame does not match the epoch: {0}; frames were lost, duplicated or reordered"
    )]
    Commit(&'static str),
    /// Bytes follow the commit frame.
    #[error("{0} bytes follow the commit frame: one buffer must hold exactly one epoch")]
    TrailingBytes(usize),
    /// The replica memory is not the size of the geometry.
    #[error("replica memory is {got} bytes but the geometry says {expected}")]
    MemoryLength {
        /// Bytes expected.
        expected: u64,
        /// Bytes given.
        got: u64,
    },
}
