//! Types shared by the xdp-proxy XDP program (`proxy-ebpf`) and its daemon (`proxy-userspace`).
//!
//! Everything that crosses the kernel/user boundary is defined here, once: map names, map sizes,
//! map key and value layouts, counter indices, and the pure helpers both sides must agree on
//! (flow hash, checksum arithmetic). Layout rules:
//! - `#[repr(C)]`, explicit `_pad` fields (always zeroed: padding takes part in hash lookups);
//! - no bool/enum/Option inside map values: plain integers with named constants;
//! - addresses and ports in network byte order as byte arrays;
//! - a size assert beside each struct, so a layout change is a compile error on both sides.
#![no_std]

pub mod checksum;
pub mod hash;

/// Version of the map layout. Part of the pin directory (`<pin_dir>/v<ABI_VERSION>`), so a daemon
/// with a different layout never reuses (and misreads) maps pinned by another version.
///
/// 5: `XP_REASONS` has [`REASON_SLOTS`] slots (it had one per reason, so every new reason
/// changed its size), and `XP_XMIT_DROPS` exists.
pub const ABI_VERSION: u32 = 5;

// ---------------------------------------------------------------------------------------------
// Program and map names (BPF object names: at most 15 characters).
// ---------------------------------------------------------------------------------------------

/// The XDP entry point.
pub const PROGRAM_NAME: &str = "proxy_xdp";
/// Service match: `ServiceKey` -> `ServiceValue`.
pub const MAP_SERVICES: &str = "XP_SERVICES";
/// Upstream slots: index (upstream id, slot 0 reserved = "none") -> `UpstreamValue`.
pub const MAP_UPSTREAMS: &str = "XP_UPSTREAMS";
/// Maglev lookup tables, one per service: index `service_id * MAGLEV_SIZE + slot` -> upstream id.
pub const MAP_MAGLEV: &str = "XP_MAGLEV";
/// Forward flows, keyed by the client's packet as it arrives: `FlowKey` -> `FlowValue`.
pub const MAP_FLOWS_FWD: &str = "XP_FLOWS_FWD";
/// Reverse flows, keyed by the upstream's reply as it arrives: `FlowKey` -> `FlowValue`.
/// Inserting here with BPF_NOEXIST is the SNAT port reservation.
pub const MAP_FLOWS_REV: &str = "XP_FLOWS_REV";
/// Datapath settings (one entry, index 0): `NatConfig`.
pub const MAP_CONFIG: &str = "XP_CONFIG";
/// Egress interfaces for XDP_REDIRECT: ifindex -> ifindex (DEVMAP_HASH).
pub const MAP_DEVMAP: &str = "XP_DEVMAP";
/// Per-CPU packet counters indexed by `Reason`.
pub const MAP_REASONS: &str = "XP_REASONS";
/// Frames the kernel failed to transmit after the program sent them (devmap flush, veth
/// `XDP_TX` flush), per egress ifindex, per CPU: `u32` -> `u64`. Written by the tracepoint
/// programs [`PROGRAM_DEVMAP_XMIT`] and [`PROGRAM_BULK_TX`].
pub const MAP_XMIT_DROPS: &str = "XP_XMIT_DROPS";
/// Tracepoint program on `xdp:xdp_devmap_xmit` (counts into [`MAP_XMIT_DROPS`]).
pub const PROGRAM_DEVMAP_XMIT: &str = "xp_devmap_xmit";
/// Tracepoint program on `xdp:xdp_bulk_tx` (counts into [`MAP_XMIT_DROPS`]).
pub const PROGRAM_BULK_TX: &str = "xp_bulk_tx";
/// Per-CPU traffic counters per service id: `TrafficCounters`.
pub const MAP_SERVICE_STATS: &str = "XP_SVC_STATS";
/// Per-CPU traffic counters per upstream id: `TrafficCounters`.
pub const MAP_UPSTREAM_STATS: &str = "XP_UPS_STATS";
/// Per-service options by service id: `ServiceOptions` (MSS clamp, ACL mode, new-flow rate).
pub const MAP_SERVICE_OPTIONS: &str = "XP_SVC_OPTS";
/// Client allow lists: LPM trie, `AclKey` (service id, family, address prefix) -> `ACL_HIT`.
pub const MAP_ACL_ALLOW: &str = "XP_ACL_ALLOW";
/// Client deny lists: LPM trie, same key and value as `MAP_ACL_ALLOW`.
pub const MAP_ACL_DENY: &str = "XP_ACL_DENY";
/// New-flow token buckets: LRU hash, `RateKey` (service id, client address) -> `RateState`.
pub const MAP_RATE: &str = "XP_RATE";
/// Rate limit of the program's log lines (one entry, index 0): `LogRate`. Not pinned: its state
/// only has to live as long as the loaded program.
pub const MAP_LOG_RATE: &str = "XP_LOG_RATE";

