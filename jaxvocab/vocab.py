"""Grow a Llama vocabulary: plan the ids, find untrained rows, initialise and grow the tables.

    plan = plan_vocab(tok, ["<|lang_xx|>", "<think>"], model=model)
    model, tok = expand_vocab(model, tok, plan, init="mean")

Planning is host-only and cheap; it decides every id before any weight moves, so the plan can be
printed, reviewed and written beside the checkpoint (vocab_plan.json) to travel through training
and export. New tokens first take free `<|reserved_special_token_N|>` slots (no resize), then the
model's spare padding rows, then new rows; the table is padded to a multiple the mesh can shard.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxvocab.errors import JaxVocabError, UsageError, VocabError
from jaxvocab.row_init import INITS, REL_EPS, TableStats, expand_table, model_stats, no_subword, tables, untrained_mask
from jaxvocab.sharding import axis_size, round_up, single_device_mesh
from jaxvocab.tokenizer import ROLE_KEYS

ACTIONS = ("existing", "reserved", "spare_row", "appended")
MIN_SHARDED_MULTIPLE = 128  # rows on a multi-device mesh: MXU/tensor-core friendly and shardable


@dataclasses.dataclass
class PlannedToken:
    token: str
    id: int
    action: str  # one of ACTIONS
    replaces: str | None = None  # the reserved name a "reserved" token renames
    special: bool = False  # control token (matched only when allowed) vs plain text
    description: str | None = None  # text whose tokenization seeds the "subword" init


@dataclasses.dataclass
class VocabPlan:
    """Every id decision of one vocabulary edit; JSON-able so it travels with the checkpoint."""

    tokens: list[PlannedToken]
    old_rows: int  # model rows before
    new_rows: int  # model rows after padding
    tokenizer_size_before: int
    tokenizer_size_after: int
    pad_to_multiple_of: int
    padding_ids: list[int]  # rows with no token after the edit
    unbacked_ids: list[int] = dataclasses.field(default_factory=list)  # tokenizer ids the old model had no row for
    untrained_fixed: list[int] = dataclasses.field(default_factory=list)
    init: str | None = None
    version: int = 1

    @property
    def renamed(self) -> dict[int, str]:
        return {t.id: t.token for t in self.tokens if t.action == "reserved"}

    @property
    def appended(self) -> dict[int, str]:
        return {t.id: t.token for t in self.tokens if t.action in ("spare_row", "appended")}

    @property
    def special_ids(self) -> set[int]:
        return {t.id for t in self.tokens if t.special and t.action != "existing"}

    @property
    def reinit_ids(self) -> list[int]:
        """Every row an expansion writes: reused slots, new rows (tokens and padding), fixed rows."""
        reused = [t.id for t in self.tokens if t.action in ("reserved", "spare_row")]
        return sorted(set(reused) | set(range(self.old_rows, self.new_rows)) | set(self.untrained_fixed))

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        tokens = d.pop("tokens")
        lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in d.items()]
        lines.append(
            '  "tokens": ['
            + ",".join("\n    " + json.dumps(t, ensure_ascii=False) for t in tokens)
            + ("\n  ]" if tokens else "]")
        )
        return "{\n" + ",\n".join(lines) + "\n}"

    @classmethod
    def from_json(cls, text: str) -> VocabPlan:
        try:
            d = json.loads(text)
            tokens = [PlannedToken(**t) for t in d.pop("tokens")]
            plan = cls(tokens=tokens, **d)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise VocabError(f"vocab_plan.json is malformed ({e}); re-create it with plan_vocab") from None
        if any(t.action not in ACTIONS for t in plan.tokens):
            raise VocabError(f"vocab_plan.json: actions must be among {', '.join(ACTIONS)}")
        return plan

    def applied_in(self, tokenizer_dir) -> bool:
        """Whether the tokenizer files in `tokenizer_dir` already map every new token to its id
        (a checkpoint saved after the expansion), so export must copy rather than re-edit them."""
        from jaxvocab.tokenizer import load_tokenizer

        new = {**self.renamed, **self.appended}
        try:
            have = load_tokenizer(tokenizer_dir).special_tokens
        except JaxVocabError:  # unreadable files are write_tokenizer_files' error to report
            return False
        return all(have.get(t) == i for i, t in new.items())

    def table(self) -> str:
        """The plan as the CLI prints it."""
        rows = [("token", "id", "action", "note")]
        for t in self.tokens:
            note = {
                "existing": "already one token: no new row",
                "reserved": f"renames {t.replaces}",
                "spare_row": "takes an unused padding row",
                "appended": "new row",
            }[t.action]
            if t.special and t.action != "existing":
                note += ", special"
            if t.description:
                note += f", subword init from {t.description!r}"
            rows.append((json.dumps(t.token, ensure_ascii=False)[1:-1], str(t.id), t.action, note))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        out = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
        counts = {a: sum(t.action == a for t in self.tokens) for a in ACTIONS}
        out.append(
            f"{len(self.tokens)} token(s): {counts['existing']} existing, {counts['reserved']} in reserved "
            f"slots, {counts['spare_row']} in spare rows, {counts['appended']} appended"
        )
        out.append(
            f"rows {self.old_rows} -> {self.new_rows} (multiple of {self.pad_to_multiple_of}, "
            f"{len(self.padding_ids)} padding), tokenizer {self.tokenizer_size_before} -> "
            f"{self.tokenizer_size_after}" + (f", init {self.init}" if self.init else "")
        )
        if self.unbacked_ids:
            out.append(
                f"{len(self.unbacked_ids)} tokenizer id(s) had no model row and get initialised rows: "
                f"{self.unbacked_ids[:5]}"
            )
        if self.untrained_fixed:
            out.append(f"{len(self.untrained_fixed)} untrained row(s) re-initialised")
        return "\n".join(out)


# ------------------------------------------------------------------------------------ planning
def _requests(new_tokens) -> list[tuple[str, str | None]]:
    items = list(new_tokens.items()) if isinstance(new_tokens, Mapping) else [(t, None) for t in new_tokens]
    seen: set[str] = set()
    for text, desc in items:
        if not isinstance(text, str):
            raise VocabError(f"new token {text!r} is not a string; pass token texts")
        if not text:
            raise VocabError("a new token is the empty string; remove it from the token list")
        if not text.strip():
            raise VocabError(f"new token {text!r} is only whitespace; such added tokens break text matching, drop it")
        if text in seen:
            raise VocabError(f"new token {text!r} is listed twice; list each token once")
        if desc is not None and (not isinstance(desc, str) or not desc.strip()):
            raise VocabError(f"description of {text!r} must be non-empty text")
        seen.add(text)
    return items


def existing_id(tok, text: str) -> int | None:
    """The id `text` already has as a single token, if any. Llama-3 tokenizers decide by encoding
    (so 'hello' is existing too); other tokenizers can only be asked for an exact entry."""
    if text in tok.special_tokens:
        return tok.special_tokens[text]
    if tok.llama3:
        ids = tok.encode(text, allowed_special="all")
        return ids[0] if len(ids) == 1 else None
    return tok.mergeable_ranks.get(text.encode("utf-8"))


def model_mesh(model) -> Mesh:
    sharding = getattr(model.embed.get_value(), "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else single_device_mesh()


def default_multiple(model) -> int:
    """What the model's mesh needs: its vocab axis size, and at least 128 on a multi-device mesh."""
    if model is None:
        return 1
    return mesh_multiple(model_mesh(model))


