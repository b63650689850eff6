"""Calibrate the guard's screens on the exported model, with the guard's own code.

Everything here runs the exported ONNX model through ``guard.backends`` and
scores with ``guard.screening``: the numbers a threshold is set from are the
numbers the guard computes at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from guard.backends import EmbeddedBackend
from guard.screening import (
    ActivationFilter,
    StripScreen,
    answered_with,
    normal_threshold,
    quantile_threshold,
    screen,
)
from offline.attacks import stamp
from offline.errors import ForensicsError

FILTER_SCORES = ("auto", "mean", "lda")


@dataclass
class CalibrationSettings:
    strip_frr: float = 0.01
    strip_n: int | None = None  # None: the smallest candidate that detects as well as the best
    strip_candidates: tuple[int, ...] = (5, 10, 20, 50)
    blend_rule: str = "add"
    # "suspect": STRIP only judges inputs answered with a flagged class and spends the whole FRR budget there
    strip_scope: str = "all"
    threshold_rule: str = "quantile"
    pool_size: int = 200
    filter_fpr: float = 0.05
    # the filter's score: "mean" of the neurons the reversed trigger excites most (Neural Cleanse), "lda" (a
    # linear discriminant between clean and stamped features over the whole layer), or "auto": the first of
    # the mean candidates, then lda, that stops the reversed trigger within a point of the best
    filter_score: str = "auto"
    # None: try every candidate share (at least one neuron)
    filter_top_share: float | None = None
    filter_candidates: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
    seed: int = 0


def _stats(scores: np.ndarray) -> dict[str, float]:
    return {"count": int(len(scores)), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max())}


def _strip_scores(backend: EmbeddedBackend, pool: np.ndarray, n: int, rule: str, x: np.ndarray,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """STRIP entropy of every input, and the class the model answers it with."""
    strip = StripScreen(pool, n, threshold=0.0, rule=rule, seed=seed)
    dummy = ActivationFilter(np.array([0]), threshold=0.0)
    results = [screen(backend.infer, x[i:i + 256], strip, dummy) for i in range(0, len(x), 256)]
    return (np.concatenate([r.strip.scores for r in results]),
            np.concatenate([r.logits.argmax(axis=1) for r in results]))


def scoped_rate(frr: float, predicted: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, float]:
    """Which clean inputs a scoped STRIP judges, and the rate among them that costs ``frr`` overall."""
    inside = answered_with(predicted, classes)
    if not inside.any():
        raise ForensicsError(f"no calibration image is answered with class(es) {list(classes)}: STRIP cannot "
                             f"be calibrated for them; use --strip-scope all")
    return inside, min(1.0, frr * len(predicted) / int(inside.sum()))


def choose_activation_neurons(clean_features: np.ndarray, stamped_features: np.ndarray,
                              top_share: float) -> np.ndarray:
    """Features units the reversed trigger excites most (top share, at least one)."""
    diff = stamped_features.reshape(len(stamped_features), -1).mean(0) - clean_features.reshape(
        len(clean_features), -1).mean(0)
    count = max(1, int(round(top_share * len(diff))))
    return np.sort(np.argsort(-diff, kind="stable")[:count])


def discriminant(clean_features: np.ndarray, stamped_features: np.ndarray) -> np.ndarray:
    """Weights of a linear discriminant (shrinkage LDA) scoring stamped features high, clean ones low."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x = np.concatenate([clean_features, stamped_features]).reshape(len(clean_features) + len(stamped_features), -1)
    y = np.r_[np.zeros(len(clean_features)), np.ones(len(stamped_features))]
    w = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x.astype(np.float64), y).coef_[0]
    return (w / np.linalg.norm(w)).astype(np.float32)


