//! The epoch wire format: checksummed frames carrying page records.
//!
//! An epoch is `HEADER PAGES* STATE? COMMIT`, each a frame of a 32-byte header and a
//! body. docs/wire-format.md is the specification; this module is its only
//! implementation, shared by the encoder ([`FrameWriter`]) and the backup
//! ([`FrameReader`], [`RecordReader`]). Every reader function returns an error on any
//! malformed input; none of them panics.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::error::ApplyError;
use crate::geometry::PAGE_SIZE;

/// First four bytes of every frame, "FGBI" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FGBI");
/// Wire format version this build writes and reads (2: header flags, a pre-copy
/// epoch flag; version 1 had no flags and is refused).
pub const VERSION: u16 = 2;
/// Header flag: the epoch is a round of initial sync (pre-copy), read while the
/// program ran. A replica it leaves is not a checkpoint: no failover to it.
pub const FLAG_PRECOPY: u8 = 1;
/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 32;
/// Bytes of a header frame's body.
pub const HEADER_BODY_BYTES: usize = 32;
/// Bytes of a commit frame's body.
pub const COMMIT_BODY_BYTES: usize = 32;
/// Bytes of a page record's header (kind and page number).
pub const RECORD_HEADER_BYTES: usize = 5;
/// Bytes of one block reference (page number and block index).
pub const REF_BYTES: usize = 6;
/// Largest page record the encoder writes: a raw page.
pub const MAX_RECORD_BYTES: usize = RECORD_HEADER_BYTES + PAGE_SIZE;

/// Kind of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Epoch header: geometry, epoch, base epoch, mode.
    Header = 1,
    /// A chunk of page records.
    Pages = 2,
    /// The opaque machine-state blob.
    State = 3,
    /// Commit: counts and a chain over every earlier frame's checksum.
    Commit = 4,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Header,
            2 => Self::Pages,
            3 => Self::State,
            4 => Self::Commit,
            _ => return None,
        })
    }
}

/// Kind of a page record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// The page is all zeros.
    ZeroPage = 1,
    /// The whole page, raw.
    RawPage = 2,
    /// The whole page, lz4-compressed.
    Lz4Page = 3,
    /// Runs of changed bytes against the page's previous contents.
    Runs = 4,
    /// Changed blocks: raw, zero or shared, with a raw payload.
    Blocks = 5,
    /// Changed blocks with an lz4-compressed payload.
    BlocksLz4 = 6,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::ZeroPage,
            2 => Self::RawPage,
            3 => Self::Lz4Page,
            4 => Self::Runs,
            5 => Self::Blocks,
            6 => Self::BlocksLz4,
            _ => return None,
        })
    }
}

/// What to do with one changed block of a [`RecordKind::Blocks`] record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockOp {
    /// The block's bytes follow in the payload.
    Raw = 0,
    /// The block is all zeros.
    Zero = 1,
    /// The block equals a block already written earlier in this epoch.
    Shared = 2,
}

/// Checksum of a frame: xxh3-64 of its body, seeded with xxh3-64 of header bytes 0..24.
pub fn frame_checksum(header: &[u8], body: &[u8]) -> u64 {
    xxh3_64_with_seed(body, xxh3_64(&header[..24]))
}

/// Folds one frame checksum into the commit chain.
pub fn chain(previous: u64, checksum: u64) -> u64 {
    xxh3_64_with_seed(&checksum.to_le_bytes(), previous)
}

/// The fields of a header frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochHeader {
    /// Epoch number.
    pub epoch: u64,
    /// Epoch this one is a delta against (the replica must be at it).
    pub base: u64,
    /// Encoding mode that produced it (informational).
    pub mode: u8,
    /// Block size.
    pub block_size: u32,
    /// Protected memory size.
    pub mem_bytes: u64,
    /// A round of initial sync ([`FLAG_PRECOPY`]), not a checkpoint.
    pub precopy: bool,
}

/// The fields of a commit frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CommitInfo {
    /// Frames before the commit frame.
    pub frames: u32,
    /// Bytes before the commit frame.
    pub bytes: u64,
    /// Page records in the epoch.
    pub records: u64,
    /// Chain over the checksums of the frames before the commit frame.
    pub chain: u64,
}

/// Appends frames to a byte buffer.
#[derive(Default)]
pub struct FrameWriter {
    /// Encoded bytes.
    pub buf: Vec<u8>,
    open: Option<usize>,
}

