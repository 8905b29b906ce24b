//! The primary's side: epochs as transactions over the workers.
//!
//! [`Encoder::encode`] turns one checkpoint's dirty pages into one epoch. The epoch
//! stays *in flight* until [`Encoder::acknowledge`] (the backup committed it) or
//! [`Encoder::lose`] (it was not acknowledged or was refused). A lost epoch, and every
//! epoch after it, is undone: digests and cached pages go back to what the backup
//! holds, and all their dirty pages are carried into the next epoch, which reuses the
//! lost epoch's number and base.

use std::collections::VecDeque;

use crate::config::EncoderConfig;
use crate::error::EncodeError;
use crate::source::PageSource;
use crate::stats::EncodingCounts;
use crate::threads::Crew;
use crate::wire::{self, CommitInfo, EpochHeader, FRAME_HEADER_BYTES, FrameWriter};
use crate::worker::{WorkerOutput, owner};

/// An epoch produced but not yet acknowledged.
struct InFlight {
    epoch: u64,
    dirty: Vec<u64>,
}

/// Summary of one encoded epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochStats {
    /// Epoch number.
    pub epoch: u64,
    /// Epoch the backup must be at to apply it.
    pub base: u64,
    /// Dirty pages encoded (including pages carried from lost epochs).
    pub dirty_pages: u64,
    /// Page records written.
    pub records: u64,
    /// Encoded bytes, all frames.
    pub bytes: u64,
    /// What the encoder chose.
    pub counts: EncodingCounts,
}

/// One encoded epoch: a sequence of byte slices to send in order.
pub struct EncodedEpoch<'a> {
    head: &'a [u8],
    workers: Vec<&'a WorkerOutput>,
    tail: &'a [u8],
    /// What it holds.
    pub stats: EpochStats,
}

impl EncodedEpoch<'_> {
    /// The epoch's bytes as consecutive slices (header, each worker's chunks, state and commit).
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.head)
            .chain(self.workers.iter().map(|w| w.frames.buf.as_slice()))
            .chain(std::iter::once(self.tail))
            .filter(|p| !p.is_empty())
    }

    /// Total encoded bytes.
    pub fn len(&self) -> usize {
        self.parts().map(<[u8]>::len).sum()
    }

    /// True when the epoch has no bytes (never: header and commit are always there).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the epoch into `out`, which must be exactly [`EncodedEpoch::len`] bytes.
    pub fn copy_to(&self, out: &mut [u8]) {
        let mut at = 0;
        for part in self.parts() {
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    }

    /// The epoch as one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for part in self.parts() {
            out.extend_from_slice(part);
        }
        out
    }
}

/// The primary's encoder: workers, in-flight epochs and pages carried from lost ones.
pub struct Encoder {
    config: EncoderConfig,
    crew: Crew,
    next_epoch: u64,
    committed: u64,
    in_flight: VecDeque<InFlight>,
    carry: Vec<u64>,
    /// Dirty lists of acknowledged epochs, kept for their allocations.
    spare: Vec<Vec<u64>>,
    plan: Vec<Vec<u64>>,
    head: FrameWriter,
    tail: FrameWriter,
}

