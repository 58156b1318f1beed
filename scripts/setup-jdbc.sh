#!/usr/bin/env bash
# Fetches the Arrow Flight SQL JDBC driver (what DBeaver and other JDBC tools load) from Maven
# Central into ~/.m2, for tests/tests/flight_sql.rs. Idempotent.
set -euo pipefail
version=18.3.0
jar="$HOME/.m2/repository/org/apache/arrow/flight-sql-jdbc-driver/$version/flight-sql-jdbc-driver-$version.jar"
if [[ ! -f "$jar" ]]; then
  # stdout is the jar's path alone (the caller reads it): Maven's own output, even with -q an
  # ANSI colour reset before the path on a first fetch, goes to stderr
  mvn -q -B dependency:get -Dartifact="org.apache.arrow:flight-sql-jdbc-driver:$version" -Dtransitive=false >&2
fi
echo "$jar"
