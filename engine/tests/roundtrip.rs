//! Every mode, block size and worker count reproduces the primary byte for byte.

mod common;

use common::{Rng, mutate};
use fgbi_engine::{Applier, Encoder, EncoderConfig, Geometry, Mode, memory_digest};

const MEM: u64 = 8 << 20;

fn run(mode: Mode, block: usize, workers: usize, epochs: usize, seed: u64) -> Vec<Vec<u8>> {
    let geometry = Geometry::new(MEM, block).unwrap();
    let mut config = EncoderConfig::new(geometry, mode);
    config.workers = workers;
    config.cache_bytes = 1 << 20;
    config.chunk_bytes = 64 << 10;
    let mut encoder = Encoder::new(config).unwrap();
    let mut applier = Applier::new(geometry);
    let mut primary = vec![0u8; MEM as usize];
    let mut replica = vec![0u8; MEM as usize];
    let mut rng = Rng::new(seed);
    let mut streams = Vec::new();
    for e in 0..epochs {
        let dirty = mutate(&mut primary, &geometry, &mut rng, 300);
        let state = format!("state of epoch {e}").into_bytes();
        let epoch = encoder.encode(&dirty, &primary, &state).unwrap();
        let bytes = epoch.to_vec();
        assert_eq!(bytes.len() as u64, epoch.stats.bytes);
        assert_eq!(bytes.len(), epoch.len());
        let number = epoch.stats.epoch;
        let applied = applier.apply(&mut replica, &bytes).unwrap();
        assert_eq!(applied.epoch, number);
        encoder.acknowledge(number).unwrap();
        assert_eq!(
            memory_digest(&replica),
            memory_digest(&primary),
            "{mode} block {block} workers {workers} epoch {e}"
        );
        assert_eq!(applier.state(), state.as_slice());
        streams.push(bytes);
    }
    streams
}

#[test]
fn every_mode_and_block_size_reproduces_the_primary() {
    for mode in Mode::ALL {
        for block in [32, 64, 128, 256, 4096] {
            run(mode, block, 1, 6, 7);
        }
    }
}

#[test]
fn worker_count_changes_nothing_the_backup_sees() {
    for workers in [1, 2, 3, 4] {
        run(Mode::Fgbi, 64, workers, 8, 11);
        run(Mode::Xbzrle, 64, workers, 4, 11);
    }
}

#[test]
fn encoding_is_deterministic() {
    assert_eq!(run(Mode::Fgbi, 64, 2, 5, 3), run(Mode::Fgbi, 64, 2, 5, 3));
}

#[test]
fn fgbi_never_sends_more_than_remus_or_xbzrle() {
    let size = |mode| -> usize { run(mode, 64, 1, 8, 5).iter().map(Vec::len).sum() };
    let (remus, xbzrle, fgbi) = (size(Mode::Remus), size(Mode::Xbzrle), size(Mode::Fgbi));
    assert!(fgbi < remus, "fgbi {fgbi} remus {remus}");
    assert!(fgbi <= xbzrle, "fgbi {fgbi} xbzrle {xbzrle}");
}

#[test]
fn sharing_sends_copied_blocks_as_references() {
    let geometry = Geometry::new(1 << 20, 64).unwrap();
    let mut encoder = Encoder::new(EncoderConfig::new(geometry, Mode::Fgbi)).unwrap();
    let mut primary = vec![0u8; 1 << 20];
    let mut rng = Rng::new(1);
    for b in primary[..4096].iter_mut() {
        *b = rng.next_u64() as u8;
    }
    // Pages 1..=9 copy page 0; page 10 copies half of it.
    for p in 1..10 {
        primary.copy_within(0..4096, p * 4096);
    }
    primary.copy_within(0..2048, 10 * 4096);
    let dirty: Vec<u64> = (0..=10).collect();
    let epoch = encoder.encode(&dirty, &primary, &[]).unwrap();
    assert_eq!(epoch.stats.counts.shared_blocks, 9 * 64 + 32);
    let bytes = epoch.to_vec();
    assert!(
        bytes.len() < 2 * 4096 + 9 * 64 * 6 + 1000,
        "{} bytes",
        bytes.len()
    );
    let mut replica = vec![0u8; 1 << 20];
    Applier::new(geometry).apply(&mut replica, &bytes).unwrap();
    assert_eq!(replica, primary);
}
