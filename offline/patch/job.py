"""The patch job: scan, recover, repair, export, calibrate, evaluate, and write the guard bundle.

Each phase writes its result into a work directory (``<out>.work`` by default)
as soon as it finishes; a job that is killed and started again with the same
inputs and settings picks up after the last finished phase. The bundle itself
is written last, staged beside its destination and swapped in by rename, so a
killed job never leaves half a bundle where a good one was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guard.backends import EmbeddedBackend
from guard.bundle import GuardBundle, GuardManifest, read_arrays, write_bundle
from guard.screens.registry import DETECTORS
from offline.attacks import AnyTrigger, load_trigger
from offline.data import Dataset
from offline.errors import DataError, ForensicsError
from offline.jobs import TOOL_VERSION, fingerprint, load_case, write_json_atomic
from offline.patch.calibrate import CALIBRATION_VERSION, calibrate, evaluate
from offline.patch.export import INPUT_NAME, OPSET, export_onnx
from offline.patch.ibdpsc import IBD_PSC_VERSION, add_ibd_psc_variants
from offline.patch.repair import Evaluator, RepairSettings, repair
from offline.patch.settings import CALIBRATION_IMAGES, PatchSettings
from offline.report import build_report
from offline.scan.job import scan_case
from offline.scan.settings import TRIGGER_METHODS
from offline.stamp import stamp

PHASES = ("scan", "repair", "export", "calibrate", "evaluate", "bundle")

def load_true_trigger(path: str | Path) -> tuple[AnyTrigger, int]:
    """The true trigger and target from an ``attack.json`` written by ``trojan-forensics train``."""
    path = Path(path)
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ForensicsError(f"{path}: not a usable attack.json from 'trojan-forensics train' ({exc})") from exc
    if desc.get("target") is None:
        raise ForensicsError(f"{path}: the {desc.get('label_rule') or 'clean'} model has no single target class; "
                             f"the patch job's true-trigger figures need one (bench/bench_matrix.py measures "
                             f"all-to-all attacks)")
    if desc.get("trigger") is None and not desc.get("trigger_delta_file"):
        raise ForensicsError(f"{path}: the {desc.get('attack', 'clean')} model has no trigger to measure (a "
                             f"clean-label collision targets one image: see target_image_index in it)")
    try:
        # older attack.json files name the invisible trigger's array at the top level
        delta = np.load(path.parent / desc["trigger_delta_file"]) if desc.get("trigger_delta_file") else None
        extra = {} if delta is None else {"delta": delta}
        return load_trigger(desc["trigger"], path.parent, **extra), int(desc["target"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ForensicsError(f"{path}: not a usable attack.json from 'trojan-forensics train' ({exc})") from exc


# the scan's held-out share of the clean data (where its reversed triggers' ASR is measured), fixed so that a
# new calibration share reuses a finished scan
SCAN_SHARE = 0.2


def auto_calibration_fraction(size: int, want: int = CALIBRATION_IMAGES) -> float:
    """The calibration share: ``want`` images where the data allows, between 20 and 40 % of it.

    The verdict's guarantee sharpens with calibration images (from 100 a 1 %
    budget is a single image; from 500 its 95 % bound is 1.8 %), so scarce data
    gives calibration a larger share.
    """
    return float(min(0.4, max(0.2, want / max(size, 1))))


def calibration_share(data: Dataset, s: PatchSettings) -> float:
    return s.calibration_fraction or auto_calibration_fraction(len(data))


def check_key_file(path: str | Path) -> Path:
    """A signing key that is not there fails before the job runs, not an hour later; it is not read here."""
    path = Path(path)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ForensicsError(f"--signing-key {path}: not a readable file")
    return path


def sign_finished_bundle(root: str | Path, key_file: str | Path) -> str:
    """``trojan-forensics sign``: sign a finished bundle (every file verified first); returns the key id."""
    from guard.bundle import BundleError, sign_bundle

    try:
        return sign_bundle(root, key_file).key_id
    except BundleError as exc:  # SignatureError included
        raise ForensicsError(f"not signed: {exc}") from exc


def report_files(report_dir: Path) -> dict[str, bytes]:
    """Every file of a report directory as ``report/NAME`` -> its bytes, each read once; links refused."""
    return {f"report/{rel}": data for rel, data in
            _plain_files(report_dir, "and the job copies no links into a bundle (remove it)")}


def attach(manifest: GuardManifest, files: dict[str, bytes]) -> GuardManifest:
    """The manifest listing these files with their SHA-256 as its attachments."""
    return GuardManifest.model_validate({**manifest.model_dump(), "attachments": [
        {"file": name, "sha256": hashlib.sha256(data).hexdigest()} for name, data in sorted(files.items())]})


def split_clean(data: Dataset, s: PatchSettings, share: float | None = None) -> tuple[Dataset, Dataset, Dataset]:
    """The job's stratified fit / calibration / test split of the clean data.

    Repair fine-tunes on the fit part and the guard's detectors are fitted there;
    the verdict is calibrated on the calibration part; the test part is only
    ever measured on. ``share``: the calibration share (default: the settings').
    """
    share = share or calibration_share(data, s)
    rest, test = data.split(s.test_fraction, seed=s.split_seed)
    fit, calib = rest.split(share / (1 - s.test_fraction), seed=s.split_seed + 1)
    return fit, calib, test


class _Phases:
    """Finished phases in the work directory, each keyed by a fingerprint of everything it depends on.

    A phase's fingerprint chains the previous phase's with its own settings, so
    changing, say, the calibration settings reuses the scan and the repair but
    redoes calibration and everything after it. Its record also holds the
    SHA-256 of every file the phase wrote; a finished phase is reused only
    while its directory holds exactly those files with those digests (no more,
    no links), so a file swapped in the work directory between runs is never
    read, let alone signed: the phase is redone and ``warn`` says why.
    """

    def __init__(self, work: Path, warn: Callable[[str], None]) -> None:
        self.work = work
        self.warn = warn
        self.digests: dict[str, dict[str, str]] = {}
        work.mkdir(parents=True, exist_ok=True)

    def result(self, phase: str, fingerprint: str) -> dict[str, Any] | None:
        path = self.work / phase / "result.json"
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("fingerprint") != fingerprint:
            return None
        recorded = stored.get("files")
        problem = self._changed(phase, recorded) if isinstance(recorded, dict) else \
            "its record lists no file digests (written by an older trojan-forensics)"
        if problem:
            self.warn(f"trojan-forensics: phase {phase}: {problem}; redoing the phase instead of reusing it")
            return None
        self.digests[phase] = recorded
        return stored.get("result")

    def _changed(self, phase: str, recorded: dict[str, str]) -> str | None:
        """Why the phase's files are not the ones it wrote, or None when they are."""
        try:
            found = _phase_files(self.work / phase)
        except ForensicsError as exc:
            return str(exc)
        unexpected = sorted(set(found) - set(recorded))
        if unexpected:
            return f"{self.work / phase / unexpected[0]} was not written by the phase"
        for name, expected in sorted(recorded.items()):
            if name not in found:
                return f"{self.work / phase / name} is missing"
            actual = found[name]
            if actual != expected:
                return (f"{self.work / phase / name} changed since the phase wrote it (SHA-256 recorded "
                        f"{expected[:12]}..., now {actual[:12]}...)")
        return None

    def finish(self, phase: str, fingerprint: str, result: dict[str, Any]) -> dict[str, Any]:
        (self.work / phase).mkdir(parents=True, exist_ok=True)
        files = _phase_files(self.work / phase)
        write_json_atomic(self.work / phase / "result.json", {"fingerprint": fingerprint, "result": result,
                                                               "files": files})
        self.digests[phase] = files
        return result

    def digest(self, phase: str, name: str) -> str:
        """The SHA-256 a finished phase recorded for one of its files."""
        return self.digests[phase][name]

    def read(self, phase: str, name: str) -> bytes:
        """A finished phase's file, read once and checked against its recorded digest."""
        path = self.work / phase / name
        data = _read_no_links(path)
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.digest(phase, name):
            raise ForensicsError(f"{path} changed while the job ran (SHA-256 recorded {self.digest(phase, name)[:12]}"
                                 f"..., now {actual[:12]}...); not signing it, run the job again")
        return data

    def dir(self, phase: str) -> Path:
        """A clean directory for a phase about to run."""
        path = self.work / phase
        if path.is_symlink():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def _read_no_links(path: Path) -> bytes:
    """A plain file's bytes (guard.bundle.read_file); a symbolic link is refused, never followed."""
    from guard.bundle import BundleError, read_file

    try:
        return read_file(path)
    except BundleError as exc:
        raise ForensicsError(str(exc)) from exc


def _phase_files(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under a phase directory, except its record.

    A symbolic link (to a file or a directory) or anything else that is not a
    plain file is refused with :class:`ForensicsError` naming it.
    """
    if root.is_symlink() or not root.is_dir():
        raise ForensicsError(f"{root}: not a plain directory")
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in _plain_files(root, "which no phase writes")
            if rel != "result.json"}


def _plain_files(root: Path, link_refused: str) -> Iterator[tuple[str, bytes]]:
    """(path relative to ``root``, bytes) of every file below it, each read once; a symbolic link anywhere
    (to a file or a directory) is refused with :class:`ForensicsError`: '<path> is a symbolic link, <link_refused>'."""
    for here, dirs, names in os.walk(root):
        for name in sorted(dirs + names):
            if (Path(here) / name).is_symlink():
                raise ForensicsError(f"{Path(here) / name} is a symbolic link, {link_refused}")
        for name in sorted(names):
            yield (Path(here) / name).relative_to(root).as_posix(), _read_no_links(Path(here) / name)


def run_patch(
    model_path: str | Path,
    data_spec: str,
    out: str | Path,
    *,
    settings: PatchSettings | None = None,
    features_layer: str | None = None,
    true_trigger_file: str | Path | None = None,
    work_dir: str | Path | None = None,
    fresh: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the whole offline job and write the guard bundle to ``out``; return the job summary.

    ``warn`` (default: a line on stderr) hears of finished phases that are redone because their files are
    not the ones they wrote. ``device`` runs the scan and repair there (``auto``: the GPU where torch sees
    one); export, calibration and evaluation run the exported ONNX model on the CPU, as the guard does.
    """
    s = settings or PatchSettings()
    if s.scan.method not in TRIGGER_METHODS:
        raise ForensicsError(f"--method {s.scan.method} finds no trigger to repair or screen for; the patch job "
                             f"scans with {' or '.join(TRIGGER_METHODS)}")
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    if fresh and work.exists():
        shutil.rmtree(work)
    started = time.perf_counter()
    key_file = check_key_file(s.signing_key) if s.signing_key else None  # read only once the bundle is finished
    case = load_case(model_path, data_spec, features_layer, device)
    true_trigger, true_target = (load_true_trigger(true_trigger_file) if true_trigger_file else (None, None))
    fit, calib, test = split_clean(case.data, s)
    # the scan optimises on its own fit part and measures on the rest of the non-test data
    scan_fit, scan_held, _ = split_clean(case.data, s, SCAN_SHARE)
    if min(len(fit), len(calib), len(test), len(scan_fit), len(scan_held)) < s.scan.batch_size:
        raise DataError(f"{case.data.source}: {len(case.data)} clean images are too few for the patch job; "
                        f"give at least {int(s.scan.batch_size / min(s.test_fraction, SCAN_SHARE)) + 1}")
    phases = _Phases(work, warn or (lambda line: print(line, file=sys.stderr)))
    model = case.model
    fp_scan = fingerprint(case.model_sha256, case.data.x.tobytes(), case.data.y.tobytes(), features_layer,
                      asdict(s.scan), s.anomaly_threshold, s.repeats, s.recover_restarts, s.test_fraction,
                      SCAN_SHARE, s.split_seed)
    fp_repair = fingerprint(fp_scan, asdict(s.repair), str(true_trigger_file), len(calib))
    ibd_psc = "ibd_psc" in s.calibration.detectors  # the export adds the amplified-BatchNorm variants
    fp_export = fingerprint(fp_repair, OPSET, ibd_psc, IBD_PSC_VERSION)
    fp_calibrate = fingerprint(fp_export, asdict(s.calibration), CALIBRATION_VERSION)
    fp_evaluate = fingerprint(fp_calibrate)

    def header(i: int, phase: str, reused: bool) -> None:
        say(f"[{i}/{len(PHASES)}] {phase}" + (": reused the finished result from a previous run" if reused else ""))

    # 1. scan and trigger recovery
    scan_result = phases.result("scan", fp_scan)
    header(1, "scan", scan_result is not None)
    if scan_result is None:
        report = scan_case(case, model_path, scan_fit, scan_held, phases.dir("scan"), config=s.scan,
                           threshold=s.anomaly_threshold, repeats=s.repeats, restarts=s.recover_restarts,
                           progress=progress)
        scan_result = phases.finish("scan", fp_scan, {"report": "scan.json", "flagged": report["flagged_classes"],
                                             "anomaly_index": [r["anomaly_index"] for r in report["per_class"]]})
    scan_dir = work / "scan"
    scan_report = json.loads((scan_dir / "scan.json").read_text())
    flagged = scan_result["flagged"]
    anomaly = scan_result["anomaly_index"]
    # the most anomalous flagged class (or, with none flagged, the most anomalous class) drives repair and the filter
    suspect = max(flagged, key=lambda k: anomaly[k]) if flagged else int(np.argmax(anomaly))
    if flagged:
        rec = next(r for r in scan_report["recovered_triggers"] if r["class"] == suspect)
        mask, pattern = np.load(scan_dir / rec["mask_file"]), np.load(scan_dir / rec["pattern_file"])
        say(f"      backdoor found: class {suspect} (anomaly index {anomaly[suspect]:.2f}); "
            f"recovered trigger held-out ASR {rec['held_out_asr']:.1%}")
        others = [k for k in flagged if k != suspect]
        if others:
            say(f"      also flagged: class(es) {others} (anomaly index "
                f"{', '.join(f'{anomaly[k]:.2f}' for k in others)}); repair and the filter use class {suspect}, "
                f"the most anomalous; their recovered triggers are in the scan report")
    else:
        mask = np.load(scan_dir / "triggers" / "masks.npy")[suspect]
        pattern = np.load(scan_dir / "triggers" / "patterns.npy")[suspect]
        say(f"      no class flagged (max anomaly index {max(anomaly):.2f}); the guard's filter uses the "
            f"most suspicious class {suspect}'s reversed trigger and the model is not repaired")
    known = true_trigger if true_target == suspect else None
    select = Evaluator(calib.x, calib.y, suspect, mask, pattern)
    measure = Evaluator(test.x, test.y, suspect, mask, pattern, known)
    if true_trigger is not None and true_target != suspect:
        say(f"      note: the true target is class {true_target}, not the suspect {suspect}")

    # 2. repair
    repair_result = phases.result("repair", fp_repair)
    header(2, "repair", repair_result is not None)
    state_file = work / "repair" / "model_state.pt"
    if repair_result is None:
        rs = s.repair if flagged else RepairSettings(**{**asdict(s.repair), "method": "none"})
        rep = repair(model, fit.x, fit.y, select, measure, rs)
        torch.save({"state_dict": model.net.state_dict(), "masks": model.output_masks}, phases.dir("repair")
                   / "model_state.pt")
        repair_result = phases.finish("repair", fp_repair, rep.to_dict())
    else:
        state = torch.load(state_file, weights_only=True, map_location=model.device)
        model.net.load_state_dict(state["state_dict"])
        for layer, m in state["masks"].items():
            model.set_output_mask(layer, m)
    if flagged:
        say(f"      method: {repair_result['method']}" + (f", {repair_result['chosen_by']}"
                                                          if repair_result.get("chosen_by") else ""))
        if repair_result.get("kept_epoch") == 0:
            say(f"      warning: every {repair_result['method']} epoch lost more than "
                f"{s.repair.give_up_loss:.0%} of clean accuracy on the calibration split, so the model is left "
                f"unrepaired (the guard still screens it); give more clean data or another --repair")
    for key, value in repair_result["summary"].items():
        if value is not None:
            say(f"      {key.replace('_', ' ')}: {value}")

    # 3. export (from the CPU: the exported graph must not carry the device's transfers)
    model.to_device("cpu")
    export_result = phases.result("export", fp_export)
    header(3, "export", export_result is not None)
    onnx_path = work / "export" / "model.onnx"
    if export_result is None:
        onnx_file = phases.dir("export") / "model.onnx"
        err = export_onnx(model, onnx_file, test.x[:256])
        done: dict[str, Any] = {"file": "model.onnx", "opset": OPSET, "max_abs_error": err}
        say(f"      ONNX (opset {OPSET}) matches torch within {err:.1e} on {min(256, len(test))} held-out images")
        if ibd_psc:
            done["ibd_psc"] = add_ibd_psc_variants(model, onnx_file, fit.x[:256])
            say(f"      IBD-PSC: variants amplifying the last {done['ibd_psc']['counts']} BatchNorm layers "
                f"x{done['ibd_psc']['omega']:g}, as extra outputs of the same graph")
        export_result = phases.finish("export", fp_export, done)
    # calibration and evaluation run the very bytes the export recorded, which the bundle will carry
    variants = {"ibd_psc": export_result["ibd_psc"]} if export_result.get("ibd_psc") else {}
    backend = EmbeddedBackend(phases.read("export", "model.onnx"), INPUT_NAME,
                              extra_outputs=tuple(variants.get("ibd_psc", {}).get("outputs", ())))

    # 4. calibrate
    calib_result = phases.result("calibrate", fp_calibrate)
    header(4, "calibrate", calib_result is not None)
    calib_dir = work / "calibrate"
    if calib_result is None:
        rng = np.random.default_rng(s.calibration.seed)
        pool = fit.x[np.sort(rng.choice(len(fit), min(s.calibration.pool_size, len(fit)), replace=False))]
        np.save(phases.dir("calibrate") / "clean_pool.npy", pool)
        if s.calibration.scope == "suspect" and not flagged:
            say("      --scope suspect: no class flagged, so the guard judges every input")
        calibration = calibrate(backend, pool, calib.x, calib.y, fit.x, fit.y, case.data.num_classes, calib_dir,
                                flagged=flagged, target=suspect, mask=mask, pattern=pattern,
                                settings=s.calibration, features_layer=model.features_layer,
                                model_outputs=variants)
        calib_result = phases.finish("calibrate", fp_calibrate, calibration)
    verdict = calib_result["verdict"]
    g = verdict["guarantee"]
    say(f"      verdict: {', '.join(verdict['detectors'])} combined ({verdict['rule']}, "
        f"{verdict.get('p_values', 'bag')} p-values) at one budget of "
        f"{verdict['frr']:.1%}" + (f" on inputs answered as class(es) {verdict['classes']}" if verdict["classes"]
                                  else "")
        + (f"; STRIP n={calib_result['strip']['n']}" if calib_result.get("strip") else ""))
    say(f"      {g['calibration_images']} calibration images guarantee clean refusals of {g['expected_frr']:.2%} "
        f"in expectation, at most {g['frr_upper_95']:.2%} with 95 % confidence")
    if g["frr_upper_95"] > 2.5 * verdict["frr"]:
        say(f"      warning: too few calibration images for a tight {verdict['frr']:.1%} budget; from "
            f"{calib_result['images_for_tight_bound']} the 95 % bound stays within {2.5 * verdict['frr']:.1%} "
            f"(give more clean data, or a larger --calibration-fraction)")
    if "activation_filter" not in calib_result and flagged is not None and not flagged:
        say("      the activation filter is off: the scan flagged no class, so it has no trigger to watch")
    sections = {k: calib_result[k] for k in ("verdict", *(d.section for d in DETECTORS)) if k in calib_result}
    created = datetime.now(timezone.utc).replace(microsecond=0)
    manifest = GuardManifest.model_validate({
        "model": {"name": s.model_name, "file": "model.onnx", "sha256": phases.digest("export", "model.onnx"),
                  "opset": OPSET},
        "input": {"name": INPUT_NAME, "shape": [-1, *case.data.input_shape], "value_range": (0.0, 1.0)},
        "class_names": case.data.class_names,
        "policy": s.policy,
        "clean_pool": {"file": "clean_pool.npy", "sha256": phases.digest("calibrate", "clean_pool.npy")},
        **sections,
        "scan": {"method": s.scan.method, "anomaly_scale": s.scan.anomaly_scale, "anomaly_index": anomaly,
                 "flagged_classes": flagged, "threshold": s.anomaly_threshold},
        "repair": {k: repair_result[k] for k in ("method", "before", "after", "summary")},
        "provenance": {"source_model": Path(model_path).name, "source_model_sha256": case.model_sha256,
                       "tool_version": f"trojan-forensics {TOOL_VERSION}", "created": created.isoformat()},
        "bundle_version": int(created.timestamp()) if s.bundle_version is None else s.bundle_version,
    })
    # the pool and the detectors' files, each checked against the digest calibration recorded when it wrote it
    files: dict[str, Path] = {manifest.model.file: onnx_path}
    for name, digest in manifest.files()[1:]:
        if digest != phases.digest("calibrate", name):
            raise ForensicsError(f"{work / 'calibrate' / 'result.json'}: {name}'s SHA-256 differs from the one "
                                 f"recorded when calibration wrote it; run the job again with --fresh")
        files[name] = calib_dir / name

    # 5. evaluate on the test split, which neither calibration nor repair saw
    eval_result = phases.result("evaluate", fp_evaluate)
    header(5, "evaluate", eval_result is not None)
    if eval_result is None:
        read = {name: phases.read("calibrate", name) for name in files if name != manifest.model.file}
        screen = GuardBundle(calib_dir, manifest, np.load(io.BytesIO(read[manifest.clean_pool.file])),
                             read_arrays(calib_dir, manifest, read)).screen(seed=7)
        keep = test.y != suspect
        triggered = {"reversed_trigger": (stamp(test.x[keep], mask[None], pattern).astype(np.float32), suspect)}
        if true_trigger is not None:
            keep_true = test.y != true_target
            triggered["true_trigger"] = (true_trigger.apply(test.x[keep_true]), int(true_target))
        eval_result = phases.finish("evaluate", fp_evaluate, evaluate(backend, screen, test.x, triggered))
    shares = ", ".join(f"{k} {v:.0%}" for k, v in eval_result["frr_by_detector"].items() if v)
    say(f"      held-out clean: {eval_result['frr']:.1%} of {eval_result['clean_images']} refused"
        + (f" (strongest evidence: {shares})" if shares else "")
        + f"; {eval_result['forward_passes']:.1f} model rows per input")
    for name in ("reversed_trigger", "true_trigger"):
        if name in eval_result:
            e = eval_result[name]
            say(f"      {name.replace('_', ' ')}: model ASR {e['model_asr']:.1%}; unflagged {e['unflagged']:.1%}; "
                f"attacks passing the guard {e['attack_passes']:.1%}")
    manifest = manifest.model_copy(update={"evaluation": eval_result})

    # 6. bundle
    header(6, "bundle", False)
    report_dir = phases.dir("report")
    for name in sorted(phases.digests["scan"]):  # the files the scan wrote, as it wrote them; never a link
        (report_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (report_dir / name).write_bytes(phases.read("scan", name))
    for phase, result in (("repair", repair_result), ("export", export_result), ("calibrate", calib_result),
                          ("evaluate", eval_result)):
        write_json_atomic(report_dir / f"{phase}.json", result)
    build_report(report_dir, manifest.model_dump(), true_trigger_file)
    report = report_files(report_dir)
    manifest = attach(manifest, report)
    signed: list[str] = []
    write_bundle(out, manifest, {**files, **report},
                 signer=(lambda staged: signed.append(sign_finished_bundle(staged, key_file))) if key_file else None)
    if signed:
        say(f"      guard.json signed by key {signed[0]} (guard.json.sig); serve with "
            f"--trusted-key on its public key")
    summary = {
        "bundle": str(out), "flagged": flagged, "suspect_class": suspect,
        "repair": repair_result["summary"], "evaluation": eval_result,
        "seconds": round(time.perf_counter() - started, 1),
    }
    say(f"bundle written to {out} (verify with: trojan-guard inspect {out}); forensic report "
        f"{out}/report/report.html")
    return summary
