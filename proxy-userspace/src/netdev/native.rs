//! Whether native (driver) XDP on an interface delivers what the program sends, decided before
//! anything is attached. A native attach that succeeds proves nothing: the kernel accepts the
//! program and then drops the frames where the driver cannot take them, and the program has
//! already counted a forward. The known cases:
//!
//! - **veth.** A frame sent by native XDP (`XDP_TX` out of the veth, or `XDP_REDIRECT` into it)
//!   lands in the *peer's* receive ring, which exists only while the peer runs NAPI: when the
//!   peer has an XDP program of its own, or GRO on (kernel 5.13+). Without either (the kernel's
//!   default) every frame is dropped in the peer. The peer's link and XDP program are read
//!   from here (`IFLA_TARGET_NETNSID`, `CAP_NET_ADMIN`); its GRO setting only from inside its
//!   namespace (`CAP_SYS_ADMIN`): a peer without an XDP program whose GRO cannot be read is
//!   not shown to deliver. With GRO alone, frames sent back out with `XDP_TX` may wait in the
//!   ring until other traffic wakes the peer (seen in this project's one-interface lab, see
//!   `tests/src/netns.rs`): [`caveat`] warns of it.
//! - **ENA** (most EC2 instances). Without XDP multi-buffer support in the program, native XDP
//!   needs an MTU of at most 3,498 bytes (the driver refuses the program above it); and the
//!   driver's XDP transmit queues take half of the channels, so before driver 2.17 it refuses
//!   the program while more than half of the maximum channels are in use.
//!
//! Generic (skb) XDP delivers through the kernel's own transmit path in every case.

use std::path::Path;

use super::{
    ethtool::{self, Channels},
    peer::{self, PeerFacts},
    rtnl,
};

/// The largest MTU at which ENA accepts a native XDP program without multi-buffer support:
/// its 4 KiB receive page less headroom, the Ethernet, VLAN and FCS bytes and the shared info.
pub const ENA_XDP_MAX_MTU: u32 = 3498;

/// How the program sends frames on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// One interface: replies and forwards leave with `XDP_TX` out of the interface they came in.
    Tx,
    /// Several interfaces: frames leave with `XDP_REDIRECT` into another configured interface.
    Redirect,
}

impl Egress {
    #[must_use]
    pub const fn for_interfaces(count: usize) -> Self {
        if count > 1 { Self::Redirect } else { Self::Tx }
    }
}

/// What is known of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub iface: String,
    /// rtnetlink's link kind (`veth`); `None` for a physical device.
    pub kind: Option<String>,
    /// The driver bound to the device (`/sys/class/net/IF/device/driver`), if any.
    pub driver: Option<String>,
    /// The driver module's version (`/sys/module/DRIVER/version`; in-tree drivers have none).
    pub driver_version: Option<String>,
    pub mtu: u32,
    /// A veth's peer, or why it could not be inspected. `None` for other kinds.
    pub peer: Option<Result<PeerFacts, String>>,
    /// Combined channels (ENA only).
    pub channels: Option<Channels>,
}

/// Whether native XDP delivers on one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Native {
    /// It does (as far as the rules above know).
    Delivers,
    /// It would not deliver, or the driver would refuse it: why, and what to change.
    No { why: String, fix: String },
}

/// Apply the rules of this module to `f`.
#[must_use]
pub fn judge(f: &Facts) -> Native {
    let iface = &f.iface;
    if f.kind.as_deref() == Some("veth") {
        return match &f.peer {
            None => Native::Delivers,
            Some(Err(why)) => Native::No {
                why: format!(
                    "veth `{iface}`: its peer could not be inspected ({why}), so native XDP \
                     cannot be shown to deliver (a veth peer without GRO or an XDP program drops \
                     every frame native XDP sends)"
                ),
                fix: format!(
                    "make sure the peer of `{iface}` has GRO on (`ethtool -K PEER gro on`) or an \
                     XDP program, then set datapath.mode = \"auto\" or \"generic\" (native \
                     cannot be verified here)"
                ),
            },
            Some(Ok(p)) => judge_veth_peer(iface, p),
        };
    }
    if f.driver.as_deref() == Some("ena") {
        if f.mtu > ENA_XDP_MAX_MTU {
            return Native::No {
                why: format!(
                    "ENA interface `{iface}` has MTU {}: ENA accepts a native XDP program only \
                     up to MTU {ENA_XDP_MAX_MTU}",
                    f.mtu
                ),
                fix: format!(
                    "`ip link set dev {iface} mtu {ENA_XDP_MAX_MTU}` (the Direct Connect VIF \
                     carries 1500 or 8500 anyway), or datapath.mode = \"generic\""
                ),
            };
        }
        if ena_halves_channels(f.driver_version.as_deref())
            && let Some(c) = f.channels
            && c.combined > c.combined_max / 2
        {
            return Native::No {
                why: format!(
                    "ENA interface `{iface}` uses {} of {} channels: this driver version ({}) \
                     accepts native XDP only with at most half of them in use (XDP takes the \
                     other half for its transmit queues)",
                    c.combined,
                    c.combined_max,
                    f.driver_version.as_deref().unwrap_or("in-tree")
                ),
                fix: format!(
                    "`ethtool -L {iface} combined {}`, or ENA driver 2.17 or later, or \
                     datapath.mode = \"generic\"",
                    c.combined_max / 2
                ),
            };
        }
    }
    Native::Delivers
}

