//! Where the encoder reads page contents from.

use crate::geometry::PAGE_SIZE;

/// Read access to the pages of one checkpoint.
///
/// Implementations must return the same bytes for a page for the whole of one
/// [`crate::Encoder::encode`] call: the checkpoint the epoch describes.
pub trait PageSource: Sync {
    /// Bytes of protected memory this source covers.
    fn len_bytes(&self) -> u64;

    /// The [`PAGE_SIZE`] bytes of page `page` (the caller keeps `page` in range and
    /// only asks for pages [`PageSource::holds`] confirms).
    fn page(&self, page: u64) -> &[u8];

    /// Whether this source holds page `page`. A whole memory image holds every page;
    /// a copy of one checkpoint's dirty pages holds only those. The encoder refuses
    /// to encode a page its source does not hold.
    fn holds(&self, page: u64) -> bool {
        page < self.len_bytes() / PAGE_SIZE as u64
    }
}

impl PageSource for [u8] {
    fn len_bytes(&self) -> u64 {
        self.len() as u64
    }

    #[inline]
    fn page(&self, page: u64) -> &[u8] {
        let start = page as usize * PAGE_SIZE;
        &self[start..start + PAGE_SIZE]
    }
}

impl PageSource for Vec<u8> {
    fn len_bytes(&self) -> u64 {
        self.len() as u64
    }

    #[inline]
    fn page(&self, page: u64) -> &[u8] {
        self.as_slice().page(page)
    }
}
