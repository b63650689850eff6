"""Nobody gets around the guard or into it: admin isolation, signed bundles, mTLS, overload shedding, no score
oracle, bounded evidence and concurrency."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from guard.bundle import MANIFEST, BundleError, GuardBundle, sha256_file
from guard.signing import SIGNATURE, SignatureError, keygen, load_private_key, sign, trusted_keys, verify
from guard.transport.proto import guard_admin_pb2 as admin_pb
from guard.transport.proto import guard_admin_pb2_grpc, inference_pb2_grpc
from guard.transport.proto import inference_pb2 as pb

from .conftest import ROOT, GuardProcess, logits_of, request


def _admin(channel: grpc.Channel) -> guard_admin_pb2_grpc.GuardAdminStub:
    return guard_admin_pb2_grpc.GuardAdminStub(channel)


@pytest.mark.slow
def test_admin_answers_only_on_its_own_listener(guard_server: GuardProcess) -> None:
    for call in (lambda a: a.Status(admin_pb.StatusRequest(), timeout=5),
                 lambda a: a.ReloadBundle(admin_pb.ReloadBundleRequest(bundle_path="/tmp"), timeout=5)):
        with pytest.raises(grpc.RpcError) as info:
            call(_admin(guard_server.channel))  # the client port
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    status = _admin(guard_server.admin_channel).Status(admin_pb.StatusRequest(), timeout=5)
    assert status.ready and status.model_name == "model"


@pytest.mark.slow
def test_admin_token_on_a_unix_socket(guard_only_bundle: Path, tmp_path: Path,
                                      traffic: dict[str, np.ndarray]) -> None:
    token = tmp_path / "admin.token"
    token.write_text("s3cret-token-0123456789\n")
    socket = tmp_path / "admin.sock"
    umask = os.umask(0o022)  # a usual umask would leave the socket 0755: anyone on the host could connect
    try:
        server = GuardProcess(guard_only_bundle, tmp_path, "--admin-address", f"unix:{socket}",
                              "--admin-token-file", str(token))
    finally:
        os.umask(umask)
    try:
        assert stat.S_IMODE(socket.stat().st_mode) == 0o600
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            admin = _admin(channel)
            for metadata in ((), (("authorization", "Bearer wrong-token-0123456789"),),
                             (("authorization", "s3cret-token-0123456789"),)):
                with pytest.raises(grpc.RpcError) as info:
                    admin.ReloadBundle(admin_pb.ReloadBundleRequest(), metadata=metadata, timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "--admin-token-file" in info.value.details()
            good = (("authorization", "Bearer s3cret-token-0123456789"),)
            assert admin.Status(admin_pb.StatusRequest(), metadata=good, timeout=5).ready
            assert admin.ReloadBundle(admin_pb.ReloadBundleRequest(), metadata=good, timeout=30).bundle_sha256
        assert server.metric("trojan_guard_bundle_reloads_total", result="ok") == 1  # only the authorised one
        assert int(logits_of(server.infer(traffic["clean_x"][:1])).argmax()) == int(traffic["clean_y"][0])
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_an_admin_listener_off_loopback_needs_a_token(guard_only_bundle: Path, tmp_path: Path) -> None:
    def serve(address: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--bundle", str(guard_only_bundle),
                               "--port", "0", "--metrics-port", "0", "--admin-address", address, *flags],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    for address in ("0.0.0.0:8003", "[::]:8003", ":8003", "10.1.2.3:8003", "guard.example:8003"):
        run = serve(address)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, (address, run.stderr)
        assert f"--admin-address {address} is reachable from other hosts: it needs --admin-token-file" in lines[0]
    from guard.settings import admin_is_local
    assert all(admin_is_local(a) for a in ("127.0.0.1:8003", "127.0.0.9:1", "[::1]:8003", "localhost:8003",
                                            "unix:/run/guard.sock"))


# --- signed bundles -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("ours", "theirs"):
        out[f"{name}_key"], out[f"{name}_pub"] = keygen(root / name)
    return out


def _resign(bundle: Path, key: Path, **provenance: str) -> None:
    """Rewrite guard.json (provenance fields changed) and sign it with ``key``: a legitimately signed bundle."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["provenance"].update(provenance)
    data = json.dumps(manifest, indent=2).encode()
    (bundle / MANIFEST).write_bytes(data)
    (bundle / SIGNATURE).write_bytes(sign(data, load_private_key(key)))


