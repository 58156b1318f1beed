#!/usr/bin/env bash
# Builds helm from the Go module proxy (helm.sh/helm/v4, pinned) into a cache outside the clone
# and prints its path. Idempotent: the build runs once per version.
set -euo pipefail
version="v4.3.2"
bin_dir="${CITYSTREAM_TOOLS:-$HOME/.cache/citystream/tools}/helm-$version"
if [[ -x "$bin_dir/helm" ]]; then
  echo "$bin_dir/helm"
  exit 0
fi
go="$(command -v go || true)"
[[ -z "$go" && -x /usr/local/go/bin/go ]] && go=/usr/local/go/bin/go
if [[ -z "$go" ]]; then
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >&2
  go="$(command -v go)"
fi
mkdir -p "$bin_dir"
echo "building helm $version with $("$go" version) (once)" >&2
GOBIN="$bin_dir" GOFLAGS=-buildvcs=false "$go" install "helm.sh/helm/v4/cmd/helm@$version" >&2
echo "$bin_dir/helm"
