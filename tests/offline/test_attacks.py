from __future__ import annotations

import numpy as np
import torch

from offline.attacks import BackdoorResult, BlendTrigger, PatchTrigger, poison_indices, train_backdoored_model
from offline.stamp import stamp


def test_stamp_works_alike_on_numpy_and_torch() -> None:
    x = np.random.default_rng(0).random((2, 1, 6, 6)).astype(np.float32)
    mask = np.zeros((1, 6, 6), np.float32)
    mask[:, :2, :2] = 1.0
    pattern = np.ones((1, 6, 6), np.float32)
    out = stamp(x, mask, pattern)
    assert np.all(out[:, :, :2, :2] == 1.0)
    np.testing.assert_array_equal(out[:, :, 2:, 2:], x[:, :, 2:, 2:])
    out_t = stamp(torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(pattern))
    np.testing.assert_allclose(out_t.numpy(), out)


def test_patch_trigger_geometry() -> None:
    trig = PatchTrigger(3, row=2, col=5, pattern="checker")
    region = trig.region(10, 10)
    assert region.sum() == 9 and region[2:5, 5:8].all()
    x = np.zeros((1, 1, 10, 10), np.float32)
    stamped = trig.apply(x)
    assert stamped[0, 0, 2, 5] == 1.0 and stamped[0, 0, 2, 6] == 0.0
    assert stamped[0, 0][~region].max() == 0.0
    default = PatchTrigger(4).region(28, 28)
    assert default[23:27, 23:27].all()  # bottom-right, one pixel in


def test_blend_trigger_mixes_whole_image() -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    out = BlendTrigger(alpha=0.2, seed=1).apply(x)
    assert 0 < out.max() <= 0.2 and (out > 0).mean() > 0.9


def test_poison_indices_avoid_target_class() -> None:
    y = np.repeat(np.arange(10), 100)
    idx = poison_indices(y, target=4, rate=0.1, rng=np.random.default_rng(0))
    assert len(idx) == 100 and len(set(idx)) == 100
    assert not np.any(y[idx] == 4)


def test_backdoored_model_obeys_trigger_and_clean_one_does_not(
        badnets_model: BackdoorResult, clean_models: list[BackdoorResult], mnist_splits) -> None:
    assert badnets_model.clean_accuracy > 0.93
    assert badnets_model.attack_success_rate is not None and badnets_model.attack_success_rate > 0.95
    _, test = mnist_splits
    from offline.attacks import attack_success_rate

    for clean in clean_models:
        assert clean.clean_accuracy > 0.93
        assert attack_success_rate(clean.model, PatchTrigger(4), test.x, test.y, 3) < 0.2


def test_blend_and_invisible_backdoors_take(mnist_splits) -> None:
    train, test = mnist_splits
    blend = train_backdoored_model(train, test, BlendTrigger(0.15), 5, 0.1, seed=1)
    assert blend.attack_success_rate is not None and blend.attack_success_rate > 0.9
    invisible = train_backdoored_model(train, test, None, 5, 0.1, epochs=12, seed=1, learn_trigger=True, eps=0.1)
    assert invisible.trigger is not None and np.abs(invisible.trigger.delta).max() <= 0.1 + 1e-6
    assert invisible.attack_success_rate is not None and invisible.attack_success_rate > 0.8
    assert invisible.clean_accuracy > 0.9
