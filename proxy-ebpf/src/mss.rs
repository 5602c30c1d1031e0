//! TCP MSS clamping (docs/datapath.md step 9): a SYN or SYN-ACK of a service with `mss_clamp`
//! set has its MSS option lowered to the clamp, the TCP checksum patched for the change.

use core::ffi::c_void;

use aya_ebpf::{bindings::xdp_md, helpers::generated::bpf_loop, programs::XdpContext};
use proxy_common::checksum::update16;

use crate::parse::{L4_OFF, L4_OFF6, ptr_at};

/// Most option bytes a TCP header can carry (data offset 15).
const MAX_OPTIONS: usize = 40;
const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_MSS_LEN: u8 = 4;

/// The state of one option walk, on the caller's stack, shared with `walk_byte`.
#[repr(C)]
struct Walk {
    md: *mut xdp_md,
    /// Option bytes in the header: `(data offset - 5) * 4`, at most 40.
    opt_len: u64,
    /// Offset of the next option to read.
    next: u64,
    max: u64,
}

/// Lower the segment's MSS option to `max` if it is larger. Walks the options within the data
/// offset (at most 40 bytes): EOL ends the walk, NOP is one byte, every other option is kind +
/// length (length < 2, or an option running past the options, ends the walk without a change:
/// malformed options are carried as they are). Only the first MSS option counts.
///
/// The walk is one `bpf_loop` of 40 iterations, one per option byte: the verifier checks the
/// callback once, not every unrolled path of an inline loop (which costs several hundred
/// thousand instructions of verification at every call site).
#[inline(always)]
pub fn clamp(ctx: &XdpContext, max: u16) {
    // A global BPF function: the verifier checks its pointer argument itself.
    proxy_mss_clamp(ctx.ctx, u32::from(max));
}

/// `clamp` for an IPv6 segment (TCP header after the 40-byte IPv6 header).
#[inline(always)]
pub fn clamp6(ctx: &XdpContext, max: u16) {
    proxy_mss_clamp6(ctx.ctx, u32::from(max));
}

/// `clamp` as a global BPF function (BTF linkage global): the verifier checks it once, on its
/// own, instead of once for every state the program reaches the call in.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn proxy_mss_clamp(md: *mut xdp_md, max: u32) -> i32 {
    let ctx = XdpContext::new(md);
    clamp_inner::<L4_OFF>(&ctx, (max & 0xffff) as u16);
    0
}

/// `proxy_mss_clamp` for IPv6 (a function of its own: the TCP offset stays a constant).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn proxy_mss_clamp6(md: *mut xdp_md, max: u32) -> i32 {
    let ctx = XdpContext::new(md);
    clamp_inner::<L4_OFF6>(&ctx, (max & 0xffff) as u16);
    0
}

/// The walk itself (see `clamp`), for a TCP header at packet offset `L4`.
#[inline(always)]
fn clamp_inner<const L4: usize>(ctx: &XdpContext, max: u16) {
    let Some(tcp) = ptr_at::<[u8; 20]>(ctx, L4) else {
        return;
    };
    // SAFETY: ptr_at checked the 20 bytes lie within the frame; byte array.
    let doff = unsafe { (*tcp)[12] } >> 4;
    // parse() guaranteed 5 <= doff and the header within the frame.
    let mut walk = Walk {
        md: ctx.ctx,
        opt_len: u64::from(doff.saturating_sub(5)) * 4,
        next: 0,
        max: u64::from(max),
    };
    // SAFETY: the callback has the signature bpf_loop expects and only uses `walk`, which
    // outlives the call.
    unsafe {
        bpf_loop(
            MAX_OPTIONS as u32,
            walk_byte::<L4> as *mut c_void,
            (&raw mut walk).cast(),
            0,
        );
    }
}

/// `bpf_loop` callback: option byte `index` of the options of a TCP header at packet offset
/// `L4`. Returns 1 to stop the walk, 0 to go on.
#[inline(never)]
extern "C" fn walk_byte<const L4: usize>(index: u64, walk: *mut c_void) -> i64 {
    // Offset of the options from the start of the packet.
    let opt_off = L4 + 20;
    // SAFETY: bpf_loop passes the `Walk` clamp() gave it.
    let walk = unsafe { &mut *walk.cast::<Walk>() };
    let j = (index & 0x3f) as usize;
    if j as u64 >= walk.opt_len || j >= MAX_OPTIONS {
        return 1;
    }
    if j as u64 != walk.next {
        return 0;
    }
    let ctx = XdpContext::new(walk.md);
    let opt_len = walk.opt_len as usize;
    let Some(kind) = ptr_at::<u8>(&ctx, opt_off + j) else {
        return 1;
    };
    // SAFETY: ptr_at checked the byte lies within the frame.
    let kind = unsafe { *kind };
    if kind == OPT_EOL {
        return 1;
    }
    if kind == OPT_NOP {
        walk.next = j as u64 + 1;
        return 0;
    }
    let Some(len) = ptr_at::<u8>(&ctx, opt_off + j + 1) else {
        return 1;
    };
    // SAFETY: as above.
    let len = usize::from(unsafe { *len });
    if len < 2 || j + len > opt_len {
        return 1;
    }
    if kind == OPT_MSS {
        if len == usize::from(OPT_MSS_LEN) {
            lower::<L4>(&ctx, j, walk.max as u16);
        }
        return 1;
    }
    walk.next = (j + len) as u64;
    0
}

/// Lower the MSS option at option offset `i` to `max`, patching the TCP checksum.
#[inline(always)]
fn lower<const L4: usize>(ctx: &XdpContext, i: usize, max: u16) {
    let Some(opt) = ptr_at::<[u8; 4]>(ctx, L4 + 20 + i) else {
        return;
    };
    // SAFETY: ptr_at checked the 4 bytes lie within the frame; byte array.
    let opt = unsafe { &mut *opt };
    let old = u16::from_be_bytes([opt[2], opt[3]]);
    if old <= max {
        return;
    }
    opt[2..4].copy_from_slice(&max.to_be_bytes());
    // The value sits at TCP header offset 20 + i + 2: on a 16-bit word boundary when i is even.
    // At an odd offset its bytes straddle two words, and its contribution to the one's
    // complement sum is the byte-swapped value (256 * 256 = 1 mod 0xffff).
    let (o, n) = if i % 2 == 0 {
        (old, max)
    } else {
        (old.swap_bytes(), max.swap_bytes())
    };
    let Some(check) = ptr_at::<[u8; 2]>(ctx, L4 + 16) else {
        return;
    };
    // SAFETY: ptr_at checked the 2 bytes lie within the frame; byte array.
    let check = unsafe { &mut *check };
    *check = update16(u16::from_be_bytes(*check), o, n).to_be_bytes();
}
