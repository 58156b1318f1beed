use std::sync::Arc;

use arrow::array::{Array, AsArray, BinaryArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use citystream_operators::zstd_column::{ZstdConfig, train_dictionary};
use citystream_operators::{BuildContext, Collector, OperatorConfig};

fn thumbs(n: usize, seed: u64) -> Vec<Vec<u8>> {
    // similar small images: a shared header and palette with per-image noise
    let mut x = seed;
    (0..n)
        .map(|_| {
            let mut v = b"\xff\xd8\xff\xe0JFIF-citystream-thumbnail-header-v1".to_vec();
            for _ in 0..600 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                v.push([12u8, 40, 41, 90, 200][(x >> 60) as usize % 5]);
            }
            v
        })
        .collect()
}

fn compress(cfg: &ZstdConfig, data: &[Vec<u8>]) -> (usize, Vec<Vec<u8>>) {
    let schema = Arc::new(Schema::new(vec![Field::new("thumbnail", DataType::Binary, true)]));
    let op_cfg = cfg.clone();
    let mut op = op_cfg.build(&schema, &BuildContext::default()).unwrap();
    assert_eq!(op.outputs()[0].schema.field(0).name(), "thumbnail_zstd");
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(BinaryArray::from_iter(data.iter().map(|d| Some(d.as_slice())).chain([None])))],
    )
    .unwrap();
    let mut c = Collector::new(1);
    op.process_batch(batch, &mut c).unwrap();
    let out = c.port(0)[0].column(0).as_binary::<i32>().clone();
    assert!(out.is_null(data.len()), "nulls stay null");
    let frames: Vec<Vec<u8>> = (0..data.len()).map(|i| out.value(i).to_vec()).collect();
    (frames.iter().map(Vec::len).sum(), frames)
}

#[test]
fn frames_round_trip_and_a_dictionary_beats_plain_zstd_on_small_similar_payloads() {
    let train = thumbs(500, 1);
    let test = thumbs(200, 2);
    let dir = tempfile::tempdir().unwrap();
    let dict_path = dir.path().join("thumbs.dict");
    let dict = train_dictionary(&train, 16 * 1024).unwrap();
    std::fs::write(&dict_path, &dict).unwrap();

    let plain: ZstdConfig = serde_saphyr::from_str("column: thumbnail\n").unwrap();
    let with_dict: ZstdConfig =
        serde_saphyr::from_str(&format!("column: thumbnail\ndictionary: {}\n", dict_path.display())).unwrap();
    let (plain_bytes, frames) = compress(&plain, &test);
    let (dict_bytes, dframes) = compress(&with_dict, &test);
    for (f, orig) in frames.iter().zip(&test) {
        assert_eq!(&zstd::bulk::decompress(f, 1 << 20).unwrap(), orig);
    }
    let mut d = zstd::bulk::Decompressor::with_dictionary(&dict).unwrap();
    for (f, orig) in dframes.iter().zip(&test) {
        assert_eq!(&d.decompress(f, 1 << 20).unwrap(), orig);
    }
    assert!(dict_bytes < plain_bytes, "dictionary {dict_bytes} B vs plain {plain_bytes} B");
}

#[test]
fn a_missing_dictionary_is_a_plan_error_with_help() {
    let cfg: ZstdConfig = serde_saphyr::from_str("column: thumbnail\ndictionary: /nope/d\n").unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("thumbnail", DataType::Binary, true)]));
    let e = cfg.plan(&schema).unwrap_err();
    assert!(e[0].message.contains("no dictionary file") && e[0].help.as_deref().unwrap().contains("train-dict"));
}
