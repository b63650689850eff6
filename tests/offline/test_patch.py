"""The patch job end to end on a BadNets MNIST model: repair, export, calibration, bundle, resume."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from guard.bundle import BundleError, GuardBundle
from guard.cli import main as guard_main
from offline.attacks import BackdoorResult

pytestmark = pytest.mark.slow


def test_default_repair_removes_the_backdoor(patched: tuple[Path, dict], badnets_model: BackdoorResult) -> None:
    out, summary = patched
    assert summary["flagged"] == [badnets_model.target]
    manifest = GuardBundle.load(out).manifest
    before, after = manifest.repair["before"], manifest.repair["after"]
    assert manifest.repair["method"] == "unlearn"
    assert before["true_asr"] > 0.95
    assert after["true_asr"] <= 0.025, after
    assert before["accuracy"] - after["accuracy"] <= 0.02, (before, after)
    export = json.loads((out / "report" / "export.json").read_text())
    assert export["max_abs_error"] < 1e-4
    assert manifest.evaluation["frr"] <= 0.03
    assert manifest.evaluation["true_trigger"]["attack_passes"] <= 0.025


def test_guard_only_bundle_screens_out_triggered_inputs(guard_only_bundle: Path) -> None:
    """Without repair the model still obeys the trigger; the one verdict must catch it at one budget."""
    manifest = GuardBundle.load(guard_only_bundle).manifest
    evaluation = manifest.evaluation
    true = evaluation["true_trigger"]
    assert true["model_asr"] > 0.95
    assert true["attack_passes"] <= 0.02, true
    # one budget of 1 %: the held-out refusals stay near it (300 test images: 3 standard errors ~ 1.7 points)
    assert manifest.verdict.frr == 0.01 and evaluation["frr"] <= 0.025, evaluation
    # the scan flagged the target, so the reversed-trigger filter joins the trigger-free detectors
    assert manifest.verdict.detectors == ["strip", "knn", "activation"]
    assert true["detector_auroc"]["strip"] > 0.9 and true["detector_auroc"]["knn"] > 0.9, true
    g = manifest.verdict.guarantee
    assert g.calibration_images == 500 and g.expected_frr <= 0.01 < g.frr_upper_95  # 1,500 clean: a third


def test_tampered_or_broken_bundles_are_refused(patched: tuple[Path, dict], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    good, _ = patched
    assert guard_main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "on the log scale" in out

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    onnx = copy("model")
    data = bytearray((onnx / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (onnx / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: SHA-256 mismatch"):
        GuardBundle.load(onnx)

    pool = copy("pool")
    (pool / "clean_pool.npy").write_bytes((pool / "clean_pool.npy").read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"clean_pool\.npy: SHA-256 mismatch"):
        GuardBundle.load(pool)

    knn = copy("knn")
    (knn / "knn_reference.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(BundleError, match=r"knn_reference\.npy: SHA-256 mismatch"):
        GuardBundle.load(knn)

    short = copy("short")
    manifest = json.loads((short / "guard.json").read_text())
    manifest["knn"]["calibration_scores"] = manifest["knn"]["calibration_scores"][:-1]
    (short / "guard.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="knn has 499 calibration scores, the verdict 500"):
        GuardBundle.load(short)

    extra = copy("extra")
    manifest = json.loads((extra / "guard.json").read_text())
    manifest["strip"]["treshold"] = 0.5
    (extra / "guard.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"guard\.json: field 'strip\.treshold'"):
        GuardBundle.load(extra)

    for name, weights, message in (("weights", [0.1, 0.2], "weights for"), ("nan", None, "finite")):
        bad = copy(name)
        manifest = json.loads((bad / "guard.json").read_text())
        af = manifest["activation_filter"]
        af["weights"] = weights or [float("nan")] * len(af["neurons"])
        (bad / "guard.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=message):
            GuardBundle.load(bad)

    version = copy("version")
    manifest = json.loads((version / "guard.json").read_text())
    manifest["schema_version"] = 1
    (version / "guard.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 1 is not supported .* run 'trojan-forensics patch' again"):
        GuardBundle.load(version)

    # bundles written before the scan recorded its scale load as linear; an unknown scale is refused
    older = copy("older")
    manifest = json.loads((older / "guard.json").read_text())
    del manifest["scan"]["anomaly_scale"]
    (older / "guard.json").write_text(json.dumps(manifest))
    assert GuardBundle.load(older).manifest.scan.anomaly_scale == "linear"
    manifest["scan"]["anomaly_scale"] = "sqrt"
    (older / "guard.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="anomaly_scale"):
        GuardBundle.load(older)

    escape = copy("escape")
    manifest = json.loads((escape / "guard.json").read_text())
    manifest["model"]["file"] = "../../etc/passwd"
    (escape / "guard.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        GuardBundle.load(escape)

    missing = copy("missing")
    (missing / "model.onnx").unlink()
    assert guard_main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "model.onnx: missing from the bundle" in err and err.count("\n") == 1
    (missing / "guard.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        GuardBundle.load(missing)


FAST = ["--samples-per-step", "320", "--recover-restarts", "1", "--quiet"]


def _patch_cmd(case_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "offline.cli", "patch", "--model", str(case_dir / "model.pt"),
            "--data", str(case_dir / "clean.npz"), "--out", str(out), *FAST, *extra]


def test_killed_job_resumes_and_never_breaks_the_old_bundle(patched: tuple[Path, dict], case_dir: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(patched[0], out)  # a good bundle from an earlier run sits at the destination
    old_manifest = (out / "guard.json").read_text()
    work = tmp_path / "bundle.work"
    proc = subprocess.Popen(_patch_cmd(case_dir, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while not (work / "scan" / "result.json").exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "scan phase did not finish in time"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # killed after the scan, somewhere in repair
    proc.wait()
    assert (out / "guard.json").read_text() == old_manifest
    GuardBundle.load(out)

    rerun = subprocess.run(_patch_cmd(case_dir, out), capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "[1/6] scan: reused the finished result" in rerun.stdout
    bundle = GuardBundle.load(out)
    assert (out / "guard.json").read_text() != old_manifest
    assert bundle.manifest.scan.flagged_classes == patched[1]["flagged"]
    assert len(bundle.pool) == 200 and bundle.pool.dtype == np.float32


def test_scope_suspect_spends_the_refusals_on_the_flagged_class(guard_only_bundle: Path, case_dir: Path,
                                                                 traffic: dict[str, np.ndarray]) -> None:
    """--scope suspect: only inputs answered with the flagged class can be refused, at the same overall budget,
    and the guard serving the bundle applies that scope."""
    import asyncio

    from guard.dataplane import Guard
    from guard.settings import GuardSettings
    from offline.patch.calibrate import CalibrationSettings
    from offline.patch.job import PatchSettings, run_patch
    from offline.patch.repair import RepairSettings

    out = case_dir / "guard-only-scoped"
    lines: list[str] = []
    run_patch(case_dir / "model.pt", str(case_dir / "clean.npz"), out,
              settings=PatchSettings(recover_restarts=1, repair=RepairSettings(method="none"),
                                     calibration=CalibrationSettings(scope="suspect")),
              true_trigger_file=case_dir / "attack.json", work_dir=case_dir / "bundle.work",
              progress=False, say=lines.append)
    assert any("[3/6] export: reused" in line for line in lines)  # only calibration onwards runs again
    target = 3
    manifest = GuardBundle.load(out).manifest
    assert manifest.verdict.classes == [target]
    ev = manifest.evaluation
    assert ev["frr"] <= 0.03, ev
    assert ev["true_trigger"]["attack_passes"] <= 0.02, ev["true_trigger"]

    async def serve() -> list:
        guard = Guard(GuardSettings(bundle=out, policy="flag"))
        await guard.start()
        try:
            x = np.concatenate([traffic["clean_x"], traffic["triggered_x"]])
            return [await guard.infer(x[i:i + 1]) for i in range(len(x))]
        finally:
            await guard.close()

    decisions = asyncio.run(serve())
    answers = np.array([int(d.logits.argmax()) for d in decisions])
    flagged = np.array([d.flagged for d in decisions])
    assert not flagged[answers != target].any()  # nothing answered with another class is refused
    assert flagged[len(traffic["clean_x"]):].mean() >= 0.9  # the triggered inputs, answered as 3
    # the guard scores the filter exactly as the bundle says (a discriminant's weights, or a mean)
    af = manifest.activation_filter
    features = np.concatenate([d.features for d in decisions]).reshape(len(decisions), -1)[:, af.neurons]
    expected = features @ np.asarray(af.weights, dtype=np.float32) if af.weights else features.mean(axis=1)
    served = np.array([d.inputs[0].scores["activation_score"] for d in decisions])
    assert np.allclose(served, expected, rtol=1e-4, atol=1e-4)
    # and reports every detector's p-value next to the combined one
    v = decisions[-1].inputs[0]
    assert set(v.p_values) == {"strip", "knn", "activation"} and 0 < v.p_value <= 1


# --- what the job signs is what its phases wrote (issue 33) ------------------------------------------------------

def test_a_model_swapped_in_the_work_directory_is_redone_not_signed(tiny_case: Path, tmp_path: Path) -> None:
    from tests.tiny import run_tiny_patch
    from tests.toy import other_model

    out, work = tmp_path / "bundle", tmp_path / "work"
    run_tiny_patch(tiny_case, out, work)
    planted = other_model(work / "export" / "model.onnx")
    (work / "export" / "model.onnx").write_bytes(planted)  # whoever can write the work directory

    said, warned = run_tiny_patch(tiny_case, out, work)
    assert any("phase export" in w and "model.onnx changed since the phase wrote it" in w for w in warned), warned
    assert "[3/6] export" in said and "[2/6] repair: reused the finished result from a previous run" in said
    served = (out / "model.onnx").read_bytes()
    assert served != planted and (work / "export" / "model.onnx").read_bytes() != planted
    assert GuardBundle.load(out).manifest.model.sha256 == hashlib.sha256(served).hexdigest()

    # a file the phase never wrote, a missing one, a record from before digests: all redone, never reused
    (work / "calibrate" / "extra.npy").write_bytes(b"not written by calibration")
    _, warned = run_tiny_patch(tiny_case, out, work)
    assert any("phase calibrate" in w and "extra.npy was not written by the phase" in w for w in warned), warned
    (work / "export" / "model.onnx").unlink()
    _, warned = run_tiny_patch(tiny_case, out, work)
    assert any("model.onnx is missing" in w for w in warned), warned
    record = json.loads((work / "scan" / "result.json").read_text())
    del record["files"]
    (work / "scan" / "result.json").write_text(json.dumps(record))
    said, warned = run_tiny_patch(tiny_case, out, work)
    assert any("phase scan" in w and "no file digests" in w for w in warned) and "[1/6] scan" in said, warned
    GuardBundle.load(out)


def _key_body(key: Path) -> bytes:
    """The base64 line of a PEM private key: what would show if its bytes were copied anywhere."""
    return key.read_bytes().splitlines()[1]


def test_a_link_to_the_signing_key_in_the_work_directory_never_reaches_the_bundle(
        tiny_case: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import guard.bundle
    from guard.signing import keygen, trusted_keys
    from tests.tiny import run_tiny_patch

    key, pub = keygen(tmp_path / "keys")
    out, work = tmp_path / "bundle", tmp_path / "work"
    run_tiny_patch(tiny_case, out, work)
    (work / "scan" / "notes.txt").symlink_to(key)  # planted where the report copy used to follow links
    (work / "report").mkdir(exist_ok=True)
    (work / "report" / "key.pem").symlink_to(key)
    key_reads: list[bool] = []
    real_load = guard.bundle.load_private_key  # sign_bundle reads the key through it

    def load_private_key(path):  # the key is read once, when every phase is done and the bundle is complete
        key_reads.append((work / "evaluate" / "result.json").exists() and (work / "report" / "report.html").exists())
        return real_load(path)

    monkeypatch.setattr(guard.bundle, "load_private_key", load_private_key)
    said, warned = run_tiny_patch(tiny_case, out, work, signing_key=str(key))
    assert any("phase scan" in w and "notes.txt is a symbolic link" in w for w in warned), warned
    assert key_reads == [True] and any("signed by key" in line for line in said)
    body = _key_body(key)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert not any(body in (out / name).read_bytes() for name in on_disk)
    bundle = GuardBundle.load(out, trusted_keys([pub]))
    assert bundle.signed is not None
    listed = {name for name, _ in bundle.manifest.files()}
    assert on_disk == listed | {"guard.json", "guard.json.sig"}  # every file is under the signed manifest
    assert {"report/report.html", "report/scan.json"} <= listed

    # a link the job would have to copy itself is refused, naming it
    (work / "calibrate" / "clean_pool.npy").unlink()
    (work / "calibrate" / "clean_pool.npy").symlink_to(key)
    _, warned = run_tiny_patch(tiny_case, out, work)
    assert any("clean_pool.npy is a symbolic link" in w for w in warned), warned
    assert not any(body in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_sign_signs_only_a_finished_bundle_that_verifies(tiny_bundle: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from guard.signing import SIGNATURE, keygen, trusted_keys
    from offline.cli import main as forensics_main

    key, pub = keygen(tmp_path / "keys")

    def variant(name: str) -> Path:
        shutil.copytree(tiny_bundle, tmp_path / name)
        return tmp_path / name

    good = variant("good")
    assert forensics_main(["sign", str(good), "--signing-key", str(key)]) == 0
    assert GuardBundle.load(good, trusted_keys([pub])).signed is not None
    capsys.readouterr()

    changed = variant("changed")
    with open(changed / "report" / "report.html", "ab") as fh:
        fh.write(b"<script>appended after the job</script>")
    unlisted = variant("unlisted")
    (unlisted / "report" / "extra.txt").write_text("not written by the job")
    linked = variant("linked")
    (linked / "report" / "key.pem").symlink_to(key)
    for bundle, reason in ((changed, "SHA-256 mismatch"), (unlisted, "not listed in guard.json"),
                           (linked, "a symbolic link")):
        assert forensics_main(["sign", str(bundle), "--signing-key", str(key)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "not signed" in err and reason in err, err
        assert not (bundle / SIGNATURE).exists()
        with pytest.raises(BundleError, match=reason):
            GuardBundle.load(bundle)

    # the writer copies no link either: one in a directory it is given is refused, naming it
    from guard.bundle import write_bundle

    source = tmp_path / "report-with-link"
    shutil.copytree(tiny_bundle / "report", source)
    (source / "key.pem").symlink_to(key)
    manifest = GuardBundle.load(tiny_bundle).manifest
    with pytest.raises(BundleError, match="key.pem: a symbolic link"):
        write_bundle(tmp_path / "written", manifest, {n: tiny_bundle / n for n, _ in manifest.files()
                                                      if not n.startswith("report/")}, extra_dirs={"report": source})
    assert not (tmp_path / "written").exists()


def test_bundle_version_is_signed_into_guard_json(tiny_case: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    from datetime import datetime

    from guard.signing import keygen, trusted_keys
    from offline.cli import main as forensics_main

    default = GuardBundle.load(tiny_bundle).manifest  # no --bundle-version: the creation time in Unix seconds
    assert default.bundle_version == int(datetime.fromisoformat(default.provenance.created).timestamp())
    key, pub = keygen(tmp_path / "keys")
    out = tmp_path / "bundle"
    assert forensics_main(["patch", "--model", str(tiny_case / "model.pt"), "--data", str(tiny_case / "clean.npz"),
                           "--out", str(out), "--max-steps", "2", "--samples-per-step", "64", "--no-early-stop",
                           "--recover-restarts", "1", "--repair", "none", "--strip-n", "5", "--pool-size", "40",
                           "--strip-group", "0", "--quiet", "--bundle-version", "7",
                           "--signing-key", str(key)]) == 0
    bundle = GuardBundle.load(out, trusted_keys([pub]))
    assert bundle.manifest.bundle_version == 7 and b'"bundle_version": 7' in bundle.manifest_bytes


def test_patch_on_a_traced_model_writes_a_bundle_the_guard_serves(tiny_case: Path, badnets_model: BackdoorResult,
                                                                   tmp_path: Path) -> None:
    """A model exported with torch.jit.trace by another pipeline: the job finds its features layer in the graph
    and the bundle's model gives the same logits."""
    import onnxruntime as ort
    import torch

    from offline.patch.job import run_patch
    from tests.offline.test_models import ThirdPartyLeNet, save_traced
    from tests.tiny import tiny_settings

    net = ThirdPartyLeNet(badnets_model.model).eval()
    save_traced(net, tmp_path / "traced.pt")
    out = tmp_path / "bundle"
    run_patch(tmp_path / "traced.pt", str(tiny_case / "clean.npz"), out, settings=tiny_settings(),
              progress=False, say=lambda _: None, warn=lambda _: None)
    bundle = GuardBundle.load(out)
    x = np.load(tiny_case / "clean.npz")["x"][:16]
    logits, features = ort.InferenceSession(str(out / bundle.manifest.model.file)).run(["logits", "features"],
                                                                                      {bundle.manifest.input.name: x})
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert features.shape == (16, 64)


