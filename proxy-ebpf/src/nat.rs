//! The rewrite of step 9: addresses and ports from the flow entry, optional TTL decrement, and
//! incremental IPv4 and TCP/UDP checksum updates (RFC 1624 via `proxy_common::checksum`).

use aya_ebpf::programs::XdpContext;
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{
    IPPROTO_TCP, Reason,
    checksum::{udp_update32, update16, update32},
};

use crate::parse::{IP_OFF, L4_OFF, Packet, ptr_at};

/// The new addresses and ports of a packet, taken from its flow entry; wire byte order, held
/// as `from_ne_bytes` integers like `Packet`'s fields.
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// MSS clamp for a TCP SYN or SYN-ACK (host byte order); 0: none.
    pub mss: u16,
}

/// Rewrite the packet's addresses and ports (and TTL when `dec_ttl`), patching both checksums.
/// Headers are re-derived with fresh bounds checks; `parse` already proved them present, so
/// `Err(DropTruncated)` cannot happen in practice.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, rw: &Rewrite, dec_ttl: bool) -> Result<(), Reason> {
    let (old_src, old_dst) = rewrite_ip(ctx, rw, dec_ttl)?;
    let new_src = rw.src.to_ne_bytes();
    let new_dst = rw.dst.to_ne_bytes();
    let sport = rw.sport.to_ne_bytes();
    let dport = rw.dport.to_ne_bytes();
    let new_ports = [sport[0], sport[1], dport[0], dport[1]];

    // Source and destination port are adjacent: one 32-bit update covers both.
    if pkt.proto == IPPROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 34 + 20 <= data_end; fields used are byte arrays.
        let tcp = unsafe { &mut *tcp };
        let old_ports = [tcp.source[0], tcp.source[1], tcp.dest[0], tcp.dest[1]];
        let mut c = u16::from_be_bytes(tcp.check);
        c = update32(c, old_src, new_src);
        c = update32(c, old_dst, new_dst);
        c = update32(c, old_ports, new_ports);
        tcp.source = sport;
        tcp.dest = dport;
        tcp.check = c.to_be_bytes();
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 34 + 8 <= data_end; UdpHdr is all bytes (align 1).
        let udp = unsafe { &mut *udp };
        let old_ports = [udp.src[0], udp.src[1], udp.dst[0], udp.dst[1]];
        // 0 = "no checksum" stays 0; a computed 0 is sent as 0xffff (never mistaken for "none"
        // by the next step either).
        let mut c = u16::from_be_bytes(udp.check);
        c = udp_update32(c, old_src, new_src);
        c = udp_update32(c, old_dst, new_dst);
        c = udp_update32(c, old_ports, new_ports);
        udp.src = sport;
        udp.dst = dport;
        udp.check = c.to_be_bytes();
    }
    Ok(())
}

/// Rewrite the IPv4 header's addresses to `rw.src`/`rw.dst` (and decrement the TTL when
/// `dec_ttl`), patching the header checksum. Returns the old source and destination addresses
/// (the L4 checksum update needs them).
#[inline(always)]
pub fn rewrite_ip(
    ctx: &XdpContext,
    rw: &Rewrite,
    dec_ttl: bool,
) -> Result<([u8; 4], [u8; 4]), Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 14 + 20 <= data_end; Ipv4Hdr is all bytes (align 1).
    let ip = unsafe { &mut *ip };
    let new_src = rw.src.to_ne_bytes();
    let new_dst = rw.dst.to_ne_bytes();
    let old_src = ip.src_addr;
    let old_dst = ip.dst_addr;
    let mut check = u16::from_be_bytes(ip.check);
    check = update32(check, old_src, new_src);
    check = update32(check, old_dst, new_dst);
    if dec_ttl {
        // TTL and protocol share one 16-bit word.
        let old_word = u16::from_be_bytes([ip.ttl, ip.proto]);
        ip.ttl = ip.ttl.wrapping_sub(1);
        check = update16(check, old_word, u16::from_be_bytes([ip.ttl, ip.proto]));
    }
    ip.src_addr = new_src;
    ip.dst_addr = new_dst;
    ip.check = check.to_be_bytes();

    Ok((old_src, old_dst))
}
