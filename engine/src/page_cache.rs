//! A bounded cache of the previous contents of recently dirtied pages.
//!
//! The same structure and replacement rule serve the `xbzrle` baseline and fgbi's
//! run-delta encoding, so the two are compared at the same memory budget. As in
//! QEMU's page cache, it is direct-mapped (slot = page number modulo the number of
//! slots, a power of two) and an entry used within the last [`FRESH_EPOCHS`] epochs
//! is not evicted by a different page.

use crate::geometry::PAGE_SIZE;

/// An entry touched this many epochs ago or more recently is kept on a conflict.
pub const FRESH_EPOCHS: u64 = 2;

/// Default budget, QEMU's default XBZRLE cache size.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

const EMPTY: u64 = u64::MAX;

/// Direct-mapped cache of page contents, keyed by page number.
pub struct PageCache {
    tags: Vec<u64>,
    ages: Vec<u64>,
    data: Vec<u8>,
}

impl PageCache {
    /// A cache of at most `budget` bytes of page data (rounded down to a power-of-two
    /// number of pages; zero pages disables it).
    pub fn new(budget: usize) -> Self {
        let pages = budget / PAGE_SIZE;
        let slots = if pages == 0 {
            0
        } else {
            1usize << (usize::BITS - 1 - pages.leading_zeros())
        };
        Self {
            tags: vec![EMPTY; slots],
            ages: vec![0; slots],
            data: prefaulted(slots * PAGE_SIZE),
        }
    }

    /// Bytes of page data the cache can hold.
    pub fn capacity_bytes(&self) -> usize {
        self.data.len()
    }

    fn slot(&self, page: u64) -> Option<usize> {
        if self.tags.is_empty() {
            return None;
        }
        Some((page as usize) & (self.tags.len() - 1))
    }

    /// The cached previous contents of `page`, if present.
    #[inline]
    pub fn get(&self, page: u64) -> Option<&[u8]> {
        let slot = self.slot(page)?;
        (self.tags[slot] == page).then(|| &self.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE])
    }

    /// Mutable contents of cached `page`, marking it used at `age`.
    #[inline]
    pub fn get_mut(&mut self, page: u64, age: u64) -> Option<&mut [u8]> {
        let slot = self.slot(page)?;
        if self.tags[slot] != page {
            return None;
        }
        self.ages[slot] = age;
        Some(&mut self.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE])
    }

    /// Inserts `contents` as `page`'s cached copy at `age`, unless the slot holds a
    /// different page used within the last [`FRESH_EPOCHS`] epochs. Returns whether
    /// the page is now cached.
    pub fn insert(&mut self, page: u64, contents: &[u8], age: u64) -> bool {
        let Some(slot) = self.slot(page) else {
            return false;
        };
        let tag = self.tags[slot];
        if tag != EMPTY && tag != page && self.ages[slot] + FRESH_EPOCHS > age {
            return false;
        }
        self.tags[slot] = page;
        self.ages[slot] = age;
        self.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(contents);
        true
    }

    /// Forgets `page`'s cached copy, if any.
    pub fn invalidate(&mut self, page: u64) {
        if let Some(slot) = self.slot(page) {
            if self.tags[slot] == page {
                self.tags[slot] = EMPTY;
            }
        }
    }
}

/// A zeroed buffer whose pages are all allocated now: written with memset rather than
/// obtained lazily zeroed, so that epochs never pay first-touch page faults.
pub(crate) fn prefaulted<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, T::default());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_rounds_down_to_power_of_two_pages() {
        assert_eq!(
            PageCache::new(5 * PAGE_SIZE).capacity_bytes(),
            4 * PAGE_SIZE
        );
        assert_eq!(PageCache::new(PAGE_SIZE - 1).capacity_bytes(), 0);
        assert!(PageCache::new(0).get(0).is_none());
    }

    #[test]
    fn fresh_entries_survive_conflicts_and_stale_ones_are_replaced() {
        let mut cache = PageCache::new(4 * PAGE_SIZE);
        let a = [1u8; PAGE_SIZE];
        let b = [2u8; PAGE_SIZE];
        assert!(cache.insert(1, &a, 10));
        assert!(!cache.insert(5, &b, 11), "page 5 maps to page 1's slot");
        assert_eq!(cache.get(1).unwrap()[0], 1);
        assert!(cache.insert(5, &b, 12));
        assert!(cache.get(1).is_none());
        assert_eq!(cache.get(5).unwrap()[0], 2);
        cache.invalidate(5);
        assert!(cache.get(5).is_none());
    }
}
