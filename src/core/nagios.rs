//! What a Nagios plugin reads and writes, after the Monitoring Plugins Development
//! Guidelines: threshold [`Range`]s (`-w`/`-c` of `pumpwatch check`), performance data
//! items ([`Perf`]) and the output itself ([`PluginOutput`]: one status line, then long
//! output lines for `-v`). Pure, so `check` only fetches and prints.
//!
//! Everything printed is data from the pump (client and source names, reasons quoting
//! them): the output builders make sure no value can add a line, start perfdata early
//! (`|`) or move a terminal's cursor.

use super::health::State;
use std::fmt::{self, Write as _};
use std::str::FromStr;

/// The first word of the status line, naming the service.
pub const SERVICE: &str = "PUMPWATCH";

/// Longest status text kept, in bytes. Nagios core keeps 8 KiB of plugin output (and
/// NRPE historically 1 KiB); a pump with thousands of offenders must not push the
/// perfdata off the end, so the text is cut first.
pub const MAX_TEXT_BYTES: usize = 2048;

/// A threshold range `[@]start:end` of the guidelines. The value alerts when it lies
/// outside `start..=end` (both ends inclusive), or inside when the range starts with `@`.
///
/// | range    | alerts when      |
/// |----------|------------------|
/// | `10`     | x < 0 or x > 10  |
/// | `10:`    | x < 10           |
/// | `~:10`   | x > 10           |
/// | `10:20`  | x < 10 or x > 20 |
/// | `@10:20` | 10 ≤ x ≤ 20      |
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// `None` = −∞ (`~`).
    start: Option<f64>,
    /// `None` = +∞ (nothing after the `:`).
    end: Option<f64>,
    /// `@`: alert inside instead of outside.
    inside: bool,
}

/// Why a range could not be read. One line, for `PUMPWATCH UNKNOWN - bad -w: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("empty range")]
    Empty,
    #[error("{0:?} is not a number (expected e.g. 10, -1.5, ~:10, 10:20, @10:20)")]
    NotANumber(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("more than one ':' in the range")]
    TwoColons,
    #[error("'~' (minus infinity) can only be the start; leave the end empty for infinity")]
    TildeEnd,
    #[error("start {start} is greater than end {end}")]
    Reversed { start: String, end: String },
}

/// Keeps error texts short whatever was typed.
fn shown(s: &str) -> String {
    s.chars().take(40).collect()
}

/// A decimal number: `[+-]?(digits[.digits]|.digits)`; no exponent, `inf` or `nan`, so
/// what parses is what the guidelines' perfdata class `[-0-9.]` can carry.
fn number(s: &str) -> Result<f64, RangeError> {
    let b = s.as_bytes();
    let digits = b.strip_prefix(b"-").or(b.strip_prefix(b"+")).unwrap_or(b);
    let (int, frac) = match digits.iter().position(|&c| c == b'.') {
        Some(dot) => (&digits[..dot], Some(&digits[dot + 1..])),
        None => (digits, None),
    };
    let all_digits = |p: &[u8]| p.iter().all(u8::is_ascii_digit);
    let ok = all_digits(int)
        && frac.is_none_or(all_digits)
        && (!int.is_empty() || frac.is_some_and(|f| !f.is_empty()));
    if !ok {
        return Err(RangeError::NotANumber(shown(s)));
    }
    let x: f64 = s.parse().map_err(|_| RangeError::NotANumber(shown(s)))?;
    if x.is_finite() {
        Ok(x)
    } else {
        Err(RangeError::TooLarge(shown(s)))
    }
}

impl Range {
    /// Reads a range; surrounding white space is ignored. An empty start (`:10`) is 0, as
    /// in the guidelines' C library.
    pub fn parse(text: &str) -> Result<Range, RangeError> {
        let s = text.trim();
        let (inside, s) = match s.strip_prefix('@') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if s.is_empty() {
            return Err(RangeError::Empty);
        }
        let (start, end) = match s.split_once(':') {
            None if s == "~" => return Err(RangeError::TildeEnd),
            None => (Some(0.0), Some(number(s)?)),
            Some((_, e)) if e.contains(':') => return Err(RangeError::TwoColons),
            Some((st, e)) => {
                let start = match st {
                    "~" => None,
                    "" => Some(0.0),
                    st => Some(number(st)?),
                };
                let end = match e {
                    "" => None,
                    "~" => return Err(RangeError::TildeEnd),
                    e => Some(number(e)?),
                };
                (start, end)
            }
        };
        Range::new(start, end, inside)
    }

