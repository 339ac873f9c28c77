//! Text from reports made safe for a terminal or a log line (SPEC §2 "Names").
//!
//! Why: every field of a report is written by whoever posted it. Printed raw, a `\n` in a
//! host name forges a whole line of `pumpwatch log`, an ESC sequence clears the reader's
//! screen, a U+202E (right-to-left override) makes `gpj.exe` read as `exe.jpg`. So text
//! from reports reaches a terminal or a log only through these functions: every control
//! character (C0, DEL, C1), every invisible format character (bidi embeddings, overrides
//! and isolates, zero-width characters, tags...) and the line and paragraph separators are
//! written as backslash escapes, and so is the backslash itself, so the escaping can be
//! undone exactly ([`unescape`]): what the reader sees names every code point that arrived.
//!
//! | arrived | shown |
//! |---|---|
//! | newline, CR, tab, NUL | `\n` `\r` `\t` `\0` |
//! | other ASCII controls, DEL | `\x1b`, `\x7f` ... |
//! | C1 controls, invisible and format characters | `\u{9b}`, `\u{202e}`, `\u{200b}` ... |
//! | `\` | `\\` |
//! | space (only in [`field`], which must stay one word) | `\x20` |
//! | `"` (only in [`quoted`]) | `\"` |
//!
//! Everything else, including any printable non-ASCII letter (`é`, `€`, `雨`), is kept.

use std::borrow::Cow;
use std::fmt::Write;

/// True for a character that must never reach a terminal as it is: it controls the
/// terminal, ends a line, or is invisible (so it could hide or reorder what is shown).
pub fn is_unsafe(c: char) -> bool {
    if c.is_control() {
        return true; // C0, DEL, C1 (U+0080-U+009F, among them NEL and CSI)
    }
    let u = u32::from(c);
    if u < 0xAD {
        return false; // fast path: printable ASCII and Latin-1 up to the soft hyphen
    }
    matches!(
        u,
        0x00AD // soft hyphen
        | 0x034F // combining grapheme joiner
        | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x115F..=0x1160 // Hangul fillers
        | 0x17B4..=0x17B5
        | 0x180B..=0x180F // Mongolian free variation selectors, vowel separator
        | 0x200B..=0x200F // zero-width space/joiners, LRM, RLM
        | 0x2028..=0x202E // line and paragraph separators; bidi embeddings and overrides
        | 0x2060..=0x206F // word joiner, invisible operators, bidi isolates, deprecated
        | 0x3164 | 0xFEFF | 0xFFA0
        | 0xFFF0..=0xFFFB // unassigned specials, interlinear annotation
        | 0x110BD | 0x110CD | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
        | 0xE0000..=0xE00FF // tags
        | 0xE01F0..=0xE0FFF
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Field,
    Quoted,
}

fn needs_escape(c: char, mode: Mode) -> bool {
    c == '\\'
        || is_unsafe(c)
        || match mode {
            Mode::Plain => false,
            Mode::Field => c.is_whitespace(),
            Mode::Quoted => c == '"',
        }
}

fn escape_with(s: &str, mode: Mode) -> Cow<'_, str> {
    let Some(first) = s.find(|c| needs_escape(c, mode)) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(&s[..first]);
    for c in s[first..].chars() {
        if !needs_escape(c, mode) {
            out.push(c);
            continue;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            '"' => out.push_str("\\\""),
            c if c.is_ascii() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
        }
    }
    Cow::Owned(out)
}

/// `s` escaped for a log line or a message: one line, no control or invisible
/// characters, spaces and quotes kept.
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_with(s, Mode::Plain)
}

/// `s` escaped as one word of a space-separated line: like [`escape`], and every kind of
/// white space escaped too (a space as `\x20`), so a value can never pass for two fields.
pub fn field(s: &str) -> Cow<'_, str> {
    escape_with(s, Mode::Field)
}

/// `s` escaped and put between double quotes (`"` inside as `\"`).
pub fn quoted(s: &str) -> String {
    let e = escape_with(s, Mode::Quoted);
    let mut out = String::with_capacity(e.len() + 2);
    out.push('"');
    out.push_str(&e);
    out.push('"');
    out
}

