//! `cargo xtask docs [--out DIR]`: shell completions and man pages generated from the clap
//! definitions of `xdp-proxy` (clap_complete, clap_mangen).
//!
//! The daemon's `Cli` lives in `proxy-userspace`, whose build compiles the XDP object, which
//! needs what `setup` installs. So plain xtask does not link it: `docs` runs setup, then runs
//! xtask again with the `docs` feature (which adds the dependency) and the hidden `docs-gen`
//! command, which does the writing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use clap_complete::Shell;

/// Where the files go without `--out`.
pub fn default_out(root: &Path) -> PathBuf {
    root.join("target").join("docs")
}

/// `cargo xtask docs`: setup, then `cargo run -p xtask --features docs -- docs-gen --out DIR`.
pub fn run(root: &Path, out: &Path) -> Result<()> {
    crate::setup::run(false)?;
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root)
        .args([
            "run",
            "--quiet",
            "-p",
            "xtask",
            "--features",
            "docs",
            "--",
            "docs-gen",
            "--out",
        ])
        .arg(out);
    crate::run_cmd(&mut cmd)
}

/// Every page of `cmd`: one for the command and one per (nested) subcommand, named
/// `<bin>-<sub>-<subsub>.1`.
fn man_pages(
    cmd: &clap::Command,
    prefix: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    let name = if prefix.is_empty() {
        cmd.get_name().to_owned()
    } else {
        format!("{prefix}-{}", cmd.get_name())
    };
    // The page's title is its full name, so `man xdp-proxy-inspect-flows` finds it.
    let page_cmd = cmd.clone().name(name.clone());
    let mut buf = Vec::new();
    clap_mangen::Man::new(page_cmd)
        .render(&mut buf)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    // Not clap's generated `help` subcommand: the pages already say everything.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        man_pages(sub, &name, dir, written)?;
    }
    Ok(())
}

/// Write completions for bash, zsh, fish, elvish and PowerShell into `<out>/completions/` and
/// man pages into `<out>/man/man1/`. Returns every file written.
#[cfg_attr(
    not(any(feature = "docs", test)),
    expect(
        dead_code,
        reason = "called by docs-gen, which is built with the docs feature"
    )
)]
pub fn generate(cmd: clap::Command, out: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = cmd;
    cmd.build();
    let bin = cmd.get_name().to_owned();
    let completions = out.join("completions");
    let man = out.join("man").join("man1");
    for dir in [&completions, &man] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut written = Vec::new();
    for shell in [
        Shell::Bash,
        Shell::Zsh,
        Shell::Fish,
        Shell::Elvish,
        Shell::PowerShell,
    ] {
        let path =
            clap_complete::generate_to(shell, &mut cmd, &bin, &completions).with_context(|| {
                format!("writing {shell} completions into {}", completions.display())
            })?;
        written.push(path);
    }
    man_pages(&cmd, "", &man, &mut written)?;
    Ok(written)
}

/// The hidden `docs-gen` command (built with the `docs` feature).
#[cfg(feature = "docs")]
pub fn generate_for_xdp_proxy(out: &Path) -> Result<()> {
    use clap::CommandFactory as _;
    let files = generate(xdp_proxy::cli::Cli::command(), out)?;
    for f in &files {
        println!("{}", f.display());
    }
    println!(
        "xtask: {} files; try `man -l {}` or `source {}`",
        files.len(),
        out.join("man/man1/xdp-proxy-inspect-flows.1").display(),
        out.join("completions/xdp-proxy.bash").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> clap::Command {
        clap::Command::new("toy")
            .about("a toy")
            .subcommand(
                clap::Command::new("inspect").about("look").subcommand(
                    clap::Command::new("flows").arg(clap::Arg::new("limit").long("limit")),
                ),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn writes_completions_and_one_page_per_command() {
        let out = std::env::temp_dir().join(format!("xtask-docs-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&out);
        let files = generate(toy(), &out).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "toy.bash",
                "_toy",
                "toy.fish",
                "toy.elv",
                "_toy.ps1",
                "toy.1",
                "toy-inspect.1",
                "toy-inspect-flows.1"
            ]
        );
        let bash = fs::read_to_string(out.join("completions/toy.bash")).unwrap();
        assert!(bash.contains("--limit"), "{bash}");
        let page = fs::read_to_string(out.join("man/man1/toy-inspect-flows.1")).unwrap();
        assert!(
            page.contains(".TH toy-inspect-flows 1") && page.contains("limit"),
            "{page}"
        );
        fs::remove_dir_all(&out).unwrap();
    }
}
