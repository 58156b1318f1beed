#!/usr/bin/env bash
# Starts an Apache Kafka broker (KRaft; broker and controller in one JVM, or with --join a broker
# only, joining another's cluster) on 127.0.0.1 for development and tests, in the background,
# and waits until it is ready.
#
# Usage: start.sh [--port N] [--controller-port M] [--dir DIR] [--fresh] [--timeout S] [--set KEY=VALUE]...
#                 [--join DIR1 --node-id K]
#   --port N             client (PLAINTEXT) port, default 9092            (env KAFKA_PORT)
#   --controller-port M  KRaft controller port, default 9093             (env KAFKA_CONTROLLER_PORT)
#   --join DIR1          a broker only (no controller) that joins the cluster of the broker
#                        started from DIR1, which must be running (its controller, its cluster
#                        id); needs --node-id; no --controller-port
#   --node-id K          this node's id with --join, 2 or more (the first node is 1)
#   --dir DIR            run dir: config, data, logs, pid; default deploy/kafka/run (env KAFKA_RUN_DIR)
#   --fresh              stop the broker of DIR if running and wipe DIR first (all topics lost)
#   --timeout S          seconds to wait for readiness, default 60        (env KAFKA_START_TIMEOUT)
#   --set KEY=VALUE      extra broker property appended to server.properties (repeatable)
# Env: KAFKA_HEAP_OPTS (default "-Xmx512m -Xms256m"), KAFKA_JVM_OPTS (extra JVM flags), JAVA (java binary).
#
# Data in DIR survives stop.sh/start.sh: storage is formatted only once (DIR/data/meta.properties).
# Idempotent: if the broker of DIR is already running on the same port, it says so and exits 0.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

port="${KAFKA_PORT:-9092}"
cport="${KAFKA_CONTROLLER_PORT:-9093}"
dir="${KAFKA_RUN_DIR:-$here/run}"
timeout="${KAFKA_START_TIMEOUT:-60}"
fresh=0
join=""
node_id=1
cport_given=0
extra_props=()

