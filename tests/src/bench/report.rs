//! The bench's output: `results.json` (every sample), `report.md` (tables with ratios) and SVG
//! bar charts (median bars with min-max whiskers), all from the same measured samples.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::micro::Micro;
use super::systems::{NOT_IMPLEMENTED, System};
use super::{LiveSample, Summary, Workload};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub nproc: String,
    pub cpu_model: String,
    pub kernel: String,
    pub memory: String,
    pub loadavg_start: [f64; 3],
    /// Load averages at the end of each round.
    pub loadavg_rounds: Vec<[f64; 3]>,
    pub loadavg_end: [f64; 3],
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub rounds: u32,
    pub keepalive_seconds: u64,
    pub latency_seconds: u64,
    pub newconn_seconds: u64,
    pub bulk_seconds: u64,
    pub udp_seconds: u64,
    /// UDP client: sockets, requests in flight over all of them, request (= response) size.
    pub udp_sockets: u32,
    pub udp_in_flight: u32,
    pub udp_request_bytes: usize,
    /// Whether the fast path's XDP program run time was measured (BPF run-time statistics on
    /// while the fast path ran).
    pub xdp_run_time_stats: bool,
    pub warmup_seconds: u64,
    pub connections: u32,
    pub micro_samples: u32,
    pub client: String,
    pub upstream: String,
    pub cpu_pinning: String,
    /// `ethtool -k` of each lab interface while each system was set up (first round).
    pub offloads: Vec<(String, Vec<(String, String)>)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SystemInfo {
    pub id: String,
    pub name: String,
    pub description: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    pub started_utc: String,
    pub elapsed_seconds: f64,
    pub machine: Machine,
    pub settings: Settings,
    pub systems: Vec<SystemInfo>,
    pub not_implemented: Vec<(String, String)>,
    pub live: Vec<LiveSample>,
    pub micro: Option<Micro>,
    /// Runs that failed (system, workload, round, error): reported, never silently dropped.
    pub failures: Vec<String>,
}

impl Results {
    fn samples(&self, s: System, w: Workload) -> impl Iterator<Item = &LiveSample> {
        self.live
            .iter()
            .filter(move |x| x.system == s && x.workload == w)
    }

    /// `s`'s value over `base`'s in each round both were measured in, in round order: how much
    /// of a ratio of medians is the spread between rounds.
    fn round_ratios(&self, s: System, base: System, w: Workload) -> Vec<f64> {
        let mut out: Vec<(u32, f64)> = self
            .samples(s, w)
            .filter_map(|x| {
                self.samples(base, w)
                    .find(|b| b.round == x.round)
                    .map(|b| (x.round, x.value / b.value))
            })
            .collect();
        out.sort_by_key(|(round, _)| *round);
        out.into_iter().map(|(_, v)| v).collect()
    }

    fn summary(&self, s: System, w: Workload, f: impl Fn(&LiveSample) -> f64) -> Summary {
        let v: Vec<f64> = self.samples(s, w).map(f).collect();
        Summary::of(&v)
    }

    /// The systems this run was asked to measure.
    fn systems_run(&self) -> Vec<System> {
        System::ALL
            .into_iter()
            .filter(|s| self.systems.iter().any(|i| i.id == s.id()))
            .collect()
    }

    fn systems_in(&self, w: Workload) -> Vec<System> {
        System::ALL
            .into_iter()
            .filter(|s| self.samples(*s, w).next().is_some())
            .collect()
    }
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "–".to_owned()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_summary(s: &Summary) -> String {
    if s.n == 0 {
        return "–".to_owned();
    }
    format!(
        "{} ({}–{})",
        fmt_num(s.median),
        fmt_num(s.min),
        fmt_num(s.max)
    )
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "–".to_owned()
    }
}

