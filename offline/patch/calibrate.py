"""Calibrate the guard's detectors and its one verdict on the exported model, with the guard's own code.

Everything here runs the exported ONNX model through ``guard.backends`` and
scores with ``guard.screens``: the numbers the verdict is calibrated on are the
numbers the guard computes at run time.

Trigger-free detectors (STRIP, and the k-NN and Mahalanobis densities of the
features layer, fitted on the fit split) are chosen from clean data only; the
activation filter, which needs the scan's reversed trigger, takes part only
where the scan flagged a class (``filter="auto"``). All of them are scored on
the same calibration images, which set the one budget (see
``guard.screens.verdict``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from guard.backends import EmbeddedBackend
from guard.bundle import sha256_file
from guard.screens import OneBudget, Screen, guarantee
from guard.screens.registry import BY_NAME, TRIGGER_FREE
from guard.screens.spec import FitData
from offline.errors import ForensicsError
from offline.patch.settings import FILTER_USE, CalibrationSettings
from offline.stamp import stamp

# bumped when calibration changes what it computes, so a kept work directory recalibrates
CALIBRATION_VERSION = 5  # 5: the fitted verdict in log space (a clean outlier no longer ties a triggered input)


def _auroc(clean: np.ndarray, suspicious: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(suspicious))], np.r_[clean, suspicious]))


def frr_upper_bound(n: int, flag_rank: int, confidence: float = 0.95) -> float:
    """Upper bound on the clean refusal rate given one calibration draw of n images.

    With continuous scores the conformal refusal rate, over calibration draws,
    is Beta(k, n + 1 - k) for flag rank k (Vovk 2012); its ``confidence``
    quantile bounds the rate this bundle refuses with that confidence.
    """
    if flag_rank <= 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, flag_rank, n + 1 - flag_rank))


def images_for(rate: float, confidence: float = 0.95, within: float = 2.5) -> int:
    """Fewest calibration images from which on the ``confidence`` bound stays within ``within`` x ``rate``.

    The bound is a sawtooth in n (it jumps each time one more rank refuses), so
    this is the first n after which it never leaves the band again (checked to
    ten times that n).
    """
    def bound(n: int) -> float:
        return frr_upper_bound(n, guarantee(n, rate)["flag_rank"], confidence)

    n = max(1, int(np.ceil(1 / rate)) - 1)
    while n < 10 ** 6:
        if bound(n) <= within * rate and guarantee(n, rate)["flag_rank"] > 0:
            late = next((m for m in range(n + 1, 10 * n) if bound(m) > within * rate), None)
            if late is None:
                return n
            n = late
        n += 1
    return n


def calibrate(backend: EmbeddedBackend, pool: np.ndarray, x_calib: np.ndarray, y_calib: np.ndarray,
              x_fit: np.ndarray, y_fit: np.ndarray, num_classes: int, out_dir: Path, *, flagged: list[int],
              target: int, mask: np.ndarray, pattern: np.ndarray, settings: CalibrationSettings | None = None,
              features_layer: str = "features", model_outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle's detector sections and its verdict; detector arrays are written into ``out_dir``.

    Each detector (``guard.screens.registry``) is fitted on the fit split
    (density detectors on the features of the classes the model answers them
    with); every detector is then scored on the calibration images, which set
    the one false-rejection budget.
    """
    s = settings or CalibrationSettings()
    unknown = [d for d in s.detectors if d not in TRIGGER_FREE]
    if unknown or s.filter not in FILTER_USE:
        raise ForensicsError(f"unknown detector(s) {unknown or s.filter}: choose from {', '.join(TRIGGER_FREE)} "
                             f"(the activation filter is set by filter: {', '.join(FILTER_USE)})")
    use_filter = s.filter == "always" or (s.filter == "auto" and bool(flagged))
    if not s.detectors and not use_filter:
        raise ForensicsError("no detector left for the verdict: name at least one trigger-free detector")

    def save(name: str, content: Any) -> str:
        path = out_dir / name
        if isinstance(content, dict):
            np.savez(path, **content)
        else:
            np.save(path, content, allow_pickle=False)
        return sha256_file(path)

    fit_logits, fit_features = backend.infer(x_fit)[:2]
    data = FitData(backend.infer, pool, x_fit, y_fit, fit_logits, fit_features, num_classes, len(x_calib), save,
                   features_layer, target, lambda x: stamp(x, mask[None], pattern).astype(np.float32),
                   model_outputs or {})
    sections: dict[str, Any] = {}
    detectors: list[Any] = []
    selection: dict[str, Any] = {}
    for name in (*s.detectors, *(("activation",) if use_filter else ())):
        kind = BY_NAME[name]
        try:
            fitted = kind.fit(data, s)
        except ValueError as exc:
            raise ForensicsError(f"cannot fit the {name} detector: {exc}") from exc
        detectors.append(fitted.detector)
        sections[kind.section] = {"alone_frr": None, **fitted.section}
        if fitted.selection is not None:
            selection[name] = fitted.selection

    screen = Screen(detectors)
    scores, answered = screen.score(backend.infer, x_calib)
    reference = reference_scores(screen, backend, x_fit) if s.p_values == "fitted" else None
    for i, (d, column) in enumerate(zip(detectors, scores.T, strict=True)):
        section = sections[d.section]
        section["calibration_scores"] = [round(float(v), 7) for v in column]
        if reference is not None:
            section["reference_scores"] = [round(float(v), 7) for v in reference[:, i]]
        section.update(d.Spec.finish(column))
    classes = sorted(int(k) for k in flagged) if s.scope == "suspect" else []
    try:
        budget = OneBudget(screen.names, tuple(d.side for d in detectors), scores, s.frr, s.rule, tuple(classes),
                           answered, reference=reference)
    except ValueError as exc:
        raise ForensicsError(f"cannot calibrate the verdict: {exc}") from exc
    g = dict(budget.guarantee)
    if g["flag_rank"] == 0:
        raise ForensicsError(
            f"{g['calibration_images']} calibration images cannot support a false-rejection budget of "
            f"{s.frr:.2%}: the smallest they can express is {g['smallest_frr']:.2%}; give at least "
            f"{int(np.ceil(1 / budget.rate))} calibration images (more clean data, or --calibration-fraction) "
            f"or raise --frr")
    g["frr_upper_95"] = frr_upper_bound(g["calibration_images"], g["flag_rank"])
    sections["verdict"] = {"frr": s.frr, "rule": s.rule, "p_values": s.p_values, "detectors": list(screen.names),
                           "classes": classes,
                           "calibration_classes": [int(v) for v in answered], "guarantee": g}
    return {**sections, "selection": selection, "settings": asdict(s),
            "images_for_tight_bound": images_for(budget.rate)}