def calibrate(backend: EmbeddedBackend, pool: np.ndarray, x_calib: np.ndarray, y_calib: np.ndarray,
              target: int, mask: np.ndarray, pattern: np.ndarray, settings: CalibrationSettings | None = None,
              strip_classes: Sequence[int] = (), x_fit: np.ndarray | None = None,
              y_fit: np.ndarray | None = None) -> dict[str, Any]:
    """Thresholds for STRIP (at the target FRR) and the activation filter (at the target FPR).

    The reversed trigger stamped on calibration images of other classes stands
    in for attack traffic when choosing STRIP's n and the filter's neurons (and,
    unless fixed, how many: the smallest share of the features layer that
    stops it within a point of the best share).
    With ``strip_classes`` STRIP only judges inputs answered with one of them,
    and its threshold flags the share of those clean inputs that costs the
    target FRR over all of them. The filter's discriminant is fitted on
    ``x_fit`` (clean, and stamped where ``y_fit`` is not the target; default:
    the calibration images), so that its threshold and its reversed-trigger
    pass rate come from images it was not fitted on.
    """
    s = settings or CalibrationSettings()
    if s.filter_score not in FILTER_SCORES:
        raise ForensicsError(f"unknown filter score '{s.filter_score}' (one of {', '.join(FILTER_SCORES)})")
    classes = sorted(int(k) for k in strip_classes)
    stamped = stamp(x_calib[y_calib != target], mask[None], pattern).astype(np.float32)
    candidates = [s.strip_n] if s.strip_n else [n for n in s.strip_candidates if n <= len(pool)]
    trials = []
    for n in candidates:
        clean, answered = _strip_scores(backend, pool, n, s.blend_rule, x_calib, s.seed)
        inside, rate = scoped_rate(s.strip_frr, answered, classes)
        thr = quantile_threshold(clean[inside], rate, low_is_suspicious=True)
        triggered, t_answered = _strip_scores(backend, pool, n, s.blend_rule, stamped, s.seed + 1)
        caught = (triggered < thr) & answered_with(t_answered, classes)
        trials.append({"n": n, "threshold": thr, "reversed_trigger_pass_rate": float(1.0 - caught.mean()),
                       "clean": clean[inside], "rate": rate})
    best = min(t["reversed_trigger_pass_rate"] for t in trials)
    chosen = next(t for t in trials if t["reversed_trigger_pass_rate"] <= best + 0.01)
    clean, rate = chosen["clean"], chosen["rate"]
    thresholds = {"quantile": quantile_threshold(clean, rate, True),
                  "normal": normal_threshold(clean, rate, True)}
    clean_features, stamped_features = backend.infer(x_calib)[1], backend.infer(stamped)[1]
    # (score, share, neurons, weights) for every candidate filter
    candidates_af: list[tuple[str, float | None, np.ndarray, np.ndarray | None]] = []
    if s.filter_score in ("auto", "mean"):
        for share in [s.filter_top_share] if s.filter_top_share else s.filter_candidates:
            candidates_af.append(("mean", share, choose_activation_neurons(clean_features, stamped_features, share),
                                  None))
    if s.filter_score in ("auto", "lda"):
        if x_fit is None or y_fit is None:
            fit_clean, fit_stamped = clean_features, stamped_features
        else:
            fit_clean = backend.infer(x_fit)[1]
            fit_stamped = backend.infer(stamp(x_fit[y_fit != target], mask[None], pattern).astype(np.float32))[1]
        if min(len(fit_clean), len(fit_stamped)) >= 2:
            weights = discriminant(fit_clean, fit_stamped)
            candidates_af.append(("lda", None, np.arange(len(weights)), weights))
        elif s.filter_score == "lda":
            raise ForensicsError("the filter's discriminant needs at least 2 clean images and 2 of other "
                                 "classes than the target to fit on")
    filters = []
    for score, share, neurons, weights in candidates_af:
        af = ActivationFilter(neurons, threshold=0.0, weights=weights)
        af_clean = af.scores(clean_features)
        af_thr = quantile_threshold(af_clean, s.filter_fpr, low_is_suspicious=False)
        filters.append({"score": score, "top_share": share, "neurons": len(neurons), "threshold": af_thr,
                        "reversed_trigger_pass_rate": float((af.scores(stamped_features) <= af_thr).mean()),
                        "chosen": (neurons, weights, af_clean)})
    best_af = min(f["reversed_trigger_pass_rate"] for f in filters)
    pick = next(f for f in filters if f["reversed_trigger_pass_rate"] <= best_af + 0.01)
    (neurons, weights, af_clean), af_thr = pick["chosen"], pick["threshold"]
    return {
        "strip": {
            "n": chosen["n"], "blend_rule": s.blend_rule, "threshold": thresholds[s.threshold_rule],
            "threshold_rule": s.threshold_rule, "thresholds": thresholds, "target_frr": s.strip_frr,
            "clean_entropy": _stats(clean), "calibration_scores": [round(float(v), 6) for v in clean],
            "classes": classes,
        },
        "strip_scope": {"classes": classes, "share_of_clean_judged": len(clean) / len(x_calib),
                        "rate_among_judged": rate},
        "activation_filter": {
            "neurons": [int(v) for v in neurons], "threshold": af_thr, "target_fpr": s.filter_fpr,
            "weights": [] if weights is None else [float(v) for v in weights],
            "clean_score": _stats(af_clean), "calibration_scores": [round(float(v), 6) for v in af_clean],
        },
        "n_selection": [{k: v for k, v in t.items() if k not in ("clean", "rate")} for t in trials],
        "filter_selection": [{k: v for k, v in f.items() if k != "chosen"} for f in filters],
        "filter_score": pick["score"],
        "settings": asdict(s),
    }


def evaluate_screens(backend: EmbeddedBackend, strip: StripScreen, activation: ActivationFilter,
                     x_clean: np.ndarray, triggered: dict[str, tuple[np.ndarray, int]],
                     y_clean: np.ndarray | None = None) -> dict[str, Any]:
    """FRR on held-out clean inputs; for each triggered set, how many get through each screen.

    ``triggered`` maps a name to (inputs, target class). "unflagged" is the share
    the screen lets through; "attack_passes" the share let through by both screens
    *and* answered with the target class, i.e. attacks that succeed through the guard.
    """
    def run(x: np.ndarray):
        return [screen(backend.infer, x[i:i + 256], strip, activation) for i in range(0, len(x), 256)]

    clean = run(x_clean)
    strip_flags = np.concatenate([r.strip.flagged for r in clean])
    out: dict[str, Any] = {
        "clean_images": int(len(x_clean)),
        "strip_frr": float(strip_flags.mean()),
        "activation_frr": float(np.concatenate([r.activation.flagged for r in clean]).mean()),
        "combined_frr": float(np.concatenate([r.flagged for r in clean]).mean()),
    }
    if strip.classes and y_clean is not None:  # a scoped STRIP concentrates its rejections on these classes
        out["strip_frr_by_class"] = {str(k): float(strip_flags[y_clean == k].mean()) for k in strip.classes
                                     if (y_clean == k).any()}
    for name, (x, target) in triggered.items():
        res = run(x)
        strip_flag = np.concatenate([r.strip.flagged for r in res])
        af_flag = np.concatenate([r.activation.flagged for r in res])
        hit = np.concatenate([r.logits.argmax(1) for r in res]) == target
        out[name] = {
            "images": int(len(x)),
            "model_asr": float(hit.mean()),
            "strip_unflagged": float((~strip_flag).mean()),
            "activation_unflagged": float((~af_flag).mean()),
            "strip_attack_passes": float((~strip_flag & hit).mean()),
            "activation_attack_passes": float((~af_flag & hit).mean()),
            "guard_attack_passes": float((~(strip_flag | af_flag) & hit).mean()),
        }
    return out
