//! The key-value service inside a KVM micro-VM (the `kv` guest behind the key-value
//! device and its Redis-protocol front end), driven by Debian's unmodified
//! `redis-cli` and `redis-benchmark`: unprotected, and protected by in-process
//! replication with output commit, where a reply leaves only once the epoch that
//! produced it is on the replica. Skips, loudly, without KVM or the redis tools.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fgbi::local::LocalReplication;
use fgbi_engine::{EncoderConfig, Geometry, Mode};
use fgbi_hyp::kvm::kv::{KvDevice, encode_request};
use fgbi_hyp::kvm::kv_server::KvServer;
use fgbi_hyp::kvm::{DirtyTracking, KvmVm, Program, VmConfig, probe};

const MEM: usize = 16 << 20;
const WAIT: Duration = Duration::from_secs(20);

/// Whether KVM and, if `tools`, redis-cli and redis-benchmark are here.
fn available(tools: bool) -> bool {
    if !fgbi_hyp::feature::available("KVM", probe(DirtyTracking::Classic)) {
        return false;
    }
    let on_path = |program: &str| {
        Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    let found = match !tools || (on_path("redis-benchmark") && on_path("redis-cli")) {
        true => Ok(()),
        false => Err("not on PATH; install Debian's redis-tools (.ci/run does)"),
    };
    fgbi_hyp::feature::available("redis-benchmark and redis-cli", found)
}

/// A front end for `vm`'s key-value device on a free local port.
fn serve(device: Arc<KvDevice>) -> KvServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    KvServer::start(listener, device).unwrap()
}

/// Runs redis-cli against `server`: (success, trimmed stdout).
fn cli(server: &KvServer, args: &[&str]) -> (bool, String) {
    let out = Command::new("redis-cli")
        .args(["-p", &server.local_addr().port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

/// Runs redis-benchmark against `server` with `args`; returns its result lines, each
/// checked to report requests per second.
fn benchmark(server: &KvServer, args: &[&str], tests: &[&str]) -> Vec<String> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &server.local_addr().port().to_string(), "-q"])
        .args(args)
        .output()
        .expect("redis-benchmark runs");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{report}");
    tests
        .iter()
        .map(|test| {
            let line = report
                .split(['\r', '\n'])
                .rfind(|l| l.trim_start().starts_with(test))
                .unwrap_or_else(|| panic!("no {test} result in {report}"))
                .trim()
                .to_string();
            assert!(line.contains("requests per second"), "{line}");
            line
        })
        .collect()
}

/// The commands every run checks, on a fresh store.
fn check_commands(server: &KvServer) {
    assert_eq!(cli(server, &["PING"]), (true, "PONG".into()));
    assert_eq!(
        cli(server, &["SET", "from-cli", "yes"]),
        (true, "OK".into())
    );
    assert_eq!(cli(server, &["GET", "from-cli"]), (true, "yes".into()));
    assert_eq!(cli(server, &["GET", "absent"]), (true, "".into()));
    for expected in ["1", "2", "3"] {
        assert_eq!(cli(server, &["INCR", "n"]), (true, expected.into()));
    }
    assert_eq!(cli(server, &["INCRBY", "n", "-10"]), (true, "-7".into()));
    assert_eq!(
        cli(server, &["INCR", "from-cli"]),
        (true, "ERR value is not an integer or out of range".into())
    );
    assert_eq!(
        cli(server, &["DEL", "from-cli", "absent"]),
        (true, "1".into())
    );
    assert_eq!(cli(server, &["DBSIZE"]), (true, "1".into()));
}

#[test]
fn redis_cli_and_redis_benchmark_drive_the_service_inside_an_unprotected_vm() {
    if !available(true) {
        return;
    }
    let vm = KvmVm::new(VmConfig::new(Program::Kv, MEM, DirtyTracking::Classic)).unwrap();
    let server = serve(vm.kv_device().unwrap());
    check_commands(&server);
    let lines = benchmark(
        &server,
        &["-n", "5000", "-c", "8", "-t", "set,get,incr"],
        &["SET:", "GET:", "INCR:"],
    );
    eprintln!("unprotected VM: {}", lines.join(" | "));
    // redis-benchmark's INCR hits one counter 5000 times.
    assert_eq!(
        cli(&server, &["GET", "counter:__rand_int__"]),
        (true, "5000".into())
    );
    assert_eq!(vm.guest_stop(), None);
    assert!(vm.console().contains("kv: ready"));
}

