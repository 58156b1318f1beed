//! Co-partitioning: where a row's state lives when several instances share a topic.
//!
//! Kafka's group coordinator hands each instance some of a topic's partitions. A stage that
//! keeps state per key (a window per segment, a dedup per id) is only right on several
//! instances if every row of a key sits on one partition: a topic is *keyed* by a function of
//! its rows ([`TopicKey`]: a column, or a road graph's group of a column such as the corridor
//! of a segment), producers choose the partition of that key as the Java clients do
//! ([`partition_of`]), each stage says what each part of its state spans ([`StateScope`];
//! stateless stages and `decode`, whose state is per source partition, say nothing), and the
//! planner
//! proves every keyed stage's key determines the topic's key. At run time `decode` checks each
//! row against its partition ([`Routing`]): a row a producer put elsewhere is a dead letter
//! (`misrouted`), never state on the wrong instance.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use arrow::array::{Array, AsArray, RecordBatch};

/// Kafka's `Utils.murmur2`: MurmurHash2, 32-bit, seed `0x9747b28c`.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions` (at least 1), as the Java producer chooses it.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// What a stage's state spans, for scale-out (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateScope {
    /// State per value of these columns: every row of one value must arrive on one partition.
    Keys(Vec<String>),
    /// State per value of `key` that also reads its neighbours' rows (the road graph's
    /// upstream and downstream segments): a value and its neighbours must share a partition.
    Neighbours {
        /// The key column.
        key: String,
        /// Every (value, neighbour) pair the stage reads across.
        pairs: Vec<(String, String)>,
    },
    /// State over every key of the stream (a city-wide limit): an instance that reads some
    /// partitions applies it to those only. The reason says which part.
    City(String),
}

/// Every input column when output `port` of `planned` has the input's schema (the default
/// of [`OperatorConfig::passes_through`](crate::OperatorConfig::passes_through)), else none.
pub fn unchanged_columns(
    planned: Result<Vec<crate::OutputSpec>, Vec<crate::PlanError>>,
    input: &arrow::datatypes::SchemaRef,
    port: usize,
) -> Vec<String> {
    match planned {
        Ok(outs) if outs.get(port).is_some_and(|o| o.schema.fields() == input.fields()) => {
            input.fields().iter().map(|f| f.name().clone()).collect()
        }
        _ => Vec::new(),
    }
}

/// How a topic is keyed: the message key of a row is a function of the row.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicKey {
    /// The column whose value keys the row.
    pub column: String,
    /// When set: the row's key is this group of the column's value (e.g. the corridor of a
    /// segment), from a lookup table; a value missing from it keys by itself.
    pub group: Option<Arc<Grouping>>,
}

/// A lookup from a column's values to their group (the road graph's `corridor` per segment).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grouping {
    /// The lookup table's name for errors (its file).
    pub name: String,
    /// The group column's name (`corridor`).
    pub group: String,
    /// Value → group.
    pub map: HashMap<String, String>,
}

impl Grouping {
    /// Reads a CSV whose header names `column` and `group`: each row maps the first to the
    /// second.
    pub fn read_csv(path: &std::path::Path, column: &str, group: &str) -> Result<Grouping, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split(',').map(str::trim).collect();
        let find = |name: &str| {
            header.iter().position(|h| *h == name).ok_or_else(|| {
                format!("{} has no column `{name}` (its columns: {})", path.display(), header.join(", "))
            })
        };
        let (c, g) = (find(column)?, find(group)?);
        let mut map = HashMap::new();
        for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            match (f.get(c), f.get(g)) {
                (Some(k), Some(v)) => {
                    map.insert((*k).to_owned(), (*v).to_owned());
                }
                _ => return Err(format!("{} line {}: too few fields", path.display(), n + 2)),
            }
        }
        Ok(Grouping { name: path.display().to_string(), group: group.to_owned(), map })
    }
}

impl TopicKey {
    /// The message key of a row whose `column` holds `value`.
    pub fn key_of<'a>(&'a self, value: &'a str) -> &'a str {
        match &self.group {
            Some(g) => g.map.get(value).map_or(value, String::as_str),
            None => value,
        }
    }

    /// Human words for errors: `zone_id`, or `corridor of segment_id (deploy/road_graph.csv)`.
    pub fn describe(&self) -> String {
        match &self.group {
            Some(g) => format!("`{}` of `{}` ({})", g.group, self.column, g.name),
            None => format!("`{}`", self.column),
        }
    }
}

