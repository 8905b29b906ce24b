//! Safepoints: how an application's threads are brought to a consistent stop.
//!
//! Each thread that writes protected memory registers a [`Safepoint`] and calls
//! [`Safepoint::pass`] at points where its state is consistent (between requests,
//! after an iteration). When the replication loop asks for a stop, every registered
//! thread parks at its next `pass`; [`Safepoints::stop`] returns once all of them
//! have, or fails after a timeout naming the threads that never arrived. A thread
//! that blocks outside protected memory (waiting for a socket, say) wraps the wait
//! in [`Safepoint::outside`] and counts as stopped meanwhile; if a stop is in
//! progress when the wait ends, it parks before touching memory again.
//!
//! The fast path of `pass` is one atomic load: no lock unless a stop is requested.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

/// A stop could not be completed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SafepointError {
    /// Some threads did not reach a safepoint in time; the stop was abandoned and
    /// every other thread released.
    #[error(
        "threads {missing:?} did not reach a safepoint within {timeout:?}: call Safepoint::pass more often, or wrap blocking waits in Safepoint::outside"
    )]
    Timeout {
        /// Names of the threads that never arrived.
        missing: Vec<String>,
        /// How long the stop waited.
        timeout: Duration,
    },
    /// `resume` was called without a completed stop.
    #[error("resume called while not stopped")]
    NotStopped,
}

#[derive(Default)]
struct Slot {
    name: String,
    registered: bool,
    /// Parked at a safepoint, or outside protected memory.
    quiet: bool,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    stopped: bool,
}

struct Shared {
    requested: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left the state consistent:
        // every critical section below is a few field updates.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks the caller while a stop is requested.
    fn wait_while_requested<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while self.requested.load(Ordering::Acquire) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state
    }
}

/// The set of threads that write protected memory, and the stop/resume protocol.
#[derive(Clone)]
pub struct Safepoints {
    shared: Arc<Shared>,
}

impl Default for Safepoints {
    fn default() -> Self {
        Self::new()
    }
}

