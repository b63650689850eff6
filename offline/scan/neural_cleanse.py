"""Neural Cleanse (Wang et al., IEEE S&P 2019): trigger reverse-engineering and outlier detection.

For every candidate target class, find the smallest mask + pattern that sends
clean inputs to that class; a backdoored class needs a much smaller trigger than
the others. The defaults follow the authors' implementation
(``bolunwang/backdoor``, ``visualizer.py``):

- a 2-D mask shared across channels; mask and pattern parametrised through
  ``tanh(.) / (2 - eps) + 0.5``, randomly initialised;
- Adam (lr 0.1, betas 0.5/0.9); loss = cross-entropy + cost * L1(mask);
- the cost starts at 0 and is set to 1e-3 once the attack succeeds (>= 99 %)
  for ``patience`` (5) steps in a row; then it is multiplied by 2 after 5 steps
  of success and divided by 2**1.5 after 5 steps of failure;
- early stop after 25 steps without improvement of the best mask norm, once the
  cost has been moved both up and down;
- a step is ~1000 clean images in mini-batches of 32; the best mask is the one
  with the smallest average L1 norm among steps whose attack succeeded.

All classes are optimised together: their masks and patterns are stacked into
one tensor and each mini-batch is stamped with every active class's trigger and
pushed through the model in one forward pass (classes x batch). Adam works
element-wise and the losses of different classes touch disjoint parameters, so
this computes exactly what one optimisation per class would, in fewer, larger
forward passes.

``method="tabor"`` (Guo et al., "TABOR", 2019) adds the regularisers listed in
``TABOR_TERMS`` to each class's loss (elastic net on the mask, the pattern
outside the mask, smoothness of mask and trigger, blocking and overlay terms),
so that scattered, overly large or object-covering false triggers cost more on
clean classes. The cost schedule, best-mask rule and MAD outlier test stay
those of Neural Cleanse. Each scan also reports every class's trigger quality:
the six terms measured on held-out images at the best trigger, for either
method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offline.scan.settings import (
    TABOR_TERMS,
    NeuralCleanseConfig,
    check_scale,
)
from offline.stamp import stamp

# what the adaptive schedule did with each class after the warm-up
ROLES = ("candidate", "reference", "set aside", "converged")
TANH_EPS = 1e-7  # the epsilon of the original's tanh parametrisation (Keras' K.epsilon())
MAD_CONSISTENCY = 1.4826


@dataclass
class _CostSchedule:
    """The original's per-class bookkeeping of the L1 cost, best mask and early stop."""

    config: NeuralCleanseConfig
    cost: float = 0.0
    reg_best: float = float("inf")
    set_counter: int = 0
    up_counter: int = 0
    down_counter: int = 0
    up_flag: bool = False
    down_flag: bool = False
    early_stop_counter: int = 0
    early_stop_reg_best: float = float("inf")

    def update(self, acc: float, reg: float) -> tuple[bool, bool]:
        """Record one step's average accuracy and mask norm; return (is_best, stop)."""
        c = self.config
        succeeded = acc >= c.attack_success_threshold
        is_best = succeeded and reg < self.reg_best
        if is_best:
            self.reg_best = reg
        stop = False
        if c.early_stop:
            if self.reg_best < float("inf"):
                if self.reg_best >= c.early_stop_threshold * self.early_stop_reg_best:
                    self.early_stop_counter += 1
                else:
                    self.early_stop_counter = 0
            self.early_stop_reg_best = min(self.reg_best, self.early_stop_reg_best)
            stop = self.down_flag and self.up_flag and self.early_stop_counter >= c.early_stop_patience
        if stop:
            return is_best, True
        if self.cost == 0 and succeeded:
            self.set_counter += 1
            if self.set_counter >= c.patience:
                self.cost = c.init_cost
                self.up_counter = self.down_counter = 0
                self.up_flag = self.down_flag = False
        else:
            self.set_counter = 0
        if succeeded:
            self.up_counter += 1
            self.down_counter = 0
        else:
            self.up_counter = 0
            self.down_counter += 1
        if self.up_counter >= c.patience:
            self.up_counter = 0
            self.cost *= c.cost_multiplier
            self.up_flag = True
        elif self.down_counter >= c.patience:
            self.down_counter = 0
            self.cost /= c.cost_multiplier ** 1.5
            self.down_flag = True
        return is_best, False


