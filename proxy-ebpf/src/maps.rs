//! Every map of the XDP program. Names, sizes and layouts come from `proxy-common`, so the daemon
//! and the program agree; the `#[btf_map(name = ...)]` attribute takes a string literal, so each
//! name is checked against its `proxy-common` constant at compile time.
//!
//! All maps are BTF-defined (`aya_ebpf::btf_maps`, ELF section `.maps`): the object's BTF carries
//! each map's key and value types, aya creates the maps with `btf_key_type_id`/`btf_value_type_id`,
//! and `bpftool map dump` on a pinned map prints named fields. Capacities are const generics here;
//! the daemon still overrides the flow tables' `max_entries` at load time
//! (`EbpfLoader::map_max_entries`, which aya applies to BTF maps as well).
//!
//! None of these maps is pinned by the object: the daemon decides where (and whether) to pin.

use aya_ebpf::{
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    macros::btf_map,
};
use proxy_common::{
    AclKey, DEFAULT_MAX_FLOWS, FlowKey, FlowValue, LogRate, MAGLEV_SIZE, MAP_ACL_ALLOW,
    MAP_ACL_DENY, MAP_CONFIG, MAP_DEVMAP, MAP_FLOWS_FWD, MAP_FLOWS_REV, MAP_LOG_RATE, MAP_MAGLEV,
    MAP_RATE, MAP_REASONS, MAP_SERVICE_OPTIONS, MAP_SERVICE_STATS, MAP_SERVICES,
    MAP_UPSTREAM_STATS, MAP_UPSTREAMS, MAP_XMIT_DROPS, MAX_ACL_ENTRIES, MAX_INTERFACES,
    MAX_RATE_ENTRIES, MAX_SERVICES, MAX_UPSTREAMS, NatConfig, REASON_SLOTS, RateKey, RateState,
    ServiceKey, ServiceOptions, ServiceValue, TrafficCounters, UpstreamValue,
};

/// Capacities as const generics (the `proxy-common` constants are `u32`).
const SERVICES: usize = MAX_SERVICES as usize;
const UPSTREAMS: usize = MAX_UPSTREAMS as usize;
const MAGLEV_ENTRIES: usize = (MAX_SERVICES * MAGLEV_SIZE) as usize;
const FLOWS: usize = DEFAULT_MAX_FLOWS as usize;
const INTERFACES: usize = MAX_INTERFACES as usize;
const REASONS: usize = REASON_SLOTS as usize;
const ACL_ENTRIES: usize = MAX_ACL_ENTRIES as usize;
const RATE_ENTRIES: usize = MAX_RATE_ENTRIES as usize;

/// Datapath settings: index 0 -> `NatConfig` (SNAT address, port range, ready flag).
#[btf_map(name = "XP_CONFIG")]
pub static XP_CONFIG: Array<NatConfig, 1> = Array::new();

/// Service match: (listen address, port, protocol) -> service id and flags.
#[btf_map(name = "XP_SERVICES")]
pub static XP_SERVICES: HashMap<ServiceKey, ServiceValue, SERVICES> = HashMap::new();

/// Upstream slots by id (slot 0 reserved: "no upstream").
#[btf_map(name = "XP_UPSTREAMS")]
pub static XP_UPSTREAMS: Array<UpstreamValue, UPSTREAMS> = Array::new();

/// Maglev tables: `service_id * MAGLEV_SIZE + slot` -> upstream id (0 = none).
#[btf_map(name = "XP_MAGLEV")]
pub static XP_MAGLEV: Array<u32, MAGLEV_ENTRIES> = Array::new();

/// Forward flows, keyed by the client's packet (client -> service). `DEFAULT_MAX_FLOWS` is the
/// object's default; the daemon sets the real capacity at load time.
#[btf_map(name = "XP_FLOWS_FWD")]
pub static XP_FLOWS_FWD: LruHashMap<FlowKey, FlowValue, FLOWS> = LruHashMap::new();

