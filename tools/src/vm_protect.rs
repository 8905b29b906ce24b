//! `fgbi primary --vm GUEST` and `fgbi backup --vm GUEST`: replication of a KVM
//! micro-VM ([`KvmVm`]) between two processes, and failover to a VM restored from
//! the replica and the last committed state blob.
//!
//! The primary drives the VM through the primary loop like any protected program;
//! the VM runs on its own between checkpoints. For the `kv` guest it serves the
//! Redis protocol on `--port` with output commit: a reply leaves once the
//! checkpoint that follows it is on the backup. The VM's epochs are its stops, and
//! the loop stops it exactly once per round (a checkpoint, or during initial sync
//! the stop that harvests its dirty pages), so the *k*-th round of this process
//! closes the VM's epoch *k*; the encoder's epoch numbers are not used for this
//! (they start again at 1 when an empty backup is re-synced). While no backup holds
//! a checkpoint of the VM (none reachable, or initial sync), its replies are released
//! one round late instead of being held for a backup that may never come.
//!
//! The backup restores the VM on failover and keeps it running, unprotected: the
//! `kv` guest's front end listens on the same `--port`, where the clients reconnect,
//! and releases replies at once.

use std::cell::Cell;
use std::net::{TcpListener, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use fgbi::backup;
use fgbi::primary::{self, PrimaryEvent};
use fgbi_hyp::kvm::kv_server::KvServer;
use fgbi_hyp::kvm::{DirtyTracking, KvmError, KvmVm, Program, VmConfig};
use fgbi_hyp::memory::Region;
use fgbi_hyp::protected::HypError;
use fgbi_hyp::synthetic::Tracking;

use crate::replicate_cmd::{BackupArgs, PrimaryArgs, print_event, print_failover};

/// The protected VM's settings; both sides must give the same.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Protect a KVM micro-VM running this guest program (see `fgbi vm list`) instead
    /// of a synthetic workload; --mem is its guest memory.
    #[arg(id = "vm", long = "vm", value_name = "GUEST")]
    pub guest: Option<String>,
    /// With --vm: the VM's vCPUs.
    #[arg(long, default_value_t = 1, requires = "vm")]
    vcpus: usize,
    /// With --vm kv: serve the Redis protocol on this local TCP port (the backup's
    /// restored VM listens on it after failover).
    #[arg(long, requires = "vm")]
    port: Option<u16>,
}

impl VmArgs {
    /// The VM's configuration for `mem` bytes of guest memory, with output commit
    /// when `protected`.
    fn config(&self, mem: u64, protected: bool) -> Result<VmConfig, String> {
        let program: Program = self.guest.as_deref().unwrap_or_default().parse()?;
        if program == Program::Touch {
            return Err(
                "the touch guest only writes the pages a test posts to it: protect another guest"
                    .into(),
            );
        }
        if self.port.is_some() != (program == Program::Kv) {
            return Err("--port goes with --vm kv, and --vm kv needs --port".into());
        }
        let mem = usize::try_from(mem).map_err(|_| "--mem does not fit this machine")?;
        let mut config = VmConfig::new(program, mem, DirtyTracking::Classic);
        config.vcpus = self.vcpus;
        config.output_commit = protected;
        Ok(config)
    }

    /// Serves `vm`'s key-value device (the kv guest) on `--port`; prints where.
    fn serve(&self, vm: &KvmVm) -> Result<Option<KvServer>, KvmError> {
        let (Some(port), Some(device)) = (self.port, vm.kv_device()) else {
            return Ok(None);
        };
        let io = |what| move |source| KvmError::Io { what, source };
        let addr = ("127.0.0.1", port)
            .to_socket_addrs()
            .map_err(io("resolving the front end's address"))?
            .next();
        let listener = TcpListener::bind(addr.as_slice())
            .map_err(io("listening on the front end's port (is it free?)"))?;
        let server = KvServer::start(listener, device).map_err(io("starting the front end"))?;
        let replies = match vm.config().output_commit {
            true => "protected: a reply leaves once its epoch is on the backup",
            false => "unprotected: replies leave at once",
        };
        println!(
            "serving the Redis protocol on {} ({replies})",
            server.local_addr()
        );
        Ok(Some(server))
    }
}

