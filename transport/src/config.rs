//! Settings both sides agree on or choose.

use std::time::Duration;

use fgbi_engine::Geometry;

use crate::error::TransportError;

/// Which implementation moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Implementation {
    /// io_uring: an epoch's parts leave in one `SendMsg` submission; the backup reads
    /// payloads with `ReadFixed` straight into its registered receive region.
    Uring,
    /// Blocking std TCP: `writev` of the parts; `read` into the receive region.
    Std,
}

impl Implementation {
    /// Both implementations, in the order reports print them.
    pub const ALL: [Implementation; 2] = [Implementation::Uring, Implementation::Std];

    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Implementation::Uring => "io_uring",
            Implementation::Std => "std",
        }
    }

    /// Checks that this host can run the implementation: for io_uring, that a ring
    /// can be set up and supports every operation the transport submits.
    pub fn available(self) -> Result<(), TransportError> {
        match self {
            Implementation::Uring => crate::uring::probe(),
            Implementation::Std => Ok(()),
        }
    }
}

/// How each side notices that the other died.
///
/// Each side sends a heartbeat every `interval` from a background thread, and a side
/// that hears nothing at all (no message, no payload byte) for `timeout` reports
/// [`TransportError::PeerTimeout`]. A side whose peer stops taking bytes for
/// `timeout` reports the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Time between heartbeats.
    pub interval: Duration,
    /// Silence after which the peer is declared dead.
    pub timeout: Duration,
}

impl Default for Liveness {
    /// A heartbeat per 25 ms epoch; a peer silent for four epochs (100 ms) is dead.
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(25),
            timeout: Duration::from_millis(100),
        }
    }
}

/// Everything a primary or backup needs before it connects.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// The protected memory's shape; both sides must agree.
    pub geometry: Geometry,
    /// Which implementation moves the bytes.
    pub implementation: Implementation,
    /// Heartbeats and the death timeout.
    pub liveness: Liveness,
    /// Longest time a peer may take to complete the handshake.
    pub handshake_timeout: Duration,
}

impl TransportConfig {
    /// Defaults for `geometry` and `implementation`: [`Liveness::default`], a 2 s handshake.
    pub fn new(geometry: Geometry, implementation: Implementation) -> Self {
        Self {
            geometry,
            implementation,
            liveness: Liveness::default(),
            handshake_timeout: Duration::from_secs(2),
        }
    }

    /// Checks the settings against each other.
    pub(crate) fn validate(&self) -> Result<(), TransportError> {
        let l = self.liveness;
        if l.interval < Duration::from_millis(1) {
            return Err(TransportError::Config(
                "the heartbeat interval must be at least 1 ms",
            ));
        }
        if l.timeout < 2 * l.interval {
            return Err(TransportError::Config(
                "the liveness timeout must be at least two heartbeat intervals",
            ));
        }
        if self.handshake_timeout < Duration::from_millis(1) {
            return Err(TransportError::Config(
                "the handshake timeout must be at least 1 ms",
            ));
        }
        Ok(())
    }
}
