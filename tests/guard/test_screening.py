from __future__ import annotations

import numpy as np
import pytest

from guard.screens import (
    ActivationFilter,
    KnnDensity,
    MahalanobisDensity,
    OneBudget,
    Screen,
    StripScreen,
    blend,
    entropy,
    guarantee,
    softmax,
    softmax_entropy,
)
from tests.toy import toy_images as _images
from tests.toy import toy_infer as _infer


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
    strip = StripScreen(pool, n=6, rule="add", seed=3)
    batch, spans = Screen([strip]).model_batch(x)
    assert batch.shape == (4 + 4 * 6, 1, 3, 3) and batch.dtype == np.float32
    assert spans[id(strip)] == (4, 28)
    np.testing.assert_array_equal(batch[:4], x)
    for i in range(4):
        blends = batch[4 + 6 * i:4 + 6 * (i + 1)]
        used = [int(np.argmin(np.abs(pool - (b - x[i])).reshape(30, -1).max(1))) for b in blends]
        np.testing.assert_allclose(blends, np.clip(x[i] + pool[used], 0, 1), atol=1e-6)
        assert len(set(used)) == 6  # drawn without replacement
    assert not np.array_equal(strip.extra_rows(x), batch[4:])  # fresh draws every call


def test_blend_rules() -> None:
    x = np.full((1, 1, 2, 2), 0.7, np.float32)
    overlays = np.full((1, 3, 1, 2, 2), 0.5, np.float32)
    assert blend(x, overlays, "add").shape == (1, 3, 1, 2, 2)
    assert blend(x, overlays, "add").max() == 1.0  # pixel-wise sum, clipped to the range
    np.testing.assert_allclose(blend(x, overlays, "average"), 0.6)
    with pytest.raises(ValueError, match="blend rule"):
        blend(x, overlays, "multiply")


@pytest.mark.parametrize("rule, fitted", [(r, f) for r in ("cauchy", "fisher", "min") for f in (False, True)]
                         + [("fisher-cauchy", True)])
def test_one_budget_refuses_clean_inputs_at_most_at_its_rate(rule: str, fitted: bool) -> None:
    """The conformal guarantee: over calibration draws, clean refusals average at most floor(R(n+1))/(n+1),
    whatever the detectors' dependence (here two correlated columns and one independent)."""
    rng = np.random.default_rng(0)

    def clean(n: int) -> np.ndarray:
        z = rng.normal(size=(n, 3))
        z[:, 1] += 0.8 * z[:, 0]
        return z

    rates = []
    for _ in range(150):
        budget = OneBudget(("a", "b", "c"), ("high", "low", "high"), clean(99), 0.05, rule,
                           reference=clean(200) if fitted else None)
        rates.append(budget.judge(clean(400)).flagged.mean())
    assert guarantee(99, 0.05)["expected_frr"] == 0.05
    assert 0.02 < np.mean(rates) <= 0.05 + 0.006  # 0.006: three standard errors of the mean


def test_one_budget_refuses_strong_evidence_from_either_detector() -> None:
    rng = np.random.default_rng(1)
    cal = rng.normal(size=(300, 2))
    fisher = OneBudget(("strip", "knn"), ("low", "high"), cal, 0.01)
    # far out for one detector and a little unusual for the other; clean for both; far out for both
    scores = np.array([[-6.0, 0.8], [-0.8, 6.0], [0.0, 0.0], [-3.0, 3.0]])
    j = fisher.judge(scores)
    assert j.flagged.tolist() == [True, True, False, True]
    assert j.p_value[2] > 0.2 and j.p_value[0] <= 0.01
    assert j.detectors_of(0) == ("strip",) and j.detectors_of(1) == ("knn",)
    np.testing.assert_allclose(j.p_values[0, 0], 1 / 301)
    # Fisher's rule needs some support from the other detector (its ranks cannot go below 1/(n+1)); the
    # min rule refuses one detector's extreme alone
    alone = np.array([[-6.0, 0.0]])
    assert not fisher.judge(alone).flagged[0]
    assert OneBudget(("strip", "knn"), ("low", "high"), cal, 0.01, "min").judge(alone).flagged[0]


