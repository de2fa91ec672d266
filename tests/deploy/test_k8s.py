"""deploy/k8s renders (our renderer, and `kubectl kustomize` where installed: they must agree), every
object validates against the Kubernetes 1.35 schemas (strict: unknown fields fail), and the objects
fit together and fit the server's drain."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.commands.serve import SHUTDOWN_GRACE_S
from service.settings import Settings
from tests.deploy.kustomize import KustomizeError, Object, key, merge, render, set_image, split_image

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.35.0"  # the schema version the manifests must validate against
TARGETS = ["base", "overlays/cpu", "overlays/gpu"]


def objects_by_key(objects: list[Object]) -> dict[tuple[str, str], Object]:
    return {key(obj): obj for obj in objects}


def rendered(target: str) -> dict[tuple[str, str], Object]:
    return objects_by_key(render(K8S / target))


def pod_spec(objects: dict[tuple[str, str], Object], name: str) -> Object:
    return objects[("Deployment", name)]["spec"]["template"]["spec"]


def env_of(container: Object) -> dict[str, Object]:
    return {item["name"]: item for item in container.get("env", [])}


def validate(obj: Object) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_validates(target: str) -> None:
    objects = render(K8S / target)
    assert {obj["kind"] for obj in objects} == {"ConfigMap", "Secret", "Deployment", "Service",
                                                "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize("example", sorted(p.name for p in (K8S / "examples").glob("*.yaml")))
def test_examples_validate(example: str) -> None:
    for obj in yaml.safe_load_all((K8S / "examples" / example).read_text()):
        validate(obj)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("target", TARGETS)
def test_our_renderer_agrees_with_kubectl_kustomize(target: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert objects_by_key([d for d in yaml.safe_load_all(out.stdout) if d]) == rendered(target)


def test_a_broken_replicas_value_is_caught() -> None:
    api = rendered("overlays/cpu")[("Deployment", "vss-api")]
    broken = merge(api, {"spec": {"replicas": "two"}})
    with pytest.raises(kubernetes_validate.ValidationError, match="replicas"):
        validate(broken)
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: a misspelt field is an error
        validate(merge(api, {"spec": {"replica": 2}}))


def test_a_broken_overlay_is_caught(tmp_path: Path) -> None:
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "cpu"
    (overlay / "replicas.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: vss-api}\n"
                                           "spec: {replicas: two}\n")
    spec = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    spec["patches"].append({"path": "replicas.yaml"})
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    api = objects_by_key(render(overlay))[("Deployment", "vss-api")]
    assert api["spec"]["replicas"] == "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(api)
    (overlay / "replicas.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: vss-apii}\n")
    with pytest.raises(KustomizeError, match="matches 0 objects"):
        render(overlay)
    spec["namePrefix"] = "x-"
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(KustomizeError, match="unsupported keys"):
        render(overlay)


@pytest.mark.parametrize("target", TARGETS)
def test_the_api_pods_drain_within_their_grace_period(target: str) -> None:
    objects = rendered(target)
    pod = pod_spec(objects, "vss-api")
    (container,) = pod["containers"]
    assert container["args"] == ["serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    config = objects[("ConfigMap", "vss-config")]["data"]
    drain = float(config["VSS_DRAIN_TIMEOUT_S"])
    assert Settings(drain_timeout_s=config["VSS_DRAIN_TIMEOUT_S"]).drain_timeout_s == drain
    # preStop, then the drain, then uvicorn's shutdown, with room for the engine to stop
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + SHUTDOWN_GRACE_S + 5
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= drain  # not ready long before the cut


@pytest.mark.parametrize("target", TARGETS)
def test_the_pieces_fit_together(target: str) -> None:
    objects = rendered(target)
    api, worker = objects[("Deployment", "vss-api")], objects[("Deployment", "vss-worker")]
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    for selector in (api["spec"]["selector"]["matchLabels"], objects[("Service", "vss")]["spec"]["selector"],
                     objects[("PodDisruptionBudget", "vss-api")]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= api_labels.items()
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert not objects[("Service", "vss")]["spec"]["selector"].items() <= worker_labels.items()
    port_names = {p["name"] for p in pod_spec(objects, "vss-api")["containers"][0]["ports"]}
    assert objects[("Service", "vss")]["spec"]["ports"][0]["targetPort"] in port_names
    assert objects[("HorizontalPodAutoscaler", "vss-api")]["spec"]["scaleTargetRef"]["name"] == "vss-api"

    config = objects[("ConfigMap", "vss-config")]["data"]
    assert all(isinstance(v, str) for v in config.values())
    assert config["VSS_MODEL_DIR"].startswith("s3://") and config["VSS_BUFFER_DIR"].startswith("s3://")
    assert config["VSS_WORKER"] == "external"
    secret = objects[("Secret", "vss-secrets")]["stringData"]
    for name in ("vss-api", "vss-worker"):
        pod = pod_spec(objects, name)
        (container,) = pod["containers"]
        assert {"configMapRef": {"name": "vss-config"}} in container["envFrom"]
        env = env_of(container)
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[variable]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "vss-secrets" and ref["key"] in secret
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        assert mounts[config["VSS_CACHE_DIR"]] in empty_dirs  # each pod caches versions on its own disk
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert env_of(pod_spec(objects, "vss-api")["containers"][0])["VSS_API_KEY"]["valueFrom"]["secretKeyRef"][
        "key"] in secret
    assert "VSS_API_KEY" not in env_of(pod_spec(objects, "vss-worker")["containers"][0])
    assert pod_spec(objects, "vss-worker")["containers"][0]["args"] == ["worker"]


def test_the_overlays_pick_their_image_and_hardware() -> None:
    cpu, gpu = rendered("overlays/cpu"), rendered("overlays/gpu")
    for name in ("vss-api", "vss-worker"):
        cpu_container = pod_spec(cpu, name)["containers"][0]
        gpu_pod = pod_spec(gpu, name)
        gpu_container = gpu_pod["containers"][0]
        assert cpu_container["image"] == "vss:cpu" and gpu_container["image"] == "vss:gpu"
        assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
        assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
        assert "nodeSelector" not in pod_spec(cpu, name)
        # the patch kept what it did not mention
        assert gpu_container["envFrom"] == cpu_container["envFrom"]
        assert gpu_container["volumeMounts"] == cpu_container["volumeMounts"]
    assert cpu[("ConfigMap", "vss-config")]["data"]["VSS_DEVICE"] == "cpu"
    assert gpu[("ConfigMap", "vss-config")]["data"]["VSS_DEVICE"] == "cuda"
    cpu_threads = int(cpu[("ConfigMap", "vss-config")]["data"]["VSS_INTRA_OP_THREADS"])
    assert cpu_threads == int(pod_spec(cpu, "vss-api")["containers"][0]["resources"]["limits"]["cpu"])
    (metric,) = gpu[("HorizontalPodAutoscaler", "vss-api")]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "vss_stream_sessions"  # a gauge service/metrics.py exports
    assert cpu[("HorizontalPodAutoscaler", "vss-api")]["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_strategic_merge_and_images() -> None:
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["x", "y"]},
                           {"name": "b"}],
            "tolerations": [{"key": "k"}], "drop": 1}
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}], "args": ["z"]},
                            {"name": "c"}],
             "tolerations": [{"key": "t"}], "drop": None}
    assert merge(base, patch) == {
        "containers": [{"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
                        "args": ["z"]}, {"name": "b"}, {"name": "c"}],
        "tolerations": [{"key": "t"}]}
    assert base["drop"] == 1  # inputs untouched
    assert split_image("registry:5000/team/vss:1.2@sha256:ab") == ("registry:5000/team/vss", "1.2", "sha256:ab")
    assert split_image("registry:5000/vss") == ("registry:5000/vss", None, None)
    deployment = {"kind": "Deployment", "spec": {"template": {"spec": {"containers": [
        {"name": "a", "image": "vss:latest"}, {"name": "b", "image": "other:1"}]}}}}
    out = set_image(deployment, {"name": "vss", "newName": "reg.example/vss", "newTag": "gpu"})
    assert [c["image"] for c in out["spec"]["template"]["spec"]["containers"]] == ["reg.example/vss:gpu", "other:1"]
