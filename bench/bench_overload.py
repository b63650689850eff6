"""Overload: the guard at four times its capacity sheds what it cannot serve and keeps its latency.

Run: ``.venv/bin/python bench/bench_overload.py [--bundle DIR] [--max-queue 8,32,256] [--seconds 20]``

For each ``--max-queue`` value, one ``trojan-guard serve`` process (embedded
onnxruntime, default batching, policy flag so that every answer counts) and
four phases, one image per request:

1. unloaded: one client, one request at a time: p50 / p99;
2. capacity: eight closed-loop clients: requests per second C;
3. flood: an open-loop client sending 4 C requests per second for ``--seconds``:
   answered requests' p99 against the unloaded p99 (target <= 3x), requests
   shed with RESOURCE_EXHAUSTED, any other error (target none), the guard's RSS
   (target: bounded, within 64 MiB of its start);
4. after: one client again, every request answered.

Writes ``bench-out/overload.json`` and ``bench-out/overload.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_guard import drive  # noqa: E402

from guard.bundle import GuardBundle  # noqa: E402
from guard.client import local_guard  # noqa: E402
from guard.codec import infer_request  # noqa: E402
from guard.proto import inference_pb2_grpc  # noqa: E402

DEFAULT_BUNDLE = ROOT / "bench-out" / "verdict" / "patch-3x3-top-left-white" / "guard-only"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def flood(target: str, requests: list, rate: float, seconds: float, pid: int) -> dict:
    """Open loop: a request every 1/rate s whatever the answers do; latency and status of each."""
    results: list[tuple[float, str]] = []
    rss: list[int] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one(req) -> None:
            start = time.perf_counter()
            try:
                await stub.ModelInfer(req, timeout=30)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            results.append((time.perf_counter() - start, code))

        tasks = []
        began = time.perf_counter()
        sent = 0
        next_rss = began
        while (now := time.perf_counter()) - began < seconds:
            due = int((now - began) * rate) + 1
            while sent < due:
                tasks.append(asyncio.ensure_future(one(requests[sent % len(requests)])))
                sent += 1
            if now >= next_rss:
                rss.append(rss_bytes(pid))
                next_rss = now + 0.5
            await asyncio.sleep(0.001)
        offered = sent / (time.perf_counter() - began)
        await asyncio.gather(*tasks)
    lat = np.array([r[0] for r in results if r[1] == "OK"]) * 1000
    codes: dict[str, int] = {}
    for _, code in results:
        codes[code] = codes.get(code, 0) + 1
    return {"offered_per_s": offered, "sent": sent, "codes": codes,
            "answered_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "answered_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "rss_max": max(rss) if rss else 0}


def one_setting(bundle_dir: Path, images: np.ndarray, max_queue: int, seconds: float) -> dict:
    model = GuardBundle.load(bundle_dir).manifest.model.name
    requests = [infer_request(x[None], model, "input") for x in images]
    with local_guard(bundle_dir, "--policy", "flag", "--max-queue", str(max_queue)) as client:
        pid = client.pid

        def call(req) -> None:
            client.stub.ModelInfer(req, timeout=30)

        for req in requests[:20]:
            call(req)
        rss_start = rss_bytes(pid)
        unloaded = drive(call, requests, 1, seconds / 2)
        capacity = drive(call, requests, 8, seconds / 2)
        rate = 4 * capacity["per_s"]
        loaded = asyncio.run(flood(client.target, requests, rate, seconds, pid))
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
             "| answered p99 ms | p99 ratio | RSS growth MiB | after: p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["flood"]
        lines.append(f"| {r['max_queue']} | {r['unloaded']['p50_ms']:.1f} / {r['unloaded']['p99_ms']:.1f} | "
                     f"{r['capacity_per_s']:.0f} | {f['offered_per_s']:.0f} | {f['codes'].get('OK', 0)} | "
                     f"{f['codes'].get('RESOURCE_EXHAUSTED', 0)} | {sum(r['other_errors'].values())} | "
                     f"{f['answered_p99_ms']:.1f} | {r['p99_ratio']:.2f}x | {r['rss_growth_mib']:.1f} | "
                     f"{r['after']['p99_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE),
                        help="guard bundle (default: the zoo's 3x3 patch model from bench_verdict.py --parts zoo)")
    parser.add_argument("--max-queue", default="8,32,256", help="comma-separated --max-queue values to try")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the flood (%(default)s)")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    bundle = Path(args.bundle)
    if not (bundle / "guard.json").exists():
        raise SystemExit(f"{bundle}: no bundle; run bench/bench_verdict.py --parts zoo first or give --bundle")
    images = GuardBundle.load(bundle).pool[:64]
    rows = [one_setting(bundle, images, int(q), args.seconds) for q in args.max_queue.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.json").write_text(json.dumps(rows, indent=1, default=float))
    (out / "overload.md").write_text(markdown(rows, args.seconds))
    print(markdown(rows, args.seconds))


if __name__ == "__main__":
    main()
