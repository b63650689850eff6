"""The guard bundle: the only contract between the offline job and the sidecar.

A directory holding ``guard.json`` (this module's schema), the model as ONNX
with outputs ``logits`` and ``features``, and the clean STRIP pool as ``.npy``.
Loading validates the schema strictly (unknown or missing fields are errors) and
verifies every checksum; a bundle that fails is refused with a
:class:`BundleError` naming the file and the mismatch. :func:`write_bundle`
writes a complete bundle next to the destination and swaps it in with renames,
so a reader never sees half a bundle and a killed writer never destroys the
good bundle that was there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
MANIFEST = "guard.json"


class BundleError(Exception):
    """A bundle that cannot be used, with the file and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = Field("model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
                      description="name clients use to address the model")
    file: str = Field(description="ONNX file inside the bundle")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=17)
    format: Literal["onnx"] = "onnx"


class InputSpec(_Strict):
    name: str
    shape: list[int] = Field(description="with -1 for the batch axis, e.g. [-1, 1, 28, 28]")
    datatype: Literal["FP32"] = "FP32"
    value_range: tuple[float, float] = (0.0, 1.0)


class OutputSpec(_Strict):
    logits: str = "logits"
    features: str = "features"


class CleanStats(_Strict):
    count: int
    mean: float
    std: float
    min: float
    max: float


class StripSpec(_Strict):
    pool_file: str
    pool_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    n: int = Field(ge=1)
    blend_rule: Literal["add", "average"] = "add"
    threshold: float
    threshold_rule: Literal["quantile", "normal"]
    thresholds: dict[Literal["quantile", "normal"], float]
    target_frr: float = Field(gt=0, lt=1)
    clean_entropy: CleanStats
    calibration_scores: list[float] = Field(description="clean entropies the threshold came from")
    classes: list[int] = Field(default_factory=list, description="STRIP judges only inputs the model answers "
                               "with one of these classes (the suspected targets); empty: every input")


class ActivationFilterSpec(_Strict):
    layer: str
    neurons: list[int] = Field(min_length=1)
    threshold: float
    target_fpr: float = Field(gt=0, lt=1)
    clean_score: CleanStats
    calibration_scores: list[float]
    weights: list[float] = Field(default_factory=list, description="score = weighted sum of the neurons' "
                                 "activations (a linear discriminant); empty: their mean")

    @model_validator(mode="after")
    def _weights_match(self) -> ActivationFilterSpec:
        if self.weights and len(self.weights) != len(self.neurons):
            raise ValueError(f"activation_filter has {len(self.weights)} weights for {len(self.neurons)} neurons")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError("activation_filter weights must be finite numbers")
        return self


def filter_kind(neurons: list[int], weights: list[float]) -> str:
    """What an activation filter scores, in words: a discriminant over the layer, or a mean of neurons."""
    if weights:
        return f"linear discriminant over {len(neurons)} units"
    return f"mean of {len(neurons)} neuron(s) {list(neurons[:8])}{' ...' if len(neurons) > 8 else ''}"


class ScanSpec(_Strict):
    method: str
    # the scale the anomaly index was taken on; bundles written before the field existed used the linear one
    anomaly_scale: Literal["log", "linear"] = "linear"
    anomaly_index: list[float]
    flagged_classes: list[int]
    threshold: float


class Provenance(_Strict):
    source_model: str
    source_model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tool_version: str
    created: str


class GuardManifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelSpec
    input: InputSpec
    outputs: OutputSpec = OutputSpec()
    class_names: list[str] = Field(min_length=2)
    policy: Literal["enforce", "flag", "shadow"] = Field(
        "enforce", description="what the guard does with a flagged request unless --policy says otherwise")
    strip: StripSpec
    activation_filter: ActivationFilterSpec
    scan: ScanSpec
    repair: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict, description="FRR/FAR on a held-out split")
    provenance: Provenance

    @model_validator(mode="after")
    def _strip_classes_exist(self) -> GuardManifest:
        unknown = [k for k in self.strip.classes if not 0 <= k < len(self.class_names)]
        if unknown:
            raise ValueError(f"strip.classes {unknown} are not classes of this model (0..{len(self.class_names) - 1})")
        return self


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _inside(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{root / MANIFEST}: file '{name}' points outside the bundle")
    return path


class GuardBundle:
    """A verified bundle: the manifest plus resolved, checksum-verified files."""

    def __init__(self, root: Path, manifest: GuardManifest, pool: np.ndarray) -> None:
        self.root = root
        self.manifest = manifest
        self.pool = pool

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model.file

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the checksum of its manifest."""
        return sha256_file(self.root / MANIFEST)

    @classmethod
    def load(cls, root: str | Path) -> GuardBundle:
        """Read, validate and verify a bundle directory; raise :class:`BundleError` if it fails."""
        root = Path(root)
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: bundle directory not found")
        if not manifest_path.is_file():
            raise BundleError(f"{manifest_path}: missing; not a guard bundle")
        try:
            raw = json.loads(manifest_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
        if isinstance(raw, dict) and raw.get("schema_version") not in (None, SCHEMA_VERSION):
            raise BundleError(
                f"{manifest_path}: schema version {raw.get('schema_version')} is not supported "
                f"(this guard reads version {SCHEMA_VERSION})"
            )
        try:
            manifest = GuardManifest.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise BundleError(f"{manifest_path}: field '{where}': {first['msg']}"
                              + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")) from exc
        for name, expected in ((manifest.model.file, manifest.model.sha256),
                               (manifest.strip.pool_file, manifest.strip.pool_sha256)):
            path = _inside(root, name)
            if not path.is_file():
                raise BundleError(f"{path}: missing from the bundle")
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(f"{path}: SHA-256 mismatch (guard.json says {expected[:12]}..., "
                                  f"file is {actual[:12]}...); the file was changed or truncated")
        try:
            pool = np.load(_inside(root, manifest.strip.pool_file), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise BundleError(f"{root / manifest.strip.pool_file}: not a readable .npy array ({exc})") from exc
        expected_shape = tuple(manifest.input.shape[1:])
        if pool.ndim != 4 or tuple(pool.shape[1:]) != expected_shape or pool.dtype != np.float32:
            raise BundleError(f"{root / manifest.strip.pool_file}: STRIP pool must be float32 (P, "
                              f"{', '.join(map(str, expected_shape))}), got {pool.dtype} {pool.shape}")
        if len(pool) < manifest.strip.n:
            raise BundleError(f"{root / manifest.strip.pool_file}: {len(pool)} pool images, fewer than "
                              f"STRIP's n={manifest.strip.n}")
        return cls(root, manifest, pool)

    def describe(self) -> str:
        """Human-readable summary for ``trojan-guard inspect``."""
        m = self.manifest
        af = m.activation_filter
        lines = [
            f"bundle      {self.root} (schema {m.schema_version}, manifest sha256 {self.sha256[:16]}...)",
            f"model       '{m.model.name}' {m.model.file} (ONNX opset {m.model.opset}, "
            f"sha256 {m.model.sha256[:16]}...) verified",
            f"input       {m.input.name} {m.input.datatype} {m.input.shape} in "
            f"[{m.input.value_range[0]:g}, {m.input.value_range[1]:g}]",
            f"classes     {len(m.class_names)}: {', '.join(m.class_names[:12])}"
            + (" ..." if len(m.class_names) > 12 else ""),
            f"scan        {m.scan.method}: flagged {m.scan.flagged_classes or 'none'} "
            f"(max anomaly index {max(m.scan.anomaly_index):.2f} on the {m.scan.anomaly_scale} scale, "
            f"threshold {m.scan.threshold:g})",
            f"STRIP       n={m.strip.n}, blend '{m.strip.blend_rule}', entropy threshold "
            f"{m.strip.threshold:.4f} ({m.strip.threshold_rule}) at target FRR {m.strip.target_frr:.1%}; "
            + (f"judges inputs answered as {[m.class_names[k] for k in m.strip.classes]}; " if m.strip.classes
               else "") + f"pool {len(self.pool)} images (sha256 verified)",
            f"act-filter  layer '{af.layer}', {filter_kind(af.neurons, af.weights)}, threshold "
            f"{af.threshold:.4f} at target FPR {af.target_fpr:.1%}",
            f"policy      {m.policy}",
            f"provenance  source {m.provenance.source_model} (sha256 {m.provenance.source_model_sha256[:16]}...), "
            f"{m.provenance.tool_version}, {m.provenance.created}",
        ]
        if m.repair:
            lines.insert(5, f"repair      {m.repair.get('method', '?')}: "
                            + ", ".join(f"{k} {v}" for k, v in m.repair.get("summary", {}).items()))
        return "\n".join(lines)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(dest: str | Path, manifest: GuardManifest, files: dict[str, Path | bytes | np.ndarray],
                 extra_dirs: dict[str, Path] | None = None) -> Path:
    """Write a complete bundle to ``dest`` atomically.

    ``files`` maps names inside the bundle to a source path, raw bytes or an
    array (saved as ``.npy``). The manifest's checksums must match them: the
    bundle is loaded and verified before it replaces anything at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.staging-"))
    try:
        for name, content in files.items():
            target = _inside(staging, name)
            if isinstance(content, np.ndarray):
                with open(target, "wb") as fh:
                    np.save(fh, content, allow_pickle=False)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, _inside(staging, name))
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        GuardBundle.load(staging)  # never publish a bundle the guard would refuse
        _fsync_dir(staging)
        if dest.exists():
            retired = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            os.replace(dest, retired / "bundle")
            os.replace(staging, dest)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
