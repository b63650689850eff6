"""Decoding Open Inference Protocol requests: raw and typed contents, and a precise error for each bad one."""

from __future__ import annotations

import numpy as np
import pytest

from guard.decision import Decision, InputVerdict
from guard.errors import InvalidInput, TooLarge
from guard.transport.codec import check_request_id, decode_inputs, encode_response, requested_outputs, trailing_metadata
from guard.transport.proto import inference_pb2 as pb

SHAPE = [-1, 1, 28, 28]


def _request(x: np.ndarray, name: str = "input", datatype: str = "FP32", shape=None, raw: bool = True):
    req = pb.ModelInferRequest(model_name="model")
    t = req.inputs.add(name=name, datatype=datatype, shape=list(x.shape if shape is None else shape))
    if raw:
        req.raw_input_contents.append(x.tobytes())
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
    return req


def test_raw_and_typed_inputs_decode_to_the_same_array() -> None:
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(decode_inputs(_request(x), "input", SHAPE, 64), x)
    np.testing.assert_array_equal(decode_inputs(_request(x, raw=False), "input", SHAPE, 64), x)


@pytest.mark.parametrize(("build", "reason", "message"), [
    (lambda x: _request(x, name="images"), "input_name", "unknown input 'images'"),
    (lambda x: _request(x.astype(np.float64), datatype="FP64"), "datatype", "datatype FP64; the model takes FP32"),
    (lambda x: _request(x, shape=[1, 28, 28]), "shape", "shape [1, 28, 28]; the model takes [B, 1, 28, 28]"),
    (lambda x: _request(x, shape=[0, 1, 28, 28]), "shape", "B >= 1"),
    (lambda x: _request(x[..., :20]), "shape", "[1, 1, 28, 20]"),
    (lambda x: _request(x, shape=[2, 1, 28, 28]), "byte_length", "needs 6272 bytes of raw contents, got 3136"),
    (lambda x: _request(x[:, :, :14], shape=[1, 1, 28, 28], raw=False), "byte_length", "needs 784 fp32_contents"),
    (lambda x: pb.ModelInferRequest(model_name="model"), "input_count", "exactly one input 'input'"),
])
def test_each_malformed_input_gets_a_precise_error(build, reason: str, message: str) -> None:
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        decode_inputs(build(x), "input", SHAPE, 64)
    assert info.value.reason == reason and info.value.code == "INVALID_ARGUMENT"


def test_too_many_inputs_is_resource_exhausted() -> None:
    with pytest.raises(TooLarge, match="at most 4") as info:
        decode_inputs(_request(np.zeros((5, 1, 28, 28), np.float32)), "input", SHAPE, 4)
    assert info.value.code == "RESOURCE_EXHAUSTED"


def test_unknown_output_names_are_refused() -> None:
    req = pb.ModelInferRequest()
    req.outputs.add(name="probabilities")
    with pytest.raises(InvalidInput, match="unknown output"):
        requested_outputs(req)
    assert requested_outputs(pb.ModelInferRequest()) == ["logits"]


def test_response_carries_raw_outputs_and_the_verdict_as_non_float_parameters() -> None:
    decision = Decision(np.eye(2, 10, dtype=np.float32), np.zeros((2, 4), np.float32),
                        [InputVerdict(False, (), 0.5, {"strip_entropy": 1.2, "knn_distance": 0.1},
                                      {"strip": 0.5, "knn": 0.6}),
                         InputVerdict(True, ("strip",), 0.004, {"strip_entropy": 0.01, "knn_distance": 0.2},
                                      {"strip": 0.003, "knn": 0.4})],
                        policy="flag", bundle_sha256="ab" * 32,
                        columns=("p_value", "strip_entropy", "knn_distance", "strip_p_value", "knn_p_value"))
    req = pb.ModelInferRequest(id="req-7")
    resp = encode_response(req, decision, "model", ["logits", "guard_scores"], expose_scores=True)
    assert resp.id == "req-7" and not resp.outputs[0].contents.ListFields()
    logits = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(resp.outputs[0].shape)
    np.testing.assert_array_equal(logits, decision.logits)
    scores = np.frombuffer(resp.raw_output_contents[1], "<f4").reshape(2, 5)
    np.testing.assert_allclose(scores[1], [0.004, 0.01, 0.2, 0.003, 0.4], rtol=1e-6)
    assert resp.outputs[1].parameters["columns"].string_param.startswith("p_value,strip_entropy,")
    assert resp.parameters["guard_knn_p_value"].string_param == "0.6,0.4"
    params = resp.parameters
    assert params["guard_verdict"].string_param == "flagged"
    assert params["guard_flagged"].bool_param is True
    assert params["guard_flagged_count"].int64_param == 1
    assert params["guard_input_flags"].string_param == "0,1"
    assert all(p.WhichOneof("parameter_choice") != "double_param" for p in params.values())
    assert ("guard-verdict", "flagged") in trailing_metadata(decision)


def test_clients_get_the_verdict_only_unless_scores_are_exposed() -> None:
    decision = Decision(np.eye(1, 10, dtype=np.float32), np.zeros((1, 4), np.float32),
                        [InputVerdict(True, ("strip",), 0.004, {"strip_entropy": 0.01}, {"strip": 0.003})],
                        policy="flag", bundle_sha256="ab" * 32, columns=("p_value", "strip_entropy", "strip_p_value"))
    resp = encode_response(pb.ModelInferRequest(), decision, "model", ["logits"])
    assert set(resp.parameters) == {"guard_verdict", "guard_flagged", "guard_flagged_count", "guard_policy",
                                    "guard_bundle_sha256", "guard_input_flags"}
    assert not [k for k, _ in trailing_metadata(decision) if "p-value" in k or "strip" in k or "detectors" in k]
    req = pb.ModelInferRequest()
    req.outputs.add(name="features")
    with pytest.raises(InvalidInput, match="--expose-scores"):
        requested_outputs(req)
    assert requested_outputs(req, expose_scores=True) == ["features"]


def test_request_ids_are_capped_at_256_bytes() -> None:
    check_request_id(pb.ModelInferRequest(id="a" * 256))
    for long_id in ("a" * 257, "\u00e9" * 129):
        with pytest.raises(InvalidInput, match="at most 256") as info:
            check_request_id(pb.ModelInferRequest(id=long_id))
        assert info.value.code == "INVALID_ARGUMENT"
