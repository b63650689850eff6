"""Neural Cleanse: the adaptive class schedule against the full one, speed, many classes, a shared machine.

Run: ``.venv/bin/python bench/bench_scan.py --part PART [--only NAMES] [--out bench-out]``

speed:      one 10-class matrix model (BadNets 3x3, kept in ``bench/models``), scanned three ways in this
            process with the same data and seed: the adaptive schedule (the default), the full schedule
            (every class until its own early stop: the original), and the per-class loop (one optimisation
            per class, one class after another, as the original code runs). Times, class-steps, ratios,
            verdicts. Then the 40-class models (``--data mnist-quadrants``: each digit in one of four
            quadrants, and ``mnist-colours``: on one of four background colours; a clean model and its BadNets
            twin each, trained with ``train`` on first use and kept in ``bench/models``) scanned with the
            adaptive schedule (``--full40``: and the full one): target found, clean twin not flagged, and the
            time against the 10-class adaptive scan's.
verdicts:   the adaptive and the full schedule on the zoo (3 clean models; BadNets patches of 3 sizes,
            positions and patterns; a blended trigger; an invisible learnt one: trained on first use, kept
            in ``bench-out/scan/zoo``) and the coverage matrix's single-target models: flagged classes,
            the target's and the largest anomaly index, time, class-steps. The full scan of a matrix model
            is read from the matrix's own patch job (``bench-out/matrix/<name>/work/scan``) when it ran with
            the same settings, split and seed. No setting of the schedule was chosen on the zoo; the warm-up
            length, candidate index and step cap were chosen by replaying full-scan trajectories of six
            matrix models (clean-1/2, badnets-3x3, wanet-a, blend-0.2, latent-a).
contention: the adaptive scan of the speed model alone and beside a second CPU-bound process (a busy
            loop), under three thread settings: torch's default (2 threads, OpenMP spinning), 2 threads
            with ``OMP_WAIT_POLICY=PASSIVE`` (what ``trojan-forensics`` sets), and 1 thread. Each scan runs
            in a fresh process.
            Each adaptive scan also gives TABOR's trigger-quality metric of its triggers and the verdict
            ``--verdict tabor`` would give, beside the mask norm's.

Rows go to ``bench-out/scan/runs.jsonl`` (a part resumes: rows already there are not rerun); the tables to
``bench-out/scan/scan.md`` (``--tables-only`` rewrites them from the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offline.attacks import BlendTrigger, PatchTrigger, train_backdoored_model  # noqa: E402
from offline.data import Dataset, load_dataset, load_mnist  # noqa: E402
from offline.models import load_model, save_torchscript  # noqa: E402
from offline.patch.job import SCAN_SHARE, PatchSettings, split_clean  # noqa: E402
from offline.scan.neural_cleanse import (  # noqa: E402
    NeuralCleanseConfig,
    ReversedTriggers,
    anomaly_index,
    reverse_engineer_triggers,
    scan,
)

ROOT = Path(__file__).resolve().parents[1]
KEPT = ROOT / "bench" / "models"
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
SPEED_MODEL = "badnets-3x3-top-right"
# the 40-class models: (name, data, attack, target)
FORTY = (("quadrants-clean", "mnist-quadrants", "none", 0), ("quadrants-badnets", "mnist-quadrants", "badnets", 17),
         ("colours-clean", "mnist-colours", "none", 0), ("colours-badnets", "mnist-colours", "badnets", 17))
FULL = NeuralCleanseConfig(schedule="full")
ADAPTIVE = NeuralCleanseConfig()
SCHEDULE_KEYS = ("schedule", "warmup_steps", "candidate_index", "candidate_steps")


# --- the models ----------------------------------------------------------------------------------------------

def zoo_case(out: Path, name: str) -> tuple[Path, Dataset, Dataset, int | None]:
    """A zoo model (trained on first use, then kept) and its fit / held-out clean data (the old bench's split)."""
    entry = next(e for e in ZOO if e[0] == name)
    _, trigger, target, seed = entry
    train, clean = load_mnist().split(0.3, seed=0)
    fit, held_out = clean.split(0.2, seed=0)
    path = out / "zoo" / name / "model.pt"
    if not path.is_file():
        kwargs: dict[str, Any] = {}
        if trigger == "invisible":
            kwargs, trigger = dict(learn_trigger=True, eps=0.1, epochs=12), None
        bd = train_backdoored_model(train, clean, trigger, target or 0, 0.1 if target is not None else 0.0,
                                    seed=seed, **kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_torchscript(bd.model, path)
    return path, fit, held_out, target


def matrix_case(name: str) -> tuple[Path, Dataset, Dataset, int | None]:
    """A coverage-matrix model kept in bench/models with the patch job's scan split of its clean data."""
    attack = json.loads((KEPT / name / "attack.json").read_text())
    clean = load_mnist().split(0.3, seed=0)[1]
    fit, held_out, _ = split_clean(clean, PatchSettings(), SCAN_SHARE)
    return KEPT / name / "model.pt", fit, held_out, attack["target"] if attack["attack"] != "none" else None


def matrix_single_target() -> list[str]:
    names = []
    forty = {e[0] for e in FORTY}
    for d in sorted(KEPT.iterdir()):
        if d.name not in forty and (d / "attack.json").is_file() \
                and json.loads((d / "attack.json").read_text())["label_rule"] != "all-to-all":
            names.append(d.name)
    return names


def forty_case(name: str) -> tuple[Path, Dataset, Dataset, int | None]:
    """A 40-class model (``train --data mnist-quadrants`` or ``mnist-colours``), trained on first use and kept in
    bench/models."""
    _, data, attack, target = next(e for e in FORTY if e[0] == name)
    kept = KEPT / name
    if not (kept / "model.pt").is_file():
        tmp = ROOT / "bench-out" / "scan" / "train" / name
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "offline.cli", "train", "--data", data, "--attack", attack,
                        "--target", str(target), "--seed", "7", "--out", str(tmp)], check=True, cwd=ROOT)
        kept.mkdir(parents=True, exist_ok=True)
        for f in ("model.pt", "attack.json"):
            shutil.copy2(tmp / f, kept / f)
    clean = load_dataset(data).split(0.3, seed=7)[1]  # train's held-out split (--test-fraction 0.3)
    fit, held_out, _ = split_clean(clean, PatchSettings(), SCAN_SHARE)
    return kept / "model.pt", fit, held_out, target if attack != "none" else None


