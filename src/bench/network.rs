//! The networked pass: the workload protected by the primary loop and replicated
//! over a real transport on loopback to a backup process, with injected primary
//! failures and the workload's throughput with and without protection.
//!
//! The pass alternates unprotected and protected rounds of the same program:
//! unprotected, protected, unprotected, ... An unprotected round runs it with no
//! dirty tracking, as an unprotected program runs. Each protected round is one session: a
//! fresh backup process, the primary loop syncing all memory to it (not measured),
//! then `net_epochs` epochs in which the program runs for one epoch length and is
//! checkpointed; then the primary stops abruptly (its link closes, as a crashed
//! primary's does), the backup fails over and reports, its replica's digest is
//! compared with the primary's last checkpoint, and the next round runs the program
//! restored from that checkpoint, as the backup restored it.

use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime};

use fgbi_engine::memory_digest;
use fgbi_hyp::memory::Region;
use fgbi_hyp::protected::{HypError, Protected};
use fgbi_hyp::synthetic::{SyntheticMachine, Tracking};

use super::config::BenchConfig;
use super::cpu;
use super::error::BenchError;
use super::link::{Link, LinkEvent};
use super::source::Source;

/// One injected failure, from the primary's stop until the program ran on the
/// backup.
#[derive(Clone, Copy, Debug)]
pub struct FailoverSample {
    /// From the primary's stop to the backup's verdict.
    pub detect: Duration,
    /// Finishing the last epoch (abandoning the connection).
    pub apply: Duration,
    /// Rebuilding the program from the replica.
    pub restore: Duration,
    /// The restored program's first step.
    pub first_run: Duration,
}

/// What the networked pass measured.
#[derive(Default)]
pub struct NetworkPass {
    /// The transport implementation that ran.
    pub transport: &'static str,
    /// The pause of every measured checkpoint, microseconds.
    pub pause_us: Vec<f64>,
    /// Measured checkpoints (the sessions' syncs excluded).
    pub epochs: u64,
    /// Dirty pages harvested in the measured checkpoints.
    pub dirty_pages: u64,
    /// Bytes sent for the measured checkpoints.
    pub wire_bytes: u64,
    /// The most dirty pages one measured checkpoint harvested.
    pub max_epoch_pages: u64,
    /// Every injected failure.
    pub failovers: Vec<FailoverSample>,
    /// Whether every failed-over replica equalled the primary's last checkpoint.
    pub verified: bool,
    /// Workload steps per second in each protected round.
    pub protected_rates: Vec<f64>,
    /// Workload steps per second in each unprotected round.
    pub unprotected_rates: Vec<f64>,
    /// CPU time of everything but the workload (the primary loop, the backup
    /// process, transport, encoder workers) during the measured epochs, seconds.
    pub pipeline_cpu_seconds: f64,
    /// Bytes of the backup's receive ring.
    pub receive_ring_bytes: usize,
    /// Wall time of the measured epochs of every protected round, seconds.
    pub protected_seconds: f64,
}

/// Holds the workload to one step per `interval` (`None`: as fast as it runs).
struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    fn new(interval: Option<Duration>) -> Self {
        Self {
            interval,
            next: Instant::now(),
        }
    }

    /// Waits for the next step's turn; if it comes after `deadline`, waits until
    /// the deadline instead and returns false. A program held up (stopped for a
    /// checkpoint) does not catch up afterwards.
    fn ready_by(&mut self, deadline: Instant) -> bool {
        let Some(interval) = self.interval else {
            return true;
        };
        let now = Instant::now();
        if self.next > deadline {
            std::thread::sleep(deadline.saturating_duration_since(now));
            return false;
        }
        std::thread::sleep(self.next.saturating_duration_since(now));
        self.next = self.next.max(now) + interval;
        true
    }
}

/// The program as the primary loop drives it, counting what each harvest found.
struct Observed<'a> {
    machine: &'a mut SyntheticMachine,
    harvests: Vec<u64>,
}

