//! The daemon's TOML configuration: parsing (serde, `deny_unknown_fields`) and complete
//! validation before anything touches the system.
//!
//! Two stages:
//! - [`Config::load`] / [`Config::parse`]: pure. Syntax, types, every rule that needs nothing but
//!   the file. `xdp-proxy check` stops here.
//! - [`Config::validate_runtime`]: rules that need facts read from the running system (the
//!   kernel's ephemeral port range, the SNAT address when it defaults to the route toward home).
//!   `xdp-proxy run` reads those facts and calls it before loading anything.
//!
//! Every problem names the file, the key (for example `service[1].upstreams[0]`) and what is
//! wrong; all problems of a file are reported at once.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::Deserialize;

/// Default bpffs directory for pinned maps (the ABI version is appended: `<pin_dir>/v<ABI_VERSION>`).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdp-proxy";
/// Default SNAT source port range (inclusive). Below Linux's default ephemeral range
/// (32768..=60999), so the daemon's own connections never collide with SNAT ports.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (10240, 32767);
/// Default admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9100";
/// Smallest accepted `datapath.max_flows`.
pub const MIN_MAX_FLOWS: u32 = 16;
/// Largest accepted `datapath.max_flows` (each table entry costs roughly 200 bytes of kernel
/// memory, times two tables).
pub const MAX_MAX_FLOWS: u32 = 1 << 24;
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME_LEN: usize = 15;
const MAX_SERVICE_NAME_LEN: usize = 64;

// ---------------------------------------------------------------------------------------------
// Validated configuration.
// ---------------------------------------------------------------------------------------------

/// Where and how the XDP program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// Native (driver) XDP, else generic (skb) XDP.
    #[default]
    Auto,
    /// Native (driver) XDP only.
    Native,
    /// Generic (skb) XDP only.
    Generic,
    /// No XDP: the daemon proxies every L4 service in userspace (`crate::l4`).
    Userspace,
}

impl fmt::Display for DatapathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Userspace => "userspace",
        })
    }
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number, as stored in map keys.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::IPPROTO_TCP,
            Self::Udp => proxy_common::IPPROTO_UDP,
        }
    }

    /// From an IP protocol number.
    #[must_use]
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::IPPROTO_TCP => Some(Self::Tcp),
            proxy_common::IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a service is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// L4 full NAT in XDP.
    #[default]
    L4,
    /// HTTP reverse proxy in the daemon (`crate::l7`; routes in `[[service.route]]`).
    Http,
}

impl fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::L4 => "l4",
            Self::Http => "http",
        })
    }
}

/// An IPv4 or IPv6 prefix such as `10.20.0.0/16` or `fd00:20::/48` (host bits zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpCidr {
    pub network: IpAddr,
    pub prefix_len: u8,
}

/// The old name, from when prefixes were IPv4 only.
pub type Ipv4Cidr = IpCidr;

impl IpCidr {
    /// Address bits of the family: 32 or 128.
    #[must_use]
    pub const fn max_len(self) -> u8 {
        match self.network {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    #[must_use]
    pub const fn is_ipv6(self) -> bool {
        self.network.is_ipv6()
    }

    /// The netmask of an address of the prefix's family, as a 128-bit integer aligned like
    /// [`addr_bits`].
    fn mask(self) -> u128 {
        let bits = u32::from(self.max_len());
        let len = u32::from(self.prefix_len);
        if len == 0 {
            0
        } else {
            (u128::MAX << (bits - len)) & (u128::MAX >> (128 - bits))
        }
    }

    /// Whether `addr` lies inside this prefix (an address of the other family never does).
    #[must_use]
    pub fn contains(self, addr: IpAddr) -> bool {
        addr.is_ipv6() == self.is_ipv6() && addr_bits(addr) & self.mask() == addr_bits(self.network)
    }

    /// Whether every address of `other` lies inside this prefix (equal prefixes cover each
    /// other; prefixes of different families never do).
    #[must_use]
    pub fn covers(self, other: IpCidr) -> bool {
        self.prefix_len <= other.prefix_len && self.contains(other.network)
    }

    /// An address inside the prefix to route toward (the first host address where there is
    /// one): used to find the source address of the route home.
    #[must_use]
    pub fn probe_address(self) -> IpAddr {
        match self.network {
            IpAddr::V4(n) if self.prefix_len < 31 => IpAddr::V4(Ipv4Addr::from(u32::from(n) + 1)),
            IpAddr::V6(n) if self.prefix_len < 127 => IpAddr::V6(Ipv6Addr::from(u128::from(n) + 1)),
            a => a,
        }
    }
}

/// An address as an integer (IPv4 in the low 32 bits).
fn addr_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for IpCidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').ok_or_else(|| {
            format!("`{s}` is not an IP prefix like 10.20.0.0/16 or fd00:20::/48")
        })?;
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}`: `{addr}` is not an IPv4 or IPv6 address"))?;
        let cidr = Self {
            network,
            prefix_len: 0,
        };
        let max = cidr.max_len();
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("`{s}`: prefix length `{len}` is not in 0..={max}"))?;
        let cidr = Self {
            network,
            prefix_len,
        };
        let bits = addr_bits(network) & cidr.mask();
        if bits != addr_bits(network) {
            let masked = match network {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(bits).unwrap_or(0))),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
            };
            return Err(format!(
                "`{s}` has host bits set (did you mean {masked}/{prefix_len}?)"
            ));
        }
        Ok(cidr)
    }
}

/// `[datapath]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    pub interfaces: Vec<String>,
    pub mode: DatapathMode,
    pub pin_dir: PathBuf,
    pub max_flows: u32,
}

/// `[nat]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSettings {
    /// `None`: the source address of the route toward the first IPv4 home CIDR, found at run
    /// time.
    pub snat_ipv4: Option<Ipv4Addr>,
    /// `None`: the source address of the route toward the first IPv6 home CIDR, found at run
    /// time.
    pub snat_ipv6: Option<Ipv6Addr>,
    pub port_min: u16,
    pub port_max: u16,
    /// IPv4 and IPv6 prefixes, in config order.
    pub home_cidrs: Vec<IpCidr>,
    /// `nat.allow_any_home` (default false): accept a home CIDR of prefix length 0 or one
    /// containing a range no upstream may be in (`config/addresses.rs`). Upstreams in those
    /// ranges stay refused.
    pub allow_any_home: bool,
}

