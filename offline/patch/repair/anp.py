"""Adversarial neuron pruning (ANP; Wu & Wang, NeurIPS 2021), for the clean data a defender has.

A backdoored network has neurons that, perturbed a little, make it misclassify
clean inputs far more readily than a clean network's would: the backdoor's
neurons. ANP learns a mask in [0, 1] on every neuron (every channel of a
convolution, every unit of a linear layer, all but the output layer) that
keeps the network right on clean data both as it is and under the worst
multiplicative perturbation of its neurons within ``anp_eps``:

    min_m  alpha * CE(f(x; m)) + (1 - alpha) * max_{|d| <= eps} CE(f(x; m + d))

with one signed ascent step for the inner maximum, as in the paper. The
backdoor's neurons are the ones the perturbed loss drives to small masks. They
are then pruned in the order of their masks, smallest first: all those below
``anp_threshold``, and more while the reversed trigger still works, within the
accuracy budget on the selection split (a neuron that would break it is
passed over, until five in a row were). The weights themselves never change,
which is why ANP needs so little data: it fits one number per neuron.

The paper perturbs BatchNorm's scale and shift; these models may have no
BatchNorm, so the perturbation multiplies each neuron's output instead (the
same as scaling a BatchNorm's scale and shift together).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from offline.models import ForensicModel
from offline.patch.repair.core import Evaluator, Measure, RepairSettings, neuron_layers, prune_in_order, units_of


def _apply(model: ForensicModel, masks: dict[str, torch.Tensor]) -> None:
    for layer, mask in masks.items():
        model.set_output_mask(layer, mask)


def learn_masks(model: ForensicModel, x: np.ndarray, y: np.ndarray, s: RepairSettings) -> dict[str, np.ndarray]:
    """ANP's neuron masks (layer -> one value per neuron in [0, 1]) learnt on clean ``x``, ``y``."""
    layers = neuron_layers(model)
    sizes = units_of(model, layers, x)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    masks = {layer: torch.ones(n, requires_grad=True) for layer, n in sizes.items()}
    noise = {layer: torch.zeros(n, requires_grad=True) for layer, n in sizes.items()}
    mask_opt = torch.optim.SGD(list(masks.values()), lr=s.anp_lr, momentum=0.9)
    noise_opt = torch.optim.SGD(list(noise.values()), lr=s.anp_eps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch = min(128, len(x))
    model.eval()
    try:
        for _ in range(s.anp_iterations):
            b = torch.from_numpy(rng.choice(len(x), batch, replace=False))
            xb, yb = xt[b], yt[b]
            if s.anp_eps > 0:
                with torch.no_grad():
                    for d in noise.values():
                        d.uniform_(-s.anp_eps, s.anp_eps)
                # the neurons' worst perturbation: one ascent step
                _apply(model, {layer: mask.detach() + noise[layer] for layer, mask in masks.items()})
                noise_opt.zero_grad()
                (-F.cross_entropy(model(xb), yb)).backward()
                noise_opt.step()
                with torch.no_grad():
                    for d in noise.values():
                        d.clamp_(-s.anp_eps, s.anp_eps)
                _apply(model, {layer: mask + noise[layer].detach() for layer, mask in masks.items()})
                robust = F.cross_entropy(model(xb), yb)
            else:
                robust = torch.zeros(())
            _apply(model, masks)
            loss = s.anp_alpha * F.cross_entropy(model(xb), yb) + (1 - s.anp_alpha) * robust
            mask_opt.zero_grad()
            loss.backward()
            mask_opt.step()
            with torch.no_grad():
                for mask in masks.values():
                    mask.clamp_(0.0, 1.0)
    finally:
        _apply(model, dict.fromkeys(masks))
    return {layer: mask.detach().numpy().copy() for layer, mask in masks.items()}


def anp(model: ForensicModel, x: np.ndarray, y: np.ndarray, select: Evaluator, s: RepairSettings,
        baseline: Measure) -> dict[str, Any]:
    """Learn ANP's masks on the fit images, then prune by them within the stop rules on ``select``."""
    masks = learn_masks(model, x, y, s)
    order = sorted(((float(v), layer, i) for layer, m in masks.items() for i, v in enumerate(m)))
    low = sum(v < s.anp_threshold for v, _, _ in order)
    pruned, curve = prune_in_order(
        model, [(layer, i) for _, layer, i in order], {layer: len(m) for layer, m in masks.items()}, select, s,
        baseline, lambda n, m: n < low or m.reversed_asr >= s.asr_bound, skips=5)
    return {"layers": list(masks), "neurons": len(order), "below_threshold": int(low),
            "pruned": [f"{layer}[{i}]" for layer, i in pruned], "curve": curve,
            "mask_values": {layer: [round(float(v), 4) for v in m] for layer, m in masks.items()}}