impl FrameWriter {
    /// Starts a frame of `kind` for `epoch`; its body is appended to `buf` until
    /// [`FrameWriter::finish`].
    pub fn begin(&mut self, kind: FrameKind, epoch: u64) {
        debug_assert!(self.open.is_none(), "frame already open");
        self.open = Some(self.buf.len());
        self.buf.extend_from_slice(&MAGIC.to_le_bytes());
        self.buf.push(kind as u8);
        self.buf.push(0);
        self.buf.extend_from_slice(&VERSION.to_le_bytes());
        self.buf.extend_from_slice(&[0; 8]);
        self.buf.extend_from_slice(&epoch.to_le_bytes());
        self.buf.extend_from_slice(&[0; 8]);
    }

    /// Bytes of body written so far in the open frame (0 when none is open).
    pub fn body_len(&self) -> usize {
        self.open
            .map_or(0, |start| self.buf.len() - start - FRAME_HEADER_BYTES)
    }

    /// True when a frame is open.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Closes the open frame, filling its length and checksum; returns the checksum.
    pub fn finish(&mut self) -> u64 {
        let Some(start) = self.open.take() else {
            return 0;
        };
        let body_len = self.buf.len() - start - FRAME_HEADER_BYTES;
        // Bodies are bounded by the encoder (chunk size, state size checked < 4 GiB).
        self.buf[start + 8..start + 12].copy_from_slice(&(body_len as u32).to_le_bytes());
        let (header, body) = self.buf[start..].split_at(FRAME_HEADER_BYTES);
        let checksum = frame_checksum(header, body);
        self.buf[start + 24..start + 32].copy_from_slice(&checksum.to_le_bytes());
        checksum
    }

    /// Writes a complete header frame.
    pub fn header(&mut self, h: &EpochHeader) -> u64 {
        self.begin(FrameKind::Header, h.epoch);
        self.buf.push(h.mode);
        self.buf.push(if h.precopy { FLAG_PRECOPY } else { 0 });
        self.buf.extend_from_slice(&[0; 2]);
        self.buf.extend_from_slice(&h.block_size.to_le_bytes());
        self.buf
            .extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&h.mem_bytes.to_le_bytes());
        self.buf.extend_from_slice(&h.base.to_le_bytes());
        self.finish()
    }

    /// Writes a complete state frame.
    pub fn state(&mut self, epoch: u64, blob: &[u8]) -> u64 {
        self.begin(FrameKind::State, epoch);
        self.buf.extend_from_slice(blob);
        self.finish()
    }

    /// Writes a complete commit frame.
    pub fn commit(&mut self, epoch: u64, c: &CommitInfo) -> u64 {
        self.begin(FrameKind::Commit, epoch);
        self.buf.extend_from_slice(&c.frames.to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&c.bytes.to_le_bytes());
        self.buf.extend_from_slice(&c.records.to_le_bytes());
        self.buf.extend_from_slice(&c.chain.to_le_bytes());
        self.finish()
    }

    /// Appends a page record header.
    #[inline]
    pub fn record(&mut self, kind: RecordKind, page: u32) {
        self.buf.push(kind as u8);
        self.buf.extend_from_slice(&page.to_le_bytes());
    }
}

/// One checked frame of an epoch stream.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// Frame kind.
    pub kind: FrameKind,
    /// Epoch the frame belongs to.
    pub epoch: u64,
    /// Frame body.
    pub body: &'a [u8],
    /// Frame checksum (verified).
    pub checksum: u64,
    /// Byte offset of the frame in the stream.
    pub offset: usize,
}

