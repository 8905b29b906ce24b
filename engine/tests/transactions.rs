//! Epochs are transactions: lost epochs are carried, refused epochs leave the replica alone.

mod common;

use common::{Rng, mutate};
use fgbi_engine::{
    Applier, ApplyError, EncodeError, Encoder, EncoderConfig, Geometry, Mode, memory_digest,
};

const MEM: u64 = 4 << 20;

struct Pair {
    geometry: Geometry,
    encoder: Encoder,
    applier: Applier,
    primary: Vec<u8>,
    replica: Vec<u8>,
    rng: Rng,
}

impl Pair {
    fn new(mode: Mode, workers: usize) -> Self {
        let geometry = Geometry::new(MEM, 64).unwrap();
        let mut config = EncoderConfig::new(geometry, mode);
        config.workers = workers;
        config.cache_bytes = 1 << 20;
        Self {
            geometry,
            encoder: Encoder::new(config).unwrap(),
            applier: Applier::new(geometry),
            primary: vec![0; MEM as usize],
            replica: vec![0; MEM as usize],
            rng: Rng::new(99),
        }
    }

    /// Writes to the primary and encodes an epoch; returns its number and bytes.
    fn epoch(&mut self, writes: usize) -> (u64, Vec<u8>) {
        let dirty = mutate(&mut self.primary, &self.geometry, &mut self.rng, writes);
        let e = self.encoder.encode(&dirty, &self.primary, b"s").unwrap();
        (e.stats.epoch, e.to_vec())
    }

    fn in_sync(&self) -> bool {
        memory_digest(&self.primary) == memory_digest(&self.replica)
    }
}

#[test]
fn a_lost_epoch_is_carried_by_the_next() {
    for mode in Mode::ALL {
        for workers in [1, 3] {
            let mut p = Pair::new(mode, workers);
            let (e1, b1) = p.epoch(200);
            p.applier.apply(&mut p.replica, &b1).unwrap();
            p.encoder.acknowledge(e1).unwrap();
            assert!(p.in_sync());

            // Epoch 2 never reaches the backup.
            let (e2, _lost) = p.epoch(200);
            p.encoder.lose(e2).unwrap();
            assert!(!p.encoder.carried_pages().is_empty());

            // The retry is numbered 2 again, carries epoch 2's pages, and writes no new ones.
            let retry = p.encoder.encode(&[], &p.primary, b"s").unwrap();
            assert_eq!(retry.stats.epoch, e2);
            let bytes = retry.to_vec();
            p.applier.apply(&mut p.replica, &bytes).unwrap();
            p.encoder.acknowledge(e2).unwrap();
            assert!(p.in_sync(), "{mode} workers {workers}");
        }
    }
}

#[test]
fn losing_an_epoch_loses_every_later_one_in_flight() {
    for mode in [Mode::Fgbi, Mode::Xbzrle] {
        let mut p = Pair::new(mode, 2);
        let (e1, b1) = p.epoch(100);
        let (e2, b2) = p.epoch(100);
        let (e3, _b3) = p.epoch(100);
        let (_e4, _b4) = p.epoch(100);
        // The backup commits 1 and 2; 3 is lost; 4 was encoded against 3.
        p.applier.apply(&mut p.replica, &b1).unwrap();
        p.applier.apply(&mut p.replica, &b2).unwrap();
        p.encoder.acknowledge(e2).unwrap();
        assert_eq!(p.encoder.committed(), e2);
        let _ = e1;
        p.encoder.lose(e3).unwrap();
        let (retry, bytes) = p.epoch(50);
        assert_eq!(retry, e3);
        p.applier.apply(&mut p.replica, &bytes).unwrap();
        p.encoder.acknowledge(retry).unwrap();
        assert!(p.in_sync(), "{mode}");
    }
}

#[test]
fn a_refused_epoch_leaves_the_replica_at_its_committed_epoch() {
    let mut p = Pair::new(Mode::Fgbi, 1);
    let (e1, b1) = p.epoch(300);
    p.applier.apply(&mut p.replica, &b1).unwrap();
    p.encoder.acknowledge(e1).unwrap();
    let committed = memory_digest(&p.replica);

    let (e2, mut b2) = p.epoch(300);
    let mid = b2.len() / 2;
    b2[mid] ^= 0x40;
    assert!(matches!(
        p.applier.apply(&mut p.replica, &b2),
        Err(ApplyError::Checksum(_))
    ));
    assert_eq!(memory_digest(&p.replica), committed);
    assert_eq!(p.applier.committed(), e1);
    // Replayed epochs are refused too.
    assert!(matches!(
        p.applier.apply(&mut p.replica, &b1),
        Err(ApplyError::Sequence { .. })
    ));

    p.encoder.lose(e2).unwrap();
    let (retry, bytes) = p.epoch(10);
    assert_eq!(retry, e2);
    p.applier.apply(&mut p.replica, &bytes).unwrap();
    p.encoder.acknowledge(retry).unwrap();
    assert!(p.in_sync());
}

#[test]
fn acknowledging_unknown_epochs_is_an_error() {
    let mut p = Pair::new(Mode::Fgbi, 1);
    assert!(matches!(
        p.encoder.acknowledge(1),
        Err(EncodeError::NotInFlight { .. })
    ));
    let (e1, _) = p.epoch(10);
    assert!(p.encoder.lose(e1 + 1).is_err());
    assert!(p.encoder.acknowledge(e1).is_ok());
    assert!(p.encoder.acknowledge(e1).is_err());
}

