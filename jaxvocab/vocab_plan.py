"""Vocabulary plans: every id decision of one edit, made on the host before any weight moves.

    plan = plan_vocab(tok, ["<|lang_xx|>", "<think>"], model=model)
    print(plan.summary())

Planning is cheap; the plan can be printed, reviewed and written beside the checkpoint
(vocab_plan.json; `jaxvocab.load_plan` reads it back) to travel through training and export. New
tokens first take free `<|reserved_special_token_N|>` slots (no resize), then the model's spare
padding rows, then new rows; the table is padded to a multiple the mesh can shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Literal

from jax.sharding import Mesh

from jaxvocab.errors import JaxVocabError, UsageError, VocabError
from jaxvocab.row_stats import model_mesh
from jaxvocab.sharding import axis_size, round_up

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

    def summary(self, limit: int | None = None) -> str:
        """The plan as the CLI prints it: a row per token (the first `limit`, when given), then totals."""
        rows = [("token", "id", "action", "note")]
        for t in self.tokens[:limit]:
            note = {
                "existing": "already one token: no new row",
                "reserved": f"renames {t.replaces}",
                "spare_row": "takes an unused padding row",
                "appended": "new row",
            }[t.action]
            if t.special and t.action != "existing":
                note += ", special"
            if t.description:
                used = self.init == "subword"
                note += (
                    f", subword init from {t.description!r}"
                    if used
                    else f", described {t.description!r} (init subword uses it)"
                )
            plain = t.token.isprintable() and t.token == t.token.strip()  # else quoted, so nothing hides
            rows.append((t.token if plain else json.dumps(t.token, ensure_ascii=False), str(t.id), t.action, note))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        out = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
        if len(self.tokens) > len(rows) - 1:
            out.append(f"... {len(self.tokens) - len(rows) + 1} more token(s), every one listed in vocab_plan.json")
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
    rank = tok.mergeable_ranks.get(text.encode("utf-8"))
    if rank is None:  # every token BPE can output is a rank entry: no encoding needed (most new tokens)
        return None
    if tok.llama3:
        ids = tok.encode(text, allowed_special="all")
        return ids[0] if len(ids) == 1 else None
    return rank


def default_multiple(model) -> int:
    """What the model's mesh needs: its vocab axis size, and at least 128 on a multi-device mesh."""
    if model is None:
        return 1
    return mesh_multiple(model_mesh(model))


def mesh_multiple(mesh: Mesh) -> int:
    """The row multiple a table on `mesh` is padded to (see default_multiple), known before loading."""
    need = axis_size(mesh, "vocab")
    return math.lcm(need, MIN_SHARDED_MULTIPLE) if mesh.size > 1 else need


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
    """Decide the id of every requested token (host only; no weight moves).

    Args:
      tok: the Tokenizer; the slots its files give a role (`tok.role_tokens`: a pad token parked
        on a reserved slot) stay taken.
      new_tokens: texts, or {text: description or None} (a description seeds the subword init).
      reuse_reserved: "all" (default: every new token may take a free reserved slot), "none"
        (append all), or "special" (only control tokens take reserved slots, which Llama-3 declares
        special anyway; plain words are appended). True / False mean "all" / "none".
      pad_to_multiple_of: row multiple (default: what the model's mesh needs, else 1).
      model: gives the current row count (spare padding rows are used before growing) and the mesh.
        Without it the plan assumes the tokenizer's row count, and `expand_vocab` re-fits it to the
        rows the model it is given really has.
      special: which new tokens are control tokens (special=True in the tokenizer files; vLLM and
        transformers drop them from decoded output by default): "auto" (default: `<|...|>` tokens),
        True / False (all / none), the texts to flag, or {text: bool} overriding "auto" per token.
    Returns:
      The VocabPlan (print `plan.summary()`; it travels as vocab_plan.json).
    Example:
      >>> plan = plan_vocab(tok, ["<|lang_xx|>", "<think>"], model=model)
    """
    reuse = _reuse_mode(reuse_reserved)
    requests = _requests(new_tokens)
    flagged = _flagged([t for t, _ in requests], special)
    if pad_to_multiple_of is not None and (
        isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
    ):
        raise UsageError(f"--pad-to-multiple-of {pad_to_multiple_of!r}: give a positive integer")
    unknown = flagged - {t for t, _ in requests}
    if unknown:
        raise VocabError(
            f"special tokens {sorted(unknown)[:3]} are not among the new tokens; flag only requested tokens"
        )
    tokens, size_after = _assign(tok, requests, flagged, reuse)
    old_rows = model.config.vocab_size if model is not None else tok.n_words
    return fit_rows(tokens, tok, size_after, old_rows, pad_to_multiple_of or default_multiple(model))


def _assign(tok, requests, flagged: set[str], reuse: str) -> tuple[list[PlannedToken], int]:
    """Each request's id: its existing one, a free reserved slot, or the next new id; and the size after."""
    have_ids = {text: existing_id(tok, text) for text, _ in requests}
    # Slots a role or the request itself keeps (asking for "<|reserved_special_token_5|>") stay.
    kept = tok.role_tokens | {t for t, i in have_ids.items() if i is not None}
    reserved = [i for i in tok.free_reserved() if tok.id_to_piece(i) not in kept] if reuse != "none" else []
    next_id = tok.n_words
    tokens: list[PlannedToken] = []
    for text, desc in requests:
        have = have_ids[text]
        if have is not None:
            if desc:
                warnings.warn(f"token {text!r} already exists as id {have}; its description is ignored", stacklevel=3)
            tokens.append(PlannedToken(text, int(have), "existing", special=tok.is_special(have)))
        elif reserved and (reuse == "all" or text in flagged):
            i = reserved.pop(0)
            tokens.append(PlannedToken(text, i, "reserved", tok.id_to_piece(i), text in flagged, desc))
        else:  # "spare_row" or "appended": fit_rows decides from the model's row count
            tokens.append(PlannedToken(text, next_id, "appended", None, text in flagged, desc))
            next_id += 1
    return tokens, next_id


def fit_rows(tokens: list[PlannedToken], tok, size_after: int, old_rows: int, multiple: int) -> VocabPlan:
    """The plan of `tokens` for a model of `old_rows` rows: which new ids take spare padding rows,
    how many rows the tables grow to (a multiple of `multiple`), the padding and unbacked ids."""
    tokens = [
        t
        if t.action in ("existing", "reserved")
        else dataclasses.replace(t, action="spare_row" if t.id < old_rows else "appended")
        for t in tokens
    ]
    new_rows = round_up(max(old_rows, size_after), multiple)
    unbacked = list(range(old_rows, tok.n_words))
    if unbacked:
        warnings.warn(
            f"the tokenizer has {len(unbacked)} id(s) beyond the model's {old_rows} rows (first: "
            f"{tok.id_to_piece(unbacked[0])!r}); the expansion gives them initialised rows",
            stacklevel=3,
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
