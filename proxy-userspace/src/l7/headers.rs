//! Header rules of the reverse proxy (pure): hop-by-hop headers removed as RFC 9110 section 7.6.1
//! says, and the client's address appended in X-Forwarded-For and Forwarded (RFC 7239).
//!
//! Forwarding headers by peer ([`Client::new`]'s `trusted`: the peer is one of the service's
//! `trusted_proxies`):
//!
//! | header | untrusted peer | trusted peer |
//! |---|---|---|
//! | `X-Forwarded-For` | the peer appended | the peer appended |
//! | `X-Forwarded-Proto` | set to the connection's (`http`) | kept; set when absent |
//! | `X-Forwarded-Port` | removed | kept |
//! | `Forwarded` | the client's elements removed, ours alone | ours appended |
//!
//! The access log's client behind a trusted peer: [`real_client`].

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::config::IpCidr;

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{CONNECTION, FORWARDED, TE, TRAILER, TRANSFER_ENCODING, UPGRADE},
};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// The hop-by-hop headers every message loses (besides those `Connection` names).
const HOP_BY_HOP_COUNT: usize = 7;
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    CONNECTION,
    KEEP_ALIVE,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_CONNECTION,
];

/// Whether `name` is one of the hop-by-hop headers every message loses (the headers a
/// `Connection` header names aside).
#[must_use]
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.iter().any(|n| n == name)
}

/// The protocol a message asks to upgrade to (`Connection: upgrade` and an `Upgrade` header),
/// read before the hop-by-hop headers are removed.
#[must_use]
pub fn upgrade_request(h: &HeaderMap) -> Option<HeaderValue> {
    let wants = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants { h.get(UPGRADE).cloned() } else { None }
}

/// Remove the hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade` and `Proxy-Connection`. With `upgrade`, the
/// upgrade is passed on (`Connection: upgrade`, `Upgrade: <upgrade>`).
pub fn remove_hop_by_hop(h: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    // One pass over the names: which hop-by-hop headers are there (most messages carry none,
    // or only `Connection: keep-alive`), instead of a removal (a hash lookup) per name.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == name) {
            present[i] = true;
        }
    }
    if present[0] {
        // Headers `Connection` names, besides the ones removed anyway (and `close`). The usual
        // values, `keep-alive` and `close` alone, name none: no list to split.
        let mut named: Vec<HeaderName> = Vec::new();
        for v in h.get_all(CONNECTION) {
            let b = v.as_bytes();
            if b.eq_ignore_ascii_case(b"keep-alive") || b.eq_ignore_ascii_case(b"close") {
                continue;
            }
            let Ok(v) = v.to_str() else { continue };
            named.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|t| {
                        !t.eq_ignore_ascii_case("close")
                            && !HOP_BY_HOP
                                .iter()
                                .any(|n| t.eq_ignore_ascii_case(n.as_str()))
                    })
                    .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()),
            );
        }
        for name in named {
            h.remove(name);
        }
    }
    for (name, there) in HOP_BY_HOP.iter().zip(present) {
        if there {
            h.remove(name);
        }
    }
    if let Some(u) = upgrade {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(UPGRADE, u.clone());
    }
}

/// Every value of `name` joined with ", " (a list header sent as several lines), then `item`.
fn append_list(h: &mut HeaderMap, name: &HeaderName, item: HeaderValue) {
    // One hash of the name for the usual case: the first proxy on the way.
    let mut existing = match h.entry(name) {
        http::header::Entry::Vacant(v) => {
            v.insert(item);
            return;
        }
        http::header::Entry::Occupied(o) => o,
    };
    let mut joined = Vec::new();
    join_list(&mut joined, existing.iter(), item.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        existing.insert(v);
    }
}

