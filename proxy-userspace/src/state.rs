//! What the control plane knows, shared read-only with the admin listener (/status, /metrics):
//! per service its upstreams as configured, what their names resolved to, their weight, drain
//! and health. The control loop is the only writer; readers take the read lock briefly.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use serde::Serialize;

/// The handle passed around: written by the control loop, read by the admin listener.
pub type SharedStatus = Arc<RwLock<Status>>;

/// A fresh, empty status handle.
#[must_use]
pub fn shared() -> SharedStatus {
    Arc::new(RwLock::new(Status::default()))
}

/// Everything the control plane reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The config file in use.
    pub config: String,
    /// Successful reloads since start.
    pub reloads: u64,
    /// Refused reloads since start.
    pub reload_failures: u64,
    /// The last reload's error, if the last reload failed.
    pub last_reload_error: Option<String>,
    /// Addresses of DNS answers refused by the upstream rule (outside every home CIDR, in a
    /// refused range such as the metadata service, or the proxy's own): never written to the maps.
    pub dns_refused_addresses: u64,
    /// DNS resolutions that failed (the last good addresses were kept).
    pub dns_failures: u64,
    pub services: Vec<ServiceStatus>,
}

/// One configured service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: SocketAddr,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `l4` or `http`.
    pub mode: String,
    /// Datapath service id (`l4` services once written).
    pub id: Option<u32>,
    /// Whether new flows find an upstream (`SERVICE_F_HAS_UPSTREAMS`).
    pub has_upstreams: bool,
    pub upstreams: Vec<UpstreamStatus>,
}

/// One upstream address of a service (a DNS upstream has one entry per resolved address, or
/// one entry with `resolved = None` while it has none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpstreamStatus {
    /// As written in the config (`name:port`, `a.b.c.d:port` or `[v6]:port`).
    pub address: String,
    /// The address in use.
    pub resolved: Option<SocketAddr>,
    /// Datapath upstream id (slot).
    pub id: Option<u32>,
    pub weight: u32,
    pub drain: bool,
    /// Health as the checks see it (true until `fall` failures in a row).
    pub healthy: bool,
    /// Whether the upstream has slots in the service's Maglev table (healthy, weight > 0).
    pub in_table: bool,
    /// The last failed check's error (cleared by a success).
    pub last_error: Option<String>,
}
