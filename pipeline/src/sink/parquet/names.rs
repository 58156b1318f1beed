//! File names: parsing a position or epoch name, and removing the files a replay writes again
//! (after a partition's committed offset, or after a state epoch).

use std::fs::File;

use std::collections::BTreeMap;
use std::path::Path;

/// Parses `{origin}-p{partition}-o{first}-{last}.parquet` (or the temporary
/// `.{origin}-p{partition}-o{first}.{run}.parquet.tmp`) into `(origin, partition, first)`.
pub(crate) fn parse_position_name(name: &str) -> Option<(&str, i32, i64)> {
    let stem = name
        .strip_suffix(".parquet")
        .or_else(|| name.strip_prefix('.').and_then(|n| n.strip_suffix(".parquet.tmp")))?;
    let (head, rest) = stem.rsplit_once("-o").map(|(h, r)| (h, r.split(['-', '.']).next().unwrap_or(r)))?;
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

/// The hidden name of a closed file `name` waiting for epoch `epoch` of state `lineage` to be
/// committed, written by state writer `writer`.
pub(super) fn pending_name(name: &str, lineage: &str, writer: &str, epoch: u64) -> String {
    format!(".{name}.{lineage}.{writer}.e{epoch:012}.pending")
}

/// Parses a [`pending_name`] into `(name, lineage, writer, epoch)`.
pub(crate) fn parse_pending_name(name: &str) -> Option<(&str, &str, &str, u64)> {
    let rest = name.strip_prefix('.')?.strip_suffix(".pending")?;
    let (rest, epoch) = rest.rsplit_once(".e")?;
    let (rest, writer) = rest.rsplit_once('.')?;
    let (file, lineage) = rest.rsplit_once('.')?;
    Some((file, lineage, writer, epoch.parse().ok()?))
}

/// Renames pending file `pending` to `dest` (the caller fsyncs the directory). A pending file
/// that is gone while `dest` exists was published by someone else (the next owner's recovery
/// of a process that lost its state, or a process starting on the same disk: `publish_committed`),
/// whenever it happened: fine.
pub(super) fn publish_pending(pending: &Path, dest: &Path) -> Result<(), super::ParquetSinkError> {
    if dest.exists() {
        // published by someone else, before this call or since (`dest` looked at first)
        if !pending.exists() {
            return Ok(());
        }
        return Err(super::ParquetSinkError::Io {
            action: "publish onto",
            path: dest.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a published file has this name"),
        });
    }
    match std::fs::rename(pending, dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dest.exists() => Ok(()),
        r => r.map_err(super::config::io("publish", pending)),
    }
}

/// Calls `visit(dir, name)` for every file under `root`; `visit` says whether it changed the
/// directory, which is then fsynced. Errors are collected: every file is visited.
fn for_each_file(root: &Path, mut visit: impl FnMut(&Path, &str) -> std::io::Result<bool>) -> std::io::Result<()> {
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
        let mut changed = false;
        for e in rd {
            let e = match e {
                Ok(e) => e,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
                continue;
            }
            // keep going after a failure: do everything we can, then report
            match visit(&dir, &e.file_name().to_string_lossy()) {
                Ok(c) => changed |= c,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // make the changes durable before the replay writes their rows again
        if changed && let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Removes `path`, naming it in the error.
fn remove_file(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Removes every file under `root` whose name `remove` picks, and fsyncs each directory it
/// removed something from. Errors are collected: every file is visited.
pub(super) fn remove_files_where(root: &Path, mut remove: impl FnMut(&str) -> bool) -> std::io::Result<usize> {
    let mut removed = 0;
    for_each_file(root, |dir, name| {
        if !remove(name) {
            return Ok(false);
        }
        let path = dir.join(name);
        remove_file(&path)?;
        removed += 1;
        Ok(true)
    })?;
    Ok(removed)
}

/// After a restart with operator state: publishes, under a sink's `root`, the pending files of
/// state `lineage` that the restored manifest covers (`committed`: per state writer, the
/// newest epoch of it that is committed) and removes the other pending files of the lineage
/// (work of a run that crashed, or of a process that lost its state to another, which the
/// replay writes again). Returns `(published, removed)`.
pub fn resolve_pending(root: &Path, lineage: &str, committed: &[(String, u64)]) -> std::io::Result<(usize, usize)> {
    let (mut published, mut removed) = (0, 0);
    for_each_file(root, |dir, name| {
        let Some((file, l, writer, epoch)) = parse_pending_name(name) else { return Ok(false) };
        if l != lineage {
            return Ok(false);
        }
        let path = dir.join(name);
        if committed.iter().any(|(w, upto)| w == writer && epoch <= *upto) {
            publish_pending(&path, &dir.join(file)).map_err(std::io::Error::other)?;
            published += 1;
        } else {
            remove_file(&path)?;
            removed += 1;
        }
        Ok(true)
    })?;
    Ok((published, removed))
}

/// Publishes, under a sink's `root`, every pending file that `committed` (per state lineage,
/// per writer, the newest committed epoch: `task::StateLayout::committed`) says is committed: files
/// a process killed between its manifest and publishing left on its own disk, which the next
/// owner of their state never saw. Nothing is removed: a pending file not yet committed may
/// belong to a process still running on the same disk. Returns how many were published.
pub fn publish_committed(root: &Path, committed: &BTreeMap<String, Vec<(String, u64)>>) -> std::io::Result<usize> {
    let mut published = 0;
    for_each_file(root, |dir, name| {
        let Some((file, lineage, writer, epoch)) = parse_pending_name(name) else { return Ok(false) };
        let Some(writers) = committed.get(lineage) else { return Ok(false) };
        if !writers.iter().any(|(w, upto)| w == writer && epoch <= *upto) {
            return Ok(false);
        }
        publish_pending(&dir.join(name), &dir.join(file)).map_err(std::io::Error::other)?;
        published += 1;
        Ok(true)
    })?;
    Ok(published)
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
