"""The scan job (``trojan-forensics scan``): Neural Cleanse or TABOR over every class, trigger recovery for the
flagged ones, ``scan.json`` and the trigger images."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offline.data import Dataset
from offline.errors import DataError
from offline.jobs import TOOL_VERSION, LoadedCase, load_case, step_progress, write_json_atomic
from offline.plots import save_stamped_examples, save_trigger_images
from offline.scan.neural_cleanse import NeuralCleanseConfig, recover_trigger, scan
from offline.stamp import stamp


def run_scan(
    model_path: str | Path,
    data_spec: str | Dataset,
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
