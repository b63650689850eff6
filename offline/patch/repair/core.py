"""What every repair method shares: its settings, the measures it stops on, fine-tuning, pruning in order."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from offline.attacks import Trigger
from offline.errors import ForensicsError
from offline.models import ForensicModel, is_conv, is_linear
from offline.patch.settings import RepairSettings
from offline.stamp import stamp


@dataclass
class Measure:
    accuracy: float
    reversed_asr: float
    true_asr: float | None = None
    # share of the clean images the model answers as it did before repair (None before a reference is taken)
    agreement: float | None = None
    # 95 % interval of the accuracy change since the reference, paired image by image (normal approximation)
    change_interval: list[float] | None = None
    # share of the clean images the model answered right before repair and answers wrong now
    broken: float | None = None


@dataclass
class RepairReport:
    method: str
    before: Measure
    after: Measure
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def pct(v: float | None) -> str | None:
            return None if v is None else f"{v:.2%}"

        return {
            "accuracy_before": pct(self.before.accuracy), "accuracy_after": pct(self.after.accuracy),
            "accuracy_change": None if self.after.change_interval is None else
            "{:+.1f} points (95 % interval {:+.1f} to {:+.1f}, paired on the same images)".format(
                100 * (self.after.accuracy - self.before.accuracy), *(100 * v for v in self.after.change_interval)),
            "answers_unchanged": pct(self.after.agreement),
            "reversed_asr_before": pct(self.before.reversed_asr), "reversed_asr_after": pct(self.after.reversed_asr),
            "true_asr_before": pct(self.before.true_asr), "true_asr_after": pct(self.after.true_asr),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "before": asdict(self.before), "after": asdict(self.after),
                "summary": self.summary(), **self.details}


@dataclass
class Evaluator:
    """Clean accuracy, agreement with the model before repair, and trigger success rates on a fixed set."""

    x: np.ndarray
    y: np.ndarray
    target: int
    mask: np.ndarray  # reversed trigger (H, W)
    pattern: np.ndarray  # (C, H, W)
    true_trigger: Trigger | None = None

    def __post_init__(self) -> None:
        keep = self.y != self.target
        self._stamped = stamp(self.x[keep], self.mask[None], self.pattern).astype(np.float32)
        self._true = None if self.true_trigger is None else self.true_trigger.apply(self.x[keep])
        self._reference: np.ndarray | None = None

    def remember(self, model: ForensicModel) -> None:
        """Take the model's present answers on the clean images as the reference agreement is measured against."""
        self._reference = model.predict(self.x)

    def __call__(self, model: ForensicModel) -> Measure:
        answers = model.predict(self.x)
        rev = float((model.predict(self._stamped) == self.target).mean())
        true = None if self._true is None else float((model.predict(self._true) == self.target).mean())
        if self._reference is None:
            return Measure(float((answers == self.y).mean()), rev, true)
        paired = (answers == self.y).astype(float) - (self._reference == self.y)
        half = 1.96 * float(paired.std(ddof=1)) / np.sqrt(len(paired)) if len(paired) > 1 else 1.0
        return Measure(float((answers == self.y).mean()), rev, true, float((answers == self._reference).mean()),
                       [float(paired.mean() - half), float(paired.mean() + half)], float((paired < 0).mean()))


def accuracy_loss(baseline: Measure, measure: Measure, s: RepairSettings) -> float:
    """The accuracy the stop rules charge a repair, by ``s.accuracy_rule`` (see :class:`RepairSettings`).

    On unlearning (the tuning models, four seeds at 250, 500 and 1,000 clean
    images) "broken" held the mean held-out drop at or below "change" every
    time, and from 1.08 to 0.78 points on the blend at 500: a few lucky fixes
    among a few hundred selection images had let epochs through that broke
    more on new data.
    """
    if s.accuracy_rule == "broken" and measure.broken is not None:
        return measure.broken
    return baseline.accuracy - measure.accuracy


