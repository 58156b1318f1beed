//! Identifiers at ingest: keyed pseudonyms for plates and track ids, thumbnails dropped for
//! sensitive object classes, and redaction of identifiers in rejected payloads.
//!
//! A pseudonym is `HMAC-SHA256(K_p, value)`, truncated to 128 bits and written in unpadded
//! base64url (22 characters), where `K_p = HMAC-SHA256(secret, "citystream/pseudonym/v1/" + p)`
//! and `p` is the event-time period (`floor(ts / period)`, one day by default). Within a period
//! the same plate gives the same pseudonym (counts, travel times); across periods the keys are
//! unrelated, so a vehicle cannot be linked from one day to the next without the secret. The
//! raw value is hashed where the JSON parser left it in the payload and is never copied into a
//! batch.

use std::borrow::Cow;
use std::collections::HashMap;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// Keyed, rotating pseudonyms (see the module docs).
#[derive(Clone)]
pub struct Pseudonymizer {
    secret: Vec<u8>,
    period_ms: i64,
    /// Period keys already derived.
    keys: HashMap<i64, HmacSha256>,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the secret
        f.debug_struct("Pseudonymizer").field("period_ms", &self.period_ms).finish_non_exhaustive()
    }
}

impl PartialEq for Pseudonymizer {
    fn eq(&self, other: &Self) -> bool {
        self.period_ms == other.period_ms && self.secret == other.secret
    }
}

/// Why a secret was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Too short to resist guessing.
    #[error("the pseudonymization secret is {0} bytes; at least {MIN_SECRET_BYTES} are needed")]
    TooShort(usize),
    /// A rotation period of zero.
    #[error("the rotation period must be positive")]
    BadPeriod,
}

impl Pseudonymizer {
    /// A pseudonymizer with `secret` rotating every `period_ms` of event time.
    pub fn new(secret: Vec<u8>, period_ms: i64) -> Result<Self, SecretError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort(secret.len()));
        }
        if period_ms <= 0 {
            return Err(SecretError::BadPeriod);
        }
        Ok(Self { secret, period_ms, keys: HashMap::new() })
    }

    /// The pseudonym of `value` for an event at `ts_ms`.
    pub fn pseudonym(&mut self, value: &str, ts_ms: i64) -> String {
        let period = ts_ms.div_euclid(self.period_ms);
        let secret = &self.secret;
        let key = self.keys.entry(period).or_insert_with(|| {
            let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
            m.update(format!("citystream/pseudonym/v1/{period}").as_bytes());
            let k = m.finalize().into_bytes();
            HmacSha256::new_from_slice(&k).expect("HMAC takes keys of any length")
        });
        let mut m = key.clone();
        m.update(value.as_bytes());
        let digest = m.finalize().into_bytes();
        if self.keys.len() > 16 {
            // events span few periods at a time; forget old ones
            let keep = period - 8;
            self.keys.retain(|p, _| *p >= keep);
        }
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16])
    }
}

/// `HMAC-SHA256(secret, domain ‖ message)`, fed in pieces: a keyed digest for uses other than
/// pseudonyms (the seed of a differentially private release's noise, for instance). `domain`
/// separates the uses, so one secret can never give the same digest to two of them.
#[derive(Clone)]
pub struct KeyedDigest(HmacSha256);

impl KeyedDigest {
    /// A digest under `secret` for `domain` (e.g. `citystream/dp-noise/v1`).
    pub fn new(secret: &[u8], domain: &str) -> Self {
        let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
        m.update(&(domain.len() as u64).to_le_bytes());
        m.update(domain.as_bytes());
        Self(m)
    }

    /// Adds `bytes`, length-prefixed (so pieces cannot run into each other).
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// The 32-byte digest.
    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for KeyedDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyedDigest")
    }
}

/// What the camera decoder does with identifiers and images.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Privacy {
    /// Pseudonymize plates and track ids; `None` drops them (the columns stay null).
    pub pseudonymizer: Option<Pseudonymizer>,
    /// Object classes whose thumbnails are dropped at ingest (e.g. `pedestrian`).
    pub drop_thumbnail_classes: Vec<String>,
}

/// JSON keys whose values are personal identifiers.
pub const IDENTIFIER_KEYS: [&str; 2] = ["plate", "track_id"];

