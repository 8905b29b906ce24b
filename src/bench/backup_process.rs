//! The backup of the networked pass, in a process of its own: the `fgbi` executable
//! run as `fgbi bench-backup --spec JSON` (a hidden subcommand that calls
//! [`serve`]). It listens on loopback, holds the replica, fails over when the bench
//! crashes its primary, and reports on its stdout, one JSON object per line
//! ([`BackupEvent`]): where it listens, every commit, the failover in parts.
//!
//! The bench's side is [`BackupProcess`]: it starts the process, reads its events,
//! and kills and reaps it whenever it is dropped before the process ended, on every
//! error path. The process also dies with the bench (`PR_SET_PDEATHSIG`), however
//! the bench ends; Ctrl-C reaches both, as they share the terminal's process group.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fgbi_hyp::memory::Region;
use fgbi_hyp::protected::HypError;
use fgbi_hyp::synthetic::SyntheticMachine;
use serde::{Deserialize, Serialize};

use super::error::BenchError;
use super::link::{LinkSpec, MAX_STATE, SLOTS};
use super::source::{Source, mem_usize};
use crate::backup::{self, BackupOptions};
use crate::fence::Fence;

/// The hidden subcommand of the `fgbi` executable that runs [`serve`].
pub const SUBCOMMAND: &str = "bench-backup";
/// How long the backup process may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// From the primary's crash, how long the backup may take to fail over and report
/// (detection alone may take the liveness timeout).
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// After the primary's end failed, how long to wait for the backup's own reason.
const REASON_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a backup that reported its failover may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// One line of the backup process's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BackupEvent {
    /// It listens for the primary at `address`.
    Listening {
        /// The loopback address and port.
        address: SocketAddr,
    },
    /// It committed every epoch up to `epoch`.
    Committed {
        /// The epoch.
        epoch: u64,
    },
    /// The primary died and the program runs on the backup.
    Failover {
        /// The epoch the replica held.
        epoch: u64,
        /// The replica's xxh3-128 digest at that epoch, 32 hex digits.
        digest: Option<String>,
        /// When it declared the primary dead, nanoseconds since the Unix epoch.
        detected_unix_ns: u64,
        /// Abandoning the connection (the replica changes by whole epochs only),
        /// nanoseconds.
        finish_ns: u64,
        /// Rebuilding the program from the replica and state blob, nanoseconds.
        restore_ns: u64,
        /// The restored program's first step, nanoseconds.
        first_run_ns: u64,
        /// Why it declared the primary dead.
        cause: String,
    },
    /// It failed; the process exits with status 1.
    Failed {
        /// Why.
        message: String,
    },
}

/// What the backup process did when the primary died.
#[derive(Clone, Debug)]
pub struct Takeover {
    /// The epoch its replica held.
    pub epoch: u64,
    /// The replica's digest at that epoch.
    pub digest: Option<u128>,
    /// The last commit it reported.
    pub committed: u64,
    /// When it declared the primary dead.
    pub detected_at: SystemTime,
    /// Abandoning the connection (the replica only changes by whole epochs).
    pub finish: Duration,
    /// Rebuilding the program from the replica and the state blob.
    pub restore: Duration,
    /// The restored program's first step.
    pub first_run: Duration,
}

/// A running backup process; killed and reaped when dropped before it ended.
pub struct BackupProcess {
    child: Child,
    reaped: bool,
    events: Receiver<BackupEvent>,
    stderr: Option<JoinHandle<String>>,
    address: SocketAddr,
    committed: u64,
}

