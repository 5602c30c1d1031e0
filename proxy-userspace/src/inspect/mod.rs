//! `xdp-proxy inspect` and `xdp-proxy flows`: reports built from the pinned maps (works while
//! the daemon is down), and the two operator deletions.
//!
//! - `render`: human units and aligned tables; `report`, `flowview`, `rates`: the reports and
//!   their tables (pure, snapshot-tested); `meta`: the daemon's metadata file (names);
//!   `pins`: access to the pins and the error classes.
//! - JSON: every report is an object with `schema_version` ([`SCHEMA_VERSION`]) and `kind`;
//!   the fields are documented in docs/inspect-json.md and only ever added to within a version.
//! - Exit codes: [`exit`].

pub mod flowview;
pub mod meta;
pub mod pins;
pub mod rates;
pub mod render;
pub mod report;

use std::{
    io::{self, BufRead as _, IsTerminal as _, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use proxy_common::ABI_VERSION;

use self::{
    flowview::{ClientSel, FlowFilter, FlowState, ServiceSel, UpstreamSel},
    meta::{Metadata, Names},
    rates::Snapshot,
    report::{DaemonInfo, service_listen},
};
use crate::{datapath::DatapathError, flows::peer_key, plan::upstream_addr};

/// Version of every JSON shape `inspect` prints.
pub const SCHEMA_VERSION: u32 = 1;

/// Exit codes of `inspect` and `flows` (docs/inspect-json.md).
pub mod exit {
    /// Any other failure (a map read failed, JSON encoding, ...).
    pub const FAILURE: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// The pin directory (`<pin_dir>/v<ABI_VERSION>`) does not exist.
    pub const NO_PIN_DIR: u8 = 3;
    /// Permission denied reading the pins or the metadata.
    pub const PERMISSION: u8 = 4;
    /// The pins have another map layout version (or do not match this one).
    pub const LAYOUT: u8 = 5;
    /// The daemon's metadata file is of another format version: a daemon of another version.
    pub const DAEMON_VERSION: u8 = 6;
    /// An operator action was refused (no `--yes` without a terminal, or answered no).
    pub const REFUSED: u8 = 7;
    /// `flows delete` found no such flow.
    pub const NO_MATCH: u8 = 8;
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "pin directory {} does not exist{}: is --pin-dir the daemon's datapath.pin_dir, and has \
         the daemon run since the bpffs was mounted?",
        path.display(),
        if others.is_empty() { String::new() } else { format!(" (found {})", others.join(", ")) }
    )]
    NoPinDir { path: PathBuf, others: Vec<String> },
    #[error(
        "permission denied: {}: {source} (inspect needs root, or CAP_BPF with read access to the \
         pins)",
        path.display()
    )]
    PermissionDenied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} holds maps of layout {} but this xdp-proxy reads layout v{ABI_VERSION}: use the \
         xdp-proxy binary of the daemon that pinned them",
        pin_dir.display(),
        found.join(", ")
    )]
    LayoutVersion {
        pin_dir: PathBuf,
        found: Vec<String>,
    },
    #[error("map layout mismatch: {detail}")]
    Layout { detail: String },
    #[error(transparent)]
    Meta(#[from] meta::MetaError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    NoMatch(String),
    #[error("{0}")]
    BadArgument(String),
    #[error(transparent)]
    Datapath(Box<DatapathError>),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the output: {0}")]
    Output(#[source] io::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(#[source] io::Error),
}

impl InspectError {
    /// The process exit code for this error ([`exit`]).
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoPinDir { .. } => exit::NO_PIN_DIR,
            Self::PermissionDenied { .. } => exit::PERMISSION,
            Self::LayoutVersion { .. } | Self::Layout { .. } => exit::LAYOUT,
            Self::Meta(meta::MetaError::Version { .. }) => exit::DAEMON_VERSION,
            Self::Meta(meta::MetaError::Io { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                exit::PERMISSION
            }
            Self::Refused(_) => exit::REFUSED,
            Self::NoMatch(_) => exit::NO_MATCH,
            Self::BadArgument(_) => exit::USAGE,
            _ => exit::FAILURE,
        }
    }
}

type Result<T, E = InspectError> = std::result::Result<T, E>;

/// Where the pins and the metadata are.
#[derive(Clone, Debug)]
pub struct Source {
    pub pin_dir: PathBuf,
    /// Directory of the metadata files ([`meta::META_DIR`]).
    pub meta_dir: PathBuf,
}

