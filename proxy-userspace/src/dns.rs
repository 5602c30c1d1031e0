//! A small stub resolver for DNS upstreams: an A query (names of IPv4 services) and/or an AAAA
//! query (names of IPv6 services) over UDP to the configured servers (or the `nameserver` lines
//! of /etc/resolv.conf), tried in order; the answers' A/AAAA records and their smallest TTL.
//! Pure encoding and parsing, unit-tested; the network part is two functions.
//!
//! Limits (documented in docs/xdp-proxy.example.toml): names are asked as written (absolute, no
//! search domains); a truncated answer is used as it is (no TCP retry); every A/AAAA record of
//! the answer section counts (CNAME chains as the recursive server resolved them). With both
//! families asked, a family without records is fine when the other has some; any other failure
//! of either query fails the resolution (the last good addresses stay).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use tokio::net::UdpSocket;

/// Default resolver config.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const HEADER_LEN: usize = 12;
/// Largest UDP answer read (EDNS is not asked for, so servers send at most 512 bytes).
const MAX_ANSWER: usize = 4096;

/// What a successful resolution gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Distinct addresses in answer order (A records, then AAAA records when both were asked).
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL of those records.
    pub ttl: Option<Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    #[error("no DNS server configured (dns.servers unset and no nameserver in {RESOLV_CONF})")]
    NoServers,
    #[error("{server}: {message}")]
    Io { server: SocketAddr, message: String },
    #[error("{server}: no answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("`{name}` does not exist (NXDOMAIN)")]
    NxDomain { name: String },
    #[error("server answered with error code {rcode}")]
    Rcode { rcode: u8 },
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    #[error("`{name}` has no A/AAAA record")]
    NoAddress { name: String },
}

/// The servers of a resolv.conf text (`nameserver ADDR`, port 53; IPv6 servers are kept too).
#[must_use]
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            match (it.next(), it.next()) {
                (Some("nameserver"), Some(a)) => a
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53)),
                _ => None,
            }
        })
        .collect()
}

/// Which record types a name is asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Families {
    /// A records (the name is an upstream of an IPv4 service).
    pub v4: bool,
    /// AAAA records (the name is an upstream of an IPv6 service).
    pub v6: bool,
}

impl Families {
    pub const V4: Self = Self {
        v4: true,
        v6: false,
    };
}

/// An A query for `name` with id `id`, recursion desired.
///
/// # Errors
/// [`DnsError::Malformed`] when `name` has an empty or too long label.
pub fn build_query(id: u16, name: &str) -> Result<Vec<u8>, DnsError> {
    build_query_type(id, name, false)
}

/// An A (`aaaa` false) or AAAA query for `name` with id `id`, recursion desired.
///
/// # Errors
/// [`DnsError::Malformed`] when `name` has an empty or too long label.
pub fn build_query_type(id: u16, name: &str, aaaa: bool) -> Result<Vec<u8>, DnsError> {
    let mut q = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    q.extend_from_slice(&[0; 6]); // AN, NS, AR
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..=63).contains(l))
            .ok_or(DnsError::Malformed("label length"))?;
        q.push(len);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&(if aaaa { TYPE_AAAA } else { TYPE_A }).to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(q)
}

fn u16_at(buf: &[u8], at: usize) -> Result<u16, DnsError> {
    buf.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(DnsError::Malformed("truncated"))
}

/// Offset just past the (possibly compressed) name starting at `at`.
fn skip_name(buf: &[u8], mut at: usize) -> Result<usize, DnsError> {
    // Bounded: a name has at most 128 labels.
    for _ in 0..128 {
        let len = *buf.get(at).ok_or(DnsError::Malformed("truncated name"))?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => {
                buf.get(at + 1)
                    .ok_or(DnsError::Malformed("truncated pointer"))?;
                return Ok(at + 2);
            }
            l if l & 0xc0 == 0 => at += 1 + usize::from(l),
            _ => return Err(DnsError::Malformed("bad label type")),
        }
    }
    Err(DnsError::Malformed("name too long"))
}

