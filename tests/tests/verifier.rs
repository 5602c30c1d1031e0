//! The XDP object passes the kernel verifier, plus a few BPF_PROG_TEST_RUN smoke tests of the
//! program's main paths (the full packet suite lives in tests/packet.rs).
//!
//! Needs root (BPF_PROG_LOAD of an XDP program, BPF_PROG_TEST_RUN). The smoke tests run in a
//! network namespace of their own, created on a dedicated thread that exits with the test: there
//! only `lo` exists, so the FIB lookup of a rewritten packet fails deterministically and the
//! program hands it to the kernel already rewritten (`Reason::PassFibFailed`).

use std::thread;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{ProgramError, TestRun as _, TestRunOptions, Xdp},
};
use proxy_common::{
    CONFIG_F_READY, FAMILY_IPV4, FLOW_DIR_FORWARD, FLOW_DIR_REPLY, FLOW_F_REPLIED,
    FLOW_F_SYN_RECEIVED, FlowKey, FlowValue, IPPROTO_TCP, IPPROTO_UDP, MAGLEV_SIZE, MAP_CONFIG,
    MAP_FLOWS_FWD, MAP_FLOWS_REV, MAP_MAGLEV, MAP_REASONS, MAP_SERVICE_STATS, MAP_SERVICES,
    MAP_UPSTREAM_STATS, MAP_UPSTREAMS, NatConfig, PROGRAM_NAME, Reason, SERVICE_F_HAS_UPSTREAMS,
    ServiceKey, ServiceValue, TrafficCounters, UPSTREAM_F_ACTIVE, UpstreamValue, XDP_DROP,
    XDP_PASS, addr_v4,
    checksum::{l4_checksum_v4, verify},
    hash::{SEED_MAGLEV, SEED_SNAT_PORT, flow_hash},
};

/// Load the object with fresh (unpinned) maps and run the verifier on `proxy_xdp`.
fn load(small_flows: bool) -> Ebpf {
    let mut loader = EbpfLoader::new();
    if small_flows {
        // Smoke tests need a handful of flows; keep several loaded copies cheap.
        loader
            .map_max_entries(MAP_FLOWS_FWD, 1024)
            .map_max_entries(MAP_FLOWS_REV, 1024);
    }
    let mut ebpf = loader
        .load(proxy_ebpf_object::EBPF_OBJECT)
        .expect("parse the XDP object and create its maps");
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .expect("program proxy_xdp in the object")
        .try_into()
        .expect("proxy_xdp is an XDP program");
    match prog.load() {
        Ok(()) => {}
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            // The full log can be megabytes: keep it in a file, show its end.
            let log = verifier_log.to_string();
            let path = std::env::temp_dir().join("proxy_xdp-verifier.log");
            let saved = std::fs::write(&path, &log).is_ok();
            let tail: String = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "verifier rejected proxy_xdp: {io_error}\n(full log {}: {})\n...\n{tail}",
                if saved { "saved" } else { "not saved" },
                path.display()
            );
        }
        Err(e) => panic!("loading proxy_xdp: {e:?}"),
    }
    ebpf
}

fn prog(ebpf: &Ebpf) -> &Xdp {
    ebpf.program(PROGRAM_NAME)
        .expect("program proxy_xdp")
        .try_into()
        .expect("XDP program")
}

