//! The real engine over each implementation: a primary encodes a workload epoch by
//! epoch, the backup receives into its region, applies and acknowledges, and the
//! replica ends byte-identical to the primary's memory.

mod common;

use std::time::Duration;

use common::*;
use fgbi_engine::ApplyError;
use fgbi_transport::{NackReason, Primary, Reply, TransportError};

#[test]
fn the_replica_equals_the_primary_after_every_implementation_carries_the_web_workload() {
    for imp in implementations() {
        let listener = listener();
        let stream = connect(&listener);
        let ended = run_backup(listener, imp, 2000, 2, full_slot(), 1);
        let mut protected = Protected::web(7);
        let mut primary = Primary::connect(stream, &config(imp, 2000), &key(1)).unwrap();
        assert_eq!(primary.backup_committed(), 0);
        for _ in 0..12 {
            commit_one(&mut primary, &mut protected);
        }
        // Two epochs in flight at once, one per slot.
        for _ in 0..6 {
            let first = protected.step();
            let a = first.stats.epoch;
            primary.send_epoch(&first).unwrap();
            drop(first);
            let second = protected.step();
            let b = second.stats.epoch;
            primary.send_epoch(&second).unwrap();
            drop(second);
            for n in [a, b] {
                assert_eq!(
                    primary.wait_reply(Duration::from_secs(10)).unwrap(),
                    Reply::Committed(n)
                );
            }
            protected.encoder.acknowledge(b).unwrap();
        }
        // An epoch from another encoder does not fit the replica's sequence: refused,
        // the replica unchanged, the connection still serving.
        let mut foreign = Protected::web(8);
        let epoch = foreign.step();
        primary.send_epoch(&epoch).unwrap();
        assert_eq!(
            primary.wait_reply(Duration::from_secs(10)).unwrap(),
            Reply::Refused {
                epoch: 1,
                reason: NackReason::OutOfSequence
            }
        );
        for _ in 0..3 {
            commit_one(&mut primary, &mut protected);
        }
        drop(primary);
        let ended = ended.recv().unwrap();
        assert!(
            matches!(ended.error, TransportError::PeerClosed(_)),
            "{}: {}",
            imp.as_str(),
            ended.error
        );
        assert_eq!(ended.committed, 27);
        assert_eq!(ended.committed, protected.encoder.committed());
        assert_eq!(ended.digest, protected.digest(), "{}", imp.as_str());
        assert!(
            matches!(ended.refused[..], [(1, ApplyError::Sequence { .. })]),
            "{:?}",
            ended.refused
        );
    }
}

#[test]
fn an_epoch_larger_than_a_slot_or_beyond_the_window_is_refused_before_sending() {
    for imp in implementations() {
        let listener = listener();
        let stream = connect(&listener);
        // Slots for epochs of up to 16 dirty pages.
        let slot = encoder_config().max_epoch_bytes(16, 64);
        let ended = run_backup(listener, imp, 2000, 2, slot, 1);
        let mut primary = Primary::connect(stream, &config(imp, 2000), &key(1)).unwrap();

        let mut big = Protected::web(3);
        let epoch = big.step();
        let e = primary.send_epoch(&epoch).unwrap_err();
        assert!(
            matches!(e, TransportError::EpochTooLarge { epoch: 1, slot_bytes, .. } if slot_bytes == primary.slot_bytes()),
            "{e}"
        );
        assert!(e.to_string().contains("slot holds"), "{e}");

        // The connection still works: small epochs flow, two at a time at most.
        let mut small = Protected::web(4);
        let mut send = |small: &mut Protected, expect_full: bool| {
            small.write_pages(10);
            let epoch = small.encode();
            let n = epoch.stats.epoch;
            match primary.send_epoch(&epoch) {
                Ok(()) => assert!(!expect_full),
                Err(e) => {
                    assert!(
                        expect_full && matches!(e, TransportError::WindowFull(2)),
                        "{e}"
                    );
                    assert_eq!(
                        primary.wait_reply(Duration::from_secs(10)).unwrap(),
                        Reply::Committed(n - 2)
                    );
                    primary.send_epoch(&epoch).unwrap();
                }
            }
            n
        };
        send(&mut small, false);
        send(&mut small, false);
        let third = send(&mut small, true);
        for n in third - 1..=third {
            assert_eq!(
                primary.wait_reply(Duration::from_secs(10)).unwrap(),
                Reply::Committed(n)
            );
        }
        small.encoder.acknowledge(third).unwrap();
        drop(primary);
        let ended = ended.recv().unwrap();
        assert_eq!(ended.committed, 3);
        assert_eq!(ended.digest, small.digest());
    }
}