@pytest.fixture(scope="module")
def signed_bundle(case_dir: Path, guard_only_bundle: Path, keys: dict[str, Path]) -> Path:
    """The guard-only bundle written again by the patch job with --signing-key (every phase reused)."""
    from offline.patch.job import PatchSettings, run_patch
    from offline.patch.repair import RepairSettings

    lines: list[str] = []
    out = case_dir / "signed"
    run_patch(case_dir / "model.pt", str(case_dir / "clean.npz"), out,
              settings=PatchSettings(recover_restarts=1, repair=RepairSettings(method="none"),
                                     signing_key=str(keys["ours_key"])),
              true_trigger_file=case_dir / "attack.json", work_dir=case_dir / "bundle.work",
              progress=False, say=lines.append)
    assert any("signed by key" in line for line in lines), lines
    assert verify(out, trusted_keys([keys["ours_pub"]])).key_file == str(keys["ours_pub"])
    return out


@pytest.mark.slow
def test_signatures_catch_what_checksums_cannot(signed_bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    trusted = trusted_keys([keys["ours_pub"]])
    assert GuardBundle.load(signed_bundle, trusted).signed is not None
    # rotation: any of several trusted keys will do
    assert GuardBundle.load(signed_bundle, trusted_keys([keys["theirs_pub"], keys["ours_pub"]])).signed

    def variant(name: str) -> Path:
        path = tmp_path / name
        shutil.copytree(signed_bundle, path)
        return path

    # a pool file changed and its checksum regenerated: consistent, but not what was signed
    forged = variant("forged")
    pool = np.load(forged / "clean_pool.npy")
    pool[0] = 1.0
    np.save(forged / "clean_pool.npy", pool)
    manifest = json.loads((forged / MANIFEST).read_text())
    manifest["clean_pool"]["sha256"] = sha256_file(forged / "clean_pool.npy")
    (forged / MANIFEST).write_text(json.dumps(manifest, indent=2))
    GuardBundle.load(forged)  # the checksums agree
    with pytest.raises(SignatureError, match="does not match guard.json"):
        GuardBundle.load(forged, trusted)

    other = variant("other-key")
    _resign(other, keys["theirs_key"])
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        GuardBundle.load(other, trusted)

    truncated = variant("truncated")
    doc = json.loads((truncated / SIGNATURE).read_text())
    doc["signature"] = doc["signature"][:40]
    (truncated / SIGNATURE).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="truncated|unreadable"):
        GuardBundle.load(truncated, trusted)
    cut = variant("cut")
    (cut / SIGNATURE).write_bytes((cut / SIGNATURE).read_bytes()[:30])
    with pytest.raises(SignatureError, match="unreadable signature"):
        GuardBundle.load(cut, trusted)

    unsigned = variant("unsigned")
    (unsigned / SIGNATURE).unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        GuardBundle.load(unsigned, trusted)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guard.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


@pytest.mark.slow
def test_inspect_says_who_signed(signed_bundle: Path, guard_only_bundle: Path, keys: dict[str, Path]) -> None:
    ok = _cli("inspect", str(signed_bundle), "--trusted-key", str(keys["ours_pub"]))
    assert ok.returncode == 0, ok.stderr
    assert "signature   verified: guard.json signed by key" in ok.stdout
    assert "not verified" in _cli("inspect", str(signed_bundle)).stdout
    assert "unsigned" in _cli("inspect", str(guard_only_bundle)).stdout
    bad = _cli("inspect", str(signed_bundle), "--trusted-key", str(keys["theirs_pub"]))
    assert bad.returncode == 2 and "not among the trusted keys" in bad.stderr


