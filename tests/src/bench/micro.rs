//! Per-packet cost of the XDP program through `BPF_PROG_TEST_RUN` with `repeat`, beside an
//! empty XDP program measured the same way, and the flow table at 1,000,000 flows.
//!
//! `BPF_PROG_TEST_RUN` (without live frames) runs the program `repeat` times on the *same*
//! buffer and does not restore it between runs, and our program rewrites what it forwards. So
//! every forwarding case is built such that each of the `repeat` runs is the case it claims:
//! - established forward: two forward entries A -> B and B -> A, so the frame alternates between
//!   the two directions of a synthetic pair and every run is a forward-table hit, rewrite and
//!   redirect (TTL 255 leaves room for `repeat` = 200 decrements); the first run of each entry
//!   does the FIB lookup and stores it in the entry, the rest use that next-hop cache, as
//!   established packets do (docs/datapath.md: it is re-validated every 100 ms);
//! - reply: the same with two reverse entries (every run misses the forward table first);
//! - new flow: a ring of services whose upstream is the next service of the ring, so every run
//!   sees a SYN to a service from a new source port (the SNAT port the previous run reserved) and
//!   creates a flow (Maglev pick, SNAT port reservation, two inserts);
//! - pass-through (TCP to a non-service address, no flow) and non-IP (ARP, passed at the first
//!   check) leave the frame unchanged.
//!
//! After each case the program's own reason counters must show exactly `samples * repeat`
//! packets of the expected reason: the figures are of the path they name.
//!
//! Everything runs on one thread inside a nameless network namespace of its own (veths,
//! addresses and permanent neighbours so `bpf_fib_lookup` succeeds); it vanishes with the thread.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, ensure};
use aya::maps::{Array, DevMapHash, HashMap, Map, MapData, PerCpuArray};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    CONFIG_F_READY, FAMILY_IPV4, FLOW_DIR_FORWARD, FLOW_DIR_REPLY, FLOW_F_REPLIED, FlowKey,
    FlowValue, IPPROTO_TCP, MAGLEV_SIZE, MAP_CONFIG, MAP_DEVMAP, MAP_FLOWS_FWD, MAP_FLOWS_REV,
    MAP_MAGLEV, MAP_REASONS, MAP_SERVICES, MAP_UPSTREAMS, NatConfig, PROGRAM_NAME, REASON_COUNT,
    Reason, SERVICE_F_HAS_UPSTREAMS, ServiceKey, ServiceValue, UPSTREAM_F_ACTIVE, UpstreamValue,
    addr_v4,
};
use serde::Serialize;

use crate::bench::Summary;
use crate::packet::{ETH_P_ARP, Packet, TCP_ACK, TCP_SYN, raw_frame};

/// Runs per `BPF_PROG_TEST_RUN` call (the frames start with TTL 255).
pub const REPEAT: u32 = 200;
/// Services in the new-flow ring (each upstream has 64512 SNAT ports: 60 hold 3.8M flows, so
/// the 1M-flow fill uses about a quarter of every upstream's port range).
const RING: u8 = 60;
/// Flows held in the scale test of a full run.
pub const SCALE_FLOWS: u32 = 1_000_000;

const INGRESS_DEV: &str = "a0";
const EGRESS_DEV: &str = "b0";

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 2, 0, last)
}
const CLIENT: u8 = 3;
const SERVICE: u8 = 4;
const SNAT: u8 = 5;
const UPSTREAM: u8 = 2;
const NOT_A_SERVICE: u8 = 200;
const RING_BASE: u8 = 10;

/// One measured case.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub name: String,
    pub description: String,
    /// Nanoseconds per packet, one value per `BPF_PROG_TEST_RUN` call (kernel-timed average of
    /// its `repeat` runs).
    pub ns_per_packet: Summary,
    pub samples: u32,
    pub repeat: u32,
}

