//! No input makes the applier panic or partly apply an epoch.

mod common;

use common::{Rng, frames, mutate, reseal};
use fgbi_engine::wire::FrameKind;
use fgbi_engine::{Applier, Encoder, EncoderConfig, Geometry, Mode, memory_digest};
use proptest::prelude::*;

const MEM: u64 = 1 << 20;

/// A committed replica at epoch 1 and a valid epoch 2 for it, rich in record kinds.
fn fixture(block: usize) -> (Geometry, Applier, Vec<u8>, Vec<u8>) {
    let geometry = Geometry::new(MEM, block).unwrap();
    let mut config = EncoderConfig::new(geometry, Mode::Fgbi);
    config.chunk_bytes = 16 << 10;
    config.cache_bytes = 256 << 10;
    let mut encoder = Encoder::new(config).unwrap();
    let mut applier = Applier::new(geometry);
    let mut primary = vec![0u8; MEM as usize];
    let mut replica = vec![0u8; MEM as usize];
    let mut rng = Rng::new(block as u64);
    let dirty = mutate(&mut primary, &geometry, &mut rng, 200);
    let b1 = encoder.encode(&dirty, &primary, b"one").unwrap().to_vec();
    applier.apply(&mut replica, &b1).unwrap();
    encoder.acknowledge(1).unwrap();
    let dirty = mutate(&mut primary, &geometry, &mut rng, 100);
    let b2 = encoder.encode(&dirty, &primary, b"two").unwrap().to_vec();
    (geometry, applier, replica, b2)
}

fn refused_cleanly(applier: &mut Applier, replica: &mut [u8], bytes: &[u8]) {
    let before = memory_digest(replica);
    if applier.apply(replica, bytes).is_err() {
        assert_eq!(
            memory_digest(replica),
            before,
            "a refused epoch changed the replica"
        );
        assert_eq!(applier.committed(), 1);
        assert_eq!(applier.state(), b"one");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn truncations_are_refused(cut in 0usize..1_000_000) {
        let (_, mut applier, mut replica, epoch) = fixture(64);
        let cut = cut % epoch.len();
        let before = memory_digest(&replica);
        prop_assert!(applier.apply(&mut replica, &epoch[..cut]).is_err());
        prop_assert_eq!(memory_digest(&replica), before);
    }

    #[test]
    fn bit_flips_are_refused(at in 0usize..1_000_000, bit in 0u8..8) {
        let (_, mut applier, mut replica, mut epoch) = fixture(64);
        let at = at % epoch.len();
        epoch[at] ^= 1 << bit;
        let before = memory_digest(&replica);
        prop_assert!(applier.apply(&mut replica, &epoch).is_err());
        prop_assert_eq!(memory_digest(&replica), before);
    }

    #[test]
    fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let (_, mut applier, mut replica, _) = fixture(64);
        let before = memory_digest(&replica);
        prop_assert!(applier.apply(&mut replica, &bytes).is_err());
        prop_assert_eq!(memory_digest(&replica), before);
    }

    /// Edits inside page records, re-sealed with valid checksums so that only the
    /// record validator stands between them and the replica.
    #[test]
    fn resealed_record_edits_never_partly_apply(
        block in prop::sample::select(vec![32usize, 64, 256, 4096]),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let (_, mut applier, mut replica, epoch) = fixture(block);
        let mut fs = frames(&epoch);
        let pages: Vec<usize> = fs.iter().enumerate()
            .filter(|(_, f)| f.0 == FrameKind::Pages).map(|(i, _)| i).collect();
        prop_assume!(!pages.is_empty());
        for (i, (at, value)) in edits.iter().enumerate() {
            let body = &mut fs[pages[i % pages.len()]].2;
            if !body.is_empty() {
                let at = at % body.len();
                body[at] = *value;
            }
        }
        if let Some(cut) = cut {
            let body = &mut fs[pages[0]].2;
            let keep = cut % (body.len() + 1);
            body.truncate(keep);
        }
        let bytes = reseal(&fs, block);
        refused_cleanly(&mut applier, &mut replica, &bytes);
    }

    /// Absurd lengths and counts in frame headers.
    #[test]
    fn absurd_frame_lengths_are_refused(len in any::<u32>(), frame in 0usize..8) {
        let (_, mut applier, mut replica, mut epoch) = fixture(64);
        let mut offsets = Vec::new();
        let mut r = fgbi_engine::wire::FrameReader::new(&epoch);
        while let Ok(Some(f)) = r.next_frame() { offsets.push(f.offset); }
        let at = offsets[frame % offsets.len()];
        epoch[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        let before = memory_digest(&replica);
        let result = applier.apply(&mut replica, &epoch);
        prop_assert!(result.is_err());
        prop_assert_eq!(memory_digest(&replica), before);
    }
}

#[test]
fn resealing_an_untouched_epoch_keeps_it_valid() {
    let (_, mut applier, mut replica, epoch) = fixture(64);
    let bytes = reseal(&frames(&epoch), 64);
    assert_eq!(bytes, epoch);
    applier.apply(&mut replica, &bytes).unwrap();
}

#[test]
fn frames_of_another_epoch_and_geometry_are_refused() {
    let (geometry, mut applier, mut replica, epoch) = fixture(64);
    let mut fs = frames(&epoch);
    fs[1].1 = 7;
    assert!(applier.apply(&mut replica, &reseal(&fs, 64)).is_err());
    let other = Geometry::new(geometry.mem_bytes() * 2, 64).unwrap();
    let mut stranger = Applier::new(other);
    let mut big = vec![0u8; other.mem_bytes() as usize];
    assert!(matches!(
        stranger.apply(&mut big, &epoch),
        Err(fgbi_engine::ApplyError::Geometry { .. } | fgbi_engine::ApplyError::Sequence { .. })
    ));
}

#[test]
fn unknown_header_flags_and_reserved_bytes_are_refused() {
    let (_, mut applier, mut replica, epoch) = fixture(64);
    // Header body: mode, flags, two reserved bytes, block size, page size, four
    // reserved bytes.
    for at in [1usize, 2, 3, 12, 15] {
        let mut fs = frames(&epoch);
        fs[0].2[at] |= if at == 1 { 2 } else { 1 };
        let bytes = reseal(&fs, 64);
        assert!(applier.apply(&mut replica, &bytes).is_err(), "byte {at}");
        refused_cleanly(&mut applier, &mut replica, &bytes);
    }
    applier.apply(&mut replica, &epoch).unwrap();
    assert!(applier.holds_checkpoint());
}
