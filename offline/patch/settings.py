"""The patch job's settings, torch-free: what ``trojan-forensics patch`` and Python callers set.

:class:`PatchSettings` holds the scan's (:class:`offline.scan.settings.NeuralCleanseConfig`), the repair's
(:class:`RepairSettings`) and the calibration's (:class:`CalibrationSettings`). Each field that is a flag
carries its help and its one default (:func:`offline.flags.option`); the CLI is generated from them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from guard.screens.registry import TRIGGER_FREE
from guard.screens.verdict import COMBINE_RULES, P_VALUES
from offline.flags import fraction, nonnegative_int, option, positive, share
from offline.scan.settings import NeuralCleanseConfig

OPTIMIZERS = ("sgd", "adam")
ACCURACY_RULES = ("broken", "change")
CLEAN_TARGETS = ("original", "labels")
# the repair methods (offline.patch.repair runs them), and "auto": the one default_method picks for the data size
METHODS = ("unlearn", "anp", "i-bau", "nad", "prune", "fine-prune", "none", "auto")


@dataclass
class RepairSettings:
    """Knobs of the repair methods, with the defaults the patch job uses."""

    method: str = option("auto", "repair method: unlearn (Neural Cleanse), anp (adversarial neuron pruning), "
                         "i-bau (implicit backdoor adversarial unlearning), nad (neural attention distillation), "
                         "prune, fine-prune, none, or auto: the method measured best for the number of clean "
                         "images the repair gets (docs/lab/repair.md; the job prints which and why)",
                         flag="--repair", choices=METHODS)
    # unlearning (Neural Cleanse): slice of the clean data, share stamped, most epochs
    unlearn_fraction: float = option(1.0, "share of the fit data to fine-tune on when unlearning", type=share)
    unlearn_stamp_share: float = option(0.2, "share of it stamped with the reversed trigger, true label kept",
                                        type=fraction)
    unlearn_epochs: int = option(10, "most unlearning epochs; stops once the reversed trigger's ASR on the "
                                 "calibration split is below --asr-bound with accuracy there back within "
                                 "--unlearn-accuracy-tolerance of the start, else keeps the best epoch",
                                 type=positive(int))
    unlearn_accuracy_tolerance: float = option(0.005, "clean accuracy an unlearning epoch may still be short of "
                                               "the start and stop", type=fraction)
    unlearn_grow: int = option(1, "half the stamped images get the reversed mask grown by this many pixels, to "
                               "unlearn the parts of the true trigger the smallest reversed mask leaves out (0: "
                               "never)", type=nonnegative_int)
    # what the unstamped images are fitted to: their labels, or ("original") the model's own answers before
    # repair (its softmax), which keeps its behaviour on clean inputs where a few hundred labels cannot
    unlearn_clean_targets: str = "original"
    # every image moved by up to this many pixels before stamping (0: never), more images from a few hundred
    unlearn_shift: int = 2
    optimizer: str = option("sgd", "fine-tuning optimiser for unlearning and fine-pruning: SGD with momentum 0.9, "
                            "or Adam", flag="--repair-optimizer", choices=OPTIMIZERS)
    lr: float = option(3e-3, "fine-tuning learning rate (1e-3 suits adam)", flag="--repair-lr",
                       type=positive(float))
    batch_size: int = 32
    asr_bound: float = option(0.02, "pruning and unlearning stop once the reversed trigger's ASR is below this",
                              type=fraction)
    accuracy_budget: float = option(0.015, "pruning never costs more clean accuracy than this; unlearning that "
                                    "never reaches --asr-bound keeps its best epoch within it", type=fraction)
    accuracy_rule: str = option("broken", "how the stop rules read accuracy on the calibration split: broken (the "
                                "share of images the model answered right before repair and wrong now; a few "
                                "lucky fixes cannot hide damage) or change (accuracy now against before)",
                                choices=ACCURACY_RULES)
    give_up_loss: float = option(0.05, "a training repair (unlearn, i-bau, nad) whose most accurate epoch still "
                                 "lost more clean accuracy than this on the calibration split leaves the model "
                                 "unrepaired", type=fraction)
    fine_tune_epochs: int = option(1, "fine-pruning's clean epochs after the dormant channels are pruned",
                                   type=positive(int))
    # ANP (Wu & Wang 2021): mask optimisation steps, perturbation bound, weight of the clean loss, mask
    # learning rate; neurons whose mask ends below anp_threshold are pruned (and more while the reversed
    # trigger still works, within the accuracy budget)
    anp_iterations: int = 500
    anp_eps: float = 0.4
    anp_alpha: float = 0.2
    anp_lr: float = 0.2
    anp_threshold: float = 0.2
    # I-BAU (Zeng et al. 2022): rounds (each: a universal adversarial perturbation, then one pass of
    # hypergradient steps), the perturbation's L2 radius as a share of the median clean image's norm, the
    # share of each batch that carries it, fixed-point iterations of the implicit gradient
    ibau_rounds: int = 10
    ibau_radius: float = 0.25
    ibau_share: float = 0.2
    ibau_fixed_point: int = 5
    # NAD (Li et al. 2021): the teacher's clean fine-tuning epochs, the student's epochs, attention weight
    nad_teacher_epochs: int = 5
    nad_epochs: int = 10
    nad_beta: float = 5000.0
    seed: int = 0


FILTER_USE = ("auto", "always", "off")
STRIP_CANDIDATES = (5, 10, 20, 50, 100)  # STRIP's n: the paper's rule picks among these
FILTER_CANDIDATES = (0.01, 0.02, 0.05, 0.1, 0.2)  # shares of neurons the filter's mean score may watch


def detector_list(text: str) -> tuple[str, ...]:
    """``--detectors``: trigger-free detectors, comma-separated."""
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in TRIGGER_FREE]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown detector(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(TRIGGER_FREE)} (the activation filter: --filter)")
    return names


@dataclass
class CalibrationSettings:
    frr: float = option(0.01, "the share of clean traffic the guard may refuse, in total: every detector's "
                        "p-value is combined into one verdict calibrated at this rate", type=fraction)
    # measured in docs/lab/guard-detectors.md
    rule: str = option("fisher-cauchy", "how the detectors' p-values combine (guard.screens.verdict): fisher "
                       "(-sum log p: detectors that agree a little add up), cauchy (Liu & Xie's Cauchy "
                       "combination, p clipped at 1/2: one strong detector is enough), fisher-cauchy (the more "
                       "significant of the two; needs --p-values fitted) or min (the smallest)", flag="--combine",
                       choices=COMBINE_RULES)
    p_values: str = option("fitted", "each detector's p-value: fitted (a tail probability against its clean "
                           "scores on the fit split; the combined statistic ranked among the calibration images': "
                           "no ties, so one detector's evidence counts in full) or bag (its rank among the "
                           "calibration images and the input: full conformal)", choices=P_VALUES)
    detectors: tuple[str, ...] = option(("strip", "knn"), "trigger-free detectors, comma-separated, from "
                                        + ", ".join(TRIGGER_FREE) + " (the measured best pair: "
                                        "docs/lab/guard-detectors.md)", type=detector_list)
    filter: str = option("auto", "the activation filter, which needs the scan's reversed trigger: auto joins "
                         "the verdict only when the scan flagged a class; always also watches the most anomalous "
                         "class's trigger when nothing was flagged; off", choices=FILTER_USE)
    strip_n: int | None = option(None, "STRIP's blends per input", type=positive(int),
                                 default_text="the paper's rule, the smallest of "
                                              + "/".join(map(str, STRIP_CANDIDATES))
                                              + " at which the spread of clean entropies has flattened")
    strip_candidates: tuple[int, ...] = STRIP_CANDIDATES
    strip_group: int | None = option(None, "sequential STRIP: blends per round, each input stopping once its "
                                     "verdict is settled (0: all n blends at once)", type=nonnegative_int,
                                     default_text="n/10 from n=20")
    strip_z: float = 3.0
    strip_by_class: bool = option(True, "standardise STRIP's entropy within the predicted class, from the fit "
                                  "split's clean images; --no-strip-by-class: the paper's raw entropy (catches "
                                  "more attacks aimed at a low-entropy class, refuses more clean images of it: "
                                  "docs/lab/guard-detectors.md)")
    blend_rule: str = option("add", "add: pixel-wise sum clipped to range, as in the paper; average: mean",
                             choices=("add", "average"))
    scope: str = option("all", "all: the guard judges every input; suspect: only inputs the model answers with a "
                        "flagged class, where a trigger must land to succeed, so the whole budget is spent there "
                        "(about 10x the refusals on that class, none elsewhere)", choices=("all", "suspect"),
                        aliases=("--strip-scope",))
    pool_size: int = option(200, "clean images STRIP blends with", type=positive(int))
    knn_k: int = option(5, "the k-NN detector's k", type=positive(int))
    filter_score: str = option("auto", "the activation filter's score: 'mean' activation of the neurons the "
                               "reversed trigger excites most (Neural Cleanse), 'lda' (a linear discriminant "
                               "between clean and stamped features over the whole layer, fitted on the fit "
                               "split), or 'auto': the candidate that separates clean from stamped calibration "
                               "images best (AUROC), the simplest within 0.005 of the best",
                               choices=("auto", "mean", "lda"))
    filter_top_share: float | None = option(None, "share of features neurons the mean score watches, at least "
                                            "one", type=fraction, default_text="tries each of "
                                            + ", ".join(f"{100 * c:g} %" for c in FILTER_CANDIDATES))
    filter_candidates: tuple[float, ...] = FILTER_CANDIDATES
    # expert overrides: a detector that also refuses on its own at this rate (a budget outside --frr)
    strip_frr: float | None = option(None, "expert override: STRIP also refuses on its own at this rate, a budget "
                                     "on top of --frr", type=fraction, default_text="never")
    filter_fpr: float | None = option(None, "expert override: the activation filter also refuses on its own at "
                                      "this rate, on top of --frr", type=fraction, default_text="never")
    seed: int = 0


# the calibration split's size where the data allows (auto_calibration_fraction)
CALIBRATION_IMAGES = 500


@dataclass
class PatchSettings:
    scan: NeuralCleanseConfig = field(default_factory=NeuralCleanseConfig)
    anomaly_threshold: float = option(2.0, "anomaly index above which a class is flagged", flag="--threshold",
                                      type=positive(float))
    repeats: int = option(1, "scan runs with seeds seed, seed+1, ...; the verdict uses the median index and "
                          "scan.json reports the spread", type=positive(int))
    recover_restarts: int = option(3, "trigger recovery also reverse-engineers each flagged class alone from "
                                   "this many random starts and keeps the smallest trigger found (the scan's "
                                   "single random start can settle on a looser one)", type=nonnegative_int)
    repair: RepairSettings = field(default_factory=RepairSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    calibration_fraction: float | None = option(
        None, "share of the clean data that calibrates the verdict", type=fraction,
        default_text=f"{CALIBRATION_IMAGES} images where the data allows, between 20 and 40 %")
    test_fraction: float = 0.2
    split_seed: int = 0
    model_name: str = option("model", "name clients address the model by through the guard")
    policy: str = option("enforce", "what the guard does with a flagged request unless its --policy overrides: "
                         "refuse it (enforce), answer with the verdict (flag), or only count it (shadow)",
                         choices=("enforce", "flag", "shadow"))
    signing_key: str | None = option(None, "Ed25519 private key from 'trojan-forensics keygen': sign guard.json "
                                     "(which holds every file's SHA-256) into guard.json.sig, for 'trojan-guard "
                                     "serve --trusted-key'", default_text="unsigned")
    bundle_version: int | None = option(None, "guard.json's bundle_version, under the signature: 'trojan-guard "
                                        "serve/inspect --min-bundle-version' refuse bundles below it and a reload "
                                        "below the serving one is a rollback", type=nonnegative_int, metavar="N",
                                        default_text="the creation time in Unix seconds, so a later job's is "
                                                     "higher")
