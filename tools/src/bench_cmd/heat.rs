//! The C heat solver (examples/heat) as a bench program: compiled from the sources
//! built into this binary against the libfgbi.so beside it, run unprotected, run
//! protected through a backup process to the end, and run again and killed halfway,
//! to be resumed by the backup and end with the unprotected run's checksum.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fgbi::bench::FailoverMs;
use fgbi_engine::Mode;

use super::programs::{ProgramSettings, Round};
use crate::children::{
    Kill, Scratch, StderrLog, field, free_port, lines, shell_quote, wait_for, wait_for_all,
    write_key,
};
use crate::demo_cmd::{restart_parts, transport_flags};

/// The solver's source and the header it includes, as this binary was built with.
const SOURCE: &str = include_str!("../../../examples/heat/heat.c");
const HEADER: &str = include_str!("../../../include/fgbi.h");
/// The C library heat links, looked for beside this executable.
const LIBRARY: &str = "libfgbi.so";
/// Solver threads.
const THREADS: &str = "2";
/// How long a heat run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The directory holding the libfgbi.so beside this executable, or in its `deps`
/// (where cargo leaves the one its tests build), the newer of the two; what to do
/// if there is none.
fn library_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("this executable has no directory")?;
    [dir.to_path_buf(), dir.join("deps")]
        .into_iter()
        .filter_map(|d| {
            let modified = std::fs::metadata(d.join(LIBRARY)).and_then(|m| m.modified());
            Some((modified.ok()?, d))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, d)| d)
        .ok_or_else(|| {
            format!(
                "the heat program links {LIBRARY}, which is not in {}: build it beside fgbi with `cargo build --release` (the whole workspace), or leave heat out of --workload",
                dir.display()
            )
        })
}

/// Whether heat can be built and run here; what to do if not.
pub fn check() -> Result<(), String> {
    let cc = Command::new("cc")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !cc.is_ok_and(|s| s.success()) {
        return Err("the heat program is C, and there is no C compiler (cc): install gcc, or leave heat out of --workload".into());
    }
    library_dir().map(drop)
}

/// Compiles heat into `dir` against the library in `lib`; its path.
fn build(dir: &Path, lib: &Path) -> Result<PathBuf, String> {
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text)
            .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))
    };
    write("heat.c", SOURCE)?;
    write("fgbi.h", HEADER)?;
    let program = dir.join("heat");
    let out = Command::new("cc")
        .args(["-O2", "-std=c99", "-o"])
        .arg(&program)
        .arg("-I")
        .arg(dir)
        .arg(dir.join("heat.c"))
        .arg("-L")
        .arg(lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lfgbi", "-pthread"])
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cc could not build heat: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(program)
}

/// Bytes heat protects for an `n` x `n` grid: two grids, each rounded up to 2 MiB.
pub fn protected_bytes(n: u64) -> u64 {
    2 * (n * n * 8).next_multiple_of(2 << 20)
}

/// The fields of heat's `heat: result k=v ...` line.
struct Report(HashMap<String, String>);

impl Report {
    fn parse(line: &str) -> Result<Self, String> {
        let rest = line
            .strip_prefix("heat: result ")
            .ok_or_else(|| format!("not heat's result line: {line}"))?;
        Ok(Self(
            rest.split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    fn text(&self, key: &str) -> Result<&str, String> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("heat's result line has no {key}"))
    }

    fn number(&self, key: &str) -> Result<f64, String> {
        self.text(key)?
            .parse()
            .map_err(|_| format!("heat's {key} is not a number"))
    }
}

/// One heat process, its arguments, run to its end; its result line.
fn run_to_end(run: &Run, args: &[String]) -> Result<Report, String> {
    let mut child = Kill(
        run.command(&run.heat)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(run.logs[1].stdio()?)
            .spawn()
            .map_err(|e| format!("cannot start heat: {e}"))?,
    );
    let out = lines(&mut child.0)?;
    let line = wait_for(&out, "heat: result ", RUN_TIMEOUT)?;
    let status = child.0.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("heat ended with {status}: {line}"));
    }
    Report::parse(&line)
}

/// A round's heat runs: what they share.
struct Run<'a> {
    settings: &'a ProgramSettings,
    /// Where the library heat links is.
    lib: PathBuf,
    heat: PathBuf,
    key: PathBuf,
    positional: Vec<String>,
    logs: [StderrLog; 2],
}

impl Run<'_> {
    /// A command for `program` (heat, or the backup that restarts it) that loads
    /// the library heat was built against, whatever `LD_LIBRARY_PATH` said.
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command.env("LD_LIBRARY_PATH", &self.lib);
        command
    }

    /// Starts `fgbi backup`, restarting heat from its replica when heat dies; its
    /// output (the restarted heat's with it) as lines.
    fn backup(&self, port: u16) -> Result<(Kill, mpsc::Receiver<String>), String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let restart = format!(
            "exec {} {}",
            shell_quote(&self.heat),
            self.positional.join(" ")
        );
        let mut backup = Kill(
            self.command(&exe)
                .args(["backup", "--listen", &format!("127.0.0.1:{port}")])
                .arg("--key")
                .arg(&self.key)
                .args(["--mem", &protected_bytes(self.settings.heat_n).to_string()])
                .args(transport_flags(&self.settings.link, None))
                .args(["--restart", &restart])
                .stdout(Stdio::piped())
                .stderr(self.logs[0].stdio()?)
                .spawn()
                .map_err(|e| format!("cannot start the backup: {e}"))?,
        );
        let out = lines(&mut backup.0)?;
        wait_for(&out, "listening", Duration::from_secs(10))?;
        Ok((backup, out))
    }

    /// Heat's arguments, protected in `mode` by the backup on `port`.
    fn protected(&self, mode: Mode, port: u16) -> Vec<String> {
        let mut args = self.positional.clone();
        args.extend(["--mode".into(), mode.to_string()]);
        args.extend(["--backup".into(), format!("127.0.0.1:{port}")]);
        args.extend(["--key".into(), self.key.display().to_string()]);
        // heat takes the transport and the device; port and GID are the defaults.
        let link = &self.settings.link;
        args.extend(["--transport".into(), link.transport.clone()]);
        if let Some(device) = &link.rdma_device {
            args.extend(["--rdma-device".into(), device.clone()]);
        }
        args
    }
}

