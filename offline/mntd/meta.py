"""MNTD's meta-classifier with query tuning (Xu et al., IEEE S&P 2021, section IV-C), its calibration and its
artefact.

A model is judged by its outputs on ``queries`` learned inputs: their softmax vectors, concatenated, go through
a one-hidden-layer network to a backdoor logit. Queries and network are optimised together on the shadows
(binary cross-entropy, Adam), the shadows frozen. The threshold is taken on shadows the training never saw:
the clean ones' scores at the target false-positive rate. The artefact is arrays and JSON only (no pickle,
no code), every file's SHA-256 in ``mntd.json``, checked on load, with a format version a newer tool can
refuse or convert.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offline.errors import ForensicsError
from offline.flags import fraction, option, positive
from offline.jobs import TOOL_VERSION, step_progress, write_json_atomic

FORMAT = "trojan-forensics-mntd"
FORMAT_VERSION = 1
MANIFEST = "mntd.json"


@dataclass(frozen=True)
class MetaSettings:
    """The meta-classifier's training and calibration."""

    queries: int = option(10, "learned query inputs (the paper's 10)", type=positive(int))
    hidden: int = option(20, "hidden units of the meta-classifier (the paper's 20)", type=positive(int))
    meta_epochs: int = option(100, "passes over the training shadows", type=positive(int))
    lr: float = option(1e-3, "Adam learning rate of queries and classifier", flag="--meta-lr")
    calibration_share: float = option(0.2, "share of the shadows kept out of training to calibrate the threshold "
                                           "and measure the meta-classifier", type=fraction)
    target_fpr: float = option(0.05, "false-positive rate the threshold is calibrated at, on held-out clean "
                                     "shadows", type=fraction)
    min_shadow_asr: float = option(0.5, "backdoored shadows whose attack reached less than this ASR are left "
                                        "out (their backdoor did not take)", type=fraction)
    meta_seed: int = option(0, "seed of the queries' start and the training order")


