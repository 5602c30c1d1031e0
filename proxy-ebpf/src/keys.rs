//! Word views of the `proxy-common` key and value types.
//!
//! `FlowKey`, `ServiceKey` and `FlowValue` hold addresses and ports as byte arrays. Built or
//! copied field by field, LLVM keeps every byte of every address in its own register or spill
//! slot and writes them one by one, which overflows the 512-byte BPF stack. The views below have
//! exactly the same layout (asserted field by field) with addresses as `u32` words, so the
//! program moves each IPv4 address as one word (and an IPv6 address as four). Addresses and ports are in wire byte order,
//! held as the integers `from_ne_bytes` reads from the packet.

use core::mem::{align_of, offset_of, size_of};

use proxy_common::{Addr, FlowKey, FlowValue, ServiceKey, addr_v4_octets};

use crate::family::Ip;

/// `FlowKey`, as words.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct FlowKeyW {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: u16,
}

/// `ServiceKey`, as words.
#[repr(C, align(4))]
#[derive(Clone, Copy)]
pub struct ServiceKeyW {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// `FlowValue`, as words.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowValueW {
    pub new_src: [u32; 4],
    pub new_dst: [u32; 4],
    pub new_sport: u16,
    pub new_dport: u16,
    pub direction: u8,
    pub pad0: [u8; 3],
    pub flags: u32,
    pub service_id: u32,
    pub upstream_id: u32,
    pub pad1: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    pub nh_checked_ns: u64,
    pub nh_ifindex: u32,
    pub nh_len: u16,
    pub nh_dmac: [u8; 6],
    pub nh_smac: [u8; 6],
    pub pad2: [u8; 6],
}

macro_rules! same_layout {
    ($view:ty, $orig:ty, $($v:ident = $o:ident),+ $(,)?) => {
        const _: () = {
            assert!(size_of::<$view>() == size_of::<$orig>());
            assert!(align_of::<$view>() >= align_of::<$orig>());
            $(assert!(offset_of!($view, $v) == offset_of!($orig, $o));)+
        };
    };
}
same_layout!(
    FlowKeyW,
    FlowKey,
    src = src_addr,
    dst = dst_addr,
    sport = src_port,
    dport = dst_port,
    proto = proto,
    family = family,
    pad = _pad
);
same_layout!(
    ServiceKeyW,
    ServiceKey,
    addr = addr,
    port = port,
    proto = proto,
    family = family
);
same_layout!(
    FlowValueW,
    FlowValue,
    new_src = new_src_addr,
    new_dst = new_dst_addr,
    new_sport = new_src_port,
    new_dport = new_dst_port,
    direction = direction,
    pad0 = _pad0,
    flags = flags,
    service_id = service_id,
    upstream_id = upstream_id,
    pad1 = _pad1,
    created_ns = created_ns,
    last_seen_ns = last_seen_ns,
    packets = packets,
    bytes = bytes,
    nh_checked_ns = nh_checked_ns,
    nh_ifindex = nh_ifindex,
    nh_len = nh_len,
    nh_dmac = nh_dmac,
    nh_smac = nh_smac,
    pad2 = _pad2
);

impl FlowKeyW {
    /// A flow key of family `A`.
    #[inline(always)]
    pub fn new<A: Ip>(src: A, dst: A, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            src: src.words(),
            dst: dst.words(),
            sport,
            dport,
            proto,
            family: A::FAMILY,
            pad: 0,
        }
    }

    /// An IPv4 flow key.
    #[inline(always)]
    pub fn v4(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> Self {
        Self::new(src, dst, sport, dport, proto)
    }

    /// The same bytes as the `proxy-common` type the maps are declared with.
    #[inline(always)]
    pub fn as_key(&self) -> &FlowKey {
        // SAFETY: same size and field offsets (asserted above), alignment at least FlowKey's,
        // and FlowKey is plain bytes: every bit pattern is valid.
        unsafe { &*(self as *const Self).cast::<FlowKey>() }
    }
}

impl ServiceKeyW {
    /// A service key of family `A`.
    #[inline(always)]
    pub fn new<A: Ip>(addr: A, port: u16, proto: u8) -> Self {
        Self {
            addr: addr.words(),
            port,
            proto,
            family: A::FAMILY,
        }
    }

    #[inline(always)]
    pub fn as_key(&self) -> &ServiceKey {
        // SAFETY: as for FlowKeyW::as_key.
        unsafe { &*(self as *const Self).cast::<ServiceKey>() }
    }
}

impl FlowValueW {
    #[inline(always)]
    pub fn as_value(&self) -> &FlowValue {
        // SAFETY: as for FlowKeyW::as_key; FlowValue is integers and byte arrays only.
        unsafe { &*(self as *const Self).cast::<FlowValue>() }
    }

    /// A flow table value pointer, seen as words.
    #[inline(always)]
    pub fn from_map(ptr: *mut FlowValue) -> *mut FlowValueW {
        ptr.cast()
    }
}

/// The wire-order IPv4 address of an `Addr` (its first 4 bytes; the rest is ignored).
#[inline(always)]
pub fn v4(addr: &Addr) -> u32 {
    u32::from_ne_bytes(addr_v4_octets(addr))
}
