//! The HTTP part of a `mode = "http"` service: routes by Host and path prefix to upstream
//! groups, and the proxy's timeouts.
//!
//! ```toml
//! [[service]]
//! name = "app"
//! listen = "10.10.1.1:80"
//! mode = "http"
//! upstreams = ["10.20.1.2:8080"]      # requests no route matches go here (may be empty: 404)
//! [service.http]
//! connect_timeout = "2s"              # upstream TCP connect
//! header_timeout = "30s"              # client request head (also the longest a client's
//!                                     # keep-alive connection may sit idle), and upstream
//!                                     # response head
//! idle_timeout = "60s"                # pooled (idle, keep-alive) upstream connections
//! trusted_proxies = ["10.0.0.0/16"]   # front proxies (an ALB's subnets) whose forwarding
//!                                     # headers are kept; default none
//! [[service.route]]
//! host = "api.example.com"            # optional: exact (case-insensitive, port ignored) or "*.example.com"
//! path_prefix = "/v1/"                # optional, default "/"
//! upstreams = ["10.20.1.3:8080"]
//! ```
//!
//! Routes are tried in config order; the first whose host and path prefix match wins.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::{
    IpCidr, NatSettings, OwnAddress, Problem, ServiceMode, addresses, parse_duration,
    parse_endpoint,
};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Routes per service.
pub const MAX_ROUTES: usize = 256;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    connect_timeout: Option<toml::Value>,
    header_timeout: Option<toml::Value>,
    idle_timeout: Option<toml::Value>,
    trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    host: Option<String>,
    path_prefix: Option<String>,
    upstreams: Vec<String>,
}

/// How a route matches the Host header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lowercase, without port.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (lowercase, with the leading dot).
    Suffix(String),
}

impl HostMatch {
    /// Whether `host` (as sent: any case, maybe with a port) matches.
    #[must_use]
    pub fn matches(&self, host: Option<&str>) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(want) => host.is_some_and(|h| strip_port(h).eq_ignore_ascii_case(want)),
            Self::Suffix(suffix) => host.is_some_and(|h| {
                let h = strip_port(h).to_ascii_lowercase();
                h.len() > suffix.len() && h.ends_with(suffix.as_str())
            }),
        }
    }
}

/// `example.com:8080` -> `example.com` (an IPv6 literal `[::1]:80` -> `[::1]`).
#[must_use]
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// One `[[service.route]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub host: HostMatch,
    pub path_prefix: String,
    pub upstreams: Vec<SocketAddr>,
}

impl Route {
    /// Whether a request for `host` and `path` takes this route.
    #[must_use]
    pub fn matches(&self, host: Option<&str>, path: &str) -> bool {
        self.host.matches(host) && path.starts_with(&self.path_prefix)
    }
}

/// The HTTP settings of a `mode = "http"` service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    pub routes: Vec<Route>,
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// `trusted_proxies`: peers (front proxies such as an ALB) whose `X-Forwarded-Proto`,
    /// `X-Forwarded-Port` and `Forwarded` are passed on as received, and whose
    /// `X-Forwarded-For` names the client in the access log. Empty: nobody.
    pub trusted_proxies: Vec<IpCidr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            trusted_proxies: Vec::new(),
        }
    }
}

impl HttpConfig {
    /// Whether `peer` is one of the `trusted_proxies` (an IPv4-mapped IPv6 peer as its IPv4
    /// address).
    #[must_use]
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted_proxies.iter().any(|c| c.contains(peer))
    }

    /// The upstream group of a request: the first matching route's, else `default` (the
    /// service's own upstreams). Returns the route index (`None` = default).
    #[must_use]
    pub fn route<'a>(
        &'a self,
        host: Option<&str>,
        path: &str,
        default: &'a [SocketAddr],
    ) -> (Option<usize>, &'a [SocketAddr]) {
        self.routes
            .iter()
            .position(|r| r.matches(host, path))
            .map_or((None, default), |i| (Some(i), &self.routes[i].upstreams))
    }
}

fn timeout(
    v: Option<&toml::Value>,
    default: Duration,
    key: String,
    problems: &mut Vec<Problem>,
) -> Duration {
    match v.map(parse_duration) {
        None => default,
        Some(Ok(d)) if d >= Duration::from_millis(10) => d,
        Some(Ok(d)) => {
            problems.push(Problem::new(key, format!("{d:?} is shorter than 10ms")));
            default
        }
        Some(Err(m)) => {
            problems.push(Problem::new(key, m));
            default
        }
    }
}

