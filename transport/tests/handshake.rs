//! The handshake: keys, versions, geometry, roles, garbage; every refusal reaches
//! both sides before any epoch byte can move.

mod common;

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fgbi_engine::Geometry;
use fgbi_transport::handshake::{self, PROTOCOL_VERSION, RefusalCode, Role};
use fgbi_transport::{
    Backup, HandshakeError, Implementation, KeyError, PresharedKey, Primary, ReceiveRegion,
    TransportError,
};

/// Runs a backup that accepts one connection and returns its result.
fn backup_once(
    listener: std::net::TcpListener,
    key: PresharedKey,
    committed: u64,
) -> thread::JoinHandle<Result<(), TransportError>> {
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut region = ReceiveRegion::new(2, 1 << 20)?;
        let config = config(Implementation::Std, 1000);
        Backup::accept(stream, &mut region, &config, &key, committed).map(drop)
    })
}

#[test]
fn key_files_that_are_missing_empty_short_or_readable_by_others_are_refused() {
    let missing = std::env::temp_dir().join("fgbi-transport-no-such-key");
    let e = PresharedKey::from_file(&missing).unwrap_err();
    assert!(matches!(e, KeyError::Read { .. }), "{e}");
    assert!(e.to_string().contains("chmod 600"), "{e}");

    let e = PresharedKey::from_file(file_with(b"", 0o600)).unwrap_err();
    assert!(matches!(e, KeyError::Empty(_)), "{e}");

    let e = PresharedKey::from_file(file_with(b"short", 0o600)).unwrap_err();
    assert!(matches!(e, KeyError::TooShort { len: 5, .. }), "{e}");

    let e = PresharedKey::from_file(file_with(&[7; 32], 0o644)).unwrap_err();
    assert!(
        matches!(e, KeyError::Permissions { mode: 0o644, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("chmod 600"), "{e}");

    let e = PresharedKey::from_file(std::env::temp_dir()).unwrap_err();
    assert!(matches!(e, KeyError::NotAFile(_)), "{e}");

    let key = PresharedKey::from_file(file_with(&[7; 32], 0o600)).unwrap();
    assert!(
        !format!("{key:?}").contains('7'),
        "the key leaks through Debug"
    );
}

#[test]
fn matching_peers_connect_and_the_primary_learns_the_backups_slots_and_epoch() {
    for imp in tcp_links().into_iter().map(|link| link.implementation) {
        let listener = listener();
        let addr = listener.local_addr().unwrap();
        let backup = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut region = ReceiveRegion::new(3, 1 << 20).unwrap();
            let backup = Backup::accept(stream, &mut region, &config(imp, 1000), &key(1), 41);
            backup.map(drop)
        });
        let stream = std::net::TcpStream::connect(addr).unwrap();
        let primary = Primary::connect(stream, &config(imp, 1000), &key(1)).unwrap();
        assert_eq!(primary.backup_committed(), 41);
        assert_eq!(primary.slots(), 3);
        assert_eq!(primary.slot_bytes(), 1 << 20);
        backup.join().unwrap().unwrap();
    }
}

#[test]
fn a_wrong_key_is_refused_on_both_sides() {
    let listener = listener();
    let stream = connect(&listener);
    let backup = backup_once(listener, key(1), 0);
    let e = Primary::connect(stream, &config(Implementation::Std, 1000), &key(2)).unwrap_err();
    assert!(
        matches!(e, TransportError::Handshake(HandshakeError::Authentication)),
        "{e}"
    );
    let e = backup.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Handshake(HandshakeError::Refused(RefusalCode::Authentication))
        ),
        "{e}"
    );
}