/// One markdown table for a throughput workload.
fn throughput_table(r: &Results, w: Workload, unit: &str, cpu_unit: &str, scale: f64) -> String {
    let mut out = String::new();
    let base = r.summary(System::Direct, w, |x| x.value).median;
    let nginx = r.summary(System::NginxStream, w, |x| x.value).median;
    let with_latency = matches!(w, Workload::KeepAlive | Workload::Udp);
    let _ = write!(
        out,
        "| system | {unit} median (min–max) | vs direct | vs nginx stream | bench CPU {cpu_unit} | proxy's own CPU {cpu_unit} | machine CPU {cpu_unit} |"
    );
    if with_latency {
        out.push_str(" p50 / p99 / p99.9 µs |");
    }
    out.push_str(" errors |\n|---|---|---|---|---|---|---|");
    if with_latency {
        out.push_str("---|");
    }
    out.push_str("---|\n");
    for s in r.systems_in(w) {
        let v = r.summary(s, w, |x| x.value);
        let cpu = r.summary(s, w, |x| x.cpu_per_unit() * scale);
        let machine = r.summary(s, w, |x| x.machine_per_unit() * scale);
        let proxy = r.summary(s, w, |x| x.proxy_per_unit().unwrap_or(f64::NAN) * scale);
        let errors: u64 = r.samples(s, w).map(LiveSample::errors).sum();
        let _ = write!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.name(),
            fmt_summary(&v),
            ratio(v.median, base),
            ratio(v.median, nginx),
            fmt_num(cpu.median),
            if proxy.n == 0 {
                "–".to_owned()
            } else {
                fmt_num(proxy.median)
            },
            fmt_num(machine.median),
        );
        if with_latency {
            let p = |f: fn((f64, f64, f64)) -> f64| {
                r.summary(s, w, |x| x.latency().map_or(f64::NAN, f)).median
            };
            let _ = write!(
                out,
                " {} / {} / {} |",
                fmt_num(p(|l| l.0)),
                fmt_num(p(|l| l.1)),
                fmt_num(p(|l| l.2))
            );
        }
        let _ = writeln!(out, " {errors} |");
    }
    if matches!(w, Workload::Udp) {
        // Systems in the run that carry no UDP: a row saying why, not a silent gap.
        for s in r.systems_run() {
            if let Some(why) = s.no_udp_reason() {
                let _ = writeln!(out, "| {} | {why} | | | | | | | |", s.name());
            }
        }
    }
    if !matches!(w, Workload::Bulk | Workload::Udp) {
        for (name, why) in NOT_IMPLEMENTED {
            let _ = write!(out, "| {name} | {why} | | | | | |");
            if with_latency {
                out.push_str(" |");
            }
            out.push_str(" |\n");
        }
    }
    out
}

fn latency_table(r: &Results) -> String {
    let w = Workload::Latency1;
    let mut out = String::from(
        "| system | p50 µs median (min–max) | p50 − direct µs | p99 µs | p99.9 µs | requests/s |\n\
         |---|---|---|---|---|---|\n",
    );
    let lat = |s: System, f: fn(&crate::bench::measure::WrkResult) -> f64| {
        r.summary(s, w, |x| x.wrk.as_ref().map_or(f64::NAN, f))
    };
    let base = lat(System::Direct, |w| w.p50_us).median;
    for s in r.systems_in(w) {
        let p50 = lat(s, |w| w.p50_us);
        let _ = writeln!(
            out,
            "| {} | {} | {:+.1} | {} | {} | {} |",
            s.name(),
            fmt_summary(&p50),
            p50.median - base,
            fmt_num(lat(s, |w| w.p99_us).median),
            fmt_num(lat(s, |w| w.p999_us).median),
            fmt_num(r.summary(s, w, |x| x.value).median),
        );
    }
    out
}