impl Source {
    fn meta(&self) -> Result<Option<Metadata>> {
        let m = meta::read(&self.meta_dir, &self.pin_dir)?;
        if let Some(m) = &m
            && m.daemon_version != env!("CARGO_PKG_VERSION")
        {
            // Same metadata format and map layout (both checked): readable, but say so.
            tracing::warn!(
                daemon = %m.daemon_version,
                cli = env!("CARGO_PKG_VERSION"),
                "the maps were written by another xdp-proxy version"
            );
        }
        Ok(m)
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

fn now_ns() -> Result<u64> {
    crate::daemon::monotonic_ns().map_err(InspectError::Clock)
}

/// `inspect stats` (one report).
///
/// # Errors
/// See [`InspectError`].
pub fn stats(src: &Source, as_json: bool) -> Result<String> {
    let maps = pins::open_maps(&src.pin_dir)?;
    let meta = src.meta()?;
    let values = pins::read_values(&maps, false)?;
    let mut r = report::build_stats(
        &values,
        &Names::from_meta(meta.as_ref()),
        DaemonInfo::from_meta(meta.as_ref()),
    );
    r.interfaces = interface_delivery(&maps, r.daemon.as_ref());
    if as_json {
        json(&r)
    } else {
        Ok(report::render_stats(&r))
    }
}

/// Every interface in the devmap, named and with its delivery counters. Interface indexes mean
/// something only in the daemon's network namespace: when the daemon runs in another one than
/// `inspect` (`ip netns exec`, a container), they are read in the daemon's (`/proc/PID/ns/net`,
/// needs `CAP_SYS_ADMIN`; when that fails they are left unknown, null, rather than read from
/// the wrong interfaces). With no daemon running they are read in this namespace.
fn interface_delivery(
    maps: &crate::datapath::Maps,
    daemon: Option<&DaemonInfo>,
) -> Vec<report::InterfaceDelivery> {
    let xmit = maps.xmit_drops().ok().flatten().unwrap_or_default();
    let mut ifindexes = maps.devmap_ifindexes().unwrap_or_default();
    ifindexes.sort_unstable();
    let own = std::path::Path::new("/proc/self/ns/net");
    let daemon_ns = daemon
        .filter(|d| d.running)
        .map(|d| std::path::PathBuf::from(format!("/proc/{}/ns/net", d.pid)));
    let elsewhere = daemon_ns
        .as_deref()
        .is_some_and(|ns| !crate::netdev::peer::same_namespace(ns, own));
    let indexes = ifindexes.clone();
    let read = move || {
        Ok(indexes
            .into_iter()
            .map(|i| crate::netdev::rtnl::link(i).ok())
            .collect::<Vec<_>>())
    };
    let links = if elsewhere {
        crate::netdev::peer::in_namespace(daemon_ns, read).unwrap_or_default()
    } else {
        read().unwrap_or_default()
    };
    ifindexes
        .into_iter()
        .enumerate()
        .map(|(n, ifindex)| {
            let link = links.get(n).cloned().flatten();
            report::InterfaceDelivery {
                ifindex,
                name: link.as_ref().map(|l| l.name.clone()),
                kernel: link.map(|l| crate::netdev::Delivery {
                    xdp_xmit_drops: xmit.get(&ifindex).copied().unwrap_or(0),
                    ..l.stats.into()
                }),
            }
        })
        .collect()
}

fn snapshot(maps: &crate::datapath::Maps) -> Result<Snapshot> {
    let v = pins::read_values(maps, false)?;
    let t_ns = now_ns()?;
    let services = v
        .services
        .iter()
        .map(|(k, s)| {
            let c = v
                .service_counters
                .iter()
                .find(|(id, _)| *id == s.id)
                .map(|(_, c)| *c)
                .unwrap_or_default();
            (s.id, service_listen(k), c)
        })
        .collect::<Vec<_>>();
    let upstreams = v
        .upstreams
        .iter()
        .map(|(id, u)| {
            let c = v
                .upstream_counters
                .iter()
                .find(|(i, _)| i == id)
                .map(|(_, c)| *c)
                .unwrap_or_default();
            (*id, upstream_addr(u).to_string(), c)
        })
        .collect::<Vec<_>>();
    let mut services = services;
    services.sort_by_key(|s| s.0);
    Ok(Snapshot {
        t_ns,
        reasons: v.reasons,
        services,
        upstreams,
    })
}

/// `inspect stats --watch`: every `interval`, the rates since the previous read; stops after
/// `count` refreshes (or never). JSON: one object per line. On a terminal the screen is cleared
/// before each refresh.
///
/// # Errors
/// See [`InspectError`]; writing to `out`.
pub fn watch(
    src: &Source,
    as_json: bool,
    interval: Duration,
    count: Option<u64>,
    out: &mut dyn Write,
    clear: bool,
) -> Result<()> {
    let maps = pins::open_maps(&src.pin_dir)?;
    let names = Names::from_meta(src.meta()?.as_ref());
    let mut before = snapshot(&maps)?;
    let mut done = 0u64;
    while count.is_none_or(|c| done < c) {
        std::thread::sleep(interval);
        let now = snapshot(&maps)?;
        let r = rates::rates(&before, &now, &names);
        let text = if as_json {
            serde_json::to_string(&r)? + "\n"
        } else if clear {
            format!("\x1b[H\x1b[2J{}", rates::render(&r))
        } else {
            format!("{}\n", rates::render(&r))
        };
        out.write_all(text.as_bytes())
            .map_err(InspectError::Output)?;
        out.flush().map_err(InspectError::Output)?;
        before = now;
        done += 1;
    }
    Ok(())
}

/// The `inspect flows` selection.
#[derive(Clone, Debug, Default)]
pub struct FlowQuery {
    pub service: Option<ServiceSel>,
    pub client: Option<ClientSel>,
    pub upstream: Option<UpstreamSel>,
    pub state: Option<FlowState>,
    pub limit: Option<usize>,
}

fn read_flows(
    src: &Source,
    q: &FlowQuery,
) -> Result<(Vec<crate::datapath::FlowEntry>, FlowFilter, Names, u64)> {
    let maps = pins::open_maps(&src.pin_dir)?;
    let names = Names::from_meta(src.meta()?.as_ref());
    let service_id = q
        .service
        .as_ref()
        .map(|s| s.resolve(&names))
        .transpose()
        .map_err(InspectError::BadArgument)?;
    let filter = FlowFilter {
        service_id,
        client: q.client,
        upstream: q.upstream,
        state: q.state,
    };
    let capacity = maps.flow_capacity().map_err(pins::classify)?;
    let entries = maps.flows(capacity as usize * 2).map_err(pins::classify)?;
    Ok((entries, filter, names, now_ns()?))
}

/// `inspect flows`.
///
/// # Errors
/// See [`InspectError`]; an unknown service name is [`InspectError::BadArgument`].
pub fn flows(src: &Source, q: &FlowQuery, as_json: bool) -> Result<String> {
    let (entries, filter, names, now) = read_flows(src, q)?;
    let r = flowview::build(&entries, now, &filter, q.limit, &names);
    if as_json {
        json(&r)
    } else {
        Ok(flowview::render(&r))
    }
}

/// `inspect services`.
///
/// # Errors
/// See [`InspectError`].
pub fn services(src: &Source, as_json: bool) -> Result<String> {
    let maps = pins::open_maps(&src.pin_dir)?;
    let names = Names::from_meta(src.meta()?.as_ref());
    let r = report::build_services(&pins::read_values(&maps, true)?, &names);
    if as_json {
        json(&r)
    } else {
        Ok(report::render_services(&r))
    }
}

/// `inspect upstreams`.
///
/// # Errors
/// See [`InspectError`].
pub fn upstreams(src: &Source, as_json: bool) -> Result<String> {
    let maps = pins::open_maps(&src.pin_dir)?;
    let names = Names::from_meta(src.meta()?.as_ref());
    let r = report::build_upstreams(&pins::read_values(&maps, true)?, &names);
    if as_json {
        json(&r)
    } else {
        Ok(report::render_upstreams(&r))
    }
}

/// `inspect maps`.
///
/// # Errors
/// See [`InspectError`].
pub fn maps(src: &Source, as_json: bool) -> Result<String> {
    let r = pins::maps_report(&src.pin_dir)?;
    if as_json {
        json(&r)
    } else {
        Ok(report::render_maps(&r))
    }
}

// ---------------------------------------------------------------------------------------------
// Operator actions.
// ---------------------------------------------------------------------------------------------

/// Ask before a destructive action: go on with `--yes`; otherwise only on a terminal, and only
/// when the answer is `y` or `yes`.
///
/// # Errors
/// [`InspectError::Refused`].
pub fn confirm(
    what: &str,
    yes: bool,
    is_terminal: bool,
    ask: impl FnOnce(&str) -> io::Result<String>,
) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !is_terminal {
        return Err(InspectError::Refused(format!(
            "{what}: stdin is not a terminal, so nobody can confirm; add --yes"
        )));
    }
    let answer = ask(&format!("{what}. Continue? [y/N] ")).map_err(InspectError::Output)?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(InspectError::Refused(format!("{what}: not confirmed")))
    }
}

