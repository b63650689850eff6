"""Fuzzing at scale: the two Hypothesis properties of tests/guard/test_fuzz.py by the thousand.

Run: ``.venv/bin/python bench/bench_fuzz.py [--examples 5000] [--out bench-out]``

Runs ``pytest tests/guard/test_fuzz.py`` with ``TROJAN_FUZZ_EXAMPLES`` cases per
property, random (not the derandomised draws ``make test`` repeats), and
reports what the cases got: the gRPC status of every fuzzed request and how
many damaged bundles were refused or still loaded (a damage that still
validates, e.g. another policy, must then screen an input without error).
Writes ``<out>/fuzz.json`` and ``<out>/fuzz.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000, help="cases per property (%(default)s)")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = (out / "fuzz.json").resolve()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/guard/test_fuzz.py"], cwd=ROOT,
                          env={**os.environ, "TROJAN_FUZZ_EXAMPLES": str(args.examples), "TROJAN_FUZZ_RANDOM": "1",
                               "TROJAN_FUZZ_REPORT": str(report)})
    seconds = time.perf_counter() - started
    counts = json.loads(report.read_text()) if report.exists() else {}
    counts["seconds"] = round(seconds, 1)
    counts["pytest_exit"] = proc.returncode
    report.write_text(json.dumps(counts, indent=1))
    requests, bundles = counts.get("requests", {}), counts.get("bundles", {})
    md = [f"Fuzzing (`bench/bench_fuzz.py --examples {args.examples}`, {seconds:.0f} s, pytest exit "
          f"{proc.returncode}): {sum(requests.values())} requests, {sum(bundles.values())} damaged bundles.", "",
          "| property | outcome | cases |", "|---|---|---|"]
    md += [f"| request | {k} | {v} |" for k, v in sorted(requests.items())]
    md += [f"| bundle | {k} | {v} |" for k, v in sorted(bundles.items())]
    (out / "fuzz.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
