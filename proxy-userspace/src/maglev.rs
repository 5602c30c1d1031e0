//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016), as the daemon writes it into
//! `XP_MAGLEV`, plus the "which upstream gets this flow" helper that uses the datapath's own
//! flow hash.
//!
//! Each upstream has a preference list over the table's slots: the permutation
//! `(offset + j * skip) % M` with `offset` and `skip` taken from two hashes of the upstream's
//! identity (its `addr:port`), so the table depends only on the set of upstreams and their
//! weights, not on config order, and is the same on every proxy host. Upstreams take turns
//! claiming their next free preferred slot; weights are honoured by giving each upstream a quota
//! of slots proportional to its weight (largest remainder), and an upstream stops taking turns
//! once its quota is filled. The result: every slot filled when any upstream has weight > 0,
//! slot counts exactly proportional to weights (within one slot), and a change of the set moves
//! few slots besides those of the upstream that left or came.

use std::net::IpAddr;

use proxy_common::{MAGLEV_SIZE, addr_v4, hash};

/// One entry of a Maglev table: an upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The value written into the table (upstream id; never 0).
    pub id: u32,
    /// Relative weight; 0 leaves the upstream out of the table (draining).
    pub weight: u32,
    /// Stable identity the permutation is derived from, for example `10.20.1.2:80`.
    pub identity: String,
}

/// Build a table of `MAGLEV_SIZE` slots. No upstream with weight > 0 -> all zeros.
#[must_use]
pub fn build_table(backends: &[Backend]) -> Vec<u32> {
    build_table_sized(backends, MAGLEV_SIZE)
}