/// `values` (trimmed, empty ones left out) and `item`, joined with ", ": how a list header
/// sent as several lines is passed on with one more element, in the map ([`append_list`]) and
/// in a hand-written head ([`write_forwarded`]) alike.
fn join_list<'a>(out: &mut Vec<u8>, values: impl Iterator<Item = &'a HeaderValue>, item: &[u8]) {
    for v in values {
        if let Ok(v) = v.to_str() {
            let v = v.trim();
            if !v.is_empty() {
                out.extend_from_slice(v.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(item);
}

/// An RFC 7239 node: IPv4 as is, IPv6 quoted in brackets.
fn node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => ip_text(ip),
        IpAddr::V6(a) => format!("\"[{a}]\""),
    }
}

/// `ip` as text, the same as its `Display`. IPv4 is written digit by digit: the formatter's
/// padding machinery cost about 1,000 instructions per address, paid on every new client
/// connection.
#[must_use]
pub fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(a) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in a.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

/// `addr` as text (`ip:port`, `[ip6]:port`), the same as its `Display`.
#[must_use]
pub fn socket_text(addr: std::net::SocketAddr) -> String {
    match addr {
        std::net::SocketAddr::V4(a) => {
            let mut out = ip_text(IpAddr::V4(*a.ip()));
            out.push(':');
            crate::logging::push_padded(&mut out, u64::from(a.port()), 1);
            out
        }
        std::net::SocketAddr::V6(_) => addr.to_string(),
    }
}

/// Whether `v` is an RFC 9110 token.
fn is_token(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `v` as a quoted string (control characters dropped, `"` and `\` escaped).
fn quoted(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The client of one connection as the forwarding headers show it, formatted once per
/// connection instead of once per request.
#[derive(Debug)]
pub struct Client {
    /// The address as `X-Forwarded-For` lists it.
    xff: HeaderValue,
    /// `for=<node>;proto=<proto>`: the start of this client's `Forwarded` element.
    forwarded: String,
    /// The last Host and the `Forwarded` element made with it (a connection's requests
    /// usually name the same host).
    last: std::sync::Mutex<Option<(HeaderValue, HeaderValue)>>,
    /// The peer is a trusted front proxy: its `X-Forwarded-Proto`, `X-Forwarded-Port` and
    /// `Forwarded` are passed on (see the module's table).
    trusted: bool,
}

impl Client {
    /// The forwarding part of the peer `ip` on a connection of `proto`; `trusted`: the peer is
    /// one of the service's `trusted_proxies`.
    #[must_use]
    pub fn new(ip: IpAddr, proto: &'static str, trusted: bool) -> Self {
        let text = ip_text(ip);
        let xff = HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("-"));
        let node = if ip.is_ipv4() { text } else { node(ip) };
        let mut forwarded = String::with_capacity(node.len() + 11 + proto.len());
        forwarded.push_str("for=");
        forwarded.push_str(&node);
        forwarded.push_str(";proto=");
        forwarded.push_str(proto);
        Self {
            xff,
            forwarded,
            last: std::sync::Mutex::new(None),
            trusted,
        }
    }

    /// Whether the peer is a trusted front proxy.
    #[must_use]
    pub fn trusted(&self) -> bool {
        self.trusted
    }

    /// This client's `Forwarded` element for a request with `host` (its Host header).
    fn forwarded(&self, host: Option<&HeaderValue>) -> Option<HeaderValue> {
        let Some(host) = host else {
            return HeaderValue::try_from(self.forwarded.clone()).ok();
        };
        if let Ok(last) = self.last.lock()
            && let Some((h, fwd)) = last.as_ref()
            && h == host
        {
            return Some(fwd.clone());
        }
        let text = host.to_str().ok()?;
        let mut fwd = String::with_capacity(self.forwarded.len() + 8 + text.len());
        fwd.push_str(&self.forwarded);
        fwd.push_str(";host=");
        if is_token(text) {
            fwd.push_str(text);
        } else {
            fwd.push_str(&quoted(text));
        }
        let fwd = HeaderValue::try_from(fwd).ok()?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some((host.clone(), fwd.clone()));
        }
        Some(fwd)
    }
}

/// Append the client to `X-Forwarded-For` and `Forwarded` (`for=...;proto=...;host=...`), and
/// set `X-Forwarded-Proto`.
pub fn add_forwarded(h: &mut HeaderMap, client: IpAddr, proto: &'static str, host: Option<&str>) {
    let host = host.and_then(|v| HeaderValue::from_str(v).ok());
    add_forwarded_for(h, &Client::new(client, proto, false), proto, host.as_ref());
}

/// [`add_forwarded`] with the client's part already formatted (`client` made with the same
/// `proto`); `host` is the request's Host header (used only when it is visible ASCII).
pub fn add_forwarded_for(
    h: &mut HeaderMap,
    client: &Client,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    h.reserve(3);
    append_list(h, &X_FORWARDED_FOR, client.xff.clone());
    let host = host.filter(|v| v.to_str().is_ok());
    let fwd = client.forwarded(host);
    if client.trusted {
        if let http::header::Entry::Vacant(v) = h.entry(X_FORWARDED_PROTO) {
            v.insert(HeaderValue::from_static(proto));
        }
        if let Some(fwd) = fwd {
            append_list(h, &FORWARDED, fwd);
        }
    } else {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        h.remove(X_FORWARDED_PORT);
        match fwd {
            Some(fwd) => {
                h.insert(FORWARDED, fwd);
            }
            None => {
                h.remove(FORWARDED);
            }
        }
    }
}

/// Whether `name` is one of the headers [`add_forwarded_for`] sets, appends to or removes.
#[must_use]
pub fn is_forwarding(name: &HeaderName) -> bool {
    *name == X_FORWARDED_FOR
        || *name == X_FORWARDED_PROTO
        || *name == FORWARDED
        || *name == X_FORWARDED_PORT
}

/// The forwarding headers exactly as [`add_forwarded_for`] would leave them in `h`, written as
/// head lines into `out` (for a request head written by hand, [`super::direct`], which leaves
/// out `h`'s own lines of those names: [`is_forwarding`]). No header map insert per request;
/// `h` is searched only when `in_h` (the caller saw such a line).
pub fn write_forwarded(
    out: &mut Vec<u8>,
    h: &HeaderMap,
    in_h: bool,
    client: &Client,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    let h = in_h.then_some(h);
    write_list(out, h, &X_FORWARDED_FOR, client.xff.as_bytes());
    // A trusted peer's own lines, as received; none from anyone else.
    let kept = h.filter(|_| client.trusted);
    let mut proto_kept = false;
    if let Some(h) = kept {
        for v in &h.get_all(X_FORWARDED_PROTO) {
            proto_kept = true;
            write_line(out, &X_FORWARDED_PROTO, v.as_bytes());
        }
        for v in &h.get_all(X_FORWARDED_PORT) {
            write_line(out, &X_FORWARDED_PORT, v.as_bytes());
        }
    }
    if !proto_kept {
        write_line(out, &X_FORWARDED_PROTO, proto.as_bytes());
    }
    let host = host.filter(|v| v.to_str().is_ok());
    if let Some(fwd) = client.forwarded(host) {
        write_list(out, kept, &FORWARDED, fwd.as_bytes());
    }
}

/// One line `name: value`.
fn write_line(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The client of a request from `peer` as NGINX's realip module finds it with
/// `real_ip_recursive on`: from an untrusted peer, the peer; from a trusted one, the first
/// address not in `trusted` walking `X-Forwarded-For` from the right (its last line's last
/// element first). Empty elements are skipped (list syntax, RFC 9110 section 5.6.1); an
/// element that is not an address (`unknown`, an obfuscated name, garbage) ends the walk at the
/// last address walked, the trusted hop that passed it on: what lies to its left may have
/// been written by anyone. Addresses may carry a port (`192.0.2.1:4711`, `[2001:db8::1]:80`)
/// or brackets (`[2001:db8::1]`). Every address trusted: the leftmost one. No allocation.
#[must_use]
pub fn real_client(peer: IpAddr, h: &HeaderMap, trusted: &[IpCidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| {
        let ip = ip.to_canonical();
        trusted.iter().any(|c| c.contains(ip))
    };
    let mut found = peer;
    if !is_trusted(found) {
        return found;
    }
    for line in h.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(line) = line.to_str() else {
            return found;
        };
        for element in line.rsplit(',').map(str::trim) {
            if element.is_empty() {
                continue;
            }
            let Some(ip) = node_address(element) else {
                return found;
            };
            found = ip;
            if !is_trusted(ip) {
                return ip;
            }
        }
    }
    found
}

/// The address of one `X-Forwarded-For` element.
fn node_address(element: &str) -> Option<IpAddr> {
    element
        .parse::<IpAddr>()
        .ok()
        .or_else(|| element.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            element
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })
}

/// One line `name: <the values of name in h>, item` ([`join_list`]).
fn write_list(out: &mut Vec<u8>, h: Option<&HeaderMap>, name: &HeaderName, item: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    join_list(out, h.into_iter().flat_map(|h| h.get_all(name)), item);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// Writing the forwarding lines by hand gives the values `add_forwarded_for` leaves in the
    /// map, whatever the client sent before.
    #[test]
    fn written_forwarding_lines_are_the_map_values() {
        let v4 = Client::new(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), "http", false);
        let v6 = Client::new("2001:db8::7".parse().unwrap(), "http", false);
        let v4_trusted = Client::new(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), "http", true);
        let v6_trusted = Client::new("2001:db8::7".parse().unwrap(), "http", true);
        let cases: [&[(&str, &str)]; 8] = [
            &[],
            &[("host", "app.example")],
            &[
                ("host", "app.example:8080"),
                ("x-forwarded-for", "192.0.2.1"),
            ],
            &[
                ("x-forwarded-for", "192.0.2.1, 192.0.2.2"),
                ("x-forwarded-for", " "),
                ("x-forwarded-for", "192.0.2.3 "),
                ("forwarded", "for=192.0.2.1"),
                ("x-forwarded-proto", "https"),
            ],
            &[("host", "bad host")],
            &[
                ("host", "app.example"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-port", "443"),
                ("x-forwarded-for", "203.0.113.9"),
                ("forwarded", "for=203.0.113.9;proto=https"),
                ("forwarded", "for=198.51.100.1"),
            ],
            &[("x-forwarded-port", "443"), ("x-keep", "1")],
            &[
                ("x-forwarded-proto", "https"),
                ("x-forwarded-proto", "wss"),
                ("x-forwarded-port", "443"),
                ("x-forwarded-port", "8443"),
            ],
        ];
        for client in [&v4, &v6, &v4_trusted, &v6_trusted] {
            for pairs in cases {
                let h = map(pairs);
                let host = h.get(http::header::HOST).cloned();
                let mut want = h.clone();
                add_forwarded_for(&mut want, client, "http", host.as_ref());
                let mut out = Vec::new();
                let in_h = h.keys().any(is_forwarding);
                write_forwarded(&mut out, &h, in_h, client, "http", host.as_ref());
                let text = String::from_utf8(out).unwrap();
                let mut got: Vec<(String, String)> = text
                    .split_terminator("\r\n")
                    .map(|l| {
                        let (n, v) = l.split_once(": ").unwrap();
                        (n.to_owned(), v.to_owned())
                    })
                    .collect();
                let mut wanted: Vec<(String, String)> = want
                    .iter()
                    .filter(|(n, _)| is_forwarding(n))
                    .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                    .collect();
                got.sort();
                wanted.sort();
                assert_eq!(got, wanted, "{pairs:?}");
            }
        }
    }

    /// The hand-written address text is what `Display` writes, for every digit count.
    #[test]
    fn address_text_matches_display() {
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
        for ip in [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(10, 100, 0, 2),
            Ipv4Addr::new(255, 255, 255, 255),
            Ipv4Addr::new(1, 22, 109, 200),
        ] {
            assert_eq!(ip_text(IpAddr::V4(ip)), ip.to_string());
            for port in [0u16, 7, 80, 443, 9999, 10_000, 65_535] {
                let a = SocketAddr::from((ip, port));
                assert_eq!(socket_text(a), a.to_string());
            }
        }
        let v6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
        assert_eq!(ip_text(IpAddr::V6(v6)), v6.to_string());
        let a = SocketAddr::from((v6, 8080));
        assert_eq!(socket_text(a), a.to_string());
    }

    #[test]
    fn hop_by_hop_headers_go_and_others_stay() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "close"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-keep", "yes"),
            ("host", "a.example"),
        ]);
        remove_hop_by_hop(&mut h, None);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-keep"]);
    }

    #[test]
    fn upgrade_is_passed_on_when_asked() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("x", "1"),
        ]);
        let up = upgrade_request(&h);
        assert_eq!(up.as_ref().unwrap(), "websocket");
        remove_hop_by_hop(&mut h, up.as_ref());
        assert_eq!(h.get(CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(UPGRADE).unwrap(), "websocket");
        // An Upgrade header without Connection: upgrade is not an upgrade.
        assert!(upgrade_request(&map(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn a_connection_client_reuses_its_forwarded_element_per_host() {
        let client = Client::new(IpAddr::V4(Ipv4Addr::new(10, 100, 0, 2)), "http", false);
        let a = HeaderValue::from_static("a.example");
        let b = HeaderValue::from_static("b example");
        for (host, want) in [
            (Some(&a), "for=10.100.0.2;proto=http;host=a.example"),
            (Some(&a), "for=10.100.0.2;proto=http;host=a.example"),
            (Some(&b), "for=10.100.0.2;proto=http;host=\"b example\""),
            (None, "for=10.100.0.2;proto=http"),
            (Some(&a), "for=10.100.0.2;proto=http;host=a.example"),
        ] {
            let mut h = HeaderMap::new();
            add_forwarded_for(&mut h, &client, "http", host);
            assert_eq!(h["forwarded"], want);
            assert_eq!(h["x-forwarded-for"], "10.100.0.2");
            assert_eq!(h["x-forwarded-proto"], "http");
        }
        // A Host that is not visible ASCII is left out of Forwarded.
        let mut h = HeaderMap::new();
        let odd = HeaderValue::from_bytes(b"caf\xc3\xa9.example").unwrap();
        add_forwarded_for(&mut h, &client, "http", Some(&odd));
        assert_eq!(h["forwarded"], "for=10.100.0.2;proto=http");
    }

    #[test]
    fn connection_keep_alive_alone_is_removed() {
        let mut h = map(&[
            ("connection", "keep-alive"),
            ("content-length", "5"),
            ("x-a", "1"),
        ]);
        remove_hop_by_hop(&mut h, None);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-a"]);
        let mut none = map(&[("x-a", "1")]);
        remove_hop_by_hop(&mut none, None);
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn forwarded_headers_are_appended() {
        let client = IpAddr::V4(Ipv4Addr::new(10, 100, 0, 2));
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.1.1.1"),
        ]);
        add_forwarded(&mut h, client, "http", Some("app.example:8080"));
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.100.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        // The client is no trusted proxy: what it wrote in Forwarded is not passed on.
        assert_eq!(
            h["forwarded"],
            "for=10.100.0.2;proto=http;host=\"app.example:8080\""
        );
        let mut fresh = HeaderMap::new();
        add_forwarded(
            &mut fresh,
            "::1".parse().unwrap(),
            "http",
            Some("a.example"),
        );
        assert_eq!(fresh["x-forwarded-for"], "::1");
        assert_eq!(
            fresh["forwarded"],
            "for=\"[::1]\";proto=http;host=a.example"
        );
    }

    /// What a client sends in the forwarding headers, every kind at once.
    fn sent() -> HeaderMap {
        map(&[
            ("host", "app.example"),
            ("x-forwarded-for", "203.0.113.9, 10.0.5.5"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "443"),
            ("forwarded", "for=203.0.113.9;proto=https"),
            ("x-other", "1"),
        ])
    }

    #[test]
    fn an_untrusted_peer_gets_its_forwarding_headers_set_from_the_connection() {
        let client = Client::new(IpAddr::V4(Ipv4Addr::new(10, 100, 0, 3)), "http", false);
        let mut h = sent();
        let host = h.get(http::header::HOST).cloned();
        add_forwarded_for(&mut h, &client, "http", host.as_ref());
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.5.5, 10.100.0.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h.get_all("x-forwarded-proto").iter().count(), 1);
        assert!(h.get("x-forwarded-port").is_none());
        assert_eq!(h["forwarded"], "for=10.100.0.3;proto=http;host=app.example");
        assert_eq!(h.get_all("forwarded").iter().count(), 1);
        assert_eq!(h["x-other"], "1");
        // And with no forwarding header from the client (the common case): ours alone.
        let mut h = map(&[("host", "app.example")]);
        add_forwarded_for(&mut h, &client, "http", host.as_ref());
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["forwarded", "host", "x-forwarded-for", "x-forwarded-proto"]
        );
    }

    #[test]
    fn a_trusted_peer_keeps_its_forwarding_headers() {
        let alb = Client::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 20)), "http", true);
        assert!(alb.trusted());
        let mut h = sent();
        let host = h.get(http::header::HOST).cloned();
        add_forwarded_for(&mut h, &alb, "http", host.as_ref());
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.5.5, 10.0.1.20");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9;proto=https, for=10.0.1.20;proto=http;host=app.example"
        );
        // A trusted peer that sent no X-Forwarded-Proto: the connection's.
        let mut h = map(&[("x-forwarded-for", "203.0.113.9")]);
        add_forwarded_for(&mut h, &alb, "http", None);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(h.get("x-forwarded-port").is_none());
        assert_eq!(h["forwarded"], "for=10.0.1.20;proto=http");
    }

    #[test]
    fn the_real_client_is_the_first_untrusted_address_from_the_right() {
        let trusted: Vec<IpCidr> = ["10.0.0.0/16", "192.0.2.0/24", "fd00:1::/64"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let alb = ip("10.0.1.20");
        for (peer, lines, want) in [
            // An untrusted peer is the client, whatever it says.
            ("198.51.100.4", &["203.0.113.9"][..], "198.51.100.4"),
            ("198.51.100.4", &[][..], "198.51.100.4"),
            // A trusted peer without X-Forwarded-For: the peer.
            ("10.0.1.20", &[][..], "10.0.1.20"),
            // One hop.
            ("10.0.1.20", &["203.0.113.9"][..], "203.0.113.9"),
            // Several hops: trusted ones skipped from the right, the client's own claims
            // left of the first untrusted address ignored.
            (
                "10.0.1.20",
                &["1.1.1.1, 203.0.113.9, 192.0.2.50, 10.0.3.3"][..],
                "203.0.113.9",
            ),
            // The chain over several lines: the last line's last element first.
            (
                "10.0.1.20",
                &["1.1.1.1, 203.0.113.9", "192.0.2.50", "10.0.3.3"][..],
                "203.0.113.9",
            ),
            // Every address trusted: the leftmost.
            ("10.0.1.20", &["10.0.9.9, 192.0.2.1"][..], "10.0.9.9"),
            // Ports and brackets, IPv6.
            (
                "10.0.1.20",
                &["203.0.113.9:4711, 10.0.3.3:80"][..],
                "203.0.113.9",
            ),
            (
                "10.0.1.20",
                &["[2001:db8::5]:443, [fd00:1::2]"][..],
                "2001:db8::5",
            ),
            ("fd00:1::7", &["2001:db8::6"][..], "2001:db8::6"),
            // An IPv4 peer on an IPv6 socket.
            ("::ffff:10.0.1.20", &["203.0.113.9"][..], "203.0.113.9"),
            // Empty elements are list syntax: skipped.
            (
                "10.0.1.20",
                &["203.0.113.9, , 10.0.3.3,"][..],
                "203.0.113.9",
            ),
            ("10.0.1.20", &["", " "][..], "10.0.1.20"),
            // A malformed element ends the walk at the last address walked: the trusted hop
            // that passed it on, never what a client wrote to its left.
            ("10.0.1.20", &["6.6.6.6, unknown, 10.0.3.3"][..], "10.0.3.3"),
            ("10.0.1.20", &["6.6.6.6, 300.1.1.1"][..], "10.0.1.20"),
            ("10.0.1.20", &["6.6.6.6, _hidden"][..], "10.0.1.20"),
            (
                "10.0.1.20",
                &["6.6.6.6", "10.0.3.3 garbage"][..],
                "10.0.1.20",
            ),
            // Malformed left of the first untrusted address: never reached.
            ("10.0.1.20", &["garbage, 203.0.113.9"][..], "203.0.113.9"),
        ] {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(X_FORWARDED_FOR, HeaderValue::from_str(l).unwrap());
            }
            assert_eq!(
                real_client(ip(peer), &h, &trusted),
                ip(want),
                "peer {peer}, {lines:?}"
            );
        }
        // A line that is not visible ASCII ends the walk too.
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"10.0.3.3\xff").unwrap(),
        );
        assert_eq!(real_client(alb, &h, &trusted), alb);
        // No trusted proxies at all: always the peer.
        let h = map(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(real_client(alb, &h, &[]), alb);
    }
}
