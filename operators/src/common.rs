//! Helpers shared by the keyed, event-time operators: column lookup with helpful plan errors,
//! key encoding with Arrow's row format, and event-time columns.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::error::ArrowError;
use arrow::row::{RowConverter, Rows, SortField};

use crate::{PlanError, did_you_mean};

/// The index of `name` in `schema`, or a plan error at `key` with a suggestion.
pub fn column(schema: &SchemaRef, name: &str, key: &str) -> Result<usize, PlanError> {
    schema.index_of(name).map_err(|_| {
        let e = PlanError::new(key, format!("the input has no column `{name}`"));
        match did_you_mean(name, schema.fields().iter().map(|f| f.name().as_str())) {
            Some(s) => e.with_help(format!("did you mean `{s}`?")),
            None => e.with_help(format!(
                "columns: {}",
                schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
            )),
        }
    })
}

/// The indices of the columns `names` (config key `{key}[i]` each); problems go to `errs`.
pub fn columns(schema: &SchemaRef, names: &[String], key: &str, errs: &mut Vec<PlanError>) -> Vec<usize> {
    names
        .iter()
        .enumerate()
        .filter_map(|(i, n)| column(schema, n, &format!("{key}[{i}]")).map_err(|e| errs.push(e)).ok())
        .collect()
}

/// The input columns a stage hands on unchanged (`keep`), in order: each must exist, appear
/// once, and not be one the stage writes itself (`own`): the output would hold it twice.
pub fn kept_columns(schema: &SchemaRef, names: &[String], own: &[&str], errs: &mut Vec<PlanError>) -> Vec<usize> {
    let idx = columns(schema, names, "keep", errs);
    for (k, name) in names.iter().enumerate() {
        if own.contains(&name.as_str()) || names[..k].contains(name) {
            errs.push(PlanError::new(format!("keep[{k}]"), format!("column `{name}` appears twice in the output")));
        }
    }
    idx
}

/// A hasher for keys that are already uniform hashes (the 128-bit keys of [`KeyHash`]):
/// hash maps of them skip rehashing.
#[derive(Default)]
pub(crate) struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// The hasher builder of maps keyed by [`KeyHash`] values.
pub(crate) type HashedKeys = std::hash::BuildHasherDefault<PassThrough>;

/// A numeric column (integers or floats) usable as a measurement.
pub fn numeric_column(schema: &SchemaRef, name: &str, key: &str) -> Result<usize, PlanError> {
    let i = column(schema, name, key)?;
    if schema.field(i).data_type().is_numeric() {
        Ok(i)
    } else {
        Err(PlanError::new(key, format!("column `{name}` is {}, not a number", schema.field(i).data_type())))
    }
}

/// An event-time column: a millisecond timestamp.
pub fn time_column(schema: &SchemaRef, name: &str, key: &str) -> Result<usize, PlanError> {
    let i = column(schema, name, key)?;
    match schema.field(i).data_type() {
        DataType::Timestamp(TimeUnit::Millisecond, _) => Ok(i),
        other => Err(PlanError::new(key, format!("column `{name}` is {other}, not a millisecond timestamp"))),
    }
}

/// The event times of a batch (nulls read as `i64::MIN`, i.e. always late).
pub fn times(batch: &RecordBatch, column: usize) -> Vec<i64> {
    let a = batch.column(column).as_primitive::<TimestampMillisecondType>();
    if a.null_count() == 0 { a.values().to_vec() } else { a.iter().map(|v| v.unwrap_or(i64::MIN)).collect() }
}

/// Checks that `state`, handed to [`restore`](crate::Operator::restore), has the schema that
/// `operator` writes in its snapshots.
pub fn check_state_schema(
    operator: &'static str,
    state: &RecordBatch,
    expected: &SchemaRef,
) -> Result<(), crate::OperatorError> {
    if state.schema() == *expected {
        Ok(())
    } else {
        Err(crate::OperatorError::State { operator, detail: format!("unexpected state schema {:?}", state.schema()) })
    }
}

