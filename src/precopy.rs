//! Initial sync by iterative pre-copy: a backup that joins empty receives the whole
//! memory while the program keeps running, then the continuous checkpoints.
//!
//! [`PreCopy`] sends memory in rounds. The first round sends every page that may
//! differ from the backup's empty replica (all of them, or, for a program never
//! replicated, the pages its harvests reported); each later round sends the pages
//! written during the round before. The pages are read from the program's live
//! memory, not a checkpoint, a bounded chunk ([`CHUNK_PAGES`]) per call, one call
//! per epoch: each chunk is an epoch flagged pre-copy (docs/wire-format.md), which
//! the backup applies and acknowledges but never fails over to. Every call stops the
//! program only to harvest its dirty pages (no page is copied in that pause).
//!
//! A page read while the program writes it may reach the backup as bytes no moment
//! of the program held, and the encoder's digests of it may describe other bytes
//! than those sent. Every such page was written after the harvest before the read,
//! so the next harvest reports it: the next round sends it whole
//! ([`Encoder::resend`]: no digest comparison, no delta), and so does the final
//! checkpoint for the pages of the last harvests. The rounds stop when the pages
//! written during one fit in [`FINAL_PAGES`], when they are not an eighth fewer than
//! the round sent (the program writes about as fast as the rounds send: more rounds
//! would not shrink the pause), or after [`MAX_ROUNDS`] rounds; the next checkpoint (a normal pause)
//! then copies what is left, and protection starts once the backup committed it.

use std::time::{Duration, Instant};

use fgbi_engine::{EncodeError, Encoder};
use fgbi_hyp::protected::{HypError, Protected};
use fgbi_transport::{Primary, Reply, TransportError};

use crate::fault::{self, Point};
use crate::local::ReplicationError;
use crate::primary::{PrimaryEvent, Shipped};

/// Pages one pre-copy epoch sends at most (8 MiB of memory): what bounds the
/// encoder's output and the time one call takes from the program's epoch.
pub const CHUNK_PAGES: usize = 2048;

/// Pre-copy ends when the pages written during a round are at most this many (1 MiB),
/// so the pause of the checkpoint that ends initial sync stays small.
pub const FINAL_PAGES: u64 = 256;

/// Pre-copy ends after this many rounds even if the program writes faster than the
/// rounds converge; the final checkpoint then copies what the last round left.
pub const MAX_ROUNDS: u32 = 6;

/// A set of page numbers, one bit each.
struct PageSet {
    pages: u64,
    words: Vec<u64>,
    len: u64,
    /// No page below `first * 64` is in the set.
    first: usize,
}

impl PageSet {
    fn new(pages: u64) -> Self {
        Self {
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
            len: 0,
            first: 0,
        }
    }

    /// Adds `page` (the caller keeps it inside memory; one outside is left out).
    fn insert(&mut self, page: u64) {
        let (word, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        let fresh = self
            .words
            .get_mut(word)
            .filter(|w| page < self.pages && **w & bit == 0);
        if let Some(w) = fresh {
            *w |= bit;
            self.len += 1;
            self.first = self.first.min(word);
        }
    }

    /// Moves up to `max` of the lowest pages into `out` (cleared first).
    fn take_lowest(&mut self, max: usize, out: &mut Vec<u64>) {
        out.clear();
        while out.len() < max && self.first < self.words.len() {
            let word = &mut self.words[self.first];
            if *word == 0 {
                self.first += 1;
                continue;
            }
            let bit = word.trailing_zeros();
            *word &= *word - 1;
            out.push(self.first as u64 * 64 + u64::from(bit));
        }
        self.len -= out.len() as u64;
    }
}

/// Where initial sync stands; see the module documentation.
pub struct PreCopy {
    /// Pages still to send in this round.
    round: PageSet,
    /// Pages written since this round began: the next round's, sent whole.
    written: PageSet,
    /// This round's number, from 0.
    number: u32,
    /// Pages this round had to send when it began.
    size: u64,
    /// No harvest yet: the first one belongs to round 0 (nothing was read before it).
    fresh: bool,
    harvested: Vec<u64>,
    chunk: Vec<u64>,
}

/// What one call of [`PreCopy::step`] did.
pub enum Step {
    /// A chunk was sent; the caller reports what became of it.
    Sent(Shipped),
    /// The link broke while sending a chunk (the epoch is lost, its pages carried).
    Broken(Shipped, TransportError),
    /// The rounds are over: the caller takes the final checkpoint now, with
    /// [`Encoder::resend`] of its dirty pages, and is protected once it commits.
    Final,
}

impl PreCopy {
    /// Initial sync of `pages` pages of memory to an empty backup, the first round
    /// sending `first` (with whatever the first harvest reports).
    pub fn new(pages: u64, first: impl IntoIterator<Item = u64>) -> Self {
        let mut round = PageSet::new(pages);
        first.into_iter().for_each(|p| round.insert(p));
        Self {
            round,
            written: PageSet::new(pages),
            number: 0,
            size: 0,
            fresh: true,
            harvested: Vec::new(),
            chunk: Vec::with_capacity(CHUNK_PAGES),
        }
    }

