//! Addresses the proxy never forwards to, and the home CIDRs that would let it.
//!
//! One classification, [`forbidden_upstream`], decides for every place an upstream address
//! comes from: static upstreams of l4 and http services and http route upstreams (config
//! validation, so `xdp-proxy check`, start and reload all refuse them), and every address of a
//! DNS answer for an upstream name (`control::filter_answer`, at run time). Keeping it one
//! function means a range refused in the file can never come back through DNS.
//!
//! Rules:
//! - An upstream address is refused when it lies in a [`FORBIDDEN`] range (loopback,
//!   link-local with the EC2 instance metadata service, the IPv6 metadata address
//!   `fd00:ec2::254`, multicast, unspecified, limited broadcast, IPv4-mapped IPv6), whatever
//!   `nat.home_cidrs` and `nat.allow_any_home` say: forwarding there reaches the proxy host
//!   itself, its metadata credentials, or nothing at all.
//! - An upstream address is refused when it is one of the proxy's own addresses known to the
//!   config (`nat.snat_ipv4`, `nat.snat_ipv6`, a service's listen address, `admin.listen`): the
//!   proxy would forward to itself.
//! - An upstream address outside every home CIDR is refused (the proxy is never an open relay).
//! - A home CIDR is refused ([`home_cidr_problem`]) when its prefix length is 0 (`0.0.0.0/0`,
//!   `::/0`: every address of the family) or when it contains a forbidden range (`0.0.0.0/1`
//!   holds `127.0.0.0/8`, `fd00::/8` holds `fd00:ec2::254`), unless `nat.allow_any_home = true`
//!   (the upstream rules above still hold then). A home CIDR lying inside a forbidden range
//!   (`127.0.0.0/8`, `169.254.169.254/32`, `fe80::/64`) is refused even then: no upstream can
//!   ever be there, so it can only be a mistake.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use super::{IpCidr, NatSettings};

/// A range no upstream may lie in, and what it is (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForbiddenRange {
    pub cidr: IpCidr,
    pub what: &'static str,
}

impl fmt::Display for ForbiddenRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.what, self.cidr)
    }
}

const fn v4(a: [u8; 4], prefix_len: u8, what: &'static str) -> ForbiddenRange {
    ForbiddenRange {
        cidr: IpCidr {
            network: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            prefix_len,
        },
        what,
    }
}

const fn v6(a: [u16; 8], prefix_len: u8, what: &'static str) -> ForbiddenRange {
    ForbiddenRange {
        cidr: IpCidr {
            network: IpAddr::V6(Ipv6Addr::new(
                a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7],
            )),
            prefix_len,
        },
        what,
    }
}

/// The ranges no upstream may lie in. Most specific first: the first range containing an
/// address names it in messages, so the metadata addresses are named as such rather than as
/// link-local or ULA.
static FORBIDDEN: [ForbiddenRange; 12] = [
    v4(
        [169, 254, 169, 254],
        32,
        "the EC2 instance metadata service (IMDS)",
    ),
    // ULA, so no generic rule covers it: it must be listed on its own.
    v6(
        [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254],
        128,
        "the EC2 instance metadata service over IPv6 (IMDS)",
    ),
    v4([0, 0, 0, 0], 32, "the unspecified address"),
    v4([255, 255, 255, 255], 32, "the limited broadcast address"),
    v4([127, 0, 0, 0], 8, "loopback"),
    v4(
        [169, 254, 0, 0],
        16,
        "link-local (it holds the EC2 instance metadata service)",
    ),
    v4([224, 0, 0, 0], 4, "multicast"),
    v6([0; 8], 128, "the unspecified address"),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
    // `[::ffff:169.254.169.254]` would reach the IPv4 address through an IPv6 socket (the
    // daemon's own http connections): the IPv4 rules must not be bypassed this way.
    v6(
        [0, 0, 0, 0, 0, 0xffff, 0, 0],
        96,
        "IPv4-mapped IPv6 (write the IPv4 address itself)",
    ),
];

/// The forbidden range `ip` lies in, if any: such an address is never an upstream, whatever
/// the config says (see the module's rules).
#[must_use]
pub fn forbidden_upstream(ip: IpAddr) -> Option<&'static ForbiddenRange> {
    FORBIDDEN.iter().find(|r| r.cidr.contains(ip))
}

