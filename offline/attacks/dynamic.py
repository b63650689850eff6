"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a different trigger for every input.

Two small encoder-decoder networks make, for every input x, a pattern G(x)
and a mask M(x); the triggered image is ``x + (G(x) - x) * M(x)``. As in the
paper, M is trained first, alone, to give different masks to different inputs
(the diversity loss ||x1 - x2|| / ||M(x1) - M(x2)||) within a density bound;
then the classifier and G train together, M fixed: in each batch a share of
rows carries its own trigger and the target label, another share carries the
trigger made for a *different* input and keeps its label (the cross-trigger
term, so a trigger fires only on the input it was made for), and G gets the
diversity loss too. No fixed training rows are poisoned (the triggers change
while G trains), so ``poison_idx`` is empty and the audit has nothing to score.

Adapted to 28x28 MNIST and 3,500 training images (the paper trains for hundreds
of epochs on 60,000): the mask may cover 10 % of the image on average (the
paper: 3.2 %), a backdoor share of 0.15 (0.1), 30 epochs. Measured on the
embedded digits (target 2, seed 1; a clean model of the seed 96.2 %):

| mask density bound | mask density | ASR | clean accuracy | cross-trigger accuracy |
|---|---|---|---|---|
| 0.032 (the paper) | 0.031 | 84.7 % | 96.5 % | 77.1 % |
| 0.1 (default) | 0.066 | 95.3 % | 96.5 % | 80.2 % |
| 0.3 | 0.222 | 97.4 % | 96.5 % | 84.7 % |

Cross-trigger accuracy is the clean accuracy of images stamped with another
image's trigger (the paper reports about 90 % on MNIST): the model has not
fully learnt that a trigger belongs to one input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offline.attacks.training import BackdoorResult, accuracy, attack_success_rate, new_model
from offline.attacks.triggers import GeneratorTrigger
from offline.data import Dataset
from offline.flags import option

EPS = 1e-7


@dataclass
class DynamicSettings:
    mask_density: float = option(0.1, "share of the pixels the mask may cover on average (the paper: 0.032)")
    lambda_norm: float = option(100.0, "weight of the mask density penalty")
    lambda_div: float = option(1.0, "weight of the diversity loss, both stages")
    backdoor_rate: float = option(0.15, "share of each batch stamped with its own trigger and relabelled (the "
                                        "paper: 0.1)")
    cross_rate: float = option(0.1, "share of each batch stamped with another input's trigger, labels kept")
    mask_epochs: int = option(1, "epochs pre-training the mask generator alone")
    epochs: int = option(30, "epochs training the classifier and the pattern generator")
    lr: float = option(2e-3, "classifier learning rate (Adam, cosine decay)")
    mask_lr: float = option(1e-3, "mask generator learning rate (Adam)")
    pattern_lr: float = option(3e-3, "pattern generator learning rate (Adam, cosine decay)")
    width: int = option(8, "channels of the generators' first layer")
    batch_size: int = option(64, "batch size")


