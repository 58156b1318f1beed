//! Prepared statement handles. They are stateless: a handle is the statement's SQL and, once
//! bound, its parameters (one row, Arrow IPC), so every instance behind one address can run
//! any handle and none holds memory for abandoned statements.

use arrow::array::RecordBatch;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tonic::Status;

/// A prepared statement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Prepared {
    /// The query.
    pub(super) sql: String,
    /// The bound parameters, one row as an Arrow IPC stream (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    params: Option<String>,
}

impl Prepared {
    pub(super) fn new(sql: String) -> Self {
        Self { sql, params: None }
    }

    /// The handle a client holds.
    pub(super) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a prepared statement serializes")
    }

    pub(super) fn decode(handle: &[u8]) -> Result<Self, Status> {
        serde_json::from_slice(handle)
            .map_err(|_| Status::invalid_argument("not a prepared statement handle of this server"))
    }

    /// Binds `row` (the first row of the batch a client sent) as the parameters.
    pub(super) fn bind(&mut self, batch: &RecordBatch) -> Result<(), Status> {
        let mut bytes = Vec::new();
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema())
            .map_err(|e| Status::invalid_argument(format!("parameters: {e}")))?;
        w.write(&batch.slice(0, batch.num_rows().min(1)))
            .and_then(|()| w.finish())
            .map_err(|e| Status::internal(e.to_string()))?;
        drop(w);
        self.params = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
        Ok(())
    }

    /// The bound parameters, if any.
    pub(super) fn params(&self) -> Result<Option<RecordBatch>, Status> {
        let Some(p) = &self.params else { return Ok(None) };
        let bad = |e: String| Status::invalid_argument(format!("bound parameters: {e}"));
        let bytes = base64::engine::general_purpose::STANDARD.decode(p).map_err(|e| bad(e.to_string()))?;
        let mut r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(|e| bad(e.to_string()))?;
        r.next().transpose().map_err(|e| bad(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn a_handle_carries_its_sql_and_parameters() {
        let mut p = Prepared::new("SELECT * FROM t WHERE a = $1 AND b = $2".into());
        assert_eq!(Prepared::decode(&p.encode()).unwrap(), p);
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(vec![7, 8])), Arc::new(StringArray::from(vec!["seg-01", "x"]))],
        )
        .unwrap();
        p.bind(&batch).unwrap();
        let back = Prepared::decode(&p.encode()).unwrap();
        assert_eq!(back.params().unwrap().unwrap(), batch.slice(0, 1));
        assert!(Prepared::decode(b"garbage").is_err());
    }
}
