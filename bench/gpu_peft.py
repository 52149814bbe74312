"""The peer of bench/gpu_step.py: PEFT TrainableTokens on transformers' LlamaForCausalLM, one GPU.

    python -m bench.gpu_peft --shape 8b --batch 4 --seq 4096

The same shapes, batch and model-FLOP count (bench/gpu_shapes.py) as jaxvocab's rows step: random
bf16 weights, 16 trainable embedding rows (`TrainableTokensConfig`; tied shapes wrap the head too),
torch AdamW, `attn_implementation="sdpa"` (torch's fused causal attention). Without gradient
checkpointing first, as a user would start; if that runs out of memory, again with
`gradient_checkpointing_enable()`, the usual fix. Prints one JSON line in gpu_step's keys.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from peft import TrainableTokensConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from bench.gpu_shapes import SHAPES, rates


def run(shape: dict, B: int, T: int, steps: int, checkpointing: bool, device: str) -> dict:
    config = LlamaConfig(**shape, max_position_embeddings=max(T, 8192), attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    new = list(range(config.vocab_size - 16, config.vocab_size))
    model = get_peft_model(model, TrainableTokensConfig(token_indices=new))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=gen).to(device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # synchronises, as a loop that logs would

    t0 = time.perf_counter()
    row = {"loss0": round(step(), 5)}
    row["compile_s"] = round(time.perf_counter() - t0, 1)  # first step: allocator and kernel warm-up
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    dt = (time.perf_counter() - t0) / steps
    return {**row, "step_s": dt, "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    shape = SHAPES[args.shape]
    row = {"shape": args.shape, "attention": "peft+sdpa", "B": args.batch, "T": args.seq, "device": kind}
    row["layers"] = shape["num_hidden_layers"]
    try:
        row.update(run(shape, args.batch, args.seq, args.steps, False, device), remat="none")
    except torch.OutOfMemoryError:
        row["remat"] = "checkpointing"  # retried outside this block, so the failed run's frames are gone
    if row.get("remat") == "checkpointing":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row.update(run(shape, args.batch, args.seq, args.steps, True, device))
    if device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    row.update(rates(argparse.Namespace(**shape), args.batch, args.seq, row["step_s"], kind))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
