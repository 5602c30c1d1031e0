//! The daemon's open-file limit (`RLIMIT_NOFILE`): the soft limit raised to the hard one at
//! start, and the configured connection limits checked against what was reached. Every proxied
//! connection holds two descriptors (client side and upstream side): a soft limit of 1,024, the
//! usual default, stops a service at about 500 connections with `accept` failing (EMFILE).

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::config::{Config, Protocol, ServiceMode};

/// Descriptors kept aside for what is not a proxied connection: listeners, eBPF maps, programs
/// and links, the admin listener's connections, health checks, DNS, logs.
pub const RESERVE: u64 = 256;

/// The open-file limit before and after [`raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// The soft limit the daemon was started with.
    pub was: u64,
    /// The soft limit now.
    pub soft: u64,
    pub hard: u64,
}

/// Raise the soft open-file limit to the hard limit (no privilege needed; the hard limit is
/// the administrator's, for example systemd's `LimitNOFILE`).
///
/// # Errors
/// `getrlimit` or `setrlimit` failed.
pub fn raise() -> Result<Limit, nix::Error> {
    let (was, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if was < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(Limit { was, soft, hard })
}

/// What one service may hold open at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    pub service: String,
    /// Connections (TCP) or sessions (UDP) served at once at most.
    pub connections: u64,
    /// Descriptors those take: two per TCP connection, one per UDP session (its upstream
    /// socket; the clients share the listener's).
    pub descriptors: u64,
}

/// The descriptors each service the daemon proxies itself may need: every http service, and
/// the l4 services when they are served in userspace (`userspace_l4`; the XDP path holds no
/// descriptor per flow). `l4` gives the userspace L4 path's limits.
#[must_use]
pub fn needs(config: &Config, userspace_l4: bool, l4: &crate::l4::Settings) -> Vec<Need> {
    let per = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    config
        .services
        .iter()
        .filter_map(|s| {
            let (connections, per_connection) = match (s.mode, s.protocol) {
                (ServiceMode::Http, _) => (per(crate::l7::MAX_CONNECTIONS), 2),
                (ServiceMode::L4, _) if !userspace_l4 => return None,
                (ServiceMode::L4, Protocol::Tcp) => (per(l4.max_tcp_connections), 2),
                (ServiceMode::L4, Protocol::Udp) => (per(l4.max_udp_sessions), 1),
            };
            Some(Need {
                service: s.name.clone(),
                connections,
                descriptors: connections.saturating_mul(per_connection),
            })
        })
        .collect()
}

/// When `soft` cannot hold `needs` (with [`RESERVE`]): the descriptors needed and a list
/// naming each service with its numbers, for the warning.
#[must_use]
pub fn shortfall(soft: u64, needs: &[Need]) -> Option<(u64, String)> {
    let total = needs
        .iter()
        .fold(RESERVE, |t, n| t.saturating_add(n.descriptors));
    if total <= soft {
        return None;
    }
    let list = needs
        .iter()
        .map(|n| {
            format!(
                "{}: {} connections, {} descriptors",
                n.service, n.connections, n.descriptors
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Some((total, list))
}

/// Log the raise (or why there was none), and warn when the limit reached cannot hold what
/// the services configured may open. Called once at start.
pub fn report(limit: Result<Limit, nix::Error>, needs: &[Need]) {
    let limit = match limit {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit (RLIMIT_NOFILE)");
            return;
        }
    };
    if limit.soft > limit.was {
        tracing::info!(
            was = limit.was,
            soft = limit.soft,
            hard = limit.hard,
            "open-file limit raised to the hard limit (RLIMIT_NOFILE)"
        );
    } else {
        tracing::info!(
            soft = limit.soft,
            hard = limit.hard,
            "open-file limit (RLIMIT_NOFILE)"
        );
    }
    if let Some((needed, services)) = shortfall(limit.soft, needs) {
        tracing::warn!(
            limit = limit.soft,
            needed,
            reserve = RESERVE,
            services = %services,
            "the open-file limit cannot hold the configured connections (each proxied TCP \
             connection needs two descriptors): connections past it fail to be accepted; raise \
             the hard limit (systemd: LimitNOFILE=1048576)"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const CONFIG: &str = r#"
[datapath]
interfaces = ["eth0"]
[nat]
snat_ipv4 = "10.20.0.1"
home_cidrs = ["10.20.0.0/16"]
[[service]]
name = "web"
listen = "10.10.1.1:80"
mode = "http"
upstreams = ["10.20.1.2:80"]
[[service]]
name = "tcp"
listen = "10.10.1.1:81"
upstreams = ["10.20.1.2:81"]
[[service]]
name = "dns"
listen = "10.10.1.1:53"
protocol = "udp"
upstreams = ["10.20.1.2:53"]
"#;

    #[test]
    fn every_proxied_connection_counts_two_descriptors() {
        let config = Config::parse(CONFIG, Path::new("t.toml")).unwrap();
        let settings = crate::l4::Settings {
            max_tcp_connections: 100,
            max_udp_sessions: 50,
            ..crate::l4::Settings::default()
        };
        // XDP serves the l4 services: only the http one holds descriptors per connection.
        let xdp = needs(&config, false, &settings);
        assert_eq!(
            xdp,
            [Need {
                service: "web".to_owned(),
                connections: 16_384,
                descriptors: 32_768,
            }]
        );
        let user = needs(&config, true, &settings);
        let got: Vec<(&str, u64, u64)> = user
            .iter()
            .map(|n| (n.service.as_str(), n.connections, n.descriptors))
            .collect();
        assert_eq!(
            got,
            [("web", 16_384, 32_768), ("tcp", 100, 200), ("dns", 50, 50)]
        );
        // 1,024 (a usual default soft limit) holds none of it; the raised limit holds all.
        let (needed, text) = shortfall(1024, &user).unwrap();
        assert_eq!(needed, 32_768 + 200 + 50 + RESERVE);
        assert_eq!(
            text,
            "web: 16384 connections, 32768 descriptors; tcp: 100 connections, 200 \
             descriptors; dns: 50 connections, 50 descriptors"
        );
        assert_eq!(shortfall(needed, &user), None);
        assert!(shortfall(needed - 1, &user).is_some());
        assert_eq!(shortfall(1_048_576, &xdp), None);
        assert_eq!(shortfall(RESERVE, &[]), None);
    }
}
