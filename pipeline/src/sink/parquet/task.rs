//! The Parquet sink as the runtime runs it (`task::Sink`): each input's rows go to its table,
//! hours are closed as the watermark passes them, and everything is made durable at every
//! checkpoint barrier. With operator state, closed files stay hidden until the state manifest
//! of their epoch exists, and are published when the sink next flushes.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{ParquetSinkConfig, ParquetWriter, remove_after_epoch, resolve_pending};
use crate::task::{
    PipelineError, Sink, SinkContext, StateStore, TableStats, blocking_metered, cpu_metered, sink_error,
};

/// Files of an hour stay open this long after the watermark passes the hour's end, so that
/// events within the out-of-orderness bound still land in the same file.
const HOUR_GRACE_MS: i64 = 10 * 60_000;

/// A running Parquet sink.
pub(crate) struct ParquetSink {
    name: String,
    writer: ParquetWriter,
    /// Table and origin stream of each input.
    inputs: Vec<(String, String)>,
    cpu_ns: citystream_operators::Counter,
    /// With operator state: its newest committed epoch says which closed files to publish.
    state: Option<StateStore>,
}

impl ParquetSink {
    /// The sink `ctx.name` for `cfg` (with operator state, [`discard_after_restored`] has run).
    pub(crate) fn try_new(cfg: &ParquetSinkConfig, ctx: SinkContext<'_>) -> Result<Self, PipelineError> {
        let merged = ctx.tables.keys().filter(|t| ctx.inputs.iter().filter(|n| n == t).count() > 1).cloned();
        let mut writer = ParquetWriter::try_new(ctx.name, cfg, ctx.tables, ctx.metrics)
            .map_err(|e| ctx.error(e))?
            .with_merged_tables(merged.collect::<Vec<_>>());
        if let Some(state) = ctx.state {
            // rows before the first barrier belong to the first epoch this process numbers
            writer = writer.with_epochs(state.lineage(), state.first_epoch()).with_staging(state.writer());
            // rows a stage held (compress) come out after newer rows: their offsets no longer
            // say which checkpoint wrote them, so such tables are named by epoch
            writer = writer.without_positions(ctx.holding.iter().cloned());
        }
        Ok(Self {
            name: ctx.name.to_owned(),
            writer,
            inputs: ctx.inputs.into_iter().zip(ctx.origins.iter().cloned()).collect(),
            cpu_ns: ctx.cpu_ns,
            state: ctx.state.cloned(),
        })
    }
}

/// With operator state restored from `state`, removes the files under `cfg`'s root written
/// after the restored checkpoint (named by a later epoch of its lineage): the replay writes
/// them again. Runs for every Parquet sink before any sink is built, since a sink may read the
/// lake when it starts (the control center restores its book from `alerts`).
pub(crate) fn discard_after_restored(cfg: &ParquetSinkConfig, state: &StateStore) -> Result<(), PipelineError> {
    let root = std::path::PathBuf::from(cfg.path.as_str());
    let err = |action| {
        let path = root.clone();
        move |source| PipelineError::State {
            stage: "runtime".into(),
            source: crate::task::StateError::Io { action, path, source },
        }
    };
    // files the restored manifest commits that their writer had no time to publish go out;
    // any other pending file of this lineage is work the replay does again
    let (published, unpublished) = resolve_pending(&root, state.lineage(), state.committed())
        .map_err(err("publishing the files of the restored checkpoint under"))?;
    if published + unpublished > 0 {
        tracing::info!(root = %root.display(), published, removed = unpublished, epoch = state.restored_epoch(), "resolved pending files");
    }
    let removed = remove_after_epoch(&root, state.lineage(), state.restored_epoch())
        .map_err(err("removing files written after the restored checkpoint under"))?;
    if removed > 0 {
        tracing::info!(root = %root.display(), removed, epoch = state.restored_epoch(), "removed derived files written after the restored checkpoint");
    }
    Ok(())
}

/// Publishes the files under a Parquet sink's `root` that a killed process committed but had
/// no time to publish (per lineage and writer, the committed epochs in `committed`): with a
/// disk of each process's own, the next owner of their state could not.
pub(crate) fn publish_stranded(
    root: &std::path::Path,
    committed: &BTreeMap<String, Vec<(String, u64)>>,
) -> Result<(), PipelineError> {
    let published = super::publish_committed(root, committed).map_err(|source| PipelineError::State {
        stage: "runtime".into(),
        source: crate::task::StateError::Io {
            action: "publishing committed pending files under",
            path: root.to_owned(),
            source,
        },
    })?;
    if published > 0 {
        tracing::info!(root = %root.display(), published, "published stranded files: committed by an earlier process on this disk, not yet published");
    }
    Ok(())
}

impl Sink for ParquetSink {
    fn write<'a>(&'a mut self, input: usize, batch: &'a RecordBatch) -> BoxFuture<'a, Result<(), PipelineError>> {
        let (table, origin) = &self.inputs[input];
        // encoding, on this worker; a file closed here (at its size target, or over the
        // open-file limit) is fsynced on it too: rare, unlike the closes at the hour's end below
        let r = cpu_metered(&self.cpu_ns, || self.writer.write(table, origin, batch));
        std::future::ready(r.map_err(|e| sink_error(&self.name, e))).boxed()
    }

    fn on_watermark(&mut self, watermark: i64) -> Result<(), PipelineError> {
        // most watermarks close nothing: only a file's close (fsync) hands the worker over
        if !self.writer.closes_at(watermark, HOUR_GRACE_MS) {
            return Ok(());
        }
        blocking_metered(&self.cpu_ns, || self.writer.on_watermark(watermark, HOUR_GRACE_MS))
            .map_err(|e| sink_error(&self.name, e))
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), PipelineError>> {
        // at a barrier the epochs before it are committed (or about to be: published at the
        // next flush); at the end the last one is
        let committed = self.state.as_ref().map(StateStore::committed_epoch);
        let r = blocking_metered(&self.cpu_ns, || {
            self.writer.flush()?;
            committed.map_or(Ok(0), |e| self.writer.publish(e)).map(drop)
        });
        std::future::ready(r.map_err(|e| sink_error(&self.name, e))).boxed()
    }

    fn on_checkpoint(&mut self, epoch: u64) {
        self.writer.set_epoch(epoch + 1);
    }

    fn tables(&self) -> BTreeMap<String, TableStats> {
        self.writer.stats()
    }
}