/// The flow table at scale.
#[derive(Clone, Debug, Serialize)]
pub struct Scale {
    pub flows: u32,
    pub table_size: u32,
    /// New flows dropped for want of a free SNAT port within the probe budget during the fill
    /// (the rest were created).
    pub snat_exhausted: u64,
    /// Wall time to create the flows through the program (test runs of new-flow SYNs),
    /// syscalls and waiting for a CPU on a loaded machine included.
    pub fill_seconds: f64,
    /// Time the program itself spent creating them (sum of the kernel-timed runs).
    pub fill_kernel_seconds: f64,
    /// Kernel-timed ns per new flow during the fill (one value per call).
    pub fill_ns_per_flow: Summary,
    /// Entries counted by iterating the tables after the fill.
    pub fwd_entries: u64,
    pub rev_entries: u64,
    /// `memlock` of each flow table (from `/proc/self/fdinfo`), bytes.
    pub fwd_memlock_bytes: u64,
    pub rev_memlock_bytes: u64,
    pub established_full: Case,
    pub reply_full: Case,
}

#[derive(Clone, Debug, Serialize)]
pub struct Micro {
    pub cases: Vec<Case>,
    pub scale: Option<Scale>,
    pub empty_program: String,
}

// ---- raw bpf(2) ---------------------------------------------------------------------------------

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// Big enough for every `union bpf_attr` member we use; the tail stays zero.
const ATTR_LEN: usize = 128;

fn put32(attr: &mut [u8; ATTR_LEN], off: usize, v: u32) {
    attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put64(attr: &mut [u8; ATTR_LEN], off: usize, v: u64) {
    attr[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_LEN]) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable buffer of ATTR_LEN bytes laid out as the `union bpf_attr`
    // member of `cmd`; every pointer stored in it points to memory alive for this call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR_LEN) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_MAP_UPDATE_BATCH` of u32 keys and u32 values.
fn update_batch(map_fd: i32, keys: &[u32], values: &[u32]) -> Result<()> {
    ensure!(
        keys.len() == values.len(),
        "batch: keys and values differ in length"
    );
    let mut attr = [0u8; ATTR_LEN];
    put64(&mut attr, 16, keys.as_ptr() as u64);
    put64(&mut attr, 24, values.as_ptr() as u64);
    put32(
        &mut attr,
        32,
        u32::try_from(keys.len()).context("batch too long")?,
    );
    put32(&mut attr, 36, u32::try_from(map_fd).context("negative fd")?);
    sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr).context("BPF_MAP_UPDATE_BATCH")?;
    let done = u32::from_ne_bytes([attr[32], attr[33], attr[34], attr[35]]);
    ensure!(
        done as usize == keys.len(),
        "batch: {done} of {} updated",
        keys.len()
    );
    Ok(())
}

/// Load the empty XDP program `r0 = XDP_PASS; exit` from raw instructions.
fn load_empty_program() -> Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K (0xb7), dst r0, imm 2; then BPF_JMP | BPF_EXIT (0x95).
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    let mut attr = [0u8; ATTR_LEN];
    put32(&mut attr, 0, BPF_PROG_TYPE_XDP);
    put32(&mut attr, 4, 2);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    let name = b"xpt_bench_empty";
    attr[48..48 + name.len()].copy_from_slice(name);
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr).context("BPF_PROG_LOAD of the empty program")?;
    let fd = i32::try_from(fd).context("fd out of range")?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One `BPF_PROG_TEST_RUN`: returns (XDP action, kernel-timed ns per run).
fn test_run(prog_fd: i32, frame: &[u8], repeat: u32, ingress: u32) -> Result<(u32, u32)> {
    let len = u32::try_from(frame.len()).context("frame too long")?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: [u32; 6] = [0, len, 0, ingress, 0, 0];
    let mut attr = [0u8; ATTR_LEN];
    put32(&mut attr, 0, u32::try_from(prog_fd).context("negative fd")?);
    put32(&mut attr, 8, len);
    put64(&mut attr, 16, frame.as_ptr() as u64);
    put32(&mut attr, 32, repeat);
    put32(&mut attr, 40, 24);
    put64(&mut attr, 48, ctx.as_ptr() as u64);
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    let get =
        |off: usize| u32::from_ne_bytes([attr[off], attr[off + 1], attr[off + 2], attr[off + 3]]);
    Ok((get(4), get(36)))
}

