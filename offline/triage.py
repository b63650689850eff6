"""Triage of a suspect model file before anything loads it.

A model handed over for forensics is suspect by definition, and a pickle runs
code when it is loaded. TorchScript archives and ``torch.save`` files are zips
of pickles, so every pickle inside is scanned with ``modelscan`` (Protect AI)
for globals that execute code (``os.system``, ``builtins.exec``, ...) before
``torch.jit.load`` sees the file. ONNX is protobuf and carries no code, so it
is not scanned. A ``torch.save`` pickle is refused even when it looks clean:
loading it means unpickling arbitrary classes, and the job needs a graph it can
run without the training code anyway (TorchScript or ONNX).

TorchScript also carries code of its own, which no pickle scanner sees: a
``forward`` may call ``torch.from_file`` and read any file the job can read.
So a TorchScript archive whose code defines ``__setstate__`` (which
``torch.jit.load`` runs) is refused before loading, and once loaded, before
anything runs, :func:`check_torchscript_ops` walks the graph of every method
of every submodule, with called functions and methods inlined, and refuses
ops outside the allow-list: TorchScript's own control-flow and container ops
(``prim::``), ATen tensor maths except the file, storage and serialisation
ops (``aten::from_file``, ``aten::save``, ``aten::set_`` on a storage, any op
taking a ``Storage``), and nothing from any other namespace (custom
libraries' ``torch.ops``, the profiler, distributed and debugging ops).
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Any

from offline.errors import ModelLoadError

EXPORT_HINT = ("export it with torch.jit.script(model).save('model.pt') (or torch.jit.trace) or "
               "torch.onnx.export(model, example, 'model.onnx')")


def _torchscript_zip(path: Path) -> bool | None:
    """True for a TorchScript archive, False for a torch.save zip, None when not a zip."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    return any("/code/" in n or n.startswith("code/") for n in names) and any(n.endswith("constants.pkl")
                                                                             for n in names)


# TorchScript's own ops: constants, attributes, containers, control flow, casts; no I/O (prim::Print refused)
PRIM_ALLOWED = frozenset(f"prim::{op}" for op in (
    "Constant", "GetAttr", "SetAttr", "ListConstruct", "ListUnpack", "TupleConstruct", "TupleUnpack", "TupleIndex",
    "TupleSlice", "DictConstruct", "If", "Loop", "CallMethod", "CallFunction", "RaiseException", "Uninitialized",
    "unchecked_cast", "unchecked_unwrap_optional", "isinstance", "NumToTensor", "ImplicitTensorToNum", "dtype",
    "device", "layout", "shape", "requires_grad", "data", "min", "max", "abs", "id", "ConstantChunk", "TypeCheck",
    "AutogradZero", "AutogradAdd", "ListIndex", "EnumValue", "EnumName", "tolist", "type", "grad", "is_cuda",
    "is_cpu", "is_xpu", "is_sparse", "is_sparse_csr", "is_mkldnn", "is_quantized", "is_meta", "is_nested",
    "is_vulkan", "is_ipu", "is_mps", "is_maia", "is_xla", "is_mtia", "is_lazy", "name", "index", "range",
    "StringIndex", "__contains__", "__is__", "__isnot__", "__not__", "dict", "iter", "rangelist"))
# ATen ops that read or write files, or reach memory through a storage
ATEN_REFUSED = frozenset({"aten::from_file", "aten::save", "aten::set", "aten::set_", "aten::_set_storage"})
_SETSTATE = re.compile(rb"\bdef\s+__setstate__\s*\(")


def _refused_op(node: Any) -> str | None:
    """Why a graph node's op is outside the allow-list, or None when it is allowed."""
    kind = node.kind()
    namespace = kind.split("::", 1)[0]
    if namespace == "prim":
        return None if kind in PRIM_ALLOWED else "not among TorchScript's allowed control-flow and container ops"
    if namespace != "aten":
        return f"an op of the '{namespace}' library, not tensor maths (only aten and prim ops are allowed)"
    if kind in ATEN_REFUSED or "from_file" in kind:
        return "a file or storage op"
    if any("Storage" in str(value.type()) for value in [*node.inputs(), *node.outputs()]):
        return "an op on a raw storage"
    return None


