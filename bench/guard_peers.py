"""bench_guard's peers part: the guard beside the model servers users run, on loopback, one client.

Each peer serves the guard bundle's ONNX model with onnxruntime inside its own Python runtime (onnxruntime's
default threads, as the guard's), no screening, answering a request of the guard's STRIP batch (the input and
its N blends: 51 images of 1x28x28 for the zoo model) with its logits. The guard answers one image per request
and screens it (the same 51 rows through the same model, plus its k-NN and filter), embedded, and in upstream
mode in front of each peer (the guard sends its rows to the peer). One client library for all:
``tritonclient.grpc`` in a process of its own (peers/triton_drive.py), a client per thread.

Peers are never installed into the sidecar's install: MLServer comes with the dev extra (the upstream tests use
it); KServe 0.21 and nvidia-pytriton 0.7 are installed by this bench into their own virtualenvs under
``<out>/peers/<peer>/venv`` on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from guard.transport.client import free_port

HERE = Path(__file__).resolve().parent
PEERS = ("kserve", "mlserver", "pytriton")
PEER_PACKAGES = {"kserve": ["kserve==0.21.0", "onnxruntime", "numpy"],
                 "pytriton": ["nvidia-pytriton==0.7.0", "onnxruntime", "numpy"]}
MODEL_NAME = "digits"


def peer_python(peer: str, root: Path) -> Path:
    """The Python a peer runs under: .venv's for MLServer, a virtualenv of its own for the others."""
    if peer == "mlserver":
        return Path(sys.executable)
    venv = root / peer / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"  installing {' '.join(PEER_PACKAGES[peer])} into {venv} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES[peer]], check=True)
    return python


def _wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Until the peer says MODEL_NAME is ready (the guard's own stubs speak the same protocol)."""
    import grpc

    from guard.transport.proto import inference_pb2 as pb
    from guard.transport.proto import inference_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"peer did not become ready; see {log}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    finally:
        channel.close()


@contextmanager
def peer_server(peer: str, model: Path, root: Path) -> Iterator[int]:
    """Start ``peer`` serving ``model`` as MODEL_NAME on loopback; yields its gRPC port."""
    root, model = root.resolve(), model.resolve()
    work = root / peer
    work.mkdir(parents=True, exist_ok=True)
    python = peer_python(peer, root)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ}
    if peer == "kserve":
        cmd = [str(python), str(HERE / "peers" / "kserve_server.py"), str(model), MODEL_NAME, str(grpc_port),
               str(http_port), "0"]
    elif peer == "pytriton":
        home = work / "home"
        home.mkdir(exist_ok=True)
        # the wheel's tritonserver links libpython of the running interpreter; its lib directory
        env.update(LD_LIBRARY_PATH=sysconfig.get_config_var("LIBDIR") or "", PYTRITON_HOME=str(home))
        cmd = [str(python), str(HERE / "peers" / "pytriton_server.py"), str(model), MODEL_NAME, str(grpc_port),
               str(http_port), str(metrics_port), "0"]
    else:
        repo = work / "repo"
        shutil.rmtree(repo, ignore_errors=True)
        (repo / "model").mkdir(parents=True)
        shutil.copy(HERE / "peers" / "mlserver_runtime.py", repo / "mlserver_runtime.py")
        # parallel_workers 0: MLServer's worker pool does not start in this environment (docs/DESIGN)
        (repo / "settings.json").write_text(json.dumps({"http_port": http_port, "grpc_port": grpc_port,
                                                        "metrics_port": metrics_port, "parallel_workers": 0,
                                                        "host": "127.0.0.1"}))
        (repo / "model" / "model-settings.json").write_text(json.dumps({
            "name": MODEL_NAME, "implementation": "mlserver_runtime.OnnxRuntimeModel",
            "parameters": {"uri": str(model.resolve()), "extra": {"threads": 0}}}))
        env["PYTHONPATH"] = str(repo)
        cmd = [str(Path(sys.executable).with_name("mlserver")), "start", str(repo)]
    log = work / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work,
                                start_new_session=True)
    try:
        _wait_ready(grpc_port, proc, log)
        yield grpc_port
    finally:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
            proc.wait()


def drive_cells(port: int, model_name: str, input_name: str, items: np.ndarray, seconds: float,
                levels: tuple[int, ...], work: Path, own_connections: bool = False) -> dict[int, dict]:
    """Every concurrency level against the server at ``port``, from a tritonclient process of its own
    (``own_connections``: a TCP connection per client thread instead of one shared)."""
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "items.npy", items)
    proc = subprocess.run([sys.executable, str(HERE / "peers" / "triton_drive.py"), f"127.0.0.1:{port}", model_name,
                           input_name, str(work / "items.npy"), str(seconds), *map(str, levels)],
                          capture_output=True, text=True, timeout=60 + len(levels) * (seconds + 30),
                          env={**os.environ, "TRITON_DRIVE_OWN_CONNECTIONS": "1" if own_connections else "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"the client failed: {proc.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
