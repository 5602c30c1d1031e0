//! `cargo xtask bench`: build in release mode and run the bench driver
//! (`tests/src/bin/xdp-proxy-bench.rs`) as root, with results in `bench-results/<timestamp>/`
//! (or `--out DIR`). See BENCHMARKS.md for what it measures.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::{build, privileged, profile_dir, run_cmd};

/// Options of `cargo xtask bench`.
pub struct Options {
    pub quick: bool,
    pub rounds: Option<u32>,
    pub out: Option<PathBuf>,
    /// Extra arguments for the driver (e.g. `--systems direct,xdp`, `--no-micro`).
    pub extra: Vec<std::ffi::OsString>,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    build(root, true)?;
    let bin_dir = root.join("target").join(profile_dir(true));
    let out = match &opts.out {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.canonicalize()
                .with_context(|| format!("resolving {}", dir.display()))?
        }
        None => root.join("bench-results").join(timestamp()),
    };
    let mut cmd = privileged(&bin_dir.join("xdp-proxy-bench"));
    cmd.current_dir(root)
        .env("XDP_PROXY_BIN", bin_dir.join("xdp-proxy"))
        .arg("--out")
        .arg(&out);
    if opts.quick {
        cmd.arg("--quick");
    }
    if let Some(n) = opts.rounds {
        cmd.arg("--rounds").arg(n.to_string());
    }
    cmd.args(&opts.extra);
    run_cmd(&mut cmd)?;
    println!("xtask: bench results in {}", out.display());
    Ok(())
}

/// `YYYYMMDDTHHMMSSZ` (UTC) from `date`, else seconds since the epoch.
fn timestamp() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .to_string()
        })
}
