//! Packet tests: every fast-path case of docs/datapath.md run through the real XDP object with
//! `BPF_PROG_TEST_RUN`, maps filled by the test, in a private network namespace whose routes and
//! permanent neighbour entries make `bpf_fib_lookup` deterministic (see
//! `integration_tests::packet::topo`).
//!
//! Each case asserts the verdict, the exact output bytes (built independently from the
//! contract), the output's IP and L4 checksums by full recomputation, the `XP_REASONS` counter of
//! its reason, and where relevant the flow entries of both tables and the service/upstream
//! counters. Request -> reply cases are chained through stored state: the reply is addressed to
//! the SNAT port the program stored in its forward entry. A failing case prints the input frame
//! as hex with its `xdp_md` context, the expected and actual frames and a field-named diff.
//!
//! Observed kernel behaviour (6.18) the cases rely on:
//! - `BPF_PROG_TEST_RUN` without live frames returns the program's verdict as is and transmits
//!   nothing: XDP_TX and XDP_REDIRECT come back as return values 3 and 4 with the rewritten
//!   frame in `data_out`. Whether `bpf_redirect_map` succeeds is decided by the `XP_DEVMAP`
//!   entry (filled with the namespace's ifindexes by the harness).
//! - `data_in` shorter than 14 bytes is refused (EINVAL) before the program runs; a short
//!   linear part is still reachable with `xdp_md.data_end` < `data_in` length (the rest becomes
//!   a fragment), which is how the truncated-Ethernet case is fed.
//!
//! Run as root: `cargo test -p integration-tests --test packet`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use integration_tests::packet::topo::*;
use integration_tests::packet::{
    ETH_HLEN, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Expect, Fixture, Harness, IP_DF, IP_MF,
    IPPROTO_ICMP, Iface, IpFam, Mac, NH_STALE, Packet, RunResult, Sock, TCP_ACK, TCP_FIN, TCP_PSH,
    TCP_RST, TCP_SYN, Tuple, assert_flow, assert_time_within, fix_ip_checksum, flow_value, mono_ns,
    nh_fresh, raw_frame, set_u16, upstream, with_harness, without_next_hop,
};
use proxy_common::{
    FLOW_DIR_FORWARD, FLOW_DIR_REPLY, FLOW_F_FIN_CLIENT, FLOW_F_FIN_UPSTREAM,
    FLOW_F_FIN_UPSTREAM_FIRST, FLOW_F_REPLIED, FLOW_F_RST, FLOW_F_SYN_RECEIVED, FlowValue,
    IPPROTO_TCP, IPPROTO_UDP, LOG_INTERVAL_NS, LogRate, MAP_FLOWS_FWD, MAP_FLOWS_REV,
    MAX_UPSTREAMS, NatConfig, RATE_TOKEN, RateState, Reason, SVC_OPT_F_ALLOW_LIST, ServiceOptions,
    TrafficCounters, UpstreamValue, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, checksum,
};

// =============================================================================================
// Shared helpers.
// =============================================================================================

const CLIENT_A: SocketAddrV4 = SocketAddrV4::new(CLIENT_1, 40_000);
const CLIENT_B: SocketAddrV4 = SocketAddrV4::new(CLIENT_2, 51_515);
const CLIENT6_A: SocketAddrV6 = SocketAddrV6::new(CLIENT6_1, 40_000, 0, 0);
const CLIENT6_B: SocketAddrV6 = SocketAddrV6::new(CLIENT6_2, 51_515, 0, 0);

/// The address family a case body runs in: the topology's addresses of that family.
trait Fam: Sock {
    /// The IP header length (IPv4 without options, IPv6 fixed header).
    const IP_HLEN: usize;
    const SNAT: Self::Ip;
    const CLIENT_A: Self;
    const CLIENT_B: Self;
    const SVC_TCP: Self;
    const SVC_UDP: Self;
    const UPS_TCP: Self;
    const UPS_UDP: Self;
    const UPS_TCP_ID: u32;
    const UPS_UDP_ID: u32;
    const UPS_TCP_2: Self;
    const UPS_TCP_2_ID: u32;
    const SVC_EMPTY: Self;
    const SVC_NO_NEIGH: Self;
    const UPS_NO_NEIGH: Self;
    const UPS_NO_NEIGH_ID: u32;
    const SVC_NO_ROUTE: Self;
    const UPS_NO_ROUTE: Self;
    const UPS_NO_ROUTE_ID: u32;
    /// A client address no flow of the tests uses.
    const STRANGER: Self::Ip;
    /// A client network holding CLIENT_A and CLIENT_B, but not OUTSIDE (routed to the client
    /// side).
    const ALLOW_NET: Self::Ip;
    const ALLOW_LEN: u32;
    const OUTSIDE: Self::Ip;
}

impl Fam for SocketAddrV4 {
    const IP_HLEN: usize = 20;
    const SNAT: Ipv4Addr = SNAT_IP;
    const CLIENT_A: Self = CLIENT_A;
    const CLIENT_B: Self = CLIENT_B;
    const SVC_TCP: Self = SVC_TCP;
    const SVC_UDP: Self = SVC_UDP;
    const UPS_TCP: Self = UPS_TCP;
    const UPS_UDP: Self = UPS_UDP;
    const UPS_TCP_ID: u32 = UPS_TCP_ID;
    const UPS_UDP_ID: u32 = UPS_UDP_ID;
    const UPS_TCP_2: Self = UPS_TCP_2;
    const UPS_TCP_2_ID: u32 = UPS_TCP_2_ID;
    const SVC_EMPTY: Self = SVC_EMPTY;
    const SVC_NO_NEIGH: Self = SVC_NO_NEIGH;
    const UPS_NO_NEIGH: Self = UPS_NO_NEIGH;
    const UPS_NO_NEIGH_ID: u32 = UPS_NO_NEIGH_ID;
    const SVC_NO_ROUTE: Self = SVC_NO_ROUTE;
    const UPS_NO_ROUTE: Self = UPS_NO_ROUTE;
    const UPS_NO_ROUTE_ID: u32 = UPS_NO_ROUTE_ID;
    const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 99);
    const ALLOW_NET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);
    const ALLOW_LEN: u32 = 25;
    const OUTSIDE: Ipv4Addr = CLIENT_200;
}

impl Fam for SocketAddrV6 {
    const IP_HLEN: usize = 40;
    const SNAT: Ipv6Addr = SNAT_IP6;
    const CLIENT_A: Self = CLIENT6_A;
    const CLIENT_B: Self = CLIENT6_B;
    const SVC_TCP: Self = SVC6_TCP;
    const SVC_UDP: Self = SVC6_UDP;
    const UPS_TCP: Self = UPS6_TCP;
    const UPS_UDP: Self = UPS6_UDP;
    const UPS_TCP_ID: u32 = UPS6_TCP_ID;
    const UPS_UDP_ID: u32 = UPS6_UDP_ID;
    const UPS_TCP_2: Self = UPS6_TCP_2;
    const UPS_TCP_2_ID: u32 = UPS6_TCP_2_ID;
    const SVC_EMPTY: Self = SVC6_EMPTY;
    const SVC_NO_NEIGH: Self = SVC6_NO_NEIGH;
    const UPS_NO_NEIGH: Self = UPS6_NO_NEIGH;
    const UPS_NO_NEIGH_ID: u32 = UPS6_NO_NEIGH_ID;
    const SVC_NO_ROUTE: Self = SVC6_NO_ROUTE;
    const UPS_NO_ROUTE: Self = UPS6_NO_ROUTE;
    const UPS_NO_ROUTE_ID: u32 = UPS6_NO_ROUTE_ID;
    const STRANGER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x99);
    const ALLOW_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x5100, 0, 0, 0, 0, 0);
    const ALLOW_LEN: u32 = 65;
    const OUTSIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x5100, 0, 0x8000, 0, 0, 0x200);
}

type V4 = SocketAddrV4;
type V6 = SocketAddrV6;

/// A frame as the client-side router delivers it to `xpc`.
fn from_client<S: Sock>(p: Packet<S>) -> Packet<S> {
    p.macs(CLIENT_ROUTER_MAC, CLIENT_DEV_MAC)
}

/// A frame as the upstream host delivers it to `xph`.
fn from_upstream<S: Sock>(p: Packet<S>) -> Packet<S> {
    p.macs(UPSTREAM_MAC, HOME_DEV_MAC)
}

/// What a forwarded packet must look like: endpoints rewritten, TTL decremented, MACs from the
/// FIB lookup (egress interface's own, next hop's), checksums recomputed in full.
fn forwarded<S: Sock>(p: &Packet<S>, src: S, dst: S, egress: Iface, next_hop: Mac) -> Vec<u8> {
    p.clone()
        .endpoints(src, dst)
        .ttl(p.ttl - 1)
        .macs(egress.mac, next_hop)
        .bytes()
}

/// What a packet passed after its flow matched must look like (NO_NEIGH, FIB failure):
/// endpoints rewritten and checksums fixed, TTL and MACs untouched.
fn rewritten_only<S: Sock>(p: &Packet<S>, src: S, dst: S) -> Vec<u8> {
    p.clone().endpoints(src, dst).bytes()
}

/// One NATed flow as the tests know it. `snat` always comes from the program's stored forward
/// entry, so replies are chained through stored state.
#[derive(Clone, Copy, Debug)]
struct Flow<S: Fam = SocketAddrV4> {
    client: S,
    service: S,
    upstream: S,
    snat: S,
    proto: u8,
    service_id: u32,
    upstream_id: u32,
}

impl<S: Fam> Flow<S> {
    fn fwd_tuple(&self) -> Tuple<S> {
        Tuple::new(self.client, self.service, self.proto)
    }

    fn rev_tuple(&self) -> Tuple<S> {
        Tuple::new(self.upstream, self.snat, self.proto)
    }

    /// The forward entry the contract says a new flow gets (before any packet counting).
    fn fwd_value(&self, flags: u32) -> FlowValue {
        FlowValue {
            flags,
            ..flow_value(
                self.snat,
                self.upstream,
                FLOW_DIR_FORWARD,
                self.service_id,
                self.upstream_id,
            )
        }
    }

    fn rev_value(&self, flags: u32) -> FlowValue {
        FlowValue {
            flags,
            ..flow_value(
                self.service,
                self.client,
                FLOW_DIR_REPLY,
                self.service_id,
                self.upstream_id,
            )
        }
    }

    /// A TCP segment from the client to the service.
    fn client_tcp(&self, flags: u8) -> Packet<S> {
        from_client(Packet::tcp(self.client, self.service, flags))
    }

    /// A TCP segment from the upstream to the SNAT address and port.
    fn upstream_tcp(&self, flags: u8) -> Packet<S> {
        from_upstream(Packet::tcp(self.upstream, self.snat, flags))
            .seq_ack(0x5000_0001, 0x1000_0002)
    }

    /// Expected output of a client packet forwarded out of `egress` to the upstream.
    fn fwd_out(&self, p: &Packet<S>, egress: Iface) -> Vec<u8> {
        forwarded(p, self.snat, self.upstream, egress, UPSTREAM_MAC)
    }

    /// Expected output of an upstream packet forwarded out of `egress` to the client router.
    fn rev_out(&self, p: &Packet<S>, egress: Iface) -> Vec<u8> {
        forwarded(p, self.service, self.client, egress, CLIENT_ROUTER_MAC)
    }
}

/// The first SNAT port a new flow with `tuple` to `ups` may take, given the reverse entries
/// already in the map (docs/datapath.md step 7: probe order, first free reverse key).
fn expected_snat_port<S: Fam>(h: &Harness, tuple: &Tuple<S>, ups: S) -> Option<u16> {
    tuple.snat_probe_ports(&h.config).into_iter().find(|&port| {
        let key = Tuple::new(ups, S::sock(S::SNAT, port), tuple.proto).key();
        h.rev_flow(&key).is_none()
    })
}

/// Open a new flow with its first packet `first` (a TCP SYN or any UDP datagram) arriving on
/// `ingress`, steered to upstream `upstream_id`, and assert everything step 7 promises: the
/// rewritten output (out of `egress`), reason `reason`, both flow entries, the counters. Returns
/// the flow with the SNAT port read back from the stored forward entry.
#[allow(clippy::too_many_arguments)]
fn open_flow<S: Fam>(
    h: &mut Harness,
    desc: &str,
    first: Packet<S>,
    service_id: u32,
    upstream_addr: S,
    upstream_id: u32,
    ingress: Iface,
    egress: Iface,
    action: u32,
    reason: Reason,
) -> (Flow<S>, RunResult) {
    let t = first.tuple();
    h.steer(&t, service_id, upstream_id);
    let port = expected_snat_port(h, &t, upstream_addr)
        .unwrap_or_else(|| panic!("{desc}: every probed SNAT port is taken"));
    let expected = Flow {
        client: t.src,
        service: t.dst,
        upstream: upstream_addr,
        snat: S::sock(S::SNAT, port),
        proto: t.proto,
        service_id,
        upstream_id,
    };
    let svc_before = h.svc_stats(service_id);
    let ups_before = h.ups_stats(upstream_id);
    let out = if matches!(
        reason,
        Reason::PassNoNeigh | Reason::PassFibFailed | Reason::PassOutsideDevmap
    ) {
        rewritten_only(&first, expected.snat, expected.upstream)
    } else {
        expected.fwd_out(&first, egress)
    };
    let run = h.check(&Fixture::new(
        desc,
        first.bytes(),
        ingress,
        action,
        reason,
        Expect::Bytes(out),
    ));

    // The stored forward entry: chained state for every later packet of this flow.
    let fwd = h
        .fwd_flow(&expected.fwd_tuple().key())
        .unwrap_or_else(|| panic!("{desc}: no forward entry for {:?}", expected.fwd_tuple()));
    let stored_port = u16::from_be_bytes(fwd.new_src_port);
    assert_eq!(
        stored_port, port,
        "{desc}: SNAT port: expected {port} (first free probe of flow_hash(SEED_SNAT_PORT)), \
         stored {stored_port}"
    );
    let flow = Flow {
        snat: S::sock(S::SNAT, stored_port),
        ..expected
    };
    let len = u64::from(first.ip_len());
    // Docs step 7 then 8: the new forward entry is the flow's entry for this first packet.
    let fwd = assert_flow(
        &format!("{desc}: forward entry"),
        Some(fwd),
        &FlowValue {
            packets: 1,
            bytes: len,
            ..flow.fwd_value(0)
        },
    );
    assert_time_within(&format!("{desc}: forward created_ns"), fwd.created_ns, &run);
    assert_time_within(
        &format!("{desc}: forward last_seen_ns"),
        fwd.last_seen_ns,
        &run,
    );
    let rev = assert_flow(
        &format!("{desc}: reverse entry"),
        h.rev_flow(&flow.rev_tuple().key()),
        &flow.rev_value(0),
    );
    assert_time_within(&format!("{desc}: reverse created_ns"), rev.created_ns, &run);
    assert_eq!(
        rev.created_ns, rev.last_seen_ns,
        "{desc}: reverse entry: created_ns = last_seen_ns until a reply"
    );
    let plus = |c: TrafficCounters| TrafficCounters {
        fwd_packets: c.fwd_packets + 1,
        fwd_bytes: c.fwd_bytes + len,
        new_flows: c.new_flows + 1,
        ..c
    };
    assert_eq!(
        h.svc_stats(service_id),
        plus(svc_before),
        "{desc}: XP_SVC_STATS[{service_id}]"
    );
    assert_eq!(
        h.ups_stats(upstream_id),
        plus(ups_before),
        "{desc}: XP_UPS_STATS[{upstream_id}]"
    );
    (flow, run)
}

/// Open the standard TCP flow CLIENT_A -> service 1 -> upstream 1, SYN arriving on the client
/// side and redirected to the home side.
fn open_tcp(h: &mut Harness) -> Flow {
    open_tcp_in::<V4>(h)
}

/// `open_tcp` in family `S`.
fn open_tcp_in<S: Fam>(h: &mut Harness) -> Flow<S> {
    let (ci, hi) = (h.client_if, h.home_if);
    let syn = from_client(Packet::tcp(S::CLIENT_A, S::SVC_TCP, TCP_SYN));
    open_flow(
        h,
        "TCP SYN, new flow",
        syn,
        SVC_TCP_ID,
        S::UPS_TCP,
        S::UPS_TCP_ID,
        ci,
        hi,
        XDP_REDIRECT,
        Reason::FwdRedirect,
    )
    .0
}

/// Send the upstream's SYN-ACK for `flow` (arriving on the home side, redirected to the client
/// side) and assert it.
fn reply_syn_ack<S: Fam>(h: &Harness, flow: &Flow<S>) -> RunResult {
    let p = flow.upstream_tcp(TCP_SYN | TCP_ACK);
    h.check(&Fixture::new(
        "TCP SYN-ACK from the upstream (reply path)",
        p.bytes(),
        h.home_if,
        XDP_REDIRECT,
        Reason::RevRedirect,
        Expect::Bytes(flow.rev_out(&p, h.client_if)),
    ))
}

/// Assert both entries of `flow` carry `flags` (and their rewrites are intact).
fn assert_flags<S: Fam>(h: &Harness, what: &str, flow: &Flow<S>, flags: u32) {
    for (table, actual, expected) in [
        (
            "forward",
            h.fwd_flow(&flow.fwd_tuple().key()),
            flow.fwd_value(flags),
        ),
        (
            "reverse",
            h.rev_flow(&flow.rev_tuple().key()),
            flow.rev_value(flags),
        ),
    ] {
        let Some(actual) = actual else {
            panic!("{what}: {table} entry missing");
        };
        let masked = FlowValue {
            created_ns: 0,
            last_seen_ns: 0,
            packets: 0,
            bytes: 0,
            ..without_next_hop(&actual)
        };
        assert!(
            masked == expected,
            "{what}: {table} entry: expected flags {flags:#x} and rewrite {expected:#?}\n\
             got {actual:#?}"
        );
    }
}

fn assert_no_flows(h: &Harness, what: &str) {
    let fwd = h.all_flows(MAP_FLOWS_FWD);
    let rev = h.all_flows(MAP_FLOWS_REV);
    assert!(
        fwd.is_empty() && rev.is_empty(),
        "{what}: expected no flow entries, got forward {fwd:#?} reverse {rev:#?}"
    );
}

// =============================================================================================
// TCP.
// =============================================================================================

