//! ICMP errors that quote a NATed packet (docs/datapath.md, "ICMP errors"): destination
//! unreachable (including fragmentation needed) and time exceeded. The error is translated like
//! a packet of the flow direction the quote answers: the outer header gets that flow entry's
//! new addresses, the quoted header the inverse, and every checksum is patched incrementally.

use aya_ebpf::{helpers::generated::bpf_csum_diff, programs::XdpContext};
use proxy_common::{
    IPPROTO_TCP, IPPROTO_UDP, Reason,
    checksum::{add16, fold, udp_update32, update16, update32},
};

use crate::{
    keys::FlowKeyW,
    nat::{Rewrite, Rewrite6, apply_delta, rewrite_ip},
    parse::{IP_OFF, L4_OFF, L4_OFF6, Packet, Packet6, ptr_at},
};

/// ICMP types translated; every other type is passed (`PassNotTcpUdp`).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// What the program reads of an error, from the ICMP header on: ICMP header (8), quoted IPv4
/// header (20, no options), the first 8 bytes of the quoted TCP/UDP header.
const QUOTE_LEN: usize = 8 + 20 + 8;
/// Offsets inside those bytes.
const Q_IP: usize = 8;
const Q_L4: usize = Q_IP + 20;
/// Offset of the quoted TCP checksum from the start of the ICMP header, and the IP total length
/// from which the quote contains it (outer IP header + ICMP + inner IP + TCP up to the checksum).
const Q_TCP_CHECK: usize = Q_L4 + 16;
const TCP_CHECK_MIN_TOT_LEN: u16 = (20 + Q_TCP_CHECK + 2) as u16;
/// Offset of the quoted UDP checksum (always inside the 8 quoted bytes).
const Q_UDP_CHECK: usize = Q_L4 + 6;

/// The quoted packet's 5-tuple, wire byte order (`from_ne_bytes` integers like `Packet`).
#[derive(Clone, Copy)]
pub struct Quote {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Quote {
    /// The key of the flow entry the quoted packet answers: the quote reversed. The quote is a
    /// packet the proxy sent (SNAT -> upstream, or service -> client); the entry matching its
    /// reverse (upstream -> SNAT, or client -> service) says how to translate.
    #[inline(always)]
    pub fn answer_key(&self) -> FlowKeyW {
        FlowKeyW::v4(self.dst, self.src, self.dport, self.sport, self.proto)
    }
}

/// Classify an ICMP packet: `Ok` for an error whose quote is a TCP/UDP packet sent by the address
/// the error is addressed to; otherwise the packet's final reason.
#[inline(always)]
pub fn quote(ctx: &XdpContext, pkt: &Packet) -> Result<Quote, Reason> {
    if (pkt.tot_len as usize) < 20 + QUOTE_LEN {
        return Err(Reason::PassNotTcpUdp);
    }
    let b: *const [u8; QUOTE_LEN] = ptr_at(ctx, L4_OFF).ok_or(Reason::PassNotTcpUdp)?;
    // SAFETY: ptr_at checked data + 34 + 36 <= data_end; byte array, no alignment needed.
    let b = unsafe { &*b };
    if b[0] != ICMP_DEST_UNREACH && b[0] != ICMP_TIME_EXCEEDED {
        return Err(Reason::PassNotTcpUdp);
    }
    // Quoted IPv4 header: version 4, no options, not a later fragment (no ports in it).
    let frag = u16::from_be_bytes([b[Q_IP + 6], b[Q_IP + 7]]) & 0x1fff;
    let proto = b[Q_IP + 9];
    if b[Q_IP] != 0x45 || frag != 0 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return Err(Reason::PassNotTcpUdp);
    }
    let q = Quote {
        src: u32::from_ne_bytes([b[Q_IP + 12], b[Q_IP + 13], b[Q_IP + 14], b[Q_IP + 15]]),
        dst: u32::from_ne_bytes([b[Q_IP + 16], b[Q_IP + 17], b[Q_IP + 18], b[Q_IP + 19]]),
        sport: u16::from_ne_bytes([b[Q_L4], b[Q_L4 + 1]]),
        dport: u16::from_ne_bytes([b[Q_L4 + 2], b[Q_L4 + 3]]),
        proto,
    };
    // An error goes to the source of the packet it quotes; anything else is not about a packet
    // the proxy sent.
    if q.src != pkt.dst {
        return Err(Reason::PassNotService);
    }
    Ok(q)
}