// ---- the namespace ----------------------------------------------------------------------------

fn mac(last: u8) -> String {
    format!("02:00:00:00:01:{last:02x}")
}

/// On the calling thread: a new network namespace with `a0` (ingress) and `b0` (egress, where
/// every synthetic address has a permanent neighbour). Returns (a0, b0) ifindexes.
fn build_namespace() -> Result<(u32, u32)> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET) (needs root)")?;
    let mut batch = format!(
        "link set lo up\nlink add {INGRESS_DEV} type veth peer name {INGRESS_DEV}p\n\
         link add {EGRESS_DEV} type veth peer name {EGRESS_DEV}p\n\
         link set {INGRESS_DEV}p up\nlink set {EGRESS_DEV}p up\nlink set {INGRESS_DEV} up\n\
         link set {EGRESS_DEV} up\naddr add 10.1.0.1/24 dev {INGRESS_DEV}\n\
         addr add 10.2.0.1/24 dev {EGRESS_DEV}\n"
    );
    let mut neigh = vec![CLIENT, SERVICE, SNAT, UPSTREAM];
    neigh.extend((0..RING).map(|i| RING_BASE + i));
    for last in neigh {
        batch.push_str(&format!(
            "neigh add {} lladdr {} dev {EGRESS_DEV} nud permanent\n",
            ip(last),
            mac(last)
        ));
    }
    crate::packet::ip_batch(&batch)?;
    // bpf_fib_lookup refuses to forward from an interface without forwarding.
    for path in [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv4/conf/all/forwarding",
    ] {
        std::fs::write(path, "1").with_context(|| format!("writing {path}"))?;
    }
    let idx = |name: &str| {
        nix::net::if_::if_nametoindex(name).with_context(|| format!("ifindex of {name}"))
    };
    Ok((idx(INGRESS_DEV)?, idx(EGRESS_DEV)?))
}

// ---- one loaded instance ------------------------------------------------------------------------

fn be16(port: u16) -> [u8; 2] {
    port.to_be_bytes()
}

fn flow_key(src: SocketAddrV4, dst: SocketAddrV4) -> FlowKey {
    FlowKey {
        src_addr: addr_v4(src.ip().octets()),
        dst_addr: addr_v4(dst.ip().octets()),
        src_port: be16(src.port()),
        dst_port: be16(dst.port()),
        proto: IPPROTO_TCP,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    }
}

fn flow_value(src: SocketAddrV4, dst: SocketAddrV4, direction: u8) -> FlowValue {
    FlowValue {
        new_src_addr: addr_v4(src.ip().octets()),
        new_dst_addr: addr_v4(dst.ip().octets()),
        new_src_port: be16(src.port()),
        new_dst_port: be16(dst.port()),
        direction,
        flags: if direction == FLOW_DIR_REPLY {
            FLOW_F_REPLIED
        } else {
            0
        },
        service_id: 1,
        upstream_id: 1,
        ..FlowValue::default()
    }
}

fn sock(last: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(last), port)
}

struct Instance {
    ebpf: Ebpf,
    ingress: u32,
    next_client_port: u16,
}

fn map_err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> anyhow::Error {
    move |e| anyhow!("{what}: {e}")
}

