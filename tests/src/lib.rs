//! Test support for xdp-proxy: packet building for BPF_PROG_TEST_RUN tests (`packet`) and
//! network-namespace topologies with real traffic (`netns`), and the parts of `cargo xtask bench`
//! (`bench`).

pub mod bench;
pub mod netns;
pub mod packet;
pub mod traffic;
