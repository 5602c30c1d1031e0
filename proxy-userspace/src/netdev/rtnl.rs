//! Two rtnetlink requests, synchronous, on a socket of the calling thread's network namespace:
//! one link by index (`RTM_GETLINK`) and the id our namespace gives another one (`RTM_GETNSID`).
//! A socket is opened per request: these run at start, at reload and once per stats scrape, never
//! per packet.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
    nsid::{NsidAttribute, NsidMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::NetdevError;

/// What rtnetlink says of one link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, ...); `None` for a physical device.
    pub kind: Option<String>,
    pub mtu: u32,
    /// `IFLA_LINK`: a veth's peer index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the id of the peer's namespace as seen from this one; `None` when the
    /// peer is in this namespace.
    pub peer_netnsid: Option<i32>,
    /// An XDP program is attached (any mode).
    pub xdp_attached: bool,
    /// `IFLA_STATS64` drop and error counters.
    pub stats: LinkDrops,
}

/// The drop and error counters of `IFLA_STATS64` that frames lost in delivery show up in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkDrops {
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
}

fn socket() -> Result<Socket, NetdevError> {
    let mut s = Socket::new(NETLINK_ROUTE).map_err(|source| NetdevError::Netlink {
        op: "opening a rtnetlink socket",
        source,
    })?;
    s.bind_auto().map_err(|source| NetdevError::Netlink {
        op: "binding a rtnetlink socket",
        source,
    })?;
    s.connect(&SocketAddr::new(0, 0))
        .map_err(|source| NetdevError::Netlink {
            op: "connecting a rtnetlink socket",
            source,
        })?;
    Ok(s)
}

/// Send one request and return the first answer that is not an ack.
fn request(
    op: &'static str,
    payload: RouteNetlinkMessage,
) -> Result<RouteNetlinkMessage, NetdevError> {
    let s = socket()?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    s.send(&buf, 0)
        .map_err(|source| NetdevError::Netlink { op, source })?;
    // One answer; a link with many attributes (VF lists) can be large: 64 KiB is the kernel's
    // usual cap for one message.
    let mut rx = vec![0_u8; 65_536];
    let n = s
        .recv(&mut &mut rx[..], 0)
        .map_err(|source| NetdevError::Netlink { op, source })?;
    let rx = rx.get(..n).ok_or(NetdevError::Truncated { op })?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rx).map_err(|e| {
        NetdevError::Decode {
            op,
            message: e.to_string(),
        }
    })?;
    match reply.payload {
        NetlinkPayload::InnerMessage(m) => Ok(m),
        NetlinkPayload::Error(e) => Err(NetdevError::Netlink {
            op,
            source: e.to_io(),
        }),
        _ => Err(NetdevError::Decode {
            op,
            message: "an answer that is neither a message nor an error".into(),
        }),
    }
}

/// The link `index` of the calling thread's namespace.
///
/// # Errors
/// The request failed (no such link: `ENODEV`) or its answer could not be read.
pub fn link(index: u32) -> Result<Link, NetdevError> {
    link_in(index, None)
}

/// The link `index` of the namespace our namespace calls `netnsid` (`IFLA_TARGET_NETNSID`:
/// no need to enter it, but `CAP_NET_ADMIN` over it), or of ours when `None`.
///
/// # Errors
/// The request failed (no such link: `ENODEV`; not permitted) or its answer could not be read.
pub fn link_in(index: u32, netnsid: Option<i32>) -> Result<Link, NetdevError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if let Some(id) = netnsid {
        m.attributes.push(LinkAttribute::IfNetnsId(id));
    }
    match request("RTM_GETLINK", RouteNetlinkMessage::GetLink(m))? {
        RouteNetlinkMessage::NewLink(m) => Ok(from_message(&m)),
        _ => Err(NetdevError::Decode {
            op: "RTM_GETLINK",
            message: "an answer that is not a link".into(),
        }),
    }
}

fn from_message(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        ..Link::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name.clone_from(n),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Link(v) => l.peer_index = Some(*v),
            LinkAttribute::LinkNetNsId(v) => l.peer_netnsid = Some(*v),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(kind_name(k));
                    }
                }
            }
            LinkAttribute::Xdp(x) => {
                l.xdp_attached = x
                    .iter()
                    .any(|x| matches!(x, LinkXdp::Attached(a) if !matches!(a, XdpAttached::None)));
            }
            LinkAttribute::Stats64(s) => {
                l.stats = LinkDrops {
                    rx_dropped: s.rx_dropped,
                    tx_dropped: s.tx_dropped,
                    rx_errors: s.rx_errors,
                    tx_errors: s.tx_errors,
                };
            }
            _ => {}
        }
    }
    l
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Veth => "veth".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

/// The id the calling thread's namespace gives the namespace of `fd` (`None`: it gave none).
///
/// # Errors
/// The request failed or its answer could not be read.
pub fn nsid_of(fd: BorrowedFd<'_>) -> Result<Option<i32>, NetdevError> {
    let mut m = NsidMessage::default();
    let raw = u32::try_from(fd.as_raw_fd()).map_err(|_| NetdevError::Decode {
        op: "RTM_GETNSID",
        message: "a negative file descriptor".into(),
    })?;
    m.attributes.push(NsidAttribute::Fd(raw));
    match request("RTM_GETNSID", RouteNetlinkMessage::GetNsId(m))? {
        RouteNetlinkMessage::NewNsId(m) => Ok(m.attributes.iter().find_map(|a| match a {
            NsidAttribute::Id(id) if *id >= 0 => Some(*id),
            _ => None,
        })),
        _ => Err(NetdevError::Decode {
            op: "RTM_GETNSID",
            message: "an answer that is not a namespace id".into(),
        }),
    }
}
