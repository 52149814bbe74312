"""Train a handful of vocabulary rows without ever materialising a V x d gradient.

`split(model, ids)` turns a `Llama` into a `RowsModel`: the chosen ids become one k x d
`nnx.Param` per table (f32 master copies), and every other weight -- the full tables included --
is held in `Frozen`, a non-Param variable. `nnx.grad` / optax therefore only ever see k x d arrays:
no V x d gradient, optimizer moment or weight-decay term exists, whatever the vocabulary size.

Forward: the embedding gathers from the frozen table and overrides the chosen ids through a
position map (`lookup[id]` = row index or -1); the head projects onto the frozen table and then
replaces the chosen columns by `h @ rows.T`. The rows pass through the table's dtype on the way in,
so the forward pass is exactly the merged model's forward pass (what you train is what you ship).
`merge(rows_model)` writes the rows back into the tables and returns an ordinary `Llama`.

With a `LoraSpec`, the RowsModel also holds LoRA adapters (lora.py) as Params beside the rows: the
frozen stacked weights and the adapters ride the decoder's one scan together, and `merge` folds
W + (alpha/r) B A back in. `--trainable none` is then allowed: adapters only, no rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvocab import lora as lora_lib
from jaxvocab.errors import UsageError
from jaxvocab.lora import LoraSpec
from jaxvocab.model import Decoder, Llama, check_remat, project

TABLES = ("both", "embed", "head")


class Frozen(nnx.Variable):
    """Carried by the module but not an nnx.Param: gradients and optimizers never touch it."""


class RowsModel(Decoder):
    """A Llama whose only parameters are the chosen rows of its embedding and/or head.

    Tied models hold one set of rows that serves both the embedding and the head, so its gradient
    is the sum of both uses, exactly as for the tied table itself. The forward pass is the
    `Decoder`'s; only the embedding lookup, the head and the layer weights (adapters) differ.
    `remat` (default: the model's) is the one construction choice a training run may change.
    """

    def __init__(
        self,
        model: Llama,
        ids,
        tables: str = "both",
        lora: LoraSpec | None = None,
        seed: int = 0,
        *,
        remat: str | None = None,
    ):
        config = model.config
        tied = model.lm_head is None
        if tables not in TABLES:
            raise UsageError(f"--tables {tables!r}: choose one of {', '.join(TABLES)}")
        if tied and tables != "both":
            raise UsageError(
                f"--tables {tables}: the model ties embedding and head, so one set of rows serves both; drop --tables"
            )
        ids = check_ids(ids, config.vocab_size, allow_empty=lora is not None)
        self.config = config
        self.compute_dtype = model.compute_dtype
        self.remat = model.remat if remat is None else check_remat(remat)
        self.attention = model.attention
        self.tied = tied
        self.tables = tables
        table = model.embed[...]
        lookup = np.full(config.vocab_size, -1, np.int32)
        lookup[ids] = np.arange(len(ids), dtype=np.int32)
        self.ids = Frozen(_replicated(jnp.asarray(ids, jnp.int32), table))
        self.lookup = Frozen(_replicated(jnp.asarray(lookup), table))
        self.embed = Frozen(table)
        self.layers = nnx.Dict({name: Frozen(w) for name, w in model.layers.weights().items()})
        self.norm = Frozen(model.norm[...])
        self.lm_head = None if tied else Frozen(model.lm_head[...])
        trains_rows = ids.size > 0
        self.embed_rows = _rows(table, ids) if trains_rows and tables in ("both", "embed") else None
        self.head_rows = None if tied or tables == "embed" or not trains_rows else _rows(model.lm_head[...], ids)
        self.lora_spec = lora
        self.lora = None if lora is None else lora_lib.init(model.layers.weights(), lora, jax.random.key(seed))

    @property
    def head_table(self) -> Frozen:
        return self.embed if self.tied else self.lm_head

    @property
    def head_param(self) -> nnx.Param | None:
        return self.embed_rows if self.tied else self.head_rows

    def layer_weights(self, dropout_key=None):
        """Frozen stacked weights, with the adapters (and their dropout under `dropout_key`) beside them."""
        layers = {name: v[...] for name, v in self.layers.items()}
        if self.lora is not None:
            layers |= lora_lib.forward_weights(
                {k: v[...] for k, v in self.lora.items()}, self.lora_spec, self.config.num_hidden_layers, dropout_key
            )
        return layers

    def embed_tokens(self, input_ids):
        """The frozen table's rows, with the chosen ids' rows taken from the trainable params."""
        dtype = jnp.dtype(self.compute_dtype)
        table = self.embed[...]
        x = table[input_ids]
        if self.embed_rows is None:
            return x.astype(dtype)
        idx = self.lookup[...][input_ids]
        r = self.embed_rows[...].astype(table.dtype)[jnp.maximum(idx, 0)]
        return jnp.where((idx >= 0)[..., None], r, x).astype(dtype)

    def logits(self, h):
        """The frozen head's logits with the chosen ids' columns from the trainable rows."""
        rows = self.head_param
        return head_logits(
            h, self.head_table[...], None if rows is None else rows[...], self.ids[...], jnp.dtype(self.compute_dtype)
        )


def head_logits(h, table, rows, ids, dtype):
    """Hidden states -> f32 logits: the frozen table's, with the chosen ids' columns from `rows`
    (None: the table's own). Rows pass through the table's dtype, as they will once merged."""
    logits = project(h, table, dtype)
    if rows is None:
        return logits
    return logits.at[..., ids].set(project(h, rows.astype(table.dtype), dtype))


def split(
    model: Llama, ids, tables: str = "both", lora: LoraSpec | None = None, seed: int = 0, *, remat: str | None = None
) -> RowsModel:
    """`model` with only rows `ids` trainable.

    Args:
      model: the Llama (left unchanged; the RowsModel shares its frozen arrays).
      ids: the token ids whose rows train.
      tables: "both" | "embed" | "head": which tables of an untied model train.
      lora: adapters on the projections (then `ids` may be empty); `seed` draws their A.
      remat: the training run's remat choice (default: the model's).
    Returns:
      A RowsModel whose only `nnx.Param`s are the k x d rows (and the adapters).
    Example:
      >>> rm = split(model, new_ids(plan)); loss = ...; model = merge(rm)
    """
    return RowsModel(model, ids, tables, lora, seed, remat=remat)


def merge(rm: RowsModel, dtype=None) -> Llama:
    """An ordinary Llama with the rows written back and the adapters folded in.

    Args:
      rm: the trained RowsModel (left unchanged).
      dtype: the stored dtype (default: the checkpoint's); adapters fold in as W + (alpha/r) B A in f32.
    Returns:
      A new Llama with the same construction choices; every other weight untouched.
    Example:
      >>> save_hf(merge(rm), "out", tokenizer=tok, plan=plan)
    """
    c = rm.config
    dtype = jnp.dtype(dtype or rm.embed[...].dtype)
    model = nnx.eval_shape(
        lambda: Llama(c, param_dtype=dtype, compute_dtype=rm.compute_dtype, attention=rm.attention, remat=rm.remat)
    )
    ids = rm.ids[...]
    model.embed.set_value(_write_rows(rm.embed[...], ids, rm.embed_rows, dtype))
    layers = {name: w[...] for name, w in rm.layers.items()}
    if rm.lora is None:
        layers = {name: _cast(w, dtype) for name, w in layers.items()}
    else:
        layers = lora_lib.merge_layers(layers, {k: v[...] for k, v in rm.lora.items()}, rm.lora_spec, dtype)
    for name, w in layers.items():
        getattr(model.layers, name).set_value(w)
    model.norm.set_value(_cast(rm.norm[...], dtype))
    if not rm.tied:
        model.lm_head.set_value(_write_rows(rm.lm_head[...], ids, rm.head_rows, dtype))
    return model


def row_values(rm: RowsModel) -> dict[str, jax.Array]:
    """The trainable rows by name ('embed_rows' / 'head_rows'): what a run checkpoints."""
    return nnx.to_pure_dict(nnx.state(rm, nnx.Param))


def new_ids(plan) -> list[int]:
    """Ids a vocab plan added or renamed (every planned token not 'existing'); [] without a plan.

    Args:
      plan: a `VocabPlan` (e.g. `jaxvocab.load_plan(ckpt)`), or None.
    Returns:
      The sorted ids, what `--trainable new` trains.
    Example:
      >>> rm = split(model, new_ids(jaxvocab.load_plan("ckpt")))
    """
    return [] if plan is None else sorted({t.id for t in plan.tokens if t.action != "existing"})


def check_ids(ids, vocab_size: int, allow_empty: bool = False) -> np.ndarray:
    """Sorted unique int32 ids, each a row of a vocab_size table (the CLI's --trainable check too)."""
    arr = np.unique(np.asarray(list(ids), dtype=np.int64))
    if arr.size == 0 and not allow_empty:
        raise UsageError("no trainable ids: pass at least one id (e.g. --trainable ids:128256)")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise UsageError(f"trainable id {int(bad[0])} is outside the model's vocabulary [0, {vocab_size})")
    return arr.astype(np.int32)


def _cast(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


def _replicated(x, like):
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return jax.device_put(x, NamedSharding(sharding.mesh, P()))
    return x


def _rows(table, ids: np.ndarray) -> nnx.Param:
    return nnx.Param(_replicated(table[jnp.asarray(ids)].astype(jnp.float32), table), logical=("rows", None))


@functools.partial(jax.jit, static_argnums=3)
def _scatter(table, ids, rows, dtype):
    # Rows pass through the table's own dtype first, as in the forward pass that trained them, so a
    # wider export (f32 from a bf16 checkpoint) holds exactly the model that was trained.
    return table.astype(dtype).at[ids].set(rows.astype(table.dtype).astype(dtype))


def _write_rows(table, ids, rows: nnx.Param | None, dtype):
    if rows is None:
        return _cast(table, dtype)
    out = _scatter(table, ids, rows[...], jnp.dtype(dtype))
    sharding = getattr(table, "sharding", None)
    return jax.device_put(out, sharding) if sharding is not None else out
