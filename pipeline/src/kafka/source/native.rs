//! The consumer loop's side of the native fetch ([`crate::kafka::fetch`]): a round of fetches
//! for every assigned partition that is not paused, from its `fetch_at`, each record appended
//! (or held) as one librdkafka handed over, and positions out of the log's range reset as
//! `auto.offset.reset` says.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;

use super::context::lock;
use super::{Loop, Native, Read, Tp};
use crate::kafka::fetch::{Decoders, PartitionData, RecordSet};
use crate::task::PipelineError;

impl Loop {
    /// Fetches once from every partition to read, waiting for responses no later than `until`.
    /// Returns how many partitions were fetched, how many records were read (appended or held),
    /// and whether a request is still in flight (its broker has not answered yet).
    pub(super) fn fetch_round(
        &self,
        native: &RefCell<Native>,
        until: Instant,
        key: &mut Tp,
        wall: &mut i64,
        total: &mut u64,
    ) -> Result<(usize, u64, bool), PipelineError> {
        let wanted: Vec<(Tp, i64)> = lock(&self.shared)
            .parts
            .iter()
            .filter(|(_, p)| !p.paused)
            .map(|(tp, p)| (tp.clone(), p.fetch_at))
            .collect();
        if wanted.is_empty() {
            return Ok((0, 0, false));
        }
        let mut read = 0u64;
        let round = {
            let mut n = native.borrow_mut();
            let Native { fetcher, decoders, skipped } = &mut *n;
            let read_committed = fetcher.limits().read_committed;
            fetcher.round(&self.consumer, &wanted, until, |data, from| {
                let (records, bad) = self.fetched(data, from, read_committed, decoders, key, wall, total)?;
                read += records;
                skipped.inc_by(bad);
                Ok::<_, PipelineError>(())
            })?
        };
        for (tp, asked) in &round.out_of_range {
            self.reset_offset(tp, *asked)?;
        }
        Ok((round.fetched, read, round.waiting))
    }

    /// Appends (or holds) the records of one partition's fetched data from `from` on, and
    /// moves its `fetch_at` past them. Returns the records read and the batches skipped.
    #[allow(clippy::too_many_arguments)]
    fn fetched(
        &self,
        data: &PartitionData<'_>,
        from: i64,
        read_committed: bool,
        decoders: &mut Decoders,
        key: &mut Tp,
        wall: &mut i64,
        total: &mut u64,
    ) -> Result<(u64, u64), PipelineError> {
        let tp = (data.topic.to_owned(), data.partition);
        // the assignment the records are read under (a send below may serve a rebalance)
        let generation = {
            let mut s = lock(&self.shared);
            // fetched (by a request sent ahead) for a position it no longer has: fetched again
            // from `fetch_at`; revoked: its next owner reads it from the commit. A partition
            // paused since the request went out holds what came (one response's worth: it is
            // left out of the requests from now on)
            let generation = s.generation;
            let Some(p) = s.parts.get_mut(&tp).filter(|p| p.fetch_at == from) else { return Ok((0, 0)) };
            // the high watermark, also when reading committed data: a partition whose open
            // transaction ends at the last stable offset is not caught up (the transaction's
            // records, and what follows it, are still to come), as with librdkafka's fetch
            let end = data.high_watermark;
            p.fetched_end = (end >= 0).then_some(end);
            let behind = end.saturating_sub(p.position);
            if end >= 0 {
                s.lag_gauge(&tp).set(behind as f64);
            }
            generation
        };
        let aborted: &[(i64, i64)] = if read_committed { &data.aborted } else { &[] };
        let mut set = RecordSet::new(data.records, from, aborted, decoders);
        let at = Instant::now();
        let mut read = 0u64;
        let mut done = false;
        while !done {
            let mut step = None;
            {
                let mut s = lock(&self.shared);
                while step.is_none() {
                    match set.next() {
                        Ok(Some(r)) => {
                            read += 1;
                            let m = Read {
                                topic: data.topic,
                                partition: data.partition,
                                offset: r.offset,
                                timestamp: r.timestamp,
                                payload: r.value,
                                generation,
                            };
                            step = self.accept(&mut s, &m, key, wall, at, total);
                        }
                        Ok(None) => {
                            done = true;
                            break;
                        }
                        Err(e) => {
                            // a batch header that does not parse: where it ends is unknown, so
                            // reading on would skip or repeat records
                            return Err(self.err(format!(
                                "{}/{} at offset {}: {e}",
                                data.topic,
                                data.partition,
                                set.next_offset()
                            )));
                        }
                    }
                }
            }
            self.step(step, key, total)?;
        }
        for (first, last, why) in &set.skipped {
            tracing::warn!(
                source = self.name,
                topic = data.topic,
                partition = data.partition,
                first,
                last,
                "native fetch: a record batch skipped (it does not decompress, or its records do not parse): {why}"
            );
        }
        let next = set.next_offset();
        let bad = set.skipped.len() as u64;
        // not past what an assignment made since dropped (`accept`): fetched again from its start
        if let Some(p) = lock(&self.shared).parts.get_mut(&tp).filter(|p| p.since <= generation) {
            p.fetch_at = p.fetch_at.max(next);
        }
        self.count();
        Ok((read, bad))
    }

    /// Moves a partition whose position is out of its log's range to where
    /// `auto.offset.reset` says (`earliest`, the source's default, or `latest`; `error` stops
    /// the source), as librdkafka does.
    fn reset_offset(&self, tp: &Tp, asked: i64) -> Result<(), PipelineError> {
        // a request sent ahead asked for the offset a reset has already moved on from
        if lock(&self.shared).parts.get(tp).is_none_or(|p| p.fetch_at != asked) {
            return Ok(());
        }
        let policy = self.cfg.properties.get("auto.offset.reset").map_or("earliest", |v| v.as_str());
        let (low, high) = match self.consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_secs(10)) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(source = self.name, topic = tp.0, partition = tp.1, "reading the log's range: {e}");
                return Ok(());
            }
        };
        let Some(at) = lock(&self.shared).parts.get(tp).map(|p| p.fetch_at) else { return Ok(()) };
        let to = match policy {
            "earliest" | "smallest" | "beginning" => low,
            "latest" | "largest" | "end" => high,
            _ => {
                return Err(self.err(format!(
                    "{}/{}: offset {at} is out of the log's range ({low}..{high}) and auto.offset.reset is {policy:?}",
                    tp.0, tp.1
                )));
            }
        };
        tracing::warn!(
            source = self.name,
            topic = tp.0,
            partition = tp.1,
            from = at,
            to,
            "offset out of the log's range (auto.offset.reset {policy})"
        );
        if let Some(p) = lock(&self.shared).parts.get_mut(tp) {
            p.fetch_at = to;
        }
        Ok(())
    }
}
