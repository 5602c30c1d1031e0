//! Network namespace labs: client / proxy / home hosts as namespaces joined by veth pairs.
//!
//! A [`Lab`] owns everything a test creates: its namespaces (named `xpt-<tag>-<pid>-<role>`),
//! the processes it starts (by PID), its run directory `/run/xpt-<tag>-<pid>` and the bpffs
//! mounted there. Dropping the lab (also while unwinding from a panic) stops the processes,
//! deletes the namespaces and unmounts the bpffs.
//!
//! Code runs inside a namespace in two ways:
//! - [`Netns::run`] / [`Netns::spawn`]: a closure on a dedicated thread that entered the namespace
//!   with `setns(CLONE_NEWNET)` and drives a tokio current-thread runtime (a multi-thread
//!   runtime's workers would stay in the old namespace). Only that thread is in the namespace: do
//!   not use `spawn_blocking`, `tokio::fs` or DNS there.
//! - [`Netns::command`]: a child process that enters the namespace in `pre_exec`. It keeps the
//!   host's mount namespace, unlike `ip netns exec`, whose private mount namespace (fresh /sys, no
//!   bpffs) takes every bpffs mounted inside it down with the process. The daemon is started with
//!   [`Lab::spawn_daemon`]: it also gets its own /sys (as `ip netns exec` gives), while its pins
//!   live in the lab's bpffs outside /sys, mounted in the host's mount namespace.

use std::collections::HashMap;
use std::fs::{self, File};
use std::future::Future;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

/// Prefix of every namespace, run directory and bpffs this harness creates.
pub const PREFIX: &str = "xpt";

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";

/// How long a stopped process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Distinguishes labs made by one process (tests in one binary run on parallel threads).
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// Host commands.
// ---------------------------------------------------------------------------------------------

/// The namespace tests of one test binary run one at a time (the machine has two cores, and
/// each test drives real traffic): every such test holds this guard. A test that panicked
/// poisons nothing for the next one.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Run a command to completion and return its stdout; a non-zero exit is an error that names the
/// command and carries its stderr.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = output_of(cmd)?;
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?}: stdout is not UTF-8"))
}

