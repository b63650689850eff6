"""MNTD's shadow models: clean ones and ones backdoored with a trigger drawn from the jumbo distribution (Xu et
al., IEEE S&P 2021, section IV-B: patch or blended triggers of random size, place, pattern, transparency,
target and poisoning rate), trained on the defender's clean images as Ray tasks.

Shadow ``i`` is drawn from ``(seed, i)`` alone, and each finished shadow is written (its weights as ``.npz``:
arrays, no code) and listed in ``shadows.jsonl`` as it lands, so a killed run resumes where it stopped and a
larger ``--shadows`` adds to the ones there. Even indices are clean, odd ones backdoored: any prefix is balanced.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offline.data import Dataset
from offline.errors import ForensicsError
from offline.flags import fraction, option, positive
from offline.fleet.cluster import import_ray, node_id, ray_session, run_tasks, task_failure
from offline.jobs import step_progress, write_json_atomic


@dataclass(frozen=True)
class ShadowSettings:
    """How shadows are drawn and trained; part of the key a shadow directory is kept under."""

    arch: str = option("cnn", "shadow architecture: the project's small CNN or resnet18 (the one closest to the "
                              "models to be judged)", choices=("cnn", "resnet18"))
    width: int | None = option(None, "features size (cnn) or first-stage channels (resnet18) of the shadows",
                               type=positive(int), default_text="the architecture's own")
    epochs: int = option(30, "training epochs of each shadow (a few hundred images need many)", type=positive(int))
    min_rate: float = option(0.05, "jumbo: least poisoned share of a backdoored shadow's training set",
                             type=fraction)
    max_rate: float = option(0.5, "jumbo: largest poisoned share", type=fraction)
    min_patch: int = option(2, "jumbo: smallest patch side, pixels", type=positive(int))
    max_patch: int = option(5, "jumbo: largest patch side, pixels", type=positive(int))
    min_alpha: float = option(0.05, "jumbo: least blend weight of a blended trigger", type=fraction)
    max_alpha: float = option(0.2, "jumbo: largest blend weight", type=fraction)
    held_out: float = option(0.2, "share of the clean images each shadow keeps out to measure its accuracy and "
                                  "attack success rate", type=fraction)
    seed: int = option(0, "seed of the draws")


def draw_shadow(index: int, settings: ShadowSettings, num_classes: int, shape: tuple[int, int, int]) -> dict:
    """Shadow ``index``'s recipe: clean (even indices) or a jumbo trigger, target and poisoning rate."""
    rng = np.random.default_rng([settings.seed, index])
    recipe: dict[str, Any] = {"index": index, "train_seed": int(rng.integers(2**31))}
    if index % 2 == 0:
        return {**recipe, "backdoored": False}
    recipe.update(backdoored=True, target=int(rng.integers(num_classes)),
                  poison_rate=float(rng.uniform(settings.min_rate, settings.max_rate)))
    _, height, width = shape
    if rng.random() < 0.5:
        size = int(rng.integers(settings.min_patch, min(settings.max_patch, height - 1, width - 1) + 1))
        recipe["trigger"] = {"kind": "patch", "size": size, "row": int(rng.integers(0, height - size + 1)),
                             "col": int(rng.integers(0, width - size + 1)),
                             "pattern": str(rng.choice(["white", "checker", "random"])),
                             "seed": int(rng.integers(2**31))}
    else:
        recipe["trigger"] = {"kind": "blend", "alpha": float(rng.uniform(settings.min_alpha, settings.max_alpha)),
                             "seed": int(rng.integers(2**31))}
    return recipe


def _trigger(recipe: dict) -> Any:
    from offline.attacks import BlendTrigger, PatchTrigger

    t = recipe["trigger"]
    if t["kind"] == "patch":
        return PatchTrigger(t["size"], t["row"], t["col"], t["pattern"], t["seed"])
    return BlendTrigger(t["alpha"], t["seed"])


def build_shadow_net(settings: ShadowSettings, shape: tuple[int, int, int], num_classes: int) -> Any:
    from offline.models import build_architecture

    return build_architecture(settings.arch, shape, num_classes, settings.width)


