//! The pause: everything that happens while the protected program is stopped.
//!
//! [`Checkpointer::take`] stops the program, harvests its dirty pages, adds the pages
//! carried from lost epochs, captures its state blob, keeps the dirty pages safe from
//! later writes, optionally takes the checkpoint's digest for verification, and lets
//! the program run again, whatever failed. The time from stop to resume, less the
//! verification digest, is type II downtime.
//!
//! Pages are kept safe one of two ways, as the program was set up: copied out while
//! it is stopped (Remus), or, when it offers [`Protected::copy_on_write`],
//! write-protected while it is stopped and copied out after it resumes, each before
//! the program's first write to it, so the pause no longer grows with the dirty set.

use std::ops::Range;
use std::time::{Duration, Instant};

use fgbi_engine::memory_digest;
use fgbi_hyp::protected::{HypError, Protected};

use crate::fault::{self, Point};
use crate::staging::Staging;

/// Reused buffers for taking checkpoints.
#[derive(Default)]
pub struct Checkpointer {
    staging: Staging,
    dirty: Vec<u64>,
    state: Vec<u8>,
    /// Chunks of memory to digest at the next pause, for a scrub.
    scrub: Option<Range<u64>>,
    scrub_digests: Vec<u128>,
}

/// One checkpoint, borrowed from the [`Checkpointer`] until the next.
pub struct Checkpoint<'a> {
    /// Pages to encode: harvested and carried, sorted.
    pub dirty: &'a [u64],
    /// Their contents at the checkpoint.
    pub pages: &'a Staging,
    /// The state blob.
    pub state: &'a [u8],
    /// Type II downtime.
    pub pause: Duration,
    /// Digest of the whole memory at the checkpoint, when asked for.
    pub digest: Option<u128>,
    /// Digests of the chunks [`Checkpointer::scrub`] asked for, taken while the
    /// program was stopped (empty when none were).
    pub scrub: &'a [u128],
}

impl Checkpointer {
    /// Empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the next checkpoint for the xxh3-128 digests of memory's chunks `chunks`
    /// ([`fgbi_transport::SCRUB_CHUNK_BYTES`] each; the last chunk of memory may be
    /// shorter), taken while the program is stopped and counted in the pause.
    pub fn scrub(&mut self, chunks: Range<u64>) {
        self.scrub = Some(chunks);
    }

    /// Takes a checkpoint of `program`, adding `carried` pages to its dirty pages.
    pub fn take<P: Protected + ?Sized>(
        &mut self,
        program: &mut P,
        carried: &[u64],
        verify: bool,
    ) -> Result<Checkpoint<'_>, HypError> {
        let stopped = Instant::now();
        program.stop()?;
        let captured = self.capture(program, carried);
        // Copy-on-write: arm the pages now, copy them after the program resumes.
        let armed = match (&captured, program.copy_on_write()) {
            (Ok(()), Some(cow)) => {
                // Pages outside memory are left out, as when copying: the encoder
                // refuses them with a clear error when it sees the dirty list.
                let pages = (program.memory().len() / fgbi_engine::PAGE_SIZE) as u64;
                let inside = self.dirty.iter().copied().filter(|&p| p < pages).collect();
                Some(cow.arm(inside, self.staging.take_buffer()))
            }
            _ => None,
        };
        fault::reached(Point::Pause);
        self.scrub_digests.clear();
        if let (Ok(()), Some(chunks)) = (&captured, self.scrub.take()) {
            let memory = program.memory();
            let chunk = fgbi_transport::SCRUB_CHUNK_BYTES;
            self.scrub_digests.extend(chunks.map(|c| {
                let start = (c as usize).saturating_mul(chunk).min(memory.len());
                memory_digest(&memory[start..(start + chunk).min(memory.len())])
            }));
        }
        let mut digest_time = Duration::ZERO;
        let digest = (captured.is_ok() && verify).then(|| {
            let started = Instant::now();
            let digest = memory_digest(program.memory());
            digest_time = started.elapsed();
            digest
        });
        // Never leave the program stopped, whatever failed.
        let resumed = program.resume();
        let pause = stopped.elapsed().saturating_sub(digest_time);
        captured?;
        // The copy runs even if resuming failed: an armed snapshot must be finished.
        let copied = armed.map(|armed| armed.and_then(|a| a.finish()));
        resumed?;
        if let Some(copied) = copied {
            let (pages, data) = copied?;
            self.staging
                .install(pages, data, program.memory().len() as u64);
        }
        Ok(Checkpoint {
            dirty: &self.dirty,
            pages: &self.staging,
            state: &self.state,
            pause,
            digest,
            scrub: &self.scrub_digests,
        })
    }

    fn capture<P: Protected + ?Sized>(
        &mut self,
        program: &mut P,
        carried: &[u64],
    ) -> Result<(), HypError> {
        self.dirty.clear();
        program.harvest(&mut self.dirty)?;
        self.dirty.extend_from_slice(carried);
        self.state.clear();
        program.capture_state(&mut self.state)?;
        if program.copy_on_write().is_some() {
            self.dirty.sort_unstable();
            self.dirty.dedup();
        } else {
            self.staging.capture(program.memory(), &mut self.dirty);
        }
        Ok(())
    }
}
