//! Reading one file as lines of JSON, whatever its format.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

/// A file's format, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON event per line.
    JsonLines,
    /// JSON lines, gzip-compressed (`.gz`).
    Gzip,
    /// JSON lines, zstd-compressed (`.zst`).
    Zstd,
    /// Parquet: each row becomes one JSON object.
    Parquet,
}

impl Format {
    /// The format of `path`, from its extension; `None` for a name no format claims.
    pub fn of(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        let (inner, format) = if let Some(n) = name.strip_suffix(".gz") {
            (n, Format::Gzip)
        } else if let Some(n) = name.strip_suffix(".zst") {
            (n, Format::Zstd)
        } else if name.ends_with(".parquet") {
            return Some(Format::Parquet);
        } else {
            (name.as_str(), Format::JsonLines)
        };
        [".jsonl", ".json", ".ndjson"].iter().any(|e| inner.ends_with(e)).then_some(format)
    }
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No format claims the file's name.
    #[error("{}: unknown format (expected .jsonl, .json or .ndjson, optionally .gz or .zst, or .parquet)", path.display())]
    Format {
        /// The file.
        path: PathBuf,
    },
    /// Opening or decompressing failed.
    #[error("{} (after line {line}): {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Lines read from it before the error.
        line: u64,
        /// The error.
        source: std::io::Error,
    },
    /// The Parquet file could not be decoded.
    #[error("{} (after row {line}): {source}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// Rows read from it before the error.
        line: u64,
        /// The error.
        source: parquet::errors::ParquetError,
    },
    /// A Parquet row could not be written as JSON.
    #[error("{} (after row {line}): {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Rows read from it before the error.
        line: u64,
        /// The error.
        source: arrow::error::ArrowError,
    },
}

enum Inner {
    Text(Box<dyn BufRead + Send>),
    Parquet {
        reader: ParquetRecordBatchReader,
        /// The current batch as JSON lines, and how far it is read.
        json: Vec<u8>,
        at: usize,
    },
}

/// The lines of one file, in order.
pub struct LineReader {
    path: PathBuf,
    inner: Inner,
    /// Lines returned so far.
    line: u64,
    max_line: usize,
}

