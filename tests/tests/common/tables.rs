//! Whole tables of a lake, row by row, for comparing the output of two runs.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use citystream_pipeline::sql;

/// What to compare.
#[derive(Debug, Clone, Default)]
pub struct Compare<'a> {
    /// Tables left out (e.g. `energy`: wall-clock measurements).
    pub skip_tables: &'a [&'a str],
    /// Columns left out of every table (e.g. `emitted_at`, the wall clock of an alert).
    pub skip_columns: &'a [&'a str],
    /// Rows whose event time (`window_end`, else `ts`, else `window_start`) is after this are
    /// left out (UTC ms): what a stop left open in the last checkpoint depends on when the
    /// input went idle.
    pub until_ms: Option<i64>,
}

/// Every table of `lake` as sorted lines of text, one per row.
pub async fn table_rows(lake: &Path, c: &Compare<'_>) -> BTreeMap<String, Vec<String>> {
    let (ctx, names) = sql::context(lake).await.unwrap();
    let mut out = BTreeMap::new();
    for name in names.iter().filter(|n| !c.skip_tables.contains(&n.as_str())) {
        let df = ctx.table(name.as_str()).await.unwrap();
        let schema = df.schema().clone();
        let time =
            ["window_end", "ts", "window_start"].into_iter().find(|t| schema.has_column_with_unqualified_name(t));
        let cols: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| !c.skip_columns.contains(&n.as_str()))
            .map(|n| format!("\"{n}\""))
            .collect();
        let filter = match (time, c.until_ms) {
            (Some(t), Some(ms)) => format!(" WHERE \"{t}\" <= to_timestamp_millis({ms})"),
            _ => String::new(),
        };
        let q = format!("SELECT {} FROM \"{name}\"{filter}", cols.join(", "));
        let batches = ctx.sql(&q).await.unwrap_or_else(|e| panic!("{q}: {e}")).collect().await.unwrap();
        let opts = FormatOptions::default().with_null("∅");
        let mut rows = Vec::new();
        for b in &batches {
            let fmts: Vec<ArrayFormatter> =
                b.columns().iter().map(|a| ArrayFormatter::try_new(a.as_ref(), &opts).unwrap()).collect();
            for r in 0..b.num_rows() {
                rows.push(fmts.iter().map(|f| f.value(r).to_string()).collect::<Vec<_>>().join(" | "));
            }
        }
        rows.sort_unstable();
        out.insert(name.clone(), rows);
    }
    out
}

/// Asserts that `got` has exactly the tables and rows of `expected`, showing the first rows
/// that differ. A table one side lacks counts as a table without rows: with
/// [`Compare::until_ms`], a table whose rows all lie after the cut is empty on one side and
/// may not exist at all on the other (its first file came later there).
pub fn assert_same_tables(what: &str, got: &BTreeMap<String, Vec<String>>, expected: &BTreeMap<String, Vec<String>>) {
    let none = Vec::new();
    let names: std::collections::BTreeSet<&String> = got.keys().chain(expected.keys()).collect();
    let pairs: Vec<(&String, &Vec<String>, &Vec<String>)> =
        names.into_iter().map(|t| (t, got.get(t).unwrap_or(&none), expected.get(t).unwrap_or(&none))).collect();
    let differ: Vec<String> = pairs
        .iter()
        .filter(|(_, g, rows)| g != rows)
        .map(|(t, g, rows)| format!("{t} ({} vs {})", g.len(), rows.len()))
        .collect();
    if !differ.is_empty() {
        eprintln!("{what}: tables that differ (rows vs expected): {}", differ.join(", "));
    }
    for (table, g, rows) in pairs {
        if g != rows {
            let only_got: Vec<&String> = g.iter().filter(|r| rows.binary_search(r).is_err()).take(5).collect();
            let only_exp: Vec<&String> = rows.iter().filter(|r| g.binary_search(r).is_err()).take(5).collect();
            panic!(
                "{what}: table `{table}` differs ({} rows vs {} expected)\n only in this run: {only_got:#?}\n only in the reference: {only_exp:#?}",
                g.len(),
                rows.len()
            );
        }
    }
}

/// The `event_id`s of `lake`'s traffic table, one per row, sorted.
pub async fn event_ids(lake: &Path) -> Vec<String> {
    let (ctx, _) = sql::context(lake).await.unwrap();
    let batches = ctx.sql("SELECT event_id FROM traffic").await.unwrap().collect().await.unwrap();
    let mut ids: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let a = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
            arrow::array::AsArray::as_string::<i32>(&a)
                .iter()
                .map(|v| v.unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    ids.sort_unstable();
    ids
}
