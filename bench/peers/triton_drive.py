"""The peers part's client: tritonclient.grpc in its own process (its protobuf package 'inference' clashes with
the guard's in one descriptor pool). ``python triton_drive.py URL MODEL INPUT ITEMS.npy SECONDS LEVEL...``:
for each concurrency LEVEL, that many threads (a client each) send ITEMS (one request per item, cycled) for
SECONDS; prints one JSON object {level: {requests, p50_ms, p99_ms, per_s, errors, client_cpu_s}}.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as tc


def drive(url: str, model: str, input_name: str, items: np.ndarray, seconds: float, concurrency: int) -> dict:
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    stop = threading.Event()

    def worker(k: int) -> None:
        client = tc.InferenceServerClient(url)
        outputs = [tc.InferRequestedOutput("logits")]
        i = k
        while not stop.is_set():
            x = items[i % len(items)]
            inp = tc.InferInput(input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            start = time.perf_counter()
            try:
                client.infer(model, [inp], outputs=outputs)
                latencies[k].append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - counted, not timed
                errors[k] += 1
            i += concurrency
        client.close()

    for x in items[:3]:  # warm the connection and the server
        inp = tc.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        tc.InferenceServerClient(url).infer(model, [inp])
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    cpu, began = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    lat = np.concatenate([np.array(x) for x in latencies]) * 1000 if any(latencies) else np.array([np.nan])
    return {"requests": int(sum(map(len, latencies))), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "per_s": sum(map(len, latencies)) / elapsed,
            "errors": int(sum(errors)), "client_cpu_s": round(cpu, 2), "seconds": round(elapsed, 2)}


if __name__ == "__main__":
    url, model, input_name, path, seconds, *levels = sys.argv[1:]
    items = np.load(path).astype(np.float32)
    print(json.dumps({int(c): drive(url, model, input_name, items, float(seconds), int(c)) for c in levels}))
