"""The scan's settings (torch-free, so that ``trojan-forensics --help`` and the settings load without torch).

:class:`NeuralCleanseConfig` holds the knobs of the reverse-engineering (:mod:`.neural_cleanse`); each field
that is a flag of ``scan`` and ``patch`` carries its help (:func:`offline.flags.option`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from offline.flags import option, positive

# "mntd" is a scan of its own (offline/mntd): a meta-classifier's verdict on the whole model, no trigger
METHODS = ("neural-cleanse", "tabor", "mntd")
TRIGGER_METHODS = METHODS[:2]  # what the patch job and the fleet scan reverse-engineer triggers with
ANOMALY_SCALES = ("log", "linear")
SCHEDULES = ("adaptive", "full")
# what the verdict's MAD outlier test runs over: every class's best mask norm (Neural Cleanse), or TABOR's
# trigger-quality metric of every class's best trigger (``tabor_metric``; lower is more trigger-like)
VERDICTS = ("mask-norm", "tabor")
# TABOR's regularisers, in the order of its weights. Our pixels are in [0, 1] (the original's in [0, 255]),
# so the weights are ours, not the paper's: each term is a sum over pixels like Neural Cleanse's mask L1.
TABOR_TERMS = (
    "mask_l2",  # R1, with the scheduled L1 cost an elastic net on the mask: overly large triggers
    "pattern_outside_mask",  # R1: L1 + L2 of the pattern where the mask is off
    "mask_smoothness",  # R2: squared differences of neighbouring mask pixels: scattered triggers
    "trigger_smoothness",  # R2: the same for the visible trigger, mask x pattern
    "blocking",  # R3: cross-entropy of the image with the trigger area cut out against the model's own
                 # clean prediction: a trigger must not work by covering the key object
    "overlay",  # R4: cross-entropy of the trigger alone against the target: it must carry the attack itself
)


def check_scale(scale: str) -> None:
    if scale not in ANOMALY_SCALES:
        raise ValueError(f"unknown anomaly scale {scale!r}; choose one of {', '.join(ANOMALY_SCALES)}")


def tabor_weights(text: str) -> tuple[float, ...]:
    """``--tabor-weights``: six comma-separated numbers >= 0."""
    try:
        weights = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected six comma-separated numbers, got {text!r}") from None
    if len(weights) != len(TABOR_TERMS) or any(w < 0 for w in weights):
        raise argparse.ArgumentTypeError(f"expected six comma-separated numbers >= 0, got {text!r}")
    return weights


@dataclass
class NeuralCleanseConfig:
    """Knobs of the reverse-engineering; defaults are the original implementation's."""

    lr: float = option(0.1, "Adam learning rate")
    beta1: float = option(0.5, "Adam beta1")
    beta2: float = option(0.9, "Adam beta2")
    init_cost: float = option(1e-3, "L1 cost set once the attack first succeeds")
    attack_success_threshold: float = option(0.99, "success rate that counts as a working trigger")
    patience: int = option(5, "steps before the cost is set or moved")
    cost_multiplier: float = option(2.0, "cost x this up, / this**1.5 down")
    early_stop: bool = option(True, "stop a class after --early-stop-patience steps without progress "
                                    "(--no-early-stop: run all --max-steps steps)")
    early_stop_threshold: float = option(1.0, "relative improvement below which a step counts as no progress")
    early_stop_patience: int = option(25, "steps without progress before stopping")
    max_steps: int = option(1000, "most optimisation steps of a class under the full schedule")
    samples_per_step: int = option(1000, "clean images per optimisation step")
    batch_size: int = option(32, "mini-batch size")
    seed: int = option(0, "random seed of the first run")
    # "tabor" adds TABOR's regularisers (Guo et al. 2019) to the objective, weighted as TABOR_TERMS lists
    method: str = option("neural-cleanse", "neural-cleanse; tabor: the same objective plus TABOR's "
                         "regularisers against scattered, overly large and object-covering false triggers; mntd "
                         "(scan only, with --meta): Meta Neural Trojan Detection's backdoor probability",
                         choices=METHODS)
    tabor_weights: tuple[float, ...] = option((1e-3, 1e-5, 1e-3, 1e-4, 1e-2, 1e-2),
                                              "weights of TABOR's terms " + ", ".join(TABOR_TERMS)
                                              + " (pixels in [0, 1])", type=tabor_weights, metavar="W,W,W,W,W,W")
    # the verdict's MAD index over the mask norms ("log") or the norms themselves ("linear", the original)
    anomaly_scale: str = option("log", "the verdict's MAD anomaly index over the logarithms of the mask norms, "
                                "or over the norms themselves (linear: the original Neural Cleanse index)",
                                choices=ANOMALY_SCALES)
    # "adaptive": every class for warmup_steps, then only the classes whose anomaly index stays above
    # candidate_index (and one reference class) go on; "full": every class until its own early stop
    schedule: str = option("adaptive", "adaptive: every class for --warmup-steps steps, then only the classes "
                           "that may be outliers (anomaly index above --candidate-index) and one reference class "
                           "go on; full: every class until its own early stop (the original; 3-5x slower)",
                           choices=SCHEDULES)
    warmup_steps: int = option(12, "steps every class gets under the adaptive schedule", type=positive(int))
    candidate_index: float = option(1.0, "after the warm-up, classes whose anomaly index is above this go on "
                                    "being optimised (keep it below --threshold)")
    # the adaptive schedule stops every class here (trigger recovery refines further)
    candidate_steps: int = option(50, "under the adaptive schedule, no class is optimised for more steps than "
                                  "this", type=positive(int))
    # a warm-up over more classes than this uses mini-batches of batch_size * warmup_classes / K images
    warmup_classes: int = option(10, "a warm-up over more classes than this uses proportionally smaller "
                                 "mini-batches (as many optimiser steps), so that it costs what one over this "
                                 "many classes costs", type=positive(int))
    verdict: str = option("mask-norm", "what the MAD outlier test runs over: every class's best mask norm "
                          "(Neural Cleanse), or TABOR's trigger-quality metric of every class's best trigger "
                          "(size, compactness, attack success, accuracy with the trigger cut out, saliency "
                          "inside it); scan.json reports both", choices=VERDICTS)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        check_scale(self.anomaly_scale)
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; choose one of {', '.join(VERDICTS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 1 <= self.warmup_steps <= self.candidate_steps:
            raise ValueError(f"the warm-up needs between 1 and candidate_steps ({self.candidate_steps}) steps, "
                             f"got {self.warmup_steps}")
        if len(self.tabor_weights) != len(TABOR_TERMS) or any(w < 0 for w in self.tabor_weights):
            raise ValueError(f"TABOR needs {len(TABOR_TERMS)} weights >= 0 ({', '.join(TABOR_TERMS)}), "
                             f"got {list(self.tabor_weights)}")
        self.tabor_weights = tuple(float(w) for w in self.tabor_weights)

    @property
    def steps_per_class(self) -> int:
        """The most steps one class can run: the adaptive schedule's cap, or ``max_steps``."""
        return self.candidate_steps if self.schedule == "adaptive" else self.max_steps

    @property
    def mini_batches(self) -> int:
        return max(1, self.samples_per_step // self.batch_size)