/// Parse the answer to query `id` for `name` (its A and AAAA records).
///
/// # Errors
/// Wrong id, not a response, an error code, or a malformed message; no A/AAAA record.
pub fn parse_response(id: u16, name: &str, buf: &[u8]) -> Result<Answer, DnsError> {
    if buf.len() < HEADER_LEN {
        return Err(DnsError::Malformed("shorter than a header"));
    }
    if u16_at(buf, 0)? != id {
        return Err(DnsError::Malformed("id does not match the query"));
    }
    let flags = u16_at(buf, 2)?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Malformed("not a response"));
    }
    let rcode = (flags & 0x000f) as u8;
    match rcode {
        0 => {}
        3 => {
            return Err(DnsError::NxDomain {
                name: name.to_owned(),
            });
        }
        r => return Err(DnsError::Rcode { rcode: r }),
    }
    let qd = u16_at(buf, 4)?;
    let an = u16_at(buf, 6)?;
    let mut at = HEADER_LEN;
    for _ in 0..qd {
        at = skip_name(buf, at)? + 4;
    }
    let mut addrs = Vec::new();
    let mut ttl: Option<u32> = None;
    for _ in 0..an {
        at = skip_name(buf, at)?;
        let rtype = u16_at(buf, at)?;
        let class = u16_at(buf, at + 2)?;
        let rttl = buf
            .get(at + 4..at + 8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(DnsError::Malformed("truncated record"))?;
        let rdlen = usize::from(u16_at(buf, at + 8)?);
        let rdata = buf
            .get(at + 10..at + 10 + rdlen)
            .ok_or(DnsError::Malformed("truncated record data"))?;
        at += 10 + rdlen;
        let addr = match (rtype, class) {
            (TYPE_A, CLASS_IN) => {
                let octets: [u8; 4] = rdata
                    .try_into()
                    .map_err(|_| DnsError::Malformed("A record is not 4 bytes"))?;
                Some(IpAddr::V4(Ipv4Addr::from(octets)))
            }
            (TYPE_AAAA, CLASS_IN) => {
                let octets: [u8; 16] = rdata
                    .try_into()
                    .map_err(|_| DnsError::Malformed("AAAA record is not 16 bytes"))?;
                Some(IpAddr::V6(Ipv6Addr::from(octets)))
            }
            _ => None,
        };
        if let Some(a) = addr {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
            ttl = Some(ttl.map_or(rttl, |t| t.min(rttl)));
        }
    }
    if addrs.is_empty() {
        return Err(DnsError::NoAddress {
            name: name.to_owned(),
        });
    }
    Ok(Answer {
        addrs,
        ttl: ttl.map(|t| Duration::from_secs(u64::from(t))),
    })
}

static NEXT_ID: AtomicU16 = AtomicU16::new(0);

fn query_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos as u16) ^ NEXT_ID.fetch_add(0x9e37, Ordering::Relaxed)
}

/// Resolve `name` for `families` (A and/or AAAA queries, one after the other) and merge the
/// answers ([`merge`]).
///
/// # Errors
/// See [`merge`].
pub async fn resolve(
    name: &str,
    servers: &[SocketAddr],
    timeout: Duration,
    families: Families,
) -> Result<Answer, DnsError> {
    let v4 = if families.v4 {
        Some(resolve_type(name, servers, timeout, false).await)
    } else {
        None
    };
    let v6 = if families.v6 {
        Some(resolve_type(name, servers, timeout, true).await)
    } else {
        None
    };
    merge(name, v4, v6)
}

