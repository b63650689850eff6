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
import io
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, create_model, model_validator

from guard.errors import BundleError
from guard.screens.registry import BY_NAME, DETECTORS
from guard.screens.spec import BundleReader
from guard.screens.spec import Strict as _Strict
from guard.screens.verdict import FITTED_ONLY
from guard.signing import MANIFEST, SIGNATURE, Signed, key_id, load_private_key, sign, verify

SCHEMA_VERSION = 2


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


class PoolSpec(_Strict):
    file: str = Field(description=".npy (P, C, H, W) float32 clean images: STRIP's overlays, the warm-up input")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Guarantee(_Strict):
    calibration_images: int = Field(ge=1)
    flag_rank: int = Field(ge=0)
    expected_frr: float
    smallest_frr: float
    frr_upper_95: float = Field(description="95 % upper bound of the clean refusal rate given this calibration draw")


class VerdictSpec(_Strict):
    frr: float = Field(gt=0, lt=1, description="the share of clean traffic the guard may refuse, in total")
    rule: Literal["cauchy", "fisher", "fisher-cauchy", "min"] = "fisher"
    p_values: Literal["bag", "fitted"] = Field("bag", description="bag: each detector's p-value is its rank "
                                               "among the calibration images with the input (full conformal); "
                                               "fitted: a tail probability against its reference scores, the "
                                               "combined statistic ranked among the calibration images' (split "
                                               "conformal)")
    detectors: list[Literal[tuple(BY_NAME)]] = Field(min_length=1)  # type: ignore[valid-type]
    classes: list[int] = Field(default_factory=list, description="only inputs the model answers with one of "
                               "these classes can be refused (the suspected targets); empty: every input")
    calibration_classes: list[int] = Field(description="the class the model answered each calibration image with")
    guarantee: Guarantee

    @model_validator(mode="after")
    def _rule_fits_p_values(self) -> VerdictSpec:
        if self.rule in FITTED_ONLY and self.p_values != "fitted":
            raise ValueError(f"the {self.rule} rule needs fitted p-values (p_values is {self.p_values!r})")
        return self


class ScanSpec(_Strict):
    method: str
    # the scale the anomaly index was taken on; bundles written before the field existed used the linear one
    anomaly_scale: Literal["log", "linear"] = "linear"
    anomaly_index: list[float]
    flagged_classes: list[int]
    threshold: float


class Attachment(_Strict):
    file: str = Field(description="a file of the bundle the guard does not read (the forensic report's)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Provenance(_Strict):
    source_model: str
    source_model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tool_version: str
    created: str


class _Manifest(_Strict):
    schema_version: Literal[2] = SCHEMA_VERSION
    bundle_version: int = Field(0, ge=0, description="set by the signer ('patch --bundle-version'; default the "
                                "creation time in Unix seconds), under the signature: the guard refuses a bundle "
                                "below --min-bundle-version, and a reload below the serving one; bundles written "
                                "before the field are version 0")
    model: ModelSpec
    input: InputSpec
    outputs: OutputSpec = OutputSpec()
    class_names: list[str] = Field(min_length=2)
    policy: Literal["enforce", "flag", "shadow"] = Field(
        "enforce", description="what the guard does with a flagged request unless --policy says otherwise")
    clean_pool: PoolSpec
    verdict: VerdictSpec
    scan: ScanSpec
    repair: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict, description="FRR/FAR on a held-out split")
    provenance: Provenance
    attachments: list[Attachment] = Field(default_factory=list, description="every other file of the bundle "
                                          "(the forensic report) with its SHA-256, so that the signature over "
                                          "guard.json covers them too; a file the manifest does not list is "
                                          "refused")

    @model_validator(mode="after")
    def _verdict_matches_detectors(self) -> _Manifest:
        k = len(self.class_names)
        unknown = [c for c in self.verdict.classes if not 0 <= c < k]
        if unknown:
            raise ValueError(f"verdict.classes {unknown} are not classes of this model (0..{k - 1})")
        n = len(self.verdict.calibration_classes)
        for name in self.verdict.detectors:
            section = BY_NAME[name].section
            spec = getattr(self, section)
            if spec is None:
                raise ValueError(f"the verdict combines '{name}' but the bundle has no {section} section")
            if len(spec.calibration_scores) != n:
                raise ValueError(f"{section} has {len(spec.calibration_scores)} calibration scores, the verdict "
                                 f"{n} calibration images")
            if self.verdict.p_values == "fitted" and len(spec.reference_scores) < 20:
                raise ValueError(f"the verdict's p-values are fitted but {section} has "
                                 f"{len(spec.reference_scores)} reference scores (at least 20)")
            spec.check(k)
        extra = [d.section for d in DETECTORS if getattr(self, d.section) is not None
                 and d.name not in self.verdict.detectors]
        if extra:
            raise ValueError(f"section(s) {extra} are not among the verdict's detectors")
        return self

    def detector_specs(self) -> list[tuple[type, Any]]:
        """The verdict's detectors, in its order: (detector class, its section)."""
        return [(BY_NAME[name], getattr(self, BY_NAME[name].section)) for name in self.verdict.detectors]

    def files(self) -> list[tuple[str, str]]:
        """Every file the manifest names, with its SHA-256."""
        out = [(self.model.file, self.model.sha256), (self.clean_pool.file, self.clean_pool.sha256)]
        for _, spec in self.detector_specs():
            out += spec.files()
        return out + [(a.file, a.sha256) for a in self.attachments]


