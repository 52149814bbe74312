"""A persistent XLA compilation cache for the command-line tools, on by default.

A rows step of an 8B model compiles for minutes on a TPU or GPU, and every `--resume`, eval-only
run or re-import compiles the same programs again. JAX can keep compiled executables on disk
(`jax_compilation_cache_dir`); the CLIs point it at `$XDG_CACHE_HOME/jaxvocab/xla` (default
`~/.cache/jaxvocab/xla`), so a repeated command loads them instead. JAX keys each entry on the
program, the devices, the flags and the jax / jaxlib versions, so a stale entry is never used.

`JAXVOCAB_COMPILE_CACHE=DIR` moves it (a shared filesystem serves a whole pod), `=off` turns it off;
a cache dir set through JAX itself (`JAX_COMPILATION_CACHE_DIR`) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "JAXVOCAB_COMPILE_CACHE"
# Programs that compile faster are not worth a disk round trip. Loading a cached entry (tens of KB)
# takes ~5 ms: the vocabulary statistics of `import --add-tokens`, which compile in 0.05-0.3 s
# here, load in 0.005 s (JAX's own default, 1 s, would recompile them in every run).
MIN_COMPILE_SECONDS = 0.05


def cache_dir(environ=os.environ) -> Path | None:
    """Where the CLIs keep compiled programs, or None when turned off."""
    value = environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false") else Path(value).expanduser()
    return Path(environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "jaxvocab" / "xla"


def enable(environ=os.environ) -> Path | None:
    """Point JAX's persistent cache at `cache_dir()`; returns the dir in use (None: off, or the dir
    cannot be created, in which case the command runs uncached rather than failing)."""
    import jax

    if jax.config.jax_compilation_cache_dir:  # set by the user through JAX: theirs
        return Path(jax.config.jax_compilation_cache_dir)
    where = cache_dir(environ)
    if where is None:
        return None
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return where