impl Instance {
    fn load(max_flows: u32, ingress: u32, egress: u32) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_FLOWS_FWD, max_flows)
            .map_max_entries(MAP_FLOWS_REV, max_flows)
            .load(proxy_ebpf_object::EBPF_OBJECT)
            .context("loading the XDP object")?;
        {
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM_NAME)
                .ok_or_else(|| anyhow!("no program {PROGRAM_NAME}"))?
                .try_into()
                .context("program type")?;
            prog.load().context("loading the XDP program")?;
        }
        let mut inst = Self {
            ebpf,
            ingress,
            next_client_port: 10_000,
        };
        inst.fill(ingress, egress)?;
        Ok(inst)
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing"))
    }

    fn fill(&mut self, ingress: u32, egress: u32) -> Result<()> {
        {
            let mut m: DevMapHash<&mut MapData> = self
                .map_mut(MAP_DEVMAP)?
                .try_into()
                .map_err(map_err(MAP_DEVMAP))?;
            for i in [ingress, egress] {
                m.insert(i, i, None, 0).map_err(map_err("devmap insert"))?;
            }
        }
        // The ring: service i (id i+1) at 10.2.0.(10+i):80, whose only upstream (id i+1) is
        // the next service of the ring.
        {
            let mut m: HashMap<&mut MapData, ServiceKey, ServiceValue> = self
                .map_mut(MAP_SERVICES)?
                .try_into()
                .map_err(map_err(MAP_SERVICES))?;
            for i in 0..RING {
                let key = ServiceKey {
                    addr: addr_v4(ip(RING_BASE + i).octets()),
                    port: be16(80),
                    proto: IPPROTO_TCP,
                    family: FAMILY_IPV4,
                };
                let value = ServiceValue {
                    id: u32::from(i) + 1,
                    flags: SERVICE_F_HAS_UPSTREAMS,
                };
                m.insert(key, value, 0).map_err(map_err("service insert"))?;
            }
        }
        {
            let mut m: Array<&mut MapData, UpstreamValue> = self
                .map_mut(MAP_UPSTREAMS)?
                .try_into()
                .map_err(map_err(MAP_UPSTREAMS))?;
            for i in 0..RING {
                let next = RING_BASE + (i + 1) % RING;
                let value = UpstreamValue {
                    addr: addr_v4(ip(next).octets()),
                    port: be16(80),
                    family: FAMILY_IPV4,
                    _pad0: 0,
                    flags: UPSTREAM_F_ACTIVE,
                };
                m.set(u32::from(i) + 1, value, 0)
                    .map_err(map_err("upstream set"))?;
            }
        }
        {
            // Every slot of service id i+1's table -> upstream id i+1, in one batch syscall.
            let mut keys = Vec::new();
            let mut values = Vec::new();
            for i in 0..u32::from(RING) {
                for slot in 0..MAGLEV_SIZE {
                    keys.push((i + 1) * MAGLEV_SIZE + slot);
                    values.push(i + 1);
                }
            }
            let fd = match self.ebpf.map(MAP_MAGLEV) {
                Some(Map::Array(d)) => d.fd().as_fd().as_raw_fd(),
                _ => return Err(anyhow!("{MAP_MAGLEV} is not an array")),
            };
            update_batch(fd, &keys, &values)?;
        }
        {
            let mut m: Array<&mut MapData, NatConfig> = self
                .map_mut(MAP_CONFIG)?
                .try_into()
                .map_err(map_err(MAP_CONFIG))?;
            let cfg = NatConfig {
                snat_v4: addr_v4(ip(SNAT).octets()),
                port_min: 1024,
                port_max: 65_535,
                flags: CONFIG_F_READY,
                snat_v6: [0; 16],
            };
            m.set(0, cfg, 0).map_err(map_err("config set"))?;
        }
        // The established pair (forward table) and the reply pair (reverse table).
        let (a_src, a_dst) = (sock(CLIENT, 40_000), sock(SERVICE, 80));
        let (b_src, b_dst) = (sock(SNAT, 20_000), sock(UPSTREAM, 8080));
        self.insert_flow(
            MAP_FLOWS_FWD,
            flow_key(a_src, a_dst),
            flow_value(b_src, b_dst, FLOW_DIR_FORWARD),
        )?;
        self.insert_flow(
            MAP_FLOWS_FWD,
            flow_key(b_src, b_dst),
            flow_value(a_src, a_dst, FLOW_DIR_FORWARD),
        )?;
        let (r_src, r_dst) = (sock(UPSTREAM, 8081), sock(SNAT, 20_001));
        let (s_src, s_dst) = (sock(SERVICE, 80), sock(CLIENT, 40_001));
        self.insert_flow(
            MAP_FLOWS_REV,
            flow_key(r_src, r_dst),
            flow_value(s_src, s_dst, FLOW_DIR_REPLY),
        )?;
        self.insert_flow(
            MAP_FLOWS_REV,
            flow_key(s_src, s_dst),
            flow_value(r_src, r_dst, FLOW_DIR_REPLY),
        )?;
        Ok(())
    }

    fn insert_flow(&mut self, map: &'static str, key: FlowKey, value: FlowValue) -> Result<()> {
        let mut m: HashMap<&mut MapData, FlowKey, FlowValue> =
            self.map_mut(map)?.try_into().map_err(map_err("flow map"))?;
        m.insert(key, value, 0).map_err(map_err("flow insert"))
    }

    fn prog_fd(&self) -> Result<i32> {
        let prog: &Xdp = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("no program {PROGRAM_NAME}"))?
            .try_into()
            .context("program type")?;
        Ok(prog.fd().context("program fd")?.as_fd().as_raw_fd())
    }

    fn reasons(&self) -> Result<[u64; REASON_COUNT as usize]> {
        let m: PerCpuArray<&MapData, u64> = self
            .ebpf
            .map(MAP_REASONS)
            .ok_or_else(|| anyhow!("no {MAP_REASONS}"))?
            .try_into()
            .map_err(map_err(MAP_REASONS))?;
        let mut out = [0u64; REASON_COUNT as usize];
        for (i, slot) in (0u32..).zip(out.iter_mut()) {
            *slot = m.get(&i, 0).map_err(map_err("reasons get"))?.iter().sum();
        }
        Ok(out)
    }

    fn flow_map_data(&self, name: &str) -> Result<&MapData> {
        match self.ebpf.map(name) {
            Some(Map::LruHashMap(d) | Map::HashMap(d)) => Ok(d),
            _ => Err(anyhow!("{name} is not a hash map")),
        }
    }

    fn count_entries(&self, name: &'static str) -> Result<u64> {
        let m: HashMap<&MapData, FlowKey, FlowValue> = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("no {name}"))?
            .try_into()
            .map_err(map_err("flow map"))?;
        let mut n = 0;
        for k in m.keys() {
            k.map_err(map_err("iterating a flow table"))?;
            n += 1;
        }
        Ok(n)
    }

    fn memlock(&self, name: &str) -> Result<u64> {
        let fd = self.flow_map_data(name)?.fd().as_fd().as_raw_fd();
        let text =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).context("reading fdinfo")?;
        text.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("no memlock in fdinfo of {name}"))
    }

    /// Run `samples` calls of `repeat` runs on frames from `frame(i)`, checking that exactly
    /// `samples * repeat` packets got `reason`.
    fn measure(
        &mut self,
        fd: i32,
        samples: u32,
        reason: Option<Reason>,
        frame: impl FnMut(&mut Self, u32) -> Vec<u8>,
    ) -> Result<Vec<f64>> {
        self.measure_allowing(fd, samples, reason, None, frame)
            .map(|(v, _)| v)
    }

    /// As [`Self::measure`], but packets may also get `also` (counted and returned).
    fn measure_allowing(
        &mut self,
        fd: i32,
        samples: u32,
        reason: Option<Reason>,
        also: Option<Reason>,
        mut frame: impl FnMut(&mut Self, u32) -> Vec<u8>,
    ) -> Result<(Vec<f64>, u64)> {
        let before = self.reasons()?;
        let mut out = Vec::with_capacity(samples as usize);
        for i in 0..samples {
            let f = frame(self, i);
            let (_action, ns) = test_run(fd, &f, REPEAT, self.ingress)?;
            out.push(f64::from(ns));
        }
        let mut also_count = 0;
        if let Some(reason) = reason {
            let after = self.reasons()?;
            let total: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
            if let Some(a) = also {
                also_count = after[a as usize] - before[a as usize];
            }
            let got = after[reason as usize] - before[reason as usize] + also_count;
            let want = u64::from(samples) * u64::from(REPEAT);
            ensure!(
                got == want && total == want,
                "expected {want} packets with reason {}, counted {got} (of {total}): {:?}",
                reason.name(),
                Reason::ALL
                    .iter()
                    .zip(after.iter().zip(before.iter()))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(r, (a, b))| format!("{}={}", r.name(), a - b))
                    .collect::<Vec<_>>()
            );
        }
        Ok((out, also_count))
    }

    fn new_flow_frame(&mut self) -> Vec<u8> {
        let port = self.next_client_port;
        self.next_client_port = self.next_client_port.wrapping_add(1).max(10_000);
        Packet::tcp(sock(CLIENT, port), sock(RING_BASE, 80), TCP_SYN)
            .ttl(255)
            .bytes()
    }
}

