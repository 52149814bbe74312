"""Llama-3 tokenizer on tiktoken, loadable from Meta's tokenizer.model or HF's tokenizer.json.

Planning a vocabulary edit needs the exact id -> text map of a checkpoint, and training needs
encodings identical to what the model saw in pre-training; both loaders are therefore checked
against each other (and HF `tokenizers`) in tests rather than trusted.
"""

from __future__ import annotations

import base64
import logging
import os
import re

import tiktoken

from jaxvocab.errors import CheckpointError, VocabError, read_json

log = logging.getLogger(__name__)

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_BASE = 128000
TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # Meta: tiktoken's Rust side slows down / overflows beyond this
MAX_NO_WHITESPACES_CHARS = 25_000  # Meta: longest run of (non-)whitespace handed to the regex
# tokenizer_config.json keys that give a token a role (HF's SPECIAL_TOKENS_ATTRIBUTES, minus the list one)
ROLE_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
_RESERVED = re.compile(r"<\|reserved_special_token_\d+\|>")
_LONG_RUN = re.compile(rf"\s{{{MAX_NO_WHITESPACES_CHARS + 1}}}|\S{{{MAX_NO_WHITESPACES_CHARS + 1}}}")


def _specials(names: list[str]) -> dict[str, int]:
    return {t: N_BASE + i for i, t in enumerate(names)}


