"""The 43-class scan and the patch job on a GPU against the same on the CPU, one run, every figure labelled.

Run: ``.venv/bin/python bench/bench_gpu.py [--model bench/models/signs-badnets] [--devices cpu,cuda]
[--parts scan,patch] [--out bench-out]``

The model is a kept ``signs`` ResNet-18 (BatchNorm, 43 classes, 32x32 RGB; ``bench/bench_rgb.py`` trains it);
the defender's 1,500 clean images are rebuilt from their seed. For each device in ``--devices`` (default: the
CPU, and CUDA where torch sees a GPU) it times

- ``scan``: the default Neural Cleanse scan (adaptive schedule, all 43 classes) on the scan's fit split;
- ``patch``: the whole guard-only patch job (scan, export, calibration, evaluation; calibration and evaluation
  run the exported ONNX model with onnxruntime on the CPU, as the guard does).

Each row names its device (``torch.cuda.get_device_name`` for a GPU, the CPU's model otherwise) and the
speed-up against the CPU row of the same run. Rows are appended to ``<out>/gpu/runs.jsonl``, so figures from
this machine's CPU and from a GPU machine sit side by side; ``<out>/gpu.md`` tabulates them all.
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

import torch  # noqa: E402
from bench_rgb import signs_splits  # noqa: E402

from offline.jobs import load_case  # noqa: E402
from offline.patch.job import SCAN_SHARE, PatchSettings, run_patch, split_clean  # noqa: E402
from offline.patch.repair import RepairSettings  # noqa: E402
from offline.scan.neural_cleanse import NeuralCleanseConfig, scan  # noqa: E402


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine()) \
        if Path("/proc/cpuinfo").is_file() else platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_scan(model_dir: Path, clean_npz: Path, device: str) -> dict[str, Any]:
    case = load_case(model_dir / "model.pt", str(clean_npz), None, device)
    fit, held, _ = split_clean(case.data, PatchSettings(), SCAN_SHARE)
    _sync(device)
    started = time.perf_counter()
    result = scan(case.model, fit.x, held.x, held.y, case.num_classes, NeuralCleanseConfig())
    _sync(device)
    return {"seconds": round(time.perf_counter() - started, 2), "flagged": result.flagged,
            "class_steps": int(sum(result.best_run.triggers.steps))}


def time_patch(model_dir: Path, clean_npz: Path, device: str, work: Path) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    summary = run_patch(model_dir / "model.pt", str(clean_npz), work / "bundle", work_dir=work / "work",
                        settings=PatchSettings(repair=RepairSettings(method="none")), progress=False,
                        say=lambda _: None, device=device)
    return {"seconds": round(time.perf_counter() - started, 2), "flagged": summary["flagged"]}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| when | part | device | seconds | speed-up vs the CPU row of its run | flagged |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
        lines.append(f"| {r['when']} | {r['part']} | {r['device_name']} ({r['device']}) | {r['seconds']:.1f} | "
                     f"{speed} | {r.get('flagged')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent / "models" / "signs-badnets"))
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda where torch sees "
                                                        "a GPU)")
    parser.add_argument("--parts", default="scan,patch")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    devices = args.devices.split(",") if args.devices else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    if not torch.cuda.is_available():
        print("torch sees no GPU here: CPU figures only (run this again on a GPU machine; rows accumulate)",
              flush=True)
    out = Path(args.out) / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    _, clean = signs_splits()
    clean_npz = out / "clean.npz"
    clean.save_npz(clean_npz)
    model_dir = Path(args.model)
    when = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for part in args.parts.split(","):
        base = None
        for device in devices:
            figures = (time_scan(model_dir, clean_npz, device) if part == "scan"
                       else time_patch(model_dir, clean_npz, device, out / f"patch-{device}"))
            row = {"when": when, "part": part, "device": device, "device_name": device_name(device),
                   "model": model_dir.name, **figures}
            if device == "cpu":
                base = row["seconds"]
            elif base:
                row["speedup"] = round(base / row["seconds"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with (out / "runs.jsonl").open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    every = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    table = markdown(every)
    (Path(args.out) / "gpu.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
