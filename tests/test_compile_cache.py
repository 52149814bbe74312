"""The CLIs' persistent compilation cache (train/compile_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from train import compile_cache

ROOT = Path(__file__).resolve().parents[1]


def test_cache_dir_default_override_and_off(tmp_path):
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "jaxvocab" / "xla"
    assert compile_cache.cache_dir({}) == Path("~/.cache/jaxvocab/xla").expanduser()
    assert compile_cache.cache_dir({compile_cache.ENV: str(tmp_path / "cc")}) == tmp_path / "cc"
    for off in ("off", "0", "", "none", "OFF"):
        assert compile_cache.cache_dir({compile_cache.ENV: off}) is None


_COMPILE = """
import jax, jax.numpy as jnp
from train import compile_cache
print(compile_cache.enable())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this program compiles in ms
jax.jit(lambda x: jnp.linalg.svd(x @ x.T + jnp.sin(x))[0].sum())(jnp.ones((64, 64))).block_until_ready()
"""


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR")}
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


def test_a_second_process_loads_the_compiled_program(tmp_path):
    """Entries land in the dir, and a second process takes the program from there (JAX logs the hit)."""
    where = tmp_path / "cache"
    env = _env(**{compile_cache.ENV: str(where), "JAX_LOG_COMPILES": "1"})
    first = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.strip() == str(where)
    assert any(where.iterdir()), "no cache entry written"
    assert "Persistent compilation cache hit" not in first.stderr
    second = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, check=True)
    assert "Persistent compilation cache hit" in second.stderr, second.stderr[-2000:]


def test_the_clis_turn_it_on_and_off(tmp_path):
    """Both CLIs enable it (the dir is created) unless JAXVOCAB_COMPILE_CACHE=off."""
    for prog in ("convert", "train"):
        where = tmp_path / f"cache-{prog}"
        argv = [sys.executable, "-m", prog, "inspect", str(tmp_path / "missing")]
        if prog == "train":
            argv = [sys.executable, "-m", prog, "--model", str(tmp_path / "missing"), "--data", "x", "--out", "y"]
        subprocess.run(argv, env=_env(**{compile_cache.ENV: str(where)}), capture_output=True, cwd=tmp_path)
        assert where.is_dir(), prog
        off = tmp_path / f"off-{prog}"
        env = _env(**{compile_cache.ENV: "off", "XDG_CACHE_HOME": str(off)})
        subprocess.run(argv, env=env, capture_output=True, cwd=tmp_path)
        assert not off.exists(), prog
