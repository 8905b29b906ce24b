//! In-process replication of a protected program: the replica equals the checkpoint,
//! state included, and the pause is measured.

use fgbi::local::LocalReplication;
use fgbi_engine::{EncoderConfig, Geometry, Mode, memory_digest};
use fgbi_hyp::protected::Protected;
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};

#[test]
fn every_checkpoint_of_a_protected_machine_reaches_the_replica() {
    for workers in [1, 2] {
        let mem = 16 << 20;
        let mut machine = SyntheticMachine::new("web", mem, 5, Tracking::Kernel, true).unwrap();
        let mut config = EncoderConfig::new(Geometry::new(mem as u64, 64).unwrap(), Mode::Fgbi);
        config.workers = workers;
        config.cache_bytes = 2 << 20;
        let mut replication = LocalReplication::new(config).unwrap();
        for epoch in 1..=8u64 {
            if epoch > 1 {
                machine.run().unwrap();
            }
            let report = replication.checkpoint(&mut machine, true).unwrap();
            assert_eq!(report.epoch, epoch);
            assert_eq!(report.verified, Some(true));
            assert!(report.pause > std::time::Duration::ZERO);
            assert_eq!(
                memory_digest(replication.replica()),
                memory_digest(machine.memory())
            );
            let mut state = Vec::new();
            machine.stop().unwrap();
            machine.capture_state(&mut state).unwrap();
            machine.resume().unwrap();
            assert_eq!(replication.state(), state.as_slice());
        }
    }
}

#[test]
fn a_program_of_the_wrong_size_is_refused() {
    let mut machine =
        SyntheticMachine::new("idle", 8 << 20, 1, Tracking::Generator, false).unwrap();
    let config = EncoderConfig::new(Geometry::new(16 << 20, 64).unwrap(), Mode::Fgbi);
    let mut replication = LocalReplication::new(config).unwrap();
    let err = replication.checkpoint(&mut machine, false).unwrap_err();
    assert!(err.to_string().contains("expects"), "{err}");
}
