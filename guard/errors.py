"""Errors of the guard's data plane, each carrying the gRPC status it maps to.

Raised deep inside (decoding, screening, backends, reload) and translated once,
at the gRPC edge (``guard.transport.server``), or into a command's exit status
(:func:`exit_status`). ``reason`` is a short, bounded label for the
``trojan_guard_request_errors_total`` metric; the message is for the caller.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class GuardError(Exception):
    """A request or operation the guard cannot complete."""

    code = "INTERNAL"  # name of a grpc.StatusCode
    reason = "internal"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidInput(GuardError):
    """The request does not match the bundle's input spec (name, datatype, shape, bytes, values)."""

    code = "INVALID_ARGUMENT"
    reason = "invalid_input"


class ModelNotFound(GuardError):
    code = "NOT_FOUND"
    reason = "model_not_found"


class TooLarge(GuardError):
    """More inputs or bytes in one request than the guard accepts."""

    code = "RESOURCE_EXHAUSTED"
    reason = "too_large"


class NotReady(GuardError):
    code = "UNAVAILABLE"
    reason = "not_ready"


class ScreeningFailed(GuardError):
    """The screens could not run and the guard fails closed."""

    code = "UNAVAILABLE"
    reason = "screening_failed"


class UpstreamError(GuardError):
    """The upstream model server failed; ``code`` is the status it answered with (or UNAVAILABLE)."""

    reason = "upstream"

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code


class ReloadFailed(GuardError):
    """A new bundle failed verification or warm-up; the old one keeps serving."""

    code = "FAILED_PRECONDITION"
    reason = "reload_failed"


class Unauthenticated(GuardError):
    """An admin call without the bearer token of ``--admin-token-file``."""

    code = "UNAUTHENTICATED"
    reason = "unauthenticated"


class Overloaded(GuardError):
    """More inputs waiting than ``--max-queue``: the request is shed at once instead of queued."""

    code = "RESOURCE_EXHAUSTED"
    reason = "overloaded"


class UntrustedBundle(GuardError):
    """A bundle without a valid signature by a trusted key, or older than the one serving."""

    code = "FAILED_PRECONDITION"
    reason = "untrusted_bundle"


class BundleError(Exception):
    """A bundle that cannot be used, with the file and the reason (raised by guard.bundle and guard.signing;
    the serving path turns it into ReloadFailed or UntrustedBundle)."""


def exit_status(run: Callable[[], int | None], prog: str = "trojan-guard") -> int:
    """``run()``'s status (0 for None) for a command line: a bundle, guard or OS error is one line on stderr and
    status 2."""
    try:
        return run() or 0
    except (BundleError, GuardError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