// ---------------------------------------------------------------------------------------------
// Sizes.
// ---------------------------------------------------------------------------------------------

/// Service ids are `1..MAX_SERVICES` (0 is never a valid service id).
pub const MAX_SERVICES: u32 = 64;
/// Upstream ids are `1..MAX_UPSTREAMS` (slot 0 reserved: "no upstream").
pub const MAX_UPSTREAMS: u32 = 1024;
/// Slots in each service's Maglev table. Prime, and much larger than the upstream count of any
/// one service so weights are honoured closely (Maglev paper: M >> N).
pub const MAGLEV_SIZE: u32 = 16_381;
/// Default capacity of each flow table (forward and reverse); the daemon may override it at load.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// Maximum number of interfaces in the redirect devmap.
pub const MAX_INTERFACES: u32 = 64;
/// Prefixes in each ACL trie (all services together).
pub const MAX_ACL_ENTRIES: u32 = 16_384;
/// Client addresses tracked by the new-flow rate limit (LRU: the least recently active go).
pub const MAX_RATE_ENTRIES: u32 = 65_536;
/// How many SNAT ports a new flow probes before it counts as exhaustion (bounded loop).
pub const SNAT_PORT_PROBES: u32 = 32;

// ---------------------------------------------------------------------------------------------
// Protocol numbers and address families, as stored in keys.
// ---------------------------------------------------------------------------------------------

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// An address as stored in keys and values: IPv4 uses the first 4 bytes, the other 12 are zero.
pub type Addr = [u8; 16];

/// Build an `Addr` from IPv4 octets.
#[inline(always)]
#[must_use]
pub const fn addr_v4(octets: [u8; 4]) -> Addr {
    [
        octets[0], octets[1], octets[2], octets[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]
}

/// The IPv4 octets of an `Addr` (its first 4 bytes).
#[inline(always)]
#[must_use]
pub const fn addr_v4_octets(addr: &Addr) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

// ---------------------------------------------------------------------------------------------
// Service map.
// ---------------------------------------------------------------------------------------------

/// Key of `XP_SERVICES`: a service's listen address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: [u8; 2],
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Value of `XP_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Index of the service's Maglev table and counters, `1..MAX_SERVICES`.
    pub id: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);

/// The service has at least one upstream in its Maglev table. Without it, new flows are passed
/// to the kernel (which resets a TCP connection at once) and counted as `Reason::PassNoUpstream`.
pub const SERVICE_F_HAS_UPSTREAMS: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Per-service options, client ACLs and new-flow rate limits.
// ---------------------------------------------------------------------------------------------

/// Value of `XP_SVC_OPTS[service id]`. All zero (the array's initial value) = no options.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceOptions {
    /// Largest TCP MSS option a SYN or SYN-ACK of the service may carry (host byte order);
    /// larger values are rewritten down to it. 0: no clamping.
    pub mss_clamp: u16,
    pub _pad0: u16,
    /// `SVC_OPT_F_*` bits.
    pub flags: u32,
    /// New flows per second each client address may open to this service; 0: no limit.
    pub new_flow_rate: u32,
    /// Token bucket depth: new flows a client may open at once after being idle (>= 1 when
    /// `new_flow_rate` is set).
    pub new_flow_burst: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceOptions>() == 16);

/// The service has an allow list: a new flow whose client matches no `XP_ACL_ALLOW` prefix of
/// the service is dropped (`Reason::DropAclNotAllowed`). Without it every client not denied is
/// allowed.
pub const SVC_OPT_F_ALLOW_LIST: u32 = 1;

/// The data part of an ACL trie key (aya's `lpm_trie::Key<AclKey>` adds the prefix length in
/// front). Matched most significant bit first, so `prefix_len = ACL_PREFIX_BASE + address
/// prefix length` makes the service id and family exact and the address a prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AclKey {
    /// Service id, big-endian (so its bits come first, in order).
    pub service_id: [u8; 4],
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    pub addr: Addr,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AclKey>() == 24);