/// One answer from the A and AAAA results (`None`: not asked): addresses of both, smallest
/// TTL. A family with no record is fine when the other has some.
///
/// # Errors
/// Any other error of either query (the first), or no record in any family asked.
pub fn merge(
    name: &str,
    v4: Option<Result<Answer, DnsError>>,
    v6: Option<Result<Answer, DnsError>>,
) -> Result<Answer, DnsError> {
    let mut out = Answer {
        addrs: Vec::new(),
        ttl: None,
    };
    for r in [v4, v6].into_iter().flatten() {
        match r {
            Ok(a) => {
                out.addrs.extend(a.addrs);
                out.ttl = match (out.ttl, a.ttl) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                };
            }
            Err(DnsError::NoAddress { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    if out.addrs.is_empty() {
        return Err(DnsError::NoAddress {
            name: name.to_owned(),
        });
    }
    Ok(out)
}

/// Resolve `name` (A records, or AAAA when `aaaa`) asking `servers` in order; the first answer
/// wins (NXDOMAIN and "no record" are answers too). Each server gets `timeout`.
///
/// # Errors
/// The last server's error.
async fn resolve_type(
    name: &str,
    servers: &[SocketAddr],
    timeout: Duration,
    aaaa: bool,
) -> Result<Answer, DnsError> {
    let mut last = DnsError::NoServers;
    for server in servers {
        match ask(name, *server, timeout, aaaa).await {
            Ok(a) => return Ok(a),
            Err(e @ (DnsError::NxDomain { .. } | DnsError::NoAddress { .. })) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn ask(
    name: &str,
    server: SocketAddr,
    timeout: Duration,
    aaaa: bool,
) -> Result<Answer, DnsError> {
    let io = |e: std::io::Error| DnsError::Io {
        server,
        message: e.to_string(),
    };
    let id = query_id();
    let query = build_query_type(id, name, aaaa)?;
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let attempt = async {
        let sock = UdpSocket::bind(bind).await.map_err(io)?;
        sock.connect(server).await.map_err(io)?;
        sock.send(&query).await.map_err(io)?;
        let mut buf = vec![0u8; MAX_ANSWER];
        // Skip stray datagrams (wrong id) until the timeout.
        loop {
            let n = sock.recv(&mut buf).await.map_err(io)?;
            match parse_response(id, name, &buf[..n]) {
                Err(DnsError::Malformed("id does not match the query")) => {}
                other => return other,
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| DnsError::Timeout { server, timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as a server builds it: the question, then `records` (name pointer to the
    /// question, type, class, TTL, data).
    fn response(id: u16, rcode: u16, name: &str, records: &[(u16, u32, Vec<u8>)]) -> Vec<u8> {
        let mut q = build_query(id, name).unwrap();
        q[2..4].copy_from_slice(&(0x8180u16 | rcode).to_be_bytes());
        q[6..8].copy_from_slice(&u16::try_from(records.len()).unwrap().to_be_bytes());
        for (rtype, ttl, data) in records {
            q.extend_from_slice(&[0xc0, 12]);
            q.extend_from_slice(&rtype.to_be_bytes());
            q.extend_from_slice(&CLASS_IN.to_be_bytes());
            q.extend_from_slice(&ttl.to_be_bytes());
            q.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            q.extend_from_slice(data);
        }
        q
    }

    #[test]
    fn query_layout() {
        let q = build_query(0x1234, "alb.home.example.").unwrap();
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[4..6], &[0, 1]);
        assert_eq!(&q[12..16], b"\x03alb");
        assert_eq!(&q[q.len() - 5..], &[0, 0, 1, 0, 1]);
        assert!(build_query(1, "a..b").is_err());
    }

    #[test]
    fn answers_with_cname_and_several_a_records() {
        let cname = b"\x03lb1\x04home\x00".to_vec();
        let r = response(
            7,
            0,
            "alb.home",
            &[
                (5, 300, cname),
                (TYPE_A, 60, vec![10, 20, 1, 2]),
                (TYPE_A, 30, vec![10, 20, 1, 3]),
                (TYPE_A, 60, vec![10, 20, 1, 2]),
            ],
        );
        let a = parse_response(7, "alb.home", &r).unwrap();
        assert_eq!(
            a.addrs,
            [
                IpAddr::V4(Ipv4Addr::new(10, 20, 1, 2)),
                IpAddr::V4(Ipv4Addr::new(10, 20, 1, 3))
            ]
        );
        assert_eq!(a.ttl, Some(Duration::from_secs(30)));
    }

    #[test]
    fn errors_are_told_apart() {
        let nx = response(7, 3, "x.home", &[]);
        assert_eq!(
            parse_response(7, "x.home", &nx),
            Err(DnsError::NxDomain {
                name: "x.home".into()
            })
        );
        let fail = response(7, 2, "x.home", &[]);
        assert_eq!(
            parse_response(7, "x.home", &fail),
            Err(DnsError::Rcode { rcode: 2 })
        );
        let empty = response(7, 0, "x.home", &[]);
        assert!(matches!(
            parse_response(7, "x.home", &empty),
            Err(DnsError::NoAddress { .. })
        ));
        let ok = response(7, 0, "x.home", &[(TYPE_A, 1, vec![10, 0, 0, 1])]);
        assert!(matches!(
            parse_response(8, "x.home", &ok),
            Err(DnsError::Malformed(_))
        ));
        // Truncated anywhere: an error, never a panic.
        for cut in 0..ok.len() {
            assert!(
                parse_response(7, "x.home", &ok[..cut]).is_err(),
                "cut {cut}"
            );
        }
        let bad_len = response(7, 0, "x.home", &[(TYPE_A, 1, vec![10, 0, 0])]);
        assert!(parse_response(7, "x.home", &bad_len).is_err());
        // A query (QR unset) is not an answer.
        let q = build_query(7, "x.home").unwrap();
        assert!(parse_response(7, "x.home", &q).is_err());
    }

    #[test]
    fn aaaa_query_and_records() {
        let q = build_query_type(9, "app.home", true).unwrap();
        assert_eq!(&q[q.len() - 4..], &[0, 28, 0, 1]);
        let v6: Ipv6Addr = "fd00:20::2".parse().unwrap();
        let r = response(
            9,
            0,
            "app.home",
            &[
                (TYPE_AAAA, 40, v6.octets().to_vec()),
                (TYPE_AAAA, 20, v6.octets().to_vec()),
            ],
        );
        let a = parse_response(9, "app.home", &r).unwrap();
        assert_eq!(a.addrs, [IpAddr::V6(v6)]);
        assert_eq!(a.ttl, Some(Duration::from_secs(20)));
        let short = response(9, 0, "app.home", &[(TYPE_AAAA, 40, vec![0; 4])]);
        assert_eq!(
            parse_response(9, "app.home", &short),
            Err(DnsError::Malformed("AAAA record is not 16 bytes"))
        );
    }

    #[test]
    fn merging_a_and_aaaa_answers() {
        let v4 = || {
            Ok(Answer {
                addrs: vec![IpAddr::V4(Ipv4Addr::new(10, 20, 0, 9))],
                ttl: Some(Duration::from_secs(30)),
            })
        };
        let v6 = || {
            Ok(Answer {
                addrs: vec!["fd00:20::9".parse().unwrap()],
                ttl: Some(Duration::from_secs(10)),
            })
        };
        let none = || {
            Err(DnsError::NoAddress {
                name: "n".to_owned(),
            })
        };
        let m = merge("n", Some(v4()), Some(v6())).unwrap();
        assert_eq!(m.addrs.len(), 2);
        assert_eq!(m.ttl, Some(Duration::from_secs(10)));
        // No AAAA record while A has some: fine (an IPv6 service just gets none).
        assert_eq!(merge("n", Some(v4()), Some(none())).unwrap().addrs.len(), 1);
        assert_eq!(merge("n", None, Some(v6())).unwrap().addrs.len(), 1);
        // No record at all, or any other failure: the resolution fails (last good kept).
        assert!(matches!(
            merge("n", Some(none()), Some(none())),
            Err(DnsError::NoAddress { .. })
        ));
        assert_eq!(
            merge("n", Some(v4()), Some(Err(DnsError::Rcode { rcode: 2 }))),
            Err(DnsError::Rcode { rcode: 2 })
        );
    }

    #[test]
    fn resolv_conf() {
        let text =
            "# comment\nsearch home\nnameserver 10.0.0.2\nnameserver ::1\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_servers(text),
            [
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn resolves_against_a_loopback_server() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        // Answers the A query and then the AAAA query, each with its own record type.
        let task = tokio::spawn(async move {
            for _ in 0..2 {
                let mut buf = [0u8; 512];
                let (n, peer) = server.recv_from(&mut buf).await.unwrap();
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                assert_eq!(&buf[12..n - 4], b"\x03app\x04home\x00");
                let qtype = u16::from_be_bytes([buf[n - 4], buf[n - 3]]);
                let record = if qtype == TYPE_AAAA {
                    let v6: Ipv6Addr = "fd00:20::9".parse().unwrap();
                    (TYPE_AAAA, 7, v6.octets().to_vec())
                } else {
                    (TYPE_A, 5, vec![10, 20, 0, 9])
                };
                let r = response(id, 0, "app.home", &[record]);
                server.send_to(&r, peer).await.unwrap();
            }
        });
        let both = Families { v4: true, v6: true };
        let a = resolve("app.home", &[addr], Duration::from_secs(2), both)
            .await
            .unwrap();
        assert_eq!(
            a.addrs,
            [
                IpAddr::V4(Ipv4Addr::new(10, 20, 0, 9)),
                "fd00:20::9".parse::<IpAddr>().unwrap()
            ]
        );
        assert_eq!(a.ttl, Some(Duration::from_secs(5)));
        task.await.unwrap();
        // Nobody answers: a timeout naming the server.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let e = resolve(
            "app.home",
            &[silent.local_addr().unwrap()],
            Duration::from_millis(100),
            Families::V4,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, DnsError::Timeout { .. }), "{e:?}");
        assert_eq!(
            resolve("x", &[], Duration::from_millis(1), Families::V4).await,
            Err(DnsError::NoServers)
        );
    }
}
