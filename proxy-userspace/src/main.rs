//! `xdp-proxy`: parse arguments, set up logging, hand over to the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use xdp_proxy::cli::{Cli, dispatch};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Kept to the end of main: dropping it writes out the buffered access log.
    let _log = match xdp_proxy::logging::init(cli.log_level.as_deref()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error's text already carries its causes (file, key, map, path, errno).
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
