#!/usr/bin/env bash
# The GPU check: runs the inference bench (benches/benches/models.rs) with the CPU provider and
# with the CUDA provider on the same machine and prints rows/s of each, the speedup, and how far
# the CUDA predictions are from the CPU's.
#
#   deploy/gpu/check.sh                 # on a machine with an NVIDIA GPU
#
# Needs there:
#   - an NVIDIA GPU with its driver (nvidia-smi);
#   - the onnxruntime-gpu 1.31.1 wheel's libraries in one folder: libonnxruntime.so.1.31.1,
#     libonnxruntime_providers_shared.so, libonnxruntime_providers_cuda.so (ORT_GPU_LIB_DIR, or an
#     installed onnxruntime-gpu in python3), and CUDA 13's cuBLAS, cudart, cuRAND (and cuDNN)
#     on LD_LIBRARY_PATH (NVIDIA's pip wheels work: ../../shared/GPU.md);
#   - the bench built with the CUDA provider compiled in: BENCH_BIN=<binary of
#     `cargo bench -p citystream-benches --bench models --features cuda --no-run`>, or cargo here.
# Without a GPU or the libraries it says so and exits 0: nothing is measured, nothing is invented.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu check: no NVIDIA GPU here (nvidia-smi is missing or fails); nothing to measure"
  exit 0
fi
lib_dir="${ORT_GPU_LIB_DIR:-}"
if [[ -z "$lib_dir" ]]; then
  lib_dir="$(python3 -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))' 2>/dev/null || true)"
fi
if [[ -z "$lib_dir" || ! -f "$lib_dir/libonnxruntime_providers_cuda.so" ]]; then
  echo "gpu check: no libonnxruntime_providers_cuda.so (set ORT_GPU_LIB_DIR to the onnxruntime-gpu wheel's capi folder); nothing to measure"
  exit 0
fi
ort_lib="$(ls "$lib_dir"/libonnxruntime.so.* 2>/dev/null | head -1)"
if [[ -z "$ort_lib" ]]; then
  echo "gpu check: no libonnxruntime.so.* beside the CUDA provider in $lib_dir; nothing to measure"
  exit 0
fi

echo "== nvidia-smi"
nvidia-smi
echo "== the CUDA provider's libraries"
ldd "$lib_dir/libonnxruntime_providers_cuda.so" | grep -E "cublas|cudart|curand|cudnn|not found" || true
if ldd "$lib_dir/libonnxruntime_providers_cuda.so" | grep -q "not found"; then
  echo "gpu check: some CUDA libraries are not found (above); put them on LD_LIBRARY_PATH"
  exit 1
fi

bench="${BENCH_BIN:-}"
if [[ -z "$bench" ]]; then
  cd "$root"
  bench="$(cargo bench -p citystream-benches --bench models --features cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "models" and m.get("executable"): print(m["executable"])' | tail -1)"
fi
[[ -x "$bench" ]] || { echo "gpu check: no bench binary (set BENCH_BIN)"; exit 1; }

export ORT_DYLIB_PATH="$ort_lib"
# the bench finds the models through it (a BENCH_BIN built elsewhere has another path compiled in)
export CARGO_MANIFEST_DIR="$root/benches"
out="$(mktemp -d)"
cd "$root/benches"
for p in cpu cuda; do
  echo "== $p"
  # a filter that matches no criterion bench: only the fixed latency loop runs
  CITYSTREAM_BENCH_PROVIDER=$p "$bench" --bench latency-only 2>&1 | tee "$out/$p.log" | grep -E '^(latency|nvml|parity)' || true
done
echo "== speedup of cuda over cpu (rows/s)"
awk '/^latency/ { key = $2 " batch " $5; sub(":", "", key); rate = $(NF-1);
       if (FILENAME ~ /cpu.log$/) cpu[key] = rate; else gpu[key] = rate }
     END { for (k in cpu) if (k in gpu) printf "%-32s cpu %12.0f  cuda %12.0f  x%.2f\n", k, cpu[k], gpu[k], gpu[k] / cpu[k] }' \
  "$out/cpu.log" "$out/cuda.log" | sort
if grep -q '^nvml: None' "$out/cuda.log"; then
  echo "gpu check: NVML (libnvidia-ml.so.1) did not load: the energy account will have no GPU time"
fi
if ! grep -q '(cuda)' "$out/cuda.log"; then
  echo "gpu check: the CUDA provider did not serve (see $out/cuda.log)"
  exit 1
fi
