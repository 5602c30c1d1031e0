//! Dropping the capabilities the daemon no longer needs once its datapath is up.
//!
//! Loading the program and creating maps (CAP_BPF, CAP_PERFMON), attaching XDP and writing the
//! datapath's net sysctls (CAP_NET_ADMIN), mounting a bpffs (CAP_SYS_ADMIN) and binding
//! listeners below 1024 (CAP_NET_BIND_SERVICE) happen at start. After that the daemon only
//! works on descriptors it already holds and files it owns, which needs no capability (checked
//! on kernel 6.18 as uid 0 with every capability dropped): map lookups, updates, deletes and
//! batch reads (flow expiry, reloads, `/metrics`), the aya-log ring buffer, releasing its own
//! bpf_link descriptors and unlinking its pins (SIGTERM), health checks, DNS and the HTTP proxy
//! (plain sockets; its listeners are bound at start, a new http service takes a restart).
//! Creating a map or binding port 81 without them fails (EPERM, EACCES). What run time still
//! needs:
//!
//! - CAP_NET_BIND_SERVICE only while the userspace L4 path serves (`datapath.mode =
//!   "userspace"`, or "auto" fallen back): a SIGHUP reload binds the listeners of new services,
//!   which may be below 1024;
//! - CAP_NET_ADMIN only when an interface was attached through netlink (kernels that refuse an
//!   XDP bpf_link): detaching it on SIGTERM is a netlink request that needs it.
//!
//! So a daemon on the XDP path with bpf_links keeps no capability at all.
//!
//! Everything else goes, from the permitted, effective, inheritable and ambient sets, and from
//! the bounding set when the daemon holds CAP_SETPCAP (a daemon started under
//! `docs/xdp-proxy.service` does not: its bounding set is already the unit's). No-new-privs is
//! set as well, so an `execve` could not regain anything either.
//!
//! Capabilities are per thread on Linux, and the tokio runtime's threads exist before the
//! datapath is attached: [`drop_on_every_thread`] drops on the calling thread, then makes every
//! worker and blocking-pool thread drop on itself (tasks that each wait for all the others, so
//! no thread takes two), and checks every thread of the process in `/proc/self/task` afterwards.
//! Threads started later are cloned from threads that dropped, and inherit the reduced sets.
//! A thread of its own started before (outside the runtime) cannot be reached that way: it
//! drops on itself at its start ([`drop_everything_on_this_thread`], as the access-log writer
//! does) and then holds less than the rest, which the check accepts (no thread may hold more).

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub enum PrivsError {
    #[error("{op}: {message}")]
    Caps { op: &'static str, message: String },
    #[error("setting no-new-privs: {0}")]
    NoNewPrivs(nix::Error),
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {field} line")]
    ProcFormat { path: String, field: &'static str },
    #[error("threads still holding other capabilities than {want}: {threads}")]
    Threads { want: String, threads: String },
    #[error("a thread task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn caps_err(op: &'static str) -> impl FnOnce(caps::errors::CapsError) -> PrivsError {
    move |e| PrivsError::Caps {
        op,
        message: e.to_string(),
    }
}

/// What the daemon needs once it runs: CAP_NET_BIND_SERVICE while the userspace L4 path
/// serves, CAP_NET_ADMIN while an interface is attached through netlink (see the module docs).
#[must_use]
pub fn runtime_needs(userspace_l4: bool, netlink_attachments: bool) -> CapsHashSet {
    let mut set = CapsHashSet::new();
    if userspace_l4 {
        set.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    if netlink_attachments {
        set.insert(Capability::CAP_NET_ADMIN);
    }
    set
}

/// Bit mask of `set` (bit n = capability n, as in `/proc/PID/status`).
#[must_use]
pub fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

/// Capability names of `mask`, for logs.
#[must_use]
pub fn names(mask: u64) -> String {
    let mut v: Vec<String> = caps::all()
        .into_iter()
        .filter(|c| mask & c.bitmask() != 0)
        .map(|c| c.to_string())
        .collect();
    v.sort();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(",")
    }
}

/// One thread's capability sets and no-new-privs flag, from `/proc/.../status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadCaps {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

impl ThreadCaps {
    /// Whether every set of `self` is within the same set of `other`, and no-new-privs is set
    /// when `other` has it: `self` can do nothing `other` cannot.
    #[must_use]
    pub fn within(&self, other: &Self) -> bool {
        let sub = |a: u64, b: u64| a & !b == 0;
        sub(self.inheritable, other.inheritable)
            && sub(self.permitted, other.permitted)
            && sub(self.effective, other.effective)
            && sub(self.bounding, other.bounding)
            && sub(self.ambient, other.ambient)
            && (self.no_new_privs || !other.no_new_privs)
    }

    /// Parse the text of a `/proc/PID/status` (or `/proc/PID/task/TID/status`) file.
    ///
    /// # Errors
    /// A line missing or not hexadecimal.
    pub fn parse(status: &str, path: &str) -> Result<Self, PrivsError> {
        let field = |name: &'static str| -> Result<u64, PrivsError> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .ok_or_else(|| PrivsError::ProcFormat {
                    path: path.to_owned(),
                    field: name,
                })
        };
        Ok(Self {
            inheritable: field("CapInh")?,
            permitted: field("CapPrm")?,
            effective: field("CapEff")?,
            bounding: field("CapBnd")?,
            ambient: field("CapAmb")?,
            no_new_privs: field("NoNewPrivs")? != 0,
        })
    }
}