/// Replicates `vm` every `epoch` until told to stop, verifying each epoch and
/// declaring it committed; returns the VM, the replication and the epochs done.
fn protect(
    mut vm: KvmVm,
    epoch: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(KvmVm, LocalReplication, u64)> {
    std::thread::spawn(move || {
        let geometry = Geometry::new(MEM as u64, 64).unwrap();
        let mut replication =
            LocalReplication::new(EncoderConfig::new(geometry, Mode::Fgbi)).unwrap();
        let mut epochs = 0;
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(epoch);
            let report = replication.checkpoint(&mut vm, true).unwrap();
            assert_eq!(report.verified, Some(true), "epoch {}", report.epoch);
            vm.committed(report.epoch);
            epochs = report.epoch;
        }
        (vm, replication, epochs)
    })
}

#[test]
fn redis_tools_drive_the_service_inside_a_protected_vm_with_output_commit() {
    if !available(true) {
        return;
    }
    let mut config = VmConfig::new(Program::Kv, MEM, DirtyTracking::Classic);
    config.output_commit = true;
    let vm = KvmVm::new(config).unwrap();
    let device = vm.kv_device().unwrap();
    let server = serve(Arc::clone(&device));
    let stop = Arc::new(AtomicBool::new(false));
    let replicating = protect(vm, Duration::from_millis(10), Arc::clone(&stop));
    check_commands(&server);
    let started = Instant::now();
    let lines = benchmark(
        &server,
        &["-n", "1000", "-c", "8", "-t", "set,get"],
        &["SET:", "GET:"],
    );
    eprintln!(
        "protected VM, 10 ms epochs: {} ({:?})",
        lines.join(" | "),
        started.elapsed()
    );
    stop.store(true, Ordering::Release);
    let (vm, _, epochs) = replicating.join().unwrap();
    assert!(epochs > 0);
    assert_eq!(vm.guest_stop(), None);
    eprintln!("{epochs} epochs, every one verified");
}

#[test]
fn a_reply_leaves_only_after_its_epoch_is_committed_and_the_store_survives_failover() {
    if !available(false) {
        return;
    }
    let mut config = VmConfig::new(Program::Kv, MEM, DirtyTracking::Classic);
    config.output_commit = true;
    let mut vm = KvmVm::new(config).unwrap();
    let device = vm.kv_device().unwrap();
    let set = device.submit(encode_request([&b"SET"[..], b"kept", b"safe"]).unwrap());
    // The guest answers in epoch 1; the reply is held.
    let deadline = Instant::now() + WAIT;
    while device.held() == 0 {
        assert!(Instant::now() < deadline, "the guest never answered");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(device.wait_reply(set, Duration::from_millis(200)), None);
    let geometry = Geometry::new(MEM as u64, 64).unwrap();
    let mut replication = LocalReplication::new(EncoderConfig::new(geometry, Mode::Fgbi)).unwrap();
    let report = replication.checkpoint(&mut vm, true).unwrap();
    assert_eq!((report.epoch, report.verified), (1, Some(true)));
    // Checkpointed but not yet acknowledged: still held.
    assert_eq!(device.wait_reply(set, Duration::ZERO), None);
    vm.committed(report.epoch);
    assert_eq!(device.wait_reply(set, WAIT).unwrap(), b"+OK\r\n");

    // The primary dies; the VM restored from the replica holds the key.
    drop(vm);
    let mut restored_config = config;
    restored_config.output_commit = false;
    let (restored, _) =
        KvmVm::restore(restored_config, replication.replica(), replication.state()).unwrap();
    let device = restored.kv_device().unwrap();
    let get = device.submit(encode_request([&b"GET"[..], b"kept"]).unwrap());
    assert_eq!(device.wait_reply(get, WAIT).unwrap(), b"$4\r\nsafe\r\n");
}