fn micro_table(m: &Micro) -> String {
    let empty = m
        .cases
        .iter()
        .find(|c| c.name == "empty program")
        .map_or(f64::NAN, |c| c.ns_per_packet.median);
    let mut out = String::from(
        "| case | ns/packet median (min–max) | − empty program | what runs |\n|---|---|---|---|\n",
    );
    let mut cases: Vec<&super::micro::Case> = m.cases.iter().collect();
    if let Some(s) = &m.scale {
        cases.push(&s.established_full);
        cases.push(&s.reply_full);
    }
    for c in cases {
        let _ = writeln!(
            out,
            "| {} | {} | {:+.1} | {} |",
            c.name,
            fmt_summary(&c.ns_per_packet),
            c.ns_per_packet.median - empty,
            c.description
        );
    }
    out
}

fn target_line(out: &mut String, what: &str, measured: String, met: Option<bool>) {
    let verdict = match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    };
    let _ = writeln!(out, "| {what} | {measured} | {verdict} |");
}

fn targets(r: &Results) -> String {
    let mut out =
        String::from("| target (xdp-proxy fast path) | measured | verdict |\n|---|---|---|\n");
    let med = |s, w, f: &dyn Fn(&LiveSample) -> f64| r.summary(s, w, f).median;
    let ok = |v: f64| v.is_finite();
    // A CPU cost or latency of 0 means "no sample" (the system was not in the run), not "free".
    let pos = |v: f64| v.is_finite() && v > 0.0;
    for (w, label) in [
        (Workload::KeepAlive, "keep-alive requests/s ≥ 1.05x direct"),
        (Workload::NewConn, "new connections/s ≥ 1.05x direct"),
    ] {
        let x = med(System::XdpFast, w, &|s| s.value) / med(System::Direct, w, &|s| s.value);
        target_line(
            &mut out,
            label,
            format!("{x:.2}x"),
            ok(x).then_some(x >= 1.05),
        );
    }
    for (w, label) in [
        (Workload::KeepAlive, "bench CPU per request < direct's"),
        (Workload::NewConn, "bench CPU per new connection < direct's"),
    ] {
        let x = med(System::XdpFast, w, &LiveSample::cpu_per_unit);
        let d = med(System::Direct, w, &LiveSample::cpu_per_unit);
        target_line(
            &mut out,
            label,
            format!("{} vs {} µs", fmt_num(x), fmt_num(d)),
            (pos(x) && pos(d)).then_some(x < d),
        );
    }
    let p50 = |s| {
        med(s, Workload::Latency1, &|x| {
            x.wrk.as_ref().map_or(f64::NAN, |w| w.p50_us)
        })
    };
    let (px, pd) = (p50(System::XdpFast), p50(System::Direct));
    let d = px - pd;
    target_line(
        &mut out,
        "single-connection p50 ≤ direct + 2 µs",
        format!("{d:+.1} µs"),
        (pos(px) && pos(pd)).then_some(d <= 2.0),
    );
    let x = med(System::XdpFast, Workload::Bulk, &|s| s.value)
        / med(System::Direct, Workload::Bulk, &|s| s.value);
    target_line(
        &mut out,
        "bulk TCP ≥ 1.0x direct",
        format!("{x:.2}x"),
        ok(x).then_some(x >= 1.0),
    );
    let x = med(System::XdpFast, Workload::Bulk, &LiveSample::cpu_per_unit);
    let d = med(System::Direct, Workload::Bulk, &LiveSample::cpu_per_unit);
    target_line(
        &mut out,
        "bench CPU per GB (bulk) < direct's",
        format!("{} vs {} ms/GB", fmt_num(x / 1000.0), fmt_num(d / 1000.0)),
        (pos(x) && pos(d)).then_some(x < d),
    );
    if let Some(m) = &r.micro {
        let get = |n: &str| {
            m.cases
                .iter()
                .find(|c| c.name == n)
                .map_or(f64::NAN, |c| c.ns_per_packet.median)
        };
        let d = get("established forward") - get("empty program");
        target_line(
            &mut out,
            "established flow ≤ empty program + 100 ns (BPF_PROG_TEST_RUN)",
            format!("{d:+.1} ns"),
            ok(d).then_some(d <= 100.0),
        );
    } else {
        target_line(
            &mut out,
            "established flow ≤ empty program + 100 ns",
            "–".into(),
            None,
        );
    }
    for (sys, base, label) in [
        (
            System::XdpUserspace,
            System::NginxStream,
            "userspace L4 keep-alive requests/s ≥ nginx stream",
        ),
        (
            System::XdpHttp,
            System::NginxHttp,
            "L7 (http) keep-alive requests/s ≥ nginx http",
        ),
    ] {
        let x = med(sys, Workload::KeepAlive, &|s| s.value)
            / med(base, Workload::KeepAlive, &|s| s.value);
        // At parity the median of a few rounds can fall either way: the rounds' own ratios
        // beside it.
        let rounds: Vec<String> = r
            .round_ratios(sys, base, Workload::KeepAlive)
            .iter()
            .map(|v| format!("{v:.2}x"))
            .collect();
        let measured = if rounds.len() > 1 {
            format!("{x:.2}x (rounds: {})", rounds.join(", "))
        } else {
            format!("{x:.2}x")
        };
        target_line(&mut out, label, measured, ok(x).then_some(x >= 1.0));
    }
    // Not a target: where the userspace L4 path stands against the library it is built on.
    let own = |s| {
        med(s, Workload::KeepAlive, &|x| {
            x.proxy_per_unit().unwrap_or(f64::NAN)
        })
    };
    let (u, t) = (
        med(System::XdpUserspace, Workload::KeepAlive, &|s| s.value),
        med(System::TokioCopy, Workload::KeepAlive, &|s| s.value),
    );
    if pos(u) && pos(t) {
        let _ = writeln!(
            out,
            "\nReference, not a target: userspace L4 keep-alive requests/s {:.2}x tokio \
             copy_bidirectional's; the proxy's own CPU per request {} µs against {} µs (nginx \
             stream {} µs).",
            u / t,
            fmt_num(own(System::XdpUserspace)),
            fmt_num(own(System::TokioCopy)),
            fmt_num(own(System::NginxStream)),
        );
    }
    out
}

