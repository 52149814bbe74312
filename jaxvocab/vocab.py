"""Grow a Llama vocabulary: find untrained rows, initialise and grow the tables as planned.

    plan = plan_vocab(tok, ["<|lang_xx|>", "<think>"], model=model)   # vocab_plan.py
    model, tok, plan = expand_vocab(model, tok, plan, init="mean")   # new objects; the old tables donated

The planning names (VocabPlan, plan_vocab, ...) live in `vocab_plan.py` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import numpy as np

from jaxvocab.errors import UsageError, VocabError
from jaxvocab.memory import release
from jaxvocab.model import check_live
from jaxvocab.row_init import INITS, expand_table, no_subword
from jaxvocab.row_stats import REL_EPS, TableStats, model_mesh, model_stats, tables, untrained_mask
from jaxvocab.sharding import axis_size
from jaxvocab.vocab_plan import (  # noqa: F401  (re-exported: the vocabulary API in one import)
    ACTIONS,
    PlannedToken,
    ReuseReserved,
    VocabPlan,
    default_multiple,
    existing_id,
    fit_rows,
    looks_special,
    mesh_multiple,
    plan_vocab,
)


# ---------------------------------------------------------------------------- untrained rows
def find_untrained(model, tok=None, *, rel_eps: float = REL_EPS, include_padding: bool = False) -> list[int]:
    """Sorted ids of untrained rows (Args: `tok` leaves out padding rows beyond it unless
    `include_padding`; `rel_eps` sets "tiny". Returns: the ids. Example:
    `model = fix_untrained(model, find_untrained(model, tok), tok=tok)`).

    "Tiny" is relative: max |x| <= rel_eps * the median row's max |x| (1e-3: trained Llama-3 rows
    sit near 1e-2..1e-1, untrained ones at 0 or 1e-20-ish, so the gap is many orders wide and
    does not depend on the model's scale or dtype). With `tok`, rows beyond the tokenizer (pure
    padding) are left out unless include_padding; `describe_untrained` names the rest. Rows a
    mean init wrote are exact copies of each other until trained, so they count as untrained too.
    """
    ids = np.nonzero(untrained_mask(model, rel_eps))[0]
    if tok is not None and not include_padding:
        ids = ids[ids < tok.n_words]
    return [int(i) for i in ids]


def describe_untrained(ids, tok, limit: int | None = None) -> list[str]:
    """'128002 <|reserved_special_token_0|>' lines; ids beyond the tokenizer are padding rows."""
    shown = list(ids)[:limit] if limit is not None else list(ids)
    return [f"{i} {tok.id_to_piece(i) if i < tok.n_words else '(padding row)'}" for i in shown]


# ------------------------------------------------------------------------------ initialising
def subword_arrays(tok, texts: list[str | None], trained: np.ndarray, init: str):
    """(sub_idx, sub_w, sub_ok) for the subword init; rows without usable text take the mean."""
    k = len(texts)
    if init != "subword":
        return no_subword(k)
    if tok is None:
        warnings.warn("subword init needs the tokenizer (tok=...); the rows fall back to the mean", stacklevel=3)
        return no_subword(k)
    pieces: list[list[int]] = []
    warned = False
    for text in texts:
        ids: list[int] = []
        if text is not None:
            try:
                ids = [i for i in tok.encode(text) if i < len(trained) and trained[i]]
            except VocabError as e:
                if not warned:
                    warnings.warn(f"subword init: {e}; those rows fall back to the mean", stacklevel=3)
                    warned = True
        pieces.append(ids)
    width = max([len(p) for p in pieces] + [1])
    idx, w, ok = np.zeros((k, width), np.int32), np.zeros((k, width), np.float32), np.zeros(k, bool)
    for r, p in enumerate(pieces):
        if p:
            idx[r, : len(p)], w[r, : len(p)], ok[r] = p, 1.0 / len(p), True
    return idx, w, ok


def _check_init(init: str) -> None:
    if init not in INITS:
        raise VocabError(f"init {init!r} is not one of {', '.join(INITS)}")


def _rewrite(
    model,
    targets: np.ndarray,
    trained: np.ndarray,
    texts,
    tok,
    init: str,
    new_rows: int,
    seed: int,
    donate: bool,
    stats: list[TableStats] | None = None,
):
    """A new model: `targets` (sorted) of every table written with `init`, the tables grown to
    `new_rows`, every other parameter shared with `model`. With `donate`, each old table is
    consumed as its successor is made (donated to the jitted expansion, or deleted right after
    it), so peak memory is the model plus one new table and `model` fails loudly if used again.
    With `stats` (the pass that found the untrained rows), a mean init reads no table again.
    On CPU the tables are never donated to the kernel, only deleted after it: a loaded table
    borrows the loader's host buffer, which XLA would first copy to own, then update (two passes
    where writing a new buffer is one, at the same peak)."""
    _check_stat_init(init, trained)
    if len(targets) == 0:
        return _with_tables(model, [p.get_value() for p in tables(model)], new_rows)
    mesh = model_mesh(model)
    subword = subword_arrays(tok, texts, trained, init)
    new_tables = []
    for n, param in enumerate(tables(model)):
        old = param.get_value()
        new = expand_table(
            old,
            trained,
            targets,
            seed,
            n,
            subword,
            method=init,
            new_vocab=new_rows,
            mesh=mesh,
            sums=stats[n].sums if stats else None,
            summed_rows=stats[n].rows if stats else None,
            donate=donate and mesh.devices.flat[0].platform != "cpu",
        )
        new_tables.append(new.block_until_ready())
        if donate:
            release(old)  # peak stays the model plus one new table
    return _with_tables(model, new_tables, new_rows)


def _check_stat_init(init: str, trained: np.ndarray) -> None:
    if init in ("mean", "mean-noise", "covariance", "subword") and not trained.any():
        raise VocabError("the model has no trained rows to take statistics from; use --init random or zeros")


def _with_tables(model, new_tables: list, rows: int):
    """A Llama with the same construction choices and layer weights as `model` and the given tables."""
    from flax import nnx

    from jaxvocab.model import LAYER_AXES, Llama

    config = model.config if rows == model.config.vocab_size else model.config.replace(vocab_size=rows)
    dtype = new_tables[0].dtype
    out = nnx.eval_shape(lambda: Llama(config, param_dtype=dtype, **model.choices()))
    for name in LAYER_AXES:
        getattr(out.layers, name).set_value(getattr(model.layers, name).get_value())
    out.norm.set_value(model.norm.get_value())
    for param, table in zip(tables(out), new_tables, strict=True):
        param.set_value(table)
    return out


def _trained(untrained: np.ndarray, limit: int, targets) -> np.ndarray:
    trained = ~untrained
    trained[limit:] = False
    trained[np.asarray(list(targets), dtype=np.int64)] = False
    return trained


class ExpansionLayout(NamedTuple):
    """What an expansion writes and from which rows."""

    plan: VocabPlan  # with init and untrained_fixed filled in
    targets: np.ndarray  # sorted row ids the expansion initialises (int64)
    trained: np.ndarray  # bool mask over the old rows: rows the init statistics are taken from
    texts: list[str | None]  # per target: the text (or description) the subword init splits


def fitted(plan: VocabPlan, model, tok) -> VocabPlan:
    """`plan` for the rows `model` really has: a plan made without `model=` assumed the tokenizer's
    row count, and is re-fitted here (same ids; spare rows, padding and growth follow the model)."""
    rows = model.config.vocab_size
    made_without_model = plan.old_rows == plan.tokenizer_size_before == tok.n_words
    if plan.old_rows == rows or not made_without_model:
        return plan
    return fit_rows(plan.tokens, tok, plan.tokenizer_size_after, rows, plan.pad_to_multiple_of)


def expansion_layout(model, tok, plan: VocabPlan, init: str = "mean", fix_untrained: bool = False) -> ExpansionLayout:
    """The rows an expansion of `model` by `plan` writes, and the trained rows it reads.

    Args:
      model: the `Llama` before the expansion.
      tok: its tokenizer (the one `plan` was made for).
      plan: from `plan_vocab` (one made without `model=` is re-fitted to the model's rows).
      init: one of INITS.
      fix_untrained: also rewrite the untrained rows the model already has.

    Returns:
      An `ExpansionLayout` (the plan with init and untrained_fixed filled in, target ids, trained mask, texts).

    Example:
      >>> layout = expansion_layout(model, tok, plan_vocab(tok, ["<x>"], model=model))
    """
    plan = fitted(plan, model, tok)
    _check_plan(model, tok, plan)
    return _layout(model, tok, plan, init, fix_untrained, model_stats(model))


def _check_plan(model, tok, plan: VocabPlan) -> None:
    if plan.old_rows != model.config.vocab_size:
        raise VocabError(
            f"the plan was made for {plan.old_rows} model rows but the model has "
            f"{model.config.vocab_size}; re-plan with plan_vocab(..., model=model)"
        )
    if plan.tokenizer_size_before != tok.n_words:
        raise VocabError(
            f"the plan was made for a tokenizer of {plan.tokenizer_size_before} ids but this one has "
            f"{tok.n_words}; re-plan with this tokenizer"
        )


def _layout(model, tok, plan: VocabPlan, init: str, fix_untrained: bool, stats: list[TableStats]) -> ExpansionLayout:
    """expansion_layout over the first `stats[0].rows` rows: all of them, or those a model loaded
    at the plan's final size read from its checkpoint."""
    _check_init(init)
    untrained = untrained_mask(model, stats=stats)
    limit = min(plan.old_rows, tok.n_words)
    fixed = [int(i) for i in np.nonzero(untrained[:limit])[0]] if fix_untrained else []
    plan = dataclasses.replace(plan, init=init, untrained_fixed=sorted(set(plan.untrained_fixed) | set(fixed)))
    targets = np.asarray(plan.reinit_ids, np.int64)
    texts_by_id = {t.id: t.description or t.token for t in plan.tokens if t.action != "existing"}
    texts_by_id.update({i: tok.id_to_piece(i) for i in fixed if i not in texts_by_id})
    trained = _trained(untrained, limit, targets[targets < plan.old_rows])
    return ExpansionLayout(plan, targets, trained, [texts_by_id.get(int(i)) for i in targets])


def _check_size(model, plan: VocabPlan) -> None:
    check_growth(plan, model.config, tables(model)[0].get_value().dtype.itemsize, model_mesh(model))


def check_growth(plan: VocabPlan, config, itemsize: int, mesh) -> None:
    """Refuse a plan whose tables cannot exist (ids past int32) or fit, before anything is allocated.

    Args:
      plan: from `plan_vocab`; config: the model's config before the expansion.
      itemsize: bytes per table element; mesh: where the tables live (its devices' memory is checked).
    Returns:
      None; raises a one-line UsageError naming `--pad-to-multiple-of` when the plan cannot fit.
    Example:
      >>> check_growth(plan, LlamaConfig.from_hf_file(src), 2, mesh)   # before load(vocab_rows=...)
    """
    if plan.new_rows >= 2**31:
        raise UsageError(
            f"the plan grows the vocabulary to {plan.new_rows} rows, past the int32 token ids; "
            "use a smaller --pad-to-multiple-of"
        )
    from jaxvocab.memory import check_fits

    grow = plan.new_rows - config.vocab_size
    if grow <= 0:
        return
    row = config.hidden_size * itemsize
    n_tables = 1 if config.tie_word_embeddings else 2
    # Peak: the model plus one new table being written, then every table larger by `grow` rows.
    check_fits(
        plan.new_rows * row + grow * row * (n_tables - 1),
        mesh,
        f"growing the vocabulary to {plan.new_rows} rows",
        "use a smaller --pad-to-multiple-of or fewer tokens",
    )


class Expansion(NamedTuple):
    """What `expand_vocab` returns: unpack it as `model, tok, plan = expand_vocab(...)`."""

    model: object  # the expanded Llama
    tokenizer: object  # the tokenizer with the new tokens
    plan: VocabPlan  # the plan as applied: init and fixed untrained rows filled in


def expand_vocab(
    model,
    tok,
    plan: VocabPlan,
    init: str = "mean",
    *,
    fix_untrained: bool = False,
    seed: int = 0,
    donate: bool = True,
) -> Expansion:
    """Grow `model` and `tok` as planned.

    Rows not in the plan stay bit-identical. Planned rows (reserved slots, spare and new rows,
    padding, with fix_untrained the untrained rows) get `init` from statistics over trained rows
    only, each table in one jitted, sharded call.

    Args:
      model: the Llama; tok: its Tokenizer; plan: from `plan_vocab` (one made without `model=`
        is re-fitted to the model's real row count).
      init: mean | mean-noise | covariance | subword | random | zeros.
      fix_untrained: also re-initialise rows the model never trained.
      seed: for the random inits.
      donate: consume `model`'s tables (default): peak memory stays the model plus one new table,
        and the consumed model raises an error if used again. donate=False leaves `model` intact
        at the cost of holding both tables.
    Returns:
      Expansion(model, tokenizer, plan): new objects; the plan has its init and fixed rows filled in.
    Example:
      >>> model, tok, plan = expand_vocab(model, tok, plan_vocab(tok, ["<think>"], model=model))
    """
    check_live(model)
    plan = fitted(plan, model, tok)
    _check_size(model, plan)
    _check_plan(model, tok, plan)
    stats = model_stats(model)  # one pass per table: untrained rows and the mean
    plan, targets, trained, texts = _layout(model, tok, plan, init, fix_untrained, stats)
    new_tok = tok.with_tokens(plan.renamed, plan.appended, plan.special_ids)
    vocab_axis = axis_size(model_mesh(model), "vocab")
    if plan.new_rows % vocab_axis:
        warnings.warn(
            f"{plan.new_rows} rows do not divide the mesh's vocab axis ({vocab_axis}); the tables will be "
            f"replicated along it. Plan with model=model or pad_to_multiple_of={vocab_axis}",
            stacklevel=2,
        )
    new_model = _rewrite(model, targets, trained, texts, tok, init, plan.new_rows, seed, donate, stats)
    return Expansion(new_model, new_tok, plan)


def fix_untrained(model, ids, init: str = "mean", *, tok=None, seed: int = 0, donate: bool = True):
    """Re-initialise rows `ids` like new rows.

    Statistics skip these ids, every other untrained row and, with `tok`, padding rows.

    Args:
      model: the Llama; ids: rows to rewrite (e.g. `find_untrained(model, tok)`).
      init: as in `expand_vocab`; tok: the tokenizer (subword init, padding rows); seed: random inits.
      donate: consume `model`'s tables (default), as in `expand_vocab`.
    Returns:
      A new Llama (to record the fixed rows in a plan, use `expand_vocab(..., fix_untrained=True)`).
    Example:
      >>> model = fix_untrained(model, find_untrained(model, tok), tok=tok)
    """
    check_live(model)
    _check_init(init)
    targets = np.asarray(sorted({int(i) for i in ids}), np.int64)
    rows = model.config.vocab_size
    if targets.size and (targets[0] < 0 or targets[-1] >= rows):
        raise VocabError(f"untrained ids must lie in [0, {rows}); got {int(targets[0])}..{int(targets[-1])}")
    stats = model_stats(model) if init not in ("random", "zeros") and targets.size else None
    untrained = untrained_mask(model, stats=stats) if stats else np.zeros(rows, bool)
    limit = min(rows, tok.n_words) if tok is not None else rows
    trained = _trained(untrained, limit, targets)
    texts = [tok.id_to_piece(int(i)) if tok is not None and i < tok.n_words else None for i in targets]
    return _rewrite(model, targets, trained, texts, tok, init, rows, seed, donate, stats)
