//! The escaping of archive fields: every value becomes one *token* with no space, no line
//! break and nothing a terminal or an editor would act on, so a line always splits on
//! single spaces and a hostile report can never forge a line, move the cursor or reorder
//! the text (bidi overrides).
//!
//! Rules (percent-encoding of UTF-8 bytes, upper-case hex):
//! - the empty value is written `-`; a value that is exactly `-` is written `%2D`;
//! - always escaped: `%`, space, C0 controls (0x00–0x1F, so also TAB, CR, LF) and DEL;
//! - always escaped, as the `%XX` of each of their UTF-8 bytes: C1 controls (U+0080–U+009F),
//!   every Unicode space other than U+0020 (NBSP, U+2000–U+200A, U+3000, ...), line and
//!   paragraph separators, bidi marks, embeddings, overrides and isolates, and the
//!   invisible format characters (soft hyphen, zero-width space/joiners, word joiner, BOM,
//!   tags);
//! - per field: `@` in the client and host (the raw `@` separates them), `,` in list items
//!   and in the identity (the raw `,` separates their parts).
//!
//! Everything else, including non-ASCII text, is written as is, so file names stay
//! readable and `grep` finds them. [`unescape`] refuses a bad `%` sequence, a raw control
//! byte and a result that is not UTF-8.

/// Extra ASCII bytes a field escapes besides the ones always escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    None,
    /// `@`: client and host.
    At,
    /// `,`: identity parts and list items.
    Comma,
    /// For display (trace text) inside double quotes: space kept, `"` escaped.
    Quoted,
}

const ALWAYS: u8 = 1;
const AT: u8 = 2;
const COMMA: u8 = 4;
const QUOTE: u8 = 8;
/// Escaped in every mode but [`Extra::Quoted`].
const SPACE: u8 = 16;
/// The lead byte of a character that may be hidden: decode it and ask [`is_hidden`].
const LEAD: u8 = 32;

/// Flags of every byte value, so the scan is one table look-up per byte. Continuation
/// bytes (0x80–0xBF) never equal a lead byte, so stopping at lead bytes alone is exact.
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = ALWAYS;
        i += 1;
    }
    t[0x7f] = ALWAYS;
    t[b'%' as usize] = ALWAYS;
    t[b' ' as usize] = SPACE;
    t[b'@' as usize] = AT;
    t[b',' as usize] = COMMA;
    t[b'"' as usize] = QUOTE;
    let leads = [0xc2, 0xd8, 0xe1, 0xe2, 0xe3, 0xef, 0xf3];
    let mut j = 0;
    while j < leads.len() {
        t[leads[j]] = LEAD;
        j += 1;
    }
    t
};

impl Extra {
    fn mask(self) -> u8 {
        ALWAYS
            | LEAD
            | match self {
                Extra::None => SPACE,
                Extra::At => SPACE | AT,
                Extra::Comma => SPACE | COMMA,
                Extra::Quoted => QUOTE,
            }
    }
}

/// Whether a non-ASCII character is escaped: controls, non-ASCII spaces, bidi and
/// invisible format characters (see the module doc).
pub fn is_hidden(c: char) -> bool {
    matches!(c,
        '\u{80}'..='\u{a0}'
        | '\u{ad}'
        | '\u{61c}'
        | '\u{1680}'
        | '\u{180e}'
        | '\u{2000}'..='\u{200f}'
        | '\u{2028}'..='\u{202f}'
        | '\u{205f}'..='\u{206f}'
        | '\u{3000}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}'
        | '\u{fffe}'..='\u{ffff}'
        | '\u{e0000}'..='\u{e007f}')
}

fn utf8_len(lead: u8) -> usize {
    match lead {
        0xf0.. => 4,
        0xe0.. => 3,
        _ => 2,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_pct(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
}

/// Appends `value` as one token (see the module doc).
pub fn escape_into(value: &str, extra: Extra, out: &mut Vec<u8>) {
    match value {
        "" => return out.push(b'-'),
        "-" => return out.extend_from_slice(b"%2D"),
        _ => {}
    }
    let mask = extra.mask();
    let b = value.as_bytes();
    let (mut start, mut i) = (0, 0);
    loop {
        while i < b.len() && CLASS[usize::from(b[i])] & mask == 0 {
            i += 1;
        }
        let Some(&c) = b.get(i) else { break };
        if c < 0x80 {
            out.extend_from_slice(&b[start..i]);
            push_pct(out, c);
            i += 1;
            start = i;
            continue;
        }
        // A lead byte, so `i` is a character boundary of the str.
        let len = utf8_len(c);
        if value[i..].chars().next().is_some_and(is_hidden) {
            out.extend_from_slice(&b[start..i]);
            for &byte in &b[i..i + len] {
                push_pct(out, byte);
            }
            start = i + len;
        }
        i += len;
    }
    out.extend_from_slice(&b[start..]);
}

/// `value` as one token, in a new string.
pub fn escape(value: &str, extra: Extra) -> String {
    let mut out = Vec::with_capacity(value.len() + 2);
    escape_into(value, extra, &mut out);
    // Only whole characters or ASCII escapes were copied.
    String::from_utf8(out).unwrap_or_default()
}

/// Why a token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EscapeError {
    #[error("empty token")]
    Empty,
    #[error("bad % escape")]
    Percent,
    #[error("raw control byte 0x{0:02x}")]
    Control(u8),
    #[error("not UTF-8 once unescaped")]
    NotUtf8,
}

fn hex(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'A'..=b'F' => Some(d - b'A' + 10),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    }
}