# one optional section per registered detector (guard.screens.registry)
GuardManifest = create_model("GuardManifest", __base__=_Manifest, __module__=__name__,
                             **{d.section: (d.Spec | None, None) for d in DETECTORS})


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_file(path: str | Path) -> bytes:
    """A plain file's bytes, read once; a symbolic link is refused (:class:`BundleError`), never followed."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: missing from the bundle") from exc
    except OSError as exc:
        if path.is_symlink():
            raise BundleError(f"{path}: a symbolic link; a bundle holds only plain files") from exc
        raise BundleError(f"{path}: unreadable ({exc})") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise BundleError(f"{path}: not a plain file")
        return fh.read()


def _only_listed(root: Path, listed: set[str]) -> None:
    """Refuse a link, or a file that guard.json does not list, anywhere in the bundle."""
    for here, dirs, names in os.walk(root):
        for name in sorted(dirs + names):
            path = Path(here) / name
            if path.is_symlink():
                raise BundleError(f"{path}: a symbolic link; a bundle holds only plain files")
            rel = path.relative_to(root).as_posix()
            if name in names and rel not in listed:
                raise BundleError(f"{path}: not listed in guard.json; every file of a bundle is under its manifest "
                                  f"(and so its signature); a bundle written before trojan-forensics listed its "
                                  f"report: run 'trojan-forensics patch' again (a kept work directory reuses its "
                                  f"phases)")


def _inside(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{root / MANIFEST}: file '{name}' points outside the bundle")
    return path


class GuardBundle:
    """A verified bundle: the manifest plus its checksum-verified arrays."""

    def __init__(self, root: Path, manifest: GuardManifest, pool: np.ndarray,
                 arrays: dict[str, dict[str, np.ndarray]] | None = None, sha256: str | None = None,
                 signed: Any = None, manifest_bytes: bytes | None = None, model_bytes: bytes | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.pool = pool
        self.arrays = arrays or {}
        self._sha256 = sha256
        self.signed = signed  # guard.signing.Signed when verified against trusted keys
        self.manifest_bytes = manifest_bytes  # the guard.json bytes that were verified and parsed
        self.model_bytes = model_bytes  # the ONNX bytes that were verified: served from memory, never reread

    @property
    def model_source(self) -> bytes | Path:
        """What a backend loads the model from: the verified bytes (a loaded bundle), else the file."""
        return self.model_bytes if self.model_bytes is not None else self.model_path

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model.file

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the checksum of the manifest it was loaded from."""
        return self._sha256 or sha256_file(self.root / MANIFEST)

    @classmethod
    def load(cls, root: str | Path, trusted: dict | None = None) -> GuardBundle:
        """Read, validate and verify a bundle directory; raise :class:`BundleError` if it fails.

        ``trusted`` (key id -> key, from ``guard.signing.trusted_keys``): the
        manifest must also carry a valid signature by one of those keys.
        """
        root = Path(root)
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: bundle directory not found")
        if not manifest_path.is_file():
            raise BundleError(f"{manifest_path}: missing; not a guard bundle")
        try:
            data = manifest_path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{manifest_path}: unreadable ({exc})") from exc
        signed = None
        if trusted is not None:  # before anything else is read: an unsigned bundle gets no further
            signed = verify(root, trusted, data)
        try:
            raw = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
        if isinstance(raw, dict) and raw.get("schema_version") not in (None, SCHEMA_VERSION):
            older = isinstance(raw.get("schema_version"), int) and raw["schema_version"] < SCHEMA_VERSION
            raise BundleError(
                f"{manifest_path}: schema version {raw.get('schema_version')} is not supported "
                f"(this guard reads version {SCHEMA_VERSION})"
                + ("; run 'trojan-forensics patch' again to rewrite it (a kept work directory reuses its scan)"
                   if older else ""))
        try:
            manifest = GuardManifest.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise BundleError(f"{manifest_path}: field '{where}': {first['msg']}"
                              + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")) from exc
        listed = manifest.files()
        names = [Path(name).as_posix() for name, _ in listed]
        if len(set(names)) != len(names):
            raise BundleError(f"{manifest_path}: a file is listed twice")
        for name in names:  # a name that leaves the bundle is the first thing to say
            _inside(root, name)
        _only_listed(root, {*names, MANIFEST, SIGNATURE})
        read: dict[str, bytes] = {}  # the files the guard uses, each read once: hashed and parsed from these bytes
        attachments = {a.file for a in manifest.attachments}
        for name, expected in listed:
            path = _inside(root, name)
            content = read_file(root / name)
            actual = hashlib.sha256(content).hexdigest()
            if name not in attachments:
                read[name] = content
            if actual != expected:
                raise BundleError(f"{path}: SHA-256 mismatch (guard.json says {expected[:12]}..., "
                                  f"file is {actual[:12]}...); the file was changed or truncated")
        shape = tuple(manifest.input.shape[1:])
        pool = _array(root, manifest.clean_pool.file, read, "clean pool", lambda a: a.ndim == 4 and a.shape[1:] == shape
                      and a.dtype == np.float32, f"float32 (P, {', '.join(map(str, shape))})")
        if manifest.strip and len(pool) < manifest.strip.n:
            raise BundleError(f"{root / manifest.clean_pool.file}: {len(pool)} pool images, fewer than "
                              f"STRIP's n={manifest.strip.n}")
        arrays = read_arrays(root, manifest, read)
        return cls(root, manifest, pool, arrays, hashlib.sha256(data).hexdigest(), signed, data,
                   read[manifest.model.file])

    def screen(self, seed: int = 0, sequential: bool = True, **alone: float | None):
        """The bundle's detectors and their one verdict, ready to screen (``guard.screens.Screen``).

        ``sequential=False``: STRIP draws all n blends at once even where the bundle says rounds.
        """
        from guard.screens import OneBudget, Screen

        m = self.manifest
        pairs = m.detector_specs()
        detectors = [d.from_spec(spec, self.arrays.get(d.name, {}), self, seed=seed, sequential=sequential)
                     for d, spec in pairs]
        specs = [spec for _, spec in pairs]
        budget = OneBudget(tuple(d.name for d in detectors), tuple(d.side for d in detectors),
                           np.stack([np.asarray(s.calibration_scores) for s in specs], axis=1), m.verdict.frr,
                           m.verdict.rule, tuple(m.verdict.classes), np.asarray(m.verdict.calibration_classes),
                           tuple(alone.get(n, s.alone_frr) for n, s in zip(m.verdict.detectors, specs, strict=True)),
                           reference=np.stack([np.asarray(s.reference_scores) for s in specs], axis=1)
                           if m.verdict.p_values == "fitted" else None)
        return Screen(detectors, budget)

    def describe(self) -> str:
        """Human-readable summary for ``trojan-guard inspect``."""
        m = self.manifest
        v, g = m.verdict, m.verdict.guarantee
        lines = [
            f"bundle      {self.root} (schema {m.schema_version}, version {m.bundle_version}, manifest sha256 "
            f"{self.sha256[:16]}...)",
            f"model       '{m.model.name}' {m.model.file} (ONNX opset {m.model.opset}, "
            f"sha256 {m.model.sha256[:16]}...) verified",
            f"input       {m.input.name} {m.input.datatype} {m.input.shape} in "
            f"[{m.input.value_range[0]:g}, {m.input.value_range[1]:g}]",
            f"classes     {len(m.class_names)}: {', '.join(m.class_names[:12])}"
            + (" ..." if len(m.class_names) > 12 else ""),
            f"scan        {m.scan.method}: flagged {m.scan.flagged_classes or 'none'} "
            f"(max anomaly index {max(m.scan.anomaly_index):.2f} on the {m.scan.anomaly_scale} scale, "
            f"threshold {m.scan.threshold:g})",
            f"verdict     {', '.join(v.detectors)} combined by the {v.rule} rule ({v.p_values} p-values) at one "
            f"budget of {v.frr:.1%} "
            f"clean refusals; {g.calibration_images} calibration images guarantee {g.expected_frr:.2%} "
            f"(95 % bound {g.frr_upper_95:.2%})"
            + (f"; refuses only inputs answered as {[m.class_names[k] for k in v.classes]}" if v.classes else ""),
        ]
        for d, spec in m.detector_specs():
            lines.append(f"{d.name:<11} {spec.describe(self)}")
            if spec.alone_frr is not None:
                lines.append(f"override    {d.name} also refuses on its own at {spec.alone_frr:.1%}")
        lines += [
            f"policy      {m.policy}",
            f"provenance  source {m.provenance.source_model} (sha256 {m.provenance.source_model_sha256[:16]}...), "
            f"{m.provenance.tool_version}, {m.provenance.created}",
        ]
        if m.repair:
            lines.insert(5, f"repair      {m.repair.get('method', '?')}: "
                            + ", ".join(f"{k} {v}" for k, v in m.repair.get("summary", {}).items()))
        return "\n".join(lines)


def read_arrays(root: Path, manifest: GuardManifest, read: dict[str, bytes]) -> dict[str, dict[str, np.ndarray]]:
    """Each detector's arrays, parsed from ``read`` (file name -> the bytes whose checksum was verified)."""
    reader = BundleReader(lambda name, *a: _array(root, name, read, *a), lambda name, *a: _npz(root, name, read, *a),
                          len(manifest.class_names))
    return {d.name: spec.load(reader) for d, spec in manifest.detector_specs()}


def check_bundle_version(bundle: GuardBundle, minimum: int) -> None:
    """Refuse a bundle whose signed ``bundle_version`` is below ``minimum`` (``--min-bundle-version``)."""
    if bundle.manifest.bundle_version < minimum:
        raise BundleError(f"{bundle.root / MANIFEST}: bundle_version {bundle.manifest.bundle_version} is below "
                          f"--min-bundle-version {minimum}; refused as a rollback to an older bundle")


def _array(root: Path, name: str, read: dict[str, bytes], what: str, ok, expected: str) -> np.ndarray:
    try:
        a = np.load(io.BytesIO(read[name]), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BundleError(f"{root / name}: {what} is not a readable .npy array ({exc})") from exc
    if not isinstance(a, np.ndarray) or not ok(a):
        raise BundleError(f"{root / name}: {what} must be {expected}, got {getattr(a, 'dtype', '?')} "
                          f"{getattr(a, 'shape', '?')}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise BundleError(f"{root / name}: {what} holds NaN or infinite values")
    return a


def _npz(root: Path, name: str, read: dict[str, bytes], what: str, checks: dict) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(read[name]), allow_pickle=False) as z:
            arrays = {k: z[k] for k in checks if k in z.files}
    except (ValueError, OSError) as exc:
        raise BundleError(f"{root / name}: {what} is not a readable .npz archive ({exc})") from exc
    for key, ok in checks.items():
        a = arrays.get(key)
        if a is None or not ok(a) or not np.isfinite(a).all():
            raise BundleError(f"{root / name}: {what} '{key}' is missing, misshapen or not finite")
    return arrays


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_plain(src: Path, target: Path) -> None:
    """Copy a plain file, read once; a symbolic link is refused, never followed."""
    if src.is_symlink():
        raise BundleError(f"{src}: a symbolic link; a bundle holds only plain files, so none is copied into it")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.write_bytes(read_file(src))
    except BundleError as exc:
        raise BundleError(f"{exc}; not copied into the bundle") from exc


def write_bundle(dest: str | Path, manifest: GuardManifest, files: dict[str, Path | bytes | np.ndarray],
                 extra_dirs: dict[str, Path] | None = None, signer: Callable[[Path], Any] | None = None) -> Path:
    """Write a complete bundle to ``dest`` atomically.

    ``files`` maps names inside the bundle to a source path, raw bytes or an
    array (saved as ``.npy``); ``extra_dirs`` maps names to directories copied
    whole. No symbolic link is followed or copied: one is refused with
    :class:`BundleError` naming it. The manifest must list every file with
    its checksum (``attachments`` for those the guard does not read): the
    bundle is loaded and verified before it replaces anything at ``dest``.
    ``signer`` (e.g. ``lambda staged: sign_bundle(staged, key_file)``)
    signs the complete, verified bundle in its staging directory before the
    swap, so a signing key is read only once there is a finished bundle to sign.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.staging-"))
    try:
        for name, content in files.items():
            target = _inside(staging, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, np.ndarray):
                with open(target, "wb") as fh:
                    np.save(fh, content, allow_pickle=False)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                _copy_plain(Path(content), target)
        for name, src in (extra_dirs or {}).items():
            src = Path(src)
            for here, dirs, names in os.walk(src):
                for entry in sorted(dirs + names):
                    path = Path(here) / entry
                    if path.is_symlink():
                        raise BundleError(f"{path}: a symbolic link; a bundle holds only plain files, so none is "
                                          f"copied into it")
                    if entry in names:
                        _copy_plain(path, _inside(staging, f"{name}/{path.relative_to(src).as_posix()}"))
        manifest_bytes = manifest.model_dump_json(indent=2).encode()
        (staging / MANIFEST).write_bytes(manifest_bytes)
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        GuardBundle.load(staging)  # never publish a bundle the guard would refuse
        if signer is not None:
            signer(staging)
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


def sign_bundle(root: str | Path, key_file: str | Path) -> Signed:
    """Sign a finished bundle in place: verify every file against guard.json, then sign those guard.json bytes.

    The one signing step of ``trojan-forensics sign`` and ``patch --signing-key``: it reads the bundle and,
    only once the bundle verified, the private key. ``guard.json.sig`` is replaced by a rename. Raises
    :class:`BundleError` (a bundle that does not verify is not signed) or :class:`SignatureError`.
    """
    root = Path(root)
    bundle = GuardBundle.load(root)
    key = load_private_key(key_file)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{SIGNATURE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(sign(bundle.manifest_bytes, key))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / SIGNATURE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    signed = GuardBundle.load(root, {key_id(key.public_key()): (key.public_key(), str(key_file))}).signed
    assert signed is not None
    return signed
