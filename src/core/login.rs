//! Logging people in to `serve`, pure: reading an `Authorization` header, remembering a
//! login the broker accepted for a short time, counting failed logins per client
//! address, and telling the client's address behind a trusted reverse proxy.
//!
//! Why pure: every piece takes attacker-held bytes or a clock reading, so each is tested
//! from values alone (`now` is passed in, the salt too). The shell (`cmd/serve/auth.rs`)
//! asks the broker and holds these behind a lock.
//!
//! **Never the password.** The cache keeps a salted SHA-256 of it, never the text, and
//! compares digests in constant time; nothing here formats a password into a string.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Longest user name accepted (RabbitMQ's own limit is 255 bytes as well).
pub const MAX_USER: usize = 255;
/// Longest password or token accepted; longer ones are refused without asking anyone.
pub const MAX_SECRET: usize = 1024;

/// What an `Authorization` header presents.
#[derive(Clone, PartialEq, Eq)]
pub enum Presented {
    /// HTTP Basic (RFC 7617, UTF-8).
    Basic { user: String, password: String },
    /// A bearer token (RFC 6750).
    Bearer(String),
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Presented::Basic { user, .. } => write!(f, "Basic({user:?}, ****)"),
            Presented::Bearer(_) => write!(f, "Bearer(****)"),
        }
    }
}

/// Why a header was not understood (said in the log, never echoed with the secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadHeader {
    #[error("neither Basic nor Bearer")]
    Scheme,
    #[error("not base64")]
    Base64,
    #[error("not UTF-8")]
    Utf8,
    #[error("no ':' between user and password")]
    NoColon,
    #[error("empty user name")]
    EmptyUser,
    #[error("empty password or token")]
    EmptySecret,
    #[error("user name or secret too long")]
    TooLong,
}

/// Reads an `Authorization` header value.
pub fn parse_authorization(value: &[u8]) -> Result<Presented, BadHeader> {
    use base64::Engine;
    let value = trim(value);
    let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
        Some(i) => (&value[..i], trim(&value[i + 1..])),
        None => (value, &[][..]),
    };
    if rest.len() > 4 * (MAX_USER + MAX_SECRET) / 3 + 8 {
        return Err(BadHeader::TooLong);
    }
    if scheme.eq_ignore_ascii_case(b"bearer") {
        let token = std::str::from_utf8(rest).map_err(|_| BadHeader::Utf8)?;
        return match token.len() {
            0 => Err(BadHeader::EmptySecret),
            n if n > MAX_SECRET => Err(BadHeader::TooLong),
            _ => Ok(Presented::Bearer(token.to_owned())),
        };
    }
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return Err(BadHeader::Scheme);
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .map_err(|_| BadHeader::Base64)?;
    let text = String::from_utf8(raw).map_err(|_| BadHeader::Utf8)?;
    let (user, password) = text.split_once(':').ok_or(BadHeader::NoColon)?;
    if user.is_empty() {
        return Err(BadHeader::EmptyUser);
    }
    if password.is_empty() {
        return Err(BadHeader::EmptySecret);
    }
    if user.len() > MAX_USER || password.len() > MAX_SECRET {
        return Err(BadHeader::TooLong);
    }
    Ok(Presented::Basic {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end.max(start)]
}

