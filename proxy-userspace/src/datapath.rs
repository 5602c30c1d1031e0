//! The only module that talks to aya's maps and programs: loads the XDP object, pins its maps
//! under `<pin_dir>/v<ABI_VERSION>/` (reusing maps already pinned there, so flows survive a
//! restart), attaches the program, writes a [`Plan`] into the maps, expires flows, and reads
//! counters (also from the pinned maps alone, for `xdp-proxy inspect` while the daemon is down).

use std::{
    collections::HashSet,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        xdp::XdpMapError,
    },
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use nix::{
    fcntl::{Flock, FlockArg},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use proxy_common::{
    ABI_VERSION, FlowKey, FlowValue, MAGLEV_SIZE, MAP_CONFIG, MAP_DEVMAP, MAP_FLOWS_FWD,
    MAP_FLOWS_REV, MAP_MAGLEV, MAP_REASONS, MAP_SERVICE_STATS, MAP_SERVICES, MAP_UPSTREAM_STATS,
    MAP_UPSTREAMS, MAX_SERVICES, MAX_UPSTREAMS, NatConfig, PROGRAM_NAME, Reason, ServiceKey,
    ServiceValue, TrafficCounters, UPSTREAM_F_ACTIVE, UpstreamValue,
};

use crate::{
    config::DatapathMode,
    flows::{self, Decision, Lifetimes},
    plan::{Plan, upstream_value},
};

/// Every map the daemon pins, in one list.
pub const PINNED_MAPS: [&str; 10] = [
    MAP_CONFIG,
    MAP_SERVICES,
    MAP_UPSTREAMS,
    MAP_MAGLEV,
    MAP_FLOWS_FWD,
    MAP_FLOWS_REV,
    MAP_DEVMAP,
    MAP_REASONS,
    MAP_SERVICE_STATS,
    MAP_UPSTREAM_STATS,
];

/// What went wrong, naming the map, operation or path.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{op} {}: {source}", path.display())]
    Fs {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("statfs {}: {source}", path.display())]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("mount -t bpf bpf {}: {source}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("pin_dir {} is not on a bpffs and its parent is `/`: choose a pin_dir like /sys/fs/bpf/xdp-proxy", path.display())]
    NoMountPoint { path: PathBuf },
    #[error(
        "the embedded XDP object is empty (this binary was built with AYA_BUILD_SKIP=1): rebuild \
         without it"
    )]
    EmptyObject,
    #[error("loading the XDP object (maps pinned under {}): {source}", pin_dir.display())]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the XDP object has no program `{PROGRAM_NAME}`")]
    NoProgram,
    #[error("program `{PROGRAM_NAME}`: {op}: {source}")]
    Program {
        op: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("the XDP object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {map}: {op}: {source}")]
    Map {
        map: &'static str,
        op: String,
        #[source]
        source: MapError,
    },
    #[error("map {map}: {op}: {source}")]
    XdpMap {
        map: &'static str,
        op: String,
        #[source]
        source: XdpMapError,
    },
    #[error(
        "pin directory {} does not exist: is --pin-dir the daemon's datapath.pin_dir, and has the \
         daemon run since the bpffs was mounted?",
        path.display()
    )]
    NoPinDir { path: PathBuf },
    #[error("opening pinned map {}: {source}", path.display())]
    OpenPinned {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("interface `{name}`: {source}")]
    Interface {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("attaching XDP to `{iface}` in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: AttachMode,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "another xdp-proxy daemon holds {} (one daemon per pin_dir): stop it first",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("reading the number of possible CPUs ({path}): {source}")]
    Cpus {
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn map_err(map: &'static str, op: impl Into<String>) -> impl FnOnce(MapError) -> DatapathError {
    let op = op.into();
    move |source| DatapathError::Map { map, op, source }
}

/// `<pin_dir>/v<ABI_VERSION>`.
#[must_use]
pub fn versioned_pin_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{ABI_VERSION}"))
}

// ---------------------------------------------------------------------------------------------
// bpffs.
// ---------------------------------------------------------------------------------------------

/// What [`ensure_bpffs`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bpffs {
    /// The pin directory already was on a bpffs.
    Present,
    /// A bpffs was mounted at this path.
    Mounted(PathBuf),
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let st = statfs(path).map_err(|source| DatapathError::Statfs {
        path: path.to_owned(),
        source,
    })?;
    Ok(st.filesystem_type() == BPF_FS_MAGIC)
}

/// Make sure `pin_dir` lies on a bpffs (mounting one at its parent if not) and that
/// `<pin_dir>/v<ABI_VERSION>` exists.
///
/// # Errors
/// statfs, mount or mkdir failures, naming the path.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<Bpffs> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    let mut outcome = Bpffs::Present;
    if !is_bpffs(existing)? {
        let mount_point = match pin_dir.parent() {
            Some(p) if p != Path::new("/") && !p.as_os_str().is_empty() => p,
            _ => {
                return Err(DatapathError::NoMountPoint {
                    path: pin_dir.to_owned(),
                });
            }
        };
        std::fs::create_dir_all(mount_point).map_err(|source| DatapathError::Fs {
            op: "creating",
            path: mount_point.to_owned(),
            source,
        })?;
        nix::mount::mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| DatapathError::Mount {
            path: mount_point.to_owned(),
            source,
        })?;
        outcome = Bpffs::Mounted(mount_point.to_owned());
    }
    let dir = versioned_pin_dir(pin_dir);
    std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Fs {
        op: "creating",
        path: dir.clone(),
        source,
    })?;
    Ok(outcome)
}

