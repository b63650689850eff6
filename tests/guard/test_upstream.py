"""Upstream mode against a real third-party model server: MLServer on loopback serves the bundle's model,
the guard forwards to it. Then the upstream goes slow, and then it dies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from guard.transport.proto import inference_pb2 as pb
from guard.transport.proto import inference_pb2_grpc

from .conftest import GuardProcess, free_port, logits_of

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


class MLServer:
    def __init__(self, root: Path, model_file: Path) -> None:
        self.root = root
        self.grpc_port = free_port()
        self.slow_flag = root / "slow"
        (root / "model").mkdir(parents=True)
        shutil.copy(HERE / "mlserver" / "onnx_runtime.py", root / "onnx_runtime.py")
        # parallel_workers 0: MLServer's worker pool does not start in this environment
        (root / "settings.json").write_text(json.dumps({
            "http_port": free_port(), "grpc_port": self.grpc_port, "metrics_port": free_port(),
            "parallel_workers": 0}))
        (root / "model" / "model-settings.json").write_text(json.dumps({
            "name": "digits", "implementation": "onnx_runtime.OnnxRuntimeModel",
            "parameters": {"uri": str(model_file.resolve()),
                           "extra": {"delay_file": str(self.slow_flag), "delay_s": 3}}}))
        self.log = open(root / "mlserver.log", "w")
        mlserver = Path(sys.executable).with_name("mlserver")
        self.proc = subprocess.Popen([str(mlserver), "start", str(root)], cwd=root, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(root)})
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 120
        while True:
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=2).ready:
                    break
            except grpc.RpcError:
                pass
            assert self.proc.poll() is None, (root / "mlserver.log").read_text()
            assert time.monotonic() < deadline, (root / "mlserver.log").read_text()
            time.sleep(0.5)
        channel.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def mlserver(guard_only_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServer]:
    server = MLServer(tmp_path_factory.mktemp("mlserver"), guard_only_bundle / "model.onnx")
    yield server
    server.stop()


def test_an_upstream_serving_another_model_is_refused(mlserver: MLServer, patched: tuple[Path, dict],
                                                     tmp_path: Path) -> None:
    """The repaired bundle's thresholds mean nothing in front of the unrepaired model MLServer serves."""
    run = subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--bundle", str(patched[0]), "--host",
                          "127.0.0.1", "--port", str(free_port()), "--metrics-port", "0", "--backend", "upstream",
                          "--upstream", f"127.0.0.1:{mlserver.grpc_port}", "--upstream-model", "digits",
                          "--admin-address", "off"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "is not the bundle's model: logits differ" in run.stderr


def test_strip_rounds_ask_the_upstream_for_the_logits_alone(mlserver: MLServer, guard_only_bundle: Path,
                                                            traffic: dict[str, np.ndarray]) -> None:
    """A STRIP round needs the logits only: the upstream is asked for nothing else (KServe takes 0.6 ms longer
    per round to send the features too), and the screening is the same as with every output asked for."""
    from guard.bundle import GuardBundle
    from guard.transport.upstream import UpstreamBackend

    bundle = GuardBundle.load(guard_only_bundle)
    m = bundle.manifest
    backend = UpstreamBackend(f"127.0.0.1:{mlserver.grpc_port}", "digits", m.input.name, m.input.shape)
    asked: list[list[str]] = []
    call = backend._call
    backend._call = lambda x, outputs=None: asked.append(list(outputs or backend.outputs)) or call(x, outputs)
    try:
        x = traffic["clean_x"][:4]  # clean inputs take more than one round; triggered ones are settled at once
        np.testing.assert_allclose(backend.logits(x), backend.infer(x)[0], atol=1e-5)
        assert asked == [["logits"], ["logits", "features"]]
        screen = bundle.screen(seed=3)
        asked.clear()
        rounds = [screen.run(backend.infer, x[i:i + 1], logits=backend.logits) for i in range(4)]
        assert asked[0] == ["logits", "features"] and ["logits"] in asked  # the first call, then rounds
        assert all(a == ["logits"] for a in asked if a != ["logits", "features"])
        screen = bundle.screen(seed=3)  # the same draws
        together = [screen.run(backend.infer, x[i:i + 1]) for i in range(4)]
        for r, t in zip(rounds, together, strict=True):
            np.testing.assert_allclose(r.scores, t.scores, atol=1e-4)
            assert (r.judgement.flagged == t.judgement.flagged).all()
    finally:
        backend.close()