/// TCP SYN to a service, no flow: a new flow (Maglev slot from flow_hash, SNAT port from the
/// first probe), rewritten to SNAT -> upstream, TTL - 1, MACs from the FIB, redirected out of the
/// home-side interface through the devmap.
#[test]
fn tcp_syn_new_flow() {
    tcp_syn_new_flow_in::<V4>();
}

#[test]
fn tcp_syn_new_flow_v6() {
    tcp_syn_new_flow_in::<V6>();
}

fn tcp_syn_new_flow_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        assert_eq!(h.all_flows(MAP_FLOWS_FWD).len(), 1, "one forward entry");
        assert_eq!(h.all_flows(MAP_FLOWS_REV).len(), 1, "one reverse entry");
        assert_eq!(flow.snat.sock_ip(), S::SNAT);
    });
}

/// One-interface shape: the SYN arrives on the interface the upstream is reached through:
/// XDP_TX (egress == ingress), source MAC of that interface.
#[test]
fn tcp_syn_same_interface_tx() {
    tcp_syn_same_interface_tx_in::<V4>();
}

#[test]
fn tcp_syn_same_interface_tx_v6() {
    tcp_syn_same_interface_tx_in::<V6>();
}

fn tcp_syn_same_interface_tx_in<S: Fam>() {
    with_harness(|h| {
        let hi = h.home_if;
        let syn = Packet::tcp(S::CLIENT_A, S::SVC_TCP, TCP_SYN).macs(UPSTREAM_MAC, HOME_DEV_MAC);
        open_flow(
            h,
            "TCP SYN arriving on the upstream's interface",
            syn,
            SVC_TCP_ID,
            S::UPS_TCP,
            S::UPS_TCP_ID,
            hi,
            hi,
            XDP_TX,
            Reason::FwdTx,
        );
    });
}

/// The upstream's SYN-ACK to the SNAT port the SYN got: the reverse entry matches, the packet
/// is rewritten to service -> client and redirected to the client side; FLOW_F_REPLIED and
/// FLOW_F_SYN_RECEIVED are set in both entries (SYN received, not established: the client has
/// not acknowledged yet); reverse counters move.
#[test]
fn tcp_reply_path() {
    tcp_reply_path_in::<V4>();
}

#[test]
fn tcp_reply_path_v6() {
    tcp_reply_path_in::<V6>();
}

fn tcp_reply_path_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        let svc_before = h.svc_stats(SVC_TCP_ID);
        let ups_before = h.ups_stats(S::UPS_TCP_ID);
        let p = flow.upstream_tcp(TCP_SYN | TCP_ACK);
        let run = reply_syn_ack(h, &flow);
        let len = u64::from(p.ip_len());
        let rev = assert_flow(
            "reverse entry after the SYN-ACK",
            h.rev_flow(&flow.rev_tuple().key()),
            &FlowValue {
                packets: 1,
                bytes: len,
                ..flow.rev_value(FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED)
            },
        );
        assert_time_within("reverse last_seen_ns", rev.last_seen_ns, &run);
        assert!(
            rev.created_ns < run.t_before,
            "reverse created_ns kept from the SYN"
        );
        assert_flow(
            "forward entry after the SYN-ACK",
            h.fwd_flow(&flow.fwd_tuple().key()),
            &FlowValue {
                packets: 1,
                bytes: u64::from(flow.client_tcp(TCP_SYN).ip_len()),
                ..flow.fwd_value(FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED)
            },
        );
        let plus = |c: TrafficCounters| TrafficCounters {
            rev_packets: c.rev_packets + 1,
            rev_bytes: c.rev_bytes + len,
            ..c
        };
        assert_eq!(h.svc_stats(SVC_TCP_ID), plus(svc_before), "XP_SVC_STATS");
        assert_eq!(h.ups_stats(S::UPS_TCP_ID), plus(ups_before), "XP_UPS_STATS");
    });
}

/// A reply arriving on the client-side interface goes back out of it: XDP_TX (`RevTx`).
#[test]
fn tcp_reply_same_interface_tx() {
    tcp_reply_same_interface_tx_in::<V4>();
}

#[test]
fn tcp_reply_same_interface_tx_v6() {
    tcp_reply_same_interface_tx_in::<V6>();
}

fn tcp_reply_same_interface_tx_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        let p = flow
            .upstream_tcp(TCP_SYN | TCP_ACK)
            .macs(CLIENT_ROUTER_MAC, CLIENT_DEV_MAC);
        h.check(&Fixture::new(
            "TCP SYN-ACK arriving on the client-side interface",
            p.bytes(),
            h.client_if,
            XDP_TX,
            Reason::RevTx,
            Expect::Bytes(flow.rev_out(&p, h.client_if)),
        ));
    });
}

/// The next-hop cache of step 9: a flow entry keeps its last FIB result (egress ifindex, MACs,
/// the largest IP length it accepted) and uses it while younger than `NEXT_HOP_VALID_NS`; a
/// longer packet or an older cache looks the next hop up again and refreshes the entry.
#[test]
fn next_hop_cache() {
    next_hop_cache_in::<V4>();
}

#[test]
fn next_hop_cache_v6() {
    next_hop_cache_in::<V6>();
}

fn next_hop_cache_in<S: Fam>() {
    const OLD_DMAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0x01];
    const OLD_SMAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0x02];
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        reply_syn_ack(h, &flow);
        let key = flow.fwd_tuple().key();
        let hi = h.home_if;
        let cached = h.fwd_flow(&key).expect("forward entry");
        assert_eq!(
            (cached.nh_ifindex, cached.nh_dmac, cached.nh_smac),
            (hi.ifindex, UPSTREAM_MAC, hi.mac),
            "the SYN's FIB lookup is cached in the forward entry"
        );
        assert!(cached.nh_checked_ns != 0, "lookup time recorded");

        // A fresh cache is used as it is: the packet goes out with the cached MACs.
        let fake = Iface {
            mac: OLD_SMAC,
            ..hi
        };
        let with = |checked_ns: u64, len: u16| FlowValue {
            nh_checked_ns: checked_ns,
            nh_dmac: OLD_DMAC,
            nh_smac: OLD_SMAC,
            nh_len: len,
            ..cached
        };
        h.insert_fwd_flow(key, with(nh_fresh(), 1500));
        let p = flow
            .client_tcp(TCP_ACK | TCP_PSH)
            .seq_ack(0x1000_0002, 0x5000_0002)
            .payload(b"cached next hop");
        h.check(&Fixture::new(
            "established packet, fresh next-hop cache: cached MACs used",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(forwarded(&p, flow.snat, flow.upstream, fake, OLD_DMAC)),
        ));
        let v = h.fwd_flow(&key).expect("forward entry");
        assert_eq!(
            (v.nh_dmac, v.nh_smac, v.nh_len),
            (OLD_DMAC, OLD_SMAC, 1500),
            "a fresh cache is not rewritten"
        );

        // Fresh, but the packet is longer than any the cached lookup accepted (its MTU check):
        // looked up again.
        h.insert_fwd_flow(key, with(nh_fresh(), 40));
        let run = h.check(&Fixture::new(
            "established packet longer than the cached lookup's: looked up again",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, hi)),
        ));
        let v = h.fwd_flow(&key).expect("forward entry");
        assert_eq!(
            (v.nh_ifindex, v.nh_dmac, v.nh_smac, v.nh_len),
            (hi.ifindex, UPSTREAM_MAC, hi.mac, p.ip_len()),
            "the cache holds the new lookup"
        );
        assert_time_within("nh_checked_ns after a lookup", v.nh_checked_ns, &run);

        // Older than NEXT_HOP_VALID_NS: looked up again, whatever the length.
        h.insert_fwd_flow(key, with(NH_STALE, 1500));
        let run = h.check(&Fixture::new(
            "established packet, stale next-hop cache: looked up again",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, hi)),
        ));
        let v = h.fwd_flow(&key).expect("forward entry");
        assert_eq!(
            (v.nh_ifindex, v.nh_dmac, v.nh_smac, v.nh_len),
            (hi.ifindex, UPSTREAM_MAC, hi.mac, p.ip_len()),
            "the stale cache is replaced"
        );
        assert_time_within("nh_checked_ns after a refresh", v.nh_checked_ns, &run);

        // The reply direction caches its own next hop in the reverse entry.
        let rev = h.rev_flow(&flow.rev_tuple().key()).expect("reverse entry");
        assert_eq!(
            (rev.nh_ifindex, rev.nh_dmac),
            (h.client_if.ifindex, CLIENT_ROUTER_MAC),
            "the SYN-ACK's lookup is cached in the reverse entry"
        );
    });
}

/// Established forward: after SYN and SYN-ACK, the client's ACK with data hits the forward
/// entry and is forwarded with the same upstream and SNAT port; entry counters accumulate.
#[test]
fn tcp_established_forward() {
    tcp_established_forward_in::<V4>();
}

#[test]
fn tcp_established_forward_v6() {
    tcp_established_forward_in::<V6>();
}

fn tcp_established_forward_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        reply_syn_ack(h, &flow);
        let svc_before = h.svc_stats(SVC_TCP_ID);
        let fwd_before = h.fwd_flow(&flow.fwd_tuple().key()).unwrap_or_default();
        let p = flow
            .client_tcp(TCP_ACK | TCP_PSH)
            .seq_ack(0x1000_0002, 0x5000_0002)
            .payload(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n");
        let run = h.check(&Fixture::new(
            "TCP ACK with data, established flow",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, h.home_if)),
        ));
        let len = u64::from(p.ip_len());
        let fwd = assert_flow(
            "forward entry after the data packet",
            h.fwd_flow(&flow.fwd_tuple().key()),
            &FlowValue {
                packets: fwd_before.packets + 1,
                bytes: fwd_before.bytes + len,
                ..flow.fwd_value(FLOW_F_REPLIED)
            },
        );
        assert_eq!(
            fwd.created_ns, fwd_before.created_ns,
            "created_ns unchanged"
        );
        assert_time_within("forward last_seen_ns", fwd.last_seen_ns, &run);
        assert_eq!(
            h.svc_stats(SVC_TCP_ID),
            TrafficCounters {
                fwd_packets: svc_before.fwd_packets + 1,
                fwd_bytes: svc_before.fwd_bytes + len,
                ..svc_before
            },
            "XP_SVC_STATS"
        );
        assert_eq!(h.all_flows(MAP_FLOWS_FWD).len(), 1, "still one flow");
    });
}

/// The two flow tables are LRU maps that evict on their own, so a full table can drop one half of
/// a flow. A forward hit whose reverse entry is gone puts it back (same SNAT port, same client:
/// the flow keeps working); one whose reverse key now leads to another client is forgotten and
/// the packet dropped, so the client's retry starts a fresh flow. Never a black hole.
#[test]
fn half_evicted_flow_is_repaired_or_forgotten() {
    half_evicted_flow_is_repaired_or_forgotten_in::<V4>();
}

#[test]
fn half_evicted_flow_is_repaired_or_forgotten_v6() {
    half_evicted_flow_is_repaired_or_forgotten_in::<V6>();
}

fn half_evicted_flow_is_repaired_or_forgotten_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        reply_syn_ack(h, &flow);
        let rev_key = flow.rev_tuple().key();
        let rev_before = h
            .rev_flow(&rev_key)
            .expect("reverse entry after the SYN-ACK");
        h.remove_rev_flow(&rev_key);
        let p = flow
            .client_tcp(TCP_ACK | TCP_PSH)
            .seq_ack(0x1000_0002, 0x5000_0002)
            .payload(b"after eviction");
        // While the forward entry's next hop is fresh (looked up less than NEXT_HOP_VALID_NS
        // ago) the reverse entry is not checked again.
        let fwd_key = flow.fwd_tuple().key();
        h.set_next_hop_time(&fwd_key, nh_fresh());
        h.check(&Fixture::new(
            "data packet, next hop fresh: forwarded, reverse entry not yet checked",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, h.home_if)),
        ));
        assert!(
            h.rev_flow(&rev_key).is_none(),
            "no repair while the next hop is fresh"
        );
        h.set_next_hop_time(&fwd_key, NH_STALE);
        h.check(&Fixture::new(
            "data packet, reverse entry evicted: repaired and forwarded",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, h.home_if)),
        ));
        let rev = h.rev_flow(&rev_key).expect("reverse entry put back");
        assert_eq!(
            FlowValue {
                last_seen_ns: 0,
                packets: 0,
                bytes: 0,
                ..rev
            },
            FlowValue {
                last_seen_ns: 0,
                packets: 0,
                bytes: 0,
                // The first data packet established the flow (while the reverse entry was
                // gone); the repair copies the forward entry's flags.
                flags: FLOW_F_REPLIED,
                ..without_next_hop(&rev_before)
            },
            "the repaired reverse entry translates replies to the same client (its next hop \
             not yet looked up)"
        );

        // The port went to another client meanwhile: this flow cannot be repaired.
        let other = FlowValue {
            new_dst_addr: S::STRANGER.key_addr(),
            ..rev_before
        };
        h.remove_rev_flow(&rev_key);
        h.insert_rev_flow(rev_key, other);
        h.set_next_hop_time(&fwd_key, NH_STALE);
        h.check(&Fixture::new(
            "data packet, reverse key now another client's: flow forgotten, dropped",
            p.bytes(),
            h.client_if,
            XDP_DROP,
            Reason::DropFlowInsertFailed,
            Expect::Unchanged,
        ));
        assert!(
            h.fwd_flow(&flow.fwd_tuple().key()).is_none(),
            "the forward entry is forgotten"
        );
        assert_eq!(
            h.rev_flow(&rev_key),
            Some(other),
            "the other client's entry is untouched"
        );
    });
}

/// The handshake as conntrack tracks it (docs/datapath.md, "TCP states"): the SYN leaves no
/// flag (SYN sent); the SYN-ACK sets REPLIED | SYN_RECEIVED (SYN received, not established);
/// a retransmitted SYN and a retransmitted SYN-ACK change nothing; the client's ACK clears
/// SYN_RECEIVED (established); later segments of either side change nothing.
#[test]
fn tcp_handshake_states() {
    tcp_handshake_states_in::<V4>();
}

#[test]
fn tcp_handshake_states_v6() {
    tcp_handshake_states_in::<V6>();
}

/// Run each `(what, packet, ingress, flags)` step of `flow` through the program: a packet from
/// the client side is forwarded to the upstream, one from the home side back to the client,
/// both redirected; after each, both entries carry `flags`.
fn check_steps<S: Fam>(h: &mut Harness, flow: &Flow<S>, steps: &[(&str, Packet<S>, Iface, u32)]) {
    let (ci, hi) = (h.client_if, h.home_if);
    for (what, p, ingress, flags) in steps {
        let (out, reason) = if *ingress == ci {
            (flow.fwd_out(p, hi), Reason::FwdRedirect)
        } else {
            (flow.rev_out(p, ci), Reason::RevRedirect)
        };
        h.check(&Fixture::new(
            *what,
            p.bytes(),
            *ingress,
            XDP_REDIRECT,
            reason,
            Expect::Bytes(out),
        ));
        assert_flags(h, &format!("after {what}"), flow, *flags);
    }
}

fn tcp_handshake_states_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        assert_flags(h, "after the SYN (SYN sent)", &flow, 0);
        reply_syn_ack(h, &flow);
        let syn_received = FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED;
        assert_flags(h, "after the SYN-ACK (SYN received)", &flow, syn_received);
        let (ci, hi) = (h.client_if, h.home_if);
        let steps = [
            (
                "a retransmitted SYN",
                flow.client_tcp(TCP_SYN),
                ci,
                syn_received,
            ),
            (
                "a retransmitted SYN-ACK",
                flow.upstream_tcp(TCP_SYN | TCP_ACK),
                hi,
                syn_received,
            ),
            (
                "the client's ACK of the SYN-ACK (established)",
                flow.client_tcp(TCP_ACK).seq_ack(0x1000_0002, 0x5000_0002),
                ci,
                FLOW_F_REPLIED,
            ),
            (
                "the upstream's data",
                flow.upstream_tcp(TCP_ACK | TCP_PSH).payload(b"hello"),
                hi,
                FLOW_F_REPLIED,
            ),
            (
                "the client's data",
                flow.client_tcp(TCP_ACK | TCP_PSH)
                    .seq_ack(0x1000_0002, 0x5000_0007)
                    .payload(b"GET /"),
                ci,
                FLOW_F_REPLIED,
            ),
        ];
        check_steps(h, &flow, &steps);
    });
}

/// A FIN before the handshake completed is not counted (a SYN then FIN from a client that never
/// acknowledged anything must not reach the half-closed lifetime): neither right after the SYN
/// nor after the SYN-ACK with the client's FIN carrying no ACK.
#[test]
fn tcp_fin_before_handshake_ignored() {
    tcp_fin_before_handshake_ignored_in::<V4>();
}

#[test]
fn tcp_fin_before_handshake_ignored_v6() {
    tcp_fin_before_handshake_ignored_in::<V6>();
}

fn tcp_fin_before_handshake_ignored_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        let (ci, hi) = (h.client_if, h.home_if);
        let p = flow.client_tcp(TCP_FIN);
        h.check(&Fixture::new(
            "TCP FIN right after the SYN",
            p.bytes(),
            ci,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, hi)),
        ));
        assert_flags(h, "after a FIN in SYN sent", &flow, 0);
        reply_syn_ack(h, &flow);
        h.check(&Fixture::new(
            "TCP FIN without ACK after the SYN-ACK",
            p.bytes(),
            ci,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, hi)),
        ));
        assert_flags(
            h,
            "after a FIN without ACK in SYN received",
            &flow,
            FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED,
        );
    });
}

/// FIN from the client sets FLOW_F_FIN_CLIENT in both entries, FIN from the upstream sets
/// FLOW_F_FIN_UPSTREAM in both (and not FLOW_F_FIN_UPSTREAM_FIRST: the client closed first);
/// both are forwarded.
#[test]
fn tcp_fin() {
    tcp_fin_in::<V4>();
}

#[test]
fn tcp_fin_v6() {
    tcp_fin_in::<V6>();
}