impl LineReader {
    /// Opens `path`; lines longer than `max_line` bytes are cut to it.
    pub fn open(path: &Path, max_line: usize) -> Result<Self, ReadError> {
        let format = Format::of(path).ok_or_else(|| ReadError::Format { path: path.to_owned() })?;
        let io = |source| ReadError::Io { path: path.to_owned(), line: 0, source };
        let file = File::open(path).map_err(io)?;
        let inner = match format {
            Format::JsonLines => Inner::Text(Box::new(BufReader::with_capacity(1 << 16, file))),
            Format::Gzip => Inner::Text(Box::new(BufReader::with_capacity(
                1 << 16,
                flate2::read::MultiGzDecoder::new(BufReader::new(file)),
            ))),
            Format::Zstd => Inner::Text(Box::new(BufReader::with_capacity(
                1 << 16,
                zstd::stream::read::Decoder::new(file).map_err(io)?,
            ))),
            Format::Parquet => {
                let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                    .and_then(|b| b.with_batch_size(4096).build())
                    .map_err(|source| ReadError::Parquet { path: path.to_owned(), line: 0, source })?;
                Inner::Parquet { reader, json: Vec::new(), at: 0 }
            }
        };
        Ok(Self { path: path.to_owned(), inner, line: 0, max_line })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next line into `buf` (without its line end); false at the end of the file.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> Result<bool, ReadError> {
        buf.clear();
        let more = match &mut self.inner {
            Inner::Text(r) => read_line_capped(r, buf, self.max_line).map_err(|source| ReadError::Io {
                path: self.path.clone(),
                line: self.line,
                source,
            })?,
            Inner::Parquet { reader, json, at } => {
                while *at >= json.len() {
                    let Some(batch) = reader.next() else { return Ok(false) };
                    let batch = batch.map_err(|e| ReadError::Parquet {
                        path: self.path.clone(),
                        line: self.line,
                        source: parquet::errors::ParquetError::ArrowError(e.to_string()),
                    })?;
                    json.clear();
                    *at = 0;
                    write_json_lines(&batch, json).map_err(|source| ReadError::Json {
                        path: self.path.clone(),
                        line: self.line,
                        source,
                    })?;
                }
                let end = memchr::memchr(b'\n', &json[*at..]).map_or(json.len(), |i| *at + i);
                buf.extend_from_slice(&json[*at..end.min(at.saturating_add(self.max_line))]);
                *at = end + 1;
                true
            }
        };
        if more {
            self.line += 1;
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        Ok(more)
    }
}

/// Appends `batch` as JSON lines (one object per row, nulls left out).
fn write_json_lines(batch: &RecordBatch, out: &mut Vec<u8>) -> Result<(), arrow::error::ArrowError> {
    let mut w = arrow::json::LineDelimitedWriter::new(out);
    w.write(batch)?;
    w.finish()
}

/// Reads up to the next `\n` into `buf`, keeping at most `max` bytes of the line (the rest is
/// skipped, never buffered); false at the end of the input.
fn read_line_capped(r: &mut dyn BufRead, buf: &mut Vec<u8>, max: usize) -> std::io::Result<bool> {
    let mut any = false;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(any);
        }
        any = true;
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::Arc;

    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// Reads a whole (small) file's lines; for tests and tools.
    fn read_all(path: &Path) -> Result<Vec<Vec<u8>>, ReadError> {
        let mut r = LineReader::open(path, usize::MAX)?;
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while r.next_line(&mut buf)? {
            out.push(buf.clone());
        }
        Ok(out)
    }

    const LINES: &str = "{\"a\":1}\n{\"a\":2}\r\n\n{\"a\":3}";

    #[test]
    fn every_format_gives_the_same_lines() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("x.jsonl");
        std::fs::write(&plain, LINES).unwrap();
        let zst = dir.path().join("x.jsonl.zst");
        std::fs::write(&zst, zstd::encode_all(LINES.as_bytes(), 3).unwrap()).unwrap();
        // two gzip members, as `cat a.gz b.gz` makes
        let gz = dir.path().join("x.ndjson.gz");
        let mut bytes = Vec::new();
        for part in [&LINES[..9], &LINES[9..]] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(part.as_bytes()).unwrap();
            bytes.extend(e.finish().unwrap());
        }
        std::fs::write(&gz, bytes).unwrap();
        let want: Vec<Vec<u8>> = ["{\"a\":1}", "{\"a\":2}", "", "{\"a\":3}"].map(|s| s.as_bytes().to_vec()).to_vec();
        for p in [&plain, &zst, &gz] {
            assert_eq!(read_all(p).unwrap(), want, "{}", p.display());
        }
        assert!(matches!(LineReader::open(&dir.path().join("x.csv"), 10), Err(ReadError::Format { .. })));
    }

    #[test]
    fn parquet_rows_become_json_objects() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new("segment", DataType::Utf8, false),
            Field::new("speed", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(vec!["s1", "s2"])), Arc::new(Float64Array::from(vec![Some(42.5), None]))],
        )
        .unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(File::create(&p).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let lines: Vec<String> = read_all(&p).unwrap().into_iter().map(|l| String::from_utf8(l).unwrap()).collect();
        assert_eq!(lines, ["{\"segment\":\"s1\",\"speed\":42.5}", "{\"segment\":\"s2\"}"]);
    }

    #[test]
    fn long_lines_are_cut_without_being_held() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        let long = "x".repeat(200_000);
        std::fs::write(&p, format!("{long}\n{{}}\n{long}")).unwrap();
        let mut r = LineReader::open(&p, 100).unwrap();
        let mut buf = Vec::new();
        let mut lens = Vec::new();
        while r.next_line(&mut buf).unwrap() {
            lens.push(buf.len());
        }
        assert_eq!(lens, [100, 2, 100]);
    }

    #[test]
    fn a_corrupt_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.jsonl.zst");
        let mut bytes = zstd::encode_all("{\"a\":1}\n".repeat(10_000).as_bytes(), 3).unwrap();
        let n = bytes.len();
        bytes.truncate(n / 2);
        std::fs::write(&p, bytes).unwrap();
        let err = read_all(&p).unwrap_err();
        assert!(matches!(err, ReadError::Io { .. }), "{err}");
        assert!(err.to_string().contains("bad.jsonl.zst"), "{err}");
    }
}
