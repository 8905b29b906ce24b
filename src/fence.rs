//! Fencing: before the backup fails over, make sure the primary cannot run on.
//!
//! The backup cannot tell a dead primary from one it merely cannot hear (a network
//! partition): failing over in the second case leaves two copies running. An
//! operator-given fence command (power the primary's host off through IPMI, stop its
//! instance through the cloud's API, shut its switch port) runs first; only its
//! success lets the backup fail over. Without one the backup fails over on silence
//! alone and says, at start and at failover, which risk it takes.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How the backup fences the primary.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    /// Run with `/bin/sh -c` before failing over; must exit 0. `None`: no fencing.
    pub command: Option<String>,
    /// How long the command may run; beyond it, it is killed and counts as failed.
    pub timeout: Duration,
    /// After a failed fence, how long to wait for the primary to reconnect before
    /// fencing again.
    pub retry: Duration,
    /// Whoever started this backup crashes the primary itself (the bench): its
    /// silence is its death, so there is nothing to fence and nothing to warn about.
    pub primary_known_dead: bool,
}

/// Why the fence did not succeed: the backup must not fail over.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The command could not be started.
    #[error("cannot run the fence command: {0}")]
    Spawn(#[source] std::io::Error),
    /// The command failed.
    #[error("the fence command failed ({0}): the primary may still run")]
    Failed(std::process::ExitStatus),
    /// The command ran too long and was killed.
    #[error(
        "the fence command did not finish within {0:?} and was killed: the primary may still run"
    )]
    TimedOut(Duration),
    /// Waiting for the command failed.
    #[error("cannot wait for the fence command: {0}")]
    Wait(#[source] std::io::Error),
}

/// The warning of a backup without a fence command.
pub const UNFENCED_WARNING: &str = "WARNING: no fence command (--fence): if the primary is only cut off from this backup, failing over leaves two copies running";

impl Fence {
    /// Fences the primary last heard at `primary` (its address as this backup saw
    /// it), whose replica is at `epoch`: runs the command with `FGBI_FENCE_PRIMARY`
    /// (`ip:port`), `FGBI_FENCE_PRIMARY_IP` and `FGBI_FENCE_EPOCH` in its
    /// environment. `Ok(false)` when there is no command (nothing was fenced).
    pub fn run(&self, primary: Option<SocketAddr>, epoch: u64) -> Result<bool, FenceError> {
        let Some(command) = &self.command else {
            return Ok(false);
        };
        let mut shell = Command::new("/bin/sh");
        shell
            .arg("-c")
            .arg(command)
            .env("FGBI_FENCE_EPOCH", epoch.to_string())
            .stdin(Stdio::null());
        if let Some(primary) = primary {
            shell
                .env("FGBI_FENCE_PRIMARY", primary.to_string())
                .env("FGBI_FENCE_PRIMARY_IP", primary.ip().to_string());
        }
        let mut child = shell.spawn().map_err(FenceError::Spawn)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match child.try_wait().map_err(FenceError::Wait)? {
                Some(status) if status.success() => return Ok(true),
                Some(status) => return Err(FenceError::Failed(status)),
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(FenceError::TimedOut(self.timeout));
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(command: &str, timeout_ms: u64) -> Fence {
        Fence {
            command: Some(command.into()),
            timeout: Duration::from_millis(timeout_ms),
            retry: Duration::from_secs(1),
            primary_known_dead: false,
        }
    }

    #[test]
    fn success_failure_and_timeout_are_told_apart() {
        let addr: SocketAddr = "192.0.2.7:7700".parse().unwrap();
        let check = r#"test "$FGBI_FENCE_PRIMARY" = 192.0.2.7:7700 && test "$FGBI_FENCE_PRIMARY_IP" = 192.0.2.7 && test "$FGBI_FENCE_EPOCH" = 42"#;
        assert!(fence(check, 10_000).run(Some(addr), 42).unwrap());
        assert!(matches!(
            fence(check, 10_000).run(Some(addr), 41),
            Err(FenceError::Failed(_))
        ));
        assert!(matches!(
            fence("exec sleep 30", 100).run(None, 1),
            Err(FenceError::TimedOut(_))
        ));
        assert!(!Fence::default().run(None, 1).unwrap());
    }
}
