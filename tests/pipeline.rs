//! Pipelined epochs: the primary sends the next checkpoint while earlier ones await
//! their acknowledgement, never more at once than the backup has receive slots, and
//! a backup that falls behind stretches the epoch instead of growing memory.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use fgbi::primary::{self, PrimaryEvent, PrimaryOptions};
use fgbi_engine::memory_digest;
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};
use fgbi_transport::Implementation;

use common::Pair;

const EPOCHS: u64 = 16;

#[test]
fn epochs_overlap_up_to_the_receive_slots_and_the_replica_stays_exact() {
    for implementation in [Implementation::Std, Implementation::Uring] {
        if !fgbi_hyp::feature::available(implementation.as_str(), implementation.available()) {
            continue;
        }
        let name = implementation.as_str();
        let mut pair = Pair::new(
            &format!("pipeline-{name}"),
            8 << 20,
            1 << 20,
            implementation,
        );
        // A slow backup: it takes 15 ms to get to each epoch, three times the epoch.
        let backup = pair.serve_by_hand(|mut link, applier, replica| {
            let mut digests = HashMap::new();
            loop {
                std::thread::sleep(Duration::from_millis(15));
                match link.serve_one(applier, replica) {
                    Ok(_) => {
                        digests.insert(applier.committed(), memory_digest(replica));
                    }
                    Err(_) => return digests,
                }
            }
        });
        let mut machine =
            SyntheticMachine::new("web", 8 << 20, 3, Tracking::Kernel, false).unwrap();
        let options = PrimaryOptions {
            scrub_every: 0,
            // Every epoch a checkpoint, so every replica can be compared with one.
            pre_copy: false,
            ..pair.primary_options(EPOCHS)
        };
        let (mut sent, mut committed, mut most_in_flight) = (HashMap::new(), 0, 0);
        let mut checkpoints = Vec::new();
        let last = primary::run(
            &mut machine,
            |m| m.run().map_err(Into::into),
            &options,
            &pair.key(),
            |e| match e {
                PrimaryEvent::Sent { epoch, digest, .. } => {
                    sent.extend(digest.map(|d| (epoch, d)));
                    most_in_flight = most_in_flight.max(epoch - committed);
                }
                PrimaryEvent::Committed {
                    epoch,
                    checkpoints: c,
                } => {
                    committed = epoch;
                    checkpoints.push(c);
                }
                // The backup serves one connection: without it the loop would never end.
                PrimaryEvent::Unprotected { reason } => {
                    panic!("{name}: the backup was lost: {reason}")
                }
                _ => {}
            },
        )
        .unwrap();
        assert_eq!(last, EPOCHS, "{name}");
        assert_eq!(
            most_in_flight, 2,
            "{name}: a second epoch was sent before the first was acknowledged, never a third"
        );
        assert!(
            checkpoints.windows(2).all(|w| w[0] < w[1]) && checkpoints.last() == Some(&EPOCHS),
            "{name}: commits name the checkpoints in order: {checkpoints:?}"
        );
        let replicas = backup.join().unwrap();
        assert_eq!(replicas.len() as u64, EPOCHS, "{name}");
        for (epoch, digest) in &replicas {
            assert_eq!(
                Some(digest),
                sent.get(epoch),
                "{name}: replica = checkpoint {epoch}"
            );
        }
    }
}