# Meta's llama3 repo (3.0): only header/eot tokens are named, the rest are reserved.
LLAMA3_SPECIALS = _specials(
    ["<|begin_of_text|>", "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
)
# HF Llama-3.1 / 3.2 text checkpoints.
LLAMA31_SPECIALS = _specials(
    [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
)
# HF Llama-3.2-Vision: <|step_id|> takes 128005, reserved numbering shifts, <|image|> is appended.
LLAMA32_VISION_SPECIALS = {
    **_specials(
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>",
            "<|step_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ]
        + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
    ),
    "<|image|>": 128256,
}

CHAT_ROLES = ("system", "user", "assistant", "ipython", "tool")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char map, which HF byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_ENCODER = _bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int):
    """Meta's splitter, so that over-long runs are cut at exactly the same places as Meta's encoder."""
    cur_len = 0
    cur_space = s[0].isspace() if s else False
    start = 0
    for i in range(len(s)):
        now_space = s[i].isspace()
        if cur_space ^ now_space:
            cur_len = 1
            cur_space = now_space
        else:
            cur_len += 1
            if cur_len > max_len:
                yield s[start:i]
                start = i
                cur_len = 1
    yield s[start:]


class Tokenizer:
    """id <-> text for a Llama-3 style vocabulary: 128k BPE ranks plus special / added tokens.

    Special and added tokens all live in tiktoken's special table (so each encodes to one id),
    but only those the caller allows -- plus "plain" added tokens, which behave like HF added
    tokens with special=False -- are matched in text; everything else is encoded as ordinary text
    so user data cannot inject control tokens.
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        *,
        source: str,
        llama3: bool = True,
        pattern: str = LLAMA3_PATTERN,
        not_llama3_reason: str = "",
        added: dict[int, str] | None = None,
        added_plain: set[str] | None = None,
        bos_text: str | None = None,
        eos_text: str | None = None,
        files=None,
    ):
        self.mergeable_ranks = mergeable_ranks
        self.files = files  # io.carried.CarriedFiles: the files the writers carry beside the weights
        self.special_tokens = dict(special_tokens)
        self.source = source
        self.llama3 = llama3
        self.pattern = pattern
        self.not_llama3_reason = not_llama3_reason
        self._added = dict(added or {})
        self.added_plain = set(added_plain or ())
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        if len(self._id_to_special) != len(self.special_tokens):
            raise VocabError("two special tokens share one id; fix added_tokens in the tokenizer files")
        ids = list(self.special_tokens.values())
        self.n_words = max(max(mergeable_ranks.values(), default=-1), max(ids, default=-1)) + 1
        st = self.special_tokens
        self.bos_id = st.get("<|begin_of_text|>", st.get(bos_text) if bos_text else None)
        self.eos_id = st.get("<|end_of_text|>", st.get(eos_text) if eos_text else None)
        self.eot_id = st.get("<|eot_id|>")
        self.eom_id = st.get("<|eom_id|>")
        self.stop_ids = [i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None]
        self.pad_id = st.get("<|finetune_right_pad_id|>")
        self._enc = None
        self._pieces = None
        self._role_texts = {"bos_text": bos_text, "eos_text": eos_text}

    # -- lazy state: building tiktoken's CoreBPE over 128k ranks costs ~0.3 s, planning never needs it
    @property
    def enc(self) -> tiktoken.Encoding:
        if self._enc is None:
            if not self.llama3:
                raise VocabError(
                    f"tokenizer from {self.source} is not Llama-3's ({self.not_llama3_reason}); "
                    "text encoding needs the Llama-3 tokenizer; pass pre-tokenized input_ids"
                )
            self._enc = tiktoken.Encoding(
                "jaxvocab-llama3",
                pat_str=self.pattern,
                mergeable_ranks=self.mergeable_ranks,
                special_tokens=self.special_tokens,
            )
        return self._enc

    def _piece_bytes(self, i: int) -> bytes | None:
        if self._pieces is None:
            self._pieces = {r: b for b, r in self.mergeable_ranks.items()}
        return self._pieces.get(i)

    @property
    def added(self) -> dict[int, str]:
        return dict(self._added)

    def __len__(self) -> int:
        return self.n_words

    def encode(self, text: str, bos: bool = False, eos: bool = False, allowed_special=()) -> list[int]:
        if not isinstance(text, str):
            raise VocabError(f"encode() takes str, got {type(text).__name__}; decode bytes first")
        enc = self.enc
        allowed = "all" if allowed_special == "all" else set(allowed_special) | self.added_plain
        out = [self.bos_id] if bos else []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = text[i : i + TIKTOKEN_MAX_ENCODE_CHARS]
            # Fast path: Meta's per-char splitter only cuts when a run is over-long.
            parts = (
                _split_whitespaces_or_nonwhitespaces(chunk, MAX_NO_WHITESPACES_CHARS)
                if _LONG_RUN.search(chunk)
                else (chunk,)
            )
            for part in parts:
                out.extend(enc.encode(part, allowed_special=allowed, disallowed_special=()))
        if eos:
            out.append(self.eos_id)
        return out

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i not in self._id_to_special and self._piece_bytes(i) is None]
        if bad:
            raise VocabError(
                f"token ids {bad[:5]} are not in this tokenizer (n_words={self.n_words}); "
                "check the checkpoint / tokenizer pairing"
            )
        return ids

    def decode(self, ids) -> str:
        ids = self._check_ids(ids)
        if self.llama3:
            return self.enc.decode(ids)
        b = b"".join(self._id_to_special[i].encode() if i in self._id_to_special else self._piece_bytes(i) for i in ids)
        return b.decode("utf-8", errors="replace")

    def id_to_piece(self, i) -> str:
        i = self._check_ids([i])[0]
        if i in self._id_to_special:
            return self._id_to_special[i]
        return self._piece_bytes(i).decode("utf-8", errors="replace")

    def is_special(self, i) -> bool:
        t = self._id_to_special.get(int(i))
        return t is not None and t not in self.added_plain

    def free_reserved(self) -> list[int]:
        return sorted(i for t, i in self.special_tokens.items() if _RESERVED.fullmatch(t))

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Meta's dialog format without the trailing generation header; loss only on replies.

        The assistant's closing <|eot_id|> / <|eom_id|> is trained so the model learns to stop.
        """
        sh, eh = self.special_tokens.get("<|start_header_id|>"), self.special_tokens.get("<|end_header_id|>")
        if None in (sh, eh, self.bos_id, self.eot_id):
            raise VocabError(
                f"tokenizer from {self.source} lacks Llama-3 header/bos/eot tokens; "
                "chat format needs a Llama-3 tokenizer"
            )
        nl2 = self.encode("\n\n")
        ids, mask = [self.bos_id], [0]
        for k, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise VocabError(f"message {k}: role {role!r} is not one of {', '.join(CHAT_ROLES)}; fix the data")
            if not isinstance(content, str):
                raise VocabError(f"message {k}: content must be a string; fix the data")
            eom = m.get("end") == "eom" or m.get("eom") is True
            if eom and self.eom_id is None:
                raise VocabError(
                    f"message {k} ends with eom but the tokenizer has no <|eom_id|>; use a Llama-3.1+ tokenizer"
                )
            head = [sh] + self.encode(role) + [eh] + nl2
            body = self.encode(content.strip()) + [self.eom_id if eom else self.eot_id]
            w = 1 if role == "assistant" else 0
            ids += head + body
            mask += [0] * len(head) + [w] * len(body)
        return ids, mask

    def with_tokens(
        self, renamed: dict[int, str], appended: dict[int, str], special: set[int] | None = None
    ) -> Tokenizer:
        """A new tokenizer with reserved slots renamed and ids appended; `special` (default: none)
        marks control tokens, every other new token is matched in plain text."""
        special = set(special or ())
        st = dict(self.special_tokens)
        editable = set(self.free_reserved()) | set(self._added)
        texts = list(renamed.values()) + list(appended.values())
        if len(set(texts)) != len(texts):
            raise VocabError("duplicate token text in renamed/appended; each new token needs distinct text")
        if any(not isinstance(t, str) or not t for t in texts):
            raise VocabError("a new token text is empty; give every renamed/appended id text")
        for i in renamed:
            if i not in editable:
                raise VocabError(
                    f"id {i} ({self._id_to_special.get(i, 'ordinary token')!r}) is not a free reserved slot; "
                    "pick one from free_reserved()"
                )
            del st[self._id_to_special[i]]
        for i in appended:
            if i < self.n_words:
                raise VocabError(
                    f"appended id {i} is inside the existing vocabulary (n_words={self.n_words}); "
                    "append at ids >= n_words"
                )
        for i, t in list(renamed.items()) + list(appended.items()):
            if t in st:
                raise VocabError(f"token {t!r} already exists as id {st[t]}; choose another text")
            st[t] = int(i)
        added = {**self._added, **{int(i): t for i, t in renamed.items()}, **{int(i): t for i, t in appended.items()}}
        plain = {t for i, t in added.items() if i not in special and (i in renamed or i in appended)}
        plain |= {t for t in self.added_plain if t in st and st[t] not in renamed}
        return Tokenizer(
            self.mergeable_ranks,
            st,
            source=self.source,
            llama3=self.llama3,
            pattern=self.pattern,
            not_llama3_reason=self.not_llama3_reason,
            added=added,
            added_plain=plain,
            files=self.files,
            **self._role_texts,
        )

    def with_files(self, files) -> Tokenizer:
        """The same tokenizer, carrying `files` (an io.carried.CarriedFiles, or None)."""
        return self._copy(files=files)

    def with_plain(self, texts) -> Tokenizer:
        """A new tokenizer that also matches `texts` (added tokens) in plain text."""
        return self._copy(added_plain=self.added_plain | set(texts))

    def _copy(self, **changes) -> Tokenizer:
        kw = dict(
            source=self.source,
            llama3=self.llama3,
            pattern=self.pattern,
            not_llama3_reason=self.not_llama3_reason,
            added=self._added,
            added_plain=self.added_plain,
            files=self.files,
            **self._role_texts,
        )
        return Tokenizer(self.mergeable_ranks, self.special_tokens, **(kw | changes))

    @property
    def role_tokens(self) -> set[str]:
        """Texts the tokenizer files give a role (bos, eos, pad, ...); empty without carried files."""
        return self.files.roles() if self.files is not None else set()


# ----------------------------------------------------------------------------- loading


def _added_from_files(d: str, tj: dict | None = None) -> tuple[dict[int, str], dict, set[str]]:
    """added_tokens of tokenizer.json overlaid by tokenizer_config.json's added_tokens_decoder.

    Also returns the texts flagged special=False: HF matches those in plain text, so must we.
    """
    out: dict[int, str] = {}
    plain: dict[int, bool] = {}
    cfg = {}
    tc = os.path.join(d, "tokenizer_config.json")
    if tj is None and os.path.isfile(os.path.join(d, "tokenizer.json")):
        tj = read_json(os.path.join(d, "tokenizer.json"))
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


def _load_tiktoken_model(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e}); check the path") from e
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except (ValueError, base64.binascii.Error) as e:
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
      A Tokenizer; loaded from a dir, it carries that dir's files (`tok.files`) for the writers.
    Example:
      >>> tok = load_tokenizer("Llama-3.2-1B"); save_hf(model, "out", tokenizer=tok, plan=plan)
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