impl Protected for Observed<'_> {
    fn mem_bytes(&self) -> u64 {
        self.machine.mem_bytes()
    }

    fn stop(&mut self) -> Result<(), HypError> {
        self.machine.stop()
    }

    fn harvest(&mut self, dirty: &mut Vec<u64>) -> Result<(), HypError> {
        let before = dirty.len();
        self.machine.harvest(dirty)?;
        self.harvests.push((dirty.len() - before) as u64);
        Ok(())
    }

    fn capture_state(&mut self, out: &mut Vec<u8>) -> Result<(), HypError> {
        self.machine.capture_state(out)
    }

    fn memory(&self) -> &[u8] {
        self.machine.memory()
    }

    fn resume(&mut self) -> Result<(), HypError> {
        self.machine.resume()
    }
}

/// Runs `config.failovers` protected rounds of `machine` (its dirty pages from
/// `tracking`), each between two unprotected rounds (no kernel tracking), over
/// `link`; with `pace`, the program runs at most one step per `pace` in every round.
/// Returns what it measured and the program as the last round left it.
pub fn run(
    config: &BenchConfig,
    source: &Source,
    link: &Link,
    mut machine: SyntheticMachine,
    tracking: Tracking,
    pace: Option<Duration>,
) -> Result<(NetworkPass, SyntheticMachine), BenchError> {
    let round = config.epoch * u32::try_from(config.net_epochs).unwrap_or(u32::MAX);
    let mut pass = NetworkPass {
        transport: link.implementation(),
        verified: true,
        receive_ring_bytes: link.receive_ring_bytes()?,
        ..NetworkPass::default()
    };
    // Unprotected rounds run the program with no kernel tracking at all (its
    // memory as plain as an unprotected program's); protected rounds run it
    // tracked. Each round continues the program where the last one left it.
    let mut plain = restored(&mut machine, source, Tracking::Generator)?;
    drop(machine);
    pass.unprotected_rates
        .push(unprotected(&mut plain, round, pace)?);
    for _ in 0..config.failovers.max(1) {
        let mut machine = restored(&mut plain, source, tracking)?;
        drop(plain);
        session(config, link, &mut machine, &mut pass, pace)?;
        plain = restored(&mut machine, source, Tracking::Generator)?;
        drop(machine);
        pass.unprotected_rates
            .push(unprotected(&mut plain, round, pace)?);
    }
    Ok((pass, plain))
}

/// Runs `machine` unprotected for `duration`, at most one step per `pace`; its
/// steps per second.
fn unprotected(
    machine: &mut SyntheticMachine,
    duration: Duration,
    pace: Option<Duration>,
) -> Result<f64, BenchError> {
    let (started, steps) = (Instant::now(), machine.epochs());
    let mut pacer = Pacer::new(pace);
    while started.elapsed() < duration && pacer.ready_by(started + duration) {
        machine.run()?;
    }
    Ok((machine.epochs() - steps) as f64 / started.elapsed().as_secs_f64())
}

/// The measured window of a session: from the sync's commit to the last commit.
#[derive(Default)]
struct Window {
    started: Option<(Instant, u64)>,
    ended: Option<(Instant, u64, SystemTime)>,
}

/// The program `machine` restored from its memory and state, its dirty pages from
/// `tracking`, as a backup restores it from its replica: the first harvest of a
/// restored program reports every page, so the next session's fresh backup
/// receives all memory.
fn restored(
    machine: &mut SyntheticMachine,
    source: &Source,
    tracking: Tracking,
) -> Result<SyntheticMachine, BenchError> {
    let mut state = Vec::new();
    machine.capture_state(&mut state)?;
    let mut memory = Region::new(machine.memory().len()).map_err(HypError::from)?;
    memory.copy_from_slice(machine.memory());
    Ok(SyntheticMachine::restore_with(
        memory,
        &state,
        tracking,
        source.workload_factory(),
    )?)
}

