//! The compiled XDP program. A crate of its own so the daemon, the packet tests and the
//! namespace tests all embed the same object, built once by build.rs.

/// The XDP program (ELF), aligned as aya's ELF parser expects. Empty when built with
/// `AYA_BUILD_SKIP=1` (`cargo check`/clippy on stable alone): loading it then fails.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-xdp"));
