//! The transport over RDMA verbs: the same cases as `end_to_end.rs` and
//! `bad_peers.rs` (from `common/suite.rs`), and what only RDMA has (the ring's key,
//! one-sided writes a hostile primary can aim anywhere in the ring), between the
//! devices `FGBI_RDMA_DEVICE_A` (primary) and `FGBI_RDMA_DEVICE_B` (backup,
//! listening on `FGBI_RDMA_ADDR_B`).
//!
//! Without a usable RDMA device these skip loudly, and fail only with
//! `FGBI_RDMA_REQUIRED=1` (set in the Soft-RoCE guest of tests/rdma/soft-roce.sh).

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use fgbi_transport::handshake::{self, Offer};
use fgbi_transport::rdma::LINK_MAGIC;
use fgbi_transport::{Primary, RdmaConfig, Reply, TransportError};

cases!(rdma_links;
    the_replica_equals_the_primary_after_every_implementation_carries_the_web_workload,
    an_epoch_larger_than_a_slot_or_beyond_the_window_is_refused_before_sending,
    a_scrub_names_exactly_the_chunks_that_differ,
    a_primary_that_stops_mid_epoch_leaves_the_replica_committed_and_a_new_one_resumes,
    a_huge_declared_length_is_refused_before_any_payload_is_read,
    a_peer_flooding_heartbeats_is_refused,
    a_silent_primary_is_declared_dead_within_the_timeout,
    a_silent_backup_is_declared_dead_within_the_timeout,
    heartbeats_keep_an_idle_link_alive_past_the_timeout,
);

#[test]
fn an_absent_device_is_a_clear_error() {
    let config = RdmaConfig {
        device: Some("fgbi-no-such-device".into()),
        ..RdmaConfig::default()
    };
    let e = config.available().unwrap_err().to_string();
    assert!(e.starts_with("RDMA unavailable: "), "{e}");
    assert!(e.contains("--transport tcp"), "{e}");
    // The library is missing, or it finds no devices, or it names those it has.
    assert!(
        e.contains("libibverbs.so.1 not found")
            || e.contains("no RDMA devices")
            || e.contains("no RDMA support")
            || e.contains("fgbi-no-such-device"),
        "{e}"
    );
}

/// Reads everything the backup sends until it closes, and says whether any of it
/// was a LINK message (which carries the ring's key).
fn saw_a_link(mut stream: std::net::TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all);
    all.windows(4).any(|w| w == LINK_MAGIC)
}

