//! Run delta: a page as runs of unchanged and changed bytes against its previous contents.
//!
//! This is QEMU's XBZRLE encoding (docs/xbzrle.txt): the XOR of old and new is a
//! sequence of zero runs and non-zero runs; each pair is written as the ULEB128 length
//! of the zero run, the ULEB128 length of the non-zero run, then the new bytes of the
//! non-zero run. A trailing zero run is not written; an empty encoding means the page
//! did not change. The `xbzrle` baseline uses it over whole pages; fgbi uses it over
//! the byte ranges of the blocks its digests found changed.

use std::ops::Range;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Why a run delta is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunsError {
    /// A length field is truncated or longer than three bytes.
    Length,
    /// The runs go past the end of the page.
    Overrun,
    /// A non-zero run has length zero.
    EmptyRun,
    /// The encoding ends inside a run's bytes.
    Truncated,
}

impl RunsError {
    /// A short description for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            RunsError::Length => "run delta has a bad length field",
            RunsError::Overrun => "run delta runs past the end of the page",
            RunsError::EmptyRun => "run delta has an empty changed run",
            RunsError::Truncated => "run delta ends inside a run",
        }
    }
}

#[inline(always)]
fn load(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// First index in `from..end` where `a` and `b` differ, or `end`.
#[inline]
fn first_difference(a: &[u8], b: &[u8], from: usize, end: usize) -> usize {
    let mut i = from;
    while i + 8 <= end {
        let x = load(a, i) ^ load(b, i);
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < end && a[i] == b[i] {
        i += 1;
    }
    i
}

/// First index in `from..end` where `a` and `b` agree, or `end`.
#[inline]
fn first_agreement(a: &[u8], b: &[u8], from: usize, end: usize) -> usize {
    let mut i = from;
    while i + 8 <= end {
        let x = load(a, i) ^ load(b, i);
        let zero_bytes = x.wrapping_sub(ONES) & !x & HIGHS;
        if zero_bytes != 0 {
            return i + (zero_bytes.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < end && a[i] != b[i] {
        i += 1;
    }
    i
}

fn put_uleb(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_uleb(bytes: &[u8], at: &mut usize) -> Result<usize, RunsError> {
    let mut value = 0usize;
    for shift in [0, 7, 14] {
        let byte = *bytes.get(*at).ok_or(RunsError::Length)?;
        *at += 1;
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(RunsError::Length)
}

/// Appends the run delta from `old` to `new` to `out`, looking for differences only
/// inside `windows` (sorted, disjoint byte ranges; bytes outside them are known equal).
///
/// Returns the encoded length, or `None` (with `out` restored) when it would exceed
/// `limit` bytes. An empty result means no byte differs. With `paced`, it also gives
/// up as soon as the output outgrows its share of `limit` for the window bytes
/// scanned so far (plus 64 bytes of slack): on dense changes the attempt then costs a
/// fraction of a page scan instead of a whole one, at the price of occasionally
/// missing a delta whose changes are bunched at the start.
pub fn encode<W>(
    old: &[u8],
    new: &[u8],
    windows: W,
    out: &mut Vec<u8>,
    limit: usize,
    paced: bool,
) -> Option<usize>
where
    W: Iterator<Item = Range<usize>> + Clone,
{
    let start = out.len();
    let total: usize = if paced {
        windows.clone().map(|w| w.len()).sum()
    } else {
        0
    };
    let mut scanned = 0;
    let mut emitted = 0;
    for window in windows {
        let mut i = window.start;
        while i < window.end {
            let d = first_difference(old, new, i, window.end);
            if d == window.end {
                break;
            }
            let e = first_agreement(old, new, d, window.end);
            put_uleb(out, d - emitted);
            put_uleb(out, e - d);
            out.extend_from_slice(&new[d..e]);
            let written = out.len() - start;
            if written > limit
                || (paced && written > limit * (scanned + e - window.start) / total + 64)
            {
                out.truncate(start);
                return None;
            }
            emitted = e;
            i = e;
        }
        scanned += window.len();
    }
    Some(out.len() - start)
}

/// Checks that `encoded` is a well-formed run delta for a page of `page_len` bytes.
pub fn validate(encoded: &[u8], page_len: usize) -> Result<(), RunsError> {
    walk(encoded, page_len, |_, _| {})
}

/// Applies `encoded` to `page` in place. The caller has validated it.
pub fn decode(encoded: &[u8], page: &mut [u8]) -> Result<(), RunsError> {
    let len = page.len();
    walk(encoded, len, |at, bytes| {
        page[at..at + bytes.len()].copy_from_slice(bytes)
    })
}

fn walk(
    encoded: &[u8],
    page_len: usize,
    mut changed: impl FnMut(usize, &[u8]),
) -> Result<(), RunsError> {
    let mut at = 0;
    let mut pos = 0usize;
    while at < encoded.len() {
        let zero = get_uleb(encoded, &mut at)?;
        let nonzero = get_uleb(encoded, &mut at)?;
        if nonzero == 0 {
            return Err(RunsError::EmptyRun);
        }
        pos = pos
            .checked_add(zero)
            .filter(|p| p.saturating_add(nonzero) <= page_len)
            .ok_or(RunsError::Overrun)?;
        let bytes = encoded.get(at..at + nonzero).ok_or(RunsError::Truncated)?;
        changed(pos, bytes);
        at += nonzero;
        pos += nonzero;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::PAGE_SIZE;

    /// Encodes the whole of `old` -> `new` into `out`.
    fn whole(
        old: &[u8],
        new: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
        paced: bool,
    ) -> Option<usize> {
        encode(old, new, std::iter::once(0..old.len()), out, limit, paced)
    }

    fn round_trip(old: &[u8], new: &[u8]) -> usize {
        let mut enc = Vec::new();
        let n = encode(
            old,
            new,
            std::iter::once(0..old.len()),
            &mut enc,
            usize::MAX,
            false,
        )
        .unwrap();
        validate(&enc, old.len()).unwrap();
        let mut page = old.to_vec();
        decode(&enc, &mut page).unwrap();
        assert_eq!(page, new);
        n
    }

    #[test]
    fn unchanged_page_encodes_to_nothing() {
        let page = vec![7u8; PAGE_SIZE];
        assert_eq!(round_trip(&page, &page), 0);
    }

    #[test]
    fn runs_at_every_offset_and_length() {
        let old: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();
        for start in [0, 1, 7, 8, 9, 100, 4088, 4095] {
            for len in [1, 2, 8, 9, 17, 200] {
                let mut new = old.clone();
                for b in new.iter_mut().skip(start).take(len) {
                    *b ^= 0xff;
                }
                let n = round_trip(&old, &new);
                assert!(n <= len + 4, "start {start} len {len} -> {n}");
            }
        }
    }

    #[test]
    fn limit_aborts_and_restores_output() {
        let old = vec![0u8; PAGE_SIZE];
        let new = vec![1u8; PAGE_SIZE];
        let mut out = vec![9];
        assert_eq!(whole(&old, &new, &mut out, 100, false), None);
        assert_eq!(out, vec![9]);
    }

    #[test]
    fn paced_encoding_gives_up_early_on_dense_changes() {
        let old = vec![0u8; PAGE_SIZE];
        let new: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 2) as u8).collect();
        let mut out = Vec::new();
        assert_eq!(whole(&old, &new, &mut out, 2048, true), None);
        assert!(
            out.capacity() < 1024,
            "stopped after a fraction of the page"
        );
        // A sparse delta still succeeds.
        let mut sparse = old.clone();
        sparse[4000] = 1;
        assert_eq!(whole(&old, &sparse, &mut out, 2048, true), Some(4));
    }

    #[test]
    fn windows_restrict_the_search() {
        let old = vec![0u8; 256];
        let mut new = old.clone();
        new[10] = 1;
        new[200] = 1;
        let mut enc = Vec::new();
        encode(
            &old,
            &new,
            std::iter::once(192..256),
            &mut enc,
            usize::MAX,
            false,
        )
        .unwrap();
        let mut page = old.clone();
        decode(&enc, &mut page).unwrap();
        assert_eq!(page[200], 1);
        assert_eq!(page[10], 0);
    }

    #[test]
    fn rejects_malformed_encodings() {
        assert_eq!(
            validate(&[0x80, 0x80, 0x80, 0x01], 4096),
            Err(RunsError::Length)
        );
        assert_eq!(validate(&[0, 0], 4096), Err(RunsError::EmptyRun));
        assert_eq!(validate(&[0x80, 0x20, 1, 0], 4096), Err(RunsError::Overrun));
        assert_eq!(validate(&[0, 3, 1], 4096), Err(RunsError::Truncated));
        assert_eq!(validate(&[5], 4096), Err(RunsError::Length));
    }
}