def test_cauchy_lets_one_detector_refuse_even_when_another_looks_the_other_way() -> None:
    """WaNet and all-to-all triggers sit in STRIP's high-entropy tail (its p-value near 1) while k-NN has them
    beyond every clean image: Fisher's sum is pulled back under the threshold, the Cauchy rule is not; and two
    moderate signals that min-p alone would pass add up under Cauchy as under Fisher."""
    cal = np.random.default_rng(1).normal(size=(500, 2))
    rules = {r: OneBudget(("strip", "knn"), ("low", "high"), cal, 0.01, r) for r in ("cauchy", "fisher", "min")}
    wanet_like = np.array([[2.5, 6.0]])  # STRIP: far on the clean side; k-NN: beyond every clean image
    assert not rules["fisher"].judge(wanet_like).flagged[0]
    assert rules["cauchy"].judge(wanet_like).flagged[0] and rules["min"].judge(wanet_like).flagged[0]
    both = np.array([[-2.3, 2.3]])  # each about the 1 % tail alone: not enough for min-p's factor of two
    assert rules["cauchy"].judge(both).flagged[0] and rules["fisher"].judge(both).flagged[0]
    assert not rules["min"].judge(both).flagged[0]
    clean = np.random.default_rng(2).normal(size=(20000, 2))
    assert rules["cauchy"].judge(clean).flagged.mean() <= 0.0125


def test_fisher_cauchy_refuses_what_either_rule_refuses() -> None:
    """The default: one sure detector against a contrary one (WaNet) as Cauchy, three detectors that each agree
    a little (an invisible trigger) as Fisher; and only with fitted p-values."""
    rng = np.random.default_rng(9)
    names, sides = ("strip", "knn", "activation"), ("low", "high", "high")
    cal, ref = rng.normal(size=(500, 3)), rng.normal(size=(800, 3))
    rules = {r: OneBudget(names, sides, cal, 0.01, r, reference=ref) for r in ("cauchy", "fisher", "fisher-cauchy")}
    one_sure = np.array([[2.5, 3.0, -2.0]])
    all_a_little = np.array([[-1.8, 1.8, 1.8]])
    assert rules["cauchy"].judge(one_sure).flagged[0] and not rules["fisher"].judge(one_sure).flagged[0]
    assert rules["fisher"].judge(all_a_little).flagged[0] and not rules["cauchy"].judge(all_a_little).flagged[0]
    assert rules["fisher-cauchy"].judge(np.r_[one_sure, all_a_little]).flagged.all()
    with pytest.raises(ValueError, match="needs fitted p-values"):
        OneBudget(names, sides, cal, 0.01, "fisher-cauchy")


@pytest.mark.parametrize("rule", ["fisher-cauchy", "cauchy", "fisher", "min"])
def test_a_clean_outlier_far_beyond_the_reference_does_not_blind_the_verdict(rule: str) -> None:
    """Five detectors; one clean calibration image lies thousands of reference spreads out on one of them
    (a SCALE-UP or IBD-PSC score of an odd clean image). Its tail probability underflows to 0, and so did a
    triggered input's on another detector: the two statistics tied at the floor and the input, not first
    among the calibration images, was answered (the signs ResNet's verdict with SCALE-UP and IBD-PSC let
    every BadNets input through). In log space the more extreme one ranks first."""
    rng = np.random.default_rng(3)
    names = ("strip", "knn", "scale_up", "ibd_psc", "activation")
    sides = ("low", "high", "high", "high", "high")
    cal, ref = rng.normal(size=(99, 5)), rng.normal(size=(600, 5))
    cal[0, 3] = 2000.0  # far beyond every reference on one detector
    budget = OneBudget(names, sides, cal, 0.01, rule, reference=ref)
    assert budget.guarantee["flag_rank"] == 1  # only the first of the 100 can be refused
    triggered = np.array([[-20000.0, 5000.0, 0.0, 0.0, 8000.0]])
    judged = budget.judge(triggered)
    assert judged.p_values[0, 0] == 0.0  # the probability itself underflows ...
    assert judged.flagged[0] and judged.p_value[0] == pytest.approx(1 / 100)  # ... its logarithm does not
    assert not budget.judge(rng.normal(size=(50, 5))).flagged.any()


def test_fitted_p_values_let_one_detector_use_every_refusal_the_budget_allows() -> None:
    """Two clean calibration images far out on k-NN (as wanet-a's have): in the bag an input third on k-NN ties
    with STRIP's third and is answered; against the fit split's tail it is refused, and the tail keeps
    ordering scores beyond every reference instead of flooring at 1/(m+1)."""
    rng = np.random.default_rng(6)
    cal, ref = rng.normal(size=(500, 2)), rng.normal(size=(700, 2))
    cal[:2, 1] = [6.0, 5.0]
    x = np.array([[1.0, 3.2]])
    for rule in ("min", "cauchy"):
        assert not OneBudget(("strip", "knn"), ("low", "high"), cal, 0.01, rule).judge(x).flagged[0]
        fitted = OneBudget(("strip", "knn"), ("low", "high"), cal, 0.01, rule, reference=ref)
        assert fitted.judge(x).flagged[0]
    far = fitted.judge(np.array([[0.0, 8.0], [0.0, 9.0]])).p_values[:, 1]
    assert far[1] < far[0] < 1 / 701
    with pytest.raises(ValueError, match="at least 20 reference"):
        OneBudget(("strip",), ("low",), cal[:, :1], 0.01, reference=ref[:5, :1])


