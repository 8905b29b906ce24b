//! Peers that die, stall, flood or crash: the backup reports each as a typed error,
//! its replica stays at its last committed epoch, and a new connection resumes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fgbi_transport::handshake::{self, Offer, PROTOCOL_VERSION, Role};
use fgbi_transport::{Primary, TransportError};

/// A raw primary: authenticated, then speaking whatever the test writes.
fn raw_primary(listener: &std::net::TcpListener) -> (TcpStream, Offer) {
    let mut stream = connect(listener);
    let backup = handshake::connect(
        &mut stream,
        &primary_offer(),
        &key(1),
        Duration::from_secs(2),
    )
    .unwrap();
    (stream, backup)
}

#[test]
fn a_primary_that_stops_mid_epoch_leaves_the_replica_committed_and_a_new_one_resumes() {
    for imp in implementations() {
        let listener = listener();
        let timeout = 200;
        let ended = run_backup(
            listener.try_clone().unwrap(),
            imp,
            timeout,
            2,
            full_slot(),
            4,
        );
        let mut protected = Protected::web(11);

        // 1: five epochs, then the primary goes away cleanly.
        let mut primary =
            Primary::connect(connect(&listener), &config(imp, timeout), &key(1)).unwrap();
        for _ in 0..5 {
            commit_one(&mut primary, &mut protected);
        }
        let at_five = protected.digest();
        drop(primary);
        let first = ended.recv().unwrap();
        assert!(
            matches!(first.error, TransportError::PeerClosed(_)),
            "{}",
            first.error
        );

        // 2: a primary that sends half of epoch 6 and then falls silent.
        let (mut raw, backup) = raw_primary(&listener);
        assert_eq!(backup.committed, 5);
        let epoch = protected.step();
        let bytes = epoch.to_vec();
        drop(epoch);
        raw.write_all(&control(1, 0, 6, bytes.len() as u64))
            .unwrap();
        raw.write_all(&bytes[..bytes.len() / 2]).unwrap();
        let start = Instant::now();
        let second = ended.recv().unwrap();
        assert!(
            matches!(second.error, TransportError::PeerTimeout(t) if t == Duration::from_millis(timeout)),
            "{}: {}",
            imp.as_str(),
            second.error
        );
        assert!(start.elapsed() < Duration::from_millis(timeout) + Duration::from_secs(2));
        assert_eq!(second.committed, 5);
        assert_eq!(second.digest, at_five, "the half epoch reached the replica");
        drop(raw);

        // 3: the primary reconnects, loses epoch 6 and re-sends its pages; then it
        // crashes right after sending an epoch, before the acknowledgement.
        let mut primary =
            Primary::connect(connect(&listener), &config(imp, timeout), &key(1)).unwrap();
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
            Primary::connect(connect(&listener), &config(imp, timeout), &key(1)).unwrap();
        assert_eq!(primary.backup_committed(), third.committed);
        protected.reconcile(primary.backup_committed());
        for _ in 0..3 {
            commit_one(&mut primary, &mut protected);
        }
        drop(primary);
        let fourth = ended.recv().unwrap();
        assert_eq!(fourth.committed, protected.encoder.committed());
        assert_eq!(fourth.digest, protected.digest(), "{}", imp.as_str());
        assert!(fourth.refused.is_empty());
    }
}

#[test]
fn a_huge_declared_length_is_refused_before_any_payload_is_read() {
    for imp in implementations() {
        let listener = listener();
        let ended = run_backup(listener.try_clone().unwrap(), imp, 2000, 2, full_slot(), 1);
        let (mut raw, backup) = raw_primary(&listener);
        raw.write_all(&control(1, 0, 1, 1 << 40)).unwrap();
        // Bytes that would land in the slot if the length were believed.
        raw.write_all(&[0xee; 4096]).unwrap();
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
            raw.read_exact(&mut m).unwrap();
            if m[0] != 5 {
                break;
            }
        }
        assert_eq!((m[0], m[1], &m[8..16]), (4, 1, &1u64.to_le_bytes()[..]));
        assert!(backup.slot_bytes < 1 << 40);
    }
}

#[test]
fn a_peer_flooding_heartbeats_is_refused() {
    for imp in implementations() {
        let listener = listener();
        let ended = run_backup(listener.try_clone().unwrap(), imp, 2000, 2, full_slot(), 1);
        let (mut raw, _) = raw_primary(&listener);
        let beat = control(5, 0, 1, 0);
        let burst: Vec<u8> = beat.iter().copied().cycle().take(32 * 2000).collect();
        // The backup may close while the burst is still being written.
        let _ = raw.write_all(&burst);
        let ended = ended.recv().unwrap();
        assert!(
            matches!(ended.error, TransportError::Flood { count, .. } if count > 64),
            "{}",
            ended.error
        );
    }
}

#[test]
fn a_silent_primary_is_declared_dead_within_the_timeout() {
    for imp in implementations() {
        let listener = listener();
        let ended = run_backup(listener.try_clone().unwrap(), imp, 150, 2, full_slot(), 1);
        let (raw, _) = raw_primary(&listener);
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
}

#[test]
fn a_silent_backup_is_declared_dead_within_the_timeout() {
    for imp in implementations() {
        let listener = listener();
        let stream = connect(&listener);
        let (done, wait_done) = mpsc::channel::<()>();
        let fake = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let offer = Offer {
                version: PROTOCOL_VERSION,
                role: Role::Backup,
                mem_bytes: geometry().mem_bytes(),
                block_size: 64,
                slots: 2,
                slot_bytes: full_slot() as u64,
                committed: 0,
            };
            handshake::accept(&mut stream, &offer, &key(1), Duration::from_secs(2)).unwrap();
            // Takes the epoch into its socket buffer, then says nothing.
            let _ = wait_done.recv();
        });
        let mut primary = Primary::connect(stream, &config(imp, 150), &key(1)).unwrap();
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
            imp.as_str()
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
}

#[test]
fn heartbeats_keep_an_idle_link_alive_past_the_timeout() {
    for imp in implementations() {
        let listener = listener();
        let ended = run_backup(listener.try_clone().unwrap(), imp, 150, 2, full_slot(), 1);
        let mut primary = Primary::connect(connect(&listener), &config(imp, 150), &key(1)).unwrap();
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
        assert!(
            matches!(ended.error, TransportError::PeerClosed(_)),
            "{}",
            ended.error
        );
        assert_eq!(ended.committed, 2);
        assert_eq!(ended.digest, protected.digest());
    }
}
