//! Packet tests through `BPF_PROG_TEST_RUN`: a packet builder, checkers (full checksum
//! recomputation, field-named diffs, reproducible hex dumps) and a harness that runs the real XDP
//! object (`proxy_ebpf_object::EBPF_OBJECT`) with maps filled by the test.
//!
//! Each harness lives on a dedicated thread that has its own network namespace
//! (`unshare(CLONE_NEWNET)`: nameless, so nothing is left behind when the thread exits, also on a
//! panic). In it, two veth pairs, addresses, routes and permanent neighbour entries make
//! `bpf_fib_lookup` answer deterministically (see [`topo`]); `BPF_PROG_TEST_RUN` runs in the
//! calling thread's namespace and its `xdp_md` context names the ingress interface. Every test
//! loads its own instance of the program, so maps are never shared between tests.
//!
//! Expected outputs are built independently from the contract (docs/datapath.md) and the shared
//! helpers (`proxy_common::hash::flow_hash`, `proxy_common::checksum`), never from running the
//! program.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use proxy_common::checksum;
use proxy_common::hash::{SEED_MAGLEV, SEED_SNAT_PORT, flow_hash, snat_probe_offset};
use proxy_common::{
    ACL_HIT, ACL_PREFIX_BASE, AclKey, Addr, CONFIG_F_READY, FAMILY_IPV4, FAMILY_IPV6, FlowKey,
    FlowValue, IPPROTO_TCP, IPPROTO_UDP, LogRate, MAGLEV_SIZE, MAP_ACL_ALLOW, MAP_ACL_DENY,
    MAP_CONFIG, MAP_DEVMAP, MAP_FLOWS_FWD, MAP_FLOWS_REV, MAP_LOG_RATE, MAP_MAGLEV, MAP_RATE,
    MAP_REASONS, MAP_SERVICE_OPTIONS, MAP_SERVICE_STATS, MAP_SERVICES, MAP_UPSTREAM_STATS,
    MAP_UPSTREAMS, NatConfig, PROGRAM_NAME, REASON_COUNT, RateKey, RateState, Reason,
    SERVICE_F_HAS_UPSTREAMS, SNAT_PORT_PROBES, ServiceKey, ServiceOptions, ServiceValue,
    TrafficCounters, UPSTREAM_F_ACTIVE, UpstreamValue, XDP_ABORTED, XDP_DROP, XDP_PASS,
    XDP_REDIRECT, XDP_TX, addr_v4,
};

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 "more fragments" flag, in the 16-bit flags/offset word.
pub const IP_MF: u16 = 0x2000;
/// IPv4 "don't fragment" flag.
pub const IP_DF: u16 = 0x4000;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

// =============================================================================================
// Address families.
// =============================================================================================

/// An IP address type of the builder: `Ipv4Addr` or `Ipv6Addr`.
pub trait IpFam:
    Copy + std::fmt::Debug + PartialEq + Eq + std::hash::Hash + Send + Sync + 'static
{
    /// `FAMILY_IPV4` / `FAMILY_IPV6` (keys).
    const FAMILY: u8;
    /// Address bits (a host prefix).
    const BITS: u32;
    /// The address in the 16-byte key layout.
    fn key_addr(&self) -> Addr;
    /// The address as it appears on the wire (4 or 16 bytes).
    fn wire(&self) -> Vec<u8>;
}

impl IpFam for Ipv4Addr {
    const FAMILY: u8 = FAMILY_IPV4;
    const BITS: u32 = 32;
    fn key_addr(&self) -> Addr {
        addr_v4(self.octets())
    }
    fn wire(&self) -> Vec<u8> {
        self.octets().to_vec()
    }
}

impl IpFam for Ipv6Addr {
    const FAMILY: u8 = FAMILY_IPV6;
    const BITS: u32 = 128;
    fn key_addr(&self) -> Addr {
        self.octets()
    }
    fn wire(&self) -> Vec<u8> {
        self.octets().to_vec()
    }
}

/// A socket address type of the builder: `SocketAddrV4` or `SocketAddrV6` (flow info and scope
/// id are always 0).
pub trait Sock:
    Copy + std::fmt::Debug + PartialEq + Eq + std::hash::Hash + Send + Sync + 'static
{
    type Ip: IpFam;
    fn sock(ip: Self::Ip, port: u16) -> Self;
    fn sock_ip(&self) -> Self::Ip;
    fn sock_port(&self) -> u16;
}

impl Sock for SocketAddrV4 {
    type Ip = Ipv4Addr;
    fn sock(ip: Ipv4Addr, port: u16) -> Self {
        SocketAddrV4::new(ip, port)
    }
    fn sock_ip(&self) -> Ipv4Addr {
        *self.ip()
    }
    fn sock_port(&self) -> u16 {
        self.port()
    }
}

impl Sock for SocketAddrV6 {
    type Ip = Ipv6Addr;
    fn sock(ip: Ipv6Addr, port: u16) -> Self {
        SocketAddrV6::new(ip, port, 0, 0)
    }
    fn sock_ip(&self) -> Ipv6Addr {
        *self.ip()
    }
    fn sock_port(&self) -> u16 {
        self.port()
    }
}

/// Full TCP/UDP checksum over the IPv6 pseudo-header (RFC 8200 section 8.1: source,
/// destination, upper-layer length as 32 bits, next header) and `segment` (checksum zeroed).
#[must_use]
pub fn l4_checksum_v6(src: &[u8; 16], dst: &[u8; 16], proto: u8, segment: &[u8]) -> u16 {
    let mut sum = checksum::sum_bytes(0, src);
    sum = checksum::sum_bytes(sum, dst);
    let len = u32::try_from(segment.len()).unwrap_or(u32::MAX);
    sum = checksum::sum_bytes(sum, &len.to_be_bytes());
    sum = checksum::add16(sum, u16::from(proto));
    sum = checksum::sum_bytes(sum, segment);
    !checksum::fold(sum)
}

/// The TCP/UDP checksum of `segment` between wire addresses `src` and `dst` (4 or 16 bytes).
fn l4_checksum(src: &[u8], dst: &[u8], proto: u8, segment: &[u8]) -> u16 {
    if let (Ok(s), Ok(d)) = (<[u8; 4]>::try_from(src), <[u8; 4]>::try_from(dst)) {
        return checksum::l4_checksum_v4(s, d, proto, segment);
    }
    let s = <[u8; 16]>::try_from(src).expect("an IPv4 or IPv6 address");
    let d = <[u8; 16]>::try_from(dst).expect("an IPv4 or IPv6 address");
    l4_checksum_v6(&s, &d, proto, segment)
}

// =============================================================================================
// Building packets.
// =============================================================================================

/// A TCP segment (ports in host order; options must be a multiple of 4 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

/// A UDP datagram. `zero_checksum`: send checksum 0 ("none", RFC 768) instead of computing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    pub zero_checksum: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(Tcp),
    Udp(Udp),
    /// Any other protocol: its bytes as they are (no checksum computed).
    Other {
        proto: u8,
        bytes: Vec<u8>,
    },
}

/// An Ethernet + IPv4 or IPv6 + TCP/UDP packet (`S`: `SocketAddrV4` or `SocketAddrV6`).
/// [`Packet::bytes`] fills in every length and checksum (full computation), so a built packet
/// is always well formed; tests that need malformed input edit the bytes afterwards (see
/// [`set_u16`], [`fix_ip_checksum`]). IPv6: `tos` is the traffic class, `id` the flow label,
/// `ttl` the hop limit; `frag` and `ip_options` are IPv4-only (ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet<S: Sock = SocketAddrV4> {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset (`IP_DF`, `IP_MF`, offset in 8-byte units).
    pub frag: u16,
    pub ttl: u8,
    pub src: S::Ip,
    pub dst: S::Ip,
    /// IPv4 options (a multiple of 4 bytes; IHL grows accordingly).
    pub ip_options: Vec<u8>,
    pub l4: L4,
    /// Bytes after the IP packet (Ethernet padding); not counted in the IP total length.
    pub trailer: Vec<u8>,
}

impl<S: Sock> Packet<S> {
    fn base(src: S::Ip, dst: S::Ip, l4: L4) -> Self {
        Self {
            eth_dst: [0x02, 0, 0, 0, 0xee, 0x01],
            eth_src: [0x02, 0, 0, 0, 0xee, 0x02],
            tos: 0,
            id: 0x4d2c,
            frag: IP_DF,
            ttl: 64,
            src,
            dst,
            ip_options: Vec::new(),
            l4,
            trailer: Vec::new(),
        }
    }

    /// A TCP segment `src -> dst` with `flags`, a fixed sequence number and window.
    #[must_use]
    pub fn tcp(src: S, dst: S, flags: u8) -> Self {
        Self::base(
            src.sock_ip(),
            dst.sock_ip(),
            L4::Tcp(Tcp {
                sport: src.sock_port(),
                dport: dst.sock_port(),
                seq: 0x1000_0001,
                ack: if flags & TCP_ACK != 0 { 0x2000_0001 } else { 0 },
                flags,
                window: 64_240,
                options: Vec::new(),
                payload: Vec::new(),
            }),
        )
    }

    /// A UDP datagram `src -> dst` carrying `payload`, checksum computed.
    #[must_use]
    pub fn udp(src: S, dst: S, payload: &[u8]) -> Self {
        Self::base(
            src.sock_ip(),
            dst.sock_ip(),
            L4::Udp(Udp {
                sport: src.sock_port(),
                dport: dst.sock_port(),
                payload: payload.to_vec(),
                zero_checksum: false,
            }),
        )
    }

    #[must_use]
    pub fn macs(mut self, src: Mac, dst: Mac) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    #[must_use]
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    #[must_use]
    pub fn frag(mut self, frag: u16) -> Self {
        self.frag = frag;
        self
    }

