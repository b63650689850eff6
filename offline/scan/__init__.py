"""The scan: is the model backdoored, which class is the target, what is the trigger?

- :mod:`.neural_cleanse`: Neural Cleanse and TABOR (reverse-engineer a minimal trigger for every class at once,
  the anomaly index over the mask norms, trigger recovery);
- :mod:`.job`: the ``trojan-forensics scan`` job around it (``run_scan``, ``scan_case``);
- :mod:`.settings`: its knobs (``NeuralCleanseConfig``), torch-free, each flag's help with its field.
"""