impl NatSettings {
    /// Whether `port` lies in the SNAT port range.
    #[must_use]
    pub fn in_port_range(&self, port: u16) -> bool {
        (self.port_min..=self.port_max).contains(&port)
    }

    /// The home CIDR containing `addr`, if any.
    #[must_use]
    pub fn home_cidr_of(&self, addr: impl Into<IpAddr>) -> Option<IpCidr> {
        let addr = addr.into();
        self.home_cidrs.iter().copied().find(|c| c.contains(addr))
    }

    /// The first home CIDR of a family (the one whose route gives the default SNAT address).
    #[must_use]
    pub fn first_home_cidr(&self, ipv6: bool) -> Option<IpCidr> {
        self.home_cidrs
            .iter()
            .copied()
            .find(|c| c.is_ipv6() == ipv6)
    }
}

/// `[admin]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// Default `dns.interval`: how often DNS upstreams are re-resolved (sooner when a record's TTL
/// ends first).
pub const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(30);
/// Default `dns.timeout`: how long one query waits for an answer from one server.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `service.health.interval`.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Default `service.health.timeout`.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `service.health.rise`: successes in a row that make an unhealthy upstream healthy.
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Default `service.health.fall`: failures in a row that make a healthy upstream unhealthy.
pub const DEFAULT_HEALTH_FALL: u32 = 3;
/// Default `service.health.path` (kind = "http").
pub const DEFAULT_HEALTH_PATH: &str = "/";
/// Default `service.health.expect_status` (kind = "http").
pub const DEFAULT_HEALTH_STATUS: u16 = 200;
/// Default upstream weight.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest accepted upstream weight.
pub const MAX_WEIGHT: u32 = 1000;
/// Shortest accepted interval (health checks, DNS re-resolution).
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// `[dns]`: how DNS upstreams are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// Servers to ask, in order; `None`: the `nameserver` lines of /etc/resolv.conf.
    pub servers: Option<Vec<SocketAddr>>,
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: None,
            interval: DEFAULT_DNS_INTERVAL,
            timeout: DEFAULT_DNS_TIMEOUT,
        }
    }
}

/// Where an upstream is: a fixed IPv4 or IPv6 address or a DNS name resolved (and re-resolved)
/// at run time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamHost {
    Ip(IpAddr),
    /// A DNS name, lower case, without a trailing dot.
    Name(String),
}

/// One entry of `service.upstreams`: `"host:port"` or
/// `{ address = "host:port", weight = N, drain = true }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub host: UpstreamHost,
    pub port: u16,
    /// Relative share of new flows (`DEFAULT_WEIGHT`).
    pub weight: u32,
    /// No new flows (weight 0 in the Maglev table); existing flows finish.
    pub drain: bool,
}

impl UpstreamConfig {
    /// A static upstream of weight 1 (tests, simple configs).
    #[must_use]
    pub fn fixed(addr: impl Into<SocketAddr>) -> Self {
        let addr = addr.into();
        Self {
            host: UpstreamHost::Ip(addr.ip()),
            port: addr.port(),
            weight: DEFAULT_WEIGHT,
            drain: false,
        }
    }

    /// The address when the host is an IP address.
    #[must_use]
    pub fn static_addr(&self) -> Option<SocketAddr> {
        match &self.host {
            UpstreamHost::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            UpstreamHost::Name(_) => None,
        }
    }

    /// The DNS name, if the host is one.
    #[must_use]
    pub fn dns_name(&self) -> Option<&str> {
        match &self.host {
            UpstreamHost::Ip(_) => None,
            UpstreamHost::Name(n) => Some(n),
        }
    }

    /// The weight new flows see: 0 while draining.
    #[must_use]
    pub fn effective_weight(&self) -> u32 {
        if self.drain { 0 } else { self.weight }
    }
}

impl fmt::Display for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            UpstreamHost::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            UpstreamHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// What a health check does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HealthKind {
    /// A TCP connect (closed at once).
    #[default]
    Tcp,
    /// An HTTP/1.1 GET of `path`; healthy when the status is `expect_status`.
    Http,
    /// No check: every upstream counts as healthy.
    None,
}

impl fmt::Display for HealthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::None => "none",
        })
    }
}

/// `[service.health]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    pub kind: HealthKind,
    pub path: String,
    pub expect_status: u16,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: HealthKind::Tcp,
            path: DEFAULT_HEALTH_PATH.to_owned(),
            expect_status: DEFAULT_HEALTH_STATUS,
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_HEALTH_RISE,
            fall: DEFAULT_HEALTH_FALL,
        }
    }
}

/// One `[[service]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    /// IPv4 or IPv6; an l4 service's upstreams are of the same family.
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub mode: ServiceMode,
    pub upstreams: Vec<UpstreamConfig>,
    pub health: HealthConfig,
    /// `mss_clamp`, `allow`, `deny`, `new_flow_rate`, `new_flow_burst` (see `config/fastpath.rs`).
    pub fast: ServiceFastPath,
    /// Routes and timeouts of a `mode = "http"` service (`None` for `l4`).
    pub http: Option<HttpConfig>,
}

/// A complete, validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it came from (for messages).
    pub source: PathBuf,
    pub datapath: DatapathConfig,
    pub nat: NatSettings,
    pub admin: AdminConfig,
    pub dns: DnsConfig,
    /// `[flows]`: idle lifetimes of fast-path flows (reloadable).
    pub flows: crate::flows::Lifetimes,
    pub services: Vec<ServiceConfig>,
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// One thing wrong with a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The key, for example `service[1].upstreams[0]`, or `(top level)`.
    pub key: String,
    pub message: String,
}

