//! The inspect side's access to the pinned maps.
//!
//! Reading the typed contents goes through `datapath::Maps::open_pinned` (one definition of how
//! the maps are typed and summed). This module adds what only the CLI needs: the checks that
//! turn a missing, foreign or unreadable pin directory into a clear error, the kernel's
//! metadata of every pin (`inspect maps`), and the two operator deletions (`flows flush`,
//! `flows delete`), which are the only writes the CLI ever makes. It uses aya directly because
//! those are generic over whatever is pinned (`datapath` types exactly the maps it loads).
//!
//! Read-only opening: BPF_OBJ_GET can open a pin with BPF_F_RDONLY, but aya 0.14 exposes no
//! flags for it and this crate forbids `unsafe` (a raw bpf(2) call). `inspect` is read-only by
//! construction instead: its code path holds the maps immutably and calls only lookups,
//! iterations and BPF_OBJ_GET_INFO_BY_FD.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::maps::{Array, DevMapHash, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use proxy_common::{
    ABI_VERSION, FlowKey, FlowValue, MAP_CONFIG, MAP_DEVMAP, MAP_FLOWS_FWD, MAP_FLOWS_REV,
    MAP_MAGLEV, MAP_REASONS, MAP_SERVICE_STATS, MAP_SERVICES, MAP_UPSTREAM_STATS, MAP_UPSTREAMS,
    NatConfig, ServiceKey, ServiceValue, TrafficCounters, UpstreamValue,
};

use super::{
    InspectError, SCHEMA_VERSION,
    report::{MapRow, MapValues, MapsReport, OtherPin},
};
use crate::datapath::{DatapathError, Maps, versioned_pin_dir};

fn io_err(op: &'static str, path: &Path, source: io::Error) -> InspectError {
    if source.kind() == io::ErrorKind::PermissionDenied {
        InspectError::PermissionDenied {
            path: path.to_owned(),
            source,
        }
    } else {
        InspectError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// Other layout versions pinned beside ours (`v<N>` directories), sorted.
fn other_versions(pin_dir: &Path) -> Result<Vec<String>, InspectError> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", pin_dir, e)),
    };
    let ours = format!("v{ABI_VERSION}");
    let mut found: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            *n != ours
                && n.len() > 1
                && n.starts_with('v')
                && n[1..].bytes().all(|b| b.is_ascii_digit())
        })
        .collect();
    found.sort();
    Ok(found)
}

