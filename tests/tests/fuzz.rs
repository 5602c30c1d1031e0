//! Malformed and hostile input: property-based fuzzing of the XDP program (through
//! `BPF_PROG_TEST_RUN` on the real object, maps filled) and of the config parser, plus
//! exhaustive sweeps that prove the proxy is no open relay.
//!
//! - `fuzzed_packets_never_forward_wrongly`: valid service packets (new TCP and UDP flows,
//!   packets of existing flows in both directions, FIN, TCP options, non-service packets, an
//!   ICMP error quoting a NATed packet; the same in IPv6, with an ICMPv6 error; the IPv6 TCP
//!   and UDP services get service ids of their own) built with `integration_tests::packet`,
//!   then mutated
//!   (random bytes of the headers XORed, optionally the IP header checksum fixed again so the
//!   mutation gets past it) and truncated, arriving on either interface. Every verdict must be
//!   one of the program's reasons with exactly that one reason counter bumped by one and its
//!   implied action; never `aborted`; a passed packet that no flow rewrote is untouched; a
//!   rewritten packet (forwarded, or passed to the kernel after its flow matched) keeps its
//!   length, has right IP and L4 checksums whenever the input's were right, matches a flow entry
//!   for its own 5-tuple and carries exactly that entry's rewrite, and goes either to an upstream
//!   address inside the home CIDRs (forward entries, whose key is a configured service) or back
//!   to the client of that very flow (reverse entries). After the run every flow entry in both
//!   tables belongs to a configured service and a configured upstream.
//!   Cases: `XPT_FUZZ_CASES` (default 4000), seed `XPT_FUZZ_SEED` (default fixed).
//! - `config_parser_never_panics`: arbitrary bytes, and valid configs mutated (bytes replaced,
//!   lines dropped or duplicated, values swapped for hostile ones), through
//!   `xdp_proxy::config::Config::parse` and `validate_runtime`: a value or an error, never a
//!   panic. Cases: `XPT_FUZZ_CONFIG_CASES` (default 3000).
//! - `no_open_relay_to_any_other_address_or_port`: in both families, TCP SYNs and UDP
//!   datagrams to every port of the service address and of the SNAT address (10.10.1.1,
//!   10.20.1.1, 2001:db8:10:1::1, 2001:db8:20:1::1), arriving on both interfaces, and to 13
//!   ports of other addresses (IPv4: the next hops, upstreams, broadcast, multicast, loopback,
//!   unspecified, link-local, beyond home; IPv6: the next hop, upstreams, link-local fe80::1,
//!   ff02::1, the solicited-node group ff02::1:ff00:1, ::1, ::, an address in home outside
//!   every upstream, 2001:db8:ffff::1, the IPv4-mapped ::ffff:10.20.1.2): 524,964 IPv4 and
//!   524,912 IPv6 packets; only the configured services are forwarded, everything else passes
//!   untouched (or is dropped), and only the services' probes make flows. Plus 42 ICMPv6 frames
//!   (router and neighbour solicitations, neighbour advertisements, router advertisement,
//!   redirect, echo request and reply, for the IPv6 service and SNAT addresses, both
//!   interfaces): each passes untouched, counted once as `pass_not_tcp_udp`.
//! - `reply_from_outside_home_for_a_snat_port_is_not_forwarded`: TCP and UDP from addresses
//!   outside the home CIDRs (and from home hosts that are not the flow's upstream, and from the
//!   upstream with another port; in IPv6 also link-local, loopback, IPv4-mapped, and addresses
//!   sharing the upstream's prefix or interface id) to the SNAT address and port of a live flow
//!   miss the reverse key (which includes the upstream's address and port) and are dropped:
//!   20 IPv4 and 40 IPv6 frames, all `drop_no_flow_snat_port`; both flows' entries are unchanged
//!   (the whole `FlowValue`, timestamps included).
//!
//! Run as root: `cargo test -p integration-tests --test fuzz -- --nocapture`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::path::Path;

use integration_tests::packet::topo::*;
use integration_tests::packet::{
    ETH_HLEN, Harness, IPPROTO_ICMP, Iface, Packet, Sock, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN,
    Tuple, XdpMd, fix_ip_checksum, hex, hexdump, service_key, verify_checksums, with_harness,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use proxy_common::{
    FAMILY_IPV6, FlowKey, FlowValue, IPPROTO_TCP, IPPROTO_UDP, MAGLEV_SIZE, MAP_FLOWS_FWD,
    MAP_FLOWS_REV, REASON_COUNT, Reason, SERVICE_F_HAS_UPSTREAMS, ServiceValue, XDP_DROP, XDP_PASS,
    XDP_REDIRECT, XDP_TX, addr_v4_octets,
};

/// Default fixed seed (32 bytes for ChaCha): the same cases on every run unless overridden.
const DEFAULT_SEED: u64 = 0x5eed_f00d_0bad_cafe;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn runner(cases_var: &str, default_cases: u32, seed_salt: u64) -> (TestRunner, u32, u64) {
    let cases = u32::try_from(env_u64(cases_var, u64::from(default_cases))).unwrap_or(u32::MAX);
    let seed = env_u64("XPT_FUZZ_SEED", DEFAULT_SEED) ^ seed_salt;
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        chunk
            .copy_from_slice(&(seed.rotate_left(u32::try_from(i).unwrap_or(0) * 16)).to_le_bytes());
    }
    let config = PtConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..PtConfig::default()
    };
    (
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)),
        cases,
        seed,
    )
}

// =============================================================================================
// The packet fuzzer.
// =============================================================================================

const CLIENT_A: SocketAddrV4 = SocketAddrV4::new(CLIENT_1, 40_000);
const CLIENT_B: SocketAddrV4 = SocketAddrV4::new(CLIENT_2, 51_515);

/// Addresses the daemon would accept as upstreams (every upstream of the harness): the home
/// side (10.20.0.0/16, 2001:db8:20::/48) and the harness's no-route upstream's network
/// (10.99.0.0/16, 2001:db8:99::/48).
fn in_home(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            let o = ip.octets();
            o[0] == 10 && (o[1] == 20 || o[1] == 99)
        }
        IpAddr::V6(ip) => {
            let s = ip.segments();
            s[0] == 0x2001 && s[1] == 0xdb8 && (s[2] == 0x20 || s[2] == 0x99)
        }
    }
}

/// Every configured (service address, port, protocol) of the harness, both families.
fn services() -> HashSet<(IpAddr, u16, u8)> {
    let v4 = [
        (SVC_TCP, IPPROTO_TCP),
        (SVC_UDP, IPPROTO_UDP),
        (SVC_EMPTY, IPPROTO_TCP),
        (SVC_NO_NEIGH, IPPROTO_TCP),
        (SVC_NO_ROUTE, IPPROTO_TCP),
    ]
    .map(|(a, p)| (IpAddr::V4(*a.ip()), a.port(), p));
    let v6 = [
        (SVC6_TCP, IPPROTO_TCP),
        (SVC6_UDP, IPPROTO_UDP),
        (SVC6_EMPTY, IPPROTO_TCP),
        (SVC6_NO_NEIGH, IPPROTO_TCP),
        (SVC6_NO_ROUTE, IPPROTO_TCP),
    ]
    .map(|(a, p)| (IpAddr::V6(*a.ip()), a.port(), p));
    v4.into_iter().chain(v6).collect()
}