    /// A range from its parts (`None` = infinite); the ends must be finite and in order.
    pub fn new(start: Option<f64>, end: Option<f64>, inside: bool) -> Result<Range, RangeError> {
        for x in [start, end].into_iter().flatten() {
            if !x.is_finite() {
                return Err(RangeError::NotANumber(x.to_string()));
            }
        }
        if let (Some(s), Some(e)) = (start, end)
            && s > e
        {
            return Err(RangeError::Reversed {
                start: s.to_string(),
                end: e.to_string(),
            });
        }
        Ok(Range { start, end, inside })
    }

    pub fn start(&self) -> Option<f64> {
        self.start
    }

    pub fn end(&self) -> Option<f64> {
        self.end
    }

    pub fn inside(&self) -> bool {
        self.inside
    }

    /// Whether `x` raises this threshold's alert. NaN (a value nobody could measure)
    /// never alerts here: [`Limits::state`] makes it UNKNOWN instead.
    pub fn alerts(&self, x: f64) -> bool {
        if x.is_nan() {
            return false;
        }
        let within = self.start.is_none_or(|s| s <= x) && self.end.is_none_or(|e| x <= e);
        within == self.inside
    }
}

impl FromStr for Range {
    type Err = RangeError;
    fn from_str(s: &str) -> Result<Range, RangeError> {
        Range::parse(s)
    }
}

/// The shortest text that reads back as the same range (`10`, `10:`, `~:10`, `@10:20`).
/// Numbers use `f64`'s `Display`, which never writes an exponent and round-trips.
impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.inside {
            f.write_char('@')?;
        }
        match (self.start, self.end) {
            // 0 and −0 alike: the guidelines' short form `end`.
            (Some(0.0), Some(e)) => write!(f, "{e}"),
            (Some(s), Some(e)) => write!(f, "{s}:{e}"),
            (Some(s), None) => write!(f, "{s}:"),
            (None, Some(e)) => write!(f, "~:{e}"),
            (None, None) => f.write_str("~:"),
        }
    }
}

/// The `-w` and `-c` pair of a plugin.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub warn: Option<Range>,
    pub crit: Option<Range>,
}

impl Limits {
    /// CRITICAL if the critical range alerts, else WARNING if the warning one does, else
    /// OK; UNKNOWN for a value that is not a number.
    pub fn state(&self, x: f64) -> State {
        if x.is_nan() {
            State::Unknown
        } else if self.crit.is_some_and(|r| r.alerts(x)) {
            State::Critical
        } else if self.warn.is_some_and(|r| r.alerts(x)) {
            State::Warning
        } else {
            State::Ok
        }
    }
}

/// Units of measurement the guidelines allow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Uom {
    /// A number of things (files/s, clients, a ratio).
    #[default]
    None,
    Seconds,
    Milliseconds,
    Percent,
    Bytes,
    /// A continuous counter.
    Counter,
}

impl Uom {
    pub fn as_str(self) -> &'static str {
        match self {
            Uom::None => "",
            Uom::Seconds => "s",
            Uom::Milliseconds => "ms",
            Uom::Percent => "%",
            Uom::Bytes => "B",
            Uom::Counter => "c",
        }
    }
}

/// One performance data item: `'label'=value[UOM];warn;crit;min;max`.
#[derive(Debug, Clone, PartialEq)]
pub struct Perf {
    pub label: String,
    /// Not finite → `U` (the guidelines' "could not be determined").
    pub value: f64,
    pub uom: Uom,
    pub warn: Option<Range>,
    pub crit: Option<Range>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Perf {
    pub fn new(label: impl Into<String>, value: f64, uom: Uom) -> Perf {
        Perf {
            label: label.into(),
            value,
            uom,
            warn: None,
            crit: None,
            min: None,
            max: None,
        }
    }

    pub fn limits(mut self, l: Limits) -> Perf {
        self.warn = l.warn;
        self.crit = l.crit;
        self
    }

    pub fn min(mut self, min: f64) -> Perf {
        self.min = Some(min);
        self
    }

    pub fn max(mut self, max: f64) -> Perf {
        self.max = Some(max);
        self
    }
}

/// The label is always quoted (names may hold spaces). Inside the quotes `'` is doubled as
/// the guidelines say; `=` (which recent guidelines forbid and parsers split on), `|`,
/// control and line-breaking characters become `_`. Empty fields at the end are dropped.
impl fmt::Display for Perf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('\'')?;
        if self.label.is_empty() {
            f.write_char('_')?;
        }
        for c in self.label.chars() {
            match c {
                '\'' => f.write_str("''")?,
                '=' | '|' => f.write_char('_')?,
                c if unsafe_char(c) => f.write_char('_')?,
                c => f.write_char(c)?,
            }
        }
        f.write_str("'=")?;
        match plain_number(self.value) {
            Some(v) => {
                f.write_str(&v)?;
                f.write_str(self.uom.as_str())?;
            }
            // `U` alone: a unit after it would not parse as "undetermined".
            None => f.write_char('U')?,
        }
        let fields = [
            self.warn.map(|r| r.to_string()),
            self.crit.map(|r| r.to_string()),
            self.min.and_then(plain_number),
            self.max.and_then(plain_number),
        ];
        let used = fields
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |i| i + 1);
        for field in &fields[..used] {
            f.write_char(';')?;
            if let Some(v) = field {
                f.write_str(v)?;
            }
        }
        Ok(())
    }
}

