"""Every repair method side by side at the clean-data sizes a defender has.

Run: ``.venv/bin/python bench/bench_repair.py [--clean-images 250,500,1000] [--methods unlearn,anp,i-bau,nad]
[--seeds 4] [--only NAME] [--tables-only]``

Models: the coverage matrix's single-target backdoored models
(``bench_matrix.MATRIX``; trained by ``bench/bench_matrix.py`` into
``bench-out/matrix/NAME``) whose scan flagged the true target. No repair
setting was chosen on them. Each holds 1,500 clean images the model never saw.

For every clean-data size N and seed, N of those images (a stratified draw,
different per seed) are the defender's: the patch job's split of them
(``offline.patch.job.split_clean``: fit, calibration, test) gives the repair its
fit images and the selection images its stop rules read; the other 1,500 - N
images, which the job never sees, measure clean accuracy, the share of answers
unchanged and the true trigger's ASR (its images of other classes) before and
after. The reversed trigger the stop rules use is the one the matrix's patch
job recovered from all 1,500 images (``bench-out/matrix/NAME/work/scan``): the
scan itself is not what this bench measures. Targets (issue 19), at N = 500:
true-trigger ASR <= 1 % and accuracy drop <= 1 point, mean over the seeds.

Each run is a line of ``<out>/runs.jsonl``, reused by a later run of the bench
(delete the file to start over); the tables go to ``<out>/repair.md``
(docs/lab/repair.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matrix import MATRIX  # noqa: E402
from bench_patch import SETS, _case  # noqa: E402

from offline.jobs import load_case  # noqa: E402
from offline.patch.job import SCAN_SHARE, PatchSettings, load_true_trigger, split_clean  # noqa: E402
from offline.patch.repair import METHODS, Evaluator, repair  # noqa: E402
from offline.scan.job import scan_case  # noqa: E402

ASR_TARGET, DROP_TARGET = 0.01, 0.01


def _scanned_case(name: str, trigger, target: int, seed: int, out: Path) -> Path:
    """A bench_patch model's case directory (model, 1,500 clean images, attack.json, the patch job's scan),
    trained and scanned under ``out`` unless bench_patch already did."""
    for found in sorted(Path("bench-out").glob(f"patch*/{name}")):
        if (found / "work" / "scan" / "scan.json").is_file():
            return found
    root = out / name
    if not (root / "model.pt").is_file():
        _case(root, trigger, target, seed)
    if not (root / "work" / "scan" / "scan.json").is_file():
        settings = PatchSettings()
        case = load_case(root / "model.pt", str(root / "clean.npz"), None)
        fit, calib, _ = split_clean(case.data, settings, SCAN_SHARE)  # the patch job's scan split
        scan_case(case, root / "model.pt", fit, calib, root / "work" / "scan", config=settings.scan,
                  threshold=settings.anomaly_threshold, repeats=settings.repeats,
                  restarts=settings.recover_restarts, progress=False)
    return root


def _cases(models: str, matrix: Path, out: Path, only: str | None) -> list[tuple[str, Path, int]]:
    """(name, case directory, target) of every model of the set whose scan flagged its true target."""
    if models == "matrix":
        listed = [(name, matrix / name, target) for name, attack, target, _seed, _kwargs in MATRIX
                  if attack not in ("none", "all-to-all")]
    else:
        listed = [(name, _scanned_case(name, trigger, target, seed, out / "models"), target)
                  for name, trigger, target, seed in SETS[models] if target is not None and (not only or only in name)]
    found = []
    for name, case, target in listed:
        if only and only not in name:
            continue
        scan_file = case / "work" / "scan" / "scan.json"
        if not scan_file.is_file():
            print(f"{name}: no scan in {case} (run bench/bench_matrix.py --only {name}); skipped", flush=True)
            continue
        if target not in json.loads(scan_file.read_text())["flagged_classes"]:
            print(f"{name}: the scan did not flag the true target {target}; skipped", flush=True)
            continue
        found.append((name, case, target))
    return found


def _run(case_dir: Path, target: int, size: int, seed: int, method: str) -> dict:
    settings = PatchSettings()
    case = load_case(case_dir / "model.pt", str(case_dir / "clean.npz"), None)
    rest, mine = case.data.split(size / len(case.data), seed=1000 + seed)
    fit, calib, _ = split_clean(mine, settings)
    scan_dir = case_dir / "work" / "scan"
    rec = next(r for r in json.loads((scan_dir / "scan.json").read_text())["recovered_triggers"]
               if r["class"] == target)
    mask, pattern = np.load(scan_dir / rec["mask_file"]), np.load(scan_dir / rec["pattern_file"])
    true_trigger, _ = load_true_trigger(case_dir / "attack.json")
    select = Evaluator(calib.x, calib.y, target, mask, pattern)
    held_out = Evaluator(rest.x, rest.y, target, mask, pattern, true_trigger)
    started = time.perf_counter()
    rep = repair(case.model, fit.x, fit.y, select, held_out, replace(settings.repair, method=method, seed=seed))
    return {"images": size, "seed": seed, "method": rep.method, "fit_images": len(fit),
            "selection_images": len(calib), "held_out_images": len(rest), "seconds": time.perf_counter() - started,
            "true_asr_before": rep.before.true_asr, "true_asr": rep.after.true_asr,
            "accuracy_before": rep.before.accuracy, "accuracy_change": rep.after.accuracy - rep.before.accuracy,
            "agreement": rep.after.agreement, "reversed_asr": rep.after.reversed_asr,
            "selection_curve": rep.details.get("curve")}


def tables(rows: list[dict], sizes: list[int], methods: list[str]) -> str:
    """The markdown tables: per size, each method's mean and worst over models and seeds; per model at 500."""
    def cell(rs: list[dict]) -> str:
        asr = [r["true_asr"] for r in rs]
        drop = [-r["accuracy_change"] for r in rs]
        worst = max(rs, key=lambda r: (r["true_asr"] > ASR_TARGET or -r["accuracy_change"] > DROP_TARGET,
                                       -r["accuracy_change"] + r["true_asr"]))
        return (f"{np.mean(asr):.1%} / {np.mean(drop) * 100:+.2f} / {np.mean([r['agreement'] for r in rs]):.1%} "
                f"/ {np.mean([r['seconds'] for r in rs]):.0f} s; worst {worst['model']} s{worst['seed']}: "
                f"{worst['true_asr']:.1%}, {-worst['accuracy_change'] * 100:+.2f}")

    lines = ["Cells: true-trigger ASR after / accuracy drop in points / answers unchanged / seconds, mean over "
             "models and seeds, on clean images the job never saw; then the worst run (model, seed: ASR, drop). "
             f"Targets at 500 images: ASR <= {ASR_TARGET:.0%}, drop <= {DROP_TARGET * 100:.0f} point.", ""]
    by = defaultdict(list)
    for r in rows:
        by[(r["images"], r["method"])].append(r)
        by[(r["images"], r["method"], r["model"])].append(r)
    lines += ["| clean images | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for size in sizes:
        lines.append(f"| {size} | " + " | ".join(cell(by[(size, m)]) if by[(size, m)] else "-" for m in methods)
                     + " |")
    for size in sizes:
        models = sorted({r["model"] for r in rows if r["images"] == size})
        if not models:
            continue
        lines += ["", f"Per model at {size} clean images (mean over seeds: true ASR / drop in points; runs that "
                      f"miss a target)", "",
                  "| model | ASR before | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        for model in models:
            before = np.mean([r["true_asr_before"] for r in rows if r["model"] == model and r["images"] == size])
            cells = []
            for m in methods:
                rs = by[(size, m, model)]
                if not rs:
                    cells.append("-")
                    continue
                miss = sum(r["true_asr"] > ASR_TARGET or -r["accuracy_change"] > DROP_TARGET for r in rs)
                cells.append(f"{np.mean([r['true_asr'] for r in rs]):.1%} / "
                             f"{-np.mean([r['accuracy_change'] for r in rs]) * 100:+.2f}"
                             + (f" ({miss}/{len(rs)} miss)" if miss else ""))
            lines.append(f"| {model} | {before:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean-images", default="250,500,1000", help="comma-separated sizes (%(default)s)")
    parser.add_argument("--methods", default="unlearn,anp,i-bau,nad",
                        help=f"comma-separated, of {', '.join(m for m in METHODS if m != 'none')} (%(default)s)")
    parser.add_argument("--seeds", type=int, default=4, help="draws of the clean images per size (%(default)s)")
    parser.add_argument("--only", default=None, help="run only models whose name contains this")
    parser.add_argument("--models", choices=("matrix", *SETS), default="matrix",
                        help="the coverage matrix's models (%(default)s), or a bench_patch set the repair settings "
                             "were chosen on (trained and scanned under OUT/models when bench_patch has not)")
    parser.add_argument("--matrix", default="bench-out/matrix", help="the coverage matrix's model directories")
    parser.add_argument("--out", default=None, help="default: bench-out/repair (matrix), bench-out/repair-SET")
    parser.add_argument("--tables-only", action="store_true", help="write the tables from the runs kept")
    args = parser.parse_args()
    sizes = [int(v) for v in args.clean_images.split(",")]
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS or m == "none"]:
        parser.error(f"unknown repair method: {', '.join(unknown)}")
    out = Path(args.out or ("bench-out/repair" if args.models == "matrix" else f"bench-out/repair-{args.models}"))
    out.mkdir(parents=True, exist_ok=True)
    runs_file = out / "runs.jsonl"
    rows = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.is_file() else []
    done = {(r["model"], r["images"], r["seed"], r["requested"]) for r in rows}
    if not args.tables_only:
        for name, case_dir, target in _cases(args.models, Path(args.matrix), out, args.only):
            for size in sizes:
                for seed in range(args.seeds):
                    for method in methods:
                        if (name, size, seed, method) in done:
                            continue
                        row = {"model": name, "requested": method, **_run(case_dir, target, size, seed, method)}
                        rows.append(row)
                        with runs_file.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"{name:32} {size:5} s{seed} {method:8} true ASR {row['true_asr_before']:.1%} -> "
                              f"{row['true_asr']:.1%}, accuracy {row['accuracy_change'] * 100:+.2f} points, "
                              f"unchanged {row['agreement']:.1%}, {row['seconds']:.1f} s", flush=True)
    wanted = [r for r in rows if r["requested"] in methods and r["images"] in sizes and r["seed"] < args.seeds]
    text = tables(wanted, sizes, methods)
    (out / "repair.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
