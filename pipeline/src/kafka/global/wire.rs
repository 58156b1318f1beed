//! The messages on the global topic: chunks of an epoch's rows (Arrow IPC) and the epoch's
//! marker, with who wrote them in the headers.

use arrow::array::RecordBatch;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};

/// Rows of one chunk are cut to about this many bytes of Arrow (a Kafka message's default
/// limit is 1 MiB; the producer compresses with zstd).
const CHUNK_BYTES: usize = 512 * 1024;

/// One epoch of a task, encoded: its chunks `(stream, Arrow IPC)` in order, each stream's
/// watermark at the epoch's barrier, and whether the stream was idle in the task then.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Epoch {
    pub(super) epoch: u64,
    pub(super) chunks: Vec<(u16, Vec<u8>)>,
    pub(super) watermarks: Vec<i64>,
    pub(super) idle: Vec<bool>,
}

/// An epoch's marker: how many chunks it has, the names of the streams (empty from a publisher
/// that did not say: by position), each stream's watermark, which streams were idle (none of
/// the task's partitions holds them back: the global task does not wait for them; empty from a
/// publisher that did not say, none idle), and whether the task's input ended there.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Marker {
    pub(super) chunks: u32,
    #[serde(default)]
    pub(super) streams: Vec<String>,
    pub(super) watermarks: Vec<i64>,
    #[serde(default)]
    pub(super) idle: Vec<bool>,
    pub(super) ended: bool,
}

/// A message read from the global topic.
#[derive(Debug)]
pub(super) enum Wire {
    /// `name`: the stream's name, absent from a publisher that did not say (then `stream`, its
    /// position, tells).
    Chunk {
        task: i32,
        epoch: u64,
        index: u32,
        stream: u16,
        name: Option<String>,
        batch: RecordBatch,
    },
    Marker {
        task: i32,
        epoch: u64,
        marker: Marker,
    },
}

/// Appends `batch` of `stream` to `out` as chunks of at most about [`CHUNK_BYTES`].
pub(super) fn encode(stream: u16, batch: &RecordBatch, out: &mut Vec<(u16, Vec<u8>)>) -> Result<(), String> {
    let rows = batch.num_rows();
    if rows == 0 {
        return Ok(());
    }
    let per_row = batch.get_array_memory_size().div_ceil(rows).max(1);
    let step = (CHUNK_BYTES / per_row).clamp(1, rows);
    let mut at = 0;
    while at < rows {
        let n = step.min(rows - at);
        let mut body = Vec::new();
        {
            let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut body, &batch.schema())
                .map_err(|e| format!("encoding rows: {e}"))?;
            w.write(&batch.slice(at, n)).map_err(|e| format!("encoding rows: {e}"))?;
            w.finish().map_err(|e| format!("encoding rows: {e}"))?;
        }
        out.push((stream, body));
        at += n;
    }
    Ok(())
}

/// Decodes a chunk; a malformed one is an error, never a panic of the task.
fn decode(body: &[u8]) -> Result<RecordBatch, String> {
    std::panic::catch_unwind(|| decode_unchecked(body)).unwrap_or_else(|_| Err("decoding rows: malformed chunk".into()))
}

fn decode_unchecked(body: &[u8]) -> Result<RecordBatch, String> {
    let mut r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
        .map_err(|e| format!("decoding rows: {e}"))?;
    match r.next() {
        Some(b) => b.map_err(|e| format!("decoding rows: {e}")),
        None => Err("decoding rows: no batch in the message".into()),
    }
}

/// The headers of a chunk of stream `stream` (its position), named `name`.
pub(super) fn chunk_headers(task: i32, epoch: u64, index: u32, stream: u16, name: &str) -> OwnedHeaders {
    headers(task, epoch, "chunk")
        .insert(Header { key: "index", value: Some(&index.to_string()) })
        .insert(Header { key: "stream", value: Some(&stream.to_string()) })
        .insert(Header { key: "name", value: Some(name) })
}

/// The headers of a marker.
pub(super) fn marker_headers(task: i32, epoch: u64) -> OwnedHeaders {
    headers(task, epoch, "marker")
}

fn headers(task: i32, epoch: u64, kind: &str) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header { key: "kind", value: Some(kind) })
        .insert(Header { key: "task", value: Some(&task.to_string()) })
        .insert(Header { key: "epoch", value: Some(&epoch.to_string()) })
}

/// Reads a message of the global topic; an error says what is wrong with it.
pub(super) fn read(msg: &BorrowedMessage<'_>) -> Result<Wire, String> {
    let h = msg.headers().ok_or("no headers")?;
    let get = |key: &str| -> Result<&str, String> {
        h.iter()
            .find(|x| x.key == key)
            .and_then(|x| x.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .ok_or_else(|| format!("no `{key}` header"))
    };
    let num = |key: &str| -> Result<u64, String> { get(key)?.parse().map_err(|_| format!("`{key}` is not a number")) };
    let task = i32::try_from(num("task")?).map_err(|_| "`task` is out of range".to_owned())?;
    let epoch = num("epoch")?;
    let body = msg.payload().unwrap_or_default();
    match get("kind")? {
        "chunk" => Ok(Wire::Chunk {
            task,
            epoch,
            index: u32::try_from(num("index")?).map_err(|_| "`index` is out of range".to_owned())?,
            stream: u16::try_from(num("stream")?).map_err(|_| "`stream` is out of range".to_owned())?,
            name: get("name").ok().map(str::to_owned),
            batch: decode(body)?,
        }),
        "marker" => Ok(Wire::Marker {
            task,
            epoch,
            marker: serde_json::from_slice(body).map_err(|e| format!("reading the marker: {e}"))?,
        }),
        k => Err(format!("unknown kind `{k}`")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn a_large_batch_is_cut_into_chunks_that_decode_to_its_rows() {
        let n = 200_000;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let ids = StringArray::from_iter_values((0..n).map(|i| format!("segment-{i:08}")));
        let b = RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(Int64Array::from_iter_values(0..n as i64))])
            .unwrap();
        let mut out = Vec::new();
        encode(3, &b, &mut out).unwrap();
        assert!(out.len() > 1, "{} chunks", out.len());
        assert!(out.iter().all(|(s, body)| *s == 3 && body.len() <= 2 * CHUNK_BYTES));
        let back: Vec<RecordBatch> = out.iter().map(|(_, body)| decode(body).unwrap()).collect();
        let back = arrow::compute::concat_batches(&b.schema(), &back).unwrap();
        assert_eq!(back, b);
        // what is not a chunk is an error, not a panic
        for junk in [&b""[..], b"\xff\xff\xff\xff\x10\x00\x00\x00garbage", &out[0].1[..out[0].1.len() / 2]] {
            assert!(decode(junk).is_err());
        }
    }
}
