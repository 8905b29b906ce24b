//! Handing a replica to a restarted program without copying it.
//!
//! A backup started with a restart command keeps its replica in [`SharedMemory`]: one
//! memory file (`memfd`, sealed against shrinking and growing) mapped shared. On
//! failover [`spawn`] runs the command with `/bin/sh -c`, the memory file and a
//! second one holding the restart record inherited, and these variables set:
//!
//! | variable | value |
//! |---|---|
//! | `FGBI_RESTART_FD` | descriptor of the replica's memory file (the flat protected memory) |
//! | `FGBI_RESTART_LAYOUT` | the regions as `offset:len` pairs, comma-separated, bytes |
//! | `FGBI_RESTART_STATE_FD` | descriptor of a memory file holding the restart record |
//! | `FGBI_RESTART_EPOCH` | the epoch the replica holds |
//! | `FGBI_RESTART_READY_FD` | write end of a pipe: the program writes one line when it serves |
//! | `FGBI_RESTART_INPUTS_FD` | LLM mode only: a memory file holding the inputs to replay ([`crate::input_log`]) |
//!
//! The program calls [`Restart::from_env`], which maps the memory file at once
//! (`MAP_SHARED`: the program then owns the pages the backup applied epochs to; no
//! byte is copied), reads the record, and sends [`Ready`] once it serves.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use fgbi_hyp::process::{RegionLayout, parse_state};
use fgbi_hyp::protected::HypError;
use memmap2::{MmapMut, MmapOptions};

pub use crate::input_log::INPUTS_FD_ENV;
use thiserror::Error;

/// Descriptor of the replica's memory file.
pub const FD_ENV: &str = "FGBI_RESTART_FD";
/// The regions' layout: `offset:len` pairs, comma-separated.
pub const LAYOUT_ENV: &str = "FGBI_RESTART_LAYOUT";
/// Descriptor of the memory file holding the restart record.
pub const STATE_FD_ENV: &str = "FGBI_RESTART_STATE_FD";
/// The epoch the replica holds.
pub const EPOCH_ENV: &str = "FGBI_RESTART_EPOCH";
/// Write end of the readiness pipe.
pub const READY_FD_ENV: &str = "FGBI_RESTART_READY_FD";

const HUGE_PAGE: usize = 2 << 20;

/// Why a replica could not be kept, handed over or taken.
#[derive(Debug, Error)]
pub enum RestartError {
    /// The kernel refused a memory file or a pipe.
    #[error("cannot create {what}: {source}; free memory or lower --mem")]
    Create {
        /// What was being created.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The replica cannot be restarted from: nothing committed, or a state blob that
    /// is not a protected process's.
    #[error("cannot restart from the replica: {0}")]
    State(#[source] HypError),
    /// The layout does not fit the memory.
    #[error(
        "the regions end at byte {end} but the replica holds {len}: start the backup with the primary's memory size"
    )]
    Layout {
        /// End of the last region.
        end: usize,
        /// Bytes of replica memory.
        len: usize,
    },
    /// The restart command could not be started.
    #[error("cannot start the restart command {command:?}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The restarted program ended or closed the readiness pipe before saying it serves.
    #[error(
        "the restarted program ({status}) ended before it said it was serving: see its messages above"
    )]
    NotReady {
        /// Its exit status, or that it still runs.
        status: String,
    },
    /// The restarted program did not say it serves in time.
    #[error("the restarted program did not say it was serving within {0:?}")]
    ReadyTimeout(Duration),
    /// The restart environment is missing a variable or holds a bad value.
    #[error(
        "bad restart environment: {0}; a restarted program must be started by `fgbi backup --restart`"
    )]
    Environment(String),
    /// The restart environment was already taken by this process.
    #[error("Restart::from_env was already called in this process: call it once")]
    Taken,
    /// Reading, writing or mapping a memory file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> RestartError {
    move |source| RestartError::Io { what, source }
}

/// Memory in a sealed memory file, mapped shared: a replica that can be handed to
/// another process without a copy.
pub struct SharedMemory {
    map: MmapMut,
    file: File,
    hugetlb: bool,
}

