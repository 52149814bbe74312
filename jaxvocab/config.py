"""LlamaConfig: the one description of a Llama-3 model that every other module reads.

HF has spelled the same facts three ways over the years (`rope_scaling` with `type` or `rope_type`,
and transformers-5 `rope_parameters` with `rope_theta` folded in). We normalise on the way in and
remember the source dict, so writing back reproduces the user's file rather than our opinion of it.
Anything we would build wrongly (biases, other rope types, other architectures) is refused here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from jaxvocab import errors
from jaxvocab.errors import ConfigError, brief

_TokenIds = int | tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling; the only scaling Llama-3 checkpoints use."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """One Llama-3 architecture. Hashable: it rides in NNX graph definitions, so jit caches on it.

    Example:
        >>> cfg = LlamaConfig.from_hf_file("Llama-3.2-1B")   # or PRESETS["llama-3.2-1b"]
        >>> cfg.replace(vocab_size=128384).num_params()
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: _TokenIds = 128000
    eos_token_id: _TokenIds = 128001
    pad_token_id: _TokenIds = None
    dtype: str = "bfloat16"
    # The config.json we were read from, for a faithful round trip; excluded from eq/hash.
    source: dict | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; fix config.json"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else ((e,) if isinstance(e, int) else tuple(e))

    def replace(self, **changes) -> LlamaConfig:
        """A copy with `changes` applied (e.g. `vocab_size=` after expansion); checks run again."""
        return dataclasses.replace(self, **changes)

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The stacked decoder weights' shapes, [layers, out, in] as torch stores them: the one place
        parameter shapes are written (the model, the key table and `num_params` all read it)."""
        L, d, f = self.num_hidden_layers, self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {
            "attn_norm": (L, d),
            "wq": (L, q, d),
            "wk": (L, kv, d),
            "wv": (L, kv, d),
            "wo": (L, d, q),
            "mlp_norm": (L, d),
            "w_gate": (L, f, d),
            "w_up": (L, f, d),
            "w_down": (L, d, f),
        }

    def num_params(self) -> int:
        """Parameters as transformers counts them (a tied head once, the final norm included)."""
        tables = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return tables + sum(math.prod(s) for s in self.layer_shapes().values()) + self.hidden_size

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config.json") -> LlamaConfig:
        """Validate an HF config dict (`where` names it in errors) and normalise its rope spelling."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}; fix the file")
        if d.get("model_type", "llama") != "llama":
            raise ConfigError(
                f"{where}: model_type={brief(d.get('model_type'))} is not supported; jaxvocab converts "
                "Llama models only"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ConfigError(f"{where}: {flag}=true is not a Llama-3 layout and is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act={brief(d['hidden_act'])} is not supported (Llama uses silu)")
        if d.get("pretraining_tp", 1) not in (1, None) or isinstance(d.get("pretraining_tp"), bool):
            raise ConfigError(
                f"{where}: pretraining_tp={brief(d['pretraining_tp'])} is not supported; re-save the model "
                "with pretraining_tp=1"
            )
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in d
        ]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        theta, scaling = _rope_from_hf(d, where)
        size = lambda k, default=None: _positive_int(d, k, where, default)  # noqa: E731
        return cls(
            vocab_size=size("vocab_size"),
            hidden_size=size("hidden_size"),
            intermediate_size=size("intermediate_size"),
            num_hidden_layers=size("num_hidden_layers"),
            num_attention_heads=size("num_attention_heads"),
            num_key_value_heads=size("num_key_value_heads")
            if d.get("num_key_value_heads")
            else size("num_attention_heads"),
            head_dim=size("head_dim") if d.get("head_dim") is not None else None,
            rms_norm_eps=_positive_float(d.get("rms_norm_eps", 1e-5), "rms_norm_eps", where),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=size("max_position_embeddings", 131072),
            tie_word_embeddings=_bool(d.get("tie_word_embeddings", False), "tie_word_embeddings", where),
            bos_token_id=_token_ids(d.get("bos_token_id"), "bos_token_id", where),
            eos_token_id=_token_ids(d.get("eos_token_id"), "eos_token_id", where),
            pad_token_id=_token_ids(d.get("pad_token_id"), "pad_token_id", where),
            dtype=_dtype_name(d.get("dtype") or d.get("torch_dtype") or "float32", where),
            source=dict(d),
        )

    @classmethod
    def from_hf_file(cls, path: str | Path) -> LlamaConfig:
        """Read `config.json` (or a dir holding one).

        Args:
            path: the file, or an HF checkpoint dir (plain or a hub-cache snapshot).
        Returns:
            The config; a missing, malformed or non-Llama file raises a one-line ConfigError naming it.
        Example:
            >>> LlamaConfig.from_hf_file("Llama-3.2-1B").num_hidden_layers
            16
        """
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        d = read_json(path, "an HF checkpoint dir needs a config.json")
        return cls.from_hf_dict(d, where=str(path))

    def to_hf_dict(self) -> dict:
        """Our facts over the source dict, kept in the source's rope style."""
        out = dict(self.source or {})
        out.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=hf_ids(self.bos_token_id),
            eos_token_id=hf_ids(self.eos_token_id),
            pad_token_id=hf_ids(self.pad_token_id),
        )
        out.setdefault("torch_dtype" if "torch_dtype" in out else "dtype", self.dtype)
        # transformers >= 5 warns that a local tokenizer has "an incorrect regex pattern" (a Mistral
        # check) whenever the config beside it names no transformers_version. A source without one
        # (Meta params.json, a built config) gets the oldest release that reads every field written
        # here: 4.43, the first with Llama-3.1's rope scaling.
        out.setdefault("transformers_version", "4.43.0")
        scaling = None
        if self.rope_scaling is not None:
            scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if "rope_parameters" in out:
            out["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        else:
            old = (self.source or {}).get("rope_scaling") or {}
            if scaling is not None and "type" in old and "rope_type" not in old:
                scaling = {"type": "llama3", **dataclasses.asdict(self.rope_scaling)}
            out["rope_scaling"] = scaling
            out["rope_theta"] = self.rope_theta
        return out


def read_json(file: Path, need: str):
    """A config file's JSON; a missing or malformed file is a one-line ConfigError naming it."""
    return errors.read_json(file, ConfigError, "fix the file", missing=need)


def _positive_int(d: dict, key: str, where: str, default=None) -> int:
    """A size: a JSON integer > 0 (2.0, "2" or true would build a model nobody described)."""
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {brief(v)}; fix the file")
    return v


def _positive_float(v, key: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{where}: {key} must be a finite number > 0, got {brief(v)}; fix the file")
    return float(v)


def _bool(v, key: str, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {brief(v)}; fix the file")
    return v


def _token_ids(v, key: str, where: str) -> _TokenIds:
    ok = lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31  # noqa: E731
    if v is None or ok(v):
        return v
    if isinstance(v, list) and v and all(ok(x) for x in v):
        return tuple(v)
    raise ConfigError(f"{where}: {key} must be a token id, a list of them or null, got {brief(v)}; fix the file")


def _dtype_name(v, where: str) -> str:
    if not isinstance(v, str) or v not in ("float32", "bfloat16", "float16", "float64"):
        raise ConfigError(f"{where}: dtype {brief(v)} is not a float dtype jaxvocab knows; fix the file")
    return v


def hf_ids(v):
    """A token-id field as HF JSON writes it: a tuple of ids becomes a list."""
    return list(v) if isinstance(v, tuple) else v


def _rope_from_hf(d: dict, where: str) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object, got {brief(params)}; fix the file")
    if params is not None and "rope_type" not in params and "type" not in params:
        # transformers-5 may nest per layer-type ({"full_attention": {...}}); Llama has one type.
        nested = [v for v in params.values() if isinstance(v, dict)]
        params = nested[0] if len(nested) == 1 else params
    scaling = params if params is not None else d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{where}: rope_scaling must be an object or null, got {brief(scaling)}; fix the file")
    theta = _positive_float((params or {}).get("rope_theta", d.get("rope_theta", 10000.0)), "rope_theta", where)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"{where}: rope type {brief(kind)} is not supported (only default and llama3)")
    missing = [
        k
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if k not in scaling
    ]
    if missing:
        raise ConfigError(f"{where}: llama3 rope scaling is missing {missing[0]!r}")
    rs = RopeScaling(
        factor=_positive_float(scaling["factor"], "rope factor", where),
        low_freq_factor=_positive_float(scaling["low_freq_factor"], "low_freq_factor", where),
        high_freq_factor=_positive_float(scaling["high_freq_factor"], "high_freq_factor", where),
        original_max_position_embeddings=_positive_int(scaling, "original_max_position_embeddings", where),
    )
    if not rs.high_freq_factor > rs.low_freq_factor:
        raise ConfigError(f"{where}: llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor")
    return theta, rs


# Presets at the real shapes: for benchmarks and for building abstract models without files.
_L3_VOCAB = 128256
_LLAMA3 = dict(
    vocab_size=_L3_VOCAB,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)
_ROPE_3_1 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_ROPE_3_2 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA_3_2_1B = LlamaConfig(
    **{**_LLAMA3, "head_dim": 64, "tie_word_embeddings": True},
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    rope_scaling=_ROPE_3_2,
)
LLAMA_3_2_3B = LlamaConfig(
    **{**_LLAMA3, "tie_word_embeddings": True},
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    rope_scaling=_ROPE_3_2,
)
LLAMA_3_8B = LlamaConfig(
    **{**_LLAMA3, "max_position_embeddings": 8192},
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    rope_scaling=None,
)
LLAMA_3_1_8B = LlamaConfig(
    **_LLAMA3,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    rope_scaling=_ROPE_3_1,
)
LLAMA_3_1_70B = LlamaConfig(
    **_LLAMA3,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    rope_scaling=_ROPE_3_1,
)
LLAMA_3_1_405B = LlamaConfig(
    **_LLAMA3,
    hidden_size=16384,
    intermediate_size=53248,
    num_hidden_layers=126,
    num_attention_heads=128,
    rope_scaling=_ROPE_3_1,
)
PRESETS: dict[str, LlamaConfig] = {
    "llama-3.2-1b": LLAMA_3_2_1B,
    "llama-3.2-3b": LLAMA_3_2_3B,
    "llama-3-8b": LLAMA_3_8B,
    "llama-3.1-8b": LLAMA_3_1_8B,
    "llama-3.1-70b": LLAMA_3_1_70B,
    "llama-3.3-70b": LLAMA_3_1_70B,
    "llama-3.1-405b": LLAMA_3_1_405B,
}
