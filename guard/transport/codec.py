"""Open Inference Protocol messages <-> numpy, checked against the bundle's input spec.

The transport edge: the only module besides ``guard.transport.server`` that knows protobuf.
Every check raises a :class:`guard.errors.InvalidInput` (or ``TooLarge``) whose
message says what was expected and what arrived.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from guard.decision import Decision
from guard.errors import InvalidInput, TooLarge
from guard.transport.proto import inference_pb2 as pb

OUTPUTS = ("logits", "features", "guard_scores")
# outputs that let a client tune a trigger against the detectors: served only with ``serve --expose-scores``
SCORE_OUTPUTS = ("features", "guard_scores")
MAX_REQUEST_ID_BYTES = 256  # request.id is copied into every evidence record of the request
# typed-content field of each datatype, to name what a client sent
_TYPED = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents", "INT64": "int64_contents",
          "UINT32": "uint_contents", "UINT64": "uint64_contents", "BOOL": "bool_contents", "BYTES": "bytes_contents"}


def decode_inputs(request: pb.ModelInferRequest, name: str, shape: list[int], max_inputs: int) -> np.ndarray:
    """The request's one input tensor as float32 (B, *shape[1:]), raw or typed contents."""
    if len(request.inputs) != 1:
        got = ", ".join(f"'{t.name}'" for t in request.inputs) or "none"
        raise InvalidInput(f"the model takes exactly one input '{name}'; the request has {got}",
                           reason="input_count")
    tensor = request.inputs[0]
    if tensor.name != name:
        raise InvalidInput(f"unknown input '{tensor.name}'; the model's input is '{name}'", reason="input_name")
    if tensor.datatype != "FP32":
        raise InvalidInput(f"input '{name}' has datatype {tensor.datatype or '(empty)'}; the model takes FP32",
                           reason="datatype")
    dims = list(tensor.shape)
    expected = shape[1:]
    if len(dims) != len(shape) or dims[1:] != expected or dims[0] < 1:
        want = "[B, " + ", ".join(map(str, expected)) + "]"
        raise InvalidInput(f"input '{name}' has shape {dims}; the model takes {want} with B >= 1", reason="shape")
    if dims[0] > max_inputs:
        raise TooLarge(f"request carries {dims[0]} inputs; the guard accepts at most {max_inputs} per request "
                       f"(--max-request-inputs)")
    count = int(np.prod(dims))
    typed = tensor.contents.ListFields()
    if request.raw_input_contents:
        if typed:
            raise InvalidInput(f"input '{name}' has both raw and typed contents; send one", reason="contents")
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents entries for 1 input",
                               reason="contents")
        raw = request.raw_input_contents[0]
        if len(raw) != 4 * count:
            raise InvalidInput(f"input '{name}' {dims} FP32 needs {4 * count} bytes of raw contents, got "
                               f"{len(raw)}", reason="byte_length")
        x = np.frombuffer(raw, dtype="<f4")
    else:
        if not typed:
            raise InvalidInput(f"input '{name}' has no contents (raw_input_contents or contents.fp32_contents)",
                               reason="contents")
        if typed[0][0].name != "fp32_contents" or len(typed) > 1:
            raise InvalidInput(f"input '{name}' is declared FP32 but carries {typed[0][0].name}",
                               reason="contents")
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise InvalidInput(f"input '{name}' {dims} needs {count} fp32_contents values, got {len(values)}",
                               reason="byte_length")
        x = np.asarray(values, dtype=np.float32)
    return x.reshape(dims).astype(np.float32, copy=False)


def infer_request(x: np.ndarray, model: str, input_name: str, request_id: str = "",
                  outputs: Sequence[str] = ()) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying ``x`` as raw little-endian FP32 (what clients and the upstream call send)."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


_FLOATS = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}


