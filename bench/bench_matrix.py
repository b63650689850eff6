"""The coverage matrix: every attack simulator against every detector trojan-guard ships.

Run: ``.venv/bin/python bench/bench_matrix.py [--only NAME] [--fresh] [--out bench-out]``

For every attack of ``trojan-forensics train`` (two models each: different
seeds, targets and trigger positions, none used to choose any setting) and two
clean models, trained on the embedded MNIST digits (3,500 images; the other
1,500 are the defender's clean data), it measures:

- model level: the Neural Cleanse verdict of the default patch job (flagged
  classes, the target's anomaly index) and a TABOR scan on the same fit split;
- training data, where the attack poisons a fixed set of rows: activation
  clustering and spectral signatures precision and recall against ``poison_idx``;
- run time, on the patch job's test split (never used for the scan, repair or
  calibration): guard only (``--repair none``) and after the default repair,
  each screen's AUROC between clean and triggered test inputs, the share of
  triggered inputs answered with the attacker's class through the guard at the
  bundle's calibrated operating point, and the clean FRR measured there;
- repair: true-trigger ASR and clean accuracy before and after (the exported
  ONNX model of the bundle, as the guard serves it).

Triggered inputs are the test split's images whose backdoor class differs from
their label, carrying the true trigger (for all-to-all, class c goes to c + 1).
Each model's row is kept in ``<out>/matrix/<model>/row.json`` and reused by a
later run (``--fresh`` redoes them); the run writes ``<out>/matrix.json`` and
``<out>/matrix.md`` (the full tables, in docs/lab/coverage-matrix.md) and
``<out>/matrix-summary.md`` (one line per model, the README's table).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_verdict import triggered  # noqa: E402

from guard.backends import EmbeddedBackend  # noqa: E402
from guard.bundle import GuardBundle  # noqa: E402
from offline.attacks import BlendTrigger, PatchTrigger  # noqa: E402
from offline.attacks.adaptive_blend import AdaptiveBlendSettings  # noqa: E402
from offline.attacks.clean_label import CleanLabelSettings  # noqa: E402
from offline.attacks.dynamic import DynamicSettings  # noqa: E402
from offline.attacks.latent import LatentSettings  # noqa: E402
from offline.attacks.registry import build_attack, save_case  # noqa: E402
from offline.attacks.sig import SigSettings  # noqa: E402
from offline.attacks.tact import TactSettings  # noqa: E402
from offline.attacks.trojannn import TrojanNNSettings  # noqa: E402
from offline.attacks.wanet import WaNetSettings  # noqa: E402
from offline.audit import audit, detection_quality  # noqa: E402
from offline.data import load_dataset, load_mnist  # noqa: E402
from offline.models import load_model  # noqa: E402
from offline.patch.export import INPUT_NAME  # noqa: E402
from offline.patch.job import SCAN_SHARE, PatchSettings, run_patch, split_clean  # noqa: E402
from offline.patch.repair import RepairSettings  # noqa: E402
from offline.scan.neural_cleanse import NeuralCleanseConfig, scan  # noqa: E402

# (name, attack, target, seed, build keyword arguments); seeds 101+ are used nowhere else in the project
MATRIX: list[tuple[str, str, int, int, dict[str, Any]]] = [
    ("clean-1", "none", 0, 101, {}),
    ("clean-2", "none", 0, 102, {}),
    ("badnets-3x3-top-right", "badnets", 4, 103, {"trigger": PatchTrigger(3, row=2, col=23)}),
    ("badnets-4x4-bottom-left-checker", "badnets", 8, 104,
     {"trigger": PatchTrigger(4, row=22, col=3, pattern="checker")}),
    ("blend-0.12", "blend", 1, 105, {"trigger": BlendTrigger(0.12, seed=105)}),
    ("blend-0.2", "blend", 9, 106, {"trigger": BlendTrigger(0.2, seed=106)}),
    ("invisible-eps0.1", "invisible", 3, 107, {"eps": 0.1}),
    ("invisible-eps0.08", "invisible", 6, 108, {"eps": 0.08}),
    ("all-to-all-3x3-top-left", "all-to-all", 0, 109, {"trigger": PatchTrigger(3, row=1, col=1)}),
    ("all-to-all-4x4-bottom-right", "all-to-all", 0, 110, {"trigger": PatchTrigger(4)}),
    ("wanet-a", "wanet", 0, 111, {"settings": WaNetSettings()}),
    ("wanet-b", "wanet", 7, 112, {"settings": WaNetSettings()}),
    ("adaptive-blend-a", "adaptive-blend", 6, 115, {"settings": AdaptiveBlendSettings()}),
    ("adaptive-blend-b", "adaptive-blend", 3, 116, {"settings": AdaptiveBlendSettings()}),
    ("sig-a", "sig", 4, 117, {"settings": SigSettings()}),
    ("sig-b", "sig", 8, 118, {"settings": SigSettings(frequency=4.0)}),
    ("dynamic-a", "dynamic", 5, 119, {"settings": DynamicSettings()}),
    ("dynamic-b", "dynamic", 1, 120, {"settings": DynamicSettings()}),
    ("trojannn-bottom-right", "trojannn", 3, 121, {"settings": TrojanNNSettings()}),
    ("trojannn-top-left", "trojannn", 9, 122, {"settings": TrojanNNSettings(mask_row=1, mask_col=1)}),
    ("clean-label-a", "clean-label", 2, 123, {"settings": CleanLabelSettings()}),
    ("clean-label-b", "clean-label", 7, 124, {"settings": CleanLabelSettings()}),
    # attacks made to beat the guard's feature-space detectors (issue 32)
    ("tact-a", "tact", 5, 125, {"settings": TactSettings()}),
    ("tact-b", "tact", 1, 126, {"settings": TactSettings()}),
    ("latent-a", "latent", 2, 127, {"settings": LatentSettings()}),
    ("latent-b", "latent", 6, 128, {"settings": LatentSettings()}),
]


def auroc(clean: np.ndarray, triggered: np.ndarray) -> float:
    """Area under the ROC curve, triggered inputs positive, higher scores more suspicious."""
    labels = np.r_[np.zeros(len(clean)), np.ones(len(triggered))]
    return float(roc_auc_score(labels, np.concatenate([clean, triggered])))


def runtime(bundle_dir: Path, x_clean: np.ndarray, x_trig: np.ndarray, goal: np.ndarray) -> dict[str, Any]:
    """Each detector's AUROC and the guard's operating point (its one verdict), with the bundle as served."""
    bundle = GuardBundle.load(bundle_dir)
    screen = bundle.screen(seed=7)
    backend = EmbeddedBackend(bundle.model_path, INPUT_NAME, extra_outputs=screen.model_outputs)

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        parts = [screen.run(backend.infer, x[i:i + 256]) for i in range(0, len(x), 256)]
        return {"pred": np.concatenate([p.predicted for p in parts]),
                "scores": np.concatenate([p.scores for p in parts]),
                "flagged": np.concatenate([p.flagged for p in parts])}

    clean, trig = run(x_clean), run(x_trig)
    hit = trig["pred"] == goal
    backend.close()
    # oriented so that higher is more suspicious (STRIP: low entropy)
    sign = {d.name: -1.0 if d.side == "low" else 1.0 for d in screen.detectors}
    return {"auroc": {d: round(auroc(sign[d] * clean["scores"][:, i], sign[d] * trig["scores"][:, i]), 4)
                      for i, d in enumerate(screen.names)},
            "frr": round(float(clean["flagged"].mean()), 4),
            "model_asr": round(float(hit.mean()), 4),
            "attacks_through": round(float((~trig["flagged"] & hit).mean()), 4)}


def runtime_rows(case: Path, row: dict[str, Any]) -> dict[str, Any]:
    """The patch job (default repair) and the guard-only job, reusing the scan; their run-time figures."""
    summary = json.loads((case / "attack.json").read_text())
    data = load_dataset(str(case / "clean.npz"))
    _, _, test = split_clean(data, PatchSettings())
    common = dict(work_dir=case / "work", progress=False, say=lambda _: None)
    t0 = time.perf_counter()
    patched = run_patch(case / "model.pt", str(case / "clean.npz"), case / "bundle", **common)
    guard_only = run_patch(case / "model.pt", str(case / "clean.npz"), case / "guard-only",
                           settings=PatchSettings(repair=RepairSettings(method="none")), **common)
    row["patch_seconds"] = round(time.perf_counter() - t0, 1)
    if summary.get("attack", "none") != "none":
        x_trig, goal_trig = triggered(case, data, test.x, test.y)
        for label, bundle in (("guard_only", case / "guard-only"), ("patched", case / "bundle")):
            row[label] = runtime(bundle, test.x, x_trig, goal_trig)
        rep = json.loads((case / "bundle" / "guard.json").read_text())["repair"]
        row["repair"] = {"method": rep["method"], "acc_before": rep["before"]["accuracy"],
                         "acc_after": rep["after"]["accuracy"], "asr_before": row["guard_only"]["model_asr"],
                         "asr_after": row["patched"]["model_asr"]}
    else:
        for label, job in (("guard_only", guard_only), ("patched", patched)):
            row[label] = {"frr": job["evaluation"]["frr"]}
    return row


# the matrix's trained models, kept in the repository: model.pt, attack.json and the trigger's files (~100 kB each)
KEPT = Path(__file__).resolve().parent / "models"
KEPT_FILES = ("attack.json", "trigger_*", "*.pt")  # *.pt: the model and any trigger network


def build_case(case: Path, entry: tuple[str, str, int, int, dict[str, Any]]) -> tuple[dict[str, Any], Any, float]:
    """The model of a matrix entry in ``case``: from ``bench/models/<name>`` when kept there, else trained (and
    then kept). The held-out clean split is rebuilt from its seed; ``train.npz`` exists only for a model trained
    in this run. Returns attack.json's content, the attack's result (None when reused) and the build seconds."""
    name, attack, target, seed, kwargs = entry
    started = time.perf_counter()
    train, held_out = load_mnist().split(0.3, seed=0)
    kept = KEPT / name
    if (kept / "model.pt").is_file() and (kept / "attack.json").is_file():
        case.mkdir(parents=True, exist_ok=True)
        for f in kept.iterdir():
            shutil.copy2(f, case / f.name)
        held_out.save_npz(case / "clean.npz")
        return json.loads((case / "attack.json").read_text()), None, time.perf_counter() - started
    result = build_attack(attack, train, held_out, target, seed, **kwargs)
    built = time.perf_counter() - started
    summary = save_case(case, attack, result, train, held_out, "mnist")
    kept.mkdir(parents=True, exist_ok=True)
    for pattern in KEPT_FILES:
        for f in case.glob(pattern):
            shutil.copy2(f, kept / f.name)
    return summary, result, built


def model_row(case: Path, name: str, attack: str, target: int, seed: int, kwargs: dict[str, Any]) -> dict:
    started = time.perf_counter()
    summary, result, built = build_case(case, (name, attack, target, seed, kwargs))
    backdoored = attack != "none"
    rule, true_target = summary["label_rule"], summary["target"]
    row: dict[str, Any] = {"model": name, "attack": attack, "target": "c+1" if rule == "all-to-all" else true_target,
                           "clean_accuracy": summary["clean_accuracy"], "asr": summary["attack_success_rate"],
                           "build_seconds": round(built, 1)}

    # the patch job: Neural Cleanse, default repair; then guard only, reusing the scan
    data = load_dataset(str(case / "clean.npz"))
    runtime_rows(case, row)
    nc_index = json.loads((case / "work" / "scan" / "result.json").read_text())["result"]["anomaly_index"]
    flagged = json.loads((case / "work" / "scan" / "result.json").read_text())["result"]["flagged"]
    row["nc"] = {"flagged": flagged, "target_index": None if true_target is None
                 else round(nc_index[true_target], 2), "max_index": round(max(nc_index), 2)}

    # TABOR on the scan's own split of the clean data
    scan_fit, scan_held, _ = split_clean(data, PatchSettings(), SCAN_SHARE)
    model = load_model(case / "model.pt", data.x[:8])
    t0 = time.perf_counter()
    tabor = scan(model, scan_fit.x, scan_held.x, scan_held.y, data.num_classes, NeuralCleanseConfig(method="tabor"))
    ti = tabor.median_anomaly_index
    row["tabor"] = {"flagged": tabor.flagged, "target_index": None if true_target is None
                    else round(float(ti[true_target]), 2), "max_index": round(float(ti.max()), 2),
                    "seconds": round(time.perf_counter() - t0, 1)}

    if backdoored and result is not None and len(result.poison_idx):
        poisoned = np.load(case / "train.npz")
        found = audit(model, poisoned["x"], poisoned["y"])
        row["audit"] = {"flagged_labels": found["flagged_classes"],
                        "ac": detection_quality(found["activation_clustering"]["flagged_indices"], result.poison_idx),
                        "ss": detection_quality(found["spectral_signatures"]["removed_indices"], result.poison_idx)}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v * 100:.{digits}f}"


def _verdict(found: dict, target: Any, backdoored: bool) -> str:
    flagged = found["flagged"]
    if not backdoored:
        return "clean" if not flagged else f"**FP {flagged}**"
    if not flagged:
        return f"**miss** ({found['target_index'] if found['target_index'] is not None else found['max_index']})"
    right = target == "c+1" or target in flagged
    index = found["target_index"] if found["target_index"] is not None else found["max_index"]
    extra = [k for k in flagged if k != target] if target != "c+1" else []
    return (f"{target} ({index})" + (f" +{extra}" if extra else "")) if right else f"**wrong {flagged}**"


def markdown(rows: list[dict], seconds: float) -> str:
    lines = [
        "Coverage matrix (`bench/bench_matrix.py`): each attack against each detector, embedded MNIST, "
        "1,500 clean images for the defender (patch job split 60/20/20), default settings.",
        "",
        "**Model and training-data detectors.** NC / TABOR: the class flagged (its anomaly index), "
        "**miss** (the target's index) or a false positive; AC / SS: activation clustering and spectral "
        "signatures, precision / recall (%) on the poisoned rows (- where no fixed rows are poisoned). "
        "ASR on held-out images of other classes; for clean-label, whether its one target image flipped "
        "(100 or 0), and the run-time columns below are that one image.",
        "",
        "| model | attack | target | ACC % | ASR % | Neural Cleanse | TABOR | AC P / R | SS P / R |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        backdoored = r["attack"] != "none"
        a = r.get("audit")
        ac = f"{_pct(a['ac']['precision'], 0)} / {_pct(a['ac']['recall'], 0)}" if a else "-"
        ss = f"{_pct(a['ss']['precision'], 0)} / {_pct(a['ss']['recall'], 0)}" if a else "-"
        lines.append(f"| {r['model']} | {r['attack']} | {r['target'] if backdoored else '-'} | "
                     f"{_pct(r['clean_accuracy'])} | {_pct(r['asr'])} | {_verdict(r['nc'], r['target'], backdoored)} "
                     f"| {_verdict(r['tabor'], r['target'], backdoored)} | {ac} | {ss} |")
    lines += [
        "",
        "**Run time** (test split, triggered = true trigger on images of other classes): AUROC of each detector "
        "between clean and triggered inputs (STRIP / k-NN / activation filter, - where the bundle does not use "
        "it: the filter joins only where the scan flagged a class); *through* = triggered inputs answered with "
        "the attacker's class through the guard's one verdict (budget 1 %); FRR = clean inputs refused there (%).",
        "",
        "| model | guard only: AUROC STRIP / k-NN / filter | through % | FRR % | repaired: AUROC STRIP / k-NN / "
        "filter | through % | FRR % |",
        "|---|---|---|---|---|---|---|",
    ]

    def aurocs(g: dict) -> str:
        return " / ".join("-" if d not in g["auroc"] else f"{g['auroc'][d]:.3f}" for d in ("strip", "knn",
                                                                                          "activation"))

    for r in rows:
        g, p = r["guard_only"], r["patched"]
        if r["attack"] == "none":
            lines.append(f"| {r['model']} | - | - | {_pct(g['frr'])} | - | - | {_pct(p['frr'])} |")
            continue
        lines.append(f"| {r['model']} | {aurocs(g)} | {_pct(g['attacks_through'])} | {_pct(g['frr'])} | "
                     f"{aurocs(p)} | {_pct(p['attacks_through'])} | {_pct(p['frr'])} |")
    lines += [
        "",
        "**Repair** (default: unlearning the reversed trigger of the flagged class; none when nothing is "
        "flagged): true-trigger ASR and clean accuracy on the test split, before -> after (%).",
        "",
        "| model | repair | ASR before -> after | ACC before -> after |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r["attack"] == "none":
            continue
        rp = r["repair"]
        lines.append(f"| {r['model']} | {rp['method']} | {_pct(rp['asr_before'])} -> {_pct(rp['asr_after'])} | "
                     f"{_pct(rp['acc_before'])} -> {_pct(rp['acc_after'])} |")
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"{len(rows)} models; {total / 60:.0f} min of model time in all (this run: {seconds / 60:.0f} "
              f"min wall, rows from earlier runs reused), 2-core CPU; a row's time is with "
              f"{'/'.join(sorted({str(r.get('threads', 2)) for r in rows}))} torch thread(s)."]
    return "\n".join(lines) + "\n"


def _run_model(out: Path, entry: tuple[str, str, int, int, dict[str, Any]], threads: int | None = None) -> dict:
    """One model's row, written to ``<out>/matrix/<model>/row.json``; ``threads`` sets torch's (a worker of
    ``--jobs``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    name, attack, target, seed, kwargs = entry
    case = out / "matrix" / name
    if case.exists():
        shutil.rmtree(case)
    row = model_row(case, name, attack, target, seed, kwargs)
    row["threads"] = threads
    (case / "row.json").write_text(json.dumps(row, indent=2))
    return row


def summary_markdown(rows: list[dict]) -> str:
    """One line per model: the README's table (``matrix.md`` has the full one)."""
    lines = ["| model | ASR % | Neural Cleanse | TABOR | audit recall AC / SS % | through the guard, unrepaired "
             "% (FRR) | after repair: ASR % / through % (FRR) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        backdoored = r["attack"] != "none"
        g, p = r["guard_only"], r["patched"]
        a = r.get("audit")
        audit_cell = f"{_pct(a['ac']['recall'], 0)} / {_pct(a['ss']['recall'], 0)}" if a else "-"
        if not backdoored:
            lines.append(f"| {r['model']} | - | {_verdict(r['nc'], None, False)} | {_verdict(r['tabor'], None, False)} "
                         f"| - | - ({_pct(g['frr'])}) | - / - ({_pct(p['frr'])}) |")
            continue
        lines.append(f"| {r['model']} | {_pct(r['asr'])} | {_verdict(r['nc'], r['target'], True)} | "
                     f"{_verdict(r['tabor'], r['target'], True)} | {audit_cell} | {_pct(g['attacks_through'])} "
                     f"({_pct(g['frr'])}) | {_pct(r['repair']['asr_after'])} / {_pct(p['attacks_through'])} "
                     f"({_pct(p['frr'])}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out", help="(default: %(default)s)")
    parser.add_argument("--only", default=None, help="run only models whose name contains this")
    parser.add_argument("--fresh", action="store_true", help="redo models whose row an earlier run kept")
    parser.add_argument("--runtime-only", action="store_true",
                        help="keep the kept rows' model and data columns and redo only the patch jobs and their "
                             "run-time figures (after a change to the guard; the scans are reused)")
    parser.add_argument("--build-only", action="store_true",
                        help="only train the models that bench/models/ does not keep yet (and keep them)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models built and scanned at once, one process each with one torch thread "
                             "(default: %(default)s, with torch's own thread count)")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    entries = [e for e in MATRIX if not args.only or args.only in e[0]]
    if args.build_only:
        for e in entries:
            if not (KEPT / e[0] / "model.pt").is_file():
                print(f"training {e[0]}", flush=True)
                summary = build_case(out / "matrix" / e[0], e)[0]
                print(f"kept {e[0]}: accuracy {summary['clean_accuracy']:.3f}, "
                      f"ASR {summary.get('attack_success_rate')}", flush=True)
        return
    todo = [e for e in entries if args.fresh or not (out / "matrix" / e[0] / "row.json").is_file()]
    print(f"{len(entries)} models, {len(entries) - len(todo)} kept from an earlier run, {len(todo)} to run "
          f"({args.jobs} at once)", flush=True)
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_run_model, out, e, 1) for e in todo]
            for future in as_completed(futures):
                print(json.dumps(future.result()), flush=True)
    else:
        for entry in todo:
            print(json.dumps(_run_model(out, entry)), flush=True)
    if args.runtime_only:
        for e in entries:
            if e in todo:
                continue
            case = out / "matrix" / e[0]
            row = runtime_rows(case, json.loads((case / "row.json").read_text()))
            (case / "row.json").write_text(json.dumps(row, indent=2))
            print(json.dumps(row), flush=True)
    rows = [json.loads((out / "matrix" / e[0] / "row.json").read_text()) for e in entries]
    seconds = time.perf_counter() - started
    (out / "matrix.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows, seconds)
    (out / "matrix.md").write_text(table)
    (out / "matrix-summary.md").write_text(summary_markdown(rows))
    print(table)


if __name__ == "__main__":
    main()
