"""``trojan-forensics``: find, explain and (later) repair backdoors in image classifiers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offline.errors import ForensicsError
from offline.flags import add_flags, fraction, positive, settings_from

# what a simulated attack must reach to count: ASR on held-out non-target images, and the most clean accuracy it
# may lose against a clean model trained with the same seed
ATTACK_ASR_BAR = 0.9
ATTACK_ACCURACY_BAR = 0.02


def build_parser() -> argparse.ArgumentParser:
    from offline.mntd.meta import MetaSettings
    from offline.mntd.shadows import ShadowSettings
    from offline.patch.settings import CalibrationSettings, PatchSettings, RepairSettings

    parser = argparse.ArgumentParser(
        prog="trojan-forensics",
        description="Forensics for possibly backdoored image classifiers: Neural Cleanse or TABOR trigger "
                    "reverse-engineering, repair and the guard bundle, training-data audit, forensic report, and "
                    "attack simulators to build test models.",
    )
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="reverse-engineer triggers for every class and flag outliers",
                       description="Neural Cleanse: reverse-engineer the smallest trigger for every class "
                                   "(all classes optimised together), flag classes whose trigger is an "
                                   "outlier by the MAD anomaly index (over the log mask norms by default), recover "
                                   "the flagged trigger.")
    p.add_argument("--model", required=True, help="TorchScript (.pt) or ONNX (.onnx) classifier")
    p.add_argument("--data", default="mnist",
                   help="clean data: 'mnist' (embedded), 'digits', an .npz with x (N,C,H,W in [0,1]) "
                        "and y, or an image folder with a sub-folder per class (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory for scan.json and trigger images")
    p.add_argument("--features-layer", default=None,
                   help="layer whose output is the features representation (default: the layer "
                        "feeding the last linear layer)")
    add_flags(p, PatchSettings, only=("anomaly_threshold", "repeats"))
    p.add_argument("--eval-fraction", type=fraction, default=0.2,
                   help="share of the clean data held out to measure reversed-trigger ASR (%(default)s)")
    p.add_argument("--no-recover", dest="recover", action="store_false",
                   help="skip refining the flagged class's trigger on all the data")
    add_flags(p, PatchSettings, only=("recover_restarts",))
    _device_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--meta", default=None, metavar="DIR",
                   help="with --method mntd: the meta-classifier from 'trojan-forensics mntd train'")
    _neural_cleanse_flags(p)

    mn = sub.add_parser("mntd", help="Meta Neural Trojan Detection: train shadow models and the meta-classifier",
                        description="Meta Neural Trojan Detection (Xu et al., IEEE S&P 2021). 'mntd train' trains "
                                    "shadow models on the clean data (half clean, half backdoored with triggers "
                                    "drawn from the jumbo distribution: random patches and blends, targets, "
                                    "poisoning rates), one Ray task each, then a meta-classifier with query "
                                    "tuning, calibrated on held-out shadows; 'scan --method mntd --meta DIR' uses "
                                    "it. Needs the 'fleet' extra (pip install 'trojan-guard[fleet]').")
    mn_sub = mn.add_subparsers(dest="mntd_command", required=True, metavar="SUBCOMMAND")
    mt = mn_sub.add_parser("train", help="train shadows (Ray tasks) and the calibrated meta-classifier",
                           description="Train --shadows shadow models into OUT/shadows (resumable: the ones there "
                                       "are kept) and the query-tuned meta-classifier into OUT (mntd.json, "
                                       "queries.npy, classifier.npz: arrays only, their digests in mntd.json).")
    mt.add_argument("--data", default="mnist", help="the defender's clean images the shadows train on, as for "
                                                    "scan (default: %(default)s)")
    mt.add_argument("--out", required=True, help="output directory")
    mt.add_argument("--shadows", type=positive(int), default=128,
                    help="shadow models, half of them backdoored (%(default)s; the paper trains thousands)")
    mt.add_argument("--address", default=None, help="Ray cluster, as for fleet (default: a local cluster)")
    mt.add_argument("--num-cpus", type=positive(int), default=None,
                    help="CPUs of the local cluster (default: all of this machine's)")
    mt.add_argument("--cpus-per-task", type=positive(int), default=1,
                    help="CPUs and torch threads of each shadow's training (%(default)s)")
    mt.add_argument("--fresh", action="store_true", help="train every shadow again")
    mt.add_argument("--quiet", action="store_true", help="no progress bar")
    add_flags(mt.add_argument_group("shadow models"), ShadowSettings)
    add_flags(mt.add_argument_group("meta-classifier"), MetaSettings)

    fl = sub.add_parser("fleet", help="scan every model of a registry, one Ray task each",
                        description="Scan many models as 'scan' does, each a Ray task (a local cluster sized to "
                                    "this machine, or --address). Writes OUT/fleet.json (per model: path, SHA-256, "
                                    "verdict, flagged classes, anomaly indices, seconds, error), OUT/fleet.html "
                                    "and each model's scan under OUT/scans/. Resumable: a model whose SHA-256, "
                                    "settings and clean data match a finished scan is not scanned again. A model "
                                    "that fails (corrupt file, worker killed) is reported and the others go on. "
                                    "Needs the 'fleet' extra (pip install 'trojan-guard[fleet]').")
    fl.add_argument("--models", required=True, nargs="+", metavar="DIR_OR_LIST",
                    help="model files, directories (searched for .pt, .pth, .ts and .onnx files) or text files "
                         "listing one model path a line")
    fl.add_argument("--data", default="mnist", help="clean data, as for scan (default: %(default)s); loaded "
                                                    "here and sent to the workers")
    fl.add_argument("--out", required=True, help="output directory")
    fl.add_argument("--address", default=None,
                    help="Ray cluster to run on: auto, HOST:PORT or ray://HOST:10001 (default: a local cluster)")
    fl.add_argument("--num-cpus", type=positive(int), default=None,
                    help="CPUs of the local cluster (default: all of this machine's)")
    fl.add_argument("--cpus-per-task", type=positive(int), default=1,
                    help="CPUs reserved for each model's scan, and its torch threads (%(default)s)")
    fl.add_argument("--features-layer", default=None, help="as for scan")
    add_flags(fl, PatchSettings, only=("anomaly_threshold", "repeats"))
    fl.add_argument("--eval-fraction", type=fraction, default=0.2, help="as for scan (%(default)s)")
    fl.add_argument("--no-recover", dest="recover", action="store_false", help="as for scan")
    add_flags(fl, PatchSettings, only=("recover_restarts",))
    fl.add_argument("--fresh", action="store_true", help="scan every model again, finished ones too")
    _device_flag(fl)
    fl.add_argument("--quiet", action="store_true", help="no progress bar")
    _neural_cleanse_flags(fl)

    pa = sub.add_parser("patch", help="scan, repair, calibrate and write the guard bundle",
                        description="The whole offline job: Neural Cleanse scan and trigger recovery, repair, "
                                    "ONNX export, calibration of the guard's detectors and of its one verdict "
                                    "at --frr, evaluation on held-out data, and the guard bundle. A killed "
                                    "job resumes from its last finished phase.")
    pa.add_argument("--model", required=True, help="TorchScript (.pt) or ONNX (.onnx) classifier")
    pa.add_argument("--data", default="mnist", help="clean data, as for scan (default: %(default)s); split "
                                                    "into fit, calibration and test (20 %%) parts")
    pa.add_argument("--out", required=True, help="bundle directory to write")
    pa.add_argument("--features-layer", default=None, help="as for scan")
    add_flags(pa, PatchSettings, only=("anomaly_threshold", "repeats", "recover_restarts"))
    add_flags(pa.add_argument_group("repair"), RepairSettings)
    c = pa.add_argument_group("guard calibration")
    add_flags(c, CalibrationSettings)
    add_flags(c, PatchSettings, only=("calibration_fraction",))
    add_flags(pa.add_argument_group("guard bundle"), PatchSettings,
              only=("model_name", "policy", "signing_key", "bundle_version"))
    pa.add_argument("--true-trigger", default=None,
                    help="evaluation mode: attack.json from 'trojan-forensics train'; its trigger's ASR is reported")
    pa.add_argument("--work-dir", default=None, help="where phases keep results (default: OUT.work)")
    pa.add_argument("--fresh", action="store_true", help="ignore finished phases of an earlier run")
    _device_flag(pa)
    pa.add_argument("--quiet", action="store_true", help="no progress bar")
    _neural_cleanse_flags(pa)

    kg = sub.add_parser("keygen", help="write an Ed25519 key pair for signing guard bundles",
                        description="Write DIR/bundle-signing.key (private, mode 0600: keep it with the patch "
                                    "job, e.g. in a Kubernetes Secret) and DIR/bundle-signing.pub (give it to "
                                    "'trojan-guard serve --trusted-key'). Refuses to overwrite a key.")
    kg.add_argument("--out", required=True, help="directory for the key pair")

    sg = sub.add_parser("sign", help="sign a finished guard bundle with an Ed25519 key",
                        description="Verify every file of BUNDLE against its guard.json (a bundle that does not "
                                    "verify is not signed), then sign those guard.json bytes into "
                                    "guard.json.sig. The one signing step: 'patch --signing-key' runs it on the "
                                    "finished bundle before publishing it, so the key is read only then.")
    sg.add_argument("bundle", help="bundle directory")
    sg.add_argument("--signing-key", required=True, help="Ed25519 private key (PEM) from 'trojan-forensics keygen'")
    rp = sub.add_parser("report", help="write the forensic report (HTML + JSON) of a bundle",
                        description="Build the forensic report from a bundle written by 'patch' (which also "
                                    "writes it): one self-contained HTML file with the images embedded, and "
                                    "report.json. Triage, detection, trigger, impact, repair, attribution "
                                    "(MITRE ATLAS).")
    rp.add_argument("--bundle", required=True, help="bundle directory written by 'patch'")
    rp.add_argument("--true-trigger", default=None,
                    help="evaluation mode: attack.json from 'train'; the report gives the recovered trigger's "
                         "overlap with it")
    rp.add_argument("--evidence", default=None, metavar="DIR",
                    help="the guard's evidence store (serve --evidence-dir): the report's impact gains the "
                         "deployment exposure (flagged inputs, by detector, when, answered as what, the chain "
                         "checked, a strip of the inputs)")
    rp.add_argument("--metrics", default=None, metavar="FILE_OR_URL",
                    help="with --evidence: the guard's Prometheus metrics, a file saved from /metrics or its URL "
                         "(requests and inputs served since the bundle was loaded)")
    rp.add_argument("--evidence-key-file", default=None,
                    help="the guard's --evidence-key-file: the evidence chain's HMAC links are verified with it")
    rp.add_argument("--audit", default=None,
                    help="audit.json from 'trojan-forensics audit' of the model's training set: its clustering "
                         "statistics join the detection section (kept in the bundle's report/ for later rebuilds)")

    au = sub.add_parser("audit", help="find poisoned samples in a training set (activation clustering, "
                                      "spectral signatures)",
                        description="Audit a training set with the model trained on it. Activation Clustering "
                                    "(Chen et al. 2019): per label, reduce the activations of the model's "
                                    "convolutional representation (ICA), 2-means, and reclassify the smaller "
                                    "cluster with a linear probe fitted on every other sample; a cluster that "
                                    "mostly leaves its label is poison. Spectral Signatures (Tran et al. 2018): "
                                    "per label, remove the samples most aligned with the top singular vector, "
                                    "1.5x the expected poison count. Writes audit.json with per-label statistics "
                                    "and flagged indices; with poison_idx in the .npz (the attack simulators' "
                                    "truth) also precision and recall.")
    au.add_argument("--model", required=True, help="TorchScript (.pt) or ONNX (.onnx) classifier")
    au.add_argument("--data", required=True,
                    help="the training set: .npz with x and y (and optionally poison_idx, the truth, to score "
                         "the audit), or an image folder; `trojan-forensics train` writes train.npz")
    au.add_argument("--out", required=True, help="output directory for audit.json")
    au.add_argument("--layer", default=None,
                    help="layer whose activations are audited (default: the one feeding the first fully "
                         "connected layer)")
    au.add_argument("--reduce", choices=("ica", "pca"), default="ica",
                    help="dimensionality reduction before clustering (default: %(default)s, as in the paper)")
    au.add_argument("--components", type=positive(int), default=10, help="reduced dimensions (%(default)s)")
    au.add_argument("--keep-threshold", type=fraction, default=0.3,
                    help="flag a cluster when less than this share of it stays in its label once reclassified "
                         "(%(default)s)")
    au.add_argument("--no-reclassify", action="store_true",
                    help="skip the exclusionary reclassification; flag by silhouette and cluster size instead")
    au.add_argument("--silhouette", type=fraction, default=0.25,
                    help="with --no-reclassify: a label is flagged when its 2-means silhouette is at least this "
                         "(%(default)s) ...")
    au.add_argument("--max-cluster-share", type=fraction, default=0.35,
                    help="... and its smaller cluster holds at most this share of the label (%(default)s)")
    au.add_argument("--scan", default=None, metavar="SCAN_JSON",
                    help="scan.json of the same model (from 'scan', or a bundle's report/scan.json): the "
                         "trigger-informed audit ranks each flagged label's rows by how much they behave like "
                         "its recovered trigger (cut out, the model leaves the label; near other images "
                         "stamped with it) and cuts where two populations separate, whatever their shares")
    au.add_argument("--clean", default=None, metavar="CLEAN",
                    help="the defender's clean images, never trained on (.npz with x and y, or an image folder; "
                         "`train` writes clean.npz; a few hundred do, 500 is the reference): adds the "
                         "clean-anchored spectral audit, which finds poison that is half a label or more and "
                         "estimates its count")
    au.add_argument("--expected-poison-rate", type=fraction, default=0.1,
                    help="expected poisoned share of a label; spectral signatures remove 1.5x that (%(default)s)")
    _device_flag(au)
    au.add_argument("--quiet", action="store_true", help="no progress bar")

    from offline.attacks.registry import ATTACK_SPECS, ATTACKS
    from offline.models import ARCHITECTURES

    t = sub.add_parser("train", help="train a (possibly backdoored) classifier with an attack simulator",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a classifier (the project's small CNN, or --arch resnet18) on "
                                   "clean data with a simulated attack (or none); save it as TorchScript with the "
                                   "held-out clean split, the training set as trained on and attack.json (the "
                                   "trigger, the target, clean accuracy and attack success rate on held-out "
                                   "non-target images).\n\nattacks:\n"
                                   + "\n".join(f"  {a.name:15} {a.summary}" for a in ATTACK_SPECS))
    t.add_argument("--data", default="mnist", help="training data, as for scan (default: %(default)s)")
    t.add_argument("--attack", choices=tuple(ATTACKS), default="badnets", help="(default: %(default)s)")
    t.add_argument("--arch", choices=ARCHITECTURES, default="cnn",
                   help="the network: cnn (the project's small CNN) or resnet18 (CIFAR-style, BatchNorm) "
                        "(default: %(default)s)")
    t.add_argument("--width", type=positive(int), default=None,
                   help="resnet18: channels of its first stage (default 64, the literature's; 16 trains 12x "
                        "faster on a CPU); cnn: size of its features layer (default 64)")
    t.add_argument("--target", type=int, default=0,
                   help="target class of the backdoor (%(default)s; all-to-all sends c to c + 1)")
    t.add_argument("--poison-rate", type=fraction, default=None,
                   help="share of training data poisoned (default: 0.1, or the attack's own default)")
    t.add_argument("--patch-size", type=positive(int), default=4,
                   help="BadNets / all-to-all patch side (%(default)s)")
    t.add_argument("--patch-row", type=int, default=None, help="patch top row (default: bottom, 1 px in)")
    t.add_argument("--patch-col", type=int, default=None, help="patch left column (default: right, 1 px in)")
    t.add_argument("--patch-pattern", choices=("white", "checker", "random"), default="white")
    t.add_argument("--alpha", type=fraction, default=0.15, help="blend weight of the blended trigger (%(default)s)")
    t.add_argument("--eps", type=fraction, default=0.1, help="L-inf bound of the invisible trigger (%(default)s)")
    t.add_argument("--epochs", type=positive(int), default=None,
                   help="training epochs (default: 8; 12 for the invisible trigger; the attack's own otherwise)")
    t.add_argument("--test-fraction", type=fraction, default=0.3,
                   help="share held out as clean data for scanning and ACC/ASR (%(default)s)")
    t.add_argument("--seed", type=int, default=0)
    _device_flag(t)
    t.add_argument("--out", required=True, help="output directory: model.pt, clean.npz (held out), train.npz (the "
                                                "training set as trained on, with poison_idx), attack.json and "
                                                "the trigger's files")
    for spec in ATTACK_SPECS:
        if (settings := spec.settings_class()) is not None:
            add_flags(t.add_argument_group(f"--attack {spec.name}"), settings, prefix=f"{spec.name}-")

    pr = sub.add_parser("poison-rate", help="how much poison the literature reports as enough, as sample counts",
                        description="The poisoning rates the literature reports as enough for a working backdoor "
                                    "(patch 0.1-1 %%, blended 1-5 %%, clean-label 5-10 %% of the training set) and "
                                    "the sample counts they mean for a training set of --train-size images. "
                                    "Large models learn a trigger from fewer samples: --capacity large reads the "
                                    "low end, small the high end, medium the geometric middle.")
    pr.add_argument("--train-size", type=positive(int), required=True, help="images in the training set")
    pr.add_argument("--capacity", choices=("small", "medium", "large"), default="medium",
                    help="model capacity (%(default)s)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")

    d = sub.add_parser("demo", help="train a BadNets-backdoored MNIST model, patch it, serve it behind the guard",
                       description="The end-to-end demo on the embedded MNIST digits: train a model with a "
                                   "4x4 BadNets patch (10%% poison), run the patch job on it (scan, repair, "
                                   "calibration, guard bundle), start 'trojan-guard serve' on the bundle (ports "
                                   "8001/8002, or free ones if taken), send held-out clean and triggered images "
                                   "through gRPC, print what was answered and refused, and stop the guard.")
    d.add_argument("--out", default="demo-out", help="output directory (default: %(default)s)")
    d.add_argument("--target", type=int, default=7, help="target class of the demo backdoor (%(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _neural_cleanse_flags(parser: argparse.ArgumentParser) -> None:
    from offline.scan.settings import NeuralCleanseConfig

    add_flags(parser.add_argument_group("Neural Cleanse optimisation (defaults: the original implementation's)"),
              NeuralCleanseConfig)


def _device_flag(parser: argparse.ArgumentParser) -> None:
    from offline.models import DEVICES

    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where torch runs the model: auto (a GPU where torch sees one, else the CPU), cpu or "
                             "cuda (default: %(default)s)")


def _attack_settings(spec: Any, args: argparse.Namespace) -> Any:
    """The attack's settings from its ``--<attack>-<field>`` flags; --epochs and --poison-rate apply too."""
    cls = spec.settings_class()
    values = vars(settings_from(args, cls))
    for common in ("epochs", "poison_rate"):
        given = getattr(args, common)
        if given is None:
            continue
        if common not in values:
            raise ForensicsError(f"--{common.replace('_', '-')} does not apply to --attack {spec.name}; see its "
                                 f"own flags in 'trojan-forensics train --help'")
        values[common] = given
    return cls(**values)


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from offline.attacks import BlendTrigger, PatchTrigger, training_setup
    from offline.attacks.registry import ATTACKS, build_attack, save_case
    from offline.data import load_dataset
    from offline.models import resolve_device

    data = load_dataset(args.data)
    if not 0 <= args.target < data.num_classes:
        raise ForensicsError(f"--target {args.target} is not a class of {data.source} (0..{data.num_classes - 1})")
    train, test = data.split(args.test_fraction, seed=args.seed)
    spec = ATTACKS[args.attack]
    trigger: Any = None
    if args.attack in ("badnets", "all-to-all"):
        trigger = PatchTrigger(args.patch_size, args.patch_row, args.patch_col, args.patch_pattern, args.seed)
        try:
            trigger.region(*data.input_shape[1:])
        except ValueError as exc:
            raise ForensicsError(str(exc)) from exc
    elif args.attack == "blend":
        trigger = BlendTrigger(args.alpha, args.seed)
    settings = _attack_settings(spec, args) if spec.module is not None else None
    with training_setup(args.arch, args.width, str(resolve_device(args.device))):
        result = build_attack(args.attack, train, test, args.target, args.seed, trigger=trigger,
                              poison_rate=args.poison_rate, epochs=args.epochs, eps=args.eps, settings=settings)
        verdict = _attack_verdict(args.attack, result, train, test, args.seed)
    return save_case(Path(args.out), args.attack, result, train, test, data.source,
                     extra={"arch": args.arch, "width": args.width, **verdict})


