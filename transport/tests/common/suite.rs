//! The cases every implementation must pass, each a function of the [`Link`] it
//! runs over: `end_to_end.rs` and `bad_peers.rs` run them over TCP (io_uring and
//! std), `rdma.rs` over RDMA verbs.
//!
//! The real engine carries a workload epoch by epoch and the replica ends
//! byte-identical to the primary's memory; peers that die, stall, flood or crash are
//! reported as typed errors, the replica stays at its last committed epoch, and a
//! new connection resumes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fgbi_engine::ApplyError;
use fgbi_transport::{NackReason, Primary, Reply, TransportError};

use super::*;

pub fn the_replica_equals_the_primary_after_every_implementation_carries_the_web_workload(
    link: &Link,
) {
    let listener = link.listener();
    let stream = connect(&listener);
    let ended = run_backup(listener, link, 2000, 2, full_slot(), 1);
    let mut protected = Protected::web(7);
    let mut primary = Primary::connect(stream, &link.primary(2000), &key(1)).unwrap();
    assert_eq!(primary.backup_committed(), 0);
    for _ in 0..12 {
        commit_one(&mut primary, &mut protected);
    }
    // Two epochs in flight at once, one per slot.
    for _ in 0..6 {
        commit_two_in_flight(&mut primary, &mut protected, Duration::from_secs(10));
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
    ended.assert_peer_closed(link.name());
    assert_eq!(ended.committed, 27);
    assert_eq!(ended.committed, protected.encoder.committed());
    assert_eq!(ended.digest, protected.digest(), "{}", link.name());
    assert!(
        matches!(ended.refused[..], [(1, ApplyError::Sequence { .. })]),
        "{:?}",
        ended.refused
    );
}

pub fn an_epoch_larger_than_a_slot_or_beyond_the_window_is_refused_before_sending(link: &Link) {
    let listener = link.listener();
    let stream = connect(&listener);
    // Slots for epochs of up to 16 dirty pages.
    let slot = encoder_config().max_epoch_bytes(16, 64);
    let ended = run_backup(listener, link, 2000, 2, slot, 1);
    let mut primary = Primary::connect(stream, &link.primary(2000), &key(1)).unwrap();

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

pub fn a_primary_that_stops_mid_epoch_leaves_the_replica_committed_and_a_new_one_resumes(
    link: &Link,
) {
    let listener = link.listener();
    let timeout = 200;
    let ended = run_backup(
        listener.try_clone().unwrap(),
        link,
        timeout,
        2,
        full_slot(),
        4,
    );
    let mut protected = Protected::web(11);

    // 1: five epochs, then the primary goes away cleanly.
    let mut primary =
        Primary::connect(connect(&listener), &link.primary(timeout), &key(1)).unwrap();
    for _ in 0..5 {
        commit_one(&mut primary, &mut protected);
    }
    let at_five = protected.digest();
    drop(primary);
    let first = ended.recv().unwrap();
    first.assert_peer_closed(link.name());

    // 2: a primary that sends half of epoch 6 and then falls silent.
    let mut raw = RawPrimary::connect(link, &listener);
    assert_eq!(raw.backup.committed, 5);
    let epoch = protected.step();
    let bytes = epoch.to_vec();
    drop(epoch);
    raw.half_epoch(6, &bytes);
    let start = Instant::now();
    let second = ended.recv().unwrap();
    assert!(
        matches!(second.error, TransportError::PeerTimeout(t) if t == Duration::from_millis(timeout)),
        "{}: {}",
        link.name(),
        second.error
    );
    assert!(start.elapsed() < Duration::from_millis(timeout) + Duration::from_secs(2));
    assert_eq!(second.committed, 5);
    assert_eq!(second.digest, at_five, "the half epoch reached the replica");
    drop(raw);

    // 3: the primary reconnects, loses epoch 6 and re-sends its pages; then it
    // crashes right after sending an epoch, before the acknowledgement.
    let mut primary =
        Primary::connect(connect(&listener), &link.primary(timeout), &key(1)).unwrap();
    assert_eq!(primary.backup_committed(), 5);
    protected.reconcile(primary.backup_committed());
    assert_eq!(protected.encoder.next_epoch(), 6);
    for _ in 0..3 {
        commit_one(&mut primary, &mut protected);
    }
    let epoch = protected.step();
    assert_eq!(epoch.stats.epoch, 9);
    primary.send_epoch(&epoch).unwrap();
    drop(epoch);
    drop(primary);
    let third = ended.recv().unwrap();
    // Whether epoch 9 arrived whole before the connection broke is up to TCP.
    assert!((8..=9).contains(&third.committed), "{}", third.committed);

    // 4: the next connection learns which, and the replica converges.
    let mut primary =
        Primary::connect(connect(&listener), &link.primary(timeout), &key(1)).unwrap();
    assert_eq!(primary.backup_committed(), third.committed);
    protected.reconcile(primary.backup_committed());
    for _ in 0..3 {
        commit_one(&mut primary, &mut protected);
    }
    drop(primary);
    let fourth = ended.recv().unwrap();
    assert_eq!(fourth.committed, protected.encoder.committed());
    assert_eq!(fourth.digest, protected.digest(), "{}", link.name());
    assert!(fourth.refused.is_empty());
}

pub fn a_huge_declared_length_is_refused_before_any_payload_is_read(link: &Link) {
    let listener = link.listener();
    let ended = run_backup(listener.try_clone().unwrap(), link, 2000, 2, full_slot(), 1);
    let mut raw = RawPrimary::connect(link, &listener);
    // After the declaration, bytes that would land in the slot if the length
    // were believed.
    raw.declare(1, 1 << 40, &[0xee; 4096]);
    let ended = ended.recv().unwrap();
    assert!(
        matches!(&ended.error, TransportError::Protocol(m) if m.contains("declared")),
        "{}",
        ended.error
    );
    assert_eq!(ended.committed, 0);
    // The backup said no before closing (heartbeats may come first).
    let mut m = [0u8; 32];
    loop {
        raw.stream.read_exact(&mut m).unwrap();
        if m[0] != 5 {
            break;
        }
    }
    assert_eq!((m[0], m[1], &m[8..16]), (4, 1, &1u64.to_le_bytes()[..]));
    assert!(raw.backup.slot_bytes < 1 << 40);
}

pub fn a_peer_flooding_heartbeats_is_refused(link: &Link) {
    let listener = link.listener();
    let ended = run_backup(listener.try_clone().unwrap(), link, 2000, 2, full_slot(), 1);
    let mut raw = RawPrimary::connect(link, &listener);
    let beat = control(5, 0, 1, 0);
    let burst: Vec<u8> = beat.iter().copied().cycle().take(32 * 2000).collect();
    // The backup may close while the burst is still being written.
    let _ = raw.stream.write_all(&burst);
    let ended = ended.recv().unwrap();
    assert!(
        matches!(ended.error, TransportError::Flood { count, .. } if count > 64),
        "{}",
        ended.error
    );
}

pub fn a_silent_primary_is_declared_dead_within_the_timeout(link: &Link) {
    let listener = link.listener();
    let ended = run_backup(listener.try_clone().unwrap(), link, 150, 2, full_slot(), 1);
    let raw = RawPrimary::connect(link, &listener);
    let start = Instant::now();
    let ended = ended.recv().unwrap();
    let waited = start.elapsed();
    assert!(
        matches!(ended.error, TransportError::PeerTimeout(_)),
        "{}",
        ended.error
    );
    assert!(
        waited < Duration::from_millis(150) + Duration::from_secs(2),
        "{waited:?}"
    );
    drop(raw);
}

pub fn a_silent_backup_is_declared_dead_within_the_timeout(link: &Link) {
    let listener = link.listener();
    let stream = connect(&listener);
    let (done, wait_done) = mpsc::channel::<()>();
    let silent = link.clone();
    let fake = thread::spawn(move || silent_backup(&silent, listener, wait_done));
    let mut primary = Primary::connect(stream, &link.primary(150), &key(1)).unwrap();
    let mut protected = Protected::web(5);
    protected.write_pages(4);
    let epoch = protected.encode();
    primary.send_epoch(&epoch).unwrap();
    let start = Instant::now();
    let e = primary.wait_reply(Duration::from_secs(30)).unwrap_err();
    let waited = start.elapsed();
    assert!(
        matches!(e, TransportError::PeerTimeout(_)),
        "{}: {e}",
        link.name()
    );
    assert!(
        waited < Duration::from_millis(150) + Duration::from_secs(2),
        "{waited:?}"
    );
    let e = primary.send_epoch(&epoch).unwrap_err();
    assert!(matches!(e, TransportError::Broken), "{e}");
    done.send(()).unwrap();
    fake.join().unwrap();
}

pub fn heartbeats_keep_an_idle_link_alive_past_the_timeout(link: &Link) {
    let listener = link.listener();
    let ended = run_backup(listener.try_clone().unwrap(), link, 150, 2, full_slot(), 1);
    let mut primary = Primary::connect(connect(&listener), &link.primary(150), &key(1)).unwrap();
    let mut protected = Protected::web(6);
    commit_one(&mut primary, &mut protected);
    // Four timeouts without an epoch, and without this side reading.
    thread::sleep(Duration::from_millis(600));
    assert!(
        ended.try_recv().is_err(),
        "the backup gave up on a live primary"
    );
    // Waiting with nothing in flight is refused at once instead of hanging.
    let e = primary.wait_reply(Duration::from_millis(5)).unwrap_err();
    assert!(matches!(e, TransportError::NothingInFlight), "{e}");
    commit_one(&mut primary, &mut protected);
    drop(primary);
    let ended = ended.recv().unwrap();
    ended.assert_peer_closed(link.name());
    assert_eq!(ended.committed, 2);
    assert_eq!(ended.digest, protected.digest());
}

/// Reads control messages from `stream` until one other than a heartbeat, and checks
/// that it acknowledges `epoch`.
fn expect_ack(stream: &mut TcpStream, epoch: u64) {
    let mut m = [0u8; 32];
    loop {
        stream.read_exact(&mut m).unwrap();
        if m[0] != 5 {
            break;
        }
    }
    assert_eq!((m[0], &m[8..16]), (3, &epoch.to_le_bytes()[..]), "{m:?}");
}

pub fn messages_that_arrive_together_or_in_odd_pieces_are_taken_in_order(link: &Link) {
    // One slot (what arrives ahead of an epoch moves within the slot it is in) and
    // two slots (it moves to the next epoch's slot).
    for slots in [1, 2] {
        let listener = link.listener();
        let ended = run_backup(
            listener.try_clone().unwrap(),
            link,
            2000,
            slots,
            full_slot(),
            1,
        );
        let mut raw = RawPrimary::connect(link, &listener);
        let mut protected = Protected::web(21);
        let beat = control(5, 0, 1, 0);
        let framed = |protected: &mut Protected| {
            let epoch = protected.step();
            let (n, bytes) = (epoch.stats.epoch, epoch.to_vec());
            let mut out = control(1, 0, n, bytes.len() as u64).to_vec();
            out.extend_from_slice(&bytes);
            out.extend_from_slice(&control(2, 0, n, 0));
            out
        };
        // Heartbeats and two whole epochs in one write: they arrive together.
        let mut together = beat.to_vec();
        together.extend(framed(&mut protected));
        together.extend(beat);
        together.extend(beat);
        together.extend(framed(&mut protected));
        raw.stream.write_all(&together).unwrap();
        expect_ack(&mut raw.stream, 1);
        expect_ack(&mut raw.stream, 2);
        // Two more, cut inside a message, inside the payload, and inside the COMMIT
        // of one epoch followed by the start of the next; each piece arrives alone.
        let mut stream = framed(&mut protected);
        let first_len = stream.len();
        stream.extend(beat);
        stream.extend(framed(&mut protected));
        // In EPOCH 3, in its payload, in COMMIT 3, in EPOCH 4 (after a heartbeat).
        let cuts = [0, 13, 132, first_len - 20, first_len + 40, stream.len()];
        for piece in cuts.windows(2) {
            raw.stream.write_all(&stream[piece[0]..piece[1]]).unwrap();
            thread::sleep(Duration::from_millis(20));
        }
        expect_ack(&mut raw.stream, 3);
        expect_ack(&mut raw.stream, 4);
        protected.encoder.acknowledge(4).unwrap();
        drop(raw);
        let ended = ended.recv().unwrap();
        ended.assert_peer_closed(&format!("{} ({slots} slots)", link.name()));
        assert_eq!(ended.committed, 4);
        assert_eq!(
            ended.digest,
            protected.digest(),
            "{} ({slots} slots)",
            link.name()
        );
    }
}

pub fn a_primary_moved_to_another_thread_keeps_sending(link: &Link) {
    let listener = link.listener();
    let stream = connect(&listener);
    let ended = run_backup(listener, link, 2000, 2, full_slot(), 1);
    let mut protected = Protected::web(9);
    let mut primary = Primary::connect(stream, &link.primary(2000), &key(1)).unwrap();
    for _ in 0..2 {
        commit_one(&mut primary, &mut protected);
    }
    let (mut primary, mut protected) = thread::spawn(move || {
        for _ in 0..3 {
            commit_one(&mut primary, &mut protected);
        }
        (primary, protected)
    })
    .join()
    .unwrap();
    for _ in 0..2 {
        commit_one(&mut primary, &mut protected);
    }
    drop(primary);
    let ended = ended.recv().unwrap();
    ended.assert_peer_closed(link.name());
    assert_eq!(ended.committed, 7);
    assert_eq!(ended.digest, protected.digest(), "{}", link.name());
}

/// A scrub compares chunks of the replica at its committed epoch with the digests
/// sent, names exactly the chunks that differ, and the connection serves on.
pub fn a_scrub_names_exactly_the_chunks_that_differ(link: &Link) {
    let listener = link.listener();
    let stream = connect(&listener);
    let ended = run_backup(listener, link, 2000, 2, full_slot(), 1);
    let mut protected = Protected::web(3);
    let mut primary = Primary::connect(stream, &link.primary(2000), &key(1)).unwrap();
    for _ in 0..5 {
        commit_one(&mut primary, &mut protected);
    }
    let chunk = fgbi_transport::SCRUB_CHUNK_BYTES;
    let first = 2u64;
    let mut digests: Vec<u128> = (first..first + 16)
        .map(|c| {
            let start = c as usize * chunk;
            fgbi_engine::memory_digest(&protected.memory[start..start + chunk])
        })
        .collect();
    let timeout = Duration::from_secs(10);
    assert_eq!(primary.scrub(first, &digests, timeout).unwrap(), (5, 0));
    digests[3] ^= 1;
    digests[15] ^= 1 << 100;
    assert_eq!(
        primary.scrub(first, &digests, timeout).unwrap(),
        (5, (1 << 3) | (1 << 15))
    );
    commit_one(&mut primary, &mut protected);
    // More chunks than a result can name are refused before anything is sent.
    assert!(primary.scrub(0, &[0; 65], timeout).is_err());
    drop(primary);
    let ended = ended.recv().unwrap();
    assert_eq!(ended.committed, 6);
    assert_eq!(ended.digest, protected.digest());
}
