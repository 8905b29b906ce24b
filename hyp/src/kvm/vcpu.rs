//! The vCPU threads and how the VMM stops and resumes them.
//!
//! Each vCPU runs `KVM_RUN` in a loop on its own thread, handling port I/O exits
//! itself (the console and doorbell devices) and, with ring tracking, its ring's
//! ring-full exits. To stop the VM the VMM asks for a park, sets every vCPU's
//! `immediate_exit` byte and sends every thread a signal whose handler does nothing:
//! a `KVM_RUN` in progress returns `EINTR` because of the signal, one about to start
//! returns `EINTR` because of the byte, and either way KVM first completes the I/O the
//! vCPU last exited for. A thread parks only after such an `EINTR`, so a parked
//! vCPU's state is always consistent for capture; the VM is stopped when all are
//! parked. This is how firecracker and cloud-hypervisor kick vCPUs. A vCPU thread
//! waiting for key-value requests (outside `KVM_RUN`) is woken by the stop too.
//!
//! A guest stop (fault, finish, unhandled exit) parks the vCPU that hit it at once;
//! the others run on until the next [`VcpuThreads::stop`], after which none resumes.

use std::os::raw::c_int;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use super::KvmError;
use super::dirty::SharedRing;
use super::guest::{PORT_CONSOLE, PORT_DOORBELL, PORT_EXIT, PORT_FAULT};
use super::kv::{KvDevice, PORT_KV};
use super::state::DeviceState;
use super::sys::{GuestMemory, ImmediateExit};

/// Console bytes kept (the most recent).
const CONSOLE_MAX: usize = 64 << 10;
/// How long a stop waits for the vCPU before kicking it again.
const KICK_RETRY: Duration = Duration::from_millis(20);

/// Why the guest stopped for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest reported an inconsistency on the fault port (a code of guest.h).
    Fault(u32),
    /// The program finished and reported its exit code (0: success) on the exit port.
    Finished(u32),
    /// KVM_RUN returned an exit the VMM does not handle (triple fault, MMIO to
    /// unbacked memory, an emulation failure...).
    Exit(String),
    /// KVM_RUN failed.
    RunFailed(String),
}

impl std::fmt::Display for GuestStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestStop::Fault(code) => write!(f, "the guest reported fault code {code}"),
            GuestStop::Finished(code) => write!(f, "the guest finished with exit code {code}"),
            GuestStop::Exit(exit) => write!(f, "the guest exited with {exit}"),
            GuestStop::RunFailed(e) => write!(f, "KVM_RUN failed: {e}"),
        }
    }
}

/// What the VMM wants the vCPU thread to do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Park,
    Exit,
}

/// State shared by the vCPU threads and the VMM, under one lock.
struct Control {
    want: Want,
    /// vCPU threads parked outside KVM_RUN.
    parked: usize,
    stop: Option<GuestStop>,
    devices: DeviceState,
    /// Pages the devices wrote into guest memory since the last harvest.
    host_writes: Vec<u64>,
}