/// Every configured upstream (address, port) of the harness, both families.
fn upstreams() -> HashSet<(IpAddr, u16)> {
    let v4 = [UPS_TCP, UPS_UDP, UPS_NO_NEIGH, UPS_NO_ROUTE, UPS_TCP_2]
        .map(|a| (IpAddr::V4(*a.ip()), a.port()));
    let v6 = [UPS6_TCP, UPS6_UDP, UPS6_NO_NEIGH, UPS6_NO_ROUTE, UPS6_TCP_2]
        .map(|a| (IpAddr::V6(*a.ip()), a.port()));
    v4.into_iter().chain(v6).collect()
}

/// The address of a key or value of family `family`.
fn ip_of(a: &proxy_common::Addr, family: u8) -> IpAddr {
    if family == FAMILY_IPV6 {
        IpAddr::V6(Ipv6Addr::from(*a))
    } else {
        IpAddr::V4(Ipv4Addr::from(addr_v4_octets(a)))
    }
}

fn is_v6(frame: &[u8]) -> bool {
    frame.len() >= ETH_HLEN && frame[12..14] == [0x86, 0xdd]
}

/// Offset of the TTL / hop limit.
fn ttl_offset(frame: &[u8]) -> usize {
    if is_v6(frame) {
        ETH_HLEN + 7
    } else {
        ETH_HLEN + 8
    }
}

/// The flow key of an Ethernet + IPv4 + TCP/UDP frame, parsed independently of the program
/// (only what the key needs; `None` when the frame does not carry one).
fn key_of(frame: &[u8]) -> Option<FlowKey> {
    if is_v6(frame) {
        let ip = frame.get(ETH_HLEN..)?;
        let next = *ip.get(6)?;
        if !(next == IPPROTO_TCP || next == IPPROTO_UDP) || ip.len() < 44 {
            return None;
        }
        let addr = |i: usize| -> Option<Ipv6Addr> {
            Some(Ipv6Addr::from(
                <[u8; 16]>::try_from(ip.get(i..i + 16)?).ok()?,
            ))
        };
        return Some(
            Tuple::new(
                SocketAddrV6::new(addr(8)?, u16::from_be_bytes([ip[40], ip[41]]), 0, 0),
                SocketAddrV6::new(addr(24)?, u16::from_be_bytes([ip[42], ip[43]]), 0, 0),
                next,
            )
            .key(),
        );
    }
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    if !(proto == IPPROTO_TCP || proto == IPPROTO_UDP) || ip.len() < ihl + 4 {
        return None;
    }
    let l4 = &ip[ihl..];
    Some(
        Tuple::new(
            SocketAddrV4::new(
                Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                u16::from_be_bytes([l4[0], l4[1]]),
            ),
            SocketAddrV4::new(
                Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
                u16::from_be_bytes([l4[2], l4[3]]),
            ),
            proto,
        )
        .key(),
    )
}

/// The known flows the fuzzer's base packets belong to (created by running valid packets).
#[derive(Clone, Copy, Debug)]
struct Known {
    tcp_snat: SocketAddrV4,
    udp_snat: SocketAddrV4,
    tcp6_snat: SocketAddrV6,
    udp6_snat: SocketAddrV6,
}

fn from_client<S: Sock>(p: Packet<S>) -> Packet<S> {
    p.macs(CLIENT_ROUTER_MAC, CLIENT_DEV_MAC)
}

fn from_upstream<S: Sock>(p: Packet<S>) -> Packet<S> {
    p.macs(UPSTREAM_MAC, HOME_DEV_MAC)
}

const CLIENT6_A: SocketAddrV6 = SocketAddrV6::new(CLIENT6_1, 40_000, 0, 0);
const CLIENT6_B: SocketAddrV6 = SocketAddrV6::new(CLIENT6_2, 51_515, 0, 0);
/// Service ids of the IPv6 TCP and UDP services in the fuzzer (their own Maglev tables, as the
/// daemon gives each family's service its own id).
const SVC6_TCP_FUZZ_ID: u32 = 11;
const SVC6_UDP_FUZZ_ID: u32 = 12;

/// The valid packets the fuzzer starts from, with the interface each normally arrives on
/// (`true`: client side).
fn bases(k: Known) -> Vec<(&'static str, Vec<u8>, bool)> {
    let payload: Vec<u8> = (0u8..=200).collect();
    let tcp_fwd = from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_ACK | TCP_PSH)).payload(&payload);
    let quote = {
        // What the proxy sent to the upstream for the TCP flow: an ICMP error from the home
        // side quotes it.
        let sent = Packet::tcp(k.tcp_snat, UPS_TCP, TCP_ACK).ttl(63).bytes();
        sent[ETH_HLEN..ETH_HLEN + 48.min(sent.len() - ETH_HLEN)].to_vec()
    };
    vec![
        (
            "new TCP flow (SYN) to the TCP service",
            from_client(Packet::tcp(CLIENT_B, SVC_TCP, TCP_SYN)).bytes(),
            true,
        ),
        (
            "SYN with MSS, SACK and timestamp options",
            from_client(Packet::tcp(
                SocketAddrV4::new(CLIENT_2, 40_001),
                SVC_TCP,
                TCP_SYN,
            ))
            .tcp_options(&[
                2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0,
            ])
            .bytes(),
            true,
        ),
        ("data on an existing TCP flow", tcp_fwd.bytes(), true),
        (
            "FIN on an existing TCP flow",
            from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_ACK | TCP_FIN)).bytes(),
            true,
        ),
        (
            "reply on an existing TCP flow",
            from_upstream(Packet::tcp(UPS_TCP, k.tcp_snat, TCP_ACK | TCP_PSH))
                .payload(&payload)
                .bytes(),
            false,
        ),
        (
            "datagram on an existing UDP flow",
            from_client(Packet::udp(CLIENT_A, SVC_UDP, &payload)).bytes(),
            true,
        ),
        (
            "new UDP flow",
            from_client(Packet::udp(CLIENT_B, SVC_UDP, b"q")).bytes(),
            true,
        ),
        (
            "reply on an existing UDP flow",
            from_upstream(Packet::udp(UPS_UDP, k.udp_snat, &payload)).bytes(),
            false,
        ),
        (
            "TCP to a port that is no service",
            from_client(Packet::tcp(
                CLIENT_A,
                SocketAddrV4::new(SERVICE_IP, 22),
                TCP_SYN,
            ))
            .bytes(),
            true,
        ),
        (
            "reply to the SNAT port from outside home",
            from_client(Packet::tcp(
                SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), UPS_TCP.port()),
                k.tcp_snat,
                TCP_ACK,
            ))
            .bytes(),
            true,
        ),
        (
            "ICMP host unreachable quoting the TCP flow's packet",
            from_upstream(Packet::icmp(UPSTREAM_IP, SNAT_IP, 3, 1, [0; 4], &quote)).bytes(),
            false,
        ),
        (
            "IPv6: new TCP flow (SYN)",
            from_client(Packet::tcp(CLIENT6_B, SVC6_TCP, TCP_SYN)).bytes(),
            true,
        ),
        (
            "IPv6: data on an existing TCP flow",
            from_client(Packet::tcp(CLIENT6_A, SVC6_TCP, TCP_ACK | TCP_PSH))
                .payload(&payload)
                .bytes(),
            true,
        ),
        (
            "IPv6: reply on an existing TCP flow",
            from_upstream(Packet::tcp(UPS6_TCP, k.tcp6_snat, TCP_ACK | TCP_PSH))
                .payload(&payload)
                .bytes(),
            false,
        ),
        (
            "IPv6: datagram on an existing UDP flow",
            from_client(Packet::udp(CLIENT6_A, SVC6_UDP, &payload)).bytes(),
            true,
        ),
        (
            "IPv6: reply on an existing UDP flow",
            from_upstream(Packet::udp(UPS6_UDP, k.udp6_snat, &payload)).bytes(),
            false,
        ),
        (
            "IPv6: TCP to a port that is no service",
            from_client(Packet::tcp(
                CLIENT6_A,
                SocketAddrV6::new(SERVICE_IP6, 22, 0, 0),
                TCP_SYN,
            ))
            .bytes(),
            true,
        ),
        (
            "IPv6: ICMPv6 destination unreachable quoting the TCP flow's packet",
            {
                let sent = Packet::tcp(k.tcp6_snat, UPS6_TCP, TCP_ACK).ttl(63).bytes();
                let quote = &sent[ETH_HLEN..ETH_HLEN + 60];
                from_upstream(Packet::<SocketAddrV6>::icmpv6(
                    UPSTREAM_IP6,
                    SNAT_IP6,
                    1,
                    3,
                    [0; 4],
                    quote,
                ))
                .bytes()
            },
            false,
        ),
    ]
}

