//! The transport: moves encoded epochs from the primary into the backup's receive
//! region, and the backup's answers back.
//!
//! The backup maps a [`ReceiveRegion`], a ring of epoch slots on 2 MiB pages, each
//! large enough for the biggest epoch it accepts. A primary connects over TCP; the
//! [`handshake`] checks protocol version, roles and geometry and authenticates both
//! sides with a pre-shared key before a byte can reach the region. Then the primary
//! sends each epoch as an EPOCH control message, the epoch's parts as the encoder
//! produced them, and a COMMIT; the backup receives the payload straight into the
//! epoch's slot, applies it with [`fgbi_engine::Applier`], and answers ACK or NACK.
//! Both sides send heartbeats, so each notices the other's death within
//! [`Liveness::timeout`].
//!
//! Three implementations behind one API ([`Implementation`]): io_uring (one `SendMsg`
//! submission per epoch; `RecvMsg` straight into the region, a small epoch with its
//! control messages in one submission), blocking std TCP (`writev`; `read` into the region), and RDMA verbs ([`rdma`]:
//! RDMA WRITEs into the region registered with the device, committed by an RDMA
//! WRITE with immediate data; libibverbs is loaded at run time). docs/transport.md
//! has the protocol; docs/performance.md compares them.

pub mod backup;
pub mod config;
pub mod control;
pub mod error;
pub mod handshake;
mod heartbeat;
pub mod primary;
pub mod rdma;
pub mod region;
mod uring;

pub use backup::{Backup, Received, Served};
pub use config::{Implementation, Liveness, RdmaConfig, TransportConfig};
pub use control::{NackReason, SCRUB_CHUNK_BYTES, SCRUB_MAX_CHUNKS};
pub use error::{HandshakeError, KeyError, TransportError};
pub use handshake::PresharedKey;
pub use primary::{Primary, Reply};
pub use region::ReceiveRegion;
