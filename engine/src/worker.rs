//! One pipeline worker: owns an interleaved stripe of pages and everything about
//! them (their digests, their cached previous contents, their undo logs), and turns
//! the dirty ones into page records. Workers share nothing, so the hot path takes no
//! lock; a page always belongs to the same worker for a given worker count.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use crate::config::{EncoderConfig, Mode};
use crate::digest::{DigestTable, is_zero};
use crate::geometry::{Geometry, PAGE_SIZE};
use crate::page_cache::PageCache;
use crate::runs;
use crate::sharing::{BlockAddress, BlockIndex};
use crate::source::PageSource;
use crate::stats::EncodingCounts;
use crate::wire::{
    BlockOp, FrameKind, FrameWriter, MAX_RECORD_BYTES, RECORD_HEADER_BYTES, RecordKind,
};

/// Pages per stripe: worker `w` owns stripes `w, w + N, w + 2N, ...`.
pub const STRIPE_PAGES: u64 = 512;

/// lz4 is tried only when the best encoding so far is at least this large.
pub const LZ4_MIN_CANDIDATE: usize = 512;

/// Size of a whole raw page record.
const RAW_PAGE_RECORD: usize = RECORD_HEADER_BYTES + PAGE_SIZE;

/// Which worker owns `page` among `workers`.
#[inline]
pub fn owner(page: u64, workers: usize) -> usize {
    ((page / STRIPE_PAGES) % workers as u64) as usize
}

/// Index of `page` among the pages its owner holds.
#[inline]
fn local_index(page: u64, workers: usize) -> usize {
    let stripe = page / STRIPE_PAGES;
    ((stripe / workers as u64) * STRIPE_PAGES + page % STRIPE_PAGES) as usize
}

/// Number of pages worker `index` owns.
fn owned_pages(pages: u64, workers: usize, index: usize) -> usize {
    let stripes = pages.div_ceil(STRIPE_PAGES);
    let mine = stripes / workers as u64 + u64::from((stripes % workers as u64) > index as u64);
    (mine * STRIPE_PAGES) as usize
}

/// Backs lz4 off on incompressible data: after repeated attempts that did not win,
/// skip a growing number of candidates before probing again.
#[derive(Default)]
struct Lz4Governor {
    skip: u32,
    misses: u32,
    backoff: u32,
}

impl Lz4Governor {
    fn allows(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    fn record(&mut self, won: bool) {
        if won {
            self.misses = 0;
            self.backoff = 0;
            return;
        }
        self.misses += 1;
        if self.misses >= 4 {
            self.backoff = (self.backoff * 2).clamp(16, 1024);
            self.skip = self.backoff;
            self.misses = 0;
        }
    }
}

/// What an in-flight epoch changed in this worker, to undo it if the epoch is lost.
struct Undo {
    epoch: u64,
    /// Local page indices whose digests this epoch overwrote, with the blocks changed.
    pages: Vec<(usize, u128)>,
    /// The previous digests of those blocks, in page then block order.
    digests: Vec<u64>,
}

/// Reused per-page buffers.
#[derive(Default)]
struct Scratch {
    new: Vec<u64>,
    ops: Vec<u8>,
    refs: Vec<u8>,
    payload: Vec<u8>,
    runs: Vec<u8>,
    lz4: Vec<u8>,
}

/// The encoding picked for one page.
enum Choice {
    Blocks,
    BlocksLz4,
    Raw,
    Lz4Page,
    Runs,
}

/// One worker's output for one epoch.
#[derive(Default)]
pub struct WorkerOutput {
    /// Pages frames, back to back.
    pub frames: FrameWriter,
    /// Checksums of those frames, in order.
    pub checksums: Vec<u64>,
    /// Page records written.
    pub records: u64,
    /// What was chosen.
    pub counts: EncodingCounts,
}

/// A pipeline worker and the state of the pages it owns.
pub struct Worker {
    index: usize,
    workers: usize,
    geometry: Geometry,
    mode: Mode,
    sharing: bool,
    compression: bool,
    chunk_bytes: usize,
    digests: Option<DigestTable>,
    cache: PageCache,
    shared: BlockIndex,
    undo: VecDeque<Undo>,
    /// Undo logs of acknowledged epochs, kept for their allocations.
    spare_undo: Vec<Undo>,
    lz4: Lz4Governor,
    scratch: Scratch,
    /// Owned pages (local index) whose content on the backup is unknown, so they
    /// are sent whole: 0 until an epoch sends them, then that epoch until it is
    /// acknowledged (a roll-back puts them back to 0).
    forgotten: HashMap<usize, u64>,
    /// This epoch's output.
    pub output: WorkerOutput,
}

impl Worker {
    /// Worker `index` of `config.workers`.
    pub fn new(config: &EncoderConfig, index: usize) -> Self {
        let geometry = config.geometry;
        let owned = owned_pages(geometry.pages(), config.workers, index);
        let digests = (config.mode == Mode::Fgbi).then(|| DigestTable::new(&geometry, owned));
        // A cache with a slot for every page of memory holds all it can: a larger
        // budget would only cost memory (and the time to touch it).
        let cache_bytes = if config.mode.uses_cache() {
            let every_page = usize::try_from(geometry.pages())
                .map_or(usize::MAX, |pages| pages.next_power_of_two() * PAGE_SIZE);
            (config.cache_bytes / config.workers).min(every_page)
        } else {
            0
        };
        Self {
            index,
            workers: config.workers,
            geometry,
            mode: config.mode,
            sharing: config.sharing,
            compression: config.compression,
            chunk_bytes: config.chunk_bytes,
            digests,
            cache: PageCache::new(cache_bytes),
            shared: BlockIndex::new(),
            undo: VecDeque::new(),
            spare_undo: Vec::new(),
            lz4: Lz4Governor::default(),
            scratch: Scratch::default(),
            forgotten: HashMap::new(),
            output: WorkerOutput::default(),
        }
    }

