"""Each repair method on a real BadNets model, with the true trigger standing in for the reversed one."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from offline.attacks import BackdoorResult, PatchTrigger
from offline.models import ForensicModel
from offline.patch.repair import Evaluator, RepairSettings, repair


@pytest.fixture()
def setup(badnets_model: BackdoorResult, mnist_splits):
    model = ForensicModel(copy.deepcopy(badnets_model.model), "body.8")
    clean = mnist_splits[1]
    rest, test = clean.split(0.2, seed=0)
    fit, select = rest.split(0.25, seed=1)
    mask, pattern = PatchTrigger(4).mask_and_pattern((1, 28, 28))
    target = badnets_model.target
    return (model, fit, Evaluator(select.x, select.y, target, mask[0], pattern),
            Evaluator(test.x, test.y, target, mask[0], pattern, PatchTrigger(4)))


@pytest.mark.parametrize("optimizer,lr", [("sgd", 3e-3), ("adam", 1e-3)])
def test_unlearning_removes_the_backdoor(setup, optimizer: str, lr: float) -> None:
    model, fit, select, measure = setup
    report = repair(model, fit.x, fit.y, select, measure, RepairSettings(method="unlearn", optimizer=optimizer, lr=lr))
    assert report.before.true_asr > 0.95
    assert report.after.true_asr < 0.05
    assert report.before.accuracy - report.after.accuracy < 0.03
    kept = report.details["curve"][report.details["kept_epoch"] - 1]
    assert report.details["epochs"] <= 10 and kept["reversed_asr"] < 0.02


def test_unlearning_stops_only_once_accuracy_is_back(setup) -> None:
    model, fit, select, measure = setup
    baseline = select(model).accuracy
    report = repair(model, fit.x, fit.y, select, measure, RepairSettings(method="unlearn", optimizer="adam",
                                                                          lr=3e-3))
    curve = report.details["curve"]

    def loss(c: dict) -> float:  # what the stop rule charges (accuracy_rule "broken", the default)
        return c["broken"] if c["broken"] is not None else baseline - c["accuracy"]

    # every epoch before the last either still obeyed the reversed trigger or had not won back its accuracy
    for c in curve[:-1]:
        assert c["reversed_asr"] >= 0.02 or loss(c) > 0.005, c
    if report.details["reached_bound"]:
        assert loss(curve[-1]) <= 0.005 and curve[-1]["reversed_asr"] < 0.02


def test_unlearning_that_never_reaches_the_bound_keeps_its_best_epoch(setup) -> None:
    model, fit, select, measure = setup
    baseline = select(model).accuracy
    s = RepairSettings(method="unlearn", asr_bound=0.0, unlearn_epochs=3)  # a bound no epoch can reach
    report = repair(model, fit.x, fit.y, select, measure, s)
    curve = report.details["curve"]
    assert report.details["epochs"] == 3 and not report.details["reached_bound"]
    within = [c for c in curve if c["broken"] <= s.accuracy_budget]
    best = min(within, key=lambda c: c["reversed_asr"]) if within else max(curve, key=lambda c: c["accuracy"])
    assert baseline - best["accuracy"] <= s.give_up_loss  # else the model before training would be kept
    assert report.details["kept_epoch"] == best["epoch"]
    now = select(model)  # the model holds that epoch's weights, not the last epoch's
    assert (now.accuracy, now.reversed_asr) == (best["accuracy"], best["reversed_asr"])


def test_a_repair_whose_every_epoch_wrecks_accuracy_leaves_the_model_as_it_was(setup) -> None:
    model, fit, select, measure = setup
    before = select(model)
    s = RepairSettings(method="unlearn", unlearn_epochs=2, lr=0.5)  # a rate that wrecks every epoch
    report = repair(model, fit.x, fit.y, select, measure, s)
    assert report.details["kept_epoch"] == 0 and not report.details["reached_bound"]
    after = select(model)
    assert (after.accuracy, after.reversed_asr, after.agreement) == (before.accuracy, before.reversed_asr, 1.0)


def test_grow_mask_dilates_by_whole_pixels() -> None:
    import torch

    from offline.patch.repair import grow_mask

    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1.0
    assert grow_mask(mask, 0) is mask
    grown = grow_mask(mask, 1)
    assert grown.shape == mask.shape and grown.sum() == 9 and grown[0, 2:5, 2:5].eq(1).all()
    assert grow_mask(mask, 2).sum() == 25


def test_pruning_stays_within_the_accuracy_budget(setup) -> None:
    model, fit, select, measure = setup
    s = RepairSettings(method="prune", accuracy_budget=0.015)
    report = repair(model, fit.x, fit.y, select, measure, s)
    curve = report.details["curve"]
    assert len(report.details["pruned_units"]) == len(curve) - 1
    assert all(curve[0]["accuracy"] - c["accuracy"] <= 0.015 for c in curve)
    masked = model.output_masks["body.8"]
    assert int((masked == 0).sum()) == len(report.details["pruned_units"])


def test_fine_pruning_silences_dormant_channels_then_fine_tunes(setup) -> None:
    model, fit, select, measure = setup
    report = repair(model, fit.x, fit.y, select, measure, RepairSettings(method="fine-prune"))
    assert report.details["layer"] == "body.3"
    assert 0 < len(report.details["pruned_channels"]) < 16
    assert report.before.accuracy - report.after.accuracy < 0.03
    assert np.all(model.output_masks["body.3"].numpy()[report.details["pruned_channels"]] == 0)


def test_unknown_method_is_refused(setup) -> None:
    from offline.errors import ForensicsError

    model, fit, select, measure = setup
    with pytest.raises(ForensicsError, match="unknown repair method"):
        repair(model, fit.x, fit.y, select, measure, RepairSettings(method="magic"))


def test_unknown_optimizer_is_refused(setup) -> None:
    from offline.errors import ForensicsError

    model, fit, select, measure = setup
    with pytest.raises(ForensicsError, match="unknown optimizer 'rmsprop'"):
        repair(model, fit.x, fit.y, select, measure, RepairSettings(optimizer="rmsprop"))


def test_the_cli_offers_every_repair_method() -> None:
    from offline.cli import build_parser
    from offline.flags import settings_from
    from offline.patch.repair import METHODS

    parser = build_parser()
    for method in METHODS:
        args = parser.parse_args(["patch", "--model", "m.pt", "--out", "o", "--repair", method])
        assert settings_from(args, RepairSettings).method == method


def test_anp_prunes_by_its_masks_within_the_budget(setup) -> None:
    model, fit, select, measure = setup
    baseline = select(model).accuracy
    s = RepairSettings(method="anp", anp_iterations=150)
    report = repair(model, fit.x, fit.y, select, measure, s)
    d = report.details
    assert d["layers"] == ["body.0", "body.3", "body.7"] and d["neurons"] == 8 + 16 + 64
    values = [v for layer in d["layers"] for v in d["mask_values"][layer]]
    assert len(values) == d["neurons"] and min(values) >= 0.0 and max(values) <= 1.0
    # pruned in the order of the learnt masks, each pruned neuron silenced in the model's forward pass
    assert baseline - select(model).accuracy <= s.accuracy_budget
    for name in d["pruned"]:
        layer, unit = name[:-1].split("[")
        assert float(model.output_masks[layer][int(unit)]) == 0.0
    assert all(baseline - c["accuracy"] <= s.accuracy_budget for c in d["curve"])
    assert report.after.true_asr <= report.before.true_asr


def test_ibau_keeps_a_round_within_the_budget_or_the_model_as_it_was(setup) -> None:
    model, fit, select, measure = setup
    start = select(model)
    s = RepairSettings(method="i-bau", ibau_rounds=3)
    report = repair(model, fit.x, fit.y, select, measure, s)
    d = report.details
    assert report.before.true_asr > 0.95
    assert d["epochs"] <= 3 and all(n <= d["radius"] + 1e-3 for n in d["perturbation_norms"])
    now = select(model)
    if d["kept_epoch"]:
        kept = d["curve"][d["kept_epoch"] - 1]
        assert (now.accuracy, now.reversed_asr) == (kept["accuracy"], kept["reversed_asr"])
        if not d["reached_bound"]:  # the rule's best round: lowest reversed ASR within the budget, else most accurate
            within = [c for c in d["curve"] if c["broken"] <= s.accuracy_budget]
            best = min(within, key=lambda c: c["reversed_asr"]) if within else \
                max(d["curve"], key=lambda c: c["accuracy"])
            assert kept["reversed_asr"] == best["reversed_asr"] and kept["accuracy"] == best["accuracy"]
            assert start.accuracy - kept["accuracy"] <= s.give_up_loss
    else:  # every round lost more than give_up_loss
        assert all(start.accuracy - c["accuracy"] > s.give_up_loss for c in d["curve"])
        assert (now.accuracy, now.reversed_asr, now.agreement) == (start.accuracy, start.reversed_asr, 1.0)


def test_ibau_hypergradient_adds_the_implicit_term(setup) -> None:
    import torch
    import torch.nn.functional as F

    from offline.patch.repair.ibau import _hypergradient, universal_perturbation

    model, fit, _, _ = setup
    x, y = torch.from_numpy(fit.x[:64]), torch.from_numpy(fit.y[:64])
    delta = universal_perturbation(model, x, y, 2.0, np.random.default_rng(0), steps=5)
    assert float(delta.norm()) <= 2.0 + 1e-4
    model.unfreeze()
    params = [p for p in model.net.parameters() if p.requires_grad]
    half = torch.ones(32, 1, 1, 1)
    direct = _hypergradient(model, params, delta, (x[:32], y[:32]), (x[32:], y[32:]), half, 0)
    full = _hypergradient(model, params, delta, (x[:32], y[:32]), (x[32:], y[32:]), half, 5)
    plain = torch.autograd.grad(F.cross_entropy(model(x[32:] + delta), y[32:]), params)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(direct, plain, strict=True))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(direct, full, strict=True))


def test_nad_distills_attention_from_a_fine_tuned_teacher(setup) -> None:
    model, fit, select, measure = setup
    baseline = select(model).accuracy
    s = RepairSettings(method="nad", nad_teacher_epochs=2, nad_epochs=2)
    report = repair(model, fit.x, fit.y, select, measure, s)
    d = report.details
    assert d["layers"] == ["body.0", "body.3"] and set(d["teacher"]) == {"accuracy", "reversed_asr"}
    assert d["epochs"] <= 2
    # the epoch kept is within the accuracy budget whenever one was
    if any(baseline - c["accuracy"] <= s.accuracy_budget for c in d["curve"]):
        assert baseline - select(model).accuracy <= s.accuracy_budget


def test_auto_picks_the_method_for_the_data_size_and_says_why(setup) -> None:
    from offline.patch.repair import default_method

    model, fit, select, measure = setup
    report = repair(model, fit.x, fit.y, select, measure, RepairSettings(unlearn_epochs=1))
    method, why = default_method(len(fit))
    assert report.method == method and report.details["chosen_by"] == why and str(len(fit)) in why
    assert report.before.agreement == 1.0 and 0.0 < report.after.agreement <= 1.0


def test_unlearning_keeps_the_clean_answers_it_fits_to(setup) -> None:
    """Fitted to the model's own answers on clean images, unlearning changes few of them on held-out data."""
    model, fit, select, measure = setup
    report = repair(model, fit.x, fit.y, select, measure, RepairSettings(method="unlearn"))
    assert report.after.true_asr < 0.05
    assert report.after.agreement > 0.97
    low, high = report.after.change_interval
    assert low < report.after.accuracy - report.before.accuracy < high and high - low < 0.05
