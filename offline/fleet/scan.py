"""The fleet scan (``trojan-forensics fleet``): every model of a registry scanned as one Ray task each.

A model's scan is :func:`offline.scan.job.run_scan`, the function ``trojan-forensics scan`` runs, with the
same settings: a fleet verdict is the verdict a plain scan gives. The task receives the model's bytes and the
clean data through Ray's object store and returns the scan's files, so a worker on another node needs no
shared volume and the bytes hashed on the driver are the bytes scanned. The driver writes each result as it
lands (``scans/<model>-<sha>/``, then ``fleet.json`` and ``fleet.html`` again), so a killed run keeps what it
finished: a model whose SHA-256 and settings match a finished scan is not scanned again. A task that fails
(a corrupt or hostile model file, a worker that died) is recorded for its model; the others go on.
"""

from __future__ import annotations

import hashlib
import html
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from guard.bundle import sha256_file
from offline.data import Dataset
from offline.errors import ForensicsError
from offline.fleet.cluster import import_ray, node_id, ray_session, run_tasks, task_failure
from offline.jobs import TOOL_VERSION, fingerprint, step_progress, write_json_atomic, write_text_atomic
from offline.scan.settings import TRIGGER_METHODS, NeuralCleanseConfig

MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".onnx")


@dataclass
class FleetScanSettings:
    """What every model's scan runs with: ``trojan-forensics scan``'s settings. Part of each result's key."""

    config: NeuralCleanseConfig = field(default_factory=NeuralCleanseConfig)
    threshold: float = 2.0
    repeats: int = 1
    eval_fraction: float = 0.2
    recover: bool = True
    restarts: int = 3
    features_layer: str | None = None
    device: str = "cpu"

    def scan_kwargs(self) -> dict[str, Any]:
        return {"config": self.config, "threshold": self.threshold, "repeats": self.repeats,
                "eval_fraction": self.eval_fraction, "recover": self.recover, "restarts": self.restarts,
                "features_layer": self.features_layer, "device": self.device}


@dataclass
class FleetModel:
    name: str  # the path relative to where it was found, unique in the fleet
    path: Path
    sha256: str

    @property
    def result_dir(self) -> str:
        stem = self.name.rsplit(".", 1)[0].replace("/", "-").replace("\\", "-")
        return f"scans/{stem}-{self.sha256[:12]}"


def find_models(sources: Sequence[str | Path]) -> list[FleetModel]:
    """The models of ``--models``: model files, directories (searched recursively for .pt, .pth, .ts and .onnx
    files) and text files listing one model path a line (relative paths against the list's folder)."""
    found: list[tuple[str, Path]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)
            if not files:
                raise ForensicsError(f"{path}: no model files ({', '.join(MODEL_SUFFIXES)}) in this directory")
            found += [(p.relative_to(path).as_posix(), p) for p in files]
        elif path.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
            found.append((path.name, path))
        elif path.is_file():
            try:
                lines = [ln.strip() for ln in path.read_text().splitlines()]
            except (OSError, UnicodeDecodeError) as exc:
                raise ForensicsError(f"{path}: not a model file nor a readable list of model paths ({exc})") \
                    from None
            for line in (ln for ln in lines if ln and not ln.startswith("#")):
                listed = Path(line) if Path(line).is_absolute() else path.parent / line
                if not listed.is_file():
                    raise ForensicsError(f"{path}: lists {line}, which is not a file")
                found.append((line, listed))
        else:
            raise ForensicsError(f"--models {source}: no such file or directory")
    names: dict[str, int] = {}
    models = []
    for name, p in found:  # the same file name twice (two registries) keeps both, numbered
        names[name] = names.get(name, 0) + 1
        unique = name if names[name] == 1 else f"{name}#{names[name]}"
        models.append(FleetModel(unique, p, sha256_file(p)))
    return models


def data_digest(data: Dataset) -> str:
    """The clean data's SHA-256: each array's shape, then its bytes (float32 images, int64 labels)."""
    arrays = (np.ascontiguousarray(data.x, np.float32), np.ascontiguousarray(data.y, np.int64))
    return fingerprint(*(part for a in arrays for part in (str(a.shape).encode(), a.tobytes())))


def result_key(model_sha256: str, settings: FleetScanSettings, data_sha256: str) -> str:
    """What a finished scan must match to be reused: the model's bytes, the settings and the clean data."""
    return fingerprint({"model": model_sha256, "settings": asdict(settings), "data": data_sha256,
                        "version": TOOL_VERSION})


