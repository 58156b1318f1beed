#!/usr/bin/env bash
# The README's Kafka quick start (section "## Kafka"), run as written on a fresh machine: its own
# broker on the README's port (run dir and data in a temporary folder), the topics, a simulated
# day produced into them, and the pipeline, stopped with SIGINT (Ctrl-C) once it has caught up.
# Then checks that the tables filled and that the dead letters are only the simulator's injected
# faults (its malformed messages).
#   scripts/test-quickstart.sh          (scripts/test.sh runs it; needs the debug build)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$HOME/.cache/citystream/target}"
test -x "$target/debug/citystream" || { echo "build first: cargo build --workspace --all-targets" >&2; exit 1; }
work="$(mktemp -d)"
export PATH="$target/debug:$PATH"
export KAFKA_RUN_DIR="$work/kafka" CITYSTREAM_DATA="$work/data"
export CITYSTREAM_CONTROL_ADDR=127.0.0.1:0 CITYSTREAM_METRICS_ADDR=127.0.0.1:0
run_pid=""
cleanup() {
  [[ -n "$run_pid" ]] && kill -9 "$run_pid" 2>/dev/null || true
  deploy/kafka/stop.sh >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

block="$(awk '/^## Kafka/{k=1} k && /^```sh/{f=1; next} f && /^```/{exit} f' README.md)"
test -n "$block" || { echo "no sh block under '## Kafka' in README.md" >&2; exit 1; }
echo "$block" | sed 's/^/  README: /'
while IFS= read -r line; do
  case "$line" in
    *"citystream simulate "*)
      # the simulator's account (JSON) on stdout
      eval "$line" > "$work/report.json" ;;
    *"citystream run "*)
      # runs until Ctrl-C: in the background, stopped once it has caught up and the derived
      # tables are out (more rows out than events in, and nothing moving): the watermark waits
      # `idle_partition_timeout` (30 s) for a partition that has no data — keyed by corridor,
      # the simulated city's three corridors fill two of the three partitions
      # (exec: the signal below reaches citystream itself, not a subshell around it)
      eval "exec $line" > "$work/run.log" 2>&1 &
      run_pid=$!
      t0=$SECONDS
      settled() {
        local last
        last="$(grep '^\[citystream\]' "$work/run.log" | tail -n 1)"
        [[ "$last" == *"kafka lag 0 "* && "$last" == *"in 0 ev/s, out 0 rows/s"* ]] || return 1
        [[ "$last" =~ total\ in\ ([0-9]+)\ out\ ([0-9]+) ]] && (( BASH_REMATCH[2] > BASH_REMATCH[1] ))
      }
      until settled; do
        kill -0 "$run_pid" 2>/dev/null || { cat "$work/run.log"; echo "citystream run ended early" >&2; exit 1; }
        (( SECONDS - t0 < 600 )) || { tail -n 20 "$work/run.log"; echo "not caught up within 10 minutes" >&2; exit 1; }
        sleep 2
      done
      kill -INT "$run_pid"
      wait "$run_pid" || { tail -n 40 "$work/run.log"; echo "citystream run failed" >&2; exit 1; }
      run_pid="" ;;
    *) eval "$line" ;;
  esac
done <<< "$block"

lake="$CITYSTREAM_DATA/lake"
count() { citystream sql --data "$lake" --format csv "$1" | tail -n 1; }
malformed="$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sum(k["malformed"] for k in r["kinds"].values()))' "$work/report.json")"
valid="$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["kinds"]["traffic"]["valid"])' "$work/report.json")"
dead="$(count "SELECT count(*) FROM dead_letters")"
out_of_bounds="$(count "SELECT count(*) FROM dead_letters WHERE reason_code = 'timestamp_out_of_bounds'")"
traffic="$(count "SELECT count(*) FROM traffic")"
late="$(count "SELECT count(*) FROM traffic_late")"
minutes="$(count "SELECT count(*) FROM traffic_minutes")"
scores="$(count "SELECT count(*) FROM incident_scores")"
echo "quick start: $traffic traffic rows + $late late of $valid valid, $minutes one-minute windows, $scores incident scores, $dead dead letters ($malformed malformed injected, $out_of_bounds out of bounds)"
fail=0
[[ "$dead" == "$malformed" ]] || { echo "FAIL: dead letters are not only the injected faults" >&2; fail=1; }
[[ "$out_of_bounds" == 0 ]] || { echo "FAIL: events rejected as out of bounds" >&2; fail=1; }
(( traffic + late == valid )) || { echo "FAIL: not every valid traffic event is stored" >&2; fail=1; }
(( late * 100 < valid )) || { echo "FAIL: more than 1% of the traffic is late" >&2; fail=1; }
(( minutes > 20000 && scores > 20000 )) || { echo "FAIL: the derived tables did not fill" >&2; fail=1; }
exit "$fail"
