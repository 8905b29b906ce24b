//! The io_uring paths; all of the transport's `unsafe` lives here.
//!
//! Two rules make the raw buffers sound:
//!
//! 1. **No function returns before the completion of every operation it submitted
//!    has been reaped.** When the wait for a send's completion times out or fails,
//!    the socket is shut down (which completes the pending send at once) and the
//!    completion is reaped anyway; a receive that times out is cancelled, which
//!    completes it at once, and reaped. If even waiting is impossible the process
//!    aborts rather than return while the kernel may still touch a buffer. So every
//!    buffer a submission points to (stack `msghdr`, iovecs, the epoch's parts, a
//!    receive slot, a control message) outlives the operation.
//! 2. **The receive region is borrowed for the receiver's whole life.**
//!    [`UringReceiver`] holds the region's exclusive borrow for `'r`, so no Rust
//!    reference to the region exists while a receive into it is in flight, and the
//!    received bytes are handed out only as slices borrowing the receiver.

use std::io::{self, IoSlice};
use std::marker::PhantomData;
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, types};

use crate::control::{CONTROL_BYTES, Inbound, mid_epoch};
use crate::error::TransportError;

/// Most payload bytes one receive asks for (its result must fit an `i32`).
const MAX_RECV_BYTES: usize = 1 << 30;

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
const RECEIVE_OPS: [(u8, &str); 2] = [
    (opcode::RecvMsg::CODE, "IORING_OP_RECVMSG"),
    (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
];

/// Checks that a ring can be set up and runs every operation the transport submits.
pub(crate) fn probe() -> Result<(), TransportError> {
    setup("setting up an io_uring", &SEND_OPS)?;
    setup("setting up an io_uring", &RECEIVE_OPS).map(drop)
}

/// The results of operations submitted together, indexed by their `user_data`.
struct Completions<const N: usize> {
    results: [i32; N],
    reaped: usize,
}

impl<const N: usize> Completions<N> {
    fn new() -> Self {
        Self {
            results: [0; N],
            reaped: 0,
        }
    }

    /// Takes every completion the ring holds.
    fn take(&mut self, ring: &mut IoUring) {
        for cqe in ring.completion() {
            self.results[cqe.user_data() as usize] = cqe.result();
            self.reaped += 1;
        }
    }

    /// Waits up to `wait` until all `N` have completed.
    fn wait(&mut self, ring: &mut IoUring, wait: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(wait);
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            self.take(ring);
            if self.reaped == N {
                return Ok(());
            }
            match ring.submitter().submit_with_args(N - self.reaped, &args) {
                Ok(_) => {}
                Err(e) if is_retry(&e) => {}
                Err(e) => {
                    self.take(ring);
                    return if self.reaped == N { Ok(()) } else { Err(e) };
                }
            }
        }
    }

    /// Waits until all `N` have completed, however long it takes.
    fn reap(&mut self, ring: &mut IoUring) {
        loop {
            self.take(ring);
            if self.reaped == N {
                return;
            }
            match ring.submitter().submit_and_wait(N - self.reaped) {
                Ok(_) => {}
                Err(e) if is_retry(&e) => {}
                // The kernel may still write into or read from our buffers: returning
                // would be unsound, and there is no way to wait any more.
                Err(_) => std::process::abort(),
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

/// The error for a failed wait: `PeerTimeout(reported)` if it timed out.
fn wait_error(e: io::Error, reported: Duration) -> TransportError {
    if e.raw_os_error() == Some(libc::ETIME) {
        TransportError::PeerTimeout(reported)
    } else {
        TransportError::Io {
            what: "waiting for an io_uring completion",
            source: e,
        }
    }
}

/// Waits up to `wait` for the completion of the one send in flight and returns its
/// result. On timeout or failure the socket is shut down, which completes the send
/// at once, and the completion is reaped before returning.
fn complete_send(
    ring: &mut IoUring,
    stream: &TcpStream,
    wait: Duration,
    reported: Duration,
) -> Result<i32, TransportError> {
    let mut done = Completions::<1>::new();
    if let Err(e) = done.wait(ring, wait) {
        // Completes the send promptly; the connection is over.
        let _ = stream.shutdown(Shutdown::Both);
        done.reap(ring);
        return Err(wait_error(e, reported));
    }
    Ok(done.results[0])
}

/// `user_data` of a receive, and of the cancellation that may follow it.
const RECEIVE: u64 = 0;
const CANCEL: u64 = 1;

/// Waits up to `wait` for the completion of the one receive in flight (`RECEIVE`) and
/// returns its result. If it does not come in time, the receive is cancelled: it then
/// completes at once with the bytes it had received (or `-ECANCELED` if none), which
/// is returned. On any other failure the socket is shut down and the completion
/// reaped before returning.
fn complete_receive(
    ring: &mut IoUring,
    stream: &TcpStream,
    wait: Duration,
    reported: Duration,
) -> Result<i32, TransportError> {
    let mut done = Completions::<1>::new();
    match done.wait(ring, wait) {
        Ok(()) => return Ok(done.results[0]),
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
        Err(e) => {
            let _ = stream.shutdown(Shutdown::Both);
            done.reap(ring);
            return Err(wait_error(e, reported));
        }
    }
    let cancel = opcode::AsyncCancel::new(RECEIVE).build().user_data(CANCEL);
    // SAFETY: a cancellation points to no buffer. The ring holds only the receive.
    if unsafe { ring.submission().push(&cancel) }.is_err() {
        let _ = stream.shutdown(Shutdown::Both);
        done.reap(ring);
        return Err(TransportError::PeerTimeout(reported));
    }
    let mut both = Completions::<2>::new();
    both.reap(ring);
    Ok(both.results[RECEIVE as usize])
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
            let res = complete_send(&mut self.ring, stream, budget, timeout)?;
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

/// Receives payloads with `RecvMsg` (`MSG_WAITALL`) straight into the receive
/// region, together with the control message that follows each.
pub(crate) struct UringReceiver<'r> {
    ring: IoUring,
    base: NonNull<u8>,
    len: usize,
    _region: PhantomData<&'r mut [u8]>,
}

impl<'r> UringReceiver<'r> {
    /// Sets up a small ring for receiving into `region`.
    pub(crate) fn new(region: &'r mut [u8]) -> Result<Self, TransportError> {
        let ring = setup("setting up the backup's io_uring", &RECEIVE_OPS)?;
        Ok(Self {
            ring,
            len: region.len(),
            base: NonNull::from(region).cast::<u8>(),
            _region: PhantomData,
        })
    }

    /// Receives the `range.len()` payload bytes from `stream` into `range` of the
    /// region, then the control message that follows them, which it returns.
    ///
    /// One `RecvMsg` with `MSG_WAITALL`, whose iovecs are the slot and the message,
    /// takes both: the kernel keeps receiving until every byte is in, so an epoch
    /// costs one system call here however it arrives. Liveness is checked every
    /// heartbeat interval: a receive still incomplete then is cancelled (the bytes it
    /// took count as hearing from the peer) and resubmitted for the rest.
    pub(crate) fn read_payload_and_message(
        &mut self,
        stream: &TcpStream,
        range: Range<usize>,
        inbound: &mut Inbound,
        timeout: Duration,
    ) -> Result<[u8; CONTROL_BYTES], TransportError> {
        if range.end > self.len || range.start >= range.end {
            return Err(TransportError::Io {
                what: "reading into the receive region",
                source: io::Error::other("range empty or outside the region"),
            });
        }
        let fd = types::Fd(stream.as_raw_fd());
        let mut message = [0u8; CONTROL_BYTES];
        let mut at = range.start;
        let mut message_at = 0;
        while message_at < CONTROL_BYTES {
            let n = (range.end - at).min(MAX_RECV_BYTES);
            let last = at + n == range.end;
            let mut iovecs = [
                libc::iovec {
                    // `at <= self.len`, so the pointer stays inside (or one past) the region.
                    iov_base: self.base.as_ptr().wrapping_add(at).cast(),
                    iov_len: n,
                },
                libc::iovec {
                    iov_base: message[message_at..].as_mut_ptr().cast(),
                    iov_len: CONTROL_BYTES - message_at,
                },
            ];
            // SAFETY: msghdr is a plain C struct of integers and pointers, for which
            // all-zero is a valid value (no name, no control data, no flags).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovecs.as_mut_ptr();
            msg.msg_iovlen = if last { 2 } else { 1 };
            let sqe = opcode::RecvMsg::new(fd, &mut msg)
                .flags(libc::MSG_WAITALL as u32)
                .build()
                .user_data(RECEIVE);
            // SAFETY: the entry points to `msg`, which points to `iovecs`: bytes
            // `at..at + n` of the region (inside it: `range.end <= self.len`) and the
            // rest of `message`. All of them live until `complete_receive` returns,
            // and it returns only after the receive's completion was reaped (module
            // rule 1); no Rust reference to the region exists meanwhile (rule 2).
            // The ring is empty, so the push succeeds.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                return Err(TransportError::Io {
                    what: "queueing an io_uring receive",
                    source: io::Error::other("submission queue full"),
                });
            }
            let wait = inbound.wait_slice();
            let res = complete_receive(&mut self.ring, stream, wait, timeout).map_err(mid_epoch)?;
            if res == -libc::ECANCELED {
                // Nothing arrived during this wait.
                if inbound.silence_left().is_zero() {
                    return Err(TransportError::PeerTimeout(timeout));
                }
                continue;
            }
            if res < 0 {
                return Err(mid_epoch(errno(
                    "receiving an epoch with io_uring",
                    res,
                    timeout,
                )));
            }
            if res == 0 {
                return Err(TransportError::PeerClosed(" in the middle of an epoch"));
            }
            inbound.heard();
            let res = res as usize;
            let payload = res.min(range.end - at);
            at += payload;
            message_at += res - payload;
        }
        Ok(message)
    }

    /// The received bytes in `range` (inside the region).
    pub(crate) fn bytes(&self, range: Range<usize>) -> &[u8] {
        let range = range.start.min(self.len)..range.end.min(self.len);
        // SAFETY: the range lies inside the region, which is borrowed for 'r and
        // valid. No receive is in flight (each is reaped before
        // `read_payload_and_message` returns), and the returned slice borrows `self`,
        // so none can start while it lives.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(range.start),
                range.end.saturating_sub(range.start),
            )
        }
    }
}