    /// One call per epoch while syncing: stops `program` to harvest its dirty pages,
    /// then sends the next chunk of the round from its live memory through
    /// `primary` and waits up to `timeout` for the answer.
    pub fn step<P: Protected + ?Sized>(
        &mut self,
        program: &mut P,
        encoder: &mut Encoder,
        primary: &mut Primary,
        timeout: Duration,
        event: &mut dyn FnMut(PrimaryEvent),
    ) -> Result<Step, ReplicationError> {
        if !self.fresh && self.round.len == 0 {
            // Converged, or the round did not shrink the set by an eighth.
            let converged = self.written.len <= FINAL_PAGES || self.written.len * 8 > self.size * 7;
            if converged || self.number + 1 >= MAX_ROUNDS {
                // The final checkpoint sends these whole, with its own dirty pages.
                self.written.take_lowest(usize::MAX, &mut self.chunk);
                encoder.resend(&self.chunk)?;
                return Ok(Step::Final);
            }
            std::mem::swap(&mut self.round, &mut self.written);
            self.number += 1;
            self.size = self.round.len;
        }
        let pause = self.harvest(program)?;
        let pages = self.round.pages;
        if let Some(&page) = self.harvested.iter().find(|&&p| p >= pages) {
            return Err(EncodeError::PageOutOfRange { page, pages }.into());
        }
        let into = match std::mem::take(&mut self.fresh) {
            true => &mut self.round,
            false => &mut self.written,
        };
        self.harvested.iter().for_each(|&p| into.insert(p));
        if self.number == 0 {
            self.size = self.size.max(self.round.len);
        }
        self.round.take_lowest(CHUNK_PAGES, &mut self.chunk);
        let encoded = if self.number == 0 {
            encoder.encode_precopy(&self.chunk, program.memory())?
        } else {
            // What the backup holds of these pages is unknown: they go whole.
            encoder.resend(&self.chunk)?;
            encoder.encode_precopy(&[], program.memory())?
        };
        let shipped = Shipped {
            epoch: encoded.stats.epoch,
            dirty_pages: encoded.stats.dirty_pages,
            bytes: encoded.stats.bytes,
            pause,
        };
        let reply = primary
            .send_epoch(&encoded)
            .and_then(|()| primary.wait_reply(timeout));
        match reply {
            Ok(Reply::Committed(n)) => {
                encoder.acknowledge(n)?;
                event(PrimaryEvent::Synced {
                    epoch: n,
                    round: self.number,
                    pages: shipped.dirty_pages,
                    bytes: shipped.bytes,
                    pause,
                    left: self.round.len,
                });
                fault::reached(Point::Sync);
                Ok(Step::Sent(shipped))
            }
            Ok(Reply::Refused { epoch, .. }) => {
                encoder.lose(epoch)?;
                Ok(Step::Sent(shipped))
            }
            Err(e) => {
                encoder.lose(shipped.epoch)?;
                Ok(Step::Broken(shipped, e))
            }
        }
    }

    /// Stops `program` just long enough to harvest its dirty pages into
    /// `self.harvested`; returns the pause.
    fn harvest<P: Protected + ?Sized>(&mut self, program: &mut P) -> Result<Duration, HypError> {
        let stopped = Instant::now();
        program.stop()?;
        self.harvested.clear();
        let harvested = program.harvest(&mut self.harvested);
        // Never leave the program stopped, whatever failed.
        let resumed = program.resume();
        let pause = stopped.elapsed();
        harvested?;
        resumed?;
        Ok(pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sets_hand_out_their_lowest_pages_once() {
        let mut set = PageSet::new(200);
        for p in [130, 3, 64, 3, 199, 0] {
            set.insert(p);
        }
        set.insert(200);
        assert_eq!(set.len, 5);
        let mut out = Vec::new();
        set.take_lowest(2, &mut out);
        assert_eq!(out, [0, 3]);
        set.insert(1);
        set.take_lowest(10, &mut out);
        assert_eq!(out, [1, 64, 130, 199]);
        assert_eq!(set.len, 0);
        set.take_lowest(10, &mut out);
        assert!(out.is_empty());
    }
}
