#!/usr/bin/env bash
# The Helm chart (deploy/helm/citystream), rendered by a real helm and checked:
#   - `helm lint`, and every manifest of two renderings (defaults; three workers on an S3 server
#     of their own with an existing Secret) valid against the Kubernetes 1.37 schemas
#     (kubernetes-validate, strict: unknown fields are errors); the KEDA ScaledObject (a CRD,
#     not in those schemas) is checked by tests/helm/check_manifests.py
#   - rendering without the pseudonym and DP keys fails and says which value to set
#   - the chart's pipeline is deploy/kafka.yaml but for per-partition tasks with their state on
#     object storage and a global task, static membership and no control center of its own, and the rendered one plans (`citystream
#     validate`) with the pods' environment; its control centers' file is deploy/control.yaml
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
helm="$(scripts/setup-helm.sh)"
chart=deploy/helm/citystream
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
key="$(head -c32 /dev/urandom | base64)"
keys=(--set "secrets.pseudonymKey=$key" --set "secrets.dpNoiseKey=$key"
      --set "secrets.controlTokens=viewer vic viewer-token-0123456789")

"$helm" lint --strict "$chart" "${keys[@]}"
"$helm" template city "$chart" "${keys[@]}" >"$out/default.yaml"
"$helm" template city "$chart" -f tests/helm/scaled-values.yaml >"$out/scaled.yaml"
"$helm" template city "$chart" -f tests/helm/scaled-values.yaml --set keda.enabled=false >"$out/scaled-no-keda.yaml"
.venv/bin/kubernetes-validate --strict --quiet -k 1.37.0 "$out/default.yaml" "$out/scaled-no-keda.yaml"

if "$helm" template city "$chart" >/dev/null 2>"$out/err"; then
  echo "rendering without keys must fail" >&2
  exit 1
fi
grep -q "secrets.pseudonymKey (base64 of 32 random bytes) or secrets.existingSecret" "$out/err"
if "$helm" template city "$chart" --set "secrets.pseudonymKey=$key" --set "secrets.dpNoiseKey=$key" >/dev/null 2>"$out/err"; then
  echo "rendering without control-center tokens must fail" >&2
  exit 1
fi
grep -q "secrets.controlTokens (viewer NAME TOKEN; operator NAME TOKEN) or secrets.existingSecret" "$out/err"

# nothing but the state and tasks, static membership and the control sink differs from deploy/kafka.yaml
diff <(grep -v '^ *#' "$chart/files/pipeline.yaml" | grep -v '^$' | grep -v 'group.instance.id: ${POD_NAME}' |
        grep -v '^  tasks: partition' | grep -v '^  global_task: true' | sed 's|  state_url: ${CITYSTREAM_STATE_URL}.*|STATE|') \
     <(grep -v '^ *#' deploy/kafka.yaml | grep -v '^$' | sed 's|  state_dir: ${CITYSTREAM_DATA:-data}/state|STATE|' |
        sed '/^  control: /,/^runtime:/{/^runtime:/!d}')
diff "$chart/files/control.yaml" deploy/control.yaml

.venv/bin/python tests/helm/check_manifests.py "$out/default.yaml" "$out/scaled.yaml" "$out/pipeline.yaml"
# the pipeline as a pod gets it: its environment from the rendered StatefulSet
mkdir -p "$out/data"
POD_NAME=city-citystream-0 KAFKA_BROKERS=kafka:9092 KAFKA_GROUP=citystream CITYSTREAM_DATA="$out/data" \
  CITYSTREAM_STATE_URL=s3://citystream-state/workers \
  "${CARGO_TARGET_DIR:-$HOME/.cache/citystream/target}/debug/citystream" validate "$out/pipeline.yaml" >"$out/plan.txt"
grep -q "source kafka (kafka) -> traffic, camera, environment" "$out/plan.txt"
# the city-wide stages run once, in the global task
grep -q "incident_alerts: .storm. limits the alerts open city-wide: it runs in the global task" "$out/plan.txt"
grep -q "dp_segment_speed: .partitions.public. releases every listed partition.*it runs in the global task" "$out/plan.txt"
echo "helm chart: lint, schemas (2 renderings), required keys, config drift, manifests and plan checked"
