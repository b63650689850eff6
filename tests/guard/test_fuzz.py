"""Property-based fuzzing: any ModelInfer request gets a defined status and the guard keeps serving;
any damaged bundle is refused with a one-line error and the good bundle is never touched.

``TROJAN_FUZZ_EXAMPLES`` sets the cases per property (default 150: a few hundred in ``make test``);
``bench/bench_fuzz.py`` runs them by the thousand and reports the counts (``TROJAN_FUZZ_REPORT``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.bundle import MANIFEST, BundleError, GuardBundle, sha256_file
from guard.transport.proto import inference_pb2 as pb

from .conftest import GuardProcess, logits_of

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("TROJAN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("TROJAN_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
# the statuses a request may get: answered, refused as triggered, or a defined error of the protocol
DEFINED = {grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
DATATYPES = ["FP32", "FP16", "FP64", "INT8", "INT32", "INT64", "UINT8", "UINT32", "UINT64", "BOOL", "BYTES", "",
             "fp32", "BF16"]
counts: dict[str, Counter] = {"requests": Counter(), "bundles": Counter()}


def _report() -> None:
    path = os.environ.get("TROJAN_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in counts.items()}, indent=1))


floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
dims = st.one_of(st.sampled_from([1, 28, 0, -1, 2, 3]), st.integers(-(2 ** 40), 2 ** 40))
shapes = st.one_of(st.just([1, 1, 28, 28]), st.tuples(st.integers(-3, 70), st.just(1), st.just(28), st.just(28))
                   .map(list), st.lists(dims, max_size=6))


@st.composite
def tensors(draw, request: pb.ModelInferRequest) -> None:
    t = request.inputs.add(name=draw(st.sampled_from(["input", "input", "x", "", "INPUT\x00"])),
                           datatype=draw(st.sampled_from(DATATYPES)), shape=draw(shapes))
    how = draw(st.sampled_from(["raw-exact", "raw", "fp32", "int", "bytes", "none", "mixed"]))
    n = int(np.prod([d for d in t.shape if 0 < d < 100] or [0]))
    if how == "raw-exact" and 0 < n <= 784 * 70:  # the right byte length: values decide
        values = draw(st.sampled_from(["uniform", "nan", "big", "zero"]))
        x = {"uniform": np.random.default_rng(n).random(n, dtype=np.float32), "nan": np.full(n, np.nan, np.float32),
             "big": np.full(n, 1e30, np.float32), "zero": np.zeros(n, np.float32)}[values]
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    elif how == "raw":
        request.raw_input_contents.append(draw(st.binary(max_size=4 * 784 + 8)))
    elif how == "fp32":
        t.contents.fp32_contents.extend(draw(st.lists(floats, max_size=800)))
    elif how == "int":
        t.contents.int_contents.extend(draw(st.lists(st.integers(-(2 ** 31), 2 ** 31 - 1), max_size=50)))
    elif how == "bytes":
        t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=5)))
    elif how == "mixed":
        t.contents.fp32_contents.extend([0.5] * 4)
        request.raw_input_contents.append(b"\x00" * 16)


@st.composite
def requests(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["model", "model", "other", ""])),
                                   model_version=draw(st.sampled_from(["", "1", "2", "latest"])),
                                   id=draw(st.text(max_size=40)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2, 3]))):
        draw(tensors(request))
    for key in draw(st.lists(st.text(max_size=20), max_size=3)):
        param = request.parameters[key]
        kind = draw(st.sampled_from(["bool", "int", "str"]))
        if kind == "bool":
            param.bool_param = draw(st.booleans())
        elif kind == "int":
            param.int64_param = draw(st.integers(-(2 ** 63), 2 ** 63 - 1))
        else:
            param.string_param = draw(st.text(max_size=100))
    for name in draw(st.lists(st.sampled_from(["logits", "features", "guard_scores", "nope", ""]), max_size=3)):
        request.outputs.add(name=name)
    return request


def test_any_request_gets_a_defined_status_and_the_guard_keeps_serving(guard_server: GuardProcess,
                                                                       traffic: dict[str, np.ndarray]) -> None:
    raw = guard_server.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                           request_serializer=lambda b: b, response_deserializer=lambda b: b)

    @FUZZ
    @given(request=requests(), garbage=st.one_of(st.none(), st.binary(max_size=2048)))
    def check(request: pb.ModelInferRequest, garbage: bytes | None) -> None:
        try:
            if garbage is not None:
                raw(garbage, timeout=30)
            else:
                guard_server.stub.ModelInfer(request, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert exc.details() and "\n" not in exc.details(), exc.details()
        counts["requests"][code.name] += 1
        assert code in DEFINED, (code, request if garbage is None else garbage[:64])

    try:
        check()
    finally:
        _report()
    assert guard_server.proc.poll() is None
    assert int(logits_of(guard_server.infer(traffic["clean_x"][:1])).argmax()) == int(traffic["clean_y"][0])
    assert guard_server.metric("trojan_guard_request_errors_total", code="INTERNAL") == 0


# --- bundles --------------------------------------------------------------------------------------------------

def _paths(doc, prefix=()):
    """Every JSON path in guard.json (truncated lists: their first elements)."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            yield from _paths(v, (*prefix, i))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() |
                           st.text(max_size=30), lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=6)


