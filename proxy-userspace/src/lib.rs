//! xdp-proxy: the daemon and CLI around the XDP fast path.
#![forbid(unsafe_code)]

pub mod config;
pub mod maglev;
