//! The per-transfer bytes that cannot be shared: the last part of the relPath (file name
//! and any trailing `/`), the size and the identity, packed in one allocation. A sha512
//! identity arrives as 88 base64 characters (or 128 hex digits in v02 `sum`) but is only
//! 64 bytes of information, so values that re-encode exactly are kept decoded; anything
//! else is kept as text, so the rebuilt announcement always carries the value received.
//!
//! Layout: `method, encoding|has_size, [size varint], tail_len varint, tail,
//! [method_len varint, method], identity bytes`. Only this module reads or writes it, and
//! reading never panics (a short blob reads as absent fields).

use crate::core::report::Identity;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Method codes; 0 = no identity, `CUSTOM` = the method name follows the tail.
const METHODS: [&str; 7] = [
    "md5",
    "sha512",
    "md5name",
    "random",
    "cod",
    "arbitrary",
    "sha256",
];
const NONE: u8 = 0;
const CUSTOM: u8 = 0xff;

const RAW: u8 = 0;
const BASE64: u8 = 1;
const HEX: u8 = 2;
const HAS_SIZE: u8 = 0x80;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn method_code(m: &str) -> u8 {
    METHODS
        .iter()
        .position(|k| *k == m)
        .map_or(CUSTOM, |i| i as u8 + 1)
}

fn is_lower_hex(v: &str) -> bool {
    v.len() >= 2
        && v.len().is_multiple_of(2)
        && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex_val(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        _ => b.wrapping_sub(b'a').wrapping_add(10) & 0x0f,
    }
}

/// Appends the identity value to `out` in its most compact exact form; returns the
/// encoding. Runs for every 102, so it does not allocate.
fn compact_value(v: &str, out: &mut Vec<u8>) -> u8 {
    if is_lower_hex(v) {
        let b = v.as_bytes();
        out.extend(
            b.chunks_exact(2)
                .map(|p| (hex_val(p[0]) << 4) | hex_val(p[1])),
        );
        return HEX;
    }
    let start = out.len();
    if (4..=1024).contains(&v.len()) && STANDARD.decode_vec(v, out).is_ok() {
        // Kept decoded only if it encodes back to exactly what was received.
        let mut again = [0u8; 1024];
        if STANDARD
            .encode_slice(&out[start..], &mut again)
            .is_ok_and(|n| &again[..n] == v.as_bytes())
        {
            return BASE64;
        }
    }
    out.truncate(start);
    out.extend_from_slice(v.as_bytes());
    RAW
}

/// Packs the unshared fields of one transfer into `out` (cleared first).
pub(super) fn encode(
    out: &mut Vec<u8>,
    tail: &str,
    identity: Option<&Identity>,
    size: Option<u64>,
) {
    let code = identity.map_or(NONE, |id| method_code(&id.method));
    out.clear();
    out.push(code);
    out.push(if size.is_some() { HAS_SIZE } else { 0 });
    if let Some(s) = size {
        put_varint(out, s);
    }
    put_varint(out, tail.len() as u64);
    out.extend_from_slice(tail.as_bytes());
    if code == CUSTOM
        && let Some(id) = identity
    {
        put_varint(out, id.method.len() as u64);
        out.extend_from_slice(id.method.as_bytes());
    }
    if let Some(id) = identity {
        let enc = compact_value(&id.value, out);
        out[1] |= enc;
    }
}

/// A blob taken apart (borrowing from it).
pub(super) struct Parts<'a> {
    pub(super) tail: &'a str,
    pub(super) size: Option<u64>,
    code: u8,
    enc: u8,
    method: &'a str,
    value: &'a [u8],
}

