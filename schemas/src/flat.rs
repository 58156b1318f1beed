//! The fast path of decoding: one pass over a flat JSON object of known keys.
//!
//! Nearly every event a sensor sends is one flat object whose keys are the contract's own, whose
//! strings carry no escapes and whose numbers are plain decimals. [`scan`] reads such an object
//! without serde's per-field machinery. Anything else makes it give up (`None`) — an escape, a
//! nested value, `true`/`false`, an unknown or repeated key, an exponent, a negative integer, a
//! leading zero, more than 18 digits, text after the object — and the caller parses the
//! payload with serde_json as before. So the fast path only answers where serde_json would have
//! accepted the payload, and then with the same values: integers are exact, and a decimal is
//! computed as serde_json computes it (its digits as one integer, divided by a power of ten
//! once). Errors, and their messages, always come from serde_json. The tests compare both paths
//! on random and mutated payloads.

/// One value of a flat object, borrowed from the payload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Value<'a> {
    /// A string without escapes (its text between the quotes).
    Str(&'a str),
    /// A number made of digits, `.` and `-` (its form is checked when it is read).
    Num(&'a str),
    /// `null`.
    Null,
}

/// Most digits a number may have on the fast path: their value fits a `u64` (and an `i64`).
const MAX_DIGITS: usize = 18;

/// Powers of ten as serde_json divides by them (exact up to 1e22).
const POW10: [f64; MAX_DIGITS + 1] =
    [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18];

impl<'a> Value<'a> {
    /// The string, if this is one.
    pub(crate) fn str(self) -> Option<&'a str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value of a plain non-negative integer (no leading zero, no `.`, no sign).
    pub(crate) fn int(self) -> Option<i64> {
        let Value::Num(s) = self else { return None };
        // (a point is always followed by a digit: no digits after it means no point)
        let (v, frac) = digits(s)?;
        (frac == 0).then_some(v as i64)
    }

    /// The value of a plain decimal (a minus sign allowed), computed as serde_json computes
    /// it: all digits as one integer, converted, divided once by ten to the number of digits
    /// after the point (by 1 for an integer: exact), then negated for a minus sign (`-0` is
    /// -0.0, as there).
    pub(crate) fn float(self) -> Option<f64> {
        let Value::Num(s) = self else { return None };
        let (negative, s) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (v, frac) = digits(s)?;
        let f = v as f64 / POW10[frac];
        Some(if negative { -f } else { f })
    }
}

/// The digits of `s` (`int` or `int.frac`, each part non-empty, no leading zero in `int`
/// unless it is `0`) as one integer, and how many of them follow the point; `None` for any
/// other form or more than [`MAX_DIGITS`] digits.
fn digits(s: &str) -> Option<(u64, usize)> {
    let b = s.as_bytes();
    let (mut v, mut n, mut point) = (0u64, 0, None);
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'0'..=b'9' if n < MAX_DIGITS => {
                v = v * 10 + u64::from(c - b'0');
                n += 1;
            }
            b'.' if point.is_none() && i > 0 && i + 1 < b.len() => point = Some(i),
            _ => return None,
        }
    }
    let int = point.unwrap_or(b.len());
    if int == 0 || (int > 1 && b[0] == b'0') {
        return None;
    }
    Some((v, point.map_or(0, |p| b.len() - p - 1)))
}

/// Whether `a` and `b` are equal: inline, for the short keys compared (a call to `memcmp` cost
/// more than the comparison).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// JSON's whitespace.
fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_ws(b[i]) {
        i += 1;
    }
    i
}

/// The string starting after the quote at `start - 1`, and the index after its closing quote;
/// `None` at an escape, a control character (serde_json refuses those) or the end.
fn string(text: &str, start: usize) -> Option<(&str, usize)> {
    let b = text.as_bytes();
    let mut i = start;
    // eight bytes at a time up to the first that needs a look
    while let Some(word) = b.get(i..i + 8) {
        if special(u64::from_le_bytes(word.try_into().expect("eight bytes"))) {
            break;
        }
        i += 8;
    }
    loop {
        match *b.get(i)? {
            b'"' => return Some((&text[start..i], i + 1)),
            b'\\' | 0..=0x1f => return None,
            _ => i += 1,
        }
    }
}

