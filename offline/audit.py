"""Training-data audit: find the poisoned samples of a training set with the model trained on it.

- **Activation Clustering** (Chen et al., 2019). Per label, the activations of
  the model's convolutional representation (the layer feeding its first fully
  connected layer) are reduced to 10 dimensions (ICA, as in the paper, after a
  PCA to at most 50 that drops degenerate directions) and split in two by
  k-means. Poison of one trigger, relabelled to the target, forms a cluster of
  its own; as in the paper, the suspect is each label's smaller cluster (poison
  is assumed to be a minority of its label). Whether it is poison is decided by
  *exclusionary reclassification*: a classifier that never saw the cluster
  classifies it. A clean cluster is still put in its label; a poisoned one,
  whose trigger that classifier never learned, goes to the classes its images
  really show. The paper retrains the whole network; here the classifier is a
  linear probe (logistic regression) on the same representation, fitted on
  every other sample, because on a few thousand images a network retrained
  without a cluster generalises too poorly to tell style from poison. A cluster
  is flagged when less than ``keep_threshold`` of it stays in its label. (The
  paper's ``p / l > T`` compares with the single most frequent other class,
  which misses poison stamped on images of many source classes: it scatters
  back to all of them.) A clean cluster of an unusual style can also leave its
  label; on MNIST-sized sets that is the main source of false flags. When the
  smaller cluster is flagged, the larger one is reclassified too: if it also
  leaves the label, the poison may be half the label or more (the rest of the
  label is then mostly poison, so the clean part leaves as well) and the
  suspects may be the clean half; ``ambiguous`` marks the label.
  With ``exclusionary=False`` a label is flagged by silhouette and cluster size.
- **Spectral Signatures** (Tran et al., 2018). Per label, centre the
  representations and score each sample by its squared projection on the top
  singular vector; poison concentrates along it. The top ``1.5 x`` the expected
  poison count of every label are removed (the paper's rule).
- **Clean-anchored spectral audit** (this project's; needs the defender's
  clean images, :func:`anchored_spectral`). Like SPECTRE (Hayase et al.,
  2021) it whitens the label's top singular directions with a covariance that
  poison cannot bend, but takes that covariance from the defender's clean
  images of the label instead of a robust estimate that assumes the poison is
  a minority: so it works when the poison is half the label or most of it, and
  it estimates the poison count instead of taking a rate from the user.

All run on numpy arrays with scikit-learn, one label at a time; indices in the
result refer to rows of the audited set.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

from offline.errors import DataError
from offline.models import ForensicModel, is_linear
from offline.stamp import stamp


@dataclass
class AuditSettings:
    """Knobs of the audit, with the defaults of the papers where they give one."""

    layer: str | None = None  # default: the layer feeding the first fully connected layer
    reduce: Literal["ica", "pca"] = "ica"
    components: int = 10
    # exclusionary reclassification: a linear probe fitted without the smaller cluster classifies it
    exclusionary: bool = True
    keep_threshold: float = 0.3  # flag when less than this share of the suspect cluster stays in its label
    probe_c: float = 1.0
    probe_iterations: int = 500
    # without the probe: flag a label whose smaller cluster is well separated and of poison size
    silhouette_threshold: float = 0.25
    max_cluster_share: float = 0.35
    min_cluster_share: float = 0.01
    silhouette_sample: int = 3000
    # spectral signatures: expected poisoned share of a label, and how much more than that to remove
    expected_poison_rate: float = 0.1
    removal_factor: float = 1.5
    # clean-anchored spectral audit (with the defender's clean images): principal directions of a label, the
    # clean images' quantile a label must exceed too often to be flagged, the family-wise false-flag rate over
    # labels, rounds of the cross-fitted linear refinement and its regularisation
    anchored_components: int = 10
    anchored_quantile: float = 0.95
    anchored_alpha: float = 1e-6
    anchored_excess: float = 2.0  # ... and at least this many times the rate of a clean label of the set
    anchored_rounds: int = 3
    anchored_c: float = 0.01
    seed: int = 0


@dataclass
class ClassAudit:
    label: int
    count: int
    silhouette: float  # of 2-means on the label's reduced activations
    suspect_size: int  # the smaller cluster
    suspect_share: float
    # exclusionary reclassification of the suspect cluster (None when not run)
    kept_label: float | None  # share the probe still puts in the label
    reclassified_as: int | None  # the most frequent other class
    reclassified_share: float | None
    reclassified_spread: float | None  # effective number of classes the leavers go to
    flagged: bool
    ambiguous: bool  # both clusters leave the label: the poison may be half of it or more
    spectral_peak: float  # mean score of the removed samples / median score: how peaked the signature is
    ac_flagged_indices: list[int] = field(default_factory=list)
    ss_removed_indices: list[int] = field(default_factory=list)


def clustering_layer(model: ForensicModel) -> str:
    """The leaf feeding the model's first fully connected layer (its convolutional representation).

    Falls back to the features layer when the first layer is already fully
    connected. In small CNNs the penultimate layer has already mapped the poison
    onto its target, while the convolutional representation still keeps it apart.
    """
    leaves = model.leaf_modules()
    first = next((i for i, (_, m) in enumerate(leaves) if is_linear(m)), None)
    if not first:
        return model.features_layer
    return leaves[first - 1][0]


@torch.no_grad()
def layer_activations(model: ForensicModel, layer: str, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.cat([model.layer_output(layer, xt[i:i + batch_size]).flatten(1)
                      for i in range(0, len(xt), batch_size)]).numpy().astype(np.float64)


def reduce_dimensions(feats: np.ndarray, s: AuditSettings) -> np.ndarray:
    """PCA to at most 50 non-degenerate directions, then ICA (or PCA) to ``components``."""
    keep = feats.std(axis=0) > 1e-9
    f = feats[:, keep]
    rank = min(50, f.shape[1], len(f) - 1)
    if rank < 1:
        return np.zeros((len(feats), 1))
    pre = PCA(n_components=rank, random_state=s.seed).fit(f)
    pre_k = max(1, int(np.sum(pre.explained_variance_ > 1e-9 * pre.explained_variance_[0])))
    z = pre.transform(f)[:, :pre_k]
    k = min(s.components, pre_k)
    if s.reduce == "pca":
        return z[:, :k]
    with warnings.catch_warnings():  # a non-converged ICA still gives usable directions for 2-means
        warnings.simplefilter("ignore", ConvergenceWarning)
        return FastICA(n_components=k, random_state=s.seed, max_iter=1000, tol=1e-3,
                       whiten="unit-variance").fit_transform(z)


def two_means(reduced: np.ndarray, s: AuditSettings) -> tuple[np.ndarray, float]:
    """Cluster assignment (0/1) and silhouette of 2-means on one label's reduced activations."""
    if len(reduced) < 4:
        return np.zeros(len(reduced), dtype=int), 0.0
    assign = KMeans(n_clusters=2, n_init=10, random_state=s.seed).fit_predict(reduced)
    if assign.min() == assign.max():
        return assign, 0.0
    silhouette = silhouette_score(reduced, assign, sample_size=min(len(reduced), s.silhouette_sample),
                                  random_state=s.seed)
    return assign, float(silhouette)


