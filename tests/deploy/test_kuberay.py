"""deploy/kuberay: the fleet scan's RayJob. KubeRay's resource is not in the Kubernetes schemas, so its pod
templates are validated as core PodTemplates, its own fields against the ray.io/v1 RayJob fields it may use
(a misspelled field is an error, as the CRD's structural schema makes it), and its entrypoint against the CLI."""

from __future__ import annotations

import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAYJOB = ROOT / "deploy" / "kuberay" / "fleet-rayjob.yaml"
KUBERNETES_VERSION = "1.30.0"

_OBJECT = {"type": "object"}
_STARTPARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # ray start flags: strings only
_GROUP = {"rayStartParams": _STARTPARAMS, "template": _OBJECT}
# the subset of KubeRay v1's RayJob and RayCluster spec this project may use, closed against typos
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _OBJECT,
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer"}, "activeDeadlineSeconds": {"type": "integer"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "backoffLimit": {"type": "integer"}, "runtimeEnvYAML": {"type": "string"},
                "rayClusterSpec": {
                    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "headGroupSpec": {"type": "object", "additionalProperties": False,
                                          "required": ["rayStartParams", "template"], "properties": _GROUP},
                        "workerGroupSpecs": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "required": ["groupName", "rayStartParams", "template"],
                            "properties": {**_GROUP, "groupName": {"type": "string"},
                                           **{k: {"type": "integer", "minimum": 0}
                                              for k in ("replicas", "minReplicas", "maxReplicas")}}}},
                    }},
            }},
    },
}


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _templates(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}


def test_the_rayjob_uses_only_kuberay_fields_and_its_pods_are_valid_kubernetes(rayjob: dict) -> None:
    jsonschema.validate(rayjob, RAYJOB_SCHEMA)
    for name, template in _templates(rayjob).items():
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"fleet-{name}"},
               "template": template}
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_misspelled_field_would_be_caught(rayjob: dict) -> None:
    bad = yaml.safe_load(RAYJOB.read_text())
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB_SCHEMA)


@pytest.mark.torch  # trojan-forensics' parser
def test_the_entrypoint_is_a_valid_fleet_scan_of_the_mounted_registry_on_the_jobs_cluster(rayjob: dict) -> None:
    from offline.cli import build_parser

    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[0] == "trojan-forensics"
    args = build_parser().parse_args(words[1:])
    assert args.command == "fleet" and args.address == "auto" and args.quiet
    head = _templates(rayjob)["head"]["spec"]
    mounts = {m["mountPath"]: m for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    for source in [*args.models, args.data]:  # read-only volumes on the head, where the driver runs
        mount = next(m for path, m in mounts.items() if source.startswith(path))
        assert mount.get("readOnly") and volumes[mount["name"]]["persistentVolumeClaim"]["readOnly"]
    out = next(m for path, m in mounts.items() if args.out.startswith(path + "/"))
    assert "persistentVolumeClaim" in volumes[out["name"]] and not out.get("readOnly")
    # each scan's CPUs fit a worker, and the head runs no scans
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        cpus = int(group["rayStartParams"]["num-cpus"])
        assert cpus >= args.cpus_per_task and cpus % args.cpus_per_task == 0
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["cpu"] == str(cpus)
    from importlib.metadata import version

    assert cluster["rayVersion"] == version("ray")  # the image's Ray is the extra's (pinned in constraints.txt)


def test_every_ray_container_runs_unprivileged_with_writable_scratch_only(rayjob: dict) -> None:
    for name, template in _templates(rayjob).items():
        pod = template["spec"]
        assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"], name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] and context["allowPrivilegeEscalation"] is False, name
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert "emptyDir" in mounts["/tmp"] and mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", name