/// Rewrite an ICMP error with the answering flow entry's `rw`: outer addresses -> (rw.src,
/// rw.dst) (TTL - 1 when `dec_ttl`); quoted addresses -> (rw.dst, rw.src) and ports ->
/// (rw.dport, rw.sport). Patches the outer IP checksum, the quoted IP checksum, the quoted
/// TCP/UDP checksum when the quote contains it (as Linux does: updated for the changed
/// addresses and ports even when the quoted segment is truncated), and the ICMP checksum for
/// every 16-bit word that changed inside the ICMP message.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, rw: &Rewrite, dec_ttl: bool) -> Result<(), Reason> {
    rewrite_ip(ctx, rw, dec_ttl)?;

    let b: *mut [u8; QUOTE_LEN] = ptr_at(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 34 + 36 <= data_end; byte array, no alignment needed.
    let b = unsafe { &mut *b };
    let old_src = [b[Q_IP + 12], b[Q_IP + 13], b[Q_IP + 14], b[Q_IP + 15]];
    let old_dst = [b[Q_IP + 16], b[Q_IP + 17], b[Q_IP + 18], b[Q_IP + 19]];
    let old_ports = [b[Q_L4], b[Q_L4 + 1], b[Q_L4 + 2], b[Q_L4 + 3]];
    let new_src = rw.dst.to_ne_bytes();
    let new_dst = rw.src.to_ne_bytes();
    let sport = rw.dport.to_ne_bytes();
    let dport = rw.sport.to_ne_bytes();
    let new_ports = [sport[0], sport[1], dport[0], dport[1]];

    // Quoted IPv4 header checksum: the two addresses.
    let old_ip_check = u16::from_be_bytes([b[Q_IP + 10], b[Q_IP + 11]]);
    let mut ip_check = update32(old_ip_check, old_src, new_src);
    ip_check = update32(ip_check, old_dst, new_dst);

    // ICMP checksum: every changed word of the message (all at even offsets from its start).
    let mut icmp = u16::from_be_bytes([b[2], b[3]]);
    icmp = update32(icmp, old_src, new_src);
    icmp = update32(icmp, old_dst, new_dst);
    icmp = update16(icmp, old_ip_check, ip_check);
    icmp = update32(icmp, old_ports, new_ports);

    b[Q_IP + 10..Q_IP + 12].copy_from_slice(&ip_check.to_be_bytes());
    b[Q_IP + 12..Q_IP + 16].copy_from_slice(&new_src);
    b[Q_IP + 16..Q_IP + 20].copy_from_slice(&new_dst);
    b[Q_L4..Q_L4 + 4].copy_from_slice(&new_ports);

    if b[Q_IP + 9] == IPPROTO_UDP {
        let old = u16::from_be_bytes([b[Q_UDP_CHECK], b[Q_UDP_CHECK + 1]]);
        let mut c = udp_update32(old, old_src, new_src);
        c = udp_update32(c, old_dst, new_dst);
        c = udp_update32(c, old_ports, new_ports);
        icmp = update16(icmp, old, c);
        b[Q_UDP_CHECK..Q_UDP_CHECK + 2].copy_from_slice(&c.to_be_bytes());
    }
    b[2..4].copy_from_slice(&icmp.to_be_bytes());

    if b[Q_IP + 9] == IPPROTO_TCP && pkt.tot_len >= TCP_CHECK_MIN_TOT_LEN {
        let t: *mut [u8; 2] = ptr_at(ctx, L4_OFF + Q_TCP_CHECK).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked the two bytes lie within the frame; byte array.
        let t = unsafe { &mut *t };
        let old = u16::from_be_bytes(*t);
        let mut c = update32(old, old_src, new_src);
        c = update32(c, old_dst, new_dst);
        c = update32(c, old_ports, new_ports);
        *t = c.to_be_bytes();
        let h: *mut [u8; QUOTE_LEN] = ptr_at(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: as for `b` above (re-derived: the packet pointer was used since).
        let h = unsafe { &mut *h };
        let icmp = update16(u16::from_be_bytes([h[2], h[3]]), old, c);
        h[2..4].copy_from_slice(&icmp.to_be_bytes());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ICMPv6 (docs/datapath.md, "IPv6", "ICMPv6 errors").
// ---------------------------------------------------------------------------------------------

/// ICMPv6 types translated; every other type (echo 128/129, NDP 133-137, parameter problem,
/// ...) is passed (`PassNotTcpUdp`), untouched.
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;

/// What the program reads of an ICMPv6 error, from its header on: ICMPv6 header (8), quoted
/// IPv6 header (40), the first 8 bytes of the quoted TCP/UDP header.
const QUOTE6_LEN: usize = 8 + 40 + 8;
const Q6_IP: usize = 8;
const Q6_L4: usize = Q6_IP + 40;
const Q6_UDP_CHECK: usize = Q6_L4 + 6;
/// Offset of the quoted TCP checksum, and the ICMPv6 message length from which the quote
/// contains it.
const Q6_TCP_CHECK: usize = Q6_L4 + 16;
const TCP_CHECK_MIN_MSG6: u16 = (Q6_TCP_CHECK + 2) as u16;

/// The quoted IPv6 packet's 5-tuple, wire byte order.
#[derive(Clone, Copy)]
pub struct Quote6 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Quote6 {
    /// The key of the flow entry the quoted packet answers: the quote reversed (as `Quote`).
    #[inline(always)]
    pub fn answer_key(&self) -> FlowKeyW {
        FlowKeyW::new(self.dst, self.src, self.dport, self.sport, self.proto)
    }
}

/// The 16 bytes at `b[i..i + 16]` as four wire-order words, through a stack copy (read
/// straight into words, LLVM keeps each byte in a register of its own: see `parse::parse6`).
#[inline(always)]
fn words16(b: &[u8], i: usize) -> [u32; 4] {
    let mut a = [0u32; 4];
    // SAFETY: [u32; 4] and [u8; 16] have the same size; u8 has no alignment requirement.
    unsafe { &mut *a.as_mut_ptr().cast::<[u8; 16]>() }.copy_from_slice(&b[i..i + 16]);
    // SAFETY: reads of an initialised local; volatile so the copy above really is a copy.
    let w = |j: usize| unsafe { core::ptr::read_volatile(&raw const a[j]) };
    [w(0), w(1), w(2), w(3)]
}

/// Classify an ICMPv6 packet (`pkt.tot_len` = 40 + payload length, within the frame): `Ok` for
/// a destination unreachable, packet too big or time exceeded whose quote is a TCP/UDP packet
/// (no extension header) sent by the address the error is addressed to; otherwise the packet's
/// final reason.
#[inline(always)]
pub fn quote6(ctx: &XdpContext, pkt: &Packet6) -> Result<Quote6, Reason> {
    if (pkt.tot_len as usize) < 40 + QUOTE6_LEN {
        return Err(Reason::PassNotTcpUdp);
    }
    let b: *const [u8; QUOTE6_LEN] = ptr_at(ctx, L4_OFF6).ok_or(Reason::PassNotTcpUdp)?;
    // SAFETY: ptr_at checked data + 54 + 56 <= data_end; byte array, no alignment needed.
    let b = unsafe { &*b };
    if b[0] != ICMP6_DEST_UNREACH && b[0] != ICMP6_PACKET_TOO_BIG && b[0] != ICMP6_TIME_EXCEEDED {
        return Err(Reason::PassNotTcpUdp);
    }
    let proto = b[Q6_IP + 6];
    if b[Q6_IP] >> 4 != 6 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return Err(Reason::PassNotTcpUdp);
    }
    let q = Quote6 {
        src: words16(b, Q6_IP + 8),
        dst: words16(b, Q6_IP + 24),
        sport: u16::from_ne_bytes([b[Q6_L4], b[Q6_L4 + 1]]),
        dport: u16::from_ne_bytes([b[Q6_L4 + 2], b[Q6_L4 + 3]]),
        proto,
    };
    let ip: *const [u8; 40] = ptr_at(ctx, IP_OFF).ok_or(Reason::PassNotTcpUdp)?;
    // SAFETY: ptr_at checked data + 14 + 40 <= data_end; byte array.
    let outer_dst = words16(unsafe { &*ip }, 24);
    if q.src != outer_dst {
        return Err(Reason::PassNotService);
    }
    Ok(q)
}

/// `bpf_csum_diff` of 32 bytes: the one's complement sum of the big-endian 16-bit words of
/// `!old` and `new` (folded to 16 bits).
/// `old` may point into the packet (bounds already checked by the caller), `new` is a stack
/// buffer. The helper sums little-endian words; a one's complement sum of byte-swapped words
/// is the byte-swapped sum, so the result is swapped back.
#[inline(always)]
fn csum_diff32(old: *const [u8; 32], new: &mut [u32; 8]) -> u32 {
    // SAFETY: both buffers are 32 readable bytes (the helper only reads them); the verifier
    // checks the packet range of `old`.
    let d = unsafe { bpf_csum_diff(old.cast_mut().cast::<u32>(), 32, new.as_mut_ptr(), 32, 0) };
    // The helper returns a 32-bit sum; fold it to 16 bits, then swap to network order.
    u32::from(fold(d as u32).swap_bytes())
}

/// Rewrite an ICMPv6 error with the answering flow entry's `rw`, as `rewrite` does for ICMP:
/// outer addresses -> (rw.src, rw.dst) (hop limit - 1 when `dec_ttl`); quoted addresses ->
/// (rw.dst, rw.src), ports -> (rw.dport, rw.sport); the quoted UDP checksum, the quoted TCP
/// checksum when the quote contains it, and the ICMPv6 checksum (which also covers the outer
/// addresses through the IPv6 pseudo-header) patched incrementally. The address sums use
/// `bpf_csum_diff` (32 bytes each) to keep this within the BPF stack.
#[inline(always)]
pub fn rewrite6(
    ctx: &XdpContext,
    pkt: &Packet6,
    rw: &Rewrite6,
    dec_ttl: bool,
) -> Result<(), Reason> {
    // Outer header: the new (src, dst) and their pseudo-header difference.
    let mut new = [
        rw.src[0], rw.src[1], rw.src[2], rw.src[3], rw.dst[0], rw.dst[1], rw.dst[2], rw.dst[3],
    ];
    let ip: *mut [u8; 40] = ptr_at(ctx, IP_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 14 + 40 <= data_end; byte array.
    let ip = unsafe { &mut *ip };
    let old: *const [u8; 32] = (&raw const ip[8]).cast();
    let mut icmp_delta = csum_diff32(old, &mut new);
    if dec_ttl {
        ip[7] = ip[7].wrapping_sub(1);
    }
    // SAFETY: [u32; 8] is 32 plain bytes.
    ip[8..40].copy_from_slice(unsafe { &*new.as_ptr().cast::<[u8; 32]>() });

    // The quoted packet went (new_dst -> new_src) of the entry; the quote's ports likewise.
    let mut new = [
        rw.dst[0], rw.dst[1], rw.dst[2], rw.dst[3], rw.src[0], rw.src[1], rw.src[2], rw.src[3],
    ];
    let b: *mut [u8; QUOTE6_LEN] = ptr_at(ctx, L4_OFF6).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 54 + 56 <= data_end; byte array.
    let b = unsafe { &mut *b };
    let old: *const [u8; 32] = (&raw const b[Q6_IP + 8]).cast();
    let mut quote_delta = csum_diff32(old, &mut new);
    let sport = rw.dport.to_ne_bytes();
    let dport = rw.sport.to_ne_bytes();
    quote_delta = add16(quote_delta, !u16::from_be_bytes([b[Q6_L4], b[Q6_L4 + 1]]));
    quote_delta = add16(
        quote_delta,
        !u16::from_be_bytes([b[Q6_L4 + 2], b[Q6_L4 + 3]]),
    );
    quote_delta = add16(quote_delta, u16::from_be_bytes(sport));
    quote_delta = add16(quote_delta, u16::from_be_bytes(dport));
    // Everything in `quote_delta` is also inside the ICMPv6 message.
    icmp_delta = add16(icmp_delta, fold(quote_delta));
    // SAFETY: as above.
    b[Q6_IP + 8..Q6_IP + 40].copy_from_slice(unsafe { &*new.as_ptr().cast::<[u8; 32]>() });
    b[Q6_L4..Q6_L4 + 2].copy_from_slice(&sport);
    b[Q6_L4 + 2..Q6_L4 + 4].copy_from_slice(&dport);

    if b[Q6_IP + 6] == IPPROTO_UDP {
        let old = u16::from_be_bytes([b[Q6_UDP_CHECK], b[Q6_UDP_CHECK + 1]]);
        // 0 stays 0 (never sent by the proxy in IPv6; carried as it is).
        if old != 0 {
            let c = apply_delta(old, quote_delta);
            let c = if c == 0 { 0xffff } else { c };
            icmp_delta = add16(icmp_delta, !old);
            icmp_delta = add16(icmp_delta, c);
            b[Q6_UDP_CHECK..Q6_UDP_CHECK + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    let msg_len = pkt.tot_len - 40;
    if b[Q6_IP + 6] == IPPROTO_TCP && msg_len >= TCP_CHECK_MIN_MSG6 {
        let t: *mut [u8; 2] = ptr_at(ctx, L4_OFF6 + Q6_TCP_CHECK).ok_or(Reason::DropTruncated)?;
        // SAFETY: ptr_at checked the two bytes lie within the frame; byte array.
        let t = unsafe { &mut *t };
        let old = u16::from_be_bytes(*t);
        let c = apply_delta(old, quote_delta);
        icmp_delta = add16(icmp_delta, !old);
        icmp_delta = add16(icmp_delta, c);
        *t = c.to_be_bytes();
    }
    let h: *mut [u8; 4] = ptr_at(ctx, L4_OFF6).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked the 4 bytes lie within the frame (re-derived: the packet pointer
    // was used since).
    let h = unsafe { &mut *h };
    let c = apply_delta(u16::from_be_bytes([h[2], h[3]]), icmp_delta);
    h[2..4].copy_from_slice(&c.to_be_bytes());
    Ok(())
}
