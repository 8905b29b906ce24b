//! The key-value device: a paravirtual request/reply device between the VMM and the
//! `kv` guest ([`super::Program::Kv`]), with output commit at its boundary.
//!
//! Requests and replies live in slots in guest memory (guest.h): request slot *i* at
//! [`REQUESTS`] `+ i *` [`SLOT_BYTES`], reply slot *i* at [`REPLIES`] likewise. The
//! guest's `in` from [`PORT_KV`] asks for work: the vCPU thread waits (outside
//! `KVM_RUN`) until requests are submitted, copies up to [`SLOTS`] of them into the
//! request slots and returns their count, or 0 when the VM is being stopped. The
//! guest applies them and submits the replies with an `out` of the count: the vCPU
//! thread copies each reply out of its slot and tags it with the epoch that produced
//! it.
//!
//! **Output commit.** Epochs are counted by the VM's stops: the *k*-th stop closes
//! epoch *k*, whose state the checkpoint taken at that stop holds. A reply produced
//! in epoch *k* reveals that state, so with output commit on it is held until
//! [`KvDevice::committed`] says epoch *k* is on the backup; without (an unprotected
//! VM) it is released at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::sys::GuestMemory;
use crate::workload::PAGE;

/// The device's port: `in32` waits for requests, `out32` submits replies.
pub const PORT_KV: u16 = 0x513;
/// Guest-physical address of request slot 0.
pub const REQUESTS: u64 = 0x10_0000;
/// Guest-physical address of reply slot 0.
pub const REPLIES: u64 = 0x14_0000;
/// Request slots (and reply slots).
pub const SLOTS: usize = 32;
/// Bytes of each slot.
pub const SLOT_BYTES: usize = 8192;
/// Bytes of a slot's header: u32 length, u32 argument count (requests) or 0.
const SLOT_HEADER: usize = 8;

/// A request encoded for a request slot: the header, then each argument as a u32
/// length and its bytes; `None` if it does not fit in a slot.
pub fn encode_request<'a>(args: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut slot = vec![0; SLOT_HEADER];
    let mut argc = 0u32;
    for arg in args {
        if slot.len() + 4 + arg.len() > SLOT_BYTES {
            return None;
        }
        slot.extend_from_slice(&(arg.len() as u32).to_le_bytes());
        slot.extend_from_slice(arg);
        argc += 1;
    }
    let len = (slot.len() - SLOT_HEADER) as u32;
    slot[..4].copy_from_slice(&len.to_le_bytes());
    slot[4..8].copy_from_slice(&argc.to_le_bytes());
    Some(slot)
}

/// What the device holds, under one lock.
#[derive(Default)]
struct Queues {
    next_id: u64,
    /// Submitted requests not yet given to the guest.
    pending: VecDeque<(u64, Vec<u8>)>,
    /// The ids of the requests in the request slots, in slot order.
    batch: Vec<u64>,
    /// Replies waiting for their epoch to be committed: (epoch, id, reply).
    held: VecDeque<(u64, u64, Vec<u8>)>,
    /// Replies released to their submitters.
    released: HashMap<u64, Vec<u8>>,
    /// The epoch the guest is producing replies in: the VM's stops so far, plus one.
    epoch: u64,
    /// The last epoch known to be on the backup.
    committed: u64,
    /// Hold replies until their epoch is committed.
    output_commit: bool,
    /// The VMM wants the vCPU back in KVM_RUN (to stop it).
    interrupted: bool,
    /// The VM is gone: nothing more will be served.
    closed: bool,
}

/// The key-value device of one VM, shared by the vCPU thread and the submitters.
pub struct KvDevice {
    queues: Mutex<Queues>,
    changed: Condvar,
}

