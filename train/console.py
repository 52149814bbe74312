"""The console scripts' first steps, taken before the heavy imports (jax, flax, orbax: 1-2 s)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

_SIGNALS = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}


def run(load_main: Callable[[], Callable[[], int]]) -> None:
    """Restart with huge pages (train/hugepages.py), import and run `main` (`load_main` imports it),
    exit with its code. Ctrl-C or SIGTERM while the modules import is one error line, not a
    traceback: the signals are held until the imports are done (a KeyboardInterrupt inside a C
    extension's initialisation comes out as a printed traceback and an ImportError), then honoured.
    `run_command`, inside `main`, handles every later one."""
    from train.hugepages import restart_with_huge_pages

    restart_with_huge_pages()
    signal.pthread_sigmask(signal.SIG_BLOCK, set(_SIGNALS))
    try:
        main = load_main()
    finally:
        for sig in signal.sigpending() & set(_SIGNALS):
            _stop(*_SIGNALS[sig])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(_SIGNALS))
    try:
        code = main()
    except KeyboardInterrupt:  # before `run_command` took over (flags, the compile cache)
        _stop(*_SIGNALS[signal.SIGINT])
    from jaxvocab.errors import exit_process

    exit_process(code)


def _stop(code: int, what: str) -> None:
    """errors.exit_process's ending, without importing jaxvocab: the signal may have come before it was."""
    print(f"error: {what}; nothing was done", file=sys.stderr)
    sys.stderr.flush()
    os._exit(code)  # a half-imported jax cannot be trusted to tear down
