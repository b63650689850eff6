"""The repairs that came first: unlearning (Neural Cleanse), neuron pruning, fine-pruning (Liu et al. 2018).

- ``prune``: rank the features-layer neurons by how much more the reversed
  trigger activates them than clean inputs do; silence them in that order until
  the reversed trigger's success rate falls below ``asr_bound`` or clean
  accuracy would drop by more than ``accuracy_budget``.
- ``unlearn``: fine-tune on a slice of the clean data (each image shifted by up
  to two pixels, the unstamped ones fitted to the model's own answers before
  repair) in which a share is
  stamped with the reversed trigger and keeps its true label, epoch by epoch
  until the reversed trigger's success rate falls below ``asr_bound`` with
  clean accuracy back within ``unlearn_accuracy_tolerance`` of where it was;
  half the stamped images get the reversed mask grown by ``unlearn_grow`` pixels,
  because Neural Cleanse recovers the smallest mask that works, often a part of
  the true trigger, and the rest of the true trigger must be unlearned too.
- ``fine-prune``: silence the last convolutional layer's channels that stay
  dormant on clean data (most dormant first, within the accuracy budget), then
  fine-tune on clean data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from offline.errors import ForensicsError
from offline.models import ForensicModel
from offline.patch.repair.core import (
    EpochKeeper,
    Evaluator,
    Measure,
    RepairSettings,
    conv_layers,
    fine_tune,
    grow_mask,
    prune_in_order,
)
from offline.stamp import stamp


@torch.no_grad()
def _mean_features(model: ForensicModel, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    xt = torch.from_numpy(x)
    return torch.cat([model.features(xt[i:i + batch_size]) for i in range(0, len(xt), batch_size)]).mean(0).numpy()


def shift(x: torch.Tensor, dy: np.ndarray, dx: np.ndarray, pixels: int) -> torch.Tensor:
    """Image i moved by ``dy[i] - pixels`` rows and ``dx[i] - pixels`` columns (zero fill)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(len(x))])


@torch.no_grad()
def _own_answers(model: ForensicModel, x: torch.Tensor, pixels: int) -> torch.Tensor:
    """The model's softmax on every image at every shift: (shift dy * (2 * pixels + 1) + dx, image, class)."""
    model.eval()
    side = 2 * pixels + 1
    out = []
    for dy in range(side):
        for dx in range(side):
            moved = shift(x, np.full(len(x), dy), np.full(len(x), dx), pixels)
            out.append(torch.cat([F.softmax(model(moved[i:i + 512]), 1) for i in range(0, len(x), 512)]))
    return torch.stack(out)


