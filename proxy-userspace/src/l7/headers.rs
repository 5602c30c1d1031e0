//! Header rules of the reverse proxy (pure): hop-by-hop headers removed as RFC 9110 section 7.6.1
//! says, and the client's address appended in X-Forwarded-For and Forwarded (RFC 7239).

use std::net::IpAddr;

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{CONNECTION, FORWARDED, TE, TRAILER, TRANSFER_ENCODING, UPGRADE},
};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

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
    let named: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        h.remove(name);
    }
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
        PROXY_CONNECTION,
    ] {
        h.remove(name);
    }
    if let Some(u) = upgrade {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(UPGRADE, u.clone());
    }
}

/// Every value of `name` joined with ", " (a list header sent as several lines), then `item`.
fn append_list(h: &mut HeaderMap, name: &HeaderName, item: &str) {
    let mut all: Vec<String> = h
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    all.push(item.to_owned());
    if let Ok(v) = HeaderValue::from_str(&all.join(", ")) {
        h.insert(name, v);
    }
}

/// An RFC 7239 node: IPv4 as is, IPv6 quoted in brackets.
fn node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("\"[{a}]\""),
    }
}

/// A token, or a quoted string when it is not one.
fn token_or_quoted(v: &str) -> String {
    let is_token = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if is_token {
        v.to_owned()
    } else {
        let escaped: String = v
            .chars()
            .filter(|c| !c.is_control())
            .flat_map(|c| {
                if c == '"' || c == '\\' {
                    vec!['\\', c]
                } else {
                    vec![c]
                }
            })
            .collect();
        format!("\"{escaped}\"")
    }
}

/// Append the client to `X-Forwarded-For` and `Forwarded` (`for=...;proto=...;host=...`), and
/// set `X-Forwarded-Proto`.
pub fn add_forwarded(h: &mut HeaderMap, client: IpAddr, proto: &'static str, host: Option<&str>) {
    append_list(h, &X_FORWARDED_FOR, &client.to_string());
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    let mut fwd = format!("for={};proto={proto}", node(client));
    if let Some(host) = host {
        fwd.push_str(";host=");
        fwd.push_str(&token_or_quoted(host));
    }
    append_list(h, &FORWARDED, &fwd);
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
        assert_eq!(
            h["forwarded"],
            "for=1.1.1.1, for=10.100.0.2;proto=http;host=\"app.example:8080\""
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
}