@dataclass
class ReversedTriggers:
    """Best mask and pattern found for each target class."""

    targets: list[int]
    masks: np.ndarray  # (K, H, W) in [0, 1]
    patterns: np.ndarray  # (K, C, H, W) in [0, 1]
    norms: np.ndarray  # (K,) L1 norm of the float mask
    reached: np.ndarray  # (K,) whether the attack reached the success threshold at all
    steps: np.ndarray  # (K,) steps run before early stop
    fit_accuracy: np.ndarray  # (K,) attack success during optimisation at the best step
    seconds: float = 0.0
    # the norms the verdict compares: a class the schedule set aside after the warm-up counts with its mask
    # norm times the shrink its reference classes went through from then on (the norms otherwise)
    verdict_norms: np.ndarray | None = None
    roles: list[str] | None = None  # ROLES, per class, for the adaptive schedule
    shrink: float = 1.0  # the reference classes' median shrink applied to the classes set aside

    def __post_init__(self) -> None:
        if self.verdict_norms is None:
            self.verdict_norms = self.norms

    def for_class(self, target: int) -> tuple[np.ndarray, np.ndarray]:
        k = self.targets.index(target)
        return self.masks[k], self.patterns[k]


def _smoothness(t: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences between neighbouring pixels, per item of a (K, C, H, W) batch."""
    return ((t[..., 1:, :] - t[..., :-1, :]) ** 2).sum(dim=(1, 2, 3)) + \
        ((t[..., :, 1:] - t[..., :, :-1]) ** 2).sum(dim=(1, 2, 3))


def tabor_terms(model: nn.Module, xb: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
                targets: torch.Tensor, need: tuple[float, ...] | None = None) -> torch.Tensor:
    """TABOR's six regularisers for each class's trigger: a (K, 6) tensor in ``TABOR_TERMS`` order.

    ``mask`` (K, 1, H, W), ``pattern`` (K, C, H, W), ``xb`` a clean batch (B, C, H, W).
    Terms whose weight in ``need`` is 0 are not computed (left at 0): the
    blocking term costs a second forward pass of K x B images.
    """
    k = len(mask)
    outside = (1 - mask) * pattern
    visible = mask * pattern
    zero = torch.zeros(k, device=mask.device)
    terms = [
        (mask ** 2).sum(dim=(1, 2, 3)),
        outside.abs().sum(dim=(1, 2, 3)) + (outside ** 2).sum(dim=(1, 2, 3)),
        _smoothness(mask),
        _smoothness(visible),
    ]
    if need is None or need[TABOR_TERMS.index("blocking")] > 0:
        with torch.no_grad():
            clean_pred = model(xb).argmax(1)
        b = len(xb)
        blocked = (xb[None] * (1 - mask[:, None])).reshape(k * b, *xb.shape[1:])
        terms.append(F.cross_entropy(model(blocked), clean_pred.repeat(k), reduction="none").reshape(k, b).mean(1))
    else:
        terms.append(zero)
    overlay = need is None or need[TABOR_TERMS.index("overlay")] > 0
    terms.append(F.cross_entropy(model(visible), targets, reduction="none") if overlay else zero)
    return torch.stack(terms, dim=1)


class _ClassSchedule:
    """Spend the optimisation where a backdoor can be: after a joint warm-up, only classes that may be outliers.

    Every class runs ``warmup_steps`` steps. The MAD anomaly index over the best norms found so far then
    splits them: classes above ``candidate_index`` (below the verdict's threshold, so a class on its way to
    it is kept) go on until their own early stop or ``candidate_steps`` in all (by then a mask is within a
    few per cent of where the original's patience would leave it; trigger recovery refines the flagged
    class further); the most anomalous of the others goes on as the reference;
    the rest are set aside with the norm they had. Mask norms still shrink after the warm-up (3-12 % for
    clean classes on the zoo at step 15), so comparing a candidate's converged norm with norms frozen at
    the warm-up would inflate its index; instead a set-aside class counts with its norm times the shrink its
    reference has gone through since (the median over references). At every later step the index is
    recomputed that way and a candidate that falls back to ``candidate_index`` or below stops; once no
    candidate is left, the references stop too. A scan where no class is a candidate ends at the warm-up.
    """

    def __init__(self, config: NeuralCleanseConfig, k: int, references: int = 1) -> None:
        self.config = config
        self.references = references
        self.roles = ["candidate"] * k
        self.at_warmup: np.ndarray | None = None
        self.refs: list[int] = []

    def shrink(self, norms: np.ndarray) -> float:
        if not self.refs or self.at_warmup is None:
            return 1.0
        return float(min(1.0, np.median(norms[self.refs] / self.at_warmup[self.refs])))

    def verdict_norms(self, norms: np.ndarray) -> np.ndarray:
        if self.at_warmup is None:
            return norms
        aside = np.array([r == "set aside" for r in self.roles])
        return np.where(aside, self.at_warmup * self.shrink(norms), norms)

    def after_step(self, step: int, norms: np.ndarray, active: np.ndarray) -> None:
        """Update ``active`` in place after ``step`` steps; ``norms`` are the best masks' norms so far."""
        c = self.config
        if step < c.warmup_steps:
            return
        if step == c.warmup_steps:
            self.at_warmup = norms.copy()
            ai = anomaly_index(norms, c.anomaly_scale)
            for i in range(len(norms)):
                self.roles[i] = "converged" if not active[i] else (
                    "candidate" if ai[i] > c.candidate_index else "set aside")
            others = [i for i in np.argsort(-ai) if self.roles[i] == "set aside"]
            self.refs = [int(i) for i in others[:self.references]]
            for i in self.refs:
                self.roles[i] = "reference"
            for i, role in enumerate(self.roles):
                if role == "set aside":
                    active[i] = False
        else:
            ai = anomaly_index(self.verdict_norms(norms), c.anomaly_scale)
            for i, role in enumerate(self.roles):
                if role == "candidate" and active[i] and ai[i] <= c.candidate_index:
                    active[i] = False
        if step >= c.candidate_steps or not any(active[i] for i, r in enumerate(self.roles) if r == "candidate"):
            active[:] = False


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` runs: a :class:`ForensicModel`'s device, or its first parameter's."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def _to_tanh(v: torch.Tensor) -> torch.Tensor:
    return torch.atanh(((v - 0.5) * (2 - TANH_EPS)).clamp(-1 + 1e-6, 1 - 1e-6))


def _from_tanh(t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(t) / (2 - TANH_EPS) + 0.5


def reverse_engineer_triggers(
    model: nn.Module,
    x: np.ndarray,
    targets: list[int],
    config: NeuralCleanseConfig | None = None,
    *,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> ReversedTriggers:
    """Reverse-engineer a minimal trigger for each class in ``targets``, all at once.

    Parameters
    ----------
    model:
        Returns logits for a (N, C, H, W) float batch.
    x:
        Clean images (N, C, H, W) in [0, 1]; mini-batches are drawn from them.
    targets:
        Class indices to reverse-engineer (all classes for a scan).
    config:
        Optimisation settings; :class:`NeuralCleanseConfig` defaults if None.
    init:
        Optional (masks (K, H, W), patterns (K, C, H, W)) to start from instead
        of the random initialisation (used by trigger recovery).
    progress:
        Called after each step with (step, active classes, total classes).
    """
    c = config or NeuralCleanseConfig()
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    k = len(targets)
    channels, height, width = x.shape[1:]
    if init is None:
        mask0 = torch.rand(k, 1, height, width, generator=gen)
        pattern0 = torch.rand(k, channels, height, width, generator=gen)
    else:
        mask0 = torch.as_tensor(init[0], dtype=torch.float32).reshape(k, 1, height, width)
        pattern0 = torch.as_tensor(init[1], dtype=torch.float32).reshape(k, channels, height, width)
    device = model_device(model)  # everything the optimisation touches lives where the model runs
    mask_tanh = _to_tanh(mask0).to(device).requires_grad_(True)
    pattern_tanh = _to_tanh(pattern0).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_tanh, pattern_tanh], lr=c.lr, betas=(c.beta1, c.beta2))

    schedules = [_CostSchedule(c) for _ in range(k)]
    best_masks = _from_tanh(mask_tanh).detach().clone()
    best_patterns = _from_tanh(pattern_tanh).detach().clone()
    reached = np.zeros(k, bool)
    steps = np.zeros(k, int)
    fit_acc = np.zeros(k)
    active = np.ones(k, bool)
    # the adaptive schedule compares classes, so it applies to a scan over several; recovery refines one
    schedule = _ClassSchedule(c, k) if c.schedule == "adaptive" and init is None and k > 2 else None
    target_t = torch.as_tensor(targets, device=device)
    tabor = torch.tensor(c.tabor_weights, device=device) if c.method == "tabor" else None
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    order = rng.permutation(len(xt))
    cursor = 0
    model.eval()

    for step in range(c.max_steps):
        rows = torch.from_numpy(np.flatnonzero(active)).to(device)
        a = len(rows)
        acc_sum = torch.zeros(a, device=device)
        reg_sum = torch.zeros(a, device=device)
        # the warm-up of many classes: smaller mini-batches (as many Adam steps, fewer images each), so that a
        # step over K classes costs what one over warmup_classes costs
        batch = c.batch_size
        if schedule is not None and step < c.warmup_steps and k > c.warmup_classes:
            batch = max(4, c.batch_size * c.warmup_classes // k)
        for _ in range(c.mini_batches):
            if cursor + batch > len(order):
                order, cursor = rng.permutation(len(xt)), 0
            xb = xt[torch.from_numpy(order[cursor:cursor + batch]).to(device)]
            cursor += batch
            b = len(xb)
            mask = _from_tanh(mask_tanh[rows])  # (A, 1, H, W)
            pattern = _from_tanh(pattern_tanh[rows])  # (A, C, H, W)
            stamped = stamp(xb[None], mask[:, None], pattern[:, None])  # (A, B, C, H, W)
            logits = model(stamped.reshape(a * b, channels, height, width))
            tgt = target_t[rows].repeat_interleave(b)
            ce = F.cross_entropy(logits, tgt, reduction="none").reshape(a, b).mean(1)
            reg = mask.sum(dim=(1, 2, 3))
            cost = torch.tensor([schedules[i].cost for i in rows.tolist()], device=device)
            loss = (ce + cost * reg).sum()
            if tabor is not None:
                loss = loss + (tabor_terms(model, xb, mask, pattern, target_t[rows], c.tabor_weights) @ tabor).sum()
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            with torch.no_grad():
                acc_sum += (logits.argmax(1) == tgt).float().reshape(a, b).mean(1)
                reg_sum += reg.detach()
        avg_acc = (acc_sum / c.mini_batches).cpu().numpy()
        avg_reg = (reg_sum / c.mini_batches).cpu().numpy()
        with torch.no_grad():
            current_masks = _from_tanh(mask_tanh[rows])
            current_patterns = _from_tanh(pattern_tanh[rows])
        for j, i in enumerate(rows.tolist()):
            is_best, stop = schedules[i].update(float(avg_acc[j]), float(avg_reg[j]))
            steps[i] = step + 1
            if is_best:
                best_masks[i] = current_masks[j]
                best_patterns[i] = current_patterns[j]
                reached[i] = True
                fit_acc[i] = avg_acc[j]
            if stop:
                active[i] = False
        if schedule is not None:
            schedule.after_step(step + 1, best_masks.sum(dim=(1, 2, 3)).cpu().numpy(), active)
        if progress is not None:
            progress(step + 1, int(active.sum()), k)
        if not active.any():
            break

    masks = best_masks[:, 0].cpu().numpy()
    norms = masks.reshape(k, -1).sum(1)
    return ReversedTriggers(
        targets=list(targets),
        masks=masks,
        patterns=best_patterns.cpu().numpy(),
        norms=norms,
        reached=reached,
        steps=steps,
        fit_accuracy=fit_acc,
        seconds=time.perf_counter() - started,
        verdict_norms=None if schedule is None else schedule.verdict_norms(norms),
        roles=None if schedule is None else schedule.roles,
        shrink=1.0 if schedule is None else schedule.shrink(norms),
    )


def anomaly_index(norms: np.ndarray, scale: str = "log") -> np.ndarray:
    """MAD anomaly index of each norm on the small side: ``(median - norm) / (1.4826 * MAD)``.

    Positive for norms below the median; a class is an outlier when its index
    exceeds the threshold (2 by default). Classes above the median get a
    negative index and are never flagged. With ``scale="log"`` (the default)
    the index is taken over the logarithms of the norms: mask sizes are
    scale quantities whose spread grows with their size (clean classes' masks
    range 55-170 on the zoo), so on the linear scale a few large honest masks
    inflate the MAD and a 4x4 patch's mask (L1 16) sits at index 1.8-2.4; on
    the log scale its index is 3.6-5.1 while clean models stay below 1.8.
    ``scale="linear"`` is the original Neural Cleanse index.
    """
    check_scale(scale)
    norms = np.asarray(norms, dtype=np.float64)
    if scale == "log":
        norms = np.log(np.maximum(norms, 1e-12))
    median = np.median(norms)
    mad = MAD_CONSISTENCY * np.median(np.abs(norms - median))
    if mad == 0:
        return np.zeros_like(norms)
    return (median - norms) / mad


@torch.no_grad()
def trigger_success_rate(model: nn.Module, x: np.ndarray, y: np.ndarray, mask: np.ndarray,
                         pattern: np.ndarray, target: int, batch_size: int = 1024) -> float:
    """Share of images not of ``target`` that the stamped trigger sends to ``target``."""
    keep = y != target
    if not keep.any():
        return float("nan")
    xt = torch.from_numpy(np.ascontiguousarray(x[keep], dtype=np.float32))
    m = torch.from_numpy(mask).reshape(1, 1, *mask.shape[-2:])
    p = torch.from_numpy(pattern)
    hits = 0
    for i in range(0, len(xt), batch_size):
        hits += int((model(stamp(xt[i:i + batch_size], m, p)).argmax(1) == target).sum())
    return hits / int(keep.sum())


@torch.no_grad()
def trigger_quality(model: nn.Module, x: np.ndarray, triggers: ReversedTriggers, images: int = 256) -> np.ndarray:
    """TABOR's six terms (``TABOR_TERMS``) for each reversed trigger, on up to ``images`` clean images."""
    k = len(triggers.targets)
    xb = torch.from_numpy(np.ascontiguousarray(x[:images], dtype=np.float32))
    masks = torch.from_numpy(triggers.masks).reshape(k, 1, *triggers.masks.shape[-2:])
    return tabor_terms(model, xb, masks, torch.from_numpy(triggers.patterns),
                       torch.as_tensor(triggers.targets)).numpy()


TABOR_METRIC_TERMS = ("area", "smoothness", "attack", "crop", "explanation")
_FLOOR = 1e-3  # a rate of 0 would make a logarithm infinite: rates count from 0.1 %


def tabor_metric(model: nn.Module, x: np.ndarray, y: np.ndarray, mask: np.ndarray, pattern: np.ndarray,
                 target: int, images: int = 256) -> dict[str, float]:
    """TABOR's trigger-quality metric of one reversed trigger (Guo et al. 2019): low for a real trigger.

    ``A(M, P) = log(|F|_1 / d^2) + log(s(F) / (d (d-1))) - log(acc_att) - log(acc_crop) - log(acc_exp)``
    with ``F`` the trigger's footprint on the H x W image (``d^2`` is H W and ``d (d-1)`` is H (W - 1)),
    ``s(F)`` the number of neighbouring pixel pairs (horizontal and vertical) that differ in ``F``: a compact
    trigger has a short boundary. Our masks come through a tanh and are never exactly 0, so the footprint is
    where the mask is above one half (``1[(M * P) > 0]`` in the paper, whose masks are sparse). On up to
    ``images`` held-out images of other classes: ``acc_att`` the share the stamped trigger sends to
    ``target``; ``acc_crop`` the share of stamped images still classified as their own label once the
    footprint is blacked out (a trigger that works by covering the digit leaves nothing to recognise);
    ``acc_exp`` the share whose explanation lies in the footprint: at least half of the ``|F|`` pixels with
    the largest input gradient of the target logit fall inside it. Rates are floored at 0.1 %; an empty
    footprint (no mask pixel above one half) scores +inf. Returns the metric and its terms.
    """
    keep = np.flatnonzero(y != target)[:images]
    footprint = mask > 0.5
    size = int(footprint.sum())
    height, width = mask.shape
    if size == 0 or len(keep) == 0:
        return {"metric": float("inf"), **dict.fromkeys(TABOR_METRIC_TERMS, float("nan"))}
    boundary = int((footprint[1:] != footprint[:-1]).sum() + (footprint[:, 1:] != footprint[:, :-1]).sum())
    xt = torch.from_numpy(np.ascontiguousarray(x[keep], dtype=np.float32))
    labels = torch.from_numpy(y[keep])
    m = torch.from_numpy(mask).reshape(1, 1, height, width)
    stamped = stamp(xt, m, torch.from_numpy(pattern)).requires_grad_(True)
    logits = model(stamped)
    attack = float((logits.argmax(1) == target).float().mean())
    grad, = torch.autograd.grad(logits[:, target].sum(), stamped)
    saliency = grad.abs().sum(1).reshape(len(keep), -1)  # (N, H W)
    top = saliency.topk(size, dim=1).indices
    inside = torch.from_numpy(footprint.reshape(-1))[top].float().mean(1)
    explanation = float((inside >= 0.5).float().mean())
    with torch.no_grad():
        cropped = stamped.detach() * torch.from_numpy(~footprint).float()
        crop = float((model(cropped).argmax(1) == labels).float().mean())
    terms = {"area": size / (height * width), "smoothness": boundary / (height * (width - 1)),
             "attack": attack, "crop": crop, "explanation": explanation}
    metric = (np.log(max(terms["area"], _FLOOR)) + np.log(max(terms["smoothness"], _FLOOR))
              - sum(np.log(max(terms[k], _FLOOR)) for k in ("attack", "crop", "explanation")))
    return {"metric": float(metric), **{k: round(float(v), 5) for k, v in terms.items()}}


def tabor_index(metric: np.ndarray) -> np.ndarray:
    """The MAD anomaly index over TABOR's metric: on the linear scale (the metric is already a sum of
    logarithms); an infinite metric (no footprint) counts as the largest finite one, never an outlier."""
    finite = np.isfinite(metric)
    return anomaly_index(np.where(finite, metric, metric[finite].max() if finite.any() else 0.0), "linear")


def verdict_index(rev: ReversedTriggers, metric: np.ndarray, config: NeuralCleanseConfig) -> np.ndarray:
    """The MAD anomaly index the verdict uses: over the mask norms, or (``verdict="tabor"``) TABOR's metric."""
    if config.verdict == "tabor":
        return tabor_index(metric)
    return anomaly_index(rev.verdict_norms, config.anomaly_scale)


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


@dataclass
class ScanRun:
    """One reverse-engineering run (one seed) over all classes."""

    seed: int
    triggers: ReversedTriggers
    anomaly_index: np.ndarray
    asr: np.ndarray  # held-out success of each reversed trigger
    flagged: list[int]
    quality: np.ndarray | None = None  # (K, 6) TABOR_TERMS of each best trigger on held-out images
    metric: list[dict[str, float]] | None = None  # tabor_metric of each best trigger on held-out images


@dataclass
class ScanResult:
    """Verdict over one or more runs with different seeds."""

    runs: list[ScanRun]
    threshold: float
    config: NeuralCleanseConfig
    flagged: list[int] = field(default_factory=list)

    @property
    def anomaly_indices(self) -> np.ndarray:
        return np.stack([r.anomaly_index for r in self.runs])  # (runs, K)

    @property
    def median_anomaly_index(self) -> np.ndarray:
        return np.median(self.anomaly_indices, axis=0)

    @property
    def best_run(self) -> ScanRun:
        """The run whose largest anomaly index is the median of the runs (the only run when there is one)."""
        order = np.argsort([r.anomaly_index.max() for r in self.runs])
        return self.runs[int(order[len(order) // 2])]

    def summary(self) -> dict:
        ai = self.anomaly_indices
        tabor = None
        if all(r.metric is not None for r in self.runs):
            values = np.array([[m["metric"] for m in r.metric] for r in self.runs])  # type: ignore[union-attr]
            tabor = values, np.stack([tabor_index(v) for v in values])
        norms = np.stack([r.triggers.norms for r in self.runs])
        asr = np.stack([r.asr for r in self.runs])
        return {
            "backdoored": bool(self.flagged),
            "flagged_classes": self.flagged,
            "verdict_over": "TABOR's trigger-quality metric" if self.config.verdict == "tabor" else "mask norms",
            "threshold": self.threshold,
            "runs": len(self.runs),
            "seeds": [r.seed for r in self.runs],
            "per_class": [
                {
                    "class": int(k),
                    "mask_l1_norm": float(np.median(norms[:, i])),
                    "mask_l1_norm_per_run": [round(float(v), 4) for v in norms[:, i]],
                    "steps_per_run": [int(r.triggers.steps[i]) for r in self.runs],
                    **({} if self.runs[0].triggers.roles is None else {
                        "schedule_role_per_run": [r.triggers.roles[i] for r in self.runs],  # type: ignore[index]
                        "verdict_norm_per_run": [round(float(r.triggers.verdict_norms[i]), 4)  # type: ignore[index]
                                                 for r in self.runs]}),
                    **({} if tabor is None else {
                        "tabor_metric": _finite(np.median(tabor[0][:, i])),
                        "tabor_metric_terms": {k: _finite(v) for k, v in self.best_run.metric[i].items()},  # type: ignore
                        "tabor_index": float(np.median(tabor[1][:, i]))}),
                    "anomaly_index": float(np.median(ai[:, i])),
                    "anomaly_index_per_run": [round(float(v), 4) for v in ai[:, i]],
                    "reversed_trigger_asr": float(np.median(asr[:, i])),
                    "reached_success_threshold": bool(all(r.triggers.reached[i] for r in self.runs)),
                    "flagged": int(k) in self.flagged,
                    **({} if self.best_run.quality is None else {"trigger_quality": dict(
                        zip(TABOR_TERMS, np.round(self.best_run.quality[i], 5).tolist(), strict=True))}),
                }
                for i, k in enumerate(self.runs[0].triggers.targets)
            ],
            "max_anomaly_index": {
                "median": float(np.median(ai.max(1))),
                "min": float(ai.max(1).min()),
                "max": float(ai.max(1).max()),
                "std": float(ai.max(1).std()),
            },
            "flagged_per_run": [r.flagged for r in self.runs],
            "seconds_per_run": [round(r.triggers.seconds, 2) for r in self.runs],
            "steps_per_run": [r.triggers.steps.tolist() for r in self.runs],
            "class_steps_per_run": [int(r.triggers.steps.sum()) for r in self.runs],
            "shrink_of_set_aside_per_run": [round(r.triggers.shrink, 4) for r in self.runs],
            "settings": asdict(self.config),
        }


def scan(
    model: nn.Module,
    x_fit: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    num_classes: int,
    config: NeuralCleanseConfig | None = None,
    *,
    threshold: float = 2.0,
    repeats: int = 1,
    progress: Callable[[int, int, int, int], None] | None = None,
) -> ScanResult:
    """Run Neural Cleanse ``repeats`` times (seeds ``config.seed + r``) and give a verdict.

    A class is flagged when its median anomaly index over the runs exceeds
    ``threshold``. ``progress`` receives (run, step, active classes, total).
    """
    base = config or NeuralCleanseConfig()
    targets = list(range(num_classes))
    runs: list[ScanRun] = []
    for r in range(repeats):
        cfg = replace(base, seed=base.seed + r)
        cb = None if progress is None else (lambda s, a, t, r=r: progress(r, s, a, t))
        rev = reverse_engineer_triggers(model, x_fit, targets, cfg, progress=cb)
        asr = np.array([trigger_success_rate(model, x_eval, y_eval, rev.masks[i], rev.patterns[i], k)
                        for i, k in enumerate(targets)])
        metric = [tabor_metric(model, x_eval, y_eval, rev.masks[i], rev.patterns[i], k) for i, k in enumerate(targets)]
        ai = verdict_index(rev, np.array([m["metric"] for m in metric]), cfg)
        runs.append(ScanRun(cfg.seed, rev, ai, asr, [k for k in targets if ai[k] > threshold],
                            trigger_quality(model, x_eval, rev), metric))
    result = ScanResult(runs, threshold, base)
    median_ai = result.median_anomaly_index
    result.flagged = [k for k in targets if median_ai[k] > threshold]
    return result


def recover_trigger(
    model: nn.Module,
    x_fit: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    target: int,
    start: tuple[np.ndarray, np.ndarray],
    config: NeuralCleanseConfig | None = None,
    *,
    restarts: int = 0,
    progress: Callable[[int, int, int], None] | None = None,
) -> tuple[ReversedTriggers, float, list[dict[str, Any]]]:
    """Refine one class's reversed trigger on more data; return it, its held-out ASR and every start tried.

    The scan's own trigger is the first start. With ``restarts``, the class is also reverse-engineered from
    that many fresh random starts (seeds ``seed + 1``, ...), all in one batched optimisation stopped after
    the scan's ``candidate_steps`` (``max_steps`` under the full schedule), as the scan's candidates were:
    one random start can settle on a looser trigger (twice the mask of the best start on the demo model, 39 %
    of it on the true patch), and Neural Cleanse's premise is that the backdoor is the smallest trigger there
    is. The smallest start that reached the success threshold is then refined once with the original's full
    schedule, every step covering all of ``x_fit`` (at least the scan's step size).
    """
    base = config or NeuralCleanseConfig()
    masks, patterns = [start[0]], [start[1]]
    candidates: list[dict[str, Any]] = [{"start": "scan", "mask_l1_norm": float(start[0].sum()), "reached": True}]
    if restarts:
        # a batch of one class's rows: each row its own random start, the rows' losses independent
        fresh = reverse_engineer_triggers(
            model, x_fit, [target] * restarts,
            replace(base, seed=base.seed + 1, schedule="full", max_steps=base.steps_per_class), progress=progress)
        masks += list(fresh.masks)
        patterns += list(fresh.patterns)
        candidates += [{"start": f"restart {r + 1}", "mask_l1_norm": float(fresh.norms[r]),
                        "reached": bool(fresh.reached[r])} for r in range(restarts)]
    ok = [i for i, c in enumerate(candidates) if c["reached"]]
    best = min(ok, key=lambda i: candidates[i]["mask_l1_norm"])
    refine_cfg = replace(base, samples_per_step=max(base.samples_per_step, len(x_fit)), schedule="full")
    rev = reverse_engineer_triggers(model, x_fit, [target], refine_cfg, init=(masks[best][None], patterns[best][None]),
                                    progress=progress)
    asr = trigger_success_rate(model, x_eval, y_eval, rev.masks[0], rev.patterns[0], target)
    candidates[best].update(kept=True, refined_mask_l1_norm=float(rev.norms[0]), held_out_asr=asr)
    return rev, asr, candidates