fn output_of(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip ARGS...` in the current (host) namespace.
fn ip(args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(args))
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(me), Some(parent)) = (fs::metadata(path), path.parent()) else {
        return false;
    };
    fs::metadata(parent).is_ok_and(|p| p.dev() != me.dev())
}

/// Remove what earlier runs left behind when they were killed before their `Drop` ran:
/// namespaces and run directories named `xpt-<tag>-<pid>-...` whose PID no longer exists.
/// Anything whose owner is still alive (another test binary running now) is left alone.
pub fn cleanup_stale() {
    let owner_dead = |name: &str| -> bool {
        let mut parts = name.split('-');
        let (Some(PREFIX), Some(_tag), Some(pid)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        pid.parse::<u32>().is_ok_and(|pid| !pid_alive(pid))
    };
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_dead(&name)
                && let Err(e) = ip(&["netns", "del", &name])
            {
                eprintln!("cleanup: stale namespace {name}: {e:#}");
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/run") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_dead(&name) {
                let bpffs = entry.path().join("bpffs");
                if is_mount_point(&bpffs) {
                    let _ = nix::mount::umount2(&bpffs, MntFlags::MNT_DETACH);
                }
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces.
// ---------------------------------------------------------------------------------------------

/// A handle to a named network namespace (created and deleted by its [`Lab`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

impl Netns {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount `ip netns` made for this namespace.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    fn open(&self) -> Result<OwnedFd> {
        let file = File::open(self.path())
            .with_context(|| format!("cannot open namespace {}", self.path().display()))?;
        Ok(file.into())
    }

    /// `ip -n NS ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command whose process enters this network namespace before `exec` (and nothing else:
    /// it keeps the host's mount namespace).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let fd = self.open()?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec; it only calls setns(2),
        // which is async-signal-safe, on a descriptor opened before the fork. It allocates
        // nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        Ok(cmd)
    }

    /// Run a program in this namespace to completion; its stdout, or an error with its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run_cmd(self.command(program)?.args(args))
    }

    /// Set a sysctl of this namespace (`key` as in `sysctl`, dots for slashes).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_owned();
        self.run_blocking(move || {
            // /proc/sys/net belongs to the namespace of the thread that opens it.
            fs::write(&path, value.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))
        })
        .with_context(|| format!("sysctl {key} in {}", self.name))
    }

    /// Read a sysctl of this namespace.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.run_blocking(move || {
            let text = fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Ok(text.trim().to_owned())
        })
    }

    /// The `Ip:` counters of this namespace's `/proc/net/snmp` (for example `ForwDatagrams`).
    pub fn ip_snmp(&self) -> Result<HashMap<String, u64>> {
        self.run_blocking(|| {
            // /proc/net is /proc/self/net: the namespace of the thread group leader. The thread
            // that entered the namespace reads its own view through thread-self.
            let text = fs::read_to_string("/proc/thread-self/net/snmp")
                .context("cannot read /proc/thread-self/net/snmp")?;
            parse_snmp(&text, "Ip")
        })
    }

    /// The IPv6 counters of this namespace (`/proc/net/snmp6`: `Ip6OutForwDatagrams`, ...).
    pub fn ip6_snmp(&self) -> Result<HashMap<String, u64>> {
        self.run_blocking(|| {
            let text = fs::read_to_string("/proc/thread-self/net/snmp6")
                .context("cannot read /proc/thread-self/net/snmp6")?;
            parse_snmp6(&text)
        })
    }

    /// Run a synchronous closure on a thread that entered this namespace; wait for it.
    pub fn run_blocking<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let fd = self.open()?;
        let name = self.name.clone();
        thread::Builder::new()
            .name(format!("ns-{name}"))
            .spawn(move || {
                nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {name}"))?;
                f()
            })
            .context("cannot spawn a thread")?
            .join()
            .map_err(|_| anyhow!("thread in namespace {} panicked", self.name))?
    }

    /// Run an async closure on a dedicated thread in this namespace, under a current-thread
    /// tokio runtime, bounded by `limit`; wait for its result.
    pub fn run<T, F, Fut>(&self, limit: Duration, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + 'static,
        T: Send + 'static,
    {
        self.spawn(limit, move |_stop| f())?.join()
    }

    /// Start an async closure on a dedicated thread in this namespace, under a current-thread
    /// tokio runtime, bounded by `limit`. The closure gets a [`Stop`] signal, raised by
    /// [`NsThread::stop`] or when the handle is dropped.
    pub fn spawn<T, F, Fut>(&self, limit: Duration, f: F) -> Result<NsThread<T>>
    where
        F: FnOnce(Stop) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + 'static,
        T: Send + 'static,
    {
        let fd = self.open()?;
        let name = self.name.clone();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (result_tx, result_rx) = mpsc::channel();
        let thread_name = format!("ns-{name}");
        let handle = thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let result = (|| {
                    nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("setns into {name}"))?;
                    drop(fd);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("cannot build a tokio runtime")?;
                    rt.block_on(async move {
                        tokio::time::timeout(limit, f(Stop(stop_rx)))
                            .await
                            .map_err(|_| anyhow!("gave up after {limit:?} in namespace {name}"))?
                    })
                })();
                // The receiver may be gone (handle dropped): nothing left to report to.
                let _ = result_tx.send(result);
            })
            .context("cannot spawn a thread")?;
        Ok(NsThread {
            ns: self.name.clone(),
            limit,
            stop: stop_tx,
            result: result_rx,
            handle: Some(handle),
        })
    }
}

/// Parse one table (`Ip`, `Tcp`, `Udp`, ...) of `/proc/net/snmp`: a header line of names
/// followed by a line of values, both starting with `<table>:`.
/// `/proc/net/snmp6`: one `Name value` pair per line.
///
/// # Errors
/// A line that is not a name and a number.
pub fn parse_snmp6(text: &str) -> Result<HashMap<String, u64>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split_whitespace();
            match (it.next(), it.next().map(str::parse::<u64>)) {
                (Some(n), Some(Ok(v))) => Ok((n.to_owned(), v)),
                _ => Err(anyhow!("snmp6: bad line `{l}`")),
            }
        })
        .collect()
}

pub fn parse_snmp(text: &str, table: &str) -> Result<HashMap<String, u64>> {
    let prefix = format!("{table}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {table}: table in snmp");
    };
    let names = names[prefix.len()..].split_whitespace();
    let values = values[prefix.len()..].split_whitespace();
    names
        .zip(values)
        .map(|(n, v)| {
            let v = v
                .parse::<i64>()
                .with_context(|| format!("snmp {table} {n}: {v:?} is not a number"))?;
            // Only gauges like Forwarding are small; the counters we read are never negative.
            Ok((n.to_owned(), u64::try_from(v).unwrap_or(0)))
        })
        .collect()
}

/// Raised when the owner of an [`NsThread`] wants the closure to finish.
#[derive(Clone, Debug)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Resolves once stop was requested (or the handle is gone).
    pub async fn wait(&mut self) {
        // An error means the sender is gone, which also means stop.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    #[must_use]
    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }
}

/// A closure running on its own thread in a namespace.
#[derive(Debug)]
pub struct NsThread<T> {
    ns: String,
    limit: Duration,
    stop: watch::Sender<bool>,
    result: mpsc::Receiver<Result<T>>,
    handle: Option<JoinHandle<()>>,
}

