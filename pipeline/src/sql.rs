//! DataFusion SQL over the Parquet tables a sink wrote.
//!
//! Every folder directly under the data root is a table. Hive partition folders
//! (`date=…/hour=…`, or `date=…` for a sink's `daily` tables) become the `date` and `hour`
//! columns (text), so queries that filter on them read only the matching files.

use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;

/// Output format of query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Json,
}

/// Errors of the SQL front end.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The data folder cannot be read.
    #[error("cannot read the data folder {path}")]
    Io {
        /// The folder.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// DataFusion rejected or failed the query.
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    /// Formatting the result failed.
    #[error("formatting the result: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

fn has_partition_dir(dir: &Path, prefix: &str) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().any(|e| e.path().is_dir() && e.file_name().to_string_lossy().starts_with(prefix)))
        .unwrap_or(false)
}

/// A session with every table under `data` registered; returns it and the table names.
pub async fn context(data: &Path) -> Result<(SessionContext, Vec<String>), SqlError> {
    register(SessionContext::new(), data, true).await
}

/// [`context`] for clients of other engines (Flight SQL): text and binary columns come out
/// as `Utf8`/`Binary`, not the view types DataFusion reads Parquet into, which some clients
/// (the Flight SQL JDBC driver 18) cannot read.
/// Its queries run in `runtime` (the server's memory pool, shared by every query).
pub async fn context_for_clients(
    data: &Path,
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
) -> Result<(SessionContext, Vec<String>), SqlError> {
    register(SessionContext::new_with_config_rt(datafusion::prelude::SessionConfig::new(), runtime), data, false).await
}

async fn register(ctx: SessionContext, data: &Path, views: bool) -> Result<(SessionContext, Vec<String>), SqlError> {
    let mut names = Vec::new();
    let entries =
        std::fs::read_dir(data).map_err(|source| SqlError::Io { path: data.display().to_string(), source })?;
    let mut dirs: Vec<_> = entries.flatten().filter(|e| e.path().is_dir()).collect();
    dirs.sort_by_key(|e| e.file_name());
    for e in dirs {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let path = e.path();
        let mut options = ListingOptions::new(Arc::new(ParquetFormat::default().with_force_view_types(views)))
            .with_file_extension(".parquet");
        if has_partition_dir(&path, "date=") {
            // daily tables (a Parquet sink's `daily`) have no `hour=` level
            let hourly = crate::sink::parquet::layout_on_disk(&path) == Some(false);
            let mut cols = vec![("date".into(), DataType::Utf8)];
            if hourly {
                cols.push(("hour".into(), DataType::Utf8));
            }
            options = options.with_table_partition_cols(cols);
        }
        let url = format!(
            "{}/",
            path.canonicalize().map_err(|source| SqlError::Io { path: path.display().to_string(), source })?.display()
        );
        match ctx.register_listing_table(&name, &url, options, None, None).await {
            Ok(()) => names.push(name),
            // a folder without Parquet files is not a table
            Err(e) if e.to_string().contains("No files") || e.to_string().contains("no files") => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok((ctx, names))
}

/// Runs `sql` over the tables under `data`.
pub async fn query(data: &Path, sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
    let (ctx, _) = context(data).await?;
    Ok(ctx.sql(sql).await?.collect().await?)
}

/// Runs `sql` and writes the result as one Parquet file at `out`; returns the rows written.
pub async fn query_to_parquet(data: &Path, sql: &str, out: &Path) -> Result<u64, SqlError> {
    let (ctx, _) = context(data).await?;
    let df = ctx.sql(sql).await?;
    let written = df
        .write_parquet(&out.display().to_string(), DataFrameWriteOptions::new().with_single_file_output(true), None)
        .await?;
    Ok(written
        .iter()
        .map(|b| {
            b.column(0).as_any().downcast_ref::<arrow::array::UInt64Array>().map_or(0, |a| a.iter().flatten().sum())
        })
        .sum())
}

/// Renders batches in `format`.
pub fn render(batches: &[RecordBatch], format: Format) -> Result<String, SqlError> {
    match format {
        Format::Table => Ok(arrow::util::pretty::pretty_format_batches(batches)?.to_string()),
        Format::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
            }
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        Format::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            Ok(String::from_utf8_lossy(&w.into_inner()).into_owned())
        }
    }
}

/// Every table under `data` with its columns, as text.
pub async fn describe_tables(data: &Path) -> Result<String, SqlError> {
    let (ctx, names) = context(data).await?;
    let mut out = String::new();
    for name in names {
        let df = ctx.table(&name).await?;
        let rows = df.clone().count().await?;
        out += &format!("{name} ({rows} rows)\n");
        for f in df.schema().fields() {
            out += &format!("  {:<16} {}{}\n", f.name(), f.data_type(), if f.is_nullable() { "" } else { " not null" });
        }
    }
    Ok(out)
}
