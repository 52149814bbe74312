"""The CLIs restart themselves once with glibc's huge-page tunable (train/hugepages.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import hugepages

ROOT = Path(__file__).resolve().parents[1]


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


needs_thp = pytest.mark.skipif(
    not hugepages.wanted(_clean_env()), reason="not Linux + glibc >= 2.35 with THP in madvise mode"
)


def test_wanted_respects_opt_out_and_an_existing_tunable():
    assert not hugepages.wanted({hugepages.OPT_OUT: "0"})
    assert not hugepages.wanted({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}"})


def test_environment_keeps_the_users_tunables():
    env = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}", "X": "1"}
    assert hugepages.environment({})["GLIBC_TUNABLES"] == hugepages.TUNABLE


_PROBE = """
import os, sys
sys.argv = [{prog!r}, "--help"]
{run}
"""
_ENTRIES = {
    # `python -m convert` / `python -m train`: the guard at the top of __main__.py
    "python -m convert": "import runpy\ntry:\n    runpy.run_module('convert', run_name='__main__')\n",
    "python -m train": "import runpy\ntry:\n    runpy.run_module('train', run_name='__main__')\n",
    # the console scripts' targets (pyproject's [project.scripts])
    "jaxvocab-convert": "import convert\ntry:\n    convert.cli()\n",
    "jaxvocab-train": "import train\ntry:\n    train.cli()\n",
}


@needs_thp
@pytest.mark.parametrize("entry", sorted(_ENTRIES))
def test_entry_points_restart_with_the_tunable(entry):
    code = _PROBE.format(prog=entry, run=_ENTRIES[entry]) + (
        "except SystemExit:\n    print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''), os.getpid())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("TUNABLES=")]
    assert line and hugepages.TUNABLE in line[0], out.stdout[-500:] + out.stderr[-500:]
    assert "usage:" in out.stdout  # the command still ran, with its arguments


@needs_thp
def test_opt_out_runs_without_restarting():
    code = _PROBE.format(prog="jaxvocab-train", run=_ENTRIES["jaxvocab-train"]) + (
        "except SystemExit:\n    print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))\n"
    )
    env = _clean_env(**{hugepages.OPT_OUT: "0"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "TUNABLES=\n" in out.stdout + "\n" and hugepages.TUNABLE not in out.stdout