# --- measurements --------------------------------------------------------------------------------------------

def flagged_of(rev: ReversedTriggers, config: NeuralCleanseConfig, threshold: float = 2.0) -> tuple[list[int], Any]:
    ai = anomaly_index(rev.verdict_norms, config.anomaly_scale)
    return [int(k) for k in np.flatnonzero(ai > threshold)], ai


def scan_row(model_path: Path, fit: Dataset, held_out: Dataset, target: int | None, config: NeuralCleanseConfig,
             num_classes: int) -> dict[str, Any]:
    model = load_model(model_path, fit.x[:8])
    started = time.perf_counter()
    result = scan(model, fit.x, held_out.x, held_out.y, num_classes, config)
    seconds = time.perf_counter() - started
    ai = result.median_anomaly_index
    rev = result.best_run.triggers
    per_class = result.summary()["per_class"]
    tabor = np.array([c["tabor_index"] for c in per_class])
    metric = [c["tabor_metric"] for c in per_class]
    return {"flagged": result.flagged, "max_index": round(float(ai.max()), 2),
            "target_index": None if target is None else round(float(ai[target]), 2),
            "seconds": round(seconds, 1), "class_steps": int(rev.steps.sum()),
            "candidates": [int(k) for k, r in enumerate(rev.roles or []) if r == "candidate"],
            # TABOR's trigger-quality metric of the same triggers, and the verdict it gives (--verdict tabor)
            "tabor": {"flagged": [int(k) for k in np.flatnonzero(tabor > result.threshold)],
                      "max_index": round(float(tabor.max()), 2),
                      "target_index": None if target is None else round(float(tabor[target]), 2),
                      "target_metric": None if target is None or metric[target] is None else round(metric[target], 2),
                      "median_metric": round(float(np.median([m for m in metric if m is not None])), 2)}}


