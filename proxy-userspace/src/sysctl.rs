//! The kernel settings the datapath needs in the daemon's network namespace
//! (docs/datapath.md step 9): forwarding on, and on every datapath interface plus `all`,
//! `accept_local=1` and `rp_filter=0`, so a packet the program rewrote to the SNAT source and
//! passed to the kernel is forwarded instead of dropped as a martian; with an IPv6 l4 service,
//! IPv6 forwarding on too ([`required_ipv6`]).

use std::{
    io,
    path::{Path, PathBuf},
};

/// One setting: a path under `/proc/sys` and the value to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Relative to the sysctl root, for example `net/ipv4/ip_forward`.
    pub path: String,
    pub value: &'static str,
}

impl Setting {
    /// Dotted name for logs (`net.ipv4.ip_forward`).
    #[must_use]
    pub fn name(&self) -> String {
        self.path.replace('/', ".")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("writing {value} to {}: {source}", path.display())]
pub struct SysctlError {
    pub path: PathBuf,
    pub value: &'static str,
    #[source]
    pub source: io::Error,
}

/// The settings for these interfaces (pure).
#[must_use]
pub fn required(interfaces: &[String]) -> Vec<Setting> {
    let mut out = vec![Setting {
        path: "net/ipv4/ip_forward".into(),
        value: "1",
    }];
    for dev in std::iter::once("all").chain(interfaces.iter().map(String::as_str)) {
        out.push(Setting {
            path: format!("net/ipv4/conf/{dev}/accept_local"),
            value: "1",
        });
        out.push(Setting {
            path: format!("net/ipv4/conf/{dev}/rp_filter"),
            value: "0",
        });
    }
    out
}

/// The IPv6 setting the datapath needs when a service is IPv6: forwarding on (`all`), without
/// which the XDP program's `bpf_fib_lookup(AF_INET6)` answers "forwarding disabled" and every
/// IPv6 packet takes the kernel's path. (IPv6 has no `accept_local` or `rp_filter`; the kernel's
/// ephemeral port range, `net.ipv4.ip_local_port_range`, covers IPv6 sockets too.)
#[must_use]
pub fn required_ipv6() -> Vec<Setting> {
    vec![Setting {
        path: "net/ipv6/conf/all/forwarding".into(),
        value: "1",
    }]
}

/// Apply `settings` under `root` (normally `/proc/sys`), returning each old value.
///
/// # Errors
/// The first setting that cannot be read or written.
pub fn apply(root: &Path, settings: &[Setting]) -> Result<Vec<(Setting, String)>, SysctlError> {
    let mut out = Vec::new();
    for s in settings {
        let path = root.join(&s.path);
        let err = |source| SysctlError {
            path: path.clone(),
            value: s.value,
            source,
        };
        let old = std::fs::read_to_string(&path)
            .map_err(err)?
            .trim()
            .to_owned();
        if old != s.value {
            std::fs::write(&path, s.value).map_err(err)?;
        }
        out.push((s.clone(), old));
    }
    Ok(out)
}

/// `net.ipv4.ip_local_port_range`, parsed.
///
/// # Errors
/// Unreadable file or unexpected contents.
pub fn ephemeral_port_range(root: &Path) -> io::Result<(u16, u16)> {
    let path = root.join("net/ipv4/ip_local_port_range");
    let text = std::fs::read_to_string(&path)?;
    parse_port_range(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: unexpected contents `{}`", path.display(), text.trim()),
        )
    })
}

fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let lo = it.next()?.ok()?;
    let hi = it.next()?.ok()?;
    (it.next().is_none() && lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_settings_cover_all_and_each_interface() {
        let s = required(&["veth0".into(), "eth0.100".into()]);
        let names: Vec<String> = s
            .iter()
            .map(|x| format!("{}={}", x.path, x.value))
            .collect();
        assert_eq!(
            names,
            [
                "net/ipv4/ip_forward=1",
                "net/ipv4/conf/all/accept_local=1",
                "net/ipv4/conf/all/rp_filter=0",
                "net/ipv4/conf/veth0/accept_local=1",
                "net/ipv4/conf/veth0/rp_filter=0",
                "net/ipv4/conf/eth0.100/accept_local=1",
                "net/ipv4/conf/eth0.100/rp_filter=0",
            ]
        );
    }

    #[test]
    fn apply_writes_and_reports_old_values() {
        let root = std::env::temp_dir().join(format!("xpd-sysctl-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net/ipv4/conf/all")).unwrap();
        std::fs::write(root.join("net/ipv4/ip_forward"), "0\n").unwrap();
        std::fs::write(root.join("net/ipv4/conf/all/accept_local"), "1\n").unwrap();
        std::fs::write(root.join("net/ipv4/conf/all/rp_filter"), "2\n").unwrap();
        let done = apply(&root, &required(&[])).unwrap();
        let old: Vec<&str> = done.iter().map(|(_, o)| o.as_str()).collect();
        assert_eq!(old, ["0", "1", "2"]);
        assert_eq!(
            std::fs::read_to_string(root.join("net/ipv4/ip_forward")).unwrap(),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("net/ipv4/conf/all/rp_filter")).unwrap(),
            "0"
        );
        // A missing interface directory is an error naming the path.
        let err = apply(&root, &required(&["nope0".into()])).unwrap_err();
        assert!(err.to_string().contains("conf/nope0/accept_local"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn port_range_parsing() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 1024"), Some((1024, 1024)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("abc"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
    }
}