    /// Bytes of memory this worker keeps: digests and page cache.
    pub fn overhead_bytes(&self) -> (usize, usize) {
        (
            self.digests.as_ref().map_or(0, DigestTable::bytes),
            self.cache.capacity_bytes(),
        )
    }

    /// Encodes `pages` (sorted, all owned by this worker) of `memory` into
    /// `self.output` as epoch `epoch`.
    pub fn encode(&mut self, epoch: u64, pages: &[u64], memory: &(impl PageSource + ?Sized)) {
        self.output.frames.buf.clear();
        self.output.checksums.clear();
        self.output.records = 0;
        self.output.counts = EncodingCounts::default();
        self.shared.clear();
        let bpp = self.geometry.blocks_per_page();
        let mut undo = self.spare_undo.pop().unwrap_or(Undo {
            epoch,
            pages: Vec::new(),
            digests: Vec::new(),
        });
        undo.epoch = epoch;
        undo.pages.clear();
        undo.digests.clear();
        self.undo.push_back(undo);
        self.scratch.new.resize(bpp, 0);
        for &page in pages {
            debug_assert_eq!(owner(page, self.workers), self.index);
            if self.output.frames.body_len() + MAX_RECORD_BYTES > self.chunk_bytes {
                self.close_frame();
            }
            if !self.output.frames.is_open() {
                self.output.frames.begin(FrameKind::Pages, epoch);
            }
            let data = memory.page(page);
            let local = local_index(page, self.workers);
            let before = self.output.frames.buf.len();
            match self.mode {
                Mode::Remus | Mode::Llm => self.raw_page(page, data),
                Mode::Xbzrle => self.xbzrle_page(epoch, page, local, data),
                Mode::Fgbi => self.fgbi_page(epoch, page, local, data, memory),
            }
            if self.output.frames.buf.len() != before {
                self.output.records += 1;
            }
        }
        self.close_frame();
    }

    fn close_frame(&mut self) {
        if self.output.frames.is_open() {
            let checksum = self.output.frames.finish();
            self.output.checksums.push(checksum);
        }
    }

    fn raw_page(&mut self, page: u64, data: &[u8]) {
        let out = &mut self.output.frames;
        out.record(RecordKind::RawPage, page as u32);
        out.buf.extend_from_slice(data);
        self.output.counts.raw_page += 1;
    }

    fn zero_page(&mut self, page: u64) {
        self.output.frames.record(RecordKind::ZeroPage, page as u32);
        self.output.counts.zero_page += 1;
    }