pub(super) fn parts(b: &[u8]) -> Parts<'_> {
    let empty = Parts {
        tail: "",
        size: None,
        code: NONE,
        enc: RAW,
        method: "",
        value: &[],
    };
    let (Some(&code), Some(&flags)) = (b.first(), b.get(1)) else {
        return empty;
    };
    let mut pos = 2;
    let size = if flags & HAS_SIZE != 0 {
        match get_varint(b, &mut pos) {
            Some(s) => Some(s),
            None => return empty,
        }
    } else {
        None
    };
    let str_at = |pos: &mut usize| -> Option<&str> {
        let n = usize::try_from(get_varint(b, pos)?).ok()?;
        let s = std::str::from_utf8(b.get(*pos..pos.checked_add(n)?)?).ok()?;
        *pos += n;
        Some(s)
    };
    let Some(tail) = str_at(&mut pos) else {
        return empty;
    };
    let method = if code == CUSTOM {
        str_at(&mut pos).unwrap_or("")
    } else {
        METHODS
            .get(usize::from(code).wrapping_sub(1))
            .copied()
            .unwrap_or("")
    };
    Parts {
        tail,
        size,
        code,
        enc: flags & !HAS_SIZE,
        method,
        value: b.get(pos..).unwrap_or(&[]),
    }
}

impl Parts<'_> {
    pub(super) fn identity(&self) -> Option<Identity> {
        if self.code == NONE {
            return None;
        }
        let value = match self.enc {
            HEX => {
                let mut s = String::with_capacity(self.value.len() * 2);
                for b in self.value {
                    const DIGITS: &[u8; 16] = b"0123456789abcdef";
                    s.push(char::from(DIGITS[usize::from(b >> 4)]));
                    s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
                }
                s
            }
            BASE64 => STANDARD.encode(self.value),
            _ => String::from_utf8_lossy(self.value).into_owned(),
        };
        Some(Identity {
            method: self.method.to_owned(),
            value,
        })
    }

    /// Whether `id` is the stored identity (an absent identity matches nothing).
    pub(super) fn identity_is(&self, id: Option<&Identity>) -> bool {
        let Some(id) = id else { return false };
        if self.code == NONE || self.method != id.method {
            return false;
        }
        let mut value = Vec::with_capacity(self.value.len());
        let enc = compact_value(&id.value, &mut value);
        enc == self.enc && value == self.value
    }

    /// The file name used in product keys (the tail without trailing `/`).
    pub(super) fn name(&self) -> &str {
        self.tail.trim_end_matches('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(tail: &str, identity: Option<&Identity>, size: Option<u64>) -> Vec<u8> {
        let mut out = vec![1, 2, 3];
        encode(&mut out, tail, identity, size);
        out
    }

    fn id(m: &str, v: &str) -> Identity {
        Identity {
            method: m.into(),
            value: v.into(),
        }
    }

    #[test]
    fn sha512_base64_is_kept_in_64_bytes() {
        let v = STANDARD.encode([7u8; 64]);
        let b = enc("file.gif", Some(&id("sha512", &v)), Some(12345));
        assert!(b.len() <= 2 + 2 + 1 + 8 + 64, "{}", b.len());
        let p = parts(&b);
        assert_eq!(p.tail, "file.gif");
        assert_eq!(p.size, Some(12345));
        assert_eq!(p.identity(), Some(id("sha512", &v)));
        assert!(p.identity_is(Some(&id("sha512", &v))));
        assert!(!p.identity_is(Some(&id("md5", &v))));
    }

    #[test]
    fn hex_raw_and_custom_methods_round_trip() {
        for i in [
            id("md5", "0f3c9a7e1b2d4c6f8a9b0c1d2e3f4a5b"),
            id("sha512", "ABCDEF"),
            id("cod", "sha512"),
            id("weird,method", "not base64!"),
            id("", ""),
        ] {
            let b = enc("d/", Some(&i), None);
            let p = parts(&b);
            assert_eq!(p.identity(), Some(i.clone()));
            assert_eq!(p.tail, "d/");
            assert_eq!(p.name(), "d");
            assert!(p.identity_is(Some(&i)));
        }
        assert_eq!(parts(&enc("x", None, None)).identity(), None);
    }

    proptest! {
        #[test]
        fn round_trip(tail in ".{0,40}", m in ".{0,12}", v in ".{0,100}", size in proptest::option::of(any::<u64>())) {
            let i = id(&m, &v);
            let b = enc(&tail, Some(&i), size);
            let p = parts(&b);
            prop_assert_eq!(p.tail, tail.as_str());
            prop_assert_eq!(p.size, size);
            prop_assert_eq!(p.identity(), Some(i));
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let p = parts(&b);
            let _ = p.identity();
            let _ = p.identity_is(Some(&id("md5", "x")));
        }
    }
}
