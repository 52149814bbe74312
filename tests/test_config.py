"""LlamaConfig against real HF config.json files and against transformers' own reading of them."""

from __future__ import annotations

import copy
import json

import pytest

from jaxvocab.config import LLAMA_3_1_8B, LLAMA_3_2_1B, LLAMA_3_8B, PRESETS, LlamaConfig, RopeScaling
from jaxvocab.errors import ConfigError
from tests.builders import make_hf_checkpoint

# Verbatim config.json files of the released checkpoints (the three rope/eos spellings in the wild).
LLAMA_3_2_1B_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_3_1_8B_INSTRUCT_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_3_8B_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
REAL = {
    "llama-3.2-1b": (LLAMA_3_2_1B_JSON, LLAMA_3_2_1B),
    "llama-3.1-8b-instruct": (LLAMA_3_1_8B_INSTRUCT_JSON, LLAMA_3_1_8B),
    "llama-3-8b": (LLAMA_3_8B_JSON, LLAMA_3_8B),
}
STYLES = ("rope_parameters", "rope_scaling", "rope_scaling_type")
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def hf_configs(tmp_path_factory):
    """config.json exactly as transformers 5 saves it, restyled to each spelling by the builder."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for style in STYLES:
        for scaling in (True, False):
            path, _ = make_hf_checkpoint(
                root / f"{style}-{scaling}",
                heads=8,
                kv_heads=2,
                tied=True,
                scaling=scaling,
                style=style,
                theta=20000.0,
                max_pos=2048,
            )
            out[style, scaling] = json.loads((path / "config.json").read_text())
    return out


def _tf_rope(d: dict) -> dict:
    """transformers' normalised rope parameters (it keeps a legacy `type` key around; drop it)."""
    from transformers import LlamaConfig as TFConfig

    params = dict(TFConfig.from_dict(copy.deepcopy(d)).rope_parameters)
    params.pop("type", None)
    return params


# ----------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("name", sorted(REAL))
def test_released_configs_read_as_presets(name):
    src, preset = REAL[name]
    cfg = LlamaConfig.from_hf_dict(copy.deepcopy(src))
    assert cfg.dtype == "bfloat16"
    if isinstance(src["eos_token_id"], list):
        assert cfg.eos_token_id == tuple(src["eos_token_id"]) and cfg.eos_ids == (128001, 128008, 128009)
        cfg = cfg.replace(eos_token_id=128001)
    assert cfg == preset
    assert cfg.q_per_kv == 4 and cfg.head_dim == src["hidden_size"] // src["num_attention_heads"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("scaling", [True, False])
def test_builder_configs_read_every_field(hf_configs, style, scaling):
    cfg = LlamaConfig.from_hf_dict(hf_configs[style, scaling])
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (256, 64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.q_per_kv) == (8, 2, 8, 4)
    assert cfg.tie_word_embeddings is True
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 20000.0 and cfg.max_position_embeddings == 2048
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.eos_ids, cfg.dtype) == (0, 1, (1,), "float32")
    assert cfg.rope_scaling == (RopeScaling(**SCALING) if scaling else None)


def test_all_rope_spellings_give_one_config(hf_configs):
    with_scaling = {LlamaConfig.from_hf_dict(hf_configs[s, True]) for s in STYLES}
    without = {LlamaConfig.from_hf_dict(hf_configs[s, False]) for s in STYLES}
    assert len(with_scaling) == 1 and len(without) == 1 and with_scaling != without
    # transformers-5 may nest rope_parameters per attention type; Llama has just one.
    d = copy.deepcopy(hf_configs["rope_parameters", True])
    d["rope_parameters"] = {"full_attention": d["rope_parameters"]}
    assert LlamaConfig.from_hf_dict(d) in with_scaling


@pytest.mark.parametrize(
    "null",
    [
        {"rope_scaling": None},
        {},
        {"rope_scaling": {"rope_type": "default"}},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 123456.0}},
    ],
)
def test_null_scaling_spellings(null):
    d = {k: v for k, v in LLAMA_3_8B_JSON.items() if k not in ("rope_scaling", "rope_theta")}
    d.update(null)
    if "rope_parameters" not in null:
        d["rope_theta"] = 123456.0
    cfg = LlamaConfig.from_hf_dict(d)
    assert cfg.rope_scaling is None and cfg.rope_theta == 123456.0


