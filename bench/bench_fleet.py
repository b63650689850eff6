"""The fleet scan and MNTD on Ray, measured on this machine.

Run: ``.venv/bin/python bench/bench_fleet.py [--parts fleet,mntd,timing] [--shadows N] [--out bench-out]``

The defender's clean data everywhere: 500 images of the embedded MNIST digits that no zoo or matrix model
trained on (the 1,500 held out from their 3,500 training images, a stratified third of them).

- ``fleet``: eight models (three of bench_scan's zoo, five of the coverage matrix in bench/models: clean,
  patches, blend, WaNet, all-to-all, TrojanNN) scanned one after another by ``run_scan`` in this process (torch's
  own threads) and by ``trojan-forensics fleet`` on a local Ray cluster of this machine's CPUs (one CPU and one
  torch thread a task), wall time of each and whether every verdict is the same.
- ``mntd``: ``--shadows`` shadow models (half jumbo-backdoored) trained as Ray tasks on the 500 images, the
  query-tuned meta-classifier calibrated on held-out shadows, then its backdoor probability on every 28x28
  10-class model of the zoo and the matrix (34 models; no shadow was drawn from them) against Neural Cleanse's
  largest anomaly index on the same models (the fleet scan, default settings, reusing the ``fleet`` part's
  scans): AUROC of each, the all-to-all models' scores, and each detector's verdict at its own threshold.
- ``timing``: 16 shadows trained with 1 and with 2 Ray workers (fresh each time).

Writes ``<out>/fleet/`` (scans, shadows, the meta-classifier), ``<out>/fleet.json`` and ``<out>/fleet.md``
(copied into docs/lab/fleet-bench.md). The meta-classifier is also kept in bench/models/mntd-jumbo (small).
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import KEPT, ZOO, zoo_case  # noqa: E402

from offline.data import Dataset, load_mnist  # noqa: E402
from offline.fleet.scan import FleetScanSettings, run_fleet  # noqa: E402
from offline.mntd.job import run_mntd_scan, run_mntd_train  # noqa: E402
from offline.mntd.meta import MetaSettings, auroc  # noqa: E402
from offline.mntd.shadows import ShadowSettings, train_shadows  # noqa: E402
from offline.scan.job import run_scan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLEET_ZOO = ("clean-a", "patch-3x3-top-left-white", "blend-0.15")
FLEET_MATRIX = ("clean-1", "badnets-4x4-bottom-left-checker", "wanet-a", "all-to-all-3x3-top-left",
                "trojannn-top-left")
KEPT_META = KEPT / "mntd-jumbo"


def defender_data() -> Dataset:
    clean = load_mnist().split(0.3, seed=0)[1]  # what no zoo or matrix model trained on
    return clean.split(1 / 3, seed=1)[1]


def mnist_models(out: Path) -> dict[str, dict[str, Any]]:
    """Every 28x28 10-class model of the zoo and the matrix: path, backdoored or not, label rule."""
    models = {}
    for name, trigger, _, _ in ZOO:
        path = zoo_case(ROOT / "bench-out" / "scan", name)[0]
        models[f"zoo/{name}"] = {"path": path, "backdoored": trigger is not None, "rule": "all-to-one",
                                 "attack": "none" if trigger is None else name.rsplit("-", 1)[0]}
    for d in sorted(KEPT.iterdir()):
        attack_file = d / "attack.json"
        if not attack_file.is_file():
            continue
        attack = json.loads(attack_file.read_text())
        if attack["data"] != "mnist":
            continue
        models[f"matrix/{d.name}"] = {"path": d / "model.pt", "backdoored": attack["attack"] != "none",
                                      "rule": attack["label_rule"], "attack": attack["attack"]}
    return models


def copy_registry(models: dict[str, dict[str, Any]], names: list[str], registry: Path) -> None:
    """A registry directory of the named models (copies: a fleet hashes and sends what it finds)."""
    shutil.rmtree(registry, ignore_errors=True)
    for name in names:
        dest = registry / name / "model.pt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(models[name]["path"], dest)


def part_fleet(out: Path, data: Dataset, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = [f"zoo/{n}" for n in FLEET_ZOO] + [f"matrix/{n}" for n in FLEET_MATRIX]
    registry = out / "fleet" / "registry-8"
    copy_registry(models, names, registry)
    settings = FleetScanSettings()
    started = time.perf_counter()
    sequential = {}
    for name in names:
        t = time.perf_counter()
        report = run_scan(registry / name / "model.pt", data, out / "fleet" / "sequential" / name, progress=False,
                          **settings.scan_kwargs())
        sequential[name] = {"flagged": report["flagged_classes"], "seconds": round(time.perf_counter() - t, 1),
                            "indices": [r["anomaly_index"] for r in report["per_class"]]}
        print(f"  sequential {name}: flagged {report['flagged_classes']} in {sequential[name]['seconds']} s")
    sequential_seconds = time.perf_counter() - started
    started = time.perf_counter()
    fleet = run_fleet([registry], data, out / "fleet" / "fleet-8", settings, fresh=True, progress=False)
    fleet_seconds = time.perf_counter() - started
    rows = []
    for e in fleet["models"]:
        name = e["name"].rsplit("/", 1)[0]
        s = sequential[name]
        rows.append({"model": name, "sequential_flagged": s["flagged"], "fleet_flagged": e["flagged_classes"],
                     "same": s["flagged"] == e["flagged_classes"],
                     "max_index_difference": round(max(abs(a - b) for a, b in zip(s["indices"], e["anomaly_indices"],
                                                                                   strict=True)), 4),
                     "sequential_seconds": s["seconds"], "fleet_task_seconds": e["seconds"]})
    result = {"models": len(rows), "sequential_seconds": round(sequential_seconds, 1),
              "fleet_seconds": round(fleet_seconds, 1), "ratio": round(sequential_seconds / fleet_seconds, 2),
              "threads": {"sequential": torch.get_num_threads(), "fleet_task": 1},
              "cluster": fleet["cluster"], "all_same": all(r["same"] for r in rows), "rows": rows}
    print(f"fleet: {len(rows)} models sequential {sequential_seconds:.0f} s, fleet {fleet_seconds:.0f} s "
          f"(x{result['ratio']}), verdicts the same: {result['all_same']}")
    return result


def part_mntd(out: Path, data: Dataset, models: dict[str, dict[str, Any]], shadows: int) -> dict[str, Any]:
    meta_dir = out / "fleet" / "mntd"
    manifest = run_mntd_train(data, meta_dir, shadows, ShadowSettings(), MetaSettings(), progress=False)
    shutil.rmtree(KEPT_META, ignore_errors=True)
    KEPT_META.mkdir(parents=True)
    for f in ("mntd.json", "queries.npy", "classifier.npz"):
        shutil.copy2(meta_dir / f, KEPT_META / f)
    # Neural Cleanse on every model through the fleet (the fleet part's 8 scans are reused when they match)
    registry = out / "fleet" / "registry-all"
    copy_registry(models, list(models), registry)
    nc = {e["name"].rsplit("/", 1)[0]: e for e in
          run_fleet([registry], data, out / "fleet" / "fleet-all", FleetScanSettings(), progress=True)["models"]}
    rows = []
    for name, m in models.items():
        report = run_mntd_scan(m["path"], data, out / "fleet" / "mntd-scans" / name, meta_dir)
        rows.append({"model": name, "attack": m["attack"], "rule": m["rule"], "backdoored": m["backdoored"],
                     "mntd_probability": report["backdoor_probability"], "mntd_flagged": report["verdict"] ==
                     "backdoored", "nc_max_index": nc[name]["max_anomaly_index"],
                     "nc_flagged": nc[name]["verdict"] == "backdoored"})
    labels = np.array([r["backdoored"] for r in rows], int)
    mntd_scores = np.array([r["mntd_probability"] for r in rows])
    nc_scores = np.array([r["nc_max_index"] for r in rows])

    def rates(key: str) -> dict[str, float]:
        flagged = np.array([r[key] for r in rows])
        return {"tpr": round(float(flagged[labels == 1].mean()), 3),
                "fpr": round(float(flagged[labels == 0].mean()), 3)}

    a2a = [r for r in rows if r["rule"] == "all-to-all"]
    result = {"shadows": manifest["measured"], "threshold": manifest["threshold"],
              "models": len(rows), "backdoored": int(labels.sum()), "clean": int((labels == 0).sum()),
              "auroc": {"mntd": round(auroc(mntd_scores, labels), 3),
                        "neural_cleanse": round(auroc(nc_scores, labels), 3)},
              "at_threshold": {"mntd": rates("mntd_flagged"), "neural_cleanse": rates("nc_flagged")},
              "all_to_all": a2a, "rows": rows}
    print(f"mntd: AUROC {result['auroc']['mntd']} vs Neural Cleanse {result['auroc']['neural_cleanse']} on "
          f"{len(rows)} models; at threshold {result['at_threshold']}")
    return result


def part_timing(out: Path, data: Dataset, count: int = 16) -> dict[str, Any]:
    result = {"shadows": count}
    for workers in (1, 2):
        target = out / "fleet" / f"timing-{workers}"
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        train_shadows(data, target, count, ShadowSettings(), num_cpus=workers, progress=False, say=lambda _: None)
        result[f"seconds_{workers}_workers"] = round(time.perf_counter() - started, 1)
    result["ratio"] = round(result["seconds_1_workers"] / result["seconds_2_workers"], 2)
    print(f"timing: {count} shadows, 1 worker {result['seconds_1_workers']} s, 2 workers "
          f"{result['seconds_2_workers']} s (x{result['ratio']})")
    return result


def table(results: dict[str, Any]) -> str:
    lines = ["# Fleet scan and MNTD on Ray (bench/bench_fleet.py)", ""]
    if "fleet" in results:
        f = results["fleet"]
        lines += [f"## Fleet scan: {f['models']} models, this machine ({f['cluster']['cpus']} CPUs)", "",
                  f"One after another in one process (torch {f['threads']['sequential']} threads): "
                  f"**{f['sequential_seconds']:.0f} s**; the fleet (one task a model, one CPU and one thread "
                  f"each): **{f['fleet_seconds']:.0f} s**, x{f['ratio']}. Every verdict the same: "
                  f"**{'yes' if f['all_same'] else 'NO'}**.", "",
                  "| model | flagged (sequential) | flagged (fleet) | same | largest anomaly-index difference | "
                  "seconds (sequential) | seconds (fleet task) |", "|---|---|---|---|---|---|---|"]
        for r in f["rows"]:
            lines.append(f"| {r['model']} | {r['sequential_flagged'] or '-'} | {r['fleet_flagged'] or '-'} | "
                         f"{'yes' if r['same'] else 'no'} | {r['max_index_difference']} | {r['sequential_seconds']} | "
                         f"{r['fleet_task_seconds']} |")
        lines.append("")
    if "mntd" in results:
        m = results["mntd"]
        s = m["shadows"]
        lines += [f"## MNTD against Neural Cleanse: {m['models']} models ({m['backdoored']} backdoored, "
                  f"{m['clean']} clean)", "",
                  f"Shadows: {s['shadows']['listed']} trained ({s['shadows']['used']} used, "
                  f"{s['shadows']['left_out_weak_attack']} backdoored ones whose attack did not take left out), "
                  f"{s['shadow_seconds']:.0f} s; meta-classifier {s['meta_seconds']:.0f} s; held-out shadows "
                  f"AUROC {s['calibration_auroc']:.3f}, threshold {m['threshold']:.3f} (FPR "
                  f"{s['calibration_fpr']:.0%}, TPR {s['calibration_tpr']:.0%} on held-out shadows).", "",
                  "| detector | AUROC | TPR at its threshold | FPR at its threshold |", "|---|---|---|---|"]
        for key, label in (("mntd", "MNTD (backdoor probability)"),
                           ("neural_cleanse", "Neural Cleanse (max anomaly index)")):
            lines.append(f"| {label} | {m['auroc'][key]} | {m['at_threshold'][key]['tpr']:.0%} | "
                         f"{m['at_threshold'][key]['fpr']:.0%} |")
        lines += ["", "| model | attack | rule | MNTD probability | MNTD | NC max index | NC |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(m["rows"], key=lambda r: (r["backdoored"], r["model"])):
            lines.append(f"| {r['model']} | {r['attack']} | {r['rule']} | {r['mntd_probability']:.3f} | "
                         f"{'flag' if r['mntd_flagged'] else '-'} | {r['nc_max_index']:.2f} | "
                         f"{'flag' if r['nc_flagged'] else '-'} |")
        union = [r for r in m["rows"] if r["backdoored"] and (r["mntd_flagged"] or r["nc_flagged"])]
        lines += ["", f"Either detector at its threshold: {len(union)} of {m['backdoored']} backdoored models, "
                      f"{sum(not r['backdoored'] and (r['mntd_flagged'] or r['nc_flagged']) for r in m['rows'])} "
                      f"of {m['clean']} clean ones.", ""]
    if "timing" in results:
        t = results["timing"]
        lines += ["## Shadow training: 1 and 2 Ray workers", "",
                  f"{t['shadows']} shadows: 1 worker {t['seconds_1_workers']} s, 2 workers {t['seconds_2_workers']} s "
                  f"(x{t['ratio']}; Ray's start included in both).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="fleet,mntd,timing", help="comma-separated: fleet, mntd, timing")
    parser.add_argument("--shadows", type=int, default=512, help="MNTD shadow models (%(default)s)")
    parser.add_argument("--out", default=str(ROOT / "bench-out"))
    parser.add_argument("--table", action="store_true", help="only write fleet.md again from fleet.json")
    args = parser.parse_args()
    out = Path(args.out)
    data = defender_data()
    models = mnist_models(out)
    saved = out / "fleet.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for part in [] if args.table else args.parts.split(","):
        if part == "fleet":
            results["fleet"] = part_fleet(out, data, models)
        elif part == "mntd":
            results["mntd"] = part_mntd(out, data, models, args.shadows)
        elif part == "timing":
            results["timing"] = part_timing(out, data)
        else:
            raise SystemExit(f"unknown part {part!r}")
        saved.write_text(json.dumps(results, indent=2, default=str))
    (out / "fleet.md").write_text(table(results))
    print(f"written: {saved}, {out / 'fleet.md'}")


if __name__ == "__main__":
    main()
