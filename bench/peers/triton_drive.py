"""The peers part's client: tritonclient.grpc in its own process (its protobuf package 'inference' clashes with
the guard's in one descriptor pool). ``python triton_drive.py URL MODEL INPUT ITEMS.npy SECONDS LEVEL...``:
for each concurrency LEVEL, that many threads (a client each) send ITEMS (one request per item, cycled) for
SECONDS; prints one JSON object {level: {requests, p50_ms, p99_ms, per_s, errors, client_cpu_s, seconds}}.
With ``TRITON_DRIVE_OWN_CONNECTIONS=1`` each thread's client has a TCP connection of its own (gRPC otherwise
shares one between channels to the same address): what spreads a client's calls over ``serve --workers``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from drive import drive  # noqa: E402

CHANNEL_ARGS = ([("grpc.use_local_subchannel_pool", 1)] if os.environ.get("TRITON_DRIVE_OWN_CONNECTIONS") == "1"
                else None)


def caller(url: str, model: str, input_name: str):
    """``call(x)``: one ModelInfer of ``x`` through a client of the calling thread's own."""
    local = threading.local()

    def call(x: np.ndarray) -> None:
        if not hasattr(local, "client"):
            local.client = tc.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
            local.outputs = [tc.InferRequestedOutput("logits")]
        inp = tc.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        local.client.infer(model, [inp], outputs=local.outputs)

    return call


if __name__ == "__main__":
    url, model, input_name, path, seconds, *levels = sys.argv[1:]
    items = np.load(path).astype(np.float32)
    call = caller(url, model, input_name)
    for x in items[:3]:  # warm the connection and the server
        call(x)
    print(json.dumps({int(c): drive(call, items, int(c), float(seconds), count_errors=True) for c in levels}))
