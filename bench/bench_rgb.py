"""RGB networks with BatchNorm and 43 classes: ResNet-18s on the embedded ``signs`` set, scanned and guarded.

Run: ``.venv/bin/python bench/bench_rgb.py [--only NAME] [--build-only] [--fresh] [--out bench-out]``

Five CIFAR-style ResNet-18s (BatchNorm, width 16: 12x faster to train on a CPU than the literature's 64) on
``signs`` (43 classes, 300 images each, 70 % for training): a clean one and BadNets, blend, WaNet and all-to-all
twins, from seeds and targets no setting of the scan or the guard was chosen on. The defender holds 1,500 of the
held-out images as clean data; the rest are never used. For each model:

- the attack: clean accuracy and ASR on the held-out images (attack.json);
- the scan: the guard-only patch job's Neural Cleanse verdict (flagged classes, the target's anomaly index) and
  its time on this machine's CPU;
- the guard (guard only, budget 1 %): on the patch job's test split, the clean refusal rate and the share of
  triggered inputs answered with the attacker's class through the guard, for the default verdict (STRIP + k-NN,
  plus the activation filter when the scan flags a class) and for the verdict with SCALE-UP and IBD-PSC added;
  every detector's AUROC between clean and triggered test inputs.

Trained models are kept in ``bench/models/signs-*`` (model.pt, attack.json, the trigger's files; the data is
rebuilt from its seed); each model's row in ``<out>/rgb/<model>/row.json`` is reused by a later run
(``--fresh`` redoes it). Writes ``<out>/rgb.json`` and ``<out>/rgb.md`` (copied into docs/lab/rgb.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matrix import runtime  # noqa: E402
from bench_verdict import triggered  # noqa: E402

from offline.attacks import BlendTrigger, PatchTrigger, training_setup  # noqa: E402
from offline.attacks.registry import build_attack, save_case  # noqa: E402
from offline.attacks.wanet import WaNetSettings  # noqa: E402
from offline.data import (  # noqa: E402
    Dataset,
    load_dataset,
    load_signs,  # noqa: E402
)
from offline.patch.calibrate import CalibrationSettings  # noqa: E402
from offline.patch.job import PatchSettings, run_patch, split_clean  # noqa: E402
from offline.patch.repair import RepairSettings  # noqa: E402

WIDTH = 16
EPOCHS = 10
PER_CLASS = 300
CLEAN_IMAGES = 1500
# name, attack, target, seed, build_attack's keyword arguments (no setting was chosen on these)
MODELS: list[tuple[str, str, int, int, dict[str, Any]]] = [
    ("signs-clean", "none", 0, 11, {}),
    ("signs-badnets", "badnets", 14, 12, {"trigger": PatchTrigger(4, pattern="checker", seed=12)}),
    ("signs-blend", "blend", 27, 13, {"trigger": BlendTrigger(0.15, 13)}),
    ("signs-wanet", "wanet", 33, 14, {"settings": WaNetSettings(epochs=EPOCHS)}),
    ("signs-all-to-all", "all-to-all", 0, 15, {"trigger": PatchTrigger(4, 1, 1, "checker", 15)}),
]
ALL = ("strip", "knn", "scale_up", "ibd_psc")  # the second verdict: the default's and the two new detectors
LABELS = ("guard-only", "guard-all")
KEPT = Path(__file__).resolve().parent / "models"
KEPT_FILES = ("attack.json", "trigger_*", "*.pt")


def signs_splits() -> tuple[Dataset, Dataset]:
    """(training set, the defender's 1,500 clean images), both from fixed seeds."""
    train, held_out = load_signs(per_class=PER_CLASS).split(0.3, seed=0)
    return train, held_out.split(CLEAN_IMAGES / len(held_out), seed=1)[1]


def build_case(case: Path, entry: tuple[str, str, int, int, dict[str, Any]], train: Dataset,
               clean: Dataset) -> dict[str, Any]:
    """The model in ``case``: copied from bench/models when kept there, else trained (and kept)."""
    name, attack, target, seed, kwargs = entry
    kept = KEPT / name
    case.mkdir(parents=True, exist_ok=True)
    clean.save_npz(case / "clean.npz")
    if (kept / "model.pt").is_file() and (kept / "attack.json").is_file():
        for f in kept.iterdir():
            shutil.copy2(f, case / f.name)
        return json.loads((case / "attack.json").read_text())
    started = time.perf_counter()
    with training_setup("resnet18", WIDTH):
        epochs = None if "settings" in kwargs else EPOCHS
        result = build_attack(attack, train, clean, target, seed, epochs=epochs, **kwargs)
    summary = save_case(case, attack, result, train, clean, train.source,
                        extra={"arch": "resnet18", "width": WIDTH, "epochs": EPOCHS,
                               "train_seconds": round(time.perf_counter() - started, 1)})
    (case / "train.npz").unlink()  # 100 MB: rebuilt from the seed when needed
    kept.mkdir(parents=True, exist_ok=True)
    for pattern in KEPT_FILES:
        for f in case.glob(pattern):
            shutil.copy2(f, kept / f.name)
    return summary


def model_row(out: Path, entry: tuple[str, str, int, int, dict[str, Any]], train: Dataset,
              clean: Dataset) -> dict[str, Any]:
    name, attack = entry[:2]
    case = out / "rgb" / name
    summary = build_case(case, entry, train, clean)
    rule, target = summary["label_rule"], summary["target"]
    row: dict[str, Any] = {"model": name, "attack": attack, "target": "c+1" if rule == "all-to-all" else target,
                           "clean_accuracy": summary["clean_accuracy"], "asr": summary["attack_success_rate"],
                           "train_seconds": summary.get("train_seconds")}
    common = dict(work_dir=case / "work", progress=False, say=lambda _: None, device="cpu")
    guard_only = RepairSettings(method="none")
    t0 = time.perf_counter()
    run_patch(case / "model.pt", str(case / "clean.npz"), case / "guard-only",
              settings=PatchSettings(repair=guard_only), **common)
    row["patch_seconds"] = round(time.perf_counter() - t0, 1)
    run_patch(case / "model.pt", str(case / "clean.npz"), case / "guard-all",
              settings=PatchSettings(repair=guard_only, calibration=CalibrationSettings(detectors=ALL)), **common)
    scan = json.loads((case / "work" / "scan" / "scan.json").read_text())
    index = [c["anomaly_index"] for c in scan["per_class"]]
    row["scan"] = {"flagged": scan["flagged_classes"], "max_index": round(max(index), 2),
                   "target_index": round(index[target], 2) if isinstance(target, int) and attack != "none" else None,
                   "seconds": round(scan["timings"]["scan_seconds"], 1)}
    data = load_dataset(str(case / "clean.npz"))
    _, _, test = split_clean(data, PatchSettings())
    x_trig, goal = triggered(case, data, test.x, test.y)
    for label in LABELS:
        manifest = json.loads((case / label / "guard.json").read_text())
        row[label] = runtime(case / label, test.x, x_trig, goal) if len(x_trig) else \
            {"frr": manifest["evaluation"]["frr"]}
        row[label]["detectors"] = manifest["verdict"]["detectors"]
    (case / "row.json").write_text(json.dumps(row, indent=2))
    return row


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [f"Machine: {platform.machine()}, CPU, {__import__('os').cpu_count()} cores; ResNet-18 width {WIDTH}, "
             f"{EPOCHS} epochs, signs {PER_CLASS} per class; the defender's clean data {CLEAN_IMAGES} images.", "",
             "| model | target | clean acc | ASR | scan: flagged | target's index | max index | scan time (CPU) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["scan"]
        lines.append(f"| {r['model']} | {r['target'] if r['attack'] != 'none' else '-'} | "
                     f"{_pct(r['clean_accuracy'])} | {_pct(r['asr'])} | {s['flagged'] or 'none'} | "
                     f"{s['target_index'] if s['target_index'] is not None else '-'} | {s['max_index']} | "
                     f"{s['seconds']:.0f} s |")
    names = sorted({d for r in rows for label in LABELS for d in r[label].get("auroc", {})},
                   key=[*ALL, "activation"].index)
    lines += ["", "The guard, guard only (no repair), budget 1 %, on the patch job's test split:", "",
              "| model | verdict | clean refused | attacks through |" + "".join(f" AUROC {d} |" for d in names),
              "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        for label in LABELS:
            g = r[label]
            auroc = g.get("auroc", {})
            lines.append(f"| {r['model']} | {' + '.join(g['detectors'])} | {_pct(g['frr'])} | "
                         f"{_pct(g.get('attacks_through'))} |"
                         + "".join(f" {auroc[d]:.3f} |" if d in auroc else " - |" for d in names))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out", help="(default: %(default)s)")
    parser.add_argument("--only", default=None, help="run only models whose name contains this")
    parser.add_argument("--fresh", action="store_true", help="redo models whose row an earlier run kept")
    parser.add_argument("--build-only", action="store_true", help="only train (and keep) the models not kept yet")
    args = parser.parse_args()
    out = Path(args.out)
    entries = [e for e in MODELS if not args.only or args.only in e[0]]
    train, clean = signs_splits()
    for entry in entries:
        case = out / "rgb" / entry[0]
        if args.build_only:
            if not (KEPT / entry[0] / "model.pt").is_file():
                summary = build_case(case, entry, train, clean)
                print(f"kept {entry[0]}: accuracy {summary['clean_accuracy']:.3f}, ASR "
                      f"{summary.get('attack_success_rate')}, {summary.get('train_seconds')} s", flush=True)
            continue
        if args.fresh or not (case / "row.json").is_file():
            print(json.dumps(model_row(out, entry, train, clean)), flush=True)
    if args.build_only:
        return
    rows = [json.loads(p.read_text()) for p in (out / "rgb" / e[0] / "row.json" for e in MODELS) if p.is_file()]
    (out / "rgb.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "rgb.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