def test_one_budget_refuses_budgets_its_calibration_cannot_express() -> None:
    assert guarantee(50, 0.01)["flag_rank"] == 0  # 1/51 > 1 %: no clean input could ever be refused
    with pytest.raises(ValueError, match="budget must lie in"):
        OneBudget(("a",), ("high",), np.zeros((10, 1)), 0.0)
    with pytest.raises(ValueError, match="side"):
        OneBudget(("a",), ("up",), np.zeros((10, 1)), 0.1)


def test_a_scoped_budget_only_refuses_inputs_answered_with_its_classes() -> None:
    rng = np.random.default_rng(4)
    cal = rng.normal(size=(200, 1))
    classes = np.arange(200) % 4
    budget = OneBudget(("strip",), ("low",), cal, 0.01, classes=(1,), calibration_classes=classes)
    assert budget.rate == pytest.approx(0.04)  # the overall 1 % lands on the quarter answered as class 1
    j = budget.judge(np.array([[-9.0], [-9.0], [0.0]]), predicted=np.array([1, 0, 1]))
    assert j.flagged.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="needs the model's answers"):
        budget.judge(np.array([[-9.0]]))


def test_an_expert_override_refuses_on_its_own_rate_too() -> None:
    cal = np.random.default_rng(5).normal(size=(500, 2))
    plain = OneBudget(("strip", "knn"), ("low", "high"), cal, 0.01)
    override = OneBudget(("strip", "knn"), ("low", "high"), cal, 0.01, alone=(0.2, None))
    x = np.array([[-1.2, 0.0]])  # a fifth of the way into STRIP's low tail, nothing for k-NN
    assert not plain.judge(x).flagged[0] and override.judge(x).flagged[0]


def test_screen_flags_triggered_inputs_and_passes_clean_ones() -> None:
    rng = np.random.default_rng(1)

    def images(n: int) -> np.ndarray:
        return _images(rng, n)

    pool, calibration, clean = images(50), images(200), images(20)
    triggered = clean.copy()
    triggered[:, 0, 0, 0] = 1.0
    detectors = [StripScreen(pool, n=8), ActivationFilter(np.array([0]))]
    scores, _ = Screen(detectors).score(_infer, calibration)
    screen = Screen(detectors, OneBudget(("strip", "activation"), ("low", "high"), scores, 0.02))
    ok, bad = screen.run(_infer, clean), screen.run(_infer, triggered)
    assert not ok.flagged.any() and bad.flagged.all()
    assert np.all(bad.judgement.p_value <= 0.02) and np.all(ok.judgement.p_value > 0.02)
    assert bad.logits.shape == (20, 3) and np.all(bad.logits.argmax(1) == 0)
    assert bad.scores.shape == (20, 2)


def test_a_weighted_activation_filter_scores_the_weighted_sum() -> None:
    features = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=np.float32)
    assert np.allclose(ActivationFilter(np.array([0, 2])).feature_scores(features), [2.0, 2.0])
    weighted = ActivationFilter(np.array([0, 1, 2]), weights=np.array([0.5, -1.0, 0.25]))
    assert np.allclose(weighted.feature_scores(features), [-0.75, 2.0])
    with pytest.raises(ValueError, match="2 filter weights for 3 neurons"):
        ActivationFilter(np.array([0, 1, 2]), weights=np.array([1.0, 2.0]))


def test_density_detectors_score_features_far_from_their_predicted_class_high() -> None:
    rng = np.random.default_rng(6)
    centres = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    labels = np.repeat([0, 1], 100)
    reference = centres[labels] + rng.normal(0, 0.3, (200, 3))
    knn = KnnDensity(reference, labels, k=5)
    means = np.stack([reference[labels == k].mean(0) for k in (0, 1)])
    maha = MahalanobisDensity(means, np.linalg.inv(np.cov((reference - means[labels]).T)))
    # a class-1 answer from class-0 features: where a trigger puts an input
    features = np.array([[5.0, 0.1, 0.0], [5.0, 0.1, 0.0]])
    predicted = np.array([0, 1])
    for det in (knn, maha):
        near, far = det.feature_scores(features, predicted)
        assert far > near * 3
    with pytest.raises(ValueError, match="k-NN needs"):
        KnnDensity(reference[:3], np.array([0, 0, 1]), k=2)