#[test]
fn verifier_accepts_proxy_xdp() {
    let ebpf = load(false);
    let info = prog(&ebpf).info().expect("program info");
    match info.verified_instruction_count() {
        Some(n) => println!("proxy_xdp: verifier processed {n} instructions"),
        None => println!("proxy_xdp: verified instruction count not reported by this kernel"),
    }
    if let Some(size) = info.size_translated() {
        println!("proxy_xdp: {} BPF instructions", size / 8);
    }
    // Every map of the contract is present under its contract name.
    for name in [
        MAP_CONFIG,
        MAP_SERVICES,
        MAP_UPSTREAMS,
        MAP_MAGLEV,
        MAP_FLOWS_FWD,
        MAP_FLOWS_REV,
        proxy_common::MAP_DEVMAP,
        MAP_REASONS,
        MAP_SERVICE_STATS,
        MAP_UPSTREAM_STATS,
    ] {
        assert!(
            ebpf.map(name).is_some(),
            "map {name} missing from the object"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Smoke tests.
// ---------------------------------------------------------------------------------------------

const CLIENT: [u8; 4] = [192, 0, 2, 10];
const CLIENT_PORT: u16 = 40_000;
const SERVICE: [u8; 4] = [10, 10, 1, 1];
const SERVICE_PORT: u16 = 80;
const SNAT: [u8; 4] = [10, 20, 1, 1];
const UPSTREAM: [u8; 4] = [10, 20, 1, 2];
const UPSTREAM_PORT: u16 = 8080;
const PORT_MIN: u16 = 10_240;
const PORT_MAX: u16 = 32_767;
const SERVICE_ID: u32 = 1;
const UPSTREAM_ID: u32 = 3;

/// Run `f` on a thread that first moved into a new, empty network namespace (it dies with the
/// thread, so nothing is left behind even when `f` panics).
fn in_fresh_netns<F: FnOnce() + Send + 'static>(f: F) {
    let t = thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f();
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Fill config, one service (both protocols), one upstream and the Maglev slot(s) the test
/// flows hash to.
fn configure(ebpf: &mut Ebpf, protos: &[u8]) {
    let mut cfg: Array<&mut MapData, NatConfig> =
        Array::try_from(ebpf.map_mut(MAP_CONFIG).expect("XP_CONFIG")).expect("array");
    cfg.set(
        0,
        NatConfig {
            snat_v4: addr_v4(SNAT),
            port_min: PORT_MIN,
            port_max: PORT_MAX,
            flags: CONFIG_F_READY,
            snat_v6: [0; 16],
        },
        0,
    )
    .expect("write XP_CONFIG");

    let mut svcs: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(ebpf.map_mut(MAP_SERVICES).expect("XP_SERVICES")).expect("hash");
    for &proto in protos {
        let key = ServiceKey {
            addr: addr_v4(SERVICE),
            port: SERVICE_PORT.to_be_bytes(),
            proto,
            family: FAMILY_IPV4,
        };
        let value = ServiceValue {
            id: SERVICE_ID,
            flags: SERVICE_F_HAS_UPSTREAMS,
        };
        svcs.insert(key, value, 0).expect("write XP_SERVICES");
    }

    let mut ups: Array<&mut MapData, UpstreamValue> =
        Array::try_from(ebpf.map_mut(MAP_UPSTREAMS).expect("XP_UPSTREAMS")).expect("array");
    let up = UpstreamValue {
        addr: addr_v4(UPSTREAM),
        port: UPSTREAM_PORT.to_be_bytes(),
        family: FAMILY_IPV4,
        _pad0: 0,
        flags: UPSTREAM_F_ACTIVE,
    };
    ups.set(UPSTREAM_ID, up, 0).expect("write XP_UPSTREAMS");

    let mut maglev: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut(MAP_MAGLEV).expect("XP_MAGLEV")).expect("array");
    for &proto in protos {
        let slot = maglev_slot(proto);
        maglev
            .set(SERVICE_ID * MAGLEV_SIZE + slot, UPSTREAM_ID, 0)
            .expect("write XP_MAGLEV");
    }
}

fn tuple_hash(seed: u32, proto: u8) -> u32 {
    flow_hash(
        seed,
        &addr_v4(CLIENT),
        &addr_v4(SERVICE),
        CLIENT_PORT.to_be_bytes(),
        SERVICE_PORT.to_be_bytes(),
        proto,
    )
}

fn maglev_slot(proto: u8) -> u32 {
    tuple_hash(SEED_MAGLEV, proto) % MAGLEV_SIZE
}

/// The SNAT port the first probe takes (the table is empty in these tests).
fn expected_snat_port(proto: u8) -> u16 {
    let span = u32::from(PORT_MAX - PORT_MIN) + 1;
    let port = u32::from(PORT_MIN) + tuple_hash(SEED_SNAT_PORT, proto) % span;
    u16::try_from(port).expect("port fits in u16")
}

/// An Ethernet + IPv4 + TCP/UDP frame with valid checksums.
#[allow(clippy::too_many_arguments)]
fn frame(
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if proto == IPPROTO_TCP {
        l4.extend_from_slice(&1_000u32.to_be_bytes()); // seq
        l4.extend_from_slice(&0u32.to_be_bytes()); // ack
        l4.push(5 << 4); // data offset
        l4.push(tcp_flags);
        l4.extend_from_slice(&65_535u16.to_be_bytes()); // window
        l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        l4.extend_from_slice(payload);
        let c = l4_checksum_v4(src, dst, proto, &l4);
        l4[16..18].copy_from_slice(&c.to_be_bytes());
    } else {
        let len = u16::try_from(8 + payload.len()).expect("small payload");
        l4.extend_from_slice(&len.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(payload);
        let c = l4_checksum_v4(src, dst, proto, &l4);
        l4[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    }
    let tot_len = u16::try_from(20 + l4.len()).expect("small packet");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&tot_len.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, ttl, proto, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = proxy_common::checksum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

struct Run {
    action: u32,
    out: Vec<u8>,
}

fn run(ebpf: &Ebpf, input: &[u8]) -> Run {
    let mut out = vec![0u8; input.len() + 256];
    let res = prog(ebpf)
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    Run {
        action: res.return_value,
        out,
    }
}

fn reason_count(ebpf: &Ebpf, reason: Reason) -> u64 {
    let reasons: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(MAP_REASONS).expect("XP_REASONS")).expect("percpu array");
    reasons
        .get(&(reason as u32), 0)
        .expect("read XP_REASONS")
        .iter()
        .sum()
}

fn total_reasons(ebpf: &Ebpf) -> u64 {
    Reason::ALL.iter().map(|&r| reason_count(ebpf, r)).sum()
}

fn traffic(ebpf: &Ebpf, map: &str, id: u32) -> TrafficCounters {
    let m: PerCpuArray<&MapData, TrafficCounters> =
        PerCpuArray::try_from(ebpf.map(map).expect("stats map")).expect("percpu array");
    m.get(&id, 0)
        .expect("read stats")
        .iter()
        .fold(TrafficCounters::default(), |a, c| TrafficCounters {
            fwd_packets: a.fwd_packets + c.fwd_packets,
            fwd_bytes: a.fwd_bytes + c.fwd_bytes,
            rev_packets: a.rev_packets + c.rev_packets,
            rev_bytes: a.rev_bytes + c.rev_bytes,
            new_flows: a.new_flows + c.new_flows,
        })
}

fn flow(ebpf: &Ebpf, map: &str, key: &FlowKey) -> Option<FlowValue> {
    let m: HashMap<&MapData, FlowKey, FlowValue> =
        HashMap::try_from(ebpf.map(map).expect("flow map")).expect("hash");
    m.get(key, 0).ok()
}

fn flow_key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_addr: addr_v4(src),
        dst_addr: addr_v4(dst),
        src_port: sport.to_be_bytes(),
        dst_port: dport.to_be_bytes(),
        proto,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    }
}

/// Addresses, ports, TTL of an output frame, after checking both checksums by recomputation.
fn check_rewritten(out: &[u8], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, ttl: u8) {
    let ip = &out[14..34];
    assert!(verify(ip), "IPv4 header checksum invalid: {ip:02x?}");
    assert_eq!(ip[12..16], src, "source address");
    assert_eq!(ip[16..20], dst, "destination address");
    assert_eq!(ip[8], ttl, "TTL");
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &out[34..14 + tot_len];
    assert_eq!(u16::from_be_bytes([l4[0], l4[1]]), sport, "source port");
    assert_eq!(
        u16::from_be_bytes([l4[2], l4[3]]),
        dport,
        "destination port"
    );
    let proto = ip[9];
    let check_off = if proto == IPPROTO_TCP { 16 } else { 6 };
    let got = u16::from_be_bytes([l4[check_off], l4[check_off + 1]]);
    let mut zeroed = l4.to_vec();
    zeroed[check_off..check_off + 2].copy_from_slice(&[0, 0]);
    let mut want = l4_checksum_v4(src, dst, proto, &zeroed);
    if proto == IPPROTO_UDP && want == 0 {
        want = 0xffff;
    }
    assert_eq!(got, want, "L4 checksum (full recomputation)");
}

#[test]
fn smoke_non_ipv4_is_passed_and_counted() {
    in_fresh_netns(|| {
        let ebpf = load(true);
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        let r = run(&ebpf, &arp);
        assert_eq!(r.action, XDP_PASS);
        assert_eq!(r.out, arp, "passed frame must be untouched");
        assert_eq!(reason_count(&ebpf, Reason::PassNotIp), 1);
        assert_eq!(total_reasons(&ebpf), 1, "exactly one reason per packet");

        // IPv4 with half an IP header: dropped as truncated. (BPF_PROG_TEST_RUN refuses frames
        // shorter than an Ethernet header, so that is the shortest runt it can show.)
        let mut runt = arp[..12].to_vec();
        runt.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6]);
        let r = run(&ebpf, &runt);
        assert_eq!(r.action, XDP_DROP);
        assert_eq!(reason_count(&ebpf, Reason::DropTruncated), 1);
        assert_eq!(total_reasons(&ebpf), 2);
    });
}

