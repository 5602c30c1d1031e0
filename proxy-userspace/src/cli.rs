//! Command line: `run`, `check`, `status`, `inspect`, `flows`. `main.rs` parses, sets up logging and
//! calls [`dispatch`], and exits with [`CliError::exit_code`].

use std::{
    io::IsTerminal as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, Subcommand};

pub mod status;

use crate::{
    config::{Config, ConfigError, DEFAULT_PIN_DIR, ServiceMode},
    daemon::{self, DaemonError, RunOptions},
    datapath::DatapathError,
    inspect::{
        self, FlowQuery, InspectError, Source,
        flowview::{ClientSel, FlowState, ServiceSel, UpstreamSel},
    },
};

#[derive(Debug, Parser)]
#[command(
    name = "xdp-proxy",
    version,
    about = "XDP L4 full-NAT edge forwarder: daemon and CLI"
)]
pub struct Cli {
    /// Log level or filter (overrides RUST_LOG), e.g. `debug` or `xdp_proxy=debug`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config, load and attach the XDP program, fill its maps, and run until
    /// SIGINT/SIGTERM (then detach; the pinned maps and their flows stay) or SIGQUIT (exit
    /// leaving the datapath attached and pinned, for a restart or upgrade that adopts it).
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file without touching the system (exit 0 when valid).
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Ask the running daemon (its admin listener's /status) which datapath is active
    /// (native, generic or userspace), its interfaces, services and upstream health.
    Status {
        /// The admin listener (default: the [admin] listen of --config, else 127.0.0.1:9100).
        #[arg(long, value_name = "ADDR:PORT")]
        admin: Option<SocketAddr>,
        /// Take the admin address from this config file.
        #[arg(long, value_name = "FILE", conflicts_with = "admin")]
        config: Option<PathBuf>,
        /// Print the /status JSON document unchanged.
        #[arg(long)]
        json: bool,
    },
    /// Read the pinned maps (works while the daemon is down; never writes).
    Inspect {
        #[command(subcommand)]
        what: InspectCommand,
    },
    /// Operator actions on the flow table (delete flows; asks for confirmation).
    Flows {
        #[command(subcommand)]
        action: FlowsCommand,
    },
}

/// Where the pins (and the daemon's metadata file) are.
#[derive(Debug, Clone, clap::Args)]
pub struct PinArgs {
    /// The daemon's datapath.pin_dir (maps are read from `<DIR>/v<ABI_VERSION>/`).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Directory of the daemon's metadata files (service names); see docs/inspect-json.md.
    #[arg(long, value_name = "DIR", default_value = inspect::meta::META_DIR)]
    pub meta_dir: PathBuf,
}

impl PinArgs {
    fn source(&self) -> Source {
        Source {
            pin_dir: self.pin_dir.clone(),
            meta_dir: self.meta_dir.clone(),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// JSON instead of a table (schema: docs/inspect-json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pins: PinArgs,
}

#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Traffic counters per service and per upstream, and packets by reason; with --watch,
    /// rates (packets/s, bits/s, new flows/s, passes and drops by reason).
    Stats {
        #[command(flatten)]
        args: InspectArgs,
        /// Refresh every --interval seconds with the rates since the previous read.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes (with --watch).
        #[arg(long, value_name = "S", default_value_t = 1.0, requires = "watch")]
        interval: f64,
        /// Stop after N refreshes (with --watch; default: until interrupted).
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
    },
    /// Flows (forward entry joined with its reverse entry): age, idle time, SNAT port, packets
    /// and bytes both ways. Oldest first.
    Flows {
        #[command(flatten)]
        args: InspectArgs,
        #[command(flatten)]
        filter: FlowFilterArgs,
        /// List at most N flows.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Services in the datapath with their upstreams' shares of the Maglev table.
    Services(InspectArgs),
    /// Active upstream slots with their services, Maglev slots and counters.
    Upstreams(InspectArgs),
    /// Every pinned map: type, key/value size, max and used entries, memory.
    Maps(InspectArgs),
}

/// Filters of `inspect flows` (all must match).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FlowFilterArgs {
    /// Only this service (name from the daemon's metadata, or id).
    #[arg(long, value_name = "NAME|ID")]
    pub service: Option<ServiceSel>,
    /// Only clients at ADDR, ADDR:PORT or inside ADDR/PREFIX.
    #[arg(long, value_name = "ADDR|CIDR")]
    pub client: Option<ClientSel>,
    /// Only flows to this upstream.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub upstream: Option<UpstreamSel>,
    /// Only flows in this state (union of both entries' flags).
    #[arg(long, value_enum)]
    pub state: Option<FlowState>,
}

#[derive(Debug, Subcommand)]
pub enum FlowsCommand {
    /// Delete every flow of a service (both entries each). Established TCP connections are
    /// reset at their next packet; new connections are balanced afresh.
    Flush {
        #[arg(long, value_name = "NAME|ID")]
        service: ServiceSel,
        /// Do not ask (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Delete one flow (both entries): the one from client ADDR:PORT to the service.
    Delete {
        #[arg(long, value_name = "ADDR:PORT")]
        client: SocketAddr,
        #[arg(long, value_name = "NAME|ID")]
        service: ServiceSel,
        /// Do not ask (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Daemon(Box<DaemonError>),
    #[error(transparent)]
    Datapath(Box<DatapathError>),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(transparent)]
    Status(#[from] status::StatusError),
}

impl CliError {
    /// The process exit code: 1, or the documented code of an `inspect`/`flows` error.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Inspect(e) => e.exit_code(),
            Self::Status(e) => e.exit_code(),
            _ => inspect::exit::FAILURE,
        }
    }
}

impl From<DaemonError> for CliError {
    fn from(e: DaemonError) -> Self {
        Self::Daemon(Box::new(e))
    }
}

impl From<DatapathError> for CliError {
    fn from(e: DatapathError) -> Self {
        Self::Datapath(Box::new(e))
    }
}

/// Run a parsed command. Output of `check` and `inspect` goes to stdout.
///
/// # Errors
/// Whatever made the command fail; the message names the file, key, map or path.
pub fn dispatch(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Run { config } => Ok(daemon::run(
            &config,
            proxy_ebpf_object::EBPF_OBJECT,
            RunOptions::default(),
        )?),
        Command::Check { config } => {
            print!("{}", check(&config)?);
            Ok(())
        }
        Command::Status {
            admin,
            config,
            json,
        } => {
            print!("{}", status_cmd(admin, config.as_deref(), json)?);
            Ok(())
        }
        Command::Inspect { what } => inspect_cmd(&what),
        Command::Flows { action } => {
            print!("{}", flows_cmd(&action)?);
            Ok(())
        }
    }
}

/// `check`: validate and summarise.
///
/// # Errors
/// The config's problems.
pub fn check(path: &Path) -> Result<String, ConfigError> {
    let c = Config::load(path)?;
    let l4 = c.l4_services().count();
    let http = c
        .services
        .iter()
        .filter(|s| s.mode == ServiceMode::Http)
        .count();
    let mut snat = match (c.nat.snat_ipv4, c.nat.first_home_cidr(false)) {
        (Some(a), _) => a.to_string(),
        (None, Some(_)) => "from the route home (at run time)".to_owned(),
        (None, None) => "none (no IPv4 home CIDR)".to_owned(),
    };
    if c.nat.first_home_cidr(true).is_some() || c.nat.snat_ipv6.is_some() {
        snat.push_str(&c.nat.snat_ipv6.map_or_else(
            || ", IPv6 SNAT from the IPv6 route home (at run time)".to_owned(),
            |a| format!(", IPv6 SNAT {a}"),
        ));
    }
    Ok(format!(
        "{}: OK: {} interface(s), mode {}, {l4} l4 service(s), {http} http service(s), SNAT \
         {snat} ports {}-{}, pin_dir {}\n(run-time checks not done here: the kernel's ephemeral \
         port range, the SNAT address from the route home, interfaces exist)\n",
        path.display(),
        c.datapath.interfaces.len(),
        c.datapath.mode,
        c.nat.port_min,
        c.nat.port_max,
        c.datapath.pin_dir.display(),
    ))
}

/// `status`: the admin address from `--admin`, `--config` or the default; the /status
/// document as a table (or unchanged with `json`).
fn status_cmd(
    admin: Option<SocketAddr>,
    config: Option<&Path>,
    json: bool,
) -> Result<String, CliError> {
    let addr = match (admin, config) {
        (Some(a), _) => a,
        (None, Some(path)) => Config::load(path)?.admin.listen,
        (None, None) => crate::config::DEFAULT_ADMIN_LISTEN
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9100))),
    };
    let doc = status::fetch(addr)?;
    if json {
        let mut doc = doc;
        if !doc.ends_with('\n') {
            doc.push('\n');
        }
        return Ok(doc);
    }
    status::render(&doc).map_err(|e| {
        CliError::Status(status::StatusError::BadAnswer {
            addr,
            what: format!("/status is not JSON: {e}"),
        })
    })
}

