"""Checks what the Helm chart renders, beyond schema validity.

    check_manifests.py DEFAULT.yaml SCALED.yaml PIPELINE_OUT.yaml

DEFAULT: rendered with the defaults (and keys); SCALED: tests/helm/scaled-values.yaml. Writes
the rendered pipeline config to PIPELINE_OUT (for `citystream validate`).
"""

import sys

import yaml


def load(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def env(container):
    return {e["name"]: e for e in container["env"]}


def main():
    default, scaled, pipeline_out = sys.argv[1:4]
    d = load(default)
    kinds = sorted(k for k, _ in d)
    assert kinds == [
        "ConfigMap", "Deployment", "PodDisruptionBudget", "PodDisruptionBudget", "Secret", "Service", "Service",
        "StatefulSet",
    ], kinds

    sts = d[("StatefulSet", "city-citystream")]
    spec = sts["spec"]
    assert spec["replicas"] == 1, spec["replicas"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    e = env(c)
    # static membership comes from the pod's name; the state is shared (one folder per task)
    assert e["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert e["CITYSTREAM_STATE_URL"]["value"] == "s3://citystream-state/workers", e["CITYSTREAM_STATE_URL"]
    assert "AWS_ENDPOINT_URL" not in e, "no endpoint unless one is given"
    assert e["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "city-citystream"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, (probe, c[probe])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9464}
    assert e["CITYSTREAM_METRICS_ADDR"]["value"] == "0.0.0.0:9464"
    assert "CITYSTREAM_CONTROL_ADDR" not in e, "workers run no control center of their own"
    secrets = next(v for v in pod["volumes"] if v["name"] == "secrets")["secret"]
    assert secrets["defaultMode"] == 0o400, "the pipeline refuses secret files others can read"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"config": "/etc/citystream", "data": "/data", "secrets": "/data/secrets"}, mounts
    assert spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "checksum/config" in spec["template"]["metadata"]["annotations"]
    assert d[("PodDisruptionBudget", "city-citystream")]["spec"]["maxUnavailable"] == 1
    secret = d[("Secret", "city-citystream")]["data"]
    assert set(secret) == {
        "pseudonym.key", "dp_noise.key", "control_tokens", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    }, set(secret)

    # the control centers: two pods behind one Service, ready once their book caught up
    dep = d[("Deployment", "city-citystream-control")]
    assert dep["spec"]["replicas"] == 2
    (cc,) = dep["spec"]["template"]["spec"]["containers"]
    assert cc["args"] == ["control", "--config", "/etc/citystream/control.yaml", "--metrics-addr", "0.0.0.0:9464"]
    ce = env(cc)
    assert ce["CITYSTREAM_CONTROL_TOKENS"]["valueFrom"]["secretKeyRef"] == {
        "name": "city-citystream", "key": "control_tokens",
    }
    assert ce["CITYSTREAM_CONTROL_ADDR"]["value"] == "0.0.0.0:8088"
    assert cc["readinessProbe"]["httpGet"] == {"path": "/api/ready", "port": "control"}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = d[("Service", "city-citystream-control")]["spec"]
    assert all(labels[k] == v for k, v in svc["selector"].items()) and svc["selector"]["app.kubernetes.io/component"] == "control"
    assert svc["ports"] == [{"name": "control", "port": 8088, "targetPort": "control"}]
    worker_selector = d[("StatefulSet", "city-citystream")]["spec"]["selector"]["matchLabels"]
    assert worker_selector["app.kubernetes.io/component"] == "worker", "the Services do not mix workers and control centers"
    assert d[("PodDisruptionBudget", "city-citystream-control")]["spec"]["minAvailable"] == 1
    assert "emptyDir" in next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "lake")

    config = d[("ConfigMap", "city-citystream")]["data"]["pipeline.yaml"]
    parsed = yaml.safe_load(config)
    props = parsed["sources"]["kafka"]["properties"]
    assert props["group.instance.id"] == "${POD_NAME}", props
    assert parsed["runtime"]["state_url"] == "${CITYSTREAM_STATE_URL}"
    assert "state_dir" not in parsed["runtime"]
    assert parsed["runtime"]["tasks"] == "partition", "the state of a partition moves with it"
    assert "control" not in parsed["sinks"], "the chart's control centers run apart"
    control = yaml.safe_load(d[("ConfigMap", "city-citystream")]["data"]["control.yaml"])
    assert control["kafka"]["alerts_topic"] == "city.alerts" and "alerts" not in control
    open(pipeline_out, "w").write(config)

    s = load(scaled)
    sts = s[("StatefulSet", "city-citystream")]
    assert "replicas" not in sts["spec"], "KEDA owns the replica count"
    assert ("Secret", "city-citystream") not in s, "an existing Secret is used, none created"
    e = env(sts["spec"]["template"]["spec"]["containers"][0])
    assert e["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert e["AWS_ALLOW_HTTP"]["value"] == "true"
    assert e["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "citystream-keys"
    assert e["CITYSTREAM_STATE_URL"]["value"] == "s3://city-state/north"
    so = s[("ScaledObject", "city-citystream")]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "city-citystream"}
    assert so["spec"]["maxReplicaCount"] == 6
    (t,) = so["spec"]["triggers"]
    assert t["type"] == "kafka" and t["metadata"]["consumerGroup"] == "citystream", t
    print("manifests ok")


if __name__ == "__main__":
    main()
