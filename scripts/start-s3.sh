#!/usr/bin/env bash
# Starts an S3-compatible server for the tests (moto's, from .venv, serving one request at a
# time: tests/python/s3_server.py says why) on 127.0.0.1:$S3_PORT (default 19555), creates the bucket
# $S3_BUCKET (default citystate) and checks that the server refuses a second conditional create
# (`If-None-Match: *`) with 412, which the state protocol's fencing relies on.
#   scripts/start-s3.sh DIR   # pid and log in DIR; stop with: kill "$(cat DIR/moto.pid)"
# Prints the environment for clients (AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, credentials, region).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:?usage: start-s3.sh DIR}"
port="${S3_PORT:-19555}"
bucket="${S3_BUCKET:-citystate}"
mkdir -p "$dir"
"$root/.venv/bin/python" "$root/tests/python/s3_server.py" "$port" >"$dir/moto.log" 2>&1 &
echo $! >"$dir/moto.pid"
url="http://127.0.0.1:$port"
for _ in $(seq 100); do
  curl -sf -o /dev/null "$url/moto-api/" && break
  sleep 0.2
done
curl -sf -o /dev/null -X PUT "$url/$bucket" || { echo "moto did not start: $(tail -5 "$dir/moto.log")" >&2; exit 1; }
# a signed-looking request (moto answers anonymous ones on existing keys with 403)
auth='Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0'
probe="$url/$bucket/.probe-$$"
first=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H "$auth" -H 'If-None-Match: *' --data a "$probe")
second=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H "$auth" -H 'If-None-Match: *' --data b "$probe")
curl -s -o /dev/null -X DELETE -H "$auth" "$probe"
if [[ "$first" != 200 || "$second" != 412 ]]; then
  echo "the S3 server answers conditional creates with $first then $second (want 200 then 412)" >&2
  exit 1
fi
echo "export AWS_ENDPOINT_URL=$url AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 CITYSTREAM_S3_BUCKET=$bucket"
