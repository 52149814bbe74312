"""Files carried from a source dir into an output: a fixed allow-list, each parsed and re-written.

A user may publish what jaxvocab writes, so nothing foreign rides along: only the names below are
carried (LICENSE, README, original/ and everything else are ignored), each is read through links,
parsed, and re-written with only the keys that file is known to have. A listed file that does not
parse is an error naming it; nothing is ever byte-copied.

`CarriedFiles` names what travels: the loaders hand it out (`load_tokenizer(path).files`,
`CarriedFiles.of(path)`) and the writers take it (`save_hf(model, out, tokenizer=tok)`), so no
writer finds its inputs through a path stored on the model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxvocab.errors import CheckpointError
from jaxvocab.tokenizer import ROLE_KEYS

_TOKENIZER_JSON = (
    "version",
    "truncation",
    "padding",
    "added_tokens",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "model",
)
_ADDED_TOKEN = ("id", "content", "single_word", "lstrip", "rstrip", "normalized", "special")
_TOKENIZER_CONFIG = ROLE_KEYS + (
    "added_tokens_decoder",
    "additional_special_tokens",
    "extra_special_tokens",
    "chat_template",
    "add_bos_token",
    "add_eos_token",
    "add_prefix_space",
    "clean_up_tokenization_spaces",
    "legacy",
    "model_input_names",
    "model_max_length",
    "padding_side",
    "truncation_side",
    "split_special_tokens",
    "tokenizer_class",
    "use_default_system_prompt",
    "spaces_between_special_tokens",
    "do_lower_case",
)
_GENERATION = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "num_beams",
    "max_length",
    "max_new_tokens",
    "min_length",
    "no_repeat_ngram_size",
    "length_penalty",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "return_dict_in_generate",
    "_from_model_config",
    "transformers_version",
)
# name -> the top-level keys it is known to have (None: not a JSON object, parsed by its own rule)
ALLOWED = {
    "tokenizer.json": _TOKENIZER_JSON,
    "tokenizer_config.json": _TOKENIZER_CONFIG,
    "special_tokens_map.json": ROLE_KEYS + ("additional_special_tokens",),
    "generation_config.json": _GENERATION,
    "added_tokens.json": None,
    "vocab.json": None,
    "merges.txt": None,
    "chat_template.jinja": None,
    "tokenizer.model": None,
    "vocab_plan.json": None,
}


def _bad(path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; fix or remove the file (jaxvocab carries only files it can parse)")


def _token(v):
    """A role or added token: its text, or an AddedToken-style object with the known keys only."""
    if isinstance(v, dict):
        return {k: v[k] for k in _ADDED_TOKEN if k in v}
    return v


def _object(path, obj, keys: tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        raise _bad(path, "expected a JSON object")
    out = {k: obj[k] for k in keys if k in obj}
    for k in ROLE_KEYS:
        if k in out:
            out[k] = _token(out[k])
    if isinstance(out.get("added_tokens"), list):
        out["added_tokens"] = [_token(e) for e in out["added_tokens"]]
    if isinstance(out.get("added_tokens_decoder"), dict):
        out["added_tokens_decoder"] = {str(k): _token(e) for k, e in out["added_tokens_decoder"].items()}
    return out


def _str_to_int(path, obj) -> dict:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and type(v) is int for k, v in obj.items()):
        raise _bad(path, "expected a JSON object of token -> integer id")
    return obj


def _text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(path, f"cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    if "\0" in text:
        raise _bad(path, "contains NUL bytes")
    return text


def _json(path: Path):
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise _bad(path, f"invalid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None


def _merges(path: Path) -> str:
    lines = _text(path).splitlines()
    body = lines[1:] if lines and lines[0].startswith("#version") else lines
    if any(len(line.split(" ")) != 2 for line in body if line):
        raise _bad(path, "expected one 'left right' merge per line")
    return "\n".join(lines) + "\n"


def _jinja(path: Path) -> str:
    text = _text(path)
    try:
        import jinja2.sandbox
    except ImportError:  # transformers needs jinja2 to render it; without it we check text only
        return text
    try:
        jinja2.sandbox.ImmutableSandboxedEnvironment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise _bad(path, f"not a Jinja template ({e.message}, line {e.lineno})") from None
    return text


def _tiktoken(path: Path) -> str:
    import base64

    from jaxvocab.io.tokenizer_read import _load_tiktoken_model

    ranks = _load_tiktoken_model(str(path))
    return "".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def parse(path):
    """Allow-listed file `path` (read through links) parsed and cleaned to its known keys: a dict for
    JSON files, text otherwise; or an error naming it."""
    path = Path(path)
    name = path.name
    if name not in ALLOWED:
        raise CheckpointError(f"{path}: not a file jaxvocab carries (allowed: {', '.join(ALLOWED)})")
    if name == "merges.txt":
        return _merges(path)
    if name == "chat_template.jinja":
        return _jinja(path)
    if name == "tokenizer.model":
        return _tiktoken(path)
    obj = _json(path)
    if name == "vocab_plan.json":
        from jaxvocab.errors import VocabError
        from jaxvocab.vocab import VocabPlan

        try:
            return VocabPlan.from_json(json.dumps(obj)).to_json() + "\n"
        except VocabError:
            raise _bad(path, "not a vocabulary plan jaxvocab wrote") from None
    return _str_to_int(path, obj) if ALLOWED[name] is None else _object(path, obj, ALLOWED[name])


def dumps(name: str, obj) -> str:
    """JSON as written into outputs; tokenizer.json (megabytes) compact, through the C encoder."""
    return json.dumps(obj, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2) + "\n"


def read(path) -> str:
    """The re-written text of allow-listed file `path`."""
    obj = parse(path)
    return obj if isinstance(obj, str) else dumps(Path(path).name, obj)


def read_json(path) -> dict:
    """An allow-listed JSON file as the cleaned object `read` would write."""
    obj = parse(path)
    if not isinstance(obj, dict):
        raise _bad(path, "expected a JSON object")
    return obj


def carry(src, out: Path, names=tuple(ALLOWED), dest: dict[str, str] | None = None) -> list[str]:
    """Parse and re-write each allow-listed `names` file present in `src` into `out` (skipping any
    already written there); `dest` renames (tokenizer.model -> original/tokenizer.model)."""
    if not src:
        return []
    written = []
    for name in names:
        f = Path(src) / name
        target = out / (dest or {}).get(name, name)
        if not f.is_file() or target.exists():
            continue
        text = read(f)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(str(target.relative_to(out)))
    return written


@dataclasses.dataclass(frozen=True)
class CarriedFiles:
    """The files that travel beside the weights of one checkpoint dir: tokenizer files, chat
    template, generation config (the allow-list above). Read lazily, parsed when written.

    Example:
      >>> files = CarriedFiles.of("Llama-3.2-1B")
      >>> save_hf(model, "out", tokenizer=files)   # or tokenizer=load_tokenizer(path): its .files
    """

    source: Path

    @classmethod
    def of(cls, path) -> CarriedFiles | None:
        """The carrier of checkpoint dir `path` (None when `path` is None or not a dir)."""
        if path is None or not Path(path).is_dir():
            return None
        return cls(Path(path))

    @property
    def is_meta(self) -> bool:
        """A Meta source (bare tokenizer.model + params.json): HF tokenizer files are generated."""
        from jaxvocab.io.meta_tokenizer import is_meta_tokenizer_dir

        return is_meta_tokenizer_dir(self.source)

    def roles(self) -> set[str]:
        """Token texts tokenizer_config.json gives a role (bos, eos, pad, ...): slots planning keeps."""
        path = self.source / "tokenizer_config.json"
        if not path.is_file():
            return set()
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        if not isinstance(cfg, dict):
            return set()
        vals = [cfg.get(k) for k in ROLE_KEYS]
        return {v.get("content") if isinstance(v, dict) else v for v in vals if v}

    def write(self, out: Path, dest: dict[str, str] | None = None) -> list[str]:
        """Parse and re-write every carried file present into `out` (see `carry`)."""
        return carry(self.source, out, dest=dest)
