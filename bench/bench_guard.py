"""The guard's serving cost, and its STRIP against ART's, side by side in one run.

Run: ``.venv/bin/python bench/bench_guard.py [--seconds 8] [--parts a,a2,b,c] [--out bench-out/guard]``
(``make bench`` installs adversarial-robustness-toolbox into .venv first).

Model: the zoo's BadNets 3x3 top-left patch (target 1, seed 31), which no
setting was tuned on, with a guard-only bundle (``--repair none``) so that the
trigger still works and the screens have something to catch.

A. Latency and throughput. (a) ``trojan-guard serve`` (embedded onnxruntime,
   default batching) as a separate process, driven through gRPC by 1, 4 and 8
   client threads, one image per request; (b) the bare cost of the same work:
   ``session.run`` on the request's N+1 images (the input and its N STRIP
   blends, precomputed), driven the same way in this process. Targets: guard
   p50 at concurrency 1 within 1.5x of (b), guard throughput at concurrency 8 at
   least 0.7x of (b)'s. (c) A no-op gRPC call (ServerLive) to the same guard
   from the same client: the floor of any Python gRPC service here.
A2. The same with a heavier model (an untrained CNN of about 4 M multiply-adds
   per image, served from a bundle that keeps the zoo model's thresholds: the
   verdicts mean nothing, only the cost counts), to show how the guard's fixed
   per-request cost weighs once the forward passes cost milliseconds.
B. ART's STRIP (``art.defences.transformer.poisoning.STRIP``) on the same
   model (onnxruntime behind ART's BlackBoxClassifierNeuralNetwork), the same N
   and the same calibration split: time per input, and the share of triggered
   inputs each lets through at equal FRR (each method's threshold at the 1 %
   quantile of its own scores on the calibration split, measured on the test
   split). ART's score is the entropy of each class's column across the N
   blends (summed, divided by N) after averaging the two images (alpha 0.5);
   ours is the mean over blends of each blend's entropy (the paper's rule),
   blending by the bundle's rule. ART's own normal-fit threshold is reported too.
C. The cost of the detectors: bundles of the same model and scan calibrated
   with the previous guard's screens (STRIP at a fixed n=20 plus the activation
   filter, each at its own budget), the default (sequential STRIP, k-NN, the
   filter) and every detector (plus Mahalanobis; sequential and fixed-n
   STRIP), each served by ``trojan-guard serve`` and driven at concurrency 1
   and 8: p50 and throughput, and their ratios against the previous guard.

``--peers LIST``: the guard beside KServe, MLServer and Triton (bench/guard_peers.py); ``--workers LIST``
(e.g. 1,2): ``serve --workers K`` for each K, driven at concurrency 1, 8 and 16 by one tritonclient process
whose threads each hold a connection of their own (the kernel spreads connections, not calls, over the
workers): throughput against one worker, and the client's CPU share (on a small machine the client competes
with the workers for the same cores). Both write bench-out/guard_{peers,workers}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_patch import _case  # noqa: E402
from bench_scan import ZOO  # noqa: E402
from drive import drive  # noqa: E402

from guard.backends import EmbeddedBackend  # noqa: E402
from guard.bundle import GuardBundle  # noqa: E402
from guard.screens import Screen, StripScreen, softmax  # noqa: E402
from guard.transport.client import local_guard  # noqa: E402
from guard.transport.proto import inference_pb2 as pb  # noqa: E402
from offline.data import load_dataset  # noqa: E402
from offline.patch.job import PatchSettings, run_patch, split_clean  # noqa: E402
from offline.patch.repair import RepairSettings  # noqa: E402

MODEL = "patch-3x3-top-left-white"
LEVELS = (1, 4, 8)


def heavier_bundle(src: Path, out: Path, width: int = 32) -> Path:
    """``src`` with its model swapped for a heavier CNN (same input, logits and 64 features); ``width``: the
    first convolution's channels (32: about 4 M multiply-adds per image; 64: about 15 M)."""
    import torch
    from torch import nn

    from guard.bundle import sha256_file, write_bundle
    from offline.models import ForensicModel
    from offline.patch.export import export_onnx

    if (out / "guard.json").exists():
        return out
    bundle = GuardBundle.load(src)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(2 * width * 7 * 7, 64), nn.ReLU(), nn.Linear(64, len(bundle.manifest.class_names)))
    onnx_path = out.parent / f"heavier-{width}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(ForensicModel(net.eval(), "8"), onnx_path, bundle.pool[:16])
    m = bundle.manifest
    manifest = m.model_copy(update={"model": m.model.model_copy(update={"sha256": sha256_file(onnx_path)})})
    files = {name: bundle.root / name for name, _ in m.files()}
    files[m.model.file] = onnx_path
    return write_bundle(out, manifest, files)


