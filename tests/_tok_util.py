"""Helpers for tokenizer tests: locate the real Llama-3 files, independent reference encoders."""

from __future__ import annotations

import base64
import hashlib
import json
import os

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3 Instruct chat template (3.0 release); the bundled tokenizer_config.json has none.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def reference_tiktoken(model_path: str):
    """tiktoken built straight from tokenizer.model, the way Meta's llama3 repo does it."""
    import tiktoken

    ranks = {}
    with open(model_path, "rb") as f:
        for line in f.read().splitlines():
            if line:
                tok, r = line.split()
                ranks[base64.b64decode(tok)] = int(r)
    return tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


def meta_encode(enc, s: str) -> list[int]:
    """Meta's long-text chunking (llama3/tokenizer.py), written out independently."""
    out = []
    for i in range(0, len(s), 400_000):
        chunk = s[i : i + 400_000]
        start, run, space = 0, 0, chunk[:1].isspace()
        pieces = []
        for j, ch in enumerate(chunk):
            sp = ch.isspace()
            if sp != space:
                run, space = 1, sp
            else:
                run += 1
                if run > 25_000:
                    pieces.append(chunk[start:j])
                    start, run = j, 1
        pieces.append(chunk[start:])
        for p in pieces:
            out.extend(enc.encode_ordinary(p))
    return out


def dir_hashes(d: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(d):
        for n in files:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = hashlib.sha256(f.read()).hexdigest()
    return out


def build_gpt2_style(out_dir: str) -> dict[str, int]:
    """A tiny byte-level BPE with specials at ids 0..2 (GPT-2 / RoBERTa layout); returns specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog"] * 50 + ["hello world, tokenizers are fun"] * 50
    tok.train_from_iterator(text, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in specials}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for s, i in ids.items()
        },
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return ids