impl<T> NsThread<T> {
    /// Ask the closure to finish (it sees [`Stop::wait`] resolve).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Wait for the closure's result (bounded by its limit plus a margin).
    pub fn join(mut self) -> Result<T> {
        let result = self
            .result
            .recv_timeout(self.limit + Duration::from_secs(5))
            .map_err(|_| {
                anyhow!(
                    "thread in namespace {} neither finished nor timed out (or panicked)",
                    self.ns
                )
            });
        if let Some(handle) = self.handle.take()
            && (result.is_ok() || handle.is_finished())
        {
            let _ = handle.join();
        }
        result?
    }

    /// Stop, then wait for the result.
    pub fn stop_and_join(self) -> Result<T> {
        self.stop();
        self.join()
    }
}

impl<T> Drop for NsThread<T> {
    fn drop(&mut self) {
        // Unjoined (a test failed on the way): let the closure finish on its own so its thread
        // leaves the namespace, which lets the kernel free the namespace once it is deleted.
        self.stop.send_replace(true);
    }
}

// ---------------------------------------------------------------------------------------------
// The lab: owner of everything created.
// ---------------------------------------------------------------------------------------------

struct Process {
    label: String,
    child: Child,
    log: Option<PathBuf>,
}

/// Owner of a test's namespaces, processes, run directory and bpffs. Dropping it removes all.
pub struct Lab {
    id: String,
    namespaces: Vec<Netns>,
    processes: Vec<Process>,
    run_dir: PathBuf,
    bpffs: Option<PathBuf>,
    /// Things to drop before the namespaces go (for example XDP programs loaded by the test).
    holders: Vec<Box<dyn std::any::Any + Send>>,
}

