//! The C API declared by `include/fgbi.h`, over [`crate::replicator`].
//!
//! A handle given to C is the address of an object this module keeps in a registry of
//! live handles. Every call but [`fgbi_safepoint_pass`] looks its handles up there,
//! so an unknown, freed or mistyped handle is an error rather than undefined
//! behaviour; `fgbi_safepoint_pass`, which must take no lock, dereferences its handle
//! directly. Every entry point catches panics, checks its pointers for NULL, returns a
//! [`Status`] and, on failure, leaves a message for [`fgbi_last_error`].
//!
//! [`fgbi_protect`] replicates to an in-process replica or, with `backup` set in
//! [`FgbiOptions`], to `fgbi backup` over the network. In a program started by
//! `fgbi backup --restart` it first takes over the replica handed over
//! ([`Restart::from_env`]): the regions start with the replica's contents, the restart
//! record is [`fgbi_restart_record`]'s, and [`fgbi_ready`] sends the readiness line.

use std::any::Any;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::{self, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fgbi_engine::{Geometry, Mode, PAGE_SIZE};
use fgbi_hyp::process::{ProcessHandle, layout};
use fgbi_hyp::protected::HypError;
use fgbi_hyp::safepoint::{Safepoint, SafepointError};
use fgbi_hyp::tracking::TrackingError;
use fgbi_transport::{Implementation, Liveness, PresharedKey, RdmaConfig};
use thiserror::Error;

use crate::local::ReplicationError;
use crate::primary::PrimaryEvent;
use crate::replicator::{
    Observer, Remote, ReplicaView, Replicator, ReplicatorOptions, Summary, Target,
};
use crate::restart::{Ready, Restart, RestartError};

/// What a call returns: `enum fgbi_status` in the header.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    Null = -1,
    /// An argument is out of range: region sizes, options, a region index.
    Invalid = -2,
    /// A handle is unknown, already freed, or of another kind.
    Handle = -3,
    /// A call out of order: finishing twice, leaving a wait never entered.
    State = -4,
    /// The kernel lacks dirty tracking (it needs Linux 6.7 or later).
    Unsupported = -5,
    /// The process may not use userfaultfd.
    Permission = -6,
    /// Dirty tracking failed on a kernel that supports it.
    Tracking = -7,
    /// Memory could not be mapped or the epoch thread could not be started.
    Resources = -8,
    /// An application thread did not reach a safepoint within the stop timeout.
    Safepoint = -9,
    /// The replica refused an epoch or the epoch thread failed: a bug in fgbi.
    Replication = -10,
    /// fgbi panicked: a bug in fgbi.
    Panic = -11,
}

/// Why a call failed; its message, prefixed with the call's name, is what
/// [`fgbi_last_error`] returns.
#[derive(Debug, Error)]
enum Error {
    #[error("argument `{0}` is NULL: pass a valid pointer")]
    Null(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "argument `{arg}` ({addr:#x}) is not a live {kind}: pass what {origin} returned, and \
         not after freeing it"
    )]
    Handle {
        arg: &'static str,
        addr: usize,
        kind: &'static str,
        origin: &'static str,
    },
    #[error("{0}")]
    State(&'static str),
    #[error(
        "threads {missing:?} did not reach a safepoint within {timeout:?}: call \
         fgbi_safepoint_pass more often, wrap blocking waits in \
         fgbi_safepoint_enter_outside / fgbi_safepoint_leave_outside, and call \
         fgbi_safepoint_free before a thread exits or calls fgbi_finish"
    )]
    Stalled {
        missing: Vec<String>,
        timeout: Duration,
    },
    #[error(transparent)]
    Replication(ReplicationError),
    #[error("{0}")]
    Restart(RestartError),
    #[error("fgbi panicked ({0}): this is a bug in fgbi, please report it")]
    Panic(String),
}

impl From<ReplicationError> for Error {
    fn from(e: ReplicationError) -> Self {
        match e {
            ReplicationError::Hyp(HypError::Safepoint(SafepointError::Timeout {
                missing,
                timeout,
            })) => Error::Stalled { missing, timeout },
            e => Error::Replication(e),
        }
    }
}

