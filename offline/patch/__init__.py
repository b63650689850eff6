"""The patch job (``trojan-forensics patch``): scan, recover, repair, export, calibrate, evaluate, bundle.

- :mod:`.job`: the job itself (``run_patch``), its phases, their reuse, the guard bundle;
- :mod:`.settings`: its knobs (``PatchSettings``, ``RepairSettings``, ``CalibrationSettings``), torch-free, from
  which the ``patch`` command's flags are generated;
- :mod:`.repair`: pruning, unlearning, fine-pruning, NAD, ANP, I-BAU;
- :mod:`.export`: the repaired model to ONNX with its ``logits`` and ``features`` outputs;
- :mod:`.ibdpsc`: IBD-PSC's amplified-BatchNorm variants written into that ONNX graph;
- :mod:`.calibrate`: the guard's detectors and its one verdict, calibrated with the guard's own code.
"""