/// One fuzz case: which base, how to mutate it.
#[derive(Clone, Debug)]
struct Case {
    base: usize,
    /// (offset, xor) pairs applied in order; offsets beyond the frame are ignored.
    flips: Vec<(usize, u8)>,
    /// Recompute the IPv4 header checksum after the flips (so the mutation reaches the rest).
    fix_ip: bool,
    /// Keep only this many bytes (at least 14: the kernel refuses shorter input).
    truncate: Option<usize>,
    /// Arrive on the other interface than the base's usual one.
    swap_ingress: bool,
}

fn case_strategy(nbases: usize) -> impl Strategy<Value = Case> {
    // Offsets weighted towards the headers: Ethernet + IPv4 + TCP/UDP + some options.
    let flip = (0usize..80, 1u8..=255);
    (
        0..nbases,
        proptest::collection::vec(flip, 0..5),
        any::<bool>(),
        proptest::option::weighted(0.25, 14usize..120),
        proptest::bool::weighted(0.15),
    )
        .prop_map(|(base, flips, fix_ip, truncate, swap_ingress)| Case {
            base,
            flips,
            fix_ip,
            truncate,
            swap_ingress,
        })
}

fn mutate(base: &[u8], c: &Case) -> Vec<u8> {
    let mut f = base.to_vec();
    for &(off, x) in &c.flips {
        if let Some(b) = f.get_mut(off) {
            *b ^= x;
        }
    }
    if c.fix_ip && f.len() >= ETH_HLEN + 20 && f[12..14] == [0x08, 0x00] {
        let ihl = usize::from(f[ETH_HLEN] & 0x0f) * 4;
        if ihl >= 20 && f.len() >= ETH_HLEN + ihl {
            fix_ip_checksum(&mut f);
        }
    }
    if let Some(n) = c.truncate {
        f.truncate(n.max(ETH_HLEN));
    }
    f
}

/// Reasons whose packet was rewritten by a flow entry (forwarded, or passed after the rewrite).
fn rewritten(r: Reason) -> bool {
    matches!(
        r,
        Reason::FwdTx
            | Reason::FwdRedirect
            | Reason::RevTx
            | Reason::RevRedirect
            | Reason::PassNoNeigh
            | Reason::PassFibFailed
            | Reason::PassOutsideDevmap
    )
}

/// Check one run against every rule the fuzzer asserts; `Err` names the broken rule.
#[allow(clippy::too_many_lines, reason = "one rule after the other, in order")]
fn check_case(
    h: &Harness,
    input: &[u8],
    ingress: Iface,
    tally: &mut BTreeMap<&'static str, u64>,
) -> Result<(), String> {
    let before = h.reasons();
    let md = XdpMd {
        data_end: u32::try_from(input.len()).map_err(|e| e.to_string())?,
        ingress_ifindex: ingress.ifindex,
        ..XdpMd::default()
    };
    let run = h.try_run(input, md).map_err(|e| format!("{e:#}"))?;
    let after = h.reasons();
    let delta: Vec<(Reason, i128)> = Reason::ALL
        .iter()
        .zip(before.iter().zip(after.iter()))
        .map(|(r, (b, a))| (*r, i128::from(*a) - i128::from(*b)))
        .filter(|(_, d)| *d != 0)
        .collect();
    let [(reason, 1)] = delta[..] else {
        return Err(format!(
            "expected exactly one reason counter +1, got {delta:?}"
        ));
    };
    *tally.entry(reason.name()).or_default() += 1;
    if reason == Reason::Aborted {
        return Err("aborted".into());
    }
    if run.action != reason.action() {
        return Err(format!(
            "action {} but reason {} implies {}",
            run.action,
            reason.name(),
            reason.action()
        ));
    }
    let input_ok = verify_checksums(input).is_ok();
    let out = &run.output;
    // An ICMP error translated for a flow: `icmp_*`, or passed after the rewrite when the FIB
    // lookup could not forward it (the same `pass_no_neigh` / `pass_fib_failed` /
    // `pass_outside_devmap` as TCP/UDP).
    let icmp_input = (input.len() >= ETH_HLEN + 20
        && input[12..14] == [0x08, 0x00]
        && input[ETH_HLEN + 9] == IPPROTO_ICMP)
        || (is_v6(input) && input.len() >= ETH_HLEN + 40 && input[ETH_HLEN + 6] == 58);
    let icmp_translated = matches!(reason, Reason::IcmpTx | Reason::IcmpRedirect)
        || (icmp_input
            && matches!(
                reason,
                Reason::PassNoNeigh | Reason::PassFibFailed | Reason::PassOutsideDevmap
            ));
    if rewritten(reason) && !icmp_translated {
        if out.len() != input.len() {
            return Err(format!(
                "rewritten packet changed length {} -> {}",
                input.len(),
                out.len()
            ));
        }
        if input_ok && let Err(e) = verify_checksums(out) {
            return Err(format!("output checksum wrong (input's were right): {e:#}"));
        }
        let key = key_of(input).ok_or("a rewritten packet without a TCP/UDP 5-tuple")?;
        let out_key = key_of(out).ok_or("rewritten output is not IPv4 TCP/UDP")?;
        let (entry, forward) = match (h.fwd_flow(&key), h.rev_flow(&key)) {
            (Some(e), _) => (e, true),
            (None, Some(e)) => (e, false),
            (None, None) => {
                return Err("rewritten, but no flow entry has the input's 5-tuple".into());
            }
        };
        let want = FlowKey {
            src_addr: entry.new_src_addr,
            dst_addr: entry.new_dst_addr,
            src_port: entry.new_src_port,
            dst_port: entry.new_dst_port,
            ..key
        };
        if out_key != want {
            return Err(format!(
                "output 5-tuple {out_key:?} is not the entry's rewrite {want:?}"
            ));
        }
        let dst = ip_of(&out_key.dst_addr, out_key.family);
        if forward {
            let svc = (
                ip_of(&key.dst_addr, key.family),
                u16::from_be_bytes(key.dst_port),
                key.proto,
            );
            if !services().contains(&svc) {
                return Err(format!(
                    "forwarded a packet to {svc:?}, which is no service"
                ));
            }
            if !in_home(dst) {
                return Err(format!("forwarded to {dst}, outside the home CIDRs"));
            }
        } else {
            // A reply: it must go to the client of this very flow (its forward entry's key).
            let peer = FlowKey {
                src_addr: entry.new_dst_addr,
                dst_addr: entry.new_src_addr,
                src_port: entry.new_dst_port,
                dst_port: entry.new_src_port,
                ..key
            };
            let fwd = h.fwd_flow(&peer).ok_or_else(|| {
                format!("reply rewritten to {dst}, but no forward entry {peer:?}")
            })?;
            if fwd.new_dst_addr != key.src_addr || fwd.new_dst_port != key.src_port {
                return Err(format!(
                    "reply from {}:{} rewritten by a flow whose upstream is {}:{}",
                    ip_of(&key.src_addr, key.family),
                    u16::from_be_bytes(key.src_port),
                    ip_of(&fwd.new_dst_addr, key.family),
                    u16::from_be_bytes(fwd.new_dst_port)
                ));
            }
        }
        let ttl = ttl_offset(input);
        if matches!(run.action, XDP_TX | XDP_REDIRECT) && out[ttl] != input[ttl].wrapping_sub(1) {
            return Err("forwarded without decrementing the TTL by one".into());
        }
    } else if icmp_translated {
        if input_ok && let Err(e) = verify_checksums(out) {
            return Err(format!("translated ICMP checksum wrong: {e:#}"));
        }
        let dst = if is_v6(out) {
            let mut a = [0u8; 16];
            a.copy_from_slice(&out[ETH_HLEN + 24..ETH_HLEN + 40]);
            IpAddr::V6(Ipv6Addr::from(a))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                out[ETH_HLEN + 16],
                out[ETH_HLEN + 17],
                out[ETH_HLEN + 18],
                out[ETH_HLEN + 19],
            ))
        };
        let client_of_a_flow = h
            .all_flows(MAP_FLOWS_FWD)
            .iter()
            .any(|(k, _)| ip_of(&k.src_addr, k.family) == dst);
        if !(in_home(dst) || client_of_a_flow) {
            return Err(format!(
                "ICMP error sent to {dst}: neither home nor a flow's client"
            ));
        }
    } else if run.action == XDP_PASS {
        if out != input {
            return Err(format!(
                "passed ({}) but changed; output:\n{}",
                reason.name(),
                hexdump(out)
            ));
        }
    } else if run.action != XDP_DROP {
        return Err(format!("unexpected action {}", run.action));
    }
    Ok(())
}

