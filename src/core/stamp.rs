//! Sarracenia time stamps: `YYYYMMDDHHMMSS[.f*]`, with or without a `T` after the date,
//! with 0 to 10+ fractional digits; also ISO 8601 (`2024-01-01T13:02:41.1Z`) for tolerance.
//! Parsed by hand because this runs once per report on the hot path.

use jiff::Timestamp;
use serde::Serialize;
use std::fmt;

/// A point in time, always UTC, with nanosecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp(pub Timestamp);

impl Stamp {
    /// `secs` since the epoch plus `nanos` (0..1e9) later, also before 1970.
    pub fn from_unix(secs: i64, nanos: i32) -> Option<Stamp> {
        let total = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Timestamp::from_nanosecond(total).ok().map(Stamp)
    }

    /// Whole seconds (floored) and the non-negative nanoseconds after them.
    fn parts(&self) -> (i64, i64) {
        let n = self.0.as_nanosecond();
        (
            n.div_euclid(1_000_000_000) as i64,
            n.rem_euclid(1_000_000_000) as i64,
        )
    }

    pub fn from_unix_f64(secs: f64) -> Option<Stamp> {
        if !secs.is_finite() {
            return None;
        }
        let whole = secs.floor();
        let nanos = ((secs - whole) * 1e9).round().min(999_999_999.0) as i32;
        Stamp::from_unix(whole as i64, nanos)
    }

    pub fn as_unix_f64(&self) -> f64 {
        let (s, n) = self.parts();
        s as f64 + n as f64 / 1e9
    }

    /// Parses any stamp shape pumps send; `None` if it is not a time stamp.
    pub fn parse(s: &str) -> Option<Stamp> {
        let b = s.as_bytes();
        if b.len() >= 8 && b[..8].iter().all(u8::is_ascii_digit) {
            parse_compact(b)
        } else {
            s.parse::<Timestamp>().ok().map(Stamp)
        }
    }

    /// `YYYYMMDDHHMMSS.fff`: the v01/v02 body form and the speedo datetime.
    pub fn v02(&self) -> String {
        self.compact(false)
    }

    /// `YYYYMMDDTHHMMSS.fff`: the v03 `pubTime` form.
    pub fn v03(&self) -> String {
        self.compact(true)
    }

    fn compact(&self, t: bool) -> String {
        let (secs, nanos) = self.parts();
        let (y, mo, d, h, mi, s) = civil(secs);
        let ms = nanos / 1_000_000;
        let sep = if t { "T" } else { "" };
        format!("{y:04}{mo:02}{d:02}{sep}{h:02}{mi:02}{s:02}.{ms:03}")
    }
}

/// ISO 8601 with milliseconds, e.g. `2015-06-01T13:57:01.345Z`.
impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (secs, nanos) = self.parts();
        let (y, mo, d, h, mi, s) = civil(secs);
        let ms = nanos / 1_000_000;
        write!(f, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    }
}

impl Serialize for Stamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 18 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

fn parse_compact(b: &[u8]) -> Option<Stamp> {
    let y = digits(&b[0..4])?;
    let mo = digits(&b[4..6])?;
    let d = digits(&b[6..8])?;
    let mut rest = &b[8..];
    if let Some((b'T' | b't' | b' ', r)) = rest.split_first() {
        rest = r;
    }
    // The time part: HHMMSS normally; HHMM appears in the wild (the spec's own v02 sample).
    let int_len = rest
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (h, mi, s) = match int_len {
        6 => (
            digits(&rest[0..2])?,
            digits(&rest[2..4])?,
            digits(&rest[4..6])?,
        ),
        4 => (digits(&rest[0..2])?, digits(&rest[2..4])?, 0),
        0 => (0, 0, 0),
        _ => return None,
    };
    rest = &rest[int_len..];
    let mut nanos = 0i64;
    if let Some((b'.', frac)) = rest.split_first() {
        let n = frac
            .iter()
            .position(|c| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        // Only the first nine digits matter; more are accepted and ignored.
        let used = &frac[..n.min(9)];
        if !used.is_empty() {
            nanos = digits(used)? * 10i64.pow(9 - used.len() as u32);
        }
        rest = &frac[n..];
    }
    if !(rest.is_empty() || rest == b"Z" || rest == b"z") {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + s.min(59);
    Stamp::from_unix(secs, nanos as i32)
}

/// Howard Hinnant's days-from-civil: proleptic Gregorian date to days since 1970-01-01.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, sod / 3600, sod % 3600 / 60, sod % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn iso(s: &str) -> String {
        Stamp::parse(s)
            .map(|s| s.to_string())
            .unwrap_or_else(|| "none".into())
    }

    #[test]
    fn shapes() {
        let table = [
            ("20150601135701.345", "2015-06-01T13:57:01.345Z"),
            ("20150601T135701.345", "2015-06-01T13:57:01.345Z"),
            ("20150601135701", "2015-06-01T13:57:01.000Z"),
            ("20240101T130241.1", "2024-01-01T13:02:41.100Z"),
            ("20240101T130241.123456789012", "2024-01-01T13:02:41.123Z"),
            ("201506011357.345", "2015-06-01T13:57:00.345Z"),
            ("2024-01-01T13:02:41.101Z", "2024-01-01T13:02:41.101Z"),
            ("20240229T000000", "2024-02-29T00:00:00.000Z"),
            ("banana", "none"),
            ("20241301T000000", "none"),
            ("2024010", "none"),
            ("20240101T1302", "2024-01-01T13:02:00.000Z"),
            ("20240101T130241.12x", "none"),
        ];
        for (input, want) in table {
            assert_eq!(iso(input), want, "input {input:?}");
        }
    }

    #[test]
    fn compact_forms() {
        let s = Stamp::parse("20150601135701.345").unwrap();
        assert_eq!(s.v02(), "20150601135701.345");
        assert_eq!(s.v03(), "20150601T135701.345");
    }

    proptest! {
        #[test]
        fn civil_round_trip(secs in -62_000_000_000i64..250_000_000_000i64, ms in 0i32..1000) {
            let s = Stamp::from_unix(secs, ms * 1_000_000).unwrap();
            prop_assert_eq!(Stamp::parse(&s.v02()), Some(s));
            prop_assert_eq!(Stamp::parse(&s.v03()), Some(s));
        }

        #[test]
        fn never_panics(s in ".{0,40}") {
            let _ = Stamp::parse(&s);
        }
    }
}