/// Reads one token back: `-` is the empty value, `%XX` a byte (either case of hex).
pub fn unescape(token: &[u8]) -> Result<String, EscapeError> {
    match token {
        b"" => return Err(EscapeError::Empty),
        b"-" => return Ok(String::new()),
        _ => {}
    }
    let clean = token.iter().all(|&c| c != b'%' && c >= 0x20 && c != 0x7f);
    if clean {
        return String::from_utf8(token.to_vec()).map_err(|_| EscapeError::NotUtf8);
    }
    let mut out = Vec::with_capacity(token.len());
    let mut i = 0;
    while i < token.len() {
        let c = token[i];
        match c {
            b'%' => {
                let (Some(&h), Some(&l)) = (token.get(i + 1), token.get(i + 2)) else {
                    return Err(EscapeError::Percent);
                };
                let (Some(h), Some(l)) = (hex(h), hex(l)) else {
                    return Err(EscapeError::Percent);
                };
                out.push(h << 4 | l);
                i += 3;
            }
            0..0x20 | 0x7f => return Err(EscapeError::Control(c)),
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| EscapeError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        let cases: [(&str, Extra, &str); 16] = [
            ("", Extra::None, "-"),
            ("-", Extra::None, "%2D"),
            ("--", Extra::None, "--"),
            ("a-b", Extra::None, "a-b"),
            ("a b", Extra::None, "a%20b"),
            ("50%", Extra::None, "50%25"),
            ("a\nb\r\tc", Extra::None, "a%0Ab%0D%09c"),
            ("\u{7f}\u{0}", Extra::None, "%7F%00"),
            ("u@h", Extra::None, "u@h"),
            ("u@h", Extra::At, "u%40h"),
            ("a,b", Extra::Comma, "a%2Cb"),
            ("a,b", Extra::None, "a,b"),
            ("été.h5", Extra::None, "été.h5"),
            ("evil\u{202e}fdp.exe", Extra::None, "evil%E2%80%AEfdp.exe"),
            ("nb\u{a0}sp\u{85}", Extra::None, "nb%C2%A0sp%C2%85"),
            ("say \"hi\"\n", Extra::Quoted, "say %22hi%22%0A"),
        ];
        for (value, extra, want) in cases {
            assert_eq!(escape(value, extra), want, "{value:?} {extra:?}");
            if extra != Extra::Quoted {
                assert_eq!(unescape(want.as_bytes()).unwrap(), value, "{want}");
            }
        }
    }

    #[test]
    fn unescape_refuses() {
        let bad: [(&[u8], EscapeError); 7] = [
            (b"", EscapeError::Empty),
            (b"a%", EscapeError::Percent),
            (b"a%4", EscapeError::Percent),
            (b"a%zz", EscapeError::Percent),
            (b"a\tb", EscapeError::Control(9)),
            (b"%FF", EscapeError::NotUtf8),
            (b"\xff", EscapeError::NotUtf8),
        ];
        for (token, err) in bad {
            assert_eq!(unescape(token), Err(err), "{token:?}");
        }
        assert_eq!(unescape(b"%2d%41").unwrap(), "-A");
    }

    #[test]
    fn every_hidden_char_is_escaped() {
        for c in (0x80u32..0x11_0000)
            .filter_map(char::from_u32)
            .filter(|c| is_hidden(*c))
        {
            let s = c.to_string();
            assert_eq!(CLASS[usize::from(s.as_bytes()[0])], LEAD, "{c:?} lead byte");
            assert!(escape(&s, Extra::None).starts_with('%'), "{c:?}");
        }
    }

    fn any_extra() -> impl Strategy<Value = Extra> {
        prop_oneof![Just(Extra::None), Just(Extra::At), Just(Extra::Comma)]
    }

    proptest! {
        #[test]
        fn round_trip(s in any::<String>(), extra in any_extra()) {
            let t = escape(&s, extra);
            prop_assert!(!t.is_empty());
            prop_assert!(!t.chars().any(|c| c == ' ' || c.is_control() || is_hidden(c)));
            match extra {
                Extra::At => prop_assert!(!t.contains('@')),
                Extra::Comma => prop_assert!(!t.contains(',')),
                _ => {}
            }
            prop_assert_eq!(unescape(t.as_bytes()).unwrap(), s);
        }

        #[test]
        fn quoted_keeps_one_line(s in any::<String>()) {
            let t = escape(&s, Extra::Quoted);
            prop_assert!(!t.chars().any(|c| c == '"' || c.is_control() || is_hidden(c)));
        }

        #[test]
        fn unescape_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unescape(&b);
        }
    }
}
