//! The LINK messages: queue-pair addresses and the backup's ring, exchanged over the
//! TCP side channel after the handshake authenticated both peers.
//!
//! Every LINK message is [`LINK_BYTES`] long, little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `FGBL` |
//! | 4 | 1 | sender: 1 primary, 2 backup |
//! | 5 | 1 | active MTU (`enum ibv_mtu`, 1 = 256 to 5 = 4096) |
//! | 6 | 1 | link layer (1 InfiniBand, 2 Ethernet) |
//! | 7 | 1 | zero |
//! | 8 | 4 | queue pair number (24 bits) |
//! | 12 | 4 | first packet sequence number (24 bits) |
//! | 16 | 2 | LID (InfiniBand; 0 on RoCE) |
//! | 18 | 6 | zero |
//! | 24 | 16 | GID |
//! | 40 | 4 | backup: the ring's rkey; primary: 0 |
//! | 44 | 4 | zero |
//! | 48 | 8 | backup: the ring's address; primary: 0 |
//! | 56 | 8 | backup: the ring's length in bytes; primary: 0 |
//! | 64 | 8 | xxh3-64 of bytes 0..64, seed `u64::from_le_bytes(*b"FGBTlnk1")` |

use std::io::{self, Read, Write};
use std::net::TcpStream;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::verbs::Address;
use crate::error::TransportError;

/// Bytes in every LINK message.
pub const LINK_BYTES: usize = 72;

/// Magic bytes opening every LINK message.
pub const LINK_MAGIC: [u8; 4] = *b"FGBL";

const CHECKSUM_SEED: u64 = u64::from_le_bytes(*b"FGBTlnk1");

/// Who sent a LINK message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sender {
    Primary,
    Backup,
}

/// Where the backup's ring is and how to write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ring {
    pub(crate) rkey: u32,
    pub(crate) addr: u64,
    pub(crate) len: u64,
}

/// One LINK message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) sender: Sender,
    pub(crate) address: Address,
    /// The backup's ring; `None` from the primary.
    pub(crate) ring: Option<Ring>,
}

impl Link {
    pub(crate) fn encode(&self) -> [u8; LINK_BYTES] {
        let mut m = [0u8; LINK_BYTES];
        m[..4].copy_from_slice(&LINK_MAGIC);
        m[4] = match self.sender {
            Sender::Primary => 1,
            Sender::Backup => 2,
        };
        let a = &self.address;
        m[5] = a.mtu;
        m[6] = a.link_layer;
        m[8..12].copy_from_slice(&a.qpn.to_le_bytes());
        m[12..16].copy_from_slice(&a.psn.to_le_bytes());
        m[16..18].copy_from_slice(&a.lid.to_le_bytes());
        m[24..40].copy_from_slice(&a.gid);
        if let Some(ring) = self.ring {
            m[40..44].copy_from_slice(&ring.rkey.to_le_bytes());
            m[48..56].copy_from_slice(&ring.addr.to_le_bytes());
            m[56..64].copy_from_slice(&ring.len.to_le_bytes());
        }
        let sum = xxh3_64_with_seed(&m[..64], CHECKSUM_SEED);
        m[64..].copy_from_slice(&sum.to_le_bytes());
        m
    }