/// One round in `mode`: heat unprotected, protected to its end, and protected and
/// killed once half its checkpoints are committed, then resumed by the backup.
pub fn round(settings: &ProgramSettings, mode: Mode) -> Result<Round, String> {
    let dir = Scratch::new()?;
    let logs = [
        StderrLog::new(&dir.0, "backup", true),
        StderrLog::new(&dir.0, "heat", true),
    ];
    let lib = library_dir()?;
    let run = Run {
        settings,
        heat: build(&dir.0, &lib)?,
        lib,
        key: write_key(&dir.0)?,
        positional: [
            settings.heat_n.to_string(),
            settings.heat_iterations.to_string(),
            THREADS.to_string(),
            settings.epoch_ms.to_string(),
        ]
        .to_vec(),
        logs,
    };
    measured(&run, mode).map_err(|e| {
        let tails: String = run.logs.iter().map(StderrLog::tail).collect();
        format!("{e}{tails}")
    })
}

/// [`round`]'s runs.
fn measured(run: &Run, mode: Mode) -> Result<Round, String> {
    let iterations = run.settings.heat_iterations as f64;
    let mut args = run.positional.clone();
    args.push("--unprotected".into());
    let unprotected = run_to_end(run, &args)?;
    let checksum = unprotected.text("checksum")?.to_string();

    // Protected to its end; the backup then restarts it at its last iteration.
    let port = free_port()?;
    let (backup, out) = run.backup(port)?;
    let protected = run_to_end(run, &run.protected(mode, port))?;
    wait_for(&out, "restarted command ended", Duration::from_secs(30))?;
    drop(backup);

    // Protected and killed halfway through its iterations, once the backup holds
    // checkpoints of it.
    let port = free_port()?;
    let (_backup, out) = run.backup(port)?;
    let half = (run.settings.heat_iterations / 2).max(1);
    let mut heat = Kill(
        run.command(&run.heat)
            .args(run.protected(mode, port))
            .args(["--progress".to_string(), half.to_string()])
            .stdout(Stdio::piped())
            .stderr(run.logs[1].stdio()?)
            .spawn()
            .map_err(|e| format!("cannot start heat: {e}"))?,
    );
    let progress = lines(&mut heat.0)?;
    for _ in 0..2 {
        wait_for(&out, "committed ", Duration::from_secs(30))?;
    }
    wait_for(&progress, "heat: iteration ", RUN_TIMEOUT)?;
    if heat.0.try_wait().map_err(|e| e.to_string())?.is_some() {
        return Err("heat ended before it was killed: raise its iterations".into());
    }
    let killed_at = SystemTime::now();
    heat.0
        .kill()
        .map_err(|e| format!("cannot kill heat: {e}"))?;
    let _ = heat.0.wait();
    // The restarted heat's lines and the backup's come in no set order.
    let [line, ready, first, result, _] = wait_for_all(
        &out,
        [
            "failover ",
            "restarted pid=",
            "heat: first iteration after the restart done",
            "heat: result ",
            "restarted command ended",
        ],
        RUN_TIMEOUT,
    )?;
    let failover = restart_parts(&line, &ready, killed_at);
    let first_ns = field(&first, "at_unix_ns=", ' ')
        .and_then(|v| v.parse::<u128>().ok())
        .ok_or_else(|| format!("no time in heat's line: {first}"))?;
    let resumed = Report::parse(&result)?;

    let killed_ns = killed_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let total_us = first_ns.saturating_sub(killed_ns) as f64 / 1e3;
    let restore = failover.restore + failover.replay;
    let resumed_checksum = resumed.text("checksum")?;
    let pause = |q: &str| protected.number(&format!("pause_us_{q}"));
    Ok(Round {
        unprotected: iterations / unprotected.number("seconds")?,
        protected: iterations / protected.number("seconds")?,
        checkpoints: protected.number("epochs")? as u64,
        wire_bytes: protected.number("wire_bytes")? as u64,
        pauses: Vec::new(),
        pause_percentiles: Some([pause("p50")?, pause("p99")?, pause("max")?]),
        failover: FailoverMs {
            detect: failover.detect / 1e3,
            apply: failover.apply / 1e3,
            restore: restore / 1e3,
            first_run: (total_us - failover.detect - failover.apply - restore).max(0.0) / 1e3,
            total: total_us / 1e3,
        },
        verified: resumed_checksum == checksum,
        check: format!(
            "resumed at epoch {}, checksum {resumed_checksum} (unprotected {checksum})",
            failover.epoch
        ),
    })
}
