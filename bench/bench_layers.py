"""Trigger-free feature detectors below the features layer: which layers tell a triggered input from a clean one.

Run: ``.venv/bin/python bench/bench_layers.py [--only NAME] [--out bench-out]``

Exploration for issue 32: on models whose backdoor maps triggered inputs onto the target class's clean features
at the penultimate layer, the guard's k-NN detector (cosine distance to the k-th nearest clean features of the
predicted class) is blind; earlier layers still see the source image. For every model kept in
``bench/models/`` (``bench_matrix.py --build-only``) this scores, on the patch job's own splits (fit half A:
references, fit half B: the detectors' clean statistics, calibration: the 1 % threshold, test: measured):

- ``knn@LAYER``: the k-NN distance at each leaf layer's output;
- ``layers``: the largest of the per-layer k-NN distances, each standardised by its clean mean and spread
  on fit half B (one strong layer is enough);
- ``ted``: TED (Mo et al., S&P 2024) as a rank trajectory: at each layer, the rank of the nearest reference
  of the predicted class among all references; the trajectory of log ranks scored by its Mahalanobis
  distance to clean trajectories (fit half B).

For each: AUROC between clean and triggered test inputs, and the share of triggered inputs answered with the
attacker's class that it alone lets through at a 1 % clean threshold set on the calibration images. Writes
``<out>/layers.json`` and ``<out>/layers.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matrix import KEPT, MATRIX, build_case  # noqa: E402
from bench_verdict import triggered  # noqa: E402

from guard.screens import KnnDensity  # noqa: E402
from offline.data import load_dataset  # noqa: E402
from offline.models import load_model  # noqa: E402
from offline.patch.job import PatchSettings, split_clean  # noqa: E402


def layer_outputs(model, x: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    """Each layer's output on ``x``, flattened and L2-normalised."""
    out: dict[str, np.ndarray] = {}
    for name in layers:
        f = np.concatenate([model.layer_output(name, torch.from_numpy(x[i:i + 512])).flatten(1).numpy()
                            for i in range(0, len(x), 512)]).astype(np.float32)
        out[name] = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return out


def knn_distance(ref: np.ndarray, ref_labels: np.ndarray, f: np.ndarray, predicted: np.ndarray, k: int = 5
                 ) -> np.ndarray:
    """The guard's k-NN score (cosine distance to the k-th nearest reference of the predicted class)."""
    return KnnDensity(ref, ref_labels, k).feature_scores(f, predicted)


