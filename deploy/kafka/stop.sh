#!/usr/bin/env bash
# Stops the broker started by start.sh: SIGTERM (controlled shutdown, data kept), waits, then
# SIGKILL after the timeout. Idempotent: exits 0 when nothing is running.
#
# Usage: stop.sh [--dir DIR] [--timeout S]
#   --dir DIR    run dir given to start.sh, default deploy/kafka/run   (env KAFKA_RUN_DIR)
#   --timeout S  seconds to wait after SIGTERM before SIGKILL, default 30 (env KAFKA_STOP_TIMEOUT)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${KAFKA_RUN_DIR:-$here/run}"
timeout="${KAFKA_STOP_TIMEOUT:-30}"

die() { echo "kafka/stop.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; dir="$2"; shift 2 ;;
        --dir=*) dir="${1#*=}"; shift ;;
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; timeout="$2"; shift 2 ;;
        --timeout=*) timeout="${1#*=}"; shift ;;
        -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[[ "$timeout" =~ ^[0-9]+$ ]] || die "not a number: $timeout"

pidfile="$dir/kafka.pid"
if [[ ! -f "$pidfile" ]]; then
    echo "kafka/stop.sh: no broker running from $dir (no pid file)"
    exit 0
fi
pid="$(cat "$pidfile" 2>/dev/null || true)"

is_broker() {
    kill -0 "$1" 2>/dev/null && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'
}

if [[ ! "$pid" =~ ^[0-9]+$ ]] || ! is_broker "$pid"; then
    echo "kafka/stop.sh: broker from $dir is not running (stale pid file removed)"
    rm -f "$pidfile"
    exit 0
fi

start_s=$SECONDS
kill -TERM "$pid" 2>/dev/null || true
deadline=$((SECONDS + timeout))
while is_broker "$pid" && ((SECONDS < deadline)); do
    sleep 0.2
done
if is_broker "$pid"; then
    echo "kafka/stop.sh: broker (pid $pid) still running after ${timeout} s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        is_broker "$pid" || break
        sleep 0.1
    done
    is_broker "$pid" && die "broker (pid $pid) survived SIGKILL"
fi
rm -f "$pidfile"
echo "kafka/stop.sh: broker (pid $pid) stopped after $((SECONDS - start_s)) s"
