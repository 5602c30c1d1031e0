//! The daemon's metadata file: what the maps cannot hold (service names, which services use an
//! upstream, the daemon's version), written by the daemon after it fills the maps and read by
//! `inspect` when present.
//!
//! Where: a bpffs holds only BPF objects (no regular files), so the file cannot live inside the
//! pin directory. It lives in [`META_DIR`] (`/run/xdp-proxy`, a tmpfs: gone at reboot, like the
//! pins), named after the pin directory (see [`file_name`]), so daemons with different
//! `pin_dir`s never share one. Written atomically (temporary file, then rename).

use std::{
    collections::BTreeMap,
    io,
    path::{Component, Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// Directory of the metadata files.
pub const META_DIR: &str = "/run/xdp-proxy";
/// Format version of the file: bumped when a field changes meaning or goes away.
pub const META_FORMAT: u32 = 1;

/// One service as the daemon configured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaService {
    pub id: u32,
    pub name: String,
    pub listen: String,
    pub proto: String,
}

/// One upstream slot and the services that use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaUpstream {
    pub id: u32,
    pub addr: String,
    pub services: Vec<String>,
}

/// The file's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// [`META_FORMAT`] of the writer.
    pub format: u32,
    /// The map layout version (`proxy_common::ABI_VERSION`) of the writer.
    pub abi: u32,
    /// The daemon's package version.
    pub daemon_version: String,
    pub pin_dir: PathBuf,
    /// PID of the daemon that wrote it.
    pub pid: u32,
    pub services: Vec<MetaService>,
    pub upstreams: Vec<MetaUpstream>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a metadata file: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{}: metadata format {found} written by xdp-proxy {daemon}, this xdp-proxy ({ours}) reads \
         format {META_FORMAT}: the daemon is of another version; use the xdp-proxy binary of the \
         running daemon",
        path.display(),
        ours = env!("CARGO_PKG_VERSION")
    )]
    Version {
        path: PathBuf,
        found: u64,
        daemon: String,
    },
}

/// The pin directory as an absolute path without `.`, empty or trailing components (`..` is
/// kept: no file system access here).
#[must_use]
pub fn normalize(pin_dir: &Path) -> PathBuf {
    let abs = if pin_dir.is_absolute() {
        pin_dir.to_owned()
    } else {
        std::env::current_dir().map_or_else(|_| pin_dir.to_owned(), |cwd| cwd.join(pin_dir))
    };
    abs.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// File name for a pin directory: the normalized path without its leading `/`, each `/` turned
/// into `-`, bytes other than `A-Z a-z 0-9 _ .` written `%XX` (so `-` is `%2D` and no two
/// directories share a name), then `.json`. `/sys/fs/bpf/xdp-proxy` ->
/// `sys-fs-bpf-xdp%2Dproxy.json`.
#[must_use]
pub fn file_name(pin_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    let norm = normalize(pin_dir);
    let bytes = norm.as_os_str().as_bytes();
    let bytes = bytes.strip_prefix(b"/").unwrap_or(bytes);
    let mut out = String::new();
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("%2E"),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' => out.push(char::from(*b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out.push_str(".json");
    out
}

/// `<dir>/<file_name(pin_dir)>`.
#[must_use]
pub fn path_in(dir: &Path, pin_dir: &Path) -> PathBuf {
    dir.join(file_name(pin_dir))
}

/// The metadata of a plan the daemon just wrote into the maps.
#[must_use]
pub fn from_plan(plan: &Plan, pin_dir: &Path) -> Metadata {
    let mut users: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for s in &plan.services {
        let mut ids: Vec<u32> = s.table.iter().copied().filter(|id| *id != 0).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            users.entry(id).or_default().push(s.name.clone());
        }
    }
    let mut services: Vec<MetaService> = plan
        .services
        .iter()
        .map(|s| MetaService {
            id: s.value.id,
            name: s.name.clone(),
            listen: s.listen.to_string(),
            proto: s.protocol.name().to_owned(),
        })
        .collect();
    services.sort_by_key(|s| s.id);
    let mut upstreams: Vec<MetaUpstream> = plan
        .upstreams
        .iter()
        .map(|(id, addr)| MetaUpstream {
            id: *id,
            addr: addr.to_string(),
            services: users.get(id).cloned().unwrap_or_default(),
        })
        .collect();
    upstreams.sort_by_key(|u| u.id);
    Metadata {
        format: META_FORMAT,
        abi: proxy_common::ABI_VERSION,
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        pin_dir: normalize(pin_dir),
        pid: std::process::id(),
        services,
        upstreams,
    }
}

