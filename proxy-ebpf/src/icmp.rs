//! ICMP errors that quote a NATed packet (docs/datapath.md, "ICMP errors"): destination
//! unreachable (including fragmentation needed) and time exceeded. The error is translated like
//! a packet of the flow direction the quote answers: the outer header gets that flow entry's
//! new addresses, the quoted header the inverse, and every checksum is patched incrementally.

use aya_ebpf::programs::XdpContext;
use proxy_common::{
    IPPROTO_TCP, IPPROTO_UDP, Reason,
    checksum::{udp_update32, update16, update32},
};

use crate::{
    keys::FlowKeyW,
    nat::{Rewrite, rewrite_ip},
    parse::{L4_OFF, Packet, ptr_at},
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