impl SharedMemory {
    /// `len` zero bytes (a multiple of 4 KiB) in a memory file named `name`, on
    /// hugetlb pages when they are reserved, populated up front.
    pub fn new(name: &str, len: usize) -> Result<Self, RestartError> {
        if len == 0 || len % 4096 != 0 {
            return Err(RestartError::Create {
                what: "a replica",
                source: std::io::Error::other(format!(
                    "{len} bytes is not a non-zero multiple of 4096"
                )),
            });
        }
        if len % HUGE_PAGE == 0 {
            if let Ok(memory) = Self::create(name, len, true) {
                return Ok(memory);
            }
        }
        Self::create(name, len, false).map_err(|source| RestartError::Create {
            what: "the replica's memory file",
            source,
        })
    }

    fn create(name: &str, len: usize, hugetlb: bool) -> std::io::Result<Self> {
        let file = memfd(
            name,
            libc::MFD_ALLOW_SEALING | if hugetlb { libc::MFD_HUGETLB } else { 0 },
        )?;
        file.set_len(len as u64)?;
        // The receiver may trust the size: it can neither shrink under its mapping
        // (SIGBUS) nor grow.
        // SAFETY: fcntl on a descriptor this function owns; no pointers.
        let sealed = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if sealed < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the file is a memory file only this process can reach until it is
        // handed over, sealed against shrinking, so the mapping stays valid.
        let map = unsafe { MmapOptions::new().len(len).populate().map_mut(&file)? };
        Ok(Self { map, file, hugetlb })
    }

    /// What backs the memory.
    pub fn backing(&self) -> &'static str {
        if self.hugetlb { "hugetlb" } else { "shmem" }
    }
}