impl Safepoints {
    /// No threads registered yet.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                requested: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            }),
        }
    }

    /// Registers a thread under `name`. If a stop is in progress, waits (counted as
    /// stopped) until it ends, so the new thread never writes during a stop.
    pub fn register(&self, name: &str) -> Safepoint {
        let mut state = self.shared.lock();
        let slot = Slot {
            name: name.to_string(),
            registered: true,
            quiet: true,
        };
        let id = match state.slots.iter().position(|s| !s.registered) {
            Some(free) => {
                state.slots[free] = slot;
                free
            }
            None => {
                state.slots.push(slot);
                state.slots.len() - 1
            }
        };
        self.shared.changed.notify_all();
        let mut state = self.shared.wait_while_requested(state);
        state.slots[id].quiet = false;
        drop(state);
        Safepoint {
            shared: Arc::clone(&self.shared),
            id,
        }
    }

    /// Number of registered threads.
    pub fn threads(&self) -> usize {
        self.shared
            .lock()
            .slots
            .iter()
            .filter(|s| s.registered)
            .count()
    }

    /// Asks every registered thread to park and waits until all have, for at most
    /// `timeout`. On success the threads stay parked until [`Safepoints::resume`].
    pub fn stop(&self, timeout: Duration) -> Result<(), SafepointError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        self.shared.requested.store(true, Ordering::Release);
        loop {
            if state.slots.iter().all(|s| !s.registered || s.quiet) {
                state.stopped = true;
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = state
                    .slots
                    .iter()
                    .filter(|s| s.registered && !s.quiet)
                    .map(|s| s.name.clone())
                    .collect();
                self.shared.requested.store(false, Ordering::Release);
                self.shared.changed.notify_all();
                return Err(SafepointError::Timeout { missing, timeout });
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Releases the threads parked by a successful [`Safepoints::stop`].
    pub fn resume(&self) -> Result<(), SafepointError> {
        let mut state = self.shared.lock();
        if !state.stopped {
            return Err(SafepointError::NotStopped);
        }
        state.stopped = false;
        self.shared.requested.store(false, Ordering::Release);
        self.shared.changed.notify_all();
        Ok(())
    }
}

/// One thread's safepoint. Dropping it unregisters the thread.
pub struct Safepoint {
    shared: Arc<Shared>,
    id: usize,
}

impl Safepoint {
    /// A consistent point: parks here while a stop is in progress.
    #[inline]
    pub fn pass(&self) {
        if self.shared.requested.load(Ordering::Acquire) {
            self.park();
        }
    }

    #[cold]
    fn park(&self) {
        let mut state = self.shared.lock();
        state.slots[self.id].quiet = true;
        self.shared.changed.notify_all();
        let mut state = self.shared.wait_while_requested(state);
        state.slots[self.id].quiet = false;
    }

    /// Runs `f`, which must not touch protected memory, counting this thread as
    /// stopped meanwhile; parks afterwards if a stop is still in progress.
    pub fn outside<R>(&self, f: impl FnOnce() -> R) -> R {
        self.enter_outside();
        let result = f();
        self.leave_outside();
        result
    }

    /// Counts this thread as stopped until [`Safepoint::leave_outside`]; in between
    /// it must not touch protected memory. [`Safepoint::outside`] is the same pair
    /// around a closure; this split form serves callers that cannot pass one (the C
    /// API).
    pub fn enter_outside(&self) {
        let mut state = self.shared.lock();
        state.slots[self.id].quiet = true;
        self.shared.changed.notify_all();
    }

    /// Ends [`Safepoint::enter_outside`]: parks first if a stop is in progress.
    pub fn leave_outside(&self) {
        let state = self.shared.lock();
        let mut state = self.shared.wait_while_requested(state);
        state.slots[self.id].quiet = false;
    }
}

impl Drop for Safepoint {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.slots[self.id].registered = false;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn stop_parks_every_thread_and_resume_releases_them() {
        let safepoints = Safepoints::new();
        let counter = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let workers: Vec<_> = (0..3)
            .map(|i| {
                let handle = safepoints.register(&format!("worker-{i}"));
                let (counter, running) = (Arc::clone(&counter), Arc::clone(&running));
                std::thread::spawn(move || {
                    while running.load(Ordering::Relaxed) {
                        counter.fetch_add(1, Ordering::Relaxed);
                        handle.pass();
                    }
                })
            })
            .collect();
        for _ in 0..20 {
            safepoints.stop(Duration::from_secs(5)).unwrap();
            let frozen = counter.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(
                counter.load(Ordering::Relaxed),
                frozen,
                "a thread ran while stopped"
            );
            safepoints.resume().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        running.store(false, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(safepoints.threads(), 0, "dropped handles unregister");
    }

    #[test]
    fn a_thread_that_never_arrives_is_named_and_the_others_are_released() {
        let safepoints = Safepoints::new();
        let _stuck = safepoints.register("stuck");
        let err = safepoints.stop(Duration::from_millis(50)).unwrap_err();
        assert_eq!(
            err,
            SafepointError::Timeout {
                missing: vec!["stuck".into()],
                timeout: Duration::from_millis(50)
            }
        );
        assert!(err.to_string().contains("Safepoint::outside"));
        assert_eq!(safepoints.resume(), Err(SafepointError::NotStopped));
    }

    #[test]
    fn registering_during_a_stop_waits_for_the_resume() {
        let safepoints = Safepoints::new();
        safepoints.stop(Duration::from_secs(1)).unwrap();
        let sp = safepoints.clone();
        let late = std::thread::spawn(move || drop(sp.register("late")));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!late.is_finished());
        safepoints.resume().unwrap();
        late.join().unwrap();
        safepoints.stop(Duration::from_secs(1)).unwrap();
        safepoints.resume().unwrap();
    }

    #[test]
    fn threads_outside_protected_memory_count_as_stopped() {
        let safepoints = Safepoints::new();
        let handle = safepoints.register("waiter");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let waiter = std::thread::spawn(move || {
            handle.outside(|| rx.recv().unwrap());
            handle.pass();
        });
        std::thread::sleep(Duration::from_millis(10));
        safepoints.stop(Duration::from_secs(5)).unwrap();
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        assert!(
            !waiter.is_finished(),
            "the waiter parks after its wait while stopped"
        );
        safepoints.resume().unwrap();
        waiter.join().unwrap();
    }
}