def test_patch_on_an_rgb_resnet_with_batchnorm_writes_a_bundle_the_guard_serves(signs_resnet_case: Path,
                                                                              tmp_path: Path) -> None:
    """The many-class RGB case: a ResNet-18 with BatchNorm on the 43 sign classes goes through the whole job;
    the bundle's ONNX model (BatchNorm in inference form) gives the TorchScript model's logits and its pooled
    features, and the guard loads it."""
    import onnxruntime as ort
    import torch

    from guard.backends import EmbeddedBackend
    from offline.patch.calibrate import CalibrationSettings
    from offline.patch.job import run_patch
    from tests.tiny import tiny_settings

    out = tmp_path / "bundle"
    calibration = CalibrationSettings(strip_n=5, pool_size=40, strip_group=0,
                                      detectors=("strip", "knn", "scale_up", "ibd_psc"))
    run_patch(signs_resnet_case / "model.pt", str(signs_resnet_case / "clean.npz"), out,
              settings=tiny_settings(calibration=calibration), progress=False, say=lambda _: None,
              warn=lambda _: None, device="auto")
    bundle = GuardBundle.load(out)
    m = bundle.manifest
    assert m.input.shape[-3:] == [3, 32, 32] and len(m.class_names) == 43
    assert m.verdict.detectors[:4] == ["strip", "knn", "scale_up", "ibd_psc"] and len(m.scale_up.class_mean) == 43
    assert len(m.ibd_psc.outputs) == 5 and m.ibd_psc.omega == 1.5
    x = np.load(signs_resnet_case / "clean.npz")["x"][:16]
    logits, features = ort.InferenceSession(str(out / m.model.file)).run(["logits", "features"], {m.input.name: x})
    net = torch.jit.load(str(signs_resnet_case / "model.pt")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert features.shape == (16, 32)
    # the guard's screen runs SCALE-UP's amplified copies beside STRIP's blends in one model call, whose
    # outputs carry IBD-PSC's amplified-BatchNorm variants
    screen = bundle.screen()
    assert screen.model_outputs == tuple(m.ibd_psc.outputs)
    backend = EmbeddedBackend(out / m.model.file, m.input.name, extra_outputs=screen.model_outputs)
    result = screen.run(backend.infer, x)
    assert result.scores.shape == (16, len(m.verdict.detectors)) and np.isfinite(result.scores).all()
    assert (result.forward_passes == 1 + 5 + 5).all()  # itself, 5 blends, 5 scaled copies
    # the guard's data plane asks its model for the variants too
    import asyncio

    from guard.dataplane import Guard
    from guard.settings import GuardSettings

    guard = Guard(GuardSettings(bundle=out, metrics_port=0), bundle)

    async def serve_one():
        await guard.start()
        try:
            return await guard.infer(x[:4])
        finally:
            await guard.close()

    decision = asyncio.run(serve_one())
    assert decision.screened and decision.logits.shape == (4, 43) and len(decision.inputs) == 4


def test_a_logits_only_onnx_resnet_gets_its_features_output_in_the_bundle(signs_resnet_case: Path,
                                                                         tmp_path: Path) -> None:
    """Users export ONNX with one logits output: the job finds the features (the input of the last Gemm) and the
    bundle's model has both outputs, so the feature detectors work on it."""
    import onnx
    import onnxruntime as ort
    import torch

    from offline.patch.job import run_patch
    from tests.tiny import tiny_settings

    net = torch.jit.load(str(signs_resnet_case / "model.pt")).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(tmp_path / "user.onnx"), input_names=["images"],
                      output_names=["scores"], dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}},
                      opset_version=17, dynamo=False)
    assert [o.name for o in onnx.load(str(tmp_path / "user.onnx")).graph.output] == ["scores"]
    out = tmp_path / "bundle"
    run_patch(tmp_path / "user.onnx", str(signs_resnet_case / "clean.npz"), out, settings=tiny_settings(),
              progress=False, say=lambda _: None, warn=lambda _: None)
    m = GuardBundle.load(out).manifest
    assert "knn" in m.verdict.detectors
    x = np.load(signs_resnet_case / "clean.npz")["x"][:8]
    logits, features = ort.InferenceSession(str(out / m.model.file)).run(["logits", "features"], {m.input.name: x})
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert features.shape == (8, 32)  # the pooled last stage: the Gemm's input
