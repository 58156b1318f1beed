//! `${VAR}` substitution for secrets and machine-specific values.

use std::fmt;

use serde::Deserialize;

/// A string in which `${VAR}` is replaced by the environment variable `VAR` and
/// `${VAR:-default}` falls back to `default` when `VAR` is unset. `$$` is a literal `$`.
/// An unset variable without a default is an error at the place it is written.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvString {
    value: String,
    /// True when a substitution happened: the value may be a secret, so `Debug` hides it.
    substituted: bool,
}

impl EnvString {
    /// A literal value (no substitution).
    pub fn literal(value: impl Into<String>) -> Self {
        Self { value: value.into(), substituted: false }
    }

    /// The expanded value.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// Expands `text` with `lookup`.
    pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        let mut substituted = false;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(stripped) = after.strip_prefix('$') {
                out.push('$');
                rest = stripped;
            } else if let Some(body) = after.strip_prefix('{') {
                let end = body.find('}').ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
                let expr = &body[..end];
                let (name, default) = match expr.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (expr, None),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "`${{{expr}}}` is not a valid variable reference (letters, digits and _ only)"
                    ));
                }
                match (lookup(name), default) {
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => {
                        return Err(format!(
                            "environment variable `{name}` is not set (referenced as `${{{name}}}`; use `${{{name}:-default}}` for a fallback)"
                        ));
                    }
                }
                substituted = true;
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        Ok(Self { value: out, substituted })
    }
}

impl fmt::Debug for EnvString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.substituted {
            f.write_str("EnvString(<from environment>)")
        } else {
            write!(f, "EnvString({:?})", self.value)
        }
    }
}

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        EnvString::expand(&raw, |n| std::env::var(n).ok()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(n: &str) -> Option<String> {
        (n == "PASS").then(|| "s3cret".to_owned())
    }

    #[test]
    fn expands_defaults_and_escapes() {
        assert_eq!(EnvString::expand("u:${PASS}", lookup).unwrap().as_str(), "u:s3cret");
        assert_eq!(EnvString::expand("${NOPE:-fallback}", lookup).unwrap().as_str(), "fallback");
        assert_eq!(EnvString::expand("cost $$5 and $x", lookup).unwrap().as_str(), "cost $5 and $x");
        let e = EnvString::expand("${NOPE}", lookup).unwrap_err();
        assert!(e.starts_with("environment variable `NOPE` is not set"), "{e}");
        assert!(EnvString::expand("${A B}", lookup).is_err());
        assert!(EnvString::expand("${PASS", lookup).is_err());
    }

    #[test]
    fn debug_hides_substituted_values() {
        let s = EnvString::expand("${PASS}", lookup).unwrap();
        assert_eq!(format!("{s:?}"), "EnvString(<from environment>)");
    }
}