    #[must_use]
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        self.ip_options = options.to_vec();
        self
    }

    #[must_use]
    pub fn trailer(mut self, trailer: &[u8]) -> Self {
        self.trailer = trailer.to_vec();
        self
    }

    /// Set the TCP/UDP payload (no effect on other protocols).
    #[must_use]
    pub fn payload(mut self, payload: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp(t) => t.payload = payload.to_vec(),
            L4::Udp(u) => u.payload = payload.to_vec(),
            L4::Other { .. } => {}
        }
        self
    }

    /// Set the TCP options (a multiple of 4 bytes, at most 40; no effect on other protocols).
    #[must_use]
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        if let L4::Tcp(t) = &mut self.l4 {
            t.options = options.to_vec();
        }
        self
    }

    /// Set TCP sequence and acknowledgement numbers (no effect on other protocols).
    #[must_use]
    pub fn seq_ack(mut self, seq: u32, ack: u32) -> Self {
        if let L4::Tcp(t) = &mut self.l4 {
            t.seq = seq;
            t.ack = ack;
        }
        self
    }

    /// Send UDP checksum 0 (no checksum).
    #[must_use]
    pub fn udp_zero_checksum(mut self) -> Self {
        if let L4::Udp(u) = &mut self.l4 {
            u.zero_checksum = true;
        }
        self
    }

    /// The same packet with new source and destination address and port: what a NAT rewrite
    /// must produce (the TTL and MACs are the caller's business).
    #[must_use]
    pub fn endpoints(mut self, src: S, dst: S) -> Self {
        self.src = src.sock_ip();
        self.dst = dst.sock_ip();
        match &mut self.l4 {
            L4::Tcp(t) => {
                t.sport = src.sock_port();
                t.dport = dst.sock_port();
            }
            L4::Udp(u) => {
                u.sport = src.sock_port();
                u.dport = dst.sock_port();
            }
            L4::Other { .. } => {}
        }
        self
    }

    #[must_use]
    pub fn proto(&self) -> u8 {
        match &self.l4 {
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Udp(_) => IPPROTO_UDP,
            L4::Other { proto, .. } => *proto,
        }
    }

    /// The 5-tuple as this packet carries it (ports 0 for other protocols).
    #[must_use]
    pub fn tuple(&self) -> Tuple<S> {
        let (sport, dport) = match &self.l4 {
            L4::Tcp(t) => (t.sport, t.dport),
            L4::Udp(u) => (u.sport, u.dport),
            L4::Other { .. } => (0, 0),
        };
        Tuple {
            src: S::sock(self.src, sport),
            dst: S::sock(self.dst, dport),
            proto: self.proto(),
        }
    }

    fn is_v6() -> bool {
        <S::Ip as IpFam>::FAMILY == FAMILY_IPV6
    }

    /// The IP length this packet will carry: the IPv4 total length, or for IPv6 40 + the
    /// payload length (what the program counts).
    #[must_use]
    pub fn ip_len(&self) -> u16 {
        let n = if Self::is_v6() {
            40 + self.l4_bytes().len()
        } else {
            20 + self.ip_options.len() + self.l4_bytes().len()
        };
        u16::try_from(n).unwrap_or(u16::MAX)
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let src = self.src.wire();
        let dst = self.dst.wire();
        match &self.l4 {
            L4::Tcp(t) => {
                assert!(
                    t.options.len().is_multiple_of(4) && t.options.len() <= 40,
                    "TCP options must be a multiple of 4 bytes, at most 40"
                );
                let doff = (20 + t.options.len()) / 4;
                let mut b = Vec::with_capacity(20 + t.options.len() + t.payload.len());
                b.extend_from_slice(&t.sport.to_be_bytes());
                b.extend_from_slice(&t.dport.to_be_bytes());
                b.extend_from_slice(&t.seq.to_be_bytes());
                b.extend_from_slice(&t.ack.to_be_bytes());
                #[allow(clippy::cast_possible_truncation, reason = "doff <= 15, asserted")]
                b.push((doff as u8) << 4);
                b.push(t.flags);
                b.extend_from_slice(&t.window.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                b.extend_from_slice(&t.options);
                b.extend_from_slice(&t.payload);
                let c = l4_checksum(&src, &dst, IPPROTO_TCP, &b);
                b[16..18].copy_from_slice(&c.to_be_bytes());
                b
            }
            L4::Udp(u) => {
                let len = u16::try_from(8 + u.payload.len()).expect("UDP payload fits in 64 KiB");
                let mut b = Vec::with_capacity(usize::from(len));
                b.extend_from_slice(&u.sport.to_be_bytes());
                b.extend_from_slice(&u.dport.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&u.payload);
                if !u.zero_checksum {
                    let c = match l4_checksum(&src, &dst, IPPROTO_UDP, &b) {
                        0 => 0xffff,
                        c => c,
                    };
                    b[6..8].copy_from_slice(&c.to_be_bytes());
                }
                b
            }
            L4::Other { bytes, .. } => bytes.clone(),
        }
    }

    /// The frame: Ethernet header, IPv4 header (checksum computed), L4 (checksum computed over
    /// the pseudo-header), trailer.
    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        if Self::is_v6() {
            return self.bytes_v6();
        }
        assert!(
            self.ip_options.len().is_multiple_of(4) && self.ip_options.len() <= 40,
            "IPv4 options must be a multiple of 4 bytes, at most 40"
        );
        let l4 = self.l4_bytes();
        let ihl = (20 + self.ip_options.len()) / 4;
        let tot_len = self.ip_len();
        let mut b = Vec::with_capacity(ETH_HLEN + usize::from(tot_len) + self.trailer.len());
        b.extend_from_slice(&self.eth_dst);
        b.extend_from_slice(&self.eth_src);
        b.extend_from_slice(&ETH_P_IP.to_be_bytes());
        #[allow(clippy::cast_possible_truncation, reason = "ihl <= 15, asserted")]
        b.push(0x40 | ihl as u8);
        b.push(self.tos);
        b.extend_from_slice(&tot_len.to_be_bytes());
        b.extend_from_slice(&self.id.to_be_bytes());
        b.extend_from_slice(&self.frag.to_be_bytes());
        b.push(self.ttl);
        b.push(self.proto());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.src.wire());
        b.extend_from_slice(&self.dst.wire());
        b.extend_from_slice(&self.ip_options);
        let c = checksum::checksum(&b[ETH_HLEN..]);
        b[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
        b.extend_from_slice(&l4);
        b.extend_from_slice(&self.trailer);
        b
    }

    /// The IPv6 frame: Ethernet, the 40-byte header (version 6, traffic class `tos`, flow
    /// label `id`, payload length, next header, hop limit `ttl`), L4, trailer.
    fn bytes_v6(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let payload_len = u16::try_from(l4.len()).unwrap_or(u16::MAX);
        let mut b = Vec::with_capacity(ETH_HLEN + 40 + l4.len() + self.trailer.len());
        b.extend_from_slice(&self.eth_dst);
        b.extend_from_slice(&self.eth_src);
        b.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        let first = (6u32 << 28) | (u32::from(self.tos) << 20) | u32::from(self.id);
        b.extend_from_slice(&first.to_be_bytes());
        b.extend_from_slice(&payload_len.to_be_bytes());
        b.push(self.proto());
        b.push(self.ttl);
        b.extend_from_slice(&self.src.wire());
        b.extend_from_slice(&self.dst.wire());
        b.extend_from_slice(&l4);
        b.extend_from_slice(&self.trailer);
        b
    }
}

impl Packet<SocketAddrV4> {
    /// An IPv4 packet of another protocol (ICMP, ...) with `bytes` as its payload.
    #[must_use]
    pub fn other(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, bytes: &[u8]) -> Self {
        Self::base(
            src,
            dst,
            L4::Other {
                proto,
                bytes: bytes.to_vec(),
            },
        )
    }

    /// An ICMP message `src -> dst` of `icmp_type`/`code` with the 4 bytes after the checksum
    /// (`rest`: unused, or the next-hop MTU of "fragmentation needed") and `quote` (the quoted
    /// IP packet's first bytes) after it; ICMP checksum computed over the whole message.
    #[must_use]
    pub fn icmp(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        quote: &[u8],
    ) -> Self {
        let mut b = vec![icmp_type, code, 0, 0];
        b.extend_from_slice(&rest);
        b.extend_from_slice(quote);
        let c = checksum::checksum(&b);
        b[2..4].copy_from_slice(&c.to_be_bytes());
        Self::other(src, dst, IPPROTO_ICMP, &b)
    }
}

impl Packet<SocketAddrV6> {
    /// An IPv6 packet whose next header is `next` (ICMPv6, an extension header, ...) with
    /// `bytes` as its payload (no checksum computed).
    #[must_use]
    pub fn other6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, bytes: &[u8]) -> Self {
        Self::base(
            src,
            dst,
            L4::Other {
                proto: next,
                bytes: bytes.to_vec(),
            },
        )
    }

    /// An ICMPv6 message `src -> dst` of `icmp_type`/`code` with the 4 bytes after the checksum
    /// (`rest`) and `body` after it; checksum computed over the pseudo-header and the message.
    #[must_use]
    pub fn icmpv6(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        body: &[u8],
    ) -> Self {
        let mut b = vec![icmp_type, code, 0, 0];
        b.extend_from_slice(&rest);
        b.extend_from_slice(body);
        let c = l4_checksum_v6(&src.octets(), &dst.octets(), IPPROTO_ICMPV6, &b);
        b[2..4].copy_from_slice(&c.to_be_bytes());
        Self::other6(src, dst, IPPROTO_ICMPV6, &b)
    }
}

