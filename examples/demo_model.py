"""The demo's checkpoint: a tiny, deterministic Llama-3 with the real 128256-token vocabulary.

Random weights alone would make a poor stand-in for a pretrained model: their logits are all near
zero, so nothing shows why initialisation matters. So the tables are shaped like a pretrained
Llama-3's in the two ways that matter here: trained head rows share a strong component against
the hidden state's constant direction (logits mostly large and negative), and the reserved,
header and eot rows are zero, as in the Llama-3 base release. A row initialised at random then
scores ~0 and swallows the softmax, while the mean of the trained rows does not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.llama3_tokenizer import write_text_tokenizer
from jaxvocab.config import LlamaConfig
from jaxvocab.model import Llama

VOCAB = 128256
BIAS_DIM, BIAS, HEAD_BIAS = 0, 3.0, 5.0


def demo_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
        dtype="float32",
    )


def untrained_like_base(tok) -> list[int]:
    """Rows the Llama-3 base model never trained: reserved slots, chat headers and eot."""
    names = (
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|python_tag|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
    )
    ids = set(tok.free_reserved()) | {tok.special_tokens[n] for n in names if n in tok.special_tokens}
    return sorted(ids)


def build_demo_checkpoint(out: Path, seed: int = 0) -> Path:
    """Write the demo model as an HF dir (safetensors + config + tokenizer files) into `out`."""
    from jaxvocab.io import save_hf
    from jaxvocab.tokenizer import load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / ".tokenizer"
    tok_dir.mkdir(exist_ok=True)
    write_text_tokenizer(tok_dir)
    tok = load_tokenizer(tok_dir)
    config = demo_config()
    model = Llama(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    embed = rng.normal(0, 0.5, (VOCAB, config.hidden_size)).astype(np.float32)
    head = rng.normal(0, 0.5, (VOCAB, config.hidden_size)).astype(np.float32)
    embed[:, BIAS_DIM] = BIAS  # a constant direction in the residual stream ...
    head[:, BIAS_DIM] = -HEAD_BIAS  # ... that every trained row scores against: logits large and negative
    norm = np.ones(config.hidden_size, np.float32)
    dead = untrained_like_base(tok)
    embed[dead] = 0.0
    head[dead] = 0.0
    model.embed.set_value(jnp.asarray(embed))
    model.lm_head.set_value(jnp.asarray(head))
    model.norm.set_value(jnp.asarray(norm))
    save_hf(model, out / "hf", tokenizer=tok, overwrite=True, show_progress=False)
    shutil.rmtree(tok_dir)
    return out / "hf"