def make_optimizer(params: list[torch.Tensor], s: RepairSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=s.lr, momentum=0.9) if s.optimizer == "sgd" else torch.optim.Adam(params, lr=s.lr)


def fine_tune(model: ForensicModel, x: np.ndarray, y: np.ndarray, epochs: int, s: RepairSettings,
              stop: Callable[[], bool] | None = None,
              loss_fn: Callable[[ForensicModel, torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor] | None = None,
              ) -> int:
    """Fine-tuning of the whole network; ``stop()`` is asked after every epoch. Returns epochs run.

    ``loss_fn(model, xb, yb, batch_indices)`` replaces the cross-entropy. SGD
    with momentum by default: its steps scale with the gradient, so they are
    large on the stamped images the model still gets wrong and small on clean
    images it already fits, where Adam's normalised steps move every weight by
    about the learning rate from the first step (measured: the true trigger's
    ASR after unlearning above 2 % in 9 of 28 runs with Adam, 0 with SGD, and
    fewer runs losing more than 1.5 points of accuracy).
    """
    rng = np.random.default_rng(s.seed)
    torch.manual_seed(s.seed)
    model.unfreeze()
    opt = make_optimizer([p for p in model.net.parameters() if p.requires_grad], s)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    done = 0
    try:
        for epoch in range(1, epochs + 1):
            done = epoch
            model.train()
            order = rng.permutation(len(xt))
            for i in range(0, len(order), s.batch_size):
                b = order[i:i + s.batch_size]
                loss = F.cross_entropy(model(xt[b]), yt[b]) if loss_fn is None else loss_fn(model, xt[b], yt[b], b)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            if stop is not None and stop():
                break
    finally:
        model.eval()
        model.freeze()
    return done


class EpochKeeper:
    """The stop rule of the repairs that train: asked after every epoch (or round), keeps the epoch to keep.

    Training stops at the first epoch whose reversed-trigger ASR on ``select``
    is below ``asr_bound`` and whose accuracy there is within ``tolerance`` of
    ``baseline``. If no epoch gets there, :meth:`finish` puts back the epoch
    with the lowest reversed-trigger ASR among those within ``accuracy_budget``
    (the most accurate epoch if none is); and if even that one lost more than
    ``give_up_loss`` of accuracy on ``select``, the model as it was before
    training (epoch 0): unlearning from 100 fit images had kept epochs 11-24
    points less accurate on the latent models. Keeping the model before
    training whenever no epoch is within the budget instead left half the
    tuning models' runs at 250 and 500 images unrepaired.
    """

    def __init__(self, model: ForensicModel, select: Evaluator, s: RepairSettings, baseline: Measure,
                 tolerance: float) -> None:
        self.model, self.select, self.s, self.baseline, self.tolerance = model, select, s, baseline, tolerance
        self.curve: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.start = copy.deepcopy(model.state_dict())
        self.reached = False

    def _within(self, measure: Measure, tolerance: float) -> bool:
        return accuracy_loss(self.baseline, measure, self.s) <= tolerance

    def __call__(self) -> bool:
        measure = self.select(self.model)
        self.curve.append({"epoch": len(self.curve) + 1, "accuracy": measure.accuracy,
                           "reversed_asr": measure.reversed_asr, "agreement": measure.agreement,
                           "broken": measure.broken})
        ok = self._within(measure, self.s.accuracy_budget)
        rank = (not ok, measure.reversed_asr if ok else -measure.accuracy)
        if not self.best or rank < self.best["rank"]:
            self.best.update(rank=rank, epoch=len(self.curve), state=copy.deepcopy(self.model.state_dict()))
        self.reached = measure.reversed_asr < self.s.asr_bound and self._within(measure, self.tolerance)
        return self.reached

    def finish(self) -> dict[str, Any]:
        """Put back the epoch to keep; the record of the run for the report."""
        epochs = len(self.curve)
        kept = epochs if self.reached else self.best["epoch"]
        if not self.reached and self.baseline.accuracy - self.curve[kept - 1]["accuracy"] > self.s.give_up_loss:
            kept = 0
            self.model.load_state_dict(self.start)
        elif kept != epochs:
            self.model.load_state_dict(self.best["state"])
        return {"epochs": epochs, "kept_epoch": kept, "reached_bound": self.reached, "curve": self.curve}


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """``mask`` (..., H, W) dilated by ``pixels`` in every direction (a square structuring element)."""
    if pixels <= 0:
        return mask
    shape = mask.shape
    grown = F.max_pool2d(mask.reshape(-1, 1, *shape[-2:]), 2 * pixels + 1, stride=1, padding=pixels)
    return grown.reshape(shape)


def conv_layers(model: ForensicModel) -> list[str]:
    """The model's convolutional layers, in order."""
    return [n for n, m in model.leaf_modules() if is_conv(m)]


def neuron_layers(model: ForensicModel) -> list[str]:
    """The convolutional and linear layers whose output units are neurons: all of them but the output layer."""
    names = [n for n, m in model.leaf_modules() if is_conv(m) or is_linear(m)]
    if len(names) < 2:
        raise ForensicsError("this repair needs a convolutional or linear layer before the output layer, and the "
                             "model has none; use --repair unlearn")
    return names[:-1]


def units_of(model: ForensicModel, layers: list[str], sample: np.ndarray) -> dict[str, int]:
    """How many neurons (channels of a convolution, units of a linear layer) each layer has."""
    _, outputs = model.tapped(torch.from_numpy(sample[:1]), layers)
    return {name: int(out.shape[1]) for name, out in outputs.items()}


def prune_in_order(model: ForensicModel, order: list[tuple[str, int]], sizes: dict[str, int], evaluate: Evaluator,
                   s: RepairSettings, baseline: Measure,
                   go_on: Callable[[int, Measure], bool], skips: int = 0) -> tuple[list[tuple[str, int]], list[dict]]:
    """Silence neurons ``(layer, index)`` in ``order`` while accuracy stays within the budget.

    After each neuron, ``go_on(pruned_so_far, measure)`` says whether to
    prune the next; every layer keeps at least one neuron. A neuron that would
    take accuracy past the budget is put back and pruning stops, or, with
    ``skips``, goes on with the next neuron until that many in a row were put
    back. Networks of more than 200 neurons are pruned a hundredth of them at
    a time.
    """
    keep = {layer: torch.ones(n) for layer, n in sizes.items()}

    def apply(layers: set[str]) -> None:
        for layer in layers:
            model.set_output_mask(layer, keep[layer])

    step = max(1, len(order) // 100) if len(order) > 200 else 1
    curve = [{"pruned": 0, "accuracy": baseline.accuracy, "reversed_asr": baseline.reversed_asr}]
    pruned: list[tuple[str, int]] = []
    units = iter(order)
    put_back = 0
    while True:
        batch = []
        for layer, unit in units:
            if keep[layer].sum() > 1:  # every layer keeps a neuron
                keep[layer][unit] = 0.0
                batch.append((layer, unit))
                if len(batch) == step:
                    break
        if not batch:
            break
        touched = {layer for layer, _ in batch}
        apply(touched)
        m = evaluate(model)
        if accuracy_loss(baseline, m, s) > s.accuracy_budget:
            for layer, unit in batch:  # one step too many: undo it
                keep[layer][unit] = 1.0
            apply(touched)
            put_back += 1
            if put_back > skips:
                break
            continue
        put_back = 0
        pruned.extend(batch)
        curve.append({"pruned": len(pruned), "accuracy": m.accuracy, "reversed_asr": m.reversed_asr})
        if not go_on(len(pruned), m):
            break
    for layer, mask in keep.items():  # a layer nothing was pruned in keeps no mask
        if bool(mask.all()):
            model.set_output_mask(layer, None)
    return pruned, curve