/// JSON keys whose values a dead letter never keeps: the identifiers, and camera images
/// (which may show a face or a plate).
const PERSONAL_KEYS: [&str; 3] = [IDENTIFIER_KEYS[0], IDENTIFIER_KEYS[1], "thumbnail"];

/// What replaces a personal value in a dead letter.
const REDACTED: &str = "<redacted>";

/// What a dead letter keeps of a payload that is not JSON and may hide an identifier where
/// no scan can find it (an escaped key, a list after an identifier key).
pub const WITHHELD: &[u8] = b"<withheld: not JSON, may hold an identifier>";

fn is_personal(key: &str) -> bool {
    PERSONAL_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// `payload` as a dead letter may keep it: the values of [`IDENTIFIER_KEYS`] and of
/// `thumbnail` replaced by `"<redacted>"`, at any depth, whatever their case or escaping.
///
/// A payload that is not UTF-8 or holds a NUL byte is withheld ([`WITHHELD`]): other decoders
/// read UTF-16 and UTF-32 JSON, where no byte scan finds a key. JSON that mentions a personal
/// key (in any case) or has an escape is parsed and written again (keys sorted, spacing
/// removed, a repeated key once); a string in it that mentions one is parsed as JSON and
/// redacted too (double-encoded payloads, envelopes), or replaced whole when it is not JSON.
/// Other JSON is kept as it came. A payload that is not JSON is scanned for quoted personal
/// keys: a string or scalar after one is redacted up to its end. Where the scan cannot be
/// sure — a list or object after a key, a backslash anywhere, a key in another spelling, a
/// value that does not end where a JSON value would — the payload is withheld.
pub fn redact_identifiers(payload: &[u8]) -> Cow<'_, [u8]> {
    if std::str::from_utf8(payload).is_err() || payload.contains(&0) {
        return Cow::Borrowed(WITHHELD);
    }
    if !mentions_personal(payload) && !payload.contains(&b'\\') {
        return Cow::Borrowed(payload);
    }
    match serde_json::from_slice::<serde_json::Value>(payload) {
        // written again even where nothing was redacted: a repeated key keeps its last value
        // only, so an earlier one (`{"plate":"AB-1","plate":null}`) must not survive as sent
        Ok(mut value) => {
            redact_value(&mut value);
            Cow::Owned(serde_json::to_vec(&value).unwrap_or_else(|_| WITHHELD.to_vec()))
        }
        Err(_) => redact_text(payload),
    }
}

/// Whether `bytes` name a personal key, in any case.
fn mentions_personal(bytes: &[u8]) -> bool {
    let lower = bytes.to_ascii_lowercase();
    PERSONAL_KEYS.iter().any(|k| lower.windows(k.len()).any(|w| w == k.as_bytes()))
}

/// Redacts personal values in place, at any depth, and inside strings that hold JSON.
fn redact_value(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if !is_personal(k) {
                    redact_value(v);
                } else if !v.is_null() {
                    *v = Value::String(REDACTED.into());
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_value),
        Value::String(text) if mentions_personal(text.as_bytes()) => {
            *text = match serde_json::from_str::<Value>(text) {
                Ok(mut inner) => {
                    redact_value(&mut inner);
                    serde_json::to_string(&inner).unwrap_or_else(|_| REDACTED.into())
                }
                Err(_) => REDACTED.into(),
            };
        }
        _ => {}
    }
}

