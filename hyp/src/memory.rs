//! Memory regions to protect or to hold a replica: anonymous mappings backed by
//! 2 MiB pages where the host allows, populated up front so that epochs never pay
//! first-touch page faults.

use std::io;
use std::ops::{Deref, DerefMut};

use memmap2::{MmapMut, MmapOptions};
use thiserror::Error;

/// 2 MiB, the huge page size this module asks for.
pub const HUGE_PAGE: usize = 2 << 20;

/// What backs a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Reserved hugetlb pages (MAP_HUGETLB).
    Hugetlb,
    /// Ordinary pages with transparent huge pages requested (MADV_HUGEPAGE).
    TransparentHuge,
    /// Ordinary pages: the kernel refused the huge page request.
    Base,
}

impl Backing {
    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Backing::Hugetlb => "hugetlb",
            Backing::TransparentHuge => "thp",
            Backing::Base => "4k",
        }
    }
}

/// A region could not be mapped.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The size is zero or not a whole number of 4 KiB pages.
    #[error("region size {0} is not a non-zero multiple of 4096 bytes")]
    Size(usize),
    /// The kernel refused the mapping.
    #[error("cannot map {len} bytes of memory ({source}): lower --mem or free memory")]
    Map {
        /// Bytes requested.
        len: usize,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// An anonymous, zero-filled, populated memory region.
pub struct Region {
    map: MmapMut,
    backing: Backing,
}

impl Region {
    /// Maps `len` bytes: hugetlb pages when reserved and `len` is a multiple of 2 MiB,
    /// else ordinary pages with transparent huge pages requested.
    pub fn new(len: usize) -> Result<Self, MemoryError> {
        if len == 0 || len % 4096 != 0 {
            return Err(MemoryError::Size(len));
        }
        if len % HUGE_PAGE == 0 {
            if let Ok(map) = MmapOptions::new()
                .len(len)
                .huge(Some(21))
                .populate()
                .map_anon()
            {
                return Ok(Self {
                    map,
                    backing: Backing::Hugetlb,
                });
            }
        }
        let map = MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|source| MemoryError::Map { len, source })?;
        let backing = match map.advise(memmap2::Advice::HugePage) {
            Ok(()) => Backing::TransparentHuge,
            Err(_) => Backing::Base,
        };
        let mut region = Self { map, backing };
        region.populate();
        Ok(region)
    }

    /// Touches every page so the kernel allocates it now (after the huge page advice,
    /// so that it can allocate huge pages).
    fn populate(&mut self) {
        for page in self.map.chunks_mut(4096) {
            // A volatile write cannot be optimised away even though the value is the
            // one already there.
            let first = &mut page[0];
            // SAFETY: `first` is a valid, aligned, exclusive reference to a byte.
            unsafe { std::ptr::write_volatile(first, 0) };
        }
    }

    /// What backs the region.
    pub fn backing(&self) -> Backing {
        self.backing
    }
}

/// Bytes of `memory` the kernel maps with transparent huge pages now (the
/// `AnonHugePages` of the mappings inside it in /proc/self/smaps; mappings that
/// straddle its ends are not counted).
pub fn huge_page_bytes(memory: &[u8]) -> io::Result<u64> {
    let (lo, hi) = (
        memory.as_ptr().addr(),
        memory.as_ptr().addr() + memory.len(),
    );
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            inside = start >= lo && end <= hi;
        } else if inside && let Some(rest) = line.strip_prefix("AnonHugePages:") {
            kib += rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
    Ok(kib << 10)
}

impl Deref for Region {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl DerefMut for Region {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_zeroed_memory_and_says_what_backs_it() {
        let mut region = Region::new(4 << 20).unwrap();
        assert!(region.iter().all(|&b| b == 0));
        region[12345] = 7;
        assert_eq!(region[12345], 7);
        assert_ne!(region.backing().as_str(), "");
        assert!(matches!(Region::new(100), Err(MemoryError::Size(100))));
        assert!(matches!(Region::new(0), Err(MemoryError::Size(0))));
    }
}