def check_torchscript_ops(module: Any, path: str | Path) -> dict[str, Any]:
    """Refuse a loaded TorchScript module whose code holds an op outside the allow-list; run nothing.

    Every method of every submodule is inspected, with the functions and
    methods it calls inlined. Returns ``{"methods", "ops"}`` (what was checked,
    for the report's triage); raises :class:`ModelLoadError` naming the op and
    the method that holds it.
    """
    import torch

    ops: set[str] = set()
    methods = 0
    for prefix, sub in module.named_modules():
        script = getattr(sub, "_c", None)
        if script is None:
            continue
        for name in script._method_names():
            graph = script._get_method(name).graph.copy()
            torch._C._jit_pass_inline(graph)
            methods += 1
            blocks = [graph.block()] if hasattr(graph, "block") else [graph]
            while blocks:
                for node in blocks.pop().nodes():
                    ops.add(node.kind())
                    why = _refused_op(node)
                    if why:
                        where = f"{prefix + '.' if prefix else ''}{name}"
                        raise ModelLoadError(f"{path}: refused, the TorchScript code of {where}() calls "
                                             f"{node.kind()}, {why}; the job runs only tensor maths from a "
                                             f"suspect model (do not load it outside a sandbox)")
                    blocks.extend(node.blocks())
    return {"methods": methods, "ops": sorted(ops)}


def _setstate_in_code(path: Path) -> str | None:
    """The archive member whose TorchScript code defines ``__setstate__`` (run by torch.jit.load), if any."""
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if "/code/" in name or name.startswith("code/"):
                if name.endswith(".py") and _SETSTATE.search(z.read(name)):
                    return name
    return None


def triage_model(path: str | Path) -> dict[str, Any]:
    """What the file is and what ``modelscan`` found in it; raises :class:`ModelLoadError` when unsafe.

    Returns ``{"format", "scanner", "scanned", "findings"}`` for the report's triage.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return {"format": "ONNX", "scanner": None, "scanned": [], "findings": [],
                "note": "protobuf: carries no code, not scanned"}
    from modelscan.modelscan import ModelScan

    logging.getLogger("modelscan").setLevel(logging.ERROR)
    scanner = ModelScan()
    scanner.scan(path)
    findings = [{"severity": i.severity.name, "global": f"{i.details.module}.{i.details.operator}",
                 "where": str(i.details.source)} for i in scanner.issues.all_issues]
    result = {"format": {True: "TorchScript", False: "torch.save pickle", None: "pickle or unknown"}[
                  _torchscript_zip(path)],
              "scanner": "modelscan", "scanned": [str(s) for s in scanner.scanned], "findings": findings,
              "errors": [str(e) for e in scanner.errors]}
    if findings:
        first = findings[0]
        more = f" (and {len(findings) - 1} more finding(s))" if len(findings) > 1 else ""
        raise ModelLoadError(f"{path}: refused, the file carries code that would run when it is loaded: "
                             f"{first['severity']} {first['global']} in {first['where']}{more} (modelscan); "
                             f"do not load it outside a sandbox")
    if result["format"] != "TorchScript":
        raise ModelLoadError(f"{path}: not a TorchScript model (a {result['format']}); unpickling it would run "
                             f"whatever classes it names, so the job does not load it: {EXPORT_HINT}")
    member = _setstate_in_code(path)
    if member:
        raise ModelLoadError(f"{path}: refused, its TorchScript code defines __setstate__ ({member}), which "
                             f"torch.jit.load would run before its ops can be checked; {EXPORT_HINT}")
    return result
