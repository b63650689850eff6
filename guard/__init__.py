"""trojan-guard sidecar: screens inference requests against backdoor triggers.

The serving path depends on numpy, onnxruntime, grpcio, protobuf and
prometheus-client only; it never imports torch or ``offline``.
"""

__version__ = "0.1.0"
