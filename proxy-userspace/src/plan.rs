//! The desired contents of the datapath maps, computed from a validated config (pure).
//!
//! Ids are assigned stably: a service (by listen address, port, protocol) or an upstream (by
//! address and port) already present in the pinned maps keeps its id, so a restarted daemon
//! keeps its counters and the ids its surviving flows carry. New entries take the lowest id
//! never held by an existing entry, then the lowest free one.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::{Ipv4Addr, SocketAddrV4},
};

use proxy_common::{
    CONFIG_F_READY, FAMILY_IPV4, MAX_SERVICES, MAX_UPSTREAMS, NatConfig, SERVICE_F_HAS_UPSTREAMS,
    ServiceKey, ServiceValue, UPSTREAM_F_ACTIVE, UpstreamValue, addr_v4,
};

use crate::{
    config::{Config, Protocol},
    maglev,
};

/// One L4 service as it goes into `XP_SERVICES` and `XP_MAGLEV`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedService {
    pub name: String,
    pub listen: SocketAddrV4,
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
    pub upstreams: Vec<(u32, SocketAddrV4)>,
    pub services: Vec<PlannedService>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("no free {what} id left (ids 1..{max})")]
    IdsExhausted { what: &'static str, max: u32 },
}

/// The `XP_SERVICES` key of a service.
#[must_use]
pub fn service_key(listen: SocketAddrV4, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        addr: addr_v4(listen.ip().octets()),
        port: listen.port().to_be_bytes(),
        proto: protocol.number(),
        family: FAMILY_IPV4,
    }
}

/// The `XP_UPSTREAMS` value of an active upstream.
#[must_use]
pub fn upstream_value(addr: SocketAddrV4) -> UpstreamValue {
    UpstreamValue {
        addr: addr_v4(addr.ip().octets()),
        port: addr.port().to_be_bytes(),
        family: FAMILY_IPV4,
        _pad0: 0,
        flags: UPSTREAM_F_ACTIVE,
    }
}

/// The address of an `XP_UPSTREAMS` value.
#[must_use]
pub fn upstream_addr(v: &UpstreamValue) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(proxy_common::addr_v4_octets(&v.addr)),
        u16::from_be_bytes(v.port),
    )
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
    let old: HashMap<&K, u32> = existing
        .iter()
        .filter(|(_, id)| (1..max).contains(id))
        .map(|(k, id)| (k, *id))
        .collect();
    let held: HashSet<u32> = old.values().copied().collect();
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

/// Compute the plan for `config` with the SNAT address in effect, reusing the ids found in the
/// pinned maps (`existing_services`: key -> id; `existing_upstreams`: id -> address).
///
/// # Errors
/// [`PlanError`] when ids run out (the config validation bounds the counts, so only a map
/// with foreign entries gets here).
pub fn build(
    config: &Config,
    snat: Ipv4Addr,
    existing_services: &[(ServiceKey, u32)],
    existing_upstreams: &[(SocketAddrV4, u32)],
) -> Result<Plan, PlanError> {
    // Distinct upstreams of L4 services, in order of first appearance.
    let mut ups: Vec<SocketAddrV4> = Vec::new();
    for (_, s) in config.l4_services() {
        for u in &s.upstreams {
            if !ups.contains(u) {
                ups.push(*u);
            }
        }
    }
    let up_ids = assign_ids(existing_upstreams, &ups, MAX_UPSTREAMS, "upstream")?;
    let up_id: HashMap<SocketAddrV4, u32> =
        ups.iter().copied().zip(up_ids.iter().copied()).collect();

    let l4: Vec<_> = config.l4_services().map(|(_, s)| s).collect();
    let keys: Vec<ServiceKey> = l4
        .iter()
        .map(|s| service_key(s.listen, s.protocol))
        .collect();
    let svc_ids = assign_ids(existing_services, &keys, MAX_SERVICES, "service")?;

    let services = l4
        .iter()
        .zip(keys)
        .zip(svc_ids)
        .map(|((s, key), id)| {
            let backends: Vec<maglev::Backend> = s
                .upstreams
                .iter()
                .map(|u| maglev::Backend {
                    id: up_id[u],
                    weight: 1,
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
            snat_v4: addr_v4(snat.octets()),
            port_min: config.nat.port_min,
            port_max: config.nat.port_max,
            flags: CONFIG_F_READY,
        },
        upstreams: ups.into_iter().zip(up_ids).map(|(a, id)| (id, a)).collect(),
        services,
    })
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
        let a: SocketAddrV4 = "10.20.1.2:8080".parse().unwrap();
        let v = upstream_value(a);
        assert_eq!(v.port, [0x1f, 0x90]);
        assert_eq!(upstream_addr(&v), a);
    }
}