def _net(settings: MetaSettings, shape: Sequence[int], num_classes: int, seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class QueryMeta(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.raw = nn.Parameter(torch.randn(settings.queries, *shape))  # pixels = sigmoid(raw), in [0, 1]
            self.fc1 = nn.Linear(settings.queries * num_classes, settings.hidden)
            self.fc2 = nn.Linear(settings.hidden, 1)

        def forward(self, model: nn.Module) -> torch.Tensor:
            outputs = torch.softmax(model(torch.sigmoid(self.raw)), dim=1).reshape(-1)
            return self.fc2(torch.relu(self.fc1(outputs)))[0]

    return QueryMeta()


def fit_meta(models: Sequence[Any], labels: Sequence[int], settings: MetaSettings, shape: Sequence[int],
             num_classes: int, progress: Callable[[int], None] | None = None) -> Any:
    """Optimise queries and classifier on ``models`` (frozen torch modules) with ``labels`` (1 = backdoored)."""
    import torch

    net = _net(settings, shape, num_classes, settings.meta_seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(settings.meta_seed)
    y = torch.tensor(labels, dtype=torch.float32)
    for epoch in range(settings.meta_epochs):
        for i in rng.permutation(len(models)):  # one shadow a step, as the paper's reference code does
            optimiser.zero_grad()
            loss = loss_fn(net(models[i]), y[i])
            loss.backward()
            optimiser.step()
        if progress is not None:
            progress(epoch)
    net.eval()
    return net


def conformal_threshold(clean_scores: np.ndarray, fpr: float) -> float:
    """The score above which a model is flagged: the ceil((n + 1)(1 - fpr))-th smallest of ``n`` held-out clean
    scores (at most ``fpr`` of clean models above it, in expectation); above all of them when n is too small."""
    scores = np.sort(np.asarray(clean_scores, float))
    rank = math.ceil((len(scores) + 1) * (1 - fpr))
    return float(scores[rank - 1]) if rank <= len(scores) else float(scores[-1])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


@dataclass
class MetaClassifier:
    """A trained, calibrated meta-classifier as arrays: what ``scan --method mntd`` runs."""

    queries: np.ndarray  # (Q, C, H, W) in [0, 1]
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    threshold: float  # on the backdoor probability
    manifest: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return self.w1.shape[1] // len(self.queries)

    def probability(self, logits: np.ndarray) -> float:
        """The backdoor probability of a model from its logits on :attr:`queries`."""
        logits = np.asarray(logits, np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        outputs = (e / e.sum(axis=1, keepdims=True)).reshape(-1)
        hidden = np.maximum(self.w1 @ outputs + self.b1, 0)
        z = float(self.w2 @ hidden + self.b2)
        return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))

    @classmethod
    def from_net(cls, net: Any, threshold: float, manifest: dict[str, Any]) -> MetaClassifier:
        import torch

        with torch.no_grad():
            arrays = [torch.sigmoid(net.raw), net.fc1.weight, net.fc1.bias, net.fc2.weight[0], net.fc2.bias[0]]
            q, w1, b1, w2, b2 = (a.detach().cpu().numpy().astype(np.float32) for a in arrays)
        return cls(q, w1, b1, w2, b2, threshold, manifest)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, payload in (("queries.npy", self.queries),
                              ("classifier.npz", {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2})):
            buf = io.BytesIO()
            (np.savez(buf, **payload) if isinstance(payload, dict) else np.save(buf, payload))
            (out / name).write_bytes(buf.getvalue())
            files[name] = hashlib.sha256(buf.getvalue()).hexdigest()
        manifest = {**self.manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": TOOL_VERSION,
                    "threshold": self.threshold, "files": files}
        write_json_atomic(out / MANIFEST, manifest)
        self.manifest = manifest
        return out / MANIFEST

    @classmethod
    def load(cls, path: str | Path) -> MetaClassifier:
        """Read a saved meta-classifier, verifying its format and every file's digest."""
        root = Path(path)
        manifest_path = root / MANIFEST if root.is_dir() else root
        root = manifest_path.parent
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ForensicsError(f"--meta {path}: no readable {MANIFEST} ({exc}); train one with "
                                 f"'trojan-forensics mntd train'") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ForensicsError(f"{manifest_path}: not an MNTD meta-classifier ('format' is not {FORMAT!r})")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ForensicsError(f"{manifest_path}: format version {manifest.get('format_version')} is not the "
                                 f"{FORMAT_VERSION} this tool reads; train it again with this version")
        arrays: dict[str, Any] = {}
        for name in ("queries.npy", "classifier.npz"):
            try:
                data = (root / name).read_bytes()
            except OSError as exc:
                raise ForensicsError(f"{root / name}: missing ({exc.strerror})") from None
            if hashlib.sha256(data).hexdigest() != manifest.get("files", {}).get(name):
                raise ForensicsError(f"{root / name}: its SHA-256 does not match {MANIFEST}; the meta-classifier "
                                     f"was changed after it was saved")
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
            arrays.update(dict(loaded) if name.endswith(".npz") else {"queries": loaded})
        return cls(arrays["queries"], arrays["w1"], arrays["b1"], arrays["w2"], float(arrays["b2"]),
                   float(manifest["threshold"]), manifest)


def split_shadows(records: Sequence[dict], share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, calibration) positions in ``records``, stratified by clean / backdoored."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in (False, True):
        idx = rng.permutation([i for i, r in enumerate(records) if r["backdoored"] == label])
        n = int(round(len(idx) * share))
        held += sorted(idx[:n].tolist())
        train += sorted(idx[n:].tolist())
    return train, held


def train_meta_classifier(shadow_dir: Path, records: Sequence[dict], shadow_settings: Any, settings: MetaSettings,
                          shape: Sequence[int], num_classes: int, data_info: dict[str, Any],
                          progress: bool = True) -> tuple[MetaClassifier, dict[str, Any]]:
    """Fit on the training shadows, calibrate on the others; returns the classifier and what it measured."""
    import torch

    from offline.mntd.shadows import load_shadow

    usable = [r for r in records if not r["backdoored"] or (r["attack_success_rate"] or 0) >= settings.min_shadow_asr]
    train_pos, held_pos = split_shadows(usable, settings.calibration_share, settings.meta_seed)
    if not held_pos or sum(usable[i]["backdoored"] for i in train_pos) in (0, len(train_pos)):
        raise ForensicsError(f"{len(usable)} usable shadows are too few to train and calibrate on; train more "
                             f"(--shadows; 100 or more)")
    models = [load_shadow(shadow_dir, r, shadow_settings, tuple(shape), num_classes) for r in usable]
    labels = [int(r["backdoored"]) for r in usable]
    started = time.perf_counter()
    with step_progress(progress, settings.meta_epochs, "meta-classifier", unit="epoch") as bar:
        net = fit_meta([models[i] for i in train_pos], [labels[i] for i in train_pos], settings, shape, num_classes,
                       None if bar is None else (lambda _: bar.update(1)))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        scores = np.array([float(torch.sigmoid(net(m))) for m in models])
    held_scores, held_labels = scores[held_pos], np.array(labels)[held_pos]
    threshold = conformal_threshold(held_scores[held_labels == 0], settings.target_fpr)
    flagged = held_scores > threshold
    measured = {
        "shadows": {"listed": len(records), "used": len(usable), "left_out_weak_attack": len(records) - len(usable),
                    "training": len(train_pos), "calibration": len(held_pos),
                    "calibration_clean": int((held_labels == 0).sum()),
                    "calibration_backdoored": int((held_labels == 1).sum())},
        "training_auroc": auroc(scores[train_pos], np.array(labels)[train_pos]),
        "calibration_auroc": auroc(held_scores, held_labels),
        "calibration_fpr": float(flagged[held_labels == 0].mean()),
        "calibration_tpr": float(flagged[held_labels == 1].mean()),
        "meta_seconds": round(seconds, 1),
    }
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "input_shape": list(shape),
                "num_classes": num_classes, "target_fpr": settings.target_fpr, "settings": asdict(settings),
                "shadow_settings": asdict(shadow_settings), "data": data_info, "measured": measured}
    return MetaClassifier.from_net(net, threshold, manifest), measured