def trigger_neuron_ranking(model: ForensicModel, x: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Features-layer units ordered by (stamped - clean) mean activation, most excited first."""
    diff = _mean_features(model, stamp(x, mask[None], pattern).astype(np.float32)) - _mean_features(model, x)
    return np.argsort(-diff, kind="stable")


def unlearn(model: ForensicModel, x: np.ndarray, y: np.ndarray, select: Evaluator,
            s: RepairSettings, baseline: Measure) -> dict[str, Any]:
    """Fine-tune on a clean slice, a share of it stamped with the reversed trigger but kept at its label.

    Every image is first moved by up to ``unlearn_shift`` pixels. Half the
    stamped images get the reversed mask grown by ``unlearn_grow`` pixels (the
    pattern is the reversed one there too). The unstamped images are fitted to
    the model's own softmax before repair on that shifted image (computed once,
    for every shift) unless ``unlearn_clean_targets`` is "labels". Stops by
    :class:`~offline.patch.repair.core.EpochKeeper` with ``unlearn_accuracy_tolerance``.
    """
    rng = np.random.default_rng(s.seed)
    n = max(s.batch_size, int(round(len(x) * s.unlearn_fraction)))
    idx = rng.choice(len(x), size=min(n, len(x)), replace=False)
    m, p = torch.from_numpy(select.mask[None]), torch.from_numpy(select.pattern)
    grown = grow_mask(m, s.unlearn_grow)

    pixels = s.unlearn_shift
    xs = torch.from_numpy(x[idx])
    own = _own_answers(model, xs, pixels) if s.unlearn_clean_targets == "original" else None
    rng = np.random.default_rng(s.seed + 1)

    def loss(net: ForensicModel, xb: torch.Tensor, yb: torch.Tensor, b: np.ndarray) -> torch.Tensor:
        """Stamped images: cross-entropy with the true label; clean ones: with the label, or with the
        model's own answer before repair (``unlearn_clean_targets``)."""
        dy, dx = rng.integers(0, 2 * pixels + 1, size=(2, len(xb)))
        if pixels:
            xb = shift(xb, dy, dx, pixels)
        draw = torch.from_numpy(rng.random(len(xb)))[:, None, None, None]
        stamped = torch.where(draw < s.unlearn_stamp_share / 2, stamp(xb, m, p), stamp(xb, grown, p))
        xb = torch.where(draw < s.unlearn_stamp_share, stamped, xb)
        logits = net(xb)
        labels = F.cross_entropy(logits, yb, reduction="none")
        if own is None:
            return labels.mean()
        answers = own[torch.from_numpy(dy * (2 * pixels + 1) + dx), torch.from_numpy(b)]
        return torch.where(draw.flatten() < s.unlearn_stamp_share, labels,
                           -(answers * F.log_softmax(logits, 1)).sum(1)).mean()

    keeper = EpochKeeper(model, select, s, baseline, s.unlearn_accuracy_tolerance)
    fine_tune(model, x[idx], y[idx], s.unlearn_epochs, s, stop=keeper, loss_fn=loss)
    return {"images": int(len(idx)), "stamped_share": s.unlearn_stamp_share, "grown_by": s.unlearn_grow,
            **keeper.finish()}


def prune(model: ForensicModel, x_rank: np.ndarray, evaluate: Evaluator, s: RepairSettings,
          baseline: Measure) -> dict[str, Any]:
    """Silence features-layer units most excited by the reversed trigger, within the accuracy budget."""
    layer = model.features_layer
    order = trigger_neuron_ranking(model, x_rank, evaluate.mask, evaluate.pattern)
    pruned, curve = prune_in_order(model, [(layer, int(u)) for u in order], {layer: len(order)}, evaluate, s,
                                   baseline, lambda _n, m: m.reversed_asr >= s.asr_bound)
    return {"layer": layer, "pruned_units": [u for _, u in pruned], "units": len(order), "curve": curve}


def last_conv_layer(model: ForensicModel) -> str:
    names = conv_layers(model)
    if not names:
        raise ForensicsError("fine-pruning needs a convolutional layer, and this model has none; "
                             "use --repair unlearn or prune")
    return names[-1]


def fine_prune(model: ForensicModel, x: np.ndarray, y: np.ndarray, evaluate: Evaluator, s: RepairSettings,
               baseline: Measure) -> dict[str, Any]:
    """Prune dormant channels of the last conv layer (accuracy budget), then fine-tune on clean data."""
    layer = last_conv_layer(model)
    model.eval()
    out = model.layer_output(layer, torch.from_numpy(x[:1024]))
    activation = out.clamp_min(0).mean(dim=(0, 2, 3)).numpy()
    order = np.argsort(activation, kind="stable")  # most dormant first
    pruned, curve = prune_in_order(model, [(layer, int(c)) for c in order], {layer: len(order)}, evaluate, s,
                                   baseline, lambda _n, _m: True)
    fine_tune(model, x, y, s.fine_tune_epochs, s)
    return {"layer": layer, "pruned_channels": [c for _, c in pruned], "channels": len(order), "curve": curve,
            "fine_tune_epochs": s.fine_tune_epochs}
