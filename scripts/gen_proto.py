"""Regenerate guard/transport/proto from proto/*.proto: ``python scripts/gen_proto.py [OUT_DIR]``.

Needs grpcio-tools (the ``dev`` extra pins the version whose output the repo
holds); ``tests/guard/test_proto.py`` fails when the committed stubs are stale.
Generated modules import each other as ``guard.transport.proto.X_pb2``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "proto"
DEFAULT_OUT = ROOT / "guard" / "transport" / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(p.name for p in SOURCES.glob("*.proto"))
    args = ["protoc", f"-I{SOURCES}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    modules = {Path(p).stem + "_pb2" for p in protos}
    written = sorted(p for p in out.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))
    for path in written:
        text = path.read_text()
        for mod in modules:
            text = re.sub(rf"^import {mod} as ", f"from guard.transport.proto import {mod} as ", text, flags=re.M)
        path.write_text(text)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(target):
        print(path.relative_to(target.parent) if target == DEFAULT_OUT else path)
