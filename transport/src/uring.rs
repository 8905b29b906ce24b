//! The io_uring paths; all of the transport's `unsafe` lives here.
//!
//! Two rules make the raw buffers sound:
//!
//! 1. **At most one operation is in flight, and no function returns before its
//!    completion has been reaped.** When the wait for a completion times out or
//!    fails, the socket is shut down (which completes any pending send or read at
//!    once) and the completion is reaped anyway; if even that is impossible the
//!    process aborts rather than return while the kernel may still touch a buffer.
//!    So every buffer a submission points to (stack `msghdr`, iovecs, the epoch's
//!    parts, a receive slot) outlives the operation.
//! 2. **Registered memory is borrowed for the ring's whole life.** [`UringReceiver`]
//!    holds the region's exclusive borrow for `'r` and owns the ring, so the
//!    registration (dropped with the ring) ends before the borrow does, and no Rust
//!    reference to the region exists while a read into it is in flight.

use std::io::{self, IoSlice};
use std::marker::PhantomData;
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, types};

use crate::control::{Inbound, mid_epoch};
use crate::error::TransportError;

/// Largest registered buffer the kernel accepts; the region is registered in pieces.
const PIECE_BYTES: usize = 1 << 30;

/// Most iovecs one `sendmsg` takes (IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Slowest send rate tolerated before a send counts as stalled: a send of `n` bytes
/// may take the liveness timeout plus `n` at this rate.
const MIN_SEND_BYTES_PER_SEC: u64 = 64 << 20;

fn setup(what: &'static str, needs: &[(u8, &'static str)]) -> Result<IoUring, TransportError> {
    let uring = |what, source| TransportError::Uring { what, source };
    let ring = IoUring::new(8).map_err(|e| uring(what, e))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| uring("probing io_uring operations", e))?;
    for &(code, name) in needs {
        if !probe.is_supported(code) {
            return Err(uring(
                name,
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "operation not supported by this kernel",
                ),
            ));
        }
    }
    Ok(ring)
}

const SEND_OPS: [(u8, &str); 1] = [(opcode::SendMsg::CODE, "IORING_OP_SENDMSG")];
const RECEIVE_OPS: [(u8, &str); 1] = [(opcode::ReadFixed::CODE, "IORING_OP_READ_FIXED")];

/// Checks that a ring can be set up and runs every operation the transport submits.
pub(crate) fn probe() -> Result<(), TransportError> {
    setup("setting up an io_uring", &SEND_OPS)?;
    setup("setting up an io_uring", &RECEIVE_OPS).map(drop)
}

/// Waits for the completion of the one operation in flight and returns its result.
///
/// On timeout (`wait`) or failure the socket is shut down and the completion reaped
/// before returning, so nothing is in flight afterwards.
fn complete(
    ring: &mut IoUring,
    stream: &TcpStream,
    wait: Duration,
    reported: Duration,
) -> Result<i32, TransportError> {
    let ts = types::Timespec::from(wait);
    let args = types::SubmitArgs::new().timespec(&ts);
    loop {
        if let Some(cqe) = ring.completion().next() {
            return Ok(cqe.result());
        }
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if is_retry(&e) => {}
            Err(e) => {
                if let Some(cqe) = ring.completion().next() {
                    return Ok(cqe.result());
                }
                // Completes the operation in flight promptly; the connection is over.
                let _ = stream.shutdown(Shutdown::Both);
                reap(ring);
                return Err(if e.raw_os_error() == Some(libc::ETIME) {
                    TransportError::PeerTimeout(reported)
                } else {
                    TransportError::Io {
                        what: "waiting for an io_uring completion",
                        source: e,
                    }
                });
            }
        }
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// Reaps the completion of the operation in flight, however long it takes.
fn reap(ring: &mut IoUring) {
    loop {
        if ring.completion().next().is_some() {
            return;
        }
        match ring.submitter().submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if is_retry(&e) => {}
            // The kernel may still write into or read from our buffers: returning
            // would be unsound, and there is no way to wait any more.
            Err(_) => std::process::abort(),
        }
    }
}

/// An errno from a completion as an error of `what`.
fn errno(what: &'static str, res: i32, timeout: Duration) -> TransportError {
    TransportError::from_io(what, io::Error::from_raw_os_error(-res), timeout)
}

/// Sends an epoch's parts with one `SendMsg` submission each (up to 1024 parts).
pub(crate) struct UringSender {
    ring: IoUring,
}

impl UringSender {
    /// Sets up a small ring and checks that it supports `SendMsg`.
    pub(crate) fn new() -> Result<Self, TransportError> {
        Ok(Self {
            ring: setup("setting up the primary's io_uring", &SEND_OPS)?,
        })
    }