impl Lab {
    /// A new, empty lab. `tag`: a short word naming the test (letters and digits only).
    pub fn new(tag: &str) -> Result<Self> {
        ensure!(
            !tag.is_empty() && tag.chars().all(|c| c.is_ascii_alphanumeric()),
            "lab tag {tag:?} must be letters and digits"
        );
        ensure!(
            nix::unistd::geteuid().is_root(),
            "namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
        );
        cleanup_stale();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}-{tag}{n}-{}", std::process::id());
        let run_dir = Path::new("/run").join(&id);
        fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        Ok(Self {
            id,
            namespaces: Vec::new(),
            processes: Vec::new(),
            run_dir,
            bpffs: None,
            holders: Vec::new(),
        })
    }

    /// `xpt-<tag><n>-<pid>`: the prefix of everything this lab names.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `/run/xpt-<tag><n>-<pid>`: config files and logs.
    #[must_use]
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Create a namespace `<id>-<role>` with its loopback up.
    pub fn add_netns(&mut self, role: &str) -> Result<Netns> {
        let ns = Netns {
            name: format!("{}-{role}", self.id),
        };
        ip(&["netns", "add", &ns.name])?;
        self.namespaces.push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"])?;
        // No IPv6 chatter (router solicitations, DAD) on the lab's links.
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(ns)
    }

    /// A veth pair: `a_name` in `a`, `b_name` in `b`, both up.
    pub fn add_veth(&self, a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
        ip(&[
            "link", "add", a_name, "netns", &a.name, "type", "veth", "peer", "name", b_name,
            "netns", &b.name,
        ])?;
        a.ip(&["link", "set", a_name, "up"])?;
        b.ip(&["link", "set", b_name, "up"])?;
        Ok(())
    }

    /// Mount a bpffs at `<run_dir>/bpffs` in the host's mount namespace (outside /sys, so it
    /// outlives any process's private mount namespace); unmounted when the lab is dropped.
    pub fn mount_bpffs(&mut self) -> Result<PathBuf> {
        if let Some(dir) = &self.bpffs {
            return Ok(dir.clone());
        }
        let dir = self.run_dir.join("bpffs");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        nix::mount::mount(
            Some("bpffs"),
            &dir,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("cannot mount bpffs at {}", dir.display()))?;
        self.bpffs = Some(dir.clone());
        Ok(dir)
    }

    /// Keep `thing` alive until the lab is torn down (dropped before the namespaces go).
    pub fn hold(&mut self, thing: Box<dyn std::any::Any + Send>) {
        self.holders.push(thing);
    }

    /// Start a long-running process (for example one built with [`Netns::command`]). Its stdout
    /// and stderr go to `<run_dir>/<label>.log`. Returns its PID; the lab stops it on drop.
    pub fn spawn(&mut self, label: &str, mut cmd: Command) -> Result<u32> {
        self.spawn_logged(label, &mut cmd)
    }

    /// Start the daemon (or any program that needs the namespace's own /sys) inside `ns`: the
    /// child enters the network namespace, then a private mount namespace (slave of the host's,
    /// so the lab's bpffs under /run stays visible) where /sys is remounted for that network
    /// namespace, as `ip netns exec` does.
    pub fn spawn_daemon(
        &mut self,
        label: &str,
        ns: &Netns,
        program: &Path,
        args: &[&str],
    ) -> Result<u32> {
        let fd = ns.open()?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        // SAFETY: the closure runs in the forked (single-threaded) child before exec. It only
        // makes syscalls (setns, unshare, mount, umount2) on a descriptor opened before the fork
        // and on short constant paths that nix converts on the stack: no allocation, no lock.
        unsafe {
            cmd.pre_exec(move || {
                use nix::mount::{mount, umount2};
                nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)?;
                nix::sched::unshare(CloneFlags::CLONE_NEWNS)?;
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_SLAVE | MsFlags::MS_REC,
                    None::<&str>,
                )?;
                umount2("/sys", MntFlags::MNT_DETACH)?;
                mount(
                    Some("sysfs"),
                    "/sys",
                    Some("sysfs"),
                    MsFlags::empty(),
                    None::<&str>,
                )?;
                Ok(())
            });
        }
        self.spawn_logged(label, &mut cmd)
    }

    fn spawn_logged(&mut self, label: &str, cmd: &mut Command) -> Result<u32> {
        let log = self.run_dir.join(format!("{label}.log"));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out
            .try_clone()
            .context("cannot duplicate the log descriptor")?;
        let child = cmd
            // Its own process group: a Ctrl-C at the terminal reaches the test or demo, whose
            // cleanup then stops the process in order, instead of killing it mid-way.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {label}: {cmd:?}"))?;
        let pid = child.id();
        self.processes.push(Process {
            label: label.to_owned(),
            child,
            log: Some(log),
        });
        Ok(pid)
    }

    /// Whether the process `pid` (started by this lab) is still running; `Err` if it exited,
    /// with its status and the tail of its log.
    pub fn check_running(&mut self, pid: u32) -> Result<()> {
        let p = self.process_mut(pid)?;
        match p.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                let label = p.label.clone();
                bail!(
                    "{label} (pid {pid}) exited: {status}\n{}",
                    self.log_tail(pid, 40)
                )
            }
            Err(e) => Err(e).with_context(|| format!("waitpid {pid}")),
        }
    }

    /// Stop a process started by this lab: SIGTERM, then SIGKILL after a grace period.
    /// Returns its exit status.
    pub fn stop(&mut self, pid: u32) -> Result<ExitStatus> {
        let p = self.process_mut(pid)?;
        stop_child(&mut p.child).with_context(|| format!("stopping {} (pid {pid})", p.label))
    }

    /// The last `lines` lines of a process's log (empty if none).
    #[must_use]
    pub fn log_tail(&self, pid: u32, lines: usize) -> String {
        let Some(log) = self
            .processes
            .iter()
            .find(|p| p.child.id() == pid)
            .and_then(|p| p.log.as_ref())
        else {
            return String::new();
        };
        let text = fs::read_to_string(log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole log of a process started by this lab (empty if none).
    #[must_use]
    pub fn log_text(&self, pid: u32) -> String {
        self.processes
            .iter()
            .find(|p| p.child.id() == pid)
            .and_then(|p| p.log.as_ref())
            .and_then(|log| fs::read_to_string(log).ok())
            .unwrap_or_default()
    }

    fn process_mut(&mut self, pid: u32) -> Result<&mut Process> {
        self.processes
            .iter_mut()
            .find(|p| p.child.id() == pid)
            .ok_or_else(|| anyhow!("pid {pid} was not started by this lab"))
    }

    /// Write a file into the run directory; returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.run_dir.join(name);
        let mut f =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        f.write_all(contents.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

/// SIGTERM, wait up to `STOP_GRACE`, then SIGKILL and reap.
fn stop_child(child: &mut Child) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait().context("waitpid")? {
        return Ok(status);
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    // ESRCH (already gone but not reaped) is fine: try_wait below reaps it.
    let _ = signal::kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("waitpid")? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().context("waitpid after SIGKILL")
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.processes {
            if let Err(e) = stop_child(&mut p.child) {
                eprintln!("lab {}: stopping {}: {e:#}", self.id, p.label);
            }
        }
        self.holders.clear();
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", &ns.name]) {
                eprintln!("lab {}: {e:#}", self.id);
            }
        }
        if let Some(dir) = &self.bpffs
            && let Err(e) = nix::mount::umount2(dir, MntFlags::MNT_DETACH)
        {
            eprintln!("lab {}: umount {}: {e}", self.id, dir.display());
        }
        if std::env::var_os("XPT_KEEP_LOGS").is_none()
            && let Err(e) = fs::remove_dir_all(&self.run_dir)
        {
            eprintln!("lab {}: remove {}: {e}", self.id, self.run_dir.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Interface settings.
// ---------------------------------------------------------------------------------------------

/// Turn off transmit checksum offload on `dev` (a local sender's unfinished checksums would
/// cross XDP unfinished and be dropped by the receiver; see DESIGN.md).
pub fn tx_checksum_off(ns: &Netns, dev: &str) -> Result<()> {
    ns.exec("ethtool", &["-K", dev, "tx", "off"]).map(drop)
}

/// Turn on GRO on `dev`, so frames XDP_REDIRECTed into its peer are delivered (a veth
/// receiving redirected frames needs either its own XDP program or GRO).
pub fn gro_on(ns: &Netns, dev: &str) -> Result<()> {
    ns.exec("ethtool", &["-K", dev, "gro", "on"]).map(drop)
}

/// Attach the project's own XDP program, with fresh unconfigured maps of its own, to `dev` in
/// `ns`. Unconfigured, it passes every packet (`PassNotReady`); its only purpose is to be there:
/// a veth flushes the frames its peer sends with XDP_TX only when it has an XDP program itself
/// (GRO is not enough: the frames wait in its ring until other traffic wakes it). The returned
/// object keeps the attachment; hand it to [`Lab::hold`].
pub fn attach_pass_program(ns: &Netns, dev: &str) -> Result<Box<dyn std::any::Any + Send>> {
    let dev = dev.to_owned();
    ns.run_blocking(move || {
        use aya::programs::{Xdp, XdpMode};
        // Small flow tables: this copy never holds a flow.
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(proxy_common::MAP_FLOWS_FWD, 16)
            .map_max_entries(proxy_common::MAP_FLOWS_REV, 16)
            .load(proxy_ebpf_object::EBPF_OBJECT)
            .context("loading the XDP object (as a pass-everything program)")?;
        let program: &mut Xdp = ebpf
            .program_mut(proxy_common::PROGRAM_NAME)
            .ok_or_else(|| anyhow!("no program {} in the object", proxy_common::PROGRAM_NAME))?
            .try_into()
            .context("not an XDP program")?;
        program.load().context("loading the XDP program")?;
        // Attached through bpf_link in this thread's namespace; the link lives as long as
        // `ebpf` (the program owns its links).
        program
            .attach(&dev, XdpMode::Driver)
            .with_context(|| format!("attaching XDP to {dev}"))?;
        Ok(Box::new(ebpf) as Box<dyn std::any::Any + Send>)
    })
}

/// Whether an XDP program is attached to `dev` in `ns` (per `ip -d link show`).
pub fn has_xdp(ns: &Netns, dev: &str) -> Result<bool> {
    let out = ns.ip(&["-d", "link", "show", "dev", dev])?;
    Ok(out.contains("prog/xdp") || out.contains(" xdp"))
}

// ---------------------------------------------------------------------------------------------
// Topologies.
// ---------------------------------------------------------------------------------------------

/// `ip:port` as a socket address.
#[must_use]
pub const fn sock(ip: std::net::Ipv4Addr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(ip, port))
}

/// `[ip]:port` as a socket address.
#[must_use]
pub const fn sock6(ip: std::net::Ipv6Addr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, 0))
}

/// Enable IPv6 on `dev` in `ns` (new namespaces may start with it disabled) and add
/// `addr/len` without duplicate address detection (usable at once).
///
/// # Errors
/// A sysctl cannot be written or the `ip` command fails.
pub fn add_addr6(ns: &Netns, dev: &str, addr: std::net::Ipv6Addr, len: u8) -> Result<()> {
    for scope in ["all", dev] {
        ns.sysctl(&format!("net/ipv6/conf/{scope}/disable_ipv6"), "0")?;
    }
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{addr}/{len}"),
        "dev",
        dev,
        "nodad",
    ])?;
    Ok(())
}