def shadow_task(recipe: dict, data: Dataset, settings: ShadowSettings, threads: int) -> dict:
    """Train one shadow inside a Ray worker; returns its recipe with accuracy, ASR, seconds and weights."""
    import torch

    from offline.attacks import train_backdoored_model, training_setup

    torch.set_num_threads(threads)
    started = time.perf_counter()
    fit, test = data.split(settings.held_out, seed=recipe["train_seed"] % 1000)
    trigger = _trigger(recipe) if recipe["backdoored"] else None
    with training_setup(settings.arch, settings.width):
        result = train_backdoored_model(fit, test, trigger, recipe.get("target", 0), recipe.get("poison_rate", 0.0),
                                        epochs=settings.epochs, seed=recipe["train_seed"])
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in result.model.state_dict().items()})
    return {**recipe, "node": node_id(), "clean_accuracy": round(result.clean_accuracy, 4),
            "attack_success_rate": None if result.attack_success_rate is None else
            round(result.attack_success_rate, 4), "seconds": round(time.perf_counter() - started, 2),
            "weights": buf.getvalue()}


def _key(settings: ShadowSettings, data: Dataset) -> dict[str, Any]:
    from offline.fleet.scan import data_digest

    return {"settings": asdict(settings), "data_sha256": data_digest(data), "input_shape": list(data.input_shape),
            "num_classes": data.num_classes}


def train_shadows(
    data: Dataset,
    out: str | Path,
    count: int,
    settings: ShadowSettings | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_task: int = 1,
    fresh: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train shadows ``0 .. count-1`` into ``out`` (``shadows.json``, ``shadows.jsonl``, ``shadow-NNNNN.npz``),
    one Ray task each, skipping those already there; returns every listed shadow's record, by index."""
    settings = settings or ShadowSettings()
    out = Path(out)
    key = _key(settings, data)
    listing, index_file = out / "shadows.jsonl", out / "shadows.json"
    if fresh and out.exists():
        for p in [*out.glob("shadow-*.npz"), listing, index_file]:
            p.unlink(missing_ok=True)
    if index_file.exists():
        kept = json.loads(index_file.read_text())
        if kept != key:
            raise ForensicsError(f"{out} holds shadows trained with other settings or clean data; give another "
                                 f"directory or --fresh to train them again")
    else:
        write_json_atomic(index_file, key)
    records = {r["index"]: r for r in read_listing(out)}
    todo = [draw_shadow(i, settings, data.num_classes, data.input_shape) for i in range(count) if i not in records]
    if todo:
        ray = import_ray()
        with ray_session(address, num_cpus) as cluster:
            say(f"training {len(todo)} shadow models on {cluster['nodes']} Ray node(s), {cluster['cpus']} CPUs "
                f"({len(records)} already trained in {out})")
            data_ref = ray.put(data)
            jobs = ((r, (r, data_ref, settings, cpus_per_task)) for r in todo)
            with step_progress(progress, count, "shadows", unit="model", initial=count - len(todo)) as bar:
                for recipe, record, _ in run_tasks(shadow_task, jobs, cpus_per_task):
                    if bar is not None:
                        bar.update(1)
                    if isinstance(record, Exception):
                        say(f"shadow {recipe['index']} failed ({task_failure(record)}); a rerun trains it again")
                        continue
                    weights = record.pop("weights")
                    name = f"shadow-{record['index']:05d}.npz"
                    (out / name).write_bytes(weights)
                    record.update(file=name, sha256=hashlib.sha256(weights).hexdigest())
                    with listing.open("a") as fh:  # one line per shadow, after its file: a resume never sees half
                        fh.write(json.dumps(record) + "\n")
                    records[record["index"]] = record
    return [records[i] for i in sorted(records) if i < count]


def read_listing(out: Path) -> list[dict[str, Any]]:
    """The shadows listed in ``shadows.jsonl`` whose file is there and matches its digest."""
    listing = out / "shadows.jsonl"
    if not listing.exists():
        return []
    records = []
    for line in listing.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        path = out / record["file"]
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]:
            records.append(record)
    return records


def load_shadow(out: Path, record: dict, settings: ShadowSettings, shape: tuple[int, int, int],
                num_classes: int) -> Any:
    """A shadow as an eval-mode torch module, its parameters frozen."""
    import torch

    net = build_shadow_net(settings, shape, num_classes)
    with np.load(out / record["file"], allow_pickle=False) as arrays:
        net.load_state_dict({k: torch.from_numpy(arrays[k]) for k in arrays.files})
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