    /// Sends every byte of `slices` on `stream`, in order.
    pub(crate) fn send_all(
        &mut self,
        stream: &TcpStream,
        mut slices: &mut [IoSlice<'_>],
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let fd = types::Fd(stream.as_raw_fd());
        while !slices.is_empty() {
            let count = slices.len().min(MAX_IOVECS);
            let bytes: usize = slices[..count].iter().map(|s| s.len()).sum();
            // SAFETY: msghdr is a plain C struct of integers and pointers, for which
            // all-zero is a valid value (no name, no control data, no flags).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            // IoSlice is guaranteed ABI-compatible with iovec on Unix.
            msg.msg_iov = slices.as_mut_ptr().cast::<libc::iovec>();
            msg.msg_iovlen = count;
            let sqe = opcode::SendMsg::new(fd, &msg)
                .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
                .build();
            // SAFETY: the entry points to `msg`, which points to `slices[..count]`,
            // which borrow the bytes to send; all of them live until `complete`
            // returns, and it returns only after this operation's completion was
            // reaped (rule 1 of the module). The ring is empty, so the push succeeds.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_err() {
                return Err(TransportError::Io {
                    what: "queueing an io_uring send",
                    source: io::Error::other("submission queue full"),
                });
            }
            let budget =
                timeout + Duration::from_secs_f64(bytes as f64 / MIN_SEND_BYTES_PER_SEC as f64);
            let res = complete(&mut self.ring, stream, budget, timeout)?;
            if res < 0 {
                return Err(errno("sending an epoch with io_uring", res, timeout));
            }
            let sent = res as usize;
            if sent == 0 || sent > bytes {
                return Err(TransportError::Io {
                    what: "sending an epoch with io_uring",
                    source: io::Error::other(format!("sendmsg reported {sent} of {bytes} bytes")),
                });
            }
            IoSlice::advance_slices(&mut slices, sent);
        }
        Ok(())
    }
}

/// Reads payloads with `ReadFixed` straight into the registered receive region.
pub(crate) struct UringReceiver<'r> {
    ring: IoUring,
    base: NonNull<u8>,
    len: usize,
    _region: PhantomData<&'r mut [u8]>,
}

impl<'r> UringReceiver<'r> {
    /// Sets up a ring and registers `region` with it, in pieces of at most 1 GiB.
    pub(crate) fn new(region: &'r mut [u8]) -> Result<Self, TransportError> {
        let ring = setup("setting up the backup's io_uring", &RECEIVE_OPS)?;
        let len = region.len();
        let base = NonNull::from(region).cast::<u8>();
        let iovecs: Vec<libc::iovec> = (0..len)
            .step_by(PIECE_BYTES)
            .map(|at| libc::iovec {
                // `at < len`, so the pointer stays inside the region.
                iov_base: base.as_ptr().wrapping_add(at).cast(),
                iov_len: PIECE_BYTES.min(len - at),
            })
            .collect();
        // SAFETY: the iovecs cover `region`, which is exclusively borrowed for 'r.
        // The ring, and with it the registration, is owned by `Self` and dropped
        // within 'r; the kernel writes into the region only for reads submitted by
        // `read_exact`, each reaped before it returns (module rules 1 and 2).
        unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|source| {
            TransportError::Uring {
                what: "registering the receive region with io_uring",
                source,
            }
        })?;
        Ok(Self {
            ring,
            base,
            len,
            _region: PhantomData,
        })
    }

    /// Reads exactly `range.len()` bytes from `stream` into `range` of the region.
    pub(crate) fn read_exact(
        &mut self,
        stream: &TcpStream,
        range: Range<usize>,
        inbound: &mut Inbound,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        if range.end > self.len || range.start > range.end {
            return Err(TransportError::Io {
                what: "reading into the receive region",
                source: io::Error::other("range outside the region"),
            });
        }
        let fd = types::Fd(stream.as_raw_fd());
        let mut at = range.start;
        while at < range.end {
            let piece = at / PIECE_BYTES;
            let piece_end = ((piece + 1) * PIECE_BYTES).min(self.len);
            let n = (range.end - at).min(piece_end - at);
            // Bytes may have queued while this side was busy: always wait a little.
            let wait = inbound.silence_left().max(Duration::from_millis(1));
            // `at < self.len`, so the pointer stays inside the registered region.
            let dest = self.base.as_ptr().wrapping_add(at);
            let sqe = opcode::ReadFixed::new(fd, dest, n as u32, piece as u16).build();
            // SAFETY: `dest..dest + n` lies inside registered piece `piece` (n stops
            // at the piece's end, and pieces are at most 1 GiB so `n` fits u32). No
            // Rust reference to the region exists while the read is in flight
            // (`bytes` borrows `self`, which this `&mut self` excludes), and
            // `complete` reaps the completion before returning (module rule 1).
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_err() {
                return Err(TransportError::Io {
                    what: "queueing an io_uring read",
                    source: io::Error::other("submission queue full"),
                });
            }
            let res = complete(&mut self.ring, stream, wait, timeout).map_err(mid_epoch)?;
            if res < 0 {
                return Err(mid_epoch(errno(
                    "reading an epoch with io_uring",
                    res,
                    timeout,
                )));
            }
            if res == 0 {
                return Err(TransportError::PeerClosed(" in the middle of an epoch"));
            }
            inbound.heard();
            at += res as usize;
        }
        Ok(())
    }

    /// The received bytes in `range` (inside the region).
    pub(crate) fn bytes(&self, range: Range<usize>) -> &[u8] {
        let range = range.start.min(self.len)..range.end.min(self.len);
        // SAFETY: the range lies inside the region, which is borrowed for 'r and
        // valid. No read is in flight (each is reaped before `read_exact` returns),
        // and the returned slice borrows `self`, so none can start while it lives.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(range.start),
                range.end.saturating_sub(range.start),
            )
        }
    }
}