def spectral_signature(feats: np.ndarray) -> np.ndarray:
    """Outlier score of every sample: squared projection of its centred representation on the top singular vector."""
    centred = feats - feats.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[0]) ** 2


@dataclass
class AnchoredClass:
    label: int
    count: int
    clean_images: int  # the defender's clean images of the label
    above: float  # share of the label's rows beyond the clean images' quantile
    expected_above: float  # that share in a clean label of this set: 1 - quantile, or the labels' median if higher
    p_value: float  # of that many or more beyond it, were the label clean (binomial)
    flagged: bool
    estimated_poison: int  # rows flagged: the poison count, estimated
    flagged_indices: list[int] = field(default_factory=list)


def _anchored_scores(rows: np.ndarray, clean: np.ndarray, components: int, seed: int) -> tuple[np.ndarray,
                                                                                             np.ndarray]:
    """Log Mahalanobis distance of a label's rows from its clean images, in the rows' top principal directions
    with the clean images' (shrunk) covariance; and the clean images' own, each scored by a fit without it
    (5-fold), which is their distribution when clean."""
    from sklearn.covariance import LedoitWolf
    from sklearn.model_selection import KFold

    pca = PCA(n_components=max(1, min(components, len(clean) - 2, rows.shape[1], len(rows))),
              random_state=seed).fit(rows)
    r, c = pca.transform(rows), pca.transform(clean)
    scores = np.log(LedoitWolf().fit(c).mahalanobis(r) + 1e-12)
    null = np.empty(len(c))
    for fit, held in KFold(n_splits=min(5, len(c)), shuffle=True, random_state=seed).split(c):
        null[held] = np.log(LedoitWolf().fit(c[fit]).mahalanobis(c[held]) + 1e-12)
    return scores, null


