//! JSON-to-Arrow decoding and validation, per event kind, on simulator payloads.
//!
//! Measures `Decoder::decode` on one raw batch of 8192 messages (set-up outside the timed
//! part); throughput is reported in events and in payload bytes.
//!
//! Run: `cargo bench -p citystream-benches --bench decode`

use citystream_benches::sample_payloads;
use citystream_schemas::raw::RawBatchBuilder;
use citystream_schemas::{DecodeOptions, Decoder, EventKind};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for kind in EventKind::ALL {
        let payloads = sample_payloads(kind, 8192);
        let bytes: usize = payloads.iter().map(Vec::len).sum();
        let mut b = RawBatchBuilder::with_capacity(payloads.len(), bytes);
        for (i, p) in payloads.iter().enumerate() {
            b.append("bench", 0, i as i64, 1_772_409_600_000 + 86_400_000, p);
        }
        let raw = b.finish();
        let decoder = Decoder::new(kind, DecodeOptions { max_past_ms: None, ..DecodeOptions::default() });
        group.throughput(Throughput::Elements(payloads.len() as u64));
        group.bench_function(format!("{kind}/events"), |bench| {
            bench.iter_batched(|| raw.clone(), |raw| decoder.decode(&raw).unwrap(), BatchSize::SmallInput)
        });
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("{kind}/bytes"), |bench| {
            bench.iter_batched(|| raw.clone(), |raw| decoder.decode(&raw).unwrap(), BatchSize::SmallInput)
        });
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
