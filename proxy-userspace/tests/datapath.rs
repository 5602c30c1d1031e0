//! The datapath module against the real XDP object and a real bpffs (root): load with pinning,
//! fill the maps from a plan, read them back, reopen them from the pins alone, reload with the
//! pinned maps reused (ids kept), and the one-daemon-per-pin-dir lock. Nothing is attached.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use proxy_common::{CONFIG_F_READY, MAGLEV_SIZE, SERVICE_F_HAS_UPSTREAMS};
use xdp_proxy::{
    config::Config,
    datapath::{self, Bpffs, Datapath, DatapathError, Maps},
    plan,
};

/// A bpffs mounted on a fresh directory, unmounted and removed on drop.
struct TempBpffs(PathBuf);

impl TempBpffs {
    fn new(tag: &str) -> Self {
        let dir = PathBuf::from(format!("/run/xpd-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        Self(dir)
    }
}

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn fixture_config() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid_full.toml");
    Config::load(&path).unwrap()
}

/// Ids found in the maps: service key -> id, upstream address -> id.
type ExistingIds = (
    Vec<(proxy_common::ServiceKey, u32)>,
    Vec<(std::net::SocketAddr, u32)>,
);

fn existing(maps: &Maps) -> ExistingIds {
    let s = maps
        .services()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.id))
        .collect();
    let u = maps
        .upstream_slots()
        .unwrap()
        .into_iter()
        .map(|(id, v)| (plan::upstream_addr(&v), id))
        .collect();
    (s, u)
}

#[test]
fn load_fill_read_reopen_reload() {
    let fs = TempBpffs::new("dp");
    let pin_dir = fs.0.join("xdp-proxy");
    assert_eq!(datapath::ensure_bpffs(&pin_dir).unwrap(), Bpffs::Present);
    let _lock = datapath::lock_pin_dir(&pin_dir).unwrap();
    assert!(matches!(
        datapath::lock_pin_dir(&pin_dir),
        Err(DatapathError::Locked { .. })
    ));

    let config = fixture_config();
    let snat = Ipv4Addr::new(10, 20, 1, 1);
    let mut dp = Datapath::load(proxy_ebpf_object::EBPF_OBJECT, &pin_dir, 1024).unwrap();
    let plan = plan::build(&config, snat, &[], &[]).unwrap();
    dp.maps.apply(&plan, &[1]).unwrap();

    let check = |maps: &Maps| {
        let nat = maps.nat_config().unwrap();
        assert_eq!(nat, plan.nat);
        assert_eq!(nat.flags & CONFIG_F_READY, CONFIG_F_READY);
        let mut services = maps.services().unwrap();
        services.sort_by_key(|(_, v)| v.id);
        assert_eq!(services.len(), 2);
        for ((k, v), p) in services.iter().zip(&plan.services) {
            assert_eq!(*k, p.key);
            assert_eq!(*v, p.value);
            assert_eq!(v.flags, SERVICE_F_HAS_UPSTREAMS);
            let table = maps.maglev_table(v.id).unwrap();
            assert_eq!(table.len(), MAGLEV_SIZE as usize);
            assert_eq!(table, p.table);
        }
        let slots: Vec<(u32, std::net::SocketAddr)> = maps
            .upstream_slots()
            .unwrap()
            .iter()
            .map(|(id, v)| (*id, plan::upstream_addr(v)))
            .collect();
        assert_eq!(slots, plan.upstreams);
        assert_eq!(maps.devmap_ifindexes().unwrap(), [1]);
        assert!(maps.reasons().unwrap().iter().all(|(_, n)| *n == 0));
        assert!(maps.flows(100).unwrap().is_empty());
    };
    check(&dp.maps);
    assert_eq!(dp.maps.flow_capacity().unwrap(), 1024);
    drop(dp);

    // The pins alone (as `inspect` reads them).
    let pinned = Maps::open_pinned(&pin_dir).unwrap();
    check(&pinned);
    drop(pinned);

    // A second load reuses the pinned maps: the plan keeps every id. Reorder the services so a
    // fresh assignment would differ.
    let mut reordered = config.clone();
    reordered.services.reverse();
    // A different max_flows: the pinned table (and its flows) is kept at its size.
    let mut dp = Datapath::load(proxy_ebpf_object::EBPF_OBJECT, &pin_dir, 2048).unwrap();
    assert_eq!(dp.maps.flow_capacity().unwrap(), 1024);
    let (s, u) = existing(&dp.maps);
    assert_eq!(s.len(), 2);
    let plan2 = plan::build(&reordered, snat, &s, &u).unwrap();
    for p in &plan.services {
        let again = plan2.services.iter().find(|x| x.key == p.key).unwrap();
        assert_eq!(again.value.id, p.value.id, "{}", p.name);
    }
    dp.maps.apply(&plan2, &[1]).unwrap();
    check(&dp.maps);

    // Dropping a service removes it from the match map and clears its table.
    let mut fewer = config.clone();
    fewer.services.remove(1);
    let (s, u) = existing(&dp.maps);
    let plan3 = plan::build(&fewer, snat, &s, &u).unwrap();
    dp.maps.apply(&plan3, &[]).unwrap();
    let services = dp.maps.services().unwrap();
    assert_eq!(services.len(), 1);
    let gone = plan.services[1].value.id;
    assert!(
        dp.maps
            .maglev_table(gone)
            .unwrap()
            .iter()
            .all(|id| *id == 0)
    );
    assert_eq!(dp.maps.upstream_slots().unwrap().len(), 2);
    assert!(dp.maps.devmap_ifindexes().unwrap().is_empty());
}

#[test]
fn inspect_needs_an_existing_pin_dir() {
    let fs = TempBpffs::new("nopin");
    let err = Maps::open_pinned(&fs.0.join("never-ran")).err().unwrap();
    assert!(matches!(err, DatapathError::NoPinDir { .. }), "{err}");
}