/// Addresses of the two-interface shape.
pub mod two {
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
    /// The proxy's client-side address: the service address.
    pub const PROXY_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
    /// The proxy's home-side address: the SNAT address.
    pub const PROXY_HOME_SIDE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
    pub const HOME: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
    pub const HOME_CIDR: &str = "10.200.0.0/24";

    /// Interface names (each in its own namespace).
    pub const CLIENT_DEV: &str = "c0";
    pub const PROXY_CLIENT_DEV: &str = "pc";
    pub const PROXY_HOME_DEV: &str = "ph";
    pub const HOME_DEV: &str = "h0";

    /// IPv6 (ULA) addresses, added by [`super::TwoInterface::with_ipv6`] only.
    pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
    /// The proxy's client-side IPv6 address: the IPv6 service address.
    pub const PROXY_CLIENT_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
    /// The proxy's home-side IPv6 address: the IPv6 SNAT address.
    pub const PROXY_HOME_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
    pub const HOME6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
    pub const HOME_CIDR6: &str = "fd00:200::/64";

    /// `[datapath]` (`mode`, `interfaces`), `[nat]` (SNAT on the home side, ports
    /// 20000-29999, the home CIDR) and `[admin]` (127.0.0.1:9100) of this shape; services go
    /// after it.
    #[must_use]
    pub fn base_config(mode: &str, interfaces: &[&str], pin_dir: &std::path::Path) -> String {
        let interfaces = interfaces
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"[datapath]
interfaces = [{interfaces}]
mode = "{mode}"
pin_dir = "{pin_dir}"

[nat]
snat_ipv4 = "{snat}"
port_range = [20000, 29999]
home_cidrs = ["{cidr}"]

[admin]
listen = "127.0.0.1:9100"
"#,
            pin_dir = pin_dir.display(),
            snat = PROXY_HOME_SIDE,
            cidr = HOME_CIDR,
        )
    }
}