def _attack_verdict(attack: str, result: Any, train: Any, test: Any, seed: int) -> dict[str, Any]:
    """Whether the attack reached its bar (ASR >= 90 %, clean accuracy at most 2 points below a clean model of
    the same seed) and by how much it missed; the clean model is trained here for the comparison."""
    if attack == "none" or result.attack_success_rate is None:
        return {}
    from offline.attacks import train_backdoored_model

    clean = result.details.get("clean_model_accuracy")
    if clean is None:
        clean = train_backdoored_model(train, test, None, seed=seed).clean_accuracy
    drop = clean - result.clean_accuracy
    missed = []
    if result.attack_success_rate < ATTACK_ASR_BAR:  # clean-label: 0 or 1, whether its one image flipped
        missed.append(f"ASR {result.attack_success_rate:.1%} is {ATTACK_ASR_BAR - result.attack_success_rate:.1%} "
                      f"below {ATTACK_ASR_BAR:.0%}")
    if drop > ATTACK_ACCURACY_BAR:
        missed.append(f"clean accuracy is {drop:.1%} below the clean model's {clean:.1%} (allowed "
                      f"{ATTACK_ACCURACY_BAR:.0%})")
    return {"clean_model_accuracy": round(clean, 4), "accuracy_drop": round(drop, 4),
            "meets_bar": not missed, "missed": missed}