fn tcp_fin_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        reply_syn_ack(h, &flow);
        let p = flow
            .client_tcp(TCP_FIN | TCP_ACK)
            .seq_ack(0x1000_0002, 0x5000_0002);
        h.check(&Fixture::new(
            "TCP FIN from the client",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, h.home_if)),
        ));
        assert_flags(
            h,
            "after the client's FIN",
            &flow,
            FLOW_F_REPLIED | FLOW_F_FIN_CLIENT,
        );
        let p = flow.upstream_tcp(TCP_FIN | TCP_ACK);
        h.check(&Fixture::new(
            "TCP FIN from the upstream",
            p.bytes(),
            h.home_if,
            XDP_REDIRECT,
            Reason::RevRedirect,
            Expect::Bytes(flow.rev_out(&p, h.client_if)),
        ));
        assert_flags(
            h,
            "after both FINs",
            &flow,
            FLOW_F_REPLIED | FLOW_F_FIN_CLIENT | FLOW_F_FIN_UPSTREAM,
        );
    });
}

/// The upstream closes first (docs/datapath.md, "TCP states"): its FIN sets FLOW_F_FIN_UPSTREAM
/// and FLOW_F_FIN_UPSTREAM_FIRST (it is the active closer, the side holding TIME_WAIT); the
/// client's FIN then adds FLOW_F_FIN_CLIENT; a retransmitted upstream FIN changes nothing. (The
/// client-first order, `tcp_fin`, never sets FLOW_F_FIN_UPSTREAM_FIRST.)
#[test]
fn tcp_fin_upstream_first() {
    tcp_fin_upstream_first_in::<V4>();
}

#[test]
fn tcp_fin_upstream_first_v6() {
    tcp_fin_upstream_first_in::<V6>();
}

fn tcp_fin_upstream_first_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        reply_syn_ack(h, &flow);
        let (ci, hi) = (h.client_if, h.home_if);
        let first = FLOW_F_REPLIED | FLOW_F_FIN_UPSTREAM | FLOW_F_FIN_UPSTREAM_FIRST;
        let steps = [
            (
                "the client's ACK of the SYN-ACK",
                flow.client_tcp(TCP_ACK).seq_ack(0x1000_0002, 0x5000_0002),
                ci,
                FLOW_F_REPLIED,
            ),
            (
                "TCP FIN from the upstream (first)",
                flow.upstream_tcp(TCP_FIN | TCP_ACK),
                hi,
                first,
            ),
            (
                "TCP FIN from the client (second)",
                flow.client_tcp(TCP_FIN | TCP_ACK)
                    .seq_ack(0x1000_0002, 0x5000_0003),
                ci,
                first | FLOW_F_FIN_CLIENT,
            ),
            (
                "the upstream's FIN again (retransmitted)",
                flow.upstream_tcp(TCP_FIN | TCP_ACK),
                hi,
                first | FLOW_F_FIN_CLIENT,
            ),
        ];
        check_steps(h, &flow, &steps);
    });
}

/// RST (from the client, then a separate flow's RST from the upstream) sets FLOW_F_RST in both
/// entries and is forwarded.
#[test]
fn tcp_rst() {
    tcp_rst_in::<V4>();
}

#[test]
fn tcp_rst_v6() {
    tcp_rst_in::<V6>();
}

fn tcp_rst_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        reply_syn_ack(h, &flow);
        let p = flow
            .client_tcp(TCP_RST | TCP_ACK)
            .seq_ack(0x1000_0002, 0x5000_0002);
        h.check(&Fixture::new(
            "TCP RST from the client",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, h.home_if)),
        ));
        // A RST does not complete the handshake: SYN_RECEIVED stays beside RST.
        assert_flags(
            h,
            "after the client's RST",
            &flow,
            FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED | FLOW_F_RST,
        );

        // Second flow: RST from the upstream, right after the SYN (no reply seen before it).
        let (ci, hi) = (h.client_if, h.home_if);
        let (flow2, _) = open_flow(
            h,
            "TCP SYN of a second flow",
            from_client(Packet::tcp(S::CLIENT_B, S::SVC_TCP, TCP_SYN)),
            SVC_TCP_ID,
            S::UPS_TCP,
            S::UPS_TCP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        let p = flow2.upstream_tcp(TCP_RST | TCP_ACK);
        h.check(&Fixture::new(
            "TCP RST from the upstream",
            p.bytes(),
            h.home_if,
            XDP_REDIRECT,
            Reason::RevRedirect,
            Expect::Bytes(flow2.rev_out(&p, h.client_if)),
        ));
        // The RST is the first reply packet: it also sets FLOW_F_REPLIED (and SYN_RECEIVED).
        assert_flags(
            h,
            "after the upstream's RST",
            &flow2,
            FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED | FLOW_F_RST,
        );
        // The first flow is untouched.
        assert_flags(
            h,
            "first flow",
            &flow,
            FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED | FLOW_F_RST,
        );
    });
}

/// A client SYN (no ACK) on a forward entry whose flow saw FIN is a new connection reusing the
/// client port: flags cleared in both entries, same upstream and SNAT port (even when the
/// Maglev table now points elsewhere), forwarded.
#[test]
fn tcp_resyn_after_fin_reuses_flow() {
    tcp_resyn_after_fin_reuses_flow_in::<V4>();
}

#[test]
fn tcp_resyn_after_fin_reuses_flow_v6() {
    tcp_resyn_after_fin_reuses_flow_in::<V6>();
}

fn tcp_resyn_after_fin_reuses_flow_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        reply_syn_ack(h, &flow);
        for (desc, p, ingress, reason) in [
            (
                "TCP FIN from the client",
                flow.client_tcp(TCP_FIN | TCP_ACK),
                h.client_if,
                Reason::FwdRedirect,
            ),
            (
                "TCP FIN from the upstream",
                flow.upstream_tcp(TCP_FIN | TCP_ACK),
                h.home_if,
                Reason::RevRedirect,
            ),
        ] {
            let out = if ingress == h.client_if {
                flow.fwd_out(&p, h.home_if)
            } else {
                flow.rev_out(&p, h.client_if)
            };
            h.check(&Fixture::new(
                desc,
                p.bytes(),
                ingress,
                XDP_REDIRECT,
                reason,
                Expect::Bytes(out),
            ));
        }
        assert_flags(
            h,
            "after FIN both ways",
            &flow,
            FLOW_F_REPLIED | FLOW_F_FIN_CLIENT | FLOW_F_FIN_UPSTREAM,
        );
        // Re-point the flow's Maglev slot: a re-hash would now pick upstream 5.
        h.steer(&flow.fwd_tuple(), SVC_TCP_ID, S::UPS_TCP_2_ID);
        let p = flow.client_tcp(TCP_SYN).seq_ack(0x7000_0001, 0);
        h.check(&Fixture::new(
            "TCP SYN reusing the client port after FIN",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, h.home_if)),
        ));
        assert_flags(h, "after the re-SYN", &flow, 0);
        assert_eq!(
            h.all_flows(MAP_FLOWS_FWD).len(),
            1,
            "entries reused, not added"
        );
        assert_eq!(
            h.all_flows(MAP_FLOWS_REV).len(),
            1,
            "entries reused, not added"
        );
    });
}

/// A TCP segment without SYN (or with SYN+ACK) to a service, with no flow: passed untouched
/// (the kernel answers RST), no flow created.
#[test]
fn tcp_midflow_without_flow_passes() {
    tcp_midflow_without_flow_passes_in::<V4>();
}

#[test]
fn tcp_midflow_without_flow_passes_v6() {
    tcp_midflow_without_flow_passes_in::<V6>();
}

fn tcp_midflow_without_flow_passes_in<S: Fam>() {
    with_harness(|h| {
        // Steer the tuple so a wrongly created flow would have an upstream to go to.
        h.steer(
            &Tuple::new(S::CLIENT_A, S::SVC_TCP, IPPROTO_TCP),
            SVC_TCP_ID,
            S::UPS_TCP_ID,
        );
        for (desc, flags) in [
            ("TCP ACK, no flow", TCP_ACK),
            ("TCP ACK+PSH with data, no flow", TCP_ACK | TCP_PSH),
            ("TCP SYN+ACK to a service, no flow", TCP_SYN | TCP_ACK),
            ("TCP FIN+ACK, no flow", TCP_FIN | TCP_ACK),
            ("TCP RST, no flow", TCP_RST),
        ] {
            let p = from_client(Packet::tcp(S::CLIENT_A, S::SVC_TCP, flags))
                .payload(if flags & TCP_PSH != 0 { b"data" } else { b"" });
            h.check(&Fixture::unchanged(
                desc,
                p.bytes(),
                h.client_if,
                XDP_PASS,
                Reason::PassMidflowNoFlow,
            ));
        }
        assert_no_flows(h, "mid-flow packets without a flow");
        assert_eq!(
            h.svc_stats(SVC_TCP_ID),
            TrafficCounters::default(),
            "XP_SVC_STATS"
        );
    });
}

// =============================================================================================
// UDP.
// =============================================================================================

/// The first UDP datagram to a UDP service creates a flow (any UDP packet is "new"). The frame
/// carries Ethernet padding: it must stay, and byte counters count the IP length only.
#[test]
fn udp_new_flow() {
    udp_new_flow_in::<V4>();
}

#[test]
fn udp_new_flow_v6() {
    udp_new_flow_in::<V6>();
}

fn udp_new_flow_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let p = from_client(Packet::udp(S::CLIENT_A, S::SVC_UDP, b"ping")).trailer(&[0; 14]);
        assert_eq!(
            p.bytes().len(),
            ETH_HLEN + usize::from(p.ip_len()) + 14,
            "a frame with padding (IPv4: the minimum size, 60)"
        );
        let (flow, _) = open_flow(
            h,
            "UDP, new flow (padded frame)",
            p,
            SVC_UDP_ID,
            S::UPS_UDP,
            S::UPS_UDP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        assert_eq!(flow.proto, IPPROTO_UDP);
    });
}

/// UDP established: a reply from the upstream to the SNAT port, then a second client datagram
/// hitting the forward entry with the same SNAT port.
#[test]
fn udp_established() {
    udp_established_in::<V4>();
}

#[test]
fn udp_established_v6() {
    udp_established_in::<V6>();
}

fn udp_established_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let (flow, _) = open_flow(
            h,
            "UDP, new flow",
            from_client(Packet::udp(S::CLIENT_A, S::SVC_UDP, b"query 1")),
            SVC_UDP_ID,
            S::UPS_UDP,
            S::UPS_UDP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        let reply = from_upstream(Packet::udp(flow.upstream, flow.snat, b"answer 1"));
        h.check(&Fixture::new(
            "UDP reply from the upstream",
            reply.bytes(),
            hi,
            XDP_REDIRECT,
            Reason::RevRedirect,
            Expect::Bytes(flow.rev_out(&reply, ci)),
        ));
        let p = from_client(Packet::udp(
            S::CLIENT_A,
            S::SVC_UDP,
            b"query 2, a little longer",
        ));
        let run = h.check(&Fixture::new(
            "UDP, established flow",
            p.bytes(),
            ci,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, hi)),
        ));
        let first_len =
            u64::from(from_client(Packet::udp(S::CLIENT_A, S::SVC_UDP, b"query 1")).ip_len());
        let fwd = h.fwd_flow(&flow.fwd_tuple().key());
        // Flag bits are TCP state (docs step 8 "(TCP)"); whether a UDP reply sets
        // FLOW_F_REPLIED is not specified, so that one bit is not asserted here.
        let fwd = fwd.map(|v| FlowValue {
            flags: v.flags & !FLOW_F_REPLIED,
            ..v
        });
        let fwd = assert_flow(
            "UDP forward entry",
            fwd,
            &FlowValue {
                packets: 2,
                bytes: first_len + u64::from(p.ip_len()),
                ..flow.fwd_value(0)
            },
        );
        assert_time_within("UDP forward last_seen_ns", fwd.last_seen_ns, &run);
        let rev = h.rev_flow(&flow.rev_tuple().key()).map(|v| FlowValue {
            flags: v.flags & !FLOW_F_REPLIED,
            ..v
        });
        assert_flow(
            "UDP reverse entry",
            rev,
            &FlowValue {
                packets: 1,
                bytes: u64::from(reply.ip_len()),
                ..flow.rev_value(0)
            },
        );
        let svc = h.svc_stats(SVC_UDP_ID);
        assert_eq!(
            svc,
            TrafficCounters {
                fwd_packets: 2,
                fwd_bytes: first_len + u64::from(p.ip_len()),
                rev_packets: 1,
                rev_bytes: u64::from(reply.ip_len()),
                new_flows: 1,
            },
            "XP_SVC_STATS[UDP]"
        );
        assert_eq!(h.ups_stats(S::UPS_UDP_ID), svc, "XP_UPS_STATS[UDP]");
    });
}

/// A UDP checksum of 0 ("none") stays 0 through the rewrite, both directions.
#[test]
fn udp_zero_checksum_stays_zero() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let p = from_client(Packet::udp(CLIENT_A, SVC_UDP, b"no checksum")).udp_zero_checksum();
        assert_eq!(&p.bytes()[ETH_HLEN + 26..ETH_HLEN + 28], &[0, 0]);
        let (flow, run) = open_flow(
            h,
            "UDP with checksum 0, new flow",
            p,
            SVC_UDP_ID,
            UPS_UDP,
            UPS_UDP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        assert_eq!(
            &run.output[ETH_HLEN + 26..ETH_HLEN + 28],
            &[0, 0],
            "forward: checksum stays 0"
        );
        let reply = from_upstream(Packet::udp(flow.upstream, flow.snat, b"none either"))
            .udp_zero_checksum();
        let run = h.check(&Fixture::new(
            "UDP reply with checksum 0",
            reply.bytes(),
            hi,
            XDP_REDIRECT,
            Reason::RevRedirect,
            Expect::Bytes(flow.rev_out(&reply, ci)),
        ));
        assert_eq!(
            &run.output[ETH_HLEN + 26..ETH_HLEN + 28],
            &[0, 0],
            "reply: checksum stays 0"
        );
    });
}

// =============================================================================================
// Not ours: passed untouched.
// =============================================================================================

/// Packets to a port, protocol or address that is not a service (and no flow) are passed with
/// their bytes unchanged, and create nothing.
#[test]
fn non_service_passes_unchanged() {
    non_service_passes_unchanged_in::<V4>();
}

#[test]
fn non_service_passes_unchanged_v6() {
    non_service_passes_unchanged_in::<V6>();
}

fn non_service_passes_unchanged_in<S: Fam>() {
    with_harness(|h| {
        let ci = h.client_if;
        let hi = h.home_if;
        let cases = [
            (
                "TCP SYN to the service address, port 22",
                from_client(Packet::tcp(
                    S::CLIENT_A,
                    S::sock(S::SVC_TCP.sock_ip(), 22),
                    TCP_SYN,
                )),
                ci,
            ),
            (
                "UDP to the TCP service's port",
                from_client(Packet::udp(
                    S::CLIENT_A,
                    S::sock(S::SVC_TCP.sock_ip(), 80),
                    b"x",
                )),
                ci,
            ),
            (
                "TCP SYN to the UDP service's port",
                from_client(Packet::tcp(S::CLIENT_A, S::SVC_UDP, TCP_SYN)),
                ci,
            ),
            (
                "TCP SYN to another address, port 80",
                from_client(Packet::tcp(S::CLIENT_A, S::sock(S::STRANGER, 80), TCP_SYN)),
                ci,
            ),
            (
                "health-check reply to the SNAT address, a port outside the SNAT range",
                from_upstream(Packet::tcp(
                    S::UPS_TCP,
                    S::sock(S::SNAT, 40_001),
                    TCP_SYN | TCP_ACK,
                )),
                hi,
            ),
            (
                "UDP from an upstream to the SNAT address, a port outside the SNAT range",
                from_upstream(Packet::udp(S::UPS_UDP, S::sock(S::SNAT, 33_000), b"late")),
                hi,
            ),
        ];
        for (desc, p, ingress) in cases {
            h.check(&Fixture::unchanged(
                desc,
                p.bytes(),
                ingress,
                XDP_PASS,
                Reason::PassNotService,
            ));
        }
        assert_no_flows(h, "non-service packets");
    });
}

/// Frames that are not IPv4 (ARP, IPv6, VLAN-tagged) are passed untouched.
#[test]
fn non_ipv4_frames_pass() {
    with_harness(|h| {
        let ipv4 = from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_SYN)).bytes();
        let arp = {
            let mut b = vec![0, 1, 8, 0, 6, 4, 0, 1];
            b.extend_from_slice(&CLIENT_ROUTER_MAC);
            b.extend_from_slice(&CLIENT_ROUTER.octets());
            b.extend_from_slice(&[0; 6]);
            b.extend_from_slice(&SERVICE_IP.octets());
            b.extend_from_slice(&[0; 18]);
            raw_frame([0xff; 6], CLIENT_ROUTER_MAC, ETH_P_ARP, &b)
        };
        let ipv6 = {
            let mut b = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
            b.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            b.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            b.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
            raw_frame(CLIENT_DEV_MAC, CLIENT_ROUTER_MAC, ETH_P_IPV6, &b)
        };
        let vlan = {
            // 802.1Q tag (VLAN 100) in front of an IPv4 SYN to the service.
            let mut b = vec![0, 100];
            b.extend_from_slice(&ETH_P_IP.to_be_bytes());
            b.extend_from_slice(&ipv4[ETH_HLEN..]);
            raw_frame(CLIENT_DEV_MAC, CLIENT_ROUTER_MAC, ETH_P_8021Q, &b)
        };
        h.steer(
            &Tuple::new(CLIENT_A, SVC_TCP, IPPROTO_TCP),
            SVC_TCP_ID,
            UPS_TCP_ID,
        );
        for (desc, frame) in [("ARP request", arp), ("VLAN-tagged IPv4 SYN", vlan)] {
            h.check(&Fixture::unchanged(
                desc,
                frame,
                h.client_if,
                XDP_PASS,
                Reason::PassNotIp,
            ));
        }
        // IPv6 is parsed since issue 6: UDP to an address:port that is no service (and with
        // checksum 0, which only matters for flows and services) is passed untouched.
        h.check(&Fixture::unchanged(
            "IPv6 UDP, no service",
            ipv6,
            h.client_if,
            XDP_PASS,
            Reason::PassNotService,
        ));
        assert_no_flows(h, "non-IPv4 frames");
    });
}

/// A packet to the SNAT address at a port inside `port_range` that matches no flow is
/// dropped and counted (`DropNoFlowSnatPort`), never handed to the kernel: a late TCP segment
/// and a UDP datagram from the upstream, the bounds of the range, and either interface; a port
/// just outside the range (either side) and a range port on another address still pass
/// (`PassNotService`). With a live flow at a port, the same port from its upstream is that
/// flow's reply, not a drop.
#[test]
fn unmatched_snat_port_dropped() {
    unmatched_snat_port_dropped_in::<V4>();
}