impl Error {
    fn status(&self) -> Status {
        match self {
            Error::Null(_) => Status::Null,
            Error::Invalid(_) => Status::Invalid,
            Error::Handle { .. } => Status::Handle,
            Error::State(_) => Status::State,
            Error::Stalled { .. } => Status::Safepoint,
            Error::Panic(_) => Status::Panic,
            Error::Restart(e) => match e {
                RestartError::Taken => Status::State,
                RestartError::Io { .. } | RestartError::Create { .. } => Status::Resources,
                _ => Status::Invalid,
            },
            Error::Replication(e) => match e {
                ReplicationError::Hyp(HypError::Tracking(TrackingError::PermissionDenied(_))) => {
                    Status::Permission
                }
                ReplicationError::Hyp(HypError::Tracking(
                    TrackingError::NoUserfaultfd(_)
                    | TrackingError::MissingFeatures { .. }
                    | TrackingError::NoPagemapScan,
                )) => Status::Unsupported,
                ReplicationError::Hyp(HypError::Tracking(_)) => Status::Tracking,
                ReplicationError::Hyp(HypError::Memory(_))
                | ReplicationError::Memory(_)
                | ReplicationError::Thread(_) => Status::Resources,
                ReplicationError::Geometry(_) => Status::Invalid,
                _ => Status::Replication,
            },
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::default();
}

/// Runs the body of entry point `name`, catching panics: its status, and on failure
/// the message for [`fgbi_last_error`].
fn call(name: &str, body: impl FnOnce() -> Result<(), Error>) -> c_int {
    let result = panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned());
        Err(Error::Panic(what.unwrap_or_else(|| "no message".into())))
    });
    match result {
        Ok(()) => Status::Ok as c_int,
        Err(e) => {
            let message = format!("{name}: {e}").replace('\0', "\\0");
            LAST_ERROR.set(CString::new(message).unwrap_or_default());
            e.status() as c_int
        }
    }
}

/// `ptr` if it is not NULL, else the error naming argument `arg`.
fn required<T>(ptr: *const T, arg: &'static str) -> Result<NonNull<T>, Error> {
    NonNull::new(ptr.cast_mut()).ok_or(Error::Null(arg))
}

/// An object C holds by address.
trait Handle: Any + Send + Sync {
    /// Its type in the header.
    const KIND: &'static str;
    /// The call that returns it.
    const ORIGIN: &'static str;
}

type Registry = BTreeMap<usize, Arc<dyn Any + Send + Sync>>;

static HANDLES: Mutex<Registry> = Mutex::new(BTreeMap::new());

fn handles() -> MutexGuard<'static, Registry> {
    // Every critical section is one map operation, which a panic cannot leave half done.
    HANDLES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps `object` alive until it is released and returns its handle.
fn publish<T: Handle>(object: T) -> *mut T {
    let object = Arc::new(object);
    let handle = Arc::as_ptr(&object).cast_mut();
    handles().insert(handle.addr(), object);
    handle
}

/// The live object behind `handle` (argument `arg`); with `release`, also forgets it,
/// so it is freed once the caller drops it.
fn lookup<T: Handle>(handle: *const T, arg: &'static str, release: bool) -> Result<Arc<T>, Error> {
    let addr = required(handle, arg)?.addr().get();
    let mut handles = handles();
    let object = match handles.get(&addr) {
        Some(object) if object.is::<T>() && release => handles.remove(&addr),
        Some(object) => Some(Arc::clone(object)),
        None => None,
    };
    object
        .and_then(|object| object.downcast::<T>().ok())
        .ok_or(Error::Handle {
            arg,
            addr,
            kind: T::KIND,
            origin: T::ORIGIN,
        })
}

/// The encoding modes of `enum fgbi_mode` in the header, by value.
const MODES: [(i32, Mode); 4] = [
    (0, Mode::Fgbi),
    (1, Mode::Remus),
    (2, Mode::Llm),
    (3, Mode::Xbzrle),
];

/// The connection timeout of a remote backup: how long the epoch thread tries to
/// reach it at start before the program runs unprotected.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to protect: `struct fgbi_options` in the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FgbiOptions {
    /// Milliseconds between checkpoints, at least 1.
    pub epoch_ms: u64,
    /// Block size in bytes: a power of two from 32 to 4096.
    pub block_size: u64,
    /// Milliseconds the application's threads have to reach a safepoint, at least 1.
    pub stop_timeout_ms: u64,
    /// Compare the replica with the checkpoint every this many epochs (0: only the
    /// final checkpoint, which is always compared). In-process replica only.
    pub verify_every: u64,
    /// Bytes of page cache for run deltas.
    pub cache_bytes: u64,
    /// Encoding mode: a value of `enum fgbi_mode`.
    pub mode: i32,
    /// `host:port` of `fgbi backup`; NULL: an in-process replica.
    pub backup: *const c_char,
    /// The key file shared with the backup; required with `backup`.
    pub key_file: *const c_char,
    /// "tcp", "uring", "std" or "rdma"; NULL: "tcp". With `backup` only.
    pub transport: *const c_char,
    /// The RDMA device; NULL: the first with an active port. With "rdma" only.
    pub rdma_device: *const c_char,
    /// Milliseconds between heartbeats to the backup (four silent: dead); 0: 25.
    pub heartbeat_ms: u64,
}

