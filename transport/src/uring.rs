//! The io_uring paths; all of the transport's `unsafe` lives here.
//!
//! Three rules make the raw buffers sound:
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
//!    received bytes are handed out only as slices borrowing the receiver. Bytes
//!    received ahead of the message being parsed stay in the region and are moved
//!    with raw copies, between operations, inside the region's bounds.
//! 3. **A ring is only entered by the thread that set it up.** Rings are set up with
//!    `SINGLE_ISSUER | DEFER_TASKRUN`: the kernel refuses submissions from any other
//!    thread, and runs the work that completes an operation only inside its
//!    creator's `io_uring_enter`. [`ThreadRing`] sets its ring up again when a call
//!    comes from another thread (a `Primary` may move between threads); by rule 1
//!    nothing is in flight between calls, so the old ring is simply closed.

use std::io::{self, IoSlice};
use std::marker::PhantomData;
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::ptr::{self, NonNull};
use std::thread::{self, ThreadId};
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, types};

use crate::control::{CONTROL_BYTES, Inbound, mid_epoch};
use crate::error::TransportError;
use crate::region::ReceiveRegion;

/// Entries of each ring: at most a receive and its cancellation are ever queued.
const ENTRIES: u32 = 8;

/// Most payload bytes one receive asks for (its result must fit an `i32`).
const MAX_RECV_BYTES: usize = 1 << 30;

/// Most bytes a receive that does not yet know the epoch's length takes beyond the
/// control message (at most the slot): it may take bytes of later messages, which are
/// then copied once, so this bounds that copy.
const AHEAD_BYTES: usize = 256 << 10;

/// Most iovecs one `sendmsg` takes (IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Slowest send rate tolerated before a send counts as stalled: a send of `n` bytes
/// may take the liveness timeout plus `n` at this rate.
const MIN_SEND_BYTES_PER_SEC: u64 = 64 << 20;

/// A receive's `ioprio` flag: arm the poll before the first attempt (linux/io_uring.h;
/// the io-uring crate does not export it).
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

/// Sets up a ring for the calling thread and checks that it runs the operations in
/// `needs`.
fn setup(what: &'static str, needs: &[(u8, &'static str)]) -> Result<IoUring, TransportError> {
    let uring = |what, source| TransportError::Uring { what, source };
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(ENTRIES)
        .or_else(|e| match e.raw_os_error() {
            // Kernels before 6.1 lack DEFER_TASKRUN: a plain ring works the same, a
            // little slower.
            Some(libc::EINVAL) => IoUring::new(ENTRIES),
            _ => Err(e),
        })
        .map_err(|e| uring(what, e))?;
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

/// A ring entered only by the thread that set it up (module rule 3). The socket is
/// not registered with it (no fixed file): a registered file lives as long as the
/// ring, and the kernel tears down the ring of a killed process only later, in its
/// own time, so the peer would see the connection close tens of milliseconds after
/// the process died, which delays its failover.
struct ThreadRing {
    ring: IoUring,
    owner: ThreadId,
    what: &'static str,
    needs: &'static [(u8, &'static str)],
}

impl ThreadRing {
    /// Sets up a ring for the calling thread and checks that it runs `needs`.
    fn new(
        what: &'static str,
        needs: &'static [(u8, &'static str)],
    ) -> Result<Self, TransportError> {
        Ok(Self {
            ring: setup(what, needs)?,
            owner: thread::current().id(),
            what,
            needs,
        })
    }

    /// The ring, set up again first if the calling thread is not its owner.
    fn get(&mut self) -> Result<&mut IoUring, TransportError> {
        if self.owner != thread::current().id() {
            // Nothing is in flight between calls (module rule 1): closing the old
            // ring abandons no operation.
            *self = Self::new(self.what, self.needs)?;
        }
        Ok(&mut self.ring)
    }
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

    /// Submits what is queued and waits up to `wait` until all `N` have completed.
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

/// Submits the one send queued and waits up to `wait` for its completion, whose
/// result it returns. On timeout or failure the socket is shut down, which completes
/// the send at once, and the completion is reaped before returning.
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

/// Submits the one receive queued (`RECEIVE`) and waits up to `wait` for its
/// completion, whose result it returns. If it does not come in time, the receive is
/// cancelled: it then completes at once with the bytes it had received (or
/// `-ECANCELED` if none), which is returned. On any other failure the socket is shut
/// down and the completion reaped before returning.
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

