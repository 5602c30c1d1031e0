//! The systems under test, each set up in the proxy namespace of one two-interface lab and torn
//! down again before the next: direct kernel routing (no NAT), the xdp-proxy fast path, nftables
//! DNAT+SNAT, NGINX stream, NGINX http (upstream keep-alive), HAProxy tcp mode. The upstream
//! (NGINX, one worker, a fixed 128-byte body) and an iperf3 server run in the home namespace for
//! the whole bench; the driver adds the UDP responder there (see `bench::udp`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

use crate::netns::{Daemon, TwoInterface, has_xdp, two};

/// Port of the HTTP service on the proxy (all proxies) and of the upstream in the home namespace.
pub const SERVICE_PORT: u16 = 80;
pub const HOME_HTTP_PORT: u16 = 8080;
/// iperf3: same port on the proxy and in the home namespace.
pub const BULK_PORT: u16 = 5201;
/// Small UDP request/response: same port on the proxy and for the responder at home.
pub const UDP_PORT: u16 = 5300;
/// The upstream's response body: 128 bytes.
pub const BODY: &str = "xdp-proxy bench body: static text served by nginx from memory (return 200), the same for every system...........................";
const _: () = assert!(BODY.len() == 128);

const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
const NFT_TABLE: &str = "xptbench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    Direct,
    XdpFast,
    Nftables,
    NginxStream,
    NginxHttp,
    Haproxy,
    TokioCopy,
    XdpUserspace,
    XdpHttp,
}

impl System {
    pub const ALL: [System; 9] = [
        System::Direct,
        System::XdpFast,
        System::Nftables,
        System::NginxStream,
        System::NginxHttp,
        System::Haproxy,
        System::TokioCopy,
        System::XdpUserspace,
        System::XdpHttp,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::XdpFast => "xdp-proxy fast path",
            System::Nftables => "nftables NAT",
            System::NginxStream => "nginx stream",
            System::NginxHttp => "nginx http",
            System::Haproxy => "haproxy tcp",
            System::TokioCopy => "tokio copy_bidirectional",
            System::XdpUserspace => "xdp-proxy userspace L4",
            System::XdpHttp => "xdp-proxy L7 (http)",
        }
    }

    /// A file-name friendly id.
    #[must_use]
    pub const fn id(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::XdpFast => "xdp",
            System::Nftables => "nftables",
            System::NginxStream => "nginx-stream",
            System::NginxHttp => "nginx-http",
            System::Haproxy => "haproxy",
            System::TokioCopy => "tokio-copy",
            System::XdpUserspace => "xdp-userspace",
            System::XdpHttp => "xdp-http",
        }
    }

    /// What runs where and with how many workers.
    #[must_use]
    pub const fn description(self) -> &'static str {
        match self {
            System::Direct => {
                "kernel IPv4 forwarding in the proxy namespace, no NAT, no conntrack rules; the \
                 client targets the home address directly (the floor)"
            }
            System::XdpFast => {
                "xdp-proxy daemon (release), native XDP on both proxy interfaces, l4 services for \
                 HTTP, iperf3 and UDP"
            }
            System::Nftables => {
                "nftables DNAT (prerouting) + SNAT (postrouting) with conntrack, kernel forwarding"
            }
            System::NginxStream => "nginx stream proxy_pass, worker_processes 1",
            System::NginxHttp => {
                "nginx http proxy_pass, worker_processes 1, upstream keepalive 64 (HTTP/1.1), \
                 the forwarding headers xdp-proxy's http services send (X-Forwarded-For \
                 $proxy_add_x_forwarded_for, X-Forwarded-Proto, Forwarded, the client's Host): \
                 the same work per request"
            }
            System::Haproxy => "haproxy mode tcp, nbthread 1",
            System::TokioCopy => {
                "reference: a TCP proxy that is only tokio::io::copy_bidirectional (the bench \
                 binary, --tcp-copy), one tokio worker thread, a task per connection: what the \
                 userspace L4 path is built on, without its upstream choice, health, counters, \
                 timeouts or half-close accounting"
            }
            System::XdpUserspace => {
                "xdp-proxy daemon (release), datapath mode = \"userspace\": the same l4 services \
                 proxied by the daemon (tokio, XDP_PROXY_WORKER_THREADS=1: one worker thread, as \
                 nginx's one worker), no XDP"
            }
            System::XdpHttp => {
                "xdp-proxy daemon (release), an http service (hyper reverse proxy, pooled \
                 keep-alive upstream connections), datapath mode = \"userspace\", \
                 XDP_PROXY_WORKER_THREADS=1 (one worker thread, as nginx's one worker), access log \
                 off (--log-level info,xdp_proxy::access=off, as nginx's access_log off)"
            }
        }
    }

    /// Whether the system carries iperf3 (an HTTP-only proxy does not).
    #[must_use]
    pub const fn carries_bulk(self) -> bool {
        !matches!(self, System::NginxHttp | System::XdpHttp)
    }

    /// Whether the system carries UDP (the HTTP proxies and HAProxy do not).
    #[must_use]
    pub const fn carries_udp(self) -> bool {
        !matches!(
            self,
            System::NginxHttp | System::XdpHttp | System::Haproxy | System::TokioCopy
        )
    }

    /// Why a system has no UDP row.
    #[must_use]
    pub const fn no_udp_reason(self) -> Option<&'static str> {
        match self {
            System::Haproxy => Some("HAProxy cannot proxy UDP (TCP and HTTP only)"),
            System::TokioCopy => Some("n/a: a TCP-only reference"),
            System::NginxHttp | System::XdpHttp => Some("n/a: an HTTP (L7) proxy"),
            _ => None,
        }
    }

    /// The address the client sends to.
    #[must_use]
    pub fn target_ip(self) -> std::net::Ipv4Addr {
        if self == System::Direct {
            two::HOME
        } else {
            two::PROXY_CLIENT_SIDE
        }
    }

    #[must_use]
    pub fn http_url(self) -> String {
        let port = if self == System::Direct {
            HOME_HTTP_PORT
        } else {
            SERVICE_PORT
        };
        format!("http://{}:{port}/", self.target_ip())
    }
}