def test_strip_in_one_upstream_call_screens_as_the_rounds_do(mlserver: MLServer, guard_only_bundle: Path,
                                                              tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    """--strip-rounds off: every blend in one upstream call per batch (one round trip instead of several)."""
    guard = GuardProcess(guard_only_bundle, tmp_path, "--backend", "upstream", "--upstream",
                         f"127.0.0.1:{mlserver.grpc_port}", "--upstream-model", "digits", "--model-name", "digits",
                         "--strip-rounds", "off", "--policy", "flag")
    try:
        flagged = {}
        for kind in ("clean", "triggered"):
            flagged[kind] = sum(guard.infer(x[None], model="digits").parameters["guard_verdict"].string_param
                                == "flagged" for x in traffic[f"{kind}_x"][:20])
        assert flagged["clean"] <= 1 and flagged["triggered"] >= 18, flagged
    finally:
        assert guard.stop() == 0


def test_the_guard_screens_in_front_of_mlserver_and_survives_a_slow_then_dead_upstream(
        mlserver: MLServer, guard_only_bundle: Path, tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    guard = GuardProcess(guard_only_bundle, tmp_path, "--backend", "upstream", "--upstream",
                         f"127.0.0.1:{mlserver.grpc_port}", "--upstream-model", "digits",
                         "--upstream-timeout-s", "1", "--model-name", "digits")
    try:
        # same screening as in-process: clean answered with the right class, triggered refused
        answered = refused_clean = 0
        for x, y in zip(traffic["clean_x"][:20], traffic["clean_y"][:20], strict=True):
            try:
                answered += int(logits_of(guard.infer(x[None], model="digits")).argmax()) == int(y)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc.details()
                refused_clean += 1
        assert answered >= 18 and refused_clean <= 1
        refused = 0
        for x in traffic["triggered_x"][:20]:
            try:
                guard.infer(x[None], model="digits")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc.details()
                refused += 1
        assert refused >= 18  # STRIP's random blends let about 0.6 % of triggered inputs through here
        meta = guard.stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
        assert meta.platform == "trojan-guard-upstream"

        # slow upstream: the guard's deadline fires, the caller learns why, the guard keeps serving
        mlserver.slow_flag.touch()
        with pytest.raises(grpc.RpcError) as info:
            guard.infer(traffic["clean_x"][:1], model="digits")
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "upstream" in info.value.details() and "DEADLINE_EXCEEDED" in info.value.details()
        mlserver.slow_flag.unlink()
        time.sleep(3)  # let the slow call MLServer is still sleeping on finish
        assert int(logits_of(guard.infer(traffic["clean_x"][5:6], model="digits")).argmax()) == int(
            traffic["clean_y"][5])

        # dead upstream: UNAVAILABLE naming the upstream, counted, and the guard process lives on
        mlserver.stop()
        with pytest.raises(grpc.RpcError) as info:
            guard.infer(traffic["clean_x"][:1], model="digits")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"127.0.0.1:{mlserver.grpc_port}" in info.value.details()
        assert guard.metric("trojan_guard_upstream_errors_total", code="UNAVAILABLE") >= 1
        assert guard.metric("trojan_guard_upstream_errors_total", code="DEADLINE_EXCEEDED") >= 1
        assert guard.metric("trojan_guard_request_errors_total", reason="upstream") >= 2
        assert guard.stub.ServerLive(pb.ServerLiveRequest()).live
    finally:
        assert guard.stop() == 0