impl From<&ReplicatorOptions> for FgbiOptions {
    fn from(o: &ReplicatorOptions) -> Self {
        Self {
            epoch_ms: o.epoch.as_millis() as u64,
            block_size: o.block_size as u64,
            stop_timeout_ms: o.stop_timeout.as_millis() as u64,
            verify_every: o.verify_every,
            cache_bytes: o.cache_bytes as u64,
            mode: MODES
                .iter()
                .find(|(_, mode)| *mode == o.mode)
                .map_or(0, |&(value, _)| value),
            backup: std::ptr::null(),
            key_file: std::ptr::null(),
            transport: std::ptr::null(),
            rdma_device: std::ptr::null(),
            heartbeat_ms: Liveness::default().interval.as_millis() as u64,
        }
    }
}

/// The string at `ptr`, the value of option `field`; `None` if NULL.
///
/// # Safety
///
/// `ptr` is NULL or a NUL-terminated string that outlives the result.
unsafe fn text<'a>(ptr: *const c_char, field: &str) -> Result<Option<&'a str>, Error> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: not NULL, and NUL-terminated per the contract.
    let text = unsafe { CStr::from_ptr(ptr) };
    text.to_str().map(Some).map_err(|_| {
        Error::Invalid(format!(
            "{field} ({text:?}) is not UTF-8: pass a UTF-8 string"
        ))
    })
}

impl FgbiOptions {
    /// The replicator's options these ask for, every field checked.
    ///
    /// # Safety
    ///
    /// The string fields are NULL or NUL-terminated strings.
    unsafe fn to_replicator(self) -> Result<ReplicatorOptions, Error> {
        if self.epoch_ms == 0 || self.stop_timeout_ms == 0 {
            return Err(Error::Invalid(format!(
                "epoch_ms ({}) and stop_timeout_ms ({}) must be at least 1: start from \
                 fgbi_options_default",
                self.epoch_ms, self.stop_timeout_ms
            )));
        }
        let block_size = usize::try_from(self.block_size).unwrap_or(usize::MAX);
        // The block size is checked here, before any memory is mapped.
        Geometry::new(PAGE_SIZE as u64, block_size)
            .map_err(|e| Error::Invalid(format!("block_size: {e}")))?;
        let mode = MODES
            .iter()
            .find(|(value, _)| *value == self.mode)
            .map(|&(_, mode)| mode)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "mode ({}) is not an fgbi_mode: use FGBI_MODE_FGBI, FGBI_MODE_REMUS, \
                     FGBI_MODE_LLM or FGBI_MODE_XBZRLE",
                    self.mode
                ))
            })?;
        // SAFETY: each field is NULL or NUL-terminated per the contract.
        let (backup, key_file, transport, rdma_device) = unsafe {
            (
                text(self.backup, "backup")?,
                text(self.key_file, "key_file")?,
                text(self.transport, "transport")?,
                text(self.rdma_device, "rdma_device")?,
            )
        };
        let target = match backup {
            Some(backup) => {
                Target::Remote(self.remote(backup, key_file, transport, rdma_device)?)
            }
            None if key_file.is_some() || transport.is_some() || rdma_device.is_some() => {
                return Err(Error::Invalid(
                    "key_file, transport and rdma_device apply to a remote backup only: set \
                     backup (host:port of `fgbi backup`) too, or leave them NULL"
                        .into(),
                ));
            }
            None => Target::Local,
        };
        let observer = match &target {
            Target::Remote(remote) => Some(announce(remote.backup)),
            Target::Local => None,
        };
        Ok(ReplicatorOptions {
            epoch: Duration::from_millis(self.epoch_ms),
            mode,
            block_size,
            stop_timeout: Duration::from_millis(self.stop_timeout_ms),
            verify_every: self.verify_every,
            cache_bytes: usize::try_from(self.cache_bytes).map_err(|_| {
                Error::Invalid(format!("cache_bytes ({}) exceeds size_t", self.cache_bytes))
            })?,
            target,
            observer,
        })
    }

    /// The backup at `backup` these options describe.
    fn remote(
        &self,
        backup: &str,
        key_file: Option<&str>,
        transport: Option<&str>,
        rdma_device: Option<&str>,
    ) -> Result<Remote, Error> {
        let address = resolve(backup)?;
        let key_file = key_file.ok_or_else(|| {
            Error::Invalid(format!(
                "key_file is NULL but backup is {backup:?}: pass the key file `fgbi backup \
                 --key` reads (at least 16 bytes, readable by its owner only)"
            ))
        })?;
        let key = PresharedKey::from_file(key_file)
            .map_err(|e| Error::Invalid(format!("key_file: {e}")))?;
        let name = transport.unwrap_or("tcp");
        let implementation = match name {
            "tcp" if Implementation::Uring.available().is_ok() => Implementation::Uring,
            "tcp" | "std" => Implementation::Std,
            "uring" => Implementation::Uring,
            "rdma" => Implementation::Rdma,
            other => {
                return Err(Error::Invalid(format!(
                    "transport {other:?} is unknown: use \"tcp\", \"uring\", \"std\" or \
                     \"rdma\" (NULL: \"tcp\")"
                )));
            }
        };
        if rdma_device.is_some() && implementation != Implementation::Rdma {
            return Err(Error::Invalid(format!(
                "rdma_device is set but transport is {name:?}: set transport to \"rdma\", or \
                 leave rdma_device NULL"
            )));
        }
        let rdma = RdmaConfig {
            device: rdma_device.map(str::to_string),
            ..RdmaConfig::default()
        };
        match implementation {
            Implementation::Rdma => rdma.available(),
            other => other.available(),
        }
        .map_err(|e| {
            Error::Invalid(format!(
                "transport {name:?} cannot run here ({e}): choose another transport"
            ))
        })?;
        let interval = Duration::from_millis(match self.heartbeat_ms {
            0 => Liveness::default().interval.as_millis() as u64,
            ms => ms,
        });
        Ok(Remote {
            backup: address,
            key: Arc::new(key),
            implementation,
            rdma,
            liveness: Liveness {
                interval,
                timeout: interval * 4,
            },
            connect_timeout: CONNECT_TIMEOUT,
        })
    }
}