fn established_frame() -> Vec<u8> {
    Packet::tcp(sock(CLIENT, 40_000), sock(SERVICE, 80), TCP_ACK)
        .ttl(255)
        .bytes()
}

fn reply_frame() -> Vec<u8> {
    Packet::tcp(sock(UPSTREAM, 8081), sock(SNAT, 20_001), TCP_ACK)
        .ttl(255)
        .bytes()
}

fn case(name: &str, description: &str, values: &[f64]) -> Case {
    Case {
        name: name.to_owned(),
        description: description.to_owned(),
        ns_per_packet: Summary::of(values),
        samples: u32::try_from(values.len()).unwrap_or(u32::MAX),
        repeat: REPEAT,
    }
}

/// Run every case; `samples` calls each. `scale`: also the 1M-flow table. Runs on a thread of
/// its own (which enters a new network namespace); progress lines go to stdout.
pub fn run(samples: u32, scale: Option<u32>) -> Result<Micro> {
    std::thread::Builder::new()
        .name("xdp-micro".to_owned())
        .spawn(move || {
            let t0 = Instant::now();
            run_on_this_thread(samples, scale, &|s: &str| {
                println!("{s} [{:.1} s]", t0.elapsed().as_secs_f64());
            })
        })
        .context("cannot spawn a thread")?
        .join()
        .map_err(|_| anyhow!("the micro-benchmark thread panicked"))?
}