#[test]
fn unmatched_snat_port_dropped_v6() {
    unmatched_snat_port_dropped_in::<V6>();
}

fn unmatched_snat_port_dropped_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let before = h.reasons()[Reason::DropNoFlowSnatPort as usize];
        let drops = [
            (
                "late TCP segment from the upstream to a SNAT port",
                from_upstream(Packet::tcp(
                    S::UPS_TCP,
                    S::sock(S::SNAT, 20_001),
                    TCP_ACK | TCP_FIN,
                )),
                hi,
            ),
            (
                "UDP from the upstream to a SNAT port",
                from_upstream(Packet::udp(S::UPS_UDP, S::sock(S::SNAT, 25_000), b"late")),
                hi,
            ),
            (
                "TCP SYN-ACK to the lowest SNAT port",
                from_upstream(Packet::tcp(
                    S::UPS_TCP,
                    S::sock(S::SNAT, PORT_MIN),
                    TCP_SYN | TCP_ACK,
                )),
                hi,
            ),
            (
                "TCP to the highest SNAT port, arriving on the client side",
                from_client(Packet::tcp(
                    S::CLIENT_A,
                    S::sock(S::SNAT, PORT_MAX),
                    TCP_ACK,
                )),
                ci,
            ),
        ];
        for (desc, p, ingress) in &drops {
            h.check(&Fixture::unchanged(
                *desc,
                p.bytes(),
                *ingress,
                XDP_DROP,
                Reason::DropNoFlowSnatPort,
            ));
        }
        assert_eq!(
            h.reasons()[Reason::DropNoFlowSnatPort as usize],
            before + drops.len() as u64,
            "XP_REASONS[drop_no_flow_snat_port]"
        );
        let passes = [
            (
                "TCP to the SNAT address, the port below the range (SSH-like)",
                from_upstream(Packet::tcp(
                    S::UPS_TCP,
                    S::sock(S::SNAT, PORT_MIN - 1),
                    TCP_ACK,
                )),
                hi,
            ),
            (
                "TCP to the SNAT address, the port above the range (ephemeral)",
                from_upstream(Packet::tcp(
                    S::UPS_TCP,
                    S::sock(S::SNAT, PORT_MAX + 1),
                    TCP_SYN | TCP_ACK,
                )),
                hi,
            ),
            (
                "UDP to another address at a SNAT range port",
                from_upstream(Packet::udp(S::UPS_UDP, S::sock(S::STRANGER, 25_000), b"x")),
                hi,
            ),
        ];
        for (desc, p, ingress) in passes {
            h.check(&Fixture::unchanged(
                desc,
                p.bytes(),
                ingress,
                XDP_PASS,
                Reason::PassNotService,
            ));
        }
        assert_no_flows(h, "unmatched SNAT ports");
        // A live flow's port: its upstream's segment is the reply.
        let flow = open_tcp_in::<S>(h);
        reply_syn_ack(h, &flow);
    });
}

/// IPv4 but neither TCP nor UDP (ICMP echo to the service address): passed untouched.
#[test]
fn non_tcp_udp_passes() {
    with_harness(|h| {
        let echo = [8, 0, 0xf7, 0xfe, 0, 1, 0, 0];
        let p = from_client(Packet::other(CLIENT_1, SERVICE_IP, IPPROTO_ICMP, &echo));
        h.check(&Fixture::unchanged(
            "ICMP echo to the service address",
            p.bytes(),
            h.client_if,
            XDP_PASS,
            Reason::PassNotTcpUdp,
        ));
    });
}

/// The config entry without CONFIG_F_READY: every packet is passed untouched.
#[test]
fn not_ready_config_passes() {
    not_ready_config_passes_in::<V4>();
}

#[test]
fn not_ready_config_passes_v6() {
    not_ready_config_passes_in::<V6>();
}

fn not_ready_config_passes_in<S: Fam>() {
    with_harness(|h| {
        let cfg = NatConfig {
            flags: 0,
            ..h.config
        };
        h.set_config(cfg);
        h.steer(
            &Tuple::new(S::CLIENT_A, S::SVC_TCP, IPPROTO_TCP),
            SVC_TCP_ID,
            S::UPS_TCP_ID,
        );
        let p = from_client(Packet::tcp(S::CLIENT_A, S::SVC_TCP, TCP_SYN));
        h.check(&Fixture::unchanged(
            "TCP SYN to a service, config not ready",
            p.bytes(),
            h.client_if,
            XDP_PASS,
            Reason::PassNotReady,
        ));
        assert_no_flows(h, "not ready");
    });
}

// =============================================================================================
// Malformed, truncated, fragments, options.
// =============================================================================================

/// An Ethernet header cut short. The kernel refuses `data_in` under 14 bytes (EINVAL), so the
/// frame is given whole but only its first 10 bytes are the linear part the program sees
/// (`xdp_md.data_end = 10`; kernel 6.18 puts the rest of `data_in` in a fragment the program
/// cannot read, and copies it back out unchanged). The inputs are chosen so that a program that
/// saw the whole frame would answer differently (ARP: PassNotIp; the SYN: a new flow).
#[test]
fn truncated_ethernet_drops() {
    with_harness(|h| {
        h.steer(
            &Tuple::new(CLIENT_A, SVC_TCP, IPPROTO_TCP),
            SVC_TCP_ID,
            UPS_TCP_ID,
        );
        let arp = raw_frame(CLIENT_DEV_MAC, CLIENT_ROUTER_MAC, ETH_P_ARP, &[0; 28]);
        let syn = from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_SYN)).bytes();
        for (desc, frame) in [
            ("ARP frame, Ethernet header truncated to 10 bytes", arp),
            (
                "TCP SYN to a service, Ethernet header truncated to 10 bytes",
                syn,
            ),
        ] {
            let mut fx =
                Fixture::unchanged(desc, frame, h.client_if, XDP_DROP, Reason::DropTruncated);
            fx.linear_len = Some(10);
            h.check(&fx);
        }
        assert_no_flows(h, "truncated Ethernet");
    });
}

/// IPv4 header cut short (10 of 20 bytes), and a frame that ends right after Ethernet.
#[test]
fn truncated_ipv4_drops() {
    with_harness(|h| {
        let full = from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_SYN)).bytes();
        for (desc, len) in [
            ("IPv4 header truncated to 10 bytes", ETH_HLEN + 10),
            ("Ethernet header only, EtherType IPv4", ETH_HLEN),
        ] {
            h.check(&Fixture::unchanged(
                desc,
                full[..len].to_vec(),
                h.client_if,
                XDP_DROP,
                Reason::DropTruncated,
            ));
        }
        assert_no_flows(h, "truncated IPv4");
    });
}

/// TCP header cut short: the frame ends 10 bytes into the TCP header (once with the IP total
/// length telling the truth, once claiming the full segment).
#[test]
fn truncated_tcp_drops() {
    with_harness(|h| {
        h.steer(
            &Tuple::new(CLIENT_A, SVC_TCP, IPPROTO_TCP),
            SVC_TCP_ID,
            UPS_TCP_ID,
        );
        let full = from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_SYN)).bytes();
        let cut = ETH_HLEN + 20 + 10;
        let mut honest = full[..cut].to_vec();
        set_u16(&mut honest, ETH_HLEN + 2, 30);
        fix_ip_checksum(&mut honest);
        let claiming = full[..cut].to_vec();
        for (desc, frame) in [
            ("TCP header truncated to 10 bytes, IP length 30", honest),
            ("TCP header truncated to 10 bytes, IP length 40", claiming),
        ] {
            h.check(&Fixture::unchanged(
                desc,
                frame,
                h.client_if,
                XDP_DROP,
                Reason::DropTruncated,
            ));
        }
        assert_no_flows(h, "truncated TCP");
    });
}

/// UDP header cut short: 4 of 8 bytes.
#[test]
fn truncated_udp_drops() {
    with_harness(|h| {
        h.steer(
            &Tuple::new(CLIENT_A, SVC_UDP, IPPROTO_UDP),
            SVC_UDP_ID,
            UPS_UDP_ID,
        );
        let full = from_client(Packet::udp(CLIENT_A, SVC_UDP, b"")).bytes();
        let cut = ETH_HLEN + 20 + 4;
        let mut honest = full[..cut].to_vec();
        set_u16(&mut honest, ETH_HLEN + 2, 24);
        fix_ip_checksum(&mut honest);
        let claiming = full[..cut].to_vec();
        for (desc, frame) in [
            ("UDP header truncated to 4 bytes, IP length 24", honest),
            ("UDP header truncated to 4 bytes, IP length 28", claiming),
        ] {
            h.check(&Fixture::unchanged(
                desc,
                frame,
                h.client_if,
                XDP_DROP,
                Reason::DropTruncated,
            ));
        }
        assert_no_flows(h, "truncated UDP");
    });
}

/// Malformed headers the contract also counts as truncated: IPv4 version != 4, IHL < 5, total
/// length beyond the frame or shorter than the headers, TCP data offset < 5 or beyond the frame.
#[test]
fn malformed_headers_drop() {
    with_harness(|h| {
        h.steer(
            &Tuple::new(CLIENT_A, SVC_TCP, IPPROTO_TCP),
            SVC_TCP_ID,
            UPS_TCP_ID,
        );
        let syn = from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_SYN)).bytes();
        let ip = ETH_HLEN;
        let tcp = ETH_HLEN + 20;
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = syn.clone();
            f(&mut b);
            b
        };
        let cases = [
            (
                "IPv4 version 6 in an IPv4 frame",
                edit(&|b| {
                    b[ip] = 0x65;
                    fix_ip_checksum(b);
                }),
            ),
            (
                "IPv4 IHL 4",
                edit(&|b| {
                    b[ip] = 0x44;
                    b[ip + 10] = 0;
                    b[ip + 11] = 0;
                    let c = proxy_common::checksum::checksum(&b[ip..ip + 20]);
                    set_u16(b, ip + 10, c);
                }),
            ),
            (
                "IPv4 total length beyond the frame",
                edit(&|b| {
                    set_u16(b, ip + 2, 41);
                    fix_ip_checksum(b);
                }),
            ),
            (
                "IPv4 total length shorter than IP + TCP headers",
                edit(&|b| {
                    set_u16(b, ip + 2, 39);
                    fix_ip_checksum(b);
                }),
            ),
            ("TCP data offset 4", edit(&|b| b[tcp + 12] = 0x40)),
            (
                "TCP data offset 15, beyond the frame",
                edit(&|b| b[tcp + 12] = 0xf0),
            ),
        ];
        for (desc, frame) in cases {
            h.check(&Fixture::unchanged(
                desc,
                frame,
                h.client_if,
                XDP_DROP,
                Reason::DropTruncated,
            ));
        }
        assert_no_flows(h, "malformed headers");
    });
}

/// IPv4 options (IHL > 5): never rewritten, passed untouched, even to a service.
#[test]
fn ipv4_options_pass() {
    with_harness(|h| {
        h.steer(
            &Tuple::new(CLIENT_A, SVC_TCP, IPPROTO_TCP),
            SVC_TCP_ID,
            UPS_TCP_ID,
        );
        // Router alert (RFC 2113): 4 bytes, IHL 6.
        let p =
            from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_SYN)).ip_options(&[0x94, 0x04, 0, 0]);
        let b = p.bytes();
        assert_eq!(b[ETH_HLEN], 0x46, "IHL 6");
        h.check(&Fixture::unchanged(
            "TCP SYN to a service with IPv4 options (IHL 6)",
            b,
            h.client_if,
            XDP_PASS,
            Reason::PassIpOptions,
        ));
        assert_no_flows(h, "IPv4 options");
    });
}

/// IPv4 fragments (MF set, or a non-zero offset): never rewritten, passed untouched.
#[test]
fn ipv4_fragments_pass() {
    with_harness(|h| {
        h.steer(
            &Tuple::new(CLIENT_A, SVC_UDP, IPPROTO_UDP),
            SVC_UDP_ID,
            UPS_UDP_ID,
        );
        let first = from_client(Packet::udp(CLIENT_A, SVC_UDP, &[0x55; 64])).frag(IP_MF);
        // A later fragment: offset 9 (72 bytes), last one; its "UDP header" is payload data.
        let later = from_client(Packet::udp(CLIENT_A, SVC_UDP, &[0x55; 24])).frag(9);
        let middle = from_client(Packet::udp(CLIENT_A, SVC_UDP, &[0x55; 24])).frag(IP_MF | 9);
        for (desc, p) in [
            (
                "first fragment (MF, offset 0) of a UDP datagram to a service",
                first,
            ),
            ("last fragment (offset 72)", later),
            ("middle fragment (MF, offset 72)", middle),
        ] {
            h.check(&Fixture::unchanged(
                desc,
                p.bytes(),
                h.client_if,
                XDP_PASS,
                Reason::PassFragment,
            ));
        }
        // DF alone is not a fragment: the same datagram with DF is a new flow.
        let df = from_client(Packet::udp(CLIENT_A, SVC_UDP, &[0x55; 64])).frag(IP_DF);
        let r = h.run(&df.bytes(), h.client_if);
        assert_eq!(r.action, XDP_REDIRECT, "DF-only datagram is forwarded");
        assert_eq!(
            h.all_flows(MAP_FLOWS_FWD).len(),
            1,
            "only the DF datagram made a flow"
        );
    });
}

/// docs/datapath.md "Header shapes": the first matching row decides. Options win over
/// fragments, fragments over the protocol, and frames that are not plain Ethernet II IPv4
/// (802.1ad, an 802.3 length field) are never parsed as IPv4.
#[test]
fn header_shape_precedence() {
    with_harness(|h| {
        h.steer(
            &Tuple::new(CLIENT_A, SVC_TCP, IPPROTO_TCP),
            SVC_TCP_ID,
            UPS_TCP_ID,
        );
        let syn = from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_SYN));
        let ipv4 = syn.clone().bytes();
        let qinq = {
            let mut b = vec![0, 100];
            b.extend_from_slice(&ETH_P_IP.to_be_bytes());
            b.extend_from_slice(&ipv4[ETH_HLEN..]);
            raw_frame(CLIENT_DEV_MAC, CLIENT_ROUTER_MAC, 0x88a8, &b)
        };
        let len_field = raw_frame(
            CLIENT_DEV_MAC,
            CLIENT_ROUTER_MAC,
            u16::try_from(ipv4.len() - ETH_HLEN).unwrap_or(0),
            &ipv4[ETH_HLEN..],
        );
        let cases = [
            (
                "802.1ad (QinQ) tagged IPv4 SYN",
                qinq,
                XDP_PASS,
                Reason::PassNotIp,
            ),
            (
                "802.3 length field in place of the EtherType, IPv4 SYN after it",
                len_field,
                XDP_PASS,
                Reason::PassNotIp,
            ),
            (
                "IPv4 options and MF together: options decide",
                syn.clone()
                    .ip_options(&[0x94, 0x04, 0, 0])
                    .frag(IP_MF)
                    .bytes(),
                XDP_PASS,
                Reason::PassIpOptions,
            ),
            (
                "later fragment of an ICMP message: the fragment rule comes first",
                from_client(Packet::other(
                    CLIENT_1,
                    SERVICE_IP,
                    IPPROTO_ICMP,
                    &[3, 3, 0, 0, 0, 0, 0, 0],
                ))
                .frag(IP_MF | 3)
                .bytes(),
                XDP_PASS,
                Reason::PassFragment,
            ),
            (
                "first fragment of a TCP SYN to a service (MF, offset 0)",
                syn.clone().frag(IP_MF).bytes(),
                XDP_PASS,
                Reason::PassFragment,
            ),
            (
                "GRE to the service address",
                from_client(Packet::other(
                    CLIENT_1,
                    SERVICE_IP,
                    47,
                    &[0, 0, 0x08, 0, 1, 2, 3, 4],
                ))
                .bytes(),
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
        ];
        for (desc, frame, action, reason) in cases {
            h.check(&Fixture::unchanged(
                desc,
                frame,
                h.client_if,
                action,
                reason,
            ));
        }
        assert_no_flows(h, "header shapes");
    });
}

/// TCP options (MSS, SACK-permitted, timestamps, window scale: 20 bytes, data offset 10) are
/// carried unchanged in both directions; only addresses, ports, TTL and checksums change. A
/// wrong TCP checksum stays exactly as wrong (never verified, only updated).
#[test]
fn tcp_options_carried_unchanged() {
    tcp_options_carried_unchanged_in::<V4>();
}

#[test]
fn tcp_options_carried_unchanged_v6() {
    tcp_options_carried_unchanged_in::<V6>();
}

fn tcp_options_carried_unchanged_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let opts = [
            2, 4, 0x05, 0xb4, // MSS 1460
            4, 2, // SACK permitted
            8, 10, 0, 0, 0, 1, 0, 0, 0, 0, // timestamps
            1, // NOP
            3, 3, 7, // window scale 7
        ];
        let syn = from_client(Packet::tcp(S::CLIENT_A, S::SVC_TCP, TCP_SYN)).tcp_options(&opts);
        assert_eq!(
            syn.bytes()[ETH_HLEN + S::IP_HLEN + 12],
            0xa0,
            "data offset 10"
        );
        let (flow, _) = open_flow(
            h,
            "TCP SYN with 20 bytes of options, new flow",
            syn,
            SVC_TCP_ID,
            S::UPS_TCP,
            S::UPS_TCP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        let syn_ack = flow.upstream_tcp(TCP_SYN | TCP_ACK).tcp_options(&opts);
        h.check(&Fixture::new(
            "TCP SYN-ACK with 20 bytes of options (reply path)",
            syn_ack.bytes(),
            hi,
            XDP_REDIRECT,
            Reason::RevRedirect,
            Expect::Bytes(flow.rev_out(&syn_ack, ci)),
        ));

        // A corrupt checksum (off by one): the output's checksum is off by exactly as much.
        let ack = flow.client_tcp(TCP_ACK).seq_ack(0x1000_0002, 0x5000_0002);
        let mut input = ack.bytes();
        let csum = ETH_HLEN + S::IP_HLEN + 16;
        let bad = u16::from_be_bytes([input[csum], input[csum + 1]]).wrapping_add(1);
        set_u16(&mut input, csum, bad);
        let r = h.run(&input, ci);
        assert_eq!(
            r.action, XDP_REDIRECT,
            "a corrupt TCP checksum is still forwarded"
        );
        let good = flow.fwd_out(&ack, hi);
        assert_eq!(r.output.len(), good.len(), "output length");
        assert_eq!(
            r.output[..csum],
            good[..csum],
            "everything before the checksum"
        );
        assert_eq!(
            r.output[csum + 2..],
            good[csum + 2..],
            "everything after the checksum"
        );
        let out = u16::from_be_bytes([r.output[csum], r.output[csum + 1]]);
        let exp = u16::from_be_bytes([good[csum], good[csum + 1]]);
        assert_eq!(
            checksum::fold(checksum::add16(u32::from(exp), 1)),
            out,
            "the output checksum carries the same error (one's complement difference of 1)"
        );
    });
}