/// Why a text is not the output of one of the escapers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad escape at byte {at}")]
pub struct UnescapeError {
    pub at: usize,
}

/// The text [`escape`], [`field`] or [`quoted`] (without its quotes) was given back.
pub fn unescape(s: &str) -> Result<String, UnescapeError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let at = s.len() - rest.len() + i;
        let bad = UnescapeError { at };
        let after = &rest[i + 1..];
        let (c, used) = match after.as_bytes().first() {
            Some(b'\\') => ('\\', 1),
            Some(b'n') => ('\n', 1),
            Some(b'r') => ('\r', 1),
            Some(b't') => ('\t', 1),
            Some(b'0') => ('\0', 1),
            Some(b'"') => ('"', 1),
            Some(b'x') => {
                let hex = after.get(1..3).ok_or(bad.clone())?;
                let v = u8::from_str_radix(hex, 16).map_err(|_| bad.clone())?;
                if !v.is_ascii() {
                    return Err(bad);
                }
                (char::from(v), 3)
            }
            Some(b'u') => {
                let body = after.strip_prefix("u{").ok_or(bad.clone())?;
                let close = body.find('}').ok_or(bad.clone())?;
                let v = u32::from_str_radix(&body[..close], 16).map_err(|_| bad.clone())?;
                (char::from_u32(v).ok_or(bad)?, close + 3)
            }
            _ => return Err(bad),
        };
        out.push(c);
        rest = &after[used..];
    }
    out.push_str(rest);
    Ok(out)
}

