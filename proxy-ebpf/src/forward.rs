//! Step 9: TTL check, FIB lookup, rewrite, then XDP_TX, XDP_REDIRECT through `XP_DEVMAP`, or a
//! pass to the kernel (already rewritten) when the next hop is not ready.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup_helper,
    programs::XdpContext,
};
use proxy_common::{FLOW_DIR_FORWARD, Reason};

use crate::{
    icmp,
    maps::XP_DEVMAP,
    mss,
    nat::{self, Rewrite},
    parse::{Packet, ptr_at},
};

/// What is being forwarded: a packet of a flow (its entry's `FLOW_DIR_*`), or an ICMP error
/// translated with the entry its quote answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Flow(u8),
    IcmpError,
}

/// The rewrite of `kind`.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    rw: &Rewrite,
    kind: Kind,
    dec_ttl: bool,
) -> Result<(), Reason> {
    match kind {
        Kind::Flow(_) => nat::rewrite(ctx, pkt, rw, dec_ttl),
        Kind::IcmpError => icmp::rewrite(ctx, pkt, rw, dec_ttl),
    }
}

/// `AF_INET` for `bpf_fib_lookup`.
const AF_INET: u8 = 2;

/// Forward (or pass) a packet whose flow entry matched. `kind` picks the rewrite and the
/// `Fwd*`/`Rev*`/`Icmp*` reasons.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, rw: &Rewrite, kind: Kind) -> Result<Reason, Reason> {
    if pkt.ttl <= 1 {
        return Err(Reason::DropTtlExceeded);
    }
    if let Kind::Flow(_) = kind
        && rw.mss != 0
    {
        mss::clamp(ctx, rw.mss);
    }
    let ingress = ctx.ingress_ifindex() as u32;

    // SAFETY: bpf_fib_lookup is a plain C struct of integers; all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = pkt.proto;
    if let Kind::Flow(_) = kind {
        params.sport = rw.sport;
        params.dport = rw.dport;
    }
    params.__bindgen_anon_1.tot_len = pkt.tot_len;
    params.ifindex = ingress;
    params.__bindgen_anon_3.ipv4_src = rw.src;
    params.__bindgen_anon_4.ipv4_dst = rw.dst;
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
        rewrite(ctx, pkt, rw, kind, false)?;
        return Ok(if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
            Reason::PassNoNeigh
        } else {
            Reason::PassFibFailed
        });
    }

    rewrite(ctx, pkt, rw, kind, true)?;
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
