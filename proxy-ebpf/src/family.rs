//! The address family as a type: the flow code (`flow`, `forward`, `acl`, the NAT path in
//! `main`) is generic over `Ip`, instantiated once for IPv4 (`u32`: the address as one
//! wire-order word) and once for IPv6 (`[u32; 4]`: four wire-order words). Each instance is
//! compiled on its own, so the IPv4 instance is exactly the IPv4-only code it replaced (every
//! `FAMILY` test below is a constant), and the IPv6 one never carries IPv4's word shortcuts.

use aya_ebpf::{bindings::bpf_fib_lookup, programs::XdpContext};
use proxy_common::{Addr, FAMILY_IPV4, FAMILY_IPV6, NatConfig, Reason, ServiceOptions};

use crate::{
    acl, flow,
    forward::Kind,
    icmp, mss,
    nat::{self, RewriteG},
    parse::{Packet6, PacketG},
};

/// An address family: how its addresses sit in keys, in the FIB lookup and in the packet.
pub trait Ip: Copy + PartialEq {
    /// `FAMILY_IPV4` / `FAMILY_IPV6`, as stored in keys.
    const FAMILY: u8;
    /// Address bits (ACL host prefix).
    const BITS: u32;

    /// The address as the 16-byte key layout's words (IPv4: first word, rest zero).
    fn words(self) -> [u32; 4];
    /// The address from key-layout words.
    fn from_words(w: &[u32; 4]) -> Self;
    /// The address from an `Addr` (as the daemon stores upstreams and SNAT addresses).
    fn from_addr(a: &Addr) -> Self;
    /// The address as an `Addr` (for the flow hash and the ACL/rate keys).
    fn to_addr(self) -> Addr;
    /// The daemon configured a SNAT address for the family (IPv4: always).
    fn has_snat(cfg: &NatConfig) -> bool;
    /// The family's SNAT address.
    fn snat(cfg: &NatConfig) -> Self;
    /// Step 7's client ACL: `acl::check`.
    fn acl_check(service_id: u32, opts: &ServiceOptions, pkt: &PacketG<Self>)
    -> Result<(), Reason>;
    /// Step 7's new-flow rate: `acl::rate`.
    fn rate(
        service_id: u32,
        opts: &ServiceOptions,
        pkt: &PacketG<Self>,
        now: u64,
    ) -> Result<(), Reason>;
    /// Fill the family, source and destination of a FIB lookup.
    fn fib(params: &mut bpf_fib_lookup, src: Self, dst: Self);
    /// Rewrite a packet of `kind` (addresses, ports, checksums, TTL / hop limit).
    fn rewrite(
        ctx: &XdpContext,
        pkt: &PacketG<Self>,
        rw: &RewriteG<Self>,
        kind: Kind,
        dec_ttl: bool,
    ) -> Result<(), Reason>;
    /// Clamp the MSS option of the TCP segment (see `mss`).
    fn mss_clamp(ctx: &XdpContext, max: u16);
    /// `flow::tuple_hash`.
    fn tuple_hash(seed: u32, pkt: &PacketG<Self>) -> u32;
}

/// `AF_INET` / `AF_INET6` for `bpf_fib_lookup`.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

impl Ip for u32 {
    const FAMILY: u8 = FAMILY_IPV4;
    const BITS: u32 = 32;

    #[inline(always)]
    fn words(self) -> [u32; 4] {
        [self, 0, 0, 0]
    }

    #[inline(always)]
    fn from_words(w: &[u32; 4]) -> Self {
        w[0]
    }

    #[inline(always)]
    fn from_addr(a: &Addr) -> Self {
        crate::keys::v4(a)
    }

    #[inline(always)]
    fn to_addr(self) -> Addr {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&self.to_ne_bytes());
        a
    }

    #[inline(always)]
    fn has_snat(_cfg: &NatConfig) -> bool {
        true
    }

    #[inline(always)]
    fn snat(cfg: &NatConfig) -> Self {
        crate::keys::v4(&cfg.snat_v4)
    }

    #[inline(always)]
    fn acl_check(
        service_id: u32,
        opts: &ServiceOptions,
        pkt: &PacketG<Self>,
    ) -> Result<(), Reason> {
        acl::check(service_id, opts, pkt)
    }

    #[inline(always)]
    fn rate(
        service_id: u32,
        opts: &ServiceOptions,
        pkt: &PacketG<Self>,
        now: u64,
    ) -> Result<(), Reason> {
        acl::rate(service_id, opts, pkt, now)
    }

    #[inline(always)]
    fn fib(params: &mut bpf_fib_lookup, src: Self, dst: Self) {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    }

    #[inline(always)]
    fn rewrite(
        ctx: &XdpContext,
        pkt: &PacketG<Self>,
        rw: &RewriteG<Self>,
        kind: Kind,
        dec_ttl: bool,
    ) -> Result<(), Reason> {
        match kind {
            Kind::Flow(_) => nat::rewrite(ctx, pkt, rw, dec_ttl),
            Kind::IcmpError => icmp::rewrite(ctx, pkt, rw, dec_ttl),
        }
    }

    #[inline(always)]
    fn mss_clamp(ctx: &XdpContext, max: u16) {
        mss::clamp(ctx, max);
    }

    #[inline(always)]
    fn tuple_hash(seed: u32, pkt: &PacketG<Self>) -> u32 {
        flow::tuple_hash(seed, pkt)
    }
}