/// TTL 1 (and 0) cannot be forwarded: dropped, nothing rewritten. Checked on an established
/// flow (so it is the forwarding step, not flow creation, that decides).
#[test]
fn ttl_1_drops() {
    ttl_1_drops_in::<V4>();
}

#[test]
fn ttl_1_drops_v6() {
    ttl_1_drops_in::<V6>();
}

fn ttl_1_drops_in<S: Fam>() {
    with_harness(|h| {
        let flow = open_tcp_in::<S>(h);
        reply_syn_ack(h, &flow);
        let svc_before = h.svc_stats(SVC_TCP_ID);
        for ttl in [1, 0] {
            let p = flow
                .client_tcp(TCP_ACK)
                .seq_ack(0x1000_0002, 0x5000_0002)
                .ttl(ttl);
            h.check(&Fixture::unchanged(
                format!("TCP ACK of an established flow with TTL {ttl}"),
                p.bytes(),
                h.client_if,
                XDP_DROP,
                Reason::DropTtlExceeded,
            ));
        }
        let p = flow.upstream_tcp(TCP_ACK).ttl(1);
        h.check(&Fixture::unchanged(
            "TCP ACK from the upstream with TTL 1",
            p.bytes(),
            h.home_if,
            XDP_DROP,
            Reason::DropTtlExceeded,
        ));
        // Step 8 (entry accounting) comes before step 9: the dropped packets are counted in
        // their entries.
        let fwd = h.fwd_flow(&flow.fwd_tuple().key()).unwrap_or_default();
        let rev = h.rev_flow(&flow.rev_tuple().key()).unwrap_or_default();
        assert_eq!(
            (fwd.packets, rev.packets),
            (1 + 2, 1 + 1),
            "entry packets after TTL drops"
        );
        let svc = h.svc_stats(SVC_TCP_ID);
        assert_eq!(
            (svc.fwd_packets, svc.rev_packets),
            (svc_before.fwd_packets, svc_before.rev_packets),
            "dropped packets are neither forwarded nor passed: no fwd_/rev_ counts"
        );
        // TTL 2 still goes through, leaving with TTL 1.
        let p = flow
            .client_tcp(TCP_ACK)
            .seq_ack(0x1000_0002, 0x5000_0002)
            .ttl(2);
        h.check(&Fixture::new(
            "TCP ACK with TTL 2",
            p.bytes(),
            h.client_if,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&p, h.home_if)),
        ));
        // The SYN of a new flow with TTL 1 is dropped too. Steps 7 and 8 come before step 9, so
        // the flow exists afterwards (with this packet counted in its entry), but no traffic
        // counter moved.
        let t = Tuple::new(S::CLIENT_B, S::SVC_TCP, IPPROTO_TCP);
        h.steer(&t, SVC_TCP_ID, S::UPS_TCP_ID);
        let p = from_client(Packet::tcp(S::CLIENT_B, S::SVC_TCP, TCP_SYN)).ttl(1);
        let svc_before = h.svc_stats(SVC_TCP_ID);
        h.check(&Fixture::unchanged(
            "TCP SYN of a new flow with TTL 1",
            p.bytes(),
            h.client_if,
            XDP_DROP,
            Reason::DropTtlExceeded,
        ));
        let fwd = h
            .fwd_flow(&t.key())
            .unwrap_or_else(|| panic!("TTL-1 SYN: flow created"));
        assert_eq!(
            (fwd.packets, fwd.bytes),
            (1, u64::from(p.ip_len())),
            "TTL-1 SYN entry"
        );
        let svc = h.svc_stats(SVC_TCP_ID);
        assert_eq!(
            (svc.fwd_packets, svc.new_flows),
            (svc_before.fwd_packets, svc_before.new_flows + 1),
            "TTL-1 SYN: a new flow, no forwarded packet"
        );
    });
}

// =============================================================================================
// Upstream choice, SNAT ports, next hops.
// =============================================================================================

/// Ports are exhausted: every probed SNAT port already has a reverse entry for this upstream.
/// Once with a 4-port range (all taken), once with the default range where exactly the
/// SNAT_PORT_PROBES probed ports are taken (other ports are free but never probed). Dropped,
/// nothing written, never a reused port.
#[test]
fn snat_ports_exhausted() {
    snat_ports_exhausted_in::<V4>();
}

#[test]
fn snat_ports_exhausted_v6() {
    snat_ports_exhausted_in::<V6>();
}

fn snat_ports_exhausted_in<S: Fam>() {
    with_harness(|h| {
        let occupy = |h: &mut Harness, t: &Tuple<S>, ups: S| {
            for port in t.snat_probe_ports(&h.config) {
                let other = S::sock(S::STRANGER, port);
                let key = Tuple::new(ups, S::sock(S::SNAT, port), t.proto).key();
                h.insert_rev_flow(
                    key,
                    flow_value(S::SVC_TCP, other, FLOW_DIR_REPLY, SVC_TCP_ID, S::UPS_TCP_ID),
                );
            }
        };
        // Default range: the 32 probed ports of this tuple are taken.
        let t = Tuple::new(S::CLIENT_A, S::SVC_TCP, IPPROTO_TCP);
        h.steer(&t, SVC_TCP_ID, S::UPS_TCP_ID);
        occupy(h, &t, S::UPS_TCP);
        let rev_before = h.all_flows(MAP_FLOWS_REV);
        // 32 probes; a scattered probe may repeat an earlier one (proxy-common's hash docs).
        let distinct: std::collections::HashSet<u16> =
            t.snat_probe_ports(&h.config).into_iter().collect();
        assert_eq!(rev_before.len(), distinct.len());
        let p = from_client(Packet::tcp(S::CLIENT_A, S::SVC_TCP, TCP_SYN));
        // The log line is rate-limited (one per LOG_INTERVAL_NS): start from a clean state.
        h.set_log_rate(LogRate::default());
        h.check(&Fixture::unchanged(
            "TCP SYN, all 32 probed SNAT ports taken",
            p.bytes(),
            h.client_if,
            XDP_DROP,
            Reason::DropSnatExhausted,
        ));
        // Every retransmission is dropped and counted exactly, but only the first drop wrote a
        // log line (the rest fall within the second).
        for i in 0..5 {
            h.check(&Fixture::unchanged(
                format!("TCP SYN retransmission {i}, all probed ports taken"),
                p.bytes(),
                h.client_if,
                XDP_DROP,
                Reason::DropSnatExhausted,
            ));
        }
        let st = h.log_rate();
        assert_eq!(
            st.total, 6,
            "every drop seen by the log's rate limit: {st:?}"
        );
        assert_eq!(
            st.logged, 1,
            "one log line (for the first drop) within the second: {st:?}"
        );
        assert!(st.last_ns != 0, "{st:?}");
        // A second later (the line's time moved back), the next drop writes one line for the
        // five suppressed ones and itself.
        h.set_log_rate(LogRate {
            last_ns: st.last_ns - LOG_INTERVAL_NS,
            ..st
        });
        h.check(&Fixture::unchanged(
            "TCP SYN, a second after the last log line",
            p.bytes(),
            h.client_if,
            XDP_DROP,
            Reason::DropSnatExhausted,
        ));
        let st2 = h.log_rate();
        assert_eq!((st2.total, st2.logged), (7, 7), "{st2:?}");
        assert!(st2.last_ns > st.last_ns, "{st2:?}");
        // Small range: all 4 ports taken.
        h.set_config(NatConfig {
            port_min: 30_000,
            port_max: 30_003,
            ..h.config
        });
        let t = Tuple::new(S::CLIENT_B, S::SVC_TCP, IPPROTO_TCP);
        h.steer(&t, SVC_TCP_ID, S::UPS_TCP_ID);
        occupy(h, &t, S::UPS_TCP);
        let p = from_client(Packet::tcp(S::CLIENT_B, S::SVC_TCP, TCP_SYN));
        h.check(&Fixture::unchanged(
            "TCP SYN, 4-port range, all taken",
            p.bytes(),
            h.client_if,
            XDP_DROP,
            Reason::DropSnatExhausted,
        ));
        assert!(
            h.all_flows(MAP_FLOWS_FWD).is_empty(),
            "no forward entry written"
        );
        assert_eq!(
            h.all_flows(MAP_FLOWS_REV).len(),
            distinct.len() + 4,
            "no reverse entry written or removed"
        );
        for (k, v) in rev_before {
            assert_eq!(
                h.rev_flow(&k),
                Some(v),
                "pre-existing reverse entry untouched"
            );
        }
        assert_eq!(
            h.svc_stats(SVC_TCP_ID),
            TrafficCounters::default(),
            "XP_SVC_STATS"
        );
        assert_eq!(
            h.ups_stats(S::UPS_TCP_ID),
            TrafficCounters::default(),
            "XP_UPS_STATS"
        );
    });
}

/// Taken ports are skipped in probe order: with the first 5 probed ports of a tuple taken, the
/// new flow gets the 6th. A port taken for another upstream does not count.
#[test]
fn snat_probe_skips_taken_ports() {
    snat_probe_skips_taken_ports_in::<V4>();
}

#[test]
fn snat_probe_skips_taken_ports_v6() {
    snat_probe_skips_taken_ports_in::<V6>();
}

fn snat_probe_skips_taken_ports_in<S: Fam>() {
    with_harness(|h| {
        let t = Tuple::new(S::CLIENT_A, S::SVC_TCP, IPPROTO_TCP);
        let probes = t.snat_probe_ports(&h.config);
        for &port in &probes[..5] {
            let key = Tuple::new(S::UPS_TCP, S::sock(S::SNAT, port), IPPROTO_TCP).key();
            let other = S::sock(S::STRANGER, port);
            h.insert_rev_flow(
                key,
                flow_value(S::SVC_TCP, other, FLOW_DIR_REPLY, SVC_TCP_ID, S::UPS_TCP_ID),
            );
        }
        // The 6th probe is taken, but for upstream 5 (other port): free for upstream 1.
        let key = Tuple::new(S::UPS_TCP_2, S::sock(S::SNAT, probes[5]), IPPROTO_TCP).key();
        h.insert_rev_flow(
            key,
            flow_value(
                S::SVC_TCP,
                S::CLIENT_B,
                FLOW_DIR_REPLY,
                SVC_TCP_ID,
                S::UPS_TCP_2_ID,
            ),
        );
        let flow = open_tcp_in::<S>(h);
        assert_eq!(
            flow.snat.sock_port(),
            probes[5],
            "6th probe (first free for this upstream)"
        );
    });
}

/// Port preservation (docs/datapath.md step 7): a client port inside `port_range` is tried
/// first as the SNAT port. A client at port 25,000 (range 20,000-29,999) gets SNAT port 25,000;
/// a second client with the same port toward the same upstream collides and falls back to its
/// hashed probes; a client port outside the range (40,000) gets the first hashed probe as
/// before.
#[test]
fn snat_port_preserved() {
    snat_port_preserved_in::<V4>();
}

#[test]
fn snat_port_preserved_v6() {
    snat_port_preserved_in::<V6>();
}

fn snat_port_preserved_in<S: Fam>() {
    with_harness(|h| {
        const OWN: u16 = 25_000;
        assert!((PORT_MIN..=PORT_MAX).contains(&OWN));
        let (ci, hi) = (h.client_if, h.home_if);
        let open = |h: &mut Harness, desc: &str, client: S| {
            open_flow(
                h,
                desc,
                from_client(Packet::tcp(client, S::SVC_TCP, TCP_SYN)),
                SVC_TCP_ID,
                S::UPS_TCP,
                S::UPS_TCP_ID,
                ci,
                hi,
                XDP_REDIRECT,
                Reason::FwdRedirect,
            )
            .0
        };
        let a = S::sock(S::CLIENT_A.sock_ip(), OWN);
        let flow = open(h, "TCP SYN from a client port inside the range", a);
        assert_eq!(flow.snat.sock_port(), OWN, "the client's own port is kept");

        let b = S::sock(S::CLIENT_B.sock_ip(), OWN);
        let hashed = Tuple::new(b, S::SVC_TCP, IPPROTO_TCP).snat_hashed_ports(&h.config);
        let flow_b = open(h, "TCP SYN from the same port, another client", b);
        assert_ne!(
            flow_b.snat.sock_port(),
            OWN,
            "the taken port is never shared"
        );
        let first_free = hashed
            .into_iter()
            .find(|&p| p != OWN)
            .expect("a hashed probe");
        assert_eq!(
            flow_b.snat.sock_port(),
            first_free,
            "on collision: the hashed probes, as without preservation"
        );

        let outside = Tuple::new(S::CLIENT_A, S::SVC_TCP, IPPROTO_TCP);
        assert!(!(PORT_MIN..=PORT_MAX).contains(&S::CLIENT_A.sock_port()));
        let probe0 = outside.snat_hashed_ports(&h.config)[0];
        let flow_c = open(
            h,
            "TCP SYN from a client port outside the range",
            S::CLIENT_A,
        );
        assert_eq!(
            flow_c.snat.sock_port(),
            probe0,
            "a port outside the range: the first hashed probe"
        );
    });
}

/// The Maglev slot chosen by flow_hash picks the upstream: two flows steered to two upstreams
/// each go to theirs.
#[test]
fn maglev_slot_selects_upstream() {
    maglev_slot_selects_upstream_in::<V4>();
}

#[test]
fn maglev_slot_selects_upstream_v6() {
    maglev_slot_selects_upstream_in::<V6>();
}

fn maglev_slot_selects_upstream_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let (a, _) = open_flow(
            h,
            "TCP SYN steered to upstream 1",
            from_client(Packet::tcp(S::CLIENT_A, S::SVC_TCP, TCP_SYN)),
            SVC_TCP_ID,
            S::UPS_TCP,
            S::UPS_TCP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        let tb = Tuple::new(S::CLIENT_B, S::SVC_TCP, IPPROTO_TCP);
        assert_ne!(
            tb.maglev_slot(),
            a.fwd_tuple().maglev_slot(),
            "test needs two distinct slots"
        );
        let (b, _) = open_flow(
            h,
            "TCP SYN steered to upstream 5",
            from_client(Packet::tcp(S::CLIENT_B, S::SVC_TCP, TCP_SYN)),
            SVC_TCP_ID,
            S::UPS_TCP_2,
            S::UPS_TCP_2_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        assert_eq!((a.upstream, b.upstream), (S::UPS_TCP, S::UPS_TCP_2));
    });
}

/// Bad Maglev slots drop the new flow: empty slot (id 0), an inactive upstream slot, an id
/// beyond MAX_UPSTREAMS. Nothing is written.
#[test]
fn maglev_bad_upstream_drops() {
    maglev_bad_upstream_drops_in::<V4>();
}

#[test]
fn maglev_bad_upstream_drops_v6() {
    maglev_bad_upstream_drops_in::<V6>();
}

fn maglev_bad_upstream_drops_in<S: Fam>() {
    with_harness(|h| {
        let p = from_client(Packet::tcp(S::CLIENT_A, S::SVC_TCP, TCP_SYN));
        let t = p.tuple();
        h.set_upstream(
            7,
            UpstreamValue {
                flags: 0,
                ..upstream(S::UPS_TCP)
            },
        );
        for (desc, id) in [
            ("Maglev slot empty (upstream 0)", 0),
            ("Maglev slot -> inactive upstream 7", 7),
            ("Maglev slot -> upstream id MAX_UPSTREAMS", MAX_UPSTREAMS),
        ] {
            h.steer(&t, SVC_TCP_ID, id);
            h.check(&Fixture::unchanged(
                desc,
                p.bytes(),
                h.client_if,
                XDP_DROP,
                Reason::DropBadUpstream,
            ));
        }
        assert_no_flows(h, "bad upstream");
    });
}

/// A service whose upstream flag is unset: new flows are passed untouched.
#[test]
fn service_without_upstreams_passes() {
    service_without_upstreams_passes_in::<V4>();
}

#[test]
fn service_without_upstreams_passes_v6() {
    service_without_upstreams_passes_in::<V6>();
}

fn service_without_upstreams_passes_in<S: Fam>() {
    with_harness(|h| {
        let p = from_client(Packet::tcp(S::CLIENT_A, S::SVC_EMPTY, TCP_SYN));
        h.steer(&p.tuple(), SVC_EMPTY_ID, S::UPS_TCP_ID);
        h.check(&Fixture::unchanged(
            "TCP SYN to a service without upstreams",
            p.bytes(),
            h.client_if,
            XDP_PASS,
            Reason::PassNoUpstream,
        ));
        assert_no_flows(h, "no upstream");
    });
}

/// The upstream's next hop has no neighbour entry (FIB: NO_NEIGH): the packet is rewritten
/// (addresses, ports, checksums) but keeps its TTL and MACs, and is passed to the kernel. The
/// flow exists, and its next packet takes the same path.
#[test]
fn no_neigh_passes_rewritten() {
    no_neigh_passes_rewritten_in::<V4>();
}

#[test]
fn no_neigh_passes_rewritten_v6() {
    no_neigh_passes_rewritten_in::<V6>();
}

fn no_neigh_passes_rewritten_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let (flow, _) = open_flow(
            h,
            "TCP SYN to an upstream without a neighbour entry",
            from_client(Packet::tcp(S::CLIENT_A, S::SVC_NO_NEIGH, TCP_SYN)),
            SVC_NO_NEIGH_ID,
            S::UPS_NO_NEIGH,
            S::UPS_NO_NEIGH_ID,
            ci,
            hi,
            XDP_PASS,
            Reason::PassNoNeigh,
        );
        let p = flow.client_tcp(TCP_ACK).seq_ack(0x1000_0002, 0x5000_0002);
        h.check(&Fixture::new(
            "TCP ACK of that flow, still no neighbour",
            p.bytes(),
            ci,
            XDP_PASS,
            Reason::PassNoNeigh,
            Expect::Bytes(rewritten_only(&p, flow.snat, flow.upstream)),
        ));
        let svc = h.svc_stats(SVC_NO_NEIGH_ID);
        assert_eq!(
            svc.fwd_packets, 2,
            "passed flow packets count as fwd_packets"
        );
    });
}

