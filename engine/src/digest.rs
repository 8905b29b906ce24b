//! Block identification: one 64-bit digest per block, and the table that keeps them.
//!
//! The digest is xxh3-64 of the block's bytes. A block whose digest differs from the
//! stored one has changed; an unchanged digest means the block is unchanged except
//! with probability about 2^-64 per block (the quality measurements are in
//! docs/architecture.md). Sharing never trusts a digest alone: see [`crate::sharing`].

use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use crate::geometry::{Geometry, PAGE_SIZE};

/// Digest of one block.
#[inline]
pub fn block_digest(block: &[u8]) -> u64 {
    xxh3_64(block)
}

/// Digests every block of `page` into `out` (one per block, in order).
#[inline]
pub fn page_digests(page: &[u8], block_size: usize, out: &mut [u64]) {
    for (digest, block) in out.iter_mut().zip(page.chunks_exact(block_size)) {
        *digest = block_digest(block);
    }
}

/// Digest of a whole memory image, used to prove replica and primary are identical.
pub fn memory_digest(memory: &[u8]) -> u128 {
    xxh3_128(memory)
}

/// True when every byte of `bytes` is zero.
#[inline]
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut lines = bytes.chunks_exact(64);
    for line in &mut lines {
        let acc = line
            .chunks_exact(8)
            .fold(0u64, |acc, w| acc | u64::from_ne_bytes(word(w)));
        if acc != 0 {
            return false;
        }
    }
    lines.remainder().iter().all(|&b| b == 0)
}

/// The 8 bytes of `w` (exactly 8 long) as an array.
#[inline(always)]
fn word(w: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(w);
    out
}

/// Stored digests of every block of the pages one shard owns.
///
/// Values are stored XORed with the digest of an all-zero block, so a zero-filled
/// table describes all-zero memory: the backup's replica before its first epoch.
pub struct DigestTable {
    values: Vec<u64>,
    blocks_per_page: usize,
    zero: u64,
}

impl DigestTable {
    /// A table for `pages` pages of `geometry`'s block size, describing zero memory.
    /// Its memory is allocated (prefaulted) now.
    pub fn new(geometry: &Geometry, pages: usize) -> Self {
        let blocks_per_page = geometry.blocks_per_page();
        Self {
            values: crate::page_cache::prefaulted(pages * blocks_per_page),
            blocks_per_page,
            zero: zero_block_digest(geometry.block_size()),
        }
    }

    /// Digest of an all-zero block at this table's block size.
    pub fn zero_digest(&self) -> u64 {
        self.zero
    }

    /// Compares `digests` (one per block of local page `page`) with the stored ones,
    /// stores the new ones, and returns the mask of blocks that changed; the previous
    /// digests of the changed blocks are appended to `undo`, in block order.
    #[inline]
    pub fn update(&mut self, page: usize, digests: &[u64], undo: &mut Vec<u64>) -> u128 {
        let start = page * self.blocks_per_page;
        let stored = &mut self.values[start..start + self.blocks_per_page];
        // Two 64-bit halves: shifting a u128 by a variable amount is slow.
        let mut halves = [0u64; 2];
        for (half, (stored, digests)) in halves
            .iter_mut()
            .zip(stored.chunks(64).zip(digests.chunks(64)))
        {
            for (i, (s, d)) in stored.iter().zip(digests).enumerate() {
                *half |= u64::from(*s != d ^ self.zero) << i;
            }
        }
        let mask = u128::from(halves[0]) | (u128::from(halves[1]) << 64);
        if mask != 0 {
            for i in crate::worker::set_bits(mask) {
                undo.push(stored[i] ^ self.zero);
                stored[i] = digests[i] ^ self.zero;
            }
        }
        mask
    }

    /// Puts back the digests `old` (block order) of the blocks of local page `page`
    /// named by `mask`: the inverse of [`DigestTable::update`].
    pub fn restore(&mut self, page: usize, mask: u128, old: &[u64]) {
        let start = page * self.blocks_per_page;
        for (i, &o) in crate::worker::set_bits(mask).zip(old) {
            self.values[start + i] = o ^ self.zero;
        }
    }

    /// Bytes of memory the table holds.
    pub fn bytes(&self) -> usize {
        self.values.len() * 8
    }
}

/// Digest of an all-zero block of `block_size` bytes.
pub fn zero_block_digest(block_size: usize) -> u64 {
    block_digest(&[0u8; PAGE_SIZE][..block_size])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_table_describes_zero_memory() {
        let geometry = Geometry::new(1 << 20, 64).unwrap();
        let mut table = DigestTable::new(&geometry, 4);
        let mut zero = [0u64; 64];
        page_digests(&[0u8; PAGE_SIZE], 64, &mut zero);
        let mut undo = Vec::new();
        assert_eq!(table.update(3, &zero, &mut undo), 0);
        assert!(undo.is_empty());
    }

    #[test]
    fn update_finds_changes_and_restore_undoes_them() {
        let geometry = Geometry::new(1 << 20, 128).unwrap();
        let mut table = DigestTable::new(&geometry, 2);
        let mut page = [0u8; PAGE_SIZE];
        page[5 * 128] = 1;
        page[31 * 128 + 127] = 2;
        let mut digests = [0u64; 32];
        page_digests(&page, 128, &mut digests);
        let mut undo = Vec::new();
        let mask = table.update(1, &digests, &mut undo);
        assert_eq!(mask, (1 << 5) | (1 << 31));
        assert_eq!(undo.len(), 2);
        assert_eq!(table.update(1, &digests, &mut Vec::new()), 0, "stored");
        table.restore(1, mask, &undo);
        assert_eq!(table.update(1, &digests, &mut Vec::new()), mask, "restored");
    }

    #[test]
    fn zero_detection_handles_every_alignment() {
        let mut buf = vec![0u8; 300];
        for start in 0..9 {
            assert!(is_zero(&buf[start..start + 200]));
            buf[start + 150] = 1;
            assert!(!is_zero(&buf[start..start + 200]));
            buf[start + 150] = 0;
        }
    }

    #[test]
    fn one_bit_changes_change_the_digest() {
        let mut block = [0x5au8; 64];
        let base = block_digest(&block);
        for bit in 0..512 {
            block[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(block_digest(&block), base, "bit {bit}");
            block[bit / 8] ^= 1 << (bit % 8);
        }
    }
}