/// Bits of an `AclKey` before the address: service id (32) and family (8).
pub const ACL_PREFIX_BASE: u32 = 40;
/// Value stored for every ACL prefix.
pub const ACL_HIT: u32 = 1;

/// Key of `XP_RATE`: one token bucket per (service, client address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RateKey {
    pub addr: Addr,
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<RateKey>() == 24);

/// Value of `XP_RATE`: a token bucket in nano-tokens (one new flow costs `RATE_TOKEN`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateState {
    pub tokens: u64,
    /// `bpf_ktime_get_ns()` of the last refill.
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RateState>() == 16);

/// Nano-tokens per new flow: a bucket refills `new_flow_rate` tokens per second, i.e.
/// `new_flow_rate` nano-tokens per nanosecond.
pub const RATE_TOKEN: u64 = 1_000_000_000;

/// Value of `XP_LOG_RATE[0]`: the SNAT-exhaustion log line is written at most once per
/// `LOG_INTERVAL_NS` and says how many drops it stands for. The exact count is the
/// `DropSnatExhausted` reason counter; this is only the log's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogRate {
    /// `bpf_ktime_get_ns()` of the last line (0: none yet).
    pub last_ns: u64,
    /// Exhaustion drops seen (atomic add on every drop).
    pub total: u64,
    /// `total` when the last line was written.
    pub logged: u64,
}
const _: () = assert!(core::mem::size_of::<LogRate>() == 24);

/// At most one SNAT-exhaustion log line per second.
pub const LOG_INTERVAL_NS: u64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------
// Upstream slots.
// ---------------------------------------------------------------------------------------------

/// Value of `XP_UPSTREAMS` (an array indexed by upstream id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UpstreamValue {
    pub addr: Addr,
    /// Network byte order.
    pub port: [u8; 2],
    pub family: u8,
    pub _pad0: u8,
    /// `UPSTREAM_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<UpstreamValue>() == 24);

/// The slot holds a configured upstream (slot contents are meaningless without it).
pub const UPSTREAM_F_ACTIVE: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Datapath settings.
// ---------------------------------------------------------------------------------------------

/// Value of `XP_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatConfig {
    /// The SNAT source address for IPv4 flows (`addr_v4` layout).
    pub snat_v4: Addr,
    /// SNAT source port range, inclusive, host byte order.
    pub port_min: u16,
    pub port_max: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// The SNAT source address for IPv6 flows (all 16 bytes). All zero: no IPv6 SNAT address,
    /// so no new IPv6 flow is created (the packet is passed and counted). Added in ABI 3.
    pub snat_v6: Addr,
}
const _: () = assert!(core::mem::size_of::<NatConfig>() == 40);

/// The config entry has been written by the daemon; until then every packet is passed.
pub const CONFIG_F_READY: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Flow tables.
// ---------------------------------------------------------------------------------------------

/// Key of both flow tables: a packet's 5-tuple exactly as it arrives at the proxy.
/// Forward entries are keyed by (client -> service), reverse entries by (upstream -> SNAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: Addr,
    pub dst_addr: Addr,
    /// Network byte order.
    pub src_port: [u8; 2],
    /// Network byte order.
    pub dst_port: [u8; 2],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of both flow tables: how to rewrite a packet that matched the key, plus bookkeeping.
