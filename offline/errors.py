"""Errors a user can act on.

Every problem with the user's input (a missing model, data of the wrong shape,
an unknown layer) is raised as a :class:`ForensicsError` deep inside the code
and turned into a one-line message with a non-zero exit code by the CLI. The
message says what is wrong and how to fix it; no traceback is shown.
"""

from __future__ import annotations


class ForensicsError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ModelLoadError(ForensicsError):
    """The model file is missing, corrupt or of an unsupported kind."""


class DataError(ForensicsError):
    """The data set is missing, malformed or incompatible with the model."""
