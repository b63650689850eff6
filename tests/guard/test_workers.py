"""``serve --workers K``: K guard processes on one port, one supervisor (metrics, admin, reload, restarts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from guard.bundle import GuardBundle
from guard.transport.proto import guard_admin_pb2 as admin_pb
from guard.transport.proto import guard_admin_pb2_grpc, inference_pb2_grpc

from .conftest import ROOT, GuardProcess, free_port, request, tampered_copy

FIXTURE = ROOT / "tests" / "fixtures" / "tiny-bundle"


def _status(server: GuardProcess) -> admin_pb.StatusResponse:
    return guard_admin_pb2_grpc.GuardAdminStub(server.admin_channel).Status(admin_pb.StatusRequest(), timeout=5)


def _wait_for_workers(server: GuardProcess, restarts: int = 0, timeout: float = 60) -> admin_pb.StatusResponse:
    """The status once every worker serves (the port answers as soon as the first one does)."""
    deadline = time.monotonic() + timeout
    while True:
        status = _status(server)
        if status.ready and sum(w.restarts for w in status.workers) == restarts:
            return status
        assert time.monotonic() < deadline, server.log
        time.sleep(0.2)


def _infer_on_new_connections(server: GuardProcess, xs: np.ndarray) -> list[grpc.StatusCode]:
    """Each input on a connection of its own (a local subchannel pool: no connection shared between channels),
    so the kernel spreads them over the workers."""
    codes = []
    for x in xs:
        with grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.ModelInfer(request(x[None]), timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
    return codes


def _histogram_buckets(server: GuardProcess) -> set[tuple[str, str]]:
    return {(name, dict(labels)["le"]) for name, labels in server.metrics() if name.endswith("_bucket")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


@pytest.mark.slow
def test_workers_share_the_port_and_the_supervisor_sums_reloads_and_restarts_them(
        guard_only_bundle: Path, patched: tuple[Path, dict], tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    evidence, live = tmp_path / "evidence", tmp_path / "live"
    shutil.copytree(guard_only_bundle, live)
    server = GuardProcess(live, tmp_path, "--workers", "2", "--evidence-dir", str(evidence))
    try:
        status = _wait_for_workers(server)
        assert len(status.workers) == 2 and all(w.ready for w in status.workers)
        pids = [w.pid for w in status.workers]
        assert len(set(pids)) == 2 and server.proc.pid not in pids

        clean = _infer_on_new_connections(server, traffic["clean_x"][:16])
        triggered = _infer_on_new_connections(server, traffic["triggered_x"][:16])
        assert triggered.count(grpc.StatusCode.PERMISSION_DENIED) >= 15
        assert clean.count(grpc.StatusCode.OK) >= 15 and set(clean) <= {grpc.StatusCode.OK,
                                                                       grpc.StatusCode.PERMISSION_DENIED}
        status = _status(server)
        assert status.requests == 32 and status.flagged == sum(w.flagged for w in status.workers)
        assert all(w.requests > 0 for w in status.workers), status  # 32 connections: both workers served some
        # the supervisor's /metrics adds the workers' files up
        assert server.metric("trojan_guard_requests_total") == 32
        assert server.metric("trojan_guard_requests_total", verdict="flagged") == status.flagged
        assert server.metric("trojan_guard_inputs_total") == 32
        assert server.metric("trojan_guard_ready") == 1 and server.metric("trojan_guard_workers") == 2
        assert server.metric("trojan_guard_in_flight_requests") == 0
        buckets = _histogram_buckets(server)

        # evidence: one chain per worker, read together
        assert sorted(p.name for p in evidence.iterdir()) == ["worker-0", "worker-1"]
        listing = subprocess.run([sys.executable, "-m", "guard.cli", "evidence", str(evidence), "--json"],
                                 capture_output=True, text=True, cwd=ROOT)
        assert listing.returncode == 0, listing.stderr
        records = [json.loads(line) for line in listing.stdout.splitlines()]
        assert len(records) == status.flagged and {r["worker"] for r in records} == {"worker-0", "worker-1"}

        # reload: every worker, one after another; a tampered bundle is refused by the first and changes nothing
        admin = guard_admin_pb2_grpc.GuardAdminStub(server.admin_channel)
        tampered = tampered_copy(guard_only_bundle, tmp_path / "tampered")
        with pytest.raises(grpc.RpcError) as info:
            admin.ReloadBundle(admin_pb.ReloadBundleRequest(bundle_path=str(tampered)), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "worker 0:" in info.value.details() and "SHA-256 mismatch" in info.value.details()
        patched_sha = GuardBundle.load(patched[0]).sha256
        # SIGHUP to the supervisor: the bundle swapped in at the same path, every worker in turn
        shutil.move(live, tmp_path / "retired")
        shutil.copytree(patched[0], live)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while _status(server).reloads < 1:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.2)
        status = _status(server)
        assert {w.bundle_sha256 for w in status.workers} == {patched_sha} == {status.bundle_sha256}
        assert server.metric("trojan_guard_build_info", bundle_sha256=patched_sha) == 1
        assert server.metric("trojan_guard_build_info", bundle_sha256=GuardBundle.load(guard_only_bundle).sha256) == 0
        assert server.metric("trojan_guard_bundle_reloads_total", result="ok") == 2  # one per worker
        assert set(_infer_on_new_connections(server, traffic["clean_x"][:8])) <= {
            grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED}  # served by the new bundle

        # a worker that dies is started again, on the bundle the guard serves now
        os.kill(pids[0], signal.SIGKILL)
        status = _wait_for_workers(server, restarts=1)
        assert status.workers[0].restarts == 1
        assert status.workers[0].pid != pids[0] and status.workers[0].bundle_sha256 == patched_sha
        assert server.metric("trojan_guard_worker_restarts_total") == 1
        assert server.metric("trojan_guard_requests_total") >= 32 + 8  # the dead worker's counts are kept
        assert "worker 0 (pid" in server.log and "exited with status -9" in server.log
        _infer_on_new_connections(server, traffic["clean_x"][:8])
        # the new worker loaded the patched bundle but kept the first bundle's score buckets: the supervisor's
        # sums stay histograms
        assert _histogram_buckets(server) == buckets
        pids = [w.pid for w in status.workers]
    finally:
        code = server.stop()
    assert code == 0, server.log
    assert not any(_alive(pid) for pid in pids)  # SIGTERM drained and stopped every worker


def test_workers_refuse_a_bad_bundle_and_a_port_in_use_before_any_worker_starts(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURE, bad)
    (bad / "model.onnx").write_bytes(b"not a model")
    run = subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--bundle", str(bad), "--workers", "2",
                          "--port", "0", "--metrics-port", "0", "--admin-address", "off"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2 and "model.onnx" in run.stderr and "trojan-guard[worker" not in run.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--bundle", str(FIXTURE), "--workers",
                              "2", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                              "--admin-address", "off"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2 and f"cannot bind the gRPC port 127.0.0.1:{port}" in run.stderr, run.stderr
    assert "trojan-guard[worker" not in run.stderr


def test_a_worker_that_cannot_start_stops_the_guard_with_its_error(tmp_path: Path) -> None:
    # the supervisor verifies the bundle; a worker then fails on something only it meets: an evidence
    # directory it cannot create
    blocker = tmp_path / "evidence"
    blocker.write_text("a file, not a directory")
    port = free_port()
    run = subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--bundle", str(FIXTURE), "--workers", "2",
                          "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--admin-address",
                          "off", "--evidence-dir", str(blocker)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert "trojan-guard[worker" in run.stderr and "exited with status 2 before it was ready" in run.stderr
    with socket.socket() as probe:  # nothing left holding the port
        probe.bind(("127.0.0.1", port))
