"""`inspect`: what a checkpoint is, read from headers only (no weight is loaded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from jaxvocab.config import LlamaConfig
from jaxvocab.io import detect, hf

_KINDS = {"hf": "Hugging Face", "meta": "Meta original", "jaxvocab": "jaxvocab checkpoint"}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def describe(src: Path) -> str:
    kind = detect(Path(src))
    config = LlamaConfig.from_hf_file(src) if kind in ("hf", "jaxvocab") else _meta_config(src)
    lines = [f"{src}  ({_KINDS[kind]})"]
    lines += _architecture(config)
    if kind == "hf":
        infos = hf.tensor_index(Path(src))
        count = sum(int(np.prod(i.shape)) for i in infos.values())
        nbytes = sum(i.nbytes for i in infos.values())
        dtypes = Counter(i.dtype.name for i in infos.values())
        files = Counter(i.path.name for i in infos.values())
        lines += [
            f"  parameters     {count:,} ({count / 1e9:.2f}B)  {_size(nbytes)}",
            f"  dtype          {', '.join(f'{d} x{n}' for d, n in dtypes.items())}",
            f"  files          {len(files)} shard(s): "
            + ", ".join(f"{f} ({n} tensors)" for f, n in sorted(files.items())),
        ]
    else:
        count = config.num_params()
        lines += [f"  parameters     {count:,} ({count / 1e9:.2f}B) from the config"]
        if kind == "meta":
            lines += [_meta_files(Path(src))]
    return "\n".join(lines)


def _meta_config(src):
    from jaxvocab.io.meta import meta_config

    return meta_config(Path(src))


def _meta_files(src: Path) -> str:
    from jaxvocab.io.meta import shard_files

    files = shard_files(src)
    return f"  files          {len(files)} model-parallel shard(s): " + ", ".join(
        f"{f.name} ({_size(f.stat().st_size)})" for f in files
    )


def _architecture(c: LlamaConfig) -> list[str]:
    rope = f"theta {c.rope_theta:g}"
    if c.rope_scaling:
        rs = c.rope_scaling
        rope += (
            f", llama3 scaling factor {rs.factor:g} (low {rs.low_freq_factor:g}, high {rs.high_freq_factor:g}, "
            f"original context {rs.original_max_position_embeddings})"
        )
    else:
        rope += ", no scaling"
    return [
        "  architecture   LlamaForCausalLM",
        f"  layers         {c.num_hidden_layers}, hidden {c.hidden_size}, mlp {c.intermediate_size}",
        f"  attention      {c.num_attention_heads} heads x {c.head_dim}, {c.num_key_value_heads} kv heads "
        f"(GQA {c.q_per_kv}:1{', MHA' if c.q_per_kv == 1 else ''})",
        f"  vocab          {c.vocab_size} rows, head {'tied to the embedding' if c.tie_word_embeddings else 'untied'}",
        f"  rope           {rope}",
        f"  context        {c.max_position_embeddings} positions, rms_norm_eps {c.rms_norm_eps:g}",
        f"  bos / eos      {c.bos_token_id} / {c.eos_token_id}",
    ]
