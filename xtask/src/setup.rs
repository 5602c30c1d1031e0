//! `cargo xtask setup`: install what the build and the tests need, idempotently.
//!
//! Steps (each printed, each skipped when already done):
//! 1. rust-src for the nightly toolchain (`-Z build-std=core` for bpfel-unknown-none);
//! 2. bpf-linker 0.13.0 linked against the nightly toolchain's own LLVM 22: a prefix directory
//!    outside target/ (so `cargo clean` keeps it) whose lib/ holds symlinks to nightly's
//!    libLLVM, then `LLVM_PREFIX=<prefix> cargo install bpf-linker@0.13.0 --locked
//!    --no-default-features --features llvm-22` (the binary's rpath points at the prefix);
//! 3. the Debian packages the tests and the demo use.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{is_root, run_cmd};

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages: ip (namespaces, veth), ethtool (offload settings), nft and bpftool for
/// operators and tests, curl for the demo and docs.
const DEB_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "nftables",
    "bpftool",
    "curl",
    "procps",
    // `cargo xtask bench`: the systems it compares and its load generators.
    "nginx-light",
    "libnginx-mod-stream",
    "haproxy",
    "wrk",
    "iperf3",
];

/// Run setup. `verbose` prints every step even when nothing is to be done (`cargo xtask setup`);
/// otherwise (called by build/run/test) only steps that do something are printed.
pub fn run(verbose: bool) -> Result<()> {
    let say = |msg: &str| {
        if verbose {
            println!("setup: {msg}");
        }
    };
    let sysroot = nightly_sysroot()?;

    // 1. rust-src for nightly.
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        say("rust-src for nightly: present");
    } else {
        println!("setup: installing rust-src for the nightly toolchain");
        crate::run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }

    // 2. bpf-linker against nightly's LLVM.
    if bpf_linker_ok() {
        say(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: present and its libLLVM resolves"
        ));
    } else {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM (~1 min)");
        let prefix = llvm_prefix()?;
        link_llvm(&sysroot, &prefix)?;
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.env("LLVM_PREFIX", &prefix).args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
        run_cmd(&mut cmd)?;
        if !bpf_linker_ok() {
            bail!("bpf-linker was installed but `bpf-linker --version` still fails");
        }
    }

    // 3. Debian packages.
    let missing: Vec<&str> = DEB_PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        say(&format!(
            "Debian packages present: {}",
            DEB_PACKAGES.join(" ")
        ));
    } else {
        println!("setup: installing Debian packages: {}", missing.join(" "));
        let apt = |args: &[&str]| -> Command {
            let mut c = if is_root() {
                Command::new("apt-get")
            } else {
                let mut c = Command::new("sudo");
                c.arg("apt-get");
                c
            };
            c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
            c
        };
        run_cmd(&mut apt(&["update", "-q"]))?;
        let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
        install.args(&missing);
        run_cmd(&mut install)?;
    }
    say("done");
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .output()
        .context("running `rustc +nightly --print sysroot` (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing (`rustc +nightly` failed: {}); this project builds \
             its XDP program with the machine's nightly toolchain",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let s = String::from_utf8(out.stdout).context("nightly sysroot path is not UTF-8")?;
    Ok(PathBuf::from(s.trim()))
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

/// Where the LLVM symlinks live: outside target/ so `cargo clean` keeps them, and stable across
/// clones because the installed bpf-linker's rpath points here.
fn llvm_prefix() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share/xdp-proxy/llvm-prefix"))
}

/// Symlink nightly's libLLVM under `<prefix>/lib` with the three names bpf-linker's build looks
/// for: the real library (`libLLVM.so.<ver>-rust-<ver>-nightly`), `libLLVM.so` and the
/// `libLLVM-<major>-rust-<ver>-nightly.so` linker script.
fn link_llvm(sysroot: &Path, prefix: &Path) -> Result<()> {
    let src_dir = sysroot.join("lib");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let mut real = None;
    let mut script = None;
    for entry in fs::read_dir(&src_dir).with_context(|| format!("reading {}", src_dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", src_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") {
            real = Some(name);
        } else if name.starts_with("libLLVM-") && name.ends_with(".so") {
            script = Some(name);
        }
    }
    let real = real.with_context(|| format!("no libLLVM.so.* in {}", src_dir.display()))?;
    let mut links = vec![
        (real.clone(), real.clone()),
        ("libLLVM.so".to_owned(), real),
    ];
    if let Some(script) = script {
        links.push((script.clone(), script));
    }
    for (name, target) in links {
        let link = lib.join(&name);
        let target = src_dir.join(&target);
        if fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(&target, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
        println!("setup: {} -> {}", link.display(), target.display());
    }
    Ok(())
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}