/// An exclusive lock on `<pin_dir>/v<ABI_VERSION>`, held for the daemon's life so a second
/// daemon never rewrites the maps of a running one.
#[derive(Debug)]
pub struct PinDirLock(
    #[expect(dead_code, reason = "held for its Drop (unlock)")] Flock<std::fs::File>,
);

/// Take the pin directory lock (non-blocking).
///
/// # Errors
/// [`DatapathError::Locked`] when another process holds it; open failures.
pub fn lock_pin_dir(pin_dir: &Path) -> Result<PinDirLock> {
    let dir = versioned_pin_dir(pin_dir);
    let file = std::fs::File::open(&dir).map_err(|source| DatapathError::Fs {
        op: "opening",
        path: dir.clone(),
        source,
    })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(PinDirLock(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(DatapathError::Locked { path: dir }),
        Err((_, errno)) => Err(DatapathError::Fs {
            op: "locking",
            path: dir,
            source: errno.into(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Typed maps.
// ---------------------------------------------------------------------------------------------

/// A forward flow with its reverse entry (when present).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub key: FlowKey,
    pub fwd: FlowValue,
    pub rev: Option<FlowValue>,
}

/// What one expiry scan did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpiryStats {
    pub scanned: usize,
    pub expired: usize,
    /// Reverse entries whose forward entry was gone (LRU eviction), deleted when idle.
    pub orphans_expired: usize,
}

/// The program's maps, typed.
pub struct Maps {
    config: Array<MapData, NatConfig>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    upstreams: Array<MapData, UpstreamValue>,
    maglev: Array<MapData, u32>,
    flows_fwd: HashMap<MapData, FlowKey, FlowValue>,
    flows_rev: HashMap<MapData, FlowKey, FlowValue>,
    devmap: DevMapHash<MapData>,
    reasons: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuArray<MapData, TrafficCounters>,
    ups_stats: PerCpuArray<MapData, TrafficCounters>,
}

fn typed<T>(name: &'static str, map: Map) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(map).map_err(map_err(name, "checking type and key/value sizes"))
}

fn sum_counters(values: &PerCpuValues<TrafficCounters>) -> TrafficCounters {
    values
        .iter()
        .fold(TrafficCounters::default(), |a, v| TrafficCounters {
            fwd_packets: a.fwd_packets.wrapping_add(v.fwd_packets),
            fwd_bytes: a.fwd_bytes.wrapping_add(v.fwd_bytes),
            rev_packets: a.rev_packets.wrapping_add(v.rev_packets),
            rev_bytes: a.rev_bytes.wrapping_add(v.rev_bytes),
            new_flows: a.new_flows.wrapping_add(v.new_flows),
        })
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(path, source)| DatapathError::Cpus { path, source })
}

impl Maps {
    fn from_source(mut take: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            config: typed(MAP_CONFIG, take(MAP_CONFIG)?)?,
            services: typed(MAP_SERVICES, take(MAP_SERVICES)?)?,
            upstreams: typed(MAP_UPSTREAMS, take(MAP_UPSTREAMS)?)?,
            maglev: typed(MAP_MAGLEV, take(MAP_MAGLEV)?)?,
            flows_fwd: typed(MAP_FLOWS_FWD, take(MAP_FLOWS_FWD)?)?,
            flows_rev: typed(MAP_FLOWS_REV, take(MAP_FLOWS_REV)?)?,
            devmap: typed(MAP_DEVMAP, take(MAP_DEVMAP)?)?,
            reasons: typed(MAP_REASONS, take(MAP_REASONS)?)?,
            svc_stats: typed(MAP_SERVICE_STATS, take(MAP_SERVICE_STATS)?)?,
            ups_stats: typed(MAP_UPSTREAM_STATS, take(MAP_UPSTREAM_STATS)?)?,
        })
    }

    /// Open the maps pinned under `<pin_dir>/v<ABI_VERSION>/` (no program needed).
    ///
    /// # Errors
    /// [`DatapathError::NoPinDir`] when the directory does not exist; map errors naming the path.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let dir = versioned_pin_dir(pin_dir);
        if !dir.is_dir() {
            return Err(DatapathError::NoPinDir { path: dir });
        }
        Self::from_source(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
                path: path.clone(),
                source,
            })?;
            Map::from_map_data(data).map_err(|source| DatapathError::OpenPinned { path, source })
        })
    }

    /// `XP_CONFIG[0]`.
    ///
    /// # Errors
    /// Map lookup failure.
    pub fn nat_config(&self) -> Result<NatConfig> {
        self.config
            .get(&0, 0)
            .map_err(map_err(MAP_CONFIG, "lookup 0"))
    }

    /// Every `XP_SERVICES` entry.
    ///
    /// # Errors
    /// Map iteration failure.
    pub fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        self.services
            .iter()
            .take(MAX_SERVICES as usize * 2)
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_SERVICES, "iterate"))
    }

    /// Active `XP_UPSTREAMS` slots.
    ///
    /// # Errors
    /// Map lookup failure.
    pub fn upstream_slots(&self) -> Result<Vec<(u32, UpstreamValue)>> {
        let mut out = Vec::new();
        for id in 1..MAX_UPSTREAMS {
            let v = self
                .upstreams
                .get(&id, 0)
                .map_err(map_err(MAP_UPSTREAMS, format!("lookup {id}")))?;
            if v.flags & UPSTREAM_F_ACTIVE != 0 {
                out.push((id, v));
            }
        }
        Ok(out)
    }

    /// Every reason counter, summed over CPUs.
    ///
    /// # Errors
    /// Map lookup failure.
    pub fn reasons(&self) -> Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|r| {
                let idx = *r as u32;
                let v = self
                    .reasons
                    .get(&idx, 0)
                    .map_err(map_err(MAP_REASONS, format!("lookup {idx}")))?;
                Ok((*r, v.iter().fold(0u64, |a, b| a.wrapping_add(*b))))
            })
            .collect()
    }

    /// Counters of every service id `0..MAX_SERVICES`, summed over CPUs.
    ///
    /// # Errors
    /// Map lookup failure.
    pub fn service_counters(&self) -> Result<Vec<(u32, TrafficCounters)>> {
        (0..MAX_SERVICES)
            .map(|id| {
                let v = self
                    .svc_stats
                    .get(&id, 0)
                    .map_err(map_err(MAP_SERVICE_STATS, format!("lookup {id}")))?;
                Ok((id, sum_counters(&v)))
            })
            .collect()
    }

    /// Counters of every upstream id `0..MAX_UPSTREAMS`, summed over CPUs.
    ///
    /// # Errors
    /// Map lookup failure.
    pub fn upstream_counters(&self) -> Result<Vec<(u32, TrafficCounters)>> {
        (0..MAX_UPSTREAMS)
            .map(|id| {
                let v = self
                    .ups_stats
                    .get(&id, 0)
                    .map_err(map_err(MAP_UPSTREAM_STATS, format!("lookup {id}")))?;
                Ok((id, sum_counters(&v)))
            })
            .collect()
    }

    /// Capacity (max entries) of the forward flow table as the kernel has it: a pinned table
    /// keeps its size across restarts even when `max_flows` changed.
    ///
    /// # Errors
    /// Map info failure.
    pub fn flow_capacity(&self) -> Result<u32> {
        let info = IterableMap::map(&self.flows_fwd)
            .info()
            .map_err(map_err(MAP_FLOWS_FWD, "info"))?;
        Ok(info.max_entries())
    }

    /// The Maglev table of service `id` (`MAGLEV_SIZE` upstream ids).
    ///
    /// # Errors
    /// Map lookup failure.
    pub fn maglev_table(&self, id: u32) -> Result<Vec<u32>> {
        let base = id * MAGLEV_SIZE;
        (0..MAGLEV_SIZE)
            .map(|slot| {
                self.maglev
                    .get(&(base + slot), 0)
                    .map_err(map_err(MAP_MAGLEV, format!("lookup {}", base + slot)))
            })
            .collect()
    }

    /// The devmap's keys (ifindexes).
    ///
    /// # Errors
    /// Map iteration failure.
    pub fn devmap_ifindexes(&self) -> Result<Vec<u32>> {
        self.devmap
            .keys()
            .take(proxy_common::MAX_INTERFACES as usize * 2)
            .collect::<Result<_, _>>()
            .map_err(map_err(MAP_DEVMAP, "iterate"))
    }

    fn lookup_rev(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.flows_rev.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_FLOWS_REV, "lookup")(e)),
        }
    }

    /// Up to `limit` forward flows with their reverse entries.
    ///
    /// # Errors
    /// Map iteration or lookup failure.
    pub fn flows(&self, limit: usize) -> Result<Vec<FlowEntry>> {
        let fwd: Vec<(FlowKey, FlowValue)> = self
            .flows_fwd
            .iter()
            .take(limit)
            .collect::<Result<_, _>>()
            .map_err(map_err(MAP_FLOWS_FWD, "iterate"))?;
        fwd.into_iter()
            .map(|(key, fwd)| {
                let rev = self.lookup_rev(&flows::peer_key(&key, &fwd))?;
                Ok(FlowEntry { key, fwd, rev })
            })
            .collect()
    }

    /// Delete idle flows (both entries) per `lifetimes`; scans at most `max_scan` entries of
    /// each table (a bound: entries the datapath adds during the scan can make iteration
    /// restart).
    ///
    /// # Errors
    /// Map iteration, lookup or delete failure.
    pub fn expire_flows(
        &mut self,
        now_ns: u64,
        lifetimes: &Lifetimes,
        max_scan: usize,
    ) -> Result<ExpiryStats> {
        let mut stats = ExpiryStats::default();
        let entries = self.flows(max_scan)?;
        stats.scanned = entries.len();
        let mut fwd_keys = HashSet::with_capacity(entries.len());
        let mut doomed = Vec::new();
        for e in &entries {
            fwd_keys.insert(e.key);
            if flows::decide(&e.key, &e.fwd, e.rev.as_ref(), now_ns, lifetimes) == Decision::Expire
            {
                doomed.push((e.key, flows::peer_key(&e.key, &e.fwd)));
            }
        }
        for (fwd, rev) in &doomed {
            remove_flow(&mut self.flows_fwd, MAP_FLOWS_FWD, fwd)?;
            remove_flow(&mut self.flows_rev, MAP_FLOWS_REV, rev)?;
        }
        stats.expired = doomed.len();
        // Reverse entries whose forward entry is gone.
        let revs: Vec<(FlowKey, FlowValue)> = self
            .flows_rev
            .iter()
            .take(max_scan)
            .collect::<Result<_, _>>()
            .map_err(map_err(MAP_FLOWS_REV, "iterate"))?;
        for (key, value) in revs {
            let fwd_key = flows::peer_key(&key, &value);
            if fwd_keys.contains(&fwd_key) {
                continue;
            }
            // Not in our snapshot: it may be new since; check the table itself.
            match self.flows_fwd.get(&fwd_key, 0) {
                Ok(_) => continue,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_FLOWS_FWD, "lookup")(e)),
            }
            if flows::decide(&key, &value, None, now_ns, lifetimes) == Decision::Expire {
                remove_flow(&mut self.flows_rev, MAP_FLOWS_REV, &key)?;
                stats.orphans_expired += 1;
            }
        }
        Ok(stats)
    }

    /// Write `plan` into the maps, and `ifindexes` into the devmap. Order: upstream slots, Maglev
    /// tables, services, then removal of what the plan no longer has, and `XP_CONFIG` (with
    /// `CONFIG_F_READY`) last.
    ///
    /// # Errors
    /// The first failing map operation.
    pub fn apply(&mut self, plan: &Plan, ifindexes: &[u32]) -> Result<()> {
        let old_services = self.services()?;
        let old_upstreams = self.upstream_slots()?;
        let cpus = nr_cpus()?;
        let zero_counters = || {
            PerCpuValues::try_from(vec![TrafficCounters::default(); cpus]).map_err(|source| {
                DatapathError::Cpus {
                    path: "per-CPU values",
                    source,
                }
            })
        };

        // 1. Upstream slots (new ones get fresh counters).
        for (id, addr) in &plan.upstreams {
            let value = upstream_value(*addr);
            let kept = old_upstreams.iter().any(|(i, v)| i == id && *v == value);
            if !kept {
                self.upstreams
                    .set(*id, value, 0)
                    .map_err(map_err(MAP_UPSTREAMS, format!("set {id}")))?;
                self.ups_stats
                    .set(*id, zero_counters()?, 0)
                    .map_err(map_err(MAP_UPSTREAM_STATS, format!("zero {id}")))?;
            }
        }
        // 2. Maglev tables.
        for s in &plan.services {
            let base = s.value.id * MAGLEV_SIZE;
            for (slot, up) in (0u32..).zip(&s.table) {
                let idx = base + slot;
                self.maglev
                    .set(idx, *up, 0)
                    .map_err(map_err(MAP_MAGLEV, format!("set {idx}")))?;
            }
        }
        // 3. Services (new ids get fresh counters).
        for s in &plan.services {
            let kept = old_services
                .iter()
                .any(|(k, v)| *k == s.key && v.id == s.value.id);
            if !kept {
                self.svc_stats
                    .set(s.value.id, zero_counters()?, 0)
                    .map_err(map_err(MAP_SERVICE_STATS, format!("zero {}", s.value.id)))?;
            }
            self.services
                .insert(s.key, s.value, 0)
                .map_err(map_err(MAP_SERVICES, format!("insert {}", s.listen)))?;
        }
        // 4. Services no longer configured: out of the match map, tables cleared.
        let live_ids: HashSet<u32> = plan.services.iter().map(|s| s.value.id).collect();
        for (key, value) in &old_services {
            if plan.services.iter().any(|s| s.key == *key) {
                continue;
            }
            match self.services.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_SERVICES, "remove")(e)),
            }
            if !live_ids.contains(&value.id) && value.id < MAX_SERVICES {
                let base = value.id * MAGLEV_SIZE;
                for slot in 0..MAGLEV_SIZE {
                    self.maglev
                        .set(base + slot, 0, 0)
                        .map_err(map_err(MAP_MAGLEV, format!("clear {}", base + slot)))?;
                }
            }
        }
        // 5. Upstream slots no longer used (after no table points at them).
        for (id, _) in &old_upstreams {
            if !plan.upstreams.iter().any(|(i, _)| i == id) {
                self.upstreams
                    .set(*id, UpstreamValue::default(), 0)
                    .map_err(map_err(MAP_UPSTREAMS, format!("clear {id}")))?;
            }
        }
        // 6. Devmap: exactly the attached interfaces.
        let old_dev = self.devmap_ifindexes()?;
        for ifindex in ifindexes {
            self.devmap
                .insert(*ifindex, *ifindex, None, 0)
                .map_err(|source| DatapathError::XdpMap {
                    map: MAP_DEVMAP,
                    op: format!("insert {ifindex}"),
                    source,
                })?;
        }
        for ifindex in old_dev {
            if !ifindexes.contains(&ifindex) {
                match self.devmap.remove(ifindex) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(MAP_DEVMAP, format!("remove {ifindex}"))(e)),
                }
            }
        }
        // 7. Ready.
        self.config
            .set(0, plan.nat, 0)
            .map_err(map_err(MAP_CONFIG, "set 0"))?;
        Ok(())
    }
}

