"""Progress bars on stderr, so long loads and writes show they are alive without polluting stdout.

The command-line tools draw them only on a terminal (`terminal_only`): in a log file a bar is a pile
of `\r` frames around the one `error:` line. Library callers keep them wherever stderr goes,
notebooks included (whose stderr is no terminal)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_terminal_only = False


def terminal_only() -> None:
    """From now on, draw bars only when stderr is a terminal (`errors.run_command` calls it)."""
    global _terminal_only
    _terminal_only = True


def progress(total=None, desc="", unit="it", unit_scale=False, disable=False):
    on_terminal = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=disable or (_terminal_only and not on_terminal),
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )
