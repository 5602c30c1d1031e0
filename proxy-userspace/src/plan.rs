//! The desired contents of the datapath maps, computed from a validated config (pure).
//!
//! Ids are assigned stably: a service (by listen address, port, protocol) or an upstream (by
//! address and port) already present in the pinned maps keeps its id, so a restarted daemon
//! keeps its counters and the ids its surviving flows carry. New entries take the lowest id
//! never held by an existing entry, then the lowest free one.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use proxy_common::{
    Addr, CONFIG_F_READY, FAMILY_IPV4, FAMILY_IPV6, MAX_SERVICES, MAX_UPSTREAMS, NatConfig,
    SERVICE_F_HAS_UPSTREAMS, ServiceKey, ServiceValue, UPSTREAM_F_ACTIVE, UpstreamValue, addr_v4,
};

use crate::{
    config::{Config, NatSettings, Protocol, SnatAddrs},
    maglev,
};

/// An address as map keys and values store it: the `Addr` bytes and the family
/// (`FAMILY_IPV4`: the first 4 bytes, the rest zero; `FAMILY_IPV6`: all 16 bytes).
#[must_use]
pub fn map_addr(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(a) => (addr_v4(a.octets()), FAMILY_IPV4),
        IpAddr::V6(a) => (a.octets(), FAMILY_IPV6),
    }
}

/// The address of a map key or value's `Addr` and family (anything but `FAMILY_IPV6` is read
/// as IPv4, as the datapath does).
#[must_use]
pub fn ip_of(addr: &Addr, family: u8) -> IpAddr {
    if family == FAMILY_IPV6 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::from(proxy_common::addr_v4_octets(addr)))
    }
}

/// One L4 service as it goes into `XP_SERVICES` and `XP_MAGLEV`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedService {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub key: ServiceKey,
    pub value: ServiceValue,
    /// `MAGLEV_SIZE` upstream ids.
    pub table: Vec<u32>,
}

/// Everything the daemon writes at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `XP_CONFIG[0]`, with `CONFIG_F_READY`.
    pub nat: NatConfig,
    /// Active upstream slots: id -> address.
    pub upstreams: Vec<(u32, SocketAddr)>,
    pub services: Vec<PlannedService>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("no free {what} id left (ids 1..{max})")]
    IdsExhausted { what: &'static str, max: u32 },
}

/// The `XP_SERVICES` key of a service.
#[must_use]
pub fn service_key(listen: SocketAddr, protocol: Protocol) -> ServiceKey {
    let (addr, family) = map_addr(listen.ip());
    ServiceKey {
        addr,
        port: listen.port().to_be_bytes(),
        proto: protocol.number(),
        family,
    }
}

/// The `XP_UPSTREAMS` value of an active upstream.
#[must_use]
pub fn upstream_value(addr: SocketAddr) -> UpstreamValue {
    let (bytes, family) = map_addr(addr.ip());
    UpstreamValue {
        addr: bytes,
        port: addr.port().to_be_bytes(),
        family,
        _pad0: 0,
        flags: UPSTREAM_F_ACTIVE,
    }
}

/// The address of an `XP_UPSTREAMS` value.
#[must_use]
pub fn upstream_addr(v: &UpstreamValue) -> SocketAddr {
    SocketAddr::new(ip_of(&v.addr, v.family), u16::from_be_bytes(v.port))
}

/// Assign ids in `1..max` to `desired` keys (in order), keeping the id of every key found in
/// `existing`. New keys take the lowest id not held by any existing entry, then the lowest id
/// not kept.
///
/// # Errors
/// [`PlanError::IdsExhausted`] when the ids run out.
pub fn assign_ids<K: Eq + Hash + Clone>(
    existing: &[(K, u32)],
    desired: &[K],
    max: u32,
    what: &'static str,
) -> Result<Vec<u32>, PlanError> {
    assign_ids_reserved(existing, desired, max, what, &HashSet::new())
}

/// One L4 service as the control plane wants it: its upstream addresses with the weight each
/// gets in the Maglev table (0: keeps its slot, gets no new flows: draining or unhealthy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub upstreams: Vec<(SocketAddr, u32)>,
}

/// The desired services of `config` when every upstream is a healthy static address (names are
/// skipped): the plan a config alone gives.
#[must_use]
pub fn static_services(config: &Config) -> Vec<DesiredService> {
    config
        .l4_services()
        .map(|(_, s)| DesiredService {
            name: s.name.clone(),
            listen: s.listen,
            protocol: s.protocol,
            upstreams: s
                .upstreams
                .iter()
                .filter_map(|u| u.static_addr().map(|a| (a, u.effective_weight())))
                .collect(),
        })
        .collect()
}

/// Compute the plan for `config` alone (static upstreams, all healthy). See [`build_desired`].
///
/// # Errors
/// [`PlanError`] when ids run out.
pub fn build(
    config: &Config,
    snat: impl Into<SnatAddrs>,
    existing_services: &[(ServiceKey, u32)],
    existing_upstreams: &[(SocketAddr, u32)],
) -> Result<Plan, PlanError> {
    build_desired(
        &config.nat,
        snat.into(),
        &static_services(config),
        existing_services,
        existing_upstreams,
        &Reserved::default(),
    )
}

/// Ids that new entries must not take: slots of removed services and upstreams whose flows
/// still live (their counters and the ids their flows carry stay theirs until the flows end).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    pub services: HashSet<u32>,
    pub upstreams: HashSet<u32>,
}

/// Compute the plan for `services` with the SNAT addresses in effect (a family without one gets
/// an all-zero address: the datapath creates no flow of that family), reusing the ids found in
/// the maps (`existing_services`: key -> id; `existing_upstreams`: address -> id) and never
/// giving a new entry a `reserved` id while another id is free.
///
/// # Errors
/// [`PlanError`] when ids run out.
pub fn build_desired(
    nat: &NatSettings,
    snat: SnatAddrs,
    services: &[DesiredService],
    existing_services: &[(ServiceKey, u32)],
    existing_upstreams: &[(SocketAddr, u32)],
    reserved: &Reserved,
) -> Result<Plan, PlanError> {
    // Distinct upstreams, in order of first appearance.
    let mut ups: Vec<SocketAddr> = Vec::new();
    for s in services {
        for (u, _) in &s.upstreams {
            if !ups.contains(u) {
                ups.push(*u);
            }
        }
    }
    let up_ids = assign_ids_reserved(
        existing_upstreams,
        &ups,
        MAX_UPSTREAMS,
        "upstream",
        &reserved.upstreams,
    )?;
    let up_id: HashMap<SocketAddr, u32> = ups.iter().copied().zip(up_ids.iter().copied()).collect();

    let keys: Vec<ServiceKey> = services
        .iter()
        .map(|s| service_key(s.listen, s.protocol))
        .collect();
    let svc_ids = assign_ids_reserved(
        existing_services,
        &keys,
        MAX_SERVICES,
        "service",
        &reserved.services,
    )?;

    let services = services
        .iter()
        .zip(keys)
        .zip(svc_ids)
        .map(|((s, key), id)| {
            let backends: Vec<maglev::Backend> = s
                .upstreams
                .iter()
                .map(|(u, weight)| maglev::Backend {
                    id: up_id[u],
                    weight: *weight,
                    identity: u.to_string(),
                })
                .collect();
            let table = maglev::build_table(&backends);
            let flags = if table.iter().any(|id| *id != 0) {
                SERVICE_F_HAS_UPSTREAMS
            } else {
                0
            };
            PlannedService {
                name: s.name.clone(),
                listen: s.listen,
                protocol: s.protocol,
                key,
                value: ServiceValue { id, flags },
                table,
            }
        })
        .collect();

    Ok(Plan {
        nat: NatConfig {
            snat_v4: snat.v4.map_or([0; 16], |a| addr_v4(a.octets())),
            port_min: nat.port_min,
            port_max: nat.port_max,
            flags: CONFIG_F_READY,
            snat_v6: snat.v6.map_or([0; 16], |a| a.octets()),
        },
        upstreams: ups.into_iter().zip(up_ids).map(|(a, id)| (id, a)).collect(),
        services,
    })
}

/// [`assign_ids`], but new keys never take a `reserved` id while another is free.
fn assign_ids_reserved<K: Eq + Hash + Clone>(
    existing: &[(K, u32)],
    desired: &[K],
    max: u32,
    what: &'static str,
    reserved: &HashSet<u32>,
) -> Result<Vec<u32>, PlanError> {
    let old: HashMap<&K, u32> = existing
        .iter()
        .filter(|(_, id)| (1..max).contains(id))
        .map(|(k, id)| (k, *id))
        .collect();
    let held: HashSet<u32> = old.values().chain(reserved.iter()).copied().collect();
    let mut used: HashSet<u32> = desired.iter().filter_map(|k| old.get(k).copied()).collect();
    let mut out = Vec::with_capacity(desired.len());
    for k in desired {
        if let Some(id) = old.get(k) {
            out.push(*id);
            continue;
        }
        let id = (1..max)
            .find(|id| !held.contains(id) && !used.contains(id))
            .or_else(|| (1..max).find(|id| !used.contains(id)))
            .ok_or(PlanError::IdsExhausted { what, max })?;
        used.insert(id);
        out.push(id);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The minimal difference between two plans.
// ---------------------------------------------------------------------------------------------

/// One map write. [`diff`] orders them so the datapath never sees a service pointing at an
/// empty slot: slots are filled before tables use them, a service loses its
/// `SERVICE_F_HAS_UPSTREAMS` flag before its table is emptied and gets it after its table is
/// filled, and slots are cleared last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Write an upstream slot; `fresh`: a new occupant (its counters start from zero).
    SetUpstream {
        id: u32,
        addr: SocketAddr,
        fresh: bool,
    },
    /// Mark an upstream slot inactive.
    ClearUpstream { id: u32 },
    /// Insert or update a service; `fresh`: a new id (its counters start from zero).
    SetService {
        key: ServiceKey,
        value: ServiceValue,
        fresh: bool,
    },
    /// Remove a service from the match map.
    RemoveService { key: ServiceKey },
    /// Write some slots of a service's Maglev table: `(slot, upstream id)`.
    SetMaglev {
        service_id: u32,
        slots: Vec<(u32, u32)>,
    },
    /// Write `XP_CONFIG[0]`.
    SetNat(NatConfig),
}

/// The map writes that turn `old` (what the maps hold) into `new`.
#[must_use]
pub fn diff(old: &Plan, new: &Plan) -> Vec<MapOp> {
    let mut ops = Vec::new();
    // 1. Upstream slots, new or changed.
    for (id, addr) in &new.upstreams {
        match old.upstreams.iter().find(|(i, _)| i == id) {
            Some((_, a)) if a == addr => {}
            Some(_) | None => ops.push(MapOp::SetUpstream {
                id: *id,
                addr: *addr,
                fresh: true,
            }),
        }
    }
    let old_svc = |key: &ServiceKey| old.services.iter().find(|s| s.key == *key);
    // 2. Services that lose their last upstream: flag off before the table empties.
    for s in &new.services {
        if let Some(o) = old_svc(&s.key)
            && o.value.id == s.value.id
            && o.value.flags & SERVICE_F_HAS_UPSTREAMS != 0
            && s.value.flags & SERVICE_F_HAS_UPSTREAMS == 0
        {
            ops.push(MapOp::SetService {
                key: s.key,
                value: s.value,
                fresh: false,
            });
        }
    }
    // 3. Tables: only the slots that change. A new id's table is compared with an empty one
    //    unless a removed service held that id (then with its table).
    let zero = vec![0u32; new.services.first().map_or(0, |s| s.table.len())];
    for s in &new.services {
        let before: &[u32] = old
            .services
            .iter()
            .find(|o| o.value.id == s.value.id)
            .map_or(zero.as_slice(), |o| o.table.as_slice());
        let slots: Vec<(u32, u32)> = (0u32..)
            .zip(&s.table)
            .filter(|(i, up)| before.get(*i as usize).copied().unwrap_or(0) != **up)
            .map(|(i, up)| (i, *up))
            .collect();
        if !slots.is_empty() {
            ops.push(MapOp::SetMaglev {
                service_id: s.value.id,
                slots,
            });
        }
    }
    // 4. Services new or changed (flag on after the table is filled).
    for s in &new.services {
        match old_svc(&s.key) {
            Some(o) if o.value == s.value => {}
            Some(o)
                if o.value.id == s.value.id
                    && o.value.flags & SERVICE_F_HAS_UPSTREAMS != 0
                    && s.value.flags & SERVICE_F_HAS_UPSTREAMS == 0 => {} // done in 2.
            Some(o) => ops.push(MapOp::SetService {
                key: s.key,
                value: s.value,
                fresh: o.value.id != s.value.id,
            }),
            None => ops.push(MapOp::SetService {
                key: s.key,
                value: s.value,
                fresh: !old.services.iter().any(|o| o.value.id == s.value.id),
            }),
        }
    }
    // 5. Services gone: out of the match map, and their tables emptied unless the id lives on.
    for o in &old.services {
        if new.services.iter().any(|s| s.key == o.key) {
            continue;
        }
        ops.push(MapOp::RemoveService { key: o.key });
        if !new.services.iter().any(|s| s.value.id == o.value.id) {
            let slots: Vec<(u32, u32)> = (0u32..)
                .zip(&o.table)
                .filter(|(_, up)| **up != 0)
                .map(|(i, _)| (i, 0))
                .collect();
            if !slots.is_empty() {
                ops.push(MapOp::SetMaglev {
                    service_id: o.value.id,
                    slots,
                });
            }
        }
    }
    // 6. Upstream slots no table points at any more.
    for (id, _) in &old.upstreams {
        if !new.upstreams.iter().any(|(i, _)| i == id) {
            ops.push(MapOp::ClearUpstream { id: *id });
        }
    }
    // 7. Datapath settings.
    if old.nat != new.nat {
        ops.push(MapOp::SetNat(new.nat));
    }
    ops
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proxy_common::MAGLEV_SIZE;

    use super::*;

    const TEXT: &str = include_str!("../tests/fixtures/valid_full.toml");

    #[test]
    fn ids_are_kept_and_new_ones_avoid_recently_held_ids() {
        let existing = [("a", 3), ("gone", 1), ("b", 2)];
        let ids = assign_ids(&existing, &["b", "new", "a", "new2"], 10, "x").unwrap();
        // b and a keep 2 and 3; new ones skip 1 (held by "gone") and take 4, 5.
        assert_eq!(ids, [2, 4, 3, 5]);
        // When only held ids remain, they are reused.
        let ids = assign_ids(&existing, &["n1", "n2", "n3"], 4, "x").unwrap();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(
            assign_ids(&[], &["a", "b", "c", "d"], 4, "x"),
            Err(PlanError::IdsExhausted { what: "x", max: 4 })
        );
        // Out-of-range existing ids are ignored.
        assert_eq!(
            assign_ids(&[("a", 0), ("b", 99)], &["a", "b"], 10, "x").unwrap(),
            [1, 2]
        );
    }

    #[test]
    fn plan_from_config() {
        let c = Config::parse(TEXT, Path::new("t.toml")).unwrap();
        let p = build(&c, Ipv4Addr::new(10, 20, 1, 1), &[], &[]).unwrap();
        assert_eq!(p.nat.flags, CONFIG_F_READY);
        assert_eq!((p.nat.port_min, p.nat.port_max), (20000, 29999));
        assert_eq!(p.nat.snat_v4, addr_v4([10, 20, 1, 1]));
        // http services get no XDP entry; upstreams of http services get no slot.
        assert_eq!(p.services.len(), 2);
        assert_eq!(
            p.upstreams,
            [
                (1, "10.20.1.2:80".parse().unwrap()),
                (2, "10.20.1.3:80".parse().unwrap()),
                (3, "172.31.0.2:53".parse().unwrap())
            ]
        );
        let web = &p.services[0];
        assert_eq!(
            web.value,
            ServiceValue {
                id: 1,
                flags: SERVICE_F_HAS_UPSTREAMS
            }
        );
        assert_eq!(web.key.port, [0, 80]);
        assert_eq!(web.key.proto, 6);
        assert_eq!(web.table.len(), MAGLEV_SIZE as usize);
        assert!(web.table.iter().all(|id| *id == 1 || *id == 2));
        let dns = &p.services[1];
        assert_eq!(dns.value.id, 2);
        assert_eq!(dns.key.proto, 17);
        assert!(dns.table.iter().all(|id| *id == 3));
    }

    #[test]
    fn restart_keeps_ids_and_empty_service_has_no_upstream_flag() {
        let c = Config::parse(TEXT, Path::new("t.toml")).unwrap();
        let dns_key = service_key("10.10.1.1:53".parse().unwrap(), Protocol::Udp);
        let p = build(
            &c,
            Ipv4Addr::new(10, 20, 1, 1),
            &[(dns_key, 7)],
            &[("172.31.0.2:53".parse().unwrap(), 9)],
        )
        .unwrap();
        assert_eq!(p.services[1].value.id, 7);
        assert_eq!(p.services[0].value.id, 1);
        assert!(p.upstreams.contains(&(9, "172.31.0.2:53".parse().unwrap())));
        assert!(p.services[1].table.iter().all(|id| *id == 9));

        let text = TEXT.replace("upstreams = [\"172.31.0.2:53\"]", "upstreams = []");
        let c = Config::parse(&text, Path::new("t.toml")).unwrap();
        let p = build(&c, Ipv4Addr::new(10, 20, 1, 1), &[], &[]).unwrap();
        assert_eq!(p.services[1].value.flags, 0);
        assert!(p.services[1].table.iter().all(|id| *id == 0));
    }

    #[test]
    fn upstream_value_round_trip() {
        let a: SocketAddr = "10.20.1.2:8080".parse().unwrap();
        let v = upstream_value(a);
        assert_eq!(v.port, [0x1f, 0x90]);
        assert_eq!(upstream_addr(&v), a);
    }

    #[test]
    fn diff_of_equal_plans_is_empty_and_from_empty_writes_everything_in_order() {
        let c = Config::parse(TEXT, Path::new("t.toml")).unwrap();
        let p = build(&c, Ipv4Addr::new(10, 20, 1, 1), &[], &[]).unwrap();
        assert!(diff(&p, &p).is_empty());
        let empty = Plan {
            nat: NatConfig::default(),
            upstreams: Vec::new(),
            services: Vec::new(),
        };
        let ops = diff(&empty, &p);
        let kind = |o: &MapOp| match o {
            MapOp::SetUpstream { .. } => 0,
            MapOp::SetMaglev { .. } => 1,
            MapOp::SetService { .. } => 2,
            MapOp::SetNat(_) => 3,
            MapOp::RemoveService { .. } | MapOp::ClearUpstream { .. } => 9,
        };
        let kinds: Vec<u8> = ops.iter().map(kind).collect();
        assert!(kinds.windows(2).all(|w| w[0] <= w[1]), "{ops:?}");
        assert_eq!(kinds.iter().filter(|k| **k == 0).count(), 3);
        assert!(ops.iter().all(|o| match o {
            MapOp::SetMaglev { slots, .. } => slots.len() == MAGLEV_SIZE as usize,
            MapOp::SetService { fresh, .. } | MapOp::SetUpstream { fresh, .. } => *fresh,
            _ => true,
        }));
        // And back to empty: services out, tables zeroed, slots cleared last.
        let ops = diff(&p, &empty);
        assert!(matches!(ops.last(), Some(MapOp::SetNat(_))));
        assert!(matches!(ops[ops.len() - 2], MapOp::ClearUpstream { .. }));
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, MapOp::RemoveService { .. }))
                .count(),
            2
        );
        assert!(ops.iter().any(
            |o| matches!(o, MapOp::SetMaglev { slots, .. } if slots.iter().all(|(_, u)| *u == 0))
        ));
    }

    #[test]
    fn dual_stack_plan_writes_family_6_keys_values_and_snat_v6() {
        let text = include_str!("../tests/fixtures/valid_dualstack.toml");
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        let v6: Ipv6Addr = "fd00:20::1".parse().unwrap();
        let snat = SnatAddrs {
            v4: Some(Ipv4Addr::new(10, 20, 0, 1)),
            v6: Some(v6),
        };
        let p = build(&c, snat, &[], &[]).unwrap();
        assert_eq!(p.nat.snat_v4, addr_v4([10, 20, 0, 1]));
        assert_eq!(p.nat.snat_v6, v6.octets());
        // web4, web6, dns6 (the http service gets no XDP entry).
        assert_eq!(p.services.len(), 3);
        let web4 = &p.services[0];
        assert_eq!(web4.key.family, FAMILY_IPV4);
        assert_eq!(web4.key.addr, addr_v4([10, 10, 1, 1]));
        let web6 = &p.services[1];
        let listen: Ipv6Addr = "fd00:10::1".parse().unwrap();
        assert_eq!(
            web6.key,
            ServiceKey {
                addr: listen.octets(),
                port: [0, 80],
                proto: 6,
                family: FAMILY_IPV6,
            }
        );
        assert_eq!(p.services[2].key.family, FAMILY_IPV6);
        assert_eq!(p.services[2].key.proto, 17);
        // Upstream slots carry their family; a family-6 table only points at family-6 slots.
        let fam: HashMap<u32, u8> = p
            .upstreams
            .iter()
            .map(|(id, a)| (*id, upstream_value(*a).family))
            .collect();
        assert_eq!(fam.values().filter(|f| **f == FAMILY_IPV6).count(), 3);
        for s in &p.services {
            assert!(
                s.table.iter().all(|id| fam[id] == s.key.family),
                "{}",
                s.name
            );
        }
        // Weights reach the table: [fd00:20::3]:80 has weight 2 against 1.
        let id3 = p
            .upstreams
            .iter()
            .find(|(_, a)| *a == "[fd00:20::3]:80".parse::<SocketAddr>().unwrap())
            .unwrap()
            .0;
        let share = web6.table.iter().filter(|id| **id == id3).count();
        assert!(share * 3 > MAGLEV_SIZE as usize * 3 / 2, "{share}");
        // Restart: an IPv6 service key and upstream found in the maps keep their ids.
        let p2 = build(
            &c,
            snat,
            &[(web6.key, 9)],
            &[("[fd00:20::2]:80".parse().unwrap(), 33)],
        )
        .unwrap();
        assert_eq!(p2.services[1].value.id, 9);
        assert!(
            p2.upstreams
                .contains(&(33, "[fd00:20::2]:80".parse().unwrap()))
        );
    }

    #[test]
    fn no_address_of_a_family_is_written_as_zeros() {
        let c = Config::parse(TEXT, Path::new("t.toml")).unwrap();
        let p = build(&c, SnatAddrs::default(), &[], &[]).unwrap();
        assert_eq!(p.nat.snat_v4, [0; 16]);
        assert_eq!(p.nat.snat_v6, [0; 16]);
        let p = build(&c, Ipv4Addr::new(10, 20, 1, 1), &[], &[]).unwrap();
        assert_eq!(p.nat.snat_v6, [0; 16]);
    }

    #[test]
    fn ipv6_map_addresses_round_trip() {
        let a: SocketAddr = "[fd00:20::2]:8080".parse().unwrap();
        let v = upstream_value(a);
        assert_eq!(v.family, FAMILY_IPV6);
        assert_eq!(v.addr[..2], [0xfd, 0x00]);
        assert_eq!(v.port, [0x1f, 0x90]);
        assert_eq!(upstream_addr(&v), a);
        let (addr, family) = map_addr("10.1.2.3".parse().unwrap());
        assert_eq!((addr, family), (addr_v4([10, 1, 2, 3]), FAMILY_IPV4));
        assert_eq!(ip_of(&addr, family).to_string(), "10.1.2.3");
        let k = service_key("[fd00:10::1]:443".parse().unwrap(), Protocol::Tcp);
        assert_eq!(
            crate::inspect::report::service_listen(&k),
            "[fd00:10::1]:443"
        );
    }

    #[test]
    fn reserved_ids_are_avoided_by_new_entries() {
        let reserved: HashSet<u32> = [1, 2].into();
        let ids = assign_ids_reserved(&[("a", 3)], &["a", "n"], 10, "x", &reserved).unwrap();
        assert_eq!(ids, [3, 4]);
        // Only when nothing else is free.
        let ids = assign_ids_reserved(&[], &["n", "m"], 3, "x", &reserved).unwrap();
        assert_eq!(ids, [1, 2]);
    }
}
