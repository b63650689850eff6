"""The generated stubs match proto/, and the wire format matches the Open Inference Protocol clients use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_DUMP = """
import json, sys
if sys.argv[1] == "guard":
    from guard.transport.proto import inference_pb2 as m
else:
    from tritonclient.grpc import service_pb2 as m
fields = {}
def walk(d, prefix):
    for f in d.fields:
        fields[prefix + d.name + "." + f.name] = [f.number, f.type, f.label]
    for n in d.nested_types:
        walk(n, prefix + d.name + ".")
ours = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
for rpc in ours:
    for kind in ("Request", "Response"):
        walk(m.DESCRIPTOR.message_types_by_name[rpc + kind], "")
for name in ("InferParameter", "InferTensorContents"):
    walk(m.DESCRIPTOR.message_types_by_name[name], "")
service = m.DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods = {x.name: [x.input_type.full_name, x.output_type.full_name] for x in service.methods if x.name in ours}
print(json.dumps({"package": m.DESCRIPTOR.package, "service": service.full_name, "fields": fields,
                  "methods": methods}))
"""


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    generated = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    stubs = ROOT / "guard" / "transport" / "proto"
    committed = sorted(p.name for p in stubs.iterdir() if "_pb2" in p.name)
    assert generated == committed
    stale = [n for n in generated if (tmp_path / n).read_bytes() != (stubs / n).read_bytes()]
    assert not stale, f"stale stubs {stale}: run 'python scripts/gen_proto.py'"


def test_wire_format_matches_tritonclient() -> None:
    """Same package, service, field numbers and types as the protocol tritonclient speaks (own processes:
    both define the 'inference' package, which one protobuf descriptor pool cannot hold twice)."""
    def dump(which: str) -> dict:
        run = subprocess.run([sys.executable, "-c", _DUMP, which], capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    ours, triton = dump("guard"), dump("triton")
    assert ours["package"] == triton["package"] == "inference"
    assert ours["service"] == triton["service"] == "inference.GRPCInferenceService"
    assert ours["methods"] == triton["methods"]
    assert ours["fields"] == triton["fields"]
