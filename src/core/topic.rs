//! Topic (routing key) words. Path directories are joined with `.`; characters that AMQP
//! topic matching treats specially are percent-encoded as Sarracenia does. Routing keys and
//! header values are at most 255 bytes, so long input is cut on a UTF-8 boundary, never
//! refused.

/// AMQP's limit for short strings (routing keys, header names, shortstr values).
pub const MAX_SHORT: usize = 255;

/// Encodes one path component as a topic word.
pub fn encode_word(w: &str, out: &mut String) {
    for c in w.chars() {
        match c {
            '#' => out.push_str("%23"),
            '*' => out.push_str("%2A"),
            ' ' => out.push_str("%20"),
            c => out.push(c),
        }
    }
}

/// Decodes a topic word for display: `%23`, `%2A`/`%2a`, `%20`, and sr3's `%22`.
pub fn decode_word(w: &str) -> String {
    if !w.contains('%') {
        return w.to_owned();
    }
    let mut out = String::with_capacity(w.len());
    let mut rest = w;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3).unwrap_or("");
        let c = match code.to_ascii_uppercase().as_str() {
            "23" => Some('#'),
            "2A" => Some('*'),
            "20" => Some(' '),
            "22" => Some('"'),
            _ => None,
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[i + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `prefix` followed by the path components of `rel_path` (the file name too when
/// `with_file`), each encoded; cut to 255 bytes.
pub fn topic_for(prefix: &str, rel_path: &str, with_file: bool) -> String {
    let mut out = String::with_capacity(prefix.len() + rel_path.len() + 8);
    out.push_str(prefix);
    let trimmed = rel_path.trim_matches('/');
    let mut parts: Vec<&str> = trimmed.split('/').filter(|p| !p.is_empty()).collect();
    if !with_file && !rel_path.ends_with('/') {
        parts.pop();
    }
    for p in parts {
        out.push('.');
        encode_word(p, &mut out);
    }
    truncate_utf8(&mut out, MAX_SHORT);
    out
}

/// Cuts `s` to at most `max` bytes without splitting a character.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// The same as [`truncate_utf8`], on a borrowed string.
pub fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topics() {
        assert_eq!(
            topic_for("v02.report", "NRDPS/GIF/NRDPS_HiRes_000.gif", true),
            "v02.report.NRDPS.GIF.NRDPS_HiRes_000.gif"
        );
        assert_eq!(
            topic_for("v03", "/a b/c#d/e*f/file", false),
            "v03.a%20b.c%23d.e%2Af"
        );
        assert_eq!(topic_for("v03", "dir/", false), "v03.dir");
        assert_eq!(topic_for("v03", "", false), "v03");
    }

    #[test]
    fn decode() {
        assert_eq!(decode_word("a%20b%23c%2ad%22e%zz%"), "a b#c*d\"e%zz%");
    }

    #[test]
    fn long_topics_are_cut_on_a_char_boundary() {
        let path = "é".repeat(300);
        let t = topic_for("v02.report", &path, true);
        assert!(t.len() <= 255);
        assert!(t.len() >= 253);
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(w in "[^/]{0,30}") {
            let mut e = String::new();
            encode_word(&w, &mut e);
            prop_assert!(!e.contains('#') && !e.contains('*') && !e.contains(' '));
            // `%` itself is not escaped (Sarracenia does not), so only words without
            // escape-like sequences round-trip.
            if !w.contains('%') {
                prop_assert_eq!(decode_word(&e), w);
            }
        }

        #[test]
        fn truncation_is_valid_utf8(s in ".{0,400}", max in 0usize..300) {
            let mut t = s.clone();
            truncate_utf8(&mut t, max);
            prop_assert!(t.len() <= max);
            prop_assert!(s.starts_with(&t));
            prop_assert_eq!(truncated(&s, max), t.as_str());
        }
    }
}