/// Reads and checks frames one by one from an epoch stream.
pub struct FrameReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> FrameReader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    /// Byte offset of the next frame.
    pub fn offset(&self) -> usize {
        self.at
    }

    /// The next frame, checked (magic, version, length, checksum), or `None` at the end.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'a>>, ApplyError> {
        let start = self.at;
        if start == self.bytes.len() {
            return Ok(None);
        }
        let header = self
            .bytes
            .get(start..start + FRAME_HEADER_BYTES)
            .ok_or(ApplyError::Truncated(self.bytes.len()))?;
        if u32_at(header, 0) != MAGIC {
            return Err(ApplyError::BadMagic(start));
        }
        let version = u16_at(header, 6);
        if version != VERSION {
            return Err(ApplyError::Version {
                got: version,
                supported: VERSION,
            });
        }
        let kind = FrameKind::from_byte(header[4]).ok_or(ApplyError::FrameOrder {
            kind: header[4],
            offset: start,
        })?;
        let body_len = u32_at(header, 8) as usize;
        let body_start = start + FRAME_HEADER_BYTES;
        let body = body_start
            .checked_add(body_len)
            .and_then(|end| self.bytes.get(body_start..end))
            .ok_or(ApplyError::Truncated(self.bytes.len()))?;
        let checksum = u64_at(header, 24);
        if header[5] != 0 || u32_at(header, 12) != 0 || frame_checksum(header, body) != checksum {
            return Err(ApplyError::Checksum(start));
        }
        self.at = body_start + body_len;
        Ok(Some(Frame {
            kind,
            epoch: u64_at(header, 16),
            body,
            checksum,
            offset: start,
        }))
    }
}

/// Parses a header frame's body.
pub fn parse_header(frame: &Frame<'_>) -> Result<EpochHeader, ApplyError> {
    let b = frame.body;
    if b.len() != HEADER_BODY_BYTES || u32_at(b, 8) != PAGE_SIZE as u32 {
        return Err(ApplyError::Record {
            offset: frame.offset,
            what: "header frame has the wrong length or page size",
        });
    }
    if b[1] & !FLAG_PRECOPY != 0 || b[2..4] != [0; 2] || u32_at(b, 12) != 0 {
        return Err(ApplyError::Record {
            offset: frame.offset,
            what: "header frame has unknown flags or non-zero reserved bytes",
        });
    }
    Ok(EpochHeader {
        epoch: frame.epoch,
        mode: b[0],
        precopy: b[1] & FLAG_PRECOPY != 0,
        block_size: u32_at(b, 4),
        mem_bytes: u64_at(b, 16),
        base: u64_at(b, 24),
    })
}

/// Parses a commit frame's body.
pub fn parse_commit(frame: &Frame<'_>) -> Result<CommitInfo, ApplyError> {
    let b = frame.body;
    if b.len() != COMMIT_BODY_BYTES {
        return Err(ApplyError::Commit("commit frame has the wrong length"));
    }
    Ok(CommitInfo {
        frames: u32_at(b, 0),
        bytes: u64_at(b, 8),
        records: u64_at(b, 16),
        chain: u64_at(b, 24),
    })
}

/// One parsed page record. Payload slices borrow the stream.
#[derive(Clone, Copy, Debug)]
pub enum Record<'a> {
    /// An all-zero page.
    Zero,
    /// A raw page (exactly [`PAGE_SIZE`] bytes).
    Raw(&'a [u8]),
    /// An lz4-compressed page.
    Lz4(&'a [u8]),
    /// A run delta against the page's previous contents.
    Runs(&'a [u8]),
    /// Changed blocks.
    Blocks(BlocksRecord<'a>),
}

/// The parts of a blocks record.
#[derive(Clone, Copy, Debug)]
pub struct BlocksRecord<'a> {
    /// Bit `i` set: block `i` changed.
    pub mask: u128,
    /// Two bits per changed block, in block order: a [`BlockOp`].
    pub ops: &'a [u8],
    /// [`REF_BYTES`] per shared block: page number (u32) and block index (u16).
    pub refs: &'a [u8],
    /// Raw payload, or its lz4 compression when `compressed`.
    pub payload: &'a [u8],
    /// Whether `payload` is lz4-compressed.
    pub compressed: bool,
    /// Raw blocks in the record: the decompressed payload is this many blocks.
    pub raw_blocks: usize,
}

impl BlocksRecord<'_> {
    /// The operation for the `n`-th changed block.
    #[inline]
    pub fn op(&self, n: usize) -> BlockOp {
        match (self.ops[n / 4] >> ((n % 4) * 2)) & 3 {
            0 => BlockOp::Raw,
            1 => BlockOp::Zero,
            _ => BlockOp::Shared,
        }
    }

    /// The `n`-th reference: (page, block).
    #[inline]
    pub fn reference(&self, n: usize) -> (u32, u16) {
        let r = &self.refs[n * REF_BYTES..(n + 1) * REF_BYTES];
        (u32_at(r, 0), u16_at(r, 4))
    }
}

/// Iterates over the page records of a pages frame body.
pub struct RecordReader<'a> {
    body: &'a [u8],
    at: usize,
    base: usize,
    blocks_per_page: usize,
    block_size: usize,
}