/// A number in the guidelines' class `[-0-9.]`: about six significant digits, no exponent,
/// no trailing zeros; `None` when not finite.
pub fn plain_number(x: f64) -> Option<String> {
    if !x.is_finite() {
        return None;
    }
    if x == 0.0 {
        return Some("0".into());
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (5 - magnitude).clamp(0, 12) as usize;
    let mut s = format!("{x:.decimals$}");
    if s.contains('.') {
        let kept = s.trim_end_matches('0').trim_end_matches('.').len();
        s.truncate(kept);
    }
    if s == "-0" {
        s = "0".into();
    }
    Some(s)
}

/// Characters that could break a line, forge output or move a terminal's cursor: ASCII
/// and C1 controls, Unicode line and paragraph separators, and bidirectional overrides.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Text made safe for one line of plugin output: `|` (which would start perfdata) becomes
/// `¦`, `\n`, `\r`, `\t` are written as those escapes and other unsafe characters as
/// `\u{..}`, so what was sent stays readable. Cut to `max` bytes on a character boundary,
/// with `…` when cut.
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 4);
    for c in text.chars() {
        let before = out.len();
        match c {
            '|' => out.push('¦'),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
        if out.len() > max {
            out.truncate(before);
            out.push('…');
            break;
        }
    }
    out
}

/// What a plugin prints: `PUMPWATCH <STATE> - <text> | <perfdata>`, then one line per
/// entry of `long` (the `-v` detail). Build with the fields, print with [`render`].
///
/// [`render`]: PluginOutput::render
#[derive(Debug, Clone, PartialEq)]
pub struct PluginOutput {
    pub state: State,
    pub text: String,
    pub perfdata: Vec<Perf>,
    pub long: Vec<String>,
}

impl PluginOutput {
    pub fn new(state: State, text: impl Into<String>) -> PluginOutput {
        PluginOutput {
            state,
            text: text.into(),
            perfdata: Vec::new(),
            long: Vec::new(),
        }
    }

    /// The answer for anything that kept the check from knowing: serve unreachable, a
    /// timeout, a bad argument.
    pub fn unknown(reason: impl fmt::Display) -> PluginOutput {
        PluginOutput::new(State::Unknown, reason.to_string())
    }

    /// The process exit code (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
    pub fn exit_code(&self) -> u8 {
        self.state.exit_code()
    }

    /// The first line alone, without a newline.
    pub fn status_line(&self) -> String {
        let mut line = format!(
            "{SERVICE} {} - {}",
            self.state.label(),
            one_line(&self.text, MAX_TEXT_BYTES)
        );
        for (i, p) in self.perfdata.iter().enumerate() {
            line.push_str(if i == 0 { " | " } else { " " });
            let _ = write!(line, "{p}");
        }
        line
    }