/// An Ethernet frame that is not IPv4: `ethertype` and an arbitrary payload.
#[must_use]
pub fn raw_frame(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(ETH_HLEN + payload.len());
    b.extend_from_slice(&dst);
    b.extend_from_slice(&src);
    b.extend_from_slice(&ethertype.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// Write a big-endian u16 at `offset`.
pub fn set_u16(frame: &mut [u8], offset: usize, value: u16) {
    frame[offset..offset + 2].copy_from_slice(&value.to_be_bytes());
}

/// Recompute the IPv4 header checksum in place (after editing header fields).
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    frame[ETH_HLEN + 10] = 0;
    frame[ETH_HLEN + 11] = 0;
    let c = checksum::checksum(&frame[ETH_HLEN..ETH_HLEN + ihl]);
    set_u16(frame, ETH_HLEN + 10, c);
}

// =============================================================================================
// Flows: tuples, keys, and the contract's formulas.
// =============================================================================================

/// A 5-tuple as a packet carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple<S: Sock = SocketAddrV4> {
    pub src: S,
    pub dst: S,
    pub proto: u8,
}

impl<S: Sock> Tuple<S> {
    #[must_use]
    pub fn new(src: S, dst: S, proto: u8) -> Self {
        Self { src, dst, proto }
    }

    /// The flow-table key for a packet carrying this tuple.
    #[must_use]
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src_addr: self.src.sock_ip().key_addr(),
            dst_addr: self.dst.sock_ip().key_addr(),
            src_port: self.src.sock_port().to_be_bytes(),
            dst_port: self.dst.sock_port().to_be_bytes(),
            proto: self.proto,
            family: <S::Ip as IpFam>::FAMILY,
            _pad: [0; 2],
        }
    }

    /// `flow_hash(seed, ...)` over this tuple, as docs/datapath.md step 7 defines it (IPv6:
    /// over the full 16-byte addresses).
    #[must_use]
    pub fn hash(&self, seed: u32) -> u32 {
        flow_hash(
            seed,
            &self.src.sock_ip().key_addr(),
            &self.dst.sock_ip().key_addr(),
            self.src.sock_port().to_be_bytes(),
            self.dst.sock_port().to_be_bytes(),
            self.proto,
        )
    }

    /// The service key of this tuple's destination.
    #[must_use]
    pub fn service_key(&self) -> ServiceKey {
        service_key(self.dst, self.proto)
    }

    /// The Maglev slot a new flow with this tuple uses.
    #[must_use]
    pub fn maglev_slot(&self) -> u32 {
        self.hash(SEED_MAGLEV) % MAGLEV_SIZE
    }

    /// The SNAT ports a new flow with this tuple tries, in order (docs/datapath.md step 7): the
    /// client's own port when inside the range (port preservation), then the hashed probes.
    #[must_use]
    pub fn snat_probe_ports(&self, cfg: &NatConfig) -> Vec<u16> {
        let own = self.src.sock_port();
        let preserved = (cfg.port_min..=cfg.port_max).contains(&own).then_some(own);
        preserved
            .into_iter()
            .chain(self.snat_hashed_ports(cfg))
            .collect()
    }

    /// The hashed SNAT probe ports alone (what a client port outside the range gets), in order.
    #[must_use]
    pub fn snat_hashed_ports(&self, cfg: &NatConfig) -> Vec<u16> {
        let span = u32::from(cfg.port_max) - u32::from(cfg.port_min) + 1;
        let h = self.hash(SEED_SNAT_PORT);
        (0..SNAT_PORT_PROBES.min(span))
            .map(|i| {
                let off = u16::try_from(snat_probe_offset(h, i, span)).expect("span <= 65536");
                cfg.port_min + off
            })
            .collect()
    }
}

/// A service key for `addr:port` and `proto`.
#[must_use]
pub fn service_key<S: Sock>(addr: S, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: addr.sock_ip().key_addr(),
        port: addr.sock_port().to_be_bytes(),
        proto,
        family: <S::Ip as IpFam>::FAMILY,
    }
}

/// An active upstream slot for `addr:port`.
#[must_use]
pub fn upstream<S: Sock>(addr: S) -> UpstreamValue {
    UpstreamValue {
        addr: addr.sock_ip().key_addr(),
        port: addr.sock_port().to_be_bytes(),
        family: <S::Ip as IpFam>::FAMILY,
        _pad0: 0,
        flags: UPSTREAM_F_ACTIVE,
    }
}

/// A flow value with the rewrite `src -> dst`, no flags, zero counters and timestamps; tests
/// fill in what they expect.
#[must_use]
pub fn flow_value<S: Sock>(
    new_src: S,
    new_dst: S,
    direction: u8,
    service_id: u32,
    upstream_id: u32,
) -> FlowValue {
    FlowValue {
        new_src_addr: new_src.sock_ip().key_addr(),
        new_dst_addr: new_dst.sock_ip().key_addr(),
        new_src_port: new_src.sock_port().to_be_bytes(),
        new_dst_port: new_dst.sock_port().to_be_bytes(),
        direction,
        flags: 0,
        service_id,
        upstream_id,
        ..FlowValue::default()
    }
}

// =============================================================================================
// Checking packets.
// =============================================================================================

/// Lowercase hex, no separators: paste into `xxd -r -p` to get the frame back.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A classic dump: offset, 16 bytes per line.
#[must_use]
pub fn hexdump(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "  {:04x}:", i * 16);
        for (j, b) in line.iter().enumerate() {
            let sep = if j == 8 { "  " } else { " " };
            let _ = write!(s, "{sep}{b:02x}");
        }
        s.push('\n');
    }
    s
}

/// Name of the header field at `offset` of an Ethernet + IPv4 frame (whose IHL is read from
/// `frame`), for diffs.
#[must_use]
pub fn field_at(frame: &[u8], offset: usize) -> String {
    let name = match offset {
        0..=5 => "eth.dst",
        6..=11 => "eth.src",
        12..=13 => "eth.type",
        _ => "",
    };
    if !name.is_empty() {
        return name.to_owned();
    }
    if frame.get(12..14) == Some(&ETH_P_IPV6.to_be_bytes()[..]) {
        return field_at_v6(frame, offset - ETH_HLEN);
    }
    let ip = offset - ETH_HLEN;
    let ihl = frame
        .get(ETH_HLEN)
        .map_or(20, |b| usize::from(b & 0x0f) * 4);
    if ip < ihl {
        return match ip {
            0 => "ip.version_ihl",
            1 => "ip.tos",
            2..=3 => "ip.tot_len",
            4..=5 => "ip.id",
            6..=7 => "ip.frag",
            8 => "ip.ttl",
            9 => "ip.proto",
            10..=11 => "ip.check",
            12..=15 => "ip.src",
            16..=19 => "ip.dst",
            _ => "ip.options",
        }
        .to_owned();
    }
    let l4 = ip - ihl;
    let proto = frame.get(ETH_HLEN + 9).copied().unwrap_or(0);
    let name = match (proto, l4) {
        (IPPROTO_TCP | IPPROTO_UDP, 0..=1) => "l4.sport",
        (IPPROTO_TCP | IPPROTO_UDP, 2..=3) => "l4.dport",
        (IPPROTO_TCP, 4..=7) => "tcp.seq",
        (IPPROTO_TCP, 8..=11) => "tcp.ack",
        (IPPROTO_TCP, 12) => "tcp.doff",
        (IPPROTO_TCP, 13) => "tcp.flags",
        (IPPROTO_TCP, 14..=15) => "tcp.window",
        (IPPROTO_TCP, 16..=17) => "tcp.check",
        (IPPROTO_TCP, 18..=19) => "tcp.urg",
        (IPPROTO_UDP, 4..=5) => "udp.len",
        (IPPROTO_UDP, 6..=7) => "udp.check",
        _ => "payload",
    };
    name.to_owned()
}

/// Name of the field at `ip` bytes after the Ethernet header of an IPv6 frame.
fn field_at_v6(frame: &[u8], ip: usize) -> String {
    let name = match ip {
        0..=3 => "ip6.version_class_flow",
        4..=5 => "ip6.payload_len",
        6 => "ip6.next_header",
        7 => "ip6.hop_limit",
        8..=23 => "ip6.src",
        24..=39 => "ip6.dst",
        _ => {
            let next = frame.get(ETH_HLEN + 6).copied().unwrap_or(0);
            match (next, ip - 40) {
                (IPPROTO_TCP | IPPROTO_UDP, 0..=1) => "l4.sport",
                (IPPROTO_TCP | IPPROTO_UDP, 2..=3) => "l4.dport",
                (IPPROTO_TCP, 16..=17) | (IPPROTO_UDP, 6..=7) => "l4.check",
                (IPPROTO_TCP, 13) => "tcp.flags",
                (IPPROTO_TCP, 20..) => "tcp.options/payload",
                (IPPROTO_ICMPV6, 2..=3) => "icmp6.check",
                _ => "l4/payload",
            }
        }
    };
    name.to_owned()
}

/// Byte-by-byte differences between two frames, named by field; empty when equal.
#[must_use]
pub fn diff(expected: &[u8], actual: &[u8]) -> String {
    let mut s = String::new();
    if expected.len() != actual.len() {
        let _ = writeln!(
            s,
            "  length: expected {} bytes, got {}",
            expected.len(),
            actual.len()
        );
    }
    for i in 0..expected.len().min(actual.len()) {
        if expected[i] != actual[i] {
            let _ = writeln!(
                s,
                "  offset {i:3} ({}): expected {:02x}, got {:02x}",
                field_at(expected, i),
                expected[i],
                actual[i]
            );
        }
    }
    s
}