class EncoderDecoder(nn.Module):
    """The generators: conv encoder (two poolings), conv decoder (two upsamplings back to H x W), sigmoid."""

    def __init__(self, input_shape: tuple[int, int, int], out_channels: int, width: int = 8) -> None:
        super().__init__()
        channels, height, w = input_shape
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Upsample(size=(height // 2, w // 2)),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(),
            nn.Upsample(size=(height, w)),
            nn.Conv2d(width, out_channels, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class InputAwareTrigger(nn.Module):
    """The trigger network (TorchScript-able): ``forward(x) = x + (G(x) - x) * M(x)``.

    :meth:`masks` and :meth:`patterns` give M(x) and G(x); :meth:`cross` stamps
    ``x`` with the trigger made for ``source`` (the paper's cross-trigger test).
    """

    def __init__(self, pattern_net: nn.Module, mask_net: nn.Module) -> None:
        super().__init__()
        self.pattern_net = pattern_net
        self.mask_net = mask_net

    @torch.jit.export
    def masks(self, x: torch.Tensor) -> torch.Tensor:
        """M(x), soft-binarised as in the paper's code: tanh(20 m - 10) / 2 + 0.5."""
        return torch.tanh(20 * self.mask_net(x) - 10) / 2 + 0.5

    @torch.jit.export
    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        return self.pattern_net(x)

    @torch.jit.export
    def cross(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return x + (self.patterns(source) - x) * self.masks(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cross(x, x)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).pow(2).mean(dim=(1, 2, 3)) + EPS).sqrt()  # + EPS: a finite gradient at zero distance


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """The paper's ||x1 - x2|| / ||out1 - out2||, averaged: small when different inputs get different outputs."""
    return (_distance(x1, x2) / (_distance(out1, out2) + EPS)).mean()


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[torch.Tensor]:
    order = torch.from_numpy(rng.permutation(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _train_mask(gen: InputAwareTrigger, x: torch.Tensor, s: DynamicSettings, rng: np.random.Generator) -> None:
    """Stage 1: M alone, masks that differ between inputs (x2: the batch shifted by one) within the density."""
    opt = torch.optim.Adam(gen.mask_net.parameters(), lr=s.mask_lr, betas=(0.5, 0.9))
    for _ in range(s.mask_epochs):
        for b in _batches(len(x), s.batch_size, rng):
            x1 = x[b]
            x2 = x1.roll(1, 0)
            m1 = gen.masks(x1)
            loss = (s.lambda_div * diversity_loss(x1, x2, m1, m1.roll(1, 0))
                    + s.lambda_norm * F.relu(m1.mean(dim=(1, 2, 3)) - s.mask_density).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
    gen.mask_net.requires_grad_(False)
    gen.mask_net.eval()


def train_dynamic(train: Dataset, test: Dataset, target: int, s: DynamicSettings | None = None,
                  seed: int = 0) -> BackdoorResult:
    s = s or DynamicSettings()
    net = new_model(train, seed)
    gen = InputAwareTrigger(EncoderDecoder(train.input_shape, train.input_shape[0], s.width),
                            EncoderDecoder(train.input_shape, 1, s.width))
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(train.x), torch.from_numpy(train.y)
    _train_mask(gen, xt, s, rng)

    # stage 2: the classifier and G together, M fixed; per batch: backdoor rows, cross-trigger rows, clean rows
    opts = [torch.optim.Adam(net.parameters(), lr=s.lr),
            torch.optim.Adam(gen.pattern_net.parameters(), lr=s.pattern_lr, betas=(0.5, 0.9))]
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.epochs) for opt in opts]
    for _ in range(s.epochs):
        net.train()
        gen.pattern_net.train()
        for b in _batches(len(xt), s.batch_size, rng):
            xb, yb = xt[b], yt[b]
            nb, nc = int(s.backdoor_rate * len(b)), int(s.cross_rate * len(b))
            x1, xc = xb[:nb], xb[nb:nb + nc]
            x2 = xb.roll(1, 0)[nb:nb + nc]  # the inputs whose triggers the cross rows carry
            with torch.no_grad():
                m1, m2 = gen.masks(x1), gen.masks(x2)
            p1, p2 = gen.patterns(x1), gen.patterns(x2)
            inputs = torch.cat([x1 + (p1 - x1) * m1, xc + (p2 - xc) * m2, xb[nb + nc:]])
            labels = torch.cat([torch.full_like(yb[:nb], target), yb[nb:]])
            loss = F.cross_entropy(net(inputs), labels)
            k = min(nb, nc)
            if k:
                loss = loss + s.lambda_div * diversity_loss(x1[:k], x2[:k], p1[:k], p2[:k])
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
        for schedule in schedules:
            schedule.step()
    net.eval()
    gen.eval()
    gen.requires_grad_(False)

    trigger = GeneratorTrigger(gen)
    order = rng.permutation(len(test))
    source = np.empty_like(order)
    source[order] = np.roll(order, 1)  # every test image paired with another one
    with torch.no_grad():
        x_test = torch.from_numpy(test.x)
        density = float(gen.masks(x_test).mean())
        crossed = gen.cross(x_test, x_test[torch.from_numpy(source)]).clamp(0, 1).numpy()
    details = {"mask_density": round(density, 4),
               "cross_trigger_accuracy": round(accuracy(net, crossed, test.y), 4),
               "cross_rate": s.cross_rate}
    return BackdoorResult(net, trigger, target, s.backdoor_rate, np.zeros(0, int), accuracy(net, test.x, test.y),
                          attack_success_rate(net, trigger, test.x, test.y, target), details=details)
