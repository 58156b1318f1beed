//! Which files a path names: the file itself, every file under a directory, or a glob's
//! matches — always in path order.

use std::path::{Path, PathBuf};

/// Why a path could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The glob is not valid.
    #[error("`{pattern}` is not a valid glob: {source}")]
    Pattern {
        /// The glob.
        pattern: String,
        /// What is wrong with it.
        source: glob::PatternError,
    },
    /// A file or directory could not be read.
    #[error("cannot list {}: {source}", path.display())]
    Io {
        /// What was listed.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The files `pattern` names, sorted by path. A pattern without glob characters that names
/// nothing is an error (a typo would otherwise read nothing); a glob may match nothing. Files a
/// directory or a glob holds in no known format (`_SUCCESS`, `README`, `.csv`) are left out; a
/// file named by itself is kept (and refused when read, with its name).
pub fn list(pattern: &str) -> Result<Vec<PathBuf>, ListError> {
    let mut out = Vec::new();
    if pattern.contains(['*', '?', '[']) {
        // like a shell: `*` does not match a leading dot
        let opts = glob::MatchOptions { require_literal_leading_dot: true, ..Default::default() };
        let paths = glob::glob_with(pattern, opts)
            .map_err(|source| ListError::Pattern { pattern: pattern.to_owned(), source })?;
        for p in paths {
            let p = p.map_err(|e| ListError::Io { path: e.path().to_owned(), source: e.into() })?;
            add(&p, &mut out)?;
        }
    } else {
        add(Path::new(pattern), &mut out)?;
    }
    let named = Path::new(pattern);
    out.retain(|p| p == named || super::Format::of(p).is_some());
    out.sort();
    out.dedup();
    Ok(out)
}

/// Adds `path` (a file) or every file under it (a directory), skipping hidden names (files
/// still being written are usually hidden or temporary).
fn add(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), ListError> {
    let io = |source| ListError::Io { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_file() {
        out.push(path.to_owned());
    } else if meta.is_dir() {
        for e in std::fs::read_dir(path).map_err(io)? {
            let e = e.map_err(io)?;
            let hidden = e.file_name().to_string_lossy().starts_with('.');
            if !hidden {
                add(&e.path(), out)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_and_globs_list_files_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("2026/12")).unwrap();
        for f in [
            "2026/12/02.jsonl",
            "2026/12/01.jsonl.zst",
            "2026/11.jsonl",
            "2026/.partial.jsonl",
            "2026/_SUCCESS",
            "notes.txt",
        ] {
            std::fs::write(d.join(f), b"{}\n").unwrap();
        }
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter().map(|p| p.strip_prefix(d).unwrap().display().to_string()).collect()
        };
        assert_eq!(
            names(list(&d.join("2026").display().to_string()).unwrap()),
            ["2026/11.jsonl", "2026/12/01.jsonl.zst", "2026/12/02.jsonl"]
        );
        assert_eq!(
            names(list(&format!("{}/2026/**/*.jsonl*", d.display())).unwrap()),
            ["2026/11.jsonl", "2026/12/01.jsonl.zst", "2026/12/02.jsonl"]
        );
        assert_eq!(names(list(&format!("{}/*.txt", d.display())).unwrap()), Vec::<String>::new());
        assert_eq!(names(list(&d.join("notes.txt").display().to_string()).unwrap()), ["notes.txt"]);
        let err = list(&d.join("missing.jsonl").display().to_string()).unwrap_err();
        assert!(err.to_string().contains("missing.jsonl"), "{err}");
        assert!(matches!(list("[").unwrap_err(), ListError::Pattern { .. }));
    }
}