/// YAML of how a topic is keyed (a Kafka source's `keys`): `{column: zone_id}`, or
/// `{column: segment_id, lookup: deploy/road_graph.csv, group: corridor}` (the corridor of the
/// row's segment).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The column whose value (or its group) is the message key.
    pub column: String,
    /// A CSV with a header naming `column` and `group`.
    #[serde(default)]
    pub lookup: Option<crate::EnvString>,
    /// The lookup's column holding the group of each value.
    #[serde(default)]
    pub group: Option<String>,
    /// Columns each of whose values only ever comes with one key (a detector lies on one
    /// segment): stages keyed by them are accepted too. A declaration of fact about the
    /// devices, trusted, not checked row by row.
    #[serde(default)]
    pub determined_by: Vec<String>,
}

impl KeySpec {
    /// The key, with its lookup read.
    pub fn load(&self) -> Result<TopicKey, String> {
        let group = match (&self.lookup, &self.group) {
            (None, None) => None,
            (Some(f), Some(g)) => {
                Some(Arc::new(Grouping::read_csv(std::path::Path::new(f.as_str()), &self.column, g)?))
            }
            _ => {
                return Err(
                    "`lookup` and `group` go together: the file, and its column holding each value's group".into()
                );
            }
        };
        Ok(TopicKey { column: self.column.clone(), group })
    }

    /// The columns that determine the key: its column and `determined_by`.
    pub fn determining(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.column.as_str()).chain(self.determined_by.iter().map(String::as_str))
    }
}

/// A source stream's keying at run time: the key, and the topic's partition count, which the
/// source learns from the broker (0 until then: nothing is checked).
#[derive(Debug, Clone)]
pub struct Routing {
    /// How the topic is keyed.
    pub key: TopicKey,
    partitions: Arc<AtomicI32>,
}

impl Routing {
    /// Routing for a topic keyed by `key`, partition count not known yet.
    pub fn new(key: TopicKey) -> Self {
        Self { key, partitions: Arc::default() }
    }

    /// Records the topic's partition count (the source, from the broker's metadata).
    pub fn set_partitions(&self, n: i32) {
        self.partitions.store(n, Ordering::Relaxed);
    }

    /// The topic's partition count (0: not known yet).
    pub fn partitions(&self) -> i32 {
        self.partitions.load(Ordering::Relaxed)
    }

    /// For each row of `batch` (which has the key column and `src_partition`): `Some(the
    /// partition it belongs to)` when it arrived on another one, else `None`. Empty when the
    /// partition count is not known yet.
    pub fn misrouted(&self, batch: &RecordBatch) -> Vec<Option<i32>> {
        let n = self.partitions();
        let (Some(values), Some(part)) = (
            batch.column_by_name(&self.key.column).and_then(|c| c.as_string_opt::<i32>()),
            batch
                .column_by_name(citystream_schemas::columns::SRC_PARTITION)
                .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int32Type>()),
        ) else {
            return Vec::new();
        };
        if n <= 0 {
            return Vec::new();
        }
        (0..batch.num_rows())
            .map(|i| {
                if values.is_null(i) {
                    return None;
                }
                let want = partition_of(self.key.key_of(values.value(i)).as_bytes(), n);
                (want != part.value(i)).then_some(want)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_the_java_clients() {
        let cases: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            ("abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key.as_bytes()), want, "{key}");
        }
        assert_eq!(partition_of(b"foobar", 3), (-790332482i32 & 0x7fff_ffff) % 3);
    }

    #[test]
    fn a_grouped_key_is_the_group_of_the_value_or_the_value_itself() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("g.csv");
        std::fs::write(&f, "segment_id,corridor,lanes\ns-1,0,3\ns-2,0,2\ns-3,1,2\n").unwrap();
        let g = Grouping::read_csv(&f, "segment_id", "corridor").unwrap();
        let k = TopicKey { column: "segment_id".into(), group: Some(Arc::new(g)) };
        assert_eq!((k.key_of("s-1"), k.key_of("s-3"), k.key_of("elsewhere")), ("0", "1", "elsewhere"));
        let e = Grouping::read_csv(&f, "segment_id", "zone").unwrap_err();
        assert!(e.contains("no column `zone`") && e.contains("segment_id, corridor, lanes"), "{e}");
    }
}
