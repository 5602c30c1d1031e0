//! What the kernel says of the datapath's interfaces, beyond what aya does: their kind, driver
//! and MTU, a veth's peer, and the frames the kernel dropped on them.
//!
//! Used before attaching ([`native`]: which XDP mode delivers on every configured interface, so
//! the daemon never reports ready on a path that drops everything) and while running
//! ([`delivery`]: the kernel's drop counters beside the program's own, so such a black hole
//! shows as a number in `/metrics`, `/status` and `inspect stats`).

pub mod delivery;
mod ethtool;
pub mod native;
pub mod peer;
pub mod rtnl;

pub use delivery::{Delivery, DeliveryWatch};
pub use native::{Egress, Facts, Native};

/// A request to the kernel about an interface failed.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("rtnetlink: {op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rtnetlink: {op}: the answer was cut short")]
    Truncated { op: &'static str },
    #[error("rtnetlink: {op}: unreadable answer: {message}")]
    Decode { op: &'static str, message: String },
    #[error("ethtool netlink on `{iface}`: {message}")]
    Ethtool { iface: String, message: String },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("veth `{iface}`: {why}")]
    Peer { iface: String, why: String },
}