/// Check the IPv4 header checksum and the TCP/UDP checksum of `frame` by full recomputation.
/// A UDP checksum of 0 means "none" and is accepted.
///
/// # Errors
/// A description of the first malformed or wrong field.
pub fn verify_checksums(frame: &[u8]) -> Result<()> {
    if frame.get(12..14) == Some(&ETH_P_IPV6.to_be_bytes()[..]) {
        return verify_checksums_v6(frame);
    }
    ensure!(frame.len() >= ETH_HLEN + 20, "frame too short for IPv4");
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ensure!(ihl >= 20 && ip.len() >= ihl, "bad IHL {ihl}");
    ensure!(
        checksum::verify(&ip[..ihl]),
        "IPv4 header checksum {:#06x} is wrong (full recomputation gives {:#06x})",
        u16::from_be_bytes([ip[10], ip[11]]),
        {
            let mut h = ip[..ihl].to_vec();
            h[10] = 0;
            h[11] = 0;
            checksum::checksum(&h)
        }
    );
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    ensure!(
        tot_len >= ihl && tot_len <= ip.len(),
        "IP total length {tot_len} outside the frame"
    );
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let proto = ip[9];
    let mut seg = ip[ihl..tot_len].to_vec();
    let field = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMP => return verify_icmp(&seg),
        _ => return Ok(()),
    };
    ensure!(seg.len() >= field + 2, "L4 header truncated");
    let stored = u16::from_be_bytes([seg[field], seg[field + 1]]);
    if proto == IPPROTO_UDP && stored == 0 {
        return Ok(());
    }
    seg[field] = 0;
    seg[field + 1] = 0;
    let mut full = checksum::l4_checksum_v4(src, dst, proto, &seg);
    if proto == IPPROTO_UDP && full == 0 {
        full = 0xffff;
    }
    ensure!(
        stored == full,
        "{} checksum {stored:#06x} is wrong (full recomputation gives {full:#06x})",
        if proto == IPPROTO_TCP { "TCP" } else { "UDP" }
    );
    Ok(())
}

/// IPv6: the TCP/UDP/ICMPv6 checksum of a frame whose next header is TCP, UDP or ICMPv6, by
/// full recomputation over the IPv6 pseudo-header. UDP checksum 0 is invalid in IPv6 (RFC 8200
/// section 8.1) and fails.
///
/// # Errors
/// A description of the first malformed or wrong field.
pub fn verify_checksums_v6(frame: &[u8]) -> Result<()> {
    ensure!(frame.len() >= ETH_HLEN + 40, "frame too short for IPv6");
    let ip = &frame[ETH_HLEN..];
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    ensure!(
        40 + payload_len <= ip.len(),
        "IPv6 payload length {payload_len} outside the frame"
    );
    let src: [u8; 16] = ip[8..24].try_into()?;
    let dst: [u8; 16] = ip[24..40].try_into()?;
    let next = ip[6];
    let mut seg = ip[40..40 + payload_len].to_vec();
    let field = match next {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMPV6 => 2,
        _ => return Ok(()),
    };
    ensure!(seg.len() >= field + 2, "L4 header truncated");
    let stored = u16::from_be_bytes([seg[field], seg[field + 1]]);
    ensure!(!(next == IPPROTO_UDP && stored == 0), "IPv6 UDP checksum 0");
    seg[field] = 0;
    seg[field + 1] = 0;
    let mut full = l4_checksum_v6(&src, &dst, next, &seg);
    if next == IPPROTO_UDP && full == 0 {
        full = 0xffff;
    }
    ensure!(
        stored == full,
        "IPv6 next header {next} checksum {stored:#06x} is wrong (full recomputation gives \
         {full:#06x})"
    );
    Ok(())
}

/// The ICMP checksum over the whole message and, for an error (destination unreachable, time
/// exceeded) quoting a full IPv4 header, the quoted header's checksum.
fn verify_icmp(msg: &[u8]) -> Result<()> {
    ensure!(msg.len() >= 8, "ICMP header truncated");
    ensure!(
        checksum::verify(msg),
        "ICMP checksum {:#06x} is wrong (full recomputation gives {:#06x})",
        u16::from_be_bytes([msg[2], msg[3]]),
        {
            let mut m = msg.to_vec();
            m[2] = 0;
            m[3] = 0;
            checksum::checksum(&m)
        }
    );
    if (msg[0] == 3 || msg[0] == 11) && msg.len() >= 8 + 20 && msg[8] >> 4 == 4 {
        let ihl = usize::from(msg[8] & 0x0f) * 4;
        ensure!(
            ihl >= 20 && msg.len() >= 8 + ihl && checksum::verify(&msg[8..8 + ihl]),
            "quoted IPv4 header checksum {:#06x} is wrong",
            u16::from_be_bytes([msg[18], msg[19]])
        );
    }
    Ok(())
}

// =============================================================================================
// The test topology.
// =============================================================================================

/// Addresses and interfaces of the namespace every harness builds.
///
/// ```text
///   clients 198.51.100.0/24 ── router 10.10.1.254 ──┐
///                                                   xpc 10.10.1.1/24 (service address)
///                                          [ proxy namespace, ip_forward=1 ]
///                                                   xph 10.20.1.1/24 (SNAT address)
///   upstream 10.20.1.2 (permanent neighbour) ───────┘   10.20.1.3: no neighbour entry
///   10.99.0.0/16: no route
/// ```
/// `xpc` and `xph` are veths whose peers (`xpc-peer`, `xph-peer`) stay in the namespace, up.
///
/// IPv6 mirrors it in 2001:db8::/32 (`*6` constants): service 2001:db8:10:1::1 on `xpc`,
/// clients 2001:db8:5100::/48 via router 2001:db8:10:1::fe, SNAT 2001:db8:20:1::1 on `xph`,
/// upstream 2001:db8:20:1::2 (permanent neighbour, the same MAC as the IPv4 upstream),
/// 2001:db8:20:1::3 without neighbour, 2001:db8:99::/48 without route; IPv6 forwarding on.
/// The IPv6 services have the IPv4 services' ids (dual stack); IPv6 upstreams are ids 6-10.
pub mod topo {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

    use super::Mac;

    pub const CLIENT_DEV: &str = "xpc";
    pub const HOME_DEV: &str = "xph";
    pub const CLIENT_DEV_MAC: Mac = [0x02, 0, 0, 0, 0x0c, 0x01];
    pub const HOME_DEV_MAC: Mac = [0x02, 0, 0, 0, 0x0d, 0x01];

    /// The service address (on the client-side interface).
    pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
    /// The SNAT address (on the home-side interface).
    pub const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 1);
    /// Next hop towards the clients.
    pub const CLIENT_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 254);
    pub const CLIENT_ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0x0c, 0xfe];
    pub const CLIENT_NET: &str = "198.51.100.0/24";
    pub const CLIENT_1: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    pub const CLIENT_2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);
    /// Upstream host with a permanent neighbour entry.
    pub const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 2);
    pub const UPSTREAM_MAC: Mac = [0x02, 0, 0, 0, 0x0d, 0x02];
    /// Upstream host on the home subnet without a neighbour entry (fib: NO_NEIGH).
    pub const UPSTREAM_NO_NEIGH_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 3);
    /// Upstream host without a route (fib: not forwarded).
    pub const UPSTREAM_NO_ROUTE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 5);

    /// Service 1: TCP, upstream 1.
    pub const SVC_TCP: SocketAddrV4 = SocketAddrV4::new(SERVICE_IP, 80);
    /// Service 2: UDP, upstream 2.
    pub const SVC_UDP: SocketAddrV4 = SocketAddrV4::new(SERVICE_IP, 53);
    /// Service 3: TCP, no upstreams (flag unset).
    pub const SVC_EMPTY: SocketAddrV4 = SocketAddrV4::new(SERVICE_IP, 81);
    /// Service 4: TCP, upstream 3 (no neighbour).
    pub const SVC_NO_NEIGH: SocketAddrV4 = SocketAddrV4::new(SERVICE_IP, 82);
    /// Service 5: TCP, upstream 4 (no route).
    pub const SVC_NO_ROUTE: SocketAddrV4 = SocketAddrV4::new(SERVICE_IP, 83);

    pub const SVC_TCP_ID: u32 = 1;
    pub const SVC_UDP_ID: u32 = 2;
    pub const SVC_EMPTY_ID: u32 = 3;
    pub const SVC_NO_NEIGH_ID: u32 = 4;
    pub const SVC_NO_ROUTE_ID: u32 = 5;

    pub const UPS_TCP: SocketAddrV4 = SocketAddrV4::new(UPSTREAM_IP, 8080);
    pub const UPS_UDP: SocketAddrV4 = SocketAddrV4::new(UPSTREAM_IP, 5353);
    pub const UPS_NO_NEIGH: SocketAddrV4 = SocketAddrV4::new(UPSTREAM_NO_NEIGH_IP, 8080);
    pub const UPS_NO_ROUTE: SocketAddrV4 = SocketAddrV4::new(UPSTREAM_NO_ROUTE_IP, 8080);
    /// A second TCP upstream of service 1 (same host, other port).
    pub const UPS_TCP_2: SocketAddrV4 = SocketAddrV4::new(UPSTREAM_IP, 9090);

    pub const UPS_TCP_ID: u32 = 1;
    pub const UPS_UDP_ID: u32 = 2;
    pub const UPS_NO_NEIGH_ID: u32 = 3;
    pub const UPS_NO_ROUTE_ID: u32 = 4;
    pub const UPS_TCP_2_ID: u32 = 5;

    /// SNAT port range of the default config.
    pub const PORT_MIN: u16 = 20_000;
    pub const PORT_MAX: u16 = 29_999;

    /// Flow table size for tests (the program's default is far larger).
    pub const TEST_MAX_FLOWS: u32 = 4096;

    const fn v6(a: u16, b: u16, c: u16, d: u16, h: u16) -> Ipv6Addr {
        Ipv6Addr::new(a, b, c, d, 0, 0, 0, h)
    }
    const fn s6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(ip, port, 0, 0)
    }

    pub const SERVICE_IP6: Ipv6Addr = v6(0x2001, 0xdb8, 0x10, 1, 1);
    pub const SNAT_IP6: Ipv6Addr = v6(0x2001, 0xdb8, 0x20, 1, 1);
    pub const CLIENT_ROUTER6: Ipv6Addr = v6(0x2001, 0xdb8, 0x10, 1, 0xfe);
    pub const CLIENT_NET6: &str = "2001:db8:5100::/48";
    pub const CLIENT6_1: Ipv6Addr = v6(0x2001, 0xdb8, 0x5100, 0, 7);
    pub const CLIENT6_2: Ipv6Addr = v6(0x2001, 0xdb8, 0x5100, 0, 8);
    pub const UPSTREAM_IP6: Ipv6Addr = v6(0x2001, 0xdb8, 0x20, 1, 2);
    pub const UPSTREAM_NO_NEIGH_IP6: Ipv6Addr = v6(0x2001, 0xdb8, 0x20, 1, 3);
    pub const UPSTREAM_NO_ROUTE_IP6: Ipv6Addr = v6(0x2001, 0xdb8, 0x99, 0, 5);

    pub const SVC6_TCP: SocketAddrV6 = s6(SERVICE_IP6, 80);
    pub const SVC6_UDP: SocketAddrV6 = s6(SERVICE_IP6, 53);
    pub const SVC6_EMPTY: SocketAddrV6 = s6(SERVICE_IP6, 81);
    pub const SVC6_NO_NEIGH: SocketAddrV6 = s6(SERVICE_IP6, 82);
    pub const SVC6_NO_ROUTE: SocketAddrV6 = s6(SERVICE_IP6, 83);

    pub const UPS6_TCP: SocketAddrV6 = s6(UPSTREAM_IP6, 8080);
    pub const UPS6_UDP: SocketAddrV6 = s6(UPSTREAM_IP6, 5353);
    pub const UPS6_NO_NEIGH: SocketAddrV6 = s6(UPSTREAM_NO_NEIGH_IP6, 8080);
    pub const UPS6_NO_ROUTE: SocketAddrV6 = s6(UPSTREAM_NO_ROUTE_IP6, 8080);
    pub const UPS6_TCP_2: SocketAddrV6 = s6(UPSTREAM_IP6, 9090);

    pub const UPS6_TCP_ID: u32 = 6;
    pub const UPS6_UDP_ID: u32 = 7;
    pub const UPS6_NO_NEIGH_ID: u32 = 8;
    pub const UPS6_NO_ROUTE_ID: u32 = 9;
    pub const UPS6_TCP_2_ID: u32 = 10;
}

