//! Step 9: TTL (hop limit) check, FIB lookup (AF_INET or AF_INET6), rewrite, then XDP_TX, XDP_REDIRECT through `XP_DEVMAP`, or a
//! pass to the kernel (already rewritten) when the next hop is not ready.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup_helper,
    programs::XdpContext,
};
use proxy_common::{FLOW_DIR_FORWARD, Reason};

use crate::{
    family::Ip,
    maps::XP_DEVMAP,
    nat::RewriteG,
    parse::{PacketG, ptr_at},
};

/// What is being forwarded: a packet of a flow (its entry's `FLOW_DIR_*`), or an ICMP error
/// translated with the entry its quote answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Flow(u8),
    IcmpError,
}

/// Forward (or pass) a packet of family `A` whose flow entry matched. `kind` picks the rewrite
/// and the `Fwd*`/`Rev*`/`Icmp*` reasons. `pkt.ttl` is the IPv6 hop limit for IPv6.
#[inline(always)]
pub fn forward<A: Ip>(
    ctx: &XdpContext,
    pkt: &PacketG<A>,
    rw: &RewriteG<A>,
    kind: Kind,
) -> Result<Reason, Reason> {
    if pkt.ttl <= 1 {
        return Err(Reason::DropTtlExceeded);
    }
    if let Kind::Flow(_) = kind
        && rw.mss != 0
    {
        A::mss_clamp(ctx, rw.mss);
    }
    let ingress = ctx.ingress_ifindex() as u32;

    // SAFETY: bpf_fib_lookup is a plain C struct of integers; all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    A::fib(&mut params, rw.src, rw.dst);
    params.l4_protocol = pkt.proto;
    if let Kind::Flow(_) = kind {
        params.sport = rw.sport;
        params.dport = rw.dport;
    }
    params.__bindgen_anon_1.tot_len = pkt.tot_len;
    params.ifindex = ingress;
    // SAFETY: ctx is the program's context; params is a stack struct of the size passed.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.as_ptr(),
            &raw mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };

    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        // Not forwardable from here: hand the rewritten packet to the kernel (TTL untouched:
        // the kernel decrements it when it forwards).
        A::rewrite(ctx, pkt, rw, kind, false)?;
        return Ok(if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
            Reason::PassNoNeigh
        } else {
            Reason::PassFibFailed
        });
    }

    A::rewrite(ctx, pkt, rw, kind, true)?;
    let eth: *mut [u8; 12] = ptr_at(ctx, 0).ok_or(Reason::DropTruncated)?;
    // SAFETY: ptr_at checked data + 12 <= data_end; byte array, no alignment needed.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(&params.dmac);
    eth[6..].copy_from_slice(&params.smac);

    let (tx, redirect) = match kind {
        Kind::Flow(FLOW_DIR_FORWARD) => (Reason::FwdTx, Reason::FwdRedirect),
        Kind::Flow(_) => (Reason::RevTx, Reason::RevRedirect),
        Kind::IcmpError => (Reason::IcmpTx, Reason::IcmpRedirect),
    };
    if params.ifindex == ingress {
        return Ok(tx);
    }
    match XP_DEVMAP.redirect(params.ifindex, 0) {
        Ok(_) => Ok(redirect),
        Err(_) => Err(Reason::DropRedirectFailed),
    }
}
