//! Frames the kernel failed to transmit after the XDP program sent them, counted per egress
//! interface (`XP_XMIT_DROPS`). The program counts a forward when the devmap redirect or
//! `XDP_TX` is accepted; the frames are transmitted later, when the driver flushes its bulk
//! queue, and what fails there (a veth peer without NAPI, a driver without `ndo_xdp_xmit`, a
//! full ring) is seen by no counter of the program's and, on veth, by no device counter either:
//! only the kernel's `xdp` tracepoints report it. Two tracepoint programs read them:
//!
//! - `xdp:xdp_devmap_xmit` (a devmap flush: `XDP_REDIRECT`), counted under its `to_ifindex`
//!   when that interface is in `XP_DEVMAP` (redirects of other programs on the host are left
//!   alone);
//! - `xdp:xdp_bulk_tx` (a veth's `XDP_TX` flush), counted under its `ifindex`, likewise.
//!
//! The field offsets are the tracepoints' record layouts (`events/xdp/*/format` in tracefs;
//! stable since Linux 5.8, checked by the daemon's test against this kernel).

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::maps::{XP_DEVMAP, XP_XMIT_DROPS};

/// `xdp_devmap_xmit`: `int to_ifindex` at 16, `int drops` at 20.
const DEVMAP_XMIT_TO_IFINDEX: usize = 16;
const DEVMAP_XMIT_DROPS: usize = 20;
/// `xdp_bulk_tx`: `int ifindex` at 8, `int drops` at 16.
const BULK_TX_IFINDEX: usize = 8;
const BULK_TX_DROPS: usize = 16;

#[tracepoint]
pub fn xp_devmap_xmit(ctx: TracePointContext) -> u32 {
    count(&ctx, DEVMAP_XMIT_TO_IFINDEX, DEVMAP_XMIT_DROPS);
    0
}

#[tracepoint]
pub fn xp_bulk_tx(ctx: TracePointContext) -> u32 {
    count(&ctx, BULK_TX_IFINDEX, BULK_TX_DROPS);
    0
}

#[inline(always)]
fn count(ctx: &TracePointContext, ifindex_at: usize, drops_at: usize) {
    // SAFETY: read_at copies with bpf_probe_read_kernel from the tracepoint's record; the
    // offsets are inside the record (see the module comment); a failed read returns Err.
    let (Ok(ifindex), Ok(drops)) = (unsafe { ctx.read_at::<i32>(ifindex_at) }, unsafe {
        ctx.read_at::<i32>(drops_at)
    }) else {
        return;
    };
    if drops <= 0 || ifindex <= 0 {
        return;
    }
    let ifindex = ifindex as u32;
    if XP_DEVMAP.get_ifindex(ifindex).is_none() {
        return;
    }
    if XP_XMIT_DROPS.get_ptr_mut(ifindex).is_none() {
        // BPF_NOEXIST: another CPU may have created it meanwhile; either way it exists next.
        let _ = XP_XMIT_DROPS.insert(ifindex, 0, 1);
    }
    if let Some(v) = XP_XMIT_DROPS.get_ptr_mut(ifindex) {
        // SAFETY: a per-CPU value pointer of this CPU from a successful lookup.
        unsafe { *v += drops as u64 };
    }
}