def scan_task(name: str, model_bytes: bytes, data: Dataset, settings: FleetScanSettings, threads: int) -> dict:
    """One model's scan inside a Ray worker: ``{"report", "files", "node"}`` or ``{"error", "node"}``."""
    import torch

    from offline.scan.job import run_scan

    torch.set_num_threads(threads)
    node = node_id()
    with tempfile.TemporaryDirectory(prefix="trojan-fleet-") as tmp:
        path = Path(tmp) / Path(name.split("#")[0]).name
        path.write_bytes(model_bytes)
        out = Path(tmp) / "scan"
        try:
            report = run_scan(path, data, out, progress=False, **settings.scan_kwargs())
        except ForensicsError as exc:
            return {"error": str(exc).replace(str(path), name), "node": node}
        except Exception as exc:  # noqa: BLE001 - whatever a hostile or broken model raises is that model's result
            return {"error": f"{type(exc).__name__}: {exc}".replace(str(path), name), "node": node}
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    return {"report": report, "files": files, "node": node}


def _entry(model: FleetModel, report: dict[str, Any] | None, seconds: float | None, error: str | None,
           reused: bool, node: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": model.name, "path": str(model.path), "sha256": model.sha256}
    if report is not None:
        per_class = report["per_class"]
        entry.update(verdict=report["verdict"], flagged_classes=report["flagged_classes"],
                     anomaly_indices=[round(r["anomaly_index"], 4) for r in per_class],
                     max_anomaly_index=round(max(r["anomaly_index"] for r in per_class), 4),
                     scan=f"{model.result_dir}/scan.json")
    else:
        entry.update(verdict="failed", flagged_classes=[], anomaly_indices=[], max_anomaly_index=None, scan=None)
    entry.update(seconds=None if seconds is None else round(seconds, 2), reused=reused, node=node, error=error)
    return entry


def _store(out: Path, model: FleetModel, result: dict[str, Any], key: str) -> dict[str, Any]:
    """Write a task's files to the model's result directory; scan.json last, carrying the key."""
    target = out / model.result_dir
    if target.exists():
        shutil.rmtree(target)
    for rel, data in result["files"].items():
        if rel == "scan.json" or Path(rel).is_absolute() or ".." in Path(rel).parts:
            continue  # nothing a worker returns lands outside the model's result directory
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    report = result["report"]
    report["model"]["path"] = str(model.path)
    report["fleet_key"] = key
    write_json_atomic(target / "scan.json", report)
    return report


def _finished(out: Path, model: FleetModel, key: str) -> dict[str, Any] | None:
    path = out / model.result_dir / "scan.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if report.get("fleet_key") == key else None


def run_fleet(
    sources: Sequence[str | Path],
    data: Dataset,
    out: str | Path,
    settings: FleetScanSettings | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_task: int = 1,
    fresh: bool = False,
    progress: bool = True,
    task: Callable[..., dict] = scan_task,
) -> dict[str, Any]:
    """Scan every model of ``sources`` on Ray; write ``fleet.json``, ``fleet.html`` and ``scans/`` to ``out``.

    Parameters
    ----------
    sources:
        Model files, directories and lists of paths (:func:`find_models`).
    data:
        The defender's clean images; every model is scanned on them.
    address:
        A Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); default a local cluster of
        ``num_cpus`` CPUs.
    cpus_per_task:
        CPUs Ray reserves for each scan, and its torch threads, so that workers do not oversubscribe the cores.
    fresh:
        Scan every model again, even those with a finished result under the same key.
    task:
        The function run per model (tests replace it to kill a worker).

    Returns
    -------
    The contents of ``fleet.json``.
    """
    started = time.perf_counter()
    settings = settings or FleetScanSettings()
    if settings.config.method not in TRIGGER_METHODS:
        raise ForensicsError(f"the fleet scans with {' or '.join(TRIGGER_METHODS)}, not {settings.config.method}")
    out = Path(out)
    models = find_models(sources)
    digest = data_digest(data)
    keys = {m.name: result_key(m.sha256, settings, digest) for m in models}
    entries: dict[str, dict[str, Any]] = {}
    for m in models:
        done = None if fresh else _finished(out, m, keys[m.name])
        if done is not None:
            entries[m.name] = _entry(m, done, done.get("timings", {}).get("total_seconds"), None, True, None)
    todo = [m for m in models if m.name not in entries]

    ray = import_ray()
    with ray_session(address, num_cpus) as cluster:
        write_fleet(out, _summary(models, entries, data, digest, settings, cluster, started))
        data_ref = ray.put(data)

        def jobs() -> Iterator[tuple[FleetModel, tuple]]:
            for m in todo:
                content = m.path.read_bytes()  # hashed again: the bytes scanned are the bytes listed
                if hashlib.sha256(content).hexdigest() != m.sha256:
                    entries[m.name] = _entry(m, None, None, "the file changed while the fleet ran; run the fleet "
                                             "again to scan its new contents", False, None)
                    continue
                yield m, (m.name, content, data_ref, settings, cpus_per_task)

        with step_progress(progress, len(models), "fleet scan", unit="model", initial=len(models) - len(todo)) \
                as bar:
            for m, result, seconds in run_tasks(task, jobs(), cpus_per_task):
                if isinstance(result, Exception):
                    result = {"error": f"the Ray task scanning this model failed: {task_failure(result)}",
                              "node": None}
                if "error" in result:
                    entries[m.name] = _entry(m, None, seconds, result["error"], False, result["node"])
                else:
                    report = _store(out, m, result, keys[m.name])
                    entries[m.name] = _entry(m, report, report["timings"]["total_seconds"], None, False,
                                             result["node"])
                write_fleet(out, _summary(models, entries, data, digest, settings, cluster, started))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{m.name}: {entries[m.name]['verdict']}")
        summary = _summary(models, entries, data, digest, settings, cluster, started)
        write_fleet(out, summary)
    return summary


def _summary(models: Iterable[FleetModel], entries: dict[str, dict[str, Any]], data: Dataset, digest: str,
             settings: FleetScanSettings, cluster: dict[str, Any], started: float) -> dict[str, Any]:
    listed = [entries[m.name] if m.name in entries else {**_entry(m, None, None, None, False, None),
                                                          "verdict": "pending"} for m in models]
    counts = {v: sum(e["verdict"] == v for e in listed) for v in ("backdoored", "clean", "failed", "pending")}
    return {
        "tool": "trojan-forensics fleet",
        "version": TOOL_VERSION,
        "models": listed,
        "summary": {"models": len(listed), **counts, "reused": sum(e["reused"] for e in listed)},
        "data": {"source": data.source, "images": len(data), "sha256": digest},
        "settings": asdict(settings),
        "cluster": cluster,
        "seconds": round(time.perf_counter() - started, 2),
    }


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left}th{background:#f4f4f4}
.backdoored{color:#b00020;font-weight:600}.failed{color:#8a6d00;font-weight:600}.clean{color:#1b5e20}
.pending{color:#777}td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:.9em}"""


def write_fleet(out: Path, summary: dict[str, Any]) -> None:
    """``fleet.json`` and ``fleet.html``, both replaced atomically."""
    write_json_atomic(out / "fleet.json", summary)
    s = summary["summary"]
    rows = []
    order = {"backdoored": 0, "failed": 1, "pending": 2, "clean": 3}
    for e in sorted(summary["models"], key=lambda e: (order[e["verdict"]], e["name"])):
        esc = html.escape
        link = f'<a href="{esc(e["scan"])}">scan.json</a>' if e["scan"] else ""
        flagged = ", ".join(map(str, e["flagged_classes"])) or "-"
        peak = "-" if e["max_anomaly_index"] is None else f"{e['max_anomaly_index']:.2f}"
        secs = "-" if e["seconds"] is None else f"{e['seconds']:.0f}" + (" (reused)" if e["reused"] else "")
        rows.append(f'<tr><td><code>{esc(e["name"])}</code></td><td class="{e["verdict"]}">{e["verdict"]}</td>'
                    f'<td>{esc(flagged)}</td><td class="num">{peak}</td><td class="num">{secs}</td>'
                    f'<td><code>{e["sha256"][:12]}</code></td><td>{link}</td><td>{esc(e["error"] or "")}</td></tr>')
    body = (f"<h1>Fleet scan</h1><p>{s['models']} models: <span class=backdoored>{s['backdoored']} backdoored"
            f"</span>, {s['clean']} clean, <span class=failed>{s['failed']} failed</span>"
            + (f", {s['pending']} pending" if s["pending"] else "")
            + f"; {s['reused']} reused from an earlier run. Clean data: {html.escape(summary['data']['source'])} "
            f"({summary['data']['images']} images). Method: {summary['settings']['config']['method']}, "
            f"anomaly threshold {summary['settings']['threshold']:g}; cluster: {summary['cluster']['nodes']} "
            f"node(s), {summary['cluster']['cpus']} CPUs; {summary['seconds']:.0f} s.</p>"
            "<table><tr><th>model</th><th>verdict</th><th>flagged classes</th><th>max anomaly index</th>"
            "<th>seconds</th><th>SHA-256</th><th>result</th><th>error</th></tr>" + "".join(rows) + "</table>")
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>trojan-forensics fleet</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")
    write_text_atomic(out / "fleet.html", page)
