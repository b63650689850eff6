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

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guard.backends import EmbeddedBackend
from guard.bundle import sha256_file
from guard.screens import (
    ActivationFilter,
    KnnDensity,
    MahalanobisDensity,
    OneBudget,
    Screen,
    StripScreen,
    guarantee,
)
from offline.attacks import stamp
from offline.errors import ForensicsError

FILTER_SCORES = ("auto", "mean", "lda")
FILTER_USE = ("auto", "always", "off")
DETECTORS = ("strip", "knn", "mahalanobis")  # trigger-free; "activation" joins by ``filter``


@dataclass
class CalibrationSettings:
    frr: float = 0.01  # the share of clean traffic the guard may refuse, in total
    # how detectors' p-values combine: fisher-cauchy, cauchy, fisher or min (guard.screens.verdict); measured in
    # docs/guard-detectors.md
    rule: str = "fisher-cauchy"
    # "fitted": p-values are tail probabilities against the fit split's clean scores, the verdict split
    # conformal; "bag": ranks among the calibration images with the input (full conformal)
    p_values: str = "fitted"
    detectors: tuple[str, ...] = ("strip", "knn")  # measured best pair: docs/guard-detectors.md
    # the activation filter: "auto" joins the verdict only when the scan flagged a class, "always" also
    # with the most anomalous class's reversed trigger when nothing was flagged, "off" never
    filter: str = "auto"
    strip_n: int | None = None  # None: the paper's rule (grow n until clean entropies' spread flattens)
    strip_candidates: tuple[int, ...] = (5, 10, 20, 50, 100)
    # sequential STRIP: blends in rounds of this many, stopping once the verdict is settled (None: n / 10 from
    # n = 20; 0: all n at once)
    strip_group: int | None = None
    strip_z: float = 3.0
    strip_by_class: bool = True  # STRIP's entropy standardised within the predicted class (fit split's statistics)
    blend_rule: str = "add"
    # "suspect": only inputs answered with a flagged class can be refused; the budget is spent there
    scope: str = "all"
    pool_size: int = 200
    knn_k: int = 5
    # the filter's score: "mean" of the neurons the reversed trigger excites most (Neural Cleanse), "lda" (a
    # linear discriminant between clean and stamped features over the whole layer), or "auto": the candidate
    # that separates clean from stamped calibration images best (AUROC), the simplest within 0.005 of the best
    filter_score: str = "auto"
    filter_top_share: float | None = None  # None: try every candidate share (at least one neuron)
    filter_candidates: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
    # expert overrides: a detector that also refuses on its own at this rate (a budget outside --frr)
    strip_frr: float | None = None
    filter_fpr: float | None = None
    seed: int = 0


def _stats(scores: np.ndarray) -> dict[str, float]:
    return {"count": int(len(scores)), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max())}


# bumped when calibration changes what it computes, so a kept work directory recalibrates
CALIBRATION_VERSION = 3


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


def choose_strip_n(per_blend: np.ndarray, candidates: tuple[int, ...]) -> tuple[int, dict[str, Any]]:
    """STRIP's n as the paper chooses it: grow n until the spread of clean entropies flattens.

    The mean of n blend entropies has variance ``between + within / n``
    (``between``: the spread of the inputs' own entropies; ``within``: the
    blends' noise around them). The spread has flattened once the blends' part
    is at most a tenth of the inputs' own, i.e. the standard deviation is within
    5 % of its limit; ``per_blend`` is (inputs, max n) clean blend entropies.
    """
    n_max = per_blend.shape[1]
    within = float(per_blend.var(axis=1, ddof=1).mean())
    between = float(per_blend.mean(axis=1).var(ddof=1)) - within / n_max
    spread = {n: float(per_blend[:, :n].mean(axis=1).std()) for n in candidates if n <= n_max}
    chosen = next((n for n in sorted(spread) if between > 0 and within / n <= 0.1 * between), max(spread))
    return chosen, {"within_variance": within, "between_variance": between, "clean_entropy_std": spread,
                    "rule": "smallest n with within / n <= 0.1 * between (std within 5 % of its limit)"}


