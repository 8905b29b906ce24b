//! `fgbi vm`: lists the built-in KVM guest programs, and runs one in a micro-VM,
//! unprotected, printing its progress.

use std::net::TcpListener;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use fgbi_hyp::kvm::ep::EpResult;
use fgbi_hyp::kvm::kv_server::KvServer;
use fgbi_hyp::kvm::{DirtyTracking, KvmError, KvmVm, Program, VmConfig};

use crate::size::parse_size;

/// Arguments of `fgbi vm`.
#[derive(Args, Debug)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Lists the built-in guest programs.
    List,
    /// Runs a guest program in a KVM micro-VM, unprotected, printing its progress
    /// every second until it finishes or the time is up.
    Run(RunArgs),
}

/// Arguments of `fgbi vm run`.
#[derive(Args, Debug)]
struct RunArgs {
    /// The guest program (see `fgbi vm list`).
    guest: String,
    /// Guest memory: a multiple of 2 MiB from 4 MiB to 3 GiB (K, M, G suffixes).
    #[arg(long, default_value = "64M")]
    mem: String,
    /// vCPUs, each running the guest in its own share of the data area (ep: 1).
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// How long to run, seconds (a guest that finishes ends the run earlier).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seed of the guest's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// kv guest: serve it in the Redis protocol on this local TCP port (0: any free
    /// port, printed).
    #[arg(long)]
    port: Option<u16>,
}

/// Runs `fgbi vm`.
pub fn run(args: VmArgs) -> Result<ExitCode, String> {
    match args.command {
        VmCommand::List => {
            for program in Program::ALL {
                println!("{:<8} {}", program.name(), program.summary());
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Run(args) => run_guest(args),
    }
}

fn run_guest(args: RunArgs) -> Result<ExitCode, String> {
    let program: Program = args.guest.parse()?;
    if program == Program::Touch {
        return Err(
            "the touch guest only writes the pages a test posts to it: run another guest".into(),
        );
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        return Err("--seconds must be a positive number".into());
    }
    if args.port.is_some() != (program == Program::Kv) {
        return Err("--port goes with the kv guest, and the kv guest needs --port".into());
    }
    let mem = usize::try_from(parse_size(&args.mem)?)
        .map_err(|_| format!("--mem {} does not fit this machine", args.mem))?;
    let mut config = VmConfig::new(program, mem, DirtyTracking::Classic);
    config.args.seed = args.seed;
    config.vcpus = args.vcpus;
    let vm = KvmVm::new(config).map_err(|e| e.to_string())?;
    println!(
        "{program}: {} MiB of guest memory ({:?}), {} vCPU(s), running for up to {} s",
        mem >> 20,
        vm.backing(),
        args.vcpus,
        args.seconds
    );
    let _server = match (args.port, vm.kv_device()) {
        (Some(port), Some(device)) => {
            let listener = TcpListener::bind(("127.0.0.1", port))
                .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
            let server = KvServer::start(listener, device).map_err(|e| e.to_string())?;
            println!(
                "serving the Redis protocol on {} (unprotected: replies leave at once)",
                server.local_addr()
            );
            Some(server)
        }
        _ => None,
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut last = (0u64, started);
    let finished = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break None;
        }
        match vm.wait_finish(left.min(Duration::from_secs(1))) {
            Ok(code) => break Some(code),
            Err(KvmError::NotFinished { reached, .. }) => {
                let now = Instant::now();
                let rate = (reached - last.0) as f64 / (now - last.1).as_secs_f64();
                let each = match vm.vcpu_progress() {
                    per if per.len() > 1 => format!("  per vCPU {per:?}"),
                    _ => String::new(),
                };
                println!(
                    "{:>7.1} s  iterations {reached:>10}  ({rate:.0}/s){each}",
                    (now - started).as_secs_f64()
                );
                last = (reached, now);
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let elapsed = started.elapsed();
    let console = vm.console();
    println!("console:");
    for line in console.lines() {
        println!("  {line}");
    }
    let Some(code) = finished else {
        println!(
            "stopped after {:.1} s at iteration {}",
            elapsed.as_secs_f64(),
            vm.progress()
        );
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "finished with exit code {code} after {:.2} s",
        elapsed.as_secs_f64()
    );
    let mut ok = code == 0;
    if program == Program::Ep {
        let result = EpResult::parse(&console)
            .ok_or("the ep guest printed no result line: see its console")?;
        let host = result.verifies_class_s();
        println!(
            "host check of the class S sums: {}",
            if host { "verified" } else { "NOT verified" }
        );
        ok &= host;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