impl Encoder {
    /// An encoder whose backup holds all-zero memory at epoch 0.
    pub fn new(config: EncoderConfig) -> Result<Self, EncodeError> {
        config.validate().map_err(EncodeError::Config)?;
        let crew = Crew::new(&config)?;
        Ok(Self {
            plan: vec![Vec::new(); config.workers],
            config,
            crew,
            next_epoch: 1,
            committed: 0,
            in_flight: VecDeque::new(),
            carry: Vec::new(),
            spare: Vec::new(),
            head: FrameWriter::default(),
            tail: FrameWriter::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// Last epoch the backup acknowledged.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Number of the next epoch [`Encoder::encode`] will produce.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// Pages that a lost epoch carried and the next epoch will carry again.
    pub fn carried_pages(&self) -> &[u64] {
        &self.carry
    }

    /// Adds `pages` to those the next epoch must carry whether or not they are dirty:
    /// every page, for a backup that joins empty while the program keeps running.
    pub fn carry(&mut self, pages: &[u64]) -> Result<(), EncodeError> {
        let limit = self.config.geometry.pages();
        if let Some(&page) = pages.iter().find(|&&p| p >= limit) {
            return Err(EncodeError::PageOutOfRange { page, pages: limit });
        }
        self.carry.extend_from_slice(pages);
        self.carry.sort_unstable();
        self.carry.dedup();
        Ok(())
    }

    /// The backup's copy of `pages` is known to be wrong (a scrub found it diverged):
    /// the next epoch carries them, and sends each whole, not as changed blocks or a
    /// delta against what the encoder believed the backup held. Should that epoch be
    /// lost, the one that replaces it does the same.
    pub fn resend(&mut self, pages: &[u64]) -> Result<(), EncodeError> {
        self.carry(pages)?;
        self.crew.forget(pages.to_vec());
        Ok(())
    }

    /// Memory the encoder keeps beside the protected memory: (digest bytes, cache bytes).
    pub fn overhead_bytes(&self) -> (usize, usize) {
        self.crew.overhead_bytes()
    }

    /// Upper bound on the size of an epoch of `pages` dirty pages and a `state_len`
    /// state blob, for reserving transport buffers before encoding.
    pub fn max_epoch_bytes(&self, pages: usize, state_len: usize) -> usize {
        self.config.max_epoch_bytes(pages, state_len)
    }

    /// Encodes the checkpoint `memory` whose pages `dirty` changed since the last
    /// epoch, with the machine-state blob `state`, as the next epoch.
    ///
    /// `dirty` may be in any order and hold duplicates. Pages carried from lost
    /// epochs are added. On error nothing moves forward.
    pub fn encode<'a, S: PageSource + ?Sized>(
        &'a mut self,
        dirty: &[u64],
        memory: &S,
        state: &[u8],
    ) -> Result<EncodedEpoch<'a>, EncodeError> {
        self.encode_as(false, dirty, memory, state)
    }

    /// Encodes `pages` of `memory` as the next epoch, flagged as a round of initial
    /// sync (pre-copy, [`crate::wire::FLAG_PRECOPY`]), with an empty state blob: the
    /// backup applies it but must not fail over to the replica it leaves. `memory`
    /// may be the program's live memory, read while it runs; a page written while it
    /// was read must then be passed to [`Encoder::resend`] before it is encoded again,
    /// since its digests may describe bytes the backup never received. Pages carried
    /// from lost epochs are added, as for [`Encoder::encode`].
    pub fn encode_precopy<'a, S: PageSource + ?Sized>(
        &'a mut self,
        pages: &[u64],
        memory: &S,
    ) -> Result<EncodedEpoch<'a>, EncodeError> {
        self.encode_as(true, pages, memory, &[])
    }

    fn encode_as<'a, S: PageSource + ?Sized>(
        &'a mut self,
        precopy: bool,
        dirty: &[u64],
        memory: &S,
        state: &[u8],
    ) -> Result<EncodedEpoch<'a>, EncodeError> {
        let geometry = self.config.geometry;
        if memory.len_bytes() != geometry.mem_bytes() {
            return Err(EncodeError::MemoryLength {
                expected: geometry.mem_bytes(),
                got: memory.len_bytes(),
            });
        }
        if let Some(&page) = dirty.iter().find(|&&p| p >= geometry.pages()) {
            return Err(EncodeError::PageOutOfRange {
                page,
                pages: geometry.pages(),
            });
        }
        if state.len() > u32::MAX as usize {
            return Err(EncodeError::StateTooLarge(state.len()));
        }
        let mut pages = self.spare.pop().unwrap_or_default();
        pages.clear();
        pages.extend_from_slice(dirty);
        pages.extend_from_slice(&self.carry);
        pages.sort_unstable();
        pages.dedup();
        if let Some(&page) = pages.iter().find(|&&p| !memory.holds(p)) {
            self.spare.push(pages);
            return Err(EncodeError::PageNotCaptured(page));
        }

        let n = self.config.workers;
        for plan in &mut self.plan {
            plan.clear();
        }
        for &page in &pages {
            self.plan[owner(page, n)].push(page);
        }

        let epoch = self.next_epoch;
        let base = epoch - 1;
        if let Err(e) = self.crew.encode(epoch, &mut self.plan, memory) {
            self.crew.roll_back(epoch, pages);
            return Err(e);
        }

        let config = &self.config;
        self.head.buf.clear();
        let mut chain = wire::chain(
            0,
            self.head.header(&EpochHeader {
                epoch,
                base,
                mode: config.mode.wire_id(),
                block_size: geometry.block_size() as u32,
                mem_bytes: geometry.mem_bytes(),
                precopy,
            }),
        );
        let mut frames = 1u32;
        let mut bytes = self.head.buf.len() as u64;
        let mut counts = EncodingCounts::default();
        let mut records = 0;
        let outputs = self.crew.outputs();
        for output in &outputs {
            for &c in &output.checksums {
                chain = wire::chain(chain, c);
            }
            frames += output.checksums.len() as u32;
            bytes += output.frames.buf.len() as u64;
            counts += output.counts;
            records += output.records;
        }
        self.tail.buf.clear();
        chain = wire::chain(chain, self.tail.state(epoch, state));
        frames += 1;
        bytes += self.tail.buf.len() as u64;
        self.tail.commit(
            epoch,
            &CommitInfo {
                frames,
                bytes,
                records,
                chain,
            },
        );
        let total = bytes + self.tail.buf.len() as u64 - (FRAME_HEADER_BYTES + state.len()) as u64;

        self.carry.clear();
        self.in_flight.push_back(InFlight {
            epoch,
            dirty: pages,
        });
        self.next_epoch += 1;
        let dirty_pages = self.in_flight.back().map_or(0, |f| f.dirty.len() as u64);
        Ok(EncodedEpoch {
            head: &self.head.buf,
            workers: outputs,
            tail: &self.tail.buf,
            stats: EpochStats {
                epoch,
                base,
                dirty_pages,
                records,
                bytes: total,
                counts,
            },
        })
    }

    fn in_flight_range(&self) -> (u64, u64) {
        (
            self.in_flight.front().map_or(0, |f| f.epoch),
            self.in_flight.back().map_or(0, |f| f.epoch),
        )
    }

    fn check_in_flight(&self, epoch: u64) -> Result<(), EncodeError> {
        let (first, last) = self.in_flight_range();
        if self.in_flight.is_empty() || epoch < first || epoch > last {
            return Err(EncodeError::NotInFlight { epoch, first, last });
        }
        Ok(())
    }

    /// The backup committed every epoch up to and including `epoch`: their digests
    /// and cached pages become the committed basis.
    pub fn acknowledge(&mut self, epoch: u64) -> Result<(), EncodeError> {
        self.check_in_flight(epoch)?;
        while self.in_flight.front().is_some_and(|f| f.epoch <= epoch) {
            if let Some(f) = self.in_flight.pop_front() {
                self.spare.push(f.dirty);
            }
        }
        self.crew.acknowledge(epoch);
        self.committed = epoch;
        Ok(())
    }

    /// Epoch `epoch` was lost (not acknowledged, or refused): it and every later
    /// in-flight epoch are undone, and all their dirty pages go into the next epoch,
    /// which will be numbered `epoch` again.
    pub fn lose(&mut self, epoch: u64) -> Result<(), EncodeError> {
        self.check_in_flight(epoch)?;
        let mut lost = std::mem::take(&mut self.carry);
        while self.in_flight.back().is_some_and(|f| f.epoch >= epoch) {
            if let Some(f) = self.in_flight.pop_back() {
                lost.extend_from_slice(&f.dirty);
            }
        }
        lost.sort_unstable();
        lost.dedup();
        self.carry = lost.clone();
        self.crew.roll_back(epoch, lost);
        self.next_epoch = epoch;
        Ok(())
    }

    /// Loses every in-flight epoch (the connection to the backup broke).
    pub fn lose_all(&mut self) {
        if let Some(first) = self.in_flight.front().map(|f| f.epoch) {
            // The epoch is in flight by construction.
            let _ = self.lose(first);
        }
    }
}
