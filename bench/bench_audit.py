"""Training-data audit over poisoned sets no audit setting was chosen on: precision, recall, F1, clean rows flagged.

Run: ``.venv/bin/python bench/bench_audit.py [--rates 0.01,0.03,0.1,0.2] [--only NAME,...] [--parts sets,timing,signs]``

``sets``: for every family and poison rate it trains the project's CNN on the embedded MNIST digits (3,500
training images), poisoned by the simulator, and audits the training set as trained on with every method
that needs no scan:

- Activation Clustering with exclusionary reclassification (``ac``), Spectral Signatures removing 1.5 x the
  default expected rate of 10 % per label (``ss``: a user who does not know the rate);
- the clean-anchored spectral audit (``anchored``) with 500 clean images the model never saw (the held-out
  split), the defender's reference.

Families: BadNets patches of three sizes and positions (3x3 top-left white, 4x4 bottom-right white, 5x5 centre
checker), blended noise (alpha 0.15), WaNet, Adaptive-Blend (poisoned rows relabelled), SIG (clean-label:
the target's own images carry the signal, labels correct; at most the target's share of the set), and one
feature-collision set (clean-label, 50 poisons made to collide with one test image; its ASR is whether that
image flips). Three clean
models give the share of rows flagged where there is nothing to find. The audit's settings were chosen on
other triggers, targets and seeds (docs/lab/audit.md); the seeds here are not theirs.

Each row is written to ``OUT/rows/<name>.json`` as it finishes, and a row already there is not run again
(``--fresh`` reruns). ``timing``: a 60,000-image set (the 3,500 training digits repeated with shifts of up to
two pixels, 10 % poisoned by the 4x4 patch, a model trained on it) audited with every method: wall time of the
audit and the process's peak resident memory. ``signs``: the 43-class RGB ResNet-18s that ``bench_rgb.py`` keeps
in bench/models (BadNets, blend, WaNet), their poisoned training sets rebuilt from the same seeds.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.attacks import BlendTrigger, PatchTrigger, apply_poison, train_backdoored_model  # noqa: E402
from offline.attacks.adaptive_blend import AdaptiveBlendSettings, train_adaptive_blend  # noqa: E402
from offline.attacks.clean_label import CleanLabelSettings, train_clean_label  # noqa: E402
from offline.attacks.sig import SigSettings, train_sig  # noqa: E402
from offline.attacks.training import attack_success_rate, new_model, predict, train_classifier  # noqa: E402
from offline.attacks.wanet import WaNetSettings, train_wanet  # noqa: E402
from offline.audit import audit, detection_quality  # noqa: E402
from offline.data import Dataset, load_mnist  # noqa: E402
from offline.models import ForensicModel  # noqa: E402

# (family, target); the seed of a set is 100 + 10 * its family's position + its rate's position
FAMILIES = (
    ("patch-3x3-top-left-white", 1), ("patch-4x4-bottom-right-white", 3), ("patch-5x5-centre-checker", 6),
    ("blend-0.15", 8), ("wanet", 2), ("adaptive-blend", 9), ("sig", 4),
)
PATCHES = {"patch-3x3-top-left-white": PatchTrigger(3, row=1, col=1),
           "patch-4x4-bottom-right-white": PatchTrigger(4),
           "patch-5x5-centre-checker": PatchTrigger(5, row=11, col=11, pattern="checker")}
CLEAN_SEEDS = (201, 202, 203)
METHODS = ("ac", "ss", "anchored")
REFERENCE_CLEAN = 500


EPOCHS = {"wanet": WaNetSettings().epochs, "adaptive-blend": AdaptiveBlendSettings().epochs,
          "sig": SigSettings().epochs}  # the attacks' training recipes; BadNets and blend: 8


def poisoned_set(family: str, target: int, rate: float, seed: int, train: Dataset, test: Dataset) -> tuple[
        Any, np.ndarray, np.ndarray]:
    """Train on ``train`` poisoned by ``family`` at ``rate`` of the set; the model and the set as trained on."""
    if family in PATCHES or family == "blend-0.15":
        trigger = PATCHES.get(family) or BlendTrigger(0.15, seed=seed)
        bd = train_backdoored_model(train, test, trigger, target, rate, seed=seed)
        x, y = apply_poison(train.x, train.y, trigger, target, bd.poison_idx)
        return bd, x, y
    if family == "wanet":
        bd = train_wanet(train, test, target, replace(WaNetSettings(), poison_rate=rate), seed=seed)
    elif family == "adaptive-blend":
        bd = train_adaptive_blend(train, test, target, replace(AdaptiveBlendSettings(), poison_rate=rate), seed=seed)
    elif family == "feature-collision":  # clean-label, one target image; ``rate``: its default 50 poisons
        bd = train_clean_label(train, test, target, CleanLabelSettings(), seed=seed)
    elif family == "sig":  # clean-label: only the target's own images can carry it
        share = min(1.0, rate * len(train) / int((train.y == target).sum()))
        bd = train_sig(train, test, target, replace(SigSettings(), target_share=share), seed=seed)
    else:
        raise ValueError(family)
    return bd, bd.train_x, bd.train_y


def quality(flagged: list[int], truth: np.ndarray, size: int, covers: np.ndarray | None = None) -> dict[str, float]:
    """Precision, recall, F1 against the poison rows; the share of clean rows flagged (cover rows, which carry
    the trigger with their labels kept, are not clean: their share flagged is given apart)."""
    q = detection_quality(flagged, truth)
    p, r = q["precision"], q["recall"]
    covers = np.zeros(0, dtype=int) if covers is None else np.asarray(covers)
    flagged_covers = len(set(flagged) & set(covers.tolist()))
    clean_rows = size - q["poisoned"] - len(covers)
    return {**q, "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
            "clean_flagged": round((q["flagged"] - q["hits"] - flagged_covers) / clean_rows, 4) if clean_rows else 0.0,
            **({"covers_flagged": round(flagged_covers / len(covers), 4)} if len(covers) else {})}


def run_set(name: str, family: str | None, target: int | None, rate: float, seed: int, train: Dataset,
            test: Dataset, reference: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    if family is None:
        bd = train_backdoored_model(train, test, None, 0, 0.0, seed=seed)
        x, y = train.x, train.y
    else:
        bd, x, y = poisoned_set(family, target, rate, seed, train, test)
    started = time.perf_counter()
    result = audit(ForensicModel(bd.model, "body.8"), x, y, clean=reference)
    seconds = time.perf_counter() - started
    flagged = {"ac": result["activation_clustering"]["flagged_indices"],
               "ss": result["spectral_signatures"]["removed_indices"],
               "anchored": result["anchored_spectral"]["flagged_indices"]}
    row = {"name": name, "family": family or "clean", "target": target, "rate": round(len(bd.poison_idx) / len(y), 4),
           "asked_rate": rate, "seed": seed, "poisoned": int(len(bd.poison_idx)),
           "clean_accuracy": round(bd.clean_accuracy, 4),
           "asr": None if bd.attack_success_rate is None else round(bd.attack_success_rate, 4),
           "ac_labels": result["flagged_classes"], "anchored_labels": result["anchored_spectral"]["flagged_classes"],
           "anchored_estimate": sum(c["estimated_poison"] for c in result["anchored_spectral"]["classes"]),
           "anchored_character": {c["label"]: c["character"]["family"]
                                  for c in result["anchored_spectral"]["classes"] if "character" in c},
           "seconds": round(seconds, 1),
           **{m: quality(flagged[m], bd.poison_idx, len(y), bd.cover_idx) for m in METHODS}}
    if family is not None:
        best = max(METHODS, key=lambda m: row[m]["f1"])
        row["best"], row["best_f1"] = best, row[best]["f1"]
        row["asr_without_anchored"] = exclusionary_retrain(x, y, flagged["anchored"], family, target, seed,
                                                           train, test, bd.trigger,
                                                           bd.details.get("target_image_index"))
    return row


def exclusionary_retrain(x: np.ndarray, y: np.ndarray, flagged: list[int], family: str, target: int, seed: int,
                         train: Dataset, test: Dataset, trigger: Any, target_image: int | None = None) -> float:
    """The paper's exclusionary check: the same network and recipe retrained without the flagged rows; the
    backdoor's success rate after (at the attack's test-time trigger)."""
    keep = np.ones(len(y), dtype=bool)
    keep[flagged] = False
    net = new_model(train, seed)
    train_classifier(net, x[keep], y[keep], epochs=EPOCHS.get(family, 8), seed=np.random.default_rng(seed))
    if trigger is None:  # feature collision: does its one target image still flip?
        return float(predict(net, test.x[target_image][None])[0] == target)
    return round(attack_success_rate(net, trigger, test.x, test.y, target), 4)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _character(r: dict[str, Any]) -> str:
    """The family read from the target label's flagged rows (other flagged labels after it)."""
    found = {int(k): v for k, v in r.get("anchored_character", {}).items()}
    if not found:
        return "-"
    first = [found.pop(r["target"])] if r["target"] in found else []
    return ", ".join(first + [f"{v} ({k})" for k, v in sorted(found.items())])