def _refine(feats: np.ndarray, suspect: np.ndarray, s: AuditSettings) -> np.ndarray:
    """Rounds of a cross-fitted linear probe on all of the label's activations, trained on the current split
    and predicting each fold it did not see: the trigger's direction sharpens the split the few principal
    directions made."""
    from sklearn.model_selection import cross_val_predict

    z = StandardScaler().fit_transform(feats)
    for _ in range(s.anchored_rounds):
        if min(int(suspect.sum()), int((~suspect).sum())) < 5:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            suspect = cross_val_predict(LogisticRegression(C=s.anchored_c, max_iter=300), z, suspect, cv=5) == 1
    return suspect


def anchored_spectral(feats: np.ndarray, y: np.ndarray, clean_feats: np.ndarray, clean_y: np.ndarray,
                      s: AuditSettings) -> list[AnchoredClass]:
    """Audit every label against the defender's clean images of it; indices refer to rows of ``feats``.

    Per label: its rows are scored by their whitened distance from its clean images in its top
    ``anchored_components`` principal directions (poison, whatever its share, pulls these directions towards
    itself while the clean images' covariance stays clean). The clean images' own cross-fitted scores give
    the distribution of a clean row; the label is flagged when more of its rows lie beyond that
    distribution's ``anchored_quantile`` than chance allows (binomial, ``anchored_alpha`` over all labels)
    and at least ``anchored_excess`` times as many as in the median label (the rate of a clean label of
    this set: a training set that differs from the clean images everywhere is not flagged everywhere).
    In a flagged label a 2-component mixture on the scores splits the rows, a cross-fitted linear probe on
    all activations refines the split (``anchored_rounds``), and the upper part is flagged: its size is the
    estimated poison count. A label with fewer than 5 clean images is not audited (``clean_images`` says so).
    """
    from scipy.stats import binom
    from sklearn.mixture import GaussianMixture

    labels = [int(v) for v in np.unique(y)]
    scored: dict[int, tuple[np.ndarray, int]] = {}
    nulls = []
    for label in labels:
        rows, clean = feats[y == label], clean_feats[clean_y == label]
        if len(clean) < 5 or len(rows) < 4:
            continue
        scores, null = _anchored_scores(rows, clean, s.anchored_components, s.seed)
        scored[label] = (scores, len(clean))
        nulls.append(null)
    threshold = float(np.quantile(np.concatenate(nulls), s.anchored_quantile)) if nulls else np.inf
    beyond = {label: int((scores > threshold).sum()) for label, (scores, _) in scored.items()}
    # The rate a clean label of this set lies beyond the threshold: nominally 1 - quantile, more where the
    # training rows differ from the clean images (another source, augmentation): the labels' median, so a
    # shift that touches every label flags none; poison in most labels at once (all-to-all) is missed.
    base = max(1 - s.anchored_quantile,
               float(np.median([beyond[label] / len(scored[label][0]) for label in scored])) if scored else 0.0)
    out = []
    for label in labels:
        idx = np.flatnonzero(y == label)
        if label not in scored:
            out.append(AnchoredClass(label, len(idx), int((clean_y == label).sum()), 0.0, round(base, 4), 1.0,
                                     False, 0))
            continue
        scores, n_clean = scored[label]
        p = float(binom.sf(beyond[label] - 1, len(scores), base))
        flagged = p < s.anchored_alpha / len(labels) and beyond[label] >= s.anchored_excess * base * len(scores)
        suspect = np.zeros(len(idx), dtype=bool)
        if flagged:
            gm = GaussianMixture(2, random_state=s.seed, n_init=3).fit(scores[:, None])
            suspect = gm.predict(scores[:, None]) == int(np.argmax(gm.means_[:, 0]))
            suspect = _refine(feats[idx], suspect, s)
        out.append(AnchoredClass(label, len(idx), n_clean, round(beyond[label] / len(idx), 4), round(base, 4), p,
                                 bool(flagged), int(suspect.sum()), sorted(idx[suspect].tolist())))
    return out