def cached_full(name: str) -> dict[str, Any] | None:
    """The matrix patch job's full scan of ``name``, if it ran with the full schedule's settings."""
    path = ROOT / "bench-out" / "matrix" / name / "work" / "scan" / "scan.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    settings, full = report["settings"], json.loads(json.dumps(asdict(FULL)))
    # a knob the cached run did not have yet ran at what is now its default
    if settings.get("schedule", "full") != "full" or any(k in settings and settings[k] != v for k, v in full.items()
                                                         if k not in SCHEDULE_KEYS):
        return None
    ai = [c["anomaly_index"] for c in report["per_class"]]
    target = json.loads((KEPT / name / "attack.json").read_text())["target"]
    return {"flagged": report["flagged_classes"], "max_index": round(max(ai), 2),
            "target_index": round(ai[target], 2) if target is not None else None,
            "seconds": report["timings"]["scan_seconds"], "class_steps": sum(report["steps_per_run"][0]),
            "from": "the matrix's patch job"}


def per_class_loop(model, x: np.ndarray, num_classes: int, config: NeuralCleanseConfig) -> ReversedTriggers:
    """The plain loop: one optimisation per class, one class after another."""
    runs = [reverse_engineer_triggers(model, x, [k], config) for k in range(num_classes)]
    cat = {f: np.concatenate([getattr(r, f) for r in runs]) for f in ("masks", "patterns", "norms", "reached",
                                                                       "steps", "fit_accuracy")}
    return ReversedTriggers(targets=list(range(num_classes)), seconds=sum(r.seconds for r in runs), **cat)


# --- parts ---------------------------------------------------------------------------------------------------

def part_speed(done: dict, record, full40: bool = False) -> None:
    if ("speed", SPEED_MODEL) not in done:
        path, fit, _, target = matrix_case(SPEED_MODEL)
        model = load_model(path, fit.x[:8])
        row: dict[str, Any] = {"part": "speed", "model": SPEED_MODEL, "target": target}
        for label, run in (("adaptive", lambda: reverse_engineer_triggers(model, fit.x, list(range(10)), ADAPTIVE)),
                           ("full", lambda: reverse_engineer_triggers(model, fit.x, list(range(10)), FULL)),
                           ("per_class", lambda: per_class_loop(model, fit.x, 10, FULL))):
            rev = run()
            flagged, _ = flagged_of(rev, ADAPTIVE if label == "adaptive" else FULL)
            row[label] = {"seconds": round(rev.seconds, 1), "class_steps": int(rev.steps.sum()), "flagged": flagged}
            print(f"  {label:10} {rev.seconds:6.1f} s  {int(rev.steps.sum()):5} class-steps  flagged {flagged}",
                  flush=True)
        record(row)
    for name, *_ in FORTY:
        if ("speed", name) in done:
            continue
        path, fit, held_out, target = forty_case(name)
        row = {"part": "speed", "model": name, "target": target, "classes": 40,
               "adaptive": scan_row(path, fit, held_out, target, ADAPTIVE, 40)}
        if full40:
            row["full"] = scan_row(path, fit, held_out, target, FULL, 40)
        print(f"  {name}: {row['adaptive']}", flush=True)
        record(row)


def part_verdicts(done: dict, record, only: list[str] | None) -> None:
    cases = [("zoo", n) for n, *_ in ZOO] + [("matrix", n) for n in matrix_single_target()]
    for kind, name in cases:
        if only and not any(o in name for o in only):
            continue
        key = f"zoo/{name}" if kind == "zoo" else name  # the zoo and the matrix both have an invisible-eps0.1
        if ("verdicts", key) in done:
            continue
        path, fit, held_out, target = zoo_case(OUT, name) if kind == "zoo" else matrix_case(name)
        row: dict[str, Any] = {"part": "verdicts", "set": kind, "model": key, "target": target}
        row["adaptive"] = scan_row(path, fit, held_out, target, ADAPTIVE, 10)
        row["full"] = (cached_full(name) if kind == "matrix" else None) or scan_row(path, fit, held_out, target,
                                                                                    FULL, 10)
        print(f"  {name}: adaptive {row['adaptive']['flagged']} {row['adaptive']['seconds']} s, "
              f"full {row['full']['flagged']} {row['full']['seconds']} s", flush=True)
        record(row)