fn judge_veth_peer(iface: &str, p: &PeerFacts) -> Native {
    let peer = &p.name;
    if p.xdp {
        return Native::Delivers;
    }
    let ns = p.namespace.as_deref().map_or_else(
        || "its namespace".to_owned(),
        |n| format!("namespace {}", n.display()),
    );
    let netns_exec = p
        .namespace
        .as_deref()
        .filter(|n| n.starts_with("/run/netns") || n.starts_with("/var/run/netns"))
        .and_then(Path::file_name)
        .map_or_else(String::new, |n| {
            format!("ip netns exec {} ", n.to_string_lossy())
        });
    match &p.gro {
        Ok(true) => Native::Delivers,
        Ok(false) => Native::No {
            why: format!(
                "veth `{iface}`: its peer `{peer}` ({ns}) has neither GRO on nor an XDP program, \
                 so every frame native XDP sends into `{iface}` is dropped in the peer"
            ),
            fix: format!(
                "`{netns_exec}ethtool -K {peer} gro on`, or attach an XDP program to `{peer}`, \
                 or datapath.mode = \"generic\" or \"auto\""
            ),
        },
        Err(why) => Native::No {
            why: format!(
                "veth `{iface}`: its peer `{peer}` has no XDP program and its GRO setting could \
                 not be read ({why}), so native XDP cannot be shown to deliver (a peer with \
                 neither drops every frame native XDP sends)"
            ),
            fix: format!(
                "attach an XDP program to `{peer}` (seen without entering its namespace), or \
                 run the daemon with CAP_SYS_ADMIN so it can read the peer's GRO, or \
                 datapath.mode = \"generic\" or \"auto\""
            ),
        },
    }
}

/// A warning for an interface that passes [`judge`] but may deliver late: a veth whose peer
/// has GRO and no XDP program, on a host that sends with `XDP_TX` (one interface). Measured in
/// this project's one-interface lab (tests/src/netns.rs): such frames can wait in the peer's
/// ring until other traffic wakes it; an XDP program on the peer flushes them at once.
#[must_use]
pub fn caveat(f: &Facts, egress: Egress) -> Option<String> {
    let Some(Ok(p)) = &f.peer else { return None };
    (f.kind.as_deref() == Some("veth") && egress == Egress::Tx && !p.xdp && p.gro == Ok(true)).then(
        || {
            format!(
                "veth `{}`: its peer `{}` has GRO but no XDP program, and this host sends with \
                 XDP_TX (one interface): frames may wait in the peer's ring until other traffic \
                 wakes it; attach an XDP program to `{}` to flush them at once",
                f.iface, p.name, p.name
            )
        },
    )
}

/// Whether this ENA driver version needs half of the channels free for XDP: before 2.17, and
/// the in-tree driver (no version file) is treated the same way.
fn ena_halves_channels(version: Option<&str>) -> bool {
    let Some(v) = version else { return true };
    let mut parts = v.trim().split(['.', '-', 'g']).map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) < (2, 17),
        _ => true,
    }
}

/// Gather the [`Facts`] of the interface with `index` (named `iface`) in this namespace.
/// Failures to inspect a veth peer are kept in `peer`; failures to read optional facts (driver,
/// channels) leave them out.
///
/// # Errors
/// The interface itself cannot be read from rtnetlink.
pub fn facts(iface: &str, index: u32) -> Result<Facts, super::NetdevError> {
    let link = rtnl::link(index)?;
    let driver = std::fs::read_link(format!("/sys/class/net/{iface}/device/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let driver_version = driver.as_deref().and_then(|d| {
        std::fs::read_to_string(format!("/sys/module/{d}/version"))
            .ok()
            .map(|v| v.trim().to_owned())
    });
    let peer = (link.kind.as_deref() == Some("veth"))
        .then(|| peer::inspect(&link).map_err(|e| e.to_string()));
    let channels = if driver.as_deref() == Some("ena") {
        ethtool::channels(iface).ok().flatten()
    } else {
        None
    };
    Ok(Facts {
        iface: iface.to_owned(),
        kind: link.kind,
        driver,
        driver_version,
        mtu: link.mtu,
        peer,
        channels,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn veth(peer: Option<Result<PeerFacts, String>>) -> Facts {
        Facts {
            iface: "pc".into(),
            kind: Some("veth".into()),
            driver: None,
            driver_version: None,
            mtu: 1500,
            peer,
            channels: None,
        }
    }

    fn peer(gro: bool, xdp: bool) -> PeerFacts {
        PeerFacts {
            name: "c0".into(),
            namespace: Some(PathBuf::from("/run/netns/xpt-cli")),
            gro: Ok(gro),
            xdp,
        }
    }

    fn no(n: &Native) -> (&str, &str) {
        match n {
            Native::No { why, fix } => (why, fix),
            Native::Delivers => panic!("expected a refusal"),
        }
    }

    #[test]
    fn veth_peer_without_gro_or_xdp_does_not_deliver() {
        let n = judge(&veth(Some(Ok(peer(false, false)))));
        let (why, fix) = no(&n);
        assert!(why.contains("`pc`") && why.contains("`c0`"), "{why}");
        assert!(why.contains("/run/netns/xpt-cli"), "{why}");
        assert!(fix.contains("attach an XDP program to `c0`"), "{fix}");
        assert!(
            fix.contains("ip netns exec xpt-cli ethtool -K c0 gro on"),
            "{fix}"
        );
    }

    #[test]
    fn veth_peer_with_gro_or_xdp_delivers() {
        for (gro, xdp) in [(true, false), (false, true), (true, true)] {
            assert_eq!(
                judge(&veth(Some(Ok(peer(gro, xdp))))),
                Native::Delivers,
                "gro {gro} xdp {xdp}"
            );
        }
    }

    #[test]
    fn gro_only_peer_with_xdp_tx_gets_a_caveat() {
        let f = veth(Some(Ok(peer(true, false))));
        assert!(caveat(&f, Egress::Tx).is_some_and(|c| c.contains("XDP_TX")));
        assert_eq!(caveat(&f, Egress::Redirect), None);
        assert_eq!(caveat(&veth(Some(Ok(peer(true, true)))), Egress::Tx), None);
    }

    #[test]
    fn veth_peer_not_inspected_is_not_native() {
        let n = judge(&veth(Some(Err("no namespace".into()))));
        let (why, _) = no(&n);
        assert!(
            why.contains("could not be inspected (no namespace)"),
            "{why}"
        );
        // The link was read, the GRO setting was not (no CAP_SYS_ADMIN): still not native.
        let mut p = peer(false, false);
        p.gro = Err("setns: EPERM".into());
        let n = judge(&veth(Some(Ok(p))));
        let (why, fix) = no(&n);
        assert!(why.contains("could not be read (setns: EPERM)"), "{why}");
        assert!(fix.contains("CAP_SYS_ADMIN"), "{fix}");
    }

    fn ena(mtu: u32, version: Option<&str>, channels: Option<(u32, u32)>) -> Facts {
        Facts {
            iface: "ens5".into(),
            kind: None,
            driver: Some("ena".into()),
            driver_version: version.map(Into::into),
            mtu,
            peer: None,
            channels: channels.map(|(combined, combined_max)| Channels {
                combined,
                combined_max,
            }),
        }
    }

    #[test]
    fn ena_mtu_above_3498_is_refused_with_the_numbers() {
        let n = judge(&ena(9001, Some("2.13.0g"), Some((4, 8))));
        let (why, fix) = no(&n);
        assert!(why.contains("MTU 9001") && why.contains("3498"), "{why}");
        assert!(fix.contains("ip link set dev ens5 mtu 3498"), "{fix}");
        assert_eq!(
            judge(&ena(3498, Some("2.13.0g"), Some((4, 8)))),
            Native::Delivers
        );
    }

    #[test]
    fn ena_before_2_17_needs_half_the_channels() {
        let n = judge(&ena(1500, Some("2.16.1g"), Some((8, 8))));
        let (why, fix) = no(&n);
        assert!(why.contains("8 of 8 channels"), "{why}");
        assert!(fix.contains("ethtool -L ens5 combined 4"), "{fix}");
        // The in-tree driver (no version) is treated as older.
        assert!(matches!(
            judge(&ena(1500, None, Some((8, 8)))),
            Native::No { .. }
        ));
        for ok in [
            ena(1500, Some("2.17.0g"), Some((8, 8))),
            ena(1500, Some("2.16.1g"), Some((4, 8))),
            ena(1500, Some("2.16.1g"), None),
        ] {
            assert_eq!(judge(&ok), Native::Delivers, "{ok:?}");
        }
    }

    #[test]
    fn other_devices_deliver() {
        let f = Facts {
            iface: "eth0".into(),
            kind: None,
            driver: Some("mlx5_core".into()),
            driver_version: None,
            mtu: 9000,
            peer: None,
            channels: None,
        };
        assert_eq!(judge(&f), Native::Delivers);
    }
}
