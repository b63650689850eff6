"""One screened model call: every detector's extra rows in one batch, their scores, one verdict."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from guard.screens.verdict import Judgement, OneBudget

Infer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ModelView:
    """The model's outputs on a screened batch: the inputs' own rows, and each detector's extra rows."""

    def __init__(self, logits: np.ndarray, features: np.ndarray, b: int, spans: dict[int, tuple[int, int]],
                 extra_outputs: dict[str, np.ndarray] | None = None) -> None:
        self.all_logits = logits
        self.logits, self.features = logits[:b], features[:b].reshape(b, -1)
        # the model's other outputs (IBD-PSC's variants) on the inputs' own rows
        self.extra_outputs = {name: out[:b] for name, out in (extra_outputs or {}).items()}
        self.predicted = self.logits.argmax(axis=1)
        self._spans = spans

    def extra_logits(self, detector) -> np.ndarray:
        lo, hi = self._spans[id(detector)]
        return self.all_logits[lo:hi]


@dataclass
class ScreenResult:
    """What the guard decides about a batch of inputs."""

    logits: np.ndarray  # (B, K) the model's answer on the unmodified inputs
    features: np.ndarray  # (B, D)
    scores: np.ndarray  # (B, detectors)
    judgement: Judgement | None  # None when scored without a verdict (calibration)
    forward_passes: np.ndarray | None = None  # (B,) model rows each input cost: itself and its blends

    @property
    def flagged(self) -> np.ndarray:
        return self.judgement.flagged

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


class Screen:
    """The detectors of a bundle and the verdict that combines them."""

    def __init__(self, detectors: Sequence, budget: OneBudget | None = None) -> None:
        if not detectors:
            raise ValueError("a screen needs at least one detector")
        self.detectors = list(detectors)
        self.names = tuple(d.name for d in self.detectors)
        if budget is not None and tuple(budget.names) != self.names:
            raise ValueError(f"verdict calibrated for {list(budget.names)}, detectors are {list(self.names)}")
        self.budget = budget
        # the model outputs beyond logits and features that the detectors read, in order: the backend asks for them
        self.model_outputs = tuple(dict.fromkeys(o for d in self.detectors for o in getattr(d, "model_outputs", ())))
        # a sequential STRIP draws its blends in rounds (the other detectors' rows go with its first)
        self.sequential = next((d for d in self.detectors if getattr(d, "group", None)), None)

    def model_batch(self, x: np.ndarray, skip: object = None) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
        """The inputs, then each detector's extra rows (but ``skip``'s), as one float32 batch; and where each
        detector's rows lie."""
        parts, spans, at = [np.asarray(x, dtype=np.float32)], {}, len(x)
        for d in self.detectors:
            rows = d.extra_rows(x) if d.adds_rows and d is not skip else None
            if rows is not None and len(rows):
                spans[id(d)] = (at, at + len(rows))
                parts.append(rows)
                at += len(rows)
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), spans

    def run(self, infer: Infer, x: np.ndarray, judge: bool = True,
            logits: Callable[[np.ndarray], np.ndarray] | None = None) -> ScreenResult:
        """Screen a batch: one model call for the inputs and every detector's extra rows.

        With a sequential STRIP and a verdict, STRIP's blends come in rounds
        instead and each input stops once its verdict is settled; ``logits``
        (the model's logits alone: less for an upstream server to send) runs
        the rounds after the first, which need nothing else.
        """
        if judge and self.budget is not None and self.sequential is not None:
            return self._run_sequential(infer, x, self.sequential, logits or (lambda rows: infer(rows)[0]))
        batch, spans = self.model_batch(x)
        outputs = infer(batch)
        view = ModelView(outputs[0], outputs[1], len(x), spans, outputs[2] if len(outputs) > 2 else None)
        scores = np.stack([np.asarray(d.scores(view), dtype=np.float64) for d in self.detectors], axis=1)
        judgement = self.budget.judge(scores, view.predicted) if judge and self.budget is not None else None
        extra = sum(hi - lo for lo, hi in spans.values()) // max(len(x), 1)
        return ScreenResult(view.logits, view.features, scores, judgement, np.full(len(x), 1 + extra))

    def _run_sequential(self, infer: Infer, x: np.ndarray, strip,
                        logits: Callable[[np.ndarray], np.ndarray]) -> ScreenResult:
        b, n, g, s = len(x), strip.n, strip.group, self.detectors.index(strip)
        order = strip.draw(b)
        batch, spans = self.model_batch(x, skip=strip)  # the other detectors' rows, then STRIP's first round
        outputs = infer(np.concatenate([batch, strip.blends(x, order[:, :g])]))
        view = ModelView(outputs[0], outputs[1], b, spans, outputs[2] if len(outputs) > 2 else None)
        entropies = np.empty((b, n))
        entropies[:, :g] = strip.per_blend(outputs[0][len(batch):], g)
        scores = np.zeros((b, len(self.detectors)))
        for d, det in enumerate(self.detectors):
            if det is not strip:
                scores[:, d] = det.scores(view)
        used = np.full(b, g)
        todo, m = np.arange(b), g
        while len(todo):
            predicted = view.predicted[todo]
            mu, lo, hi = (strip.standardise(v, predicted) for v in strip.bounds(entropies[todo], m))
            scores[todo, s] = mu
            if m >= n:
                break
            # STRIP's least and most suspicious plausible n-blend means, judged in one call
            bounds = np.concatenate([scores[todo], scores[todo]])
            bounds[:len(todo), s], bounds[len(todo):, s] = hi, lo
            flagged = self.budget.judge(bounds, np.concatenate([predicted, predicted])).flagged
            settled = flagged[:len(todo)] | ~flagged[len(todo):]
            todo = todo[~settled]
            if not len(todo):
                break
            step = min(g, n - m)
            more = logits(strip.blends(x[todo], order[todo, m:m + step]))
            entropies[todo, m:m + step] = strip.per_blend(more, step)
            m += step
            used[todo] = m
        others = (len(batch) - b) // max(b, 1)  # rows the other detectors added per input
        return ScreenResult(view.logits, view.features, scores, self.budget.judge(scores, view.predicted),
                            1 + others + used)

    def score(self, infer: Infer, x: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N, D) and the model's answers (N,) over a large set, in chunks, without a verdict."""
        results = [self.run(infer, x[i:i + chunk], judge=False) for i in range(0, len(x), chunk)]
        return (np.concatenate([r.scores for r in results]),
                np.concatenate([r.logits.argmax(axis=1) for r in results]))