    /// QEMU's XBZRLE path: zero page, else run delta against the cached copy (raw on
    /// overflow, nothing when unchanged), else raw and cached.
    fn xbzrle_page(&mut self, epoch: u64, page: u64, local: usize, data: &[u8]) {
        if is_zero(data) {
            self.zero_page(page);
            self.refresh_cache(local, data, epoch, None);
            return;
        }
        let Some(old) = self.cache.get(local as u64) else {
            self.raw_page(page, data);
            self.cache.insert(local as u64, data, epoch);
            return;
        };
        self.output.counts.cache_hits += 1;
        let runs = &mut self.scratch.runs;
        runs.clear();
        match runs::encode(
            old,
            data,
            std::iter::once(0..PAGE_SIZE),
            runs,
            PAGE_SIZE - 2,
            false,
        ) {
            Some(0) => self.output.counts.unchanged += 1,
            Some(len) => {
                let out = &mut self.output.frames;
                out.record(RecordKind::Runs, page as u32);
                out.buf.extend_from_slice(&(len as u16).to_le_bytes());
                out.buf.extend_from_slice(runs);
                self.output.counts.runs += 1;
            }
            None => self.raw_page(page, data),
        }
        self.refresh_cache(local, data, epoch, None);
    }

    /// Makes the cache hold `data` for `local`: in place when cached (only the
    /// blocks in `changed` when given), else by insertion.
    fn refresh_cache(&mut self, local: usize, data: &[u8], epoch: u64, changed: Option<u128>) {
        let block = self.geometry.block_size();
        if let Some(cached) = self.cache.get_mut(local as u64, epoch) {
            match changed {
                Some(mask) => {
                    for range in changed_ranges(mask, block) {
                        cached[range.clone()].copy_from_slice(&data[range]);
                    }
                }
                None => cached.copy_from_slice(data),
            }
        } else {
            self.cache.insert(local as u64, data, epoch);
        }
    }

