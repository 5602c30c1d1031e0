use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use proxy_common::MAGLEV_SIZE;

use super::*;
use crate::{
    config::Config,
    dns::{Answer, DnsError},
    state,
};

const BASE: &str = r#"
[datapath]
interfaces = ["eth0"]
[nat]
snat_ipv4 = "10.20.0.1"
home_cidrs = ["10.20.0.0/16"]
"#;

fn config(services: &str) -> Config {
    Config::parse(&format!("{BASE}{services}"), Path::new("t.toml")).unwrap()
}

const TWO: &str = r#"
[[service]]
name = "web"
listen = "10.10.0.1:80"
upstreams = ["10.20.1.1:80", "10.20.1.2:80", { address = "app.home:80", weight = 2 }]
[service.health]
rise = 2
fall = 2
"#;

#[derive(Default)]
struct Recorder(Vec<Vec<MapOp>>);

impl MapWriter for Recorder {
    fn write(&mut self, ops: &[MapOp]) -> Result<(), crate::datapath::DatapathError> {
        self.0.push(ops.to_vec());
        Ok(())
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn answer(addrs: &[[u8; 4]]) -> Result<Answer, DnsError> {
    Ok(Answer {
        addrs: addrs
            .iter()
            .map(|o| IpAddr::from(Ipv4Addr::from(*o)))
            .collect(),
        ttl: Some(Duration::from_secs(60)),
    })
}

/// A controller that went through start with empty maps.
fn started(c: Config) -> Controller {
    let mut ctl = Controller::new(c, Ipv4Addr::new(10, 20, 0, 1), state::shared());
    ctl.found_in_maps(&[], &[]);
    let plan = ctl.plan().unwrap();
    ctl.adopt(plan);
    ctl
}

fn table_ids(ctl: &Controller, service: &str) -> BTreeSet<u32> {
    ctl.shadow()
        .services
        .iter()
        .find(|s| s.name == service)
        .map(|s| s.table.iter().copied().filter(|id| *id != 0).collect())
        .unwrap_or_default()
}

fn id_of(ctl: &Controller, addr: &str) -> u32 {
    ctl.shadow()
        .upstreams
        .iter()
        .find(|(_, a)| *a == sa(addr))
        .map(|(id, _)| *id)
        .unwrap()
}

#[test]
fn home_filter_splits_answers() {
    let c = config("");
    let (ok, refused) = filter_answer(
        &c.nat,
        &[],
        &[
            Ipv4Addr::new(10, 20, 3, 4).into(),
            Ipv4Addr::new(192, 0, 2, 1).into(),
        ],
    );
    assert_eq!(ok, [IpAddr::from(Ipv4Addr::new(10, 20, 3, 4))]);
    assert_eq!(
        refused,
        [(
            IpAddr::from(Ipv4Addr::new(192, 0, 2, 1)),
            UpstreamRefusal::OutsideHome
        )]
    );
}

/// DNS answers go through the static upstreams' rule: even with every address a home
/// (`allow_any_home`), the metadata service, loopback, link-local, multicast, unspecified,
/// broadcast, IPv4-mapped and the proxy's own addresses are refused.
#[test]
fn dns_filter_refuses_what_a_static_upstream_cannot_be() {
    let c = Config::parse(
        "[datapath]\ninterfaces = [\"eth0\"]\n[nat]\nsnat_ipv4 = \"10.20.0.1\"\n\
         home_cidrs = [\"0.0.0.0/0\", \"::/0\"]\nallow_any_home = true\n\
         [[service]]\nname = \"web\"\nlisten = \"10.10.0.1:80\"\nupstreams = [\"app.home:80\"]\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let own = c.own_addresses(SnatAddrs {
        v4: Some(Ipv4Addr::new(10, 20, 0, 1)),
        v6: Some("fd00:20::1".parse().unwrap()),
    });
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let good = [ip("10.20.3.4"), ip("192.0.2.1"), ip("fd00:20::7")];
    let bad = [
        ("169.254.169.254", "metadata service"),
        ("fd00:ec2::254", "metadata service over IPv6"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("::ffff:169.254.169.254", "IPv4-mapped"),
        ("10.20.0.1", "own address (nat.snat_ipv4)"),
        ("fd00:20::1", "own address (nat.snat_ipv6)"),
        ("10.10.0.1", "own address (service[0].listen)"),
    ];
    let mut answer = good.to_vec();
    answer.extend(bad.iter().map(|(a, _)| ip(a)));
    let (ok, refused) = filter_answer(&c.nat, &own, &answer);
    assert_eq!(ok, good);
    assert_eq!(refused.len(), bad.len(), "{refused:?}");
    for ((addr, why), (want, needle)) in refused.iter().zip(bad) {
        assert_eq!(*addr, ip(want));
        assert!(why.to_string().contains(needle), "{addr}: {why}");
    }
}

#[test]
fn dns_answer_with_the_metadata_address_is_refused_and_counted() {
    let mut ctl = started(config(TWO));
    // 10.20.0.1 is the controller's SNAT address (inside the home CIDR, still refused).
    assert!(ctl.on_dns(
        "app.home",
        answer(&[[10, 20, 5, 5], [169, 254, 169, 254], [10, 20, 0, 1]])
    ));
    assert_eq!(ctl.status().dns_refused_addresses, 2);
    assert_eq!(
        ctl.resolved["app.home"].addrs,
        [IpAddr::from([10, 20, 5, 5])]
    );
}

#[test]
fn desired_weights_follow_drain_health_and_dns() {
    let c = config(
        r#"
[[service]]
name = "web"
listen = "10.10.0.1:80"
upstreams = ["10.20.1.1:80", { address = "10.20.1.2:80", drain = true },
             { address = "app.home:80", weight = 3 }]
"#,
    );
    let mut resolved = HashMap::new();
    // Before the name resolves it stands for no address.
    let d = desired(&c, &resolved, &HashMap::new());
    assert_eq!(
        d[0].upstreams,
        [(sa("10.20.1.1:80"), 1), (sa("10.20.1.2:80"), 0)]
    );
    resolved.insert(
        "app.home".to_owned(),
        Resolved {
            // 10.20.1.1 is also a static upstream: counted once.
            addrs: vec![
                Ipv4Addr::new(10, 20, 1, 9).into(),
                Ipv4Addr::new(10, 20, 1, 1).into(),
            ],
            last_error: None,
        },
    );
    let mut health = HashMap::new();
    let mut sick = Health::default();
    sick.record(&ProbeResult::Failed("x".into()), 1, 1);
    health.insert(("web".to_owned(), sa("10.20.1.9:80")), sick);
    let d = desired(&c, &resolved, &health);
    assert_eq!(
        d[0].upstreams,
        [
            (sa("10.20.1.1:80"), 1),
            (sa("10.20.1.2:80"), 0),
            (sa("10.20.1.9:80"), 0)
        ]
    );
    let targets = health_targets(&c, &resolved);
    assert_eq!(targets.len(), 3);
    assert!(targets.contains_key(&("web".to_owned(), sa("10.20.1.9:80"))));
}

#[test]
fn unhealthy_upstream_leaves_the_table_and_comes_back() {
    let mut ctl = started(config(TWO));
    let mut maps = Recorder::default();
    let (a, b) = (id_of(&ctl, "10.20.1.1:80"), id_of(&ctl, "10.20.1.2:80"));
    assert_eq!(table_ids(&ctl, "web"), BTreeSet::from([a, b]));
    // Nothing changed: nothing written.
    assert_eq!(ctl.reconcile(&mut maps).unwrap().ops, 0);
    assert!(maps.0.is_empty());

    let fail = ProbeResult::Failed("connect: refused".into());
    assert!(!ctl.on_health("web", sa("10.20.1.2:80"), &fail));
    assert!(ctl.on_health("web", sa("10.20.1.2:80"), &fail));
    let r = ctl.reconcile(&mut maps).unwrap();
    // Only table slots change: b keeps its upstream slot (its flows and counters).
    assert_eq!(r.ops, 1);
    assert!(
        matches!(&maps.0[0][0], MapOp::SetMaglev { slots, .. } if slots.len() == r.maglev_slots)
    );
    assert_eq!(table_ids(&ctl, "web"), BTreeSet::from([a]));
    assert_eq!(id_of(&ctl, "10.20.1.2:80"), b);
    // About half the slots moved (b had half of them), never more.
    let moved = r.maglev_slots as f64 / f64::from(MAGLEV_SIZE);
    assert!((0.45..0.55).contains(&moved), "{moved}");
    let st = ctl.status();
    let ub = st.services[0]
        .upstreams
        .iter()
        .find(|u| u.resolved == Some(sa("10.20.1.2:80")))
        .unwrap();
    assert!(!ub.healthy && !ub.in_table);
    assert_eq!(ub.last_error.as_deref(), Some("connect: refused"));

    // The last one goes too: the flag is cleared before the table empties.
    assert!(!ctl.on_health("web", sa("10.20.1.1:80"), &fail));
    assert!(ctl.on_health("web", sa("10.20.1.1:80"), &fail));
    ctl.reconcile(&mut maps).unwrap();
    let ops = &maps.0[1];
    assert!(
        matches!(ops[0], MapOp::SetService { value, .. } if value.flags == 0),
        "{ops:?}"
    );
    assert!(matches!(ops[1], MapOp::SetMaglev { .. }), "{ops:?}");
    assert_eq!(ops.len(), 2);
    assert!(!ctl.status().services[0].has_upstreams);

    // Back: the table is filled before the flag is set.
    assert!(!ctl.on_health("web", sa("10.20.1.1:80"), &ProbeResult::Ok));
    assert!(ctl.on_health("web", sa("10.20.1.1:80"), &ProbeResult::Ok));
    ctl.reconcile(&mut maps).unwrap();
    let ops = &maps.0[2];
    assert!(matches!(ops[0], MapOp::SetMaglev { .. }), "{ops:?}");
    assert!(
        matches!(ops[1], MapOp::SetService { value, .. } if value.flags == SERVICE_F_HAS_UPSTREAMS),
        "{ops:?}"
    );
    assert_eq!(table_ids(&ctl, "web"), BTreeSet::from([a]));
    // Results for targets that do not exist are ignored.
    assert!(!ctl.on_health("web", sa("10.20.9.9:80"), &fail));
    assert!(!ctl.on_health("nope", sa("10.20.1.1:80"), &fail));
}

#[test]
fn dns_answers_are_filtered_and_failures_keep_the_last_good_addresses() {
    let mut ctl = started(config(TWO));
    let mut maps = Recorder::default();
    assert_eq!(ctl.dns_names(), BTreeSet::from(["app.home".to_owned()]));
    // An address outside the home CIDRs is refused and counted; the rest is taken.
    assert!(ctl.on_dns("app.home", answer(&[[10, 20, 5, 5], [192, 0, 2, 7]])));
    assert_eq!(ctl.status().dns_refused_addresses, 1);
    ctl.reconcile(&mut maps).unwrap();
    assert!(maps.0[0].iter().any(|o| matches!(o,
        MapOp::SetUpstream { addr, fresh: true, .. } if *addr == sa("10.20.5.5:80"))));
    assert!(
        !ctl.shadow()
            .upstreams
            .iter()
            .any(|(_, a)| a.ip().to_string().starts_with("192."))
    );
    let five = id_of(&ctl, "10.20.5.5:80");
    assert!(table_ids(&ctl, "web").contains(&five));
    // Same answer: no change.
    assert!(!ctl.on_dns("app.home", answer(&[[10, 20, 5, 5]])));
    // Failures keep the last good addresses.
    assert!(!ctl.on_dns(
        "app.home",
        Err(DnsError::NxDomain {
            name: "app.home".into()
        })
    ));
    assert!(!ctl.on_dns("app.home", answer(&[[192, 0, 2, 8]])));
    let st = ctl.status();
    assert_eq!((st.dns_failures, st.dns_refused_addresses), (2, 2));
    assert_eq!(ctl.reconcile(&mut maps).unwrap().ops, 0);
    assert_eq!(id_of(&ctl, "10.20.5.5:80"), five);
    // The name moves: the old address's slot is cleared, the new one gets a new id.
    assert!(ctl.on_dns("app.home", answer(&[[10, 20, 6, 6]])));
    ctl.reconcile(&mut maps).unwrap();
    let ops = maps.0.last().unwrap();
    assert!(
        ops.iter()
            .any(|o| matches!(o, MapOp::ClearUpstream { id } if *id == five))
    );
    let six = id_of(&ctl, "10.20.6.6:80");
    assert_ne!(six, five);
    assert!(table_ids(&ctl, "web").contains(&six));
    assert!(!table_ids(&ctl, "web").contains(&five));
    // Unknown names are ignored.
    assert!(!ctl.on_dns("other.home", answer(&[[10, 20, 7, 7]])));
}

#[test]
fn reload_adds_removes_and_keeps_ids_of_removed_entries_reserved() {
    let first = config(
        r#"
[[service]]
name = "keep"
listen = "10.10.0.1:80"
upstreams = ["10.20.1.1:80"]
[[service]]
name = "gone"
listen = "10.10.0.1:81"
upstreams = ["10.20.1.2:80"]
"#,
    );
    let mut ctl = started(first);
    let mut maps = Recorder::default();
    let keep_table = ctl.shadow().services[0].table.clone();
    let keep_id = ctl.shadow().services[0].value.id;
    let gone_id = ctl.shadow().services[1].value.id;
    let gone_up = id_of(&ctl, "10.20.1.2:80");
    let second = config(
        r#"
[[service]]
name = "keep"
listen = "10.10.0.1:80"
upstreams = ["10.20.1.1:80"]
[[service]]
name = "new"
listen = "10.10.0.1:82"
upstreams = ["10.20.1.3:80"]
"#,
    );
    ctl.set_config(second, Ipv4Addr::new(10, 20, 0, 1));
    ctl.reconcile(&mut maps).unwrap();
    let ops = &maps.0[0];
    // The kept service is not touched at all.
    assert!(
        !ops.iter()
            .any(|o| matches!(o, MapOp::SetService { value, .. } if value.id == keep_id))
    );
    assert!(
        !ops.iter()
            .any(|o| matches!(o, MapOp::SetMaglev { service_id, .. } if *service_id == keep_id))
    );
    assert_eq!(ctl.shadow().services[0].table, keep_table);
    // The removed service and its upstream are out; the new ones take fresh ids.
    assert!(ops.iter().any(|o| matches!(o, MapOp::RemoveService { .. })));
    assert!(
        ops.iter()
            .any(|o| matches!(o, MapOp::ClearUpstream { id } if *id == gone_up))
    );
    let new_svc = &ctl.shadow().services[1];
    assert_eq!(new_svc.name, "new");
    assert_ne!(new_svc.value.id, gone_id);
    assert_ne!(id_of(&ctl, "10.20.1.3:80"), gone_up);
    assert_eq!(
        ctl.retired_ids(),
        (BTreeSet::from([gone_id]), BTreeSet::from([gone_up]))
    );
    // Once no flow carries them, retired ids are released.
    ctl.release_retired(&HashSet::from([gone_id]), &HashSet::new());
    assert_eq!(
        ctl.retired_ids(),
        (BTreeSet::from([gone_id]), BTreeSet::new())
    );
    ctl.release_retired(&HashSet::new(), &HashSet::new());
    assert_eq!(ctl.retired_ids(), (BTreeSet::new(), BTreeSet::new()));
    // A removed upstream that comes back while retired gets its old id again.
    let mut ctl = started(config(
        "[[service]]\nname = \"a\"\nlisten = \"10.10.0.1:80\"\nupstreams = [\"10.20.1.1:80\", \"10.20.1.2:80\"]\n",
    ));
    let id2 = id_of(&ctl, "10.20.1.2:80");
    ctl.set_config(
        config("[[service]]\nname = \"a\"\nlisten = \"10.10.0.1:80\"\nupstreams = [\"10.20.1.1:80\"]\n"),
        Ipv4Addr::new(10, 20, 0, 1),
    );
    ctl.reconcile(&mut maps).unwrap();
    ctl.set_config(
        config("[[service]]\nname = \"a\"\nlisten = \"10.10.0.1:80\"\nupstreams = [\"10.20.1.3:80\", \"10.20.1.2:80\"]\n"),
        Ipv4Addr::new(10, 20, 0, 1),
    );
    ctl.reconcile(&mut maps).unwrap();
    assert_eq!(id_of(&ctl, "10.20.1.2:80"), id2);
    assert_ne!(id_of(&ctl, "10.20.1.3:80"), id2);
}

#[test]
fn restart_keeps_ids_found_in_the_maps() {
    let c = config(TWO);
    let mut ctl = Controller::new(c, Ipv4Addr::new(10, 20, 0, 1), state::shared());
    let web_key = plan::service_key(sa("10.10.0.1:80"), crate::config::Protocol::Tcp);
    let old_key = plan::service_key(sa("10.10.0.1:99"), crate::config::Protocol::Tcp);
    ctl.found_in_maps(
        &[(web_key, 5), (old_key, 1)],
        &[(sa("10.20.1.2:80"), 7), (sa("10.20.9.9:80"), 1)],
    );
    let plan = ctl.plan().unwrap();
    assert_eq!(plan.services[0].value.id, 5);
    assert!(plan.upstreams.contains(&(7, sa("10.20.1.2:80"))));
    // The new upstream avoids id 1, held by an entry that is gone (its flows may live).
    let a = plan
        .upstreams
        .iter()
        .find(|(_, a)| *a == sa("10.20.1.1:80"))
        .unwrap()
        .0;
    assert!(a != 1 && a != 7, "{a}");
    ctl.adopt(plan);
    assert_eq!(
        ctl.retired_ids(),
        (BTreeSet::from([1]), BTreeSet::from([1]))
    );
}

#[test]
fn health_state_survives_a_reload_unless_its_check_changed() {
    let mut ctl = started(config(TWO));
    let fail = ProbeResult::Failed("x".into());
    ctl.on_health("web", sa("10.20.1.2:80"), &fail);
    ctl.on_health("web", sa("10.20.1.2:80"), &fail);
    ctl.set_config(config(TWO), Ipv4Addr::new(10, 20, 0, 1));
    let st = ctl.status();
    assert!(st.services[0].upstreams.iter().any(|u| !u.healthy));
    ctl.set_config(
        config(&TWO.replace("fall = 2", "fall = 3")),
        Ipv4Addr::new(10, 20, 0, 1),
    );
    ctl.publish();
    let st = ctl.status();
    let resolved: Vec<_> = st.services[0]
        .upstreams
        .iter()
        .filter(|u| u.resolved.is_some())
        .collect();
    assert_eq!(resolved.len(), 2);
    assert!(resolved.iter().all(|u| u.healthy));
    // The name that never resolved is shown without an address.
    assert!(
        st.services[0]
            .upstreams
            .iter()
            .any(|u| u.resolved.is_none() && !u.in_table)
    );
}

#[test]
fn dns_waits() {
    let ttl = |s| {
        Ok(Answer {
            addrs: vec![],
            ttl: Some(Duration::from_secs(s)),
        })
    };
    let i = Duration::from_secs(30);
    assert_eq!(next_dns_wait(&ttl(5), i), Duration::from_secs(5));
    assert_eq!(next_dns_wait(&ttl(0), i), MIN_DNS_WAIT);
    assert_eq!(next_dns_wait(&ttl(300), i), i);
    assert_eq!(
        next_dns_wait(&ttl(5), Duration::from_millis(200)),
        Duration::from_millis(200)
    );
    assert_eq!(next_dns_wait(&Err(DnsError::NoServers), i), DNS_RETRY);
}

#[test]
fn http_upstreams_are_health_checked_and_reported() {
    let c = config(
        r#"
[[service]]
name = "app"
listen = "10.10.0.1:80"
mode = "http"
upstreams = ["10.20.1.1:80", { address = "10.20.1.2:80" }]
[service.health]
fall = 2
[[service.route]]
path_prefix = "/api/"
upstreams = ["10.20.1.2:80", "10.20.1.3:80"]

[[service]]
name = "quiet"
listen = "10.10.0.1:81"
mode = "http"
upstreams = ["10.20.1.4:80"]
[service.health]
kind = "none"
"#,
    );
    let mut ctl = started(c);
    // Every distinct address of the default group and the routes, none of the unchecked service.
    let targets: Vec<TargetKey> = ctl.health_targets().into_keys().collect();
    assert_eq!(
        targets,
        ["10.20.1.1:80", "10.20.1.2:80", "10.20.1.3:80"]
            .map(|a| ("app".to_owned(), sa(a)))
            .to_vec()
    );
    // Nothing of an http service goes to the maps.
    assert!(ctl.plan().unwrap().services.is_empty());
    let fail = ProbeResult::Failed("connect: refused".into());
    assert!(!ctl.on_health("app", sa("10.20.1.3:80"), &fail));
    assert!(ctl.on_health("app", sa("10.20.1.3:80"), &fail));
    ctl.reconcile(&mut crate::l4::NoMaps).unwrap();
    let st = ctl.status();
    let app = st.services.iter().find(|s| s.name == "app").unwrap();
    let row = |a: &str| {
        app.upstreams
            .iter()
            .find(|u| u.resolved == Some(sa(a)))
            .unwrap()
    };
    assert!(row("10.20.1.1:80").healthy && row("10.20.1.2:80").healthy);
    // `weight` is refused on http upstreams (plain round robin): the default is reported.
    assert_eq!(row("10.20.1.2:80").weight, crate::config::DEFAULT_WEIGHT);
    assert!(!row("10.20.1.3:80").healthy);
    assert_eq!(
        row("10.20.1.3:80").last_error.as_deref(),
        Some("connect: refused")
    );
    assert_eq!(app.upstreams.len(), 3);
    let quiet = st.services.iter().find(|s| s.name == "quiet").unwrap();
    assert!(quiet.upstreams.iter().all(|u| u.healthy));
    // Healthy again after `rise` successes.
    assert!(!ctl.on_health("app", sa("10.20.1.3:80"), &ProbeResult::Ok));
    assert!(ctl.on_health("app", sa("10.20.1.3:80"), &ProbeResult::Ok));
}

/// A name used by an IPv4 and an IPv6 service is asked for A and AAAA; each service takes the
/// addresses of its own family (no NAT64), inside a home CIDR of that family.
#[test]
fn dns_names_of_ipv6_services_take_aaaa_records() {
    let text = r#"
[datapath]
interfaces = ["eth0"]
[nat]
snat_ipv4 = "10.20.0.1"
snat_ipv6 = "fd00:20::1"
home_cidrs = ["10.20.0.0/16", "fd00:20::/48"]
[[service]]
name = "web4"
listen = "10.10.0.1:80"
upstreams = ["app.home:80"]
[[service]]
name = "web6"
listen = "[fd00:10::1]:80"
upstreams = ["app.home:80", "only6.home:80"]
"#;
    let c = Config::parse(text, Path::new("t.toml")).unwrap();
    assert_eq!(
        dns_families(&c, "app.home"),
        dns::Families { v4: true, v6: true }
    );
    assert_eq!(
        dns_families(&c, "only6.home"),
        dns::Families {
            v4: false,
            v6: true
        }
    );
    let mut ctl = started(c);
    let v6: IpAddr = "fd00:20::7".parse().unwrap();
    let outside6: IpAddr = "fd00:99::7".parse().unwrap();
    assert!(ctl.on_dns(
        "app.home",
        Ok(Answer {
            addrs: vec![Ipv4Addr::new(10, 20, 5, 5).into(), v6, outside6],
            ttl: None,
        })
    ));
    // The address outside every home CIDR is refused and counted.
    assert_eq!(ctl.status().dns_refused_addresses, 1);
    ctl.reconcile(&mut Recorder::default()).unwrap();
    let four = id_of(&ctl, "10.20.5.5:80");
    let six = id_of(&ctl, "[fd00:20::7]:80");
    assert_eq!(table_ids(&ctl, "web4"), BTreeSet::from([four]));
    assert_eq!(table_ids(&ctl, "web6"), BTreeSet::from([six]));
    // Health checks: each service checks its own family's address.
    let targets = ctl.health_targets();
    assert!(targets.contains_key(&("web6".to_owned(), sa("[fd00:20::7]:80"))));
    assert!(!targets.contains_key(&("web6".to_owned(), sa("10.20.5.5:80"))));
    assert!(!targets.contains_key(&("web4".to_owned(), sa("[fd00:20::7]:80"))));
}