fn remove_flow(
    map: &mut HashMap<MapData, FlowKey, FlowValue>,
    name: &'static str,
    key: &FlowKey,
) -> Result<()> {
    match map.remove(key) {
        // Already gone (LRU eviction or the datapath) is fine.
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(map_err(name, "delete")(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// The loaded program.
// ---------------------------------------------------------------------------------------------

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Driver (native) XDP.
    Native,
    /// Generic (skb) XDP.
    Generic,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

impl AttachMode {
    const fn xdp_mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }
}

/// One attachment.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    link: XdpLinkId,
}

/// The loaded XDP object, its maps and its attachments.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    attachments: Vec<Attachment>,
}

/// The kernel's index of interface `name`.
///
/// # Errors
/// [`DatapathError::Interface`] when there is no such interface.
pub fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|source| DatapathError::Interface {
        name: name.to_owned(),
        source,
    })
}

/// Max entries of an already pinned map, if one is pinned at `path`.
fn pinned_max_entries(path: &Path) -> Option<u32> {
    let data = MapData::from_pin(path).ok()?;
    data.info().ok().map(|i| i.max_entries())
}

impl Datapath {
    /// Load the embedded object with its maps pinned under `<pin_dir>/v<ABI_VERSION>/` (the
    /// directory must exist on a bpffs: [`ensure_bpffs`]); maps already pinned there are reused
    /// as they are. `max_flows` sizes new flow tables.
    ///
    /// # Errors
    /// Object, map or program load failures.
    pub fn load(object: &[u8], pin_dir: &Path, max_flows: u32) -> Result<Self> {
        if object.is_empty() {
            return Err(DatapathError::EmptyObject);
        }
        let dir = versioned_pin_dir(pin_dir);
        for name in [MAP_FLOWS_FWD, MAP_FLOWS_REV] {
            if let Some(pinned) = pinned_max_entries(&dir.join(name))
                && pinned != max_flows
            {
                tracing::warn!(
                    map = name,
                    pinned,
                    configured = max_flows,
                    "keeping the pinned flow table (its flows survive); to resize it, stop \
                     the daemon and remove {}",
                    dir.join(name).display()
                );
            }
        }
        let paths: Vec<(&'static str, PathBuf)> =
            PINNED_MAPS.iter().map(|n| (*n, dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&dir)
            .map_max_entries(MAP_FLOWS_FWD, max_flows)
            .map_max_entries(MAP_FLOWS_REV, max_flows);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(|source| DatapathError::Load {
            pin_dir: dir.clone(),
            source: Box::new(source),
        })?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DatapathError::NoProgram)?
            .try_into()
            .map_err(|source| DatapathError::Program {
                op: "not an XDP program",
                source: Box::new(source),
            })?;
        program.load().map_err(|source| DatapathError::Program {
            op: "load (verifier)",
            source: Box::new(source),
        })?;
        let maps =
            Maps::from_source(|name| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name)))?;
        Ok(Self {
            ebpf,
            maps,
            attachments: Vec::new(),
        })
    }

    /// The aya-log reader of the program's log records, when the program logs.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!(error = %e, "no eBPF log reader");
                None
            }
        }
    }

    fn program(&mut self) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DatapathError::NoProgram)?
            .try_into()
            .map_err(|source| DatapathError::Program {
                op: "not an XDP program",
                source: Box::new(source),
            })
    }

    /// Attach to `interface` per `mode` (auto: native, else generic). `userspace` is the caller's
    /// business (nothing to attach): it attaches natively here.
    ///
    /// # Errors
    /// Unknown interface, or the attach failed (in both modes for auto).
    pub fn attach(&mut self, interface: &str, mode: DatapathMode) -> Result<AttachMode> {
        let index = ifindex(interface)?;
        let tries: &[AttachMode] = match mode {
            DatapathMode::Generic => &[AttachMode::Generic],
            DatapathMode::Auto => &[AttachMode::Native, AttachMode::Generic],
            DatapathMode::Native | DatapathMode::Userspace => &[AttachMode::Native],
        };
        let mut last = None;
        for m in tries {
            match self.program()?.attach_to_if_index(index, m.xdp_mode()) {
                Ok(link) => {
                    self.attachments.push(Attachment {
                        interface: interface.to_owned(),
                        ifindex: index,
                        mode: *m,
                        link,
                    });
                    return Ok(*m);
                }
                Err(source) => {
                    if tries.len() > 1 {
                        tracing::warn!(interface, mode = %m, error = %source, "XDP attach failed");
                    }
                    last = Some(DatapathError::Attach {
                        iface: interface.to_owned(),
                        mode: *m,
                        source: Box::new(source),
                    });
                }
            }
        }
        Err(last.unwrap_or(DatapathError::NoProgram))
    }

    /// The current attachments.
    #[must_use]
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Detach from every interface; the pinned maps stay. Returns the failures (the remaining
    /// attachments are still detached).
    pub fn detach_all(&mut self) -> Vec<(String, DatapathError)> {
        let mut failures = Vec::new();
        let attachments = std::mem::take(&mut self.attachments);
        for a in attachments {
            let result = self.program().and_then(|p| {
                p.detach(a.link).map_err(|source| DatapathError::Program {
                    op: "detach",
                    source: Box::new(source),
                })
            });
            match result {
                Ok(()) => tracing::info!(interface = %a.interface, mode = %a.mode, "XDP detached"),
                Err(e) => failures.push((a.interface, e)),
            }
        }
        failures
    }
}