/// Build a table of `size` slots (`size` must be prime for the permutations to cover it).
#[must_use]
pub fn build_table_sized(backends: &[Backend], size: u32) -> Vec<u32> {
    let m = size as usize;
    let mut table = vec![0u32; m];
    let mut live: Vec<&Backend> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() || size < 2 {
        return table;
    }
    // Order by identity so the table does not depend on the order of the config.
    live.sort_by(|a, b| a.identity.cmp(&b.identity).then(a.id.cmp(&b.id)));
    let quotas = quotas(&live, size);
    let perms: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let offset = hash_identity(&b.identity, 0xcbf2_9ce4_8422_2325) % u64::from(size);
            let skip = hash_identity(&b.identity, 0x8422_2325_cbf2_9ce4) % u64::from(size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut taken = vec![false; m];
    let mut next = vec![0u64; live.len()];
    let mut counts = vec![0u32; live.len()];
    let mut filled = 0usize;
    while filled < m {
        for i in 0..live.len() {
            if counts[i] >= quotas[i] {
                continue;
            }
            let (offset, skip) = perms[i];
            // The permutation visits every slot once in `size` steps, and a free slot exists
            // (filled < m), so this ends within `size` steps.
            loop {
                let slot = ((offset + next[i] * skip) % u64::from(size)) as usize;
                next[i] += 1;
                if !taken[slot] {
                    taken[slot] = true;
                    table[slot] = live[i].id;
                    counts[i] += 1;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}

/// Slots per backend: proportional to weight, largest remainder, summing to `size`.
fn quotas(live: &[&Backend], size: u32) -> Vec<u32> {
    let total: u64 = live.iter().map(|b| u64::from(b.weight)).sum();
    let exact: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let num = u64::from(size) * u64::from(b.weight);
            (num / total, num % total)
        })
        .collect();
    let mut quotas: Vec<u32> = exact
        .iter()
        .map(|(q, _)| u32::try_from(*q).unwrap_or(size))
        .collect();
    let assigned: u32 = quotas.iter().sum();
    let mut order: Vec<usize> = (0..live.len()).collect();
    // Largest remainder first; ties in identity order (stable sort).
    order.sort_by(|a, b| exact[*b].1.cmp(&exact[*a].1));
    for i in order.into_iter().take((size - assigned) as usize) {
        quotas[i] += 1;
    }
    quotas
}

/// 64-bit FNV-1a from `basis`, then a splitmix64 finalizer (FNV alone mixes its low bits
/// poorly for short strings).
fn hash_identity(s: &str, basis: u64) -> u64 {
    let mut h = basis;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The Maglev slot the datapath picks for a new flow (client -> service), exactly as
/// docs/datapath.md step 7 computes it (addresses as `Addr`: IPv4 in the first 4 bytes, IPv6 in
/// all 16).
#[must_use]
pub fn flow_slot(
    client: impl Into<IpAddr>,
    client_port: u16,
    service: impl Into<IpAddr>,
    service_port: u16,
    proto: u8,
) -> u32 {
    let addr = |ip: IpAddr| match ip {
        IpAddr::V4(a) => addr_v4(a.octets()),
        IpAddr::V6(a) => a.octets(),
    };
    hash::flow_hash(
        hash::SEED_MAGLEV,
        &addr(client.into()),
        &addr(service.into()),
        client_port.to_be_bytes(),
        service_port.to_be_bytes(),
        proto,
    ) % MAGLEV_SIZE
}

/// Which upstream id the datapath picks for a new flow, given the service's table (0 = none).
#[must_use]
pub fn upstream_for_flow(
    table: &[u32],
    client: impl Into<IpAddr>,
    client_port: u16,
    service: impl Into<IpAddr>,
    service_port: u16,
    proto: u8,
) -> u32 {
    let slot = flow_slot(client, client_port, service, service_port, proto) as usize;
    table.get(slot).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn backends(n: u32) -> Vec<Backend> {
        (1..=n)
            .map(|id| Backend {
                id,
                weight: 1,
                identity: format!("10.20.{}.{}:80", id / 200, id % 200 + 1),
            })
            .collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for id in table {
            *c.entry(*id).or_insert(0) += 1;
        }
        c
    }

    #[test]
    fn every_slot_filled_when_there_is_an_upstream() {
        for n in [1, 2, 3, 7, 64, 500] {
            let t = build_table(&backends(n));
            assert_eq!(t.len(), MAGLEV_SIZE as usize);
            assert!(
                t.iter().all(|id| (1..=n).contains(id)),
                "n={n}: empty or foreign slot"
            );
        }
    }

    #[test]
    fn empty_or_all_drained_gives_zeros() {
        assert!(build_table(&[]).iter().all(|id| *id == 0));
        let mut b = backends(3);
        for x in &mut b {
            x.weight = 0;
        }
        let t = build_table(&b);
        assert_eq!(t.len(), MAGLEV_SIZE as usize);
        assert!(t.iter().all(|id| *id == 0));
    }

    #[test]
    fn equal_weights_balanced_within_5_percent() {
        for n in [2, 3, 10, 33] {
            let t = build_table(&backends(n));
            let c = counts(&t);
            let mean = f64::from(MAGLEV_SIZE) / f64::from(n);
            for id in 1..=n {
                let got = c.get(&id).copied().unwrap_or(0) as f64;
                assert!(
                    (got - mean).abs() <= mean * 0.05,
                    "n={n} id={id}: {got} vs {mean}"
                );
            }
        }
    }

    #[test]
    fn weights_are_honoured() {
        let mut b = backends(3);
        b[0].weight = 1;
        b[1].weight = 2;
        b[2].weight = 3;
        let c = counts(&build_table(&b));
        let unit = f64::from(MAGLEV_SIZE) / 6.0;
        for (id, w) in [(1u32, 1.0), (2, 2.0), (3, 3.0)] {
            let got = c[&id] as f64;
            assert!(
                (got - unit * w).abs() <= 1.0,
                "id {id}: {got} vs {}",
                unit * w
            );
        }
        // Weight 0 = draining: out of the table.
        b[1].weight = 0;
        let c = counts(&build_table(&b));
        assert!(!c.contains_key(&2));
        assert_eq!(c.values().sum::<usize>(), MAGLEV_SIZE as usize);
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        for n in [5u32, 10, 20] {
            let all = backends(n);
            let before = build_table(&all);
            for removed in [1, n / 2, n] {
                let rest: Vec<Backend> = all.iter().filter(|b| b.id != removed).cloned().collect();
                let after = build_table(&rest);
                let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                let own = before.iter().filter(|id| **id == removed).count();
                let m = MAGLEV_SIZE as usize;
                // The removed upstream's slots must move; the rest mostly stays: at most 1.25 M/N moved.
                assert!(moved >= own);
                let limit = m as f64 / f64::from(n) * 1.25;
                assert!(
                    (moved as f64) <= limit,
                    "n={n} removed={removed}: {moved} slots moved, limit {limit:.0} (own {own})"
                );
            }
        }
    }

    #[test]
    fn table_ignores_config_order() {
        let b = backends(8);
        let mut r = b.clone();
        r.reverse();
        assert_eq!(build_table(&b), build_table(&r));
    }

    #[test]
    fn small_prime_table_is_covered() {
        let t = build_table_sized(&backends(4), 13);
        assert!(t.iter().all(|id| *id != 0));
        let c = counts(&t);
        assert!(c.values().all(|n| (3..=4).contains(n)), "{c:?}");
    }

    #[test]
    fn flow_helper_uses_the_datapath_hash() {
        let client = std::net::Ipv4Addr::new(10, 0, 0, 1);
        let svc = std::net::Ipv4Addr::new(10, 10, 1, 1);
        let h = hash::flow_hash(
            hash::SEED_MAGLEV,
            &addr_v4(client.octets()),
            &addr_v4(svc.octets()),
            [0x30, 0x39],
            [0, 80],
            6,
        );
        assert_eq!(flow_slot(client, 12345, svc, 80, 6), h % MAGLEV_SIZE);
        let table = build_table(&backends(4));
        let id = upstream_for_flow(&table, client, 12345, svc, 80, 6);
        assert_eq!(id, table[(h % MAGLEV_SIZE) as usize]);
        // Client ports spread over every upstream.
        let mut seen = std::collections::HashSet::new();
        for port in 40000..40200 {
            seen.insert(upstream_for_flow(&table, client, port, svc, 80, 6));
        }
        assert_eq!(seen.len(), 4);
    }
}
