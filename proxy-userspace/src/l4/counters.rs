//! Counters of the userspace data paths (L4 here, L7 in `crate::l7`), per service and per
//! upstream address, as atomics the data path bumps; [`Registry`] turns the running services
//! into plain [`crate::metrics::UserspaceService`] data for `/metrics` and `/status`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::metrics::{UserspaceService, UserspaceTraffic};

/// Traffic of one service or one upstream address of it.
#[derive(Debug, Default)]
pub struct Traffic {
    /// TCP connections accepted and connected / UDP sessions opened / HTTP client connections
    /// accepted (per upstream: connections or requests sent to it).
    pub opened: AtomicU64,
    /// Those open now.
    pub active: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Upstream connects (TCP, UDP socket, HTTP pool connect) that failed.
    pub connect_failures: AtomicU64,
}

impl Traffic {
    /// Count one opened connection or session; it is active until the guard drops.
    #[must_use]
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(self))
    }

    #[must_use]
    pub fn read(&self) -> UserspaceTraffic {
        UserspaceTraffic {
            opened: self.opened.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            bytes_to_upstream: self.bytes_up.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_down.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
        }
    }
}

/// Keeps one connection or session counted as active.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Traffic>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per upstream address.
#[derive(Debug, Default)]
pub struct PerUpstream(Mutex<BTreeMap<SocketAddr, Arc<Traffic>>>);

impl PerUpstream {
    /// The counters of `addr` (created at its first use).
    #[must_use]
    pub fn get(&self, addr: SocketAddr) -> Arc<Traffic> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(m.entry(addr).or_default())
    }

    #[must_use]
    pub fn read(&self) -> BTreeMap<SocketAddr, UserspaceTraffic> {
        let m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.iter().map(|(a, t)| (*a, t.read())).collect()
    }
}

/// The L4 path's own list of served services (it follows reloads).
type L4List = Arc<RwLock<Vec<Arc<super::Service>>>>;

/// What the admin listener reads: the running userspace services, filled once they started
/// (the L4 list follows reloads: it is the L4 path's own list).
#[derive(Clone, Debug, Default)]
pub struct Registry {
    l4: Arc<RwLock<Option<L4List>>>,
    l7: Arc<RwLock<Vec<Arc<crate::l7::Service>>>>,
}

impl Registry {
    pub fn set_l4(&self, l4: &super::L4) {
        let handle = Arc::clone(&l4.services);
        *self
            .l4
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
    }

    pub fn set_l7(&self, l7: &crate::l7::L7) {
        *self
            .l7
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = l7.services.clone();
    }

    /// Every userspace service's counters now.
    #[must_use]
    pub fn read(&self) -> Vec<UserspaceService> {
        let mut out = Vec::new();
        let l4 = self
            .l4
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(l4) = l4 {
            let list = l4
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            out.extend(list.iter().map(|s| s.counters()));
        }
        let l7 = self
            .l7
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        out.extend(l7.iter().map(|s| s.counters()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_follows_guards_and_upstreams_are_separate() {
        let t = Arc::new(Traffic::default());
        let a = t.open();
        let b = t.open();
        drop(a);
        t.bytes_up.fetch_add(5, Ordering::Relaxed);
        let r = t.read();
        assert_eq!((r.opened, r.active, r.bytes_to_upstream), (2, 1, 5));
        drop(b);
        assert_eq!(t.read().active, 0);
        let per = PerUpstream::default();
        let x: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let y: SocketAddr = "10.0.0.2:80".parse().unwrap();
        per.get(x).connect_failures.fetch_add(1, Ordering::Relaxed);
        let _g = per.get(y).open();
        let r = per.read();
        assert_eq!(r[&x].connect_failures, 1);
        assert_eq!((r[&y].opened, r[&y].active), (1, 1));
        assert!(Registry::default().read().is_empty());
    }
}