#[test]
fn a_primary_without_the_key_cannot_forge_its_proof() {
    // Speaks the handshake from the specification, with a made-up proof.
    let listener = listener();
    let mut stream = connect(&listener);
    let backup = backup_once(listener, key(1), 0);
    let mut hello = [0u8; HANDSHAKE];
    hello[..4].copy_from_slice(b"FGBT");
    hello[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello[6] = 1; // HELLO
    hello[7] = 1; // primary
    hello[8..16].copy_from_slice(&geometry().mem_bytes().to_le_bytes());
    hello[16..20].copy_from_slice(&64u32.to_le_bytes());
    hello[40..72].copy_from_slice(&[9; 32]);
    stream.write_all(&hello).unwrap();
    let mut answer = [0u8; HANDSHAKE];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!((&answer[..4], answer[6], answer[7]), (&b"FGBT"[..], 1, 2));
    let mut proof = hello;
    proof[6] = 2; // PROOF
    proof[72..].copy_from_slice(&[0xa5; 32]);
    stream.write_all(&proof).unwrap();
    stream.read_exact(&mut answer).unwrap();
    assert_eq!(
        (answer[6], answer[7]),
        (4, 5),
        "REFUSE with code authentication"
    );
    let e = backup.join().unwrap().unwrap_err();
    assert!(
        matches!(e, TransportError::Handshake(HandshakeError::Authentication)),
        "{e}"
    );
}

#[test]
fn a_wrong_protocol_version_or_role_is_refused_with_its_code() {
    for (version, role, code) in [
        (PROTOCOL_VERSION + 1, Role::Primary, RefusalCode::Version),
        (PROTOCOL_VERSION, Role::Backup, RefusalCode::Role),
    ] {
        let listener = listener();
        let mut stream = connect(&listener);
        let backup = backup_once(listener, key(1), 0);
        let mut offer = primary_offer();
        offer.version = version;
        offer.role = role;
        let e = handshake::connect(&mut stream, &offer, &key(1), Duration::from_secs(1));
        assert!(
            matches!(e, Err(HandshakeError::Refused(c)) if c == code),
            "{e:?}"
        );
        let e = backup.join().unwrap().unwrap_err();
        match code {
            RefusalCode::Version => assert!(
                matches!(
                    e,
                    TransportError::Handshake(HandshakeError::Version { ours, theirs })
                        if ours == PROTOCOL_VERSION && theirs == PROTOCOL_VERSION + 1
                ),
                "{e}"
            ),
            _ => assert!(
                matches!(
                    e,
                    TransportError::Handshake(HandshakeError::Role {
                        expected: Role::Primary,
                        theirs: 2
                    })
                ),
                "{e}"
            ),
        }
    }
}

#[test]
fn a_wrong_geometry_is_refused_on_both_sides() {
    for (mem, block) in [(32 << 20, 64), (16 << 20, 128)] {
        let listener = listener();
        let stream = connect(&listener);
        let backup = backup_once(listener, key(1), 0);
        let mut config = config(Implementation::Std, 1000);
        config.geometry = Geometry::new(mem, block).unwrap();
        let e = Primary::connect(stream, &config, &key(1)).unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::Handshake(HandshakeError::Refused(RefusalCode::Geometry))
            ),
            "{e}"
        );
        let e = backup.join().unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::Handshake(HandshakeError::Geometry { peer_mem_bytes, peer_block_size, .. })
                    if peer_mem_bytes == mem && peer_block_size == block as u32
            ),
            "{e}"
        );
        assert!(e.to_string().contains("same memory and block size"), "{e}");
    }
}

#[test]
fn garbage_instead_of_a_handshake_is_refused() {
    let listener = listener();
    let mut stream = connect(&listener);
    let backup = backup_once(listener, key(1), 0);
    let garbage: Vec<u8> = b"GET / HTTP/1.1\r\nHost: fgbi\r\n\r\n"
        .iter()
        .copied()
        .cycle()
        .take(300)
        .collect();
    stream.write_all(&garbage).unwrap();
    let mut answer = [0u8; HANDSHAKE];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!((&answer[..4], answer[6], answer[7]), (&b"FGBT"[..], 4, 1));
    let e = backup.join().unwrap().unwrap_err();
    assert!(
        matches!(e, TransportError::Handshake(HandshakeError::BadMagic(m)) if &m == b"GET "),
        "{e}"
    );
}

#[test]
fn a_peer_that_sends_part_of_a_handshake_and_stalls_is_dropped() {
    let listener = listener();
    let mut stream = connect(&listener);
    let backup = backup_once(listener, key(1), 0);
    stream.write_all(b"FGBT\x01\x00").unwrap();
    let start = Instant::now();
    let e = backup.join().unwrap().unwrap_err();
    assert!(
        matches!(e, TransportError::Handshake(HandshakeError::Timeout(_))),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}
