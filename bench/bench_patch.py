"""The patch job over the project's zoo: repair figures and the guard's screens on held-out data.

Run: ``.venv/bin/python bench/bench_patch.py [--models zoo|holdout|fresh] [--out DIR]``

For every backdoored model of the zoo (``bench_scan.ZOO``: BadNets patches of
three sizes and positions, a blended trigger, an invisible perturbation) it runs
``trojan-forensics patch`` three times on the model's held-out clean data, the
later runs reusing the first run's scan:

- default repair (unlearning): clean accuracy and true-trigger ASR before and
  after, on the job's test split (20 %, never used for repair or calibration);
- ``--repair none`` (guard only): the screens in front of the unrepaired model;
- ``--repair none --strip-scope suspect``: the same with STRIP judging only
  inputs the model answers with the flagged class (FRR budget spent there).

Screens are calibrated on the calibration split (STRIP at 1 % FRR, activation
filter at 5 % FPR) and measured on the test split: clean FRR, and for the true
trigger (non-target test images) the share each screen lets through
("unflagged") and the share of attacks that succeed through the whole guard.
The settings were chosen on one model (patch 4x4, seed 0, target 3), which is
not in this zoo, except the unlearning's grown mask and accuracy-aware stop and
the filter's discriminant, tried on these models as well (see docs/lab/history.md).
``--models holdout`` runs four more backdoored models that no setting was
tried on until the repair's optimiser (chosen on the zoo and the first two of
them); ``--models fresh`` four built after that, untouched by any choice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import ZOO  # noqa: E402

from offline.attacks import AdditiveTrigger, BlendTrigger, PatchTrigger, train_backdoored_model  # noqa: E402
from offline.data import load_mnist  # noqa: E402
from offline.models import save_torchscript  # noqa: E402
from offline.patch.calibrate import CalibrationSettings  # noqa: E402
from offline.patch.job import PatchSettings, run_patch  # noqa: E402
from offline.patch.repair import RepairSettings  # noqa: E402

# models added after the settings of 2026-11-22 were fixed; the repair's SGD optimiser (2026-12-02) was
# chosen on the zoo and on the first two of these, so only FRESH is untouched by it
HOLDOUT = [
    ("holdout-3x3-bottom-right-white", PatchTrigger(3, row=24, col=24), 0, 51),
    ("holdout-5x5-top-left-checker", PatchTrigger(5, row=2, col=2, pattern="checker"), 4, 52),
    ("holdout-4x4-centre-white", PatchTrigger(4, row=12, col=12), 7, 53),
    ("holdout-blend-0.1", BlendTrigger(0.1, seed=9), 2, 54),
]

# models built after the SGD optimiser was chosen (2026-12-02); none of them was used to choose anything
FRESH = [
    ("fresh-4x4-bottom-left-checker", PatchTrigger(4, row=22, col=2, pattern="checker"), 9, 61),
    ("fresh-3x3-top-right-white", PatchTrigger(3, row=2, col=23), 5, 62),
    ("fresh-5x5-bottom-centre-white", PatchTrigger(5, row=21, col=12), 2, 63),
    ("fresh-blend-0.12", BlendTrigger(0.12, seed=13), 6, 64),
]
SETS = {"zoo": ZOO, "holdout": HOLDOUT, "fresh": FRESH}


def _case(root: Path, trigger, target: int, seed: int) -> Path:
    train, clean = load_mnist().split(0.3, seed=0)
    kwargs = {"learn_trigger": True, "eps": 0.1, "epochs": 12} if trigger == "invisible" else {}
    result = train_backdoored_model(train, clean, None if trigger == "invisible" else trigger, target, 0.1,
                                    seed=seed, **kwargs)
    root.mkdir(parents=True, exist_ok=True)
    save_torchscript(result.model, root / "model.pt")
    clean.save_npz(root / "clean.npz")
    summary = result.summary()
    if isinstance(result.trigger, AdditiveTrigger):
        np.save(root / "trigger_delta.npy", result.trigger.delta)
        summary["trigger_delta_file"] = "trigger_delta.npy"
    (root / "attack.json").write_text(json.dumps(summary))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default: bench-out/patch (zoo), bench-out/patch-SET")
    parser.add_argument("--only", default=None, help="run only zoo models whose name contains this")
    parser.add_argument("--models", choices=tuple(SETS), default="zoo",
                        help="the zoo (bench_scan.ZOO), the four hold-out models or the four fresh ones "
                             "(%(default)s)")
    args = parser.parse_args()
    out = Path(args.out or ("bench-out/patch" if args.models == "zoo" else f"bench-out/patch-{args.models}"))
    rows = []
    for name, trigger, target, seed in SETS[args.models]:
        if target is None or (args.only and args.only not in name):
            continue
        case = _case(out / name, trigger, target, seed)
        common = dict(true_trigger_file=case / "attack.json", work_dir=case / "work", progress=False,
                      say=lambda _: None)
        patched = run_patch(case / "model.pt", str(case / "clean.npz"), case / "bundle", **common)
        guard_only = run_patch(case / "model.pt", str(case / "clean.npz"), case / "guard-only",
                               settings=PatchSettings(repair=RepairSettings(method="none")), **common)
        scoped = run_patch(case / "model.pt", str(case / "clean.npz"), case / "guard-only-scoped",
                           settings=PatchSettings(repair=RepairSettings(method="none"),
                                                  calibration=CalibrationSettings(strip_scope="suspect")), **common)
        rep = json.loads((case / "bundle" / "guard.json").read_text())["repair"]
        row = {"model": name, "target": target, "flagged": patched["flagged"],
               "acc_before": rep["before"]["accuracy"], "acc_after": rep["after"]["accuracy"],
               "true_asr_before": rep["before"]["true_asr"], "true_asr_after": rep["after"]["true_asr"]}
        for label, summary in (("patched", patched), ("guard_only", guard_only), ("guard_only_scoped", scoped)):
            ev = summary["evaluation"]
            true = ev.get("true_trigger", {})
            row[label] = {"strip_frr": ev["strip_frr"], "filter_frr": ev["activation_frr"],
                          "strip_unflagged": true.get("strip_unflagged"),
                          "filter_unflagged": true.get("activation_unflagged"),
                          "strip_attacks": true.get("strip_attack_passes"),
                          "filter_attacks": true.get("activation_attack_passes"),
                          "attacks_through_guard": true.get("guard_attack_passes"),
                          "strip_frr_by_class": ev.get("strip_frr_by_class")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "patch.json").write_text(json.dumps(rows, indent=2))

    def pct(v: float | None) -> str:
        return "   -" if v is None else f"{v:6.1%}"

    print("\nrepair (default: unlearning), test split; targets: true ASR <= 2 %, accuracy drop <= 1.5 points")
    print(f"{'model':30} {'flagged':>8} {'ACC before':>10} {'ACC after':>9} {'ASR before':>10} {'ASR after':>9}")
    for r in rows:
        asr_b = r["true_asr_before"] if r["true_asr_before"] is not None else None
        print(f"{r['model']:30} {str(r['flagged']):>8} {pct(r['acc_before']):>10} {pct(r['acc_after']):>9} "
              f"{pct(asr_b):>10} {pct(r['true_asr_after']):>9}")
    print("\nscreens on the test split (STRIP at 1 % target FRR, filter at 5 % target FPR), true-trigger inputs "
          "of other classes: 'pass' = the screen lets them through, 'attack' = it lets them through and the model "
          "answers the attacker's class (on a repaired model most pass harmlessly); targets: STRIP <= 2 %, "
          "filter <= 5 %")
    print(f"{'model':30} {'bundle':>17} {'STRIP FRR':>9} {'pass':>6} {'attack':>6} {'filter FRR':>10} "
          f"{'pass':>6} {'attack':>6} {'attacks through both':>20}")
    for r in rows:
        for label in ("guard_only", "guard_only_scoped", "patched"):
            g = r[label]
            by_class = ", ".join(f"class {k}: {v:.1%}" for k, v in (g["strip_frr_by_class"] or {}).items())
            print(f"{r['model']:30} {label:>17} {pct(g['strip_frr']):>9} {pct(g['strip_unflagged']):>6} "
                  f"{pct(g['strip_attacks']):>6} {pct(g['filter_frr']):>10} {pct(g['filter_unflagged']):>6} "
                  f"{pct(g['filter_attacks']):>6} {pct(g['attacks_through_guard']):>20}"
                  + (f"  (STRIP FRR on {by_class})" if by_class else ""))
    print("guard_only_scoped: --repair none --strip-scope suspect (STRIP judges only inputs answered with the "
          "flagged class)")
    print("(the true-trigger ASR is None where the scan flagged a different class than the true target)")


if __name__ == "__main__":
    main()
