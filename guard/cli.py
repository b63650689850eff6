"""``trojan-guard``: the sidecar's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from guard import __version__

# flag -> settings field; each flag defaults to None so TROJAN_GUARD_* variables and then the defaults apply
_SERVE_FLAGS: list[tuple[str, dict]] = [
    ("--bundle", dict(help="guard bundle directory (TROJAN_GUARD_BUNDLE)")),
    ("--host", dict(help="address to bind (default 0.0.0.0)")),
    ("--port", dict(type=int, help="gRPC port: Open Inference Protocol, health, reflection (default 8001)")),
    ("--admin-address", dict(help="listener of the admin service (Status, ReloadBundle): HOST:PORT or unix:PATH "
                                  "(made mode 0600), never the client port (default 127.0.0.1:8003; 'off' turns "
                                  "it off); off loopback it needs --admin-token-file")),
    ("--admin-token-file", dict(help="admin calls must carry 'authorization: Bearer TOKEN', TOKEN this file's "
                                     "content (at least 16 characters); required when --admin-address is not "
                                     "loopback or a unix socket")),
    ("--metrics-port", dict(type=int, help="Prometheus /metrics HTTP port, 0 turns it off (default 8002)")),
    ("--model-name", dict(help="model name clients use (default: the bundle's)")),
    ("--policy", dict(choices=("enforce", "flag", "shadow"),
                      help="flagged requests are refused with PERMISSION_DENIED (enforce), answered with the "
                           "verdict attached (flag), or answered and only counted (shadow); default: the "
                           "bundle's")),
    ("--fail-mode", dict(choices=("open", "closed"),
                         help="when the screens cannot run: answer unscreened (open) or refuse with UNAVAILABLE "
                              "(closed, default)")),
    ("--backend", dict(choices=("embedded", "upstream"),
                       help="embedded: onnxruntime runs the bundle's model in-process (default); upstream: "
                            "forward to a model server speaking the Open Inference Protocol")),
    ("--upstream", dict(help="HOST:PORT of the upstream model server (gRPC)")),
    ("--upstream-model", dict(help="model name on the upstream server (default: --model-name)")),
    ("--upstream-timeout-s", dict(type=float, help="deadline of each upstream call (default 10)")),
    ("--max-batch", dict(type=int, help="inputs screened together in one batch (default 8)")),
    ("--max-delay-ms", dict(type=float, help="extra wait for a batch to fill up (default 0: a batch takes the "
                                             "requests that queued while the model ran the previous one)")),
    ("--max-request-inputs", dict(type=int, help="inputs one request may carry (default 64); larger requests "
                                                 "get RESOURCE_EXHAUSTED")),
    ("--max-queue", dict(type=int, help="inputs that may wait to be screened (default 256); a request beyond it "
                                        "is shed at once with RESOURCE_EXHAUSTED, counted in "
                                        "trojan_guard_request_errors_total{reason=\"overloaded\"}")),
    ("--expose-scores", dict(action="store_const", const=True,
                             help="answers and refusals carry each detector's score and p-value, and clients "
                                  "may ask for the features and guard_scores outputs; for trusted deployments "
                                  "only, since scores let an attacker tune a trigger (default: clients get the "
                                  "verdict; scores go to metrics and evidence)")),
    ("--max-concurrent-rpcs", dict(type=int, help="calls the gRPC port handles at once; beyond it a call gets "
                                                  "RESOURCE_EXHAUSTED before its request is decoded (default: "
                                                  "--max-queue + --max-batch + --evidence-max-backlog + 16)")),
    ("--evidence-dir", dict(help="keep flagged inputs here (append-only, fsync-ed; default: off)")),
    ("--evidence-max-bytes", dict(type=int, help="evidence kept before the oldest segments go (default 1 GiB)")),
    ("--evidence-key-file", dict(help="HMAC-SHA256 key (at least 32 bytes, e.g. a mounted Secret; never on the "
                                      "evidence volume) chaining the evidence records, so 'trojan-guard evidence "
                                      "--key-file' detects rewritten, removed and reordered records")),
    ("--evidence-max-backlog", dict(type=int, help="flagged inputs that may wait to be written (default 64); "
                                                   "beyond it a record is dropped and counted in "
                                                   "trojan_guard_evidence_dropped_total")),
    ("--tls-cert", dict(help="PEM certificate chain: serve gRPC over TLS")),
    ("--tls-key", dict(help="PEM private key for --tls-cert")),
    ("--tls-client-ca", dict(help="PEM CA certificates: require client certificates signed by them (mTLS)")),
    ("--trusted-key", dict(action="append", help="Ed25519 public key (PEM, from 'trojan-forensics keygen') whose "
                                                 "signature a bundle must carry; repeat for key rotation")),
    ("--allow-rollback", dict(action="store_const", const=True, help="allow a reload to a bundle whose "
                                                                      "bundle_version is below the serving one's "
                                                                      "(refused by default)")),
    ("--min-bundle-version", dict(type=int, metavar="N",
                                  help="refuse a bundle whose bundle_version (signed in guard.json) is below N, at "
                                       "start (exit 2) and at reload (default 0)")),
    ("--watch-bundle-s", dict(type=float, help="check the bundle every this many seconds and reload when its "
                                               "guard.json changed, e.g. after a patch job rewrote it (default 0: "
                                               "off; SIGHUP and the admin RPC always reload)")),
    ("--grace-s", dict(type=float, help="shutdown waits this long for in-flight requests (default 10)")),
    ("--workers", dict(type=int, help="guard processes serving the gRPC port together (SO_REUSEPORT; the kernel "
                                      "spreads connections over them), each with its own model session and "
                                      "batcher; one supervisor serves /metrics (summed over the workers) and the "
                                      "admin service, reloads them one by one, restarts a worker that dies; "
                                      "evidence goes to --evidence-dir/worker-N (default 1: one process)")),
    ("--threads", dict(type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")),
    ("--providers", dict(help="onnxruntime execution providers in order of preference, comma-separated: cpu "
                              "(default), cuda (needs the onnxruntime-gpu wheel, extra 'gpu'), tensorrt, or a "
                              "full name such as CUDAExecutionProvider; the CPU stays the last fallback")),
    ("--spin", dict(choices=("on", "off"), help="onnxruntime's idle threads busy-wait for the next batch (on, "
                                                "default: lower latency and more throughput) or sleep (off: "
                                                "about half the CPU per request, for cores shared with the "
                                                "model server or other pods)")),
    ("--strip-rounds", dict(choices=("on", "off"),
                            help="sequential STRIP, where the bundle has it: the blends in rounds, stopping once "
                                 "the verdict is clear (on, default), or all of them in one model call (off: one "
                                 "round trip per batch to an upstream model server instead of several, more rows "
                                 "each; bench/bench_guard.py --peers measures both)")),
    ("--log-level", dict(choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trojan-guard",
        description="Runtime guard against backdoored image classifiers: screens inference requests "
                    "with STRIP, clean-feature densities and the Neural Cleanse activation filter, combined "
                    "into one verdict at one false-rejection budget, using a guard bundle written by "
                    "'trojan-forensics patch'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = sub.add_parser("inspect", help="verify a guard bundle and print what it holds",
                             description="Validate guard.json against the schema, verify the SHA-256 of "
                                         "every file, check that onnxruntime loads the model with the "
                                         "declared input and outputs, and print a summary.")
    inspect.add_argument("bundle", help="bundle directory")
    inspect.add_argument("--json", action="store_true", help="print guard.json instead of the summary")
    inspect.add_argument("--min-bundle-version", type=int, default=0, metavar="N",
                         help="exit 2 when the bundle's bundle_version is below N")
    inspect.add_argument("--trusted-key", action="append", default=[],
                         help="Ed25519 public key (PEM): also verify guard.json.sig against it (repeatable); a "
                              "missing or bad signature exits 2")

    serve = sub.add_parser(
        "serve", help="start the gRPC sidecar that screens every inference request",
        description="Serve the Open Inference Protocol (KServe v2 gRPC, as Triton does) and screen every "
                    "request with the bundle's detectors and its one calibrated verdict before answering. "
                    "Health (grpc.health.v1: '', liveness, readiness) and reflection share the gRPC port; "
                    "the admin service (trojan_guard.admin.v1.GuardAdmin: Status, ReloadBundle) has its own "
                    "listener (--admin-address, loopback by default); Prometheus metrics are on the metrics "
                    "port. SIGHUP reloads the bundle; SIGTERM drains "
                    "in-flight requests and stops. Every flag also reads TROJAN_GUARD_<FLAG> "
                    "(e.g. TROJAN_GUARD_PORT).")
    for flag, kwargs in _SERVE_FLAGS:
        serve.add_argument(flag, default=None, **kwargs)

    evidence = sub.add_parser("evidence", help="list or export the flagged inputs a guard kept",
                              description="Read an evidence directory written by 'serve --evidence-dir': "
                                          "one line per flagged input (time, sequence number, request id, "
                                          "scores, check), or export the intact tensors to an .npz for "
                                          "forensics. The records' chain is checked: a rewritten record, "
                                          "records removed from the middle or the start (other than by "
                                          "rotation) and reordered records are named, and the exit status "
                                          "is 1.")
    evidence.add_argument("dir", help="evidence directory")
    evidence.add_argument("--export", default=None, help="write x (N, ...), sha256, request_id to this .npz")
    evidence.add_argument("--json", action="store_true", help="one JSON object per record, without tensors")
    evidence.add_argument("--key-file", default=None,
                          help="the key the guard was given with --evidence-key-file: authenticate every record "
                               "(HMAC-SHA256 chain); without it records are only checksummed")
    return parser


def _inspect(path: str, as_json: bool, keys: list[str], min_version: int = 0) -> None:
    from guard.backends import EmbeddedBackend
    from guard.bundle import BundleError, GuardBundle, check_bundle_version
    from guard.signing import signer, trusted_keys

    bundle = GuardBundle.load(path, trusted_keys([Path(k) for k in keys]) if keys else None)
    check_bundle_version(bundle, min_version)
    m = bundle.manifest
    try:
        EmbeddedBackend(bundle.model_source, m.input.name, m.outputs.logits, m.outputs.features)
    except Exception as exc:  # onnxruntime raises several types for a bad graph
        raise BundleError(f"{bundle.model_path}: onnxruntime cannot serve it ({exc})") from exc
    if as_json:
        print(m.model_dump_json(indent=2))
        return
    print(bundle.describe())
    if bundle.signed is not None:
        print(f"signature   verified: guard.json signed by key {bundle.signed.key_id} ({bundle.signed.key_file})")
    else:
        kid = signer(bundle.root)
        print(f"signature   by key {kid}, not verified (give --trusted-key PUB)" if kid else
              "signature   none: the bundle is unsigned ('trojan-forensics sign BUNDLE --signing-key KEY' signs it)")


def _serve(args: argparse.Namespace) -> None:
    import asyncio

    from pydantic import ValidationError

    from guard.errors import GuardError
    from guard.settings import GuardSettings
    from guard.transport.server import serve

    given = {flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_"))
             for flag, _ in _SERVE_FLAGS}
    try:
        settings = GuardSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise GuardError(problems) from None  # exit 2, one line, like a bad bundle
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s trojan-guard %(levelname)s %(message)s")
    if settings.workers > 1:
        from guard.transport.workers import serve_workers

        asyncio.run(serve_workers(settings))
    else:
        asyncio.run(serve(settings))


def _evidence(directory: str, export: str | None, as_json: bool, key_file: str | None) -> int:
    import numpy as np

    from guard.evidence import audit_evidence, load_key

    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: evidence directory not found")
    audit = audit_evidence(directory, load_key(key_file) if key_file else None)
    records = audit.records
    for r in records:
        if as_json:
            print(json.dumps({k: v for k, v in r.items() if k != "x"}))
        else:
            dropped = f"  ({r['dropped_before']} dropped before it)" if r.get("dropped_before") else ""
            print(f"{r['time']}  {r.get('seq', '-'):>6}  {r.get('request_id') or '-':<20} "
                  f"{r.get('predicted', '?'):>6}  {','.join(r.get('detectors', [])):<18} "
                  f"p {r.get('p_value', float('nan')):.4f}  "
                  + "".join(f"{k} {v:.4g}  " for k, v in (r.get("scores") or {}).items())
                  + f"sha256 {r['sha256'][:16]}  "
                  + ("ok" if not r["problem"] else ("ALTERED: " if not r["intact"] else "CHAIN: ") + r["problem"])
                  + dropped)
    if export:
        kept = [r for r in records if r["intact"]]
        np.savez(export, x=np.stack([r["x"] for r in kept]) if kept else np.zeros((0,), np.float32),
                 sha256=np.array([r["sha256"] for r in kept]),
                 request_id=np.array([r.get("request_id", "") for r in kept]))
        print(f"{len(kept)} intact record(s) written to {export}", file=sys.stderr)
    if audit.keyed and not key_file:
        trust = ("records are HMAC-chained but not verified: give --key-file with the guard's "
                 "--evidence-key-file to authenticate them")
    elif key_file:
        trust = ("records authenticated: every HMAC verifies with the key" if audit.authenticated else
                 "records NOT authenticated with this key")
    else:
        trust = ("records are checksummed but not authenticated (the guard had no --evidence-key-file): "
                 "whoever can write the volume can rewrite them and their checksums")
    if audit.unchained:
        trust += f"; {audit.unchained} record(s) written before records were chained"
    for problem in audit.problems:
        print(f"trojan-guard: evidence: {problem}", file=sys.stderr)
    altered = audit.altered
    print(f"{len(records)} record(s)" + (f", {altered} ALTERED" if altered else "")
          + (f", {len(audit.problems)} problem(s)" if audit.problems else "") + f"; {trust}", file=sys.stderr)
    return 1 if audit.problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    from guard.errors import exit_status

    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return exit_status(lambda: _inspect(args.bundle, args.json, args.trusted_key, args.min_bundle_version))
    if args.command == "serve":
        return exit_status(lambda: _serve(args))
    return exit_status(lambda: _evidence(args.dir, args.export, args.json, args.key_file))


if __name__ == "__main__":
    sys.exit(main())
