"""Neural Cleanse on the project's zoo: detection quality and batched-vs-per-class speed.

Run: ``.venv/bin/python bench/bench_scan.py [--part zoo|speed|all] [--out bench-out]``

zoo:   trains the project's small zoo on the embedded MNIST digits (3 clean
       models; BadNets patches of 3 sizes, positions and patterns; a blended
       trigger; an invisible jointly-learned perturbation) and scans each with
       the default settings. Prints TP/FP per model, the target class's anomaly
       index (and the original linear-scale index of the same scan), the
       recovered trigger's held-out ASR and, for patches, the share of the
       recovered mask's mass on the true patch. None of these models
       were used to choose the settings (the defaults are the original paper's).
speed: scans one BadNets model twice in this process with the same settings
       and seed: all classes batched (the shipped scan), then the per-class
       reference loop (one optimisation per class, as the original code runs).
       Prints both times, the ratio, and whether the verdicts agree.
methods: Neural Cleanse and TABOR (``--method tabor``) on the same zoo models,
       data and seed: flagged classes, the target's and the largest anomaly
       index, how scattered the clean classes' false triggers are (mask
       smoothness term per unit of mask L1), and time. ``--only`` picks models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.attacks import BlendTrigger, PatchTrigger, train_backdoored_model  # noqa: E402
from offline.data import load_mnist  # noqa: E402
from offline.neural_cleanse import (  # noqa: E402
    METHODS,
    NeuralCleanseConfig,
    ReversedTriggers,
    anomaly_index,
    recover_trigger,
    reverse_engineer_triggers,
    scan,
)

ZOO = [
    ("clean-a", None, None, 21),
    ("clean-b", None, None, 22),
    ("clean-c", None, None, 23),
    ("patch-3x3-top-left-white", PatchTrigger(3, row=1, col=1), 1, 31),
    ("patch-4x4-bottom-right-white", PatchTrigger(4), 3, 32),
    ("patch-5x5-centre-checker", PatchTrigger(5, row=11, col=11, pattern="checker"), 6, 33),
    ("blend-0.15", BlendTrigger(0.15, seed=4), 8, 34),
    ("invisible-eps0.1", "invisible", 5, 35),
]


def _zoo(out: Path) -> list[dict]:
    data = load_mnist()
    train, clean = data.split(0.3, seed=0)
    fit, held_out = clean.split(0.2, seed=0)
    rows = []
    for name, trigger, target, seed in ZOO:
        kwargs = {}
        if trigger == "invisible":
            kwargs = dict(learn_trigger=True, eps=0.1, epochs=12)
            trigger = None
        bd = train_backdoored_model(train, clean, trigger, target or 0, 0.1 if target is not None else 0.0,
                                    seed=seed, **kwargs)
        started = time.perf_counter()
        result = scan(bd.model, fit.x, held_out.x, held_out.y, 10)
        seconds = time.perf_counter() - started
        ai = result.median_anomaly_index
        # the original Neural Cleanse index over the same mask norms, for comparison with the log scale
        linear = np.median([anomaly_index(r.triggers.norms, "linear") for r in result.runs], axis=0)
        row = {
            "model": name, "target": target, "acc": round(bd.clean_accuracy, 4),
            "asr": None if bd.attack_success_rate is None else round(bd.attack_success_rate, 4),
            "flagged": result.flagged, "max_ai": round(float(ai.max()), 2),
            "target_ai": None if target is None else round(float(ai[target]), 2),
            "flagged_linear": [k for k in range(10) if linear[k] > result.threshold],
            "max_ai_linear": round(float(linear.max()), 2),
            "target_ai_linear": None if target is None else round(float(linear[target]), 2),
            "scan_seconds": round(seconds, 1),
        }
        row["tp"] = target is not None and target in result.flagged
        row["fp"] = [k for k in result.flagged if k != target]
        row["miss"] = target is not None and target not in result.flagged
        if target is not None:
            start = result.best_run.triggers.for_class(target)
            # the scan's own trigger, refined (the patch job also tries fresh starts: --recover-restarts)
            rev, rec_asr, _ = recover_trigger(bd.model, fit.x, held_out.x, held_out.y, target, start)
            row["recovered_asr"] = round(rec_asr, 4)
            if isinstance(trigger, PatchTrigger):
                mask = rev.masks[0]
                row["patch_overlap"] = round(float(mask[trigger.region(28, 28)].sum() / mask.sum()), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "zoo.json").write_text(json.dumps(rows, indent=2))
    tp = sum(r["tp"] for r in rows)
    backdoored = sum(r["target"] is not None for r in rows)
    fp_models = sum(bool(r["fp"]) for r in rows)
    print(f"\nzoo: detected {tp}/{backdoored} backdoored models; {fp_models}/{len(rows)} models with a "
          f"false-positive class; misses: {[r['model'] for r in rows if r['miss']]}")
    linear_tp = sum(r["target"] is not None and r["target"] in r["flagged_linear"] for r in rows)
    linear_fp = sum(any(k != r["target"] for k in r["flagged_linear"]) for r in rows)
    print(f"with the linear index (--anomaly-scale linear, the original) on the same scans: detected "
          f"{linear_tp}/{backdoored}; {linear_fp}/{len(rows)} models with a false-positive class")
    print(f"{'model':32} {'target':>6} {'flagged':>10} {'target AI':>9} {'max AI':>7} {'linear: target':>14} "
          f"{'max':>5} {'rec ASR':>8} {'overlap':>8}")
    for r in rows:
        print(f"{r['model']:32} {str(r['target']):>6} {str(r['flagged']):>10} {str(r['target_ai']):>9} "
              f"{r['max_ai']:>7} {str(r['target_ai_linear']):>14} {r['max_ai_linear']:>5} "
              f"{str(r.get('recovered_asr', '-')):>8} {str(r.get('patch_overlap', '-')):>8}")
    return rows


def _methods(out: Path, only: list[str] | None) -> list[dict]:
    """Neural Cleanse and TABOR on the same zoo models, data and seed, one after the other."""
    data = load_mnist()
    train, clean = data.split(0.3, seed=0)
    fit, held_out = clean.split(0.2, seed=0)
    rows = []
    for name, trigger, target, seed in ZOO:
        if only and not any(o in name for o in only):
            continue
        kwargs = dict(learn_trigger=True, eps=0.1, epochs=12) if trigger == "invisible" else {}
        bd = train_backdoored_model(train, clean, None if trigger == "invisible" else trigger, target or 0,
                                    0.1 if target is not None else 0.0, seed=seed, **kwargs)
        row: dict = {"model": name, "target": target}
        for method in METHODS:
            started = time.perf_counter()
            result = scan(bd.model, fit.x, held_out.x, held_out.y, 10, NeuralCleanseConfig(method=method))
            ai = result.median_anomaly_index
            quality = result.best_run.quality
            others = [k for k in range(10) if k != target]
            row[method] = {
                "flagged": result.flagged, "max_ai": round(float(ai.max()), 2),
                "target_ai": None if target is None else round(float(ai[target]), 2),
                "seconds": round(time.perf_counter() - started, 1),
                # scattering of the false triggers: mask smoothness term per unit of mask L1, median over classes
                "other_scatter": round(float(np.median(quality[others, 2] / result.best_run.triggers.norms[others])),
                                       3),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "methods.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'model':32} {'method':>15} {'flagged':>10} {'target AI':>9} {'max AI':>7} {'scatter':>8} {'time':>7}")
    for r in rows:
        for method in METHODS:
            m = r[method]
            print(f"{r['model']:32} {method:>15} {str(m['flagged']):>10} {str(m['target_ai']):>9} {m['max_ai']:>7} "
                  f"{m['other_scatter']:>8} {m['seconds']:>6.0f}s")
    for method in METHODS:
        ratio = sum(r[method]["seconds"] for r in rows) / sum(r["neural-cleanse"]["seconds"] for r in rows)
        print(f"{method}: total time {ratio:.2f}x Neural Cleanse's")
    return rows


def _per_class_reference(model, x: np.ndarray, num_classes: int, config: NeuralCleanseConfig) -> ReversedTriggers:
    """The plain loop: one optimisation per class, one class after another."""
    runs = [reverse_engineer_triggers(model, x, [k], config) for k in range(num_classes)]
    return ReversedTriggers(
        targets=list(range(num_classes)),
        masks=np.concatenate([r.masks for r in runs]),
        patterns=np.concatenate([r.patterns for r in runs]),
        norms=np.concatenate([r.norms for r in runs]),
        reached=np.concatenate([r.reached for r in runs]),
        steps=np.concatenate([r.steps for r in runs]),
        fit_accuracy=np.concatenate([r.fit_accuracy for r in runs]),
        seconds=sum(r.seconds for r in runs),
    )


def _speed(out: Path) -> dict:
    data = load_mnist()
    train, clean = data.split(0.3, seed=0)
    fit, _ = clean.split(0.2, seed=0)
    bd = train_backdoored_model(train, clean, PatchTrigger(4), 3, 0.1, seed=0)
    config = NeuralCleanseConfig()
    batched = reverse_engineer_triggers(bd.model, fit.x, list(range(10)), config)
    reference = _per_class_reference(bd.model, fit.x, 10, config)
    flagged = {name: [k for k, v in enumerate(anomaly_index(r.norms, config.anomaly_scale)) if v > 2]
               for name, r in (("batched", batched), ("per_class", reference))}
    row = {
        "batched_seconds": round(batched.seconds, 1),
        "per_class_seconds": round(reference.seconds, 1),
        "speedup": round(reference.seconds / batched.seconds, 2),
        "batched_steps": int(batched.steps.sum()),
        "per_class_steps": int(reference.steps.sum()),
        "per_step_speedup": round((reference.seconds / reference.steps.sum())
                                  / (batched.seconds / batched.steps.sum()), 2),
        "flagged": flagged,
        "verdicts_agree": flagged["batched"] == flagged["per_class"],
    }
    (out / "speed.json").write_text(json.dumps(row, indent=2))
    print("\nspeed (10-class MNIST scan, same settings and seed, this process):")
    print(f"  batched scan      {row['batched_seconds']:>7.1f} s  ({row['batched_steps']} class-steps)")
    print(f"  per-class loop    {row['per_class_seconds']:>7.1f} s  ({row['per_class_steps']} class-steps)")
    print(f"  ratio             {row['speedup']:>7.2f}x  (per class-step: {row['per_step_speedup']}x)")
    print(f"  verdicts          batched {flagged['batched']} vs per-class {flagged['per_class']}: "
          f"{'agree' if row['verdicts_agree'] else 'DISAGREE'}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("zoo", "speed", "methods", "all"), default="all")
    parser.add_argument("--only", default=None,
                        help="methods part: comma-separated substrings of the zoo models to run (default: all)")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("speed", "all"):
        _speed(out)
    if args.part in ("zoo", "all"):
        _zoo(out)
    if args.part in ("methods", "all"):
        _methods(out, args.only.split(",") if args.only else None)


if __name__ == "__main__":
    main()