def test_strip_refuses_impossible_settings() -> None:
    pool = np.zeros((3, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="pool size"):
        StripScreen(pool, n=5)


def test_sequential_strip_reaches_the_fixed_n_verdict_with_fewer_passes() -> None:
    rng = np.random.default_rng(7)

    def images(n: int) -> np.ndarray:
        return _images(rng, n)

    pool, calibration, clean = images(60), images(300), images(200)
    triggered = clean[:50].copy()
    triggered[:, 0, 0, 0] = 1.0
    fixed = StripScreen(pool, n=40, seed=1)
    scores, _ = Screen([fixed]).score(_infer, calibration)
    per_blend = fixed.per_blend(_infer(fixed.extra_rows(calibration))[0])
    within = float(np.sqrt(per_blend.var(axis=1, ddof=1).mean()))
    budget = OneBudget(("strip",), ("low",), scores, 0.05)
    results = {}
    for group in (None, 5):
        strip = StripScreen(pool, n=40, seed=3, group=group, within_sd=within)
        screen = Screen([strip], budget)
        results[group] = (screen.run(_infer, clean), screen.run(_infer, triggered))
    (clean_fixed, trig_fixed), (clean_seq, trig_seq) = results[None], results[5]
    assert (clean_fixed.forward_passes == 41).all()
    assert clean_seq.forward_passes.mean() <= 0.5 * 41 and (clean_seq.forward_passes % 5 == 1).all()
    assert trig_seq.flagged.all() and trig_fixed.flagged.all()
    assert trig_seq.forward_passes.max() <= 11  # a trigger's verdict is settled in a round or two
    assert abs(clean_seq.flagged.mean() - clean_fixed.flagged.mean()) <= 0.02
    with pytest.raises(ValueError, match="group < n"):
        StripScreen(pool, n=10, group=10)
    # beside another detector's extra rows (SCALE-UP's copies), those go with STRIP's first round: the same
    # SCALE-UP scores as in one fixed call, and each input's rows count them once
    from guard.screens.scaleup import ScaleUpScreen

    scale_up = ScaleUpScreen((3.0, 11.0))
    both = OneBudget(("strip", "scale_up"), ("low", "high"), np.c_[scores, np.zeros(len(scores))], 0.05)
    seq = Screen([StripScreen(pool, n=40, seed=3, group=5, within_sd=within), scale_up], both).run(_infer, clean)
    alone = Screen([scale_up]).run(_infer, clean, judge=False)
    np.testing.assert_allclose(seq.scores[:, 1], alone.scores[:, 0])
    assert (seq.forward_passes % 5 == 3).all() and seq.forward_passes.min() >= 1 + 2 + 5


def test_knn_reference_scores_leave_each_reference_out() -> None:
    rng = np.random.default_rng(8)
    ref, labels = rng.normal(size=(40, 6)), np.arange(40) % 2
    knn = KnnDensity(ref, labels, k=3)
    loo = knn.reference_scores(chunk=7)
    for i in (0, 13, 39):
        keep = np.arange(40) != i
        alone = KnnDensity(ref[keep], labels[keep], k=3).feature_scores(ref[i:i + 1], labels[i:i + 1])
        np.testing.assert_allclose(loo[i], alone[0], rtol=1e-5)


def test_scale_up_amplifies_pixels_and_scores_how_the_answer_holds() -> None:
    """SCALE-UP: each input amplified by each factor around the value range's low end and clipped; the score is
    the mean probability of the originally predicted class over the copies, standardised within that class."""
    from guard.screens.scaleup import ScaleUpScreen, ScaleUpSpec
    from guard.screens.screen import ModelView

    x = np.full((2, 3, 4, 4), 0.1, np.float32)
    x[1] = 0.5
    screen = ScaleUpScreen((3.0, 11.0))
    rows = screen.extra_rows(x).reshape(2, 2, 3, 4, 4)
    np.testing.assert_allclose(rows[0, :, 0, 0, 0], [0.3, 1.0], atol=1e-6)  # 0.1 x 3, 0.1 x 11 clipped
    np.testing.assert_allclose(rows[1, :, 0, 0, 0], [1.0, 1.0])
    # input 0 keeps its answer (class 1) on both copies; input 1 loses it on one
    logits = np.array([[0, 9, 0], [9, 0, 0],   # the inputs' own rows: answered 1 and 0
                       [0, 9, 0], [0, 9, 0],   # input 0's copies
                       [9, 0, 0], [0, 0, 9]], np.float64)
    view = ModelView(logits, np.zeros((6, 1)), 2, {id(screen): (2, 6)})
    held, lost = screen.scores(view)
    assert held > 0.99 and 0.49 < lost < 0.51
    standardised = ScaleUpScreen((3.0, 11.0), class_mean=np.array([0.5, 0.9, 0.5]),
                                 class_std=np.array([0.1, 0.05, 0.1]))
    view = ModelView(logits, np.zeros((6, 1)), 2, {id(standardised): (2, 6)})
    np.testing.assert_allclose(standardised.scores(view), [(held - 0.9) / 0.05, (lost - 0.5) / 0.1])
    with pytest.raises(ValueError, match="above 1"):
        ScaleUpSpec(calibration_scores=[0.0], factors=[0.5])
