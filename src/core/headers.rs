//! A broker-neutral copy of AMQP header tables, so the core can be tested and fuzzed
//! without lapin. The adapter converts to and from lapin's `FieldTable`.

use serde::Serialize;

/// One AMQP header value. Only the shapes real pumps send are distinguished; the rest
/// (decimals, timestamps) arrive as `Int`/`Str` from the adapter.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HeaderValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Bytes(#[serde(serialize_with = "ser_bytes")] Vec<u8>),
    Array(Vec<HeaderValue>),
    Table(Headers),
    Void,
}

fn ser_bytes<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

impl HeaderValue {
    /// The value as text, if it is text-like (long strings arrive as bytes from some clients).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::Str(s) => Some(s),
            HeaderValue::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value as an integer, accepting numeric text and integral floats.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(i) => Some(*i),
            HeaderValue::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
                Some(*f as i64)
            }
            HeaderValue::Str(_) | HeaderValue::Bytes(_) => self.as_str()?.trim().parse().ok(),
            _ => None,
        }
    }

    /// The value as a finite float, accepting ints and numeric text; never infinity or
    /// NaN (which `str::parse` reads from `inf`, `NaN`, `1e999`): header values are
    /// hostile, and a NaN compares false with every threshold. Callers still check the
    /// range they can believe.
    pub fn as_f64(&self) -> Option<f64> {
        let x = match self {
            HeaderValue::Float(f) => *f,
            HeaderValue::Int(i) => *i as f64,
            HeaderValue::Str(_) | HeaderValue::Bytes(_) => self.as_str()?.trim().parse().ok()?,
            _ => return None,
        };
        x.is_finite().then_some(x)
    }

    pub fn as_table(&self) -> Option<&Headers> {
        match self {
            HeaderValue::Table(t) => Some(t),
            _ => None,
        }
    }

    /// Text for display and regex filters: tables and arrays flattened.
    pub fn to_text(&self) -> String {
        match self {
            HeaderValue::Str(s) => s.clone(),
            HeaderValue::Int(i) => i.to_string(),
            HeaderValue::Float(f) => f.to_string(),
            HeaderValue::Bool(b) => b.to_string(),
            HeaderValue::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            HeaderValue::Array(a) => a.iter().map(|v| v.to_text()).collect::<Vec<_>>().join(","),
            HeaderValue::Table(t) => {
                let inner: Vec<String> = t
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.to_text()))
                    .collect();
                format!("{{{}}}", inner.join(" "))
            }
            HeaderValue::Void => String::new(),
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        HeaderValue::Str(s.to_owned())
    }
}

impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        HeaderValue::Str(s)
    }
}

/// An ordered header table. Tables are small (a dozen entries), so a vector with linear
/// lookup beats a map and keeps the order the producer used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Headers(pub Vec<(String, HeaderValue)>);

impl Headers {
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    pub fn get(&self, key: &str) -> Option<&HeaderValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(HeaderValue::as_str)
    }

    /// Sets `key`, replacing an existing entry in place.
    pub fn set(&mut self, key: &str, value: impl Into<HeaderValue>) {
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<HeaderValue> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(i).1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &HeaderValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl Serialize for Headers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<K: Into<String>, V: Into<HeaderValue>> FromIterator<(K, V)> for Headers {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        Headers(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl From<i64> for HeaderValue {
    fn from(i: i64) -> Self {
        HeaderValue::Int(i)
    }
}

impl From<f64> for HeaderValue {
    fn from(f: f64) -> Self {
        HeaderValue::Float(f)
    }
}

impl From<Headers> for HeaderValue {
    fn from(t: Headers) -> Self {
        HeaderValue::Table(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_in_place() {
        let mut h: Headers = [("a", "1"), ("b", "2")].into_iter().collect();
        h.set("a", "3");
        assert_eq!(h.get_str("a"), Some("3"));
        assert_eq!(h.len(), 2);
        assert_eq!(h.0[0].0, "a");
    }

    #[test]
    fn numbers_from_text() {
        assert_eq!(HeaderValue::from(" 42 ").as_i64(), Some(42));
        assert_eq!(HeaderValue::Float(3.0).as_i64(), Some(3));
        assert_eq!(HeaderValue::Float(3.5).as_i64(), None);
        assert_eq!(HeaderValue::from("0.5").as_f64(), Some(0.5));
        assert_eq!(HeaderValue::from("1e300").as_f64(), Some(1e300));
        for v in [
            HeaderValue::from("inf"),
            HeaderValue::from("-infinity"),
            HeaderValue::from("NaN"),
            HeaderValue::from("1e999"),
            HeaderValue::Float(f64::NAN),
            HeaderValue::Float(f64::NEG_INFINITY),
        ] {
            assert_eq!(v.as_f64(), None, "{v:?}");
        }
    }
}
