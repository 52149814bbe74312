"""What a run trains: the checkpoint's tokenizer as the data should see it, and --trainable's ids."""

from __future__ import annotations

import json
from pathlib import Path

from jaxvocab.errors import UsageError, malformed


def tokenizer_of(model_dir, plan=None):
    """The checkpoint's own tokenizer, or None when it ships none (then data must be pre-tokenized).

    The tokens the vocab plan added are what this run teaches, so the returned tokenizer (a new
    one) matches them wherever they appear in the data's text and chat content, special or not;
    the model's older control tokens (<|eot_id|>, ...) stay literal text, so data cannot inject
    them by accident.
    """
    src = Path(model_dir)
    if not any((src / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        return None
    from jaxvocab.tokenizer import load_tokenizer

    with malformed(f"{src}: tokenizer.json / tokenizer_config.json", "fix or re-download the tokenizer files"):
        tok = load_tokenizer(src)
    if plan is None:
        return tok
    return tok.with_plain(
        t.token for t in plan.tokens if t.action != "existing" and tok.special_tokens.get(t.token) == t.id
    )


def resolve_trainable(spec: str, model, tok, plan=None) -> list[int]:
    """--trainable value -> sorted ids.

    Args:
      spec: new | untrained | new+untrained | ids:1,2,3 | tokens:@file.txt | none (see train/flags.py EPILOG).
      model: the Llama (untrained rows); tok: its tokenizer (tokens:@file); plan: its VocabPlan (new).
    Returns:
      The sorted ids to train.
    Example:
      >>> resolve_trainable("new+untrained", model, tok, jaxvocab.load_plan(ckpt))
    """
    from jaxvocab.rows import check_ids, new_ids

    if spec == "none":
        return []
    if spec.startswith("ids:"):
        try:
            ids = {int(x) for x in spec[4:].split(",") if x.strip()}
        except ValueError:
            raise UsageError(f"--trainable {spec!r}: expected ids:1,2,3 (integers)") from None
    elif spec.startswith("tokens:"):
        ids = set(_token_file_ids(spec, tok))
    else:
        ids = set()
        for part in spec.split("+"):
            if part == "new":
                if plan is None:
                    raise UsageError(
                        "--trainable new: the checkpoint has no vocab_plan.json (its vocabulary was not "
                        "expanded by jaxvocab); pass --trainable ids:... or tokens:@file.txt"
                    )
                ids |= set(new_ids(plan))
            elif part == "untrained":
                from jaxvocab.vocab import find_untrained

                ids |= set(find_untrained(model, tok))
            else:
                raise UsageError(
                    f"--trainable {spec!r}: expected new, untrained, new+untrained, ids:1,2,3 or tokens:@file.txt"
                )
    if not ids and spec.startswith(("ids:", "tokens:")):
        raise UsageError(f"--trainable {spec}: lists no ids; give at least one")
    if not ids:
        raise UsageError(
            f"--trainable {spec}: nothing new or untrained in this checkpoint; pass --trainable ids:... or tokens:@file.txt"
        )
    if model is None:
        return sorted(ids)
    try:
        return check_ids(ids, model.config.vocab_size).tolist()
    except UsageError as e:
        fix = "ids start at 0" if min(ids) < 0 else "expand the vocabulary first (jaxvocab-convert import --add-tokens)"
        raise UsageError(f"--trainable {spec}: {e}; {fix}") from None


def _token_file_ids(spec: str, tok) -> list[int]:
    name = spec[len("tokens:") :]
    if not name.startswith("@"):
        raise UsageError(f"--trainable {spec!r}: expected tokens:@file.txt (a file with one token per line)")
    path = Path(name[1:])
    if tok is None:
        raise UsageError(
            f"--trainable {spec}: the checkpoint has no tokenizer files to look tokens up in; pass --trainable ids:..."
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"--trainable {spec}: cannot read {path} ({e.strerror})") from None
    ids = []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        if text.startswith('"'):  # a JSON string, as in --add-tokens files: ' Paris' keeps its space
            try:
                text = json.loads(text.strip())
            except json.JSONDecodeError as e:
                raise UsageError(f"--trainable {spec}: {path}:{n}: not a quoted JSON string ({e.msg})") from None
        if text in tok.special_tokens:
            ids.append(tok.special_tokens[text])
            continue
        enc = tok.encode(text)
        if len(enc) != 1:
            raise UsageError(
                f"--trainable {spec}: {path}:{n}: {text!r} is {len(enc)} tokens, not one; "
                "list single tokens of the (expanded) tokenizer"
            )
        ids.append(enc[0])
    return ids
