//! The shape of protected memory: page size, block size, and how many of each.

use crate::error::GeometryError;

/// Size of a guest or process page, in bytes. Every page record covers one page.
pub const PAGE_SIZE: usize = 4096;

/// Smallest supported block size, in bytes.
pub const MIN_BLOCK_SIZE: usize = 32;

/// Default block size, in bytes (the paper's choice).
pub const DEFAULT_BLOCK_SIZE: usize = 64;

/// Largest memory the wire format can address: page numbers are 32-bit.
pub const MAX_MEM_BYTES: u64 = (u32::MAX as u64 + 1) * PAGE_SIZE as u64;

/// Memory size and block size, validated once and shared by both ends.
///
/// Memory is a whole number of pages; a page is a whole number of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    mem_bytes: u64,
    block_size: usize,
}

impl Geometry {
    /// Validates `mem_bytes` (a non-zero multiple of [`PAGE_SIZE`], at most [`MAX_MEM_BYTES`])
    /// and `block_size` (a power of two from [`MIN_BLOCK_SIZE`] to [`PAGE_SIZE`]).
    pub fn new(mem_bytes: u64, block_size: usize) -> Result<Self, GeometryError> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=PAGE_SIZE).contains(&block_size) {
            return Err(GeometryError::BlockSize(block_size));
        }
        if mem_bytes == 0 || mem_bytes % PAGE_SIZE as u64 != 0 || mem_bytes > MAX_MEM_BYTES {
            return Err(GeometryError::MemSize(mem_bytes));
        }
        if usize::try_from(mem_bytes).is_err() {
            return Err(GeometryError::MemSize(mem_bytes));
        }
        Ok(Self {
            mem_bytes,
            block_size,
        })
    }

    /// Total protected memory, in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// Block size, in bytes.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of pages in protected memory.
    pub fn pages(&self) -> u64 {
        self.mem_bytes / PAGE_SIZE as u64
    }

    /// Number of blocks in one page.
    pub fn blocks_per_page(&self) -> usize {
        PAGE_SIZE / self.block_size
    }

    /// Bytes of the bit mask that names the blocks of one page.
    pub fn mask_bytes(&self) -> usize {
        self.blocks_per_page().div_ceil(8)
    }

    /// Bytes of block digests kept per byte of memory, as a fraction (8 / block size).
    pub fn digest_overhead(&self) -> f64 {
        8.0 / self.block_size as f64
    }

    /// Byte range of page `page` inside a flat memory image.
    pub fn page_range(&self, page: u64) -> std::ops::Range<usize> {
        // Page numbers are checked against `pages()` by every caller before use, and
        // `new` guarantees the memory size fits in usize.
        let start = page as usize * PAGE_SIZE;
        start..start + PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_power_of_two_block_size() {
        for shift in 5..=12 {
            let geometry = Geometry::new(1 << 20, 1 << shift).unwrap();
            assert_eq!(
                geometry.blocks_per_page() * geometry.block_size(),
                PAGE_SIZE
            );
        }
    }

    #[test]
    fn rejects_bad_block_sizes_and_memory_sizes() {
        for block in [0, 16, 48, 100, 8192] {
            assert!(Geometry::new(1 << 20, block).is_err(), "block {block}");
        }
        for mem in [0, 100, 4097, MAX_MEM_BYTES + PAGE_SIZE as u64] {
            assert!(Geometry::new(mem, 64).is_err(), "mem {mem}");
        }
    }

    #[test]
    fn addresses_64_gib() {
        let geometry = Geometry::new(64 << 30, 64).unwrap();
        assert_eq!(geometry.pages(), 16 << 20);
        assert_eq!(geometry.mask_bytes(), 8);
    }
}