/// The markdown report.
#[must_use]
pub fn markdown(r: &Results) -> String {
    let s = &r.settings;
    let m = &r.machine;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# xdp-proxy bench, {} ({} rounds{})\n",
        r.started_utc,
        s.rounds,
        if s.quick { ", --quick" } else { "" }
    );
    let _ = writeln!(
        out,
        "Machine: {} CPUs, {}, kernel {}, {}. Load average (1/5/15 min) at start {:?}, after each \
         round {:?}, at the end {:?}. Whole run: {:.0} s.\n",
        m.nproc,
        m.cpu_model,
        m.kernel,
        m.memory,
        m.loadavg_start,
        m.loadavg_rounds,
        m.loadavg_end,
        r.elapsed_seconds
    );
    let _ = writeln!(
        out,
        "Every figure below is the median of {} rounds, (min–max) over the rounds; systems were \
         interleaved round by round. Client: {}. Upstream: {}. {}. Ratios are of medians.\n",
        s.rounds, s.client, s.upstream, s.cpu_pinning
    );
    let _ = writeln!(out, "Systems:\n");
    for sys in &r.systems {
        let _ = writeln!(out, "- **{}**: {}", sys.name, sys.description);
    }
    for (name, why) in &r.not_implemented {
        let _ = writeln!(out, "- **{name}**: {why}");
    }
    let _ = writeln!(
        out,
        "\nCPU columns: *bench CPU* is the CPU time of the bench's own processes (driver with its \
         UDP client thread, wrk, iperf3, the upstreams, the proxy, all their children) plus the \
         ksoftirqd threads; softirq work (forwarding, NAT, XDP on veth) is charged to the process \
         it interrupted, so it is inside. *Proxy's own CPU* is the proxy's process tree; for the \
         xdp-proxy fast path the daemon (control plane) plus {}. *Machine CPU* is all busy time \
         in /proc/stat, other people's work included.",
        if s.xdp_run_time_stats {
            "its XDP programs' run time from the kernel's BPF run-time statistics (on only while \
             the fast path is measured; they add two clock reads per program run)"
        } else {
            "nothing else (run with BPF run-time statistics off: the XDP programs' share is not \
             attributed)"
        }
    );
    let _ = writeln!(out, "\n## Targets\n\n{}", targets(r));
    let _ = writeln!(
        out,
        "## Keep-alive HTTP requests ({} connections, {} s per run)\n\n{}",
        s.connections,
        s.keepalive_seconds,
        throughput_table(r, Workload::KeepAlive, "requests/s", "µs/request", 1.0)
    );
    let _ = writeln!(
        out,
        "## Latency on one kept-alive connection ({} s per run)\n\n{}",
        s.latency_seconds,
        latency_table(r)
    );
    let _ = writeln!(
        out,
        "## New connections (`Connection: close`, {} connections, {} s per run)\n\n{}",
        s.connections,
        s.newconn_seconds,
        throughput_table(r, Workload::NewConn, "connections/s", "µs/connection", 1.0)
    );
    let _ = writeln!(
        out,
        "## Bulk TCP (iperf3, one stream, {} s per run)\n\n{}",
        s.bulk_seconds,
        throughput_table(r, Workload::Bulk, "Gbit/s", "ms/GB", 1e-3)
    );
    let _ = writeln!(
        out,
        "## Small UDP request/response ({} sockets, {} requests of {} bytes in flight, {} s per run)\n\n\
         Request/response pairs per second; latency from send to matching answer; errors = \
         requests lost (unanswered within the loss timeout) plus socket errors.\n\n{}",
        s.udp_sockets,
        s.udp_in_flight,
        s.udp_request_bytes,
        s.udp_seconds,
        throughput_table(r, Workload::Udp, "requests/s", "µs/request", 1.0)
    );
    let _ = writeln!(
        out,
        "Offloads (`ethtool -k`) while each system was set up:\n"
    );
    for (sys, devs) in &s.offloads {
        let d: Vec<String> = devs.iter().map(|(d, o)| format!("{d}: {o}")).collect();
        let _ = writeln!(out, "- {sys}: {}", d.join("; "));
    }
    if let Some(micro) = &r.micro {
        let _ = writeln!(
            out,
            "\n## XDP program per packet (BPF_PROG_TEST_RUN, repeat {}, {} calls per case)\n\n\
             Empty program: {}.\n\n{}",
            super::micro::REPEAT,
            s.micro_samples,
            micro.empty_program,
            micro_table(micro)
        );
        if let Some(sc) = &micro.scale {
            let _ = writeln!(
                out,
                "## Flow table at scale\n\n\
                 | figure | value |\n|---|---|\n\
                 | new flows sent through the program | {} (table size {}) |\n\
                 | of which dropped: no free SNAT port within {} probes | {} |\n\
                 | entries counted afterwards (forward / reverse) | {} / {} |\n\
                 | program time to create them (sum of kernel-timed runs) | {:.2} s |\n\
                 | wall time to create them (test runs of SYNs, {} per call; syscalls and CPU contention included) | {:.2} s |\n\
                 | kernel-timed ns per new flow during the fill, median (min–max) | {} |\n\
                 | memory (memlock) forward + reverse table | {:.1} + {:.1} MiB |\n\
                 | established forward with the table full, ns/packet | {} |\n\
                 | reply with the table full, ns/packet | {} |\n",
                sc.flows,
                sc.table_size,
                proxy_common::SNAT_PORT_PROBES,
                sc.snat_exhausted,
                sc.fwd_entries,
                sc.rev_entries,
                sc.fill_kernel_seconds,
                super::micro::REPEAT,
                sc.fill_seconds,
                fmt_summary(&sc.fill_ns_per_flow),
                sc.fwd_memlock_bytes as f64 / 1048576.0,
                sc.rev_memlock_bytes as f64 / 1048576.0,
                fmt_summary(&sc.established_full.ns_per_packet),
                fmt_summary(&sc.reply_full.ns_per_packet),
            );
        }
    }
    if !r.failures.is_empty() {
        let _ = writeln!(out, "## Failed runs\n");
        for f in &r.failures {
            let _ = writeln!(out, "- {f}");
        }
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart: one bar per label (median), a whisker from min to max.
#[must_use]
pub fn bar_chart(title: &str, unit: &str, bars: &[(String, Summary)]) -> String {
    let (w, label_w, row, top) = (760.0, 200.0, 30.0, 46.0);
    let plot_w = w - label_w - 90.0;
    let h = top + row * bars.len() as f64 + 30.0;
    let max = bars
        .iter()
        .map(|(_, s)| s.max.max(s.median))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let x = |v: f64| label_w + plot_w * (v / max).clamp(0.0, 1.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n\
         <text x=\"10\" y=\"38\" fill=\"#555\">{} (bar: median, whisker: min–max)</text>",
        xml_escape(title),
        xml_escape(unit)
    );
    for (i, (label, s)) in bars.iter().enumerate() {
        let y = top + row * i as f64;
        let color = if label.starts_with("xdp") {
            "#d9534f"
        } else {
            "#5b8def"
        };
        let _ = writeln!(
            out,
            "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{l}</text>\n\
             <rect x=\"{label_w}\" y=\"{by}\" width=\"{bw:.1}\" height=\"{bh}\" fill=\"{color}\"/>\n\
             <line x1=\"{x0:.1}\" x2=\"{x1:.1}\" y1=\"{my}\" y2=\"{my}\" stroke=\"black\"/>\n\
             <line x1=\"{x0:.1}\" x2=\"{x0:.1}\" y1=\"{wy0}\" y2=\"{wy1}\" stroke=\"black\"/>\n\
             <line x1=\"{x1:.1}\" x2=\"{x1:.1}\" y1=\"{wy0}\" y2=\"{wy1}\" stroke=\"black\"/>\n\
             <text x=\"{vx:.1}\" y=\"{ty}\">{v}</text>",
            lx = label_w - 8.0,
            ty = y + 19.0,
            l = xml_escape(label),
            by = y + 5.0,
            bw = x(s.median) - label_w,
            bh = row - 10.0,
            x0 = x(s.min),
            x1 = x(s.max),
            my = y + row / 2.0,
            wy0 = y + 9.0,
            wy1 = y + row - 9.0,
            vx = x(s.max).max(x(s.median)) + 6.0,
            v = fmt_num(s.median),
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Write results.json, report.md and the SVG charts into `dir`. Returns the chart file names.
pub fn write_all(r: &Results, dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(r).context("serializing results")?;
    std::fs::write(dir.join("results.json"), json).context("writing results.json")?;
    let mut charts = Vec::new();
    let mut chart =
        |file: &str, title: &str, unit: &str, bars: Vec<(String, Summary)>| -> Result<()> {
            if bars.is_empty() {
                return Ok(());
            }
            std::fs::write(dir.join(file), bar_chart(title, unit, &bars))
                .with_context(|| format!("writing {file}"))?;
            charts.push(file.to_owned());
            Ok(())
        };
    let live = |w: Workload, f: &dyn Fn(&LiveSample) -> f64| -> Vec<(String, Summary)> {
        r.systems_in(w)
            .into_iter()
            .map(|s| (s.name().to_owned(), r.summary(s, w, f)))
            .collect()
    };
    chart(
        "keepalive-rps.svg",
        "Keep-alive HTTP requests/s (higher is better)",
        "requests/s",
        live(Workload::KeepAlive, &|x| x.value),
    )?;
    chart(
        "keepalive-cpu.svg",
        "Bench CPU per keep-alive request (lower is better)",
        "µs of CPU (bench processes + ksoftirqd) per request",
        live(Workload::KeepAlive, &LiveSample::cpu_per_unit),
    )?;
    chart(
        "latency-p50.svg",
        "p50 latency, one kept-alive connection (lower is better)",
        "µs",
        live(Workload::Latency1, &|x| {
            x.wrk.as_ref().map_or(f64::NAN, |w| w.p50_us)
        }),
    )?;
    chart(
        "newconn-cps.svg",
        "New connections/s, Connection: close (higher is better)",
        "connections/s",
        live(Workload::NewConn, &|x| x.value),
    )?;
    chart(
        "newconn-cpu.svg",
        "Bench CPU per new connection (lower is better)",
        "µs of CPU (bench processes + ksoftirqd) per connection",
        live(Workload::NewConn, &LiveSample::cpu_per_unit),
    )?;
    chart(
        "bulk-gbps.svg",
        "Bulk TCP throughput, iperf3 one stream (higher is better)",
        "Gbit/s",
        live(Workload::Bulk, &|x| x.value),
    )?;
    chart(
        "udp-rps.svg",
        "Small UDP request/response, requests/s (higher is better)",
        "request/response pairs per second",
        live(Workload::Udp, &|x| x.value),
    )?;
    chart(
        "udp-cpu.svg",
        "Bench CPU per UDP request/response (lower is better)",
        "µs of CPU (bench processes + ksoftirqd) per request",
        live(Workload::Udp, &LiveSample::cpu_per_unit),
    )?;
    if let Some(m) = &r.micro {
        let mut bars: Vec<(String, Summary)> = m
            .cases
            .iter()
            .map(|c| (c.name.clone(), c.ns_per_packet))
            .collect();
        if let Some(s) = &m.scale {
            bars.push((
                s.established_full.name.clone(),
                s.established_full.ns_per_packet,
            ));
            bars.push((s.reply_full.name.clone(), s.reply_full.ns_per_packet));
        }
        chart(
            "xdp-ns-per-packet.svg",
            "XDP program cost per packet, BPF_PROG_TEST_RUN (lower is better)",
            "ns per packet",
            bars,
        )?;
    }
    let mut md = markdown(r);
    if !charts.is_empty() {
        md.push_str("\n## Charts\n\n");
        for c in &charts {
            let _ = writeln!(md, "![{c}]({c})\n");
        }
    }
    std::fs::write(dir.join("report.md"), md).context("writing report.md")?;
    Ok(charts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(system: System, round: u32, value: f64) -> LiveSample {
        LiveSample {
            system,
            workload: Workload::KeepAlive,
            round,
            value,
            wrk: None,
            iperf: None,
            udp: None,
            cpu: super::super::measure::CpuUse::default(),
            units: 1.0,
        }
    }

    #[test]
    fn userspace_targets_show_each_rounds_ratio() {
        let r = Results {
            live: vec![
                sample(System::NginxStream, 2, 100.0),
                sample(System::XdpUserspace, 2, 150.0),
                sample(System::NginxStream, 1, 100.0),
                sample(System::XdpUserspace, 1, 80.0),
                sample(System::NginxStream, 3, 100.0),
                sample(System::XdpUserspace, 3, 101.0),
                // A round the base system was not measured in has no ratio.
                sample(System::XdpUserspace, 4, 500.0),
            ],
            ..Results::default()
        };
        assert_eq!(
            r.round_ratios(
                System::XdpUserspace,
                System::NginxStream,
                Workload::KeepAlive
            ),
            [0.8, 1.5, 1.01]
        );
        let t = targets(&r);
        let line = t
            .lines()
            .find(|l| l.contains("userspace L4 keep-alive"))
            .expect("the userspace L4 target line");
        // Median of 80, 101, 150, 500 (125.5) against 100, met; the rounds beside it.
        assert!(
            line.contains("1.25x (rounds: 0.80x, 1.50x, 1.01x)") && line.contains("| met |"),
            "{line}"
        );
    }

    #[test]
    fn chart_is_svg_with_one_bar_per_label() {
        let s = Summary::of(&[1.0, 2.0, 3.0]);
        let svg = bar_chart("t <x>", "u", &[("a".into(), s), ("xdp".into(), s)]);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains("t &lt;x&gt;"));
    }
}