/// The same rewrite code serves both directions: forward entries rewrite (client -> service) to
/// (SNAT -> upstream), reverse entries rewrite (upstream -> SNAT) to (service -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub new_src_addr: Addr,
    pub new_dst_addr: Addr,
    /// Network byte order.
    pub new_src_port: [u8; 2],
    /// Network byte order.
    pub new_dst_port: [u8; 2],
    /// `FLOW_DIR_*`.
    pub direction: u8,
    pub _pad0: [u8; 3],
    /// `FLOW_F_*` bits: TCP state as seen by the datapath. Set in both entries of a flow.
    pub flags: u32,
    pub service_id: u32,
    pub upstream_id: u32,
    pub _pad1: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the flow was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet in this direction.
    pub last_seen_ns: u64,
    /// Packets and bytes (IP length) in this entry's direction.
    pub packets: u64,
    pub bytes: u64,
    /// Next-hop cache, written by the datapath only (docs/datapath.md, step 9): the
    /// `bpf_ktime_get_ns()` of the last successful `bpf_fib_lookup` for this entry (0: none).
    /// The cache is used while younger than `NEXT_HOP_VALID_NS`.
    pub nh_checked_ns: u64,
    /// Egress ifindex of that lookup.
    pub nh_ifindex: u32,
    /// Largest IP length the cached lookup accepted (its MTU check); longer packets look up again.
    pub nh_len: u16,
    /// Destination and source MAC of that lookup.
    pub nh_dmac: [u8; 6],
    pub nh_smac: [u8; 6],
    pub _pad2: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 120);

/// How long a flow entry's cached next hop (`FlowValue::nh_*`) is used before the datapath runs
/// `bpf_fib_lookup` (and the step-5 repair check) again: 100 ms.
pub const NEXT_HOP_VALID_NS: u64 = 100_000_000;

pub const FLOW_DIR_FORWARD: u8 = 0;
pub const FLOW_DIR_REPLY: u8 = 1;

// TCP states (docs/datapath.md, "TCP states"), from the union of a flow's flags:
// - SYN sent: no flag;
// - SYN received: `FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED` (the upstream answered, the client has
//   not acknowledged yet);
// - established: `FLOW_F_REPLIED` without `FLOW_F_SYN_RECEIVED`;
// - half-closed / closed: `FLOW_F_FIN_*` (counted only on an established flow; which side was
//   first: `FLOW_F_FIN_UPSTREAM_FIRST`), `FLOW_F_RST`.

/// A packet was seen from the upstream (the reverse entry has matched at least once).
pub const FLOW_F_REPLIED: u32 = 1;
/// The client sent FIN (on an established flow).
pub const FLOW_F_FIN_CLIENT: u32 = 1 << 1;
/// The upstream sent FIN (on an established flow).
pub const FLOW_F_FIN_UPSTREAM: u32 = 1 << 2;
/// Either side sent RST.
pub const FLOW_F_RST: u32 = 1 << 3;
/// TCP: set together with `FLOW_F_REPLIED` by the first reply (the SYN-ACK), cleared by the
/// client's next segment with ACK (no SYN, no RST): the handshake is complete. So `REPLIED`
/// alone means established, which is also how entries written before this bit existed (ABI 4,
/// same layout) read after an upgrade.
pub const FLOW_F_SYN_RECEIVED: u32 = 1 << 4;
/// TCP: the upstream's FIN came before the client's (set with `FLOW_F_FIN_UPSTREAM` when
/// `FLOW_F_FIN_CLIENT` is not set yet). The upstream is then the active closer, the side that
/// holds TIME_WAIT for the (upstream, SNAT address, SNAT port) 4-tuple, so only then does the
/// closed flow keep its SNAT port through the TIME_WAIT hold.
pub const FLOW_F_FIN_UPSTREAM_FIRST: u32 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------------------------

/// Per service / per upstream traffic counters (per CPU; readers sum).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    /// Client -> upstream packets and bytes (IP length).
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    /// Upstream -> client packets and bytes.
    pub rev_packets: u64,
    pub rev_bytes: u64,
    /// Flows created.
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 40);