/// Redaction of a payload that is not JSON (see [`redact_identifiers`]).
fn redact_text(payload: &[u8]) -> Cow<'_, [u8]> {
    // an escape can spell a key no byte scan sees; a key in another case or spelling is caught
    // by the check of the scan's result (`redacted_everywhere`)
    if payload.contains(&b'\\') {
        return Cow::Borrowed(WITHHELD);
    }
    let mut out = Vec::with_capacity(payload.len());
    let mut i = 0;
    'scan: while i < payload.len() {
        for k in PERSONAL_KEYS {
            let pat_len = k.len() + 2;
            if payload[i] == b'"'
                && payload.len() >= i + pat_len
                && &payload[i + 1..i + 1 + k.len()] == k.as_bytes()
                && payload[i + pat_len - 1] == b'"'
            {
                out.extend_from_slice(&payload[i..i + pat_len]);
                let mut j = i + pat_len;
                while j < payload.len() && (payload[j].is_ascii_whitespace() || payload[j] == b':') {
                    out.push(payload[j]);
                    j += 1;
                }
                if j >= payload.len() {
                    break 'scan;
                }
                match payload[j] {
                    b'"' => {
                        // a string (no escapes, checked above): up to its closing quote
                        match payload[j + 1..].iter().position(|b| *b == b'"') {
                            Some(e) => {
                                out.extend_from_slice(b"\"<redacted>\"");
                                i = j + 1 + e + 1;
                            }
                            None => {
                                out.extend_from_slice(b"\"<redacted>");
                                break 'scan;
                            }
                        }
                    }
                    b'[' | b'{' => return Cow::Borrowed(WITHHELD),
                    _ if payload[j..].starts_with(b"null") => {
                        out.extend_from_slice(b"null");
                        i = j + 4;
                    }
                    _ => {
                        out.extend_from_slice(b"\"<redacted>\"");
                        match payload[j..].iter().position(|b| matches!(b, b',' | b'}' | b']' | b'"')) {
                            // a bare value runs into a quote: not JSON's shape, no end to trust
                            Some(e) if payload[j + e] == b'"' => return Cow::Borrowed(WITHHELD),
                            Some(e) => i = j + e,
                            None => break 'scan,
                        }
                    }
                }
                continue 'scan;
            }
        }
        out.push(payload[i]);
        i += 1;
    }
    if redacted_everywhere(&out) { Cow::Owned(out) } else { Cow::Borrowed(WITHHELD) }
}

