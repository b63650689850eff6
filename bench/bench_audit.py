"""Training-data audit over the project's zoo: precision and recall of flagged poison.

Run: ``.venv/bin/python bench/bench_audit.py [--rates 0.03,0.1] [--out bench-out/audit]``

For every zoo model with a fixed poisoned set (``bench_scan.ZOO``: BadNets
patches of three sizes and positions, a blended trigger; the invisible trigger
is drawn afresh every batch, so it has no poisoned rows to find) and for the
clean models, it trains on the embedded MNIST digits at each poison rate and
audits the training set as trained on with the default settings: Activation
Clustering with exclusionary reclassification, and Spectral Signatures.
Precision and recall are measured against the simulator's poison indices.

The audit's settings were chosen on other models (BadNets 4x4 bottom-right
target 3 seed 0, blend 0.15 target 5 seed 1, clean seed 2, all at 3 %), not
on this zoo. The zoo's default rate (10 % of the set) is half of the target
label, beyond the minority-cluster assumption of Activation Clustering; it is
reported anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import ZOO  # noqa: E402

from offline.attacks import apply_poison, train_backdoored_model  # noqa: E402
from offline.audit import audit, detection_quality  # noqa: E402
from offline.data import load_mnist  # noqa: E402
from offline.models import ForensicModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.03,0.1", help="poison rates (share of the training set)")
    parser.add_argument("--out", default="bench-out/audit")
    args = parser.parse_args()
    train, held_out = load_mnist().split(0.3, seed=0)
    rows = []
    rates = [float(r) for r in args.rates.split(",")]
    for rate in rates:
        for name, trigger, target, seed in ZOO:
            if trigger == "invisible" or (target is None and rate != rates[0]):  # clean models once
                continue
            bd = train_backdoored_model(train, held_out, trigger, target or 0, rate if target is not None else 0.0,
                                        seed=seed)
            x, y = (apply_poison(train.x, train.y, trigger, target, bd.poison_idx) if target is not None
                    else (train.x, train.y))
            started = time.perf_counter()
            result = audit(ForensicModel(bd.model, "body.8"), x, y)
            seconds = time.perf_counter() - started
            ac = detection_quality(result["activation_clustering"]["flagged_indices"], bd.poison_idx)
            ss = detection_quality(result["spectral_signatures"]["removed_indices"], bd.poison_idx)
            kept = {c["label"]: c["kept_label"] for c in result["classes"]}
            row = {"model": name, "rate": rate if target is not None else 0.0, "target": target,
                   "asr": bd.attack_success_rate, "flagged_labels": result["flagged_classes"],
                   "target_kept": kept.get(target) if target is not None else None,
                   "ambiguous": [c["label"] for c in result["classes"] if c["ambiguous"]],
                   "lowest_other_kept": min(v for k, v in kept.items() if k != target),
                   "ac": ac, "ss": ss, "seconds": round(seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(rows, indent=2))

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    print(f"\n{'model':30} {'rate':>5} {'ASR':>5} {'flagged':>10} {'kept: target / lowest other':>27} "
          f"{'AC flagged':>10} {'AC P':>5} {'AC R':>5} {'SS P':>5} {'SS R':>5} {'time':>6}")
    for r in rows:
        poisoned = r["target"] is not None
        print(f"{r['model']:30} {r['rate']:>5.0%} {pct(r['asr']):>5} {str(r['flagged_labels']):>10} "
              f"{pct(r['target_kept']) + ' / ' + pct(r['lowest_other_kept']):>27} {r['ac']['flagged']:>10} "
              f"{pct(r['ac']['precision']) if poisoned and r['ac']['flagged'] else '-':>5} "
              f"{pct(r['ac']['recall']) if poisoned else '-':>5} "
              f"{pct(r['ss']['precision']) if poisoned else '-':>5} {pct(r['ss']['recall']) if poisoned else '-':>5} "
              f"{r['seconds']:>5.1f}s")
    print("(kept = share of a label's suspect cluster, its smaller one, that the probe still classifies as the "
          "label; flagged below 30 %. AC P is '-' where nothing was flagged)")


if __name__ == "__main__":
    main()