/// Every entry in both tables belongs to a configured service and upstream.
fn check_tables(h: &Harness) -> Result<(usize, usize), String> {
    let svcs = services();
    let ups = upstreams();
    let fwd = h.all_flows(MAP_FLOWS_FWD);
    for (k, v) in &fwd {
        let svc = (
            ip_of(&k.dst_addr, k.family),
            u16::from_be_bytes(k.dst_port),
            k.proto,
        );
        if !svcs.contains(&svc) {
            return Err(format!(
                "forward entry {k:?} for {svc:?}, which is no service"
            ));
        }
        let up = (
            ip_of(&v.new_dst_addr, k.family),
            u16::from_be_bytes(v.new_dst_port),
        );
        if !ups.contains(&up) {
            return Err(format!(
                "forward entry {k:?} rewrites to {up:?}, no upstream"
            ));
        }
    }
    let rev = h.all_flows(MAP_FLOWS_REV);
    for (k, v) in &rev {
        let up = (ip_of(&k.src_addr, k.family), u16::from_be_bytes(k.src_port));
        if !ups.contains(&up) {
            return Err(format!("reverse entry {k:?} from {up:?}, no upstream"));
        }
        let svc = (
            ip_of(&v.new_src_addr, k.family),
            u16::from_be_bytes(v.new_src_port),
            k.proto,
        );
        if !svcs.contains(&svc) {
            return Err(format!(
                "reverse entry {k:?} answers as {svc:?}, no service"
            ));
        }
    }
    Ok((fwd.len(), rev.len()))
}

/// Point every Maglev slot of the TCP and UDP services at their upstream, and open one TCP and
/// one UDP flow from `CLIENT_A` with valid packets. Returns their SNAT endpoints.
fn prepare(h: &mut Harness) -> Known {
    for slot in 0..MAGLEV_SIZE {
        h.set_maglev(SVC_TCP_ID, slot, UPS_TCP_ID);
        h.set_maglev(SVC_UDP_ID, slot, UPS_UDP_ID);
    }
    let syn = from_client(Packet::tcp(CLIENT_A, SVC_TCP, TCP_SYN)).bytes();
    let r = h.run(&syn, h.client_if);
    assert_eq!(r.action, XDP_REDIRECT, "setup SYN not forwarded");
    let udp = from_client(Packet::udp(CLIENT_A, SVC_UDP, b"hello")).bytes();
    let r = h.run(&udp, h.client_if);
    assert_eq!(r.action, XDP_REDIRECT, "setup datagram not forwarded");
    // IPv6: the TCP and UDP services get ids of their own, every slot on their upstream.
    for (svc, proto, id, ups) in [
        (SVC6_TCP, IPPROTO_TCP, SVC6_TCP_FUZZ_ID, UPS6_TCP_ID),
        (SVC6_UDP, IPPROTO_UDP, SVC6_UDP_FUZZ_ID, UPS6_UDP_ID),
    ] {
        h.add_service(
            service_key(svc, proto),
            ServiceValue {
                id,
                flags: SERVICE_F_HAS_UPSTREAMS,
            },
        );
        for slot in 0..MAGLEV_SIZE {
            h.set_maglev(id, slot, ups);
        }
    }
    for frame in [
        from_client(Packet::tcp(CLIENT6_A, SVC6_TCP, TCP_SYN)).bytes(),
        from_client(Packet::udp(CLIENT6_A, SVC6_UDP, b"hello")).bytes(),
    ] {
        let r = h.run(&frame, h.client_if);
        assert_eq!(r.action, XDP_REDIRECT, "IPv6 setup packet not forwarded");
    }
    let snat = |key: FlowKey| -> (IpAddr, u16) {
        let v: FlowValue = h
            .fwd_flow(&key)
            .unwrap_or_else(|| panic!("setup flow {key:?} missing"));
        (
            ip_of(&v.new_src_addr, key.family),
            u16::from_be_bytes(v.new_src_port),
        )
    };
    let v4 = |key| match snat(key) {
        (IpAddr::V4(ip), port) => SocketAddrV4::new(ip, port),
        other => panic!("IPv4 flow with SNAT {other:?}"),
    };
    let v6 = |key| match snat(key) {
        (IpAddr::V6(ip), port) => SocketAddrV6::new(ip, port, 0, 0),
        other => panic!("IPv6 flow with SNAT {other:?}"),
    };
    Known {
        tcp_snat: v4(Tuple::new(CLIENT_A, SVC_TCP, IPPROTO_TCP).key()),
        udp_snat: v4(Tuple::new(CLIENT_A, SVC_UDP, IPPROTO_UDP).key()),
        tcp6_snat: v6(Tuple::new(CLIENT6_A, SVC6_TCP, IPPROTO_TCP).key()),
        udp6_snat: v6(Tuple::new(CLIENT6_A, SVC6_UDP, IPPROTO_UDP).key()),
    }
}