/// IPv6 is parsed (no longer `PassNotIp`), and what the proxy must never touch is passed
/// untouched: an NDP neighbour solicitation (`PassNotTcpUdp`) and an MLD report behind a
/// hop-by-hop header (`PassIpOptions`).
#[test]
fn smoke_ipv6_ndp_and_extension_headers_pass_untouched() {
    in_fresh_netns(|| {
        let ebpf = load(true);
        let v6 = |next: u8, payload: &[u8]| {
            let mut f = vec![
                0x33, 0x33, 0xff, 0, 0, 1, 0x02, 0, 0, 0, 0, 0x01, 0x86, 0xdd,
            ];
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
            f.extend_from_slice(&[next, 255]);
            f.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            f.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1]);
            f.extend_from_slice(payload);
            f
        };
        // Neighbour solicitation (type 135) for fe80::1 (checksum not checked by the program).
        let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
        ns.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let ns = v6(58, &ns);
        let r = run(&ebpf, &ns);
        assert_eq!(r.action, XDP_PASS);
        assert_eq!(r.out, ns, "NDP must be untouched");
        assert_eq!(reason_count(&ebpf, Reason::PassNotTcpUdp), 1);
        // Hop-by-hop (router alert) then an MLDv2 report.
        let mut hbh = vec![58, 0, 5, 2, 0, 0, 1, 0];
        hbh.extend_from_slice(&[143, 0, 0, 0, 0, 0, 0, 0]);
        let mld = v6(0, &hbh);
        let r = run(&ebpf, &mld);
        assert_eq!(r.action, XDP_PASS);
        assert_eq!(r.out, mld, "extension headers are never rewritten");
        assert_eq!(reason_count(&ebpf, Reason::PassIpOptions), 1);
        assert_eq!(reason_count(&ebpf, Reason::PassNotIp), 0);
        assert_eq!(total_reasons(&ebpf), 2, "exactly one reason per packet");
    });
}

