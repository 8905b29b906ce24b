//! The writing side of a connection, and the thread that keeps it alive.
//!
//! All writes to a connection go through one lock. A background thread takes it
//! every heartbeat interval, if nobody else holds it, and writes a HEARTBEAT; while
//! the owner holds it (sending an epoch, an ACK), the bytes it sends prove liveness
//! on their own. One lock means messages never interleave on the stream.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::{self, JoinHandle};

use crate::config::Liveness;
use crate::control::Control;
use crate::error::TransportError;

struct Shared {
    writer: Mutex<TcpStream>,
    stop: AtomicBool,
}

/// The writing side: the write lock and the heartbeat thread.
pub(crate) struct Outbound {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    liveness: Liveness,
}

impl Outbound {
    /// Takes `writer` (a handle of its own), bounds its blocking writes by the
    /// liveness timeout, and starts the heartbeat thread.
    pub(crate) fn start(writer: TcpStream, liveness: Liveness) -> Result<Self, TransportError> {
        writer
            .set_write_timeout(Some(liveness.timeout))
            .map_err(|source| TransportError::Io {
                what: "setting the socket's send timeout",
                source,
            })?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            stop: AtomicBool::new(false),
        });
        let beat = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("fgbi-heartbeat".into())
            .spawn(move || {
                while !beat.stop.load(Ordering::Acquire) {
                    thread::park_timeout(liveness.interval);
                    if beat.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let mut writer = match beat.writer.try_lock() {
                        Ok(w) => w,
                        Err(TryLockError::WouldBlock) => continue,
                        Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    };
                    if writer.write_all(&Control::heartbeat().encode()).is_err() {
                        // The owner finds out on its next read or write.
                        break;
                    }
                }
            })
            .map_err(|source| TransportError::Io {
                what: "starting the heartbeat thread",
                source,
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
            liveness,
        })
    }

    /// The write lock: hold it for the whole of a multi-part send.
    pub(crate) fn lock(&self) -> MutexGuard<'_, TcpStream> {
        self.shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one control message.
    pub(crate) fn send(&self, message: &Control) -> Result<(), TransportError> {
        self.lock()
            .write_all(&message.encode())
            .map_err(|e| TransportError::from_io("sending to the peer", e, self.liveness.timeout))
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            // The thread never panics; a failed join leaves nothing to clean up.
            let _ = thread.join();
        }
    }
}