/// Whether every personal key in a scanned payload is followed (after `:` and spaces) by
/// `"<redacted>"` or `null` and then the end of a JSON value: a check on the scan's result, so
/// a shape the scan misread (a string swallowing the next key's quote, `nullAB-12`, a comment
/// before the value) withholds the payload instead of keeping a value.
fn redacted_everywhere(out: &[u8]) -> bool {
    let lower = out.to_ascii_lowercase();
    for k in PERSONAL_KEYS {
        for (at, _) in lower.windows(k.len()).enumerate().filter(|(_, w)| *w == k.as_bytes()) {
            let mut j = at + k.len();
            if out.get(j) != Some(&b'"') {
                return false;
            }
            j += 1;
            while j < out.len() && (out[j] == b':' || out[j] == b' ') {
                j += 1;
            }
            let rest = &out[j..];
            let value_len = if rest.starts_with(b"\"<redacted>\"") {
                12
            } else if rest.starts_with(b"\"<redacted>") && rest.len() == 11 {
                11 // cut where the payload ended
            } else if rest.starts_with(b"null") {
                4
            } else if rest.is_empty() {
                0
            } else {
                return false;
            };
            if !matches!(rest.get(value_len), None | Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')) {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_within_a_period_and_unlinkable_across() {
        let mut p = Pseudonymizer::new(vec![7; 32], 86_400_000).unwrap();
        let day = 86_400_000;
        let a = p.pseudonym("AB-CD-1234", 10);
        assert_eq!(a, p.pseudonym("AB-CD-1234", day - 1), "same day, same pseudonym");
        assert_ne!(a, p.pseudonym("AB-CD-1234", day), "next day, another");
        assert_ne!(a, p.pseudonym("AB-CD-1235", 10));
        assert_eq!(a.len(), 22);
        assert!(!a.contains("AB"));
        let mut other = Pseudonymizer::new(vec![8; 32], 86_400_000).unwrap();
        assert_ne!(a, other.pseudonym("AB-CD-1234", 10), "another secret, another pseudonym");
        assert!(matches!(Pseudonymizer::new(vec![1; 16], 1), Err(SecretError::TooShort(16))));
        assert!(!format!("{p:?}").contains('7'), "Debug never shows the secret");
    }

    #[test]
    fn keyed_digests_depend_on_key_domain_and_piece_boundaries() {
        let d = |key: &[u8], domain: &str, parts: &[&[u8]]| {
            let mut h = KeyedDigest::new(key, domain);
            parts.iter().for_each(|p| h.update(p));
            h.finish()
        };
        let a = d(&[1; 32], "x", &[b"ab", b"c"]);
        assert_eq!(a, d(&[1; 32], "x", &[b"ab", b"c"]));
        assert_ne!(a, d(&[2; 32], "x", &[b"ab", b"c"]));
        assert_ne!(a, d(&[1; 32], "y", &[b"ab", b"c"]));
        assert_ne!(a, d(&[1; 32], "x", &[b"a", b"bc"]), "pieces are length-prefixed");
    }

    #[test]
    fn redaction_removes_identifier_values_even_from_broken_json() {
        let r = |s: &str| String::from_utf8(redact_identifiers(s.as_bytes()).into_owned()).unwrap();
        // JSON: parsed, redacted at any depth and in any spelling, written again
        assert_eq!(
            r(r#"{"plate":"AB-1","track_id": "t-9","count":1}"#),
            r#"{"count":1,"plate":"<redacted>","track_id":"<redacted>"}"#
        );
        assert_eq!(r(r#"{"plate":"AB\"1","x":2}"#), r#"{"plate":"<redacted>","x":2}"#);
        assert_eq!(r(r#"{"plate":12345,"x":2}"#), r#"{"plate":"<redacted>","x":2}"#);
        assert_eq!(r(r#"{"pl\u0061te":"AB-1"}"#), r#"{"plate":"<redacted>"}"#);
        assert_eq!(r(r#"{"Plate":["AB-1","CD-2"]}"#), r#"{"Plate":"<redacted>"}"#);
        assert_eq!(r(r#"[{"x":{"plate":"AB-1"}}]"#), r#"[{"x":{"plate":"<redacted>"}}]"#);
        assert_eq!(r(r#"{"plate":"A","plate":"B"}"#), r#"{"plate":"<redacted>"}"#);
        assert_eq!(r(r#"{"plate":"AB-1","plate":null}"#), r#"{"plate":null}"#);
        assert_eq!(r(r#"{"x":{"plate":"AB-1"},"x":1}"#), r#"{"x":1}"#);
        assert_eq!(r(r#"{"thumbnail":"aGVsbG8="}"#), r#"{"thumbnail":"<redacted>"}"#);
        assert_eq!(r(r#"{"plate":null}"#), r#"{"plate":null}"#);
        assert!(matches!(redact_identifiers(b"{\"x\": 1}"), Cow::Borrowed(b"{\"x\": 1}")));
        // not JSON: scanned where the scan can be sure, withheld where it cannot
        assert_eq!(r(r#"{"x":1,"plate":"AB-CD-12"#), r#"{"x":1,"plate":"<redacted>"#);
        assert_eq!(r(r#"{"plate":12345,"x":2"#), r#"{"plate":"<redacted>","x":2"#);
        assert_eq!(r(r#"{"plate":"AB","x":"#), r#"{"plate":"<redacted>","x":"#);
        assert_eq!(r(r#"{"x":1"#), r#"{"x":1"#);
        let withheld = std::str::from_utf8(WITHHELD).unwrap();
        assert_eq!(r(r#"{"pl\u0061te":"AB-1""#), withheld);
        assert_eq!(r(r#"{"plate":"AB\"1""#), withheld);
        assert_eq!(r(r#"{"plate":["AB","CD"]"#), withheld);
        assert_eq!(r(r#"{"PLATE":"AB""#), withheld);
        assert_eq!(r(r#"{plate:"AB""#), withheld);
        // shapes a byte scan could misread
        assert_eq!(r(r#"{"plate"/*c*/:"AB-12""#), withheld);
        assert_eq!(r(r#"{"thumbnail":"abc,"plate":"AB-1"}"#), withheld);
        assert_eq!(r(r#"{"plate":nullAB-12"#), withheld);
        assert_eq!(r(r#"{"plate":x"AB-12""#), withheld);
        // not UTF-8 (UTF-16 JSON), or a NUL byte: withheld whatever it says
        let utf16: Vec<u8> = "{\"plate\":\"AB-1\"}".encode_utf16().flat_map(u16::to_le_bytes).collect();
        assert_eq!(redact_identifiers(&utf16).as_ref(), WITHHELD);
        assert_eq!(redact_identifiers(b"{\"x\":1}\0").as_ref(), WITHHELD);
        // JSON inside a string: parsed and redacted, or replaced whole
        assert_eq!(r(r#""{\"plate\":\"AB-12\"}""#), r#""{\"plate\":\"<redacted>\"}""#);
        assert_eq!(
            r(r#"{"payload":"{\"plate\":\"AB-12\",\"x\":1}"}"#),
            r#"{"payload":"{\"plate\":\"<redacted>\",\"x\":1}"}"#
        );
        assert_eq!(r(r#"{"note":"plate AB-12 seen"}"#), r#"{"note":"<redacted>"}"#);
    }
}