/// `<pin_dir>/v<ABI_VERSION>`, after checking it exists and can be read.
///
/// # Errors
/// [`InspectError::NoPinDir`], [`InspectError::LayoutVersion`] (only another version's
/// directory is there), [`InspectError::PermissionDenied`].
pub fn check_pin_dir(pin_dir: &Path) -> Result<PathBuf, InspectError> {
    let dir = versioned_pin_dir(pin_dir);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(InspectError::NoPinDir {
                path: dir,
                others: Vec::new(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let others = other_versions(pin_dir)?;
            if others.is_empty() {
                return Err(InspectError::NoPinDir { path: dir, others });
            }
            return Err(InspectError::LayoutVersion {
                pin_dir: pin_dir.to_owned(),
                found: others,
            });
        }
        Err(e) => return Err(io_err("reading", &dir, e)),
    }
    // Listing needs read permission: a clearer error than a failing BPF_OBJ_GET later.
    std::fs::read_dir(&dir).map_err(|e| io_err("listing", &dir, e))?;
    Ok(dir)
}

/// Turn a datapath error met while opening or reading pins into the CLI's classes.
#[must_use]
pub fn classify(e: DatapathError) -> InspectError {
    let permission = |s: &MapError| match s {
        MapError::SyscallError(sys) => sys.io_error.kind() == io::ErrorKind::PermissionDenied,
        MapError::IoError(io) => io.kind() == io::ErrorKind::PermissionDenied,
        _ => false,
    };
    let missing = |s: &MapError| matches!(s, MapError::SyscallError(sys) if sys.io_error.kind() == io::ErrorKind::NotFound);
    match e {
        DatapathError::OpenPinned { path, source } if permission(&source) => {
            InspectError::PermissionDenied {
                path,
                source: io::Error::from(io::ErrorKind::PermissionDenied),
            }
        }
        DatapathError::OpenPinned { path, source } if missing(&source) => InspectError::Layout {
            detail: format!(
                "{} is missing: the directory was not filled by an xdp-proxy with map \
                     layout v{ABI_VERSION}",
                path.display()
            ),
        },
        DatapathError::Map { map, source, .. }
            if matches!(
                source,
                MapError::InvalidMapType { .. }
                    | MapError::InvalidKeySize { .. }
                    | MapError::InvalidValueSize { .. }
            ) =>
        {
            InspectError::Layout {
                detail: format!(
                    "pinned map {map} does not have the v{ABI_VERSION} type or key/value sizes \
                     ({source})"
                ),
            }
        }
        DatapathError::Map {
            map,
            ref op,
            ref source,
        } if permission(source) => InspectError::PermissionDenied {
            path: PathBuf::from(format!("map {map} ({op})")),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        },
        e @ DatapathError::IncompatiblePin { .. } => InspectError::Layout {
            detail: e.to_string(),
        },
        DatapathError::NoPinDir { path } => InspectError::NoPinDir {
            path,
            others: Vec::new(),
        },
        other => InspectError::Datapath(Box::new(other)),
    }
}

/// Check the directory and the pinned maps' layout against this binary's XDP object (type,
/// key and value size, capacity: the daemon's own check), then open every map (typed).
///
/// # Errors
/// See [`check_pin_dir`] and [`classify`].
pub fn open_maps(pin_dir: &Path) -> Result<Maps, InspectError> {
    check_pin_dir(pin_dir)?;
    // An empty object is a build without the XDP program (AYA_BUILD_SKIP): only the typed open
    // below checks the layout then.
    if !proxy_ebpf_object::EBPF_OBJECT.is_empty() {
        crate::datapath::check_pinned_layout(proxy_ebpf_object::EBPF_OBJECT, pin_dir)
            .map_err(classify)?;
    }
    Maps::open_pinned(pin_dir).map_err(classify)
}

/// Read what the reports need; the Maglev tables only when `tables` (16381 lookups per
/// service).
///
/// # Errors
/// Map reads.
pub fn read_values(maps: &Maps, tables: bool) -> Result<MapValues, InspectError> {
    let services = maps.services().map_err(classify)?;
    let tables = if tables {
        services
            .iter()
            .map(|(_, v)| Ok((v.id, maps.maglev_table(v.id)?)))
            .collect::<Result<Vec<_>, DatapathError>>()
            .map_err(classify)?
    } else {
        Vec::new()
    };
    Ok(MapValues {
        reasons: maps.reasons().map_err(classify)?,
        upstreams: maps.upstream_slots().map_err(classify)?,
        service_counters: maps.service_counters().map_err(classify)?,
        upstream_counters: maps.upstream_counters().map_err(classify)?,
        services,
        tables,
    })
}

// ---------------------------------------------------------------------------------------------
// inspect maps.
// ---------------------------------------------------------------------------------------------

/// `/proc/self/fdinfo/<fd>` as key/value pairs.
fn fdinfo(data: &MapData) -> Vec<(String, String)> {
    let fd = data.fd().as_fd().as_raw_fd();
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// `LruHash` -> `lru_hash`.
fn snake(debug: &str) -> String {
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn count_keys<K: aya::Pod, V: aya::Pod>(map: Map, bound: u64) -> Option<u64> {
    let m = HashMap::<MapData, K, V>::try_from(map).ok()?;
    let mut n = 0u64;
    for k in m.keys() {
        k.ok()?;
        n += 1;
        if n >= bound {
            break;
        }
    }
    Some(n)
}

fn count_array<V: aya::Pod + Default + PartialEq>(map: Map, max: u32) -> Option<u64> {
    let m = Array::<MapData, V>::try_from(map).ok()?;
    let zero = V::default();
    let mut n = 0u64;
    for i in 0..max {
        if m.get(&i, 0).ok()? != zero {
            n += 1;
        }
    }
    Some(n)
}

fn count_percpu<V: aya::Pod + Default + PartialEq>(map: Map, max: u32) -> Option<u64> {
    let m = PerCpuArray::<MapData, V>::try_from(map).ok()?;
    let zero = V::default();
    let mut n = 0u64;
    for i in 0..max {
        let values: PerCpuValues<V> = m.get(&i, 0).ok()?;
        if values.iter().any(|v| *v != zero) {
            n += 1;
        }
    }
    Some(n)
}

/// Used entries of one of our maps (by name); `None` for anything else or a failed read.
fn used_entries(name: &str, map: Map, max: u32) -> Option<u64> {
    // Iteration over a hash map the datapath changes may restart: bounded at twice its size.
    let bound = u64::from(max) * 2;
    match name {
        MAP_SERVICES => count_keys::<ServiceKey, ServiceValue>(map, bound),
        MAP_FLOWS_FWD | MAP_FLOWS_REV => count_keys::<FlowKey, FlowValue>(map, bound),
        MAP_DEVMAP => {
            let m = DevMapHash::<MapData>::try_from(map).ok()?;
            let mut n = 0u64;
            for k in m.keys() {
                k.ok()?;
                n += 1;
                if n >= bound {
                    break;
                }
            }
            Some(n)
        }
        MAP_CONFIG => count_array::<NatConfig>(map, max),
        MAP_UPSTREAMS => count_array::<UpstreamValue>(map, max),
        MAP_MAGLEV => count_array::<u32>(map, max),
        MAP_REASONS => count_percpu::<u64>(map, max),
        MAP_SERVICE_STATS | MAP_UPSTREAM_STATS => count_percpu::<TrafficCounters>(map, max),
        _ => None,
    }
}

/// `inspect maps`: every pin under `<pin_dir>/v<ABI>`, sorted by name.
///
/// # Errors
/// Directory checks; a pin that cannot be opened.
pub fn maps_report(pin_dir: &Path) -> Result<MapsReport, InspectError> {
    let dir = check_pin_dir(pin_dir)?;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| io_err("listing", &dir, e))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let cpus = aya::util::nr_cpus().map_or(1, |n| n) as u64;
    let mut maps = Vec::new();
    let mut other_pins = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let data = match MapData::from_pin(&path) {
            Ok(d) => d,
            Err(MapError::SyscallError(sys))
                if sys.io_error.kind() == io::ErrorKind::PermissionDenied =>
            {
                return Err(InspectError::PermissionDenied {
                    path,
                    source: sys.io_error,
                });
            }
            Err(e) => {
                other_pins.push(OtherPin {
                    name,
                    what: format!("not readable as a map: {e}"),
                });
                continue;
            }
        };
        let info = fdinfo(&data);
        let field = |k: &str| info.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if field("map_type").is_none() {
            let what = if field("link_type").is_some() {
                "a BPF link"
            } else if field("prog_type").is_some() {
                "a BPF program"
            } else {
                "not a map"
            };
            other_pins.push(OtherPin {
                name,
                what: what.to_owned(),
            });
            continue;
        }
        let mi = data.info().map_err(|e| {
            InspectError::Datapath(Box::new(DatapathError::OpenPinned {
                path: path.clone(),
                source: e,
            }))
        })?;
        let map_type = mi.map_type().map_or_else(
            |_| field("map_type").unwrap_or_default(),
            |t| snake(&format!("{t:?}")),
        );
        let (key_size, value_size, max_entries, id) =
            (mi.key_size(), mi.value_size(), mi.max_entries(), mi.id());
        let memlock = field("memlock").and_then(|v| v.parse::<u64>().ok());
        let per_cpu = if map_type.starts_with("per_cpu") {
            cpus
        } else {
            1
        };
        let estimate = u64::from(max_entries)
            * (u64::from(key_size) + u64::from(value_size).div_ceil(8) * 8 * per_cpu);
        let used = Map::from_map_data(data)
            .ok()
            .and_then(|m| used_entries(&name, m, max_entries));
        maps.push(MapRow {
            name,
            map_type,
            id,
            key_size,
            value_size,
            max_entries,
            used_entries: used,
            memory_bytes: memlock.unwrap_or(estimate),
            memory_source: if memlock.is_some() {
                "memlock"
            } else {
                "estimate"
            },
        });
    }
    Ok(MapsReport {
        schema_version: SCHEMA_VERSION,
        kind: "maps",
        dir: dir.display().to_string(),
        maps,
        other_pins,
    })
}

// ---------------------------------------------------------------------------------------------
// Operator deletions.
// ---------------------------------------------------------------------------------------------

fn flow_table(
    dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, FlowKey, FlowValue>, InspectError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| {
        classify(DatapathError::OpenPinned {
            path: path.clone(),
            source,
        })
    })?;
    let map = Map::from_map_data(data).map_err(|source| {
        classify(DatapathError::OpenPinned {
            path: path.clone(),
            source,
        })
    })?;
    HashMap::try_from(map).map_err(|source| {
        classify(DatapathError::Map {
            map: name,
            op: "checking type and key/value sizes".into(),
            source,
        })
    })
}