@dataclass
class PoisonCharacter:
    """What the flagged rows share, from their mean difference to their nearest clean images (pixels)."""

    family: str  # patch, sinusoidal, blended, or image-dependent (warping, sample-specific)
    rows: int
    concentration: float  # share of the mean difference's energy in its strongest 5 % of pixels
    spread: float  # share of the image spanned by the box around its pixels at >= half its peak
    periodicity: float  # share of its (non-constant) spectral energy at its strongest frequency
    region: list[int]  # that box: top, left, height, width


def poison_character(rows: np.ndarray, clean_x: np.ndarray) -> PoisonCharacter:
    """The trigger's family as the flagged rows show it, for the report's attribution.

    Each row minus its nearest clean image (Euclidean, pixels) keeps the trigger and a difference of
    shapes; averaged over the rows the shapes cancel and the trigger stays. A patch puts most of that mean's
    energy in a few pixels (concentration >= 0.8, or its strongest pixels within a tenth of the image); a
    sinusoidal signal (SIG) puts it at one spatial frequency (periodicity >= 0.4); a blend spreads it over
    the image (concentration < 0.35); what is left, neither compact nor spread, moves with each image
    (warping, sample-specific triggers). Thresholds from one set of each family and the unit test's
    triggers (docs/lab/audit.md); all-to-all poison is not told apart here.
    """
    from sklearn.neighbors import NearestNeighbors

    flat = rows.reshape(len(rows), -1)
    nearest = NearestNeighbors(n_neighbors=1).fit(clean_x.reshape(len(clean_x), -1)).kneighbors(flat)[1][:, 0]
    mean = (rows - clean_x[nearest]).mean(axis=0).mean(axis=0)  # (H, W)
    energy = mean ** 2
    total = max(float(energy.sum()), 1e-12)
    concentration = float(np.sort(energy.ravel())[::-1][:max(1, int(0.05 * energy.size))].sum() / total)
    r, c = np.nonzero(np.abs(mean) >= 0.5 * np.abs(mean).max())
    box = [int(r.min()), int(c.min()), int(np.ptp(r)) + 1, int(np.ptp(c)) + 1]
    spread = box[2] * box[3] / mean.size
    spectrum = np.abs(np.fft.rfft2(mean - mean.mean())) ** 2
    spectrum[0, 0] = 0.0
    periodicity = float(spectrum.max() / max(float(spectrum.sum()), 1e-12))
    family = ("patch" if concentration >= 0.8 or spread <= 0.1 else "sinusoidal" if periodicity >= 0.4 else
              "blended" if concentration < 0.35 else "image-dependent")
    return PoisonCharacter(family, len(rows), round(concentration, 3), round(spread, 3), round(periodicity, 3),
                           box)


@dataclass
class Reclassified:
    kept: float  # share the probe still puts in the label
    other: int  # the most frequent other class
    other_share: float
    spread: float  # effective number of classes the leavers go to: exp(entropy) of their distribution


