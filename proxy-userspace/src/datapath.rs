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
        Array, DevMapHash, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray,
        PerCpuHashMap, PerCpuValues,
        lpm_trie::{Key as LpmKey, LpmTrie},
        xdp::XdpMapError,
    },
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use nix::{
    fcntl::{Flock, FlockArg},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use proxy_common::{
    ABI_VERSION, ACL_HIT, ACL_PREFIX_BASE, AclKey, FlowKey, FlowValue, MAGLEV_SIZE, MAP_ACL_ALLOW,
    MAP_ACL_DENY, MAP_CONFIG, MAP_DEVMAP, MAP_FLOWS_FWD, MAP_FLOWS_REV, MAP_MAGLEV, MAP_RATE,
    MAP_REASONS, MAP_SERVICE_OPTIONS, MAP_SERVICE_STATS, MAP_SERVICES, MAP_UPSTREAM_STATS,
    MAP_UPSTREAMS, MAP_XMIT_DROPS, MAX_SERVICES, MAX_UPSTREAMS, NatConfig, PROGRAM_BULK_TX,
    PROGRAM_DEVMAP_XMIT, PROGRAM_NAME, Reason, ServiceKey, ServiceOptions, ServiceValue,
    TrafficCounters, UPSTREAM_F_ACTIVE, UpstreamValue,
};

/// `BPF_NOEXIST` (uapi `linux/bpf.h`): insert only when the key is absent.
const BPF_NOEXIST: u64 = 1;

use crate::{
    flows::{self, Decision, Lifetimes},
    plan::{MapOp, Plan, upstream_value},
};

/// Every map the daemon pins, in one list.
pub const PINNED_MAPS: [&str; 15] = [
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
    MAP_SERVICE_OPTIONS,
    MAP_ACL_ALLOW,
    MAP_ACL_DENY,
    MAP_RATE,
    MAP_XMIT_DROPS,
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
    #[error(
        "pinned map {} has {what} {pinned}, but this build of xdp-proxy expects {expected}: it \
         was left by an incompatible build (same layout version v{ABI_VERSION}, different \
         layout) and is not reused, so it is never misread. Stop any daemon using it, then \
         remove {} (its flows and counters are lost), or point datapath.pin_dir at a fresh \
         directory",
        path.display(),
        dir.display()
    )]
    IncompatiblePin {
        path: PathBuf,
        dir: PathBuf,
        what: &'static str,
        pinned: u32,
        expected: u32,
    },
    #[error("parsing the embedded XDP object: {0}")]
    Object(#[source] Box<aya_obj::ParseError>),
    #[error("pinned XDP link {}: {op}: {source}", path.display())]
    Link {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Box<LinkError>,
    },
    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
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
// Layout of pinned maps.
// ---------------------------------------------------------------------------------------------

/// Refuse maps pinned under `<pin_dir>/v<ABI_VERSION>/` whose type, key size, value size or
/// capacity differ from the maps of `object` (aya reuses a pinned map as it is, without
/// comparing layouts). The flow tables may differ in capacity only (`max_flows` changed: the
/// pinned size is kept). Maps not pinned yet are fine (they are created).
///
/// # Errors
/// [`DatapathError::IncompatiblePin`] naming the map, the field and both values; errors opening
/// a pinned object that is not a map; an unparsable object.
pub fn check_pinned_layout(object: &[u8], pin_dir: &Path) -> Result<()> {
    let obj = aya_obj::Object::parse(object).map_err(|e| DatapathError::Object(Box::new(e)))?;
    let dir = versioned_pin_dir(pin_dir);
    for name in PINNED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(want) = obj.maps.get(name) else {
            return Err(DatapathError::MissingMap(name));
        };
        let info =
            aya::maps::MapInfo::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
                path: path.clone(),
                source,
            })?;
        let pinned_type = info
            .map_type()
            .map_err(|source| DatapathError::OpenPinned {
                path: path.clone(),
                source,
            })? as u32;
        let flow_table = name == MAP_FLOWS_FWD || name == MAP_FLOWS_REV;
        let checks = [
            ("map type", pinned_type, want.map_type(), true),
            ("key size", info.key_size(), want.key_size(), true),
            ("value size", info.value_size(), want.value_size(), true),
            (
                "max entries",
                info.max_entries(),
                want.max_entries(),
                !flow_table,
            ),
        ];
        for (what, pinned, expected, enforced) in checks {
            if enforced && pinned != expected {
                return Err(DatapathError::IncompatiblePin {
                    path,
                    dir,
                    what,
                    pinned,
                    expected,
                });
            }
        }
    }
    Ok(())
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
    /// Due flows the datapath reused between the re-read and the delete (a client port's new
    /// SYN): their forward entry was put back and both entries kept.
    pub revived: usize,
}