/// Addresses of the one-interface shape (one subnet behind a bridge).
pub mod one {
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 2);
    /// The proxy's only address: service address and SNAT address at once.
    pub const PROXY: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 1);
    pub const HOME: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 3);
    pub const CIDR: &str = "10.50.0.0/24";

    pub const CLIENT_DEV: &str = "c0";
    pub const PROXY_DEV: &str = "p0";
    pub const HOME_DEV: &str = "h0";
    /// The bridge and its ports in the bridge namespace.
    pub const BRIDGE: &str = "br0";
    pub const BRIDGE_CLIENT_PORT: &str = "bc";
    pub const BRIDGE_PROXY_PORT: &str = "bp";
    pub const BRIDGE_HOME_PORT: &str = "bh";

    /// IPv6 (ULA) addresses, added by [`super::OneInterface::with_ipv6`] only.
    pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 2);
    pub const PROXY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1);
    pub const HOME6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 3);
    pub const CIDR6: &str = "fd00:50::/64";
}

/// client --veth-- proxy --veth-- home.
///
/// - client: `c0` 10.100.0.2/24, default route via 10.100.0.1;
/// - proxy: `pc` 10.100.0.1/24 (service address), `ph` 10.200.0.1/24 (SNAT address);
/// - home: `h0` 10.200.0.2/24 and no other route: it can reach only 10.200.0.0/24.
///
/// Transmit checksum offload is off on `c0` and `h0`; GRO is on there too, so frames the proxy
/// redirects into `pc`/`ph` are delivered. Forwarding on the proxy is left as the kernel's
/// default (off): the daemon turns it on (or a kernel-routing baseline does).
///
/// IPv6 only on request ([`TwoInterface::with_ipv6`]), so IPv4 tests see what they always saw.
pub struct TwoInterface {
    pub lab: Lab,
    pub client: Netns,
    pub proxy: Netns,
    pub home: Netns,
}

impl TwoInterface {
    pub fn new(tag: &str) -> Result<Self> {
        use two::*;
        let mut lab = Lab::new(tag)?;
        let client = lab.add_netns("cli")?;
        let proxy = lab.add_netns("prx")?;
        let home = lab.add_netns("home")?;
        lab.add_veth(&client, CLIENT_DEV, &proxy, PROXY_CLIENT_DEV)?;
        lab.add_veth(&proxy, PROXY_HOME_DEV, &home, HOME_DEV)?;
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", CLIENT_DEV])?;
        proxy.ip(&[
            "addr",
            "add",
            &format!("{PROXY_CLIENT_SIDE}/24"),
            "dev",
            PROXY_CLIENT_DEV,
        ])?;
        proxy.ip(&[
            "addr",
            "add",
            &format!("{PROXY_HOME_SIDE}/24"),
            "dev",
            PROXY_HOME_DEV,
        ])?;
        home.ip(&["addr", "add", &format!("{HOME}/24"), "dev", HOME_DEV])?;
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &PROXY_CLIENT_SIDE.to_string(),
        ])?;
        for (ns, dev) in [(&client, CLIENT_DEV), (&home, HOME_DEV)] {
            tx_checksum_off(ns, dev)?;
            gro_on(ns, dev)?;
        }
        Ok(Self {
            lab,
            client,
            proxy,
            home,
        })
    }

    /// Dual stack: the same shape plus IPv6 ULA addresses (`two::*6`), added with `nodad`:
    /// client `fd00:100::2/64` with a default route via the proxy's `fd00:100::1`, proxy
    /// `fd00:100::1/64` and `fd00:200::1/64`, home `fd00:200::2/64` (no IPv6 route beyond its
    /// subnet). IPv6 forwarding on the proxy stays off (the daemon turns it on).
    ///
    /// # Errors
    /// An `ip` command fails.
    pub fn with_ipv6(self) -> Result<Self> {
        use two::*;
        add_addr6(&self.client, CLIENT_DEV, CLIENT6, 64)?;
        add_addr6(&self.proxy, PROXY_CLIENT_DEV, PROXY_CLIENT_SIDE6, 64)?;
        add_addr6(&self.proxy, PROXY_HOME_DEV, PROXY_HOME_SIDE6, 64)?;
        add_addr6(&self.home, HOME_DEV, HOME6, 64)?;
        self.client.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &PROXY_CLIENT_SIDE6.to_string(),
        ])?;
        Ok(self)
    }
}

