"""The sidecar stays small: nothing on the serving path imports torch or offline."""

from __future__ import annotations

import subprocess
import sys


def test_guard_modules_do_not_import_torch_or_offline() -> None:
    code = (
        "import sys, pkgutil, importlib, guard\n"
        "for m in pkgutil.walk_packages(guard.__path__, 'guard.'): importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'offline'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