/// One of the proxy's own addresses, with the key it comes from (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnAddress {
    pub addr: IpAddr,
    pub key: String,
}

/// Why an address cannot be an upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamRefusal {
    /// In a range the proxy never forwards to.
    Forbidden(&'static ForbiddenRange),
    /// One of the proxy's own addresses (the key it comes from).
    OwnAddress(String),
    /// Outside every home CIDR.
    OutsideHome,
}

impl fmt::Display for UpstreamRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Forbidden(r) => write!(f, "{r}"),
            Self::OwnAddress(key) => write!(f, "the proxy's own address ({key})"),
            Self::OutsideHome => f.write_str("outside every home CIDR"),
        }
    }
}

/// Why `ip` cannot be an upstream, or `None` when it can: the one rule for static upstreams
/// (config) and DNS answers (run time). `own`: the proxy's own addresses known.
#[must_use]
pub fn refuse_upstream(
    nat: &NatSettings,
    own: &[OwnAddress],
    ip: IpAddr,
) -> Option<UpstreamRefusal> {
    if let Some(r) = forbidden_upstream(ip) {
        return Some(UpstreamRefusal::Forbidden(r));
    }
    if let Some(o) = own.iter().find(|o| o.addr == ip) {
        return Some(UpstreamRefusal::OwnAddress(o.key.clone()));
    }
    if nat.home_cidr_of(ip).is_none() {
        return Some(UpstreamRefusal::OutsideHome);
    }
    None
}

/// The message of a refused static upstream `sa` (config validation), or `None` when it is
/// acceptable. An empty `nat.home_cidrs` is its own problem already: no second one per
/// upstream then.
pub(super) fn upstream_problem(
    nat: &NatSettings,
    own: &[OwnAddress],
    sa: SocketAddr,
) -> Option<String> {
    match refuse_upstream(nat, own, sa.ip())? {
        UpstreamRefusal::Forbidden(r) => Some(format!(
            "{sa} is {r}: the proxy never forwards there, whatever nat.home_cidrs and \
             nat.allow_any_home say; use the address of a home server"
        )),
        UpstreamRefusal::OwnAddress(key) => Some(format!(
            "{sa} is the proxy's own address ({key}): it would forward to itself; use the \
             address of a home server"
        )),
        UpstreamRefusal::OutsideHome if nat.home_cidrs.is_empty() => None,
        UpstreamRefusal::OutsideHome => {
            let cidrs: Vec<String> = nat.home_cidrs.iter().map(ToString::to_string).collect();
            Some(format!(
                "{sa} is outside every home CIDR ({}): the proxy only forwards to home \
                 addresses, never as an open relay; fix the address, or add its home network \
                 to nat.home_cidrs",
                cidrs.join(", ")
            ))
        }
    }
}

/// Why home CIDR `c` is refused, or `None` (see the module's rules): a prefix length of 0 or a
/// prefix containing a forbidden range needs `allow_any_home`; a prefix inside a forbidden
/// range is always refused.
#[must_use]
pub(super) fn home_cidr_problem(c: IpCidr, allow_any_home: bool) -> Option<String> {
    if let Some(r) = FORBIDDEN.iter().find(|r| r.cidr.covers(c)) {
        return Some(format!(
            "{c} lies in {r}: the proxy never forwards there (not even with \
             nat.allow_any_home); remove it"
        ));
    }
    if allow_any_home {
        return None;
    }
    if c.prefix_len == 0 {
        let family = if c.is_ipv6() { "IPv6" } else { "IPv4" };
        return Some(format!(
            "{c} is every {family} address (a default route): the proxy would forward \
             anywhere; list the home networks themselves (like 10.20.0.0/16), or set \
             nat.allow_any_home = true if that is really meant (upstreams in loopback, \
             link-local, metadata, multicast and the other refused ranges stay refused)"
        ));
    }
    let inside: Vec<String> = FORBIDDEN
        .iter()
        .filter(|r| c.covers(r.cidr))
        .map(ToString::to_string)
        .collect();
    if inside.is_empty() {
        return None;
    }
    Some(format!(
        "{c} contains {}: no upstream may be there; narrow the prefix to the home networks, \
         or set nat.allow_any_home = true (upstreams in those ranges stay refused)",
        inside.join(", ")
    ))
}
