//! Command line: `run`, `check`, `inspect`. `main.rs` parses, sets up logging and calls
//! [`dispatch`].

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::{
    config::{Config, ConfigError, DEFAULT_PIN_DIR, ServiceMode},
    daemon::{self, DaemonError, RunOptions},
    datapath::{DatapathError, Maps},
    inspect,
};

/// Most flows `inspect flows` lists.
const MAX_FLOW_ROWS: usize = 100_000;

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
    /// SIGINT/SIGTERM (then detach; the pinned maps and their flows stay).
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file without touching the system (exit 0 when valid).
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Read the pinned maps (works while the daemon is down).
    Inspect {
        #[command(subcommand)]
        what: InspectCommand,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The daemon's datapath.pin_dir (maps are read from `<DIR>/v1/`).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Reason counters, and traffic counters per service and per upstream.
    Stats(InspectArgs),
    /// Forward flows with their reverse entries.
    Flows(InspectArgs),
    /// Services in the datapath with their Maglev slot shares.
    Services(InspectArgs),
    /// Active upstream slots.
    Upstreams(InspectArgs),
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Daemon(Box<DaemonError>),
    #[error(transparent)]
    Datapath(Box<DatapathError>),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(#[source] std::io::Error),
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
        Command::Inspect { what } => {
            print!("{}", inspect_cmd(&what)?);
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
    let snat = c.nat.snat_ipv4.map_or_else(
        || "from the route home (at run time)".to_owned(),
        |a| a.to_string(),
    );
    Ok(format!(
        "{}: OK: {} interface(s), mode {}, {l4} l4 service(s), {http} http service(s) (not served \
         yet), SNAT {snat} ports {}-{}, pin_dir {}\n(run-time checks not done here: the kernel's \
         ephemeral port range, the SNAT address from the route home, interfaces exist)\n",
        path.display(),
        c.datapath.interfaces.len(),
        c.datapath.mode,
        c.nat.port_min,
        c.nat.port_max,
        c.datapath.pin_dir.display(),
    ))
}

fn inspect_cmd(what: &InspectCommand) -> Result<String, CliError> {
    match what {
        InspectCommand::Stats(args) => {
            let maps = Maps::open_pinned(&args.pin_dir)?;
            let report = inspect::build_stats(
                &maps.reasons()?,
                &maps.services()?,
                &maps.upstream_slots()?,
                &maps.service_counters()?,
                &maps.upstream_counters()?,
            );
            Ok(if args.json {
                serde_json::to_string_pretty(&report)? + "\n"
            } else {
                inspect::render_stats(&report)
            })
        }
        InspectCommand::Flows(args) => {
            let maps = Maps::open_pinned(&args.pin_dir)?;
            let now = daemon::monotonic_ns().map_err(CliError::Clock)?;
            let rows = inspect::build_flows(&maps.flows(MAX_FLOW_ROWS)?, now);
            Ok(if args.json {
                serde_json::to_string_pretty(&rows)? + "\n"
            } else {
                inspect::render_flows(&rows)
            })
        }
        InspectCommand::Services(args) => {
            let maps = Maps::open_pinned(&args.pin_dir)?;
            let services = maps.services()?;
            let tables = services
                .iter()
                .map(|(_, v)| Ok((v.id, maps.maglev_table(v.id)?)))
                .collect::<Result<Vec<_>, DatapathError>>()?;
            let rows = inspect::build_services(&services, &maps.upstream_slots()?, &tables);
            Ok(if args.json {
                serde_json::to_string_pretty(&rows)? + "\n"
            } else {
                inspect::render_services(&rows)
            })
        }
        InspectCommand::Upstreams(args) => {
            let maps = Maps::open_pinned(&args.pin_dir)?;
            let rows = inspect::build_upstreams(&maps.upstream_slots()?);
            Ok(if args.json {
                serde_json::to_string_pretty(&rows)? + "\n"
            } else {
                inspect::render_upstreams(&rows)
            })
        }
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
                what: InspectCommand::Stats(a),
            } => {
                assert!(a.json);
                assert_eq!(a.pin_dir, Path::new("/run/xpd-bpffs/p"));
            }
            other => panic!("{other:?}"),
        }
        let cli =
            Cli::try_parse_from(["xdp-proxy", "--log-level", "debug", "inspect", "flows"]).unwrap();
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        match cli.command {
            Command::Inspect {
                what: InspectCommand::Flows(a),
            } => {
                assert!(!a.json);
                assert_eq!(a.pin_dir, Path::new(DEFAULT_PIN_DIR));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["xdp-proxy", "run"]).is_err());
    }

    #[test]
    fn check_reports_ok_and_errors() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let ok = check(&dir.join("valid_full.toml")).unwrap();
        assert!(
            ok.contains("OK: 2 interface(s), mode native, 2 l4 service(s), 1 http"),
            "{ok}"
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
        let err = inspect_cmd(&InspectCommand::Stats(InspectArgs {
            json: true,
            pin_dir: PathBuf::from("/nonexistent/xpd-pins"),
        }))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("pin directory /nonexistent/xpd-pins/v1 does not exist"),
            "{err}"
        );
    }
}