#[test]
fn fuzzed_packets_never_forward_wrongly() {
    with_harness(|h| {
        let known = prepare(h);
        let bases = bases(known);
        // Every base as it is first: the oracle must hold for valid packets too.
        let mut tally = BTreeMap::new();
        for (desc, frame, client_side) in &bases {
            let ingress = if *client_side { h.client_if } else { h.home_if };
            if let Err(e) = check_case(h, frame, ingress, &mut tally) {
                panic!("base packet {desc:?}: {e}\n{}", hexdump(frame));
            }
        }
        let (mut runner, cases, seed) = runner("XPT_FUZZ_CASES", 4000, 0);
        let tally = RefCell::new(BTreeMap::new());
        let ran = Cell::new(0u64);
        let h: &Harness = h;
        let result = runner.run(&case_strategy(bases.len()), |c| {
            let (desc, base, client_side) = &bases[c.base];
            let input = mutate(base, &c);
            let ingress = if *client_side != c.swap_ingress {
                h.client_if
            } else {
                h.home_if
            };
            ran.set(ran.get() + 1);
            check_case(h, &input, ingress, &mut tally.borrow_mut()).map_err(|e| {
                TestCaseError::fail(format!(
                    "{e}\nbase: {desc}\ncase: {c:?}\ningress: {}\ninput ({} bytes, `xxd -r -p`):\n{}\n{}",
                    ingress.name,
                    input.len(),
                    hex(&input),
                    hexdump(&input)
                ))
            })
        });
        if let Err(e) = result {
            panic!("packet fuzzer (seed {seed:#x}) found a failing case:\n{e}");
        }
        let (tally, ran) = (tally.into_inner(), ran.get());
        let (fwd, rev) = check_tables(h).unwrap_or_else(|e| panic!("flow tables: {e}"));
        let total: u64 = h.reasons().iter().sum();
        println!(
            "packet fuzzer: {cases} cases ({ran} runs with shrinking), seed {seed:#x}; verdicts {tally:?}; \
             flow tables {fwd} forward / {rev} reverse entries, all of configured services; \
             {total} packets counted in XP_REASONS"
        );
        assert!(
            tally.len() >= 6,
            "the fuzzer reached only {} distinct verdicts: {tally:?}",
            tally.len()
        );
        for must in [
            "fwd_redirect",
            "rev_redirect",
            "drop_truncated",
            "pass_not_service",
        ] {
            assert!(
                tally.contains_key(must),
                "the fuzzer never reached {must}: {tally:?}"
            );
        }
    });
}

// =============================================================================================
// No open relay.
// =============================================================================================

/// Forwarded reasons (XDP_TX / XDP_REDIRECT / rewritten pass), as indices.
fn forwarded_total(r: &[u64; REASON_COUNT as usize]) -> u64 {
    Reason::ALL
        .iter()
        .filter(|x| rewritten(**x) || matches!(x, Reason::IcmpTx | Reason::IcmpRedirect))
        .map(|x| r[*x as usize])
        .sum()
}

/// Ports probed at every other address: the services', their upstreams', the SNAT range's ends
/// and a few well-known ones.
const OTHER_PORTS: [u16; 13] = [
    0, 22, 53, 80, 81, 82, 83, 443, 8080, 5353, 9090, 20_000, 29_999,
];

/// One address family's side of the no-open-relay sweep.
struct RelayTargets<S: Sock> {
    /// Where the probes come from: a client, outside home.
    src: S,
    service: S::Ip,
    snat: S::Ip,
    /// Every other destination: next hops, upstreams, broadcast / multicast, loopback,
    /// unspecified, addresses beyond home, ...
    others: Vec<S::Ip>,
}

/// The no-open-relay sweep's probe runner and its running totals.
struct Relay<'h> {
    h: &'h Harness,
    svcs: HashSet<(IpAddr, u16, u8)>,
    sent: u64,
    forwarded_services: u64,
}

impl Relay<'_> {
    /// One TCP SYN or UDP datagram `src -> dst` arriving on `ingress`: a configured service may
    /// be forwarded (counted), anything else must pass untouched or be dropped.
    fn check<S>(&mut self, src: S, dst: S, proto: u8, ingress: Iface)
    where
        S: Sock + Display,
        S::Ip: Into<IpAddr>,
    {
        let p = if proto == IPPROTO_TCP {
            Packet::tcp(src, dst, TCP_SYN)
        } else {
            Packet::udp(src, dst, b"probe")
        };
        let frame = from_client(p).bytes();
        let run = self.h.run(&frame, ingress);
        self.sent += 1;
        if self
            .svcs
            .contains(&(dst.sock_ip().into(), dst.sock_port(), proto))
        {
            self.forwarded_services += u64::from(matches!(run.action, XDP_TX | XDP_REDIRECT))
                + u64::from(run.action == XDP_PASS && run.output != frame);
            return;
        }
        assert!(
            run.action == XDP_PASS && run.output == frame || run.action == XDP_DROP,
            "{proto} to {dst} on {}: action {} (must pass untouched or drop)\n{}",
            ingress.name,
            run.action,
            hex(&frame)
        );
    }

    /// Every port of the service and of the SNAT address, both protocols, both interfaces;
    /// then `OTHER_PORTS` of every other address, likewise. Returns the packets sent.
    fn sweep<S>(&mut self, t: &RelayTargets<S>) -> u64
    where
        S: Sock + Display,
        S::Ip: Into<IpAddr>,
    {
        let start = self.sent;
        let ifaces = [self.h.client_if, self.h.home_if];
        for port in 0..=u16::MAX {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                for ingress in ifaces {
                    self.check(t.src, S::sock(t.service, port), proto, ingress);
                    self.check(t.src, S::sock(t.snat, port), proto, ingress);
                }
            }
        }
        for &ip in &t.others {
            for port in OTHER_PORTS {
                for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                    for ingress in ifaces {
                        self.check(t.src, S::sock(ip, port), proto, ingress);
                    }
                }
            }
        }
        self.sent - start
    }
}

/// The solicited-node multicast group of `ip` (RFC 4291 2.7.1) and its Ethernet address.
fn solicited_node(ip: Ipv6Addr) -> (Ipv6Addr, [u8; 6]) {
    let o = ip.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    (group, [0x33, 0x33, 0xff, o[13], o[14], o[15]])
}

