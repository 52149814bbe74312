"""Write the tokenizer files of an edited checkpoint so HF / Meta loaders see the planned ids.

Only the added-token tables are edited: model.vocab and merges stay identical, because the
BPE part of the vocabulary never changes and any drift there would silently re-tokenize data.
Every file is read and written through `carried` (allow-listed keys only, never byte-copied).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from jaxvocab.errors import CheckpointError, VocabError
from jaxvocab.io import carried
from jaxvocab.tokenizer import ROLE_KEYS

EDITED = ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")


def _read(path: str):
    return carried.read_json(path)


def _write(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(carried.dumps(os.path.basename(path), obj))


def _entry(i: int, text: str, special: bool) -> dict:
    # normalized=False even for plain tokens: jaxvocab matches added text verbatim, HF must too.
    return {
        "id": i,
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _text(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _replace_names(obj, old_to_new: dict[str, str]):
    """Rename reserved tokens inside additional_special_tokens-style lists."""
    if isinstance(obj, list):
        return [_replace_names(v, old_to_new) for v in obj]
    if isinstance(obj, dict) and "content" in obj:
        return {**obj, "content": old_to_new.get(obj["content"], obj["content"])}
    if isinstance(obj, str):
        return old_to_new.get(obj, obj)
    return obj


class TokenizerEdit(NamedTuple):
    """One vocabulary edit of the tokenizer files: which ids get which text."""

    renamed: dict[int, str]  # reserved slot id -> new text
    appended: dict[int, str]  # new id -> text
    special_ids: set[int]  # the new ids that are control tokens

    @property
    def new(self) -> dict[int, str]:
        return {**self.renamed, **self.appended}


class SourceFiles(NamedTuple):
    """The editable tokenizer files of a checkpoint dir, parsed; None where a file is absent."""

    src_dir: str
    tokenizer: dict | None  # tokenizer.json
    config: dict | None  # tokenizer_config.json
    added: dict | None  # added_tokens.json
    special_map: dict | None  # special_tokens_map.json

    def current(self) -> tuple[dict[int, str], dict[str, int]]:
        """(id -> text of every added token over all tables, the BPE vocab text -> id)."""
        cur: dict[int, str] = {}
        base_vocab: dict[str, int] = {}
        if self.tokenizer is not None:
            if not isinstance(self.tokenizer.get("model"), dict):
                raise CheckpointError(f"{self.src_dir}/tokenizer.json: no model section; re-export it")
            v = self.tokenizer["model"].get("vocab") or {}
            base_vocab = (
                v if isinstance(v, dict) else {(p[0] if isinstance(p, list) else p): i for i, p in enumerate(v)}
            )
            cur.update({int(e["id"]): e["content"] for e in self.tokenizer.get("added_tokens") or []})
        if self.config is not None:
            cur.update({int(k): _text(e) for k, e in (self.config.get("added_tokens_decoder") or {}).items()})
        if self.added is not None:
            cur.update({int(i): t for t, i in self.added.items()})
        return cur, base_vocab


def read_source(src_dir) -> SourceFiles:
    """Parse the editable tokenizer files of `src_dir` (through `carried`, allow-listed keys only)."""
    src_dir = os.fspath(src_dir)
    present = {n for n in EDITED if os.path.isfile(os.path.join(src_dir, n))}
    if not present & {"tokenizer.json", "tokenizer_config.json"}:
        raise CheckpointError(
            f"{src_dir}: no tokenizer.json / tokenizer_config.json to add the new tokens to; "
            "point at the checkpoint's tokenizer directory"
        )
    files = [_read(os.path.join(src_dir, n)) if n in present else None for n in EDITED]
    return SourceFiles(src_dir, *files)


def validate(src: SourceFiles, edit: TokenizerEdit, vocab_size: int) -> dict[str, str]:
    """Refuse an edit the files cannot take; returns the renames as old text -> new text."""
    renamed, appended, d = edit.renamed, edit.appended, src.src_dir
    if set(renamed) & set(appended):
        raise VocabError(f"ids {sorted(set(renamed) & set(appended))} are both renamed and appended; plan each id once")
    texts = list(edit.new.values())
    if any(not isinstance(t, str) or not t for t in texts) or len(set(texts)) != len(texts):
        raise VocabError("new token texts must be non-empty and distinct; fix the vocabulary plan")
    cur, base_vocab = src.current()
    missing = [i for i in renamed if i not in cur]
    if missing:
        raise VocabError(
            f"{d}: id {missing[0]} is not an added/reserved token in the tokenizer files; rename only reserved slots"
        )
    old_to_new = {cur[i]: t for i, t in renamed.items()}
    roles = {k: _text(src.config.get(k)) for k in ROLE_KEYS} if src.config else {}
    in_use = [f"{k}={v}" for k, v in roles.items() if v in old_to_new]
    if in_use:
        raise VocabError(
            f"{d}/tokenizer_config.json: renamed slot is in use ({', '.join(in_use)}); pick another reserved slot"
        )
    base_ids = set(base_vocab.values())
    for i in appended:
        if i in cur or i in base_ids:
            raise VocabError(
                f"{d}: appended id {i} is already taken by {cur.get(i, 'a vocab token')!r}; append after the last id"
            )
    after = {**cur, **edit.new}
    kept_texts = {t for i, t in after.items() if i not in edit.new}
    clash = [t for t in texts if t in kept_texts or (t in base_vocab and base_vocab[t] not in edit.new)]
    if clash:
        raise VocabError(f"{d}: new tokens {clash[:5]} already exist in the tokenizer; choose other text")
    all_ids = base_ids | set(after)
    size = max(max(all_ids, default=-1) + 1, len(all_ids))
    if size > vocab_size:
        raise VocabError(
            f"{d}: edited tokenizer would have {size} ids but the model has "
            f"vocab_size={vocab_size}; resize the embeddings or drop tokens"
        )
    return old_to_new


def edit_tokenizer_json(tj: dict, edit: TokenizerEdit) -> dict:
    """tokenizer.json with renamed entries re-texted and appended ones added, in id order."""
    entries = []
    for e in tj.get("added_tokens") or []:
        i = int(e["id"])
        entries.append({**_entry(i, edit.renamed[i], i in edit.special_ids), "id": e["id"]} if i in edit.renamed else e)
    entries += [_entry(i, t, i in edit.special_ids) for i, t in sorted(edit.appended.items())]
    entries.sort(key=lambda e: int(e["id"]))
    return {**tj, "added_tokens": entries}


def edit_tokenizer_config(tc: dict, edit: TokenizerEdit, old_to_new: dict[str, str]) -> dict:
    """tokenizer_config.json: added_tokens_decoder entries for every new id; renamed names in lists."""
    dec = dict(tc.get("added_tokens_decoder") or {})
    for i, t in sorted(edit.new.items()):
        e = _entry(i, t, i in edit.special_ids)
        del e["id"]
        dec[str(i)] = e
    tc = {**tc, "added_tokens_decoder": dict(sorted(dec.items(), key=lambda kv: int(kv[0])))}
    for k in ("additional_special_tokens", "extra_special_tokens"):
        if k in tc:
            tc[k] = _replace_names(tc[k], old_to_new)
    return tc


def edit_added_tokens(at: dict, edit: TokenizerEdit, old_to_new: dict[str, str]) -> dict:
    """added_tokens.json (text -> id) with renames applied and appended tokens added."""
    at = {old_to_new.get(t, t): i for t, i in at.items()}
    at.update({t: i for i, t in edit.appended.items()})
    return at


def edit_special_tokens_map(m: dict, old_to_new: dict[str, str]) -> dict:
    """special_tokens_map.json with renamed reserved names in its additional_* lists."""
    return {k: _replace_names(v, old_to_new) if k.startswith("additional") else v for k, v in m.items()}


def write_tokenizer_files(
    src_dir, out_dir, renamed: dict[int, str], appended: dict[int, str], special_ids: set[int], vocab_size: int
) -> list[str]:
    """Write `src_dir`'s tokenizer files, edited to map the planned ids, into `out_dir`.

    Args:
      src_dir: the checkpoint dir holding tokenizer.json and/or tokenizer_config.json.
      out_dir: where the edited files go (created if needed).
      renamed: reserved slot id -> new token text.
      appended: new id -> token text.
      special_ids: the new ids that are control tokens (special=True).
      vocab_size: the model's rows; the edited tokenizer may not have more ids.

    Returns:
      The names of the files written.

    Example:
      >>> write_tokenizer_files(src, out, plan.renamed, plan.appended, plan.special_ids, plan.new_rows)
      ['tokenizer.json', 'tokenizer_config.json']
    """
    edit = TokenizerEdit(
        {int(k): v for k, v in renamed.items()},
        {int(k): v for k, v in appended.items()},
        {int(i) for i in special_ids},
    )
    src = read_source(src_dir)
    old_to_new = validate(src, edit, vocab_size)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    editors = {
        "tokenizer.json": lambda tj: edit_tokenizer_json(tj, edit),
        "tokenizer_config.json": lambda tc: edit_tokenizer_config(tc, edit, old_to_new),
        "added_tokens.json": lambda at: edit_added_tokens(at, edit, old_to_new),
        "special_tokens_map.json": lambda m: edit_special_tokens_map(m, old_to_new),
    }
    written = []
    for name, parsed in zip(EDITED, (src.tokenizer, src.config, src.added, src.special_map), strict=True):
        if parsed is not None:
            _write(os.path.join(out_dir, name), editors[name](parsed))
            written.append(name)
    return written
