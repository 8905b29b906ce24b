//! A recorded trace as a [`Workload`]: populate writes epoch 0's pages, each step
//! writes the next recorded epoch's pages. After the last epoch the replay starts
//! again at epoch 1; pages are stored whole, so re-applying an epoch writes exactly
//! the recorded contents of those pages (memory is then a mix of recorded states,
//! still a faithful stream of the program's page writes).

use std::sync::Arc;

use super::format::Trace;
use crate::workload::{self, PAGE, Workload, WorkloadError};

/// The name every replayed trace reports.
pub const NAME: &str = "trace";

/// Replays a recorded trace epoch by epoch.
pub struct TraceReplay {
    trace: Arc<Trace>,
    /// The epoch the next step applies.
    next: usize,
}

impl TraceReplay {
    /// A replay of `trace`, over memory of [`Trace::mem_bytes`].
    pub fn new(trace: Arc<Trace>) -> Self {
        Self { trace, next: 1 }
    }

    fn apply(&self, epoch: usize, memory: &mut [u8], written: &mut Vec<u64>) {
        let Some(epoch) = self.trace.epochs().get(epoch) else {
            return;
        };
        for (page, bytes) in epoch.iter() {
            // The reader checked every page against the trace's size; memory smaller
            // than the trace (a caller's mistake) drops the pages beyond it.
            let range = (page as usize)
                .checked_mul(PAGE)
                .map(|at| at..at.saturating_add(PAGE));
            if let Some(dst) = range.and_then(|r| memory.get_mut(r)) {
                dst.copy_from_slice(bytes);
                written.push(page);
            }
        }
    }
}

impl Workload for TraceReplay {
    fn name(&self) -> &'static str {
        NAME
    }

    fn populate(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        self.apply(0, memory, written);
        self.next = 1;
    }

    fn step(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        if self.next >= self.trace.epochs().len() {
            self.next = 1;
        }
        self.apply(self.next, memory, written);
        self.next += 1;
    }

    fn save(&self) -> Vec<u64> {
        vec![self.next as u64]
    }

    fn load(&mut self, words: &[u64]) -> Result<(), WorkloadError> {
        workload::expect_words(NAME, words, 1)?;
        self.next = words[0] as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::trace::format::{Epoch, TraceWriter};

    fn epoch(pages: &[(u64, u8)]) -> Epoch {
        let mut e = Epoch::new();
        for &(page, fill) in pages {
            e.push(page, &[fill; PAGE]);
        }
        e
    }

    #[test]
    fn replay_writes_each_recorded_epoch_then_wraps_to_epoch_one() {
        let mut w = TraceWriter::new(Cursor::new(Vec::new()), 10).unwrap();
        w.write_epoch(&epoch(&[(0, 1), (3, 2)])).unwrap();
        w.write_epoch(&epoch(&[(3, 7)])).unwrap();
        w.write_epoch(&epoch(&[(1, 9), (2, 4)])).unwrap();
        let bytes = w.finish(4).unwrap().into_inner();
        let trace = Arc::new(Trace::read(&bytes[..]).unwrap());
        let mut memory = vec![0u8; 4 * PAGE];
        let mut replay = TraceReplay::new(trace.clone());
        let mut written = Vec::new();
        replay.populate(&mut memory, &mut written);
        assert_eq!(written, [0, 3]);
        let fills = |m: &[u8]| m.chunks(PAGE).map(|p| p[0]).collect::<Vec<u8>>();
        assert_eq!(fills(&memory), [1, 0, 0, 2]);
        written.clear();
        replay.step(&mut memory, &mut written);
        assert_eq!(
            (written.as_slice(), fills(&memory)),
            (&[3][..], vec![1, 0, 0, 7])
        );
        let saved = replay.save();
        let mut twin = TraceReplay::new(trace);
        twin.load(&saved).unwrap();
        let mut copy = memory.clone();
        written.clear();
        replay.step(&mut memory, &mut written);
        assert_eq!(
            (written.as_slice(), fills(&memory)),
            (&[1, 2][..], vec![1, 9, 4, 7])
        );
        written.clear();
        replay.step(&mut memory, &mut written);
        assert_eq!(written, [3], "wraps around to epoch 1");
        twin.step(&mut copy, &mut Vec::new());
        twin.step(&mut copy, &mut Vec::new());
        assert_eq!(copy, memory);
        assert!(twin.load(&[1, 2]).is_err());
    }
}
