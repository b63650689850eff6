"""The guard on its own: one false-rejection budget, trigger-free detectors, sequential STRIP.

Run: ``.venv/bin/python bench/bench_verdict.py [--parts zoo,matrix,small] [--out bench-out]``

Every bundle here is guard-only (``--repair none``): the model still obeys its
trigger, so whatever the guard lets through with the attacker's answer is an
attack that succeeds. Defaults throughout (budget ``--frr 0.01``, detectors
STRIP + k-NN, the activation filter where the scan flagged a class, STRIP's n by
the paper's rule, sequential STRIP); no setting was chosen on these models
except where docs/lab/guard-detectors.md says so.

- ``zoo``: bench_scan.ZOO (three clean models, three patches, a blend, an
  invisible perturbation), trained here, patched from the 1,500 held-out clean
  MNIST digits (calibration 300, test 300).
- ``matrix``: every coverage-matrix model in ``<out>/matrix`` (bench_matrix.py
  builds them); the guard-only bundle is recalibrated reusing the matrix's scan.
- ``small``: three models patched from 500 clean images only; the refusal rate
  is measured on the other 1,000, which the job never saw, against the bound
  the job printed.

For each bundle, on the same test inputs and the same blends: the clean
refusal rate, the share of true-trigger inputs (images of other classes)
answered with the attacker's class through the guard, with STRIP's n blends at
once (fixed) and sequential, and the forward passes per input. Writes
``<out>/verdict.json`` and ``<out>/verdict.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_patch import _case  # noqa: E402
from bench_scan import ZOO  # noqa: E402

from guard.backends import EmbeddedBackend  # noqa: E402
from guard.bundle import GuardBundle  # noqa: E402
from guard.screens import COMBINE_RULES, OneBudget  # noqa: E402
from guard.screens.verdict import FITTED_ONLY, P_VALUES  # noqa: E402
from offline.attacks import backdoor_targets, load_trigger  # noqa: E402
from offline.attacks.training import train_backdoored_model  # noqa: E402
from offline.data import Dataset, load_dataset, load_mnist  # noqa: E402
from offline.models import save_torchscript  # noqa: E402
from offline.patch.calibrate import CalibrationSettings, reference_scores  # noqa: E402
from offline.patch.export import INPUT_NAME  # noqa: E402
from offline.patch.job import PatchSettings, run_patch, split_clean  # noqa: E402
from offline.patch.repair import RepairSettings  # noqa: E402
from offline.scan.settings import NeuralCleanseConfig  # noqa: E402

GUARD_ONLY = PatchSettings(repair=RepairSettings(method="none"))
# --variant: the calibration settings of an ablation (docs/lab/guard-detectors.md); results go to verdict-NAME.md
VARIANTS = {
    "default": {},
    "raw-strip": {"strip_by_class": False},
    "strip-knn-mahalanobis": {"detectors": ("strip", "knn", "mahalanobis")},
    # the verdict before issue 32 (every rule on the same scores is in each row's "rules" anyway)
    "bag-fisher": {"rule": "fisher", "p_values": "bag"},
    "no-filter": {"filter": "off"},
}
# (matrix model, for the 500-image job): a patch, a blend, a clean model
SMALL = ("badnets-3x3-top-right", "blend-0.2", "clean-1")


def triggered(case: Path, data: Dataset, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The true trigger on images whose backdoor class differs from their label (of its source classes, for a
    source-specific backdoor), and that class."""
    desc = json.loads((case / "attack.json").read_text())
    if desc.get("attack") == "none" or (desc.get("trigger") is None and not desc.get("trigger_delta_file")
                                         and desc.get("target_image_index") is None):
        return np.zeros((0, *x.shape[1:]), np.float32), np.zeros(0, np.int64)
    if desc.get("trigger") is None and desc.get("target_image_index") is not None:  # clean-label: one image
        return data.x[[desc["target_image_index"]]], np.array([desc["target"]])
    extra = {"delta": np.load(case / desc["trigger_delta_file"])} if desc.get("trigger_delta_file") else {}
    trigger = load_trigger(desc["trigger"], case, **extra)
    goal = backdoor_targets(y, desc.get("target") or 0, desc.get("label_rule", "all-to-one"), data.num_classes)
    keep = y != goal
    if desc.get("source_classes"):  # a source-specific backdoor (TaCT): only its source classes are attacks
        keep &= np.isin(y, desc["source_classes"])
    return trigger.apply(x[keep]).astype(np.float32), goal[keep]