#[test]
fn smoke_not_ready_then_not_service() {
    in_fresh_netns(|| {
        let mut ebpf = load(true);
        let syn = frame(
            IPPROTO_TCP,
            CLIENT,
            SERVICE,
            CLIENT_PORT,
            SERVICE_PORT,
            0x02,
            64,
            &[],
        );
        assert_eq!(run(&ebpf, &syn).action, XDP_PASS);
        assert_eq!(reason_count(&ebpf, Reason::PassNotReady), 1);

        configure(&mut ebpf, &[IPPROTO_TCP]);
        let other = frame(IPPROTO_TCP, CLIENT, SERVICE, CLIENT_PORT, 22, 0x02, 64, &[]);
        let r = run(&ebpf, &other);
        assert_eq!(r.action, XDP_PASS);
        assert_eq!(r.out, other);
        assert_eq!(reason_count(&ebpf, Reason::PassNotService), 1);

        // Mid-flow segment to the service without a flow: passed, no flow created.
        let ack = frame(
            IPPROTO_TCP,
            CLIENT,
            SERVICE,
            CLIENT_PORT,
            SERVICE_PORT,
            0x10,
            64,
            &[],
        );
        assert_eq!(run(&ebpf, &ack).action, XDP_PASS);
        assert_eq!(reason_count(&ebpf, Reason::PassMidflowNoFlow), 1);
        let key = flow_key(CLIENT, SERVICE, CLIENT_PORT, SERVICE_PORT, IPPROTO_TCP);
        assert!(flow(&ebpf, MAP_FLOWS_FWD, &key).is_none());
    });
}

