//! Builds the XDP program (`proxy-ebpf`) with the nightly toolchain through aya-build and leaves
//! the object in OUT_DIR, where `src/lib.rs` embeds it.
//!
//! With `AYA_BUILD_SKIP=1` (for `cargo check`/clippy on stable alone) aya-build writes nothing,
//! so an empty stub is written instead; loading a stub fails at run time with a clear error.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "proxy-ebpf";
const EBPF_BIN: &str = "proxy-xdp";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let manifest_dir = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    // This crate lives in proxy-ebpf/object; the eBPF crate is its parent directory.
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", manifest_dir.display()))?
        .to_path_buf();
    let ebpf_dir_str = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", ebpf_dir.display()))?;
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let object = out_dir.join(EBPF_BIN);
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(&object, []).with_context(|| format!("writing stub {}", object.display()))?;
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir_str,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the XDP program (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )?;
    Ok(())
}
