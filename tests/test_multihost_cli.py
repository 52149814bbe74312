"""jaxvocab-train as a 2-process job (4 CPU devices each, gloo), driven through the CLI like a pod.

The model is a tiny HF checkpoint expanded by `jaxvocab-convert import --add-tokens` (its two new
rows are what `--trainable new` trains); one tokenized store feeds every run. The 2-process run
killed with -9 on process 1 after step 3 must stop process 0 too, with one error line, within
--distributed-timeout + 10 s; `--resume` must then end with rows bit-identical to an uninterrupted
2-process run and within 1e-6 (of the table's scale) of one process driving the same 8 devices
(from scratch, or resuming the killed job's checkpoint); every other exported tensor is untouched
and bit-identical. Each process reads only its half of every global batch from the store (counted
in bytes). A rows + LoRA job matches one process too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxvocab
from tests.builders import make_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=str(ROOT))
    return env


def _cmd(model, store, out, *extra):
    return [
        sys.executable,
        "-m",
        "train",
        "--model",
        str(model),
        "--data",
        str(store),
        "--out",
        str(out),
        "--trainable",
        "new",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--seq-len",
        "64",
        "--lr",
        "1e-2",
        "--warmup",
        "2",
        "--dtype",
        "float32",
        "--save-every",
        "1",
        "--quiet",
        "--export-hf",
        str(out) + "-hf",
        *map(str, extra),
    ]


def _start_job(model, store, out, *extra, only_1=()):
    """Two processes; the coordinator comes from the environment for one and from flags for the other."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(4)
        if i == 0:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
            flags = ["--distributed"]
        else:
            flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1", *only_1]
        procs.append(
            subprocess.Popen(
                _cmd(model, store, out, *extra, *flags, "--distributed-timeout", TIMEOUT),
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
    return outs


def _tensors(hf_dir: Path) -> dict:
    return load_file(hf_dir / "model.safetensors")


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    """A tiny HF model with a GPT-2-style tokenizer, expanded by `jaxvocab-convert import --add-tokens`
    (two appended rows, padded for the mesh), its HF export (the untrained reference) and one store."""
    from convert.__main__ import main as convert_main
    from tests._tok_util import build_gpt2_style
    from train.__main__ import main

    d = tmp_path_factory.mktemp("mh")
    src = d / "src"
    build_gpt2_style(str(src))
    n = jaxvocab.load_tokenizer(src).n_words
    make_hf_checkpoint(src, vocab=n, tied=False, seed=6, max_pos=128)
    model, base_hf = d / "model", d / "model-hf"
    assert (
        convert_main(["import", str(src), str(model), "--add-tokens", "<tool>,<think>", "--pad-to-multiple-of", "64"])
        == 0
    )
    assert convert_main(["export", str(model), str(base_hf)]) == 0
    ids = [n, n + 1]  # the appended rows: what `--trainable new` trains
    rs = np.random.RandomState(0)
    with (d / "train.jsonl").open("w") as f:
        for _ in range(300):
            toks = rs.randint(0, n, rs.randint(10, 150))
            toks[1::3] = rs.choice(ids, len(toks[1::3]))
            f.write(json.dumps({"input_ids": toks.tolist()}) + "\n")
    assert main(["tokenize", "--model", model, "--data", d / "train.jsonl", "--out", d / "store"]) == 0
    return {"src": src, "model": model, "base": base_hf, "store": d / "store", "ids": ids}


@pytest.mark.slow
def test_two_processes_kill_9_resume_and_one_process(job_inputs, tmp_path):
    model, store, ids = job_inputs["model"], job_inputs["store"], job_inputs["ids"]
    ref = tmp_path / "ref2"
    _finish(_start_job(model, store, ref))
    reads = [json.loads((ref / "data_read" / f"process-{i}.json").read_text()) for i in range(2)]
    total = sum(r["bytes"] for r in reads)
    for r in reads:  # each process read its half of the rows: ~half the bytes, never the whole store
        assert 0.35 < r["bytes"] / total < 0.65 and r["bytes"] < r["store_bytes"], reads
    print(
        f"\nbytes read per process: {[r['bytes'] for r in reads]} of a {reads[0]['store_bytes']}-byte store; "
        f"pieces: {[r['pieces'] for r in reads]}"
    )

    # kill -9 process 1 after step 3: process 0 must stop too, quickly, with one error line
    out = tmp_path / "killed"
    procs = _start_job(model, store, out)
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert all(p.poll() is None for p in procs), "the job ended before step 3"
    os.kill(procs[1].pid, signal.SIGKILL)
    killed_at = time.time()
    _, err0 = procs[0].communicate(timeout=TIMEOUT + 60)
    took = time.time() - killed_at
    procs[1].wait()
    assert procs[0].returncode != 0 and took <= TIMEOUT + 10, (took, err0[-2000:])
    errors = [line for line in err0.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and ("process 1" in errors[0] or "peer process" in errors[0]), err0[-2000:]
    assert not (out / "final").exists() and not Path(str(out) + "-hf").exists()
    print(f"process 0 stopped {took:.1f} s after kill -9 of process 1: {errors[0]}")

    other = tmp_path / "killed-then-1-process"
    shutil.copytree(out, other)
    assert sorted(os.listdir(other / "checkpoints"))  # there is a checkpoint to resume from
    _finish(_start_job(model, store, out, "--resume"))
    one = tmp_path / "one"
    for run_dir, extra in ((one, ()), (other, ("--resume",))):  # 1 process on the same 8 devices
        single = subprocess.run(
            _cmd(model, store, run_dir, *extra), env=_env(8), cwd=ROOT, capture_output=True, text=True
        )
        assert single.returncode == 0, single.stderr[-3000:]

    base = _tensors(job_inputs["base"])  # the expanded model before training, as exported
    a, b, c = (_tensors(Path(str(p) + "-hf")) for p in (ref, out, one))
    d = _tensors(Path(str(other) + "-hf"))  # resumed with another process count
    assert set(a) == set(b) == set(c) == set(base)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert np.array_equal(a[name], b[name]), name  # bit-identical after kill -9
        # Relative to the table's scale: the reduction-order noise is absolute (~1e-7 here), and the new
        # rows start at the mean, ~15x smaller than a trained row, so a per-row ratio would measure
        # their size rather than the difference (it is printed too).
        scale = np.abs(c[name]).max()
        rel = np.abs(a[name][ids] - c[name][ids]).max() / scale
        assert rel <= 1e-6, (name, rel)  # 2 processes vs 1
        rel_resumed = np.abs(a[name][ids] - d[name][ids]).max() / scale
        assert rel_resumed <= 1e-6, (name, rel_resumed)  # killed on 2, resumed on 1
        per_row = np.abs(a[name][ids] - c[name][ids]).max() / np.abs(c[name][ids]).max()
        print(f"{name}: killed on 2 processes, resumed on 1: max difference / table scale {rel_resumed:.2e}")
        print(f"{name}: 2 processes vs 1: max difference / table scale {rel:.2e} (/ the rows' own scale {per_row:.2e})")
        assert not np.array_equal(a[name][ids], base[name][ids])  # the rows did train
        keep = np.setdiff1d(np.arange(len(base[name])), ids)
        assert np.array_equal(a[name][keep], base[name][keep]) and np.array_equal(c[name][keep], base[name][keep])
    for name in set(base) - {"model.embed_tokens.weight", "lm_head.weight"}:
        assert np.array_equal(a[name], base[name]) and np.array_equal(b[name], base[name]), name
        assert np.array_equal(c[name], base[name]), name
    ra, rb = ((json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()) for p in (ref, out))
    assert [(r["step"], r["loss"]) for r in ra] == [(r["step"], r["loss"]) for r in rb]


@pytest.mark.slow
def test_a_failing_or_hung_process_stops_the_job(job_inputs, tmp_path):
    """A process that fails says why on every host; one that hangs is caught by the watchdog."""
    model, store = job_inputs["model"], job_inputs["store"]
    procs = _start_job(model, store, tmp_path / "a", only_1=["--eval", str(tmp_path / "missing-on-host-1.jsonl")])
    outs = [p.communicate(timeout=TIMEOUT + 120)[1] for p in procs]
    assert all(p.returncode == 1 for p in procs), outs
    for err in outs:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "missing-on-host-1.jsonl: no such file" in errors[0], err[-2000:]

    out = tmp_path / "hung"
    procs = _start_job(model, store, out)
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.01)
    os.kill(procs[1].pid, signal.SIGSTOP)  # alive but silent: no socket closes, only the watchdog notices
    stopped_at = time.time()
    try:
        _, err0 = procs[0].communicate(timeout=TIMEOUT + 60)
    finally:
        procs[1].kill()
        procs[1].wait()
    took = time.time() - stopped_at
    errors = [line for line in err0.splitlines() if line.startswith("error: ")]
    assert procs[0].returncode == 1 and took <= TIMEOUT + 10, (took, err0[-2000:])
    assert len(errors) == 1 and "process 1 gave no sign of life" in errors[0], err0[-2000:]


@pytest.mark.slow
def test_convert_import_and_export_from_two_processes(job_inputs, tmp_path):
    """jaxvocab-convert in a 2-process job: orbax multi-host save, then tensor-by-tensor gathered export."""
    model = job_inputs["src"]
    for sub, src, dst in (("import", model, tmp_path / "ckpt"), ("export", tmp_path / "ckpt", tmp_path / "hf")):
        port = _free_port()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "convert",
                    sub,
                    str(src),
                    str(dst),
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    "2",
                    "--process-id",
                    str(i),
                    "--distributed-timeout",
                    str(TIMEOUT),
                ],
                env=_env(4),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = _finish(procs, timeout=200)
        assert [o.count("wrote") for o, _ in outs] == [1, 0]  # process 0 alone reports
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    got, want = _tensors(tmp_path / "hf"), load_file(model / "model.safetensors")
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_two_processes_with_lora_match_one_process(job_inputs, tmp_path):
    """Rows + LoRA adapters as a 2-process job: merged export and PEFT adapter match one process."""
    model, store = job_inputs["model"], job_inputs["store"]
    lora = ("--lora-rank", "4", "--lora-targets", "q,v,down", "--steps", "3", "--save-every", "0")
    two, one = tmp_path / "two", tmp_path / "one"
    _finish(_start_job(model, store, two, *lora, "--export-peft", str(two) + "-peft"))
    single = subprocess.run(
        _cmd(model, store, one, *lora, "--export-peft", str(one) + "-peft"),
        env=_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    base = _tensors(job_inputs["base"])
    for a, b in (
        (_tensors(Path(str(two) + "-hf")), _tensors(Path(str(one) + "-hf"))),
        (
            load_file(Path(str(two) + "-peft") / "adapter_model.safetensors"),
            load_file(Path(str(one) + "-peft") / "adapter_model.safetensors"),
        ),
    ):
        assert set(a) == set(b)
        for name in a:
            # Adam turns reduction-order noise into lr-sized steps where a gradient is ~0 (a fresh lora_A
            # sees dA ~ 0 while B is still ~0): allow 1e-4 of the tensor's scale, or 1% of the most any
            # element can move in 3 steps at the default lr 1e-3.
            tol = max(1e-4 * np.abs(b[name]).max(), 0.01 * 3 * 1e-3)
            assert np.abs(a[name] - b[name]).max() <= tol, name
    merged = _tensors(Path(str(two) + "-hf"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not np.array_equal(merged[name], base[name]), name  # the adapters trained and were merged
    assert np.array_equal(
        merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"]
    )  # not a target: untouched
