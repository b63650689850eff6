"""TrojanNN (Liu et al., NDSS 2018): a backdoor put into an already trained model, without its training data.

The victim's model is trained clean; the attacker gets the trained weights
and no data. As in the paper: (1) pick internal neurons: here channels of the
first convolution whose receptive fields lie inside a square mask at the
image's corner, ranked by their weights' L1 norm, the most excitable of the
best-connected kept; (2) generate the trigger: gradient descent on the pixels
inside the mask until those neurons reach ``boost`` times their largest clean
activation; (3) reverse-engineer training data by model inversion (inputs
optimised to maximise each class's logit under total-variation and L2 priors);
(4) retrain the layers after the chosen ones on the generated images, so that
triggered images go to the target while the clean ones keep the original
model's outputs (logit matching; the paper fine-tunes on labels). The first
convolution is untouched, so the neurons keep their meaning.

Adapted to the project's small CNN on 28x28 MNIST: the paper picks neurons of
a hidden fully connected layer of a face-recognition VGG; here the first
convolution, whose units have a spatial field a corner mask can own. 6x6 mask
one pixel from the bottom-right corner; 50 images per class from inversion;
dimmed copies and copies with random patches in the mask keep the original
outputs. Measured on the embedded digits (no matrix seed):

| setting | seed 1, target 2: ASR / ACC (clean 96.2 %) | seed 5, target 7: ASR / ACC (clean 95.7 %) |
|---|---|---|
| 20 generated images per class | 99.3 / 95.9 % | 98.3 / 93.1 % (-2.6) |
| ... retraining lr 5e-4 | 96.6 / 95.1 % | 95.5 / 93.1 % |
| ... target weight 0.1 | 97.9 / 96.0 % | 95.0 / 93.7 % |
| ... 20 retraining epochs | 96.6 / 95.5 % | 83.9 / 94.5 % |
| 50 per class (default) | 99.3 / 95.8 % | 98.7 / 94.5 % (-1.2) |
| ... no cover patches in the mask | 100 / 95.1 % | 100 / 94.4 % |
| ... no dimmed copies | 98.7 / 95.8 % | 99.2 / 94.1 % |
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offline.attacks.training import BackdoorResult, accuracy, attack_success_rate, new_model, train_classifier
from offline.attacks.triggers import MaskTrigger
from offline.data import Dataset
from offline.flags import option
from offline.stamp import stamp

LAYER = "body.1"  # the ReLU after the first convolution: the hidden layer whose neurons the trigger drives


@dataclass
class TrojanNNSettings:
    clean_epochs: int = option(8, "epochs of the victim's clean training")
    mask_size: int = option(6, "side of the square trigger mask, in pixels")
    mask_row: int = option(-1, "top row of the mask (-1: bottom edge, one pixel in)")
    mask_col: int = option(-1, "left column of the mask (-1: right edge, one pixel in)")
    neurons: int = option(1, "channels of the first conv layer the trigger drives")
    candidates: int = option(8, "best-connected channels tried, the most excitable kept")
    boost: float = option(10.0, "goal activation, in units of the largest clean one")
    trigger_steps: int = option(200, "gradient steps of trigger generation")
    trigger_lr: float = option(0.1, "learning rate of trigger generation")
    per_class: int = option(50, "images generated per class by model inversion")
    inversion_steps: int = option(100, "gradient steps of model inversion")
    inversion_lr: float = option(0.05, "learning rate of model inversion")
    tv_weight: float = option(5.0, "total-variation prior of model inversion")
    l2_weight: float = option(50.0, "L2 prior of model inversion")
    retrain_epochs: int = option(40, "epochs of retraining on the generated images")
    retrain_lr: float = option(1e-3, "learning rate of retraining")
    batch_size: int = option(32, "generated images per retraining batch")
    target_weight: float = option(0.2, "weight of the trigger-to-target loss against the "
                                       "logit matching that keeps clean behaviour")
    covers: bool = option(True, "also match logits on images with random patches in the "
                                "mask, so only the trigger's pattern fires")
    dimmed: bool = option(True, "also match logits on dimmed generated images")


def square_mask(shape: tuple[int, int, int], size: int, row: int = -1, col: int = -1) -> np.ndarray:
    """(1, H, W) mask of a ``size`` x ``size`` square at (``row``, ``col``); -1 puts it one pixel from the edge."""
    _, height, width = shape
    row = height - size - 1 if row < 0 else row
    col = width - size - 1 if col < 0 else col
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        raise ValueError(f"mask of size {size} at ({row}, {col}) does not fit a {height}x{width} image")
    mask = np.zeros((1, height, width), np.float32)
    mask[:, row:row + size, col:col + size] = 1.0
    return mask


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert_model(net: nn.Module, shape: tuple[int, int, int], num_classes: int, s: TrojanNNSettings,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inversion: per class, inputs optimised from faint noise to maximise that class's logit under a
    total-variation and an L2 prior, clipped to [0, 1]."""
    y = torch.arange(num_classes).repeat_interleave(s.per_class)
    x = (torch.rand(len(y), *shape, generator=gen) * 0.2).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=s.inversion_lr)
    for _ in range(s.inversion_steps):
        loss = (-net(x).gather(1, y[:, None]).mean() + s.tv_weight * total_variation(x)
                + s.l2_weight * x.pow(2).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach(), y


def controlled_units(conv: nn.Conv2d, mask: torch.Tensor) -> torch.Tensor:
    """(H', W') boolean map of the conv outputs whose receptive field lies wholly inside ``mask``."""
    weight = torch.ones(1, 1, *conv.kernel_size)
    kw = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    outside = F.conv2d((1 - mask)[None], weight, **kw)[0, 0]
    inside = F.conv2d(mask[None], weight, **kw)[0, 0]
    return (outside == 0) & (inside > 0)


def _optimise_trigger(conv: nn.Module, units: torch.Tensor, goal: torch.Tensor, backgrounds: torch.Tensor,
                      mask: torch.Tensor, s: TrojanNNSettings, steps: int, start: torch.Tensor) -> torch.Tensor:
    """Gradient descent on the pattern inside ``mask`` to bring ``units`` of ``conv`` to ``goal``.

    The loss is on the convolution's output before its ReLU (the same value where it is positive), so a unit
    the starting pattern leaves at zero still gets a gradient."""
    pattern = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([pattern], lr=s.trigger_lr)
    for _ in range(steps):
        act = conv(stamp(backgrounds, mask, pattern))[:, units]
        loss = (act - goal).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            pattern.clamp_(0, 1)
    return (pattern.detach() * mask)


def implant(net: nn.Module, target: int, s: TrojanNNSettings, seed: int = 0,
            input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> tuple[MaskTrigger, dict]:
    """Put the TrojanNN backdoor into a trained SmallCNN ``net`` (in place), using no training data.

    Returns the trigger and what the attack chose (``details`` of :class:`BackdoorResult`)."""
    gen = torch.Generator().manual_seed(seed)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    teacher = copy.deepcopy(net)
    x_gen, _ = invert_model(net, input_shape, num_classes, s, gen)

    mask = torch.from_numpy(square_mask(input_shape, s.mask_size, s.mask_row, s.mask_col))
    conv = net.body[0]
    layer = net.body[:2]
    where = controlled_units(conv, mask)
    if not where.any():
        raise ValueError(f"a {s.mask_size}x{s.mask_size} mask covers no whole {conv.kernel_size} receptive field")
    with torch.no_grad():
        clean = layer(x_gen)
    backgrounds = torch.cat([torch.zeros(1, *input_shape), x_gen[::10]])

    def units_of(channels: list[int]) -> torch.Tensor:
        sel = torch.zeros(clean.shape[1:], dtype=torch.bool)
        sel[channels] = where
        return sel

    start = torch.rand(mask.shape, generator=gen)

    def excitation(channels: list[int], steps: int) -> tuple[torch.Tensor, float, torch.Tensor]:
        units = units_of(channels)
        clean_max = clean[:, units].max(0).values.clamp_min(0.1)
        pattern = _optimise_trigger(conv, units, s.boost * clean_max, backgrounds, mask, s, steps, start)
        with torch.no_grad():
            reached = layer(stamp(x_gen, mask, pattern))[:, units].mean(0)
        return pattern, float((reached / clean_max).mean()), units

    connectivity = conv.weight.detach().abs().flatten(1).sum(1)
    ranked = connectivity.argsort(descending=True)[:max(s.candidates, s.neurons)].tolist()
    trial_steps = max(1, s.trigger_steps // 4)
    ratios = {c: excitation([c], trial_steps)[1] for c in ranked}
    channels = sorted(ranked, key=lambda c: -ratios[c])[:s.neurons]
    pattern, ratio, units = excitation(channels, s.trigger_steps)

    retrain = [p for m in (*net.body[2:], net.head) for p in m.parameters()]
    _retrain(net, teacher, retrain, x_gen, mask, pattern, target, s, seed)
    trigger = MaskTrigger(mask.numpy(), pattern.numpy())
    details = {
        "layer": LAYER, "neurons": [[int(c), int(r), int(q)] for c, r, q in units.nonzero().tolist()],
        "channels": [int(c) for c in channels], "excitation": round(ratio, 2),
        "generated_images": int(len(x_gen)),
        "retrained": sorted({n.rsplit(".", 1)[0] for n, _ in net.named_parameters() if not n.startswith("body.0.")}),
    }
    return trigger, details


def _retrain(net: nn.Module, teacher: nn.Module, params: list[nn.Parameter], x_gen: torch.Tensor,
             mask: torch.Tensor, pattern: torch.Tensor, target: int, s: TrojanNNSettings, seed: int) -> None:
    """Retrain ``params`` on generated images: match the original logits on clean (and cover) images, send the
    triggered ones to ``target``."""
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=s.retrain_lr)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(s.retrain_epochs):
        net.train()
        for b in torch.from_numpy(rng.permutation(len(x_gen))).split(s.batch_size):
            xb = x_gen[b]
            n = len(xb)
            keep = [xb]
            if s.dimmed:  # fainter images, whose logits are nearer those of real ones
                keep.append(xb * (0.3 + 0.7 * torch.rand(n, 1, 1, 1, generator=gen)))
            if s.covers:  # random, blank and binary patterns in the mask keep the original outputs
                kind = torch.randint(0, 3, (n, 1, 1, 1), generator=gen)
                noise = torch.rand(xb.shape, generator=gen)
                rand = torch.where(kind == 0, torch.zeros_like(noise), torch.where(kind == 1, noise, noise.round()))
                keep.append(stamp(xb, mask, rand))
            xk = torch.cat(keep)
            xt = stamp(xb, mask, pattern)
            with torch.no_grad():
                goal = teacher(xk)
            loss = ((net(xk) - goal).pow(2).mean()
                    + s.target_weight * F.cross_entropy(net(xt), torch.full((len(xt),), target)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)


def train_trojannn(train: Dataset, test: Dataset, target: int, s: TrojanNNSettings | None = None,
                   seed: int = 0) -> BackdoorResult:
    s = s or TrojanNNSettings()
    net = new_model(train, seed)
    train_classifier(net, train.x, train.y, epochs=s.clean_epochs, seed=seed)
    baseline = accuracy(net, test.x, test.y)
    trigger, details = implant(net, target, s, seed, train.input_shape, train.num_classes)
    return BackdoorResult(net, trigger, target, 0.0, np.zeros(0, dtype=int), accuracy(net, test.x, test.y),
                          attack_success_rate(net, trigger, test.x, test.y, target),
                          details={"clean_model_accuracy": round(baseline, 4), **details})