    /// The FGBI path: re-hash, find changed blocks, share, pick the cheapest encoding.
    fn fgbi_page(
        &mut self,
        epoch: u64,
        page: u64,
        local: usize,
        data: &[u8],
        memory: &(impl PageSource + ?Sized),
    ) {
        let block = self.geometry.block_size();
        let bpp = self.geometry.blocks_per_page();
        let Some(table) = self.digests.as_mut() else {
            return;
        };
        let s = &mut self.scratch;
        let Some(undo) = self.undo.back_mut() else {
            return;
        };
        // The table moves forward, and the epoch records how to move it back.
        let mask = table.identify(local, data, &mut s.new, &mut undo.digests);
        if mask != 0 {
            undo.pages.push((local, mask));
        }
        if let Some(sent) = self.forgotten.get_mut(&local) {
            // What the backup holds is unknown: the page goes whole.
            *sent = epoch;
            self.raw_page(page, data);
            self.refresh_cache(local, data, epoch, None);
            return;
        }
        let counts = &mut self.output.counts;
        if mask == 0 {
            counts.unchanged += 1;
            return;
        }
        let zero = table.zero_digest();
        let changed = mask.count_ones() as usize;
        counts.changed_blocks += changed as u64;

        if s.new.iter().all(|&d| d == zero) && is_zero(data) {
            self.zero_page(page);
            self.refresh_cache(local, data, epoch, Some(mask));
            return;
        }

        // Classify the changed blocks: zero, shared with a block sent earlier in the
        // epoch (bytes compared, never the digest alone), or raw.
        s.ops.clear();
        s.ops.resize(changed.div_ceil(4), 0);
        s.refs.clear();
        s.payload.clear();
        let page32 = page as u32;
        if self.sharing {
            for b in set_bits(mask) {
                self.shared.prefetch(s.new[b]);
            }
        }
        for (n, b) in set_bits(mask).enumerate() {
            let bytes = &data[b * block..(b + 1) * block];
            let digest = s.new[b];
            let here = BlockAddress {
                page: page32,
                block: b as u16,
            };
            let op = if digest == zero && is_zero(bytes) {
                counts.zero_blocks += 1;
                BlockOp::Zero
            } else if !self.sharing {
                BlockOp::Raw
            } else if let Some(at) = self.shared.find_or_insert(digest, here) {
                let target = memory.page(u64::from(at.page));
                let start = usize::from(at.block) * block;
                if target[start..start + block] == *bytes {
                    counts.shared_blocks += 1;
                    s.refs.extend_from_slice(&at.page.to_le_bytes());
                    s.refs.extend_from_slice(&at.block.to_le_bytes());
                    BlockOp::Shared
                } else {
                    counts.collisions += 1;
                    BlockOp::Raw
                }
            } else {
                BlockOp::Raw
            };
            if op == BlockOp::Raw {
                s.payload.extend_from_slice(bytes);
            }
            s.ops[n / 4] |= (op as u8) << ((n % 4) * 2);
        }
        let header = RECORD_HEADER_BYTES + self.geometry.mask_bytes() + s.ops.len() + s.refs.len();
        let mut best = (Choice::Blocks, header + s.payload.len());
        if RAW_PAGE_RECORD < best.1 {
            best = (Choice::Raw, RAW_PAGE_RECORD);
        }

        // Run delta against the cached previous contents: cheap, over changed blocks only.
        s.runs.clear();
        if let Some(old) = self.cache.get(local as u64) {
            counts.cache_hits += 1;
            // Worth it only if it saves a sixteenth; paced, it gives up early on dense
            // changes (random data runs a byte or two above raw).
            let limit = (best.1 - best.1 / 16).saturating_sub(RECORD_HEADER_BYTES + 2);
            if let Some(len) = runs::encode(
                old,
                data,
                changed_ranges(mask, block),
                &mut s.runs,
                limit,
                true,
            ) {
                if len > 0 {
                    best = (Choice::Runs, RECORD_HEADER_BYTES + 2 + len);
                }
            }
        }

        // lz4 only where it can pay, and not while it keeps failing.
        if self.compression && best.1 >= LZ4_MIN_CANDIDATE && self.lz4.allows() {
            let before = best.1;
            counts.lz4_attempts += 1;
            s.lz4.clear();
            if changed * 2 >= bpp {
                if let Some(len) = lz4_into(data, &mut s.lz4, best.1) {
                    best = (Choice::Lz4Page, RECORD_HEADER_BYTES + 2 + len);
                }
            } else if s.payload.len() >= LZ4_MIN_CANDIDATE / 2 {
                let limit = best.1.saturating_sub(header + 2);
                if let Some(len) = lz4_into(&s.payload, &mut s.lz4, limit) {
                    best = (Choice::BlocksLz4, header + 2 + len);
                }
            }
            self.lz4.record(best.1 + best.1 / 8 < before);
        }

        let out = &mut self.output.frames;
        match best.0 {
            Choice::Raw => {
                out.record(RecordKind::RawPage, page32);
                out.buf.extend_from_slice(data);
                counts.raw_page += 1;
            }
            Choice::Lz4Page => {
                out.record(RecordKind::Lz4Page, page32);
                out.buf
                    .extend_from_slice(&(s.lz4.len() as u16).to_le_bytes());
                out.buf.extend_from_slice(&s.lz4);
                counts.lz4_page += 1;
            }
            Choice::Runs => {
                out.record(RecordKind::Runs, page32);
                out.buf
                    .extend_from_slice(&(s.runs.len() as u16).to_le_bytes());
                out.buf.extend_from_slice(&s.runs);
                counts.runs += 1;
            }
            Choice::Blocks | Choice::BlocksLz4 => {
                let compressed = matches!(best.0, Choice::BlocksLz4);
                out.record(
                    if compressed {
                        RecordKind::BlocksLz4
                    } else {
                        RecordKind::Blocks
                    },
                    page32,
                );
                out.buf
                    .extend_from_slice(&mask.to_le_bytes()[..self.geometry.mask_bytes()]);
                out.buf.extend_from_slice(&s.ops);
                out.buf.extend_from_slice(&s.refs);
                if compressed {
                    out.buf
                        .extend_from_slice(&(s.lz4.len() as u16).to_le_bytes());
                    out.buf.extend_from_slice(&s.lz4);
                    counts.blocks_lz4 += 1;
                } else {
                    out.buf.extend_from_slice(&s.payload);
                    counts.blocks += 1;
                }
            }
        }

        self.refresh_cache(local, data, epoch, Some(mask));
    }

    /// Forgets the undo logs of epochs up to `epoch`: the backup committed them.
    pub fn acknowledge(&mut self, epoch: u64) {
        self.forgotten.retain(|_, sent| *sent == 0 || *sent > epoch);
        while self.undo.front().is_some_and(|u| u.epoch <= epoch) {
            if let Some(undo) = self.undo.pop_front() {
                self.spare_undo.push(undo);
            }
        }
    }