/// Delete flows: each `(forward key, reverse key)` pair, both entries. An entry already gone
/// (expired, evicted) is not an error. Returns how many forward entries were deleted.
///
/// # Errors
/// Directory checks, opening the tables, a failing delete.
pub fn delete_flows(pin_dir: &Path, flows: &[(FlowKey, FlowKey)]) -> Result<usize, InspectError> {
    let dir = check_pin_dir(pin_dir)?;
    let mut fwd = flow_table(&dir, MAP_FLOWS_FWD)?;
    let mut rev = flow_table(&dir, MAP_FLOWS_REV)?;
    let mut deleted = 0;
    for (f, r) in flows {
        let gone = |name: &'static str, res: Result<(), MapError>| match res {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(classify(DatapathError::Map {
                map: name,
                op: "delete".into(),
                source,
            })),
        };
        if gone(MAP_FLOWS_FWD, fwd.remove(f))? {
            deleted += 1;
        }
        gone(MAP_FLOWS_REV, rev.remove(r))?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        assert_eq!(snake("LruHash"), "lru_hash");
        assert_eq!(snake("PerCpuArray"), "per_cpu_array");
        assert_eq!(snake("Array"), "array");
    }

    #[test]
    fn pin_dir_errors() {
        let base = std::env::temp_dir().join(format!("xdp-proxy-pins-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let err = check_pin_dir(&base).unwrap_err();
        assert!(matches!(err, InspectError::NoPinDir { .. }), "{err}");
        assert_eq!(err.exit_code(), super::super::exit::NO_PIN_DIR);
        let other = format!("v{}", ABI_VERSION + 1);
        std::fs::create_dir_all(base.join(&other)).unwrap();
        std::fs::create_dir_all(base.join("vx")).unwrap();
        let err = check_pin_dir(&base).unwrap_err();
        assert!(
            matches!(&err, InspectError::LayoutVersion { found, .. } if found.len() == 1 && found[0] == other),
            "{err}"
        );
        assert_eq!(err.exit_code(), super::super::exit::LAYOUT);
        let ours = format!("v{ABI_VERSION}");
        std::fs::create_dir_all(base.join(&ours)).unwrap();
        assert_eq!(check_pin_dir(&base).unwrap(), base.join(&ours));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