def _resampled(make, scores: np.ndarray, answered: np.ndarray, n_calib: int, repeats: int = 40) -> list[float]:
    """Clean refusal rates over random calibration / test partitions of ``scores``: the verdict
    ``make(calibration scores, their answers)`` recalibrated on each partition's first ``n_calib``."""
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(repeats):
        order = rng.permutation(len(scores))
        c, t = order[:n_calib], order[n_calib:]
        rates.append(float(make(scores[c], answered[c]).judge(scores[t], answered[t]).flagged.mean()))
    return rates


def resampled_frr(screen, infer, x_calib: np.ndarray, x_test: np.ndarray, repeats: int = 40) -> dict[str, float]:
    """The clean refusal rate over random calibration / test partitions of the job's two clean parts.

    One test split of a few hundred images measures a 1 % rate to +-1.1 points (95 %); the detectors stay as
    fitted, the verdict is recalibrated on each partition's calibration share and judged on the rest, so the
    mean is the procedure's expected FRR and the spread what one split can show.
    """
    b = screen.budget
    scores, answered = screen.score(infer, np.concatenate([x_calib, x_test]))
    rates = _resampled(lambda c, a: OneBudget(b.names, b.sides, c, b.frr, b.rule, b.classes, a,
                                              reference=b.reference), scores, answered, len(x_calib), repeats)
    return {"mean": float(np.mean(rates)), "sd": float(np.std(rates)), "max": float(np.max(rates))}