impl Problem {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax or type error (from the TOML deserializer).
    #[error("{}: {key}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// The file parsed but breaks one or more rules.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The problems found (one for a syntax error).
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            Self::Read { source, .. } => vec![Problem::new("(file)", source.to_string())],
            Self::Syntax { key, message, .. } => vec![Problem::new(key.clone(), message.clone())],
            Self::Invalid { problems, .. } => problems.clone(),
        }
    }
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{}: {}: {}", path.display(), p.key, p.message));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Raw (as written) configuration.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    datapath: RawDatapath,
    nat: RawNat,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    flows: flows::RawFlows,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatapath {
    interfaces: Vec<String>,
    #[serde(default)]
    mode: DatapathMode,
    pin_dir: Option<String>,
    max_flows: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNat {
    snat_ipv4: Option<String>,
    snat_ipv6: Option<String>,
    port_range: Option<Vec<i64>>,
    home_cidrs: Vec<String>,
    #[serde(default)]
    allow_any_home: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    listen: String,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    mode: ServiceMode,
    upstreams: Vec<toml::Value>,
    #[serde(default)]
    health: RawHealth,
    // Fast-path options (`config/fastpath.rs`).
    mss_clamp: Option<i64>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    new_flow_rate: Option<i64>,
    new_flow_burst: Option<i64>,
    /// `[[service.route]]` (mode = "http"): see `config/http.rs`.
    #[serde(default, rename = "route")]
    routes: Vec<http::RawRoute>,
    /// `[service.http]` (mode = "http").
    http: Option<http::RawHttp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    servers: Option<Vec<String>>,
    interval: Option<toml::Value>,
    timeout: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<String>,
    path: Option<String>,
    expect_status: Option<i64>,
    interval: Option<toml::Value>,
    timeout: Option<toml::Value>,
    rise: Option<i64>,
    fall: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Loading and validation.
// ---------------------------------------------------------------------------------------------

/// The SNAT source addresses in effect, one per family (configured, or the source address of
/// the route toward the family's first home CIDR). `None`: the family has none (no home CIDR of
/// that family, or no route to it), so the fast path creates no flow of that family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl SnatAddrs {
    /// The SNAT address of `addr`'s family.
    #[must_use]
    pub fn of_family(&self, addr: IpAddr) -> Option<IpAddr> {
        match addr {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }

    /// The address to bind the daemon's own connections toward `peer` to: the SNAT address of
    /// its family, else the unspecified address of that family (the kernel picks).
    #[must_use]
    pub fn source_for(&self, peer: IpAddr) -> IpAddr {
        self.of_family(peer).unwrap_or(match peer {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        })
    }
}

impl From<Ipv4Addr> for SnatAddrs {
    fn from(v4: Ipv4Addr) -> Self {
        Self {
            v4: Some(v4),
            v6: None,
        }
    }
}

impl fmt::Display for SnatAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.v4, self.v6) {
            (Some(a), Some(b)) => write!(f, "{a}, {b}"),
            (Some(a), None) => write!(f, "{a}"),
            (None, Some(b)) => write!(f, "{b}"),
            (None, None) => f.write_str("(none)"),
        }
    }
}

/// Facts read from the running system that some rules need (see [`Config::validate_runtime`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeFacts {
    /// `net.ipv4.ip_local_port_range` (inclusive). Linux has no IPv6 twin: this range is the
    /// ephemeral range of IPv6 sockets too.
    pub ephemeral_ports: (u16, u16),
    /// The SNAT addresses in effect (configured or found from the route home).
    pub snat: SnatAddrs,
}

