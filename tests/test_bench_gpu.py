"""bench/gpu.sh's two sides run on CPU at a tiny shape: the GPU bench can only be run where a GPU is
lent, so this keeps its code (which calls the training loss's chunk helpers) from rotting between
such runs, and checks the cross-check it reports: every implementation's first-step loss agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_shapes import SHAPES, step_flops

ROOT = Path(__file__).resolve().parents[1]


def _case(*args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", *args, "--shape", "tiny", "--batch", "2", "--seq", "128", "--steps", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gpu_bench_sides_run_and_agree_on_cpu():
    xla = _case("bench.gpu_step", "--attention", "xla")
    chunked = _case("bench.gpu_step", "--attention", "chunked", "--remat", "full")
    cudnn = _case("bench.gpu_step", "--attention", "cudnn")
    peft = _case("bench.gpu_peft")
    assert chunked["remat"] == "full" and xla["remat"] in ("dots", "full")
    assert abs(xla["loss0"] - chunked["loss0"]) < 1e-4, (xla, chunked)
    assert "NVIDIA GPU" in cudnn["refused"]
    assert peft["tokens_per_s"] > 0 and abs(peft["loss0"] - xla["loss0"]) < 0.5  # other weights, same scale


def test_step_flops_matches_the_formula_by_hand():
    c = type("C", (), SHAPES["8b"])()
    D, F, L, V, q, kv, T = 4096, 14336, 32, 128256, 4096, 1024, 4096
    lin = 2 * (D * q + 2 * D * kv + q * D + 3 * D * F)
    att = 2 * 2 * q * (T + 1) / 2
    assert step_flops(c, 1, T) == T * (L * lin + L * att + 2 * D * V + L * lin + 2 * L * att + 2 * D * V)