/// No route to the upstream (FIB lookup fails otherwise): rewritten, TTL and MACs untouched,
/// passed, counted `PassFibFailed`.
#[test]
fn fib_failure_passes_rewritten() {
    fib_failure_passes_rewritten_in::<V4>();
}

#[test]
fn fib_failure_passes_rewritten_v6() {
    fib_failure_passes_rewritten_in::<V6>();
}

fn fib_failure_passes_rewritten_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        open_flow(
            h,
            "TCP SYN to an upstream without a route",
            from_client(Packet::tcp(S::CLIENT_A, S::SVC_NO_ROUTE, TCP_SYN)),
            SVC_NO_ROUTE_ID,
            S::UPS_NO_ROUTE,
            S::UPS_NO_ROUTE_ID,
            ci,
            hi,
            XDP_PASS,
            Reason::PassFibFailed,
        );
    });
}

/// The route leaves through an interface missing from the devmap (one the daemon does not
/// run): no redirect is possible there, so the rewritten packet is passed to the kernel with
/// its TTL and MACs untouched (`PassOutsideDevmap`), which forwards it by its own routing. The
/// next hop is not cached: the flow's next packet takes the same path, and once the interface
/// is back in the devmap the flow is redirected again.
#[test]
fn route_outside_devmap_passes_rewritten() {
    route_outside_devmap_passes_rewritten_in::<V4>();
}

#[test]
fn route_outside_devmap_passes_rewritten_v6() {
    route_outside_devmap_passes_rewritten_in::<V6>();
}

fn route_outside_devmap_passes_rewritten_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        h.devmap_remove(hi.ifindex);
        let (flow, _) = open_flow(
            h,
            "TCP SYN, the route to the upstream leaves outside the devmap",
            from_client(Packet::tcp(S::CLIENT_A, S::SVC_TCP, TCP_SYN)),
            SVC_TCP_ID,
            S::UPS_TCP,
            S::UPS_TCP_ID,
            ci,
            hi,
            XDP_PASS,
            Reason::PassOutsideDevmap,
        );
        let p = flow.client_tcp(TCP_ACK).seq_ack(0x1000_0002, 0x5000_0002);
        h.check(&Fixture::new(
            "TCP ACK of that flow, still outside the devmap",
            p.bytes(),
            ci,
            XDP_PASS,
            Reason::PassOutsideDevmap,
            Expect::Bytes(rewritten_only(&p, flow.snat, flow.upstream)),
        ));
        h.devmap_add(hi.ifindex);
        let p = flow.client_tcp(TCP_ACK).seq_ack(0x1000_0002, 0x5000_0002);
        h.check(&Fixture::new(
            "TCP ACK of that flow, the interface back in the devmap",
            p.bytes(),
            ci,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(forwarded(&p, flow.snat, flow.upstream, hi, UPSTREAM_MAC)),
        ));
    });
}

// =============================================================================================
// ICMP errors quoting a NATed packet (docs/datapath.md, "ICMP errors").
// =============================================================================================

/// A router on the home side (not a neighbour: only the source of its errors matters).
const HOME_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 254);
/// "Fragmentation needed" with a next-hop MTU of 1400.
const MTU_1400: [u8; 4] = [0, 0, 0x05, 0x78];

/// The first `n` bytes of the IP packet in `frame`.
fn ip_quote(frame: &[u8], n: usize) -> Vec<u8> {
    frame[ETH_HLEN..ETH_HLEN + n].to_vec()
}

/// An established TCP flow and a client data segment (100 bytes of payload) of it.
fn tcp_flow_with_data(h: &mut Harness) -> (Flow, Packet) {
    let flow = open_tcp(h);
    reply_syn_ack(h, &flow);
    let data = flow
        .client_tcp(TCP_ACK | TCP_PSH)
        .seq_ack(0x1000_0002, 0x5000_0002)
        .payload(&[0x61; 100]);
    (flow, data)
}

/// The flow entries of `flow`, to show an ICMP error leaves them alone.
fn entries(h: &Harness, flow: &Flow) -> (Option<FlowValue>, Option<FlowValue>) {
    (
        h.fwd_flow(&flow.fwd_tuple().key()),
        h.rev_flow(&flow.rev_tuple().key()),
    )
}

/// An error from the home side quoting (SNAT -> upstream), as the proxy forwarded a client
/// segment, goes to the client as (service -> client) quoting (client -> service): outer and
/// quoted addresses, quoted ports, outer TTL, every checksum. Three shapes of quote: the TCP
/// header and 8 payload bytes (the quoted TCP checksum is updated), the RFC 792 minimum of 8
/// TCP bytes (no checksum in the quote), and a time-exceeded quoting the whole segment.
#[test]
fn icmp_error_from_home_side_tcp() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let (flow, data) = tcp_flow_with_data(h);
        let sent = flow.fwd_out(&data, hi);
        // The client's segment as the quote must show it: as the proxy sent it (TTL - 1), with
        // the client's endpoints back.
        let as_client = data.clone().ttl(data.ttl - 1).bytes();
        let before = entries(h, &flow);
        let cases: [(&str, u8, u8, [u8; 4], usize); 3] = [
            (
                "fragmentation needed (MTU 1400) quoting IP + TCP header + 8 bytes",
                3,
                4,
                MTU_1400,
                48,
            ),
            (
                "host unreachable quoting IP + 8 bytes of TCP (no TCP checksum in the quote)",
                3,
                1,
                [0; 4],
                28,
            ),
            (
                "time exceeded quoting the whole segment",
                11,
                0,
                [0; 4],
                usize::from(data.ip_len()),
            ),
        ];
        for (desc, icmp_type, code, rest, n) in cases {
            let input = Packet::icmp(
                HOME_ROUTER,
                SNAT_IP,
                icmp_type,
                code,
                rest,
                &ip_quote(&sent, n),
            )
            .macs(UPSTREAM_MAC, HOME_DEV_MAC);
            let expected = Packet::icmp(
                SERVICE_IP,
                CLIENT_1,
                icmp_type,
                code,
                rest,
                &ip_quote(&as_client, n),
            )
            .ttl(input.ttl - 1)
            .macs(ci.mac, CLIENT_ROUTER_MAC);
            let out = expected.bytes();
            // The bytes the contract names, spelled out (the builder computed them in full).
            let q = ETH_HLEN + 20 + 8;
            assert_eq!(
                out[q + 12..q + 16],
                CLIENT_1.octets(),
                "{desc}: quoted source"
            );
            assert_eq!(
                out[q + 16..q + 20],
                SERVICE_IP.octets(),
                "{desc}: quoted destination"
            );
            assert_eq!(
                out[q + 20..q + 24],
                [0x9c, 0x40, 0, 80],
                "{desc}: quoted ports"
            );
            assert_eq!(
                out[ETH_HLEN + 20 + 4..q],
                rest,
                "{desc}: MTU / unused field unchanged"
            );
            h.check(&Fixture::new(
                format!("home side: {desc}"),
                input.bytes(),
                hi,
                XDP_REDIRECT,
                Reason::IcmpRedirect,
                Expect::Bytes(out),
            ));
        }
        assert_eq!(
            entries(h, &flow),
            before,
            "ICMP errors leave the flow entries alone"
        );
    });
}

/// UDP: port unreachable from the upstream itself quoting the whole datagram (quoted UDP
/// checksum updated), and the same for a datagram sent without checksum (quoted 0 stays 0).
#[test]
fn icmp_error_from_home_side_udp() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        for (desc, first) in [
            (
                "port unreachable quoting a UDP datagram",
                from_client(Packet::udp(CLIENT_A, SVC_UDP, b"ping")),
            ),
            (
                "port unreachable quoting a UDP datagram without checksum",
                from_client(Packet::udp(CLIENT_B, SVC_UDP, b"ping")).udp_zero_checksum(),
            ),
        ] {
            let (flow, _) = open_flow(
                h,
                &format!("{desc}: first datagram"),
                first.clone(),
                SVC_UDP_ID,
                UPS_UDP,
                UPS_UDP_ID,
                ci,
                hi,
                XDP_REDIRECT,
                Reason::FwdRedirect,
            );
            let sent = flow.fwd_out(&first, hi);
            let as_client = first.clone().ttl(first.ttl - 1).bytes();
            let n = usize::from(first.ip_len());
            let input = Packet::icmp(UPSTREAM_IP, SNAT_IP, 3, 3, [0; 4], &ip_quote(&sent, n))
                .macs(UPSTREAM_MAC, HOME_DEV_MAC);
            let expected = Packet::icmp(
                SERVICE_IP,
                flow.client.ip().to_owned(),
                3,
                3,
                [0; 4],
                &ip_quote(&as_client, n),
            )
            .ttl(input.ttl - 1)
            .macs(ci.mac, CLIENT_ROUTER_MAC)
            .bytes();
            let udp_check = ETH_HLEN + 20 + 8 + 20 + 6;
            if first.clone().bytes()[ETH_HLEN + 20 + 6..ETH_HLEN + 20 + 8] == [0, 0] {
                assert_eq!(
                    expected[udp_check..udp_check + 2],
                    [0, 0],
                    "{desc}: stays 0"
                );
            }
            h.check(&Fixture::new(
                desc,
                input.bytes(),
                hi,
                XDP_REDIRECT,
                Reason::IcmpRedirect,
                Expect::Bytes(expected),
            ));
        }
    });
}

/// An error from the client side quoting (service -> client), as the proxy delivered the
/// upstream's SYN-ACK, goes to the upstream as (SNAT -> upstream) quoting (upstream -> SNAT).
/// Redirected to the home side; arriving on the home side itself, sent back with XDP_TX.
#[test]
fn icmp_error_from_client_side() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let flow = open_tcp(h);
        let syn_ack = flow.upstream_tcp(TCP_SYN | TCP_ACK);
        let delivered = reply_syn_ack(h, &flow).output;
        let as_upstream = syn_ack.clone().ttl(syn_ack.ttl - 1).bytes();
        let n = 40;
        let icmp = |src_mac, dst_mac| {
            Packet::icmp(CLIENT_1, SERVICE_IP, 3, 3, [0; 4], &ip_quote(&delivered, n))
                .macs(src_mac, dst_mac)
        };
        let expect = |input: &Packet, egress: Iface| {
            Packet::icmp(
                SNAT_IP,
                UPSTREAM_IP,
                3,
                3,
                [0; 4],
                &ip_quote(&as_upstream, n),
            )
            .ttl(input.ttl - 1)
            .macs(egress.mac, UPSTREAM_MAC)
            .bytes()
        };
        let input = icmp(CLIENT_ROUTER_MAC, CLIENT_DEV_MAC);
        h.check(&Fixture::new(
            "client side: port unreachable quoting the delivered SYN-ACK",
            input.bytes(),
            ci,
            XDP_REDIRECT,
            Reason::IcmpRedirect,
            Expect::Bytes(expect(&input, hi)),
        ));
        let input = icmp(UPSTREAM_MAC, HOME_DEV_MAC);
        h.check(&Fixture::new(
            "client-side error arriving on the upstream's interface: XDP_TX",
            input.bytes(),
            hi,
            XDP_TX,
            Reason::IcmpTx,
            Expect::Bytes(expect(&input, hi)),
        ));
    });
}

/// ICMP that is not a translatable error about one of our flows is passed untouched; a
/// translatable one with TTL 1 is dropped; nothing is translated before the config is ready.
#[test]
fn icmp_not_translated() {
    with_harness(|h| {
        let hi = h.home_if;
        let (flow, data) = tcp_flow_with_data(h);
        let sent = flow.fwd_out(&data, hi);
        let quote = ip_quote(&sent, 48);
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut q = quote.clone();
            f(&mut q);
            q
        };
        let err = |src: Ipv4Addr, dst: Ipv4Addr, t: u8, q: &[u8]| {
            Packet::icmp(src, dst, t, 0, [0; 4], q).macs(UPSTREAM_MAC, HOME_DEV_MAC)
        };
        let no_flow = edit(&|q| {
            // Another SNAT port: no flow answers it.
            let port = u16::from_be_bytes([q[20], q[21]]) ^ 1;
            q[20..22].copy_from_slice(&port.to_be_bytes());
        });
        let options = {
            // The same quote with a 4-byte option (IHL 6).
            let mut q = quote[..20].to_vec();
            q[0] = 0x46;
            q.extend_from_slice(&[1, 1, 1, 1]);
            q.extend_from_slice(&quote[20..]);
            q
        };
        let later_fragment = edit(&|q| q[6..8].copy_from_slice(&[0, 9]));
        let echo_quote = {
            let mut q = quote[..20].to_vec();
            q[9] = IPPROTO_ICMP;
            q.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
            q
        };
        let cases = [
            (
                "destination unreachable quoting a SNAT port without a flow",
                err(HOME_ROUTER, SNAT_IP, 3, &no_flow),
                Reason::PassNotService,
            ),
            (
                "error addressed to someone else than the quoted packet's source",
                err(HOME_ROUTER, SERVICE_IP, 3, &quote),
                Reason::PassNotService,
            ),
            (
                "quote with IPv4 options",
                err(HOME_ROUTER, SNAT_IP, 3, &options),
                Reason::PassNotTcpUdp,
            ),
            (
                "quote of a later fragment",
                err(HOME_ROUTER, SNAT_IP, 3, &later_fragment),
                Reason::PassNotTcpUdp,
            ),
            (
                "quote of an ICMP echo",
                err(HOME_ROUTER, SNAT_IP, 3, &echo_quote),
                Reason::PassNotTcpUdp,
            ),
            (
                "quote shorter than IP + 8 bytes",
                err(HOME_ROUTER, SNAT_IP, 3, &quote[..24]),
                Reason::PassNotTcpUdp,
            ),
            (
                "ICMP redirect (type 5) quoting a flow packet",
                err(HOME_ROUTER, SNAT_IP, 5, &quote),
                Reason::PassNotTcpUdp,
            ),
            (
                "parameter problem (type 12) quoting a flow packet",
                err(HOME_ROUTER, SNAT_IP, 12, &quote),
                Reason::PassNotTcpUdp,
            ),
            (
                "echo request to the SNAT address",
                err(HOME_ROUTER, SNAT_IP, 8, &[0, 1, 0, 1]),
                Reason::PassNotTcpUdp,
            ),
        ];
        let before = entries(h, &flow);
        for (desc, p, reason) in cases {
            h.check(&Fixture::unchanged(desc, p.bytes(), hi, XDP_PASS, reason));
        }
        let mut cut = err(HOME_ROUTER, SNAT_IP, 3, &quote).bytes();
        cut.truncate(ETH_HLEN + 20 + 8 + 20 + 4);
        h.check(&Fixture::unchanged(
            "frame ends inside the quote (IP total length beyond the frame)",
            cut,
            hi,
            XDP_PASS,
            Reason::PassNotTcpUdp,
        ));
        for ttl in [1, 0] {
            h.check(&Fixture::unchanged(
                format!("translatable error with TTL {ttl}"),
                err(HOME_ROUTER, SNAT_IP, 3, &quote).ttl(ttl).bytes(),
                hi,
                XDP_DROP,
                Reason::DropTtlExceeded,
            ));
        }
        assert_eq!(entries(h, &flow), before, "flow entries untouched");
        let cfg = NatConfig {
            flags: 0,
            ..h.config
        };
        h.set_config(cfg);
        h.check(&Fixture::unchanged(
            "translatable error, config not ready",
            err(HOME_ROUTER, SNAT_IP, 3, &quote).bytes(),
            hi,
            XDP_PASS,
            Reason::PassNotReady,
        ));
    });
}

// =============================================================================================
// TCP MSS clamping (docs/datapath.md step 9).
// =============================================================================================

/// MSS option with `mss`.
fn mss_opt(mss: u16) -> [u8; 4] {
    let m = mss.to_be_bytes();
    [2, 4, m[0], m[1]]
}

/// Open a TCP flow with `syn` (its client port chosen by the caller) and expect the forwarded
/// SYN to look like `syn_out` (the same segment with possibly different options).
fn open_tcp_expecting<S: Fam>(
    h: &mut Harness,
    desc: &str,
    syn: &Packet<S>,
    syn_out: &Packet<S>,
) -> Flow<S> {
    let t = syn.tuple();
    h.steer(&t, SVC_TCP_ID, S::UPS_TCP_ID);
    let port = expected_snat_port(h, &t, S::UPS_TCP)
        .unwrap_or_else(|| panic!("{desc}: every probed SNAT port is taken"));
    let flow = Flow {
        client: t.src,
        service: t.dst,
        upstream: S::UPS_TCP,
        snat: S::sock(S::SNAT, port),
        proto: IPPROTO_TCP,
        service_id: SVC_TCP_ID,
        upstream_id: S::UPS_TCP_ID,
    };
    h.check(&Fixture::new(
        desc,
        syn.bytes(),
        h.client_if,
        XDP_REDIRECT,
        Reason::FwdRedirect,
        Expect::Bytes(flow.fwd_out(syn_out, h.home_if)),
    ));
    flow
}

/// With `mss_clamp = 1360` on the service, the MSS option of SYNs (client side) and SYN-ACKs
/// (upstream side) is lowered to 1360 when larger, at an even or odd offset, wherever it sits in
/// the 40 option bytes; smaller values, segments without SYN, segments without an MSS option
/// and malformed options are carried unchanged. Checksums are verified in full by `check`.
#[test]
fn mss_clamp_syn_and_syn_ack() {
    mss_clamp_syn_and_syn_ack_in::<V4>();
}

#[test]
fn mss_clamp_syn_and_syn_ack_v6() {
    mss_clamp_syn_and_syn_ack_in::<V6>();
}

