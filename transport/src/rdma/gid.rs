//! Which GID of a RoCE port to address the peer by.
//!
//! A RoCE port lists one GID per address of its network device and RoCE version;
//! the kernel publishes them in sysfs (`/sys/class/infiniband/DEV/ports/N/gids/I`
//! and `.../gid_attrs/types/I`). The transport picks the RoCE v2 GID of an IPv4
//! address (routable over UDP port 4791), else any RoCE v2 GID, else index 0.
//! InfiniBand ports are addressed by LID and use GID 0.

use std::path::Path;

use super::verbs::{LINK_LAYER_INFINIBAND, PortInfo};
use crate::error::TransportError;

/// One GID table entry as sysfs shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Its index in the table.
    pub(crate) index: u8,
    /// `RoCE v2`, `IB/RoCE v1`, ...
    pub(crate) kind: String,
    /// The GID.
    pub(crate) gid: [u8; 16],
}

/// Parses sysfs's text form of a GID (`fe80:0000:...:0001`, eight groups).
pub(crate) fn parse(text: &str) -> Option<[u8; 16]> {
    let mut gid = [0u8; 16];
    let mut groups = text.trim().split(':');
    for pair in gid.chunks_exact_mut(2) {
        let group = groups.next()?;
        if group.len() != 4 {
            return None;
        }
        let v = u16::from_str_radix(group, 16).ok()?;
        pair.copy_from_slice(&v.to_be_bytes());
    }
    groups.next().is_none().then_some(gid)
}

/// Whether `gid` is an IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`).
fn ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10] == [0; 10] && gid[10..12] == [0xff, 0xff]
}

/// The preferred entry: RoCE v2 with an IPv4 address, else RoCE v2, else none.
pub(crate) fn pick(entries: &[Entry]) -> Option<u8> {
    let v2 = |e: &&Entry| e.kind.trim().eq_ignore_ascii_case("RoCE v2") && e.gid != [0; 16];
    entries
        .iter()
        .filter(v2)
        .find(|e| ipv4_mapped(&e.gid))
        .or_else(|| entries.iter().find(v2))
        .map(|e| e.index)
}

/// The GID index to use on `port`.
pub(crate) fn choose(port: &PortInfo) -> Result<u8, TransportError> {
    if port.link_layer == LINK_LAYER_INFINIBAND {
        return Ok(0);
    }
    let dir = Path::new("/sys/class/infiniband")
        .join(&port.device)
        .join("ports")
        .join(port.port.to_string());
    let entries: Vec<Entry> = (0..port.gids.min(256))
        .filter_map(|i| {
            let index = u8::try_from(i).ok()?;
            let kind = std::fs::read_to_string(dir.join(format!("gid_attrs/types/{i}"))).ok()?;
            let gid = parse(&std::fs::read_to_string(dir.join(format!("gids/{i}"))).ok()?)?;
            Some(Entry { index, kind, gid })
        })
        .collect();
    pick(&entries).ok_or_else(|| {
        TransportError::RdmaUnavailable(format!(
            "{} port {} has no RoCE v2 GID ({} entries readable in {}): give its network device an IP address, or set the GID index explicitly",
            port.device,
            port.port,
            entries.len(),
            dir.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_parse_and_the_ipv4_roce_v2_entry_wins() {
        let v4 = parse("0000:0000:0000:0000:0000:ffff:0a00:0001").unwrap();
        assert_eq!(&v4[12..], &[10, 0, 0, 1]);
        let link_local = parse("fe80:0000:0000:0000:0200:00ff:fe00:0001").unwrap();
        assert_eq!(link_local[0], 0xfe);
        assert_eq!(parse("fe80::1"), None);
        assert_eq!(parse("0000:0000:0000:0000:0000:ffff:0a00:0001:0000"), None);
        assert_eq!(parse("zzzz:0000:0000:0000:0000:ffff:0a00:0001"), None);
        let entry = |index, kind: &str, gid| Entry {
            index,
            kind: format!("{kind}\n"),
            gid,
        };
        // mlx5 order: v1 and v2 link-local, then v1 and v2 IPv4.
        let mlx = [
            entry(0, "IB/RoCE v1", link_local),
            entry(1, "RoCE v2", link_local),
            entry(2, "IB/RoCE v1", v4),
            entry(3, "RoCE v2", v4),
        ];
        assert_eq!(pick(&mlx), Some(3));
        assert_eq!(pick(&mlx[..3]), Some(1));
        assert_eq!(pick(&mlx[..1]), None);
        assert_eq!(pick(&[entry(0, "RoCE v2", [0; 16])]), None);
    }
}