def test_any_damaged_bundle_is_refused_with_one_line_and_the_good_one_is_untouched(
        guard_only_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    before = {p.name: sha256_file(p) for p in guard_only_bundle.iterdir() if p.is_file()}
    manifest = json.loads((guard_only_bundle / MANIFEST).read_text())
    paths = [p for p in _paths(manifest) if p]
    files = [p.name for p in guard_only_bundle.iterdir() if p.is_file() and p.name != MANIFEST]
    work = tmp_path_factory.mktemp("fuzz-bundle")
    pool_x = GuardBundle.load(guard_only_bundle).pool[:1]

    @FUZZ
    @given(how=st.sampled_from(["field", "delete", "truncate", "flip", "json"]), path=st.sampled_from(paths),
           value=json_values, file=st.sampled_from(files), at=st.floats(0, 1), bits=st.integers(1, 255))
    def check(how: str, path: tuple, value, file: str, at: float, bits: int) -> None:
        case = work / "case"
        if case.exists():
            shutil.rmtree(case)
        shutil.copytree(guard_only_bundle, case)
        if how in ("field", "delete"):
            doc = json.loads((case / MANIFEST).read_text())
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            if how == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
            (case / MANIFEST).write_text(json.dumps(doc))
        elif how == "json":
            data = (case / MANIFEST).read_bytes()
            (case / MANIFEST).write_bytes(data[:int(at * len(data))])
        else:
            target = case / file
            data = bytearray(target.read_bytes())
            i = min(int(at * len(data)), len(data) - 1)
            if how == "truncate":
                del data[i:]
            elif data:
                data[i] ^= bits
            target.write_bytes(bytes(data))
        try:
            bundle = GuardBundle.load(case)
            screen = bundle.screen()  # a change that still validates must still build a working screen
            from guard.backends import EmbeddedBackend
            m = bundle.manifest
            backend = EmbeddedBackend(bundle.model_path, m.input.name, m.outputs.logits, m.outputs.features,
                                      threads=1)
            try:
                screen.run(backend.infer, pool_x)
            finally:
                backend.close()
            counts["bundles"]["loaded"] += 1
        except BundleError as exc:
            assert str(exc) and "\n" not in str(exc), str(exc)
            counts["bundles"]["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the property: nothing else escapes
            # a bundle that validates but whose values break screening is a bug in the schema's checks
            counts["bundles"][f"escaped {type(exc).__name__}"] += 1
            raise AssertionError(f"{how} {path} {value!r} {file}: {type(exc).__name__}: {exc}") from exc

    try:
        check()
    finally:
        _report()
    assert {p.name: sha256_file(p) for p in guard_only_bundle.iterdir() if p.is_file()} == before
