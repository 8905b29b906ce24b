//! The backup's side: validate a whole epoch, then apply it to the replica.
//!
//! [`Applier::apply`] reads the epoch twice. The first pass checks everything that can
//! be wrong (frame order, checksums, the commit chain, geometry, sequence, every
//! record's structure and bounds, lz4 streams by decompressing them into scratch,
//! references to blocks written earlier in the epoch). Only an epoch that passes is
//! applied, in a second pass that cannot fail, so the replica is always either at
//! the committed epoch or at the new one.

use crate::error::ApplyError;
use crate::geometry::{Geometry, PAGE_SIZE};
use crate::runs;
use crate::wire::{
    self, BlockOp, BlocksRecord, Frame, FrameKind, FrameReader, Record, RecordReader,
};
use crate::worker::set_bits;

/// What an applied epoch held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppliedEpoch {
    /// The epoch now committed.
    pub epoch: u64,
    /// Page records applied.
    pub records: u64,
    /// Bytes of the epoch.
    pub bytes: u64,
}

/// Pages written so far in the epoch being validated.
struct PageSet {
    bits: Vec<u64>,
    touched: Vec<u64>,
}

impl PageSet {
    fn new(pages: u64) -> Self {
        Self {
            bits: vec![0; pages.div_ceil(64) as usize],
            touched: Vec::new(),
        }
    }

    fn contains(&self, page: u64) -> bool {
        self.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Adds `page`; false if it was already there.
    fn insert(&mut self, page: u64) -> bool {
        let word = &mut self.bits[(page / 64) as usize];
        let bit = 1 << (page % 64);
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        self.touched.push(page);
        true
    }

    fn clear(&mut self) {
        for page in self.touched.drain(..) {
            self.bits[(page / 64) as usize] = 0;
        }
    }
}

/// The backup's applier: the committed epoch, its state blob, and validation scratch.
pub struct Applier {
    geometry: Geometry,
    committed: u64,
    /// The committed epoch is a checkpoint (not a round of initial sync).
    checkpoint: bool,
    state: Vec<u8>,
    written: PageSet,
    scratch: Vec<u8>,
}

impl Applier {
    /// An applier for a replica of all-zero memory at epoch 0.
    pub fn new(geometry: Geometry) -> Self {
        Self::resume(geometry, 0, Vec::new())
    }

    /// An applier for a replica already at `committed` with state blob `state` (a
    /// checkpoint, unless `committed` is 0).
    pub fn resume(geometry: Geometry, committed: u64, state: Vec<u8>) -> Self {
        Self {
            geometry,
            committed,
            checkpoint: committed > 0,
            state,
            written: PageSet::new(geometry.pages()),
            scratch: vec![0; PAGE_SIZE],
        }
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The last committed epoch.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Whether the replica holds a checkpoint of the primary, one it may fail over
    /// to: false at epoch 0 and after a round of initial sync (pre-copy) until the
    /// first checkpoint epoch commits.
    pub fn holds_checkpoint(&self) -> bool {
        self.checkpoint
    }

    /// The committed epoch's machine-state blob.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// Validates the epoch in `bytes` and, only if all of it is valid, applies it to
    /// `memory` and commits it. On error `memory` and the committed epoch are unchanged.
    pub fn apply(&mut self, memory: &mut [u8], bytes: &[u8]) -> Result<AppliedEpoch, ApplyError> {
        if memory.len() as u64 != self.geometry.mem_bytes() {
            return Err(ApplyError::MemoryLength {
                expected: self.geometry.mem_bytes(),
                got: memory.len() as u64,
            });
        }
        let result = self.validate(bytes);
        self.written.clear();
        let (header, pages, state, records) = result?;
        let block = self.geometry.block_size();
        for frame in &pages {
            let mut reader = RecordReader::new(frame, block);
            while let Some((_, page, record)) = reader.next_record()? {
                self.write_page(memory, page, &record);
            }
        }
        self.state.clear();
        self.state.extend_from_slice(state);
        self.committed = header.epoch;
        self.checkpoint = !header.precopy;
        Ok(AppliedEpoch {
            epoch: header.epoch,
            records,
            bytes: bytes.len() as u64,
        })
    }

    /// First pass: everything that can be wrong with the epoch.
    #[allow(clippy::type_complexity)]
    fn validate<'a>(
        &mut self,
        bytes: &'a [u8],
    ) -> Result<(wire::EpochHeader, Vec<Frame<'a>>, &'a [u8], u64), ApplyError> {
        let mut reader = FrameReader::new(bytes);
        let first = reader.next_frame()?.ok_or(ApplyError::Truncated(0))?;
        if first.kind != FrameKind::Header {
            return Err(ApplyError::FrameOrder {
                kind: first.kind as u8,
                offset: 0,
            });
        }
        let header = wire::parse_header(&first)?;
        if header.mem_bytes != self.geometry.mem_bytes()
            || header.block_size as usize != self.geometry.block_size()
        {
            return Err(ApplyError::Geometry {
                got_mem: header.mem_bytes,
                got_block: header.block_size,
                mem: self.geometry.mem_bytes(),
                block: self.geometry.block_size() as u32,
            });
        }
        if header.base != self.committed || header.epoch != header.base.wrapping_add(1) {
            return Err(ApplyError::Sequence {
                epoch: header.epoch,
                base: header.base,
                committed: self.committed,
            });
        }
        let mut chain = wire::chain(0, first.checksum);
        let mut frames = 1u32;
        let mut pages = Vec::new();
        let mut state: Option<&[u8]> = None;
        let mut records = 0u64;
        loop {
            let offset = reader.offset();
            let frame = reader
                .next_frame()?
                .ok_or(ApplyError::Truncated(bytes.len()))?;
            if frame.epoch != header.epoch {
                return Err(ApplyError::MixedEpochs {
                    expected: header.epoch,
                    got: frame.epoch,
                    offset,
                });
            }
            match frame.kind {
                FrameKind::Pages if state.is_none() => {
                    records += self.validate_records(&frame)?;
                    pages.push(frame);
                }
                FrameKind::State if state.is_none() => state = Some(frame.body),
                FrameKind::Commit => {
                    let commit = wire::parse_commit(&frame)?;
                    let state = state.ok_or(ApplyError::Commit("the epoch has no state frame"))?;
                    if commit.frames != frames {
                        return Err(ApplyError::Commit("frame count differs"));
                    }
                    if commit.bytes != offset as u64 {
                        return Err(ApplyError::Commit("byte count differs"));
                    }
                    if commit.records != records {
                        return Err(ApplyError::Commit("record count differs"));
                    }
                    if commit.chain != chain {
                        return Err(ApplyError::Commit("checksum chain differs"));
                    }
                    let trailing = bytes.len() - reader.offset();
                    if trailing != 0 {
                        return Err(ApplyError::TrailingBytes(trailing));
                    }
                    return Ok((header, pages, state, records));
                }
                kind => {
                    return Err(ApplyError::FrameOrder {
                        kind: kind as u8,
                        offset,
                    });
                }
            }
            chain = wire::chain(chain, frame.checksum);
            frames = frames.saturating_add(1);
        }
    }