#[test]
fn a_wrong_key_or_geometry_is_refused_before_any_rkey_is_shared() {
    for link in rdma_links() {
        let listener = link.listener();
        let ended = run_backup(
            listener.try_clone().unwrap(),
            &link,
            2000,
            2,
            full_slot(),
            2,
        );

        let mut stream = connect(&listener);
        let e = handshake::connect(
            &mut stream,
            &primary_offer(),
            &key(2),
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(e.to_string().contains("key"), "{e}");
        let refused = ended.recv().unwrap();
        assert!(
            matches!(refused.error, TransportError::Handshake(_)),
            "{}",
            refused.error
        );
        assert!(
            !saw_a_link(stream),
            "a peer with the wrong key learned the ring's key"
        );

        let mut stream = connect(&listener);
        let other = Offer {
            mem_bytes: 32 << 20,
            ..primary_offer()
        };
        let e =
            handshake::connect(&mut stream, &other, &key(1), Duration::from_secs(10)).unwrap_err();
        assert!(
            e.to_string().contains("geometry") || e.to_string().contains("sizes"),
            "{e}"
        );
        let refused = ended.recv().unwrap();
        assert!(
            matches!(refused.error, TransportError::Handshake(_)),
            "{}",
            refused.error
        );
        assert!(
            !saw_a_link(stream),
            "a peer of another geometry learned the ring's key"
        );
    }
}

/// Waits for the backup's NACK of `epoch` on a raw primary's connection.
fn expect_nack(raw: &mut RawPrimary, epoch: u64) {
    let mut m = [0u8; 32];
    loop {
        raw.stream.read_exact(&mut m).unwrap();
        if m[0] != 5 {
            break;
        }
    }
    assert_eq!((m[0], m[1], &m[8..16]), (4, 1, &epoch.to_le_bytes()[..]));
}

#[test]
fn garbage_written_into_the_ring_is_refused_and_the_replica_stays_committed() {
    for link in rdma_links() {
        let listener = link.listener();
        let ended = run_backup(
            listener.try_clone().unwrap(),
            &link,
            2000,
            2,
            full_slot(),
            3,
        );
        let mut protected = Protected::web(21);
        let mut primary =
            Primary::connect(connect(&listener), &link.primary(2000), &key(1)).unwrap();
        for _ in 0..3 {
            commit_one(&mut primary, &mut protected);
        }
        let at_three = protected.digest();
        drop(primary);
        assert_eq!(ended.recv().unwrap().committed, 3);

        // A primary that writes garbage into its slot and commits it as epoch 4: the
        // applier refuses it (NACK) and the connection goes on; then one whose commit
        // record is garbage, and one whose immediate data contradicts its record:
        // both are refused and end the connection.
        let mut raw = RawPrimary::connect(&link, &listener);
        assert_eq!(raw.backup.committed, 3);
        let garbage: Vec<u8> = (0..64 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        raw.declare(4, garbage.len() as u64, &garbage);
        expect_nack(&mut raw, 4);
        let writer = raw.rdma.as_mut().unwrap();
        writer.write(&[&garbage]).unwrap();
        writer.commit(&[0xab; 32], 4).unwrap();
        let ended_garbage = ended.recv().unwrap();
        assert!(
            matches!(&ended_garbage.error, TransportError::Protocol(m) if m.contains("commit record")),
            "{}",
            ended_garbage.error
        );
        assert_eq!(ended_garbage.committed, 3);
        assert_eq!(ended_garbage.digest, at_three);
        assert!(
            matches!(ended_garbage.refused[..], [(4, _)]),
            "{:?}",
            ended_garbage.refused
        );
        drop(raw);

        let mut raw = RawPrimary::connect(&link, &listener);
        let epoch = protected.step();
        let bytes = epoch.to_vec();
        drop(epoch);
        let writer = raw.rdma.as_mut().unwrap();
        writer.write(&[&bytes]).unwrap();
        writer
            .commit(&control(1, 0, 4, bytes.len() as u64), 5)
            .unwrap();
        let ended_imm = ended.recv().unwrap();
        assert!(
            matches!(&ended_imm.error, TransportError::Protocol(m) if m.contains("immediate")),
            "{}",
            ended_imm.error
        );
        assert_eq!(ended_imm.committed, 3);
        assert_eq!(
            ended_imm.digest, at_three,
            "an uncommitted epoch reached the replica"
        );
    }
}

/// Prints a figure where the Soft-RoCE harness collects it (straight to stderr, past
/// the test harness's capture).
fn report(key: &str, value: f64) {
    let line = format!("FGBI-ROCE result {key}={value:.3}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

#[test]
fn hundreds_of_epochs_leave_the_replica_equal_and_large_ones_measure_throughput() {
    for link in rdma_links() {
        let listener = link.listener();
        let stream = connect(&listener);
        let ended = run_backup(listener, &link, 5000, 2, full_slot(), 1);
        let mut protected = Protected::web(31);
        let mut primary = Primary::connect(stream, &link.primary(5000), &key(1)).unwrap();
        // The web workload, with up to two epochs in flight.
        for _ in 0..150 {
            commit_two_in_flight(&mut primary, &mut protected, Duration::from_secs(30));
        }
        // Large epochs (1024 pages of incompressible bytes, about 4 MiB): the time
        // `send_epoch` takes to place each in the backup's ring and commit it.
        let (mut bytes, mut writing) = (0u64, Duration::ZERO);
        for _ in 0..16 {
            protected.scramble_pages(1024);
            let epoch = protected.encode();
            let n = epoch.stats.epoch;
            bytes += epoch.len() as u64;
            let start = Instant::now();
            primary.send_epoch(&epoch).unwrap();
            writing += start.elapsed();
            drop(epoch);
            assert_eq!(
                primary.wait_reply(Duration::from_secs(60)).unwrap(),
                Reply::Committed(n)
            );
            protected.encoder.acknowledge(n).unwrap();
        }
        drop(primary);
        let ended = ended.recv().unwrap();
        assert_eq!(ended.committed, 316);
        assert_eq!(ended.committed, protected.encoder.committed());
        assert_eq!(ended.digest, protected.digest());
        assert!(ended.refused.is_empty(), "{:?}", ended.refused);
        let gbps = bytes as f64 * 8.0 / writing.as_secs_f64() / 1e9;
        report("fgbi_rdma_epoch_bytes", bytes as f64);
        report("fgbi_rdma_epoch_gbps", gbps);
    }
}
