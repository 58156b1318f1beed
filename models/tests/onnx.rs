//! The committed models through ONNX Runtime (the PyPI wheel's library, found in `.venv` or
//! at `ORT_DYLIB_PATH`): outputs against Python's onnxruntime on fixed inputs, checksums
//! against the model cards, metrics against the cards on the committed evaluation sample, and
//! the `infer` stage's micro-batching, hot swap, shadow mode and bad-file handling.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, AsArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::buffer::ScalarBuffer;
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef, TimeUnit};
use citystream_models::onnx::{LoadOptions, Model, ModelError, Provider, sha256_hex};
use citystream_models::{FEATURES, InferConfig};
use citystream_operators::{BuildContext, Collector, Metrics, Operator, OperatorConfig};

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn opts(output: &str, width: usize) -> LoadOptions {
    LoadOptions {
        providers: vec![Provider::Cpu],
        intra_threads: 1,
        input_width: FEATURES.len(),
        outputs: vec![(output.to_owned(), width)],
        library: None,
        cuda_min_rows: 0,
    }
}

struct Fixture {
    model: PathBuf,
    output: String,
    inputs: Vec<Vec<f32>>,
    outputs: Vec<Vec<f32>>,
}

fn fixtures() -> Vec<Fixture> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(models_dir().join("testdata")).unwrap() {
        let p = e.unwrap().path();
        if !p.to_string_lossy().ends_with(".io.json") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let rows = |k: &str| -> Vec<Vec<f32>> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
                .collect()
        };
        out.push(Fixture {
            model: models_dir().join(v["model"].as_str().unwrap()),
            output: v["output"].as_str().unwrap().to_owned(),
            inputs: rows("inputs"),
            outputs: rows("outputs"),
        });
    }
    out.sort_by(|a, b| a.model.cmp(&b.model));
    out
}

#[test]
fn every_committed_model_scores_a_row_the_same_alone_and_among_others() {
    // a model whose output for a row depended on the other rows of its run (int8 with dynamic
    // quantization does: it scales by the run's values) would write different tables for a
    // backlog than for a calm run whenever the runs were cut differently
    let fx = fixtures();
    assert!(fx.len() >= 5, "the committed models' fixtures: {}", fx.len());
    for f in fx {
        let width = f.outputs[0].len();
        let mut model = Model::load(&f.model, None, &opts(&f.output, width)).unwrap();
        let flat: Vec<f32> = f.inputs.iter().flatten().copied().collect();
        let together = model.run(&flat, f.inputs.len()).unwrap().remove(0);
        for (i, row) in f.inputs.iter().enumerate() {
            let alone = model.run(row, 1).unwrap().remove(0);
            // a run of one row may take another kernel (float rounding only)
            for (a, t) in alone.iter().zip(&together[i * width..(i + 1) * width]) {
                assert!(
                    (a - t).abs() <= 1e-4 * t.abs().max(1.0),
                    "{} row {i}: {a} alone, {t} among others",
                    f.model.display()
                );
            }
        }
    }
}