def nearest_rank(ref: np.ndarray, ref_labels: np.ndarray, f: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """TED's rank: how many references (of any class) lie nearer than the nearest one of the predicted class."""
    sims = f @ ref.T
    best_same = np.where(ref_labels[None, :] == predicted[:, None], sims, -np.inf).max(axis=1)
    return (sims > best_same[:, None]).sum(axis=1)


def model_rows(case: Path, name: str) -> dict[str, Any]:
    data = load_dataset(str(case / "clean.npz"))
    fit, calib, test = split_clean(data, PatchSettings())
    x_trig, goal = triggered(case, data, test.x, test.y)
    model = load_model(case / "model.pt", data.x[:8])
    layers = [n for n, m in model.leaf_modules() if type(m).__name__ in ("ReLU", "MaxPool2d")] or \
        [n for n, _ in model.leaf_modules()]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(fit))
    a, b = order[: len(order) // 2], order[len(order) // 2:]
    parts = {"a": fit.x[a], "b": fit.x[b], "calib": calib.x, "test": test.x, "trig": x_trig}
    with torch.no_grad():
        pred = {k: model(torch.from_numpy(v)).argmax(1).numpy() for k, v in parts.items()}
    feats = {k: layer_outputs(model, v, layers) for k, v in parts.items()}
    for k, v in parts.items():  # the input itself, as a layer
        f = v.reshape(len(v), -1).astype(np.float32)
        feats[k]["input"] = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    layers = ["input", *layers]
    hit = pred["trig"] == goal
    scores: dict[str, dict[str, np.ndarray]] = {}
    for layer in layers:
        ref, lab = feats["a"][layer], pred["a"]
        scores[f"knn@{layer}"] = {k: knn_distance(ref, lab, feats[k][layer], pred[k]) for k in ("b", "calib", "test",
                                                                                                 "trig")}
    for layer in layers[-3:]:
        ref, lab = feats["a"][layer], pred["a"]
        for k in (10, 20):
            scores[f"knn{k}@{layer}"] = {p: knn_distance(ref, lab, feats[p][layer], pred[p], k=k)
                                         for p in ("b", "calib", "test", "trig")}
    for layer in layers:
        ref, lab = feats["a"][layer], pred["a"]
        # the predicted class's k-NN distance over the nearest other class's: an atypical clean image is far
        # from every class, a triggered one near its source class
        def ratio(p: str, layer: str = layer, ref=ref, lab=lab) -> np.ndarray:
            own = knn_distance(ref, lab, feats[p][layer], pred[p])
            others = np.min([np.where(pred[p] == c, np.inf, knn_distance(ref, lab, feats[p][layer],
                                                                          np.full(len(pred[p]), c)))
                             for c in np.unique(lab)], axis=0)
            return own / np.maximum(others, 1e-9)
        scores[f"ratio@{layer}"] = {p: ratio(p) for p in ("b", "calib", "test", "trig")}
    # one strong layer is enough: the largest standardised per-layer distance
    stats = {layer: (scores[f"knn@{layer}"]["b"].mean(), scores[f"knn@{layer}"]["b"].std() + 1e-9)
             for layer in layers}
    scores["layers"] = {k: np.max([(scores[f"knn@{layer}"][k] - m) / s for layer, (m, s) in stats.items()], axis=0)
                        for k in ("b", "calib", "test", "trig")}
    scores["layers-sum"] = {k: np.sum([(scores[f"knn@{layer}"][k] - m) / s for layer, (m, s) in stats.items()],
                                      axis=0) for k in ("b", "calib", "test", "trig")}
    traj = {k: np.stack([np.log1p(nearest_rank(feats["a"][layer], pred["a"], feats[k][layer], pred[k]))
                         for layer in layers], axis=1) for k in ("b", "calib", "test", "trig")}
    lw = LedoitWolf().fit(traj["b"])
    scores["ted"] = {k: lw.mahalanobis(v) for k, v in traj.items()}
    row: dict[str, Any] = {"model": name, "layers": layers, "asr": float(hit.mean()) if len(hit) else None,
                           "detectors": {}}
    for det, s in scores.items():
        threshold = np.quantile(s["calib"], 0.99)
        auroc = float(roc_auc_score(np.r_[np.zeros(len(s["test"])), np.ones(len(s["trig"]))],
                                    np.r_[s["test"], s["trig"]])) if len(s["trig"]) else None
        row["detectors"][det] = {"auroc": auroc, "frr": float((s["test"] > threshold).mean()),
                                 "through": float(((s["trig"] <= threshold) & hit).mean()) if len(hit) else None}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(d for r in rows for d in r["detectors"]))
    lines = ["Per-layer trigger-free detectors (`bench/bench_layers.py`): AUROC clean vs triggered test inputs / "
             "% of triggered inputs answered with the attacker's class let through alone at a 1 % clean threshold "
             "(calibration split).", "",
             "| model | ASR % | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            d = r["detectors"].get(n)
            cells.append("-" if not d or d["auroc"] is None else f"{d['auroc']:.2f} / {100 * d['through']:.0f}")
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.0f}"
        lines.append(f"| {r['model']} | {asr} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="models whose name contains this (comma-separated)")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    out = Path(args.out)
    wanted = args.only.split(",") if args.only else None
    rows = []
    for entry in MATRIX:
        name = entry[0]
        if entry[1] == "none" or (wanted and not any(w in name for w in wanted)):
            continue
        case = out / "matrix" / name
        if not (case / "model.pt").is_file():
            if not (KEPT / name / "model.pt").is_file():
                print(f"skip {name}: not kept (bench_matrix.py --build-only)", flush=True)
                continue
            build_case(case, entry)
        rows.append(model_rows(case, name))
    (out / "layers.json").write_text(json.dumps(rows, indent=1))
    (out / "layers.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
