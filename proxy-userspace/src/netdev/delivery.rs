//! The kernel's drop and error counters of the datapath's interfaces (`IFLA_STATS64`), read
//! beside the program's own. The program counts a forward when `XDP_TX` or the devmap redirect
//! is accepted; a frame the driver then cannot deliver (a veth peer without NAPI, a driver
//! without `ndo_xdp_xmit`, a full transmit ring) is lost after that, and shows only here: on a
//! veth only in the `xdp` tracepoints, which the program's tracepoint companions count per
//! interface (`xdp_xmit_drops`: a devmap flush into a veth whose peer has no NAPI fails before
//! the veth counts anything), on other drivers also as their own transmit drops and errors.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::{NetdevError, rtnl};

/// One interface's delivery counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Delivery {
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Frames the program sent out of this interface (devmap redirect, veth `XDP_TX`) that the
    /// kernel then failed to transmit, per the `xdp` tracepoints (`XP_XMIT_DROPS`; 0 when they
    /// are not attached).
    pub xdp_xmit_drops: u64,
}

impl Delivery {
    /// Frames lost on the way out: what a black hole behind the program shows as.
    #[must_use]
    pub const fn lost_outbound(&self) -> u64 {
        self.tx_dropped
            .saturating_add(self.tx_errors)
            .saturating_add(self.xdp_xmit_drops)
    }
}

/// Read the device counters of the interface `index` in this namespace (`xdp_xmit_drops` is
/// left 0: it comes from the program's map, see `Datapath::delivery`).
///
/// # Errors
/// rtnetlink failed (the interface is gone).
pub fn read(index: u32) -> Result<Delivery, NetdevError> {
    Ok(Delivery::from(rtnl::link(index)?.stats))
}

impl From<rtnl::LinkDrops> for Delivery {
    fn from(s: rtnl::LinkDrops) -> Self {
        Self {
            rx_dropped: s.rx_dropped,
            tx_dropped: s.tx_dropped,
            rx_errors: s.rx_errors,
            tx_errors: s.tx_errors,
            xdp_xmit_drops: 0,
        }
    }
}

/// How often a warning about one interface is repeated while its losses keep growing.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

/// Watches the outbound losses of each interface and says when they grow: once at the first
/// growth, then at most every [`WARN_EVERY`] while they keep growing.
#[derive(Debug, Default)]
pub struct DeliveryWatch {
    last: HashMap<String, u64>,
    warned: HashMap<String, Instant>,
}

/// An interface whose losses grew since the last look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Growth {
    pub iface: String,
    /// Lost since the last look.
    pub new: u64,
    /// Lost in all (the kernel's counter).
    pub total: u64,
}

impl DeliveryWatch {
    /// Feed the current counters; returns the interfaces to warn about now. The first look at an
    /// interface only records its counters.
    pub fn observe(&mut self, now: Instant, iface: &str, d: &Delivery) -> Option<Growth> {
        let total = d.lost_outbound();
        let before = self.last.insert(iface.to_owned(), total)?;
        let new = total.checked_sub(before).filter(|n| *n > 0)?;
        let due = self
            .warned
            .get(iface)
            .is_none_or(|at| now.duration_since(*at) >= WARN_EVERY);
        if !due {
            return None;
        }
        self.warned.insert(iface.to_owned(), now);
        Some(Growth {
            iface: iface.to_owned(),
            new,
            total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(tx_dropped: u64, tx_errors: u64) -> Delivery {
        Delivery {
            tx_dropped,
            tx_errors,
            ..Delivery::default()
        }
    }

    #[test]
    fn first_look_records_then_growth_warns_once_a_minute() {
        let mut w = DeliveryWatch::default();
        let t0 = Instant::now();
        assert_eq!(
            w.observe(t0, "ph", &d(5, 0)),
            None,
            "the first look only records"
        );
        assert_eq!(w.observe(t0, "ph", &d(5, 0)), None, "no growth");
        assert_eq!(
            w.observe(t0 + Duration::from_secs(1), "ph", &d(7, 1)),
            Some(Growth {
                iface: "ph".into(),
                new: 3,
                total: 8
            })
        );
        assert_eq!(
            w.observe(t0 + Duration::from_secs(2), "ph", &d(9, 1)),
            None,
            "growing again within a minute: no second line"
        );
        assert_eq!(
            w.observe(t0 + Duration::from_secs(62), "ph", &d(10, 1))
                .map(|g| (g.new, g.total)),
            Some((1, 11))
        );
        // Another interface has its own state; a counter that went back (device re-created)
        // is not growth.
        assert_eq!(w.observe(t0, "pc", &d(100, 0)), None);
        assert_eq!(w.observe(t0, "pc", &d(3, 0)), None);
    }
}