fn run_on_this_thread(samples: u32, scale: Option<u32>, progress: &dyn Fn(&str)) -> Result<Micro> {
    let (ingress, egress) = build_namespace()?;
    let empty = load_empty_program()?;
    let empty_fd = empty.as_raw_fd();
    progress("  micro: loading the XDP program (default flow table size)");
    let mut inst = Instance::load(proxy_common::DEFAULT_MAX_FLOWS, ingress, egress)?;
    progress("  micro: loaded, maps filled");
    let fd = inst.prog_fd()?;
    let arp = raw_frame([0xff; 6], [2, 0, 0, 0, 0, 9], ETH_P_ARP, &[0u8; 28]);
    let est = established_frame();
    let reply = reply_frame();
    let pass = Packet::tcp(sock(CLIENT, 1234), sock(NOT_A_SERVICE, 443), TCP_ACK)
        .ttl(255)
        .bytes();

    let mut cases = Vec::new();
    // Interleave the cases sample by sample would need one call per case per step; instead each
    // case is measured in its own block, and the empty program first and last to show drift.
    let mut empty_runs = Vec::new();
    for _ in 0..samples {
        let (action, ns) = test_run(empty_fd, &est, REPEAT, ingress)?;
        ensure!(
            action == proxy_common::XDP_PASS,
            "empty program returned {action}"
        );
        empty_runs.push(f64::from(ns));
    }
    progress("  micro: empty program, non-IP, pass-through, established, reply, new flow");
    let not_ip = inst.measure(fd, samples, Some(Reason::PassNotIp), |_, _| arp.clone())?;
    let pass_through = inst.measure(fd, samples, Some(Reason::PassNotService), |_, _| {
        pass.clone()
    })?;
    let established = inst.measure(fd, samples, Some(Reason::FwdRedirect), |_, _| est.clone())?;
    let reply_v = inst.measure(fd, samples, Some(Reason::RevRedirect), |_, _| reply.clone())?;
    let new_flow = inst.measure(fd, samples, Some(Reason::FwdRedirect), |i, _| {
        i.new_flow_frame()
    })?;
    for _ in 0..samples {
        let (_, ns) = test_run(empty_fd, &est, REPEAT, ingress)?;
        empty_runs.push(f64::from(ns));
    }
    cases.push(case(
        "empty program",
        "r0 = XDP_PASS; exit, loaded from raw instructions (BPF_PROG_LOAD), same frame and repeat",
        &empty_runs,
    ));
    cases.push(case(
        "non-IP (ARP), passed",
        "our program, frame passed at the first check (pass_not_ip)",
        &not_ip,
    ));
    cases.push(case(
        "pass-through",
        "TCP to an address that is no service, no flow: both flow lookups and the service lookup miss (pass_not_service)",
        &pass_through,
    ));
    cases.push(case(
        "established forward",
        "forward-table hit, rewrite, cached next hop, redirect (fwd_redirect)",
        &established,
    ));
    cases.push(case(
        "reply",
        "forward-table miss, reverse-table hit, rewrite, cached next hop, redirect (rev_redirect)",
        &reply_v,
    ));
    cases.push(case(
        "new flow",
        "TCP SYN to a service: Maglev pick, SNAT port reservation, two inserts, rewrite, redirect",
        &new_flow,
    ));
    drop(inst);

    let scale = if let Some(flows) = scale {
        // The next power of two with room to spare (an LRU table evicts when nearly full).
        let table = (flows + flows / 20).next_power_of_two();
        progress(&format!(
            "  micro: flow table of {table} entries, filling {flows} flows"
        ));
        let mut big = Instance::load(table, ingress, egress)?;
        progress("  micro: loaded, maps filled");
        let fd = big.prog_fd()?;
        let calls = flows.div_ceil(REPEAT);
        let t0 = Instant::now();
        let (fill, snat_exhausted_count) = big.measure_allowing(
            fd,
            calls,
            Some(Reason::FwdRedirect),
            Some(Reason::DropSnatExhausted),
            |i, _| i.new_flow_frame(),
        )?;
        let fill_seconds = t0.elapsed().as_secs_f64();
        progress(&format!(
            "  micro: {flows} flows created in {fill_seconds:.2} s; counting entries"
        ));
        let fwd_entries = big.count_entries(MAP_FLOWS_FWD)?;
        let rev_entries = big.count_entries(MAP_FLOWS_REV)?;
        progress(&format!(
            "  micro: counted {fwd_entries} forward and {rev_entries} reverse entries"
        ));
        let established_full =
            big.measure(fd, samples, Some(Reason::FwdRedirect), |_, _| est.clone())?;
        let reply_full =
            big.measure(fd, samples, Some(Reason::RevRedirect), |_, _| reply.clone())?;
        Some(Scale {
            flows: calls * REPEAT,
            fill_kernel_seconds: fill.iter().sum::<f64>() * f64::from(REPEAT) / 1e9,
            snat_exhausted: snat_exhausted_count,
            table_size: table,
            fill_seconds,
            fill_ns_per_flow: Summary::of(&fill),
            fwd_entries,
            rev_entries,
            fwd_memlock_bytes: big.memlock(MAP_FLOWS_FWD)?,
            rev_memlock_bytes: big.memlock(MAP_FLOWS_REV)?,
            established_full: case(
                "established forward, table full",
                &format!("as established forward, with {flows} flows in the tables"),
                &established_full,
            ),
            reply_full: case(
                "reply, table full",
                &format!("as reply, with {flows} flows in the tables"),
                &reply_full,
            ),
        })
    } else {
        None
    };
    Ok(Micro {
        cases,
        scale,
        empty_program: "BPF_PROG_LOAD of 2 raw instructions: mov r0, 2 (XDP_PASS); exit".to_owned(),
    })
}