/// Whether any of the eight bytes of `w` is a quote, a backslash or a control character
/// (exact: the classic zero-byte and less-than tests on a word).
fn special(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\'))) | below_space) != 0
}

/// The values of a flat object's keys, in the order of `names` (`None` for a key the object
/// lacks); `None` where the text is anything but such an object (see the module's
/// documentation), a key not in `names` included. A key is first compared with the name after
/// the previous key's: senders write their keys in one order.
pub(crate) fn scan<'a, const N: usize>(text: &'a str, names: &[&str; N]) -> Option<[Option<Value<'a>>; N]> {
    let b = text.as_bytes();
    let mut out = [None; N];
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut next = 0;
    loop {
        if b.get(i) != Some(&b'"') {
            // `{}` too: an empty object is rare and serde_json knows what it lacks
            return None;
        }
        let expected = names.get(next).map(|n| n.as_bytes()).unwrap_or_default();
        let after = i + 1 + expected.len();
        let slot = if !expected.is_empty()
            && b.get(i + 1..after).is_some_and(|k| same(k, expected))
            && b.get(after) == Some(&b'"')
        {
            i = after + 1;
            next
        } else {
            let (key, end) = string(text, i + 1)?;
            i = end;
            names.iter().position(|n| *n == key)?
        };
        next = slot + 1;
        if out[slot].is_some() {
            return None;
        }
        i = skip_ws(b, i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let (value, end) = match *b.get(i)? {
            b'"' => {
                let (s, end) = string(text, i + 1)?;
                (Value::Str(s), end)
            }
            b'n' if b[i..].starts_with(b"null") => (Value::Null, i + 4),
            b'0'..=b'9' | b'-' => {
                let len = b[i..].iter().position(|c| !matches!(c, b'0'..=b'9' | b'.' | b'-')).unwrap_or(b.len() - i);
                (Value::Num(&text[i..i + len]), i + len)
            }
            _ => return None,
        };
        out[slot] = Some(value);
        i = skip_ws(b, end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => break,
            _ => return None,
        }
    }
    (skip_ws(b, i + 1) == b.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: [&str; 3] = ["a", "b", "c"];

    #[test]
    fn a_flat_object_gives_each_key_its_value() {
        let v = scan(" {\"b\": 12.5 ,\"a\":\"x é\"}\n", &KEYS).unwrap();
        assert_eq!(v, [Some(Value::Str("x é")), Some(Value::Num("12.5")), None]);
        assert_eq!(scan("{\"c\":null}", &KEYS).unwrap()[2], Some(Value::Null));
    }

    #[test]
    fn anything_but_a_plain_flat_object_is_left_to_serde() {
        for text in [
            "{}",
            "[1]",
            "{\"a\":1,\"a\":2}",
            "{\"d\":1}",
            "{\"a\":\"x\\ny\"}",
            "{\"a\":\"x\ty\"}",
            "{\"a\\u0062\":1}",
            "{\"a\":{\"b\":1}}",
            "{\"a\":[1]}",
            "{\"a\":true}",
            "{\"a\":+1}",
            "{\"a\":1e3}",
            "{\"a\":1,}",
            "{\"a\":1} x",
            "{\"a\":1",
            "{\"a\" 1}",
            "{\"a\":nul}",
            "{\"a\":nullx}",
            "{\"a\":\"x}",
        ] {
            assert_eq!(scan(text, &KEYS), None, "{text}");
        }
    }

    #[test]
    fn numbers_are_read_only_in_their_plain_forms() {
        let num = |s| Value::Num(s);
        assert_eq!(num("0").int(), Some(0));
        assert_eq!(num("123456789012345678").int(), Some(123_456_789_012_345_678));
        for bad in ["1234567890123456789", "01", "1.0", "1.", ".5", "1..2", "1.2.3", "", "-1", "-0", "1-2"] {
            assert_eq!(num(bad).int(), None, "{bad}");
        }
        assert_eq!(num("0.164").float(), Some(0.164));
        assert_eq!(num("23").float(), Some(23.0));
        assert_eq!(num("0.1").float(), Some(0.1));
        assert_eq!(num("-12.5").float(), Some(-12.5));
        assert_eq!(num("-0").float().map(f64::to_bits), Some((-0.0f64).to_bits()));
        for bad in ["00.5", "1.", ".5", "1.2.3", "1234567890.123456789", "--1", "-", "1-2", "-.5"] {
            assert_eq!(num(bad).float(), None, "{bad}");
        }
        assert_eq!(Value::Str("1").int(), None);
        assert_eq!(Value::Null.float(), None);
    }

    #[test]
    fn the_word_test_finds_every_quote_backslash_and_control_byte() {
        for filler in [b'a', b' ', 0x7f, 0x80, 0xa2, 0xc3, 0xe2, 0xff] {
            for at in 0..8 {
                for byte in 0..=255u8 {
                    let mut word = [filler; 8];
                    word[at] = byte;
                    let expected = byte == b'"' || byte == b'\\' || byte < 0x20;
                    assert_eq!(special(u64::from_le_bytes(word)), expected, "byte {byte:#x} at {at} among {filler:#x}");
                }
            }
        }
    }

    #[test]
    fn a_string_ends_at_its_quote_and_gives_up_at_an_escape_or_control_character_anywhere() {
        for at in 0..20 {
            let body: String = "é-abcdefghijklmnopqrstuvwxyz".chars().take(at).collect();
            let text = format!("\"{body}\" tail");
            assert_eq!(string(&text, 1), Some((body.as_str(), body.len() + 2)), "{text}");
            for bad in ["\\n", "\u{1}", "\u{1f}", "\n", "\t"] {
                let text = format!("\"{body}{bad}rest of a long string\"");
                assert_eq!(string(&text, 1), None, "{text:?}");
            }
            assert_eq!(string(&format!("\"{body}"), 1), None, "unterminated");
        }
    }

    #[test]
    fn numbers_read_as_serde_json_reads_them() {
        // signs, zeros, trailing zeros, 18 digits above 2^53, and a value whose last bit
        // differs with serde_json's `float_roundtrip` (which must stay off for the paths to agree)
        for text in [
            "0",
            "-0",
            "-0.0",
            "0.000",
            "1.50",
            "0.1",
            "0.3",
            "23.8",
            "-12.25",
            "9007199254740993",
            "123456789012345678",
            "12345678.9012345678",
            "0.12345678901234567",
            "61.8227913935318852",
            "999999999999999999",
        ] {
            let by_serde: f64 = serde_json::from_str(text).unwrap();
            assert_eq!(Value::Num(text).float().map(f64::to_bits), Some(by_serde.to_bits()), "{text}");
            if let Some(v) = Value::Num(text).int() {
                assert_eq!(Some(v), serde_json::from_str::<i64>(text).ok(), "{text}");
            }
        }
        assert_eq!(Value::Num("61.8227913935318852").float(), Some(61.822791393531894));
    }

    /// A small deterministic generator (xorshift), so a failure names its case.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len())]
        }
        fn digits(&mut self, max: usize) -> String {
            (0..self.below(max + 1)).map(|_| char::from(b'0' + self.below(10) as u8)).collect()
        }
    }

    /// A number in one of JSON's forms or close to one: signs, leading zeros, points, exponents,
    /// many digits, and the plain decimals sensors send.
    fn number(r: &mut Rng) -> String {
        match r.below(4) {
            0 => format!("{}", r.below(100_000)),
            1 => format!("{}.{}", r.below(300), r.digits(4).trim_end_matches('0').to_owned() + "1"),
            2 => format!("{}", (r.below(1 << 30) as f64 - (1 << 29) as f64) / 1000.0),
            _ => {
                let mut s = r.pick(&["", "", "-", "--", "+"]).to_owned();
                s += &r.digits(21);
                if r.below(2) == 0 {
                    s += ".";
                    s += &r.digits(21);
                }
                if r.below(5) == 0 {
                    s += r.pick(&["e", "E", "e-", "e+"]);
                    s += &r.digits(3);
                }
                s
            }
        }
    }

    fn value(r: &mut Rng) -> String {
        match r.below(12) {
            0..=4 => number(r),
            5..=7 => format!(
                "\"{}\"",
                r.pick(&["seg-0001", "loop-7", "", "é✓", "2026-03-02T08:00:00Z", "x\\\"y", "a\\u0041", "t\tab"])
            ),
            8 => "null".into(),
            9 => r.pick(&["true", "false", "{}", "[1,2]", "{\"a\":1}"]).into(),
            _ => format!("{}", 1_772_409_600_000u64 + r.below(1 << 30) as u64),
        }
    }

    fn ws(r: &mut Rng) -> &'static str {
        if r.below(60) == 0 { "\u{c}" } else { r.pick(&["", "", "", "", "", " ", "\n", "\t ", "\r\n"]) }
    }

    /// A payload made from an event's fields (`key`, value): each field sometimes dropped,
    /// repeated, given an escaped key or another value, an unknown key now and then, the order
    /// sometimes shuffled, whitespace anywhere; sometimes a byte changed, dropped or added after.
    fn payload(r: &mut Rng, event: Vec<(&str, String)>) -> String {
        let mut fields: Vec<String> = Vec::new();
        for (k, v) in event {
            for _ in 0..[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 2][r.below(20)] {
                let key = if r.below(80) == 0 { format!("{}\\u0073", &k[..k.len() - 1]) } else { k.to_owned() };
                let v = if r.below(25) == 0 { value(r) } else { v.clone() };
                fields.push(format!("\"{key}\"{}:{}{v}", ws(r), ws(r)));
            }
        }
        if r.below(20) == 0 {
            fields.push(format!("\"extra\":{}", value(r)));
        }
        if r.below(4) == 0 {
            for i in (1..fields.len()).rev() {
                fields.swap(i, r.below(i + 1));
            }
        }
        let sep = format!("{},{}", ws(r), ws(r));
        let mut text = format!("{}{{{}{}{}}}{}", ws(r), ws(r), fields.join(&sep), ws(r), ws(r));
        if r.below(8) == 0 {
            let at = r.below(text.len());
            if text.is_char_boundary(at) && text.is_char_boundary(at + 1) {
                let with = r.pick(&["", "\"", ",", "}", "{", ":", "\\", "-", ".", "0", "e", "n", " ", "x"]);
                text.replace_range(at..at + 1, with);
            }
        }
        text
    }

    /// The contract's fast path gives exactly serde_json's answer wherever it answers, on
    /// payloads made from `event`'s; returns how many it answered and how many it left.
    fn same_as_serde<C: crate::wire::Contract>(
        event: impl Fn(&mut Rng) -> Vec<(&'static str, String)>,
    ) -> (usize, usize)
    where
        for<'a> C::Wire<'a>: std::fmt::Debug,
    {
        let mut r = Rng(0x2545_f491_4f6c_dd1d);
        let (mut fast, mut slow) = (0, 0);
        for case in 0..60_000 {
            let fields = event(&mut r);
            let text = if case % 4 == 0 {
                let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", body.join(","))
            } else {
                payload(&mut r, fields)
            };
            if case % 400 == 0 {
                // every cut of a payload is refused by one path or read alike by both
                for end in (0..text.len()).filter(|e| text.is_char_boundary(*e)) {
                    let cut = &text[..end];
                    if let Some(w) = C::scan(cut) {
                        let by_serde = serde_json::from_str::<C::Wire<'_>>(cut).expect("serde reads the cut too");
                        assert_eq!(format!("{w:?}"), format!("{by_serde:?}"), "{cut}");
                    }
                }
            }
            match C::scan(&text) {
                Some(w) => {
                    fast += 1;
                    let by_serde = serde_json::from_str::<C::Wire<'_>>(&text);
                    assert!(by_serde.is_ok(), "case {case}: serde_json refuses what the fast path read: {text}");
                    assert_eq!(format!("{w:?}"), format!("{:?}", by_serde.unwrap()), "case {case}: {text}");
                }
                None => slow += 1,
            }
        }
        (fast, slow)
    }

    #[test]
    fn the_traffic_fast_path_reads_what_serde_json_reads() {
        let event = |r: &mut Rng| {
            vec![
                ("event_id", format!("\"ev-{:09}\"", r.below(1 << 30))),
                ("ts", format!("{}", 1_772_409_600_000u64 + r.below(1 << 30) as u64)),
                ("schema_version", "1".into()),
                ("sensor_id", format!("\"loop-{:05}\"", r.below(99_999))),
                ("segment_id", format!("\"seg-{:04}\"", r.below(9_999))),
                ("lane", format!("{}", 1 + r.below(4))),
                ("interval_s", "30".into()),
                ("flow", format!("{}", r.below(40))),
                ("occupancy", format!("{}", r.below(1000) as f64 / 1000.0)),
                (
                    "speed_kmh",
                    if r.below(20) == 0 { "null".into() } else { format!("{}", r.below(1300) as f64 / 10.0) },
                ),
            ]
        };
        let (fast, slow) = same_as_serde::<crate::wire::Traffic>(event);
        // both paths were exercised
        assert!(fast > 20_000 && slow > 15_000, "fast {fast}, slow {slow}");
    }

    #[test]
    fn the_camera_fast_path_reads_what_serde_json_reads() {
        let event = |r: &mut Rng| {
            let plate_read = r.below(2) == 0;
            let mut fields = vec![
                ("event_id", format!("\"cam-{}\"", r.below(1 << 20))),
                ("ts", format!("{}", 1_772_409_600_000u64 + r.below(1 << 30) as u64)),
                ("schema_version", "1".into()),
                ("camera_id", format!("\"cam-{:03}\"", r.below(200))),
                ("zone_id", format!("\"zone-{}\"", r.below(50))),
                ("kind", r.pick(&["\"plate_read\"", "\"line_crossing\"", "\"stalled_vehicle\""]).into()),
                ("object_class", r.pick(&["\"car\"", "\"truck\"", "\"bus\""]).into()),
                ("count", format!("{}", r.below(30))),
                ("track_id", if plate_read { format!("\"trk-{}\"", r.below(1000)) } else { "null".into() }),
                ("plate", if plate_read { format!("\"AB-{:04}\"", r.below(9999)) } else { "null".into() }),
                ("confidence", format!("{}", 0.7 + 0.29 * r.below(1 << 20) as f64 / (1 << 20) as f64)),
                (
                    "thumbnail",
                    if r.below(4) == 0 { format!("\"{}\"", "QUJD".repeat(r.below(300))) } else { "null".into() },
                ),
            ];
            if r.below(3) == 0 {
                // `plate` and `track_id` may be left out
                fields.retain(|(k, v)| !(v == "null" && (*k == "plate" || *k == "track_id")));
            }
            fields
        };
        let (fast, slow) = same_as_serde::<crate::wire::Camera>(event);
        assert!(fast > 20_000 && slow > 15_000, "fast {fast}, slow {slow}");
    }

    #[test]
    fn the_environment_fast_path_reads_what_serde_json_reads() {
        let event = |r: &mut Rng| {
            vec![
                ("event_id", format!("\"env-{}\"", r.below(1 << 20))),
                ("ts", format!("\"2026-03-02T08:{:02}:00Z\"", r.below(60))),
                ("schema_version", "1".into()),
                ("station_id", format!("\"st-{}\"", r.below(40))),
                ("pm25", format!("{}", r.below(2000) as f64 / 10.0)),
                ("no2", number(r)),
                ("temp_c", format!("{}", (r.below(600) as f64 - 300.0) / 10.0)),
                ("humidity", "null".into()),
            ]
        };
        let (fast, slow) = same_as_serde::<crate::wire::Environment>(event);
        assert!(fast > 20_000 && slow > 15_000, "fast {fast}, slow {slow}");
    }
}
