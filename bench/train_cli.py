"""`jaxvocab-train` itself, default flags, against PEFT TrainableTokens: 135M / B=4 / T=256 f32, CPU.

    python bench/train_cli.py                       # 3 interleaved rounds
    python bench/train_cli.py --keep-dir /tmp/b135m --remat none --attention xla

The CLI's per-step time is the wall-clock difference of a 10-step and a 2-step run divided by 8,
so loading, compiling and writing the final checkpoint cancel. PEFT's is bench/train.py's timed
loop (steady-state steps after two warm-ups). Peak RSS: both processes' VmHWM (the kernel's
high-water mark, polled until the CLI exits: sampling RSS misses short peaks). Same random
SmolLM-135M-shaped f32 checkpoint (bench/train.py writes it), same kind of batches: random ids, 16
new rows at 5% of positions, pre-tokenized documents of exactly T tokens (one packed row each: T
inputs, T - 1 targets, as PEFT's labels=input_ids; T + 1 would spill a 2-token piece into every
other row). On a shared machine compare the ratio of interleaved rounds, not absolute figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import fmt_bytes, machine, markdown_table, measure, save, wait_peak_rss  # noqa: E402
from train_shape import write_docs  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_train", BENCH / "train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)
NEW, BATCH, SEQ = bench_train.NEW, bench_train.BATCH, bench_train.SEQ


def run_cli(model: Path, data: Path, steps: int, extra: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS as VmHWM) of one jaxvocab-train run."""
    out = Path(tempfile.mkdtemp(prefix="jaxvocab-cli-"))
    argv = [
        sys.executable,
        "-m",
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out / "run"),
        "--trainable",
        "ids:" + ",".join(map(str, NEW)),
        "--batch-size",
        str(BATCH),
        "--seq-len",
        str(SEQ),
        "--dtype",
        "float32",
        "--steps",
        str(steps),
        "--lr",
        "1e-3",
        "--schedule",
        "constant",
        "--quiet",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = wait_peak_rss(proc)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"jaxvocab-train failed: {err[-2000:]}")
    return wall, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep-dir", type=Path, help="checkpoint dir (written once, reused)")
    ap.add_argument("--no-peft", action="store_true")
    args, extra = ap.parse_known_args(argv)
    path = args.keep_dir or Path(tempfile.mkdtemp(prefix="jaxvocab-bench-cli-"))
    env = {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    try:
        if not (path / "config.json").is_file():
            bench_train.write_checkpoint(path)
        data = path / "cli_data.jsonl"
        write_docs(data, 200)
        cli, peft = [], []
        for _ in range(args.repeats):
            w10, rss10 = run_cli(path, data, 10, extra)
            w2, _ = run_cli(path, data, 2, extra)
            cli.append(((w10 - w2) / 8, rss10))
            print(
                f"  cli: {cli[-1][0]:.2f} s/step ({w10:.1f} s - {w2:.1f} s), peak {fmt_bytes(rss10)}", file=sys.stderr
            )
            if not args.no_peft:
                r = measure(*bench_train.peft_child(path, 8), env=env)
                peft.append((r["timed_s"] / r["steps"], r["peak_rss"]))
                print(f"  peft: {peft[-1][0]:.2f} s/step, peak {fmt_bytes(r['peak_rss'])}", file=sys.stderr)
    finally:
        if args.keep_dir is None:
            shutil.rmtree(path, ignore_errors=True)
    tokens = BATCH * SEQ
    rows = [
        [
            "jaxvocab-train " + (" ".join(extra) or "(default flags)"),
            f"**{tokens / statistics.median(s for s, _ in cli):.0f}**",
            " / ".join(f"{tokens / s:.0f}" for s, _ in cli),
            fmt_bytes(max(r for _, r in cli)),
        ]
    ]
    if peft:
        rows.append(
            [
                "PEFT TrainableTokens + torch AdamW",
                f"**{tokens / statistics.median(s for s, _ in peft):.0f}**",
                " / ".join(f"{tokens / s:.0f}" for s, _ in peft),
                fmt_bytes(max(r for _, r in peft)),
            ]
        )
    text = f"CLI vs PEFT, 135M shapes, f32, B={BATCH} x T={SEQ} ({machine()}, {args.repeats} interleaved rounds)\n\n"
    text += markdown_table(["", "tokens/s (median)", "per round", "peak RSS"], rows)
    if peft:
        ratio = statistics.median(s for s, _ in peft) / statistics.median(s for s, _ in cli)
        text += (
            f"\n\n{ratio:.2f}x PEFT's tokens/s (target >= 1.0x), peak RSS "
            f"{max(r for _, r in cli) / max(r for _, r in peft):.2f}x PEFT's (target <= 0.5x)"
        )
    print(text)
    save("train_cli.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
