//! Alert events from a real `alert` rule, a plain HTTP/1.1 client and the lake's string
//! columns: what the control-center tests share.

use std::net::SocketAddr;
use std::sync::Arc;

use arrow::array::{AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use citystream_operators::alert::AlertConfig;
use citystream_operators::{BuildContext, Collector, Metrics, OperatorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn scores_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("segment_id", DataType::Utf8, false),
        Field::new("window_end", DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
        Field::new("incident_prob", DataType::Float64, false),
        Field::new("model", DataType::Utf8, false),
    ]))
}

/// Alert events from a real incident rule fed with scores.
pub fn alert_events(rows: &[(&str, i64, f64)]) -> RecordBatch {
    let cfg: AlertConfig = serde_saphyr::from_str(
        "rule: incident_model\nalert_type: incident\nseverity: critical\nvalue: incident_prob\nraise: 0.9\nclear: 0.5\nevidence: [model]\n",
    )
    .unwrap();
    let mut op = cfg
        .build(&scores_schema(), &BuildContext { stage: "a".into(), metrics: Metrics::new(), ..Default::default() })
        .unwrap();
    let batch = RecordBatch::try_new(
        scores_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1 * 60_000)).with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "incident_fp32"))),
        ],
    )
    .unwrap();
    let mut out = Collector::new(1);
    op.process_batch(batch, &mut out).unwrap();
    let b: Vec<RecordBatch> = out.drain().map(|(_, b)| b).collect();
    arrow::compute::concat_batches(&b[0].schema(), &b).unwrap()
}

/// The named string columns of every Parquet file under `dir`, row by row.
pub fn string_columns(dir: &std::path::Path, names: &[&str]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let file = std::fs::File::open(&p).unwrap();
                for b in parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 64).unwrap() {
                    let b = b.unwrap();
                    let cols: Vec<_> = names.iter().map(|n| b.column_by_name(n).unwrap().as_string::<i32>()).collect();
                    rows.extend((0..b.num_rows()).map(|i| cols.iter().map(|c| c.value(i).to_owned()).collect()));
                }
            }
        }
    }
    rows
}

/// One HTTP/1.1 request to `addr`; returns the whole response as text (status line, headers,
/// body).
pub async fn http_raw(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf).to_string()
}

/// One HTTP/1.1 request to `addr`; returns the status and the body.
pub async fn http_at(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let text = http_raw(addr, method, path, token, body).await;
    let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}
