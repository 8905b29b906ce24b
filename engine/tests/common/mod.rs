//! Helpers shared by the engine's integration tests.

#![allow(dead_code)]

use fgbi_engine::wire::{self, CommitInfo, FrameKind, FrameReader, FrameWriter, RecordReader};
use fgbi_engine::{Geometry, PAGE_SIZE};
pub use fgbi_hyp::workload::Rng;

/// Mutates `memory` the way mixed real workloads do and returns the pages written.
pub fn mutate(memory: &mut [u8], geometry: &Geometry, rng: &mut Rng, writes: usize) -> Vec<u64> {
    let pages = geometry.pages();
    let mut dirty = Vec::new();
    for _ in 0..writes {
        let page = rng.below(pages);
        let base = page as usize * PAGE_SIZE;
        match rng.below(8) {
            // A few scattered small writes.
            0..=2 => {
                for _ in 0..1 + rng.below(6) {
                    let at = base + rng.below(PAGE_SIZE as u64 - 8) as usize;
                    memory[at..at + 8].copy_from_slice(&rng.next_u64().to_le_bytes());
                }
            }
            // Zero the page.
            3 => memory[base..base + PAGE_SIZE].fill(0),
            // Fresh random page.
            4 => {
                for w in memory[base..base + PAGE_SIZE].chunks_exact_mut(8) {
                    w.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
            }
            // Copy another page over it (sharing's case).
            5 => {
                let from = rng.below(pages) as usize * PAGE_SIZE;
                memory.copy_within(from..from + PAGE_SIZE, base);
            }
            // Text-like, compressible contents.
            6 => {
                let word = rng.next_u64().to_le_bytes();
                for (i, b) in memory[base..base + PAGE_SIZE].iter_mut().enumerate() {
                    *b = b'a' + (word[i % 8] % 4) + ((i / 64) % 3) as u8;
                }
            }
            // Dirty but unchanged: rewrite the same bytes.
            _ => {}
        }
        dirty.push(page);
    }
    dirty
}

/// Re-seals an epoch after its frame bodies were edited: recomputes every frame's
/// length and checksum, and the commit frame's counts and chain, so that only the
/// record-level validation can refuse it.
pub fn reseal(frames: &[(FrameKind, u64, Vec<u8>)], block_size: usize) -> Vec<u8> {
    let mut w = FrameWriter::default();
    let mut chain = 0;
    let mut count = 0u32;
    let mut records = 0u64;
    for (kind, epoch, body) in frames {
        if *kind == FrameKind::Commit {
            let c = CommitInfo {
                frames: count,
                bytes: w.buf.len() as u64,
                records,
                chain,
            };
            w.commit(*epoch, &c);
            continue;
        }
        let start = w.buf.len();
        w.begin(*kind, *epoch);
        w.buf.extend_from_slice(body);
        chain = wire::chain(chain, w.finish());
        count += 1;
        if *kind == FrameKind::Pages {
            if let Ok(Some(frame)) = FrameReader::new(&w.buf[start..]).next_frame() {
                let mut reader = RecordReader::new(&frame, block_size);
                while let Ok(Some(_)) = reader.next_record() {
                    records += 1;
                }
            }
        }
    }
    w.buf
}

/// Splits an epoch into (kind, epoch, body) frames.
pub fn frames(bytes: &[u8]) -> Vec<(FrameKind, u64, Vec<u8>)> {
    let mut r = FrameReader::new(bytes);
    let mut out = Vec::new();
    while let Ok(Some(f)) = r.next_frame() {
        out.push((f.kind, f.epoch, f.body.to_vec()));
    }
    out
}
