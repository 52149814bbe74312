"""Multi-host: two JAX processes (4 CPU devices each, gloo collectives) share one 8-device mesh.

Each process must read only the slices its own devices hold (counted in bytes); the logits,
gathered to every process, and the rows after one fine-tuning step (train/loop.py, its batch split
over the two processes) must be those of the same work done by one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxvocab
from jaxvocab.io import hf
from jaxvocab.io.meta import shard_files
from jaxvocab.io.pth import read_pth
from tests.builders import random_ids, torch_logits
from tests.meta_writer import make_hf_model, write_meta
from tests.multihost_worker import TRAIN_IDS, train_one_step

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: Path, ids: Path, ckpts: list[Path], n: int = 2, train: bool = False) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker asks for 4 devices
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--port",
                str(port),
                "--process-id",
                str(i),
                "--num-processes",
                str(n),
                "--out",
                str(out),
                "--ids",
                str(ids),
                *(["--train"] if train else []),
                *map(str, ckpts),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-4000:]}"
    return [json.loads((out / f"report_p{i}.json").read_text()) for i in range(n)]


@pytest.mark.slow
def test_two_processes_read_their_share_and_match_one(tmp_path, mesh24):
    hf_dir, model = make_hf_model(tmp_path / "hf", vocab=256, dim=64, heads=4, kv_heads=2, factor=8, std=0.1)
    meta_dir = write_meta(model, tmp_path / "meta", mp=2)
    ids = random_ids(256, batch=2, length=520)
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "out"
    out.mkdir()
    reports = _run_workers(out, tmp_path / "ids.npy", [hf_dir, meta_dir], train=True)

    assert [r["process"] for r in reports] == [0, 1] and all(r["global_devices"] == 8 for r in reports)
    assert set(reports[0]["local_devices"]).isdisjoint(reports[1]["local_devices"])
    totals = {
        str(hf_dir): sum(i.nbytes for i in hf.tensor_index(hf_dir).values()),
        str(meta_dir): sum(t.nbytes for f in shard_files(meta_dir) for t in read_pth(f).values()),
    }
    for ckpt, total in totals.items():
        for r in reports:
            share = r["bytes_read"][ckpt] / total
            assert 0.4 < share < 0.6, (ckpt, r["process"], r["bytes_read"][ckpt], total)

    ref = torch_logits(model, ids)
    for i, ckpt in enumerate((hf_dir, meta_dir)):
        single = np.asarray(jaxvocab.load(ckpt, mesh=mesh24, show_progress=False)(ids))
        for p in (0, 1):
            multi = np.load(out / f"logits{i}_p{p}.npy")
            assert multi.shape == single.shape
            assert np.abs(multi - single).max() <= 1e-5
            assert np.abs(multi - ref).max() <= 1e-4

    model = jaxvocab.load(hf_dir, mesh=mesh24, show_progress=False)
    before = {k: np.asarray(v[...]) for k, v in (("rows.embed_rows", model.embed), ("rows.head_rows", model.lm_head))}
    single = train_one_step(model, mesh24)
    for p in (0, 1):
        multi = np.load(out / f"train_p{p}.npz")
        assert set(multi.files) == set(single)
        for k, v in single.items():
            assert multi[k].shape == v.shape, k
            np.testing.assert_allclose(multi[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    for k, table in before.items():  # the step did move the rows
        assert np.abs(single[k] - table[TRAIN_IDS]).max() > 1e-3
