//! The rewrite of step 9: addresses and ports from the flow entry, optional TTL (hop limit)
//! decrement, and incremental IPv4 and TCP/UDP checksum updates (RFC 1624 via
//! `proxy_common::checksum`). IPv6 has no header checksum: only the TCP/UDP checksum, whose
//! pseudo-header holds the 128-bit addresses, is patched.

use aya_ebpf::programs::XdpContext;
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{
    IPPROTO_TCP, Reason,
    checksum::{add16, fold, update16, update32},
};

use crate::parse::{IP_OFF, L4_OFF, L4_OFF6, Packet, Packet6, ptr_at};

/// The new addresses and ports of a packet, taken from its flow entry; wire byte order, held
/// as `from_ne_bytes` integers like `PacketG`'s fields.
#[derive(Clone, Copy)]
pub struct RewriteG<A> {
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    /// MSS clamp for a TCP SYN or SYN-ACK (host byte order); 0: none.
    pub mss: u16,
}

/// The IPv4 rewrite.
pub type Rewrite = RewriteG<u32>;
/// The IPv6 rewrite.
pub type Rewrite6 = RewriteG<[u32; 4]>;

/// Rewrite the packet's addresses and ports (and TTL when `dec_ttl`), patching both checksums.
/// Headers are re-derived with fresh bounds checks; `parse` already proved them present, so
/// `Err(DropTruncated)` cannot happen in practice.
///
/// The checksum differences are summed once, in the byte order the words were loaded in (the
/// old values are `pkt`'s, read from this packet by `parse`), and folded once per checksum: a
/// one's complement sum does not depend on byte order (RFC 1071, 2(B)), so summing native words
/// and storing the result natively gives the same bytes as summing big-endian words.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, rw: &Rewrite, dec_ttl: bool) -> Result<(), Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 14 + 20 <= data_end; Ipv4Hdr is all bytes (align 1).
    let ip = unsafe { &mut *ip };
    // !old + new for both addresses, as 32-bit words (each the sum of its two 16-bit halves).
    let addrs = u64::from(!pkt.src) + u64::from(!pkt.dst) + u64::from(rw.src) + u64::from(rw.dst);
    let mut ip_sum = u64::from(!u16::from_ne_bytes(ip.check)) + addrs;
    if dec_ttl {
        // TTL and protocol share one 16-bit word.
        let old_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl = ip.ttl.wrapping_sub(1);
        ip_sum += u64::from(!old_word) + u64::from(u16::from_ne_bytes([ip.ttl, ip.proto]));
    }
    ip.src_addr = rw.src.to_ne_bytes();
    ip.dst_addr = rw.dst.to_ne_bytes();
    ip.check = (!fold64(ip_sum)).to_ne_bytes();

    let l4 = addrs
        + u64::from(!pkt.sport)
        + u64::from(!pkt.dport)
        + u64::from(rw.sport)
        + u64::from(rw.dport);
    let sport = rw.sport.to_ne_bytes();
    let dport = rw.dport.to_ne_bytes();
    if pkt.proto == IPPROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 34 + 20 <= data_end; fields used are byte arrays.
        let tcp = unsafe { &mut *tcp };
        let c = !fold64(u64::from(!u16::from_ne_bytes(tcp.check)) + l4);
        tcp.source = sport;
        tcp.dest = dport;
        tcp.check = c.to_ne_bytes();
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 34 + 8 <= data_end; UdpHdr is all bytes (align 1).
        let udp = unsafe { &mut *udp };
        let old = u16::from_ne_bytes(udp.check);
        // 0 = "no checksum" stays 0; a computed 0 is sent as 0xffff (the same in either byte
        // order; never mistaken for "none" by the next step either).
        if old != 0 {
            let c = !fold64(u64::from(!old) + l4);
            udp.check = if c == 0 { 0xffff_u16 } else { c }.to_ne_bytes();
        }
        udp.src = sport;
        udp.dst = dport;
    }
    Ok(())
}

/// Fold a 64-bit one's complement sum to 16 bits.
#[inline(always)]
fn fold64(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    fold(s as u32)
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

/// Apply an unfolded one's complement difference (the sum of `!old` and `new` words) to `check`.
#[inline(always)]
pub fn apply_delta(check: u16, delta: u32) -> u16 {
    !fold(add16(u32::from(!check), fold(delta)))
}

/// The IPv6 rewrite: addresses and ports from `rw`, hop limit - 1 when `dec_ttl`, the TCP/UDP
/// checksum patched for the pseudo-header addresses and the ports. UDP checksum 0 never gets
/// here (`Reason::DropUdpZeroChecksum`); a computed 0 is sent as 0xffff. The difference is
/// summed in native 32-bit words and folded once, as in [`rewrite`] (old values from `pkt`).
#[inline(always)]
pub fn rewrite6(
    ctx: &XdpContext,
    pkt: &Packet6,
    rw: &Rewrite6,
    dec_ttl: bool,
) -> Result<(), Reason> {
    let ip: *mut [u8; 40] = ptr_at(ctx, IP_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 14 + 40 <= data_end; byte array, no alignment needed.
    let ip = unsafe { &mut *ip };
    let mut delta =
        u64::from(!pkt.sport) + u64::from(!pkt.dport) + u64::from(rw.sport) + u64::from(rw.dport);
    if dec_ttl {
        ip[7] = ip[7].wrapping_sub(1);
    }
    let mut w = 0;
    while w < 4 {
        delta += u64::from(!pkt.src[w])
            + u64::from(!pkt.dst[w])
            + u64::from(rw.src[w])
            + u64::from(rw.dst[w]);
        ip[8 + 4 * w..12 + 4 * w].copy_from_slice(&rw.src[w].to_ne_bytes());
        ip[24 + 4 * w..28 + 4 * w].copy_from_slice(&rw.dst[w].to_ne_bytes());
        w += 1;
    }

    let sport = rw.sport.to_ne_bytes();
    let dport = rw.dport.to_ne_bytes();
    if pkt.proto == IPPROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF6).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 54 + 20 <= data_end; fields used are byte arrays.
        let tcp = unsafe { &mut *tcp };
        let c = !fold64(u64::from(!u16::from_ne_bytes(tcp.check)) + delta);
        tcp.check = c.to_ne_bytes();
        tcp.source = sport;
        tcp.dest = dport;
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, L4_OFF6).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked data + 54 + 8 <= data_end; UdpHdr is all bytes (align 1).
        let udp = unsafe { &mut *udp };
        let c = !fold64(u64::from(!u16::from_ne_bytes(udp.check)) + delta);
        udp.check = if c == 0 { 0xffff_u16 } else { c }.to_ne_bytes();
        udp.src = sport;
        udp.dst = dport;
    }
    Ok(())
}
