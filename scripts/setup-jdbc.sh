#!/usr/bin/env bash
# Fetches the Arrow Flight SQL JDBC driver (what DBeaver and other JDBC tools load) from Maven
# Central into ~/.m2, for tests/tests/flight_sql.rs. Idempotent.
set -euo pipefail
version=18.3.0
jar="$HOME/.m2/repository/org/apache/arrow/flight-sql-jdbc-driver/$version/flight-sql-jdbc-driver-$version.jar"
if [[ ! -f "$jar" ]]; then
  mvn -q dependency:get -Dartifact="org.apache.arrow:flight-sql-jdbc-driver:$version" -Dtransitive=false
fi
echo "$jar"