/// Prompt on stderr, read one line from stdin.
fn ask_stdin(prompt: &str) -> io::Result<String> {
    let mut err = io::stderr();
    err.write_all(prompt.as_bytes())?;
    err.flush()?;
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line)?;
    Ok(line)
}

fn delete_matching(src: &Source, q: &FlowQuery, what: &str, yes: bool) -> Result<String> {
    let (entries, filter, names, _) = read_flows(src, q)?;
    let doomed: Vec<_> = entries
        .iter()
        .filter(|e| filter.matches(&flowview::Flow::from_entry(e, 0)))
        .map(|e| (e.key, peer_key(&e.key, &e.fwd)))
        .collect();
    let service = filter
        .service_id
        .map(|id| {
            names
                .service(id)
                .map_or_else(|| format!("id {id}"), |n| format!("`{n}` (id {id})"))
        })
        .unwrap_or_default();
    if doomed.is_empty() {
        return Err(InspectError::NoMatch(format!(
            "no flow of service {service} matches {what}"
        )));
    }
    confirm(
        &format!(
            "about to delete {} flow(s) of service {service} {what} (both entries each; TCP \
             connections are reset at their next packet)",
            doomed.len()
        ),
        yes,
        io::stdin().is_terminal(),
        ask_stdin,
    )?;
    let n = pins::delete_flows(&src.pin_dir, &doomed)?;
    Ok(format!("deleted {n} flow(s) of service {service}\n"))
}

