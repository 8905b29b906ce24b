//! Helpers of the tests that run `fgbi primary` and `fgbi backup` as processes.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
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

pub fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("link.key");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap()
        .write_all(b"0123456789abcdef0123456789abcdef")
        .unwrap();
    path
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

/// A child killed when dropped, so a failing test leaves none behind.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port of loopback that was free a moment ago, below the kernel's ephemeral
/// range: a service restarted on it must bind it again, and an outgoing connection
/// (a client reconnecting to it) can take a port of that range meanwhile.
pub fn free_port() -> u16 {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let first_ephemeral: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let lowest = 10_000u32;
    let span = first_ephemeral.saturating_sub(lowest).max(1);
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = std::process::id().wrapping_mul(7919) ^ calls.wrapping_mul(104_729);
    (0..span)
        .filter_map(|i| u16::try_from(lowest + start.wrapping_add(i) % span).ok())
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port below the ephemeral range")
}
