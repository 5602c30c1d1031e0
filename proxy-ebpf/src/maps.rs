//! Every map of the XDP program. Names, sizes and layouts come from `proxy-common`, so the daemon
//! and the program agree; the `#[map(name = ...)]` attribute takes a string literal, so each name
//! is checked against its `proxy-common` constant at compile time.
//!
//! None of these maps is pinned by the object: the daemon decides where (and whether) to pin.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use proxy_common::{
    AclKey, DEFAULT_MAX_FLOWS, FlowKey, FlowValue, MAGLEV_SIZE, MAP_ACL_ALLOW, MAP_ACL_DENY,
    MAP_CONFIG, MAP_DEVMAP, MAP_FLOWS_FWD, MAP_FLOWS_REV, MAP_MAGLEV, MAP_RATE, MAP_REASONS,
    MAP_SERVICE_OPTIONS, MAP_SERVICE_STATS, MAP_SERVICES, MAP_UPSTREAM_STATS, MAP_UPSTREAMS,
    MAX_ACL_ENTRIES, MAX_INTERFACES, MAX_RATE_ENTRIES, MAX_SERVICES, MAX_UPSTREAMS, NatConfig,
    REASON_COUNT, RateKey, RateState, ServiceKey, ServiceOptions, ServiceValue, TrafficCounters,
    UpstreamValue,
};

/// Datapath settings: index 0 -> `NatConfig` (SNAT address, port range, ready flag).
#[map(name = "XP_CONFIG")]
pub static XP_CONFIG: Array<NatConfig> = Array::with_max_entries(1, 0);

/// Service match: (listen address, port, protocol) -> service id and flags.
#[map(name = "XP_SERVICES")]
pub static XP_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

/// Upstream slots by id (slot 0 reserved: "no upstream").
#[map(name = "XP_UPSTREAMS")]
pub static XP_UPSTREAMS: Array<UpstreamValue> = Array::with_max_entries(MAX_UPSTREAMS, 0);

/// Maglev tables: `service_id * MAGLEV_SIZE + slot` -> upstream id (0 = none).
#[map(name = "XP_MAGLEV")]
pub static XP_MAGLEV: Array<u32> = Array::with_max_entries(MAX_SERVICES * MAGLEV_SIZE, 0);

/// Forward flows, keyed by the client's packet (client -> service).
#[map(name = "XP_FLOWS_FWD")]
pub static XP_FLOWS_FWD: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Reverse flows, keyed by the upstream's reply (upstream -> SNAT); inserting here with
/// BPF_NOEXIST is the SNAT port reservation.
#[map(name = "XP_FLOWS_REV")]
pub static XP_FLOWS_REV: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Egress interfaces for XDP_REDIRECT: ifindex -> ifindex.
#[map(name = "XP_DEVMAP")]
pub static XP_DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);

/// Per-CPU packet counters indexed by `Reason`, bumped once per packet at exit.
#[map(name = "XP_REASONS")]
pub static XP_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

/// Per-CPU traffic counters per service id.
#[map(name = "XP_SVC_STATS")]
pub static XP_SVC_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per-CPU traffic counters per upstream id.
#[map(name = "XP_UPS_STATS")]
pub static XP_UPS_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_UPSTREAMS, 0);

/// Per-service options by service id (MSS clamp, ACL mode, new-flow rate).
#[map(name = "XP_SVC_OPTS")]
pub static XP_SVC_OPTS: Array<ServiceOptions> = Array::with_max_entries(MAX_SERVICES, 0);

/// Client allow lists: (service id, family, address prefix) -> ACL_HIT.
#[map(name = "XP_ACL_ALLOW")]
pub static XP_ACL_ALLOW: LpmTrie<AclKey, u32> = LpmTrie::with_max_entries(MAX_ACL_ENTRIES, 0);

/// Client deny lists: (service id, family, address prefix) -> ACL_HIT.
#[map(name = "XP_ACL_DENY")]
pub static XP_ACL_DENY: LpmTrie<AclKey, u32> = LpmTrie::with_max_entries(MAX_ACL_ENTRIES, 0);

/// New-flow token buckets per (service, client address).
#[map(name = "XP_RATE")]
pub static XP_RATE: LruHashMap<RateKey, RateState> =
    LruHashMap::with_max_entries(MAX_RATE_ENTRIES, 0);

/// Compile-time string equality (the map attribute needs a literal; this ties it to the constant).
const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = {
    assert!(same(MAP_CONFIG, "XP_CONFIG"));
    assert!(same(MAP_SERVICES, "XP_SERVICES"));
    assert!(same(MAP_UPSTREAMS, "XP_UPSTREAMS"));
    assert!(same(MAP_MAGLEV, "XP_MAGLEV"));
    assert!(same(MAP_FLOWS_FWD, "XP_FLOWS_FWD"));
    assert!(same(MAP_FLOWS_REV, "XP_FLOWS_REV"));
    assert!(same(MAP_DEVMAP, "XP_DEVMAP"));
    assert!(same(MAP_REASONS, "XP_REASONS"));
    assert!(same(MAP_SERVICE_STATS, "XP_SVC_STATS"));
    assert!(same(MAP_UPSTREAM_STATS, "XP_UPS_STATS"));
    assert!(same(MAP_SERVICE_OPTIONS, "XP_SVC_OPTS"));
    assert!(same(MAP_ACL_ALLOW, "XP_ACL_ALLOW"));
    assert!(same(MAP_ACL_DENY, "XP_ACL_DENY"));
    assert!(same(MAP_RATE, "XP_RATE"));
};