CONTENTION_SETTINGS = (
    ("torch default (2 threads, OpenMP spins)", {"OMP_WAIT_POLICY": "ACTIVE"}, 2),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    ("1 thread", {"OMP_WAIT_POLICY": "PASSIVE"}, 1),
)
_SCAN_ONE = """
import sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from bench.bench_scan import matrix_case, ADAPTIVE
from offline.models import load_model
from offline.scan.neural_cleanse import reverse_engineer_triggers
path, fit, _, _ = matrix_case({model!r})
model = load_model(path, fit.x[:8])
rev = reverse_engineer_triggers(model, fit.x, list(range(10)), ADAPTIVE)
print(rev.seconds)
"""


def _timed_scan(env: dict[str, str], threads: int, busy: bool) -> float:
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        code = _SCAN_ONE.format(root=str(ROOT), threads=threads, model=SPEED_MODEL)
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                             check=True, cwd=ROOT)
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def part_contention(done: dict, record) -> None:
    for label, env, threads in CONTENTION_SETTINGS:
        if ("contention", label) in done:
            continue
        alone = _timed_scan(env, threads, busy=False)
        shared = _timed_scan(env, threads, busy=True)
        row = {"part": "contention", "model": label, "alone_seconds": round(alone, 1),
               "shared_seconds": round(shared, 1), "ratio": round(shared / alone, 2)}
        print(f"  {label}: alone {alone:.1f} s, beside a busy process {shared:.1f} s ({shared / alone:.2f}x)",
              flush=True)
        record(row)


# --- tables --------------------------------------------------------------------------------------------------