    /// Decodes a message that must come from `from`.
    pub(crate) fn decode(m: &[u8; LINK_BYTES], from: Sender) -> Result<Self, TransportError> {
        let bad = |why: &str| {
            Err(TransportError::Protocol(format!(
                "bad RDMA LINK message: {why}"
            )))
        };
        if m[..4] != LINK_MAGIC {
            return Err(TransportError::Protocol(
                "the peer did not send its RDMA queue pair: it does not use the RDMA transport; start both sides with --transport rdma"
                    .into(),
            ));
        }
        let u32_at = |at: usize| u32::from_le_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&m[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if u64_at(64) != xxh3_64_with_seed(&m[..64], CHECKSUM_SEED) {
            return bad("checksum");
        }
        let sender = match m[4] {
            1 => Sender::Primary,
            2 => Sender::Backup,
            _ => return bad("unknown sender"),
        };
        if sender != from {
            return bad("both sides claim the same role");
        }
        if m[7] != 0 || m[18..24] != [0; 6] || m[44..48] != [0; 4] {
            return bad("non-zero reserved bytes");
        }
        let address = Address {
            qpn: u32_at(8),
            psn: u32_at(12),
            lid: u16::from_le_bytes([m[16], m[17]]),
            gid: m[24..40].try_into().unwrap_or([0; 16]),
            mtu: m[5],
            link_layer: m[6],
        };
        if address.qpn == 0 || address.qpn >= 1 << 24 || address.psn >= 1 << 24 {
            return bad("queue pair or sequence number out of range");
        }
        if !(1..=5).contains(&address.mtu) {
            return bad("unknown MTU");
        }
        let ring = Ring {
            rkey: u32_at(40),
            addr: u64_at(48),
            len: u64_at(56),
        };
        let ring = match sender {
            Sender::Primary
                if ring
                    != (Ring {
                        rkey: 0,
                        addr: 0,
                        len: 0,
                    }) =>
            {
                return bad("a primary offered a ring");
            }
            Sender::Primary => None,
            Sender::Backup if ring.addr == 0 || ring.len == 0 => {
                return bad("the backup offered no ring");
            }
            Sender::Backup => Some(ring),
        };
        Ok(Self {
            sender,
            address,
            ring,
        })
    }

    /// Writes this message to `stream`.
    pub(crate) fn send(&self, stream: &mut TcpStream) -> Result<(), TransportError> {
        stream
            .write_all(&self.encode())
            .map_err(|source| TransportError::Io {
                what: "sending the RDMA queue pair",
                source,
            })
    }

    /// Reads the peer's message from `stream` (whose timeouts the handshake set).
    pub(crate) fn receive(stream: &mut TcpStream, from: Sender) -> Result<Self, TransportError> {
        let mut m = [0u8; LINK_BYTES];
        stream.read_exact(&mut m).map_err(|source| match source.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => TransportError::PeerClosed(
                " before sending its RDMA queue pair (does it use the RDMA transport? start both sides with --transport rdma)",
            ),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Protocol(
                "the peer sent no RDMA queue pair in time: it does not use the RDMA transport; start both sides with --transport rdma".into(),
            ),
            _ => TransportError::Io {
                what: "receiving the RDMA queue pair",
                source,
            },
        })?;
        Self::decode(&m, from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup() -> Link {
        Link {
            sender: Sender::Backup,
            address: Address {
                qpn: 0x11,
                psn: 0xabcdef,
                lid: 0,
                gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2],
                mtu: 3,
                link_layer: 2,
            },
            ring: Some(Ring {
                rkey: 0x1234,
                addr: 0x7f00_0000_0000,
                len: 4 << 20,
            }),
        }
    }

    #[test]
    fn links_round_trip_and_any_flipped_bit_is_refused() {
        let primary = Link {
            sender: Sender::Primary,
            ring: None,
            ..backup()
        };
        for (link, from) in [(backup(), Sender::Backup), (primary, Sender::Primary)] {
            let bytes = link.encode();
            assert_eq!(Link::decode(&bytes, from).unwrap(), link);
            for bit in 0..LINK_BYTES * 8 {
                let mut bad = bytes;
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(Link::decode(&bad, from).is_err(), "bit {bit}");
            }
        }
    }

    #[test]
    fn inconsistent_links_are_refused_with_a_reason() {
        let reject = |link: Link, from: Sender, why: &str| {
            let e = Link::decode(&link.encode(), from).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        };
        reject(backup(), Sender::Primary, "same role");
        let mut l = backup();
        l.address.qpn = 0;
        reject(l, Sender::Backup, "out of range");
        let mut l = backup();
        l.address.psn = 1 << 24;
        reject(l, Sender::Backup, "out of range");
        let mut l = backup();
        l.address.mtu = 6;
        reject(l, Sender::Backup, "MTU");
        reject(
            Link {
                ring: None,
                ..backup()
            },
            Sender::Backup,
            "no ring",
        );
        reject(
            Link {
                sender: Sender::Primary,
                ..backup()
            },
            Sender::Primary,
            "offered a ring",
        );
        // A control message (a TCP peer's heartbeat) is not a LINK message.
        let mut m = [0u8; LINK_BYTES];
        m[0] = 5;
        let e = Link::decode(&m, Sender::Backup).unwrap_err();
        assert!(e.to_string().contains("--transport rdma"), "{e}");
    }
}
