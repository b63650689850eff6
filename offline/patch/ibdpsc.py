"""IBD-PSC (Hou et al., ICML 2024): the amplified-BatchNorm variants of the model, as extra outputs of its ONNX graph.

Multiplying the last BatchNorm layers' weight and bias by ``omega`` (1.5) pushes clean inputs off their answer,
while a triggered input, which the backdoor answers through a few strongly activated paths, keeps it. The guard's
``ibd_psc`` detector (:mod:`guard.screens.ibdpsc`) scores an input by the mean probability of its answer over
the variants (parameter-oriented scaling consistency).

The export folds each BatchNorm into the convolution before it, so the convolution's output is the BatchNorm's
output: scaling BatchNorm's weight and bias by ``omega`` is scaling that output by ``omega``. Each variant is a
copy of the graph's tail, from its first amplified convolution to the logits, with a ``Mul`` by ``omega`` after
each amplified convolution, in the same graph as the model: one onnxruntime run computes the answer and every
variant, and nothing of the model is copied per request.

As the paper does, the number of amplified layers adapts to the model: the smallest count ``k`` (counting
convolutions from the logits back) at which at least ``ERROR_TARGET`` of clean fit images change their answer,
then ``VARIANTS`` variants amplifying ``k``, ``k + 1``, ... layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

OMEGA = 1.5
VARIANTS = 5
ERROR_TARGET = 0.6
PREFIX = "ibd_psc_"
IBD_PSC_VERSION = 1  # in the export phase's fingerprint: a change here redoes the export


def _amplifiable(nodes: list[Any]) -> list[int]:
    """Node indices whose outputs are BatchNorm outputs: BatchNormalization nodes where the export kept them,
    else the convolutions it folded them into."""
    bn = [i for i, n in enumerate(nodes) if n.op_type == "BatchNormalization"]
    return bn or [i for i, n in enumerate(nodes) if n.op_type == "Conv"]


def amplifiable_layers(model_bytes: bytes) -> int:
    import onnx

    return len(_amplifiable(list(onnx.load_from_string(model_bytes).graph.node)))


def add_variants(model_bytes: bytes, counts: list[int], logits: str = "logits", omega: float = OMEGA,
                 names: list[str] | None = None) -> tuple[bytes, list[str]]:
    """The model with one extra output per entry of ``counts``: its logits with the last ``count`` BatchNorm
    outputs scaled by ``omega``. Returns the new model and the outputs' names (``ibd_psc_<count>``)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    nodes = list(graph.node)
    amp = _amplifiable(nodes)
    if not amp:
        raise ValueError("the model has no BatchNorm (nor convolution) to amplify")
    produced = {out: i for i, n in enumerate(nodes) for out in n.output}
    needed: set[int] = set()
    stack = [logits]
    while stack:  # the nodes the logits depend on
        i = produced.get(stack.pop())
        if i is not None and i not in needed:
            needed.add(i)
            stack.extend(nodes[i].input)
    omega_name = f"{PREFIX}omega"
    graph.initializer.append(numpy_helper.from_array(np.array(omega, np.float32), omega_name))
    logits_info = next(o for o in graph.output if o.name == logits)
    out_names = names or [f"{PREFIX}{c}" for c in counts]
    for count, name in zip(counts, out_names, strict=True):
        chosen = set(amp[-count:])
        rename: dict[str, str] = {}
        suffix = f"__{name}"
        for i in range(min(chosen), len(nodes)):
            node = nodes[i]
            if i not in needed or (i not in chosen and not any(t in rename for t in node.input)):
                continue  # off the logits' path, or upstream of every amplified layer: shared with the model
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name or node.op_type + str(i)}{suffix}"
            del copy.input[:]
            copy.input.extend(rename.get(t, t) for t in node.input)
            outs = [f"{t}{suffix}" for t in node.output]
            del copy.output[:]
            if i in chosen:
                copy.output.extend(f"{t}_unscaled" for t in outs)
                graph.node.append(copy)
                for t in outs:
                    graph.node.append(helper.make_node("Mul", [f"{t}_unscaled", omega_name], [t], name=f"{t}_amplify"))
            else:
                copy.output.extend(outs)
                graph.node.append(copy)
            rename.update(zip(node.output, outs, strict=True))
        graph.node.append(helper.make_node("Identity", [rename[logits]], [name], name=f"{name}_output"))
        info = onnx.ValueInfoProto()
        info.CopyFrom(logits_info)
        info.name = name
        graph.output.append(info)
    onnx.checker.check_model(model)
    return model.SerializeToString(), out_names


def choose_variants(model_bytes: bytes, x: np.ndarray, input_name: str, logits: str = "logits",
                    omega: float = OMEGA, variants: int = VARIANTS,
                    error_target: float = ERROR_TARGET) -> dict[str, Any]:
    """The paper's adaptive layer selection on clean images ``x``: amplify 1, 2, ... of the last layers, find the
    smallest count that changes at least ``error_target`` of the answers, and take ``variants`` counts from it
    (fewer where the model has fewer layers). Returns the counts and the clean error of every count tried."""
    import onnxruntime as ort

    total = amplifiable_layers(model_bytes)
    every, names = add_variants(model_bytes, list(range(1, total + 1)), logits, omega)
    session = ort.InferenceSession(every, providers=["CPUExecutionProvider"])
    outputs = session.run([logits, *names], {input_name: x})
    answer = outputs[0].argmax(axis=1)
    errors = [float((out.argmax(axis=1) != answer).mean()) for out in outputs[1:]]
    start = next((c for c, e in enumerate(errors, start=1) if e >= error_target), total)
    start = max(1, min(start, total - variants + 1))
    counts = list(range(start, min(total, start + variants - 1) + 1))
    return {"counts": counts, "omega": omega, "layers": total, "error_target": error_target,
            "clean_error_by_count": [round(e, 4) for e in errors]}


def has_batchnorm(net: Any) -> bool:
    from offline.models import module_kind

    return any(module_kind(m).startswith("BatchNorm") for m in net.modules())


def add_ibd_psc_variants(model: Any, onnx_file: Any, x: np.ndarray) -> dict[str, Any]:
    """Rewrite the exported ``onnx_file`` with the IBD-PSC variants chosen on clean ``x`` (the fit split) for the
    :class:`~offline.models.ForensicModel` ``model`` it came from; returns what the calibration and the bundle
    record (outputs, counts, omega, the clean error of every count tried)."""
    from pathlib import Path

    from offline.errors import ForensicsError
    from offline.patch.export import INPUT_NAME

    if not has_batchnorm(model.net):
        raise ForensicsError("ibd_psc amplifies BatchNorm layers and this model has none; drop it from --detectors")
    path = Path(onnx_file)
    plain = path.read_bytes()
    chosen = choose_variants(plain, np.ascontiguousarray(x, dtype=np.float32), INPUT_NAME)
    with_variants, names = add_variants(plain, chosen["counts"], omega=chosen["omega"])
    path.write_bytes(with_variants)
    return {"outputs": names, **chosen}