/// The address `backup` ("host:port") names: its first.
fn resolve(backup: &str) -> Result<SocketAddr, Error> {
    let bad = |why: String| {
        Error::Invalid(format!(
            "backup {backup:?} is not a host:port this machine can resolve ({why}): pass \
             the address `fgbi backup --listen` listens on, e.g. \"192.0.2.7:7000\""
        ))
    };
    backup
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("it resolves to no address".into()))
}

/// An observer that says on stderr when the backup at `backup` is reached, holds a
/// checkpoint, or is lost: a C program has no other way to learn whether it runs
/// protected.
fn announce(backup: SocketAddr) -> Observer {
    // Set when protection is (re)gained until the next commit says it is.
    let pending = AtomicBool::new(true);
    Observer(Arc::new(move |event| match event {
        PrimaryEvent::Connected(epoch) => {
            pending.store(true, Ordering::Relaxed);
            eprintln!("fgbi: connected to the backup at {backup} (it holds epoch {epoch})");
        }
        PrimaryEvent::Committed { epoch, .. } if pending.swap(false, Ordering::Relaxed) => {
            eprintln!("fgbi: protected: the backup at {backup} committed epoch {epoch}");
        }
        PrimaryEvent::Unprotected { reason } => {
            pending.store(true, Ordering::Relaxed);
            eprintln!(
                "fgbi: unprotected: the backup at {backup} holds no checkpoint of this \
                 process ({reason}); running on"
            );
        }
        _ => {}
    }))
}

/// What protection did: `struct fgbi_summary` in the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FgbiSummary {
    /// Checkpoints taken, the final one included.
    pub epochs: u64,
    /// Checkpoints compared with the replica.
    pub verified: u64,
    /// Checkpoints whose replica differed (0 unless something is broken).
    pub mismatches: u64,
    /// Dirty pages replicated.
    pub dirty_pages: u64,
    /// Bytes encoded.
    pub wire_bytes: u64,
    /// Median pause per checkpoint (type II downtime), microseconds.
    pub pause_us_p50: f64,
    /// 99th percentile pause, microseconds.
    pub pause_us_p99: f64,
    /// Longest pause, microseconds.
    pub pause_us_max: f64,
    /// Checkpoints the target committed: every one for an in-process replica, those
    /// the backup acknowledged for a remote one.
    pub committed: u64,
}

impl From<&Summary> for FgbiSummary {
    fn from(s: &Summary) -> Self {
        Self {
            epochs: s.epochs,
            verified: s.verified,
            mismatches: s.mismatches,
            dirty_pages: s.dirty_pages,
            wire_bytes: s.wire_bytes,
            pause_us_p50: s.pause_us.p50,
            pause_us_p99: s.pause_us.p99,
            pause_us_max: s.pause_us.max,
            committed: s.committed,
        }
    }
}

