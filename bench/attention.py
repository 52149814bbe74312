"""Attention side by side: compiled memory against T, and CPU wall time, `xla` vs `chunked`.

    python bench/attention.py                 # all of it (~10 min on 2 CPU cores)
    python bench/attention.py --lengths 1024,2048 --skip-time

Memory: `memory_analysis().temp_size_in_bytes` of the compiled program, nothing executed, for a
Llama-3.2-1B-shaped model (d 2048, 32 heads / 8 kv heads of 64, intermediate 8192; 2 layers,
vocab 1024, bf16, remat full, B = 1) at T = 1k..16k:
  - `grad`: jax.jit(jax.grad(f)), f = sum of the f32 logits, gradient over every parameter;
  - `rows step`: the step `jaxvocab-train` compiles (train.loop.Trainer: 16 trainable rows, AdamW,
    chunked loss, one packed row).
Every compile runs in its own fresh process (XLA's CPU compiler keeps memory between compiles).
xla stops at the first length that fails to compile or exceeds --xla-max.
Time: one jit(grad) step at T = 1k, 2k, 4k for a SmolLM-135M-shaped model (d 576, 9 / 3 heads of 64;
2 layers, vocab 1024, f32, B = 1), median of 3 runs after a warm-up, per implementation.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_bytes, machine, markdown_table, measure, save

LLAMA_1B = {
    "vocab_size": 1024,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
}
SMOL = {
    "vocab_size": 1024,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 2,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}

_MODEL = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxvocab import Llama, LlamaConfig
cfg = LlamaConfig(**{shape!r})
"""

_GRAD = (
    _MODEL
    + """
model = nnx.eval_shape(lambda: Llama(cfg, dtype=jnp.{dtype}, attention={attention!r}, remat={remat!r}))
graph, state = nnx.split(model)
def f(state, ids):
    return nnx.merge(graph, state)(ids).sum()
grad = jax.jit(jax.grad(f))
ids = jax.ShapeDtypeStruct((1, {T}), jnp.int32)
"""
)

_GRAD_MEM = """
bench_extra = {"temp": grad.lower(state, ids).compile().memory_analysis().temp_size_in_bytes}
"""

_ROWS = (
    _MODEL
    + """
import sys
sys.path.insert(0, {root!r})  # the `train` package, not bench/train.py (bench/ comes first on the path)
from jaxvocab import rows
from jaxvocab.sharding import parse_mesh
from train.data import Batch
from train.loop import TrainConfig, Trainer
model = Llama(cfg, dtype=jnp.bfloat16, attention={attention!r}, rngs=nnx.Rngs(0))
mesh = parse_mesh(None)
rm = rows.split(model, list(range(1008, 1024)))
tc = TrainConfig(batch_size=1, seq_len={T}, remat="full")
tr = Trainer(rm, tc, mesh)
z = np.zeros((1, 1, {T}), np.int32)
batch = tr.put(Batch(z, z + 1, z, np.ones((1, 1, {T}), np.float32)))
"""
)

_ROWS_MEM = """
lowered = tr.lower(batch)
bench_extra = {"temp": lowered.compile().memory_analysis().temp_size_in_bytes}
"""

_TIME_SETUP = (
    _MODEL
    + """
import time
model = Llama(cfg, dtype=jnp.float32, attention={attention!r}, remat="none", rngs=nnx.Rngs(0))
graph, state = nnx.split(model)
grad = jax.jit(jax.grad(lambda s, ids: nnx.merge(graph, s)(ids).sum()))
ids = jnp.asarray(np.random.RandomState(0).randint(0, 1024, (1, {T})), jnp.int32)
jax.block_until_ready(grad(state, ids))
"""
)

_TIME_BODY = """
times = []
for _ in range(3):
    t = time.perf_counter()
    jax.block_until_ready(grad(state, ids))
    times.append(time.perf_counter() - t)
bench_extra = {"step_s": sorted(times)[1]}
"""

ROOT = Path(__file__).resolve().parent.parent


def temp_bytes(setup: str, body: str) -> int | None:
    try:
        return measure(setup, body, env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}, timeout=1800)["temp"]
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # a compile that fails or runs out of memory
        print(f"  failed: {str(e).splitlines()[-1][:200] if str(e) else type(e).__name__}", flush=True)
        return None


def memory_rows(lengths, xla_max: int, rows_step: bool) -> list[list]:
    out = []
    for T in lengths:
        row = [f"{T // 1024}k"]
        for attention in ("xla", "chunked"):
            for kind in ("grad", "rows") if rows_step else ("grad",):
                if attention == "xla" and T > xla_max:
                    row.append(None)
                    continue
                print(f"T={T} {attention} {kind}", flush=True)
                if kind == "grad":
                    setup = _GRAD.format(shape=LLAMA_1B, dtype="bfloat16", attention=attention, remat="full", T=T)
                    row.append(temp_bytes(setup, _GRAD_MEM))
                else:
                    setup = _ROWS.format(shape=LLAMA_1B, attention=attention, T=T, root=str(ROOT))
                    row.append(temp_bytes(setup, _ROWS_MEM))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--xla-max", type=int, default=8192, help="longest T to compile xla at (16k needs ~60 GB)")
    ap.add_argument("--skip-rows", action="store_true", help="only jit(grad), not the rows step")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--time-lengths", default="1024,2048,4096", help="T for the CPU wall-time rows")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    mem = memory_rows(lengths, args.xla_max, not args.skip_rows)
    cols = (
        ["xla grad", "xla rows step", "chunked grad", "chunked rows step"]
        if not args.skip_rows
        else ["xla grad", "chunked grad"]
    )
    lines = [
        (f"Compiled temp memory, Llama-3.2-1B shapes, 2 layers, vocab 1024, bf16, remat full, B=1 ({machine()})"),
        "",
        markdown_table(["T", *cols], [[r[0]] + [fmt_bytes(x) if x else "-" for x in r[1:]] for r in mem]),
    ]
    chunked_col = 1 + cols.index("chunked grad")
    by_t = {int(r[0][:-1]) * 1024: r for r in mem}
    if 2048 in by_t and 16384 in by_t and by_t[2048][chunked_col] and by_t[16384][chunked_col]:
        lines.append(
            f"\nchunked grad growth 2k -> 16k: {by_t[16384][chunked_col] / by_t[2048][chunked_col]:.2f}x "
            f"(target <= 8.8x), at 16k {fmt_bytes(by_t[16384][chunked_col])} (target < 3 GB)"
        )
    if not args.skip_time:
        lines.append("\nCPU jit(grad) step, SmolLM-135M shapes, 2 layers, f32, B=1 (median of 3 after a warm-up):\n")
        rows = []
        for T in (int(x) for x in args.time_lengths.split(",")):
            times = {}
            for attention in ("xla", "chunked"):
                print(f"time T={T} {attention}", flush=True)
                r = measure(
                    _TIME_SETUP.format(shape=SMOL, attention=attention, T=T),
                    _TIME_BODY,
                    env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
                )
                times[attention] = r["step_s"]
            rows.append(
                [T, f"{times['xla']:.2f}", f"{times['chunked']:.2f}", f"{times['chunked'] / times['xla']:.2f}x"]
            )
        lines.append(
            markdown_table(["T", "xla s/step", "chunked s/step", "chunked / xla (target <= 1.5x at 2k)"], rows)
        )
    text = "\n".join(lines)
    print(text)
    save("attention", text)


if __name__ == "__main__":
    main()