def _cmd_keygen(args: argparse.Namespace) -> None:
    from guard.signing import SignatureError, key_id, keygen, load_public_key

    try:
        private, public = keygen(args.out)
    except (SignatureError, OSError) as exc:
        raise ForensicsError(f"keygen: {exc}") from exc
    print(f"key {key_id(load_public_key(public))}: private {private} (sign with 'patch --signing-key {private}'), "
          f"public {public} (serve with 'trojan-guard serve --trusted-key {public}')")


def _cmd_poison_rate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from offline.attacks.rates import poison_rate_table

    rows = poison_rate_table(args.train_size, args.capacity)
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    print(f"poisoning enough for a working backdoor, training set of {args.train_size:,} images, "
          f"{args.capacity} capacity:")
    print(f"{'family':12} {'literature':>12} {'rate':>7} {'samples':>8} {'range':>14}  attacks")
    for r in rows:
        low, high = r["range"]
        counts = "{:,}-{:,}".format(*r["samples_range"])
        literature = f"{low * 100:g}-{high * 100:g} %"
        print(f"{r['family']:12} {literature:>12} {r['rate']:>7.2%} {r['samples']:>8,} {counts:>14}  {r['attacks']}")
    for r in rows:
        print(f"  {r['family']}: {r['sources']}")
    return rows