impl Deref for SharedMemory {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl DerefMut for SharedMemory {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

fn memfd(name: &str, flags: libc::c_uint) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Lets `fd` survive `exec` (or not).
fn inherit(fd: RawFd, yes: bool) -> Result<(), RestartError> {
    let flag = if yes { 0 } else { libc::FD_CLOEXEC };
    // SAFETY: fcntl takes no pointers; a bad descriptor is reported as an error.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flag) } < 0 {
        return Err(io("setting a descriptor's close-on-exec flag")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// A program restarted from a replica, until it says it serves.
pub struct Restarted {
    /// The process (`/bin/sh -c COMMAND`, or what the shell `exec`ed).
    pub child: Child,
    ready: mpsc::Receiver<Option<String>>,
}

impl Restarted {
    /// Waits up to `timeout` for the program's readiness line; returns it.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<String, RestartError> {
        match self.ready.recv_timeout(timeout) {
            Ok(Some(line)) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(RestartError::ReadyTimeout(timeout)),
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = match self.child.try_wait() {
                    Ok(Some(status)) => status.to_string(),
                    _ => "still running, readiness pipe closed".to_string(),
                };
                Err(RestartError::NotReady { status })
            }
        }
    }
}

/// Starts `command` with `/bin/sh -c` to take over from `replica` at `epoch`, whose
/// committed state blob is `state` (a protected process's: the layout and the
/// restart record). The replica's memory file is inherited, not copied.
pub fn spawn(
    command: &str,
    replica: SharedMemory,
    state: &[u8],
    epoch: u64,
    inputs: Option<&[u8]>,
) -> Result<Restarted, RestartError> {
    let (layout, record) = parse_state(state).map_err(RestartError::State)?;
    let end = layout.last().map_or(0, |r| r.offset + r.len);
    if end > replica.len() {
        return Err(RestartError::Layout {
            end,
            len: replica.len(),
        });
    }
    let mut record_file =
        memfd("fgbi-restart-record", 0).map_err(|source| RestartError::Create {
            what: "the restart record's memory file",
            source,
        })?;
    record_file
        .write_all(record)
        .map_err(io("writing the restart record"))?;
    let inputs_file = inputs
        .map(|bytes| {
            let mut file =
                memfd("fgbi-restart-inputs", 0).map_err(|source| RestartError::Create {
                    what: "the input log's memory file",
                    source,
                })?;
            file.write_all(bytes).map_err(io("writing the input log"))?;
            Ok::<_, RestartError>(file)
        })
        .transpose()?;
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid for writing two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(RestartError::Create {
            what: "the readiness pipe",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: pipe2 just returned both descriptors, owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut passed = vec![
        replica.file.as_raw_fd(),
        record_file.as_raw_fd(),
        write_end.as_raw_fd(),
    ];
    let layout_text: Vec<String> = layout
        .iter()
        .map(|r| format!("{}:{}", r.offset, r.len))
        .collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env(FD_ENV, passed[0].to_string())
        .env(STATE_FD_ENV, passed[1].to_string())
        .env(READY_FD_ENV, passed[2].to_string())
        .env(LAYOUT_ENV, layout_text.join(","))
        .env(EPOCH_ENV, epoch.to_string())
        .env_remove(INPUTS_FD_ENV);
    if let Some(file) = &inputs_file {
        passed.push(file.as_raw_fd());
        cmd.env(INPUTS_FD_ENV, file.as_raw_fd().to_string());
    }
    // Only this child inherits them: they are close-on-exec again right after.
    for &fd in &passed {
        inherit(fd, true)?;
    }
    let spawned = cmd.spawn();
    for &fd in &passed {
        inherit(fd, false)?;
    }
    let child = spawned.map_err(|source| RestartError::Spawn {
        command: command.to_string(),
        source,
    })?;
    // The child holds its own descriptors now; ours go (the replica's pages stay with
    // the child's).
    drop((replica, record_file, write_end, inputs_file));
    let (tx, ready) = mpsc::channel();
    std::thread::Builder::new()
        .name("fgbi-restart-ready".into())
        .spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(File::from(read_end)).read_line(&mut line);
            // Nobody waits any more if the receiver is gone.
            let _ = tx.send((read.is_ok() && !line.is_empty()).then(|| line.trim().to_string()));
        })
        .map_err(io("starting the readiness thread"))?;
    Ok(Restarted { child, ready })
}

/// The program's side: the replica handed over by `fgbi backup --restart`.
pub struct Restart {
    map: MmapMut,
    layout: Vec<RegionLayout>,
    record: Vec<u8>,
    epoch: u64,
    ready: Option<File>,
    inputs: Option<Vec<u8>>,
}

/// Tells the backup that the restarted program serves again.
pub struct Ready(Option<File>);

impl Ready {
    /// Sends the one-line `message` the backup prints (newlines become spaces).
    /// Does nothing when the ready descriptor was already taken.
    pub fn send(&self, message: &str) -> Result<(), RestartError> {
        let Some(mut pipe) = self.0.as_ref() else {
            return Ok(());
        };
        let line = message.replace('\n', " ");
        pipe.write_all(format!("{line}\n").as_bytes())
            .map_err(io("telling the backup the program is ready"))
    }
}

impl Restart {
    /// Takes the replica the backup handed over, if this process was started as a
    /// restart (`None` when `FGBI_RESTART_FD` is not set): maps the regions shared,
    /// reads the restart record. Call once per process.
    pub fn from_env() -> Result<Option<Self>, RestartError> {
        static TAKEN: AtomicBool = AtomicBool::new(false);
        if std::env::var_os(FD_ENV).is_none() {
            return Ok(None);
        }
        if TAKEN.swap(true, Ordering::AcqRel) {
            return Err(RestartError::Taken);
        }
        let memory = take_fd(FD_ENV)?;
        let mut record_file = take_fd(STATE_FD_ENV)?;
        let ready = take_fd(READY_FD_ENV)?;
        let layout = parse_layout(&env(LAYOUT_ENV)?)?;
        let epoch = env(EPOCH_ENV)?
            .parse()
            .map_err(|_| RestartError::Environment(format!("{EPOCH_ENV} is not a number")))?;
        let len = memory
            .metadata()
            .map_err(io("reading the replica's size"))?
            .len();
        let len = usize::try_from(len).map_err(|_| {
            RestartError::Environment("the replica exceeds the address space".into())
        })?;
        let end = layout.last().map_or(0, |r| r.offset + r.len);
        if end > len {
            return Err(RestartError::Layout { end, len });
        }
        // Not populated: the pages are in memory already, and only those the
        // program touches cost it a (minor) fault, after it serves again.
        // SAFETY: the memory file was created by the backup, sealed against
        // shrinking, and handed to this process alone: the mapping stays valid and
        // no other process writes it.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&memory) }
            .map_err(io("mapping the replica"))?;
        let mut record = Vec::new();
        record_file
            .rewind()
            .and_then(|()| record_file.read_to_end(&mut record))
            .map_err(io("reading the restart record"))?;
        let inputs = match std::env::var_os(INPUTS_FD_ENV) {
            Some(_) => {
                let mut file = take_fd(INPUTS_FD_ENV)?;
                let mut bytes = Vec::new();
                file.rewind()
                    .and_then(|()| file.read_to_end(&mut bytes))
                    .map_err(io("reading the input log"))?;
                Some(bytes)
            }
            None => None,
        };
        Ok(Some(Self {
            map,
            layout,
            record,
            epoch,
            ready: Some(ready),
            inputs,
        }))
    }

