//! `--transport rdma|tcp|uring|std|auto` and the RDMA device options.

use clap::Args;
use fgbi_transport::{Implementation, RdmaConfig, TransportError};

/// How epochs travel, as the command line chooses it.
#[derive(Args, Debug, Clone)]
pub struct TransportArgs {
    /// Transport: rdma (RDMA verbs), tcp (io_uring when the kernel allows it, else
    /// std), uring, std, or auto (rdma when a usable RDMA device exists, else tcp).
    #[arg(long, default_value = "auto")]
    pub(crate) transport: String,
    /// RDMA device (as `ibv_devices` names it); default: the first with an active port.
    #[arg(long)]
    pub(crate) rdma_device: Option<String>,
    /// RDMA port number.
    #[arg(long, default_value_t = 1)]
    pub(crate) rdma_port: u8,
    /// RDMA GID index; default: the port's RoCE v2 GID of an IPv4 address.
    #[arg(long)]
    pub(crate) rdma_gid_index: Option<u8>,
}

impl TransportArgs {
    /// The RDMA device settings.
    pub fn rdma(&self) -> RdmaConfig {
        RdmaConfig {
            device: self.rdma_device.clone(),
            port: self.rdma_port,
            gid_index: self.rdma_gid_index,
        }
    }

    /// The implementation chosen, checked to run here; `auto` prints which it took.
    pub fn implementation(&self) -> Result<Implementation, String> {
        let rdma = self.rdma();
        let (implementation, note) = choose(
            &self.transport,
            || rdma.device_name(),
            || Implementation::Uring.available(),
        )?;
        if let Some(note) = note {
            eprintln!("{note}");
        }
        match implementation {
            Implementation::Rdma => rdma.available(),
            other => other.available(),
        }
        .map_err(|e| e.to_string())?;
        Ok(implementation)
    }
}

/// Maps `--transport NAME` to an implementation, given how to probe for an RDMA
/// device (its name) and for io_uring. For `auto`, also the line that says what was
/// chosen and why.
fn choose(
    name: &str,
    rdma: impl FnOnce() -> Result<String, TransportError>,
    uring: impl Fn() -> Result<(), TransportError>,
) -> Result<(Implementation, Option<String>), String> {
    let tcp = || {
        if uring().is_ok() {
            Implementation::Uring
        } else {
            Implementation::Std
        }
    };
    Ok(match name {
        "rdma" => (Implementation::Rdma, None),
        "tcp" => (tcp(), None),
        "uring" => (Implementation::Uring, None),
        "std" => (Implementation::Std, None),
        "auto" => match rdma() {
            Ok(device) => (
                Implementation::Rdma,
                Some(format!("transport: auto chose rdma (device {device})")),
            ),
            Err(why) => {
                let why = match why {
                    TransportError::RdmaUnavailable(why) => why,
                    other => other.to_string(),
                };
                let tcp = tcp();
                (
                    tcp,
                    Some(format!(
                        "transport: auto chose tcp over {} (no RDMA: {why})",
                        tcp.as_str()
                    )),
                )
            }
        },
        other => {
            return Err(format!(
                "unknown transport {other:?}: use rdma, tcp, uring, std or auto"
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absent() -> Result<String, TransportError> {
        Err(TransportError::RdmaUnavailable("no RDMA devices".into()))
    }

    fn no_uring() -> Result<(), TransportError> {
        Err(TransportError::Config("no io_uring"))
    }

    #[test]
    fn names_map_to_implementations_and_auto_says_what_it_chose() {
        let found = || Ok("rxe0".to_string());
        let (imp, note) = choose("auto", found, || Ok(())).unwrap();
        assert_eq!(imp, Implementation::Rdma);
        assert!(note.unwrap().contains("rdma (device rxe0)"));
        let (imp, note) = choose("auto", absent, || Ok(())).unwrap();
        assert_eq!(imp, Implementation::Uring);
        let note = note.unwrap();
        assert!(
            note.contains("tcp over io_uring") && note.contains("no RDMA devices"),
            "{note}"
        );
        assert_eq!(
            choose("auto", absent, no_uring).unwrap().0,
            Implementation::Std
        );
        assert_eq!(
            choose("tcp", absent, || Ok(())).unwrap(),
            (Implementation::Uring, None)
        );
        assert_eq!(
            choose("tcp", absent, no_uring).unwrap().0,
            Implementation::Std
        );
        for (name, imp) in [
            ("rdma", Implementation::Rdma),
            ("uring", Implementation::Uring),
            ("std", Implementation::Std),
        ] {
            assert_eq!(choose(name, absent, no_uring).unwrap(), (imp, None));
        }
        let e = choose("infiniband", absent, no_uring).unwrap_err();
        assert!(e.contains("use rdma, tcp, uring, std or auto"), "{e}");
    }
}
