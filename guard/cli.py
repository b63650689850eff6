"""``trojan-guard``: the sidecar's command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from guard import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trojan-guard",
        description="Runtime guard against backdoored image classifiers: screens inference requests "
                    "with STRIP entropy and the Neural Cleanse activation filter, using a guard bundle "
                    "written by 'trojan-forensics patch'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = sub.add_parser("inspect", help="verify a guard bundle and print what it holds",
                             description="Validate guard.json against the schema, verify the SHA-256 of "
                                         "every file, check that onnxruntime loads the model with the "
                                         "declared input and outputs, and print a summary.")
    inspect.add_argument("bundle", help="bundle directory")
    inspect.add_argument("--json", action="store_true", help="print guard.json instead of the summary")
    return parser


def _inspect(path: str, as_json: bool) -> None:
    from guard.backends import EmbeddedBackend
    from guard.bundle import BundleError, GuardBundle

    bundle = GuardBundle.load(path)
    m = bundle.manifest
    try:
        EmbeddedBackend(bundle.model_path, m.input.name, m.outputs.logits, m.outputs.features)
    except Exception as exc:  # onnxruntime raises several types for a bad graph
        raise BundleError(f"{bundle.model_path}: onnxruntime cannot serve it ({exc})") from exc
    print(m.model_dump_json(indent=2) if as_json else bundle.describe())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from guard.bundle import BundleError

    try:
        if args.command == "inspect":
            _inspect(args.bundle, args.json)
    except BundleError as exc:
        print(f"trojan-guard: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
