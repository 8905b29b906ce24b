//! Long-lived worker threads, each pinned to its core once.
//!
//! Worker 0 runs on the caller's thread; workers 1..N each live on a thread of their
//! own for the life of the encoder, with their state (digests, cache, undo logs).
//! Each epoch the encoder hands every thread its pages and a pointer to the
//! checkpoint, encodes worker 0's pages itself meanwhile, and waits for every reply
//! before it returns. The hot path takes no lock: each thread touches only its own
//! worker, and the channels carry one job and one reply per thread per epoch.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use crate::config::EncoderConfig;
use crate::error::EncodeError;
use crate::source::PageSource;
use crate::worker::{Worker, WorkerOutput};

/// The checkpoint, shared with the worker threads for the duration of one
/// [`Crew::encode`] call.
#[derive(Clone, Copy)]
struct MemoryPtr(*const (dyn PageSource + 'static));

// SAFETY: the pointee is `Sync` (PageSource: Sync), so shared references to it may be
// used from any thread; `Crew::encode` keeps it alive until every thread has replied.
unsafe impl Send for MemoryPtr {}

enum Job {
    Encode {
        epoch: u64,
        pages: Vec<u64>,
        memory: MemoryPtr,
        output: Box<WorkerOutput>,
    },
    Acknowledge(u64),
    Forget(Arc<Vec<u64>>),
    RollBack {
        epoch: u64,
        lost: Arc<Vec<u64>>,
    },
}

struct Reply {
    pages: Vec<u64>,
    output: Box<WorkerOutput>,
}

struct Thread {
    jobs: Sender<Job>,
    replies: Receiver<Reply>,
    handle: Option<JoinHandle<()>>,
}

/// A `PageSource` wrapper that is `Sized`, so any source can become a trait object.
struct Source<'a, S: ?Sized>(&'a S);

impl<S: PageSource + ?Sized> PageSource for Source<'_, S> {
    fn len_bytes(&self) -> u64 {
        self.0.len_bytes()
    }

    #[inline]
    fn page(&self, page: u64) -> &[u8] {
        self.0.page(page)
    }
}

/// The workers: worker 0 on the caller's thread, the others on pinned threads.
pub struct Crew {
    local: Box<Worker>,
    threads: Vec<ThreadHandle>,
}

/// One worker thread, and the output buffers of its last epoch.
pub struct ThreadHandle {
    thread: Thread,
    overhead: (usize, usize),
    /// The last epoch's output (returned by the thread, lent back for the next).
    pub output: Box<WorkerOutput>,
}

impl Crew {
    /// Starts the workers `config` asks for.
    pub fn new(config: &EncoderConfig) -> Result<Self, EncodeError> {
        let cores = if config.pin_workers {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut threads = Vec::with_capacity(config.workers - 1);
        for index in 1..config.workers {
            let mut worker = Worker::new(config, index);
            let overhead = worker.overhead_bytes();
            let (jobs, job_rx) = channel::<Job>();
            let (reply_tx, replies) = channel::<Reply>();
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("fgbi-worker-{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    run(&mut worker, &job_rx, &reply_tx);
                })
                .map_err(|e| {
                    EncodeError::Config(format!("cannot start worker thread {index}: {e}"))
                })?;
            threads.push(ThreadHandle {
                thread: Thread {
                    jobs,
                    replies,
                    handle: Some(handle),
                },
                overhead,
                output: Box::default(),
            });
        }
        Ok(Crew {
            local: Box::new(Worker::new(config, 0)),
            threads,
        })
    }

    /// (digest bytes, cache bytes) kept by all workers.
    pub fn overhead_bytes(&self) -> (usize, usize) {
        self.threads
            .iter()
            .fold(self.local.overhead_bytes(), |(d, c), t| {
                (d + t.overhead.0, c + t.overhead.1)
            })
    }

    /// The outputs of the last epoch, in worker order.
    pub fn outputs(&self) -> Vec<&WorkerOutput> {
        std::iter::once(&self.local.output)
            .chain(self.threads.iter().map(|t| &*t.output))
            .collect()
    }