def _exposure(args: argparse.Namespace) -> tuple[dict[str, Any], bytes | None]:
    """``report --evidence``: the deployment exposure, from the guard's evidence store (and metrics)."""
    from guard.evidence import load_key
    from offline.exposure import deployment_exposure

    try:
        key = load_key(args.evidence_key_file) if args.evidence_key_file else None
    except OSError as exc:
        raise ForensicsError(str(exc)) from exc
    return deployment_exposure(args.evidence, args.metrics, key=key)


def _cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from guard.bundle import SIGNATURE, BundleError, GuardBundle, read_file, write_bundle
    from offline.jobs import write_json_atomic
    from offline.patch.job import attach, report_files
    from offline.report import build_report

    try:
        bundle = GuardBundle.load(args.bundle)
    except BundleError as exc:
        raise ForensicsError(str(exc)) from exc

    if "report/scan.json" not in {name for name, _ in bundle.manifest.files()}:
        raise ForensicsError(f"{bundle.root / 'report'}: no scan.json; was this bundle written by "
                             f"'trojan-forensics patch'?")
    audit = None
    if args.audit:
        try:
            audit = json.loads(Path(args.audit).read_text())
        except (OSError, ValueError) as exc:
            raise ForensicsError(f"{args.audit}: not a readable audit.json ({exc})") from exc
        if not isinstance(audit, dict) or "classes" not in audit or "activation_clustering" not in audit:
            raise ForensicsError(f"{args.audit}: not an audit.json written by 'trojan-forensics audit'")
    if args.metrics and not args.evidence:
        raise ForensicsError("--metrics goes with --evidence (the guard's evidence store)")
    was_signed = (bundle.root / SIGNATURE).exists()
    # the report is rebuilt beside the bundle and the bundle rewritten with it, so guard.json lists it
    with tempfile.TemporaryDirectory() as tmp:
        report_dir = Path(tmp) / "report"
        kept = {}
        for name, _ in bundle.manifest.files():
            try:
                data = read_file(bundle.root / name)  # checked again where write_bundle verifies the rewrite
            except BundleError as exc:
                raise ForensicsError(str(exc)) from exc
            if name.startswith("report/"):
                (report_dir / name[len("report/"):]).parent.mkdir(parents=True, exist_ok=True)
                (report_dir / name[len("report/"):]).write_bytes(data)
            else:
                kept[name] = data
        if audit is not None:
            write_json_atomic(report_dir / "audit.json", audit)
        if args.evidence:
            exposure, strip = _exposure(args)
            write_json_atomic(report_dir / "exposure.json", exposure)
            if strip is not None:
                (report_dir / "exposure_inputs.png").write_bytes(strip)
        report = build_report(report_dir, bundle.manifest.model_dump(), args.true_trigger)
        written = report_files(report_dir)
        try:
            write_bundle(bundle.root, attach(bundle.manifest, written), {**kept, **written})
        except BundleError as exc:
            raise ForensicsError(str(exc)) from exc
    report_dir = bundle.root / "report"
    print(report["verdict"]["headline"])
    for key in ("repair", "audit"):
        if key in report["verdict"]:
            print(report["verdict"][key])
    print(f"written: {report_dir / 'report.html'} and {report_dir / 'report.json'}")
    if was_signed:
        print(f"the report is listed in guard.json, which changed, so the old signature was dropped: sign the "
              f"bundle again with 'trojan-forensics sign {bundle.root} --signing-key KEY'", file=sys.stderr)
    return report


