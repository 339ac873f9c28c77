//! Report codes (HTTP-like) and their classes, and the `--code` filter syntax.

use serde::Serialize;
use std::fmt;

/// The class of a report code. Good = done or nothing to do; error = client or server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeClass {
    /// 1xx; 102 = transfer started.
    InProgress,
    /// 2xx.
    Done,
    /// 3xx.
    NothingToDo,
    /// 4xx.
    ClientError,
    /// 5xx.
    ServerError,
    /// Anything else we were sent; kept and counted as its own class.
    Other,
}

impl CodeClass {
    pub fn of(code: u16) -> CodeClass {
        match code / 100 {
            1 => CodeClass::InProgress,
            2 => CodeClass::Done,
            3 => CodeClass::NothingToDo,
            4 => CodeClass::ClientError,
            5 => CodeClass::ServerError,
            _ => CodeClass::Other,
        }
    }

    pub fn is_good(self) -> bool {
        matches!(self, CodeClass::Done | CodeClass::NothingToDo)
    }

    pub fn is_error(self) -> bool {
        matches!(self, CodeClass::ClientError | CodeClass::ServerError)
    }

    /// A short label such as `2xx`, for summaries.
    pub fn label(self) -> &'static str {
        match self {
            CodeClass::InProgress => "1xx",
            CodeClass::Done => "2xx",
            CodeClass::NothingToDo => "3xx",
            CodeClass::ClientError => "4xx",
            CodeClass::ServerError => "5xx",
            CodeClass::Other => "other",
        }
    }
}

/// The code pumpwatch uses for "transfer started" (SPEC §7).
pub const STARTED: u16 = 102;

/// A set of codes from `--code`: `4xx`, `499`, `200-299`, or a comma list of those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRange(Vec<(u16, u16)>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid code filter {0:?}: expected e.g. 4xx, 499, 200-299 or a comma list of those")]
pub struct CodeRangeError(pub String);

impl CodeRange {
    pub fn contains(&self, code: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&code))
    }
}

impl std::str::FromStr for CodeRange {
    type Err = CodeRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CodeRangeError(s.to_owned());
        let code = |t: &str| -> Result<u16, CodeRangeError> {
            match t.trim().parse::<u16>() {
                Ok(c) if (100..=999).contains(&c) => Ok(c),
                _ => Err(err()),
            }
        };
        let mut ranges = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let lower = part.to_ascii_lowercase();
            if let Some(d) = lower.strip_suffix("xx") {
                let d = match d.as_bytes() {
                    [c @ b'1'..=b'9'] => u16::from(c - b'0'),
                    _ => return Err(err()),
                };
                ranges.push((d * 100, d * 100 + 99));
            } else if let Some((lo, hi)) = part.split_once('-') {
                let (lo, hi) = (code(lo)?, code(hi)?);
                if lo > hi {
                    return Err(err());
                }
                ranges.push((lo, hi));
            } else {
                let c = code(part)?;
                ranges.push((c, c));
            }
        }
        Ok(CodeRange(ranges))
    }
}

impl fmt::Display for CodeClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert!(CodeClass::of(201).is_good());
        assert!(CodeClass::of(304).is_good());
        assert!(CodeClass::of(499).is_error());
        assert!(CodeClass::of(503).is_error());
        assert!(!CodeClass::of(102).is_good() && !CodeClass::of(102).is_error());
        assert_eq!(CodeClass::of(777), CodeClass::Other);
    }

    #[test]
    fn filters() {
        let table: [(&str, &[u16], &[u16]); 5] = [
            ("4xx", &[400, 404, 499], &[399, 500, 201]),
            ("499", &[499], &[498, 500]),
            ("200-299", &[200, 201, 299], &[199, 300]),
            ("2xx,404", &[201, 404], &[403, 304]),
            ("5XX", &[500, 503], &[499]),
        ];
        for (spec, yes, no) in table {
            let r: CodeRange = spec.parse().unwrap();
            for c in yes {
                assert!(r.contains(*c), "{spec} should contain {c}");
            }
            for c in no {
                assert!(!r.contains(*c), "{spec} should not contain {c}");
            }
        }
    }

    #[test]
    fn bad_filters() {
        for bad in [
            "banana", "", "4x", "44xx", "0xx", "300-200", "1000", "-5", "2xx,", "x",
        ] {
            assert!(
                bad.parse::<CodeRange>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
