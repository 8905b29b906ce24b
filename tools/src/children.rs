//! The child processes of `fgbi demo` and `fgbi bench`'s programs: started with
//! their output read line by line, killed when dropped, in a scratch directory with
//! a fresh link key.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `path` quoted for `/bin/sh`.
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory in the system's temporary directory.
    pub fn new() -> Result<Self, String> {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let made = MADE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fgbi-{}-{made}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover directory in the temporary directory is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port free on 127.0.0.1 a moment ago, below the kernel's ephemeral range.
///
/// A restarted service must bind its port again. A port of the ephemeral range can
/// meanwhile be taken as the local port of any outgoing connection (a client
/// reconnecting to it may even connect to itself), and the restart would fail; a
/// port below the range is never handed out that way.
pub fn free_port() -> Result<u16, String> {
    const LOWEST: u16 = 10_000;
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if first_ephemeral <= LOWEST + 1000 {
        // Too little room below the range: take what the kernel hands out.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("cannot find a free port: {e}"));
    }
    let span = u32::from(first_ephemeral - LOWEST);
    // Start somewhere different in each process and call.
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let calls = CALLS.fetch_add(1, Ordering::Relaxed);
    let start = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(calls.wrapping_mul(104_729));
    (0..span)
        .map(|i| LOWEST + ((start.wrapping_add(i)) % span) as u16)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .ok_or_else(|| {
            format!(
                "cannot find a free port between {LOWEST} and {first_ephemeral}: every one is taken"
            )
        })
}

/// A child process killed when dropped, so no demo leaves one behind.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn write_key(dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join("link.key");
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&key))
        .map_err(|e| format!("cannot write the key file {}: {e}", path.display()))?;
    Ok(path)
}

/// The child's stdout as a channel of lines.
pub fn lines(child: &mut Child) -> Result<mpsc::Receiver<String>, String> {
    let stdout = child.stdout.take().ok_or("the child has no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// What went wrong when no line started with any of `prefixes`: the output ended,
/// or `timeout` passed.
fn missing(error: mpsc::RecvTimeoutError, prefixes: &[&str], timeout: Duration) -> String {
    match error {
        mpsc::RecvTimeoutError::Timeout => format!("no {prefixes:?} line within {timeout:?}"),
        mpsc::RecvTimeoutError::Disconnected => {
            format!("the output ended without a {prefixes:?} line")
        }
    }
}

/// The first line of `lines` starting with `prefix`, waiting at most `timeout`.
pub fn wait_for(
    lines: &mpsc::Receiver<String>,
    prefix: &str,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|e| missing(e, &[prefix], timeout))?;
        if line.starts_with(prefix) {
            return Ok(line);
        }
    }
}

/// The first line of `lines` starting with each of `prefixes`, in whatever order
/// they come, waiting at most `timeout` in all.
pub fn wait_for_all<const N: usize>(
    lines: &mpsc::Receiver<String>,
    prefixes: [&str; N],
    timeout: Duration,
) -> Result<[String; N], String> {
    let deadline = Instant::now() + timeout;
    let mut found: [Option<String>; N] = std::array::from_fn(|_| None);
    while found.iter().any(Option::is_none) {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|e| {
                let absent: Vec<&str> = prefixes
                    .iter()
                    .zip(&found)
                    .filter(|(_, f)| f.is_none())
                    .map(|(p, _)| *p)
                    .collect();
                missing(e, &absent, timeout)
            })?;
        if let Some(i) = (0..N).find(|&i| found[i].is_none() && line.starts_with(prefixes[i])) {
            found[i] = Some(line);
        }
    }
    Ok(found.map(Option::unwrap_or_default))
}

/// The value after `name` in `line`, up to `end`.
pub fn field<'a>(line: &'a str, name: &str, end: char) -> Option<&'a str> {
    let start = line.find(name)? + name.len();
    let rest = &line[start..];
    Some(rest.split(end).next().unwrap_or(rest))
}

/// Where a child's standard error goes: inherited, or (quiet) a file in a scratch
/// directory, whose last lines an error then quotes.
pub struct StderrLog {
    name: &'static str,
    path: Option<PathBuf>,
}

impl StderrLog {
    /// The log of the child called `name`: a file in `dir` if `quiet`.
    pub fn new(dir: &Path, name: &'static str, quiet: bool) -> Self {
        Self {
            name,
            path: quiet.then(|| dir.join(format!("{name}.stderr"))),
        }
    }

    /// Whether the child's standard error goes to a file.
    pub fn is_file(&self) -> bool {
        self.path.is_some()
    }

    /// The child's standard error.
    pub fn stdio(&self) -> Result<Stdio, String> {
        match &self.path {
            None => Ok(Stdio::inherit()),
            Some(path) => std::fs::File::create(path)
                .map(Stdio::from)
                .map_err(|e| format!("cannot create {}: {e}", path.display())),
        }
    }

    /// The file's last lines, introduced by the child's name; empty if nothing was
    /// written or the standard error was inherited.
    pub fn tail(&self) -> String {
        const LINES: usize = 8;
        let Some(text) = self
            .path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        else {
            return String::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = &lines[lines.len().saturating_sub(LINES)..];
        format!("\n{} said:\n  {}", self.name, tail.join("\n  "))
    }
}