def _cmd_audit(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from tqdm.auto import tqdm

    from offline.audit import AuditSettings, audit, detection_quality, load_recovered_triggers
    from offline.data import load_dataset
    from offline.jobs import load_case, write_json_atomic

    triggers = load_recovered_triggers(args.scan) if args.scan else None  # a bad path fails before the model loads
    clean = load_dataset(args.clean) if args.clean else None
    case = load_case(args.model, args.data, None, args.device)
    truth = None
    if str(args.data).endswith(".npz"):
        with np.load(args.data, allow_pickle=False) as raw:
            truth = raw["poison_idx"] if "poison_idx" in raw.files else None
    settings = AuditSettings(layer=args.layer, reduce=args.reduce, components=args.components,
                             exclusionary=not args.no_reclassify, keep_threshold=args.keep_threshold,
                             silhouette_threshold=args.silhouette, max_cluster_share=args.max_cluster_share,
                             expected_poison_rate=args.expected_poison_rate)

    def progress(items, total, desc):  # a bar on a terminal, silence in logs and pipes
        return tqdm(items, total=total, desc=desc, unit="label", disable=True if args.quiet else None)

    report = audit(case.model, case.data.x, case.data.y, settings, progress, triggers,
                   None if clean is None else (clean.x, clean.y))
    report["model_sha256"], report["data"] = case.model_sha256, case.data.source
    if truth is not None:
        report["evaluation"] = {
            "activation_clustering": detection_quality(report["activation_clustering"]["flagged_indices"], truth),
            "spectral_signatures": detection_quality(report["spectral_signatures"]["removed_indices"], truth)}
        for method in ("anchored_spectral", "trigger_informed"):
            if method in report:
                report["evaluation"][method] = detection_quality(report[method]["flagged_indices"], truth)
    out = Path(args.out)
    write_json_atomic(out / "audit.json", report)
    print(f"audited {report['samples']} samples at layer {report['settings']['layer']} "
          f"({report['features_dim']} activations)")
    print(f"{'label':>5} {'count':>6} {'silhouette':>10} {'suspects':>8} {'kept in label':>13} {'AC':>5} "
          f"{'SS peak':>7}")
    for c in report["classes"]:
        kept = "-" if c["kept_label"] is None else f"{c['kept_label']:.0%}"
        print(f"{c['label']:>5} {c['count']:>6} {c['silhouette']:>10.3f} {c['suspect_size']:>8} {kept:>13} "
              f"{('FLAG*' if c['ambiguous'] else 'FLAG') if c['flagged'] else '-':>5} {c['spectral_peak']:>7.1f}")
    ac, ss = report["activation_clustering"], report["spectral_signatures"]
    if any(c["ambiguous"] for c in report["classes"]):
        print("* both clusters of the label leave it: the poison may be half the label or more, and the "
              "suspects listed (the smaller cluster) may be its clean part")
    print(f"activation clustering: flagged labels {report['flagged_classes'] or 'none'}, "
          f"{len(ac['flagged_indices'])} suspect samples; spectral signatures: "
          f"{len(ss['removed_indices'])} samples to remove")
    if "anchored_spectral" in report:
        found, quantile = report["anchored_spectral"], report["settings"]["anchored_quantile"]
        for a in found["classes"]:
            if a["flagged"]:
                print(f"clean-anchored spectral, label {a['label']}: {a['estimated_poison']} of {a['count']} rows "
                      f"flagged (estimated poison; {a['above']:.0%} of the label lies beyond {quantile:.0%} of its "
                      f"{a['clean_images']} clean images, against {a['expected_above']:.0%} in a clean label, "
                      f"p = {a['p_value']:.1e}; the rows read as: {a.get('character', {}).get('family', '-')})")
        unaudited = [a["label"] for a in found["classes"] if a["clean_images"] < 5]
        print(f"clean-anchored spectral ({found['clean_images']} clean images): flagged labels "
              f"{found['flagged_classes'] or 'none'}" + (f"; labels {unaudited} not audited (fewer than 5 clean "
                                                          f"images)" if unaudited else ""))
    for t in report.get("trigger_informed", {}).get("classes", []):
        print(f"trigger-informed, label {t['label']}: {t['flagged']} of {t['count']} rows flagged "
              f"({t['share']:.0%}; populations {t['separation']:.1f} SD apart; cutting the trigger's area "
              f"costs the label's log-probability {t['cut_drop_flagged']:.2f} on them, {t['cut_drop_clean']:.2f} "
              f"on the rest)")
    for name, q in report.get("evaluation", {}).items():
        print(f"  against poison_idx ({q['poisoned']} poisoned): {name.replace('_', ' ')}: precision "
              f"{q['precision']:.1%}, recall {q['recall']:.1%}")
    print(f"written: {out / 'audit.json'}")
    return report


def _print_scan(report: dict[str, Any], out: Path) -> None:
    print(f"verdict: {report['verdict'].upper()}"
          + (f" (flagged class {', '.join(map(str, report['flagged_classes']))})" if report["flagged_classes"] else ""))
    print(f"{'class':>5} {'mask L1':>8} {'anomaly':>8} {'ASR':>6}")
    for row in report["per_class"]:
        mark = "  <- flagged" if row["flagged"] else ""
        print(f"{row['class']:>5} {row['mask_l1_norm']:>8.1f} {row['anomaly_index']:>8.2f} "
              f"{row['reversed_trigger_asr']:>6.1%}{mark}")
    rows = report["per_class"]
    if "schedule_role_per_run" in rows[0]:
        went_on = [r["class"] for r in rows if r["schedule_role_per_run"][0] == "candidate"]
        reference = [r["class"] for r in rows if r["schedule_role_per_run"][0] == "reference"]
        print(f"adaptive schedule: {report['class_steps_per_run'][0]} class-steps; after "
              f"{report['settings']['warmup_steps']} steps "
              + (f"class {', '.join(map(str, went_on))} went on (reference class {', '.join(map(str, reference))}, "
                 f"the others counted with its shrink x{report['shrink_of_set_aside_per_run'][0]:.2f})"
                 if went_on else "no class stood out and the scan ended"))
    for rec in report["recovered_triggers"]:
        kept = next(c["start"] for c in rec["candidates"] if c.get("kept"))
        norms = ", ".join(f"{c['mask_l1_norm']:.1f}" for c in rec["candidates"])
        print(f"recovered trigger for class {rec['class']}: mask L1 {rec['mask_l1_norm']:.1f}, "
              f"held-out ASR {rec['held_out_asr']:.1%} (kept {kept}, the smallest of {len(rec['candidates'])} "
              f"starts: mask L1 {norms})")
    spread = report["max_anomaly_index"]
    if report["runs"] > 1:
        print(f"max anomaly index over {report['runs']} runs: median {spread['median']:.2f}, "
              f"range {spread['min']:.2f}..{spread['max']:.2f}")
    print(f"scan took {report['timings']['scan_seconds']:.0f} s; results in {out}/scan.json, "
          f"images in {out}/triggers/")


def _cmd_scan(args: argparse.Namespace) -> dict[str, Any]:
    from offline.patch.settings import PatchSettings
    from offline.scan.job import run_scan
    from offline.scan.settings import NeuralCleanseConfig

    config = settings_from(args, NeuralCleanseConfig)
    if config.method == "mntd" or args.meta:
        return _cmd_mntd_scan(args, config.method)
    s = settings_from(args, PatchSettings)
    report = run_scan(args.model, args.data, args.out, features_layer=args.features_layer,
                      config=config, threshold=s.anomaly_threshold,
                      repeats=s.repeats, eval_fraction=args.eval_fraction, recover=args.recover,
                      restarts=s.recover_restarts, progress=not args.quiet, device=args.device)
    _print_scan(report, Path(args.out))
    return report


def _cmd_fleet(args: argparse.Namespace) -> dict[str, Any]:
    from offline.data import load_dataset
    from offline.fleet.scan import FleetScanSettings, run_fleet
    from offline.patch.settings import PatchSettings
    from offline.scan.settings import NeuralCleanseConfig

    s = settings_from(args, PatchSettings)
    settings = FleetScanSettings(config=settings_from(args, NeuralCleanseConfig), threshold=s.anomaly_threshold,
                                 repeats=s.repeats, eval_fraction=args.eval_fraction, recover=args.recover,
                                 restarts=s.recover_restarts, features_layer=args.features_layer,
                                 device=args.device)
    fleet = run_fleet(args.models, load_dataset(args.data), args.out, settings, address=args.address,
                      num_cpus=args.num_cpus, cpus_per_task=args.cpus_per_task, fresh=args.fresh,
                      progress=not args.quiet)
    width = max(len(e["name"]) for e in fleet["models"])
    print(f"{'model':{width}} {'verdict':10} {'flagged':8} {'max AI':>6} {'seconds':>8}")
    for e in fleet["models"]:
        peak = "-" if e["max_anomaly_index"] is None else f"{e['max_anomaly_index']:.2f}"
        secs = "-" if e["seconds"] is None else f"{e['seconds']:.0f}" + ("*" if e["reused"] else "")
        print(f"{e['name']:{width}} {e['verdict']:10} {','.join(map(str, e['flagged_classes'])) or '-':8} "
              f"{peak:>6} {secs:>8}" + (f"  {e['error']}" if e["error"] else ""))
    n = fleet["summary"]
    print(f"{n['models']} models: {n['backdoored']} backdoored, {n['clean']} clean, {n['failed']} failed"
          + (f", {n['reused']} reused from an earlier run (*)" if n["reused"] else "")
          + f"; {fleet['cluster']['nodes']} Ray node(s), {fleet['cluster']['cpus']} CPUs, {fleet['seconds']:.0f} s")
    out = Path(args.out)
    print(f"written: {out / 'fleet.json'}, {out / 'fleet.html'}")
    if n["failed"]:
        raise ForensicsError(f"{n['failed']} of {n['models']} models could not be scanned (their errors are "
                             f"above and in fleet.json)")
    return fleet


def _cmd_mntd_scan(args: argparse.Namespace, method: str) -> dict[str, Any]:
    from offline.mntd.job import run_mntd_scan

    if method != "mntd":
        raise ForensicsError("--meta goes with --method mntd")
    if not args.meta:
        raise ForensicsError("--method mntd needs --meta DIR, a meta-classifier from 'trojan-forensics mntd train'")
    report = run_mntd_scan(args.model, args.data, args.out, args.meta, device=args.device)
    shadows = report["meta"]["shadows"]
    print(f"verdict: {report['verdict'].upper()} (MNTD backdoor probability {report['backdoor_probability']:.3f}, "
          f"threshold {report['threshold']:.3f}: at most {report['target_fpr']:.0%} of clean models above it, "
          f"calibrated on {shadows['calibration_clean']} held-out clean shadows)")
    print(f"results in {Path(args.out) / 'scan.json'}")
    return report


def _cmd_mntd_train(args: argparse.Namespace) -> dict[str, Any]:
    from offline.data import load_dataset
    from offline.mntd.job import run_mntd_train
    from offline.mntd.meta import MetaSettings
    from offline.mntd.shadows import ShadowSettings

    manifest = run_mntd_train(load_dataset(args.data), args.out, args.shadows, settings_from(args, ShadowSettings),
                              settings_from(args, MetaSettings), address=args.address, num_cpus=args.num_cpus,
                              cpus_per_task=args.cpus_per_task, fresh=args.fresh, progress=not args.quiet)
    m = manifest["measured"]
    sh = m["shadows"]
    auroc = "-" if m["calibration_auroc"] is None else f"{m['calibration_auroc']:.3f}"
    print(f"shadows: {sh['used']} used ({sh['left_out_weak_attack']} backdoored ones left out, their attack "
          f"under --min-shadow-asr), {sh['training']} to train, {sh['calibration']} to calibrate; median clean "
          f"accuracy {m['shadow_quality']['clean_accuracy_median']:.1%}; {m['shadow_seconds']:.0f} s of training")
    print(f"meta-classifier: held-out AUROC {auroc}; threshold {manifest['threshold']:.3f} (target FPR "
          f"{manifest['target_fpr']:.0%}): held-out FPR {m['calibration_fpr']:.0%}, TPR {m['calibration_tpr']:.0%}")
    print(f"written: {Path(args.out) / 'mntd.json'} (use it: trojan-forensics scan --method mntd --meta {args.out} "
          f"--model MODEL --out DIR)")
    return manifest


def _cmd_patch(args: argparse.Namespace) -> dict[str, Any]:
    from offline.patch.job import run_patch
    from offline.patch.settings import CalibrationSettings, PatchSettings, RepairSettings
    from offline.scan.settings import NeuralCleanseConfig

    settings = settings_from(args, PatchSettings, scan=settings_from(args, NeuralCleanseConfig),
                             repair=settings_from(args, RepairSettings),
                             calibration=settings_from(args, CalibrationSettings))
    return run_patch(args.model, args.data, args.out, settings=settings, features_layer=args.features_layer,
                     true_trigger_file=args.true_trigger, work_dir=args.work_dir, fresh=args.fresh,
                     progress=not args.quiet, device=args.device)


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from offline.attacks import PatchTrigger
    from offline.patch.job import run_patch

    out = Path(args.out)
    model_dir, bundle = out / "model", out / "bundle"
    print(f"[train] a BadNets-backdoored CNN on the embedded MNIST digits (4x4 patch, 10% poison, "
          f"target class {args.target})")
    train_args = build_parser().parse_args(
        ["train", "--data", "mnist", "--attack", "badnets", "--target", str(args.target),
         "--seed", str(args.seed), "--out", str(model_dir)])
    attack = _cmd_train(train_args)
    print(f"        clean accuracy {attack['clean_accuracy']:.1%}, attack success rate "
          f"{attack['attack_success_rate']:.1%} ({attack['poisoned_samples']} poisoned images)")
    print(f"[patch] trojan-forensics patch --model {model_dir / 'model.pt'} --data {model_dir / 'clean.npz'} "
          f"--out {bundle} --true-trigger {model_dir / 'attack.json'}")
    summary = run_patch(model_dir / "model.pt", str(model_dir / "clean.npz"), bundle,
                        true_trigger_file=model_dir / "attack.json", progress=not args.quiet,
                        say=lambda line: print("        " + line))
    scan = json.loads((bundle / "report" / "scan.json").read_text())
    region = PatchTrigger(4).region(28, 28)
    for rec in scan["recovered_triggers"]:
        mask = np.load(bundle / "report" / rec["mask_file"])
        print(f"        {mask[region].sum() / mask.sum():.0%} of the recovered trigger's mask lies on the "
              f"true 4x4 patch ({bundle / 'report' / rec['examples_image']})")
    correct = summary["flagged"] == [args.target]
    print(f"        the scan {'found' if correct else 'did NOT find exactly'} the planted backdoor "
          f"(target {args.target}, flagged {summary['flagged']})")

    from offline.data import load_dataset
    from offline.demo import serve_and_send

    # the patch job's test split: neither repair nor calibration saw these images
    _, test = load_dataset(str(model_dir / "clean.npz")).split(0.2, seed=0)
    trigger = PatchTrigger(4)
    keep = test.y != args.target
    print(f"[guard] serving the bundle and sending {len(test)} clean and {int(keep.sum())} triggered held-out "
          f"images through gRPC, one request each")
    traffic = serve_and_send(bundle, out, test.x, test.y, trigger.apply(test.x[keep]).astype(np.float32),
                             test.y[keep], args.target, say=lambda line: print("        " + line))
    summary["guard"] = traffic
    print(f"demo: patched model and guard thresholds in {bundle} (trojan-guard inspect {bundle}), forensic "
          f"report {bundle / 'report' / 'report.html'}, flagged inputs kept in {out / 'evidence'} "
          f"(trojan-guard evidence {out / 'evidence'})")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "scan":
            _cmd_scan(args)
        elif args.command == "train":
            summary = _cmd_train(args)
            print(json.dumps(summary, indent=2))
            print(f"model: {Path(args.out) / 'model.pt'}, clean held-out data: {Path(args.out) / 'clean.npz'}")
            if summary.get("missed"):
                print(f"warning: the {args.attack} attack on target {args.target} fell short of its bar: "
                      f"{'; '.join(summary['missed'])}. Whether it takes depends on the target and seed "
                      f"(docs/lab/coverage-matrix.md lists what the matrix's models reached); a stronger trigger "
                      f"(its --{args.attack}-* flags) or more epochs usually helps", file=sys.stderr)
        elif args.command == "patch":
            _cmd_patch(args)
        elif args.command == "fleet":
            _cmd_fleet(args)
        elif args.command == "mntd":
            _cmd_mntd_train(args)
        elif args.command == "report":
            _cmd_report(args)
        elif args.command == "audit":
            _cmd_audit(args)
        elif args.command == "demo":
            _cmd_demo(args)
        elif args.command == "sign":
            from offline.patch.job import sign_finished_bundle

            print(f"{args.bundle}: guard.json signed by key {sign_finished_bundle(args.bundle, args.signing_key)} "
                  f"(guard.json.sig)")
        elif args.command == "keygen":
            _cmd_keygen(args)
        elif args.command == "poison-rate":
            _cmd_poison_rate(args)
    except ForensicsError as exc:
        print(f"trojan-forensics: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("trojan-forensics: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