fn inspect_cmd(what: &InspectCommand) -> Result<(), CliError> {
    let out = match what {
        InspectCommand::Stats {
            args,
            watch: true,
            interval,
            count,
        } => {
            let interval = Duration::try_from_secs_f64(*interval)
                .ok()
                .filter(|d| *d >= Duration::from_millis(100))
                .ok_or_else(|| {
                    InspectError::BadArgument(format!(
                        "--interval {interval}: want at least 0.1 seconds"
                    ))
                })?;
            let stdout = std::io::stdout();
            let clear = !args.json && stdout.is_terminal();
            inspect::watch(
                &args.pins.source(),
                args.json,
                interval,
                *count,
                &mut stdout.lock(),
                clear,
            )?;
            return Ok(());
        }
        InspectCommand::Stats { args, .. } => inspect::stats(&args.pins.source(), args.json)?,
        InspectCommand::Flows {
            args,
            filter,
            limit,
        } => {
            let q = FlowQuery {
                service: filter.service.clone(),
                client: filter.client,
                upstream: filter.upstream,
                state: filter.state,
                limit: *limit,
            };
            inspect::flows(&args.pins.source(), &q, args.json)?
        }
        InspectCommand::Services(args) => inspect::services(&args.pins.source(), args.json)?,
        InspectCommand::Upstreams(args) => inspect::upstreams(&args.pins.source(), args.json)?,
        InspectCommand::Maps(args) => inspect::maps(&args.pins.source(), args.json)?,
    };
    print!("{out}");
    Ok(())
}

