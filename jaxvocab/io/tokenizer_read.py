"""Read a checkpoint's tokenizer files into a `Tokenizer`: Meta's tiktoken tokenizer.model or HF's
tokenizer.json, with the added tokens and roles of tokenizer.json / tokenizer_config.json.

The two formats are checked against each other (and HF `tokenizers`) in tests rather than trusted:
a tokenizer.json is only used for text encoding when its BPE and pre-tokenizer are Llama-3's.
"""

from __future__ import annotations

import binascii
import logging
import os

from jaxvocab.errors import CheckpointError, read_json
from jaxvocab.tokenizer import BYTE_DECODER, LLAMA3_PATTERN, LLAMA31_SPECIALS, N_BASE, Tokenizer

log = logging.getLogger(__name__)


def _added_from_files(d: str, tj: dict | None = None) -> tuple[dict[int, str], dict, set[str]]:
    """added_tokens of tokenizer.json overlaid by tokenizer_config.json's added_tokens_decoder.

    Also returns the texts flagged special=False: HF matches those in plain text, so must we.
    """
    out: dict[int, str] = {}
    plain: dict[int, bool] = {}
    cfg = {}
    tc = os.path.join(d, "tokenizer_config.json")
    if tj is None and os.path.isfile(os.path.join(d, "tokenizer.json")):
        # Only this member: HF writes it before the 128k-entry model, so a few kB are decoded, not
        # 9 MB (0.12 s of an import that plans new tokens).
        tj = {"added_tokens": read_json(os.path.join(d, "tokenizer.json"), member="added_tokens")}
    if tj is not None:
        for e in tj.get("added_tokens") or []:
            try:
                out[int(e["id"])] = e["content"]
                plain[int(e["id"])] = e.get("special") is False
            except (KeyError, TypeError, ValueError) as ex:
                raise CheckpointError(
                    f"{d}/tokenizer.json: malformed added_tokens entry {e!r}; fix or re-download it"
                ) from ex
    if os.path.isfile(tc):
        cfg = read_json(tc)
        for k, e in (cfg.get("added_tokens_decoder") or {}).items():
            try:
                out[int(k)] = e["content"] if isinstance(e, dict) else str(e)
                plain[int(k)] = isinstance(e, dict) and e.get("special") is False
            except (KeyError, ValueError) as ex:
                raise CheckpointError(f"{tc}: malformed added_tokens_decoder entry {k!r}; fix it") from ex
    return out, cfg, {t for i, t in out.items() if plain.get(i)}


def _cfg_token(cfg: dict, key: str) -> str | None:
    v = cfg.get(key)
    return v.get("content") if isinstance(v, dict) else v


def _overlay(default: dict[str, int], from_files: dict[int, str]) -> dict[str, int]:
    by_id = {i: t for t, i in default.items()}
    by_id.update(from_files)
    claimed = set(from_files.values())
    by_id = {i: t for i, t in by_id.items() if i in from_files or t not in claimed}
    return {t: i for i, t in by_id.items()}


_PARSED: dict[tuple, dict[bytes, int]] = {}  # file identity -> ranks; the last two files parsed


