#!/usr/bin/env bash
# Copies the jars of the pinned Apache Kafka broker (pom.xml) into deploy/kafka/lib/ with Maven.
# Idempotent: does nothing when lib/ already holds the jars for the current pom.xml (stamp file).
# The first run downloads about 45 MB into ~/.m2; later runs (even after `rm -rf lib`) copy from there.
#
# Env: KAFKA_LIB_DIR (default deploy/kafka/lib), MVN (default mvn), MAVEN_OPTS as usual.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom="$here/pom.xml"
lib="${KAFKA_LIB_DIR:-$here/lib}"
mvn_cmd="${MVN:-mvn}"
stamp="$lib/.fetched"

die() { echo "kafka/fetch.sh: $*" >&2; exit 1; }

[[ -f "$pom" ]] || die "missing $pom"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n1)"
[[ -n "$version" ]] || die "cannot read <kafka.version> from $pom"
# The stamp names the version and the pom's checksum, so any change to pom.xml re-fetches.
want="kafka $version pom-sha256 $(sha256sum "$pom" | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$lib/kafka_2.13-$version.jar" ]]; then
    exit 0
fi

command -v "$mvn_cmd" >/dev/null 2>&1 || die "Maven ('$mvn_cmd') not found; install it (apt-get install maven) or set MVN"
command -v java >/dev/null 2>&1 || die "java not found; Kafka $version needs Java 17 or newer"

echo "kafka/fetch.sh: fetching Apache Kafka $version jars with Maven into $lib ..." >&2
mkdir -p "$(dirname "$lib")"
tmp="$(mktemp -d "$(dirname "$lib")/.lib.tmp.XXXXXX")"
mvn_log="$tmp.mvn.log"
trap 'rm -rf "$tmp" "$mvn_log"' EXIT

if ! "$mvn_cmd" -B -q -f "$pom" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
        >"$mvn_log" 2>&1; then
    tail -n 40 "$mvn_log" >&2 || true
    die "Maven could not fetch org.apache.kafka:kafka_2.13:$version and its dependencies (see above; is Maven Central reachable?)"
fi

# Sanity checks: the broker, the storage tool and a working log4j2 + slf4j binding.
for jar in "kafka_2.13-$version.jar" "kafka-server-$version.jar" "kafka-clients-$version.jar"; do
    [[ -f "$tmp/$jar" ]] || die "Maven finished but $jar is missing from the copied jars"
done
for prefix in log4j-api- log4j-core- log4j-slf4j-impl- slf4j-api-; do
    compgen -G "$tmp/$prefix*.jar" >/dev/null || die "Maven finished but no ${prefix}*.jar was copied (broker logging would be lost)"
done

echo "$want" >"$tmp/.fetched"
chmod 755 "$tmp"  # mktemp -d makes it 0700
rm -rf "$lib"
mv "$tmp" "$lib"
n_jars="$(find "$lib" -maxdepth 1 -name "*.jar" | wc -l)"
echo "kafka/fetch.sh: $n_jars jars ready in $lib" >&2