    /// Number of regions.
    pub fn regions(&self) -> usize {
        self.layout.len()
    }

    /// Region `index`, as the primary's last committed checkpoint left it.
    pub fn region(&self, index: usize) -> Option<&[u8]> {
        let r = self.layout.get(index)?;
        self.map.get(r.offset..r.offset + r.len)
    }

    /// Region `index`, writable.
    pub fn region_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        let r = *self.layout.get(index)?;
        self.map.get_mut(r.offset..r.offset + r.len)
    }

    /// The restart record committed with the replica's epoch.
    pub fn record(&self) -> &[u8] {
        &self.record
    }

    /// The inputs the backup logged since the primary's last known committed
    /// checkpoint ([`crate::input_log::encode`]d), when the primary forwarded them
    /// (LLM mode): `FGBI_RESTART_INPUTS_FD`.
    pub fn inputs(&self) -> Option<&[u8]> {
        self.inputs.as_deref()
    }

    /// The epoch the replica holds.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How to tell the backup that the program serves again (once it does). The
    /// first call takes it; later ones return one that does nothing.
    pub fn take_ready(&mut self) -> Ready {
        Ready(self.ready.take())
    }
}

fn env(name: &str) -> Result<String, RestartError> {
    std::env::var(name).map_err(|_| RestartError::Environment(format!("{name} is not set")))
}

/// The descriptor named by variable `name`, made close-on-exec, owned from now on.
fn take_fd(name: &str) -> Result<File, RestartError> {
    let fd: RawFd = env(name)?
        .parse()
        .ok()
        .filter(|&fd| fd > 2)
        .ok_or_else(|| RestartError::Environment(format!("{name} is not a descriptor number")))?;
    inherit(fd, false)
        .map_err(|_| RestartError::Environment(format!("{name}={fd} is not an open descriptor")))?;
    // SAFETY: the backup passed this open descriptor for this process's use only,
    // and `TAKEN` makes sure it is wrapped once.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn parse_layout(text: &str) -> Result<Vec<RegionLayout>, RestartError> {
    let bad = || RestartError::Environment(format!("{LAYOUT_ENV}={text:?} is not offset:len,..."));
    let mut layout: Vec<RegionLayout> = Vec::new();
    for pair in text.split(',') {
        let (offset, len) = pair.split_once(':').ok_or_else(bad)?;
        let region = RegionLayout {
            offset: offset.parse().map_err(|_| bad())?,
            len: len.parse().map_err(|_| bad())?,
        };
        let after_previous = layout
            .last()
            .is_none_or(|p| p.offset + p.len <= region.offset);
        if region.len == 0 || region.offset.checked_add(region.len).is_none() || !after_previous {
            return Err(bad());
        }
        layout.push(region);
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_layout("0:100,2097152:4096").unwrap(),
            vec![
                RegionLayout {
                    offset: 0,
                    len: 100
                },
                RegionLayout {
                    offset: 2 << 20,
                    len: 4096
                }
            ]
        );
        for bad in [
            "",
            "0:0",
            "5",
            "0:100,50:10",
            "x:1",
            "18446744073709551615:2",
        ] {
            assert!(parse_layout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shared_memory_is_zeroed_sealed_and_writable() {
        let mut memory = SharedMemory::new("fgbi-test", 4 << 20).unwrap();
        assert!(memory.iter().all(|&b| b == 0));
        memory[4097] = 9;
        assert_eq!(memory[4097], 9);
        assert!(
            memory.file.set_len(4096).is_err(),
            "sealed against shrinking"
        );
        assert!(SharedMemory::new("fgbi-test", 100).is_err());
    }
}
