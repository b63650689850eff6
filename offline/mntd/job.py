"""The MNTD jobs: ``trojan-forensics mntd train`` (shadows on Ray, then the meta-classifier) and ``scan --method
mntd --meta DIR`` (a backdoor probability for one model)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from offline.data import Dataset
from offline.errors import DataError
from offline.jobs import TOOL_VERSION, load_case, write_json_atomic
from offline.mntd.meta import MetaClassifier, MetaSettings, train_meta_classifier
from offline.mntd.shadows import ShadowSettings, train_shadows


def run_mntd_train(data: Dataset, out: str | Path, shadows: int, shadow_settings: ShadowSettings | None = None,
                   meta_settings: MetaSettings | None = None, *, address: str | None = None,
                   num_cpus: int | None = None, cpus_per_task: int = 1, fresh: bool = False, progress: bool = True,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``shadows`` shadow models into ``out/shadows`` (resuming), then the meta-classifier into ``out``."""
    from offline.fleet.scan import data_digest

    shadow_settings, meta_settings = shadow_settings or ShadowSettings(), meta_settings or MetaSettings()
    out = Path(out)
    started = time.perf_counter()
    records = train_shadows(data, out / "shadows", shadows, shadow_settings, address=address, num_cpus=num_cpus,
                            cpus_per_task=cpus_per_task, fresh=fresh, progress=progress, say=say)
    shadow_seconds = time.perf_counter() - started
    say(f"{len(records)} shadows ({sum(r['backdoored'] for r in records)} backdoored); training the "
        f"meta-classifier ({meta_settings.queries} queries, {meta_settings.meta_epochs} epochs)")
    info = {"source": data.source, "images": len(data), "sha256": data_digest(data)}
    meta, measured = train_meta_classifier(out / "shadows", records, shadow_settings, meta_settings,
                                           data.input_shape, data.num_classes, info, progress)
    measured["shadow_seconds"] = round(shadow_seconds, 1)
    bd = [r for r in records if r["backdoored"]]
    measured["shadow_quality"] = {
        "clean_accuracy_median": float(np.median([r["clean_accuracy"] for r in records])),
        "backdoored_asr_median": float(np.median([r["attack_success_rate"] for r in bd])) if bd else None}
    meta.manifest["measured"] = measured
    meta.save(out)
    return meta.manifest


def run_mntd_scan(model_path: str | Path, data_spec: str | Dataset, out: str | Path, meta_dir: str | Path,
                  device: str = "cpu") -> dict[str, Any]:
    """A backdoor probability for one model from a saved meta-classifier; writes ``scan.json`` to ``out``."""
    import torch

    started = time.perf_counter()
    meta = MetaClassifier.load(meta_dir)  # a bad --meta fails before the model loads
    case = load_case(model_path, data_spec, None, device)
    shape = list(meta.queries.shape[1:])
    if list(case.data.input_shape) != shape or case.num_classes != meta.num_classes:
        raise DataError(f"{model_path}: takes {tuple(case.data.input_shape)} images and has {case.num_classes} "
                        f"classes; the meta-classifier in {meta_dir} was trained on shadows of {tuple(shape)} "
                        f"images and {meta.num_classes} classes")
    with torch.no_grad():
        logits = case.model(torch.from_numpy(meta.queries).to(case.model.device)).cpu().numpy()
    probability = meta.probability(logits)
    backdoored = probability > meta.threshold
    report = {
        "tool": "trojan-forensics scan",
        "version": TOOL_VERSION,
        "method": "mntd",
        "verdict": "backdoored" if backdoored else "clean",
        "backdoor_probability": round(probability, 6),
        "threshold": meta.threshold,
        "target_fpr": meta.manifest["target_fpr"],
        "flagged_classes": [],  # MNTD judges the model, not a class
        "meta": {"path": str(meta_dir), "created": meta.manifest["created"],
                 "format_version": meta.manifest["format_version"], "files": meta.manifest["files"],
                 "shadows": meta.manifest["measured"]["shadows"],
                 "calibration_auroc": meta.manifest["measured"]["calibration_auroc"]},
        "model": {"path": str(model_path), "sha256": case.model_sha256, "num_classes": case.num_classes},
        "timings": {"total_seconds": round(time.perf_counter() - started, 2)},
    }
    write_json_atomic(Path(out) / "scan.json", report)
    return report