/// SHA-256 of `salt` then `secret`.
pub fn salted(salt: &[u8], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// Equal digests, in a time that does not depend on where they differ.
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Logins the broker accepted, each for `ttl`: per user name, a salted digest of the
/// password that was accepted and what it maps to. A different password for the same
/// user is a miss (and is checked with the broker).
#[derive(Debug)]
pub struct LoginCache<T> {
    ttl: Duration,
    max: usize,
    entries: HashMap<String, Entry<T>>,
}

#[derive(Debug)]
struct Entry<T> {
    salt: [u8; 16],
    digest: [u8; 32],
    until: Instant,
    value: T,
}

impl<T: Clone> LoginCache<T> {
    /// At most `max` users (at least 1) are remembered.
    pub fn new(ttl: Duration, max: usize) -> LoginCache<T> {
        LoginCache {
            ttl,
            max: max.max(1),
            entries: HashMap::new(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What `user` with `password` mapped to, if the broker accepted exactly that within
    /// the last `ttl`.
    pub fn get(&self, user: &str, password: &str, now: Instant) -> Option<T> {
        let e = self.entries.get(user)?;
        (now < e.until && same_digest(&e.digest, &salted(&e.salt, password)))
            .then(|| e.value.clone())
    }

    /// Remembers an accepted login (`salt`: fresh random bytes, from the caller).
    pub fn put(&mut self, user: &str, password: &str, value: T, salt: [u8; 16], now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        if !self.entries.contains_key(user) && self.entries.len() >= self.max {
            self.entries.retain(|_, e| e.until > now);
            if self.entries.len() >= self.max
                && let Some(first) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.until)
                    .map(|(k, _)| k.clone())
            {
                self.entries.remove(&first);
            }
        }
        self.entries.insert(
            user.to_owned(),
            Entry {
                salt,
                digest: salted(&salt, password),
                until: now + self.ttl,
                value,
            },
        );
    }

    /// Forgets everything (the configuration's roles changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Failed logins per client address: a token bucket of `burst` failures, one more every
/// `refill`. An address with none left is answered 429 until one is back, whatever it
/// presents, so a blocked guesser learns nothing, not even from a remembered login.
///
/// IPv6 addresses count per /64 (one host usually holds the whole /64); IPv4-mapped
/// IPv6 addresses count as the IPv4 address. At most `max` addresses are tracked:
/// beyond that the ones that have earned all their tries back are forgotten first, then
/// the ones with the most tries left.
#[derive(Debug)]
pub struct FailureLimiter {
    burst: u32,
    refill: Duration,
    max: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tries left at `at`.
    left: f64,
    at: Instant,
}

impl FailureLimiter {
    pub fn new(burst: u32, refill: Duration, max: usize) -> FailureLimiter {
        FailureLimiter {
            burst: burst.max(1),
            refill: refill.max(Duration::from_millis(1)),
            max: max.max(1),
            buckets: HashMap::new(),
        }
    }

    /// The key an address counts under.
    pub fn key(addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => addr,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
        }
    }

    fn left(&self, b: &Bucket, now: Instant) -> f64 {
        let earned = now.saturating_duration_since(b.at).as_secs_f64() / self.refill.as_secs_f64();
        (b.left + earned).min(f64::from(self.burst))
    }

    /// `Some(wait)` when `addr` has no tries left: answer 429 with `Retry-After: wait`.
    pub fn blocked(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let b = self.buckets.get(&Self::key(addr))?;
        let left = self.left(b, now);
        (left < 1.0).then(|| self.refill.mul_f64(1.0 - left))
    }

    /// Counts one failed login of `addr`; `Some(wait)` when that was its last try.
    pub fn failed(&mut self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let key = Self::key(addr);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max {
            self.make_room(now);
        }
        let full = Bucket {
            left: f64::from(self.burst),
            at: now,
        };
        let left = self
            .buckets
            .get(&key)
            .map_or(full.left, |b| self.left(b, now));
        let left = (left - 1.0).max(0.0);
        self.buckets.insert(key, Bucket { left, at: now });
        (left < 1.0).then(|| self.refill.mul_f64(1.0 - left))
    }

    fn make_room(&mut self, now: Instant) {
        let burst = f64::from(self.burst);
        let (refill, buckets) = (self.refill, &mut self.buckets);
        let left = |b: &Bucket| {
            (b.left + now.saturating_duration_since(b.at).as_secs_f64() / refill.as_secs_f64())
                .min(burst)
        };
        buckets.retain(|_, b| left(b) < burst);
        if buckets.len() >= self.max
            && let Some(k) = buckets
                .iter()
                .max_by(|a, b| left(a.1).total_cmp(&left(b.1)))
                .map(|(k, _)| *k)
        {
            buckets.remove(&k);
        }
    }

    /// Addresses being tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// The client's address: the TCP peer, or, when the peer is a trusted reverse proxy, the
/// right-most address of `X-Forwarded-For` that is not itself a trusted proxy (what the
/// client wrote further left is its own claim and is never believed). Anything unreadable
/// falls back to the peer.
pub fn client_address(peer: IpAddr, forwarded_for: &[&[u8]], trusted: &[IpAddr]) -> IpAddr {
    let is_trusted = |a: &IpAddr| trusted.iter().any(|t| same_ip(t, a));
    if !is_trusted(&peer) {
        return peer;
    }
    // Several headers are one list, in order.
    for value in forwarded_for.iter().rev() {
        let Ok(text) = std::str::from_utf8(value) else {
            return peer;
        };
        for item in text.rsplit(',') {
            let Some(addr) = parse_forwarded_item(item.trim()) else {
                return peer;
            };
            if !is_trusted(&addr) {
                return addr;
            }
        }
    }
    peer
}

fn same_ip(a: &IpAddr, b: &IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// `203.0.113.7`, `2001:db8::1`, `[2001:db8::1]:443`, `203.0.113.7:5555`.
fn parse_forwarded_item(s: &str) -> Option<IpAddr> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Some(a);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use proptest::prelude::*;

    fn basic(s: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
        .into_bytes()
    }

    #[test]
    fn authorization_headers() {
        assert_eq!(
            parse_authorization(&basic("alice:p/@:%#x")),
            Ok(Presented::Basic {
                user: "alice".into(),
                password: "p/@:%#x".into()
            })
        );
        assert_eq!(
            parse_authorization(b"bearer  abc.def "),
            Ok(Presented::Bearer("abc.def".into()))
        );
        assert_eq!(
            parse_authorization(&basic("Zoë:mot de passe")).map(|p| format!("{p:?}")),
            Ok("Basic(\"Zoë\", ****)".into())
        );
        for (bad, why) in [
            (b"Digest x".to_vec(), BadHeader::Scheme),
            (b"Basic !!!".to_vec(), BadHeader::Base64),
            (basic("nocolon"), BadHeader::NoColon),
            (basic(":pw"), BadHeader::EmptyUser),
            (basic("alice:"), BadHeader::EmptySecret),
            (b"Bearer".to_vec(), BadHeader::EmptySecret),
            (b"Basic /w==".to_vec(), BadHeader::Utf8),
            (
                basic(&format!("a:{}", "x".repeat(MAX_SECRET + 1))),
                BadHeader::TooLong,
            ),
            (
                basic(&format!("{}:x", "u".repeat(MAX_USER + 1))),
                BadHeader::TooLong,
            ),
            (vec![b'x'; 100_000], BadHeader::Scheme),
            // Hostile headers: huge, not base64, not UTF-8 inside or outside, NULs.
            (
                format!("Basic {}", "QUFB".repeat(25_000)).into_bytes(),
                BadHeader::TooLong,
            ),
            (
                format!("Bearer {}", "t".repeat(MAX_SECRET + 1)).into_bytes(),
                BadHeader::TooLong,
            ),
            (b"Basic dXNlcjpwYXNz===".to_vec(), BadHeader::Base64),
            (b"Basic \xff\xfe\x00\x01".to_vec(), BadHeader::Base64),
            (b"Bearer \xff\xfe".to_vec(), BadHeader::Utf8),
            (b"\xff\xfe dXNlcjpwYXNz".to_vec(), BadHeader::Scheme),
            (b"Basic\tdXNlcjpwYXNz".to_vec(), BadHeader::Scheme),
            (b"Basic ".to_vec(), BadHeader::NoColon),
            (b"".to_vec(), BadHeader::Scheme),
            (b"   ".to_vec(), BadHeader::Scheme),
        ] {
            assert_eq!(
                parse_authorization(&bad),
                Err(why),
                "{:?}",
                String::from_utf8_lossy(&bad[..bad.len().min(40)])
            );
        }
    }

    proptest! {
        #[test]
        fn any_header_is_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = parse_authorization(&bytes);
        }

        #[test]
        fn any_basic_pair_reads_back(user in "[^:]{1,40}", pw in ".{1,80}") {
            let got = parse_authorization(&basic(&format!("{user}:{pw}")));
            prop_assert_eq!(got, Ok(Presented::Basic { user, password: pw }));
        }

        #[test]
        fn a_basic_login_never_shows_its_password(user in "[a-z]{1,12}", pw in "[A-Z0-9]{8,40}") {
            let p = parse_authorization(&basic(&format!("{user}:{pw}"))).unwrap();
            let shown = format!("{p:?}");
            prop_assert!(!shown.contains(&pw), "{}", shown);
            let b = parse_authorization(format!("Bearer {pw}").as_bytes()).unwrap();
            let shown = format!("{b:?}");
            prop_assert!(!shown.contains(&pw), "{}", shown);
        }

        #[test]
        fn anything_after_a_scheme_is_read_or_refused(
            scheme in prop::sample::select(vec!["Basic", "basic", "BEARER", "Bearer", "Negotiate", ""]),
            rest in proptest::collection::vec(any::<u8>(), 0..6000),
        ) {
            let mut v = scheme.as_bytes().to_vec();
            v.push(b' ');
            v.extend_from_slice(&rest);
            match parse_authorization(&v) {
                Ok(Presented::Basic { user, password }) => {
                    prop_assert!(!user.is_empty() && user.len() <= MAX_USER);
                    prop_assert!(!password.is_empty() && password.len() <= MAX_SECRET);
                }
                Ok(Presented::Bearer(t)) => prop_assert!(!t.is_empty() && t.len() <= MAX_SECRET),
                Err(_) => {}
            }
        }

        #[test]
        fn the_cache_gives_back_only_the_password_it_was_given(
            pw in ".{1,40}", other in ".{1,40}", salt in any::<[u8; 16]>(),
        ) {
            let t0 = Instant::now();
            let mut c = LoginCache::new(Duration::from_secs(60), 10);
            c.put("alice", &pw, 7, salt, t0);
            prop_assert_eq!(c.get("alice", &pw, t0), Some(7));
            prop_assert_eq!(c.get("alice", &other, t0), (other == pw).then_some(7));
        }

        #[test]
        fn an_address_is_blocked_after_exactly_burst_failures(
            burst in 1u32..40, n in 0u32..80, other in any::<u32>(),
        ) {
            let t0 = Instant::now();
            let mut l = FailureLimiter::new(burst, Duration::from_secs(6), 1000);
            let a: IpAddr = "192.0.2.1".parse().unwrap();
            for _ in 0..n {
                l.failed(a, t0);
            }
            prop_assert_eq!(l.blocked(a, t0).is_some(), n >= burst);
            let b = IpAddr::from(other.to_be_bytes());
            if FailureLimiter::key(b) != FailureLimiter::key(a) {
                prop_assert!(l.blocked(b, t0).is_none(), "another address is never blocked");
            }
        }

        #[test]
        fn any_forwarded_header_gives_an_address(h in proptest::collection::vec(any::<u8>(), 0..300)) {
            let peer: IpAddr = "127.0.0.1".parse().unwrap();
            let a = client_address(peer, &[&h], &[peer]);
            prop_assert!(a == peer || !h.is_empty());
        }
    }

    #[test]
    fn the_cache_keeps_digests_for_a_while() {
        let t0 = Instant::now();
        let mut c = LoginCache::new(Duration::from_secs(60), 2);
        c.put("alice", "right", 1, [7; 16], t0);
        assert_eq!(c.get("alice", "right", t0), Some(1));
        assert_eq!(c.get("alice", "wrong", t0), None);
        assert_eq!(c.get("bob", "right", t0), None);
        assert_eq!(c.get("alice", "right", t0 + Duration::from_secs(60)), None);
        // Never the password in what it holds.
        assert!(!format!("{c:?}").contains("right"));
        // Full: the one expiring first goes.
        c.put("bob", "b", 2, [1; 16], t0 + Duration::from_secs(1));
        c.put("cfs", "c", 3, [2; 16], t0 + Duration::from_secs(2));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("alice", "right", t0 + Duration::from_secs(3)), None);
        assert_eq!(c.get("cfs", "c", t0 + Duration::from_secs(3)), Some(3));
        // A zero ttl remembers nothing.
        let mut none = LoginCache::new(Duration::ZERO, 10);
        none.put("a", "b", 1, [0; 16], t0);
        assert!(none.is_empty());
    }

    #[test]
    fn failures_run_out_and_come_back() {
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(10, Duration::from_secs(6), 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for i in 0..9 {
            assert_eq!(l.failed(a, t0), None, "try {i}");
            assert_eq!(l.blocked(a, t0), None);
        }
        assert_eq!(l.failed(a, t0), Some(Duration::from_secs(6)));
        assert_eq!(l.blocked(a, t0), Some(Duration::from_secs(6)));
        assert_eq!(l.blocked(b, t0), None);
        assert_eq!(
            l.blocked(a, t0 + Duration::from_secs(3)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(l.blocked(a, t0 + Duration::from_secs(6)), None);
        // One try earned back, spent again.
        assert!(l.failed(a, t0 + Duration::from_secs(6)).is_some());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(2, Duration::from_secs(60), 100);
        l.failed("2001:db8::1".parse().unwrap(), t0);
        l.failed("2001:db8::ffff:2".parse().unwrap(), t0);
        assert!(l.blocked("2001:db8::9".parse().unwrap(), t0).is_some());
        assert!(l.blocked("2001:db8:0:1::1".parse().unwrap(), t0).is_none());
        l.failed("::ffff:192.0.2.1".parse().unwrap(), t0);
        l.failed("192.0.2.1".parse().unwrap(), t0);
        assert!(l.blocked("192.0.2.1".parse().unwrap(), t0).is_some());
    }

    #[test]
    fn the_limiter_stays_bounded_and_keeps_the_blocked() {
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(3, Duration::from_secs(60), 100);
        let bad: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..3 {
            l.failed(bad, t0);
        }
        for i in 0..10_000u32 {
            l.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(l.len() <= 100);
        assert!(l.blocked(bad, t0).is_some());
    }

    #[test]
    fn the_client_behind_a_trusted_proxy() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.9".parse().unwrap();
        let trusted = [proxy];
        let client = |peer, h: &[&str]| {
            let v: Vec<&[u8]> = h.iter().map(|s| s.as_bytes()).collect();
            client_address(peer, &v, &trusted)
        };
        // Only a trusted peer is believed, and only its right-most untrusted entry.
        assert_eq!(client(other, &["203.0.113.7"]), other);
        assert_eq!(
            client(proxy, &["1.2.3.4, 203.0.113.7"]),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client(proxy, &["203.0.113.7", "10.0.0.1"]),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client(proxy, &["[2001:db8::7]:443"]),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client(proxy, &["garbage"]), proxy);
        assert_eq!(client(proxy, &[]), proxy);
        assert_eq!(
            client("::ffff:10.0.0.1".parse().unwrap(), &["203.0.113.8"]),
            "203.0.113.8".parse::<IpAddr>().unwrap()
        );
    }
}
