//! Client admission of the userspace data paths (userspace L4, and the L7 proxy's client
//! connections): the same rules as the fast path's step 7 (docs/datapath.md, `proxy-ebpf`'s
//! `acl.rs`), so a service admits the same clients whichever datapath serves it.
//!
//! - ACL ([`acl`]): a client on the `deny` list is refused (`drop_acl_denied`) even when an
//!   `allow` prefix also covers it; with a non-empty `allow` list a client outside it is
//!   refused (`drop_acl_not_allowed`); an empty `allow` list admits every client not denied.
//!   It admits *flows*: the data paths ask at a new TCP connection or a new UDP session only,
//!   so one opened before a deny (a reload) keeps working, as an XDP flow entry does.
//! - New-flow rate ([`Buckets`]): per client address a token bucket of `new_flow_burst` tokens
//!   refilled at `new_flow_rate` per second, in nano-tokens with the eBPF bucket's arithmetic
//!   ([`take`]), in a bounded table that forgets the least recently used client when full (the
//!   fast path's `XP_RATE` is an LRU hash of [`MAX_RATE_ENTRIES`] entries; here the bound is per
//!   service).
//!
//! Refusals are counted per service under the fast path's reason names (`Reason::name`).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use proxy_common::{MAX_RATE_ENTRIES, RATE_TOKEN, Reason};

use crate::config::{IpCidr, ServiceFastPath};

/// Why a new flow was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client is on the `deny` list.
    Denied,
    /// The service has an `allow` list and the client is not on it.
    NotAllowed,
    /// The client's new-flow bucket is empty.
    RateLimited,
}

impl Refusal {
    /// Every refusal, in counter order.
    pub const ALL: [Refusal; 3] = [Refusal::Denied, Refusal::NotAllowed, Refusal::RateLimited];

    /// The fast path's reason for the same verdict.
    #[must_use]
    pub const fn reason(self) -> Reason {
        match self {
            Refusal::Denied => Reason::DropAclDenied,
            Refusal::NotAllowed => Reason::DropAclNotAllowed,
            Refusal::RateLimited => Reason::DropRateLimited,
        }
    }

    /// The reason's name (`drop_acl_denied`, ...): a metric label, as for the fast path.
    #[must_use]
    pub const fn name(self) -> &'static str {
        self.reason().name()
    }

    const fn index(self) -> usize {
        match self {
            Refusal::Denied => 0,
            Refusal::NotAllowed => 1,
            Refusal::RateLimited => 2,
        }
    }
}

/// The ACL verdict for `client`: the deny list first (a hit refuses), then the allow list when
/// there is one (a miss refuses).
///
/// # Errors
/// [`Refusal::Denied`] or [`Refusal::NotAllowed`].
pub fn acl(allow: &[IpCidr], deny: &[IpCidr], client: IpAddr) -> Result<(), Refusal> {
    if deny.iter().any(|c| c.contains(client)) {
        return Err(Refusal::Denied);
    }
    if !allow.is_empty() && !allow.iter().any(|c| c.contains(client)) {
        return Err(Refusal::NotAllowed);
    }
    Ok(())
}

/// One client's token bucket, in nano-tokens (a new flow costs [`RATE_TOKEN`]); the eBPF
/// `RateState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub tokens: u64,
    pub last_ns: u64,
}

/// The bucket depth in nano-tokens (a burst of 0 counts as 1, as in the eBPF code).
fn cap(burst: u32) -> u64 {
    u64::from(burst.max(1)) * RATE_TOKEN
}

/// The bucket of a client's first flow at `now`: full, less the token that flow takes (the
/// first flow is always admitted).
#[must_use]
pub fn fresh(burst: u32, now: u64) -> Bucket {
    Bucket {
        tokens: cap(burst) - RATE_TOKEN,
        last_ns: now,
    }
}