def test_explicit_head_dim_and_token_ids():
    d = dict(
        LLAMA_3_8B_JSON,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        bos_token_id=[5, 6],
        eos_token_id=[7, 8],
        pad_token_id=9,
        rms_norm_eps=1e-6,
    )
    cfg = LlamaConfig.from_hf_dict(d)
    assert cfg.head_dim == 32 and cfg.q_per_kv == 4 and cfg.rms_norm_eps == 1e-6
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.eos_ids, cfg.pad_token_id) == ((5, 6), (7, 8), (7, 8), 9)
    out = cfg.to_hf_dict()
    assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"], out["head_dim"]) == ([5, 6], [7, 8], 9, 32)
    hash(cfg)  # rides in NNX graph definitions


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "tiny-head-dim"])
def test_num_params_matches_transformers(name):
    import torch
    from transformers import LlamaConfig as TFConfig
    from transformers import LlamaForCausalLM

    cfg = PRESETS.get(name) or LlamaConfig.from_hf_dict(
        dict(
            LLAMA_3_8B_JSON,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=96,
            vocab_size=300,
            num_hidden_layers=3,
        )
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(TFConfig.from_dict(cfg.to_hf_dict()))
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("scaling", [True, False])
def test_to_hf_dict_reproduces_the_source_file(hf_configs, style, scaling):
    src = hf_configs[style, scaling]
    cfg = LlamaConfig.from_hf_dict(copy.deepcopy(src))
    out = cfg.to_hf_dict()
    assert out == src  # same keys, same values, same rope spelling
    assert LlamaConfig.from_hf_dict(out) == cfg
    assert _tf_rope(out) == _tf_rope(src)


@pytest.mark.parametrize("name", sorted(REAL))
def test_to_hf_dict_round_trips_released_configs(name):
    src = REAL[name][0]
    out = LlamaConfig.from_hf_dict(copy.deepcopy(src)).to_hf_dict()
    assert {k: out[k] for k in src} == src
    # Keys older files leave implicit; written with the values transformers assumes for them.
    assert set(out) - set(src) <= {"pad_token_id", "head_dim", "mlp_bias"}
    assert _tf_rope(out) == _tf_rope(src)


def test_to_hf_dict_shows_edits_in_the_source_style(hf_configs):
    src = hf_configs["rope_scaling_type", True]
    cfg = LlamaConfig.from_hf_dict(src).replace(
        vocab_size=384, rope_theta=1e6, rope_scaling=RopeScaling(16.0, 2.0, 8.0, 128)
    )
    out = cfg.to_hf_dict()
    assert out["vocab_size"] == 384 and out["rope_theta"] == 1e6 and "rope_parameters" not in out
    assert out["rope_scaling"] == {
        "type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 128,
    }
    new = LlamaConfig.from_hf_dict(hf_configs["rope_parameters", False]).replace(rope_scaling=RopeScaling(**SCALING))
    out = new.to_hf_dict()
    assert "rope_scaling" not in out and out["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": 20000.0,
        **SCALING,
    }
    assert _tf_rope(out) == _tf_rope(hf_configs["rope_parameters", True])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_write_configs_transformers_reads(name):
    from transformers import LlamaConfig as TFConfig

    preset = PRESETS[name]
    out = preset.to_hf_dict()
    assert LlamaConfig.from_hf_dict(out) == preset
    tf = TFConfig.from_dict(copy.deepcopy(out))
    assert (tf.num_key_value_heads, tf.head_dim, tf.tie_word_embeddings) == (
        preset.num_key_value_heads,
        preset.head_dim,
        preset.tie_word_embeddings,
    )
    expected = {"rope_type": "default", "rope_theta": preset.rope_theta}
    if preset.rope_scaling:
        expected = {"rope_type": "llama3", "rope_theta": preset.rope_theta, **vars(preset.rope_scaling)}
    assert _tf_rope(out) == expected


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}}, "'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_unsupported_configs_refused_naming_the_file(tmp_path, change, words):
    d = dict(LLAMA_3_1_8B_INSTRUCT_JSON, **change)
    d = {k: v for k, v in d.items() if v is not None or k in ("rope_scaling", "pad_token_id")}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        LlamaConfig.from_hf_file(tmp_path)
    msg = str(e.value)
    assert words in msg and "\n" not in msg
    if change != {"num_key_value_heads": 3}:  # checked in the dataclass, which has no file to name
        assert str(tmp_path / "config.json") in msg


@pytest.mark.parametrize("content", [None, "{not json", ""])
def test_missing_or_broken_config_file(tmp_path, content):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError) as e:
        LlamaConfig.from_hf_file(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)
