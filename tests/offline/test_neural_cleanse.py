from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from offline.scan.neural_cleanse import (
    ROLES,
    TABOR_TERMS,
    NeuralCleanseConfig,
    _ClassSchedule,
    _CostSchedule,
    anomaly_index,
    reverse_engineer_triggers,
    tabor_terms,
)


def test_anomaly_index_uses_mad_with_consistency_constant() -> None:
    norms = np.array([10.0, 50, 52, 48, 51, 49, 53, 47, 50, 50])
    ai = anomaly_index(norms, "linear")
    median = 50.0
    mad = 1.4826 * np.median(np.abs(norms - median))
    assert ai[0] == pytest.approx((median - 10) / mad)
    assert ai[0] > 2
    assert ai[6] < 0  # above the median: negative, never flagged
    assert np.all(ai[1:] <= 2)


def test_anomaly_index_of_identical_norms_is_zero() -> None:
    assert np.all(anomaly_index(np.full(5, 3.0)) == 0)
    assert np.all(anomaly_index(np.full(5, 3.0), "linear") == 0)


def test_log_scale_index_separates_a_small_patch_that_the_linear_index_misses() -> None:
    """Mask norms of a zoo model (BadNets 4x4 on class 3, one scan seed): large honest masks spread the
    linear MAD, so the 4x4 patch's mask sits under the threshold there and well above it on the log scale,
    which is the same median/MAD rule applied to log norms."""
    norms = np.array([84.89, 123.66, 79.85, 25.99, 104.72, 75.79, 88.5, 113.39, 59.81, 119.19])
    linear, log = anomaly_index(norms, "linear"), anomaly_index(norms)
    assert linear[3] < 2 < log[3]
    assert np.argmax(log) == 3 and np.delete(log, 3).max() < 1.5
    logs = np.log(norms)
    assert log[3] == pytest.approx((np.median(logs) - logs[3]) / (1.4826 * np.median(np.abs(logs - np.median(logs)))))
    with pytest.raises(ValueError, match="anomaly scale"):
        anomaly_index(norms, "sqrt")


def test_cost_schedule_follows_the_original() -> None:
    cfg = NeuralCleanseConfig()
    s = _CostSchedule(cfg)
    for _ in range(4):
        s.update(1.0, 100.0)
    assert s.cost == 0.0
    s.update(1.0, 100.0)  # fifth success in a row: cost initialised
    assert s.cost == pytest.approx(1e-3)
    for _ in range(5):
        s.update(1.0, 90.0)
    assert s.cost == pytest.approx(2e-3) and s.up_flag
    for _ in range(5):
        s.update(0.5, 80.0)  # failures: cost down by 2**1.5; failed steps are never "best"
    assert s.cost == pytest.approx(2e-3 / 2 ** 1.5) and s.down_flag
    assert s.reg_best == pytest.approx(90.0)


def test_early_stop_needs_both_directions_and_patience() -> None:
    cfg = NeuralCleanseConfig(early_stop_patience=3, patience=1)
    s = _CostSchedule(cfg)
    results = [s.update(1.0, 10.0)[1] for _ in range(6)]
    assert not any(results)  # only moved up so far
    s.update(0.0, 10.0)  # one failure moves the cost down
    assert s.down_flag
    assert s.update(1.0, 10.0)[1]  # no improvement for >= 3 steps and both flags: stop


