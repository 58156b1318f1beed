//! File names: parsing a position or epoch name, and removing the files a replay writes again
//! (after a partition's committed offset, or after a state epoch).

use std::fs::File;

use std::path::Path;

/// Parses `{origin}-p{partition}-o{first}-{last}.parquet` (or the temporary
/// `.{origin}-p{partition}-o{first}.parquet.tmp`) into `(origin, partition, first)`.
pub(crate) fn parse_position_name(name: &str) -> Option<(&str, i32, i64)> {
    let stem = name
        .strip_suffix(".parquet")
        .or_else(|| name.strip_prefix('.').and_then(|n| n.strip_suffix(".parquet.tmp")))?;
    let (head, rest) = stem.rsplit_once("-o").map(|(h, r)| (h, r.split('-').next().unwrap_or(r)))?;
    let (origin, partition) = head.rsplit_once("-p")?;
    Some((origin, partition.parse().ok()?, rest.parse().ok()?))
}

/// Parses `part-{lineage}-e{epoch}-….parquet` (or its hidden temporary name) into
/// `(lineage, epoch)`.
pub(crate) fn parse_epoch_name(name: &str) -> Option<(&str, u64)> {
    let stem = name
        .strip_suffix(".parquet")
        .or_else(|| name.strip_prefix('.').and_then(|n| n.strip_suffix(".parquet.tmp")))?;
    let (lineage, rest) = stem.strip_prefix("part-")?.split_once("-e")?;
    let epoch = rest.get(..12)?;
    (rest.as_bytes().get(12) == Some(&b'-') && lineage.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(())
        .and_then(|()| Some((lineage, epoch.parse().ok()?)))
}

/// Removes every file under `root` whose name `remove` picks, and fsyncs each directory it
/// removed something from. Errors are collected: every file is visited.
pub(super) fn remove_files_where(root: &Path, mut remove: impl FnMut(&str) -> bool) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut first_error: Option<std::io::Error> = None;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                first_error.get_or_insert(std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())));
                continue;
            }
        };
        let mut removed_here = false;
        for e in rd {
            let e = match e {
                Ok(e) => e,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
                continue;
            }
            if !remove(&e.file_name().to_string_lossy()) {
                continue;
            }
            // keep going after a failure: remove everything we can, then report
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    removed += 1;
                    removed_here = true;
                }
                Err(e) => {
                    first_error.get_or_insert(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())));
                }
            }
        }
        // make the removals durable before the replay writes their rows again
        if removed_here && let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// Deletes, under a sink's `root`, the files of state lineage `lineage` written for epochs after
/// `epoch` (their rows come again when the stages replay from the state of `epoch`). Returns
/// how many files were removed.
pub fn remove_after_epoch(root: &Path, lineage: &str, epoch: u64) -> std::io::Result<usize> {
    remove_files_where(root, |name| parse_epoch_name(name).is_some_and(|(l, e)| l == lineage && e > epoch))
}

/// Deletes, under a sink's `root`, every file of `origin`'s `partition` whose first offset is at
/// or beyond `committed` (and every temporary file of it): rows the source will deliver again.
/// Returns how many files were removed.
pub fn remove_uncommitted(root: &Path, origin: &str, partition: i32, committed: i64) -> std::io::Result<usize> {
    remove_files_where(root, |name| {
        parse_position_name(name).is_some_and(|(o, p, first)| {
            o == origin && p == partition && (name.ends_with(".tmp") || first >= committed)
        })
    })
}