impl<'a> RecordReader<'a> {
    /// A reader over `frame`'s records for pages of `block_size`-byte blocks.
    pub fn new(frame: &Frame<'a>, block_size: usize) -> Self {
        Self {
            body: frame.body,
            at: 0,
            base: frame.offset + FRAME_HEADER_BYTES,
            blocks_per_page: PAGE_SIZE / block_size,
            block_size,
        }
    }

    fn malformed(&self, at: usize, what: &'static str) -> ApplyError {
        ApplyError::Record {
            offset: self.base + at,
            what,
        }
    }

    fn take(&mut self, start: usize, n: usize, what: &'static str) -> Result<&'a [u8], ApplyError> {
        let slice = self
            .at
            .checked_add(n)
            .and_then(|end| self.body.get(self.at..end))
            .ok_or_else(|| self.malformed(start, what))?;
        self.at += n;
        Ok(slice)
    }

    fn take_len(&mut self, start: usize) -> Result<&'a [u8], ApplyError> {
        let len = self.take(start, 2, "record length is truncated")?;
        let len = usize::from(u16_at(len, 0));
        self.take(start, len, "record payload is truncated")
    }

    /// The next record as (stream offset, page, record), or `None` at the end.
    pub fn next_record(&mut self) -> Result<Option<(usize, u64, Record<'a>)>, ApplyError> {
        let start = self.at;
        if start == self.body.len() {
            return Ok(None);
        }
        let head = self.take(start, RECORD_HEADER_BYTES, "record header is truncated")?;
        let kind = RecordKind::from_byte(head[0])
            .ok_or_else(|| self.malformed(start, "unknown record kind"))?;
        let page = u64::from(u32_at(head, 1));
        let record = match kind {
            RecordKind::ZeroPage => Record::Zero,
            RecordKind::RawPage => {
                Record::Raw(self.take(start, PAGE_SIZE, "raw page is truncated")?)
            }
            RecordKind::Lz4Page => Record::Lz4(self.take_len(start)?),
            RecordKind::Runs => Record::Runs(self.take_len(start)?),
            RecordKind::Blocks | RecordKind::BlocksLz4 => {
                Record::Blocks(self.blocks(start, kind == RecordKind::BlocksLz4)?)
            }
        };
        Ok(Some((self.base + start, page, record)))
    }

    fn blocks(&mut self, start: usize, compressed: bool) -> Result<BlocksRecord<'a>, ApplyError> {
        let mask_bytes = self.blocks_per_page.div_ceil(8);
        let mask_raw = self.take(start, mask_bytes, "block mask is truncated")?;
        let mut mask_le = [0u8; 16];
        mask_le[..mask_bytes].copy_from_slice(mask_raw);
        let mask = u128::from_le_bytes(mask_le);
        let valid = if self.blocks_per_page == 128 {
            u128::MAX
        } else {
            (1u128 << self.blocks_per_page) - 1
        };
        if mask == 0 || mask & !valid != 0 {
            return Err(self.malformed(start, "block mask is empty or names blocks past the page"));
        }
        let changed = mask.count_ones() as usize;
        let ops = self.take(start, changed.div_ceil(4), "block operations are truncated")?;
        let (mut raw, mut shared) = (0, 0);
        for n in 0..changed {
            match (ops[n / 4] >> ((n % 4) * 2)) & 3 {
                0 => raw += 1,
                1 => {}
                2 => shared += 1,
                _ => return Err(self.malformed(start, "unknown block operation")),
            }
        }
        if changed % 4 != 0 && ops[changed / 4] >> ((changed % 4) * 2) != 0 {
            return Err(self.malformed(start, "block operations have trailing bits"));
        }
        let refs = self.take(start, shared * REF_BYTES, "block references are truncated")?;
        let payload = if compressed {
            self.take_len(start)?
        } else {
            self.take(start, raw * self.block_size, "block payload is truncated")?
        };
        Ok(BlocksRecord {
            mask,
            ops,
            refs,
            payload,
            compressed,
            raw_blocks: raw,
        })
    }
}

/// Little-endian u16 at `at` (the caller guarantees the bounds).
#[inline(always)]
pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Little-endian u32 at `at` (the caller guarantees the bounds).
#[inline(always)]
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Little-endian u64 at `at` (the caller guarantees the bounds).
#[inline(always)]
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}