def part_a(bundle_dir: Path, images: np.ndarray, seconds: float, levels: tuple[int, ...] = LEVELS,
           title: str = "A. one image per request") -> dict:
    bundle = GuardBundle.load(bundle_dir)
    m = bundle.manifest
    strip = Screen([StripScreen(bundle.pool, m.strip.n, m.strip.blend_rule)])
    batches = [strip.model_batch(x[None])[0] for x in images[:64]]  # the input and all N blends, fixed n
    backend = EmbeddedBackend(bundle.model_path, m.input.name)
    for b in batches[:5]:
        backend.infer(b)
    rows = {}
    with local_guard(bundle_dir, "--policy", "flag") as client:
        singles = [x[None] for x in images[:64]]
        for x in singles[:5]:
            client.infer(x)

        def through_guard(x: np.ndarray) -> None:
            answer = client.infer(x)
            if not answer.answered:
                raise RuntimeError(f"{answer.code}: {answer.message}")

        live = pb.ServerLiveRequest()
        for c in levels:
            rows[c] = {"bare": drive(backend.infer, batches, c, seconds),
                       "guard": drive(through_guard, singles, c, seconds),
                       "floor": drive(lambda _: client.stub.ServerLive(live), [0], c, seconds / 2)}
    print(f"\n{title}, N={m.strip.n} STRIP blends: the guard through gRPC vs bare onnxruntime "
          f"running the same {m.strip.n + 1} images ({seconds:.0f} s per cell)")
    print(f"{'concurrency':>11} {'bare p50':>9} {'bare p99':>9} {'bare/s':>8} | {'guard p50':>9} {'guard p99':>9} "
          f"{'guard/s':>8} | {'p50 ratio':>9} {'rate ratio':>10} | {'no-op p50':>9} {'no-op/s':>8}")
    for c, r in rows.items():
        b, g, f = r["bare"], r["guard"], r["floor"]
        print(f"{c:>11} {b['p50_ms']:>7.2f}ms {b['p99_ms']:>7.2f}ms {b['per_s']:>8.0f} | {g['p50_ms']:>7.2f}ms "
              f"{g['p99_ms']:>7.2f}ms {g['per_s']:>8.0f} | {g['p50_ms'] / b['p50_ms']:>8.2f}x "
              f"{g['per_s'] / b['per_s']:>9.2f}x | {f['p50_ms']:>7.2f}ms {f['per_s']:>8.0f}")
    print("no-op: a ServerLive round trip to the same guard from the same client, the floor of any Python gRPC "
          "service on this machine")
    p50_ratio = rows[levels[0]]["guard"]["p50_ms"] / rows[levels[0]]["bare"]["p50_ms"]
    rate_ratio = rows[levels[-1]]["guard"]["per_s"] / rows[levels[-1]]["bare"]["per_s"]
    print(f"target p50 at concurrency 1 <= 1.5x bare: {p50_ratio:.2f}x {'MET' if p50_ratio <= 1.5 else 'NOT MET'}; "
          f"target throughput at concurrency 8 >= 0.7x bare: {rate_ratio:.2f}x "
          f"{'MET' if rate_ratio >= 0.7 else 'NOT MET'}")
    return {"rows": rows, "p50_ratio_c1": p50_ratio, "throughput_ratio_c8": rate_ratio}


