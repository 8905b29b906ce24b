//! Block sharing: an index of the blocks already sent in the current epoch.
//!
//! Keyed by block digest (already uniformly distributed, so it is its own hash),
//! open addressing with linear probing, cleared in O(1) between epochs by a
//! generation stamp. A hit is only a candidate: the encoder compares the bytes
//! before it sends a reference.
//!
//! The index is sized to the epoch: it shrinks back at the start of an epoch when the
//! last one used a small part of it (a full-memory sync must not leave a huge, cold
//! table behind for the small epochs that follow), and it stops growing at
//! [`MAX_SLOTS`] (16 MiB): past that, blocks are still looked up, no longer recorded.

/// Most slots the index grows to.
pub const MAX_SLOTS: usize = 1 << 20;

/// Slots of a fresh index.
const MIN_SLOTS: usize = 1024;

/// Where a block was first sent in this epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockAddress {
    /// Page number.
    pub page: u32,
    /// Block index within the page.
    pub block: u16,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    digest: u64,
    page: u32,
    block: u16,
    generation: u16,
}

/// Epoch-scoped map from block digest to the first block sent with it.
pub struct BlockIndex {
    slots: Vec<Slot>,
    len: usize,
    generation: u16,
}

impl Default for BlockIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            slots: vec![Slot::default(); MIN_SLOTS],
            len: 0,
            generation: 1,
        }
    }

    /// Forgets every entry (start of an epoch), shrinking the table when the last
    /// epoch used less than an eighth of it.
    pub fn clear(&mut self) {
        let wanted = (self.len * 4).next_power_of_two().max(MIN_SLOTS);
        if self.slots.len() > 2 * wanted {
            self.slots = vec![Slot::default(); wanted];
            self.generation = 1;
            self.len = 0;
            return;
        }
        self.len = 0;
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.slots.fill(Slot::default());
            self.generation = 1;
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Starts loading the slot where `digest` would be, so that a later
    /// [`BlockIndex::find_or_insert`] finds it in cache: issued for all the changed
    /// blocks of a page before any is looked up, the cache misses overlap.
    #[inline]
    pub fn prefetch(&self, digest: u64) {
        let slot = &self.slots[(digest as usize) & (self.slots.len() - 1)];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            // SAFETY: prefetching is a hint that never faults and has no effect on
            // program state; the pointer comes from a live reference.
            unsafe { _mm_prefetch::<_MM_HINT_T0>((slot as *const Slot).cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = slot;
    }

    /// The first block recorded with `digest`; if there is none, records `address`
    /// for it and returns `None`. One probe either way.
    #[inline]
    pub fn find_or_insert(&mut self, digest: u64, address: BlockAddress) -> Option<BlockAddress> {
        let full = (self.len + 1) * 2 > self.slots.len();
        if full && self.slots.len() < MAX_SLOTS {
            self.grow();
        }
        let full = (self.len + 1) * 2 > self.slots.len();
        let mask = self.slots.len() - 1;
        let mut i = (digest as usize) & mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.generation != self.generation {
                if full {
                    return None;
                }
                *slot = Slot {
                    digest,
                    page: address.page,
                    block: address.block,
                    generation: self.generation,
                };
                self.len += 1;
                return None;
            }
            if slot.digest == digest {
                return Some(BlockAddress {
                    page: slot.page,
                    block: slot.block,
                });
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let live: Vec<Slot> = self
            .slots
            .iter()
            .filter(|s| s.generation == self.generation)
            .copied()
            .collect();
        self.slots = vec![Slot::default(); self.slots.len() * 2];
        self.generation = 1;
        self.len = 0;
        for s in live {
            self.find_or_insert(
                s.digest,
                BlockAddress {
                    page: s.page,
                    block: s.block,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_insert_and_forgets_on_clear() {
        let mut index = BlockIndex::new();
        let at = |page| BlockAddress { page, block: 1 };
        for i in 0..10_000u64 {
            let d = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            assert_eq!(index.find_or_insert(d, at(i as u32)), None);
        }
        assert_eq!(index.len(), 10_000);
        for i in 0..10_000u64 {
            let d = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            assert_eq!(index.find_or_insert(d, at(0)), Some(at(i as u32)));
        }
        assert_eq!(index.len(), 10_000);
        index.clear();
        assert!(index.is_empty());
        assert_eq!(index.find_or_insert(0x9e37_79b9_7f4a_7c15, at(5)), None);
    }

    #[test]
    fn stops_growing_at_its_cap_and_shrinks_after_a_big_epoch() {
        let mut index = BlockIndex::new();
        let at = BlockAddress { page: 1, block: 2 };
        for i in 0..(MAX_SLOTS as u64) {
            index.find_or_insert(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1, at);
        }
        assert_eq!(
            index.len(),
            MAX_SLOTS / 2,
            "recording stops at half the cap"
        );
        assert_eq!(
            index.find_or_insert(0x9e37_79b9_7f4a_7c15 | 1, at),
            Some(at),
            "lookups go on"
        );
        index.clear();
        index.clear();
        assert_eq!(index.slots.len(), MIN_SLOTS);
    }

    #[test]
    fn survives_generation_wraparound() {
        let mut index = BlockIndex::new();
        for round in 0..70_000u32 {
            index.clear();
            let here = BlockAddress {
                page: round,
                block: 0,
            };
            assert!(index.find_or_insert(7, here).is_none(), "round {round}");
            assert_eq!(index.find_or_insert(7, here), Some(here));
        }
    }
}
