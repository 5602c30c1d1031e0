//! `xdp-proxy-soak`: the long soak of `cargo xtask soak` (see `integration_tests::soak` for what
//! runs, which faults are injected and what must hold). Needs root.
//!
//! Usage: `xdp-proxy-soak [--secs N] [--cycle-secs N] [--concurrency N] [--udp-sessions N]
//! [--hup-secs N] [--no-kill-upstream] [--no-flap] [--no-kill9] [--seed N]`
//! (default: 600 s, 60 s cycles, 300 flows at once, 12 UDP sessions, SIGHUP every 10 s).
//! Exit 0 when nothing was lost and the daemon's resources stayed steady; 1 otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use integration_tests::soak::{self, SoakOptions};

fn parse_args() -> Result<SoakOptions> {
    let mut o = SoakOptions {
        duration: Duration::from_secs(600),
        cycle: Duration::from_secs(60),
        concurrency: 300,
        udp_sessions: 12,
        udp_requests: 20,
        hup_every: Duration::from_secs(10),
        ..SoakOptions::ci(600)
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<u64> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name}: not a number"))
        };
        match a.as_str() {
            "--secs" => o.duration = Duration::from_secs(num("--secs")?),
            "--cycle-secs" => o.cycle = Duration::from_secs(num("--cycle-secs")?),
            "--concurrency" => o.concurrency = usize::try_from(num("--concurrency")?)?,
            "--udp-sessions" => o.udp_sessions = usize::try_from(num("--udp-sessions")?)?,
            "--hup-secs" => o.hup_every = Duration::from_secs(num("--hup-secs")?),
            "--seed" => o.seed = num("--seed")?,
            "--no-kill-upstream" => o.kill_upstream = false,
            "--no-flap" => o.flap_health = false,
            "--no-kill9" => o.kill9 = false,
            "-h" | "--help" => {
                println!(
                    "xdp-proxy-soak [--secs N] [--cycle-secs N] [--concurrency N] \
                     [--udp-sessions N] [--hup-secs N] [--no-kill-upstream] [--no-flap] \
                     [--no-kill9] [--seed N]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(o)
}

fn main() -> Result<()> {
    let opts = parse_args()?;
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    // Ctrl-C / SIGTERM: the soak stops at its next step and the lab cleans up on drop.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                flag.store(true, Ordering::Relaxed);
            });
        })
        .context("spawning the signal thread")?;
    println!(
        "soak: {:?}, cycles of {:?}, {} TCP flows at once, {} UDP sessions, SIGHUP every {:?}; \
         faults: kill upstream {}, health flap {}, kill -9 {}",
        opts.duration,
        opts.cycle,
        opts.concurrency,
        opts.udp_sessions,
        opts.hup_every,
        opts.kill_upstream,
        opts.flap_health,
        opts.kill9
    );
    let report = soak::run(&opts, &|| cancel.load(Ordering::Relaxed))?;
    println!("soak passed: {} bytes lost or corrupted", report.losses);
    Ok(())
}