struct Shared {
    control: Mutex<Control>,
    /// Signalled when `want`, `parked`, `stop` or a doorbell changes.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a change, at most `timeout`.
    fn wait<'a>(
        &self,
        control: MutexGuard<'a, Control>,
        timeout: Duration,
    ) -> MutexGuard<'a, Control> {
        self.changed
            .wait_timeout(control, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
fn kick_signal() -> Result<c_int, KvmError> {
    extern "C" fn nothing(_: c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static REGISTERED: OnceLock<Result<c_int, String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let signal = SIGRTMIN();
            register_signal_handler(signal, nothing)
                .map(|()| signal)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(KvmError::Signal)
}

/// One vCPU's handles on the VMM side.
struct Handle {
    fd: Arc<Mutex<VcpuFd>>,
    immediate_exit: ImmediateExit,
    thread: Option<JoinHandle<()>>,
}

/// The VM's vCPUs, each running on its own thread; they stop and resume together.
pub struct VcpuThreads {
    handles: Vec<Handle>,
    shared: Arc<Shared>,
    signal: c_int,
    kv: Option<Arc<KvDevice>>,
}

/// What the vCPU threads' devices reach besides the shared state.
pub struct DeviceIo {
    /// Guest memory.
    pub memory: GuestMemory,
    /// The key-value device, for the `kv` guest.
    pub kv: Option<Arc<KvDevice>>,
}

impl VcpuThreads {
    /// Starts a thread for each vCPU of `vcpus`, all parked; [`VcpuThreads::resume`]
    /// lets them run. `rings` holds each vCPU's dirty ring (ring tracking) or is
    /// empty; `devices.progress` has one entry per vCPU.
    pub fn spawn(
        vcpus: Vec<VcpuFd>,
        vm: Arc<VmFd>,
        rings: Vec<SharedRing>,
        devices: DeviceState,
        io: DeviceIo,
    ) -> Result<Self, KvmError> {
        let signal = kick_signal()?;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                want: Want::Park,
                parked: 0,
                stop: None,
                devices,
                host_writes: Vec::new(),
            }),
            changed: Condvar::new(),
        });
        let mut this = Self {
            handles: Vec::with_capacity(vcpus.len()),
            shared,
            signal,
            kv: io.kv.clone(),
        };
        let mut rings = rings.into_iter();
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let fd = Arc::new(Mutex::new(vcpu));
            let immediate_exit = ImmediateExit::new(Arc::clone(&fd));
            // The first KVM_RUN returns at once: the thread parks before any guest code.
            immediate_exit.set(true);
            let runner = Runner {
                index,
                vcpu: Arc::clone(&fd),
                shared: Arc::clone(&this.shared),
                immediate_exit: ImmediateExit::new(Arc::clone(&fd)),
                vm: Arc::clone(&vm),
                ring: rings.next(),
                memory: io.memory,
                kv: io.kv.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || runner.run())
                .map_err(KvmError::Thread)?;
            this.handles.push(Handle {
                fd,
                immediate_exit,
                thread: Some(thread),
            });
        }
        this.stop()?;
        Ok(this)
    }

    /// The number of vCPUs.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, for a VM).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stops every vCPU and waits until all are parked outside `KVM_RUN`; returns
    /// how long that took. Stopping a running VM closes its epoch.
    pub fn stop(&mut self) -> Result<Duration, KvmError> {
        let started = Instant::now();
        let mut control = self.shared.lock();
        let running = control.want == Want::Run;
        if running {
            control.want = Want::Park;
        }
        while control.parked < self.handles.len() {
            self.kick()?;
            control = self.shared.wait(control, KICK_RETRY);
        }
        if let Some(kv) = self.kv.as_ref().filter(|_| running) {
            kv.close_epoch();
        }
        Ok(started.elapsed())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&mut self) {
        let mut control = self.shared.lock();
        control.want = Want::Run;
        if let Some(kv) = &self.kv {
            kv.interrupt(false);
        }
        self.shared.changed.notify_all();
    }

    /// Takes the pages the devices wrote into guest memory since the last call.
    pub fn take_host_writes(&self) -> Vec<u64> {
        std::mem::take(&mut self.shared.lock().host_writes)
    }

    /// Every vCPU, in index order, for state ioctls; `None` unless all are parked.
    pub fn parked(&self) -> Option<Vec<MutexGuard<'_, VcpuFd>>> {
        let parked = self.shared.lock().parked == self.handles.len();
        parked.then(|| {
            self.handles
                .iter()
                .map(|h| h.fd.lock().unwrap_or_else(|e| e.into_inner()))
                .collect()
        })
    }

    /// The devices' state.
    pub fn devices(&self) -> DeviceState {
        self.shared.lock().devices.clone()
    }

    /// Why the guest stopped for good, if it did.
    pub fn guest_stop(&self) -> Option<GuestStop> {
        self.shared.lock().stop.clone()
    }

    /// Waits until every vCPU's doorbell reports at least `target` iterations, or
    /// the guest stops, or `timeout` passes; returns the progress reached (the least
    /// of the vCPUs').
    pub fn wait_progress(&self, target: u64, timeout: Duration) -> Result<u64, KvmError> {
        self.wait(timeout, |control| {
            let progress = control.devices.least_progress();
            if progress >= target {
                return Some(Ok(progress));
            }
            control.stop.clone().map(|stop| Err(KvmError::Guest(stop)))
        })
        .unwrap_or_else(|reached| {
            Err(KvmError::Timeout {
                target,
                reached,
                waited: timeout,
            })
        })
    }

    /// Waits until the program finishes and returns its exit code; fails if the guest
    /// stops otherwise or `timeout` passes first.
    pub fn wait_finish(&self, timeout: Duration) -> Result<u32, KvmError> {
        self.wait(timeout, |control| match &control.stop {
            Some(GuestStop::Finished(code)) => Some(Ok(*code)),
            Some(stop) => Some(Err(KvmError::Guest(stop.clone()))),
            None => None,
        })
        .unwrap_or_else(|reached| {
            Err(KvmError::NotFinished {
                reached,
                waited: timeout,
            })
        })
    }

    /// Waits until `done` gives an answer or `timeout` passes; then `Err` holds the
    /// progress reached.
    fn wait<T>(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Control) -> Option<T>,
    ) -> Result<T, u64> {
        let deadline = Instant::now() + timeout;
        let mut control = self.shared.lock();
        loop {
            if let Some(answer) = done(&control) {
                return Ok(answer);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(control.devices.least_progress());
            }
            control = self.shared.wait(control, left);
        }
    }

    /// Interrupts every vCPU's `KVM_RUN`, now or at its next entry, and a wait for
    /// key-value requests.
    fn kick(&self) -> Result<(), KvmError> {
        if let Some(kv) = &self.kv {
            kv.interrupt(true);
        }
        for handle in &self.handles {
            handle.immediate_exit.set(true);
            if let Some(thread) = &handle.thread {
                thread
                    .kill(self.signal)
                    .map_err(|e| KvmError::Signal(e.to_string()))?;
            }
        }
        Ok(())
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Exit;
        self.shared.changed.notify_all();
        if let Some(kv) = &self.kv {
            kv.close();
        }
        // A failed kick leaves the threads to notice at their next exit.
        let _ = self.kick();
        for handle in &mut self.handles {
            if let Some(thread) = handle.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// A vCPU thread's side.
struct Runner {
    index: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    shared: Arc<Shared>,
    immediate_exit: ImmediateExit,
    vm: Arc<VmFd>,
    ring: Option<SharedRing>,
    memory: GuestMemory,
    kv: Option<Arc<KvDevice>>,
}

/// What one exit asks of the loop.
enum Next {
    Run,
    Stop(GuestStop),
}

impl Runner {
    fn run(self) {
        let mut vcpu = self.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let next = match vcpu.run() {
                Ok(exit) => self.handle(exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.immediate_exit.set(false);
                    drop(vcpu);
                    if !self.park() {
                        return;
                    }
                    vcpu = self.vcpu.lock().unwrap_or_else(|e| e.into_inner());
                    Next::Run
                }
                Err(e) => Next::Stop(GuestStop::RunFailed(e.to_string())),
            };
            if let Next::Stop(stop) = next {
                let mut control = self.shared.lock();
                control.stop.get_or_insert(stop);
                self.shared.changed.notify_all();
                // The next KVM_RUN completes the exit and returns at once: the vCPU
                // then parks for good, consistent.
                self.immediate_exit.set(true);
            }
        }
    }

    /// Parks if the VMM asked for it or the guest stopped; returns false when the
    /// thread must end. Called only after KVM_RUN returned EINTR.
    fn park(&self) -> bool {
        let mut control = self.shared.lock();
        let mut counted = false;
        while control.want != Want::Exit && (control.want == Want::Park || control.stop.is_some()) {
            if !counted {
                control.parked += 1;
                counted = true;
                self.shared.changed.notify_all();
            }
            control = self
                .shared
                .changed
                .wait(control)
                .unwrap_or_else(|e| e.into_inner());
        }
        if counted {
            control.parked -= 1;
        }
        control.want != Want::Exit
    }

    fn handle(&self, exit: VcpuExit<'_>) -> Next {
        match exit {
            VcpuExit::IoIn(PORT_KV, data) if self.kv.is_some() => {
                self.kv_wait(data);
                Next::Run
            }
            VcpuExit::IoOut(PORT_KV, data) if self.kv.is_some() => {
                self.kv_submit(data);
                Next::Run
            }
            VcpuExit::IoOut(port, data) => self.port_out(port, data),
            VcpuExit::IoIn(_, data) => {
                // Nothing is readable: an open bus reads as all ones.
                data.fill(0xff);
                Next::Run
            }
            VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => match &self.ring {
                Some(ring) => match ring
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .collect(&self.vm)
                {
                    Ok(()) => Next::Run,
                    Err(e) => Next::Stop(GuestStop::RunFailed(e.to_string())),
                },
                None => Next::Stop(GuestStop::Exit(
                    "a dirty-ring-full exit without a ring".into(),
                )),
            },
            other => Next::Stop(GuestStop::Exit(format!("{other:?}"))),
        }
    }

    /// The key-value device's `in`: waits for requests and returns their count.
    fn kv_wait(&self, data: &mut [u8]) {
        let mut written = Vec::new();
        let count = self
            .kv
            .as_ref()
            .map_or(0, |kv| kv.fill(&self.memory, &mut written));
        let bytes = count.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(i).copied().unwrap_or(0);
        }
        if !written.is_empty() {
            self.shared.lock().host_writes.append(&mut written);
        }
    }

    /// The key-value device's `out`: takes the replies; each counts as progress.
    fn kv_submit(&self, data: &[u8]) {
        let taken = self
            .kv
            .as_ref()
            .map_or(0, |kv| kv.take(&self.memory, port_value(data)));
        let mut control = self.shared.lock();
        control.devices.progress[self.index] += u64::from(taken);
        self.shared.changed.notify_all();
    }

    fn port_out(&self, port: u16, data: &[u8]) -> Next {
        let value = port_value(data);
        let mut control = self.shared.lock();
        let devices = &mut control.devices;
        match port {
            PORT_CONSOLE => {
                if devices.console.len() >= CONSOLE_MAX {
                    devices.console.drain(..CONSOLE_MAX / 2);
                }
                devices.console.extend_from_slice(data);
                Next::Run
            }
            PORT_DOORBELL => {
                // The guest reports the low 32 bits; progress only moves forward.
                let progress = &mut devices.progress[self.index];
                let delta = value.wrapping_sub(*progress as u32);
                *progress += u64::from(delta);
                self.shared.changed.notify_all();
                Next::Run
            }
            PORT_FAULT => {
                devices.fault = value;
                Next::Stop(GuestStop::Fault(value))
            }
            PORT_EXIT => Next::Stop(GuestStop::Finished(value)),
            _ => Next::Run,
        }
    }
}

/// The value of an `out` of up to 4 bytes.
fn port_value(data: &[u8]) -> u32 {
    let mut value = [0u8; 4];
    let n = data.len().min(4);
    value[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(value)
}