/// `flows flush --service S`: delete every flow of a service.
///
/// # Errors
/// See [`InspectError`]; no flow at all is not an error (prints 0).
pub fn flush(src: &Source, service: &ServiceSel, yes: bool) -> Result<String> {
    let q = FlowQuery {
        service: Some(service.clone()),
        ..FlowQuery::default()
    };
    match delete_matching(src, &q, "(flush)", yes) {
        Err(InspectError::NoMatch(_)) => Ok("no flows to delete\n".to_owned()),
        other => other,
    }
}

/// `flows delete --client ADDR:PORT --service S`: delete one flow.
///
/// # Errors
/// See [`InspectError`]; [`InspectError::NoMatch`] when there is no such flow.
pub fn delete(
    src: &Source,
    client: std::net::SocketAddr,
    service: &ServiceSel,
    yes: bool,
) -> Result<String> {
    let q = FlowQuery {
        service: Some(service.clone()),
        client: Some(ClientSel::Exact(client)),
        ..FlowQuery::default()
    };
    delete_matching(src, &q, &format!("from client {client}"), yes)
}

/// The default metadata directory as a path.
#[must_use]
pub fn default_meta_dir() -> PathBuf {
    Path::new(meta::META_DIR).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmation_rules() {
        let never = |_: &str| -> io::Result<String> { panic!("must not ask") };
        assert!(confirm("x", true, false, never).is_ok());
        let err = confirm("delete 3 flows", false, false, never).unwrap_err();
        assert_eq!(err.exit_code(), exit::REFUSED);
        assert!(err.to_string().contains("not a terminal"), "{err}");
        assert!(
            confirm("x", false, true, |p| {
                assert!(p.ends_with("[y/N] "));
                Ok("y\n".into())
            })
            .is_ok()
        );
        assert!(confirm("x", false, true, |_| Ok("YES\n".into())).is_ok());
        let err = confirm("x", false, true, |_| Ok("\n".into())).unwrap_err();
        assert_eq!(err.exit_code(), exit::REFUSED);
    }

    #[test]
    fn exit_codes() {
        let e = InspectError::NoPinDir {
            path: "/x/v2".into(),
            others: vec![],
        };
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("/x/v2 does not exist"), "{e}");
        let e = InspectError::LayoutVersion {
            pin_dir: "/x".into(),
            found: vec![format!("v{}", ABI_VERSION + 1)],
        };
        assert_eq!(e.exit_code(), 5);
        assert!(
            e.to_string().contains(&format!(
                "layout v{} but this xdp-proxy reads layout v{ABI_VERSION}",
                ABI_VERSION + 1
            )),
            "{e}"
        );
        let e = InspectError::Meta(meta::MetaError::Version {
            path: "/m".into(),
            found: 9,
            daemon: "9.0.0".into(),
        });
        assert_eq!(e.exit_code(), 6);
        assert_eq!(InspectError::NoMatch("x".into()).exit_code(), 8);
    }
}