/// Write `meta` into `dir` (created if missing) atomically; returns the file's path.
///
/// # Errors
/// mkdir, write or rename failures, naming the path.
pub fn write(dir: &Path, meta: &Metadata) -> Result<PathBuf, MetaError> {
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| MetaError::Io { op, path, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let path = path_in(dir, &meta.pin_dir);
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name(&meta.pin_dir),
        std::process::id()
    ));
    let text = serde_json::to_string_pretty(meta).map_err(|source| MetaError::Parse {
        path: path.clone(),
        source,
    })? + "\n";
    std::fs::write(&tmp, text).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming into", &path))?;
    Ok(path)
}

/// Remove the files in `dir` left for pins that are gone: the writer's PID no longer runs and
/// its `<pin_dir>/v<ABI>` no longer exists (a bpffs unmounted, a test lab torn down). Files of
/// running daemons and of surviving pins stay. Returns the removed paths; errors are skipped.
pub fn prune(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let (Some(pin_dir), Some(pid)) = (
            v.get("pin_dir").and_then(serde_json::Value::as_str),
            v.get("pid").and_then(serde_json::Value::as_u64),
        ) else {
            continue;
        };
        let abi = v
            .get("abi")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(u64::from(proxy_common::ABI_VERSION));
        let running = Path::new("/proc").join(pid.to_string()).exists();
        let pins = Path::new(pin_dir).join(format!("v{abi}")).exists();
        if !running && !pins && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The daemon's call after it wrote a plan: write the metadata for `pin_dir` into [`META_DIR`]
/// (and [`prune`] the files of pins that are gone). A failure is logged, never fatal (inspect
/// then shows ids without names).
pub fn publish(plan: &Plan, pin_dir: &Path) {
    for path in prune(Path::new(META_DIR)) {
        tracing::debug!(path = %path.display(), "removed the metadata of pins that are gone");
    }
    match write(Path::new(META_DIR), &from_plan(plan, pin_dir)) {
        Ok(path) => tracing::debug!(path = %path.display(), "metadata for inspect written"),
        Err(e) => {
            tracing::warn!(error = %e, "metadata for inspect not written: inspect shows ids without names")
        }
    }
}

/// Read the metadata of `pin_dir` from `dir`: `Ok(None)` when there is none.
///
/// # Errors
/// Unreadable or malformed file; [`MetaError::Version`] when its format is not ours.
pub fn read(dir: &Path, pin_dir: &Path) -> Result<Option<Metadata>, MetaError> {
    let path = path_in(dir, pin_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MetaError::Io {
                op: "reading",
                path,
                source,
            });
        }
    };
    let parse = |source| MetaError::Parse {
        path: path.clone(),
        source,
    };
    // The format first, so a file of another version is named as such, not as malformed.
    let value: serde_json::Value = serde_json::from_str(&text).map_err(parse)?;
    let found = value
        .get("format")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if found != u64::from(META_FORMAT) {
        return Err(MetaError::Version {
            path,
            found,
            daemon: value
                .get("daemon_version")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("(unknown)")
                .to_owned(),
        });
    }
    serde_json::from_value(value).map(Some).map_err(parse)
}

/// Names looked up by id (empty without metadata).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub services: BTreeMap<u32, String>,
    pub upstream_users: BTreeMap<u32, Vec<String>>,
}