#[test]
fn smoke_tcp_syn_creates_both_entries_and_reply_is_translated_back() {
    in_fresh_netns(|| {
        let mut ebpf = load(true);
        configure(&mut ebpf, &[IPPROTO_TCP]);
        let snat_port = expected_snat_port(IPPROTO_TCP);

        let syn = frame(
            IPPROTO_TCP,
            CLIENT,
            SERVICE,
            CLIENT_PORT,
            SERVICE_PORT,
            0x02,
            64,
            &[],
        );
        let r = run(&ebpf, &syn);
        // Empty namespace: no route, so the rewritten packet goes to the kernel.
        assert_eq!(r.action, XDP_PASS);
        assert_eq!(reason_count(&ebpf, Reason::PassFibFailed), 1);
        assert_eq!(total_reasons(&ebpf), 1);
        check_rewritten(&r.out, SNAT, UPSTREAM, snat_port, UPSTREAM_PORT, 64);

        let fwd_key = flow_key(CLIENT, SERVICE, CLIENT_PORT, SERVICE_PORT, IPPROTO_TCP);
        let fwd = flow(&ebpf, MAP_FLOWS_FWD, &fwd_key).expect("forward entry");
        assert_eq!(fwd.new_src_addr, addr_v4(SNAT));
        assert_eq!(fwd.new_dst_addr, addr_v4(UPSTREAM));
        assert_eq!(fwd.new_src_port, snat_port.to_be_bytes());
        assert_eq!(fwd.new_dst_port, UPSTREAM_PORT.to_be_bytes());
        assert_eq!(fwd.direction, FLOW_DIR_FORWARD);
        assert_eq!((fwd.service_id, fwd.upstream_id), (SERVICE_ID, UPSTREAM_ID));
        assert_eq!(fwd.flags, 0);
        assert_eq!((fwd.packets, fwd.bytes), (1, (syn.len() - 14) as u64));
        assert!(fwd.created_ns > 0 && fwd.created_ns == fwd.last_seen_ns);

        let rev_key = flow_key(UPSTREAM, SNAT, UPSTREAM_PORT, snat_port, IPPROTO_TCP);
        let rev = flow(&ebpf, MAP_FLOWS_REV, &rev_key).expect("reverse entry");
        assert_eq!(rev.new_src_addr, addr_v4(SERVICE));
        assert_eq!(rev.new_dst_addr, addr_v4(CLIENT));
        assert_eq!(rev.new_src_port, SERVICE_PORT.to_be_bytes());
        assert_eq!(rev.new_dst_port, CLIENT_PORT.to_be_bytes());
        assert_eq!(rev.direction, FLOW_DIR_REPLY);
        assert_eq!((rev.packets, rev.bytes), (0, 0));
        assert_eq!(rev.created_ns, fwd.created_ns);

        let svc = traffic(&ebpf, MAP_SERVICE_STATS, SERVICE_ID);
        assert_eq!((svc.new_flows, svc.fwd_packets), (1, 1));
        assert_eq!(svc.fwd_bytes, (syn.len() - 14) as u64);
        let ups = traffic(&ebpf, MAP_UPSTREAM_STATS, UPSTREAM_ID);
        assert_eq!((ups.new_flows, ups.fwd_packets), (1, 1));

        // The upstream's SYN+ACK comes back to the SNAT address and port.
        let synack = frame(
            IPPROTO_TCP,
            UPSTREAM,
            SNAT,
            UPSTREAM_PORT,
            snat_port,
            0x12,
            63,
            b"x",
        );
        let r = run(&ebpf, &synack);
        assert_eq!(r.action, XDP_PASS);
        assert_eq!(reason_count(&ebpf, Reason::PassFibFailed), 2);
        check_rewritten(&r.out, SERVICE, CLIENT, SERVICE_PORT, CLIENT_PORT, 63);
        let rev = flow(&ebpf, MAP_FLOWS_REV, &rev_key).expect("reverse entry");
        let fwd = flow(&ebpf, MAP_FLOWS_FWD, &fwd_key).expect("forward entry");
        assert_eq!(rev.flags, FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED);
        assert_eq!(
            fwd.flags,
            FLOW_F_REPLIED | FLOW_F_SYN_RECEIVED,
            "flags kept equal in both entries"
        );
        assert_eq!(rev.packets, 1);
        let svc = traffic(&ebpf, MAP_SERVICE_STATS, SERVICE_ID);
        assert_eq!(
            (svc.rev_packets, svc.rev_bytes),
            (1, (synack.len() - 14) as u64)
        );

        // TTL 1 on an established flow: dropped, nothing rewritten.
        let ack = frame(
            IPPROTO_TCP,
            CLIENT,
            SERVICE,
            CLIENT_PORT,
            SERVICE_PORT,
            0x10,
            1,
            &[],
        );
        let r = run(&ebpf, &ack);
        assert_eq!(r.action, XDP_DROP);
        assert_eq!(reason_count(&ebpf, Reason::DropTtlExceeded), 1);
        assert_eq!(total_reasons(&ebpf), 3);
    });
}

