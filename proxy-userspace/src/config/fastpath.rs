//! Per-service fast-path options (docs/datapath.md steps 7 and 9): `mss_clamp`, client `allow`
//! and `deny` CIDR lists, `new_flow_rate` / `new_flow_burst`. They apply in every mode: for an
//! `l4` service served by XDP they are written to `XP_SVC_OPTS`, `XP_ACL_ALLOW` and
//! `XP_ACL_DENY` by `datapath::Maps::set_service_options`; the userspace L4 path and the L7
//! proxy of `http` services enforce the same rules themselves (`crate::l4::admission`, TCP_MAXSEG
//! for `mss_clamp`).

use proxy_common::{MAX_ACL_ENTRIES, SVC_OPT_F_ALLOW_LIST, ServiceOptions};

use super::{IpCidr, Problem, Protocol};

/// Smallest MSS a clamp may set (Linux refuses to go below 88 bytes of MSS).
pub const MIN_MSS_CLAMP: u16 = 88;

/// The fast-path options of one service, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFastPath {
    /// Largest MSS option of a SYN / SYN-ACK (TCP services); 0: no clamping.
    pub mss_clamp: u16,
    /// Client prefixes allowed to open flows; empty: every client not denied.
    pub allow: Vec<IpCidr>,
    /// Client prefixes never allowed to open flows (wins over `allow`).
    pub deny: Vec<IpCidr>,
    /// New flows per second per client address; 0: no limit.
    pub new_flow_rate: u32,
    /// Token bucket depth (default: one second's worth, `new_flow_rate`).
    pub new_flow_burst: u32,
}

impl ServiceFastPath {
    /// The `XP_SVC_OPTS` value of the service.
    #[must_use]
    pub fn options(&self) -> ServiceOptions {
        ServiceOptions {
            mss_clamp: self.mss_clamp,
            _pad0: 0,
            flags: if self.allow.is_empty() {
                0
            } else {
                SVC_OPT_F_ALLOW_LIST
            },
            new_flow_rate: self.new_flow_rate,
            new_flow_burst: self.new_flow_burst,
        }
    }
}

/// The keys as written (fields of `[[service]]`).
#[derive(Debug, Default)]
pub struct RawFastPath {
    pub mss_clamp: Option<i64>,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub new_flow_rate: Option<i64>,
    pub new_flow_burst: Option<i64>,
}

/// Validate service `i`'s fast-path keys (`listen_v6`: the service listens on IPv6, so its
/// clients, and the prefixes of its `allow` and `deny` lists, are IPv6).
pub fn convert(
    i: usize,
    protocol: Protocol,
    listen_v6: bool,
    raw: RawFastPath,
    problems: &mut Vec<Problem>,
) -> ServiceFastPath {
    let key = |k: &str| format!("service[{i}].{k}");
    let mss_clamp = match raw.mss_clamp {
        None | Some(0) => 0,
        Some(v) => match u16::try_from(v) {
            Ok(m) if m >= MIN_MSS_CLAMP && protocol == Protocol::Tcp => m,
            Ok(m) if m >= MIN_MSS_CLAMP => {
                problems.push(Problem::new(
                    key("mss_clamp"),
                    "is a TCP option: set it on protocol = \"tcp\" services only",
                ));
                0
            }
            _ => {
                problems.push(Problem::new(
                    key("mss_clamp"),
                    format!("{v} is not 0 (off) or in {MIN_MSS_CLAMP}..=65535"),
                ));
                0
            }
        },
    };
    let cidrs = |list: &[String], name: &str, problems: &mut Vec<Problem>| {
        let mut out = Vec::new();
        for (j, s) in list.iter().enumerate() {
            match s.parse::<IpCidr>() {
                Ok(c) if out.contains(&c) => problems.push(Problem::new(
                    format!("service[{i}].{name}[{j}]"),
                    format!("{c} is listed twice"),
                )),
                Ok(c) if c.is_ipv6() != listen_v6 => problems.push(Problem::new(
                    format!("service[{i}].{name}[{j}]"),
                    format!(
                        "{c} never matches a client: the service listens on {}, so its clients \
                         are {} (one service per family)",
                        if listen_v6 { "IPv6" } else { "IPv4" },
                        if listen_v6 { "IPv6" } else { "IPv4" },
                    ),
                )),
                Ok(c) => out.push(c),
                Err(m) => problems.push(Problem::new(format!("service[{i}].{name}[{j}]"), m)),
            }
        }
        out
    };
    let allow = cidrs(&raw.allow, "allow", problems);
    let deny = cidrs(&raw.deny, "deny", problems);
    let count = |k: &str, v: Option<i64>, problems: &mut Vec<Problem>| match v {
        None => 0,
        Some(v) => u32::try_from(v).unwrap_or_else(|_| {
            problems.push(Problem::new(
                key(k),
                format!("{v} is not in 0..={}", u32::MAX),
            ));
            0
        }),
    };
    let new_flow_rate = count("new_flow_rate", raw.new_flow_rate, problems);
    let mut new_flow_burst = count("new_flow_burst", raw.new_flow_burst, problems);
    if new_flow_rate == 0 && new_flow_burst != 0 {
        problems.push(Problem::new(
            key("new_flow_burst"),
            "needs new_flow_rate (flows per second per client)",
        ));
    }
    if new_flow_rate != 0 && raw.new_flow_burst.is_none() {
        new_flow_burst = new_flow_rate;
    }
    if new_flow_rate != 0 && new_flow_burst == 0 {
        problems.push(Problem::new(
            key("new_flow_burst"),
            "must be at least 1 when new_flow_rate is set",
        ));
    }
    ServiceFastPath {
        mss_clamp,
        allow,
        deny,
        new_flow_rate,
        new_flow_burst,
    }
}

