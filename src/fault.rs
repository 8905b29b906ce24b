//! A test hook that kills the primary at a chosen point of a checkpoint, to prove
//! what survives a crash there.
//!
//! With `FGBI_FAULT=POINT@N` in its environment, a process running the primary's
//! side sends itself `SIGKILL` the `N`th time (counting from 1) it reaches `POINT`:
//!
//! | point | where |
//! |---|---|
//! | `sync` | a round of initial sync (a pre-copy epoch) was just acknowledged: the backup holds part of memory and no checkpoint |
//! | `pause` | inside the pause: the program is stopped, its dirty pages copied |
//! | `transfer` | mid-transfer: half of the epoch's bytes reached the backup, the rest never will |
//! | `sent` | the epoch was handed to the transport, its answer not yet read |
//! | `acked` | the backup's acknowledgement arrived, held outputs not yet released |
//! | `released` | the outputs of the acknowledged checkpoint were just released |
//!
//! Without the variable every check is one relaxed load of a cached `None`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms the hook.
pub const FAULT_ENV: &str = "FGBI_FAULT";

/// Where in a checkpoint the process may be killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// After a pre-copy epoch of initial sync was acknowledged.
    Sync,
    /// Inside the pause.
    Pause,
    /// Part of the epoch reached the backup (the caller sends it, then calls
    /// [`kill`]).
    Transfer,
    /// After the epoch was sent, before its answer.
    Sent,
    /// After the acknowledgement, before held outputs are released.
    Acknowledged,
    /// Right after held outputs were released.
    Released,
}

impl Point {
    const ALL: [Point; 6] = [
        Point::Sync,
        Point::Pause,
        Point::Transfer,
        Point::Sent,
        Point::Acknowledged,
        Point::Released,
    ];

    fn name(self) -> &'static str {
        match self {
            Point::Sync => "sync",
            Point::Pause => "pause",
            Point::Transfer => "transfer",
            Point::Sent => "sent",
            Point::Acknowledged => "acked",
            Point::Released => "released",
        }
    }
}

/// Parses `POINT@N`.
fn parse(text: &str) -> Result<(Point, u64), String> {
    let bad = || {
        format!(
            "{FAULT_ENV}={text:?} is not POINT@N with POINT one of sync, pause, transfer, sent, acked, released and N at least 1"
        )
    };
    let (name, count) = text.split_once('@').ok_or_else(bad)?;
    let point = Point::ALL
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(bad)?;
    let count = count.parse().ok().filter(|&n| n >= 1).ok_or_else(bad)?;
    Ok((point, count))
}

fn armed() -> Option<(Point, u64)> {
    static ARMED: OnceLock<Option<(Point, u64)>> = OnceLock::new();
    *ARMED.get_or_init(|| {
        let text = std::env::var(FAULT_ENV).ok()?;
        parse(&text)
            .inspect_err(|e| eprintln!("fgbi: ignoring the fault hook: {e}"))
            .ok()
    })
}

/// Marks `point` reached; kills the process if the hook is armed for this time.
pub fn reached(point: Point) {
    if hit(point) {
        kill(point);
    }
}

/// Marks `point` reached; true if the hook is armed for this time, so that the
/// caller does what the point stands for (such as sending part of an epoch) and then
/// calls [`kill`].
pub fn hit(point: Point) -> bool {
    static HITS: [AtomicU64; Point::ALL.len()] = [const { AtomicU64::new(0) }; Point::ALL.len()];
    let Some((target, count)) = armed() else {
        return false;
    };
    target == point && HITS[point as usize].fetch_add(1, Ordering::Relaxed) + 1 == count
}

/// Kills this process at `point` (which [`hit`] named), saying so on stderr.
pub fn kill(point: Point) {
    eprintln!(
        "fgbi: {FAULT_ENV}: killing this process at {}",
        point.name()
    );
    // SAFETY: getpid and kill take no pointers; SIGKILL ends the process here.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_and_counts_parse_and_nonsense_is_refused() {
        assert_eq!(parse("sent@3"), Ok((Point::Sent, 3)));
        assert_eq!(parse("acked@1"), Ok((Point::Acknowledged, 1)));
        assert_eq!(parse("transfer@2"), Ok((Point::Transfer, 2)));
        assert_eq!(parse("sync@1"), Ok((Point::Sync, 1)));
        for bad in ["sent", "sent@0", "lunch@2", "pause@x", ""] {
            assert!(parse(bad).unwrap_err().contains("POINT@N"), "{bad}");
        }
    }
}