impl Ip for [u32; 4] {
    const FAMILY: u8 = FAMILY_IPV6;
    const BITS: u32 = 128;

    #[inline(always)]
    fn words(self) -> [u32; 4] {
        self
    }

    #[inline(always)]
    fn from_words(w: &[u32; 4]) -> Self {
        *w
    }

    /// Four aligned word loads: every `Addr` this reads (`UpstreamValue::addr`,
    /// `NatConfig::snat_v6`) sits 4-aligned in a map value (asserted below). Byte-wise, the 16
    /// bytes would each take a register (and a spill slot).
    #[inline(always)]
    fn from_addr(a: &Addr) -> Self {
        // SAFETY: `a` is 4-aligned (see above); [u32; 4] has the size of Addr and no invalid
        // bit patterns.
        unsafe { core::ptr::read(a.as_ptr().cast::<[u32; 4]>()) }
    }

    #[inline(always)]
    fn to_addr(self) -> Addr {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&self[0].to_ne_bytes());
        a[4..8].copy_from_slice(&self[1].to_ne_bytes());
        a[8..12].copy_from_slice(&self[2].to_ne_bytes());
        a[12..].copy_from_slice(&self[3].to_ne_bytes());
        a
    }

    #[inline(always)]
    fn has_snat(cfg: &NatConfig) -> bool {
        cfg.snat_v6 != [0; 16]
    }

    #[inline(always)]
    fn snat(cfg: &NatConfig) -> Self {
        Self::from_addr(&cfg.snat_v6)
    }

    /// BPF functions of their own (the IPv6 new-flow path's stack budget).
    #[inline(always)]
    fn acl_check(
        service_id: u32,
        opts: &ServiceOptions,
        pkt: &PacketG<Self>,
    ) -> Result<(), Reason> {
        match acl_check6(service_id, opts, pkt) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    #[inline(always)]
    fn rate(
        service_id: u32,
        opts: &ServiceOptions,
        pkt: &PacketG<Self>,
        now: u64,
    ) -> Result<(), Reason> {
        match rate6(service_id, opts, pkt, now) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    #[inline(always)]
    fn fib(params: &mut bpf_fib_lookup, src: Self, dst: Self) {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = src;
        params.__bindgen_anon_4.ipv6_dst = dst;
    }

    #[inline(always)]
    fn rewrite(
        ctx: &XdpContext,
        pkt: &PacketG<Self>,
        rw: &RewriteG<Self>,
        kind: Kind,
        dec_ttl: bool,
    ) -> Result<(), Reason> {
        match kind {
            Kind::Flow(_) => nat::rewrite6(ctx, pkt, rw, dec_ttl),
            Kind::IcmpError => icmp::rewrite6(ctx, pkt, rw, dec_ttl),
        }
    }

    #[inline(always)]
    fn mss_clamp(ctx: &XdpContext, max: u16) {
        mss::clamp6(ctx, max);
    }

    /// A BPF function of its own: the hash reads the 32 address bytes one by one, which inline
    /// would keep dozens of values live in the caller's frame.
    #[inline(always)]
    fn tuple_hash(seed: u32, pkt: &PacketG<Self>) -> u32 {
        tuple_hash6(seed, pkt)
    }
}

/// `flow::tuple_hash` for IPv6.
#[inline(never)]
fn tuple_hash6(seed: u32, pkt: &Packet6) -> u32 {
    flow::tuple_hash(seed, pkt)
}

/// `acl::check` for IPv6.
#[inline(never)]
fn acl_check6(service_id: u32, opts: &ServiceOptions, pkt: &Packet6) -> Option<Reason> {
    acl::check(service_id, opts, pkt).err()
}

/// `acl::rate` for IPv6.
#[inline(never)]
fn rate6(service_id: u32, opts: &ServiceOptions, pkt: &Packet6, now: u64) -> Option<Reason> {
    acl::rate(service_id, opts, pkt, now).err()
}

// `<[u32; 4]>::from_addr` reads these `Addr`s as aligned words.
const _: () = {
    use core::mem::{align_of, offset_of};
    use proxy_common::UpstreamValue;
    assert!(align_of::<UpstreamValue>() >= 4 && offset_of!(UpstreamValue, addr) % 4 == 0);
    assert!(align_of::<NatConfig>() >= 4 && offset_of!(NatConfig, snat_v6) % 4 == 0);
};