def part_b(bundle_dir: Path, calib_x: np.ndarray, test_x: np.ndarray, triggered_x: np.ndarray) -> dict:
    from art.defences.transformer.poisoning import STRIP
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork
    from scipy.stats import entropy as scipy_entropy

    bundle = GuardBundle.load(bundle_dir)
    m = bundle.manifest
    n, k = m.strip.n, len(m.class_names)
    backend = EmbeddedBackend(bundle.model_path, m.input.name)
    calls: list[np.ndarray] = []

    def predict(x: np.ndarray) -> np.ndarray:
        probs = softmax(backend.infer(x.astype(np.float32))[0].astype(np.float64))
        calls.append(probs)
        return probs

    classifier = BlackBoxClassifierNeuralNetwork(predict, tuple(m.input.shape[1:]), k, clip_values=(0.0, 1.0))
    art_strip = STRIP(classifier)(num_samples=n, false_acceptance_rate=0.01)
    np.random.seed(0)
    art_strip.mitigate(calib_x)

    def art_scores(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """ART's verdicts, and its per-input score recomputed from the blends ART itself predicted on."""
        calls.clear()
        start = time.perf_counter()
        out = art_strip.predict(x)
        seconds = time.perf_counter() - start
        blends = calls[-len(x):]  # one call per input, after the plain prediction of the batch
        scores = np.array([np.sum(scipy_entropy(p, base=2, axis=0)) / n for p in blends])
        return scores, ~out.any(axis=1), seconds / len(x)

    ours = StripScreen(bundle.pool, n, m.strip.blend_rule, seed=0)

    def our_scores(x: np.ndarray) -> tuple[np.ndarray, float, float]:
        def score(batch: np.ndarray) -> np.ndarray:
            return ours.per_blend(backend.infer(ours.extra_rows(batch))[0]).mean(axis=1)

        start = time.perf_counter()
        one = np.concatenate([score(x[i:i + 1]) for i in range(len(x))])
        single = (time.perf_counter() - start) / len(x)
        start = time.perf_counter()
        score(x)
        batched = (time.perf_counter() - start) / len(x)
        return one, single, batched

    art_calib, _, _ = art_scores(calib_x)
    art_clean, art_clean_abstain, art_t_clean = art_scores(test_x)
    art_trig, art_trig_abstain, art_t_trig = art_scores(triggered_x)
    our_calib, _, _ = our_scores(calib_x)
    our_clean, our_t1, our_tb = our_scores(test_x)
    our_trig, _, _ = our_scores(triggered_x)
    rows = {}
    for name, calib, clean, trig in (("ART STRIP", art_calib, art_clean, art_trig),
                                     ("trojan-guard STRIP", our_calib, our_clean, our_trig)):
        thr = float(np.quantile(calib, 0.01))  # low entropy is suspicious: 1 % of clean calibration below
        rows[name] = {"threshold": thr, "frr": float((clean < thr).mean()), "far": float((trig >= thr).mean())}
    art_own = {"threshold": float(art_strip.entropy_threshold), "frr": float(art_clean_abstain.mean()),
               "far": float((~art_trig_abstain).mean())}
    art_time = (art_t_clean + art_t_trig) / 2
    print(f"\nB. STRIP against ART's (N={n}; calibration {len(calib_x)}, test {len(test_x)} clean and "
          f"{len(triggered_x)} triggered images)")
    print(f"{'method':<34} {'threshold':>10} {'test FRR':>9} {'FAR (triggered passing)':>24}")
    for name, r in rows.items():
        print(f"{name + ' @ 1% calib quantile':<34} {r['threshold']:>10.4f} {r['frr']:>9.1%} {r['far']:>24.1%}")
    print(f"{'ART STRIP, its own normal fit':<34} {art_own['threshold']:>10.4f} {art_own['frr']:>9.1%} "
          f"{art_own['far']:>24.1%}")
    print(f"time per input: ART {art_time * 1000:.2f} ms; ours one input at a time {our_t1 * 1000:.2f} ms "
          f"({art_time / our_t1:.1f}x faster), batched {our_tb * 1000:.2f} ms ({art_time / our_tb:.1f}x faster)")
    return {"equal_frr": rows, "art_own_threshold": art_own, "ms_per_input": {
        "art": art_time * 1000, "ours_single": our_t1 * 1000, "ours_batched": our_tb * 1000}}


# part C: bundles of the same model and scan, calibrated differently (name, CalibrationSettings keywords)
VARIANTS = (
    ("previous: STRIP n=20 + filter, two budgets", dict(detectors=("strip",), strip_n=20, strip_group=0,
                                                        strip_by_class=False, filter="always", strip_frr=0.01,
                                                        filter_fpr=0.05)),
    ("before issue 32: bag p-values, Fisher's rule", dict(rule="fisher", p_values="bag")),
    ("default: sequential STRIP + k-NN + filter", {}),
    ("every detector: + Mahalanobis", dict(detectors=("strip", "knn", "mahalanobis"))),
    ("every detector, STRIP fixed n", dict(detectors=("strip", "knn", "mahalanobis"), strip_group=0)),
)


def part_c(case: Path, images: np.ndarray, seconds: float) -> dict:
    """The guard's cost per request with each set of detectors, through gRPC, in one run."""
    from offline.patch.calibrate import CalibrationSettings

    rows = {}
    for i, (name, kwargs) in enumerate(VARIANTS):
        bundle = case / "variants" / str(i)
        run_patch(case / "model.pt", str(case / "clean.npz"), bundle,
                  settings=PatchSettings(repair=RepairSettings(method="none"),
                                         calibration=CalibrationSettings(**kwargs)),
                  work_dir=case / "work", progress=False, say=lambda _: None)
        loaded = GuardBundle.load(bundle)
        m = loaded.manifest
        backend = EmbeddedBackend(loaded.model_path, m.input.name)
        screen = loaded.screen(seed=7)
        passes = float(np.mean([screen.run(backend.infer, x[None]).forward_passes[0] for x in images[:256]]))
        with local_guard(bundle, "--policy", "flag") as client:
            singles = [x[None] for x in images[:64]]
            for x in singles[:5]:
                client.infer(x)
            rows[name] = {"detectors": m.verdict.detectors, "strip_n": m.strip.n if m.strip else None,
                          "rows_per_request": passes,
                          **{f"c{c}": drive(lambda x: client.infer(x), singles, c, seconds) for c in (1, 8)}}
    base, before = rows[VARIANTS[0][0]], rows[VARIANTS[1][0]]
    print(f"\nC. the guard's cost per request by detectors ({seconds:.0f} s per cell; ratios against the previous "
          f"guard, STRIP n=20 fixed plus the filter, and against the verdict before issue 32; rows: model rows per "
          f"clean request, in-process)")
    print(f"{'bundle':<46} {'rows':>6} {'c1 p50':>8} {'c1 p99':>8} {'c8 req/s':>9} | {'p50 ratio':>9} "
          f"{'rate ratio':>10} | {'rows / #32':>10} {'p50 / #32':>9}")
    for name, r in rows.items():
        print(f"{name:<46} {r['rows_per_request']:>6.1f} {r['c1']['p50_ms']:>6.2f}ms {r['c1']['p99_ms']:>6.2f}ms "
              f"{r['c8']['per_s']:>9.0f} | {r['c1']['p50_ms'] / base['c1']['p50_ms']:>8.2f}x "
              f"{r['c8']['per_s'] / base['c8']['per_s']:>9.2f}x | "
              f"{r['rows_per_request'] / before['rows_per_request']:>9.2f}x "
              f"{r['c1']['p50_ms'] / before['c1']['p50_ms']:>8.2f}x")
    return rows


PEER_LEVELS = (1, 4, 8, 16)


def part_peers(bundle_dir: Path, images: np.ndarray, seconds: float, peers: list[str], out: Path) -> dict:
    """The guard beside KServe, MLServer and Triton (pytriton) serving the same model unscreened, and in upstream
    mode in front of each (bench/guard_peers.py says how each runs)."""
    from guard_peers import MODEL_NAME, drive_cells, peer_server

    bundle = GuardBundle.load(bundle_dir)
    m = bundle.manifest
    strip = Screen([StripScreen(bundle.pool, m.strip.n, m.strip.blend_rule)])
    batches = np.stack([strip.model_batch(x[None])[0] for x in images[:32]]).astype(np.float32)
    singles = images[:64, None].astype(np.float32)
    rows: dict[str, dict[int, dict]] = {}

    def cells(name: str, port: int, model: str, items: np.ndarray) -> None:
        rows[name] = drive_cells(port, model, m.input.name, items, seconds, PEER_LEVELS,
                                 out / "peers" / "client" / name.replace(" ", "_"))
        print(f"  {name:>18}: " + "  ".join(f"c{c} p50 {r['p50_ms']:.2f} ms {r['per_s']:.0f}/s"
                                            + (f" ({r['errors']} errors)" if r["errors"] else "")
                                            for c, r in rows[name].items()))

    def port_of(client) -> int:
        return int(client.target.rsplit(":", 1)[1])

    print(f"\nPEERS: one request = {batches.shape[1]} images ({m.strip.n} STRIP blends + the input) to a peer, "
          f"one image (screened) to the guard; tritonclient.grpc, {seconds:.0f} s per cell")
    with local_guard(bundle_dir, "--policy", "flag") as guard:
        cells("guard (embedded)", port_of(guard), guard.model, singles)
    for peer in peers:
        with peer_server(peer, bundle.model_path, out / "peers") as port:
            cells(peer, port, MODEL_NAME, batches)
            for rounds, label in (("on", f"guard + {peer}"), ("off", f"guard + {peer}, one call")):
                with local_guard(bundle_dir, "--policy", "flag", "--backend", "upstream", "--upstream",
                                 f"127.0.0.1:{port}", "--upstream-model", MODEL_NAME, "--strip-rounds",
                                 rounds) as guard:
                    cells(label, port_of(guard), guard.model, singles)
    guard_row = rows["guard (embedded)"]
    result: dict = {"images_per_peer_request": int(batches.shape[1]), "seconds_per_cell": seconds, "rows": rows,
                    "cpu_count": os.cpu_count()}
    if peers:
        fastest_c8 = max(peers, key=lambda p: rows[p][8]["per_s"])
        result["targets"] = {
            "p50_c1_guard_ms": guard_row[1]["p50_ms"],
            "p50_c1_kserve_ms": rows["kserve"][1]["p50_ms"] if "kserve" in rows else None,
            "throughput_c8_ratio_vs_fastest_peer": guard_row[8]["per_s"] / rows[fastest_c8][8]["per_s"],
            "fastest_peer_c8": fastest_c8,
            "upstream_added_p50_c1_ms": {p: rows[f"guard + {p}"][1]["p50_ms"] - rows[p][1]["p50_ms"] for p in peers},
            "upstream_one_call_added_p50_c1_ms": {p: rows[f"guard + {p}, one call"][1]["p50_ms"] - rows[p][1]["p50_ms"]
                                                  for p in peers},
        }
        t = result["targets"]
        if t["p50_c1_kserve_ms"] is not None:
            print(f"target guard p50 (screened) <= KServe p50 (unscreened) at concurrency 1: "
                  f"{t['p50_c1_guard_ms']:.2f} vs {t['p50_c1_kserve_ms']:.2f} ms "
                  f"{'MET' if t['p50_c1_guard_ms'] <= t['p50_c1_kserve_ms'] else 'NOT MET'}")
        print(f"target guard throughput >= 1.0x the fastest peer ({fastest_c8}) at concurrency 8: "
              f"{t['throughput_c8_ratio_vs_fastest_peer']:.2f}x "
              f"{'MET' if t['throughput_c8_ratio_vs_fastest_peer'] >= 1.0 else 'NOT MET'}")
        for p, added in t["upstream_added_p50_c1_ms"].items():
            one = t["upstream_one_call_added_p50_c1_ms"][p]
            print(f"upstream mode in front of {p}: adds {added:.2f} ms p50 at concurrency 1, {one:.2f} ms with "
                  f"--strip-rounds off ({'MET' if min(added, one) <= 1.0 else 'NOT MET'} the 1 ms target)")
    return result


WORKER_LEVELS = (1, 8, 16)


def _all_workers_ready(client, count: int, timeout_s: float = 90.0) -> None:
    """Until the supervisor's /metrics says every worker serves (the port answers once the first one does)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(client.metrics_url, timeout=5).read().decode()
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
        if values.get("trojan_guard_ready") == 1 and values.get("trojan_guard_workers", 1) == count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


def part_workers(bundle_dir: Path, images: np.ndarray, seconds: float, counts: list[int], out: Path) -> dict:
    """``serve --workers K`` for each K, one image per request, screened; a connection per client thread."""
    from guard_peers import drive_cells

    singles = images[:64, None].astype(np.float32)
    rows: dict[int, dict[int, dict]] = {}
    print(f"\nWORKERS: serve --workers K, one image per request (screened), tritonclient.grpc with a connection "
          f"per thread, {seconds:.0f} s per cell, {os.cpu_count()} cores")
    for k in counts:
        with local_guard(bundle_dir, "--policy", "flag", "--workers", str(k)) as guard:
            _all_workers_ready(guard, k)
            rows[k] = drive_cells(int(guard.target.rsplit(":", 1)[1]), guard.model, "input", singles, seconds,
                                  WORKER_LEVELS, out / "workers" / f"client-{k}", own_connections=True)
        print(f"  workers {k}: " + "  ".join(f"c{c} p50 {r['p50_ms']:.2f} ms {r['per_s']:.0f}/s client CPU "
                                             f"{r['client_cpu_s'] / r['seconds'] / os.cpu_count():.0%}"
                                             for c, r in rows[k].items()))
    base = rows[counts[0]]
    result = {"seconds_per_cell": seconds, "cpu_count": os.cpu_count(), "rows": rows,
              "throughput_ratio": {k: {c: rows[k][c]["per_s"] / base[c]["per_s"] for c in WORKER_LEVELS}
                                   for k in counts}}
    for k in counts[1:]:
        print(f"--workers {k} against --workers {counts[0]} at concurrency 8: "
              f"{result['throughput_ratio'][k][8]:.2f}x the throughput")
    return result


def workers_table(result: dict) -> str:
    cores = result["cpu_count"]
    lines = ["# serve --workers K (bench/bench_guard.py --workers)", "",
             f"The guard screening one image per request, embedded, K worker processes on one port; one "
             f"tritonclient.grpc process, a connection per thread; client and guard on loopback, {cores} cores, "
             f"{result['seconds_per_cell']:.0f} s per cell. Client CPU: the client process's share of the "
             f"{cores} cores over the cell (what the workers could not use).", "",
             "| workers | " + " | ".join(f"c{c} p50 ms | c{c} req/s | c{c} x1 | c{c} client CPU"
                                        for c in WORKER_LEVELS) + " |",
             "|---|" + "---|---|---|---|" * len(WORKER_LEVELS)]
    for k, cells in result["rows"].items():
        ratio = result["throughput_ratio"][k]
        lines.append(f"| {k} | " + " | ".join(
            f"{cells[c]['p50_ms']:.2f} | {cells[c]['per_s']:.0f} | {ratio[c]:.2f}x | "
            f"{cells[c]['client_cpu_s'] / cells[c]['seconds'] / cores:.0%}" for c in WORKER_LEVELS) + " |")
    return "\n".join(lines) + "\n"


def peers_table(result: dict) -> str:
    lines = ["# The guard beside the model servers (bench/bench_guard.py --peers)", "",
             "Guard rows: the guard screening one image per request, embedded (onnxruntime in-process) or in "
             "upstream mode in front of the peer (its STRIP rounds, or all blends in one call with "
             "`--strip-rounds off`).", "",
             f"A peer's request: {result['images_per_peer_request']} images, unscreened; the guard's: one image, "
             f"screened (its {result['images_per_peer_request']} rows through the same model, plus k-NN and "
             f"filter). Client and servers on loopback, {result['cpu_count']} cores, tritonclient.grpc, "
             f"{result['seconds_per_cell']:.0f} s per cell.", "",
             "| server | " + " | ".join(f"c{c} p50 ms | c{c} req/s" for c in PEER_LEVELS) + " |",
             "|---|" + "---|---|" * len(PEER_LEVELS)]
    for name, cells in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[c]['p50_ms']:.2f} | {cells[c]['per_s']:.0f}"
                                                  + (f" ({cells[c]['errors']} errors)" if cells[c]["errors"] else "")
                                                  for c in PEER_LEVELS) + " |")
    c8 = {name: cells[8] for name, cells in result["rows"].items()}
    lines += ["", "The client's CPU at concurrency 8 (tritonclient in its own process, share of the "
                  f"{result['cpu_count']} cores over the cell): "
              + ", ".join(f"{name} {c['client_cpu_s'] / c['seconds'] / result['cpu_count']:.0%}"
                          for name, c in c8.items()) + "."]
    if "targets" in result:
        t = result["targets"]
        kserve = (f"; KServe's (unscreened): {t['p50_c1_kserve_ms']:.2f} ms" if t["p50_c1_kserve_ms"] is not None
                  else "")
        lines += ["", f"Guard p50 at concurrency 1 (screened): {t['p50_c1_guard_ms']:.2f} ms{kserve}. "
                      f"Guard throughput at concurrency 8: "
                      f"{t['throughput_c8_ratio_vs_fastest_peer']:.2f}x the fastest peer ({t['fastest_peer_c8']}). "
                      "Upstream mode's added p50 at concurrency 1: "
                  + ", ".join(f"{p} {a:.2f} ms ({t['upstream_one_call_added_p50_c1_ms'][p]:.2f} ms in one call)"
                              for p, a in t["upstream_added_p50_c1_ms"].items()) + "."]
    return "\n".join(lines) + "\n"


def _write_tables(stem: Path, result: dict, table) -> None:
    """``stem``.json and ``stem``.md (the table docs/lab copies)."""
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float))
    stem.with_suffix(".md").write_text(table(result))
    print(f"written: {stem.with_suffix('.json')}, {stem.with_suffix('.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/guard")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each latency cell")
    parser.add_argument("--skip-art", action="store_true", help="skip part B")
    parser.add_argument("--parts", default="a,a2,b,c", help="comma-separated parts to run (%(default)s)")
    parser.add_argument("--peers", default=None, metavar="LIST",
                        help="only the peers part: comma-separated of kserve, mlserver, pytriton (installed into "
                             "their own virtualenvs under OUT/peers on first use, MLServer from the dev extra); "
                             "writes bench-out/guard_peers.json and .md")
    parser.add_argument("--workers", default=None, metavar="LIST",
                        help="only the workers part: comma-separated worker counts, the first the baseline (e.g. "
                             "1,2); writes bench-out/guard_workers.json and .md")
    args = parser.parse_args()
    out = Path(args.out)
    parts = ["peers"] if args.peers else ["workers"] if args.workers else args.parts.split(",")
    name, trigger, target, seed = next(z for z in ZOO if z[0] == MODEL)
    verdict_case = ROOT / "bench-out" / "verdict" / name  # bench_verdict.py builds the same model
    case = verdict_case if (verdict_case / "model.pt").exists() and not (out / name).exists() else out / name
    bundle_dir = case / "guard-only"
    if not (bundle_dir / "guard.json").exists():
        print(f"building the guard-only bundle of {name} (train, scan, calibrate; a few minutes)")
        _case(case, trigger, target, seed)
        run_patch(case / "model.pt", str(case / "clean.npz"), bundle_dir,
                  settings=PatchSettings(repair=RepairSettings(method="none")), work_dir=case / "work",
                  progress=False, say=lambda _: None)
    data = load_dataset(str(case / "clean.npz"))
    _, calib, test = split_clean(data, PatchSettings())  # the patch job's splits
    keep = test.y != target
    triggered = trigger.apply(test.x[keep]).astype(np.float32)
    result: dict = {"model": name}
    if "a" in parts:
        result["a"] = part_a(bundle_dir, test.x, args.seconds)
    if "a2" in parts:
        heavy = heavier_bundle(bundle_dir, out / "heavier" / "bundle")
        result["a2"] = part_a(heavy, test.x, args.seconds, levels=(1, 8),
                              title="A2. heavier model (about 4 M multiply-adds per image), one image per request")
    if "b" in parts and not args.skip_art:
        result["b"] = part_b(bundle_dir, calib.x, test.x, triggered)
    if "c" in parts:
        result["c"] = part_c(case, test.x, args.seconds)
    if "peers" in parts:
        from guard_peers import PEERS

        peers = [p for p in args.peers.split(",") if p]
        if unknown := set(peers) - set(PEERS):
            raise SystemExit(f"--peers: unknown {sorted(unknown)}; choose from {', '.join(PEERS)}")
        _write_tables(out.parent / "guard_peers", part_peers(bundle_dir, test.x, args.seconds, peers, out),
                      peers_table)
        return
    if "workers" in parts:
        counts = [int(k) for k in args.workers.split(",") if k]
        _write_tables(out.parent / "guard_workers", part_workers(bundle_dir, test.x, args.seconds, counts, out),
                      workers_table)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwritten: {out / 'result.json'}")


if __name__ == "__main__":
    main()
