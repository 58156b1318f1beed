//! `citystream report energy`: the energy account of a lake, as text and an SVG chart.

use std::path::Path;

use anyhow::Context as _;

#[cfg(feature = "sql")]
pub(crate) async fn report_energy(data: &Path, svg: Option<&Path>) -> anyhow::Result<()> {
    use arrow::array::{AsArray, Float64Array};
    use arrow::datatypes::Int64Type;
    let q = "SELECT stage, SUM(cpu_s) AS cpu_s, SUM(joules) AS joules, SUM(gco2e) AS gco2e, \
             SUM(events_in)::BIGINT AS events_in, SUM(events_out)::BIGINT AS events_out, MIN(source) AS source, \
             SUM(bytes_in)::BIGINT AS bytes_in, SUM(bytes_out)::BIGINT AS bytes_out \
             FROM energy GROUP BY stage ORDER BY joules DESC";
    let batches = citystream_pipeline::sql::query(data, q).await.context("reading the energy table")?;
    let mut rows = Vec::new();
    for b in &batches {
        let f = |i: usize| b.column(i).as_any().downcast_ref::<Float64Array>().expect("float").clone();
        let (cpu, j, g) = (f(1), f(2), f(3));
        let (ein, eout) = (b.column(4).as_primitive::<Int64Type>(), b.column(5).as_primitive::<Int64Type>());
        // DataFusion may hand back string views
        let text = |i: usize| arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8);
        let (names, sources) = (text(0)?, text(6)?);
        let (bin, bout) = (b.column(7).as_primitive::<Int64Type>(), b.column(8).as_primitive::<Int64Type>());
        for i in 0..b.num_rows() {
            rows.push((
                names.as_string::<i32>().value(i).to_owned(),
                cpu.value(i),
                j.value(i),
                g.value(i),
                ein.value(i),
                eout.value(i),
                sources.as_string::<i32>().value(i).to_owned(),
                (bin.value(i), bout.value(i)),
            ));
        }
    }
    anyhow::ensure!(!rows.is_empty(), "the energy table is empty");
    // the pipeline's events: what the sources handed on (tasks with no input)
    let events: i64 = rows.iter().filter(|r| r.4 == 0).map(|r| r.5).sum::<i64>().max(1);
    println!(
        "{:<28} {:>10} {:>12} {:>12} {:>14} {:>7} {:>9} {:>9}",
        "task", "cpu_s", "joules", "gCO2e", "J per M events", "source", "MiB in", "MiB out"
    );
    let mib = |b: i64| b as f64 / (1u64 << 20) as f64;
    for (stage, cpu, j, g, _, _, source, (bin, bout)) in &rows {
        println!(
            "{stage:<28} {cpu:>10.3} {j:>12.3} {g:>12.5} {:>14.2} {source:>7} {:>9.1} {:>9.1}",
            j / events as f64 * 1e6,
            mib(*bin),
            mib(*bout)
        );
    }
    let (tj, tg, tc): (f64, f64, f64) = rows.iter().fold((0.0, 0.0, 0.0), |a, r| (a.0 + r.2, a.1 + r.3, a.2 + r.1));
    println!(
        "total: {tc:.3} CPU-s, {tj:.3} J, {tg:.5} gCO2e for {events} events: {:.2} J and {:.4} gCO2e per million events",
        tj / events as f64 * 1e6,
        tg / events as f64 * 1e6
    );
    if let Some(path) = svg {
        let max = rows.iter().map(|r| r.2).fold(0.0, f64::max).max(1e-9);
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <text x=\"10\" y=\"18\" font-size=\"14\">Energy per task: {tj:.1} J, {tg:.4} gCO2e for {events} events</text>\n",
            40 + rows.len() * 22
        );
        for (i, (stage, _, j, ..)) in rows.iter().enumerate() {
            let y = 30 + i * 22;
            let w = (j / max * 480.0).max(1.0);
            out += &format!(
                "<text x=\"10\" y=\"{}\">{stage}</text><rect x=\"200\" y=\"{y}\" width=\"{w:.1}\" height=\"16\" fill=\"#2e7d32\"/>\
                 <text x=\"{:.1}\" y=\"{}\">{j:.2} J</text>\n",
                y + 12,
                205.0 + w,
                y + 12
            );
        }
        out += "</svg>\n";
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
        println!("chart: {}", path.display());
    }
    Ok(())
}