#[test]
fn every_committed_model_matches_python_onnxruntime_on_fixed_inputs() {
    let fx = fixtures();
    let committed: Vec<_> = std::fs::read_dir(models_dir().join("onnx"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .collect();
    assert!(!committed.is_empty());
    for m in &committed {
        assert!(fx.iter().any(|f| &f.model == m), "{} has no fixture in models/testdata", m.display());
    }
    for f in fx {
        let width = f.outputs[0].len();
        let mut model = Model::load(&f.model, None, &opts(&f.output, width)).unwrap();
        let flat: Vec<f32> = f.inputs.iter().flatten().copied().collect();
        let got = model.run(&flat, f.inputs.len()).unwrap().remove(0);
        let want: Vec<f32> = f.outputs.iter().flatten().copied().collect();
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{}: largest difference {worst}", f.model.display());
    }
}

/// `sha256` of each committed model as its card states it (lines `| file | sha256 | ...`).
fn card_checksums() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for card in ["congestion.md", "incident.md"] {
        let text = std::fs::read_to_string(models_dir().join(card)).unwrap();
        for line in text.lines() {
            let cells: Vec<&str> = line.split('|').map(|c| c.trim().trim_matches('`')).collect();
            if cells.len() > 3 && cells[1].starts_with("onnx/") && cells[2].len() == 64 {
                out.push((cells[1].to_owned(), cells[2].to_owned()));
            }
        }
    }
    out
}

#[test]
fn each_model_file_has_the_checksum_its_card_states() {
    let cards = card_checksums();
    for e in std::fs::read_dir(models_dir().join("onnx")).unwrap() {
        let p = e.unwrap().path();
        let rel = format!("onnx/{}", p.file_name().unwrap().to_string_lossy());
        let want = cards.iter().find(|(f, _)| *f == rel).unwrap_or_else(|| panic!("no card lists {rel}"));
        assert_eq!(sha256_hex(&std::fs::read(&p).unwrap()), want.1, "{rel}");
    }
}

fn eval_sample() -> (Vec<f32>, Vec<[f64; 3]>, Vec<f64>) {
    let text = std::fs::read_to_string(models_dir().join("testdata/eval_sample.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&header[..FEATURES.len()], &FEATURES[..], "the sample's feature columns are the model's");
    let (mut x, mut y, mut label) = (Vec::new(), Vec::new(), Vec::new());
    for l in lines {
        let v: Vec<f64> = l.split(',').map(|c| c.parse().unwrap()).collect();
        let (features, rest) = v.split_at(FEATURES.len());
        x.extend(features.iter().map(|&a| a as f32));
        y.push([rest[0], rest[1], rest[2]]);
        label.push(rest[3]);
    }
    (x, y, label)
}

#[test]
fn models_reach_the_metrics_their_cards_report_on_the_evaluation_sample() {
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models_dir().join("metrics.json")).unwrap()).unwrap();
    let (x, y, label) = eval_sample();
    let n = y.len();
    for (name, m) in metrics["congestion"]["models"].as_object().unwrap() {
        let mut model =
            Model::load(&models_dir().join(m["file"].as_str().unwrap()), None, &opts("speed_kmh", 3)).unwrap();
        let out = model.run(&x, n).unwrap().remove(0);
        for h in 0..3 {
            let mae = (0..n).map(|i| (f64::from(out[i * 3 + h]) - y[i][h]).abs()).sum::<f64>() / n as f64;
            let card = m["eval_sample_mae"][h].as_f64().unwrap();
            assert!((mae - card).abs() < 1e-3, "{name} horizon {h}: MAE {mae} vs card {card}");
        }
    }
    for (name, m) in metrics["incident"]["models"].as_object().unwrap() {
        let mut model =
            Model::load(&models_dir().join(m["file"].as_str().unwrap()), None, &opts("incident_prob", 1)).unwrap();
        let p = model.run(&x, n).unwrap().remove(0);
        let ll = (0..n)
            .map(|i| {
                let q = f64::from(p[i]).clamp(1e-7, 1.0 - 1e-7);
                -(label[i] * q.ln() + (1.0 - label[i]) * (1.0 - q).ln())
            })
            .sum::<f64>()
            / n as f64;
        let card = m["eval_sample_log_loss"].as_f64().unwrap();
        assert!((ll - card).abs() < 1e-3, "{name}: log loss {ll} vs card {card}");
        let thr = m["threshold"].as_f64().unwrap();
        let alarms = p.iter().filter(|&&q| f64::from(q) >= thr).count() as i64;
        assert!((alarms - m["eval_sample_alarms"].as_i64().unwrap()).abs() <= 1, "{name}: {alarms} alarms");
    }
}

#[test]
fn a_bad_model_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not a model").unwrap();
    let e = Model::load(&junk, None, &opts("speed_kmh", 3)).unwrap_err();
    assert!(matches!(e, ModelError::Session { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("junk.onnx"), "{e}");
    let e = Model::load(&dir.path().join("missing.onnx"), None, &opts("speed_kmh", 3)).unwrap_err();
    assert!(matches!(e, ModelError::Read { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("reading model"), "{e}");
    // a real model with the wrong mapping
    let good = models_dir().join("onnx/congestion_fp32.onnx");
    let e = Model::load(&good, None, &opts("speed", 3)).unwrap_err();
    assert!(matches!(e, ModelError::Contract { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("no output `speed`") && e.contains("speed_kmh"), "{e}");
    let e = Model::load(&good, None, &opts("speed_kmh", 2)).unwrap_err().to_string();
    assert!(e.contains("maps it to 2"), "{e}");
    let e = Model::load(&good, None, &LoadOptions { input_width: 19, ..opts("speed_kmh", 3) }).unwrap_err().to_string();
    assert!(e.contains("[batch, 19]"), "{e}");
}

/// Models of one file share one ONNX Runtime session in a process (the per-partition tasks of
/// one process load each model once per task), and take turns on it: threads running it at
/// once get what one gets alone.
#[test]
fn models_of_one_file_share_one_session_and_take_turns() {
    let small = models_dir().join("onnx/congestion_small.onnx");
    let mut a = Model::load(&small, None, &opts("speed_kmh", 3)).unwrap();
    let b = Model::load(&small, Some("another name"), &opts("speed_kmh", 3)).unwrap();
    assert!(a.shares_session_with(&b), "the same file");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&small, dir.path().join("copy.onnx")).unwrap();
    let copy = Model::load(&dir.path().join("copy.onnx"), None, &opts("speed_kmh", 3)).unwrap();
    assert!(a.shares_session_with(&copy), "the same bytes elsewhere");
    let fp32 = Model::load(&models_dir().join("onnx/congestion_fp32.onnx"), None, &opts("speed_kmh", 3)).unwrap();
    assert!(!a.shares_session_with(&fp32), "other bytes");
    let two = Model::load(&small, None, &LoadOptions { intra_threads: 2, ..opts("speed_kmh", 3) }).unwrap();
    assert!(!a.shares_session_with(&two), "other threads");
    let (inputs, _) = congestion_rows();
    let (rows, flat) = (inputs.len(), inputs.concat());
    let alone = a.run(&flat, rows).unwrap();
    let runs: Vec<_> = [a, b, copy]
        .map(|mut m| {
            let flat = flat.clone();
            std::thread::spawn(move || (0..200).map(|_| m.run(&flat, rows).unwrap()).collect::<Vec<_>>())
        })
        .into_iter()
        .collect();
    for r in runs {
        assert!(r.join().unwrap().iter().all(|out| *out == alone), "a shared run gives what a run alone gives");
    }
}

#[test]
fn cuda_first_falls_back_to_cpu_with_the_reason_logged() {
    // no GPU here (and no `cuda` feature in the default build): the CPU provider serves
    let good = models_dir().join("onnx/congestion_fp32.onnx");
    let m = Model::load(
        &good,
        None,
        &LoadOptions { providers: vec![Provider::Cuda, Provider::Cpu], ..opts("speed_kmh", 3) },
    )
    .unwrap();
    assert_eq!(m.provider, Provider::Cpu);
    let e =
        Model::load(&good, None, &LoadOptions { providers: vec![Provider::Cuda], ..opts("speed_kmh", 3) }).unwrap_err();
    assert!(matches!(e, ModelError::NoProvider { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("no configured execution provider works") && e.contains("cuda"), "{e}");
}

#[test]
fn a_stage_that_falls_back_to_the_cpu_counts_no_cuda_runs() {
    // no GPU here: `providers: [cuda, cpu]` serves on the CPU, whatever `cuda_min_rows` says,
    // and the GPU's busy time (shared by `citystream_infer_cuda_micros_total`) gets no share
    let model = models_dir().join("onnx/congestion_fp32.onnx");
    assert_eq!(infer_config(&model, "").cuda_min_rows, 1024, "the default: a full batch");
    let cfg = infer_config(&model, "providers: [cuda, cpu]\ncuda_min_rows: 0\nreload_poll: 0s\n");
    assert_eq!(cfg.cuda_min_rows, 0);
    let metrics = Metrics::new();
    let mut op = cfg
        .build(&features_schema(), &BuildContext { stage: "c".into(), metrics: metrics.clone(), ..Default::default() })
        .unwrap();
    let (inputs, _) = congestion_rows();
    let mut out = Collector::new(op.outputs().len());
    op.process_batch(features_batch(&inputs[..20], 0), &mut out).unwrap();
    op.on_watermark(1_000, &mut out).unwrap();
    assert_eq!(out.port(0).iter().map(RecordBatch::num_rows).sum::<usize>(), 20);
    let l = [("stage", "c")];
    assert_eq!(metrics.value("citystream_infer_runs_total", &l), Some(1.0));
    assert_eq!(metrics.value("citystream_infer_cuda_runs_total", &l), Some(0.0));
    assert_eq!(metrics.value("citystream_infer_cuda_micros_total", &l), Some(0.0));
    let m = Model::load(
        &model,
        None,
        &LoadOptions { providers: vec![Provider::Cuda, Provider::Cpu], cuda_min_rows: 1024, ..opts("speed_kmh", 3) },
    )
    .unwrap();
    assert_eq!((m.runs_on(1), m.runs_on(4096)), (Provider::Cpu, Provider::Cpu));
}

// ------------------------------------------------------------------ the infer stage

fn features_schema() -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    Arc::new(Schema::new(vec![
        Field::new("segment_id", DataType::Utf8, false),
        Field::new("window_end", DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
        Field::new("features", DataType::FixedSizeList(item, FEATURES.len() as i32), false),
    ]))
}

fn features_batch(rows: &[Vec<f32>], t0: i64) -> RecordBatch {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    RecordBatch::try_new(
        features_schema(),
        vec![
            Arc::new(StringArray::from_iter_values((0..rows.len()).map(|i| format!("seg-{i:03}")))),
            Arc::new(
                // one minute's rows, as the features stage emits them
                TimestampMillisecondArray::from_iter_values((0..rows.len()).map(|_| t0)).with_timezone("UTC"),
            ),
            Arc::new(
                FixedSizeListArray::try_new(
                    item,
                    FEATURES.len() as i32,
                    Arc::new(Float32Array::new(ScalarBuffer::from(values), None)),
                    None,
                )
                .unwrap(),
            ),
        ],
    )
    .unwrap()
}

fn infer_config(model: &Path, extra: &str) -> InferConfig {
    let yaml = format!(
        "model: {}\nfeatures: features\noutputs: {{speed_kmh: [s15, s30, s60]}}\nkeep: [segment_id, window_end]\n{extra}",
        model.display()
    );
    serde_saphyr::from_str(&yaml).unwrap()
}

fn congestion_rows() -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let f = fixtures().into_iter().find(|f| f.model.ends_with("congestion_fp32.onnx")).unwrap();
    (f.inputs, f.outputs)
}

fn col(b: &RecordBatch, name: &str) -> Vec<f32> {
    b.column_by_name(name).unwrap().as_primitive::<Float32Type>().values().to_vec()
}

fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
    b.column_by_name(name).unwrap().as_string::<i32>().iter().map(|s| s.unwrap().to_owned()).collect()
}

#[test]
fn infer_micro_batches_up_to_max_rows_and_flushes_at_each_watermark() {
    let model = models_dir().join("onnx/congestion_fp32.onnx");
    let cfg = infer_config(&model, "batch: {max_rows: 16, max_delay: 1h}\nreload_poll: 0s\n");
    let metrics = Metrics::new();
    let mut op = cfg
        .build(&features_schema(), &BuildContext { stage: "c".into(), metrics: metrics.clone(), ..Default::default() })
        .unwrap();
    let (inputs, want) = congestion_rows();
    let mut out = Collector::new(op.outputs().len());
    // 10 rows: below max_rows and max_delay, so they wait
    op.process_batch(features_batch(&inputs[..10], 0), &mut out).unwrap();
    assert!(out.port(0).is_empty());
    // 30 more of the same minute: 40 buffered >= 16, run as 16 + 16 + 8
    op.process_batch(features_batch(&inputs[10..40], 0), &mut out).unwrap();
    let sizes: Vec<usize> = out.port(0).iter().map(RecordBatch::num_rows).collect();
    assert_eq!(sizes, vec![16, 16, 8]);
    // a watermark runs what is left, however little
    op.process_batch(features_batch(&inputs[40..43], 200), &mut out).unwrap();
    assert_eq!(out.port(0).len(), 3);
    op.on_watermark(1_000, &mut out).unwrap();
    assert_eq!(out.port(0).len(), 4);
    assert_eq!(metrics.value("citystream_infer_runs_total", &[("stage", "c")]), Some(4.0));
    let all: Vec<RecordBatch> = out.drain().filter(|(p, _)| *p == 0).map(|(_, b)| b).collect();
    let all = arrow::compute::concat_batches(&all[0].schema(), &all).unwrap();
    assert_eq!(all.num_rows(), 43);
    let s30 = col(&all, "s30");
    for (i, w) in want[..43].iter().enumerate() {
        assert!((s30[i] - w[1]).abs() <= 1e-5 * w[1].abs().max(1.0), "row {i}");
    }
    let sha = sha256_hex(&std::fs::read(&model).unwrap());
    assert!(strings(&all, "model_sha256").iter().all(|s| *s == sha));
    assert!(strings(&all, "model").iter().all(|s| s == "congestion_fp32"));
    // one model run never mixes two minutes (an int8 model's dynamic quantization depends on
    // the batch): 5 rows of one minute and 7 of the next run as 5 + 7, not as one run of 12
    op.process_batch(features_batch(&inputs[..5], 60_000), &mut out).unwrap();
    op.process_batch(features_batch(&inputs[5..12], 120_000), &mut out).unwrap();
    op.on_watermark(200_000, &mut out).unwrap();
    let sizes: Vec<usize> = out.port(0).iter().map(RecordBatch::num_rows).collect();
    assert_eq!(sizes, vec![5, 7]);
}

#[test]
fn infer_reads_scalar_feature_columns_too() {
    let model = models_dir().join("onnx/congestion_fp32.onnx");
    let (inputs, want) = congestion_rows();
    let fields: Vec<Field> = FEATURES.iter().map(|f| Field::new(*f, DataType::Float64, false)).collect();
    let schema = Arc::new(Schema::new(fields));
    let cols: Vec<Arc<dyn Array>> = (0..FEATURES.len())
        .map(|j| Arc::new(arrow::array::Float64Array::from_iter_values(inputs.iter().map(|r| f64::from(r[j])))) as _)
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let names = FEATURES.iter().map(|f| format!("\"{f}\"")).collect::<Vec<_>>().join(", ");
    let yaml = format!(
        "model: {}\nfeatures: [{names}]\noutputs: {{speed_kmh: [a, b, c]}}\nreload_poll: 0s\n",
        model.display()
    );
    let cfg: InferConfig = serde_saphyr::from_str(&yaml).unwrap();
    let mut op =
        cfg.build(&schema, &BuildContext { stage: "c".into(), metrics: Metrics::new(), ..Default::default() }).unwrap();
    let mut out = Collector::new(1);
    op.process_batch(batch, &mut out).unwrap();
    op.on_end(&mut out).unwrap();
    let b = &out.port(0)[0];
    let a = col(b, "a");
    for (i, w) in want.iter().enumerate() {
        assert!((a[i] - w[0]).abs() <= 1e-5 * w[0].abs().max(1.0));
    }
}

#[test]
fn infer_plan_errors_name_the_key() {
    let model = models_dir().join("onnx/congestion_fp32.onnx");
    let cfg = infer_config(&model, "");
    let bad = InferConfig { features: citystream_models::infer::FeatureInput::List("feature".into()), ..cfg.clone() };
    let errs = bad.plan(&features_schema()).unwrap_err();
    assert!(
        errs.iter().any(|e| e.key == "features" && e.help.as_deref() == Some("did you mean `features`?")),
        "{errs:?}"
    );
    let bad = infer_config(Path::new("/nonexistent/m.onnx"), "");
    let errs = bad.plan(&features_schema()).unwrap_err();
    assert!(errs.iter().any(|e| e.key == "model"), "{errs:?}");
    // a model whose output is not what the YAML maps: a build error at `model`
    let bad: InferConfig = serde_saphyr::from_str(&format!(
        "model: {}\nfeatures: features\noutputs: {{speed_kmh: [only_one]}}\nreload_poll: 0s\n",
        model.display()
    ))
    .unwrap();
    let Err(errs) = bad
        .build(&features_schema(), &BuildContext { stage: "c".into(), metrics: Metrics::new(), ..Default::default() })
    else {
        panic!("a model that does not fit the mapping was accepted")
    };
    assert!(errs.iter().any(|e| e.key == "model" && e.message.contains("maps it to 1")), "{errs:?}");
}

fn wait_for(mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < until, "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn replacing_the_model_file_swaps_it_and_a_bad_file_is_rejected_while_the_old_one_serves() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.onnx");
    let fp32 = models_dir().join("onnx/congestion_fp32.onnx");
    let small = models_dir().join("onnx/congestion_small.onnx");
    std::fs::copy(&fp32, &live).unwrap();
    let cfg = infer_config(&live, "reload_poll: 50ms\nbatch: {max_rows: 64, max_delay: 0s}\n");
    let cfg = InferConfig {
        shadow: Some(citystream_models::infer::ShadowConfig {
            model: citystream_operators::EnvString::literal(
                models_dir().join("onnx/congestion_int8.onnx").display().to_string(),
            ),
            name: Some("candidate".into()),
        }),
        ..cfg
    };
    let metrics = Metrics::new();
    let mut op = cfg
        .build(&features_schema(), &BuildContext { stage: "c".into(), metrics: metrics.clone(), ..Default::default() })
        .unwrap();
    assert_eq!(op.outputs().len(), 2, "main and shadow");
    let (inputs, _) = congestion_rows();
    let run = |op: &mut Box<dyn Operator>| {
        let mut out = Collector::new(2);
        op.process_batch(features_batch(&inputs[..8], 0), &mut out).unwrap();
        op.on_watermark(10, &mut out).unwrap();
        let main = out.port(0).to_vec();
        let shadow = out.port(1).to_vec();
        (main, shadow)
    };
    let (main, shadow) = run(&mut op);
    let sha_fp32 = sha256_hex(&std::fs::read(&fp32).unwrap());
    assert_eq!(strings(&main[0], "model_sha256")[0], sha_fp32);
    assert_eq!(strings(&shadow[0], "model")[0], "candidate");
    assert_eq!(shadow[0].num_rows(), 8, "the shadow predicts the same rows");
    assert_ne!(col(&main[0], "s15"), col(&shadow[0], "s15"), "int8 differs from fp32 a little");

    // a new model, written beside and renamed into place (as a deploy would)
    let tmp = dir.path().join("live.onnx.tmp");
    std::fs::copy(&small, &tmp).unwrap();
    std::fs::rename(&tmp, &live).unwrap();
    let sha_small = sha256_hex(&std::fs::read(&small).unwrap());
    wait_for(|| {
        let (m, _) = run(&mut op);
        strings(&m[0], "model_sha256")[0] == sha_small
    });
    assert_eq!(metrics.value("citystream_model_swaps_total", &[("stage", "c"), ("role", "live")]), Some(1.0));

    // a broken file: rejected, the small model keeps serving
    std::fs::write(&tmp, b"garbage").unwrap();
    std::fs::rename(&tmp, &live).unwrap();
    wait_for(|| {
        metrics.value("citystream_model_swaps_rejected_total", &[("stage", "c"), ("role", "live")]) == Some(1.0)
    });
    let (m, _) = run(&mut op);
    assert_eq!(strings(&m[0], "model_sha256")[0], sha_small);
    let info = metrics.render();
    assert!(info.contains(&format!("sha256=\"{sha_small}\"")), "{info}");
}

#[test]
fn a_high_carbon_grid_switches_to_the_cheaper_model_and_back() {
    let fp32 = models_dir().join("onnx/congestion_fp32.onnx");
    let int8 = models_dir().join("onnx/congestion_int8.onnx");
    let cfg = infer_config(
        &fp32,
        &format!(
            "reload_poll: 0s\nbatch: {{max_rows: 4, max_delay: 1h}}\ncarbon: {{model: {}, max_rows: 16}}\n",
            int8.display()
        ),
    );
    let metrics = Metrics::new();
    let mut op = cfg
        .build(&features_schema(), &BuildContext { stage: "c".into(), metrics: metrics.clone(), ..Default::default() })
        .unwrap();
    let (inputs, _) = congestion_rows();
    let step = |op: &mut Box<dyn Operator>| {
        let mut out = Collector::new(1);
        op.process_batch(features_batch(&inputs[..12], 0), &mut out).unwrap();
        op.on_watermark(10, &mut out).unwrap();
        let b = out.port(0).to_vec();
        (strings(&b[0], "model")[0].clone(), b.iter().map(RecordBatch::num_rows).collect::<Vec<_>>())
    };
    // no policy running: the live model, batches of 4
    assert_eq!(step(&mut op), ("congestion_fp32".to_string(), vec![4, 4, 4]));
    // the carbon policy's gauge (runtime.carbon_policy) says the grid is high: int8, batches of 16
    let mode = metrics.gauge("citystream_carbon_high_mode", "1 while the grid is above the policy's threshold.", &[]);
    mode.set(1.0);
    assert_eq!(step(&mut op), ("congestion_int8".to_string(), vec![12]));
    mode.set(0.0);
    assert_eq!(step(&mut op), ("congestion_fp32".to_string(), vec![4, 4, 4]));
    let action = |a: &str| metrics.value("citystream_policy_actions_total", &[("policy", "model"), ("action", a)]);
    assert_eq!((action("low_carbon_model"), action("full_model")), (Some(1.0), Some(1.0)));
}

/// The fp32 congestion model with `carbon.calm` at the median predicted +15 min speed of the
/// fixture rows (one row per segment, `seg-000`.. in order, every 5 minutes for calm ones).
struct CalmFixture {
    inputs: Vec<Vec<f32>>,
    cfg: InferConfig,
    /// Every segment.
    all: Vec<String>,
    /// The segments whose prediction is not calm.
    risky: Vec<String>,
    n_calm: usize,
}

fn calm_fixture() -> CalmFixture {
    let fp32 = models_dir().join("onnx/congestion_fp32.onnx");
    let (inputs, outputs) = congestion_rows();
    let mut s15: Vec<f32> = outputs.iter().map(|o| o[0]).collect();
    s15.sort_by(f32::total_cmp);
    let level = f64::from(s15[s15.len() / 2]);
    let calm: Vec<bool> = outputs.iter().map(|o| f64::from(o[0]) > level).collect();
    let (n, n_calm) = (inputs.len(), calm.iter().filter(|c| **c).count());
    assert!(n_calm > 0 && n_calm < n, "both kinds of segment in the fixture");
    let cfg = infer_config(
        &fp32,
        &format!(
            "reload_poll: 0s\nbatch: {{max_rows: 1024, max_delay: 1h}}\ncarbon: {{calm: {{column: s15, above: {level}, every: 5m}}}}\n"
        ),
    );
    CalmFixture {
        inputs,
        cfg,
        all: (0..n).map(|i| format!("seg-{i:03}")).collect(),
        risky: (0..n).filter(|i| !calm[*i]).map(|i| format!("seg-{i:03}")).collect(),
        n_calm,
    }
}

#[test]
fn in_the_high_mode_calm_segments_are_predicted_once_per_interval_and_risky_ones_every_minute() {
    let CalmFixture { inputs, cfg, all, risky, n_calm } = calm_fixture();
    let metrics = Metrics::new();
    let mut op = cfg
        .build(&features_schema(), &BuildContext { stage: "c".into(), metrics: metrics.clone(), ..Default::default() })
        .unwrap();
    // one row per segment per minute; the rows of a minute are the fixture rows, seg-000.. in order
    let minute = |op: &mut Box<dyn Operator>, m: i64| {
        let mut out = Collector::new(1);
        op.process_batch(features_batch(&inputs, m * 60_000), &mut out).unwrap();
        op.on_watermark(m * 60_000 + 1, &mut out).unwrap();
        out.port(0).iter().flat_map(|b| strings(b, "segment_id")).collect::<Vec<_>>()
    };
    assert_eq!(minute(&mut op, 0), all, "normal mode: every row");
    let mode = metrics.gauge("citystream_carbon_high_mode", "1 while the grid is above the policy's threshold.", &[]);
    mode.set(1.0);
    for m in 1..=9 {
        // a calm segment's latest prediction was at minute 0: next at 5, then at 10
        let expect = if m == 5 { &all } else { &risky };
        assert_eq!(&minute(&mut op, m), expect, "high mode, minute {m}");
    }
    let skipped = metrics.value("citystream_infer_rows_skipped_total", &[("stage", "c")]);
    assert_eq!(skipped, Some((8 * n_calm) as f64));
    mode.set(0.0);
    assert_eq!(minute(&mut op, 10), all, "back to normal: every row");
    let action = |a: &str| metrics.value("citystream_policy_actions_total", &[("policy", "model"), ("action", a)]);
    assert_eq!((action("high_carbon_mode"), action("normal_mode")), (Some(1.0), Some(1.0)));
}

/// A backlog hands the stage many minutes in one micro-batch: each minute is thinned after the
/// predictions of the minutes before it, so the same rows are predicted as when the minutes
/// came one by one (a calm segment is calm from its first prediction on, in both).
#[test]
fn in_the_high_mode_a_backlog_predicts_the_rows_minute_by_minute_does() {
    let CalmFixture { inputs, cfg, all, risky, .. } = calm_fixture();
    let run = |batched: bool| {
        let metrics = Metrics::new();
        metrics.gauge("citystream_carbon_high_mode", "mode", &[]).set(1.0);
        let mut op =
            cfg.build(&features_schema(), &BuildContext { stage: "c".into(), metrics, ..Default::default() }).unwrap();
        let mut out = Collector::new(1);
        for m in 0..12 {
            op.process_batch(features_batch(&inputs, m * 60_000), &mut out).unwrap();
            if !batched {
                op.on_watermark(m * 60_000 + 1, &mut out).unwrap();
            }
        }
        // the backlog's twelve minutes are one micro-batch (`max_rows: 1024`, `max_delay: 1h`)
        op.on_watermark(12 * 60_000, &mut out).unwrap();
        out.port(0).iter().flat_map(|b| strings(b, "segment_id")).collect::<Vec<_>>()
    };
    let (live, backlog) = (run(false), run(true));
    assert!(12 * inputs.len() <= 1024, "one micro-batch");
    // unseen at minute 0, then calm segments at minutes 5 and 10
    let expected: Vec<String> = (0..12).flat_map(|m| if m % 5 == 0 { all.clone() } else { risky.clone() }).collect();
    assert_eq!(live, expected);
    assert_eq!(backlog, expected);
}

#[test]
fn calm_clocks_survive_a_snapshot_and_restore() {
    let CalmFixture { inputs, cfg, all, risky, .. } = calm_fixture();
    let n = inputs.len();
    let metrics = Metrics::new();
    let build = || {
        cfg.build(
            &features_schema(),
            &BuildContext { stage: "c".into(), metrics: metrics.clone(), ..Default::default() },
        )
        .unwrap()
    };
    let minute = |op: &mut Box<dyn Operator>, m: i64| {
        let mut out = Collector::new(1);
        op.process_batch(features_batch(&inputs, m * 60_000), &mut out).unwrap();
        op.on_checkpoint(&mut out).unwrap();
        out.port(0).iter().flat_map(|b| strings(b, "segment_id")).collect::<Vec<_>>()
    };
    let mut first = build();
    assert!(first.is_stateful());
    assert_eq!(minute(&mut first, 0), all, "on_checkpoint runs the micro-batch");
    metrics.gauge("citystream_carbon_high_mode", "mode", &[]).set(1.0);
    for m in 1..=3 {
        assert_eq!(minute(&mut first, m), risky);
    }
    let state = first.snapshot().unwrap().unwrap();
    assert_eq!(state.num_rows(), n, "one clock per segment");
    let mut second = build();
    second.restore(state).unwrap();
    // the calm segments' clocks still say minute 0: their next prediction is at minute 5
    assert_eq!(minute(&mut second, 4), risky, "a fresh operator would predict every segment here");
    assert_eq!(minute(&mut second, 5), all);
}