die() { echo "kafka/start.sh: $*" >&2; exit 1; }
usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --port) [[ $# -ge 2 ]] || die "--port needs a value"; port="$2"; shift 2 ;;
        --port=*) port="${1#*=}"; shift ;;
        --controller-port) [[ $# -ge 2 ]] || die "--controller-port needs a value"; cport="$2"; cport_given=1; shift 2 ;;
        --controller-port=*) cport="${1#*=}"; cport_given=1; shift ;;
        --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; dir="$2"; shift 2 ;;
        --dir=*) dir="${1#*=}"; shift ;;
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; timeout="$2"; shift 2 ;;
        --timeout=*) timeout="${1#*=}"; shift ;;
        --set) [[ $# -ge 2 && "$2" == *=* ]] || die "--set needs KEY=VALUE"; extra_props+=("$2"); shift 2 ;;
        --fresh) fresh=1; shift ;;
        --join) [[ $# -ge 2 ]] || die "--join needs a dir"; join="$2"; shift 2 ;;
        --join=*) join="${1#*=}"; shift ;;
        --node-id) [[ $# -ge 2 ]] || die "--node-id needs a value"; node_id="$2"; shift 2 ;;
        --node-id=*) node_id="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ "$node_id" =~ ^[0-9]+$ ]] || die "not a number: $node_id"
node_id=$((10#$node_id))
if [[ -n "$join" ]]; then
    # a broker-only node: the controller and the cluster id are the first node's
    ((node_id >= 2)) || die "--join needs --node-id 2 or more (the node of the dir joined is 1)"
    ((cport_given == 0)) || die "--controller-port with --join: the controller is the joined node's"
    [[ -d "$join" ]] || die "--join $join: no such dir"
    join="$(cd "$join" && pwd)"
    [[ -s "$join/cluster.id" && -s "$join/kafka.controller-port" ]] \
        || die "--join $join: no broker was started from there (no cluster.id or kafka.controller-port)"
    cport="$(cat "$join/kafka.controller-port")"
else
    ((node_id == 1)) || die "--node-id is for a node that joins (--join); the first node is 1"
fi
for n in "$port" "$cport" "$timeout"; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "not a number: $n"
done
[[ "$port" != "$cport" ]] || die "--port and the controller port ($cport) must differ"

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
[[ "$dir" != "$join" ]] || die "--join names this node's own dir"
conf="$dir/config"
data="$dir/data"
logs="$dir/logs"
pidfile="$dir/kafka.pid"
portfile="$dir/kafka.port"
java_bin="${JAVA:-java}"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Pid of the broker started from this dir, if it is alive (and really a Kafka JVM), else nothing.
running_pid() {
    [[ -f "$pidfile" ]] || return 0
    local pid
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 0
    echo "$pid"
}

log_tail() {
    echo "---- tail of $logs/server.log ----" >&2
    tail -n 40 "$logs/server.log" >&2 2>/dev/null || echo "(no server.log)" >&2
    if [[ -s "$logs/stdout.log" ]]; then
        echo "---- tail of $logs/stdout.log ----" >&2
        tail -n 20 "$logs/stdout.log" >&2
    fi
}

if [[ "$fresh" == 1 ]]; then
    "$here/stop.sh" --dir "$dir"
    echo "kafka/start.sh: --fresh: wiping $dir" >&2
    rm -rf "${dir:?}"
    mkdir -p "$dir"
fi

pid="$(running_pid)"
if [[ -n "$pid" ]]; then
    old_port="$(cat "$portfile" 2>/dev/null || echo '?')"
    if [[ "$old_port" != "$port" ]]; then
        die "a broker from $dir is already running (pid $pid) on port $old_port, not $port; run stop.sh --dir $dir first"
    fi
    if port_open "$port"; then
        echo "kafka/start.sh: broker already running (pid $pid) on 127.0.0.1:$port"
        exit 0
    fi
    echo "kafka/start.sh: broker (pid $pid) is running but 127.0.0.1:$port does not answer yet; waiting" >&2
else
    rm -f "$pidfile"
    port_open "$port" && die "127.0.0.1:$port is already in use by another process (not a broker started from $dir)"
    if [[ -z "$join" ]]; then
        port_open "$cport" && die "controller port 127.0.0.1:$cport is already in use by another process"
    else
        port_open "$cport" || die "--join $join: its controller (127.0.0.1:$cport) does not answer; start that node first"
        # a node formatted for a cluster that has since been made again (its node 1 --fresh)
        # could never register: say so rather than wait for it
        if [[ -f "$data/meta.properties" && "$(cat "$dir/cluster.id" 2>/dev/null)" != "$(cat "$join/cluster.id")" ]]; then
            die "$dir belongs to an earlier cluster than $join's (node 1 was made again): start this node with --fresh"
        fi
    fi

    "$here/fetch.sh"
    lib="${KAFKA_LIB_DIR:-$here/lib}"

    mkdir -p "$conf" "$data" "$logs"

    if [[ -n "$join" ]]; then
        roles="# A broker joining the cluster of $join, whose node 1 is its controller.
process.roles=broker
node.id=$node_id
controller.quorum.voters=1@127.0.0.1:$cport
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$port"
    else
        roles="# KRaft: this JVM is both broker and controller (node 1); others may join it (--join).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
    fi
    cat >"$conf/server.properties" <<EOF
# Written by deploy/kafka/start.sh at each start; edits here are overwritten (use --set KEY=VALUE).
$roles
advertised.listeners=PLAINTEXT://127.0.0.1:$port
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data

# Every internal topic has one replica (on one broker, or spread over the nodes that joined).
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1

# Test-friendly behaviour: explicit topics only, no rebalance delay.
auto.create.topics.enable=false
delete.topic.enable=true
num.partitions=3
group.initial.rebalance.delay.ms=0

# Small segments and retention bounded by size only (per partition), so test data does not pile up.
# No time-based retention: simulated events carry their (possibly months-old) event time as the
# message timestamp, and time retention would delete them while they are being consumed.
log.segment.bytes=16777216
log.retention.ms=-1
log.retention.bytes=268435456
log.retention.check.interval.ms=60000

# Sized for a 2-core machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
EOF
    if [[ ${#extra_props[@]} -gt 0 ]]; then
        { echo; echo "# --set"; printf '%s\n' "${extra_props[@]}"; } >>"$conf/server.properties"
    fi

    cat >"$conf/log4j2.properties" <<'EOF'
# Written by deploy/kafka/start.sh. Everything from INFO up goes to logs/server.log (rewritten at
# each start, the previous one kept as server.log.prev); only WARN and above reach the console
# (logs/stdout.log, since the broker runs in the background).
status = warn
name = citystream-kafka

appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
appender.console.filter.threshold.type = ThresholdFilter
appender.console.filter.threshold.level = warn

appender.server.type = File
appender.server.name = SERVER
appender.server.fileName = ${sys:kafka.logs.dir}/server.log
appender.server.append = false
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n

rootLogger.level = info
rootLogger.appenderRef.stdout.ref = STDOUT
rootLogger.appenderRef.server.ref = SERVER

logger.request.name = kafka.request.logger
logger.request.level = warn
logger.statechange.name = state.change.logger
logger.statechange.level = warn
EOF

    # Format the storage once; a restart reuses it and so keeps every topic and offset.
    storage_tool=(
        "$java_bin" -Xmx256m -cp "$lib/*"
        "-Dlog4j2.configurationFile=$conf/log4j2.properties" "-Dkafka.logs.dir=$logs"
        kafka.tools.StorageTool
    )
    if [[ ! -f "$data/meta.properties" ]]; then
        if [[ -n "$join" ]]; then
            cp "$join/cluster.id" "$dir/cluster.id"
        elif [[ ! -s "$dir/cluster.id" ]]; then
            "${storage_tool[@]}" random-uuid 2>>"$logs/format.log" | tail -n1 | tr -d '[:space:]' >"$dir/cluster.id.tmp" \
                || { cat "$logs/format.log" >&2; die "StorageTool random-uuid failed"; }
            [[ -s "$dir/cluster.id.tmp" ]] || { cat "$logs/format.log" >&2; die "StorageTool random-uuid printed nothing"; }
            mv "$dir/cluster.id.tmp" "$dir/cluster.id"
        fi
        cluster_id="$(cat "$dir/cluster.id")"
        echo "kafka/start.sh: formatting $data (cluster id $cluster_id)" >&2
        if ! "${storage_tool[@]}" format -t "$cluster_id" -c "$conf/server.properties" >>"$logs/format.log" 2>&1; then
            tail -n 30 "$logs/format.log" >&2
            die "StorageTool format failed (see $logs/format.log)"
        fi
    fi

    [[ -f "$logs/server.log" ]] && mv -f "$logs/server.log" "$logs/server.log.prev"
    [[ -f "$logs/stdout.log" ]] && mv -f "$logs/stdout.log" "$logs/stdout.log.prev"

    # shellcheck disable=SC2086  # heap and JVM options are word lists on purpose
    setsid "$java_bin" ${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m} \
        -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
        -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
        ${KAFKA_JVM_OPTS:-} \
        "-Dlog4j2.configurationFile=$conf/log4j2.properties" "-Dkafka.logs.dir=$logs" \
        -cp "$lib/*" kafka.Kafka "$conf/server.properties" \
        </dev/null >"$logs/stdout.log" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    echo "$port" >"$portfile"
    [[ -n "$join" ]] || echo "$cport" >"$dir/kafka.controller-port"
    echo "kafka/start.sh: started broker pid $pid (127.0.0.1:$port, controller 127.0.0.1:$cport, dir $dir)" >&2
fi

start_s=$SECONDS
deadline=$((SECONDS + timeout))
while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
        log_tail
        rm -f "$pidfile"
        die "broker (pid $pid) exited during startup"
    fi
    if grep -q 'Kafka Server started' "$logs/server.log" 2>/dev/null && port_open "$port"; then
        echo "kafka/start.sh: ready on 127.0.0.1:$port after $((SECONDS - start_s)) s (pid $pid)"
        exit 0
    fi
    if ((SECONDS >= deadline)); then
        log_tail
        die "broker (pid $pid) not ready after ${timeout} s; it is left running (stop it with stop.sh --dir $dir)"
    fi
    sleep 0.5
done