def reference_scores(screen: Screen, backend: EmbeddedBackend, x_fit: np.ndarray) -> np.ndarray:
    """Every detector's clean scores on the fit split (N, D), for the verdict's fitted p-values. A detector
    whose references are the fit split itself (k-NN: each image is its own nearest neighbour) gives its own
    ``reference_scores()``, each reference left out."""
    scores, _ = screen.score(backend.infer, x_fit)
    for d, det in enumerate(screen.detectors):
        own = getattr(det, "reference_scores", None)
        if own is not None:
            column = own()
            if len(column) != len(x_fit):
                raise ForensicsError(f"the {det.name} detector's references are not the fit split's images")
            scores[:, d] = column
    return scores


def evaluate(backend: EmbeddedBackend, screen: Screen, x_clean: np.ndarray,
             triggered: dict[str, tuple[np.ndarray, np.ndarray | int]]) -> dict[str, Any]:
    """The verdict on held-out clean inputs and on each triggered set.

    ``triggered`` maps a name to (inputs, the attacker's class for each, or one
    for all). "unflagged" is the share the guard lets through; "attack_passes"
    the share let through *and* answered with the attacker's class, i.e.
    attacks that succeed through the guard. ``by_detector``: of the refused
    inputs, the share each detector was the strongest evidence for;
    ``detector_auroc``: each detector's own separation of clean from triggered.
    """
    def run(x: np.ndarray) -> tuple[np.ndarray, ...]:
        parts = [screen.run(backend.infer, x[i:i + 256]) for i in range(0, len(x), 256)]
        return tuple(np.concatenate([getattr(p, k) if k != "p_values" else p.judgement.p_values for p in parts])
                     for k in ("scores", "p_values", "flagged", "predicted", "forward_passes"))

    def by_detector(p_values: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
        strongest = p_values[flagged].argmin(axis=1)
        return {n: float((strongest == d).mean()) if flagged.any() else 0.0 for d, n in enumerate(screen.names)}

    clean_scores, clean_p, clean_flag, _, passes = run(x_clean)
    out: dict[str, Any] = {"clean_images": int(len(x_clean)), "frr": float(clean_flag.mean()),
                           "frr_by_detector": by_detector(clean_p, clean_flag),
                           "forward_passes": float(passes.mean())}
    sides = {d.name: d.side for d in screen.detectors}
    for name, (x, target) in triggered.items():
        scores, p_values, flag, pred, passes = run(x)
        hit = pred == np.asarray(target)
        auroc = {}
        for d, det in enumerate(screen.names):
            sign = -1.0 if sides[det] == "low" else 1.0
            auroc[det] = round(_auroc(sign * clean_scores[:, d], sign * scores[:, d]), 4) if len(x) else None
        out[name] = {"images": int(len(x)), "model_asr": float(hit.mean()), "unflagged": float((~flag).mean()),
                     "attack_passes": float((~flag & hit).mean()), "by_detector": by_detector(p_values, flag),
                     "forward_passes": float(passes.mean()),
                     "detector_auroc": auroc}
    return out
