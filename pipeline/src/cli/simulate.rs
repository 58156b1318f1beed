//! `citystream simulate` and `train-dict`: the simulator from the command line, and a zstd
//! dictionary trained on its thumbnails.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

use citystream_pipeline::config::{self, SourceConfig};

use citystream_pipeline::simulator::{Simulation, SimulatorConfig};

/// Thumbnails the simulator's cameras emit, decoded as the pipeline decodes them.
pub(crate) fn simulated_thumbnails(cfg: SimulatorConfig) -> anyhow::Result<Vec<Vec<u8>>> {
    use arrow::array::{Array, AsArray};
    use citystream_operators::{BuildContext, Collector, OperatorConfig};
    let decode: citystream_operators::decode::DecodeConfig =
        serde_saphyr::from_str("kind: camera\nmax_past: null\nmax_future: null\n")?;
    let mut op = decode
        .build(&citystream_schemas::raw::schema(), &BuildContext::default())
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut sim = Simulation::new(cfg, chrono::Utc::now().timestamp_millis());
    let mut msgs = Vec::new();
    let mut raw = citystream_schemas::raw::RawBatchBuilder::with_capacity(4096, 1 << 20);
    let mut out = Collector::new(op.outputs().len());
    let mut offset = 0;
    let mut thumbs = Vec::new();
    let mut more = true;
    while more {
        more = sim.step(&mut msgs);
        for m in msgs.drain(..).filter(|m| m.kind == citystream_schemas::EventKind::Camera) {
            raw.append("sim.camera", 0, offset, m.arrival_ms, &m.payload);
            offset += 1;
        }
        if raw.len() >= 4096 || (!more && !raw.is_empty()) {
            op.process_batch(raw.finish(), &mut out)?;
            for (port, b) in out.drain() {
                if port != 0 {
                    continue;
                }
                let col = b.column_by_name("thumbnail").context("camera rows have a thumbnail column")?;
                let bin = col.as_binary::<i32>();
                thumbs.extend((0..bin.len()).filter(|i| bin.is_valid(*i)).map(|i| bin.value(i).to_vec()));
            }
        }
    }
    Ok(thumbs)
}

pub(crate) fn train_dict(
    config: Option<&Path>,
    seed: Option<u64>,
    duration: citystream_operators::Duration,
    max_bytes: usize,
    level: i32,
    out: &Path,
) -> anyhow::Result<()> {
    let cfg = simulator_config(config, seed, Some(duration), None)?;
    let thumbs = simulated_thumbnails(cfg)?;
    anyhow::ensure!(thumbs.len() >= 100, "only {} thumbnails in {duration}: simulate longer", thumbs.len());
    // train on every 5th thumbnail but one; measure on the rest it never saw
    let (train, test): (Vec<_>, Vec<_>) = thumbs.into_iter().enumerate().partition(|(i, _)| i % 5 != 4);
    let train: Vec<Vec<u8>> = train.into_iter().map(|(_, t)| t).collect();
    let test: Vec<Vec<u8>> = test.into_iter().map(|(_, t)| t).collect();
    let dict = citystream_operators::zstd_column::train_dictionary(&train, max_bytes)?;
    std::fs::write(out, &dict).with_context(|| format!("writing {}", out.display()))?;
    let raw: usize = test.iter().map(Vec::len).sum();
    let mut plain = zstd::bulk::Compressor::new(level)?;
    let mut with_dict = zstd::bulk::Compressor::with_dictionary(level, &dict)?;
    let (mut p, mut d) = (0usize, 0usize);
    for t in &test {
        p += plain.compress(t)?.len();
        d += with_dict.compress(t)?.len();
    }
    println!(
        "dictionary: {} bytes from {} thumbnails -> {}\nheld-out {} thumbnails, {raw} bytes: plain zstd-{level} {p} bytes \
         ({:.2}x), with dictionary {d} bytes ({:.2}x): {:.2}x smaller",
        dict.len(),
        train.len(),
        out.display(),
        test.len(),
        raw as f64 / p as f64,
        raw as f64 / d as f64,
        p as f64 / d as f64
    );
    Ok(())
}

pub(crate) fn simulator_config(
    config: Option<&Path>,
    seed: Option<u64>,
    duration: Option<citystream_operators::Duration>,
    start: Option<&str>,
) -> anyhow::Result<SimulatorConfig> {
    let mut cfg = match config {
        Some(path) => {
            let raw = config::load_file(path)?;
            raw.sources
                .into_values()
                .find_map(|s| match s {
                    SourceConfig::Simulator(s) => Some(*s),
                    #[allow(unreachable_patterns)]
                    _ => None,
                })
                .with_context(|| format!("{} has no simulator source", path.display()))?
        }
        None => SimulatorConfig::default(),
    };
    if let Some(s) = seed {
        cfg.seed = s;
    }
    if let Some(d) = duration {
        cfg.duration = d;
    }
    if let Some(s) = start {
        cfg.start = citystream_pipeline::simulator::StartTime::parse(s).map_err(anyhow::Error::msg)?;
    }
    Ok(cfg)
}

pub(crate) fn simulate(cfg: SimulatorConfig, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files = citystream_schemas::EventKind::ALL.map(|k| {
        let p = out.join(format!("{k}.jsonl"));
        std::fs::File::create(&p).map(std::io::BufWriter::new).with_context(|| format!("creating {}", p.display()))
    });
    for f in &files {
        if let Err(e) = f {
            anyhow::bail!("{e:#}");
        }
    }
    let mut sim = Simulation::new(cfg, chrono::Utc::now().timestamp_millis());
    let mut batch = Vec::new();
    while sim.step(&mut batch) {
        for m in batch.drain(..) {
            let i = citystream_schemas::EventKind::ALL.iter().position(|k| *k == m.kind).expect("kind");
            let f = files[i].as_mut().expect("checked");
            f.write_all(&m.payload)?;
            f.write_all(b"\n")?;
        }
    }
    for f in files.iter_mut() {
        f.as_mut().expect("checked").flush()?;
    }
    sim.write_ground_truth(out)?;
    println!("{}", serde_json::to_string_pretty(&sim.report())?);
    Ok(())
}