/// Rows of the table for systems the project does not have yet (none now: the userspace L4
/// and L7 rows are measured).
pub const NOT_IMPLEMENTED: [(&str, &str); 0] = [];

/// The bench's lab: the two-interface topology with the upstream and iperf3 running at home.
pub struct BenchLab {
    pub topo: TwoInterface,
    pub dir: PathBuf,
    pub daemon_bin: PathBuf,
}

/// A system while it is set up.
pub struct Running {
    pub system: System,
    /// The proxy's own process (userspace proxies and the daemon), for CPU attribution.
    pub pid: Option<u32>,
    daemon: Option<Daemon>,
}

fn nginx_common(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/{name}.pid;\n\
         error_log {d}/{name}.error.log warn;\nworker_rlimit_nofile 65536;\n\
         events {{ worker_connections 16384; }}\n"
    )
}

fn nginx_http_paths(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "  access_log off;\n  client_body_temp_path {d}/{name}-body;\n  proxy_temp_path {d}/{name}-proxy;\n\
         fastcgi_temp_path {d}/{name}-fcgi;\n  uwsgi_temp_path {d}/{name}-uwsgi;\n  scgi_temp_path {d}/{name}-scgi;\n\
         keepalive_requests 10000000;\n  keepalive_timeout 300s;\n"
    )
}

/// The daemon for the userspace rows, set up like the NGINX rows beside it: one worker thread
/// (`XDP_PROXY_WORKER_THREADS=1`, NGINX runs `worker_processes 1`) and no access log (NGINX
/// runs `access_log off`).
fn start_userspace_daemon(
    lab: &mut crate::netns::Lab,
    ns: &crate::netns::Netns,
    config: &str,
) -> Result<Daemon> {
    Daemon::start_with_workers(
        lab,
        ns,
        config,
        Some(USERSPACE_WORKERS),
        &["--log-level", "info,xdp_proxy::access=off"],
    )
}

/// Worker threads of the daemon in the userspace rows (NGINX and HAProxy run one).
pub const USERSPACE_WORKERS: usize = 1;

/// Poll `check` every 50 ms until it is true, for at most `limit`.
fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what}: not ready after {limit:?}")
}

/// The l4 service for the UDP request/response workload (daemon config): no health check (the
/// responder has no TCP port to check).
fn udp_service() -> String {
    format!(
        "[[service]]\nname = \"udp\"\nlisten = \"{svc}:{UDP_PORT}\"\nprotocol = \"udp\"\nmode = \"l4\"\n\
         upstreams = [\"{home}:{UDP_PORT}\"]\n[service.health]\nkind = \"none\"\n",
        svc = two::PROXY_CLIENT_SIDE,
        home = two::HOME,
    )
}