def exclusionary_reclassification(reps: np.ndarray, y: np.ndarray, members: np.ndarray,
                                  s: AuditSettings) -> Reclassified:
    """Fit a linear probe on every representation but ``members`` (all of one label) and classify them."""
    label = int(y[members[0]])
    keep = np.ones(len(y), dtype=bool)
    keep[members] = False
    probe = LogisticRegression(max_iter=s.probe_iterations, C=s.probe_c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(reps[keep], y[keep])
    counts = np.bincount(probe.predict(reps[members]), minlength=int(y.max()) + 1).astype(float)
    kept = counts[label] / len(members)
    counts[label] = 0
    other = int(np.argmax(counts))
    leavers = counts[counts > 0] / max(counts.sum(), 1.0)
    spread = float(np.exp(-(leavers * np.log(leavers)).sum())) if len(leavers) else 0.0
    return Reclassified(float(kept), other, float(counts[other] / len(members)), spread)


def audit(model: ForensicModel, x: np.ndarray, y: np.ndarray, settings: AuditSettings | None = None,
          progress: Callable[[Iterable[Any], int, str], Iterable[Any]] = lambda it, total, desc: it,
          triggers: list[RecoveredTrigger] | None = None,
          clean: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Audit a (possibly poisoned) training set; indices in the result refer to rows of ``x``.

    ``progress(iterable, total, description)`` wraps the long loops (a progress bar). ``triggers`` (the
    scan's recovered triggers, :func:`load_recovered_triggers`) add the trigger-informed audit of their labels;
    ``clean`` (the defender's clean images and labels, never trained on) the clean-anchored spectral audit.
    """
    s = settings or AuditSettings()
    if len(x) != len(y) or len(y) == 0:
        raise DataError(f"the training set has {len(x)} images and {len(y)} labels; need as many of each, > 0")
    if clean is not None:
        cx, cy = clean
        if len(cx) != len(cy) or len(cy) == 0 or cx.shape[1:] != x.shape[1:]:
            raise DataError(f"the clean images are {cx.shape[1:]} x {len(cy)} labels; need images shaped like "
                            f"the training set's {x.shape[1:]}, one label each")
    layer = s.layer or clustering_layer(model)
    feats = layer_activations(model, layer, x)
    labels = [int(v) for v in np.unique(y)]

    reps = StandardScaler().fit_transform(feats) if s.exclusionary else None
    ordered: list[ClassAudit] = []
    for label in progress(labels, len(labels), "audit"):
        idx = np.flatnonzero(y == label)
        assign, silhouette = two_means(reduce_dimensions(feats[idx], s), s)
        small = int(np.argmin(np.bincount(assign, minlength=2)))
        members = idx[assign == small]
        share = len(members) / len(idx)
        found: Reclassified | None = None
        ambiguous = False
        if reps is not None:
            flagged = False
            if 0 < len(members) < len(y):
                found = exclusionary_reclassification(reps, y, members, s)
                flagged = found.kept < s.keep_threshold
            rest = idx[assign != small]
            if flagged and len(rest):
                # Poison as large as the clean part (or larger) leaves the clean part as the smaller cluster,
                # and that leaves its label too, since what remains of the label is mostly poison: then both
                # clusters leave, and the suspects may be the clean half. Marked, not guessed (choosing the
                # cluster whose leavers scatter more fixed one zoo case and broke two).
                other_half = exclusionary_reclassification(reps, y, rest, s)
                ambiguous = other_half.kept < s.keep_threshold
        else:
            flagged = silhouette >= s.silhouette_threshold and s.min_cluster_share <= share <= s.max_cluster_share
        scores = spectral_signature(feats[idx])
        budget = min(len(idx), int(round(s.removal_factor * s.expected_poison_rate * len(idx))))
        removed = np.argsort(scores)[::-1][:budget]
        peak = float(scores[removed].mean() / max(float(np.median(scores)), 1e-12)) if budget else 0.0
        ordered.append(ClassAudit(
            label, len(idx), round(silhouette, 4), len(members), round(share, 4),
            *((round(found.kept, 4), found.other, round(found.other_share, 4), round(found.spread, 2)) if found
              else (None, None, None, None)),
            bool(flagged), ambiguous, round(peak, 2), sorted(members.tolist()) if flagged else [],
            sorted(idx[removed].tolist())))
    result = {
        "settings": {**asdict(s), "layer": layer},
        "samples": int(len(y)),
        "features_dim": int(feats.shape[1]),
        "flagged_classes": [c.label for c in ordered if c.flagged],
        "activation_clustering": {"flagged_indices": sorted(i for c in ordered for i in c.ac_flagged_indices)},
        "spectral_signatures": {"removed_indices": sorted(i for c in ordered for i in c.ss_removed_indices)},
        "classes": [asdict(c) for c in ordered],
    }
    if clean is not None:
        anchored = anchored_spectral(feats, y, layer_activations(model, layer, cx), np.asarray(cy), s)
        result["anchored_spectral"] = {
            "clean_images": int(len(cy)),
            "flagged_classes": [a.label for a in anchored if a.flagged],
            "flagged_indices": sorted(i for a in anchored for i in a.flagged_indices),
            "classes": [asdict(a) | ({"character": asdict(poison_character(x[a.flagged_indices], cx))}
                                     if a.flagged_indices else {}) for a in anchored]}
    if triggers:
        found = trigger_informed(model, x, y, triggers, layer, seed=s.seed)
        result["trigger_informed"] = {"labels": [t.target for t in triggers],
                                      "flagged_indices": sorted(i for t in found for i in t.flagged_indices),
                                      "classes": [asdict(t) for t in found]}
    return result


def detection_quality(flagged: list[int], truth: np.ndarray) -> dict[str, float]:
    """Precision and recall of flagged indices against the true poison indices."""
    flagged_set, true_set = set(flagged), set(np.asarray(truth).tolist())
    hits = len(flagged_set & true_set)
    return {"flagged": len(flagged_set), "poisoned": len(true_set), "hits": hits,
            "precision": round(hits / len(flagged_set), 4) if flagged_set else 1.0,
            "recall": round(hits / len(true_set), 4) if true_set else 1.0}


# --- trigger-informed audit: the scan's recovered trigger tells the poison apart ---------------------------------

@dataclass
class RecoveredTrigger:
    """A flagged class's trigger as the scan recovered it: mask (1, H, W) or (H, W) and pattern (C, H, W)."""

    target: int
    mask: np.ndarray
    pattern: np.ndarray


def load_recovered_triggers(scan_json: str | Path) -> list[RecoveredTrigger]:
    """The recovered triggers of a ``scan.json`` (from ``scan``, or a bundle's ``report/scan.json``).

    A flagged class without a recovered trigger (``scan --no-recover``) takes its scan-time trigger from
    ``triggers/masks.npy`` and ``patterns.npy``."""
    path = Path(scan_json)
    path = path / "scan.json" if path.is_dir() else path
    try:
        doc = json.loads(path.read_text())
        found = {}
        for rec in doc.get("recovered_triggers", []):
            found[int(rec["class"])] = RecoveredTrigger(int(rec["class"]), np.load(path.parent / rec["mask_file"]),
                                                        np.load(path.parent / rec["pattern_file"]))
        missing = [int(c) for c in doc.get("flagged_classes", []) if int(c) not in found]
        if missing:
            arrays = doc["trigger_arrays"]
            masks, patterns = np.load(path.parent / arrays["masks"]), np.load(path.parent / arrays["patterns"])
            for c in missing:
                found[c] = RecoveredTrigger(c, masks[c], patterns[c])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{path}: not a usable scan.json with its trigger files ({exc})") from exc
    return [found[c] for c in sorted(found)]


def _grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask scaled to a peak of 1 and grown by ``pixels`` (the repair's dilation): (1, H, W)."""
    from offline.patch.repair.core import grow_mask

    m = np.asarray(mask, dtype=np.float32).reshape(1, *np.asarray(mask).shape[-2:])
    return grow_mask(torch.from_numpy(m / max(float(m.max()), 1e-12)), pixels).numpy()


@torch.no_grad()
def _log_probs(model: ForensicModel, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.cat([torch.log_softmax(model(xt[i:i + batch_size]), dim=1)
                      for i in range(0, len(xt), batch_size)]).numpy()


def _robust_z(v: np.ndarray) -> np.ndarray:
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * 1.4826
    return (v - med) / max(mad, 1e-6 * max(1.0, abs(med)), 1e-12)


def _knn_distance(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Mean distance of each row of ``a`` to its ``k`` nearest rows of ``b``."""
    from sklearn.neighbors import NearestNeighbors

    k = max(1, min(k, len(b)))
    return NearestNeighbors(n_neighbors=k).fit(b).kneighbors(a)[0].mean(axis=1)


@dataclass
class TriggerAudit:
    label: int
    count: int
    flagged: int  # rows of the label flagged as poison
    share: float
    separation: float  # between the mixture's two components, in pooled standard deviations (0: one population)
    cut_drop_clean: float  # median drop of log p(label) when the mask's area is cut out: the kept rows
    cut_drop_flagged: float  # the same for the flagged rows
    flagged_indices: list[int] = field(default_factory=list)


def trigger_informed(model: ForensicModel, x: np.ndarray, y: np.ndarray, triggers: list[RecoveredTrigger],
                     layer: str, references: int = 512, grow: int = 1, k: int = 5, min_separation: float = 3.0,
                     min_drop: float = float(np.log(2.0)), seed: int = 0) -> list[TriggerAudit]:
    """Rank each flagged label's rows by how much they behave like the recovered trigger; cut where two
    populations separate.

    Two kinds of evidence per row of the label, each standardised within the label (median, MAD):

    - *cut-out*: the recovered mask's area (grown by ``grow`` pixels) is replaced by the mean of clean images
      of other labels there; a poisoned row loses its trigger and the model's log-probability of the label
      drops, a clean row keeps it;
    - *proximity*: in the audited representation, a poisoned row sits nearer to images of other labels stamped
      with the recovered trigger than to the same images clean (the ratio of mean ``k``-NN distances).

    A 2-component Gaussian mixture on their sum splits the label; the upper component's rows are flagged when
    the two are ``min_separation`` pooled standard deviations apart and a row loses at least ``min_drop`` of
    log-probability (half the probability) when cut, so a label with one population (a clean label the scan
    flagged) keeps every row, at 1 % poison or at 60 %. That cut needs a trigger the recovered mask covers (a
    patch); a blended trigger, which a small recovered mask does not cut out, is missed (docs/lab/audit.md).
    """
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    out = []
    for trig in triggers:
        idx = np.flatnonzero(y == trig.target)
        others = np.flatnonzero(y != trig.target)
        if len(idx) < 4 or len(others) == 0:
            continue
        ref = x[rng.choice(others, size=min(references, len(others)), replace=False)]
        mask = _grown(trig.mask, grow)
        fill = ref.mean(axis=0)
        rows = x[idx]
        drop = _log_probs(model, rows)[:, trig.target] - _log_probs(model, stamp(rows, mask, fill))[:, trig.target]
        stamped = stamp(ref, trig.mask.reshape(mask.shape), trig.pattern).astype(np.float32)
        feats = layer_activations(model, layer, np.concatenate([rows, ref, stamped]))
        feats = StandardScaler().fit(feats[len(rows):]).transform(feats)
        f_rows, f_ref, f_stamped = feats[:len(rows)], feats[len(rows):len(rows) + len(ref)], feats[-len(ref):]
        proximity = np.log(_knn_distance(f_rows, f_ref, k) + 1e-9) - np.log(_knn_distance(f_rows, f_stamped, k)
                                                                          + 1e-9)
        score = _robust_z(drop) + _robust_z(proximity)
        gm = GaussianMixture(2, random_state=seed, n_init=3).fit(score[:, None])
        upper = int(np.argmax(gm.means_[:, 0]))
        assign = gm.predict(score[:, None]) == upper
        pooled = float(np.sqrt(gm.covariances_.reshape(2).mean()))
        separation = float(abs(gm.means_[1, 0] - gm.means_[0, 0]) / max(pooled, 1e-12))
        poison = assign & (drop >= min_drop) if 0 < assign.sum() < len(idx) and separation >= min_separation \
            else np.zeros(len(idx), dtype=bool)
        out.append(TriggerAudit(
            trig.target, len(idx), int(poison.sum()), round(float(poison.mean()), 4), round(separation, 2),
            round(float(np.median(drop[~poison])), 3) if (~poison).any() else 0.0,
            round(float(np.median(drop[poison])), 3) if poison.any() else 0.0,
            sorted(idx[poison].tolist())))
    return out