def _class_entropy(backend: EmbeddedBackend, strip: StripScreen, x: np.ndarray, num_classes: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of clean STRIP entropy per predicted class (all classes pooled where fewer than 5)."""
    entropy, predicted = [], []
    for i in range(0, len(x), 64):
        logits = backend.infer(np.concatenate([x[i:i + 64], strip.extra_rows(x[i:i + 64])]))[0]
        b = len(x[i:i + 64])
        entropy.append(strip.per_blend(logits[b:]).mean(axis=1))
        predicted.append(logits[:b].argmax(axis=1))
    h, k = np.concatenate(entropy), np.concatenate(predicted)
    overall = (float(h.mean()), float(max(h.std(ddof=1), 1e-6)))
    stats = [(float(h[k == c].mean()), float(max(h[k == c].std(ddof=1), 1e-6))) if (k == c).sum() >= 5 else overall
             for c in range(num_classes)]
    return np.array([m for m, _ in stats]), np.array([sd for _, sd in stats])


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


def fit_density(features: np.ndarray, predicted: np.ndarray, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision of one shared Ledoit-Wolf covariance of clean features."""
    from sklearn.covariance import LedoitWolf

    f = features.reshape(len(features), -1).astype(np.float64)
    overall = f.mean(axis=0)
    means = np.stack([f[predicted == k].mean(axis=0) if (predicted == k).any() else overall
                      for k in range(num_classes)])
    return means, LedoitWolf().fit(f - means[predicted]).precision_


def _filter(backend: EmbeddedBackend, s: CalibrationSettings, x_fit: np.ndarray, y_fit: np.ndarray, target: int,
            mask: np.ndarray, pattern: np.ndarray) -> tuple[ActivationFilter, list[dict[str, Any]], str]:
    """The activation filter that best separates clean from reversed-trigger images, all on the fit split.

    Candidates are fitted on one half of the fit split and chosen by their
    separation on the other; the calibration images stay out of it, so their
    scores remain exchangeable with clean traffic's (a filter chosen where the
    calibration images score low would refuse more fresh clean inputs than
    the budget allows).
    """
    if s.filter_score not in FILTER_SCORES:
        raise ForensicsError(f"unknown filter score '{s.filter_score}' (one of {', '.join(FILTER_SCORES)})")
    order = np.random.default_rng(s.seed).permutation(len(x_fit))
    halves = order[: len(order) // 2], order[len(order) // 2:]

    def features(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = x_fit[idx], y_fit[idx]
        return backend.infer(x)[1], backend.infer(stamp(x[y != target], mask[None], pattern).astype(np.float32))[1]

    (clean_a, stamped_a), (clean_b, stamped_b) = features(halves[0]), features(halves[1])
    if min(len(clean_a), len(stamped_a), len(clean_b), len(stamped_b)) < 2:
        raise ForensicsError("the activation filter needs at least 4 clean fit images, 4 of them of other classes "
                             "than the target")
    candidates: list[tuple[str, float | None, ActivationFilter]] = []
    if s.filter_score in ("auto", "mean"):
        for share in [s.filter_top_share] if s.filter_top_share else s.filter_candidates:
            candidates.append(("mean", share, ActivationFilter(choose_activation_neurons(clean_a, stamped_a, share))))
    if s.filter_score in ("auto", "lda"):
        weights = discriminant(clean_a, stamped_a)
        candidates.append(("lda", None, ActivationFilter(np.arange(len(weights)), weights)))
    tried = [{"score": kind, "top_share": share, "neurons": len(af.neurons),
              "reversed_trigger_auroc": round(_auroc(af.feature_scores(clean_b), af.feature_scores(stamped_b)), 4)}
             for kind, share, af in candidates]
    best = max(t["reversed_trigger_auroc"] for t in tried)
    pick = next(i for i, t in enumerate(tried) if t["reversed_trigger_auroc"] >= best - 0.005)
    return candidates[pick][2], tried, candidates[pick][0]


def calibrate(backend: EmbeddedBackend, pool: np.ndarray, x_calib: np.ndarray, y_calib: np.ndarray,
              x_fit: np.ndarray, y_fit: np.ndarray, num_classes: int, out_dir: Path, *, flagged: list[int],
              target: int, mask: np.ndarray, pattern: np.ndarray, settings: CalibrationSettings | None = None
              ) -> dict[str, Any]:
    """The bundle's detector sections and its verdict; detector arrays are written into ``out_dir``.

    Density detectors are fitted on the fit split's features (the classes the
    model answers them with); every detector is then scored on the
    calibration images, which set the one false-rejection budget.
    """
    s = settings or CalibrationSettings()
    unknown = [d for d in s.detectors if d not in DETECTORS]
    if unknown or s.filter not in FILTER_USE:
        raise ForensicsError(f"unknown detector(s) {unknown or s.filter}: choose from {', '.join(DETECTORS)} "
                             f"(the activation filter is set by filter: {', '.join(FILTER_USE)})")
    use_filter = s.filter == "always" or (s.filter == "auto" and bool(flagged))
    if not s.detectors and not use_filter:
        raise ForensicsError("no detector left for the verdict: name at least one trigger-free detector")
    sections: dict[str, Any] = {}
    detectors: list[Any] = []
    selection: dict[str, Any] = {}

    if "strip" in s.detectors:
        candidates = (s.strip_n,) if s.strip_n else tuple(n for n in s.strip_candidates if n <= len(pool))
        if not candidates:
            raise ForensicsError(f"STRIP's candidate n {list(s.strip_candidates)} all exceed the pool of "
                                 f"{len(pool)} images; raise --pool-size or set --strip-n")
        probe = StripScreen(pool, max(candidates), s.blend_rule, seed=s.seed)
        # chosen on the fit split, so the calibration scores stay exchangeable with clean traffic's
        x_probe = x_fit[np.random.default_rng(s.seed).permutation(len(x_fit))[:len(x_calib)]]
        per_blend = np.concatenate([probe.per_blend(backend.infer(probe.extra_rows(x_probe[i:i + 64]))[0])
                                    for i in range(0, len(x_probe), 64)])
        n, selection["strip_n"] = choose_strip_n(per_blend, candidates)
        class_mean = class_std = None
        if s.strip_by_class:
            class_mean, class_std = _class_entropy(backend, StripScreen(pool, n, s.blend_rule, seed=s.seed + 1),
                                                   x_fit, num_classes)
        detectors.append(StripScreen(pool, n, s.blend_rule, seed=s.seed, class_mean=class_mean, class_std=class_std))
        group = (n // 10 if n >= 20 else None) if s.strip_group is None else (s.strip_group or None)
        if group is not None and group >= n:
            raise ForensicsError(f"--strip-group {group} must be below STRIP's n={n}")
        sections["strip"] = {"n": n, "blend_rule": s.blend_rule, "alone_frr": s.strip_frr, "group": group,
                             "within_sd": float(np.sqrt(selection["strip_n"]["within_variance"])), "z": s.strip_z,
                             "class_mean": [] if class_mean is None else [float(v) for v in class_mean],
                             "class_std": [] if class_std is None else [float(v) for v in class_std]}
    fit_logits, fit_features = backend.infer(x_fit)
    fit_pred = fit_logits.argmax(axis=1)
    if "knn" in s.detectors:
        counts = np.bincount(fit_pred, minlength=num_classes)
        k = max(1, min(s.knn_k, int(counts[counts > 0].min())))
        np.save(out_dir / "knn_reference.npy", fit_features.reshape(len(fit_features), -1).astype(np.float32))
        detectors.append(KnnDensity(fit_features, fit_pred, k))
        sections["knn"] = {"reference_file": "knn_reference.npy",
                           "reference_sha256": sha256_file(out_dir / "knn_reference.npy"),
                           "labels": [int(v) for v in fit_pred], "k": k, "alone_frr": None}
    if "mahalanobis" in s.detectors:
        means, precision = fit_density(fit_features, fit_pred, num_classes)
        np.savez(out_dir / "mahalanobis.npz", means=means, precision=precision)
        detectors.append(MahalanobisDensity(means, precision))
        sections["mahalanobis"] = {"file": "mahalanobis.npz", "sha256": sha256_file(out_dir / "mahalanobis.npz"),
                                   "alone_frr": None}
    if use_filter:
        af, selection["filter"], kind = _filter(backend, s, x_fit, y_fit, target, mask, pattern)
        detectors.append(af)
        sections["activation_filter"] = {"neurons": [int(v) for v in af.neurons], "filter_score": kind,
                                         "weights": [] if af.weights is None else [float(v) for v in af.weights],
                                         "alone_frr": s.filter_fpr}

    screen = Screen(detectors)
    scores, answered = screen.score(backend.infer, x_calib)
    reference = reference_scores(screen, backend, x_fit) if s.p_values == "fitted" else None
    for i, (d, column) in enumerate(zip(detectors, scores.T, strict=True)):
        key = "activation_filter" if d.name == "activation" else d.name
        sections[key]["calibration_scores"] = [round(float(v), 7) for v in column]
        if reference is not None:
            sections[key]["reference_scores"] = [round(float(v), 7) for v in reference[:, i]]
        if d.name == "strip":
            sections[key]["clean_entropy"] = _stats(column)
        if d.name == "activation":
            sections[key]["clean_score"] = _stats(column)
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
