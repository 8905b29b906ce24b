//! Connection setup: who the peer is, what it protects, and proof that it holds the
//! pre-shared key.
//!
//! Every handshake message is [`MESSAGE_BYTES`] long (layout in docs/transport.md).
//! The primary connects and speaks first:
//!
//! 1. primary → backup: HELLO (magic, version, role, geometry, a fresh 32-byte nonce).
//! 2. The backup checks magic, version, role and geometry, and answers with its own
//!    HELLO (its nonce, receive slots, committed epoch) carrying
//!    `HMAC-SHA256(key, "fgbi-transport backup" ‖ hello_p ‖ hello_b)`.
//! 3. The primary checks the same fields and the backup's MAC, then sends PROOF:
//!    `HMAC-SHA256(key, "fgbi-transport primary" ‖ hello_p ‖ hello_b)`.
//! 4. The backup checks it and sends ACCEPT.
//!
//! Each MAC covers both nonces, so neither can be replayed on another connection,
//! and the two labels keep one side's proof from serving as the other's. MACs are
//! compared in constant time. Any failed check sends REFUSE with a [`RefusalCode`] to
//! the peer and closes: no epoch byte is read before ACCEPT.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::{HandshakeError, KeyError};

/// The transport protocol's version; both sides must speak the same. Version 2
/// carries epochs in wire format 2 (pre-copy rounds flagged in their header).
pub const PROTOCOL_VERSION: u16 = 2;

/// Magic bytes opening every handshake message.
pub const MAGIC: [u8; 4] = *b"FGBT";

/// Bytes in every handshake message.
pub const MESSAGE_BYTES: usize = 104;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// Bytes of a message covered by the MACs (everything before the MAC field).
const SIGNED_BYTES: usize = 72;

const KIND_HELLO: u8 = 1;
const KIND_PROOF: u8 = 2;
const KIND_ACCEPT: u8 = 3;
const KIND_REFUSE: u8 = 4;

const BACKUP_LABEL: &[u8] = b"fgbi-transport backup";
const PRIMARY_LABEL: &[u8] = b"fgbi-transport primary";

/// The pre-shared key, read from a file only the owner can access.
#[derive(Clone)]
pub struct PresharedKey(Vec<u8>);

impl PresharedKey {
    /// Reads the key from `path`: a regular file of at least [`MIN_KEY_BYTES`] bytes
    /// that neither group nor others may access. Its bytes are the key, as they are.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let read = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(read)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile(path.to_path_buf()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let key = fs::read(path).map_err(read)?;
        if key.is_empty() {
            return Err(KeyError::Empty(path.to_path_buf()));
        }
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                path: path.to_path_buf(),
                len: key.len(),
                min: MIN_KEY_BYTES,
            });
        }
        Ok(Self(key))
    }

    fn mac(&self, label: &[u8], hello_p: &[u8], hello_b: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(label);
        mac.update(&hello_p[..SIGNED_BYTES]);
        mac.update(&hello_b[..SIGNED_BYTES]);
        mac
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresharedKey({} bytes, redacted)", self.0.len())
    }
}

/// Which end of the replication link a side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs the protected program and sends epochs.
    Primary,
    /// Holds the replica and applies epochs.
    Backup,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Backup => 2,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        })
    }
}

/// Why a side refused its peer, as sent in a REFUSE message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalCode {
    /// The peer's bytes do not start with the magic.
    BadMagic,
    /// The protocol versions differ.
    Version,
    /// The roles do not pair a primary with a backup.
    Role,
    /// The memory or block sizes differ.
    Geometry,
    /// The peer failed the key challenge.
    Authentication,
    /// A message was inconsistent.
    Malformed,
    /// A code this version does not know.
    Unknown(u8),
}

impl RefusalCode {
    fn code(self) -> u8 {
        match self {
            RefusalCode::BadMagic => 1,
            RefusalCode::Version => 2,
            RefusalCode::Role => 3,
            RefusalCode::Geometry => 4,
            RefusalCode::Authentication => 5,
            RefusalCode::Malformed => 6,
            RefusalCode::Unknown(code) => code,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            1 => RefusalCode::BadMagic,
            2 => RefusalCode::Version,
            3 => RefusalCode::Role,
            4 => RefusalCode::Geometry,
            5 => RefusalCode::Authentication,
            6 => RefusalCode::Malformed,
            code => RefusalCode::Unknown(code),
        }
    }

