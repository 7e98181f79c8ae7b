"""Kustomize overlays render, validate against the Kubernetes schema, and are wired together."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import yaml

from deploy_checks import KUSTOMIZE, exported_metric_names, promql_metric_names, run, tool
from image_contract import arg_value

import kubernetes_validate  # the `dev` extra installs it

# A version whose schemas kubernetes-validate bundles, so validation needs no network.
K8S_VERSION = "1.32.0"
# Custom resources: no schema bundled; each gets its own field checks below.
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}

OVERLAYS = ["cpu-demo", "gpu", "gpu-tp2", "gpu-hpa", "gpu-keda"]
GPU_OVERLAYS = ["gpu", "gpu-tp2", "gpu-hpa", "gpu-keda"]
DEPLOYMENT = "unipool-serve"


@functools.lru_cache(maxsize=None)
def render(path: str) -> tuple[dict, ...]:
    out = run([tool("kubectl"), "kustomize", str(KUSTOMIZE / path)])
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def objects(path: str, kind: str) -> list[dict]:
    return [copy.deepcopy(d) for d in render(path) if d["kind"] == kind]


def one(path: str, kind: str) -> dict:
    found = objects(path, kind)
    assert len(found) == 1, f"{path}: expected one {kind}, found {len(found)}"
    return found[0]


def container(path: str) -> dict:
    pod = one(path, "Deployment")["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == DEPLOYMENT]
    return c


def test_every_overlay_is_checked():
    on_disk = sorted(p.parent.name for p in (KUSTOMIZE / "overlays").glob("*/kustomization.yaml"))
    assert on_disk == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", [f"overlays/{o}" for o in OVERLAYS] + ["prometheus-adapter"])
def test_renders_and_validates(overlay):
    docs = render(overlay)
    assert docs, f"{overlay} rendered nothing"
    for doc in docs:
        name = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] in {"monitoring.coreos.com/v1", "keda.sh/v1alpha1"}, name
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {e.message} at {list(e.path)}", pytrace=False)
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1, f"{overlay}: objects spread over namespaces {namespaces}"


def test_validator_works_offline_and_rejects_bad_objects():
    bad = one("overlays/gpu", "Deployment")
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    typo = one("overlays/gpu", "Service")
    typo["spec"]["selectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_pod_wiring(overlay):
    path = f"overlays/{overlay}"
    dep = one(path, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(path)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # Probes: /health for startup and liveness, /ready for readiness, on the served port.
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 8000 and arg_value(c["args"], "--port") == "8000"
    assert arg_value(c["args"], "--host") == "0.0.0.0"

    # /dev/shm is an in-memory emptyDir.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # Every mount has its volume.
    assert set(mounts.values()) <= set(volumes)

    # Steering profiles from the ConfigMap, read-only.
    steering = volumes[mounts["/steering"]]
    assert steering["configMap"]["name"] == "unipool-steering"

    # Keys come from a Secret through $(VAR) in args; every $(VAR) is defined.
    env = {e["name"]: e for e in c["env"]}
    used = set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
    assert {"UNIPOOL_API_KEY", "UNIPOOL_ADMIN_KEY"} <= used
    assert used <= set(env)
    secrets = {env[v]["valueFrom"]["secretKeyRef"]["name"] for v in used}
    assert len(secrets) == 1
    assert arg_value(c["args"], "--api-key") == "$(UNIPOOL_API_KEY)"
    assert arg_value(c["args"], "--admin-key") == "$(UNIPOOL_ADMIN_KEY)"

    # Not root.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False

    # The Service and the PDB select exactly these pods, on the named port.
    svc = one(path, "Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports) | set(ports.values())
    pdb = one(path, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]

    assert c["image"] != "unipool-serve", f"{overlay} leaves the placeholder image name"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_fits_the_termination_grace_period(overlay):
    # SIGTERM comes after preStop; the server then drains for --grace-period seconds (its /ready
    # turns 503 at once, which the readiness probe sees within period x threshold seconds).
    path = f"overlays/{overlay}"
    pod = one(path, "Deployment")["spec"]["template"]["spec"]
    c = container(path)
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(arg_value(c["args"], "--grace-period"))
    assert 0 < pause and 0 < drain
    assert pause + drain + 10 <= pod["terminationGracePeriodSeconds"]
    probe = c["readinessProbe"]
    assert probe["httpGet"]["path"] == "/ready" and probe["periodSeconds"] * probe["failureThreshold"] <= drain


def gpus(c: dict) -> tuple[str | None, str | None]:
    return (c["resources"].get("requests", {}).get("nvidia.com/gpu"),
            c["resources"].get("limits", {}).get("nvidia.com/gpu"))


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlays_take_gpus_and_the_model_pvc(overlay):
    path = f"overlays/{overlay}"
    c = container(path)
    want = "2" if overlay == "gpu-tp2" else "1"
    assert gpus(c) == (want, want)
    tp = arg_value(c["args"], "--tensor-parallel-size")
    assert tp == (want if overlay == "gpu-tp2" else None)
    assert arg_value(c["args"], "--model") == "/models"

    pod = one(path, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert mounts["/models"]["readOnly"] is True
    assert claim in {p["metadata"]["name"] for p in objects(path, "PersistentVolumeClaim")}

    # Prometheus Operator scrapes the Service's named port at /metrics.
    sm = one(path, "ServiceMonitor")
    svc = one(path, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_cpu_demo_needs_no_gpu_and_no_pvc():
    path = "overlays/cpu-demo"
    docs = render(path)
    c = container(path)
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(docs))
    assert not objects(path, "PersistentVolumeClaim")
    pod = one(path, "Deployment")["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    assert "/models" not in {m["mountPath"] for m in c["volumeMounts"]}
    assert "tolerations" not in pod
    assert "cpu" in c["image"].rsplit(":", 1)[-1]
    assert arg_value(c["args"], "--model") is None, "the demo serves the bundled model"
    # The demo Secret exists and the pod reads it (kustomize renames it with a hash).
    (secret,) = objects(path, "Secret")
    env = {e["name"]: e for e in c["env"]}
    assert env["UNIPOOL_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert {"api-key", "admin-key"} <= set(secret["data"])


def test_gpu_tp2_gives_shared_memory_room():
    def shm(overlay):
        pod = one(f"overlays/{overlay}", "Deployment")["spec"]["template"]["spec"]
        return {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"]
    assert shm("gpu-tp2") != shm("gpu")


def adapter_rules() -> list[dict]:
    (cm,) = objects("prometheus-adapter", "ConfigMap")
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def test_hpa_reads_the_metric_the_adapter_serves():
    path = "overlays/gpu-hpa"
    dep = one(path, "Deployment")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = one(path, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    served = {r["name"]["as"]: r for r in adapter_rules()}
    rule = served[metric["pods"]["metric"]["name"]]
    assert promql_metric_names(rule["seriesQuery"]) == {"vllm:num_requests_waiting"}
    assert re.fullmatch(rule["name"]["matches"], "vllm:num_requests_waiting")
    assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_keda_scaled_object_is_complete():
    path = "overlays/gpu-keda"
    dep = one(path, "Deployment")
    assert "replicas" not in dep["spec"], "KEDA owns the replica count"
    assert not objects(path, "HorizontalPodAutoscaler"), "use KEDA or the HPA, not both"
    so = one(path, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["metadata"]["namespace"] == dep["metadata"]["namespace"]
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert meta["serverAddress"].startswith("http")
    assert promql_metric_names(meta["query"]) == {"vllm:num_requests_waiting"}
    assert f'namespace="{dep["metadata"]["namespace"]}"' in meta["query"]
    assert float(meta["threshold"]) > 0


def test_manifest_promql_uses_exported_metrics():
    queries = [r["seriesQuery"] for r in adapter_rules()]
    queries += [t["metadata"]["query"] for t in one("overlays/gpu-keda", "ScaledObject")["spec"]["triggers"]]
    for q in queries:
        assert promql_metric_names(q) <= exported_metric_names(), q


def test_cpu_demo_overlay_agrees_with_the_cpu_image():
    """Image name, port, probe paths, user, environment: the overlay's pod against Dockerfile.cpu
    (tests/image makes the same comparison against a built image's own configuration)."""
    from image_contract import from_dockerfile, overlay_disagreements

    from unipool_serve.server.cli import our_parser

    path = "overlays/cpu-demo"
    pod = one(path, "Deployment")["spec"]["template"]["spec"]
    c = container(path)
    assert overlay_disagreements(from_dockerfile(), pod, c) == []
    # Every argument the overlay passes is one of unipool-serve's own flags (none falls through to vLLM).
    ours, rest = our_parser().parse_known_args(c["args"])
    assert rest == [] and ours.model is None


def test_the_image_comparison_catches_a_mismatch():
    from image_contract import from_dockerfile, overlay_disagreements

    path = "overlays/cpu-demo"
    pod = one(path, "Deployment")["spec"]["template"]["spec"]
    c = container(path)
    image = from_dockerfile()
    pod["securityContext"]["runAsUser"] = 1000
    c["image"] = "unipool-serve:latest"
    c["readinessProbe"]["httpGet"]["path"] = "/health"
    c["env"].append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": "4"})
    image.exposed_ports = {8080}
    found = " | ".join(overlay_disagreements(image, pod, c))
    for what in ("runAsUser", "unipool-serve:latest", "readinessProbe", "VLLM_CPU_KVCACHE_SPACE", "EXPOSE"):
        assert what in found, what