@pytest.mark.slow
def test_serve_with_trusted_keys_refuses_unsigned_forged_and_rolled_back_bundles(
        signed_bundle: Path, guard_only_bundle: Path, keys: dict[str, Path], tmp_path: Path,
        traffic: dict[str, np.ndarray]) -> None:
    pub = str(keys["ours_pub"])
    # at start: exit 2 and one line naming the reason
    unsigned = subprocess.run([sys.executable, "-m", "guard.cli", "serve", "--bundle", str(guard_only_bundle),
                               "--trusted-key", pub, "--port", "0", "--metrics-port", "0", "--admin-address", "off"],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert unsigned.returncode == 2
    lines = unsigned.stderr.strip().splitlines()
    assert len(lines) == 1 and "guard.json.sig: missing; the bundle is unsigned" in lines[0], unsigned.stderr

    older = tmp_path / "older"
    shutil.copytree(signed_bundle, older)
    _resign(older, keys["ours_key"], created="2020-01-01T00:00:00+00:00")  # signed, but older
    other = tmp_path / "other"
    shutil.copytree(signed_bundle, other)
    _resign(other, keys["theirs_key"])
    server = GuardProcess(signed_bundle, tmp_path, "--trusted-key", pub)
    try:
        admin = _admin(server.admin_channel)
        for path, reason in ((guard_only_bundle, "unsigned"), (other, "not among the trusted keys"),
                             (older, "rollback")):
            with pytest.raises(grpc.RpcError) as info:
                admin.ReloadBundle(admin_pb.ReloadBundleRequest(bundle_path=str(path)), timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason in info.value.details() and "still serving the previous bundle" in info.value.details()
        status = admin.Status(admin_pb.StatusRequest(), timeout=5)
        assert status.bundle_path == str(signed_bundle) and status.reloads == 0
        assert int(logits_of(server.infer(traffic["clean_x"][:1])).argmax()) == int(traffic["clean_y"][0])
    finally:
        assert server.stop() == 0
    server = GuardProcess(signed_bundle, tmp_path, "--trusted-key", pub, "--allow-rollback")
    try:
        reply = _admin(server.admin_channel).ReloadBundle(admin_pb.ReloadBundleRequest(bundle_path=str(older)),
                                                          timeout=30)
        assert reply.bundle_sha256 == GuardBundle.load(older).sha256
    finally:
        assert server.stop() == 0


# --- TLS and client certificates ------------------------------------------------------------------------------

def _ca(tmp_path: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def pem(obj) -> bytes:
        if hasattr(obj, "private_bytes"):
            return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        return obj.public_bytes(serialization.Encoding.PEM)

    def cert(subject: str, key, issuer_name, issuer_key, ca: bool, san: str | None = None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = cert(f"{name} CA", ca_key, ca_name, ca_key, True)

    def issue(subject: str, san: str | None = None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        return pem(cert(subject, key, ca_name, ca_key, False, san)), pem(key)

    ca_path = tmp_path / f"{name}-ca.pem"
    ca_path.write_bytes(pem(ca_cert))
    return ca_path, issue


@pytest.mark.slow
def test_tls_and_client_certificates(guard_only_bundle: Path, tmp_path: Path,
                                     traffic: dict[str, np.ndarray]) -> None:
    ca, issue = _ca(tmp_path, "ours")
    _, issue_untrusted = _ca(tmp_path, "theirs")
    server_cert, server_key = issue("localhost", san="localhost")
    (tmp_path / "tls.crt").write_bytes(server_cert)
    (tmp_path / "tls.key").write_bytes(server_key)
    tls = ("--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"))
    x = traffic["clean_x"][5:6]

    def call(target: str, client: tuple[bytes, bytes] | None) -> grpc.StatusCode | int:
        creds = grpc.ssl_channel_credentials(ca.read_bytes(), *(reversed(client) if client else ()))
        with grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
            try:
                reply = inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request(x), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
        return int(logits_of(reply).argmax())

    server = GuardProcess(guard_only_bundle, tmp_path, *tls, tls_root=ca.read_bytes())
    try:  # TLS without client certificates
        assert call(server.target, None) == int(traffic["clean_y"][5])
        with grpc.insecure_channel(server.target) as plain, pytest.raises(grpc.RpcError) as info:
            inference_pb2_grpc.GRPCInferenceServiceStub(plain).ServerLive(pb.ServerLiveRequest(), timeout=3)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        assert server.stop() == 0

    server = GuardProcess(guard_only_bundle, tmp_path, *tls, "--tls-client-ca", str(ca), wait=False)
    try:  # mTLS: health needs a client certificate too, so wait on the log
        import time
        deadline = time.monotonic() + 90
        while "serving model" not in server.log:
            assert server.proc.poll() is None and time.monotonic() < deadline, server.log
            time.sleep(0.2)
        assert call(server.target, issue("client")) == int(traffic["clean_y"][5])
        assert call(server.target, issue_untrusted("intruder")) == grpc.StatusCode.UNAVAILABLE
        assert call(server.target, None) == grpc.StatusCode.UNAVAILABLE
        assert call(server.target, issue("client again")) == int(traffic["clean_y"][5])  # still serving
    finally:
        assert server.stop() == 0


# --- overload -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_flood_beyond_max_queue_is_shed_at_once_and_the_guard_serves_on(
        guard_only_bundle: Path, tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    server = GuardProcess(guard_only_bundle, tmp_path, "--max-queue", "4", "--max-batch", "1")
    try:
        x = traffic["clean_x"]

        def send(i: int) -> str:
            try:
                server.stub.ModelInfer(request(x[i % 60:i % 60 + 1]), timeout=60)
                return "OK"
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "overloaded" in exc.details() and "--max-queue 4" in exc.details()
                return exc.code().name

        with ThreadPoolExecutor(48) as pool:
            codes = list(pool.map(send, range(96)))
        shed = codes.count("RESOURCE_EXHAUSTED")
        assert shed > 0 and codes.count("OK") >= 5, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}, codes  # a clean refusal may occur
        assert server.metric("trojan_guard_request_errors_total", reason="overloaded") == shed
        assert int(logits_of(server.infer(x[7:8])).argmax()) == int(traffic["clean_y"][7])
    finally:
        assert server.stop() == 0


# --- a bundle's files are read once: what was checked is what is used (issue 33) --------------------------------

class _SwapAfterHashing:
    """Stands in for hashlib in guard.bundle: once a file's digest is taken, ``swap`` replaces the file."""

    def __init__(self, digest: str, swap) -> None:
        self.digest, self.swap, self.swapped = digest, swap, False

    def sha256(self, data: bytes = b""):
        inner, outer = hashlib.sha256(data), self

        class Digest:
            def update(self, more: bytes) -> None:
                inner.update(more)

            def hexdigest(self) -> str:
                value = inner.hexdigest()
                if value == outer.digest and not outer.swapped:
                    outer.swapped = True
                    outer.swap()
                return value

        return Digest()


def test_a_file_swapped_after_its_check_is_not_what_the_guard_uses(committed_bundle: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import guard.bundle
    from guard.dataplane import Guard
    from guard.settings import GuardSettings
    from tests.toy import other_model

    bundle = Path(shutil.copytree(committed_bundle, tmp_path / "bundle"))
    manifest = GuardBundle.load(bundle).manifest
    pool = np.load(bundle / "clean_pool.npy")

    # between the checksum and the parse: the pool is swapped the moment its digest has been taken
    def swap_pool() -> None:
        np.save(bundle / "clean_pool.npy", np.ones_like(pool))

    hooked = _SwapAfterHashing(manifest.clean_pool.sha256, swap_pool)
    monkeypatch.setattr(guard.bundle, "hashlib", hooked)
    loaded = GuardBundle.load(bundle)
    monkeypatch.undo()
    assert hooked.swapped and np.array_equal(loaded.pool, pool)
    assert loaded.manifest_bytes == (bundle / MANIFEST).read_bytes()  # identity: the manifest's own bytes
    assert loaded.sha256 == sha256_file(bundle / MANIFEST)
    with pytest.raises(BundleError, match="SHA-256 mismatch"):
        GuardBundle.load(bundle)  # the swap is there, and caught by the next load
    shutil.rmtree(bundle)
    shutil.copytree(committed_bundle, bundle)

    # between load and serving: the model the guard runs is the one it verified
    x = pool[:4]
    from guard.backends import EmbeddedBackend

    expected = EmbeddedBackend(bundle / "model.onnx", manifest.input.name).infer(x)[0]
    g = Guard(GuardSettings(bundle=bundle, admin_address="off", metrics_port=0))
    (bundle / "model.onnx").write_bytes(other_model(bundle / "model.onnx"))
    assert not np.allclose(EmbeddedBackend(bundle / "model.onnx", manifest.input.name).infer(x)[0], expected)

    async def served() -> np.ndarray:
        await g.start()
        try:
            return g.current_state().backend.infer(x)[0]
        finally:
            await g.state.close()

    np.testing.assert_allclose(asyncio.run(served()), expected, rtol=1e-5, atol=1e-6)


# --- rollback at start: a signed bundle_version and a floor (issue 33) -----------------------------------------

def _signed_version(source: Path, dest: Path, key: Path, version: int | None, created: str | None = None) -> Path:
    """A copy of ``source`` with guard.json's bundle_version set (None: the field removed), signed by ``key``."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    if version is None:
        manifest.pop("bundle_version", None)
    else:
        manifest["bundle_version"] = version
    if created:
        manifest["provenance"]["created"] = created
    data = json.dumps(manifest, indent=2).encode()
    (dest / MANIFEST).write_bytes(data)
    (dest / SIGNATURE).write_bytes(sign(data, load_private_key(key)))
    return dest


def test_a_signed_bundle_version_below_the_floor_is_refused_at_start_and_at_reload(
        committed_bundle: Path, tmp_path: Path) -> None:
    import asyncio

    from guard.dataplane import Guard
    from guard.errors import UntrustedBundle
    from guard.settings import GuardSettings

    key, pub = keygen(tmp_path / "keys")
    v3 = _signed_version(committed_bundle, tmp_path / "v3", key, 3)
    v5 = _signed_version(committed_bundle, tmp_path / "v5", key, 5)
    old = _signed_version(committed_bundle, tmp_path / "old", key, None)  # written before the field: version 0
    assert GuardBundle.load(old).manifest.bundle_version == 0

    # inspect and serve refuse below the floor: exit 2, one line
    ok = _cli("inspect", str(v5), "--trusted-key", str(pub), "--min-bundle-version", "4")
    assert ok.returncode == 0 and "version 5," in ok.stdout, ok.stderr
    for args in (("inspect", str(v3), "--min-bundle-version", "4"),
                 ("serve", "--bundle", str(v3), "--trusted-key", str(pub), "--min-bundle-version", "4",
                  "--port", "0", "--metrics-port", "0", "--admin-address", "off")):
        run = _cli(*args)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert "bundle_version 3 is below --min-bundle-version 4" in lines[0], lines

    # reload: below the serving version is a rollback unless allowed; below the floor never loads
    def reload_from(start: Path, to: Path, **settings) -> str:
        async def go() -> str:
            g = Guard(GuardSettings(bundle=start, trusted_key=[pub], admin_address="off", metrics_port=0,
                                    **settings))
            await g.start()
            try:
                await g.reload(to)
                return "reloaded"
            except UntrustedBundle as exc:
                assert exc.code == "FAILED_PRECONDITION"
                return str(exc)
            finally:
                await g.current_state().close()
        return asyncio.run(go())

    assert "refused as a rollback: bundle_version 3" in reload_from(v5, v3)
    assert "refused as a rollback: bundle_version 0" in reload_from(v5, old)
    assert reload_from(v3, v5) == "reloaded"
    assert reload_from(v5, v3, allow_rollback=True) == "reloaded"
    assert "below --min-bundle-version 4" in reload_from(v5, v3, allow_rollback=True, min_bundle_version=4)


def test_an_upstream_right_only_on_the_bundles_own_images_is_refused(committed_bundle: Path, tmp_path: Path) -> None:
    """The upstream check compares logits and features on fresh blends the bundle does not carry."""
    from concurrent.futures import ThreadPoolExecutor as Pool

    from guard.backends import EmbeddedBackend
    from guard.dataplane import ServingState, make_metrics
    from guard.errors import ReloadFailed
    from guard.settings import GuardSettings
    from guard.transport.upstream import UpstreamBackend
    from tests.toy import other_model

    bundle = GuardBundle.load(committed_bundle)
    m = bundle.manifest
    honest = EmbeddedBackend(bundle.model_bytes, m.input.name)
    other = EmbeddedBackend(other_model(committed_bundle / "model.onnx"), m.input.name)
    known = {row.tobytes() for row in bundle.pool}

    def cheating(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # the bundle's model on its own images only
        mine, theirs = honest.infer(x), other.infer(x)
        on_pool = np.array([row.tobytes() in known for row in x])[:, None]
        return np.where(on_pool, mine[0], theirs[0]), np.where(on_pool, mine[1], theirs[1])

    def wrong_features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = honest.infer(x)
        return logits, features + 0.5

    settings = GuardSettings(bundle=committed_bundle, backend="upstream", upstream="127.0.0.1:1", admin_address="off",
                             metrics_port=0)
    with Pool(1) as pool:
        state = ServingState(bundle, settings, make_metrics(bundle), "model", pool, UpstreamBackend)
        try:
            state.backend.infer = honest.infer
            state._check_upstream_serves_the_bundle()
            for server, output in ((cheating, "logits"), (wrong_features, "features")):
                state.backend.infer = server
                with pytest.raises(ReloadFailed, match=f"is not the bundle's model: {output} differ by"):
                    state._check_upstream_serves_the_bundle()
        finally:
            state.backend.close()


# --- scores are not an oracle ---------------------------------------------------------------------------------

VERDICT_ONLY = {"guard_verdict", "guard_flagged", "guard_flagged_count", "guard_policy", "guard_bundle_sha256",
                "guard_input_flags"}


@pytest.mark.slow
def test_scores_are_no_oracle_clients_get_the_verdict_only(
        guard_server: GuardProcess, traffic: dict[str, np.ndarray]) -> None:
    from guard.evidence import read_evidence

    p_values_before = guard_server.metric("trojan_guard_p_value_count", detector="combined")
    # a refusal: the verdict in trailing metadata, no detector, score or p-value; not in the message either
    with pytest.raises(grpc.RpcError) as info:
        guard_server.infer(traffic["triggered_x"][2:3], request_id="tuning-1")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    trailer = {k for k, _ in info.value.trailing_metadata() if k.startswith("guard-")}
    assert trailer == {k.replace("_", "-") for k in VERDICT_ONLY}, trailer
    assert not any(name in info.value.details() for name in ("strip", "knn", "activation", "mahalanobis"))
    # an answer: the verdict in parameters, nothing else
    answer = guard_server.infer(traffic["clean_x"][:2])
    assert set(answer.parameters) <= VERDICT_ONLY and "guard_verdict" in answer.parameters
    # the score outputs: refused, with how a trusted deployment turns them on
    for output in ("features", "guard_scores"):
        with pytest.raises(grpc.RpcError) as info:
            guard_server.infer(traffic["clean_x"][:1], outputs=("logits", output))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--expose-scores" in info.value.details()
    meta = guard_server.stub.ModelMetadata(pb.ModelMetadataRequest(name="model"), timeout=5)
    assert [o.name for o in meta.outputs] == ["logits"]
    # the operators still get them: metrics and evidence
    assert guard_server.metric("trojan_guard_p_value_count", detector="combined") >= p_values_before + 3
    kept = [r for r in read_evidence(guard_server.evidence_dir) if r.get("request_id") == "tuning-1"]
    assert len(kept) == 1 and kept[0]["scores"] and kept[0]["p_values"] and kept[0]["detectors"]



# --- request ids, the evidence backlog and concurrent calls are bounded ---------------------------------------

@pytest.mark.slow
def test_a_request_id_longer_than_256_bytes_is_refused(guard_server: GuardProcess,
                                                        traffic: dict[str, np.ndarray]) -> None:
    x = traffic["triggered_x"][3:4]  # a flagged input: its id would be copied into the evidence
    for long_id in ("x" * 257, "\u00e9" * 129, "y" * 100_000):  # (a MiB is beyond the message limit)
        with pytest.raises(grpc.RpcError) as info:
            guard_server.infer(x, request_id=long_id)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request id is" in info.value.details() and "at most 256" in info.value.details()
    assert guard_server.metric("trojan_guard_request_errors_total", reason="request_id") == 3
    answer = guard_server.infer(traffic["clean_x"][:1], request_id="z" * 256)
    assert answer.id == "z" * 256


@pytest.mark.slow
def test_a_flood_of_flagged_inputs_cannot_queue_evidence_without_bound(
        guard_only_bundle: Path, tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    from guard.dataplane import Guard
    from guard.evidence import audit_evidence
    from guard.settings import GuardSettings

    settings = GuardSettings(bundle=guard_only_bundle, policy="flag", metrics_port=0, max_batch=16,
                             evidence_dir=tmp_path / "ev", evidence_max_backlog=2)
    guard = Guard(settings, GuardBundle.load(guard_only_bundle))
    x = traffic["triggered_x"][:1]

    async def flood():
        await guard.start()
        store, write = guard.evidence, guard.evidence.append

        def slow_disk(*args, **kwargs):  # each fsync takes a while: records pile up behind the one thread
            time.sleep(0.2)
            return write(*args, **kwargs)

        store.append = slow_disk
        try:
            decisions = await asyncio.gather(*(guard.infer(x, f"flood-{i}") for i in range(16)))
            return decisions, await asyncio.gather(guard.infer(x, "after"))
        finally:
            await guard.close()

    decisions, after = asyncio.run(flood())
    flagged = sum(d.flagged for d in decisions)
    assert flagged >= 15 and after[0].flagged
    written = guard.metrics.evidence_records._value.get()
    dropped = guard.metrics.evidence_dropped._value.get()
    assert dropped > 0 and written + dropped == flagged + 1
    assert written <= 2 + 1 + 1  # at most the backlog of one batch's 16 flagged inputs, then 'after'
    audit = audit_evidence(tmp_path / "ev")
    assert [r["request_id"] for r in audit.records][-1] == "after"
    assert sum(r.get("dropped_before", 0) for r in audit.records) == dropped  # the chain says how many went
    assert audit.problems == []


@pytest.mark.slow
def test_calls_beyond_max_concurrent_rpcs_are_refused_before_decoding_and_the_guard_serves_on(
        guard_only_bundle: Path, tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    from guard.settings import GuardSettings

    default = GuardSettings(bundle=guard_only_bundle, max_queue=100, max_batch=4, evidence_max_backlog=10)
    assert default.concurrent_rpcs == 130
    # a batch that waits 3 s to fill holds the calls admitted; the others must not even be read
    server = GuardProcess(guard_only_bundle, tmp_path, "--max-concurrent-rpcs", "3", "--max-batch", "64",
                          "--max-delay-ms", "3000")
    try:
        x = traffic["clean_x"]

        def send(i: int) -> str:
            try:
                server.stub.ModelInfer(request(x[i:i + 1]), timeout=30)
                return "OK"
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "Concurrent RPC limit exceeded" in exc.details(), exc.details()
                return exc.code().name

        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(send, range(12)))
        assert codes.count("RESOURCE_EXHAUSTED") >= 9 - 1, codes  # 3 held, at most one more slipped in later
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}, codes
        assert int(logits_of(server.infer(x[7:8])).argmax()) == int(traffic["clean_y"][7])
        assert server.health() == 1  # SERVING
    finally:
        assert server.stop() == 0
