//! xdp-proxy: the daemon and CLI around the XDP fast path.
#![forbid(unsafe_code)]

pub mod config;
pub mod maglev;
pub mod flows;
pub mod health;
pub mod plan;
pub mod sysctl;