/// Why the program returned what it returned. Each packet bumps exactly one reason counter,
/// once, at exit. Indices are stable: they are the `XP_REASONS` array index and a metric label.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Forwarded client -> upstream with XDP_TX.
    FwdTx = 0,
    /// Forwarded client -> upstream with XDP_REDIRECT.
    FwdRedirect = 1,
    /// Forwarded upstream -> client with XDP_TX.
    RevTx = 2,
    /// Forwarded upstream -> client with XDP_REDIRECT.
    RevRedirect = 3,
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, ...): passed.
    PassNotIp = 4,
    /// IPv4/IPv6 but neither TCP nor UDP, and not an ICMP error the program translates (echo
    /// requests, NDP, other ICMP/ICMPv6, GRE, ...): passed.
    PassNotTcpUdp = 5,
    /// TCP/UDP but not a configured service and no flow: passed untouched.
    PassNotService = 6,
    /// IPv4 header with options (IHL > 5), or an IPv6 header followed by an extension header
    /// other than Fragment (hop-by-hop, routing, destination options, ...): never rewritten,
    /// passed.
    PassIpOptions = 7,
    /// IPv4 fragment, or IPv6 with a Fragment header: never rewritten, passed.
    PassFragment = 8,
    /// TCP segment without SYN to a service and no flow: passed (the kernel answers RST).
    PassMidflowNoFlow = 9,
    /// New flow to a service with no upstream: passed (the kernel answers RST).
    PassNoUpstream = 10,
    /// Rewritten, but the next hop has no neighbour entry yet: passed to the kernel, which
    /// resolves it and forwards (needs accept_local on the interface; see DESIGN.md).
    PassNoNeigh = 11,
    /// Rewritten, but the FIB lookup failed otherwise (no route, blackhole, MTU): passed.
    PassFibFailed = 12,
    /// The datapath has not been configured yet: passed.
    PassNotReady = 13,
    /// Frame too short for the headers it claims: dropped.
    DropTruncated = 14,
    /// TTL (IPv6: hop limit) would reach zero: dropped.
    DropTtlExceeded = 15,
    /// No free SNAT port within the probe budget: dropped (never a reused port).
    DropSnatExhausted = 16,
    /// The forward flow entry could not be written: reservation rolled back, dropped.
    DropFlowInsertFailed = 17,
    /// A Maglev slot pointed at an empty upstream slot: dropped.
    DropBadUpstream = 18,
    /// Redirect target interface missing from the devmap: dropped.
    DropRedirectFailed = 19,
    /// Internal invariant broken (map lookup of an array index failed): aborted.
    Aborted = 20,
    /// An ICMP error quoting a NATed packet, translated and sent with XDP_TX.
    IcmpTx = 21,
    /// An ICMP error quoting a NATed packet, translated and sent with XDP_REDIRECT.
    IcmpRedirect = 22,
    /// A new flow from a client on the service's deny list: dropped.
    DropAclDenied = 23,
    /// A new flow from a client not on the service's allow list: dropped.
    DropAclNotAllowed = 24,
    /// A new flow over the client's new-flow rate for the service: dropped.
    DropRateLimited = 25,
    /// A new IPv6 flow while no IPv6 SNAT address is configured (`NatConfig::snat_v6` all
    /// zero): passed, no flow created.
    PassNoSnatV6 = 26,
    /// An IPv6 UDP datagram with checksum 0 (invalid in IPv6, RFC 8200 section 8.1) that
    /// belongs to a flow or a service: dropped (its checksum cannot be patched incrementally).
    DropUdpZeroChecksum = 27,
    /// A TCP/UDP packet to the SNAT address at a port inside the SNAT port range that matches
    /// no flow (an upstream's segment for a flow that expired or never existed, or a spoofed
    /// one): dropped, never handed to the kernel. The host's own connections use ports outside
    /// the range (the daemon refuses an overlap with the kernel's ephemeral range).
    DropNoFlowSnatPort = 28,
    /// The route to the packet's destination leaves through an interface outside `XP_DEVMAP`
    /// (one the daemon does not run): passed to the kernel rewritten (TTL and MACs untouched),
    /// which forwards it by its own routing.
    PassOutsideDevmap = 29,
}

