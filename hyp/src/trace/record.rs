//! The recorder: stops a running process once per epoch, copies its writable private
//! memory, resumes it, and keeps the pages that changed since the previous epoch.
//!
//! The process is stopped with `SIGSTOP` (which no thread can block or catch: the
//! whole thread group stops) and the recorder waits until every thread in
//! `/proc/PID/task` reports the stopped state; it is resumed with `SIGCONT`, also when
//! the copy fails. Memory is read with `process_vm_readv`.
//!
//! The process's writable private mappings (`rw?p` in `/proc/PID/maps`) are laid out
//! on one flat memory of pages: the first epoch's mappings in address order, then
//! every address range that becomes mapped later, appended in the order it appears.
//! A range keeps its place in the flat memory for the whole recording; while it is
//! unmapped (or no longer writable), its pages read as zero.

use std::fs;
use std::io;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::format::Epoch;
use super::sys;
use crate::workload::PAGE;

/// How long a stop may take before the recorder gives up.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Recording a process failed.
#[derive(Debug, Error)]
pub enum RecordError {
    /// The process id is not a positive number.
    #[error("invalid process id {0}")]
    Pid(i32),
    /// The process exited.
    #[error("process {0} is gone (it exited)")]
    Gone(i32),
    /// A file under /proc could not be read.
    #[error("cannot read {path}: {source}")]
    Proc {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The process could not be signalled.
    #[error("cannot signal process {pid} (are you root or its owner?): {source}")]
    Signal {
        /// The process.
        pid: i32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Its memory could not be read.
    #[error(
        "cannot read memory of process {pid} at {addr:#x} (needs ptrace permission: root, or kernel.yama.ptrace_scope=0): {source}"
    )]
    Read {
        /// The process.
        pid: i32,
        /// The address.
        addr: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Some thread did not stop in time.
    #[error("process {pid}: thread {tid} did not stop within {STOP_TIMEOUT:?}")]
    StopTimeout {
        /// The process.
        pid: i32,
        /// The thread still running.
        tid: String,
    },
}

/// One address range's place in the flat memory.
#[derive(Clone, Copy, Debug)]
struct Slot {
    start: u64,
    end: u64,
    /// Flat page of `start`.
    base: usize,
}

/// A writable private mapping, `start..end`.
type Mapping = (u64, u64);

/// What one epoch found.
#[derive(Debug)]
pub struct Capture {
    /// The pages that changed since the previous capture (all non-zero pages, the first
    /// time), stored whole.
    pub epoch: Epoch,
    /// How long the process was stopped.
    pub stopped: Duration,
}

/// Records a running process's memory, epoch by epoch.
pub struct Recorder {
    pid: i32,
    slots: Vec<Slot>,
    pages: usize,
    /// The previous capture's copy of the flat memory.
    previous: Vec<u8>,
    /// This capture's copy.
    current: Vec<u8>,
}

impl Recorder {
    /// A recorder of process `pid`; nothing is read until [`Recorder::capture`].
    pub fn new(pid: i32) -> Result<Self, RecordError> {
        if pid <= 0 {
            return Err(RecordError::Pid(pid));
        }
        Ok(Self {
            pid,
            slots: Vec::new(),
            pages: 0,
            previous: Vec::new(),
            current: Vec::new(),
        })
    }

    /// Pages of flat memory laid out so far.
    pub fn pages(&self) -> u64 {
        self.pages as u64
    }

    /// Stops the process, copies its memory, resumes it, and returns the pages that
    /// changed since the previous capture.
    pub fn capture(&mut self) -> Result<Capture, RecordError> {
        let started = Instant::now();
        sys::signal(self.pid, libc::SIGSTOP).map_err(|source| self.signal_error(source))?;
        let copied = self.wait_stopped().and_then(|()| self.copy());
        let resumed = sys::signal(self.pid, libc::SIGCONT);
        let stopped = started.elapsed();
        copied?;
        resumed.map_err(|source| self.signal_error(source))?;
        let mut epoch = Epoch::new();
        for (page, (now, before)) in self
            .current
            .chunks_exact(PAGE)
            .zip(self.previous.chunks_exact(PAGE))
            .enumerate()
        {
            if now != before {
                let mut bytes = [0u8; PAGE];
                bytes.copy_from_slice(now);
                epoch.push(page as u64, &bytes);
            }
        }
        std::mem::swap(&mut self.previous, &mut self.current);
        Ok(Capture { epoch, stopped })
    }

