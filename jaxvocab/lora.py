"""Low-rank adapters on the frozen projections, trained beside the rows and merged back.

PEFT's conventions, so the same init gives the same model and an adapter moves between the two:
A [r, in] Kaiming-uniform (a=sqrt(5), i.e. U(+-1/sqrt(in))), B [out, r] zeros, delta = (alpha/r) B A,
dropout on the adapter's input only. Each adapter is stacked over the layer axis like the weight it
adapts (A [L, r, in], B [L, out, r]), so the decoder's one `lax.scan` carries it; f32 master copies,
cast to the compute dtype in the forward pass, sharded by the logical axes of the weight's own in/out
dimensions (the rank axis replicated).

Why not qwix's LoRA provider: it intercepts `dot_general`/`einsum` calls whose right operand is an
attribute of the current nnx module and creates the adapter there, in the weight's dtype. Inside our
scan the weight is a slice of a stacked array, not a module attribute, so qwix finds no param; and
its adapters would be bf16 with bf16 checkpoints and not PEFT-named. Adding `x A^T B^T` in the layer's
`linear` (model.py) is the few lines it takes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from jaxvocab.errors import UsageError
from jaxvocab.model import LAYER_AXES
from jaxvocab.sharding import sharding_for

# --lora-targets short name -> layer weight -> HF module (PEFT's target_modules).
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
HF_MODULES = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What adapters to train, with PEFT's meaning for each field (scale = alpha / rank).

    Args:
        rank: R of A [R, in] and B [out, R].
        alpha: scale numerator; the update is (alpha / R) B A.
        targets: layer weight names (`parse_targets("q,v,down")` turns CLI names into these).
        dropout: on the adapter's input only, as PEFT's lora_dropout.
    Example:
        >>> rm = jaxvocab.rows.split(model, new_ids, lora=LoraSpec(16, 32.0, parse_targets("q,k,v,o")))
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS.values())  # layer weight names
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise UsageError(f"--lora-rank {self.rank}: must be a positive integer")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise UsageError(f"--lora-alpha {self.alpha}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        if not self.targets or any(t not in HF_MODULES for t in self.targets):
            raise UsageError(f"lora targets {self.targets}: expected layer weights among {', '.join(HF_MODULES)}")


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,k,v,o,gate,up,down' (or HF names q_proj, ...) -> layer weight names, in model order."""
    names = {p.strip().removesuffix("_proj") for p in text.split(",") if p.strip()}
    bad = sorted(names - set(TARGETS))
    if bad or not names:
        raise UsageError(
            f"--lora-targets {text!r}: unknown {', '.join(bad) or '(empty)'}; choose from {','.join(TARGETS)}"
        )
    return tuple(w for t, w in TARGETS.items() if t in names)


def a_key(name: str) -> str:
    return "lora_a_" + name


def b_key(name: str) -> str:
    return "lora_b_" + name


def init(layers: dict[str, jax.Array], spec: LoraSpec, key: jax.Array) -> nnx.Dict:
    """Fresh adapters for `layers` (the stacked base weights): A Kaiming-uniform, B zeros, f32."""
    out = {}
    for i, name in enumerate(spec.targets):
        w = layers[name]
        L, o, n = w.shape
        if spec.rank > min(o, n):  # rank min(o, n) already spans every update of this weight
            raise UsageError(
                f"--lora-rank {spec.rank}: larger than {name}'s smaller side ({o} x {n}); pass a rank <= {min(o, n)}"
            )
        bound = 1.0 / math.sqrt(n)  # kaiming_uniform_(a=sqrt(5)) on [r, in]: gain*sqrt(3/in) = 1/sqrt(in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (L, spec.rank, n), jnp.float32, -bound, bound)
        out[a_key(name)] = _param(a, w, (LAYER_AXES[name][0], None, LAYER_AXES[name][2]))
        out[b_key(name)] = _param(
            jnp.zeros((L, o, spec.rank), jnp.float32), w, (LAYER_AXES[name][0], LAYER_AXES[name][1], None)
        )
    return nnx.Dict(out)


def _param(value, like, logical) -> nnx.Param:
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding):
        value = jax.device_put(value, sharding_for(value.shape, logical, sharding.mesh))
    return nnx.Param(value, logical=logical)


def forward_weights(
    adapters: dict[str, jax.Array], spec: LoraSpec, n_layers: int, dropout_key: jax.Array | None = None
) -> dict[str, jax.Array]:
    """The extra entries of the scanned layer dict that model.py's `linear` adds as `x A^T B^T * scale`.

    Per-layer arrays (scale, and the dropout keys when training with dropout), so they ride the scan."""
    extra = dict(adapters)
    extra["lora_scale"] = jnp.full((n_layers,), spec.scale, jnp.float32)
    if dropout_key is not None and spec.dropout > 0:
        extra["lora_drop_key"] = jax.random.split(dropout_key, n_layers)
        extra["lora_drop_p"] = jnp.full((n_layers,), spec.dropout, jnp.float32)
    return extra


@jax.jit
def _merged(w, a, b, scale):
    delta = jnp.einsum("lor,lri->loi", b, a, preferred_element_type=jnp.float32)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge_layers(
    layers: dict[str, jax.Array], adapters: dict[str, jax.Array], spec: LoraSpec, dtype=None
) -> dict[str, jax.Array]:
    """Base weights with W + (alpha/r) B A (computed in f32) folded in, stored in `dtype` (default: W's)."""
    out = {}
    for name, w in layers.items():
        if dtype is not None:
            w = w.astype(dtype)
        if a_key(name) in adapters:
            merged = _merged(w, adapters[a_key(name)], adapters[b_key(name)], jnp.float32(spec.scale))
            w = (
                jax.device_put(merged, w.sharding)
                if isinstance(getattr(w, "sharding", None), NamedSharding)
                else merged
            )
        out[name] = w
    return out
