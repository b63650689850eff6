from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from offline.attacks import BackdoorResult, GeneratorTrigger, attack_success_rate, load_trigger, save_trigger
from offline.attacks.dynamic import DynamicSettings, train_dynamic
from offline.data import Dataset

pytestmark = pytest.mark.slow
TARGET = 0


@pytest.fixture(scope="module")
def dynamic_model(mnist_splits: tuple[Dataset, Dataset]) -> BackdoorResult:
    """The input-aware attack on a short schedule (6 epochs instead of 30)."""
    train, test = mnist_splits
    return train_dynamic(train, test, TARGET, DynamicSettings(epochs=6), seed=0)


def test_dynamic_backdoor_takes_and_a_clean_model_ignores_it(
        dynamic_model: BackdoorResult, clean_models: list[BackdoorResult],
        mnist_splits: tuple[Dataset, Dataset]) -> None:
    _, test = mnist_splits
    assert isinstance(dynamic_model.trigger, GeneratorTrigger)
    assert dynamic_model.clean_accuracy > 0.9
    assert dynamic_model.attack_success_rate is not None and dynamic_model.attack_success_rate > 0.7
    assert attack_success_rate(clean_models[0].model, dynamic_model.trigger, test.x, test.y, TARGET) < 0.3
    assert len(dynamic_model.poison_idx) == 0 and dynamic_model.train_x is None
    assert 0 < dynamic_model.details["mask_density"] <= 0.1 + 0.01
    assert 0 <= dynamic_model.details["cross_trigger_accuracy"] <= 1


def test_each_input_gets_its_own_trigger(dynamic_model: BackdoorResult,
                                         mnist_splits: tuple[Dataset, Dataset]) -> None:
    x = torch.from_numpy(mnist_splits[1].x[::15])  # 100 images of every class
    module = dynamic_model.trigger.module
    with torch.no_grad():
        masks, patterns = module.masks(x), module.patterns(x)
        residual = module(x) - x
    other = torch.roll(torch.arange(len(x)), 1)
    # masks, patterns and what the trigger adds differ between inputs by a good share of their size
    assert (masks - masks[other]).abs().mean() > 0.3 * masks.mean()
    assert (patterns - patterns[other]).abs().mean() > 0.05
    assert (residual - residual[other]).abs().mean() > 0.5 * residual.abs().mean()
    # stamping an image with another image's trigger is not the same as its own trigger
    assert (module.cross(x, x[other]) - module(x)).abs().mean() > 0.05


def test_trigger_round_trip(dynamic_model: BackdoorResult, mnist_splits: tuple[Dataset, Dataset],
                            tmp_path: Path) -> None:
    x = mnist_splits[1].x[:64]
    desc = save_trigger(dynamic_model.trigger, tmp_path)
    assert desc["files"] == {"generator": "trigger_generator.pt"}
    loaded = load_trigger(desc, tmp_path)
    assert isinstance(loaded, GeneratorTrigger)
    np.testing.assert_allclose(loaded.apply(x), dynamic_model.trigger.apply(x), atol=1e-6)
