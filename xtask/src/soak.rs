//! `cargo xtask soak`: build in release mode and run the soak driver
//! (`tests/src/bin/xdp-proxy-soak.rs`) as root: 10 minutes of concurrent, checksummed TCP flows
//! and UDP sessions through the XDP fast path with faults injected (see RELIABILITY.md).

use std::ffi::OsString;
use std::path::Path;

use anyhow::Result;

use crate::{build, privileged, profile_dir, run_cmd};

/// Run the soak for `secs` seconds; `extra` goes to the driver (e.g. `--concurrency 500`).
pub fn run(root: &Path, secs: u64, extra: &[OsString]) -> Result<()> {
    build(root, true)?;
    let bin_dir = root.join("target").join(profile_dir(true));
    let mut cmd = privileged(&bin_dir.join("xdp-proxy-soak"));
    cmd.current_dir(root)
        .env("XDP_PROXY_BIN", bin_dir.join("xdp-proxy"))
        .arg("--secs")
        .arg(secs.to_string())
        .args(extra);
    run_cmd(&mut cmd)
}