    /// Encodes epoch `epoch`: worker `i` takes `plans[i]` (its pages, sorted). Returns
    /// only after every worker has finished; the plans are handed back in `plans`.
    pub fn encode<S: PageSource + ?Sized>(
        &mut self,
        epoch: u64,
        plans: &mut [Vec<u64>],
        memory: &S,
    ) -> Result<(), EncodeError> {
        let (local_plan, plans) = plans.split_at_mut(1);
        if self.threads.is_empty() {
            self.local.encode(epoch, &local_plan[0], memory);
            return Ok(());
        }
        let source = Source(memory);
        let erased: &dyn PageSource = &source;
        // SAFETY: only the lifetime is erased. Every thread that receives this pointer
        // replies (or dies) before the loop below finishes, and the loop waits for all
        // of them, so `source` outlives every use of the pointer.
        let pointer = MemoryPtr(unsafe {
            std::mem::transmute::<*const (dyn PageSource + '_), *const (dyn PageSource + 'static)>(
                erased,
            )
        });
        let mut sent = vec![false; self.threads.len()];
        for ((t, plan), sent) in self.threads.iter_mut().zip(plans.iter_mut()).zip(&mut sent) {
            let job = Job::Encode {
                epoch,
                pages: std::mem::take(plan),
                memory: pointer,
                output: std::mem::take(&mut t.output),
            };
            *sent = t.thread.jobs.send(job).is_ok();
        }
        // Worker 0 works on the caller's thread while the others run. A panic here
        // must not unwind past the loop below while other threads still read `source`.
        let local = &mut self.local;
        let local_result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            local.encode(epoch, &local_plan[0], &source)
        }));
        let mut result = local_result.map_err(|_| EncodeError::WorkerPanicked(0));
        for (i, ((t, plan), sent)) in self
            .threads
            .iter_mut()
            .zip(plans.iter_mut())
            .zip(sent)
            .enumerate()
        {
            match sent.then(|| t.thread.replies.recv().ok()).flatten() {
                Some(reply) => {
                    *plan = reply.pages;
                    t.output = reply.output;
                }
                None => result = Err(EncodeError::WorkerPanicked(i + 1)),
            }
        }
        result
    }

    /// Forwards an acknowledgement to every worker.
    pub fn acknowledge(&mut self, epoch: u64) {
        self.local.acknowledge(epoch);
        for t in &self.threads {
            // A dead worker is reported by the next encode.
            let _ = t.thread.jobs.send(Job::Acknowledge(epoch));
        }
    }

    /// Forwards pages whose copy on the backup is unknown to every worker.
    pub fn forget(&mut self, pages: Vec<u64>) {
        self.local.forget(&pages);
        let pages = Arc::new(pages);
        for t in &self.threads {
            let _ = t.thread.jobs.send(Job::Forget(Arc::clone(&pages)));
        }
    }

    /// Forwards a roll-back to every worker.
    pub fn roll_back(&mut self, epoch: u64, lost: Vec<u64>) {
        self.local.roll_back(epoch, &lost);
        let lost = Arc::new(lost);
        for t in &self.threads {
            let _ = t.thread.jobs.send(Job::RollBack {
                epoch,
                lost: Arc::clone(&lost),
            });
        }
    }
}

/// A worker thread's loop: jobs in order until the encoder goes away.
fn run(worker: &mut Worker, jobs: &Receiver<Job>, replies: &Sender<Reply>) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Encode {
                epoch,
                pages,
                memory,
                mut output,
            } => {
                std::mem::swap(&mut worker.output, &mut output);
                // SAFETY: the encoder keeps the checkpoint alive until this thread
                // replies (see `Crew::encode`), and the pointee is Sync.
                let memory = unsafe { &*memory.0 };
                worker.encode(epoch, &pages, memory);
                std::mem::swap(&mut worker.output, &mut output);
                let reply = Reply { pages, output };
                if replies.send(reply).is_err() {
                    return;
                }
            }
            Job::Acknowledge(epoch) => worker.acknowledge(epoch),
            Job::Forget(pages) => worker.forget(&pages),
            Job::RollBack { epoch, lost } => worker.roll_back(epoch, &lost),
        }
    }
}

impl Drop for Thread {
    fn drop(&mut self) {
        // Closing the job channel ends the thread's loop.
        let (closed, _) = channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