def output_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output tensor of a response as float32, by name, from raw or typed contents."""
    raw = list(response.raw_output_contents)
    arrays = {}
    for i, out in enumerate(response.outputs):
        if i < len(raw):
            dtype = _FLOATS.get(out.datatype)
            if dtype is None:
                raise ValueError(f"output '{out.name}' has datatype {out.datatype}, expected FP32")
            arr = np.frombuffer(raw[i], dtype=np.dtype(dtype).newbyteorder("<"))
        elif out.contents.fp32_contents:
            arr = np.asarray(out.contents.fp32_contents, dtype=np.float32)
        else:
            arr = np.asarray(out.contents.fp64_contents, dtype=np.float64)
        arrays[out.name] = arr.reshape(tuple(out.shape)).astype(np.float32, copy=False)
    return arrays


def check_request_id(request: pb.ModelInferRequest) -> None:
    """``request.id`` is echoed and kept with the evidence: at most :data:`MAX_REQUEST_ID_BYTES` bytes."""
    size = len(request.id.encode("utf-8", "surrogatepass"))
    if size > MAX_REQUEST_ID_BYTES:
        raise InvalidInput(f"request id is {size} bytes; the guard accepts at most {MAX_REQUEST_ID_BYTES}",
                           reason="request_id")


def requested_outputs(request: pb.ModelInferRequest, expose_scores: bool = False) -> list[str]:
    """The outputs a request asks for (``logits`` by default); the score outputs need ``--expose-scores``."""
    names = [o.name for o in request.outputs] or ["logits"]
    served = OUTPUTS if expose_scores else tuple(n for n in OUTPUTS if n not in SCORE_OUTPUTS)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; the guard answers {', '.join(served)}",
                           reason="output_name")
    hidden = [n for n in names if n not in served]
    if hidden:
        raise InvalidInput(f"output(s) {hidden} are not served: this guard gives clients the verdict only "
                           f"(a trusted deployment serves them with 'trojan-guard serve --expose-scores')",
                           reason="output_hidden")
    return names


def _join(values: list[float]) -> str:
    return ",".join(f"{v:.6g}" for v in values)


def verdict_fields(decision: Decision, expose_scores: bool = False) -> dict[str, bool | int | str]:
    """The verdict as bool, int64 and string values (older clients drop float parameters).

    Clients get the verdict only: which detectors fired, their scores and
    p-values would let an attacker tune a trigger against them, so they go to
    the metrics and the evidence store, and to clients only with
    ``expose_scores`` (``serve --expose-scores``, for trusted deployments).
    Under the ``shadow`` policy the client sees no verdict: only the metrics and
    the evidence store record it.
    """
    if decision.policy == "shadow":
        return {"guard_policy": "shadow"}
    fields: dict[str, bool | int | str] = {
        "guard_verdict": decision.verdict,
        "guard_flagged": decision.flagged,
        "guard_flagged_count": sum(v.flagged for v in decision.inputs),
        "guard_policy": decision.policy,
        "guard_bundle_sha256": decision.bundle_sha256,
    }
    if decision.inputs:
        fields["guard_input_flags"] = ",".join("1" if v.flagged else "0" for v in decision.inputs)
    if decision.inputs and expose_scores:
        fields.update({
            "guard_detectors": ",".join(decision.detectors),
            "guard_p_value": _join([v.p_value for v in decision.inputs]),
        })
        first = decision.inputs[0]
        for score in first.scores:
            fields[f"guard_{score}"] = _join([v.scores[score] for v in decision.inputs])
        for detector in first.p_values:
            fields[f"guard_{detector}_p_value"] = _join([v.p_values[detector] for v in decision.inputs])
    return fields


def trailing_metadata(decision: Decision, expose_scores: bool = False) -> tuple[tuple[str, str], ...]:
    """The verdict for a refused request, as gRPC trailing metadata (keys with dashes)."""
    return tuple((k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v))
                 for k, v in verdict_fields(decision, expose_scores).items())


def _set_param(param: pb.InferParameter, value: bool | int | str) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    else:
        param.string_param = value


def encode_response(request: pb.ModelInferRequest, decision: Decision, model_name: str,
                    outputs: list[str], expose_scores: bool = False) -> pb.ModelInferResponse:
    """The answer: the requested outputs (see :func:`requested_outputs`) and the verdict in ``parameters``."""
    response = pb.ModelInferResponse(model_name=model_name, model_version="1", id=request.id)
    for key, value in verdict_fields(decision, expose_scores).items():
        _set_param(response.parameters[key], value)
    b = len(decision.logits)
    for name in outputs:
        if name == "logits":
            arr = decision.logits
        elif name == "features":
            arr = decision.features.reshape(b, -1)
        else:
            arr = (np.array([[v.p_value, *v.scores.values(), *v.p_values.values()] for v in decision.inputs])
                   if decision.inputs else np.full((b, len(decision.columns)), np.nan))
        arr = np.ascontiguousarray(arr, dtype="<f4")
        out = response.outputs.add(name=name, datatype="FP32", shape=list(arr.shape))
        if name == "guard_scores":
            _set_param(out.parameters["columns"], ",".join(decision.columns))
        response.raw_output_contents.append(arr.tobytes())
    return response