impl Config {
    /// Read and validate a config file (pure: touches nothing but the file).
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, the key and what is wrong.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate config text; `path` is used in messages only.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, the key and what is wrong.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let syntax = |key: String, message: String| ConfigError::Syntax {
            path: path.to_owned(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| syntax("(top level)".into(), e.to_string().trim_end().to_owned()))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(top level)".to_owned()
            } else {
                key
            };
            syntax(key, e.inner().to_string().trim_end().to_owned())
        })?;
        let mut problems = Vec::new();
        let config = convert(raw, path, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// The proxy's own addresses known to the config with the SNAT addresses in effect: no
    /// upstream may be one (the DNS filter, `control::filter_answer`, refuses them in answers).
    #[must_use]
    pub fn own_addresses(&self, snat: SnatAddrs) -> Vec<OwnAddress> {
        own_addresses(
            snat,
            self.services.iter().map(|s| s.listen).enumerate(),
            self.admin.listen,
        )
    }

    /// The services the XDP program serves (`mode = "l4"`), in config order with their index.
    pub fn l4_services(&self) -> impl Iterator<Item = (usize, &ServiceConfig)> {
        self.services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.mode == ServiceMode::L4)
    }

    /// The keys a reload cannot change (the loaded datapath holds them), as `(key, old, new)`
    /// for each that differs between `self` (running) and `new`.
    #[must_use]
    pub fn restart_only_changes(&self, new: &Config) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        let (a, b) = (&self.datapath, &new.datapath);
        if a.interfaces != b.interfaces {
            out.push((
                "datapath.interfaces",
                format!("{:?}", a.interfaces),
                format!("{:?}", b.interfaces),
            ));
        }
        if a.mode != b.mode {
            out.push(("datapath.mode", a.mode.to_string(), b.mode.to_string()));
        }
        if a.pin_dir != b.pin_dir {
            out.push((
                "datapath.pin_dir",
                a.pin_dir.display().to_string(),
                b.pin_dir.display().to_string(),
            ));
        }
        if a.max_flows != b.max_flows {
            out.push((
                "datapath.max_flows",
                a.max_flows.to_string(),
                b.max_flows.to_string(),
            ));
        }
        if self.admin.listen != new.admin.listen {
            out.push((
                "admin.listen",
                self.admin.listen.to_string(),
                new.admin.listen.to_string(),
            ));
        }
        out
    }

    /// `new` with the restart-only keys (see [`Config::restart_only_changes`]) taken from
    /// `self`: what a reload applies.
    #[must_use]
    pub fn with_restart_only_keys_of(&self, mut new: Config) -> Config {
        new.datapath = self.datapath.clone();
        new.admin = self.admin.clone();
        new
    }

    /// Rules that need facts from the running system. Pure given `facts`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing every broken rule.
    pub fn validate_runtime(&self, facts: RuntimeFacts) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let (eph_lo, eph_hi) = facts.ephemeral_ports;
        let (lo, hi) = (self.nat.port_min, self.nat.port_max);
        if lo <= eph_hi && eph_lo <= hi {
            let suggestion = if eph_lo > DEFAULT_PORT_RANGE.0 + 1 {
                format!(
                    "set nat.port_range below it (for example [{}, {}])",
                    DEFAULT_PORT_RANGE.0.min(eph_lo - 1),
                    eph_lo - 1
                )
            } else {
                "set nat.port_range outside it".to_owned()
            };
            let move_kernel = if hi < eph_hi {
                format!(
                    ", or move the kernel's range above it with \
                     `sysctl -w net.ipv4.ip_local_port_range=\"{} {eph_hi}\"`",
                    u32::from(hi) + 1
                )
            } else {
                String::new()
            };
            problems.push(Problem::new(
                "nat.port_range",
                format!(
                    "[{lo}, {hi}] overlaps the kernel's ephemeral port range [{eph_lo}, {eph_hi}] \
                     (net.ipv4.ip_local_port_range, which covers IPv6 too), which the daemon's own \
                     connections use from the same address: {suggestion}{move_kernel}"
                ),
            ));
        }
        if self.nat.snat_ipv4.is_none()
            && let Some(a) = facts.snat.v4
        {
            check_snat_address(
                IpAddr::V4(a),
                "nat.snat_ipv4 (from the route home)",
                &mut problems,
            );
        }
        if self.nat.snat_ipv6.is_none()
            && let Some(a) = facts.snat.v6
        {
            check_snat_address(
                IpAddr::V6(a),
                "nat.snat_ipv6 (from the route home)",
                &mut problems,
            );
        }
        if facts.snat.v6.is_none() {
            let home = self.nat.first_home_cidr(true).map_or_else(
                || "there is no IPv6 home CIDR".to_owned(),
                |c| format!("no route toward the first IPv6 home CIDR {c} was found"),
            );
            for (i, s) in self.l4_services() {
                if s.listen.is_ipv6() {
                    problems.push(Problem::new(
                        format!("service[{i}].listen"),
                        format!(
                            "{} is an IPv6 l4 service but there is no IPv6 SNAT address: \
                             nat.snat_ipv6 is not set and {home}; set nat.snat_ipv6 or add an \
                             IPv6 route home",
                            s.listen
                        ),
                    ));
                }
            }
        }
        if let Some(a) = facts.snat.v4 {
            check_listen_vs_snat(self, IpAddr::V4(a), &mut problems);
        }
        if let Some(a) = facts.snat.v6 {
            check_listen_vs_snat(self, IpAddr::V6(a), &mut problems);
        }
        // `convert` refused upstreams equal to a configured SNAT address; one found from the
        // route home is known only now.
        let mut found = Vec::new();
        if self.nat.snat_ipv4.is_none()
            && let Some(a) = facts.snat.v4
        {
            found.push(OwnAddress {
                addr: IpAddr::V4(a),
                key: "nat.snat_ipv4, found from the route home".into(),
            });
        }
        if self.nat.snat_ipv6.is_none()
            && let Some(a) = facts.snat.v6
        {
            found.push(OwnAddress {
                addr: IpAddr::V6(a),
                key: "nat.snat_ipv6, found from the route home".into(),
            });
        }
        if !found.is_empty() {
            check_upstreams_vs(self, &found, &mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: self.source.clone(),
                problems,
            })
        }
    }
}

/// Static upstreams (and http route upstreams) of `config` equal to one of `own`.
fn check_upstreams_vs(config: &Config, own: &[OwnAddress], problems: &mut Vec<Problem>) {
    let mut check = |sa: SocketAddr, key: String| {
        if own.iter().any(|o| o.addr == sa.ip())
            && let Some(m) = addresses::upstream_problem(&config.nat, own, sa)
        {
            problems.push(Problem::new(key, m));
        }
    };
    for (i, s) in config.services.iter().enumerate() {
        for (j, u) in s.upstreams.iter().enumerate() {
            if let Some(sa) = u.static_addr() {
                check(sa, format!("service[{i}].upstreams[{j}]"));
            }
        }
        for (j, r) in s.http.iter().flat_map(|h| h.routes.iter()).enumerate() {
            for (k, sa) in r.upstreams.iter().enumerate() {
                check(*sa, format!("service[{i}].route[{j}].upstreams[{k}]"));
            }
        }
    }
}

fn check_snat_address(addr: IpAddr, key: &str, problems: &mut Vec<Problem>) {
    let broadcast = matches!(addr, IpAddr::V4(a) if a.is_broadcast());
    if addr.is_unspecified() || addr.is_multicast() || broadcast || addr.is_loopback() {
        problems.push(Problem::new(
            key,
            format!("{addr} cannot be a SNAT source address (unspecified, loopback, multicast or broadcast)"),
        ));
    }
}

/// Services listening on the SNAT address must not use a port of the SNAT range: the datapath
/// would take a reply to that port for a new flow or the other way round.
fn check_listen_vs_snat(config: &Config, snat: IpAddr, problems: &mut Vec<Problem>) {
    for (i, s) in config.services.iter().enumerate() {
        if s.listen.ip() == snat && config.nat.in_port_range(s.listen.port()) {
            problems.push(Problem::new(
                format!("service[{i}].listen"),
                format!(
                    "{} is on the SNAT address and its port is inside nat.port_range [{}, {}]: \
                     move the service port or the port range",
                    s.listen, config.nat.port_min, config.nat.port_max
                ),
            ));
        }
    }
}

fn parse_port(v: i64, key: &str, problems: &mut Vec<Problem>) -> Option<u16> {
    match u16::try_from(v) {
        Ok(p) if p >= 1 => Some(p),
        _ => {
            problems.push(Problem::new(key, format!("port {v} is not in 1..=65535")));
            None
        }
    }
}