/// A protected process: `fgbi_process` in the header, opaque to C.
pub struct FgbiProcess {
    handle: ProcessHandle,
    /// The epoch thread, until `fgbi_finish` takes it.
    replicator: Mutex<Option<Replicator>>,
    /// The replica this process took over, when `fgbi backup --restart` started it.
    taken_over: Option<TakenOver>,
}

/// What a restarted process keeps of the replica it took over.
struct TakenOver {
    /// The epoch the replica held.
    epoch: u64,
    /// The restart record committed with it.
    record: Vec<u8>,
    /// The readiness line's pipe, until `fgbi_ready` sends it.
    ready: Mutex<Option<Ready>>,
}

impl Handle for FgbiProcess {
    const KIND: &'static str = "fgbi_process";
    const ORIGIN: &'static str = "fgbi_protect";
}

/// One thread's safepoint: `fgbi_safepoint` in the header, opaque to C.
pub struct FgbiSafepoint {
    safepoint: Safepoint,
    /// Between `fgbi_safepoint_enter_outside` and `fgbi_safepoint_leave_outside`.
    outside: AtomicBool,
}

impl Handle for FgbiSafepoint {
    const KIND: &'static str = "fgbi_safepoint";
    const ORIGIN: &'static str = "fgbi_safepoint_register";
}

/// The replica left by `fgbi_finish`: `fgbi_replica` in the header, opaque to C.
/// The lock makes it shareable; the memory it hands out does not move while the
/// replica lives.
pub struct FgbiReplica(Mutex<ReplicaView>);

impl FgbiReplica {
    fn view(&self) -> MutexGuard<'_, ReplicaView> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Handle for FgbiReplica {
    const KIND: &'static str = "fgbi_replica";
    const ORIGIN: &'static str = "fgbi_finish";
}

/// The message of this thread's last failed call, or "" if none failed. Valid until
/// the next call on this thread fails; successful calls leave it alone.
#[unsafe(no_mangle)]
pub extern "C" fn fgbi_last_error() -> *const c_char {
    panic::catch_unwind(|| LAST_ERROR.with_borrow(|message| message.as_ptr()))
        .unwrap_or(c"fgbi_last_error: fgbi panicked: this is a bug in fgbi".as_ptr())
}

/// Fills `options` with the defaults.
///
/// # Safety
///
/// `options` is NULL or valid for writing one `fgbi_options`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_options_default(options: *mut FgbiOptions) -> c_int {
    call("fgbi_options_default", || {
        let out = required(options, "options")?;
        // SAFETY: not NULL, and valid for writes per the contract.
        unsafe { out.write(FgbiOptions::from(&ReplicatorOptions::default())) };
        Ok(())
    })
}

/// Protects `count` regions of `sizes[i]` bytes and starts checkpointing them every
/// epoch; `options` NULL means the defaults. On success `*process` is the handle.
///
/// # Safety
///
/// `sizes` is NULL or points to `count` readable `size_t`; `options` is NULL or points
/// to a readable `fgbi_options`; `process` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_protect(
    sizes: *const usize,
    count: usize,
    options: *const FgbiOptions,
    process: *mut *mut FgbiProcess,
) -> c_int {
    call("fgbi_protect", || {
        let out = required(process, "process")?;
        let sizes = required(sizes, "sizes")?;
        // SAFETY: not NULL, and `count` readable elements per the contract.
        let sizes = unsafe { std::slice::from_raw_parts(sizes.as_ptr(), count) };
        // SAFETY: NULL or readable per the contract; every bit pattern is valid.
        let options = match unsafe { options.as_ref() } {
            // SAFETY: its strings are NULL or NUL-terminated per the contract.
            Some(options) => unsafe { options.to_replicator() }?,
            None => ReplicatorOptions::default(),
        };
        if let Err(HypError::Layout(why)) = layout(sizes) {
            return Err(Error::Invalid(format!(
                "cannot protect regions of {sizes:?} bytes ({why}): pass at least one \
                 size, none of them 0"
            )));
        }
        let mut restart = Restart::from_env().map_err(Error::Restart)?;
        let started = match &restart {
            Some(restart) => check_layout(restart, sizes),
            None => Ok(()),
        }
        .and_then(|()| {
            match &restart {
                // The replica taken over, and its record, are in place before the
                // first checkpoint: no checkpoint of this process lacks them.
                Some(restart) => {
                    Replicator::start_from(sizes, options, |handle| take_over(restart, handle))
                }
                None => Replicator::start(sizes, options),
            }
            .map_err(Error::from)
        });
        let (handle, replicator) = match started {
            Ok(started) => started,
            Err(e) => {
                if let Some(restart) = &mut restart {
                    // The readiness pipe stays open until the process exits: the
                    // backup then reports its exit status after the program's own
                    // messages, instead of killing it before it can print them.
                    std::mem::forget(restart.take_ready());
                }
                return Err(e);
            }
        };
        let taken_over = restart.map(|mut restart| TakenOver {
            epoch: restart.epoch(),
            record: restart.record().to_vec(),
            ready: Mutex::new(Some(restart.take_ready())),
        });
        let handle = publish(FgbiProcess {
            handle,
            replicator: Mutex::new(Some(replicator)),
            taken_over,
        });
        // SAFETY: not NULL, and valid for writes per the contract.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Copies the regions of the replica `restart` into the regions of `handle`, newly
/// protected (of the same sizes: [`check_layout`]), and sets its restart record.
fn take_over(restart: &Restart, handle: &ProcessHandle) {
    for index in 0..restart.regions() {
        if let (Some(from), Some((to, len))) = (restart.region(index), handle.region(index)) {
            // SAFETY: region `index` is `len` writable bytes that nothing else touches
            // yet (no thread is registered, no checkpoint has started), and
            // `check_layout` made `from` `len` bytes too.
            unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), to, len) };
        }
    }
    handle.set_state(restart.record());
}

