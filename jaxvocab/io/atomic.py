"""All-or-nothing output dirs: write into a hidden sibling, rename into place at the very end.

A crash, Ctrl-C or validation error leaves no half-written directory behind and never touches an
existing one unless the user asked for `--overwrite`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from jaxvocab.errors import UsageError


def check_output(out: Path, overwrite: bool, flag: str = "OUT") -> None:
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: already exists; pass --overwrite to replace it or choose another {flag}")


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False):
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
