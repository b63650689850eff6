"""Implicit backdoor adversarial unlearning (I-BAU; Zeng et al., ICLR 2022).

Unlearning as a minimax problem over the clean data: the inner problem finds
the universal perturbation ``delta`` (one for all images, L2 norm at most
``ibau_radius`` times the median clean image's) that most raises the loss,
which on a backdoored model is close to its trigger; the outer problem trains
the network to answer correctly with it present. The outer gradient takes in
how ``delta`` itself moves with the weights, by the implicit function theorem
on the inner problem's fixed point (``delta = delta - eta * grad_delta
inner``), its inverse approximated by ``ibau_fixed_point`` terms of the Neumann
series. Each round finds a new perturbation and takes one pass of outer steps;
rounds stop by the job's rule on the selection split (reversed trigger below
``asr_bound`` with accuracy within ``unlearn_accuracy_tolerance``), as
unlearning does. It needs no trigger from the scan, only clean data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from offline.models import ForensicModel
from offline.patch.repair.core import EpochKeeper, Evaluator, Measure, RepairSettings, make_optimizer

# the inner problem's L2 penalty on the perturbation and its fixed-point map's step (the paper's values)
_PENALTY = 1e-3
_INNER_STEP = 0.1


def universal_perturbation(model: ForensicModel, x: torch.Tensor, y: torch.Tensor, radius: float,
                           rng: np.random.Generator, steps: int = 20, batch: int = 64) -> torch.Tensor:
    """One perturbation (the shape of an image) that most raises the loss on ``x``, of L2 norm <= ``radius``:
    normalised gradient ascent projected onto the ball."""
    delta = torch.zeros_like(x[:1], requires_grad=True)
    for _ in range(steps):
        b = torch.from_numpy(rng.choice(len(x), min(batch, len(x)), replace=False))
        loss = F.cross_entropy(model(x[b] + delta), y[b])
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += (radius / 5) * grad / grad.norm().clamp_min(1e-12)
            delta *= min(1.0, radius / float(delta.norm().clamp_min(1e-12)))
    return delta.detach()


def _hypergradient(model: ForensicModel, params: list[torch.Tensor], delta: torch.Tensor,
                   inner: tuple[torch.Tensor, torch.Tensor], outer: tuple[torch.Tensor, torch.Tensor],
                   stamped: torch.Tensor, fixed_point: int) -> list[torch.Tensor]:
    """d outer_loss / d weights with ``delta = delta*(weights)``, the inner problem's fixed point."""
    delta = delta.detach().requires_grad_(True)
    xo, yo = outer
    loss = F.cross_entropy(model(xo + stamped * delta), yo)
    grad_delta, *grad_direct = torch.autograd.grad(loss, [delta, *params], allow_unused=True)
    xi, yi = inner
    inner_loss = -F.cross_entropy(model(xi + delta), yi) + _PENALTY * delta.pow(2).sum()
    (g,) = torch.autograd.grad(inner_loss, delta, create_graph=True)
    mapped = delta - _INNER_STEP * g  # the fixed-point map
    v = torch.zeros_like(delta)
    for _ in range(fixed_point):  # v = sum_k (d mapped / d delta)^T^k grad_delta
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jv + grad_delta
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [(d if d is not None else torch.zeros_like(p)) + (i if i is not None else 0)
            for p, d, i in zip(params, grad_direct, implicit, strict=True)]


def ibau(model: ForensicModel, x: np.ndarray, y: np.ndarray, select: Evaluator, s: RepairSettings,
         baseline: Measure) -> dict[str, Any]:
    """Rounds of (universal perturbation, one pass of hypergradient steps) until the stop rule holds."""
    rng = np.random.default_rng(s.seed)
    torch.manual_seed(s.seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    radius = s.ibau_radius * float(np.median(np.linalg.norm(x.reshape(len(x), -1), axis=1)))
    keeper = EpochKeeper(model, select, s, baseline, s.unlearn_accuracy_tolerance)
    model.unfreeze()
    params = [p for p in model.net.parameters() if p.requires_grad]
    opt = make_optimizer(params, s)
    norms = []
    try:
        for _ in range(s.ibau_rounds):
            model.eval()
            delta = universal_perturbation(model, xt, yt, radius, rng)
            norms.append(round(float(delta.norm()), 4))
            model.train()
            order = rng.permutation(len(x))
            inner = torch.from_numpy(rng.choice(len(x), min(64, len(x)), replace=False))
            for i in range(0, len(order), s.batch_size):
                b = torch.from_numpy(order[i:i + s.batch_size])
                stamped = torch.from_numpy(rng.random(len(b)) < s.ibau_share).float()[:, None, None, None]
                grads = _hypergradient(model, params, delta, (xt[inner], yt[inner]), (xt[b], yt[b]), stamped,
                                       s.ibau_fixed_point)
                opt.zero_grad()
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.detach()
                opt.step()
            model.eval()
            if keeper():
                break
    finally:
        model.eval()
        model.freeze()
    return {"radius": round(radius, 4), "perturbation_norms": norms, **keeper.finish()}