/// client, proxy and home on one subnet behind a bridge namespace; the proxy has one interface.
///
/// - bridge namespace: `br0` with ports `bc`, `bp`, `bh`;
/// - client: `c0` 10.50.0.2/24; proxy: `p0` 10.50.0.1/24 (service and SNAT address);
///   home: `h0` 10.50.0.3/24.
///
/// Transmit checksum offload is off on `c0` and `h0`. XDP_TX on `p0` delivers to its peer `bp`
/// only when `bp` has an XDP program: the project's program, unconfigured (passes everything),
/// is attached there (see [`attach_pass_program`]).
pub struct OneInterface {
    pub lab: Lab,
    pub bridge: Netns,
    pub client: Netns,
    pub proxy: Netns,
    pub home: Netns,
}

impl OneInterface {
    pub fn new(tag: &str) -> Result<Self> {
        use one::*;
        let mut lab = Lab::new(tag)?;
        let bridge = lab.add_netns("br")?;
        let client = lab.add_netns("cli")?;
        let proxy = lab.add_netns("prx")?;
        let home = lab.add_netns("home")?;
        bridge.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        bridge.ip(&["link", "set", BRIDGE, "up"])?;
        for (ns, dev, port) in [
            (&client, CLIENT_DEV, BRIDGE_CLIENT_PORT),
            (&proxy, PROXY_DEV, BRIDGE_PROXY_PORT),
            (&home, HOME_DEV, BRIDGE_HOME_PORT),
        ] {
            lab.add_veth(ns, dev, &bridge, port)?;
            bridge.ip(&["link", "set", port, "master", BRIDGE])?;
        }
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", CLIENT_DEV])?;
        proxy.ip(&["addr", "add", &format!("{PROXY}/24"), "dev", PROXY_DEV])?;
        home.ip(&["addr", "add", &format!("{HOME}/24"), "dev", HOME_DEV])?;
        for (ns, dev) in [(&client, CLIENT_DEV), (&home, HOME_DEV)] {
            tx_checksum_off(ns, dev)?;
        }
        // Frames the proxy sends back out of p0 with XDP_TX are flushed into bp only when bp
        // has an XDP program of its own.
        let pass = attach_pass_program(&bridge, BRIDGE_PROXY_PORT)?;
        lab.hold(pass);
        Ok(Self {
            lab,
            bridge,
            client,
            proxy,
            home,
        })
    }

    /// Dual stack: the same shape plus IPv6 ULA addresses on the one subnet (`one::*6`,
    /// `fd00:50::/64`), added with `nodad`.
    ///
    /// # Errors
    /// An `ip` command fails.
    pub fn with_ipv6(self) -> Result<Self> {
        use one::*;
        add_addr6(&self.client, CLIENT_DEV, CLIENT6, 64)?;
        add_addr6(&self.proxy, PROXY_DEV, PROXY6, 64)?;
        add_addr6(&self.home, HOME_DEV, HOME6, 64)?;
        Ok(self)
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon.
// ---------------------------------------------------------------------------------------------

/// The `xdp-proxy` binary: `$XDP_PROXY_BIN`, else `xdp-proxy` beside this executable's build
/// (`target/<profile>/`, the profile this test binary was built with).
pub fn daemon_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("XDP_PROXY_BIN") {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "XDP_PROXY_BIN={} does not exist",
            path.display()
        );
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot find the current executable")?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join("xdp-proxy");
    ensure!(
        path.is_file(),
        "the daemon binary {} is missing: run `cargo xtask test`, or build it first with \
         `cargo build -p proxy-userspace` (same profile as the tests), or set XDP_PROXY_BIN",
        path.display()
    );
    Ok(path)
}

/// Run `xdp-proxy inspect WHAT --json --pin-dir DIR` (from the host: pins are
/// namespace-free) and parse its output.
pub fn inspect_json(daemon: &Path, pin_dir: &Path, what: &str) -> Result<serde_json::Value> {
    let out = run_cmd(
        Command::new(daemon)
            .args(["inspect", what, "--json", "--pin-dir"])
            .arg(pin_dir),
    )?;
    serde_json::from_str(&out).with_context(|| format!("inspect {what}: not JSON: {out}"))
}

/// A running `xdp-proxy run` inside a lab's proxy namespace.
#[derive(Debug)]
pub struct Daemon {
    pub pid: u32,
    pub bin: PathBuf,
    pub pin_dir: PathBuf,
    pub config: PathBuf,
}

impl Daemon {
    /// Write `config` (TOML, whose `pin_dir` must be `lab.mount_bpffs()`) to the lab's run
    /// directory and start the daemon in `ns` with it. `RUST_LOG` defaults to `info`.
    pub fn start(lab: &mut Lab, ns: &Netns, config: &str) -> Result<Self> {
        Self::start_with_workers(lab, ns, config, None, &[])
    }

