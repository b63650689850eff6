from __future__ import annotations

import numpy as np
import pytest

from guard.screening import (
    ActivationFilter,
    StripScreen,
    blend,
    entropy,
    normal_threshold,
    p_values,
    quantile_threshold,
    screen,
    softmax,
    softmax_entropy,
)


def test_entropy_of_certain_and_uniform_predictions() -> None:
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(entropy(probs), [0.0, np.log(4)], atol=1e-9)
    np.testing.assert_allclose(softmax(np.array([[0.0, 0.0]])), [[0.5, 0.5]])


def test_softmax_entropy_matches_the_entropy_of_softmax() -> None:
    logits = np.random.default_rng(0).normal(0, 8, (200, 10))
    logits[0] = [50.0] + [0.0] * 9  # near-certain: no log(0) trouble
    np.testing.assert_allclose(softmax_entropy(logits), entropy(softmax(logits)), atol=1e-9)


def test_model_batch_is_the_inputs_then_n_blends_of_distinct_pool_images() -> None:
    rng = np.random.default_rng(2)
    pool = rng.random((30, 1, 3, 3)).astype(np.float32) * 0.5
    x = rng.random((4, 1, 3, 3)).astype(np.float32) * 0.5
    strip = StripScreen(pool, n=6, threshold=0.0, rule="add", seed=3)
    batch = strip.model_batch(x)
    assert batch.shape == (4 + 4 * 6, 1, 3, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[:4], x)
    for i in range(4):
        blends = batch[4 + 6 * i:4 + 6 * (i + 1)]
        used = [int(np.argmin(np.abs(pool - (b - x[i])).reshape(30, -1).max(1))) for b in blends]
        np.testing.assert_allclose(blends, np.clip(x[i] + pool[used], 0, 1), atol=1e-6)
        assert len(set(used)) == 6  # drawn without replacement
    assert not np.array_equal(strip.model_batch(x)[4:], batch[4:])  # fresh draws every call


def test_blend_rules() -> None:
    x = np.full((1, 1, 2, 2), 0.7, np.float32)
    overlays = np.full((1, 3, 1, 2, 2), 0.5, np.float32)
    assert blend(x, overlays, "add").shape == (1, 3, 1, 2, 2)
    assert blend(x, overlays, "add").max() == 1.0  # pixel-wise sum, clipped to the range
    np.testing.assert_allclose(blend(x, overlays, "average"), 0.6)
    with pytest.raises(ValueError, match="blend rule"):
        blend(x, overlays, "multiply")


def test_thresholds_and_p_values() -> None:
    scores = np.random.default_rng(0).normal(1.0, 0.1, 10000)
    assert quantile_threshold(scores, 0.01, True) == pytest.approx(1.0 - 2.326 * 0.1, abs=0.01)
    assert normal_threshold(scores, 0.01, True) == pytest.approx(1.0 - 2.326 * 0.1, abs=0.01)
    assert normal_threshold(scores, 0.05, False) == pytest.approx(1.0 + 1.645 * 0.1, abs=0.01)
    p = p_values(scores, np.array([0.5, 1.0, 1.5]), low_is_suspicious=True)
    assert p[0] < 0.001 and 0.4 < p[1] < 0.6 and p[2] > 0.99


def _infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A toy model: class 0 whenever pixel (0, 0) is bright (the 'trigger'), else by mean brightness."""
    flat = x.reshape(len(x), -1)
    trig = flat[:, 0] > 0.9
    logits = np.stack([np.where(trig, 20.0, 0.0), 10 * flat[:, 1:].mean(1), 10 * (1 - flat[:, 1:].mean(1))], 1)
    return logits, np.stack([flat[:, 0] * 10, flat[:, 1:].mean(1)], 1)


def test_screen_flags_triggered_inputs_and_passes_clean_ones() -> None:
    rng = np.random.default_rng(1)
    pool = rng.random((50, 1, 4, 4)).astype(np.float32) * 0.5
    pool[:, 0, 0, 0] = 0.0
    clean = rng.random((20, 1, 4, 4)).astype(np.float32) * 0.5
    clean[:, 0, 0, 0] = 0.0
    triggered = clean.copy()
    triggered[:, 0, 0, 0] = 1.0
    strip = StripScreen(pool, n=8, threshold=0.1, rule="add", calibration_scores=np.linspace(0.2, 0.7, 20))
    af = ActivationFilter(np.array([0]), threshold=5.0, calibration_scores=np.zeros(20))
    ok = screen(_infer, clean, strip, af)
    bad = screen(_infer, triggered, strip, af)
    assert not ok.flagged.any()
    assert bad.strip.flagged.all() and bad.activation.flagged.all()
    assert np.all(bad.strip.p_values < 0.1) and np.all(ok.strip.p_values > 0.1)
    assert bad.logits.shape == (20, 3) and np.all(bad.logits.argmax(1) == 0)


def test_a_weighted_activation_filter_scores_the_weighted_sum() -> None:
    features = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=np.float32)
    mean = ActivationFilter(np.array([0, 2]), threshold=0.0)
    assert np.allclose(mean.scores(features), [2.0, 2.0])
    weighted = ActivationFilter(np.array([0, 1, 2]), threshold=0.0, weights=np.array([0.5, -1.0, 0.25]))
    assert np.allclose(weighted.scores(features), [-0.75, 2.0])
    with pytest.raises(ValueError, match="2 filter weights for 3 neurons"):
        ActivationFilter(np.array([0, 1, 2]), threshold=0.0, weights=np.array([1.0, 2.0]))


def test_strip_refuses_impossible_settings() -> None:
    pool = np.zeros((3, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="pool size"):
        StripScreen(pool, n=5, threshold=0.1)


def test_a_scoped_strip_screen_only_flags_inputs_answered_with_its_classes() -> None:
    rng = np.random.default_rng(4)
    pool = rng.random((20, 1, 2, 2)).astype(np.float32)
    strip = StripScreen(pool, n=4, threshold=0.5, classes=(1,))
    scores = np.array([0.1, 0.1, 0.9, 0.1])
    verdicts = strip.judge(scores, predicted=np.array([1, 0, 1, 2]))
    assert verdicts.flagged.tolist() == [True, False, False, False]
    assert StripScreen(pool, n=4, threshold=0.5).judge(scores).flagged.tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="needs the model's answers"):
        strip.judge(scores)
