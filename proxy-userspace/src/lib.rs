//! xdp-proxy: the daemon and CLI around the XDP fast path.

/// The compiled XDP program (ELF, built by build.rs through aya-build), aligned as aya's ELF
/// parser expects. Empty when built with `AYA_BUILD_SKIP=1`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-xdp"));