def _load_tiktoken_model(path: str) -> dict[bytes, int]:
    """The rank table of a tiktoken file, parsed once per file version: an import that adds tokens
    reads the same 128k-line file three times (planning, the export check, the carried copy), at
    ~0.4 s a parse. The table is shared read-only, as Tokenizer copies already share it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e}); check the path") from e
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _PARSED:
        if len(_PARSED) >= 2:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = _parse_tiktoken(path)
    return _PARSED[key]


def _parse_tiktoken(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e}); check the path") from e
    decode = binascii.a2b_base64  # base64.b64decode(validate=True) without its wrapper: 40% of the parse
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[decode(tok, strict_mode=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise CheckpointError(
                f"{path}:{n}: not a tiktoken 'base64 rank' line (SentencePiece model?); "
                "use a Llama-3 tokenizer.model or a tokenizer.json"
            ) from e
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not 0..n-1; re-download tokenizer.model")
    return ranks


def _from_tiktoken(path: str, llama_version: str | None = None) -> Tokenizer:
    ranks = _load_tiktoken_model(path)
    d = os.path.dirname(path)
    from_files, cfg, plain = _added_from_files(d)
    if from_files:
        specials = _overlay(LLAMA31_SPECIALS if len(ranks) == N_BASE else {}, from_files)
        log.info("%s: special tokens taken from tokenizer.json/tokenizer_config.json beside it", path)
    elif len(ranks) == N_BASE:
        # A Meta dir: the names its generated tokenizer.json will carry (3.0 or 3.1+, from params.json).
        from jaxvocab.io.meta_tokenizer import meta_specials, meta_version

        version = meta_version(d or ".", llama_version)
        specials = meta_specials(version)
        log.info("%s: no tokenizer.json beside it; using Meta's Llama-%s special-token names", path, version)
    else:
        raise CheckpointError(
            f"{path}: {len(ranks)} ranks is not Llama-3's {N_BASE} and no tokenizer.json "
            "names its special tokens; put tokenizer.json beside it"
        )
    return Tokenizer(
        ranks,
        specials,
        source="tiktoken",
        added_plain=plain & set(specials),
        bos_text=_cfg_token(cfg, "bos_token"),
        eos_text=_cfg_token(cfg, "eos_token"),
    )


def _is_llama3_pretok(pre) -> bool:
    if not isinstance(pre, dict):
        return False
    seq = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex") for p in seq or [] if p.get("type") == "Split"]
    byte = [p for p in seq or [] if p.get("type") == "ByteLevel"]
    return regexes == [LLAMA3_PATTERN] and len(byte) == 1 and not byte[0].get("use_regex", True)


def _from_hf_json(path: str) -> Tokenizer:
    j = read_json(path)
    model = j.get("model") if isinstance(j, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise CheckpointError(f"{path}: no model.vocab; not a HF tokenizer.json, re-export it")
    vocab = model["vocab"]
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {(v[0] if isinstance(v, list) else v): i for i, v in enumerate(vocab)}
    ranks: dict[bytes, int] = {}
    byte_level = True
    for piece, i in vocab.items():
        try:
            b = bytes(BYTE_DECODER[c] for c in piece)
        except KeyError:
            byte_level, b = False, piece.encode("utf-8")
        ranks.setdefault(b, int(i))
    from_files, cfg, plain = _added_from_files(os.path.dirname(path), j)
    reason = ""
    if model.get("type") != "BPE" or not byte_level:
        reason = "not a byte-level BPE"
    elif not _is_llama3_pretok(j.get("pre_tokenizer")):
        reason = "pre-tokenizer regex differs from Llama-3's"
    elif sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        reason = "vocab ids are not a contiguous rank table"
    else:
        # tiktoken ranks a merge by the id of its result; HF applies merges in list order. They
        # agree iff results appear in non-decreasing id order along the merges list.
        prev = -1
        for m in model.get("merges") or []:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            r = vocab.get(a + b)
            if r is None or r < prev:
                reason = f"merge {a!r}+{b!r} out of rank order"
                break
            prev = r
    if reason:
        log.info("%s: loaded for planning only (%s)", path, reason)
    return Tokenizer(
        ranks,
        {t: i for i, t in from_files.items()},
        source="hf-json",
        added_plain=plain,
        llama3=not reason,
        not_llama3_reason=reason,
        bos_text=_cfg_token(cfg, "bos_token"),
        eos_text=_cfg_token(cfg, "eos_token"),
    )


def load_tokenizer(path, llama_version: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint dir (or one tokenizer file).

    Args:
      path: a checkpoint dir (HF, Meta or jaxvocab), or tokenizer.json / tokenizer.model.
      llama_version: '3.0' / '3.1' names the special tokens of a bare Meta tokenizer.model
        (default: from params.json beside it).

    Returns:
      The `Tokenizer`; a tokenizer.json that is not Llama-3's BPE loads for planning only. Loaded from
      a dir, it carries that dir's files (`tok.files`) for the writers.

    Example:
      >>> tok = load_tokenizer("Llama-3.2-1B")
      >>> save_hf(model, "out", tokenizer=tok, plan=plan)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from jaxvocab.io.carried import CarriedFiles

        return _load_dir(path, llama_version).with_files(CarriedFiles.of(path))
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name == "tokenizer_config.json":
            return load_tokenizer(os.path.dirname(path) or ".")
        if name.endswith(".json"):
            return _from_hf_json(path)
        return _from_tiktoken(path, llama_version)
    raise CheckpointError(f"{path}: no such tokenizer file or directory; check the path")


def _load_dir(path: str, llama_version: str | None) -> Tokenizer:
    tm, tj = os.path.join(path, "tokenizer.model"), os.path.join(path, "tokenizer.json")
    if os.path.isfile(tm):
        try:
            return _from_tiktoken(tm, llama_version)
        except CheckpointError:
            if not os.path.isfile(tj):
                raise
            log.info("%s: not tiktoken format, falling back to tokenizer.json", tm)
    if os.path.isfile(tj):
        return _from_hf_json(tj)
    raise CheckpointError(
        f"{path}: has neither tokenizer.model nor tokenizer.json; copy the tokenizer files into the checkpoint dir"
    )
