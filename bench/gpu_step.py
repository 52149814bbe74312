"""One rows-training step on one accelerator: tokens/s and model-FLOPs utilisation (run by bench/gpu.sh).

    python -m bench.gpu_step --shape 8b --attention cudnn --seq 4096 --batch 2

Random bf16 weights with Llama-3.2-1B or Llama-3-8B shapes (the real layer count, fewer when
--layers says so), 16 trainable rows (an SGD update: k x d, negligible), the training loss of
train/loss.py (`token_sums`: the chunked head and cross-entropy), remat auto (or --remat). Batches
are unpacked (no segment ids) so all three implementations run the same step: `cudnn` takes no
segment ids.

Model FLOPs and MFU: bench/gpu_shapes.py.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.gpu_shapes import SHAPES, rates
from jaxvocab import Llama, LlamaConfig, rows
from jaxvocab.attention import cudnn_unsupported, make_mask
from jaxvocab.errors import UsageError
from jaxvocab.remat import choose_remat
from train.data import Batch
from train.loss import token_sums


def build_step(rm):
    graphdef, params, frozen = nnx.split(rm, nnx.Param, rows.Frozen)

    def loss(params, frozen, ids, targets):
        s, n = token_sums(graphdef, params, frozen, Batch(ids, None, targets, jnp.ones(targets.shape, jnp.float32)))
        return s / n

    @jax.jit
    def step(params, frozen, ids, targets):
        value, grads = jax.value_and_grad(loss)(params, frozen, ids, targets)
        params = jax.tree.map(lambda p, g: p - 1e-3 * g.astype(p.dtype), params, grads)
        return params, value

    return step, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, help="fewer layers than the real model (default: real)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="auto", help="auto | full | dots | none (the model's remat argument)")
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape], max_position_embeddings=max(args.seq, 8192))
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    dtype = jnp.bfloat16 if args.shape != "tiny" or jax.devices()[0].platform != "cpu" else jnp.float32
    cfg = LlamaConfig(**shape, dtype=jnp.dtype(dtype).name)
    row = {
        "shape": args.shape,
        "attention": args.attention,
        "remat": choose_remat(args.remat, cfg, args.batch, args.seq, args.seq, dtype, args.attention),
        "layers": cfg.num_hidden_layers,
        "B": args.batch,
        "T": args.seq,
        "device": jax.devices()[0].device_kind,
    }
    probe = jax.ShapeDtypeStruct((args.batch, args.seq, cfg.num_attention_heads, cfg.head_dim), dtype)
    if args.attention == "cudnn" and (why := cudnn_unsupported(probe, probe, make_mask(1, 1))):
        print(json.dumps({**row, "refused": why}))
        return
    model = Llama(cfg, dtype=dtype, attention=args.attention, remat=args.remat, rngs=nnx.Rngs(0))
    rm = rows.split(model, list(range(cfg.vocab_size - 16, cfg.vocab_size)))
    del model
    step, params, frozen = build_step(rm)
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    targets = jnp.roll(ids, -1, axis=1)
    t0 = time.perf_counter()
    params, loss = step(params, frozen, ids, targets)
    loss.block_until_ready()
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    row["loss0"] = round(float(loss), 5)  # same weights and batch for every implementation: a cross-check
    params, loss = step(params, frozen, ids, targets)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, loss = step(params, frozen, ids, targets)
    loss.block_until_ready()
    dt = (time.perf_counter() - t0) / args.steps
    row.update(rates(cfg, args.batch, args.seq, dt, jax.devices()[0].device_kind), loss=float(loss))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 1)
    print(json.dumps(row))


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(json.dumps({"error": str(e)}))