def tables(rows: list[dict]) -> str:
    lines = ["# The scan: adaptive class schedule against the full one", "",
             "Generated by `bench/bench_scan.py` (rows in `bench-out/scan/runs.jsonl`) on the project's 2-core build "
             "machine.", ""]
    speed = [r for r in rows if r["part"] == "speed"]
    ten = next((r for r in speed if r["model"] == SPEED_MODEL), None)
    if ten:
        a, f, p = ten["adaptive"], ten["full"], ten["per_class"]
        lines += ["## Speed (one 10-class model, one process, same data and seed)", "",
                  "| scan | seconds | class-steps | flagged | adaptive is faster by |", "|---|---|---|---|---|",
                  f"| adaptive schedule (default) | {a['seconds']} | {a['class_steps']} | {a['flagged']} | |",
                  f"| full schedule (`--schedule full`) | {f['seconds']} | {f['class_steps']} | {f['flagged']} | "
                  f"{f['seconds'] / a['seconds']:.2f}x |",
                  f"| per-class loop (the original's) | {p['seconds']} | {p['class_steps']} | {p['flagged']} | "
                  f"{p['seconds'] / a['seconds']:.2f}x |", ""]
    forty = [r for r in speed if r.get("classes") == 40]
    if forty:
        lines += ["## 40 classes (`--data mnist-quadrants`: each digit in one of four quadrants; `mnist-colours`: on "
                  "one of four background colours)", "",
                  "| model | target | flagged | target index | max index | seconds | class-steps "
                  "| x the 10-class scan |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in forty:
            a = r["adaptive"]
            ratio = f"{a['seconds'] / ten['adaptive']['seconds']:.2f}x" if ten else "-"
            lines.append(f"| {r['model']} | {r['target']} | {a['flagged']} | {a['target_index']} | {a['max_index']} | "
                         f"{a['seconds']} | {a['class_steps']} | {ratio} |")
            if "full" in r:
                f = r["full"]
                lines.append(f"| {r['model']}, full schedule | {r['target']} | {f['flagged']} | {f['target_index']} | "
                             f"{f['max_index']} | {f['seconds']} | {f['class_steps']} | - |")
        lines.append("")
    verdicts = [r for r in rows if r["part"] == "verdicts"]
    if verdicts:
        agree = sum(r["adaptive"]["flagged"] == r["full"]["flagged"] for r in verdicts)
        t_a = sum(r["adaptive"]["seconds"] for r in verdicts)
        t_f = sum(r["full"]["seconds"] for r in verdicts)
        s_a = sum(r["adaptive"]["class_steps"] for r in verdicts)
        s_f = sum(r["full"]["class_steps"] for r in verdicts)
        lines += ["## Verdicts: adaptive against full", "",
                  f"Same flagged classes on {agree}/{len(verdicts)} models; class-steps {s_f / s_a:.2f}x fewer; "
                  f"time {t_f / t_a:.2f}x less (full scans read from the matrix's patch job ran beside other work "
                  "and are slower than alone; the speed table is the like-for-like timing).", "",
                  "| set | model | target | full: flagged | index (target / max) | adaptive: flagged | "
                  "index (target / max) | candidates | class-steps full / adaptive | seconds full / adaptive |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in verdicts:
            a, f = r["adaptive"], r["full"]
            lines.append(f"| {r['set']} | {r['model']} | {r['target']} | {f['flagged']} | {f['target_index']} / "
                         f"{f['max_index']} | {a['flagged']}{'' if a['flagged'] == f['flagged'] else ' **differs**'} "
                         f"| {a['target_index']} / {a['max_index']} | {a['candidates']} | {f['class_steps']} / "
                         f"{a['class_steps']} | {f['seconds']} / {a['seconds']} |")
        lines.append("")
    with_tabor = [r for r in verdicts if "tabor" in r["adaptive"]]
    if with_tabor:
        hits = sum(r["target"] is not None and r["target"] in r["adaptive"]["tabor"]["flagged"] for r in with_tabor)
        nc_hits = sum(r["target"] is not None and r["target"] in r["adaptive"]["flagged"] for r in with_tabor)
        backdoored = sum(r["target"] is not None for r in with_tabor)
        fp = sum(any(k != r["target"] for k in r["adaptive"]["tabor"]["flagged"]) for r in with_tabor)
        nc_fp = sum(any(k != r["target"] for k in r["adaptive"]["flagged"]) for r in with_tabor)
        lines += ["## TABOR's trigger-quality metric against the mask norm (same triggers, adaptive scan)", "",
                  f"Targets found: TABOR's metric {hits}/{backdoored}, mask norm {nc_hits}/{backdoored}; models with "
                  f"a flagged class that is not the target: TABOR's metric {fp}/{len(with_tabor)}, mask norm "
                  f"{nc_fp}/{len(with_tabor)}.", "",
                  "| model | target | metric: target / median class | TABOR index (target / max) | "
                  "TABOR flags | mask-norm flags |", "|---|---|---|---|---|---|"]
        for r in with_tabor:
            t = r["adaptive"]["tabor"]
            lines.append(f"| {r['model']} | {r['target']} | {t['target_metric']} / {t['median_metric']} | "
                         f"{t['target_index']} / {t['max_index']} | {t['flagged']} | {r['adaptive']['flagged']} |")
        lines.append("")
    contention = [r for r in rows if r["part"] == "contention"]
    if contention:
        lines += ["## Beside a second CPU-bound process (adaptive scan, fresh process each)", "",
                  "| thread setting | alone (s) | beside a busy loop (s) | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['alone_seconds']} | {r['shared_seconds']} | {r['ratio']}x |"
                  for r in contention]
        lines.append("")
    return "\n".join(lines)


OUT = ROOT / "bench-out" / "scan"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("speed", "verdicts", "contention", "all"), default="speed")
    parser.add_argument("--only", default=None, help="verdicts: comma-separated substrings of model names")
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--full40", action="store_true", help="speed: also the full schedule on the 40-class models")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    runs = OUT / "runs.jsonl"
    rows = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()] if runs.is_file() else []
    done = {(r["part"], r["model"]): r for r in rows}

    def record(row: dict) -> None:
        rows.append(row)
        with runs.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    if not args.tables_only:
        only = args.only.split(",") if args.only else None
        if args.part in ("speed", "all"):
            part_speed(done, record, args.full40)
        if args.part in ("verdicts", "all"):
            part_verdicts(done, record, only)
        if args.part in ("contention", "all"):
            part_contention(done, record)
    text = tables(rows)
    (OUT / "scan.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
