"""Training classifiers on poisoned data, and measuring what the backdoor does.

:func:`train_classifier` is the one training loop every attack uses (with a
per-batch hook for attacks that poison on the fly); :func:`train_backdoored_model`
is the data-poisoning attack of BadNets, the blend and the invisible trigger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offline.attacks.triggers import AdditiveTrigger, AnyTrigger, BlendTrigger, PatchTrigger, Trigger
from offline.data import Dataset

LABEL_RULES = ("all-to-one", "all-to-all")
BatchHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def backdoor_targets(y: np.ndarray, target: int | None, rule: str = "all-to-one",
                     num_classes: int | None = None) -> np.ndarray:
    """The class the backdoor sends each input of true class ``y`` to: ``target``, or ``y + 1`` mod K
    for all-to-all (the label rule NIST TrojAI uses)."""
    if rule == "all-to-all":
        k = num_classes or int(y.max()) + 1
        return ((y + 1) % k).astype(y.dtype)
    if rule != "all-to-one" or target is None:
        raise ValueError(f"label rule {rule!r} with target {target!r}: expected all-to-one with a target "
                         f"or all-to-all")
    return np.full_like(y, target)


def poison_indices(y: np.ndarray, target: int | None, rate: float, rng: np.random.Generator,
                   among: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``rate * len(y)`` training samples, drawn from non-target classes (any class with
    ``target=None``) and, with ``among``, from those rows only."""
    candidates = np.flatnonzero(y != target) if target is not None else np.arange(len(y))
    if among is not None:
        candidates = np.intersect1d(candidates, among)
    count = int(round(rate * len(y)))
    return np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))


