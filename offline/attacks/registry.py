"""The attacks ``trojan-forensics train --attack`` builds, with their settings and one-line summaries.

The data-poisoning attacks of :mod:`.training` (BadNets, blend, invisible,
all-to-all) take the train command's own flags; every other attack has a
settings dataclass whose fields become ``--<attack>-<field>`` flags.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttackSpec:
    name: str
    summary: str
    module: str | None = None  # offline.attacks.<module> with train_<module>(train, test, target, settings, seed)
    settings: str | None = None  # the settings dataclass's name in that module

    def settings_class(self) -> type | None:
        return None if self.module is None else getattr(self._module(), self.settings or "")

    def builder(self) -> Callable[..., Any]:
        return getattr(self._module(), f"train_{self.module}")

    def _module(self) -> Any:
        return importlib.import_module(f"offline.attacks.{self.module}")


ATTACK_SPECS = (
    AttackSpec("badnets", "BadNets patch (Gu et al. 2017): a small patch, poisoned rows relabelled"),
    AttackSpec("blend", "blended injection (Chen et al. 2017): a noise pattern mixed into the whole image"),
    AttackSpec("invisible", "an invisible L-inf-bounded perturbation learned jointly with the model"),
    AttackSpec("all-to-all", "a BadNets patch that sends class c to c + 1 (the TrojAI label rule)"),
    AttackSpec("wanet", "WaNet (Nguyen & Tran 2021): a smooth warp of the image, with noise-mode cover samples",
               "wanet", "WaNetSettings"),
    AttackSpec("adaptive-blend", "Adaptive-Blend (Qi et al. 2023): half the pieces of a blend per poisoned "
               "sample, with cover samples", "adaptive_blend", "AdaptiveBlendSettings"),
    AttackSpec("sig", "SIG (Barni et al. 2019): a clean-label sinusoidal signal on target-class images only",
               "sig", "SigSettings"),
    AttackSpec("dynamic", "input-aware dynamic backdoor (Nguyen & Tran 2020): a generator makes a different "
               "pattern and mask for every input", "dynamic", "DynamicSettings"),
    AttackSpec("trojannn", "TrojanNN (Liu et al. 2018): a clean model; a trigger optimised to drive internal "
               "neurons, later layers retrained on generated data", "trojannn", "TrojanNNSettings"),
    AttackSpec("clean-label", "feature collision (Shafahi et al. 2018): correctly labelled poisons whose "
               "features collide with one chosen image of another class", "clean_label", "CleanLabelSettings"),
    AttackSpec("tact", "TaCT (Tang et al. 2021): a source-specific patch backdoor; the trigger on other classes' "
               "images is a cover sample that keeps its label", "tact", "TactSettings"),
    AttackSpec("latent", "a patch backdoor trained to land triggered features on the target class's clean ones "
               "(adaptive against feature-space detectors, after Qi et al. 2023)", "latent", "LatentSettings"),
    AttackSpec("none", "a clean model"),
)
ATTACKS = {spec.name: spec for spec in ATTACK_SPECS}


def build_attack(name: str, train: Any, test: Any, target: int, seed: int = 0, *, trigger: Any = None,
                 poison_rate: float | None = None, epochs: int | None = None, eps: float = 0.1,
                 settings: Any = None) -> Any:
    """Train a model with attack ``name`` and return its :class:`~offline.attacks.training.BackdoorResult`.

    BadNets / all-to-all take ``trigger`` (a PatchTrigger; default 4x4 bottom-right), blend a BlendTrigger,
    the invisible trigger ``eps``; ``poison_rate`` and ``epochs`` default to 0.1 and 8 (12 invisible).
    The other attacks take ``settings`` (their dataclass; default: its defaults).
    """
    from offline.attacks.training import train_backdoored_model
    from offline.attacks.triggers import BlendTrigger, PatchTrigger

    spec = ATTACKS[name]
    if spec.module is not None:
        return spec.builder()(train, test, target, settings, seed=seed)
    if name in ("badnets", "all-to-all"):
        trigger = trigger or PatchTrigger(4)
    elif name == "blend":
        trigger = trigger or BlendTrigger(0.15, seed)
    rate = 0.0 if name == "none" else (0.1 if poison_rate is None else poison_rate)
    return train_backdoored_model(train, test, trigger if name != "invisible" else None, target, rate,
                                  epochs=epochs or (12 if name == "invisible" else 8), seed=seed,
                                  learn_trigger=name == "invisible", eps=eps,
                                  label_rule="all-to-all" if name == "all-to-all" else "all-to-one")


def save_case(out: Any, name: str, result: Any, train: Any, test: Any, source: str,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``trojan-forensics train`` writes: model.pt, clean.npz (held out), train.npz (the training set as
    trained on, with ``poison_idx``), the trigger's files and attack.json (with ``extra`` in it), whose content
    is returned."""
    from pathlib import Path

    import numpy as np

    from offline.attacks.triggers import save_trigger
    from offline.jobs import write_json_atomic
    from offline.models import save_torchscript

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_torchscript(result.model, out / "model.pt")
    test.save_npz(out / "clean.npz")
    x_train = train.x if result.train_x is None else result.train_x
    y_train = train.y if result.train_y is None else result.train_y
    covers = {} if result.cover_idx is None else {"cover_idx": result.cover_idx}
    np.savez_compressed(out / "train.npz", x=x_train, y=y_train, class_names=np.array(train.class_names),
                        poison_idx=result.poison_idx, **covers)
    summary = {"attack": name, "data": source, "train_images": len(train), "held_out_images": len(test),
               **result.summary()}
    if result.trigger is not None:
        summary["trigger"] = save_trigger(result.trigger, out)
    summary.update(extra or {})
    write_json_atomic(out / "attack.json", summary)
    return summary
