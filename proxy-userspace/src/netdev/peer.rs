//! A veth's peer: which namespace it lives in, and whether it has GRO on or an XDP program of
//! its own (what decides whether frames native XDP sends into the veth are delivered or dropped
//! in the peer, see [`super::native`]).
//!
//! The peer's namespace is known to rtnetlink only by an id local to ours
//! (`IFLA_LINK_NETNSID`). To look inside it, the namespaces this host can name are tried in turn
//! (`/run/netns/*`, then every process's `/proc/PID/ns/net`) and the one our namespace gives that
//! id (`RTM_GETNSID` with its fd) is entered by a short-lived thread, which asks rtnetlink for
//! the peer link and ethtool for its features there. GRO is a device feature that rtnetlink does
//! not report, hence ethtool's generic netlink family ([`super::ethtool`]).

use std::{
    collections::HashSet,
    fs::File,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use nix::sched::CloneFlags;

use super::{
    NetdevError,
    rtnl::{self, Link},
};

/// What was seen of a veth's peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFacts {
    /// The peer's interface name, in its namespace.
    pub name: String,
    /// Where the peer's namespace was found (`None`: the daemon's own namespace).
    pub namespace: Option<PathBuf>,
    /// `rx-gro` is active on the peer.
    pub gro: bool,
    /// An XDP program is attached to the peer.
    pub xdp: bool,
}

/// Inspect the peer of the veth `link`.
///
/// # Errors
/// The link has no peer index, its namespace was not found among those this host can name, or
/// a request in it failed (entering a namespace needs `CAP_SYS_ADMIN`).
pub fn inspect(link: &Link) -> Result<PeerFacts, NetdevError> {
    let peer = link.peer_index.ok_or_else(|| NetdevError::Peer {
        iface: link.name.clone(),
        why: "rtnetlink gave no peer index (IFLA_LINK)".into(),
    })?;
    let namespace = match link.peer_netnsid {
        None => None,
        Some(id) => Some(find_namespace(id).ok_or_else(|| NetdevError::Peer {
            iface: link.name.clone(),
            why: format!(
                "its peer's namespace (id {id} from here) is neither under /run/netns nor \
                 any process's"
            ),
        })?),
    };
    let ns = namespace.clone();
    let iface = link.name.clone();
    let joined = std::thread::Builder::new()
        .name("xdp-proxy-peer".into())
        .spawn(move || in_namespace(ns.as_deref(), peer))
        .map_err(|source| NetdevError::Io {
            op: "starting the thread that inspects a veth peer",
            source,
        })?
        .join();
    let (name, xdp, gro) = joined.map_err(|_| NetdevError::Peer {
        iface: iface.clone(),
        why: "the thread inspecting its peer panicked".into(),
    })??;
    Ok(PeerFacts {
        name,
        namespace,
        gro,
        xdp,
    })
}

/// Runs on its own thread: enter `ns` (if any), then read the peer link and its features.
fn in_namespace(ns: Option<&Path>, peer: u32) -> Result<(String, bool, bool), NetdevError> {
    if let Some(path) = ns {
        let f = File::open(path).map_err(|source| NetdevError::Io {
            op: "opening the peer's namespace",
            source,
        })?;
        nix::sched::setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetdevError::Io {
            op: "entering the peer's namespace (setns needs CAP_SYS_ADMIN)",
            source: e.into(),
        })?;
    }
    let link = rtnl::link(peer)?;
    let gro = super::ethtool::gro_active(&link.name)?;
    Ok((link.name, link.xdp_attached, gro))
}

/// The path of a namespace whose id, as our namespace gives it, is `id`.
fn find_namespace(id: i32) -> Option<PathBuf> {
    let mut seen = HashSet::new();
    for path in candidates() {
        let Ok(f) = File::open(&path) else { continue };
        let Ok(meta) = f.metadata() else { continue };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        if rtnl::nsid_of(f.as_fd()).ok().flatten() == Some(id) {
            return Some(path);
        }
    }
    None
}

/// Named namespaces first (`ip netns add`), then every process's.
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            out.extend(entries.flatten().map(|e| e.path()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        out.extend(
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .map(|e| e.path().join("ns/net")),
        );
    }
    out
}