/// Checks that the replica `restart` holds regions of `sizes` bytes, those the
/// program protects.
fn check_layout(restart: &Restart, sizes: &[usize]) -> Result<(), Error> {
    let replica: Vec<usize> = (0..restart.regions())
        .filter_map(|index| restart.region(index).map(<[u8]>::len))
        .collect();
    if replica != sizes {
        return Err(Error::Invalid(format!(
            "this program was restarted by `fgbi backup --restart` from a replica of \
             regions of {replica:?} bytes, but asks to protect regions of {sizes:?}: \
             restart the program the primary ran, with the same arguments"
        )));
    }
    Ok(())
}

/// Sets `*base` and `*len` to where protected region `index` lies: zero-filled at
/// first, writable by the process's registered threads, valid until
/// `fgbi_process_free`.
///
/// # Safety
///
/// `base` and `len` are NULL or valid for writing a pointer and a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_region(
    process: *const FgbiProcess,
    index: usize,
    base: *mut *mut c_void,
    len: *mut usize,
) -> c_int {
    call("fgbi_region", || {
        let (base, len) = (required(base, "base")?, required(len, "len")?);
        let process = lookup(process, "process", false)?;
        let (start, bytes) = process.handle.region(index).ok_or_else(|| {
            Error::Invalid(format!(
                "region {index} does not exist: the process has {} regions, numbered from 0",
                process.handle.regions()
            ))
        })?;
        // SAFETY: neither is NULL, and both are valid for writes per the contract.
        unsafe {
            base.write(start.cast());
            len.write(bytes);
        }
        Ok(())
    })
}

