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
    /// Where the peer's namespace was found (`None`: the daemon's own namespace, or it was not
    /// needed).
    pub namespace: Option<PathBuf>,
    /// An XDP program is attached to the peer.
    pub xdp: bool,
    /// `rx-gro` is active on the peer; `Err` says why it could not be read. Not read when the
    /// peer has an XDP program (that alone decides).
    pub gro: Result<bool, String>,
}

/// Inspect the peer of the veth `link`: its name and XDP program through rtnetlink from this
/// namespace (`IFLA_TARGET_NETNSID`, `CAP_NET_ADMIN`); then, only when it has no XDP program,
/// its GRO setting through ethtool inside its namespace (found by id, entered by a thread:
/// `CAP_SYS_ADMIN`). A failure of that second step is kept in [`PeerFacts::gro`].
///
/// # Errors
/// The link has no peer index, or the peer link cannot be read.
pub fn inspect(link: &Link) -> Result<PeerFacts, NetdevError> {
    let peer = link.peer_index.ok_or_else(|| NetdevError::Peer {
        iface: link.name.clone(),
        why: "rtnetlink gave no peer index (IFLA_LINK)".into(),
    })?;
    let peer_link = rtnl::link_in(peer, link.peer_netnsid)?;
    if peer_link.xdp_attached {
        return Ok(PeerFacts {
            name: peer_link.name,
            namespace: None,
            xdp: true,
            gro: Err("not read: the peer has an XDP program".into()),
        });
    }
    let namespace = link.peer_netnsid.and_then(find_namespace);
    let gro = match (link.peer_netnsid, &namespace) {
        (Some(id), None) => Err(format!(
            "its namespace (id {id} from here) is neither under /run/netns nor any process's"
        )),
        _ => {
            let name = peer_link.name.clone();
            in_namespace(namespace.clone(), move || super::ethtool::gro_active(&name))
                .map_err(|e| e.to_string())
        }
    };
    Ok(PeerFacts {
        name: peer_link.name,
        namespace,
        xdp: false,
        gro,
    })
}

/// Run `f` on a short-lived thread that first enters the network namespace at `ns` (`None`:
/// stays in this one). The calling thread's namespace is never changed.
///
/// # Errors
/// Opening or entering the namespace (`setns` needs `CAP_SYS_ADMIN`), starting the thread, or
/// `f`'s own error.
pub fn in_namespace<T, F>(ns: Option<PathBuf>, f: F) -> Result<T, NetdevError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetdevError> + Send + 'static,
{
    let joined = std::thread::Builder::new()
        .name("xdp-proxy-netns".into())
        .spawn(move || {
            if let Some(path) = &ns {
                let file = File::open(path).map_err(|source| NetdevError::Io {
                    op: "opening a network namespace",
                    source,
                })?;
                nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetdevError::Io {
                        op: "entering a network namespace (setns needs CAP_SYS_ADMIN)",
                        source: e.into(),
                    }
                })?;
            }
            f()
        })
        .map_err(|source| NetdevError::Io {
            op: "starting a thread to enter a network namespace",
            source,
        })?
        .join();
    joined.map_err(|_| NetdevError::Io {
        op: "a thread in another network namespace",
        source: std::io::Error::other("panicked"),
    })?
}

/// Whether `a` and `b` are the same network namespace (same device and inode).
#[must_use]
pub fn same_namespace(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
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
