//! An event-time range for a backfill: lines whose event time (`ts`) lies outside it are
//! passed over. The time is found by a scan for the top-level `"ts"` key, not a JSON parse.

use serde::Deserialize;

/// `from` (inclusive) and `until` (exclusive), RFC 3339 text in YAML.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventTimeRange {
    /// Lines with an earlier event time are passed over (UTC ms).
    pub from: Option<i64>,
    /// Lines with this or a later event time are passed over (UTC ms).
    pub until: Option<i64>,
}

impl EventTimeRange {
    /// Parses RFC 3339 bounds.
    pub fn parse(from: Option<&str>, until: Option<&str>) -> Result<Self, String> {
        let p = |s: Option<&str>| {
            s.map(|s| {
                chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| t.timestamp_millis())
                    .map_err(|e| format!("`{s}` is not RFC 3339 text (e.g. 2026-03-02T00:00:00Z): {e}"))
            })
            .transpose()
        };
        let r = Self { from: p(from)?, until: p(until)? };
        if let (Some(f), Some(u)) = (r.from, r.until)
            && f >= u
        {
            return Err("`from` must be before `until`".into());
        }
        Ok(r)
    }

    /// Whether a line is read: always without bounds, and when its event time cannot be read
    /// (`decode` rejects it, with its reason, in every backfill that reads the file).
    pub fn admits(&self, line: &[u8]) -> bool {
        if self.from.is_none() && self.until.is_none() {
            return true;
        }
        match event_time(line) {
            Some(ts) => self.from.is_none_or(|f| ts >= f) && self.until.is_none_or(|u| ts < u),
            None => true,
        }
    }
}

impl<'de> Deserialize<'de> for EventTimeRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            #[serde(default)]
            from: Option<String>,
            #[serde(default)]
            until: Option<String>,
        }
        let r = Raw::deserialize(d)?;
        Self::parse(r.from.as_deref(), r.until.as_deref()).map_err(serde::de::Error::custom)
    }
}

/// The `ts` of a one-line JSON object (UTC ms, or RFC 3339 text), found by scanning for the
/// key at nesting depth 1 outside strings; `None` when it is absent or unreadable.
pub fn event_time(line: &[u8]) -> Option<i64> {
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth -= 1,
                b'"' if depth == 1 && line[i..].starts_with(b"\"ts\"") => {
                    let rest = &line[i + 4..];
                    let rest = rest.trim_ascii_start().strip_prefix(b":")?.trim_ascii_start();
                    return value_ms(rest);
                }
                b'"' => in_str = true,
                _ => {}
            }
        }
        i += 1;
    }
    None
}

fn value_ms(v: &[u8]) -> Option<i64> {
    if let Some(s) = v.strip_prefix(b"\"") {
        let end = s.iter().position(|c| *c == b'"')?;
        let text = std::str::from_utf8(&s[..end]).ok()?;
        return chrono::DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_millis());
    }
    let end = v.iter().position(|c| !(c.is_ascii_digit() || *c == b'-')).unwrap_or(v.len());
    std::str::from_utf8(&v[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_level_ts_is_found_as_number_or_text() {
        assert_eq!(event_time(br#"{"event_id":"a","ts":1772409600000,"x":1}"#), Some(1772409600000));
        assert_eq!(event_time(br#"{"ts" : "2026-03-02T00:00:00Z"}"#), Some(1772409600000));
        // a `ts` inside a string or a nested object is not the event's
        assert_eq!(event_time(br#"{"note":"\"ts\":5","inner":{"ts":7},"ts":9}"#), Some(9));
        assert_eq!(event_time(br#"{"inner":{"ts":7}}"#), None);
        assert_eq!(event_time(br#"{"ts":"yesterday"}"#), None);
        assert_eq!(event_time(b"not json"), None);
    }

    #[test]
    fn a_range_passes_over_lines_outside_it_and_keeps_unreadable_ones() {
        let r = EventTimeRange::parse(Some("2026-03-02T00:00:00Z"), Some("2026-03-03T00:00:00Z")).unwrap();
        assert!(r.admits(br#"{"ts":"2026-03-02T10:00:00Z"}"#));
        assert!(!r.admits(br#"{"ts":"2026-03-03T00:00:00Z"}"#), "until is exclusive");
        assert!(!r.admits(br#"{"ts":"2026-03-01T23:59:59Z"}"#));
        assert!(r.admits(b"{broken"), "decode gives it its reason");
        assert!(EventTimeRange::default().admits(br#"{"ts":1}"#));
        assert!(EventTimeRange::parse(Some("2026-03-03T00:00:00Z"), Some("2026-03-02T00:00:00Z")).is_err());
        assert!(EventTimeRange::parse(Some("monday"), None).unwrap_err().contains("RFC 3339"));
    }
}
