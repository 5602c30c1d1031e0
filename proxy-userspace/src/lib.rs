//! xdp-proxy: the daemon and CLI around the XDP fast path.
//!
//! Module map: `config` (file contract and validation), `plan` (desired map contents, stable
//! ids), `maglev` (weighted consistent hashing), `flows` (lifetimes), `health` (upstream
//! probes), `sysctl` (kernel settings), `datapath` (the only module using aya maps and
//! programs), `netdev` (what the kernel says of the datapath's interfaces: a veth's peer, the
//! driver's limits, drop counters; the one-mode attach decision), `daemon` (the run loop), `inspect` (reports), `cli` (commands), `admin` (the /healthz /metrics /status
//! listener), `metrics` (its renderings), `logging` (tracing and the eBPF log bridge), `privs` (dropping capabilities once
//! attached), `fdlimit` (the open-file limit).
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod fdlimit;
pub mod flows;
pub mod health;
pub mod inspect;
pub mod l4;
pub mod l7;
pub mod logging;
pub mod maglev;
pub mod metrics;
pub mod netdev;
pub mod plan;
pub mod privs;
pub mod state;
pub mod sysctl;
pub mod wake;