#[test]
fn bad_dirty_pages_and_memory_are_refused_without_moving() {
    let mut p = Pair::new(Mode::Fgbi, 1);
    let pages = p.geometry.pages();
    assert!(matches!(
        p.encoder.encode(&[pages], &p.primary, &[]),
        Err(EncodeError::PageOutOfRange { .. })
    ));
    assert!(matches!(
        p.encoder.encode(&[0], &p.primary[..4096], &[]),
        Err(EncodeError::MemoryLength { .. })
    ));
    assert_eq!(p.encoder.next_epoch(), 1);
}

/// A source holding only some pages, like a copy of one checkpoint's dirty pages.
struct Partial<'a> {
    memory: &'a [u8],
    held: Vec<u64>,
}

impl fgbi_engine::PageSource for Partial<'_> {
    fn len_bytes(&self) -> u64 {
        self.memory.len() as u64
    }

    fn page(&self, page: u64) -> &[u8] {
        self.memory.page(page)
    }

    fn holds(&self, page: u64) -> bool {
        self.held.contains(&page)
    }
}

#[test]
fn carried_pages_missing_from_the_checkpoint_are_refused() {
    let mut p = Pair::new(Mode::Fgbi, 1);
    let (e1, _) = p.epoch(50);
    p.encoder.lose(e1).unwrap();
    let carried = p.encoder.carried_pages().to_vec();
    let partial = Partial {
        memory: &p.primary,
        held: Vec::new(),
    };
    assert!(matches!(
        p.encoder.encode(&[], &partial, &[]),
        Err(EncodeError::PageNotCaptured(_))
    ));
    assert_eq!(
        p.encoder.carried_pages(),
        carried.as_slice(),
        "nothing moved"
    );
    let full = Partial {
        memory: &p.primary,
        held: carried,
    };
    let bytes = p.encoder.encode(&[], &full, &[]).unwrap().to_vec();
    p.applier.apply(&mut p.replica, &bytes).unwrap();
    assert!(p.in_sync());
}

#[test]
fn resend_repairs_a_diverged_replica_page_even_when_the_repair_is_lost_once() {
    for mode in Mode::ALL {
        for workers in [1, 3] {
            let mut p = Pair::new(mode, workers);
            let (e1, b1) = p.epoch(300);
            p.applier.apply(&mut p.replica, &b1).unwrap();
            p.encoder.acknowledge(e1).unwrap();
            // The replica goes wrong behind the encoder's back, in blocks the
            // primary does not change.
            for page in [5usize, 6, 900] {
                p.replica[page * 4096 + 70] ^= 0x3c;
            }
            assert!(!p.in_sync());
            p.encoder.resend(&[5, 6, 900]).unwrap();
            // The repair epoch is lost; the retry must still send the pages whole.
            let (e2, _lost) = p.epoch(50);
            p.encoder.lose(e2).unwrap();
            let (e2, b2) = p.epoch(50);
            p.applier.apply(&mut p.replica, &b2).unwrap();
            p.encoder.acknowledge(e2).unwrap();
            assert!(p.in_sync(), "{mode} workers {workers}");
            // Acknowledged: later epochs are deltas again.
            let (e3, b3) = p.epoch(50);
            p.applier.apply(&mut p.replica, &b3).unwrap();
            p.encoder.acknowledge(e3).unwrap();
            assert!(p.in_sync(), "{mode} workers {workers}");
        }
    }
}

#[test]
fn carrying_alone_does_not_repair_a_diverged_page_in_fgbi_mode() {
    // The negative control of the test above: the digests say the page is unchanged.
    let mut p = Pair::new(Mode::Fgbi, 2);
    let (e1, b1) = p.epoch(300);
    p.applier.apply(&mut p.replica, &b1).unwrap();
    p.encoder.acknowledge(e1).unwrap();
    p.replica[5 * 4096 + 70] ^= 0x3c;
    p.encoder.carry(&[5]).unwrap();
    let (e2, b2) = p.epoch(0);
    p.applier.apply(&mut p.replica, &b2).unwrap();
    p.encoder.acknowledge(e2).unwrap();
    assert!(!p.in_sync());
}

#[test]
fn a_precopy_epoch_is_applied_but_leaves_no_checkpoint_until_a_checkpoint_epoch() {
    for mode in Mode::ALL {
        let mut p = Pair::new(mode, 2);
        assert!(!p.applier.holds_checkpoint(), "epoch 0 is no checkpoint");
        mutate(&mut p.primary, &p.geometry, &mut p.rng, 300);
        let all: Vec<u64> = (0..p.geometry.pages()).collect();
        let e = p.encoder.encode_precopy(&all, &p.primary).unwrap();
        let (e1, b1) = (e.stats.epoch, e.to_vec());
        let applied = p.applier.apply(&mut p.replica, &b1).unwrap();
        p.encoder.acknowledge(e1).unwrap();
        assert_eq!(applied.epoch, 1);
        assert!(p.in_sync(), "{mode}");
        assert!(!p.applier.holds_checkpoint(), "{mode}: a pre-copy round");
        assert!(p.applier.state().is_empty());
        let (e2, b2) = p.epoch(100);
        p.applier.apply(&mut p.replica, &b2).unwrap();
        p.encoder.acknowledge(e2).unwrap();
        assert!(p.in_sync(), "{mode}");
        assert!(p.applier.holds_checkpoint(), "{mode}: a checkpoint");
        assert_eq!(p.applier.state(), b"s");
    }
}
