"""Vocabulary planning against the real Llama-3 tokenizer files and a GPT-2-style one, and the
untrained-row scan. Ids are checked against the files themselves and HF `tokenizers`."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxvocab
from jaxvocab.config import LlamaConfig
from jaxvocab.errors import UsageError, VocabError
from jaxvocab.io import keys
from jaxvocab.model import Llama
from jaxvocab.sharding import sharding_for, single_device_mesh
from jaxvocab.vocab import VocabPlan, describe_untrained, find_untrained, plan_vocab
from tests._tok_util import build_gpt2_style

RESERVED = re.compile(r"<\|reserved_special_token_\d+\|>")


# ------------------------------------------------------------------ helpers shared by the vocab tests
def tiny_config(vocab: int, hidden: int = 64, layers: int = 2, tied: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
        dtype="float32",
    )


def sharded_model(config: LlamaConfig, mesh, seed: int = 0, embed=None, head=None, norm=None, std=0.2) -> Llama:
    """A random model placed on `mesh` the way the loaders place it; tables/norm may be given."""
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(lambda: Llama(config))
    given = {("embed",): embed, ("lm_head",): head, ("norm",): norm}
    for key in keys.keys_for(config):
        shape = keys.param_shape(key, config)
        value = given.get(key.path)
        if value is None:
            value = 1.0 + 0.1 * rng.normal(size=shape) if key.path[-1].endswith("norm") else rng.normal(0, std, shape)
        sharding = sharding_for(shape, keys.logical_axes(key), mesh)
        keys.get_param(model, key).set_value(jax.device_put(np.asarray(value, np.float32), sharding))
    return model


def abstract_model(vocab: int) -> Llama:
    return nnx.eval_shape(lambda: Llama(tiny_config(vocab)))


@pytest.fixture(scope="session")
def tok_vision(llama3_tokenizer_dir):
    return jaxvocab.load_tokenizer(llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def tok31(llama3_tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok31")
    shutil.copy(llama3_tokenizer_dir / "tokenizer.model", d)
    return jaxvocab.load_tokenizer(d)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2tok")
    build_gpt2_style(str(d))
    return d


@pytest.fixture(scope="session")
def hf_tokenizer(llama3_tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))


# ------------------------------------------------------------------------------------ planning
def test_existing_tokens_are_kept(tok31, hf_tokenizer):
    model = abstract_model(128256)
    plan = plan_vocab(tok31, ["<|eot_id|>", "hello", " world", "<|reserved_special_token_5|>"], model=model)
    want = [
        128009,
        hf_tokenizer.token_to_id("hello"),
        hf_tokenizer.token_to_id("Ġworld"),
        tok31.special_tokens["<|reserved_special_token_5|>"],
    ]
    assert [t.id for t in plan.tokens] == want
    assert {t.action for t in plan.tokens} == {"existing"}
    assert plan.tokens[0].special and not plan.tokens[1].special
    assert plan.renamed == plan.appended == {} and plan.new_rows == plan.old_rows == 128256
    assert plan.reinit_ids == [] and plan.padding_ids == []
    # a reserved slot asked for by name is kept, not handed to a new token
    mixed = plan_vocab(tok31, ["<new>", "<|reserved_special_token_0|>"], model=model)
    assert mixed.renamed == {128003: "<new>"} and mixed.tokens[1].id == 128002


def test_reserved_reuse_ascending_then_append(tok_vision, llama3_tokenizer_dir):
    """The package's files are Llama-3.2-Vision's: 247 free slots, <|image|> at 128256."""
    added = {
        e["id"]: e["content"] for e in json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    }
    free = sorted(i for i, t in added.items() if RESERVED.fullmatch(t))
    assert len(free) == 247 and free[:3] == [128002, 128003, 128011]
    new = [f"<|new_{i}|>" for i in range(250)]
    with pytest.warns(UserWarning, match="<\\|image\\|>"):
        plan = plan_vocab(tok_vision, new, model=abstract_model(128256), pad_to_multiple_of=128)
    assert [t.id for t in plan.tokens[:247]] == free
    assert [t.replaces for t in plan.tokens[:3]] == [added[i] for i in free[:3]]
    assert plan.renamed == dict(zip(free, new[:247], strict=True))
    assert plan.appended == {128257: new[247], 128258: new[248], 128259: new[249]}
    assert [t.action for t in plan.tokens[247:]] == ["appended"] * 3
    assert plan.unbacked_ids == [128256]  # <|image|> has no row in a 128256-row text model
    assert (plan.tokenizer_size_before, plan.tokenizer_size_after) == (128257, 128260)
    assert plan.new_rows == 128384 and plan.padding_ids == list(range(128260, 128384))
    assert plan.reinit_ids == free + list(range(128256, 128384))
    few = plan_vocab(tok_vision, ["<a>", "<b>", "<c>"])  # no model: rows = tokenizer ids
    assert [t.id for t in few.tokens] == [128002, 128003, 128011]
    assert few.old_rows == few.new_rows == 128257


def test_append_without_reuse_and_padding(tok31):
    plan = plan_vocab(tok31, ["<a>", "<b>"], reuse_reserved=False, pad_to_multiple_of=64, model=abstract_model(128256))
    assert plan.appended == {128256: "<a>", 128257: "<b>"} and plan.renamed == {}
    assert plan.new_rows == 128320 and plan.padding_ids == list(range(128258, 128320))
    assert len(tok31.free_reserved()) == 248


def test_reuse_reserved_for_special_tokens_only(tok31):
    plan = plan_vocab(
        tok31,
        ["<|tool|>", "jaxvocab", "<|lang|>"],
        reuse_reserved="special",
        special=["<|tool|>", "<|lang|>"],
        pad_to_multiple_of=64,
        model=abstract_model(128256),
    )
    first, second = tok31.free_reserved()[:2]
    assert plan.renamed == {first: "<|tool|>", second: "<|lang|>"}
    assert plan.appended == {128256: "jaxvocab"} and plan.special_ids == {first, second}
    with pytest.raises(UsageError):
        plan_vocab(tok31, ["<a>"], reuse_reserved="sometimes")


def test_reuse_reserved_modes_match_the_old_booleans(tok31):
    """ "all" / "none" are what True / False always meant; other values are a usage error."""
    model = abstract_model(128256)
    words = ["<|tool|>", "jaxvocab"]
    for mode, old, actions in (("all", True, ["reserved", "reserved"]), ("none", False, ["appended", "appended"])):
        plan = plan_vocab(tok31, words, reuse_reserved=mode, pad_to_multiple_of=64, model=model)
        assert plan == plan_vocab(tok31, words, reuse_reserved=old, pad_to_multiple_of=64, model=model)
        assert [t.action for t in plan.tokens] == actions
    for bad in (["all"], 1.5, None, "All"):
        with pytest.raises(UsageError, match="reuse_reserved"):
            plan_vocab(tok31, words, reuse_reserved=bad, model=model)


def test_pre_padded_rows_are_used_first(tok31):
    model = abstract_model(128320)  # tokenizer 128256 ids, 64 spare padding rows
    plan = plan_vocab(tok31, [f"<t{i}>" for i in range(70)], reuse_reserved=False, model=model)
    actions = [t.action for t in plan.tokens]
    assert actions == ["spare_row"] * 64 + ["appended"] * 6
    assert [t.id for t in plan.tokens] == list(range(128256, 128326))
    assert plan.new_rows == 128326 and plan.padding_ids == []
    assert plan.reinit_ids == list(range(128256, 128326))
    fits = plan_vocab(tok31, [f"<t{i}>" for i in range(250)], model=model)
    assert [t.action for t in fits.tokens] == ["reserved"] * 248 + ["spare_row"] * 2
    assert fits.new_rows == 128320 and fits.padding_ids == list(range(128258, 128320))
    assert 128300 not in fits.reinit_ids  # unused spare rows stay as they were


def test_default_padding_follows_the_mesh(gpt2_dir, mesh24, mesh1):
    tok = jaxvocab.load_tokenizer(gpt2_dir)
    on24 = sharded_model(tiny_config(tok.n_words), mesh24)
    on1 = sharded_model(tiny_config(tok.n_words), mesh1)
    assert plan_vocab(tok, ["<x>"], model=on24).new_rows == 384  # >= 128 on several devices
    assert plan_vocab(tok, ["<x>"], model=on1).new_rows == tok.n_words + 1
    assert plan_vocab(tok, ["<x>"], model=on24, pad_to_multiple_of=8).new_rows == 320


def test_gpt2_style_tokenizer(gpt2_dir):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    tok = jaxvocab.load_tokenizer(gpt2_dir)
    assert not tok.llama3
    n = tok.n_words
    plan = plan_vocab(tok, ["<s>", "the", "<x>", "thequickfox", "<y>"], special={"<y>"})
    ids = {t.token: t.id for t in plan.tokens}
    assert ids["<s>"] == 0 and ids["the"] == hf.token_to_id("the")
    assert plan.appended == {n: "<x>", n + 1: "thequickfox", n + 2: "<y>"}
    assert plan.special_ids == {n + 2} and plan.renamed == {}


def test_bad_requests(tok31, tmp_path):
    for bad, msg in (
        (["<a>", "<a>"], "twice"),
        ([""], "empty"),
        (["  \t"], "whitespace"),
        ([3], "not a string"),
        ({"<a>": " "}, "description"),
    ):
        with pytest.raises(VocabError, match=msg):
            plan_vocab(tok31, bad)
    with pytest.raises(UsageError, match="pad-to-multiple-of"):
        plan_vocab(tok31, ["<a>"], pad_to_multiple_of=0)
    with pytest.raises(VocabError, match="not among the new tokens"):
        plan_vocab(tok31, ["<a>"], special={"<b>"})
    # a reserved slot tokenizer_config.json gives a role to is not free
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|reserved_special_token_0|>"}))
    from jaxvocab.io.carried import CarriedFiles

    plan = plan_vocab(tok31.with_files(CarriedFiles.of(tmp_path)), ["<a>"], model=abstract_model(128256))
    assert plan.renamed == {128003: "<a>"}


def test_plan_json_round_trip(tok31):
    plan = plan_vocab(
        tok31,
        {"<a>": "a letter", "hello": None, "<b>": None},
        special={"<b>"},
        reuse_reserved=True,
        pad_to_multiple_of=128,
        model=abstract_model(128256),
    )
    again = VocabPlan.from_json(plan.to_json())
    assert again == plan
    assert again.renamed == {128002: "<a>", 128003: "<b>"} and again.special_ids == {128003}
    assert again.tokens[0].description == "a letter"
    text = plan.summary()
    assert "<|reserved_special_token_0|>" in text and "existing" in text and "128256 -> 128256" in text
    short = plan.summary(limit=1).splitlines()  # the CLI's import shows the first 40 of many tokens
    assert short[1].startswith("<a>") and "<b>" not in "".join(short)
    assert short[2] == "... 2 more token(s), every one listed in vocab_plan.json" and short[3:] == text.splitlines()[4:]
    with pytest.raises(VocabError, match="vocab_plan.json"):
        VocabPlan.from_json('{"tokens": [], "old_rows": 1}')
    with pytest.raises(VocabError, match="vocab_plan.json"):
        VocabPlan.from_json("{not json")


# ------------------------------------------------------------------------------ untrained rows
def test_find_untrained_tiny_zero_and_duplicate_rows(tok31, mesh24):
    v, d = 512, 64
    rng = np.random.default_rng(0)
    embed = rng.normal(0, 0.02, (v, d)).astype(np.float32)
    head = rng.normal(0, 0.02, (v, d)).astype(np.float32)
    embed[[3, 4]] = 0.0
    embed[5] = 1e-30  # "zero" in some releases is a denormal-ish tiny value
    head[6] = 1e-9
    head[[100, 200, 300]] = head[7]  # one non-zero head row repeated (Llama-3.1 base)
    model = sharded_model(tiny_config(v), mesh24, embed=embed, head=head)
    assert find_untrained(model) == [3, 4, 5, 6, 7, 100, 200, 300]
    assert find_untrained(model, rel_eps=1e-33) == [3, 4, 7, 100, 200, 300]
    tied = sharded_model(tiny_config(v, tied=True), mesh24, embed=embed)
    assert find_untrained(tied) == [3, 4, 5]


def test_duplicate_head_rows_are_compared_whole_past_the_fingerprinted_columns(mesh24):
    """Fingerprints see only a row's first 256 columns: rows equal there but not after are candidates
    that the full comparison clears; exact copies are found."""
    v, d = 256, 512
    rng = np.random.default_rng(2)
    embed, head = (rng.normal(0, 0.02, (v, d)).astype(np.float32) for _ in range(2))
    head[[20, 21]] = head[10]  # exact copies
    head[30, :256] = head[40, :256]  # equal in the fingerprinted columns only
    model = sharded_model(tiny_config(v, hidden=d), mesh24, embed=embed, head=head)
    assert find_untrained(model) == [10, 20, 21]


def test_table_statistics_hold_no_copy_of_a_table():
    """The one pass over the tables (row max, block sums, head fingerprints) compiles to working
    memory well below a table: a column slice for the fingerprints once made XLA hold an f32 copy of
    the head (2.25x its bytes; 2 GB at 8B shapes)."""
    from jaxvocab.row_stats import _stats_fn

    v, d = 8192, 2048
    table = jax.ShapeDtypeStruct((v, d), jnp.bfloat16)
    probe = jax.ShapeDtypeStruct((256, 2), jnp.float32)
    compiled = _stats_fn(v, (False, True), single_device_mesh()).lower([table, table], probe).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.5 * v * d * 2


def test_untrained_padding_rows_reported_separately(gpt2_dir, mesh24):
    tok = jaxvocab.load_tokenizer(gpt2_dir)
    v = tok.n_words + 3
    embed = np.random.default_rng(1).normal(0, 0.02, (v, 64)).astype(np.float32)
    embed[[10, tok.n_words, tok.n_words + 2]] = 0.0
    model = sharded_model(tiny_config(v, tied=True), mesh24, embed=embed)
    assert find_untrained(model, tok) == [10]
    assert find_untrained(model, tok, include_padding=True) == [10, tok.n_words, tok.n_words + 2]
    lines = describe_untrained([10, tok.n_words], tok)
    assert lines == [f"10 {tok.id_to_piece(10)}", f"{tok.n_words} (padding row)"]