/// Flows left in the forward table after the last expiry scan, in total and per service and
/// upstream id (a by-product of the scan: read by the metrics, never computed per scrape).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCensus {
    /// Whether a scan has run since the daemon started.
    pub scanned: bool,
    pub total: u64,
    pub per_service: std::collections::BTreeMap<u32, u64>,
    pub per_upstream: std::collections::BTreeMap<u32, u64>,
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
    svc_opts: Array<MapData, ServiceOptions>,
    acl_allow: LpmTrie<MapData, AclKey, u32>,
    acl_deny: LpmTrie<MapData, AclKey, u32>,
    /// `None`: pins left by a daemon from before the map existed.
    xmit_drops: Option<PerCpuHashMap<MapData, u32, u64>>,
    census: FlowCensus,
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
            svc_opts: typed(MAP_SERVICE_OPTIONS, take(MAP_SERVICE_OPTIONS)?)?,
            acl_allow: typed(MAP_ACL_ALLOW, take(MAP_ACL_ALLOW)?)?,
            acl_deny: typed(MAP_ACL_DENY, take(MAP_ACL_DENY)?)?,
            xmit_drops: match take(MAP_XMIT_DROPS) {
                Ok(m) => Some(typed(MAP_XMIT_DROPS, m)?),
                Err(_) => None,
            },
            census: FlowCensus::default(),
        })
    }

    /// The flows counted by the last [`Maps::expire_flows`] scan.
    #[must_use]
    pub fn census(&self) -> &FlowCensus {
        &self.census
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

    /// Frames the kernel failed to transmit after the program sent them, per egress ifindex,
    /// summed over CPUs (`XP_XMIT_DROPS`, written by the `xdp` tracepoint programs). `None`
    /// when the pins have no such map (a daemon from before it existed).
    ///
    /// # Errors
    /// Map iteration failure.
    pub fn xmit_drops(&self) -> Result<Option<std::collections::BTreeMap<u32, u64>>> {
        let Some(m) = &self.xmit_drops else {
            return Ok(None);
        };
        let mut out = std::collections::BTreeMap::new();
        for entry in m.iter() {
            let (ifindex, per_cpu) = entry.map_err(map_err(MAP_XMIT_DROPS, "iterate"))?;
            out.insert(
                ifindex,
                per_cpu.iter().copied().fold(0_u64, u64::saturating_add),
            );
        }
        Ok(Some(out))
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
        // The scan above is a snapshot; by now the datapath may have reused a doomed flow (a
        // new SYN from a closed flow's client port reuses its entries, docs/datapath.md step 8:
        // flags cleared in both entries). Client ports come back exactly when the TIME_WAIT hold
        // ends, i.e. when the flow becomes due, so the reuse and this delete meet by design (the
        // long soak showed it as resets of fresh connections). Per flow: re-read and decide
        // again; delete the forward entry; then re-read the reverse entry: if the datapath
        // touched it since the re-read (a reuse SYN changes its flags), the flow is alive:
        // put the forward entry back and keep both. A SYN that arrives after the forward delete
        // simply makes a new flow (its SNAT probe skips the old reverse key while it exists),
        // so deleting an untouched reverse entry afterwards is safe.
        let mut expired = Vec::with_capacity(doomed.len());
        for (fwd, rev) in doomed {
            let f = match self.flows_fwd.get(&fwd, 0) {
                Ok(f) => f,
                Err(MapError::KeyNotFound) => {
                    // Gone already (LRU eviction or the datapath's repair rule).
                    remove_flow(&mut self.flows_rev, MAP_FLOWS_REV, &rev)?;
                    expired.push(fwd);
                    continue;
                }
                Err(e) => return Err(map_err(MAP_FLOWS_FWD, "lookup")(e)),
            };
            let r = self.flows_rev.get(&rev, 0).ok();
            if flows::decide(&fwd, &f, r.as_ref(), now_ns, lifetimes) != Decision::Expire {
                continue;
            }
            remove_flow(&mut self.flows_fwd, MAP_FLOWS_FWD, &fwd)?;
            let r_after = self.flows_rev.get(&rev, 0).ok();
            if let Some(r_after) = r_after.filter(|ra| Some(*ra) != r) {
                let revived = FlowValue {
                    flags: r_after.flags,
                    last_seen_ns: f.last_seen_ns.max(now_ns),
                    ..f
                };
                // Err: a new flow took the forward key meanwhile (with its own SNAT port), so
                // the old reverse entry is nobody's now: delete it below.
                if self.flows_fwd.insert(fwd, revived, BPF_NOEXIST).is_ok() {
                    stats.revived += 1;
                    continue;
                }
            }
            remove_flow(&mut self.flows_rev, MAP_FLOWS_REV, &rev)?;
            expired.push(fwd);
        }
        stats.expired = expired.len();
        let mut census = FlowCensus {
            scanned: true,
            ..FlowCensus::default()
        };
        let doomed_keys: HashSet<FlowKey> = expired.into_iter().collect();
        for e in &entries {
            if doomed_keys.contains(&e.key) {
                continue;
            }
            census.total += 1;
            *census.per_service.entry(e.fwd.service_id).or_default() += 1;
            *census.per_upstream.entry(e.fwd.upstream_id).or_default() += 1;
        }
        self.census = census;
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

impl Maps {
    /// Apply map writes computed by [`crate::plan::diff`], in their order.
    ///
    /// # Errors
    /// The first failing map operation (the writes before it stay).
    pub fn apply_ops(&mut self, ops: &[MapOp]) -> Result<()> {
        let cpus = nr_cpus()?;
        let zero = || {
            PerCpuValues::try_from(vec![TrafficCounters::default(); cpus]).map_err(|source| {
                DatapathError::Cpus {
                    path: "per-CPU values",
                    source,
                }
            })
        };
        for op in ops {
            match op {
                MapOp::SetUpstream { id, addr, fresh } => {
                    if *fresh {
                        self.ups_stats
                            .set(*id, zero()?, 0)
                            .map_err(map_err(MAP_UPSTREAM_STATS, format!("zero {id}")))?;
                    }
                    self.upstreams
                        .set(*id, upstream_value(*addr), 0)
                        .map_err(map_err(MAP_UPSTREAMS, format!("set {id}")))?;
                }
                MapOp::ClearUpstream { id } => self
                    .upstreams
                    .set(*id, UpstreamValue::default(), 0)
                    .map_err(map_err(MAP_UPSTREAMS, format!("clear {id}")))?,
                MapOp::SetService { key, value, fresh } => {
                    if *fresh {
                        self.svc_stats
                            .set(value.id, zero()?, 0)
                            .map_err(map_err(MAP_SERVICE_STATS, format!("zero {}", value.id)))?;
                    }
                    self.services
                        .insert(key, value, 0)
                        .map_err(map_err(MAP_SERVICES, format!("insert id {}", value.id)))?;
                }
                MapOp::RemoveService { key } => match self.services.remove(key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(MAP_SERVICES, "remove")(e)),
                },
                MapOp::SetMaglev { service_id, slots } => {
                    let base = service_id * MAGLEV_SIZE;
                    for (slot, up) in slots {
                        let idx = base + slot;
                        self.maglev
                            .set(idx, *up, 0)
                            .map_err(map_err(MAP_MAGLEV, format!("set {idx}")))?;
                    }
                }
                MapOp::SetNat(nat) => self
                    .config
                    .set(0, *nat, 0)
                    .map_err(map_err(MAP_CONFIG, "set 0"))?,
            }
        }
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

/// How an attachment is held.
#[derive(Debug)]
enum Held {
    /// A bpf_link pinned at `path`: it stays attached while the pin exists, also after this
    /// process dies (`kill -9`, crash, SIGQUIT exit).
    Pinned { link: FdLink, path: PathBuf },
    /// A netlink attachment (kernels without bpf_link for XDP): cannot be pinned; owned by the
    /// program.
    Netlink(XdpLinkId),
}

/// One attachment.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    /// Found pinned at start (left by an earlier daemon) and switched to this daemon's program.
    pub adopted: bool,
    held: Held,
    /// The kernel's drop counters of the interface when this daemon attached (`None`: they
    /// could not be read), so `/status` can show what was lost since.
    pub delivery_at_attach: Option<crate::netdev::Delivery>,
}

impl Attachment {
    /// Where the attachment's link is pinned (`None` for a netlink attachment).
    #[must_use]
    pub fn pin_path(&self) -> Option<&Path> {
        match &self.held {
            Held::Pinned { path, .. } => Some(path),
            Held::Netlink(_) => None,
        }
    }
}

/// The loaded XDP object, its maps and its attachments.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    attachments: Vec<Attachment>,
    /// `<pin_dir>/v<ABI_VERSION>`.
    dir: PathBuf,
    /// Set by [`Datapath::detach_all`] and [`Datapath::leave_attached`]: nothing left for Drop.
    released: bool,
    /// The `xdp` tracepoint programs that count frames lost after the program sent them are
    /// attached (they live as long as this object: not pinned, a restart attaches anew).
    pub delivery_traced: bool,
}

/// Where the kernel's tracing file system is looked for (aya's order); the first is where it is
/// mounted when neither has it.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Make tracefs reachable for the tracepoint attach: on a normal host systemd mounts it at
/// `/sys/kernel/tracing`; a daemon in a private mount namespace with a fresh /sys (`ip netns
/// exec`) has none, and mounts one there (it dies with the process, as that /sys does).
fn ensure_tracefs() -> std::result::Result<(), String> {
    let populated = |p: &str| {
        std::fs::read_dir(p)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    if TRACEFS.iter().any(|p| populated(p)) {
        return Ok(());
    }
    nix::mount::mount(
        Some("tracefs"),
        TRACEFS[0],
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("mounting tracefs at {}: {e}", TRACEFS[0]))
}

/// Load and attach the tracepoint programs of `delivery.rs` (the program's comment says what
/// they count). Never fatal: without them `/status` and `/metrics` still show the device
/// counters, and a warning says what is missing.
fn attach_delivery_tracepoints(ebpf: &mut Ebpf) -> bool {
    let attach = |ebpf: &mut Ebpf, prog: &'static str, event: &'static str| {
        let tp: &mut aya::programs::TracePoint = ebpf
            .program_mut(prog)
            .ok_or_else(|| format!("no program {prog} in the object"))?
            .try_into()
            .map_err(|e| format!("{prog}: {e}"))?;
        tp.load().map_err(|e| format!("{prog}: load: {e}"))?;
        tp.attach("xdp", event)
            .map_err(|e| format!("{prog}: attaching to xdp:{event}: {e}"))?;
        Ok::<_, String>(())
    };
    let result = ensure_tracefs()
        .and_then(|()| attach(ebpf, PROGRAM_DEVMAP_XMIT, "xdp_devmap_xmit"))
        .and_then(|()| attach(ebpf, PROGRAM_BULK_TX, "xdp_bulk_tx"));
    match result {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(
                why = %why,
                "frames the kernel fails to transmit after the XDP program sent them cannot be \
                 counted (xdp tracepoints unavailable): a black hole behind the program shows \
                 only in the device counters"
            );
            false
        }
    }
}

fn delivery_of(maps: &Maps, ifindex: u32) -> Option<crate::netdev::Delivery> {
    let mut d = crate::netdev::delivery::read(ifindex).ok()?;
    d.xdp_xmit_drops = maps
        .xmit_drops()
        .ok()
        .flatten()
        .and_then(|m| m.get(&ifindex).copied())
        .unwrap_or(0);
    Some(d)
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

/// Name of the program's pin: `<pin_dir>/v<ABI_VERSION>/prog_proxy_xdp`.
pub const PROGRAM_PIN: &str = "prog_proxy_xdp";

/// `<pin_dir>/v<ABI_VERSION>/link_<mode>_<interface>`: where the XDP link of `interface` is
/// pinned. bpffs refuses `.` in names, so bytes other than `A-Za-z0-9_-` are written `%XX`.
#[must_use]
pub fn link_pin_path(pin_dir: &Path, mode: AttachMode, interface: &str) -> PathBuf {
    versioned_pin_dir(pin_dir).join(link_pin_name(mode, interface))
}

fn link_pin_name(mode: AttachMode, interface: &str) -> String {
    use std::fmt::Write as _;
    let mut name = format!("link_{mode}_");
    for b in interface.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            name.push(char::from(b));
        } else {
            let _ = write!(name, "%{b:02X}");
        }
    }
    name
}

fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Fs {
            op: "unpinning",
            path: path.to_owned(),
            source,
        }),
    }
}

impl Datapath {
    /// Load the embedded object with its maps pinned under `<pin_dir>/v<ABI_VERSION>/` (the
    /// directory must exist on a bpffs: [`ensure_bpffs`]); maps already pinned there are reused
    /// as they are, after [`check_pinned_layout`] has refused incompatible ones. `max_flows`
    /// sizes new flow tables. The program is pinned too (`prog_proxy_xdp`, replacing an older
    /// pin), so tools find the running program.
    ///
    /// # Errors
    /// Object, layout, map or program load failures.
    pub fn load(object: &[u8], pin_dir: &Path, max_flows: u32) -> Result<Self> {
        if object.is_empty() {
            return Err(DatapathError::EmptyObject);
        }
        check_pinned_layout(object, pin_dir)?;
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
        let prog_pin = dir.join(PROGRAM_PIN);
        remove_pin(&prog_pin)?;
        program
            .pin(&prog_pin)
            .map_err(|source| DatapathError::Pin {
                path: prog_pin,
                source: Box::new(source),
            })?;
        let delivery_traced = attach_delivery_tracepoints(&mut ebpf);
        let maps =
            Maps::from_source(|name| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name)))?;
        Ok(Self {
            ebpf,
            maps,
            attachments: Vec::new(),
            dir,
            released: false,
            delivery_traced,
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

    /// Attach to `interface` in `mode`. The caller chose the mode for the whole host
    /// (`daemon::host_mode`: one mode on every interface, native only where it delivers).
    ///
    /// An XDP link already pinned for `interface` in `mode` (left by an earlier daemon: `kill
    /// -9`, a crash, or a SIGQUIT exit for an upgrade) is adopted: its program is replaced by
    /// this daemon's atomically (`bpf_link_update`: no packet sees an interface without a
    /// program, and the pinned maps carry every flow across). A pinned link in the other mode is
    /// detached first (the host's mode changed: a peer lost GRO, the config names another
    /// mode); the pinned maps keep the flows, packets arriving between the two see no program.
    /// A pinned link whose interface is gone is removed and a new attachment made. Otherwise a
    /// new bpf_link is created and pinned at [`link_pin_path`].
    ///
    /// # Errors
    /// Unknown interface, or the attach failed.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<AttachMode> {
        let index = ifindex(interface)?;
        if let Some(m) = self.adopt(interface, index, mode)? {
            return Ok(m);
        }
        match self.program()?.attach_to_if_index(index, mode.xdp_mode()) {
            Ok(link) => {
                let held = self.hold(interface, index, mode, link)?;
                self.attachments.push(Attachment {
                    interface: interface.to_owned(),
                    ifindex: index,
                    mode,
                    adopted: false,
                    held,
                    delivery_at_attach: delivery_of(&self.maps, index),
                });
                Ok(mode)
            }
            Err(source) => Err(DatapathError::Attach {
                iface: interface.to_owned(),
                mode,
                source: Box::new(source),
            }),
        }
    }

    /// Pin a new attachment when it is a bpf_link. aya falls back to netlink silently when the
    /// kernel refuses bpf_link (before 5.9); such an attachment cannot be pinned: it is
    /// re-attached (netlink replaces the program with itself) so the program owns it again.
    fn hold(
        &mut self,
        interface: &str,
        index: u32,
        mode: AttachMode,
        id: XdpLinkId,
    ) -> Result<Held> {
        let path = self.dir.join(link_pin_name(mode, interface));
        let link = self
            .program()?
            .take_link(id)
            .map_err(|source| DatapathError::Program {
                op: "taking the XDP link",
                source: Box::new(source),
            })?;
        let Ok(link) = FdLink::try_from(link) else {
            tracing::warn!(
                interface,
                "XDP attached through netlink (this kernel refused a bpf_link): the attachment \
                 cannot be pinned, so it does not outlive the daemon (a restart is a short outage)"
            );
            let id = self
                .program()?
                .attach_to_if_index(index, mode.xdp_mode())
                .map_err(|source| DatapathError::Attach {
                    iface: interface.to_owned(),
                    mode,
                    source: Box::new(source),
                })?;
            return Ok(Held::Netlink(id));
        };
        remove_pin(&path)?;
        let pinned = link.pin(&path).map_err(|source| DatapathError::Pin {
            path: path.clone(),
            source: Box::new(source),
        })?;
        Ok(Held::Pinned {
            link: FdLink::from(pinned),
            path,
        })
    }

    /// Adopt a pinned link of `interface` (see [`Datapath::attach`]).
    fn adopt(
        &mut self,
        interface: &str,
        index: u32,
        wanted: AttachMode,
    ) -> Result<Option<AttachMode>> {
        // This layout's pins first, then links left by a daemon of another layout version (an
        // upgrade that changed the map layout): those are switched to this program too, so the
        // interface never goes without one (the old layout's flows cannot carry over).
        let mut candidates = Vec::new();
        for dir in self.layout_dirs() {
            for m in [AttachMode::Native, AttachMode::Generic] {
                candidates.push((dir.join(link_pin_name(m, interface)), m, dir != self.dir));
            }
        }
        for (path, m, other_layout) in candidates {
            if !path.exists() {
                continue;
            }
            let link_err = |op: &'static str, path: &Path| {
                let path = path.to_owned();
                move |source| DatapathError::Link {
                    path,
                    op,
                    source: Box::new(source),
                }
            };
            let pinned = PinnedLink::from_pin(&path).map_err(link_err("opening", &path))?;
            if m != wanted {
                // Unpinned, then its last descriptor closed: the kernel detaches it at once
                // (closing a link's last fd releases it synchronously), so the attach in the
                // other mode does not find the interface taken.
                remove_pin(&path)?;
                drop(pinned);
                tracing::warn!(
                    interface,
                    pinned = %m,
                    mode = %wanted,
                    pin = %path.display(),
                    "detached the pinned XDP link of the other mode: this start runs every \
                     interface in one mode; flows are kept in the pinned maps"
                );
                continue;
            }
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(link_err("not an XDP link", &path))?;
            match self.program()?.attach_to_link(link) {
                Ok(id) => {
                    let link =
                        self.program()?
                            .take_link(id)
                            .map_err(|source| DatapathError::Program {
                                op: "taking the adopted XDP link",
                                source: Box::new(source),
                            })?;
                    let link =
                        FdLink::try_from(link).map_err(link_err("keeping the link", &path))?;
                    let (link, path) = if other_layout {
                        let new_path = self.dir.join(link_pin_name(m, interface));
                        remove_pin(&new_path)?;
                        let pinned = link.pin(&new_path).map_err(|source| DatapathError::Pin {
                            path: new_path.clone(),
                            source: Box::new(source),
                        })?;
                        remove_pin(&path)?;
                        tracing::warn!(
                            interface,
                            old = %path.display(),
                            new = %new_path.display(),
                            "adopted an XDP link pinned by a daemon of another map layout: the \
                             interface kept a program throughout, but flows of the old layout \
                             are lost; its maps stay in the old directory until removed"
                        );
                        (FdLink::from(pinned), new_path)
                    } else {
                        (link, path)
                    };
                    tracing::info!(
                        interface,
                        mode = %m,
                        pin = %path.display(),
                        "adopted the pinned XDP link: program replaced atomically, flows kept"
                    );
                    self.attachments.push(Attachment {
                        interface: interface.to_owned(),
                        ifindex: index,
                        mode: m,
                        adopted: true,
                        held: Held::Pinned { link, path },
                        delivery_at_attach: delivery_of(&self.maps, index),
                    });
                    return Ok(Some(m));
                }
                Err(ProgramError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOLINK) =>
                {
                    tracing::warn!(
                        interface,
                        pin = %path.display(),
                        "the pinned XDP link is defunct (its interface was removed): unpinned, \
                         attaching anew"
                    );
                    remove_pin(&path)?;
                }
                Err(source) => {
                    return Err(DatapathError::Program {
                        op: "replacing the program of a pinned XDP link",
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(None)
    }

    /// `<pin_dir>/v<ABI_VERSION>` first, then every other `<pin_dir>/v<N>` that exists.
    fn layout_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.dir.clone()];
        if let Some(parent) = self.dir.parent()
            && let Ok(entries) = std::fs::read_dir(parent)
        {
            let mut others: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.strip_prefix('v')
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                        && e.path() != self.dir
                })
                .map(|e| e.path())
                .collect();
            others.sort();
            dirs.extend(others);
        }
        dirs
    }

    /// Unpin (and so detach) every pinned XDP link under the pin directory that belongs to none
    /// of `interfaces` (an interface dropped from the config since the last start, whose link
    /// was left attached by a SIGQUIT exit or a crash). Call after attaching the configured
    /// interfaces. Returns the pins removed.
    ///
    /// # Errors
    /// Reading the pin directory or removing a pin.
    pub fn release_stale_links(&self, interfaces: &[String]) -> Result<Vec<PathBuf>> {
        let keep: HashSet<String> = interfaces
            .iter()
            .flat_map(|i| [AttachMode::Native, AttachMode::Generic].map(|m| link_pin_name(m, i)))
            .collect();
        let mut removed = Vec::new();
        for dir in self.layout_dirs() {
            let entries = std::fs::read_dir(&dir).map_err(|source| DatapathError::Fs {
                op: "listing",
                path: dir.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // Other layouts' links of configured interfaces were adopted (moved) already.
                if name.starts_with("link_") && (dir != self.dir || !keep.contains(&name)) {
                    let path = entry.path();
                    remove_pin(&path)?;
                    tracing::info!(
                        pin = %path.display(),
                        "XDP link of an interface no longer configured: unpinned (detached)"
                    );
                    removed.push(path);
                }
            }
        }
        Ok(removed)
    }

    /// The current attachments.
    #[must_use]
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The delivery counters of interface `ifindex`: the kernel's device counters and the
    /// frames the `xdp` tracepoints saw it fail to transmit (`None`: the device counters
    /// could not be read).
    #[must_use]
    pub fn delivery(&self, ifindex: u32) -> Option<crate::netdev::Delivery> {
        delivery_of(&self.maps, ifindex)
    }

    /// Stop: detach from every interface (unpin and release each link) and unpin the program;
    /// the pinned maps stay (the next start keeps the flows that are still alive). Returns the
    /// failures (the remaining attachments are still detached).
    pub fn detach_all(&mut self) -> Vec<(String, DatapathError)> {
        self.released = true;
        let mut failures = self.detach_interfaces();
        if let Err(e) = remove_pin(&self.dir.join(PROGRAM_PIN)) {
            failures.push((PROGRAM_PIN.to_owned(), e));
        }
        failures
    }

    /// Detach from every interface (unpin and release each link), keeping the program and its
    /// maps loaded and pinned: for attaching again in another mode. Returns the failures.
    pub fn detach_interfaces(&mut self) -> Vec<(String, DatapathError)> {
        let mut failures = Vec::new();
        let attachments = std::mem::take(&mut self.attachments);
        for a in attachments {
            let result = match a.held {
                Held::Pinned { link, path } => {
                    let r = remove_pin(&path);
                    // Closing the last descriptor of an unpinned link detaches it.
                    drop(link);
                    r
                }
                Held::Netlink(id) => self.program().and_then(|p| {
                    p.detach(id).map_err(|source| DatapathError::Program {
                        op: "detach",
                        source: Box::new(source),
                    })
                }),
            };
            match result {
                Ok(()) => tracing::info!(interface = %a.interface, mode = %a.mode, "XDP detached"),
                Err(e) => failures.push((a.interface, e)),
            }
        }
        failures
    }

    /// Exit for a restart or upgrade: leave every pinned link attached (with the pinned program
    /// and maps the fast path keeps forwarding every flow without a daemon) for the next start
    /// to adopt. Returns the pin paths left behind. Netlink attachments cannot outlive the
    /// process unowned and are detached (warned).
    pub fn leave_attached(&mut self) -> Vec<PathBuf> {
        self.released = true;
        let mut left = Vec::new();
        for a in std::mem::take(&mut self.attachments) {
            match a.held {
                Held::Pinned { path, .. } => left.push(path),
                Held::Netlink(id) => {
                    tracing::warn!(
                        interface = %a.interface,
                        "netlink XDP attachment cannot be left behind: detaching"
                    );
                    if let Ok(p) = self.program() {
                        let _ = p.detach(id);
                    }
                }
            }
        }
        left
    }
}

impl Drop for Datapath {
    /// Unwinding from an error or panic: links this daemon pinned itself are unpinned (it
    /// failed, so it should not leave new attachments behind); adopted links stay attached, as
    /// they were before this daemon started.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        for a in &self.attachments {
            if let (false, Held::Pinned { path, .. }) = (a.adopted, &a.held) {
                let _ = remove_pin(path);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-service fast-path options (docs/datapath.md steps 7 and 9).
// ---------------------------------------------------------------------------------------------

impl Maps {
    /// Write every l4 service's fast-path options: `XP_SVC_OPTS[id]` (ids found in
    /// `XP_SERVICES` by the service's listen address, port and protocol, so this runs after the
    /// services are written), and the exact set of allow/deny prefixes into the ACL tries (new
    /// ones inserted before stale ones are removed). Ids without a configured service get
    /// all-zero options. Cheap (64 array writes plus the ACL difference): safe to call after
    /// every reconcile.
    ///
    /// # Errors
    /// The first failing map operation.
    pub fn set_service_options(&mut self, config: &crate::config::Config) -> Result<()> {
        let ids: std::collections::HashMap<ServiceKey, u32> = self
            .services()?
            .into_iter()
            .map(|(k, v)| (k, v.id))
            .collect();
        let mut opts = vec![ServiceOptions::default(); MAX_SERVICES as usize];
        let mut allow = HashSet::new();
        let mut deny = HashSet::new();
        for (_, s) in config.l4_services() {
            let key = crate::plan::service_key(s.listen, s.protocol);
            let Some(&id) = ids.get(&key) else { continue };
            let Some(slot) = opts.get_mut(id as usize) else {
                continue;
            };
            *slot = s.fast.options();
            let acl_key = |c: &crate::config::IpCidr| {
                let (addr, family) = crate::plan::map_addr(c.network);
                (
                    ACL_PREFIX_BASE + u32::from(c.prefix_len),
                    AclKey {
                        service_id: id.to_be_bytes(),
                        family,
                        addr,
                        _pad: [0; 3],
                    },
                )
            };
            allow.extend(s.fast.allow.iter().map(acl_key));
            deny.extend(s.fast.deny.iter().map(acl_key));
        }
        for (id, o) in (0u32..).zip(opts) {
            self.svc_opts
                .set(id, o, 0)
                .map_err(map_err(MAP_SERVICE_OPTIONS, format!("set {id}")))?;
        }
        for (trie, want, name) in [
            (&mut self.acl_deny, &deny, MAP_ACL_DENY),
            (&mut self.acl_allow, &allow, MAP_ACL_ALLOW),
        ] {
            let have: HashSet<(u32, AclKey)> = trie
                .keys()
                .filter_map(|k| k.ok())
                .map(|k| (k.prefix_len(), k.data()))
                .collect();
            for (len, data) in want.difference(&have) {
                trie.insert(&LpmKey::new(*len, *data), ACL_HIT, 0)
                    .map_err(map_err(name, "insert"))?;
            }
            for (len, data) in have.difference(want) {
                match trie.remove(&LpmKey::new(*len, *data)) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(name, "remove")(e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod link_pin_tests {
    use super::*;

    #[test]
    fn link_pin_names_are_bpffs_safe() {
        assert_eq!(
            link_pin_path(
                Path::new("/sys/fs/bpf/xdp-proxy"),
                AttachMode::Native,
                "ens5"
            ),
            Path::new(&format!(
                "/sys/fs/bpf/xdp-proxy/v{ABI_VERSION}/link_native_ens5"
            ))
        );
        // bpffs refuses '.' in names: a VLAN interface name is escaped.
        assert_eq!(
            link_pin_name(AttachMode::Generic, "eth0.100"),
            "link_generic_eth0%2E100"
        );
        assert_eq!(
            link_pin_name(AttachMode::Native, "a_b-c"),
            "link_native_a_b-c"
        );
    }
}