def table(rows: list[dict[str, Any]]) -> str:
    def cell(q: dict[str, float], poisoned: bool) -> str:
        if not poisoned:
            return f"{q['clean_flagged']:.1%} flagged"
        covers = f" (covers {q['covers_flagged']:.0%})" if "covers_flagged" in q else ""
        return f"{q['precision']:.2f} / {q['recall']:.2f} / **{q['f1']:.2f}**{covers}"

    lines = ["| set | rate | ASR | AC: P / R / F1 | SS: P / R / F1 | anchored: P / R / F1 | anchored: labels, "
             "estimated count (true) | character of the flagged rows | ASR retrained without anchored's rows | "
             "best F1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        poisoned = r["family"] != "clean"
        asr = _pct(r["asr"])
        lines.append(f"| {r['name']} | {r['rate']:.1%} | {asr} | {cell(r['ac'], poisoned)} | {cell(r['ss'], poisoned)} "
                     f"| {cell(r['anchored'], poisoned)} | {r['anchored_labels'] or '-'}, {r['anchored_estimate']} "
                     f"({r['poisoned']}) | {_character(r)} | {_pct(r.get('asr_without_anchored'))} | "
                     f"{r.get('best', '-')} "
                     f"{r.get('best_f1', '')} |")
    return "\n".join(lines)


def timing(train: Dataset, test: Dataset, reference: tuple[np.ndarray, np.ndarray], size: int) -> dict[str, Any]:
    """A model trained on ``size`` images (the training digits, each repeated with random shifts of up to two
    pixels), 10 % of them poisoned with the 4x4 BadNets patch; the audit of that set timed. The defender's
    clean images are shifted alike (they come from the distribution the model was trained on)."""
    rng = np.random.default_rng(0)
    cx, cy = reference
    reference = (np.stack([np.roll(im, tuple(rng.integers(-2, 3, size=2)), axis=(1, 2)) for im in cx]), cy)
    reps = -(-size // len(train))
    shifted = [np.roll(train.x, tuple(rng.integers(-2, 3, size=2)), axis=(2, 3)) for _ in range(reps)]
    big = Dataset(np.concatenate(shifted)[:size], np.tile(train.y, reps)[:size], f"{size} shifted MNIST digits")
    bd, x, y = poisoned_set("patch-4x4-bottom-right-white", 3, 0.1, 150, big, test)
    started = time.perf_counter()
    result = audit(ForensicModel(bd.model, "body.8"), x, y, clean=reference)
    seconds = time.perf_counter() - started
    return {"images": size, "seconds": round(seconds, 1), "asr": round(bd.attack_success_rate, 4),
            "anchored_labels": result["anchored_spectral"]["flagged_classes"],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **{m: quality(flagged, bd.poison_idx, size) for m, flagged in (
                ("ac", result["activation_clustering"]["flagged_indices"]),
                ("anchored", result["anchored_spectral"]["flagged_indices"]))}}


def signs(clean_images: int = REFERENCE_CLEAN) -> list[dict[str, Any]]:
    """The 43-class RGB ResNet-18s of ``bench_rgb.py`` (kept in bench/models; their 100 MB training sets rebuilt
    from the same seeds and draws as the attacks made them), audited with ``clean_images`` of the defender's
    clean images (about 12 per class at 500)."""
    from bench_rgb import signs_splits

    from offline.attacks.training import poison_indices
    from offline.attacks.wanet import warped_set
    from offline.models import load_model

    train, clean = signs_splits()
    rows = []
    for name, trigger, target, seed in (("signs-badnets", PatchTrigger(4, pattern="checker", seed=12), 14, 12),
                                        ("signs-blend", BlendTrigger(0.15, 13), 27, 13),
                                        ("signs-wanet", None, 33, 14)):
        cover = None
        if trigger is not None:  # train_backdoored_model: the seed's generator draws the poison rows first
            idx = poison_indices(train.y, target, 0.1, np.random.default_rng(seed))
            x, y = apply_poison(train.x, train.y, trigger, target, idx)
        else:
            _, idx, cover, x, y = warped_set(train, target, WaNetSettings(), seed, np.random.default_rng(seed))
        model = load_model(Path(__file__).resolve().parent / "models" / name / "model.pt", x[:8])
        pick = np.random.default_rng(0).choice(len(clean), min(clean_images, len(clean)), replace=False)
        started = time.perf_counter()
        result = audit(model, x, y, clean=(clean.x[pick], clean.y[pick]))
        row = {"name": name, "target": target, "poisoned": int(len(idx)), "label_rows": int((y == target).sum()),
               "clean_images": int(len(pick)), "seconds": round(time.perf_counter() - started, 1),
               "anchored_labels": result["anchored_spectral"]["flagged_classes"],
               "ac_labels": result["flagged_classes"],
               "anchored_character": {c["label"]: c["character"]["family"]
                                      for c in result["anchored_spectral"]["classes"] if "character" in c},
               "anchored": quality(result["anchored_spectral"]["flagged_indices"], idx, len(y), cover),
               "ac": quality(result["activation_clustering"]["flagged_indices"], idx, len(y), cover)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.01,0.03,0.1,0.2", help="poison rates, shares of the training set")
    parser.add_argument("--only", default=None, help="comma-separated families (or 'clean') to run")
    parser.add_argument("--parts", default="sets", help="comma-separated: sets, timing, signs (default: %(default)s)")
    parser.add_argument("--timing-images", type=int, default=60_000)
    parser.add_argument("--fresh", action="store_true", help="rerun rows already written")
    parser.add_argument("--out", default="bench-out/audit")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    train, held_out = load_mnist().split(0.3, seed=0)
    pick = np.random.default_rng(0).choice(len(held_out), REFERENCE_CLEAN, replace=False)
    reference = (held_out.x[pick], held_out.y[pick])
    parts = set(args.parts.split(","))
    only = set(args.only.split(",")) if args.only else None
    if "sets" in parts:
        todo: list[tuple[str, str | None, int | None, float, int]] = []
        rates = [float(r) for r in args.rates.split(",")]
        for i, (family, target) in enumerate(FAMILIES):
            for j, rate in enumerate(rates):
                todo.append((f"{family}-{rate:.0%}", family, target, rate, 100 + 10 * i + j))
        todo.append(("feature-collision-50", "feature-collision", 7, 50 / len(train), 170))
        todo += [(f"clean-{seed}", None, None, 0.0, seed) for seed in CLEAN_SEEDS]
        for name, family, target, rate, seed in todo:
            if only and (family or "clean") not in only:
                continue
            path = out / "rows" / f"{name}.json"
            if path.is_file() and not args.fresh:
                continue
            row = run_set(name, family, target, rate, seed, train, held_out, reference)
            path.write_text(json.dumps(row, indent=2))
            print(json.dumps({k: row[k] for k in ("name", "rate", "asr", "anchored_labels", "seconds")}
                             | {m: row[m]["f1"] for m in METHODS}), flush=True)
    if "timing" in parts:
        t = timing(train, held_out, reference, args.timing_images)
        (out / "timing.json").write_text(json.dumps(t, indent=2))
        print(json.dumps(t), flush=True)
    if "signs" in parts:
        (out / "signs.json").write_text(json.dumps(signs(), indent=2))
    order = {f"{f}-": i for i, (f, _) in enumerate((*FAMILIES, ("feature-collision", 0)))}
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    rows.sort(key=lambda r: (order.get(f"{r['family']}-", len(order)), r["rate"], r["name"]))
    (out / "audit.json").write_text(json.dumps(rows, indent=2))
    md = [f"# Training-data audit ({len(rows)} sets, `bench/bench_audit.py`)", "",
          "P / R / F1 against the simulator's poison rows; clean sets: share of rows flagged. "
          f"anchored: with {REFERENCE_CLEAN} held-out clean images.", "", table(rows)]
    if (out / "timing.json").is_file():
        t = json.loads((out / "timing.json").read_text())
        md += ["", f"Timing: {t['images']:,} images (4x4 patch, 10 %) audited with AC, SS and anchored in "
                   f"{t['seconds']} s on this machine, peak resident memory {t['peak_rss_mib']} MiB (the whole "
                   f"process, training included); anchored flagged labels {t.get('anchored_labels')}; "
                   f"F1: AC {t['ac']['f1']:.2f}, anchored {t['anchored']['f1']:.2f}; "
                   f"clean rows flagged: AC {t['ac']['clean_flagged']:.1%}, anchored "
                   f"{t['anchored']['clean_flagged']:.1%}."]
    if (out / "signs.json").is_file():
        md += ["", "43-class RGB ResNet-18s (`--parts signs`, 10 % poison, 500 clean images):", "",
               "| model | rows of the target label (poison) | anchored: P / R / F1, labels, character | AC | seconds |",
               "|---|---|---|---|---|"]
        for r in json.loads((out / "signs.json").read_text()):
            q = r["anchored"]
            md.append(f"| {r['name']} | {r['label_rows']} ({r['poisoned']}) | {q['precision']:.2f} / {q['recall']:.2f} "
                      f"/ {q['f1']:.2f}, {r['anchored_labels']}, {_character(r)} | {len(r['ac_labels'])} labels "
                      f"flagged, recall {r['ac']['recall']:.2f} | {r['seconds']} |")
    (out / "audit.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
