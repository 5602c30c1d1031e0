//! Header parsing: steps 1-3 of docs/datapath.md. Every header is bounds-checked against
//! `data_end` before it is read; the result is a copy of the few fields the rest of the program
//! needs, so later steps never read the packet again (only the rewrite does, after its own
//! bounds checks).

use aya_ebpf::programs::XdpContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{FAMILY_IPV6, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{family::Ip, keys::FlowKeyW};

/// Offset of the IPv4 header (Ethernet II, no VLAN tag).
pub const IP_OFF: usize = EthHdr::LEN;
/// Offset of the TCP/UDP header: packets with IP options are never rewritten, so the IPv4
/// header is always 20 bytes when we get this far.
pub const L4_OFF: usize = IP_OFF + Ipv4Hdr::LEN;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// EtherType IPv4 as it appears on the wire.
const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
/// EtherType IPv6 as it appears on the wire.
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
/// IPv4 "more fragments" flag (in the first byte of the flags/offset field) and offset mask.
const IP_MF: u8 = 0x20;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// The fields of a parsed TCP/UDP packet of family `A` (`u32`: IPv4, `[u32; 4]`: IPv6).
/// Addresses and ports keep the wire's byte order: they are the packet's bytes read with
/// `from_ne_bytes` (one register per 4 bytes instead of one per byte, which keeps the program
/// within the 512-byte BPF stack), and go back with `to_ne_bytes`.
#[derive(Clone, Copy)]
pub struct PacketG<A> {
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ttl: u8,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// IP length, host byte order: the IPv4 total length; for IPv6, 40 + payload length.
    pub tot_len: u16,
    /// IPv6 UDP with checksum 0 (invalid in IPv6); always false for IPv4.
    pub udp_zero_check: bool,
}

/// A parsed IPv4 packet.
pub type Packet = PacketG<u32>;
/// A parsed IPv6 packet.
pub type Packet6 = PacketG<[u32; 4]>;

impl<A: Ip> PacketG<A> {
    /// The packet's own 5-tuple as a flow key.
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKeyW {
        FlowKeyW::new(self.src, self.dst, self.sport, self.dport, self.proto)
    }

    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }

    /// An IPv6 UDP datagram with checksum 0 (a constant false for IPv4).
    #[inline(always)]
    pub fn invalid_udp_check(&self) -> bool {
        A::FAMILY == FAMILY_IPV6 && self.udp_zero_check
    }
}

/// A pointer to a `T` at `offset` into the packet, or `None` when `T` would reach past
/// `data_end`. This is the one bounds check every packet access goes through.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Steps 1-3: Ethernet, IPv4, TCP/UDP. `Err` carries the packet's final reason.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    // Step 1: Ethernet.
    let eth: *const [u8; EthHdr::LEN] = ptr_at(ctx, 0).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 14 <= data_end; byte array, no alignment needed.
    let eth = unsafe { &*eth };
    if [eth[12], eth[13]] != ETH_P_IPV4 {
        return Err(Reason::PassNotIp);
    }

    // Step 2: IPv4 header.
    let ip: *const Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 14 + 20 <= data_end; Ipv4Hdr is all bytes (align 1).
    let ip = unsafe { &*ip };
    let version = ip.vihl >> 4;
    let ihl = ip.vihl & 0x0f;
    if version != 4 || ihl < 5 {
        return Err(Reason::DropTruncated);
    }
    if ihl > 5 {
        return Err(Reason::PassIpOptions);
    }
    if ip.frags[0] & IP_MF != 0 || u16::from_be_bytes(ip.frags) & IP_OFFSET_MASK != 0 {
        return Err(Reason::PassFragment);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    let frame_ip_len = ctx.data_end() - ctx.data() - IP_OFF;
    let l4_min = match ip.proto {
        IPPROTO_TCP => TcpHdr::LEN,
        IPPROTO_UDP => UdpHdr::LEN,
        IPPROTO_ICMP => {
            // ICMP: `icmp::quote` decides whether it is an error quoting one of our flows
            // (everything else is `PassNotTcpUdp`, never `DropTruncated`).
            if tot_len as usize > frame_ip_len {
                return Err(Reason::PassNotTcpUdp);
            }
            return Ok(Packet {
                src: u32::from_ne_bytes(ip.src_addr),
                dst: u32::from_ne_bytes(ip.dst_addr),
                sport: 0,
                dport: 0,
                proto: IPPROTO_ICMP,
                ttl: ip.ttl,
                tcp_flags: 0,
                tot_len,
                udp_zero_check: false,
            });
        }
        _ => return Err(Reason::PassNotTcpUdp),
    };
    if (tot_len as usize) < Ipv4Hdr::LEN + l4_min || tot_len as usize > frame_ip_len {
        return Err(Reason::DropTruncated);
    }

    let mut pkt = Packet {
        src: u32::from_ne_bytes(ip.src_addr),
        dst: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: ip.proto,
        ttl: ip.ttl,
        tcp_flags: 0,
        tot_len,
        udp_zero_check: false,
    };

    // Step 3: L4 header.
    if pkt.proto == IPPROTO_TCP {
        let tcp: *const [u8; TcpHdr::LEN] = ptr_at(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 34 + 20 <= data_end; byte array, no alignment needed.
        let tcp = unsafe { &*tcp };
        let doff = (tcp[12] >> 4) as usize;
        if doff < 5 || ctx.data() + L4_OFF + doff * 4 > ctx.data_end() {
            return Err(Reason::DropTruncated);
        }
        pkt.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
        pkt.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
        pkt.tcp_flags = tcp[13];
    } else {
        let udp: *const UdpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 34 + 8 <= data_end; UdpHdr is all bytes (align 1).
        let udp = unsafe { &*udp };
        pkt.sport = u16::from_ne_bytes(udp.src);
        pkt.dport = u16::from_ne_bytes(udp.dst);
    }
    Ok(pkt)
}

/// Offset of the TCP/UDP header of an IPv6 packet: only a TCP/UDP header directly after the
/// fixed 40-byte header is ever parsed (extension headers are passed).
pub const L4_OFF6: usize = IP_OFF + IPV6_HLEN;
const IPV6_HLEN: usize = 40;

/// IPv6 next-header values that are extension headers (RFC 8200 section 4, IANA "IPv6 Extension
/// Header Types"): hop-by-hop (0), routing (43), destination options (60), AH (51), mobility
/// (135), HIP (139), Shim6 (140), experimental (253, 254). Fragment (44) has its own rule.
const NEXTHDR_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;

#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 60 | 51 | 135 | 139 | 140 | 253 | 254)
}