/// Refill `b` for the time since its last use (`rate` tokens per second, at most the burst),
/// then take one token: `true` admits the flow. The eBPF `acl::rate` arithmetic, step for step.
#[must_use]
pub fn take(b: &mut Bucket, rate: u32, burst: u32, now: u64) -> bool {
    if rate == 0 {
        return true;
    }
    let rate = u64::from(rate);
    let cap = cap(burst);
    let elapsed = now.saturating_sub(b.last_ns);
    // Refilled to the cap after `full_ns`; before that `elapsed * rate < cap` (no overflow:
    // cap <= 2^32 * 10^9 < 2^64).
    let full_ns = cap / rate;
    let tokens = if elapsed >= full_ns {
        cap
    } else {
        (b.tokens + elapsed * rate).min(cap)
    };
    if elapsed > 0 {
        b.last_ns = now;
    }
    if tokens < RATE_TOKEN {
        b.tokens = tokens;
        return false;
    }
    b.tokens = tokens - RATE_TOKEN;
    true
}

/// Token buckets by client address, at most `capacity` of them: a new client in a full table
/// takes the place of the least recently used one (which starts over with a full bucket if it
/// comes back, as after an LRU eviction of `XP_RATE`).
#[derive(Debug)]
pub struct Buckets {
    capacity: usize,
    /// Use counter: the position of each client in `order`.
    seq: u64,
    by_client: HashMap<IpAddr, (Bucket, u64)>,
    /// Clients by last use, oldest first.
    order: BTreeMap<u64, IpAddr>,
}

impl Buckets {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seq: 0,
            by_client: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Clients with a bucket now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    /// One new flow of `client` at `now` (nanoseconds on any monotonic clock): `true` admits it.
    pub fn take(&mut self, client: IpAddr, rate: u32, burst: u32, now: u64) -> bool {
        if rate == 0 {
            return true;
        }
        self.seq += 1;
        let seq = self.seq;
        if let Some((bucket, at)) = self.by_client.get_mut(&client) {
            self.order.remove(at);
            *at = seq;
            self.order.insert(seq, client);
            return take(bucket, rate, burst, now);
        }
        if self.by_client.len() >= self.capacity
            && let Some((_, oldest)) = self.order.pop_first()
        {
            self.by_client.remove(&oldest);
        }
        self.by_client.insert(client, (fresh(burst, now), seq));
        self.order.insert(seq, client);
        true
    }
}

/// The rules of one service's admission (from its config; replaced on reload).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rules {
    allow: Vec<IpCidr>,
    deny: Vec<IpCidr>,
    new_flow_rate: u32,
    new_flow_burst: u32,
}

impl From<&ServiceFastPath> for Rules {
    fn from(f: &ServiceFastPath) -> Self {
        Self {
            allow: f.allow.clone(),
            deny: f.deny.clone(),
            new_flow_rate: f.new_flow_rate,
            new_flow_burst: f.new_flow_burst,
        }
    }
}

/// One service's admission: its rules, its clients' buckets and its refusal counters.
#[derive(Debug)]
pub struct Admission {
    rules: RwLock<Arc<Rules>>,
    buckets: Mutex<Buckets>,
    /// Time origin of the bucket clock.
    epoch: Instant,
    refused: [AtomicU64; 3],
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(&ServiceFastPath::default())
    }
}

impl Admission {
    #[must_use]
    pub fn new(fast: &ServiceFastPath) -> Self {
        Self {
            rules: RwLock::new(Arc::new(Rules::from(fast))),
            buckets: Mutex::new(Buckets::new(MAX_RATE_ENTRIES as usize)),
            epoch: Instant::now(),
            refused: Default::default(),
        }
    }

    /// Apply reloaded rules to the next new flows (the buckets stay: a lower burst caps them at
    /// their next use, as a changed `XP_SVC_OPTS` entry does). `true` when they changed.
    pub fn set(&self, fast: &ServiceFastPath) -> bool {
        let next = Rules::from(fast);
        let mut r = self
            .rules
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if **r == next {
            return false;
        }
        *r = Arc::new(next);
        true
    }

