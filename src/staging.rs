//! Remus-style checkpoints: the dirty pages are copied out during the pause, so the
//! program can run again while the copy is encoded.

use fgbi_engine::{PAGE_SIZE, PageSource};

/// A copy of one checkpoint's dirty pages, readable as the whole memory's
/// [`PageSource`] for exactly those pages.
#[derive(Default)]
pub struct Staging {
    pages: Vec<u64>,
    data: Vec<u8>,
    mem_bytes: u64,
}

impl Staging {
    /// An empty staging area.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the contents with the pages `dirty` of `memory` (sorted and
    /// deduplicated here). Pages outside `memory` are left out: the encoder refuses
    /// them with a clear error when it sees the dirty list.
    pub fn capture(&mut self, memory: &[u8], dirty: &mut Vec<u64>) {
        dirty.sort_unstable();
        dirty.dedup();
        self.mem_bytes = memory.len() as u64;
        self.pages.clear();
        self.data.clear();
        for &page in dirty.iter() {
            let start = page as usize * PAGE_SIZE;
            if let Some(bytes) = memory.get(start..start + PAGE_SIZE) {
                self.pages.push(page);
                self.data.extend_from_slice(bytes);
            }
        }
    }

    /// Hands out the data buffer (emptied, capacity kept) for a copy made elsewhere,
    /// such as a copy-on-write snapshot; [`install`](Self::install) gives it back.
    pub fn take_buffer(&mut self) -> Vec<u8> {
        self.pages.clear();
        let mut data = std::mem::take(&mut self.data);
        data.clear();
        data
    }

    /// Replaces the contents with `pages` (sorted, distinct) of a `mem_bytes` memory,
    /// page `pages[i]` at `data[i * 4096..]`.
    pub fn install(&mut self, pages: Vec<u64>, data: Vec<u8>, mem_bytes: u64) {
        debug_assert_eq!(data.len(), pages.len() * PAGE_SIZE);
        self.pages = pages;
        self.data = data;
        self.mem_bytes = mem_bytes;
    }

    /// The staged page numbers, sorted.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Bytes copied.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

impl PageSource for Staging {
    fn len_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The staged copy of `page`. The encoder asks only for pages it has checked with
    /// [`PageSource::holds`]; any other page reads as zeros.
    fn page(&self, page: u64) -> &[u8] {
        match self.pages.binary_search(&page) {
            Ok(i) => &self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            Err(_) => &ZERO_PAGE,
        }
    }

    fn holds(&self, page: u64) -> bool {
        self.pages.binary_search(&page).is_ok()
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_pages_read_back_and_later_writes_do_not_leak_in() {
        let mut memory = vec![0u8; 16 * PAGE_SIZE];
        memory[3 * PAGE_SIZE] = 7;
        memory[9 * PAGE_SIZE + 5] = 9;
        let mut staging = Staging::new();
        let mut dirty = vec![9, 3, 9, 100];
        staging.capture(&memory, &mut dirty);
        assert_eq!(staging.pages(), &[3, 9]);
        memory[3 * PAGE_SIZE] = 1;
        assert_eq!(staging.page(3)[0], 7);
        assert_eq!(staging.page(9)[5], 9);
        assert_eq!(staging.len_bytes(), memory.len() as u64);
        assert_eq!(staging.bytes(), 2 * PAGE_SIZE);
        assert!(staging.holds(3) && !staging.holds(4));
    }
}
