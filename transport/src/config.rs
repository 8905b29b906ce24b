//! Settings both sides agree on or choose.

use std::time::Duration;

use fgbi_engine::Geometry;

use crate::error::TransportError;

/// Which implementation moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Implementation {
    /// io_uring: an epoch's parts leave in one `SendMsg` submission; the backup
    /// receives with `RecvMsg` straight into its receive region, a small epoch
    /// usually with its control messages in one submission.
    Uring,
    /// Blocking std TCP: `writev` of the parts; `read` into the receive region.
    Std,
    /// RDMA verbs: the primary RDMA-WRITEs the parts into the backup's registered
    /// ring and commits with an RDMA WRITE with immediate data; control messages and
    /// heartbeats stay on the TCP connection.
    Rdma,
}

impl Implementation {
    /// Every implementation, in the order reports print them.
    pub const ALL: [Implementation; 3] = [
        Implementation::Uring,
        Implementation::Std,
        Implementation::Rdma,
    ];

    /// The implementations that carry epochs over TCP.
    pub const TCP: [Implementation; 2] = [Implementation::Uring, Implementation::Std];

    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Implementation::Uring => "io_uring",
            Implementation::Std => "std",
            Implementation::Rdma => "rdma",
        }
    }

    /// Checks that this host can run the implementation: for io_uring, that a ring
    /// can be set up and supports every operation the transport submits; for RDMA,
    /// that libibverbs loads and some device has an active port 1.
    pub fn available(self) -> Result<(), TransportError> {
        match self {
            Implementation::Uring => crate::uring::probe(),
            Implementation::Std => Ok(()),
            Implementation::Rdma => RdmaConfig::default().available(),
        }
    }
}

/// Which RDMA device, port and GID the RDMA implementation uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdmaConfig {
    /// The device's name as `ibv_devices` lists it (`mlx5_0`, `rxe0`); `None`: the
    /// first device whose port is active.
    pub device: Option<String>,
    /// The port number, from 1.
    pub port: u8,
    /// The GID index (RoCE); `None`: the port's RoCE v2 GID of an IPv4 address,
    /// else any RoCE v2 GID (InfiniBand ports: 0).
    pub gid_index: Option<u8>,
}

impl Default for RdmaConfig {
    /// The first device with port 1 active, its RoCE v2 IPv4 GID.
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: None,
        }
    }
}

impl RdmaConfig {
    /// Checks that libibverbs loads and that the device has the port active; the
    /// error says what is missing and what to do.
    pub fn available(&self) -> Result<(), TransportError> {
        crate::rdma::probe(self).map(drop)
    }

    /// The device this configuration selects (its name), if it is usable.
    pub fn device_name(&self) -> Result<String, TransportError> {
        crate::rdma::probe(self)
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
    /// The RDMA device, port and GID (used by [`Implementation::Rdma`] only).
    pub rdma: RdmaConfig,
}

impl TransportConfig {
    /// Defaults for `geometry` and `implementation`: [`Liveness::default`], a 2 s handshake.
    pub fn new(geometry: Geometry, implementation: Implementation) -> Self {
        Self {
            geometry,
            implementation,
            liveness: Liveness::default(),
            handshake_timeout: Duration::from_secs(2),
            rdma: RdmaConfig::default(),
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
        if self.rdma.port == 0 {
            return Err(TransportError::Config("RDMA ports are numbered from 1"));
        }
        if self.handshake_timeout < Duration::from_millis(1) {
            return Err(TransportError::Config(
                "the handshake timeout must be at least 1 ms",
            ));
        }
        Ok(())
    }
}
