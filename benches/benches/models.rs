//! Inference through ONNX Runtime (`ort`, the PyPI wheel's library): rows per second and
//! p50/p99 latency of one model run at batch sizes 1, 64, 256 and 1024, for every committed model
//! variant (fp32, int8, small), one intra-op thread, CPU provider unless
//! `CITYSTREAM_BENCH_PROVIDER=cuda` (with a `cuda` build: `deploy/gpu/check.sh`).
//!
//! Run: `cargo bench -p citystream-benches --bench models`
//!
//! Before criterion's rows/s, a fixed loop prints the latency percentiles (criterion reports
//! means and medians, not tails): `latency <model> batch <n>: p50 .. µs, p99 .. µs, .. rows/s`.

use std::path::PathBuf;
use std::time::Instant;

use citystream_models::FEATURES;
use citystream_models::onnx::{LoadOptions, Model, Provider};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn models_dir() -> PathBuf {
    // the run-time variable where set (cargo sets it; deploy/gpu/check.sh sets it for a binary
    // built on another machine), else where this file was compiled
    let dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.join("../models")
}

/// Feature rows from the committed evaluation sample, repeated to `n` rows.
fn rows(n: usize) -> Vec<f32> {
    let text = std::fs::read_to_string(models_dir().join("testdata/eval_sample.csv")).unwrap();
    let sample: Vec<Vec<f32>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').take(FEATURES.len()).map(|v| v.parse::<f32>().unwrap()).collect())
        .collect();
    sample.iter().cycle().take(n).flatten().copied().collect()
}

fn provider() -> Provider {
    match std::env::var("CITYSTREAM_BENCH_PROVIDER").as_deref() {
        Ok("cuda") => Provider::Cuda,
        _ => Provider::Cpu,
    }
}

fn load(name: &str) -> Model {
    load_on(name, provider())
}

fn load_on(name: &str, provider: Provider) -> Model {
    let (output, width) = if name.starts_with("incident") { ("incident_prob", 1) } else { ("speed_kmh", 3) };
    let opts = LoadOptions {
        providers: vec![provider],
        intra_threads: 1,
        input_width: FEATURES.len(),
        outputs: vec![(output.into(), width)],
        library: None,
        // every run on the provider asked for: the bench measures where CUDA pays
        cuda_min_rows: 0,
    };
    Model::load(&models_dir().join(format!("onnx/{name}.onnx")), None, &opts).unwrap()
}

const MODELS: [&str; 5] = ["congestion_fp32", "congestion_int8", "congestion_small", "incident_fp32", "incident_int8"];
const BATCHES: [usize; 4] = [1, 64, 256, 1024];

fn percentiles() {
    // NVML (the energy account's GPU busy time): per device, the share of the last sample
    // period a kernel ran; `None` where there is no NVIDIA driver (deploy/gpu/check.sh reads it)
    let nvml = citystream_pipeline::gpu::Nvml::open();
    println!("nvml: {:?}", nvml.as_ref().map(|n| n.busy_percent()));
    for name in MODELS {
        let mut m = load(name);
        if m.provider != Provider::Cpu {
            // the same rows on the CPU: how far the provider's predictions are from the CPU's
            let mut cpu = load_on(name, Provider::Cpu);
            let x = rows(1024);
            let (a, b) = (m.run(&x, 1024).unwrap(), cpu.run(&x, 1024).unwrap());
            let (mut abs, mut rel) = (0f32, 0f32);
            for (u, v) in a.iter().flatten().zip(b.iter().flatten()) {
                abs = abs.max((u - v).abs());
                rel = rel.max((u - v).abs() / v.abs().max(1e-3));
            }
            println!(
                "parity {name} ({} vs cpu), 1024 rows: max |diff| {abs:.2e}, max relative {rel:.2e}",
                m.provider.name()
            );
        }
        for n in BATCHES {
            let x = rows(n);
            let iters = (200_000 / n).clamp(200, 20_000);
            for _ in 0..iters / 10 {
                m.run(&x, n).unwrap();
            }
            let mut t = Vec::with_capacity(iters);
            let start = Instant::now();
            for _ in 0..iters {
                let t0 = Instant::now();
                m.run(&x, n).unwrap();
                t.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            let total = start.elapsed().as_secs_f64();
            t.sort_by(f64::total_cmp);
            println!(
                "latency {name} ({}) batch {n}: p50 {:.1} µs, p99 {:.1} µs, {:.0} rows/s",
                m.provider.name(),
                t[t.len() / 2],
                t[t.len() * 99 / 100],
                (iters * n) as f64 / total
            );
            if let Some(g) = &nvml {
                println!("nvml busy after {name} batch {n}: {:?}", g.busy_percent());
            }
        }
    }
}

fn models(c: &mut Criterion) {
    percentiles();
    let mut g = c.benchmark_group("infer");
    for name in MODELS {
        let mut m = load(name);
        for n in BATCHES {
            let x = rows(n);
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(format!("{name}/batch{n}"), |b| b.iter(|| m.run(&x, n).unwrap()));
        }
    }
    g.finish();
}

criterion_group!(benches, models);
criterion_main!(benches);
