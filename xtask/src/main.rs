//! `cargo xtask setup|build|run|test|bench|soak`: the project's own entry points.
//!
//! Everything a fresh machine needs is installed by `setup` (run automatically by `build` when
//! something is missing), so the README's two commands work on a new machine.

mod bench;
mod docs;
mod setup;
mod soak;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, run and test xdp-proxy")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (idempotent): rust-src for nightly,
    /// bpf-linker 0.13.0 against nightly's LLVM, Debian packages.
    Setup,
    /// Build the daemon, the XDP program and the test binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run xdp-proxy (needs root; uses sudo only when not root). Without --config: a
    /// self-contained demo in network namespaces.
    Run {
        /// Run the daemon with this config instead of the demo.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        release: bool,
    },
    /// Run every test: formatting, clippy, unit, packet (BPF_PROG_TEST_RUN) and namespace tests.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Side-by-side benchmark (root; sudo -E when not root): xdp-proxy against direct routing,
    /// nftables NAT, NGINX and HAProxy in one run, interleaved round by round; writes a
    /// markdown report, SVG charts and raw JSON (see BENCHMARKS.md).
    Bench {
        /// Fewer, shorter rounds (under 3 minutes).
        #[arg(long)]
        quick: bool,
        /// Rounds (default 3; 2 with --quick).
        #[arg(long, value_name = "N")]
        rounds: Option<u32>,
        /// Output directory (default: bench-results/<UTC timestamp>/).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Extra arguments for the driver (after `--`), e.g. `--systems direct,xdp --no-micro`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Soak (root; sudo -E when not root): concurrent checksummed TCP flows and UDP sessions
    /// through the XDP fast path for a bounded time, with SIGHUP reloads, an upstream killed
    /// and restored, health flapping and kill -9 of the daemon (see RELIABILITY.md).
    Soak {
        /// Duration in seconds.
        #[arg(long, value_name = "S", default_value_t = 600)]
        secs: u64,
        /// Extra arguments for the driver (after `--`), e.g. `--concurrency 500 --no-kill9`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Shell completions (bash, zsh, fish, elvish, PowerShell) and man pages generated from
    /// xdp-proxy's command line definitions.
    Docs {
        /// Output directory (default: target/docs): completions/ and man/man1/.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// The writing half of `docs`, built with the `docs` feature.
    #[cfg(feature = "docs")]
    #[command(hide = true)]
    DocsGen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Cmd::Setup => setup::run(true),
        Cmd::Build { release } => {
            setup::run(false)?;
            build(&root, release)
        }
        Cmd::Run { config, release } => {
            setup::run(false)?;
            build(&root, release)?;
            run(&root, config.as_deref(), release)
        }
        Cmd::Test { no_lint, args } => {
            setup::run(false)?;
            test(&root, !no_lint, &args)
        }
        Cmd::Docs { out } => {
            let out = out.unwrap_or_else(|| docs::default_out(&root));
            docs::run(&root, &out)
        }
        #[cfg(feature = "docs")]
        Cmd::DocsGen { out } => docs::generate_for_xdp_proxy(&out),
        Cmd::Soak { secs, args } => {
            setup::run(false)?;
            soak::run(&root, secs, &args)
        }
        Cmd::Bench {
            quick,
            rounds,
            out,
            args,
        } => {
            setup::run(false)?;
            bench::run(
                &root,
                &bench::Options {
                    quick,
                    rounds,
                    out,
                    extra: args,
                },
            )
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

pub(crate) fn is_root() -> bool {
    // The effective uid is the third field of "Uid:" in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Run a command, echoing it, and fail with its status.
pub(crate) fn run_cmd(cmd: &mut Command) -> Result<()> {
    println!("xtask: $ {}", render(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {}", render(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", render(cmd));
    }
    Ok(())
}

pub(crate) fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn profile_dir(release: bool) -> &'static str {
    if release { "release" } else { "debug" }
}

fn build(root: &Path, release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.current_dir(root).args([
        "build",
        "-p",
        "proxy-userspace",
        "-p",
        "integration-tests",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)
}

/// Prefix for commands that need root: nothing as root, `sudo -E` otherwise (aya's convention).
fn privileged(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(program);
        c
    }
}

fn run(root: &Path, config: Option<&Path>, release: bool) -> Result<()> {
    let bin_dir = root.join("target").join(profile_dir(release));
    let daemon = bin_dir.join("xdp-proxy");
    match config {
        Some(config) => {
            let config = config
                .canonicalize()
                .with_context(|| format!("config file {}", config.display()))?;
            let mut cmd = privileged(&daemon);
            cmd.arg("run").arg("--config").arg(config);
            run_cmd(&mut cmd)
        }
        None => {
            let demo = bin_dir.join("xdp-proxy-demo");
            let mut cmd = privileged(&demo);
            cmd.env("XDP_PROXY_BIN", &daemon);
            run_cmd(&mut cmd)
        }
    }
}

fn test(root: &Path, lint: bool, extra: &[OsString]) -> Result<()> {
    if lint {
        run_cmd(
            cargo()
                .current_dir(root)
                .args(["fmt", "--all", "--", "--check"]),
        )?;
        run_cmd(cargo().current_dir(root).args([
            "clippy",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The namespace tests run the daemon binary: build it (and the demo) first.
    build(root, false)?;
    let mut cmd = cargo();
    cmd.current_dir(root).env(
        "XDP_PROXY_BIN",
        root.join("target")
            .join(profile_dir(false))
            .join("xdp-proxy"),
    );
    cmd.arg("test");
    if !is_root() {
        // Test binaries need root (BPF, namespaces): run them through sudo, build as the user.
        cmd.args(["--config", "target.'cfg(all())'.runner='sudo -E'"]);
    }
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    run_cmd(&mut cmd)
}
