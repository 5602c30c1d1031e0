//! Header parsing: steps 1-3 of docs/datapath.md. Every header is bounds-checked against
//! `data_end` before it is read; the result is a copy of the few fields the rest of the program
//! needs, so later steps never read the packet again (only the rewrite does, after its own
//! bounds checks).

use aya_ebpf::programs::XdpContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::keys::FlowKeyW;

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
/// IPv4 "more fragments" flag (in the first byte of the flags/offset field) and offset mask.
const IP_MF: u8 = 0x20;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// The fields of a parsed IPv4 TCP/UDP packet. Addresses and ports keep the wire's byte order:
/// they are the packet's bytes read with `from_ne_bytes` (one register each instead of one per
/// byte, which keeps the program within the 512-byte BPF stack), and go back with `to_ne_bytes`.
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ttl: u8,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// IPv4 total length, host byte order.
    pub tot_len: u16,
}

impl Packet {
    /// The packet's own 5-tuple as a flow key.
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKeyW {
        FlowKeyW::v4(self.src, self.dst, self.sport, self.dport, self.proto)
    }

    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
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