    fn signal_error(&self, source: io::Error) -> RecordError {
        if source.raw_os_error() == Some(libc::ESRCH) {
            RecordError::Gone(self.pid)
        } else {
            RecordError::Signal {
                pid: self.pid,
                source,
            }
        }
    }

    fn proc_error(&self, path: String, source: io::Error) -> RecordError {
        if source.kind() == io::ErrorKind::NotFound {
            RecordError::Gone(self.pid)
        } else {
            RecordError::Proc { path, source }
        }
    }

    /// Waits until every thread of the process is stopped (or dead).
    fn wait_stopped(&self) -> Result<(), RecordError> {
        let dir = format!("/proc/{}/task", self.pid);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let tasks = fs::read_dir(&dir).map_err(|e| self.proc_error(dir.clone(), e))?;
            let mut running = None;
            for task in tasks {
                let task = task.map_err(|e| self.proc_error(dir.clone(), e))?;
                let path = task.path().join("stat");
                // A thread that exited since the listing is not running.
                let Ok(stat) = fs::read_to_string(&path) else {
                    continue;
                };
                let state = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 1..].trim_start().chars().next());
                if !matches!(state, Some('T' | 't' | 'Z' | 'X')) {
                    running = Some(task.file_name().to_string_lossy().into_owned());
                    break;
                }
            }
            let Some(tid) = running else {
                return Ok(());
            };
            if Instant::now() > deadline {
                return Err(RecordError::StopTimeout { pid: self.pid, tid });
            }
            std::thread::yield_now();
        }
    }

    /// The process's writable private mappings, in address order.
    fn mappings(&self) -> Result<Vec<Mapping>, RecordError> {
        let path = format!("/proc/{}/maps", self.pid);
        let text = fs::read_to_string(&path).map_err(|e| self.proc_error(path.clone(), e))?;
        let mut out = Vec::new();
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace();
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
                continue;
            };
            let perms = perms.as_bytes();
            if perms.len() < 4 || perms[0] != b'r' || perms[1] != b'w' || perms[3] != b'p' {
                continue;
            }
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
                && start < end
            {
                out.push((start, end));
            }
        }
        Ok(out)
    }

    /// Appends a slot for every part of `mappings` no slot covers yet.
    fn lay_out(&mut self, mappings: &[Mapping]) {
        let mut known: Vec<(u64, u64)> = self.slots.iter().map(|s| (s.start, s.end)).collect();
        known.sort_unstable();
        for &(start, end) in mappings {
            let mut cursor = start;
            for &(s, e) in known.iter().filter(|&&(s, e)| s < end && e > start) {
                if s > cursor {
                    self.append(cursor, s);
                }
                cursor = cursor.max(e);
            }
            if cursor < end {
                self.append(cursor, end);
            }
        }
    }

    fn append(&mut self, start: u64, end: u64) {
        let pages = ((end - start) / PAGE as u64) as usize;
        self.slots.push(Slot {
            start,
            end,
            base: self.pages,
        });
        self.pages += pages;
    }

    /// Copies every slot's current contents into `current` (zeros where unmapped).
    fn copy(&mut self) -> Result<(), RecordError> {
        let mappings = self.mappings()?;
        self.lay_out(&mappings);
        let len = self.pages * PAGE;
        self.current.resize(len, 0);
        self.previous.resize(len, 0);
        for slot in &self.slots {
            let memory = &mut self.current[slot.base * PAGE..];
            let mut cursor = slot.start;
            for &(s, e) in &mappings {
                let (a, b) = (s.max(cursor), e.min(slot.end));
                if a >= b {
                    continue;
                }
                memory[(cursor - slot.start) as usize..(a - slot.start) as usize].fill(0);
                read_range(
                    self.pid,
                    a,
                    &mut memory[(a - slot.start) as usize..(b - slot.start) as usize],
                )?;
                cursor = b;
            }
            memory[(cursor - slot.start) as usize..(slot.end - slot.start) as usize].fill(0);
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `addr`; pages that cannot be read become zeros.
fn read_range(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), RecordError> {
    let mut done = 0;
    while done < buf.len() {
        let at = addr + done as u64;
        let skip = match sys::read_memory(pid, at, &mut buf[done..]) {
            Ok(0) => true,
            Ok(n) => {
                done += n;
                false
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => true,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(RecordError::Gone(pid)),
            Err(source) => {
                return Err(RecordError::Read {
                    pid,
                    addr: at,
                    source,
                });
            }
        };
        if skip {
            let end = (done + PAGE - (at as usize % PAGE)).min(buf.len());
            buf[done..end].fill(0);
            done = end;
        }
    }
    Ok(())
}
