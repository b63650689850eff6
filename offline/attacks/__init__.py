"""Attack simulators: triggers, data poisoning and backdoored model training.

Used by the demo, the tests and the benchmarks to build models whose backdoor
is known, so detectors are judged against the truth. One module per technique:

- :mod:`.triggers`: the triggers themselves (stamped by :func:`offline.stamp.stamp`);
- :mod:`.training`: the training loop, BadNets / blended / invisible poisoning,
  all-to-all labels, ACC and ASR;
- :mod:`.wanet`, :mod:`.adaptive_blend`, :mod:`.sig`: the attacks of the
  coverage matrix beyond those;
- :mod:`.rates`: the poisoning rates the literature reports as enough.

:data:`ATTACKS` names every attack ``trojan-forensics train --attack`` builds.
"""

from offline.attacks.training import (
    LABEL_RULES,
    BackdoorResult,
    accuracy,
    apply_poison,
    attack_success_rate,
    backdoor_targets,
    new_model,
    poison_indices,
    predict,
    train_backdoored_model,
    train_classifier,
    training_setup,
)
from offline.attacks.triggers import (
    AdditiveTrigger,
    AnyTrigger,
    BlendTrigger,
    GeneratorTrigger,
    MaskTrigger,
    PatchTrigger,
    SignalTrigger,
    Trigger,
    WarpTrigger,
    load_trigger,
    save_trigger,
)

__all__ = [
    "LABEL_RULES", "AdditiveTrigger", "AnyTrigger", "BackdoorResult", "BlendTrigger", "GeneratorTrigger",
    "MaskTrigger", "PatchTrigger", "SignalTrigger", "Trigger", "WarpTrigger", "accuracy", "apply_poison",
    "attack_success_rate", "backdoor_targets", "load_trigger", "new_model", "poison_indices", "predict",
    "save_trigger", "train_backdoored_model", "train_classifier", "training_setup",
]
