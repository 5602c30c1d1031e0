//! `cargo xtask bench`: xdp-proxy side by side with direct routing, nftables NAT, NGINX and
//! HAProxy, in one run, interleaved round by round. Needs root. Writes results.json, report.md
//! and SVG charts into `--out DIR`. See BENCHMARKS.md.
//!
//! Usage: xdp-proxy-bench [--quick] [--rounds N] [--out DIR] [--no-micro] [--no-live]
//!                        [--systems direct,xdp,nftables,nginx-stream,nginx-http,haproxy]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use integration_tests::bench::measure::{
    self, CpuProbe, WRK_SCRIPT, WrkLoad, host_info, loadavg, run_iperf, run_wrk,
};
use integration_tests::bench::report::{self, Machine, Results, Settings, SystemInfo};
use integration_tests::bench::systems::{BULK_PORT, BenchLab, NOT_IMPLEMENTED, System};
use integration_tests::bench::{LiveSample, Workload, micro};
use integration_tests::netns::daemon_binary;

/// Set by SIGINT/SIGTERM: the bench stops after the current run and its lab's Drop removes the
/// namespaces and stops the processes it started.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("sigaction {sig}"))?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

struct Args {
    quick: bool,
    rounds: Option<u32>,
    out: Option<PathBuf>,
    micro: bool,
    live: bool,
    systems: Vec<System>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        rounds: None,
        out: None,
        micro: true,
        live: true,
        systems: System::ALL.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--no-micro" => a.micro = false,
            "--no-live" => a.live = false,
            "--rounds" => {
                let v = it.next().context("--rounds needs a number")?;
                let n: u32 = v.parse().with_context(|| format!("--rounds {v:?}"))?;
                ensure!((1..=20).contains(&n), "--rounds must be 1..=20");
                a.rounds = Some(n);
            }
            "--out" => a.out = Some(PathBuf::from(it.next().context("--out needs a directory")?)),
            "--systems" => {
                let v = it.next().context("--systems needs a list")?;
                a.systems = v
                    .split(',')
                    .map(|id| {
                        System::ALL
                            .into_iter()
                            .find(|s| s.id() == id)
                            .with_context(|| format!("unknown system {id:?}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "-h" | "--help" => {
                println!(
                    "xdp-proxy-bench [--quick] [--rounds N] [--out DIR] [--no-micro] [--no-live] \
                     [--systems direct,xdp,nftables,nginx-stream,nginx-http,haproxy]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(a)
}

/// `YYYYMMDDTHHMMSSZ` for now (UTC), from the days-to-civil algorithm.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        })
        .map_or_else(|| "unknown memory".to_owned(), |m| format!("{m} RAM"));
    Machine {
        nproc: host_info("nproc", &[]),
        cpu_model,
        kernel: host_info("uname", &["-r"]),
        memory,
        loadavg_start: loadavg().unwrap_or_default(),
        ..Machine::default()
    }
}

struct Plan {
    rounds: u32,
    keepalive: Duration,
    latency: Duration,
    newconn: Duration,
    bulk: Duration,
    warmup: Duration,
    connections: u32,
    micro_samples: u32,
    scale_flows: u32,
}

impl Plan {
    fn new(a: &Args) -> Self {
        if a.quick {
            Self {
                rounds: a.rounds.unwrap_or(2),
                keepalive: Duration::from_secs(2),
                latency: Duration::from_secs(1),
                newconn: Duration::from_secs(2),
                bulk: Duration::from_secs(2),
                warmup: Duration::ZERO,
                connections: 16,
                micro_samples: 50,
                scale_flows: 100_000,
            }
        } else {
            Self {
                rounds: a.rounds.unwrap_or(3),
                keepalive: Duration::from_secs(8),
                latency: Duration::from_secs(4),
                newconn: Duration::from_secs(8),
                bulk: Duration::from_secs(8),
                warmup: Duration::from_secs(1),
                connections: 16,
                micro_samples: 400,
                scale_flows: micro::SCALE_FLOWS,
            }
        }
    }
}

fn measure_one(
    lab: &BenchLab,
    system: System,
    pid: Option<u32>,
    workload: Workload,
    round: u32,
    plan: &Plan,
    script: &std::path::Path,
) -> Result<LiveSample> {
    let client = &lab.topo.client;
    let url = system.http_url();
    let wrk = |connections, duration, close| -> Result<(measure::WrkResult, measure::CpuUse)> {
        let probe = CpuProbe::start(pid)?;
        let r = run_wrk(
            client,
            &url,
            &WrkLoad {
                connections,
                duration,
                close,
            },
            script,
        )?;
        Ok((r, probe.finish()?))
    };
    let (value, units, wrk_r, iperf_r, cpu) = match workload {
        Workload::KeepAlive | Workload::Latency1 | Workload::NewConn => {
            let (conns, d, close) = match workload {
                Workload::KeepAlive => (plan.connections, plan.keepalive, false),
                Workload::Latency1 => (1, plan.latency, false),
                _ => (plan.connections, plan.newconn, true),
            };
            let (r, cpu) = wrk(conns, d, close)?;
            ensure!(r.requests > 0, "wrk completed no request against {url}");
            (r.rate(), r.requests as f64, Some(r), None, cpu)
        }
        Workload::Bulk => {
            let probe = CpuProbe::start(pid)?;
            let r = run_iperf(
                client,
                &system.target_ip().to_string(),
                BULK_PORT,
                plan.bulk,
            )?;
            let cpu = probe.finish()?;
            (
                r.bits_per_second / 1e9,
                r.bytes as f64 / 1e9,
                None,
                Some(r),
                cpu,
            )
        }
    };
    Ok(LiveSample {
        system,
        workload,
        round,
        value,
        wrk: wrk_r,
        iperf: iperf_r,
        cpu,
        units,
    })
}

fn describe(s: &LiveSample) -> String {
    match s.workload {
        Workload::KeepAlive => format!(
            "{:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, CPU {:.1} µs/req{}",
            s.value,
            s.wrk.as_ref().map_or(0.0, |w| w.p50_us),
            s.wrk.as_ref().map_or(0.0, |w| w.p99_us),
            s.cpu_per_unit(),
            errors(s)
        ),
        Workload::Latency1 => format!(
            "1 conn: p50 {:.0} µs, {:.0} req/s{}",
            s.wrk.as_ref().map_or(0.0, |w| w.p50_us),
            s.value,
            errors(s)
        ),
        Workload::NewConn => format!(
            "{:.0} conn/s, CPU {:.1} µs/conn{}",
            s.value,
            s.cpu_per_unit(),
            errors(s)
        ),
        Workload::Bulk => format!(
            "{:.2} Gbit/s, CPU {:.0} ms/GB",
            s.value,
            s.cpu_per_unit() / 1000.0
        ),
    }
}

fn errors(s: &LiveSample) -> String {
    match s.wrk.as_ref().map_or(0, |w| w.errors) {
        0 => String::new(),
        n => format!(", {n} errors"),
    }
}

fn live(
    args: &Args,
    plan: &Plan,
    results: &mut Results,
    out: &std::path::Path,
    t0: Instant,
) -> Result<()> {
    println!(
        "setting up the lab (client / proxy / home namespaces, upstream nginx, iperf3 server)"
    );
    let mut lab = BenchLab::new(daemon_binary()?)?;
    let script = lab.topo.lab.write_file("wrk-report.lua", WRK_SCRIPT)?;
    let total = plan.rounds as usize * args.systems.len();
    let mut done = 0;
    for round in 1..=plan.rounds {
        for &system in &args.systems {
            check_interrupted()?;
            done += 1;
            println!(
                "[{done}/{total}] round {round}/{}: {} (elapsed {:.0} s, load {:?})",
                plan.rounds,
                system.name(),
                t0.elapsed().as_secs_f64(),
                loadavg().unwrap_or_default()
            );
            let running = match lab.start(system) {
                Ok(r) => r,
                Err(e) => {
                    let msg = format!("round {round} {}: setup failed: {e:#}", system.name());
                    println!("  FAILED: {msg}");
                    results.failures.push(msg);
                    continue;
                }
            };
            if round == 1 {
                results
                    .settings
                    .offloads
                    .push((system.name().to_owned(), lab.offloads()));
            }
            if !plan.warmup.is_zero() {
                let _ = run_wrk(
                    &lab.topo.client,
                    &system.http_url(),
                    &WrkLoad {
                        connections: plan.connections,
                        duration: plan.warmup,
                        close: false,
                    },
                    &script,
                );
            }
            for w in Workload::ALL {
                if w == Workload::Bulk && !system.carries_bulk() {
                    continue;
                }
                if INTERRUPTED.load(Ordering::Relaxed) {
                    break;
                }
                match measure_one(&lab, system, running.pid, w, round, plan, &script) {
                    Ok(s) => {
                        println!("  {:<14} {}", w.id(), describe(&s));
                        results.live.push(s);
                    }
                    Err(e) => {
                        let msg = format!("round {round} {} {}: {e:#}", system.name(), w.id());
                        println!("  FAILED: {msg}");
                        results.failures.push(msg);
                    }
                }
            }
            lab.stop(running)
                .with_context(|| format!("tearing down {}", system.name()))?;
        }
        results
            .machine
            .loadavg_rounds
            .push(loadavg().unwrap_or_default());
        // Partial results survive an interrupted run.
        results.elapsed_seconds = t0.elapsed().as_secs_f64();
        report::write_all(results, out)?;
    }
    Ok(())
}

fn bench() -> Result<PathBuf> {
    let args = parse_args()?;
    install_signal_handlers()?;
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench needs root (namespaces, XDP): run it through `cargo xtask bench`"
    );
    let t0 = Instant::now();
    let stamp = timestamp();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(&stamp));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let plan = Plan::new(&args);
    let mut results = Results {
        started_utc: stamp,
        machine: machine(),
        settings: Settings {
            quick: args.quick,
            rounds: plan.rounds,
            keepalive_seconds: plan.keepalive.as_secs(),
            latency_seconds: plan.latency.as_secs(),
            newconn_seconds: plan.newconn.as_secs(),
            bulk_seconds: plan.bulk.as_secs(),
            warmup_seconds: plan.warmup.as_secs(),
            connections: plan.connections,
            micro_samples: plan.micro_samples,
            client: "wrk 1 thread (latency percentiles from its Lua done() hook), iperf3 one \
                     stream, both in the client namespace"
                .to_owned(),
            upstream: format!(
                "nginx, 1 worker, `return 200` of a {}-byte body from memory, keepalive_requests \
                 10000000; iperf3 server; both in the home namespace",
                integration_tests::bench::systems::BODY.len()
            ),
            cpu_pinning: "No CPU pinning: client, proxy and upstream share the machine's CPUs; \
                          every proxy runs one worker / one thread"
                .to_owned(),
            offloads: Vec::new(),
        },
        systems: args
            .systems
            .iter()
            .map(|s| SystemInfo {
                id: s.id().to_owned(),
                name: s.name().to_owned(),
                description: s.description().to_owned(),
            })
            .collect(),
        not_implemented: NOT_IMPLEMENTED
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect(),
        ..Results::default()
    };
    let m = &results.machine;
    println!(
        "xdp-proxy bench: {} CPUs ({}), kernel {}, load average {:?}; results in {}",
        m.nproc,
        m.cpu_model,
        m.kernel,
        m.loadavg_start,
        out.display()
    );
    if args.micro {
        println!(
            "XDP program per packet (BPF_PROG_TEST_RUN, {} calls of {} runs per case) and the \
             flow table at {} flows",
            plan.micro_samples,
            micro::REPEAT,
            plan.scale_flows
        );
        match micro::run(plan.micro_samples, Some(plan.scale_flows)) {
            Ok(m) => {
                for c in &m.cases {
                    println!("  {:<22} {:.1} ns/packet", c.name, c.ns_per_packet.median);
                }
                if let Some(s) = &m.scale {
                    println!(
                        "  {} flows in {:.2} s; {:.0} + {:.0} MiB; established at full table {:.1} ns",
                        s.flows,
                        s.fill_seconds,
                        s.fwd_memlock_bytes as f64 / 1048576.0,
                        s.rev_memlock_bytes as f64 / 1048576.0,
                        s.established_full.ns_per_packet.median
                    );
                }
                results.micro = Some(m);
            }
            Err(e) => {
                let msg = format!("XDP micro-benchmarks: {e:#}");
                println!("  FAILED: {msg}");
                results.failures.push(msg);
            }
        }
        report::write_all(&results, &out)?;
    }
    if args.live {
        live(&args, &plan, &mut results, &out, t0)?;
    }
    results.machine.loadavg_end = loadavg().unwrap_or_default();
    results.elapsed_seconds = t0.elapsed().as_secs_f64();
    let charts = report::write_all(&results, &out)?;
    println!(
        "\ndone in {:.0} s: {}/report.md, results.json, {} charts",
        results.elapsed_seconds,
        out.display(),
        charts.len()
    );
    if !results.failures.is_empty() {
        bail!(
            "{} run(s) failed (listed in the report):\n{}",
            results.failures.len(),
            results.failures.join("\n")
        );
    }
    Ok(out)
}

fn main() -> ExitCode {
    match bench() {
        Ok(out) => {
            if let Ok(md) = std::fs::read_to_string(out.join("report.md")) {
                println!("\n{md}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xdp-proxy-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