    fn rules(&self) -> Arc<Rules> {
        match self.rules.read() {
            Ok(r) => Arc::clone(&r),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    fn count(&self, r: Refusal) -> Refusal {
        self.refused[r.index()].fetch_add(1, Ordering::Relaxed);
        r
    }

    /// The ACL for a new flow of `client` (a refusal is counted).
    ///
    /// # Errors
    /// [`Refusal::Denied`] or [`Refusal::NotAllowed`].
    pub fn acl(&self, client: IpAddr) -> Result<(), Refusal> {
        let rules = self.rules();
        acl(&rules.allow, &rules.deny, client).map_err(|r| self.count(r))
    }

    /// Take a token for a new flow of `client` (a refusal is counted). Called after [`Self::acl`]
    /// and once an upstream is known to exist, as the fast path does: a flow refused for
    /// another reason costs no token.
    ///
    /// # Errors
    /// [`Refusal::RateLimited`].
    pub fn rate(&self, client: IpAddr) -> Result<(), Refusal> {
        let rules = self.rules();
        if rules.new_flow_rate == 0 {
            return Ok(());
        }
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let admitted = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(client, rules.new_flow_rate, rules.new_flow_burst, now);
        if admitted {
            Ok(())
        } else {
            Err(self.count(Refusal::RateLimited))
        }
    }

    /// Refusals so far by reason name (every reason present, zeros included).
    #[must_use]
    pub fn refused(&self) -> BTreeMap<String, u64> {
        Refusal::ALL
            .iter()
            .map(|r| {
                (
                    r.name().to_owned(),
                    self.refused[r.index()].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<IpCidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_an_empty_allow_list_admits_the_rest() {
        let allow = cidrs(&["198.51.100.0/24"]);
        let deny = cidrs(&["198.51.100.7/32", "203.0.113.0/24"]);
        // Denied although the allow list covers it.
        assert_eq!(acl(&allow, &deny, ip("198.51.100.7")), Err(Refusal::Denied));
        assert_eq!(acl(&allow, &deny, ip("198.51.100.8")), Ok(()));
        assert_eq!(
            acl(&allow, &deny, ip("192.0.2.1")),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            acl(&allow, &deny, ip("203.0.113.9")),
            Err(Refusal::Denied),
            "deny first even outside the allow list"
        );
        // No allow list: every client not denied.
        assert_eq!(acl(&[], &deny, ip("192.0.2.1")), Ok(()));
        assert_eq!(acl(&[], &deny, ip("203.0.113.1")), Err(Refusal::Denied));
        assert_eq!(acl(&[], &[], ip("192.0.2.1")), Ok(()));
        // IPv6 prefixes, and a /0.
        let deny6 = cidrs(&["2001:db8:1::/48"]);
        assert_eq!(acl(&[], &deny6, ip("2001:db8:1::5")), Err(Refusal::Denied));
        assert_eq!(acl(&[], &deny6, ip("2001:db8:2::5")), Ok(()));
        assert_eq!(
            acl(&cidrs(&["0.0.0.0/0"]), &[], ip("192.0.2.1")),
            Ok(()),
            "/0 allows all"
        );
    }

    #[test]
    fn reasons_are_the_fast_paths() {
        let names: Vec<&str> = Refusal::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(
            names,
            [
                "drop_acl_denied",
                "drop_acl_not_allowed",
                "drop_rate_limited"
            ]
        );
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        // 2 per second, burst 3: three at once, then one per half second.
        let (rate, burst) = (2, 3);
        let t0 = 5 * SEC;
        let mut b = fresh(burst, t0);
        assert!(take(&mut b, rate, burst, t0));
        assert!(take(&mut b, rate, burst, t0));
        assert!(!take(&mut b, rate, burst, t0), "burst of 3 spent");
        assert!(!take(&mut b, rate, burst, t0 + SEC / 4), "half a token");
        assert!(
            take(&mut b, rate, burst, t0 + SEC / 2),
            "one token refilled"
        );
        assert!(!take(&mut b, rate, burst, t0 + SEC / 2));
        // A long pause refills to the burst, never beyond.
        let later = t0 + 100 * SEC;
        for _ in 0..3 {
            assert!(take(&mut b, rate, burst, later));
        }
        assert!(!take(&mut b, rate, burst, later));
        // A clock that goes backwards refills nothing.
        assert!(!take(&mut b, rate, burst, t0));
        // Rate 0: no limit.
        assert!(take(&mut b, 0, 0, t0));
    }

    #[test]
    fn bucket_matches_the_ebpf_arithmetic() {
        // Partial refills accumulate nano-tokens: 3 per second, burst 2 (one token left after
        // the first flow), polled every 100 ms.
        let (rate, burst) = (3, 2);
        let mut b = fresh(burst, 0);
        assert_eq!(b.tokens, RATE_TOKEN);
        let mut at = Vec::new();
        for i in 1..=10u64 {
            if take(&mut b, rate, burst, i * SEC / 10) {
                at.push(i * 100);
            }
        }
        // The token left, then one per 333 ms: at 100, 400, 700 and 1000 ms.
        assert_eq!(at, [100, 400, 700, 1000]);
        assert_eq!(b.last_ns, SEC);
        assert_eq!(b.tokens, 0);
    }

    #[test]
    fn buckets_are_per_client_and_bounded() {
        let mut t = Buckets::new(2);
        let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        // Burst 1, 1 per second: one flow each at t = 0.
        assert!(t.take(a, 1, 1, 0));
        assert!(!t.take(a, 1, 1, 0));
        assert!(t.take(b, 1, 1, 0), "another client has its own bucket");
        assert!(!t.take(b, 1, 1, 0));
        assert_eq!(t.len(), 2);
        // a was used less recently than b: c evicts a.
        assert!(!t.take(b, 1, 1, 1));
        assert!(t.take(c, 1, 1, 1));
        assert_eq!(t.len(), 2);
        assert!(!t.take(b, 1, 1, 2), "b kept its empty bucket");
        assert!(t.take(a, 1, 1, 2), "a was forgotten: a full bucket again");
        assert_eq!(t.len(), 2);
        assert!(Buckets::new(4).is_empty());
    }

    #[test]
    fn admission_counts_and_follows_reloads() {
        let fast = ServiceFastPath {
            deny: cidrs(&["10.0.0.9/32"]),
            allow: cidrs(&["10.0.0.0/24"]),
            new_flow_rate: 1,
            new_flow_burst: 2,
            ..ServiceFastPath::default()
        };
        let adm = Admission::new(&fast);
        assert_eq!(adm.acl(ip("10.0.0.9")), Err(Refusal::Denied));
        assert_eq!(adm.acl(ip("10.1.0.1")), Err(Refusal::NotAllowed));
        assert_eq!(adm.acl(ip("10.0.0.1")), Ok(()));
        // Burst 2 (the test runs well within the second it takes to refill one token).
        assert_eq!(adm.rate(ip("10.0.0.1")), Ok(()));
        assert_eq!(adm.rate(ip("10.0.0.1")), Ok(()));
        assert_eq!(adm.rate(ip("10.0.0.1")), Err(Refusal::RateLimited));
        let r = adm.refused();
        assert_eq!(r["drop_acl_denied"], 1);
        assert_eq!(r["drop_acl_not_allowed"], 1);
        assert_eq!(r["drop_rate_limited"], 1);
        // Reloaded without rules: every client admitted, counters kept.
        assert!(adm.set(&ServiceFastPath::default()));
        assert!(!adm.set(&ServiceFastPath::default()), "unchanged");
        assert_eq!(adm.acl(ip("10.0.0.9")), Ok(()));
        assert_eq!(adm.rate(ip("10.0.0.1")), Ok(()));
        assert_eq!(adm.refused()["drop_acl_denied"], 1);
        assert_eq!(Admission::default().refused().len(), 3);
    }
}