/// True when the frame's EtherType is IPv6 (called only for frames `parse` found not IPv4).
#[inline(always)]
pub fn is_ipv6(ctx: &XdpContext) -> bool {
    match ptr_at::<[u8; EthHdr::LEN]>(ctx, 0) {
        // SAFETY: ptr_at checked data + 14 <= data_end; byte array.
        Some(eth) => unsafe { [(*eth)[12], (*eth)[13]] == ETH_P_IPV6 },
        None => false,
    }
}

/// Steps 2-3 for IPv6 (docs/datapath.md, "IPv6"): the fixed header, the next-header rule, the
/// payload length, TCP/UDP. The Ethernet header was checked by `parse`. `Err` carries the
/// packet's final reason.
#[inline(always)]
pub fn parse6(ctx: &XdpContext) -> Result<Packet6, Reason> {
    let ip: *const [u8; IPV6_HLEN] = ptr_at(ctx, IP_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 14 + 40 <= data_end; byte array, no alignment needed.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Err(Reason::DropTruncated);
    }
    let next = ip[6];
    if next == NEXTHDR_FRAGMENT {
        return Err(Reason::PassFragment);
    }
    if is_extension_header(next) {
        return Err(Reason::PassIpOptions);
    }
    let l4_min = match next {
        IPPROTO_TCP => TcpHdr::LEN,
        IPPROTO_UDP => UdpHdr::LEN,
        IPPROTO_ICMPV6 => {
            // `icmp::quote6` decides whether it is an error quoting one of our flows; every
            // other ICMPv6 message (echo, NDP, ...) is `PassNotTcpUdp`, untouched.
            let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if IPV6_HLEN + payload_len > ctx.data_end() - ctx.data() - IP_OFF {
                return Err(Reason::PassNotTcpUdp);
            }
            return Ok(Packet6 {
                src: [0; 4],
                dst: [0; 4],
                sport: 0,
                dport: 0,
                proto: IPPROTO_ICMPV6,
                ttl: ip[7],
                tcp_flags: 0,
                // At most the frame's length, far below 64 KiB in XDP.
                tot_len: (IPV6_HLEN + payload_len) as u16,
                udp_zero_check: false,
            });
        }
        _ => return Err(Reason::PassNotTcpUdp),
    };
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let frame_ip_len = ctx.data_end() - ctx.data() - IP_OFF;
    if payload_len < l4_min || IPV6_HLEN + payload_len > frame_ip_len {
        return Err(Reason::DropTruncated);
    }
    // The 32 address bytes go to the stack first and come back as words: read straight into
    // words, LLVM keeps all 32 bytes in registers until their last use and spills each one on
    // its own (256 bytes of the 512-byte stack).
    let mut addrs = [0u32; 8];
    // SAFETY: [u32; 8] and [u8; 32] have the same size; u8 has no alignment requirement.
    unsafe { &mut *addrs.as_mut_ptr().cast::<[u8; 32]>() }.copy_from_slice(&ip[8..40]);
    // SAFETY: reads of an initialised local; volatile so the copy above really is a copy.
    let word = |i: usize| unsafe { core::ptr::read_volatile(&raw const addrs[i]) };
    let mut pkt = Packet6 {
        src: [word(0), word(1), word(2), word(3)],
        dst: [word(4), word(5), word(6), word(7)],
        sport: 0,
        dport: 0,
        proto: next,
        ttl: ip[7],
        tcp_flags: 0,
        // At most the frame's length, which is far below 64 KiB in XDP.
        tot_len: (IPV6_HLEN + payload_len) as u16,
        udp_zero_check: false,
    };

    if next == IPPROTO_TCP {
        let tcp: *const [u8; TcpHdr::LEN] = ptr_at(ctx, L4_OFF6).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 54 + 20 <= data_end; byte array.
        let tcp = unsafe { &*tcp };
        let doff = (tcp[12] >> 4) as usize;
        if doff < 5 || ctx.data() + L4_OFF6 + doff * 4 > ctx.data_end() {
            return Err(Reason::DropTruncated);
        }
        pkt.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
        pkt.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
        pkt.tcp_flags = tcp[13];
    } else {
        let udp: *const UdpHdr = ptr_at(ctx, L4_OFF6).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 54 + 8 <= data_end; UdpHdr is all bytes (align 1).
        let udp = unsafe { &*udp };
        pkt.sport = u16::from_ne_bytes(udp.src);
        pkt.dport = u16::from_ne_bytes(udp.dst);
        pkt.udp_zero_check = udp.check == [0, 0];
    }
    Ok(pkt)
}