/// ICMPv6 that is the kernel's: NDP (router solicitation and advertisement, neighbour
/// solicitation for address resolution, unreachability detection and duplicate address
/// detection, solicited and unsolicited neighbour advertisements, redirect) and echo (request
/// and reply, with the identifier of a service port or a live flow's SNAT port) for the IPv6
/// service and SNAT addresses, on both interfaces. Each must pass untouched, counted once as
/// `pass_not_tcp_udp` and as nothing else. Returns the frames sent.
fn icmpv6_passes_untouched(h: &Harness, known: &Known) -> u64 {
    let peer = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xfe);
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let all_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
    let all_nodes_mac = [0x33, 0x33, 0, 0, 0, 1];
    let all_routers_mac = [0x33, 0x33, 0, 0, 0, 2];
    let unicast_mac = CLIENT_DEV_MAC;
    let peer_mac = CLIENT_ROUTER_MAC;
    // Source / target link-layer address options (RFC 4861 4.6.1).
    let lla = |kind: u8| -> Vec<u8> {
        let mut o = vec![kind, 1];
        o.extend_from_slice(&peer_mac);
        o
    };
    let with = |a: &[u8], b: &[u8]| -> Vec<u8> { [a, b].concat() };
    let icmp =
        |src: Ipv6Addr, dst: Ipv6Addr, mac: [u8; 6], kind: u8, rest: [u8; 4], body: &[u8]| {
            Packet::<SocketAddrV6>::icmpv6(src, dst, kind, 0, rest, body)
                .ttl(255)
                .macs(peer_mac, mac)
                .bytes()
        };
    let mut frames: Vec<(String, Vec<u8>)> = vec![(
        "router solicitation to all routers".into(),
        icmp(peer, all_routers, all_routers_mac, 133, [0; 4], &lla(1)),
    )];
    for (target, id) in [
        (SERVICE_IP6, SVC6_TCP.port()),
        (SNAT_IP6, known.tcp6_snat.port()),
    ] {
        let (group, group_mac) = solicited_node(target);
        let t = target.octets();
        let id = id.to_be_bytes();
        for (desc, frame) in [
            (
                "neighbour solicitation to the solicited-node group",
                icmp(peer, group, group_mac, 135, [0; 4], &with(&t, &lla(1))),
            ),
            (
                "neighbour solicitation, unicast (unreachability detection)",
                icmp(peer, target, unicast_mac, 135, [0; 4], &with(&t, &lla(1))),
            ),
            (
                "neighbour solicitation from :: (duplicate address detection)",
                icmp(Ipv6Addr::UNSPECIFIED, group, group_mac, 135, [0; 4], &t),
            ),
            (
                "solicited neighbour advertisement to the address",
                icmp(
                    peer,
                    target,
                    unicast_mac,
                    136,
                    [0x60, 0, 0, 0],
                    &with(&peer.octets(), &lla(2)),
                ),
            ),
            (
                "unsolicited neighbour advertisement claiming the address",
                icmp(
                    peer,
                    all_nodes,
                    all_nodes_mac,
                    136,
                    [0x20, 0, 0, 0],
                    &with(&t, &lla(2)),
                ),
            ),
            (
                "router solicitation to the address",
                icmp(peer, target, unicast_mac, 133, [0; 4], &lla(1)),
            ),
            (
                "router advertisement to the address",
                icmp(
                    peer,
                    target,
                    unicast_mac,
                    134,
                    [64, 0, 0x07, 0x08],
                    &with(&[0; 8], &lla(1)),
                ),
            ),
            (
                "redirect to the address",
                icmp(
                    peer,
                    target,
                    unicast_mac,
                    137,
                    [0; 4],
                    &with(&peer.octets(), &CLIENT6_1.octets()),
                ),
            ),
            (
                "echo request to the address",
                from_client(Packet::<SocketAddrV6>::icmpv6(
                    CLIENT6_1,
                    target,
                    128,
                    0,
                    [id[0], id[1], 0, 1],
                    b"ping",
                ))
                .bytes(),
            ),
            (
                "echo reply to the address",
                from_upstream(Packet::<SocketAddrV6>::icmpv6(
                    UPSTREAM_IP6,
                    target,
                    129,
                    0,
                    [id[0], id[1], 0, 1],
                    b"ping",
                ))
                .bytes(),
            ),
        ] {
            frames.push((format!("{desc} {target}"), frame));
        }
    }
    let before = h.reasons();
    let mut sent = 0u64;
    for (desc, frame) in &frames {
        for ingress in [h.client_if, h.home_if] {
            let run = h.run(frame, ingress);
            sent += 1;
            assert!(
                run.action == XDP_PASS && run.output == *frame,
                "ICMPv6 {desc} on {}: action {}, output changed: {} (must pass untouched)\n{}",
                ingress.name,
                run.action,
                run.output != *frame,
                hex(frame)
            );
        }
    }
    let after = h.reasons();
    let passed = after[Reason::PassNotTcpUdp as usize] - before[Reason::PassNotTcpUdp as usize];
    assert_eq!(
        (
            passed,
            after.iter().sum::<u64>() - before.iter().sum::<u64>()
        ),
        (sent, sent),
        "the ICMPv6 frames were not all counted once as pass_not_tcp_udp"
    );
    sent
}

#[test]
fn no_open_relay_to_any_other_address_or_port() {
    with_harness(|h| {
        let known = prepare(h);
        let h: &Harness = h;
        let flows_before = (
            h.all_flows(MAP_FLOWS_FWD).len(),
            h.all_flows(MAP_FLOWS_REV).len(),
        );
        let before = h.reasons();
        let mut relay = Relay {
            h,
            svcs: services(),
            sent: 0,
            forwarded_services: 0,
        };
        let v4 = relay.sweep(&RelayTargets {
            src: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 77), 33_333),
            service: SERVICE_IP,
            snat: SNAT_IP,
            others: vec![
                CLIENT_ROUTER,
                UPSTREAM_IP,
                UPSTREAM_NO_NEIGH_IP,
                UPSTREAM_NO_ROUTE_IP,
                Ipv4Addr::new(10, 10, 1, 255),
                Ipv4Addr::new(10, 20, 1, 255),
                Ipv4Addr::BROADCAST,
                Ipv4Addr::new(224, 0, 0, 1),
                Ipv4Addr::LOCALHOST,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::new(10, 20, 9, 9),
                Ipv4Addr::new(192, 0, 2, 1),
                Ipv4Addr::new(169, 254, 169, 254),
            ],
        });
        let v6 = relay.sweep(&RelayTargets {
            src: SocketAddrV6::new(
                Ipv6Addr::new(0x2001, 0xdb8, 0x5100, 0, 0, 0, 0, 0x77),
                33_333,
                0,
                0,
            ),
            service: SERVICE_IP6,
            snat: SNAT_IP6,
            others: vec![
                CLIENT_ROUTER6,
                UPSTREAM_IP6,
                UPSTREAM_NO_NEIGH_IP6,
                UPSTREAM_NO_ROUTE_IP6,
                // Link-local, all nodes, the solicited-node group of the ::1 addresses.
                Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1),
                Ipv6Addr::LOCALHOST,
                Ipv6Addr::UNSPECIFIED,
                // In home, outside every upstream; documentation space beyond home; the
                // IPv4-mapped form of the IPv4 upstream.
                Ipv6Addr::new(0x2001, 0xdb8, 0x20, 9, 0, 0, 0, 9),
                Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1),
                UPSTREAM_IP.to_ipv6_mapped(),
            ],
        });
        let icmp6 = icmpv6_passes_untouched(h, &known);
        let (sent, forwarded_services) = (relay.sent, relay.forwarded_services);
        let after = h.reasons();
        let fwd = forwarded_total(&after) - forwarded_total(&before);
        println!(
            "no open relay: {sent} TCP SYNs and UDP datagrams ({v4} IPv4, {v6} IPv6) to every port \
             of the service and SNAT addresses and to other addresses, and {icmp6} ICMPv6 NDP and \
             echo frames: {fwd} forwarded, all to services ({forwarded_services})"
        );
        assert_eq!(
            fwd, forwarded_services,
            "forwarded packets that were not to a service"
        );
        // The services' own probes did make flows (at most one each); nothing else did.
        let flows_after = (
            h.all_flows(MAP_FLOWS_FWD).len(),
            h.all_flows(MAP_FLOWS_REV).len(),
        );
        let grew = |a: usize, b: usize| u64::try_from(a - b).unwrap_or(u64::MAX);
        assert!(
            grew(flows_after.0, flows_before.0) <= forwarded_services
                && grew(flows_after.1, flows_before.1) <= forwarded_services,
            "flows grew from {flows_before:?} to {flows_after:?} with {forwarded_services} forwarded"
        );
        check_tables(h).unwrap_or_else(|e| panic!("flow tables: {e}"));
    });
}

