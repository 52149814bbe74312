"""Tiny real checkpoints written by transformers itself (`save_pretrained`), our parity oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def make_hf_checkpoint(
    path,
    *,
    vocab=256,
    hidden=64,
    intermediate=128,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=None,
    tied=False,
    scaling=True,
    style="rope_parameters",
    shards=False,
    dtype="float32",
    seed=0,
    std=0.2,
    theta=10000.0,
    max_pos=4096,
    zero_rows=(),
    bigram_steps=0,
):
    """Write a random LlamaForCausalLM with transformers; returns (path, torch model in f32).

    style: "rope_parameters" (transformers 5), "rope_scaling" (rope_type key) or "rope_scaling_type"
    (the older `type` key). std is larger than HF's 0.02 so logits are far from uniform and
    parity tests can actually fail. `zero_rows` are set to 0 in embed (and head), like Llama-3's
    untrained reserved rows. `bigram_steps` > 0 then trains it (f32 AdamW) on `bigram_ids`' language,
    so its next-token predictions are confident the way a trained model's are.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        tie_word_embeddings=tied,
        rope_scaling=dict(LLAMA3_SCALING, rope_theta=theta) if scaling else None,
        rope_theta=theta,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = randomize(LlamaForCausalLM(cfg).eval(), std)
    if bigram_steps:
        learn_bigram(model, vocab, bigram_steps)
    with torch.no_grad():
        for r in zero_rows:
            model.model.embed_tokens.weight[r] = 0
            if not tied:
                model.lm_head.weight[r] = 0
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    path = Path(path)
    model.save_pretrained(path, max_shard_size="200KB" if shards else "10GB")
    _restyle_config(path / "config.json", style, scaling, theta)
    return path, model.float()


def bigram_ids(vocab: int, batch: int = 2, length: int = 520, seed: int = 0) -> np.ndarray:
    """Chains x[t+1] = perm[x[t]] from random starts: a language with one right answer per position."""
    perm = np.random.RandomState(1234).permutation(vocab)
    ids = np.empty((batch, length), np.int64)
    ids[:, 0] = np.random.RandomState(seed).randint(0, vocab, batch)
    for t in range(1, length):
        ids[:, t] = perm[ids[:, t - 1]]
    return ids


def learn_bigram(model, vocab: int, steps: int) -> None:
    """AdamW on short `bigram_ids` chains: trained-looking logits (large top-1 margins) in a few seconds.
    One torch thread: tiny ops are slower with more, and the suite shares 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(steps):
        ids = torch.tensor(bigram_ids(vocab, batch=16, length=33, seed=step))
        loss = model(ids, labels=ids).loss  # labels are shifted inside
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)


def randomize(model, std: float):
    """Weights far from HF's 0.02 init (norms near 1), so logits are far from uniform and parity
    tests can actually fail."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def _restyle_config(file: Path, style: str, scaling: bool, theta: float) -> None:
    d = json.loads(file.read_text())
    if style == "rope_parameters":
        return
    d.pop("rope_parameters", None)
    d["rope_theta"] = theta
    if not scaling:
        d["rope_scaling"] = None
    elif style == "rope_scaling":
        d["rope_scaling"] = dict(LLAMA3_SCALING)
    else:
        s = dict(LLAMA3_SCALING)
        s["type"] = s.pop("rope_type")
        d["rope_scaling"] = s
    file.write_text(json.dumps(d, indent=2))


def torch_logits(model, ids: np.ndarray, **kw) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def random_ids(vocab: int, batch: int = 2, length: int = 520, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


def tiny_llama(**kw):
    """A random 2-layer GQA Llama (64 ids, width 32, head_dim 8) built in jaxvocab, for tests of the
    model's own machinery (attention choice, remat, MLP chunking); `kw` are Llama's choices."""
    from flax import nnx

    from jaxvocab import Llama, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=4096,
    )
    return Llama(cfg, rngs=nnx.Rngs(0), **kw)


def random_llama(config, seed: int = 0, std: float = 0.1):
    """A jaxvocab Llama filled from numpy (norms near 1): much faster than eager random init at a
    128k vocabulary, and far from uniform logits like `randomize`."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxvocab.model import Llama

    model = nnx.eval_shape(lambda: Llama(config))
    rs = np.random.RandomState(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            shape = var.value.shape
            noise = rs.standard_normal(shape)
            value = 1.0 + 0.1 * noise if path[-1].endswith("norm") else std * noise
            var.set_value(jnp.asarray(value, jnp.float32))
    return model


def train_argv(model, data, out, *rest, trainable: str | None = None) -> list[str]:
    """jaxvocab-train's argv: every CLI test names the same three paths (and usually the rows), so they
    are written once here; `rest` follows as given, each item str()ed."""
    head = ["--model", model, "--data", data, "--out", out]
    if trainable is not None:
        head += ["--trainable", trainable]
    return [str(a) for a in (*head, *rest)]