/// The error for a full submission queue (never expected: each ring holds at most
/// one operation and its cancellation).
fn queue_full(what: &'static str) -> TransportError {
    TransportError::Io {
        what,
        source: io::Error::other("submission queue full"),
    }
}

/// Sends an epoch's parts with one `SendMsg` submission each (up to 1024 parts).
pub(crate) struct UringSender {
    ring: ThreadRing,
}

impl UringSender {
    /// Sets up a small ring, and checks that it supports `SendMsg`.
    pub(crate) fn new() -> Result<Self, TransportError> {
        Ok(Self {
            ring: ThreadRing::new("setting up the primary's io_uring", &SEND_OPS)?,
        })
    }

    /// Sends every byte of `slices` on `stream`, in order.
    pub(crate) fn send_all(
        &mut self,
        stream: &TcpStream,
        mut slices: &mut [IoSlice<'_>],
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let ring = self.ring.get()?;
        while !slices.is_empty() {
            let count = slices.len().min(MAX_IOVECS);
            let bytes: usize = slices[..count].iter().map(|s| s.len()).sum();
            // SAFETY: msghdr is a plain C struct of integers and pointers, for which
            // all-zero is a valid value (no name, no control data, no flags).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            // IoSlice is guaranteed ABI-compatible with iovec on Unix.
            msg.msg_iov = slices.as_mut_ptr().cast::<libc::iovec>();
            msg.msg_iovlen = count;
            let sqe = opcode::SendMsg::new(types::Fd(stream.as_raw_fd()), &msg)
                .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
                .build();
            // SAFETY: the entry points to `msg`, which points to `slices[..count]`,
            // which borrow the bytes to send; all of them live until `complete_send`
            // returns, and it returns only after this operation's completion was
            // reaped (rule 1 of the module). The ring is empty, so the push succeeds.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                return Err(queue_full("queueing an io_uring send"));
            }
            let budget =
                timeout + Duration::from_secs_f64(bytes as f64 / MIN_SEND_BYTES_PER_SEC as f64);
            let res = complete_send(ring, stream, budget, timeout)?;
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

/// Receives everything the primary sends with `RecvMsg` submissions: control
/// messages into a 32-byte buffer, payloads straight into their slots of the receive
/// region.
///
/// A receive that waits for the next control message does not know how long the
/// epoch behind it will be, so it also offers the start of the slot the next epoch
/// is expected in (up to [`AHEAD_BYTES`]): the kernel fills the message, then the
/// slot, with whatever has arrived, and a small epoch usually comes in whole with its
/// EPOCH message and COMMIT, in one system call. Bytes that arrived ahead are kept
/// in the region (`ahead`) and consumed before the socket is read again.
pub(crate) struct UringReceiver<'r> {
    ring: ThreadRing,
    base: NonNull<u8>,
    len: usize,
    slots: usize,
    slot_bytes: usize,
    /// The slot a receive of the next control message offers for what follows it.
    next_slot: usize,
    /// Bytes received but not yet parsed: a range of the region, inside one slot.
    ahead: Range<usize>,
    _region: PhantomData<&'r mut [u8]>,
}

impl<'r> UringReceiver<'r> {
    /// Sets up a small ring for receiving into `region`, whose replica has committed
    /// epoch `committed`.
    pub(crate) fn new(
        region: &'r mut ReceiveRegion,
        committed: u64,
    ) -> Result<Self, TransportError> {
        let ring = ThreadRing::new("setting up the backup's io_uring", &RECEIVE_OPS)?;
        let (slots, slot_bytes) = (region.slots(), region.slot_bytes());
        let bytes = region.bytes_mut();
        Ok(Self {
            ring,
            len: bytes.len(),
            base: NonNull::from(bytes).cast::<u8>(),
            slots,
            slot_bytes,
            next_slot: (committed.wrapping_add(1) % slots as u64) as usize,
            ahead: 0..0,
            _region: PhantomData,
        })
    }

    /// Submits one `RecvMsg` (with `flags`; with `poll_first`, the kernel waits for
    /// the socket to turn readable before it first tries) into `iovecs` on the
    /// registered socket and waits for it, checking liveness every heartbeat interval: a receive still
    /// without bytes then is cancelled and submitted again, until the peer has been
    /// silent for the liveness timeout. Returns the bytes received (at least one).
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory valid for writes and not accessed otherwise
    /// until this returns.
    unsafe fn receive(
        &mut self,
        stream: &TcpStream,
        iovecs: &mut [libc::iovec],
        flags: i32,
        poll_first: bool,
        inbound: &mut Inbound,
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        let ring = self.ring.get()?;
        let ioprio = if poll_first {
            IORING_RECVSEND_POLL_FIRST
        } else {
            0
        };
        loop {
            // SAFETY: msghdr is a plain C struct of integers and pointers, for which
            // all-zero is a valid value (no name, no control data, no flags).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovecs.as_mut_ptr();
            msg.msg_iovlen = iovecs.len();
            let sqe = opcode::RecvMsg::new(types::Fd(stream.as_raw_fd()), &mut msg)
                .flags(flags as u32)
                .ioprio(ioprio)
                .build()
                .user_data(RECEIVE);
            // SAFETY: the entry points to `msg`, which points to `iovecs`, whose
            // memory the caller guarantees; all of them live until `complete_receive`
            // returns, and it returns only after the receive's completion was reaped
            // (module rule 1). The ring is empty, so the push succeeds.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                return Err(queue_full("queueing an io_uring receive"));
            }
            let res = complete_receive(ring, stream, inbound.wait_slice(), timeout)?;
            if res == -libc::ECANCELED {
                // Nothing arrived during this wait.
                if inbound.silence_left().is_zero() {
                    return Err(TransportError::PeerTimeout(timeout));
                }
                continue;
            }
            if res < 0 {
                return Err(errno("receiving from the peer with io_uring", res, timeout));
            }
            if res == 0 {
                return Err(TransportError::PeerClosed(""));
            }
            inbound.heard();
            return Ok(res as usize);
        }
    }

    /// An iovec for bytes `range` of the region.
    fn region_iovec(&self, range: Range<usize>) -> libc::iovec {
        libc::iovec {
            // Callers pass ranges inside the region, so the pointer stays inside (or
            // one past) it.
            iov_base: self.base.as_ptr().wrapping_add(range.start).cast(),
            iov_len: range.len(),
        }
    }

    /// Copies `len` bytes at `from` of the region to `to`; the ranges may overlap.
    fn move_within(&mut self, from: usize, to: usize, len: usize) {
        assert!(from.max(to) + len <= self.len, "a move outside the region");
        // SAFETY: both ranges lie inside the region (checked above), which is
        // borrowed exclusively for 'r; no receive is in flight (module rule 1) and
        // `&mut self` excludes any slice handed out by `bytes`. `ptr::copy` allows
        // overlapping ranges.
        unsafe {
            ptr::copy(
                self.base.as_ptr().add(from),
                self.base.as_ptr().add(to),
                len,
            )
        }
    }

    /// Takes up to `into.len()` of the bytes received ahead; returns how many.
    fn take_ahead(&mut self, into: &mut [u8]) -> usize {
        let n = into.len().min(self.ahead.len());
        // SAFETY: `ahead` lies inside the region and `into` is a distinct buffer of
        // at least `n` bytes; no receive is in flight (module rule 1).
        unsafe {
            ptr::copy_nonoverlapping(
                self.base.as_ptr().add(self.ahead.start),
                into.as_mut_ptr(),
                n,
            )
        }
        self.ahead.start += n;
        n
    }

    /// The next control message from the primary (heartbeats included: the caller
    /// counts them).
    ///
    /// Bytes received ahead are used first. Otherwise one `RecvMsg` (without
    /// `MSG_WAITALL`) offers the rest of the message and the start of the slot the
    /// next epoch is expected in; what lands in the slot stays ahead.
    pub(crate) fn next_message(
        &mut self,
        stream: &TcpStream,
        inbound: &mut Inbound,
        timeout: Duration,
    ) -> Result<[u8; CONTROL_BYTES], TransportError> {
        let mut message = [0u8; CONTROL_BYTES];
        let mut filled = self.take_ahead(&mut message);
        while filled < CONTROL_BYTES {
            let start = self.next_slot * self.slot_bytes;
            let window = self.slot_bytes.min(AHEAD_BYTES);
            let mut iovecs = [
                libc::iovec {
                    iov_base: message[filled..].as_mut_ptr().cast(),
                    iov_len: CONTROL_BYTES - filled,
                },
                self.region_iovec(start..start + window),
            ];
            // SAFETY: the iovecs are the rest of `message`, a local, and bytes
            // `start..start + window` of slot `next_slot`, inside the region, which
            // no Rust reference points into while `&mut self` is held (rule 2).
            // Nothing is buffered, so the next message has most likely not arrived:
            // skip the attempt that would find nothing.
            let n = unsafe { self.receive(stream, &mut iovecs, 0, true, inbound, timeout) }?;
            let into_message = n.min(CONTROL_BYTES - filled);
            filled += into_message;
            self.ahead = start..start + (n - into_message);
        }
        Ok(message)
    }

    /// Receives epoch `epoch`'s `len` payload bytes (1 to a slot) into its slot, then
    /// the control message that follows them; returns that message and where the
    /// payload lies in the region.
    ///
    /// The bytes already received ahead are moved to the start of the slot (if the
    /// epoch was expected in this slot, they are there already), and one `RecvMsg`
    /// with `MSG_WAITALL`, whose iovecs are the rest of the payload and of the
    /// message, takes what is missing: the kernel keeps receiving until every byte is
    /// in. Liveness is checked every heartbeat interval: a receive still incomplete
    /// then is cancelled (the bytes it took count as hearing from the peer) and
    /// submitted again for the rest.
    pub(crate) fn read_payload_and_message(
        &mut self,
        stream: &TcpStream,
        epoch: u64,
        len: usize,
        inbound: &mut Inbound,
        timeout: Duration,
    ) -> Result<([u8; CONTROL_BYTES], Range<usize>), TransportError> {
        if len == 0 || len > self.slot_bytes {
            return Err(TransportError::Io {
                what: "reading into the receive region",
                source: io::Error::other("payload empty or larger than a slot"),
            });
        }
        let slot = (epoch % self.slots as u64) as usize;
        let start = slot * self.slot_bytes;
        let range = start..start + len;
        self.next_slot = (slot + 1) % self.slots;
        // At most a window of a slot is ever ahead, so it fits this slot.
        let have = self.ahead.len();
        if self.ahead.start != start {
            self.move_within(self.ahead.start, start, have);
        }
        let mut at = start + have.min(len);
        self.ahead = at..start + have;
        let mut message = [0u8; CONTROL_BYTES];
        let mut message_at = self.take_ahead(&mut message);
        while message_at < CONTROL_BYTES {
            let n = (range.end - at).min(MAX_RECV_BYTES);
            let mut iovecs = [
                self.region_iovec(at..at + n),
                libc::iovec {
                    iov_base: message[message_at..].as_mut_ptr().cast(),
                    iov_len: CONTROL_BYTES - message_at,
                },
            ];
            // Only the payload until it is complete, then only the message.
            let iovecs = match (n, at + n == range.end) {
                (0, _) => &mut iovecs[1..],
                (_, true) => &mut iovecs[..],
                (_, false) => &mut iovecs[..1],
            };
            // SAFETY: the iovecs are bytes `at..at + n` of the payload's range, inside
            // the region (`len <= slot_bytes`), which no Rust reference points into
            // while `&mut self` is held (rule 2), and the rest of `message`, a local.
            let got =
                unsafe { self.receive(stream, iovecs, libc::MSG_WAITALL, false, inbound, timeout) }
                    .map_err(mid_epoch)?;
            let payload = got.min(n);
            at += payload;
            message_at += got - payload;
        }
        Ok((message, range))
    }

    /// The received bytes in `range` (inside the region).
    pub(crate) fn bytes(&self, range: Range<usize>) -> &[u8] {
        let range = range.start.min(self.len)..range.end.min(self.len);
        // SAFETY: the range lies inside the region, which is borrowed for 'r and
        // valid. No receive is in flight (each is reaped before the receiving
        // functions return), and the returned slice borrows `self`, so none can start
        // and no bytes can be moved while it lives.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(range.start),
                range.end.saturating_sub(range.start),
            )
        }
    }
}