/// Parse "a.b.c.d:port" or "[v6]:port", with a specific message for DNS names and IPv6
/// addresses without brackets.
fn parse_endpoint(s: &str, what: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("`{s}`: port 0 is not a valid {what} port"));
        }
        return Ok(sa);
    }
    if s.parse::<IpAddr>().is_ok() || s.matches(':').count() > 1 && !s.starts_with('[') {
        return Err(format!(
            "`{s}` has no port or an IPv6 address without brackets: write [address]:port, like [fd00::1]:80"
        ));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            if host.parse::<Ipv4Addr>().is_err() && is_dns_name(host) {
                Err(format!(
                    "`{s}`: `{host}` is a DNS name; a {what} address is an IP address:port"
                ))
            } else {
                Err(format!("`{s}` is not an IP address:port (port 1..=65535)"))
            }
        }
        _ => Err(format!(
            "`{s}` is not an address:port like 10.20.1.2:80 or [fd00::1]:80"
        )),
    }
}

/// Why upstream `up` cannot serve an l4 service listening on `listen`: the fast path rewrites
/// addresses within one family (no NAT64), so an l4 service's upstreams are of its family (a
/// DNS name is asked for the records of that family: A or AAAA).
fn l4_family_problem(up: &UpstreamConfig, listen: SocketAddr) -> Option<String> {
    let fam = |v6: bool| if v6 { "IPv6" } else { "IPv4" };
    match up.static_addr() {
        Some(sa) if sa.is_ipv6() != listen.is_ipv6() => Some(format!(
            "{sa} is {} but the service listens on {} {listen}: an l4 service forwards within \
             one address family (no NAT64); give the {} upstreams a service of their own \
             (dual stack = one service per family)",
            fam(sa.is_ipv6()),
            fam(listen.is_ipv6()),
            fam(sa.is_ipv6()),
        )),
        _ => None,
    }
}

/// A duration written as an integer number of seconds or a string with a unit: `"500ms"`,
/// `"2s"`, `"1m"`, `"1h"`.
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_duration(v: &toml::Value) -> Result<Duration, String> {
    match v {
        toml::Value::Integer(n) => u64::try_from(*n)
            .map(Duration::from_secs)
            .map_err(|_| format!("{n} is negative")),
        toml::Value::String(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| format!("`{s}` is not a duration like \"500ms\", \"2s\", \"1m\""))?;
            match unit.trim() {
                "ms" => Ok(Duration::from_millis(n)),
                "s" | "" => Ok(Duration::from_secs(n)),
                "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
                "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
                other => Err(format!("`{s}`: unknown unit `{other}` (use ms, s, m or h)")),
            }
        }
        other => Err(format!(
            "{other} is not a duration: write seconds (5) or a string (\"500ms\", \"2s\")"
        )),
    }
}

fn duration_key(
    v: Option<&toml::Value>,
    default: Duration,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Duration {
    match v.map(parse_duration) {
        None => default,
        Some(Ok(d)) if d >= MIN_INTERVAL => d,
        Some(Ok(d)) => {
            problems.push(Problem::new(
                key,
                format!("{d:?} is shorter than the minimum {MIN_INTERVAL:?}"),
            ));
            default
        }
        Some(Err(m)) => {
            problems.push(Problem::new(key, m));
            default
        }
    }
}

/// Whether `name` is a DNS host name: dot-separated labels of letters, digits and `-` (not at
/// either end of a label), at most 253 characters, not all digits (that would be a bad IPv4
/// address).
#[must_use]
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && !name.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// Parse `host:port` where host is an IPv4 address, a bracketed IPv6 address or a DNS name.
fn parse_upstream_address(s: &str) -> Result<(UpstreamHost, u16), String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("`{s}`: port 0 is not a valid upstream port"));
        }
        return Ok((UpstreamHost::Ip(sa.ip()), sa.port()));
    }
    if s.parse::<IpAddr>().is_ok() || s.matches(':').count() > 1 && !s.starts_with('[') {
        return Err(format!(
            "`{s}` has no port or an IPv6 address without brackets: write [address]:port, like [fd00:20::2]:80"
        ));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "`{s}` is not an address:port like 10.20.1.2:80 or internal-alb.example:80"
        ));
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("`{s}`: port `{port}` is not in 1..=65535")),
    };
    if is_dns_name(host) {
        Ok((
            UpstreamHost::Name(host.trim_end_matches('.').to_ascii_lowercase()),
            port,
        ))
    } else {
        Err(format!(
            "`{s}`: `{host}` is neither an IP address nor a DNS name"
        ))
    }
}