/// Reverse flows, keyed by the upstream's reply (upstream -> SNAT); inserting here with
/// BPF_NOEXIST is the SNAT port reservation.
#[btf_map(name = "XP_FLOWS_REV")]
pub static XP_FLOWS_REV: LruHashMap<FlowKey, FlowValue, FLOWS> = LruHashMap::new();

/// Egress interfaces for XDP_REDIRECT: ifindex -> `bpf_devmap_val` (ifindex, no program).
#[btf_map(name = "XP_DEVMAP")]
pub static XP_DEVMAP: DevMapHash<INTERFACES> = DevMapHash::new();

/// Frames the kernel failed to transmit after the program sent them, per egress ifindex
/// (per CPU): written by the `xdp` tracepoint programs (`delivery.rs`), only for interfaces in
/// `XP_DEVMAP`.
#[btf_map(name = "XP_XMIT_DROPS")]
pub static XP_XMIT_DROPS: PerCpuHashMap<u32, u64, INTERFACES> = PerCpuHashMap::new();

/// Per-CPU packet counters indexed by `Reason`, bumped once per packet at exit.
#[btf_map(name = "XP_REASONS")]
pub static XP_REASONS: PerCpuArray<u64, REASONS> = PerCpuArray::new();

/// Per-CPU traffic counters per service id.
#[btf_map(name = "XP_SVC_STATS")]
pub static XP_SVC_STATS: PerCpuArray<TrafficCounters, SERVICES> = PerCpuArray::new();

/// Per-CPU traffic counters per upstream id.
#[btf_map(name = "XP_UPS_STATS")]
pub static XP_UPS_STATS: PerCpuArray<TrafficCounters, UPSTREAMS> = PerCpuArray::new();

/// Per-service options by service id (MSS clamp, ACL mode, new-flow rate).
#[btf_map(name = "XP_SVC_OPTS")]
pub static XP_SVC_OPTS: Array<ServiceOptions, SERVICES> = Array::new();

/// Client allow lists: (service id, family, address prefix) -> ACL_HIT. The trie's flags default
/// to `BPF_F_NO_PREALLOC` (the kernel requires it), as the legacy declaration's did.
#[btf_map(name = "XP_ACL_ALLOW")]
pub static XP_ACL_ALLOW: LpmTrie<AclKey, u32, ACL_ENTRIES> = LpmTrie::new();

/// Client deny lists: (service id, family, address prefix) -> ACL_HIT.
#[btf_map(name = "XP_ACL_DENY")]
pub static XP_ACL_DENY: LpmTrie<AclKey, u32, ACL_ENTRIES> = LpmTrie::new();

/// New-flow token buckets per (service, client address).
#[btf_map(name = "XP_RATE")]
pub static XP_RATE: LruHashMap<RateKey, RateState, RATE_ENTRIES> = LruHashMap::new();

/// Rate limit of the SNAT-exhaustion log line: index 0 -> `LogRate`.
#[btf_map(name = "XP_LOG_RATE")]
pub static XP_LOG_RATE: Array<LogRate, 1> = Array::new();

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
    assert!(same(MAP_XMIT_DROPS, "XP_XMIT_DROPS"));
    assert!(same(MAP_REASONS, "XP_REASONS"));
    assert!(same(MAP_SERVICE_STATS, "XP_SVC_STATS"));
    assert!(same(MAP_UPSTREAM_STATS, "XP_UPS_STATS"));
    assert!(same(MAP_SERVICE_OPTIONS, "XP_SVC_OPTS"));
    assert!(same(MAP_ACL_ALLOW, "XP_ACL_ALLOW"));
    assert!(same(MAP_ACL_DENY, "XP_ACL_DENY"));
    assert!(same(MAP_RATE, "XP_RATE"));
    assert!(same(MAP_LOG_RATE, "XP_LOG_RATE"));
};