/// Registers the calling thread, under `name` (used in error messages), as a writer
/// of protected memory. If a checkpoint is being taken, waits for it to end first.
///
/// # Safety
///
/// `name` is NULL or a NUL-terminated string; `safepoint` is NULL or valid for
/// writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_safepoint_register(
    process: *const FgbiProcess,
    name: *const c_char,
    safepoint: *mut *mut FgbiSafepoint,
) -> c_int {
    call("fgbi_safepoint_register", || {
        let out = required(safepoint, "safepoint")?;
        let name = required(name, "name")?;
        // SAFETY: not NULL, and NUL-terminated per the contract.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy();
        let process = lookup(process, "process", false)?;
        let handle = publish(FgbiSafepoint {
            safepoint: process.handle.register(&name),
            outside: AtomicBool::new(false),
        });
        // SAFETY: not NULL, and valid for writes per the contract.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// A consistent point of the calling thread: parks here while a checkpoint is taken.
/// Costs one atomic load when none is pending, and does not validate the handle
/// beyond NULL.
///
/// # Safety
///
/// `safepoint` is NULL or a handle from `fgbi_safepoint_register` not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_safepoint_pass(safepoint: *const FgbiSafepoint) -> c_int {
    call("fgbi_safepoint_pass", || {
        let safepoint = required(safepoint, "safepoint")?;
        // SAFETY: per the contract, a live handle: the address of an `FgbiSafepoint`
        // the registry keeps alive until `fgbi_safepoint_free`.
        unsafe { safepoint.as_ref() }.safepoint.pass();
        Ok(())
    })
}

/// Starts a wait outside protected memory (a blocking receive, a barrier): until
/// `fgbi_safepoint_leave_outside`, the thread counts as stopped and must not touch
/// protected memory nor pass its safepoint.
#[unsafe(no_mangle)]
pub extern "C" fn fgbi_safepoint_enter_outside(safepoint: *const FgbiSafepoint) -> c_int {
    call("fgbi_safepoint_enter_outside", || {
        step_outside(safepoint, true)
    })
}

/// Ends the wait begun by `fgbi_safepoint_enter_outside`; parks first if a checkpoint
/// is being taken.
#[unsafe(no_mangle)]
pub extern "C" fn fgbi_safepoint_leave_outside(safepoint: *const FgbiSafepoint) -> c_int {
    call("fgbi_safepoint_leave_outside", || {
        step_outside(safepoint, false)
    })
}

/// Moves the thread of `safepoint` outside protected memory, or back in.
fn step_outside(safepoint: *const FgbiSafepoint, outside: bool) -> Result<(), Error> {
    let safepoint = lookup(safepoint, "safepoint", false)?;
    if safepoint.outside.swap(outside, Ordering::Relaxed) == outside {
        return Err(Error::State(if outside {
            "the thread is already outside: call fgbi_safepoint_leave_outside first"
        } else {
            "the thread is not outside: call fgbi_safepoint_enter_outside first"
        }));
    }
    if outside {
        safepoint.safepoint.enter_outside();
    } else {
        safepoint.safepoint.leave_outside();
    }
    Ok(())
}

/// Unregisters the thread: call it before the thread exits or calls `fgbi_finish`.
#[unsafe(no_mangle)]
pub extern "C" fn fgbi_safepoint_free(safepoint: *mut FgbiSafepoint) -> c_int {
    call("fgbi_safepoint_free", || {
        lookup(safepoint, "safepoint", true).map(drop)
    })
}

/// Sets the restart record (`len` bytes at `data`; `data` may be NULL if `len` is 0)
/// that travels with the next checkpoints. Call it where the thread's state is
/// consistent, just before passing its safepoint.
///
/// # Safety
///
/// `data` is NULL or points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_set_state(
    process: *const FgbiProcess,
    data: *const c_void,
    len: usize,
) -> c_int {
    call("fgbi_set_state", || {
        let process = lookup(process, "process", false)?;
        let record = if len == 0 {
            &[][..]
        } else {
            let data = required(data.cast::<u8>(), "data")?;
            // SAFETY: not NULL, and `len` readable bytes per the contract.
            unsafe { std::slice::from_raw_parts(data.as_ptr(), len) }
        };
        process.handle.set_state(record);
        Ok(())
    })
}

/// Takes a final checkpoint (verified, for an in-process replica), stops
/// checkpointing, and returns what protection did in `*summary` and the in-process
/// replica in `*replica`; with a remote backup, which holds the replica, `*replica`
/// is NULL. Every registered thread must have freed its safepoint, or be outside, so
/// the final stop completes. The process's regions stay readable until
/// `fgbi_process_free`.
///
/// # Safety
///
/// `summary` and `replica` are NULL or valid for writing an `fgbi_summary` and a
/// pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_finish(
    process: *const FgbiProcess,
    summary: *mut FgbiSummary,
    replica: *mut *mut FgbiReplica,
) -> c_int {
    call("fgbi_finish", || {
        let (summary, replica) = (required(summary, "summary")?, required(replica, "replica")?);
        let process = lookup(process, "process", false)?;
        let replicator = process
            .replicator
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or(Error::State(
                "protection has already finished: call fgbi_finish once per process",
            ))?;
        let done = replicator.finish()?;
        let totals = FgbiSummary::from(&done);
        // The replica stays on a remote backup: none is handed back.
        let handle = match done.replica {
            Some(view) => publish(FgbiReplica(Mutex::new(view))),
            None => std::ptr::null_mut(),
        };
        // SAFETY: neither is NULL, and both are valid for writes per the contract.
        unsafe {
            summary.write(totals);
            replica.write(handle);
        }
        Ok(())
    })
}