/// One `upstreams` entry: a string, or a table `{ address, weight, drain }`.
fn parse_upstream(
    v: &toml::Value,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Option<UpstreamConfig> {
    let (address, weight, drain) = match v {
        toml::Value::String(s) => (s.as_str(), DEFAULT_WEIGHT, false),
        toml::Value::Table(t) => {
            let mut ok = true;
            for k in t.keys() {
                if !matches!(k.as_str(), "address" | "weight" | "drain") {
                    problems.push(Problem::new(
                        format!("{key}.{k}"),
                        format!(
                            "unknown field `{k}`, expected one of `address`, `weight`, `drain`"
                        ),
                    ));
                    ok = false;
                }
            }
            let address = match t.get("address") {
                Some(toml::Value::String(s)) => Some(s.as_str()),
                Some(other) => {
                    problems.push(Problem::new(
                        format!("{key}.address"),
                        format!("{other} is not a string like \"10.20.1.2:80\""),
                    ));
                    None
                }
                None => {
                    problems.push(Problem::new(key, "missing field `address`"));
                    None
                }
            };
            let weight = match t.get("weight") {
                None => DEFAULT_WEIGHT,
                Some(toml::Value::Integer(n)) if (0..=i64::from(MAX_WEIGHT)).contains(n) => {
                    u32::try_from(*n).unwrap_or(DEFAULT_WEIGHT)
                }
                Some(other) => {
                    problems.push(Problem::new(
                        format!("{key}.weight"),
                        format!("{other} is not an integer in 0..={MAX_WEIGHT}"),
                    ));
                    ok = false;
                    DEFAULT_WEIGHT
                }
            };
            let drain = match t.get("drain") {
                None => false,
                Some(toml::Value::Boolean(b)) => *b,
                Some(other) => {
                    problems.push(Problem::new(
                        format!("{key}.drain"),
                        format!("{other} is not true or false"),
                    ));
                    ok = false;
                    false
                }
            };
            match address {
                Some(a) if ok => (a, weight, drain),
                _ => return None,
            }
        }
        other => {
            problems.push(Problem::new(
                key,
                format!(
                    "{other} is neither \"host:port\" nor a table {{ address = \"host:port\", weight = 1, drain = false }}"
                ),
            ));
            return None;
        }
    };
    match parse_upstream_address(address) {
        Ok((host, port)) => Some(UpstreamConfig {
            host,
            port,
            weight,
            drain,
        }),
        Err(m) => {
            problems.push(Problem::new(key, m));
            None
        }
    }
}

fn convert_dns(raw: RawDns, problems: &mut Vec<Problem>) -> DnsConfig {
    let servers = raw.servers.map(|list| {
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            let parsed = s.parse::<SocketAddr>().ok().or_else(|| {
                s.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match parsed {
                Some(a) if a.port() != 0 => out.push(a),
                _ => problems.push(Problem::new(
                    format!("dns.servers[{i}]"),
                    format!("`{s}` is not an address or address:port like 10.0.0.2:53"),
                )),
            }
        }
        if list.is_empty() {
            problems.push(Problem::new(
                "dns.servers",
                "is empty: leave it out to use /etc/resolv.conf",
            ));
        }
        out
    });
    let interval = duration_key(
        raw.interval.as_ref(),
        DEFAULT_DNS_INTERVAL,
        "dns.interval",
        problems,
    );
    let timeout = duration_key(
        raw.timeout.as_ref(),
        DEFAULT_DNS_TIMEOUT,
        "dns.timeout",
        problems,
    );
    DnsConfig {
        servers,
        interval,
        timeout,
    }
}

fn convert_health(
    raw: RawHealth,
    protocol: Protocol,
    key: &dyn Fn(&str) -> String,
    problems: &mut Vec<Problem>,
) -> HealthConfig {
    let d = HealthConfig::default();
    let kind = match raw.kind.as_deref() {
        None | Some("tcp") => HealthKind::Tcp,
        Some("http") => HealthKind::Http,
        Some("none") => HealthKind::None,
        Some(other) => {
            problems.push(Problem::new(
                key("health.kind"),
                format!("unknown kind `{other}`, expected one of `tcp`, `http`, `none`"),
            ));
            HealthKind::Tcp
        }
    };
    if kind == HealthKind::Http && protocol != Protocol::Tcp {
        problems.push(Problem::new(
            key("health.kind"),
            "\"http\" checks need a tcp service (use \"tcp\" or \"none\")",
        ));
    }
    if kind != HealthKind::Http {
        for (k, set) in [
            ("health.path", raw.path.is_some()),
            ("health.expect_status", raw.expect_status.is_some()),
        ] {
            if set {
                problems.push(Problem::new(
                    key(k),
                    format!("only used with kind = \"http\" (kind is \"{kind}\")"),
                ));
            }
        }
    }
    let path = raw.path.unwrap_or(d.path);
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        problems.push(Problem::new(
            key("health.path"),
            format!("`{path}` is not an absolute path without spaces like /healthz"),
        ));
    }
    let expect_status = match raw.expect_status {
        None => d.expect_status,
        Some(n) => match u16::try_from(n) {
            Ok(s) if (100..=599).contains(&s) => s,
            _ => {
                problems.push(Problem::new(
                    key("health.expect_status"),
                    format!("{n} is not an HTTP status in 100..=599"),
                ));
                d.expect_status
            }
        },
    };
    let interval = duration_key(
        raw.interval.as_ref(),
        d.interval,
        &key("health.interval"),
        problems,
    );
    let timeout = duration_key(
        raw.timeout.as_ref(),
        d.timeout.min(interval),
        &key("health.timeout"),
        problems,
    );
    if timeout > interval {
        problems.push(Problem::new(
            key("health.timeout"),
            format!("{timeout:?} is longer than health.interval {interval:?}"),
        ));
    }
    let count = |v: Option<i64>, default: u32, k: &str, problems: &mut Vec<Problem>| match v {
        None => default,
        Some(n) => match u32::try_from(n) {
            Ok(c) if (1..=100).contains(&c) => c,
            _ => {
                problems.push(Problem::new(key(k), format!("{n} is not in 1..=100")));
                default
            }
        },
    };
    let rise = count(raw.rise, d.rise, "health.rise", problems);
    let fall = count(raw.fall, d.fall, "health.fall", problems);
    HealthConfig {
        kind,
        path,
        expect_status,
        interval,
        timeout,
        rise,
        fall,
    }
}

/// The proxy's own addresses: the SNAT addresses, the listen address of each service (with its
/// index) and the admin listener (unless it is the unspecified address).
fn own_addresses(
    snat: SnatAddrs,
    listens: impl Iterator<Item = (usize, SocketAddr)>,
    admin: SocketAddr,
) -> Vec<OwnAddress> {
    let mut own = Vec::new();
    let mut add = |addr: IpAddr, key: String| own.push(OwnAddress { addr, key });
    if let Some(a) = snat.v4 {
        add(IpAddr::V4(a), "nat.snat_ipv4".into());
    }
    if let Some(a) = snat.v6 {
        add(IpAddr::V6(a), "nat.snat_ipv6".into());
    }
    for (i, listen) in listens {
        add(listen.ip(), format!("service[{i}].listen"));
    }
    if !admin.ip().is_unspecified() {
        add(admin.ip(), "admin.listen".into());
    }
    own
}

/// What an http service's upstream entry `raw` (parsed as `up`) says that the L7 proxy would
/// silently ignore: a DNS name (http services resolve no names yet, the daemon skips it) and
/// `weight` / `drain` (requests go round robin over the healthy upstreams).
fn http_upstream_problems(
    raw: &toml::Value,
    up: &UpstreamConfig,
    key: &str,
    problems: &mut Vec<Problem>,
) {
    if let Some(name) = up.dns_name() {
        problems.push(Problem::new(
            key,
            format!(
                "`{name}` is a DNS name, but http services do not resolve names yet (the daemon \
                 would skip this upstream): http upstreams must be IP:port for now, like \
                 10.20.1.2:8080 or [fd00:20::2]:8080"
            ),
        ));
    }
    if let toml::Value::Table(t) = raw {
        if t.contains_key("weight") {
            problems.push(Problem::new(
                format!("{key}.weight"),
                "has no effect on an http service (requests go round robin over the healthy \
                 upstreams): remove it, or use an l4 service for weighted balancing",
            ));
        }
        if t.contains_key("drain") {
            problems.push(Problem::new(
                format!("{key}.drain"),
                "has no effect on an http service (requests go round robin over the healthy \
                 upstreams): remove it; to take an upstream out, remove it from upstreams and \
                 reload",
            ));
        }
    }
}

fn valid_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("interface name is empty".into());
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(format!(
            "interface name `{name}` is longer than {MAX_IFNAME_LEN} bytes"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    Ok(())
}

#[expect(
    clippy::too_many_lines,
    reason = "one linear pass over the file's rules"
)]
fn convert(raw: RawConfig, path: &Path, problems: &mut Vec<Problem>) -> Config {
    // [datapath]
    let dp = raw.datapath;
    let mut seen_if = HashSet::new();
    for (i, name) in dp.interfaces.iter().enumerate() {
        let key = format!("datapath.interfaces[{i}]");
        if let Err(m) = valid_ifname(name) {
            problems.push(Problem::new(key, m));
        } else if !seen_if.insert(name.as_str()) {
            problems.push(Problem::new(
                key,
                format!("interface `{name}` is listed twice"),
            ));
        }
    }
    if dp.interfaces.is_empty() && dp.mode != DatapathMode::Userspace {
        problems.push(Problem::new(
            "datapath.interfaces",
            format!("no interface to attach XDP to (mode = \"{}\")", dp.mode),
        ));
    }
    if dp.interfaces.len() > proxy_common::MAX_INTERFACES as usize {
        problems.push(Problem::new(
            "datapath.interfaces",
            format!("at most {} interfaces", proxy_common::MAX_INTERFACES),
        ));
    }
    let pin_dir = PathBuf::from(dp.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.to_owned()));
    if !pin_dir.is_absolute() {
        problems.push(Problem::new(
            "datapath.pin_dir",
            format!("`{}` is not an absolute path", pin_dir.display()),
        ));
    }
    let max_flows = match dp.max_flows {
        None => proxy_common::DEFAULT_MAX_FLOWS,
        Some(n) => match u32::try_from(n) {
            Ok(n) if (MIN_MAX_FLOWS..=MAX_MAX_FLOWS).contains(&n) => n,
            _ => {
                problems.push(Problem::new(
                    "datapath.max_flows",
                    format!("{n} is not in {MIN_MAX_FLOWS}..={MAX_MAX_FLOWS}"),
                ));
                proxy_common::DEFAULT_MAX_FLOWS
            }
        },
    };

    // [nat]
    let nat = raw.nat;
    let snat_ipv4 = nat
        .snat_ipv4
        .as_deref()
        .and_then(|s| match s.parse::<Ipv4Addr>() {
            Ok(a) => {
                check_snat_address(IpAddr::V4(a), "nat.snat_ipv4", problems);
                Some(a)
            }
            Err(_) => {
                problems.push(Problem::new(
                    "nat.snat_ipv4",
                    format!("`{s}` is not an IPv4 address"),
                ));
                None
            }
        });
    let snat_ipv6 = nat
        .snat_ipv6
        .as_deref()
        .and_then(|s| match s.parse::<Ipv6Addr>() {
            Ok(a) => {
                check_snat_address(IpAddr::V6(a), "nat.snat_ipv6", problems);
                Some(a)
            }
            Err(_) => {
                problems.push(Problem::new(
                    "nat.snat_ipv6",
                    format!("`{s}` is not an IPv6 address (write it without brackets: fd00:20::1)"),
                ));
                None
            }
        });
    let (mut port_min, mut port_max) = DEFAULT_PORT_RANGE;
    if let Some(range) = nat.port_range {
        if range.len() == 2 {
            let lo = parse_port(range[0], "nat.port_range[0]", problems);
            let hi = parse_port(range[1], "nat.port_range[1]", problems);
            if let (Some(lo), Some(hi)) = (lo, hi) {
                if lo > hi {
                    problems.push(Problem::new(
                        "nat.port_range",
                        format!("[{lo}, {hi}]: the first port must not be above the second"),
                    ));
                } else {
                    (port_min, port_max) = (lo, hi);
                }
            }
        } else {
            problems.push(Problem::new(
                "nat.port_range",
                format!("needs exactly two ports [min, max], got {}", range.len()),
            ));
        }
    }
    let mut home_cidrs = Vec::new();
    for (i, s) in nat.home_cidrs.iter().enumerate() {
        match s.parse::<IpCidr>() {
            Ok(c) => {
                if let Some(m) = addresses::home_cidr_problem(c, nat.allow_any_home) {
                    problems.push(Problem::new(format!("nat.home_cidrs[{i}]"), m));
                }
                // Kept even when refused: its upstreams then get no second problem saying
                // they are outside every home CIDR.
                home_cidrs.push(c);
            }
            Err(m) => problems.push(Problem::new(format!("nat.home_cidrs[{i}]"), m)),
        }
    }
    if nat.home_cidrs.is_empty() {
        problems.push(Problem::new(
            "nat.home_cidrs",
            "is empty: every upstream must lie inside a home CIDR (the proxy is never an open relay)",
        ));
    }
    let nat = NatSettings {
        snat_ipv4,
        snat_ipv6,
        port_min,
        port_max,
        home_cidrs,
        allow_any_home: nat.allow_any_home,
    };

    // [admin]
    let admin_listen = raw
        .admin
        .listen
        .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_owned());
    let admin = AdminConfig {
        listen: admin_listen.parse().unwrap_or_else(|_| {
            problems.push(Problem::new(
                "admin.listen",
                format!("`{admin_listen}` is not an address:port like 127.0.0.1:9100"),
            ));
            SocketAddr::from(([127, 0, 0, 1], 9100))
        }),
    };

    // [dns]
    let dns = convert_dns(raw.dns, problems);

    // [flows]
    let flows = flows::convert_flows(raw.flows, problems);

    // The proxy's own addresses the file names: an upstream equal to one would be the proxy
    // forwarding to itself. (The host's other addresses are unknown here; the SNAT addresses
    // found from the route home are checked by `validate_runtime`.)
    let own = own_addresses(
        SnatAddrs {
            v4: nat.snat_ipv4,
            v6: nat.snat_ipv6,
        },
        raw.services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, parse_endpoint(&s.listen, "listen").ok()?))),
        admin.listen,
    );

    // [[service]]
    let mut services = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut listens: HashMap<(SocketAddr, Protocol), usize> = HashMap::new();
    let mut l4_count = 0usize;
    let mut upstream_set = HashSet::new();
    for (i, s) in raw.services.into_iter().enumerate() {
        let key = |k: &str| format!("service[{i}].{k}");
        if s.name.is_empty()
            || s.name.len() > MAX_SERVICE_NAME_LEN
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            problems.push(Problem::new(
                key("name"),
                format!(
                    "`{}`: a name is 1..={MAX_SERVICE_NAME_LEN} characters of A-Z a-z 0-9 - _ .",
                    s.name
                ),
            ));
        } else if let Some(first) = names.get(&s.name) {
            problems.push(Problem::new(
                key("name"),
                format!("`{}` is already the name of service[{first}]", s.name),
            ));
        } else {
            names.insert(s.name.clone(), i);
        }
        let listen = match parse_endpoint(&s.listen, "listen") {
            Ok(sa) => {
                let ip = sa.ip();
                let broadcast = matches!(ip, IpAddr::V4(a) if a.is_broadcast());
                if ip.is_unspecified() || ip.is_multicast() || broadcast {
                    problems.push(Problem::new(
                        key("listen"),
                        format!("`{}`: a service listens on one unicast address", s.listen),
                    ));
                } else if let Some(first) = listens.get(&(sa, s.protocol)) {
                    problems.push(Problem::new(
                        key("listen"),
                        format!(
                            "{sa}/{} is already the listen address of service[{first}]",
                            s.protocol
                        ),
                    ));
                } else {
                    listens.insert((sa, s.protocol), i);
                }
                sa
            }
            Err(m) => {
                problems.push(Problem::new(key("listen"), m));
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
            }
        };
        let mut upstreams: Vec<UpstreamConfig> = Vec::new();
        for (j, u) in s.upstreams.iter().enumerate() {
            let ukey = format!("service[{i}].upstreams[{j}]");
            let Some(up) = parse_upstream(u, &ukey, problems) else {
                continue;
            };
            if s.mode == ServiceMode::Http {
                http_upstream_problems(u, &up, &ukey, problems);
            }
            if s.mode == ServiceMode::L4
                && let Some(m) = l4_family_problem(&up, listen)
            {
                problems.push(Problem::new(ukey, m));
            } else if let Some(sa) = up.static_addr()
                && let Some(m) = addresses::upstream_problem(&nat, &own, sa)
            {
                problems.push(Problem::new(ukey, m));
            } else if upstreams
                .iter()
                .any(|o| o.host == up.host && o.port == up.port)
            {
                problems.push(Problem::new(
                    ukey,
                    format!("{up} is listed twice in this service"),
                ));
            } else {
                upstreams.push(up);
            }
        }
        if s.mode == ServiceMode::Http && s.protocol == Protocol::Udp {
            // The L7 proxy binds a TCP listener whatever `protocol` says: "udp" would be
            // silently served as tcp.
            problems.push(Problem::new(
                key("protocol"),
                "mode = \"http\" serves HTTP over TCP: set protocol = \"tcp\" (or leave it \
                 out), or use mode = \"l4\" to forward UDP",
            ));
        }
        let health = convert_health(s.health, s.protocol, &key, problems);
        let fast = fastpath::convert(
            i,
            s.protocol,
            listen.is_ipv6(),
            fastpath::RawFastPath {
                mss_clamp: s.mss_clamp,
                allow: s.allow,
                deny: s.deny,
                new_flow_rate: s.new_flow_rate,
                new_flow_burst: s.new_flow_burst,
            },
            problems,
        );
        if s.mode == ServiceMode::L4 {
            l4_count += 1;
            for u in &upstreams {
                match u.static_addr() {
                    Some(sa) => upstream_set.insert(sa.to_string()),
                    None => upstream_set.insert(u.to_string()),
                };
            }
        }
        let http = http::convert(i, s.mode, s.routes, s.http, &nat, &own, problems);
        services.push(ServiceConfig {
            name: s.name,
            listen,
            protocol: s.protocol,
            mode: s.mode,
            upstreams,
            health,
            fast,
            http,
        });
    }
    fastpath::check_capacity(
        &services
            .iter()
            .filter(|s| s.mode == ServiceMode::L4)
            .map(|s| &s.fast)
            .collect::<Vec<_>>(),
        problems,
    );
    let max_services = proxy_common::MAX_SERVICES as usize - 1;
    if l4_count > max_services {
        problems.push(Problem::new(
            "service",
            format!("{l4_count} l4 services; the datapath holds at most {max_services}"),
        ));
    }
    let max_upstreams = proxy_common::MAX_UPSTREAMS as usize - 1;
    if upstream_set.len() > max_upstreams {
        problems.push(Problem::new(
            "service",
            format!(
                "{} distinct upstreams (a DNS name counted once); the datapath holds at most \
                 {max_upstreams}",
                upstream_set.len()
            ),
        ));
    }

    let config = Config {
        source: path.to_owned(),
        datapath: DatapathConfig {
            interfaces: dp.interfaces,
            mode: dp.mode,
            pin_dir,
            max_flows,
        },
        nat,
        admin,
        dns,
        flows,
        services,
    };
    if let Some(snat) = config.nat.snat_ipv4 {
        check_listen_vs_snat(&config, IpAddr::V4(snat), problems);
    }
    if let Some(snat) = config.nat.snat_ipv6 {
        check_listen_vs_snat(&config, IpAddr::V6(snat), problems);
    }
    config
}

mod addresses;
pub use addresses::{
    ForbiddenRange, OwnAddress, UpstreamRefusal, forbidden_upstream, refuse_upstream,
};
mod fastpath;
pub use fastpath::ServiceFastPath;
mod flows;
pub use flows::RANGES as FLOW_LIFETIME_RANGES;
mod http;
pub use http::{HostMatch, HttpConfig, Route};

#[cfg(test)]
mod tests;
