"""What every forensics job shares: loading a model with its clean data, progress bars, atomic JSON files.

The jobs themselves: :mod:`offline.scan.job`, :mod:`offline.patch.job`, :mod:`offline.audit`."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guard.bundle import sha256_file
from offline.data import Dataset, load_dataset
from offline.errors import DataError
from offline.models import ForensicModel, load_model, resolve_device

TOOL_VERSION = "0.1.0"


def fingerprint(*parts: Any) -> str:
    """SHA-256 over ``parts``: bytes as they are, anything else as sorted JSON. What a finished result must
    match to be reused (the patch job's phases, the fleet's scans)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    write_text_atomic(path, json.dumps(payload, indent=2))


@contextmanager
def step_progress(enabled: bool, total: int, desc: str, unit: str = "step", initial: int = 0) -> Iterator[Any]:
    """A tqdm bar over ``total`` units (optimisation steps, models; ``initial`` already done) to stderr, or a
    no-op (None) when disabled."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and pipes
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True, disable=None)
    try:
        yield bar
    finally:
        bar.close()


@dataclass
class LoadedCase:
    model: ForensicModel
    data: Dataset
    num_classes: int
    model_sha256: str


def load_case(model_path: str | Path, data_spec: str | Dataset, features_layer: str | None,
              device: str = "cpu") -> LoadedCase:
    """Load data (a spec as ``--data`` takes it, or a loaded :class:`Dataset`) and model, check that they belong
    together, and run the model on ``device`` (``auto``: the GPU where torch sees one)."""
    data = data_spec if isinstance(data_spec, Dataset) else load_dataset(data_spec)
    target = resolve_device(device)  # before the model loads: a missing GPU is a quick, clear error
    model = load_model(model_path, data.x[:8], features_layer).to_device(target)
    with torch.no_grad():
        num_classes = int(model(torch.from_numpy(data.x[:2])).shape[1])
    if int(data.y.max()) >= num_classes:
        raise DataError(
            f"{data.source}: labels go up to {int(data.y.max())} but the model has only {num_classes} outputs"
        )
    if len(data.class_names) != num_classes:
        data.class_names = [str(c) for c in range(num_classes)]
    return LoadedCase(model, data, num_classes, sha256_file(model_path))