def mesh_multiple(mesh: Mesh) -> int:
    """The row multiple a table on `mesh` is padded to (see default_multiple), known before loading."""
    need = axis_size(mesh, "vocab")
    return math.lcm(need, MIN_SHARDED_MULTIPLE) if mesh.size > 1 else need


def _roles_in_use(model) -> set[str]:
    """Token texts tokenizer_config.json gives a role (a pad token parked on a reserved slot)."""
    src = getattr(model, "source_dir", None) if model is not None else None
    path = os.path.join(src, "tokenizer_config.json") if src else ""
    if not path or not os.path.isfile(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return set()
    vals = [cfg.get(k) for k in ROLE_KEYS]
    return {v.get("content") if isinstance(v, dict) else v for v in vals if v}


def looks_special(text: str) -> bool:
    """`<|...|>` tokens: llama.cpp types them CONTROL whatever the files say, so they default to
    special (transformers, vLLM and llama.cpp then agree); every other new token defaults to plain."""
    return len(text) > 4 and text.startswith("<|") and text.endswith("|>")


def _flagged(texts: list[str], special) -> set[str]:
    """special: "auto" (`<|...|>` only), True / False (all / none), texts to flag (only those), or
    {text: bool} overriding "auto" per token."""
    if special == "auto":
        return {t for t in texts if looks_special(t)}
    if isinstance(special, bool):
        return set(texts) if special else set()
    if isinstance(special, Mapping):
        if not all(isinstance(v, bool) for v in special.values()):
            raise UsageError("special={text: bool}: give True (special) or False (plain) per token")
        return {t for t in texts if special.get(t, looks_special(t))} | {t for t, v in special.items() if v}
    if isinstance(special, str):
        raise UsageError(f"special={special!r}: use 'auto', True, False, a list of texts or {{text: bool}}")
    return set(special or ())


ReuseReserved = Literal["all", "special", "none"]
_REUSE_MODES = {"all": "all", "special": "special", "none": "none", True: "all", False: "none"}


def _reuse_mode(reuse_reserved) -> str:
    """The Literal mode; True / False (the older spelling) keep their meaning: "all" / "none"."""
    if isinstance(reuse_reserved, (bool, str)) and reuse_reserved in _REUSE_MODES:
        return _REUSE_MODES[reuse_reserved]
    raise UsageError(
        f"reuse_reserved={reuse_reserved!r}: use 'all', 'special' or 'none' (True / False mean all / none)"
    )


def plan_vocab(
    tok,
    new_tokens,
    reuse_reserved: ReuseReserved | bool = "all",
    pad_to_multiple_of: int | None = None,
    model=None,
    *,
    special: bool | str | Iterable[str] | Mapping[str, bool] = "auto",
) -> VocabPlan:
    """Decide the id of every requested token.

    new_tokens: texts, or {text: description or None} (a description seeds the subword init).
    reuse_reserved: "all" (default: every new token may take a free reserved slot), "none" (append
    all), or "special" (only control tokens take reserved slots, which Llama-3 declares special
    anyway; plain words are appended). True / False are still accepted and mean "all" / "none".
    special: which new tokens are control tokens (special=True in the tokenizer files; vLLM and
    transformers drop them from decoded output by default): "auto" (default: `<|...|>` tokens),
    True / False (all / none), the texts to flag, or {text: bool} overriding "auto" per token.
    model: gives the current row count (spare padding rows are used before growing) and the mesh
    (default padding); without it the model is assumed to have exactly the tokenizer's rows.
    """
    reuse = _reuse_mode(reuse_reserved)
    requests = _requests(new_tokens)
    flagged = _flagged([t for t, _ in requests], special)
    if pad_to_multiple_of is not None and (
        isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
    ):
        raise UsageError(f"--pad-to-multiple-of {pad_to_multiple_of!r}: give a positive integer")
    multiple = pad_to_multiple_of or default_multiple(model)
    old_rows = model.config.vocab_size if model is not None else tok.n_words
    have_ids = {text: existing_id(tok, text) for text, _ in requests}
    # Slots a role or the request itself keeps (asking for "<|reserved_special_token_5|>") stay.
    kept = _roles_in_use(model) | {t for t, i in have_ids.items() if i is not None}
    reserved = [i for i in tok.free_reserved() if tok.id_to_piece(i) not in kept] if reuse != "none" else []
    next_id = tok.n_words
    tokens: list[PlannedToken] = []
    for text, desc in requests:
        have = have_ids[text]
        if have is not None:
            if desc:
                warnings.warn(f"token {text!r} already exists as id {have}; its description is ignored", stacklevel=2)
            tokens.append(PlannedToken(text, int(have), "existing", special=tok.is_special(have)))
            continue
        if reserved and (reuse == "all" or text in flagged):
            i = reserved.pop(0)
            tokens.append(PlannedToken(text, i, "reserved", tok.id_to_piece(i), text in flagged, desc))
            continue
        action = "spare_row" if next_id < old_rows else "appended"
        tokens.append(PlannedToken(text, next_id, action, None, text in flagged, desc))
        next_id += 1
    unknown = flagged - {t for t, _ in requests}
    if unknown:
        raise VocabError(
            f"special tokens {sorted(unknown)[:3]} are not among the new tokens; flag only requested tokens"
        )
    size_after = next_id
    new_rows = round_up(max(old_rows, size_after), multiple)
    unbacked = list(range(old_rows, tok.n_words))
    if unbacked:
        warnings.warn(
            f"the tokenizer has {len(unbacked)} id(s) beyond the model's {old_rows} rows (first: "
            f"{tok.id_to_piece(unbacked[0])!r}); the expansion gives them initialised rows",
            stacklevel=2,
        )
    return VocabPlan(
        tokens=tokens,
        old_rows=old_rows,
        new_rows=new_rows,
        tokenizer_size_before=tok.n_words,
        tokenizer_size_after=size_after,
        pad_to_multiple_of=multiple,
        padding_ids=list(range(size_after, new_rows)),
        unbacked_ids=unbacked,
    )


# ---------------------------------------------------------------------------- untrained rows
def find_untrained(model, tok=None, *, rel_eps: float = REL_EPS, include_padding: bool = False) -> list[int]:
    """Sorted ids of untrained rows.

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
    stats: list[TableStats] | None = None,
):
    """Write `targets` (sorted) of every table with `init`, growing to `new_rows`, in place.
    With `stats` (the pass that found the untrained rows), a mean init reads no table again."""
    if init in ("mean", "mean-noise", "covariance", "subword") and not trained.any():
        raise VocabError("the model has no trained rows to take statistics from; use --init random or zeros")
    if len(targets) == 0:
        return model
    mesh = model_mesh(model)
    subword = subword_arrays(tok, texts, trained, init)
    for n, param in enumerate(tables(model)):
        new = expand_table(
            param.get_value(),
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
        )
        param.set_value(new.block_until_ready())
        if new_rows != model.config.vocab_size:
            # The old table is unreferenced now, but arrays built by make_array_from_callback (the
            # loaders) can keep their buffers in reference cycles: collect them before the next
            # table grows, so peak memory stays at the model plus one new table.
            gc.collect()
    if new_rows != model.config.vocab_size:
        model.config = model.config.replace(vocab_size=new_rows)
    return model


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


def expansion_layout(model, tok, plan: VocabPlan, init: str = "mean", fix_untrained: bool = False) -> ExpansionLayout:
    """The rows an expansion of `model` by `plan` writes, and the trained rows it reads.

    Args:
      model: the `Llama` before the expansion.
      tok: its tokenizer (the one `plan` was made for).
      plan: from `plan_vocab`.
      init: one of INITS.
      fix_untrained: also rewrite the untrained rows the model already has.

    Returns:
      An `ExpansionLayout` (the plan with init and untrained_fixed filled in, target ids, trained mask, texts).

    Example:
      >>> layout = expansion_layout(model, tok, plan_vocab(tok, ["<x>"], model=model))
    """
    if plan.old_rows != model.config.vocab_size:
        raise VocabError(
            f"the plan was made for {plan.old_rows} model rows but the model has "
            f"{model.config.vocab_size}; re-plan with plan_vocab(..., model=model)"
        )
    return _layout(model, tok, plan, init, fix_untrained, model_stats(model))


def _layout(model, tok, plan: VocabPlan, init: str, fix_untrained: bool, stats: list[TableStats]) -> ExpansionLayout:
    """expansion_layout over the first `stats[0].rows` rows: all of them, or those a model loaded
    at the plan's final size read from its checkpoint."""
    if plan.tokenizer_size_before != tok.n_words:
        raise VocabError(
            f"the plan was made for a tokenizer of {plan.tokenizer_size_before} ids but this one has "
            f"{tok.n_words}; re-plan with this tokenizer"
        )
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
    """Refuse a plan whose tables cannot exist (ids past int32) or fit (checked before allocating)."""
    if plan.new_rows >= 2**31:
        raise UsageError(
            f"the plan grows the vocabulary to {plan.new_rows} rows, past the int32 token ids; "
            "use a smaller --pad-to-multiple-of"
        )
    from jaxvocab.memory import check_fits

    grow = plan.new_rows - model.config.vocab_size
    if grow <= 0:
        return
    ts = tables(model)
    row = model.config.hidden_size * ts[0].get_value().dtype.itemsize
    # Peak: the model plus one new table being written, then every table larger by `grow` rows.
    check_fits(
        plan.new_rows * row + grow * row * (len(ts) - 1),
        model_mesh(model),
        f"growing the vocabulary to {plan.new_rows} rows",
        "use a smaller --pad-to-multiple-of or fewer tokens",
    )


def expand_vocab(model, tok, plan: VocabPlan, init: str = "mean", *, fix_untrained: bool = False, seed: int = 0):
    """Grow `model` (in place; also returned) and `tok` as planned. Returns (model, new tokenizer).

    Rows not in the plan stay bit-identical. Planned rows (reserved slots, spare and new rows,
    padding, with fix_untrained the untrained rows) get `init` from statistics over trained rows
    only. Each table is grown by one jitted call that donates the old table, so peak memory is
    the model plus one new table: keep a host copy if you need the old tables.
    `model.vocab_plan` records the plan with its init.
    """
    _check_size(model, plan)
    if plan.old_rows != model.config.vocab_size:
        expansion_layout(model, tok, plan)  # raises the re-plan error
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
    _rewrite(model, targets, trained, texts, tok, init, plan.new_rows, seed, stats)
    model.vocab_plan = plan.to_json()
    return model, new_tok


def expand_loaded(model, tok, plan: VocabPlan, init: str = "mean", *, fix_untrained: bool = False, seed: int = 0):
    """`expand_vocab` for a model read straight into the plan's final-size tables
    (`load(src, vocab_rows=plan.new_rows)`, rows past the checkpoint zero): the planned rows are
    written in place, no table is copied to grow it. Returns (model, new tokenizer).

    Args:
      model: loaded with `vocab_rows=plan.new_rows`; its first `plan.old_rows` rows are the checkpoint's.
      tok: the checkpoint's tokenizer, which `plan` was made for.
      plan: from `plan_vocab(tok, tokens, model=...)` on the checkpoint's row count.
      init, fix_untrained, seed: as in `expand_vocab`.

    Returns:
      (model, tokenizer), as `expand_vocab` returns them; rows and ids are identical to its result.

    Example:
      >>> plan = plan_vocab(tok, ["<x>"], model=abstract_model)
      >>> model, tok = expand_loaded(load(src, vocab_rows=plan.new_rows), tok, plan)
    """
    if model.config.vocab_size != plan.new_rows:
        raise VocabError(
            f"expand_loaded needs the model loaded at the plan's {plan.new_rows} rows, not "
            f"{model.config.vocab_size}; load it with vocab_rows=plan.new_rows or use expand_vocab"
        )
    stats = model_stats(model, rows=plan.old_rows)
    plan, targets, trained, texts = _layout(model, tok, plan, init, fix_untrained, stats)
    new_tok = tok.with_tokens(plan.renamed, plan.appended, plan.special_ids)
    _rewrite(model, targets, trained, texts, tok, init, plan.new_rows, seed, stats)
    model.vocab_plan = plan.to_json()
    return model, new_tok


def fix_untrained(model, ids, init: str = "mean", *, tok=None, seed: int = 0):
    """Re-initialise rows `ids` (e.g. `find_untrained(model, tok)`) in place like new rows; returns
    the model. Statistics skip these ids, every other untrained row and, with `tok`, padding rows."""
    _check_init(init)
    targets = np.asarray(sorted({int(i) for i in ids}), np.int64)
    rows = model.config.vocab_size
    if targets.size and (targets[0] < 0 or targets[-1] >= rows):
        raise VocabError(f"untrained ids must lie in [0, {rows}); got {int(targets[0])}..{int(targets[-1])}")
    if targets.size == 0:
        return model
    stats = model_stats(model) if init not in ("random", "zeros") else None
    untrained = untrained_mask(model, stats=stats) if stats else np.zeros(rows, bool)
    limit = min(rows, tok.n_words) if tok is not None else rows
    trained = _trained(untrained, limit, targets)
    texts = [tok.id_to_piece(int(i)) if tok is not None and i < tok.n_words else None for i in targets]
    _rewrite(model, targets, trained, texts, tok, init, rows, seed, stats)
    if getattr(model, "vocab_plan", None):
        plan = VocabPlan.from_json(model.vocab_plan)
        plan.untrained_fixed = sorted(set(plan.untrained_fixed) | {int(i) for i in targets})
        model.vocab_plan = plan.to_json()
    return model