/// Whether something in `ns` has a UDP socket bound to `ip:port` (per `ss`).
pub fn udp_bound(ns: &crate::netns::Netns, ip: std::net::Ipv4Addr, port: u16) -> bool {
    ns.exec("ss", &["-Hlun", &format!("src {ip}:{port}")])
        .is_ok_and(|o| !o.trim().is_empty())
}

/// Whether something in `ns` listens on TCP `ip:port` (per `ss`).
fn listening(ns: &crate::netns::Netns, ip: std::net::Ipv4Addr, port: u16) -> bool {
    ns.exec("ss", &["-Hltn", &format!("src {ip}:{port}")])
        .is_ok_and(|o| !o.trim().is_empty())
}

impl BenchLab {
    /// Build the topology and start the upstream nginx and iperf3 server in the home namespace.
    pub fn new(daemon_bin: PathBuf) -> Result<Self> {
        let mut topo = TwoInterface::new("bench")?;
        let dir = topo.lab.run_dir().to_path_buf();
        // Direct routing needs a way back from home to the client subnet (NAT systems never use
        // it: the home host sees only the proxy's home-side address).
        topo.home.ip(&[
            "route",
            "add",
            "10.100.0.0/24",
            "via",
            &two::PROXY_HOME_SIDE.to_string(),
        ])?;
        let conf = format!(
            "{common}http {{\n{paths}  server {{\n    listen {home}:{port} backlog=8192;\n    \
             location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
            common = nginx_common(&dir, "upstream"),
            paths = nginx_http_paths(&dir, "upstream"),
            home = two::HOME,
            port = HOME_HTTP_PORT,
            body = BODY,
        );
        let path = topo.lab.write_file("upstream.conf", &conf)?;
        let mut cmd = topo.home.command("nginx")?;
        cmd.args([
            "-e",
            &format!("{}/upstream.stderr.log", dir.display()),
            "-c",
        ])
        .arg(&path);
        topo.lab.spawn("upstream-nginx", cmd)?;
        let mut cmd = topo.home.command("iperf3")?;
        cmd.args([
            "-s",
            "-B",
            &two::HOME.to_string(),
            "-p",
            &BULK_PORT.to_string(),
        ]);
        topo.lab.spawn("iperf3-server", cmd)?;
        let home = topo.home.clone();
        wait_until("upstream nginx", Duration::from_secs(10), || {
            listening(&home, two::HOME, HOME_HTTP_PORT)
        })?;
        wait_until("iperf3 server", Duration::from_secs(10), || {
            listening(&home, two::HOME, BULK_PORT)
        })?;
        // The same offloads for every system: native XDP on a veth turns TSO off on its peer, so
        // TSO is off on the client's and the home host's veth whatever runs on the proxy
        // (transmit checksum offload is already off there, see TwoInterface). GSO and GRO stay
        // as they are, identical for all.
        for (ns, dev) in [(&topo.client, two::CLIENT_DEV), (&topo.home, two::HOME_DEV)] {
            ns.exec("ethtool", &["-K", dev, "tso", "off"])?;
        }
        // Forwarding is on in the proxy namespace for every system (the daemon turns it on
        // anyway, and leaves it on); userspace proxies do not use it.
        topo.proxy.sysctl("net.ipv4.ip_forward", "1")?;
        // The load generator's own ports: the new-connection runs leave tens of thousands of
        // its connections in TIME_WAIT, and with the default 28,232 ephemeral ports wrk's
        // connect() then searched most of the range for a free port, in the kernel, for every
        // connection (runs after the first fell to a few hundred connections/s, whichever
        // system was measured). As load generators are set up: TIME_WAIT ports reused for new
        // outgoing connections when timestamps allow. The range stays the default: with all
        // 64,512 ports the client made more distinct 4-tuples per minute than the fast path has
        // SNAT ports (22,528, each held 60 s after its flow closed) and its SYNs were dropped
        // (drop_snat_exhausted). Only the client namespace: nothing of the systems under test
        // changes.
        topo.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        Ok(Self {
            topo,
            dir,
            daemon_bin,
        })
    }

