"""``trojan-guard``: the sidecar's command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from guard import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trojan-guard",
        description="gRPC sidecar that screens inference requests for backdoor triggers "
                    "(STRIP entropy and the Neural Cleanse activation filter). "
                    "Serving a guard bundle arrives with the patch job; today this "
                    "command reports its version.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print(f"trojan-guard {__version__}: no command yet; see trojan-guard --help")
    return 0


if __name__ == "__main__":
    sys.exit(main())