    /// The code that tells the peer why `error` refused it, if the peer caused it.
    fn for_error(error: &HandshakeError) -> Option<Self> {
        Some(match error {
            HandshakeError::BadMagic(_) => RefusalCode::BadMagic,
            HandshakeError::Version { .. } => RefusalCode::Version,
            HandshakeError::Role { .. } => RefusalCode::Role,
            HandshakeError::Geometry { .. } => RefusalCode::Geometry,
            HandshakeError::Authentication => RefusalCode::Authentication,
            HandshakeError::Malformed(_) => RefusalCode::Malformed,
            _ => return None,
        })
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalCode::BadMagic => f.write_str("it did not recognise this side's protocol"),
            RefusalCode::Version => {
                f.write_str("protocol versions differ: run the same fgbi release on both hosts")
            }
            RefusalCode::Role => f.write_str("roles do not pair a primary with a backup"),
            RefusalCode::Geometry => {
                f.write_str("memory or block sizes differ: start both sides with the same geometry")
            }
            RefusalCode::Authentication => f.write_str(
                "this side failed the key challenge: check that both hosts use the same key file",
            ),
            RefusalCode::Malformed => f.write_str("it found this side's handshake malformed"),
            RefusalCode::Unknown(code) => write!(f, "refusal code {code}"),
        }
    }
}

/// What one side announces in its HELLO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// The sender's role.
    pub role: Role,
    /// Protected memory, in bytes.
    pub mem_bytes: u64,
    /// Block size, in bytes.
    pub block_size: u32,
    /// Backup: receive slots (epochs that may await a reply at once); primary: 0.
    pub slots: u32,
    /// Backup: bytes per receive slot (the largest epoch accepted); primary: 0.
    pub slot_bytes: u64,
    /// Backup: the epoch its replica has committed; primary: 0.
    pub committed: u64,
}

impl Offer {
    /// This build's offer in `role` for `geometry`; the backup fills in its slots and
    /// committed epoch, the primary leaves them 0.
    pub fn ours(
        role: Role,
        geometry: &fgbi_engine::Geometry,
        slots: u32,
        slot_bytes: u64,
        committed: u64,
    ) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            role,
            mem_bytes: geometry.mem_bytes(),
            block_size: geometry.block_size() as u32,
            slots,
            slot_bytes,
            committed,
        }
    }

    fn hello(&self, nonce: &[u8; 32]) -> [u8; MESSAGE_BYTES] {
        let mut m = message(KIND_HELLO, self.role.code());
        m[4..6].copy_from_slice(&self.version.to_le_bytes());
        m[8..16].copy_from_slice(&self.mem_bytes.to_le_bytes());
        m[16..20].copy_from_slice(&self.block_size.to_le_bytes());
        m[20..24].copy_from_slice(&self.slots.to_le_bytes());
        m[24..32].copy_from_slice(&self.slot_bytes.to_le_bytes());
        m[32..40].copy_from_slice(&self.committed.to_le_bytes());
        m[40..72].copy_from_slice(nonce);
        m
    }

    /// Checks the peer's HELLO against this side's offer.
    fn check_peer(&self, m: &[u8; MESSAGE_BYTES]) -> Result<Offer, HandshakeError> {
        if m[6] != KIND_HELLO {
            return Err(HandshakeError::Malformed("expected a HELLO message"));
        }
        let version = u16::from_le_bytes([m[4], m[5]]);
        if version != self.version {
            return Err(HandshakeError::Version {
                ours: self.version,
                theirs: version,
            });
        }
        let expected = match self.role {
            Role::Primary => Role::Backup,
            Role::Backup => Role::Primary,
        };
        if m[7] != expected.code() {
            return Err(HandshakeError::Role {
                expected,
                theirs: m[7],
            });
        }
        let peer = Offer {
            version,
            role: expected,
            mem_bytes: u64_at(m, 8),
            block_size: u32::from_le_bytes([m[16], m[17], m[18], m[19]]),
            slots: u32::from_le_bytes([m[20], m[21], m[22], m[23]]),
            slot_bytes: u64_at(m, 24),
            committed: u64_at(m, 32),
        };
        if peer.mem_bytes != self.mem_bytes || peer.block_size != self.block_size {
            return Err(HandshakeError::Geometry {
                mem_bytes: self.mem_bytes,
                block_size: self.block_size,
                peer_mem_bytes: peer.mem_bytes,
                peer_block_size: peer.block_size,
            });
        }
        if expected == Role::Backup && (peer.slots == 0 || peer.slot_bytes == 0) {
            return Err(HandshakeError::Malformed(
                "the backup offers no receive slots",
            ));
        }
        Ok(peer)
    }
}

fn u64_at(m: &[u8; MESSAGE_BYTES], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&m[at..at + 8]);
    u64::from_le_bytes(b)
}