#[test]
fn smoke_udp_zero_checksum_stays_zero() {
    in_fresh_netns(|| {
        let mut ebpf = load(true);
        configure(&mut ebpf, &[IPPROTO_UDP]);
        let snat_port = expected_snat_port(IPPROTO_UDP);
        let mut dgram = frame(
            IPPROTO_UDP,
            CLIENT,
            SERVICE,
            CLIENT_PORT,
            SERVICE_PORT,
            0,
            64,
            b"ping",
        );
        dgram[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        let r = run(&ebpf, &dgram);
        assert_eq!(r.action, XDP_PASS);
        assert_eq!(reason_count(&ebpf, Reason::PassFibFailed), 1);
        let ip = &r.out[14..34];
        assert!(verify(ip));
        assert_eq!(ip[12..16], SNAT);
        assert_eq!(ip[16..20], UPSTREAM);
        let udp = &r.out[34..42];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), snat_port);
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), UPSTREAM_PORT);
        assert_eq!(udp[6..8], [0, 0], "UDP checksum 0 stays 0");

        // With a checksum, the rewritten one verifies.
        let dgram = frame(
            IPPROTO_UDP,
            CLIENT,
            SERVICE,
            CLIENT_PORT,
            SERVICE_PORT,
            0,
            64,
            b"ping",
        );
        let r = run(&ebpf, &dgram);
        check_rewritten(&r.out, SNAT, UPSTREAM, snat_port, UPSTREAM_PORT, 64);
    });
}
