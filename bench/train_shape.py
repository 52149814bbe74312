"""The ~135M Llama (SmolLM-135M shapes, tied) and the batch shape the training benchmarks share.

bench/train.py (rows step vs PEFT TrainableTokens), bench/train_lora.py (LoRA + rows through the
CLIs) and bench/train_cli.py measure against the same weights and batches, so their figures can be
compared; this module is where those shapes are written once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=0,
)
NEW = list(range(49152 - 16, 49152))
BATCH, SEQ, LR = 4, 256, 1e-3


def write_checkpoint(out: Path) -> None:
    """Random init with a fixed seed, so every tool in every round trains the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, initializer_range=0.02)).eval()
    model.save_pretrained(out)


def write_docs(path: Path, n_docs: int) -> None:
    """Pre-tokenized docs of exactly SEQ ids (one packed row each: SEQ inputs, SEQ - 1 targets, as PEFT's
    labels=input_ids), the new ids at 5% of the positions: the data every CLI benchmark trains on."""
    rs = np.random.RandomState(0)
    with path.open("w") as f:
        for _ in range(n_docs):
            x = rs.randint(0, NEW[0], SEQ)
            hit = rs.rand(SEQ) < 0.05
            x[hit] = rs.choice(NEW, hit.sum())
            f.write(json.dumps({"input_ids": x.tolist()}) + "\n")