/// An interface of the test namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    pub name: &'static str,
    pub ifindex: u32,
    pub mac: Mac,
}

/// Run `ip -batch -` with `batch` on stdin, in this thread's network namespace (a child process
/// inherits the namespace of the thread that spawns it).
///
/// # Errors
/// When `ip` cannot run or a line of the batch fails (the error shows the batch).
pub fn ip_batch(batch: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run ip")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("ip: no stdin"))?;
        stdin
            .write_all(batch.as_bytes())
            .context("writing the ip batch")?;
    }
    let out = child.wait_with_output().context("waiting for ip")?;
    ensure!(
        out.status.success(),
        "ip -batch failed ({}): {}\nbatch:\n{batch}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Enter a new, nameless network namespace on this thread and build [`topo`] in it.
fn build_namespace() -> Result<(Iface, Iface)> {
    use topo::*;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET) (needs root)")?;
    let mac = |m: Mac| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let batch = format!(
        "link set lo up
link add {CLIENT_DEV} address {cmac} type veth peer name {CLIENT_DEV}-peer
link add {HOME_DEV} address {hmac} type veth peer name {HOME_DEV}-peer
link set {CLIENT_DEV}-peer up
link set {HOME_DEV}-peer up
link set {CLIENT_DEV} up
link set {HOME_DEV} up
addr add {SERVICE_IP}/24 dev {CLIENT_DEV}
addr add {SNAT_IP}/24 dev {HOME_DEV}
route add {CLIENT_NET} via {CLIENT_ROUTER} dev {CLIENT_DEV}
neigh add {CLIENT_ROUTER} lladdr {rmac} dev {CLIENT_DEV} nud permanent
neigh add {UPSTREAM_IP} lladdr {umac} dev {HOME_DEV} nud permanent
addr add {SERVICE_IP6}/64 dev {CLIENT_DEV} nodad
addr add {SNAT_IP6}/64 dev {HOME_DEV} nodad
route add {CLIENT_NET6} via {CLIENT_ROUTER6} dev {CLIENT_DEV}
neigh add {CLIENT_ROUTER6} lladdr {rmac} dev {CLIENT_DEV} nud permanent
neigh add {UPSTREAM_IP6} lladdr {umac} dev {HOME_DEV} nud permanent
",
        cmac = mac(CLIENT_DEV_MAC),
        hmac = mac(HOME_DEV_MAC),
        rmac = mac(CLIENT_ROUTER_MAC),
        umac = mac(UPSTREAM_MAC),
    );
    ip_batch(&batch)?;
    // /proc/sys/net belongs to the namespace of the thread that opens it. IPv6 forwarding
    // (all: every interface) or bpf_fib_lookup answers FWD_DISABLED.
    for (path, value) in [
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/ipv4/conf/all/forwarding", "1"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
    ] {
        std::fs::write(path, value).with_context(|| format!("writing {path}"))?;
        let back = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        ensure!(
            back.trim() == value,
            "{path} reads {back:?} after writing {value}"
        );
    }
    let iface = |name: &'static str, mac: Mac| -> Result<Iface> {
        let ifindex =
            nix::net::if_::if_nametoindex(name).with_context(|| format!("ifindex of {name}"))?;
        Ok(Iface { name, ifindex, mac })
    };
    Ok((
        iface(CLIENT_DEV, CLIENT_DEV_MAC)?,
        iface(HOME_DEV, HOME_DEV_MAC)?,
    ))
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
#[must_use]
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

// =============================================================================================
// The harness.
// =============================================================================================

/// The `struct xdp_md` given to `BPF_PROG_TEST_RUN` as `ctx_in` (6 x u32, native endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpMd {
    /// Offset of the packet in `data_in` (bytes before it are metadata); 0 here.
    pub data: u32,
    /// End of the linear part the program sees; bytes of `data_in` after it become a fragment.
    pub data_end: u32,
    pub data_meta: u32,
    pub ingress_ifindex: u32,
    pub rx_queue_index: u32,
    pub egress_ifindex: u32,
}

impl XdpMd {
    #[must_use]
    pub fn to_bytes(self) -> Vec<u8> {
        [
            self.data,
            self.data_end,
            self.data_meta,
            self.ingress_ifindex,
            self.rx_queue_index,
            self.egress_ifindex,
        ]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
    }
}

/// What one run returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub action: u32,
    pub output: Vec<u8>,
    /// `CLOCK_MONOTONIC` just before and just after the run.
    pub t_before: u64,
    pub t_after: u64,
}

/// Name of an XDP action.
#[must_use]
pub fn action_name(action: u32) -> &'static str {
    match action {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown",
    }
}

/// Expected output of a fixture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The frame comes out exactly as it went in.
    Unchanged,
    /// The frame comes out as these bytes; its checksums are also verified by recomputation.
    Bytes(Vec<u8>),
}

/// One packet case as data: description, input, expected action, reason and output.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub desc: String,
    pub input: Vec<u8>,
    pub ingress: Iface,
    /// Length of the linear part the program sees (`xdp_md.data_end`); `None`: the whole input.
    pub linear_len: Option<u32>,
    pub action: u32,
    pub reason: Reason,
    pub output: Expect,
}

impl Fixture {
    #[must_use]
    pub fn new(
        desc: impl Into<String>,
        input: Vec<u8>,
        ingress: Iface,
        action: u32,
        reason: Reason,
        output: Expect,
    ) -> Self {
        Self {
            desc: desc.into(),
            input,
            ingress,
            linear_len: None,
            action,
            reason,
            output,
        }
    }

    /// A case whose input goes in untouched and must come out untouched.
    #[must_use]
    pub fn unchanged(
        desc: impl Into<String>,
        input: Vec<u8>,
        ingress: Iface,
        action: u32,
        reason: Reason,
    ) -> Self {
        Self::new(desc, input, ingress, action, reason, Expect::Unchanged)
    }

    /// The reproduction block printed on failure.
    #[must_use]
    pub fn repro(&self) -> String {
        let md = self.md();
        format!(
            "case: {}\ningress: {} (ifindex {})\nctx_in xdp_md: {md:?}\n\
             data_in ({} bytes, `xxd -r -p` gives the frame):\n{}\n{}",
            self.desc,
            self.ingress.name,
            self.ingress.ifindex,
            self.input.len(),
            hex(&self.input),
            hexdump(&self.input)
        )
    }

    fn md(&self) -> XdpMd {
        let len = u32::try_from(self.input.len()).unwrap_or(u32::MAX);
        XdpMd {
            data_end: self.linear_len.unwrap_or(len),
            ingress_ifindex: self.ingress.ifindex,
            ..XdpMd::default()
        }
    }
}

