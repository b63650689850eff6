"""The forensics jobs behind the CLI, usable from Python: load, scan, write results."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guard.bundle import sha256_file
from offline.attacks import stamp
from offline.data import Dataset, load_dataset
from offline.errors import DataError
from offline.models import ForensicModel, load_model, resolve_device
from offline.neural_cleanse import NeuralCleanseConfig, recover_trigger, scan
from offline.plots import save_stamped_examples, save_trigger_images

TOOL_VERSION = "0.1.0"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def step_progress(enabled: bool, total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar over optimisation steps (to stderr), or a no-op when disabled."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and pipes
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True, disable=None)
    try:
        yield bar
    finally:
        bar.close()


@dataclass
class LoadedCase:
    model: ForensicModel
    data: Dataset
    num_classes: int
    model_sha256: str


def load_case(model_path: str | Path, data_spec: str, features_layer: str | None,
              device: str = "cpu") -> LoadedCase:
    """Load data and model, check that they belong together, and run the model on ``device`` (``auto``: the
    GPU where torch sees one)."""
    data = load_dataset(data_spec)
    target = resolve_device(device)  # before the model loads: a missing GPU is a quick, clear error
    model = load_model(model_path, data.x[:8], features_layer).to_device(target)
    with torch.no_grad():
        num_classes = int(model(torch.from_numpy(data.x[:2])).shape[1])
    if int(data.y.max()) >= num_classes:
        raise DataError(
            f"{data.source}: labels go up to {int(data.y.max())} but the model has only {num_classes} outputs"
        )
    if len(data.class_names) != num_classes:
        data.class_names = [str(c) for c in range(num_classes)]
    return LoadedCase(model, data, num_classes, sha256_file(model_path))


def run_scan(
    model_path: str | Path,
    data_spec: str,
    out: str | Path,
    *,
    features_layer: str | None = None,
    config: NeuralCleanseConfig | None = None,
    threshold: float = 2.0,
    repeats: int = 1,
    eval_fraction: float = 0.2,
    recover: bool = True,
    restarts: int = 3,
    examples: int = 6,
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Neural Cleanse scan of a model on clean data; writes ``scan.json`` and PNGs to ``out``.

    The clean data is split (stratified) into a part the triggers are
    optimised on and a held-out part (``eval_fraction``) on which the success
    rate of every reversed trigger is measured.
    """
    started = time.perf_counter()
    config = config or NeuralCleanseConfig()
    case = load_case(model_path, data_spec, features_layer, device)
    fit, held_out = case.data.split(eval_fraction, seed=config.seed)
    return scan_case(case, model_path, fit, held_out, Path(out), config=config, threshold=threshold,
                     repeats=repeats, recover=recover, restarts=restarts, examples=examples, progress=progress,
                     load_seconds=time.perf_counter() - started)


def scan_case(case: LoadedCase, model_path: str | Path, fit: Dataset, held_out: Dataset, out: Path, *,
              config: NeuralCleanseConfig, threshold: float = 2.0, repeats: int = 1, recover: bool = True,
              restarts: int = 3, examples: int = 6, progress: bool = True, load_seconds: float = 0.0) -> dict[str, Any]:
    """Scan a loaded model: optimise on ``fit``, measure ASR on ``held_out``, write to ``out``."""
    started = time.perf_counter()
    if len(fit) < config.batch_size or len(held_out) == 0:
        raise DataError(
            f"{case.data.source}: {len(case.data)} images are too few; give at least "
            f"{2 * config.batch_size} clean images"
        )
    k = case.num_classes
    out.mkdir(parents=True, exist_ok=True)

    with step_progress(progress, config.steps_per_class * repeats, f"Neural Cleanse on {k} classes") as bar:
        def on_step(run: int, step: int, active: int, total: int) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"run {run + 1}/{repeats} step {step} active {active}/{total} classes")

        result = scan(case.model, fit.x, held_out.x, held_out.y, k, config,
                      threshold=threshold, repeats=repeats, progress=on_step)
        if bar is not None:
            bar.total = bar.n
            bar.refresh()
    scan_seconds = time.perf_counter() - started

    summary = result.summary()
    best = result.best_run
    images = save_trigger_images(out / "triggers", best.triggers.targets, best.triggers.masks,
                                 best.triggers.patterns, best.anomaly_index, result.flagged,
                                 case.data.class_names)
    np.save(out / "triggers" / "masks.npy", best.triggers.masks)
    np.save(out / "triggers" / "patterns.npy", best.triggers.patterns)
    recovered = []
    for target in result.flagged if recover else []:
        with step_progress(progress, config.max_steps + (config.steps_per_class if restarts else 0),
                           f"recovering class {target} ({1 + restarts} starts)") as bar:
            rev, asr, candidates = recover_trigger(
                case.model, fit.x, held_out.x, held_out.y, target, best.triggers.for_class(target), config,
                restarts=restarts, progress=None if bar is None else (lambda s, a, t: bar.update(1)),
            )
            if bar is not None:
                bar.total = bar.n
                bar.refresh()
        mask, pattern = rev.masks[0], rev.patterns[0]
        np.save(out / f"recovered_class_{target}_mask.npy", mask)
        np.save(out / f"recovered_class_{target}_pattern.npy", pattern)
        # one example from each of the first other classes, so the figure shows the trigger's reach
        pick = np.array([np.flatnonzero(held_out.y == c)[0] for c in np.unique(held_out.y) if c != target])[:examples]
        xs = held_out.x[pick]
        after = case.model.predict(stamp(xs, mask[None], pattern))
        save_stamped_examples(out / f"recovered_class_{target}_examples.png", xs, mask, pattern,
                              case.model.predict(xs), after, case.data.class_names)
        recovered.append({
            "class": target,
            "mask_l1_norm": float(mask.sum()),
            "held_out_asr": asr,
            "steps": int(rev.steps[0]),
            "candidates": candidates,
            "mask_file": f"recovered_class_{target}_mask.npy",
            "pattern_file": f"recovered_class_{target}_pattern.npy",
            "examples_image": f"recovered_class_{target}_examples.png",
        })

    report = {
        "tool": "trojan-forensics scan",
        "version": TOOL_VERSION,
        "method": config.method,
        "verdict": "backdoored" if result.flagged else "clean",
        **summary,
        "recovered_triggers": recovered,
        "model": {
            "path": str(model_path),
            "sha256": case.model_sha256,
            "features_layer": case.model.features_layer,
            "num_classes": k,
        },
        "data": {
            "source": case.data.source,
            "images": len(case.data),
            "input_shape": list(case.data.input_shape),
            "fit_images": len(fit),
            "held_out_images": len(held_out),
            "class_names": case.data.class_names,
        },
        "images": [f"triggers/{name}" for name in images],
        "trigger_arrays": {"masks": "triggers/masks.npy", "patterns": "triggers/patterns.npy",
                           "best_run_seed": best.seed},
        "timings": {
            "load_seconds": round(load_seconds, 2),
            "scan_seconds": round(scan_seconds, 2),
            "total_seconds": round(load_seconds + time.perf_counter() - started, 2),
        },
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
    }
    write_json_atomic(out / "scan.json", report)
    return report