fn message(kind: u8, code: u8) -> [u8; MESSAGE_BYTES] {
    let mut m = [0; MESSAGE_BYTES];
    m[..4].copy_from_slice(&MAGIC);
    m[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    m[6] = kind;
    m[7] = code;
    m
}

fn nonce() -> Result<[u8; 32], HandshakeError> {
    let mut n = [0; 32];
    getrandom::fill(&mut n).map_err(HandshakeError::Random)?;
    Ok(n)
}

fn send(stream: &mut TcpStream, m: &[u8; MESSAGE_BYTES]) -> Result<(), HandshakeError> {
    stream.write_all(m).map_err(HandshakeError::Io)
}

/// Reads one message; a REFUSE becomes [`HandshakeError::Refused`].
fn receive(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<[u8; MESSAGE_BYTES], HandshakeError> {
    let mut m = [0; MESSAGE_BYTES];
    stream.read_exact(&mut m).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Timeout(timeout),
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => HandshakeError::Closed,
        _ => HandshakeError::Io(e),
    })?;
    if m[..4] != MAGIC {
        return Err(HandshakeError::BadMagic([m[0], m[1], m[2], m[3]]));
    }
    if m[6] == KIND_REFUSE {
        return Err(HandshakeError::Refused(RefusalCode::from_code(m[7])));
    }
    Ok(m)
}

/// Runs `steps`; if they fail because of the peer, tells the peer why (best effort).
fn refusing<T>(
    stream: &mut TcpStream,
    steps: impl FnOnce(&mut TcpStream) -> Result<T, HandshakeError>,
) -> Result<T, HandshakeError> {
    steps(stream).inspect_err(|error| {
        if let Some(code) = RefusalCode::for_error(error) {
            // The connection is being refused: a failure to say why changes nothing.
            let _ = stream.write_all(&message(KIND_REFUSE, code.code()));
        }
    })
}

fn set_timeouts(stream: &TcpStream, timeout: Duration) -> Result<(), HandshakeError> {
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(HandshakeError::Io)
}

/// The primary's side: announces `offer` and authenticates the backup, then itself.
/// Returns the backup's offer (its receive slots and committed epoch).
///
/// Each message must arrive within `timeout`. The stream's timeouts are left set.
pub fn connect(
    stream: &mut TcpStream,
    offer: &Offer,
    key: &PresharedKey,
    timeout: Duration,
) -> Result<Offer, HandshakeError> {
    set_timeouts(stream, timeout)?;
    let hello_p = offer.hello(&nonce()?);
    send(stream, &hello_p)?;
    let peer = refusing(stream, |stream| {
        let hello_b = receive(stream, timeout)?;
        let peer = offer.check_peer(&hello_b)?;
        key.mac(BACKUP_LABEL, &hello_p, &hello_b)
            .verify_slice(&hello_b[SIGNED_BYTES..])
            .map_err(|_| HandshakeError::Authentication)?;
        let mut proof = message(KIND_PROOF, 0);
        let tag = key
            .mac(PRIMARY_LABEL, &hello_p, &hello_b)
            .finalize()
            .into_bytes();
        proof[SIGNED_BYTES..].copy_from_slice(&tag);
        send(stream, &proof)?;
        Ok(peer)
    })?;
    let accept = receive(stream, timeout)?;
    if accept[6] != KIND_ACCEPT {
        return Err(HandshakeError::Malformed("expected ACCEPT after PROOF"));
    }
    Ok(peer)
}

/// The backup's side: checks the primary's HELLO against `offer`, proves it holds the
/// key, and checks the primary's proof. Returns the primary's offer.
///
/// Each message must arrive within `timeout`. The stream's timeouts are left set.
pub fn accept(
    stream: &mut TcpStream,
    offer: &Offer,
    key: &PresharedKey,
    timeout: Duration,
) -> Result<Offer, HandshakeError> {
    set_timeouts(stream, timeout)?;
    refusing(stream, |stream| {
        let hello_p = receive(stream, timeout)?;
        let peer = offer.check_peer(&hello_p)?;
        let mut hello_b = offer.hello(&nonce()?);
        let tag = key
            .mac(BACKUP_LABEL, &hello_p, &hello_b)
            .finalize()
            .into_bytes();
        hello_b[SIGNED_BYTES..].copy_from_slice(&tag);
        send(stream, &hello_b)?;
        let proof = receive(stream, timeout)?;
        if proof[6] != KIND_PROOF {
            return Err(HandshakeError::Malformed("expected PROOF after HELLO"));
        }
        key.mac(PRIMARY_LABEL, &hello_p, &hello_b)
            .verify_slice(&proof[SIGNED_BYTES..])
            .map_err(|_| HandshakeError::Authentication)?;
        send(stream, &message(KIND_ACCEPT, 0))?;
        Ok(peer)
    })
}
