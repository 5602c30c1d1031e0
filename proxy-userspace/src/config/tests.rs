use std::path::Path;

use super::*;

const VALID_FULL: &str = include_str!("../../tests/fixtures/valid_full.toml");
const VALID_MINIMAL: &str = include_str!("../../tests/fixtures/valid_minimal.toml");
const INVALID_MANY: &str = include_str!("../../tests/fixtures/invalid_many.toml");
const INVALID_UNKNOWN_KEY: &str = include_str!("../../tests/fixtures/invalid_unknown_key.toml");
const INVALID_BAD_MODE: &str = include_str!("../../tests/fixtures/invalid_bad_mode.toml");
const INVALID_LISTEN_IN_SNAT_RANGE: &str =
    include_str!("../../tests/fixtures/invalid_listen_in_snat_range.toml");

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("fixture.toml"))
}

fn problems(text: &str) -> Vec<Problem> {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.problems(),
    }
}

fn has(problems: &[Problem], key: &str, needle: &str) -> bool {
    problems
        .iter()
        .any(|p| p.key == key && p.message.contains(needle))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn full_config_parses_with_every_key() {
    let c = parse(VALID_FULL).unwrap();
    assert_eq!(c.datapath.interfaces, ["eth0", "eth1"]);
    assert_eq!(c.datapath.mode, DatapathMode::Native);
    assert_eq!(
        c.datapath.pin_dir,
        Path::new("/run/xdp-proxy-bpffs/xdp-proxy")
    );
    assert_eq!(c.datapath.max_flows, 65536);
    assert_eq!(c.nat.snat_ipv4, Some(Ipv4Addr::new(10, 20, 1, 1)));
    assert_eq!((c.nat.port_min, c.nat.port_max), (20000, 29999));
    assert_eq!(c.nat.home_cidrs.len(), 2);
    assert_eq!(c.nat.home_cidrs[1].to_string(), "172.31.0.0/20");
    assert_eq!(c.admin.listen, "127.0.0.1:9200".parse().unwrap());
    assert_eq!(c.services.len(), 3);
    assert_eq!(c.services[1].protocol, Protocol::Udp);
    assert_eq!(
        c.services[1].upstreams,
        [UpstreamConfig::fixed(sa("172.31.0.2:53"))]
    );
    let web = &c.services[0];
    assert_eq!(web.upstreams[1].weight, 3);
    assert_eq!(web.upstreams[1].effective_weight(), 3);
    let alb = &web.upstreams[2];
    assert_eq!(
        alb.host,
        UpstreamHost::Name("internal-alb.home.example".into())
    );
    assert_eq!((alb.port, alb.weight, alb.drain), (80, 2, true));
    assert_eq!(alb.effective_weight(), 0);
    assert_eq!(alb.to_string(), "internal-alb.home.example:80");
    assert_eq!(
        web.health,
        HealthConfig {
            kind: HealthKind::Http,
            path: "/healthz".into(),
            expect_status: 204,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 3,
            fall: 4,
        }
    );
    assert_eq!(
        c.dns,
        DnsConfig {
            servers: Some(vec![
                "10.20.0.2:53".parse().unwrap(),
                "10.20.0.3:53".parse().unwrap()
            ]),
            interval: Duration::from_secs(10),
            timeout: Duration::from_millis(500),
        }
    );
    assert_eq!(c.services[2].mode, ServiceMode::Http);
    let l4: Vec<usize> = c.l4_services().map(|(i, _)| i).collect();
    assert_eq!(l4, [0, 1]);
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = parse(VALID_MINIMAL).unwrap();
    assert_eq!(c.datapath.mode, DatapathMode::Auto);
    assert_eq!(c.datapath.pin_dir, Path::new(DEFAULT_PIN_DIR));
    assert_eq!(c.datapath.max_flows, proxy_common::DEFAULT_MAX_FLOWS);
    assert_eq!(c.nat.snat_ipv4, None);
    assert_eq!((c.nat.port_min, c.nat.port_max), (10240, 32767));
    assert_eq!(c.admin.listen, "127.0.0.1:9100".parse().unwrap());
    assert_eq!(c.services[0].protocol, Protocol::Tcp);
    assert_eq!(c.services[0].mode, ServiceMode::L4);
    assert_eq!(c.services[0].health, HealthConfig::default());
    assert_eq!(c.services[0].health.kind, HealthKind::Tcp);
    assert_eq!(
        (c.services[0].health.interval, c.services[0].health.timeout),
        (Duration::from_secs(5), Duration::from_secs(2))
    );
    assert_eq!(
        (c.services[0].health.rise, c.services[0].health.fall),
        (2, 3)
    );
    assert_eq!(c.dns, DnsConfig::default());
    assert_eq!(c.dns.servers, None);
    assert_eq!(c.dns.interval, Duration::from_secs(30));
}

#[test]
fn every_problem_of_a_file_is_reported_with_its_key() {
    let p = problems(INVALID_MANY);
    let expect = [
        ("datapath.interfaces[1]", "listed twice"),
        ("datapath.pin_dir", "not an absolute path"),
        ("datapath.max_flows", "not in"),
        ("nat.port_range", "must not be above"),
        ("nat.home_cidrs[1]", "did you mean 10.21.0.0/16"),
        ("admin.listen", "`localhost`"),
        (
            "service[0].upstreams[1]",
            "192.0.2.10:80 is outside every home CIDR",
        ),
        ("service[1].name", "already the name of service[0]"),
        (
            "service[1].listen",
            "already the listen address of service[0]",
        ),
        (
            "service[1].upstreams[0]",
            "neither an IP address nor a DNS name",
        ),
        ("service[1].upstreams[1]", "port 0"),
    ];
    for (key, needle) in expect {
        assert!(
            has(&p, key, needle),
            "no `{key}` problem with `{needle}` in {p:#?}"
        );
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
}

#[test]
fn error_text_names_file_key_and_problem() {
    let err = parse(INVALID_MANY).unwrap_err().to_string();
    assert!(
        err.lines()
            .any(|l| l.starts_with("fixture.toml: service[0].upstreams[1]: 192.0.2.10:80")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 11, "{err}");
}

#[test]
fn unknown_key_is_refused_with_its_path() {
    let err = parse(INVALID_UNKNOWN_KEY).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert!(
        text.starts_with("fixture.toml: service[1].upstream: "),
        "{text}"
    );
    assert!(text.contains("unknown field `upstream`"), "{text}");
}

#[test]
fn unknown_mode_is_refused_with_the_choices() {
    let text = parse(INVALID_BAD_MODE).unwrap_err().to_string();
    assert!(text.starts_with("fixture.toml: datapath.mode: "), "{text}");
    assert!(
        text.contains("turbo") && text.contains("userspace"),
        "{text}"
    );
}

#[test]
fn missing_required_keys_are_named() {
    let text = parse("[datapath]\ninterfaces = [\"eth0\"]\n")
        .unwrap_err()
        .to_string();
    assert!(text.contains("missing field `nat`"), "{text}");
    let text = parse(
        "[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nhome_cidrs = [\"10.0.0.0/8\"]\n\
         [[service]]\nname = \"a\"\nlisten = \"10.1.1.1:80\"\nupstreams = []\n\
         [[service]]\nlisten = \"10.1.1.1:81\"\nupstreams = []\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("service[1]") && text.contains("missing field `name`"),
        "{text}"
    );
}

#[test]
fn type_errors_are_named() {
    let text = parse("[datapath]\ninterfaces = \"eth0\"\n[nat]\nhome_cidrs = [\"10.0.0.0/8\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        text.starts_with("fixture.toml: datapath.interfaces: "),
        "{text}"
    );
    let text = parse("[datapath\n").unwrap_err().to_string();
    assert!(text.starts_with("fixture.toml: (top level): "), "{text}");
}

#[test]
fn listen_port_inside_snat_range_on_the_snat_address_is_refused() {
    let p = problems(INVALID_LISTEN_IN_SNAT_RANGE);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(has(
        &p,
        "service[0].listen",
        "inside nat.port_range [10000, 20000]"
    ));
    // The same port on another address is fine.
    let ok = INVALID_LISTEN_IN_SNAT_RANGE.replace("10.10.1.1:15000", "10.10.1.2:15000");
    parse(&ok).unwrap();
}

#[test]
fn port_range_bounds() {
    let base = |range: &str| {
        format!(
            "[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nport_range = {range}\n\
             home_cidrs = [\"10.0.0.0/8\"]\n"
        )
    };
    assert!(has(
        &problems(&base("[0, 100]")),
        "nat.port_range[0]",
        "not in 1..=65535"
    ));
    assert!(has(
        &problems(&base("[100, 65536]")),
        "nat.port_range[1]",
        "not in 1..=65535"
    ));
    assert!(has(
        &problems(&base("[100]")),
        "nat.port_range",
        "exactly two"
    ));
    let c = parse(&base("[5000, 5000]")).unwrap();
    assert_eq!((c.nat.port_min, c.nat.port_max), (5000, 5000));
    let c = parse(&base("[1, 65535]")).unwrap();
    assert_eq!((c.nat.port_min, c.nat.port_max), (1, 65535));
}

#[test]
fn same_listen_on_other_protocol_is_fine_and_udp_tcp_both_allowed() {
    let text = "[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nhome_cidrs = [\"10.0.0.0/8\"]\n\
        [[service]]\nname = \"a\"\nlisten = \"10.1.1.1:53\"\nprotocol = \"udp\"\nupstreams = [\"10.2.2.2:53\"]\n\
        [[service]]\nname = \"b\"\nlisten = \"10.1.1.1:53\"\nprotocol = \"tcp\"\nupstreams = [\"10.2.2.2:53\"]\n";
    let c = parse(text).unwrap();
    assert_eq!(c.services.len(), 2);
}

#[test]
fn userspace_mode_needs_no_interface_but_others_do() {
    let text =
        "[datapath]\ninterfaces = []\nmode = \"userspace\"\n[nat]\nhome_cidrs = [\"10.0.0.0/8\"]\n";
    parse(text).unwrap();
    let text = "[datapath]\ninterfaces = []\n[nat]\nhome_cidrs = [\"10.0.0.0/8\"]\n";
    assert!(has(&problems(text), "datapath.interfaces", "no interface"));
}

#[test]
fn bad_interface_names_and_ipv6_listen() {
    let text = "[datapath]\ninterfaces = [\"a/b\", \"0123456789abcdef\"]\n[nat]\n\
        home_cidrs = [\"10.0.0.0/8\"]\n[[service]]\nname = \"a\"\nlisten = \"[::1]:80\"\nupstreams = []\n";
    let p = problems(text);
    assert!(
        has(&p, "datapath.interfaces[0]", "not a valid interface name"),
        "{p:#?}"
    );
    assert!(
        has(&p, "datapath.interfaces[1]", "longer than 15"),
        "{p:#?}"
    );
    // An IPv6 listen address is fine; its (absent) upstreams raise nothing.
    assert!(!p.iter().any(|p| p.key == "service[0].listen"), "{p:#?}");
    let p = problems(&text.replace("[::1]:80", "::1:80"));
    assert!(
        has(&p, "service[0].listen", "IPv6 address without brackets"),
        "{p:#?}"
    );
}

#[test]
fn cidr_parsing_and_containment() {
    let c: Ipv4Cidr = "10.20.0.0/16".parse().unwrap();
    assert!(c.contains(Ipv4Addr::new(10, 20, 255, 1).into()));
    assert!(!c.contains(Ipv4Addr::new(10, 21, 0, 1).into()));
    assert_eq!(c.probe_address(), Ipv4Addr::new(10, 20, 0, 1));
    let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains(Ipv4Addr::new(192, 0, 2, 1).into()));
    let host: Ipv4Cidr = "10.1.2.3/32".parse().unwrap();
    assert_eq!(host.probe_address(), Ipv4Addr::new(10, 1, 2, 3));
    assert!("10.0.0.0/33".parse::<Ipv4Cidr>().is_err());
    assert!("10.0.0.0".parse::<Ipv4Cidr>().is_err());
    assert!(
        "10.0.0.1/8"
            .parse::<Ipv4Cidr>()
            .unwrap_err()
            .contains("10.0.0.0/8")
    );
}

#[test]
fn runtime_rules_ephemeral_overlap_and_default_snat() {
    let c = parse(VALID_MINIMAL).unwrap();
    let snat = Ipv4Addr::new(10, 10, 1, 1);
    // Linux default ephemeral range: no overlap with the default SNAT range.
    c.validate_runtime(RuntimeFacts {
        ephemeral_ports: (32768, 60999),
        snat: snat.into(),
    })
    .unwrap();
    let err = c
        .validate_runtime(RuntimeFacts {
            ephemeral_ports: (20000, 60999),
            snat: snat.into(),
        })
        .unwrap_err();
    let p = err.problems();
    assert!(has(
        &p,
        "nat.port_range",
        "overlaps the kernel's ephemeral port range [20000, 60999]"
    ));
    assert!(
        has(&p, "nat.port_range", "ip_local_port_range=\"32768 60999\""),
        "{p:#?}"
    );
    // No kernel-range advice when the SNAT range reaches past the kernel's top.
    let wide =
        parse(&VALID_MINIMAL.replace("[nat]", "[nat]\nport_range = [10240, 65535]")).unwrap();
    let wp = wide
        .validate_runtime(RuntimeFacts {
            ephemeral_ports: (32768, 60999),
            snat: snat.into(),
        })
        .unwrap_err()
        .problems();
    assert!(
        has(&wp, "nat.port_range", "for example [10240, 32767]"),
        "{wp:#?}"
    );
    assert!(!has(&wp, "nat.port_range", "sysctl -w"), "{wp:#?}");
    assert!(
        has(&p, "nat.port_range", "for example [10240, 19999]"),
        "{p:#?}"
    );
    // A default SNAT address equal to a service address with a port in range.
    let text = VALID_MINIMAL.replace("10.10.1.1:443", "10.10.1.1:20000");
    let c = parse(&text).unwrap();
    let p = c
        .validate_runtime(RuntimeFacts {
            ephemeral_ports: (32768, 60999),
            snat: snat.into(),
        })
        .unwrap_err()
        .problems();
    assert!(
        has(&p, "service[0].listen", "inside nat.port_range"),
        "{p:#?}"
    );
    let p = c
        .validate_runtime(RuntimeFacts {
            ephemeral_ports: (32768, 60999),
            snat: Ipv4Addr::LOCALHOST.into(),
        })
        .unwrap_err()
        .problems();
    assert!(
        has(
            &p,
            "nat.snat_ipv4 (from the route home)",
            "cannot be a SNAT"
        ),
        "{p:#?}"
    );
}

#[test]
fn too_many_services_is_refused() {
    use std::fmt::Write as _;
    let mut text =
        String::from("[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nhome_cidrs = [\"10.0.0.0/8\"]\n");
    for i in 0..64 {
        write!(
            text,
            "[[service]]\nname = \"s{i}\"\nlisten = \"10.1.1.1:{}\"\nupstreams = []\n",
            1000 + i
        )
        .unwrap();
    }
    assert!(has(&problems(&text), "service", "at most 63"));
}

const BASE: &str = "[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nhome_cidrs = [\"10.0.0.0/8\"]\n";

fn with_service(body: &str) -> String {
    format!("{BASE}[[service]]\nname = \"s\"\nlisten = \"10.1.1.1:80\"\n{body}")
}

#[test]
fn upstream_tables_and_names() {
    let c = parse(&with_service(
        "upstreams = [\"app.home.example.:8080\", { address = \"10.2.2.2:80\" }, \
         { address = \"APP2.home:81\", weight = 0 }]\n",
    ))
    .unwrap();
    let u = &c.services[0].upstreams;
    assert_eq!(u[0].dns_name(), Some("app.home.example"));
    assert_eq!(u[0].static_addr(), None);
    assert_eq!(u[1], UpstreamConfig::fixed(sa("10.2.2.2:80")));
    assert_eq!(u[2].dns_name(), Some("app2.home"));
    assert_eq!(u[2].effective_weight(), 0);

    let p = problems(&with_service(
        "upstreams = [{ address = \"10.2.2.2:80\", weight = 1001 }, \
         { address = \"10.2.2.3:80\", drain = \"yes\" }, { weight = 2 }, \
         { address = \"10.2.2.4:80\", wieght = 2 }, 7, \"a..b:80\", \"10.2.2.300:80\", \
         \"app.home:80\", \"app.home:80\", \"app.home\"]\n",
    ));
    for (key, needle) in [
        (
            "service[0].upstreams[0].weight",
            "not an integer in 0..=1000",
        ),
        ("service[0].upstreams[1].drain", "not true or false"),
        ("service[0].upstreams[2]", "missing field `address`"),
        ("service[0].upstreams[3].wieght", "unknown field `wieght`"),
        (
            "service[0].upstreams[4]",
            "neither \"host:port\" nor a table",
        ),
        (
            "service[0].upstreams[5]",
            "neither an IP address nor a DNS name",
        ),
        (
            "service[0].upstreams[6]",
            "neither an IP address nor a DNS name",
        ),
        ("service[0].upstreams[8]", "listed twice"),
        ("service[0].upstreams[9]", "not an address:port"),
    ] {
        assert!(
            has(&p, key, needle),
            "no `{key}` problem with `{needle}` in {p:#?}"
        );
    }
    assert_eq!(p.len(), 9, "{p:#?}");
}

#[test]
fn health_settings_are_checked() {
    let p = problems(&with_service(
        "upstreams = []\n[service.health]\nkind = \"icmp\"\ninterval = \"10ms\"\n\
         timeout = \"3x\"\nrise = 0\nfall = 101\n",
    ));
    for (key, needle) in [
        ("service[0].health.kind", "unknown kind `icmp`"),
        ("service[0].health.interval", "shorter than the minimum"),
        ("service[0].health.timeout", "unknown unit `x`"),
        ("service[0].health.rise", "not in 1..=100"),
        ("service[0].health.fall", "not in 1..=100"),
    ] {
        assert!(
            has(&p, key, needle),
            "no `{key}` problem with `{needle}` in {p:#?}"
        );
    }
    let p = problems(&with_service(
        "upstreams = []\n[service.health]\npath = \"/x\"\ninterval = 1\ntimeout = 2\n",
    ));
    assert!(
        has(
            &p,
            "service[0].health.path",
            "only used with kind = \"http\""
        ),
        "{p:#?}"
    );
    assert!(
        has(
            &p,
            "service[0].health.timeout",
            "longer than health.interval"
        ),
        "{p:#?}"
    );
    let p = problems(&with_service(
        "protocol = \"udp\"\nupstreams = []\n[service.health]\nkind = \"http\"\n\
         path = \"no-slash\"\nexpect_status = 99\n",
    ));
    assert!(
        has(&p, "service[0].health.kind", "need a tcp service"),
        "{p:#?}"
    );
    assert!(
        has(&p, "service[0].health.path", "not an absolute path"),
        "{p:#?}"
    );
    assert!(
        has(&p, "service[0].health.expect_status", "not an HTTP status"),
        "{p:#?}"
    );
    // A short interval shortens the default timeout with it.
    let c = parse(&with_service(
        "upstreams = []\n[service.health]\nkind = \"none\"\ninterval = \"200ms\"\n",
    ))
    .unwrap();
    assert_eq!(c.services[0].health.kind, HealthKind::None);
    assert_eq!(c.services[0].health.timeout, Duration::from_millis(200));
}

#[test]
fn dns_settings_are_checked() {
    let p = problems(&format!(
        "{BASE}[dns]\nservers = [\"10.0.0.2:53\", \"resolver\", \"10.0.0.3:0\"]\ninterval = -1\n"
    ));
    assert!(has(&p, "dns.servers[1]", "not an address"), "{p:#?}");
    assert!(has(&p, "dns.servers[2]", "not an address"), "{p:#?}");
    assert!(has(&p, "dns.interval", "negative"), "{p:#?}");
    let p = problems(&format!("{BASE}[dns]\nservers = []\n"));
    assert!(has(&p, "dns.servers", "is empty"), "{p:#?}");
    let p = problems(&format!("{BASE}[dns]\nport = 53\n"));
    assert!(has(&p, "dns.port", "unknown field"), "{p:#?}");
}

#[test]
fn durations() {
    let d = |v: toml::Value| parse_duration(&v);
    assert_eq!(d(toml::Value::Integer(5)), Ok(Duration::from_secs(5)));
    assert_eq!(d("250ms".into()), Ok(Duration::from_millis(250)));
    assert_eq!(d("2s".into()), Ok(Duration::from_secs(2)));
    assert_eq!(d("3".into()), Ok(Duration::from_secs(3)));
    assert_eq!(d("1m".into()), Ok(Duration::from_secs(60)));
    assert_eq!(d("1h".into()), Ok(Duration::from_secs(3600)));
    assert!(d("1.5s".into()).is_err());
    assert!(d("s".into()).is_err());
    assert!(d(toml::Value::Boolean(true)).is_err());
}

#[test]
fn dns_name_rules() {
    for ok in [
        "a",
        "alb.home.example",
        "x-1.y",
        "internal-alb-123.elb.amazonaws.com.",
    ] {
        assert!(is_dns_name(ok), "{ok}");
    }
    for bad in [
        "",
        "-a",
        "a-",
        "a..b",
        "a_b",
        "10.1.1.1",
        "1.2.3.300",
        &"a".repeat(64),
    ] {
        assert!(!is_dns_name(bad), "{bad}");
    }
}

#[test]
fn reload_keeps_restart_only_keys() {
    let old = parse(VALID_FULL).unwrap();
    let text = VALID_FULL
        .replace(
            "interfaces = [\"eth0\", \"eth1\"]",
            "interfaces = [\"eth2\"]",
        )
        .replace("max_flows = 65536", "max_flows = 1024")
        .replace("127.0.0.1:9200", "127.0.0.1:9300")
        .replace("port_range = [20000, 29999]", "port_range = [20000, 25000]");
    let new = parse(&text).unwrap();
    let changes: Vec<&str> = old
        .restart_only_changes(&new)
        .iter()
        .map(|(k, _, _)| *k)
        .collect();
    assert_eq!(
        changes,
        ["datapath.interfaces", "datapath.max_flows", "admin.listen"]
    );
    let applied = old.with_restart_only_keys_of(new);
    assert_eq!(applied.datapath, old.datapath);
    assert_eq!(applied.admin, old.admin);
    // Everything else is the new file's.
    assert_eq!(applied.nat.port_max, 25000);
    assert!(old.restart_only_changes(&applied).is_empty());
}

#[test]
fn example_config_in_docs_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/xdp-proxy.example.toml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    // It shows every kind of upstream and check.
    let ups: Vec<&UpstreamConfig> = c.services.iter().flat_map(|s| &s.upstreams).collect();
    assert!(ups.iter().any(|u| u.dns_name().is_some()));
    assert!(ups.iter().any(|u| u.drain));
    assert!(ups.iter().any(|u| u.weight > 1));
    assert!(c.services.iter().any(|s| s.health.kind == HealthKind::Http));
    assert!(c.dns.servers.is_some());
    // And a dual-stack pair: an IPv6 l4 service beside the IPv4 ones.
    assert!(c.nat.snat_ipv6.is_some());
    assert!(c.l4_services().any(|(_, s)| s.listen.is_ipv6()));
    // And an http service behind trusted front proxies.
    let http = c.services.iter().find_map(|s| s.http.as_ref()).unwrap();
    assert!(!http.routes.is_empty());
    assert!(http.trusts("10.10.2.9".parse().unwrap()));
    assert!(!http.trusts("198.51.100.1".parse().unwrap()));
}

const VALID_DUALSTACK: &str = include_str!("../../tests/fixtures/valid_dualstack.toml");
const INVALID_DUALSTACK: &str = include_str!("../../tests/fixtures/invalid_dualstack.toml");

#[test]
fn ipv6_cidrs_parse_contain_and_probe() {
    let c: IpCidr = "fd00:20::/48".parse().unwrap();
    assert!(c.is_ipv6());
    assert!(c.contains("fd00:20:0:ffff::9".parse().unwrap()));
    assert!(!c.contains("fd00:21::1".parse().unwrap()));
    // Never across families: ::ffff:10.20.0.1 is not 10.20.0.1, and 10.x is not in ::/0.
    assert!(!c.contains(Ipv4Addr::new(10, 20, 0, 1).into()));
    let all6: IpCidr = "::/0".parse().unwrap();
    assert!(!all6.contains(Ipv4Addr::new(10, 20, 0, 1).into()));
    assert!(all6.contains("2001:db8::1".parse().unwrap()));
    assert_eq!(c.probe_address(), "fd00:20::1".parse::<IpAddr>().unwrap());
    let host: IpCidr = "fd00:20::7/128".parse().unwrap();
    assert_eq!(
        host.probe_address(),
        "fd00:20::7".parse::<IpAddr>().unwrap()
    );
    assert!(
        "fd00::/129"
            .parse::<IpCidr>()
            .unwrap_err()
            .contains("0..=128")
    );
    assert!(
        "fd00:20::1/48"
            .parse::<IpCidr>()
            .unwrap_err()
            .contains("did you mean fd00:20::/48")
    );
    assert_eq!(c.to_string(), "fd00:20::/48");
}

#[test]
fn dual_stack_config_parses() {
    let c = parse(VALID_DUALSTACK).unwrap();
    assert_eq!(c.nat.snat_ipv4, Some(Ipv4Addr::new(10, 20, 0, 1)));
    assert_eq!(c.nat.snat_ipv6, Some("fd00:20::1".parse().unwrap()));
    assert_eq!(c.nat.home_cidrs.len(), 2);
    assert_eq!(
        c.nat
            .first_home_cidr(true)
            .map(|h| h.to_string())
            .as_deref(),
        Some("fd00:20::/48")
    );
    assert_eq!(
        c.nat
            .first_home_cidr(false)
            .map(|h| h.to_string())
            .as_deref(),
        Some("10.20.0.0/16")
    );
    let web6 = &c.services[1];
    assert_eq!(web6.listen, sa("[fd00:10::1]:80"));
    assert_eq!(web6.listen.to_string(), "[fd00:10::1]:80");
    assert_eq!(web6.upstreams[0].static_addr(), Some(sa("[fd00:20::2]:80")));
    assert_eq!(web6.upstreams[1].weight, 2);
    assert_eq!(web6.upstreams[1].to_string(), "[fd00:20::3]:80");
    assert_eq!(web6.upstreams[2].dns_name(), Some("app.home"));
    assert_eq!(web6.fast.allow[0].to_string(), "fd00:10::/64");
    assert_eq!(web6.fast.deny[0].to_string(), "fd00:10::bad/128");
    assert_eq!(c.services[2].protocol, Protocol::Udp);
    // http: the daemon's own connections, either family.
    let app6 = &c.services[3];
    assert_eq!(app6.mode, ServiceMode::Http);
    assert_eq!(app6.upstreams.len(), 2);
    assert_eq!(c.l4_services().count(), 3);
}

#[test]
fn dual_stack_problems_name_file_and_key() {
    let err = parse(INVALID_DUALSTACK).unwrap_err();
    let p = err.problems();
    for (key, needle) in [
        ("nat.snat_ipv6", "not an IPv6 address"),
        ("nat.home_cidrs[1]", "did you mean fd00:20::/48"),
        // An IPv4 upstream of an IPv6 l4 service: no NAT64.
        ("service[0].upstreams[0]", "no NAT64"),
        ("service[0].upstreams[0]", "10.20.1.2:80 is IPv4"),
        ("service[0].upstreams[1]", "outside every home CIDR"),
        ("service[0].allow[0]", "never matches a client"),
        ("service[1].upstreams[0]", "listens on IPv4 10.10.1.1:80"),
        ("service[1].upstreams[1]", "without brackets"),
        ("service[1].deny[0]", "never matches a client"),
    ] {
        assert!(
            has(&p, key, needle),
            "no `{key}` problem with `{needle}` in {p:#?}"
        );
    }
    // A DNS name in an IPv6 l4 service is fine: it is asked for AAAA records.
    assert!(
        !p.iter().any(|p| p.key == "service[0].upstreams[2]"),
        "{p:#?}"
    );
    assert_eq!(p.len(), 8, "{p:#?}");
    // The rendered error names the file and each key.
    let text = err.to_string();
    assert!(
        text.contains("fixture.toml: service[0].upstreams[0]: "),
        "{text}"
    );
}

fn facts(v4: Option<&str>, v6: Option<&str>) -> RuntimeFacts {
    RuntimeFacts {
        ephemeral_ports: (32768, 60999),
        snat: SnatAddrs {
            v4: v4.map(|a| a.parse().unwrap()),
            v6: v6.map(|a| a.parse().unwrap()),
        },
    }
}

#[test]
fn ipv6_runtime_rules() {
    // No snat_ipv6 and no IPv6 route: every IPv6 l4 service is named; IPv4 ones and the http
    // service are not.
    let text = VALID_DUALSTACK.replace("snat_ipv6 = \"fd00:20::1\"\n", "");
    let c = parse(&text).unwrap();
    assert_eq!(c.nat.snat_ipv6, None);
    let p = c
        .validate_runtime(facts(Some("10.20.0.1"), None))
        .unwrap_err()
        .problems();
    assert!(
        has(&p, "service[1].listen", "no IPv6 SNAT address"),
        "{p:#?}"
    );
    assert!(
        has(
            &p,
            "service[1].listen",
            "no route toward the first IPv6 home CIDR fd00:20::/48"
        ),
        "{p:#?}"
    );
    assert!(
        has(&p, "service[2].listen", "no IPv6 SNAT address"),
        "{p:#?}"
    );
    assert_eq!(p.len(), 2, "{p:#?}");
    // With the address from the route home it passes.
    c.validate_runtime(facts(Some("10.20.0.1"), Some("fd00:20::1")))
        .unwrap();
    // A route-derived IPv6 SNAT address that cannot be one.
    let p = c
        .validate_runtime(facts(Some("10.20.0.1"), Some("::1")))
        .unwrap_err()
        .problems();
    assert!(
        has(
            &p,
            "nat.snat_ipv6 (from the route home)",
            "cannot be a SNAT"
        ),
        "{p:#?}"
    );
    // No IPv6 home CIDR at all: said so.
    let v6_only_listen = "[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nhome_cidrs = \
        [\"10.20.0.0/16\"]\n[[service]]\nname = \"w\"\nlisten = \"[fd00:10::1]:80\"\nupstreams = []\n";
    let p = parse(v6_only_listen)
        .unwrap()
        .validate_runtime(facts(Some("10.20.0.1"), None))
        .unwrap_err()
        .problems();
    assert!(
        has(&p, "service[0].listen", "there is no IPv6 home CIDR"),
        "{p:#?}"
    );
    // An IPv6-only config needs no IPv4 SNAT address.
    let v6_only = "[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nhome_cidrs = \
        [\"fd00:20::/48\"]\n[[service]]\nname = \"w\"\nlisten = \"[fd00:10::1]:80\"\n\
        upstreams = [\"[fd00:20::2]:80\"]\n";
    parse(v6_only)
        .unwrap()
        .validate_runtime(facts(None, Some("fd00:20::1")))
        .unwrap();
}

#[test]
fn ipv6_listen_on_the_snat_address_outside_the_port_range() {
    // Configured snat_ipv6: checked at parse time.
    let text = VALID_DUALSTACK.replace("\"[fd00:10::1]:80\"", "\"[fd00:20::1]:20000\"");
    let p = problems(&text);
    assert!(
        has(&p, "service[1].listen", "inside nat.port_range"),
        "{p:#?}"
    );
    // From the route home: checked at run time.
    let text = VALID_DUALSTACK
        .replace("snat_ipv6 = \"fd00:20::1\"\n", "")
        .replace("\"[fd00:10::1]:80\"", "\"[fd00:20::1]:20000\"");
    let c = parse(&text).unwrap();
    let p = c
        .validate_runtime(facts(Some("10.20.0.1"), Some("fd00:20::1")))
        .unwrap_err()
        .problems();
    assert!(
        has(
            &p,
            "service[1].listen",
            "[fd00:20::1]:20000 is on the SNAT address"
        ),
        "{p:#?}"
    );
}

#[test]
fn ephemeral_range_message_says_it_covers_ipv6() {
    let c = parse(VALID_DUALSTACK).unwrap();
    let mut f = facts(Some("10.20.0.1"), Some("fd00:20::1"));
    f.ephemeral_ports = (25000, 60999);
    let p = c.validate_runtime(f).unwrap_err().problems();
    assert!(has(&p, "nat.port_range", "covers IPv6 too"), "{p:#?}");
}

#[test]
fn snat_addrs_pick_the_family() {
    let s = SnatAddrs {
        v4: Some(Ipv4Addr::new(10, 20, 0, 1)),
        v6: None,
    };
    let v6peer: IpAddr = "fd00:20::2".parse().unwrap();
    assert_eq!(s.of_family(v6peer), None);
    assert_eq!(s.source_for(v6peer), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    assert_eq!(
        s.source_for(Ipv4Addr::new(10, 20, 1, 2).into()),
        IpAddr::V4(Ipv4Addr::new(10, 20, 0, 1))
    );
    assert_eq!(s.to_string(), "10.20.0.1");
}

// ---------------------------------------------------------------------------------------------
// Refused home CIDRs and upstream addresses (`config/addresses.rs`), and what the http proxy
// would silently ignore.
// ---------------------------------------------------------------------------------------------

/// A config with `nat` lines (home_cidrs and more) and `services`.
fn with_nat(nat: &str, services: &str) -> String {
    format!("[datapath]\ninterfaces = [\"eth0\"]\n[nat]\n{nat}\n{services}")
}

const ANY_HOME: &str =
    "snat_ipv4 = \"10.20.0.1\"\nhome_cidrs = [\"0.0.0.0/0\", \"::/0\"]\nallow_any_home = true";

#[test]
fn default_route_home_cidrs_are_refused_unless_allow_any_home() {
    let services =
        "[[service]]\nname = \"s\"\nlisten = \"10.1.1.1:80\"\nupstreams = [\"10.2.2.2:80\"]\n";
    let p = problems(&with_nat(
        "home_cidrs = [\"0.0.0.0/0\", \"::/0\"]",
        services,
    ));
    assert!(
        has(
            &p,
            "nat.home_cidrs[0]",
            "every IPv4 address (a default route)"
        ),
        "{p:#?}"
    );
    assert!(
        has(
            &p,
            "nat.home_cidrs[1]",
            "every IPv6 address (a default route)"
        ),
        "{p:#?}"
    );
    assert!(
        has(&p, "nat.home_cidrs[0]", "nat.allow_any_home = true"),
        "{p:#?}"
    );
    // Only those two: the upstream inside them gets no second problem.
    assert_eq!(p.len(), 2, "{p:#?}");
    // The rendered error names the file, the key and what to do.
    let err = parse(&with_nat("home_cidrs = [\"0.0.0.0/0\"]", services))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("fixture.toml: nat.home_cidrs[0]: 0.0.0.0/0 is every IPv4 address"),
        "{err}"
    );

    let c = parse(&with_nat(
        "home_cidrs = [\"0.0.0.0/0\", \"::/0\"]\nallow_any_home = true",
        services,
    ))
    .unwrap();
    assert!(c.nat.allow_any_home);
    assert_eq!(c.nat.home_cidrs[1].to_string(), "::/0");
    // The default is false.
    assert!(!parse(VALID_MINIMAL).unwrap().nat.allow_any_home);
}

#[test]
fn home_cidr_containing_a_refused_range_needs_allow_any_home() {
    for (cidr, needle) in [
        ("0.0.0.0/1", "loopback (127.0.0.0/8)"),
        ("128.0.0.0/1", "link-local"),
        (
            "169.0.0.0/8",
            "the EC2 instance metadata service (IMDS) (169.254.169.254/32)",
        ),
        ("fd00::/8", "fd00:ec2::254/128"),
        ("fe00::/7", "link-local (fe80::/10)"),
    ] {
        let nat = format!("home_cidrs = [\"10.20.0.0/16\", \"{cidr}\"]");
        let p = problems(&with_nat(&nat, ""));
        assert!(has(&p, "nat.home_cidrs[1]", needle), "{cidr}: {p:#?}");
        assert!(
            has(&p, "nat.home_cidrs[1]", "nat.allow_any_home = true"),
            "{cidr}: {p:#?}"
        );
        assert_eq!(p.len(), 1, "{cidr}: {p:#?}");
        let allowed = format!("{nat}\nallow_any_home = true");
        parse(&with_nat(&allowed, "")).unwrap_or_else(|e| panic!("{cidr}: {e}"));
    }
    // Ordinary private home networks are fine.
    parse(&with_nat(
        "home_cidrs = [\"10.0.0.0/8\", \"172.16.0.0/12\", \"192.168.0.0/16\", \"100.64.0.0/10\", \
         \"fd00:20::/48\", \"2001:db8::/32\"]",
        "",
    ))
    .unwrap();
}

#[test]
fn home_cidr_inside_a_refused_range_is_refused_even_with_allow_any_home() {
    for (cidr, needle) in [
        ("127.0.0.0/8", "loopback"),
        ("127.0.0.1/32", "loopback"),
        ("::1/128", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("169.254.169.254/32", "metadata service (IMDS)"),
        ("fd00:ec2::254/128", "metadata service over IPv6"),
        ("fe80::/64", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("239.1.0.0/16", "multicast"),
        ("ff00::/8", "multicast"),
        ("0.0.0.0/32", "unspecified"),
        ("::/128", "unspecified"),
        ("255.255.255.255/32", "broadcast"),
    ] {
        for allow in [false, true] {
            let nat = format!("home_cidrs = [\"{cidr}\"]\nallow_any_home = {allow}");
            let p = problems(&with_nat(&nat, ""));
            assert!(has(&p, "nat.home_cidrs[0]", needle), "{cidr}: {p:#?}");
            assert!(has(&p, "nat.home_cidrs[0]", "remove it"), "{cidr}: {p:#?}");
        }
    }
}

#[test]
fn refused_upstream_addresses_even_with_allow_any_home() {
    // Every address is a home one here: the ranges are refused on their own.
    let v4 = [
        (
            "169.254.169.254:80",
            "the EC2 instance metadata service (IMDS)",
        ),
        ("169.254.10.1:80", "link-local"),
        ("127.0.0.1:80", "loopback"),
        ("224.0.0.1:80", "multicast"),
        ("0.0.0.0:80", "the unspecified address"),
        ("255.255.255.255:80", "the limited broadcast address"),
    ];
    let v6 = [
        ("[fd00:ec2::254]:80", "metadata service over IPv6"),
        ("[fe80::1]:80", "link-local"),
        ("[::1]:80", "loopback"),
        ("[ff02::1]:80", "multicast"),
        ("[::]:80", "the unspecified address"),
        ("[::ffff:169.254.169.254]:80", "IPv4-mapped"),
    ];
    let list = |l: &[(&str, &str)]| {
        l.iter()
            .map(|(a, _)| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let services = format!(
        "[[service]]\nname = \"web4\"\nlisten = \"10.1.1.1:80\"\nupstreams = [{}]\n\
         [[service]]\nname = \"web6\"\nlisten = \"[fd00:1::1]:80\"\nupstreams = [{}]\n\
         [[service]]\nname = \"app\"\nlisten = \"10.1.1.1:8080\"\nmode = \"http\"\n\
         upstreams = [\"[fd00:ec2::254]:80\"]\n\
         [[service.route]]\nupstreams = [\"169.254.169.254:80\"]\n",
        list(&v4),
        list(&v6),
    );
    let p = problems(&with_nat(ANY_HOME, &services));
    for (i, (addr, needle)) in v4.iter().enumerate() {
        let key = format!("service[0].upstreams[{i}]");
        assert!(has(&p, &key, needle), "{addr}: {p:#?}");
        assert!(has(&p, &key, "whatever nat.home_cidrs"), "{addr}: {p:#?}");
    }
    for (i, (addr, needle)) in v6.iter().enumerate() {
        assert!(
            has(&p, &format!("service[1].upstreams[{i}]"), needle),
            "{addr}: {p:#?}"
        );
    }
    assert!(has(&p, "service[2].upstreams[0]", "IMDS"), "{p:#?}");
    assert!(
        has(&p, "service[2].route[0].upstreams[0]", "IMDS"),
        "{p:#?}"
    );
    assert_eq!(p.len(), v4.len() + v6.len() + 2, "{p:#?}");

    // Without allow_any_home the class is named, not just "outside every home CIDR".
    let p = problems(&with_service("upstreams = [\"169.254.169.254:80\"]\n"));
    assert!(
        has(
            &p,
            "service[0].upstreams[0]",
            "169.254.169.254:80 is the EC2 instance metadata"
        ),
        "{p:#?}"
    );
}

#[test]
fn upstream_on_the_proxys_own_address_is_refused() {
    let nat = "snat_ipv4 = \"10.20.0.1\"\nsnat_ipv6 = \"fd00:20::1\"\n\
               home_cidrs = [\"10.20.0.0/16\", \"fd00:20::/48\"]";
    let services = "[[service]]\nname = \"web\"\nlisten = \"10.20.0.9:80\"\n\
                    upstreams = [\"10.20.0.1:8080\", \"10.20.0.9:81\", \"10.20.1.2:80\"]\n\
                    [[service]]\nname = \"app\"\nlisten = \"10.10.0.1:80\"\nmode = \"http\"\n\
                    upstreams = [\"[fd00:20::1]:80\"]\n\
                    [[service.route]]\nupstreams = [\"10.20.0.1:80\"]\n";
    let p = problems(&with_nat(nat, services));
    for (key, needle) in [
        (
            "service[0].upstreams[0]",
            "10.20.0.1:8080 is the proxy's own address (nat.snat_ipv4)",
        ),
        ("service[0].upstreams[1]", "own address (service[0].listen)"),
        ("service[1].upstreams[0]", "own address (nat.snat_ipv6)"),
        (
            "service[1].route[0].upstreams[0]",
            "own address (nat.snat_ipv4)",
        ),
    ] {
        assert!(has(&p, key, needle), "no `{key}` with `{needle}` in {p:#?}");
    }
    assert_eq!(p.len(), 4, "{p:#?}");

    // A SNAT address found from the route home is known at run time only.
    let c = parse(&with_nat(
        "home_cidrs = [\"10.20.0.0/16\"]",
        "[[service]]\nname = \"web\"\nlisten = \"10.10.0.1:80\"\n\
         upstreams = [\"10.20.1.2:80\", \"10.20.0.7:80\"]\n",
    ))
    .unwrap();
    c.validate_runtime(facts(Some("10.20.0.8"), None)).unwrap();
    let p = c
        .validate_runtime(facts(Some("10.20.0.7"), None))
        .unwrap_err()
        .problems();
    assert!(
        has(
            &p,
            "service[0].upstreams[1]",
            "own address (nat.snat_ipv4, found from the route home)"
        ),
        "{p:#?}"
    );
    assert_eq!(p.len(), 1, "{p:#?}");
}

#[test]
fn http_service_refuses_dns_upstreams_weight_drain_and_udp() {
    let p = problems(&with_service(
        "mode = \"http\"\nupstreams = [\"app.home.example:80\", \
         { address = \"10.2.2.2:80\", weight = 3 }, { address = \"10.2.2.3:80\", drain = true }, \
         { address = \"10.2.2.4:80\", weight = 1, drain = false }]\n",
    ));
    for (key, needle) in [
        (
            "service[0].upstreams[0]",
            "http upstreams must be IP:port for now",
        ),
        (
            "service[0].upstreams[1].weight",
            "no effect on an http service",
        ),
        (
            "service[0].upstreams[2].drain",
            "no effect on an http service",
        ),
        ("service[0].upstreams[3].weight", "remove it"),
        ("service[0].upstreams[3].drain", "remove it"),
    ] {
        assert!(has(&p, key, needle), "no `{key}` with `{needle}` in {p:#?}");
    }
    assert_eq!(p.len(), 5, "{p:#?}");
    let err = parse(&with_service(
        "mode = \"http\"\nupstreams = [\"app.home.example:80\"]\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("fixture.toml: service[0].upstreams[0]: `app.home.example` is a DNS name"),
        "{err}"
    );

    let p = problems(&with_service(
        "protocol = \"udp\"\nmode = \"http\"\nupstreams = [\"10.2.2.2:80\"]\n\
         [service.health]\nkind = \"none\"\n",
    ));
    assert!(
        has(&p, "service[0].protocol", "set protocol = \"tcp\""),
        "{p:#?}"
    );
    assert_eq!(p.len(), 1, "{p:#?}");

    // The same entries are fine on an l4 service.
    parse(&with_service(
        "upstreams = [\"app.home.example:80\", { address = \"10.2.2.2:80\", weight = 3 }, \
         { address = \"10.2.2.3:80\", drain = true }]\n",
    ))
    .unwrap();
}

#[test]
fn forbidden_upstream_classifies_addresses() {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    for (addr, what) in [
        (
            "169.254.169.254",
            "the EC2 instance metadata service (IMDS)",
        ),
        (
            "fd00:ec2::254",
            "the EC2 instance metadata service over IPv6 (IMDS)",
        ),
        (
            "169.254.169.253",
            "link-local (it holds the EC2 instance metadata service)",
        ),
        ("fe80::1", "link-local"),
        ("127.3.2.1", "loopback"),
        ("::1", "loopback"),
        ("239.255.255.250", "multicast"),
        ("ff05::2", "multicast"),
        ("0.0.0.0", "the unspecified address"),
        ("::", "the unspecified address"),
        ("255.255.255.255", "the limited broadcast address"),
        (
            "::ffff:10.20.1.2",
            "IPv4-mapped IPv6 (write the IPv4 address itself)",
        ),
    ] {
        assert_eq!(
            forbidden_upstream(ip(addr)).map(|r| r.what),
            Some(what),
            "{addr}"
        );
    }
    for addr in [
        "10.20.1.2",
        "169.253.255.255",
        "169.255.0.0",
        "1.2.3.4",
        "255.255.255.254",
        "fd00:ec2::253",
        "fd00:20::2",
        "fec0::1",
        "2001:db8::1",
    ] {
        assert_eq!(forbidden_upstream(ip(addr)), None, "{addr}");
    }
    assert_eq!(
        forbidden_upstream(ip("169.254.169.254"))
            .unwrap()
            .to_string(),
        "the EC2 instance metadata service (IMDS) (169.254.169.254/32)"
    );
}

#[test]
fn flows_section_defaults_and_values() {
    // Absent: the documented defaults.
    let c = parse(BASE).unwrap();
    assert_eq!(c.flows, crate::flows::Lifetimes::default());
    // Every key, in both duration forms.
    let c = parse(&format!(
        "{BASE}[flows]\ntcp_syn_sent = 3\ntcp_syn_received = \"4s\"\ntcp_established = \"2h\"\n\
         tcp_half_closed = \"90s\"\ntcp_time_wait = \"2m\"\ntcp_close_grace = 1\nudp = \"30s\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.flows,
        crate::flows::Lifetimes {
            tcp_syn_sent: Duration::from_secs(3),
            tcp_syn_received: Duration::from_secs(4),
            tcp_established: Duration::from_secs(7200),
            tcp_half_closed: Duration::from_secs(90),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close_grace: Duration::from_secs(1),
            udp: Duration::from_secs(30),
        }
    );
    // The bounds themselves are accepted.
    for (name, min, max) in FLOW_LIFETIME_RANGES {
        for d in [min, max] {
            let text = format!("{BASE}[flows]\n{name} = \"{}ms\"\n", d.as_millis());
            parse(&text).unwrap_or_else(|e| panic!("{name} = {d:?}: {e}"));
        }
    }
}

#[test]
fn flows_section_refuses_zero_absurd_and_unknown_with_the_key_and_range() {
    let p = problems(&format!(
        "{BASE}[flows]\ntcp_syn_sent = 0\ntcp_syn_received = \"500ms\"\n\
         tcp_established = \"30d\"\ntcp_half_closed = -1\ntcp_time_wait = \"11m\"\n\
         tcp_close_grace = \"0s\"\nudp = \"25h\"\n"
    ));
    assert!(
        has(
            &p,
            "flows.tcp_syn_sent",
            "0s is outside the allowed range 1s to 5m"
        ),
        "{p:?}"
    );
    assert!(
        has(
            &p,
            "flows.tcp_syn_received",
            "500ms is outside the allowed range 1s to 5m"
        ),
        "{p:?}"
    );
    assert!(
        has(&p, "flows.tcp_established", "unknown unit `d`"),
        "{p:?}"
    );
    assert!(has(&p, "flows.tcp_half_closed", "-1 is negative"), "{p:?}");
    assert!(
        has(
            &p,
            "flows.tcp_time_wait",
            "11m is outside the allowed range 1s to 10m"
        ),
        "{p:?}"
    );
    assert!(
        has(
            &p,
            "flows.tcp_close_grace",
            "0s is outside the allowed range 1s to 2m"
        ),
        "{p:?}"
    );
    assert!(
        has(
            &p,
            "flows.udp",
            "25h is outside the allowed range 1s to 24h"
        ),
        "{p:?}"
    );
    assert_eq!(p.len(), 7, "one problem per key: {p:?}");
    let p = problems(&format!("{BASE}[flows]\ntcp_established = \"8d\"\n"));
    assert!(has(&p, "flows.tcp_established", "unknown unit"), "{p:?}");
    let p = problems(&format!("{BASE}[flows]\ntcp_established = 700000\n"));
    assert!(
        has(
            &p,
            "flows.tcp_established",
            "700000s is outside the allowed range 10s to 168h"
        ),
        "{p:?}"
    );
    // An unknown key is refused with its path (deny_unknown_fields).
    let e = parse(&format!("{BASE}[flows]\ntcp_fin = 5\n")).unwrap_err();
    assert!(e.to_string().contains("flows"), "{e}");
    assert!(e.to_string().contains("tcp_fin"), "{e}");
}

#[test]
fn flows_section_is_reloadable() {
    let old = parse(BASE).unwrap();
    let new = parse(&format!("{BASE}[flows]\ntcp_syn_received = 2\n")).unwrap();
    assert!(
        old.restart_only_changes(&new).is_empty(),
        "[flows] is not restart-only"
    );
    let applied = old.with_restart_only_keys_of(new);
    assert_eq!(applied.flows.tcp_syn_received, Duration::from_secs(2));
}

/// `allow`, `deny`, `new_flow_rate` / `new_flow_burst` and `mss_clamp` apply in every mode: an
/// http service takes them (its L7 proxy enforces them), and its lists do not count against the
/// XDP ACL tries, which hold l4 services' lists only.
#[test]
fn fast_path_options_are_taken_by_http_services() {
    let c = parse(&with_service(
        "mode = \"http\"\nupstreams = [\"10.2.2.2:80\"]\nallow = [\"10.9.0.0/16\"]\n\
         deny = [\"10.9.0.7/32\"]\nnew_flow_rate = 10\nnew_flow_burst = 20\nmss_clamp = 1200\n",
    ))
    .unwrap();
    let f = &c.services[0].fast;
    assert_eq!(f.allow.len(), 1);
    assert_eq!(f.deny.len(), 1);
    assert_eq!((f.new_flow_rate, f.new_flow_burst), (10, 20));
    assert_eq!(f.mss_clamp, 1200);
    // The checks of the values are the l4 ones.
    let p = problems(&with_service(
        "mode = \"http\"\nupstreams = [\"10.2.2.2:80\"]\ndeny = [\"10.9.0.7/8\"]\n\
         new_flow_burst = 3\n",
    ));
    assert!(has(&p, "service[0].deny[0]", ""), "{p:#?}");
    assert!(
        has(&p, "service[0].new_flow_burst", "needs new_flow_rate"),
        "{p:#?}"
    );
    assert_eq!(p.len(), 2, "{p:#?}");
    // More http prefixes than the tries hold: fine, they never reach the maps.
    let max = proxy_common::MAX_ACL_ENTRIES as usize;
    let many = (0..=max)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect::<Vec<_>>()
        .join(", ");
    parse(&with_service(&format!(
        "mode = \"http\"\nupstreams = [\"10.2.2.2:80\"]\ndeny = [{many}]\n"
    )))
    .unwrap();
}