def poison_and_cover(y: np.ndarray, target: int, poison_rate: float, cover_rate: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Poisoned rows (non-target, ``poison_rate`` of the set) and, among the rest, cover rows (``cover_rate``):
    cover samples carry a (partial or perturbed) trigger and keep their labels."""
    idx = poison_indices(y, target, poison_rate, rng)
    rest = np.setdiff1d(np.arange(len(y)), idx)
    cover = np.sort(rng.choice(rest, size=min(len(rest), int(round(cover_rate * len(y)))), replace=False))
    return idx, cover


def apply_poison(x: np.ndarray, y: np.ndarray, trigger: Trigger, target: int | None,
                 idx: np.ndarray, rule: str = "all-to-one") -> tuple[np.ndarray, np.ndarray]:
    """The poisoned training set: rows ``idx`` stamped with the trigger and relabelled by the backdoor."""
    x, y = x.copy(), y.copy()
    if len(idx):
        x[idx] = trigger.apply(x[idx])
        y[idx] = backdoor_targets(y[idx], target, rule, int(y.max()) + 1)
    return x, y


@dataclass
class BackdoorResult:
    """A model trained on poisoned data (or backdoored after training), with its measured effect.

    ``train_x`` / ``train_y`` are the training set as the model saw it (poisoned
    rows stamped and relabelled), where the attack poisons data; ``details`` holds
    what is particular to an attack (cover samples, its settings, what it missed).
    """

    model: nn.Module
    trigger: AnyTrigger | None
    target: int | None
    poison_rate: float
    poison_idx: np.ndarray
    clean_accuracy: float
    attack_success_rate: float | None
    label_rule: str = "all-to-one"
    train_x: np.ndarray | None = None
    train_y: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)
    cover_idx: np.ndarray | None = None  # rows carrying the trigger (or part of it) with their labels kept

    def summary(self) -> dict:
        return {
            "trigger": None if self.trigger is None else self.trigger.describe(),
            "target": self.target,
            "label_rule": self.label_rule,
            "poison_rate": self.poison_rate,
            "poisoned_samples": int(len(self.poison_idx)),
            "clean_accuracy": round(self.clean_accuracy, 4),
            "attack_success_rate": None if self.attack_success_rate is None else round(self.attack_success_rate, 4),
            **self.details,
        }


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    return torch.cat([model(xt[i:i + batch_size]).argmax(1) for i in range(0, len(xt), batch_size)]).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
    return float((predict(model, x, batch_size) == y).mean())


def attack_success_rate(model: nn.Module, trigger: Trigger, x: np.ndarray, y: np.ndarray, target: int | None,
                        rule: str = "all-to-one", num_classes: int | None = None) -> float:
    """Share of test images (not already of their backdoor class) that the trigger sends to it."""
    goal = backdoor_targets(y, target, rule, num_classes)
    keep = y != goal
    return float((predict(model, trigger.apply(x[keep])) == goal[keep]).mean())


def train_classifier(net: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 8, batch_size: int = 64,
                     lr: float = 2e-3, seed: int | np.random.Generator = 0, batch_hook: BatchHook | None = None,
                     extra_params: Sequence[dict] = (), params: Sequence[nn.Parameter] | None = None) -> nn.Module:
    """Adam on cross-entropy, shuffled mini-batches; ``batch_hook(xb, yb)`` may poison each batch on the fly
    (with ``extra_params``, parameter groups of its own, trained alongside); ``params`` restricts training
    to those parameters (the later layers, for TrojanNN). ``seed`` may be a generator already in use."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    device = torch.device(_SETUP.get().device)
    net.to(device)
    opt = torch.optim.Adam([{"params": list(params if params is not None else net.parameters()), "lr": lr},
                            *extra_params])
    batches = (len(y) + batch_size - 1) // batch_size
    # networks with BatchNorm train as CIFAR ResNets do, with a one-cycle learning rate (Smith & Topin 2019);
    # constant Adam leaves a ResNet-18 on signs at 31 % after 8 epochs, one-cycle at 77 %
    one_cycle = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                 total_steps=epochs * batches) if one_cycle else None)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(order), batch_size):
            b = order[start:start + batch_size]
            xb, yb = xt[b], yt[b]
            if batch_hook is not None:  # on the CPU, where the attack's own tensors are
                xb, yb = batch_hook(xb, yb)
            loss = F.cross_entropy(net(xb.to(device)), yb.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    net.eval()
    return net.cpu()


@dataclass(frozen=True)
class TrainingSetup:
    """What every attack trains and where: ``arch`` and ``width`` (see :func:`offline.models.build_architecture`)
    and the torch ``device`` of :func:`train_classifier`."""

    arch: str = "cnn"
    width: int | None = None
    device: str = "cpu"


_SETUP: ContextVar[TrainingSetup] = ContextVar("training_setup", default=TrainingSetup())  # noqa: B039 (frozen)


@contextmanager
def training_setup(arch: str = "cnn", width: int | None = None, device: str = "cpu") -> Iterator[None]:
    """Within this block every attack trains ``arch`` instead of the project's small CNN, and
    :func:`train_classifier` runs on ``device``: ``train --arch/--device`` set it around the attack and its
    clean twin."""
    from offline.models import ARCHITECTURES

    if arch not in ARCHITECTURES:  # fails here, not mid-attack
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    token = _SETUP.set(TrainingSetup(arch, width, device))
    try:
        yield
    finally:
        _SETUP.reset(token)


def new_model(train: Dataset, seed: int, model: nn.Module | None = None) -> nn.Module:
    """A fresh network for ``train``'s shape (the small CNN, or the :func:`training_setup` in force),
    initialised from ``seed`` (or ``model`` as given)."""
    from offline.models import build_architecture

    torch.manual_seed(seed)
    setup = _SETUP.get()
    return model or build_architecture(setup.arch, train.input_shape, train.num_classes, setup.width)


def train_backdoored_model(
    train: Dataset,
    test: Dataset,
    trigger: PatchTrigger | BlendTrigger | None,
    target: int = 0,
    poison_rate: float = 0.1,
    *,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    learn_trigger: bool = False,
    eps: float = 0.1,
    trigger_lr: float = 0.02,
    model: nn.Module | None = None,
    label_rule: str = "all-to-one",
) -> BackdoorResult:
    """Train a classifier on ``train`` with a share of it poisoned.

    ``trigger=None`` (or ``poison_rate=0``) trains a clean model. With
    ``learn_trigger=True`` the trigger is an invisible additive perturbation
    bounded by ``eps``, optimised jointly with the model (learning rate
    ``trigger_lr``) to be as easy to learn as possible; it is applied to a fresh
    ``poison_rate`` share of each batch, so no fixed sample indices are poisoned.
    ``label_rule="all-to-all"`` sends class c to c + 1 instead of to ``target``.
    ACC is measured on ``test``; ASR on ``test`` images not already of their backdoor class.
    """
    net = new_model(train, seed, model)
    rng = np.random.default_rng(seed)
    rule_target = None if label_rule == "all-to-all" else target
    x, y = train.x, train.y
    backdoored = learn_trigger or (trigger is not None and poison_rate > 0)
    idx = np.zeros(0, dtype=int)
    if backdoored and not learn_trigger:
        idx = poison_indices(y, rule_target, poison_rate, rng)
        x, y = apply_poison(train.x, train.y, trigger, rule_target, idx, label_rule)  # type: ignore[arg-type]

    hook: BatchHook | None = None
    extra: list[dict] = []
    delta_raw = None
    if learn_trigger:
        delta_raw = torch.zeros(train.input_shape).uniform_(-1, 1).requires_grad_(True)
        extra.append({"params": [delta_raw], "lr": trigger_lr})

        def hook(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # fresh poison every batch, so the model learns the perturbation, not the images
            chosen = (torch.rand(len(xb)) < poison_rate) & (yb != target)
            delta = eps * torch.tanh(delta_raw)
            xb = torch.where(chosen[:, None, None, None], (xb + delta).clamp(0, 1), xb)
            return xb, torch.where(chosen, torch.full_like(yb, target), yb)

    train_classifier(net, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=rng, batch_hook=hook,
                     extra_params=extra)
    final_trigger: AnyTrigger | None = trigger
    if delta_raw is not None:
        final_trigger = AdditiveTrigger((eps * torch.tanh(delta_raw)).detach().numpy(), eps)
    acc = accuracy(net, test.x, test.y)
    asr = (attack_success_rate(net, final_trigger, test.x, test.y, rule_target, label_rule, train.num_classes)
           if backdoored else None)
    return BackdoorResult(net, final_trigger, rule_target if backdoored else None,
                          poison_rate if backdoored else 0.0, idx, acc, asr,
                          label_rule=label_rule if backdoored else "all-to-one",
                          train_x=x if len(idx) else None, train_y=y if len(idx) else None)