/// Wall-clock time, UTC milliseconds (processing time, as opposed to event time).
pub fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A numeric column as `f64` values with its validity (casting once per batch).
pub fn as_f64(col: &ArrayRef) -> Result<(Vec<f64>, Option<arrow::buffer::NullBuffer>), ArrowError> {
    let c = cast(col, &DataType::Float64)?;
    let a = c.as_primitive::<Float64Type>();
    Ok((a.values().to_vec(), a.nulls().cloned()))
}

/// Encodes key columns into Arrow's row format: equal keys give equal bytes.
pub(crate) struct KeyEncoder {
    pub(crate) columns: Vec<usize>,
    pub(crate) converter: RowConverter,
}

impl std::fmt::Debug for KeyEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEncoder").field("columns", &self.columns).finish()
    }
}

impl KeyEncoder {
    /// An encoder over `columns` of `schema`.
    pub(crate) fn new(schema: &SchemaRef, columns: Vec<usize>) -> Result<Self, ArrowError> {
        let fields = columns.iter().map(|&i| SortField::new(schema.field(i).data_type().clone())).collect();
        Ok(Self { columns, converter: RowConverter::new(fields)? })
    }

    /// The encoded keys of every row of `batch`.
    pub(crate) fn encode(&self, batch: &RecordBatch) -> Result<Rows, ArrowError> {
        let cols: Vec<ArrayRef> = self.columns.iter().map(|&i| batch.column(i).clone()).collect();
        self.converter.convert_columns(&cols)
    }
}

/// The key of a state map: a keyed 128-bit hash (SipHash-1-3) of a key's bytes. Collisions
/// are negligible (below 1e-20 for a billion keys held at once), so operators treat equal
/// hashes as equal keys and store 16 bytes per key; and since the hash key is random per
/// operator and never leaves its state files, a producer cannot choose keys that collide —
/// neither to make a distinct event read as a duplicate nor to degrade the hash table. The
/// hash key is part of the operator's snapshot (metadata [`KeyHash::METADATA`]): a restored
/// operator must hash as the one that wrote the state.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyHash {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

impl KeyHash {
    /// The snapshot metadata entry that holds the hash key (32 hex digits).
    pub(crate) const METADATA: &'static str = "hash_key";

    /// A fresh random hash key (from the operating system's generator).
    pub(crate) fn random() -> Self {
        Self { k0: rand::random(), k1: rand::random() }
    }

    /// The 128-bit hash of `bytes`.
    pub(crate) fn hash(&self, bytes: &[u8]) -> u128 {
        siphasher::sip128::SipHasher13::new_with_keys(self.k0, self.k1).hash(bytes).as_u128()
    }

    /// The metadata entry to store with a snapshot.
    pub(crate) fn metadata(&self) -> (String, String) {
        (Self::METADATA.to_owned(), format!("{:016x}{:016x}", self.k0, self.k1))
    }

    /// The hash key a snapshot was written with; `None` for a snapshot written before keys
    /// were hashed under a key (its hashes cannot be compared with any new key's: the operator
    /// starts that state empty, with a warning).
    pub(crate) fn from_snapshot(
        operator: &'static str,
        state: &RecordBatch,
    ) -> Result<Option<Self>, crate::OperatorError> {
        let bad = |detail: &str| crate::OperatorError::State { operator, detail: detail.to_owned() };
        let Some(hex) = state.schema_ref().metadata().get(Self::METADATA) else {
            tracing::warn!(
                operator,
                "operator state written before keyed hashing: its keys cannot be compared and start empty"
            );
            return Ok(None);
        };
        if hex.len() != 32 || !hex.is_ascii() {
            return Err(bad("the snapshot's hash key is not 32 hex digits"));
        }
        let part =
            |s: &str| u64::from_str_radix(s, 16).map_err(|_| bad("the snapshot's hash key is not 32 hex digits"));
        Ok(Some(Self { k0: part(&hex[..16])?, k1: part(&hex[16..])? }))
    }
}