impl BackupProcess {
    /// Starts `program` (the `fgbi` executable) as the backup of `spec` and waits
    /// until it listens.
    pub fn spawn(program: &Path, spec: &LinkSpec) -> Result<Self, BenchError> {
        let spec = serde_json::to_string(spec)
            .map_err(|e| BenchError::Backup(format!("cannot describe the link: {e}")))?;
        let mut command = Command::new(program);
        command
            .args([SUBCOMMAND, "--spec", &spec])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let bench = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid, _exit), touching no memory
        // shared with the parent.
        unsafe {
            command.pre_exec(move || {
                // Die with the bench, however it ends (the thread that forks stays
                // alive while the process runs).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The bench died before the line above took effect.
                if u32::try_from(libc::getppid()).ok() != Some(bench) {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| BenchError::Io {
            what: format!(
                "cannot start the backup process {} {SUBCOMMAND}",
                program.display()
            ),
            source,
        })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BenchError::Backup("its output is not piped".into()));
        };
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let event = serde_json::from_str(&line).unwrap_or_else(|e| BackupEvent::Failed {
                    message: format!("unreadable report line {line:?}: {e}"),
                });
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        let mut process = Self {
            child,
            reaped: false,
            events,
            stderr: Some(stderr),
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            committed: 0,
        };
        match process.next(START_TIMEOUT)? {
            BackupEvent::Listening { address } => process.address = address,
            other => {
                return Err(BenchError::Backup(format!(
                    "its first report was {other:?}, not where it listens"
                )));
            }
        }
        Ok(process)
    }

    /// Where it listens for the primary.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// After the primary's crash: waits for the failover's report and for the
    /// process to exit.
    pub fn takeover(mut self) -> Result<Takeover, BenchError> {
        let takeover = loop {
            match self.next(TAKEOVER_TIMEOUT)? {
                BackupEvent::Failover {
                    epoch,
                    digest,
                    detected_unix_ns,
                    finish_ns,
                    restore_ns,
                    first_run_ns,
                    cause: _,
                } => {
                    let digest = digest
                        .map(|d| {
                            u128::from_str_radix(&d, 16)
                                .map_err(|_| BenchError::Backup(format!("bad digest {d:?}")))
                        })
                        .transpose()?;
                    break Takeover {
                        epoch,
                        digest,
                        committed: self.committed,
                        detected_at: UNIX_EPOCH + Duration::from_nanos(detected_unix_ns),
                        finish: Duration::from_nanos(finish_ns),
                        restore: Duration::from_nanos(restore_ns),
                        first_run: Duration::from_nanos(first_run_ns),
                    };
                }
                BackupEvent::Listening { .. } => {
                    return Err(BenchError::Backup("it reported listening twice".into()));
                }
                // Commits are counted by `next`; failures returned by it.
                BackupEvent::Committed { .. } | BackupEvent::Failed { .. } => {}
            }
        };
        let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.reaped = true;
                    if !status.success() {
                        return Err(BenchError::Backup(format!(
                            "it exited with {status} after its failover{}",
                            self.stderr_text()
                        )));
                    }
                    return Ok(takeover);
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    return Err(BenchError::Backup(format!(
                        "it did not exit within {EXIT_TIMEOUT:?} of its failover"
                    )));
                }
                Err(e) => return Err(BenchError::Backup(format!("cannot wait for it: {e}"))),
            }
        }
    }

    /// After the primary's end failed: the backup's own failure, if it reports one
    /// soon (it is the better reason: a primary fails when its backup did); the
    /// process is killed when `self` goes.
    pub fn failure(mut self) -> Option<BenchError> {
        loop {
            match self.next(REASON_TIMEOUT) {
                Ok(_) => {}
                Err(BenchError::Backup(reason)) if reason.starts_with(SILENT) => return None,
                Err(e) => return Some(e),
            }
        }
    }

    /// The next event (counting commits), within `timeout`; its failure, or its end
    /// without a report, as an error.
    fn next(&mut self, timeout: Duration) -> Result<BackupEvent, BenchError> {
        match self.events.recv_timeout(timeout) {
            Ok(BackupEvent::Failed { message }) => Err(BenchError::Backup(message)),
            Ok(event) => {
                if let BackupEvent::Committed { epoch } = event {
                    self.committed = epoch;
                }
                Ok(event)
            }
            Err(RecvTimeoutError::Timeout) => Err(BenchError::Backup(format!(
                "{SILENT} for {timeout:?} (pid {})",
                self.child.id()
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait();
                self.reaped = true;
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                Err(BenchError::Backup(format!(
                    "it ended ({status}) without reporting a failover{}",
                    self.stderr_text()
                )))
            }
        }
    }

    /// What it wrote on stderr, after a colon, once it ended.
    fn stderr_text(&mut self) -> String {
        let text = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        }
    }
}