/// Number of `Reason` values.
pub const REASON_COUNT: u32 = 30;
/// Slots of `XP_REASONS`: more than there are reasons, so a new reason leaves the pinned map's
/// layout as it is (a pinned map whose size changed cannot be reused across an upgrade).
pub const REASON_SLOTS: u32 = 64;
const _: () = assert!(REASON_COUNT <= REASON_SLOTS);

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::FwdTx,
        Reason::FwdRedirect,
        Reason::RevTx,
        Reason::RevRedirect,
        Reason::PassNotIp,
        Reason::PassNotTcpUdp,
        Reason::PassNotService,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::PassMidflowNoFlow,
        Reason::PassNoUpstream,
        Reason::PassNoNeigh,
        Reason::PassFibFailed,
        Reason::PassNotReady,
        Reason::DropTruncated,
        Reason::DropTtlExceeded,
        Reason::DropSnatExhausted,
        Reason::DropFlowInsertFailed,
        Reason::DropBadUpstream,
        Reason::DropRedirectFailed,
        Reason::Aborted,
        Reason::IcmpTx,
        Reason::IcmpRedirect,
        Reason::DropAclDenied,
        Reason::DropAclNotAllowed,
        Reason::DropRateLimited,
        Reason::PassNoSnatV6,
        Reason::DropUdpZeroChecksum,
        Reason::DropNoFlowSnatPort,
        Reason::PassOutsideDevmap,
    ];

    /// Stable snake_case name, used as a metric label and in `inspect stats`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Reason::FwdTx => "fwd_tx",
            Reason::FwdRedirect => "fwd_redirect",
            Reason::RevTx => "rev_tx",
            Reason::RevRedirect => "rev_redirect",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassNotService => "pass_not_service",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::PassMidflowNoFlow => "pass_midflow_no_flow",
            Reason::PassNoUpstream => "pass_no_upstream",
            Reason::PassNoNeigh => "pass_no_neigh",
            Reason::PassFibFailed => "pass_fib_failed",
            Reason::PassNotReady => "pass_not_ready",
            Reason::DropTruncated => "drop_truncated",
            Reason::DropTtlExceeded => "drop_ttl_exceeded",
            Reason::DropSnatExhausted => "drop_snat_exhausted",
            Reason::DropFlowInsertFailed => "drop_flow_insert_failed",
            Reason::DropBadUpstream => "drop_bad_upstream",
            Reason::DropRedirectFailed => "drop_redirect_failed",
            Reason::Aborted => "aborted",
            Reason::IcmpTx => "icmp_tx",
            Reason::IcmpRedirect => "icmp_redirect",
            Reason::DropAclDenied => "drop_acl_denied",
            Reason::DropAclNotAllowed => "drop_acl_not_allowed",
            Reason::DropRateLimited => "drop_rate_limited",
            Reason::PassNoSnatV6 => "pass_no_snat_v6",
            Reason::DropUdpZeroChecksum => "drop_udp_zero_checksum",
            Reason::DropNoFlowSnatPort => "drop_no_flow_snat_port",
            Reason::PassOutsideDevmap => "pass_outside_devmap",
        }
    }

    /// The XDP action this reason implies.
    #[must_use]
    pub const fn action(self) -> u32 {
        match self {
            Reason::FwdTx | Reason::RevTx | Reason::IcmpTx => XDP_TX,
            Reason::FwdRedirect | Reason::RevRedirect | Reason::IcmpRedirect => XDP_REDIRECT,
            Reason::PassNotIp
            | Reason::PassNotTcpUdp
            | Reason::PassNotService
            | Reason::PassIpOptions
            | Reason::PassFragment
            | Reason::PassMidflowNoFlow
            | Reason::PassNoUpstream
            | Reason::PassNoNeigh
            | Reason::PassFibFailed
            | Reason::PassNotReady
            | Reason::PassNoSnatV6
            | Reason::PassOutsideDevmap => XDP_PASS,
            Reason::DropTruncated
            | Reason::DropTtlExceeded
            | Reason::DropSnatExhausted
            | Reason::DropFlowInsertFailed
            | Reason::DropBadUpstream
            | Reason::DropRedirectFailed
            | Reason::DropAclDenied
            | Reason::DropAclNotAllowed
            | Reason::DropRateLimited
            | Reason::DropUdpZeroChecksum
            | Reason::DropNoFlowSnatPort => XDP_DROP,
            Reason::Aborted => XDP_ABORTED,
        }
    }
}

const _: () = assert!(Reason::ALL.len() == REASON_COUNT as usize);

/// XDP actions (uapi `enum xdp_action`).
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

// ---------------------------------------------------------------------------------------------
// aya::Pod for the daemon.
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): repr(C), integers and byte arrays only, explicit padding fields,
    // sizes asserted above; any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::UpstreamValue {}
    unsafe impl aya::Pod for super::NatConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::TrafficCounters {}
    unsafe impl aya::Pod for super::ServiceOptions {}
    unsafe impl aya::Pod for super::AclKey {}
    unsafe impl aya::Pod for super::RateKey {}
    unsafe impl aya::Pod for super::RateState {}
    unsafe impl aya::Pod for super::LogRate {}
}
