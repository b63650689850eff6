"""Overload: the guard at four times its capacity sheds what it cannot serve and keeps its latency.

Run: ``.venv/bin/python bench/bench_overload.py [--bundle DIR] [--max-queue 8,32,256] [--seconds 20]``

For each ``--max-queue`` value, one ``trojan-guard serve`` process (embedded
onnxruntime with one thread, default batching, policy flag so that every
answer counts) pinned to core 0, the clients on the other cores (on a 2-core
machine the clients and the guard would otherwise fight for the same cores,
and the clients' share would show as the guard's latency), and four phases,
one image per request:

1. unloaded: one client, one request at a time: p50 / p99;
2. capacity: two client processes keeping 64 requests outstanding: the
   requests per second the guard answers at most, C;
3. flood: the same two processes open loop (every thread on a fixed schedule)
   offering 4 C requests per second together for ``--seconds``:
   answered requests' p99 against the unloaded p99 (target <= 3x), requests
   shed with RESOURCE_EXHAUSTED, any other error (target none), the guard's RSS
   (target: bounded, within 64 MiB of its start);
4. after: one client again, every request answered.

Writes ``bench-out/overload.json`` and ``bench-out/overload.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from drive import drive  # noqa: E402

from guard.bundle import GuardBundle  # noqa: E402
from guard.transport.client import local_guard  # noqa: E402
from guard.transport.codec import infer_request  # noqa: E402
from guard.transport.proto import inference_pb2_grpc  # noqa: E402

DEFAULT_BUNDLE = ROOT / "bench-out" / "verdict" / "patch-3x3-top-left-white" / "guard-only"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _flood_worker(target: str, requests: list[bytes], rate: float, seconds: float, threads: int,
                  queue) -> None:
    """One client process: ``threads`` threads, each sending its share of ``rate`` requests per second on a
    fixed schedule (a late thread sends at once to catch up: open loop, whatever the answers do); ``rate``
    0: each thread sends its next request as soon as the last is answered (closed loop)."""
    from guard.transport.proto import inference_pb2 as pb

    _client_cores()
    channel = grpc.insecure_channel(target)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    messages = [pb.ModelInferRequest.FromString(r) for r in requests]
    results: list[tuple[float, str]] = []
    lock = threading.Lock()
    began = time.perf_counter() + 0.2

    def run(k: int) -> None:
        interval = threads / rate if rate else 0.0
        i, mine = 0, []
        while (slot := began + (i + k / threads) * interval) - began < seconds and (
                rate or time.perf_counter() - began < seconds):
            delay = slot - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            start = time.perf_counter()
            try:
                stub.ModelInfer(messages[(i * threads + k) % len(messages)], timeout=30)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            mine.append((time.perf_counter() - start, code))
            i += 1
        with lock:
            results.extend(mine)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    channel.close()
    queue.put(results)


GUARD_CORE = 0  # the guard runs on this core, the clients on the others, so that they do not share a core


def _client_cores() -> None:
    cores = os.sched_getaffinity(0) - {GUARD_CORE}
    if cores:
        os.sched_setaffinity(0, cores)


def _pin_guard(pid: int) -> None:
    """Every thread of the guard process onto GUARD_CORE (onnxruntime's pool exists already)."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(GUARD_CORE), str(pid)], check=True, capture_output=True)


def flood(target: str, requests: list, rate: float, seconds: float, pid: int, processes: int = 2,
          threads: int = 32) -> dict:
    """``processes`` client processes together offering ``rate`` requests per second for ``seconds``
    (``rate`` 0: each keeps ``threads`` requests outstanding)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    raw = [r.SerializeToString() for r in requests]
    procs = [ctx.Process(target=_flood_worker, args=(target, raw, rate / processes, seconds, threads, queue))
             for _ in range(processes)]
    for p in procs:
        p.start()
    rss: list[int] = []
    began = time.perf_counter()
    while any(p.is_alive() for p in procs) and len(rss) < 4 * (seconds + 60):
        rss.append(rss_bytes(pid))
        time.sleep(0.25)
        if queue.qsize() >= processes:
            break
    results = [r for _ in procs for r in queue.get()]
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - began
    lat = np.array([r[0] for r in results if r[1] == "OK"]) * 1000
    codes: dict[str, int] = {}
    for _, code in results:
        codes[code] = codes.get(code, 0) + 1
    return {"offered_per_s": len(results) / min(elapsed, seconds + 0.2), "sent": len(results), "codes": codes,
            "answered_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "answered_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "rss_max": max(rss) if rss else 0}


def _histogram(url: str, stage: str) -> dict[float, float]:
    """Cumulative bucket counts of the guard's stage_duration_seconds{stage}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {float(s.labels["le"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "trojan_guard_stage_duration_seconds_bucket"
            and s.labels.get("stage") == stage}