fn mss_clamp_syn_and_syn_ack_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        h.set_service_options(
            SVC_TCP_ID,
            ServiceOptions {
                mss_clamp: 1360,
                ..ServiceOptions::default()
            },
        );
        let cat = |parts: &[&[u8]]| parts.concat();
        let ts: &[u8] = &[8, 10, 0, 0, 0, 1, 0, 0, 0, 0];
        let nops36 = [1u8; 36];
        let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
            (
                "SYN, MSS 1460 first (even offset) -> 1360",
                cat(&[&mss_opt(1460), &[4, 2, 1, 1]]),
                cat(&[&mss_opt(1360), &[4, 2, 1, 1]]),
            ),
            (
                "SYN, MSS 9000 after a NOP (odd offset) -> 1360",
                cat(&[&[1], &mss_opt(9000), &[1, 1, 1]]),
                cat(&[&[1], &mss_opt(1360), &[1, 1, 1]]),
            ),
            (
                "SYN, MSS 65535 in the last 4 of 40 option bytes -> 1360",
                cat(&[&nops36, &mss_opt(65_535)]),
                cat(&[&nops36, &mss_opt(1360)]),
            ),
            (
                "SYN, MSS after timestamps and window scale -> 1360",
                cat(&[ts, &[1, 3, 3, 7], &mss_opt(1460), &[1, 1]]),
                cat(&[ts, &[1, 3, 3, 7], &mss_opt(1360), &[1, 1]]),
            ),
            (
                "SYN, MSS 1200 (below the clamp): unchanged",
                mss_opt(1200).to_vec(),
                mss_opt(1200).to_vec(),
            ),
            (
                "SYN, MSS exactly 1360: unchanged",
                mss_opt(1360).to_vec(),
                mss_opt(1360).to_vec(),
            ),
            (
                "SYN without an MSS option: unchanged",
                cat(&[ts, &[1, 1]]),
                cat(&[ts, &[1, 1]]),
            ),
            (
                "SYN, MSS after EOL: unchanged",
                cat(&[&[0, 0, 0, 0], &mss_opt(1460)]),
                cat(&[&[0, 0, 0, 0], &mss_opt(1460)]),
            ),
            (
                "SYN, option of length 0 before the MSS: walk ends, unchanged",
                cat(&[&[5, 0, 1, 1], &mss_opt(1460)]),
                cat(&[&[5, 0, 1, 1], &mss_opt(1460)]),
            ),
            (
                "SYN, option running past the options before the MSS: unchanged",
                vec![1, 30, 40, 0, 2, 4, 5, 0xb4],
                vec![1, 30, 40, 0, 2, 4, 5, 0xb4],
            ),
            (
                "SYN, MSS option of length 6: unchanged",
                cat(&[&[2, 6, 0x05, 0xb4, 0, 0], &[1, 1]]),
                cat(&[&[2, 6, 0x05, 0xb4, 0, 0], &[1, 1]]),
            ),
        ];
        let mut last = None;
        for (i, (desc, opts, out_opts)) in cases.into_iter().enumerate() {
            let port = 41_000 + u16::try_from(i).unwrap_or(0);
            let client = S::sock(S::CLIENT_A.sock_ip(), port);
            let syn = from_client(Packet::tcp(client, S::SVC_TCP, TCP_SYN)).tcp_options(&opts);
            let out = from_client(Packet::tcp(client, S::SVC_TCP, TCP_SYN)).tcp_options(&out_opts);
            last = Some(open_tcp_expecting::<S>(h, desc, &syn, &out));
        }
        let flow = last.unwrap_or_else(|| panic!("no case ran"));

        // The upstream's SYN-ACK: clamped on the reply path too.
        let syn_ack = flow
            .upstream_tcp(TCP_SYN | TCP_ACK)
            .tcp_options(&cat(&[&mss_opt(8960), &[1, 1, 4, 2]]));
        let syn_ack_out = flow
            .upstream_tcp(TCP_SYN | TCP_ACK)
            .tcp_options(&cat(&[&mss_opt(1360), &[1, 1, 4, 2]]));
        h.check(&Fixture::new(
            "SYN-ACK from the upstream, MSS 8960 -> 1360",
            syn_ack.bytes(),
            hi,
            XDP_REDIRECT,
            Reason::RevRedirect,
            Expect::Bytes(flow.rev_out(&syn_ack_out, ci)),
        ));
        // Not a SYN: an MSS option (not valid there) is left alone.
        let ack = flow
            .client_tcp(TCP_ACK)
            .seq_ack(0x1000_0002, 0x5000_0002)
            .tcp_options(&mss_opt(1460));
        h.check(&Fixture::new(
            "ACK carrying an MSS option: not clamped",
            ack.bytes(),
            ci,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&ack, hi)),
        ));
    });
}

/// `mss_clamp = 0` (the default) clamps nothing: a SYN with MSS 9000 is carried as is.
#[test]
fn mss_clamp_off_by_default() {
    mss_clamp_off_by_default_in::<V4>();
}

#[test]
fn mss_clamp_off_by_default_v6() {
    mss_clamp_off_by_default_in::<V6>();
}

fn mss_clamp_off_by_default_in<S: Fam>() {
    with_harness(|h| {
        let syn =
            from_client(Packet::tcp(S::CLIENT_A, S::SVC_TCP, TCP_SYN)).tcp_options(&mss_opt(9000));
        open_tcp_expecting::<S>(h, "SYN, MSS 9000, no clamp configured", &syn, &syn);
    });
}

// =============================================================================================
// Client ACLs and the new-flow rate limit (docs/datapath.md step 7).
// =============================================================================================

/// A client of 198.51.100.0/24 other than CLIENT_1 and CLIENT_2.
const CLIENT_200: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);

/// Deny list: a /32 on the TCP service drops that client's new flows (SYN and, before the
/// midflow rule, any other segment) and nobody else's; the same prefix on another service does
/// not leak into this one; a flow opened before the deny keeps working (the ACL admits flows).
#[test]
fn acl_deny_list() {
    acl_deny_list_in::<V4>();
}

#[test]
fn acl_deny_list_v6() {
    acl_deny_list_in::<V6>();
}

fn acl_deny_list_in<S: Fam>() {
    with_harness(|h| {
        let ci = h.client_if;
        let flow = open_tcp_in::<S>(h); // S::CLIENT_A = S::CLIENT_A.sock_ip():40000, before any ACL
        h.acl_add(
            false,
            SVC_TCP_ID,
            S::CLIENT_A.sock_ip(),
            <S::Ip as IpFam>::BITS,
        );
        h.acl_add(
            false,
            SVC_UDP_ID,
            S::CLIENT_B.sock_ip(),
            <S::Ip as IpFam>::BITS,
        );
        let other_port = S::sock(S::CLIENT_A.sock_ip(), 40_001);
        h.steer(
            &Tuple::new(other_port, S::SVC_TCP, IPPROTO_TCP),
            SVC_TCP_ID,
            S::UPS_TCP_ID,
        );
        for (desc, p) in [
            (
                "SYN from a denied client",
                from_client(Packet::tcp(other_port, S::SVC_TCP, TCP_SYN)),
            ),
            (
                "ACK without a flow from a denied client (dropped, not passed for a RST)",
                from_client(Packet::tcp(other_port, S::SVC_TCP, TCP_ACK)),
            ),
        ] {
            h.check(&Fixture::unchanged(
                desc,
                p.bytes(),
                ci,
                XDP_DROP,
                Reason::DropAclDenied,
            ));
        }
        let reason_of = |h: &mut Harness, p: Packet<S>| {
            h.steer(&p.tuple(), SVC_TCP_ID, S::UPS_TCP_ID);
            let before = h.reasons();
            let r = h.run(&p.bytes(), ci);
            let after = h.reasons();
            let moved: Vec<Reason> = Reason::ALL
                .iter()
                .zip(before.iter().zip(after.iter()))
                .filter(|(_, (b, a))| a != b)
                .map(|(r, _)| *r)
                .collect();
            (r.action, moved)
        };
        // S::CLIENT_B.sock_ip() is denied on the UDP service only: its TCP SYN makes a flow.
        let (action, moved) = reason_of(
            h,
            from_client(Packet::tcp(S::CLIENT_B, S::SVC_TCP, TCP_SYN)),
        );
        assert_eq!(
            (action, moved),
            (XDP_REDIRECT, vec![Reason::FwdRedirect]),
            "a prefix denied on another service does not apply"
        );
        // The flow opened before the deny still forwards.
        let ack = flow.client_tcp(TCP_ACK).seq_ack(0x1000_0002, 0x5000_0002);
        h.check(&Fixture::new(
            "ACK of a flow opened before the deny",
            ack.bytes(),
            ci,
            XDP_REDIRECT,
            Reason::FwdRedirect,
            Expect::Bytes(flow.fwd_out(&ack, h.home_if)),
        ));
    });
}

/// Allow list (SVC_OPT_F_ALLOW_LIST on the UDP service, 198.51.100.0/25 allowed): .7 gets a
/// flow, .200 is dropped; a deny inside the allowed prefix wins over the allow.
#[test]
fn acl_allow_list() {
    acl_allow_list_in::<V4>();
}

#[test]
fn acl_allow_list_v6() {
    acl_allow_list_in::<V6>();
}

fn acl_allow_list_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        h.set_service_options(
            SVC_UDP_ID,
            ServiceOptions {
                flags: SVC_OPT_F_ALLOW_LIST,
                ..ServiceOptions::default()
            },
        );
        h.acl_add(true, SVC_UDP_ID, S::ALLOW_NET, S::ALLOW_LEN);
        h.acl_add(
            false,
            SVC_UDP_ID,
            S::CLIENT_B.sock_ip(),
            <S::Ip as IpFam>::BITS,
        );
        open_flow(
            h,
            "UDP from an allowed client",
            from_client(Packet::udp(S::CLIENT_A, S::SVC_UDP, b"hi")),
            SVC_UDP_ID,
            S::UPS_UDP,
            S::UPS_UDP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        let outside = S::sock(S::OUTSIDE, 5000);
        h.steer(
            &Tuple::new(outside, S::SVC_UDP, IPPROTO_UDP),
            SVC_UDP_ID,
            S::UPS_UDP_ID,
        );
        h.check(&Fixture::unchanged(
            "UDP from a client outside the allow list",
            from_client(Packet::udp(outside, S::SVC_UDP, b"hi")).bytes(),
            ci,
            XDP_DROP,
            Reason::DropAclNotAllowed,
        ));
        h.steer(
            &Tuple::new(S::CLIENT_B, S::SVC_UDP, IPPROTO_UDP),
            SVC_UDP_ID,
            S::UPS_UDP_ID,
        );
        h.check(&Fixture::unchanged(
            "UDP from a client allowed by prefix but denied by /32",
            from_client(Packet::udp(S::CLIENT_B, S::SVC_UDP, b"hi")).bytes(),
            ci,
            XDP_DROP,
            Reason::DropAclDenied,
        ));
        // The TCP service has no allow list: the same outside client is admitted there.
        let outside_tcp = S::sock(S::OUTSIDE, 5001);
        open_flow(
            h,
            "TCP SYN from the same client to a service without allow list",
            from_client(Packet::tcp(outside_tcp, S::SVC_TCP, TCP_SYN)),
            SVC_TCP_ID,
            S::UPS_TCP,
            S::UPS_TCP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
    });
}

/// New-flow rate limit (rate 1/s, burst 3 on the TCP service). A fresh bucket is full: three
/// SYNs from one client (three ports) make flows and spend it (the bucket's clock frozen after
/// the first: last refill in the future, no refill); the fourth SYN is dropped and another
/// client is unaffected. A bucket last refilled 2 s ago has 2 tokens again; one last
/// refilled at boot is refilled to exactly the burst. No assertion depends on how fast the test
/// runs.
#[test]
fn new_flow_rate_limit() {
    new_flow_rate_limit_in::<V4>();
}

#[test]
fn new_flow_rate_limit_v6() {
    new_flow_rate_limit_in::<V6>();
}

fn new_flow_rate_limit_in<S: Fam>() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        h.set_service_options(
            SVC_TCP_ID,
            ServiceOptions {
                new_flow_rate: 1,
                new_flow_burst: 3,
                ..ServiceOptions::default()
            },
        );
        let syn = |port: u16| {
            from_client(Packet::tcp(
                S::sock(S::CLIENT_A.sock_ip(), port),
                S::SVC_TCP,
                TCP_SYN,
            ))
        };
        let burst_syn = |h: &mut Harness, port: u16| {
            open_flow(
                h,
                &format!("SYN {} of the burst", port - 41_999),
                syn(port),
                SVC_TCP_ID,
                S::UPS_TCP,
                S::UPS_TCP_ID,
                ci,
                hi,
                XDP_REDIRECT,
                Reason::FwdRedirect,
            );
        };
        burst_syn(h, 42_000);
        let bucket = h
            .rate_state(SVC_TCP_ID, S::CLIENT_A.sock_ip())
            .unwrap_or_else(|| panic!("no bucket for the client"));
        assert_eq!(
            bucket.tokens,
            2 * RATE_TOKEN,
            "a new bucket starts full (3) and pays for its first flow"
        );
        // Freeze the bucket's clock (last refill in the future: no refill) so the rest of the
        // burst does not depend on the test's speed.
        h.set_rate_state(
            SVC_TCP_ID,
            S::CLIENT_A.sock_ip(),
            RateState {
                tokens: bucket.tokens,
                last_ns: u64::MAX / 2,
            },
        );
        burst_syn(h, 42_001);
        burst_syn(h, 42_002);
        let bucket = h
            .rate_state(SVC_TCP_ID, S::CLIENT_A.sock_ip())
            .unwrap_or_else(|| panic!("bucket gone"));
        assert_eq!(bucket.tokens, 0, "the burst is spent: {bucket:?}");
        h.steer(&syn(42_003).tuple(), SVC_TCP_ID, S::UPS_TCP_ID);
        h.check(&Fixture::unchanged(
            "fourth SYN within the same second",
            syn(42_003).bytes(),
            ci,
            XDP_DROP,
            Reason::DropRateLimited,
        ));
        assert_eq!(
            h.all_flows(MAP_FLOWS_FWD).len(),
            3,
            "the dropped SYN made no flow"
        );
        open_flow(
            h,
            "another client's SYN meanwhile",
            from_client(Packet::tcp(S::CLIENT_B, S::SVC_TCP, TCP_SYN)),
            SVC_TCP_ID,
            S::UPS_TCP,
            S::UPS_TCP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );

        // Refill: empty bucket, last refill 2 s ago -> 2 tokens -> admitted, 1 left (+ the
        // refill of the microseconds since, < 1 token).
        h.set_rate_state(
            SVC_TCP_ID,
            S::CLIENT_A.sock_ip(),
            RateState {
                tokens: 0,
                last_ns: mono_ns() - 2_000_000_000,
            },
        );
        open_flow(
            h,
            "SYN after 2 s of refill",
            syn(42_004),
            SVC_TCP_ID,
            S::UPS_TCP,
            S::UPS_TCP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        let b = h
            .rate_state(SVC_TCP_ID, S::CLIENT_A.sock_ip())
            .unwrap_or_else(|| panic!("bucket gone"));
        assert!(
            b.tokens >= RATE_TOKEN && b.tokens < 2 * RATE_TOKEN,
            "2 s of refill at 1/s minus one flow leaves one token (and change): {b:?}"
        );
        // Idle since boot: refilled to the burst exactly, minus the one flow.
        h.set_rate_state(
            SVC_TCP_ID,
            S::CLIENT_A.sock_ip(),
            RateState {
                tokens: 0,
                last_ns: 0,
            },
        );
        open_flow(
            h,
            "SYN after a long idle time",
            syn(42_005),
            SVC_TCP_ID,
            S::UPS_TCP,
            S::UPS_TCP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        let b = h
            .rate_state(SVC_TCP_ID, S::CLIENT_A.sock_ip())
            .unwrap_or_else(|| panic!("bucket gone"));
        assert_eq!(
            b.tokens,
            2 * RATE_TOKEN,
            "refill is capped at the burst (3) minus one"
        );
    });
}

// =============================================================================================
// IPv6 only (docs/datapath.md, "IPv6").
// =============================================================================================

/// Insert extension header `ext` (type `next_type`, its own next-header byte set to the frame's
/// upper protocol) between the IPv6 header and the L4 header of `frame`, fixing the payload
/// length.
fn with_ext_header(frame: &[u8], next_type: u8, ext_body: &[u8]) -> Vec<u8> {
    let ip = ETH_HLEN;
    let upper = frame[ip + 6];
    let mut ext = vec![upper];
    ext.extend_from_slice(ext_body);
    let mut out = frame[..ip + 40].to_vec();
    out[ip + 6] = next_type;
    let len = u16::from_be_bytes([out[ip + 4], out[ip + 5]]) + u16::try_from(ext.len()).unwrap();
    set_u16(&mut out, ip + 4, len);
    out.extend_from_slice(&ext);
    out.extend_from_slice(&frame[ip + 40..]);
    out
}