/// Whether `fgbi_protect` took over a replica (the process was started by `fgbi
/// backup --restart`): `*restarted` 1, `*epoch` the epoch the replica held, `*data`
/// and `*len` its restart record (valid until `fgbi_process_free`); else
/// `*restarted` 0, `*epoch` 0, `*data` NULL and `*len` 0.
///
/// # Safety
///
/// `restarted`, `epoch`, `data` and `len` are NULL or valid for writing an `int`, a
/// `uint64_t`, a pointer and a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_restart_record(
    process: *const FgbiProcess,
    restarted: *mut c_int,
    epoch: *mut u64,
    data: *mut *const c_void,
    len: *mut usize,
) -> c_int {
    call("fgbi_restart_record", || {
        let (restarted, epoch) = (required(restarted, "restarted")?, required(epoch, "epoch")?);
        let (data, len) = (required(data, "data")?, required(len, "len")?);
        let process = lookup(process, "process", false)?;
        let (yes, at, record) = match &process.taken_over {
            Some(taken) => (1, taken.epoch, &taken.record[..]),
            None => (0, 0, &[][..]),
        };
        let start = if yes == 1 {
            record.as_ptr().cast()
        } else {
            std::ptr::null()
        };
        // SAFETY: none is NULL, and all are valid for writes per the contract; the
        // record lives as long as the process, which the registry keeps until
        // `fgbi_process_free`.
        unsafe {
            restarted.write(yes);
            epoch.write(at);
            data.write(start);
            len.write(record.len());
        }
        Ok(())
    })
}

/// Tells `fgbi backup`, which restarted this process, that it serves again: sends
/// `message` (one line; newlines become spaces), which the backup prints after
/// `restarted pid=P`. The first call sends; later ones, and calls in a process that
/// was not restarted, do nothing.
///
/// # Safety
///
/// `message` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_ready(process: *const FgbiProcess, message: *const c_char) -> c_int {
    call("fgbi_ready", || {
        let message = required(message, "message")?;
        // SAFETY: not NULL, and NUL-terminated per the contract.
        let message = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy();
        let process = lookup(process, "process", false)?;
        let ready = process.taken_over.as_ref().and_then(|taken| {
            taken
                .ready
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        });
        match ready {
            Some(ready) => ready.send(&message).map_err(Error::Restart),
            None => Ok(()),
        }
    })
}

/// Frees the process and unmaps its regions. If `fgbi_finish` was not called, stops
/// checkpointing first (a final checkpoint, whose summary and replica are discarded,
/// and whose failure is returned; the process is freed regardless).
#[unsafe(no_mangle)]
pub extern "C" fn fgbi_process_free(process: *mut FgbiProcess) -> c_int {
    call("fgbi_process_free", || {
        let process = lookup(process, "process", true)?;
        let running = process
            .replicator
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match running {
            Some(replicator) => replicator.finish().map(drop).map_err(Error::from),
            None => Ok(()),
        }
    })
}

/// Sets `*base` and `*len` to the replica of region `index`, valid until
/// `fgbi_replica_free`.
///
/// # Safety
///
/// `base` and `len` are NULL or valid for writing a pointer and a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_replica_region(
    replica: *const FgbiReplica,
    index: usize,
    base: *mut *const c_void,
    len: *mut usize,
) -> c_int {
    call("fgbi_replica_region", || {
        let (base, len) = (required(base, "base")?, required(len, "len")?);
        let replica = lookup(replica, "replica", false)?;
        let view = replica.view();
        let region = view.region(index).ok_or_else(|| {
            Error::Invalid(format!(
                "the replica has no region {index}: it has {}, numbered from 0",
                view.regions()
            ))
        })?;
        // SAFETY: neither is NULL, and both are valid for writes per the contract.
        unsafe {
            base.write(region.as_ptr().cast());
            len.write(region.len());
        }
        Ok(())
    })
}

/// Sets `*data` and `*len` to the restart record committed with the final
/// checkpoint, valid until `fgbi_replica_free`.
///
/// # Safety
///
/// `data` and `len` are NULL or valid for writing a pointer and a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fgbi_replica_state(
    replica: *const FgbiReplica,
    data: *mut *const c_void,
    len: *mut usize,
) -> c_int {
    call("fgbi_replica_state", || {
        let (data, len) = (required(data, "data")?, required(len, "len")?);
        let replica = lookup(replica, "replica", false)?;
        let view = replica.view();
        let state = view.state();
        // SAFETY: neither is NULL, and both are valid for writes per the contract.
        unsafe {
            data.write(state.as_ptr().cast());
            len.write(state.len());
        }
        Ok(())
    })
}

/// Frees the replica.
#[unsafe(no_mangle)]
pub extern "C" fn fgbi_replica_free(replica: *mut FgbiReplica) -> c_int {
    call("fgbi_replica_free", || {
        lookup(replica, "replica", true).map(drop)
    })
}