    /// Offload settings of every lab interface (`ethtool -k`, the lines that matter).
    pub fn offloads(&self) -> Vec<(String, String)> {
        let t = &self.topo;
        let mut out = Vec::new();
        for (ns, dev) in [
            (&t.client, two::CLIENT_DEV),
            (&t.proxy, two::PROXY_CLIENT_DEV),
            (&t.proxy, two::PROXY_HOME_DEV),
            (&t.home, two::HOME_DEV),
        ] {
            let text = ns.exec("ethtool", &["-k", dev]).unwrap_or_default();
            let keep: Vec<String> = text
                .lines()
                .filter(|l| {
                    [
                        "tx-checksumming:",
                        "tcp-segmentation-offload:",
                        "generic-segmentation-offload:",
                        "generic-receive-offload:",
                    ]
                    .iter()
                    .any(|k| l.starts_with(k))
                })
                .map(|l| l.replace(": ", "=").replace(' ', ""))
                .collect();
            out.push((dev.to_owned(), keep.join(" ")));
        }
        out
    }

    /// Set up `system` in the proxy namespace; ready for traffic when this returns.
    pub fn start(&mut self, system: System) -> Result<Running> {
        let proxy = self.topo.proxy.clone();
        let svc_ip = two::PROXY_CLIENT_SIDE;
        let home = two::HOME;
        let mut pid = None;
        let mut daemon = None;
        match system {
            System::Direct => {}
            System::Nftables => {
                let rules = format!(
                    "table ip {NFT_TABLE} {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
                     ip daddr {svc_ip} tcp dport {SERVICE_PORT} dnat to {home}:{HOME_HTTP_PORT}\n    \
                     ip daddr {svc_ip} tcp dport {BULK_PORT} dnat to {home}:{BULK_PORT}\n    \
                     ip daddr {svc_ip} udp dport {UDP_PORT} dnat to {home}:{UDP_PORT}\n  }}\n  \
                     chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
                     ip daddr {home} oifname \"{ph}\" snat to {snat}\n  }}\n}}\n",
                    ph = two::PROXY_HOME_DEV,
                    snat = two::PROXY_HOME_SIDE,
                );
                let path = self.topo.lab.write_file("nft.rules", &rules)?;
                proxy.exec("nft", &["-f", &path.display().to_string()])?;
            }
            System::XdpFast => {
                let pin_dir = self.topo.lab.mount_bpffs()?;
                let config = format!(
                    "[datapath]\ninterfaces = [\"{pc}\", \"{ph}\"]\nmode = \"native\"\npin_dir = \"{pin}\"\n\n\
                     [nat]\nsnat_ipv4 = \"{snat}\"\nport_range = [10240, 32767]\nhome_cidrs = [\"{cidr}\"]\n\n\
                     [admin]\nlisten = \"127.0.0.1:9100\"\n\n\
                     [[service]]\nname = \"web\"\nlisten = \"{svc_ip}:{SERVICE_PORT}\"\nprotocol = \"tcp\"\nmode = \"l4\"\n\
                     upstreams = [\"{home}:{HOME_HTTP_PORT}\"]\n\n\
                     [[service]]\nname = \"bulk\"\nlisten = \"{svc_ip}:{BULK_PORT}\"\nprotocol = \"tcp\"\nmode = \"l4\"\n\
                     upstreams = [\"{home}:{BULK_PORT}\"]\n\n{udp}",
                    udp = udp_service(),
                    pc = two::PROXY_CLIENT_DEV,
                    ph = two::PROXY_HOME_DEV,
                    pin = pin_dir.display(),
                    snat = two::PROXY_HOME_SIDE,
                    cidr = two::HOME_CIDR,
                );
                // The daemon binary: $XDP_PROXY_BIN (cargo xtask bench sets it to the release
                // build), else the xdp-proxy beside this executable.
                let d = Daemon::start(&mut self.topo.lab, &proxy, &config)?;
                d.wait_ready(
                    &mut self.topo.lab,
                    &proxy,
                    &[two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV],
                    2,
                    Duration::from_secs(30),
                    || false,
                )?;
                pid = Some(d.pid);
                daemon = Some(d);
            }
            System::XdpUserspace | System::XdpHttp => {
                let pin_dir = self.topo.lab.mount_bpffs()?;
                let services = if system == System::XdpHttp {
                    format!(
                        "[[service]]\nname = \"web\"\nlisten = \"{svc_ip}:{SERVICE_PORT}\"\nprotocol = \"tcp\"\n\
                         mode = \"http\"\nupstreams = [\"{home}:{HOME_HTTP_PORT}\"]\n"
                    )
                } else {
                    format!(
                        "[[service]]\nname = \"web\"\nlisten = \"{svc_ip}:{SERVICE_PORT}\"\nprotocol = \"tcp\"\nmode = \"l4\"\n\
                         upstreams = [\"{home}:{HOME_HTTP_PORT}\"]\n\n\
                         [[service]]\nname = \"bulk\"\nlisten = \"{svc_ip}:{BULK_PORT}\"\nprotocol = \"tcp\"\nmode = \"l4\"\n\
                         upstreams = [\"{home}:{BULK_PORT}\"]\n\n{udp}",
                        udp = udp_service(),
                    )
                };
                let config = format!(
                    "[datapath]\ninterfaces = [\"{pc}\", \"{ph}\"]\nmode = \"userspace\"\npin_dir = \"{pin}\"\n\n\
                     [nat]\nsnat_ipv4 = \"{snat}\"\nport_range = [10240, 32767]\nhome_cidrs = [\"{cidr}\"]\n\n\
                     [admin]\nlisten = \"127.0.0.1:9100\"\n\n{services}",
                    pc = two::PROXY_CLIENT_DEV,
                    ph = two::PROXY_HOME_DEV,
                    pin = pin_dir.display(),
                    snat = two::PROXY_HOME_SIDE,
                    cidr = two::HOME_CIDR,
                );
                let d = start_userspace_daemon(&mut self.topo.lab, &proxy, &config)?;
                let d_pid = d.pid;
                let ports: &[u16] = if system == System::XdpHttp {
                    &[SERVICE_PORT]
                } else {
                    &[SERVICE_PORT, BULK_PORT]
                };
                for &port in ports {
                    wait_until(
                        "the daemon's userspace listener",
                        Duration::from_secs(30),
                        || listening(&proxy, svc_ip, port),
                    )
                    .with_context(|| self.topo.lab.log_tail(d_pid, 20))?;
                }
                if system.carries_udp() {
                    wait_until(
                        "the daemon's userspace UDP socket",
                        Duration::from_secs(30),
                        || udp_bound(&proxy, svc_ip, UDP_PORT),
                    )
                    .with_context(|| self.topo.lab.log_tail(d_pid, 20))?;
                }
                pid = Some(d.pid);
                daemon = Some(d);
            }
            System::NginxStream => {
                let conf = format!(
                    "load_module {NGINX_STREAM_MODULE};\n{common}stream {{\n  \
                     server {{ listen {svc_ip}:{SERVICE_PORT} backlog=8192; proxy_pass {home}:{HOME_HTTP_PORT}; }}\n  \
                     server {{ listen {svc_ip}:{BULK_PORT}; proxy_pass {home}:{BULK_PORT}; }}\n  \
                     server {{ listen {svc_ip}:{UDP_PORT} udp; proxy_pass {home}:{UDP_PORT}; }}\n}}\n",
                    common = nginx_common(&self.dir, "stream"),
                );
                pid = Some(self.spawn_nginx("stream", &conf)?);
            }
            System::NginxHttp => {
                let conf = format!(
                    "{common}http {{\n{paths}  upstream home {{ server {home}:{HOME_HTTP_PORT}; keepalive 64; \
                     keepalive_requests 10000000; }}\n  server {{\n    listen {svc_ip}:{SERVICE_PORT} backlog=8192;\n    \
                     location / {{ proxy_pass http://home; proxy_http_version 1.1; proxy_set_header Connection \"\"; \
                     proxy_set_header Host $http_host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; \
                     proxy_set_header X-Forwarded-Proto $scheme; \
                     proxy_set_header Forwarded \"for=$remote_addr;proto=$scheme;host=$http_host\"; }}\n  }}\n}}\n",
                    common = nginx_common(&self.dir, "http"),
                    paths = nginx_http_paths(&self.dir, "http"),
                );
                pid = Some(self.spawn_nginx("http", &conf)?);
            }
            System::TokioCopy => {
                let exe = std::env::current_exe().context("locating the bench binary")?;
                let mut cmd = proxy.command(&exe)?;
                cmd.arg("--tcp-copy").args([
                    format!("{svc_ip}:{SERVICE_PORT}={home}:{HOME_HTTP_PORT}"),
                    format!("{svc_ip}:{BULK_PORT}={home}:{BULK_PORT}"),
                ]);
                let p = self.topo.lab.spawn("tokio-copy", cmd)?;
                for port in [SERVICE_PORT, BULK_PORT] {
                    wait_until("the tokio-copy reference", Duration::from_secs(10), || {
                        listening(&proxy, svc_ip, port)
                    })
                    .with_context(|| self.topo.lab.log_tail(p, 20))?;
                }
                pid = Some(p);
            }
            System::Haproxy => {
                let conf = format!(
                    "global\n  nbthread 1\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                     timeout client 120s\n  timeout server 120s\n\n\
                     frontend web\n  bind {svc_ip}:{SERVICE_PORT}\n  default_backend web\n\
                     backend web\n  server home {home}:{HOME_HTTP_PORT}\n\n\
                     frontend bulk\n  bind {svc_ip}:{BULK_PORT}\n  default_backend bulk\n\
                     backend bulk\n  server home {home}:{BULK_PORT}\n"
                );
                let path = self.topo.lab.write_file("haproxy.cfg", &conf)?;
                let mut cmd = proxy.command("haproxy")?;
                cmd.args(["-db", "-f"]).arg(&path);
                let p = self.topo.lab.spawn("haproxy", cmd)?;
                wait_until("haproxy", Duration::from_secs(10), || {
                    listening(&proxy, svc_ip, SERVICE_PORT)
                })
                .with_context(|| self.topo.lab.log_tail(p, 20))?;
                pid = Some(p);
            }
        }
        Ok(Running {
            system,
            pid,
            daemon,
        })
    }

    fn spawn_nginx(&mut self, name: &str, conf: &str) -> Result<u32> {
        let path = self.topo.lab.write_file(&format!("{name}.conf"), conf)?;
        let mut cmd = self.topo.proxy.command("nginx")?;
        cmd.args([
            "-e",
            &format!("{}/{name}.stderr.log", self.dir.display()),
            "-c",
        ])
        .arg(&path);
        let pid = self.topo.lab.spawn(&format!("nginx-{name}"), cmd)?;
        let proxy = self.topo.proxy.clone();
        wait_until(&format!("nginx {name}"), Duration::from_secs(10), || {
            listening(&proxy, two::PROXY_CLIENT_SIDE, SERVICE_PORT)
        })
        .with_context(|| {
            let err = std::fs::read_to_string(self.dir.join(format!("{name}.error.log")))
                .unwrap_or_default();
            format!("{}\n{err}", self.topo.lab.log_tail(pid, 20))
        })?;
        Ok(pid)
    }

    /// Tear `running` down and check the proxy namespace is back to plain forwarding.
    pub fn stop(&mut self, running: Running) -> Result<()> {
        let proxy = self.topo.proxy.clone();
        match running.system {
            System::Direct => {}
            System::Nftables => {
                proxy.exec("nft", &["delete", "table", "ip", NFT_TABLE])?;
            }
            System::XdpFast => {
                if let Some(d) = running.daemon {
                    let status = d.stop(&mut self.topo.lab)?;
                    ensure!(status.success(), "the daemon exited with {status}");
                    // The daemon leaves its pinned link (and flows) for a restart: remove its
                    // pin directories (`v<ABI>`) so the XDP programs detach. The bpffs's own
                    // files (maps.debug, progs.debug) stay.
                    for entry in std::fs::read_dir(&d.pin_dir)
                        .with_context(|| format!("reading {}", d.pin_dir.display()))?
                        .flatten()
                    {
                        let p = entry.path();
                        if p.is_dir() {
                            std::fs::remove_dir_all(&p)
                                .with_context(|| format!("removing pins {}", p.display()))?;
                        }
                    }
                }
                for dev in [two::PROXY_CLIENT_DEV, two::PROXY_HOME_DEV] {
                    if has_xdp(&proxy, dev)? {
                        proxy.ip(&["link", "set", "dev", dev, "xdp", "off"])?;
                    }
                    ensure!(!has_xdp(&proxy, dev)?, "XDP still attached to {dev}");
                }
            }
            System::XdpUserspace | System::XdpHttp => {
                if let Some(d) = running.daemon {
                    let status = d.stop(&mut self.topo.lab)?;
                    ensure!(status.success(), "the daemon exited with {status}");
                }
                let ip = two::PROXY_CLIENT_SIDE;
                wait_until("proxy port released", Duration::from_secs(10), || {
                    !listening(&proxy, ip, SERVICE_PORT)
                })?;
            }
            System::NginxStream | System::NginxHttp | System::Haproxy | System::TokioCopy => {
                if let Some(pid) = running.pid {
                    self.topo.lab.stop(pid)?;
                }
                let ip = two::PROXY_CLIENT_SIDE;
                wait_until("proxy port released", Duration::from_secs(10), || {
                    !listening(&proxy, ip, SERVICE_PORT)
                })?;
            }
        }
        Ok(())
    }
}
