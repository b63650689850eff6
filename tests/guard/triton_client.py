"""Talk to a guard with the unmodified tritonclient.grpc, as a user's client would.

Run as its own process (tritonclient's protobuf package 'inference' clashes with
the guard's in one descriptor pool): ``python triton_client.py URL MODEL IMAGES.npy``.
Prints one JSON object: server checks, then per image the answer or the error.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(url: str, model: str, images: str) -> None:
    client = grpcclient.InferenceServerClient(url=url)
    meta = client.get_model_metadata(model, as_json=True)
    out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
           "model_ready": client.is_model_ready(model), "unknown_model_ready": client.is_model_ready("nope"),
           "input": meta["inputs"][0], "results": []}
    for x in np.load(images):
        inp = grpcclient.InferInput(meta["inputs"][0]["name"], [1, *x.shape], "FP32")
        inp.set_data_from_numpy(x[None].astype(np.float32))
        try:
            result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("logits")])
        except InferenceServerException as exc:
            out["results"].append({"status": str(exc.status()), "message": exc.message()})
            continue
        params = result.get_response().parameters
        out["results"].append({"status": "OK", "class": int(result.as_numpy("logits").argmax()),
                               "verdict": params["guard_verdict"].string_param,
                               "flagged": params["guard_flagged"].bool_param})
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
