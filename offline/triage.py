"""Triage of a suspect model file before anything loads it.

A model handed over for forensics is suspect by definition, and a pickle runs
code when it is loaded. TorchScript archives and ``torch.save`` files are zips
of pickles, so every pickle inside is scanned with ``modelscan`` (Protect AI)
for globals that execute code (``os.system``, ``builtins.exec``, ...) before
``torch.jit.load`` sees the file. ONNX is protobuf and carries no code, so it
is not scanned. A ``torch.save`` pickle is refused even when it looks clean:
loading it means unpickling arbitrary classes, and the job needs a graph it can
run without the training code anyway (TorchScript or ONNX).
"""

from __future__ import annotations

import logging
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
    return result