/// JSON text (as `serde_json` writes it) with every unsafe character that it leaves raw
/// (DEL, C1 controls, bidi and invisible characters) written as a `\uXXXX` escape, so the
/// JSON means exactly the same and is safe on a terminal. Such characters can only be
/// inside JSON strings, where `\u` escapes are always valid.
pub fn json_safe(json: &str) -> Cow<'_, str> {
    let Some(first) = json.find(is_unsafe) else {
        return Cow::Borrowed(json);
    };
    let mut out = String::with_capacity(json.len() + 16);
    out.push_str(&json[..first]);
    let mut units = [0u16; 2];
    for c in json[first..].chars() {
        if is_unsafe(c) {
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{:04x}", u);
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// An error with its causes, `a: b: c`, each said once. `reqwest::Error`'s own text hides
/// the cause ("error sending request"); the chain says what went wrong.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        let cases = [
            ("plain", "plain", "plain", "\"plain\""),
            ("a b", "a b", r"a\x20b", "\"a b\""),
            ("a\nb", r"a\nb", r"a\nb", r#""a\nb""#),
            ("\r\t\0", r"\r\t\0", r"\r\t\0", r#""\r\t\0""#),
            ("\x1b[2J", r"\x1b[2J", r"\x1b[2J", r#""\x1b[2J""#),
            ("\x7f\x07", r"\x7f\x07", r"\x7f\x07", r#""\x7f\x07""#),
            ("\u{9b}31m", r"\u{9b}31m", r"\u{9b}31m", r#""\u{9b}31m""#),
            (
                "gpj\u{202e}.exe",
                r"gpj\u{202e}.exe",
                r"gpj\u{202e}.exe",
                r#""gpj\u{202e}.exe""#,
            ),
            (
                "a\u{2066}b\u{2069}",
                r"a\u{2066}b\u{2069}",
                r"a\u{2066}b\u{2069}",
                r#""a\u{2066}b\u{2069}""#,
            ),
            (
                "ra\u{200b}dar",
                r"ra\u{200b}dar",
                r"ra\u{200b}dar",
                r#""ra\u{200b}dar""#,
            ),
            (
                "x\u{2028}y",
                r"x\u{2028}y",
                r"x\u{2028}y",
                r#""x\u{2028}y""#,
            ),
            ("a\\n", r"a\\n", r"a\\n", r#""a\\n""#),
            (
                "say \"hi\"",
                "say \"hi\"",
                "say\\x20\"hi\"",
                r#""say \"hi\"""#,
            ),
            ("€ é 雨", "€ é 雨", r"€\x20é\x20雨", "\"€ é 雨\""),
            ("a\u{3000}b", "a\u{3000}b", r"a\u{3000}b", "\"a\u{3000}b\""),
            (
                "tag\u{e0041}",
                r"tag\u{e0041}",
                r"tag\u{e0041}",
                r#""tag\u{e0041}""#,
            ),
        ];
        for (input, plain, as_field, as_quoted) in cases {
            assert_eq!(escape(input), plain, "{input:?}");
            assert_eq!(field(input), as_field, "{input:?}");
            assert_eq!(quoted(input), as_quoted, "{input:?}");
            assert_eq!(unescape(plain).unwrap(), input);
            assert_eq!(unescape(as_field).unwrap(), input);
            assert_eq!(unescape(&as_quoted[1..as_quoted.len() - 1]).unwrap(), input);
        }
        assert!(matches!(escape("nothing to do"), Cow::Borrowed(_)));
    }

    #[test]
    fn bad_escapes_are_errors() {
        for bad in [
            r"\",
            r"\q",
            r"\x",
            r"\x8",
            r"\xff",
            r"\u{",
            r"\u{110000}",
            r"\u{d800}",
        ] {
            assert!(unescape(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_stays_the_same_json() {
        let v = serde_json::json!({"host": "a\u{202e}b\u{9b}c\u{7f}\u{e0041}", "n": 1});
        let raw = v.to_string();
        let safe = json_safe(&raw);
        assert!(!safe.chars().any(is_unsafe), "{safe}");
        assert!(
            safe.contains(r"\u202e") && safe.contains(r"\udb40\udc41"),
            "{safe}"
        );
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
    }

    /// Any text, with a bias towards the characters that matter here.
    fn hostile_text() -> impl Strategy<Value = String> {
        let interesting = prop_oneof![
            4 => any::<char>(),
            2 => (0u32..0x20).prop_map(|u| char::from_u32(u).unwrap()),
            1 => (0x7fu32..0xa0).prop_map(|u| char::from_u32(u).unwrap()),
            1 => prop::sample::select(vec![
                '\\', '"', ' ', '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{200b}',
                '\u{2028}', '\u{feff}', 'x', 'u', '{', '}', '€',
            ]),
        ];
        prop::collection::vec(interesting, 0..40).prop_map(|v| v.into_iter().collect())
    }

    fn one_safe_line(s: &str) -> bool {
        !s.chars().any(|c| is_unsafe(c) || c == '\n' || c == '\r')
    }

    proptest! {
        #[test]
        fn every_text_is_one_safe_line_and_comes_back(s in hostile_text()) {
            let e = escape(&s);
            prop_assert!(one_safe_line(&e), "{:?}", e);
            prop_assert_eq!(unescape(&e).unwrap(), s.clone());
            let f = field(&s);
            prop_assert!(one_safe_line(&f) && !f.chars().any(char::is_whitespace), "{:?}", f);
            prop_assert_eq!(unescape(&f).unwrap(), s.clone());
            let q = quoted(&s);
            prop_assert!(one_safe_line(&q));
            let inner = &q[1..q.len() - 1];
            prop_assert!(!inner.replace("\\\\", "").replace("\\\"", "").contains('"'));
            prop_assert_eq!(unescape(inner).unwrap(), s.clone());
            let j = serde_json::Value::String(s.clone()).to_string();
            let safe = json_safe(&j);
            prop_assert!(one_safe_line(&safe));
            prop_assert_eq!(serde_json::from_str::<String>(&safe).unwrap(), s);
        }

        #[test]
        fn every_byte_string_prints_as_one_safe_line(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let s = String::from_utf8_lossy(&bytes);
            prop_assert!(one_safe_line(&escape(&s)));
            prop_assert!(one_safe_line(&field(&s)));
            prop_assert!(one_safe_line(&quoted(&s)));
        }
    }
}
