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
/// Values are stored XORed with the digest of an all-zero block, so a freshly
/// allocated (zero-filled, lazily mapped) table describes all-zero memory: the
/// backup's replica before its first epoch.
pub struct DigestTable {
    values: Vec<u64>,
    blocks_per_page: usize,
    zero: u64,
}

impl DigestTable {
    /// A table for `pages` pages of `geometry`'s block size, describing zero memory.
    pub fn new(geometry: &Geometry, pages: usize) -> Self {
        let blocks_per_page = geometry.blocks_per_page();
        Self {
            values: vec![0; pages * blocks_per_page],
            blocks_per_page,
            zero: zero_block_digest(geometry.block_size()),
        }
    }

    /// Digest of an all-zero block at this table's block size.
    pub fn zero_digest(&self) -> u64 {
        self.zero
    }

    /// Copies the stored digests of local page `page` into `out`.
    #[inline]
    pub fn read(&self, page: usize, out: &mut [u64]) {
        let start = page * self.blocks_per_page;
        for (o, v) in out
            .iter_mut()
            .zip(&self.values[start..start + self.blocks_per_page])
        {
            *o = v ^ self.zero;
        }
    }

    /// Stores `digests` as the digests of local page `page`.
    #[inline]
    pub fn write(&mut self, page: usize, digests: &[u64]) {
        let start = page * self.blocks_per_page;
        for (v, d) in self.values[start..start + self.blocks_per_page]
            .iter_mut()
            .zip(digests)
        {
            *v = d ^ self.zero;
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
        let table = DigestTable::new(&geometry, 4);
        let mut stored = [0u64; 64];
        table.read(3, &mut stored);
        let mut actual = [0u64; 64];
        page_digests(&[0u8; PAGE_SIZE], 64, &mut actual);
        assert_eq!(stored, actual);
    }

    #[test]
    fn write_then_read_round_trips() {
        let geometry = Geometry::new(1 << 20, 128).unwrap();
        let mut table = DigestTable::new(&geometry, 2);
        let digests: Vec<u64> = (0..32u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        table.write(1, &digests);
        let mut back = vec![0; 32];
        table.read(1, &mut back);
        assert_eq!(back, digests);
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