def rules(screen, backend, x_fit: np.ndarray, x_calib: np.ndarray, x_clean: np.ndarray, x_trig: np.ndarray,
          goal: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Every combination rule, with bag and fitted p-values, on the same detector scores (STRIP's n blends at
    once): the calibration images set each verdict; clean refusals on the test images (and resampled over 40
    calibration / test partitions) and triggered inputs through with the attacker's class."""
    budget, infer = screen.budget, backend.infer
    clean, answered = screen.score(infer, x_clean)
    trig, t_answered = screen.score(infer, x_trig) if len(x_trig) else (np.zeros((0, len(budget.names))),
                                                                         np.zeros(0, np.int64))
    cal, cal_answered = screen.score(infer, x_calib)
    reference = reference_scores(screen, backend, x_fit)
    both, both_answered = np.concatenate([cal, clean]), np.concatenate([cal_answered, answered])
    hit = t_answered == goal
    out: dict[str, dict[str, float | None]] = {}
    for mode in P_VALUES:
        ref = reference if mode == "fitted" else None
        for rule in COMBINE_RULES:
            if ref is None and rule in FITTED_ONLY:
                continue

            def verdict(c: np.ndarray, c_answered: np.ndarray, rule: str = rule, ref=ref) -> OneBudget:
                return OneBudget(budget.names, budget.sides, c, budget.frr, rule, budget.classes, c_answered,
                                 reference=ref)

            rates = _resampled(verdict, both, both_answered, len(cal))
            v = verdict(cal, cal_answered)
            through = (~v.judge(trig, t_answered).flagged & hit).mean() if len(hit) else None
            out[f"{mode}-{rule}"] = {"frr": float(v.judge(clean, answered).flagged.mean()),
                                     "frr_resampled_mean": float(np.mean(rates)),
                                     "frr_resampled_max": float(np.max(rates)),
                                     "through": None if through is None else float(through)}
    return out


def measure(bundle_dir: Path, x_clean: np.ndarray, x_trig: np.ndarray, goal: np.ndarray,
            x_calib: np.ndarray | None = None, x_fit: np.ndarray | None = None) -> dict[str, Any]:
    """Refusals and attacks through, fixed-n and sequential STRIP on the same blends, and passes per input."""
    bundle = GuardBundle.load(bundle_dir)
    backend = EmbeddedBackend(bundle.model_path, INPUT_NAME)
    out: dict[str, Any] = {"detectors": bundle.manifest.verdict.detectors,
                           "strip_n": bundle.manifest.strip.n if bundle.manifest.strip else None,
                           "guarantee": bundle.manifest.verdict.guarantee.model_dump()}
    if x_calib is not None:
        out["frr_resampled"] = resampled_frr(bundle.screen(seed=7, sequential=False), backend.infer, x_calib,
                                             x_clean)
        if x_fit is not None:
            out["rules"] = rules(bundle.screen(seed=7, sequential=False), backend, x_fit, x_calib, x_clean, x_trig,
                                 goal)
    for mode in ("fixed", "sequential"):
        screen = bundle.screen(seed=7, sequential=mode == "sequential")

        def run(x: np.ndarray, screen=screen) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            parts = [screen.run(backend.infer, x[i:i + 256]) for i in range(0, len(x), 256)]
            if not parts:
                return np.zeros(0, bool), np.zeros(0, int), np.zeros(0)
            return (np.concatenate([p.flagged for p in parts]), np.concatenate([p.logits.argmax(1) for p in parts]),
                    np.concatenate([p.forward_passes for p in parts]))

        started = time.perf_counter()
        flagged, _, passes = run(x_clean)
        t_flag, t_pred, t_passes = run(x_trig)
        hit = t_pred == goal
        out[mode] = {"frr": float(flagged.mean()), "passes_clean": float(passes.mean()),
                     "model_asr": float(hit.mean()) if len(hit) else None,
                     "through": float((~t_flag & hit).mean()) if len(hit) else None,
                     "passes_triggered": float(t_passes.mean()) if len(hit) else None,
                     "seconds": round(time.perf_counter() - started, 2)}
    backend.close()
    return out


def zoo(out: Path) -> list[dict[str, Any]]:
    rows = []
    for name, trigger, target, seed in ZOO:
        case = out / "verdict" / name
        if not (case / "model.pt").exists():
            if target is None:  # a clean model
                train, clean = load_mnist().split(0.3, seed=0)
                result = train_backdoored_model(train, clean, None, seed=seed)
                case.mkdir(parents=True, exist_ok=True)
                save_torchscript(result.model, case / "model.pt")
                clean.save_npz(case / "clean.npz")
                (case / "attack.json").write_text(json.dumps({**result.summary(), "attack": "none"}))
            else:
                _case(case, trigger, target, seed)
        rows.append(guard_only(case, name, "zoo"))
    return rows


def guard_only(case: Path, name: str, part: str) -> dict[str, Any]:
    started = time.perf_counter()
    data = load_dataset(str(case / "clean.npz"))
    fit, calib, test = split_clean(data, GUARD_ONLY)
    run_patch(case / "model.pt", str(case / "clean.npz"), case / "guard-only", settings=GUARD_ONLY,
              work_dir=case / "work", progress=False, say=lambda _: None)
    x_trig, goal = triggered(case, data, test.x, test.y)
    desc = json.loads((case / "attack.json").read_text())
    attack = desc.get("attack") or (desc.get("trigger") or {}).get("kind") or \
        ("invisible" if desc.get("trigger_delta_file") else "none")
    row = {"part": part, "model": name, "attack": attack,
           **({"scan_steps": GUARD_ONLY.scan.max_steps} if GUARD_ONLY.scan.max_steps != NeuralCleanseConfig().max_steps
              else {}),
           **measure(case / "guard-only", test.x, x_trig, goal, calib.x, fit.x),
           "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(row), flush=True)
    return row


def small(out: Path) -> list[dict[str, Any]]:
    """The patch job from 500 clean images; refusals measured on the 1,000 it never saw."""
    rows = []
    for name in SMALL:
        source = out / "matrix" / name
        if not source.exists():
            print(f"skip small/{name}: run bench_matrix.py first", flush=True)
            continue
        data = load_dataset(str(source / "clean.npz"))
        unseen, given = data.split(1 / 3, seed=5)  # 500 given to the job, 1,000 kept back
        case = out / "verdict" / f"small-{name}"
        case.mkdir(parents=True, exist_ok=True)
        given.save_npz(case / "clean.npz")
        started = time.perf_counter()
        lines: list[str] = []
        run_patch(source / "model.pt", str(case / "clean.npz"), case / "guard-only", settings=GUARD_ONLY,
                  work_dir=case / "work", progress=False, say=lines.append)
        x_trig, goal = triggered(source, data, unseen.x, unseen.y)
        row = {"part": "small", "model": name, "given": len(given), "unseen": len(unseen),
               "printed": [line.strip() for line in lines if "guarantee" in line or "warning" in line],
               **measure(case / "guard-only", unseen.x, x_trig, goal),
               "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


# the issue 32 bar for each attack: the most of its triggered inputs the guard may let through (None: reported)
BARS = {"badnets": 0.02, "blend": 0.02, "invisible": 0.02, "dynamic": 0.02, "trojannn": 0.02, "wanet": 0.05,
        "sig": 0.10, "adaptive-blend": 0.10, "all-to-all": 0.10}


def summary(rows: list[dict[str, Any]]) -> str:
    """One line per matrix model: what the guard lets through now, against the old verdict and the bar."""
    lines = ["Guard-only, budget 1 %, the model unrepaired (`bench/bench_verdict.py --parts matrix`): *through* = "
             "true-trigger test inputs answered with the attacker's class through the guard as served "
             "(sequential STRIP); *before* = the verdict before issue 32 (bag p-values, Fisher's rule) on the "
             "same scores; FRR = clean test inputs refused, and the mean over 40 recalibrated partitions.", "",
             "| model | attack | ASR % | through % | before % | bar % | FRR % (resampled) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] != "matrix":
            continue
        s, bar = r["sequential"], BARS.get(r.get("attack", ""))
        before = (r.get("rules") or {}).get("bag-fisher", {}).get("through")
        verdict = "" if bar is None or s["through"] is None else (" (met)" if s["through"] <= bar else " (**missed**)")
        bounded = f" (scan bounded to {r['scan_steps']} steps)" if r.get("scan_steps") else ""
        lines.append(f"| {r['model']}{bounded} | {r.get('attack', '-')} | {_pct(s['model_asr'])} | {_pct(s['through'])}"
                     f"{verdict} | {_pct(before)} | {'-' if bar is None else _pct(bar)} | {_pct(s['frr'])} "
                     f"({_pct((r.get('frr_resampled') or {}).get('mean'))}) |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Guard-only bundles (`bench/bench_verdict.py`): budget 1 % in total, default detectors; *through* = "
        "true-trigger inputs answered with the attacker's class through the guard; FRR = clean test inputs "
        "refused; bound = the 95 % bound the job printed for its calibration size; passes = model rows per input "
        "(the input and its STRIP blends), sequential; resampled = the mean (and largest) FRR over 40 random "
        "calibration / test partitions of the same clean images, the verdict recalibrated on each (one test split "
        "of 300 measures 1 % to +-1.1 points).",
        "",
        "| part | model | detectors | n | FRR % (bound) | FRR % resampled (max) | through % fixed | "
        "through % sequential | FRR % fixed | passes clean / triggered |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, s = r["fixed"], r["sequential"]
        name = r["model"] + (f" ({r['given']} given, {r['unseen']} unseen)" if r["part"] == "small" else "")
        through_s = _pct(s["through"]) if s["through"] is not None else "-"
        rs = r.get("frr_resampled")
        resampled = f"{_pct(rs['mean'])} ({_pct(rs['max'])})" if rs else "-"
        lines.append(f"| {r['part']} | {name} | {'+'.join(r['detectors'])} | {r['strip_n'] or '-'} | "
                     f"{_pct(s['frr'])} ({_pct(r['guarantee']['frr_upper_95'])}) | {resampled} | "
                     f"{_pct(f['through'])} | "
                     f"{through_s} | {_pct(f['frr'])} | {s['passes_clean']:.1f} / "
                     f"{'-' if s['passes_triggered'] is None else format(s['passes_triggered'], '.1f')} |")
    ruled = [r for r in rows if r.get("rules")]
    if ruled:
        names = list(ruled[0]["rules"])
        lines += ["", "Each combination rule (`--combine`) with bag or fitted p-values (`--p-values`) on the same "
                      "scores (STRIP's n blends at once): through % / FRR % on the test split / FRR % resampled "
                      "mean (max) over 40 calibration / test partitions.", "",
                  "| part | model | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in ruled:
            cells = [f"{_pct(v['through'])} / {_pct(v['frr'])} / {_pct(v['frr_resampled_mean'])} "
                     f"({_pct(v['frr_resampled_max'])})" for v in r["rules"].values()]
            lines.append(f"| {r['part']} | {r['model']} | " + " | ".join(cells) + " |")
    seq = [r for r in rows if r["strip_n"]]
    if seq:
        fixed_passes = np.mean([1 + r["strip_n"] for r in seq])
        mean_clean = np.mean([r["sequential"]["passes_clean"] for r in seq])
        d_frr = max(abs(r["sequential"]["frr"] - r["fixed"]["frr"]) for r in seq)
        d_far = max(abs(r["sequential"]["through"] - r["fixed"]["through"]) for r in seq
                    if r["fixed"]["through"] is not None)
        lines += ["", f"Sequential STRIP over {len(seq)} bundles: {mean_clean:.1f} passes per clean input against "
                      f"{fixed_passes:.0f} fixed ({mean_clean / fixed_passes:.0%}); largest difference from fixed n: "
                      f"FRR {100 * d_frr:.1f} points, through {100 * d_far:.1f} points."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="zoo,matrix,small", help="comma-separated: zoo, matrix, small")
    parser.add_argument("--only", default=None, help="only models whose name contains one of these (comma-separated)")
    parser.add_argument("--out", default="bench-out", help="where bench_matrix.py wrote matrix/ (%(default)s)")
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="default",
                        help="calibration settings to measure (default: the patch job's own)")
    parser.add_argument("--scan-steps", type=int, default=None,
                        help="bound the scan's steps per class (default: the job's own); the row says so")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from the kept JSON only")
    args = parser.parse_args()
    name = "verdict" if args.variant == "default" else f"verdict-{args.variant}"
    out = Path(args.out)
    if args.tables_only:
        rows = json.loads((out / f"{name}.json").read_text())
        (out / f"{name}.md").write_text(markdown(rows))
        (out / f"{name}-summary.md").write_text(summary(rows))
        print(summary(rows))
        return
    global GUARD_ONLY
    GUARD_ONLY = PatchSettings(repair=RepairSettings(method="none"),
                               calibration=CalibrationSettings(**VARIANTS[args.variant]),
                               scan=NeuralCleanseConfig(max_steps=args.scan_steps) if args.scan_steps
                               else NeuralCleanseConfig())
    parts = args.parts.split(",")
    rows: list[dict[str, Any]] = []
    if "zoo" in parts:
        rows += zoo(out)
    if "matrix" in parts:
        for case in sorted((out / "matrix").glob("*/model.pt")):
            if not args.only or any(w in case.parent.name for w in args.only.split(",")):
                rows.append(guard_only(case.parent, case.parent.name, "matrix"))
    if "small" in parts:
        rows += small(out)
    if args.only:
        rows = [r for r in rows if any(w in r["model"] for w in args.only.split(","))]
    if (out / f"{name}.json").exists():  # keep the rows not rerun: other parts, or other models with --only
        rerun = {(r["part"], r["model"]) for r in rows}
        kept = [r for r in json.loads((out / f"{name}.json").read_text())
                if (r["part"] not in parts or args.only) and (r["part"], r["model"]) not in rerun]
        rows = sorted(kept + rows, key=lambda r: (("zoo", "matrix", "small").index(r["part"]), r["model"]))
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.md").write_text(markdown(rows))
    (out / f"{name}-summary.md").write_text(summary(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