    /// Undoes every epoch from `epoch` on (newest first): restores the digests and
    /// drops the cached copies of `lost_pages` (all pages dirty in those epochs).
    pub fn roll_back(&mut self, epoch: u64, lost_pages: &[u64]) {
        while self.undo.back().is_some_and(|u| u.epoch >= epoch) {
            let Some(undo) = self.undo.pop_back() else {
                break;
            };
            if let Some(table) = self.digests.as_mut() {
                let mut end = undo.digests.len();
                for &(local, mask) in undo.pages.iter().rev() {
                    let start = end - mask.count_ones() as usize;
                    table.restore(local, mask, &undo.digests[start..end]);
                    end = start;
                }
            }
            self.spare_undo.push(undo);
        }
        for sent in self.forgotten.values_mut() {
            if *sent >= epoch {
                *sent = 0;
            }
        }
        for &page in lost_pages {
            if owner(page, self.workers) == self.index {
                self.cache
                    .invalidate(local_index(page, self.workers) as u64);
            }
        }
    }
}

impl Worker {
    /// The backup's copy of the owned ones of `pages` is unknown (a scrub found it
    /// diverged): each is sent whole, with no delta or digest comparison, until an
    /// epoch that sent it is acknowledged.
    pub fn forget(&mut self, pages: &[u64]) {
        for &page in pages {
            if owner(page, self.workers) == self.index {
                let local = local_index(page, self.workers);
                // Only digests can call a page unchanged; a dropped cached copy
                // makes the other modes send it whole.
                if self.digests.is_some() {
                    self.forgotten.insert(local, 0);
                }
                self.cache.invalidate(local as u64);
            }
        }
    }
}

/// Compresses `input` into `out`; `None` when the result exceeds `limit` bytes.
fn lz4_into(input: &[u8], out: &mut Vec<u8>, limit: usize) -> Option<usize> {
    out.resize(lz4_flex::block::get_maximum_output_size(input.len()), 0);
    let len = lz4_flex::block::compress_into(input, out).ok()?;
    out.truncate(len);
    (len <= limit && len <= u16::MAX as usize).then_some(len)
}

/// Indices of the set bits of `mask`, ascending.
#[inline]
pub fn set_bits(mut mask: u128) -> impl Iterator<Item = usize> + Clone {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let b = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            b
        })
    })
}

/// Byte ranges of the maximal runs of set bits of `mask`, for `block`-byte blocks.
#[inline]
pub fn changed_ranges(mut mask: u128, block: usize) -> impl Iterator<Item = Range<usize>> + Clone {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let start = mask.trailing_zeros() as usize;
            let run = (!(mask >> start)).trailing_zeros() as usize;
            mask &= !((u128::MAX >> (128 - run)) << start);
            start * block..(start + run) * block
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_partition_pages_exactly() {
        for workers in 1..=5 {
            let pages = 10 * STRIPE_PAGES + 17;
            let mut seen = vec![Vec::new(); workers];
            for page in 0..pages {
                seen[owner(page, workers)].push(local_index(page, workers));
            }
            for (w, locals) in seen.iter().enumerate() {
                let mut sorted = locals.clone();
                sorted.dedup();
                assert_eq!(sorted.len(), locals.len(), "locals are unique");
                assert!(locals.iter().all(|&l| l < owned_pages(pages, workers, w)));
            }
        }
    }

    #[test]
    fn changed_ranges_merge_adjacent_blocks() {
        let mask = 0b1110_0110u128 | (1u128 << 127);
        let ranges: Vec<_> = changed_ranges(mask, 32).collect();
        assert_eq!(ranges, vec![32..96, 160..256, 4064..4096]);
        assert_eq!(
            changed_ranges(u128::MAX, 32).collect::<Vec<_>>(),
            vec![0..4096]
        );
        assert_eq!(set_bits(0b1010).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn lz4_backs_off_and_recovers() {
        let mut g = Lz4Governor::default();
        for _ in 0..4 {
            assert!(g.allows());
            g.record(false);
        }
        let skipped = (0..100).take_while(|_| !g.allows()).count();
        assert_eq!(skipped, 16);
        g.record(true);
        assert!(g.allows());
    }
}