fn flows_cmd(action: &FlowsCommand) -> Result<String, InspectError> {
    match action {
        FlowsCommand::Flush { service, yes, pins } => inspect::flush(&pins.source(), service, *yes),
        FlowsCommand::Delete {
            client,
            service,
            yes,
            pins,
        } => inspect::delete(&pins.source(), *client, service, *yes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_shapes_the_tests_rely_on() {
        let cli = Cli::try_parse_from(["xdp-proxy", "run", "--config", "/x.toml"]).unwrap();
        assert!(
            matches!(cli.command, Command::Run { ref config } if config == Path::new("/x.toml"))
        );
        let cli = Cli::try_parse_from([
            "xdp-proxy",
            "inspect",
            "stats",
            "--json",
            "--pin-dir",
            "/run/xpd-bpffs/p",
        ])
        .unwrap();
        match cli.command {
            Command::Inspect {
                what: InspectCommand::Stats { args, watch, .. },
            } => {
                assert!(args.json && !watch);
                assert_eq!(args.pins.pin_dir, Path::new("/run/xpd-bpffs/p"));
                assert_eq!(args.pins.meta_dir, Path::new("/run/xdp-proxy"));
            }
            other => panic!("{other:?}"),
        }
        let cli =
            Cli::try_parse_from(["xdp-proxy", "--log-level", "debug", "inspect", "flows"]).unwrap();
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        match cli.command {
            Command::Inspect {
                what:
                    InspectCommand::Flows {
                        args,
                        filter,
                        limit,
                    },
            } => {
                assert!(!args.json);
                assert_eq!(args.pins.pin_dir, Path::new(DEFAULT_PIN_DIR));
                assert_eq!(filter.service, None);
                assert_eq!(limit, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["xdp-proxy", "run"]).is_err());
        let cli =
            Cli::try_parse_from(["xdp-proxy", "status", "--admin", "127.0.0.1:9200"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status { admin: Some(a), config: None, json: false } if a.port() == 9200
        ));
        assert!(
            Cli::try_parse_from(["xdp-proxy", "status", "--admin", "x", "--config", "/x"]).is_err()
        );
    }

    #[test]
    fn inspect_and_flows_arguments() {
        let cli = Cli::try_parse_from([
            "xdp-proxy",
            "inspect",
            "flows",
            "--service",
            "web",
            "--client",
            "10.0.0.0/8",
            "--upstream",
            "10.20.1.2:80",
            "--state",
            "established",
            "--limit",
            "5",
        ])
        .unwrap();
        match cli.command {
            Command::Inspect {
                what: InspectCommand::Flows { filter, limit, .. },
            } => {
                assert_eq!(filter.service, Some(ServiceSel::Name("web".into())));
                assert_eq!(
                    filter.client,
                    Some(ClientSel::Cidr("10.0.0.0/8".parse().unwrap()))
                );
                assert_eq!(filter.upstream.map(|u| u.port), Some(Some(80)));
                assert_eq!(filter.state, Some(FlowState::Established));
                assert_eq!(limit, Some(5));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "xdp-proxy",
            "inspect",
            "stats",
            "--watch",
            "--interval",
            "0.5",
            "--count",
            "3",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Inspect {
                what: InspectCommand::Stats {
                    watch: true,
                    count: Some(3),
                    ..
                }
            }
        ));
        // --count without --watch is a usage error.
        assert!(Cli::try_parse_from(["xdp-proxy", "inspect", "stats", "--count", "3"]).is_err());
        assert!(Cli::try_parse_from(["xdp-proxy", "inspect", "flows", "--state", "open"]).is_err());
        let cli = Cli::try_parse_from([
            "xdp-proxy",
            "flows",
            "delete",
            "--client",
            "10.0.0.2:40000",
            "--service",
            "3",
            "--yes",
        ])
        .unwrap();
        match cli.command {
            Command::Flows {
                action:
                    FlowsCommand::Delete {
                        client,
                        service,
                        yes,
                        ..
                    },
            } => {
                assert_eq!(client, "10.0.0.2:40000".parse().unwrap());
                assert_eq!(service, ServiceSel::Id(3));
                assert!(yes);
            }
            other => panic!("{other:?}"),
        }
        // delete needs the client's port; flush needs a service.
        assert!(
            Cli::try_parse_from([
                "xdp-proxy",
                "flows",
                "delete",
                "--client",
                "10.0.0.2",
                "--service",
                "3"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["xdp-proxy", "flows", "flush"]).is_err());
    }

    #[test]
    fn check_reports_ok_and_errors() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let ok = check(&dir.join("valid_full.toml")).unwrap();
        assert!(
            ok.contains("OK: 2 interface(s), mode native, 2 l4 service(s), 1 http"),
            "{ok}"
        );
        let ds = check(&dir.join("valid_dualstack.toml")).unwrap();
        assert!(
            ds.contains("3 l4 service(s), 1 http service(s), SNAT 10.20.0.1, IPv6 SNAT fd00:20::1"),
            "{ds}"
        );
        let err = check(&dir.join("invalid_many.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid_many.toml: service[0].upstreams[1]"),
            "{err}"
        );
        let err = check(&dir.join("does_not_exist.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does_not_exist.toml: cannot read config file"),
            "{err}"
        );
    }

    #[test]
    fn inspect_without_pin_dir_says_so() {
        let err = inspect_cmd(&InspectCommand::Stats {
            args: InspectArgs {
                json: true,
                pins: PinArgs {
                    pin_dir: PathBuf::from("/nonexistent/xpd-pins"),
                    meta_dir: PathBuf::from("/nonexistent/xpd-meta"),
                },
            },
            watch: false,
            interval: 1.0,
            count: None,
        })
        .unwrap_err();
        assert_eq!(err.exit_code(), inspect::exit::NO_PIN_DIR);
        let err = err.to_string();
        assert!(
            err.contains(&format!(
                "pin directory /nonexistent/xpd-pins/v{} does not exist",
                proxy_common::ABI_VERSION
            )),
            "{err}"
        );
    }
}