/// Every thread of this process: thread id -> its capabilities.
///
/// # Errors
/// `/proc/self/task` unreadable (a thread that exits while it is read is skipped).
pub fn threads() -> Result<BTreeMap<u32, ThreadCaps>, PrivsError> {
    let dir = "/proc/self/task";
    let entries = std::fs::read_dir(dir).map_err(|source| PrivsError::Proc {
        path: dir.to_owned(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let path = format!("{dir}/{tid}/status");
        // A thread that exits between the listing and the read is skipped: its file is gone
        // (ENOENT), its task is (ESRCH), or what was read of it is incomplete.
        let gone = || !std::path::Path::new(&format!("{dir}/{tid}")).exists();
        match std::fs::read_to_string(&path) {
            Ok(text) => match ThreadCaps::parse(&text, &path) {
                Ok(caps) => {
                    out.insert(tid, caps);
                }
                Err(_) if gone() => {}
                Err(e) => return Err(e),
            },
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(source) => return Err(PrivsError::Proc { path, source }),
        }
    }
    Ok(out)
}

/// Reduce the calling thread's capabilities to `keep`: bounding set (when CAP_SETPCAP is
/// effective), ambient and inheritable emptied, effective then permitted set to `keep`, and
/// no-new-privs set.
///
/// # Errors
/// A prctl or capset failure.
pub fn drop_this_thread(keep: &CapsHashSet) -> Result<(), PrivsError> {
    let setpcap = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(caps_err("reading the effective set"))?;
    if setpcap {
        for c in caps::all() {
            if !keep.contains(&c)
                && caps::has_cap(None, CapSet::Bounding, c).map_err(caps_err("PR_CAPBSET_READ"))?
            {
                caps::drop(None, CapSet::Bounding, c).map_err(caps_err("PR_CAPBSET_DROP"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clearing the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("clearing the inheritable set"))?;
    // Effective first: it must stay a subset of permitted.
    caps::set(None, CapSet::Effective, keep).map_err(caps_err("setting the effective set"))?;
    caps::set(None, CapSet::Permitted, keep).map_err(caps_err("setting the permitted set"))?;
    nix::sys::prctl::set_no_new_privs().map_err(PrivsError::NoNewPrivs)?;
    Ok(())
}

/// Drop every capability on the calling thread (a thread that never needs one, started before
/// the daemon drops: see the module docs).
///
/// # Errors
/// As [`drop_this_thread`].
pub fn drop_everything_on_this_thread() -> Result<(), PrivsError> {
    drop_this_thread(&CapsHashSet::new())
}

/// What [`drop_on_every_thread`] did.
#[derive(Clone, Copy, Debug)]
pub struct Dropped {
    /// The sets every thread holds now.
    pub caps: ThreadCaps,
    /// Threads of the process when it was checked.
    pub threads: usize,
    /// Rounds of per-thread tasks it took.
    pub rounds: usize,
}

/// How long one thread task waits for the others (they run at once).
const RENDEZVOUS: Duration = Duration::from_secs(2);
/// Rounds of per-thread tasks before giving up.
const ROUNDS: usize = 3;

/// Run `n` tasks made by `spawn`, each of which drops on its own thread and then waits (up to
/// [`RENDEZVOUS`]) until all `n` have dropped, so no thread runs two of them.
async fn rendezvous(
    n: usize,
    keep: &CapsHashSet,
    spawn: impl Fn(
        Box<dyn FnOnce() -> Result<(), PrivsError> + Send>,
    ) -> tokio::task::JoinHandle<Result<(), PrivsError>>,
) -> Result<(), PrivsError> {
    let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let (arrived, keep) = (Arc::clone(&arrived), keep.clone());
        handles.push(spawn(Box::new(move || {
            let result = drop_this_thread(&keep);
            let (count, cv) = &*arrived;
            if let Ok(mut c) = count.lock() {
                *c += 1;
                cv.notify_all();
                let _ = cv.wait_timeout_while(c, RENDEZVOUS, |c| *c < n);
            }
            result
        })));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

/// Drop to `needs` (intersected with what the calling thread is permitted) on every thread of
/// the process. Call it from the thread that runs the runtime's `block_on`, inside the runtime.
///
/// # Errors
/// A capability call failed, or some thread still holds more after [`ROUNDS`] rounds.
pub async fn drop_on_every_thread(needs: &CapsHashSet) -> Result<Dropped, PrivsError> {
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(caps_err("reading the permitted set"))?;
    let keep: CapsHashSet = needs.intersection(&permitted).copied().collect();
    drop_this_thread(&keep)?;
    let here = ThreadCaps::parse(
        &std::fs::read_to_string("/proc/thread-self/status").map_err(|source| {
            PrivsError::Proc {
                path: "/proc/thread-self/status".to_owned(),
                source,
            }
        })?,
        "/proc/thread-self/status",
    )?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let stale = || -> Result<Vec<u32>, PrivsError> {
        Ok(threads()?
            .into_iter()
            .filter(|(_, c)| !c.within(&here))
            .map(|(tid, _)| tid)
            .collect())
    };
    for round in 1..=ROUNDS {
        if stale()?.is_empty() {
            return done(here, round - 1);
        }
        rendezvous(workers, &keep, |f| tokio::spawn(async move { f() })).await?;
        let left = stale()?;
        if left.is_empty() {
            return done(here, round);
        }
        // Idle blocking-pool threads: one task each (more tasks than threads start new
        // threads, cloned from this one, which has dropped).
        let others = threads()?.len().saturating_sub(1 + workers).max(left.len());
        rendezvous(others, &keep, tokio::task::spawn_blocking).await?;
    }
    let left = stale()?;
    if left.is_empty() {
        return done(here, ROUNDS);
    }
    Err(PrivsError::Threads {
        want: names(here.permitted),
        threads: format!("{left:?}"),
    })
}

fn done(caps: ThreadCaps, rounds: usize) -> Result<Dropped, PrivsError> {
    Ok(Dropped {
        caps,
        threads: threads()?.len(),
        rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\txdp-proxy\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000400\n\
                          CapEff:\t0000000000000400\nCapBnd:\t0000000000000400\n\
                          CapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t0\n";

    #[test]
    fn parses_proc_status() {
        let c = ThreadCaps::parse(STATUS, "test").unwrap();
        assert_eq!(c.permitted, 1 << 10);
        assert_eq!(c.effective, 1 << 10);
        assert_eq!(c.bounding, 1 << 10);
        assert_eq!((c.inheritable, c.ambient), (0, 0));
        assert!(c.no_new_privs);
        assert!(ThreadCaps::parse("CapInh:\t0\n", "test").is_err());
    }

    #[test]
    fn runtime_needs_bind_and_netlink_admin_only() {
        assert_eq!(mask(&runtime_needs(false, false)), 0);
        assert_eq!(mask(&runtime_needs(true, false)), 1 << 10);
        assert_eq!(mask(&runtime_needs(false, true)), 1 << 12);
        assert_eq!(
            names(mask(&runtime_needs(true, true))),
            "CAP_NET_ADMIN,CAP_NET_BIND_SERVICE"
        );
        assert_eq!(names(0), "none");
    }

    /// On a thread of its own (capabilities are per thread): what it may keep of
    /// CAP_NET_BIND_SERVICE is all it holds afterwards, with nothing inheritable, ambient or in
    /// its bounding set beyond it (when it could drop those), and no-new-privs set.
    #[test]
    fn drops_on_the_calling_thread_only() {
        let before = ThreadCaps::parse(
            &std::fs::read_to_string("/proc/thread-self/status").unwrap(),
            "self",
        )
        .unwrap();
        let after = std::thread::spawn(|| {
            let permitted = caps::read(None, CapSet::Permitted).unwrap();
            let keep: CapsHashSet = runtime_needs(true, false)
                .intersection(&permitted)
                .copied()
                .collect();
            drop_this_thread(&keep).unwrap();
            let text = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            (mask(&keep), ThreadCaps::parse(&text, "thread").unwrap())
        })
        .join()
        .unwrap();
        let (keep, c) = after;
        assert_eq!((c.permitted, c.effective), (keep, keep));
        assert_eq!((c.inheritable, c.ambient), (0, 0));
        assert!(c.no_new_privs);
        if before.effective & (1 << 8) != 0 {
            assert_eq!(c.bounding, keep, "CAP_SETPCAP held: bounding set dropped");
        }
        let now = ThreadCaps::parse(
            &std::fs::read_to_string("/proc/thread-self/status").unwrap(),
            "self",
        )
        .unwrap();
        assert_eq!(now, before, "another thread's drop changed this one");
    }

    #[test]
    fn within_means_no_more_in_any_set() {
        let c = ThreadCaps::parse(STATUS, "test").unwrap();
        let none = ThreadCaps {
            permitted: 0,
            effective: 0,
            bounding: 0,
            ..c
        };
        assert!(none.within(&c) && c.within(&c));
        assert!(!c.within(&none));
        assert!(
            !ThreadCaps {
                no_new_privs: false,
                ..none
            }
            .within(&c)
        );
    }

    #[test]
    fn this_process_reads_its_threads() {
        let t = threads().expect("every thread of this process read");
        assert!(!t.is_empty());
    }
}