/// One loaded instance of the XDP program with its own maps, inside its own namespace.
pub struct Harness {
    ebpf: Ebpf,
    /// Client-side interface (service address).
    pub client_if: Iface,
    /// Home-side interface (SNAT address).
    pub home_if: Iface,
    /// The config written to `XP_CONFIG[0]`.
    pub config: NatConfig,
}

/// Run `f` with a fresh [`Harness`] on a dedicated thread with its own network namespace; a
/// panic in `f` fails the calling test with the same message.
pub fn with_harness<F>(f: F)
where
    F: FnOnce(&mut Harness) + Send + 'static,
{
    let handle = std::thread::Builder::new()
        .name("xdp-packet-test".to_owned())
        .spawn(move || {
            let mut h = match Harness::new() {
                Ok(h) => h,
                Err(e) => panic!("packet test setup failed: {e:#}"),
            };
            f(&mut h);
        })
        .unwrap_or_else(|e| panic!("cannot spawn the test thread: {e}"));
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn map_err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> anyhow::Error + '_ {
    move |e| anyhow!("{what}: {e}")
}

impl Harness {
    /// Build the namespace, load the program, fill the default maps: config (ready, SNAT
    /// 10.20.1.1 and 2001:db8:20:1::1, ports 20000-29999), the five services and upstreams of
    /// [`topo`] in both families, both interfaces in the devmap. Maglev tables are left empty:
    /// tests steer their flows.
    fn new() -> Result<Self> {
        use topo::*;
        let (client_if, home_if) = build_namespace()?;
        ensure!(
            !proxy_ebpf_object::EBPF_OBJECT.is_empty(),
            "the embedded XDP object is empty (built with AYA_BUILD_SKIP=1?)"
        );
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_FLOWS_FWD, TEST_MAX_FLOWS)
            .map_max_entries(MAP_FLOWS_REV, TEST_MAX_FLOWS)
            .load(proxy_ebpf_object::EBPF_OBJECT)
            .context("loading the XDP object")?;
        {
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM_NAME)
                .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the object"))?
                .try_into()
                .context("program type")?;
            prog.load().context("verifier: loading the XDP program")?;
        }
        let config = NatConfig {
            snat_v4: addr_v4(SNAT_IP.octets()),
            port_min: PORT_MIN,
            port_max: PORT_MAX,
            flags: CONFIG_F_READY,
            snat_v6: SNAT_IP6.octets(),
        };
        let mut h = Self {
            ebpf,
            client_if,
            home_if,
            config,
        };
        h.try_set_config(config)?;
        let services = [
            (SVC_TCP, IPPROTO_TCP, SVC_TCP_ID, SERVICE_F_HAS_UPSTREAMS),
            (SVC_UDP, IPPROTO_UDP, SVC_UDP_ID, SERVICE_F_HAS_UPSTREAMS),
            (SVC_EMPTY, IPPROTO_TCP, SVC_EMPTY_ID, 0),
            (
                SVC_NO_NEIGH,
                IPPROTO_TCP,
                SVC_NO_NEIGH_ID,
                SERVICE_F_HAS_UPSTREAMS,
            ),
            (
                SVC_NO_ROUTE,
                IPPROTO_TCP,
                SVC_NO_ROUTE_ID,
                SERVICE_F_HAS_UPSTREAMS,
            ),
        ];
        for (addr, proto, id, flags) in services {
            h.try_add_service(service_key(addr, proto), ServiceValue { id, flags })?;
        }
        for (addr, proto, id, flags) in [
            (SVC6_TCP, IPPROTO_TCP, SVC_TCP_ID, SERVICE_F_HAS_UPSTREAMS),
            (SVC6_UDP, IPPROTO_UDP, SVC_UDP_ID, SERVICE_F_HAS_UPSTREAMS),
            (SVC6_EMPTY, IPPROTO_TCP, SVC_EMPTY_ID, 0),
            (
                SVC6_NO_NEIGH,
                IPPROTO_TCP,
                SVC_NO_NEIGH_ID,
                SERVICE_F_HAS_UPSTREAMS,
            ),
            (
                SVC6_NO_ROUTE,
                IPPROTO_TCP,
                SVC_NO_ROUTE_ID,
                SERVICE_F_HAS_UPSTREAMS,
            ),
        ] {
            h.try_add_service(service_key(addr, proto), ServiceValue { id, flags })?;
        }
        for (id, addr) in [
            (UPS6_TCP_ID, UPS6_TCP),
            (UPS6_UDP_ID, UPS6_UDP),
            (UPS6_NO_NEIGH_ID, UPS6_NO_NEIGH),
            (UPS6_NO_ROUTE_ID, UPS6_NO_ROUTE),
            (UPS6_TCP_2_ID, UPS6_TCP_2),
        ] {
            h.try_set_upstream(id, upstream(addr))?;
        }
        for (id, addr) in [
            (UPS_TCP_ID, UPS_TCP),
            (UPS_UDP_ID, UPS_UDP),
            (UPS_NO_NEIGH_ID, UPS_NO_NEIGH),
            (UPS_NO_ROUTE_ID, UPS_NO_ROUTE),
            (UPS_TCP_2_ID, UPS_TCP_2),
        ] {
            h.try_set_upstream(id, upstream(addr))?;
        }
        for ifindex in [client_if.ifindex, home_if.ifindex] {
            h.try_devmap_add(ifindex)?;
        }
        Ok(h)
    }

    fn xdp(&self) -> &Xdp {
        let prog = self
            .ebpf
            .program(PROGRAM_NAME)
            .unwrap_or_else(|| panic!("program {PROGRAM_NAME} missing"));
        prog.try_into()
            .unwrap_or_else(|e| panic!("program {PROGRAM_NAME}: {e}"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    fn map(&self, name: &str) -> &aya::maps::Map {
        self.ebpf
            .map(name)
            .unwrap_or_else(|| panic!("map {name} missing from the object"))
    }

    // ---- map writes -------------------------------------------------------------------------

    fn try_set_config(&mut self, cfg: NatConfig) -> Result<()> {
        let mut m: Array<&mut MapData, NatConfig> = self
            .map_mut(MAP_CONFIG)?
            .try_into()
            .map_err(map_err(MAP_CONFIG))?;
        m.set(0, cfg, 0).map_err(map_err("XP_CONFIG[0] = cfg"))?;
        self.config = cfg;
        Ok(())
    }

    fn try_add_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        let mut m: HashMap<&mut MapData, ServiceKey, ServiceValue> = self
            .map_mut(MAP_SERVICES)?
            .try_into()
            .map_err(map_err(MAP_SERVICES))?;
        m.insert(key, value, 0)
            .map_err(map_err("XP_SERVICES insert"))
    }

    fn try_set_upstream(&mut self, id: u32, value: UpstreamValue) -> Result<()> {
        let mut m: Array<&mut MapData, UpstreamValue> = self
            .map_mut(MAP_UPSTREAMS)?
            .try_into()
            .map_err(map_err(MAP_UPSTREAMS))?;
        m.set(id, value, 0).map_err(map_err("XP_UPSTREAMS set"))
    }

    fn try_devmap_add(&mut self, ifindex: u32) -> Result<()> {
        let mut m: DevMapHash<&mut MapData> = self
            .map_mut(MAP_DEVMAP)?
            .try_into()
            .map_err(map_err(MAP_DEVMAP))?;
        m.insert(ifindex, ifindex, None, 0)
            .map_err(map_err("XP_DEVMAP insert"))
    }

    /// Replace `XP_CONFIG[0]`.
    pub fn set_config(&mut self, cfg: NatConfig) {
        self.try_set_config(cfg).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Insert or replace a service.
    pub fn add_service(&mut self, key: ServiceKey, value: ServiceValue) {
        self.try_add_service(key, value)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Write upstream slot `id`.
    pub fn set_upstream(&mut self, id: u32, value: UpstreamValue) {
        self.try_set_upstream(id, value)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Put `ifindex` (back) into the redirect devmap.
    pub fn devmap_add(&mut self, ifindex: u32) {
        self.try_devmap_add(ifindex)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Remove `ifindex` from the redirect devmap.
    pub fn devmap_remove(&mut self, ifindex: u32) {
        let mut m: DevMapHash<&mut MapData> = self
            .map_mut(MAP_DEVMAP)
            .and_then(|m| m.try_into().map_err(map_err(MAP_DEVMAP)))
            .unwrap_or_else(|e| panic!("{e:#}"));
        m.remove(ifindex)
            .unwrap_or_else(|e| panic!("XP_DEVMAP remove {ifindex}: {e}"));
    }

    /// Point Maglev slot `slot` of service `service_id` at `upstream_id`.
    pub fn set_maglev(&mut self, service_id: u32, slot: u32, upstream_id: u32) {
        let mut m: Array<&mut MapData, u32> = self
            .map_mut(MAP_MAGLEV)
            .and_then(|m| m.try_into().map_err(map_err(MAP_MAGLEV)))
            .unwrap_or_else(|e| panic!("{e:#}"));
        m.set(service_id * MAGLEV_SIZE + slot, upstream_id, 0)
            .unwrap_or_else(|e| panic!("XP_MAGLEV set: {e}"));
    }

    /// Make a new flow with `tuple` pick `upstream_id`: write only the Maglev slot that
    /// `flow_hash(SEED_MAGLEV, tuple) % MAGLEV_SIZE` selects. Returns the slot.
    pub fn steer<S: Sock>(&mut self, tuple: &Tuple<S>, service_id: u32, upstream_id: u32) -> u32 {
        let slot = tuple.maglev_slot();
        self.set_maglev(service_id, slot, upstream_id);
        slot
    }

    /// Replace `XP_SVC_OPTS[service_id]`.
    pub fn set_service_options(&mut self, service_id: u32, options: ServiceOptions) {
        let mut m: Array<&mut MapData, ServiceOptions> = self
            .map_mut(MAP_SERVICE_OPTIONS)
            .and_then(|m| m.try_into().map_err(map_err(MAP_SERVICE_OPTIONS)))
            .unwrap_or_else(|e| panic!("{e:#}"));
        m.set(service_id, options, 0)
            .unwrap_or_else(|e| panic!("XP_SVC_OPTS[{service_id}] = {options:?}: {e}"));
    }

    /// Add `addr/prefix_len` to the allow (`allow = true`) or deny list of `service_id`.
    pub fn acl_add<I: IpFam>(&mut self, allow: bool, service_id: u32, addr: I, prefix_len: u32) {
        let name = if allow { MAP_ACL_ALLOW } else { MAP_ACL_DENY };
        let mut m: LpmTrie<&mut MapData, AclKey, u32> = self
            .map_mut(name)
            .and_then(|m| m.try_into().map_err(map_err(name)))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let key = LpmKey::new(
            ACL_PREFIX_BASE + prefix_len,
            AclKey {
                service_id: service_id.to_be_bytes(),
                family: I::FAMILY,
                addr: addr.key_addr(),
                _pad: [0; 3],
            },
        );
        m.insert(&key, ACL_HIT, 0)
            .unwrap_or_else(|e| panic!("{name} insert {addr:?}/{prefix_len}: {e}"));
    }

    /// The new-flow token bucket of (`service_id`, `client`), if the program made one.
    #[must_use]
    pub fn rate_state<I: IpFam>(&self, service_id: u32, client: I) -> Option<RateState> {
        let m: HashMap<&MapData, RateKey, RateState> = self
            .map(MAP_RATE)
            .try_into()
            .unwrap_or_else(|e| panic!("{MAP_RATE}: {e}"));
        let key = RateKey {
            addr: client.key_addr(),
            service_id,
            family: I::FAMILY,
            _pad: [0; 3],
        };
        m.get(&key, 0).ok()
    }

    /// Write the new-flow token bucket of (`service_id`, `client`).
    pub fn set_rate_state<I: IpFam>(&mut self, service_id: u32, client: I, state: RateState) {
        let mut m: HashMap<&mut MapData, RateKey, RateState> = self
            .map_mut(MAP_RATE)
            .and_then(|m| m.try_into().map_err(map_err(MAP_RATE)))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let key = RateKey {
            addr: client.key_addr(),
            service_id,
            family: I::FAMILY,
            _pad: [0; 3],
        };
        m.insert(key, state, 0)
            .unwrap_or_else(|e| panic!("{MAP_RATE} insert: {e}"));
    }

    /// Insert a reverse flow entry (e.g. to occupy a SNAT port).
    pub fn insert_rev_flow(&mut self, key: FlowKey, value: FlowValue) {
        let mut m: HashMap<&mut MapData, FlowKey, FlowValue> = self
            .map_mut(MAP_FLOWS_REV)
            .and_then(|m| m.try_into().map_err(map_err(MAP_FLOWS_REV)))
            .unwrap_or_else(|e| panic!("{e:#}"));
        m.insert(key, value, 0)
            .unwrap_or_else(|e| panic!("XP_FLOWS_REV insert: {e}"));
    }

    /// Insert (or overwrite) a forward flow entry.
    pub fn insert_fwd_flow(&mut self, key: FlowKey, value: FlowValue) {
        let mut m: HashMap<&mut MapData, FlowKey, FlowValue> = self
            .map_mut(MAP_FLOWS_FWD)
            .and_then(|m| m.try_into().map_err(map_err(MAP_FLOWS_FWD)))
            .unwrap_or_else(|e| panic!("{e:#}"));
        m.insert(key, value, 0)
            .unwrap_or_else(|e| panic!("XP_FLOWS_FWD insert: {e}"));
    }

    /// Set the time of the forward entry `key`'s last next-hop lookup (`nh_checked_ns`; see
    /// [`NH_STALE`], [`nh_fresh`]), keeping the rest of the entry.
    pub fn set_next_hop_time(&mut self, key: &FlowKey, checked_ns: u64) {
        let v = self
            .fwd_flow(key)
            .unwrap_or_else(|| panic!("no forward entry to change"));
        self.insert_fwd_flow(
            *key,
            FlowValue {
                nh_checked_ns: checked_ns,
                ..v
            },
        );
    }

    /// Delete a reverse flow entry (as the LRU map's own eviction would).
    pub fn remove_rev_flow(&mut self, key: &FlowKey) {
        let mut m: HashMap<&mut MapData, FlowKey, FlowValue> = self
            .map_mut(MAP_FLOWS_REV)
            .and_then(|m| m.try_into().map_err(map_err(MAP_FLOWS_REV)))
            .unwrap_or_else(|e| panic!("{e:#}"));
        m.remove(key)
            .unwrap_or_else(|e| panic!("XP_FLOWS_REV remove: {e}"));
    }

    // ---- map reads --------------------------------------------------------------------------

    fn flows(&self, name: &str) -> HashMap<&MapData, FlowKey, FlowValue> {
        self.map(name)
            .try_into()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The forward entry for `key`, if any.
    #[must_use]
    pub fn fwd_flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows(MAP_FLOWS_FWD).get(key, 0).ok()
    }

    /// The reverse entry for `key`, if any.
    #[must_use]
    pub fn rev_flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows(MAP_FLOWS_REV).get(key, 0).ok()
    }

    /// Every entry of one flow table.
    #[must_use]
    pub fn all_flows(&self, name: &str) -> Vec<(FlowKey, FlowValue)> {
        self.flows(name)
            .iter()
            .map(|r| r.unwrap_or_else(|e| panic!("iterating {name}: {e}")))
            .collect()
    }

    /// `XP_LOG_RATE[0]`: the SNAT-exhaustion log line's rate-limit state.
    #[must_use]
    pub fn log_rate(&self) -> LogRate {
        let m: Array<&MapData, LogRate> = self
            .map(MAP_LOG_RATE)
            .try_into()
            .unwrap_or_else(|e| panic!("{MAP_LOG_RATE}: {e}"));
        m.get(&0, 0)
            .unwrap_or_else(|e| panic!("{MAP_LOG_RATE}[0]: {e}"))
    }

    /// Write `XP_LOG_RATE[0]`.
    pub fn set_log_rate(&mut self, v: LogRate) {
        let mut m: Array<&mut MapData, LogRate> = self
            .map_mut(MAP_LOG_RATE)
            .and_then(|m| {
                m.try_into()
                    .map_err(|e| anyhow::anyhow!("{MAP_LOG_RATE}: {e}"))
            })
            .unwrap_or_else(|e| panic!("{e:#}"));
        m.set(0, v, 0)
            .unwrap_or_else(|e| panic!("{MAP_LOG_RATE}[0] set: {e}"));
    }

    /// `XP_REASONS`, summed over CPUs.
    #[must_use]
    pub fn reasons(&self) -> [u64; REASON_COUNT as usize] {
        let m: PerCpuArray<&MapData, u64> = self
            .map(MAP_REASONS)
            .try_into()
            .unwrap_or_else(|e| panic!("{MAP_REASONS}: {e}"));
        let mut out = [0u64; REASON_COUNT as usize];
        for (i, slot) in (0u32..).zip(out.iter_mut()) {
            let v = m
                .get(&i, 0)
                .unwrap_or_else(|e| panic!("{MAP_REASONS}[{i}]: {e}"));
            *slot = v.iter().sum();
        }
        out
    }

    fn traffic(&self, name: &str, id: u32) -> TrafficCounters {
        let m: PerCpuArray<&MapData, TrafficCounters> = self
            .map(name)
            .try_into()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let v = m
            .get(&id, 0)
            .unwrap_or_else(|e| panic!("{name}[{id}]: {e}"));
        v.iter()
            .fold(TrafficCounters::default(), |a, c| TrafficCounters {
                fwd_packets: a.fwd_packets + c.fwd_packets,
                fwd_bytes: a.fwd_bytes + c.fwd_bytes,
                rev_packets: a.rev_packets + c.rev_packets,
                rev_bytes: a.rev_bytes + c.rev_bytes,
                new_flows: a.new_flows + c.new_flows,
            })
    }

    /// `XP_SVC_STATS[id]`, summed over CPUs.
    #[must_use]
    pub fn svc_stats(&self, id: u32) -> TrafficCounters {
        self.traffic(MAP_SERVICE_STATS, id)
    }

    /// `XP_UPS_STATS[id]`, summed over CPUs.
    #[must_use]
    pub fn ups_stats(&self, id: u32) -> TrafficCounters {
        self.traffic(MAP_UPSTREAM_STATS, id)
    }

    // ---- running ----------------------------------------------------------------------------

    /// Run the program once on `data_in` with context `md`.
    ///
    /// # Errors
    /// The syscall's error (the kernel refuses some inputs, e.g. frames under 14 bytes).
    pub fn try_run(&self, data_in: &[u8], md: XdpMd) -> Result<RunResult> {
        let ctx = md.to_bytes();
        let mut out = vec![0u8; data_in.len() + 512];
        let t_before = mono_ns();
        let r = self
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(data_in),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .map_err(|e| {
                anyhow!(
                    "BPF_PROG_TEST_RUN: {e} ({:?})",
                    std::error::Error::source(&e)
                )
            })?;
        let t_after = mono_ns();
        out.truncate(usize::try_from(r.data_size_out).unwrap_or(usize::MAX));
        Ok(RunResult {
            action: r.return_value,
            output: out,
            t_before,
            t_after,
        })
    }

    /// Run a frame arriving on `ingress` (the program sees all of it).
    #[must_use]
    pub fn run(&self, frame: &[u8], ingress: Iface) -> RunResult {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        self.try_run(
            frame,
            XdpMd {
                data_end: len,
                ingress_ifindex: ingress.ifindex,
                ..XdpMd::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\ndata_in: {}", hex(frame)))
    }

    /// Run a fixture and assert everything it states: the action, that exactly its reason was
    /// counted once in `XP_REASONS` (and nothing else), the exact output bytes, and for
    /// rewritten output the IP and L4 checksums by full recomputation. On failure, panics with
    /// a reproducible dump (input hex, context, expected and actual bytes, a field diff).
    pub fn check(&self, fx: &Fixture) -> RunResult {
        assert_eq!(
            fx.reason.action(),
            fx.action,
            "fixture {:?}: reason {} implies {}, fixture says {}",
            fx.desc,
            fx.reason.name(),
            action_name(fx.reason.action()),
            action_name(fx.action)
        );
        let before = self.reasons();
        let run = self
            .try_run(&fx.input, fx.md())
            .unwrap_or_else(|e| panic!("{e:#}\n{}", fx.repro()));
        let after = self.reasons();
        let mut errors = Vec::new();
        if run.action != fx.action {
            errors.push(format!(
                "verdict: expected {}, got {} ({})",
                action_name(fx.action),
                action_name(run.action),
                run.action
            ));
        }
        let delta: Vec<(Reason, i128)> = Reason::ALL
            .iter()
            .zip(before.iter().zip(after.iter()))
            .map(|(r, (b, a))| (*r, i128::from(*a) - i128::from(*b)))
            .filter(|(_, d)| *d != 0)
            .collect();
        if delta != [(fx.reason, 1)] {
            let got = delta
                .iter()
                .map(|(r, d)| format!("{} {d:+}", r.name()))
                .collect::<Vec<_>>()
                .join(", ");
            errors.push(format!(
                "XP_REASONS: expected exactly {} +1, got [{got}]",
                fx.reason.name()
            ));
        }
        let expected = match &fx.output {
            Expect::Unchanged => &fx.input,
            Expect::Bytes(b) => b,
        };
        if &run.output != expected {
            errors.push(format!(
                "output bytes differ:\n{}expected ({} bytes):\n{}\n{}actual ({} bytes):\n{}\n{}",
                diff(expected, &run.output),
                expected.len(),
                hex(expected),
                hexdump(expected),
                run.output.len(),
                hex(&run.output),
                hexdump(&run.output),
            ));
        }
        if matches!(fx.output, Expect::Bytes(_))
            && let Err(e) = verify_checksums(&run.output)
        {
            errors.push(format!("output checksums: {e:#}"));
        }
        assert!(
            errors.is_empty(),
            "packet case failed:\n{}\n{}",
            errors.join("\n"),
            fx.repro()
        );
        run
    }
}

/// A next-hop lookup time long past (`NEXT_HOP_VALID_NS` ago and more): the entry's next packet
/// looks its next hop up again and re-checks its reverse entry (docs/datapath.md, steps 5, 9).
pub const NH_STALE: u64 = 1;

/// A next-hop lookup time a minute ahead of now: the datapath counts a time ahead of its clock
/// as age 0, so the cache stays fresh for the whole test whatever the machine's load.
#[must_use]
pub fn nh_fresh() -> u64 {
    mono_ns() + 60_000_000_000
}

/// `v` with its next-hop cache (`nh_*`, written by the datapath on each FIB lookup) taken as
/// the all-zero one of an entry that never forwarded a packet.
pub fn without_next_hop(v: &FlowValue) -> FlowValue {
    FlowValue {
        nh_checked_ns: 0,
        nh_ifindex: 0,
        nh_len: 0,
        nh_dmac: [0; 6],
        nh_smac: [0; 6],
        _pad2: [0; 6],
        ..*v
    }
}

/// Compare a flow entry with an expectation, ignoring the two timestamps (checked separately
/// with [`assert_time_within`]) and the next-hop cache.
///
/// # Panics
/// When the entry is missing or differs.
pub fn assert_flow(what: &str, actual: Option<FlowValue>, expected: &FlowValue) -> FlowValue {
    let Some(actual) = actual else {
        panic!("{what}: no entry (expected {expected:?})");
    };
    let masked = FlowValue {
        created_ns: expected.created_ns,
        last_seen_ns: expected.last_seen_ns,
        ..without_next_hop(&actual)
    };
    assert!(
        masked == *expected,
        "{what}: entry differs\nexpected {expected:#?}\nactual   {actual:#?}"
    );
    actual
}

/// Assert that a timestamp was taken during `run`.
///
/// # Panics
/// When it was not.
pub fn assert_time_within(what: &str, t: u64, run: &RunResult) {
    assert!(
        run.t_before <= t && t <= run.t_after,
        "{what}: {t} not within the run [{}, {}]",
        run.t_before,
        run.t_after
    );
}

/// Parse a hex string (as printed by [`hex`]) back into bytes.
///
/// # Errors
/// On an odd length or a non-hex digit.
pub fn unhex(s: &str) -> Result<Vec<u8>> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !s.len().is_multiple_of(2) {
        bail!("odd hex length {}", s.len());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).with_context(|| format!("hex at {i}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_have_valid_checksums() {
        let c = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 40_000);
        let s = SocketAddrV4::new(Ipv4Addr::new(10, 10, 1, 1), 80);
        for p in [
            Packet::tcp(c, s, TCP_SYN),
            Packet::tcp(c, s, TCP_ACK | TCP_PSH).payload(b"GET / HTTP/1.1\r\n\r\n"),
            Packet::udp(c, s, b"odd"),
            Packet::udp(c, s, b"").udp_zero_checksum(),
            Packet::tcp(c, s, TCP_SYN).ip_options(&[1, 1, 1, 0]),
        ] {
            let b = p.bytes();
            verify_checksums(&b).unwrap_or_else(|e| panic!("{e:#}: {}", hex(&b)));
            assert_eq!(b.len(), ETH_HLEN + usize::from(p.ip_len()));
        }
    }

    #[test]
    fn known_frames_match_an_independent_encoder() {
        // Expected frames produced by a separate encoder (Python struct + its own RFC 1071
        // checksum), so the builder's layout and checksums are not only self-consistent.
        let c = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1234);
        let s = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80);
        assert_eq!(
            hex(&Packet::tcp(c, s, TCP_SYN).bytes()),
            "02000000ee0102000000ee020800450000284d2c40004006d9a10a0000010a000002\
             04d2005010000001000000005002faf08bcc0000"
        );
        assert_eq!(
            hex(&Packet::udp(c, s, b"odd").bytes()),
            "02000000ee0102000000ee0208004500001f4d2c40004011d99f0a0000010a000002\
             04d20050000b134f6f6464"
        );
    }

    #[test]
    fn known_ipv6_frames_match_an_independent_encoder() {
        // Expected frames produced by a separate encoder (Python struct + its own RFC 1071
        // checksum over the RFC 8200 pseudo-header); flow label = the builder's `id`.
        let c = SocketAddrV6::new("2001:db8::1".parse().expect("address"), 1234, 0, 0);
        let s = SocketAddrV6::new("2001:db8::2".parse().expect("address"), 80, 0, 0);
        assert_eq!(
            hex(&Packet::tcp(c, s, TCP_SYN).bytes()),
            "02000000ee0102000000ee0286dd60004d2c0014064020010db8000000000000000000000001\
             20010db800000000000000000000000204d2005010000001000000005002faf0445a0000"
        );
        assert_eq!(
            hex(&Packet::udp(c, s, b"odd").bytes()),
            "02000000ee0102000000ee0286dd60004d2c000b114020010db8000000000000000000000001\
             20010db800000000000000000000000204d20050000bcbdc6f6464"
        );
        for p in [
            Packet::tcp(c, s, TCP_SYN).tcp_options(&[2, 4, 5, 0xb4]),
            Packet::udp(c, s, b"x"),
        ] {
            let b = p.bytes();
            verify_checksums(&b).unwrap_or_else(|e| panic!("{e:#}: {}", hex(&b)));
            assert_eq!(b.len(), ETH_HLEN + usize::from(p.ip_len()));
        }
        let mut b = Packet::udp(c, s, b"x").bytes();
        b[ETH_HLEN + 40 + 6] ^= 1;
        assert!(verify_checksums(&b).is_err(), "a wrong IPv6 UDP checksum");
        let zero = Packet::udp(c, s, b"x").udp_zero_checksum().bytes();
        assert!(
            verify_checksums(&zero).is_err(),
            "IPv6 UDP checksum 0 is invalid"
        );
    }

    #[test]
    fn verify_detects_a_wrong_l4_checksum() {
        let c = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1234);
        let s = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80);
        let mut b = Packet::tcp(c, s, TCP_SYN).bytes();
        b[ETH_HLEN + 20 + 16] ^= 1;
        assert!(verify_checksums(&b).is_err());
        let mut b = Packet::udp(c, s, b"x").bytes();
        b[ETH_HLEN + 20 + 6] ^= 1;
        assert!(verify_checksums(&b).is_err());
    }

    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&b)).ok(), Some(b.to_vec()));
    }

    #[test]
    fn probe_ports_wrap_in_the_range() {
        let cfg = NatConfig {
            port_min: 100,
            port_max: 103,
            ..NatConfig::default()
        };
        let t = Tuple::new(
            SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 5),
            SocketAddrV4::new(Ipv4Addr::new(6, 7, 8, 9), 10),
            IPPROTO_TCP,
        );
        let ports = t.snat_probe_ports(&cfg);
        assert_eq!(ports.len(), 4);
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![100, 101, 102, 103]);
    }
}