/// One address family's live flows and spoofers for the spoofed-reply sweep.
struct SpoofTargets<S: Sock> {
    /// The live TCP and UDP flows: client, service, upstream, SNAT endpoint.
    tcp: (S, S, S, S),
    udp: (S, S, S, S),
    /// Where the spoofed replies come from (TCP: these; UDP: the same addresses with the UDP
    /// upstream's port, or another port for the upstream's own address).
    spoofers: Vec<S>,
}

/// Spoofed replies to the SNAT ports of `t`'s live flows: TCP (data on the home side and on the
/// client side, SYN-ACK on the home side) and UDP from every spoofer. Each must be dropped
/// untouched (a SNAT-range port with no flow for that sender: `drop_no_flow_snat_port`), and
/// neither flow's entries may change at all. Returns the frames sent.
fn spoof_sweep<S: Sock + Display>(h: &Harness, t: &SpoofTargets<S>) -> u64 {
    let entries = || -> Vec<(FlowValue, FlowValue)> {
        [(t.tcp, IPPROTO_TCP), (t.udp, IPPROTO_UDP)]
            .map(|((client, svc, ups, snat), proto)| {
                let fwd = h.fwd_flow(&Tuple::new(client, svc, proto).key());
                let rev = h.rev_flow(&Tuple::new(ups, snat, proto).key());
                match (fwd, rev) {
                    (Some(f), Some(r)) => (f, r),
                    other => panic!("live flow {client} -> {svc} ({proto}): {other:?}"),
                }
            })
            .to_vec()
    };
    let flows_before = entries();
    let mut sent = 0u64;
    let mut expect_untouched = |frame: &[u8], ingress: Iface, what: &str| {
        let run = h.run(frame, ingress);
        sent += 1;
        assert!(
            run.action == XDP_DROP && run.output == frame,
            "{what} on {}: action {}, output changed: {}\n{}",
            ingress.name,
            run.action,
            run.output != frame,
            hex(frame)
        );
    };
    let (_, _, _, tcp_snat) = t.tcp;
    let (_, _, ups_udp, udp_snat) = t.udp;
    for &from in &t.spoofers {
        for (flags, ingress) in [
            (TCP_ACK | TCP_PSH, h.home_if),
            (TCP_ACK | TCP_PSH, h.client_if),
            (TCP_SYN | TCP_ACK, h.home_if),
        ] {
            let frame = from_upstream(Packet::tcp(from, tcp_snat, flags))
                .payload(b"spoofed")
                .bytes();
            expect_untouched(
                &frame,
                ingress,
                &format!("TCP reply from {from} to {tcp_snat}"),
            );
        }
        // UDP from the same address with the UDP upstream's port (from the upstream's own
        // address that would be the real upstream: another port then).
        let port = if from.sock_ip() == ups_udp.sock_ip() {
            ups_udp.sock_port() + 1
        } else {
            ups_udp.sock_port()
        };
        let from = S::sock(from.sock_ip(), port);
        let frame = from_upstream(Packet::udp(from, udp_snat, b"spoofed")).bytes();
        expect_untouched(
            &frame,
            h.home_if,
            &format!("UDP reply from {from} to {udp_snat}"),
        );
    }
    assert_eq!(
        entries(),
        flows_before,
        "spoofed replies changed a flow's entries"
    );
    sent
}

#[test]
fn reply_from_outside_home_for_a_snat_port_is_not_forwarded() {
    with_harness(|h| {
        let known = prepare(h);
        let h: &Harness = h;
        let before = h.reasons();
        let v4 = spoof_sweep(
            h,
            &SpoofTargets {
                tcp: (CLIENT_A, SVC_TCP, UPS_TCP, known.tcp_snat),
                udp: (CLIENT_A, SVC_UDP, UPS_UDP, known.udp_snat),
                spoofers: vec![
                    // Outside every home CIDR, with the upstream's port.
                    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), UPS_TCP.port()),
                    SocketAddrV4::new(CLIENT_1, UPS_TCP.port()),
                    SocketAddrV4::new(Ipv4Addr::new(8, 8, 8, 8), UPS_TCP.port()),
                    // Inside home but not this flow's upstream.
                    SocketAddrV4::new(UPSTREAM_NO_NEIGH_IP, UPS_TCP.port()),
                    // The upstream's address with another port.
                    SocketAddrV4::new(UPSTREAM_IP, UPS_TCP.port() + 1),
                ],
            },
        );
        let s6 = |ip: Ipv6Addr, port: u16| SocketAddrV6::new(ip, port, 0, 0);
        let up = UPS6_TCP.port();
        let v6 = spoof_sweep(
            h,
            &SpoofTargets {
                tcp: (CLIENT6_A, SVC6_TCP, UPS6_TCP, known.tcp6_snat),
                udp: (CLIENT6_A, SVC6_UDP, UPS6_UDP, known.udp6_snat),
                spoofers: vec![
                    // Outside every home CIDR, with the upstream's port: documentation space
                    // beyond home, a client, link-local, loopback, the IPv4-mapped form of the
                    // IPv4 upstream.
                    s6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 9), up),
                    s6(CLIENT6_1, up),
                    s6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2), up),
                    s6(Ipv6Addr::LOCALHOST, up),
                    s6(UPSTREAM_IP.to_ipv6_mapped(), up),
                    // The upstream's interface id under another prefix, and its prefix with
                    // a word in the middle changed: a partial address compare would match.
                    s6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 1, 0, 0, 0, 2), up),
                    s6(Ipv6Addr::new(0x2001, 0xdb8, 0x20, 1, 0x8000, 0, 0, 2), up),
                    // Inside home but not this flow's upstream.
                    s6(UPSTREAM_NO_NEIGH_IP6, up),
                    s6(UPSTREAM_NO_ROUTE_IP6, up),
                    // The upstream's address with another port.
                    s6(UPSTREAM_IP6, up + 1),
                ],
            },
        );
        let after = h.reasons();
        assert_eq!(
            forwarded_total(&after),
            forwarded_total(&before),
            "a spoofed reply was forwarded"
        );
        let dropped = after[Reason::DropNoFlowSnatPort as usize]
            - before[Reason::DropNoFlowSnatPort as usize];
        println!(
            "spoofed replies to live SNAT ports: {} ({v4} IPv4, {v6} IPv6), {dropped} dropped \
             (drop_no_flow_snat_port), none forwarded; the flows' entries unchanged",
            v4 + v6
        );
        assert_eq!(
            dropped,
            v4 + v6,
            "not every spoofed reply was drop_no_flow_snat_port"
        );
    });
}