fn host_match(s: &str, key: &str, problems: &mut Vec<Problem>) -> HostMatch {
    let lower = s.trim().to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest.to_owned()),
        None => (false, lower.clone()),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid {
        problems.push(Problem::new(
            key,
            format!("`{s}` is not a host name like api.example.com or *.example.com (no port)"),
        ));
    }
    if wild {
        HostMatch::Suffix(format!(".{name}"))
    } else {
        HostMatch::Exact(name)
    }
}

/// Validate the HTTP keys of `service[i]`; `Some` for an http service.
pub(super) fn convert(
    i: usize,
    mode: ServiceMode,
    routes: Vec<RawRoute>,
    http: Option<RawHttp>,
    nat: &NatSettings,
    own: &[OwnAddress],
    problems: &mut Vec<Problem>,
) -> Option<HttpConfig> {
    if mode != ServiceMode::Http {
        if !routes.is_empty() {
            problems.push(Problem::new(
                format!("service[{i}].route"),
                "routes are for mode = \"http\" services",
            ));
        }
        if http.is_some() {
            problems.push(Problem::new(
                format!("service[{i}].http"),
                "[service.http] is for mode = \"http\" services",
            ));
        }
        return None;
    }
    if routes.len() > MAX_ROUTES {
        problems.push(Problem::new(
            format!("service[{i}].route"),
            format!("{} routes; at most {MAX_ROUTES}", routes.len()),
        ));
    }
    let http = http.unwrap_or_default();
    let key = |k: &str| format!("service[{i}].http.{k}");
    let connect_timeout = timeout(
        http.connect_timeout.as_ref(),
        DEFAULT_CONNECT_TIMEOUT,
        key("connect_timeout"),
        problems,
    );
    let header_timeout = timeout(
        http.header_timeout.as_ref(),
        DEFAULT_HEADER_TIMEOUT,
        key("header_timeout"),
        problems,
    );
    let idle_timeout = timeout(
        http.idle_timeout.as_ref(),
        DEFAULT_IDLE_TIMEOUT,
        key("idle_timeout"),
        problems,
    );
    let mut trusted_proxies = Vec::new();
    for (j, t) in http.trusted_proxies.iter().flatten().enumerate() {
        let tkey = format!("service[{i}].http.trusted_proxies[{j}]");
        match t.trim().parse::<IpCidr>() {
            Ok(c) if trusted_proxies.contains(&c) => {
                problems.push(Problem::new(tkey, format!("{c} is listed twice")));
            }
            Ok(c) => trusted_proxies.push(c),
            Err(m) => problems.push(Problem::new(
                tkey,
                format!("{m} (one address: 10.0.1.7/32)"),
            )),
        }
    }
    let mut out = Vec::new();
    for (j, r) in routes.into_iter().enumerate() {
        let rkey = |k: &str| format!("service[{i}].route[{j}].{k}");
        let host = r
            .host
            .as_deref()
            .map_or(HostMatch::Any, |h| host_match(h, &rkey("host"), problems));
        let path_prefix = r.path_prefix.unwrap_or_else(|| "/".to_owned());
        if !path_prefix.starts_with('/')
            || path_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            problems.push(Problem::new(
                rkey("path_prefix"),
                format!("`{path_prefix}` is not a path prefix starting with /"),
            ));
        }
        if r.upstreams.is_empty() {
            problems.push(Problem::new(
                rkey("upstreams"),
                "is empty: a route needs an upstream",
            ));
        }
        let mut upstreams = Vec::new();
        for (k, u) in r.upstreams.iter().enumerate() {
            let ukey = format!("service[{i}].route[{j}].upstreams[{k}]");
            match parse_endpoint(u, "upstream") {
                Ok(sa) => {
                    if let Some(m) = addresses::upstream_problem(nat, own, sa) {
                        problems.push(Problem::new(ukey, m));
                    } else if upstreams.contains(&sa) {
                        problems.push(Problem::new(
                            ukey,
                            format!("{sa} is listed twice in this route"),
                        ));
                    } else {
                        upstreams.push(sa);
                    }
                }
                Err(m) => problems.push(Problem::new(ukey, m)),
            }
        }
        out.push(Route {
            host,
            path_prefix,
            upstreams,
        });
    }
    Some(HttpConfig {
        routes: out,
        connect_timeout,
        header_timeout,
        idle_timeout,
        trusted_proxies,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const BASE: &str = "[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nsnat_ipv4 = \"10.20.0.1\"\nhome_cidrs = [\"10.20.0.0/16\"]\n";

    fn parse(services: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(&format!("{BASE}{services}"), Path::new("t.toml"))
    }

    #[test]
    fn routes_and_timeouts_parse_and_route() {
        let c = parse(
            r#"
[[service]]
name = "app"
listen = "10.10.1.1:80"
mode = "http"
upstreams = ["10.20.1.2:80"]
[service.http]
connect_timeout = "250ms"
header_timeout = 7
trusted_proxies = ["10.0.0.0/16", "fd00:1::/64", "192.0.2.7/32"]
[[service.route]]
host = "API.example.com"
upstreams = ["10.20.1.3:80"]
[[service.route]]
path_prefix = "/static/"
upstreams = ["10.20.1.4:80", "10.20.1.5:80"]
[[service.route]]
host = "*.example.org"
path_prefix = "/x"
upstreams = ["10.20.1.6:80"]
"#,
        )
        .unwrap();
        let h = c.services[0].http.as_ref().unwrap();
        assert_eq!(h.connect_timeout, Duration::from_millis(250));
        assert_eq!(h.header_timeout, Duration::from_secs(7));
        assert_eq!(h.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(h.trusted_proxies.len(), 3);
        for (ip, trusted) in [
            ("10.0.200.1", true),
            ("10.1.0.1", false),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("fd00:1::9", true),
            ("fd00:2::9", false),
            // An IPv4 peer on an IPv6 socket.
            ("::ffff:10.0.3.4", true),
        ] {
            assert_eq!(h.trusts(ip.parse().unwrap()), trusted, "{ip}");
        }
        let default = ["10.20.1.2:80".parse().unwrap()];
        assert_eq!(
            h.route(Some("api.EXAMPLE.com:80"), "/static/a", &default).0,
            Some(0)
        );
        assert_eq!(h.route(Some("other"), "/static/a", &default).0, Some(1));
        assert_eq!(h.route(None, "/static", &default).0, None);
        assert_eq!(h.route(Some("a.b.example.org"), "/xy", &default).0, Some(2));
        assert_eq!(h.route(Some("example.org"), "/xy", &default).0, None);
        let (r, ups) = h.route(Some("x"), "/", &default);
        assert_eq!((r, ups), (None, &default[..]));
    }

    #[test]
    fn bad_http_keys_are_named() {
        let e = parse(
            r#"
[[service]]
name = "app"
listen = "10.10.1.1:80"
mode = "http"
upstreams = []
[service.http]
connect_timeout = "1ms"
trusted_proxies = ["10.0.0.0/16", "10.0.0.1", "10.0.0.1/16", "10.0.0.0/16", "alb"]
[[service.route]]
host = "bad host:80"
path_prefix = "api"
upstreams = ["192.168.1.1:80", "10.20.1.2"]
[[service.route]]
upstreams = []
[[service]]
name = "l4"
listen = "10.10.1.1:81"
upstreams = ["10.20.1.2:80"]
[[service.route]]
upstreams = ["10.20.1.2:80"]
"#,
        )
        .unwrap_err();
        let problems = e.problems();
        let said = |k: &str| {
            problems
                .iter()
                .find(|p| p.key == k)
                .map(|p| p.message.clone())
                .unwrap_or_default()
        };
        assert!(said("service[0].http.trusted_proxies[1]").contains("not an IP prefix"));
        assert!(said("service[0].http.trusted_proxies[2]").contains("host bits set"));
        assert!(said("service[0].http.trusted_proxies[3]").contains("listed twice"));
        assert!(said("service[0].http.trusted_proxies[4]").contains("not an IP prefix"));
        assert!(said("service[0].http.trusted_proxies[0]").is_empty());
        let keys: Vec<String> = e.problems().into_iter().map(|p| p.key).collect();
        for k in [
            "service[0].http.connect_timeout",
            "service[0].route[0].host",
            "service[0].route[0].path_prefix",
            "service[0].route[0].upstreams[0]",
            "service[0].route[0].upstreams[1]",
            "service[0].route[1].upstreams",
            "service[1].route",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
    }
}