    fn validate_records(&mut self, frame: &Frame<'_>) -> Result<u64, ApplyError> {
        let pages = self.geometry.pages();
        let block = self.geometry.block_size();
        let bpp = self.geometry.blocks_per_page() as u16;
        let mut reader = RecordReader::new(frame, block);
        let mut count = 0;
        while let Some((offset, page, record)) = reader.next_record()? {
            let bad = |what| ApplyError::Record { offset, what };
            if page >= pages {
                return Err(ApplyError::PageOutOfRange {
                    page,
                    pages,
                    offset,
                });
            }
            match record {
                Record::Zero | Record::Raw(_) => {}
                Record::Lz4(data) => {
                    let n = lz4_flex::block::decompress_into(data, &mut self.scratch)
                        .map_err(|_| bad("lz4 page does not decompress"))?;
                    if n != PAGE_SIZE {
                        return Err(bad("lz4 page does not decompress to one page"));
                    }
                }
                Record::Runs(data) => {
                    runs::validate(data, PAGE_SIZE).map_err(|e| bad(e.describe()))?;
                }
                Record::Blocks(b) => {
                    let mut shared = 0;
                    for (n, index) in set_bits(b.mask).enumerate() {
                        if b.op(n) != BlockOp::Shared {
                            continue;
                        }
                        let (target, target_block) = b.reference(shared);
                        shared += 1;
                        let target = u64::from(target);
                        // A shared block copies a block this epoch already wrote: an
                        // earlier page, or an earlier block of this page.
                        let earlier = if target == page {
                            usize::from(target_block) < index
                        } else {
                            target < pages && self.written.contains(target)
                        };
                        if !earlier {
                            return Err(bad(
                                "shared block refers to a block not written earlier in the epoch",
                            ));
                        }
                        if target_block >= bpp {
                            return Err(bad("shared block refers to a block past the page"));
                        }
                    }
                    if b.compressed {
                        let n = lz4_flex::block::decompress_into(b.payload, &mut self.scratch)
                            .map_err(|_| bad("lz4 block payload does not decompress"))?;
                        if n != b.raw_blocks * block {
                            return Err(bad("lz4 block payload has the wrong length"));
                        }
                    }
                }
            }
            if !self.written.insert(page) {
                return Err(ApplyError::DuplicatePage { page, offset });
            }
            count += 1;
        }
        Ok(count)
    }

    /// Second pass: writes one validated record into the replica.
    fn write_page(&mut self, memory: &mut [u8], page: u64, record: &Record<'_>) {
        let range = self.geometry.page_range(page);
        match *record {
            Record::Zero => memory[range].fill(0),
            Record::Raw(data) => memory[range].copy_from_slice(data),
            Record::Lz4(data) => {
                // Validated: decompresses to exactly one page.
                let _ = lz4_flex::block::decompress_into(data, &mut memory[range]);
            }
            Record::Runs(data) => {
                // Validated: stays inside the page.
                let _ = runs::decode(data, &mut memory[range]);
            }
            Record::Blocks(b) => self.write_blocks(memory, range.start, &b),
        }
    }

    fn write_blocks(&mut self, memory: &mut [u8], page_start: usize, b: &BlocksRecord<'_>) {
        let block = self.geometry.block_size();
        let payload: &[u8] = if b.compressed {
            // Validated: decompresses to exactly raw_blocks blocks.
            let _ = lz4_flex::block::decompress_into(b.payload, &mut self.scratch);
            &self.scratch[..b.raw_blocks * block]
        } else {
            b.payload
        };
        let (mut raw, mut shared) = (0, 0);
        for (n, index) in set_bits(b.mask).enumerate() {
            let at = page_start + index * block;
            match b.op(n) {
                BlockOp::Raw => {
                    memory[at..at + block]
                        .copy_from_slice(&payload[raw * block..(raw + 1) * block]);
                    raw += 1;
                }
                BlockOp::Zero => memory[at..at + block].fill(0),
                BlockOp::Shared => {
                    let (page, target) = b.reference(shared);
                    let from = page as usize * PAGE_SIZE + usize::from(target) * block;
                    memory.copy_within(from..from + block, at);
                    shared += 1;
                }
            }
        }
    }
}