    /// [`Daemon::start`], with `XDP_PROXY_WORKER_THREADS=n` when `workers` is `Some(n)` (through
    /// `env`, which execs the daemon: the PID is the daemon's) and `global_args` (for example
    /// `--log-level`) before `run`.
    pub fn start_with_workers(
        lab: &mut Lab,
        ns: &Netns,
        config: &str,
        workers: Option<usize>,
        global_args: &[&str],
    ) -> Result<Self> {
        let bin = daemon_binary()?;
        let pin_dir = lab.mount_bpffs()?;
        let config_path = lab.write_file("xdp-proxy.toml", config)?;
        let config_arg = config_path.to_string_lossy().into_owned();
        let mut args: Vec<&str> = global_args.to_vec();
        args.extend(["run", "--config", &config_arg]);
        let pid = match workers {
            None => lab.spawn_daemon("xdp-proxy", ns, &bin, &args)?,
            Some(n) => {
                let var = format!("XDP_PROXY_WORKER_THREADS={n}");
                let bin_arg = bin.to_string_lossy().into_owned();
                let mut env_args = vec![var.as_str(), bin_arg.as_str()];
                env_args.extend(&args);
                lab.spawn_daemon("xdp-proxy", ns, Path::new("/usr/bin/env"), &env_args)?
            }
        };
        Ok(Self {
            pid,
            bin,
            pin_dir,
            config: config_path,
        })
    }

    /// Wait (up to `limit`) until the daemon runs, an XDP program is attached to every one of
    /// `interfaces` in `ns`, and `inspect stats` lists at least `services` services. Gives up
    /// early when `abort()` returns true.
    pub fn wait_ready(
        &self,
        lab: &mut Lab,
        ns: &Netns,
        interfaces: &[&str],
        services: usize,
        limit: Duration,
        abort: impl Fn() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = anyhow!("not checked yet");
        while Instant::now() < deadline {
            ensure!(!abort(), "interrupted while waiting for the daemon");
            lab.check_running(self.pid)?;
            let ready = (|| -> Result<()> {
                for dev in interfaces {
                    ensure!(has_xdp(ns, dev)?, "no XDP program on {dev} yet");
                }
                let stats = self.stats()?;
                let listed = stats
                    .get("services")
                    .and_then(serde_json::Value::as_array)
                    .map_or(0, Vec::len);
                ensure!(listed >= services, "inspect stats lists {listed} services");
                Ok(())
            })();
            match ready {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "daemon not ready after {limit:?}: {last:#}\n--- daemon log ---\n{}",
            lab.log_tail(self.pid, 40)
        )
    }

    /// Wait (up to `limit`) until every one of `needles` appears in one line of the daemon's
    /// log, `count` lines at least, while the daemon keeps running. Returns those lines.
    pub fn wait_log(
        &self,
        lab: &mut Lab,
        needles: &[&str],
        count: usize,
        limit: Duration,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + limit;
        loop {
            lab.check_running(self.pid)?;
            let lines: Vec<String> = lab
                .log_text(self.pid)
                .lines()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned)
                .collect();
            if lines.len() >= count {
                return Ok(lines);
            }
            ensure!(
                Instant::now() < deadline,
                "daemon log has {} of {count} lines with {needles:?} after {limit:?}\n--- daemon log ---\n{}",
                lines.len(),
                lab.log_tail(self.pid, 40)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `xdp-proxy inspect stats --json` on this daemon's pins.
    pub fn stats(&self) -> Result<serde_json::Value> {
        self.inspect_json("stats")
    }

    /// `xdp-proxy inspect WHAT --json` (stats, flows, services, upstreams) on this daemon's pins.
    pub fn inspect_json(&self, what: &str) -> Result<serde_json::Value> {
        inspect_json(&self.bin, &self.pin_dir, what)
    }

    /// `xdp-proxy inspect stats` (human table).
    pub fn stats_table(&self) -> Result<String> {
        run_cmd(
            Command::new(&self.bin)
                .args(["inspect", "stats", "--pin-dir"])
                .arg(&self.pin_dir),
        )
    }

    /// SIGTERM (SIGKILL after a grace period); the exit status.
    pub fn stop(&self, lab: &mut Lab) -> Result<ExitStatus> {
        lab.stop(self.pid)
    }

    /// [`Daemon::stop`], and an error unless the daemon exited with status 0 (a clean stop:
    /// every test that stops a daemon checks this).
    pub fn stop_ok(&self, lab: &mut Lab) -> Result<()> {
        let status = self.stop(lab)?;
        anyhow::ensure!(
            status.success(),
            "daemon (pid {}) exited with {status}",
            self.pid
        );
        Ok(())
    }
}