impl Names {
    #[must_use]
    pub fn from_meta(meta: Option<&Metadata>) -> Self {
        let Some(m) = meta else {
            return Self::default();
        };
        Self {
            services: m.services.iter().map(|s| (s.id, s.name.clone())).collect(),
            upstream_users: m
                .upstreams
                .iter()
                .map(|u| (u.id, u.services.clone()))
                .collect(),
        }
    }

    #[must_use]
    pub fn service(&self, id: u32) -> Option<&str> {
        self.services.get(&id).map(String::as_str)
    }

    /// The id of the service named `name`.
    #[must_use]
    pub fn service_id(&self, name: &str) -> Option<u32> {
        self.services
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(id, _)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_readable_and_distinct() {
        assert_eq!(
            file_name(Path::new("/sys/fs/bpf/xdp-proxy")),
            "sys-fs-bpf-xdp%2Dproxy.json"
        );
        assert_eq!(
            file_name(Path::new("/sys/fs/bpf/xdp-proxy/")),
            "sys-fs-bpf-xdp%2Dproxy.json"
        );
        assert_eq!(file_name(Path::new("/a/./b")), "a-b.json");
        assert_ne!(
            file_name(Path::new("/a-b/c")),
            file_name(Path::new("/a/b-c"))
        );
        assert_eq!(file_name(Path::new("/.x y")), "%2Ex%20y.json");
    }

    fn meta() -> Metadata {
        Metadata {
            format: META_FORMAT,
            abi: 1,
            daemon_version: "0.1.0".into(),
            pin_dir: PathBuf::from("/p/x"),
            pid: 7,
            services: vec![MetaService {
                id: 2,
                name: "web".into(),
                listen: "10.0.0.1:80".into(),
                proto: "tcp".into(),
            }],
            upstreams: vec![MetaUpstream {
                id: 1,
                addr: "10.20.0.2:80".into(),
                services: vec!["web".into()],
            }],
        }
    }

    #[test]
    fn write_read_and_version_mismatch() {
        let dir = std::env::temp_dir().join(format!("xdp-proxy-meta-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read(&dir, Path::new("/p/x")).unwrap(), None);
        let path = write(&dir, &meta()).unwrap();
        assert_eq!(path, dir.join("p-x.json"));
        let back = read(&dir, Path::new("/p/x/")).unwrap().unwrap();
        assert_eq!(back, meta());
        let names = Names::from_meta(Some(&back));
        assert_eq!(names.service(2), Some("web"));
        assert_eq!(names.service_id("web"), Some(2));
        assert_eq!(names.service_id("nope"), None);

        std::fs::write(
            &path,
            r#"{"format": 2, "daemon_version": "9.9.9", "new": []}"#,
        )
        .unwrap();
        let err = read(&dir, Path::new("/p/x")).unwrap_err();
        assert!(matches!(err, MetaError::Version { found: 2, .. }), "{err}");
        assert!(
            err.to_string().contains("written by xdp-proxy 9.9.9"),
            "{err}"
        );
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(
            read(&dir, Path::new("/p/x")).unwrap_err(),
            MetaError::Parse { .. }
        ));

        // Pruning: only a file whose writer is gone and whose pins are gone goes.
        let pins = dir.join("pins");
        std::fs::create_dir_all(pins.join("v1")).unwrap();
        let gone_pid = u32::MAX - 1;
        let alive = Metadata {
            pin_dir: dir.join("nowhere"),
            pid: std::process::id(),
            ..meta()
        };
        let kept_pins = Metadata {
            pin_dir: pins.clone(),
            pid: gone_pid,
            ..meta()
        };
        let stale = Metadata {
            pin_dir: dir.join("gone"),
            pid: gone_pid,
            ..meta()
        };
        for m in [&alive, &kept_pins, &stale] {
            write(&dir, m).unwrap();
        }
        let removed = prune(&dir);
        assert_eq!(removed, [path_in(&dir, &stale.pin_dir)]);
        assert!(
            path_in(&dir, &alive.pin_dir).exists() && path_in(&dir, &kept_pins.pin_dir).exists()
        );
        assert!(path.exists(), "unparsable files are left alone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
