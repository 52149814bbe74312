"""THE table between checkpoint tensor names and model parameters.

One row per parameter says where it lives in an HF checkpoint, where in a Meta checkpoint, and how
to get there (Meta's model-parallel split dimension; Meta's interleaved rotary layout). The model
keeps the checkpoints' own [out, in] layout, so no row needs a transpose.
Import and export both iterate this table, so a name can never be right one way and wrong the other.
"""

from __future__ import annotations

import dataclasses
import re

from jaxvocab.config import LlamaConfig
from jaxvocab.model import LAYER_AXES, TABLE_AXES


@dataclasses.dataclass(frozen=True)
class Key:
    path: tuple[str, ...]  # attribute path on the Llama module
    hf: str  # HF name; "{i}" is the layer index
    meta: str  # Meta consolidated.*.pth name
    meta_split: int | None = None  # dim Meta's model-parallel shards are concatenated along (None: replicated)
    rotary: str | None = None  # "q" / "k": Meta stores these heads interleaved, HF as rotate-half

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf


KEYS: tuple[Key, ...] = (
    Key(("embed",), "model.embed_tokens.weight", "tok_embeddings.weight", meta_split=0),
    Key(("layers", "attn_norm"), "model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    Key(("layers", "wq"), "model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight", 0, "q"),
    Key(("layers", "wk"), "model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight", 0, "k"),
    Key(("layers", "wv"), "model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight", 0),
    Key(("layers", "wo"), "model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight", 1),
    Key(("layers", "mlp_norm"), "model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    Key(("layers", "w_gate"), "model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight", 0),
    Key(("layers", "w_up"), "model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight", 0),
    Key(("layers", "w_down"), "model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight", 1),
    Key(("norm",), "model.norm.weight", "norm.weight"),
    Key(("lm_head",), "lm_head.weight", "output.weight", meta_split=0),
)

# Tensors older checkpoints carry that hold no weights (recomputed from the config).
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def keys_for(config: LlamaConfig) -> list[Key]:
    """Rows that exist for this config (a tied model has no separate head)."""
    return [k for k in KEYS if not (k.path == ("lm_head",) and config.tie_word_embeddings)]


def param_shape(key: Key, config: LlamaConfig) -> tuple[int, ...]:
    if key.path[0] == "layers":
        return config.layer_shapes()[key.path[1]]
    if key.path == ("norm",):
        return (config.hidden_size,)
    return (config.vocab_size, config.hidden_size)


def logical_axes(key: Key) -> tuple[str, ...]:
    if key.path[0] == "layers":
        return LAYER_AXES[key.path[1]]
    return ("norm",) if key.path == ("norm",) else TABLE_AXES


def checkpoint_shape(key: Key, config: LlamaConfig) -> tuple[int, ...]:
    """Shape of one stored tensor (one layer's, for stacked params)."""
    return param_shape(key, config)[1 if key.layered else 0 :]


def names(key: Key, config: LlamaConfig, style: str = "hf") -> list[str]:
    pattern = key.hf if style == "hf" else key.meta
    if not key.layered:
        return [pattern]
    return [pattern.format(i=i) for i in range(config.num_hidden_layers)]


def get_param(model, key: Key):
    obj = model
    for part in key.path:
        obj = getattr(obj, part)
    return obj


def natural_order(name: str) -> list:
    """Sort key that numbers layers as people do: layers.2 before layers.10 (for error messages)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
