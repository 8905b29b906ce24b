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

    /// Block identification of local page `page`, whose bytes are `data`: digests
    /// every block into `digests` (one per block), compares each with the stored
    /// one, stores the new ones, and returns the mask of blocks that changed; the
    /// previous digests of the changed blocks are appended to `undo`, in block order.
    ///
    /// One pass per page, specialised for each block size, so that each block is
    /// hashed, compared and stored while it is in registers.
    #[inline]
    pub fn identify(
        &mut self,
        page: usize,
        data: &[u8],
        digests: &mut [u64],
        undo: &mut Vec<u64>,
    ) -> u128 {
        let start = page * self.blocks_per_page;
        let stored = &mut self.values[start..start + self.blocks_per_page];
        let zero = self.zero;
        match PAGE_SIZE / self.blocks_per_page {
            32 => identify_blocks::<32>(data, stored, digests, zero, undo),
            64 => identify_blocks::<64>(data, stored, digests, zero, undo),
            128 => identify_blocks::<128>(data, stored, digests, zero, undo),
            256 => identify_blocks::<256>(data, stored, digests, zero, undo),
            512 => identify_blocks::<512>(data, stored, digests, zero, undo),
            1024 => identify_blocks::<1024>(data, stored, digests, zero, undo),
            2048 => identify_blocks::<2048>(data, stored, digests, zero, undo),
            _ => identify_blocks::<PAGE_SIZE>(data, stored, digests, zero, undo),
        }
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

/// [`DigestTable::identify`] for blocks of `B` bytes: `stored` holds the page's
/// digests XORed with `zero`.
#[inline(always)]
fn identify_blocks<const B: usize>(
    data: &[u8],
    stored: &mut [u64],
    digests: &mut [u64],
    zero: u64,
    undo: &mut Vec<u64>,
) -> u128 {
    let mut mask = 0u128;
    let blocks = data.chunks_exact(B).zip(stored.iter_mut().zip(digests));
    for (i, (block, (stored, digest))) in blocks.enumerate() {
        *digest = block_digest(block);
        let value = *digest ^ zero;
        if *stored != value {
            mask |= 1 << i;
            undo.push(*stored ^ zero);
            *stored = value;
        }
    }
    mask
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
        let mut digests = [0u64; 64];
        let mut undo = Vec::new();
        assert_eq!(
            table.identify(3, &[0u8; PAGE_SIZE], &mut digests, &mut undo),
            0
        );
        assert!(undo.is_empty());
        assert!(digests.iter().all(|&d| d == table.zero_digest()));
    }

    /// Digests every block of `page` into `out`, one block at a time.
    fn page_digests(page: &[u8], block_size: usize, out: &mut [u64]) {
        for (digest, block) in out.iter_mut().zip(page.chunks_exact(block_size)) {
            *digest = block_digest(block);
        }
    }

    #[test]
    fn identify_finds_changes_at_every_block_size_and_restore_undoes_them() {
        for block in (5..=12).map(|shift| 1usize << shift) {
            let geometry = Geometry::new(1 << 20, block).unwrap();
            let bpp = geometry.blocks_per_page();
            let mut table = DigestTable::new(&geometry, 2);
            let mut page = [0u8; PAGE_SIZE];
            page[0] = 7;
            page[PAGE_SIZE - 1] = 2;
            let mut digests = vec![0u64; bpp];
            let mut undo = Vec::new();
            let mask = table.identify(1, &page, &mut digests, &mut undo);
            let expected = 1 | (1u128 << (bpp - 1));
            assert_eq!(mask, expected, "{block}");
            let zero = vec![table.zero_digest(); mask.count_ones() as usize];
            assert_eq!(undo, zero, "{block}: zero blocks before");
            let mut each = vec![0u64; bpp];
            page_digests(&page, block, &mut each);
            assert_eq!(digests, each, "{block}");
            let mut again = Vec::new();
            assert_eq!(
                table.identify(1, &page, &mut digests, &mut again),
                0,
                "{block}"
            );
            assert!(again.is_empty());
            table.restore(1, mask, &undo);
            assert_eq!(
                table.identify(1, &page, &mut digests, &mut again),
                mask,
                "{block}"
            );
            assert_eq!(
                table.identify(0, &page, &mut digests, &mut again),
                mask,
                "{block}"
            );
        }
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
