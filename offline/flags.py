"""Command-line flags written once: in the settings dataclasses, as their fields' metadata.

A settings field that is also a flag is declared with :func:`option`::

    frr: float = option(0.01, "the share of clean traffic the guard may refuse", type=fraction)

:func:`add_flags` turns every such field of a dataclass into an argparse flag (``--frr``; ``flag=`` names
another), with the field's default and ``(default: ...)`` appended to the help from that same default, and
:func:`settings_from` builds the dataclass back from the parsed arguments. Fields without ``option`` are knobs
for Python callers and benches only. argparse and the standard library only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

# a field's metadata key: its Flag
KEY = "flag"


@dataclass(frozen=True)
class Flag:
    """How a field is offered on the command line: its help, and what argparse needs beyond the default."""

    help: str
    flag: str | None = None  # default: --field-name
    type: Callable[[str], Any] | None = None  # default: the default's type
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    default_text: str | None = None  # how --help shows a default that is computed (None: "the paper's rule")
    aliases: tuple[str, ...] = ()


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field that is also a flag; ``kwargs`` as :class:`Flag` takes them. Tuples and other
    immutable defaults only (a list would be shared)."""
    return field(default=default, metadata={KEY: Flag(help, **kwargs)})


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _metavar(f: Field) -> str:
    """N for whole numbers, X for real ones, else the field's name (annotations are strings here)."""
    annotation = str(f.type)
    return "N" if annotation.startswith("int") else "X" if annotation.startswith("float") else f.name.upper()


def dest(cls: type, name: str) -> str:
    return f"{cls.__name__}.{name}"


def add_flags(group: Any, cls: type, only: tuple[str, ...] | None = None, prefix: str = "") -> None:
    """Add a flag for every :func:`option` field of the dataclass ``cls`` (or those named in ``only``) to
    ``group`` (a parser or an argument group); ``prefix`` goes before each field's name (``--wanet-k``)."""
    for f in fields(cls):
        spec: Flag | None = f.metadata.get(KEY)
        if spec is None or (only is not None and f.name not in only):
            continue
        default = _default(f)
        names = [spec.flag or f"--{prefix}{f.name.replace('_', '-')}", *spec.aliases]
        shown = spec.default_text if spec.default_text is not None else _shown(default)
        text = f"{spec.help} (default: {shown})".replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(*names, dest=dest(cls, f.name), action=argparse.BooleanOptionalAction,
                               default=default, help=text)
            continue
        kind = spec.type or (type(default) if default is not None else str)
        group.add_argument(*names, dest=dest(cls, f.name), type=kind, default=default, choices=spec.choices,
                           metavar=spec.metavar or (None if spec.choices else _metavar(f)), help=text)


def settings_from(args: argparse.Namespace, cls: type, **given: Any) -> Any:
    """``cls`` from the flags :func:`add_flags` added (fields it did not add keep their defaults)."""
    values = {f.name: getattr(args, dest(cls, f.name)) for f in fields(cls) if hasattr(args, dest(cls, f.name))}
    return cls(**{**values, **given})


def positive(kind: type) -> Callable[[str], Any]:
    """A flag's type: a number > 0 of ``kind``."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A share strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def share(text: str) -> float:
    """A share in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value
