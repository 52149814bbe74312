"""Write the tokenizer files of an edited checkpoint so HF / Meta loaders see the planned ids.

Only the added-token tables are edited: model.vocab and merges stay identical, because the
BPE part of the vocabulary never changes and any drift there would silently re-tokenize data.
Every file is read and written through `carried` (allow-listed keys only, never byte-copied).
"""

from __future__ import annotations

import os

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


def write_tokenizer_files(
    src_dir, out_dir, renamed: dict[int, str], appended: dict[int, str], special_ids: set[int], vocab_size: int
) -> list[str]:
    src_dir, out_dir = os.fspath(src_dir), os.fspath(out_dir)
    renamed = {int(k): v for k, v in renamed.items()}
    appended = {int(k): v for k, v in appended.items()}
    special_ids = {int(i) for i in special_ids}
    present = [n for n in EDITED if os.path.isfile(os.path.join(src_dir, n))]
    if not any(n in present for n in ("tokenizer.json", "tokenizer_config.json")):
        raise CheckpointError(
            f"{src_dir}: no tokenizer.json / tokenizer_config.json to add the new tokens to; "
            "point at the checkpoint's tokenizer directory"
        )
    new = {**renamed, **appended}
    if set(renamed) & set(appended):
        raise VocabError(f"ids {sorted(set(renamed) & set(appended))} are both renamed and appended; plan each id once")
    texts = list(new.values())
    if any(not isinstance(t, str) or not t for t in texts) or len(set(texts)) != len(texts):
        raise VocabError("new token texts must be non-empty and distinct; fix the vocabulary plan")

    tj = _read(os.path.join(src_dir, "tokenizer.json")) if "tokenizer.json" in present else None
    tc = _read(os.path.join(src_dir, "tokenizer_config.json")) if "tokenizer_config.json" in present else None
    at = _read(os.path.join(src_dir, "added_tokens.json")) if "added_tokens.json" in present else None

    # Current id -> text of added tokens, from every table that has them.
    cur: dict[int, str] = {}
    base_vocab: dict[str, int] = {}
    if tj is not None:
        if not isinstance(tj.get("model"), dict):
            raise CheckpointError(f"{src_dir}/tokenizer.json: no model section; re-export it")
        v = tj["model"].get("vocab") or {}
        base_vocab = v if isinstance(v, dict) else {(p[0] if isinstance(p, list) else p): i for i, p in enumerate(v)}
        cur.update({int(e["id"]): e["content"] for e in tj.get("added_tokens") or []})
    if tc is not None:
        cur.update({int(k): _text(e) for k, e in (tc.get("added_tokens_decoder") or {}).items()})
    if at is not None:
        cur.update({int(i): t for t, i in at.items()})
    base_ids = set(base_vocab.values())

    for i in renamed:
        if i not in cur:
            raise VocabError(
                f"{src_dir}: id {i} is not an added/reserved token in the tokenizer files; rename only reserved slots"
            )
    old_to_new = {cur[i]: t for i, t in renamed.items()}
    roles = {k: _text(tc.get(k)) for k in ROLE_KEYS} if tc else {}
    in_use = [f"{k}={v}" for k, v in roles.items() if v in old_to_new]
    if in_use:
        raise VocabError(
            f"{src_dir}/tokenizer_config.json: renamed slot is in use ({', '.join(in_use)}); pick another reserved slot"
        )
    for i in appended:
        if i in cur or i in base_ids:
            raise VocabError(
                f"{src_dir}: appended id {i} is already taken by {cur.get(i, 'a vocab token')!r}; "
                "append after the last id"
            )
    after = {**cur, **new}
    kept_texts = {t for i, t in after.items() if i not in new}
    clash = [t for t in texts if t in kept_texts or (t in base_vocab and base_vocab[t] not in new)]
    if clash:
        raise VocabError(f"{src_dir}: new tokens {clash[:5]} already exist in the tokenizer; choose other text")
    all_ids = base_ids | set(after)
    size = max(max(all_ids, default=-1) + 1, len(all_ids))
    if size > vocab_size:
        raise VocabError(
            f"{src_dir}: edited tokenizer would have {size} ids but the model has "
            f"vocab_size={vocab_size}; resize the embeddings or drop tokens"
        )

    os.makedirs(out_dir, exist_ok=True)
    written = []
    if tj is not None:
        entries = []
        for e in tj.get("added_tokens") or []:
            i = int(e["id"])
            entries.append({**_entry(i, new[i], i in special_ids), "id": e["id"]} if i in renamed else e)
        entries += [_entry(i, t, i in special_ids) for i, t in sorted(appended.items())]
        entries.sort(key=lambda e: int(e["id"]))
        tj["added_tokens"] = entries
        _write(os.path.join(out_dir, "tokenizer.json"), tj)
        written.append("tokenizer.json")
    if tc is not None:
        dec = dict(tc.get("added_tokens_decoder") or {})
        for i, t in sorted(new.items()):
            e = _entry(i, t, i in special_ids)
            del e["id"]
            dec[str(i)] = e
        tc["added_tokens_decoder"] = dict(sorted(dec.items(), key=lambda kv: int(kv[0])))
        for k in ("additional_special_tokens", "extra_special_tokens"):
            if k in tc:
                tc[k] = _replace_names(tc[k], old_to_new)
        _write(os.path.join(out_dir, "tokenizer_config.json"), tc)
        written.append("tokenizer_config.json")
    if at is not None:
        at = {old_to_new.get(t, t): i for t, i in at.items()}
        at.update({t: i for i, t in appended.items()})
        _write(os.path.join(out_dir, "added_tokens.json"), at)
        written.append("added_tokens.json")
    if "special_tokens_map.json" in present:
        m = _read(os.path.join(src_dir, "special_tokens_map.json"))
        m = {k: _replace_names(v, old_to_new) if k.startswith("additional") else v for k, v in m.items()}
        _write(os.path.join(out_dir, "special_tokens_map.json"), m)
        written.append("special_tokens_map.json")
    return written
