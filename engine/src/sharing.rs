//! Block sharing: an index of the blocks already sent in the current epoch.
//!
//! Keyed by block digest (already uniformly distributed, so it is its own hash),
//! open addressing with linear probing, cleared in O(1) between epochs by a
//! generation stamp. A hit is only a candidate: the encoder compares the bytes
//! before it sends a reference.

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
            slots: vec![Slot::default(); 1024],
            len: 0,
            generation: 1,
        }
    }

    /// Forgets every entry (start of an epoch).
    pub fn clear(&mut self) {
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

    /// The first block recorded with `digest`, if any.
    #[inline]
    pub fn find(&self, digest: u64) -> Option<BlockAddress> {
        let mask = self.slots.len() - 1;
        let mut i = (digest as usize) & mask;
        loop {
            let slot = &self.slots[i];
            if slot.generation != self.generation {
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

    /// Records `address` for `digest` unless the digest is already present.
    #[inline]
    pub fn insert(&mut self, digest: u64, address: BlockAddress) {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = (digest as usize) & mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.generation != self.generation {
                *slot = Slot {
                    digest,
                    page: address.page,
                    block: address.block,
                    generation: self.generation,
                };
                self.len += 1;
                return;
            }
            if slot.digest == digest {
                return;
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
            self.insert(
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
        for i in 0..10_000u64 {
            let d = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            index.insert(
                d,
                BlockAddress {
                    page: i as u32,
                    block: 1,
                },
            );
            index.insert(d, BlockAddress { page: 0, block: 0 });
        }
        assert_eq!(index.len(), 10_000);
        for i in 0..10_000u64 {
            let d = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            assert_eq!(index.find(d).unwrap().page, i as u32);
        }
        index.clear();
        assert!(index.is_empty());
        assert!(index.find(0x9e37_79b9_7f4a_7c15).is_none());
    }

    #[test]
    fn survives_generation_wraparound() {
        let mut index = BlockIndex::new();
        for round in 0..70_000u32 {
            index.clear();
            assert!(index.find(7).is_none(), "round {round}");
            index.insert(
                7,
                BlockAddress {
                    page: round,
                    block: 0,
                },
            );
            assert_eq!(index.find(7).unwrap().page, round);
        }
    }
}
