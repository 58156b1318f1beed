//! Parsing YAML text into a [`RawPipeline`], with errors that name file, line, column and key path.

use std::fmt;
use std::path::Path;

use citystream_operators::did_you_mean;

use super::RawPipeline;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (as given).
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: u32,
    /// 1-based column, 0 when unknown.
    pub column: u32,
    /// Key path, e.g. `stages.traffic.kind`; empty at the top level.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when known.
    pub help: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.help {
            write!(f, "\n  help: {h}")?;
        }
        Ok(())
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} error{} in the configuration:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The candidates serde lists in "expected one of `a`, `b`" messages.
fn expected_names(message: &str) -> Vec<&str> {
    message.split_once("expected one of ").map_or_else(Vec::new, |(_, list)| {
        list.split(", ").map(|s| s.trim_matches(|c: char| c == '`' || c.is_whitespace())).collect()
    })
}

/// The name serde reports as unknown in "unknown field `x`" / "unknown variant `x`".
fn unknown_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `").or_else(|| message.strip_prefix("unknown variant `"))?;
    rest.split('`').next()
}

fn help_for(message: &str) -> Option<String> {
    let name = unknown_name(message)?;
    let candidates = expected_names(message);
    did_you_mean(name, candidates.iter().copied()).map(|s| format!("did you mean `{s}`?"))
}

/// The message of a serde-saphyr error without its location and snippet decorations.
fn plain_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    // serde-saphyr appends " at line L, column C" to messages: the location is reported separately.
    let text = match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    };
    let text = text.trim();
    // serde-saphyr names Rust types; say what the user should write instead
    match text {
        "invalid u64" | "invalid u32" | "invalid usize" | "invalid u8" | "invalid u16" => {
            "expected a non-negative integer".to_owned()
        }
        "invalid i64" | "invalid i32" | "invalid i16" | "invalid i8" => "expected an integer".to_owned(),
        "invalid f64" | "invalid f32" => "expected a number".to_owned(),
        "invalid bool" => "expected `true` or `false`".to_owned(),
        _ => text.to_owned(),
    }
}

/// Parses `text` (named `file` in errors) into a raw pipeline.
pub fn load_str(text: &str, file: &str) -> Result<RawPipeline, ConfigErrors> {
    parse_str(text, file)
}

/// Parses `text` (named `file` in errors) into any config type, with the same errors.
pub fn parse_str<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T, ConfigErrors> {
    let mut path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line() as u32, l.column() as u32));
        let message = plain_message(&e);
        let path = if path == "." { String::new() } else { path };
        ConfigErrors(vec![ConfigError { file: file.to_owned(), line, column, path, help: help_for(&message), message }])
    })
}

/// Reads and parses a config file.
pub fn load_file(path: &Path) -> Result<RawPipeline, ConfigErrors> {
    parse_file(path)
}

/// Reads and parses a file of any config type.
pub fn parse_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
            help: None,
        }])
    })?;
    parse_str(&text, &file)
}
