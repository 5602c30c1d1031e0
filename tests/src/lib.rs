//! Test support for xdp-proxy: packet building for BPF_PROG_TEST_RUN tests (`packet`) and
//! network-namespace topologies with real traffic (`netns`), HTTP echo upstreams (`echo`), the parts of `cargo xtask bench`
//! (`bench`) and the soak of `cargo xtask soak` (`soak`).

pub mod bench;
pub mod echo;
pub mod netns;
pub mod packet;
pub mod soak;
pub mod traffic;