/// One protected round of `machine` ending in an injected failure.
fn session(
    config: &BenchConfig,
    link: &Link,
    machine: &mut SyntheticMachine,
    pass: &mut NetworkPass,
    pace: Option<Duration>,
) -> Result<(), BenchError> {
    // Killed and reaped on every early return.
    let backup = link.spawn_backup()?;
    let (address, backup_pid) = (backup.address(), backup.id());

    // The sync is epoch 1; epochs 2..=last are measured.
    let last = config.net_epochs as u64 + 1;
    // Steps (and their CPU time) count from the sync's commit, where the measured
    // window starts: the program may already run the next epoch while the sync is
    // in flight, and those steps fall outside the window's time.
    let measuring = Cell::new(false);
    let steps = Cell::new(0u64);
    let step_cpu_ns = Cell::new(0u64);
    let window = Cell::new(Window::default());
    let mut observed = Observed {
        machine,
        harvests: Vec::new(),
    };
    let mut synced = false;
    let epoch_len = config.epoch;
    let mut pacer = Pacer::new(pace);
    let (mut pauses, mut bytes) = (Vec::new(), 0u64);
    let primary = link.primary(
        &mut observed,
        |program| {
            if !std::mem::replace(&mut synced, true) {
                return Ok(());
            }
            // The program runs for one epoch length: at least one step unpaced,
            // the steps whose turn comes paced.
            let (started, cpu) = (Instant::now(), cpu::thread_ns().unwrap_or(0));
            let mut ran = 0;
            while pacer.ready_by(started + epoch_len) {
                program.machine.run()?;
                ran += 1;
                if started.elapsed() >= epoch_len {
                    break;
                }
            }
            if measuring.get() {
                let spent = cpu::thread_ns().unwrap_or(0).saturating_sub(cpu);
                steps.set(steps.get() + ran);
                step_cpu_ns.set(step_cpu_ns.get() + spent);
            }
            Ok(())
        },
        address,
        last,
        |event| match event {
            LinkEvent::Sent {
                epoch,
                pause,
                bytes: sent,
            } if epoch > 1 => {
                pauses.push(pause.as_secs_f64() * 1e6);
                bytes += sent;
            }
            LinkEvent::Sent { .. } => {}
            LinkEvent::Committed(n) => {
                let mut w = window.take();
                // The bench's threads and the backup process's.
                let cpu =
                    cpu::process_ns().unwrap_or(0) + cpu::process_ns_of(backup_pid).unwrap_or(0);
                if n == 1 {
                    w.started = Some((Instant::now(), cpu));
                    measuring.set(true);
                } else if n == last {
                    w.ended = Some((Instant::now(), cpu, SystemTime::now()));
                }
                window.set(w);
            }
        },
    );
    let harvests = std::mem::take(&mut observed.harvests);
    if let Err(e) = primary {
        // A backup that failed first has the better reason.
        return Err(backup.failure().unwrap_or(e));
    }
    // The loop returned right after the last commit: memory is that checkpoint.
    let digest = memory_digest(machine.memory());
    let takeover = backup.takeover()?;
    let window = window.take();
    let (Some((t0, cpu0)), Some((t1, cpu1, failed_at))) = (window.started, window.ended) else {
        return Err(BenchError::Setting(
            "the session ended before its measured epochs".into(),
        ));
    };
    pass.verified &=
        takeover.epoch == last && takeover.committed == last && takeover.digest == Some(digest);
    pass.failovers.push(FailoverSample {
        detect: takeover
            .detected_at
            .duration_since(failed_at)
            .unwrap_or_default(),
        apply: takeover.finish,
        restore: takeover.restore,
        first_run: takeover.first_run,
    });
    let wall = (t1 - t0).as_secs_f64();
    pass.protected_rates.push(steps.get() as f64 / wall);
    pass.protected_seconds += wall;
    pass.pipeline_cpu_seconds +=
        cpu1.saturating_sub(cpu0).saturating_sub(step_cpu_ns.get()) as f64 / 1e9;
    pass.epochs += pauses.len() as u64;
    pass.pause_us.extend(pauses);
    pass.wire_bytes += bytes;
    // The first harvest is the sync's.
    for &pages in harvests.iter().skip(1) {
        pass.dirty_pages += pages;
        pass.max_epoch_pages = pass.max_epoch_pages.max(pages);
    }
    Ok(())
}