impl KvDevice {
    /// A device whose replies are held for output commit when `output_commit`.
    pub fn new(output_commit: bool) -> Self {
        Self {
            queues: Mutex::new(Queues {
                epoch: 1,
                output_commit,
                ..Queues::default()
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits a request encoded by [`encode_request`]; returns its id for
    /// [`KvDevice::wait_reply`].
    pub fn submit(&self, request: Vec<u8>) -> u64 {
        let mut q = self.lock();
        q.next_id += 1;
        let id = q.next_id;
        q.pending.push_back((id, request));
        self.changed.notify_all();
        id
    }

    /// Waits until the reply to request `id` is released (produced by the guest and,
    /// with output commit, its epoch committed) and takes it; `None` if `timeout`
    /// passes first or the VM is gone.
    pub fn wait_reply(&self, id: u64, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        loop {
            if let Some(reply) = q.released.remove(&id) {
                return Some(reply);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if q.closed || left.is_zero() {
                return None;
            }
            q = self
                .changed
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Epoch `epoch` (the checkpoint taken at the VM's `epoch`-th stop) is on the
    /// backup: releases every reply produced in it or before.
    pub fn committed(&self, epoch: u64) {
        let mut q = self.lock();
        q.committed = q.committed.max(epoch);
        while q.held.front().is_some_and(|h| h.0 <= q.committed) {
            if let Some((_, id, reply)) = q.held.pop_front() {
                q.released.insert(id, reply);
            }
        }
        self.changed.notify_all();
    }

    /// Replies produced but held for output commit.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// The VM stopped after running: the epoch it ran is closed.
    pub(crate) fn close_epoch(&self) {
        self.lock().epoch += 1;
    }

    /// Asks a vCPU waiting for requests to return to `KVM_RUN` (`on`), or lets it
    /// wait again.
    pub(crate) fn interrupt(&self, on: bool) {
        self.lock().interrupted = on;
        self.changed.notify_all();
    }

    /// The VM is gone: waiters give up.
    pub(crate) fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.interrupted = true;
        self.changed.notify_all();
    }

    /// The guest's `in`: waits for requests, copies up to [`SLOTS`] into the request
    /// slots (recording the pages written in `written`) and returns how many; 0 when
    /// interrupted.
    pub(crate) fn fill(&self, memory: &GuestMemory, written: &mut Vec<u64>) -> u32 {
        let mut q = self.lock();
        while q.pending.is_empty() && !q.interrupted {
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if q.interrupted {
            return 0;
        }
        q.batch.clear();
        while q.batch.len() < SLOTS {
            let Some((id, request)) = q.pending.pop_front() else {
                break;
            };
            let gpa = REQUESTS + (q.batch.len() * SLOT_BYTES) as u64;
            if memory.write(gpa, &request) {
                let first = gpa / PAGE as u64;
                let last = (gpa + request.len() as u64 - 1) / PAGE as u64;
                written.extend(first..=last);
            }
            q.batch.push(id);
        }
        q.batch.len() as u32
    }

    /// The guest's `out` of `count`: takes replies from reply slots `0..count`, tags
    /// them with the running epoch, and holds or releases them. Returns how many
    /// belonged to a request of this VMM (a VM restored from a checkpoint may finish
    /// a batch whose requests were submitted to the VM that took it).
    pub(crate) fn take(&self, memory: &GuestMemory, count: u32) -> u32 {
        let mut q = self.lock();
        let batch = std::mem::take(&mut q.batch);
        let mut taken = 0;
        for (slot, &id) in batch.iter().enumerate().take(count as usize) {
            let gpa = REPLIES + (slot * SLOT_BYTES) as u64;
            let mut header = [0u8; SLOT_HEADER];
            let read = memory.read(gpa, &mut header);
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let mut reply = vec![0u8; len.min(SLOT_BYTES - SLOT_HEADER)];
            if !read || len > reply.len() || !memory.read(gpa + SLOT_HEADER as u64, &mut reply) {
                reply = b"-ERR the VM wrote a malformed reply slot\r\n".to_vec();
            }
            match q.output_commit {
                true => {
                    let epoch = q.epoch;
                    q.held.push_back((epoch, id, reply));
                }
                false => {
                    q.released.insert(id, reply);
                }
            }
            taken += 1;
        }
        self.changed.notify_all();
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(bytes: &mut [u8]) -> GuestMemory {
        // SAFETY: `bytes` outlives the view in each test.
        unsafe { GuestMemory::new(bytes.as_mut_ptr(), bytes.len()) }.unwrap()
    }

    #[test]
    fn requests_are_encoded_for_a_slot_or_refused() {
        let slot = encode_request([&b"SET"[..], b"k", b"v"]).unwrap();
        assert_eq!(&slot[..8], &[3 + 4 + 1 + 4 + 1 + 4, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&slot[8..15], b"\x03\0\0\0SET");
        let big = vec![b'x'; SLOT_BYTES];
        assert_eq!(encode_request([&b"SET"[..], b"k", &big]), None);
    }

    #[test]
    fn replies_are_held_until_their_epoch_is_committed() {
        let mut guest = vec![0u8; 2 << 20];
        let view = memory(&mut guest);
        let device = KvDevice::new(true);
        let first = device.submit(encode_request([&b"PING"[..]]).unwrap());
        let mut written = Vec::new();
        assert_eq!(device.fill(&view, &mut written), 1);
        assert_eq!(written, [REQUESTS / PAGE as u64]);
        assert_eq!(&guest[REQUESTS as usize + 8..][..8], b"\x04\0\0\0PING");
        // The guest's reply in slot 0, taken in epoch 1.
        let reply = b"+PONG\r\n";
        guest[REPLIES as usize..][..4].copy_from_slice(&(reply.len() as u32).to_le_bytes());
        guest[REPLIES as usize + 8..][..reply.len()].copy_from_slice(reply);
        assert_eq!(device.take(&view, 1), 1);
        assert_eq!(device.held(), 1);
        assert_eq!(device.wait_reply(first, Duration::ZERO), None);
        // A second request answered in epoch 2.
        device.close_epoch();
        let second = device.submit(encode_request([&b"PING"[..]]).unwrap());
        assert_eq!(device.fill(&view, &mut written), 1);
        assert_eq!(device.take(&view, 1), 1);
        device.committed(1);
        assert_eq!(device.wait_reply(first, Duration::ZERO).unwrap(), reply);
        assert_eq!(device.wait_reply(second, Duration::ZERO), None);
        device.committed(2);
        assert_eq!(device.wait_reply(second, Duration::ZERO).unwrap(), reply);
        // Interrupted, a wait for requests returns at once with none.
        device.interrupt(true);
        assert_eq!(device.fill(&view, &mut written), 0);
        // Replies for requests this device never gave out are dropped.
        assert_eq!(device.take(&view, 3), 0);
    }

    #[test]
    fn without_output_commit_replies_are_released_at_once() {
        let mut guest = vec![0u8; 2 << 20];
        let view = memory(&mut guest);
        let device = KvDevice::new(false);
        let id = device.submit(encode_request([&b"GET"[..], b"k"]).unwrap());
        device.fill(&view, &mut Vec::new());
        guest[REPLIES as usize..][..4].copy_from_slice(&5u32.to_le_bytes());
        guest[REPLIES as usize + 8..][..5].copy_from_slice(b"$-1\r\n");
        device.take(&view, 1);
        assert_eq!(device.wait_reply(id, Duration::ZERO).unwrap(), b"$-1\r\n");
        device.close();
        assert_eq!(device.wait_reply(id + 1, Duration::from_secs(5)), None);
    }
}