// =============================================================================================
// The config parser.
// =============================================================================================

const VALID_CONFIG: &str = r#"[datapath]
interfaces = ["eth0", "eth1"]
mode = "auto"
pin_dir = "/sys/fs/bpf/xdp-proxy"
max_flows = 65536

[nat]
snat_ipv4 = "10.20.1.1"
port_range = [10240, 32767]
home_cidrs = ["10.20.0.0/16", "10.30.0.0/24"]

[admin]
listen = "127.0.0.1:9100"

[dns]
servers = ["10.20.0.2:53"]
interval = "30s"
timeout = "2s"

[[service]]
name = "web"
listen = "10.10.1.1:80"
protocol = "tcp"
mode = "l4"
upstreams = ["10.20.1.2:80", { address = "app.home.example:80", weight = 3, drain = false }]
[service.health]
kind = "http"
path = "/health"
expect_status = 200
interval = "5s"
timeout = "2s"
rise = 2
fall = 3

[[service]]
name = "dns"
listen = "10.10.1.1:53"
protocol = "udp"
upstreams = ["10.20.1.3:53"]
"#;

/// Hostile values a mutation may put in place of any value.
const HOSTILE: &[&str] = &[
    "\"\"",
    "0",
    "-1",
    "4294967296",
    "18446744073709551616",
    "1e308",
    "nan",
    "inf",
    "\"999.999.999.999\"",
    "\"10.20.0.0/99\"",
    "\"10.20.0.1/16\"",
    "\"0.0.0.0:0\"",
    "\"255.255.255.255:65535\"",
    "\"[::1]:80\"",
    "\"a:b:c\"",
    "\"-5ms\"",
    "\"99999999999999999999h\"",
    "\"0s\"",
    "\"\\u0000\"",
    "[]",
    "[[]]",
    "{}",
    "[65535, 0]",
    "[1, 2, 3]",
    "true",
    "\"x\"",
    "\"é\u{202e}\"",
    "{ address = \"\", weight = 99999999 }",
];

/// The config text after one mutation, chosen by `op` with its parameters.
fn mutate_config(op: u8, a: usize, b: usize, bytes: &[u8]) -> String {
    let lines: Vec<&str> = VALID_CONFIG.lines().collect();
    let n = lines.len();
    match op % 6 {
        // Replace a value (right of `=`) by a hostile one.
        0 => lines
            .iter()
            .enumerate()
            .map(|(i, l)| match (i == a % n, l.split_once('=')) {
                (true, Some((k, _))) => format!("{k}= {}", HOSTILE[b % HOSTILE.len()]),
                _ => (*l).to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        // Drop a line.
        1 => lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != a % n)
            .map(|(_, l)| *l)
            .collect::<Vec<_>>()
            .join("\n"),
        // Duplicate a line elsewhere.
        2 => {
            let mut v: Vec<&str> = lines.clone();
            v.insert(b % (n + 1), lines[a % n]);
            v.join("\n")
        }
        // Overwrite bytes at a position with random ones (lossy UTF-8).
        3 => {
            let mut t = VALID_CONFIG.as_bytes().to_vec();
            let at = a % t.len();
            for (i, x) in bytes.iter().enumerate() {
                if let Some(slot) = t.get_mut(at + i) {
                    *slot = *x;
                }
            }
            String::from_utf8_lossy(&t).into_owned()
        }
        // Truncate.
        4 => VALID_CONFIG[..VALID_CONFIG
            .char_indices()
            .map(|(i, _)| i)
            .nth(a % VALID_CONFIG.len())
            .unwrap_or(0)]
            .to_owned(),
        // Insert random bytes.
        _ => {
            let at = a % VALID_CONFIG.len();
            let (x, y) = VALID_CONFIG.split_at(at);
            format!("{x}{}{y}", String::from_utf8_lossy(bytes))
        }
    }
}

/// Parse, and when valid, validate with the runtime rules too; never a panic.
fn parse_never_panics(text: &str) -> Result<bool, TestCaseError> {
    let path = Path::new("fuzz.toml");
    let outcome = std::panic::catch_unwind(|| {
        xdp_proxy::config::Config::parse(text, path).map(|c| {
            let facts = xdp_proxy::config::RuntimeFacts {
                ephemeral_ports: (32768, 60999),
                snat: c
                    .nat
                    .snat_ipv4
                    .unwrap_or(Ipv4Addr::new(10, 20, 1, 1))
                    .into(),
            };
            // Display every error too: rendering must not panic either.
            c.validate_runtime(facts).map_err(|e| e.to_string())
        })
    });
    match outcome {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => {
            let msg = e.to_string();
            if msg.is_empty() {
                return Err(TestCaseError::fail("an error with an empty message"));
            }
            Ok(false)
        }
        Err(_) => Err(TestCaseError::fail(format!(
            "the config parser panicked on:\n{text}"
        ))),
    }
}

#[test]
fn config_parser_never_panics() {
    // The valid config is valid: the mutations start from something that parses.
    assert!(
        matches!(parse_never_panics(VALID_CONFIG), Ok(true)),
        "the fuzzer's valid config does not parse: {:?}",
        xdp_proxy::config::Config::parse(VALID_CONFIG, Path::new("fuzz.toml")).err()
    );
    let (mut runner, cases, seed) = runner("XPT_FUZZ_CONFIG_CASES", 3000, 0xc0f1);
    let valid = Cell::new(0u64);
    let total = Cell::new(0u64);
    let strategy = prop_oneof![
        // Arbitrary bytes.
        proptest::collection::vec(any::<u8>(), 0..600)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        // Mutated valid config.
        (
            any::<u8>(),
            any::<usize>(),
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(op, a, b, bytes)| mutate_config(op, a, b, &bytes)),
        // Several mutations in a row are covered by mutating a mutated text: two at once.
        (
            any::<u8>(),
            any::<usize>(),
            any::<usize>(),
            any::<u8>(),
            any::<usize>()
        )
            .prop_map(|(op, a, b, op2, c)| {
                let once = mutate_config(op, a, b, b"]]");
                let lines: Vec<&str> = once.lines().collect();
                let k = c % lines.len().max(1);
                let mut v: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
                if let Some(l) = v.get_mut(k)
                    && let Some((key, _)) = l.clone().split_once('=')
                {
                    *l = format!("{key}= {}", HOSTILE[usize::from(op2) % HOSTILE.len()]);
                }
                v.join("\n")
            }),
    ];
    let result = runner.run(&strategy, |text| {
        total.set(total.get() + 1);
        if parse_never_panics(&text)? {
            valid.set(valid.get() + 1);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("config fuzzer (seed {seed:#x}): {e}");
    }
    let (valid, total) = (valid.get(), total.get());
    println!(
        "config fuzzer: {cases} cases ({total} runs), seed {seed:#x}: {valid} parsed as valid, \
         the rest refused with an error; no panic"
    );
    assert!(
        valid > 0,
        "no mutated config was valid: the mutations are too coarse"
    );
    assert!(
        valid < total,
        "every mutated config was valid: the parser accepts anything"
    );
}
