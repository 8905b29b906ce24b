//! Helpers of the tests that run `fgbi primary` and `fgbi backup` as processes.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

/// The `fgbi` command's own helpers: children killed when dropped ([`children::Kill`]),
/// key files, ports.
#[path = "../../src/children.rs"]
pub mod children;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// The lines `from` writes, as they come.
pub fn lines(from: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `text`, keeping every line seen in `seen`.
pub fn wait_for(rx: &Receiver<String>, text: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push(line.clone());
        if line.contains(text) {
            return line;
        }
    }
    panic!("no line with {text:?}; seen: {seen:#?}");
}

/// A fresh owner-only key file in `dir`.
pub fn key_file(dir: &Path) -> PathBuf {
    children::write_key(dir).unwrap()
}

/// A fresh scratch directory named for `name` and this process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fgbi-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A variable of the environment, unless unset or empty.
pub fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// `--rdma-device` with the device `var` names, if it names one (the Soft-RoCE guest,
/// tests/rdma/guest.sh, sets `FGBI_RDMA_DEVICE_A` for the primary and `_B` for the
/// backup).
pub fn device(var: &str) -> Vec<String> {
    env(var)
        .map(|d| vec!["--rdma-device".to_string(), d])
        .unwrap_or_default()
}

/// `--transport` from `FGBI_TEST_TRANSPORT` and `--heartbeat-ms` from
/// `FGBI_TEST_HEARTBEAT_MS` (else `heartbeat_ms`): the link the Soft-RoCE guest runs
/// these tests over.
pub fn link(heartbeat_ms: u64) -> Vec<String> {
    let mut flags = vec![
        "--heartbeat-ms".to_string(),
        env("FGBI_TEST_HEARTBEAT_MS").unwrap_or_else(|| heartbeat_ms.to_string()),
    ];
    if let Some(transport) = env("FGBI_TEST_TRANSPORT") {
        flags.extend(["--transport".to_string(), transport]);
    }
    flags
}

/// A TCP port of loopback that was free a moment ago, below the kernel's ephemeral
/// range (as the `fgbi` command's own).
pub fn free_port() -> u16 {
    children::free_port().unwrap()
}
