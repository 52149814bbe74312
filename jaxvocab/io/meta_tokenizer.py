"""The HF tokenizer files of a Meta source: what a Llama-3 HF repo has, generated from tokenizer.model.

Meta ships only the tiktoken `tokenizer.model`; transformers, vLLM and llama.cpp need `tokenizer.json`
(byte-level BPE + Llama-3 pre-tokenizer + `<|begin_of_text|>` post-processor), `tokenizer_config.json`
and `special_tokens_map.json`. The BPE part comes from transformers' own tiktoken converter (the one
that produced the official HF repos); the 256 special tokens get Meta's names for 3.0 or 3.1+.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxvocab.errors import CheckpointError, UsageError
from jaxvocab.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIALS, LLAMA31_SPECIALS

VERSIONS = ("3.0", "3.1")
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Meta's dialog format: bos, then per message a role header, the trimmed content and <|eot_id|>.
CHAT_TEMPLATE_30 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# 3.1+: tool results are the `ipython` role, and a message may end with <|eom_id|> (a tool call awaiting its result).
CHAT_TEMPLATE_31 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    "{{- '<|eom_id|>' if message.get('end') == 'eom' else '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def is_meta_tokenizer_dir(path) -> bool:
    """A Meta source: params.json and a tokenizer.model, without HF tokenizer files."""
    p = Path(path)
    return (
        (p / "params.json").is_file()
        and (p / "tokenizer.model").is_file()
        and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    )


def meta_version(path, version: str | None = None) -> str:
    """'3.0' or '3.1': the flag if given, else params.json's use_scaled_rope (3.1+ always sets it)."""
    if version is not None:
        if version not in VERSIONS:
            raise UsageError(f"--llama-version {version!r}: choose one of {', '.join(VERSIONS)}")
        return version
    f = Path(path) / "params.json"
    try:
        params = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "3.1"
    return "3.1" if isinstance(params, dict) and params.get("use_scaled_rope") else "3.0"


def meta_specials(version: str) -> dict[str, int]:
    return dict(LLAMA31_SPECIALS if version == "3.1" else LLAMA3_SPECIALS)


def _entry(text: str) -> dict:
    return {
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def tokenizer_json(model_file: Path, specials: dict[str, int]) -> dict:
    try:
        from tokenizers import AddedToken, processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise CheckpointError(
            f"{model_file}: writing tokenizer.json for a Meta source needs transformers and "
            f"tokenizers ({e}); pip install 'jaxvocab[meta]'"
        ) from None
    # tiktoken caches files by their *path* in /tmp unless told not to; a later file at the same path
    # would be read stale, so caching is off for this one read.
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        tok = TikTokenConverter(vocab_file=str(model_file), pattern=LLAMA3_PATTERN).converted()
    finally:
        if cache is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
    n = tok.get_vocab_size(with_added_tokens=False)
    ordered = sorted(specials.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(n, n + len(ordered))):
        raise CheckpointError(f"{model_file}: {n} ranks do not precede the special ids; not a Llama-3 tokenizer.model")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in ordered])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, specials[bos])]
            ),
        ]
    )
    return json.loads(tok.to_str())


def write_meta_tokenizer_files(src, out: Path, version: str | None = None) -> list[str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for Meta dir `src`, into `out`."""
    src = Path(src)
    version = meta_version(src, version)
    specials = meta_specials(version)
    from jaxvocab.io import carried

    model_file = out / "tokenizer.model.tmp"
    model_file.write_text(carried.read(src / "tokenizer.model"))  # parsed and re-written like every carried file
    try:
        tj = tokenizer_json(model_file, specials)
    finally:
        model_file.unlink()
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    config = {
        "added_tokens_decoder": {str(i): _entry(t) for t, i in sorted(specials.items(), key=lambda kv: kv[1])},
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072 if version == "3.1" else 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE_31 if version == "3.1" else CHAT_TEMPLATE_30,
    }
    for name, obj in zip(FILES, (tj, config, {"bos_token": bos, "eos_token": eos}), strict=True):
        (out / name).write_text(carried.dumps(name, obj), encoding="utf-8")
    return list(FILES)