/// How a timeout's message starts.
const SILENT: &str = "it said nothing";

impl Drop for BackupProcess {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The backup process's body (`fgbi bench-backup --spec JSON`): serves one primary
/// of the link `spec` describes until it dies, fails over, and reports every step
/// on stdout as [`BackupEvent`] lines; exits with status 1 after a `failed` line.
pub fn serve(spec: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match serve_to(spec, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            emit(
                &mut out,
                &BackupEvent::Failed {
                    message: e.to_string(),
                },
            );
            ExitCode::FAILURE
        }
    }
}

fn serve_to(spec: &str, out: &mut impl Write) -> Result<(), BenchError> {
    let spec: LinkSpec =
        serde_json::from_str(spec).map_err(|e| BenchError::Setting(format!("bad --spec: {e}")))?;
    let encoder = spec.encoder()?;
    let mem = mem_usize(encoder.geometry)?;
    let tracking = spec.tracking()?;
    let key = spec.key()?;
    let workload = Source::open(&spec.workload)?.workload_factory();
    let options = BackupOptions {
        encoder,
        transport: spec.transport()?,
        slots: SLOTS,
        max_state: MAX_STATE,
        digest: true,
        // The bench crashes its own primary: it is known dead, nothing to fence.
        fence: Fence {
            primary_known_dead: true,
            ..Fence::default()
        },
        metrics: None,
    };
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| BenchError::Io {
            what: "cannot listen on loopback".into(),
            source,
        })?;
    let address = listener.local_addr().map_err(|source| BenchError::Io {
        what: "cannot read the listening address".into(),
        source,
    })?;
    emit(out, &BackupEvent::Listening { address });
    let replica = Region::new(mem).map_err(HypError::from)?;
    let (report, program) = backup::run(
        &listener,
        &options,
        &key,
        replica,
        |replica, state, _| SyntheticMachine::restore_with(replica, state, tracking, workload),
        |program: &mut SyntheticMachine| program.run(),
        |epoch| emit(out, &BackupEvent::Committed { epoch }),
    )?;
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    emit(
        out,
        &BackupEvent::Failover {
            epoch: report.epoch,
            digest: report.digest.map(|d| format!("{d:032x}")),
            detected_unix_ns: ns(report
                .detected_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()),
            finish_ns: ns(report.finish),
            restore_ns: ns(report.restore),
            first_run_ns: ns(report.first_run),
            cause: report.cause,
        },
    );
    drop(program);
    Ok(())
}

/// Writes `event` as one line; a closed stdout (the bench gone) changes nothing.
fn emit(out: &mut impl Write, event: &BackupEvent) {
    if let Ok(line) = serde_json::to_string(event) {
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_one_json_line_each() {
        let events = [
            BackupEvent::Listening {
                address: "127.0.0.1:4000".parse().unwrap(),
            },
            BackupEvent::Committed { epoch: 7 },
            BackupEvent::Failover {
                epoch: 7,
                digest: Some(format!("{:032x}", u128::MAX - 5)),
                detected_unix_ns: 1_700_000_000_000_000_000,
                finish_ns: 1,
                restore_ns: 2,
                first_run_ns: 3,
                cause: "the primary closed the connection".into(),
            },
            BackupEvent::Failed {
                message: "no\nline breaks".into(),
            },
        ];
        let mut out = Vec::new();
        for e in &events {
            emit(&mut out, e);
        }
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), events.len());
        assert!(text.starts_with(r#"{"event":"listening","address":"127.0.0.1:4000"}"#));
        let back: Vec<BackupEvent> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, events);
    }

    #[test]
    fn a_bad_spec_is_refused_with_a_reason() {
        let mut out = Vec::new();
        let e = serve_to("{not json", &mut out).unwrap_err();
        assert!(e.to_string().contains("bad --spec"), "{e}");
    }
}
