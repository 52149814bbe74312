"""Llama-3 tokenizer on tiktoken, loadable from Meta's tokenizer.model or HF's tokenizer.json.

Planning a vocabulary edit needs the exact id -> text map of a checkpoint, and training needs
encodings identical to what the model saw in pre-training; both loaders are therefore checked
against each other (and HF `tokenizers`) in tests rather than trusted.
"""

from __future__ import annotations

import re

import tiktoken

from jaxvocab.errors import VocabError

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
        """Token ids of `text`, exactly as Meta's encoder cuts it (over-long runs included).

        Args:
          text: the text.
          bos, eos: prepend <|begin_of_text|> / append the end-of-text id.
          allowed_special: control tokens matched in `text` ("all" or texts); the rest encode as
            plain text, so data cannot inject control tokens. Plain added tokens always match.

        Returns:
          The ids.

        Example:
          >>> tok.encode("hello", bos=True)
          [128000, 15339]
        """
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
        """The text of `ids` (control tokens spelled out).

        Args:
          ids: token ids, each in this tokenizer.

        Returns:
          The text.

        Example:
          >>> tok.decode(tok.encode("hello"))
          'hello'
        """
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
        """Ids of the `<|reserved_special_token_N|>` slots still free for new tokens.

        Returns:
          Sorted ids.

        Example:
          >>> tok.free_reserved()[:2]
          [128002, 128003]
        """
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
        marks control tokens, every other new token is matched in plain text. This one is unchanged.

        Args:
          renamed: reserved slot id -> new text.
          appended: new id (>= n_words) -> text.
          special: the new ids that are control tokens.

        Returns:
          The new `Tokenizer`.

        Example:
          >>> tok2 = tok.with_tokens({128002: "<think>"}, {128256: "</think>"}, {128002, 128256})"""
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
        return self._copy(special_tokens=st, added=added, added_plain=plain)

    def with_files(self, files) -> Tokenizer:
        """The same tokenizer, carrying `files` (an io.carried.CarriedFiles, or None)."""
        return self._copy(files=files)

    def with_plain(self, texts) -> Tokenizer:
        """A new tokenizer that also matches `texts` (added tokens) in plain text."""
        return self._copy(added_plain=self.added_plain | set(texts))

    def _copy(self, **changes) -> Tokenizer:
        kw = dict(
            special_tokens=self.special_tokens,
            source=self.source,
            llama3=self.llama3,
            pattern=self.pattern,
            not_llama3_reason=self.not_llama3_reason,
            added=self._added,
            added_plain=self.added_plain,
            files=self.files,
            **self._role_texts,
        )
        return Tokenizer(self.mergeable_ranks, **(kw | changes))

    @property
    def role_tokens(self) -> set[str]:
        """Texts the tokenizer files give a role (bos, eos, pad, ...); empty without carried files."""
        return self.files.roles() if self.files is not None else set()


def __getattr__(name):
    """`load_tokenizer` lives in jaxvocab.io.tokenizer_read beside the other readers; the old import
    path keeps working (resolved on use, so this module never imports io)."""
    if name == "load_tokenizer":
        from jaxvocab.io.tokenizer_read import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
