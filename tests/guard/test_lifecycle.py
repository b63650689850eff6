"""The guard's life as an operator sees it: policies, settings from the environment, hot reload,
graceful shutdown, an upstream that is not there, startup errors, and a soak under load."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from guard.bundle import GuardBundle
from guard.evidence import read_evidence
from guard.transport.proto import guard_admin_pb2 as admin_pb
from guard.transport.proto import guard_admin_pb2_grpc
from guard.transport.proto import inference_pb2 as pb

from .conftest import ROOT, GuardProcess, free_port, logits_of, tampered_copy

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("how", ["flag", "shadow"])
def test_flag_and_shadow_policies_answer_triggered_requests(how: str, guard_only_bundle: Path, tmp_path: Path,
                                                           traffic: dict[str, np.ndarray]) -> None:
    # flag comes from the command line, shadow from the environment
    server = (GuardProcess(guard_only_bundle, tmp_path, "--policy", "flag") if how == "flag"
              else GuardProcess(guard_only_bundle, tmp_path, env={"TROJAN_GUARD_POLICY": "shadow"}))
    try:
        response = server.infer(traffic["triggered_x"][:1])
        assert int(logits_of(response).argmax()) == 3  # the unrepaired model obeys the trigger
        params = response.parameters
        assert params["guard_policy"].string_param == how
        if how == "flag":
            assert params["guard_verdict"].string_param == "flagged" and params["guard_flagged"].bool_param
        else:
            assert "guard_verdict" not in params  # shadow: only the metrics know
        assert server.metric("trojan_guard_requests_total", verdict="flagged", action="answered") == 1
    finally:
        assert server.stop() == 0


def _admin(server: GuardProcess) -> guard_admin_pb2_grpc.GuardAdminStub:
    return guard_admin_pb2_grpc.GuardAdminStub(server.admin_channel)


def test_hot_reload_swaps_bundles_without_dropping_requests_and_refuses_a_tampered_one(
        guard_only_bundle: Path, patched: tuple[Path, dict], tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    live = tmp_path / "live"
    shutil.copytree(guard_only_bundle, live)
    guard_only_sha, patched_sha = GuardBundle.load(guard_only_bundle).sha256, GuardBundle.load(patched[0]).sha256
    server = GuardProcess(live, tmp_path, "--max-delay-ms", "5")
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:  # clean traffic all through the reloads
        i = 0
        while not stop.is_set():
            try:
                server.infer(traffic["clean_x"][i % 60:i % 60 + 1], timeout=10)
                answered[0] += 1
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.PERMISSION_DENIED:  # a clean false rejection is allowed
                    failures.append(f"{exc.code()}: {exc.details()}")
            i += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        admin = _admin(server)
        assert admin.Status(admin_pb.StatusRequest()).bundle_sha256 == guard_only_sha

        # SIGHUP reloads the bundle path in place: swap the patched bundle in with a rename
        staging = tmp_path / "staging"
        shutil.copytree(patched[0], staging)
        shutil.move(live, tmp_path / "retired")
        staging.rename(live)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while admin.Status(admin_pb.StatusRequest()).bundle_sha256 != patched_sha:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.2)

        tampered = tampered_copy(guard_only_bundle, tmp_path / "tampered")
        with pytest.raises(grpc.RpcError) as info:
            admin.ReloadBundle(admin_pb.ReloadBundleRequest(bundle_path=str(tampered)))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model.onnx: SHA-256 mismatch" in info.value.details()
        assert "still serving the previous bundle" in info.value.details()

        reply = admin.ReloadBundle(admin_pb.ReloadBundleRequest(bundle_path=str(guard_only_bundle)))
        assert reply.previous_sha256 == patched_sha and reply.bundle_sha256 == guard_only_sha
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
    status = _admin(server).Status(admin_pb.StatusRequest())
    assert status.bundle_sha256 == guard_only_sha and status.reloads == 2 and status.ready
    assert not failures, failures[:5]
    assert answered[0] > 20
    assert server.metric("trojan_guard_bundle_reloads_total", result="ok") == 2
    assert server.metric("trojan_guard_bundle_reloads_total", result="failed") == 1
    assert server.metric("trojan_guard_build_info", bundle_sha256=guard_only_sha) == 1
    assert server.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_drains_in_flight_requests(workers: str, guard_only_bundle: Path, tmp_path: Path,
                                           traffic: dict[str, np.ndarray]) -> None:
    # a batch that waits 5 s to fill keeps the requests in flight when SIGTERM arrives (under --workers 2 at
    # the supervisor, which passes it on to every worker)
    server = GuardProcess(guard_only_bundle, tmp_path, "--max-batch", "64", "--max-delay-ms", "5000",
                          "--workers", workers)
    results: list[object] = []

    def send(i: int) -> None:
        try:
            results.append(int(logits_of(server.infer(traffic["clean_x"][i:i + 1])).argmax()))
        except grpc.RpcError as exc:
            results.append(exc.code())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 4  # a loaded machine may take a while to get all six onto the wire
    while server.metric("trojan_guard_in_flight_requests") < 6:
        assert time.monotonic() < deadline, server.metric("trojan_guard_in_flight_requests")
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert server.proc.wait(30) == 0  # it exits by itself once drained
    server.stop()
    # every request was answered (or, rarely, refused as a clean false rejection): none was dropped
    assert len(results) == 6, results
    assert all(isinstance(r, int) or r == grpc.StatusCode.PERMISSION_DENIED for r in results), results
    assert "draining" in server.log and "stopped" in server.log


def test_an_upstream_that_is_not_up_keeps_the_guard_not_ready_with_clear_errors(
        guard_only_bundle: Path, tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    server = GuardProcess(guard_only_bundle, tmp_path, "--backend", "upstream", "--upstream",
                          f"127.0.0.1:{free_port()}", "--upstream-timeout-s", "1", wait=False)
    try:
        deadline = time.monotonic() + 30
        while server.health("liveness") != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log
            time.sleep(0.2)
        assert server.health("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not server.stub.ServerReady(pb.ServerReadyRequest()).ready
        with pytest.raises(grpc.RpcError) as info:
            server.infer(traffic["clean_x"][:1])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in info.value.details()
        time.sleep(1.5)
        assert "retrying" in server.log and "UNAVAILABLE" in server.log
    finally:
        assert server.stop() == 0


def test_startup_errors_are_one_clear_line(guard_only_bundle: Path, tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--host", "127.0.0.1",
                               "--metrics-port", "0", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)

    missing = serve("--bundle", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "bundle directory not found" in missing.stderr
    no_upstream = serve("--bundle", str(guard_only_bundle), "--backend", "upstream")
    assert no_upstream.returncode != 0 and "needs --upstream" in no_upstream.stderr
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = serve("--bundle", str(guard_only_bundle), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "cannot bind" in busy.stderr, busy.stderr
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():  # the CPU wheel: CUDA is named as missing
        no_gpu = serve("--bundle", str(guard_only_bundle), "--providers", "cuda,cpu")
        assert no_gpu.returncode != 0 and "has no CUDAExecutionProvider" in no_gpu.stderr
        assert "onnxruntime-gpu" in no_gpu.stderr and "Traceback" not in no_gpu.stderr


def test_soak_without_errors_or_memory_growth_and_evidence_survives_a_kill(
        guard_only_bundle: Path, tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    # a batch waits up to 5 ms to fill: with no wait, how many requests happen to queue while the
    # model runs depends on the machine's load (1.19 per batch on a busy CI run), not on the guard
    server = GuardProcess(guard_only_bundle, tmp_path, "--evidence-dir", str(tmp_path / "ev"), "--max-delay-ms", "5")
    errors: list[str] = []
    counts = {"answered": 0, "refused": 0}
    lock = threading.Lock()
    stop = threading.Event()
    images = np.concatenate([traffic["clean_x"], traffic["triggered_x"]])

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            i = int(rng.integers(len(images)))
            try:
                server.infer(images[i:i + 1], request_id=f"soak-{seed}", timeout=10)
                key = "answered"
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                    errors.append(f"{exc.code()}: {exc.details()}")
                key = "refused"
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    time.sleep(5)
    rss_start = server.rss_bytes()
    time.sleep(20)
    rss_end = server.rss_bytes()
    stop.set()
    for t in threads:
        t.join()
    per_batch = server.metric("trojan_guard_batch_requests_sum") / server.metric("trojan_guard_batch_requests_count")
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not errors, errors[:5]
    # every refused request's input was on disk before the refusal went out, so a kill loses none
    kept = [r for r in read_evidence(tmp_path / "ev") if r["intact"]]
    assert len(kept) == counts["refused"], (len(kept), counts)
    assert counts["answered"] > 100 and counts["refused"] > 100, counts
    assert rss_end - rss_start < 40 * 2**20, (rss_start, rss_end)
    assert per_batch > 1.5, f"concurrent requests were not batched together ({per_batch:.2f} requests per batch)"


def test_bundle_watch_picks_up_a_bundle_swapped_in_by_a_patch_job(guard_only_bundle: Path, patched: tuple[Path, dict],
                                                                 tmp_path: Path) -> None:
    live = tmp_path / "current"
    shutil.copytree(guard_only_bundle, live)
    server = GuardProcess(live, tmp_path, "--watch-bundle-s", "0.3")
    try:
        from guard.bundle import write_bundle

        new = GuardBundle.load(patched[0])
        # exactly what the patch job does: stage beside, verify, swap in by rename
        write_bundle(live, new.manifest, {name: new.root / name for name, _ in new.manifest.files()})
        deadline = time.monotonic() + 20
        while _admin(server).Status(admin_pb.StatusRequest()).bundle_sha256 != GuardBundle.load(live).sha256:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.2)
        assert server.metric("trojan_guard_bundle_reloads_total", result="ok") == 1
    finally:
        assert server.stop() == 0