/// Runs `fgbi primary --vm`: boots the VM and replicates it to the backup.
pub fn primary(args: &PrimaryArgs) -> Result<ExitCode, String> {
    let key = args.shared.key()?;
    let options = args.options()?;
    let mut config = args.vm.config(args.shared.mem, true)?;
    config.args.seed = args.seed;
    config.copy_on_write = match args.tracking {
        Tracking::Kernel => false,
        Tracking::CopyOnWrite => true,
        Tracking::Generator => {
            return Err("a VM's dirty pages come from KVM's dirty log: use --tracking kernel (pages copied in the pause) or cow (copy-on-write)".into());
        }
    };
    let mut vm = KvmVm::new(config).map_err(|e| e.to_string())?;
    let safety = match config.copy_on_write {
        true => format!("copy-on-write at {}", config.cow_granule),
        false => "pages copied in the pause".into(),
    };
    println!(
        "vm {}: {} MiB, {} vCPU(s), {:?}, {safety}",
        config.program,
        config.mem_bytes >> 20,
        config.vcpus,
        vm.backing()
    );
    let _server = args.vm.serve(&vm).map_err(|e| e.to_string())?;
    let device = vm.kv_device();
    let release = |epoch| {
        if let Some(device) = &device {
            device.committed(epoch);
        }
    };
    // The checkpoints taken so far: the VM's stops, so its closed epochs.
    let stops = Cell::new(0u64);
    let unprotected = Cell::new(false);
    let mut out = std::io::stdout().lock();
    let last = primary::run(
        &mut vm,
        |_| {
            if unprotected.get() {
                release(stops.get());
            }
            stops.set(stops.get() + 1);
            Ok(())
        },
        &options,
        &key,
        |e| {
            match &e {
                // The checkpoints the backup now holds: the VM's stops, so its closed epochs.
                PrimaryEvent::Committed { checkpoints, .. } => {
                    unprotected.set(false);
                    release(*checkpoints);
                }
                PrimaryEvent::Unprotected { .. } => unprotected.set(true),
                PrimaryEvent::Connected(_)
                | PrimaryEvent::Synced { .. }
                | PrimaryEvent::Sent { .. }
                | PrimaryEvent::Scrubbed { .. } => {}
            }
            print_event(&mut out, &e);
        },
    )
    .map_err(|e| e.to_string())?;
    println!("done committed={last}");
    Ok(ExitCode::SUCCESS)
}

/// Runs `fgbi backup --vm`: holds the replica; when the primary dies, restores the
/// VM from it and runs it until the guest finishes (its exit code) or forever.
pub fn backup(args: &BackupArgs) -> Result<ExitCode, String> {
    let key = args.shared.key()?;
    let config = args.vm.config(args.shared.mem, false)?;
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let options = args.options(false)?;
    let replica = Region::new(config.mem_bytes).map_err(|e| e.to_string())?;
    let listening = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening {listening}");
    let (report, restored) = backup::run(
        &listener,
        &options,
        &key,
        replica,
        // Only ever called with a checkpoint: never before the first commits.
        |replica, state, _| {
            let (vm, _) = KvmVm::restore(config, &replica, state)?;
            let server = args.vm.serve(&vm)?;
            Ok::<_, HypError>((vm, server))
        },
        |(vm, _): &mut (KvmVm, Option<KvServer>)| match vm.guest_stop() {
            Some(stop) => Err(HypError::from(KvmError::Guest(stop))),
            None => Ok(()),
        },
        |n| println!("committed {n}"),
    )
    .map_err(|e| e.to_string())?;
    print_failover(&report);
    let (vm, _server) = restored;
    println!(
        "restarted pid={} the {} guest in a VM restored from epoch {}, running on the backup",
        std::process::id(),
        config.program,
        report.epoch
    );
    let code = loop {
        match vm.wait_finish(Duration::from_secs(3600)) {
            Ok(code) => break code,
            Err(KvmError::NotFinished { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
    };
    println!("the guest finished with exit code {code}");
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