def _p99(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The bucket bound below which 99 % of the observations between the two scrapes fall, in ms."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    return 1000 * next(b for b, c in zip(bounds, counts, strict=True) if c >= 0.99 * counts[-1])


def one_setting(bundle_dir: Path, images: np.ndarray, max_queue: int, seconds: float) -> dict:
    model = GuardBundle.load(bundle_dir).manifest.model.name
    requests = [infer_request(x[None], model, "input") for x in images]
    with local_guard(bundle_dir, "--policy", "flag", "--max-queue", str(max_queue), "--threads", "1") as client:
        pid = client.pid
        _pin_guard(pid)
        _client_cores()

        def call(req) -> None:
            client.stub.ModelInfer(req, timeout=30)

        for req in requests[:20]:
            call(req)
        rss_start = rss_bytes(pid)
        unloaded = drive(call, requests, 1, seconds / 2)
        saturated = flood(client.target, requests, 0, seconds / 2, pid)  # 64 requests outstanding
        capacity = {"per_s": saturated["codes"].get("OK", 0) / (seconds / 2)}
        rate = 4 * capacity["per_s"]
        queue_before = _histogram(client.metrics_url, "queue")
        loaded = flood(client.target, requests, rate, seconds, pid)
        loaded["server_queue_wait_p99_ms"] = _p99(queue_before, _histogram(client.metrics_url, "queue"))
        after = drive(call, requests, 1, 2.0)  # raises on any error
    ratio = loaded["answered_p99_ms"] / unloaded["p99_ms"] if loaded["answered_p99_ms"] else None
    other = {k: v for k, v in loaded["codes"].items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    row = {"max_queue": max_queue, "unloaded": unloaded, "capacity_per_s": capacity["per_s"], "flood": loaded,
           "p99_ratio": ratio, "other_errors": other, "rss_start": rss_start,
           "rss_growth_mib": (loaded["rss_max"] - rss_start) / 2 ** 20, "after": after}
    print(json.dumps(row, default=float), flush=True)
    return row


def markdown(rows: list[dict], seconds: float) -> str:
    lines = [f"The guard flooded at 4x its measured capacity for {seconds:.0f} s (`bench/bench_overload.py`), one "
             "image per request; p99 ratio = answered requests' p99 under the flood / unloaded p99 (target <= 3x).",
             "",
             "| --max-queue | unloaded p50 / p99 ms | capacity req/s | offered req/s | answered | shed | other errors "
             "| answered p99 ms | p99 ratio | guard's queue wait p99 ms | RSS growth MiB | after: p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["flood"]
        lines.append(f"| {r['max_queue']} | {r['unloaded']['p50_ms']:.1f} / {r['unloaded']['p99_ms']:.1f} | "
                     f"{r['capacity_per_s']:.0f} | {f['offered_per_s']:.0f} | {f['codes'].get('OK', 0)} | "
                     f"{f['codes'].get('RESOURCE_EXHAUSTED', 0)} | {sum(r['other_errors'].values())} | "
                     f"{f['answered_p99_ms']:.1f} | {r['p99_ratio']:.2f}x | "
                     f"{f['server_queue_wait_p99_ms'] or 0:.1f} | {r['rss_growth_mib']:.1f} | "
                     f"{r['after']['p99_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE),
                        help="guard bundle (default: the zoo's 3x3 patch model from bench_verdict.py --parts zoo)")
    parser.add_argument("--max-queue", default="8,32,256", help="comma-separated --max-queue values to try")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the flood (%(default)s)")
    parser.add_argument("--light", action="store_true",
                        help="flood the bundle's own MNIST model; by default its model is swapped for a heavier CNN "
                             "(bench_guard.py's at width 64, about 15 M multiply-adds per image): the small model "
                             "answers faster than Python clients on the same 2 cores can send (3,700 requests/s "
                             "answered, none shed), so it cannot be overloaded here")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    bundle = Path(args.bundle)
    if not (bundle / "guard.json").exists():
        raise SystemExit(f"{bundle}: no bundle; run bench/bench_verdict.py --parts zoo first or give --bundle")
    if not args.light:
        from bench_guard import heavier_bundle

        bundle = heavier_bundle(bundle, Path(args.out) / "overload" / "heavier-64", width=64)
    images = GuardBundle.load(bundle).pool[:64]
    rows = [one_setting(bundle, images, int(q), args.seconds) for q in args.max_queue.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.json").write_text(json.dumps(rows, indent=1, default=float))
    (out / "overload.md").write_text(markdown(rows, args.seconds))
    print(markdown(rows, args.seconds))


if __name__ == "__main__":
    main()
