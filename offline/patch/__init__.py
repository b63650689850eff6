"""The patch job (``trojan-forensics patch``): scan, recover, repair, export, calibrate, evaluate, bundle.

- :mod:`.job`: the job itself (``run_patch``, ``PatchSettings``), its phases, their reuse, the guard bundle;
- :mod:`.repair`: pruning, unlearning, fine-pruning, NAD, ANP, I-BAU;
- :mod:`.export`: the repaired model to ONNX with its ``logits`` and ``features`` outputs;
- :mod:`.ibdpsc`: IBD-PSC's amplified-BatchNorm variants written into that ONNX graph;
- :mod:`.calibrate`: the guard's detectors and its one verdict, calibrated with the guard's own code.
"""
