//! Scrubbing: a replica page corrupted on purpose on the backup is found by the
//! primary's periodic comparison of chunk digests, reported, and repaired; with
//! scrubbing off it stays wrong.

mod common;

use std::collections::HashMap;

use fgbi::primary::{self, PrimaryEvent, PrimaryOptions};
use fgbi_engine::{PAGE_SIZE, memory_digest};
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_transport::{Implementation, SCRUB_CHUNK_BYTES, Served};

use common::Pair;

/// The page the test corrupts on the backup, after it committed [`CORRUPT_AFTER`].
const CORRUPT_PAGE: usize = 1234;
const CORRUPT_AFTER: u64 = 3;
const EPOCHS: u64 = 24;

/// What one run of a primary and a backup whose replica was corrupted saw.
struct Run {
    /// The primary's checkpoint digests by epoch.
    digests: HashMap<u64, u128>,
    /// Pages the primary found diverged.
    diverged: Vec<u64>,
    /// Chunks the backup found different.
    mismatched: Vec<u64>,
    /// The backup's committed epoch and its replica's digest at the end.
    replica: (u64, u128),
}

fn run(implementation: Implementation, scrub_every: u64) -> Run {
    let mut pair = Pair::new(
        &format!("scrub-{}-{scrub_every}", implementation.as_str()),
        16 << 20,
        1 << 20,
        implementation,
    );
    let backup = pair.serve_by_hand(|mut link, applier, replica| {
        let mut mismatched = Vec::new();
        // Served until the primary, done, closes the connection.
        while let Ok(served) = link.serve_one(applier, replica) {
            match served {
                Served::Committed(applied) if applied.epoch == CORRUPT_AFTER => {
                    replica[CORRUPT_PAGE * PAGE_SIZE + 100] ^= 0xa5;
                }
                Served::Scrubbed { mismatched: m, .. } => mismatched.extend(m),
                _ => {}
            }
        }
        (mismatched, applier.committed(), memory_digest(replica))
    });

    let mut machine = SyntheticMachine::new("idle", 16 << 20, 5, Tracking::Kernel, false).unwrap();
    let options = PrimaryOptions {
        scrub_every,
        ..pair.primary_options(EPOCHS)
    };
    let (mut digests, mut diverged, mut protected) = (HashMap::new(), Vec::new(), false);
    primary::run(
        &mut machine,
        |m| m.run().map_err(Into::into),
        &options,
        &pair.key(),
        |e| match e {
            PrimaryEvent::Sent { epoch, digest, .. } => digests.extend(digest.map(|d| (epoch, d))),
            PrimaryEvent::Scrubbed { diverged: d, .. } => diverged.extend(d),
            // The backup serves one connection: without it the loop would never end.
            PrimaryEvent::Committed { .. } => protected = true,
            PrimaryEvent::Unprotected { reason } if protected => {
                panic!("the backup was lost: {reason}")
            }
            _ => {}
        },
    )
    .unwrap();
    let (mismatched, epoch, digest) = backup.join().unwrap();
    Run {
        digests,
        diverged,
        mismatched,
        replica: (epoch, digest),
    }
}

#[test]
fn a_corrupted_replica_page_is_found_reported_and_repaired() {
    for implementation in [Implementation::Std, Implementation::Uring] {
        if !fgbi_hyp::feature::available(implementation.as_str(), implementation.available()) {
            continue;
        }
        let name = implementation.as_str();
        // Every second epoch 1 MiB: the corrupted chunk comes round at epoch 10.
        let scrubbed = run(implementation, 2);
        let chunk = (CORRUPT_PAGE * PAGE_SIZE / SCRUB_CHUNK_BYTES) as u64;
        assert_eq!(
            scrubbed.mismatched,
            vec![chunk],
            "{name}: the backup saw it"
        );
        let pages_per_chunk = (SCRUB_CHUNK_BYTES / PAGE_SIZE) as u64;
        let expected: Vec<u64> = (chunk * pages_per_chunk..(chunk + 1) * pages_per_chunk).collect();
        assert_eq!(
            scrubbed.diverged, expected,
            "{name}: the primary reported it"
        );
        assert_eq!(scrubbed.replica.0, EPOCHS);
        assert_eq!(
            Some(scrubbed.replica.1),
            scrubbed.digests.get(&EPOCHS).copied(),
            "{name}: repaired: the replica equals the last checkpoint"
        );

        // Negative control: without scrubbing the corruption stays.
        let unscrubbed = run(implementation, 0);
        assert!(unscrubbed.mismatched.is_empty() && unscrubbed.diverged.is_empty());
        assert_eq!(unscrubbed.replica.0, EPOCHS);
        assert_ne!(
            Some(unscrubbed.replica.1),
            unscrubbed.digests.get(&EPOCHS).copied(),
            "{name}: unscrubbed, the replica stays diverged"
        );
    }
}