/// Every IPv6 header shape the parser meets before steps 4-10, each with its one rule: the
/// Fragment header -> `PassFragment`; any other extension header -> `PassIpOptions` (never
/// walked, never rewritten); ICMPv6 (echo, NDP) and other protocols -> `PassNotTcpUdp`,
/// untouched; malformed or truncated -> `DropTruncated`. The tuples are steered, so a wrongly
/// parsed packet would make a flow.
#[test]
fn ipv6_header_shapes() {
    with_harness(|h| {
        let ci = h.client_if;
        let syn = from_client(Packet::tcp(CLIENT6_A, SVC6_TCP, TCP_SYN));
        let udp = from_client(Packet::udp(CLIENT6_A, SVC6_UDP, b"query"));
        h.steer(&syn.tuple(), SVC_TCP_ID, UPS6_TCP_ID);
        h.steer(&udp.tuple(), SVC_UDP_ID, UPS6_UDP_ID);
        let syn_b = syn.bytes();
        let udp_b = udp.bytes();
        // An options header (hop-by-hop, destination options): next, length 0 (8 bytes), PadN.
        let opts: &[u8] = &[0, 1, 4, 0, 0, 0, 0];
        // Routing header type 0 ... 8 bytes: next, len 0, type 4, segments left 0, 4 reserved.
        let routing: &[u8] = &[0, 4, 0, 0, 0, 0, 0];
        // Fragment header: next, reserved, offset 0 + M, identification.
        let first_frag: &[u8] = &[0, 0, 1, 0, 0, 0x12, 0x34];
        let later_frag: &[u8] = &[0, 0, 0x50, 0, 0, 0x12, 0x34];
        let icmp = |t: u8, body: &[u8]| {
            from_client(Packet::<V6>::icmpv6(
                CLIENT6_1,
                SERVICE_IP6,
                t,
                0,
                [0; 4],
                body,
            ))
            .bytes()
        };
        let target = SERVICE_IP6.octets();
        let mut version4 = syn_b.clone();
        version4[ETH_HLEN] = 0x40;
        let mut long_payload = syn_b.clone();
        set_u16(&mut long_payload, ETH_HLEN + 4, 21);
        let mut short_tcp_payload = syn_b.clone();
        set_u16(&mut short_tcp_payload, ETH_HLEN + 4, 19);
        let mut short_udp_payload = udp_b.clone();
        set_u16(&mut short_udp_payload, ETH_HLEN + 4, 7);
        let mut doff4 = syn_b.clone();
        doff4[ETH_HLEN + 40 + 12] = 0x40;
        let mut doff15 = syn_b.clone();
        doff15[ETH_HLEN + 40 + 12] = 0xf0;
        let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
            (
                "hop-by-hop options header before TCP",
                with_ext_header(&syn_b, 0, opts),
                Reason::PassIpOptions,
            ),
            (
                "destination options header before TCP",
                with_ext_header(&syn_b, 60, opts),
                Reason::PassIpOptions,
            ),
            (
                "routing header before UDP",
                with_ext_header(&udp_b, 43, routing),
                Reason::PassIpOptions,
            ),
            (
                "AH before TCP",
                with_ext_header(&syn_b, 51, opts),
                Reason::PassIpOptions,
            ),
            (
                "first fragment (offset 0, M) of UDP",
                with_ext_header(&udp_b, 44, first_frag),
                Reason::PassFragment,
            ),
            (
                "later fragment (offset 10) of UDP",
                with_ext_header(&udp_b, 44, later_frag),
                Reason::PassFragment,
            ),
            (
                "ICMPv6 echo request to the service address",
                icmp(128, &[0, 1, 0, 1, b'p', b'i', b'n', b'g']),
                Reason::PassNotTcpUdp,
            ),
            (
                "NDP router solicitation",
                icmp(133, &[]),
                Reason::PassNotTcpUdp,
            ),
            (
                "NDP neighbour solicitation for the service address",
                icmp(135, &target),
                Reason::PassNotTcpUdp,
            ),
            (
                "NDP neighbour advertisement",
                icmp(136, &target),
                Reason::PassNotTcpUdp,
            ),
            (
                "no next header (59)",
                from_client(Packet::<V6>::other6(CLIENT6_1, SERVICE_IP6, 59, &[])).bytes(),
                Reason::PassNotTcpUdp,
            ),
            (
                "SCTP (132)",
                from_client(Packet::<V6>::other6(CLIENT6_1, SERVICE_IP6, 132, &[0; 12])).bytes(),
                Reason::PassNotTcpUdp,
            ),
            ("EtherType IPv6, version 4", version4, Reason::DropTruncated),
            (
                "IPv6 header cut at 39 bytes",
                syn_b[..ETH_HLEN + 39].to_vec(),
                Reason::DropTruncated,
            ),
            (
                "payload length one byte past the frame",
                long_payload,
                Reason::DropTruncated,
            ),
            (
                "payload length 19 for TCP",
                short_tcp_payload,
                Reason::DropTruncated,
            ),
            (
                "payload length 7 for UDP",
                short_udp_payload,
                Reason::DropTruncated,
            ),
            ("TCP data offset 4", doff4, Reason::DropTruncated),
            (
                "TCP data offset 15, options beyond the frame",
                doff15,
                Reason::DropTruncated,
            ),
            (
                "UDP header cut at 7 bytes (payload length says 8)",
                {
                    let mut b = udp_b[..ETH_HLEN + 47].to_vec();
                    set_u16(&mut b, ETH_HLEN + 4, 7);
                    b
                },
                Reason::DropTruncated,
            ),
        ];
        // Precedence: the next-header rows decide before any length check.
        let past_frame = |mut b: Vec<u8>| {
            set_u16(&mut b, ETH_HLEN + 4, 1000);
            b
        };
        let mut cases = cases;
        cases.extend([
            (
                "hop-by-hop header, payload length past the frame",
                past_frame(with_ext_header(&syn_b, 0, opts)),
                Reason::PassIpOptions,
            ),
            (
                "fragment header, payload length past the frame",
                past_frame(with_ext_header(&udp_b, 44, first_frag)),
                Reason::PassFragment,
            ),
            (
                "ICMPv6 echo, payload length past the frame",
                past_frame(icmp(128, &[0, 1, 0, 1])),
                Reason::PassNotTcpUdp,
            ),
        ]);
        for (desc, frame, reason) in cases {
            h.check(&Fixture::unchanged(
                desc,
                frame,
                ci,
                reason.action(),
                reason,
            ));
        }
        assert_no_flows(h, "IPv6 header shapes");
    });
}

/// UDP checksum 0 is invalid in IPv6 (RFC 8200 section 8.1): to a service or on a flow it is
/// dropped (`DropUdpZeroChecksum`, nothing created or tracked); to anything else it is passed
/// untouched like any traffic the proxy does not own.
#[test]
fn ipv6_udp_zero_checksum() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let zero =
            from_client(Packet::udp(CLIENT6_A, SVC6_UDP, b"no checksum")).udp_zero_checksum();
        assert_eq!(&zero.bytes()[ETH_HLEN + 46..ETH_HLEN + 48], &[0, 0]);
        h.steer(&zero.tuple(), SVC_UDP_ID, UPS6_UDP_ID);
        h.check(&Fixture::unchanged(
            "IPv6 UDP checksum 0 to a service, no flow",
            zero.bytes(),
            ci,
            XDP_DROP,
            Reason::DropUdpZeroChecksum,
        ));
        assert_no_flows(h, "checksum 0 creates no flow");
        let other = from_client(Packet::udp(
            CLIENT6_A,
            SocketAddrV6::new(SERVICE_IP6, 5000, 0, 0),
            b"not ours",
        ))
        .udp_zero_checksum();
        h.check(&Fixture::unchanged(
            "IPv6 UDP checksum 0 to no service",
            other.bytes(),
            ci,
            XDP_PASS,
            Reason::PassNotService,
        ));
        let (flow, _) = open_flow(
            h,
            "IPv6 UDP, new flow",
            from_client(Packet::udp(CLIENT6_A, SVC6_UDP, b"query")),
            SVC_UDP_ID,
            UPS6_UDP,
            UPS6_UDP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        let fwd_before = h.fwd_flow(&flow.fwd_tuple().key());
        h.check(&Fixture::unchanged(
            "IPv6 UDP checksum 0 on an existing flow",
            zero.bytes(),
            ci,
            XDP_DROP,
            Reason::DropUdpZeroChecksum,
        ));
        assert_eq!(
            h.fwd_flow(&flow.fwd_tuple().key()),
            fwd_before,
            "not tracked"
        );
        let reply =
            from_upstream(Packet::udp(flow.upstream, flow.snat, b"answer")).udp_zero_checksum();
        h.check(&Fixture::unchanged(
            "IPv6 UDP reply with checksum 0",
            reply.bytes(),
            hi,
            XDP_DROP,
            Reason::DropUdpZeroChecksum,
        ));
    });
}

/// Without an IPv6 SNAT address (`snat_v6` all zero) no IPv6 flow is created: the packet is
/// passed untouched (`PassNoSnatV6`); IPv4 is not affected.
#[test]
fn ipv6_without_snat_address_passes() {
    with_harness(|h| {
        let cfg = NatConfig {
            snat_v6: [0; 16],
            ..h.config
        };
        h.set_config(cfg);
        let syn = from_client(Packet::tcp(CLIENT6_A, SVC6_TCP, TCP_SYN));
        h.steer(&syn.tuple(), SVC_TCP_ID, UPS6_TCP_ID);
        let udp = from_client(Packet::udp(CLIENT6_A, SVC6_UDP, b"q"));
        h.steer(&udp.tuple(), SVC_UDP_ID, UPS6_UDP_ID);
        for (desc, p) in [("IPv6 TCP SYN", syn), ("IPv6 UDP", udp)] {
            h.check(&Fixture::unchanged(
                format!("{desc}, no IPv6 SNAT address"),
                p.bytes(),
                h.client_if,
                XDP_PASS,
                Reason::PassNoSnatV6,
            ));
        }
        assert_no_flows(h, "no IPv6 SNAT address");
        assert_eq!(h.svc_stats(SVC_TCP_ID), TrafficCounters::default());
        open_tcp(h);
    });
}

/// Full NAT keeps the family: an IPv6 flow whose Maglev slot holds an IPv4 upstream is
/// dropped (`DropBadUpstream`), nothing created.
#[test]
fn ipv6_flow_to_an_ipv4_upstream_drops() {
    with_harness(|h| {
        let syn = from_client(Packet::tcp(CLIENT6_A, SVC6_TCP, TCP_SYN));
        h.steer(&syn.tuple(), SVC_TCP_ID, UPS_TCP_ID);
        h.check(&Fixture::unchanged(
            "IPv6 SYN, slot holds an IPv4 upstream",
            syn.bytes(),
            h.client_if,
            XDP_DROP,
            Reason::DropBadUpstream,
        ));
        assert_no_flows(h, "cross-family upstream");
    });
}

// =============================================================================================
// ICMPv6 errors (docs/datapath.md, "IPv6", "ICMPv6 errors").
// =============================================================================================

const HOME_ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 0xfe);
/// The MTU field of "packet too big": 1280.
const MTU6_1280: [u8; 4] = [0, 0, 0x05, 0x00];

/// An ICMPv6 error from `src` to `dst` quoting `quote`, as a frame arriving on `from`'s link.
fn icmp6_err(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    t: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Packet<V6> {
    Packet::<V6>::icmpv6(src, dst, t, code, rest, quote)
}

/// A home-side error quoting (SNAT -> upstream), as the proxy forwarded a client segment or
/// datagram, goes to the client as (service -> client) quoting (client -> service): outer and
/// quoted addresses, quoted ports, the quoted TCP/UDP checksum when quoted, the ICMPv6 checksum
/// (pseudo-header included), the outer hop limit; the MTU of "packet too big" is kept. Flow
/// entries are not touched.
#[test]
fn icmpv6_error_from_home_side() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let flow = open_tcp_in::<V6>(h);
        reply_syn_ack(h, &flow);
        let data = flow
            .client_tcp(TCP_ACK | TCP_PSH)
            .seq_ack(0x1000_0002, 0x5000_0002)
            .payload(&[0x61; 100]);
        let sent = flow.fwd_out(&data, hi);
        // The client's segment as the quote must show it: as the proxy sent it (hop limit - 1),
        // with the client's endpoints back.
        let as_client = data.clone().ttl(data.ttl - 1).bytes();
        let (udp_flow, _) = open_flow(
            h,
            "IPv6 UDP, new flow",
            from_client(Packet::udp(CLIENT6_B, SVC6_UDP, b"query")),
            SVC_UDP_ID,
            UPS6_UDP,
            UPS6_UDP_ID,
            ci,
            hi,
            XDP_REDIRECT,
            Reason::FwdRedirect,
        );
        let udp_in = from_client(Packet::udp(CLIENT6_B, SVC6_UDP, b"query"));
        let udp_sent = udp_flow.fwd_out(&udp_in, hi);
        let udp_as_client = udp_in.clone().ttl(udp_in.ttl - 1).bytes();
        let fwd_before = h.all_flows(MAP_FLOWS_FWD);
        let rev_before = h.all_flows(MAP_FLOWS_REV);
        // (description, type, code, rest, frame sent, its quote as the client sees it, quote
        // length, client).
        type Case<'a> = (
            &'a str,
            u8,
            u8,
            [u8; 4],
            &'a [u8],
            &'a [u8],
            usize,
            Ipv6Addr,
        );
        let cases: Vec<Case> = vec![
            (
                "packet too big (MTU 1280) quoting the IPv6 + TCP header + 8 bytes",
                2,
                0,
                MTU6_1280,
                &sent,
                &as_client,
                40 + 28,
                CLIENT6_1,
            ),
            (
                "destination unreachable (port) quoting IPv6 + 8 TCP bytes (no checksum)",
                1,
                4,
                [0; 4],
                &sent,
                &as_client,
                48,
                CLIENT6_1,
            ),
            (
                "time exceeded quoting the whole segment",
                3,
                0,
                [0; 4],
                &sent,
                &as_client,
                sent.len() - ETH_HLEN,
                CLIENT6_1,
            ),
            (
                "destination unreachable (address) quoting a UDP datagram",
                1,
                3,
                [0; 4],
                &udp_sent,
                &udp_as_client,
                48,
                CLIENT6_2,
            ),
        ];
        for (desc, t, code, rest, quoted, as_client, n, client) in cases {
            let input = from_upstream(icmp6_err(
                HOME_ROUTER6,
                SNAT_IP6,
                t,
                code,
                rest,
                &quoted[ETH_HLEN..ETH_HLEN + n],
            ));
            let expected = icmp6_err(
                SERVICE_IP6,
                client,
                t,
                code,
                rest,
                &as_client[ETH_HLEN..ETH_HLEN + n],
            )
            .ttl(input.ttl - 1)
            .macs(ci.mac, CLIENT_ROUTER_MAC);
            h.check(&Fixture::new(
                desc,
                input.bytes(),
                hi,
                XDP_REDIRECT,
                Reason::IcmpRedirect,
                Expect::Bytes(expected.bytes()),
            ));
        }
        assert_eq!(
            h.all_flows(MAP_FLOWS_FWD),
            fwd_before,
            "forward entries untouched"
        );
        assert_eq!(
            h.all_flows(MAP_FLOWS_REV),
            rev_before,
            "reverse entries untouched"
        );
    });
}

/// A client-side error quoting (service -> client), as the proxy delivered a reply, goes to the
/// upstream as (SNAT -> upstream) quoting (upstream -> SNAT).
#[test]
fn icmpv6_error_from_client_side() {
    with_harness(|h| {
        let (ci, hi) = (h.client_if, h.home_if);
        let flow = open_tcp_in::<V6>(h);
        let reply = flow.upstream_tcp(TCP_SYN | TCP_ACK);
        let delivered = flow.rev_out(&reply, ci);
        let as_upstream = reply.clone().ttl(reply.ttl - 1).bytes();
        for (desc, n) in [
            ("quoting IPv6 + 8 TCP bytes", 48),
            ("quoting the whole segment", delivered.len() - ETH_HLEN),
        ] {
            let input = from_client(icmp6_err(
                CLIENT_ROUTER6,
                SERVICE_IP6,
                1,
                1,
                [0; 4],
                &delivered[ETH_HLEN..ETH_HLEN + n],
            ));
            let expected = icmp6_err(
                SNAT_IP6,
                UPSTREAM_IP6,
                1,
                1,
                [0; 4],
                &as_upstream[ETH_HLEN..ETH_HLEN + n],
            )
            .ttl(input.ttl - 1)
            .macs(hi.mac, UPSTREAM_MAC);
            h.check(&Fixture::new(
                format!("destination unreachable from the client side, {desc}"),
                input.bytes(),
                ci,
                XDP_REDIRECT,
                Reason::IcmpRedirect,
                Expect::Bytes(expected.bytes()),
            ));
        }
        // Hop limit 1: not forwarded.
        let input = from_client(icmp6_err(
            CLIENT_ROUTER6,
            SERVICE_IP6,
            1,
            1,
            [0; 4],
            &delivered[ETH_HLEN..ETH_HLEN + 48],
        ))
        .ttl(1);
        h.check(&Fixture::unchanged(
            "ICMPv6 error with hop limit 1",
            input.bytes(),
            ci,
            XDP_DROP,
            Reason::DropTtlExceeded,
        ));
    });
}

/// ICMPv6 that is not a translatable error about one of our flows is passed untouched: echo,
/// NDP, parameter problem, errors quoting no flow, errors addressed to someone other than the
/// quoted source, quotes with an extension header or shorter than IPv6 + 8 bytes.
#[test]
fn icmpv6_not_translated() {
    with_harness(|h| {
        let hi = h.home_if;
        let flow = open_tcp_in::<V6>(h);
        let syn = flow.client_tcp(TCP_SYN);
        let sent = flow.fwd_out(&syn, hi);
        let quote = &sent[ETH_HLEN..ETH_HLEN + 48];
        let mut no_flow = quote.to_vec();
        no_flow[40..42].copy_from_slice(&1234u16.to_be_bytes());
        let ext = with_ext_header(&sent, 0, &[0, 1, 4, 0, 0, 0, 0]);
        let ext_quote = &ext[ETH_HLEN..ETH_HLEN + 56];
        let err = |t: u8, dst: Ipv6Addr, q: &[u8]| {
            from_upstream(icmp6_err(HOME_ROUTER6, dst, t, 0, [0; 4], q)).bytes()
        };
        let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
            (
                "echo request to the SNAT address",
                err(128, SNAT_IP6, &[0, 1, 0, 1]),
                Reason::PassNotTcpUdp,
            ),
            (
                "echo reply to the SNAT address",
                err(129, SNAT_IP6, &[0, 1, 0, 1]),
                Reason::PassNotTcpUdp,
            ),
            (
                "NDP neighbour solicitation for the SNAT address",
                err(135, SNAT_IP6, &SNAT_IP6.octets()),
                Reason::PassNotTcpUdp,
            ),
            (
                "NDP router advertisement",
                err(134, SNAT_IP6, &[0; 8]),
                Reason::PassNotTcpUdp,
            ),
            (
                "NDP redirect (137) quoting a flow packet",
                err(137, SNAT_IP6, quote),
                Reason::PassNotTcpUdp,
            ),
            (
                "parameter problem (4) quoting a flow packet",
                err(4, SNAT_IP6, quote),
                Reason::PassNotTcpUdp,
            ),
            (
                "destination unreachable quoting a SNAT port without a flow",
                err(1, SNAT_IP6, &no_flow),
                Reason::PassNotService,
            ),
            (
                "error addressed to someone else than the quoted source",
                err(1, SERVICE_IP6, quote),
                Reason::PassNotService,
            ),
            (
                "quote with a hop-by-hop header",
                err(1, SNAT_IP6, ext_quote),
                Reason::PassNotTcpUdp,
            ),
            (
                "quote shorter than IPv6 + 8 bytes",
                err(1, SNAT_IP6, &quote[..47]),
                Reason::PassNotTcpUdp,
            ),
        ];
        for (desc, frame, reason) in cases {
            h.check(&Fixture::unchanged(
                desc,
                frame,
                hi,
                reason.action(),
                reason,
            ));
        }
    });
}
