"""The unlearning repair over several seeds and both fine-tuning optimisers.

Run: ``.venv/bin/python bench/bench_repair.py [--models zoo,holdout,fresh] [--seeds 4] [--optimizers sgd,adam]``

One patch-job run is one draw: which images are stamped, and in which order,
moves the true trigger's ASR after unlearning by a point or more on these
300-image test splits. This bench repeats only the repair phase, with
``--seeds`` seeds per optimiser, on the same scan, splits and recovered trigger
the patch job uses (``offline.patch.split_clean``), and prints per model the
mean and worst true-trigger ASR (target <= 2 %) and clean accuracy change
(target >= -1.5 points), and how many runs missed each.

Models are bench_patch's sets (the zoo's backdoored models, the hold-out and
the fresh ones). A model whose ``bench_patch`` case directory already holds a
scan (``bench-out/patch*/NAME/work/scan``) reuses it; otherwise the model is
trained and scanned under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_patch import SETS, _case  # noqa: E402

from offline.jobs import load_case, scan_case  # noqa: E402
from offline.patch import SCAN_SHARE, PatchSettings, load_true_trigger, split_clean  # noqa: E402
from offline.repair import OPTIMIZERS, Evaluator, RepairSettings, repair  # noqa: E402

# each optimiser at its own learning rate: SGD at the default, Adam at its default before 2026-12-02
LEARNING_RATES = {"sgd": RepairSettings().lr, "adam": 1e-3}


def _scanned_case(name: str, trigger, target: int, seed: int, out: Path, settings: PatchSettings) -> Path:
    """A case directory holding model, clean data, attack.json and the patch job's scan."""
    for found in sorted(Path("bench-out").glob(f"patch*/{name}")):
        if (found / "work" / "scan" / "scan.json").is_file():
            return found
    root = out / name
    if not (root / "model.pt").is_file():
        _case(root, trigger, target, seed)
    if not (root / "work" / "scan" / "scan.json").is_file():
        case = load_case(root / "model.pt", str(root / "clean.npz"), None)
        fit, calib, _ = split_clean(case.data, settings, SCAN_SHARE)  # the patch job's scan split
        scan_case(case, root / "model.pt", fit, calib, root / "work" / "scan", config=settings.scan,
                  threshold=settings.anomaly_threshold, repeats=settings.repeats,
                  restarts=settings.recover_restarts, progress=False)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="zoo,holdout,fresh", help="comma-separated sets (%(default)s)")
    parser.add_argument("--only", default=None, help="run only models whose name contains this")
    parser.add_argument("--seeds", type=int, default=4, help="unlearning seeds per optimiser (%(default)s)")
    parser.add_argument("--optimizers", default="sgd,adam", help=f"comma-separated, of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--out", default="bench-out/repair")
    args = parser.parse_args()
    optimizers = args.optimizers.split(",")
    if unknown := [o for o in optimizers if o not in OPTIMIZERS] + [m for m in args.models.split(",") if m not in SETS]:
        parser.error(f"unknown optimiser or model set: {', '.join(unknown)}")
    settings = PatchSettings()
    out = Path(args.out)
    rows = []
    for set_name in args.models.split(","):
        for name, trigger, target, seed in SETS[set_name]:
            if target is None or (args.only and args.only not in name):
                continue
            root = _scanned_case(name, trigger, target, seed, out, settings)
            case = load_case(root / "model.pt", str(root / "clean.npz"), None)
            fit, calib, test = split_clean(case.data, settings)
            scan_dir = root / "work" / "scan"
            report = json.loads((scan_dir / "scan.json").read_text())
            recovered = [r for r in report["recovered_triggers"] if r["class"] == target]
            if not recovered:
                print(f"{name}: the scan did not flag the true target {target}; skipped", flush=True)
                continue
            rec = recovered[0]
            mask, pattern = np.load(scan_dir / rec["mask_file"]), np.load(scan_dir / rec["pattern_file"])
            true_trigger, _ = load_true_trigger(root / "attack.json")
            select = Evaluator(calib.x, calib.y, target, mask, pattern)
            measure = Evaluator(test.x, test.y, target, mask, pattern, true_trigger)
            start = copy.deepcopy(case.model.net.state_dict())
            for optimizer in optimizers:
                for s in range(args.seeds):
                    case.model.net.load_state_dict(start)
                    rs = replace(settings.repair, optimizer=optimizer, lr=LEARNING_RATES[optimizer], seed=s)
                    rep = repair(case.model, fit.x, fit.y, select, measure, rs)
                    row = {"set": set_name, "model": name, "optimizer": optimizer, "seed": s,
                           "true_asr": rep.after.true_asr, "accuracy_change": rep.after.accuracy - rep.before.accuracy,
                           "epochs": rep.details["epochs"], "kept_epoch": rep.details["kept_epoch"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "repair.json").write_text(json.dumps(rows, indent=2))

    by_model: dict[tuple[str, str], list[dict]] = defaultdict(list)
    by_set: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_model[(r["model"], r["optimizer"])].append(r)
        by_set[(f"all {r['set']} models", r["optimizer"])].append(r)
    print(f"\nunlearning, {args.seeds} seeds each, test split; targets: true ASR <= 2 %, accuracy drop <= 1.5 points")
    print(f"{'model':34} {'optimiser':>9} {'ASR mean':>8} {'worst':>6} {'> 2 %':>6} {'ACC change mean':>15} "
          f"{'worst':>6} {'< -1.5':>6}")
    for (model, optimizer), rs in [*by_model.items(), *by_set.items()]:
        asr = [100 * r["true_asr"] for r in rs]
        acc = [100 * r["accuracy_change"] for r in rs]
        print(f"{model:34} {optimizer:>9} {np.mean(asr):8.2f} {max(asr):6.2f} {sum(a > 2 for a in asr):3}/{len(rs):<2} "
              f"{np.mean(acc):+15.2f} {min(acc):+6.2f} {sum(a < -1.5 for a in acc):3}/{len(rs):<2}")


if __name__ == "__main__":
    main()
