//! The key-value service (examples/kv) as a bench program: `redis-benchmark` drives
//! it unprotected and protected by a backup process, then the demo's clients load it
//! while it is killed and check that the restarted service lost no acknowledged
//! write.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fgbi::bench::FailoverMs;
use fgbi_engine::Mode;

use super::programs::{ProgramSettings, Round};
use crate::children::{Kill, free_port, lines, wait_for};
use crate::demo_cmd::{DemoArgs, run_service};

/// `redis-benchmark`'s tests: a write, a read and an increment per round of keys.
const TESTS: &str = "set,get,incr";
/// How many tests [`TESTS`] names.
const TEST_COUNT: u64 = 3;
/// Connections `redis-benchmark` opens.
const CONNECTIONS: &str = "50";
/// Requests each connection pipelines.
const PIPELINE: &str = "16";
/// Random keys `redis-benchmark` draws from: a small fraction of the store's table,
/// which the demo's clients fill to half.
const KEYSPACE: &str = "10000";

/// Whether `redis-benchmark` can be run; what to do if not.
pub fn check() -> Result<(), String> {
    match Command::new("redis-benchmark")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        _ => Err(
            "the kv program is driven by redis-benchmark, which is not installed: install redis-tools (apt-get install redis-tools) or leave kv out of --workload".into(),
        ),
    }
}

/// One round in `mode`: `redis-benchmark` against the unprotected service, then
/// against the protected one, which is then loaded by the demo's clients, killed,
/// restarted by its backup and checked.
pub fn round(settings: &ProgramSettings, mode: Mode) -> Result<Round, String> {
    let unprotected = unprotected_rate(settings)?;
    let mut protected = 0.0;
    let args = DemoArgs::service(
        mode,
        settings.mem,
        settings.epoch_ms,
        settings.link.clone(),
        [settings.kill_after_ms, settings.after_ms],
    );
    let outcome = run_service(&args, true, &mut |addr| {
        protected = redis_benchmark(addr, settings.requests)?;
        Ok(())
    })?;
    let f = &outcome.failover;
    let restore = f.restore + f.replay;
    let failover = FailoverMs {
        detect: f.detect / 1e3,
        apply: f.apply / 1e3,
        restore: restore / 1e3,
        first_run: (f.first_reply - f.detect - f.apply - restore).max(0.0) / 1e3,
        total: f.first_reply / 1e3,
    };
    Ok(Round {
        unprotected,
        protected,
        checkpoints: outcome.stats.pauses.len() as u64,
        wire_bytes: outcome.stats.wire_bytes,
        pauses: outcome.stats.pauses,
        pause_percentiles: None,
        failover,
        verified: outcome.lost == 0,
        check: format!(
            "{} of {} acknowledged writes lost",
            outcome.lost, outcome.acknowledged
        ),
    })
}

/// Requests per second of `redis-benchmark` against the service with no protection
/// (`fgbi kv --unprotected`).
fn unprotected_rate(settings: &ProgramSettings) -> Result<f64, String> {
    let port = free_port()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut service = Kill(
        Command::new(exe)
            .args(["kv", "--unprotected", "--port", &port.to_string()])
            .args(["--mem", &settings.mem.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the unprotected service: {e}"))?,
    );
    let out = lines(&mut service.0)?;
    wait_for(&out, "kv: listening", Duration::from_secs(30))?;
    redis_benchmark(SocketAddr::from(([127, 0, 0, 1], port)), settings.requests)
}

/// Runs `redis-benchmark` against `addr`, `requests` of each test; requests per
/// second over its whole run.
fn redis_benchmark(addr: SocketAddr, requests: u64) -> Result<f64, String> {
    let started = Instant::now();
    let output = Command::new("redis-benchmark")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args([
            "-n",
            &requests.to_string(),
            "-c",
            CONNECTIONS,
            "-P",
            PIPELINE,
        ])
        .args(["-r", KEYSPACE, "-t", TESTS, "-q"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run redis-benchmark: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&output.stdout);
    // It exits 0 even when requests failed; their errors are on its output.
    if !output.status.success() || text.contains("ERR") || text.contains("Error") {
        return Err(format!(
            "redis-benchmark against {addr} failed ({}): {}{}",
            output.status,
            text.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok((requests * TEST_COUNT) as f64 / seconds)
}
