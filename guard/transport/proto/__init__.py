"""Generated gRPC stubs (do not edit): ``python scripts/gen_proto.py`` rewrites them from ``proto/``."""