    /// Everything to print, each line ending in `\n`; long output lines are made safe
    /// like the text, so each entry stays one line and none carries perfdata.
    pub fn render(&self) -> String {
        let mut out = self.status_line();
        out.push('\n');
        for l in &self.long {
            out.push_str(&one_line(l, MAX_TEXT_BYTES));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: &str) -> Range {
        Range::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    /// The guidelines' table, and each end's inclusiveness.
    #[test]
    fn guideline_examples() {
        let cases: &[(&str, &[f64], &[f64])] = &[
            // range, values that alert, values that do not
            ("10", &[-0.1, -5.0, 10.1, 11.0], &[0.0, 5.0, 10.0]),
            ("10:", &[9.99, -1.0, 0.0], &[10.0, 11.0, 1e12]),
            ("~:10", &[10.01, 11.0], &[10.0, -1e12, 0.0]),
            ("10:20", &[9.0, 20.5, -3.0], &[10.0, 15.0, 20.0]),
            ("@10:20", &[10.0, 15.0, 20.0], &[9.99, 20.01]),
            ("-1.5:2.25", &[-1.6, 2.26], &[-1.5, 0.0, 2.25]),
            ("@~:-3", &[-3.0, -1e9], &[-2.9, 0.0]),
            ("~:", &[], &[-1e300, 0.0, 1e300]),
            ("@~:", &[-1e300, 0.0, 1e300], &[]),
            (":10", &[-1.0, 11.0], &[0.0, 10.0]),
            ("0.5", &[0.51, -0.01], &[0.0, 0.5]),
            (".5:", &[0.4], &[0.5]),
            (" 10 ", &[11.0], &[10.0]),
        ];
        for (text, alert, quiet) in cases {
            let range = r(text);
            for x in *alert {
                assert!(range.alerts(*x), "{text} should alert on {x}");
            }
            for x in *quiet {
                assert!(!range.alerts(*x), "{text} should not alert on {x}");
            }
        }
    }

    #[test]
    fn bad_ranges_say_why() {
        let cases = [
            ("", "empty range"),
            ("@", "empty range"),
            ("abc", "\"abc\" is not a number"),
            ("1e3", "\"1e3\" is not a number"),
            ("nan", "\"nan\" is not a number"),
            ("inf:", "\"inf\" is not a number"),
            ("10:5", "start 10 is greater than end 5"),
            ("1:2:3", "more than one ':'"),
            ("~", "'~' (minus infinity) can only be the start"),
            ("5:~", "'~' (minus infinity) can only be the start"),
            ("@@5", "\"@5\" is not a number"),
            ("-", "\"-\" is not a number"),
            (".", "\".\" is not a number"),
            ("1..2", "\"1..2\" is not a number"),
        ];
        for (text, want) in cases {
            let e = Range::parse(text).expect_err(text).to_string();
            assert!(e.starts_with(want), "{text:?}: got {e:?}");
            assert!(!e.contains('\n'));
        }
        let huge = format!("1{}", "0".repeat(400));
        assert!(matches!(
            Range::parse(&huge),
            Err(RangeError::TooLarge(s)) if s.len() == 40
        ));
    }

    #[test]
    fn display_is_the_short_form() {
        for (text, shown) in [
            ("10", "10"),
            ("0:10", "10"),
            ("10:", "10:"),
            ("~:10", "~:10"),
            ("@10:20", "@10:20"),
            ("+1.50:2", "1.5:2"),
            ("~:", "~:"),
            ("0:", "0:"),
            ("-0:0", "0"),
        ] {
            assert_eq!(r(text).to_string(), shown, "{text}");
        }
    }

    #[test]
    fn limits_pick_the_worst() {
        let l = Limits {
            warn: Some(r("10:")),
            crit: Some(r("1:")),
        };
        assert_eq!(l.state(20.0), State::Ok);
        assert_eq!(l.state(5.0), State::Warning);
        assert_eq!(l.state(0.5), State::Critical);
        assert_eq!(l.state(f64::NAN), State::Unknown);
        assert_eq!(Limits::default().state(-1e9), State::Ok);
    }

    #[test]
    fn perfdata_items() {
        let l = Limits {
            warn: Some(r("0.5:")),
            crit: Some(r("0.1:")),
        };
        let cases = [
            (
                Perf::new("cfs files/s", 0.003, Uom::None)
                    .limits(l)
                    .min(0.0),
                "'cfs files/s'=0.003;0.5:;0.1:;0",
            ),
            (Perf::new("clients_ok", 41.0, Uom::None), "'clients_ok'=41"),
            (
                Perf::new("it's=a|b\nc", 1.5, Uom::Seconds),
                "'it''s_a_b_c'=1.5s",
            ),
            (
                Perf::new("", f64::NAN, Uom::Percent).max(f64::INFINITY),
                "'_'=U",
            ),
            (
                Perf::new("x", 1e21, Uom::None).max(100.0),
                "'x'=1000000000000000000000;;;;100",
            ),
            (
                Perf::new("tiny", -1.234_567e-9, Uom::None),
                "'tiny'=-0.000000001235",
            ),
            (Perf::new("zero", -1e-20, Uom::None), "'zero'=0"),
            (
                Perf::new("r", 2.0 / 3.0, Uom::None).limits(Limits {
                    warn: None,
                    crit: Some(r("@~:-1")),
                }),
                "'r'=0.666667;;@~:-1",
            ),
        ];
        for (p, want) in cases {
            assert_eq!(p.to_string(), want);
        }
    }

    #[test]
    fn status_line_and_long_output() {
        let mut out = PluginOutput::new(
            State::Critical,
            "2 of 41 clients in trouble: cfs stopped (no delivery for 612s > td 300s)",
        );
        out.perfdata.push(Perf::new("critical", 1.0, Uom::None));
        out.perfdata.push(Perf::new("ok", 39.0, Uom::None));
        out.long
            .push("cfs: stopped\nPUMPWATCH OK - forged | x=1".into());
        assert_eq!(
            out.render(),
            "PUMPWATCH CRITICAL - 2 of 41 clients in trouble: cfs stopped (no delivery for \
             612s > td 300s) | 'critical'=1 'ok'=39\n\
             cfs: stopped\\nPUMPWATCH OK - forged ¦ x=1\n"
        );
        assert_eq!(out.exit_code(), 2);
        let u = PluginOutput::unknown(RangeError::Empty);
        assert_eq!(u.render(), "PUMPWATCH UNKNOWN - empty range\n");
        assert_eq!(u.exit_code(), 3);
    }

    #[test]
    fn one_line_escapes_and_cuts() {
        assert_eq!(
            one_line("a\u{1b}[2Jb\u{85}c\u{2028}d\u{202e}e\r\tf", 100),
            "a\\u{1b}[2Jb\\u{85}c\\u{2028}d\\u{202e}e\\r\\tf"
        );
        assert_eq!(one_line("ééé", 4), "éé…");
        let long = "x".repeat(10_000);
        let line = PluginOutput::new(State::Ok, long).status_line();
        assert!(line.len() < MAX_TEXT_BYTES + 40, "{}", line.len());
    }

    /// A number as the parser reads it, from integer and fraction digits.
    fn decimal() -> impl Strategy<Value = String> {
        ("[-+]?", "[0-9]{1,6}", proptest::option::of("[0-9]{0,4}")).prop_map(|(sign, i, f)| match f
        {
            Some(f) => format!("{sign}{i}.{f}"),
            None => format!("{sign}{i}"),
        })
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,30}") {
            let _ = Range::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_near_misses(s in "[@~:.+\\-0-9eE ]{0,12}") {
            if let Ok(range) = Range::parse(&s) {
                prop_assert_eq!(Range::parse(&range.to_string()), Ok(range));
            }
        }

        #[test]
        fn display_parses_back(
            at in any::<bool>(),
            start in proptest::option::of(decimal()),
            tilde in any::<bool>(),
            end in proptest::option::of(decimal()),
        ) {
            let start = if tilde { Some("~".to_string()) } else { start };
            let text = format!(
                "{}{}{}",
                if at { "@" } else { "" },
                start.map(|s| format!("{s}:")).unwrap_or_default(),
                end.unwrap_or_default()
            );
            if let Ok(range) = Range::parse(&text) {
                let shown = range.to_string();
                prop_assert_eq!(Range::parse(&shown), Ok(range), "{} shown as {}", text, shown);
            }
        }

        /// `alerts` against the guidelines' words, from the parts that were written.
        #[test]
        fn alerts_agrees_with_the_definition(
            at in any::<bool>(),
            lo in -1000i32..1000,
            span in 0i32..1000,
            open_start in any::<bool>(),
            open_end in any::<bool>(),
            x in -3000.0f64..3000.0,
        ) {
            let (lo, hi) = (f64::from(lo) / 4.0, f64::from(lo + span) / 4.0);
            let text = format!(
                "{}{}:{}",
                if at { "@" } else { "" },
                if open_start { "~".to_string() } else { lo.to_string() },
                if open_end { String::new() } else { hi.to_string() },
            );
            let range = Range::parse(&text).unwrap();
            let below = !open_start && x < lo;
            let above = !open_end && x > hi;
            let outside = below || above;
            let want = if at { !outside } else { outside };
            prop_assert_eq!(range.alerts(x), want, "{} on {}", text, x);
            for edge in [lo, hi] {
                // Both ends belong to the range.
                let inside_edge = (open_start || edge >= lo) && (open_end || edge <= hi);
                prop_assert_eq!(range.alerts(edge), if at { inside_edge } else { !inside_edge });
            }
        }

        #[test]
        fn output_stays_one_line(text in any::<String>(), label in any::<String>(), v in any::<f64>()) {
            let mut out = PluginOutput::new(State::Warning, text);
            out.perfdata.push(Perf::new(label, v, Uom::None));
            let line = out.status_line();
            prop_assert!(!line.chars().any(unsafe_char));
            prop_assert_eq!(line.matches('|').count(), 1);
            let perf = line.split_once(" | ").unwrap().1;
            let value = perf.rsplit_once("'=").unwrap().1;
            prop_assert!(value == "U" || value.bytes().all(|b| b == b'-' || b == b'.' || b.is_ascii_digit()), "{}", value);
        }
    }
}