/// Every `l4` service's lists together must fit the ACL tries (`http` services' lists stay in
/// the daemon). Checked whatever `datapath.mode` says, so a config that works in userspace also
/// works when XDP attaches (`auto`).
pub fn check_capacity(services: &[&ServiceFastPath], problems: &mut Vec<Problem>) {
    let max = MAX_ACL_ENTRIES as usize;
    let allow: usize = services.iter().map(|s| s.allow.len()).sum();
    let deny: usize = services.iter().map(|s| s.deny.len()).sum();
    if allow > max || deny > max {
        problems.push(Problem::new(
            "service",
            format!(
                "{allow} allow and {deny} deny prefixes in all; the datapath holds at most {max} \
                 of each"
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(raw: RawFastPath, protocol: Protocol) -> (ServiceFastPath, Vec<Problem>) {
        let mut problems = Vec::new();
        let f = convert(0, protocol, false, raw, &mut problems);
        (f, problems)
    }

    #[test]
    fn defaults_are_off() {
        let (f, p) = conv(RawFastPath::default(), Protocol::Tcp);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(f, ServiceFastPath::default());
        assert_eq!(f.options(), ServiceOptions::default());
    }

    #[test]
    fn values_are_converted() {
        let raw = RawFastPath {
            mss_clamp: Some(1360),
            allow: vec!["198.51.100.0/24".into()],
            deny: vec!["198.51.100.7/32".into()],
            new_flow_rate: Some(50),
            new_flow_burst: None,
        };
        let (f, p) = conv(raw, Protocol::Tcp);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(f.new_flow_burst, 50, "burst defaults to one second's worth");
        let o = f.options();
        assert_eq!(o.mss_clamp, 1360);
        assert_eq!(o.flags, SVC_OPT_F_ALLOW_LIST);
        assert_eq!((o.new_flow_rate, o.new_flow_burst), (50, 50));
    }

    #[test]
    fn bad_values_are_problems() {
        for (raw, protocol, key) in [
            (
                RawFastPath {
                    mss_clamp: Some(40),
                    ..RawFastPath::default()
                },
                Protocol::Tcp,
                "service[0].mss_clamp",
            ),
            (
                RawFastPath {
                    mss_clamp: Some(1400),
                    ..RawFastPath::default()
                },
                Protocol::Udp,
                "service[0].mss_clamp",
            ),
            (
                RawFastPath {
                    deny: vec!["10.0.0.1/8".into()],
                    ..RawFastPath::default()
                },
                Protocol::Tcp,
                "service[0].deny[0]",
            ),
            (
                RawFastPath {
                    new_flow_burst: Some(5),
                    ..RawFastPath::default()
                },
                Protocol::Tcp,
                "service[0].new_flow_burst",
            ),
            (
                RawFastPath {
                    new_flow_rate: Some(-1),
                    ..RawFastPath::default()
                },
                Protocol::Tcp,
                "service[0].new_flow_rate",
            ),
        ] {
            let (_, p) = conv(raw, protocol);
            assert!(p.iter().any(|p| p.key == key), "{key}: {p:?}");
        }
    }
}
