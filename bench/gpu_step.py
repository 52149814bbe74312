"""One rows-training step on one accelerator: tokens/s and model-FLOPs utilisation (run by bench/gpu.sh).

    python -m bench.gpu_step --shape 8b --attention cudnn --seq 4096 --batch 2

Random bf16 weights with Llama-3.2-1B or Llama-3-8B shapes (the real layer count, fewer when
--layers says so), 16 trainable rows, AdamW, the chunked cross-entropy of train/loss.py, remat
auto. Batches are unpacked (no segment ids) so all three implementations run the same step:
`cudnn` takes no segment ids.

Model FLOPs per step (what the step needs: forward plus the activation backward, no weight
gradients, no remat recompute; causal attention counted over the visible half):
    per token and layer   F_lin = 2 (D q + 2 D kv + q D + 3 D F),  q = H hd, kv = KV hd
                          F_att = 2 * 2 * H hd (T + 1) / 2           (QK^T and PV)
    forward               L (F_lin + F_att) + 2 D V                  (the head)
    activation backward   L (F_lin + 2 F_att) + 2 D V               (dX of each matmul; dQ, dK, dV, dP)
    step                  B T (forward + activation backward)
MFU = step FLOPs / step time / peak dense bf16 FLOP/s of the device (PEAK_TFLOPS overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvocab import Llama, LlamaConfig, rows
from jaxvocab.attention import cudnn_unsupported
from jaxvocab.errors import UsageError
from train.loss import _by_chunk, _scan_sum, chunk_len, chunk_nll

SHAPES = {
    "1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
    },
}
PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "h800": 989.0,
    "gh200": 989.0,
    "a100": 312.0,
    "l40s": 362.0,
    "l4": 121.0,
    "a10": 125.0,
    "rtx 4090": 165.0,
}


def step_flops(c: LlamaConfig, B: int, T: int) -> float:
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    lin = 2 * (D * q + 2 * D * kv + q * D + 3 * D * F)
    att = 2 * 2 * q * (T + 1) / 2
    forward = L * (lin + att) + 2 * D * V
    backward = L * (lin + 2 * att) + 2 * D * V
    return B * T * (forward + backward)


def peak_flops() -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    kind = jax.devices()[0].device_kind.lower()
    hits = [v for k, v in PEAK_TFLOPS.items() if k in kind]
    return max(hits) * 1e12 if hits else None


def build_step(rm):
    graphdef, params, frozen = nnx.split(rm, nnx.Param, rows.Frozen)

    def loss(params, frozen, ids, targets):
        model = nnx.merge(graphdef, params, frozen)
        h, _ = model.hidden(ids)
        B, T, _ = h.shape
        C = chunk_len(B, T, model.config.vocab_size)
        r = model.head_param
        r = None if r is None else r[...]
        table, sel, dtype = model.head_table[...], model.ids[...], jnp.dtype(model.compute_dtype)
        xs = (_by_chunk(h, C), _by_chunk(targets, C), _by_chunk(jnp.ones(targets.shape, jnp.float32), C))
        s, n = _scan_sum(lambda h, t, w: chunk_nll(dtype, h, r, table, sel, t, w), xs, 2)
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
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape], max_position_embeddings=max(args.seq, 8192))
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    dtype = jnp.bfloat16 if args.shape != "tiny" or jax.devices()[0].platform != "cpu" else jnp.float32
    cfg = LlamaConfig(**shape, dtype=jnp.dtype(dtype).name)
    row = {
        "shape": args.shape,
        "attention": args.attention,
        "layers": cfg.num_hidden_layers,
        "B": args.batch,
        "T": args.seq,
        "device": jax.devices()[0].device_kind,
    }
    probe = jax.ShapeDtypeStruct((args.batch, args.seq, cfg.num_attention_heads, cfg.head_dim), dtype)
    from jaxvocab.attention import make_mask

    if args.attention == "cudnn" and (why := cudnn_unsupported(probe, probe, make_mask(1, 1))):
        print(json.dumps({**row, "refused": why}))
        return
    model = Llama(cfg, dtype=dtype, attention=args.attention, remat="auto", rngs=nnx.Rngs(0))
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
    params, loss = step(params, frozen, ids, targets)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, loss = step(params, frozen, ids, targets)
    loss.block_until_ready()
    dt = (time.perf_counter() - t0) / args.steps
    row.update(
        step_s=round(dt, 4),
        tokens_per_s=round(args.batch * args.seq / dt),
        loss=float(loss),
        tflops_per_s=round(step_flops(cfg, args.batch, args.seq) / dt / 1e12, 1),
    )
    peak = peak_flops()
    row["mfu"] = round(step_flops(cfg, args.batch, args.seq) / dt / peak, 3) if peak else None
    print(json.dumps(row))


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(json.dumps({"error": str(e)}))