class _Linear(torch.nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(36, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("method", ["neural-cleanse", "tabor"])
def test_batched_optimisation_equals_one_class_at_a_time(method: str) -> None:
    """Stacking classes is exact: same init and data give the same triggers (TABOR's terms included)."""
    model = _Linear().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = np.random.default_rng(0).random((200, 1, 6, 6)).astype(np.float32)
    cfg = NeuralCleanseConfig(max_steps=12, samples_per_step=64, patience=2, early_stop_patience=3, method=method,
                              tabor_weights=(1e-2, 1e-3, 1e-2, 1e-3, 1e-1, 1e-1))
    rng = np.random.default_rng(1)
    masks = rng.random((3, 6, 6)).astype(np.float32)
    patterns = rng.random((3, 1, 6, 6)).astype(np.float32)
    together = reverse_engineer_triggers(model, x, [0, 1, 2], cfg, init=(masks, patterns))
    for i in range(3):
        alone = reverse_engineer_triggers(model, x, [i], cfg, init=(masks[i:i + 1], patterns[i:i + 1]))
        np.testing.assert_allclose(together.masks[i], alone.masks[0], atol=1e-5)
        np.testing.assert_allclose(together.patterns[i], alone.patterns[0], atol=1e-5)
        assert together.steps[i] == alone.steps[0]


def test_tabor_terms_penalise_scattered_large_and_blocking_triggers() -> None:
    model = _Linear().eval()
    x = torch.from_numpy(np.random.default_rng(0).random((16, 1, 6, 6)).astype(np.float32))
    compact = torch.zeros(1, 1, 6, 6)
    compact[..., :2, :2] = 1.0
    scattered = torch.zeros(1, 1, 6, 6)
    scattered[..., ::3, ::3] = 1.0  # same L1 (4 pixels), no two neighbours
    pattern = torch.zeros(1, 1, 6, 6)
    pattern[..., :2, :2] = 1.0
    masks = torch.cat([compact, scattered])
    terms = tabor_terms(model, x, masks, pattern.repeat(2, 1, 1, 1), torch.tensor([0, 0]))
    assert terms.shape == (2, len(TABOR_TERMS))
    named = {name: terms[:, i] for i, name in enumerate(TABOR_TERMS)}
    assert torch.equal(named["mask_l2"], torch.tensor([4.0, 4.0]))
    assert named["mask_smoothness"][0] < named["mask_smoothness"][1]  # 8 edges against 16
    assert named["pattern_outside_mask"][0] == 0 and named["pattern_outside_mask"][1] > 0
    assert (named["blocking"] >= 0).all() and (named["overlay"] >= 0).all()
    skipped = tabor_terms(model, x, masks, pattern.repeat(2, 1, 1, 1), torch.tensor([0, 0]),
                          need=(1, 1, 1, 1, 0, 0))
    assert (skipped[:, 4:] == 0).all()


def test_tabor_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        NeuralCleanseConfig(method="strip")
    with pytest.raises(ValueError, match="6 weights"):
        NeuralCleanseConfig(method="tabor", tabor_weights=(1.0, 2.0))


def test_adaptive_schedule_spends_the_steps_on_classes_that_may_be_outliers() -> None:
    """After the warm-up only the outlier candidate and one reference go on; the classes set aside count with
    the reference's shrink since, so a candidate's longer optimisation alone cannot make it an outlier."""
    cfg = NeuralCleanseConfig(warmup_steps=3, candidate_index=1.0, candidate_steps=10)
    schedule = _ClassSchedule(cfg, 6)
    active = np.ones(6, bool)
    at_warmup = np.array([100.0, 95.0, 110.0, 90.0, 105.0, 30.0])  # class 5: far below the others
    schedule.after_step(2, at_warmup * 1.5, active)  # still warming up: everyone goes on
    assert active.all()
    schedule.after_step(3, at_warmup, active)
    assert schedule.roles == ["set aside", "set aside", "set aside", "reference", "set aside", "candidate"]
    assert active.tolist() == [False, False, False, True, False, True]
    later = at_warmup.copy()
    later[3] *= 0.9  # the reference shrank 10 %
    later[5] *= 0.9  # so did the candidate: relative to the others it is where it was
    verdict = schedule.verdict_norms(later)
    np.testing.assert_allclose(verdict[[0, 1, 2, 4]], at_warmup[[0, 1, 2, 4]] * 0.9)
    np.testing.assert_allclose(anomaly_index(verdict), anomaly_index(at_warmup), atol=1e-9)
    schedule.after_step(4, later, active)
    assert active[5] and active[3]
    schedule.after_step(10, later, active)  # the step budget ends every class
    assert not active.any()


def test_adaptive_schedule_stops_at_the_warmup_when_no_class_stands_out() -> None:
    cfg = NeuralCleanseConfig(warmup_steps=2)
    schedule = _ClassSchedule(cfg, 5)
    active = np.ones(5, bool)
    schedule.after_step(2, np.array([100.0, 97.0, 150.0, 200.0, 99.0]), active)  # none below index 1
    assert not active.any() and "candidate" not in schedule.roles


def test_adaptive_scan_reports_each_class_steps_and_role() -> None:
    model = _Linear().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = np.random.default_rng(0).random((200, 1, 6, 6)).astype(np.float32)
    cfg = NeuralCleanseConfig(samples_per_step=64, warmup_steps=4, candidate_steps=8)
    rev = reverse_engineer_triggers(model, x, [0, 1, 2], cfg)
    assert rev.roles is not None and len(rev.roles) == 3 and set(rev.roles) <= set(ROLES)
    assert rev.steps.max() <= 8 and rev.steps.min() >= 4
    full = reverse_engineer_triggers(model, x, [0, 1, 2], replace(cfg, schedule="full", max_steps=8))
    assert full.roles is None and (full.steps == 8).all()
    with pytest.raises(ValueError, match="schedule"):
        NeuralCleanseConfig(schedule="fast")
    with pytest.raises(ValueError, match="warm-up"):
        NeuralCleanseConfig(warmup_steps=60, candidate_steps=50)


def test_the_warmup_of_many_classes_costs_what_one_of_ten_costs() -> None:
    """Over more than ``warmup_classes`` classes the warm-up's mini-batches shrink, then come back."""
    seen: list[int] = []
    model = _Linear(classes=20).eval()
    model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    for p in model.parameters():
        p.requires_grad_(False)
    x = np.random.default_rng(0).random((400, 1, 6, 6)).astype(np.float32)
    cfg = NeuralCleanseConfig(samples_per_step=64, batch_size=32, warmup_steps=2, candidate_steps=3,
                              warmup_classes=10)
    reverse_engineer_triggers(model, x, list(range(20)), cfg)
    assert seen[:4] == [20 * 16] * 4  # 2 warm-up steps x 2 mini-batches: 16 images per class, not 32
    assert all(n % 32 == 0 for n in seen[4:])  # after the warm-up, whole mini-batches for the classes going on
