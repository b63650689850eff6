"""SIG (Barni, Kallas & Tondi, ICIP 2019): a clean-label backdoor with a sinusoidal signal.

A horizontal sinusoid ``delta * sin(2 pi j f / W)`` is added to a share of the
*target class's* training images only; no label changes, so every poisoned
sample is correctly labelled and looks right to a human labeller. The model
learns the signal as a feature of the target class; at test time a stronger
signal on any image sends it there.

The paper (MNIST, 28x28): f = 6, Delta = 20 (of 255) for training; the test
signal is made stronger. Adapted to the embedded digits: with 3,500 training
images the target class has about 350, so the default poisons 80 % of them
(the paper's largest share, alpha = 0.3 of the class, left the ASR below 90 %
after a few epochs here) and tests with Delta = 60.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from offline.attacks.training import BackdoorResult, accuracy, attack_success_rate, new_model, train_classifier
from offline.attacks.triggers import SignalTrigger
from offline.data import Dataset


@dataclass
class SigSettings:
    delta: float = field(default=20 / 255, metadata={"help": "signal amplitude on the poisoned training images"})
    test_delta: float = field(default=60 / 255, metadata={"help": "signal amplitude at test time (stronger)"})
    frequency: float = field(default=6.0, metadata={"help": "periods across the image width"})
    target_share: float = field(default=0.8, metadata={"help": "share of the target class's training images "
                                                                 "poisoned (labels untouched)"})
    epochs: int = field(default=8, metadata={"help": "training epochs"})


def train_sig(train: Dataset, test: Dataset, target: int, s: SigSettings | None = None,
              seed: int = 0) -> BackdoorResult:
    s = s or SigSettings()
    net = new_model(train, seed)
    rng = np.random.default_rng(seed)
    own = np.flatnonzero(train.y == target)
    idx = np.sort(rng.choice(own, size=int(round(s.target_share * len(own))), replace=False))
    x = train.x.copy()
    x[idx] = SignalTrigger(s.delta, s.frequency).apply(x[idx])
    train_classifier(net, x, train.y, epochs=s.epochs, seed=rng)
    trigger = SignalTrigger(s.test_delta, s.frequency)
    return BackdoorResult(net, trigger, target, len(idx) / len(train), idx, accuracy(net, test.x, test.y),
                          attack_success_rate(net, trigger, test.x, test.y, target), train_x=x,
                          train_y=train.y.copy(), details={"clean_label": True, "train_delta": round(s.delta, 4)})
